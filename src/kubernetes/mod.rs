//! Distributed locks stored in the annotations of any Kubernetes object (feature `kubernetes`).
//!
//! Wire-compatible with Go lockgate's Kubernetes locker: the lock `NAME` is the annotation
//! [`annotation_key(NAME)`](annotation_key) holding Go's JSON lease record. See `PROTOCOL.md` for
//! the record, every state transition and the lease rules.
//!
//! Where things are: [`config`](LeaseConfig) (lease timing), `client` (clients and the
//! [`Target`] object), `store` (reads and conditional writes), `record` and `queue` (the record
//! and its acquirer queue, pure logic), `watch` (the shared watch), `acquire` (acquisition),
//! `renew` (what the session's renewal task does here), `release` (the held lease and its
//! release), `status`. Renewal timing and the lost-lease rule are the backend-neutral
//! `session`'s.

mod acquire;
mod client;
mod config;
mod decide;
#[cfg(test)]
mod proptests;
mod queue;
mod record;
mod release;
mod renew;
#[cfg(feature = "server")]
pub(crate) mod serve;
mod status;
mod store;
mod watch;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use kube::api::Api;

use crate::backend::{Backend, BoxFuture, Lease};
use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::AcquireOptions;
use crate::session::{Bridge, Session, Timing};

pub use client::{client, client_from_config, client_with, Target};
pub use config::LeaseConfig;
pub use record::{annotation_key, KEY_PREFIX};
pub use status::RecordStatus;
use store::Store;

/// A locker whose locks live in the annotations of one Kubernetes object.
///
/// Every write is a JSON Patch conditional on the lock's own annotation (`test` of the value
/// last read), so writers of different locks on one object never conflict. Waiting is driven by
/// a watch of the object, shared by every waiter of the locker. Leases are renewed in the
/// background, with one write per object for every lock it holds; a holder whose renewal cannot
/// be confirmed in time is told through [`LockGuard::lost`](crate::LockGuard::lost) before
/// anyone else may take over.
///
/// Expiry never compares clocks of different hosts: a waiter takes a lock over only when the
/// record has stayed unchanged for a whole TTL on the waiter's own monotonic clock, or, for a
/// record it has not watched that long, when the record's `ExpireAtTimestamp` passed more than a
/// TTL ago by the API server's clock. A locker keeps what it observed across acquisitions, so
/// repeated non-blocking or short attempts also take over a crashed holder's lock.
///
/// # Fairness
///
/// First come, first served, across processes: a waiter registers in the record's queue (Go
/// lockgate v0.2's `QueueMembers`) and takes a freed lock only when nobody who arrived before it
/// still waits; a shared request joins a shared record only when no exclusive request waits
/// before it, so a stream of shared holders cannot starve an exclusive waiter. Consecutive
/// shared waiters are granted together. Arrival order is by the waiters' wall clocks (skew
/// between hosts can reorder waiters, never break exclusion). A waiter that gives up leaves the
/// queue; one that crashes stops refreshing its place and is skipped a TTL later. Go lockgate
/// v0.1.1 does not know the queue and neither honours nor keeps it.
#[derive(Clone)]
pub struct KubernetesLocker {
    session: Arc<KubeSession>,
}

type KubeSession = Session<Arc<Object>>;

impl std::fmt::Debug for KubernetesLocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesLocker")
            .field("object", &self.inner().store.describe)
            .finish_non_exhaustive()
    }
}

/// The object the locks live on, and what this locker knows about it.
pub(crate) struct Object {
    store: Store,
    config: LeaseConfig,
    /// The shared watch, once started.
    feed: Mutex<Option<watch::Feed>>,
    /// What this locker saw of each lock's record, kept across acquisitions.
    seen: Mutex<HashMap<String, decide::Seen>>,
    /// How long a waiting acquisition rides out an unreachable API server, and whom it tells.
    outages: Mutex<OutagePolicy>,
    /// When each queue entry of this locker's waiters was sent, by queue id: (tag, boot clock).
    /// A waiter handed the lock by a release counts its lease from its entry's send time.
    queued: Mutex<HashMap<String, Vec<(u64, crate::clock::Boot)>>>,
    /// The records this locker's releases wrote, by annotation key, and whether each was left
    /// free with nobody queued, and the object's resourceVersion after the write (if known):
    /// an acquisition's first guess at the record (see [`Object::guess`]).
    freed: Mutex<HashMap<String, Freed>>,
}

/// What a release of ours last wrote for one key (see [`Object::guess`]).
struct Freed {
    /// The record written.
    value: String,
    /// Left free with nobody queued.
    free: bool,
    /// The object's resourceVersion right after the write, if known.
    rv: Option<u64>,
}

/// What a waiting acquisition does when the API server cannot be reached.
#[derive(Clone, Default)]
pub(crate) struct OutagePolicy {
    pub patience: Option<std::time::Duration>,
    pub on_unreachable: Option<Arc<UnreachableHook>>,
}

/// What `KubernetesLocker::on_unreachable` calls.
type UnreachableHook = dyn Fn(&Error) + Send + Sync;

/// How many released records an [`Object`] remembers for its acquisitions' first guess.
const FREED_MAX: usize = 4096;

impl Object {
    fn new(store: Store, config: LeaseConfig) -> Self {
        Self {
            store,
            config,
            feed: Mutex::default(),
            seen: Mutex::default(),
            outages: Mutex::default(),
            queued: Mutex::default(),
            freed: Mutex::default(),
        }
    }

    /// Notes the record a release of ours wrote for `key`: the first guess of this locker's
    /// next acquisition of it. At most [`FREED_MAX`] keys are kept (all forgotten past it: a
    /// forgotten key costs one failed guess).
    fn note_released(&self, key: &str, written: &str, rv: Option<u64>) {
        let mut freed = self.freed.lock().unwrap_or_else(PoisonError::into_inner);
        let free = record::Record::parse(written)
            .is_ok_and(|r| r.shared_holders <= 0 && r.queue.is_empty());
        if freed.len() >= FREED_MAX && !freed.contains_key(key) {
            freed.clear();
        }
        let value = written.to_owned();
        freed.insert(key.to_owned(), Freed { value, free, rv });
    }

    /// The first guess of an acquisition of `key`, which makes an uncontended one a single
    /// request: the record as our last release left it, else no record.
    ///
    /// A wrong guess costs a failed `test` and a read, never a wrong decision, since every
    /// decision taken on a guess is a write that tests it. A record our release left held
    /// (handed to the next in line) or with waiters queued is guessed only by an acquisition
    /// that may wait (`waiting`): its first step is then to queue, testing the guess, which
    /// lands at once when nobody wrote since (the new holder does not write while it holds); a
    /// non-blocking attempt would find the lock busy on the guess alone, without a request, so
    /// it gets no such guess. (Without it, a contender asking again right after handing the
    /// lock on failed a `test` and read before it could queue; with short holds its queue
    /// entry then landed only after the next release had been built, which failed too:
    /// BENCHMARKS.md, Kubernetes table 3.)
    ///
    /// Also returns the resourceVersion the object had right after that release, when the
    /// guess is the record it wrote: a guess that fails its `test` learns the change from the
    /// locker's watch, which is newer than that ([`Object::newer_watched`]), instead of a GET.
    fn guess(&self, key: &str, waiting: bool) -> (store::Snapshot, Option<u64>) {
        let mut snap = self.store.assumed();
        let freed = self.freed.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rv = None;
        if let Some(f) = freed.get(key) {
            if f.free || waiting {
                snap.annotations
                    .get_or_insert_with(Default::default)
                    .insert(key.to_owned(), f.value.clone());
                rv = f.rv;
            }
        }
        (snap, rv)
    }

    /// Notes that the queue entry `tag` of waiter `id` is sent now. Entries sent more than a
    /// renewal deadline ago are forgotten: a lease counted from them would be over already.
    fn note_queued(&self, id: &str, tag: u64) {
        let deadline = self.config.renew_deadline;
        let mut queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        for sent in queued.values_mut() {
            sent.retain(|(_, at)| !(*at + deadline).passed());
        }
        queued.retain(|_, sent| !sent.is_empty());
        queued
            .entry(id.to_owned())
            .or_default()
            .push((tag, crate::clock::boot()));
    }

    /// When waiter `id` sent its queue entry `tag` (the earliest, should a tag repeat), if this
    /// locker still knows.
    fn queued_sent(&self, id: &str, tag: u64) -> Option<crate::clock::Boot> {
        let queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        queued
            .get(id)?
            .iter()
            .filter(|(t, _)| *t == tag)
            .map(|(_, at)| *at)
            .min()
    }

    /// Forgets waiter `id`'s entries (its acquisition ended).
    fn forget_queued(&self, id: &str) {
        self.queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    fn corrupt(&self, key: &str, e: serde_json::Error) -> Error {
        Error::CorruptRecord {
            resource: self.store.describe.clone(),
            key: key.to_owned(),
            source: e,
        }
    }

    /// `ExpireAtTimestamp` for a lease renewed now: the latest the API server's clock can be
    /// now (Go peers compare it with theirs, so a skewed local clock must not shorten it; the
    /// `Date` header's second and the round trip are added, the sum rounded up) plus the TTL.
    fn expire_at(&self) -> i64 {
        self.store
            .server_now_latest()
            .saturating_add(self.config.ttl_secs())
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, decide::Seen>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl KubernetesLocker {
    /// A locker over `target`, using `client`. Must be called inside a Tokio runtime, which then
    /// runs the locker's background renewals and watches.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for inconsistent lease timing; [`Error::Unsupported`] outside
    /// a Tokio runtime.
    pub fn new(client: kube::Client, target: Target, config: LeaseConfig) -> Result<Self, Error> {
        let bridge =
            Bridge::current("KubernetesLocker::new must be called inside a Tokio runtime")?;
        Self::build(client, target, config, bridge)
    }

    /// A locker over the object `name` of `resource` (as kubectl names it: `configmaps`,
    /// `leases.coordination.k8s.io`, ...) in `namespace` (`None`: cluster-scoped), with a client
    /// configured as kubectl's is ([`client`]). What `--locker kubernetes://...` does.
    ///
    /// # Errors
    ///
    /// As [`client`], [`Target::discover`] and [`new`](Self::new).
    pub async fn connect(
        context: Option<&str>,
        resource: &str,
        namespace: Option<String>,
        name: &str,
        config: LeaseConfig,
    ) -> Result<Self, Error> {
        let (client, target) =
            client::resolve(context, resource, namespace, name, config.request_timeout).await?;
        Self::new(client, target, config)
    }

    /// [`connect`](Self::connect) for programs without an async runtime: the locker runs on a
    /// small runtime of its own (one worker thread), and its blocking API
    /// ([`Locker::acquire_blocking`](crate::Locker::acquire_blocking),
    /// [`LockGuard::release_blocking`](crate::LockGuard::release_blocking)) works from any
    /// thread that is not inside a Tokio runtime.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect); [`Error::Unsupported`] inside a Tokio runtime.
    pub fn connect_blocking(
        context: Option<&str>,
        resource: &str,
        namespace: Option<String>,
        name: &str,
        config: LeaseConfig,
    ) -> Result<Self, Error> {
        let bridge = Bridge::own("lockgate-kubernetes")?;
        // The client is made on the runtime that will drive it.
        let (client, target) = bridge.block_on(
            "connect_blocking called inside a Tokio runtime; use connect().await",
            client::resolve(context, resource, namespace, name, config.request_timeout),
        )??;
        Self::build(client, target, config, bridge)
    }

    fn build(
        client: kube::Client,
        target: Target,
        config: LeaseConfig,
        bridge: Bridge,
    ) -> Result<Self, Error> {
        config.validate()?;
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
        let timing = Timing {
            renew_period: config.renew_period,
            renew_deadline: config.renew_deadline,
            ttl: config.ttl,
        };
        let object = Arc::new(Object::new(store, config));
        Ok(Self {
            session: Session::new(object, timing, bridge),
        })
    }

    fn inner(&self) -> &Arc<Object> {
        self.session.renewer()
    }

    /// Creates the object when it is missing (ConfigMaps only; for other resources a missing
    /// object stays [`Error::ResourceMissing`]). The setting belongs to the locker and every
    /// clone of it.
    pub fn create_missing(self, create: bool) -> Self {
        let store = &self.inner().store;
        let configmaps = store.api.resource_url().ends_with("/configmaps");
        store
            .create_missing
            .store(create && configmaps, Ordering::Relaxed);
        self
    }

    /// How long a waiting acquisition keeps trying an API server it cannot reach (no answer, a
    /// refused or reset connection, `5xx`, `429`) before it fails with
    /// [`Error::Unreachable`]; counted from the first failure of an outage, started afresh by
    /// every answer. Without it, only the acquisition's own deadline ends the retries. The
    /// setting belongs to the locker and every clone of it.
    pub fn patience(self, patience: std::time::Duration) -> Self {
        self.inner()
            .outages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .patience = Some(patience);
        self
    }

    /// Calls `hook` when a waiting acquisition finds the API server unreachable and starts
    /// retrying: once per outage, with the error that started it (a command line tool says at
    /// once what is wrong, rather than only when the [`patience`](Self::patience) runs out).
    pub fn on_unreachable(self, hook: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.inner()
            .outages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .on_unreachable = Some(Arc::new(hook));
        self
    }

    /// The object, as shown in messages ("configmaps default/locks").
    pub fn object(&self) -> &str {
        &self.inner().store.describe
    }

    /// The lock records on the object now.
    ///
    /// # Errors
    ///
    /// As reading the object fails; a record that cannot be parsed is reported in its entry.
    pub async fn status(&self) -> Result<Vec<RecordStatus>, Error> {
        self.inner().status().await
    }
}

impl Backend for KubernetesLocker {
    fn acquire<'a>(
        &'a self,
        name: &'a LockName,
        opts: &'a AcquireOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Lease>, AcquireError>> {
        Box::pin(acquire::acquire(&self.session, name, opts))
    }

    fn acquire_blocking(
        &self,
        name: &LockName,
        opts: &AcquireOptions,
    ) -> Result<Box<dyn Lease>, AcquireError> {
        let session = self.session.clone();
        let (name, opts) = (name.clone(), opts.clone());
        self.session.bridge().block_on(
            "acquire_blocking called inside a Tokio runtime; use acquire().await",
            async move { acquire::acquire(&session, &name, &opts).await },
        )?
    }
}
