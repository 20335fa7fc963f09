//! Mixed fleets: Rust lockgate and Go lockgate (v0.2.0, what werf requires, and v0.1.1) loop on
//! one lock together. No Go-side error, no overlap, no lost update.
//!
//! Overlaps, lost updates, Rust errors and any other Go error fail a fleet. Go v0.2's own races
//! ("lock already leased", "no existing lock lease found": its `changeLease` compares the uuid
//! again after sleeping a second on a conflict, and its take-over always writes a new uuid) are
//! counted and printed, not failed: they happen between Go v0.2 processes with no Rust process
//! involved on a busy object, and in mixed fleets whenever a take-over by either side races a
//! Go process in its second read; see PROTOCOL.md, "Go v0.2 peers".

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockgate_testenv::{go_peer, go_peer_v01, is_go_v02_race, required_env};

/// The Rust twin of `lockgate-go loop`, built with this test suite.
fn rust_loop() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("lockgate-loop");
    assert!(
        p.exists(),
        "{p:?} is missing: run `cargo build --workspace` first"
    );
    p
}

/// One worker of a fleet: which program, its extra arguments, how many cycles.
struct Worker {
    program: PathBuf,
    label: &'static str,
    args: Vec<String>,
    cycles: u32,
}

fn rust(args: &[&str]) -> Worker {
    Worker {
        program: rust_loop(),
        label: "rust",
        args: args.iter().map(|s| s.to_string()).collect(),
        cycles: cycles("LOCKGATE_FLEET_RUST_CYCLES", 100),
    }
}

fn go(args: &[&str]) -> Worker {
    Worker {
        program: go_peer(),
        label: "go v0.2.0",
        args: ["loop"].iter().chain(args).map(|s| s.to_string()).collect(),
        cycles: cycles("LOCKGATE_FLEET_GO_CYCLES", 30),
    }
}

fn go01(args: &[&str]) -> Worker {
    Worker {
        program: go_peer_v01(),
        label: "go v0.1.1",
        args: ["loop"].iter().chain(args).map(|s| s.to_string()).collect(),
        cycles: cycles("LOCKGATE_FLEET_GO_CYCLES", 30),
    }
}

/// Kills the fleet if the test fails half-way.
struct Fleet(Vec<(String, Child)>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `workers` on the lock `name` of `locker` and checks every report: exit 0, no errors, no
/// overlaps; then that the counter holds every increment. Returns Go v0.2's own races and the
/// Go v0.2 cycles run.
fn run_fleet(locker: &str, name: &str, workers: Vec<Worker>, limit: Duration) -> (usize, u32) {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter");
    let start = Instant::now();
    let mut fleet = Fleet(Vec::new());
    for w in &workers {
        let child = Command::new(&w.program)
            .args(&w.args)
            .args(["--locker", locker, "--cycles", &w.cycles.to_string()])
            .arg("--counter")
            .arg(&counter)
            .arg(name)
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        fleet.0.push((format!("{} {:?}", w.label, w.args), child));
    }
    let mut increments = 0;
    let mut go_races = 0;
    let mut failures = Vec::new();
    for (label, child) in &mut fleet.0 {
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                start.elapsed() < limit,
                "{label} did not finish within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = take_output(child);
        let report: serde_json::Value = out
            .0
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("{label}: no report; stdout {:?} stderr {:?}", out.0, out.1));
        eprintln!("{label}: {report}");
        increments += report["increments"].as_u64().unwrap();
        let status = child.wait().unwrap();
        // Go v0.2's own races (see the module's documentation) are counted, not failed; any
        // other error, a Rust error, an overlap or a crash fails the fleet.
        let errors: Vec<&str> = report["errors"]
            .as_array()
            .map(|e| e.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let go = label.starts_with("go v0.2");
        let (known, other): (Vec<&str>, Vec<&str>) =
            errors.iter().partition(|e| go && is_go_v02_race(e));
        go_races += known.len();
        let overlaps = report["overlaps"].as_u64().unwrap_or(u64::MAX);
        if !other.is_empty() || overlaps != 0 || (!status.success() && known.is_empty()) {
            failures.push(format!("{label}: {report} {}", out.1));
        }
    }
    let cycles: u32 = workers
        .iter()
        .filter(|w| w.label.starts_with("go v0.2"))
        .map(|w| w.cycles)
        .sum();
    eprintln!("Go v0.2 errors from its own races: {go_races} in {cycles} Go cycles");
    assert!(
        failures.is_empty(),
        "workers failed:\n{}",
        failures.join("\n")
    );
    let n: u64 = read(&counter);
    assert_eq!(
        n, increments,
        "lost updates: the counter says {n}, the workers made {increments}"
    );
    eprintln!(
        "fleet of {} on {name}: {increments} increments in {:?}",
        workers.len(),
        start.elapsed()
    );
    (go_races, cycles)
}

fn take_output(child: &mut Child) -> (String, String) {
    use std::io::Read;
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (out, err)
}

fn read(counter: &Path) -> u64 {
    std::fs::read_to_string(counter)
        .map(|s| s.trim().parse().unwrap_or(0))
        .unwrap_or(0)
}

async fn configmap_url() -> String {
    let cm = lockgate_testenv::configmap("default").await;
    format!("kubernetes://default/configmaps/{cm}")
}

/// Cycles per worker: Rust workers cycle in milliseconds, Go workers poll every 2 s when they
/// have to wait.
fn cycles(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_go_v02_share_a_configmap_lock_exclusively() {
    let url = configmap_url().await;
    tokio::task::spawn_blocking(move || {
        run_fleet(
            &url,
            "fleet",
            vec![
                rust(&[]),
                rust(&[]),
                go(&["--acquirer-id", "auto"]),
                go(&[]),
            ],
            Duration::from_secs(600),
        )
    })
    .await
    .unwrap();
}

/// Rust shared and exclusive with Go exclusive (Go shared and Go exclusive on one lock overlap
/// by themselves: Go v0.2 takes a released shared record over without clearing `IsShared`, and
/// Go's shared requests then join it; see the last test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_shared_and_exclusive_with_go_v02_exclusive() {
    let url = configmap_url().await;
    tokio::task::spawn_blocking(move || {
        run_fleet(
            &url,
            "mixed",
            vec![
                rust(&["--hold-ms", "10"]),
                rust(&["-s", "--hold-ms", "10"]),
                go(&["--acquirer-id", "auto", "--hold-ms", "10"]),
                go(&["--hold-ms", "10"]),
            ],
            Duration::from_secs(600),
        )
    })
    .await
    .unwrap();
}

/// Rust shared and exclusive with Go shared, with and without an acquirer id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_shared_and_exclusive_with_go_v02_shared() {
    let url = configmap_url().await;
    tokio::task::spawn_blocking(move || {
        run_fleet(
            &url,
            "shared",
            vec![
                rust(&["--hold-ms", "10"]),
                rust(&["-s", "--hold-ms", "10"]),
                go(&["-s", "--acquirer-id", "auto", "--hold-ms", "10"]),
                go(&["-s", "--hold-ms", "10"]),
            ],
            Duration::from_secs(600),
        )
    })
    .await
    .unwrap();
}

/// Go v0.2's own re-read races beside Rust against those between Go processes alone: a fleet
/// of two Rust and two Go v0.2 workers (one with an acquirer id) and a fleet of four Go v0.2
/// workers (two with one), each on a ConfigMap of its own, at the same time. Both must be free of
/// overlaps and lost updates; the races of each are printed per Go cycle (PROTOCOL.md, "Go v0.2
/// peers", has longer runs' figures: `LOCKGATE_FLEET_GO_CYCLES`, `LOCKGATE_FLEET_RUST_CYCLES`,
/// `LOCKGATE_FLEET_HOLD_MS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_v02_races_beside_rust_and_among_go_processes_alone() {
    let (mixed_url, go_url) = (configmap_url().await, configmap_url().await);
    // 10 Go cycles a worker in the suite's run (a fleet of four Go pollers takes a minute).
    let go = |args: &[&str]| {
        let mut w = go(args);
        if std::env::var_os("LOCKGATE_FLEET_GO_CYCLES").is_none() {
            w.cycles = 10;
        }
        w
    };
    // Every worker holds the lock this long in each cycle (none unless
    // `LOCKGATE_FLEET_HOLD_MS` says; PROTOCOL.md has both).
    let hold = std::env::var("LOCKGATE_FLEET_HOLD_MS").unwrap_or_else(|_| "0".into());
    let held = |mut w: Worker| {
        w.args.extend(["--hold-ms".to_owned(), hold.clone()]);
        w
    };
    let mixed_fleet = vec![
        held(rust(&[])),
        held(rust(&[])),
        held(go(&["--acquirer-id", "auto"])),
        held(go(&[])),
    ];
    let go_fleet = vec![
        held(go(&["--acquirer-id", "auto"])),
        held(go(&["--acquirer-id", "auto"])),
        held(go(&[])),
        held(go(&[])),
    ];
    let mixed = tokio::task::spawn_blocking(move || {
        run_fleet(&mixed_url, "rate", mixed_fleet, Duration::from_secs(900))
    });
    let go_only = tokio::task::spawn_blocking(move || {
        run_fleet(&go_url, "rate", go_fleet, Duration::from_secs(900))
    });
    let ((m, mc), (g, gc)) = (mixed.await.unwrap(), go_only.await.unwrap());
    let rate = |n: usize, c: u32| 100.0 * n as f64 / f64::from(c.max(1));
    eprintln!(
        "Go v0.2 races per 100 Go cycles: beside Rust {:.1} ({m} in {mc}), Go alone {:.1} ({g} in {gc})",
        rate(m, mc),
        rate(g, gc)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_go_v01_share_a_configmap_lock() {
    let url = configmap_url().await;
    tokio::task::spawn_blocking(move || {
        run_fleet(
            &url,
            "fleet",
            vec![
                rust(&[]),
                rust(&["-s", "--hold-ms", "10"]),
                go01(&[]),
                go01(&["-s", "--hold-ms", "10"]),
            ],
            Duration::from_secs(600),
        )
    })
    .await
    .unwrap();
}

#[test]
fn rust_and_go_v02_share_file_locks_while_both_collect_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file:{}", dir.path().display());
    // Both garbage collectors run all the time, deleting every idle lock file at once.
    let mut gcs = Fleet(vec![
        (
            "go gc".into(),
            Command::new(go_peer())
                .args([
                    "gc",
                    "--loop",
                    "--interval-ms",
                    "1",
                    "--min-age",
                    "0",
                    "--locker",
                    &url,
                ])
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        ),
        (
            "rust gc".into(),
            Command::new("sh")
                .args([
                    "-c",
                    &format!(
                        "while :; do {} --dir {} gc --older-than 0s >/dev/null || exit 1; done",
                        lockgate_testenv::rust_cli().display(),
                        dir.path().display()
                    ),
                ])
                .spawn()
                .unwrap(),
        ),
    ]);
    run_fleet(
        &url,
        "collected",
        vec![rust(&[]), rust(&["-s"]), go(&[]), go(&["-s"])],
        Duration::from_secs(300),
    );
    for (label, c) in &mut gcs.0 {
        assert!(
            c.try_wait().unwrap().is_none(),
            "{label} stopped during the run"
        );
    }
}

/// Go v0.2 takes a released shared record over for an exclusive request without clearing
/// `IsShared`: the record then says "shared" while a Go process holds it exclusively. A Rust
/// locker that saw the take-over must not join it. (One that did not see it cannot tell; see
/// PROTOCOL.md, "Go v0.2 peers".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_exclusive_holder_behind_a_shared_flag_is_not_joined() {
    use lockgate::kubernetes::{annotation_key, KubernetesLocker, LeaseConfig, Target};
    use lockgate::{AcquireError, AcquireOptions, Locker};
    let cm = lockgate_testenv::configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let record = || async {
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(lockgate_testenv::client(false).await, "default");
        let a = api
            .get(&cm)
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap_or_default();
        a.get(&annotation_key("flag"))
            .map(|v| serde_json::from_str::<serde_json::Value>(v).unwrap())
    };
    let rust = Locker::new(
        KubernetesLocker::new(
            lockgate_testenv::client(false).await,
            Target::configmap("default", &cm),
            LeaseConfig::default(),
        )
        .unwrap(),
    );
    // Go holds it shared (and the Rust locker sees that); a Go exclusive waiter with an acquirer
    // id queues behind.
    let u = url.clone();
    let shared = tokio::task::spawn_blocking(move || {
        lockgate_testenv::hold(&go_peer(), &u, &["-s"], "flag")
    })
    .await
    .unwrap();
    let e = rust
        .acquire("flag", AcquireOptions::exclusive().non_blocking())
        .await
        .expect_err("Go holds it");
    assert!(matches!(e, AcquireError::WouldBlock { .. }), "{e}");
    let mut exclusive = Command::new(go_peer())
        .args([
            "exec",
            "--locker",
            &url,
            "-q",
            "--acquirer-id",
            "auto",
            "flag",
            "--",
            "sh",
            "-c",
            "echo locked; read _ || true",
        ])
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while record()
        .await
        .is_none_or(|r| r["QueueMembers"].as_object().is_none_or(|q| q.is_empty()))
    {
        assert!(Instant::now() < deadline, "the Go waiter never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::spawn_blocking(move || lockgate_testenv::release(shared))
        .await
        .unwrap();
    let mut exclusive = tokio::task::spawn_blocking(move || {
        lockgate_testenv::expect_line(&mut exclusive, "locked");
        exclusive
    })
    .await
    .unwrap();
    let r = record().await.expect("a record");
    assert_eq!(
        (r["IsShared"].as_bool(), r["SharedHoldersCount"].as_i64()),
        (Some(true), Some(1)),
        "precondition: Go left the shared flag on its exclusive lease: {r}"
    );
    let e = rust
        .acquire("flag", AcquireOptions::shared().non_blocking())
        .await
        .expect_err("joined a lock Go holds exclusively");
    assert!(matches!(e, AcquireError::WouldBlock { .. }), "{e}");
    drop(exclusive.stdin.take());
    assert!(
        tokio::task::spawn_blocking(move || exclusive.wait().unwrap())
            .await
            .unwrap()
            .success()
    );
}
