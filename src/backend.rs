//! The interface between [`Locker`](crate::Locker) and a locking mechanism.
//!
//! A backend only takes and gives back leases; guards, handles, the `with_acquire` wrapper and
//! the blocking/async pairing live in [`Locker`](crate::Locker). Application code does not
//! need this module unless it implements a backend of its own.

use std::fmt;
use std::future::Future;
use std::os::fd::BorrowedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::AcquireOptions;

/// A boxed, `Send` future, as backends return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A locking mechanism.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Acquires `name` as `opts` asks, waiting without blocking the executor.
    ///
    /// Dropping the returned future before it completes must leave nothing held.
    fn acquire<'a>(
        &'a self,
        name: &'a LockName,
        opts: &'a AcquireOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Lease>, AcquireError>>;

    /// Acquires `name` as `opts` asks, blocking the calling thread.
    fn acquire_blocking(
        &self,
        name: &LockName,
        opts: &AcquireOptions,
    ) -> Result<Box<dyn Lease>, AcquireError>;
}

/// One held lock, as a backend represents it. Dropping a lease releases it on a best-effort
/// basis.
pub trait Lease: Send + Sync + fmt::Debug {
    /// Releases the lock, reporting errors.
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>>;

    /// Releases the lock from synchronous code, reporting errors.
    fn release_blocking(self: Box<Self>) -> Result<(), Error>;

    /// The signal that fires when the lease is lost.
    fn lost_signal(&self) -> LostSignal;

    /// A token that strictly increases with each grant of this lock, when the backend has one.
    fn fencing_token(&self) -> Option<u64> {
        None
    }

    /// The file descriptor that carries the lock, for backends whose locks live in one.
    fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// Why a lease counts as lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LostReason {
    /// The lease could not be renewed before it could have expired for others.
    #[error("the lease could not be renewed in time")]
    RenewalFailed,
    /// Another owner's record replaced ours.
    #[error("another owner took the lock")]
    Taken,
    /// The lock server no longer has the lease: it expired there, was released, or ended with
    /// the server (a restarted server with an in-memory store).
    #[error("the lock server no longer has the lease")]
    Gone,
}

/// Fires when a lease is lost; see [`LockGuard::lost`](crate::LockGuard::lost).
///
/// Cheap to clone; every clone observes the same lease.
///
/// A leased backend also gives the signal the lease's deadline (the moment it counts as lost
/// unless a renewal is confirmed first): [`reason`](Self::reason) and [`lost`](Self::lost)
/// compare it with the clock themselves, so a holder that was paused or whose host was
/// suspended past its deadline sees its lease lost the moment it looks, whatever became of the
/// renewal task meanwhile.
#[derive(Debug, Clone)]
pub struct LostSignal {
    rx: watch::Receiver<Option<LostReason>>,
    /// The deadline on the boot clock, in nanoseconds; `u64::MAX`: none (released, or a lease
    /// that cannot be lost).
    deadline: Arc<AtomicU64>,
    /// The time after the deadline before others may take the lease over, in nanoseconds.
    grace: Arc<AtomicU64>,
}

/// No deadline.
const NO_DEADLINE: u64 = u64::MAX;

/// The sending side of a [`LostSignal`], kept by a backend.
pub struct LostNotifier {
    tx: watch::Sender<Option<LostReason>>,
    deadline: Arc<AtomicU64>,
    grace: Arc<AtomicU64>,
    /// The acquisition's on-lost hook and lock name.
    hook: Option<(String, crate::options::OnLost)>,
}

impl fmt::Debug for LostNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LostNotifier")
            .field("lost", &*self.tx.borrow())
            .finish_non_exhaustive()
    }
}

impl LostNotifier {
    /// A notifier and its signal.
    pub fn new() -> (Self, LostSignal) {
        let (tx, rx) = watch::channel(None);
        let deadline = Arc::new(AtomicU64::new(NO_DEADLINE));
        let grace = Arc::new(AtomicU64::new(0));
        let signal = LostSignal {
            rx,
            deadline: Arc::clone(&deadline),
            grace: Arc::clone(&grace),
        };
        (
            Self {
                tx,
                deadline,
                grace,
                hook: None,
            },
            signal,
        )
    }

    /// Sets the lease's deadline: from then on the signal counts the lease lost at that moment
    /// (boot clock) unless a later deadline is set first. A deadline that has passed is final:
    /// a lease counted lost is never found again.
    #[cfg(any(feature = "kubernetes", feature = "http"))]
    pub(crate) fn set_deadline(&self, deadline: crate::clock::Boot, grace: Duration) {
        self.grace.store(
            u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
        let new = deadline.as_nanos().min(NO_DEADLINE - 1);
        let _ = self
            .deadline
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                let passed =
                    old != NO_DEADLINE && crate::clock::Boot::from_nanos(old).left().is_zero();
                (!passed).then_some(new)
            });
        // Wake a `lost()` waiting for the old deadline, so that it waits for the new one.
        self.tx.send_modify(|_| {});
    }

    /// A notifier that also runs the on-lost hook of `opts` (if any) for the lock `name`.
    pub fn with_hook(name: &str, opts: &AcquireOptions) -> (Self, LostSignal) {
        let (mut n, s) = Self::new();
        n.hook = opts.on_lost.clone().map(|h| (name.to_owned(), h));
        (n, s)
    }

    /// Marks the lease lost and runs the on-lost hook. Only the first reason is kept.
    pub fn notify(&self, reason: LostReason) {
        let first = self.tx.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason.clone());
                true
            } else {
                false
            }
        });
        if let (true, Some((name, hook))) = (first, &self.hook) {
            run_hook(name.clone(), hook.clone(), reason);
        }
    }

    /// Another signal for the same lease.
    pub fn subscribe(&self) -> LostSignal {
        LostSignal {
            rx: self.tx.subscribe(),
            deadline: Arc::clone(&self.deadline),
            grace: Arc::clone(&self.grace),
        }
    }
}

impl Drop for LostNotifier {
    fn drop(&mut self) {
        // Released (or lost, which the channel keeps): the deadline no longer applies.
        self.deadline.store(NO_DEADLINE, Ordering::Release);
    }
}

/// Runs an on-lost hook isolated from the caller (a renewal task): on a blocking thread of the
/// runtime when there is one, and with its panics caught, so that nothing a hook does (panic,
/// block, take long) can stop the renewal of other leases.
fn run_hook(name: String, hook: crate::options::OnLost, reason: LostReason) {
    let call = move || {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(&name, &reason)));
        if ran.is_err() {
            tracing::error!(lock = name, "the on-lost hook panicked");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(call)),
        Err(_) => call(),
    }
}

impl LostSignal {
    /// A signal that never fires, for leases that cannot be lost (file locks).
    pub fn never() -> Self {
        // The sender is dropped at once; `lost()` treats a closed channel without a reason as
        // "never lost".
        let (_, rx) = watch::channel(None);
        Self {
            rx,
            deadline: Arc::new(AtomicU64::new(NO_DEADLINE)),
            grace: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How long after the lease counts as lost another holder may, at the earliest, take the
    /// lock over: the time a holder has to stop. Zero when the lease was taken over already (or
    /// is gone from the store); `None` for a lease that cannot be lost (file locks) or was
    /// released.
    ///
    /// `lockgate exec` gives its command half of it between SIGTERM and SIGKILL.
    pub fn takeover_grace(&self) -> Option<Duration> {
        match self.rx.borrow().clone() {
            Some(LostReason::RenewalFailed) => {}
            Some(_) => return Some(Duration::ZERO),
            None if self.deadline.load(Ordering::Acquire) == NO_DEADLINE => return None,
            None => {}
        }
        Some(Duration::from_nanos(self.grace.load(Ordering::Acquire)))
    }

    /// The reason, if the lease is lost already: told so by the backend, or its deadline
    /// passed.
    pub fn reason(&self) -> Option<LostReason> {
        if let Some(r) = self.rx.borrow().clone() {
            return Some(r);
        }
        self.past_deadline().then_some(LostReason::RenewalFailed)
    }

    /// The time left until the deadline (`None`: none).
    fn until_deadline(&self) -> Option<Duration> {
        match self.deadline.load(Ordering::Acquire) {
            NO_DEADLINE => None,
            nanos => Some(crate::clock::Boot::from_nanos(nanos).left()),
        }
    }

    fn past_deadline(&self) -> bool {
        self.until_deadline().is_some_and(|left| left.is_zero())
    }

    /// Waits until the lease is lost. Never completes for a lease that cannot be lost, or once
    /// the lease has been released.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future loses nothing; call it again to keep waiting.
    pub async fn lost(&mut self) -> LostReason {
        /// The longest nap between looks at the deadline: timers run on the monotonic clock,
        /// which stops while the host is suspended; the deadline is on the boot clock.
        const NAP: Duration = Duration::from_secs(1);
        loop {
            if let Some(r) = self.rx.borrow_and_update().clone() {
                return r;
            }
            if self.past_deadline() {
                return LostReason::RenewalFailed;
            }
            match self.until_deadline() {
                Some(left) => {
                    if let Ok(changed) =
                        tokio::time::timeout(left.min(NAP), self.rx.changed()).await
                    {
                        if changed.is_err() && self.rx.borrow().is_none() {
                            // Released: the lease ended normally.
                            std::future::pending::<()>().await;
                        }
                    }
                }
                None => {
                    if self.rx.changed().await.is_err() && self.rx.borrow().is_none() {
                        // The backend dropped the notifier without a reason: the lease ended
                        // normally.
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}
