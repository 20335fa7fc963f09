//! File-lock benchmarks, each side by side with its baselines in the same run:
//!
//! 1. uncontended acquire + release: lockgate against the raw `open + flock + close` system calls
//!    and Go lockgate's file locker (through the Go peer), in interleaved rounds, the fastest
//!    and the median round of each;
//! 2. handoff to a waiter in another process, for every way of waiting users have (lockgate's
//!    `acquire_blocking` without a deadline, with a deadline, and async), against a raw blocking
//!    `flock` and Go lockgate (which polls); the release comes at a random moment;
//! 3. CPU time a waiting `lockgate exec` uses while a lock stays busy (and `lockgate-go exec`);
//! 4. how long an exclusive `exec` waits behind N processes looping shared holds (fairness),
//!    lockgate against flock(1) and Go lockgate.
//!
//! Run (full): `cargo build --release -p lockgate-cli && cargo bench --bench file`; with the Go
//! rows: build the peer first (`testenv/build.sh lockgate-go`, or point `LOCKGATE_TEST_GO_PEER`
//! at it). Quick mode (a few samples, to keep the harness working; `scripts/test` runs it):
//! `BENCH_QUICK=1 cargo bench --bench file` or `cargo bench --bench file -- --quick`.
//! `BENCH_WAIT_SECS` sets the wait of benchmark 3 (default 10); `BENCH_ONLY=1,3` runs only
//! the benchmarks listed; `BENCH_READERS=1,6,32` sets the reader counts of benchmark 4.
//!
//! Every difference of two clock readings is checked: a waiter granted the lock before its
//! release is a violation and aborts the run; nothing is clamped to zero.

mod fairness;
mod handoff;
mod uncontended;
mod waiting;

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lockgate::file::Naming;

fn main() {
    if let Ok(role) = std::env::var("BENCH_CHILD") {
        return handoff::child(&role);
    }
    let quick =
        std::env::var_os("BENCH_QUICK").is_some() || std::env::args().any(|a| a == "--quick");
    let dir = tempfile::tempdir().unwrap();
    println!("# lockgate file-lock benchmarks ({})", machine());
    println!();
    if quick {
        println!("Quick mode: too few samples for the figures to mean anything.");
        println!();
    }
    let go = go_peer();
    if go.is_none() {
        println!(
            "Go lockgate rows skipped: the Go peer is not built (`testenv/build.sh lockgate-go`, \
             or set LOCKGATE_TEST_GO_PEER)."
        );
        println!();
    }
    let mut rng = Rng::seeded();
    // BENCH_ONLY=1,3 runs benchmarks 1 and 3 only.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let runs = |n: &str| only.is_empty() || only.split(',').any(|o| o.trim() == n);
    let go = go.as_deref();
    if runs("1") {
        let (cycles, rounds) = if quick { (2_000, 3) } else { (10_000, 21) };
        uncontended::uncontended(dir.path(), go, cycles, rounds);
    }
    if runs("2") {
        let (samples, go_samples) = if quick { (20, 4) } else { (1_000, 100) };
        handoff::handoff(dir.path(), go, samples, go_samples, &mut rng);
    }
    if runs("3") {
        let secs = std::env::var("BENCH_WAIT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if quick { 1 } else { 10 });
        waiting::waiting_cpu(dir.path(), go, secs, if quick { 1 } else { 3 });
    }
    if runs("4") {
        let counts: Vec<usize> = std::env::var("BENCH_READERS")
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_else(|| if quick { vec![2] } else { vec![1, 6, 32] });
        let (samples, hold, cap) = if quick {
            (1, Duration::from_millis(100), 2)
        } else {
            (3, Duration::from_millis(500), 20)
        };
        fairness::fairness(dir.path(), go, &counts, samples, hold, cap);
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default();
    format!("{n} cores, {cpu}, load average {load} at the start")
}

/// A small xorshift generator: random release moments need no cryptography.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self(t | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `[lo, hi)`.
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_nanos() as u64;
        lo + Duration::from_nanos(self.next() % span.max(1))
    }
}

fn target_bin(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join(name);
    p.exists().then_some(p)
}

/// The Go lockgate version the peer is built with (`lockgate-go version`).
fn go_version(go: &std::path::Path) -> String {
    let out = Command::new(go).arg("version").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn go_peer() -> Option<PathBuf> {
    let p = std::env::var_os("LOCKGATE_TEST_GO_PEER")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(
                exe.parent()?
                    .parent()?
                    .parent()?
                    .join("testenv/bin/lockgate-go"),
            )
        })?;
    p.exists().then_some(p)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn fmt(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 10_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else {
        format!("{:.1} ms", ns as f64 / 1e6)
    }
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one host.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn c_path(dir: &Path, name: &str) -> CString {
    CString::new(dir.join(Naming::Sha256.file_name(name)).to_str().unwrap()).unwrap()
}
