//! Locks for processes on one host: a directory of lock files locked with flock(2).
//!
//! Wire-compatible with Go lockgate's file locker: the lock `NAME` is the file
//! `DIR/<lowercase hex SHA-256 of NAME>` (or, with [`Naming::LegacyMurmur3`], the hex murmur3
//! hash werf uses for its host locks), locked with `flock(LOCK_SH)` or `flock(LOCK_EX)`. A Go
//! process and a Rust process locking the same name in the same directory exclude each other.

mod path;
mod status;
mod wait;

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::acquire::Attempt;
use crate::backend::{Backend, BoxFuture, Lease, LostSignal};
use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::{AcquireOptions, Mode};

pub use path::PathLocker;
pub use status::{GcReport, LockState, LockStatus};
use wait::Waiter;

/// How lock names map to file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Naming {
    /// Lowercase hex SHA-256 of the name (64 characters): Go lockgate's default.
    #[default]
    Sha256,
    /// Lowercase hex murmur3 (32-bit, seed 0) of the name, without leading zeros: what werf's
    /// host locks use (Go lockgate's `LegacyHashFunction`).
    LegacyMurmur3,
}

impl Naming {
    /// The file name of the lock `name`.
    ///
    /// ```
    /// use lockgate::file::Naming;
    /// assert_eq!(
    ///     Naming::Sha256.file_name("myresource"),
    ///     "e669810984559577fa8f9f60982d59f4058f3c88ecb22ce9d0bf81e5642a99c0"
    /// );
    /// assert_eq!(Naming::LegacyMurmur3.file_name("myresource"), "e1166248");
    /// assert_eq!(Naming::LegacyMurmur3.file_name("lock-2"), "c91edf2"); // no zero padding
    /// ```
    pub fn file_name(self, name: &str) -> String {
        match self {
            Naming::Sha256 => crate::hex(&Sha256::digest(name.as_bytes())),
            Naming::LegacyMurmur3 => {
                let h = murmur3::murmur3_32(&mut io::Cursor::new(name.as_bytes()), 0)
                    .expect("reading from memory cannot fail");
                format!("{h:x}")
            }
        }
    }

    /// True when `file_name` could have been produced by this naming.
    fn matches(self, file_name: &str) -> bool {
        let hexdigits = file_name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match self {
            Naming::Sha256 => file_name.len() == 64 && hexdigits,
            Naming::LegacyMurmur3 => (1..=8).contains(&file_name.len()) && hexdigits,
        }
    }
}

/// A locker over a directory of lock files, for processes on one host.
///
/// Every acquisition opens the lock file anew (its own open file description), so acquisitions
/// exclude each other in one process exactly as they do across processes. A blocked acquisition
/// is woken by the kernel when the lock is freed; there is no polling. Lock files are opened
/// with `O_CLOEXEC` and `O_NOFOLLOW`, created with mode 0644, and never deleted except by
/// [`gc`](Self::gc).
///
/// A lock held by a process is freed by the kernel when the process exits, however it exits.
///
/// # Fairness
///
/// The kernel's: when a lock is freed, every blocked waiter is woken and the first to run takes
/// it. Shared holders can overlap indefinitely and so keep an exclusive waiter waiting.
#[derive(Debug, Clone)]
pub struct FileLocker {
    dir: PathBuf,
    naming: Naming,
    /// Lock file paths by lock name: hashing a name and building its path is a good part of
    /// the user-space cost of an uncontended acquisition.
    paths: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<LockPath>>>,
    >,
}

/// How far (seconds) a lock file's modification time may lag behind its last acquisition.
const AGE_REFRESH: u64 = 3600;

/// How many lock file paths a locker remembers before it starts afresh.
const PATH_CACHE: usize = 4096;

impl FileLocker {
    /// A locker over `dir`, which is created (mode 0755, with its parents) when missing.
    ///
    /// # Errors
    ///
    /// [`Error::LockDir`] when the directory cannot be created or read;
    /// [`Error::NotADirectory`] when `dir` is something else.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        Self::with_naming(dir, Naming::default())
    }

    /// A locker over `dir` with the given file naming.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn with_naming(dir: impl Into<PathBuf>, naming: Naming) -> Result<Self, Error> {
        let dir = dir.into();
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::NotADirectory { path: dir }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(&dir)
                    .map_err(|source| dir_error(&dir, source))?;
            }
            Err(source) => return Err(dir_error(&dir, source)),
        }
        Ok(Self {
            dir,
            naming,
            paths: Default::default(),
        })
    }

    /// The lock directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file naming in use.
    pub fn naming(&self) -> Naming {
        self.naming
    }

    /// The path of the lock file of `name`.
    pub fn lock_path(&self, name: &LockName) -> PathBuf {
        self.dir.join(self.naming.file_name(name.as_str()))
    }

    fn c_path(&self, name: &LockName) -> std::sync::Arc<LockPath> {
        let mut paths = self
            .paths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = paths.get(name.as_str()) {
            return std::sync::Arc::clone(p);
        }
        if paths.len() >= PATH_CACHE {
            paths.clear();
        }
        let p = std::sync::Arc::new(self.build_path(name));
        paths.insert(name.as_str().to_owned(), std::sync::Arc::clone(&p));
        p
    }

    fn build_path(&self, name: &LockName) -> LockPath {
        let dir = self.dir.as_os_str().as_bytes();
        let file = self.naming.file_name(name.as_str());
        let mut bytes = Vec::with_capacity(dir.len() + 1 + file.len() + 1);
        bytes.extend_from_slice(dir);
        if !dir.ends_with(b"/") {
            bytes.push(b'/');
        }
        bytes.extend_from_slice(file.as_bytes());
        // A path with a NUL byte cannot name a file: report it when opening.
        LockPath(CString::new(bytes).map_err(|e| e.into_vec()))
    }

    /// Opens (creating when missing) the lock file. Read-only suffices for flock, and keeps the
    /// common path as cheap as the raw system calls.
    fn open(&self, path: &LockPath) -> Result<File, Error> {
        let Ok(c) = &path.0 else {
            return Err(Error::LockFile {
                op: "open",
                path: path.path(),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        };
        // O_NONBLOCK keeps a FIFO planted at the path from blocking the open; it has no effect
        // on flock.
        let flags = libc::O_RDONLY
            | libc::O_CREAT
            | libc::O_CLOEXEC
            | libc::O_NOFOLLOW
            | libc::O_NOCTTY
            | libc::O_NONBLOCK;
        // SAFETY: open with a valid C string.
        let fd = unsafe { libc::open(c.as_ptr(), flags, 0o644 as libc::c_uint) };
        if fd < 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::ELOOP) => Error::SymlinkAtLockPath { path: path.path() },
                Some(libc::ENOENT) | Some(libc::ENOTDIR) if !self.dir.is_dir() => {
                    dir_error(&self.dir, source)
                }
                // The lock file does not exist and cannot be created: the directory does not
                // take new files (`/proc/1`, a read-only mount, no write permission, full).
                Some(
                    libc::ENOENT
                    | libc::EACCES
                    | libc::EPERM
                    | libc::EROFS
                    | libc::ENOSPC
                    | libc::EDQUOT,
                ) if std::fs::symlink_metadata(path.path()).is_err() => {
                    dir_error(&self.dir, source)
                }
                Some(libc::EISDIR) => Error::NotARegularFile { path: path.path() },
                _ => Error::LockFile {
                    op: "open",
                    path: path.path(),
                    source,
                },
            });
        }
        // SAFETY: fd is a freshly opened descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    fn stat(file: &File, path: &LockPath) -> Result<libc::stat, Error> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat on an open descriptor with a buffer of the right type.
        if unsafe { libc::fstat(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(Error::LockFile {
                op: "stat",
                path: path.path(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: fstat succeeded, so it filled `st`.
        Ok(unsafe { st.assume_init() })
    }

    fn is_regular(st: &libc::stat) -> bool {
        st.st_mode & libc::S_IFMT == libc::S_IFREG
    }

    /// After locking `file`: the lease, or `None` when the file has been unlinked and the
    /// acquisition must start over.
    ///
    /// [`gc`](Self::gc) unlinks a lock file while holding it exclusively; an acquisition that
    /// opened the file before that and locked it after holds a lock nobody else can see. Such a
    /// file has a link count of 0. Replacing the file by `rename(2)` also drops the old file's
    /// count to 0, so the count alone tells whether the path still names the locked file
    /// (nothing creates other hard links to lock files), and costs no path lookup.
    fn locked(
        &self,
        name: &LockName,
        file: File,
        path: &LockPath,
    ) -> Result<Option<Box<dyn Lease>>, Error> {
        let held = Self::stat(&file, path)?;
        if !Self::is_regular(&held) {
            return Err(Error::NotARegularFile { path: path.path() });
        }
        if held.st_nlink == 0 {
            return Ok(None);
        }
        if held.st_size == 0 {
            Self::record_name(path, name);
        } else {
            Self::refresh_age(&file, &held);
        }
        tracing::trace!(lock = name.as_str(), "file lock acquired");
        Ok(Some(Box::new(FileLease { file })))
    }

    /// Keeps a lock file's modification time within [`AGE_REFRESH`] of its last acquisition, so
    /// that [`gc`](Self::gc)'s age is the time since the lock was last used. flock(2) never
    /// changes a file's times; writing them on every acquisition would cost a system call each,
    /// so they are written only once they are an hour off (the `fstat` that the link-count check
    /// makes anyway tells). Best effort: only the file's owner (or a writer) may set its times.
    fn refresh_age(file: &File, held: &libc::stat) {
        // SAFETY: time(NULL) cannot fail.
        let now = unsafe { libc::time(std::ptr::null_mut()) };
        if now.abs_diff(held.st_mtime) <= AGE_REFRESH {
            return;
        }
        // SAFETY: futimens on an open descriptor; NULL sets both times to now.
        if unsafe { libc::futimens(file.as_raw_fd(), std::ptr::null()) } != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "cannot refresh a lock file's age");
        }
    }

    /// Records the lock name in a new (empty) lock file, so that `status` can show names. Best
    /// effort: without write permission the name is only missing from status output.
    fn record_name(path: &LockPath, name: &LockName) {
        let written = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path.path())
            .and_then(|f| f.write_at(name.as_str().as_bytes(), 0));
        if let Err(e) = written {
            tracing::debug!(lock = name.as_str(), error = %e, "cannot record the lock name");
        }
    }

    /// Tries to lock `file` without blocking; false when busy.
    fn try_flock(file: &File, mode: Mode) -> io::Result<bool> {
        // SAFETY: flock on an open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), op(mode) | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(false)
        } else {
            Err(e)
        }
    }

    /// Tries to take the lock without waiting, starting over while the file was collected under
    /// us. `Ok(Err(file))`: busy, and the acquisition may wait on `file`.
    fn try_acquire(
        &self,
        path: &LockPath,
        attempt: &mut Attempt<'_>,
    ) -> Result<Result<Box<dyn Lease>, File>, AcquireError> {
        loop {
            let file = self.open(path)?;
            let locked =
                Self::try_flock(&file, attempt.mode()).map_err(|source| Error::LockFile {
                    op: "lock",
                    path: path.path(),
                    source,
                })?;
            if locked {
                match self.locked(attempt.name, file, path)? {
                    Some(lease) => return Ok(Ok(lease)),
                    None => continue,
                }
            }
            if !attempt.may_wait() {
                return Err(attempt.busy());
            }
            // Never wait on something that is not a lock file (a FIFO, a device).
            if !Self::is_regular(&Self::stat(&file, path)?) {
                return Err(Error::NotARegularFile { path: path.path() }.into());
            }
            attempt.waiting(|| status::holders_of(&path.path()).unwrap_or_default());
            return Ok(Err(file));
        }
    }

    fn wait_error(
        attempt: &Attempt<'_>,
        path: &LockPath,
        r: io::Result<Option<File>>,
    ) -> Result<File, AcquireError> {
        match r {
            Ok(Some(file)) => Ok(file),
            Ok(None) => Err(attempt.busy()),
            Err(source) => Err(Error::LockFile {
                op: "lock",
                path: path.path(),
                source,
            }
            .into()),
        }
    }

    /// The state of every lock file in the directory.
    ///
    /// # Errors
    ///
    /// [`Error::LockDir`] when the directory cannot be read.
    pub fn status(&self) -> Result<Vec<LockStatus>, Error> {
        status::status(self)
    }

    /// Deletes lock files that nobody holds and that were not modified for `older_than`: not
    /// acquired by Rust lockgate for that long (acquisitions keep the modification time within
    /// an hour of the last one; Go lockgate's do not touch it, nor do those of users who may not
    /// set the file's times). A file is deleted only while this process holds it exclusively,
    /// and every acquisition checks after locking that its file is still linked, so collection
    /// never breaks a lock taken by lockgate (Rust, or Go lockgate from v0.2), whatever the age.
    ///
    /// # Errors
    ///
    /// [`Error::LockDir`] when the directory cannot be read. Files that cannot be examined are
    /// counted in the report, not reported as errors.
    pub fn gc(&self, older_than: std::time::Duration) -> Result<GcReport, Error> {
        status::gc(self, older_than)
    }
}

#[cfg(test)]
mod tests;

fn dir_error(dir: &Path, source: io::Error) -> Error {
    Error::LockDir {
        path: dir.to_owned(),
        source,
    }
}

fn op(mode: Mode) -> libc::c_int {
    match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    }
}

impl Backend for FileLocker {
    fn acquire<'a>(
        &'a self,
        name: &'a LockName,
        opts: &'a AcquireOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Lease>, AcquireError>> {
        Box::pin(async move {
            let mut attempt = Attempt::new(name, opts);
            let path = self.c_path(name);
            loop {
                let file = match self.try_acquire(&path, &mut attempt)? {
                    Ok(lease) => return Ok(lease),
                    Err(file) => file,
                };
                let waited = Waiter::start(file, op(opts.mode))?
                    .wait(attempt.deadline())
                    .await;
                let file = Self::wait_error(&attempt, &path, waited)?;
                if let Some(lease) = self.locked(name, file, &path)? {
                    return Ok(lease);
                }
            }
        })
    }

    fn acquire_blocking(
        &self,
        name: &LockName,
        opts: &AcquireOptions,
    ) -> Result<Box<dyn Lease>, AcquireError> {
        let mut attempt = Attempt::new(name, opts);
        let deadline = attempt.deadline();
        let path = self.c_path(name);
        loop {
            let file = match self.try_acquire(&path, &mut attempt)? {
                Ok(lease) => return Ok(lease),
                Err(file) => file,
            };
            // Block right here (no hop through another thread at the grant): without a deadline
            // nothing interrupts the wait; with one, a timer for this thread does.
            let waited = match deadline {
                None => wait::flock_blocking(file, op(opts.mode)),
                Some(d) => match wait::flock_until(file, op(opts.mode), d) {
                    Ok(waited) => waited,
                    // No timer available: wait through a thread of its own.
                    Err(file) => Waiter::start(file, op(opts.mode))?.wait_blocking(deadline),
                },
            };
            let file = Self::wait_error(&attempt, &path, waited)?;
            if let Some(lease) = self.locked(name, file, &path)? {
                return Ok(lease);
            }
        }
    }
}

/// A lock file path, as the C string the system calls take.
#[derive(Debug)]
struct LockPath(Result<CString, Vec<u8>>);

impl LockPath {
    fn path(&self) -> PathBuf {
        let bytes = match &self.0 {
            Ok(c) => c.as_bytes(),
            Err(v) => v.as_slice(),
        };
        PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
    }
}

/// A held file lock: the open lock file. Closing it releases the lock.
#[derive(Debug)]
struct FileLease {
    file: File,
}

impl FileLease {
    /// Closing the lock file releases the lock: the descriptor is ours alone (`O_CLOEXEC`, never
    /// duplicated), so no other copy keeps the lock. A child that was deliberately given the
    /// descriptor (as `lockgate exec` does) co-owns the lock until it closes it too.
    fn unlock(self) -> Result<(), Error> {
        drop(self.file);
        Ok(())
    }
}

impl Lease for FileLease {
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        let r = self.unlock();
        Box::pin(std::future::ready(r))
    }

    fn release_blocking(self: Box<Self>) -> Result<(), Error> {
        self.unlock()
    }

    fn lost_signal(&self) -> LostSignal {
        LostSignal::never()
    }

    fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
}
