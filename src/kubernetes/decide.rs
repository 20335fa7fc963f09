//! The decision at the heart of an acquisition: from a lock's record as last seen, what to
//! write (a grant, a join, our place in the queue) or how long to wait.

use crate::clock::Instant;

use super::acquire::{Acquisition, Granted};
use super::queue::{self, Member, HOLDER_MARK};
use super::record::{HolderEntry, Record};
use super::release::MARK_MARGIN_SECS;
use super::store::Change;
use crate::error::Error;
use crate::options::Mode;

/// What a locker saw of one lock's record, kept across acquisitions: an expiry clock needs a
/// record to stand still for a TTL, and a non-blocking caller looks for an instant only.
#[derive(Default)]
pub(crate) struct Seen {
    /// The lease part of the record (without the queue, which waiters change) and when this
    /// locker first saw it.
    lease: Option<(String, Instant)>,
    members: queue::Observer,
    /// Whether this locker saw the current lease change (be renewed) under its uuid: then it
    /// is alive as far as we can tell, and only our own clock may expire it.
    renewal_seen: bool,
    /// When this locker last looked at the lock (to forget locks long unused).
    touched: Option<Instant>,
}

/// How many locks a locker remembers what it saw of; beyond, the least recently looked at
/// are forgotten (their expiry clocks start again when next looked at: later, never earlier).
const SEEN_MAX: usize = 4096;

/// Forgets the least recently touched half of `seen` when it has grown past [`SEEN_MAX`].
fn bound(seen: &mut std::collections::HashMap<String, Seen>) {
    if seen.len() <= SEEN_MAX {
        return;
    }
    let mut touched: Vec<Option<Instant>> = seen.values().map(|s| s.touched).collect();
    touched.sort_unstable();
    let cut = touched[touched.len() / 2];
    seen.retain(|_, s| s.touched > cut);
}

/// True when a shared request may join the shared record `rec`: its `IsShared` was set or
/// confirmed by Rust (`Renewals` present; Go drops it when it rewrites a record). A shared
/// record written by Go is never joined: Go v0.2 takes a released shared record over for an
/// *exclusive* request and leaves `IsShared: true` (with a new uuid and count 1), which nothing
/// in the record tells from a Go shared grant — a fresh process that did not watch the take-over
/// would join an exclusive holder (PROTOCOL.md, "Go v0.2 peers", rule 4).
fn joinable(rec: &Record) -> bool {
    use crate::clock::{planted, Bug};
    rec.is_shared && rec.shared_holders > 0 && (rec.renewals > 0 || planted(Bug::JoinGoTakeover))
}

/// The tag of the queue entry on which a release handed `id` the lock in `rec`, if it did: the
/// record is held, names `id` as a holder handed the lock, and no longer queues it.
pub(super) fn handed_to(rec: &Record, id: &str) -> Option<u64> {
    let tag = rec.holders.get(id)?.handoff?;
    (rec.shared_holders > 0 && !rec.queue.contains_key(id)).then_some(tag)
}

/// What to do about the record we see.
pub(super) enum Step {
    /// Write this change; on success we hold the lock with `record`. `fresh`: a new lease
    /// (not a join of the current one).
    Grant {
        change: Change,
        record: Record,
        fresh: bool,
        /// The record written over already named our holder id: a share of ours that was
        /// given back too late to use and could not be removed (see [`Granted::landed_in`]).
        known: bool,
    },
    /// One of our grants whose answer was lost turned out to have landed.
    Landed(Granted),
    /// A release handed us the lock (see [`Object::handoff`](super::Object::handoff)): we hold it
    /// without writing. `usable`: we know when we sent the queue entry it was handed on (else it
    /// is given back: its lease cannot be bounded).
    Handed { granted: Granted, usable: bool },
    /// Write this change to join (or refresh our place in) the queue; `tag` is the entry's.
    Enqueue(Change, u64),
    /// Somebody holds it, or is ahead of us: wait until this instant at the latest (for a
    /// record or a queue member to go stale, or to refresh our place).
    Wait(Record, Option<Instant>),
}

impl Acquisition<'_> {
    /// Decides, from the current value of the annotation, what to do.
    pub(super) fn step(&mut self) -> Result<Step, Error> {
        let object = self.object;
        let config = object.config;
        let mode = self.attempt.mode();
        let name = self.attempt.name.as_str();
        let Some(value) = self.current.get(&self.key).map(str::to_owned) else {
            let mut record = Record::new(name, mode == Mode::Shared, object.expire_at()).tagged();
            if !self.compact {
                record.holders.insert(self.id.clone(), self.holder_entry());
            }
            return Ok(Step::Grant {
                change: self.change(None, &record),
                record,
                fresh: true,
                known: false,
            });
        };
        let rec = Record::parse(&value).map_err(|e| object.corrupt(&self.key, e))?;
        if let Some(tag) = handed_to(&rec, &self.id) {
            let sent = if crate::clock::planted(crate::clock::Bug::HandoffSeenAt) {
                Some(crate::clock::boot())
            } else {
                object.queued_sent(&self.id, tag)
            };
            tracing::debug!(lock = name, "a release handed us the lock");
            return Ok(Step::Handed {
                usable: sent.is_some(),
                granted: Granted {
                    record: rec,
                    value,
                    holder: self.id.clone(),
                    sent: sent.unwrap_or_else(crate::clock::boot),
                    token: self.current.rv,
                    fresh: false,
                    known: false,
                },
            });
        }
        if let Some(g) = self.maybe.iter().find(|g| g.landed_in(&rec)) {
            tracing::debug!(lock = name, "a grant whose answer was lost had landed");
            return Ok(Step::Landed(Granted {
                record: rec,
                value,
                ..g.clone()
            }));
        }
        let server_now = object.store.server_now();
        let ttl = config.ttl;
        let (since, live, next_expiry, joinable, stale_allowed) = {
            let mut seen = object.seen();
            bound(&mut seen);
            let seen = seen.entry(self.key.clone()).or_default();
            seen.touched = Some(crate::clock::now());
            let joinable = joinable(&rec);
            let lease = rec.lease_part();
            match &seen.lease {
                Some((v, _)) if *v == lease => {}
                previous => {
                    // A change under the same uuid: a renewal (or a join) seen with our own
                    // eyes. From then on only our clock counts for this lease.
                    seen.renewal_seen = previous
                        .as_ref()
                        .is_some_and(|(v, _)| v.split('/').next() == Some(rec.uuid.as_str()));
                    seen.lease = Some((lease, crate::clock::now()));
                }
            }
            let stale_allowed = !seen.renewal_seen;
            let since = seen
                .lease
                .as_ref()
                .map_or_else(crate::clock::now, |(_, t)| *t);
            let live: Vec<Member> = seen
                .members
                .live(&rec.queue, &self.id, ttl, ttl, server_now)
                .into_iter()
                .cloned()
                .collect();
            (
                since,
                live,
                seen.members.next_expiry(ttl),
                joinable,
                stale_allowed,
            )
        };
        // Free: released (count 0). Expired: stood still for a TTL on our clock, or (for a
        // lease we have not seen renewed) its expiry passed more than a TTL ago by the API
        // server's clock.
        let free = rec.shared_holders <= 0;
        let stale = stale_allowed && rec.expire_at.saturating_add(config.ttl_secs()) < server_now;
        let expired = !free && (since.elapsed() >= ttl || stale);
        let mine = rec.queue.get(&self.id);
        let live_refs: Vec<&Member> = live.iter().collect();
        let ahead = queue::ahead(&live_refs, mine);
        let allowed = queue::may_proceed(mode, &ahead);
        if (free || expired) && allowed {
            let expire_at = object.expire_at();
            // Keep the uuid of a free record only when no Go v0.2 process may be taking it over
            // under that uuid: it is reserved (a live holder mark: Go sees it unexpired and
            // never first in line), or we are first in line by Go's order too. Otherwise, and
            // for takeovers of the expired, a new uuid: an old holder, or a Go take-over in
            // flight, must find it changed.
            let reserved = rec
                .queue
                .get(HOLDER_MARK)
                .is_some_and(|m| m.expire_at > server_now.saturating_add(MARK_MARGIN_SECS));
            let keep = free
                && !self.compact
                && (reserved
                    || mine.is_some_and(|m| queue::first_for_go(m, &rec.queue, server_now)));
            let mut new = if keep {
                let mut r = rec.clone();
                r.shared_holders = 1;
                r.is_shared = mode == Mode::Shared;
                r.expire_at = expire_at;
                r
            } else {
                let mut r = Record::new(name, mode == Mode::Shared, expire_at);
                r.other = rec.other.clone();
                r
            };
            // Keep the live waiters' places; drop ours and the dead.
            new.queue = live.iter().map(|m| (m.id.clone(), m.clone())).collect();
            if keep {
                new.queue
                    .insert(HOLDER_MARK.to_owned(), Member::mark(expire_at));
            }
            new.holders = if self.compact {
                Default::default()
            } else {
                [(self.id.clone(), self.holder_entry())].into()
            };
            let record = new.tagged();
            return Ok(Step::Grant {
                change: self.change(Some(value), &record),
                record,
                fresh: true,
                known: rec.holders.contains_key(&self.id),
            });
        }
        if !expired && mode == Mode::Shared && joinable && allowed {
            let mut joined = rec.renewed(object.expire_at());
            // A share of ours left in the record (a grant that came too late to use, whose
            // removal failed) is counted already: take it up again rather than count it twice.
            let known = rec.holders.contains_key(&self.id);
            if !known {
                joined.shared_holders = joined.shared_holders.saturating_add(1);
            }
            joined.queue.remove(&self.id);
            if !self.compact {
                joined.holders.insert(self.id.clone(), self.holder_entry());
            }
            let record = joined.tagged();
            return Ok(Step::Grant {
                change: self.change(Some(value), &record),
                record,
                fresh: false,
                known,
            });
        }
        let refresh_due = self
            .refreshed
            .is_none_or(|t| t.elapsed() >= config.renew_period);
        if (self.attempt.may_wait() || self.keep_place) && (mine.is_none() || refresh_due) {
            let mut queued = rec.clone();
            // The HTTP server's acquirers come and go between polls: a lock handed to one
            // while no poll runs would wait unused for its TTL. They take it themselves.
            let tag = if self.keep_place {
                0
            } else {
                (crate::clock::random() as u64) | 1
            };
            let member = Member {
                id: self.id.clone(),
                arrived: mine.map_or(server_now, |m| m.arrived),
                expire_at: object.expire_at(),
                shared: mode == Mode::Shared,
                tag,
                holder: (!self.compact).then(|| self.holder_entry()),
                other: mine.map(|m| m.other.clone()).unwrap_or_default(),
            };
            queued.queue.insert(self.id.clone(), member);
            return Ok(Step::Enqueue(
                Change {
                    key: self.key.clone(),
                    expected: Some(value),
                    new: Some(queued.to_value()),
                },
                tag,
            ));
        }
        // Wake for what may change by itself: the lease going stale, our place due for a
        // refresh, a member ahead dying. A moment already past is no reason to wake (an expired
        // record with a live member ahead of us changes only when written: the watch tells).
        let now = crate::clock::now();
        let wake = [
            (!free).then_some(since + ttl),
            self.refreshed.map(|t| t + config.renew_period),
            next_expiry,
        ]
        .into_iter()
        .flatten()
        .filter(|t| *t > now)
        .min();
        Ok(Step::Wait(rec, wake))
    }

    /// This acquisition as a holder, for the record.
    fn holder_entry(&self) -> HolderEntry {
        HolderEntry::this_process(
            self.object.store.server_now(),
            self.attempt.opts.description.clone(),
        )
    }

    fn change(&self, expected: Option<String>, record: &Record) -> Change {
        Change {
            key: self.key.clone(),
            expected,
            new: Some(record.to_value()),
        }
    }
}
