//! A held Kubernetes lease, and its release.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::acquire::Granted;
use super::decide::handed_to;
use super::queue::{first_for_go, older_than_go_members, Member, HOLDER_MARK};
use super::record::Record;
use super::store::{transient, Change, WriteError};
use super::{KubeSession, Object};
use crate::backend::{BoxFuture, Lease, LostReason, LostSignal};
use crate::clock::{self, Boot};
use crate::error::Error;

/// How far ahead of the API server's clock (as we estimate it from `Date` headers, to the
/// second) a holder mark must expire for a Rust grant to keep a free record's uuid: Go v0.2
/// compares with its own clock, and must not see the mark expired meanwhile.
pub(super) const MARK_MARGIN_SECS: i64 = 2;

/// What the session keeps of a Kubernetes lease: its uuid, the record's value as this
/// process last wrote or read it (the `test` value of the next write), and the holder ids of
/// this process's members.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub uuid: String,
    pub value: String,
    /// Our entries in the record's `Holders` (empty: not known, as for the HTTP server's
    /// store, whose handles name no holder).
    pub ids: BTreeSet<String>,
}

impl Held {
    /// True when `rec` is still this lease: it carries the lease's uuid with holders, and it
    /// does not name only other holders. A release of somebody's share can leave a record free
    /// and the next grant may keep its uuid (a reserved record): a record whose `Holders` are
    /// complete (as many as its count, or more) and do not include ours is another holder's
    /// lease under the same uuid, never ours. Go drops `Holders` when it rewrites a record, and
    /// a compact record has none: then the uuid and the count decide.
    pub fn is_ours(&self, rec: &Record) -> bool {
        use crate::clock::{planted, Bug};
        let uuid_only = planted(Bug::DoubleDecrement) || planted(Bug::ReleaseRebuilt);
        rec.uuid == self.uuid
            && rec.shared_holders > 0
            && (uuid_only
                || self.ids.is_empty()
                || i64::try_from(rec.holders.len()).unwrap_or(i64::MAX) < rec.shared_holders
                || rec.holders.keys().any(|k| self.ids.contains(k)))
    }
}

/// One member's hold of a Kubernetes lock.
pub(crate) struct KubeLease {
    /// Keeps the locker alive until the lease is released.
    session: Arc<KubeSession>,
    name: String,
    key: String,
    member: u64,
    /// Our entry in the record's `Holders`.
    holder: String,
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
    pub fn new(
        session: Arc<KubeSession>,
        name: &str,
        key: &str,
        (member, holder): (u64, String),
        signal: LostSignal,
        token: Option<u64>,
    ) -> Self {
        Self {
            session,
            name: name.to_owned(),
            key: key.to_owned(),
            member,
            holder,
            signal,
            token,
            released: false,
        }
    }

    fn take(&mut self) -> impl std::future::Future<Output = Result<(), Error>> + Send + 'static {
        self.released = true;
        let (session, name, key, member, holder, signal) = (
            Arc::clone(&self.session),
            self.name.clone(),
            self.key.clone(),
            self.member,
            self.holder.clone(),
            self.signal.clone(),
        );
        async move {
            // Lost already (told so, or past its deadline): a release changes nothing. (Asked
            // before leaving, which ends the signal's deadline.)
            let lost = signal.reason();
            let leaving = session.leave(&key, member);
            let Some(leaving) = leaving.filter(|_| lost.is_none()) else {
                return Err(Error::LeaseLost {
                    name,
                    reason: signal.reason().unwrap_or(LostReason::Taken),
                });
            };
            let object = session.renewer();
            let until = leaving.confirmed + object.config.ttl;
            let left = object
                .release_record(&name, &key, &holder, leaving.state, until)
                .await?;
            if let (Some(left), true) = (left, leaving.remaining > 0) {
                // Other members of this process still hold it: renew what is there now.
                session.update(&key, left);
            }
            tracing::debug!(lock = name, object = %object.store.describe, "kubernetes lock released");
            Ok(())
        }
    }
}

impl Lease for KubeLease {
    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(self.take())
    }

    fn release_blocking(mut self: Box<Self>) -> Result<(), Error> {
        let session = std::sync::Arc::clone(&self.session);
        session.bridge().release_blocking(|| self.take())
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
            let release = self.take();
            self.session
                .bridge()
                .release_on_drop(self.name.clone(), release);
        }
    }
}

impl Object {
    /// Gives up one holder's share of the lease `held` of `key`: count − 1; or, for the last
    /// holder, the record removed (or kept free for queued waiters). Passing errors are retried
    /// until `until`, when the lease would have expired anyway. Returns the lease as left for
    /// other holders, if it still has holders.
    ///
    /// A write whose answer is lost is never repeated on a newer value: if the record changed
    /// meanwhile, the write is assumed to have landed. A count left one too high is safe (the
    /// record outlives its holders by a TTL); one too low would free a lock somebody holds.
    pub(crate) async fn release_record(
        &self,
        name: &str,
        key: &str,
        holder: &str,
        held: Held,
        until: Boot,
    ) -> Result<Option<Held>, Error> {
        Ok(self
            .release_written(name, key, holder, held, until)
            .await?
            .0)
    }

    /// [`release_record`](Self::release_record), also returning the record's value as the
    /// release left it, when known (`None` after a write whose answer was lost).
    ///
    /// **The doubt rule.** Once a write of the release may have landed without our being told
    /// (a timeout, a broken connection, a 5xx), the doubt lasts for the whole release: only that
    /// same write (byte for byte, testing the same value) is ever sent again, and only while
    /// the record still holds the value it tests. If the record holds what it wrote, it landed;
    /// if anything else changed the record, it is assumed to have landed. A release is never
    /// rebuilt on a newer value after a write in doubt: the first write might land after the
    /// newer value was read, and the rebuilt one would then give up a second share (a shared
    /// holder's, or, on a record granted again under the same uuid, the next holder's lease).
    pub(super) async fn release_written(
        &self,
        name: &str,
        key: &str,
        holder: &str,
        held: Held,
        until: Boot,
    ) -> Result<(Option<Held>, Option<String>), Error> {
        let lost = || Error::LeaseLost {
            name: name.to_owned(),
            reason: LostReason::Taken,
        };
        // What stays of the lease in this process after our share left `tested` and `written`
        // is there: the lease, if others held it with us (the last holder's release leaves the
        // record free or hands it to somebody else).
        let left = |tested: &str, written: &str| {
            Record::parse(tested)
                .ok()
                .filter(|r| r.shared_holders > 1)
                .map(|_| {
                    let mut ids = held.ids.clone();
                    ids.remove(holder);
                    Held {
                        uuid: held.uuid.clone(),
                        value: written.to_owned(),
                        ids,
                    }
                })
        };
        // Start from the record as the watch last saw it when that is still our lease: waiters
        // queue while we hold, and a release built on our own last write would fail its `test`
        // and cost a read and a second write. (A watch that lags costs just that, as before.)
        let watched = self.watched();
        let from_watch = watched
            .as_ref()
            .and_then(|s| s.get(key).map(str::to_owned))
            .filter(|v| Record::parse(v).is_ok_and(|r| held.is_ours(&r)));
        // The resourceVersion of the state `value` was read from, when known: after a
        // conflict, a newer state from the watch stands in for a GET.
        let mut base = from_watch.as_ref().and(watched.and_then(|s| s.rv));
        let mut value = from_watch.unwrap_or_else(|| held.value.clone());
        let mut pause = Duration::from_millis(100);
        // How long a write may take to answer: the request timeout, so that a lost answer is
        // soon noticed; but once a read has shown the server answering and the record still
        // holding what the write tests (it has not landed), the rest of the time before
        // `until`. A server slowed by many writers on one object (each PATCH of the object
        // retried inside the server until it fits in between the others) answers late rather
        // than not at all, and a write cut off at the request timeout and sent again would
        // start its wait anew, adding to the load that slowed it.
        let mut patient = false;
        // The object's annotations are full: leave the record free in its smallest form.
        let mut compact = false;
        // The write in doubt: (the value it tests, the value it writes).
        let mut doubt: Option<(String, String)> = None;
        loop {
            let (expected, new) = match &doubt {
                Some(d) => d.clone(),
                None => {
                    let rec = Record::parse(&value).map_err(|e| self.corrupt(key, e))?;
                    if !held.is_ours(&rec) {
                        return Err(lost());
                    }
                    let mut freed = self.released(&rec, holder, !compact);
                    if compact && freed.shared_holders <= 0 {
                        // Without the holder mark a free record is no larger than the held one
                        // was: expired, as when a Go waiter is first in line.
                        freed.queue.remove(HOLDER_MARK);
                        freed.expire_at = self.store.server_now().saturating_sub(1);
                    }
                    (value.clone(), freed.to_value())
                }
            };
            let change = Change {
                key: key.to_owned(),
                expected: Some(expected.clone()),
                new: Some(new.clone()),
            };
            let within = if patient {
                until.left().max(self.store.timeout)
            } else {
                self.store.timeout
            };
            let written = self
                .store
                .write_within(std::slice::from_ref(&change), true, within)
                .await;
            let failure = match written {
                Ok(after) => {
                    self.note_released(key, &new, after.rv);
                    return Ok((left(&expected, &new), Some(new)));
                }
                Err(WriteError::Conflict) => {
                    if clock::planted(clock::Bug::ReleaseRebuilt) {
                        doubt = None;
                    }
                    None
                }
                Err(WriteError::Unknown(e)) if clock::planted(clock::Bug::DoubleDecrement) => {
                    Some(e)
                }
                Err(WriteError::Unknown(e)) => {
                    doubt.get_or_insert((expected, new));
                    Some(e)
                }
                Err(WriteError::Failed(e)) if transient(&e) => Some(e),
                Err(WriteError::Failed(Error::AnnotationsFull { .. }))
                    if !compact && doubt.is_none() =>
                {
                    compact = true;
                    continue;
                }
                Err(WriteError::Failed(e)) => return Err(e),
            };
            if let Some(e) = failure {
                if clock::boot() + pause >= until {
                    return Err(e);
                }
                tracing::warn!(lock = name, error = %crate::error::chain(&e), "release failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(1600));
            }
            if doubt.is_none() {
                if let Some(snap) = self.newer_watched(base).await {
                    if let Some(v) = snap.get(key) {
                        base = snap.rv;
                        value = v.to_owned();
                        continue;
                    }
                }
            }
            let now = loop {
                match self.store.get().await {
                    Ok(snap) => {
                        base = snap.rv;
                        break snap.get(key).map(str::to_owned);
                    }
                    Err(e) if transient(&e) && clock::boot() + pause < until => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(1600));
                    }
                    Err(e) => return Err(e),
                }
            };
            match (&doubt, now) {
                // Our write landed.
                (Some((expected, new)), Some(v)) if v == *new => {
                    self.note_released(key, new, base);
                    return Ok((left(expected, new), Some(v)));
                }
                // Unchanged: it has not landed (yet); the same write is safe to repeat, since
                // it can apply at most once. The server answers: it may just be slow.
                (Some((expected, _)), Some(v)) if v == *expected => patient = true,
                // Changed by somebody after a write whose answer was lost: it may have landed.
                (Some(_), _) => {
                    tracing::debug!(
                        lock = name,
                        "record changed after a release whose answer was lost; assuming it landed"
                    );
                    return Ok((None, None));
                }
                (None, Some(v)) => value = v,
                (None, None) => return Err(lost()),
            }
        }
    }

    /// The record after one holder of `rec` leaves (its count less one).
    ///
    /// The last holder hands the lock on, or leaves the record free (count 0, not shared, the
    /// same uuid); it never removes it: Go v0.2 reads a record twice before it queues or takes
    /// over, and fails with "no existing lock lease found" if it vanished in between, or "lock
    /// already leased" if its uuid changed. What it writes depends on who is first in line:
    /// - a Rust waiter older than every Go member, whose entry is fresh and tagged (and
    ///   `handoff` allowed): **handed to it** in this one write — its grant (and that of the shared waiters
    ///   right behind a shared head), with their holder entries naming the tags of the queue
    ///   entries it saw, under the same uuid, with the holder mark ([`Object::handoff`]);
    /// - any other Rust waiter first by Go's order too: reserved for it — `ExpireAtTimestamp` a
    ///   TTL ahead and the holder mark, so that Go v0.2 waits and the Rust waiter takes it under
    ///   the same uuid;
    /// - anybody else (a Go waiter, or nobody in the queue): expired (`ExpireAtTimestamp` in
    ///   the past), as Go v0.2 releases: a Go waiter, queued or polling without an acquirer id,
    ///   takes it over at its next read. (It was once reserved for 2 s when nobody was queued,
    ///   so that a Rust acquirer coming next could keep the uuid; that cost every Go waiter
    ///   outside the queue 3 to 5 s per handoff. See PROTOCOL.md, "Go v0.2 peers".)
    pub(super) fn released(&self, rec: &Record, holder: &str, handoff: bool) -> Record {
        let now = self.store.server_now();
        let mut left = rec.clone();
        left.holders.remove(holder);
        if rec.shared_holders > 1 {
            left.shared_holders -= 1;
            return left;
        }
        left.queue.remove(HOLDER_MARK);
        left.shared_holders = 0;
        left.is_shared = false;
        left.holders.clear();
        let mut line: Vec<&Member> = left
            .queue
            .values()
            .filter(|m| m.alive_for_go(now))
            .collect();
        line.sort_by(|a, b| a.order().cmp(&b.order()));
        let group = match line.first() {
            Some(head) if handoff && older_than_go_members(head, &left.queue, now) => {
                self.handoff(&line, now)
            }
            _ => Vec::new(),
        };
        match line.first() {
            Some(head) if !group.is_empty() || first_for_go(head, &left.queue, now) => {
                let until = self.expire_at();
                if !group.is_empty() {
                    left.shared_holders = i64::try_from(group.len()).unwrap_or(i64::MAX);
                    left.is_shared = group[0].shared;
                    for m in &group {
                        left.queue.remove(&m.id);
                        let mut entry = m.holder.clone().unwrap_or_default();
                        entry.since = Some(now);
                        entry.handoff = Some(m.tag);
                        left.holders.insert(m.id.clone(), entry);
                    }
                    left = left.tagged();
                }
                left.expire_at = until;
                left.queue
                    .insert(HOLDER_MARK.to_owned(), Member::mark(until));
            }
            _ => left.expire_at = now.saturating_sub(1),
        }
        left
    }

    /// Whom a release hands the lock to, from `line` (the queue alive by Go's rule, in order,
    /// its head older than every Go member): the head, if it is a Rust waiter whose entry is tagged
    /// and fresh (written within about a renewal period: its waiter is alive), and, behind a
    /// shared head, the shared waiters that follow it and are so too. Empty: nobody (the head
    /// then takes the record itself).
    ///
    /// `Clone`d because the caller goes on to change the queue they are read from.
    pub(super) fn handoff(&self, line: &[&Member], now: i64) -> Vec<Member> {
        let cfg = &self.config;
        // A live waiter refreshes its entry every renewal period to (its estimate of the API
        // server's clock) + TTL + 1; estimates differ by a second or two.
        let renew_secs = i64::try_from(cfg.renew_period.as_secs()).unwrap_or(i64::MAX);
        let fresh_after = now
            .saturating_add(cfg.ttl_secs())
            .saturating_sub(renew_secs)
            .saturating_sub(2);
        let eligible = |m: &Member| m.is_rust() && m.tag != 0 && m.expire_at >= fresh_after;
        let Some(head) = line.first().filter(|m| eligible(m)) else {
            return Vec::new();
        };
        if !head.shared {
            return vec![(*head).clone()];
        }
        line.iter()
            .take_while(|m| m.shared && eligible(m))
            .map(|m| (*m).clone())
            .collect()
    }

    /// Undoes what an acquisition that ended without the lock may have left: its queue entry
    /// `id`, and grants in `maybe` whose answers were lost. Best effort: what it cannot undo
    /// goes stale (an entry stops being refreshed, a grant is not renewed) within a TTL.
    pub(super) async fn take_back(
        &self,
        name: &str,
        key: &str,
        id: Option<&str>,
        maybe: &[Granted],
    ) {
        // A write still in flight may land a little later: look for a while.
        let give_up = clock::now() + self.config.request_timeout + Duration::from_millis(500);
        let mut pause = Duration::from_millis(50);
        let mut id = id;
        let mut maybe = maybe.to_vec();
        while id.is_some() || !maybe.is_empty() {
            let snap = match self.store.get().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(key, error = %crate::error::chain(&e), "cannot clean up after an acquisition");
                    return;
                }
            };
            let Some(value) = snap.get(key) else {
                if clock::now() >= give_up {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(800));
                continue;
            };
            let Ok(rec) = Record::parse(value) else {
                return;
            };
            if let Some(g) = maybe.iter().find(|g| g.landed_in(&rec)) {
                // Our grant landed: release it like a holder would.
                let held = Held {
                    uuid: rec.uuid.clone(),
                    value: value.to_owned(),
                    ids: [g.holder.clone()].into(),
                };
                let until = g.sent + self.config.ttl;
                if let Err(e) = self.release_record(name, key, &g.holder, held, until).await {
                    tracing::debug!(key, error = %crate::error::chain(&e), "cannot release an abandoned grant");
                }
                maybe.clear();
                continue;
            }
            if let Some(me) = id.filter(|id| handed_to(&rec, id).is_some()) {
                // A release handed us the lock as we left: give it back like a holder would.
                let held = Held {
                    uuid: rec.uuid.clone(),
                    value: value.to_owned(),
                    ids: [me.to_owned()].into(),
                };
                let until = clock::boot() + self.config.ttl;
                if let Err(e) = self.release_record(name, key, me, held, until).await {
                    tracing::debug!(key, error = %crate::error::chain(&e), "cannot give back a lock handed to us");
                }
                id = None;
                continue;
            }
            if let Some(me) = id.filter(|id| rec.queue.contains_key(*id)) {
                let mut left = rec.clone();
                left.queue.remove(me);
                // A free record: give it to whoever is first now, as a release would.
                if left.shared_holders <= 0 {
                    left.shared_holders = 1;
                    left = self.released(&left, me, true);
                }
                let new = Some(left.to_value());
                let change = Change {
                    key: key.to_owned(),
                    expected: Some(value.to_owned()),
                    new,
                };
                match self.store.write(std::slice::from_ref(&change), true).await {
                    Ok(_) => id = None,
                    Err(WriteError::Conflict) => {}
                    Err(WriteError::Unknown(_)) => {}
                    Err(WriteError::Failed(e)) => {
                        tracing::debug!(key, error = %crate::error::chain(&e), "cannot leave the queue");
                        return;
                    }
                }
                continue;
            }
            if clock::now() >= give_up {
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(800));
        }
    }

    /// Makes room in a full object: removes the free records (released locks, count 0) that
    /// have stood idle for a minute by the API server's clock with nobody queued. Returns how
    /// many it removed.
    pub(super) async fn make_room(&self) -> Result<usize, Error> {
        let snap = self.store.get().await?;
        let now = self.store.server_now();
        let idle: Vec<Change> = snap
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| k.starts_with(super::KEY_PREFIX))
            .filter(|(_, v)| {
                Record::parse(v).is_ok_and(|r| {
                    r.shared_holders <= 0
                        && r.expire_at.saturating_add(60) < now
                        && r.queue.values().all(|m| m.expire_at < now)
                })
            })
            .map(|(k, v)| Change {
                key: k.clone(),
                expected: Some(v.clone()),
                new: None,
            })
            .collect();
        if idle.is_empty() {
            return Ok(0);
        }
        match self.store.write(&idle, true).await {
            Ok(_) => {
                tracing::info!(object = %self.store.describe, removed = idle.len(), "removed idle free lock records to make room");
                Ok(idle.len())
            }
            // Somebody took one meanwhile: the caller tries again and may call again.
            Err(WriteError::Conflict | WriteError::Unknown(_)) => Ok(0),
            Err(WriteError::Failed(e)) => Err(e),
        }
    }
}
