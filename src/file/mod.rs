//! Locks for processes on one host: a directory of lock files locked with flock(2).
//!
//! Wire-compatible with Go lockgate's file locker: the lock `NAME` is the file
//! `DIR/<lowercase hex SHA-256 of NAME>` (or, with [`Naming::LegacyMurmur3`], the hex murmur3
//! hash werf uses for its host locks), locked with `flock(LOCK_SH)` or `flock(LOCK_EX)`. A Go
//! process and a Rust process locking the same name in the same directory exclude each other.
//!
//! The module's parts: `lockfile` (opening a lock file and checking it after locking),
//! `acquire` (the acquisition: the attempt without waiting, then the wait), `turnstile` (how an
//! exclusive waiter keeps new shared requests out), `wait` (blocking in flock(2) with timeouts
//! and cancellation), `status` and `gc`.

mod acquire;
mod gc;
mod lockfile;
mod path;
mod paths;
mod status;
mod turnstile;
mod wait;

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::backend::{BoxFuture, Lease, LostSignal};
use crate::error::Error;
use crate::name::LockName;
use crate::options::Mode;

pub use gc::GcReport;
pub use path::PathLocker;
pub use status::{LockState, LockStatus};

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
/// An exclusive request that has to wait is not overtaken by shared requests of lockgate
/// (processes or threads, blocking or async): from the moment it waits, new shared requests
/// wait behind it, and it gets the lock once the shared holders it found have left. Shared
/// requests that come while no exclusive request waits join the holders at once. Among
/// exclusive requests, and between shared requests, the order is the kernel's: when a lock is
/// freed, every blocked waiter is woken and the first to run takes it. flock(1), Go lockgate and
/// other programs that lock the same files exclude and are excluded as always, but take no part
/// in this: their shared holders can still keep an exclusive waiter waiting (and lockgate's
/// shared requests then wait with it). The mechanism, a turnstile file beside the lock file and
/// a mark on the lock file, is in PROTOCOL.md.
///
/// A shared request made while the same thread (or anything it waits for) already holds that
/// lock shared waits behind a waiting exclusive request, which waits for the shared hold: they
/// wait for each other until one times out. Take the lock once and pass the guard around.
#[derive(Debug, Clone)]
pub struct FileLocker {
    dir: PathBuf,
    naming: Naming,
    /// Lock file paths by lock name: hashing a name and building its path is a good part of
    /// the user-space cost of an uncontended acquisition.
    paths: std::sync::Arc<paths::LockPaths>,
}

/// How far (seconds) a lock file's modification time may lag behind its last acquisition.
const AGE_REFRESH: u64 = 3600;

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
        self.paths.get(name, || self.build_path(name))
    }

    /// `f` of the path of `name`, lent rather than shared (see `paths.rs`).
    fn with_path<R>(&self, name: &LockName, f: impl FnOnce(&LockPath) -> R) -> R {
        self.paths.with(name, || self.build_path(name), f)
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
    /// The turnstiles beside lock files (see the type's "Fairness") are collected by the same
    /// rules, never while an exclusive request waits at one, and counted apart in the report.
    ///
    /// # Errors
    ///
    /// [`Error::LockDir`] when the directory cannot be read. Files that cannot be examined are
    /// counted in the report, not reported as errors.
    pub fn gc(&self, older_than: std::time::Duration) -> Result<GcReport, Error> {
        gc::gc(self, older_than)
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

/// A lock file path, as the C string the system calls take.
#[derive(Debug)]
struct LockPath(Result<CString, Vec<u8>>);

impl LockPath {
    fn path(&self) -> PathBuf {
        PathBuf::from(std::ffi::OsStr::from_bytes(self.bytes()))
    }

    fn bytes(&self) -> &[u8] {
        match &self.0 {
            Ok(c) => c.as_bytes(),
            Err(v) => v.as_slice(),
        }
    }

    /// The path of the lock's turnstile: the lock file's path with [`turnstile::SUFFIX`].
    fn turnstile(&self) -> LockPath {
        let mut bytes = self.bytes().to_vec();
        bytes.extend_from_slice(turnstile::SUFFIX.as_bytes());
        LockPath(CString::new(bytes).map_err(|e| e.into_vec()))
    }
}

/// A held file lock: the open lock file. Closing it releases the lock.
#[derive(Debug)]
pub(crate) struct FileLease {
    file: File,
}

impl FileLease {
    /// Closing the lock file releases the lock: the descriptor is ours alone (`O_CLOEXEC`, never
    /// duplicated), so no other copy keeps the lock. A child that was deliberately given the
    /// descriptor (as `lockgate exec` does) co-owns the lock until it closes it too.
    pub(crate) fn unlock(self) -> Result<(), Error> {
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
