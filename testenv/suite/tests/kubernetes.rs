//! The Kubernetes locker against the real API server: semantics, exclusion across processes,
//! crashes, lost leases, RBAC, bad records, and interop with Go lockgate.
//!
//! Every test has a time limit (`time_limit`); every "the waiter is waiting" is its queue entry
//! in the record, never a sleep; time differences fail on reversed order (`elapsed_between`).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use lockgate::kubernetes::{annotation_key, KubernetesLocker, LeaseConfig, Target};
use lockgate::{AcquireError, AcquireOptions, Error, Locker, Mode};
use lockgate_testenv::{
    annotations, client, elapsed_between, expect_line, go_peer, required_env, rust_cli, time_limit,
    unique, wait_for_queue, Proc,
};
use serde_json::json;

async fn configmap(ns: &str) -> String {
    lockgate_testenv::configmap(ns).await
}

async fn locker_with(ns: &str, cm: &str, limited: bool, config: LeaseConfig) -> Locker {
    let k =
        KubernetesLocker::new(client(limited).await, Target::configmap(ns, cm), config).unwrap();
    Locker::new(k)
}

async fn locker(cm: &str) -> Locker {
    locker_with("default", cm, false, LeaseConfig::default()).await
}

fn ex() -> AcquireOptions {
    AcquireOptions::exclusive()
}

fn nb(mode: Mode) -> AcquireOptions {
    AcquireOptions::default().mode(mode).non_blocking()
}

/// The local wall clock in unix seconds: the API server's too (it runs on this machine).
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------------------------
// Semantics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_and_shared_semantics() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    // Two lockers stand for two processes.
    let (a, b) = (locker(&cm).await, locker(&cm).await);

    let g = a.acquire("sem", ex()).await.unwrap();
    let rec: serde_json::Value =
        serde_json::from_str(&annotations(&cm).await[&annotation_key("sem")]).unwrap();
    let uuid = rec["uuid"].as_str().unwrap().to_owned();
    assert_eq!(
        (
            rec["lockName"].as_str(),
            rec["IsShared"].as_bool(),
            rec["SharedHoldersCount"].as_i64()
        ),
        (Some("sem"), Some(false), Some(1))
    );
    for mode in [Mode::Exclusive, Mode::Shared] {
        let e = b.acquire("sem", nb(mode)).await.unwrap_err();
        assert!(matches!(e, AcquireError::WouldBlock { .. }), "{e:?}");
    }
    let start = Instant::now();
    let e = b
        .acquire("sem", ex().timeout(Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert!(matches!(e, AcquireError::TimedOut { .. }), "{e:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(500) && start.elapsed() < Duration::from_secs(3)
    );
    g.release().await.unwrap();
    let rec: serde_json::Value =
        serde_json::from_str(&annotations(&cm).await[&annotation_key("sem")]).unwrap();
    assert_eq!(
        (rec["SharedHoldersCount"].as_i64(), rec["uuid"].as_str()),
        (Some(0), Some(uuid.as_str())),
        "released: the record stays, free, under its uuid"
    );

    // Shared holders overlap (Go's shared record: one UUID, a count); exclusive waits for all.
    let s1 = a.acquire("sem", AcquireOptions::shared()).await.unwrap();
    let s2 = b.acquire("sem", nb(Mode::Shared)).await.unwrap();
    let rec: serde_json::Value =
        serde_json::from_str(&annotations(&cm).await[&annotation_key("sem")]).unwrap();
    assert_eq!(
        (
            rec["IsShared"].as_bool(),
            rec["SharedHoldersCount"].as_i64()
        ),
        (Some(true), Some(2))
    );
    assert!(matches!(
        b.acquire("sem", nb(Mode::Exclusive)).await,
        Err(AcquireError::WouldBlock { .. })
    ));
    s1.release().await.unwrap();
    assert!(matches!(
        b.acquire("sem", nb(Mode::Exclusive)).await,
        Err(AcquireError::WouldBlock { .. })
    ));
    s2.release().await.unwrap();
    b.acquire("sem", nb(Mode::Exclusive))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    // Other annotations and fields were never touched.
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let obj = api.get(&cm).await.unwrap();
    assert_eq!(obj.metadata.annotations.unwrap()["example.com/keep"], "me");
    assert_eq!(obj.data.unwrap()["payload"], "untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A waiter follows the watch: each handoff takes well under Go's 2 s poll. Four handoffs, each
/// under 750 ms: a waiter polling every 2 s would pass them all about once in 50 runs.
async fn a_blocked_waiter_gets_the_lock_when_it_is_released() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let (a, b) = (locker(&cm).await, locker(&cm).await);
    let mut latencies = Vec::new();
    for _ in 0..4 {
        let g = a.acquire("handoff", ex()).await.unwrap();
        let b = b.clone();
        let waiter = tokio::spawn(async move {
            let g = b
                .acquire("handoff", ex().timeout(Duration::from_secs(20)))
                .await
                .unwrap();
            let at = Instant::now();
            g.release().await.unwrap();
            at
        });
        wait_for_queue(&cm, "handoff", 1).await; // it is waiting
        let released = Instant::now();
        g.release().await.unwrap();
        let granted = waiter.await.unwrap();
        latencies.push(elapsed_between("handoff", released, granted));
    }
    eprintln!("kubernetes handoffs: {latencies:?}");
    for latency in latencies {
        assert!(
            latency < Duration::from_millis(750),
            "a handoff took {latency:?}: waiting must follow the watch, not poll"
        );
    }
}

/// A locker's next acquisition starts from the record its last release wrote. After a release
/// that handed the lock on, that record shows the lock busy: a waiting acquisition queues on it
/// (and waits its turn), but once the grantee has released, neither a waiting nor a
/// non-blocking acquisition may take that old record for the truth: both get the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_handing_a_lock_on_a_locker_asks_again_from_what_its_release_wrote() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let (a, b) = (locker(&cm).await, locker(&cm).await);
    // Three rounds: A hands the lock to B and asks again, with a try once B released, with a
    // wait once B released, and with a wait while B holds it.
    for ask in ["try", "wait", "queue"] {
        let g = a.acquire("asked-again", ex()).await.unwrap();
        let (b, released_by_b) = (b.clone(), Arc::new(tokio::sync::Notify::new()));
        let signal = released_by_b.clone();
        let holder = tokio::spawn(async move {
            let g = b
                .acquire("asked-again", ex().timeout(Duration::from_secs(20)))
                .await
                .unwrap();
            signal.notified().await;
            g.release().await.unwrap();
        });
        wait_for_queue(&cm, "asked-again", 1).await;
        g.release().await.unwrap();
        match ask {
            // B released meanwhile: A's guess (the record handed to B) is out of date.
            "try" | "wait" => {
                released_by_b.notify_one();
                holder.await.unwrap();
                let opts = if ask == "try" {
                    nb(Mode::Exclusive)
                } else {
                    ex().timeout(Duration::from_secs(20))
                };
                let g = a
                    .acquire("asked-again", opts)
                    .await
                    .unwrap_or_else(|e| panic!("{ask} after the grantee released: {e}"));
                g.release().await.unwrap();
            }
            // B still holds it: A queues behind it, and gets it when B releases.
            _ => {
                let a = a.clone();
                let waiter = tokio::spawn(async move {
                    a.acquire("asked-again", ex().timeout(Duration::from_secs(20)))
                        .await
                        .unwrap()
                });
                wait_for_queue(&cm, "asked-again", 1).await;
                assert!(!waiter.is_finished(), "A got the lock while B held it");
                released_by_b.notify_one();
                holder.await.unwrap();
                waiter.await.unwrap().release().await.unwrap();
            }
        }
    }
}

/// A release hands the lock to the waiter first in line in the same write: the record names the
/// waiter as a holder handed the lock (`Handoff`), which the waiter's own grant never writes. A
/// grantee stopped (SIGSTOP) before it sees the grant never uses it after its deadline: the next
/// waiter takes the unrenewed grant over a TTL later, and the stopped one, continued, queues
/// again and waits its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_hands_the_lock_over_in_one_write_and_a_stopped_grantee_gives_it_up() {
    time_limit(Duration::from_secs(150));
    let cm = configmap("default").await;
    let key = annotation_key("handed");
    let record = |cm: String| {
        let key = key.clone();
        async move { serde_json::from_str::<serde_json::Value>(&annotations(&cm).await[&key]).unwrap() }
    };
    let (a, b) = (locker(&cm).await, locker(&cm).await);
    let g = a.acquire("handed", ex()).await.unwrap();
    let waiter = tokio::spawn(async move {
        b.acquire("handed", ex().timeout(Duration::from_secs(20)))
            .await
            .unwrap()
    });
    wait_for_queue(&cm, "handed", 1).await;
    g.release().await.unwrap();
    let gb = waiter.await.unwrap();
    let rec = record(cm.clone()).await;
    assert_eq!(rec["SharedHoldersCount"], 1, "{rec}");
    let handed = |rec: &serde_json::Value| {
        rec["Holders"]
            .as_object()
            .is_some_and(|h| h.len() == 1 && h.values().all(|e| e.get("Handoff").is_some()))
    };
    assert!(handed(&rec), "not handed over by the release: {rec}");

    // W (another process) queues behind B, C behind W; W is stopped; B releases.
    let url = format!("kubernetes://default/configmaps/{cm}");
    let mut w = lockgate_testenv::process::Proc::spawn(
        Command::new(rust_cli())
            .args(["exec", "--locker", &url, "-w", "90", "handed", "--"])
            .args(["sh", "-c", "echo locked"])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG")),
    );
    wait_for_queue(&cm, "handed", 1).await;
    let c = locker(&cm).await;
    let cw = tokio::spawn(async move {
        let g = c
            .acquire("handed", ex().timeout(Duration::from_secs(60)))
            .await
            .unwrap();
        (Instant::now(), g)
    });
    wait_for_queue(&cm, "handed", 2).await;
    w.signal(libc::SIGSTOP);
    let released = Instant::now();
    gb.release().await.unwrap();
    let rec = record(cm.clone()).await;
    assert!(handed(&rec), "not handed to the stopped waiter: {rec}");
    let (granted, gc) = cw.await.unwrap();
    let took = elapsed_between("takeover of a stopped grantee", released, granted);
    eprintln!("C took over the stopped grantee's lock after {took:?}");
    assert!(
        took >= Duration::from_secs(9),
        "C took the lock {took:?} after it was handed to W: before W's grant could have stood still for a TTL"
    );
    assert!(
        took <= Duration::from_secs(25),
        "took {took:?}, TTL is 10 s"
    );
    w.signal(libc::SIGCONT);
    // W wakes after its deadline: it queues again rather than run while C holds.
    wait_for_queue(&cm, "handed", 1).await;
    assert!(
        !w.has_line("locked"),
        "W ran its command while C held the lock"
    );
    gc.release().await.unwrap();
    w.line("locked", Duration::from_secs(30));
    assert_eq!(w.wait(Duration::from_secs(30)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_pending_acquire_leaves_nothing_behind() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let (a, b) = (locker(&cm).await, locker(&cm).await);
    let g = a.acquire("cancel", ex()).await.unwrap();
    let waiter = tokio::spawn(async move { b.acquire("cancel", ex()).await.map(|_| ()) });
    // It waits (its place in the queue), then it is cancelled, then it leaves the queue while
    // the lock is still held.
    wait_for_queue(&cm, "cancel", 1).await;
    assert!(!waiter.is_finished(), "still waiting");
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    wait_for_queue(&cm, "cancel", 0).await;
    g.release().await.unwrap();
    // The cancelled waiter neither takes the lock afterwards nor leaves its place in the queue
    // behind: the record stays free with nobody queued.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rec: serde_json::Value =
            serde_json::from_str(&annotations(&cm).await[&annotation_key("cancel")]).unwrap();
        let waiters = rec["QueueMembers"]
            .as_object()
            .map_or(0, |q| q.keys().filter(|k| *k != "lockgate-holder").count());
        if rec["SharedHoldersCount"] == 0 && waiters == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {rec}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.acquire("cancel", nb(Mode::Exclusive))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_with_every_grant() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    // Different holders, one after the other.
    let (a, b) = (locker(&cm).await, locker(&cm).await);
    let mut last = 0;
    for i in 0..6 {
        let l = if i % 2 == 0 { &a } else { &b };
        let g = l.acquire("fence", ex()).await.unwrap();
        let t = g.fencing_token().expect("a token");
        assert!(t > last, "holder {i}: {t} after {last}");
        last = t;
        g.release().await.unwrap();
    }

    // Shared joins: each joiner's token is its own write's, after the first holder's; the next
    // exclusive holder's comes after every one of them.
    let s1 = a.acquire("fence", AcquireOptions::shared()).await.unwrap();
    let s2 = b.acquire("fence", nb(Mode::Shared)).await.unwrap();
    let (t1, t2) = (s1.fencing_token().unwrap(), s2.fencing_token().unwrap());
    assert!(
        t1 > last && t2 > t1,
        "shared: {t1}, then the join {t2}, after {last}"
    );
    s1.release().await.unwrap();
    s2.release().await.unwrap();
    let g = a.acquire("fence", ex()).await.unwrap();
    let t3 = g.fencing_token().unwrap();
    assert!(t3 > t2, "exclusive {t3} after the shared join {t2}");
    g.release().await.unwrap();
}

/// A takeover after a crash gets a token above anything the crashed holder could have had: above
/// the object's resourceVersion after its last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_across_a_takeover_after_a_crash() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let mut holder = tokio::task::spawn_blocking(move || rust_hold(&url, &[], "fence-crash"))
        .await
        .unwrap();
    holder.kill().unwrap(); // SIGKILL: no release
    let _ = holder.wait_within(Duration::from_secs(10));
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let before: u64 = api
        .get(&cm)
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap()
        .parse()
        .unwrap();
    let l = locker(&cm).await;
    let g = l
        .acquire("fence-crash", ex().timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    let t = g.fencing_token().unwrap();
    assert!(
        t > before,
        "takeover token {t}, crashed holder's object at {before}"
    );
    g.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_on_one_object_do_not_conflict() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let l = locker(&cm).await;
    // Many locks of one object taken at once: each write is conditional on its own record only.
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let l = l.clone();
            tokio::spawn(async move {
                l.acquire(&format!("many-{i}"), nb(Mode::Exclusive))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut guards = Vec::new();
    for t in tasks {
        guards.push(t.await.unwrap());
    }
    assert_eq!(
        annotations(&cm)
            .await
            .keys()
            .filter(|k| k.starts_with("lockgate.io/"))
            .count(),
        16
    );
    for g in guards {
        g.release().await.unwrap();
    }
    // Released: every record stays, free.
    let held = annotations(&cm)
        .await
        .iter()
        .filter(|(k, _)| k.starts_with("lockgate.io/"))
        .filter(|(_, v)| {
            serde_json::from_str::<serde_json::Value>(v).unwrap()["SharedHoldersCount"] != 0
        })
        .count();
    assert_eq!(held, 0);
}

// ---------------------------------------------------------------------------------------------
// Leases

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_by_someone_else_fires_the_lost_signal() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let config = LeaseConfig {
        ttl: Duration::from_secs(6),
        renew_period: Duration::from_secs(1),
        renew_deadline: Duration::from_secs(4),
        request_timeout: Duration::from_secs(2),
    };
    let l = locker_with("default", &cm, false, config).await;
    let (tx, rx) = std::sync::mpsc::channel();
    let opts =
        ex().on_lost(move |name, reason| tx.send((name.to_owned(), reason.clone())).unwrap());
    let g = l.acquire("stolen", opts).await.unwrap();
    assert!(!g.is_lost());
    // Somebody overwrites the record with their own, from a host whose clock is 9 s behind:
    // its ExpireAtTimestamp (its clock + the 6 s TTL) is 3 s in our past.
    let thief_expiry = unix_now() - 3;
    steal(&cm, "stolen", thief_expiry).await;
    let reason = tokio::time::timeout(Duration::from_secs(5), g.lost())
        .await
        .expect("lost within a renewal");
    assert_eq!(reason, lockgate::LostReason::Taken);
    assert!(g.is_lost());
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(1)).unwrap(),
        ("stolen".to_owned(), lockgate::LostReason::Taken),
        "the on-lost hook ran"
    );
    let e = g.release().await.unwrap_err();
    assert!(matches!(e, Error::LeaseLost { .. }), "{e}");
    // The thief's record is untouched by our failed release.
    assert!(annotations(&cm).await[&annotation_key("stolen")].contains("thief"));

    // Skew immunity: the thief is a live holder on a host whose clock is 9 s behind. It renews
    // every second; each renewal's ExpireAtTimestamp (its clock + the 6 s TTL) is 3 s in our
    // past. By Go's rule the lease has always expired; by ours it is alive (it keeps changing,
    // and it is less than a TTL past its expiry by the API server's clock, so never stale).
    // Another locker asks again and again (it keeps what it saw between attempts, as a waiter
    // does) for more than a TTL: always refused.
    let thief = tokio::spawn({
        let cm = cm.clone();
        async move {
            for _ in 0..9 {
                steal(&cm, "stolen", unix_now() - 3).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    let other = locker_with("default", &cm, false, config).await;
    while !thief.is_finished() {
        let e = other
            .acquire("stolen", nb(Mode::Exclusive))
            .await
            .unwrap_err();
        assert!(
            matches!(e, AcquireError::WouldBlock { .. }),
            "the live lease of a writer whose clock is behind was taken: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    thief.await.unwrap();
    let stopped = Instant::now();
    // The thief stopped renewing: its last record goes stale 4 s after it was written (3 s +
    // the 1 s resolution of ExpireAtTimestamp), or stands still for the TTL, whichever first.
    let g = other
        .acquire("stolen", ex().timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    let took = stopped.elapsed();
    eprintln!("taken over {took:?} after the thief's last renewal");
    assert!(
        took >= Duration::from_secs(2),
        "taken over {took:?} after the last renewal: before it could be stale"
    );
    assert!(took < config.ttl + Duration::from_secs(3), "{took:?}");
    g.release().await.unwrap();
}

/// The takeover rule, as `decide.rs` applies it: a record is taken over once it has stood still
/// for a TTL on the observer's own clock, or once its `ExpireAtTimestamp` lies more than a TTL
/// in the past by the API server's clock (stale: a crashed holder, found at once by a
/// non-blocking caller) — whichever comes first. `ExpireAtTimestamp` is never trusted as it
/// stands: a record just past it (Go's "expired") is not taken at once, and one far ahead of it
/// (a writer an hour ahead) is taken after a TTL all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_stands_still_is_taken_over_after_a_ttl_of_observation() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let config = LeaseConfig::default();
    let ttl = config.ttl;
    let ttl_secs = ttl.as_secs() as i64;
    let now = unix_now();
    // A crashed writer, long ago: stale, taken at once.
    steal(&cm, "stale", 0).await;
    // Expired by Go's rule 5 s ago: stale 5 s (+1 s of resolution) from now.
    steal(&cm, "behind", now - ttl_secs / 2).await;
    // A writer an hour ahead: only the TTL of observation applies.
    steal(&cm, "ahead", now + 3600).await;

    let l = locker(&cm).await;
    let g = l.acquire("stale", nb(Mode::Exclusive)).await.unwrap();
    g.release().await.unwrap();

    // (lock, earliest, latest) takeover after it was first seen.
    let cases = [
        (
            "behind",
            Duration::from_secs(4),
            ttl + Duration::from_secs(3),
        ),
        ("ahead", ttl, ttl + Duration::from_secs(3)),
    ];
    let tasks: Vec<_> = cases
        .into_iter()
        .map(|(name, earliest, latest)| {
            let cm = cm.clone();
            tokio::spawn(async move {
                let l = locker(&cm).await;
                let first_seen = Instant::now();
                let e = l.acquire(name, nb(Mode::Exclusive)).await.unwrap_err();
                assert!(
                    matches!(e, AcquireError::WouldBlock { .. }),
                    "{name}: {e:?}"
                );
                let g = l
                    .acquire(name, ex().timeout(Duration::from_secs(30)))
                    .await
                    .unwrap();
                let took = first_seen.elapsed();
                g.release().await.unwrap();
                (name, took, earliest, latest)
            })
        })
        .collect();
    for t in tasks {
        let (name, took, earliest, latest) = t.await.unwrap();
        eprintln!("{name}: taken over {took:?} after it was first seen");
        assert!(
            took >= earliest,
            "{name}: taken over {took:?} after it was first seen, before {earliest:?}"
        );
        assert!(took < latest, "{name}: taken over only after {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_while_held() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let config = LeaseConfig {
        ttl: Duration::from_secs(4),
        renew_period: Duration::from_secs(1),
        renew_deadline: Duration::from_secs(3),
        request_timeout: Duration::from_secs(2),
    };
    let (a, b) = (
        locker_with("default", &cm, false, config).await,
        locker_with("default", &cm, false, config).await,
    );
    let g = a.acquire("renewed", ex()).await.unwrap();
    // Held for well over a TTL: renewals keep the record changing, so nobody takes it over.
    let e = b
        .acquire("renewed", ex().timeout(Duration::from_secs(9)))
        .await
        .unwrap_err();
    assert!(matches!(e, AcquireError::TimedOut { .. }), "{e:?}");
    assert!(!g.is_lost());
    g.release().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_situations_are_typed_errors() {
    time_limit(Duration::from_secs(180));
    // A missing object.
    let l = locker(&unique("missing")).await;
    let e = l.acquire("x", ex()).await.unwrap_err();
    assert!(
        matches!(&e, AcquireError::Failed(Error::ResourceMissing { resource }) if resource.starts_with("configmaps default/missing-")),
        "{e:?}"
    );

    // A missing ConfigMap created on demand.
    let name = unique("created");
    let k = KubernetesLocker::new(
        client(false).await,
        Target::configmap("default", &name),
        LeaseConfig::default(),
    )
    .unwrap()
    .create_missing(true);
    Locker::new(k)
        .acquire("x", ex())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    annotations(&name).await;

    // A corrupt record is reported and left alone.
    let cm = configmap("default").await;
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let patch = json!({"metadata": {"annotations": {annotation_key("corrupt"): "not a record"}}});
    api.patch(&cm, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let l = locker(&cm).await;
    let e = l.acquire("corrupt", ex()).await.unwrap_err();
    let AcquireError::Failed(Error::CorruptRecord { key, .. }) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(key, &annotation_key("corrupt"));
    assert_eq!(
        annotations(&cm).await[&annotation_key("corrupt")],
        "not a record"
    );

    // Full annotations.
    let big: String = "x".repeat(250 * 1024);
    let patch = json!({"metadata": {"annotations": {"example.com/big": big}}});
    api.patch(&cm, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let mut full = None;
    for i in 0..200 {
        match l
            .acquire(&format!("fill-{i}-{}", "n".repeat(900)), ex())
            .await
        {
            Ok(g) => std::mem::forget(g),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let e = full.expect("the annotations fill up");
    assert!(
        matches!(e, AcquireError::Failed(Error::AnnotationsFull { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("256 KiB"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limited_user_locks_its_object_and_is_refused_elsewhere() {
    time_limit(Duration::from_secs(120));
    let l = locker_with(
        "lockgate-limited",
        "lockgate-limited",
        true,
        LeaseConfig::default(),
    )
    .await;
    let name = unique("limited");
    let g = l.acquire(&name, ex()).await.unwrap();
    let other = locker_with(
        "lockgate-limited",
        "lockgate-limited",
        true,
        LeaseConfig::default(),
    )
    .await;
    assert!(matches!(
        other.acquire(&name, nb(Mode::Shared)).await,
        Err(AcquireError::WouldBlock { .. })
    ));
    // Waiting works through the limited user's watch permission.
    let waiter = tokio::spawn({
        let name = name.clone();
        async move {
            other
                .acquire(&name, ex().timeout(Duration::from_secs(15)))
                .await
                .map(|g| g.fencing_token())
        }
    });
    // It is waiting: its place in the queue (read as the admin).
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "lockgate-limited");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let obj = api.get("lockgate-limited").await.unwrap();
        let value = obj.metadata.annotations.unwrap_or_default()[&annotation_key(&name)].clone();
        let rec: serde_json::Value = serde_json::from_str(&value).unwrap();
        if rec["QueueMembers"]
            .as_object()
            .is_some_and(|q| q.len() == 1)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the limited waiter never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    g.release().await.unwrap();
    assert!(waiter.await.unwrap().unwrap().is_some());

    // An object in the same namespace, outside the limited user's Role.
    let cm = configmap("lockgate-limited").await;
    let l = locker_with("lockgate-limited", &cm, true, LeaseConfig::default()).await;
    let e = l.acquire("x", ex()).await.unwrap_err();
    let AcquireError::Failed(Error::Forbidden { verb, resource, .. }) = &e else {
        panic!("{e:?}")
    };
    // A fresh locker reads the object first (to learn the API server's clock).
    assert_eq!(*verb, "get");
    assert!(resource.contains(&cm), "{resource}");
    assert!(
        e.to_string()
            .starts_with("forbidden to get configmaps lockgate-limited/"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Processes

fn rust_hold(locker: &str, args: &[&str], name: &str) -> Proc {
    lockgate_testenv::hold(&rust_cli(), locker, args, name)
}

fn go_hold(locker: &str, args: &[&str], name: &str) -> Proc {
    lockgate_testenv::hold(&go_peer(), locker, args, name)
}

fn exit_code(mut cmd: Command) -> i32 {
    cmd.env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
        .stdin(Stdio::null());
    Proc::spawn(&mut cmd)
        .wait_within(Duration::from_secs(120))
        .code()
        .unwrap()
}

fn rust_try(locker: &str, args: &[&str], name: &str) -> i32 {
    lockgate_testenv::try_lock(&rust_cli(), locker, args, name)
}

fn go_try(locker: &str, args: &[&str], name: &str) -> i32 {
    lockgate_testenv::try_lock(&go_peer(), locker, args, name)
}

use lockgate_testenv::release;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_never_lose_updates() {
    time_limit(Duration::from_secs(600));
    let cm = configmap("default").await;
    let locker = format!("kubernetes://default/configmaps/{cm}");
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter");
    std::fs::write(&counter, "0").unwrap();
    let procs = 8;
    let cycles: usize = std::env::var("LOCKGATE_K8S_STRESS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    // Each process runs `lockgate exec` in a loop: read-modify-write of the counter under the lock.
    let script = format!(
        "for i in $(seq {cycles}); do {cli} --locker {locker} exec -q -w 120 counter -- sh -c 'n=$(cat {c}); echo $((n+1)) > {c}' || exit 1; done",
        cli = rust_cli().display(),
        c = counter.display()
    );
    let start = Instant::now();
    let children: Vec<Proc> = (0..procs)
        .map(|_| {
            Proc::spawn(
                Command::new("sh")
                    .args(["-c", &script])
                    .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG")),
            )
        })
        .collect();
    for mut c in children {
        let status = tokio::task::spawn_blocking(move || c.wait_within(Duration::from_secs(550)))
            .await
            .unwrap();
        assert!(status.success());
    }
    let n: usize = std::fs::read_to_string(&counter)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!(
        "{procs} processes x {cycles} cycles in {:?}",
        start.elapsed()
    );
    assert_eq!(n, procs * cycles, "lost updates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Taken over once the killed holder's last record stood still for a TTL: not before (the
/// holder renewed every 3 s until it died, so the record stood still from at most 3 s before
/// the kill), and not much after.
async fn a_killed_holders_lock_is_taken_over_within_ttl() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let mut holder = tokio::task::spawn_blocking({
        let url = url.clone();
        move || rust_hold(&url, &[], "crash")
    })
    .await
    .unwrap();
    let l = locker(&cm).await;
    assert!(matches!(
        l.acquire("crash", nb(Mode::Exclusive)).await,
        Err(AcquireError::WouldBlock { .. })
    ));
    let killed = Instant::now();
    holder.kill().unwrap(); // SIGKILL
    let _ = holder.wait_within(Duration::from_secs(10));
    let g = l
        .acquire("crash", ex().timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    let took = killed.elapsed();
    eprintln!("takeover after SIGKILL: {took:?}");
    let config = LeaseConfig::default();
    let earliest = config.ttl - config.renew_period - Duration::from_millis(500);
    assert!(
        took >= earliest,
        "took over {took:?} after the kill: before the last renewal could have stood still for a TTL"
    );
    assert!(
        took <= Duration::from_secs(12),
        "took {took:?}, TTL is 10 s"
    );
    g.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_go_exclude_each_other() {
    time_limit(Duration::from_secs(180));
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let u = url.clone();
    tokio::task::spawn_blocking(move || {
        // Go holds: Rust is refused, then gets it once Go releases.
        let go = go_hold(&u, &[], "interop");
        assert_eq!(rust_try(&u, &[], "interop"), 1);
        assert_eq!(rust_try(&u, &["-s"], "interop"), 1);
        release(go);
        assert_eq!(rust_try(&u, &[], "interop"), 0);
        // Rust holds: Go is refused.
        let rust = rust_hold(&u, &[], "interop");
        assert_eq!(go_try(&u, &[], "interop"), 1);
        assert_eq!(go_try(&u, &["-s"], "interop"), 1);
        release(rust);
        // A lock a Rust process released with nobody waiting is free for Go at once, as after
        // Go's own release (it was reserved for 4 s: PROTOCOL.md, "Go v0.2 peers").
        assert_eq!(
            go_try(&u, &[], "interop"),
            0,
            "Go found the released lock taken"
        );
        // A Rust shared request does not join a shared record Go wrote (it may be Go v0.2's
        // take-over for an exclusive request: PROTOCOL.md, "Go v0.2 peers", rule 4)...
        let go = go_hold(&u, &["-s"], "interop-shared");
        assert_eq!(rust_try(&u, &["-s"], "interop-shared"), 1);
        release(go);
        // ... while Go shared requests join Rust's.
        let rust = rust_hold(&u, &["-s"], "interop-shared");
        let go = go_hold(&u, &["-s"], "interop-shared");
        assert_eq!(go_try(&u, &[], "interop-shared"), 1);
        assert_eq!(rust_try(&u, &[], "interop-shared"), 1);
        release(go);
        assert_eq!(
            rust_try(&u, &[], "interop-shared"),
            1,
            "the Rust reader still holds"
        );
        release(rust);
        assert_eq!(
            go_try(&u, &[], "interop-shared"),
            0,
            "Go found the released lock taken"
        );
    })
    .await
    .unwrap();
}

/// Go v0.2 takes an expired shared record over for an exclusive request and keeps
/// `IsShared: true` (with a new uuid and count 1). A fresh Rust process asking for a shared lock
/// must not join it: it holds the lock exclusively. (It joined before: exit 0.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_shared_request_does_not_join_a_go_takeover() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let u = url.clone();
    tokio::task::spawn_blocking(move || {
        // A Rust shared holder dies: its record stays, shared, and stops being renewed.
        let rust = rust_hold(&u, &["-s"], "go-takeover");
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(rust.id() as i32, libc::SIGKILL) };
        drop(rust);
        // Go v0.2 waits for it to expire (by its clock) and takes it over, exclusively.
        let go = go_hold(&u, &["-w", "40"], "go-takeover");
        let api = tokio::runtime::Runtime::new().unwrap();
        let rec = api.block_on(async {
            let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
                kube::Api::namespaced(lockgate_testenv::client(false).await, "default");
            let cm = cms.get(&cm).await.unwrap();
            cm.metadata.annotations.unwrap()[&lockgate::kubernetes::annotation_key("go-takeover")]
                .clone()
        });
        assert!(
            rec.contains(r#""IsShared":true"#) && !rec.contains("Renewals"),
            "Go's take-over record: {rec}"
        );
        assert_eq!(
            rust_try(&u, &["-s"], "go-takeover"),
            1,
            "a fresh shared request joined Go's exclusive holder: {rec}"
        );
        release(go);
    })
    .await
    .unwrap();
}

/// Go waiters outside the queue (no acquirer id: all of v0.1.1, werf's v0.2.0) get a lock as
/// soon after a Rust holder's release as after a Go holder's: through the commands, on the real
/// API server, the holder's command ending half a second after the waiter's first look, so
/// that both directions meet the same phase of Go's 2 s poll. Before, a Rust release reserved
/// the record for 4 s and a Go waiter got it 3.5-5.5 s later instead of about 1.5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_waiters_get_a_lock_as_soon_after_a_rust_release_as_after_a_go_one() {
    time_limit(Duration::from_secs(300));
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    tokio::task::spawn_blocking(move || {
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        for (version, peer) in [
            ("v0.2.0", go_peer()),
            ("v0.1.1", lockgate_testenv::go_peer_v01()),
        ] {
            let handoffs = |holder: &std::path::Path, tag: &str| -> Vec<Duration> {
                let name = format!("handoff-{version}-{tag}");
                let mut waiter = Proc::spawn(
                    Command::new(&peer)
                        .args(["bench-wait", "--locker", &url, "--name", &name])
                        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped()),
                );
                let mut samples = Vec::new();
                for _ in 0..3 {
                    let holding = lockgate_testenv::hold(holder, &url, &[], &name);
                    let stdin = waiter.stdin.as_mut().unwrap();
                    writeln!(stdin, "go").unwrap();
                    stdin.flush().unwrap();
                    expect_line(&mut waiter, "waiting");
                    // Not a synchronisation: the moment of the release, the same for both.
                    std::thread::sleep(Duration::from_millis(500));
                    let released = lockgate_testenv::history::mono_ns();
                    release(holding);
                    let line = expect_line(&mut waiter, "granted ");
                    let granted: u64 = line["granted ".len()..].trim().parse().unwrap();
                    let took =
                        Duration::from_nanos(granted.checked_sub(released).unwrap_or_else(|| {
                            panic!("{name}: granted before the release: an overlap")
                        }));
                    samples.push(took);
                }
                drop(waiter.stdin.take());
                assert!(waiter.wait_within(Duration::from_secs(30)).success());
                samples
            };
            let after_go = handoffs(&peer, "go");
            let after_rust = handoffs(&rust_cli(), "rust");
            eprintln!("Go {version} waiter: after Go {after_go:?}, after Rust {after_rust:?}");
            let (go, rust) = (median(after_go), median(after_rust));
            assert!(
                rust <= go.mul_f64(1.5) + Duration::from_millis(300),
                "Go {version} waiters get a lock {rust:?} (median) after a Rust release, {go:?} \
                 after a Go one"
            );
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_waiter_gets_a_go_holders_lock_on_release() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let u = url.clone();
    let go = tokio::task::spawn_blocking(move || go_hold(&u, &[], "go-first"))
        .await
        .unwrap();
    let l = locker(&cm).await;
    let waiter = tokio::spawn(async move {
        let g = l
            .acquire("go-first", ex().timeout(Duration::from_secs(30)))
            .await
            .unwrap();
        let at = Instant::now();
        g.release().await.unwrap();
        at
    });
    wait_for_queue(&cm, "go-first", 1).await; // Go v0.2 keeps our queue entry when it renews
    let released = Instant::now();
    tokio::task::spawn_blocking(move || release(go))
        .await
        .unwrap();
    // Measured from before the Go holder was told to release: its release includes the Go
    // process finishing its command and its own release request.
    let latency = elapsed_between("handoff Go -> Rust", released, waiter.await.unwrap());
    eprintln!("handoff Go -> Rust: {latency:?}");
    assert!(latency < Duration::from_secs(2), "{latency:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_side_takes_over_the_others_expired_lease() {
    time_limit(Duration::from_secs(180));
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    // A killed Go holder: Rust takes over once the record stood still for a TTL.
    let u = url.clone();
    let mut go = tokio::task::spawn_blocking(move || go_hold(&u, &[], "expire"))
        .await
        .unwrap();
    let start = Instant::now();
    go.kill().unwrap(); // SIGKILL
    let _ = go.wait_within(Duration::from_secs(10));
    let l = locker(&cm).await;
    let g = l
        .acquire("expire", ex().timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    // Go renews every 3 s: its last record stood still from at most 3 s before the kill.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(6500),
        "took over the Go lease {took:?} after the kill: before a TTL of standing still"
    );
    assert!(took <= Duration::from_secs(12), "{took:?}");
    g.release().await.unwrap();
    // A killed Rust holder: Go takes over once the record's ExpireAtTimestamp has passed.
    let u = url.clone();
    let mut rust = tokio::task::spawn_blocking(move || rust_hold(&u, &[], "expire"))
        .await
        .unwrap();
    rust.kill().unwrap(); // SIGKILL
    let _ = rust.wait_within(Duration::from_secs(10));
    // Go takes over after ExpireAtTimestamp (it polls every 2 s).
    let u = url.clone();
    let code = tokio::task::spawn_blocking(move || {
        let mut c = Command::new(go_peer());
        c.args([
            "exec", "-q", "--locker", &u, "-w", "30", "expire", "--", "true",
        ]);
        exit_code(c)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "Go took over the expired Rust lease");
}

/// Overwrites the record of `name` on `cm` with somebody else's, as a thief would, with the
/// given `ExpireAtTimestamp`.
async fn steal(cm: &str, name: &str, expire_at: i64) {
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let record = json!({"uuid": "thief", "lockName": name, "ExpireAtTimestamp": expire_at, "SharedHoldersCount": 1, "IsShared": false, "QueueMembers": {}});
    let patch = json!({"metadata": {"annotations": {annotation_key(name): record.to_string()}}});
    api.patch(cm, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// Runs `lockgate exec` holding `name` around `script` (which prints `locked` once running),
/// steals the lease, and returns how `lockgate` exited, its output, and how long that took.
async fn exec_with_stolen_lease(
    name: &str,
    script: &str,
) -> (std::process::ExitStatus, String, String, Duration) {
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let mut holder = Proc::spawn(
        Command::new(rust_cli())
            .args(["--locker", &url, "exec", name, "--", "sh", "-c", script])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut holder = tokio::task::spawn_blocking(move || {
        expect_line(&mut holder, "locked");
        holder
    })
    .await
    .unwrap();
    steal(&cm, name, 0).await;
    let start = Instant::now();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let status = holder.wait_within(Duration::from_secs(60));
        let (mut stdout, mut stderr) = (String::new(), String::new());
        holder
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        holder
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (status, stdout, stderr, start.elapsed())
    })
    .await
    .unwrap()
}

/// `lockgate exec` whose lease is taken away: the command gets SIGTERM, `lockgate` exits 75.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_tells_the_command_when_the_lease_is_lost() {
    time_limit(Duration::from_secs(120));
    let script = "trap 'echo got-term; exit 0' TERM; echo locked; while :; do sleep 0.1; done";
    let (status, stdout, stderr, took) = exec_with_stolen_lease("lost", script).await;
    assert_eq!(status.code(), Some(75), "{stderr}");
    assert!(
        stdout.contains("got-term"),
        "the command was not told: {stdout}"
    );
    assert!(
        stderr.contains("lease of lock \"lost\" was lost"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(8), "noticed after {took:?}");
}

/// A command that ignores SIGTERM after its lease is lost is killed: it must not go on acting
/// without the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_kills_a_command_that_ignores_the_lost_lease() {
    time_limit(Duration::from_secs(120));
    let script = "trap '' TERM; echo locked; while :; do sleep 0.1; done";
    let (status, _, stderr, _) = exec_with_stolen_lease("stubborn", script).await;
    assert_eq!(status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("killing it"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Fairness

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_cannot_starve_a_queued_writer() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let (r1, w, r2) = (locker(&cm).await, locker(&cm).await, locker(&cm).await);
    let reader = r1.acquire("rw", AcquireOptions::shared()).await.unwrap();
    let writer = tokio::spawn(async move {
        let g = w
            .acquire("rw", ex().timeout(Duration::from_secs(20)))
            .await
            .unwrap();
        let at = Instant::now();
        g.release().await.unwrap();
        at
    });
    wait_for_queue(&cm, "rw", 1).await;
    // A later reader may not join the shared record while a writer waits before it.
    assert!(matches!(
        r2.acquire("rw", nb(Mode::Shared)).await,
        Err(AcquireError::WouldBlock { .. })
    ));
    let r2_task = tokio::spawn(async move {
        let g = r2
            .acquire(
                "rw",
                AcquireOptions::shared().timeout(Duration::from_secs(20)),
            )
            .await
            .unwrap();
        let at = Instant::now();
        g.release().await.unwrap();
        at
    });
    wait_for_queue(&cm, "rw", 2).await;
    reader.release().await.unwrap();
    let (w_at, r2_at) = (writer.await.unwrap(), r2_task.await.unwrap());
    assert!(w_at < r2_at, "the writer came first");
    let rec: serde_json::Value =
        serde_json::from_str(&annotations(&cm).await[&annotation_key("rw")]).unwrap();
    assert_eq!(rec["SharedHoldersCount"], 0, "nothing left behind: {rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_arrival_order() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let holder = locker(&cm).await;
    let g = holder.acquire("fifo", ex()).await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let l = locker(&cm).await;
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let g = l
                .acquire("fifo", ex().timeout(Duration::from_secs(30)))
                .await
                .unwrap();
            order.lock().unwrap().push(i);
            g.release().await.unwrap();
        }));
        // Each waiter is queued before the next one arrives.
        wait_for_queue(&cm, "fifo", i + 1).await;
    }
    g.release().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gives_up_leaves_the_queue() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let (a, b, c) = (locker(&cm).await, locker(&cm).await, locker(&cm).await);
    let g = a.acquire("leave", ex()).await.unwrap();
    // It waits (its queue entry), times out, and leaves.
    let timed = tokio::spawn(async move {
        b.acquire("leave", ex().timeout(Duration::from_secs(3)))
            .await
            .map(|_| ())
    });
    wait_for_queue(&cm, "leave", 1).await;
    let e = timed.await.unwrap().unwrap_err();
    assert!(matches!(e, AcquireError::TimedOut { .. }));
    wait_for_queue(&cm, "leave", 0).await;
    let waiter = tokio::spawn(async move {
        c.acquire("leave", ex().timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        Instant::now()
    });
    wait_for_queue(&cm, "leave", 1).await;
    let released = Instant::now();
    g.release().await.unwrap();
    let took = elapsed_between("handoff", released, waiter.await.unwrap());
    assert!(
        took < Duration::from_secs(1),
        "the departed waiter held up the next one: {took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Any resource, and the blocking API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_resource_namespaced_or_cluster_scoped_holds_locks() {
    time_limit(Duration::from_secs(120));
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::Namespace;
    let c = client(false).await;
    let lease = unique("lease");
    Api::<Lease>::namespaced(c.clone(), "default")
        .create(
            &PostParams::default(),
            &Lease {
                metadata: ObjectMeta {
                    name: Some(lease.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let ns = unique("ns");
    Api::<Namespace>::all(c.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for (resource, namespace, name) in [
        (
            "leases.coordination.k8s.io",
            Some("default"),
            lease.as_str(),
        ),
        (
            "leases.v1.coordination.k8s.io",
            Some("default"),
            lease.as_str(),
        ),
        ("namespaces", None, ns.as_str()),
    ] {
        let target = Target::discover(&c, resource, namespace.map(Into::into), name)
            .await
            .unwrap();
        let (a, b) = (
            Locker::new(
                KubernetesLocker::new(c.clone(), target.clone(), LeaseConfig::default()).unwrap(),
            ),
            Locker::new(
                KubernetesLocker::new(client(false).await, target, LeaseConfig::default()).unwrap(),
            ),
        );
        let g = a.acquire("any", ex()).await.unwrap();
        assert!(
            matches!(
                b.acquire("any", nb(Mode::Exclusive)).await,
                Err(AcquireError::WouldBlock { .. })
            ),
            "{resource}"
        );
        g.release().await.unwrap();
        b.acquire("any", nb(Mode::Exclusive))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    // Through the CLI: a cluster-scoped object has an empty namespace.
    let url = format!("kubernetes:///namespaces/{ns}");
    let code = tokio::task::spawn_blocking(move || rust_try(&url, &[], "cli"))
        .await
        .unwrap();
    assert_eq!(code, 0);
    // Wrong scope, unknown resource: usage errors that say why.
    let e = Target::discover(&c, "namespaces", Some("default".into()), &ns)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cluster-scoped"), "{e}");
    let e = Target::discover(&c, "leases.coordination.k8s.io", None, &lease)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("namespaced"), "{e}");
    let e = Target::discover(
        &c,
        "widgets.v1alpha1.example.com",
        Some("default".into()),
        "w",
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::UnknownResource { .. }), "{e}");
}

/// The blocking API, from a program with no async runtime of its own.
#[test]
fn the_blocking_api_works_without_a_runtime() {
    time_limit(Duration::from_secs(120));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cm = rt.block_on(configmap("default"));
    let connect = || {
        // connect_blocking configures its client as kubectl does: from $KUBECONFIG (the admin's).
        required_env("KUBECONFIG");
        Locker::new(
            KubernetesLocker::connect_blocking(
                None,
                "configmaps",
                Some("default".into()),
                &cm,
                LeaseConfig::default(),
            )
            .unwrap(),
        )
    };
    let (a, b) = (connect(), connect());
    let g = a.acquire_blocking("blocking", ex()).unwrap();
    assert!(matches!(
        b.acquire_blocking("blocking", nb(Mode::Exclusive)),
        Err(AcquireError::WouldBlock { .. })
    ));
    let waiter = std::thread::spawn(move || {
        b.acquire_blocking("blocking", ex().timeout(Duration::from_secs(20)))
            .map(|g| g.release_blocking())
    });
    rt.block_on(wait_for_queue(&cm, "blocking", 1)); // it waits
    g.release_blocking().unwrap();
    waiter.join().unwrap().unwrap().unwrap();
    drop(a);
}

// ---------------------------------------------------------------------------------------------
// Who holds it

/// Holders are recorded with host, pid, user, since and a description, shown to waiters and by
/// `status`, for each shared holder; Go lockgate (v0.1.1 and v0.2.0) reads, joins, renews and
/// releases such records, and a record Go rewrote without them still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_are_recorded_shown_and_kept_compatible() {
    let cm = configmap("default").await;
    let k = KubernetesLocker::new(
        client(false).await,
        Target::configmap("default", &cm),
        LeaseConfig::default(),
    )
    .unwrap();
    let a = Locker::new(k.clone());
    let b = locker(&cm).await;
    let g1 = a
        .acquire(
            "who",
            AcquireOptions::shared().description("helm upgrade web"),
        )
        .await
        .unwrap();
    let g2 = b
        .acquire(
            "who",
            AcquireOptions::shared().description("helm upgrade api"),
        )
        .await
        .unwrap();
    // A waiter is told who holds it.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let e = b
        .acquire(
            "who",
            ex().timeout(Duration::from_millis(300))
                .on_wait(move |info| {
                    s.lock().unwrap().extend(info.holders.iter().cloned());
                }),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, AcquireError::TimedOut { .. }), "{e}");
    let holders = seen.lock().unwrap().clone();
    assert_eq!(holders.len(), 2, "{holders:?}");
    let mut descriptions: Vec<_> = holders
        .iter()
        .filter_map(|h| h.description.clone())
        .collect();
    descriptions.sort();
    assert_eq!(descriptions, ["helm upgrade api", "helm upgrade web"]);
    for h in &holders {
        assert_eq!(h.pid, Some(std::process::id()));
        assert!(h.host.as_deref().is_some_and(|s| !s.is_empty()), "{h:?}");
        assert!(h.user.is_some() && h.since.is_some(), "{h:?}");
        let shown = h.to_string();
        assert!(shown.contains("(helm upgrade "), "{shown}");
    }
    // status shows them too.
    let status = k.status().await.unwrap();
    let rec = status
        .iter()
        .find(|r| r.name.as_deref() == Some("who"))
        .unwrap();
    assert_eq!((rec.count, rec.holders.len()), (2, 2));
    // Go joins (rewriting the record without our fields), renews, leaves; we leave cleanly.
    let url = format!("kubernetes://default/configmaps/{cm}");
    for peer in [lockgate_testenv::go_peer(), lockgate_testenv::go_peer_v01()] {
        let u = url.clone();
        let code = tokio::task::spawn_blocking(move || {
            Command::new(peer)
                .args([
                    "exec", "--locker", &u, "-s", "-n", "who", "--", "sleep", "4",
                ])
                .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
                .status()
                .unwrap()
                .code()
        })
        .await
        .unwrap();
        assert_eq!(code, Some(0), "Go could not join, renew and release");
    }
    assert!(!g1.is_lost() && !g2.is_lost());
    g1.release().await.unwrap();
    g2.release().await.unwrap();
    let rec: serde_json::Value =
        serde_json::from_str(&annotations(&cm).await[&annotation_key("who")]).unwrap();
    assert_eq!(rec["SharedHoldersCount"], 0, "{rec}");
}
