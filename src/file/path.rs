//! Locks on given file paths, taken exactly as flock(1) takes them.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::path::{Path, PathBuf};

use super::wait::{self, Stop, Waiter};
use super::FileLease;
use crate::acquire::Attempt;
use crate::backend::{Backend, BoxFuture, Lease, LostSignal};
use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::{AcquireOptions, Mode};

/// A locker whose lock names are file paths, each locked as `flock PATH COMMAND` locks it: the
/// file at the path itself (relative paths from the working directory; symbolic links
/// followed), created with mode 0666 (less the umask) when missing, never written, renamed or
/// removed; a directory is locked too. A lockgate process and a flock(1) process locking the
/// same path exclude each other.
///
/// Unlike [`FileLocker`](super::FileLocker), no name is hashed and nothing is recorded in the
/// file; `status` and `gc` do not know these files. A blocked acquisition is woken by the
/// kernel when the lock is freed, as with `FileLocker`.
///
/// # Fairness
///
/// The kernel's, as flock(1)'s: when the lock is freed every blocked waiter is woken and the
/// first to run takes it.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use lockgate::file::PathLocker;
/// use lockgate::{AcquireOptions, Locker};
///
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("deploy.lock");
/// # let path = path.to_str().unwrap();
/// let locker = Locker::new(PathLocker::new());
/// // As `flock /var/lock/deploy.lock ...` does, with `path` = "/var/lock/deploy.lock":
/// let guard = locker.acquire_blocking(path, AcquireOptions::exclusive())?;
/// drop(guard);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct PathLocker {
    _private: (),
}

impl PathLocker {
    /// A locker of file paths.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens the file at `path` as flock(1) does: read-only, created when missing; a
    /// directory read-only without creation. Non-blocking, so that a FIFO does not hang the
    /// open (it changes nothing for flock).
    fn open(path: &Path) -> Result<File, Error> {
        use std::os::unix::ffi::OsStrExt;
        let fail = |source: io::Error| Error::LockFile {
            op: "open",
            path: path.to_owned(),
            source,
        };
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| fail(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let flags = libc::O_RDONLY | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: open with a valid C string.
        let mut fd =
            unsafe { libc::open(c.as_ptr(), flags | libc::O_CREAT, 0o666 as libc::c_uint) };
        if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EISDIR) {
            // SAFETY: as above.
            fd = unsafe { libc::open(c.as_ptr(), flags) };
        }
        if fd < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        // SAFETY: a freshly opened descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Opens the path and tries the lock; `Ok(Err(file))`: busy, wait on `file`.
    fn try_lock(
        path: &Path,
        attempt: &mut Attempt<'_>,
    ) -> Result<Result<Box<dyn Lease>, File>, AcquireError> {
        let file = Self::open(path)?;
        // SAFETY: flock on an open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), op(attempt.mode()) | libc::LOCK_NB) } == 0 {
            return Ok(Ok(Box::new(PathLease { file })));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(lock_error(path, e).into());
        }
        if !attempt.may_wait() {
            return Err(attempt.busy());
        }
        attempt.waiting(|| super::status::holders_of(path).unwrap_or_default());
        Ok(Err(file))
    }
}

fn op(mode: Mode) -> libc::c_int {
    match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    }
}

fn lock_error(path: &Path, source: io::Error) -> Error {
    Error::LockFile {
        op: "lock",
        path: path.to_owned(),
        source,
    }
}

fn waited(attempt: &Attempt<'_>, outcome: wait::Outcome) -> Result<Box<dyn Lease>, AcquireError> {
    match outcome {
        Ok(Some(lease)) => Ok(Box::new(PathLease { file: lease.file })),
        Ok(None) => Err(attempt.busy()),
        Err(e) => Err(e.into()),
    }
}

/// Waits in flock(2) on `file` until granted or `stop` says to give up.
fn wait_on(file: File, mode: Mode, path: &Path, stop: &Stop<'_>) -> wait::Outcome {
    match wait::flock(&file, op(mode), stop) {
        Ok(true) => Ok(Some(FileLease { file })),
        Ok(false) => Ok(None),
        Err(e) => Err(lock_error(path, e)),
    }
}

impl Backend for PathLocker {
    fn acquire<'a>(
        &'a self,
        name: &'a LockName,
        opts: &'a AcquireOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Lease>, AcquireError>> {
        Box::pin(async move {
            let mut attempt = Attempt::new(name, opts);
            let path = PathBuf::from(name.as_str());
            let file = match Self::try_lock(&path, &mut attempt)? {
                Ok(lease) => return Ok(lease),
                Err(file) => file,
            };
            let (mode, p) = (opts.mode, path.clone());
            let outcome = Waiter::start(move |stop| wait_on(file, mode, &p, stop))?
                .wait(attempt.deadline())
                .await;
            waited(&attempt, outcome)
        })
    }

    fn acquire_blocking(
        &self,
        name: &LockName,
        opts: &AcquireOptions,
    ) -> Result<Box<dyn Lease>, AcquireError> {
        let mut attempt = Attempt::new(name, opts);
        let path = PathBuf::from(name.as_str());
        let file = match Self::try_lock(&path, &mut attempt)? {
            Ok(lease) => return Ok(lease),
            Err(file) => file,
        };
        let outcome = match attempt.deadline() {
            None => wait_on(file, opts.mode, &path, &Stop::Never),
            Some(d) => match wait::timer(d) {
                // The timer interrupts this thread's flock at the deadline.
                Some(_timer) => wait_on(file, opts.mode, &path, &Stop::At(d)),
                None => {
                    let (mode, p) = (opts.mode, path.clone());
                    Waiter::start(move |stop| wait_on(file, mode, &p, stop))?.wait_blocking(Some(d))
                }
            },
        };
        waited(&attempt, outcome)
    }
}

/// A held path lock: the open file. Closing it releases the lock.
#[derive(Debug)]
struct PathLease {
    file: File,
}

impl Lease for PathLease {
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        drop(self.file);
        Box::pin(std::future::ready(Ok(())))
    }

    fn release_blocking(self: Box<Self>) -> Result<(), Error> {
        drop(self.file);
        Ok(())
    }

    fn lost_signal(&self) -> LostSignal {
        LostSignal::never()
    }

    fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Locker;

    /// The lock is on the file itself, exclusive against another open of the same path, and
    /// the file's content is left alone.
    #[test]
    fn locks_the_file_at_the_path_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("script.sh");
        std::fs::write(&path, "#!/bin/sh\necho hi\n").unwrap();
        let name = path.to_str().unwrap();
        let locker = Locker::new(PathLocker::new());
        let held = locker
            .acquire_blocking(name, AcquireOptions::exclusive())
            .unwrap();
        let other = File::open(&path).unwrap();
        // SAFETY: flock on an open descriptor.
        let r = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, -1, "the path's own file is locked");
        assert!(matches!(
            locker.acquire_blocking(name, AcquireOptions::shared().non_blocking()),
            Err(AcquireError::WouldBlock { .. })
        ));
        drop(held);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "#!/bin/sh\necho hi\n"
        );
        // A missing file is created; a directory is locked as it is.
        let fresh = dir.path().join("fresh.lock");
        drop(
            locker
                .acquire_blocking(fresh.to_str().unwrap(), AcquireOptions::exclusive())
                .unwrap(),
        );
        assert!(fresh.is_file());
        drop(
            locker
                .acquire_blocking(dir.path().to_str().unwrap(), AcquireOptions::shared())
                .unwrap(),
        );
    }

    #[test]
    fn a_path_that_cannot_be_opened_is_named() {
        let locker = Locker::new(PathLocker::new());
        let e = locker
            .acquire_blocking("/nonexistent/dir/x.lock", AcquireOptions::exclusive())
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir/x.lock"), "{e}");
    }
}
