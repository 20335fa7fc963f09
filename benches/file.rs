//! File-lock benchmarks, each side by side with its baseline in the same run:
//!
//! 1. uncontended acquire+release: lockgate vs the raw `open + flock + close` syscalls (and Go
//!    lockgate's file locker when the Go peer is built);
//! 2. handoff to a waiter blocked in another process: lockgate vs a raw blocking `flock` (and Go);
//! 3. CPU time a waiting `lockgate exec` uses while a lock stays busy (and `lockgate-go exec`).
//!
//! Run: `cargo build --release --workspace && testenv/build.sh lockgate-go && cargo bench --bench file`
//! (`BENCH_QUICK=1` for a short run; `BENCH_WAIT_SECS` sets the wait of benchmark 3, default 10).

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockgate::file::Naming;
use lockgate::{AcquireOptions, FileLocker, Locker};

fn main() {
    if let Ok(role) = std::env::var("BENCH_CHILD") {
        return child(&role);
    }
    // `cargo bench` passes --bench; ignore arguments.
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let dir = tempfile::tempdir().unwrap();
    println!("# lockgate file-lock benchmarks ({})", machine());
    println!();
    uncontended(dir.path(), if quick { 5_000 } else { 50_000 });
    handoff(dir.path(), if quick { 100 } else { 1_000 });
    waiting_cpu(
        dir.path(),
        std::env::var("BENCH_WAIT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if quick { 2 } else { 10 }),
    );
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
    format!("{n} cores, {cpu}")
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

// ---------------------------------------------------------------------------------------------

fn uncontended(dir: &Path, n: usize) {
    println!("## 1. Uncontended exclusive acquire + release ({n} cycles, best of 5 rounds)");
    println!();
    println!("| implementation | per cycle | vs raw |");
    println!("|---|---|---|");
    let locker = Locker::new(FileLocker::new(dir).unwrap());
    let path = CString::new(
        dir.join(Naming::Sha256.file_name("uncontended"))
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let best = |f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..n {
                    f();
                }
                t.elapsed() / n as u32
            })
            .min()
            .unwrap()
    };
    let raw = best(&mut || raw_cycle(&path));
    let lg = best(&mut || {
        let g = locker
            .acquire_blocking("uncontended", AcquireOptions::exclusive())
            .unwrap();
        g.release_blocking().unwrap();
    });
    let lg_drop = best(&mut || {
        drop(
            locker
                .acquire_blocking("uncontended", AcquireOptions::exclusive())
                .unwrap(),
        );
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lg_async = best(&mut || {
        rt.block_on(async {
            let g = locker
                .acquire("uncontended", AcquireOptions::exclusive())
                .await
                .unwrap();
            g.release().await.unwrap();
        })
    });
    let ratio = |d: Duration| format!("{:.2}×", d.as_secs_f64() / raw.as_secs_f64());
    println!("| raw open + flock + close | {} | 1.00× |", fmt(raw));
    println!(
        "| lockgate `acquire_blocking` + `release_blocking` | {} | {} |",
        fmt(lg),
        ratio(lg)
    );
    println!(
        "| lockgate `acquire_blocking` + drop | {} | {} |",
        fmt(lg_drop),
        ratio(lg_drop)
    );
    println!(
        "| lockgate async `acquire` + `release` | {} | {} |",
        fmt(lg_async),
        ratio(lg_async)
    );
    if let Some(go) = go_peer() {
        let out = Command::new(go)
            .args([
                "bench",
                "--locker",
                &format!("file:{}", dir.display()),
                "--name",
                "uncontended",
                "--iterations",
                &n.to_string(),
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("Go bench output");
        let go = Duration::from_nanos(v["ns_per_op"].as_u64().unwrap());
        println!(
            "| Go lockgate {} `Acquire` + `Release` | {} | {} |",
            v["version"].as_str().unwrap_or("?"),
            fmt(go),
            ratio(go)
        );
    } else {
        println!("| Go lockgate | (not built: run testenv/build.sh lockgate-go) | |");
    }
    println!();
}

// ---------------------------------------------------------------------------------------------

/// The waiting side of the handoff benchmark: for each line on stdin, acquire (blocking), print
/// the monotonic time of the grant, release.
fn child(role: &str) {
    let dir = PathBuf::from(std::env::var("BENCH_DIR").unwrap());
    let locker = Locker::new(FileLocker::new(&dir).unwrap());
    let path = CString::new(
        dir.join(Naming::Sha256.file_name("handoff"))
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for _ in stdin.lock().lines() {
        match role {
            "lockgate" => {
                let g = locker
                    .acquire_blocking("handoff", AcquireOptions::exclusive())
                    .unwrap();
                let t = mono_ns();
                writeln!(out, "granted {t}").unwrap();
                out.flush().unwrap();
                drop(g);
            }
            "raw" => unsafe {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644,
                );
                assert_eq!(libc::flock(fd, libc::LOCK_EX), 0);
                let t = mono_ns();
                writeln!(out, "granted {t}").unwrap();
                out.flush().unwrap();
                libc::close(fd);
            },
            _ => panic!("unknown role"),
        }
    }
}

fn waiters(path: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    let id = format!(":{} ", meta.ino());
    let mut buf = vec![0u8; 1 << 20];
    let n =
        std::io::Read::read(&mut std::fs::File::open("/proc/locks").unwrap(), &mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .filter(|l| l.contains("->") && l.contains(&id))
        .count()
}

/// How the holder knows the waiter is waiting before it releases.
enum Ready {
    /// The waiter blocks in the kernel: wait until /proc/locks shows it.
    Blocked,
    /// The waiter polls: release after a pause that moves across its poll period.
    Polling,
}

fn handoff_run(dir: &Path, mut waiter: Child, rounds: usize, ready: Ready) -> Vec<Duration> {
    let path = dir.join(Naming::Sha256.file_name("handoff"));
    let locker = Locker::new(FileLocker::new(dir).unwrap());
    let mut stdin = waiter.stdin.take().unwrap();
    let mut stdout = BufReader::new(waiter.stdout.take().unwrap());
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let g = locker
            .acquire_blocking("handoff", AcquireOptions::exclusive())
            .unwrap();
        writeln!(stdin, "go").unwrap();
        stdin.flush().unwrap();
        match ready {
            Ready::Blocked => {
                let deadline = Instant::now() + Duration::from_secs(10);
                while waiters(&path) == 0 {
                    assert!(Instant::now() < deadline, "the waiter never blocked");
                    std::thread::yield_now();
                }
            }
            Ready::Polling => std::thread::sleep(Duration::from_millis(50 + (i as u64 * 37) % 500)),
        }
        let released = mono_ns();
        drop(g);
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let granted: u64 = line
            .trim()
            .strip_prefix("granted ")
            .expect("granted line")
            .parse()
            .unwrap();
        samples.push(Duration::from_nanos(granted.saturating_sub(released)));
    }
    drop(stdin);
    waiter.wait().unwrap();
    samples.sort();
    samples
}

fn handoff(dir: &Path, rounds: usize) {
    println!("## 2. Handoff to a waiter blocked in another process ({rounds} handoffs)");
    println!();
    println!(
        "Time from the holder's release to the waiter's grant (CLOCK_MONOTONIC across processes)."
    );
    println!();
    println!("| waiter | p50 | p99 | max |");
    println!("|---|---|---|---|");
    let spawn = |role: &str| {
        Command::new(std::env::current_exe().unwrap())
            .env("BENCH_CHILD", role)
            .env("BENCH_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let row = |label: &str, s: &[Duration]| {
        println!(
            "| {label} | {} | {} | {} |",
            fmt(percentile(s, 0.5)),
            fmt(percentile(s, 0.99)),
            fmt(*s.last().unwrap())
        );
    };
    row(
        "raw blocking flock(2)",
        &handoff_run(dir, spawn("raw"), rounds, Ready::Blocked),
    );
    row(
        "lockgate `acquire_blocking`",
        &handoff_run(dir, spawn("lockgate"), rounds, Ready::Blocked),
    );
    if let Some(go) = go_peer() {
        let version = go_version(&go);
        let go_rounds = 20; // Go polls every 500 ms: a handoff costs up to half a second.
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
        let s = handoff_run(dir, child, go_rounds, Ready::Polling);
        row(&format!("Go lockgate {version} ({go_rounds} handoffs)"), &s);
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

fn waiting_cpu(dir: &Path, secs: u64) {
    println!("## 3. CPU used by a process waiting {secs} s for a busy lock");
    println!();
    println!(
        "user + system time of the whole waiting process (start-up, the wait, running `true`,"
    );
    println!("exit), measured with wait4(2); \"of which waiting\" subtracts the same run with a 0.2 s wait.");
    println!();
    println!("| waiter | CPU time, {secs} s wait | of which waiting |");
    println!("|---|---|---|");
    let measure = |label: &str, make: &dyn Fn() -> Command| {
        let short = cpu_of_waiting(make(), dir, Duration::from_millis(200));
        let long = cpu_of_waiting(make(), dir, Duration::from_secs(secs));
        println!(
            "| {label} | {} | {} |",
            fmt(long),
            fmt(long.saturating_sub(short))
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
        None => println!("| `lockgate exec` | (not built: cargo build --release --workspace) | |"),
    }
    if let Some(go) = go_peer() {
        let label = format!("`lockgate-go exec` (Go lockgate {})", go_version(&go));
        measure(&label, &|| {
            let mut cmd = Command::new(&go);
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
