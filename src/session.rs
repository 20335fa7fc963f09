//! The liveness of leased locks, shared by every remote backend (Kubernetes, HTTP).
//!
//! A [`Session`] owns what keeps leases alive, as etcd's `concurrency.Session` does; the locks
//! borrow it:
//!
//! - the set of held leases, each with the members (acquisitions) of this process that hold it;
//! - one renewal task, which renews every lease that is due in one call to the backend's
//!   [`Renewer`] (one write per store object for the Kubernetes backend);
//! - the lost-lease rule: a lease is lost no later than `renew_deadline` after the moment its last
//!   confirmed renewal was *sent*, whatever the network does (a renewal still in flight at the
//!   deadline does not delay the verdict);
//! - the blocking bridge for lockers that own their runtime ([`Bridge`]).
//!
//! Why the rule is safe: nobody can see a renewal before it was sent, so nobody can count a lease
//! as expired before `sent + ttl`; a holder told at `sent + renew_deadline` (< `ttl`) has
//! `ttl − renew_deadline` to stop.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::backend::{BoxFuture, LostNotifier, LostReason};
use crate::error::Error;

/// How often leases are renewed, and when a lease whose renewal was not confirmed is lost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub renew_period: Duration,
    pub renew_deadline: Duration,
}

/// What became of one lease in a renewal round.
#[derive(Debug)]
pub(crate) enum Renewal<S> {
    /// Renewed; the lease's new state (what the store now holds).
    Renewed(S),
    /// The lease is gone.
    Lost(LostReason),
    /// Not known (the store did not answer, or answered with a passing error): try again.
    Unknown,
}

/// A backend's renewal of the leases it holds.
pub(crate) trait Renewer: Send + Sync + 'static {
    /// A backend's view of one held lease (what a renewal or a release needs).
    type State: Clone + Send + Sync + std::fmt::Debug + 'static;

    /// Renews `leases`, in as few requests as the store allows. Returns one outcome per lease,
    /// in the same order.
    fn renew(&self, leases: Vec<(String, Self::State)>)
        -> BoxFuture<'_, Vec<Renewal<Self::State>>>;
}

/// Leases to renew: key, state, generation.
type Batch<S> = Vec<(String, S, u64)>;

/// One lease held by this process.
struct Held<S> {
    state: S,
    /// Bumped by every change of `state` not made by the renewer, so that a renewal result that
    /// raced with such a change is not applied over it.
    generation: u64,
    /// When the last confirmed renewal (or the granting write) was sent.
    confirmed: Instant,
    members: HashMap<u64, LostNotifier>,
}

/// The leases of one locker and the task that renews them.
pub(crate) struct Session<R: Renewer> {
    renewer: R,
    timing: Mutex<Timing>,
    bridge: Bridge,
    held: Mutex<HashMap<String, Held<R::State>>>,
    wakeup: Arc<Notify>,
    started: AtomicBool,
    ids: AtomicU64,
}

/// What a member that leaves a lease must do next.
pub(crate) struct Leaving<S> {
    /// The lease's state, for the releasing write.
    pub state: S,
    /// How many members of this process still hold it.
    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    pub remaining: usize,
    /// When the lease could expire for others at the earliest (last confirmed send + TTL is the
    /// backend's to add; this is the last confirmed send).
    pub confirmed: Instant,
}

impl<R: Renewer> Session<R> {
    pub fn new(renewer: R, timing: Timing, bridge: Bridge) -> Arc<Self> {
        Arc::new(Self {
            renewer,
            timing: Mutex::new(timing),
            bridge,
            held: Mutex::default(),
            wakeup: Arc::new(Notify::new()),
            started: AtomicBool::new(false),
            ids: AtomicU64::new(1),
        })
    }

    pub fn renewer(&self) -> &R {
        &self.renewer
    }

    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    fn timing(&self) -> Timing {
        *self.timing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the renewal timing, for a backend that learns the lease TTL from its store (the
    /// HTTP locker, from the server's answers). Takes effect at the next renewal round.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub fn set_timing(&self, timing: Timing) {
        *self.timing.lock().unwrap_or_else(PoisonError::into_inner) = timing;
        self.wakeup.notify_one();
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held<R::State>>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a member to the lease `key`, granted by a write sent at `sent` that left `state` in
    /// the store. `fresh` says the grant started a new lease: members this process still had on
    /// the key's old lease lost it. Returns the member's id.
    pub fn join(
        self: &Arc<Self>,
        key: &str,
        state: R::State,
        sent: Instant,
        fresh: bool,
        notifier: LostNotifier,
    ) -> u64 {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let mut lost = Vec::new();
        {
            let mut held = self.held();
            let h = held.entry(key.to_owned()).or_insert_with(|| Held {
                state: state.clone(),
                generation: 0,
                confirmed: sent,
                members: HashMap::new(),
            });
            if fresh {
                lost.extend(h.members.drain().map(|(_, n)| n));
            }
            h.state = state;
            h.generation += 1;
            h.confirmed = if fresh { sent } else { h.confirmed.min(sent) };
            h.members.insert(id, notifier);
        }
        tell(lost, LostReason::Taken);
        self.ensure_renewer();
        id
    }

    /// Removes member `id` of `key`. `None` when it does not hold the lease any more (lost).
    pub fn leave(&self, key: &str, id: u64) -> Option<Leaving<R::State>> {
        let mut held = self.held();
        let h = held.get_mut(key)?;
        h.members.remove(&id)?;
        let leaving = Leaving {
            state: h.state.clone(),
            remaining: h.members.len(),
            confirmed: h.confirmed,
        };
        if h.members.is_empty() {
            held.remove(key);
        }
        Some(leaving)
    }

    /// Records a change of the lease `key` made outside the renewer (a release that left other
    /// members holding it).
    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    pub fn update(&self, key: &str, state: R::State) {
        if let Some(h) = self.held().get_mut(key) {
            h.state = state;
            h.generation += 1;
        }
    }

    /// Declares every member of `key` lost.
    pub fn lose(&self, key: &str, reason: LostReason) {
        let members = self.held().remove(key);
        if let Some(h) = members {
            tracing::warn!(key, %reason, "lease lost");
            tell(h.members.into_values(), reason);
        }
    }

    fn ensure_renewer(self: &Arc<Self>) {
        if !self.started.swap(true, Ordering::AcqRel) {
            self.bridge
                .handle
                .spawn(renew_loop(Arc::downgrade(self), Arc::clone(&self.wakeup)));
        }
        self.wakeup.notify_one();
    }

    /// Declares leases lost whose deadline passed; returns the leases to renew now (all of them
    /// when any is due) and when to look again otherwise.
    fn due(&self) -> Result<Batch<R::State>, Option<Instant>> {
        let now = Instant::now();
        let Timing {
            renew_period,
            renew_deadline,
        } = self.timing();
        let overdue: Vec<String> = self
            .held()
            .iter()
            .filter(|(_, h)| now >= h.confirmed + renew_deadline)
            .map(|(k, _)| k.clone())
            .collect();
        for key in overdue {
            self.lose(&key, LostReason::RenewalFailed);
        }
        let held = self.held();
        let next = held.values().map(|h| h.confirmed + renew_period).min();
        match next {
            None => Err(None),
            Some(at) if at > now => Err(Some(at)),
            Some(_) => Ok(held
                .iter()
                .map(|(k, h)| (k.clone(), h.state.clone(), h.generation))
                .collect()),
        }
    }

    /// The earliest renewal deadline among `keys`.
    fn deadline(&self, keys: &Batch<R::State>) -> Option<Instant> {
        let renew_deadline = self.timing().renew_deadline;
        let held = self.held();
        keys.iter()
            .filter_map(|(k, _, _)| held.get(k))
            .map(|h| h.confirmed + renew_deadline)
            .min()
    }

    /// One renewal round. Returns when to run again (`None`: when woken).
    async fn round(&self) -> Option<Instant> {
        let batch = match self.due() {
            Ok(batch) => batch,
            Err(next) => return next,
        };
        let Some(deadline) = self.deadline(&batch) else {
            return Some(Instant::now());
        };
        let sent = Instant::now();
        let leases = batch
            .iter()
            .map(|(k, s, _)| (k.clone(), s.clone()))
            .collect();
        // The verdict comes at the deadline even if the store never answers.
        let Ok(outcomes) =
            tokio::time::timeout_at(deadline.into(), self.renewer.renew(leases)).await
        else {
            return Some(Instant::now());
        };
        let mut retry = false;
        for ((key, _, generation), outcome) in batch.into_iter().zip(outcomes) {
            match outcome {
                Renewal::Renewed(state) => {
                    if let Some(h) = self.held().get_mut(&key) {
                        if h.generation == generation {
                            h.state = state;
                            h.confirmed = h.confirmed.max(sent);
                        } else {
                            // Changed meanwhile (a release, a join): renew the new state.
                            retry = true;
                        }
                    }
                }
                Renewal::Lost(reason) => self.lose(&key, reason),
                Renewal::Unknown => retry = true,
            }
        }
        Some(if retry {
            Instant::now() + Duration::from_millis(200)
        } else {
            Instant::now()
        })
    }
}

/// Tells `notifiers` that their lease is lost.
fn tell(notifiers: impl IntoIterator<Item = LostNotifier>, reason: LostReason) {
    for n in notifiers {
        n.notify(reason.clone());
    }
}

async fn renew_loop<R: Renewer>(session: Weak<Session<R>>, wakeup: Arc<Notify>) {
    loop {
        // No strong reference is held while sleeping, so that the session can go away.
        let Some(next) = (match session.upgrade() {
            Some(s) => Some(s.round().await),
            None => None,
        }) else {
            return;
        };
        let sleep = async {
            match next {
                Some(at) if at > Instant::now() => tokio::time::sleep_until(at.into()).await,
                Some(_) => {}
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = wakeup.notified() => {}
        }
    }
}

impl<R: Renewer> Drop for Session<R> {
    fn drop(&mut self) {
        // Let the renewer see that the session is gone.
        self.wakeup.notify_one();
    }
}

/// The runtime a leased locker runs on, and the blocking API's way onto it.
pub(crate) struct Bridge {
    pub handle: tokio::runtime::Handle,
    /// The runtime of a locker made for synchronous programs, kept alive with it.
    own: Option<tokio::runtime::Runtime>,
}

impl Bridge {
    /// The runtime of the calling task.
    pub fn current(what: &'static str) -> Result<Self, Error> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| Error::Unsupported(what))?;
        Ok(Self { handle, own: None })
    }

    /// A small runtime of the locker's own (one worker thread), for synchronous programs.
    pub fn own(thread_name: &str) -> Result<Self, Error> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::Unsupported(
                "a locker for blocking use was made inside a Tokio runtime; use the async constructor",
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(thread_name)
            .enable_all()
            .build()
            .map_err(|source| Error::System {
                op: "start the locker's runtime",
                source,
            })?;
        Ok(Self {
            handle: runtime.handle().clone(),
            own: Some(runtime),
        })
    }

    /// Runs `fut` to completion on the locker's runtime, blocking the calling thread.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] when called inside a Tokio runtime, where blocking would stall it.
    pub fn block_on<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = T>,
    ) -> Result<T, Error> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::Unsupported(what));
        }
        Ok(self.handle.block_on(fut))
    }

    /// `release_blocking` of a lease: runs the release that `take` starts, blocking the calling
    /// thread. Inside a Tokio runtime it refuses before `take` is called, so that the lease,
    /// dropped unreleased, is released in the background ([`release_on_drop`](Self::release_on_drop)).
    pub fn release_blocking<F>(&self, take: impl FnOnce() -> F) -> Result<(), Error>
    where
        F: Future<Output = Result<(), Error>>,
    {
        const INSIDE: &str = "release_blocking called inside a Tokio runtime; use release().await (the lock is being released in the background)";
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::Unsupported(INSIDE));
        }
        self.block_on(INSIDE, take())?
    }

    /// The release of a lease dropped without being released, in the background. Best effort:
    /// if it cannot run, the lease expires after its TTL.
    pub fn release_on_drop(
        &self,
        name: String,
        release: impl Future<Output = Result<(), Error>> + Send + 'static,
    ) {
        self.handle.spawn(async move {
            if let Err(e) = release.await {
                tracing::warn!(lock = name, error = %crate::error::chain(&e), "release on drop failed");
            }
        });
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // The last reference may go away on the runtime's own thread, where dropping a runtime
        // would panic.
        if let Some(rt) = self.own.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("own_runtime", &self.own.is_some())
            .finish()
    }
}
