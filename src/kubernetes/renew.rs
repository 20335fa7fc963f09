//! Renewal of the leases a locker holds on its object: one conditional write for all of them.
//! When to renew and when a lease counts as lost is the session's business.

use std::sync::Arc;

use super::record::Record;
use super::release::Held;
use super::store::{Change, WriteError};
use super::Object;
use crate::backend::{BoxFuture, LostReason};
use crate::session::{Renewal, Renewer};

impl Renewer for Arc<Object> {
    type State = Held;

    fn renew(&self, leases: Vec<(String, Held)>) -> BoxFuture<'_, Vec<Renewal<Held>>> {
        Box::pin(self.renew_all(leases))
    }

    fn same_lease(a: &Held, b: &Held) -> bool {
        a.uuid == b.uuid
    }

    fn merge(held: &Held, joined: Held) -> Held {
        let mut merged = joined;
        merged.ids.extend(held.ids.iter().cloned());
        merged
    }
}

impl Object {
    /// Renews `leases` in one conditional write. A write that fails because some record changed
    /// (shared holders joined or left, waiters queued: still ours; a take-over: lost) is retried
    /// on the records as they are now; after a second conflict the batch is split in halves, so
    /// that records changing all the time (being released one after another, say) cannot keep
    /// the others from being renewed.
    async fn renew_all(&self, leases: Vec<(String, Held)>) -> Vec<Renewal<Held>> {
        let mut out: Vec<Option<Renewal<Held>>> = leases.iter().map(|_| None).collect();
        // Work list: (items, conflicts so far).
        let mut work: Vec<(Chunk, u32)> = vec![(
            leases
                .into_iter()
                .enumerate()
                .map(|(i, (k, h))| (i, k, h))
                .collect(),
            0,
        )];
        let mut budget = 8 + 2 * out.len();
        while let Some((mut chunk, conflicts)) = work.pop() {
            chunk.retain(|(i, _, _)| out[*i].is_none());
            if chunk.is_empty() {
                continue;
            }
            if budget == 0 {
                break;
            }
            budget -= 1;
            match self.renew_chunk(&mut chunk, &mut out).await {
                Ok(()) => {}
                Err(Conflict) if conflicts >= 1 && chunk.len() > 1 => {
                    let rest = chunk.split_off(chunk.len() / 2);
                    work.push((rest, 0));
                    work.push((chunk, 0));
                }
                Err(Conflict) => work.push((chunk, conflicts + 1)),
                Err(Failed) => break,
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or(Renewal::Unknown))
            .collect()
    }

    /// One conditional write renewing `chunk`; outcomes go into `out`. After a conflict, the
    /// records of `chunk` are refreshed from a read (or declared lost).
    async fn renew_chunk(
        &self,
        chunk: &mut [(usize, String, Held)],
        out: &mut [Option<Renewal<Held>>],
    ) -> Result<(), ChunkError> {
        let expire_at = self.expire_at();
        let mut changes = Vec::with_capacity(chunk.len());
        for (i, key, held) in chunk.iter() {
            match Record::parse(&held.value) {
                Ok(rec) => changes.push((
                    *i,
                    Change {
                        key: key.clone(),
                        expected: Some(held.value.clone()),
                        new: Some(rec.renewed(expire_at).to_value()),
                    },
                )),
                Err(e) => {
                    tracing::error!(key, error = %e, "a held record does not parse");
                    out[*i] = Some(Renewal::Unknown);
                }
            }
        }
        let writes: Vec<Change> = changes.iter().map(|(_, c)| c.clone()).collect();
        match self.store.write(&writes, true).await {
            Ok(_) => {
                for ((i, c), (_, _, held)) in changes.into_iter().zip(chunk.iter()) {
                    out[i] = Some(Renewal::Renewed(Held {
                        value: c.new.expect("renewals write records"),
                        ..held.clone()
                    }));
                }
                Ok(())
            }
            Err(WriteError::Conflict) => {
                let snap = match self.store.get().await {
                    Ok(snap) => snap,
                    Err(e) => {
                        tracing::warn!(object = %self.store.describe, error = %crate::error::chain(&e), "cannot read the lock object to renew leases");
                        return Err(Failed);
                    }
                };
                for (i, key, held) in chunk.iter_mut() {
                    // Still ours (shared holders joined or left, waiters queued), or gone: a
                    // record under our uuid that names only other holders is somebody else's.
                    let ours = snap
                        .get(key)
                        .filter(|v| Record::parse(v).is_ok_and(|r| held.is_ours(&r)));
                    match ours {
                        Some(v) => held.value = v.to_owned(),
                        None => out[*i] = Some(Renewal::Lost(LostReason::Taken)),
                    }
                }
                Err(Conflict)
            }
            Err(WriteError::Unknown(e) | WriteError::Failed(e)) => {
                tracing::warn!(object = %self.store.describe, error = %crate::error::chain(&e), "lease renewal failed; retrying");
                Err(Failed)
            }
        }
    }
}

/// Leases to renew together: (index in the answer, record key, lease).
type Chunk = Vec<(usize, String, Held)>;

/// Why a chunk was not renewed.
enum ChunkError {
    /// Some record changed: refreshed from a read, try again.
    Conflict,
    /// The API server did not answer or refused: the session retries.
    Failed,
}
use ChunkError::{Conflict, Failed};
