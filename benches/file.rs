//! File-lock benchmarks, each side by side with its baselines in the same run:
//!
//! 1. uncontended acquire + release: lockgate against the raw `open + flock + close` system calls
//!    and Go lockgate's file locker (through the Go peer), in interleaved rounds, the fastest
//!    and the median round of each;
//! 2. handoff to a waiter in another process, for every way of waiting users have (lockgate's
//!    `acquire_blocking` without a deadline, with a deadline, and async), against a raw blocking
//!    `flock` and Go lockgate (which polls); the release comes at a random moment;
//! 3. CPU time a waiting `lockgate exec` uses while a lock stays busy (and `lockgate-go exec`).
//!
//! Run (full): `cargo build --release -p lockgate-cli && cargo bench --bench file`; with the Go
//! rows: build the peer first (`testenv/build.sh lockgate-go`, or point `LOCKGATE_TEST_GO_PEER`
//! at it). Quick mode (a few samples, to keep the harness working; `scripts/test` runs it):
//! `BENCH_QUICK=1 cargo bench --bench file` or `cargo bench --bench file -- --quick`.
//! `BENCH_WAIT_SECS` sets the wait of benchmark 3 (default 10); `BENCH_ONLY=1,3` runs only
//! the benchmarks listed.
//!
//! Every difference of two clock readings is checked: a waiter granted the lock before its
//! release is a violation and aborts the run; nothing is clamped to zero.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockgate::file::Naming;
use lockgate::{AcquireOptions, FileLocker, Locker};

fn main() {
    if let Ok(role) = std::env::var("BENCH_CHILD") {
        return child(&role);
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
        uncontended(dir.path(), go, cycles, rounds);
    }
    if runs("2") {
        let (samples, go_samples) = if quick { (20, 4) } else { (1_000, 100) };
        handoff(dir.path(), go, samples, go_samples, &mut rng);
    }
    if runs("3") {
        let secs = std::env::var("BENCH_WAIT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if quick { 1 } else { 10 });
        waiting_cpu(dir.path(), go, secs, if quick { 1 } else { 3 });
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

fn raw_cycle(path: &CString) {
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC,
            0o644,
        );
        assert!(fd >= 0);
        assert_eq!(libc::flock(fd, libc::LOCK_EX), 0);
        libc::close(fd);
    }
}

/// The raw cycle plus the `fstat(2)` after locking that makes acquisition safe against `gc`
/// (its link count): the least a safe acquisition costs.
fn raw_cycle_fstat(path: &CString) {
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC,
            0o644,
        );
        assert!(fd >= 0);
        assert_eq!(libc::flock(fd, libc::LOCK_EX), 0);
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        assert_eq!(libc::fstat(fd, st.as_mut_ptr()), 0);
        libc::close(fd);
    }
}

fn c_path(dir: &Path, name: &str) -> CString {
    CString::new(dir.join(Naming::Sha256.file_name(name)).to_str().unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------

/// What one round of benchmark 1 costs per cycle: CPU time (user + system, of the thread or
/// process doing the work; time spent descheduled on a busy machine does not count) and wall
/// time.
#[derive(Clone, Copy)]
struct Cost {
    cpu: Duration,
    wall: Duration,
}

/// One implementation of benchmark 1: runs `n` cycles.
type Round<'a> = Box<dyn FnMut(usize) -> Cost + 'a>;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn timed(n: usize, mut f: impl FnMut()) -> Cost {
    let (t, c) = (Instant::now(), thread_cpu());
    for _ in 0..n {
        f();
    }
    Cost {
        cpu: (thread_cpu() - c) / n as u32,
        wall: t.elapsed() / n as u32,
    }
}

/// Runs the Go peer's `bench` for `n` cycles: its wall time per cycle (from its own loop), and
/// its CPU time (whole process, from wait4(2)).
#[allow(clippy::zombie_processes)] // reaped by wait4
fn go_bench(go: &Path, locker_url: &str, n: usize) -> (Duration, Duration) {
    let child = Command::new(go)
        .args(["bench", "--locker", locker_url, "--name", "uncontended"])
        .args(["--iterations", &n.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut out = String::new();
    child.stdout.unwrap().read_to_string(&mut out).unwrap();
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "Go peer failed"
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("Go bench output");
    let wall = Duration::from_nanos(v["ns_per_op"].as_u64().unwrap());
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (wall, tv(usage.ru_utime) + tv(usage.ru_stime))
}

fn uncontended(dir: &Path, go: Option<&Path>, n: usize, rounds: usize) {
    println!(
        "## 1. Uncontended exclusive acquire + release ({rounds} interleaved rounds of {n} cycles)"
    );
    println!();
    println!(
        "Per cycle, in CPU time (user + system; time spent descheduled on a busy machine does \
         not count): the fastest and the median round, each against the raw calls' round of the \
         same rank; and the median round in wall time. The Go peer's CPU time is its process's, \
         less that of a run of one cycle (start-up)."
    );
    println!();
    println!(
        "| implementation | CPU, fastest round | vs raw | CPU, median round | vs raw | wall, median round | vs raw |"
    );
    println!("|---|---|---|---|---|---|---|");
    let locker = Locker::new(FileLocker::new(dir).unwrap());
    let path = c_path(dir, "uncontended");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<(String, Round)> = vec![
        (
            "raw open + flock + close".into(),
            Box::new(|n| timed(n, || raw_cycle(&path))),
        ),
        (
            "raw open + flock + fstat + close (the least a gc-safe acquisition costs)".into(),
            Box::new(|n| timed(n, || raw_cycle_fstat(&path))),
        ),
        (
            "lockgate `acquire_blocking` + `release_blocking`".into(),
            Box::new(|n| {
                timed(n, || {
                    let g = locker
                        .acquire_blocking("uncontended", AcquireOptions::exclusive())
                        .unwrap();
                    g.release_blocking().unwrap();
                })
            }),
        ),
        (
            "lockgate `acquire_blocking` + drop".into(),
            Box::new(|n| {
                timed(n, || {
                    drop(
                        locker
                            .acquire_blocking("uncontended", AcquireOptions::exclusive())
                            .unwrap(),
                    )
                })
            }),
        ),
        (
            "raw open + flock + close, each cycle in `block_on` (what the async row's harness adds)"
                .into(),
            Box::new(|n| timed(n, || rt.block_on(async { raw_cycle(&path) }))),
        ),
        (
            "lockgate async `acquire` + `release`".into(),
            Box::new(|n| {
                timed(n, || {
                    rt.block_on(async {
                        let g = locker
                            .acquire("uncontended", AcquireOptions::exclusive())
                            .await
                            .unwrap();
                        g.release().await.unwrap();
                    })
                })
            }),
        ),
    ];
    if let Some(go) = go {
        let locker_url = format!("file:{}", dir.display());
        rows.push((
            format!(
                "Go lockgate {} `Acquire` + `Release` (the Go peer's own loop)",
                go_version(go)
            ),
            Box::new(move |n| {
                // CPU: the process running n cycles less one running a single cycle (start-up).
                let (wall, cpu) = go_bench(go, &locker_url, n);
                let (_, start_up) = go_bench(go, &locker_url, 1);
                assert!(
                    cpu > start_up,
                    "the Go peer used less CPU for {n} cycles ({cpu:?}) than for one ({start_up:?})"
                );
                Cost {
                    cpu: (cpu - start_up) / (n as u32 - 1),
                    wall,
                }
            }),
        ));
    }
    // Warm up (page cache, the path cache, the Go binary), then interleave the rounds, each
    // round in a rotated order, so that a slow phase of the machine hits every row alike.
    for (_, f) in &mut rows {
        f(n / 10 + 1);
    }
    let mut cpu: Vec<Vec<Duration>> = vec![Vec::new(); rows.len()];
    let mut wall: Vec<Vec<Duration>> = vec![Vec::new(); rows.len()];
    for r in 0..rounds {
        for k in 0..rows.len() {
            let i = (r + k) % rows.len();
            let cost = (rows[i].1)(n);
            cpu[i].push(cost.cpu);
            wall[i].push(cost.wall);
        }
    }
    for s in cpu.iter_mut().chain(wall.iter_mut()) {
        s.sort();
    }
    let raw_best = cpu[0][0];
    let raw_median = percentile(&cpu[0], 0.5);
    let raw_wall = percentile(&wall[0], 0.5);
    for (i, (label, _)) in rows.iter().enumerate() {
        let (best, median, w) = (
            cpu[i][0],
            percentile(&cpu[i], 0.5),
            percentile(&wall[i], 0.5),
        );
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} |",
            fmt(best),
            ratio(best, raw_best),
            fmt(median),
            ratio(median, raw_median),
            fmt(w),
            ratio(w, raw_wall),
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------------

/// The waiting side of the handoff benchmark: for each line on stdin, acquire the lock
/// (waiting as `role` says), print the monotonic time of the grant, release.
fn child(role: &str) {
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

fn handoff(dir: &Path, go: Option<&Path>, rounds: usize, go_rounds: usize, rng: &mut Rng) {
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

// ---------------------------------------------------------------------------------------------

// The child is reaped by wait4(2) (for its resource usage), not by Child::wait.
#[allow(clippy::zombie_processes)]
fn cpu_of_waiting(mut cmd: Command, dir: &Path, wait: Duration) -> Duration {
    let locker = Locker::new(FileLocker::new(dir).unwrap());
    let g = locker
        .acquire_blocking("busy", AcquireOptions::exclusive())
        .unwrap();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(wait);
    drop(g);
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "waiter failed: {status}"
    );
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A signed duration, for differences that may come out negative on a noisy machine.
fn fmt_signed(ns: i128) -> String {
    let sign = if ns < 0 { "−" } else { "" };
    format!(
        "{sign}{}",
        fmt(Duration::from_nanos(ns.unsigned_abs() as u64))
    )
}

fn waiting_cpu(dir: &Path, go: Option<&Path>, secs: u64, runs: usize) {
    println!("## 3. CPU used by a process waiting {secs} s for a busy lock ({runs} runs each)");
    println!();
    println!(
        "User + system time of the whole waiting process (start-up, the wait, running `true`, \
         exit), measured with wait4(2). \"Of which waiting\": each run paired with a run that \
         waits 0.2 s, the difference of the two (signed, not clamped); median and range over the \
         runs."
    );
    println!();
    println!("| waiter | CPU time, {secs} s wait (median) | of which waiting (median) | range of the difference |");
    println!("|---|---|---|---|");
    let measure = |label: &str, make: &dyn Fn() -> Command| {
        let mut long = Vec::new();
        let mut diff = Vec::new();
        for _ in 0..runs {
            let short = cpu_of_waiting(make(), dir, Duration::from_millis(200));
            let l = cpu_of_waiting(make(), dir, Duration::from_secs(secs));
            long.push(l);
            diff.push(l.as_nanos() as i128 - short.as_nanos() as i128);
        }
        long.sort();
        diff.sort();
        println!(
            "| {label} | {} | {} | {} to {} |",
            fmt(long[long.len() / 2]),
            fmt_signed(diff[diff.len() / 2]),
            fmt_signed(diff[0]),
            fmt_signed(*diff.last().unwrap())
        );
    };
    match target_bin("lockgate") {
        Some(cli) => measure("`lockgate exec`", &|| {
            let mut cmd = Command::new(&cli);
            cmd.arg("--dir")
                .arg(dir)
                .args(["exec", "busy", "--", "true"]);
            cmd
        }),
        None => {
            println!("| `lockgate exec` | (not built: cargo build --release -p lockgate-cli) | | |")
        }
    }
    if let Some(go) = go {
        let label = format!("`lockgate-go exec` (Go lockgate {})", go_version(go));
        measure(&label, &|| {
            let mut cmd = Command::new(go);
            cmd.args([
                "exec",
                "--locker",
                &format!("file:{}", dir.display()),
                "busy",
                "--",
                "true",
            ]);
            cmd
        });
    }
    println!();
}
