//! What `lockgate status` shows of a Kubernetes object: its lock records.

use super::record::{Record, KEY_PREFIX};
use super::Object;
use crate::error::Error;
use crate::options::{Holder, Mode};

/// One lock record on the object, as [`KubernetesLocker::status`](super::KubernetesLocker::status)
/// reports it.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct RecordStatus {
    /// The annotation key.
    pub key: String,
    /// The lock name recorded in it.
    pub name: Option<String>,
    /// Shared or exclusive.
    pub mode: Option<Mode>,
    /// How many holders the record counts (0: free).
    pub count: i64,
    /// Who holds it, as recorded (see [`Holder`]); a record Go wrote shows its lease with a
    /// count instead.
    pub holders: Vec<Holder>,
    /// How many waiters are queued in it.
    pub waiters: usize,
    /// The lease UUID.
    pub uuid: Option<String>,
    /// Seconds until the writer's `ExpireAtTimestamp`, by the API server's clock.
    pub expires_in_secs: Option<i64>,
    /// Why the record could not be read, for a corrupt one.
    pub error: Option<String>,
}

impl Object {
    pub(crate) async fn status(&self) -> Result<Vec<RecordStatus>, Error> {
        let snap = self.store.get().await?;
        let now = self.store.server_now();
        Ok(snap
            .annotations
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k.starts_with(KEY_PREFIX))
            .map(|(key, value)| match Record::parse(&value) {
                Ok(r) => RecordStatus {
                    key,
                    mode: Some(r.mode()),
                    count: r.shared_holders,
                    holders: r.holders(),
                    waiters: r
                        .queue
                        .keys()
                        .filter(|k| *k != super::queue::HOLDER_MARK)
                        .count(),
                    expires_in_secs: Some(r.expire_at.saturating_sub(now)),
                    name: Some(r.lock_name),
                    uuid: Some(r.uuid),
                    error: None,
                },
                Err(e) => RecordStatus {
                    key,
                    name: None,
                    mode: None,
                    count: 0,
                    holders: Vec::new(),
                    waiters: 0,
                    uuid: None,
                    expires_in_secs: None,
                    error: Some(e.to_string()),
                },
            })
            .collect())
    }
}
