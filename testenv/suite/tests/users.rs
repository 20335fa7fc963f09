//! What a user runs, against the real API server: the RBAC and the Job of `deploy/`, with the
//! in-cluster configuration a pod has; the Kubernetes examples; and the werf/nelm recipe with the
//! Go peer locking as nelm does.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use lockgate::kubernetes::annotation_key;
use lockgate_testenv::{client, go_peer_v01, required_env, rust_cli, unique};
use serde_json::{json, Value};

/// How long any one step of these tests may take.
const PATIENCE: Duration = Duration::from_secs(60);

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A child process killed (with its process group) when the test ends, also on failure, whose
/// stdout and stderr lines arrive through channels.
struct Proc {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Self {
        use std::os::unix::process::CommandExt;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// The next stdout line that contains `want`, within [`PATIENCE`].
    fn expect(&mut self, want: &str) -> String {
        expect_in(&self.stdout, want, "stdout")
    }

    /// The next stderr line that contains `want`, within [`PATIENCE`].
    fn expect_err(&mut self, want: &str) -> String {
        expect_in(&self.stderr, want, "stderr")
    }

    /// Closes stdin and waits (at most [`PATIENCE`]) for the exit code; returns it with the
    /// rest of stderr.
    fn finish(&mut self) -> (i32, String) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the process did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        (status.code().unwrap_or(-1), stderr.join("\n"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) of the group this test started.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

fn lines(from: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn expect_in(rx: &mpsc::Receiver<String>, want: &str, what: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(want) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no {what} line with {want:?}; saw {seen:?}"),
        }
    }
}

/// Runs `cmd` to completion (within [`PATIENCE`]): exit code, stdout, stderr.
fn run(cmd: &mut Command) -> (i32, String, String) {
    let mut p = Proc::spawn(cmd);
    let (code, stderr) = p.finish();
    let stdout: Vec<String> = p.stdout.try_iter().collect();
    (code, stdout.join("\n"), stderr)
}

// ---------------------------------------------------------------------------------------------
// The API server, as the admin

/// A request as the admin; panics on failure with the API server's answer.
async fn api(method: &str, path: &str, body: Vec<u8>, content_type: &str) -> Value {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("Content-Type", content_type)
        .body(body)
        .unwrap();
    let text = client(false)
        .await
        .request_text(request)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
}

async fn namespace(prefix: &str) -> String {
    let ns = unique(prefix);
    let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
    api(
        "POST",
        "/api/v1/namespaces",
        body.to_string().into(),
        "application/json",
    )
    .await;
    ns
}

async fn create_configmap(ns: &str, name: &str) {
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}});
    api(
        "POST",
        &format!("/api/v1/namespaces/{ns}/configmaps"),
        body.to_string().into(),
        "application/json",
    )
    .await;
}

/// The YAML documents of a `deploy/` file, with its namespace `ci` renamed to `ns` (where the
/// test puts them); nothing else changes.
fn deploy_documents(file: &str, ns: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy").join(file)).unwrap();
    let renamed: String = text
        .lines()
        .map(|l| match l.trim_end().strip_suffix("namespace: ci") {
            Some(indent) if indent.trim().is_empty() => format!("{indent}namespace: {ns}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    assert!(renamed.contains(&format!("namespace: {ns}")), "{file}");
    renamed
        .split("\n---\n")
        .filter(|d| d.contains("kind:"))
        .map(str::to_owned)
        .collect()
}

/// The collection path of a namespaced object of `kind`.
fn collection(kind: &str, ns: &str) -> String {
    match kind {
        "ServiceAccount" => format!("/api/v1/namespaces/{ns}/serviceaccounts"),
        "Role" => format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"),
        "RoleBinding" => format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"),
        "Job" => format!("/apis/batch/v1/namespaces/{ns}/jobs"),
        other => panic!("unexpected kind {other}"),
    }
}

fn kind_of(doc: &str) -> &str {
    doc.lines()
        .find_map(|l| l.strip_prefix("kind: "))
        .expect("a kind")
        .trim()
}

/// Creates the objects of a `deploy/` file in `ns` (as `kubectl apply -n NS -f FILE` would, with
/// the namespace edited in).
async fn apply(file: &str, ns: &str) {
    for doc in deploy_documents(file, ns) {
        let path = collection(kind_of(&doc), ns);
        api("POST", &path, doc.into_bytes(), "application/yaml").await;
    }
}

/// A token of ServiceAccount `lockgate` in `ns`, from the TokenRequest API (what the kubelet
/// mounts into a pod).
async fn service_account_token(ns: &str) -> String {
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": 3600}
    });
    let answer = api(
        "POST",
        &format!("/api/v1/namespaces/{ns}/serviceaccounts/lockgate/token"),
        body.to_string().into(),
        "application/json",
    )
    .await;
    answer["status"]["token"].as_str().unwrap().to_owned()
}

/// The annotations of ConfigMap `ns/name`.
async fn annotations(ns: &str, name: &str) -> std::collections::BTreeMap<String, String> {
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, ns);
    api.get(name)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// A pod's view: in-cluster configuration

/// What a pod of ServiceAccount `lockgate` in `ns` sees: the token, the CA and the namespace in
/// files (mounted, in a private mount namespace, where every client looks for them:
/// /var/run/secrets/kubernetes.io/serviceaccount) and `KUBERNETES_SERVICE_HOST/PORT`; no
/// kubeconfig.
struct Pod {
    secrets: tempfile::TempDir,
    home: tempfile::TempDir,
}

impl Pod {
    fn new(ns: &str, token: &str) -> Self {
        let secrets = tempfile::tempdir().unwrap();
        std::fs::write(secrets.path().join("token"), token).unwrap();
        std::fs::copy(
            required_env("LOCKGATE_TEST_APISERVER_CA"),
            secrets.path().join("ca.crt"),
        )
        .unwrap();
        std::fs::write(secrets.path().join("namespace"), ns).unwrap();
        Self {
            secrets,
            home: tempfile::tempdir().unwrap(),
        }
    }

    /// `program ARGS...` as the pod would run it.
    fn command(&self, program: &Path, args: &[&str]) -> Command {
        // /var/run is /run on most systems: cover the real directory with an empty tmpfs (in
        // this process's own mount namespace only) and mount the secrets where a pod has them.
        let run = std::fs::canonicalize("/var/run").unwrap();
        let script = r#"set -e
mount -t tmpfs tmpfs "$1"
mkdir -p "$1/secrets/kubernetes.io/serviceaccount"
mount --bind "$2" "$1/secrets/kubernetes.io/serviceaccount"
shift 2
exec "$@""#;
        let mut cmd = Command::new("unshare");
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            // An unprivileged user gets mount rights in a user namespace of its own.
            cmd.args(["--user", "--map-root-user"]);
        }
        let (host, port) = required_env("LOCKGATE_TEST_APISERVER")
            .rsplit_once(':')
            .map(|(h, p)| (h.to_owned(), p.to_owned()))
            .unwrap();
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&run)
        .arg(self.secrets.path())
        .arg(program)
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("LOCKGATE_LOCKER")
        .env("HOME", self.home.path())
        .env("KUBERNETES_SERVICE_HOST", host)
        .env("KUBERNETES_SERVICE_PORT", port);
        cmd
    }
}

/// `lockgate exec -n -q NAME -- true` as the admin: 0 when the lock is free, 1 when busy.
fn admin_try(locker: &str, name: &str) -> i32 {
    run(Command::new(rust_cli())
        .args(["--locker", locker, "exec", "-n", "-q", name, "--", "true"])
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG")))
    .0
}

/// deploy/rbac/ with a pod's in-cluster configuration: without role-create-missing.yaml, a
/// missing ConfigMap is refused with advice that names that file; with it, `--create-missing`
/// creates the ConfigMap and the lock is taken (and held: the admin sees it busy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_bound_by_the_deploy_rbac_takes_a_lock_with_in_cluster_configuration() {
    let ns = namespace("deploy").await;
    for file in [
        "rbac/serviceaccount.yaml",
        "rbac/role.yaml",
        "rbac/rolebinding.yaml",
    ] {
        apply(file, &ns).await;
    }
    let pod = Pod::new(&ns, &service_account_token(&ns).await);
    let locker = format!("kubernetes://{ns}/configmaps/lockgate");
    let exec = |extra: &[&str]| {
        let mut args = vec!["--locker", &locker, "--create-missing", "exec"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["job", "--", "sh", "-c", "echo locked; read _ || true"]);
        pod.command(&rust_cli(), &args)
    };

    // The ConfigMap does not exist and the Role does not allow creating it.
    let (code, stdout, stderr) = tokio::task::spawn_blocking({
        let mut cmd = exec(&["-n"]);
        move || run(&mut cmd)
    })
    .await
    .unwrap();
    assert_eq!(code, 69, "{stderr}");
    assert!(stdout.is_empty(), "the command ran: {stdout}");
    assert!(
        stderr.contains("forbidden to create")
            && stderr.contains("deploy/rbac/role-create-missing.yaml"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("system:serviceaccount:{ns}:lockgate")),
        "the pod's own identity: {stderr}"
    );

    apply("rbac/role-create-missing.yaml", &ns).await;
    let mut holder = Proc::spawn(&mut exec(&[]));
    let mut holder = tokio::task::spawn_blocking(move || {
        holder.expect("locked");
        holder
    })
    .await
    .unwrap();
    assert!(annotations(&ns, "lockgate")
        .await
        .contains_key(&annotation_key("job")));
    let l = locker.clone();
    let busy = tokio::task::spawn_blocking(move || admin_try(&l, "job"))
        .await
        .unwrap();
    assert_eq!(busy, 1, "the lock taken in-cluster is held");
    let (code, stderr) = tokio::task::spawn_blocking(move || holder.finish())
        .await
        .unwrap();
    assert_eq!(code, 0, "{stderr}");
    let free = tokio::task::spawn_blocking(move || admin_try(&locker, "job"))
        .await
        .unwrap();
    assert_eq!(free, 0, "released");
}

/// In a pod, `kubernetes://RESOURCE/NAME` is in the pod's own namespace (its service account's
/// `namespace` file), as kubectl has it; and `cm` is found through discovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_locks_in_its_own_namespace_by_default() {
    let ns = namespace("podns").await;
    for file in [
        "rbac/serviceaccount.yaml",
        "rbac/role.yaml",
        "rbac/rolebinding.yaml",
    ] {
        apply(file, &ns).await;
    }
    create_configmap(&ns, "lockgate").await;
    let pod = Pod::new(&ns, &service_account_token(&ns).await);
    let mut cmd = pod.command(
        &rust_cli(),
        &[
            "-v",
            "--locker",
            "kubernetes://cm/lockgate",
            "exec",
            "pod",
            "true",
        ],
    );
    let (code, _, stderr) = tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!("lockgate: locks in configmaps {ns}/lockgate")),
        "{stderr}"
    );
    assert!(annotations(&ns, "lockgate")
        .await
        .contains_key(&annotation_key("pod")));
}

/// deploy/job.yaml is a Job the API server accepts (server-side dry run), and its container's
/// command, run as the pod would run it (its environment, in-cluster configuration, the service
/// account of deploy/rbac/), takes the lock and runs the script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_example_runs_lockgate_exec_in_cluster() {
    let ns = namespace("job").await;
    for file in [
        "rbac/serviceaccount.yaml",
        "rbac/role.yaml",
        "rbac/rolebinding.yaml",
    ] {
        apply(file, &ns).await;
    }
    create_configmap(&ns, "lockgate").await;
    let [doc] = deploy_documents("job.yaml", &ns).try_into().unwrap();
    let job = api(
        "POST",
        &format!("{}?dryRun=All", collection("Job", &ns)),
        doc.into_bytes(),
        "application/yaml",
    )
    .await;
    let pod_spec = &job["spec"]["template"]["spec"];
    assert_eq!(pod_spec["serviceAccountName"], "lockgate");
    let container = &pod_spec["containers"][0];

    // The container's environment, as the kubelet makes it: the downward API's namespace, and
    // $(VAR) references to variables defined before.
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = match var["value"].as_str() {
            Some(v) => env
                .iter()
                .fold(v.to_owned(), |v, (k, x)| v.replace(&format!("$({k})"), x)),
            None => {
                assert_eq!(
                    var["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace",
                    "{var}"
                );
                ns.clone()
            }
        };
        env.push((name, value));
    }
    let command: Vec<&str> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(command[..2], ["lockgate", "exec"], "{command:?}");

    let pod = Pod::new(&ns, &service_account_token(&ns).await);
    let mut cmd = pod.command(&rust_cli(), &command[1..]);
    cmd.envs(env);
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("migrating under the lock"), "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// The examples

/// An example program of the `lockgate` package (built by `cargo test --workspace`, which
/// builds every example).
fn example(name: &str) -> PathBuf {
    let p = rust_cli().parent().unwrap().join("examples").join(name);
    assert!(
        p.exists(),
        "{p:?} is missing: run `cargo build --workspace --examples` first (the test command does)"
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_example_runs_the_three_cases() {
    let cm = unique("example");
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run(Command::new(example("kubernetes_locks"))
            .args(["default", &cm])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG")))
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for line in [
        "case 1: acquired \"myresource\" after waiting, fencing token Some(",
        "case 1: gave up after",
        "case 2: the closure ran under the lock and returned 42",
        "case 2: the lock was busy; the closure was told so",
        "case 3: \"myresource\" is busy; doing something else",
        "case 3: \"myresource\" was free and is ours",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert!(
        stderr.contains("Waiting for locked \"myresource\""),
        "{stderr}"
    );
}

fn fenced_worker(cm: &str, ledger: &Path, steps: u32) -> Proc {
    Proc::spawn(
        Command::new(example("fenced_worker"))
            .args(["default", cm])
            .arg(ledger)
            .arg(steps.to_string())
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG")),
    )
}

/// The ledger's lines as (token, step, pid).
fn ledger_lines(ledger: &Path) -> Vec<(u64, u32, u32)> {
    std::fs::read_to_string(ledger)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

fn token_of(line: &str) -> u64 {
    line.rsplit_once("token=")
        .and_then(|(_, t)| t.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no token in {line:?}"))
}

/// The fenced worker stops (exit 75) when its lease is taken, and writes nothing after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fenced_worker_stops_when_its_lease_is_lost() {
    let cm = lockgate_testenv::configmap("default").await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let mut a = fenced_worker(&cm, &ledger, 10_000);
    let (mut a, token) = tokio::task::spawn_blocking(move || {
        let token = token_of(&a.expect("acquired token="));
        a.expect("wrote token=");
        (a, token)
    })
    .await
    .unwrap();

    // Somebody else's record replaces the worker's.
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let key = annotation_key("ledger-writer");
    let record = json!({"uuid": "thief", "lockName": "ledger-writer", "ExpireAtTimestamp": 0,
                        "SharedHoldersCount": 1, "IsShared": false});
    let patch = json!({"metadata": {"annotations": {&key: record.to_string()}}});
    api.patch(&cm, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        let line = a.expect_err("stopping");
        assert!(line.contains("the lease was lost"), "{line}");
        a.finish()
    })
    .await
    .unwrap();
    assert_eq!(code, 75, "{stderr}");
    let written = ledger_lines(&ledger);
    assert!(!written.is_empty() && written.iter().all(|l| l.0 == token));

    // The thief leaves; the next worker gets a higher token, and the ledger stays in order.
    let patch = json!({"metadata": {"annotations": {&key: null}}});
    api.patch(&cm, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let mut b = fenced_worker(&cm, &ledger, 2);
    let (code, stderr, b_token) = tokio::task::spawn_blocking(move || {
        let t = token_of(&b.expect("acquired token="));
        b.expect("done");
        let (code, stderr) = b.finish();
        (code, stderr, t)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(b_token > token, "{b_token} after {token}");
    let after = ledger_lines(&ledger);
    assert_eq!(after.len(), written.len() + 2, "{after:?}");
    assert!(after.windows(2).all(|w| w[0].0 <= w[1].0), "{after:?}");
}

/// A worker paused (SIGSTOP) past its lease while another takes the lock over does not write
/// after the newer holder once it runs again: it learns of the loss, or the ledger refuses its
/// older token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_fenced_worker_cannot_write_after_the_next_holder() {
    let cm = lockgate_testenv::configmap("default").await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let a = fenced_worker(&cm, &ledger, 10_000);
    let a_pid = a.child.id() as i32;
    let mut a = tokio::task::spawn_blocking(move || {
        let mut a = a;
        a.expect("wrote token=");
        a
    })
    .await
    .unwrap();
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(a_pid, libc::SIGSTOP) }, 0);

    // A waits TTL-free: its record is removed, as if it had expired for the others.
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let key = annotation_key("ledger-writer");
    let patch = json!({"metadata": {"annotations": {&key: null}}});
    api.patch(&cm, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let mut b = fenced_worker(&cm, &ledger, 3);
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        b.expect("done");
        b.finish()
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    let before = ledger_lines(&ledger).len();

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(a_pid, libc::SIGCONT) }, 0);
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        a.expect_err("stopping");
        a.finish()
    })
    .await
    .unwrap();
    assert_eq!(code, 75, "{stderr}");
    let after = ledger_lines(&ledger);
    assert_eq!(
        after.len(),
        before,
        "the paused worker wrote after the next holder: {after:?}"
    );
    assert!(after.windows(2).all(|w| w[0].0 <= w[1].0), "{after:?}");
}

// ---------------------------------------------------------------------------------------------
// werf and nelm

/// nelm locks a release `NAME` of namespace `NS` as the exclusive lock `release/NAME` in the
/// annotations of ConfigMap `werf-synchronization` of `NS`, with Go lockgate's Kubernetes
/// locker (werf/nelm pkg/lock/lock_manager.go; nelm pins Go lockgate v0.1.1). The README's
/// recipe serialises a script with those deploys; here the Go peer v0.1.1 locks exactly as
/// nelm does, and `lockgate exec` with the recipe's arguments waits for it, and the other way
/// round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nelm_recipe_serialises_with_nelms_release_lock() {
    let ns = namespace("release").await;
    // nelm creates the ConfigMap when it is missing; so does the recipe (--create-missing).
    create_configmap(&ns, "werf-synchronization").await;
    let locker = format!("kubernetes://{ns}/configmaps/werf-synchronization");
    let kubeconfig = required_env("LOCKGATE_TEST_KUBECONFIG");

    // A nelm deploy holds the release's lock; the script waits for it.
    let go = Proc::spawn(
        Command::new(go_peer_v01())
            .args(["exec", "--locker", &locker, "release/myapp", "--"])
            .args(["sh", "-c", "echo locked; read _ || true"])
            .env("KUBECONFIG", &kubeconfig),
    );
    let recipe = |script: &str| {
        let mut c = Command::new(rust_cli());
        c.args([
            "--locker",
            &locker,
            "--create-missing",
            "exec",
            "release/myapp",
            "--",
        ])
        .args(["sh", "-c", script])
        .env("KUBECONFIG", &kubeconfig);
        c
    };
    let mut script = recipe("echo script-ran");
    let (mut go, mut script) = tokio::task::spawn_blocking(move || {
        let mut go = go;
        go.expect("locked");
        let mut script = Proc::spawn(&mut script);
        let waiting = script.expect_err("waiting for exclusive lock \"release/myapp\"");
        assert!(waiting.starts_with("lockgate: "), "{waiting}");
        assert!(
            script.stdout.try_recv().is_err(),
            "the script ran while nelm held the release"
        );
        (go, script)
    })
    .await
    .unwrap();
    let (go_code, go_err) = tokio::task::spawn_blocking(move || go.finish())
        .await
        .unwrap();
    assert_eq!(go_code, 0, "{go_err}");
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        script.expect("script-ran");
        script.finish()
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");

    // The script holds the release; a nelm deploy (Go, blocking as nelm does) waits for it.
    let mut script = Proc::spawn(&mut recipe("echo locked; read _ || true"));
    let mut deploy = Command::new(go_peer_v01());
    deploy
        .args(["exec", "--locker", &locker, "release/myapp", "--"])
        .args(["sh", "-c", "echo deploy-ran"])
        .env("KUBECONFIG", &kubeconfig);
    let (code, go_code, go_err) = tokio::task::spawn_blocking(move || {
        script.expect("locked");
        let mut go = Proc::spawn(&mut deploy);
        // nelm prints "Waiting for locked ..." from the same hook.
        go.expect_err("waiting for locked \"release/myapp\"");
        assert!(
            go.stdout.try_recv().is_err(),
            "the deploy ran while the script held the release"
        );
        let (code, _) = script.finish();
        go.expect("deploy-ran");
        let (go_code, go_err) = go.finish();
        (code, go_code, go_err)
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    assert_eq!(go_code, 0, "{go_err}");
}
