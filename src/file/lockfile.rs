//! One lock file: opening it, locking it without waiting, and what an acquisition checks once
//! it holds the lock (the file still linked, a shared request that must give way, the recorded
//! name, the age).

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use super::{dir_error, op, turnstile, FileLease, FileLocker, LockPath, AGE_REFRESH};
use crate::error::Error;
use crate::name::LockName;
use crate::options::Mode;

/// What a lock, once taken, turns out to be.
pub(super) enum Locked {
    /// Ours: the lease.
    Lease(FileLease),
    /// The file was unlinked (collected) after we opened it: start over with the file now at the
    /// path. The lock on the unlinked file has been released.
    Unlinked,
    /// A shared lock taken while an exclusive request waits at the turnstile: it has been
    /// released, and the shared request waits until the exclusive one is through.
    GiveWay,
}

/// Opens `path` read-only, creating it (mode 0644) when missing. O_NONBLOCK keeps a FIFO planted
/// at the path from blocking the open; it has no effect on flock.
pub(super) fn open_c(path: &CStr) -> io::Result<File> {
    let flags = libc::O_RDONLY
        | libc::O_CREAT
        | libc::O_CLOEXEC
        | libc::O_NOFOLLOW
        | libc::O_NOCTTY
        | libc::O_NONBLOCK;
    // SAFETY: open with a valid C string.
    let fd = unsafe { libc::open(path.as_ptr(), flags, 0o644 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly opened descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// What an acquisition reads of a lock file's `fstat(2)`: kept small, since the whole `struct
/// stat` (144 bytes) would be copied on every acquisition.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stat {
    pub mode: libc::mode_t,
    pub nlink: libc::nlink_t,
    pub size: libc::off_t,
    pub mtime: libc::time_t,
}

impl Stat {
    pub(super) fn is_regular(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
}

/// `fstat(2)`.
///
/// On x86-64 Linux, the `fstat` system call itself: glibc's `fstat` makes `newfstatat(fd, "",
/// AT_EMPTY_PATH)`, which costs about 25 ns more for the same answer, and every acquisition makes
/// one. The C library's `fstat` where that call is refused (`ENOSYS`: a seccomp filter).
pub(super) fn fstat(file: &File) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    let stat = |st: &libc::stat| Stat {
        mode: st.st_mode,
        nlink: st.st_nlink,
        size: st.st_size,
        mtime: st.st_mtime,
    };
    #[cfg(all(
        target_os = "linux",
        target_arch = "x86_64",
        target_pointer_width = "64"
    ))]
    {
        // SAFETY: fstat on an open descriptor with a buffer of the kernel's `struct stat`,
        // which on x86-64 is the C library's.
        if unsafe { libc::syscall(libc::SYS_fstat, file.as_raw_fd(), st.as_mut_ptr()) } == 0 {
            // SAFETY: fstat succeeded, so it filled `st`.
            return Ok(stat(unsafe { st.assume_init_ref() }));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOSYS) {
            return Err(e);
        }
    }
    // SAFETY: fstat on an open descriptor with a buffer of the right type.
    if unsafe { libc::fstat(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it filled `st`.
    Ok(stat(unsafe { st.assume_init_ref() }))
}

/// Tries to lock `file` (`LOCK_SH` or `LOCK_EX`) without blocking; false when busy.
pub(super) fn try_flock(file: &File, operation: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on an open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

impl FileLocker {
    /// Opens (creating when missing) the lock file. Read-only suffices for flock, and keeps the
    /// common path as cheap as the raw system calls.
    pub(super) fn open(&self, path: &LockPath) -> Result<File, Error> {
        let Ok(c) = &path.0 else {
            return Err(Error::LockFile {
                op: "open",
                path: path.path(),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        };
        open_c(c).map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => Error::SymlinkAtLockPath { path: path.path() },
            Some(libc::ENOENT) | Some(libc::ENOTDIR) if !self.dir.is_dir() => {
                dir_error(&self.dir, source)
            }
            // The lock file does not exist and cannot be created: the directory does not take
            // new files (`/proc/1`, a read-only mount, no write permission, full).
            Some(
                libc::ENOENT
                | libc::EACCES
                | libc::EPERM
                | libc::EROFS
                | libc::ENOSPC
                | libc::EDQUOT,
            ) if std::fs::symlink_metadata(path.path()).is_err() => dir_error(&self.dir, source),
            Some(libc::EISDIR) => Error::NotARegularFile { path: path.path() },
            _ => Error::LockFile {
                op: "open",
                path: path.path(),
                source,
            },
        })
    }

    pub(super) fn stat(file: &File, path: &LockPath) -> Result<Stat, Error> {
        fstat(file).map_err(|source| Error::LockFile {
            op: "stat",
            path: path.path(),
            source,
        })
    }

    /// Tries to lock `file` in `mode` without blocking; false when busy.
    pub(super) fn try_lock(file: &File, mode: Mode, path: &LockPath) -> Result<bool, Error> {
        try_flock(file, op(mode)).map_err(|source| Error::LockFile {
            op: "lock",
            path: path.path(),
            source,
        })
    }

    /// After locking `file` in `mode`: the lease, or why not.
    ///
    /// [`gc`](Self::gc) unlinks a lock file while holding it exclusively; an acquisition that
    /// opened the file before that and locked it after holds a lock nobody else can see. Such a
    /// file has a link count of 0. Replacing the file by `rename(2)` also drops the old file's
    /// count to 0, so the count alone tells whether the path still names the locked file
    /// (nothing creates other hard links to lock files), and costs no path lookup.
    ///
    /// The same `fstat` shows the turnstile's mark: a shared lock on a marked file is kept only
    /// when no exclusive request waits at the turnstile (see `turnstile.rs`).
    pub(super) fn locked(
        &self,
        name: &LockName,
        file: File,
        path: &LockPath,
        mode: Mode,
    ) -> Result<Locked, Error> {
        let held = Self::stat(&file, path)?;
        if !held.is_regular() {
            return Err(Error::NotARegularFile { path: path.path() });
        }
        if held.nlink == 0 {
            return Ok(Locked::Unlinked);
        }
        if mode == Mode::Shared
            && turnstile::is_marked(&held)
            && turnstile::exclusive_waits(path, &file)
        {
            tracing::trace!(lock = name.as_str(), "giving way to an exclusive request");
            return Ok(Locked::GiveWay);
        }
        if held.size == 0 {
            Self::record_name(path, name);
        } else {
            Self::refresh_age(&file, &held);
        }
        tracing::trace!(lock = name.as_str(), "file lock acquired");
        Ok(Locked::Lease(FileLease { file }))
    }

    /// Keeps a lock file's modification time within [`AGE_REFRESH`] of its last acquisition, so
    /// that [`gc`](Self::gc)'s age is the time since the lock was last used. flock(2) never
    /// changes a file's times; writing them on every acquisition would cost a system call each,
    /// so they are written only once they are an hour off (the `fstat` that the link-count check
    /// makes anyway tells). Best effort: only the file's owner (or a writer) may set its times.
    fn refresh_age(file: &File, held: &Stat) {
        // SAFETY: time(NULL) cannot fail.
        let now = unsafe { libc::time(std::ptr::null_mut()) };
        if now.abs_diff(held.mtime) <= AGE_REFRESH {
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
}
