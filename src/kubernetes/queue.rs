//! The acquirer queue: waiters register in the record's `QueueMembers` (Go lockgate v0.2's
//! format) and are served in arrival order; a stream of shared holders cannot starve an
//! exclusive waiter.
//!
//! Pure logic, no I/O: which queue members are alive, who is ahead of whom, and whether a
//! request may take the lock now.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::clock::{self, Instant};

use serde::{Deserialize, Serialize};

use super::record::HolderEntry;
use crate::options::Mode;

/// One waiter in a record's queue: Go's `QueueMember`, plus `Shared` (Go drops it when it
/// rewrites the record; a member without it counts as exclusive, the cautious reading).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Member {
    #[serde(rename = "AcquirerId")]
    pub id: String,
    /// Arrival, unix seconds (Go's field; the order among Rust waiters comes from `id`).
    #[serde(rename = "AcquiredAtTimestamp")]
    pub arrived: i64,
    /// The waiter's wall clock at its last refresh plus the TTL.
    #[serde(rename = "ExpireAtTimestamp")]
    pub expire_at: i64,
    #[serde(rename = "Shared", default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// A random tag, new with every write of the entry (our field; Go drops it when it rewrites
    /// the record). A release that hands the lock to this waiter names the tag of the entry it
    /// saw, and the waiter counts its lease from when it sent that write (see
    /// [`Handoff`](super::release)). Without it nobody hands the lock to the member.
    #[serde(rename = "Tag", default, skip_serializing_if = "is_zero")]
    pub tag: u64,
    /// Who waits, for the holder entry a handoff writes (our field, like `Tag`).
    #[serde(rename = "Holder", default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<HolderEntry>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Member {
    fn mode(&self) -> Mode {
        if self.shared {
            Mode::Shared
        } else {
            Mode::Exclusive
        }
    }

    /// Arrival order: seconds first (what Go v0.2 compares), then Go members before Rust ones
    /// (Go breaks ties at random, so a Rust waiter counts itself first only when it is strictly
    /// older), then the id, which for Rust waiters starts with the arrival time in nanoseconds.
    pub fn order(&self) -> (i64, bool, &str) {
        (self.arrived, self.is_rust(), &self.id)
    }

    /// True for a member written by Rust lockgate (its id has the shape of [`new_id`]'s).
    pub fn is_rust(&self) -> bool {
        let b = self.id.as_bytes();
        b.len() == 33
            && b[..20].iter().all(u8::is_ascii_digit)
            && b[20] == b'-'
            && b[21..].iter().all(u8::is_ascii_hexdigit)
    }

    /// Alive by Go v0.2's rule: its `ExpireAtTimestamp` not passed at `now` (unix seconds).
    pub fn alive_for_go(&self, now: i64) -> bool {
        self.expire_at >= now
    }
}

/// True when the Rust member `head` is older (in whole seconds, what Go compares, with a margin
/// for clocks) than every Go member of `queue` alive by Go's rule and than any Go process that
/// would queue now: then no Go v0.2 process counts itself first in line.
pub(crate) fn first_for_go(head: &Member, queue: &BTreeMap<String, Member>, now: i64) -> bool {
    // A Go process that is not queued yet adds itself with its clock's now as it takes over:
    // the head must be older than that too (Go breaks ties at random).
    head.arrived < now && older_than_go_members(head, queue, now)
}

/// True when the Rust member `head` is older than every Go member of `queue` alive by Go's rule
/// (in whole seconds, with a margin for clocks): Go v0.2 processes already queued do not count
/// themselves first in line. (Enough for a record handed to `head`: it is held, and a Go
/// process arriving now waits for it.)
pub(crate) fn older_than_go_members(
    head: &Member,
    queue: &BTreeMap<String, Member>,
    now: i64,
) -> bool {
    head.is_rust()
        && queue
            .values()
            // Alive for Go by its own clock, which may be a second or two ahead of our estimate
            // of the API server's: count the nearly expired as alive.
            .filter(|m| {
                m.id != HOLDER_MARK && !m.is_rust() && m.alive_for_go(now.saturating_sub(2))
            })
            .all(|m| m.arrived > head.arrived)
}

/// The acquirer id of the holder mark: a queue entry older than anyone (its
/// `AcquiredAtTimestamp` is 1) and expiring with the lease, that a Rust holder keeps in a record
/// it took over under the record's uuid while Go v0.2 processes may have been looking at it as
/// expired. Go v0.2 re-reads
/// such a record and takes it when it is the oldest queue member, without looking at the lease
/// again; with the mark it never is. See PROTOCOL.md, "Go v0.2 peers".
pub(crate) const HOLDER_MARK: &str = "lockgate-holder";

impl Member {
    /// The holder mark, expiring at `expire_at`.
    pub fn mark(expire_at: i64) -> Self {
        Self {
            id: HOLDER_MARK.to_owned(),
            arrived: 1,
            expire_at,
            shared: false,
            tag: 0,
            holder: None,
            other: Default::default(),
        }
    }
}

/// A new waiter id: the wall clock in nanoseconds (so ids sort in arrival order), then random.
pub(crate) fn new_id() -> String {
    let nanos = clock::wall()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:020}-{}", &clock::uuid().simple().to_string()[..12])
}

/// Tells live queue members from dead ones without trusting other hosts' clocks: a member is
/// dead when its entry (its `ExpireAtTimestamp`, refreshed by a live waiter every renewal
/// period) has stood still for a TTL on our clock — or, as a shortcut for leftovers, when its
/// `ExpireAtTimestamp` is more than `stale_after` in our past.
#[derive(Debug, Default)]
pub(crate) struct Observer {
    seen: BTreeMap<String, (i64, Instant)>,
}

impl Observer {
    /// The live members of `queue` other than `me`, in arrival order.
    pub fn live<'a>(
        &mut self,
        queue: &'a BTreeMap<String, Member>,
        me: &str,
        ttl: Duration,
        stale_after: Duration,
        now_unix: i64,
    ) -> Vec<&'a Member> {
        let now = clock::now();
        self.seen.retain(|id, _| queue.contains_key(id));
        let mut live: Vec<&Member> = queue
            .iter()
            .filter(|(id, _)| id.as_str() != me && id.as_str() != HOLDER_MARK)
            .filter(|(id, m)| {
                let first = match self.seen.get(id.as_str()) {
                    Some((exp, t)) if *exp == m.expire_at => *t,
                    _ => {
                        self.seen.insert((*id).clone(), (m.expire_at, now));
                        now
                    }
                };
                now.duration_since(first) < ttl
                    && m.expire_at
                        .saturating_add(i64::try_from(stale_after.as_secs()).unwrap_or(i64::MAX))
                        >= now_unix
            })
            .map(|(_, m)| m)
            .collect();
        live.sort_by(|a, b| a.order().cmp(&b.order()));
        live
    }

    /// When the next live member could turn dead (to wake up and look again). Members that are
    /// dead already are not counted: waking for them would spin.
    pub fn next_expiry(&self, ttl: Duration) -> Option<Instant> {
        let now = clock::now();
        self.seen
            .values()
            .map(|(_, t)| *t + ttl)
            .filter(|at| *at > now)
            .min()
    }
}

/// The members ahead of a request: all live members if it is not queued, else those that
/// arrived before it.
pub(crate) fn ahead<'a>(live: &[&'a Member], mine: Option<&Member>) -> Vec<&'a Member> {
    match mine {
        None => live.to_vec(),
        Some(me) => live
            .iter()
            .copied()
            .filter(|m| m.order() < me.order())
            .collect(),
    }
}

/// Whether a request in `mode` may take a free lock, or join a shared one, with `ahead` before
/// it: an exclusive request only at the head of the queue; a shared one when nobody ahead wants
/// it exclusively (consecutive shared waiters go together).
pub(crate) fn may_proceed(mode: Mode, ahead: &[&Member]) -> bool {
    match mode {
        Mode::Exclusive => ahead.is_empty(),
        Mode::Shared => ahead.iter().all(|m| m.mode() == Mode::Shared),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, arrived: i64, shared: bool) -> Member {
        Member {
            id: id.into(),
            arrived,
            expire_at: 100,
            shared,
            tag: 0,
            holder: None,
            other: Default::default(),
        }
    }

    #[test]
    fn order_is_arrival_then_id() {
        let q: BTreeMap<String, Member> = [
            member("b", 5, false),
            member("a", 6, true),
            member("c", 5, true),
        ]
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();
        let mut o = Observer::default();
        let live = o.live(
            &q,
            "none",
            Duration::from_secs(10),
            Duration::from_secs(1000),
            100,
        );
        assert_eq!(
            live.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["b", "c", "a"]
        );
        // Queued as "c": only "b" is ahead; not queued: everyone is.
        let me = &q["c"];
        let live = o.live(
            &q,
            "c",
            Duration::from_secs(10),
            Duration::from_secs(1000),
            100,
        );
        assert_eq!(ahead(&live, Some(me)).len(), 1);
        assert_eq!(ahead(&live, None).len(), 2);
    }

    #[test]
    fn writers_are_not_overtaken_by_readers() {
        let w = member("w", 1, false);
        let r = member("r", 1, true);
        assert!(may_proceed(Mode::Exclusive, &[]));
        assert!(!may_proceed(Mode::Exclusive, &[&r]));
        assert!(
            may_proceed(Mode::Shared, &[&r]),
            "readers in a row go together"
        );
        assert!(
            !may_proceed(Mode::Shared, &[&r, &w]),
            "a queued writer stops later readers"
        );
    }

    #[test]
    fn members_that_stop_refreshing_die_after_a_ttl() {
        let mut q: BTreeMap<String, Member> = [(String::from("x"), member("x", 1, false))].into();
        let mut o = Observer::default();
        let ttl = Duration::from_millis(50);
        assert_eq!(
            o.live(&q, "me", ttl, Duration::from_secs(1000), 100).len(),
            1
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            o.live(&q, "me", ttl, Duration::from_secs(1000), 100).len(),
            0,
            "stood still for a TTL"
        );
        q.get_mut("x").unwrap().expire_at = 101; // refreshed: alive again
        assert_eq!(
            o.live(&q, "me", ttl, Duration::from_secs(1000), 100).len(),
            1
        );
        // Far in the past by our clock: dead at once.
        let q2: BTreeMap<String, Member> = [(String::from("old"), member("old", 1, false))].into();
        assert_eq!(
            o.live(
                &q2,
                "me",
                Duration::from_secs(10),
                Duration::from_secs(30),
                1000
            )
            .len(),
            0
        );
    }

    #[test]
    fn ids_sort_in_arrival_order() {
        let a = new_id();
        std::thread::sleep(Duration::from_millis(2));
        let b = new_id();
        assert!(a < b);
        assert!(member(&a, 1, false).is_rust());
        assert!(!member("go-acquirer", 1, false).is_rust());
        assert!(!member(HOLDER_MARK, 1, false).is_rust());
    }
}
