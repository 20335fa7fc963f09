//! `lockgate serve --store kubernetes://…` under a flood (issue 18, item 7): the store ignored
//! `--max-held` and `--max-waiters`, and records and queue entries nobody needed any more
//! stayed in the shared object until its annotations (256 KiB) were full, breaking every
//! participant, Go processes included.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockgate_testenv::process::{serve, Proc};
use lockgate_testenv::raw_http::{once, request, Answer};
use lockgate_testenv::{annotations, go_peer, queue_len, required_env, rust_cli, time_limit};
use serde_json::{json, Value};

async fn object() -> (String, String) {
    let cm = lockgate_testenv::configmap("default").await;
    (format!("kubernetes://default/configmaps/{cm}"), cm)
}

fn acquire_req(name: &str, opts: Value) -> Vec<u8> {
    request(
        "POST",
        "/acquire",
        &[],
        &json!({"lockName": name, "opts": opts}).to_string(),
    )
}

async fn call(addr: &str, bytes: &[u8]) -> Answer {
    once(addr, bytes)
        .await
        .unwrap_or_else(|| panic!("no answer from {addr}"))
}

/// `PROGRAM exec --locker LOCKER -n NAME -- true`: 0 acquired, 1 busy.
fn try_lock(program: &std::path::Path, locker: &str, name: &str) -> i32 {
    let mut p = Proc::spawn(
        Command::new(program)
            .args(["exec", "--locker", locker, "-q", "-n", name, "--", "true"])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG")),
    );
    p.wait(Duration::from_secs(60))
}

fn annotation_bytes(a: &std::collections::BTreeMap<String, String>) -> usize {
    a.iter().map(|(k, v)| k.len() + v.len()).sum()
}

fn lock_records(a: &std::collections::BTreeMap<String, String>) -> usize {
    a.keys().filter(|k| k.starts_with("lockgate.io/")).count()
}

/// Item 7: the caps apply to the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caps_on_held_leases_and_waiters_apply_to_the_kubernetes_store() {
    time_limit(Duration::from_secs(120));
    let (store, _cm) = object().await;
    let (_server, addr) = serve(
        &rust_cli(),
        &["--store", &store, "--max-held", "3", "--max-waiters", "2"],
    );
    for i in 0..3 {
        let a = call(&addr, &acquire_req(&format!("held-{i}"), json!({}))).await;
        assert_eq!(a.json()["err"], "", "{}", a.json());
        assert!(a.json()["fencingToken"].as_u64() > Some(0), "{}", a.json());
    }
    let a = call(&addr, &acquire_req("held-3", json!({"waitMs": 1000}))).await;
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (503, Some("capacity")),
        "{}",
        a.json()
    );
    // Go's client is told to wait.
    let a = call(&addr, &acquire_req("held-3", json!({}))).await;
    assert_eq!(
        (a.status, a.json()["err"].as_str()),
        (200, Some("should wait"))
    );

    let (store, _cm) = object().await;
    let (_server, addr) = serve(&rust_cli(), &["--store", &store, "--max-waiters", "2"]);
    assert_eq!(
        call(&addr, &acquire_req("busy", json!({}))).await.json()["err"],
        ""
    );
    for i in 0..2 {
        let a = call(
            &addr,
            &acquire_req("busy", json!({"acquirerId": format!("p-{i}")})),
        )
        .await;
        assert_eq!(a.json()["err"], "should wait");
    }
    let a = call(
        &addr,
        &acquire_req("busy", json!({"acquirerId": "p-2", "waitMs": 1000})),
    )
    .await;
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (503, Some("capacity")),
        "{}",
        a.json()
    );
}

/// Item 7: a flood of distinct names taken and abandoned while held, and pollers that never
/// come back, through one server: the server stops writing new records before the object is
/// full, Rust and Go lockers on the object keep working, and what nobody needs is removed
/// afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_names_leaves_the_object_usable() {
    time_limit(Duration::from_secs(400));
    let (store, cm) = object().await;
    let (_server, addr) = serve(&rust_cli(), &["--store", &store]);
    // A lock held through the server all along (renewed by the test): pollers flood its queue.
    let hot = call(&addr, &acquire_req("hot", json!({}))).await.json();
    assert_eq!(hot["err"], "", "{hot}");
    let renew = request(
        "POST",
        "/renew-lease",
        &[],
        &json!({"lockHandle": hot["lockHandle"]}).to_string(),
    );
    let renewer = {
        let addr = addr.clone();
        tokio::spawn(async move {
            loop {
                // A renewal the busy API server does not confirm is tried again 2 s later.
                let _ = once(&addr, &renew).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };

    let granted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (addr, granted, refused) = (addr.clone(), granted.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            for i in (t..600).step_by(4) {
                // Taken and abandoned: nobody renews or releases it.
                let a = call(&addr, &acquire_req(&format!("flood-{i:05}"), json!({}))).await;
                let v = a.json();
                match (a.status, v["err"].as_str()) {
                    (200, Some("")) => {
                        granted.fetch_add(1, Ordering::Relaxed);
                        assert!(v["fencingToken"].as_u64() > Some(0), "{v}");
                    }
                    // Go's request: over a cap it is told to wait.
                    (200, Some("should wait")) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("flood-{i}: {other:?} {v}"),
                }
                if i % 50 == 0 {
                    let p = acquire_req("hot", json!({"acquirerId": format!("gone-{i}")}));
                    let a = call(&addr, &p).await;
                    assert_eq!(a.status, 200, "{}", a.json());
                }
            }
        }));
    }
    // The object's size, sampled while the flood runs.
    let sampler = {
        let (cm, flooding) = (cm.clone(), flooding.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while flooding.load(Ordering::Relaxed) {
                most = most.max(annotation_bytes(&annotations(&cm).await));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            most
        })
    };
    // Rust lockers on the same object keep working during the flood.
    let url = store.clone();
    let lockers = tokio::task::spawn_blocking(move || {
        let mut failures = Vec::new();
        for i in 0..3 {
            let rust = try_lock(&rust_cli(), &url, &format!("rust-{i}"));
            if rust != 0 {
                failures.push((i, rust));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        failures
    });
    for t in tasks {
        t.await.unwrap();
    }
    flooding.store(false, Ordering::Relaxed);
    let most = sampler.await.unwrap();
    assert_eq!(
        lockers.await.unwrap(),
        vec![],
        "Rust lockers failed during the flood"
    );
    let (granted, refused) = (
        granted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    eprintln!("flood: {granted} granted, {refused} refused; at most {most} bytes of annotations");
    assert!(
        refused > 0,
        "the server never refused: the object did not fill up?"
    );
    // The server's share (128 KiB), what it may add between two reads of the object, and the
    // few records of the lockers: far from Kubernetes' 256 KiB.
    assert!(most < 192 * 1024, "{most} bytes of annotations");
    // Go's lockers write the whole object conditionally on its version (any other write in
    // between fails them; they try again a second later): once the flood is over, they work.
    assert_eq!(try_lock(&go_peer(), &store, "after"), 0);
    assert_eq!(try_lock(&rust_cli(), &store, "after"), 0);

    // Abandoned leases, idle for 30 s past their expiry, and the pollers' lapsed places are
    // removed.
    let start = Instant::now();
    loop {
        let a = annotations(&cm).await;
        let (records, queued) = (lock_records(&a), queue_len(&cm, "hot").await);
        if records <= 8 && queued == 0 {
            eprintln!("cleaned up {:?} after the flood", start.elapsed());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(150),
            "{records} lock records and {queued} queue entries of \"hot\" left"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    renewer.abort();
    // The server serves on, also the names it refused.
    let a = call(&addr, &acquire_req("flood-00599", json!({}))).await;
    assert_eq!(a.json()["err"], "", "{}", a.json());
}
