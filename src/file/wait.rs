//! Waiting for a flock(2) lock without polling, with timeouts and cancellation.
//!
//! A blocking `flock` is the only way to be woken by the kernel the moment a lock is freed, and
//! it cannot be given a timeout or cancelled from outside, except by a signal (which is how
//! flock(1) implements `-w`). Three ways to wait:
//!
//! - no deadline, blocking API: `flock` on the calling thread ([`flock_blocking`]);
//! - a deadline, blocking API: `flock` on the calling thread, interrupted by a timer that
//!   signals that thread ([`flock_until`]);
//! - the async API (which must not block the executor, and can be cancelled at any moment): a
//!   [`Waiter`] runs the blocking `flock` on a thread of its own, and the owner interrupts it
//!   with a signal:
//!
//! 1. The waiter thread unblocks the wake signal, then loops: if cancelled, stop; else call the
//!    blocking `flock`; on `EINTR` loop again.
//! 2. To cancel, the owner sets the cancel flag, then sends the wake signal to the thread until
//!    the thread reports that it has stopped (a signal sent just before the thread enters
//!    `flock` is lost, hence the repetition with a short back-off).
//! 3. The owner then joins the thread and takes its result: a lock that was granted at the
//!    moment of cancellation is either used (a timeout that raced a grant) or closed — never
//!    left held by a stray thread.
//!
//! The wake signal is a real-time signal that nobody handles when first needed (the highest
//! free one, searching down from `SIGRTMAX`); its handler does nothing and is installed without
//! `SA_RESTART`, so `flock` returns `EINTR`. The signal is only ever sent to waiter threads.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::error::Error;

/// The result of a wait: the locked file, or `None` when the wait was cancelled first.
pub(crate) type Outcome = io::Result<Option<File>>;

struct Shared {
    cancelled: AtomicBool,
    result: Mutex<Option<Outcome>>,
    done: Condvar,
    notify: Notify,
}

/// A blocking `flock` running on its own thread.
pub(crate) struct Waiter {
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

extern "C" fn wake_handler(_: libc::c_int) {}

/// The wake signal, installed on first use.
fn wake_signal() -> Result<libc::c_int, Error> {
    static SIGNAL: OnceLock<Result<libc::c_int, i32>> = OnceLock::new();
    SIGNAL
        .get_or_init(|| {
            let (lo, hi) = (libc::SIGRTMIN(), libc::SIGRTMAX());
            for sig in (lo..=hi).rev() {
                // SAFETY: plain sigaction queries/installs with valid, zeroed structs.
                unsafe {
                    let mut old: libc::sigaction = std::mem::zeroed();
                    if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                        continue;
                    }
                    if old.sa_sigaction != libc::SIG_DFL {
                        continue; // somebody uses it
                    }
                    let mut new: libc::sigaction = std::mem::zeroed();
                    new.sa_sigaction = wake_handler as *const () as libc::sighandler_t;
                    new.sa_flags = 0; // no SA_RESTART: flock must return EINTR
                    libc::sigemptyset(&mut new.sa_mask);
                    if libc::sigaction(sig, &new, std::ptr::null_mut()) == 0 {
                        tracing::debug!(signal = sig, "flock wake signal installed");
                        return Ok(sig);
                    }
                }
            }
            Err(libc::EBUSY)
        })
        .as_ref()
        .copied()
        .map_err(|&errno| Error::System {
            op: "find a free real-time signal to interrupt blocked flock(2) calls",
            source: io::Error::from_raw_os_error(errno),
        })
}

impl Waiter {
    /// Starts waiting for `operation` (`LOCK_SH` or `LOCK_EX`) on `file`.
    pub(crate) fn start(file: File, operation: libc::c_int) -> Result<Self, Error> {
        let sig = wake_signal()?;
        let shared = Arc::new(Shared {
            cancelled: AtomicBool::new(false),
            result: Mutex::new(None),
            done: Condvar::new(),
            notify: Notify::new(),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("lockgate-flock".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let outcome = run(&file, operation, sig, &thread_shared.cancelled)
                    .map(|locked| locked.then_some(file));
                *thread_shared
                    .result
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(outcome);
                thread_shared.done.notify_all();
                thread_shared.notify.notify_one();
            })
            .map_err(|source| Error::System {
                op: "start a thread to wait for a lock",
                source,
            })?;
        Ok(Self {
            thread: Some(thread),
            shared,
        })
    }

    fn take_result(&mut self) -> Option<Outcome> {
        let r = self
            .shared
            .result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if r.is_some() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        r
    }

    /// Waits for the lock until `deadline`, blocking the calling thread. On timeout the wait is
    /// cancelled: the result is then whatever the waiter had when it stopped.
    pub(crate) fn wait_blocking(mut self, deadline: Option<Instant>) -> Outcome {
        {
            let mut result = self
                .shared
                .result
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            loop {
                if result.is_some() {
                    break;
                }
                match deadline {
                    None => {
                        result = self
                            .shared
                            .done
                            .wait(result)
                            .unwrap_or_else(PoisonError::into_inner)
                    }
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            break;
                        }
                        result = self
                            .shared
                            .done
                            .wait_timeout(result, d - now)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                }
            }
        }
        self.finish()
    }

    /// Waits for the lock until `deadline` without blocking the executor.
    ///
    /// Cancel safe: dropping the future drops the waiter, which cancels the wait and releases a
    /// lock granted in the meantime.
    pub(crate) async fn wait(mut self, deadline: Option<Instant>) -> Outcome {
        loop {
            if let Some(r) = self.take_result() {
                return r;
            }
            let notified = self.shared.notify.notified();
            match deadline {
                None => notified.await,
                Some(d) => {
                    if tokio::time::timeout_at(d.into(), notified).await.is_err() {
                        return self.finish();
                    }
                }
            }
        }
    }

    /// Cancels the wait and returns what the waiter ended with.
    fn finish(&mut self) -> Outcome {
        self.cancel();
        self.take_result().unwrap_or(Ok(None))
    }

    /// Stops the waiter thread and waits until it has stopped.
    fn cancel(&mut self) {
        let Some(thread) = &self.thread else { return };
        self.shared.cancelled.store(true, Ordering::SeqCst);
        let Ok(sig) = wake_signal() else { return };
        let tid = thread.as_pthread_t();
        let mut pause = Duration::from_micros(50);
        let mut result = self
            .shared
            .result
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while result.is_none() {
            // SAFETY: the thread has not been joined (we hold its JoinHandle), so its pthread_t
            // is valid even if it has exited.
            unsafe { libc::pthread_kill(tid, sig) };
            result = self
                .shared
                .done
                .wait_timeout(result, pause)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.cancel();
            if let Some(Ok(Some(file))) = self.take_result() {
                // Closing the file frees the lock the kernel granted as the wait was cancelled.
                drop(file);
                tracing::debug!("closed a lock granted at the moment of cancellation");
            }
        }
    }
}

/// Waits for the lock on the calling thread, for waits that nothing can interrupt (no deadline,
/// no cancellation): the kernel wakes this very thread, with no hop through another.
pub(crate) fn flock_blocking(file: File, operation: libc::c_int) -> Outcome {
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(Some(file));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits for the lock on the calling thread until `deadline` (blocking waits with a deadline:
/// `acquire_blocking` with a timeout). A timer signals this very thread at the deadline, and
/// every millisecond after it: a signal that lands just before the thread enters `flock` is
/// lost, the next one is not. Waiting here rather than on a thread of its own spares the hop
/// from the waiter thread to the caller at the moment of the grant. `Err(file)` when the timer
/// cannot be set up: the caller then waits through a [`Waiter`].
pub(crate) fn flock_until(
    file: File,
    operation: libc::c_int,
    deadline: Instant,
) -> Result<Outcome, File> {
    let Some(timer) = wake_signal()
        .ok()
        .and_then(|sig| ThreadTimer::start(sig, deadline))
    else {
        return Err(file);
    };
    let outcome = loop {
        if Instant::now() >= deadline {
            break Ok(None);
        }
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            break Ok(Some(file));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            break Err(e);
        }
    };
    drop(timer);
    Ok(outcome)
}

/// A POSIX timer that sends the wake signal to the calling thread, with the signal unblocked on
/// that thread while the timer lives.
struct ThreadTimer {
    id: libc::timer_t,
    old_mask: libc::sigset_t,
}

impl ThreadTimer {
    fn start(sig: libc::c_int, deadline: Instant) -> Option<Self> {
        // SAFETY: plain system calls with initialised arguments; the timer is deleted and the
        // mask restored in Drop.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old_mask: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, &mut old_mask);
            let mut ev: libc::sigevent = std::mem::zeroed();
            ev.sigev_notify = libc::SIGEV_THREAD_ID;
            ev.sigev_signo = sig;
            ev.sigev_notify_thread_id = libc::gettid();
            let mut id: libc::timer_t = std::mem::zeroed();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut id) != 0 {
                libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut());
                return None;
            }
            let timer = Self { id, old_mask };
            let left = deadline.saturating_duration_since(Instant::now());
            let spec = libc::itimerspec {
                // A zero value would disarm the timer: fire at once instead.
                it_value: timespec(left.max(Duration::from_nanos(1))),
                it_interval: timespec(Duration::from_millis(1)),
            };
            (libc::timer_settime(id, 0, &spec, std::ptr::null_mut()) == 0).then_some(timer)
        }
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: the timer was created by us and is deleted once; the mask is the one saved.
        unsafe {
            libc::timer_delete(self.id);
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut());
        }
    }
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// The waiter thread's body: true when locked, false when cancelled.
fn run(
    file: &File,
    operation: libc::c_int,
    sig: libc::c_int,
    cancelled: &AtomicBool,
) -> io::Result<bool> {
    // Threads inherit their creator's signal mask; the wake signal must get through.
    // SAFETY: sigset operations on a local, initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    loop {
        if cancelled.load(Ordering::SeqCst) {
            return Ok(false);
        }
        // SAFETY: flock on an fd we own for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
