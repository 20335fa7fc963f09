//! The HTTP client and the Kubernetes store of `lockgate serve`, side by side with Go lockgate
//! in the same run:
//!
//! 1. handoff to a waiting client through `lockgate serve` (memory store): lockgate's
//!    `HttpLocker` (long poll) against Go's `HttpLocker` (polling every 2 s);
//! 2. Kubernetes API requests per uncontended acquire + release through a server with the
//!    Kubernetes store: `lockgate serve` with lockgate's client, and Go's server with Go's client.
//!
//! Run: `testenv/kube up && source target/testenv/env.sh && cargo build --workspace --release &&
//! cargo bench -p lockgate-testenv --bench http_client` (`BENCH_QUICK=1` for a short run).

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockgate::{AcquireOptions, HttpConfig, HttpLocker, Locker};
use lockgate_testenv::process::{serve, Proc};
use lockgate_testenv::{client, go_peer, required_env};

fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        handoff(quick).await;
        requests_per_cycle(quick).await;
    });
}

/// The `lockgate` binary of the profile this benchmark was built with (release under `cargo
/// bench`), else the debug one.
fn cli() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let own = dir.join("lockgate");
    if own.exists() {
        return own;
    }
    dir.parent().unwrap().join("debug").join("lockgate")
}

fn go_version() -> String {
    let out = Command::new(go_peer()).arg("version").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

async fn locker(addr: &str) -> Locker {
    Locker::new(
        HttpLocker::connect(&format!("http://{addr}"), HttpConfig::default())
            .await
            .unwrap(),
    )
}

async fn handoff(quick: bool) {
    let n = if quick { 10 } else { 200 };
    let go_n = if quick { 2 } else { 10 };
    println!("## Handoff through `lockgate serve` to a waiting client");
    println!();
    println!("From the holder's release call to the waiter's grant, memory store. lockgate's");
    println!("`HttpLocker`: shown waiting (its long poll open) by `/status` before each release.");
    println!("Go's `HttpLocker` (`lockgate-go bench-wait`): released at varying points of its 2 s");
    println!("poll period.");
    println!();
    println!("| client | handoffs | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    let (_srv, addr) = serve(&cli(), &["--grace", "0"]);
    let holder = locker(&addr).await;
    let waiter = locker(&addr).await;
    let status = HttpLocker::connect(&format!("http://{addr}"), HttpConfig::default())
        .await
        .unwrap();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let h = holder
            .acquire("handoff", AcquireOptions::exclusive())
            .await
            .unwrap();
        let w = waiter.clone();
        let waiting = tokio::spawn(async move {
            let g = w
                .acquire("handoff", AcquireOptions::exclusive())
                .await
                .unwrap();
            let at = Instant::now();
            g.release().await.unwrap();
            at
        });
        loop {
            let s = status.status().await.unwrap();
            if s.locks
                .first()
                .and_then(|l| l.waiters.first())
                .is_some_and(|w| w.long_poll)
            {
                break;
            }
            tokio::task::yield_now().await;
        }
        let released = Instant::now();
        h.release().await.unwrap();
        samples.push(waiting.await.unwrap() - released);
    }
    samples.sort();
    println!(
        "| lockgate `HttpLocker`, long poll | {n} | {} | {} | {} |",
        fmt(pct(&samples, 0.5)),
        fmt(pct(&samples, 0.99)),
        fmt(*samples.last().unwrap())
    );

    let mut child = std::process::Command::new(go_peer())
        .args([
            "bench-wait",
            "--locker",
            &format!("http://{addr}"),
            "--name",
            "go-handoff",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut samples = Vec::new();
    for i in 0..go_n {
        // The Go waiter releases right after printing its grant: take the lock once it has.
        let h = loop {
            match holder
                .acquire("go-handoff", AcquireOptions::exclusive().non_blocking())
                .await
            {
                Ok(h) => break h,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        writeln!(stdin, "go").unwrap();
        stdin.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(300 + (i as u64 * 700) % 2000)).await;
        let released = mono_ns();
        h.release().await.unwrap();
        let granted = tokio::task::block_in_place(|| lockgate_testenv::read_go_grant(&mut stdout));
        let ns = granted.checked_sub(released).unwrap_or_else(|| {
            panic!("the Go waiter's grant came before the release it waited for")
        });
        samples.push(Duration::from_nanos(ns));
    }
    drop(stdin);
    let _ = child.wait();
    samples.sort();
    println!(
        "| Go lockgate {} `HttpLocker`, polling | {go_n} | {} | {} | {} |",
        go_version(),
        fmt(pct(&samples, 0.5)),
        fmt(pct(&samples, 0.99)),
        fmt(*samples.last().unwrap())
    );
    println!();
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

async fn requests_per_cycle(quick: bool) {
    let n = if quick { 5 } else { 50 };
    println!("## Kubernetes store: API requests per uncontended acquire + release ({n} cycles)");
    println!();
    println!("Counted at the API server (`apiserver_request_total`, configmaps), one client, one");
    println!("lock name, after one warm-up cycle.");
    println!();
    println!("| server, client | requests per cycle | by verb | time per cycle |");
    println!("|---|---|---|---|");
    let cm = lockgate_testenv::empty_configmap("default").await;
    let store = format!("kubernetes://default/configmaps/{cm}");
    let (_srv, addr) = serve(&cli(), &["--store", &store]);
    let l = locker(&addr).await;
    let cycle = || async {
        l.acquire("cycle", AcquireOptions::exclusive())
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    };
    cycle().await;
    let before = requests().await;
    let start = Instant::now();
    for _ in 0..n {
        cycle().await;
    }
    let took = start.elapsed() / n as u32;
    let (total, verbs) = delta(&before, &requests().await, n as f64);
    println!(
        "| lockgate serve, lockgate `HttpLocker` | {total:.1} | {verbs} | {} |",
        fmt(took)
    );

    let go_srv = {
        let mut p = Proc::spawn(
            Command::new(go_peer())
                .args(["serve", "--listen", "127.0.0.1:0", "--store", &store])
                .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG")),
        );
        let line = p.line("serving on ", Duration::from_secs(20));
        (p, line.trim_start_matches("serving on ").to_owned())
    };
    let go_url = format!("http://{}", go_srv.1);
    let bench = |iterations: usize| {
        let out = Command::new(go_peer())
            .args(["bench", "--locker", &go_url, "--name", "go-cycle"])
            .args(["--iterations", &iterations.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    bench(1);
    let before = requests().await;
    let start = Instant::now();
    tokio::task::block_in_place(|| bench(n));
    let took = start.elapsed() / n as u32;
    let (total, verbs) = delta(&before, &requests().await, n as f64);
    println!(
        "| Go lockgate {} server, Go `HttpLocker` | {total:.1} | {verbs} | {} |",
        go_version(),
        fmt(took)
    );
    go_srv.0.signal(libc::SIGKILL);
    println!();
}
