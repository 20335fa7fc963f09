//! Fairness of the file locker: an exclusive request that waits is not overtaken by lockgate's
//! shared requests (threads and processes, blocking and async), and whatever it holds while it
//! waits (the turnstile, the mark on the lock file) never outlives its wait. Real flock(2) on
//! real files, real processes.
//!
//! Child processes are this test binary re-run with `LOCKGATE_TEST_CHILD` set: the test
//! `child_entry` then plays the role the environment describes and exits.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockgate::file::{LockState, Naming};
use lockgate::{AcquireError, AcquireOptions, FileLocker, Locker};

mod support;
use support::{wait_until, Proc, PATIENCE};

fn locker(dir: &Path) -> Locker {
    Locker::new(FileLocker::new(dir).unwrap())
}

fn ex() -> AcquireOptions {
    AcquireOptions::exclusive()
}

fn sh() -> AcquireOptions {
    AcquireOptions::shared()
}

fn lock_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(Naming::Sha256.file_name(name))
}

fn turnstile_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{}.turnstile", Naming::Sha256.file_name(name)))
}

/// Whether the lock file carries the mark of a waiting exclusive request (the sticky bit).
fn marked(dir: &Path, name: &str) -> bool {
    let mode = std::fs::metadata(lock_path(dir, name))
        .unwrap()
        .permissions()
        .mode();
    mode & 0o1000 != 0
}

/// True when nobody holds the turnstile of `name` (or it does not exist).
fn turnstile_free(dir: &Path, name: &str) -> bool {
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
fn my_waits(path: &Path) -> usize {
    let me = i64::from(std::process::id());
    support::proc_locks_of(path)
        .iter()
        .filter(|&&(waiting, pid)| waiting && pid == me)
        .count()
}

/// How many hold the lock file at `path`.
fn holders(path: &Path) -> usize {
    support::proc_locks_of(path)
        .iter()
        .filter(|(waiting, _)| !waiting)
        .count()
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// Spawns this test binary as a child playing `role` on the locks in `dir`.
fn child(role: &str, dir: &Path, extra: &[(&str, String)]) -> Proc {
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
    .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Proc::spawn_with(&mut cmd, true, true, false)
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_default()
}

/// Acquires `name` with `opts` the way `how` says: `blocking` (no deadline), `timed` (the
/// blocking API with a deadline) or `async`.
fn acquire_by(locker: &Locker, how: &str, name: &str, opts: AcquireOptions) -> lockgate::LockGuard {
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

#[test]
fn child_entry() {
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
        other => panic!("unknown child role {other}"),
    }
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------------
// No starvation

/// How long an exclusive request waited behind looping shared holders: from its on-wait hook
/// (it found the lock busy) to its grant, by `how`. Panics when it waited 30 s (a request
/// without a deadline would otherwise wait as long as it is starved).
fn exclusive_wait(locker: &Locker, how: &'static str, name: &'static str) -> Duration {
    let (tx, rx) = std::sync::mpsc::channel();
    let locker = locker.clone();
    std::thread::spawn(move || {
        let began: Arc<Mutex<Option<Instant>>> = Arc::default();
        let b = began.clone();
        let opts = ex().on_wait(move |_| *b.lock().unwrap() = Some(Instant::now()));
        let g = acquire_by(&locker, how, name, opts);
        let granted = Instant::now();
        drop(g);
        let began = began
            .lock()
            .unwrap()
            .expect("the exclusive request found the lock busy");
        let _ = tx.send(granted - began);
    });
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{how}: the exclusive request was not granted in 30 s: {e}"))
}

/// Issue 23, through the library: six processes loop shared acquisitions (each holding for
/// 400 ms, the three waiting paths among them), so the lock is never free. An exclusive request
/// of each waiting path (async, blocking, with a deadline) gets the lock within about one
/// shared hold after it starts waiting. Before the turnstile, flock(2) let new shared holders
/// in while it waited, and it waited until a gap happened to open (seconds, or never).
#[test]
fn looping_shared_processes_do_not_starve_an_exclusive_request() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Duration::from_millis(400);
    let mut readers: Vec<Proc> = ["blocking", "timed", "async"]
        .iter()
        .cycle()
        .take(6)
        .map(|how| {
            child(
                "share-loop",
                dir.path(),
                &[
                    ("NAME", "starve".into()),
                    ("HOW", how.to_string()),
                    ("HOLD_MS", hold.as_millis().to_string()),
                ],
            )
        })
        .collect();
    for r in &mut readers {
        r.expect("looping");
    }
    let l = locker(dir.path());
    let path = lock_path(dir.path(), "starve");
    let bound = hold * 6; // one hold, and plenty for a loaded machine
    let mut waits = Vec::new();
    for how in ["async", "blocking", "timed", "async"] {
        wait_until("two shared holders at once", PATIENCE, || {
            holders(&path) >= 2
        });
        let waited = exclusive_wait(&l, how, "starve");
        eprintln!(
            "{how}: the exclusive request waited {waited:?} behind 6 looping shared processes"
        );
        waits.push((how, waited));
    }
    assert!(
        waits.iter().all(|(_, w)| *w < bound),
        "exclusive requests waited {waits:?} behind shared holders that each hold {hold:?} \
         (bound {bound:?})"
    );
}

/// The same among threads of one process, sharing one locker: threads are lockgate requests as
/// much as processes are.
#[test]
fn looping_shared_threads_do_not_starve_an_exclusive_request() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let hold = Duration::from_millis(300);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..6)
        .map(|i| {
            let (l, stop) = (l.clone(), stop.clone());
            std::thread::spawn(move || {
                let how = ["blocking", "timed"][i % 2];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let g = acquire_by(&l, how, "threads", sh());
                    std::thread::sleep(hold);
                    drop(g);
                }
            })
        })
        .collect();
    let path = lock_path(dir.path(), "threads");
    let bound = hold * 6;
    let mut waits = Vec::new();
    for how in ["blocking", "timed", "async"] {
        wait_until("two shared holders at once", PATIENCE, || {
            holders(&path) >= 2
        });
        waits.push((how, exclusive_wait(&l, how, "threads")));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    eprintln!("exclusive waits behind 6 looping shared threads: {waits:?}");
    assert!(
        waits.iter().all(|(_, w)| *w < bound),
        "exclusive requests waited {waits:?} (bound {bound:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// The order, and what others see

/// While an exclusive request waits behind a shared holder: a non-blocking shared request is
/// refused, a timed one times out, a waiting one is counted by `status` and gets the lock only
/// after the exclusive request; flock(1) takes no part (its shared lock still joins). The
/// turnstile is never shown as a lock.
#[test]
fn shared_requests_wait_behind_a_waiting_exclusive_request() {
    let dir = tempfile::tempdir().unwrap();
    let fl = FileLocker::new(dir.path()).unwrap();
    let l = Locker::new(fl.clone());
    let path = lock_path(dir.path(), "order");
    let mut holder = child("hold-shared", dir.path(), &[("NAME", "order".into())]);
    holder.expect("locked");
    // Nobody waits: shared requests join at once.
    drop(l.acquire_blocking("order", sh().non_blocking()).unwrap());

    let order: Arc<Mutex<Vec<&str>>> = Arc::default();
    let writer = {
        let (l, order) = (l.clone(), order.clone());
        std::thread::spawn(move || {
            let g = l.acquire_blocking("order", ex()).unwrap();
            order.lock().unwrap().push("exclusive");
            std::thread::sleep(Duration::from_millis(200));
            order.lock().unwrap().push("exclusive released");
            drop(g);
        })
    };
    wait_until(
        "the exclusive request waiting in flock(2)",
        PATIENCE,
        || my_waits(&path) == 1,
    );
    assert!(marked(dir.path(), "order"));
    assert!(matches!(
        l.acquire_blocking("order", sh().non_blocking()),
        Err(AcquireError::WouldBlock { .. })
    ));
    let started = Instant::now();
    assert!(matches!(
        l.acquire_blocking("order", sh().timeout(Duration::from_millis(200))),
        Err(AcquireError::TimedOut { .. })
    ));
    assert!(started.elapsed() >= Duration::from_millis(200));
    let reader = {
        let (l, order) = (l.clone(), order.clone());
        std::thread::spawn(move || {
            let g = l.acquire_blocking("order", sh()).unwrap();
            order.lock().unwrap().push("shared");
            drop(g);
        })
    };
    let turnstile = turnstile_path(dir.path(), "order");
    wait_until(
        "the shared request waiting at the turnstile",
        PATIENCE,
        || my_waits(&turnstile) == 1,
    );
    let status = fl.status().unwrap();
    assert_eq!(status.len(), 1, "the turnstile is no lock: {status:?}");
    assert_eq!(status[0].name.as_deref(), Some("order"));
    assert_eq!(status[0].state, LockState::Shared);
    assert_eq!(status[0].holders.len(), 1);
    assert_eq!(
        status[0].waiters, 2,
        "one at the lock, one at the turnstile"
    );
    // A peer is not part of the turnstile: flock(1)'s shared lock joins as it always did.
    let peer = Command::new("flock")
        .args(["--shared", "--nonblock"])
        .arg(&path)
        .arg("true")
        .status()
        .unwrap();
    assert!(peer.success(), "flock(1) --shared was kept out");

    assert!(holder.finish().success());
    writer.join().unwrap();
    reader.join().unwrap();
    assert_eq!(
        *order.lock().unwrap(),
        ["exclusive", "exclusive released", "shared"]
    );
    assert!(!marked(dir.path(), "order"), "the mark outlived the wait");
    assert!(turnstile_free(dir.path(), "order"));
}

// ---------------------------------------------------------------------------------------------
// Nothing left behind

/// An exclusive request that gives up (a timeout on each waiting path, a dropped future) clears
/// the mark and lets go of the turnstile: shared requests join at once afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_request_that_gives_up_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let path = lock_path(dir.path(), "gives-up");
    let held = l.acquire("gives-up", sh()).await.unwrap();
    let check = |what: &str| {
        assert!(!marked(dir.path(), "gives-up"), "{what}: the mark stayed");
        assert!(
            turnstile_free(dir.path(), "gives-up"),
            "{what}: the turnstile stayed held"
        );
        assert_eq!(my_waits(&path), 0, "{what}: a wait stayed");
        let joined = l.acquire_blocking("gives-up", sh().non_blocking());
        assert!(
            joined.is_ok(),
            "{what}: a shared request was kept out: {joined:?}"
        );
    };
    let timeout = Duration::from_millis(150);
    let e = l
        .acquire_blocking("gives-up", ex().timeout(timeout))
        .unwrap_err();
    assert!(matches!(e, AcquireError::TimedOut { .. }), "{e:?}");
    check("a blocking timeout");
    let e = l
        .acquire("gives-up", ex().timeout(timeout))
        .await
        .unwrap_err();
    assert!(matches!(e, AcquireError::TimedOut { .. }), "{e:?}");
    check("an async timeout");
    let pending = {
        let l = l.clone();
        tokio::spawn(async move { l.acquire("gives-up", ex()).await.map(drop) })
    };
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("the async exclusive request waiting", PATIENCE, || {
            my_waits(&p) == 1
        })
    })
    .await
    .unwrap();
    assert!(marked(dir.path(), "gives-up"));
    pending.abort();
    assert!(pending.await.unwrap_err().is_cancelled());
    check("a dropped future");
    // A shared request that gave way and then gave up leaves nothing either.
    let writer = {
        let l = l.clone();
        tokio::spawn(async move { l.acquire("gives-up", ex()).await.map(drop) })
    };
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("the exclusive request waiting", PATIENCE, || {
            my_waits(&p) == 1
        })
    })
    .await
    .unwrap();
    let e = l
        .acquire("gives-up", sh().timeout(timeout))
        .await
        .unwrap_err();
    assert!(matches!(e, AcquireError::TimedOut { .. }), "{e:?}");
    drop(held);
    writer.await.unwrap().unwrap();
    check("after the exclusive request got through");
}

/// A process killed while it waits exclusively leaves its mark on the lock file, and nothing
/// that blocks: the next shared request finds the turnstile free, clears the mark and keeps its
/// lock.
#[test]
fn a_killed_exclusive_waiter_leaves_nothing_that_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let held = l.acquire_blocking("killed", sh()).unwrap();
    let mut waiter = child("wait-exclusive", dir.path(), &[("NAME", "killed".into())]);
    let path = lock_path(dir.path(), "killed");
    let pid = i64::from(waiter.id());
    wait_until(
        "the exclusive process waiting in flock(2)",
        PATIENCE,
        || support::proc_locks_of(&path).contains(&(true, pid)),
    );
    assert!(marked(dir.path(), "killed"));
    assert!(matches!(
        l.acquire_blocking("killed", sh().non_blocking()),
        Err(AcquireError::WouldBlock { .. })
    ));
    waiter.kill();
    assert!(
        marked(dir.path(), "killed"),
        "the mark of a killed waiter stays"
    );
    let joined = l
        .acquire_blocking("killed", sh().non_blocking())
        .expect("a shared request joins once the exclusive waiter is gone");
    assert!(!marked(dir.path(), "killed"), "the stale mark was cleared");
    drop((held, joined));
    drop(l.acquire_blocking("killed", ex().non_blocking()).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Collection

/// `gc` collects turnstiles by the rules of lock files: never while an exclusive request waits
/// at one, and a turnstile whose lock file is gone too. Other files stay.
#[test]
fn gc_collects_turnstiles_only_when_free() {
    let dir = tempfile::tempdir().unwrap();
    let fl = FileLocker::new(dir.path()).unwrap();
    let l = Locker::new(fl.clone());
    let held = l.acquire_blocking("busy", sh()).unwrap();
    let writer = {
        let l = l.clone();
        std::thread::spawn(move || drop(l.acquire_blocking("busy", ex()).unwrap()))
    };
    let path = lock_path(dir.path(), "busy");
    wait_until("the exclusive request waiting", PATIENCE, || {
        my_waits(&path) == 1
    });
    let turnstile = turnstile_path(dir.path(), "busy");
    // An orphan: a turnstile without its lock file. And a file that only looks like one.
    let orphan = turnstile_path(dir.path(), "gone");
    std::fs::write(&orphan, "").unwrap();
    let stranger = dir.path().join("notes.turnstile");
    std::fs::write(&stranger, "").unwrap();
    let report = fl.gc(Duration::ZERO).unwrap();
    assert_eq!(
        (
            report.removed,
            report.in_use,
            report.turnstiles,
            report.failed
        ),
        (0, 1, 1, 0),
        "{report:?}"
    );
    assert!(turnstile.exists(), "a held turnstile was collected");
    assert!(!orphan.exists() && stranger.exists());
    let report = fl.gc(Duration::from_secs(3600)).unwrap();
    assert_eq!((report.removed, report.turnstiles), (0, 0), "too new");
    drop(held);
    writer.join().unwrap();
    let report = fl.gc(Duration::ZERO).unwrap();
    assert_eq!((report.removed, report.turnstiles), (1, 1), "{report:?}");
    assert!(!turnstile.exists() && !path.exists() && stranger.exists());
}
