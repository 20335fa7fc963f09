//! Waiting in flock(2) without polling, with timeouts and cancellation.
//!
//! A blocking `flock` is the only way to be woken by the kernel the moment a lock is freed, and
//! it cannot be given a timeout or cancelled from outside, except by a signal (which is how
//! flock(1) implements `-w`). A wait (which may take several blocking `flock` calls: the
//! turnstile, then the lock; see `turnstile.rs`) runs in one of three ways:
//!
//! - no deadline, blocking API: on the calling thread, never interrupted ([`Stop::Never`]);
//! - a deadline, blocking API: on the calling thread, interrupted by a timer that signals that
//!   thread ([`timer`], [`Stop::At`]);
//! - the async API (which must not block the executor, and can be cancelled at any moment): a
//!   [`Waiter`] runs the wait on a thread of its own, and the owner interrupts it with a signal
//!   ([`Stop::Flag`]):
//!
//! 1. The waiter thread unblocks the wake signal, then runs the wait: before each blocking
//!    `flock` it checks the cancel flag; on `EINTR` it checks again.
//! 2. To cancel, the owner sets the cancel flag, then sends the wake signal to the thread until
//!    the thread reports that it has stopped (a signal sent just before the thread enters
//!    `flock` is lost, hence the repetition with a short back-off).
//! 3. The owner then joins the thread and takes its result: a lock that was granted at the
//!    moment of cancellation is either used (a timeout that raced a grant) or released — never
//!    left held by a stray thread. Whatever the wait held on the way (the turnstile) it gives
//!    back before it reports.
//!
//! The wake signal is a real-time signal that nobody handles when first needed (the highest
//! free one, searching down from `SIGRTMAX`); its handler does nothing and is installed without
//! `SA_RESTART`, so `flock` returns `EINTR`. The signal is only ever sent to threads that wait
//! for a lock.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::FileLease;
use crate::error::Error;

/// What a wait ends with: the lease, `None` when it was stopped (deadline or cancellation)
/// before the lock was granted, or an error.
pub(super) type Outcome = Result<Option<FileLease>, Error>;

/// What stops a wait early. Checked before every blocking call and after every `EINTR`.
pub(super) enum Stop<'a> {
    /// Nothing: the wait ends with the lock (or an error).
    Never,
    /// The deadline; a [`timer`] interrupts the thread's blocking calls.
    At(Instant),
    /// The cancel flag of a [`Waiter`], whose owner interrupts the thread.
    Flag(&'a AtomicBool),
}

impl Stop<'_> {
    pub(super) fn stopped(&self) -> bool {
        match self {
            Stop::Never => false,
            Stop::At(deadline) => Instant::now() >= *deadline,
            Stop::Flag(cancelled) => cancelled.load(Ordering::SeqCst),
        }
    }
}

/// Blocks in `flock(file, operation)` until it is granted (`true`) or `stop` says to give up
/// (`false`).
pub(super) fn flock(file: &File, operation: libc::c_int, stop: &Stop<'_>) -> io::Result<bool> {
    loop {
        if stop.stopped() {
            return Ok(false);
        }
        // SAFETY: flock on a descriptor we own for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

struct Shared {
    cancelled: AtomicBool,
    result: Mutex<Option<Outcome>>,
    done: Condvar,
    notify: Notify,
}

/// A wait running on its own thread.
pub(super) struct Waiter {
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

/// Unblocks `sig` on the calling thread; returns the previous mask.
fn unblock(sig: libc::c_int) -> libc::sigset_t {
    // SAFETY: sigset operations on local, initialised sets.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, &mut old);
        old
    }
}

impl Waiter {
    /// Starts `wait` on a thread of its own; it must stop soon after its [`Stop`] says so.
    pub(super) fn start(
        wait: impl FnOnce(&Stop<'_>) -> Outcome + Send + 'static,
    ) -> Result<Self, Error> {
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
            .stack_size(256 * 1024)
            .spawn(move || {
                // Threads inherit their creator's signal mask; the wake signal must get through.
                unblock(sig);
                let outcome = wait(&Stop::Flag(&thread_shared.cancelled));
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
    pub(super) fn wait_blocking(mut self, deadline: Option<Instant>) -> Outcome {
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
    pub(super) async fn wait(mut self, deadline: Option<Instant>) -> Outcome {
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
            if let Some(Ok(Some(lease))) = self.take_result() {
                // Closing the file frees the lock the kernel granted as the wait was cancelled.
                drop(lease);
                tracing::debug!("closed a lock granted at the moment of cancellation");
            }
        }
    }
}

/// A timer that interrupts the calling thread's blocking calls at `deadline`, for waits on the
/// calling thread with a deadline (`acquire_blocking` with a timeout): it signals this very
/// thread at the deadline, and every millisecond after it, until dropped: a signal that lands
/// just before the thread enters `flock` is lost, the next one is not. Waiting here rather than
/// on a thread of its own spares the hop from the waiter thread to the caller at the moment of
/// the grant. `None` when no timer can be set up (the caller then waits through a [`Waiter`]).
pub(super) fn timer(deadline: Instant) -> Option<ThreadTimer> {
    wake_signal()
        .ok()
        .and_then(|sig| ThreadTimer::start(sig, deadline))
}

/// A POSIX timer that sends the wake signal to the calling thread, with the signal unblocked on
/// that thread while the timer lives.
pub(super) struct ThreadTimer {
    id: libc::timer_t,
    old_mask: libc::sigset_t,
}

impl ThreadTimer {
    fn start(sig: libc::c_int, deadline: Instant) -> Option<Self> {
        let old_mask = unblock(sig);
        // SAFETY: plain system calls with initialised arguments; the timer is deleted and the
        // mask restored in Drop.
        unsafe {
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
