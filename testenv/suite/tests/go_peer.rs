//! The real Go lockgate, driven through `lockgate-go`: v0.2.0 (what werf v2 requires) by
//! default, v0.1.1 (older werf and nelm) where named. It takes and releases file, Kubernetes and
//! HTTP locks, and Rust and Go processes exclude each other on the same lock files. The last
//! tests check the peer's own commands (version, loop, gc, serve --store, --acquirer-id).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use lockgate_testenv::{
    client, configmap as new_configmap, expect_line, go_peer, go_peer_v01, hold, release, rust_cli,
    try_lock, Proc,
};
use sha3::Digest;

fn go_hold(locker: &str, args: &[&str], name: &str) -> Proc {
    hold(&go_peer(), locker, args, name)
}

fn go_try(locker: &str, args: &[&str], name: &str) -> i32 {
    try_lock(&go_peer(), locker, args, name)
}

fn file(dir: &Path) -> String {
    format!("file:{}", dir.display())
}

fn rust_try(dir: &Path, args: &[&str], name: &str) -> i32 {
    try_lock(&rust_cli(), &file(dir), args, name)
}

fn rust_hold(dir: &Path, args: &[&str], name: &str) -> Proc {
    hold(&rust_cli(), &file(dir), args, name)
}

#[test]
fn go_takes_and_releases_file_locks() {
    let dir = tempfile::tempdir().unwrap();
    let locker = format!("file:{}", dir.path().display());
    let holder = go_hold(&locker, &[], "go-file");
    assert_eq!(go_try(&locker, &[], "go-file"), 1, "busy while held");
    release(holder);
    assert_eq!(go_try(&locker, &[], "go-file"), 0, "free after release");
    // Go names the file by the SHA-256 of the name, as we do.
    let sha = hex(&sha2_256(b"go-file"));
    assert!(dir.path().join(sha).is_file());
}

#[test]
fn rust_and_go_exclude_each_other_on_file_locks() {
    let dir = tempfile::tempdir().unwrap();
    let locker = format!("file:{}", dir.path().display());

    let go = go_hold(&locker, &[], "mixed");
    assert_eq!(
        rust_try(dir.path(), &[], "mixed"),
        1,
        "Rust must see Go's exclusive lock"
    );
    assert_eq!(rust_try(dir.path(), &["-s"], "mixed"), 1);
    release(go);
    assert_eq!(rust_try(dir.path(), &[], "mixed"), 0);

    let rust = rust_hold(dir.path(), &[], "mixed");
    assert_eq!(
        go_try(&locker, &[], "mixed"),
        1,
        "Go must see Rust's exclusive lock"
    );
    assert_eq!(go_try(&locker, &["-s"], "mixed"), 1);
    release(rust);

    // Shared holders of both mix; an exclusive request of either waits for them.
    let go = go_hold(&locker, &["-s"], "mixed");
    let rust = rust_hold(dir.path(), &["-s"], "mixed");
    assert_eq!(go_try(&locker, &[], "mixed"), 1);
    assert_eq!(rust_try(dir.path(), &[], "mixed"), 1);
    release(go);
    assert_eq!(
        go_try(&locker, &[], "mixed"),
        1,
        "the Rust reader still holds"
    );
    release(rust);
    assert_eq!(go_try(&locker, &[], "mixed"), 0);
}

/// A Go waiter polls every 500 ms; a Rust waiter is woken by the kernel at once.
#[test]
fn a_rust_waiter_gets_a_go_holders_lock_on_release() {
    let dir = tempfile::tempdir().unwrap();
    let locker = format!("file:{}", dir.path().display());
    let go = go_hold(&locker, &[], "handoff");
    let mut waiter = Proc::spawn(
        Command::new(rust_cli())
            .arg("--dir")
            .arg(dir.path())
            .args(["exec", "-w", "20", "handoff", "--", "echo", "granted"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    // Wait until the Rust waiter is blocked in the kernel.
    let status = || {
        Command::new(rust_cli())
            .arg("--dir")
            .arg(dir.path())
            .args(["status", "--json"])
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: serde_json::Value = serde_json::from_slice(&status().stdout).unwrap();
        if v["locks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["waiters"].as_u64() == Some(1))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the Rust waiter never blocked");
        std::thread::sleep(Duration::from_millis(10));
    }
    let released = Instant::now();
    release(go);
    expect_line(&mut waiter, "granted");
    let latency = released.elapsed();
    assert!(waiter.wait().unwrap().success());
    assert!(
        latency < Duration::from_millis(400),
        "handoff from Go took {latency:?}"
    );
}

async fn configmap(namespace: &str) -> String {
    new_configmap(namespace).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_takes_and_releases_kubernetes_locks() {
    let cm = configmap("default").await;
    let locker = format!("kubernetes://default/configmaps/{cm}");
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let key = format!("lockgate.io/{}", hex(&sha3::Sha3_224::digest(b"go-kube")));

    let l = locker.clone();
    let holder = tokio::task::spawn_blocking(move || go_hold(&l, &[], "go-kube"))
        .await
        .unwrap();
    // The record is Go's JSON lease in the annotation named by the SHA3-224 of the lock name.
    let obj = api.get(&cm).await.unwrap();
    let record: serde_json::Value =
        serde_json::from_str(&obj.metadata.annotations.unwrap()[&key]).unwrap();
    assert_eq!(record["lockName"], "go-kube");
    assert_eq!(record["SharedHoldersCount"], 1);
    assert_eq!(record["IsShared"], false);
    assert!(record["ExpireAtTimestamp"].as_i64().unwrap() > 0);
    assert_eq!(record["uuid"].as_str().unwrap().len(), 36);

    let l = locker.clone();
    assert_eq!(
        tokio::task::spawn_blocking(move || go_try(&l, &[], "go-kube"))
            .await
            .unwrap(),
        1
    );
    tokio::task::spawn_blocking(move || release(holder))
        .await
        .unwrap();
    let obj = api.get(&cm).await.unwrap();
    assert!(
        !obj.metadata
            .annotations
            .unwrap_or_default()
            .contains_key(&key),
        "released: key removed"
    );
    assert_eq!(
        tokio::task::spawn_blocking(move || go_try(&locker, &[], "go-kube"))
            .await
            .unwrap(),
        0
    );
}

/// An environment self-check, not a test of lockgate: Go lockgate's HTTP client against Go
/// lockgate's own server, both through the peer, so that the HTTP tests of Rust lockgate can
/// rely on the peer's `serve` and its HTTP locker.
#[test]
fn environment_go_peer_serves_its_own_http_clients() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut server = Proc::spawn(
        Command::new(go_peer())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::piped()),
    );
    expect_line(&mut server, "serving on");
    let locker = format!("http://127.0.0.1:{port}");
    // The server may take a moment to accept after printing: retry the first acquisition.
    let deadline = Instant::now() + Duration::from_secs(10);
    while go_try(&locker, &[], "warm-up") != 0 {
        assert!(Instant::now() < deadline, "Go's lock server never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let holder = go_hold(&locker, &[], "go-http");
    assert_eq!(go_try(&locker, &[], "go-http"), 1);
    assert_eq!(go_try(&locker, &["-s"], "go-http"), 1);
    release(holder);
    assert_eq!(go_try(&locker, &[], "go-http"), 0);
    server.kill().unwrap();
    server.wait().unwrap();
}

fn peer_version(peer: &Path) -> String {
    let out = Command::new(peer).arg("version").output().unwrap();
    assert!(out.status.success(), "{peer:?} version: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn the_go_peers_are_built_with_lockgate_v0_2_0_and_v0_1_1() {
    assert_eq!(peer_version(&go_peer()), "v0.2.0");
    assert_eq!(peer_version(&go_peer_v01()), "v0.1.1");
}

#[test]
fn the_v0_1_1_peer_refuses_what_only_v0_2_0_has() {
    let dir = tempfile::tempdir().unwrap();
    let locker = file(dir.path());
    let out = Command::new(go_peer_v01())
        .args([
            "exec",
            "--locker",
            &locker,
            "--acquirer-id",
            "auto",
            "x",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("v0.2.0"),
        "{out:?}"
    );
    let out = Command::new(go_peer_v01())
        .args(["gc", "--locker", &locker, "--min-age", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

/// Runs `loop` workers to the end; returns their JSON reports.
fn run_loops(workers: Vec<Command>) -> Vec<serde_json::Value> {
    let children: Vec<Proc> = workers
        .into_iter()
        .map(|mut c| Proc::spawn(c.stdout(Stdio::piped())))
        .collect();
    children
        .into_iter()
        .map(|mut c| {
            c.wait_within(Duration::from_secs(300));
            let mut stdout = Vec::new();
            std::io::Read::read_to_end(&mut c.stdout.take().unwrap(), &mut stdout).unwrap();
            let out = std::process::Output {
                status: c.try_wait().unwrap().unwrap(),
                stdout,
                stderr: Vec::new(),
            };
            let text = String::from_utf8(out.stdout).unwrap();
            assert!(out.status.success(), "a loop worker failed: {text}");
            serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
        })
        .collect()
}

#[test]
fn go_v0_1_1_and_v0_2_0_loop_workers_share_a_file_lock_without_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let locker = file(&dir.path().join("locks"));
    let counter = dir.path().join("counter");
    let worker = |peer: std::path::PathBuf, shared: bool| {
        let mut c = Command::new(peer);
        c.args([
            "loop",
            "--locker",
            &locker,
            "--cycles",
            "25",
            "--hold-ms",
            "2",
        ])
        .arg("--counter")
        .arg(&counter);
        if shared {
            c.arg("-s");
        }
        c.arg("fleet");
        c
    };
    let reports = run_loops(vec![
        worker(go_peer(), false),
        worker(go_peer(), false),
        worker(go_peer_v01(), false),
        worker(go_peer_v01(), false),
        worker(go_peer(), true),
        worker(go_peer_v01(), true),
    ]);
    let mut increments = 0;
    for r in &reports {
        assert_eq!(r["impl"], "go");
        assert_eq!(r["cycles"], 25);
        assert_eq!(r["overlaps"], 0, "{r}");
        assert_eq!(r["errors"], serde_json::json!([]), "{r}");
        increments += r["increments"].as_u64().unwrap();
    }
    let versions: Vec<_> = reports
        .iter()
        .map(|r| r["version"].as_str().unwrap())
        .collect();
    assert!(
        versions.contains(&"v0.2.0") && versions.contains(&"v0.1.1"),
        "{versions:?}"
    );
    assert_eq!(increments, 100, "4 exclusive workers x 25 cycles");
    let value = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(value.trim(), "100", "no increment lost");
}

#[test]
fn go_gc_removes_idle_lock_files_and_keeps_held_ones() {
    let dir = tempfile::tempdir().unwrap();
    let locker = file(dir.path());
    assert_eq!(go_try(&locker, &[], "idle"), 0);
    let held = go_hold(&locker, &[], "held");
    let path = |name: &str| dir.path().join(hex(&sha2_256(name.as_bytes())));
    assert!(path("idle").is_file() && path("held").is_file());

    let status = Command::new(go_peer())
        .args(["gc", "--locker", &locker, "--min-age", "0"])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!path("idle").exists(), "an idle lock file is collected");
    assert!(path("held").is_file(), "a held lock file is kept");
    assert_eq!(go_try(&locker, &[], "held"), 1, "and still locked");
    release(held);
}

/// Starts `lockgate-go serve --listen 127.0.0.1:0 ARGS...`; returns it and its address.
fn go_serve(args: &[&str]) -> (Proc, String) {
    let mut server = Proc::spawn(
        Command::new(go_peer())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env(
                "KUBECONFIG",
                lockgate_testenv::required_env("LOCKGATE_TEST_KUBECONFIG"),
            )
            .stdout(Stdio::piped()),
    );
    let line = expect_line(&mut server, "serving on ");
    let addr = line.trim_start_matches("serving on ").to_owned();
    assert!(!addr.ends_with(":0"), "the bound port is printed: {line}");
    (server, format!("http://{addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_lock_servers_share_locks_through_a_configmap() {
    let cm = configmap("default").await;
    let store = format!("kubernetes://default/configmaps/{cm}");
    let (mut a, url_a) = go_serve(&["--store", &store]);
    let (mut b, url_b) = go_serve(&["--store", &store]);
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let key = format!("lockgate.io/{}", hex(&sha3::Sha3_224::digest(b"served")));

    let (ua, ub) = (url_a.clone(), url_b.clone());
    let holder = tokio::task::spawn_blocking(move || go_hold(&ua, &[], "served"))
        .await
        .unwrap();
    let obj = api.get(&cm).await.unwrap();
    assert!(
        obj.metadata
            .annotations
            .unwrap_or_default()
            .contains_key(&key),
        "the lease is in the ConfigMap"
    );
    let busy = tokio::task::spawn_blocking(move || go_try(&ub, &[], "served"))
        .await
        .unwrap();
    assert_eq!(busy, 1, "held through server A, busy through server B");
    tokio::task::spawn_blocking(move || release(holder))
        .await
        .unwrap();
    let free = tokio::task::spawn_blocking(move || go_try(&url_b, &[], "served"))
        .await
        .unwrap();
    assert_eq!(free, 0, "free through server B after release through A");
    drop(url_a);
    for s in [&mut a, &mut b] {
        s.kill().unwrap();
        s.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_v0_2_0_waiter_with_an_acquirer_id_queues_in_the_record() {
    let cm = configmap("default").await;
    let locker = format!("kubernetes://default/configmaps/{cm}");
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let key = format!("lockgate.io/{}", hex(&sha3::Sha3_224::digest(b"queued")));

    let l = locker.clone();
    let holder =
        tokio::task::spawn_blocking(move || go_hold(&l, &["--acquirer-id", "auto"], "queued"))
            .await
            .unwrap();
    let mut waiter = Proc::spawn(
        Command::new(go_peer())
            .args([
                "exec",
                "--locker",
                &locker,
                "-q",
                "-w",
                "30",
                "--acquirer-id",
                "waiter-1",
            ])
            .args(["queued", "--", "echo", "granted"])
            .env(
                "KUBECONFIG",
                lockgate_testenv::required_env("LOCKGATE_TEST_KUBECONFIG"),
            )
            .stdout(Stdio::piped()),
    );
    // The waiter keeps its place in the record's queue.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let obj = api.get(&cm).await.unwrap();
        let annotations = obj.metadata.annotations.unwrap_or_default();
        let record: serde_json::Value = serde_json::from_str(&annotations[&key]).unwrap();
        if record["QueueMembers"].get("waiter-1").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the waiter never queued: {record}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::spawn_blocking(move || release(holder))
        .await
        .unwrap();
    let waited = tokio::task::spawn_blocking(move || {
        let line = expect_line(&mut waiter, "granted");
        (line, waiter.wait_within(Duration::from_secs(60)))
    })
    .await
    .unwrap();
    assert!(waited.1.success(), "{waited:?}");
}

fn sha2_256(data: &[u8]) -> Vec<u8> {
    sha2::Sha256::digest(data).to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
