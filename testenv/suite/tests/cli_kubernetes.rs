//! The documented promises of the `lockgate` command line on a Kubernetes locker, against the
//! real API server: the command dies with `lockgate` (PR_SET_PDEATHSIG), Kubernetes failures
//! exit 69 without running the command, and `status` shows the records.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use lockgate::kubernetes::{annotation_key, KubernetesLocker, LeaseConfig, Target};
use lockgate::{AcquireOptions, Locker};
use lockgate_testenv::proxy::Proxy;
use lockgate_testenv::{
    client, configmap, expect_line, expect_stderr_line, hold, record, required_env, rust_cli,
    time_limit, unique, wait_for_queue, Proc,
};
use serde_json::json;

fn url(cm: &str) -> String {
    format!("kubernetes://default/configmaps/{cm}")
}

/// True while process `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        // The state is the first field after the parenthesised command name.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().as_bytes()[0]),
            Some(b'Z' | b'X')
        ),
    }
}

/// Kills `pid` (not our child) when dropped, so that a failing test leaves nothing behind.
struct KillPid(i32);

impl Drop for KillPid {
    fn drop(&mut self) {
        if alive(self.0) {
            // SAFETY: kill(2) on a pid read from the command itself, checked alive just now.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// Runs `lockgate --locker LOCKER exec ARGS NAME -- sh -c 'echo $$; exec sleep 600'`; returns
/// lockgate and the command's pid once the command runs.
fn exec_sleeper(locker: &str, args: &[&str], name: &str) -> (Proc, i32) {
    let mut lockgate = Proc::spawn(
        Command::new(rust_cli())
            .args(["--locker", locker, "exec", "-q"])
            .args(args)
            .args([name, "--"])
            .args(["sh", "-c", "echo pid $$; exec sleep 600"])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    );
    let line = expect_line(&mut lockgate, "pid ");
    let pid = line["pid ".len()..].parse().expect("a pid");
    (lockgate, pid)
}

/// With a Kubernetes lock nothing renews the lease once `lockgate` is gone, so the command dies
/// with it, even when `lockgate` is SIGKILLed. So it does with a file lock, unless
/// `--keep-running` asks for flock(1)'s rule (the command co-owns the lock): the contrast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_dies_with_lockgate_on_a_kubernetes_lock() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let dir = tempfile::tempdir().unwrap();
    let file = format!("file:{}", dir.path().display());
    let u = url(&cm);
    tokio::task::spawn_blocking(move || {
        for (locker, args, dies) in [
            (u.as_str(), &[][..], true),
            (file.as_str(), &[], true),
            (file.as_str(), &["--keep-running"], false),
        ] {
            let (mut lockgate, pid) = exec_sleeper(locker, args, "pdeathsig");
            let _command = KillPid(pid);
            assert!(alive(pid));
            lockgate.kill().unwrap(); // SIGKILL: lockgate gets no chance to act
            lockgate.wait_within(Duration::from_secs(10));
            let deadline = Instant::now() + Duration::from_secs(if dies { 10 } else { 2 });
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(
                !alive(pid),
                dies,
                "{locker}: the command {} after lockgate was killed",
                if dies { "lived on" } else { "died" }
            );
        }
    })
    .await
    .unwrap();
}

/// `lockgate exec` on `locker` with the given kubeconfig; returns its exit code and stderr, and
/// checks that the command did not run.
fn exec_fails(kubeconfig: &Path, locker: &str, args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let mut c = Proc::spawn(
        Command::new(rust_cli())
            .args(["--locker", locker, "exec"])
            .args(args)
            .args(["failing", "--", "touch"])
            .arg(&marker)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let status = c.wait_within(Duration::from_secs(60));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!marker.exists(), "{locker}: the command ran: {stderr}");
    (status.code().expect("exited"), stderr)
}

/// Every kind of Kubernetes failure exits 69 (sysexits' EX_UNAVAILABLE), names what failed, and
/// does not run the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_failures_exit_69_and_the_command_does_not_run() {
    time_limit(Duration::from_secs(180));
    let admin = std::path::PathBuf::from(required_env("LOCKGATE_TEST_KUBECONFIG"));
    let limited = std::path::PathBuf::from(required_env("LOCKGATE_TEST_LIMITED_KUBECONFIG"));
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");

    // A corrupt record, and an object whose annotations are full.
    let corrupt = configmap("default").await;
    let patch = json!({"metadata": {"annotations": {annotation_key("failing"): "not a record"}}});
    api.patch(&corrupt, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let full = configmap("default").await;
    let big = "x".repeat(256 * 1024 - 200);
    let patch = json!({"metadata": {"annotations": {"example.com/big": big}}});
    api.patch(&full, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    // An object outside the limited user's Role.
    let forbidden = configmap("lockgate-limited").await;
    // An API server behind a cut connection.
    let proxy = Proxy::new().await;
    proxy.cut().await;
    let unreachable = proxy.kubeconfig().to_owned();

    let cases: Vec<(&str, std::path::PathBuf, String, &[&str], &str)> = vec![
        (
            "missing object",
            admin.clone(),
            url(&unique("missing")),
            &[],
            "not found",
        ),
        (
            "forbidden",
            limited,
            format!("kubernetes://lockgate-limited/configmaps/{forbidden}"),
            &[],
            "forbidden",
        ),
        (
            "corrupt record",
            admin.clone(),
            url(&corrupt),
            &[],
            "lock record",
        ),
        ("annotations full", admin.clone(), url(&full), &[], "full"),
        (
            "unreachable, -n",
            unreachable,
            url(&corrupt),
            &["-n"],
            "cannot reach",
        ),
    ];
    let results = tokio::task::spawn_blocking(move || {
        cases
            .into_iter()
            .map(|(what, kubeconfig, locker, args, says)| {
                let (code, stderr) = exec_fails(&kubeconfig, &locker, args);
                (what, code, stderr, says)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (what, code, stderr, says) in results {
        eprintln!("{what}: exit {code}: {}", stderr.trim());
        assert_eq!(code, 69, "{what}: {stderr}");
        assert!(stderr.starts_with("lockgate: "), "{what}: {stderr}");
        assert!(
            stderr.to_lowercase().contains(says),
            "{what}: {stderr} does not say {says:?}"
        );
    }
    drop(proxy);
}

/// `lockgate status` on a Kubernetes locker, as a table and as JSON: each record's name, mode,
/// holder count, queued waiters, seconds until its ExpireAtTimestamp, lease UUID; a corrupt
/// record listed with its error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_records_of_a_kubernetes_locker() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let u = url(&cm);
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let patch = json!({"metadata": {"annotations": {annotation_key("broken"): "not a record"}}});
    api.patch(&cm, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();

    // An exclusive holder with one waiter queued, and a shared record of two holders.
    let h = u.clone();
    let holder = tokio::task::spawn_blocking(move || hold(&rust_cli(), &h, &[], "held"))
        .await
        .unwrap();
    let mut waiter = Proc::spawn(
        Command::new(rust_cli())
            .args(["--locker", &u, "exec", "-w", "60", "held", "--", "true"])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
            .stdin(Stdio::null())
            .stderr(Stdio::piped()),
    );
    wait_for_queue(&cm, "held", 1).await;
    let readers = Locker::new(
        KubernetesLocker::new(
            client(false).await,
            Target::configmap("default", &cm),
            LeaseConfig::default(),
        )
        .unwrap(),
    );
    let r1 = readers
        .acquire("read", AcquireOptions::shared())
        .await
        .unwrap();
    let r2 = readers
        .acquire("read", AcquireOptions::shared())
        .await
        .unwrap();
    let held = record(&cm, "held").await.unwrap();
    let read = record(&cm, "read").await.unwrap();

    let su = u.clone();
    let status = move |json: bool| {
        let mut c = Command::new(rust_cli());
        c.args(["--locker", &su, "status"]);
        if json {
            c.arg("--json");
        }
        let out = c
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let (table, json_text) = tokio::task::spawn_blocking(move || (status(false), status(true)))
        .await
        .unwrap();
    eprintln!("{table}");

    let doc: serde_json::Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(doc["schema"], 1, "{json_text}");
    assert_eq!(doc["backend"], "kubernetes", "{json_text}");
    let records = doc["locks"].as_array().expect("a list of locks").clone();
    assert_eq!(records.len(), 3, "{json_text}");
    let by_name = |name: &str| {
        records
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no record for {name}: {json_text}"))
            .clone()
    };
    let h = by_name("held");
    assert_eq!(h["key"], annotation_key("held"));
    assert_eq!(h["mode"], "exclusive");
    assert_eq!(h["count"], 1);
    let holders = h["holders"].as_array().expect("holders");
    assert_eq!(holders.len(), 1, "{json_text}");
    assert_eq!(holders[0]["mode"], "exclusive");
    assert!(holders[0]["pid"].as_u64().is_some(), "{json_text}");
    assert!(
        holders[0]["description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "exec records its command: {json_text}"
    );
    assert_eq!(h["waiters"], 1);
    assert_eq!(h["uuid"], held["uuid"]);
    let expires = h["expires_in_secs"].as_i64().unwrap();
    // A TTL of 10 s from the latest the API server's clock can be (its `Date` is to the second,
    // rounded up): up to 2 s more than the estimate of now.
    assert!((1..=12).contains(&expires), "expires in {expires} s");
    let r = by_name("read");
    assert_eq!(r["mode"], "shared");
    assert_eq!(r["count"], 2);
    assert_eq!(r["waiters"], 0);
    assert_eq!(r["uuid"], read["uuid"]);
    let broken = records
        .iter()
        .find(|r| r["key"] == annotation_key("broken"))
        .expect("the corrupt record is listed");
    assert!(broken["error"].as_str().is_some_and(|e| !e.is_empty()));

    // The table: where the locks are, a header, then one line per record with the same facts,
    // and a line per holder.
    let place = table.lines().next().unwrap();
    assert!(place.starts_with("locks in configmaps default/"), "{place}");
    let header = table.lines().nth(1).unwrap();
    for column in ["STATE", "WAITING", "NAME"] {
        assert!(header.contains(column), "{header}");
    }
    let line = |needle: &str| {
        table
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle}: {table}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let h = line("\"held\"");
    assert_eq!(h[..2], ["exclusive", "1"], "{h:?}");
    let r = line("\"read\"");
    assert_eq!(r[..2], ["shared", "0"], "{r:?}");
    assert!(
        table.lines().filter(|l| l.contains("held by")).count() >= 2,
        "a line per holder: {table}"
    );
    let c = line(&annotation_key("broken"));
    assert_eq!(c[0], "corrupt", "{c:?}");

    r1.release().await.unwrap();
    r2.release().await.unwrap();
    tokio::task::spawn_blocking(move || {
        lockgate_testenv::release(holder);
        expect_stderr_line(&mut waiter, "lockgate: waiting", Duration::from_secs(5));
        assert!(waiter.wait_within(Duration::from_secs(60)).success());
    })
    .await
    .unwrap();

    // A missing object: exit 69.
    let missing = url(&unique("missing"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(rust_cli())
            .args(["--locker", &missing, "status"])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
}
