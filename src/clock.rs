//! The library's one seam onto time and randomness, for its leased backends.
//!
//! Everything the lease logic reads of time or chance goes through here:
//!
//! - [`now`]: the monotonic clock, as Tokio's [`Instant`] — what timers sleep by, and what an
//!   observer counts a record standing still with. It stops while the host is suspended.
//! - [`boot`]: time since boot *including* suspend (CLOCK_BOOTTIME), for lease deadlines and the
//!   API server's clock: a host that slept through its deadline must see it passed on waking.
//! - [`wall`]: the wall clock (arrival order of waiters, before the API server's is known).
//! - [`random`]: randomness for lease uuids, tags and jitter.
//!
//! In a normal build these are the system's clocks and the OS's randomness. With the
//! `simulation` feature (lockgate's own deterministic simulator, never for applications), a
//! [`sim::Source`] installed once takes over [`boot`], [`wall`] and [`random`]; [`now`] is
//! Tokio's clock, which a simulator pauses and drives per simulated host.

use std::time::{Duration, SystemTime};

pub(crate) use tokio::time::Instant;

/// The monotonic clock (Tokio's: virtual in a runtime whose clock is paused).
#[inline]
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// A moment on the boot clock: time since boot, suspend included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Boot(Duration);

impl Boot {
    /// The time since `earlier`, zero if `earlier` is later.
    pub fn since(self, earlier: Boot) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// The time left from now until `self`, zero if passed.
    pub fn left(self) -> Duration {
        self.since(boot())
    }

    /// True once `self` has come.
    pub fn passed(self) -> bool {
        boot() >= self
    }

    /// As nanoseconds, for an atomic.
    pub fn as_nanos(self) -> u64 {
        u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn from_nanos(nanos: u64) -> Self {
        Boot(Duration::from_nanos(nanos))
    }
}

impl std::ops::Add<Duration> for Boot {
    type Output = Boot;
    fn add(self, d: Duration) -> Boot {
        Boot(self.0.saturating_add(d))
    }
}

impl std::ops::Sub<Duration> for Boot {
    type Output = Boot;
    fn sub(self, d: Duration) -> Boot {
        Boot(self.0.saturating_sub(d))
    }
}

/// Now on the boot clock.
pub(crate) fn boot() -> Boot {
    #[cfg(feature = "simulation")]
    if let Some(b) = sim::source().and_then(|s| s.boot()) {
        return Boot(b);
    }
    Boot(system_boot())
}

/// The wall clock.
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
pub(crate) fn wall() -> SystemTime {
    #[cfg(feature = "simulation")]
    if let Some(w) = sim::source().and_then(|s| s.wall()) {
        return w;
    }
    SystemTime::now()
}

/// 128 random bits.
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
pub(crate) fn random() -> u128 {
    #[cfg(feature = "simulation")]
    if let Some(r) = sim::source().and_then(|s| s.random()) {
        return r;
    }
    uuid::Uuid::new_v4().as_u128()
}

/// A random (version 4) uuid.
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
pub(crate) fn uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(random().to_le_bytes()).into_uuid()
}

/// Seconds since the epoch by the wall clock (negative before 1970).
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
pub(crate) fn wall_unix() -> i64 {
    match wall().duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// CLOCK_BOOTTIME: monotonic, and counting the time the system was suspended.
fn system_boot() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_BOOTTIME exists on every Linux since
    // 2.6.39, and the call cannot fail with a valid clock id and pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    debug_assert_eq!(rc, 0);
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Bugs the simulator plants to show it finds them (feature `simulation`; never in a normal
/// build, where this is a constant `false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "simulation"), allow(dead_code))]
pub(crate) enum Bug {
    /// A release whose answer was lost is rebuilt on the record read next (the defect of the
    /// first fault review).
    DoubleDecrement = 1,
    /// A release in doubt forgets its doubt after a conflict (the second review's item 1).
    ReleaseRebuilt = 2,
    /// Shared requests join Go-written shared records (a Go v0.2 take-over).
    JoinGoTakeover = 4,
    /// The renewer ignores its deadline: leases are lost only when a renewal says so.
    IgnoreDeadline = 8,
    /// A waiter handed the lock by a release counts its lease from the moment it saw the grant
    /// instead of from when it sent the queue entry the grant was made on.
    HandoffSeenAt = 16,
}

/// True when `bug` is planted (simulation only).
#[inline]
pub(crate) fn planted(bug: Bug) -> bool {
    #[cfg(feature = "simulation")]
    {
        sim::PLANTED.load(std::sync::atomic::Ordering::Relaxed) & bug as u32 != 0
    }
    #[cfg(not(feature = "simulation"))]
    {
        let _ = bug;
        false
    }
}

/// The simulator's hook (feature `simulation`): lockgate's deterministic simulator installs a
/// [`Source`](sim::Source) that answers per simulated host. Not for applications.
#[cfg(feature = "simulation")]
#[doc(hidden)]
pub mod sim {
    use std::sync::OnceLock;
    use std::time::{Duration, SystemTime};

    /// Where simulated time and chance come from. Each method answers `None` when the caller
    /// is not a simulated host (the system's clock or chance is used then).
    pub trait Source: Send + Sync {
        /// Time since the calling host's boot, suspend included.
        fn boot(&self) -> Option<Duration>;
        /// The calling host's wall clock.
        fn wall(&self) -> Option<SystemTime>;
        /// 128 random bits from the simulation's seeded generator.
        fn random(&self) -> Option<u128>;
    }

    static SOURCE: OnceLock<&'static dyn Source> = OnceLock::new();

    /// Planted bugs, a bit each (see [`plant`]).
    pub(crate) static PLANTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    /// Plants the bugs named in `bugs` (replacing any planted before): `double-decrement`,
    /// `release-rebuilt`, `join-go-takeover`, `ignore-deadline`, `handoff-seen-at`. Returns false for a name it
    /// does not know (nothing planted then).
    pub fn plant(bugs: &[&str]) -> bool {
        use super::Bug;
        let mut bits = 0;
        for b in bugs {
            bits |= match *b {
                "double-decrement" => Bug::DoubleDecrement as u32,
                "release-rebuilt" => Bug::ReleaseRebuilt as u32,
                "join-go-takeover" => Bug::JoinGoTakeover as u32,
                "ignore-deadline" => Bug::IgnoreDeadline as u32,
                "handoff-seen-at" => Bug::HandoffSeenAt as u32,
                _ => return false,
            };
        }
        PLANTED.store(bits, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Installs `source` for the rest of the process. Returns false if one was installed
    /// already (the first stays).
    pub fn install(source: &'static dyn Source) -> bool {
        SOURCE.set(source).is_ok()
    }

    pub(crate) fn source() -> Option<&'static dyn Source> {
        SOURCE.get().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_clock_moves_forward_with_the_monotonic_one() {
        let (b0, m0) = (boot(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (b1, m1) = (boot(), std::time::Instant::now());
        let (db, dm) = (b1.since(b0), m1 - m0);
        assert!(db >= Duration::from_millis(20), "{db:?}");
        // No suspend in between: both clocks saw the same interval, give or take.
        assert!(
            db.abs_diff(dm) < Duration::from_millis(5),
            "{db:?} vs {dm:?}"
        );
        assert!(b0 + Duration::from_millis(10) <= b1 && (b0 + Duration::from_millis(10)).passed());
        assert_eq!(Boot::from_nanos(b1.as_nanos()), b1);
    }

    #[test]
    fn uuids_are_version_4() {
        let u = uuid();
        assert_eq!(u.get_version_num(), 4);
        assert_ne!(u, uuid());
    }
}
