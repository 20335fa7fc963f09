//! The load-and-abuse run (issue 18): well-behaved clients, lockgate's and Go's, loop
//! acquire/release through `lockgate serve` while hostile ones attack it; none of the
//! well-behaved may fail, and the server's memory and descriptors must come back down once the
//! attack stops.
//!
//! The suite runs a short form (15 s warm-up, 45 s of attack, 20 s after). The figures in
//! BENCHMARKS.md come from the long form:
//!
//! ```sh
//! cargo build --release -p lockgate-cli
//! LOCKGATE_LOAD_SECS=180 LOCKGATE_LOAD_SERVER=$PWD/target/release/lockgate \
//!   cargo test -p lockgate-testenv --test load_abuse -- --nocapture
//! ```
//!
//! Well-behaved: 150 `HttpLocker`s (each its own connections) in this process, 10 per lock on
//! 15 locks, holding 20-50 ms; 50 Go v0.2 `HttpLocker` processes (`lockgate-go loop`, an
//! acquirer id each), 2 per lock on 25 locks. Hostile, 10 of each kind, each kind from an
//! address of its own: clients that pipeline `/status` and never read; HTTP/2 connections that
//! send only their preface (and answer pings); token guessers; waiter floods (distinct acquirer
//! ids, with the token); `/status?limit=1000000` in a loop (with the token).

use std::collections::VecDeque;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockgate::{AcquireOptions, HttpConfig, HttpLocker, Locker};
use lockgate_testenv::process::Proc;
use lockgate_testenv::raw_http::{request, Conn};
use lockgate_testenv::{go_peer, rust_cli, time_limit};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "load-and-abuse-s3cret";
const RUST_LOCKS: usize = 15;
const GO_LOCKS: usize = 25;

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The server process's resident memory (KiB) and open descriptors.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    (rss, fds)
}

/// CPU time the process has used (user + system).
fn cpu(pid: u32) -> Duration {
    cpu_of(&format!("/proc/{pid}/stat"))
}

/// CPU time the threads of this process named `attacker` have used.
fn attackers_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "attacker")
        })
        .map(|t| cpu_of(&t.path().join("stat").to_string_lossy()))
        .sum()
}

fn cpu_of(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(f.iter().sum::<u64>() * 1000 / hz)
}

#[derive(Default)]
struct Tally {
    cycles: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// Release of one holder to the grant of the next waiter: when, and microseconds.
    handoffs: Mutex<Vec<(Instant, u64)>>,
}

impl Tally {
    fn error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 20 {
            eprintln!("well-behaved client error: {e}");
        }
        errors.push(e);
    }
}

/// A lockgate client: acquire (waiting up to 60 s), hold 20-50 ms, release, until `stop`.
async fn rust_client(
    url: String,
    lock: usize,
    seed: u64,
    last_release: Arc<Vec<Mutex<Option<Instant>>>>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let locker = match HttpLocker::connect(&url, HttpConfig::default().token(TOKEN)).await {
        Ok(l) => Locker::new(l),
        Err(e) => return tally.error(format!("connect: {e}")),
    };
    let name = format!("rust-{lock}");
    let mut x = seed | 1;
    while !stop.load(Ordering::Relaxed) {
        let asked = Instant::now();
        let guard = match locker
            .acquire(
                &name,
                AcquireOptions::exclusive().timeout(Duration::from_secs(60)),
            )
            .await
        {
            Ok(g) => g,
            Err(e) => {
                tally.error(format!("acquire {name}: {e}"));
                continue;
            }
        };
        let granted = Instant::now();
        if let Some(released) = *last_release[lock].lock().unwrap() {
            // It was waiting when the previous holder let go: a handoff.
            if released > asked {
                let us = granted.saturating_duration_since(released).as_micros() as u64;
                tally.handoffs.lock().unwrap().push((granted, us));
            }
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        tokio::time::sleep(Duration::from_millis(20 + x % 31)).await;
        if guard.is_lost() {
            tally.error(format!("lost the lease of {name}"));
        }
        *last_release[lock].lock().unwrap() = Some(Instant::now());
        if let Err(e) = guard.release().await {
            tally.error(format!("release {name}: {e}"));
        }
        tally.cycles.fetch_add(1, Ordering::Relaxed);
    }
}

/// A Go client: `lockgate-go loop` runs of 5 cycles, one after the other, until `stop`.
fn go_client(
    url: String,
    lock: usize,
    dir: std::path::PathBuf,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let counter = dir.join(format!("go-{lock}.counter"));
    while !stop.load(Ordering::Relaxed) {
        let out = Command::new(go_peer())
            .args([
                "loop",
                "--locker",
                &url,
                "--acquirer-id",
                "auto",
                "-w",
                "60",
            ])
            .args(["--cycles", "5", "--hold-ms", "20", "--counter"])
            .arg(&counter)
            .arg(format!("go-{lock}"))
            .output();
        match out {
            Ok(o) => {
                let report: serde_json::Value =
                    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
                let errors = report["errors"].as_array().cloned().unwrap_or_default();
                if !o.status.success() || report.is_null() || !errors.is_empty() {
                    tally.error(format!(
                        "go loop on go-{lock}: {} {report} {}",
                        o.status,
                        String::from_utf8_lossy(&o.stderr)
                    ));
                }
                let cycles = report["cycles"].as_u64().unwrap_or(0);
                tally.cycles.fetch_add(
                    cycles.saturating_sub(errors.len() as u64),
                    Ordering::Relaxed,
                );
            }
            Err(e) => tally.error(format!("cannot run the Go peer: {e}")),
        }
    }
}

/// Pipelines `/status` and never reads; when the server cuts it off, again.
async fn slow_reader(addr: String, source: &'static str, stop: Arc<AtomicBool>) {
    let req = request(
        "GET",
        "/status?limit=1000",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        "",
    );
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = Conn::connect_from(&addr, source, Some(4096)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let writing = async {
            for _ in 0..400 {
                if c.send(&req).await.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await;
        };
        // Written all it could; the server ends the connection after its send timeout.
        let _ = tokio::time::timeout(Duration::from_secs(30), writing).await;
    }
}

/// An HTTP/2 preface, pings answered, no request.
async fn preface_only(addr: String, source: &'static str, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(c) = Conn::connect_from(&addr, source, None).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut s = c.stream;
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        if s.write_all(&hello).await.is_err() {
            continue;
        }
        let mut head = [0u8; 9];
        loop {
            if s.read_exact(&mut head).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                break;
            }
            let reply = match (head[3], head[4] & 1) {
                (4, 0) => vec![0, 0, 0, 4, 1, 0, 0, 0, 0],
                (6, 0) => [&[0, 0, 8, 6, 1, 0, 0, 0, 0][..], &payload].concat(),
                _ => continue,
            };
            if s.write_all(&reply).await.is_err() {
                break;
            }
        }
    }
}

/// Guesses the token, over and over.
async fn guesser(addr: String, source: &'static str, n: u64, stop: Arc<AtomicBool>) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let guess = format!("Bearer guess-{n}-{i}");
        let req = request(
            "POST",
            "/acquire",
            &[("Authorization", &guess)],
            r#"{"lockName":"x"}"#,
        );
        match Conn::connect_from(&addr, source, None).await {
            Ok(mut c) => {
                let _ = c.call(&req).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Queue places under ever new acquirer ids, on locks of its own.
async fn waiter_flood(addr: String, source: &'static str, n: u64, stop: Arc<AtomicBool>) {
    let auth = format!("Bearer {TOKEN}");
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = Conn::connect_from(&addr, source, None).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let body = json!({"lockName": format!("flood-{}", i % 20), "opts": {"acquirerId": format!("flood-{n}-{i}")}});
            let req = request(
                "POST",
                "/acquire",
                &[("Authorization", &auth)],
                &body.to_string(),
            );
            if !matches!(c.call(&req).await, Ok(Some(_))) {
                break;
            }
        }
    }
}

/// Asks for every lock in one page, over and over.
async fn huge_status(addr: String, source: &'static str, stop: Arc<AtomicBool>) {
    let req = request(
        "GET",
        "/status?limit=1000000",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        "",
    );
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = Conn::connect_from(&addr, source, None).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            if !matches!(c.call(&req).await, Ok(Some(_))) {
                break;
            }
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn well_behaved_clients_never_fail_while_hostile_ones_attack() {
    let attack = Duration::from_secs(env_num("LOCKGATE_LOAD_SECS", 45));
    let rust_clients = env_num("LOCKGATE_LOAD_RUST", 150) as usize;
    let go_clients = env_num("LOCKGATE_LOAD_GO", 50) as usize;
    let warmup = Duration::from_secs(15);
    let after = Duration::from_secs(20);
    time_limit(warmup + attack + after + Duration::from_secs(180));
    let server_bin = std::env::var_os("LOCKGATE_LOAD_SERVER").map_or_else(rust_cli, Into::into);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut server = Proc::spawn(
        Command::new(&server_bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--grace",
                "0",
                "--token-file",
            ])
            .arg(&token),
    );
    let addr = server
        .line("serving on ", Duration::from_secs(20))
        .trim_start_matches("serving on ")
        .to_owned();
    let pid = server.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // The well-behaved.
    let calm = Arc::new(AtomicBool::new(false));
    let rust = Arc::new(Tally::default());
    let go = Arc::new(Tally::default());
    let last_release: Arc<Vec<Mutex<Option<Instant>>>> =
        Arc::new((0..RUST_LOCKS).map(|_| Mutex::new(None)).collect());
    let mut rust_tasks = Vec::new();
    for i in 0..rust_clients {
        rust_tasks.push(rt.spawn(rust_client(
            format!("http://{addr}"),
            i % RUST_LOCKS,
            i as u64 * 7919 + 1,
            last_release.clone(),
            rust.clone(),
            calm.clone(),
        )));
    }
    let mut go_threads = Vec::new();
    for i in 0..go_clients {
        let (url, dir, tally, stop) = (
            format!("http://lockgate:{TOKEN}@{addr}"),
            dir.path().to_owned(),
            go.clone(),
            calm.clone(),
        );
        go_threads.push(std::thread::spawn(move || {
            go_client(url, i % GO_LOCKS, dir, tally, stop)
        }));
    }

    let mut samples: VecDeque<(Instant, u64, usize)> = VecDeque::new();
    let sample_for = |d: Duration, samples: &mut VecDeque<(Instant, u64, usize)>| {
        let end = Instant::now() + d;
        while Instant::now() < end {
            let (rss, fds) = usage(pid);
            samples.push_back((Instant::now(), rss, fds));
            std::thread::sleep(Duration::from_secs(1));
        }
    };
    let cpu_start = cpu(pid);
    sample_for(warmup, &mut samples);
    let cpu_warm = cpu(pid);
    let (rss_before, fds_before) = usage(pid);
    let cycles_before = (
        rust.cycles.load(Ordering::Relaxed),
        go.cycles.load(Ordering::Relaxed),
    );
    let warm = warmup.as_secs_f64();

    // The attack, on threads of its own (this process's well-behaved clients keep theirs).
    let art = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("attacker")
        .enable_all()
        .build()
        .unwrap();
    let hostile = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    for n in 0..10u64 {
        let s = hostile.clone();
        attackers.push(art.spawn(slow_reader(addr.clone(), "127.0.0.2", s.clone())));
        attackers.push(art.spawn(preface_only(addr.clone(), "127.0.0.3", s.clone())));
        attackers.push(art.spawn(guesser(addr.clone(), "127.0.0.4", n, s.clone())));
        attackers.push(art.spawn(waiter_flood(addr.clone(), "127.0.0.5", n, s.clone())));
        attackers.push(art.spawn(huge_status(addr.clone(), "127.0.0.6", s)));
    }
    let attack_start = samples.len();
    sample_for(attack, &mut samples);
    let attack_end = samples.len();
    let cpu_attack = cpu(pid);
    let cpu_attackers = attackers_cpu();
    hostile.store(true, Ordering::Relaxed);
    for a in attackers {
        a.abort();
    }
    art.shutdown_background();
    let cycles_attack = (
        rust.cycles.load(Ordering::Relaxed) - cycles_before.0,
        go.cycles.load(Ordering::Relaxed) - cycles_before.1,
    );
    sample_for(after, &mut samples);
    let (rss_after, fds_after) = usage(pid);

    calm.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in rust_tasks {
            let _ = tokio::time::timeout(Duration::from_secs(90), t).await;
        }
    });
    for t in go_threads {
        let _ = t.join();
    }
    server.signal(libc::SIGTERM);
    assert_eq!(
        server.wait(Duration::from_secs(20)),
        0,
        "the server did not stop cleanly"
    );

    let (rss_peak, fds_peak) = samples
        .range(attack_start..attack_end)
        .fold((0, 0), |(r, f), (_, rss, fds)| (r.max(*rss), f.max(*fds)));
    let (attack_from, attack_to) = (samples[attack_start].0, samples[attack_end - 1].0);
    let phase = |during: bool| {
        let mut v: Vec<u64> = rust
            .handoffs
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| (*at >= attack_from && *at <= attack_to) == during)
            .map(|(_, us)| *us)
            .collect();
        v.sort_unstable();
        v
    };
    let (calm_handoffs, handoffs) = (phase(false), phase(true));
    let ms = |us: u64| us as f64 / 1000.0;
    let rust_errors = rust.errors.lock().unwrap().clone();
    let go_errors = go.errors.lock().unwrap().clone();
    println!(
        "load-and-abuse run: {} s of attack, server {}",
        attack.as_secs(),
        server_bin.display()
    );
    println!("| | before the attack | during (peak) | 20 s after |");
    println!("|---|---|---|---|");
    println!(
        "| server RSS | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
        rss_before as f64 / 1024.0,
        rss_peak as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    println!("| open descriptors | {fds_before} | {fds_peak} | {fds_after} |");
    println!(
        "| server CPU | {:.0} % | {:.0} % | |",
        (cpu_warm - cpu_start).as_secs_f64() / warm * 100.0,
        (cpu_attack - cpu_warm).as_secs_f64() / attack.as_secs_f64() * 100.0
    );
    println!(
        "| attackers' CPU (this process) | | {:.0} % | |",
        cpu_attackers.as_secs_f64() / attack.as_secs_f64() * 100.0
    );
    println!(
        "well-behaved before the attack: lockgate clients {:.0} cycles/s, Go clients {:.1} cycles/s",
        cycles_before.0 as f64 / warm,
        cycles_before.1 as f64 / warm
    );
    println!(
        "well-behaved during the attack: lockgate clients {} cycles ({:.0}/s), Go clients {} cycles ({:.1}/s); errors: lockgate {}, Go {}",
        cycles_attack.0,
        cycles_attack.0 as f64 / attack.as_secs_f64(),
        cycles_attack.1,
        cycles_attack.1 as f64 / attack.as_secs_f64(),
        rust_errors.len(),
        go_errors.len()
    );
    for (what, h) in [
        ("without attack", &calm_handoffs),
        ("during the attack", &handoffs),
    ] {
        println!(
            "lockgate handoffs {what}: {} p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            h.len(),
            ms(percentile(h, 0.5)),
            ms(percentile(h, 0.99)),
            ms(h.last().copied().unwrap_or(0))
        );
    }

    assert!(
        rust_errors.is_empty(),
        "lockgate clients failed: {rust_errors:?}"
    );
    assert!(go_errors.is_empty(), "Go clients failed: {go_errors:?}");
    assert!(
        cycles_attack.0 > 0 && cycles_attack.1 > 0,
        "well-behaved clients made no progress during the attack: {cycles_attack:?}"
    );
    assert!(
        percentile(&handoffs, 0.99) < 2_000_000,
        "handoff p99 {:.1} ms",
        ms(percentile(&handoffs, 0.99))
    );
    // Flat after the attack: what the attack held is given back (the allocator may keep some
    // pages: a bound, not equality).
    assert!(
        fds_after <= fds_before + 20,
        "descriptors: {fds_before} before, {fds_after} after"
    );
    assert!(
        rss_after <= rss_before + rss_before / 2 + 32 * 1024,
        "RSS: {rss_before} KiB before, {rss_after} KiB after"
    );
}
