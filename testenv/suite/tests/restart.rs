//! `testenv/kube restart-apiserver` restarts kube-apiserver while etcd keeps the data. In a test
//! binary of its own: the API server is down for a few seconds, which other tests must not see.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use lockgate_testenv::{client, required_env, unique};

#[tokio::test]
async fn restarting_the_api_server_keeps_objects() {
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let name = unique("restart");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        data: Some([("k".to_owned(), "v".to_owned())].into()),
        ..Default::default()
    };
    api.create(&PostParams::default(), &cm).await.unwrap();
    let status = tokio::process::Command::new(required_env("LOCKGATE_TESTENV"))
        .arg("restart-apiserver")
        .status()
        .await
        .unwrap();
    assert!(status.success(), "restart-apiserver failed");
    // The script returns once /readyz answers 200; a new client sees the object.
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let got = api
        .get(&name)
        .await
        .expect("the object survived the restart");
    assert_eq!(got.data.unwrap()["k"], "v");
}
