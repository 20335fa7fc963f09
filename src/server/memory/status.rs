//! What `GET /status` shows of the memory store.

use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::state::{lock_mutex, Slot};
use super::MemoryStore;
use crate::http::protocol::{HolderStatus, LockStatus, StatusResponse, WaiterStatus};
use crate::server::store::StatusQuery;

impl MemoryStore {
    pub(super) fn status_now(&self, query: &StatusQuery) -> StatusResponse {
        let inner = &self.inner;
        let now = Instant::now();
        // Each shard's locks are in name order: its first `limit` names after `after` are
        // read without touching the others, so the work is bounded by the limit, not by the
        // number of locks.
        let mut names: Vec<Arc<str>> = Vec::new();
        let mut total = 0;
        match &query.name {
            Some(n) => {
                let st = lock_mutex(&inner.shards[inner.shard_of(n)].state);
                names.extend(st.locks.get_key_value(n.as_str()).map(|(k, _)| k.clone()));
                total = names.len();
            }
            None => {
                let after = query.after.as_deref();
                for shard in inner.shards.iter() {
                    let st = lock_mutex(&shard.state);
                    let from = match after {
                        Some(a) => Bound::Excluded(a),
                        None => Bound::Unbounded,
                    };
                    // One more than the page: whether more follow.
                    let range = st.locks.range::<str, _>((from, Bound::Unbounded));
                    names.extend(range.take(query.limit + 1).map(|(k, _)| k.clone()));
                    total += st.locks.len();
                }
            }
        }
        names.sort_unstable();
        let more = names.len() > query.limit;
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
            truncated: more,
            ttl_ms: ms(inner.ttl),
        }
    }
}
