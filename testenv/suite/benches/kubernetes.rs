//! Kubernetes-locker benchmarks on the real API server of the test environment, side by side
//! with Go lockgate (the peer's version, v0.2.0 by default) in the same run.
//!
//! Run: `testenv/kube up && source target/testenv/env.sh && cargo bench -p lockgate-testenv --bench kubernetes`
//! (`BENCH_QUICK=1` for a short run that checks the harness, as `scripts/test` does;
//! `BENCH_ONLY=4,5` for some tables only).
//!
//! Fairness rules every table follows:
//! - Clocks start after set-up on both sides: a Rust row builds its lockers (clients) and makes
//!   one acquire + release of a lock of its own before the clock; a Go row runs `lockgate-go
//!   bench --ready`, which does the same (client, API discovery, one warm-up cycle) before
//!   printing `ready`, and starts its loop on a line from the harness.
//! - The Go peer runs without client-go's client-side rate limiter (QPS 5, burst 10), which it
//!   lifts by default; one row of table 1 keeps client-go's defaults (`--client-go-defaults`):
//!   what an unconfigured werf gets.
//! - Throughput and per-cycle figures are the median of the same number of rounds for every
//!   row; handoffs are single samples with a random release moment, pooled.
//! - A time difference that comes out negative (a grant before the release) is a violation
//!   and fails the run; nothing is clamped.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use lockgate::kubernetes::{annotation_key, KubernetesLocker, LeaseConfig, Target};
use lockgate::{AcquireError, AcquireOptions, Error, Locker};
use lockgate_testenv::{client, go_peer, required_env, unique};

/// Sizes of one run: full, or quick (`BENCH_QUICK`, a check that the harness works).
struct Plan {
    rounds: usize,
    cycles: usize,
    go_default_cycles: usize,
    handoffs: usize,
    go_handoffs: usize,
    contended_each: usize,
    go_contended_each: usize,
    distinct_each: usize,
    /// Clients of table 4 (32; 8 in quick mode, a harness check that runs beside the whole
    /// test suite: 32 writers on one object there made a request wait past its timeout).
    distinct_clients: usize,
    plain_each: usize,
    big_filler: usize,
    renewal_secs: u64,
    capacity_name_pad: usize,
}

const FULL: Plan = Plan {
    rounds: 3,
    cycles: 50,
    go_default_cycles: 30,
    handoffs: 100,
    go_handoffs: 50,
    contended_each: 20,
    go_contended_each: 3,
    distinct_each: 10,
    distinct_clients: 32,
    plain_each: 10,
    big_filler: 200,
    renewal_secs: 30,
    capacity_name_pad: 0,
};

const QUICK: Plan = Plan {
    rounds: 1,
    cycles: 5,
    go_default_cycles: 3,
    handoffs: 4,
    go_handoffs: 2,
    contended_each: 3,
    go_contended_each: 1,
    distinct_each: 2,
    distinct_clients: 8,
    plain_each: 1,
    big_filler: 20,
    renewal_secs: 4,
    capacity_name_pad: 900,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let plan = if quick { &QUICK } else { &FULL };
    let go = go_label();
    println!("# lockgate Kubernetes benchmarks (kube-apiserver v1.37.2 + etcd on 127.0.0.1)");
    println!();
    println!(
        "Go peer: {go}, client-go rate limiter lifted (QPS 1000, burst 2000) unless a row says \
         otherwise. {} round(s) per row{}.",
        plan.rounds,
        if quick { " (BENCH_QUICK)" } else { "" }
    );
    println!();
    // BENCH_ONLY=4,5 runs only those tables.
    let only: Option<Vec<u32>> = std::env::var("BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let run = |table: u32| only.as_ref().is_none_or(|o| o.contains(&table));
    if run(1) {
        requests_per_cycle(plan, &go).await;
    }
    if run(2) {
        handoff(plan, &go).await;
    }
    if run(3) {
        contention(plan, &go).await;
    }
    if run(4) {
        distinct_locks(plan, &go).await;
    }
    if run(5) {
        server_cost(plan).await;
    }
    if run(6) {
        renewals(plan.renewal_secs).await;
    }
    if run(7) {
        capacity(plan.capacity_name_pad).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

async fn configmap() -> String {
    lockgate_testenv::empty_configmap("default").await
}

async fn locker(cm: &str) -> Locker {
    locker_on(Target::configmap("default", cm)).await
}

async fn locker_on(target: Target) -> Locker {
    Locker::new(KubernetesLocker::new(client(false).await, target, LeaseConfig::default()).unwrap())
}

/// One acquire + release of the lock `warm-up`: the locker's connection is open afterwards.
/// Every locker of an object warms up on the same lock, so that warm-ups leave one free record
/// on the object, not one each (releases keep their records; a table's writes would otherwise
/// carry dozens of records nobody uses).
async fn warm_up(l: &Locker) {
    l.acquire("warm-up", AcquireOptions::exclusive())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

fn url(cm: &str) -> String {
    format!("kubernetes://default/configmaps/{cm}")
}

fn go_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(go_peer());
    c.args(args)
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"));
    c
}

/// "Go lockgate vX.Y.Z", from `lockgate-go version`.
fn go_label() -> String {
    let out = go_cmd(&["version"]).output().unwrap();
    format!(
        "Go lockgate {}",
        String::from_utf8_lossy(&out.stdout).trim()
    )
}

/// `apiserver_request_total` for configmaps, by verb.
async fn requests() -> BTreeMap<String, f64> {
    let c = client(false).await;
    let text = c
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .unwrap();
    let mut by_verb = BTreeMap::new();
    for line in text.lines().filter(|l| {
        l.starts_with("apiserver_request_total{") && l.contains("resource=\"configmaps\"")
    }) {
        let verb = line
            .split("verb=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("?")
            .to_owned();
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *by_verb.entry(verb).or_default() += n;
    }
    by_verb
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, per: f64) -> (f64, String) {
    let mut total = 0.0;
    let mut parts = Vec::new();
    for (verb, n) in after {
        let d = n - before.get(verb).copied().unwrap_or(0.0);
        if d > 0.0 {
            total += d;
            parts.push(format!("{verb} {:.1}", d / per));
        }
    }
    (total / per, parts.join(", "))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `later - earlier` in nanoseconds of CLOCK_MONOTONIC; a negative difference is a violation.
fn ns_between(what: &str, earlier: u64, later: u64) -> Duration {
    assert!(
        later >= earlier,
        "{what}: granted {} ns BEFORE the release: a violation",
        earlier - later
    );
    Duration::from_nanos(later - earlier)
}

/// A small random generator (xorshift64*), seeded from the clock; the seed is printed.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = mono_ns() | 1;
        println!("(random release moments: seed {seed})");
        println!();
        Rng(seed)
    }

    /// Uniform in [0, max).
    fn below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        Duration::from_nanos(x % max.as_nanos() as u64)
    }
}

/// CPU time (user + system) used so far by the process whose pid is in `target/testenv/NAME.pid`.
fn server_cpu(name: &str) -> Duration {
    let state = required_env("LOCKGATE_TEST_STATE");
    let pid = std::fs::read_to_string(format!("{state}/{name}.pid")).unwrap();
    proc_cpu(pid.trim().parse().unwrap())
}

/// CPU time (user + system) used so far by process `pid` (also a zombie not yet reaped).
fn proc_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// CPU of kube-apiserver, etcd and the clients (the processes `pids`) over a piece of work.
struct Cpu {
    apiserver: Duration,
    etcd: Duration,
    clients: Duration,
}

impl Cpu {
    fn now(pids: &[u32]) -> Cpu {
        Cpu {
            apiserver: server_cpu("kube-apiserver"),
            etcd: server_cpu("etcd"),
            clients: pids.iter().map(|p| proc_cpu(*p)).sum(),
        }
    }

    fn since(&self, pids: &[u32]) -> Cpu {
        let now = Cpu::now(pids);
        Cpu {
            apiserver: now.apiserver - self.apiserver,
            etcd: now.etcd - self.etcd,
            clients: now.clients - self.clients,
        }
    }
}

/// This process: the Rust clients of a row.
fn me() -> Vec<u32> {
    vec![std::process::id()]
}

// ---------------------------------------------------------------------------------------------
// 1. Requests and time per uncontended cycle

async fn requests_per_cycle(plan: &Plan, go: &str) {
    let n = plan.cycles;
    println!("## 1. API requests per uncontended acquire + release ({n} cycles)");
    println!();
    println!(
        "Requests counted from the API server's `apiserver_request_total` (configmaps) over the \
         timed cycles; time per cycle: the median of {} rounds (rows alternating), clocks \
         started after set-up and one warm-up cycle on both sides. The last row keeps \
         client-go's default rate limiter ({} cycles a round).",
        plan.rounds, plan.go_default_cycles
    );
    println!();
    println!("| implementation | requests per cycle | by verb | time per cycle |");
    println!("|---|---|---|---|");
    let cm = configmap().await;
    let l = locker(&cm).await;
    warm_up(&l).await;
    let go_rows = [
        (go.to_owned(), n, vec![]),
        (
            format!("{go}, client-go defaults (QPS 5, burst 10)"),
            plan.go_default_cycles,
            vec!["--client-go-defaults"],
        ),
    ];
    // Per row: the time per cycle of each round, and the requests of the last round.
    let mut rows: Vec<(Vec<f64>, (f64, String))> = (0..3).map(|_| Default::default()).collect();
    for _ in 0..plan.rounds {
        let before = requests().await;
        let start = Instant::now();
        for _ in 0..n {
            l.acquire("cycle", AcquireOptions::exclusive())
                .await
                .unwrap()
                .release()
                .await
                .unwrap();
        }
        rows[0].0.push(start.elapsed().as_secs_f64() / n as f64);
        rows[0].1 = delta(&before, &requests().await, n as f64);
        for (row, (_, cycles, extra)) in rows[1..].iter_mut().zip(&go_rows) {
            let (cm, cycles, extra) = (cm.clone(), *cycles, extra.clone());
            let fleet = tokio::task::spawn_blocking(move || {
                GoFleet::start(&cm, &["go-cycle".to_owned()], cycles, &extra)
            })
            .await
            .unwrap();
            let before = requests().await;
            let (_, reports) = tokio::task::spawn_blocking(move || fleet.run())
                .await
                .unwrap();
            row.1 = delta(&before, &requests().await, cycles as f64);
            row.0.push(reports[0]["ns_per_op"].as_f64().unwrap() / 1e9);
        }
    }
    let labels = [
        "lockgate (Rust)".to_owned(),
        go_rows[0].0.clone(),
        go_rows[1].0.clone(),
    ];
    for (label, (times, (per_cycle, verbs))) in labels.iter().zip(rows) {
        println!(
            "| {label} | {per_cycle:.1} | {verbs} | {} |",
            ms(Duration::from_secs_f64(median(times)))
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// 2. Handoff

fn handoff_row(who: &str, samples: &mut [Duration]) {
    samples.sort();
    println!(
        "| {who} | {} | {} | {} | {} | {} | {} |",
        samples.len(),
        ms(samples[0]),
        ms(pct(samples, 0.5)),
        ms(pct(samples, 0.9)),
        ms(pct(samples, 0.99)),
        ms(samples[samples.len() - 1]),
    );
}

async fn handoff(plan: &Plan, go: &str) {
    println!("## 2. Handoff to a waiting process");
    println!();
    println!(
        "Time from the holder's release call to the waiter's grant. The holder releases at a \
         random moment, uniform in 0–2 s (Go's poll period) after the waiter's on-wait hook ran \
         (it found the lock busy and is waiting). Rust waiter: another locker with its own \
         client and watch; Go waiter: a `lockgate-go bench-wait` process of either version werf \
         pins, without an acquirer id (grant time on CLOCK_MONOTONIC), after a Rust holder and \
         after a `lockgate-go bench-hold` holder of its own version (release time taken just \
         before its Release call). A grant before the release fails the run."
    );
    println!();
    let mut rng = Rng::new();
    println!("| waiter | handoffs | min | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    let cm = configmap().await;
    let (holder, waiter) = (locker(&cm).await, locker(&cm).await);
    warm_up(&holder).await;
    warm_up(&waiter).await;
    // The floor: one conditional JSON patch of an annotation (`test` + `add`, then `test` +
    // `remove`), timed by a client of its own, interleaved with the handoffs.
    let api: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let (pkey, pointer) = ("bench-patch", "/metadata/annotations/bench-patch");
    let mut patches = Vec::new();
    // And the floor of a handoff in one write: from sending such a patch until another client's
    // watch of the object delivers it.
    let mut seen = Vec::new();
    let watcher: Api<ConfigMap> = Api::namespaced(client(false).await, "default");
    let rv = watcher
        .get(&cm)
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let wp = kube::api::WatchParams::default().fields(&format!("metadata.name={cm}"));
    let mut events = futures::StreamExt::boxed(watcher.watch(&wp, &rv).await.unwrap());
    let mut samples = Vec::new();
    for _ in 0..plan.handoffs {
        for add in [true, false] {
            let patch = plain_patch(Writer::Json, pkey, pointer, "v", add);
            let t = Instant::now();
            api.patch(&cm, &PatchParams::default(), &patch)
                .await
                .unwrap();
            patches.push(t.elapsed());
            loop {
                let ev = futures::TryStreamExt::try_next(&mut events)
                    .await
                    .unwrap()
                    .expect("the watch goes on");
                if let kube::api::WatchEvent::Modified(o) = ev {
                    let has = o.metadata.annotations.is_some_and(|a| a.contains_key(pkey));
                    if has == add {
                        seen.push(t.elapsed());
                        break;
                    }
                }
            }
        }
        let g = holder
            .acquire("handoff", AcquireOptions::exclusive())
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let w = waiter.clone();
        let task = tokio::spawn(async move {
            let opts = AcquireOptions::exclusive().on_wait(move |_| {
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
            });
            let g = w.acquire("handoff", opts).await.unwrap();
            let at = Instant::now();
            g.release().await.unwrap();
            at
        });
        rx.await.expect("the waiter waits");
        tokio::time::sleep(rng.below(Duration::from_secs(2))).await;
        let released = Instant::now();
        g.release().await.unwrap();
        let granted = task.await.unwrap();
        let d = granted.checked_duration_since(released).unwrap_or_else(|| {
            panic!(
                "Rust handoff: granted {:?} BEFORE the release: a violation",
                released - granted
            )
        });
        samples.push(d);
    }
    handoff_row("lockgate (Rust)", &mut samples);
    handoff_row(
        "one conditional PATCH of an annotation (its answer; same run)",
        &mut patches,
    );
    handoff_row(
        "one conditional PATCH, until another client's watch delivers it (same run)",
        &mut seen,
    );

    // Go waiters (both versions werf pins, neither in the queue: no acquirer id), after a
    // Rust holder and after a Go holder of their own version, side by side.
    for (version, peer) in [
        ("v0.2.0", lockgate_testenv::go_peer()),
        ("v0.1.1", lockgate_testenv::go_peer_v01()),
    ] {
        for rust_holder in [true, false] {
            let name = format!(
                "go-handoff-{version}-{}",
                if rust_holder { "rust" } else { "go" }
            );
            let mut samples = go_handoffs(
                plan,
                &cm,
                &peer,
                rust_holder.then_some(&holder),
                &name,
                &mut rng,
            )
            .await;
            let who = if rust_holder {
                format!("Go lockgate {version}, after a Rust holder")
            } else {
                format!("Go lockgate {version}, after a Go {version} holder")
            };
            handoff_row(&who, &mut samples);
        }
    }
    let _ = go;
    println!();
}

/// A line of a child's stdout.
fn line_of(out: &mut impl BufRead) -> String {
    tokio::task::block_in_place(|| {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line.trim().to_owned()
    })
}

/// `plan.go_handoffs` handoffs to a `bench-wait` process of `peer`, from `rust` (a Rust
/// locker) or from a `bench-hold` process of the same peer.
async fn go_handoffs(
    plan: &Plan,
    cm: &str,
    peer: &std::path::Path,
    rust: Option<&Locker>,
    name: &str,
    rng: &mut Rng,
) -> Vec<Duration> {
    let spawn = |what: &str| {
        let mut c = Command::new(peer)
            .args([what, "--locker", &url(cm), "--name", name])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = c.stdin.take().unwrap();
        let stdout = BufReader::new(c.stdout.take().unwrap());
        (c, stdin, stdout)
    };
    let (mut waiter, mut w_in, mut w_out) = spawn("bench-wait");
    let mut go_holder = rust.is_none().then(|| spawn("bench-hold"));
    let mut samples = Vec::new();
    for _ in 0..plan.go_handoffs {
        let rust_guard = match (rust, go_holder.as_mut()) {
            (Some(l), _) => Some(l.acquire(name, AcquireOptions::exclusive()).await.unwrap()),
            (None, Some((_, h_in, h_out))) => {
                writeln!(h_in, "hold").unwrap();
                h_in.flush().unwrap();
                assert_eq!(line_of(h_out), "held");
                None
            }
            (None, None) => unreachable!(),
        };
        writeln!(w_in, "go").unwrap();
        w_in.flush().unwrap();
        assert_eq!(line_of(&mut w_out), "waiting");
        tokio::time::sleep(rng.below(Duration::from_secs(2))).await;
        let released = match (rust_guard, go_holder.as_mut()) {
            (Some(g), _) => {
                let at = mono_ns();
                g.release().await.unwrap();
                at
            }
            (None, Some((_, h_in, h_out))) => {
                writeln!(h_in, "release").unwrap();
                h_in.flush().unwrap();
                let line = line_of(h_out);
                let at: u64 = line
                    .strip_prefix("releasing ")
                    .unwrap_or_else(|| panic!("bench-hold: {line}"))
                    .parse()
                    .unwrap();
                assert_eq!(line_of(h_out), "released");
                at
            }
            (None, None) => unreachable!(),
        };
        let line = line_of(&mut w_out);
        let granted: u64 = line
            .strip_prefix("granted ")
            .unwrap_or_else(|| panic!("bench-wait: {line}"))
            .parse()
            .unwrap();
        samples.push(ns_between("Go handoff", released, granted));
    }
    drop(w_in);
    assert!(waiter.wait().unwrap().success());
    if let Some((mut h, h_in, _)) = go_holder {
        drop(h_in);
        assert!(h.wait().unwrap().success());
    }
    samples
}

// ---------------------------------------------------------------------------------------------
// Timed runs: wall time, and the servers' CPU over exactly that time

/// One timed run of many clients started together.
struct Timed {
    wall: Duration,
    cpu: Cpu,
    /// Requests for configmaps the API server counted over the run (0 if not counted).
    requests: f64,
}

/// The rounds of one table row.
#[derive(Default)]
struct Rounds {
    walls: Vec<Duration>,
    apiserver: Duration,
    etcd: Duration,
    clients: Duration,
    requests: f64,
}

impl Rounds {
    fn push(&mut self, t: Timed) {
        self.walls.push(t.wall);
        self.apiserver += t.cpu.apiserver;
        self.etcd += t.cpu.etcd;
        self.clients += t.cpu.clients;
        self.requests += t.requests;
    }

    /// API requests per operation, over all rounds.
    fn requests_per_op(&self, ops_per_round: usize) -> f64 {
        self.requests / (ops_per_round * self.walls.len()) as f64
    }

    /// kube-apiserver CPU per API request, in milliseconds, over all rounds.
    fn apiserver_ms_per_request(&self) -> f64 {
        self.apiserver.as_secs_f64() * 1e3 / self.requests
    }

    /// The median wall time, in seconds.
    fn wall(&self) -> f64 {
        median(self.walls.iter().map(Duration::as_secs_f64).collect())
    }

    /// Operations per second at the median wall time.
    fn rate(&self, ops: usize) -> f64 {
        ops as f64 / self.wall()
    }

    /// CPU of kube-apiserver, etcd and the clients as a share of the rounds' wall time.
    fn shares(&self) -> (String, String, String) {
        let busy: f64 = self.walls.iter().map(Duration::as_secs_f64).sum();
        let share = |d: Duration| format!("{:.0} %", d.as_secs_f64() / busy * 100.0);
        (share(self.apiserver), share(self.etcd), share(self.clients))
    }

    /// CPU of kube-apiserver and etcd per operation, over all rounds.
    fn per_op(&self, ops_per_round: usize) -> (String, String) {
        let ops = (ops_per_round * self.walls.len()) as f64;
        let per = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3 / ops);
        (per(self.apiserver), per(self.etcd))
    }
}

/// Go `bench --ready` processes: set up, warmed up, waiting for the start line.
struct GoFleet {
    procs: Vec<(Child, ChildStdin, BufReader<ChildStdout>)>,
}

impl GoFleet {
    /// Starts one `bench --ready` per name and waits until all are ready.
    fn start(cm: &str, names: &[String], iterations: usize, extra: &[&str]) -> GoFleet {
        let procs = names
            .iter()
            .map(|name| {
                let mut c = go_cmd(&["bench", "--ready", "--locker", &url(cm), "--name", name])
                    .args(["--iterations", &iterations.to_string()])
                    .args(extra)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let stdin = c.stdin.take().unwrap();
                let stdout = BufReader::new(c.stdout.take().unwrap());
                (c, stdin, stdout)
            })
            .collect::<Vec<_>>();
        let mut fleet = GoFleet { procs };
        for (_, _, out) in &mut fleet.procs {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "a Go bench process did not get ready");
        }
        fleet
    }

    /// Starts every loop; returns the wall time from the start line to the last loop's end,
    /// the servers' CPU over it, and the JSON reports.
    fn run(mut self) -> (Timed, Vec<serde_json::Value>) {
        let pids: Vec<u32> = self.procs.iter().map(|(c, _, _)| c.id()).collect();
        let cpu = Cpu::now(&pids);
        let start = mono_ns();
        for (_, stdin, _) in &mut self.procs {
            writeln!(stdin, "go").unwrap();
            stdin.flush().unwrap();
        }
        let mut end = 0;
        let mut reports = Vec::new();
        for (_, _, out) in &mut self.procs {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let report: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            end = end.max(report["end_mono_ns"].as_u64().unwrap());
            reports.push(report);
        }
        // Before reaping: a process that exited is still there to read.
        let cpu = cpu.since(&pids);
        for (mut c, _, _) in self.procs {
            assert!(c.wait().unwrap().success(), "a Go bench process failed");
        }
        let wall = ns_between("Go fleet", start, end);
        let requests = 0.0;
        (
            Timed {
                wall,
                cpu,
                requests,
            },
            reports,
        )
    }
}

/// A Go fleet on `cm`, one process per name, run to the end.
async fn go_run(cm: &str, names: Vec<String>, each: usize) -> Timed {
    let cm = cm.to_owned();
    let fleet = tokio::task::spawn_blocking(move || GoFleet::start(&cm, &names, each, &[]))
        .await
        .unwrap();
    let before = requests().await;
    let mut timed = tokio::task::spawn_blocking(move || fleet.run().0)
        .await
        .unwrap();
    timed.requests = delta(&before, &requests().await, 1.0).0;
    timed
}

/// `clients` Rust lockers on `target` (own clients, warmed up), each acquiring and releasing
/// `name(i)` `each` times (holding it for `hold` each time), all started together.
async fn rust_run(
    target: &Target,
    clients: usize,
    each: usize,
    hold: Duration,
    name: impl Fn(usize) -> String,
) -> Timed {
    let mut ls = Vec::new();
    for _ in 0..clients {
        let l = locker_on(target.clone()).await;
        warm_up(&l).await;
        ls.push(l);
    }
    let gate = Arc::new(tokio::sync::Barrier::new(clients + 1));
    // Who held each lock, in the order they were granted it (pushed while holding).
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tasks: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let n = name(i);
            let gate = gate.clone();
            let order = order.clone();
            tokio::spawn(async move {
                gate.wait().await;
                for _ in 0..each {
                    let g = l.acquire(&n, AcquireOptions::exclusive()).await.unwrap();
                    order.lock().unwrap().push((n.clone(), i));
                    if !hold.is_zero() {
                        tokio::time::sleep(hold).await;
                    }
                    if let Err(e) = g.release().await {
                        FAILED_RELEASES.lock().unwrap().push(chain(&e));
                    }
                }
            })
        })
        .collect();
    let before = requests().await;
    let cpu = Cpu::now(&me());
    let start = Instant::now();
    gate.wait().await;
    for t in tasks {
        t.await.unwrap();
    }
    let wall = start.elapsed();
    let cpu = cpu.since(&me());
    let after = requests().await;
    let order = order.lock().unwrap();
    let (mut kept, mut passed) = (0usize, 0usize);
    let mut last = std::collections::HashMap::new();
    for (n, i) in order.iter() {
        match last.insert(n.clone(), *i) {
            Some(j) if j == *i => kept += 1,
            Some(_) => passed += 1,
            None => {}
        }
    }
    let share = kept as f64 / (kept + passed).max(1) as f64;
    RETAKEN.lock().unwrap().push(share);
    eprintln!(
        "rust round: {clients} × {each} in {wall:?}, requests {}, taken again by the last holder {:.0} %",
        delta(&before, &after, (clients * each) as f64).1,
        100.0 * share
    );
    Timed {
        wall,
        cpu,
        requests: delta(&before, &after, 1.0).0,
    }
}

// ---------------------------------------------------------------------------------------------
// 3. and 4. Many clients

/// How long each contender of table 3's second row holds the lock: long enough for the
/// contender that just released to queue again while the next one holds it.
const CONTENDED_HOLD: Duration = Duration::from_millis(5);

async fn contention(plan: &Plan, go: &str) {
    let n = 16;
    println!("## 3. {n} contenders for one lock");
    println!();
    println!(
        "Each contender (a locker with its own client for Rust, a process for Go) acquires and \
         releases the same exclusive lock repeatedly; all start together after set-up (one \
         warm-up cycle each, on another lock). Every round on a new ConfigMap. Wall time: \
         the median of {} rounds, the rows' rounds alternating. The first row releases the \
         moment it is granted the lock, so the contender that just released races the next \
         release to queue again; in the second, each holds the lock {} ms, and the others \
         queue meanwhile. \"One locker alone\" makes all {} acquisitions by itself, with nobody \
         to conflict with: two writes on the record per acquisition, one after the other (the \
         grant, the release), which every acquisition needs whatever the number of contenders \
         (its grant or its queue entry, and its release; writes on one record apply one at a \
         time): the ceiling of the first row.",
        plan.rounds,
        CONTENDED_HOLD.as_millis(),
        n * plan.contended_each,
    );
    println!();
    println!(
        "| implementation | acquisitions | wall time | acquisitions/s | API requests per \
         acquisition | kube-apiserver CPU | etcd CPU | clients' CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let (mut rust, mut held, mut alone, mut go_rounds) = (
        Rounds::default(),
        Rounds::default(),
        Rounds::default(),
        Rounds::default(),
    );
    // Per row: the share of acquisitions taken again by the contender that just released.
    let (mut rust_kept, mut held_kept) = (Vec::new(), Vec::new());
    for _ in 0..plan.rounds {
        let contended = |hold| async move {
            let cm = configmap().await;
            let target = Target::configmap("default", &cm);
            rust_run(&target, n, plan.contended_each, hold, |_| {
                "rust-contended".into()
            })
            .await
        };
        rust.push(contended(Duration::ZERO).await);
        rust_kept.push(retaken());
        held.push(contended(CONTENDED_HOLD).await);
        held_kept.push(retaken());
        // The ceiling: every acquisition makes at least two writes on the record, one after
        // the other (the grant or queue entry, then the release); a locker alone makes
        // exactly those, with nobody to conflict with.
        let cm = configmap().await;
        let target = Target::configmap("default", &cm);
        alone.push(
            rust_run(&target, 1, n * plan.contended_each, Duration::ZERO, |_| {
                "rust-alone".into()
            })
            .await,
        );
        let cm = configmap().await;
        let names = vec!["go-contended".to_owned(); n];
        go_rounds.push(go_run(&cm, names, plan.go_contended_each).await);
    }
    // `clients` × `each` acquisitions a round.
    let row = |who: &str, clients: usize, each: usize, r: &Rounds| {
        let rate = r.rate(clients * each);
        let (api, etcd, clients_cpu) = r.shares();
        println!(
            "| {who} | {clients} × {each} | {:.2} s | {rate:.1} | {:.1} | {api} | {etcd} | {clients_cpu} |",
            r.wall(),
            r.requests_per_op(clients * each),
        );
        rate
    };
    let rust_rate = row("lockgate (Rust)", n, plan.contended_each, &rust);
    let alone_rate = row(
        "lockgate (Rust), one locker alone",
        1,
        n * plan.contended_each,
        &alone,
    );
    let held_rate = row(
        &format!(
            "lockgate (Rust), each holding it {} ms",
            CONTENDED_HOLD.as_millis()
        ),
        n,
        plan.contended_each,
        &held,
    );
    let go_rate = row(go, n, plan.go_contended_each, &go_rounds);
    println!();
    let range = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!(
            "{:.0}–{:.0} %",
            v.first().copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0)
        )
    };
    println!(
        "Acquisitions that went to the contender that had just released the lock (it kept \
         it, rather than passing it on): {} of them releasing at once, {} holding it {} ms \
         (passed round in arrival order, none; to a contender picked at random, 1 in {n}).",
        range(&mut rust_kept),
        range(&mut held_kept),
        CONTENDED_HOLD.as_millis()
    );
    println!();
    println!("Rust / Go: {:.1}×", rust_rate / go_rate);
    println!();
    println!(
        "{n} contenders releasing at once reach {:.0} % of one locker alone.",
        100.0 * rust_rate / alone_rate
    );
    println!();
    let hop = 1e3 / held_rate - CONTENDED_HOLD.as_secs_f64() * 1e3;
    println!(
        "With a {} ms hold: {hop:.1} ms per acquisition beyond the hold.",
        CONTENDED_HOLD.as_millis()
    );
    println!();
}

async fn distinct_locks(plan: &Plan, go: &str) {
    let n = plan.distinct_clients;
    let each = plan.distinct_each;
    println!("## 4. {n} clients × {n} distinct locks on one object");
    println!();
    println!(
        "Each client acquires and releases its own lock; the locks share one ConfigMap. In the \
         same run, the API server's own limit: {n} clients (own kube clients) each write plain \
         conditional JSON patches to an annotation of its own on one ConfigMap (`test` the key \
         absent + `add` a record-sized value, then `test` the value + `remove`: the two writes \
         a lock cycle needs at the least); and the same with the record kept between cycles \
         (`test` + `add` a held value, then `test` + `add` a free one), as lockgate's and Go \
         lockgate v0.2's releases leave it. Every round makes a new ConfigMap for each row; the \
         rows' rounds alternate. Wall time: the median of {} rounds; CPU: kube-apiserver and \
         etcd during the timed runs, as a share of their wall time (100 % = one core).",
        plan.rounds
    );
    println!();
    println!(
        "| implementation | operations | wall time | per second | API requests each | kube-apiserver CPU | etcd CPU | clients' CPU | kube-apiserver CPU per request |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let (mut rust, mut go_rounds, mut plain, mut kept) = (
        Rounds::default(),
        Rounds::default(),
        Rounds::default(),
        Rounds::default(),
    );
    let mut retried = 0;
    for round in 0..plan.rounds {
        let cm = create_object(Object::ConfigMap, 0).await;
        let target = Target::configmap("default", &cm);
        rust.push(
            rust_run(&target, n, each, Duration::ZERO, |i| {
                format!("rust-distinct-{round}-{i}")
            })
            .await,
        );
        let cm = create_object(Object::ConfigMap, 0).await;
        let names = (0..n).map(|i| format!("go-distinct-{round}-{i}")).collect();
        go_rounds.push(go_run(&cm, names, each).await);
        let p = plain_run(Object::ConfigMap, n, each, Writer::Json, 0).await;
        retried += p.retried;
        plain.push(p.timed);
        let p = plain_run(Object::ConfigMap, n, each, Writer::JsonKept, 0).await;
        retried += p.retried;
        kept.push(p.timed);
    }
    let row = |who: &str, ops: usize, r: &Rounds| {
        let rate = r.rate(n * ops);
        let (api, etcd, clients) = r.shares();
        println!(
            "| {who} | {n} × {ops} | {:.2} s | {rate:.1} | {:.2} | {api} | {etcd} | {clients} | {:.2} ms |",
            r.wall(),
            r.requests_per_op(n * ops),
            r.apiserver_ms_per_request(),
        );
        rate
    };
    let rust_rate = row("lockgate (Rust), acquire + release", each, &rust);
    let go_rate = row(&format!("{go}, acquire + release"), each, &go_rounds);
    let plain_rate = row("plain conditional JSON patches (writes)", 2 * each, &plain);
    let kept_rate = row(
        "plain conditional JSON patches, the record kept (writes)",
        2 * each,
        &kept,
    );
    println!();
    println!(
        "lockgate: {:.1}× Go; {:.2} cycles per plain write (goal ≥ 0.45; 0.5 = two writes a \
         cycle at the server's own rate). By the API server's CPU: a plain write costs {:.2} \
         ms, a lockgate cycle {:.2} ms ({:.2} plain writes).",
        rust_rate / go_rate,
        rust_rate / plain_rate,
        plain.apiserver_ms_per_request(),
        rust.apiserver.as_secs_f64() * 1e3 / (n * each * rust.walls.len()) as f64,
        rust.apiserver.as_secs_f64()
            / (n * each * rust.walls.len()) as f64
            / (plain.apiserver.as_secs_f64() / plain.requests),
    );
    println!();
    println!(
        "With the records kept between cycles (as lockgate and Go lockgate v0.2 leave them): \
         {:.2} lockgate cycles per plain write.",
        rust_rate / kept_rate
    );
    if retried > 0 {
        println!();
        println!("The server answered {retried} plain writes with 504 or 429 (retried).");
    }
    release_failures();
    println!();
}

/// Releases that failed in the Rust rows since the last call (the lease then runs out by
/// itself): their number and the first error, printed under the table.
static FAILED_RELEASES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// For each [`rust_run`], the share of its acquisitions (after the first) that went to the
/// contender that held the lock just before: a lock kept by one contender, not passed on.
static RETAKEN: std::sync::Mutex<Vec<f64>> = std::sync::Mutex::new(Vec::new());

/// The last [`RETAKEN`] share, in percent.
fn retaken() -> f64 {
    100.0 * RETAKEN.lock().unwrap().last().copied().unwrap_or(0.0)
}

fn release_failures() {
    let failed = std::mem::take(&mut *FAILED_RELEASES.lock().unwrap());
    if let Some(first) = failed.first() {
        println!();
        println!(
            "**{} lockgate releases failed** (each lock then stays held until its lease runs \
             out); the first: `{first}`",
            failed.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. The API server's cost per write

#[derive(Clone, Copy, PartialEq)]
enum Object {
    ConfigMap,
    Lease,
}

impl Object {
    fn label(self) -> &'static str {
        match self {
            Object::ConfigMap => "ConfigMap",
            Object::Lease => "Lease",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Writer {
    /// `test` + `add`, then `test` + `remove`: conditional on the key's own value.
    Json,
    /// The same, each client with a field manager of its own (`?fieldManager=`).
    JsonOwnManager,
    /// The same, and every patch also resets `metadata.managedFields` (`[{}]`): the server
    /// then keeps no field ownership for the object.
    JsonResetManagedFields,
    /// Unconditional merge patches (add the key, then set it to null): no `test`.
    Merge,
    /// `test` + `add` a held value, then `test` + `add` a free one: the record stays on the
    /// object between cycles, as lockgate's and Go lockgate v0.2's releases leave it.
    JsonKept,
}

impl Writer {
    fn label(self) -> &'static str {
        match self {
            Writer::Json => "conditional JSON patch",
            Writer::JsonOwnManager => "conditional JSON patch, a field manager per client",
            Writer::JsonResetManagedFields => "conditional JSON patch + managedFields reset",
            Writer::Merge => "unconditional merge patch",
            Writer::JsonKept => "conditional JSON patch, the record kept (free) between cycles",
        }
    }
}

/// [`record_value`] released: held by nobody.
fn free_value(held: &str) -> String {
    held.replace("\"SharedHoldersCount\":1", "\"SharedHoldersCount\":0")
}

/// A record-sized value, like a lock record.
fn record_value(i: usize) -> String {
    serde_json::json!({"uuid": format!("{i:08x}-0000-4000-8000-000000000000"),
        "lockName": format!("plain-{i}"), "ExpireAtTimestamp": 1_800_000_000u64,
        "SharedHoldersCount": 1, "IsShared": false, "QueueMembers": {},
        "Renewals": 1_234_567_890_123u64})
    .to_string()
}

/// A new object with one foreign annotation and `filler` lock records in its annotations.
async fn create_object(kind: Object, filler: usize) -> String {
    let name = unique("bench");
    // Never an empty annotations map: a JSON patch's `add` of a key needs the map to exist.
    let mut annotations: BTreeMap<String, String> = (0..filler)
        .map(|i| (annotation_key(&format!("filler-{i}")), record_value(i)))
        .collect();
    annotations.insert("example.com/keep".into(), "me".into());
    let metadata = ObjectMeta {
        name: Some(name.clone()),
        annotations: Some(annotations),
        ..Default::default()
    };
    let c = client(false).await;
    match kind {
        Object::ConfigMap => {
            let cm = ConfigMap {
                metadata,
                ..Default::default()
            };
            Api::<ConfigMap>::namespaced(c, "default")
                .create(&PostParams::default(), &cm)
                .await
                .unwrap();
        }
        Object::Lease => {
            let lease = Lease {
                metadata,
                ..Default::default()
            };
            Api::<Lease>::namespaced(c, "default")
                .create(&PostParams::default(), &lease)
                .await
                .unwrap();
        }
    }
    name
}

fn dynamic_api(c: kube::Client, kind: Object) -> Api<kube::api::DynamicObject> {
    let resource = match kind {
        Object::ConfigMap => kube::api::ApiResource::erase::<ConfigMap>(&()),
        Object::Lease => kube::api::ApiResource::erase::<Lease>(&()),
    };
    Api::namespaced_with(c, "default", &resource)
}

async fn target_for(kind: Object, name: &str) -> Target {
    match kind {
        Object::ConfigMap => Target::configmap("default", name),
        Object::Lease => Target::discover(
            &client(false).await,
            "leases.coordination.k8s.io",
            Some("default".into()),
            name,
        )
        .await
        .unwrap(),
    }
}

/// One round of plain writes.
struct PlainRun {
    timed: Timed,
    /// Writes the server answered 504 or 429 to (retried).
    retried: usize,
    /// The size of the object's managedFields (JSON) after the round.
    managed_fields: usize,
}

/// `clients` clients (own kube clients, connections open) each write `each` add/remove pairs to
/// a key of their own on a new object with `filler` other lock annotations, all started
/// together.
async fn plain_run(
    kind: Object,
    clients: usize,
    each: usize,
    writer: Writer,
    filler: usize,
) -> PlainRun {
    let name = create_object(kind, filler).await;
    let mut apis = Vec::new();
    for _ in 0..clients {
        let api = dynamic_api(client(false).await, kind);
        api.get(&name).await.unwrap(); // the connection is open
        apis.push(api);
    }
    let gate = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let tasks: Vec<_> = apis
        .into_iter()
        .enumerate()
        .map(|(i, api)| {
            let gate = gate.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let key = annotation_key(&format!("plain-{i}"));
                let pointer = format!("/metadata/annotations/{}", key.replace('/', "~1"));
                let value = record_value(i);
                let params = PatchParams {
                    field_manager: (writer == Writer::JsonOwnManager)
                        .then(|| format!("client-{i}")),
                    ..Default::default()
                };
                let patches: Vec<Patch<serde_json::Value>> = [true, false]
                    .into_iter()
                    .map(|add| plain_patch(writer, &key, &pointer, &value, add))
                    .collect();
                if writer == Writer::JsonKept {
                    // The free record, before the timed run (as a warm-up leaves it).
                    let ops = serde_json::json!([
                        {"op": "test", "path": pointer, "value": null},
                        {"op": "add", "path": pointer, "value": free_value(&value)},
                    ]);
                    let free =
                        Patch::Json::<serde_json::Value>(serde_json::from_value(ops).unwrap());
                    api.patch(&name, &params, &free).await.unwrap();
                }
                let mut retried = 0;
                gate.wait().await;
                for _ in 0..each {
                    for patch in &patches {
                        // The server may give up on a write it could not fit in between the
                        // others (504) or shed it (429): retried, and counted.
                        loop {
                            match api.patch(&name, &params, patch).await {
                                Ok(_) => break,
                                Err(kube::Error::Api(s)) if s.code == 429 || s.code >= 500 => {
                                    retried += 1
                                }
                                Err(e) => panic!("plain patch: {e}"),
                            }
                        }
                    }
                }
                retried
            })
        })
        .collect();
    let before = requests().await;
    let cpu = Cpu::now(&me());
    let start = Instant::now();
    gate.wait().await;
    let mut retried = 0;
    for t in tasks {
        retried += t.await.unwrap();
    }
    let wall = start.elapsed();
    let cpu = cpu.since(&me());
    let timed = Timed {
        wall,
        cpu,
        requests: delta(&before, &requests().await, 1.0).0,
    };
    let obj = dynamic_api(client(false).await, kind)
        .get(&name)
        .await
        .unwrap();
    PlainRun {
        timed,
        retried,
        managed_fields: serde_json::to_string(&obj.metadata.managed_fields)
            .unwrap()
            .len(),
    }
}

fn plain_patch(
    writer: Writer,
    key: &str,
    pointer: &str,
    value: &str,
    add: bool,
) -> Patch<serde_json::Value> {
    use serde_json::{json, Value};
    if writer == Writer::Merge {
        let value = if add { Value::from(value) } else { Value::Null };
        return Patch::Merge(json!({"metadata": {"annotations": {key: value}}}));
    }
    let mut ops = if writer == Writer::JsonKept {
        let (from, to) = if add {
            (free_value(value), value.to_owned())
        } else {
            (value.to_owned(), free_value(value))
        };
        json!([
            {"op": "test", "path": pointer, "value": from},
            {"op": "add", "path": pointer, "value": to},
        ])
    } else if add {
        json!([
            {"op": "test", "path": pointer, "value": null},
            {"op": "add", "path": pointer, "value": value},
        ])
    } else {
        json!([
            {"op": "test", "path": pointer, "value": value},
            {"op": "remove", "path": pointer},
        ])
    };
    if writer == Writer::JsonResetManagedFields {
        ops.as_array_mut()
            .unwrap()
            .push(json!({"op": "replace", "path": "/metadata/managedFields", "value": [{}]}));
    }
    Patch::Json(serde_json::from_value(ops).unwrap())
}

/// One client's sequential acquire + release cycles on a new object with `filler` other locks.
async fn rust_sequential(cycles: usize, filler: usize) -> Timed {
    let name = create_object(Object::ConfigMap, filler).await;
    let l = locker(&name).await;
    warm_up(&l).await;
    let cpu = Cpu::now(&me());
    let start = Instant::now();
    for _ in 0..cycles {
        l.acquire("sequential", AcquireOptions::exclusive())
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    let wall = start.elapsed();
    Timed {
        wall,
        cpu: cpu.since(&me()),
        requests: 0.0,
    }
}

async fn server_cost(plan: &Plan) {
    // As table 4: 32 clients, 8 in quick mode (32 writers on one object beside the whole
    // suite made a lockgate release on the Lease wait past its request timeout).
    let n = plan.distinct_clients;
    let each = plan.plain_each;
    let big = plan.big_filler;
    println!("## 5. What a write costs the API server");
    println!();
    println!(
        "Plain writes as in table 4 ({n} clients, a key of their own each, on one new object per \
         round, {} writes a row), with one thing changed per row; the last row is lockgate itself \
         on a Lease. Rows alternate within each of {} rounds. Rate: at the median wall time; CPU per write: over \
         all rounds; managedFields: its size (JSON bytes) on the object after a round; 504/429: \
         writes the server gave up on or shed (retried).",
        n * 2 * each,
        plan.rounds
    );
    println!();
    println!(
        "| writer | object | clients | other locks on it | writes/s | kube-apiserver CPU per write | etcd CPU per write | managedFields | 504/429 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // (writer, object, clients, other locks on it); every row writes n * 2 * each times.
    let variants = [
        (Writer::Json, Object::ConfigMap, n, 0),
        (Writer::Json, Object::ConfigMap, 8, 0),
        (Writer::Json, Object::ConfigMap, 1, 0),
        (Writer::JsonOwnManager, Object::ConfigMap, n, 0),
        (Writer::JsonResetManagedFields, Object::ConfigMap, n, 0),
        (Writer::Merge, Object::ConfigMap, n, 0),
        (Writer::Json, Object::Lease, n, 0),
        (Writer::Json, Object::ConfigMap, n, big),
        (Writer::JsonResetManagedFields, Object::ConfigMap, n, big),
        (Writer::Json, Object::ConfigMap, 1, big),
    ];
    let mut results: Vec<(Rounds, usize, usize)> = (0..variants.len())
        .map(|_| (Rounds::default(), 0, 0))
        .collect();
    let mut lease = Rounds::default();
    for _ in 0..plan.rounds {
        for (i, &(writer, kind, clients, filler)) in variants.iter().enumerate() {
            let run = plain_run(kind, clients, each * n / clients, writer, filler).await;
            results[i].0.push(run.timed);
            results[i].1 += run.retried;
            results[i].2 = run.managed_fields;
        }
        let name = create_object(Object::Lease, 0).await;
        let target = target_for(Object::Lease, &name).await;
        lease.push(
            rust_run(&target, n, plan.distinct_each, Duration::ZERO, |i| {
                format!("distinct-{i}")
            })
            .await,
        );
    }
    for ((writer, kind, clients, filler), (rounds, retried, managed)) in
        variants.iter().zip(&results)
    {
        let writes = n * 2 * each;
        let (api, etcd) = rounds.per_op(writes);
        println!(
            "| {} | {} | {clients} | {filler} | {:.1} | {api} | {etcd} | {managed} B | {retried} |",
            writer.label(),
            kind.label(),
            rounds.rate(writes),
        );
    }
    let writes = n * 2 * plan.distinct_each;
    let (api, etcd) = lease.per_op(writes);
    println!(
        "| lockgate acquire + release ({:.1} cycles/s) | Lease | {n} | 0 | {:.1} | {api} | {etcd} | | |",
        lease.rate(n * plan.distinct_each),
        lease.rate(writes),
    );
    println!();

    let cycles = plan.cycles * 2;
    println!(
        "One client, {cycles} sequential lockgate acquire + release cycles (2 writes each) on a \
         ConfigMap with other locks held on it; the median of {} rounds:",
        plan.rounds
    );
    println!();
    println!("| other locks on the object | cycles/s | kube-apiserver CPU per cycle |");
    println!("|---|---|---|");
    let fillers = [0, 32, big];
    let mut rows: Vec<Rounds> = fillers.iter().map(|_| Rounds::default()).collect();
    for _ in 0..plan.rounds {
        for (row, &filler) in rows.iter_mut().zip(&fillers) {
            row.push(rust_sequential(cycles, filler).await);
        }
    }
    for (row, filler) in rows.iter().zip(fillers) {
        println!(
            "| {filler} | {:.1} | {} |",
            row.rate(cycles),
            row.per_op(cycles).0
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// 6. Renewals, 7. capacity

async fn renewals(secs: u64) {
    println!("## 6. Renewal writes while holding locks ({secs} s, default lease: renew every 3 s)");
    println!();
    println!("| locks held on one object | PATCH requests per minute |");
    println!("|---|---|");
    for count in [1usize, 10, 100] {
        let cm = configmap().await;
        let l = locker(&cm).await;
        let mut guards = Vec::new();
        for i in 0..count {
            guards.push(
                l.acquire(&format!("held-{i}"), AcquireOptions::exclusive())
                    .await
                    .unwrap(),
            );
        }
        let before = requests().await;
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let after = requests().await;
        let patches = after.get("PATCH").copied().unwrap_or(0.0)
            - before.get("PATCH").copied().unwrap_or(0.0);
        println!("| {count} | {:.0} |", patches * 60.0 / secs as f64);
        for g in guards {
            g.release().await.unwrap();
        }
    }
    println!();
}

async fn capacity(pad: usize) {
    println!("## 7. Locks per object before the annotation limit");
    println!();
    let cm = configmap().await;
    let l = locker(&cm).await;
    let mut guards = Vec::new();
    let padding = "x".repeat(pad);
    let name = |i: usize| format!("deploy/my-project/production-{i:04}{padding}");
    let error = loop {
        // Names like a CI job's: "deploy/<project>/<environment>-NNNN".
        match l
            .acquire(
                &name(guards.len()),
                AcquireOptions::exclusive().non_blocking(),
            )
            .await
        {
            Ok(g) => guards.push(g),
            Err(AcquireError::Failed(e @ Error::AnnotationsFull { .. })) => break e,
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(guards.len() < 100_000);
    };
    let annotations = Api::<ConfigMap>::namespaced(client(false).await, "default")
        .get(&cm)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default();
    let values: usize = annotations.values().map(String::len).sum();
    println!(
        "With {}-byte lock names, {} locks fit in one object (Kubernetes allows 256 KiB of \
         annotations in all; each lock takes a 68-byte key and a {}-byte record here). The next \
         acquisition fails with:",
        name(0).len(),
        guards.len(),
        values / annotations.len().max(1)
    );
    println!();
    println!("```text\n{}\n```", chain(&error));
    println!();
    // Holding that many: one renewal patch carries every record (a test and an add each).
    let write = Instant::now();
    guards.pop().unwrap().release().await.unwrap();
    let write = write.elapsed();
    let held = LeaseConfig::default().renew_deadline * 2;
    tokio::time::sleep(held).await;
    let lost = guards.iter().filter(|g| g.is_lost()).count();
    let mut lost_on_release = 0;
    for g in guards {
        match g.release().await {
            Ok(()) => {}
            Err(Error::LeaseLost { .. }) => lost_on_release += 1,
            Err(e) => panic!("release: {e}"),
        }
    }
    println!(
        "One release on the full object took {}. Held {held:?} more: {lost} leases were lost \
         (renewal failed), {lost_on_release} when counted at release.",
        ms(write)
    );
    println!();
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = format!("lockgate: {e}");
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}
