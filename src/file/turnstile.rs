//! Fairness between shared and exclusive requests: the turnstile.
//!
//! flock(2) grants a shared lock whenever no exclusive lock is *held*, even while an exclusive
//! request waits, so a stream of overlapping shared holders can keep an exclusive waiter out
//! forever. lockgate's requests therefore agree on two more things per lock, both kept in the
//! kernel so that nothing outlives a process:
//!
//! - **The turnstile**: the file `<lock file>.turnstile`. An exclusive request that finds the
//!   lock busy takes `flock(LOCK_EX)` on it (waiting for exclusive requests ahead of it), and
//!   holds it while it waits for the lock and then while it holds the lock; it lets go when it
//!   releases the lock, or gives up. A shared request that must give way waits for
//!   `flock(LOCK_SH)` on the turnstile and lets go at once (it passes through), then tries the
//!   lock again.
//! - **The mark**: the sticky bit (`S_ISVTX`, meaningless on a regular file) of the lock file's
//!   mode. The exclusive request sets it once it holds the turnstile and clears it before it
//!   lets go of the turnstile. A shared request looks at the mode in the `fstat` it makes anyway
//!   after locking (for the link count), so an unmarked lock costs it nothing. A marked one
//!   makes it try `flock(LOCK_EX | LOCK_NB)` on the turnstile: if that fails, an exclusive
//!   request waits: the shared lock is released and the request gives way. If it succeeds, the
//!   mark was left by a process that died while it waited or held the lock: nobody can be
//!   waiting behind it (a mark is set and cleared only by the turnstile's holder), so the shared
//!   request clears it and keeps its lock.
//!
//! A shared request that took its lock before the mark was set keeps it: those are the holders
//! the exclusive request waits for. Marking costs the exclusive request a `fchmod(2)`, which
//! only the file's owner (or root) may make; where it cannot mark, the exclusive request waits
//! as flock(2) alone would have it. Nothing here can block anybody for longer than a process
//! lives: the turnstile is a flock, and a stale mark only costs shared requests a look at the
//! turnstile until one of them clears it. Every failure to use the turnstile falls back to
//! plain flock(2) waiting.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::lockfile::{fstat, is_regular, open_c, try_flock};
use super::wait::{self, Stop};
use super::LockPath;

/// What a lock file's turnstile adds to its path.
pub(super) const SUFFIX: &str = ".turnstile";

/// The mode bit that marks a lock file as awaited by an exclusive request.
const MARK: libc::mode_t = libc::S_ISVTX;

/// Whether a lock file's mode carries the mark.
pub(super) fn is_marked(st: &libc::stat) -> bool {
    st.st_mode & MARK != 0
}

/// Opens (creating) the turnstile of the lock at `path`.
fn open(path: &LockPath) -> io::Result<File> {
    let turnstile = path.turnstile();
    let Ok(c) = &turnstile.0 else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    let file = open_c(c)?;
    if !is_regular(&fstat(&file)?) {
        return Err(io::Error::other("the turnstile is not a regular file"));
    }
    Ok(file)
}

/// Takes the turnstile for an exclusive request: waits while another exclusive request holds
/// it. `Ok(None)`: stopped first. A turnstile unlinked by `gc` before we locked it is no
/// turnstile: then we start over with the one now at the path.
fn take(path: &LockPath, stop: &Stop<'_>) -> io::Result<Option<File>> {
    loop {
        let turnstile = open(path)?;
        if !wait::flock(&turnstile, libc::LOCK_EX, stop)? {
            return Ok(None);
        }
        if fstat(&turnstile)?.st_nlink > 0 {
            return Ok(Some(turnstile));
        }
    }
}

/// What an exclusive request that waited holds besides its lock: the turnstile, and whether it
/// marked the lock file. It keeps both while it holds the lock (shared requests could not join
/// then anyway, and the grant is reported without more system calls), and gives them back at
/// the release, before the lock file is closed: the mark cleared, then the turnstile closed.
#[derive(Debug)]
pub(super) struct Held {
    turnstile: File,
    marked: bool,
}

impl Held {
    /// Clears the mark on `lock` (when this request set it) and lets go of the turnstile.
    pub(super) fn give_back(self, lock: &File) {
        if self.marked {
            unmark(lock);
        }
        drop(self.turnstile);
    }
}

/// How an exclusive wait ended.
pub(super) enum Waited {
    /// The lock is ours; with the turnstile and the mark, unless they could not be used.
    Granted(Option<Held>),
    /// Stopped first (deadline, cancellation): the turnstile and the mark are given back.
    Stopped,
}

/// Waits for the exclusive lock on `lock` (the lock file at `path`, found busy) while holding
/// the turnstile and the mark, so that shared requests that come after us wait behind us.
pub(super) fn wait_exclusive(path: &LockPath, lock: &File, stop: &Stop<'_>) -> io::Result<Waited> {
    let turnstile = match take(path, stop) {
        Ok(Some(t)) => Some(t),
        Ok(None) => return Ok(Waited::Stopped),
        Err(e) => {
            tracing::debug!(
                path = %path.turnstile().path().display(),
                error = %e,
                "cannot use the turnstile; waiting without it"
            );
            None
        }
    };
    let held = turnstile.map(|turnstile| Held {
        turnstile,
        marked: mark(lock),
    });
    match wait::flock(lock, libc::LOCK_EX, stop) {
        Ok(true) => Ok(Waited::Granted(held)),
        stopped_or_failed => {
            if let Some(h) = held {
                h.give_back(lock);
            }
            stopped_or_failed.map(|_| Waited::Stopped)
        }
    }
}

/// For a shared request holding `lock` (the lock file at `path`) that found it marked: true
/// when an exclusive request waits at the turnstile, so that this one must give way. A mark
/// nobody stands behind is cleared. Failures count as "nobody waits": fairness falls back to
/// flock(2)'s own, but never blocks.
pub(super) fn exclusive_waits(path: &LockPath, lock: &File) -> bool {
    // A turnstile unlinked by `gc` before we locked it is no turnstile: look at the one now at
    // the path (each round follows one collection; a few are plenty).
    for _ in 0..8 {
        let turnstile = match open(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "cannot open the turnstile of a marked lock");
                return false;
            }
        };
        match try_flock(&turnstile, libc::LOCK_EX) {
            Ok(true) => {}
            Ok(false) => return true,
            Err(e) => {
                tracing::debug!(error = %e, "cannot lock the turnstile of a marked lock");
                return false;
            }
        }
        match fstat(&turnstile) {
            Ok(st) if st.st_nlink == 0 => continue,
            Ok(_) => {}
            Err(_) => return false,
        }
        // We hold the turnstile (and the lock, shared): the request that marked it is gone.
        tracing::debug!("clearing the mark of an exclusive request that is gone");
        unmark(lock);
        return false;
    }
    false
}

/// A shared request giving way: waits until no exclusive request holds the turnstile, and lets
/// go of it at once. False when stopped first.
pub(super) fn pass(path: &LockPath, stop: &Stop<'_>) -> bool {
    let passed = open(path).and_then(|turnstile| wait::flock(&turnstile, libc::LOCK_SH, stop));
    passed.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "cannot pass the turnstile; trying the lock again");
        true
    })
}

/// Marks `lock`; false when its mode cannot be changed (we are not its owner). A mark already
/// there (left by a request that died) is ours from now on.
fn mark(lock: &File) -> bool {
    let Ok(st) = fstat(lock) else { return false };
    if is_marked(&st) {
        return true;
    }
    match fchmod(lock, (st.st_mode & 0o7777) | MARK) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(
                error = %e,
                "cannot mark the lock file (only its owner can): shared requests may overtake"
            );
            false
        }
    }
}

/// Clears the mark of `lock`, if set. Best effort.
fn unmark(lock: &File) {
    let Ok(st) = fstat(lock) else { return };
    if is_marked(&st) {
        if let Err(e) = fchmod(lock, st.st_mode & 0o7777 & !MARK) {
            tracing::debug!(error = %e, "cannot clear the mark of a lock file");
        }
    }
}

fn fchmod(file: &File, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: fchmod on an open descriptor.
    if unsafe { libc::fchmod(file.as_raw_fd(), mode) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
