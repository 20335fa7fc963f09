//! `testenv/kube restart-apiserver` restarts kube-apiserver while etcd keeps the data. In a test
//! binary of its own: the API server is down for a few seconds, which other tests must not see.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use lockgate::kubernetes::{KubernetesLocker, LeaseConfig, Target};
use lockgate::{AcquireOptions, Locker};
use lockgate_testenv::{client, configmap, record, required_env, time_limit, wait_for_queue};

/// One test, so that the restarts of the API server do not overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_restart_loses_nothing() {
    time_limit(Duration::from_secs(300));
    restarting_the_api_server_keeps_objects().await;
    a_restart_mid_run_loses_no_lock().await;
}

/// Restarts the API server; returns how long it was away.
async fn restart() -> Duration {
    let start = Instant::now();
    let status = tokio::process::Command::new(required_env("LOCKGATE_TESTENV"))
        .arg("restart-apiserver")
        .status()
        .await
        .unwrap();
    assert!(status.success(), "restart-apiserver failed");
    start.elapsed()
}

/// A holder keeps its lock through a restart (its lease outlasts it) and goes on renewing after
/// it; a waiter blocked across the restart gets the lock once the holder releases: the watch
/// reconnects.
///
/// A renewer that died in the outage would go unnoticed by `is_lost` until its renewal deadline,
/// so the test looks for it twice: the record must keep changing right after the restart (every
/// renewal changes it), and the lease must still be held once a whole renewal deadline has
/// passed since the outage began (a dead renewer is declared lost by then).
async fn a_restart_mid_run_loses_no_lock() {
    let name = configmap("default").await;
    // A lease that outlasts a restart (5 s here unloaded, 60 s at the very most).
    let config = LeaseConfig {
        ttl: Duration::from_secs(30),
        renew_period: Duration::from_secs(1),
        renew_deadline: Duration::from_secs(25),
        request_timeout: Duration::from_secs(2),
    };
    let target = Target::configmap("default", &name);
    let a =
        Locker::new(KubernetesLocker::new(client(false).await, target.clone(), config).unwrap());
    let b = Locker::new(KubernetesLocker::new(client(false).await, target, config).unwrap());
    let g = a
        .acquire("through-restart", AcquireOptions::exclusive())
        .await
        .unwrap();
    let waiter = tokio::spawn(async move {
        b.acquire(
            "through-restart",
            AcquireOptions::exclusive().timeout(Duration::from_secs(120)),
        )
        .await
    });
    wait_for_queue(&name, "through-restart", 1).await; // it waits
    let outage_began = Instant::now();
    let outage = restart().await;
    assert!(
        outage < config.renew_deadline - Duration::from_secs(5),
        "the restart took {outage:?}: too long for a lease with a renewal deadline of {:?} to \
         survive it on this machine",
        config.renew_deadline
    );

    // Renewals resume: the lease part of the record changes again and again (each renewal bumps
    // its `Renewals`; the waiter's refreshes change only the queue).
    let mut renewals = std::collections::BTreeSet::new();
    let watch_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < watch_until {
        let r = record(&name, "through-restart").await.expect("the record");
        renewals.insert(r["Renewals"].as_u64().expect("a Renewals count"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        renewals.len() >= 3,
        "the holder renewed {} times in 8 s after the restart (every 1 s expected): the renewer \
         is dead",
        renewals.len().saturating_sub(1)
    );
    // Still held a whole renewal deadline after the outage began.
    let settled = outage_began + config.renew_deadline + Duration::from_secs(1);
    tokio::time::sleep_until(settled.into()).await;
    assert!(!g.is_lost(), "the lease was lost across the restart");
    assert!(!waiter.is_finished(), "the waiter must still wait");
    g.release().await.expect("release after the restart");
    let got = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("the waiter got the lock")
        .unwrap();
    got.expect("acquired after the restart")
        .release()
        .await
        .unwrap();
}

async fn restarting_the_api_server_keeps_objects() {
    let name = configmap("default").await;
    restart().await;
    // The script returns once /readyz answers 200; a new client sees the object.
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let got = api
        .get(&name)
        .await
        .expect("the object survived the restart");
    assert_eq!(got.data.unwrap()["payload"], "untouched");
}
