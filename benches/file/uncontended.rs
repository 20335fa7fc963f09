//! Benchmark 1: uncontended acquire + release, exclusive and shared, against the raw system
//! calls (and, for shared locks, what two other ways of keeping them fair would cost), and Go
//! lockgate.

use std::ffi::CString;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockgate::{AcquireOptions, FileLocker, Locker};

use crate::{c_path, fmt, go_version, percentile, ratio};

/// `open + flock(operation) + close`: what any flock(2) lock costs.
fn raw_cycle(path: &CString, operation: libc::c_int) {
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC,
            0o644,
        );
        assert!(fd >= 0);
        assert_eq!(libc::flock(fd, operation), 0);
        libc::close(fd);
    }
}

/// The raw cycle plus the `fstat(2)` after locking that makes acquisition safe against `gc`
/// (its link count), and shows the turnstile's mark: the least a safe acquisition costs.
fn raw_cycle_fstat(path: &CString, operation: libc::c_int) {
    raw_cycle_then(path, operation, || {})
}

/// The raw cycle with the `fstat`, and `check` before the close.
fn raw_cycle_then(path: &CString, operation: libc::c_int, check: impl FnOnce()) {
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC,
            0o644,
        );
        assert!(fd >= 0);
        assert_eq!(libc::flock(fd, operation), 0);
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        assert_eq!(libc::fstat(fd, st.as_mut_ptr()), 0);
        check();
        libc::close(fd);
    }
}

/// A fairness check not taken: open the turnstile, try it shared, close it.
fn check_by_opening(turnstile: &CString) {
    unsafe {
        let fd = libc::open(turnstile.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB), 0);
        libc::close(fd);
    }
}

/// A fairness check not taken: test a turnstile kept open for an OFD write lock
/// (`F_OFD_GETLK` takes nothing; the exclusive waiter would hold the write lock).
fn check_by_lock_test(turnstile_fd: libc::c_int) {
    unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = libc::F_RDLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        assert_eq!(libc::fcntl(turnstile_fd, libc::F_OFD_GETLK, &mut fl), 0);
        assert_eq!(fl.l_type, libc::F_UNLCK as libc::c_short);
    }
}

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
fn go_bench(go: &Path, locker_url: &str, shared: bool, n: usize) -> (Duration, Duration) {
    let child = Command::new(go)
        .args(["bench", "--locker", locker_url, "--name", "uncontended"])
        .args(shared.then_some("-s"))
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

/// A Go peer row: CPU per cycle is the process's for `n` cycles less one running a single
/// cycle (start-up).
fn go_round<'a>(go: &'a Path, locker_url: String, shared: bool) -> Round<'a> {
    Box::new(move |n| {
        let (wall, cpu) = go_bench(go, &locker_url, shared, n);
        let (_, start_up) = go_bench(go, &locker_url, shared, 1);
        // A Go process's start-up varies by a millisecond or so, which is more than a few
        // hundred cycles cost (the warm-up round; quick mode's rounds come close): such a
        // round counts as free rather than failing the run.
        Cost {
            cpu: cpu.saturating_sub(start_up) / (n.max(2) as u32 - 1),
            wall,
        }
    })
}

/// Which table a row belongs to; the first row of each is its baseline.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    Exclusive,
    Shared,
}

pub(crate) fn uncontended(dir: &Path, go: Option<&Path>, n: usize, rounds: usize) {
    let locker = Locker::new(FileLocker::new(dir).unwrap());
    let path = c_path(dir, "uncontended");
    let turnstile = CString::new(format!("{}.turnstile", path.to_str().unwrap())).unwrap();
    std::fs::write(turnstile.to_str().unwrap(), "").unwrap();
    let turnstile_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(turnstile.to_str().unwrap())
        .unwrap();
    let turnstile_fd = std::os::fd::AsRawFd::as_raw_fd(&turnstile_file);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ex, sh) = (libc::LOCK_EX, libc::LOCK_SH);
    let cycle = |opts: AcquireOptions| {
        let g = locker.acquire_blocking("uncontended", opts).unwrap();
        g.release_blocking().unwrap();
    };
    let async_cycle = |opts: AcquireOptions| {
        rt.block_on(async {
            let g = locker.acquire("uncontended", opts).await.unwrap();
            g.release().await.unwrap();
        })
    };
    let mut rows: Vec<(Table, String, Round)> = vec![
        (
            Table::Exclusive,
            "raw open + flock + close".into(),
            Box::new(|n| timed(n, || raw_cycle(&path, ex))),
        ),
        (
            Table::Exclusive,
            "raw open + flock + fstat + close (the least a gc-safe acquisition costs)".into(),
            Box::new(|n| timed(n, || raw_cycle_fstat(&path, ex))),
        ),
        (
            Table::Exclusive,
            "lockgate `acquire_blocking` + `release_blocking`".into(),
            Box::new(|n| timed(n, || cycle(AcquireOptions::exclusive()))),
        ),
        (
            Table::Exclusive,
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
            Table::Exclusive,
            "raw open + flock + close, each cycle in `block_on` (what the async row's harness adds)"
                .into(),
            Box::new(|n| timed(n, || rt.block_on(async { raw_cycle(&path, ex) }))),
        ),
        (
            Table::Exclusive,
            "lockgate async `acquire` + `release`".into(),
            Box::new(|n| timed(n, || async_cycle(AcquireOptions::exclusive()))),
        ),
        (
            Table::Shared,
            "raw open + flock(LOCK_SH) + close".into(),
            Box::new(|n| timed(n, || raw_cycle(&path, sh))),
        ),
        (
            Table::Shared,
            "raw open + flock(LOCK_SH) + fstat + close (the least a gc-safe acquisition costs; the same fstat shows the turnstile's mark)"
                .into(),
            Box::new(|n| timed(n, || raw_cycle_fstat(&path, sh))),
        ),
        (
            Table::Shared,
            "not taken: the raw shared cycle with fstat, and the turnstile opened, tried and closed"
                .into(),
            Box::new(|n| {
                timed(n, || {
                    raw_cycle_then(&path, sh, || check_by_opening(&turnstile))
                })
            }),
        ),
        (
            Table::Shared,
            "not taken: the raw shared cycle with fstat, and `F_OFD_GETLK` on a turnstile kept open"
                .into(),
            Box::new(|n| {
                timed(n, || {
                    raw_cycle_then(&path, sh, || check_by_lock_test(turnstile_fd))
                })
            }),
        ),
        (
            Table::Shared,
            "lockgate `acquire_blocking` + `release_blocking`, shared".into(),
            Box::new(|n| timed(n, || cycle(AcquireOptions::shared()))),
        ),
        (
            Table::Shared,
            "raw open + flock(LOCK_SH) + close, each cycle in `block_on`".into(),
            Box::new(|n| timed(n, || rt.block_on(async { raw_cycle(&path, sh) }))),
        ),
        (
            Table::Shared,
            "lockgate async `acquire` + `release`, shared".into(),
            Box::new(|n| timed(n, || async_cycle(AcquireOptions::shared()))),
        ),
    ];
    if let Some(go) = go {
        let url = format!("file:{}", dir.display());
        let version = go_version(go);
        rows.push((
            Table::Exclusive,
            format!("Go lockgate {version} `Acquire` + `Release` (the Go peer's own loop)"),
            go_round(go, url.clone(), false),
        ));
        rows.push((
            Table::Shared,
            format!("Go lockgate {version} `Acquire` + `Release`, shared (the Go peer's own loop)"),
            go_round(go, url, true),
        ));
    }
    // Warm up (page cache, the path cache, the Go binary), then interleave the rounds, each
    // round in a rotated order, so that a slow phase of the machine hits every row alike.
    for (_, _, f) in &mut rows {
        f(n / 10 + 1);
    }
    let mut cpu: Vec<Vec<Duration>> = vec![Vec::new(); rows.len()];
    let mut wall: Vec<Vec<Duration>> = vec![Vec::new(); rows.len()];
    for r in 0..rounds {
        for k in 0..rows.len() {
            let i = (r + k) % rows.len();
            let cost = (rows[i].2)(n);
            cpu[i].push(cost.cpu);
            wall[i].push(cost.wall);
        }
    }
    for s in cpu.iter_mut().chain(wall.iter_mut()) {
        s.sort();
    }
    for (table, title) in [
        (
            Table::Exclusive,
            "1. Uncontended exclusive acquire + release",
        ),
        (Table::Shared, "1b. Uncontended shared acquire + release"),
    ] {
        println!("## {title} ({rounds} interleaved rounds of {n} cycles)");
        println!();
        println!(
            "Per cycle, in CPU time (user + system; time spent descheduled on a busy machine \
             does not count): the fastest and the median round, each against the raw calls' \
             round of the same rank; and the median round in wall time. The Go peer's CPU time \
             is its process's, less that of a run of one cycle (start-up). Both tables come from \
             one run, their rounds interleaved."
        );
        println!();
        println!(
            "| implementation | CPU, fastest round | vs raw | CPU, median round | vs raw | wall, median round | vs raw |"
        );
        println!("|---|---|---|---|---|---|---|");
        let mine: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].0 == table).collect();
        let base = mine[0];
        let raw_best = cpu[base][0];
        let raw_median = percentile(&cpu[base], 0.5);
        let raw_wall = percentile(&wall[base], 0.5);
        for i in mine {
            let (best, median, w) = (
                cpu[i][0],
                percentile(&cpu[i], 0.5),
                percentile(&wall[i], 0.5),
            );
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                rows[i].1,
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
    drop(turnstile_file);
}
