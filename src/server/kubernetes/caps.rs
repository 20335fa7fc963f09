//! What a Kubernetes-store server allows itself on the shared object: its settings, what it
//! counts there, and the task that reads the object and cleans it up.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

#[cfg(doc)]
use super::super::store::Capacity;
#[cfg(doc)]
use super::KubernetesStore;
use crate::kubernetes::serve::{Served, Usage};
use crate::kubernetes::LeaseConfig;

/// What Kubernetes allows an object's annotations, in all.
pub(super) const ANNOTATIONS_LIMIT: usize = 256 * 1024;
/// What a new record and a new queue entry are counted as until the next read of the object.
pub(super) const RECORD_BYTES: usize = 400;
pub(super) const ENTRY_BYTES: usize = 160;

/// Settings of a [`KubernetesStore`]: the lease timing every participant of the object shares,
/// and the caps of this server.
///
/// ```
/// use lockgate::kubernetes::LeaseConfig;
/// use lockgate::server::KubernetesStoreConfig;
///
/// let config = KubernetesStoreConfig::new(LeaseConfig::default()).max_held(200);
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct KubernetesStoreConfig {
    pub(super) lease: LeaseConfig,
    pub(super) max_held: usize,
    pub(super) max_waiters: usize,
    pub(super) max_waiters_per_client: usize,
    pub(super) max_quick_writes: usize,
    pub(super) reserve: usize,
    pub(super) sweep_every: Duration,
}

impl KubernetesStoreConfig {
    /// With `lease` (Go lockgate's timing by default) and the default caps.
    pub fn new(lease: LeaseConfig) -> Self {
        Self {
            lease,
            max_held: 100_000,
            max_waiters: 10_000,
            max_waiters_per_client: 1000,
            max_quick_writes: 8,
            reserve: 128 * 1024,
            sweep_every: Duration::from_secs(5),
        }
    }

    /// The cap on records with live holders in the object (default 100 000; the object's
    /// 256 KiB usually stop it first): a grant beyond it answers [`Capacity::Held`].
    pub fn max_held(mut self, max: usize) -> Self {
        self.max_held = max;
        self
    }

    /// The cap on live queue entries in the object (default 10 000).
    pub fn max_waiters(mut self, max: usize) -> Self {
        self.max_waiters = max;
        self
    }

    /// The cap on acquisitions of one client that may queue and are open on this server at
    /// once (default 1000).
    pub fn max_waiters_per_client(mut self, max: usize) -> Self {
        self.max_waiters_per_client = max;
        self
    }

    /// Acquisitions that do not wait, releases and cancellations the server sends to the API
    /// server at once (default 8); more wait for their turn. Every write to the object costs
    /// the API server, and every watcher, a copy of the whole object: a flood of requests
    /// through the server must not starve the renewals of every holder on it (renewals are not
    /// limited).
    pub fn max_quick_writes(mut self, max: usize) -> Self {
        self.max_quick_writes = max.max(1);
        self
    }

    /// The bytes of the object's annotations the server leaves to others (default 128 KiB of
    /// the 256 KiB): past that, it writes no new lock record or queue entry
    /// ([`Capacity::ObjectFull`]); renewals and releases go on, and so do the other
    /// participants. Each write to the object carries all of it: a smaller object is cheaper
    /// for everyone.
    pub fn reserve(mut self, bytes: usize) -> Self {
        self.reserve = bytes.min(ANNOTATIONS_LIMIT);
        self
    }
}

/// What the object holds: as last read, plus what this server added since.
#[derive(Debug, Default)]
pub(super) struct Counts {
    read: Mutex<Usage>,
    pub(super) added_bytes: AtomicUsize,
    pub(super) added_held: AtomicUsize,
    pub(super) added_waiters: AtomicUsize,
    /// Open acquisitions that may queue, by client.
    pub(super) clients: Mutex<HashMap<IpAddr, usize>>,
    /// Read the object again now (it looks full).
    pub(super) sweep_now: Notify,
}

impl Counts {
    pub(super) fn usage(&self) -> Usage {
        let read = *self.read.lock().unwrap_or_else(PoisonError::into_inner);
        Usage {
            bytes: read.bytes + self.added_bytes.load(Ordering::Relaxed),
            held: read.held + self.added_held.load(Ordering::Relaxed),
            waiters: read.waiters + self.added_waiters.load(Ordering::Relaxed),
            removed: 0,
        }
    }

    pub(super) fn set(&self, usage: Usage) {
        *self.read.lock().unwrap_or_else(PoisonError::into_inner) = usage;
        self.added_bytes.store(0, Ordering::Relaxed);
        self.added_held.store(0, Ordering::Relaxed);
        self.added_waiters.store(0, Ordering::Relaxed);
    }
}

/// An open acquisition that may queue, counted against its client.
pub(super) struct ClientWait {
    pub(super) counts: Arc<Counts>,
    pub(super) client: IpAddr,
}

impl Drop for ClientWait {
    fn drop(&mut self) {
        let mut clients = self
            .counts
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = clients.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

/// Reads the object every `every` (or when asked), cleaning it up and counting what it holds.
pub(super) async fn sweep(served: Arc<Served>, counts: Arc<Counts>, every: Duration) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = counts.sweep_now.notified() => {}
        }
        match served.sweep().await {
            Ok(usage) => counts.set(usage),
            Err(e) => {
                tracing::warn!(object = served.describe(), error = %crate::error::chain(&e), "cannot read the object to clean it up")
            }
        }
        // At most one read a second, however often asked.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
