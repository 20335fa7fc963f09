//! The interface between the HTTP server and where leases live.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use uuid::Uuid;

use crate::http::protocol::StatusResponse;
use crate::{LockName, Mode};

/// The future a [`Store`] method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a lock server keeps its leases: the [`MemoryStore`](super::MemoryStore) of one server,
/// or (later) the annotations of a Kubernetes object shared by many servers.
///
/// A store owns all lease state. The server keeps nothing per lease or per handle: a handle
/// is `(name, uuid)`, and any server over the same store may renew or release it.
///
/// # Fairness
///
/// A store serves each lock's waiters in arrival order with no writer starvation: a queued
/// exclusive request stops later shared ones, and consecutive shared waiters are granted
/// together. Requests with an [`AcquirerId`] keep their place between requests (a poller asking
/// again, a long poll that timed out) for one lease TTL; requests without one hold a place only
/// while their long poll is open, and a request that does not wait is granted only when no
/// queued request is ahead of it. A place belongs to its acquirer id together with the client
/// it was bound to ([`AcquirerId::client`]): the same id from another client is another
/// acquirer.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Acquires a lease of `spec.name` in `spec.mode`: [`Acquired::Granted`] or, when the lock
    /// stays busy for `spec.wait` (not at all when `None`), [`Acquired::ShouldWait`].
    ///
    /// # Errors
    ///
    /// [`StoreError::Capacity`], [`StoreError::ShuttingDown`], [`StoreError::Unavailable`],
    /// [`StoreError::OutcomeUnknown`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future ends the wait: a lease granted at that moment is released again
    /// (nobody could learn its handle), and the request's queue place is kept as after a timed
    /// out wait (with an acquirer id) or given up (without one).
    fn acquire(&self, spec: AcquireSpec) -> StoreFuture<'_, Result<Acquired, StoreError>>;

    /// Renews a lease for one TTL from now.
    ///
    /// # Errors
    ///
    /// [`StoreError::NoLease`] when no lease of the lock exists (expired, released, ended with
    /// the server), [`StoreError::AlreadyLeased`] when the lock is held under other handles,
    /// [`StoreError::Unavailable`] (nothing was changed), [`StoreError::OutcomeUnknown`] (the
    /// change may have been applied).
    fn renew(&self, lease: LeaseRef) -> StoreFuture<'_, Result<Duration, StoreError>>;

    /// An acquirer gives up: its queue place is removed, and an open long poll of it answers
    /// [`Acquired::ShouldWait`] (or its grant, if one landed first). Unknown acquirers are no
    /// error, and so is the id of another client's acquirer (see [`AcquirerId::client`]): only
    /// the client that took a place can give it up. The default does nothing (places lapse one
    /// TTL after the acquirer's last request).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`].
    fn cancel(
        &self,
        name: LockName,
        acquirer_id: AcquirerId,
    ) -> StoreFuture<'_, Result<(), StoreError>> {
        let _ = (name, acquirer_id);
        Box::pin(async { Ok(()) })
    }

    /// Releases a lease; the lock goes to the next waiter at once.
    ///
    /// # Errors
    ///
    /// As [`renew`](Self::renew).
    fn release(&self, lease: LeaseRef) -> StoreFuture<'_, Result<(), StoreError>>;

    /// The locks with holders or waiters.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`].
    fn status(&self, query: StatusQuery) -> StoreFuture<'_, Result<StatusResponse, StoreError>>;

    /// Counters and gauges for `/metrics`, from what this server knows; cheap and synchronous.
    fn stats(&self) -> StoreStats;

    /// The lease TTL.
    fn ttl(&self) -> Duration;

    /// Time left before the store grants locks after its start (see
    /// [`MemoryConfig::grace`](super::MemoryConfig::grace)); `None` once granting.
    fn grace_remaining(&self) -> Option<Duration>;

    /// Starts shutting down: open waits end with [`StoreError::ShuttingDown`], so do new
    /// acquisitions; leases this store keeps only in memory end (renewals answer
    /// [`StoreError::NoLease`]); releases still work.
    fn close(&self);
}

/// One acquisition, as a store sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AcquireSpec {
    /// The lock.
    pub name: LockName,
    /// Shared or exclusive.
    pub mode: Mode,
    /// Go v0.2's acquirer id: the caller's place in the queue between requests.
    pub acquirer_id: Option<AcquirerId>,
    /// How long to wait for a busy lock; `None` answers at once.
    pub wait: Option<Duration>,
    /// The client asking (its address), for the caps per client; `None`: not counted per
    /// client.
    pub client: Option<IpAddr>,
}

impl AcquireSpec {
    /// An acquisition of `name` in `mode` that does not wait and has no acquirer id.
    pub fn new(name: LockName, mode: Mode) -> Self {
        Self {
            name,
            mode,
            acquirer_id: None,
            wait: None,
            client: None,
        }
    }

    /// Sets the acquirer id.
    pub fn acquirer_id(mut self, id: AcquirerId) -> Self {
        self.acquirer_id = Some(id);
        self
    }

    /// Waits up to `wait` for a busy lock (a zero wait does not wait).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = (!wait.is_zero()).then_some(wait);
        self
    }

    /// Counts the request against the caps of the client at `client`.
    pub fn client(mut self, client: IpAddr) -> Self {
        self.client = Some(client);
        self
    }
}

/// A lease handle: the lock's name and the lease's UUID (Go's `LockHandle`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    /// The lock.
    pub name: LockName,
    /// The lease.
    pub uuid: Uuid,
}

/// What [`Store::acquire`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The lease is the caller's.
    Granted(Grant),
    /// The lock is busy (Go's `should wait`).
    ShouldWait,
}

/// A granted lease.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Grant {
    /// The lease's UUID: with the lock name, the handle.
    pub uuid: Uuid,
    /// Strictly increasing per lock.
    pub fencing_token: u64,
    /// The lease lives this long unless renewed.
    pub ttl: Duration,
}

/// Which locks [`Store::status`] lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatusQuery {
    /// Only this lock.
    pub name: Option<String>,
    /// At most this many locks (the first by name).
    pub limit: usize,
    /// Only the locks whose names sort after this one (the next page).
    pub after: Option<String>,
}

impl StatusQuery {
    /// All locks, at most `limit` of them.
    pub fn all(limit: usize) -> Self {
        Self {
            name: None,
            limit,
            after: None,
        }
    }

    /// One lock.
    pub fn one(name: impl Into<String>) -> Self {
        Self {
            name: Some(name.into()),
            limit: 1,
            after: None,
        }
    }
}

/// What a store knows for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Locks with at least one holder.
    pub locks_held: u64,
    /// Leases held (a shared lock with three holders counts three).
    pub leases: u64,
    /// Queued acquirers (open long polls and pollers keeping a place).
    pub waiters: u64,
    /// Leases granted since start.
    pub grants: u64,
    /// Leases released since start.
    pub releases: u64,
    /// Leases dropped because they were not renewed within the TTL.
    pub lease_expiries: u64,
    /// Queue places dropped because their poller stopped asking.
    pub place_expiries: u64,
}

/// Why a store refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No lease of the lock exists: it expired, was released, or ended with the server.
    #[error("no existing lock lease found")]
    NoLease,
    /// The lock is held under other handles: the caller's lease is lost.
    #[error("lock already leased")]
    AlreadyLeased,
    /// A cap of the server is reached.
    #[error("{0}")]
    Capacity(Capacity),
    /// The server is shutting down.
    #[error("the lock server is shutting down")]
    ShuttingDown,
    /// The store failed before it changed anything.
    #[error("the lock store is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store failed after a change was sent, without learning whether it was applied (a
    /// write that timed out): the lease may be released, renewed or granted, or not.
    #[error("the lock store did not confirm the change; it may or may not have been applied")]
    OutcomeUnknown(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Which cap an acquisition hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Capacity {
    /// Held leases ([`MemoryConfig::max_held`](super::MemoryConfig::max_held)).
    Held {
        /// The cap.
        max: usize,
    },
    /// Queued acquirers ([`MemoryConfig::max_waiters`](super::MemoryConfig::max_waiters)).
    Waiters {
        /// The cap.
        max: usize,
    },
    /// Queued acquirers of one client
    /// ([`MemoryConfig::max_waiters_per_client`](super::MemoryConfig::max_waiters_per_client)).
    ClientWaiters {
        /// The cap.
        max: usize,
    },
    /// Queued acquirers of one lock
    /// ([`MemoryConfig::max_waiters_per_lock`](super::MemoryConfig::max_waiters_per_lock)).
    LockWaiters {
        /// The cap.
        max: usize,
    },
    /// The Kubernetes object's annotations are filled up to the share the server may use: it
    /// writes no new record or queue entry there before some are released.
    ObjectFull {
        /// The bytes of annotations the server leaves to others.
        reserve: usize,
    },
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Capacity::Held { max } => write!(
                f,
                "the lock server holds {max} leases, its limit; try again after some are released"
            ),
            Capacity::Waiters { max } => write!(
                f,
                "{max} acquirers are waiting on the lock server, its limit; try again later"
            ),
            Capacity::ClientWaiters { max } => write!(
                f,
                "{max} acquirers from this client are waiting on the lock server, its limit per \
                 client; try again later"
            ),
            Capacity::LockWaiters { max } => write!(
                f,
                "{max} acquirers are waiting for this lock, the server's limit per lock; try \
                 again later"
            ),
            Capacity::ObjectFull { reserve } => write!(
                f,
                "the Kubernetes object's annotations are nearly full (the server leaves the last \
                 {reserve} bytes to others); try again after some locks are released"
            ),
        }
    }
}

/// The longest acquirer id accepted, in bytes.
pub const MAX_ACQUIRER_ID_LEN: usize = 256;

/// Go v0.2's `AcquireOptions.AcquirerId`: an opaque id an acquirer keeps across its requests,
/// 1 to [`MAX_ACQUIRER_ID_LEN`] bytes of UTF-8 without control characters, and the client it is
/// bound to.
///
/// Two ids are the same acquirer only when both the text and the client are equal: the server
/// binds every id to the address of the client that sent it, so that a queue place can be taken
/// up or given up only from where it was taken, whoever learns or guesses the id.
///
/// ```
/// use lockgate::server::AcquirerId;
/// let here = AcquirerId::new("runner-7")?.client("10.0.0.7".parse()?);
/// let there = AcquirerId::new("runner-7")?.client("10.0.0.8".parse()?);
/// assert_ne!(here, there);
/// assert_eq!(here.as_str(), there.as_str());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AcquirerId {
    id: Box<str>,
    client: Option<IpAddr>,
}

/// Why a string is not an acquirer id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("acquirer id must be 1 to {MAX_ACQUIRER_ID_LEN} bytes without control characters")]
pub struct AcquirerIdError;

impl AcquirerId {
    /// Validates `id`.
    ///
    /// # Errors
    ///
    /// [`AcquirerIdError`] for an empty or too long id or one with a control character.
    ///
    /// ```
    /// use lockgate::server::AcquirerId;
    /// assert!(AcquirerId::new("runner-7").is_ok());
    /// assert!(AcquirerId::new("").is_err());
    /// ```
    pub fn new(id: &str) -> Result<Self, AcquirerIdError> {
        if id.is_empty() || id.len() > MAX_ACQUIRER_ID_LEN || id.chars().any(char::is_control) {
            return Err(AcquirerIdError);
        }
        Ok(Self {
            id: id.into(),
            client: None,
        })
    }

    /// Binds the id to the client at `client`.
    pub fn client(mut self, client: IpAddr) -> Self {
        self.client = Some(client);
        self
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The client it is bound to.
    pub fn bound_to(&self) -> Option<IpAddr> {
        self.client
    }
}

impl fmt::Debug for AcquirerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.id, f)
    }
}
