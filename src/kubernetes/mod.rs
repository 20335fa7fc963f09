//! Distributed locks stored in the annotations of any Kubernetes object (feature `kubernetes`).
//!
//! Wire-compatible with Go lockgate's Kubernetes locker: the lock `NAME` is the annotation
//! [`annotation_key(NAME)`](annotation_key) holding Go's JSON lease record. See `PROTOCOL.md` for
//! the record, every state transition and the lease rules.

mod queue;
mod record;
mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject};
use kube::discovery::Scope;
use tokio::sync::{watch, Notify};

use crate::backend::{Backend, BoxFuture, Lease, LostNotifier, LostReason, LostSignal};
use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::{AcquireOptions, Holder, Mode, WaitInfo};

pub use record::{annotation_key, KEY_PREFIX};
use record::{unix_now, Record};
use store::{Change, Snapshot, Store, WriteError};

/// Lease timing. The defaults are Go lockgate's: a lease lives 10 s and is renewed every 3 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a record may stay unchanged before a waiter may take the lock over. Every
    /// participant must use the same TTL (Go lockgate's is 10 s).
    pub ttl: Duration,
    /// How often a holder renews its leases (one write per object for all of them).
    pub renew_period: Duration,
    /// How long after its last confirmed renewal a holder counts its lease as lost. Must be
    /// shorter than `ttl`: the difference is the time the holder has to stop acting before
    /// another process may take over.
    pub renew_deadline: Duration,
    /// Timeout of every API request.
    pub request_timeout: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            renew_period: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(8),
            request_timeout: Duration::from_secs(3),
        }
    }
}

impl LeaseConfig {
    fn validate(&self) -> Result<(), Error> {
        let ok = self.renew_period >= Duration::from_secs(1)
            && self.renew_period < self.renew_deadline
            && self.renew_deadline < self.ttl
            && !self.request_timeout.is_zero();
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig(format!(
                "lease timing must satisfy 1s <= renew_period < renew_deadline < ttl and a non-zero request timeout; got {self:?}"
            )))
        }
    }
}

/// A client configured the usual way: in-cluster service account, `$KUBECONFIG`, or
/// `~/.kube/config`; `context` picks a kubeconfig context other than the current one. Every
/// request times out after `timeout`.
///
/// # Errors
///
/// [`Error::InvalidConfig`] when no configuration can be found or it is unusable.
pub async fn client(context: Option<&str>, timeout: Duration) -> Result<kube::Client, Error> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let config = match context {
        None => kube::Config::infer().await.map_err(|e| {
            Error::InvalidConfig(format!(
                "no usable Kubernetes configuration: {}",
                crate::error::chain(&e)
            ))
        })?,
        Some(_) => kube::Config::from_kubeconfig(&options).await.map_err(|e| {
            Error::InvalidConfig(format!("kubeconfig: {}", crate::error::chain(&e)))
        })?,
    };
    client_from_config(config, timeout)
}

/// A client for `config`: kube's client stack with one change, TCP_NODELAY. kube's default connector leaves Nagle's
/// algorithm on, and a request written in two segments then waits for the server's delayed ACK
/// (40 ms) on every new connection: a lock handoff that needs a fresh connection would pay it.
///
/// # Errors
///
/// [`Error::InvalidConfig`] when the configuration's TLS or credentials are unusable.
pub fn client_from_config(config: kube::Config, timeout: Duration) -> Result<kube::Client, Error> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use kube::client::ConfigExt;
    use tower::ServiceBuilder;
    let fail = |e: kube::Error| {
        Error::InvalidConfig(format!("Kubernetes client: {}", crate::error::chain(&e)))
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    // Only connecting gets this timeout: each request is bounded by the locker itself, and a
    // read timeout would cut the long-lived watch.
    http.set_connect_timeout(Some(timeout));
    let https = config
        .rustls_https_connector_with_connector(http)
        .map_err(fail)?;
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(fail)?)
        .layer(config.extra_headers_layer().map_err(fail)?)
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace))
}

async fn resolve(
    context: Option<&str>,
    resource: &str,
    namespace: Option<String>,
    name: &str,
    timeout: Duration,
) -> Result<(kube::Client, Target), Error> {
    let client = client(context, timeout).await?;
    let target = match (resource, namespace) {
        ("configmaps", Some(ns)) => Target::configmap(ns, name),
        (_, namespace) => Target::discover(&client, resource, namespace, name).await?,
    };
    Ok((client, target))
}

/// Which object holds the locks.
#[derive(Debug, Clone)]
pub struct Target {
    resource: ApiResource,
    namespaced: bool,
    namespace: Option<String>,
    name: String,
}

impl Target {
    /// A ConfigMap.
    pub fn configmap(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        let ar = ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            plural: "configmaps".into(),
        };
        Self {
            resource: ar,
            namespaced: true,
            namespace: Some(namespace.into()),
            name: name.into(),
        }
    }

    /// An object of the resource named as kubectl names it (`configmaps`,
    /// `leases.coordination.k8s.io`, `widgets.v1alpha1.example.com`), resolved through the API
    /// server's discovery. `namespace` is `None` for cluster-scoped resources.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownResource`] when discovery does not know the resource, or when a
    /// namespace is given for a cluster-scoped resource or missing for a namespaced one;
    /// connection errors as [`Error::Unreachable`].
    pub async fn discover(
        client: &kube::Client,
        resource: &str,
        namespace: Option<String>,
        name: impl Into<String>,
    ) -> Result<Self, Error> {
        let name = name.into();
        let unknown = |why: String| Error::UnknownResource {
            resource: resource.to_owned(),
            reason: why,
        };
        // RESOURCE[.VERSION][.GROUP...]: the first label is the plural; the rest is a group, or a
        // version then a group.
        let (plural, rest) = resource.split_once('.').unwrap_or((resource, ""));
        let (version, group) = match rest.split_once('.') {
            Some((v, g))
                if v.starts_with('v') && v[1..].starts_with(|c: char| c.is_ascii_digit()) =>
            {
                (Some(v), g)
            }
            _ => (None, rest),
        };
        let discovery = kube::Discovery::new(client.clone())
            .filter(&[group])
            .run()
            .await
            .map_err(|e| Error::Unreachable {
                resource: resource.to_owned(),
                source: Box::new(e),
            })?;
        let found = discovery.groups().flat_map(|g| {
            let versions: Vec<String> = match version {
                Some(v) => vec![v.to_owned()],
                None => vec![g.preferred_version_or_latest().to_owned()],
            };
            versions
                .into_iter()
                .flat_map(|v| g.versioned_resources(&v))
                .filter(|(ar, _)| ar.plural == plural && ar.group == group)
                .collect::<Vec<_>>()
        });
        let (ar, caps) = found
            .into_iter()
            .next()
            .ok_or_else(|| unknown("the API server does not serve it".into()))?;
        let namespaced = caps.scope == Scope::Namespaced;
        match (&namespace, namespaced) {
            (Some(_), false) => {
                return Err(unknown("it is cluster-scoped; give no namespace".into()))
            }
            (None, true) => return Err(unknown("it is namespaced; give a namespace".into())),
            _ => {}
        }
        Ok(Self {
            resource: ar,
            namespaced,
            namespace,
            name,
        })
    }

    fn describe(&self) -> String {
        let kind = if self.resource.group.is_empty() {
            self.resource.plural.clone()
        } else {
            format!("{}.{}", self.resource.plural, self.resource.group)
        };
        match &self.namespace {
            Some(ns) => format!("{kind} {ns}/{}", self.name),
            None => format!("{kind} {}", self.name),
        }
    }
}

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
/// record has stayed unchanged for a whole TTL on the waiter's own monotonic clock.
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
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KubernetesLocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesLocker")
            .field("object", &self.inner.store.describe)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Store,
    config: LeaseConfig,
    runtime: tokio::runtime::Handle,
    /// Kept alive for lockers made for blocking use.
    _own_runtime: Option<tokio::runtime::Runtime>,
    held: Mutex<HashMap<String, Held>>,
    /// Lost members still to be told.
    pending_lost: Mutex<Vec<(LostNotifier, LostReason)>>,
    renew_wakeup: Arc<Notify>,
    renewer_started: std::sync::atomic::AtomicBool,
    watch: Mutex<Option<watch::Receiver<Option<Snapshot>>>>,
    next_member: std::sync::atomic::AtomicU64,
}

/// A lock this locker holds, with its holders in this process.
struct Held {
    uuid: String,
    /// The record as we last wrote or read it.
    value: String,
    /// Monotonic time at which the last confirmed write was sent: nobody can take the lock over
    /// before `renewed_at + ttl`.
    renewed_at: Instant,
    members: HashMap<u64, LostNotifier>,
}

impl KubernetesLocker {
    /// A locker over `target`, using `client`. Must be called inside a Tokio runtime, which then
    /// runs the locker's background renewals and watches.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for inconsistent lease timing.
    pub fn new(client: kube::Client, target: Target, config: LeaseConfig) -> Result<Self, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Unsupported("KubernetesLocker::new must be called inside a Tokio runtime")
        })?;
        Self::build(client, target, config, runtime, None)
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
            resolve(context, resource, namespace, name, config.request_timeout).await?;
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
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::Unsupported(
                "connect_blocking called inside a Tokio runtime; use connect().await",
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lockgate-kubernetes")
            .enable_all()
            .build()
            .map_err(|source| Error::System {
                op: "start the Kubernetes locker's runtime",
                source,
            })?;
        // The client is made on the runtime that will drive it.
        let (client, target) = runtime.block_on(resolve(
            context,
            resource,
            namespace,
            name,
            config.request_timeout,
        ))?;
        let handle = runtime.handle().clone();
        Self::build(client, target, config, handle, Some(runtime))
    }

    fn build(
        client: kube::Client,
        target: Target,
        config: LeaseConfig,
        runtime: tokio::runtime::Handle,
        own: Option<tokio::runtime::Runtime>,
    ) -> Result<Self, Error> {
        config.validate()?;
        let api = match (&target.namespace, target.namespaced) {
            (Some(ns), _) => Api::namespaced_with(client, ns, &target.resource),
            (None, _) => Api::all_with(client, &target.resource),
        };
        let store = Store {
            api,
            name: target.name.clone(),
            describe: target.describe(),
            timeout: config.request_timeout,
            create_missing: false,
            had_annotations: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                config,
                runtime,
                _own_runtime: own,
                held: Mutex::default(),
                pending_lost: Mutex::default(),
                renew_wakeup: Arc::new(Notify::new()),
                renewer_started: Default::default(),
                watch: Mutex::default(),
                next_member: Default::default(),
            }),
        })
    }

    /// Creates the object when it is missing (ConfigMaps only); without this a missing object is
    /// [`Error::ResourceMissing`].
    pub fn create_missing(mut self, create: bool) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.store.create_missing =
                create && inner.store.api.resource_url().ends_with("/configmaps");
        }
        self
    }

    /// The object, as shown in messages ("configmaps default/locks").
    pub fn object(&self) -> &str {
        &self.inner.store.describe
    }

    /// The lock records on the object now.
    ///
    /// # Errors
    ///
    /// As reading the object fails; a record that cannot be parsed is reported in its entry.
    pub async fn status(&self) -> Result<Vec<RecordStatus>, Error> {
        let snap = self.inner.store.get().await?;
        let now = unix_now();
        Ok(snap
            .annotations
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k.starts_with(KEY_PREFIX))
            .map(|(key, value)| match Record::parse(&value) {
                Ok(r) => RecordStatus {
                    key,
                    name: Some(r.lock_name),
                    mode: Some(if r.is_shared {
                        Mode::Shared
                    } else {
                        Mode::Exclusive
                    }),
                    holders: r.shared_holders,
                    waiters: r.queue.len(),
                    uuid: Some(r.uuid),
                    expires_in_secs: Some(r.expire_at - now),
                    error: None,
                },
                Err(e) => RecordStatus {
                    key,
                    name: None,
                    mode: None,
                    holders: 0,
                    waiters: 0,
                    uuid: None,
                    expires_in_secs: None,
                    error: Some(e.to_string()),
                },
            })
            .collect())
    }
}

/// One lock record on the object, as [`KubernetesLocker::status`] reports it.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct RecordStatus {
    /// The annotation key.
    pub key: String,
    /// The lock name recorded in it.
    pub name: Option<String>,
    /// Shared or exclusive.
    pub mode: Option<Mode>,
    /// How many holders the record counts.
    pub holders: i64,
    /// How many waiters are queued in it.
    pub waiters: usize,
    /// The lease UUID.
    pub uuid: Option<String>,
    /// Seconds until the writer's `ExpireAtTimestamp`, by this host's clock.
    pub expires_in_secs: Option<i64>,
    /// Why the record could not be read, for a corrupt one.
    pub error: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Acquisition

/// What to do about the record we see.
enum Step {
    /// Write this change; on success we hold the lock with this record.
    Grant(Change, Record),
    /// Write this change to join (or refresh our place in) the queue.
    Enqueue(Change),
    /// Somebody holds it, or is ahead of us: wait until this instant at the latest (for a
    /// record or a queue member to go stale, or to refresh our place).
    Wait(Record, Option<Instant>),
}

/// One acquisition's view of the queue.
struct Queuer {
    id: String,
    observer: queue::Observer,
    /// When our entry was last written.
    refreshed: Option<Instant>,
}

impl Inner {
    fn ttl_secs(&self) -> i64 {
        self.config.ttl.as_secs_f64().ceil() as i64
    }

    fn corrupt(&self, key: &str, e: serde_json::Error) -> Error {
        Error::CorruptRecord {
            resource: self.store.describe.clone(),
            key: key.to_owned(),
            source: e,
        }
    }

    /// Decides, from the current value of the annotation, what to do.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        name: &LockName,
        key: &str,
        mode: Mode,
        current: Option<&str>,
        observed: &mut Option<(String, Instant)>,
        me: &mut Queuer,
        may_wait: bool,
    ) -> Result<Step, Error> {
        let ttl = self.config.ttl;
        let Some(value) = current else {
            let rec = Record::new(name.as_str(), mode == Mode::Shared, self.ttl_secs());
            let change = Change {
                key: key.to_owned(),
                expected: None,
                new: Some(rec.to_value()),
            };
            return Ok(Step::Grant(change, rec));
        };
        let rec = Record::parse(value).map_err(|e| self.corrupt(key, e))?;
        // The expiry clock: how long the lease (the record without its queue, which waiters
        // change) has stood still, by our clock.
        let lease = rec.lease_part();
        match observed {
            Some((v, _)) if *v == lease => {}
            _ => *observed = Some((lease, Instant::now())),
        }
        let since = observed
            .as_ref()
            .map(|(_, t)| *t)
            .unwrap_or_else(Instant::now);
        // Free: released with waiters queued (count 0), or left to expire.
        let free = rec.shared_holders <= 0 || since.elapsed() >= ttl;
        let live = me
            .observer
            .live(&rec.queue, &me.id, ttl, 3 * ttl, unix_now());
        let mine = rec.queue.get(&me.id);
        let ahead = queue::ahead(&live, mine);
        let allowed = queue::may_proceed(mode, &ahead);
        let change = |new: &Record| Change {
            key: key.to_owned(),
            expected: Some(value.to_owned()),
            new: Some(new.to_value()),
        };
        if free && allowed {
            let mut new = Record::new(name.as_str(), mode == Mode::Shared, self.ttl_secs());
            new.other = rec.other.clone();
            // Keep the live waiters' places; drop ours and the dead.
            new.queue = live.iter().map(|m| (m.id.clone(), (*m).clone())).collect();
            return Ok(Step::Grant(change(&new), new));
        }
        if !free && mode == Mode::Shared && rec.is_shared && allowed {
            let mut joined = rec.clone();
            joined.shared_holders += 1;
            joined.expire_at = unix_now() + self.ttl_secs();
            joined.queue.remove(&me.id);
            return Ok(Step::Grant(change(&joined), joined));
        }
        if may_wait
            && (mine.is_none()
                || me
                    .refreshed
                    .is_none_or(|t| t.elapsed() >= self.config.renew_period))
        {
            let mut queued = rec.clone();
            let member = queue::Member {
                id: me.id.clone(),
                arrived: mine.map_or_else(unix_now, |m| m.arrived),
                expire_at: unix_now() + self.ttl_secs(),
                shared: mode == Mode::Shared,
                other: mine.map(|m| m.other.clone()).unwrap_or_default(),
            };
            queued.queue.insert(me.id.clone(), member);
            return Ok(Step::Enqueue(change(&queued)));
        }
        let wake = [
            (!free).then_some(since + ttl),
            me.refreshed.map(|t| t + self.config.renew_period),
            me.observer.next_expiry(ttl),
        ]
        .into_iter()
        .flatten()
        .min();
        Ok(Step::Wait(rec, wake))
    }

    /// The shared watch of the object, started on first use.
    fn watch(self: &Arc<Self>) -> watch::Receiver<Option<Snapshot>> {
        let mut slot = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = slot.as_ref() {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        let weak = Arc::downgrade(self);
        let api = self.store.api.clone();
        let selector = format!("metadata.name={}", self.store.name);
        self.runtime.spawn(watch_object(api, selector, tx, weak));
        *slot = Some(rx.clone());
        rx
    }

    async fn acquire(
        self: &Arc<Self>,
        name: &LockName,
        opts: &AcquireOptions,
    ) -> Result<Box<dyn Lease>, AcquireError> {
        let start = Instant::now();
        let deadline = opts.wait.deadline(start);
        let key = annotation_key(name.as_str());
        // Start optimistic: assume the lock is free, which makes an uncontended acquisition one
        // request; a wrong guess costs a failed `test` and a GET.
        let mut current = self.store.assumed();
        let mut observed = None;
        let mut notified = false;
        let mut conflicts = 0u32;
        let mut outages = 0u32;
        let mut rx: Option<watch::Receiver<Option<Snapshot>>> = None;
        let mut me = Queuer {
            id: queue::new_id(),
            observer: Default::default(),
            refreshed: None,
        };
        // Takes our place in the queue back if we leave without the lock (timeout, error,
        // cancellation).
        let mut cleanup = QueueCleanup {
            inner: Arc::clone(self),
            key: key.clone(),
            id: me.id.clone(),
            armed: false,
        };
        let may_wait = !opts.wait.is_non_blocking();
        loop {
            let step = self.step(
                name,
                &key,
                opts.mode,
                current.get(&key),
                &mut observed,
                &mut me,
                may_wait,
            )?;
            let (change, granted) = match step {
                Step::Grant(change, rec) => (change, Some(rec)),
                Step::Enqueue(change) => (change, None),
                Step::Wait(rec, wake) => {
                    if !may_wait {
                        return Err(AcquireError::WouldBlock {
                            name: name.as_str().to_owned(),
                        });
                    }
                    if !notified {
                        notified = true;
                        let mode = if rec.is_shared {
                            Mode::Shared
                        } else {
                            Mode::Exclusive
                        };
                        let mut holder = Holder::with_id(mode, rec.uuid.clone());
                        if rec.is_shared {
                            holder.id =
                                Some(format!("{} ({} holders)", rec.uuid, rec.shared_holders));
                        }
                        opts.notify_wait(&WaitInfo {
                            name: name.as_str(),
                            mode: opts.mode,
                            holders: vec![holder],
                        });
                    }
                    let rx = rx.get_or_insert_with(|| self.watch());
                    // Wake up when the object changes, when something we see may go stale, or
                    // at the deadline.
                    let wake = match (wake, deadline) {
                        (Some(w), Some(d)) => Some(w.min(d)),
                        (w, d) => w.or(d),
                    };
                    let sleep = async {
                        match wake {
                            Some(w) => tokio::time::sleep_until(w.into()).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        changed = rx.changed() => {
                            if changed.is_err() {
                                return Err(Error::Unreachable {
                                    resource: self.store.describe.clone(),
                                    source: "the watch of the object ended".into(),
                                }.into());
                            }
                            let snap = rx.borrow_and_update().clone();
                            match snap {
                                None => return Err(Error::ResourceMissing { resource: self.store.describe.clone() }.into()),
                                // Ignore a watch event older than what we read ourselves.
                                Some(s) if s.rv.is_some() && current.rv.is_some() && s.rv < current.rv => {}
                                Some(s) => current = s,
                            }
                        }
                        _ = sleep => {
                            if deadline.is_some_and(|d| Instant::now() >= d) {
                                return Err(timed_out(name, start));
                            }
                        }
                    }
                    continue;
                }
            };
            if granted.is_none() {
                // Arm before writing: a cancellation while the write is in flight must still
                // take our place back (removing an entry that is not there is a no-op).
                cleanup.armed = true;
            }
            let sent = Instant::now();
            match self
                .store
                .write(std::slice::from_ref(&change), current.annotations.is_some())
                .await
            {
                Ok(after) => match granted {
                    Some(rec) => {
                        cleanup.armed = false;
                        return Ok(self.granted(name, opts, &key, rec, change, after, sent));
                    }
                    None => {
                        outages = 0;
                        me.refreshed = Some(sent);
                        conflicts = 0;
                        current = after;
                    }
                },
                // The API server is unreachable (restarting, overloaded): a waiting acquisition
                // keeps trying until its deadline; a non-blocking one reports it.
                Err(WriteError::Failed(e @ Error::Unreachable { .. })) if may_wait => {
                    outages += 1;
                    let pause = Duration::from_millis(100 << outages.min(4));
                    tracing::warn!(lock = name.as_str(), error = %crate::error::chain(&e), ?pause, "API server unreachable; retrying");
                    if deadline.is_some_and(|d| Instant::now() + pause >= d) {
                        return Err(e.into());
                    }
                    tokio::time::sleep(pause).await;
                    if let Ok(fresh) = self.store.get().await {
                        current = fresh;
                    }
                }
                Err(WriteError::Failed(e)) => return Err(e.into()),
                Err(WriteError::Conflict) => {
                    conflicts += 1;
                    if conflicts > 2 {
                        // Repeated conflicts: back off a little, with jitter.
                        let jitter = u64::from(uuid::Uuid::new_v4().as_u128() as u16 % 50);
                        let pause = Duration::from_millis((5 << conflicts.min(6)) + jitter);
                        if deadline.is_some_and(|d| Instant::now() + pause >= d) {
                            return Err(timed_out(name, start));
                        }
                        tokio::time::sleep(pause).await;
                    }
                    let fresh = match rx.as_mut() {
                        // Waiting already: the watch brings the change that beat us, without
                        // a GET from every waiter.
                        Some(rx) => self.newer_than(rx, &current).await,
                        None => self.store.get().await,
                    };
                    match fresh {
                        Ok(fresh) => current = fresh,
                        Err(Error::Unreachable { .. }) if may_wait => {
                            // Handled like a failed write on the next round.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }

    /// A state of the object newer than `seen`, from the watch (a GET if it brings none soon).
    async fn newer_than(
        &self,
        rx: &mut watch::Receiver<Option<Snapshot>>,
        seen: &Snapshot,
    ) -> Result<Snapshot, Error> {
        let newer = |s: &Option<Snapshot>| match (s, seen.rv) {
            (Some(s), Some(rv)) => s.rv.is_some_and(|r| r > rv),
            _ => false,
        };
        let wait = async {
            loop {
                if let Some(s) = rx
                    .borrow_and_update()
                    .clone()
                    .filter(|s| newer(&Some(s.clone())))
                {
                    return Some(s);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(1), wait).await {
            Ok(Some(s)) => Ok(s),
            _ => self.store.get().await,
        }
    }

    /// Removes waiter `id` from the queue of `key`. Our enqueue write may still be in flight
    /// when the acquisition is cancelled, so an entry that is not there yet is looked for again
    /// until a request timeout has passed.
    async fn dequeue(&self, key: &str, id: &str) -> Result<(), Error> {
        let give_up = Instant::now() + self.config.request_timeout + Duration::from_millis(500);
        let mut pause = Duration::from_millis(50);
        loop {
            let snap = self.store.get().await?;
            let found = snap
                .get(key)
                .and_then(|v| Record::parse(v).ok().map(|r| (v.to_owned(), r)))
                .filter(|(_, r)| r.queue.contains_key(id));
            match found {
                Some((value, mut rec)) => {
                    rec.queue.remove(id);
                    // A free record kept only for its waiters goes away with the last of them.
                    let new =
                        (rec.shared_holders > 0 || !rec.queue.is_empty()).then(|| rec.to_value());
                    let change = Change {
                        key: key.to_owned(),
                        expected: Some(value),
                        new,
                    };
                    match self.store.write(std::slice::from_ref(&change), true).await {
                        Ok(_) => return Ok(()),
                        Err(WriteError::Conflict) => continue,
                        Err(WriteError::Failed(e)) => return Err(e),
                    }
                }
                _ if Instant::now() >= give_up => return Ok(()),
                _ => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(800));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn granted(
        self: &Arc<Self>,
        name: &LockName,
        opts: &AcquireOptions,
        key: &str,
        rec: Record,
        change: Change,
        after: Snapshot,
        sent: Instant,
    ) -> Box<dyn Lease> {
        let value = change.new.expect("a grant writes a record");
        let (notifier, signal) = LostNotifier::with_hook(name.as_str(), opts);
        let member = self
            .next_member
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = held.entry(key.to_owned()).or_insert_with(|| Held {
                uuid: rec.uuid.clone(),
                value: value.clone(),
                renewed_at: sent,
                members: HashMap::new(),
            });
            if entry.uuid != rec.uuid {
                // Our older membership was lost and someone's record replaced it; this grant
                // starts afresh.
                let mut pending = self
                    .pending_lost
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                pending.extend(entry.members.drain().map(|(_, n)| (n, LostReason::Taken)));
                entry.uuid = rec.uuid.clone();
            }
            entry.value = value;
            entry.renewed_at = sent;
            entry.members.insert(member, notifier);
        }
        self.flush_lost();
        self.ensure_renewer();
        tracing::debug!(lock = name.as_str(), object = %self.store.describe, token = ?after.rv, "kubernetes lock acquired");
        Box::new(KubeLease {
            inner: Arc::clone(self),
            runtime: self.runtime.clone(),
            name: name.as_str().to_owned(),
            key: key.to_owned(),
            member,
            signal,
            token: after.rv,
            released: false,
        })
    }

    fn ensure_renewer(self: &Arc<Self>) {
        if !self
            .renewer_started
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            self.runtime
                .spawn(renew_loop(Arc::downgrade(self), self.renew_wakeup.clone()));
        }
        self.renew_wakeup.notify_one();
    }

    /// Marks every member of `key` lost and forgets the key. The members are told by
    /// [`flush_lost`](Self::flush_lost), outside the `held` lock, since their hooks run user code.
    fn lose(&self, held: &mut HashMap<String, Held>, key: &str, reason: LostReason) {
        if let Some(h) = held.remove(key) {
            tracing::warn!(object = %self.store.describe, key, %reason, "lease lost");
            let mut pending = self
                .pending_lost
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            pending.extend(h.members.into_values().map(|n| (n, reason.clone())));
        }
    }

    fn flush_lost(&self) {
        let pending = std::mem::take(
            &mut *self
                .pending_lost
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for (n, reason) in pending {
            n.notify(reason);
        }
    }

    /// One renewal round: declares overdue leases lost, renews every lease that is due (all
    /// in one write when any is due). Returns when to run again.
    async fn renew_round(&self) -> Option<Instant> {
        let now = Instant::now();
        let changes: Vec<Change> = {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            let overdue: Vec<String> = held
                .iter()
                .filter(|(_, h)| now >= h.renewed_at + self.config.renew_deadline)
                .map(|(k, _)| k.clone())
                .collect();
            for key in overdue {
                self.lose(&mut held, &key, LostReason::RenewalFailed);
            }
            if held.is_empty() {
                return None;
            }
            let due = held
                .values()
                .any(|h| now >= h.renewed_at + self.config.renew_period);
            if !due {
                return held
                    .values()
                    .map(|h| h.renewed_at + self.config.renew_period)
                    .min();
            }
            let mut changes = Vec::with_capacity(held.len());
            for (key, h) in held.iter() {
                match Record::parse(&h.value) {
                    Ok(mut rec) => {
                        rec.expire_at = unix_now() + self.ttl_secs();
                        changes.push(Change {
                            key: key.clone(),
                            expected: Some(h.value.clone()),
                            new: Some(rec.to_value()),
                        });
                    }
                    Err(e) => tracing::error!(key, error = %e, "our own record does not parse"),
                }
            }
            changes
        };
        let sent = Instant::now();
        match self.store.write(&changes, true).await {
            Ok(_) => {
                let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
                for c in changes {
                    if let Some(h) = held.get_mut(&c.key) {
                        if Some(&h.value) == c.expected.as_ref() {
                            h.value = c.new.expect("renewals write records");
                            h.renewed_at = sent;
                        }
                    }
                }
                tracing::trace!(object = %self.store.describe, "leases renewed");
                Some(Instant::now())
            }
            Err(WriteError::Conflict) => {
                // Some record changed: other shared holders joined or renewed (still ours), or
                // someone took a lock over (lost). Read and sort them out, then renew at once.
                match self.store.get().await {
                    Ok(snap) => {
                        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
                        let keys: Vec<String> = held.keys().cloned().collect();
                        for key in keys {
                            let still_ours = snap
                                .get(&key)
                                .and_then(|v| Record::parse(v).ok().map(|r| (v, r)))
                                .filter(|(_, r)| Some(&r.uuid) == held.get(&key).map(|h| &h.uuid));
                            match still_ours {
                                Some((v, _)) => {
                                    held.get_mut(&key).expect("listed").value = v.to_owned()
                                }
                                None => self.lose(&mut held, &key, LostReason::Taken),
                            }
                        }
                        Some(Instant::now())
                    }
                    Err(e) => {
                        tracing::warn!(object = %self.store.describe, error = %e, "cannot read the lock object to renew leases");
                        Some(Instant::now() + Duration::from_millis(500))
                    }
                }
            }
            Err(WriteError::Failed(e)) => {
                tracing::warn!(object = %self.store.describe, error = %crate::error::chain(&e), "lease renewal failed; retrying");
                Some(Instant::now() + Duration::from_millis(500))
            }
        }
    }

    /// Releases one member's hold of `key`.
    async fn release(&self, name: &str, key: &str, member: u64) -> Result<(), Error> {
        let lost = |reason| Error::LeaseLost {
            name: name.to_owned(),
            reason,
        };
        let (uuid, mut value, expires) = {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(h) = held
                .get_mut(key)
                .filter(|h| h.members.contains_key(&member))
            else {
                return Err(lost(LostReason::Taken));
            };
            h.members.remove(&member);
            let r = (
                h.uuid.clone(),
                h.value.clone(),
                h.renewed_at + self.config.ttl,
            );
            if h.members.is_empty() {
                held.remove(key);
            }
            r
        };
        loop {
            let rec = Record::parse(&value).map_err(|e| self.corrupt(key, e))?;
            if rec.uuid != uuid {
                return Err(lost(LostReason::Taken));
            }
            let new = if rec.shared_holders > 1 {
                let mut left = rec.clone();
                left.shared_holders -= 1;
                Some(left.to_value())
            } else if !rec.queue.is_empty() {
                // Waiters are queued: keep their places in a free record (count 0, expired for
                // Go peers) rather than removing it.
                let mut free = rec.clone();
                free.shared_holders = 0;
                free.expire_at = unix_now() - 1;
                Some(free.to_value())
            } else {
                None
            };
            let change = Change {
                key: key.to_owned(),
                expected: Some(value.clone()),
                new: new.clone(),
            };
            match self.store.write(std::slice::from_ref(&change), true).await {
                Ok(_) => {
                    if let (Some(new), Some(h)) = (
                        new,
                        self.held
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_mut(key),
                    ) {
                        h.value = new;
                    }
                    tracing::debug!(lock = name, object = %self.store.describe, "kubernetes lock released");
                    return Ok(());
                }
                Err(WriteError::Conflict) => match self.store.get().await?.get(key) {
                    Some(v) => value = v.to_owned(),
                    None => return Err(lost(LostReason::Taken)),
                },
                Err(WriteError::Failed(e @ Error::Unreachable { .. })) => {
                    if Instant::now() >= expires {
                        // The lease has expired by now anyway; nobody counts on us any more.
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(WriteError::Failed(e)) => return Err(e),
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Let the renewer see that the locker is gone.
        self.renew_wakeup.notify_one();
        // The last reference may go away on the runtime's own thread, where dropping a runtime
        // would panic.
        if let Some(rt) = self._own_runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn renew_loop(owner: Weak<Inner>, wakeup: Arc<Notify>) {
    loop {
        let next = match owner.upgrade() {
            Some(inner) => {
                let next = inner.renew_round().await;
                inner.flush_lost();
                next
            }
            None => return,
        };
        match next {
            Some(at) if at > Instant::now() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = wakeup.notified() => {}
                }
            }
            Some(_) => {}
            None => wakeup.notified().await,
        }
    }
}

/// One member's hold of a Kubernetes lock.
struct KubeLease {
    /// Keeps the locker alive until the lease is released.
    inner: Arc<Inner>,
    runtime: tokio::runtime::Handle,
    name: String,
    key: String,
    member: u64,
    signal: LostSignal,
    token: Option<u64>,
    released: bool,
}

impl std::fmt::Debug for KubeLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLease")
            .field("key", &self.key)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl KubeLease {
    fn take(&mut self) -> impl std::future::Future<Output = Result<(), Error>> + Send + 'static {
        self.released = true;
        let (inner, name, key, member) = (
            self.inner.clone(),
            self.name.clone(),
            self.key.clone(),
            self.member,
        );
        async move { inner.release(&name, &key, member).await }
    }
}

impl Lease for KubeLease {
    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(self.take())
    }

    fn release_blocking(mut self: Box<Self>) -> Result<(), Error> {
        let fut = self.take();
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::Unsupported(
                "release_blocking called inside a Tokio runtime; use release().await",
            ));
        }
        self.runtime.block_on(fut)
    }

    fn lost_signal(&self) -> LostSignal {
        self.signal.clone()
    }

    fn fencing_token(&self) -> Option<u64> {
        self.token
    }
}

impl Drop for KubeLease {
    fn drop(&mut self) {
        if !self.released {
            let fut = self.take();
            let name = self.name.clone();
            // Best effort; if it cannot run, the lease expires after its TTL.
            self.runtime.spawn(async move {
                if let Err(e) = fut.await {
                    tracing::warn!(lock = name, error = %crate::error::chain(&e), "release on drop failed");
                }
            });
        }
    }
}

impl Backend for KubernetesLocker {
    fn acquire<'a>(
        &'a self,
        name: &'a LockName,
        opts: &'a AcquireOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Lease>, AcquireError>> {
        Box::pin(self.inner.acquire(name, opts))
    }

    fn acquire_blocking(
        &self,
        name: &LockName,
        opts: &AcquireOptions,
    ) -> Result<Box<dyn Lease>, AcquireError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::Unsupported(
                "acquire_blocking called inside a Tokio runtime; use acquire().await",
            )
            .into());
        }
        let inner = self.inner.clone();
        let (name, opts) = (name.clone(), opts.clone());
        self.inner
            .runtime
            .block_on(async move { inner.acquire(&name, &opts).await })
    }
}

/// Leaves the queue when an acquisition ends without the lock.
struct QueueCleanup {
    inner: Arc<Inner>,
    key: String,
    id: String,
    armed: bool,
}

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        if self.armed {
            let (inner, key, id) = (Arc::clone(&self.inner), self.key.clone(), self.id.clone());
            self.inner.runtime.spawn(async move {
                if let Err(e) = inner.dequeue(&key, &id).await {
                    // Our entry stops being refreshed and counts as dead after a TTL anyway.
                    tracing::debug!(key, error = %crate::error::chain(&e), "cannot leave the queue");
                }
            });
        }
    }
}

fn timed_out(name: &LockName, start: Instant) -> AcquireError {
    AcquireError::TimedOut {
        name: name.as_str().to_owned(),
        waited: start.elapsed(),
    }
}

/// Feeds the object's state into `tx` until the locker is dropped.
async fn watch_object(
    api: Api<DynamicObject>,
    selector: String,
    tx: watch::Sender<Option<Snapshot>>,
    owner: Weak<Inner>,
) {
    use futures_util::StreamExt;
    use kube::runtime::watcher::{self, Event};
    use kube::runtime::WatchStreamExt;
    let stream =
        watcher::watcher(api, watcher::Config::default().fields(&selector)).default_backoff();
    futures_util::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        if owner.strong_count() == 0 || tx.is_closed() {
            return;
        }
        match ev {
            Ok(Event::Apply(obj)) | Ok(Event::InitApply(obj)) => {
                let _ = tx.send(Some(Snapshot::from_object(&obj)));
            }
            Ok(Event::Delete(_)) => {
                let _ = tx.send(None);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "watch of the lock object failed; retrying"),
        }
    }
}
