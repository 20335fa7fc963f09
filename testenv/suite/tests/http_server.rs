//! Go lockgate's `HttpLocker` clients (the `lockgate-go` peers: v0.2.0, `LOCKGATE_TEST_GO_PEER`,
//! and v0.1.1, `LOCKGATE_TEST_GO_PEER_V01`; every test runs against both) against
//! `lockgate serve`, next to lockgate's own long-poll protocol spoken over raw HTTP.
//!
//! Every child is killed when its handle drops (also on a failed assertion), and every wait has
//! a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lockgate_testenv::{go_peer, go_peer_v01, rust_cli};
use serde_json::{json, Value};

/// A child process, killed when dropped.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The first stdout line starting with `prefix`, within `limit`.
    fn line(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line {prefix:?} within {limit:?}: {e}"),
            }
        }
    }

    fn has_line(&mut self, prefix: &str) -> bool {
        self.lines.try_iter().any(|l| l.starts_with(prefix))
    }

    /// Closes stdin (a holder's `read` ends) and waits for the exit code.
    fn finish(mut self, limit: Duration) -> i32 {
        drop(self.child.stdin.take());
        self.wait(limit)
    }

    fn wait(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "child still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `lockgate serve` on a free port, with no start-up grace; returns it and its address.
fn serve(extra: &[&str]) -> (Proc, String) {
    let mut p = Proc::spawn(
        Command::new(rust_cli())
            .args(["serve", "--listen", "127.0.0.1:0", "--grace", "0"])
            .args(extra),
    );
    let line = p.line("serving on ", Duration::from_secs(10));
    let addr = line.trim_start_matches("serving on ").to_owned();
    (p, addr)
}

/// The Go peers: v0.2.0 (what werf v2 requires), then v0.1.1.
fn peers() -> [(PathBuf, &'static str); 2] {
    [(go_peer(), "v0.2.0"), (go_peer_v01(), "v0.1.1")]
}

/// A Go `HttpLocker` holding NAME until [`Proc::finish`].
fn go_hold(peer: &Path, url: &str, args: &[&str], name: &str) -> Proc {
    let mut p = go_wait(peer, url, args, name);
    p.line("locked", Duration::from_secs(10));
    p
}

/// A Go `HttpLocker` acquiring NAME (blocking); prints `locked` once it holds it.
fn go_wait(peer: &Path, url: &str, args: &[&str], name: &str) -> Proc {
    Proc::spawn(
        Command::new(peer)
            .args(["exec", "--locker", url, "-q"])
            .args(args)
            .args([name, "--", "sh", "-c", "echo locked; read _ || true"]),
    )
}

/// `lockgate-go exec -n`: 0 acquired, 1 busy.
fn go_try(peer: &Path, url: &str, args: &[&str], name: &str) -> i32 {
    let mut p = Proc::spawn(
        Command::new(peer)
            .args(["exec", "--locker", url, "-q", "-n"])
            .args(args)
            .args([name, "--", "true"]),
    );
    p.wait(Duration::from_secs(10))
}

/// One HTTP/1.1 request on its own connection; the status and the JSON body.
fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read the answer");
    let (head, body) = buf.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).expect("a JSON body"))
}

fn acquire(addr: &str, name: &str, opts: Value) -> Value {
    let (status, v) = http(
        addr,
        "POST",
        "/acquire",
        Some(&json!({"lockName": name, "opts": opts})),
    );
    assert_eq!(status, 200, "{v}");
    v
}

fn hold(addr: &str, name: &str) -> Value {
    let v = acquire(addr, name, json!({}));
    assert_eq!(v["err"], "", "{v}");
    v["lockHandle"].clone()
}

fn release(addr: &str, handle: &Value) {
    let (status, v) = http(
        addr,
        "POST",
        "/release",
        Some(&json!({"lockHandle": handle})),
    );
    assert_eq!((status, v["err"].as_str()), (200, Some("")), "{v}");
}

fn status(addr: &str, name: &str) -> Value {
    let (code, v) = http(addr, "GET", &format!("/status?name={name}"), None);
    assert_eq!(code, 200, "{v}");
    v["locks"].get(0).cloned().unwrap_or(Value::Null)
}

/// Polls `/status` until `pred` holds (an event the server reports, not a guess at timing).
fn until(addr: &str, name: &str, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(addr, name);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "status never matched: {s}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How many `/acquire` requests the server answered `should wait` (from `/metrics`).
fn should_waits(addr: &str) -> u64 {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the metrics");
    text.lines()
        .find(|l| {
            l.starts_with(r#"lockgate_http_requests_total{endpoint="acquire",status="200",code="should_wait"}"#)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Waits until the server has answered `should wait` more than `seen` times: a polling Go
/// client has asked (and been refused) since.
fn until_refused(addr: &str, seen: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let n = should_waits(addr);
        if n > seen {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "nobody was refused within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn holders(s: &Value) -> usize {
    s["holders"].as_array().map_or(0, Vec::len)
}

fn url(addr: &str) -> String {
    format!("http://{addr}")
}

#[test]
fn go_clients_exclude_each_other_through_the_rust_server() {
    for (peer, version) in peers() {
        eprintln!("Go peer {version}");
        go_clients_exclude_each_other_through_the_rust_server_with(&peer, version);
    }
}

fn go_clients_exclude_each_other_through_the_rust_server_with(peer: &Path, version: &str) {
    let _ = version;
    let (_srv, addr) = serve(&[]);
    let u = url(&addr);
    let holder = go_hold(peer, &u, &[], "ex");
    assert_eq!(go_try(peer, &u, &[], "ex"), 1);
    assert_eq!(go_try(peer, &u, &["-s"], "ex"), 1);
    // lockgate's protocol sees Go's lease, and Go sees lockgate's.
    assert_eq!(
        acquire(&addr, "ex", json!({"shared": true}))["err"],
        "should wait"
    );
    assert_eq!(holder.finish(Duration::from_secs(10)), 0);
    assert_eq!(go_try(peer, &u, &[], "ex"), 0);
    assert_eq!(status(&addr, "ex"), Value::Null, "nothing left behind");
    let h = hold(&addr, "ex");
    assert_eq!(go_try(peer, &u, &[], "ex"), 1);
    assert_eq!(go_try(peer, &u, &["-s"], "ex"), 1);
    release(&addr, &h);
    assert_eq!(go_try(peer, &u, &["-s"], "ex"), 0);
}

#[test]
fn go_shared_holders_get_leases_of_their_own_and_keep_writers_out() {
    for (peer, version) in peers() {
        eprintln!("Go peer {version}");
        go_shared_holders_get_leases_of_their_own_and_keep_writers_out_with(&peer, version);
    }
}

fn go_shared_holders_get_leases_of_their_own_and_keep_writers_out_with(peer: &Path, version: &str) {
    let _ = version;
    let (_srv, addr) = serve(&[]);
    let u = url(&addr);
    let a = go_hold(peer, &u, &["-s"], "sh");
    let b = go_hold(peer, &u, &["-s"], "sh");
    let s = status(&addr, "sh");
    assert_eq!(holders(&s), 2);
    assert_ne!(
        s["holders"][0]["fencingToken"],
        s["holders"][1]["fencingToken"]
    );
    assert_eq!(go_try(peer, &u, &[], "sh"), 1);
    assert_eq!(go_try(peer, &u, &["-s"], "sh"), 0);
    // One shared holder leaving keeps the other's lease (Go's own server shares one uuid).
    assert_eq!(a.finish(Duration::from_secs(10)), 0);
    assert_eq!(go_try(peer, &u, &[], "sh"), 1);
    assert_eq!(b.finish(Duration::from_secs(10)), 0);
    assert_eq!(go_try(peer, &u, &[], "sh"), 0);
}

#[test]
fn a_waiting_go_client_gets_the_lock_after_the_release() {
    for (peer, version) in peers() {
        eprintln!("Go peer {version}");
        a_waiting_go_client_gets_the_lock_after_the_release_with(&peer, version);
    }
}

fn a_waiting_go_client_gets_the_lock_after_the_release_with(peer: &Path, version: &str) {
    let _ = version;
    let (_srv, addr) = serve(&[]);
    let u = url(&addr);
    let holder = go_hold(peer, &u, &[], "handoff");
    let refused = should_waits(&addr);
    let mut waiter = go_wait(peer, &u, &[], "handoff");
    // Go polls without queueing: wait until it has asked and been refused.
    until_refused(&addr, refused, Duration::from_secs(10));
    assert!(!waiter.has_line("locked"));
    let released = Instant::now();
    assert_eq!(holder.finish(Duration::from_secs(10)), 0);
    waiter.line("locked", Duration::from_secs(5));
    // Go polls every 2 s.
    assert!(released.elapsed() < Duration::from_millis(2600));
    assert_eq!(waiter.finish(Duration::from_secs(10)), 0);
}

#[test]
fn a_killed_go_clients_lease_expires_one_ttl_after_its_last_renewal_and_not_before() {
    for (peer, version) in peers() {
        eprintln!("Go peer {version}");
        a_killed_go_clients_lease_expires_one_ttl_after_its_last_renewal_and_not_before_with(
            &peer, version,
        );
    }
}

fn a_killed_go_clients_lease_expires_one_ttl_after_its_last_renewal_and_not_before_with(
    peer: &Path,
    version: &str,
) {
    let _ = version;
    let (_srv, addr) = serve(&["--ttl", "5s"]);
    let u = url(&addr);
    let holder = go_hold(peer, &u, &[], "killed");
    // Until it has renewed once (Go renews every 3 s): held + left exceeds the TTL.
    until(&addr, "killed", Duration::from_secs(10), |s| {
        let h = &s["holders"][0];
        h["heldMs"].as_u64().unwrap_or(0) + h["expiresInMs"].as_u64().unwrap_or(0) > 6000
    });
    holder.signal(libc::SIGKILL);
    let mut holder = holder;
    holder.wait(Duration::from_secs(5));
    // The server reads its clock after `asked`: the lease ends no earlier than asked + left.
    let asked = Instant::now();
    let s = status(&addr, "killed");
    assert_eq!(holders(&s), 1, "{s}");
    let left = Duration::from_millis(s["holders"][0]["expiresInMs"].as_u64().unwrap());
    assert!(left > Duration::from_millis(1000), "renewed recently: {s}");
    let (code, v) = http(
        &addr,
        "POST",
        "/acquire",
        Some(&json!({"lockName": "killed", "opts": {"waitMs": 20_000}})),
    );
    let granted = asked.elapsed();
    assert_eq!((code, v["err"].as_str()), (200, Some("")), "{v}");
    assert!(
        granted >= left,
        "granted after {granted:?}, before the lease's {left:?} were up"
    );
    assert!(
        granted < left + Duration::from_millis(1000),
        "granted late: {granted:?} for {left:?}"
    );
}

#[test]
fn a_go_client_waits_behind_a_long_poll_client_in_order() {
    for (peer, version) in peers() {
        eprintln!("Go peer {version}");
        a_go_client_waits_behind_a_long_poll_client_in_order_with(&peer, version);
    }
}

fn a_go_client_waits_behind_a_long_poll_client_in_order_with(peer: &Path, version: &str) {
    let _ = version;
    let (_srv, addr) = serve(&[]);
    let u = url(&addr);
    let h = hold(&addr, "queue");
    let a2 = addr.clone();
    let long_poll = std::thread::spawn(move || {
        let v = acquire(
            &a2,
            "queue",
            json!({"waitMs": 20_000, "acquirerId": "long-poller"}),
        );
        (Instant::now(), v)
    });
    until(&addr, "queue", Duration::from_secs(10), |s| {
        s["waiters"][0]["longPoll"] == true
    });
    let refused = should_waits(&addr);
    let mut go = go_wait(peer, &u, &[], "queue");
    let refused = until_refused(&addr, refused, Duration::from_secs(10));
    let released = Instant::now();
    release(&addr, &h);
    let (granted, v) = long_poll.join().unwrap();
    assert_eq!(v["err"], "", "{v}");
    assert!(granted - released < Duration::from_millis(200));
    // The Go poller did not overtake it.
    assert!(!go.has_line("locked"));
    let s = status(&addr, "queue");
    assert_eq!(s["holders"][0]["fencingToken"], v["fencingToken"]);
    // Go polls again (every 2 s) while the long poller holds the lock, and is refused.
    until_refused(&addr, refused, Duration::from_secs(5));
    assert!(
        !go.has_line("locked"),
        "Go got the lock while the long poller held it"
    );
    release(&addr, &v["lockHandle"]);
    go.line("locked", Duration::from_secs(5));
    assert_eq!(go.finish(Duration::from_secs(10)), 0);
}

#[test]
fn go_and_long_poll_clients_lose_no_update_of_a_counter() {
    for (peer, version) in peers() {
        eprintln!("Go peer {version}");
        go_and_long_poll_clients_lose_no_update_of_a_counter_with(&peer, version);
    }
}

fn go_and_long_poll_clients_lose_no_update_of_a_counter_with(peer: &Path, version: &str) {
    let _ = version;
    let (_srv, addr) = serve(&[]);
    let u = url(&addr);
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("n");
    std::fs::write(&counter, "0").unwrap();
    const GO: usize = 3;
    const GO_CYCLES: usize = 2;
    const RUST: usize = 2;
    const RUST_CYCLES: usize = 5;
    let script = format!(
        "n=$(cat {0}); sleep 0.05; echo $((n+1)) > {0}",
        counter.display()
    );
    // v0.2.0's clients queue with an acquirer id of their own; v0.1.1's only poll.
    let id_args: &'static [&'static str] = if version == "v0.2.0" {
        &["--acquirer-id", "auto"]
    } else {
        &[]
    };
    let go: Vec<_> = (0..GO)
        .map(|_| {
            let u = u.clone();
            let script = script.clone();
            let peer = peer.to_owned();
            std::thread::spawn(move || {
                for _ in 0..GO_CYCLES {
                    let mut p = Proc::spawn(
                        Command::new(&peer)
                            .args(["exec", "--locker", &u, "-q"])
                            .args(id_args)
                            .args(["counter", "--", "sh", "-c"])
                            .arg(&script),
                    );
                    assert_eq!(p.wait(Duration::from_secs(60)), 0);
                }
            })
        })
        .collect();
    let rust: Vec<_> = (0..RUST)
        .map(|i| {
            let addr = addr.clone();
            let counter = counter.clone();
            std::thread::spawn(move || {
                for _ in 0..RUST_CYCLES {
                    let v = loop {
                        let v = acquire(
                            &addr,
                            "counter",
                            json!({"waitMs": 20_000, "acquirerId": format!("rust-{i}")}),
                        );
                        if v["err"] == "" {
                            break v;
                        }
                    };
                    let n: u64 = std::fs::read_to_string(&counter)
                        .unwrap()
                        .trim()
                        .parse()
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                    std::fs::write(&counter, (n + 1).to_string()).unwrap();
                    release(&addr, &v["lockHandle"]);
                }
            })
        })
        .collect();
    for t in go.into_iter().chain(rust) {
        t.join().unwrap();
    }
    let n: usize = std::fs::read_to_string(&counter)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(n, GO * GO_CYCLES + RUST * RUST_CYCLES);
}

#[test]
fn go_clients_authenticate_with_the_token_in_the_url() {
    for (peer, version) in peers() {
        eprintln!("Go peer {version}");
        go_clients_authenticate_with_the_token_in_the_url_with(&peer, version);
    }
}

fn go_clients_authenticate_with_the_token_in_the_url_with(peer: &Path, version: &str) {
    let _ = version;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken-s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_srv, addr) = serve(&["--token-file", token.to_str().unwrap()]);
    assert_eq!(
        go_try(
            peer,
            &format!("http://lockgate:t0ken-s3cret@{addr}"),
            &[],
            "auth"
        ),
        0
    );
    // Without it the Go client fails (exit 69: it got a 401), it is not "busy".
    assert_eq!(go_try(peer, &url(&addr), &[], "auth"), 69);
    assert_eq!(
        go_try(peer, &format!("http://lockgate:wrong@{addr}"), &[], "auth"),
        69
    );
}

#[test]
fn sigterm_answers_open_requests_and_exits() {
    for (peer, version) in peers() {
        eprintln!("Go peer {version}");
        sigterm_answers_open_requests_and_exits_with(&peer, version);
    }
}

fn sigterm_answers_open_requests_and_exits_with(peer: &Path, version: &str) {
    let _ = version;
    let (mut srv, addr) = serve(&[]);
    let u = url(&addr);
    let _go = go_hold(peer, &u, &[], "term");
    let a2 = addr.clone();
    let long_poll = std::thread::spawn(move || {
        http(
            &a2,
            "POST",
            "/acquire",
            Some(&json!({"lockName": "term", "opts": {"waitMs": 30_000}})),
        )
    });
    until(&addr, "term", Duration::from_secs(10), |s| {
        s["waiters"][0]["longPoll"] == true
    });
    let start = Instant::now();
    srv.signal(libc::SIGTERM);
    let (code, v) = long_poll.join().unwrap();
    assert_eq!(
        (code, v["code"].as_str()),
        (503, Some("shutting_down")),
        "{v}"
    );
    assert_eq!(srv.wait(Duration::from_secs(12)), 0);
    // The Go holder's idle keep-alive connection does not hold the shutdown up.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(TcpStream::connect(&addr).is_err());
}

/// Go v0.2.0's `AcquirerId`: a polling Go client keeps its place in the queue, ahead of a long
/// poll that came later, and the lock is kept for it until its next poll.
#[test]
fn a_go_v02_poller_with_an_acquirer_id_keeps_its_place_ahead_of_later_long_polls() {
    let peer = go_peer();
    let (_srv, addr) = serve(&[]);
    let u = url(&addr);
    let h = hold(&addr, "place");
    let mut go = go_wait(&peer, &u, &["--acquirer-id", "go-first"], "place");
    // Its place (acquirer ids are shown only with the token: a poller's place is the one that
    // is not a long poll).
    until(&addr, "place", Duration::from_secs(10), |s| {
        s["waiters"][0]["longPoll"] == false
    });
    let a2 = addr.clone();
    let long_poll = std::thread::spawn(move || {
        let v = acquire(&a2, "place", json!({"waitMs": 20_000}));
        (Instant::now(), v)
    });
    until(&addr, "place", Duration::from_secs(10), |s| {
        s["waiters"][1]["longPoll"] == true
    });
    release(&addr, &h);
    // The lock is kept for the Go poller (free until its next poll, or already its): the long
    // poll behind it still waits.
    let s = status(&addr, "place");
    assert_eq!(
        s["waiters"].as_array().map(Vec::len),
        Some(if holders(&s) == 0 { 2 } else { 1 }),
        "{s}"
    );
    assert_eq!(
        s["waiters"].as_array().unwrap().last().unwrap()["longPoll"],
        true,
        "{s}"
    );
    go.line("locked", Duration::from_secs(5));
    let s = status(&addr, "place");
    assert_eq!(holders(&s), 1, "{s}");
    assert_eq!(s["waiters"][0]["longPoll"], true, "{s}");
    assert!(!long_poll.is_finished());
    let released = Instant::now();
    assert_eq!(go.finish(Duration::from_secs(10)), 0);
    let (granted, v) = long_poll.join().unwrap();
    assert_eq!(v["err"], "", "{v}");
    // Go's release request, then the long poll's answer.
    assert!(granted - released < Duration::from_secs(2));
}
