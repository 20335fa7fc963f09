//! The Kubernetes side of the HTTP lock server's Kubernetes store (`lockgate serve --store
//! kubernetes://…`): acquisitions, renewals and releases of the annotation records on behalf of
//! HTTP clients, stateless per handle.
//!
//! A handle's uuid is the record's uuid (shared holders share it, as in Go's protocol), so any
//! server over the same object can renew or release any handle, and a restarted server serves
//! the held leases on. Acquisitions use the locker's machinery (the watch, the queue, every rule
//! of PROTOCOL.md) but join no renewing session: the HTTP client renews through the server.
//! What this process last wrote or read of each record is kept only to send conditional writes
//! without reading first; a stale value costs a failed `test` and a GET.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kube::api::Api;

use super::acquire::{Acquisition, Granted as Grant};
use super::client::resolve;
use super::queue::{new_id, HOLDER_MARK};
use super::record::{annotation_key, Record, KEY_PREFIX};
use super::release::Held;
use super::store::{transient, Change, Snapshot, Store, WriteError};
use super::{LeaseConfig, Object};
use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::{AcquireOptions, Mode, Wait};

/// The queue id for a request of the HTTP acquirer `acquirer`: a Rust waiter's id (its arrival
/// in nanoseconds, `-`, 12 hex digits) whose hex digits are derived from the acquirer id, so that
/// every later request of it, to any server on the object, finds its entry (the acquisition
/// adopts the entry with the same suffix, keeping its arrival). Rust's shape makes the record's
/// rules treat it as what it is, a waiter served by a lockgate process: a release reserves the
/// record for it (Go v0.2 sees it unexpired and leaves it alone) and its grant keeps the
/// record's uuid (PROTOCOL.md, "Go v0.2 peers"). With an id of Go's shape a release would leave
/// the record expired for Go, and a Go v0.2 process taking it over would fail its re-read when
/// the server granted it meanwhile.
fn queue_id(acquirer: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let h = Sha256::digest(acquirer.as_bytes());
    let fresh = new_id();
    format!("{}-{}", &fresh[..20], crate::hex(&h[..6]))
}

/// Why a renewal or a release found no lease of the handle.
#[derive(Debug)]
pub(crate) enum LeaseError {
    /// No record, or a free one (released): Go's `no existing lock lease found`.
    NoLease,
    /// A record under another uuid: Go's `lock already leased`.
    AlreadyLeased,
    /// The API server failed or refused; nothing was written.
    Failed(Error),
    /// The API server failed after a write was sent: it may have been applied.
    InDoubt(Error),
}

impl From<Error> for LeaseError {
    fn from(e: Error) -> Self {
        LeaseError::Failed(e)
    }
}

/// A grant: the record's uuid (the handle) and the fencing token.
#[derive(Debug)]
pub(crate) struct Granted {
    pub uuid: String,
    pub token: u64,
}

/// What the object holds, as the HTTP lock server's caps count it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Bytes of all annotations (keys and values; Kubernetes allows 256 KiB in all).
    pub bytes: usize,
    /// Lock records with live holders.
    pub held: usize,
    /// Live queue entries (holder marks not counted).
    pub waiters: usize,
    /// Records and queue entries removed by this sweep.
    pub removed: usize,
}

/// How long a free record, a dead lease or a dead queue entry stands idle (by the API server's
/// clock, past its `ExpireAtTimestamp`) before the server removes it. Go v0.2 reads a record
/// twice within one attempt and fails if it vanished in between: a record idle this long has
/// nobody polling for it (Go pollers take a free or expired record within 2 s).
pub(crate) const IDLE_SECS: i64 = 30;

/// One record, as the server's `/status` shows it.
#[derive(Debug)]
pub(crate) struct RecordView {
    pub name: String,
    /// `None`: free (released, kept for its queue).
    pub mode: Option<Mode>,
    pub holders: u64,
    pub expires_in: Duration,
    /// Queue members: id, mode, seconds queued, seconds until the entry lapses.
    pub waiters: Vec<(String, Mode, u64, u64)>,
}

/// The lock records of one object, served to HTTP clients.
pub(crate) struct Served {
    object: Arc<Object>,
    /// The record values this process last wrote or read, by annotation key.
    values: Mutex<HashMap<String, String>>,
}

impl Served {
    /// The object `name` of `resource` in `namespace`, with a client configured as kubectl's.
    pub async fn connect(
        context: Option<&str>,
        resource: &str,
        namespace: Option<String>,
        name: &str,
        config: LeaseConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let (client, target) =
            resolve(context, resource, namespace, name, config.request_timeout).await?;
        let api = match &target.namespace {
            Some(ns) => Api::namespaced_with(client, ns, &target.resource),
            None => Api::all_with(client, &target.resource),
        };
        let store = Store::new(
            api,
            target.name.clone(),
            target.describe(),
            config.request_timeout,
        );
        // Read it once: a missing object or a denied read is an error at start, not at the
        // first acquisition.
        store.get().await?;
        Ok(Self {
            object: Arc::new(Object::new(store, config)),
            values: Mutex::default(),
        })
    }

    /// The object, as messages name it.
    pub fn describe(&self) -> &str {
        &self.object.store.describe
    }

    pub fn ttl(&self) -> Duration {
        self.object.config.ttl
    }

    fn values(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.values.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn remember(&self, key: &str, value: Option<String>) {
        /// A cache of what this process last saw: past this many locks it starts afresh (a
        /// stale or missing value costs a failed `test` and a read, nothing else).
        const VALUES_MAX: usize = 4096;
        let mut values = self.values();
        if values.len() >= VALUES_MAX {
            values.clear();
        }
        match value {
            Some(v) => values.insert(key.to_owned(), v),
            None => values.remove(key),
        };
    }

    /// Acquires `name` in `mode`, waiting up to `wait` (`None`: not at all). `acquirer` (Go
    /// v0.2's acquirer id) keeps its place in the record's queue when the request ends without
    /// the lock. `Ok(None)`: the lock is busy.
    pub async fn acquire(
        &self,
        name: &LockName,
        mode: Mode,
        acquirer: Option<&str>,
        wait: Option<Duration>,
    ) -> Result<Option<Granted>, Error> {
        let key = annotation_key(name.as_str());
        let opts = AcquireOptions::default().mode(mode).wait(match wait {
            Some(w) => Wait::Timeout(w),
            None => Wait::NonBlocking,
        });
        // What we know of the record: a conditional write on it without reading first.
        let current = match self.values().get(&key) {
            Some(v) => Snapshot {
                annotations: Some([(key.clone(), v.clone())].into()),
                rv: None,
            },
            None => self.object.store.assumed(),
        };
        let granted =
            acquire_grant(&self.object, name, &opts, acquirer.map(queue_id), current).await;
        match granted {
            Ok(g) => {
                self.remember(&key, Some(g.value));
                // A grant learned from a read rather than from its write's answer may come
                // without a resourceVersion: the object's current one is above the granting
                // write's and below any later grant of the lock (we hold it).
                let token = match g.token {
                    Some(t) => t,
                    None => match self.object.store.get().await?.rv {
                        Some(t) => t,
                        None => {
                            let _ = self.release(name, &g.record.uuid).await;
                            return Err(Error::Unreachable {
                                resource: self.describe().to_owned(),
                                source: "the object's resourceVersion is not a number: no fencing token to hand out".into(),
                            });
                        }
                    },
                };
                Ok(Some(Granted {
                    uuid: g.record.uuid,
                    token,
                }))
            }
            Err(AcquireError::Failed(e)) => Err(e),
            Err(_) => {
                // Busy: what we knew may be stale now.
                self.remember(&key, None);
                Ok(None)
            }
        }
    }

    /// The record of `key` as read now, if any.
    async fn read(&self, key: &str) -> Result<Option<String>, Error> {
        let snap = self.object.store.get().await?;
        let value = snap.get(key).map(str::to_owned);
        self.remember(key, value.clone());
        Ok(value)
    }

    /// The value of the record of `key` that carries the lease `uuid`: from memory when it
    /// does, else read. `fresh`: the value was just read.
    async fn lease_value(
        &self,
        key: &str,
        uuid: &str,
        mut fresh: bool,
    ) -> Result<(String, Record), LeaseError> {
        loop {
            let known = if fresh {
                None
            } else {
                self.values().get(key).cloned()
            };
            let value = match known {
                Some(v) => v,
                None => {
                    fresh = true;
                    self.read(key).await?.ok_or(LeaseError::NoLease)?
                }
            };
            let rec = Record::parse(&value).map_err(|e| self.object.corrupt(key, e))?;
            if rec.uuid == uuid && rec.shared_holders > 0 {
                return Ok((value, rec));
            }
            if fresh {
                return Err(if rec.uuid == uuid {
                    LeaseError::NoLease
                } else {
                    LeaseError::AlreadyLeased
                });
            }
            fresh = true;
        }
    }

    /// Renews the lease `uuid` of `name` for a TTL: rewrites the record's expiry (with
    /// `Renewals` bumped and the holder mark refreshed) if it still carries the uuid.
    pub async fn renew(&self, name: &LockName, uuid: &str) -> Result<(), LeaseError> {
        let mut doubt = false;
        match self.renew_tracked(name, uuid, &mut doubt).await {
            // A renewal whose write may have landed was maybe applied: say so.
            Err(LeaseError::Failed(e)) if doubt => Err(LeaseError::InDoubt(e)),
            r => r,
        }
    }

    async fn renew_tracked(
        &self,
        name: &LockName,
        uuid: &str,
        doubt: &mut bool,
    ) -> Result<(), LeaseError> {
        let key = annotation_key(name.as_str());
        let mut fresh = false;
        let mut pause = Duration::from_millis(100);
        for _ in 0..8 {
            let (value, rec) = self.lease_value(&key, uuid, fresh).await?;
            let new = rec.renewed(self.object.expire_at()).to_value();
            let change = Change {
                key: key.clone(),
                expected: Some(value),
                new: Some(new.clone()),
            };
            match self
                .object
                .store
                .write(std::slice::from_ref(&change), true)
                .await
            {
                Ok(_) => {
                    self.remember(&key, Some(new));
                    return Ok(());
                }
                // Changed (a holder joined or left, a waiter queued) or not known: read and
                // renew what is there (a renewal may apply twice: it only moves the expiry).
                Err(WriteError::Conflict) => {}
                Err(WriteError::Unknown(e)) => {
                    *doubt = true;
                    tracing::debug!(lock = name.as_str(), error = %crate::error::chain(&e), "renewal outcome unknown; reading");
                }
                Err(WriteError::Failed(e)) if transient(&e) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(800));
                }
                Err(WriteError::Failed(e)) => return Err(e.into()),
            }
            fresh = true;
        }
        Err(LeaseError::Failed(Error::Unreachable {
            resource: self.describe().to_owned(),
            source: "the record kept changing during the renewal".into(),
        }))
    }

    /// Gives up one holder's share of the lease `uuid` of `name`, as a locker's release does.
    pub async fn release(&self, name: &LockName, uuid: &str) -> Result<(), LeaseError> {
        let key = annotation_key(name.as_str());
        let (value, _) = self.lease_value(&key, uuid, false).await?;
        let held = Held {
            uuid: uuid.to_owned(),
            value,
            ids: Default::default(),
        };
        // Past a TTL from now the lease has expired anyway.
        let until = crate::clock::boot() + self.object.config.ttl;
        // A handle does not name its holder entry: a shared record keeps the entry of an HTTP
        // holder that left until its last holder leaves (the count is what matters).
        match self
            .object
            .release_written(name.as_str(), &key, "", held, until)
            .await
        {
            Ok((_, written)) => {
                self.remember(&key, written);
                Ok(())
            }
            // The record changed under us: tell which way from what is there now.
            Err(Error::LeaseLost { .. }) => match self.lease_value(&key, uuid, true).await {
                Ok(_) => Err(LeaseError::Failed(Error::Unreachable {
                    resource: self.describe().to_owned(),
                    source: "the record kept changing during the release".into(),
                })),
                Err(e) => Err(e),
            },
            // Refusals that wrote nothing; any other failure may follow a write that landed.
            Err(
                e @ (Error::Forbidden { .. }
                | Error::CorruptRecord { .. }
                | Error::ResourceMissing { .. }
                | Error::Unauthorized { .. }),
            ) => Err(LeaseError::Failed(e)),
            Err(e) => Err(LeaseError::InDoubt(e)),
        }
    }

    /// Removes `acquirer`'s place in the queue of `name` (it gave up).
    pub async fn cancel(&self, name: &LockName, acquirer: &str) -> Result<(), Error> {
        let key = annotation_key(name.as_str());
        let Some(value) = self.read(&key).await? else {
            return Ok(());
        };
        let Ok(rec) = Record::parse(&value) else {
            return Ok(());
        };
        let id = queue_id(acquirer);
        let Some(entry) = rec.queue.keys().find(|k| same_acquirer(k, &id)) else {
            return Ok(());
        };
        self.object
            .take_back(name.as_str(), &key, Some(entry), &[])
            .await;
        self.remember(&key, None);
        Ok(())
    }

    /// Removes what nobody needs from the object: free records, dead leases (expired by a TTL
    /// with nobody renewing) and dead queue entries, idle for [`IDLE_SECS`] past their expiry,
    /// in one conditional write (a record that changed meanwhile is left for the next sweep).
    /// Returns what the object holds after.
    pub async fn sweep(&self) -> Result<Usage, Error> {
        let snap = self.object.store.get().await?;
        let now = self.object.store.server_now();
        let ttl = self.object.config.ttl_secs();
        let idle = |expire_at: i64| expire_at.saturating_add(IDLE_SECS) < now;
        // What this process remembers of records no longer there is of no use.
        self.values()
            .retain(|k, _| snap.annotations.as_ref().is_some_and(|a| a.contains_key(k)));
        let mut usage = Usage::default();
        let mut changes = Vec::new();
        let mut freed = 0usize;
        for (k, v) in snap.annotations.iter().flatten() {
            usage.bytes += k.len() + v.len();
            if !k.starts_with(KEY_PREFIX) {
                continue;
            }
            let Ok(rec) = Record::parse(v) else {
                continue;
            };
            let live_members = rec
                .queue
                .values()
                .filter(|m| m.id != HOLDER_MARK && !idle(m.expire_at))
                .count();
            let dead_lease = rec.shared_holders > 0 && idle(rec.expire_at.saturating_add(ttl));
            if (rec.shared_holders <= 0 || dead_lease) && idle(rec.expire_at) && live_members == 0 {
                changes.push(Change {
                    key: k.clone(),
                    expected: Some(v.clone()),
                    new: None,
                });
                freed += k.len() + v.len();
                continue;
            }
            if rec.shared_holders > 0 && rec.expire_at >= now {
                usage.held += 1;
            }
            usage.waiters += live_members;
            let mut kept = rec.clone();
            kept.queue
                .retain(|id, m| id == HOLDER_MARK || !idle(m.expire_at));
            if kept.queue.len() < rec.queue.len() {
                let new = kept.to_value();
                freed += v.len().saturating_sub(new.len());
                changes.push(Change {
                    key: k.clone(),
                    expected: Some(v.clone()),
                    new: Some(new),
                });
            }
        }
        if changes.is_empty() {
            return Ok(usage);
        }
        match self.object.store.write(&changes, true).await {
            Ok(_) => {
                usage.bytes = usage.bytes.saturating_sub(freed);
                usage.removed = changes.len();
                tracing::info!(object = %self.describe(), records = changes.len(), bytes = freed, "removed idle lock records and dead queue entries");
                for c in &changes {
                    self.remember(&c.key, c.new.clone());
                }
            }
            // Somebody wrote one of them meanwhile: the next sweep tries again.
            Err(WriteError::Conflict | WriteError::Unknown(_)) => {}
            Err(WriteError::Failed(e)) => return Err(e),
        }
        Ok(usage)
    }

    /// The records with holders or waiters, by lock name (`only`: that lock).
    pub async fn status(&self, only: Option<&str>) -> Result<Vec<RecordView>, Error> {
        let snap = self.object.store.get().await?;
        let now = self.object.store.server_now();
        let secs = |t: i64| u64::try_from(t).unwrap_or(0);
        let mut views: Vec<RecordView> = snap
            .annotations
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k.starts_with(KEY_PREFIX))
            .filter_map(|(_, v)| Record::parse(&v).ok())
            .filter(|r| only.is_none_or(|n| r.lock_name == n))
            .map(|r| {
                let holding = r.shared_holders > 0 && r.expire_at >= now;
                let mut queue: Vec<_> = r
                    .queue
                    .values()
                    .filter(|m| m.id != HOLDER_MARK && m.expire_at >= now)
                    .collect();
                // In the order they are served.
                queue.sort_by(|a, b| a.order().cmp(&b.order()));
                let waiters: Vec<_> = queue
                    .into_iter()
                    .map(|m| {
                        let mode = if m.shared {
                            Mode::Shared
                        } else {
                            Mode::Exclusive
                        };
                        (
                            m.id.clone(),
                            mode,
                            secs(now.saturating_sub(m.arrived)),
                            secs(m.expire_at.saturating_sub(now)),
                        )
                    })
                    .collect();
                RecordView {
                    name: r.lock_name.clone(),
                    mode: holding.then(|| r.mode()),
                    holders: if holding { secs(r.shared_holders) } else { 0 },
                    expires_in: Duration::from_secs(secs(r.expire_at.saturating_sub(now))),
                    waiters,
                }
            })
            .filter(|v| v.holders > 0 || !v.waiters.is_empty())
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(views)
    }
}

/// An acquisition for the HTTP lock server's Kubernetes store: the grant, not joined to a
/// renewing session (the server's client renews through the server). `acquirer` keeps its
/// place in the queue across requests; `current` is what the caller knows of the object.
async fn acquire_grant(
    object: &Arc<Object>,
    name: &LockName,
    opts: &AcquireOptions,
    acquirer: Option<String>,
    current: Snapshot,
) -> Result<Grant, AcquireError> {
    let mut a = Acquisition::new(object, name, opts, acquirer, current);
    match a.run().await {
        Ok(g) => {
            a.armed = false;
            Ok(g)
        }
        Err(e) => {
            a.clean_up().await;
            Err(e)
        }
    }
}

impl Acquisition<'_> {
    /// An HTTP acquirer asking again takes up its entry in the queue (same acquirer, earlier
    /// arrival), wherever it was written from.
    pub(super) fn adopt_place(&mut self) {
        if !self.keep_place {
            return;
        }
        let Some(rec) = self
            .current
            .get(&self.key)
            .and_then(|v| Record::parse(v).ok())
        else {
            return;
        };
        if rec.queue.contains_key(&self.id) {
            return;
        }
        if let Some(id) = rec.queue.keys().find(|k| same_acquirer(k, &self.id)) {
            self.id = id.clone();
        }
    }
}

/// True when the queue ids `a` and `b` are of one HTTP acquirer (see [`queue_id`]).
pub(super) fn same_acquirer(a: &str, b: &str) -> bool {
    a.len() == 33 && b.len() == 33 && a[20..] == b[20..]
}

#[cfg(test)]
mod tests {
    use super::{queue_id, same_acquirer};
    use crate::kubernetes::queue::Member;

    #[test]
    fn acquirer_ids_map_to_stable_rust_shaped_queue_ids() {
        let id = queue_id("go-first");
        assert!(same_acquirer(&id, &queue_id("go-first")));
        assert!(!same_acquirer(&id, &queue_id("go-second")));
        let m = Member {
            id,
            arrived: 1,
            expire_at: 2,
            shared: false,
            tag: 0,
            holder: None,
            other: Default::default(),
        };
        assert!(m.is_rust(), "{}", m.id);
    }
}
