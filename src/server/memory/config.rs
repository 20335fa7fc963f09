//! The memory store's settings.

use std::path::PathBuf;
use std::time::Duration;

#[cfg(doc)]
use super::super::config::MAX_DURATION;
use super::super::config::{check_duration, ConfigError};
#[cfg(doc)]
use super::super::store::{AcquireSpec, StoreError};
#[cfg(doc)]
use super::MemoryStore;
use super::DEFAULT_TTL;

/// Settings of a [`MemoryStore`].
///
/// ```
/// use std::time::Duration;
/// use lockgate::server::MemoryConfig;
///
/// let config = MemoryConfig::default()
///     .ttl(Duration::from_secs(10))
///     .grace(Duration::ZERO) // no earlier server can have granted leases
///     .max_held(100_000);
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    pub(super) ttl: Duration,
    pub(super) grace: Option<Duration>,
    pub(super) max_held: usize,
    pub(super) max_waiters: usize,
    pub(super) max_waiters_per_client: usize,
    pub(super) max_waiters_per_lock: usize,
    pub(super) fencing_state: Option<PathBuf>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            grace: None,
            max_held: 100_000,
            max_waiters: 10_000,
            max_waiters_per_client: 1000,
            max_waiters_per_lock: 1000,
            fencing_state: None,
        }
    }
}

impl MemoryConfig {
    /// How long a lease lives after its grant or last renewal (default 10 s, Go's; 1 ms to
    /// [`MAX_DURATION`]). Go's clients renew every 3 s and poll every 2 s: do not go below
    /// about 5 s with Go clients.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long after its start the store grants nothing (default: one TTL).
    ///
    /// Leases live only in memory, so a restarted server does not know the leases its previous
    /// instance granted, while their holders keep working until they notice. Waiting one TTL
    /// lets every such holder either renew against this instance (and be told `no existing
    /// lock lease found`) or reach its own renewal deadline before anyone else gets the lock.
    /// Zero when no earlier instance can have served the same clients. At most
    /// [`MAX_DURATION`].
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// The cap on held leases (default 100 000, about 32 MiB): an acquisition that would be
    /// granted beyond it fails with [`StoreError::Capacity`]. Waiters already queued are still
    /// granted.
    pub fn max_held(mut self, max: usize) -> Self {
        self.max_held = max;
        self
    }

    /// The cap on queued acquirers (default 10 000).
    pub fn max_waiters(mut self, max: usize) -> Self {
        self.max_waiters = max;
        self
    }

    /// The cap on queued acquirers of one client ([`AcquireSpec::client`]; default 1000), so
    /// that one client cannot take every place.
    pub fn max_waiters_per_client(mut self, max: usize) -> Self {
        self.max_waiters_per_client = max;
        self
    }

    /// The cap on queued acquirers of one lock (default 1000): a request, a release and an
    /// expiry look at a lock's queue, so its length bounds their work.
    pub fn max_waiters_per_lock(mut self, max: usize) -> Self {
        self.max_waiters_per_lock = max;
        self
    }

    /// Keeps the fencing tokens above every token granted before a restart in `path`: the store
    /// writes there (atomically) a ceiling of the tokens it may grant, 2^20 tokens ahead, before
    /// granting beyond it, and starts above the ceiling it finds. Without it, tokens start at
    /// the wall clock in microseconds, which goes backwards when the clock is set back.
    pub fn fencing_state(mut self, path: impl Into<PathBuf>) -> Self {
        self.fencing_state = Some(path.into());
        self
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_duration("the lease TTL", self.ttl, Duration::from_millis(1))?;
        if let Some(grace) = self.grace {
            check_duration("the start-up grace", grace, Duration::ZERO)?;
        }
        for (what, n) in [
            ("the cap on held leases", self.max_held),
            ("the cap on waiters", self.max_waiters),
            ("the cap on waiters per client", self.max_waiters_per_client),
            ("the cap on waiters per lock", self.max_waiters_per_lock),
        ] {
            if n == 0 {
                return Err(ConfigError::Zero { what });
            }
        }
        Ok(())
    }
}
