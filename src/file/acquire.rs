//! An acquisition: first an attempt that never waits (the whole of an uncontended acquisition),
//! then, when the lock is busy and the request may wait, the wait, as a sequence of steps that
//! the blocking and the async API run alike (on the calling thread, or on a waiter thread).

use std::fs::File;
use std::sync::Arc;

use super::lockfile::Locked;
use super::wait::{self, Outcome, Stop, Waiter};
use super::{op, status, turnstile, FileLease, FileLocker, LockPath};
use crate::acquire::Attempt;
use crate::backend::{Backend, BoxFuture, Lease};
use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::{AcquireOptions, Mode};

/// Where a waiting acquisition stands.
pub(super) enum Step {
    /// Open the lock file and try it without waiting.
    Try,
    /// Wait for the lock on this open lock file (found busy).
    Wait(File),
    /// A shared request giving way to an exclusive one: wait until it is through the turnstile.
    GiveWay,
}

impl FileLocker {
    /// The attempt that never waits, starting over while the file was collected under us.
    /// `Ok(Err(step))`: the lock is busy, the request may wait, and its wait starts at `step`
    /// (the on-wait hook has been called).
    fn try_acquire(
        &self,
        path: &LockPath,
        attempt: &mut Attempt<'_>,
    ) -> Result<Result<FileLease, Step>, AcquireError> {
        let mode = attempt.mode();
        loop {
            let file = self.open(path)?;
            if Self::try_lock(&file, mode, path)? {
                match self.locked(attempt.name, file, path, mode)? {
                    Locked::Lease(lease) => return Ok(Ok(lease)),
                    Locked::Unlinked => continue,
                    Locked::GiveWay => return Self::must_wait(attempt, path, Step::GiveWay),
                }
            }
            if !attempt.may_wait() {
                return Err(attempt.busy());
            }
            // Never wait on something that is not a lock file (a FIFO, a device).
            if !Self::stat(&file, path)?.is_regular() {
                return Err(Error::NotARegularFile { path: path.path() }.into());
            }
            return Self::must_wait(attempt, path, Step::Wait(file));
        }
    }

    fn must_wait(
        attempt: &mut Attempt<'_>,
        path: &LockPath,
        step: Step,
    ) -> Result<Result<FileLease, Step>, AcquireError> {
        if !attempt.may_wait() {
            return Err(attempt.busy());
        }
        attempt.waiting(|| status::holders_of(&path.path()).unwrap_or_default());
        Ok(Err(step))
    }

    /// Waits for the lock from `step` on until granted or `stop`. The same for every way of
    /// waiting: only `stop` differs.
    ///
    /// An exclusive request waits holding the turnstile; a shared request waits for the lock
    /// itself, or, when it had to give way, for the turnstile (see `turnstile.rs`).
    fn wait_for(
        &self,
        path: &LockPath,
        name: &LockName,
        mode: Mode,
        mut step: Step,
        stop: &Stop<'_>,
    ) -> Outcome {
        let lock_error = |source| Error::LockFile {
            op: "lock",
            path: path.path(),
            source,
        };
        loop {
            let file = match std::mem::replace(&mut step, Step::Try) {
                Step::Try => {
                    let file = self.open(path)?;
                    if !Self::try_lock(&file, mode, path)? {
                        if !Self::stat(&file, path)?.is_regular() {
                            return Err(Error::NotARegularFile { path: path.path() });
                        }
                        step = Step::Wait(file);
                        continue;
                    }
                    file
                }
                Step::Wait(file) => {
                    let granted = match mode {
                        Mode::Shared => wait::flock(&file, op(mode), stop),
                        Mode::Exclusive => turnstile::wait_exclusive(path, &file, stop),
                    };
                    if !granted.map_err(lock_error)? {
                        return Ok(None);
                    }
                    file
                }
                Step::GiveWay => {
                    if !turnstile::pass(path, stop) {
                        return Ok(None);
                    }
                    continue;
                }
            };
            match self.locked(name, file, path, mode)? {
                Locked::Lease(lease) => return Ok(Some(lease)),
                Locked::Unlinked => step = Step::Try,
                Locked::GiveWay => step = Step::GiveWay,
            }
        }
    }

    /// A thread that waits from `step` on.
    fn waiter(
        &self,
        path: Arc<LockPath>,
        name: &LockName,
        mode: Mode,
        step: Step,
    ) -> Result<Waiter, Error> {
        let (locker, name) = (self.clone(), name.clone());
        Waiter::start(move |stop| locker.wait_for(&path, &name, mode, step, stop))
    }
}

/// The end of a wait, as the acquisition reports it.
fn granted(attempt: &Attempt<'_>, outcome: Outcome) -> Result<FileLease, AcquireError> {
    match outcome {
        Ok(Some(lease)) => Ok(lease),
        Ok(None) => Err(attempt.busy()),
        Err(e) => Err(e.into()),
    }
}

impl FileLocker {
    /// [`Backend::acquire`] without the boxes: what [`Locker`](crate::Locker) calls for a file
    /// locker.
    pub(crate) async fn acquire_lease(
        &self,
        name: &LockName,
        opts: &AcquireOptions,
    ) -> Result<FileLease, AcquireError> {
        let mut attempt = Attempt::new(name, opts);
        let tried = self.with_path(name, |path| self.try_acquire(path, &mut attempt));
        let step = match tried? {
            Ok(lease) => return Ok(lease),
            Err(step) => step,
        };
        // Busy: the wait has a path of its own (a waiter thread may need it).
        let path = self.c_path(name);
        let outcome = self
            .waiter(path, name, opts.mode, step)?
            .wait(attempt.deadline())
            .await;
        granted(&attempt, outcome)
    }

    /// [`Backend::acquire_blocking`] without the box: what [`Locker`](crate::Locker) calls for
    /// a file locker.
    pub(crate) fn acquire_lease_blocking(
        &self,
        name: &LockName,
        opts: &AcquireOptions,
    ) -> Result<FileLease, AcquireError> {
        let mut attempt = Attempt::new(name, opts);
        let tried = self.with_path(name, |path| self.try_acquire(path, &mut attempt));
        let step = match tried? {
            Ok(lease) => return Ok(lease),
            Err(step) => step,
        };
        // Busy: the wait has a path of its own (a waiter thread may need it).
        let path = self.c_path(name);
        // Wait right here (no hop through another thread at the grant): without a deadline
        // nothing interrupts the wait; with one, a timer for this thread does.
        let outcome = match attempt.deadline() {
            None => self.wait_for(&path, name, opts.mode, step, &Stop::Never),
            Some(deadline) => match wait::timer(deadline) {
                Some(timer) => {
                    let outcome = self.wait_for(&path, name, opts.mode, step, &Stop::At(deadline));
                    drop(timer);
                    outcome
                }
                // No timer available: wait through a thread of its own.
                None => self
                    .waiter(path, name, opts.mode, step)?
                    .wait_blocking(Some(deadline)),
            },
        };
        granted(&attempt, outcome)
    }
}

impl Backend for FileLocker {
    fn acquire<'a>(
        &'a self,
        name: &'a LockName,
        opts: &'a AcquireOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Lease>, AcquireError>> {
        Box::pin(async move {
            let lease = self.acquire_lease(name, opts).await?;
            Ok(Box::new(lease) as Box<dyn Lease>)
        })
    }

    fn acquire_blocking(
        &self,
        name: &LockName,
        opts: &AcquireOptions,
    ) -> Result<Box<dyn Lease>, AcquireError> {
        Ok(Box::new(self.acquire_lease_blocking(name, opts)?))
    }
}
