//! Who holds which lock file (from `/proc/locks`), and collection of stale lock files.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{dir_error, FileLocker};
use crate::error::Error;
use crate::options::{Holder, Mode};

/// Whether a lock is held, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockState {
    /// Nobody holds it.
    Free,
    /// Held by one or more shared holders.
    Shared,
    /// Held by one exclusive holder.
    Exclusive,
}

/// One lock file and its state.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct LockStatus {
    /// The lock name, when the file records it (files created by Rust lockgate do; files
    /// created by Go lockgate are empty). Verified against the file name's hash.
    pub name: Option<String>,
    /// The lock file.
    pub path: PathBuf,
    /// Free, shared or exclusive.
    pub state: LockState,
    /// The holders, by process id.
    pub holders: Vec<Holder>,
    /// How many processes wait for it.
    pub waiters: usize,
}

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
}

#[derive(Debug, Default)]
struct Locks {
    holders: Vec<Holder>,
    waiters: usize,
}

/// Reads `/proc/locks`: flock locks by (device, inode).
fn proc_locks() -> io::Result<HashMap<(u64, u64), Locks>> {
    Ok(parse_proc_locks(&read_snapshot("/proc/locks")?))
}

/// Reads a seq_file in one `read` call. The kernel produces one call's output under its lock
/// list's lock; reading in pieces lets concurrent locking shift entries between the pieces, so
/// that holders are skipped or listed twice.
fn read_snapshot(path: &str) -> io::Result<String> {
    use std::io::Read;
    let mut size = 256 * 1024;
    loop {
        let mut buf = vec![0u8; size];
        let n = std::fs::File::open(path)?.read(&mut buf)?;
        if n < size {
            buf.truncate(n);
            return String::from_utf8(buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
        size *= 4;
    }
}

/// Parses `/proc/locks` lines such as
/// `1: FLOCK  ADVISORY  WRITE 1234 fd:01:56789 0 EOF` and
/// `1: -> FLOCK  ADVISORY  WRITE 1235 fd:01:56789 0 EOF` (a waiter).
fn parse_proc_locks(text: &str) -> HashMap<(u64, u64), Locks> {
    let mut out: HashMap<(u64, u64), Locks> = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace().skip(1).peekable();
        let waiter = fields.peek() == Some(&"->");
        if waiter {
            fields.next();
        }
        let (Some("FLOCK"), Some(_), Some(rw), Some(pid), Some(id)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let mut parts = id.split(':');
        let (Some(maj), Some(min), Some(ino)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(maj), Ok(min), Ok(ino)) = (
            u32::from_str_radix(maj, 16),
            u32::from_str_radix(min, 16),
            ino.parse::<u64>(),
        ) else {
            continue;
        };
        let dev = libc::makedev(maj, min);
        let entry = out.entry((dev, ino)).or_default();
        if waiter {
            entry.waiters += 1;
            continue;
        }
        let mode = if rw == "READ" {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        // A pid of -1 (or 0) means the holder is not visible from this pid namespace.
        match pid.parse::<u32>() {
            Ok(pid) if pid > 0 => entry.holders.push(Holder::process(mode, pid)),
            _ => entry.holders.push(Holder {
                mode,
                pid: None,
                id: None,
                count: None,
            }),
        }
    }
    out
}

/// The holders of the lock file at `path`.
pub(crate) fn holders_of(path: &Path) -> io::Result<Vec<Holder>> {
    let meta = std::fs::symlink_metadata(path)?;
    let mut locks = proc_locks()?;
    Ok(locks
        .remove(&(meta.dev(), meta.ino()))
        .map(|l| l.holders)
        .unwrap_or_default())
}

/// The lock name recorded in a lock file, if it hashes to the file's name.
fn recorded_name(locker: &FileLocker, path: &Path, file_name: &str) -> Option<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    file.take(crate::name::MAX_NAME_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .ok()?;
    let name = String::from_utf8(buf).ok()?;
    (locker.naming.file_name(&name) == file_name).then_some(name)
}

use std::os::unix::fs::OpenOptionsExt;

/// Lock files of the directory: (path, file name), sorted.
fn lock_files(locker: &FileLocker) -> Result<Vec<(PathBuf, String)>, Error> {
    let entries = std::fs::read_dir(&locker.dir).map_err(|e| dir_error(&locker.dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| dir_error(&locker.dir, e))?;
        let Ok(file_name) = entry.file_name().into_string() else {
            continue;
        };
        if locker.naming.matches(&file_name) {
            files.push((entry.path(), file_name));
        }
    }
    files.sort();
    Ok(files)
}

pub(super) fn status(locker: &FileLocker) -> Result<Vec<LockStatus>, Error> {
    let files = lock_files(locker)?;
    let mut locks = proc_locks().map_err(|source| Error::System {
        op: "read /proc/locks",
        source,
    })?;
    let mut out = Vec::with_capacity(files.len());
    for (path, file_name) in files {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.file_type().is_file() {
            continue;
        }
        let l = locks.remove(&(meta.dev(), meta.ino())).unwrap_or_default();
        let state = match l.holders.first().map(|h| h.mode) {
            None => LockState::Free,
            Some(Mode::Shared) => LockState::Shared,
            Some(Mode::Exclusive) => LockState::Exclusive,
        };
        out.push(LockStatus {
            name: recorded_name(locker, &path, &file_name),
            path,
            state,
            holders: l.holders,
            waiters: l.waiters,
        });
    }
    Ok(out)
}

pub(super) fn gc(locker: &FileLocker, older_than: Duration) -> Result<GcReport, Error> {
    let mut report = GcReport::default();
    let now = SystemTime::now();
    for (path, _) in lock_files(locker)? {
        let file = match locker.open_existing(&path) {
            Ok(Some(f)) => f,
            Ok(None) => continue, // gone already
            Err(_) => {
                report.failed += 1;
                continue;
            }
        };
        let modified = file.metadata().and_then(|m| m.modified());
        let age = modified
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        if age < older_than {
            report.too_new += 1;
            continue;
        }
        match FileLocker::try_flock(&file, Mode::Exclusive, &path) {
            Ok(true) => {}
            Ok(false) => {
                report.in_use += 1;
                continue;
            }
            Err(_) => {
                report.failed += 1;
                continue;
            }
        }
        // Holding it exclusively, and it is still the file at the path: unlink it. Anyone who
        // opened it before will find it unlinked after locking it, and retry.
        match same_file(&file, &path) {
            Ok(true) => match std::fs::remove_file(&path) {
                Ok(()) => report.removed += 1,
                Err(_) => report.failed += 1,
            },
            Ok(false) => {}
            Err(_) => report.failed += 1,
        }
    }
    Ok(report)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_locks() {
        let text = "1: FLOCK  ADVISORY  WRITE 1234 fd:01:56789 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 1235 fd:01:56789 0 EOF\n\
                    2: FLOCK  ADVISORY  READ 77 00:2a:5 0 EOF\n\
                    2: FLOCK  ADVISORY  READ -1 00:2a:5 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 99 fd:01:1 0 EOF\n\
                    garbage line\n";
        let m = parse_proc_locks(text);
        let a = &m[&(libc::makedev(0xfd, 1), 56789)];
        assert_eq!(a.holders, vec![Holder::process(Mode::Exclusive, 1234)]);
        assert_eq!(a.waiters, 1);
        let b = &m[&(libc::makedev(0, 0x2a), 5)];
        assert_eq!(b.holders.len(), 2);
        assert_eq!(b.holders[1].pid, None);
        assert!(
            !m.contains_key(&(libc::makedev(0xfd, 1), 1)),
            "POSIX locks are not ours"
        );
    }
}
