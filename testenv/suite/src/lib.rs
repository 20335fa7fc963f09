//! Helpers for tests that run against the real test environment started by `testenv/kube up`.
//!
//! Every helper fails loudly when the environment is missing: these tests are never skipped.

use std::path::PathBuf;
use std::time::Duration;

pub mod proxy;

/// An environment variable the test command sets, or a panic that says how to set it.
pub fn required_env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| {
        panic!(
            "{key} is not set: these tests need the real test environment. Run the README's test \
             command (scripts/test), or `testenv/kube up` and `source target/testenv/env.sh`."
        )
    })
}

/// The Go lockgate peer binary built with lockgate v0.2.0 (what werf v2 requires).
pub fn go_peer() -> PathBuf {
    peer("LOCKGATE_TEST_GO_PEER")
}

/// The Go lockgate peer binary built with lockgate v0.1.1 (what older werf and nelm pin).
pub fn go_peer_v01() -> PathBuf {
    peer("LOCKGATE_TEST_GO_PEER_V01")
}

fn peer(key: &str) -> PathBuf {
    let p = PathBuf::from(required_env(key));
    assert!(
        p.exists(),
        "the Go peer {p:?} is missing: run testenv/build.sh lockgate-go"
    );
    p
}

/// A kube client for the admin or the limited user.
pub async fn client(limited: bool) -> kube::Client {
    let key = if limited {
        "LOCKGATE_TEST_LIMITED_KUBECONFIG"
    } else {
        "LOCKGATE_TEST_KUBECONFIG"
    };
    let path = required_env(key);
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    lockgate::kubernetes::client_from_config(config, Duration::from_secs(10)).expect("kube client")
}

/// A name no other test run has used (there is no garbage collector in the environment).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{:x}-{}-{}",
        nanos & 0xffff_ffff,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The Rust `lockgate` binary of this workspace (built by the test command before the tests).
pub fn rust_cli() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test binary> -> target/<profile>/lockgate
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("lockgate");
    assert!(
        p.exists(),
        "{p:?} is missing: run `cargo build --workspace` first (the test command does)"
    );
    p
}

/// Reads lines of a child's stdout until one starts with `want`; panics if the child ends first.
pub fn expect_line(child: &mut std::process::Child, want: &str) -> String {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(child.stdout.as_mut().expect("piped stdout"));
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).expect("read stdout") > 0,
            "child ended before printing {want:?}"
        );
        if line.starts_with(want) {
            return line.trim_end().to_owned();
        }
    }
}

/// Runs `program` (the Rust `lockgate` or the Go peer) as
/// `exec --locker LOCKER ARGS... NAME -- sh -c 'echo locked; read'`, returning once it holds the
/// lock; it keeps it until its stdin is closed ([`release`]).
pub fn hold(
    program: &std::path::Path,
    locker: &str,
    args: &[&str],
    name: &str,
) -> std::process::Child {
    let mut c = std::process::Command::new(program)
        .args(["exec", "--locker", locker])
        .args(args)
        .args([name, "--", "sh", "-c", "echo locked; read _ || true"])
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn a holder");
    expect_line(&mut c, "locked");
    c
}

/// Exit code of `program exec --locker LOCKER -q -n ARGS... NAME -- true`: 0 free, 1 busy.
pub fn try_lock(program: &std::path::Path, locker: &str, args: &[&str], name: &str) -> i32 {
    std::process::Command::new(program)
        .args(["exec", "--locker", locker, "-q", "-n"])
        .args(args)
        .args([name, "--", "true"])
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
        .stdin(std::process::Stdio::null())
        .status()
        .expect("run a try")
        .code()
        .expect("exited")
}

/// Lets a [`hold`]er go and checks it exited 0.
pub fn release(mut c: std::process::Child) {
    drop(c.stdin.take());
    let status = c.wait().expect("wait for the holder");
    assert!(status.success(), "holder exited with {status}");
}

/// A new ConfigMap in `namespace`, with one foreign annotation and one data key that lock
/// operations must leave alone.
pub async fn configmap(namespace: &str) -> String {
    let annotations = [("example.com/keep".to_owned(), "me".to_owned())].into();
    let data = [("payload".to_owned(), "untouched".to_owned())].into();
    create_configmap(namespace, Some(annotations), Some(data)).await
}

/// A new ConfigMap in `namespace` with nothing in it (for benchmarks: nothing but the locks).
pub async fn empty_configmap(namespace: &str) -> String {
    create_configmap(namespace, None, None).await
}

async fn create_configmap(
    namespace: &str,
    annotations: Option<std::collections::BTreeMap<String, String>>,
    data: Option<std::collections::BTreeMap<String, String>>,
) -> String {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client(false).await, namespace);
    let name = unique("locks");
    let metadata = kube::api::ObjectMeta {
        name: Some(name.clone()),
        annotations,
        ..Default::default()
    };
    let cm = ConfigMap {
        metadata,
        data,
        ..Default::default()
    };
    api.create(&Default::default(), &cm)
        .await
        .expect("create a ConfigMap");
    name
}

pub mod checker;
pub mod fault;
pub mod fault_plans;
pub mod history;
pub mod register;
