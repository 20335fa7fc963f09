//! What a waiting exclusive request leaves behind when it gives up or dies (nothing that blocks
//! anybody), and the collection of turnstiles. Real flock(2) on real files, real processes.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use lockgate::{AcquireError, FileLocker, Locker};

mod support;
use support::{wait_until, PATIENCE};
#[path = "support/fair.rs"]
mod fair;
use fair::{
    child, child_as_nobody, ex, lock_path, locker, marked, my_waits, sh, turnstile_free,
    turnstile_path,
};

#[test]
fn child_entry() {
    fair::child_entry();
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
    // An exclusive request that got the lock leaves the mark: the next shared request joins
    // and clears it.
    assert!(marked(dir.path(), "gives-up"));
    drop(
        l.acquire_blocking("gives-up", sh().non_blocking())
            .expect("a shared request joins after the exclusive one"),
    );
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

// ---------------------------------------------------------------------------------------------
// Without permission

/// Only a lock file's owner may mark it. An exclusive request of another user waits without the
/// mark, as flock(2) alone would have it: shared requests still join, nothing blocks, and it
/// gets the lock once they leave. A stale mark that a shared request may not clear costs it a
/// look at the turnstile, never a wait. (Needs root, to act as `nobody`.)
#[test]
fn without_permission_to_mark_requests_fall_back_to_plain_flock() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a child as nobody");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let l = locker(dir.path());
    let held = l.acquire_blocking("perm", sh()).unwrap(); // root's lock file, mode 0644
    let mut waiter = child_as_nobody("wait-exclusive", dir.path(), &[("NAME", "perm".into())]);
    let path = lock_path(dir.path(), "perm");
    let pid = i64::from(waiter.id());
    wait_until("nobody's exclusive request waiting", PATIENCE, || {
        support::proc_locks_of(&path).contains(&(true, pid))
    });
    assert!(
        !marked(dir.path(), "perm"),
        "nobody may not mark root's file"
    );
    let joined = l
        .acquire_blocking("perm", sh().non_blocking())
        .expect("without the mark, a shared request joins as flock(2) has it");
    drop((held, joined));
    waiter.expect("granted");
    assert!(waiter.wait().success());
    // A stale mark nobody may clear.
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o1000)).unwrap();
    let mut reader = child_as_nobody("share-now", dir.path(), &[("NAME", "perm".into())]);
    reader.expect("joined");
    assert!(reader.wait().success());
    assert!(
        marked(dir.path(), "perm"),
        "nobody cannot clear root's mark"
    );
    assert!(turnstile_free(dir.path(), "perm"));
}
