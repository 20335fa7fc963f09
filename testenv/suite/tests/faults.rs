//! Regression tests for defects found by a fault review of the Kubernetes locker: each one
//! reproduced the defect on the real API server before it was fixed.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use lockgate::kubernetes::{annotation_key, KubernetesLocker, LeaseConfig, Target};
use lockgate::{AcquireError, AcquireOptions, Locker, Mode};
use lockgate_testenv::{client, configmap, go_peer, required_env, rust_cli, unique};
use serde_json::json;

/// A short lease, so that renewals and expiry show within seconds.
const SHORT: LeaseConfig = LeaseConfig {
    ttl: Duration::from_secs(4),
    renew_period: Duration::from_secs(1),
    renew_deadline: Duration::from_secs(3),
    request_timeout: Duration::from_secs(1),
};

async fn locker_with(cm: &str, config: LeaseConfig) -> Locker {
    let k = KubernetesLocker::new(
        client(false).await,
        Target::configmap("default", cm),
        config,
    )
    .unwrap();
    Locker::new(k)
}

async fn cm_api() -> Api<ConfigMap> {
    Api::namespaced(client(false).await, "default")
}

async fn record(cm: &str, name: &str) -> Option<String> {
    cm_api()
        .await
        .get(cm)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default()
        .remove(&annotation_key(name))
}

async fn put_record(cm: &str, name: &str, value: &serde_json::Value) {
    let patch = json!({"metadata": {"annotations": {annotation_key(name): value.to_string()}}});
    cm_api()
        .await
        .patch(cm, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// Waits until the record of `name` differs from `seen`, for at most `within`.
async fn changes(cm: &str, name: &str, seen: &Option<String>, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if &record(cm, name).await != seen {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn nb(mode: Mode) -> AcquireOptions {
    AcquireOptions::default().mode(mode).non_blocking()
}

// ---------------------------------------------------------------------------------------------
// Names

/// Names the API server's JSON encoder escapes differently from a plain encoder (`<`, `>`, `&`,
/// U+2028, U+2029), and other awkward ones.
fn awkward_names() -> Vec<String> {
    vec![
        "a&b".into(),
        "<x>".into(),
        "line\u{2028}separator".into(),
        "paragraph\u{2029}separator".into(),
        "quote\"d".into(),
        "back\\slash".into(),
        "rtl \u{200f}mark\u{202e}".into(),
        "emoji 🔒".into(),
        "bom\u{feff}".into(),
        "x".repeat(lockgate::MAX_NAME_LEN),
        format!("<&>{}", "\u{2028}".repeat(100)),
    ]
}

/// Every name `LockName` accepts is renewed, released and taken over like any other: a name the
/// API server encodes differently must not jam its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_valid_name_is_renewed_and_released() {
    let cm = configmap("default").await;
    let (a, b) = (locker_with(&cm, SHORT).await, locker_with(&cm, SHORT).await);
    let checks = awkward_names().into_iter().map(|name| {
        let (a, b, cm) = (a.clone(), b.clone(), cm.clone());
        async move {
            let g = a.acquire(&name, AcquireOptions::exclusive()).await.unwrap();
            // Renewed: the record changes within two renewal periods.
            let first = record(&cm, &name).await;
            assert!(first.is_some(), "{name:?}: no record");
            assert!(
                changes(&cm, &name, &first, Duration::from_secs(3)).await,
                "{name:?}: never renewed"
            );
            assert!(!g.is_lost(), "{name:?}: lost");
            tokio::time::timeout(Duration::from_secs(5), g.release())
                .await
                .unwrap_or_else(|_| panic!("{name:?}: release hangs"))
                .unwrap_or_else(|e| panic!("{name:?}: release failed: {e}"));
            assert_eq!(holders(&cm, &name).await, Some(0), "{name:?}: not released");
            b.acquire(&name, nb(Mode::Exclusive))
                .await
                .unwrap_or_else(|e| panic!("{name:?}: not free after release: {e}"))
                .release()
                .await
                .unwrap();
        }
    });
    futures::future::join_all(checks).await;
}

/// The same names between Rust and Go: Go's records (encoded by Go) are read, joined and released
/// by Rust, and Go excludes Rust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_names_work_between_rust_and_go() {
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let a = locker_with(&cm, SHORT).await;
    for name in awkward_names() {
        // Rust shared, Go joins and leaves (rewriting the record with Go's encoding), Rust leaves.
        let g = a.acquire(&name, AcquireOptions::shared()).await.unwrap();
        let (u, n) = (url.clone(), name.clone());
        let code = tokio::task::spawn_blocking(move || {
            lockgate_testenv::try_lock(&go_peer(), &u, &["-s"], &n)
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "{name:?}: Go could not join a shared Rust lock");
        tokio::time::timeout(Duration::from_secs(5), g.release())
            .await
            .unwrap_or_else(|_| panic!("{name:?}: release hangs"))
            .unwrap_or_else(|e| panic!("{name:?}: release failed: {e}"));
        assert_eq!(holders(&cm, &name).await, Some(0), "{name:?}: not released");
        // Go holds: Rust is refused until Go lets go.
        let (u, n) = (url.clone(), name.clone());
        let go =
            tokio::task::spawn_blocking(move || lockgate_testenv::hold(&go_peer(), &u, &[], &n))
                .await
                .unwrap();
        assert!(
            matches!(
                a.acquire(&name, nb(Mode::Shared)).await,
                Err(AcquireError::WouldBlock { .. })
            ),
            "{name:?}: Rust joined Go's exclusive lock"
        );
        tokio::task::spawn_blocking(move || lockgate_testenv::release(go))
            .await
            .unwrap();
        a.acquire(&name, nb(Mode::Exclusive))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Hooks

/// A panicking on-lost hook must not take the renewer down with it: the locker's other leases
/// go on being renewed, and are still declared lost when they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_hook_does_not_stop_renewals() {
    let cm = configmap("default").await;
    let a = locker_with(&cm, SHORT).await;
    let doomed = a
        .acquire(
            "doomed",
            AcquireOptions::exclusive().on_lost(|_, _| panic!("a hook that panics")),
        )
        .await
        .unwrap();
    let other = a
        .acquire("other", AcquireOptions::exclusive())
        .await
        .unwrap();
    put_record(&cm, "doomed", &json!({"uuid": "thief", "lockName": "doomed", "ExpireAtTimestamp": 0, "SharedHoldersCount": 1, "IsShared": false})).await;
    tokio::time::timeout(Duration::from_secs(5), doomed.lost())
        .await
        .expect("the stolen lease is declared lost");
    // The renewer survived the hook: `other` keeps changing for several periods.
    for _ in 0..3 {
        let seen = record(&cm, "other").await;
        assert!(
            changes(&cm, "other", &seen, Duration::from_secs(3)).await,
            "renewals stopped after a hook panicked"
        );
    }
    assert!(!other.is_lost());
    put_record(&cm, "other", &json!({"uuid": "thief", "lockName": "other", "ExpireAtTimestamp": 0, "SharedHoldersCount": 1, "IsShared": false})).await;
    tokio::time::timeout(Duration::from_secs(5), other.lost())
        .await
        .expect("a later loss is still signalled");
}

// ---------------------------------------------------------------------------------------------
// Queue

/// CPU time (user + system) of process `pid`, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    // Fields 14 and 15 of stat(5) (utime, stime) are the 12th and 13th after the command.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// A waiter queued behind a dead queue member (one that stopped refreshing its place) waits
/// quietly for the holder: it does not spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_queue_member_does_not_make_waiters_spin() {
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let a = locker_with(&cm, LeaseConfig::default()).await;
    let g = a
        .acquire("busy", AcquireOptions::exclusive())
        .await
        .unwrap();
    // A queue member that never refreshes its place, as a crashed waiter leaves it.
    let mut rec: serde_json::Value =
        serde_json::from_str(&record(&cm, "busy").await.unwrap()).unwrap();
    rec["QueueMembers"] = json!({"00000000000000000001-dead": {"AcquirerId": "00000000000000000001-dead", "AcquiredAtTimestamp": 1, "ExpireAtTimestamp": 1}});
    put_record(&cm, "busy", &rec).await;
    let mut waiter = Command::new(rust_cli())
        .args([
            "--locker", &url, "exec", "-q", "-w", "60", "busy", "--", "true",
        ])
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = waiter.id();
    // The dead member counts as dead a TTL (10 s) after the waiter first saw it; measure after.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(waiter.try_wait().unwrap().is_none(), "the waiter ended");
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let used = cpu_time(pid) - before;
    g.release().await.unwrap();
    let status = tokio::task::spawn_blocking(move || waiter.wait().unwrap())
        .await
        .unwrap();
    assert!(
        status.success(),
        "the waiter did not get the lock: {status}"
    );
    eprintln!("CPU of a waiter over 10 s behind a dead queue member: {used:?}");
    assert!(
        used <= Duration::from_millis(50),
        "the waiter used {used:?} of CPU in 10 s"
    );
}

/// A waiter behind a live queue member of an expired, unrenewed record (a crashed holder, and a
/// Go v0.2 waiter that keeps refreshing its place but takes over only at its next poll) waits
/// quietly: the moment the record went stale is past and no reason to wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_behind_a_live_member_of_a_stale_record_does_not_spin() {
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // A crashed holder's record, and a Go waiter (older than anyone) in its queue.
    let member = move |expire: i64| json!({"go-waiter": {"AcquirerId": "go-waiter", "AcquiredAtTimestamp": now - 100, "ExpireAtTimestamp": expire}});
    let rec = move |expire: i64| {
        json!({"uuid": "5b0c4c1e-1c5a-4f6e-9d1a-3d3c1a2b4c5d", "lockName": "stale",
               "ExpireAtTimestamp": now + 10, "SharedHoldersCount": 1, "IsShared": false,
               "QueueMembers": member(expire)})
    };
    put_record(&cm, "stale", &rec(now + 10)).await;
    let mut waiter = Command::new(rust_cli())
        .args([
            "--locker", &url, "exec", "-q", "-w", "60", "stale", "--", "true",
        ])
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = waiter.id();
    // The Go waiter refreshes its place every 2 s, as Go v0.2's UpdateQueue does.
    let refresher = {
        let cm = cm.clone();
        tokio::spawn(async move {
            for i in 1.. {
                tokio::time::sleep(Duration::from_secs(2)).await;
                put_record(&cm, "stale", &rec(now + 10 + 2 * i)).await;
            }
        })
    };
    // The record counts as stale a TTL (10 s) after the waiter first saw it; measure after.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(waiter.try_wait().unwrap().is_none(), "the waiter ended");
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let used = cpu_time(pid) - before;
    refresher.abort();
    // The Go waiter gives up: its place goes; the waiter takes the stale record over.
    let mut gone = rec(now);
    gone["QueueMembers"] = json!({});
    put_record(&cm, "stale", &gone).await;
    let status = tokio::task::spawn_blocking(move || waiter.wait().unwrap())
        .await
        .unwrap();
    assert!(
        status.success(),
        "the waiter did not get the lock: {status}"
    );
    eprintln!("CPU of a waiter over 10 s behind a live member of a stale record: {used:?}");
    assert!(
        used <= Duration::from_millis(50),
        "the waiter used {used:?} of CPU in 10 s"
    );
}

/// A locker whose runtime has shut down cannot renew what it would take: the acquisition fails
/// with a typed error instead of handing out a lease nobody renews, and leaves nothing held.
#[test]
fn a_locker_whose_runtime_ended_refuses_to_acquire() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cm = rt.block_on(configmap("default"));
    // The client lives on `rt`; the locker was made on a runtime that is gone.
    let kube = rt.block_on(client(false));
    let locker = {
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let l = first.block_on(async {
            KubernetesLocker::new(kube, Target::configmap("default", &cm), SHORT).unwrap()
        });
        drop(first);
        Locker::new(l)
    };
    let got = rt.block_on(locker.acquire("orphan", AcquireOptions::exclusive().non_blocking()));
    assert!(
        matches!(
            got,
            Err(AcquireError::Failed(lockgate::Error::Unsupported(_)))
        ),
        "{got:?}"
    );
    // Given back: another locker takes it at once.
    let other = rt.block_on(locker_with(&cm, SHORT));
    let g = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                other.acquire("orphan", AcquireOptions::exclusive()),
            )
            .await
        })
        .expect("the lock was given back")
        .unwrap();
    rt.block_on(g.release()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Release

/// `release_blocking` inside a runtime cannot block, but must not leak the lease either: the lock
/// is released in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_blocking_inside_a_runtime_does_not_leak_the_lease() {
    let cm = configmap("default").await;
    let (a, b) = (
        locker_with(&cm, LeaseConfig::default()).await,
        locker_with(&cm, LeaseConfig::default()).await,
    );
    let g = a
        .acquire("leak", AcquireOptions::exclusive())
        .await
        .unwrap();
    assert!(
        g.release_blocking().is_err(),
        "cannot block inside a runtime"
    );
    // Freed by a release, well before its 10 s TTL could pass.
    b.acquire(
        "leak",
        AcquireOptions::exclusive().timeout(Duration::from_secs(5)),
    )
    .await
    .expect("the lease was left held")
    .release()
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Cancellation

/// An acquisition cancelled while its granting write is in flight leaves nothing held: another
/// locker gets the lock at once, not a TTL later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_during_the_grant_write_leaves_nothing_held() {
    let cm = configmap("default").await;
    let (a, b) = (
        locker_with(&cm, LeaseConfig::default()).await,
        locker_with(&cm, LeaseConfig::default()).await,
    );
    let mut landed_after_cancel = 0;
    let mut cancelled = 0;
    for i in 0..60u64 {
        // Pseudo-random 0-5 ms (no extra dependency): the write takes a few milliseconds here.
        let limit = Duration::from_micros((i * 7919) % 5000);
        match tokio::time::timeout(limit, a.acquire("cancel", AcquireOptions::exclusive())).await {
            Ok(g) => g.unwrap().release().await.unwrap(),
            Err(_) => {
                cancelled += 1;
                if record(&cm, "cancel").await.is_some() {
                    landed_after_cancel += 1;
                }
                b.acquire(
                    "cancel",
                    AcquireOptions::exclusive().timeout(Duration::from_secs(3)),
                )
                .await
                .unwrap_or_else(|e| {
                    panic!("attempt {i}: a cancelled acquisition left the lock held: {e}")
                })
                .release()
                .await
                .unwrap();
            }
        }
    }
    eprintln!(
        "{cancelled} cancelled, {landed_after_cancel} with the grant landing after the cancel"
    );
    assert!(
        landed_after_cancel > 0,
        "the window (a grant landing after the cancel) was never hit"
    );
}

// ---------------------------------------------------------------------------------------------
// Takeover by non-blocking and short-timeout acquirers

/// `exec -n` callers, each a fresh process, take over a SIGKILLed holder's lock within a bounded
/// time (and not before the TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_blocking_callers_take_over_a_crashed_holder() {
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let u = url.clone();
    let mut holder = tokio::task::spawn_blocking(move || {
        lockgate_testenv::hold(&rust_cli(), &u, &[], "crashed")
    })
    .await
    .unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    let killed = Instant::now();
    let took = tokio::task::spawn_blocking(move || loop {
        if lockgate_testenv::try_lock(&rust_cli(), &url, &[], "crashed") == 0 {
            return killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(40),
            "exec -n callers never took the crashed holder's lock over"
        );
        std::thread::sleep(Duration::from_millis(500));
    })
    .await
    .unwrap();
    eprintln!("exec -n took over a SIGKILLed holder after {took:?}");
    assert!(
        took >= Duration::from_secs(7),
        "taken over {took:?} after the kill: before the lease could expire"
    );
    assert!(
        took <= Duration::from_secs(25),
        "took {took:?}: more than 2 TTLs"
    );
}

/// One locker making repeated short-timeout attempts keeps what it observed between attempts, so
/// it takes over a crashed holder after a TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_timeout_attempts_take_over_a_crashed_holder() {
    let cm = configmap("default").await;
    // The crashed holder: a record nobody renews.
    put_record(&cm, "gone", &json!({"uuid": "crashed", "lockName": "gone", "ExpireAtTimestamp": i64::MAX / 2, "SharedHoldersCount": 1, "IsShared": false})).await;
    let a = locker_with(&cm, SHORT).await;
    let start = Instant::now();
    let g = loop {
        match a
            .acquire(
                "gone",
                AcquireOptions::exclusive().timeout(Duration::from_millis(500)),
            )
            .await
        {
            Ok(g) => break g,
            Err(AcquireError::TimedOut { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never taken over"
        );
    };
    let took = start.elapsed();
    assert!(took >= SHORT.ttl, "taken over after {took:?}, before a TTL");
    g.release().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Renewals always change the record

/// A holder whose wall clock stands still (stepped back, frozen VM clock) still changes its
/// record with every renewal, so a waiter never mistakes it for a dead holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_with_a_frozen_clock_keeps_its_lease() {
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    // A wall clock frozen at the current time (`-f` with an absolute time stands still; TLS
    // certificates stay valid); the monotonic clock runs, so timers work.
    let now = String::from_utf8(
        Command::new("date")
            .arg("+%Y-%m-%d %H:%M:%S")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let mut holder = Command::new("faketime")
        .args(["-f", now.trim()])
        .arg(rust_cli())
        .args([
            "--locker",
            &url,
            "exec",
            "frozen",
            "--",
            "sh",
            "-c",
            "echo locked; read _ || true",
        ])
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("faketime (Debian package faketime) is needed");
    let mut holder = tokio::task::spawn_blocking(move || {
        lockgate_testenv::expect_line(&mut holder, "locked");
        holder
    })
    .await
    .unwrap();
    let b = locker_with(&cm, LeaseConfig::default()).await;
    let e = b
        .acquire(
            "frozen",
            AcquireOptions::exclusive().timeout(Duration::from_secs(15)),
        )
        .await
        .expect_err("a live holder with a frozen clock was taken over");
    assert!(matches!(e, AcquireError::TimedOut { .. }), "{e}");
    drop(holder.stdin.take());
    let status = tokio::task::spawn_blocking(move || holder.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "the holder lost its lease: {status}");
}

// ---------------------------------------------------------------------------------------------
// Overload and server errors

/// A namespace whose ConfigMap updates fail with a 500 while `failing` is set: an admission
/// webhook that cannot be reached, with failurePolicy Fail.
struct FailingUpdates {
    namespace: String,
    webhook: String,
}

impl FailingUpdates {
    async fn namespace() -> Self {
        use k8s_openapi::api::core::v1::Namespace;
        let namespace = unique("failing");
        let ns: Namespace = serde_json::from_value(
            json!({"metadata": {"name": namespace, "labels": {"lockgate-test": namespace}}}),
        )
        .unwrap();
        Api::<Namespace>::all(client(false).await)
            .create(&Default::default(), &ns)
            .await
            .unwrap();
        Self {
            webhook: namespace.clone(),
            namespace,
        }
    }

    async fn start(&self) {
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        let hook: ValidatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": self.webhook},
            "webhooks": [{
                "name": "fail.lockgate.test",
                "clientConfig": {"url": "https://127.0.0.1:1/fail"},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["configmaps"]}],
                "namespaceSelector": {"matchLabels": {"lockgate-test": self.namespace}},
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 1
            }]
        }))
        .unwrap();
        Api::<ValidatingWebhookConfiguration>::all(client(false).await)
            .create(&Default::default(), &hook)
            .await
            .unwrap();
        // The webhook takes effect once the API server's informer has it: wait for a failure.
        let api: Api<ConfigMap> = Api::namespaced(client(false).await, &self.namespace);
        let probe = lockgate_testenv::empty_configmap(&self.namespace).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let patch = json!({"metadata": {"annotations": {"probe": unique("p")}}});
            match api
                .patch(&probe, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Err(kube::Error::Api(s)) if s.code >= 500 => return,
                r => assert!(
                    Instant::now() < deadline,
                    "the webhook never failed a write: {r:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(&self) {
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        Api::<ValidatingWebhookConfiguration>::all(client(false).await)
            .delete(&self.webhook, &Default::default())
            .await
            .unwrap();
    }
}

/// 5xx answers during a release and during a wait are ridden out: the release completes and the
/// waiter gets the lock once the API server works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_during_a_wait_and_a_release_are_ridden_out() {
    let failing = FailingUpdates::namespace().await;
    let ns = failing.namespace.clone();
    let cm = lockgate_testenv::configmap(&ns).await;
    let mk = || async {
        Locker::new(
            KubernetesLocker::new(
                client(false).await,
                Target::configmap(&ns, &cm),
                LeaseConfig::default(),
            )
            .unwrap(),
        )
    };
    let (a, b) = (mk().await, mk().await);
    let g = a
        .acquire("overload", AcquireOptions::exclusive())
        .await
        .unwrap();
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            b.acquire(
                "overload",
                AcquireOptions::exclusive().timeout(Duration::from_secs(30)),
            )
            .await
        })
    };
    failing.start().await;
    let release = tokio::spawn(g.release());
    tokio::time::sleep(Duration::from_secs(2)).await;
    failing.stop().await;
    tokio::time::timeout(Duration::from_secs(15), release)
        .await
        .expect("release hangs")
        .unwrap()
        .expect("a release failed on a passing server error");
    tokio::time::timeout(Duration::from_secs(15), waiter)
        .await
        .expect("waiter hangs")
        .unwrap()
        .expect("a waiter failed on a passing server error")
        .release()
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Records with extreme numbers

/// Huge and negative numbers in a record written by another tool are handled without
/// arithmetic overflow (which panics in debug builds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_numbers_in_records_do_not_panic() {
    let cm = configmap("default").await;
    let a = locker_with(&cm, SHORT).await;
    let k = KubernetesLocker::new(
        client(false).await,
        Target::configmap("default", &cm),
        SHORT,
    )
    .unwrap();
    for (i, (count, expire, arrived, member_expire)) in [
        (i64::MAX, i64::MIN, i64::MIN, i64::MAX),
        (i64::MIN, i64::MAX, i64::MAX, i64::MIN),
        (i64::MAX, i64::MAX, 0, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("extreme-{i}");
        put_record(&cm, &name, &json!({"uuid": "x", "lockName": name, "ExpireAtTimestamp": expire, "SharedHoldersCount": count, "IsShared": true,
            "QueueMembers": {"m": {"AcquirerId": "m", "AcquiredAtTimestamp": arrived, "ExpireAtTimestamp": member_expire}}})).await;
        k.status().await.unwrap();
        for mode in [Mode::Shared, Mode::Exclusive] {
            let done = Arc::new(AtomicUsize::new(0));
            let r = tokio::spawn({
                let (a, name, done) = (a.clone(), name.clone(), done.clone());
                async move {
                    let r = a.acquire(&name, nb(mode)).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    if let Ok(g) = r {
                        let _ = g.release().await;
                    }
                }
            })
            .await;
            assert!(r.is_ok(), "{name} {mode}: panicked: {r:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lost replies and a network that stops answering (through a controllable proxy)

/// A locker whose requests go through `proxy`.
async fn proxied(proxy: &lockgate_testenv::proxy::Proxy, cm: &str, config: LeaseConfig) -> Locker {
    let k = KubernetesLocker::new(
        proxy.client().await,
        Target::configmap("default", cm),
        config,
    )
    .unwrap();
    Locker::new(k)
}

/// Holders count in the record of `name`.
async fn holders(cm: &str, name: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(&record(cm, name).await?).unwrap();
    v["SharedHoldersCount"].as_i64()
}

/// A shared holder whose release is applied but whose answer is lost must not decrement the
/// count again: that would free the lock while another shared holder still holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_answer_is_lost_is_not_repeated() {
    let cm = configmap("default").await;
    let proxy = lockgate_testenv::proxy::Proxy::new().await;
    // No renewal of A's during the test: its release is the only write in flight.
    let slow = LeaseConfig {
        ttl: Duration::from_secs(30),
        renew_period: Duration::from_secs(20),
        renew_deadline: Duration::from_secs(25),
        request_timeout: Duration::from_secs(3),
    };
    let a_client = proxy.client().await;
    let a = Locker::new(
        KubernetesLocker::new(a_client.clone(), Target::configmap("default", &cm), slow).unwrap(),
    );
    let (b, c) = (
        locker_with(&cm, LeaseConfig::default()).await,
        locker_with(&cm, LeaseConfig::default()).await,
    );
    // B first, then A joins: A's view of the record is the current one.
    let gb = b.acquire("shared", AcquireOptions::shared()).await.unwrap();
    let ga = a.acquire("shared", nb(Mode::Shared)).await.unwrap();
    assert_eq!(holders(&cm, "shared").await, Some(2));
    // Under `lose_replies` only connections opened before it carry requests (a new one hangs in
    // its TLS handshake), and a holder's watch keeps one of A's connections busy. Three
    // requests at once leave A's client with idle connections for the release to use.
    let api: Api<ConfigMap> = Api::namespaced(a_client, "default");
    let (r1, r2, r3) = tokio::join!(api.get(&cm), api.get(&cm), api.get(&cm));
    for r in [r1, r2, r3] {
        r.expect("a GET through the proxy before the fault");
    }
    proxy.lose_replies().await;
    let release = tokio::spawn(ga.release());
    // The decrement reaches the API server; its answer does not come back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while holders(&cm, "shared").await != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the release never reached the API server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.pass().await;
    let released = tokio::time::timeout(Duration::from_secs(30), release)
        .await
        .expect("release hangs")
        .unwrap();
    eprintln!("release with a lost answer: {released:?}");
    // B still holds a shared lock: the record must still count it, and C must be refused.
    assert!(
        holders(&cm, "shared").await.is_some_and(|n| n >= 1),
        "the count was decremented twice: the lock looks free while B holds it"
    );
    assert!(
        matches!(
            c.acquire("shared", nb(Mode::Exclusive)).await,
            Err(AcquireError::WouldBlock { .. })
        ),
        "an exclusive lock was granted while B holds a shared one"
    );
    gb.release().await.unwrap();
}

/// A holder cut off from the API server learns that its lease is lost no later than the renewal
/// deadline after its last confirmed renewal was sent, whatever its request timeout: in
/// particular before a waiter can take the lock over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lost_signal_comes_before_anyone_can_take_over() {
    let cm = configmap("default").await;
    let proxy = lockgate_testenv::proxy::Proxy::new().await;
    // A long request timeout: a renewal hangs for 5 s before the client gives up on it.
    let config = LeaseConfig {
        ttl: Duration::from_secs(10),
        renew_period: Duration::from_secs(2),
        renew_deadline: Duration::from_secs(8),
        request_timeout: Duration::from_secs(5),
    };
    let a = proxied(&proxy, &cm, config).await;
    let lost_at = Arc::new(std::sync::Mutex::new(None));
    let l = lost_at.clone();
    let g = a
        .acquire(
            "partitioned",
            AcquireOptions::exclusive().on_lost(move |_, _| {
                *l.lock().unwrap() = Some(Instant::now());
            }),
        )
        .await
        .unwrap();
    let cut = Instant::now();
    proxy.black_hole().await;
    let b = locker_with(&cm, LeaseConfig::default()).await;
    let taken = b
        .acquire(
            "partitioned",
            AcquireOptions::exclusive().timeout(Duration::from_secs(30)),
        )
        .await
        .expect("the waiter never took over");
    let taken_at = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), g.lost())
        .await
        .expect("the holder was never told");
    let lost_at = lost_at.lock().unwrap().expect("the hook ran");
    eprintln!(
        "cut at 0, lost after {:?}, taken over after {:?}",
        lost_at - cut,
        taken_at - cut
    );
    // The last confirmed renewal was sent before the cut.
    assert!(
        lost_at <= cut + config.renew_deadline + Duration::from_millis(500),
        "told {:?} after the cut, the renewal deadline is {:?}",
        lost_at - cut,
        config.renew_deadline
    );
    assert!(
        lost_at < taken_at,
        "the lock was taken over before the holder was told"
    );
    taken.release().await.unwrap();
}
