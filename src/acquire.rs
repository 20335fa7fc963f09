//! The acquisition policy every backend shares: the waiting policy turned into one deadline, the
//! on-wait hook called once, and contention turned into [`AcquireError::WouldBlock`] or
//! [`AcquireError::TimedOut`] with the lock's name.

use std::time::Duration;

use crate::clock::{self, Instant};

use crate::error::AcquireError;
use crate::name::LockName;
use crate::options::{AcquireOptions, Holder, Mode, Wait, WaitInfo};

/// One acquisition in progress.
pub(crate) struct Attempt<'a> {
    pub name: &'a LockName,
    pub opts: &'a AcquireOptions,
    /// When it started; not read for an acquisition that waits forever (a clock read saved on
    /// the uncontended path).
    start: Option<Instant>,
    deadline: Option<Instant>,
    notified: bool,
}

impl<'a> Attempt<'a> {
    /// Starts the clock of an acquisition of `name` with `opts`.
    pub fn new(name: &'a LockName, opts: &'a AcquireOptions) -> Self {
        let (start, deadline) = match opts.wait {
            Wait::Forever => (None, None),
            wait => {
                let start = clock::now();
                let deadline = match wait {
                    // The caller's instant is on the system's monotonic clock.
                    Wait::Deadline(at) => Some(Instant::from_std(at)),
                    wait => wait.deadline(start.into_std()).map(Instant::from_std),
                };
                (Some(start), deadline)
            }
        };
        Self {
            name,
            opts,
            start,
            deadline,
            notified: false,
        }
    }

    pub fn mode(&self) -> Mode {
        self.opts.mode
    }

    /// False for a non-blocking acquisition (or a zero timeout).
    pub fn may_wait(&self) -> bool {
        !self.opts.wait.is_non_blocking()
    }

    /// When the acquisition gives up (on the system's monotonic clock, for the file
    /// locker's threads); `None`: never.
    #[cfg_attr(not(feature = "file"), allow(dead_code))]
    pub fn deadline(&self) -> Option<std::time::Instant> {
        self.deadline.map(Instant::into_std)
    }

    /// When the acquisition gives up, on the library's clock (Tokio's); `None`: never.
    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    pub fn deadline_at(&self) -> Option<Instant> {
        self.deadline
    }

    /// True once the deadline has passed.
    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| clock::now() >= d)
    }

    /// True when a pause of `pause` ends before the deadline.
    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    pub fn fits(&self, pause: Duration) -> bool {
        self.deadline.is_none_or(|d| clock::now() + pause < d)
    }

    /// The error for a busy lock: [`AcquireError::WouldBlock`] when the acquisition may not
    /// wait, [`AcquireError::TimedOut`] otherwise.
    pub fn busy(&self) -> AcquireError {
        if self.may_wait() {
            AcquireError::TimedOut {
                name: self.name.as_str().to_owned(),
                waited: self.start.map_or(Duration::ZERO, |s| s.elapsed()),
            }
        } else {
            AcquireError::WouldBlock {
                name: self.name.as_str().to_owned(),
            }
        }
    }

    /// Calls the on-wait hook, the first time only, with the holders `holders` names.
    pub fn waiting(&mut self, holders: impl FnOnce() -> Vec<Holder>) {
        if !self.notified {
            self.notified = true;
            if self.opts.on_wait.is_some() {
                self.opts.notify_wait(&WaitInfo {
                    name: self.name.as_str(),
                    mode: self.opts.mode,
                    holders: holders(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn the_hook_runs_once_and_errors_name_the_lock() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let opts = AcquireOptions::exclusive()
            .timeout(Duration::from_secs(5))
            .on_wait(move |_| {
                c.fetch_add(1, Ordering::Relaxed);
            });
        let name = LockName::new("x").unwrap();
        let mut a = Attempt::new(&name, &opts);
        a.waiting(Vec::new);
        a.waiting(Vec::new);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert!(a.may_wait() && !a.expired() && a.fits(Duration::from_secs(1)));
        assert!(matches!(a.busy(), AcquireError::TimedOut { name, .. } if name == "x"));
        let nb = AcquireOptions::shared().non_blocking();
        let a = Attempt::new(&name, &nb);
        assert!(!a.may_wait() && a.expired());
        assert!(matches!(a.busy(), AcquireError::WouldBlock { .. }));
    }
}
