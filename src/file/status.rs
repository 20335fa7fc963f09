//! Who holds which lock file, and who waits for it (from `/proc/locks`).

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
    /// How many requests wait for it: in flock(2) on the lock file, and at its turnstile
    /// (lockgate's shared requests giving way to an exclusive one, and exclusive requests
    /// behind another).
    pub waiters: usize,
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
    use std::os::unix::fs::OpenOptionsExt;
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

/// The lock files of a directory, and the turnstiles beside them.
pub(super) struct Listing {
    /// Lock files: (path, file name), sorted.
    pub locks: Vec<(PathBuf, String)>,
    /// Turnstiles: path by the file name of their lock file (which may not exist).
    pub turnstiles: std::collections::BTreeMap<String, PathBuf>,
}

/// Lists the lock files of the directory (names of the locker's naming) and their turnstiles
/// (such a name and [`SUFFIX`](super::turnstile::SUFFIX)). Nothing else is ever touched.
pub(super) fn list(locker: &FileLocker) -> Result<Listing, Error> {
    let entries = std::fs::read_dir(&locker.dir).map_err(|e| dir_error(&locker.dir, e))?;
    let mut listing = Listing {
        locks: Vec::new(),
        turnstiles: Default::default(),
    };
    for entry in entries {
        let entry = entry.map_err(|e| dir_error(&locker.dir, e))?;
        let Ok(file_name) = entry.file_name().into_string() else {
            continue;
        };
        if locker.naming.matches(&file_name) {
            listing.locks.push((entry.path(), file_name));
        } else if let Some(lock) = file_name.strip_suffix(super::turnstile::SUFFIX) {
            if locker.naming.matches(lock) {
                listing.turnstiles.insert(lock.to_owned(), entry.path());
            }
        }
    }
    listing.locks.sort();
    Ok(listing)
}

/// Device and inode of a regular file, not following symbolic links.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    meta.file_type().is_file().then(|| (meta.dev(), meta.ino()))
}

pub(super) fn status(locker: &FileLocker) -> Result<Vec<LockStatus>, Error> {
    let listing = list(locker)?;
    let mut files = Vec::new();
    for (path, file_name) in listing.locks {
        let Some(id) = file_id(&path) else {
            continue; // collected meanwhile, or not a lock file
        };
        // Requests that wait at the turnstile (shared ones giving way, exclusive ones behind
        // another) wait for this lock too.
        let turnstile = listing.turnstiles.get(&file_name).and_then(|t| file_id(t));
        files.push((path, file_name, id, turnstile));
    }
    let ids: std::collections::HashSet<(u64, u64)> = files
        .iter()
        .flat_map(|f| std::iter::once(f.2).chain(f.3))
        .collect();
    let mut locks = if ids.is_empty() {
        HashMap::new()
    } else {
        proc_locks(|dev, ino| ids.contains(&(dev, ino))).map_err(|source| Error::System {
            op: "read /proc/locks",
            source,
        })?
    };
    let mut out = Vec::with_capacity(files.len());
    for (path, file_name, id, turnstile) in files {
        let l = locks.remove(&id).unwrap_or_default();
        let at_turnstile = turnstile
            .and_then(|t| locks.get(&t))
            .map_or(0, |t| t.waiters);
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
            waiters: l.waiters + at_turnstile,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
