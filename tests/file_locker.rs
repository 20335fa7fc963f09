//! The file locker, tested with real flock(2) on real files, across threads and processes.
//!
//! Child processes are this test binary re-run with `LOCKGATE_TEST_CHILD` set: the test
//! `child_entry` then plays the role the environment describes and exits.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockgate::file::Naming;

mod support;
use lockgate::{
    with_acquire, with_acquire_blocking, AcquireError, AcquireOptions, Error, FileLocker,
    LockHandle, Locker, Mode, NameError,
};
use support::Proc;

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
        // HOW: `blocking` (no deadline), `timed` (a deadline: the waiter thread), `async`.
        "wait" => {
            writeln!(stdout, "waiting").unwrap();
            stdout.flush().unwrap();
            let name = env("NAME");
            let g = match env("HOW").as_str() {
                "blocking" => locker.acquire_blocking(&name, ex()).unwrap(),
                "timed" => locker
                    .acquire_blocking(&name, ex().timeout(Duration::from_secs(600)))
                    .unwrap(),
                "async" => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(locker.acquire(&name, ex()))
                    .unwrap(),
                other => panic!("unknown waiting path {other}"),
            };
            let t = support::monotonic_ns();
            writeln!(stdout, "granted {t}").unwrap();
            drop(g);
        }
        // Take COUNT exclusive locks named PREFIX0, PREFIX1, ..., say so, hold them until stdin
        // closes.
        "hold-many" => {
            let count: usize = env("COUNT").parse().unwrap();
            let guards: Vec<_> = (0..count)
                .map(|i| {
                    locker
                        .acquire_blocking(&format!("{}{i}", env("PREFIX")), nb(Mode::Exclusive))
                        .unwrap()
                })
                .collect();
            writeln!(stdout, "locked {}", std::process::id()).unwrap();
            stdout.flush().unwrap();
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            drop(guards);
        }
        // Lock and unlock 64 locks of its own as fast as it can, forever: the lock list of the
        // host keeps changing. The parent kills it.
        "churn" => {
            writeln!(stdout, "churning").unwrap();
            stdout.flush().unwrap();
            loop {
                for i in 0..64 {
                    if let Ok(g) =
                        locker.acquire_blocking(&format!("churn-{i}"), nb(Mode::Exclusive))
                    {
                        drop(g);
                    }
                }
            }
        }
        other => panic!("unknown child role {other}"),
    }
    std::process::exit(0);
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
    let mut children: Vec<Proc> = (0..procs)
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
        let line = c.expect("overlaps ");
        overlaps += line["overlaps ".len()..].parse::<usize>().unwrap();
        assert!(c.wait().success());
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
    reader.expect("locked");
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
    assert!(reader.finish().success());
    drop(
        l.acquire_blocking("r", nb(Mode::Exclusive))
            .expect("free after the reader left"),
    );
}

#[test]
fn a_killed_holders_lock_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = child("hold", dir.path(), &[("NAME", "k".into())]);
    holder.expect("locked");
    let l = locker(dir.path());
    assert!(matches!(
        l.acquire_blocking("k", nb(Mode::Exclusive)),
        Err(AcquireError::WouldBlock { .. })
    ));
    holder.kill();
    let g = l
        .acquire_blocking("k", ex().timeout(Duration::from_secs(10)))
        .expect("the kernel frees a dead process's lock");
    drop(g);
}

/// A process blocked in each waiting path gets the lock within milliseconds of its release: far
/// under the 500 ms poll of Go lockgate, so a poller fails this. The waiter is first seen
/// blocked in the kernel (its `->` line in /proc/locks).
#[test]
fn a_blocked_process_is_woken_on_release() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let path = lock_path(dir.path(), "handoff");
    for how in ["blocking", "timed", "async"] {
        let mut latencies = Vec::new();
        for _ in 0..5 {
            let g = l.acquire_blocking("handoff", ex()).unwrap();
            let mut waiter = child(
                "wait",
                dir.path(),
                &[("NAME", "handoff".into()), ("HOW", how.into())],
            );
            waiter.expect("waiting");
            let pid = i64::from(waiter.id());
            support::wait_until(
                &format!("the {how} waiter blocked in flock(2)"),
                support::PATIENCE,
                || support::proc_locks_of(&path).contains(&(true, pid)),
            );
            let released = support::monotonic_ns();
            g.release_blocking().unwrap();
            let line = waiter.expect("granted ");
            let granted: u64 = line["granted ".len()..].parse().unwrap();
            latencies.push(support::elapsed_between(
                released,
                granted,
                "release -> grant",
            ));
            assert!(waiter.wait().success());
        }
        latencies.sort();
        eprintln!("{how} handoff to a blocked process: {latencies:?}");
        // The median: one sample may land on a descheduled waiter on a loaded machine.
        assert!(
            latencies[2] < Duration::from_millis(100),
            "{how} handoff took {latencies:?}: is something polling?"
        );
    }
}

fn lock_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(Naming::Sha256.file_name(name))
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
    holder.expect("locked");
    assert!(holder.finish().success());
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

/// This process's `->` lines (it waits in flock(2)) for the lock file of `name`.
fn my_waits(dir: &Path, name: &str) -> usize {
    let me = i64::from(std::process::id());
    support::proc_locks_of(&lock_path(dir, name))
        .iter()
        .filter(|&&(waiting, pid)| waiting && pid == me)
        .count()
}

/// Waits until this process waits in flock(2) for `name`.
fn until_i_wait(dir: &Path, name: &str) {
    support::wait_until(
        &format!("this process waiting for {name:?} in flock(2)"),
        support::PATIENCE,
        || my_waits(dir, name) == 1,
    );
}

/// Blocking waits with a deadline are interrupted by a timer signal on the waiting thread; a
/// signal that lands just before the thread enters flock(2) must not leave it blocked. Many
/// short timeouts, also from a thread that blocks every signal, all end on time.
#[test]
fn short_timeouts_always_end() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let _g = l.acquire_blocking("short", ex()).unwrap();
    let run = |l: Locker| {
        for i in 0..300u64 {
            let timeout = Duration::from_micros(i * 37 % 3000);
            let start = Instant::now();
            let e = l
                .acquire_blocking("short", ex().timeout(timeout))
                .unwrap_err();
            assert!(e.is_contention(), "{e:?}");
            let took = start.elapsed();
            assert!(
                took < timeout + Duration::from_secs(1),
                "{took:?} for {timeout:?}"
            );
        }
    };
    let l2 = l.clone();
    let blocked = std::thread::spawn(move || {
        // SAFETY: blocking every signal on this thread only.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        }
        run(l2);
    });
    run(l);
    blocked.join().unwrap();
}

/// A timed acquisition first waits in the kernel, then gives up at its deadline and leaves: no
/// waiter is left behind, and the lock is free for others at once.
#[test]
fn a_timed_out_waiter_was_waiting_and_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let g = l.acquire_blocking("tl", ex()).unwrap();
    let waiting = {
        let l = l.clone();
        std::thread::spawn(move || l.acquire_blocking("tl", ex().timeout(Duration::from_secs(3))))
    };
    until_i_wait(dir.path(), "tl");
    let e = waiting.join().unwrap().unwrap_err();
    assert!(matches!(e, AcquireError::TimedOut { .. }), "{e:?}");
    assert_eq!(
        my_waits(dir.path(), "tl"),
        0,
        "the timed-out waiter is still waiting"
    );
    drop(g);
    let mut holder = child("hold", dir.path(), &[("NAME", "tl".into())]);
    holder.expect("locked");
    assert!(holder.finish().success());
}

/// Cancelling a pending acquisition at the very moment the lock is freed must never leave the
/// lock held: after each cancellation another locker must be able to take it at once. Each
/// round first sees the waiter blocked in the kernel; the test counts how often the kernel
/// granted the lock to a waiter that was being cancelled (the window this test is about) and
/// fails if that never happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_pending_acquire_never_leaves_the_lock_held() {
    let counter = cancelled_grants();
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let checker = locker(dir.path());
    let rounds = 200;
    let (mut won, mut cancelled) = (0, 0);
    let closed_before = counter.load(Ordering::SeqCst);
    for i in 0..rounds {
        let g = l.acquire("cancel", ex()).await.unwrap();
        let l2 = l.clone();
        let pending = tokio::spawn(async move { l2.acquire("cancel", ex()).await.map(drop) });
        let d = dir.path().to_owned();
        tokio::task::spawn_blocking(move || until_i_wait(&d, "cancel"))
            .await
            .unwrap();
        // Vary which comes first: the release or the cancellation.
        match i % 3 {
            0 => {
                g.release_blocking().unwrap();
                pending.abort();
            }
            1 => {
                pending.abort();
                g.release_blocking().unwrap();
            }
            _ => {
                let release = tokio::task::spawn_blocking(move || g.release_blocking());
                pending.abort();
                release.await.unwrap().unwrap();
            }
        }
        match pending.await {
            Err(e) if e.is_cancelled() => cancelled += 1,
            Ok(r) => {
                r.unwrap();
                won += 1;
            }
            Err(e) => panic!("{e}"),
        }
        if let Err(e) = checker.acquire_blocking("cancel", nb(Mode::Exclusive)) {
            panic!("round {i}: the lock is still held after the cancellation: {e}");
        }
        assert_eq!(
            my_waits(dir.path(), "cancel"),
            0,
            "round {i}: a waiter was left"
        );
    }
    let closed = counter.load(Ordering::SeqCst) - closed_before;
    eprintln!(
        "{rounds} rounds: {won} waiters got the lock before the cancellation, {cancelled} were \
         cancelled, of which {closed} had been granted the lock at that moment (closed at once)"
    );
    assert!(
        closed > 0,
        "no cancellation hit the moment of a grant: the test did not exercise the race"
    );
}

/// Counts the library's "closed a lock granted at the moment of cancellation" events, from
/// every thread of this test binary.
fn cancelled_grants() -> &'static AtomicUsize {
    use tracing::{field, span, Event, Metadata, Subscriber};
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static INSTALL: std::sync::Once = std::sync::Once::new();
    struct Counter;
    struct Message(bool);
    impl field::Visit for Message {
        fn record_debug(&mut self, f: &field::Field, value: &dyn std::fmt::Debug) {
            if f.name() == "message" {
                self.0 |= format!("{value:?}").contains("granted at the moment of cancellation");
            }
        }
    }
    impl Subscriber for Counter {
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            m.target().starts_with("lockgate")
        }
        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, e: &Event<'_>) {
            let mut m = Message(false);
            e.record(&mut m);
            if m.0 {
                COUNT.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn enter(&self, _: &span::Id) {}
        fn exit(&self, _: &span::Id) {}
    }
    INSTALL.call_once(|| tracing::subscriber::set_global_default(Counter).unwrap());
    &COUNT
}

/// Dropping a pending acquisition that is waiting in the kernel takes it out of the wait.
#[tokio::test]
async fn dropping_a_pending_acquire_gives_up_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let l = locker(dir.path());
    let g = l.acquire("drop", ex()).await.unwrap();
    let l2 = l.clone();
    let pending = tokio::spawn(async move { l2.acquire("drop", ex()).await.map(drop) });
    let d = dir.path().to_owned();
    tokio::task::spawn_blocking(move || until_i_wait(&d, "drop"))
        .await
        .unwrap();
    pending.abort();
    assert!(pending.await.unwrap_err().is_cancelled());
    // The cancelled waiter's thread is gone: the kernel reports no waiter on the file.
    assert_eq!(my_waits(dir.path(), "drop"), 0);
    drop(g);
    drop(l.acquire("drop", nb(Mode::Exclusive)).await.unwrap());
}

#[test]
fn on_wait_is_called_once_with_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = child("hold", dir.path(), &[("NAME", "ow".into())]);
    let line = holder.expect("locked ");
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
    holder.finish();
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
    let mut flock = Proc::spawn_with(
        Command::new("flock")
            .arg("--exclusive")
            .arg(&path)
            .args(["-c", "echo locked; read _ || true"]),
        true,
        true,
        false,
    );
    flock.expect("locked");
    let l = locker(dir.path());
    assert!(matches!(
        l.acquire_blocking("shared-with-flock", nb(Mode::Shared)),
        Err(AcquireError::WouldBlock { .. })
    ));
    assert!(flock.finish().success());
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
    // A directory where lock files cannot be created (even by root): the directory is the
    // problem, not the lock file.
    let l = Locker::new(FileLocker::new("/proc/self").unwrap());
    let e = l.acquire_blocking("x", ex()).unwrap_err();
    assert!(
        matches!(&e, AcquireError::Failed(Error::LockDir { path, .. }) if path == Path::new("/proc/self")),
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

/// `status` on a busy host: 1000 locks held by four processes while two others lock and unlock
/// as fast as they can. `/proc/locks` comes one page (about 70 entries) per `read(2)`, and
/// entries shift between pages as other locks come and go; every held lock must still be shown,
/// once, with its holder.
#[test]
fn status_shows_every_lock_on_a_busy_host() {
    let dir = tempfile::tempdir().unwrap();
    let churn_dir = tempfile::tempdir().unwrap();
    let (procs, per_proc) = (4, 250);
    let mut holders: Vec<support::Proc> = (0..procs)
        .map(|i| {
            child(
                "hold-many",
                dir.path(),
                &[
                    ("PREFIX", format!("p{i}-")),
                    ("COUNT", per_proc.to_string()),
                ],
            )
        })
        .collect();
    for h in &mut holders {
        h.expect("locked");
    }
    let mut churners: Vec<support::Proc> = (0..2)
        .map(|_| child("churn", churn_dir.path(), &[]))
        .collect();
    for c in &mut churners {
        c.expect("churning");
    }
    let fl = FileLocker::new(dir.path()).unwrap();
    for round in 0..10 {
        let status = fl.status().unwrap();
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for s in &status {
            let name = s.name.clone().unwrap_or_default();
            let owner: usize = name
                .strip_prefix('p')
                .and_then(|n| n.split('-').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX);
            let want = holders.get(owner).map(|h| h.id());
            let pids: Vec<Option<u32>> = s.holders.iter().map(|h| h.pid).collect();
            if s.state != lockgate::file::LockState::Exclusive || pids != vec![want] {
                problems.push(format!(
                    "{name}: {:?} held by {pids:?}, want {want:?}",
                    s.state
                ));
            }
            seen.insert(name);
        }
        assert_eq!(seen.len(), procs * per_proc, "lock files");
        assert!(
            problems.is_empty(),
            "round {round}: {} of {} locks shown wrongly, e.g. {:?}",
            problems.len(),
            procs * per_proc,
            &problems[..problems.len().min(5)]
        );
    }
    for h in &mut holders {
        assert!(h.finish().success());
    }
}

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

/// gc's age is the time since a lock was last used, not since its file was created: flock(2)
/// never touches a file's times, so acquisitions move the modification time up once it is an
/// hour behind (and not more often: no write per acquisition).
#[test]
fn gc_age_counts_from_the_last_use() {
    use std::time::SystemTime;
    let dir = tempfile::tempdir().unwrap();
    let fl = FileLocker::new(dir.path()).unwrap();
    let l = Locker::new(fl.clone());
    drop(l.acquire_blocking("used", ex()).unwrap());
    drop(l.acquire_blocking("idle", ex()).unwrap());
    let path = |n: &str| lock_path(dir.path(), n);
    let set_mtime = |n: &str, t: SystemTime| {
        std::fs::File::open(path(n))
            .unwrap()
            .set_modified(t)
            .unwrap();
    };
    let mtime = |n: &str| std::fs::metadata(path(n)).unwrap().modified().unwrap();
    let day = Duration::from_secs(86400);
    let two_days_ago = SystemTime::now() - 2 * day;
    set_mtime("used", two_days_ago);
    set_mtime("idle", two_days_ago);
    // Used now: its age starts again.
    drop(
        l.acquire_blocking("used", AcquireOptions::shared())
            .unwrap(),
    );
    let age = SystemTime::now()
        .duration_since(mtime("used"))
        .expect("the refreshed modification time is not in the future");
    assert!(
        age < Duration::from_secs(60),
        "age {age:?} after an acquisition"
    );
    // Within the hour, acquisitions leave the time alone.
    let half_an_hour_ago = SystemTime::now() - Duration::from_secs(1800);
    set_mtime("used", half_an_hour_ago);
    drop(l.acquire_blocking("used", ex()).unwrap());
    assert_eq!(mtime("used"), half_an_hour_ago);
    let report = fl.gc(day).unwrap();
    assert_eq!((report.removed, report.too_new, report.in_use), (1, 1, 0));
    assert!(path("used").exists() && !path("idle").exists());
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
