//! The memory store: one server's leases, in its memory.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use uuid::Uuid;

use super::store::{
    AcquireSpec, Acquired, AcquirerId, Capacity, Grant, LeaseRef, StatusQuery, Store, StoreError,
    StoreFuture, StoreStats,
};
use crate::http::protocol::{HolderStatus, LockStatus, StatusResponse, WaiterStatus};
use crate::Mode;

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
    ttl: Duration,
    grace: Option<Duration>,
    max_held: usize,
    max_waiters: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            grace: None,
            max_held: 1_000_000,
            max_waiters: 10_000,
        }
    }
}

/// Go lockgate's lease TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

impl MemoryConfig {
    /// How long a lease lives after its grant or last renewal (default 10 s, Go's). Go's
    /// clients renew every 3 s and poll every 2 s: do not go below about 5 s with Go clients.
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
    /// Zero when no earlier instance can have served the same clients.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// The cap on held leases (default 1 000 000): an acquisition that would be granted beyond
    /// it fails with [`StoreError::Capacity`]. Waiters already queued are still granted.
    pub fn max_held(mut self, max: usize) -> Self {
        self.max_held = max;
        self
    }

    /// The cap on queued acquirers (default 10 000).
    pub fn max_waiters(mut self, max: usize) -> Self {
        self.max_waiters = max;
        self
    }
}

/// Leases in the memory of one server: what `lockgate serve --store memory` uses.
///
/// Leases end with the process. Expiry runs on the server's monotonic clock: a lease not renewed
/// for one TTL is dropped and the lock goes to the next waiter at that moment. Every acquisition
/// gets a lease UUID of its own, also shared ones.
///
/// # Fairness
///
/// Per lock, first come first served, with no writer starvation: a queued exclusive request
/// stops later shared ones; consecutive shared waiters are granted together. Long-poll waiters
/// are granted the moment the lock is free (a release completes the longest waiter's pending
/// request). A poller with an acquirer id (Go v0.2, answered `should wait` and asking again
/// every 2 s) keeps its place while it asks at least once per TTL; when its turn comes the lock
/// is kept for it until it asks again or its place lapses. A request without an acquirer id
/// that does not wait is granted only when no queued request is ahead of it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use lockgate::server::{AcquireSpec, Acquired, LeaseRef, MemoryConfig, MemoryStore, Store};
/// use lockgate::{LockName, Mode};
///
/// let store = MemoryStore::new(MemoryConfig::default().grace(Duration::ZERO));
/// let name = LockName::new("deploy")?;
/// let Acquired::Granted(grant) = store.acquire(AcquireSpec::new(name.clone(), Mode::Exclusive)).await? else {
///     unreachable!("the lock is free");
/// };
/// assert_eq!(
///     store.acquire(AcquireSpec::new(name.clone(), Mode::Shared)).await?,
///     Acquired::ShouldWait
/// );
/// store.release(LeaseRef { name, uuid: grant.uuid }).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    inner: Arc<Inner>,
    reapers: OnceLock<Vec<tokio::task::AbortHandle>>,
}

const SHARDS: usize = 16;
/// Expiry work done under one shard lock before letting requests in again.
const REAP_BATCH: usize = 512;
/// How often leases nobody waits for are looked at (they are expired for every reader as soon
/// as their TTL passes; the sweep only frees their memory).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Inner {
    shards: Box<[Shard]>,
    hasher: RandomState,
    ttl: Duration,
    max_held: usize,
    max_waiters: usize,
    grace_until: Instant,
    closed: AtomicBool,
    next_token: AtomicU64,
    next_id: AtomicU64,
    leases: AtomicU64,
    locks_held: AtomicU64,
    waiters: AtomicU64,
    grants: AtomicU64,
    releases: AtomicU64,
    lease_expiries: AtomicU64,
    place_expiries: AtomicU64,
}

#[derive(Debug, Default)]
struct Shard {
    state: Mutex<ShardState>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct ShardState {
    locks: HashMap<Arc<str>, LockState>,
    /// When to look at a lock with waiters again (lease or queue place expiry, end of grace). A
    /// lock has at most a few entries: renewals only move `Holder::expires`; an entry that fires
    /// early re-arms itself.
    timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    /// The reaper sleeps until then (`None`: until woken).
    reaper_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct LockState {
    holders: Vec<Holder>,
    queue: VecDeque<Waiter>,
    /// The earliest entry of this lock in `timers`.
    scheduled: Option<Instant>,
}

#[derive(Debug)]
struct Holder {
    uuid: Uuid,
    mode: Mode,
    token: u64,
    granted: Instant,
    expires: Instant,
    acquirer_id: Option<AcquirerId>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    mode: Mode,
    acquirer_id: Option<AcquirerId>,
    since: Instant,
    slot: Slot,
}

#[derive(Debug)]
enum Slot {
    /// A long poll is open: grant it through the channel. `attach` tells this request from a
    /// later one of the same acquirer that took the place over.
    Attached {
        tx: oneshot::Sender<Delivery>,
        attach: u64,
    },
    /// A poller between requests: its place lapses at `expires`.
    Detached { expires: Instant },
}

#[derive(Debug)]
enum Delivery {
    Granted(Grant),
    Closing,
}

fn lock_mutex<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks panics by design; if something did, the state is still the
    // last consistent one each operation left, so serving on is better than failing every
    // request after.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn compatible(mode: Mode, holders: &[Holder]) -> bool {
    match holders.first() {
        None => true,
        Some(h) => mode == Mode::Shared && h.mode == Mode::Shared,
    }
}

impl MemoryStore {
    /// An empty store. Its expiry tasks start on the Tokio runtime of its first acquisition.
    pub fn new(config: MemoryConfig) -> Self {
        let now = Instant::now();
        let unix_micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        let inner = Inner {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            ttl: config.ttl,
            max_held: config.max_held,
            max_waiters: config.max_waiters,
            grace_until: now + config.grace.unwrap_or(config.ttl),
            closed: AtomicBool::new(false),
            // Tokens start at the wall clock in microseconds, so a restarted server continues
            // above its predecessor's tokens unless it granted more than one lock per
            // microsecond on average or the clock was set back.
            next_token: AtomicU64::new(unix_micros.max(1)),
            next_id: AtomicU64::new(1),
            leases: AtomicU64::new(0),
            locks_held: AtomicU64::new(0),
            waiters: AtomicU64::new(0),
            grants: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            lease_expiries: AtomicU64::new(0),
            place_expiries: AtomicU64::new(0),
        };
        Self {
            inner: Arc::new(inner),
            reapers: OnceLock::new(),
        }
    }

    fn start_reapers(&self) {
        self.reapers.get_or_init(|| {
            (0..SHARDS)
                .map(|i| tokio::spawn(reap(self.inner.clone(), i)).abort_handle())
                .collect()
        });
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        for r in self.reapers.get().into_iter().flatten() {
            r.abort();
        }
    }
}

/// Expires leases and queue places of one shard: at once where someone waits (timers), and
/// within [`SWEEP_EVERY`] where nobody does (a sweep of the shard).
async fn reap(inner: Arc<Inner>, shard: usize) {
    let mut next_sweep = Instant::now() + SWEEP_EVERY;
    loop {
        let notified = inner.shards[shard].wake.notified();
        let until = {
            let mut st = lock_mutex(&inner.shards[shard].state);
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + SWEEP_EVERY;
                let ShardState { locks, timers, .. } = &mut *st;
                locks.retain(|key, lock| {
                    inner.settle(timers, key, lock, now);
                    !(lock.holders.is_empty() && lock.queue.is_empty())
                });
            }
            let mut done = 0;
            while let Some(Reverse((at, _))) = st.timers.peek() {
                if *at > now || done == REAP_BATCH {
                    break;
                }
                let Some(Reverse((at, key))) = st.timers.pop() else {
                    break;
                };
                let ShardState { locks, timers, .. } = &mut *st;
                if let Some(lock) = locks.get_mut(&key) {
                    if lock.scheduled == Some(at) {
                        lock.scheduled = None;
                    }
                    inner.settle(timers, &key, lock, now);
                    if lock.holders.is_empty() && lock.queue.is_empty() {
                        locks.remove(&key);
                    }
                }
                done += 1;
            }
            let until = if done == REAP_BATCH {
                Some(now)
            } else {
                let timer = st.timers.peek().map(|Reverse((at, _))| *at);
                Some(timer.map_or(next_sweep, |t| t.min(next_sweep)))
            };
            st.reaper_until = until;
            until
        };
        match until {
            Some(at) if at <= Instant::now() => tokio::task::yield_now().await,
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

impl Inner {
    fn shard_of(&self, name: &str) -> usize {
        (self.hasher.hash_one(name) as usize) % SHARDS
    }

    fn in_grace(&self, now: Instant) -> bool {
        now < self.grace_until
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Drops what expired, grants what can be granted, and re-arms the lock's timer.
    fn settle(
        &self,
        timers: &mut BinaryHeap<Reverse<(Instant, Arc<str>)>>,
        key: &Arc<str>,
        lock: &mut LockState,
        now: Instant,
    ) {
        self.sweep(lock, now);
        self.pump(lock, now);
        if lock.queue.is_empty() {
            // Nobody to hand the lock to: an expired lease is dropped when the lock is next
            // looked at (every operation sweeps first), or by the periodic sweep.
            return;
        }
        let next = lock
            .holders
            .iter()
            .map(|h| h.expires)
            .chain(lock.queue.iter().filter_map(|w| match w.slot {
                Slot::Detached { expires } => Some(expires),
                Slot::Attached { .. } => None,
            }))
            .chain(self.in_grace(now).then_some(self.grace_until))
            .min();
        if let Some(at) = next {
            if lock.scheduled.is_none_or(|s| at < s) {
                lock.scheduled = Some(at);
                timers.push(Reverse((at, key.clone())));
            }
        }
    }

    /// Drops expired leases and lapsed queue places.
    fn sweep(&self, lock: &mut LockState, now: Instant) {
        let before = lock.holders.len();
        lock.holders.retain(|h| h.expires > now);
        let expired = before - lock.holders.len();
        if expired > 0 {
            self.lease_expiries
                .fetch_add(expired as u64, Ordering::Relaxed);
            self.leases.fetch_sub(expired as u64, Ordering::Relaxed);
            if lock.holders.is_empty() {
                self.locks_held.fetch_sub(1, Ordering::Relaxed);
            }
            tracing::debug!(expired, "leases expired");
        }
        let before = lock.queue.len();
        lock.queue.retain(|w| match &w.slot {
            Slot::Detached { expires } => *expires > now,
            Slot::Attached { tx, .. } => !tx.is_closed(),
        });
        let lapsed = before - lock.queue.len();
        if lapsed > 0 {
            self.place_expiries
                .fetch_add(lapsed as u64, Ordering::Relaxed);
            self.waiters.fetch_sub(lapsed as u64, Ordering::Relaxed);
        }
    }

    /// Grants queued long polls the lock can take now, in queue order. A poller between requests
    /// whose turn it is keeps the lock for itself (exclusive) or lets the shared run go on.
    fn pump(&self, lock: &mut LockState, now: Instant) {
        if self.in_grace(now) || self.closed() {
            return;
        }
        let mut i = 0;
        while i < lock.queue.len() {
            let w = &lock.queue[i];
            if !compatible(w.mode, &lock.holders) || (w.mode == Mode::Exclusive && i > 0) {
                break;
            }
            if let Slot::Detached { .. } = w.slot {
                if w.mode == Mode::Exclusive {
                    break;
                }
                i += 1;
                continue;
            }
            let Some(w) = lock.queue.remove(i) else {
                break;
            };
            self.waiters.fetch_sub(1, Ordering::Relaxed);
            let Slot::Attached { tx, .. } = w.slot else {
                continue;
            };
            let exclusive = w.mode == Mode::Exclusive;
            let grant = self.grant(lock, w.mode, w.acquirer_id, now);
            let uuid = grant.uuid;
            if tx.send(Delivery::Granted(grant)).is_err() {
                // The request is gone (cannot happen while its guard holds the receiver, but
                // a lease nobody knows must not stay).
                self.remove_holder(lock, uuid);
                continue;
            }
            if exclusive {
                break;
            }
        }
    }

    fn grant(
        &self,
        lock: &mut LockState,
        mode: Mode,
        acquirer_id: Option<AcquirerId>,
        now: Instant,
    ) -> Grant {
        let uuid = Uuid::new_v4();
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        if lock.holders.is_empty() {
            lock.holders.reserve_exact(1);
            self.locks_held.fetch_add(1, Ordering::Relaxed);
        }
        lock.holders.push(Holder {
            uuid,
            mode,
            token,
            granted: now,
            expires: now + self.ttl,
            acquirer_id,
        });
        self.leases.fetch_add(1, Ordering::Relaxed);
        self.grants.fetch_add(1, Ordering::Relaxed);
        Grant {
            uuid,
            fencing_token: token,
            ttl: self.ttl,
        }
    }

    fn remove_holder(&self, lock: &mut LockState, uuid: Uuid) -> bool {
        let Some(i) = lock.holders.iter().position(|h| h.uuid == uuid) else {
            return false;
        };
        lock.holders.remove(i);
        self.leases.fetch_sub(1, Ordering::Relaxed);
        if lock.holders.is_empty() {
            self.locks_held.fetch_sub(1, Ordering::Relaxed);
        }
        true
    }

    /// May a request that is not queued be granted now?
    fn newcomer_grantable(&self, lock: &LockState, mode: Mode, now: Instant) -> bool {
        !self.in_grace(now)
            && compatible(mode, &lock.holders)
            && match mode {
                Mode::Exclusive => lock.queue.is_empty(),
                Mode::Shared => lock.queue.iter().all(|w| w.mode == Mode::Shared),
            }
    }

    /// May the queued request at `pos` be granted now?
    fn queued_grantable(&self, lock: &LockState, pos: usize, now: Instant) -> bool {
        let mode = lock.queue[pos].mode;
        !self.in_grace(now)
            && compatible(mode, &lock.holders)
            && match mode {
                Mode::Exclusive => pos == 0,
                Mode::Shared => lock.queue.iter().take(pos).all(|w| w.mode == Mode::Shared),
            }
    }

    fn check_held_cap(&self) -> Result<(), StoreError> {
        if self.leases.load(Ordering::Relaxed) >= self.max_held as u64 {
            return Err(StoreError::Capacity(Capacity::Held { max: self.max_held }));
        }
        Ok(())
    }

    fn wake_reaper(&self, shard: usize, st: &ShardState) {
        if let Some(Reverse((at, _))) = st.timers.peek() {
            if st.reaper_until.is_none_or(|u| *at < u) {
                self.shards[shard].wake.notify_one();
            }
        }
    }
}

/// The state of one open long poll; dropping it ends the wait (see [`Store::acquire`]).
struct WaitGuard {
    inner: Arc<Inner>,
    shard: usize,
    key: Arc<str>,
    waiter: u64,
    attach: u64,
    keep_place: bool,
    rx: oneshot::Receiver<Delivery>,
    done: bool,
}

impl WaitGuard {
    /// Leaves the queue (or detaches, keeping the place); returns a grant that landed first.
    fn finish(&mut self) -> Option<Grant> {
        self.done = true;
        let mut st = lock_mutex(&self.inner.shards[self.shard].state);
        let now = Instant::now();
        let ShardState { locks, timers, .. } = &mut *st;
        let landed = match self.rx.try_recv() {
            Ok(Delivery::Granted(g)) => Some(g),
            _ => None,
        };
        if let Some(lock) = locks.get_mut(&self.key) {
            let pos = lock.queue.iter().position(|w| {
                w.id == self.waiter
                    && matches!(w.slot, Slot::Attached { attach, .. } if attach == self.attach)
            });
            if let Some(pos) = pos {
                if self.keep_place && !self.inner.closed() {
                    lock.queue[pos].slot = Slot::Detached {
                        expires: now + self.inner.ttl,
                    };
                } else {
                    lock.queue.remove(pos);
                    self.inner.waiters.fetch_sub(1, Ordering::Relaxed);
                }
            }
            self.inner.settle(timers, &self.key, lock, now);
            if lock.holders.is_empty() && lock.queue.is_empty() {
                locks.remove(&self.key);
            }
        }
        self.inner.wake_reaper(self.shard, &st);
        landed
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Cancelled: a lease granted at this moment has no one to tell; release it at once.
        if let Some(grant) = self.finish() {
            let mut st = lock_mutex(&self.inner.shards[self.shard].state);
            let now = Instant::now();
            let ShardState { locks, timers, .. } = &mut *st;
            if let Some(lock) = locks.get_mut(&self.key) {
                if self.inner.remove_holder(lock, grant.uuid) {
                    self.inner.releases.fetch_add(1, Ordering::Relaxed);
                }
                self.inner.settle(timers, &self.key, lock, now);
                if lock.holders.is_empty() && lock.queue.is_empty() {
                    locks.remove(&self.key);
                }
            }
            self.inner.wake_reaper(self.shard, &st);
        }
    }
}

enum Step {
    Done(Result<Acquired, StoreError>),
    Wait(WaitGuard),
}

impl MemoryStore {
    fn acquire_now(&self, spec: AcquireSpec) -> Step {
        let inner = &self.inner;
        if inner.closed() {
            return Step::Done(Err(StoreError::ShuttingDown));
        }
        let now = Instant::now();
        let shard = inner.shard_of(spec.name.as_str());
        let mut st = lock_mutex(&inner.shards[shard].state);
        let ShardState { locks, timers, .. } = &mut *st;
        let key: Arc<str> = match locks.get_key_value(spec.name.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(spec.name.as_str()),
        };
        let lock = locks.entry(key.clone()).or_default();
        inner.settle(timers, &key, lock, now);

        let place = spec.acquirer_id.as_ref().and_then(|id| {
            lock.queue
                .iter()
                .position(|w| w.acquirer_id.as_ref() == Some(id))
        });
        let step = if let Some(pos) = place {
            // A known acquirer asks again: its place is refreshed, and it may be its turn.
            lock.queue[pos].mode = spec.mode;
            if inner.queued_grantable(lock, pos, now) {
                match inner.check_held_cap() {
                    Ok(()) => {
                        let w = lock.queue.remove(pos).expect("position found above");
                        inner.waiters.fetch_sub(1, Ordering::Relaxed);
                        let grant = inner.grant(lock, w.mode, w.acquirer_id, now);
                        Step::Done(Ok(Acquired::Granted(grant)))
                    }
                    Err(e) => Step::Done(Err(e)),
                }
            } else if spec.wait.is_some() {
                let (tx, rx) = oneshot::channel();
                let attach = inner.next_id.fetch_add(1, Ordering::Relaxed);
                let w = &mut lock.queue[pos];
                // A long poll of the same acquirer still open (a client retrying) is
                // superseded: its channel closes and it answers `should wait`.
                w.slot = Slot::Attached { tx, attach };
                Step::Wait(WaitGuard {
                    inner: inner.clone(),
                    shard,
                    key: key.clone(),
                    waiter: w.id,
                    attach,
                    keep_place: true,
                    rx,
                    done: false,
                })
            } else {
                lock.queue[pos].slot = Slot::Detached {
                    expires: now + inner.ttl,
                };
                Step::Done(Ok(Acquired::ShouldWait))
            }
        } else if inner.newcomer_grantable(lock, spec.mode, now) {
            match inner.check_held_cap() {
                Ok(()) => {
                    let grant = inner.grant(lock, spec.mode, spec.acquirer_id, now);
                    Step::Done(Ok(Acquired::Granted(grant)))
                }
                Err(e) => Step::Done(Err(e)),
            }
        } else if spec.wait.is_none() && spec.acquirer_id.is_none() {
            Step::Done(Ok(Acquired::ShouldWait))
        } else if inner.waiters.load(Ordering::Relaxed) >= inner.max_waiters as u64 {
            Step::Done(Err(StoreError::Capacity(Capacity::Waiters {
                max: inner.max_waiters,
            })))
        } else {
            let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            inner.waiters.fetch_add(1, Ordering::Relaxed);
            let keep_place = spec.acquirer_id.is_some();
            if spec.wait.is_some() {
                let (tx, rx) = oneshot::channel();
                lock.queue.push_back(Waiter {
                    id,
                    mode: spec.mode,
                    acquirer_id: spec.acquirer_id,
                    since: now,
                    slot: Slot::Attached { tx, attach: id },
                });
                Step::Wait(WaitGuard {
                    inner: inner.clone(),
                    shard,
                    key: key.clone(),
                    waiter: id,
                    attach: id,
                    keep_place,
                    rx,
                    done: false,
                })
            } else {
                lock.queue.push_back(Waiter {
                    id,
                    mode: spec.mode,
                    acquirer_id: spec.acquirer_id,
                    since: now,
                    slot: Slot::Detached {
                        expires: now + inner.ttl,
                    },
                });
                Step::Done(Ok(Acquired::ShouldWait))
            }
        };
        // A grant may let more shared waiters in; a new place needs a timer.
        inner.settle(timers, &key, lock, now);
        if lock.holders.is_empty() && lock.queue.is_empty() {
            locks.remove(&key);
        }
        inner.wake_reaper(shard, &st);
        step
    }

    fn lease_op(&self, lease: &LeaseRef, release: bool) -> Result<(), StoreError> {
        let inner = &self.inner;
        if !release && inner.closed() {
            return Err(StoreError::NoLease);
        }
        let now = Instant::now();
        let shard = inner.shard_of(lease.name.as_str());
        let mut st = lock_mutex(&inner.shards[shard].state);
        let ShardState { locks, timers, .. } = &mut *st;
        let Some((key, _)) = locks.get_key_value(lease.name.as_str()) else {
            return Err(StoreError::NoLease);
        };
        let key = key.clone();
        let lock = locks.get_mut(&key).expect("just looked up");
        inner.settle(timers, &key, lock, now);
        let result = if release {
            if inner.remove_holder(lock, lease.uuid) {
                inner.releases.fetch_add(1, Ordering::Relaxed);
                Ok(())
            } else if lock.holders.is_empty() {
                Err(StoreError::NoLease)
            } else {
                Err(StoreError::AlreadyLeased)
            }
        } else if let Some(h) = lock.holders.iter_mut().find(|h| h.uuid == lease.uuid) {
            h.expires = now + inner.ttl;
            Ok(())
        } else if lock.holders.is_empty() {
            Err(StoreError::NoLease)
        } else {
            Err(StoreError::AlreadyLeased)
        };
        if release && result.is_ok() {
            inner.settle(timers, &key, lock, now);
        }
        if lock.holders.is_empty() && lock.queue.is_empty() {
            locks.remove(&key);
        }
        inner.wake_reaper(shard, &st);
        result
    }

    /// Removes the queue place of `id` (an open long poll of it answers `should wait`).
    fn cancel_now(&self, name: &str, id: &AcquirerId) {
        let inner = &self.inner;
        let now = Instant::now();
        let shard = inner.shard_of(name);
        let mut st = lock_mutex(&inner.shards[shard].state);
        let ShardState { locks, timers, .. } = &mut *st;
        let Some((key, _)) = locks.get_key_value(name) else {
            return;
        };
        let key = key.clone();
        let lock = locks.get_mut(&key).expect("just looked up");
        if let Some(pos) = lock
            .queue
            .iter()
            .position(|w| w.acquirer_id.as_ref() == Some(id))
        {
            // Dropping an open long poll's channel answers it `should wait`.
            lock.queue.remove(pos);
            inner.waiters.fetch_sub(1, Ordering::Relaxed);
        }
        // The lock may have been kept for the place: the next waiter gets it.
        inner.settle(timers, &key, lock, now);
        if lock.holders.is_empty() && lock.queue.is_empty() {
            locks.remove(&key);
        }
        inner.wake_reaper(shard, &st);
    }

    fn status_now(&self, query: &StatusQuery) -> StatusResponse {
        let inner = &self.inner;
        let now = Instant::now();
        let mut names: Vec<Arc<str>> = Vec::new();
        for shard in inner.shards.iter() {
            let st = lock_mutex(&shard.state);
            match &query.name {
                Some(n) => names.extend(st.locks.get_key_value(n.as_str()).map(|(k, _)| k.clone())),
                None => names.extend(st.locks.keys().cloned()),
            }
        }
        names.sort_unstable();
        let total = names.len();
        names.truncate(query.limit);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut locks = Vec::with_capacity(names.len());
        for name in names {
            let st = lock_mutex(&inner.shards[inner.shard_of(&name)].state);
            let Some(lock) = st.locks.get(&name) else {
                continue;
            };
            let holders: Vec<HolderStatus> = lock
                .holders
                .iter()
                .filter(|h| h.expires > now)
                .map(|h| HolderStatus {
                    mode: h.mode,
                    fencing_token: h.token,
                    acquirer_id: h.acquirer_id.as_ref().map(|a| a.as_str().to_owned()),
                    held_ms: ms(now.saturating_duration_since(h.granted)),
                    expires_in_ms: ms(h.expires.saturating_duration_since(now)),
                })
                .collect();
            let waiters = lock
                .queue
                .iter()
                .map(|w| WaiterStatus {
                    mode: w.mode,
                    acquirer_id: w.acquirer_id.as_ref().map(|a| a.as_str().to_owned()),
                    waiting_ms: ms(now.saturating_duration_since(w.since)),
                    long_poll: matches!(w.slot, Slot::Attached { .. }),
                    place_expires_in_ms: match w.slot {
                        Slot::Detached { expires } => {
                            Some(ms(expires.saturating_duration_since(now)))
                        }
                        Slot::Attached { .. } => None,
                    },
                })
                .collect();
            locks.push(LockStatus {
                lock_name: name.to_string(),
                mode: holders.first().map(|h| h.mode),
                holders,
                waiters,
            });
        }
        StatusResponse {
            locks,
            total,
            truncated: total > query.limit,
            ttl_ms: ms(inner.ttl),
        }
    }
}

impl Store for MemoryStore {
    fn acquire(&self, spec: AcquireSpec) -> StoreFuture<'_, Result<Acquired, StoreError>> {
        Box::pin(async move {
            self.start_reapers();
            let wait = spec.wait;
            let mut guard = match self.acquire_now(spec) {
                Step::Done(r) => return r,
                Step::Wait(g) => g,
            };
            let wait = wait.unwrap_or_default();
            match tokio::time::timeout(wait, &mut guard.rx).await {
                Ok(Ok(Delivery::Granted(grant))) => {
                    guard.done = true;
                    Ok(Acquired::Granted(grant))
                }
                Ok(Ok(Delivery::Closing)) => {
                    guard.done = true;
                    Err(StoreError::ShuttingDown)
                }
                // Superseded by a newer request of the same acquirer, or cancelled.
                Ok(Err(_)) => {
                    guard.done = true;
                    Ok(Acquired::ShouldWait)
                }
                Err(_elapsed) => match guard.finish() {
                    Some(grant) => Ok(Acquired::Granted(grant)),
                    None if self.inner.closed() => Err(StoreError::ShuttingDown),
                    None => Ok(Acquired::ShouldWait),
                },
            }
        })
    }

    fn renew(&self, lease: LeaseRef) -> StoreFuture<'_, Result<Duration, StoreError>> {
        Box::pin(async move {
            self.lease_op(&lease, false)?;
            Ok(self.inner.ttl)
        })
    }

    fn release(&self, lease: LeaseRef) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.lease_op(&lease, true) })
    }

    fn status(&self, query: StatusQuery) -> StoreFuture<'_, Result<StatusResponse, StoreError>> {
        Box::pin(async move { Ok(self.status_now(&query)) })
    }

    fn cancel(
        &self,
        name: crate::LockName,
        acquirer_id: AcquirerId,
    ) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.cancel_now(name.as_str(), &acquirer_id);
            Ok(())
        })
    }

    fn stats(&self) -> StoreStats {
        let i = &self.inner;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            locks_held: get(&i.locks_held),
            leases: get(&i.leases),
            waiters: get(&i.waiters),
            grants: get(&i.grants),
            releases: get(&i.releases),
            lease_expiries: get(&i.lease_expiries),
            place_expiries: get(&i.place_expiries),
        }
    }

    fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    fn grace_remaining(&self) -> Option<Duration> {
        let left = self
            .inner
            .grace_until
            .saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    fn close(&self) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        for shard in inner.shards.iter() {
            let mut st = lock_mutex(&shard.state);
            for lock in st.locks.values_mut() {
                let mut ended = 0;
                for w in std::mem::take(&mut lock.queue) {
                    match w.slot {
                        Slot::Attached { tx, .. } => {
                            let _ = tx.send(Delivery::Closing);
                            ended += 1;
                        }
                        slot @ Slot::Detached { .. } => lock.queue.push_back(Waiter { slot, ..w }),
                    }
                }
                inner.waiters.fetch_sub(ended, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests;
