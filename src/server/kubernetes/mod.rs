//! The Kubernetes store: leases in the annotation records of one Kubernetes object, shared by
//! any number of servers, Kubernetes lockers and Go lockgate processes.

mod caps;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use uuid::Uuid;

use super::store::{
    AcquireSpec, Acquired, AcquirerId, Capacity, Grant, LeaseRef, StatusQuery, Store, StoreError,
    StoreFuture, StoreStats,
};
use crate::error::Error;
use crate::http::protocol::{HolderStatus, LockStatus, StatusResponse, WaiterStatus};
use crate::kubernetes::serve::{LeaseError, Served};
use crate::LockName;
pub use caps::KubernetesStoreConfig;
use caps::{sweep, ClientWait, Counts, ANNOTATIONS_LIMIT, ENTRY_BYTES, RECORD_BYTES};

/// Leases in the annotations of one Kubernetes object: what `lockgate serve --store
/// kubernetes://…` uses.
///
/// The records are the Kubernetes locker's (see `PROTOCOL.md`, "Kubernetes locks"), so servers
/// on one object, [`KubernetesLocker`](crate::KubernetesLocker)s and Go lockgate processes all
/// exclude each other. The store keeps no lease state of its own: a handle's uuid is the
/// record's (shared holders share it, as with Go's server), so any server on the object renews
/// or releases any handle, and a restarted server serves the held leases on (no start-up grace
/// is needed). Acquisitions wait on a watch of the object and queue in the record; renewals
/// rewrite the record's expiry while it carries the handle's uuid.
///
/// The object is shared by everyone using it and Kubernetes allows its annotations 256 KiB in
/// all: every few seconds the store reads it, removes what nobody needs any more (free records,
/// dead leases and dead queue entries idle for 30 s), and counts what is left against its caps
/// ([`KubernetesStoreConfig`]).
///
/// # Fairness
///
/// The Kubernetes locker's: first come, first served across every participant, no writer
/// starvation. A request with an acquirer id keeps its queue place between requests while it
/// asks again within a TTL (Go v0.2 pollers); one without an id holds a place only while its
/// long poll is open.
#[derive(Debug)]
pub struct KubernetesStore {
    served: Arc<Served>,
    config: KubernetesStoreConfig,
    counts: Arc<Counts>,
    quick_writes: Semaphore,
    sweeper: tokio::task::AbortHandle,
    closed: AtomicBool,
    closing: Notify,
    grants: AtomicU64,
    releases: AtomicU64,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("object", &self.describe())
            .finish_non_exhaustive()
    }
}

fn unavailable(e: Error) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

fn lease_error(e: LeaseError) -> StoreError {
    match e {
        LeaseError::NoLease => StoreError::NoLease,
        LeaseError::AlreadyLeased => StoreError::AlreadyLeased,
        LeaseError::Failed(e) => unavailable(e),
        LeaseError::InDoubt(e) => StoreError::OutcomeUnknown(Box::new(e)),
    }
}

impl KubernetesStore {
    /// The store of the object `name` of `resource` (as kubectl names it) in `namespace`
    /// (`None`: cluster-scoped), with a client configured as kubectl's is; `context` picks a
    /// kubeconfig context. Must run inside a Tokio runtime. Every participant must use the same
    /// TTL (the lease configuration's; Go lockgate's is 10 s).
    ///
    /// # Errors
    ///
    /// As [`KubernetesLocker::connect`](crate::KubernetesLocker::connect), and the object is
    /// read (and cleaned up) once: [`Error::ResourceMissing`], [`Error::Forbidden`] now rather
    /// than later.
    pub async fn connect(
        context: Option<&str>,
        resource: &str,
        namespace: Option<String>,
        name: &str,
        config: KubernetesStoreConfig,
    ) -> Result<Self, Error> {
        let served =
            Arc::new(Served::connect(context, resource, namespace, name, config.lease).await?);
        let counts = Arc::new(Counts::default());
        counts.set(served.sweep().await?);
        let sweeper = tokio::spawn(sweep(
            Arc::clone(&served),
            Arc::clone(&counts),
            config.sweep_every,
        ))
        .abort_handle();
        Ok(Self {
            served,
            quick_writes: Semaphore::new(config.max_quick_writes),
            config,
            counts,
            sweeper,
            closed: AtomicBool::new(false),
            closing: Notify::new(),
            grants: AtomicU64::new(0),
            releases: AtomicU64::new(0),
        })
    }

    /// The object, as shown in messages ("configmaps default/locks").
    pub fn object(&self) -> &str {
        self.served.describe()
    }

    fn parse_uuid(uuid: &str) -> Result<Uuid, StoreError> {
        Uuid::try_parse(uuid).map_err(|_| {
            StoreError::Unavailable(format!("the lock record's uuid {uuid:?} is not a UUID").into())
        })
    }

    /// Checks the caps for `spec`; the returned guard counts an acquisition that may queue
    /// against its client while it is open.
    fn admit(&self, spec: &AcquireSpec, may_queue: bool) -> Result<Option<ClientWait>, StoreError> {
        let usage = self.counts.usage();
        let full = |e| {
            self.counts.sweep_now.notify_one();
            Err(StoreError::Capacity(e))
        };
        let budget = ANNOTATIONS_LIMIT.saturating_sub(self.config.reserve);
        if usage.bytes + RECORD_BYTES > budget {
            return full(Capacity::ObjectFull {
                reserve: self.config.reserve,
            });
        }
        if usage.held >= self.config.max_held {
            return full(Capacity::Held {
                max: self.config.max_held,
            });
        }
        if !may_queue {
            return Ok(None);
        }
        if usage.waiters >= self.config.max_waiters {
            return full(Capacity::Waiters {
                max: self.config.max_waiters,
            });
        }
        let Some(client) = spec.client else {
            return Ok(None);
        };
        let mut clients = self
            .counts
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = clients.entry(client).or_default();
        if *n >= self.config.max_waiters_per_client {
            return Err(StoreError::Capacity(Capacity::ClientWaiters {
                max: self.config.max_waiters_per_client,
            }));
        }
        *n += 1;
        Ok(Some(ClientWait {
            counts: Arc::clone(&self.counts),
            client,
        }))
    }
}

impl Drop for KubernetesStore {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

/// The acquirer's key in the record's queue: its id bound to its client, so that another client
/// sending the same id is another acquirer.
fn acquirer_key(id: &AcquirerId) -> String {
    match id.bound_to() {
        Some(client) => format!("{client}/{}", id.as_str()),
        None => id.as_str().to_owned(),
    }
}

impl Store for KubernetesStore {
    fn acquire(&self, spec: AcquireSpec) -> StoreFuture<'_, Result<Acquired, StoreError>> {
        Box::pin(async move {
            // Listen before looking: a close between the two is then not missed.
            let closing = self.closing.notified();
            let mut closing = std::pin::pin!(closing);
            closing.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                return Err(StoreError::ShuttingDown);
            }
            let may_queue = spec.wait.is_some() || spec.acquirer_id.is_some();
            let _client = self.admit(&spec, may_queue)?;
            if may_queue {
                self.counts.added_waiters.fetch_add(1, Ordering::Relaxed);
                self.counts
                    .added_bytes
                    .fetch_add(ENTRY_BYTES, Ordering::Relaxed);
            }
            let acquirer = spec.acquirer_id.as_ref().map(acquirer_key);
            // Waits are bounded by the caps on waiters; quick requests by this.
            let _turn = match spec.wait {
                None => Some(
                    self.quick_writes
                        .acquire()
                        .await
                        .map_err(|_| StoreError::ShuttingDown)?,
                ),
                Some(_) => None,
            };
            let acquired =
                self.served
                    .acquire(&spec.name, spec.mode, acquirer.as_deref(), spec.wait);
            let granted = tokio::select! {
                g = acquired => g.map_err(unavailable)?,
                () = closing => return Err(StoreError::ShuttingDown),
            };
            let Some(g) = granted else {
                return Ok(Acquired::ShouldWait);
            };
            let uuid = match Self::parse_uuid(&g.uuid) {
                Ok(u) => u,
                Err(e) => {
                    // A record somebody else wrote: not a handle we can hand out.
                    let _ = self.served.release(&spec.name, &g.uuid).await;
                    return Err(e);
                }
            };
            self.grants.fetch_add(1, Ordering::Relaxed);
            self.counts.added_held.fetch_add(1, Ordering::Relaxed);
            self.counts
                .added_bytes
                .fetch_add(RECORD_BYTES, Ordering::Relaxed);
            Ok(Acquired::Granted(Grant {
                uuid,
                fencing_token: g.token,
                ttl: self.served.ttl(),
            }))
        })
    }

    fn renew(&self, lease: LeaseRef) -> StoreFuture<'_, Result<Duration, StoreError>> {
        Box::pin(async move {
            let uuid = lease.uuid.hyphenated().to_string();
            self.served
                .renew(&lease.name, &uuid)
                .await
                .map_err(lease_error)?;
            Ok(self.served.ttl())
        })
    }

    fn release(&self, lease: LeaseRef) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let _turn = self
                .quick_writes
                .acquire()
                .await
                .map_err(|_| StoreError::ShuttingDown)?;
            let uuid = lease.uuid.hyphenated().to_string();
            self.served
                .release(&lease.name, &uuid)
                .await
                .map_err(lease_error)?;
            self.releases.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    fn cancel(
        &self,
        name: LockName,
        acquirer_id: AcquirerId,
    ) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let _turn = self
                .quick_writes
                .acquire()
                .await
                .map_err(|_| StoreError::ShuttingDown)?;
            self.served
                .cancel(&name, &acquirer_key(&acquirer_id))
                .await
                .map_err(unavailable)
        })
    }

    fn status(&self, query: StatusQuery) -> StoreFuture<'_, Result<StatusResponse, StoreError>> {
        Box::pin(async move {
            let views = self
                .served
                .status(query.name.as_deref())
                .await
                .map_err(unavailable)?;
            let total = views.len();
            let after = query.after.as_deref();
            let mut views: Vec<_> = views
                .into_iter()
                .filter(|v| after.is_none_or(|a| v.name.as_str() > a))
                .take(query.limit.saturating_add(1))
                .collect();
            let truncated = views.len() > query.limit;
            views.truncate(query.limit);
            let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            let locks = views
                .into_iter()
                .map(|v| LockStatus {
                    lock_name: v.name,
                    mode: v.mode,
                    // A record counts its holders; grant times and tokens are not recorded.
                    holders: (0..v.holders)
                        .map(|_| HolderStatus {
                            mode: v.mode.unwrap_or_default(),
                            fencing_token: 0,
                            acquirer_id: None,
                            held_ms: 0,
                            expires_in_ms: ms(v.expires_in),
                        })
                        .collect(),
                    waiters: v
                        .waiters
                        .into_iter()
                        .map(|(id, mode, queued, left)| WaiterStatus {
                            mode,
                            acquirer_id: Some(id),
                            waiting_ms: queued.saturating_mul(1000),
                            long_poll: false,
                            place_expires_in_ms: Some(left.saturating_mul(1000)),
                        })
                        .collect(),
                })
                .collect();
            Ok(StatusResponse {
                locks,
                total,
                truncated,
                ttl_ms: ms(self.served.ttl()),
            })
        })
    }

    fn stats(&self) -> StoreStats {
        // The leases live in the object; this server counts what it did, and what it last
        // read there.
        let usage = self.counts.usage();
        StoreStats {
            locks_held: usage.held as u64,
            waiters: usage.waiters as u64,
            grants: self.grants.load(Ordering::Relaxed),
            releases: self.releases.load(Ordering::Relaxed),
            ..StoreStats::default()
        }
    }

    fn ttl(&self) -> Duration {
        self.served.ttl()
    }

    fn grace_remaining(&self) -> Option<Duration> {
        // Leases outlive a server: a restarted one knows them all.
        None
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.closing.notify_waiters();
    }
}
