//! The real Go lockgate (v0.1.1, as werf pins it), driven through `lockgate-go`: it takes and
//! releases file, Kubernetes and HTTP locks, and Rust and Go processes exclude each other on
//! the same lock files.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use lockgate_testenv::{
    client, configmap as new_configmap, expect_line, go_peer, hold, release, rust_cli, try_lock,
};
use sha3::Digest;

fn go_hold(locker: &str, args: &[&str], name: &str) -> Child {
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

fn rust_hold(dir: &Path, args: &[&str], name: &str) -> Child {
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
    let mut waiter = Command::new(rust_cli())
        .arg("--dir")
        .arg(dir.path())
        .args(["exec", "-w", "20", "handoff", "--", "echo", "granted"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
        if v.as_array()
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

#[test]
fn go_takes_and_releases_http_locks_against_its_own_server() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut server = Command::new(go_peer())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
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

fn sha2_256(data: &[u8]) -> Vec<u8> {
    sha2::Sha256::digest(data).to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
