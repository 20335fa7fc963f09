//! `lockgate exec` with a Kubernetes locker hands its command the lease's fencing token
//! (`LOCKGATE_FENCING_TOKEN`), and the tokens of successive holds strictly increase.

use std::process::Command;

use lockgate_testenv::{configmap, required_env, rust_cli};

fn token(url: &str) -> u64 {
    let out = Command::new(rust_cli())
        .args(["--locker", url, "exec", "fenced", "--", "sh", "-c"])
        .arg("echo \"$LOCKGATE_FENCING_TOKEN $LOCKGATE_LOCK_NAME\"")
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
        .output()
        .expect("run lockgate exec");
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8(out.stdout).unwrap();
    let (t, name) = line.trim().split_once(' ').expect("token and name");
    assert_eq!(name, "fenced");
    t.parse()
        .unwrap_or_else(|_| panic!("not a token: {line:?}"))
}

#[tokio::test]
async fn exec_passes_increasing_fencing_tokens_to_the_command() {
    let url = format!(
        "kubernetes://default/configmaps/{}",
        configmap("default").await
    );
    let tokens: Vec<u64> =
        tokio::task::spawn_blocking(move || (0..3).map(|_| token(&url)).collect())
            .await
            .unwrap();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens do not increase: {tokens:?}"
    );
}
