//! The memory store's state: shards of locks with their holders and queues, the expiry task of
//! each shard, and the guard of an open long poll.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use uuid::Uuid;

use super::fencing::Fencing;
use crate::server::store::{AcquirerId, Capacity, Grant, StoreError};
use crate::Mode;

pub(super) const SHARDS: usize = 16;
/// Expiry work done under one shard lock before letting requests in again.
pub(super) const REAP_BATCH: usize = 512;
/// How often leases nobody waits for are looked at (they are expired for every reader as soon
/// as their TTL passes; the sweep only frees their memory).
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) shards: Box<[Shard]>,
    pub(super) hasher: RandomState,
    pub(super) ttl: Duration,
    pub(super) max_held: usize,
    pub(super) max_waiters: usize,
    pub(super) max_waiters_per_client: usize,
    pub(super) max_waiters_per_lock: usize,
    /// Queued acquirers by client.
    pub(super) clients: Mutex<HashMap<IpAddr, usize>>,
    pub(super) grace_until: Instant,
    pub(super) closed: AtomicBool,
    pub(super) fencing: Fencing,
    pub(super) next_id: AtomicU64,
    pub(super) leases: AtomicU64,
    pub(super) locks_held: AtomicU64,
    pub(super) waiters: AtomicU64,
    pub(super) grants: AtomicU64,
    pub(super) releases: AtomicU64,
    pub(super) lease_expiries: AtomicU64,
    pub(super) place_expiries: AtomicU64,
}

#[derive(Debug, Default)]
pub(super) struct Shard {
    pub(super) state: Mutex<ShardState>,
    pub(super) wake: Notify,
}

#[derive(Debug, Default)]
pub(super) struct ShardState {
    /// By name, in order: `/status` reads the first names of each shard.
    pub(super) locks: BTreeMap<Arc<str>, LockState>,
    /// When to look at a lock with waiters again (lease or queue place expiry, end of grace). A
    /// lock has at most a few entries: renewals only move `Holder::expires`; an entry that fires
    /// early re-arms itself.
    pub(super) timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    /// The reaper sleeps until then (`None`: until woken).
    pub(super) reaper_until: Option<Instant>,
}

#[derive(Debug, Default)]
pub(super) struct LockState {
    pub(super) holders: Vec<Holder>,
    pub(super) queue: VecDeque<Waiter>,
    /// The earliest entry of this lock in `timers`.
    pub(super) scheduled: Option<Instant>,
}

#[derive(Debug)]
pub(super) struct Holder {
    pub(super) uuid: Uuid,
    pub(super) mode: Mode,
    pub(super) token: u64,
    pub(super) granted: Instant,
    pub(super) expires: Instant,
    pub(super) acquirer_id: Option<AcquirerId>,
}

#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) id: u64,
    pub(super) mode: Mode,
    pub(super) acquirer_id: Option<AcquirerId>,
    /// The client it counts against.
    pub(super) client: Option<IpAddr>,
    pub(super) since: Instant,
    pub(super) slot: Slot,
}

#[derive(Debug)]
pub(super) enum Slot {
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
pub(super) enum Delivery {
    Granted(Grant),
    Closing,
}

pub(super) fn lock_mutex<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks panics by design; if something did, the state is still the
    // last consistent one each operation left, so serving on is better than failing every
    // request after.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn compatible(mode: Mode, holders: &[Holder]) -> bool {
    match holders.first() {
        None => true,
        Some(h) => mode == Mode::Shared && h.mode == Mode::Shared,
    }
}

/// Expires leases and queue places of one shard: at once where someone waits (timers), and
/// within [`SWEEP_EVERY`] where nobody does (a sweep of the shard).
pub(super) async fn reap(inner: Arc<Inner>, shard: usize) {
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
    pub(super) fn shard_of(&self, name: &str) -> usize {
        (self.hasher.hash_one(name) as usize) % SHARDS
    }

    pub(super) fn in_grace(&self, now: Instant) -> bool {
        now < self.grace_until
    }

    pub(super) fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Drops what expired, grants what can be granted, and re-arms the lock's timer.
    pub(super) fn settle(
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
    pub(super) fn sweep(&self, lock: &mut LockState, now: Instant) {
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
        lock.queue.retain(|w| {
            let keep = match &w.slot {
                Slot::Detached { expires } => *expires > now,
                Slot::Attached { tx, .. } => !tx.is_closed(),
            };
            if !keep {
                self.place_expiries.fetch_add(1, Ordering::Relaxed);
                self.waiter_left(w.client);
            }
            keep
        });
    }

    /// A new queue place for `client` in `lock`, within the caps.
    pub(super) fn waiter_joins(
        &self,
        lock: &LockState,
        client: Option<IpAddr>,
    ) -> Result<(), StoreError> {
        if self.waiters.load(Ordering::Relaxed) >= self.max_waiters as u64 {
            return Err(StoreError::Capacity(Capacity::Waiters {
                max: self.max_waiters,
            }));
        }
        if lock.queue.len() >= self.max_waiters_per_lock {
            return Err(StoreError::Capacity(Capacity::LockWaiters {
                max: self.max_waiters_per_lock,
            }));
        }
        if let Some(c) = client {
            let mut clients = lock_mutex(&self.clients);
            let n = clients.entry(c).or_default();
            if *n >= self.max_waiters_per_client {
                return Err(StoreError::Capacity(Capacity::ClientWaiters {
                    max: self.max_waiters_per_client,
                }));
            }
            *n += 1;
        }
        self.waiters.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A queue place of `client` is gone.
    pub(super) fn waiter_left(&self, client: Option<IpAddr>) {
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        if let Some(c) = client {
            let mut clients = lock_mutex(&self.clients);
            if let std::collections::hash_map::Entry::Occupied(mut e) = clients.entry(c) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// Grants queued long polls the lock can take now, in queue order. A poller between requests
    /// whose turn it is keeps the lock for itself (exclusive) or lets the shared run go on.
    pub(super) fn pump(&self, lock: &mut LockState, now: Instant) {
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
            self.waiter_left(w.client);
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

    pub(super) fn grant(
        &self,
        lock: &mut LockState,
        mode: Mode,
        acquirer_id: Option<AcquirerId>,
        now: Instant,
    ) -> Grant {
        let uuid = Uuid::new_v4();
        let token = self.fencing.next();
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

    pub(super) fn remove_holder(&self, lock: &mut LockState, uuid: Uuid) -> bool {
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
    pub(super) fn newcomer_grantable(&self, lock: &LockState, mode: Mode, now: Instant) -> bool {
        !self.in_grace(now)
            && compatible(mode, &lock.holders)
            && match mode {
                Mode::Exclusive => lock.queue.is_empty(),
                Mode::Shared => lock.queue.iter().all(|w| w.mode == Mode::Shared),
            }
    }

    /// May the queued request at `pos` be granted now?
    pub(super) fn queued_grantable(&self, lock: &LockState, pos: usize, now: Instant) -> bool {
        let mode = lock.queue[pos].mode;
        !self.in_grace(now)
            && compatible(mode, &lock.holders)
            && match mode {
                Mode::Exclusive => pos == 0,
                Mode::Shared => lock.queue.iter().take(pos).all(|w| w.mode == Mode::Shared),
            }
    }

    pub(super) fn check_held_cap(&self) -> Result<(), StoreError> {
        if self.leases.load(Ordering::Relaxed) >= self.max_held as u64 {
            return Err(StoreError::Capacity(Capacity::Held { max: self.max_held }));
        }
        Ok(())
    }

    pub(super) fn wake_reaper(&self, shard: usize, st: &ShardState) {
        if let Some(Reverse((at, _))) = st.timers.peek() {
            if st.reaper_until.is_none_or(|u| *at < u) {
                self.shards[shard].wake.notify_one();
            }
        }
    }
}
