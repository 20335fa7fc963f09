//! Fairness between shared and exclusive requests: the turnstile.
//!
//! flock(2) grants a shared lock whenever no exclusive lock is *held*, even while an exclusive
//! request waits, so a stream of overlapping shared holders can keep an exclusive waiter out
//! forever. lockgate's requests therefore agree on two more things per lock, both kept so that
//! nothing outlives a process or can block anybody:
//!
//! - **The turnstile**: the file `<lock file>.turnstile`. An exclusive request that finds the
//!   lock busy takes `flock(LOCK_EX)` on it (waiting for exclusive requests ahead of it), and
//!   holds it while it waits for the lock; it lets go as soon as it has the lock (the next
//!   exclusive request then waits for the lock itself), or when it gives up. A shared request
//!   that must give way waits for `flock(LOCK_SH)` on the turnstile and lets go at once (it
//!   passes through), then tries the lock again.
//! - **The mark**: the sticky bit (`S_ISVTX`, meaningless on a regular file) of the lock file's
//!   mode: "an exclusive request may be waiting: look at the turnstile". The exclusive request
//!   sets it once it holds the turnstile. Only someone holding the turnstile clears it: an
//!   exclusive request that gives up, or a shared request that finds nobody at the turnstile.
//!   An exclusive request that got the lock leaves it (clearing it would cost the handoff two
//!   system calls), so the next shared request clears it.
//!
//! A shared request looks at the mode in the `fstat` it makes anyway after locking (for the
//! link count), so an unmarked lock costs it nothing. A marked one makes it try
//! `flock(LOCK_SH | LOCK_NB)` on the turnstile: if that fails, an exclusive request holds it
//! and waits: the shared lock is released and the request gives way. If it succeeds, no
//! exclusive request waits, and none can mark the lock while we hold the turnstile shared: the
//! shared request clears the mark and keeps its lock.
//!
//! While an exclusive request waits, the lock stays marked: it set the mark while holding the
//! turnstile, and nobody else can clear it before it lets go. A shared request that took its
//! lock before the mark was set keeps it: those are the holders the exclusive request waits
//! for. Marking costs the exclusive request a `fchmod(2)`, which only the file's owner (or root)
//! may make; where it cannot mark, the exclusive request waits as flock(2) alone would have it.
//! The turnstile is a flock, and a mark only ever costs shared requests a look at the
//! turnstile; every failure to use the turnstile falls back to plain flock(2) waiting.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::lockfile::{fstat, open_c, try_flock, Stat};
use super::wait::{self, Stop};
use super::LockPath;

/// What a lock file's turnstile adds to its path.
pub(super) const SUFFIX: &str = ".turnstile";

/// The mode bit that marks a lock file as awaited by an exclusive request.
const MARK: libc::mode_t = libc::S_ISVTX;

/// Whether a lock file's mode carries the mark.
pub(super) fn is_marked(st: &Stat) -> bool {
    st.mode & MARK != 0
}

/// Opens (creating) the turnstile of the lock at `path`.
fn open(path: &LockPath) -> io::Result<File> {
    let turnstile = path.turnstile();
    let Ok(c) = &turnstile.0 else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    let file = open_c(c)?;
    if !fstat(&file)?.is_regular() {
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
        if fstat(&turnstile)?.nlink > 0 {
            return Ok(Some(turnstile));
        }
    }
}

/// Waits for the exclusive lock on `lock` (the lock file at `path`, found busy) while holding
/// the turnstile, with the lock marked, so that shared requests that come after us wait behind
/// us. True when granted (the turnstile let go, the mark left), false when stopped first (the
/// mark cleared, the turnstile let go).
pub(super) fn wait_exclusive(path: &LockPath, lock: &File, stop: &Stop<'_>) -> io::Result<bool> {
    let turnstile = match take(path, stop) {
        Ok(Some(t)) => Some(t),
        Ok(None) => return Ok(false),
        Err(e) => {
            tracing::debug!(
                path = %path.turnstile().path().display(),
                error = %e,
                "cannot use the turnstile; waiting without it"
            );
            None
        }
    };
    let marked = turnstile.is_some() && mark(lock);
    let granted = wait::flock(lock, libc::LOCK_EX, stop);
    if marked && !matches!(granted, Ok(true)) {
        unmark(lock);
    }
    drop(turnstile);
    granted
}

/// For a shared request holding `lock` (the lock file at `path`) that found it marked: true
/// when an exclusive request waits at the turnstile, so that this one must give way. Otherwise
/// the mark is cleared (best effort). Failures count as "nobody waits": fairness falls back to
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
        match try_flock(&turnstile, libc::LOCK_SH) {
            Ok(true) => {}
            Ok(false) => return true,
            Err(e) => {
                tracing::debug!(error = %e, "cannot lock the turnstile of a marked lock");
                return false;
            }
        }
        match fstat(&turnstile) {
            Ok(st) if st.nlink == 0 => continue,
            Ok(_) => {}
            Err(_) => return false,
        }
        // Nobody waits, and nobody can mark the lock while we hold the turnstile.
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
/// there (left by a request that got the lock, or died) is ours from now on.
fn mark(lock: &File) -> bool {
    let Ok(st) = fstat(lock) else { return false };
    if is_marked(&st) {
        return true;
    }
    match fchmod(lock, (st.mode & 0o7777) | MARK) {
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
        if let Err(e) = fchmod(lock, st.mode & 0o7777 & !MARK) {
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
