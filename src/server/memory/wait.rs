//! An open long poll's hold on its queue place: ending the wait, however it ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::state::{lock_mutex, Delivery, Inner, ShardState, Slot};
use crate::server::store::Grant;

/// The state of one open long poll; dropping it ends the wait (see [`Store::acquire`]).
pub(super) struct WaitGuard {
    pub(super) inner: Arc<Inner>,
    pub(super) shard: usize,
    pub(super) key: Arc<str>,
    pub(super) waiter: u64,
    pub(super) attach: u64,
    pub(super) keep_place: bool,
    pub(super) rx: oneshot::Receiver<Delivery>,
    pub(super) done: bool,
}

impl WaitGuard {
    /// Leaves the queue (or detaches, keeping the place); returns a grant that landed first.
    pub(super) fn finish(&mut self) -> Option<Grant> {
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
                } else if let Some(w) = lock.queue.remove(pos) {
                    self.inner.waiter_left(w.client);
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
