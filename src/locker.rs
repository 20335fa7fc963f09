//! [`Locker`], [`LockGuard`] and [`LockHandle`]: the API every backend shares.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, PoisonError};

use crate::backend::{Backend, Lease, LostReason, LostSignal};
use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::{AcquireOptions, Mode};

/// Takes and releases named locks through one backend.
///
/// A `Locker` is cheap to clone and is shared safely by any number of threads and tasks; every
/// acquisition is independent, so two acquisitions of one exclusive lock exclude each other even
/// inside one process.
///
/// # Fairness
///
/// The order in which waiters get a freed lock is the backend's. For file locks it is the
/// kernel's (Linux wakes all waiters of a freed flock lock and the first to run wins), except
/// that a waiting exclusive request is not overtaken by new shared requests of lockgate (see
/// `FileLocker`'s "Fairness").
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use lockgate::{AcquireOptions, FileLocker, Locker};
///
/// # let dir = tempfile::tempdir()?;
/// let locker = Locker::new(FileLocker::new(dir.path())?);
/// let guard = locker.acquire_blocking("deploy", AcquireOptions::exclusive())?;
/// // ... the lock is held ...
/// guard.release_blocking()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Locker {
    backend: Arc<dyn Backend>,
    /// The same backend when it is a [`FileLocker`](crate::FileLocker), called directly: its
    /// leases are kept without a box, which spares an uncontended file lock an allocation (a
    /// tenth of what lockgate adds to its system calls).
    #[cfg(feature = "file")]
    file: Option<Arc<crate::FileLocker>>,
    handles: Arc<Mutex<HashMap<String, LockGuard>>>,
}

impl fmt::Debug for Locker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locker")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Locker {
    /// A locker over `backend`.
    pub fn new(backend: impl Backend) -> Self {
        #[cfg(feature = "file")]
        if let Some(file) = (&backend as &dyn std::any::Any).downcast_ref::<crate::FileLocker>() {
            // A clone shares the original's state (its path cache): the same locker.
            let file = Arc::new(file.clone());
            return Self {
                backend: Arc::clone(&file) as Arc<dyn Backend>,
                file: Some(file),
                handles: Arc::default(),
            };
        }
        Self {
            backend: Arc::new(backend),
            #[cfg(feature = "file")]
            file: None,
            handles: Arc::default(),
        }
    }

    /// Acquires the lock `name`.
    ///
    /// # Errors
    ///
    /// [`AcquireError::WouldBlock`] when the lock is busy and `opts` is non-blocking,
    /// [`AcquireError::TimedOut`] when it stayed busy until the deadline, and
    /// [`AcquireError::Failed`] for an invalid name or a backend failure.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future before it completes never leaves the lock held, and gives
    /// up the place in the wait. A lock that was acquired at the very moment of cancellation is
    /// released before the drop returns.
    ///
    /// Timed acquisitions need a Tokio runtime with the time driver enabled.
    pub async fn acquire(
        &self,
        name: &str,
        opts: AcquireOptions,
    ) -> Result<LockGuard, AcquireError> {
        let name = LockName::try_from(name)?;
        #[cfg(feature = "file")]
        if let Some(file) = &self.file {
            let lease = file.acquire_lease(&name, &opts).await?;
            return Ok(LockGuard::new(name, opts.mode, Held::File(lease)));
        }
        let lease = self.backend.acquire(&name, &opts).await?;
        Ok(LockGuard::new(name, opts.mode, Held::Boxed(lease)))
    }

    /// Acquires the lock `name`, blocking the calling thread. Needs no async runtime.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    pub fn acquire_blocking(
        &self,
        name: &str,
        opts: AcquireOptions,
    ) -> Result<LockGuard, AcquireError> {
        let name = LockName::try_from(name)?;
        #[cfg(feature = "file")]
        if let Some(file) = &self.file {
            let lease = file.acquire_lease_blocking(&name, &opts)?;
            return Ok(LockGuard::new(name, opts.mode, Held::File(lease)));
        }
        let lease = self.backend.acquire_blocking(&name, &opts)?;
        Ok(LockGuard::new(name, opts.mode, Held::Boxed(lease)))
    }

    /// Acquires the lock `name` and keeps the guard inside the locker, returning a handle that
    /// [`release`](Self::release) takes back: for callers that pass locks across boundaries
    /// (an RPC server, FFI) where a guard cannot travel.
    ///
    /// A lock held by a handle stays held until it is released through the handle or every
    /// clone of the locker is dropped.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    ///
    /// # Cancel safety
    ///
    /// As [`acquire`](Self::acquire).
    pub async fn acquire_handle(
        &self,
        name: &str,
        opts: AcquireOptions,
    ) -> Result<LockHandle, AcquireError> {
        let guard = self.acquire(name, opts).await?;
        Ok(self.park(guard))
    }

    /// [`acquire_handle`](Self::acquire_handle) for synchronous code.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    pub fn acquire_handle_blocking(
        &self,
        name: &str,
        opts: AcquireOptions,
    ) -> Result<LockHandle, AcquireError> {
        let guard = self.acquire_blocking(name, opts)?;
        Ok(self.park(guard))
    }

    /// Releases a lock acquired with [`acquire_handle`](Self::acquire_handle).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownHandle`] when the handle was not handed out by this locker or was
    /// released already; otherwise the backend's release error.
    ///
    /// # Cancel safety
    ///
    /// The handle is taken back before the first await: once this future has been polled, the
    /// handle is gone, and dropping the future releases the lock on a best-effort basis.
    pub async fn release(&self, handle: &LockHandle) -> Result<(), Error> {
        self.unpark(handle)?.release().await
    }

    /// [`release`](Self::release) for synchronous code.
    ///
    /// # Errors
    ///
    /// As [`release`](Self::release).
    pub fn release_blocking(&self, handle: &LockHandle) -> Result<(), Error> {
        self.unpark(handle)?.release_blocking()
    }

    /// The lost-lease signal of a lock held through a handle.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownHandle`] as for [`release`](Self::release).
    pub fn lost_signal(&self, handle: &LockHandle) -> Result<LostSignal, Error> {
        let handles = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        handles
            .get(&handle.uuid)
            .map(LockGuard::lost_signal)
            .ok_or_else(|| handle.unknown())
    }

    fn park(&self, guard: LockGuard) -> LockHandle {
        let handle = LockHandle {
            uuid: uuid::Uuid::new_v4().to_string(),
            lock_name: guard.name().to_owned(),
        };
        self.handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(handle.uuid.clone(), guard);
        handle
    }

    fn unpark(&self, handle: &LockHandle) -> Result<LockGuard, Error> {
        let mut handles = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        match handles.get(&handle.uuid) {
            Some(g) if g.name() == handle.lock_name => Ok(handles
                .remove(&handle.uuid)
                .expect("present: checked above")),
            _ => Err(handle.unknown()),
        }
    }
}

/// Names a lock held inside a [`Locker`]; see [`Locker::acquire_handle`].
///
/// Serializes as Go lockgate's `LockHandle`: `{"uuid": "...", "lockName": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LockHandle {
    /// Unique id of this acquisition.
    pub uuid: String,
    /// The lock's name.
    #[serde(rename = "lockName")]
    pub lock_name: String,
}

impl LockHandle {
    fn unknown(&self) -> Error {
        Error::UnknownHandle {
            uuid: self.uuid.clone(),
            name: self.lock_name.clone(),
        }
    }
}

/// A held lock. Dropping it releases the lock (errors are logged, not reported); call
/// [`release`](Self::release) or [`release_blocking`](Self::release_blocking) to see them.
#[must_use = "if unused the lock will immediately unlock"]
pub struct LockGuard {
    name: LockName,
    mode: Mode,
    lease: Option<Held>,
}

/// A backend's lease, as a guard holds it.
enum Held {
    /// A file lock's, as it is.
    #[cfg(feature = "file")]
    File(crate::file::FileLease),
    /// Any other backend's.
    Boxed(Box<dyn Lease>),
}

impl Held {
    fn lease(&self) -> &dyn Lease {
        match self {
            #[cfg(feature = "file")]
            Held::File(lease) => lease,
            Held::Boxed(lease) => lease.as_ref(),
        }
    }

    async fn release(self) -> Result<(), Error> {
        match self {
            #[cfg(feature = "file")]
            Held::File(lease) => lease.unlock(),
            Held::Boxed(lease) => lease.release().await,
        }
    }

    fn release_blocking(self) -> Result<(), Error> {
        match self {
            #[cfg(feature = "file")]
            Held::File(lease) => lease.unlock(),
            Held::Boxed(lease) => lease.release_blocking(),
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("lease", &self.lease.as_ref().map(Held::lease))
            .finish()
    }
}

impl LockGuard {
    fn new(name: LockName, mode: Mode, lease: Held) -> Self {
        Self {
            name,
            mode,
            lease: Some(lease),
        }
    }

    fn lease(&self) -> &dyn Lease {
        self.lease
            .as_ref()
            .expect("lease present until release")
            .lease()
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The mode the lock is held in.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A token that strictly increases with every grant of this lock, for backends that provide
    /// one (leased backends do; file locks do not). Pass it to the system the lock protects so it
    /// can reject a holder that lost its lease while paused.
    pub fn fencing_token(&self) -> Option<u64> {
        self.lease().fencing_token()
    }

    /// The file descriptor carrying the lock, for file locks. A child process that inherits it
    /// keeps the lock held until the child exits too.
    pub fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        self.lease().as_fd()
    }

    /// True when the lease is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.lease().lost_signal().reason().is_some()
    }

    /// Waits until the lease is lost: the holder must stop acting under the lock. Never completes
    /// for file locks, which cannot be lost while the process lives.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn lost(&self) -> LostReason {
        self.lease().lost_signal().lost().await
    }

    /// A `'static` signal of the same event as [`lost`](Self::lost), for another task.
    pub fn lost_signal(&self) -> LostSignal {
        self.lease().lost_signal()
    }

    /// Releases the lock.
    ///
    /// # Errors
    ///
    /// The backend's release error; [`Error::LeaseLost`] when the lease was lost before.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future releases the lock on a best-effort basis.
    pub async fn release(mut self) -> Result<(), Error> {
        let lease = self.lease.take().expect("lease present until release");
        lease.release().await
    }

    /// Releases the lock from synchronous code.
    ///
    /// # Errors
    ///
    /// As [`release`](Self::release).
    pub fn release_blocking(mut self) -> Result<(), Error> {
        let lease = self.lease.take().expect("lease present until release");
        lease.release_blocking()
    }
}

/// Runs `f` under the lock `name`, releasing it afterwards (Go lockgate's `WithAcquire`).
///
/// `f` is told whether the lock was acquired: `false` when the lock was busy and `opts` did not
/// allow waiting for it (non-blocking, or the timeout passed). When `f` fails its error is
/// returned, and a release error is only logged; when `f` succeeds a release error is returned.
///
/// # Errors
///
/// `f`'s error, or a real acquisition or release error converted into `E`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), lockgate::Error> {
/// use lockgate::{with_acquire, AcquireOptions, FileLocker, Locker};
/// use std::time::Duration;
///
/// # let dir = tempfile::tempdir().unwrap();
/// let locker = Locker::new(FileLocker::new(dir.path())?);
/// let opts = AcquireOptions::exclusive().timeout(Duration::from_secs(30));
/// let n = with_acquire(&locker, "myresource", opts, |acquired| async move {
///     assert!(acquired);
///     Ok::<_, lockgate::Error>(42)
/// })
/// .await?;
/// assert_eq!(n, 42);
/// # Ok(())
/// # }
/// ```
pub async fn with_acquire<T, E, F, Fut>(
    locker: &Locker,
    name: &str,
    opts: AcquireOptions,
    f: F,
) -> Result<T, E>
where
    F: FnOnce(bool) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: From<Error>,
{
    match locker.acquire(name, opts).await {
        Ok(guard) => {
            let result = f(true).await;
            finish(result, guard.release().await, name)
        }
        Err(AcquireError::Failed(e)) => Err(e.into()),
        Err(_) => f(false).await,
    }
}

/// [`with_acquire`] for synchronous code.
///
/// # Errors
///
/// As [`with_acquire`].
pub fn with_acquire_blocking<T, E, F>(
    locker: &Locker,
    name: &str,
    opts: AcquireOptions,
    f: F,
) -> Result<T, E>
where
    F: FnOnce(bool) -> Result<T, E>,
    E: From<Error>,
{
    match locker.acquire_blocking(name, opts) {
        Ok(guard) => {
            let result = f(true);
            finish(result, guard.release_blocking(), name)
        }
        Err(AcquireError::Failed(e)) => Err(e.into()),
        Err(_) => f(false),
    }
}

fn finish<T, E: From<Error>>(
    result: Result<T, E>,
    released: Result<(), Error>,
    name: &str,
) -> Result<T, E> {
    match (result, released) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(e)) => Err(e.into()),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(release_error)) => {
            tracing::warn!(lock = name, error = %release_error, "release failed after the guarded operation failed");
            Err(e)
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Each backend's lease releases itself on drop.
        drop(self.lease.take());
    }
}
