//! Collection of stale lock files and turnstiles.

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::lockfile::try_flock;
use super::status::list;
use super::FileLocker;
use crate::error::Error;

/// What [`FileLocker::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct GcReport {
    /// Lock files deleted.
    pub removed: usize,
    /// Lock files kept because they are in use.
    pub in_use: usize,
    /// Lock files kept because they are newer than the age limit.
    pub too_new: usize,
    /// Files that could not be examined or deleted.
    pub failed: usize,
    /// Turnstile files (`<lock file>.turnstile`, where exclusive requests wait) deleted, by the
    /// same rules as lock files.
    pub turnstiles: usize,
}

/// What collection did with one file.
enum Collected {
    Removed,
    InUse,
    TooNew,
    Failed,
    /// Gone already, or replaced meanwhile.
    Gone,
}

pub(super) fn gc(locker: &FileLocker, older_than: Duration) -> Result<GcReport, Error> {
    let mut report = GcReport::default();
    let now = SystemTime::now();
    let listing = list(locker)?;
    for (path, _) in &listing.locks {
        match collect(locker, path, now, older_than) {
            Collected::Removed => report.removed += 1,
            Collected::InUse => report.in_use += 1,
            Collected::TooNew => report.too_new += 1,
            Collected::Failed => report.failed += 1,
            Collected::Gone => {}
        }
    }
    // A turnstile is held only by an exclusive request while it waits, and an acquisition
    // checks after locking a turnstile that it is still linked, as for lock files.
    for path in listing.turnstiles.values() {
        match collect(locker, path, now, older_than) {
            Collected::Removed => report.turnstiles += 1,
            Collected::Failed => report.failed += 1,
            Collected::InUse | Collected::TooNew | Collected::Gone => {}
        }
    }
    Ok(report)
}

/// Deletes the file at `path` if it is at least `older_than` old and, while this process holds
/// it exclusively, still the file at the path. Anyone who opened it before will find it
/// unlinked after locking it, and retry.
fn collect(locker: &FileLocker, path: &Path, now: SystemTime, older_than: Duration) -> Collected {
    let file = match locker.open_existing(path) {
        Ok(Some(f)) => f,
        Ok(None) => return Collected::Gone,
        Err(_) => return Collected::Failed,
    };
    let modified = file.metadata().and_then(|m| m.modified());
    let age = modified
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .unwrap_or_default();
    if age < older_than {
        return Collected::TooNew;
    }
    match try_flock(&file, libc::LOCK_EX) {
        Ok(true) => {}
        Ok(false) => return Collected::InUse,
        Err(_) => return Collected::Failed,
    }
    match same_file(&file, path) {
        Ok(true) => match std::fs::remove_file(path) {
            Ok(()) => Collected::Removed,
            Err(_) => Collected::Failed,
        },
        Ok(false) => Collected::Gone,
        Err(_) => Collected::Failed,
    }
}

/// True when `file` is still linked at `path`.
fn same_file(file: &std::fs::File, path: &Path) -> io::Result<bool> {
    let held = file.metadata()?;
    if held.nlink() == 0 {
        return Ok(false);
    }
    match std::fs::symlink_metadata(path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl FileLocker {
    /// Opens an existing lock file without creating it; `None` if it is gone.
    fn open_existing(&self, path: &Path) -> Result<Option<std::fs::File>, Error> {
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => Ok(Some(f)),
            Ok(_) => Err(Error::NotARegularFile {
                path: path.to_owned(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(Error::SymlinkAtLockPath {
                path: path.to_owned(),
            }),
            Err(source) => Err(Error::LockFile {
                op: "open",
                path: path.to_owned(),
                source,
            }),
        }
    }
}
