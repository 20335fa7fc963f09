//! The memory store: one server's leases, in its memory.

mod config;
mod fencing;
mod state;
mod status;
mod wait;

use std::hash::RandomState;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::config::ConfigError;
use super::store::{
    AcquireSpec, Acquired, AcquirerId, LeaseRef, StatusQuery, Store, StoreError, StoreFuture,
    StoreStats,
};
use crate::http::protocol::StatusResponse;
pub use config::MemoryConfig;
use fencing::Fencing;
use state::{lock_mutex, reap, Delivery, Inner, Shard, ShardState, Slot, Waiter, SHARDS};
use wait::WaitGuard;

/// Go lockgate's lease TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

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
/// # Memory
///
/// About 330 bytes per held lease and 190 per queued acquirer (BENCHMARKS.md measures them), on
/// top of what an open connection costs (about 25 KiB); a lock nobody holds or waits for takes
/// none. The caps of [`MemoryConfig`] bound the total.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use lockgate::server::{AcquireSpec, Acquired, LeaseRef, MemoryConfig, MemoryStore, Store};
/// use lockgate::{LockName, Mode};
///
/// let store = MemoryStore::new(MemoryConfig::default().grace(Duration::ZERO))?;
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

impl MemoryStore {
    /// An empty store. Its expiry tasks start on the Tokio runtime of its first acquisition.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a TTL of zero or over [`MAX_DURATION`](super::MAX_DURATION), a grace
    /// over it, a cap of zero, or a fencing state file that cannot be read or written.
    pub fn new(config: MemoryConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let now = Instant::now();
        let inner = Inner {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            ttl: config.ttl,
            max_held: config.max_held,
            max_waiters: config.max_waiters,
            max_waiters_per_client: config.max_waiters_per_client,
            max_waiters_per_lock: config.max_waiters_per_lock,
            clients: Mutex::default(),
            grace_until: now + config.grace.unwrap_or(config.ttl),
            closed: AtomicBool::new(false),
            // Tokens start at the wall clock in microseconds (or above the persisted ceiling),
            // so a restarted server continues above its predecessor's tokens.
            fencing: Fencing::open(config.fencing_state.as_deref())?,
            next_id: AtomicU64::new(1),
            leases: AtomicU64::new(0),
            locks_held: AtomicU64::new(0),
            waiters: AtomicU64::new(0),
            grants: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            lease_expiries: AtomicU64::new(0),
            place_expiries: AtomicU64::new(0),
        };
        Ok(Self {
            inner: Arc::new(inner),
            reapers: OnceLock::new(),
        })
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

enum Step {
    Done(Result<Acquired, StoreError>),
    Wait(WaitGuard),
}

impl MemoryStore {
    fn acquire_now(&self, spec: AcquireSpec) -> Step {
        let inner = &self.inner;
        let now = Instant::now();
        let shard = inner.shard_of(spec.name.as_str());
        let mut st = lock_mutex(&inner.shards[shard].state);
        // Under the shard's lock: `close` sets the flag before it ends the waits of each shard,
        // so a wait that starts as the store closes is either seen by it or refused here.
        if inner.closed() {
            return Step::Done(Err(StoreError::ShuttingDown));
        }
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
                        inner.waiter_left(w.client);
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
        } else if let Err(e) = inner.waiter_joins(lock, spec.client) {
            Step::Done(Err(e))
        } else {
            let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            let keep_place = spec.acquirer_id.is_some();
            if spec.wait.is_some() {
                let (tx, rx) = oneshot::channel();
                lock.queue.push_back(Waiter {
                    id,
                    mode: spec.mode,
                    acquirer_id: spec.acquirer_id,
                    client: spec.client,
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
                    client: spec.client,
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
            if let Some(w) = lock.queue.remove(pos) {
                inner.waiter_left(w.client);
            }
        }
        // The lock may have been kept for the place: the next waiter gets it.
        inner.settle(timers, &key, lock, now);
        if lock.holders.is_empty() && lock.queue.is_empty() {
            locks.remove(&key);
        }
        inner.wake_reaper(shard, &st);
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
                for w in std::mem::take(&mut lock.queue) {
                    match w.slot {
                        Slot::Attached { tx, .. } => {
                            let _ = tx.send(Delivery::Closing);
                            inner.waiter_left(w.client);
                        }
                        slot @ Slot::Detached { .. } => lock.queue.push_back(Waiter { slot, ..w }),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
