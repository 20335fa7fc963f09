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
