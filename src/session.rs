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

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::backend::{BoxFuture, LostNotifier, LostReason};
use crate::clock::{self, Boot};
use crate::error::Error;

/// How often leases are renewed, and when a lease whose renewal was not confirmed is lost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub renew_period: Duration,
    pub renew_deadline: Duration,
    /// How long a lease lives unrenewed in the store: others may take it over that long after
    /// the last confirmed renewal was sent, at the earliest.
    pub ttl: Duration,
}

/// The longest the renewal task sleeps while it holds leases: its timers run on the monotonic
/// clock, which stops while the host is suspended, and deadlines are on the boot clock, which
/// does not. A host that wakes after its deadline gives its verdict within this much.
const LONGEST_NAP: Duration = Duration::from_secs(1);

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

    /// True when `a` and `b` are states of one lease (a member joining `a`'s lease with `b`);
    /// false when `b` is a new lease of the same key, which ends `a`'s.
    fn same_lease(a: &Self::State, b: &Self::State) -> bool;

    /// The lease's state once a member granted with `joined` has joined `held` (the same
    /// lease): by default `joined`, the newer.
    fn merge(held: &Self::State, joined: Self::State) -> Self::State {
        let _ = held;
        joined
    }
}

/// Leases to renew: key, state, generation.
type Batch<S> = Vec<(String, S, u64)>;

/// One lease held by this process.
struct Held<S> {
    state: S,
    /// Changed by every change of `state` not made by the renewer, from a counter of the whole
    /// session (never reused, also for a lease of the same key held again), so that the outcome
    /// of a renewal that raced with such a change is not applied over it.
    generation: u64,
    /// When the last confirmed renewal (or the granting write) was sent, on the boot clock.
    confirmed: Boot,
    members: BTreeMap<u64, LostNotifier>,
}

impl<S> Held<S> {
    /// Tells every member the lease's deadline, and the grace after it before others may take
    /// the lease over.
    fn publish(&self, timing: Timing) {
        if clock::planted(clock::Bug::IgnoreDeadline) {
            return;
        }
        let deadline = self.confirmed + timing.renew_deadline;
        let grace = timing.ttl.saturating_sub(timing.renew_deadline);
        for n in self.members.values() {
            n.set_deadline(deadline, grace);
        }
    }
}

/// Why a grant was not joined.
#[derive(Debug)]
pub(crate) enum JoinError {
    /// The granting write was sent so long ago that the lease may have expired for others
    /// already (its answer came late, or was found after a lost one): it must not be used.
    TooLate,
    /// The task that renews leases cannot run: the runtime the locker was made on has shut
    /// down.
    NoRuntime,
}

impl JoinError {
    /// As the user's error, for the lock `name`.
    pub fn into_error(self, name: &str) -> Error {
        match self {
            JoinError::TooLate => Error::LeaseLost {
                name: name.to_owned(),
                reason: LostReason::RenewalFailed,
            },
            JoinError::NoRuntime => Error::Unsupported(
                "the Tokio runtime this locker was made on has shut down: nothing would renew its leases; make the locker on a runtime that outlives it",
            ),
        }
    }
}

/// The leases of one locker and the task that renews them.
pub(crate) struct Session<R: Renewer> {
    renewer: R,
    timing: Mutex<Timing>,
    bridge: Bridge,
    held: Mutex<BTreeMap<String, Held<R::State>>>,
    wakeup: Arc<Notify>,
    started: AtomicBool,
    /// Whether the renewal task is alive: cleared when its future is dropped (the runtime shut
    /// down, or refused to run it).
    renewing: Arc<AtomicBool>,
    ids: AtomicU64,
    generations: AtomicU64,
}

/// What a member that leaves a lease must do next.
pub(crate) struct Leaving<S> {
    /// The lease's state, for the releasing write.
    pub state: S,
    /// How many members of this process still hold it.
    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    pub remaining: usize,
    /// When the last confirmed renewal was sent (boot clock): the lease may expire for others
    /// a TTL after it, at the earliest.
    pub confirmed: Boot,
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
            renewing: Arc::new(AtomicBool::new(false)),
            ids: AtomicU64::new(1),
            generations: AtomicU64::new(1),
        })
    }

    pub fn renewer(&self) -> &R {
        &self.renewer
    }

    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    pub fn timing(&self) -> Timing {
        *self.timing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the renewal timing, for a backend that learns the lease TTL from its store (the
    /// HTTP locker, from the server's answers). Takes effect at the next renewal round.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub fn set_timing(&self, timing: Timing) {
        *self.timing.lock().unwrap_or_else(PoisonError::into_inner) = timing;
        let mut held = self.held();
        for h in held.values_mut() {
            h.publish(timing);
        }
        drop(held);
        self.wakeup.notify_one();
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Held<R::State>>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a member to the lease `key`, granted by a write sent at `sent` (boot clock) that
    /// left `state` in the store. `fresh` says the grant started a new lease: members this
    /// process still had on the key's old lease lost it (so does a join whose state is not the
    /// held lease's). Returns the member's id.
    ///
    /// # Errors
    ///
    /// [`JoinError::TooLate`] when `sent + renew_deadline` has passed: the lease may be expired
    /// for others already, and nothing was joined (the caller gives the grant back).
    /// [`JoinError::NoRuntime`] when the renewal task cannot run.
    pub fn join(
        self: &Arc<Self>,
        key: &str,
        state: R::State,
        sent: Boot,
        fresh: bool,
        notifier: LostNotifier,
    ) -> Result<u64, JoinError> {
        let timing = self.timing();
        let renew_deadline = timing.renew_deadline;
        if (sent + renew_deadline).passed() && !clock::planted(clock::Bug::IgnoreDeadline) {
            return Err(JoinError::TooLate);
        }
        self.ensure_renewer()?;
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation();
        let mut lost = Vec::new();
        {
            let mut held = self.held();
            let fresh = fresh
                || held
                    .get(key)
                    .is_some_and(|h| !R::same_lease(&h.state, &state));
            match held.get_mut(key) {
                Some(h) if !fresh => {
                    h.state = R::merge(&h.state, state);
                    h.generation = generation;
                    h.confirmed = h.confirmed.min(sent);
                    h.members.insert(id, notifier);
                    h.publish(timing);
                }
                _ => {
                    if let Some(old) = held.remove(key) {
                        lost.extend(old.members.into_values());
                    }
                    let h = Held {
                        state,
                        generation,
                        confirmed: sent,
                        members: [(id, notifier)].into(),
                    };
                    h.publish(timing);
                    held.insert(key.to_owned(), h);
                }
            }
        }
        tell(lost, LostReason::Taken);
        self.wakeup.notify_one();
        Ok(id)
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
        let generation = self.generation();
        if let Some(h) = self.held().get_mut(key) {
            if R::same_lease(&h.state, &state) {
                h.state = state;
                h.generation = generation;
            }
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

    /// Declares `key` lost if its lease is still the one of `generation`.
    fn lose_if(&self, key: &str, generation: u64, reason: LostReason) {
        let mut held = self.held();
        if held.get(key).is_some_and(|h| h.generation == generation) {
            let h = held.remove(key).expect("present");
            drop(held);
            tracing::warn!(key, %reason, "lease lost");
            tell(h.members.into_values(), reason);
        }
    }

    /// Starts the renewal task on the locker's runtime, once; fails when it cannot run.
    fn ensure_renewer(self: &Arc<Self>) -> Result<(), JoinError> {
        if !self.started.swap(true, Ordering::AcqRel) {
            self.renewing.store(true, Ordering::Release);
            let alive = Alive(Arc::clone(&self.renewing));
            self.bridge.handle.spawn(renew_loop(
                Arc::downgrade(self),
                Arc::clone(&self.wakeup),
                alive,
            ));
        }
        if self.renewing.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(JoinError::NoRuntime)
        }
    }

    /// Declares leases lost whose deadline passed; returns when the next one falls due.
    fn expire_overdue(&self) -> Option<Boot> {
        if clock::planted(clock::Bug::IgnoreDeadline) {
            return None;
        }
        let renew_deadline = self.timing().renew_deadline;
        let overdue: Vec<String> = self
            .held()
            .iter()
            .filter(|(_, h)| (h.confirmed + renew_deadline).passed())
            .map(|(k, _)| k.clone())
            .collect();
        for key in overdue {
            self.lose(&key, LostReason::RenewalFailed);
        }
        self.held()
            .values()
            .map(|h| h.confirmed + renew_deadline)
            .min()
    }

    /// Declares leases lost whose deadline passed; returns the leases to renew now (all of them
    /// when any is due) and when to look again otherwise.
    fn due(&self) -> Result<Batch<R::State>, Option<Boot>> {
        self.expire_overdue();
        let renew_period = self.timing().renew_period;
        let held = self.held();
        let next = held.values().map(|h| h.confirmed + renew_period).min();
        match next {
            None => Err(None),
            Some(at) if !at.passed() => Err(Some(at)),
            Some(_) => Ok(held
                .iter()
                .map(|(k, h)| (k.clone(), h.state.clone(), h.generation))
                .collect()),
        }
    }

    /// One renewal round. Returns when to run again (`None`: when woken).
    ///
    /// While the renewal is in flight, the lost-lease rule is enforced for every held lease,
    /// also those that joined meanwhile: nothing the store does (or does not do) delays a
    /// verdict.
    async fn round(&self) -> Option<Boot> {
        let batch = match self.due() {
            Ok(batch) => batch,
            Err(next) => return next,
        };
        let sent = clock::boot();
        let leases = batch
            .iter()
            .map(|(k, s, _)| (k.clone(), s.clone()))
            .collect();
        let renew = self.renewer.renew(leases);
        tokio::pin!(renew);
        let outcomes = loop {
            let next = self.expire_overdue();
            let still_held = {
                let held = self.held();
                batch
                    .iter()
                    .any(|(k, _, g)| held.get(k).is_some_and(|h| h.generation == *g))
            };
            if !still_held && next.is_none() {
                // Nothing left that this round could renew.
                return Some(clock::boot());
            }
            let nap = next.map_or(LONGEST_NAP, |d| d.left().min(LONGEST_NAP));
            tokio::select! {
                biased;
                outcomes = &mut renew => break outcomes,
                _ = tokio::time::sleep(nap) => {}
                _ = self.wakeup.notified() => {}
            }
        };
        // A verdict due before the answer came stands: a renewal confirmed after the deadline
        // does not bring a lease back.
        self.expire_overdue();
        let mut retry = false;
        for ((key, _, generation), outcome) in batch.into_iter().zip(outcomes) {
            match outcome {
                Renewal::Renewed(state) => {
                    let timing = self.timing();
                    let mut held = self.held();
                    if let Some(h) = held.get_mut(&key) {
                        if h.generation == generation {
                            h.state = state;
                            h.confirmed = h.confirmed.max(sent);
                            h.publish(timing);
                        } else {
                            // Changed meanwhile (a release, a join): renew the new state.
                            retry = true;
                        }
                    }
                }
                Renewal::Lost(reason) => self.lose_if(&key, generation, reason),
                Renewal::Unknown => retry = true,
            }
        }
        Some(if retry {
            clock::boot() + Duration::from_millis(200)
        } else {
            clock::boot()
        })
    }
}

/// Clears the session's `renewing` flag when the renewal task's future is dropped.
struct Alive(Arc<AtomicBool>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Tells `notifiers` that their lease is lost.
fn tell(notifiers: impl IntoIterator<Item = LostNotifier>, reason: LostReason) {
    for n in notifiers {
        n.notify(reason.clone());
    }
}

async fn renew_loop<R: Renewer>(session: Weak<Session<R>>, wakeup: Arc<Notify>, alive: Alive) {
    let _alive = alive;
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
                Some(at) => {
                    // Short naps: the boot clock may jump (a suspended host woke up).
                    while !at.passed() {
                        tokio::time::sleep(at.left().min(LONGEST_NAP)).await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = wakeup.notified() => {}
            _ = sleep => {}
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
