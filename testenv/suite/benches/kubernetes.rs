//! Kubernetes-locker benchmarks on the real API server of the test environment, side by side
//! with Go lockgate (the peer's version, v0.2.0 by default) in the same run.
//!
//! Run: `testenv/kube up && source target/testenv/env.sh && cargo bench -p lockgate-testenv --bench kubernetes`
//! (`BENCH_QUICK=1` for a short run).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockgate::kubernetes::{KubernetesLocker, LeaseConfig, Target};
use lockgate::{AcquireError, AcquireOptions, Error, Locker};
use lockgate_testenv::{client, go_peer, required_env};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    println!(
        "# lockgate Kubernetes benchmarks (kube-apiserver v1.37.2 + etcd on 127.0.0.1, 2 cores)"
    );
    println!();
    requests_per_cycle(if quick { 10 } else { 50 }).await;
    handoff(if quick { 10 } else { 50 }, if quick { 2 } else { 5 }).await;
    contention(quick).await;
    distinct_locks(quick).await;
    renewals(if quick { 10 } else { 30 }).await;
    capacity().await;
}

async fn configmap() -> String {
    lockgate_testenv::empty_configmap("default").await
}

async fn locker(cm: &str) -> Locker {
    Locker::new(
        KubernetesLocker::new(
            client(false).await,
            Target::configmap("default", cm),
            LeaseConfig::default(),
        )
        .unwrap(),
    )
}

fn url(cm: &str) -> String {
    format!("kubernetes://default/configmaps/{cm}")
}

fn go(args: &[&str]) -> Command {
    let mut c = Command::new(go_peer());
    c.args(args)
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"));
    c
}

/// "Go lockgate vX.Y.Z", from `lockgate-go version`.
fn go_label() -> String {
    let out = go(&["version"]).output().unwrap();
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

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------------------------

async fn requests_per_cycle(n: usize) {
    println!("## 1. API requests per uncontended acquire + release ({n} cycles)");
    println!();
    println!("Counted from the API server's `apiserver_request_total` metric (configmaps).");
    println!();
    println!("| implementation | requests per cycle | by verb | time per cycle |");
    println!("|---|---|---|---|");
    let cm = configmap().await;
    let l = locker(&cm).await;
    l.acquire("warm-up", AcquireOptions::exclusive())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
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
    let took = start.elapsed() / n as u32;
    let (total, verbs) = delta(&before, &requests().await, n as f64);
    println!("| lockgate (Rust) | {total:.1} | {verbs} | {} |", ms(took));

    let before = requests().await;
    let out = go(&[
        "bench",
        "--locker",
        &url(&cm),
        "--name",
        "go-cycle",
        "--iterations",
        &n.to_string(),
    ])
    .output()
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("Go bench output");
    let (total, verbs) = delta(&before, &requests().await, n as f64);
    let go_took = Duration::from_nanos(v["ns_per_op"].as_u64().unwrap());
    println!(
        "| {} | {total:.1} | {verbs} | {} |",
        go_label(),
        ms(go_took)
    );
    println!();
}

async fn handoff(n: usize, go_n: usize) {
    println!("## 2. Handoff to a waiting process");
    println!();
    println!(
        "Time from the holder's release call to the waiter's grant; the waiter is another locker"
    );
    println!("(its own client and watch) for Rust, the `lockgate-go bench-wait` process for Go.");
    println!();
    println!("| waiter | handoffs | p50 | p99 |");
    println!("|---|---|---|---|");
    let cm = configmap().await;
    let (holder, waiter) = (locker(&cm).await, locker(&cm).await);
    let mut samples = Vec::new();
    for _ in 0..n {
        let g = holder
            .acquire("handoff", AcquireOptions::exclusive())
            .await
            .unwrap();
        let w = waiter.clone();
        let task = tokio::spawn(async move {
            let g = w
                .acquire("handoff", AcquireOptions::exclusive())
                .await
                .unwrap();
            let at = Instant::now();
            g.release().await.unwrap();
            at
        });
        tokio::time::sleep(Duration::from_millis(100)).await; // the waiter is waiting by now
        let released = Instant::now();
        g.release().await.unwrap();
        samples.push(task.await.unwrap() - released);
    }
    samples.sort();
    println!(
        "| lockgate (Rust) | {n} | {} | {} |",
        ms(pct(&samples, 0.5)),
        ms(pct(&samples, 0.99))
    );

    // Go waiter: it prints the CLOCK_MONOTONIC time of each grant.
    let mut child = go(&["bench-wait", "--locker", &url(&cm), "--name", "go-handoff"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut samples = Vec::new();
    for i in 0..go_n {
        use std::io::{BufRead, Write};
        let g = holder
            .acquire("go-handoff", AcquireOptions::exclusive())
            .await
            .unwrap();
        writeln!(stdin, "go").unwrap();
        stdin.flush().unwrap();
        // Release at varying points of Go's 2 s poll period.
        tokio::time::sleep(Duration::from_millis(300 + (i as u64 * 700) % 2000)).await;
        let released = mono_ns();
        g.release().await.unwrap();
        let line = tokio::task::block_in_place(|| {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            line
        });
        let granted: u64 = line
            .trim()
            .strip_prefix("granted ")
            .unwrap()
            .parse()
            .unwrap();
        samples.push(Duration::from_nanos(granted.saturating_sub(released)));
    }
    drop(stdin);
    child.wait().unwrap();
    samples.sort();
    println!(
        "| {} | {go_n} | {} | {} |",
        go_label(),
        ms(pct(&samples, 0.5)),
        ms(pct(&samples, 0.99))
    );
    println!();
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `procs` Go bench processes at once; returns the wall time.
fn go_parallel(procs: usize, each: usize, cm: &str, name: impl Fn(usize) -> String) -> Duration {
    let start = Instant::now();
    let children: Vec<_> = (0..procs)
        .map(|i| {
            go(&[
                "bench",
                "--locker",
                &url(cm),
                "--name",
                &name(i),
                "--iterations",
                &each.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a Go bench process failed");
    }
    start.elapsed()
}

async fn rust_parallel(
    lockers: usize,
    each: usize,
    cm: &str,
    name: impl Fn(usize) -> String,
) -> Duration {
    let mut ls = Vec::new();
    for _ in 0..lockers {
        ls.push(locker(cm).await);
    }
    let start = Instant::now();
    let tasks: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let n = name(i);
            tokio::spawn(async move {
                for _ in 0..each {
                    l.acquire(&n, AcquireOptions::exclusive())
                        .await
                        .unwrap()
                        .release()
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

/// One table row each for Rust and Go: `n` contenders, each acquiring and releasing the lock
/// `name(contender)` on `cm` (`each` times for Rust, `go_each` for Go).
async fn side_by_side(
    cm: &str,
    n: usize,
    each: usize,
    go_each: usize,
    name: fn(&str, usize) -> String,
) {
    let row = |who: &str, each: usize, t: Duration| {
        let rate = (n * each) as f64 / t.as_secs_f64();
        println!(
            "| {who} | {n} × {each} | {:.2} s | {rate:.1} |",
            t.as_secs_f64()
        );
    };
    row(
        "lockgate (Rust)",
        each,
        rust_parallel(n, each, cm, |i| name("rust", i)).await,
    );
    let cm = cm.to_owned();
    let t = tokio::task::spawn_blocking(move || go_parallel(n, go_each, &cm, |i| name("go", i)))
        .await
        .unwrap();
    row(&go_label(), go_each, t);
    println!();
}

async fn contention(quick: bool) {
    let (n, each) = (16, if quick { 5 } else { 20 });
    let go_each = if quick { 1 } else { 3 };
    println!("## 3. {n} contenders for one lock");
    println!();
    println!(
        "Each contender (a locker with its own client for Rust, a process for Go) acquires and"
    );
    println!("releases the same exclusive lock repeatedly.");
    println!();
    println!("| implementation | acquisitions | wall time | acquisitions/s |");
    println!("|---|---|---|---|");
    side_by_side(&configmap().await, n, each, go_each, |who, _| {
        format!("{who}-contended")
    })
    .await;
}

async fn distinct_locks(quick: bool) {
    let (n, each) = (32, if quick { 3 } else { 10 });
    println!("## 4. {n} clients × {n} distinct locks on one object");
    println!();
    println!("Each client acquires and releases its own lock; the locks share one ConfigMap.");
    println!();
    println!("| implementation | acquisitions | wall time | acquisitions/s |");
    println!("|---|---|---|---|");
    side_by_side(&configmap().await, n, each, each, |who, i| {
        format!("{who}-distinct-{i}")
    })
    .await;
}

async fn renewals(secs: u64) {
    println!("## 5. Renewal writes while holding locks ({secs} s, default lease: renew every 3 s)");
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

async fn capacity() {
    println!("## 6. Locks per object before the annotation limit");
    println!();
    let cm = configmap().await;
    let l = locker(&cm).await;
    let mut guards = Vec::new();
    let error = loop {
        // Names like a CI job's: "deploy/<project>/<environment>-NNNN".
        match l
            .acquire(
                &format!("deploy/my-project/production-{:04}", guards.len()),
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
    println!(
        "With 37-byte lock names, {} locks fit in one object (Kubernetes allows 256 KiB of",
        guards.len()
    );
    println!("annotations; each lock takes a 68-byte key and a ~190-byte record). The next acquisition fails with:");
    println!();
    println!("```text\n{}\n```", lockgate_testenv_chain(&error));
    for g in guards {
        g.release().await.unwrap();
    }
    println!();
}

fn lockgate_testenv_chain(e: &dyn std::error::Error) -> String {
    let mut s = format!("lockgate: {e}");
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}
