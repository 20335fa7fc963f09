//! `lockgate serve` under hostile, slow and failing clients (issue 18): what one client can hold
//! (connections, queue places, answers it does not read) is bounded, browsers and strangers are
//! kept out, and the server drains before it stops. Real sockets against the real binary; each
//! client address is one of 127.0.0.0/8 (all reach the server on 127.0.0.1, and each counts as
//! another client).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lockgate_testenv::process::Proc;
use lockgate_testenv::raw_http::{once, request, Answer, Conn};
use lockgate_testenv::{go_peer, go_peer_v01, rust_cli, time_limit};
use serde_json::{json, Value};

/// `lockgate serve` on a free loopback port with no start-up grace, and its address.
fn serve(args: &[&str]) -> (Proc, String) {
    let mut p = Proc::spawn(
        Command::new(rust_cli())
            .args(["serve", "--listen", "127.0.0.1:0", "--grace", "0"])
            .args(args),
    );
    let line = p.line("serving on ", Duration::from_secs(20));
    (p, line.trim_start_matches("serving on ").to_owned())
}

fn acquire_req(name: &str, opts: Value, headers: &[(&str, &str)]) -> Vec<u8> {
    request(
        "POST",
        "/acquire",
        headers,
        &json!({"lockName": name, "opts": opts}).to_string(),
    )
}

fn healthz() -> Vec<u8> {
    request("GET", "/healthz", &[], "")
}

async fn call(addr: &str, bytes: &[u8]) -> Answer {
    once(addr, bytes)
        .await
        .unwrap_or_else(|| panic!("no answer from {addr}"))
}

async fn call_from(addr: &str, source: &str, bytes: &[u8]) -> Option<Answer> {
    let mut c = Conn::connect_from(addr, source, None).await.ok()?;
    c.call(bytes).await.ok().flatten()
}

/// Takes `name` (it must be free); returns the handle.
async fn hold(addr: &str, name: &str) -> Value {
    let a = call(addr, &acquire_req(name, json!({}), &[])).await;
    let v = a.json();
    assert_eq!((a.status, v["err"].as_str()), (200, Some("")), "{v}");
    v["lockHandle"].clone()
}

async fn release(addr: &str, handle: &Value) {
    let a = call(
        addr,
        &request(
            "POST",
            "/release",
            &[],
            &json!({"lockHandle": handle}).to_string(),
        ),
    )
    .await;
    assert_eq!((a.status, a.json()["err"].as_str()), (200, Some("")));
}

/// `/status` of one lock (`Null` when it has neither holders nor waiters).
async fn status_of(addr: &str, name: &str, headers: &[(&str, &str)]) -> Value {
    let a = call(
        addr,
        &request("GET", &format!("/status?name={name}"), headers, ""),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.body));
    a.json()["locks"].get(0).cloned().unwrap_or(Value::Null)
}

fn waiters(s: &Value) -> usize {
    s["waiters"].as_array().map_or(0, Vec::len)
}

fn token_file(dir: &Path, token: &str) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Item 1: three clients that pipeline requests and never read the answers held every slot of
/// `--max-connections 3` for good. Now an answer the client does not take within the send
/// timeout (10 s) ends its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_send_requests_and_never_read_the_answers_are_disconnected() {
    time_limit(Duration::from_secs(180));
    let (_server, addr) = serve(&["--ttl", "1h", "--max-connections", "3"]);
    // 800 held locks make every /status answer about 100 KB.
    let mut c = Conn::connect(&addr).await.unwrap();
    for i in 0..800 {
        let a = c
            .call(&acquire_req(&format!("held-{i:04}"), json!({}), &[]))
            .await
            .unwrap()
            .expect("an answer");
        assert_eq!(a.status, 200);
    }
    drop(c);
    let mut attackers = Vec::new();
    for _ in 0..3 {
        let mut s = Conn::connect_from(&addr, "127.0.0.1", Some(4096))
            .await
            .unwrap();
        attackers.push(tokio::spawn(async move {
            let req = request("GET", "/status", &[], "");
            for _ in 0..300 {
                if s.send(&req).await.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await;
            drop(s);
        }));
    }
    // The attack works: a new client is turned away (all three slots taken)...
    let start = Instant::now();
    loop {
        if once(&addr, &healthz()).await.is_none() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the three clients never took every connection slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...until the server gives up on the clients that do not read.
    loop {
        if let Some(a) = once(&addr, &healthz()).await {
            assert_eq!(a.status, 200);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no new client was served for 60 s while three clients did not read their answers"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("a new client was served after {:?}", start.elapsed());
    for a in attackers {
        a.abort();
    }
}

/// Item 2: one address could take every connection slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_cannot_take_every_connection() {
    time_limit(Duration::from_secs(60));
    let (_server, addr) = serve(&["--max-connections-per-client", "4"]);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = Conn::connect_from(&addr, "127.0.0.2", None).await.unwrap();
        let a = c.call(&healthz()).await.unwrap().expect("an answer");
        assert_eq!(a.status, 200);
        held.push(c);
    }
    assert!(
        call_from(&addr, "127.0.0.2", &healthz()).await.is_none(),
        "a fifth connection from one address was served"
    );
    let other = call_from(&addr, "127.0.0.3", &healthz()).await;
    assert_eq!(other.map(|a| a.status), Some(200));
    // One closes: the address may connect again.
    drop(held.pop());
    let start = Instant::now();
    while call_from(&addr, "127.0.0.2", &healthz()).await.is_none() {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Item 2: a 401 kept its connection open, so token guessing was unlimited on one connection.
/// Now a 401 closes it, and an address that keeps guessing is not listened to (new connections
/// closed, requests on open ones answered 429), even with the right token, while other
/// addresses are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_closes_the_connection_and_guessing_is_rate_limited() {
    time_limit(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = serve(&["--token-file", &token_file(dir.path(), "s3cret")]);
    let wrong = acquire_req("l", json!({}), &[("Authorization", "Bearer guess")]);
    let right = acquire_req("l", json!({}), &[("Authorization", "Bearer s3cret")]);
    let mut early = Conn::connect_from(&addr, "127.0.0.4", None).await.unwrap();
    let healthy = early.call(&healthz()).await.unwrap().expect("an answer");
    assert_eq!(healthy.status, 200);
    let mut c = Conn::connect_from(&addr, "127.0.0.4", None).await.unwrap();
    let a = c.call(&wrong).await.unwrap().expect("an answer");
    assert_eq!(a.status, 401);
    assert_eq!(a.header("connection"), Some("close"));
    assert!(
        c.closed_within(Duration::from_secs(5)).await,
        "the connection stayed open after a 401"
    );
    for i in 1..30 {
        let a = call_from(&addr, "127.0.0.4", &wrong).await;
        assert_eq!(a.map(|a| a.status), Some(401), "guess {i}");
    }
    // From there, even the right token: a new connection is closed at once...
    assert!(
        call_from(&addr, "127.0.0.4", &right).await.is_none(),
        "a guesser's new connection was served"
    );
    // ...and a request on a connection opened before is answered 429.
    let a = early.call(&right).await.unwrap().expect("an answer");
    assert_eq!(a.status, 429, "{:?}", a.json());
    assert_eq!(a.json()["code"], "too_many_requests");
    let after: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3).contains(&after), "Retry-After {after}");
    let a = call_from(&addr, "127.0.0.5", &right)
        .await
        .expect("an answer");
    assert_eq!(a.status, 200, "{:?}", a.json());
}

/// Item 2: an HTTP/2 connection that sent only its preface (and answered the server's pings,
/// as any HTTP/2 client does) was held for the idle timeout (120 s); the header timeout (10 s)
/// now applies to its first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_sends_only_its_preface_is_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    time_limit(Duration::from_secs(60));
    let (_server, addr) = serve(&[]);
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    s.write_all(&hello).await.unwrap();
    let start = Instant::now();
    // Frames: acknowledge the server's SETTINGS and answer its PINGs, never open a stream.
    let closed = tokio::time::timeout(Duration::from_secs(40), async {
        let mut head = [0u8; 9];
        loop {
            if s.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                return;
            }
            let (kind, flags) = (head[3], head[4]);
            let reply: Option<Vec<u8>> = match (kind, flags & 1) {
                (4, 0) => Some(vec![0, 0, 0, 4, 1, 0, 0, 0, 0]),
                (6, 0) => {
                    let mut pong = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                    pong.extend_from_slice(&payload);
                    Some(pong)
                }
                _ => None,
            };
            if let Some(r) = reply {
                if s.write_all(&r).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "an HTTP/2 connection without a request was held for 40 s"
    );
    let held = start.elapsed();
    assert!(held >= Duration::from_secs(8), "closed after {held:?}");
}

/// Item 3: any web page could take locks on a server without a token (a `text/plain` POST was
/// parsed as JSON; neither `Origin` nor `Host` was looked at).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_web_pages_are_refused() {
    time_limit(Duration::from_secs(60));
    let (_server, addr) = serve(&[]);
    let body = json!({"lockName": "page"}).to_string();
    // A form or a fetch without preflight.
    let a = call(
        &addr,
        &request("POST", "/acquire", &[("Content-Type", "text/plain")], &body),
    )
    .await;
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    assert_eq!(
        status_of(&addr, "page", &[]).await,
        Value::Null,
        "the lock was taken"
    );
    for headers in [
        vec![("Origin", "http://evil.example")],
        vec![("Origin", "null")],
        vec![("Sec-Fetch-Site", "cross-site")],
        // DNS rebinding: the page's own name resolving to the server.
        vec![("Host", "evil.example:7780")],
    ] {
        let a = call(&addr, &request("POST", "/acquire", &headers, &body)).await;
        assert_eq!(
            (a.status, a.json()["code"].as_str()),
            (403, Some("forbidden")),
            "{headers:?}"
        );
        let a = call(&addr, &request("GET", "/status", &headers, "")).await;
        assert_eq!(a.status, 403, "{headers:?}");
    }
    assert_eq!(
        status_of(&addr, "page", &[]).await,
        Value::Null,
        "the lock was taken"
    );
    // Go's client (no Content-Type, the server's address as Host), ours (JSON), a person
    // typing the URL in a browser (Sec-Fetch-Site: none) are served.
    let h = hold(&addr, "page").await;
    release(&addr, &h).await;
    let a = call(
        &addr,
        &request(
            "POST",
            "/acquire",
            &[("Content-Type", "application/json; charset=utf-8")],
            &body,
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = call(
        &addr,
        &request(
            "GET",
            "/status",
            &[("Sec-Fetch-Site", "none"), ("Host", "localhost:7780")],
            "",
        ),
    )
    .await;
    assert_eq!(a.status, 200);
}

/// Item 3: names given with `--allowed-host` are answered, others not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_host_names_are_answered() {
    time_limit(Duration::from_secs(60));
    let (_server, addr) = serve(&["--allowed-host", "locks.example"]);
    let a = call(
        &addr,
        &request("GET", "/healthz", &[("Host", "LOCKS.example:7780")], ""),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = call(
        &addr,
        &request("GET", "/healthz", &[("Host", "other.example")], ""),
    )
    .await;
    assert_eq!(a.status, 403);
}

/// Item 3: a server without a token listened on any address it was given.
#[test]
fn listening_beyond_loopback_needs_a_token_or_an_explicit_flag() {
    time_limit(Duration::from_secs(60));
    let mut p = Proc::spawn(Command::new(rust_cli()).args(["serve", "--listen", "0.0.0.0:0"]));
    let line = p.line("lockgate: ", Duration::from_secs(10));
    assert!(line.contains("--allow-no-token"), "{line}");
    assert_eq!(p.wait(Duration::from_secs(10)), 64);
    let (_open, _) = {
        let mut p = Proc::spawn(Command::new(rust_cli()).args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--allow-no-token",
        ]));
        let l = p.line("serving on ", Duration::from_secs(10));
        (p, l)
    };
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(Command::new(rust_cli()).args([
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--token-file",
        &token_file(dir.path(), "s3cret"),
    ]));
    p.line("serving on ", Duration::from_secs(10));
}

/// Item 4: `/status` showed every acquirer id, the name of a queue place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_acquirer_ids_only_to_token_holders() {
    time_limit(Duration::from_secs(60));
    let (_open, addr) = serve(&[]);
    let _h = hold(&addr, "ids").await;
    let a = call(
        &addr,
        &acquire_req("ids", json!({"acquirerId": "runner-7"}), &[]),
    )
    .await;
    assert_eq!(a.json()["err"], "should wait");
    let s = status_of(&addr, "ids", &[]).await;
    assert_eq!(waiters(&s), 1, "{s}");
    assert_eq!(s["waiters"][0].get("acquirerId"), None, "{s}");

    let dir = tempfile::tempdir().unwrap();
    let (_closed, addr) = serve(&["--token-file", &token_file(dir.path(), "s3cret")]);
    let auth = [("Authorization", "Bearer s3cret")];
    let a = call(&addr, &acquire_req("ids", json!({}), &auth)).await;
    assert_eq!(a.json()["err"], "");
    let a = call(
        &addr,
        &acquire_req("ids", json!({"acquirerId": "runner-7"}), &auth),
    )
    .await;
    assert_eq!(a.json()["err"], "should wait");
    let s = status_of(&addr, "ids", &auth).await;
    assert_eq!(s["waiters"][0]["acquirerId"], "runner-7", "{s}");
}

/// Item 4: another client could send a waiter's acquirer id to take its turn or give up its
/// place. A place now belongs to the id and the address that took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_client_can_neither_take_nor_give_up_a_waiters_place() {
    time_limit(Duration::from_secs(60));
    let (_server, addr) = serve(&[]);
    let h = hold(&addr, "turn").await;
    let id = json!({"acquirerId": "runner-7"});
    let mine = acquire_req("turn", id.clone(), &[]);
    let a = call_from(&addr, "127.0.0.6", &mine).await.unwrap();
    assert_eq!(a.json()["err"], "should wait");
    release(&addr, &h).await;
    // The lock is kept for runner-7's next poll; a stranger using its id does not get it.
    let a = call_from(&addr, "127.0.0.7", &mine).await.unwrap();
    assert_eq!(
        a.json()["err"],
        "should wait",
        "a stranger took runner-7's turn"
    );
    let cancel = request(
        "POST",
        "/cancel",
        &[],
        &json!({"lockName": "turn", "acquirerId": "runner-7"}).to_string(),
    );
    let a = call_from(&addr, "127.0.0.7", &cancel).await.unwrap();
    assert_eq!(a.status, 200);
    // The stranger gave up its own place only.
    let s = status_of(&addr, "turn", &[]).await;
    assert_eq!(waiters(&s), 1, "{s}");
    let a = call_from(&addr, "127.0.0.6", &mine).await.unwrap();
    assert_eq!(a.json()["err"], "", "{}", a.json());
}

/// Item 4: one client could fill the server's waiter cap (10 000) on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_every_queue_place() {
    time_limit(Duration::from_secs(60));
    let (_server, addr) = serve(&["--max-waiters-per-client", "5"]);
    let _h = hold(&addr, "places").await;
    for i in 0..6 {
        // Go's requests (no waitMs): beyond the cap it is told to wait, not failed.
        let req = acquire_req("places", json!({"acquirerId": format!("flood-{i}")}), &[]);
        let a = call_from(&addr, "127.0.0.8", &req).await.unwrap();
        assert_eq!(
            (a.status, a.json()["err"].as_str()),
            (200, Some("should wait"))
        );
    }
    assert_eq!(waiters(&status_of(&addr, "places", &[]).await), 5);
    // lockgate's long polls are told why.
    let req = acquire_req(
        "places",
        json!({"acquirerId": "flood-x", "waitMs": 1000}),
        &[],
    );
    let a = call_from(&addr, "127.0.0.8", &req).await.unwrap();
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (503, Some("capacity"))
    );
    let req = acquire_req("places", json!({"acquirerId": "other"}), &[]);
    let a = call_from(&addr, "127.0.0.9", &req).await.unwrap();
    assert_eq!(a.json()["err"], "should wait");
    assert_eq!(waiters(&status_of(&addr, "places", &[]).await), 6);
}

/// Item 5: Go's client turns any answer but a 200 into a failure; a full server answered 503,
/// so a Go acquisition failed instead of waiting. Both Go peers, over the cap on held leases;
/// Go v0.2 with an acquirer id also over the cap on waiters.
#[test]
fn a_go_client_waits_instead_of_failing_when_the_server_is_full() {
    time_limit(Duration::from_secs(120));
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (peer, version, id) in [
        (go_peer(), "v0.2.0", &["--acquirer-id", "auto"][..]),
        (go_peer_v01(), "v0.1.1", &[][..]),
    ] {
        eprintln!("Go peer {version}, over the cap on held leases");
        let (_server, addr) = serve(&["--max-held", "1"]);
        let other = rt.block_on(hold(&addr, "other"));
        let mut go = go_exec(&peer, &addr, id, "free");
        // It polls every 2 s: two polls refused over capacity.
        std::thread::sleep(Duration::from_secs(5));
        assert!(
            go.running(),
            "the Go client failed while the server was full"
        );
        rt.block_on(release(&addr, &other));
        go.line("locked", Duration::from_secs(10));
        assert_eq!(go.wait(Duration::from_secs(10)), 0);
    }
    eprintln!("Go peer v0.2.0 with an acquirer id, over the cap on waiters");
    let (_server, addr) = serve(&["--max-waiters", "1"]);
    let h = rt.block_on(hold(&addr, "full"));
    // A long poll takes the only queue place.
    let a2 = addr.clone();
    let long_poll =
        rt.spawn(
            async move { call(&a2, &acquire_req("full", json!({"waitMs": 60_000}), &[])).await },
        );
    rt.block_on(async {
        let start = Instant::now();
        while waiters(&status_of(&addr, "full", &[]).await) < 1 {
            assert!(start.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut go = go_exec(&go_peer(), &addr, &["--acquirer-id", "auto"], "full");
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        go.running(),
        "the Go client failed while the server was full"
    );
    rt.block_on(release(&addr, &h));
    let granted = rt.block_on(long_poll).unwrap().json();
    assert_eq!(granted["err"], "", "{granted}");
    rt.block_on(release(&addr, &granted["lockHandle"]));
    go.line("locked", Duration::from_secs(10));
    assert_eq!(go.wait(Duration::from_secs(10)), 0);
}

/// `lockgate-go exec` waiting up to 60 s for NAME through the server at `addr`; prints `locked`.
fn go_exec(peer: &Path, addr: &str, args: &[&str], name: &str) -> Proc {
    Proc::spawn(
        Command::new(peer)
            .args([
                "exec",
                "--locker",
                &format!("http://{addr}"),
                "-q",
                "-w",
                "60",
            ])
            .args(args)
            .args([name, "--", "sh", "-c", "echo locked"]),
    )
}

/// Item 6: SIGTERM closed the listener at once. Now `/readyz` fails first and the server keeps
/// serving for the drain delay (answers close their connections, so clients reconnect
/// elsewhere), then stops.
#[test]
fn sigterm_drains_first_then_stops() {
    time_limit(Duration::from_secs(120));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut server, addr) = serve(&["--drain-delay", "4s"]);
    let mut kept = rt.block_on(Conn::connect(&addr)).unwrap();
    assert_eq!(
        rt.block_on(kept.call(&healthz())).unwrap().unwrap().status,
        200
    );
    let ready = rt.block_on(call(&addr, &request("GET", "/readyz", &[], "")));
    assert_eq!(
        (ready.status, ready.json()["status"].as_str()),
        (200, Some("ok"))
    );
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    rt.block_on(async {
        loop {
            let a = call(&addr, &request("GET", "/readyz", &[], "")).await;
            if a.status == 503 {
                assert_eq!(a.json()["status"], "draining");
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "/readyz still ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let live = call(&addr, &healthz()).await;
        assert_eq!(
            (live.status, live.json()["status"].as_str()),
            (200, Some("draining"))
        );
        // Still serving, new connections and old, and each answer closes its connection.
        let a = call(&addr, &acquire_req("drain", json!({}), &[])).await;
        assert_eq!((a.status, a.json()["err"].as_str()), (200, Some("")));
        assert_eq!(a.header("connection"), Some("close"));
        let a = kept.call(&healthz()).await.unwrap().unwrap();
        assert_eq!(a.header("connection"), Some("close"));
    });
    // A Go client acquires during the drain.
    let mut go = Proc::spawn(
        Command::new(go_peer())
            .args(["exec", "--locker", &format!("http://{addr}"), "-q", "-n"])
            .args(["drain-go", "--", "sh", "-c", "echo locked"]),
    );
    go.line("locked", Duration::from_secs(3));
    assert_eq!(go.wait(Duration::from_secs(3)), 0);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "the checks took too long"
    );
    assert_eq!(server.wait(Duration::from_secs(20)), 0);
    let stopped = start.elapsed();
    assert!(
        stopped >= Duration::from_secs(4),
        "stopped after {stopped:?}"
    );
}

/// Item 8: `/status?limit=` had no upper bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_pages_are_bounded() {
    time_limit(Duration::from_secs(120));
    let (_server, addr) = serve(&["--ttl", "1h"]);
    let mut c = Conn::connect(&addr).await.unwrap();
    for i in 0..1500 {
        let a = c
            .call(&acquire_req(&format!("page-{i:04}"), json!({}), &[]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.status, 200);
    }
    let page = c
        .call(&request("GET", "/status?limit=1000000", &[], ""))
        .await
        .unwrap()
        .unwrap()
        .json();
    let locks = page["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 1000);
    assert_eq!(
        (page["total"].as_u64(), page["truncated"].as_bool()),
        (Some(1500), Some(true))
    );
    assert_eq!(locks[999]["lockName"], "page-0999");
    let next = c
        .call(&request("GET", "/status?after=page-0999", &[], ""))
        .await
        .unwrap()
        .unwrap()
        .json();
    let locks = next["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 500);
    assert_eq!(locks[0]["lockName"], "page-1000");
    assert_eq!(next["truncated"], false);
}

/// Item 8: a lock's queue had no bound of its own (its work grows with its length).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locks_queue_is_bounded() {
    time_limit(Duration::from_secs(60));
    let (_server, addr) = serve(&["--max-waiters-per-lock", "3"]);
    let _h = hold(&addr, "hot").await;
    for i in 0..4 {
        let req = acquire_req("hot", json!({"acquirerId": format!("w-{i}")}), &[]);
        assert_eq!(call(&addr, &req).await.json()["err"], "should wait");
    }
    assert_eq!(waiters(&status_of(&addr, "hot", &[]).await), 3);
    let req = acquire_req("hot", json!({"waitMs": 1000}), &[]);
    let a = call(&addr, &req).await;
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (503, Some("capacity"))
    );
    assert!(
        a.json()["err"].as_str().unwrap().contains("this lock"),
        "{}",
        a.json()
    );
    // Other locks are not affected.
    let _other = hold(&addr, "cold").await;
}

/// Item 9: a token change needed a restart, which ends every memory-store lease. SIGHUP reads
/// the token file again; leases stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_the_token_file_again_and_keeps_the_leases() {
    time_limit(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let file = token_file(dir.path(), "one");
    let (server, addr) = serve(&["--token-file", &file]);
    let old = [("Authorization", "Bearer one")];
    let new = [("Authorization", "Bearer two")];
    let a = call(&addr, &acquire_req("kept", json!({}), &old)).await;
    let handle = a.json()["lockHandle"].clone();
    token_file(dir.path(), "two");
    server.signal(libc::SIGHUP);
    let start = Instant::now();
    loop {
        let a = call(&addr, &healthz()).await;
        assert_eq!(a.status, 200, "the server went away on SIGHUP");
        let a = call_from(&addr, "127.0.0.10", &request("GET", "/status", &new, "")).await;
        if a.map(|a| a.status) == Some(200) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new token was never accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = call_from(&addr, "127.0.0.11", &request("GET", "/status", &old, "")).await;
    assert_eq!(a.map(|a| a.status), Some(401));
    let renew = request(
        "POST",
        "/renew-lease",
        &new,
        &json!({"lockHandle": handle}).to_string(),
    );
    let a = call(&addr, &renew).await;
    assert_eq!(
        (a.status, a.json()["err"].as_str()),
        (200, Some("")),
        "{}",
        a.json()
    );
}

const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// `lockgate serve ARGS` with its wall clock an hour behind.
fn serve_an_hour_behind(args: &[&str]) -> (Proc, String) {
    let mut p = Proc::spawn(
        Command::new(rust_cli())
            .args(["serve", "--listen", "127.0.0.1:0", "--grace", "0"])
            .args(args)
            .env("LD_PRELOAD", FAKETIME_LIB)
            .env("FAKETIME", "-3600")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    );
    let line = p.line("serving on ", Duration::from_secs(20));
    (p, line.trim_start_matches("serving on ").to_owned())
}

async fn token_of(addr: &str, name: &str) -> u64 {
    let a = call(addr, &acquire_req(name, json!({}), &[])).await;
    a.json()["fencingToken"].as_u64().expect("a fencing token")
}

/// Item 9: the memory store's fencing tokens start at the wall clock, so a restart on a host
/// whose clock is behind went below the tokens granted before. With `--fencing-state` they
/// continue above them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_stay_above_those_granted_before_a_restart_with_the_clock_set_back() {
    time_limit(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("fencing");
    let state = state.to_str().unwrap();
    let (mut first, addr) = serve(&["--fencing-state", state]);
    let before = token_of(&addr, "fenced").await;
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait(Duration::from_secs(15)), 0);
    // Without the state the clock decides (this is what the flag is for).
    let (_plain, addr) = serve_an_hour_behind(&[]);
    assert!(token_of(&addr, "fenced").await < before);
    let (_restarted, addr) = serve_an_hour_behind(&["--fencing-state", state]);
    let after = token_of(&addr, "fenced").await;
    assert!(after > before, "{after} <= {before}");
}
