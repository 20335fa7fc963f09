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

/// One `FLOCK` line of `/proc/locks`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    dev: u64,
    ino: u64,
    waiting: bool,
    exclusive: bool,
    /// `None` when the holder is not visible from this pid namespace.
    pid: Option<u32>,
}

/// How many times `/proc/locks` is read, at most, for two readings that agree.
const MAX_READINGS: usize = 9;

/// The flock locks and waiters of the files `wanted` accepts (by device and inode), from
/// `/proc/locks`.
///
/// The kernel produces `/proc/locks` one page per `read(2)` (about 70 entries), under its lock
/// list's lock; for the next page it starts again at the same *position* in the list. A lock
/// freed or taken elsewhere on the host between two pages shifts the entries after it, so that
/// one entry is skipped or listed twice. The ordinal column cannot tell: it is that position,
/// contiguous by construction. So the file is read whole, repeatedly, each reading starting with
/// a read of another size (see below):
///
/// - a reading that lists an impossible state for a wanted file (an exclusive holder next to
///   another holder: a duplicated entry) is corrupt;
/// - two consecutive sound readings that agree on the entries of the wanted files are the
///   answer. A shift corrupts one reading in one place; the next reading differs unless the
///   same shift happens again at the same place. Locking elsewhere on the host does not prevent
///   agreement, since only the wanted entries are compared;
/// - if the wanted entries keep changing through [`MAX_READINGS`] readings, each entry gets the
///   count that most readings gave it (the median), so that one skipped or duplicated entry in
///   a few readings is outvoted.
fn proc_locks(wanted: impl Fn(u64, u64) -> bool) -> io::Result<HashMap<(u64, u64), Locks>> {
    let mut buf = Vec::new();
    let mut readings: Vec<Vec<Entry>> = Vec::with_capacity(MAX_READINGS);
    let mut previous_sound: Option<usize> = None;
    // Where the kernel's passes start and end follows the sizes asked for: a pass stops once it
    // has produced what the read asked for, or a page. The first read of each reading asks for
    // a different amount, so that the passes of successive readings end at different entries and
    // a shift cannot corrupt the same entry in every reading.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    for i in 0..MAX_READINGS {
        let first = 1 + (seed + i * 1031) % 4096;
        read_whole("/proc/locks", first, &mut buf)?;
        let mut entries: Vec<Entry> = parse_proc_locks(&String::from_utf8_lossy(&buf))
            .filter(|e| wanted(e.dev, e.ino))
            .collect();
        entries.sort_unstable();
        let sound = is_possible(&entries);
        if sound && previous_sound.is_some_and(|p| readings[p] == entries) {
            return Ok(group(entries));
        }
        previous_sound = sound.then_some(i);
        readings.push(entries);
    }
    tracing::debug!(
        readings = MAX_READINGS,
        "the lock list kept changing while it was read; showing each lock as most readings did"
    );
    Ok(group(vote(&readings)))
}

/// False when `entries` (sorted) show a state flock cannot be in: a file with an exclusive
/// holder and any other holder.
fn is_possible(entries: &[Entry]) -> bool {
    entries
        .chunk_by(|a, b| (a.dev, a.ino) == (b.dev, b.ino))
        .all(|file| {
            let holders = file.iter().filter(|e| !e.waiting);
            let exclusive = holders.clone().filter(|e| e.exclusive).count();
            exclusive == 0 || holders.count() == 1
        })
}

/// Every entry as many times as the median reading has it, then each file's state made one
/// that flock can be in (a duplicate or a shift can win the vote on a host where locks change
/// on every reading).
fn vote(readings: &[Vec<Entry>]) -> Vec<Entry> {
    let mut counts: std::collections::BTreeMap<&Entry, Vec<usize>> = Default::default();
    for (i, reading) in readings.iter().enumerate() {
        for run in reading.chunk_by(|a, b| a == b) {
            let c = counts
                .entry(&run[0])
                .or_insert_with(|| vec![0; readings.len()]);
            c[i] = run.len();
        }
    }
    // Entries sorted (the map's order), each with its median count and in how many readings it
    // appeared at all.
    let voted: Vec<(Entry, usize, usize)> = counts
        .into_iter()
        .map(|(entry, mut c)| {
            let support = c.iter().filter(|&&n| n > 0).count();
            c.sort_unstable();
            (entry.clone(), c[c.len() / 2], support)
        })
        .filter(|(_, n, _)| *n > 0)
        .collect();
    let mut out = Vec::new();
    for file in voted.chunk_by(|a, b| (a.0.dev, a.0.ino) == (b.0.dev, b.0.ino)) {
        let holder = |v: &&(Entry, usize, usize)| !v.0.waiting;
        let exclusive = file
            .iter()
            .filter(holder)
            .filter(|v| v.0.exclusive)
            .max_by_key(|v| v.2);
        let others = file
            .iter()
            .filter(holder)
            .filter(|v| exclusive.is_none_or(|x| v.0 != x.0))
            .map(|v| v.2)
            .max();
        for (entry, n, _) in file.iter().filter(|v| v.0.waiting) {
            out.extend(std::iter::repeat_n(entry.clone(), *n));
        }
        match (exclusive, others) {
            // An exclusive holder is alone, and listed once.
            (Some(x), o) if o.is_none_or(|o| x.2 >= o) => out.push(x.0.clone()),
            _ => {
                for (entry, n, _) in file.iter().filter(holder).filter(|v| !v.0.exclusive) {
                    out.extend(std::iter::repeat_n(entry.clone(), *n));
                }
            }
        }
    }
    out.sort_unstable();
    out
}

/// Reads `path` to its end into `buf`: first `first` bytes, then in large reads (each `read(2)`
/// of a seq_file is one pass of the kernel's iterator; fewer passes, fewer places for entries to
/// shift).
fn read_whole(path: &str, first: usize, buf: &mut Vec<u8>) -> io::Result<()> {
    use std::io::Read;
    const CHUNK: usize = 64 * 1024;
    buf.clear();
    let mut file = std::fs::File::open(path)?;
    let mut want = first.max(1);
    loop {
        let len = buf.len();
        buf.resize(len + want, 0);
        match file.read(&mut buf[len..]) {
            Ok(0) => {
                buf.truncate(len);
                return Ok(());
            }
            Ok(n) => buf.truncate(len + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(len),
            Err(e) => return Err(e),
        }
        want = CHUNK;
    }
}

/// Entries by file, holders in the order they were listed.
fn group(entries: Vec<Entry>) -> HashMap<(u64, u64), Locks> {
    let mut out: HashMap<(u64, u64), Locks> = HashMap::new();
    let mut processes: HashMap<u32, Holder> = HashMap::new();
    for e in entries {
        let locks = out.entry((e.dev, e.ino)).or_default();
        if e.waiting {
            locks.waiters += 1;
            continue;
        }
        let mode = if e.exclusive {
            Mode::Exclusive
        } else {
            Mode::Shared
        };
        locks.holders.push(match e.pid {
            Some(pid) => {
                let mut h = processes
                    .entry(pid)
                    .or_insert_with(|| process_holder(mode, pid))
                    .clone();
                h.mode = mode;
                h
            }
            None => Holder::new(mode),
        });
    }
    out
}

/// The holder with process id `pid`, with its command line and its user when /proc shows them.
/// (When it took the lock is not recorded anywhere for flock locks.)
fn process_holder(mode: Mode, pid: u32) -> Holder {
    let mut h = Holder::process(mode, pid);
    if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.is_empty() {
            h.description = Some(args.join(" "));
        }
    }
    if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}")) {
        h.user = Some(crate::host::user_name(meta.uid()));
    }
    h
}

/// Parses `/proc/locks` lines such as
/// `1: FLOCK  ADVISORY  WRITE 1234 fd:01:56789 0 EOF` and
/// `1: -> FLOCK  ADVISORY  WRITE 1235 fd:01:56789 0 EOF` (a waiter); other lines are skipped.
fn parse_proc_locks(text: &str) -> impl Iterator<Item = Entry> + '_ {
    text.lines().filter_map(|line| {
        let mut fields = line.split_whitespace().skip(1).peekable();
        let waiting = fields.peek() == Some(&"->");
        if waiting {
            fields.next();
        }
        let (Some("FLOCK"), Some(_), Some(rw), Some(pid), Some(id)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return None;
        };
        let mut parts = id.split(':');
        let (Some(maj), Some(min), Some(ino)) = (parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        let (Ok(maj), Ok(min), Ok(ino)) = (
            u32::from_str_radix(maj, 16),
            u32::from_str_radix(min, 16),
            ino.parse::<u64>(),
        ) else {
            return None;
        };
        Some(Entry {
            dev: libc::makedev(maj, min),
            ino,
            waiting,
            exclusive: rw != "READ",
            // A pid of -1 (or 0) means the holder is not visible from this pid namespace.
            pid: pid.parse::<u32>().ok().filter(|&p| p > 0),
        })
    })
}

/// The holders of the lock file at `path`.
pub(crate) fn holders_of(path: &Path) -> io::Result<Vec<Holder>> {
    let meta = std::fs::symlink_metadata(path)?;
    let id = (meta.dev(), meta.ino());
    let mut locks = proc_locks(|dev, ino| (dev, ino) == id)?;
    Ok(locks.remove(&id).map(|l| l.holders).unwrap_or_default())
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
    let mut files = Vec::new();
    for (path, file_name) in lock_files(locker)? {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // collected meanwhile
        };
        if meta.file_type().is_file() {
            files.push((path, file_name, (meta.dev(), meta.ino())));
        }
    }
    let ids: std::collections::HashSet<(u64, u64)> = files.iter().map(|f| f.2).collect();
    let mut locks = if ids.is_empty() {
        HashMap::new()
    } else {
        proc_locks(|dev, ino| ids.contains(&(dev, ino))).map_err(|source| Error::System {
            op: "read /proc/locks",
            source,
        })?
    };
    let mut out = Vec::with_capacity(files.len());
    for (path, file_name, id) in files {
        let l = locks.remove(&id).unwrap_or_default();
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
        match FileLocker::try_flock(&file, Mode::Exclusive) {
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
mod tests;
