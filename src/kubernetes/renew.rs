//! Renewal of the leases a locker holds on its object: one conditional write for all of them.
//! When to renew and when a lease counts as lost is the session's business.

use std::sync::Arc;

use super::record::Record;
use super::release::Held;
use super::store::{Change, WriteError};
use super::Object;
use crate::backend::{BoxFuture, LostReason};
use crate::session::{Renewal, Renewer};

/// How many times a renewal round re-reads after a conflict before it lets the session retry.
const ROUNDS: usize = 3;

impl Renewer for Arc<Object> {
    type State = Held;

    fn renew(&self, leases: Vec<(String, Held)>) -> BoxFuture<'_, Vec<Renewal<Held>>> {
        Box::pin(self.renew_all(leases))
    }
}

impl Object {
    async fn renew_all(&self, leases: Vec<(String, Held)>) -> Vec<Renewal<Held>> {
        let mut out: Vec<Option<Renewal<Held>>> = leases.iter().map(|_| None).collect();
        let mut pending: Vec<(usize, String, Held)> = leases
            .into_iter()
            .enumerate()
            .map(|(i, (k, h))| (i, k, h))
            .collect();
        for _ in 0..ROUNDS {
            if pending.is_empty() {
                break;
            }
            let expire_at = self.expire_at();
            let mut changes = Vec::with_capacity(pending.len());
            for (i, key, held) in &pending {
                match Record::parse(&held.value) {
                    Ok(rec) => changes.push(Change {
                        key: key.clone(),
                        expected: Some(held.value.clone()),
                        new: Some(rec.renewed(expire_at).to_value()),
                    }),
                    Err(e) => {
                        tracing::error!(key, error = %e, "a held record does not parse");
                        out[*i] = Some(Renewal::Unknown);
                    }
                }
            }
            pending.retain(|(i, _, _)| out[*i].is_none());
            match self.store.write(&changes, true).await {
                Ok(_) => {
                    for ((i, _, held), c) in pending.drain(..).zip(changes) {
                        out[i] = Some(Renewal::Renewed(Held {
                            uuid: held.uuid,
                            value: c.new.expect("renewals write records"),
                        }));
                    }
                }
                Err(WriteError::Conflict) => {
                    // Some record changed: other shared holders joined or left, waiters queued
                    // (still ours), or someone took a lock over (lost). Sort them out and
                    // renew the rest on what is there now.
                    let snap = match self.store.get().await {
                        Ok(snap) => snap,
                        Err(e) => {
                            tracing::warn!(object = %self.store.describe, error = %crate::error::chain(&e), "cannot read the lock object to renew leases");
                            break;
                        }
                    };
                    for (i, key, held) in &mut pending {
                        let ours = snap.get(key).filter(|v| {
                            Record::parse(v)
                                .is_ok_and(|r| r.uuid == held.uuid && r.shared_holders > 0)
                        });
                        match ours {
                            Some(v) => held.value = v.to_owned(),
                            None => out[*i] = Some(Renewal::Lost(LostReason::Taken)),
                        }
                    }
                    pending.retain(|(i, _, _)| out[*i].is_none());
                }
                Err(WriteError::Unknown(e) | WriteError::Failed(e)) => {
                    tracing::warn!(object = %self.store.describe, error = %crate::error::chain(&e), "lease renewal failed; retrying");
                    break;
                }
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or(Renewal::Unknown))
            .collect()
    }
}
