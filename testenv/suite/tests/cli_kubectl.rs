//! kubectl's habits on the `lockgate` command line, against the real API server: `--kubeconfig`,
//! `--context`, `--namespace`, the namespace defaulted from the kubeconfig context
//! (`kubernetes://RESOURCE/NAME`), and resources named as kubectl takes them (`cm`,
//! `configmap`, `configmaps.v1.`, `leases`, `leases.coordination.k8s.io`), through discovery.
//! (The pod's namespace as the default: `users.rs`.)

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, PostParams};
use lockgate::kubernetes::annotation_key;
use lockgate_testenv::{client, required_env, rust_cli, time_limit, unique, Proc};

/// Runs `lockgate ARGS` without $KUBECONFIG or ~/.kube/config (HOME is `home`), `extra_env`
/// set; its exit code and stderr.
fn lockgate(home: &Path, extra_env: &[(&str, &Path)], args: &[&str]) -> (i32, String) {
    let mut c = Command::new(rust_cli());
    c.env_remove("KUBECONFIG")
        .env_remove("LOCKGATE_LOCKER")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        c.env(k, v);
    }
    let mut p = Proc::spawn(&mut c);
    let status = p.wait_within(Duration::from_secs(60));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut p.stderr.take().unwrap(), &mut err).unwrap();
    (status.code().expect("exited"), err)
}

/// The admin kubeconfig's server, CA file and token, as `(server, ca, token)`.
fn admin_credentials() -> (String, String, String) {
    let text = std::fs::read_to_string(required_env("LOCKGATE_TEST_KUBECONFIG")).unwrap();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the admin kubeconfig"))
            .trim()
            .to_owned()
    };
    (
        field("server:"),
        field("certificate-authority:"),
        field("token:"),
    )
}

/// A kubeconfig with the admin's credentials and one context per `(name, namespace)`, the first
/// current.
fn kubeconfig(path: &Path, contexts: &[(&str, Option<&str>)]) {
    let (server, ca, token) = admin_credentials();
    let mut text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    \
         certificate-authority: {ca}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n"
    );
    for (name, ns) in contexts {
        text.push_str(&format!(
            "- name: {name}\n  context:\n    cluster: c\n    user: u\n"
        ));
        if let Some(ns) = ns {
            text.push_str(&format!("    namespace: {ns}\n"));
        }
    }
    text.push_str(&format!("current-context: {}\n", contexts[0].0));
    std::fs::write(path, text).unwrap();
}

async fn namespace_with_configmap(prefix: &str, cm: &str) -> String {
    let c = client(false).await;
    let ns = unique(prefix);
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_owned()),
        ..Default::default()
    };
    Api::<Namespace>::all(c.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta(&ns),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    Api::<ConfigMap>::namespaced(c, &ns)
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta(cm),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    ns
}

/// True when ConfigMap `ns/cm` has a record of lock `name`.
async fn recorded(ns: &str, cm: &str, name: &str) -> bool {
    Api::<ConfigMap>::namespaced(client(false).await, ns)
        .get(cm)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key(&annotation_key(name))
}

/// `--kubeconfig`, `--context` (or `CONTEXT@`), `--namespace`, and the namespace of the
/// kubeconfig's context by default, as kubectl has them; the namespace `default` for a context
/// without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectls_flags_and_the_contexts_namespace() {
    time_limit(Duration::from_secs(180));
    let cm = "kubectl-habits";
    let a = namespace_with_configmap("ctx-a", cm).await;
    let b = namespace_with_configmap("ctx-b", cm).await;
    let c = namespace_with_configmap("flag-c", cm).await;
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("config");
    kubeconfig(&file, &[("a", Some(&a)), ("b", Some(&b)), ("plain", None)]);
    let f = file.to_str().unwrap().to_owned();
    let url = format!("kubernetes://cm/{cm}");
    let cases: Vec<(Vec<String>, bool, String)> = vec![
        // (arguments, KUBECONFIG=file instead of --kubeconfig, the namespace)
        (vec![], false, a.clone()),
        (vec![], true, a.clone()),
        (vec!["--context".into(), "b".into()], false, b.clone()),
        (
            vec![
                "--context".into(),
                "b".into(),
                "--namespace".into(),
                c.clone(),
            ],
            false,
            c.clone(),
        ),
        (vec!["--namespace".into(), c.clone()], true, c.clone()),
    ];
    for (i, (args, env, ns)) in cases.into_iter().enumerate() {
        let name = format!("case-{i}");
        let mut all: Vec<String> = vec!["-v".into(), "--locker".into(), url.clone()];
        if !env {
            all.extend(["--kubeconfig".into(), f.clone()]);
        }
        all.extend(args.clone());
        all.extend(["exec".into(), name.clone(), "true".into()]);
        let home_path = home.path().to_owned();
        let file_env = file.clone();
        let (code, err) = tokio::task::spawn_blocking(move || {
            let extra: Vec<(&str, &Path)> = if env {
                vec![("KUBECONFIG", file_env.as_path())]
            } else {
                vec![]
            };
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            lockgate(&home_path, &extra, &all)
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(
            err.contains(&format!("lockgate: locks in configmaps {ns}/{cm}")),
            "{args:?}: {err}"
        );
        assert!(recorded(&ns, cm, &name).await, "{args:?}: not in {ns}");
        for other in [&a, &b, &c] {
            if *other != ns {
                assert!(!recorded(other, cm, &name).await, "{args:?}: in {other}");
            }
        }
    }
    // The URL's context is the flag's; a context without a namespace is `default`'s.
    let home_path = home.path().to_owned();
    let (f2, url_b) = (f.clone(), format!("kubernetes://b@cm/{cm}"));
    let (code, err) = tokio::task::spawn_blocking(move || {
        lockgate(
            &home_path,
            &[],
            &["-v", "--kubeconfig", &f2, "--locker", &url_b, "status"],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("locks in configmaps {b}/{cm}")),
        "{err}"
    );
    let home_path = home.path().to_owned();
    let (code, err) = tokio::task::spawn_blocking(move || {
        lockgate(
            &home_path,
            &[],
            &[
                "-v",
                "--kubeconfig",
                &f,
                "--context",
                "plain",
                "--locker",
                "kubernetes://cm/x",
                "status",
            ],
        )
    })
    .await
    .unwrap();
    // ConfigMap default/x need not exist for -v to say where it is.
    assert!(
        err.contains("locks in configmaps default/x"),
        "{code}: {err}"
    );
}

/// Resources named as kubectl names them reach the same object: a lock held through
/// `configmaps` is busy through `cm`, `configmap`, `ConfigMap`, `configmaps.v1.` and
/// `configmaps.v1`; a Lease is found as `leases`, `lease`, `leases.coordination.k8s.io` and
/// `leases.v1.coordination.k8s.io`; an unknown resource is a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_as_kubectl_names_them() {
    time_limit(Duration::from_secs(180));
    let cm = lockgate_testenv::configmap("default").await;
    let holder = lockgate_testenv::hold(
        &rust_cli(),
        &format!("kubernetes://default/configmaps/{cm}"),
        &[],
        "named",
    );
    let home = tempfile::tempdir().unwrap();
    let admin = std::path::PathBuf::from(required_env("LOCKGATE_TEST_KUBECONFIG"));
    for resource in [
        "cm",
        "configmap",
        "ConfigMap",
        "configmaps.v1.",
        "configmaps.v1",
    ] {
        let url = format!("kubernetes://default/{resource}/{cm}");
        let (home_path, admin) = (home.path().to_owned(), admin.clone());
        let (code, err) = tokio::task::spawn_blocking(move || {
            lockgate(
                &home_path,
                &[("KUBECONFIG", &admin)],
                &["--locker", &url, "exec", "-n", "named", "true"],
            )
        })
        .await
        .unwrap();
        assert_eq!(code, 1, "{resource}: not the held lock's object: {err}");
    }
    lockgate_testenv::release(holder);

    let lease = unique("lease");
    let leases: Api<Lease> = Api::namespaced(client(false).await, "default");
    leases
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
    for (i, resource) in [
        "leases",
        "lease",
        "leases.coordination.k8s.io",
        "leases.v1.coordination.k8s.io",
    ]
    .into_iter()
    .enumerate()
    {
        // Two parts: the namespace is the kubeconfig context's (`default`).
        let url = format!("kubernetes://{resource}/{lease}");
        let name = format!("lease-{i}");
        let (home_path, admin, n) = (home.path().to_owned(), admin.clone(), name.clone());
        let (code, err) = tokio::task::spawn_blocking(move || {
            lockgate(
                &home_path,
                &[("KUBECONFIG", &admin)],
                &["--locker", &url, "exec", &n, "true"],
            )
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "{resource}: {err}");
        let annotations = leases
            .get(&lease)
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap_or_default();
        assert!(
            annotations.contains_key(&annotation_key(&name)),
            "{resource}: no record on the Lease"
        );
    }
    let (home_path, admin2) = (home.path().to_owned(), admin.clone());
    let (code, err) = tokio::task::spawn_blocking(move || {
        lockgate(
            &home_path,
            &[("KUBECONFIG", &admin2)],
            &[
                "--locker",
                "kubernetes://default/widgetz/x",
                "exec",
                "n",
                "true",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("does not serve it"), "{err}");
}
