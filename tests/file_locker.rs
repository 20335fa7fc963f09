//! The file locker, tested with real flock(2) on real files, across threads and processes.
//!
//! Child processes are this test binary re-run with `LOCKGATE_TEST_CHILD` set: the test
//! `child_entry` then plays the role the environment describes and exits.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockgate::file::Naming;
use lockgate::{
    with_acquire, with_acquire_blocking, AcquireError, AcquireOptions, Error, FileLocker,
    LockHandle, Locker, Mode, NameError,
};

fn locker(dir: &Path) -> Locker {
    Locker::new(FileLocker::new(dir).unwrap())
}

fn ex() -> AcquireOptions {
    AcquireOptions::exclusive()
}

fn nb(mode: Mode) -> AcquireOptions {
    AcquireOptions::default().mode(mode).non_blocking()
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// Spawns this test binary as a child playing `role` on the locks in `dir`.
fn child(role: &str, dir: &Path, extra: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_entry",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env("LOCKGATE_TEST_CHILD", role)
    .env("LOCKGATE_TEST_DIR", dir)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Reads lines from a child's stdout until one starts with `want` (bounded by the child's own
/// behaviour: a dead child ends the stream and fails the test).
fn expect_line(child: &mut Child, want: &str) -> String {
    let out = child.stdout.as_mut().unwrap();
    let mut reader = BufReader::new(out);
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "child ended before printing {want:?}");
        if line.starts_with(want) {
            return line.trim_end().to_owned();
        }
    }
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_default()
}

#[test]
fn child_entry() {
    let Ok(role) = std::env::var("LOCKGATE_TEST_CHILD") else {
        return;
    };
    let dir = PathBuf::from(env("LOCKGATE_TEST_DIR"));
    let locker = locker(&dir);
    let mut stdout = std::io::stdout();
    match role.as_str() {
        // Take the lock, say so, hold it until stdin closes or says "release".
        "hold" => {
            let mode = if env("MODE") == "shared" {
                Mode::Shared
            } else {
                Mode::Exclusive
            };
            let g = locker
                .acquire_blocking(&env("NAME"), AcquireOptions::default().mode(mode))
                .unwrap();
            writeln!(stdout, "locked {}", std::process::id()).unwrap();
            stdout.flush().unwrap();
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            g.release_blocking().unwrap();
        }
        // Read-modify-write a counter under the lock; writers mark their critical section and
        // everyone checks that no writer is inside when they enter.
        "counter" => {
            let cycles: usize = env("CYCLES").parse().unwrap();
            let readers_every: usize = env("READERS_EVERY").parse().unwrap_or(0);
            let counter = dir.join("counter");
            let marker = dir.join("writer-inside");
            let mut overlaps = 0;
            for i in 0..cycles {
                let read = readers_every > 0 && i % readers_every == 0;
                let mode = if read { Mode::Shared } else { Mode::Exclusive };
                let g = locker
                    .acquire_blocking("counter", AcquireOptions::default().mode(mode))
                    .unwrap();
                if marker.exists() {
                    overlaps += 1;
                }
                if !read {
                    std::fs::write(&marker, b"").unwrap();
                    let n: u64 = std::fs::read_to_string(&counter)
                        .unwrap()
                        .trim()
                        .parse()
                        .unwrap();
                    std::thread::yield_now();
                    std::fs::write(&counter, (n + 1).to_string()).unwrap();
                    std::fs::remove_file(&marker).unwrap();
                }
                g.release_blocking().unwrap();
            }
            writeln!(stdout, "overlaps {overlaps}").unwrap();
        }
        // Wait for the lock (it is held by the parent), and report when granted.
        "wait" => {
            writeln!(stdout, "waiting").unwrap();
            stdout.flush().unwrap();
            let g = locker.acquire_blocking(&env("NAME"), ex()).unwrap();
            let t = lockgate_test_clock();
            writeln!(stdout, "granted {t}").unwrap();
            drop(g);
        }
        other => panic!("unknown child role {other}"),
    }
    std::process::exit(0);
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one host.
fn lockgate_test_clock() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

// ---------------------------------------------------------------------------------------------
// Exclusion across processes

#[test]
fn processes_never_lose_updates_and_writers_never_overlap() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("counter"), "0").unwrap();
    let procs: usize = std::env::var("LOCKGATE_STRESS_PROCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let cycles: usize = std::env::var("LOCKGATE_STRESS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let start = Instant::now();
    let mut children: Vec<Child> = (0..procs)
        .map(|i| {
            // Half the processes also take shared locks now and then.
            let readers_every = if i % 2 == 0 { "3" } else { "0" };
            child(
                "counter",
                dir.path(),
                &[
                    ("CYCLES", cycles.to_string()),
                    ("READERS_EVERY", readers_every.to_string()),
                ],
            )
        })
        .collect();
    let mut overlaps = 0;
    for c in &mut children {
        let line = expect_line(c, "overlaps ");
        overlaps += line["overlaps ".len()..].parse::<usize>().unwrap();
        assert!(c.wait().unwrap().success());
    }
    let writes: usize = (0..procs)
        .map(|i| {
            if i % 2 == 0 {
                cycles - cycles.div_ceil(3)
            } else {
                cycles
            }
        })
        .sum();
    let counter: usize = std::fs::read_to_string(dir.path().join("counter"))
        .unwrap()
        .parse()
        .unwrap();
    eprintln!(
        "{procs} processes x {cycles} cycles: {writes} writes in {:?}",
        start.elapsed()
    );
    assert_eq!(counter, writes, "lost updates");
    assert_eq!(overlaps, 0, "a holder entered while a writer was inside");
}

#[test]
fn shared_holders_overlap_and_exclude_writers() {
    let dir = tempfile::tempdir().unwrap();
    let mut reader = child(
        "hold",
        dir.path(),
        &[("NAME", "r".into()), ("MODE", "shared".into())],
    );
    expect_line(&mut reader, "locked");
    let l = locker(dir.path());
    let second = l
        .acquire_blocking("r", nb(Mode::Shared))
        .expect("readers overlap");
    assert!(matches!(
        l.acquire_blocking("r", nb(Mode::Exclusive)),
        Err(AcquireError::WouldBlock { .. })
    ));
    drop(second);
    assert!(matches!(
        l.acquire_blocking("r", nb(Mode::Exclusive)),
        Err(AcquireError::WouldBlock { .. })
    ));
    drop(reader.stdin.take());
    assert!(reader.wait().unwrap().success());
    drop(
        l.acquire_blocking("r", nb(Mode::Exclusive))
            .expect("free after the reader left"),
    );
}

#[test]
fn a_killed_holders_lock_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = child("hold", dir.path(), &[("NAME", "k".into())]);
    expect_line(&mut holder, "locked");
    let l = locker(dir.path());
    assert!(matches!(
        l.acquire_blocking("k", nb(Mode::Exclusive)),
        Err(AcquireError::WouldBlock { .. })
    ));
    holder.kill().unwrap();
    holder.wait().unwrap();
    let g = l
        .acquire_blocking("k", ex().timeout(Duration::from_secs(10)))
        .expect("the kernel frees a dead process's lock");
    drop(g);
}

#[test]
fn a_blocked_process_is_woken_on_release() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let g = l.acquire_blocking("handoff", ex()).unwrap();
    let mut waiter = child("wait", dir.path(), &[("NAME", "handoff".into())]);
    expect_line(&mut waiter, "waiting");
    // Let the waiter block in the kernel (if it is not blocked yet it takes the lock at once
    // after release, which measures the same thing).
    wait_until(Duration::from_secs(10), || {
        waiters_of(dir.path(), "handoff") == 1
    });
    let released = lockgate_test_clock();
    g.release_blocking().unwrap();
    let line = expect_line(&mut waiter, "granted ");
    let granted: u128 = line["granted ".len()..].parse().unwrap();
    let latency = Duration::from_nanos((granted - released) as u64);
    eprintln!("handoff to a blocked process: {latency:?}");
    assert!(
        latency < Duration::from_millis(500),
        "handoff took {latency:?}: is something polling?"
    );
    assert!(waiter.wait().unwrap().success());
}

fn waiters_of(dir: &Path, name: &str) -> usize {
    let l = FileLocker::new(dir).unwrap();
    l.status()
        .unwrap()
        .into_iter()
        .find(|s| s.name.as_deref() == Some(name))
        .map_or(0, |s| s.waiters)
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Exclusion inside one process

#[test]
fn threads_sharing_one_locker_exclude_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let value = Arc::new(AtomicUsize::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (l, value, inside) = (l.clone(), value.clone(), inside.clone());
            std::thread::spawn(move || {
                for _ in 0..300 {
                    let g = l.acquire_blocking("t", ex()).unwrap();
                    assert_eq!(
                        inside.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two threads inside"
                    );
                    // A non-atomic read-modify-write: loses updates unless the lock excludes.
                    let v = value.load(Ordering::Relaxed);
                    std::thread::yield_now();
                    value.store(v + 1, Ordering::Relaxed);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(g);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(value.load(Ordering::SeqCst), 8 * 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sharing_one_locker_exclude_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let value = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (l, value) = (l.clone(), value.clone());
            tokio::spawn(async move {
                for _ in 0..50 {
                    let g = l.acquire("tasks", ex()).await.unwrap();
                    let v = value.load(Ordering::Relaxed);
                    tokio::task::yield_now().await;
                    value.store(v + 1, Ordering::Relaxed);
                    g.release().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(value.load(Ordering::SeqCst), 16 * 50);
}

// ---------------------------------------------------------------------------------------------
// Non-blocking, timeouts, cancellation

#[test]
fn non_blocking_reports_would_block() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let _g = l.acquire_blocking("nb", ex()).unwrap();
    let e = l.acquire_blocking("nb", nb(Mode::Exclusive)).unwrap_err();
    assert!(
        matches!(&e, AcquireError::WouldBlock { name } if name == "nb"),
        "{e:?}"
    );
    assert!(e.is_contention());
    let e = l.acquire_blocking("nb", nb(Mode::Shared)).unwrap_err();
    assert!(matches!(e, AcquireError::WouldBlock { .. }));
    // A zero timeout is non-blocking too.
    let e = l
        .acquire_blocking("nb", ex().timeout(Duration::ZERO))
        .unwrap_err();
    assert!(matches!(e, AcquireError::WouldBlock { .. }));
}

#[test]
fn timeouts_are_accurate_and_leave_nothing_held() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let g = l.acquire_blocking("to", ex()).unwrap();
    for timeout in [Duration::from_millis(50), Duration::from_millis(300)] {
        let start = Instant::now();
        let e = l.acquire_blocking("to", ex().timeout(timeout)).unwrap_err();
        let took = start.elapsed();
        let AcquireError::TimedOut { waited, name } = e else {
            panic!("{e:?}")
        };
        assert_eq!(name, "to");
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(1),
            "took {took:?} for {timeout:?}"
        );
        assert!(waited >= timeout, "{waited:?}");
    }
    let e = l
        .acquire_blocking(
            "to",
            ex().deadline(Instant::now() + Duration::from_millis(100)),
        )
        .unwrap_err();
    assert!(matches!(e, AcquireError::TimedOut { .. }));
    drop(g);
    // Nothing left behind by the timed-out waits: another process gets the lock at once.
    let mut holder = child("hold", dir.path(), &[("NAME", "to".into())]);
    expect_line(&mut holder, "locked");
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
}

#[tokio::test]
async fn async_timeouts_are_accurate() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let _g = l.acquire("ato", ex()).await.unwrap();
    let start = Instant::now();
    let e = l
        .acquire("ato", ex().timeout(Duration::from_millis(200)))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(matches!(e, AcquireError::TimedOut { .. }), "{e:?}");
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(1200),
        "{took:?}"
    );
}

/// Cancelling a pending acquisition at the very moment the lock is freed must never leave the
/// lock held: after each cancellation another process must be able to take it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_pending_acquire_never_leaves_the_lock_held() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let checker = locker(dir.path());
    let mut won_race = 0;
    for i in 0..200 {
        let g = l.acquire("cancel", ex()).await.unwrap();
        let l2 = l.clone();
        let pending = tokio::spawn(async move { l2.acquire("cancel", ex()).await.map(drop) });
        // Vary the moment of release relative to the cancellation.
        if i % 2 == 0 {
            tokio::task::yield_now().await;
        }
        let release = tokio::task::spawn_blocking(move || g.release_blocking());
        pending.abort();
        release.await.unwrap().unwrap();
        match pending.await {
            Err(e) if e.is_cancelled() => {}
            Ok(r) => {
                r.unwrap();
                won_race += 1;
            }
            Err(e) => panic!("{e}"),
        }
        let probe = checker.acquire_blocking("cancel", nb(Mode::Exclusive));
        if let Err(e) = probe {
            panic!("iteration {i}: the lock is still held after the cancellation: {e}");
        }
    }
    eprintln!("{won_race} of 200 waiters got the lock before the cancellation");
}

#[tokio::test]
async fn dropping_a_pending_acquire_gives_up_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let g = l.acquire("drop", ex()).await.unwrap();
    let r = tokio::time::timeout(Duration::from_millis(50), l.acquire("drop", ex())).await;
    assert!(
        r.is_err(),
        "the lock is held, the acquisition must still be pending"
    );
    // The cancelled waiter's thread is gone: the kernel reports no waiter on the file.
    assert_eq!(waiters_of(dir.path(), "drop"), 0);
    drop(g);
    drop(l.acquire("drop", nb(Mode::Exclusive)).await.unwrap());
}

#[test]
fn on_wait_is_called_once_with_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = child("hold", dir.path(), &[("NAME", "ow".into())]);
    let line = expect_line(&mut holder, "locked ");
    let holder_pid: u32 = line["locked ".len()..].parse().unwrap();
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let c = calls.clone();
    let opts = ex()
        .timeout(Duration::from_millis(100))
        .on_wait(move |info| {
            c.lock().unwrap().push((
                info.name.to_owned(),
                info.holders
                    .iter()
                    .filter_map(|h| h.pid)
                    .collect::<Vec<_>>(),
            ));
        });
    let l = locker(dir.path());
    assert!(matches!(
        l.acquire_blocking("ow", opts.clone()),
        Err(AcquireError::TimedOut { .. })
    ));
    assert_eq!(
        *calls.lock().unwrap(),
        vec![("ow".to_owned(), vec![holder_pid])]
    );
    drop(holder.stdin.take());
    holder.wait().unwrap();
    // Not called when the lock is free.
    drop(l.acquire_blocking("ow", opts).unwrap());
    assert_eq!(calls.lock().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Handles and with_acquire

#[tokio::test]
async fn handles_release_once() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let h = l.acquire_handle("h", ex()).await.unwrap();
    assert_eq!(h.lock_name, "h");
    let json = serde_json::to_value(&h).unwrap();
    assert_eq!(json["lockName"], "h");
    assert_eq!(json["uuid"].as_str().unwrap().len(), 36);
    assert!(matches!(
        l.acquire("h", nb(Mode::Exclusive)).await,
        Err(AcquireError::WouldBlock { .. })
    ));
    l.release(&h).await.unwrap();
    assert!(matches!(
        l.release(&h).await,
        Err(Error::UnknownHandle { .. })
    ));
    let forged = LockHandle {
        uuid: "nope".into(),
        lock_name: "h".into(),
    };
    assert!(matches!(
        l.release_blocking(&forged),
        Err(Error::UnknownHandle { .. })
    ));
    // A handle released under another name is refused and the lock stays held.
    let h = l.acquire_handle_blocking("h", ex()).unwrap();
    let wrong = LockHandle {
        lock_name: "other".into(),
        ..h.clone()
    };
    assert!(matches!(
        l.release_blocking(&wrong),
        Err(Error::UnknownHandle { .. })
    ));
    assert!(l.acquire_blocking("h", nb(Mode::Exclusive)).is_err());
    l.release_blocking(&h).unwrap();
}

#[tokio::test]
async fn with_acquire_reports_acquired_and_releases() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let r: Result<u32, Error> = with_acquire(&l, "w", ex(), |acquired| async move {
        assert!(acquired);
        Ok(7)
    })
    .await;
    assert_eq!(r.unwrap(), 7);
    let g = l.acquire("w", ex()).await.unwrap();
    let r: Result<bool, Error> =
        with_acquire(&l, "w", nb(Mode::Exclusive), |acquired| async move {
            Ok(acquired)
        })
        .await;
    assert!(!r.unwrap(), "busy and non-blocking: not acquired");
    drop(g);
    let r: Result<(), Error> =
        with_acquire_blocking(&l, "w", ex(), |_| Err(Error::Unsupported("boom")));
    assert!(matches!(r, Err(Error::Unsupported("boom"))));
    let g = l.acquire("w", nb(Mode::Exclusive)).await;
    drop(g.expect("released after the closure failed"));
    let r: Result<(), Error> = with_acquire_blocking(&l, "", ex(), |_| Ok(()));
    assert!(matches!(r, Err(Error::InvalidName(NameError::Empty))));
}

// ---------------------------------------------------------------------------------------------
// Files on disk

#[test]
fn lock_files_are_named_as_go_lockgate_names_them() {
    let dir = tempfile::tempdir().unwrap();
    drop(
        locker(dir.path())
            .acquire_blocking("myresource", ex())
            .unwrap(),
    );
    assert!(dir
        .path()
        .join("e669810984559577fa8f9f60982d59f4058f3c88ecb22ce9d0bf81e5642a99c0")
        .is_file());
    let legacy = Locker::new(FileLocker::with_naming(dir.path(), Naming::LegacyMurmur3).unwrap());
    drop(legacy.acquire_blocking("myresource", ex()).unwrap());
    assert!(dir.path().join("e1166248").is_file());
}

/// A plain flock(1) holder of the Go-compatible file excludes lockgate, and the reverse.
#[test]
fn interoperates_with_a_plain_flock_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir
        .path()
        .join(Naming::Sha256.file_name("shared-with-flock"));
    let mut flock = Command::new("flock")
        .arg("--exclusive")
        .arg(&path)
        .args(["-c", "echo locked; read _ || true"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("flock(1) from util-linux");
    expect_line(&mut flock, "locked");
    let l = locker(dir.path());
    assert!(matches!(
        l.acquire_blocking("shared-with-flock", nb(Mode::Shared)),
        Err(AcquireError::WouldBlock { .. })
    ));
    drop(flock.stdin.take());
    assert!(flock.wait().unwrap().success());
    let g = l
        .acquire_blocking("shared-with-flock", ex().timeout(Duration::from_secs(5)))
        .unwrap();
    let status = Command::new("flock")
        .args(["--nonblock", "--shared"])
        .arg(&path)
        .arg("true")
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "flock(1) must see our exclusive lock"
    );
    drop(g);
    let status = Command::new("flock")
        .args(["--nonblock"])
        .arg(&path)
        .arg("true")
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn lock_files_are_not_inherited_by_children() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let g = l.acquire_blocking("cloexec", ex()).unwrap();
    let out = Command::new("ls")
        .args(["-l", "/proc/self/fd/"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        !listing.contains(dir.path().to_str().unwrap()),
        "a child inherited the lock file:\n{listing}"
    );
    drop(g);
}

#[test]
fn bad_names_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    type Check = fn(&NameError) -> bool;
    let cases: [(&str, Check); 3] = [
        ("", |e| matches!(e, NameError::Empty)),
        ("nul\0byte", |e| {
            matches!(e, NameError::ControlCharacter { ch: '\0', .. })
        }),
        ("esc\x1b[0m", |e| {
            matches!(e, NameError::ControlCharacter { .. })
        }),
    ];
    for (name, check) in cases {
        match l.acquire_blocking(name, ex()) {
            Err(AcquireError::Failed(Error::InvalidName(e))) => assert!(check(&e), "{name:?}: {e}"),
            other => panic!("{name:?}: {other:?}"),
        }
    }
    let long = "x".repeat(lockgate::MAX_NAME_LEN + 1);
    assert!(matches!(
        l.acquire_blocking(&long, ex()),
        Err(AcquireError::Failed(Error::InvalidName(
            NameError::TooLong { .. }
        )))
    ));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no file created for a bad name"
    );
}

#[test]
fn directory_problems_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A missing directory is created, with its parents.
    let nested = dir.path().join("a/b/c");
    FileLocker::new(&nested).unwrap();
    assert!(nested.is_dir());
    // A file where the directory should be.
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    assert!(matches!(
        FileLocker::new(&file),
        Err(Error::NotADirectory { .. })
    ));
    assert!(matches!(
        FileLocker::new(file.join("sub")),
        Err(Error::LockDir { .. })
    ));
    // A directory that cannot be created (even by root).
    assert!(matches!(
        FileLocker::new("/proc/lockgate-cannot-exist"),
        Err(Error::LockDir { .. })
    ));
    // A directory where lock files cannot be created (even by root).
    let l = Locker::new(FileLocker::new("/proc/self").unwrap());
    let e = l.acquire_blocking("x", ex()).unwrap_err();
    assert!(
        matches!(e, AcquireError::Failed(Error::LockFile { op: "open", .. })),
        "{e:?}"
    );
    // The directory removed after the locker was made.
    let gone = dir.path().join("gone");
    let l = locker(&gone);
    std::fs::remove_dir(&gone).unwrap();
    let e = l.acquire_blocking("x", ex()).unwrap_err();
    assert!(
        matches!(e, AcquireError::Failed(Error::LockDir { .. })),
        "{e:?}"
    );
    // The message names the path.
    assert!(e.to_string().contains("gone"), "{e}");
}

#[test]
fn odd_things_at_the_lock_path_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fl = FileLocker::new(dir.path()).unwrap();
    let l = Locker::new(fl.clone());
    let path_of = |n: &str| fl.lock_path(&lockgate::LockName::new(n).unwrap());

    let target = dir.path().join("target");
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, path_of("link")).unwrap();
    let e = l.acquire_blocking("link", ex()).unwrap_err();
    assert!(
        matches!(e, AcquireError::Failed(Error::SymlinkAtLockPath { .. })),
        "{e:?}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");

    let fifo = std::ffi::CString::new(path_of("fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let e = l.acquire_blocking("fifo", ex()).unwrap_err();
    assert!(
        matches!(e, AcquireError::Failed(Error::NotARegularFile { .. })),
        "{e:?}"
    );

    std::fs::create_dir(path_of("dir")).unwrap();
    let e = l.acquire_blocking("dir", ex()).unwrap_err();
    assert!(
        matches!(e, AcquireError::Failed(Error::NotARegularFile { .. })),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Status and garbage collection

#[test]
fn status_shows_names_states_and_holders() {
    let dir = tempfile::tempdir().unwrap();
    let fl = FileLocker::new(dir.path()).unwrap();
    let l = Locker::new(fl.clone());
    let _x = l.acquire_blocking("ex", ex()).unwrap();
    let _s1 = l.acquire_blocking("sh", AcquireOptions::shared()).unwrap();
    let _s2 = l.acquire_blocking("sh", AcquireOptions::shared()).unwrap();
    drop(l.acquire_blocking("free", ex()).unwrap());
    let status = fl.status().unwrap();
    let find = |n: &str| {
        status
            .iter()
            .find(|s| s.name.as_deref() == Some(n))
            .unwrap()
    };
    let me = std::process::id();
    assert_eq!(find("ex").state, lockgate::file::LockState::Exclusive);
    assert_eq!(
        find("ex").holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
        vec![Some(me)]
    );
    assert_eq!(find("sh").state, lockgate::file::LockState::Shared);
    assert_eq!(
        find("sh").holders.len(),
        2,
        "{:?}\n{}",
        find("sh"),
        std::fs::read_to_string("/proc/locks").unwrap()
    );
    assert_eq!(find("free").state, lockgate::file::LockState::Free);
    // A file created by someone else (Go lockgate leaves them empty) shows without a name.
    std::fs::write(dir.path().join(Naming::Sha256.file_name("go-made")), "").unwrap();
    let status = fl.status().unwrap();
    assert_eq!(status.len(), 4);
    assert_eq!(status.iter().filter(|s| s.name.is_none()).count(), 1);
}

#[test]
fn gc_removes_only_old_unused_lock_files() {
    let dir = tempfile::tempdir().unwrap();
    let fl = FileLocker::new(dir.path()).unwrap();
    let l = Locker::new(fl.clone());
    let held = l.acquire_blocking("held", ex()).unwrap();
    drop(l.acquire_blocking("stale", ex()).unwrap());
    std::fs::write(dir.path().join("not-a-lock-file"), "").unwrap();
    let report = fl.gc(Duration::from_secs(3600)).unwrap();
    assert_eq!((report.removed, report.too_new), (0, 2));
    let report = fl.gc(Duration::ZERO).unwrap();
    assert_eq!((report.removed, report.in_use, report.failed), (1, 1, 0));
    assert!(dir.path().join("not-a-lock-file").exists());
    assert!(fl.lock_path(&"held".try_into().unwrap()).exists());
    assert!(!fl.lock_path(&"stale".try_into().unwrap()).exists());
    drop(held);
}

/// Acquisitions racing a collector that deletes lock files as fast as it can still exclude each
/// other: an acquisition that locked a file just unlinked notices and starts over.
#[test]
fn gc_racing_acquisitions_never_breaks_exclusion() {
    let dir = tempfile::tempdir().unwrap();
    let fl = FileLocker::new(dir.path()).unwrap();
    let l = Locker::new(fl.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (fl, stop) = (fl.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut removed = 0;
            while !stop.load(Ordering::Relaxed) {
                removed += fl.gc(Duration::ZERO).unwrap().removed;
            }
            removed
        })
    };
    let value = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (l, value) = (l.clone(), value.clone());
            std::thread::spawn(move || {
                for _ in 0..500 {
                    let g = l.acquire_blocking("gc-race", ex()).unwrap();
                    let v = value.load(Ordering::Relaxed);
                    std::thread::yield_now();
                    value.store(v + 1, Ordering::Relaxed);
                    drop(g);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let removed = gc.join().unwrap();
    eprintln!("the collector removed the lock file {removed} times");
    assert_eq!(value.load(Ordering::SeqCst), 4 * 500);
    assert!(removed > 0, "the collector never ran between acquisitions");
}
