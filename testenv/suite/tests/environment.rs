//! Self-checks of the test environment: the real API server behaves as the Kubernetes locker
//! will rely on, the limited user is really limited, and the fault tools (toxiproxy proxies,
//! faketime) do what the fault tests rely on.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use lockgate_testenv::proxy::Proxy;
use lockgate_testenv::{client, unique};
use serde_json::json;

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

async fn create_cm(api: &Api<ConfigMap>, name: &str) -> ConfigMap {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &cm)
        .await
        .expect("create ConfigMap")
}

#[tokio::test]
async fn the_api_server_is_a_real_kubernetes_1_37() {
    let c = client(false).await;
    let v = c.apiserver_version().await.expect("GET /version");
    assert_eq!(v.major, "1");
    assert!(v.git_version.starts_with("v1.37."), "{}", v.git_version);
}

#[tokio::test]
async fn a_stale_resource_version_gets_409() {
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let name = unique("rv");
    let cm = create_cm(&api, &name).await;
    let rv = cm.metadata.resource_version.clone().unwrap();
    let patch = |rv: &str, v: &str| {
        Patch::Merge(
            json!({"metadata": {"resourceVersion": rv, "annotations": {"lockgate.io/test": v}}}),
        )
    };
    let updated = api
        .patch(&name, &PatchParams::default(), &patch(&rv, "1"))
        .await
        .expect("fresh rv accepted");
    assert_ne!(
        updated.metadata.resource_version.as_deref(),
        Some(rv.as_str())
    );
    let e = api
        .patch(&name, &PatchParams::default(), &patch(&rv, "2"))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), Some(409), "{e}");
    // Comparable resource versions (GA in 1.35): a later write has a larger one.
    let a: u64 = rv.parse().expect("numeric resourceVersion");
    let b: u64 = updated.metadata.resource_version.unwrap().parse().unwrap();
    assert!(b > a);
}

#[tokio::test]
async fn a_failed_json_patch_test_is_rejected_and_changes_nothing() {
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let name = unique("jp");
    create_cm(&api, &name).await;
    let ops: serde_json::Value = json!([
        {"op": "add", "path": "/metadata/annotations", "value": {"lockgate.io/x": "a"}},
    ]);
    let p: Patch<()> = Patch::Json(serde_json::from_value(ops).unwrap());
    api.patch(&name, &PatchParams::default(), &p)
        .await
        .expect("add");
    let ops = json!([
        {"op": "test", "path": "/metadata/annotations/lockgate.io~1x", "value": "not-a"},
        {"op": "replace", "path": "/metadata/annotations/lockgate.io~1x", "value": "b"},
    ]);
    let p: Patch<()> = Patch::Json(serde_json::from_value(ops).unwrap());
    let e = api
        .patch(&name, &PatchParams::default(), &p)
        .await
        .unwrap_err();
    let code = api_code(&e);
    assert!(
        matches!(code, Some(409) | Some(422)),
        "a failed test op answered {e}"
    );
    let cm = api.get(&name).await.unwrap();
    assert_eq!(cm.metadata.annotations.unwrap()["lockgate.io/x"], "a");
}

#[tokio::test]
async fn a_watch_sees_changes_of_one_object() {
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let name = unique("watch");
    let cm = create_cm(&api, &name).await;
    let rv = cm.metadata.resource_version.unwrap();
    let wp = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(30);
    let mut stream = api.watch(&wp, &rv).await.expect("watch").boxed();
    let patch = Patch::Merge(json!({"metadata": {"annotations": {"lockgate.io/w": "1"}}}));
    api.patch(&name, &PatchParams::default(), &patch)
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
        .await
        .expect("an event within 10 s")
        .expect("watch stream")
        .expect("not ended");
    match ev {
        WatchEvent::Modified(cm) => {
            assert_eq!(cm.metadata.annotations.unwrap()["lockgate.io/w"], "1")
        }
        other => panic!("expected Modified, got {other:?}"),
    }
}

#[tokio::test]
async fn the_limited_user_is_limited_to_its_configmap() {
    let limited: Api<ConfigMap> = Api::namespaced(client(true).await, "lockgate-limited");
    let admin: Api<ConfigMap> = Api::namespaced(client(false).await, "lockgate-limited");
    let other = unique("other");
    create_cm(&admin, &other).await;

    limited
        .get("lockgate-limited")
        .await
        .expect("get its ConfigMap");
    let patch = Patch::Merge(json!({"metadata": {"annotations": {"lockgate.io/limited": "ok"}}}));
    limited
        .patch("lockgate-limited", &PatchParams::default(), &patch)
        .await
        .expect("patch its ConfigMap");

    let e = limited.get(&other).await.unwrap_err();
    assert_eq!(api_code(&e), Some(403), "{e}");
    let e = limited
        .patch(&other, &PatchParams::default(), &patch)
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), Some(403), "{e}");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(unique("new")),
            ..Default::default()
        },
        ..Default::default()
    };
    let e = limited
        .create(&PostParams::default(), &cm)
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), Some(403), "{e}");
    let elsewhere: Api<ConfigMap> = Api::namespaced(client(true).await, "default");
    let e = elsewhere.get("anything").await.unwrap_err();
    assert_eq!(api_code(&e), Some(403), "{e}");
}

// ---- Environment checks of the fault tools: the toxiproxy proxies and faketime. ----

/// A new ConfigMap in `default` (through the admin client, not a proxy), for the proxy checks.
async fn proxy_check_cm(admin: &Api<ConfigMap>) -> String {
    let name = unique("proxy");
    create_cm(admin, &name).await;
    name
}

/// A request that must not finish within `within`: the proxy holds it.
async fn assert_hangs<T: std::fmt::Debug>(
    within: Duration,
    what: &str,
    request: impl std::future::Future<Output = T>,
) {
    if let Ok(answer) = tokio::time::timeout(within, request).await {
        panic!("{what}: expected no answer within {within:?}, got {answer:?}");
    }
}

#[tokio::test]
async fn environment_proxy_passes_requests_with_verified_tls() {
    let proxy = Proxy::new().await;
    let admin: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let name = proxy_check_cm(&admin).await;
    let through: Api<ConfigMap> = Api::namespaced(proxy.client().await, "default");
    let cm = tokio::time::timeout(Duration::from_secs(10), through.get(&name))
        .await
        .expect("a GET through the proxy answers")
        .expect("GET through the proxy");
    assert_eq!(cm.metadata.name.as_deref(), Some(name.as_str()));
    // The kubeconfig for child processes really goes through the proxy.
    let text = std::fs::read_to_string(proxy.kubeconfig()).unwrap();
    assert!(
        text.contains(&format!("https://{}", proxy.addr())),
        "{text}"
    );
    assert_ne!(
        proxy.addr(),
        lockgate_testenv::required_env("LOCKGATE_TEST_APISERVER")
    );
}

#[tokio::test]
async fn environment_precreated_proxies_reach_the_api_server_with_verified_tls() {
    let admin =
        std::path::PathBuf::from(lockgate_testenv::required_env("LOCKGATE_TEST_KUBECONFIG"));
    for n in 0..4 {
        let path = admin.with_file_name(format!("proxy-{n}.kubeconfig"));
        let kubeconfig = kube::config::Kubeconfig::read_from(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        assert_ne!(
            config.cluster_url.authority().unwrap().as_str(),
            lockgate_testenv::required_env("LOCKGATE_TEST_APISERVER"),
            "{} must point at its proxy",
            path.display()
        );
        let c = lockgate::kubernetes::client_from_config(config, Duration::from_secs(10)).unwrap();
        let v = tokio::time::timeout(Duration::from_secs(10), c.apiserver_version())
            .await
            .unwrap_or_else(|_| panic!("{}: no answer", path.display()))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(v.git_version.starts_with("v1.37."), "{}", v.git_version);
    }
}

#[tokio::test]
async fn environment_proxy_lose_replies_applies_the_request_and_loses_the_reply() {
    let proxy = Proxy::new().await;
    let admin: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let name = proxy_check_cm(&admin).await;
    let through: Api<ConfigMap> = Api::namespaced(proxy.client().await, "default");
    // Open the connection the PATCH will use: a new one could not finish its TLS handshake.
    through.get(&name).await.expect("GET through the proxy");

    proxy.lose_replies().await;
    let ops = json!([
        {"op": "add", "path": "/metadata/annotations", "value": {"lockgate.io/lost-reply": "applied"}},
    ]);
    let patch: Patch<()> = Patch::Json(serde_json::from_value(ops).unwrap());
    assert_hangs(
        Duration::from_secs(3),
        "a PATCH whose reply is lost",
        through.patch(&name, &PatchParams::default(), &patch),
    )
    .await;

    // The API server applied it all the same.
    let cm = admin
        .get(&name)
        .await
        .expect("GET through the admin client");
    assert_eq!(
        cm.metadata
            .annotations
            .unwrap_or_default()
            .get("lockgate.io/lost-reply")
            .map(String::as_str),
        Some("applied"),
        "the PATCH must have reached the API server"
    );

    // A new connection cannot finish its TLS handshake: its request is never sent.
    let fresh: Api<ConfigMap> = Api::namespaced(proxy.client().await, "default");
    let ops = json!([
        {"op": "replace", "path": "/metadata/annotations/lockgate.io~1lost-reply", "value": "again"},
    ]);
    let patch: Patch<()> = Patch::Json(serde_json::from_value(ops).unwrap());
    assert_hangs(
        Duration::from_secs(2),
        "a PATCH on a new connection",
        fresh.patch(&name, &PatchParams::default(), &patch),
    )
    .await;
    let cm = admin
        .get(&name)
        .await
        .expect("GET through the admin client");
    assert_eq!(
        cm.metadata.annotations.unwrap_or_default()["lockgate.io/lost-reply"],
        "applied",
        "a request on a new connection must not reach the API server"
    );
}

#[tokio::test]
async fn environment_proxy_black_hole_makes_requests_hang() {
    let proxy = Proxy::new().await;
    let admin: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let name = proxy_check_cm(&admin).await;
    let through: Api<ConfigMap> = Api::namespaced(proxy.client().await, "default");
    through.get(&name).await.expect("GET through the proxy");

    proxy.black_hole().await;
    assert_hangs(
        Duration::from_secs(2),
        "a GET on an open connection",
        through.get(&name),
    )
    .await;
    let fresh: Api<ConfigMap> = Api::namespaced(proxy.client().await, "default");
    assert_hangs(
        Duration::from_secs(2),
        "a GET on a new connection",
        fresh.get(&name),
    )
    .await;

    proxy.pass().await;
    let fresh: Api<ConfigMap> = Api::namespaced(proxy.client().await, "default");
    tokio::time::timeout(Duration::from_secs(10), fresh.get(&name))
        .await
        .expect("a GET answers again after pass()")
        .expect("GET after pass()");
}

#[tokio::test]
async fn environment_proxy_reset_fails_requests_fast() {
    let proxy = Proxy::new().await;
    let admin: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let name = proxy_check_cm(&admin).await;
    let through: Api<ConfigMap> = Api::namespaced(proxy.client().await, "default");
    through.get(&name).await.expect("GET through the proxy");

    proxy.reset().await;
    for (what, api) in [
        ("an open connection", through),
        (
            "a new connection",
            Api::namespaced(proxy.client().await, "default"),
        ),
    ] {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), api.get(&name))
            .await
            .unwrap_or_else(|_| panic!("a GET on {what} must fail fast, it hung"));
        let e = answer.expect_err("a GET through a resetting proxy must fail");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a GET on {what} took {:?} to fail ({e})",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn environment_proxy_cut_refuses_connections_and_restore_accepts_them() {
    let proxy = Proxy::new().await;
    let admin: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let name = proxy_check_cm(&admin).await;
    let through: Api<ConfigMap> = Api::namespaced(proxy.client().await, "default");
    through.get(&name).await.expect("GET through the proxy");

    proxy.cut().await;
    let e = tokio::net::TcpStream::connect(proxy.addr())
        .await
        .expect_err("a cut proxy must refuse connections");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    // The open connection was closed: the request fails rather than hangs.
    tokio::time::timeout(Duration::from_secs(5), through.get(&name))
        .await
        .expect("a GET through a cut proxy must fail fast, it hung")
        .expect_err("a GET through a cut proxy must fail");

    proxy.restore().await;
    let fresh: Api<ConfigMap> = Api::namespaced(proxy.client().await, "default");
    tokio::time::timeout(Duration::from_secs(10), fresh.get(&name))
        .await
        .expect("a GET answers again after restore()")
        .expect("GET after restore()");
}

#[tokio::test]
async fn environment_proxy_latency_delays_replies() {
    let proxy = Proxy::new().await;
    let admin: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let name = proxy_check_cm(&admin).await;
    let through: Api<ConfigMap> = Api::namespaced(proxy.client().await, "default");
    through.get(&name).await.expect("GET through the proxy");

    proxy.latency(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), through.get(&name))
        .await
        .expect("a delayed GET still answers")
        .expect("a delayed GET");
    let delayed = started.elapsed();
    assert!(
        delayed >= Duration::from_millis(500),
        "the GET took only {delayed:?}"
    );

    proxy.pass().await;
    let started = std::time::Instant::now();
    through.get(&name).await.expect("GET after pass()");
    let plain = started.elapsed();
    assert!(
        plain < Duration::from_millis(500),
        "without latency the GET took {plain:?}"
    );
}

#[test]
fn environment_faketime_shifts_the_wall_clock_of_a_child() {
    let date = |faketime: bool| -> i64 {
        let mut cmd = if faketime {
            let mut c = std::process::Command::new("faketime");
            c.args(["-f", "-10m", "date", "+%s"]);
            c
        } else {
            let mut c = std::process::Command::new("date");
            c.arg("+%s");
            c
        };
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run {cmd:?}: {e} (testenv/build.sh faketime installs it)"));
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .expect("seconds")
    };
    let before = date(false);
    let shifted = date(true);
    let after = date(false);
    // The faked reading happened between the two real ones, whole seconds each.
    let skew = before - shifted;
    assert!(
        (599 - (after - before)..=601).contains(&skew),
        "faketime -f -10m: expected about 600 s behind, got {skew} s (now {before}, faked {shifted})"
    );
}
