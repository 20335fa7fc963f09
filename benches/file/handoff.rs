//! Benchmark 2: handoff to a waiter in another process, for every way of waiting.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockgate::file::Naming;
use lockgate::{AcquireOptions, FileLocker, Locker};

use crate::{c_path, fmt, go_version, mono_ns, percentile, ratio, Rng};

/// The waiting side of the handoff benchmark: for each line on stdin, acquire the lock
/// (waiting as `role` says), print the monotonic time of the grant, release.
pub(crate) fn child(role: &str) {
    let dir = PathBuf::from(std::env::var("BENCH_DIR").unwrap());
    let locker = Locker::new(FileLocker::new(&dir).unwrap());
    let path = c_path(&dir, "handoff");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut grant = |t: u64| {
        writeln!(out, "granted {t}").unwrap();
        out.flush().unwrap();
    };
    for _ in stdin.lock().lines() {
        let ex = AcquireOptions::exclusive();
        match role {
            "raw" => unsafe {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644,
                );
                assert_eq!(libc::flock(fd, libc::LOCK_EX), 0);
                grant(mono_ns());
                libc::close(fd);
            },
            "blocking" => {
                let g = locker.acquire_blocking("handoff", ex).unwrap();
                grant(mono_ns());
                drop(g);
            }
            "timed" => {
                let g = locker
                    .acquire_blocking("handoff", ex.timeout(Duration::from_secs(3600)))
                    .unwrap();
                grant(mono_ns());
                drop(g);
            }
            "async" => {
                let g = rt.block_on(locker.acquire("handoff", ex)).unwrap();
                grant(mono_ns());
                drop(g);
            }
            _ => panic!("unknown role {role}"),
        }
    }
}

/// How many processes wait in flock(2) for the file at `path` (its `->` lines in /proc/locks,
/// read whole until two readings agree: one `read(2)` returns one page, and entries can shift
/// between pages).
fn waiters(path: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let read = || {
        let mut text = String::new();
        std::fs::File::open("/proc/locks")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text.lines()
            .filter(|l| l.contains("->") && l.split_whitespace().any(|f| f == id))
            .count()
    };
    let mut last = read();
    loop {
        let again = read();
        if again == last {
            return last;
        }
        last = again;
    }
}

/// How the holder knows the waiter is waiting before it releases.
#[derive(Clone, Copy)]
enum Ready {
    /// The waiter blocks in the kernel: wait until /proc/locks shows it, then a random pause
    /// of up to 100 µs.
    Blocked,
    /// The waiter polls: release at a random moment 20–520 ms after asking it to acquire, so
    /// that the release falls anywhere in its 500 ms poll period.
    Polling,
}

fn handoff_run(
    dir: &Path,
    mut waiter: Child,
    rounds: usize,
    ready: Ready,
    rng: &mut Rng,
) -> Vec<Duration> {
    let path = dir.join(Naming::Sha256.file_name("handoff"));
    let locker = Locker::new(FileLocker::new(dir).unwrap());
    let mut stdin = waiter.stdin.take().unwrap();
    let mut stdout = BufReader::new(waiter.stdout.take().unwrap());
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let g = locker
            .acquire_blocking("handoff", AcquireOptions::exclusive())
            .unwrap();
        let asked = Instant::now();
        writeln!(stdin, "go").unwrap();
        stdin.flush().unwrap();
        let pause = match ready {
            Ready::Blocked => {
                let deadline = Instant::now() + Duration::from_secs(30);
                while waiters(&path) == 0 {
                    assert!(Instant::now() < deadline, "the waiter never blocked");
                    std::thread::yield_now();
                }
                rng.between(Duration::ZERO, Duration::from_micros(100))
            }
            Ready::Polling => rng
                .between(Duration::from_millis(20), Duration::from_millis(520))
                .saturating_sub(asked.elapsed()),
        };
        let until = Instant::now() + pause;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        let released = mono_ns();
        drop(g);
        // `waiting` (the Go peer found the lock busy), then `granted <CLOCK_MONOTONIC ns>`.
        let granted: u64 = loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "round {i}: the waiter ended without a grant"
            );
            match line.trim().strip_prefix("granted ") {
                Some(ns) => break ns.parse().unwrap(),
                None if line.trim() == "waiting" => continue,
                None => panic!("round {i}: the waiter said {line:?}"),
            }
        };
        assert!(
            granted >= released,
            "round {i}: the waiter was granted the lock {} ns before its release: exclusion violated",
            released - granted
        );
        samples.push(Duration::from_nanos(granted - released));
    }
    drop(stdin);
    waiter.wait().unwrap();
    samples.sort();
    samples
}

pub(crate) fn handoff(
    dir: &Path,
    go: Option<&Path>,
    rounds: usize,
    go_rounds: usize,
    rng: &mut Rng,
) {
    println!("## 2. Handoff to a waiter in another process");
    println!();
    println!(
        "Time from the holder's release to the waiter's grant (CLOCK_MONOTONIC across processes), \
         the release at a random moment once the waiter waits."
    );
    println!();
    println!("| waiter | samples | min | p50 | p90 | p99 | max | p50 vs raw |");
    println!("|---|---|---|---|---|---|---|---|");
    let spawn = |role: &str| {
        Command::new(std::env::current_exe().unwrap())
            .env("BENCH_CHILD", role)
            .env("BENCH_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut raw_p50 = None;
    let mut row = |label: &str, s: &[Duration]| {
        let p50 = percentile(s, 0.5);
        let base = *raw_p50.get_or_insert(p50);
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            s.len(),
            fmt(s[0]),
            fmt(p50),
            fmt(percentile(s, 0.9)),
            fmt(percentile(s, 0.99)),
            fmt(*s.last().unwrap()),
            ratio(p50, base)
        );
    };
    for (label, role) in [
        ("raw blocking flock(2)", "raw"),
        (
            "lockgate `acquire_blocking`, no deadline (flock on the calling thread; `exec`)",
            "blocking",
        ),
        (
            "lockgate `acquire_blocking` with a timeout (flock on the calling thread, a timer signal at the deadline; `exec -w`)",
            "timed",
        ),
        (
            "lockgate async `acquire` (flock on a waiter thread that wakes the task)",
            "async",
        ),
    ] {
        let s = handoff_run(dir, spawn(role), rounds, Ready::Blocked, rng);
        row(label, &s);
    }
    if let Some(go) = go {
        let child = Command::new(go)
            .args([
                "bench-wait",
                "--locker",
                &format!("file:{}", dir.display()),
                "--name",
                "handoff",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let s = handoff_run(dir, child, go_rounds, Ready::Polling, rng);
        row(
            &format!("Go lockgate {} (polls every 500 ms)", go_version(go)),
            &s,
        );
    }
    println!();
}
