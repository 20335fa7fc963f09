//! Exclusion when writes land late: scripted schedules in the deterministic simulator, each
//! the timing a review found (a write that lands after the client's next read, an answer that
//! comes after the deadline, ...). The real Kubernetes locker runs against the simulated API
//! server; the journal checks every grant against every other believed hold.
//!
//! These need no test environment: the simulated server is held to the real one by
//! `sim_conformance.rs`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockgate::kubernetes::LeaseConfig;
use lockgate::{Mode, Wait};
use lockgate_testenv::sim::journal::Journal;
use lockgate_testenv::sim::script::{
    acquire, done, holds, locker, record, record_changes, release, run_until, Script,
};
use lockgate_testenv::sim::world::{After, Before, Plan, World};
use lockgate_testenv::sim::OBJECT;

const SEC: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A clean plan with the answer lost, the request held until the sender's next request.
fn held_and_lost() -> Plan {
    Plan {
        there: ms(1),
        hold: true,
        before: Before::Handle,
        after: After::Lose,
    }
}

fn world(
    policy: impl FnMut(
            &mut lockgate_testenv::sim::rng::Rng,
            &lockgate_testenv::sim::world::RequestView<'_>,
        ) -> Option<Plan>
        + 'static,
) -> World {
    let mut w = World::new(7, Box::new(Script(policy)));
    w.trace.enable(true);
    w.server.create(OBJECT);
    w
}

/// Leases renewed seldom, so that no renewal or queue refresh changes a record during a
/// script's few seconds (a change would make a held write fail its `test`, not land).
fn quiet() -> LeaseConfig {
    LeaseConfig {
        ttl: Duration::from_secs(30),
        renew_period: Duration::from_secs(10),
        renew_deadline: Duration::from_secs(25),
        request_timeout: Duration::from_secs(3),
    }
}

fn fail(w: &World, journal: &Journal, what: &str) -> ! {
    for line in w.trace.lines() {
        eprintln!("{line}");
    }
    panic!("{what}; violations: {:#?}", journal.violations());
}

fn check(w: &World, journal: &Journal) {
    if !journal.violations().is_empty() {
        fail(w, journal, "the journal found a violation");
    }
}

/// Shared: A's release (count 2 → 1) is answered late — it lands after A's next read — and A
/// must not give up a second share (B's), which would let an exclusive waiter in beside B.
#[test]
fn a_shared_release_in_doubt_that_lands_after_the_next_read_is_not_applied_twice() {
    let a_id = Arc::new(AtomicU32::new(u32::MAX));
    let once = Arc::new(AtomicBool::new(false));
    let (a_id2, once2) = (Arc::clone(&a_id), Arc::clone(&once));
    let mut w = world(move |_, v| {
        let decrement = record_changes(v.req).iter().any(|c| c.counts() == (2, 1));
        (v.host as u32 == a_id2.load(Ordering::SeqCst)
            && decrement
            && !once2.swap(true, Ordering::SeqCst))
        .then(held_and_lost)
    });
    let journal = Journal::default();
    let lease = quiet();
    let (a, b, c) = (w.add_host("a"), w.add_host("b"), w.add_host("c"));
    a_id.store(a as u32, Ordering::SeqCst);
    let (la, lb, lc) = (
        locker(&w, a, lease),
        locker(&w, b, lease),
        locker(&w, c, lease),
    );
    let ga = acquire(&w, &journal, a, &la, "x", Mode::Shared, Wait::Forever);
    assert!(run_until(&mut w, 10 * SEC, |_| holds(&ga)));
    let gb = acquire(&w, &journal, b, &lb, "x", Mode::Shared, Wait::Forever);
    assert!(run_until(&mut w, 10 * SEC, |_| holds(&gb)));
    let gc = acquire(&w, &journal, c, &lc, "x", Mode::Exclusive, Wait::Forever);
    w.run_for(2 * SEC);
    assert!(!done(&gc), "the exclusive waiter must wait");
    let released = release(&w, &journal, a, &ga);
    assert!(run_until(&mut w, 30 * SEC, |_| done(&released)));
    assert!(
        once.load(Ordering::SeqCst),
        "the script never held A's release"
    );
    // B still holds; the exclusive waiter must still wait, and the count is B's.
    w.run_for(5 * SEC);
    check(&w, &journal);
    if done(&gc) {
        fail(
            &w,
            &journal,
            "the exclusive waiter got the lock while B held it shared",
        );
    }
    let rec = record(&w, "x").expect("the record");
    if rec["SharedHoldersCount"] != 1 {
        fail(&w, &journal, &format!("the count is not B's alone: {rec}"));
    }
    if !holds(&gb) || w.as_host(b, || gb.lock().unwrap().guard.as_ref().unwrap().is_lost()) {
        fail(&w, &journal, "B lost its lease");
    }
}

/// Exclusive: A's release lands after A's next read; B (first in line) is granted the freed
/// record under the same uuid; A's retry must not free B's grant (which would let C in and
/// leave B renewing a record that is C's).
#[test]
fn an_exclusive_release_in_doubt_does_not_free_the_next_holders_grant() {
    let a_id = Arc::new(AtomicU32::new(u32::MAX));
    let once = Arc::new(AtomicBool::new(false));
    let conflicted = Arc::new(AtomicBool::new(false));
    let (a_id2, once2, conflicted2) = (
        Arc::clone(&a_id),
        Arc::clone(&once),
        Arc::clone(&conflicted),
    );
    let mut w = world(move |_, v| {
        let from_a = v.host as u32 == a_id2.load(Ordering::SeqCst);
        // A's release built on the record as it is (with B and C queued), not on A's own
        // older copy (which fails its `test` at once).
        let release = record_changes(v.req).iter().any(|c| {
            c.last_release()
                && c.old
                    .as_ref()
                    .is_some_and(|o| o["QueueMembers"].as_object().is_some_and(|q| !q.is_empty()))
        });
        if from_a && release && !once2.swap(true, Ordering::SeqCst) {
            return Some(held_and_lost());
        }
        if from_a && release {
            // The retry: answered after a while, so that B's grant comes first.
            conflicted2.store(true, Ordering::SeqCst);
            return Some(Plan::clean(ms(1), ms(200)));
        }
        if from_a && v.req.method == http::Method::GET && conflicted2.load(Ordering::SeqCst) {
            return Some(Plan::clean(ms(200), ms(1)));
        }
        None
    });
    let journal = Journal::default();
    let lease = quiet();
    let (a, b, c) = (w.add_host("a"), w.add_host("b"), w.add_host("c"));
    a_id.store(a as u32, Ordering::SeqCst);
    let (la, lb, lc) = (
        locker(&w, a, lease),
        locker(&w, b, lease),
        locker(&w, c, lease),
    );
    let ga = acquire(&w, &journal, a, &la, "x", Mode::Exclusive, Wait::Forever);
    assert!(run_until(&mut w, 10 * SEC, |_| holds(&ga)));
    let gb = acquire(&w, &journal, b, &lb, "x", Mode::Exclusive, Wait::Forever);
    w.run_for(2 * SEC);
    let gc = acquire(&w, &journal, c, &lc, "x", Mode::Exclusive, Wait::Forever);
    w.run_for(2 * SEC);
    let released = release(&w, &journal, a, &ga);
    assert!(run_until(&mut w, 30 * SEC, |_| done(&released)));
    assert!(
        once.load(Ordering::SeqCst),
        "the script never held A's release"
    );
    if !run_until(&mut w, 10 * SEC, |_| holds(&gb)) {
        fail(&w, &journal, "B did not get the lock");
    }
    // Long enough for renewals and any takeover to show.
    w.run_for(30 * SEC);
    check(&w, &journal);
    if done(&gc) {
        fail(&w, &journal, "C got the lock while B held it");
    }
    if w.as_host(b, || gb.lock().unwrap().guard.as_ref().unwrap().is_lost()) {
        fail(&w, &journal, "B lost its lease");
    }
}

/// Item: a shared request must not join a record shaped as Go v0.2 leaves it after taking a
/// released shared record over for an *exclusive* request (a new uuid, count 1, `IsShared`
/// kept, no `Renewals`): a fresh process cannot tell it from a shared grant.
#[test]
fn a_shared_request_does_not_join_a_go_takeover_record() {
    let mut w = world(|_, _| None);
    let journal = Journal::default();
    let key = lockgate::kubernetes::annotation_key("x");
    // Go v0.2's take-over, as it writes it, renewed by its holder every 3 s.
    let go_record = |expire: u64| {
        format!(
            r#"{{"uuid":"0b1f0e0a-6d8e-4a55-9d41-2c6f7b0c9e11","lockName":"x","ExpireAtTimestamp":{expire},"SharedHoldersCount":1,"IsShared":true,"QueueMembers":{{}}}}"#
        )
    };
    let now = || 1_796_083_200u64;
    w.server
        .put_annotation(OBJECT, &key, &go_record(now() + 10));
    let a = w.add_host("a");
    let la = locker(&w, a, LeaseConfig::default());
    let g = acquire(&w, &journal, a, &la, "x", Mode::Shared, Wait::NonBlocking);
    assert!(run_until(&mut w, 10 * SEC, |_| done(&g)));
    let s = g.lock().unwrap();
    assert_eq!(
        s.error.as_deref(),
        Some("would block"),
        "joined a Go exclusive holder's record: {:?}",
        record(&w, "x")
    );
}

/// Item: a grant found only after its answer was lost, so late that the lease may have
/// expired for others, is not handed out — not even while a renewal round of another lock is
/// in flight (which kept the old code's verdict back until the round ended).
#[test]
fn a_grant_found_after_its_deadline_is_not_handed_out() {
    let a_id = Arc::new(AtomicU32::new(u32::MAX));
    let a_id2 = Arc::clone(&a_id);
    // When A sent its grant writes of x.
    let x_grants = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let x_grants2 = Arc::clone(&x_grants);
    let mut w = world(move |_, v| {
        if v.host as u32 != a_id2.load(Ordering::SeqCst) {
            return None;
        }
        let changes = record_changes(v.req);
        if changes.iter().any(|c| {
            c.new.as_ref().is_some_and(|r| r["lockName"] == "x")
                && c.counts().1 == 1
                && c.counts().0 != 1
        }) {
            x_grants2.lock().unwrap().push(v.sent);
        }
        let is_x = |c: &&lockgate_testenv::sim::script::RecordChange| {
            c.new.as_ref().is_some_and(|r| r["lockName"] == "x")
        };
        let is_y = |c: &&lockgate_testenv::sim::script::RecordChange| {
            c.new.as_ref().is_some_and(|r| r["lockName"] == "y")
        };
        // A's grant of x lands, its answer is lost.
        if changes.iter().any(|c| is_x(&c) && c.counts() == (0, 1)) {
            return Some(Plan {
                there: ms(1),
                hold: false,
                before: Before::Handle,
                after: After::Lose,
            });
        }
        // A's reads fail until 26 s: it finds its grant of x (sent at about 2 s) only then,
        // past its 25 s renewal deadline.
        if v.req.method == http::Method::GET
            && !v.req.is_watch()
            && v.sent > 3 * SEC
            && v.sent < 26 * SEC
        {
            return Some(Plan {
                there: ms(1),
                hold: false,
                before: Before::Refuse(503),
                after: After::Deliver(ms(1)),
            });
        }
        // The renewal round of y at 20 s stays in flight until 33 s (its request crawls).
        if changes.iter().any(|c| is_y(&c) && c.counts() == (1, 1))
            && v.sent > 15 * SEC
            && v.sent < 25 * SEC
        {
            return Some(Plan::clean(13 * SEC, ms(1)));
        }
        None
    });
    let journal = Journal::default();
    let lease = quiet();
    let (a, b) = (w.add_host("a"), w.add_host("b"));
    a_id.store(a as u32, Ordering::SeqCst);
    let (la, lb) = (locker(&w, a, lease), locker(&w, b, lease));
    let gy = acquire(&w, &journal, a, &la, "y", Mode::Exclusive, Wait::Forever);
    assert!(run_until(&mut w, 2 * SEC, |_| holds(&gy)));
    let gx = acquire(&w, &journal, a, &la, "x", Mode::Exclusive, Wait::Forever);
    w.run_for(SEC);
    let gbx = acquire(&w, &journal, b, &lb, "x", Mode::Exclusive, Wait::Forever);
    // B takes x over once A's record stood still for a TTL (about 32 s).
    assert!(run_until(&mut w, 60 * SEC, |_| holds(&gbx) || done(&gbx)));
    w.run_for(5 * SEC);
    check(&w, &journal);
    // Whatever A got for x was granted by a write sent less than a renewal deadline before
    // A was handed the guard.
    let s = gx.lock().unwrap();
    if let (Some(_), Some(at)) = (s.guard.as_ref(), s.granted_at) {
        let sent = x_grants
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|t| *t <= at)
            .max();
        let sent = sent.expect("A wrote a grant of x");
        if at - sent >= lease.renew_deadline {
            drop(s);
            fail(
                &w,
                &journal,
                &format!("A was handed x {:?} after sending its grant", at - sent),
            );
        }
    }
}

/// Item: the outcome of a renewal round is not applied to a lease of the same key held again
/// meanwhile (a tight release/acquire loop must not be told lost while its record is held).
#[test]
fn a_stale_renewal_outcome_does_not_end_the_next_lease_of_the_key() {
    #[derive(Default)]
    struct S {
        renewal_held: bool,
        released: bool,
    }
    let state = Arc::new(std::sync::Mutex::new(S::default()));
    let st = Arc::clone(&state);
    let mut w = world(move |_, v| {
        let mut s = st.lock().unwrap();
        let changes = record_changes(v.req);
        // The renewal of x at 10 s: lands after A's next request (the release), and its
        // outcome (a conflict: the record was released) comes back half a second later, after
        // the lock is held again. (This used to delay the read that followed the release
        // instead: the next acquisition's, after its guess "no record" failed. It now guesses
        // the record as the release left it and reads nothing.)
        if !s.renewal_held && v.sent > 9 * SEC && changes.iter().any(|c| c.counts() == (1, 1)) {
            s.renewal_held = true;
            return Some(Plan {
                there: ms(1),
                hold: true,
                before: Before::Handle,
                after: After::Deliver(ms(500)),
            });
        }
        if s.renewal_held && !s.released && changes.iter().any(|c| c.counts() == (1, 0)) {
            s.released = true;
        }
        None
    });
    let journal = Journal::default();
    let a = w.add_host("a");
    let la = locker(&w, a, quiet());
    let g = acquire(&w, &journal, a, &la, "x", Mode::Exclusive, Wait::Forever);
    assert!(run_until(&mut w, 2 * SEC, |_| holds(&g)));
    // Release and take it again at once, right as the renewal goes out.
    w.run_for(10 * SEC - w.now + ms(5));
    let again = lockgate_testenv::sim::script::SlotRef::default();
    {
        let (guard, l, again) = (
            g.lock().unwrap().guard.take(),
            la.clone(),
            Arc::clone(&again),
        );
        w.spawn(a, async move {
            if let Some(guard) = guard {
                let _ = guard.release().await;
            }
            let r = l.acquire("x", lockgate::AcquireOptions::exclusive()).await;
            let mut s = again.lock().unwrap();
            s.done = true;
            match r {
                Ok(g) => s.guard = Some(g),
                Err(e) => s.error = Some(e.to_string()),
            }
        });
    }
    assert!(run_until(&mut w, 5 * SEC, |_| holds(&again)));
    w.run_for(3 * SEC);
    let s = state.lock().unwrap();
    assert!(s.renewal_held && s.released, "the script did not play out");
    drop(s);
    if w.as_host(a, || {
        again.lock().unwrap().guard.as_ref().unwrap().is_lost()
    }) {
        fail(
            &w,
            &journal,
            "the lease held again was declared lost by the old lease's renewal",
        );
    }
}

/// Item: a host suspended past its lease's deadline sees the lease lost the moment it wakes
/// (its monotonic clock stopped; its boot clock did not), and its next write carries an expiry
/// in the API server's present, not the past.
#[test]
fn a_suspended_holder_sees_its_lease_lost_on_waking() {
    let mut w = world(|_, _| None);
    let journal = Journal::default();
    let a = w.add_host("a");
    let la = locker(&w, a, LeaseConfig::default());
    let g = acquire(&w, &journal, a, &la, "x", Mode::Exclusive, Wait::Forever);
    assert!(run_until(&mut w, 2 * SEC, |_| holds(&g)));
    w.run_for(SEC);
    w.suspend(a);
    w.run_for(60 * SEC);
    w.resume(a);
    // At once, as the host's first task runs (before any of its timers fired).
    let seen = Arc::new(AtomicBool::new(false));
    {
        let (g, seen) = (Arc::clone(&g), Arc::clone(&seen));
        w.spawn(a, async move {
            let lost = g.lock().unwrap().guard.as_ref().unwrap().is_lost();
            seen.store(lost, Ordering::SeqCst);
        });
    }
    w.run_for(ms(1));
    assert!(
        seen.load(Ordering::SeqCst),
        "the lease is lost 60 s after its last renewal"
    );
    // A new acquisition on the woken host writes an expiry a TTL ahead of the server's clock.
    let g2 = acquire(&w, &journal, a, &la, "z", Mode::Exclusive, Wait::Forever);
    assert!(run_until(&mut w, 5 * SEC, |_| holds(&g2)));
    let rec = record(&w, "z").expect("z's record");
    let server_now = w
        .server_wall()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expire = rec["ExpireAtTimestamp"].as_i64().unwrap();
    assert!(
        expire >= server_now + 9,
        "expiry {expire} must be a TTL past the server's {server_now}"
    );
    check(&w, &journal);
}

/// Item: a join of the key's lease under another uuid (the lease this process held was taken
/// over, and a second member joins the new one before the renewer noticed) is a new lease: the
/// old members are told they lost theirs.
#[test]
fn a_join_under_another_uuid_ends_the_old_members() {
    let mut w = world(|_, _| None);
    let journal = Journal::default();
    let a = w.add_host("a");
    let la = locker(&w, a, quiet());
    let g1 = acquire(&w, &journal, a, &la, "x", Mode::Shared, Wait::Forever);
    assert!(run_until(&mut w, 2 * SEC, |_| holds(&g1)));
    // Somebody takes the record over with a shared lease of its own (Rust-written: joinable).
    let key = lockgate::kubernetes::annotation_key("x");
    w.server.put_annotation(
        OBJECT,
        &key,
        r#"{"uuid":"7d1e2f3a-0000-4000-8000-000000000001","lockName":"x","ExpireAtTimestamp":1796083260,"SharedHoldersCount":1,"IsShared":true,"QueueMembers":{},"Renewals":5}"#,
    );
    let g2 = acquire(&w, &journal, a, &la, "x", Mode::Shared, Wait::Forever);
    assert!(run_until(&mut w, 2 * SEC, |_| holds(&g2)));
    // Before any renewal: the first member's lease is gone.
    assert!(
        w.as_host(a, || g1.lock().unwrap().guard.as_ref().unwrap().is_lost()),
        "the member of the replaced lease was not told"
    );
    assert!(!w.as_host(a, || g2.lock().unwrap().guard.as_ref().unwrap().is_lost()));
}

/// Item: cancelling an acquisition while it cleans up after giving up (its queue place being
/// taken back) still takes the place back: the clean-up finishes on its own.
#[test]
fn cancelling_during_the_clean_up_still_leaves_the_queue() {
    let c_id = Arc::new(AtomicU32::new(u32::MAX));
    let c_id2 = Arc::clone(&c_id);
    let mut w = world(move |_, v| {
        // C's reads after its acquisition gave up (at 1.5 s) answer slowly.
        (v.host as u32 == c_id2.load(Ordering::SeqCst)
            && v.req.method == http::Method::GET
            && !v.req.is_watch()
            && v.sent > ms(1400))
        .then(|| Plan::clean(ms(1), 2 * SEC))
    });
    let journal = Journal::default();
    let (a, c) = (w.add_host("a"), w.add_host("c"));
    c_id.store(c as u32, Ordering::SeqCst);
    let (la, lc) = (locker(&w, a, quiet()), locker(&w, c, quiet()));
    let g = acquire(&w, &journal, a, &la, "x", Mode::Exclusive, Wait::Forever);
    assert!(run_until(&mut w, SEC, |_| holds(&g)));
    let queued = |w: &World| {
        record(w, "x").is_some_and(|r| r["QueueMembers"].as_object().is_some_and(|q| !q.is_empty()))
    };
    // C waits 1.4 s at most, and is cancelled 1 s later, in the middle of its clean-up.
    {
        let lc = lc.clone();
        w.spawn(c, async move {
            let wait = lc.acquire("x", lockgate::AcquireOptions::exclusive().timeout(ms(1400)));
            tokio::select! {
                biased;
                _ = tokio::time::sleep(ms(2400)) => {}
                _ = async { let _ = wait.await; std::future::pending::<()>().await } => {}
            }
        });
    }
    assert!(run_until(&mut w, SEC, |w| queued(w)), "C queued");
    // Well within a TTL (30 s), C's place is gone.
    assert!(
        run_until(&mut w, 8 * SEC, |w| !queued(w)),
        "C's place stayed: {:?}",
        record(&w, "x")
    );
    check(&w, &journal);
}

/// Item: a join whose answer was lost, by an acquisition cancelled meanwhile, is found and
/// given back even after another holder's renewal changed the record (the join's own tag is
/// gone, its holder entry is not): the count does not stay one too high for a TTL.
#[test]
fn a_cancelled_join_whose_answer_was_lost_is_given_back() {
    let a_id = Arc::new(AtomicU32::new(u32::MAX));
    let a_id2 = Arc::clone(&a_id);
    let mut w = world(move |_, v| {
        let join = record_changes(v.req).iter().any(|c| c.counts() == (1, 2));
        (v.host as u32 == a_id2.load(Ordering::SeqCst) && join).then(|| Plan {
            there: ms(1),
            hold: false,
            before: Before::Handle,
            after: After::Lose,
        })
    });
    let journal = Journal::default();
    let (a, b) = (w.add_host("a"), w.add_host("b"));
    a_id.store(a as u32, Ordering::SeqCst);
    let (la, lb) = (
        locker(&w, a, LeaseConfig::default()),
        locker(&w, b, LeaseConfig::default()),
    );
    let gb = acquire(&w, &journal, b, &lb, "x", Mode::Shared, Wait::Forever);
    assert!(run_until(&mut w, SEC, |_| holds(&gb)));
    {
        let la = la.clone();
        w.spawn(a, async move {
            let join = la.acquire("x", lockgate::AcquireOptions::shared());
            // Cancelled while the join's answer is awaited.
            let _ = tokio::time::timeout(ms(500), join).await;
        });
    }
    w.run_for(10 * SEC);
    let rec = record(&w, "x").expect("the record");
    if rec["SharedHoldersCount"] != 1 {
        fail(&w, &journal, &format!("A's join was not given back: {rec}"));
    }
    check(&w, &journal);
}

/// The double give-back (regression test for 60aa506). B is handed the lock by A's release
/// while B's host is suspended; it wakes past the deadline its queue entry set, so its
/// acquisition gives the grant back (handing it on to C) in a task. While that give-back write
/// is in flight (held by the network), B's acquisition future is dropped. Then a Go v0.2
/// waiter queues, rewriting the record without `Holders`. What must hold: the grant is given
/// back by one write only, never by a second one started by the cancellation (before 60aa506
/// that one, rebuilt on the record Go rewrote, took C's lease for B's and freed it, and the Go
/// peer took the lock while C held it); C keeps its lease, the Go peer waits, and the journal
/// finds nothing.
#[test]
fn a_grant_given_back_as_too_late_is_given_back_once_when_the_acquisition_is_dropped() {
    use lockgate_testenv::sim::go::{GoBelief, GoError, GoPeer, Version};
    use lockgate_testenv::sim::journal::Belief;
    use lockgate_testenv::sim::world::host_now;

    #[derive(Default)]
    struct S {
        b: Option<usize>,
        /// B's writes that give up the last share of x (a release or a give-back): when each
        /// was sent, and its body.
        give_backs: Vec<(Duration, Vec<u8>)>,
    }
    let state = Arc::new(std::sync::Mutex::new(S::default()));
    let st = Arc::clone(&state);
    let mut w = world(move |_, v| {
        let mut s = st.lock().unwrap();
        if Some(v.host) != s.b || !record_changes(v.req).iter().any(|c| c.last_release()) {
            return None;
        }
        s.give_backs.push((v.sent, v.req.body.clone()));
        match s.give_backs.len() {
            // The give-back is in flight when the acquisition is dropped: held until B's next
            // read (or `hold_max`).
            1 => Some(Plan {
                there: ms(1),
                hold: true,
                before: Before::Handle,
                after: After::Deliver(ms(1)),
            }),
            // A second one (the old code's, started by the drop) crawls to the server, so that
            // the Go peer's rewrite comes first; what it does next goes as it would.
            2 => Some(Plan::clean(2 * SEC, ms(1))),
            _ => None,
        }
    });
    w.hold_max = 2 * SEC;
    let journal = Journal::default();
    {
        let journal = journal.clone();
        w.observe(move |now, annotations, snapshots| {
            journal.check_counts(now, annotations, snapshots);
        });
    }
    let lease = quiet();
    let (a, b, c, g) = (
        w.add_host("a"),
        w.add_host("b"),
        w.add_host("c"),
        w.add_host("go"),
    );
    state.lock().unwrap().b = Some(b);
    let (la, lb, lc) = (
        locker(&w, a, lease),
        locker(&w, b, lease),
        locker(&w, c, lease),
    );
    let queued = |w: &World| {
        record(w, "x")
            .and_then(|r| r["QueueMembers"].as_object().map(|q| q.len()))
            .unwrap_or(0)
    };
    // The Holders entries of x naming a `Handoff`.
    let handed = |w: &World| -> Vec<String> {
        record(w, "x")
            .and_then(|r| {
                r["Holders"].as_object().map(|h| {
                    h.iter()
                        .filter(|(_, e)| e.get("Handoff").is_some())
                        .map(|(id, _)| id.clone())
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    let ga = acquire(&w, &journal, a, &la, "x", Mode::Exclusive, Wait::Forever);
    assert!(run_until(&mut w, SEC, |_| holds(&ga)));
    // B waits (until its future is dropped), C a second behind it.
    let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
    let b_outcome = Arc::new(std::sync::Mutex::new(None::<String>));
    {
        let (lb, out) = (lb.clone(), Arc::clone(&b_outcome));
        w.spawn(b, async move {
            tokio::select! {
                biased;
                _ = cancelled => {}
                r = lb.acquire("x", lockgate::AcquireOptions::exclusive()) => {
                    *out.lock().unwrap() = Some(match r {
                        Ok(_) => "acquired".into(),
                        Err(e) => e.to_string(),
                    });
                }
            }
        });
    }
    assert!(run_until(&mut w, SEC, |w| queued(w) == 1), "B queued");
    w.run_for(SEC);
    let gc = acquire(&w, &journal, c, &lc, "x", Mode::Exclusive, Wait::Forever);
    assert!(run_until(&mut w, SEC, |w| queued(w) == 2), "C queued");
    // B's machine sleeps across A's release, which hands B the lock.
    w.suspend(b);
    w.run_for(SEC);
    let released = release(&w, &journal, a, &ga);
    assert!(run_until(&mut w, SEC, |_| done(&released)));
    let to_b = handed(&w);
    assert_eq!(
        to_b.len(),
        1,
        "A's release handed the lock on: {:?}",
        record(&w, "x")
    );
    // B wakes past its grant's deadline (its entry was sent at about 0 s, + 25 s), before C
    // could take the unrenewed grant over (a TTL, 30 s, after the release at about 2 s).
    w.run_until(28 * SEC);
    w.resume(b);
    if !run_until(&mut w, SEC, |_| {
        !state.lock().unwrap().give_backs.is_empty()
    }) {
        fail(&w, &journal, "B did not give its late grant back");
    }
    // The give-back is in flight: B's acquisition is dropped.
    cancel.send(()).expect("B's acquisition still runs");
    if !run_until(&mut w, 3 * SEC, |w| {
        handed(w).iter().any(|id| !to_b.contains(id)) && holds(&gc)
    }) {
        fail(&w, &journal, "the give-back did not hand the lock on to C");
    }
    let c_uuid = record(&w, "x").expect("the record")["uuid"].clone();
    // A Go v0.2 waiter queues: its `UpdateQueue` writes the record back without `Holders`.
    w.run_for(ms(300));
    let go_granted = Arc::new(AtomicBool::new(false));
    {
        let client = w.client(g);
        let mut peer = w.enter_host(g, || {
            GoPeer::new(
                Version::V020,
                client,
                lockgate_testenv::sim::api::NAMESPACE,
                OBJECT,
                lockgate_testenv::sim::rng::Rng::new(11),
            )
        });
        peer.acquirer_id = Some("go-acquirer".into());
        let (journal, started, granted) = (
            journal.clone(),
            w.host(g).started(),
            Arc::clone(&go_granted),
        );
        w.spawn(g, async move {
            loop {
                match peer.try_acquire("x", false).await {
                    Ok(uuid) => {
                        let now = host_now().unwrap_or_default();
                        // Go believes it holds until the expiry it wrote (now + 10 s, whole
                        // seconds), and renews nothing here.
                        let belief = GoBelief {
                            uuid,
                            until: std::sync::atomic::AtomicU64::new(
                                (now + 9 * SEC).as_nanos() as u64
                            ),
                            ..GoBelief::default()
                        };
                        journal.grant_belief(
                            "go/x",
                            g,
                            started,
                            now,
                            "x",
                            Mode::Exclusive,
                            None,
                            Belief::Go(Arc::new(belief)),
                        );
                        granted.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(GoError::ShouldWait) => {}
                    Err(e) => journal.go_error(format!("{e:?}")),
                }
                tokio::time::sleep(2 * SEC).await;
            }
        });
    }
    if !run_until(&mut w, 2 * SEC, |w| {
        record(w, "x").is_some_and(|r| r.get("Holders").is_none())
    }) {
        fail(&w, &journal, "the Go peer did not rewrite the record");
    }
    // Long enough for a second give-back to land, and for the Go peer to poll a few times.
    w.run_for(10 * SEC);
    let give_backs = state.lock().unwrap().give_backs.clone();
    if give_backs.len() != 1 {
        fail(
            &w,
            &journal,
            &format!(
                "B's late grant was given back by {} writes, not one (sent at {:?})",
                give_backs.len(),
                give_backs.iter().map(|(t, _)| *t).collect::<Vec<_>>()
            ),
        );
    }
    check(&w, &journal);
    if go_granted.load(Ordering::SeqCst) {
        fail(&w, &journal, "the Go peer got the lock while C held it");
    }
    if !holds(&gc) || w.as_host(c, || gc.lock().unwrap().guard.as_ref().unwrap().is_lost()) {
        fail(&w, &journal, "C lost its lease");
    }
    let rec = record(&w, "x").expect("the record");
    if rec["uuid"] != c_uuid || rec["SharedHoldersCount"] != 1 {
        fail(&w, &journal, &format!("the record is not C's lease: {rec}"));
    }
    let b_outcome = b_outcome.lock().unwrap().clone();
    assert_eq!(
        b_outcome, None,
        "B's acquisition was to be dropped, not to end"
    );
}

/// Writes, the release bullet: A's release (which hands the lock to the waiting B) is lost on
/// the way to the server; A's read shows the record unchanged, and A sends the same write
/// again, which the server, busy with other writers, handles and answers 5 s later: past the
/// request timeout (3 s), well within the lease (30 s). What must hold: only that same write,
/// byte for byte, is sent again, and A waits for its late answer instead of cutting it off;
/// the release then ends Ok, and B holds the lock, handed by that write, promptly after it
/// lands (not a TTL later, by a takeover); the journal finds nothing.
#[test]
fn a_repeated_release_waits_for_the_late_answer_of_a_slow_server() {
    const LATE: Duration = Duration::from_secs(5);

    #[derive(Default)]
    struct S {
        a: Option<usize>,
        releasing: bool,
        /// A's requests while releasing (not its watch): method, when sent, body.
        sent: Vec<(http::Method, Duration, Vec<u8>)>,
        /// The records A's first release write changes.
        first_write: Vec<lockgate_testenv::sim::script::RecordChange>,
    }
    let state = Arc::new(std::sync::Mutex::new(S::default()));
    let st = Arc::clone(&state);
    let mut w = world(move |_, v| {
        let mut s = st.lock().unwrap();
        if Some(v.host) != s.a || !s.releasing || v.req.is_watch() {
            return None;
        }
        s.sent
            .push((v.req.method.clone(), v.sent, v.req.body.clone()));
        if v.req.method != http::Method::PATCH {
            return None;
        }
        let writes = s
            .sent
            .iter()
            .filter(|(m, _, _)| *m == http::Method::PATCH)
            .count();
        if writes == 1 {
            s.first_write = record_changes(v.req);
        }
        Some(if writes == 1 {
            // The first release write is lost on the way: never applied, never answered.
            Plan {
                there: ms(1),
                hold: false,
                before: Before::Drop,
                after: After::Lose,
            }
        } else {
            // Any repeat reaches the server's handling only after `LATE`, and is answered then.
            Plan::clean(LATE, ms(1))
        })
    });
    let journal = Journal::default();
    {
        let journal = journal.clone();
        w.observe(move |now, annotations, snapshots| {
            journal.check_counts(now, annotations, snapshots);
        });
    }
    let lease = quiet();
    let (a, b) = (w.add_host("a"), w.add_host("b"));
    state.lock().unwrap().a = Some(a);
    let (la, lb) = (locker(&w, a, lease), locker(&w, b, lease));
    let ga = acquire(&w, &journal, a, &la, "x", Mode::Exclusive, Wait::Forever);
    assert!(run_until(&mut w, SEC, |_| holds(&ga)));
    let gb = acquire(&w, &journal, b, &lb, "x", Mode::Exclusive, Wait::Forever);
    assert!(
        run_until(&mut w, SEC, |w| record(w, "x")
            .is_some_and(|r| r["QueueMembers"]
                .as_object()
                .is_some_and(|q| !q.is_empty()))),
        "B queued"
    );
    w.run_for(ms(200));
    let held = record(&w, "x").expect("the record");
    state.lock().unwrap().releasing = true;
    let released = release(&w, &journal, a, &ga);
    // A's request timeout (3 s), its read, its repeat, and the repeat's late answer.
    let mut released_at = None;
    let mut b_at = None;
    let end = w.now + 20 * SEC;
    while w.now < end && (released_at.is_none() || b_at.is_none()) {
        w.run_for(ms(1));
        if released_at.is_none() && done(&released) {
            released_at = Some(w.now);
        }
        if b_at.is_none() && holds(&gb) {
            b_at = Some(w.now);
        }
    }
    let sent = state.lock().unwrap().sent.clone();
    let writes: Vec<&(http::Method, Duration, Vec<u8>)> = sent
        .iter()
        .filter(|(m, _, _)| *m == http::Method::PATCH)
        .collect();
    let shape: Vec<String> = sent
        .iter()
        .map(|(m, t, _)| format!("{m} at {t:?}"))
        .collect();
    if writes.len() != 2 || writes.iter().any(|(_, _, body)| *body != writes[0].2) {
        fail(
            &w,
            &journal,
            &format!("A's release was not one write sent again once, byte for byte: {shape:?}"),
        );
    }
    // The repeat came after a read that showed the record as the write tests it.
    let (first, repeat) = (writes[0].1, writes[1].1);
    if !sent
        .iter()
        .any(|(m, t, _)| *m == http::Method::GET && *t > first && *t < repeat)
    {
        fail(
            &w,
            &journal,
            &format!("A repeated its release without a read: {shape:?}"),
        );
    }
    let changes = state.lock().unwrap().first_write.clone();
    assert_eq!(
        changes.first().and_then(|c| c.old.clone()),
        Some(held),
        "the release tests the record A held"
    );
    assert!(
        changes.iter().any(|c| c.hands_off()),
        "the release hands the lock to B"
    );
    let landed = repeat + LATE;
    let Some(released_at) = released_at else {
        fail(&w, &journal, "A's release did not end");
    };
    if let Some(e) = released.lock().unwrap().error.clone() {
        fail(&w, &journal, &format!("A's release failed: {e}"));
    }
    if released_at < landed || released_at > landed + ms(50) {
        fail(
            &w,
            &journal,
            &format!(
                "A's release ended at {released_at:?}, not as its repeat was answered ({landed:?})"
            ),
        );
    }
    match b_at {
        Some(t) if t <= landed + ms(50) => {}
        other => fail(
            &w,
            &journal,
            &format!("B did not hold the lock as the repeat landed ({landed:?}): {other:?}"),
        ),
    }
    let rec = record(&w, "x").expect("the record");
    if rec["SharedHoldersCount"] != 1
        || !rec["Holders"]
            .as_object()
            .is_some_and(|h| h.values().any(|e| e.get("Handoff").is_some()))
    {
        fail(
            &w,
            &journal,
            &format!("the record is not handed to B: {rec}"),
        );
    }
    w.run_for(5 * SEC);
    check(&w, &journal);
    if w.as_host(b, || gb.lock().unwrap().guard.as_ref().unwrap().is_lost()) {
        fail(&w, &journal, "B lost its lease");
    }
}
