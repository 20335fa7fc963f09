//! Fairness of the file locker: an exclusive request that waits is not overtaken by lockgate's
//! shared requests (threads and processes, blocking and async); what waits behind it, and what
//! others see meanwhile. Real flock(2) on real files, real processes. What a waiting exclusive
//! request leaves behind, and the collection of turnstiles: `file_turnstile.rs`.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockgate::file::LockState;
use lockgate::{AcquireError, FileLocker, Locker};

mod support;
use support::{wait_until, Proc, PATIENCE};
#[path = "support/fair.rs"]
mod fair;
use fair::{
    acquire_by, child, ex, holders, lock_path, locker, marked, my_waits, sh, turnstile_free,
    turnstile_path,
};

#[test]
fn child_entry() {
    fair::child_entry();
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
    assert!(
        !marked(dir.path(), "order"),
        "the shared request that came after the exclusive one cleared the mark"
    );
    assert!(turnstile_free(dir.path(), "order"));
}
