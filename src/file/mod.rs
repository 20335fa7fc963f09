//! Locks for processes on one host: a directory of lock files locked with flock(2).
//!
//! Wire-compatible with Go lockgate's file locker: the lock `NAME` is the file
//! `DIR/<lowercase hex SHA-256 of NAME>` (or, with [`Naming::LegacyMurmur3`], the hex murmur3
//! hash werf uses for its host locks), locked with `flock(LOCK_SH)` or `flock(LOCK_EX)`. A Go
//! process and a Rust process locking the same name in the same directory exclude each other.

mod status;
mod wait;

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::backend::{Backend, BoxFuture, Lease, LostSignal};
use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::{AcquireOptions, Mode, WaitInfo};

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
            Naming::Sha256 => hex(&Sha256::digest(name.as_bytes())),
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

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
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
}

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
        Ok(Self { dir, naming })
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

    /// Opens (creating when missing) the lock file at `path`.
    fn open(&self, path: &Path) -> Result<File, Error> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::LockFile {
            op: "open",
            path: path.to_owned(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // O_NONBLOCK keeps a FIFO planted at the path from blocking the open; it has no effect
        // on flock. O_RDWR lets us record the lock name in a new file; read-only suffices to
        // lock a file someone else created.
        let base =
            libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK;
        let mut fd = unsafe { libc::open(c.as_ptr(), base | libc::O_RDWR, 0o644 as libc::c_uint) };
        if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EACCES) {
            fd = unsafe { libc::open(c.as_ptr(), base | libc::O_RDONLY, 0o644 as libc::c_uint) };
        }
        if fd < 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::ELOOP) => Error::SymlinkAtLockPath {
                    path: path.to_owned(),
                },
                Some(libc::ENOENT) | Some(libc::ENOTDIR) if !self.dir.is_dir() => {
                    dir_error(&self.dir, source)
                }
                Some(libc::EISDIR) => Error::NotARegularFile {
                    path: path.to_owned(),
                },
                _ => Error::LockFile {
                    op: "open",
                    path: path.to_owned(),
                    source,
                },
            });
        }
        // SAFETY: fd is a freshly opened descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let meta = file.metadata().map_err(|source| Error::LockFile {
            op: "stat",
            path: path.to_owned(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(Error::NotARegularFile {
                path: path.to_owned(),
            });
        }
        Ok(file)
    }

    /// After locking: true when `file` is still the file at `path`. [`gc`](Self::gc) unlinks a
    /// lock file while holding it exclusively; an acquisition that opened the file before that
    /// and locked it after holds a lock nobody else can see, and must start over.
    fn still_linked(file: &File, path: &Path) -> Result<bool, Error> {
        let held = file.metadata().map_err(|source| Error::LockFile {
            op: "stat",
            path: path.to_owned(),
            source,
        })?;
        if held.nlink() == 0 {
            return Ok(false);
        }
        match std::fs::symlink_metadata(path) {
            Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::LockFile {
                op: "stat",
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Records the lock name in an empty lock file, so that `status` can show names. Best effort:
    /// a read-only descriptor or a full disk only costs the name in status output.
    fn record_name(file: &File, name: &LockName) {
        if matches!(file.metadata(), Ok(m) if m.len() == 0) {
            let _ = file.write_at(name.as_str().as_bytes(), 0);
        }
    }

    /// Tries to lock `file` without blocking; false when busy.
    fn try_flock(file: &File, mode: Mode, path: &Path) -> Result<bool, Error> {
        // SAFETY: flock on an open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), op(mode) | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let source = io::Error::last_os_error();
        if source.kind() == io::ErrorKind::WouldBlock {
            Ok(false)
        } else {
            Err(Error::LockFile {
                op: "lock",
                path: path.to_owned(),
                source,
            })
        }
    }

    /// Opens the lock file and tries to lock it once. `Ok(Err(file))` means busy.
    fn attempt(&self, path: &Path, mode: Mode) -> Result<Result<File, File>, Error> {
        let file = self.open(path)?;
        if Self::try_flock(&file, mode, path)? {
            Ok(Ok(file))
        } else {
            Ok(Err(file))
        }
    }

    fn busy(&self, name: &LockName, opts: &AcquireOptions, path: &Path, notified: &mut bool) {
        if !*notified {
            *notified = true;
            let holders = status::holders_of(path).unwrap_or_default();
            opts.notify_wait(&WaitInfo {
                name: name.as_str(),
                mode: opts.mode,
                holders,
            });
        }
    }

    fn granted(&self, name: &LockName, file: File, path: PathBuf) -> Box<dyn Lease> {
        Self::record_name(&file, name);
        tracing::debug!(lock = name.as_str(), path = %path.display(), "file lock acquired");
        Box::new(FileLease { file, path })
    }

    fn timed_out(name: &LockName, start: Instant) -> AcquireError {
        AcquireError::TimedOut {
            name: name.as_str().to_owned(),
            waited: start.elapsed(),
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

    /// Deletes lock files that are unused and whose last modification is older than
    /// `older_than`. A file is deleted only while this process holds it exclusively, and every
    /// acquisition checks after locking that its file is still linked, so collection never
    /// breaks a lock taken by lockgate (Rust, or Go lockgate from v0.2).
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
mod tests {
    use super::*;

    /// Vectors produced by Go lockgate v0.1.1 (`util.Sha256Hash`, `util.MurmurHash`).
    #[test]
    fn file_names_match_go_lockgate() {
        for (name, murmur, sha) in [
            (
                "a",
                "3c2569b2",
                "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb",
            ),
            (
                "host/lock",
                "4ac8b4c9",
                "6c944066d0d3947e1c59f56cbbed65cf103c250b17d14ce77ce5baeacca1dd49",
            ),
            (
                "über",
                "a006a72c",
                "b51c854170449c382397a108bc58403e78fb72c80a1b2b0674b30ea3b88a19f0",
            ),
        ] {
            assert_eq!(Naming::LegacyMurmur3.file_name(name), murmur, "{name}");
            assert_eq!(Naming::Sha256.file_name(name), sha, "{name}");
            assert!(Naming::LegacyMurmur3.matches(murmur));
        }
        // Go prints the murmur3 sum with %x: no leading zeros.
        assert_eq!(Naming::LegacyMurmur3.file_name("lock-163"), "1d532d1");
        assert!(Naming::Sha256.matches(&Naming::Sha256.file_name("x")));
        assert!(!Naming::Sha256.matches("README"));
    }
}

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
            let start = Instant::now();
            let deadline = opts.wait.deadline(start);
            let path = self.lock_path(name);
            let mut notified = false;
            loop {
                let file = match self.attempt(&path, opts.mode)? {
                    Ok(file) => file,
                    Err(_) if opts.wait.is_non_blocking() => {
                        return Err(AcquireError::WouldBlock {
                            name: name.as_str().to_owned(),
                        })
                    }
                    Err(file) => {
                        self.busy(name, opts, &path, &mut notified);
                        let waiter = Waiter::start(file, op(opts.mode))?;
                        match waiter.wait(deadline).await {
                            Ok(Some(file)) => file,
                            Ok(None) => return Err(Self::timed_out(name, start)),
                            Err(source) => {
                                return Err(Error::LockFile {
                                    op: "lock",
                                    path,
                                    source,
                                }
                                .into())
                            }
                        }
                    }
                };
                if Self::still_linked(&file, &path)? {
                    return Ok(self.granted(name, file, path));
                }
                tracing::debug!(path = %path.display(), "lock file was collected while we locked it; retrying");
            }
        })
    }

    fn acquire_blocking(
        &self,
        name: &LockName,
        opts: &AcquireOptions,
    ) -> Result<Box<dyn Lease>, AcquireError> {
        let start = Instant::now();
        let deadline = opts.wait.deadline(start);
        let path = self.lock_path(name);
        let mut notified = false;
        loop {
            let file = match self.attempt(&path, opts.mode)? {
                Ok(file) => file,
                Err(_) if opts.wait.is_non_blocking() => {
                    return Err(AcquireError::WouldBlock {
                        name: name.as_str().to_owned(),
                    })
                }
                Err(file) => {
                    self.busy(name, opts, &path, &mut notified);
                    let waiter = Waiter::start(file, op(opts.mode))?;
                    match waiter.wait_blocking(deadline) {
                        Ok(Some(file)) => file,
                        Ok(None) => return Err(Self::timed_out(name, start)),
                        Err(source) => {
                            return Err(Error::LockFile {
                                op: "lock",
                                path,
                                source,
                            }
                            .into())
                        }
                    }
                }
            };
            if Self::still_linked(&file, &path)? {
                return Ok(self.granted(name, file, path));
            }
            tracing::debug!(path = %path.display(), "lock file was collected while we locked it; retrying");
        }
    }
}

/// A held file lock: the open lock file. Closing it releases the lock.
#[derive(Debug)]
struct FileLease {
    file: File,
    path: PathBuf,
}

impl FileLease {
    fn unlock(self) -> Result<(), Error> {
        // Unlock explicitly so that an error is reported (and the lock is freed even if a child
        // process inherited the descriptor), then close.
        // SAFETY: flock on our open descriptor.
        if unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) } != 0 {
            return Err(Error::LockFile {
                op: "unlock",
                path: self.path,
                source: io::Error::last_os_error(),
            });
        }
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
