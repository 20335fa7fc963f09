//! Acquisition: deciding from a lock's record what to write, writing it, and waiting on the
//! watch until the decision changes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::decide::Step;
use super::queue;
use super::record::{annotation_key, Record};
use super::release::{Held, KubeLease};
use super::store::{transient, Change, Snapshot, WriteError};
use super::watch::Feed;
use super::{KubeSession, Object};
use crate::acquire::Attempt;
use crate::backend::{Lease, LostNotifier};
use crate::clock::{self, Boot, Instant};
use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::AcquireOptions;
use crate::session::JoinError;

/// A grant written, with what a lease needs to know of it.
#[derive(Clone)]
pub(crate) struct Granted {
    pub(super) record: Record,
    /// The record's value in the store, as written.
    pub(super) value: String,
    /// Our entry in the record's `Holders`.
    pub(super) holder: String,
    /// When the granting write was sent (boot clock).
    pub(super) sent: Boot,
    pub(super) token: Option<u64>,
    pub(super) fresh: bool,
    /// The record it wrote over named its holder already (see `Step::Grant`).
    pub(super) known: bool,
}

impl Granted {
    /// True when `rec` shows this grant (or join) landed and still standing: the very record it
    /// wrote, or — renewed or joined by others since — a record of its lease that names its
    /// holder. When the holder was named before the write, only the very record counts: the
    /// name proves nothing of this write, and a lease counted from its send time would outlive
    /// the one that put the name there.
    pub(super) fn landed_in(&self, rec: &Record) -> bool {
        self.record.same_write(rec)
            || (!self.known
                && rec.uuid == self.record.uuid
                && rec.shared_holders > 0
                && rec.holders.contains_key(&self.holder))
    }
}

/// One acquisition in progress.
pub(super) struct Acquisition<'a> {
    pub(super) object: &'a Arc<Object>,
    pub(super) attempt: Attempt<'a>,
    pub(super) key: String,
    /// Our acquirer id in the queue, and when our entry was last written.
    pub(super) id: String,
    /// The HTTP server's acquisitions for an acquirer that asks again (a poller, a long poll
    /// that timed out): its queue entry stays when the acquisition ends without the lock (it dies
    /// if the acquirer stops asking, as any member does), and it queues even when not waiting.
    pub(super) keep_place: bool,
    pub(super) refreshed: Option<Instant>,
    pub(super) current: Snapshot,
    pub(super) feed: Option<Feed>,
    /// Grants whose answer was lost: any of them may have been applied.
    pub(super) maybe: Vec<Granted>,
    /// Whether we may have an entry in the queue or a grant in the store to take back if we
    /// leave without the lock.
    pub(super) armed: bool,
    pub(super) conflicts: u32,
    /// The resourceVersion right after the release whose record is our first guess: if the
    /// guess fails its `test`, the locker's watch brings what changed since.
    pub(super) guessed: Option<u64>,
    /// Whether idle free records were removed once already to make room.
    pub(super) made_room: bool,
    /// The object's annotations are full: grant in the smallest form (no holder details, a
    /// new uuid instead of a reserved record's holder mark).
    pub(super) compact: bool,
    pub(super) outages: u32,
    /// When the current outage of the API server began (its first failed request).
    pub(super) outage_began: Option<Instant>,
}

pub(crate) async fn acquire(
    session: &Arc<KubeSession>,
    name: &LockName,
    opts: &AcquireOptions,
) -> Result<Box<dyn Lease>, AcquireError> {
    let object = session.renewer();
    // Start optimistic: assume the record is as our last release left it (else never
    // written), which makes an uncontended acquisition, and a contender's return to the queue,
    // one request; a wrong guess costs a failed `test` and a read (from our watch if we have one).
    let key = annotation_key(name.as_str());
    let mut a = Acquisition::new(object, name, opts, None, object.store.assumed());
    (a.current, a.guessed) = object.guess(&key, a.attempt.may_wait());
    // A locker that has not heard from the API server yet does not know its clock, which the
    // record's expiry must be written in (Go peers and fresh processes read it): read first
    // instead of writing blind. Once per locker.
    if !object.store.knows_server_time() {
        a.reread().await?;
    }
    loop {
        match a.run().await {
            Ok(g) => match a.lease(session, g.clone()) {
                Ok(lease) => {
                    a.armed = false;
                    return Ok(lease);
                }
                Err(JoinError::TooLate) => {
                    // Its verdict came too late to trust: give it back, and go on if we may.
                    tracing::debug!(
                        lock = name.as_str(),
                        "a grant was confirmed too late to be used; giving it back"
                    );
                    a.maybe.clear();
                    a.give_back(g).await;
                    if a.attempt.expired() {
                        a.clean_up().await;
                        return Err(a.attempt.busy());
                    }
                    a.reread().await?;
                }
                Err(e @ JoinError::NoRuntime) => {
                    a.give_back(g).await;
                    a.clean_up().await;
                    return Err(e.into_error(name.as_str()).into());
                }
            },
            Err(e) => {
                // Take our place (and any grant that may have landed) back before returning,
                // so that a caller that ends its runtime right after leaves nothing behind.
                a.clean_up().await;
                return Err(e);
            }
        }
    }
}

impl<'a> Acquisition<'a> {
    pub(super) fn new(
        object: &'a Arc<Object>,
        name: &'a LockName,
        opts: &'a AcquireOptions,
        acquirer: Option<String>,
        current: Snapshot,
    ) -> Self {
        Self {
            object,
            attempt: Attempt::new(name, opts),
            key: annotation_key(name.as_str()),
            keep_place: acquirer.is_some(),
            id: acquirer.unwrap_or_else(queue::new_id),
            refreshed: None,
            current,
            feed: None,
            maybe: Vec::new(),
            armed: false,
            conflicts: 0,
            guessed: None,
            outages: 0,
            outage_began: None,
            made_room: false,
            compact: false,
        }
    }
}

impl Acquisition<'_> {
    /// The HTTP server's acquisitions take up an acquirer's earlier queue entry (see `serve`).
    #[cfg(not(feature = "server"))]
    fn adopt_place(&mut self) {}

    pub(super) async fn run(&mut self) -> Result<Granted, AcquireError> {
        loop {
            self.adopt_place();
            let change = match self.step()? {
                // A grant whose answer was lost: the object as read, which holds it, stands in
                // for the write's resourceVersion as the fencing token.
                Step::Landed(g) => {
                    return Ok(Granted {
                        token: g.token.or(self.current.rv),
                        ..g
                    })
                }
                Step::Handed { granted, usable } => {
                    if usable {
                        return Ok(granted);
                    }
                    // Handed on an entry whose send time we no longer know: its lease cannot
                    // be bounded. Give it back and queue again.
                    tracing::debug!(
                        lock = self.attempt.name.as_str(),
                        "handed the lock on a queue entry too old to count from; giving it back"
                    );
                    self.give_back(granted).await;
                    self.reread().await?;
                    continue;
                }
                Step::Wait(rec, wake) => {
                    self.wait(&rec, wake).await?;
                    continue;
                }
                Step::Grant {
                    change,
                    record,
                    fresh,
                    known,
                } => {
                    let sent = clock::boot();
                    let granted = Granted {
                        holder: self.id.clone(),
                        value: change.new.clone().unwrap_or_default(),
                        record,
                        sent,
                        token: None,
                        fresh,
                        known,
                    };
                    match self.write(change, Some(granted.clone())).await {
                        Ok(after) => {
                            return Ok(Granted {
                                token: after.rv,
                                ..granted
                            })
                        }
                        Err(WriteError::Unknown(e)) => {
                            tracing::debug!(lock = self.attempt.name.as_str(), error = %crate::error::chain(&e), "the answer to a grant was lost; reading the record");
                            self.maybe.push(granted);
                            self.armed = true;
                            self.reread().await?;
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                Step::Enqueue(change, tag) => {
                    // Armed before writing: a cancellation while the write is in flight must
                    // still take our place back.
                    self.armed = true;
                    let sent = clock::now();
                    if tag != 0 {
                        self.object.note_queued(&self.id, tag);
                    }
                    match self.write(change, None).await {
                        Ok(after) => {
                            self.refreshed = Some(sent);
                            self.current = after;
                            self.outages = 0;
                            self.conflicts = 0;
                            continue;
                        }
                        Err(WriteError::Unknown(e)) => {
                            tracing::debug!(lock = self.attempt.name.as_str(), error = %crate::error::chain(&e), "the answer to a queue write was lost; reading the record");
                            self.reread().await?;
                            continue;
                        }
                        Err(e) => e,
                    }
                }
            };
            match change {
                WriteError::Conflict => self.conflicted().await?,
                WriteError::Failed(Error::AnnotationsFull { .. }) if !self.compact => {
                    // Holder details are for people: without them the record may still fit.
                    self.compact = true;
                    self.reread().await?;
                }
                WriteError::Failed(e @ Error::AnnotationsFull { .. }) => {
                    if self.made_room || self.object.make_room().await? == 0 {
                        return Err(e.into());
                    }
                    self.made_room = true;
                    self.reread().await?;
                }
                WriteError::Failed(e) if transient(&e) && self.attempt.may_wait() => {
                    self.outage(e).await?
                }
                WriteError::Failed(e) | WriteError::Unknown(e) => return Err(e.into()),
            }
        }
    }

    /// Waits until the record changes, something seen may have gone stale, or the deadline.
    async fn wait(&mut self, rec: &Record, wake: Option<Instant>) -> Result<(), AcquireError> {
        if !self.attempt.may_wait() {
            return Err(self.attempt.busy());
        }
        self.attempt.waiting(|| rec.holders());
        let object = self.object;
        let feed = self.feed.get_or_insert_with(|| object.watch());
        let wake = match (wake, self.attempt.deadline_at()) {
            (Some(w), Some(d)) => Some(w.min(d)),
            (w, d) => w.or(d),
        };
        let sleep = async {
            match wake {
                Some(w) => tokio::time::sleep_until(w).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            changed = feed.changed() => {
                if changed.is_err() {
                    return Err(Error::Unreachable {
                        resource: object.store.describe.clone(),
                        source: "the watch of the object ended".into(),
                    }.into());
                }
                let snap = feed.borrow_and_update();
                match snap {
                    None => return Err(Error::ResourceMissing { resource: object.store.describe.clone() }.into()),
                    // Ignore a watch event older than what we read ourselves.
                    Some(s) if s.rv.is_some() && self.current.rv.is_some() && s.rv < self.current.rv => {}
                    Some(s) => self.current = s,
                }
            }
            _ = sleep => {
                if self.attempt.expired() {
                    return Err(self.attempt.busy());
                }
            }
        }
        Ok(())
    }

    /// Writes `change` in a task of its own: if this acquisition is dropped while the write is
    /// in flight, the task still learns the outcome and takes back what it wrote (the grant, or
    /// our place in the queue).
    async fn write(
        &mut self,
        change: Change,
        grant: Option<Granted>,
    ) -> Result<Snapshot, WriteError> {
        let (tx, rx) = oneshot::channel();
        let object = Arc::clone(self.object);
        let has_annotations = self.current.annotations.is_some();
        let key = self.key.clone();
        let name = self.attempt.name.as_str().to_owned();
        tokio::spawn(async move {
            let outcome = object
                .store
                .write(std::slice::from_ref(&change), has_annotations)
                .await;
            if let Err(outcome) = tx.send(outcome) {
                // Abandoned while in flight: nobody will hold what it may have granted. (Our
                // place in the queue is taken back by the acquisition's own drop.)
                if let (Ok(_) | Err(WriteError::Unknown(_)), Some(g)) = (&outcome, grant) {
                    object.take_back(&name, &key, None, &[g]).await;
                }
            }
        });
        rx.await.unwrap_or_else(|_| {
            Err(WriteError::Unknown(Error::Unsupported(
                "the runtime shut down during a write",
            )))
        })
    }

    /// After a write whose answer was lost: read the object again (even a non-blocking caller
    /// must learn whether it holds the lock), riding out an outage until the deadline.
    async fn reread(&mut self) -> Result<(), AcquireError> {
        loop {
            match self.object.store.get().await {
                Ok(fresh) => {
                    self.current = fresh;
                    return Ok(());
                }
                Err(e) if transient(&e) => self.outage(e).await?,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// After a conflict: get the newer state, backing off after repeated conflicts.
    async fn conflicted(&mut self) -> Result<(), AcquireError> {
        self.conflicts += 1;
        if self.conflicts > 2 {
            // Repeated conflicts: back off a little, with jitter.
            let jitter = u64::from(clock::random() as u16 % 50);
            let pause = Duration::from_millis((5 << self.conflicts.min(6)) + jitter);
            if !self.attempt.fits(pause) {
                return Err(self.attempt.busy());
            }
            tokio::time::sleep(pause).await;
        }
        let fresh = match self.feed.as_mut() {
            // Waiting already: the watch brings the change that beat us, without a GET from
            // every waiter.
            Some(feed) => newer_than(self.object, feed, &self.current).await,
            // Our first guess (what our last release wrote) failed: the locker's watch, kept
            // since it held the lock, brings the write that beat us, else read.
            None => match self.object.newer_watched(self.guessed.take()).await {
                Some(snap) => Ok(snap),
                None => self.object.store.get().await,
            },
        };
        match fresh {
            Ok(fresh) => self.current = fresh,
            Err(e) if transient(&e) && self.attempt.may_wait() => self.outage(e).await?,
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// The API server is unreachable, overloaded or failing: a waiting acquisition keeps trying
    /// until its deadline, backing off up to 1.6 s.
    ///
    /// With a patience (`KubernetesLocker::patience`), it gives up when the outage has lasted
    /// that long; the on-unreachable hook hears of each outage once, at its start.
    async fn outage(&mut self, e: Error) -> Result<(), AcquireError> {
        let mut pause = Duration::from_millis(100 << self.outages.min(4));
        if !self.attempt.fits(pause) {
            return Err(e.into());
        }
        let policy = self
            .object
            .outages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let began = *self.outage_began.get_or_insert_with(|| {
            if let Some(hook) = &policy.on_unreachable {
                hook(&e);
            }
            clock::now()
        });
        if let Some(patience) = policy.patience {
            // The last try comes when the patience ends.
            match patience.checked_sub(began.elapsed()) {
                Some(left) if !left.is_zero() => pause = pause.min(left),
                _ => {
                    // The last failure's own cause: the resource is said once.
                    let last = match &e {
                        Error::Unreachable { source, .. } => crate::error::chain(source.as_ref()),
                        other => crate::error::chain(other),
                    };
                    return Err(Error::Unreachable {
                        resource: self.object.store.describe.clone(),
                        source: format!("gave up after {patience:?} of failures, the last: {last}")
                            .into(),
                    }
                    .into());
                }
            }
        }
        self.outages += 1;
        tracing::warn!(lock = self.attempt.name.as_str(), error = %crate::error::chain(&e), ?pause, "Kubernetes API server unavailable; retrying");
        tokio::time::sleep(pause).await;
        if let Ok(fresh) = self.object.store.get().await {
            self.current = fresh;
            // An answer: the outage is over.
            self.outage_began = None;
        }
        Ok(())
    }

    /// Takes back our queue entry (unless it is kept) and any grant that may have landed.
    ///
    /// The work runs in a task of its own, awaited here: if this future is dropped meanwhile
    /// (the caller gave up on a cancellation in progress), the task still finishes it.
    pub(super) async fn clean_up(&mut self) {
        if std::mem::take(&mut self.armed) {
            let maybe = std::mem::take(&mut self.maybe);
            let id = (!self.keep_place).then(|| self.id.clone());
            if id.is_none() && maybe.is_empty() {
                return;
            }
            let object = Arc::clone(self.object);
            let (name, key) = (self.attempt.name.as_str().to_owned(), self.key.clone());
            let task = tokio::spawn(async move {
                object.take_back(&name, &key, id.as_deref(), &maybe).await;
            });
            let _ = task.await;
        }
    }

    /// Releases a grant this acquisition will not use, in a task of its own (awaited; it
    /// finishes even if this future is dropped).
    ///
    /// That task is the only one to give the grant back: it disarms this acquisition, so that
    /// a drop while it runs does not start a second give-back beside it (two releases of one
    /// grant: the second, rebuilt on a record Go rewrote without `Holders`, could release the
    /// next holder's lease). It takes any other grant in doubt back too. We have no queue place
    /// to take back: the grant being given back removed our entry (a refresh of it tested the
    /// record before the grant, so it cannot land after). Queueing again re-arms.
    async fn give_back(&mut self, g: Granted) {
        self.armed = false;
        let object = Arc::clone(self.object);
        let (name, key) = (self.attempt.name.as_str().to_owned(), self.key.clone());
        let mut grants = std::mem::take(&mut self.maybe);
        grants.push(g);
        let task = tokio::spawn(async move {
            object.take_back(&name, &key, None, &grants).await;
        });
        let _ = task.await;
    }

    /// The lease of grant `g`, joined to the session.
    fn lease(&self, session: &Arc<KubeSession>, g: Granted) -> Result<Box<dyn Lease>, JoinError> {
        let name = self.attempt.name.as_str();
        let (notifier, signal) = LostNotifier::with_hook(name, self.attempt.opts);
        let held = Held {
            uuid: g.record.uuid.clone(),
            value: g.value,
            ids: [g.holder.clone()].into(),
        };
        let member = session.join(&self.key, held, g.sent, g.fresh, notifier)?;
        // Watch the object while holding (one watch per locker, kept): the release then starts
        // from the record with the waiters that queued meanwhile, and hands the lock on in one
        // write.
        self.object.watch();
        tracing::debug!(lock = name, object = %self.object.store.describe, token = ?g.token, "kubernetes lock acquired");
        Ok(Box::new(KubeLease::new(
            Arc::clone(session),
            name,
            &self.key,
            (member, self.id.clone()),
            signal,
            g.token,
        )))
    }
}

impl Drop for Acquisition<'_> {
    fn drop(&mut self) {
        if !self.keep_place {
            self.object.forget_queued(&self.id);
        }
        // Cancelled (the future was dropped) with a place in the queue or a grant in doubt.
        if self.armed && !(self.keep_place && self.maybe.is_empty()) {
            let object = Arc::clone(self.object);
            let (name, key) = (self.attempt.name.as_str().to_owned(), self.key.clone());
            let id = (!self.keep_place).then(|| self.id.clone());
            let maybe = std::mem::take(&mut self.maybe);
            tokio::spawn(async move { object.take_back(&name, &key, id.as_deref(), &maybe).await });
        }
    }
}

/// A state of the object newer than `seen`, from the watch (a GET if it brings none within a
/// second; without a version seen, nothing counts as newer and the wait runs out).
async fn newer_than(object: &Object, feed: &mut Feed, seen: &Snapshot) -> Result<Snapshot, Error> {
    let rv = seen.rv.unwrap_or(u64::MAX);
    match feed.newer_than(rv, Duration::from_secs(1)).await {
        Some(s) => Ok(s),
        None => object.store.get().await,
    }
}
