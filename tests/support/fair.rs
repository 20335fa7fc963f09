//! Helpers of the file-fairness tests (`tests/file_fairness.rs`, `tests/file_turnstile.rs`):
//! lockers, the lock file, its turnstile and its mark, and child processes (the test binary
//! re-run with `LOCKGATE_TEST_CHILD` set, whose test `child_entry` plays the role and exits).
#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use lockgate::file::Naming;
use lockgate::{AcquireOptions, FileLocker, Locker};

use super::support::{self, Proc};

pub fn locker(dir: &Path) -> Locker {
    Locker::new(FileLocker::new(dir).unwrap())
}

pub fn ex() -> AcquireOptions {
    AcquireOptions::exclusive()
}

pub fn sh() -> AcquireOptions {
    AcquireOptions::shared()
}

pub fn lock_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(Naming::Sha256.file_name(name))
}

pub fn turnstile_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{}.turnstile", Naming::Sha256.file_name(name)))
}

/// Whether the lock file carries the mark of a waiting exclusive request (the sticky bit).
pub fn marked(dir: &Path, name: &str) -> bool {
    let mode = std::fs::metadata(lock_path(dir, name))
        .unwrap()
        .permissions()
        .mode();
    mode & 0o1000 != 0
}

/// True when nobody holds the turnstile of `name` (or it does not exist).
pub fn turnstile_free(dir: &Path, name: &str) -> bool {
    let Ok(file) = std::fs::File::open(turnstile_path(dir, name)) else {
        return true;
    };
    // SAFETY: flock on a descriptor we own; closing it releases.
    unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        ) == 0
    }
}

/// This process's waits in flock(2) on `path`.
pub fn my_waits(path: &Path) -> usize {
    let me = i64::from(std::process::id());
    support::proc_locks_of(path)
        .iter()
        .filter(|&&(waiting, pid)| waiting && pid == me)
        .count()
}

/// How many hold the lock file at `path`.
pub fn holders(path: &Path) -> usize {
    support::proc_locks_of(path)
        .iter()
        .filter(|(waiting, _)| !waiting)
        .count()
}

/// Spawns this test binary as a child playing `role` on the locks in `dir`.
pub fn child(role: &str, dir: &Path, extra: &[(&str, String)]) -> Proc {
    spawn_child(
        Command::new(std::env::current_exe().unwrap()),
        role,
        dir,
        extra,
    )
}

/// [`child`], run as the user `nobody` (with `setpriv`): a user that owns none of the lock files
/// root made.
pub fn child_as_nobody(role: &str, dir: &Path, extra: &[(&str, String)]) -> Proc {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(std::env::current_exe().unwrap());
    spawn_child(cmd, role, dir, extra)
}

fn spawn_child(mut cmd: Command, role: &str, dir: &Path, extra: &[(&str, String)]) -> Proc {
    cmd.args([
        "--exact",
        "child_entry",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env("LOCKGATE_TEST_CHILD", role)
    .env("LOCKGATE_TEST_DIR", dir)
    .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Proc::spawn_with(&mut cmd, true, true, false)
}

pub fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_default()
}

/// Acquires `name` with `opts` the way `how` says: `blocking` (no deadline), `timed` (the
/// blocking API with a deadline) or `async`.
pub fn acquire_by(
    locker: &Locker,
    how: &str,
    name: &str,
    opts: AcquireOptions,
) -> lockgate::LockGuard {
    match how {
        "blocking" => locker.acquire_blocking(name, opts).unwrap(),
        "timed" => locker
            .acquire_blocking(name, opts.timeout(Duration::from_secs(600)))
            .unwrap(),
        "async" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(locker.acquire(name, opts.timeout(Duration::from_secs(600))))
            .unwrap(),
        other => panic!("unknown waiting path {other}"),
    }
}

/// The child process's part, when this test binary runs as one (`LOCKGATE_TEST_CHILD` set):
/// plays the role and exits. Each test binary calls it from its test `child_entry`.
pub fn child_entry() {
    let Ok(role) = std::env::var("LOCKGATE_TEST_CHILD") else {
        return;
    };
    let dir = PathBuf::from(env("LOCKGATE_TEST_DIR"));
    let locker = locker(&dir);
    let mut stdout = std::io::stdout();
    match role.as_str() {
        // Take NAME shared, say so, hold it until stdin closes.
        "hold-shared" => {
            let g = locker.acquire_blocking(&env("NAME"), sh()).unwrap();
            writeln!(stdout, "locked {}", std::process::id()).unwrap();
            stdout.flush().unwrap();
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            g.release_blocking().unwrap();
        }
        // Take NAME shared (waiting as HOW says), hold it HOLD_MS, release, again, forever (the
        // parent kills it). Says "looping" once it held the lock the first time.
        "share-loop" => {
            let hold = Duration::from_millis(env("HOLD_MS").parse().unwrap());
            let mut told = false;
            loop {
                let g = acquire_by(&locker, &env("HOW"), &env("NAME"), sh());
                if !told {
                    writeln!(stdout, "looping").unwrap();
                    stdout.flush().unwrap();
                    told = true;
                }
                std::thread::sleep(hold);
                drop(g);
            }
        }
        // Wait for NAME exclusively (blocking, no deadline); say when granted.
        "wait-exclusive" => {
            let g = locker.acquire_blocking(&env("NAME"), ex()).unwrap();
            writeln!(stdout, "granted").unwrap();
            drop(g);
        }
        // Try NAME shared without waiting; say "joined" or "busy".
        "share-now" => {
            let said = match locker.acquire_blocking(&env("NAME"), sh().non_blocking()) {
                Ok(_) => "joined",
                Err(e) if e.is_contention() => "busy",
                Err(e) => panic!("{e}"),
            };
            writeln!(stdout, "{said}").unwrap();
        }
        other => panic!("unknown child role {other}"),
    }
    std::process::exit(0);
}
