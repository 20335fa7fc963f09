//! Self-checks of the test environment: the real API server behaves as the Kubernetes locker
//! will rely on, and the limited user is really limited.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
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
