//! lockgate's HTTP client (`HttpLocker`, `lockgate exec --locker http://…`) against
//! `lockgate serve` and against Go lockgate's server (`lockgate-go serve`, v0.2.0 and v0.1.1),
//! next to Go lockgate's own `HttpLocker` clients.
//!
//! Every child is killed when its handle drops (also on a failed assertion), and every wait has
//! a deadline.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lockgate::{AcquireError, AcquireOptions, Error, HttpConfig, HttpLocker, Locker, LostReason};
use lockgate_testenv::process::{serve, serve_on, Proc};
use lockgate_testenv::{go_peer, go_peer_v01, rust_cli};

/// A lock server under test.
#[derive(Debug, Clone, Copy)]
enum Server {
    Rust,
    GoV02,
    GoV01,
}

const SERVERS: [Server; 3] = [Server::Rust, Server::GoV02, Server::GoV01];

impl Server {
    fn start(self) -> (Proc, String) {
        match self {
            Server::Rust => serve(&rust_cli(), &["--grace", "0"]),
            Server::GoV02 => serve(&go_peer(), &[]),
            Server::GoV01 => serve(&go_peer_v01(), &[]),
        }
    }

    /// The Go client peer to pair with it (the same version for a Go server).
    fn go_client(self) -> PathBuf {
        match self {
            Server::GoV01 => go_peer_v01(),
            _ => go_peer(),
        }
    }
}

fn url(addr: &str) -> String {
    format!("http://{addr}")
}

/// `PROGRAM exec --locker URL ARGS... NAME -- sh -c 'echo locked; read'`: holds the lock until
/// [`Proc::finish`]; returns once it holds it.
fn hold(program: &Path, url: &str, args: &[&str], name: &str) -> Proc {
    let mut p = wait_for(program, url, args, name);
    p.line("locked", Duration::from_secs(15));
    p
}

/// As [`hold`], returning at once (the child prints `locked` when it has the lock).
fn wait_for(program: &Path, url: &str, args: &[&str], name: &str) -> Proc {
    Proc::spawn(
        Command::new(program)
            .args(["exec", "--locker", url])
            .args(args)
            .args([name, "--", "sh", "-c", "echo locked; read _ || true"]),
    )
}

/// `PROGRAM exec --locker URL -n ARGS... NAME -- true`: 0 acquired, 1 busy.
fn try_lock(program: &Path, url: &str, args: &[&str], name: &str) -> i32 {
    let mut p = Proc::spawn(
        Command::new(program)
            .args(["exec", "--locker", url, "-q", "-n"])
            .args(args)
            .args([name, "--", "true"]),
    );
    p.wait(Duration::from_secs(15))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `f` on a runtime, failing the test after `limit`.
fn within<F: std::future::Future>(limit: Duration, f: F) -> F::Output {
    runtime().block_on(async {
        tokio::time::timeout(limit, f)
            .await
            .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
    })
}

#[test]
fn rust_and_go_clients_exclude_each_other_on_every_server() {
    for server in SERVERS {
        eprintln!("server {server:?}");
        let (_srv, addr) = server.start();
        let u = url(&addr);
        let (rust, go) = (rust_cli(), server.go_client());
        let r = hold(&rust, &u, &[], "ex");
        assert_eq!(try_lock(&go, &u, &[], "ex"), 1);
        assert_eq!(try_lock(&go, &u, &["-s"], "ex"), 1);
        assert_eq!(try_lock(&rust, &u, &[], "ex"), 1);
        assert_eq!(r.finish(Duration::from_secs(10)), 0);
        let g = hold(&go, &u, &[], "ex");
        assert_eq!(try_lock(&rust, &u, &[], "ex"), 1);
        assert_eq!(try_lock(&rust, &u, &["-s"], "ex"), 1);
        assert_eq!(g.finish(Duration::from_secs(10)), 0);
        assert_eq!(try_lock(&rust, &u, &[], "ex"), 0, "released by Go");
    }
}

#[test]
fn rust_and_go_shared_holders_mix_and_keep_writers_out() {
    for server in SERVERS {
        eprintln!("server {server:?}");
        let (_srv, addr) = server.start();
        let u = url(&addr);
        let (rust, go) = (rust_cli(), server.go_client());
        let r = hold(&rust, &u, &["-s"], "sh");
        let g = hold(&go, &u, &["-s"], "sh");
        let r2 = hold(&rust, &u, &["-s"], "sh");
        assert_eq!(try_lock(&rust, &u, &[], "sh"), 1);
        assert_eq!(try_lock(&go, &u, &[], "sh"), 1);
        // One shared holder leaving keeps the others' lease.
        assert_eq!(r.finish(Duration::from_secs(10)), 0);
        assert_eq!(try_lock(&go, &u, &[], "sh"), 1);
        assert_eq!(g.finish(Duration::from_secs(10)), 0);
        assert_eq!(try_lock(&rust, &u, &[], "sh"), 1);
        assert_eq!(r2.finish(Duration::from_secs(10)), 0);
        assert_eq!(try_lock(&go, &u, &[], "sh"), 0);
    }
}

/// The time from the holder's exit to the waiter's `locked`, once the waiter is known to wait.
fn handoff(server: Server, waiter_program: &Path) -> Duration {
    let (_srv, addr) = server.start();
    let u = url(&addr);
    let holder = hold(&rust_cli(), &u, &[], "handoff");
    let mut waiter = wait_for(waiter_program, &u, &[], "handoff");
    // The on-wait line: the waiter asked and was refused (Go's client prints none; its first
    // poll is proven by the server's metrics in http_server.rs, so give it its first answer).
    if waiter_program == rust_cli() {
        waiter.line(
            "lockgate: waiting for exclusive lock",
            Duration::from_secs(10),
        );
    } else {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!waiter.has_line("locked"));
    let released = Instant::now();
    assert_eq!(holder.finish(Duration::from_secs(10)), 0);
    waiter.line("locked", Duration::from_secs(10));
    let took = released.elapsed();
    assert_eq!(waiter.finish(Duration::from_secs(10)), 0);
    took
}

#[test]
fn a_waiting_rust_client_long_polls_lockgate_serve_and_polls_go_servers() {
    let rust = rust_cli();
    // lockgate serve: granted within the release (the holder's exit includes its release).
    let fast = handoff(Server::Rust, &rust);
    eprintln!("rust client, rust server: {fast:?}");
    assert!(fast < Duration::from_millis(1000), "{fast:?}");
    // Go's server: the client polls every 2 s, as Go's client does.
    for server in [Server::GoV02, Server::GoV01] {
        let slow = handoff(server, &rust);
        eprintln!("rust client, {server:?} server: {slow:?}");
        assert!(slow < Duration::from_millis(3500), "{slow:?}");
    }
}

#[test]
fn non_blocking_and_timed_acquisitions_give_up_on_every_server() {
    for server in SERVERS {
        eprintln!("server {server:?}");
        let (_srv, addr) = server.start();
        let u = url(&addr);
        let rust = rust_cli();
        let holder = hold(&rust, &u, &[], "busy");
        let start = Instant::now();
        assert_eq!(try_lock(&rust, &u, &[], "busy"), 1);
        assert!(start.elapsed() < Duration::from_secs(3));
        let start = Instant::now();
        let mut timed = Proc::spawn(Command::new(&rust).args([
            "exec", "--locker", &u, "-w", "1.5", "-E", "7", "busy", "--", "true",
        ]));
        timed.line(
            "lockgate: waiting for exclusive lock",
            Duration::from_secs(5),
        );
        assert_eq!(timed.wait(Duration::from_secs(10)), 7);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(holder.finish(Duration::from_secs(10)), 0);
        assert_eq!(try_lock(&rust, &u, &[], "busy"), 0, "nothing left held");
    }
}

async fn locker(addr: &str, config: HttpConfig) -> Locker {
    Locker::new(HttpLocker::connect(&url(addr), config).await.unwrap())
}

/// Waits until `pred` holds for the server's `/status` of the only lock.
async fn until_status(
    status: &HttpLocker,
    pred: impl Fn(Option<&lockgate::http::protocol::LockStatus>) -> bool,
) {
    loop {
        let s = status.status().await.unwrap();
        if pred(s.locks.first()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn a_cancelled_acquisition_leaves_nothing_held() {
    let (_srv, addr) = Server::Rust.start();
    within(Duration::from_secs(60), async {
        let l = locker(&addr, HttpConfig::default()).await;
        let status = HttpLocker::connect(&url(&addr), HttpConfig::default())
            .await
            .unwrap();
        let held = l.acquire("c", AcquireOptions::exclusive()).await.unwrap();
        let first = held
            .fencing_token()
            .expect("lockgate serve sends fencing tokens");
        let long_poll_open = |s: Option<&lockgate::http::protocol::LockStatus>| {
            s.is_some_and(|l| l.waiters.first().is_some_and(|w| w.long_poll))
        };

        // Cancelled while waiting: its place in the queue goes with it.
        let mut waiting = Box::pin(l.acquire("c", AcquireOptions::exclusive()));
        tokio::select! {
            r = &mut waiting => panic!("acquired a held lock: {r:?}"),
            () = until_status(&status, long_poll_open) => {}
        }
        drop(waiting);
        until_status(&status, |s| s.is_some_and(|l| l.waiters.is_empty())).await;

        // Cancelled with its grant on the way: the grant is released, nobody holds the lock.
        let mut waiting = Box::pin(l.acquire("c", AcquireOptions::exclusive()));
        tokio::select! {
            r = &mut waiting => panic!("acquired a held lock: {r:?}"),
            () = until_status(&status, long_poll_open) => {}
        }
        held.release().await.unwrap();
        // Granted on the server (within the release), not yet seen by the acquisition.
        until_status(&status, |s| s.is_some_and(|l| l.holders.len() == 1)).await;
        drop(waiting);
        until_status(&status, |s| s.is_none()).await;
        let again = l
            .acquire("c", AcquireOptions::exclusive().non_blocking())
            .await
            .unwrap();
        assert!(
            again.fencing_token().unwrap() > first + 1,
            "the abandoned grant came between"
        );
        again.release().await.unwrap();
    });
}

#[test]
fn leases_are_lost_when_the_server_dies_or_forgets_them() {
    let rust = rust_cli();
    let (mut srv, addr) = Server::Rust.start();
    let u = url(&addr);
    // `exec` on a lost lease: SIGTERM to the command, exit 75.
    let mut exec = Proc::spawn(Command::new(&rust).args([
        "exec",
        "--locker",
        &u,
        "killed",
        "--",
        "sh",
        "-c",
        "echo locked; sleep 60",
    ]));
    exec.line("locked", Duration::from_secs(10));
    let rt = runtime();
    let (guard, mut lost) = rt.block_on(async {
        let l = locker(&addr, HttpConfig::default()).await;
        let g = l.acquire("lib", AcquireOptions::exclusive()).await.unwrap();
        let lost = g.lost_signal();
        (g, lost)
    });
    // Renewed at least once (every ttl/3), then the server dies.
    std::thread::sleep(Duration::from_millis(3600));
    srv.signal(libc::SIGKILL);
    srv.wait(Duration::from_secs(5));
    let killed = Instant::now();
    let reason = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(15), lost.lost())
            .await
            .expect("lost within the renewal deadline")
    });
    let took = killed.elapsed();
    assert_eq!(reason, LostReason::RenewalFailed);
    // The deadline is 8 s after the last confirmed renewal was sent, which was before the kill.
    assert!(
        took <= Duration::from_secs(8),
        "lost {took:?} after the kill"
    );
    assert!(guard.is_lost());
    assert!(matches!(
        rt.block_on(guard.release()),
        Err(Error::LeaseLost { .. })
    ));
    assert_eq!(exec.wait(Duration::from_secs(15)), 75);

    // A server restarted on the same address no longer knows the lease: lost at the next
    // renewal, with the server's word for it.
    let (srv, addr) = serve(&rust, &["--grace", "0"]);
    rt.block_on(async {
        let l = locker(&addr, HttpConfig::default()).await;
        let g = l
            .acquire("restart", AcquireOptions::exclusive())
            .await
            .unwrap();
        let mut lost = g.lost_signal();
        drop(srv); // SIGKILL
        let (_again, same) = serve_on(&rust, &addr, &["--grace", "0"]);
        assert_eq!(same, addr);
        let reason = tokio::time::timeout(Duration::from_secs(10), lost.lost())
            .await
            .expect("lost at the next renewal");
        assert_eq!(reason, LostReason::Gone);
    });
}

#[test]
fn the_token_is_sent_and_a_missing_or_wrong_one_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken-s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_srv, addr) = serve(
        &rust_cli(),
        &["--grace", "0", "--token-file", token.to_str().unwrap()],
    );
    within(Duration::from_secs(30), async {
        for config in [HttpConfig::default(), HttpConfig::default().token("wrong")] {
            let e = locker(&addr, config)
                .await
                .acquire("t", AcquireOptions::exclusive())
                .await
                .unwrap_err();
            assert!(
                matches!(e, AcquireError::Failed(Error::Unauthorized { .. })),
                "{e:?}"
            );
            assert!(!e.to_string().contains("t0ken"), "{e}");
        }
        let g = locker(&addr, HttpConfig::default().token("t0ken-s3cret"))
            .await
            .acquire("t", AcquireOptions::exclusive())
            .await
            .unwrap();
        g.release().await.unwrap();
        // Go's way: the token as the URL's password.
        let l = Locker::new(
            HttpLocker::connect(
                &format!("http://lockgate:t0ken-s3cret@{addr}"),
                HttpConfig::default(),
            )
            .await
            .unwrap(),
        );
        l.acquire("t", AcquireOptions::exclusive())
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    });
    let u = url(&addr);
    let run = |env: Option<&str>, args: &[&str]| {
        let mut c = Command::new(rust_cli());
        c.env_remove("LOCKGATE_TOKEN");
        if let Some(t) = env {
            c.env("LOCKGATE_TOKEN", t);
        }
        let mut p = Proc::spawn(
            c.args(args)
                .args(["exec", "--locker", &u, "-n", "t2", "--", "true"]),
        );
        p.wait(Duration::from_secs(10))
    };
    assert_eq!(run(None, &[]), 69);
    assert_eq!(run(Some("wrong"), &[]), 69);
    assert_eq!(run(Some("t0ken-s3cret"), &[]), 0);
    assert_eq!(run(None, &["--token-file", token.to_str().unwrap()]), 0);
}

#[test]
fn https_with_a_private_ca_and_status_as_a_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(made.status.success(), "{made:?}");
    let (_srv, addr) = serve(
        &rust_cli(),
        &[
            "--grace",
            "0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let u = format!("https://{addr}");
    let rust = rust_cli();
    // Without the CA the server's certificate is not trusted.
    assert_eq!(try_lock(&rust, &u, &[], "tls"), 69);
    let ca = cert.to_str().unwrap();
    let holder = hold(&rust, &u, &["--ca-file", ca, "-s"], "tls \"quoted\"");
    let out = Command::new(&rust)
        .args(["--locker", &u, "--ca-file", ca, "status"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        table.starts_with(&format!("locks on the lock server {u}\nMODE ")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("shared ") && l.ends_with(r#""tls \"quoted\"""#)),
        "{table}"
    );
    let out = Command::new(&rust)
        .env("LOCKGATE_CA_FILE", ca)
        .args(["--locker", &u, "status", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema"], 1);
    assert_eq!(v["backend"], "http");
    assert_eq!(v["locks"][0]["name"], "tls \"quoted\"");
    assert_eq!(v["locks"][0]["holders"][0]["mode"], "shared");
    assert_eq!(holder.finish(Duration::from_secs(10)), 0);
    // Go's server has no /status: a clear error, exit 69.
    let (_go, go_addr) = Server::GoV02.start();
    let out = Command::new(&rust)
        .args(["--locker", &url(&go_addr), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
}
