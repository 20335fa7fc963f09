//! The Kubernetes store: leases in the annotation records of one Kubernetes object, shared by
//! any number of servers, Kubernetes lockers and Go lockgate processes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use uuid::Uuid;

use super::store::{
    AcquireSpec, Acquired, AcquirerId, Grant, LeaseRef, StatusQuery, Store, StoreError,
    StoreFuture, StoreStats,
};
use crate::error::Error;
use crate::http::protocol::{HolderStatus, LockStatus, StatusResponse, WaiterStatus};
use crate::kubernetes::serve::{LeaseError, Served};
use crate::kubernetes::LeaseConfig;
use crate::LockName;

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
/// # Fairness
///
/// The Kubernetes locker's: first come, first served across every participant, no writer
/// starvation. A request with an acquirer id keeps its queue place between requests while it
/// asks again within a TTL (Go v0.2 pollers); one without an id holds a place only while its
/// long poll is open.
#[derive(Debug)]
pub struct KubernetesStore {
    served: Served,
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
    }
}

impl KubernetesStore {
    /// The store of the object `name` of `resource` (as kubectl names it) in `namespace`
    /// (`None`: cluster-scoped), with a client configured as kubectl's is; `context` picks a
    /// kubeconfig context. Must run inside a Tokio runtime. Every participant must use the same
    /// TTL (`config.ttl`; Go lockgate's is 10 s).
    ///
    /// # Errors
    ///
    /// As [`KubernetesLocker::connect`](crate::KubernetesLocker::connect), and the object is
    /// read once: [`Error::ResourceMissing`], [`Error::Forbidden`] now rather than later.
    pub async fn connect(
        context: Option<&str>,
        resource: &str,
        namespace: Option<String>,
        name: &str,
        config: LeaseConfig,
    ) -> Result<Self, Error> {
        Ok(Self {
            served: Served::connect(context, resource, namespace, name, config).await?,
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
}

impl Store for KubernetesStore {
    fn acquire(&self, spec: AcquireSpec) -> StoreFuture<'_, Result<Acquired, StoreError>> {
        Box::pin(async move {
            if self.closed.load(Ordering::Acquire) {
                return Err(StoreError::ShuttingDown);
            }
            let closing = self.closing.notified();
            let acquirer = spec.acquirer_id.as_ref().map(AcquirerId::as_str);
            let acquired = self
                .served
                .acquire(&spec.name, spec.mode, acquirer, spec.wait);
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
            Ok(Acquired::Granted(Grant {
                uuid,
                fencing_token: g.token.unwrap_or_default(),
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
            self.served
                .cancel(&name, acquirer_id.as_str())
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
            let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            let locks = views
                .into_iter()
                .take(query.limit)
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
                truncated: total > query.limit,
                ttl_ms: ms(self.served.ttl()),
            })
        })
    }

    fn stats(&self) -> StoreStats {
        // The leases live in the object; this server counts what it did.
        StoreStats {
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
