//! `testenv/kube restart-apiserver` restarts kube-apiserver while etcd keeps the data. In a test
//! binary of its own: the API server is down for a few seconds, which other tests must not see.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use lockgate::kubernetes::{KubernetesLocker, LeaseConfig, Target};
use lockgate::{AcquireOptions, Locker};
use lockgate_testenv::{client, configmap, required_env};

/// One test, so that the restarts of the API server do not overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_restart_loses_nothing() {
    restarting_the_api_server_keeps_objects().await;
    a_restart_mid_run_loses_no_lock().await;
}

async fn restart() {
    let status = tokio::process::Command::new(required_env("LOCKGATE_TESTENV"))
        .arg("restart-apiserver")
        .status()
        .await
        .unwrap();
    assert!(status.success(), "restart-apiserver failed");
}

/// A holder keeps its lock through a restart (its lease outlasts it), and a waiter blocked
/// across the restart gets the lock once the holder releases: the watch reconnects.
async fn a_restart_mid_run_loses_no_lock() {
    let name = configmap("default").await;
    // A lease that outlasts a restart (a few seconds here).
    let config = LeaseConfig {
        ttl: Duration::from_secs(30),
        renew_period: Duration::from_secs(2),
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
            AcquireOptions::exclusive().timeout(Duration::from_secs(60)),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    restart().await;
    // Renewals resume; the lease was never lost.
    tokio::time::sleep(Duration::from_secs(3)).await;
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
