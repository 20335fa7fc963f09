//! `lockgate serve --store kubernetes://…`: lock servers over one object's annotation records,
//! shared with Kubernetes lockers (Rust and Go) on the same object.
//!
//! Every child is killed when its handle drops (also on a failed assertion), and every wait has
//! a deadline.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockgate::{AcquireOptions, HttpConfig, HttpLocker, Locker};
use lockgate_testenv::process::{serve, serve_on, Proc};
use lockgate_testenv::{go_peer, go_peer_v01, is_go_v02_race, required_env, rust_cli};
use serde_json::{json, Value};

fn rust_loop() -> PathBuf {
    rust_cli().with_file_name("lockgate-loop")
}

/// A fresh ConfigMap, as a `kubernetes://` URL.
fn object() -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cm = rt.block_on(lockgate_testenv::configmap("default"));
    format!("kubernetes://default/configmaps/{cm}")
}

/// `lockgate serve --store OBJECT` on a free port.
fn kube_server(store: &str) -> (Proc, String) {
    serve(&rust_cli(), &["--store", store])
}

fn url(addr: &str) -> String {
    format!("http://{addr}")
}

/// One HTTP/1.1 request on its own connection: the status and the JSON body.
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

fn post(addr: &str, path: &str, body: Value) -> Value {
    let (status, v) = http(addr, "POST", path, Some(&body));
    assert_eq!(status, 200, "{v}");
    v
}

/// `PROGRAM exec --locker LOCKER -n ARGS... NAME -- true`: 0 acquired, 1 busy.
fn try_lock(program: &Path, locker: &str, args: &[&str], name: &str) -> i32 {
    let mut p = Proc::spawn(
        Command::new(program)
            .args(["exec", "--locker", locker, "-q", "-n"])
            .args(args)
            .args([name, "--", "true"])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG")),
    );
    p.wait(Duration::from_secs(20))
}

/// `PROGRAM exec --locker LOCKER ARGS... NAME`, holding the lock until [`Proc::finish`].
fn hold(program: &Path, locker: &str, args: &[&str], name: &str) -> Proc {
    let mut p = Proc::spawn(
        Command::new(program)
            .args(["exec", "--locker", locker])
            .args(args)
            .args([name, "--", "sh", "-c", "echo locked; read _ || true"])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG")),
    );
    p.line("locked", Duration::from_secs(30));
    p
}

/// Two servers on one ConfigMap with Rust HTTP clients on both, Go's HTTP client on one, a Rust
/// Kubernetes locker and a Go Kubernetes locker, all on one lock: a counter under the lock loses
/// no update and no two holders overlap.
#[test]
fn servers_and_kubernetes_lockers_on_one_object_lose_no_update() {
    let store = object();
    let (_a, a) = kube_server(&store);
    let (_b, b) = kube_server(&store);
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter");
    let workers: Vec<(PathBuf, String, Vec<&str>, u64)> = vec![
        (rust_loop(), url(&a), vec![], 8),
        (rust_loop(), url(&b), vec![], 8),
        (go_peer(), url(&a), vec!["loop", "--acquirer-id", "auto"], 4),
        (rust_loop(), store.clone(), vec![], 8),
        (go_peer(), store.clone(), vec!["loop"], 4),
    ];
    let start = Instant::now();
    let mut fleet: Vec<(String, Proc)> = workers
        .iter()
        .map(|(program, locker, args, cycles)| {
            let label = format!("{} {locker}", program.display());
            let p = Proc::spawn(
                Command::new(program)
                    .args(args)
                    .args(["--locker", locker, "--cycles", &cycles.to_string()])
                    .args(["--hold-ms", "20", "--counter"])
                    .arg(&counter)
                    .arg("fleet")
                    .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
                    .stdin(Stdio::null()),
            );
            (label, p)
        })
        .collect();
    let mut increments = 0;
    for ((label, p), (program, locker, _, _)) in fleet.iter_mut().zip(&workers) {
        let report = p.line("{", Duration::from_secs(240));
        let report: Value = serde_json::from_str(&report).unwrap();
        eprintln!("{label}: {report}");
        assert_eq!(report["overlaps"], 0, "{label}: {report}");
        // The Go Kubernetes locker's own re-read race (a take-over between its two reads: a
        // retried error, never an overlap) is allowed (the report above shows it); any other
        // error fails.
        // The Go peer exits 1 when its report has any error, so the exit status is checked
        // only where the report shows none of those races.
        let go_on_store = program == &go_peer() && locker == &store;
        let (races, errors): (Vec<&str>, Vec<&str>) = report["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .partition(|e| go_on_store && is_go_v02_race(e));
        assert!(errors.is_empty(), "{label}: {report}");
        let code = p.wait(Duration::from_secs(10));
        assert!(
            code == 0 || (code == 1 && !races.is_empty()),
            "{label}: exit {code}: {report}"
        );
        increments += report["increments"].as_u64().unwrap();
    }
    let n: u64 = std::fs::read_to_string(&counter)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(n, increments, "lost updates");
    assert_eq!(n, workers.iter().map(|w| w.3).sum::<u64>());
    eprintln!("{n} increments in {:?}", start.elapsed());
}

/// Leases live in the object: another server renews and releases a handle granted by the first,
/// and a server SIGKILLed and restarted serves its clients' leases on; nothing is lost.
#[test]
fn a_second_or_restarted_server_serves_the_held_leases_on() {
    let store = object();
    let (a, a_addr) = kube_server(&store);
    let (_b, b_addr) = kube_server(&store);

    // Granted by A, renewed and released through B.
    let v = post(&a_addr, "/acquire", json!({"lockName": "moved"}));
    assert_eq!(v["err"], "", "{v}");
    assert!(v["fencingToken"].as_u64().unwrap() > 0, "{v}");
    let handle = v["lockHandle"].clone();
    assert_eq!(try_lock(&rust_cli(), &store, &[], "moved"), 1);
    drop(a); // SIGKILL
    let v = post(&b_addr, "/renew-lease", json!({"lockHandle": handle}));
    assert_eq!(v["err"], "", "{v}");
    assert_eq!(
        post(&b_addr, "/acquire", json!({"lockName": "moved"}))["err"],
        "should wait"
    );
    let v = post(&b_addr, "/release", json!({"lockHandle": handle}));
    assert_eq!(v["err"], "", "{v}");
    let v = post(&b_addr, "/renew-lease", json!({"lockHandle": handle}));
    assert_eq!(v["err"], "no existing lock lease found", "{v}");
    assert_eq!(try_lock(&rust_cli(), &store, &[], "moved"), 0);

    // A client of a server that is SIGKILLed and restarted on the same address keeps its
    // lease, renewed through the new instance, for well over a TTL.
    let (c, c_addr) = kube_server(&store);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let guard = rt.block_on(async {
        let l = Locker::new(
            HttpLocker::connect(&url(&c_addr), HttpConfig::default())
                .await
                .unwrap(),
        );
        l.acquire("restart", AcquireOptions::exclusive())
            .await
            .unwrap()
    });
    drop(c);
    let (_c2, same) = serve_on(&rust_cli(), &c_addr, &["--store", &store]);
    assert_eq!(same, c_addr);
    let since = Instant::now();
    // Renewals every ttl/3; a TTL without them would let others take it over.
    while since.elapsed() < Duration::from_secs(13) {
        assert!(!guard.is_lost(), "lost after {:?}", since.elapsed());
        assert_eq!(try_lock(&rust_cli(), &store, &[], "restart"), 1);
        assert_eq!(try_lock(&go_peer(), &store, &[], "restart"), 1);
        std::thread::sleep(Duration::from_millis(1500));
    }
    rt.block_on(guard.release()).unwrap();
    assert_eq!(try_lock(&rust_cli(), &store, &[], "restart"), 0);
}

/// Go's `HttpLocker` (v0.2.0 and v0.1.1) against the Kubernetes-backed server: exclusion with
/// Kubernetes lockers, shared holders sharing the record, and a v0.2 poller keeping its place in
/// the record's queue across its polls, ahead of a later long poll.
#[test]
fn go_http_clients_work_against_the_kubernetes_backed_server() {
    let store = object();
    let (_srv, addr) = kube_server(&store);
    let u = url(&addr);
    for go in [go_peer(), go_peer_v01()] {
        let g = hold(&go, &u, &[], "go");
        assert_eq!(try_lock(&rust_cli(), &store, &[], "go"), 1);
        assert_eq!(try_lock(&go_peer(), &store, &[], "go"), 1);
        assert_eq!(try_lock(&rust_cli(), &u, &["-s"], "go"), 1);
        assert_eq!(g.finish(Duration::from_secs(10)), 0);
        let s1 = hold(&go, &u, &["-s"], "go");
        let s2 = hold(&rust_cli(), &u, &["-s"], "go");
        assert_eq!(try_lock(&go, &u, &[], "go"), 1);
        assert_eq!(try_lock(&rust_cli(), &store, &[], "go"), 1);
        assert_eq!(s1.finish(Duration::from_secs(10)), 0);
        assert_eq!(
            try_lock(&rust_cli(), &store, &[], "go"),
            1,
            "one holder left"
        );
        assert_eq!(s2.finish(Duration::from_secs(10)), 0);
        assert_eq!(try_lock(&rust_cli(), &store, &[], "go"), 0);
    }

    // FIFO across polls: the Go poller (every 2 s) queued first keeps its place in the record.
    let holder = hold(&rust_cli(), &store, &[], "fifo");
    let mut go = Proc::spawn(
        Command::new(go_peer())
            .args([
                "exec",
                "--locker",
                &u,
                "-q",
                "--acquirer-id",
                "go-first",
                "fifo",
            ])
            .args(["--", "sh", "-c", "echo locked; read _ || true"]),
    );
    let waiters = |addr: &str| {
        let (_, v) = http(addr, "GET", "/status?name=fifo", None);
        v["locks"][0]["waiters"].clone()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while waiters(&addr)[0].is_null() {
        assert!(Instant::now() < deadline, "the Go poller never queued");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its entry in the record, under a queue id derived from its acquirer id (the id itself
    // is shown only with the token: the entry is told by its age).
    let a2 = addr.clone();
    let long_poll = std::thread::spawn(move || {
        let v = post(
            &a2,
            "/acquire",
            json!({"lockName": "fifo", "opts": {"waitMs": 25_000}}),
        );
        (Instant::now(), v)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while waiters(&addr).as_array().map_or(0, Vec::len) < 2 {
        assert!(Instant::now() < deadline, "the long poll never queued");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Several of the Go poller's polls pass: its place stays first, and as old as it was.
    std::thread::sleep(Duration::from_secs(5));
    let w = waiters(&addr);
    assert!(w[0]["waitingMs"].as_u64() >= Some(5000), "{w}");
    assert_eq!(holder.finish(Duration::from_secs(10)), 0);
    go.line("locked", Duration::from_secs(10));
    assert!(!long_poll.is_finished(), "the later long poll went first");
    let released = Instant::now();
    assert_eq!(go.finish(Duration::from_secs(10)), 0);
    let (granted, v) = long_poll.join().unwrap();
    assert_eq!(v["err"], "", "{v}");
    assert!(granted - released < Duration::from_secs(5));
    let v = post(&addr, "/release", json!({"lockHandle": v["lockHandle"]}));
    assert_eq!(v["err"], "", "{v}");
}
