//! A holder whose wall clock is wrong, or is stepped while it holds, must not be taken over:
//! `ExpireAtTimestamp` is written in the API server's time frame, which fresh Rust processes
//! (PROTOCOL.md's rule 2) and Go peers read. Found by the clock-skew fault run: a fresh process
//! 10 minutes slow wrote its first record from its own clock (it had not seen the API server's
//! `Date` yet), and a process whose clock was stepped back wrote its next renewal from the new
//! clock with the old offset; either record looked 10 minutes expired, and another process took
//! the live lease over at once.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockgate::kubernetes::annotation_key;
use lockgate_testenv::{client, configmap, expect_line, go_peer, required_env, rust_cli, try_lock};

const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// `lockgate exec` holding `name` under faketime, its offset read from `clock` (rewritable while
/// it runs); returns once it holds the lock.
fn hold_skewed(url: &str, name: &str, clock: &Path) -> Child {
    let mut c = Command::new(rust_cli())
        .args([
            "--locker",
            url,
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "echo locked; read _ || true",
        ])
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
        .env("LD_PRELOAD", FAKETIME_LIB)
        .env("FAKETIME_TIMESTAMP_FILE", clock)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start a skewed holder");
    expect_line(&mut c, "locked");
    c
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn expire_at(cm: &str, name: &str) -> i64 {
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client(false).await, "default");
    let v = api.get(cm).await.unwrap().metadata.annotations.unwrap()[&annotation_key(name)].clone();
    serde_json::from_str::<serde_json::Value>(&v).unwrap()["ExpireAtTimestamp"]
        .as_i64()
        .unwrap()
}

/// Fresh Rust processes and Go peers with correct clocks find the lock busy.
fn busy_for_everyone(url: &str, name: &str) {
    assert_eq!(
        try_lock(&rust_cli(), url, &[], name),
        1,
        "a fresh Rust process took it over"
    );
    assert_eq!(
        try_lock(&go_peer(), url, &[], name),
        1,
        "a Go v0.2 peer took it over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_holder_ten_minutes_slow_is_not_taken_over() {
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "-10m").unwrap();
    let (u, c) = (url.clone(), clock.clone());
    let mut holder = tokio::task::spawn_blocking(move || hold_skewed(&u, "skewed", &c))
        .await
        .unwrap();
    let expiry = expire_at(&cm, "skewed").await;
    assert!(
        expiry >= now() + 5,
        "the first record's expiry is {} s from now: written from the holder's slow clock",
        expiry - now()
    );
    let u = url.clone();
    tokio::task::spawn_blocking(move || busy_for_everyone(&u, "skewed"))
        .await
        .unwrap();
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_clock_is_stepped_back_is_not_taken_over() {
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "+0").unwrap();
    let (u, c) = (url.clone(), clock.clone());
    let mut holder = tokio::task::spawn_blocking(move || hold_skewed(&u, "stepped", &c))
        .await
        .unwrap();
    std::fs::write(&clock, "-10m").unwrap();
    // Two renewal periods (3 s each): every renewal after the step must still be in the API
    // server's time.
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let expiry = expire_at(&cm, "stepped").await;
        assert!(
            expiry >= now() + 5,
            "a renewal after the clock step wrote an expiry {} s from now",
            expiry - now()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let u = url.clone();
    tokio::task::spawn_blocking(move || busy_for_everyone(&u, "stepped"))
        .await
        .unwrap();
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
}

/// A Go holder on a host whose clock is `skew_s` seconds off, simulated (Go binaries read the
/// clock without libc, so faketime cannot shift them): a record of Go's shape (no `Renewals`)
/// whose `ExpireAtTimestamp` is its clock + 10 s, rewritten every 3 s as Go renews, until the
/// returned sender is dropped (the holder dies).
async fn skewed_go_holder(cm: &str, name: &str, skew_s: i64) -> tokio::sync::oneshot::Sender<()> {
    use kube::api::{Patch, PatchParams};
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client(false).await, "default");
    let key = annotation_key(name);
    let uuid = format!("go-{}", lockgate_testenv::unique("lease"));
    let write = {
        let (api, cm, key, name) = (api.clone(), cm.to_owned(), key.clone(), name.to_owned());
        move || {
            let (api, cm, key, name, uuid) = (
                api.clone(),
                cm.clone(),
                key.clone(),
                name.clone(),
                uuid.clone(),
            );
            async move {
                let rec = serde_json::json!({"uuid": uuid, "lockName": name,
                    "ExpireAtTimestamp": now() + skew_s + 10, "SharedHoldersCount": 1,
                    "IsShared": false, "QueueMembers": {}});
                let patch =
                    serde_json::json!({"metadata": {"annotations": {key: rec.to_string()}}});
                api.patch(&cm, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .unwrap();
            }
        }
    };
    write().await;
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut rx => return,
                _ = tokio::time::sleep(Duration::from_secs(3)) => write().await,
            }
        }
    });
    tx
}

/// Go holders with clocks 10 minutes fast and 10 s slow (within PROTOCOL.md's 17 s) are not
/// taken over while they renew, by waiting or fresh Rust processes; once they die, a waiting
/// Rust process takes over one TTL after the last renewal it saw, whatever the dead holder's
/// clock said (not 10 minutes later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_holders_with_skewed_clocks_are_not_taken_over_while_they_renew() {
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    for (name, skew) in [("go-fast", 600), ("go-slow", -10)] {
        let holder = skewed_go_holder(&cm, name, skew).await;
        let (u, n) = (url.clone(), name.to_owned());
        // A waiter for 12 s (more than a TTL) and fresh non-blocking processes meanwhile.
        let waited = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let code = Command::new(rust_cli())
                .args(["--locker", &u, "exec", "-q", "-w", "12", &n, "--", "true"])
                .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
                .status()
                .unwrap()
                .code();
            (code, start.elapsed())
        });
        for _ in 0..3 {
            let (u, n) = (url.clone(), name.to_owned());
            let code = tokio::task::spawn_blocking(move || try_lock(&rust_cli(), &u, &[], &n))
                .await
                .unwrap();
            assert_eq!(code, 1, "{name}: a fresh process took a live lease over");
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let (code, _) = waited.await.unwrap();
        assert_eq!(code, Some(1), "{name}: a waiter took a live lease over");
        // The holder dies: a waiter takes over about a TTL (10 s) after the last renewal.
        drop(holder);
        let (u, n) = (url.clone(), name.to_owned());
        let (code, took) = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let code = Command::new(rust_cli())
                .args(["--locker", &u, "exec", "-q", "-w", "30", &n, "--", "true"])
                .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
                .status()
                .unwrap()
                .code();
            (code, start.elapsed())
        })
        .await
        .unwrap();
        assert_eq!(
            code,
            Some(0),
            "{name}: never taken over after its holder died"
        );
        assert!(
            took <= Duration::from_secs(14),
            "{name}: taken over after {took:?}"
        );
    }
}
