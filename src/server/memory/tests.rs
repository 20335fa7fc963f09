//! The memory store's rules, on Tokio's paused clock: every timing is exact.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use super::state::SWEEP_EVERY;
use super::*;
use crate::server::store::{Capacity, Grant};
use crate::{LockName, Mode};
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(10);

fn store() -> Arc<MemoryStore> {
    Arc::new(MemoryStore::new(MemoryConfig::default().ttl(TTL).grace(Duration::ZERO)).unwrap())
}

fn spec(name: &str, mode: Mode) -> AcquireSpec {
    AcquireSpec::new(LockName::new(name).unwrap(), mode)
}

fn lease(name: &str, grant: &Grant) -> LeaseRef {
    LeaseRef {
        name: LockName::new(name).unwrap(),
        uuid: grant.uuid,
    }
}

async fn granted(store: &MemoryStore, spec: AcquireSpec) -> Grant {
    match store.acquire(spec).await.unwrap() {
        Acquired::Granted(g) => g,
        Acquired::ShouldWait => panic!("expected a grant"),
    }
}

async fn busy(store: &MemoryStore, spec: AcquireSpec) {
    assert_eq!(store.acquire(spec).await.unwrap(), Acquired::ShouldWait);
}

type Pending = Pin<Box<dyn Future<Output = Result<Acquired, StoreError>> + Send>>;

/// Starts a long poll and checks it is queued (not answered).
async fn wait(store: &Arc<MemoryStore>, spec: AcquireSpec) -> Pending {
    let s = store.clone();
    let mut fut: Pending =
        Box::pin(async move { s.acquire(spec.wait(Duration::from_secs(3600))).await });
    assert!(poll_once(&mut fut).await.is_none(), "answered at once");
    fut
}

async fn poll_once(fut: &mut Pending) -> Option<Result<Acquired, StoreError>> {
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// The long poll's answer, which must already be there (no time passes).
async fn answered(fut: &mut Pending) -> Grant {
    tokio::task::yield_now().await;
    match poll_once(fut).await {
        Some(Ok(Acquired::Granted(g))) => g,
        other => panic!("expected a grant, got {other:?}"),
    }
}

async fn still_waiting(fut: &mut Pending) {
    tokio::task::yield_now().await;
    assert!(poll_once(fut).await.is_none(), "granted too early");
}

#[tokio::test(start_paused = true)]
async fn release_hands_the_lock_to_the_waiter_at_once() {
    let s = store();
    let a = granted(&s, spec("l", Mode::Exclusive)).await;
    busy(&s, spec("l", Mode::Exclusive)).await;
    busy(&s, spec("l", Mode::Shared)).await;
    let mut w = wait(&s, spec("l", Mode::Exclusive)).await;
    s.release(lease("l", &a)).await.unwrap();
    let b = answered(&mut w).await;
    assert!(b.fencing_token > a.fencing_token);
    assert_ne!(b.uuid, a.uuid);
    assert_eq!(s.stats().leases, 1);
    assert_eq!(s.stats().waiters, 0);
}

#[tokio::test(start_paused = true)]
async fn a_queued_writer_stops_later_readers_and_readers_go_together() {
    let s = store();
    let r1 = granted(&s, spec("l", Mode::Shared)).await;
    let mut x = wait(&s, spec("l", Mode::Exclusive)).await;
    // A reader arriving after the queued writer does not overtake it.
    busy(&s, spec("l", Mode::Shared)).await;
    let mut r2 = wait(&s, spec("l", Mode::Shared)).await;
    let mut r3 = wait(&s, spec("l", Mode::Shared)).await;
    let mut x2 = wait(&s, spec("l", Mode::Exclusive)).await;
    s.release(lease("l", &r1)).await.unwrap();
    let xg = answered(&mut x).await;
    still_waiting(&mut r2).await;
    s.release(lease("l", &xg)).await.unwrap();
    // Consecutive readers are granted together; the writer behind them waits.
    let g2 = answered(&mut r2).await;
    let g3 = answered(&mut r3).await;
    still_waiting(&mut x2).await;
    s.release(lease("l", &g2)).await.unwrap();
    still_waiting(&mut x2).await;
    s.release(lease("l", &g3)).await.unwrap();
    answered(&mut x2).await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_expires_one_ttl_after_its_last_renewal_and_not_before() {
    let s = store();
    let a = granted(&s, spec("l", Mode::Exclusive)).await;
    let mut w = wait(&s, spec("l", Mode::Exclusive)).await;
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(s.renew(lease("l", &a)).await.unwrap(), TTL);
    tokio::time::advance(TTL - Duration::from_millis(1)).await;
    still_waiting(&mut w).await;
    tokio::time::advance(Duration::from_millis(2)).await;
    answered(&mut w).await;
    assert!(matches!(
        s.renew(lease("l", &a)).await,
        Err(StoreError::AlreadyLeased)
    ));
    assert_eq!(s.stats().lease_expiries, 1);
}

#[tokio::test(start_paused = true)]
async fn renew_and_release_of_unknown_or_ended_leases_fail_like_go() {
    let s = store();
    let nobody = LeaseRef {
        name: LockName::new("l").unwrap(),
        uuid: Uuid::new_v4(),
    };
    assert!(matches!(
        s.renew(nobody.clone()).await,
        Err(StoreError::NoLease)
    ));
    let a = granted(&s, spec("l", Mode::Exclusive)).await;
    assert!(matches!(
        s.release(nobody.clone()).await,
        Err(StoreError::AlreadyLeased)
    ));
    s.release(lease("l", &a)).await.unwrap();
    assert!(matches!(
        s.release(lease("l", &a)).await,
        Err(StoreError::NoLease)
    ));
    assert!(matches!(
        s.renew(lease("l", &a)).await,
        Err(StoreError::NoLease)
    ));
}

#[tokio::test(start_paused = true)]
async fn every_shared_holder_has_its_own_lease() {
    let s = store();
    let a = granted(&s, spec("l", Mode::Shared)).await;
    tokio::time::advance(Duration::from_secs(5)).await;
    let b = granted(&s, spec("l", Mode::Shared)).await;
    assert_ne!(a.uuid, b.uuid);
    // Only b renews: a's lease ends on its own, b's goes on.
    tokio::time::advance(Duration::from_secs(6)).await;
    s.renew(lease("l", &b)).await.unwrap();
    assert!(s.renew(lease("l", &a)).await.is_err());
    let st = s.status(StatusQuery::one("l")).await.unwrap();
    assert_eq!(st.locks[0].holders.len(), 1);
    assert_eq!(st.locks[0].holders[0].fencing_token, b.fencing_token);
}

#[tokio::test(start_paused = true)]
async fn a_poller_with_an_acquirer_id_keeps_its_place_and_gets_the_lock_kept_for_it() {
    let s = store();
    let id = AcquirerId::new("go-v0.2-poller").unwrap();
    let h = granted(&s, spec("l", Mode::Exclusive)).await;
    busy(&s, spec("l", Mode::Exclusive).acquirer_id(id.clone())).await;
    let mut later = wait(&s, spec("l", Mode::Exclusive)).await;
    s.release(lease("l", &h)).await.unwrap();
    // The poller is first: the lock waits for its next poll, the long poll behind it too.
    still_waiting(&mut later).await;
    busy(&s, spec("l", Mode::Exclusive)).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    let p = granted(&s, spec("l", Mode::Exclusive).acquirer_id(id)).await;
    still_waiting(&mut later).await;
    s.release(lease("l", &p)).await.unwrap();
    answered(&mut later).await;
}

#[tokio::test(start_paused = true)]
async fn a_poller_that_stops_asking_loses_its_place_after_a_ttl() {
    let s = store();
    let h = granted(&s, spec("l", Mode::Exclusive)).await;
    let id = AcquirerId::new("gone").unwrap();
    busy(&s, spec("l", Mode::Exclusive).acquirer_id(id.clone())).await;
    let mut later = wait(&s, spec("l", Mode::Exclusive)).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    busy(&s, spec("l", Mode::Exclusive).acquirer_id(id)).await; // last poll
    s.release(lease("l", &h)).await.unwrap();
    tokio::time::advance(TTL - Duration::from_millis(1)).await;
    still_waiting(&mut later).await;
    tokio::time::advance(Duration::from_millis(2)).await;
    answered(&mut later).await;
    assert_eq!(s.stats().place_expiries, 1);
}

#[tokio::test(start_paused = true)]
async fn a_shared_poller_first_in_line_lets_other_readers_in() {
    let s = store();
    let h = granted(&s, spec("l", Mode::Exclusive)).await;
    let id = AcquirerId::new("reader").unwrap();
    busy(&s, spec("l", Mode::Shared).acquirer_id(id.clone())).await;
    let mut r = wait(&s, spec("l", Mode::Shared)).await;
    s.release(lease("l", &h)).await.unwrap();
    answered(&mut r).await;
    granted(&s, spec("l", Mode::Shared).acquirer_id(id)).await;
}

#[tokio::test(start_paused = true)]
async fn a_request_without_id_that_does_not_wait_never_overtakes_the_queue() {
    let s = store();
    let h = granted(&s, spec("l", Mode::Shared)).await;
    let mut x = wait(&s, spec("l", Mode::Exclusive)).await;
    busy(&s, spec("l", Mode::Shared)).await;
    s.release(lease("l", &h)).await.unwrap();
    let xg = answered(&mut x).await;
    busy(&s, spec("l", Mode::Shared)).await;
    s.release(lease("l", &xg)).await.unwrap();
    granted(&s, spec("l", Mode::Shared)).await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_wait_leaves_the_queue_and_a_timed_out_one_with_an_id_keeps_its_place() {
    let s = store();
    let h = granted(&s, spec("l", Mode::Exclusive)).await;
    let w = wait(&s, spec("l", Mode::Exclusive)).await;
    assert_eq!(s.stats().waiters, 1);
    drop(w);
    assert_eq!(s.stats().waiters, 0);

    let id = AcquirerId::new("me").unwrap();
    let r = s
        .acquire(
            spec("l", Mode::Exclusive)
                .acquirer_id(id.clone())
                .wait(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    assert_eq!(r, Acquired::ShouldWait);
    let mut other = wait(&s, spec("l", Mode::Exclusive)).await;
    s.release(lease("l", &h)).await.unwrap();
    // "me" timed out but is first: the lock is kept for it.
    still_waiting(&mut other).await;
    let mine = granted(
        &s,
        spec("l", Mode::Exclusive)
            .acquirer_id(id)
            .wait(Duration::from_secs(1)),
    )
    .await;
    s.release(lease("l", &mine)).await.unwrap();
    answered(&mut other).await;
}

#[tokio::test(start_paused = true)]
async fn a_grant_landing_on_a_cancelled_wait_is_released() {
    let s = store();
    let h = granted(&s, spec("l", Mode::Exclusive)).await;
    let w = wait(&s, spec("l", Mode::Exclusive)).await;
    // The grant lands in the channel, then the request goes away before reading it.
    s.release(lease("l", &h)).await.unwrap();
    assert_eq!(s.stats().leases, 1);
    drop(w);
    assert_eq!(s.stats().leases, 0);
    granted(&s, spec("l", Mode::Exclusive)).await;
}

#[tokio::test(start_paused = true)]
async fn fencing_tokens_strictly_increase_per_lock() {
    let s = store();
    let mut last = 0;
    for i in 0..50 {
        let mode = if i % 3 == 0 {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        let g = granted(&s, spec("l", mode)).await;
        assert!(g.fencing_token > last);
        last = g.fencing_token;
        s.release(lease("l", &g)).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn caps_refuse_with_a_clear_error() {
    let s = Arc::new(
        MemoryStore::new(
            MemoryConfig::default()
                .grace(Duration::ZERO)
                .max_held(2)
                .max_waiters(1),
        )
        .unwrap(),
    );
    let a = granted(&s, spec("a", Mode::Exclusive)).await;
    granted(&s, spec("b", Mode::Exclusive)).await;
    let e = s.acquire(spec("c", Mode::Exclusive)).await.unwrap_err();
    assert!(matches!(e, StoreError::Capacity(Capacity::Held { max: 2 })));
    assert!(e.to_string().contains("holds 2 leases"), "{e}");
    let _w = wait(&s, spec("a", Mode::Exclusive)).await;
    let e = s
        .acquire(spec("b", Mode::Exclusive).wait(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(matches!(
        e,
        StoreError::Capacity(Capacity::Waiters { max: 1 })
    ));
    // Other locks are untouched.
    s.renew(lease("a", &a)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn nothing_is_granted_during_the_start_up_grace() {
    let s = Arc::new(MemoryStore::new(MemoryConfig::default().ttl(TTL).grace(TTL)).unwrap());
    assert_eq!(s.grace_remaining(), Some(TTL));
    busy(&s, spec("l", Mode::Exclusive)).await;
    let mut w = wait(&s, spec("l", Mode::Exclusive)).await;
    tokio::time::advance(TTL - Duration::from_millis(1)).await;
    still_waiting(&mut w).await;
    tokio::time::advance(Duration::from_millis(2)).await;
    answered(&mut w).await;
    assert_eq!(s.grace_remaining(), None);
}

#[tokio::test(start_paused = true)]
async fn closing_ends_waits_and_leases_but_lets_releases_through() {
    let s = store();
    let a = granted(&s, spec("l", Mode::Exclusive)).await;
    let b = granted(&s, spec("m", Mode::Exclusive)).await;
    let mut w = wait(&s, spec("l", Mode::Exclusive)).await;
    s.close();
    tokio::task::yield_now().await;
    assert!(matches!(
        poll_once(&mut w).await,
        Some(Err(StoreError::ShuttingDown))
    ));
    assert!(matches!(
        s.acquire(spec("n", Mode::Exclusive)).await,
        Err(StoreError::ShuttingDown)
    ));
    assert!(matches!(
        s.renew(lease("l", &a)).await,
        Err(StoreError::NoLease)
    ));
    s.release(lease("m", &b)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn status_lists_holders_and_waiters_in_order() {
    let s = store();
    granted(&s, spec("b", Mode::Shared)).await;
    let _w = wait(&s, spec("b", Mode::Exclusive)).await;
    busy(
        &s,
        spec("b", Mode::Shared).acquirer_id(AcquirerId::new("p").unwrap()),
    )
    .await;
    granted(&s, spec("a", Mode::Exclusive)).await;
    let st = s.status(StatusQuery::all(10)).await.unwrap();
    assert_eq!(st.total, 2);
    assert_eq!(st.locks[0].lock_name, "a");
    let b = &st.locks[1];
    assert_eq!(b.mode, Some(Mode::Shared));
    assert_eq!(b.waiters.len(), 2);
    assert!(b.waiters[0].long_poll);
    assert_eq!(b.waiters[1].acquirer_id.as_deref(), Some("p"));
    assert_eq!(b.waiters[1].place_expires_in_ms, Some(10_000));
    let st = s.status(StatusQuery::all(1)).await.unwrap();
    assert!(st.truncated);
    assert_eq!(st.locks.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn freed_locks_leave_no_state_behind() {
    let s = store();
    for i in 0..100 {
        let name = format!("l{i}");
        let g = granted(&s, spec(&name, Mode::Exclusive)).await;
        s.release(lease(&name, &g)).await.unwrap();
    }
    // A lease nobody renews nor releases.
    granted(&s, spec("x", Mode::Exclusive)).await;
    tokio::task::yield_now().await; // the expiry tasks start
    tokio::time::advance(TTL + SWEEP_EVERY * 2).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let total: usize = s
        .inner
        .shards
        .iter()
        .map(|sh| lock_mutex(&sh.state).locks.len())
        .sum();
    assert_eq!(total, 0);
    assert_eq!(s.stats().leases, 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_acquirer_leaves_the_queue_at_once() {
    let s = store();
    let poller = AcquirerId::new("gave-up").unwrap();
    let long = AcquirerId::new("long-poll").unwrap();
    let h = granted(&s, spec("l", Mode::Exclusive)).await;
    busy(&s, spec("l", Mode::Exclusive).acquirer_id(poller.clone())).await;
    let mut open = wait(&s, spec("l", Mode::Exclusive).acquirer_id(long.clone())).await;
    let mut later = wait(&s, spec("l", Mode::Exclusive)).await;
    // The open long poll is answered `should wait`; its place goes.
    s.cancel(LockName::new("l").unwrap(), long).await.unwrap();
    tokio::task::yield_now().await;
    assert!(matches!(
        poll_once(&mut open).await,
        Some(Ok(Acquired::ShouldWait))
    ));
    // The poller between polls gives up too: the lock is not kept for it at the release.
    s.cancel(LockName::new("l").unwrap(), poller).await.unwrap();
    s.release(lease("l", &h)).await.unwrap();
    answered(&mut later).await;
    // Unknown acquirers and locks are no error.
    s.cancel(
        LockName::new("nobody").unwrap(),
        AcquirerId::new("x").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(s.stats().waiters, 0);
}

/// Issue 18: a long poll that checked the closed flag just before `close` and queued just after
/// `close` had gone through its shard was never answered. Spins of varying length put `close`
/// at every point of the acquisitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_poll_that_starts_as_the_store_closes_is_answered() {
    for round in 0..20_000u32 {
        let s = Arc::new(MemoryStore::new(MemoryConfig::default().grace(Duration::ZERO)).unwrap());
        let _h = granted(&s, spec("busy", Mode::Exclusive)).await;
        let polls: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.acquire(spec("busy", Mode::Exclusive).wait(Duration::from_secs(60)))
                        .await
                })
            })
            .collect();
        for _ in 0..(round % 64) * 20 {
            std::hint::spin_loop();
        }
        s.close();
        for p in polls {
            let r = tokio::time::timeout(Duration::from_secs(5), p)
                .await
                .expect("a long poll that started as the store closed was never answered");
            assert!(matches!(r.unwrap(), Err(StoreError::ShuttingDown)));
        }
    }
}

/// Issue 18: a TTL of zero was accepted (every lease expired at once) and a huge one panicked.
#[test]
fn impossible_settings_are_typed_errors() {
    use crate::server::ConfigError;
    for config in [
        MemoryConfig::default().ttl(Duration::ZERO),
        MemoryConfig::default().ttl(Duration::MAX),
        MemoryConfig::default().grace(Duration::MAX),
        MemoryConfig::default().max_waiters_per_lock(0),
    ] {
        let e = MemoryStore::new(config).unwrap_err();
        assert!(
            matches!(e, ConfigError::OutOfRange { .. } | ConfigError::Zero { .. }),
            "{e:?}"
        );
    }
}

/// Waiters count against their client; a client over its cap leaves the others their places.
#[tokio::test(start_paused = true)]
async fn a_client_over_its_waiter_cap_leaves_the_others_their_places() {
    let s = Arc::new(
        MemoryStore::new(
            MemoryConfig::default()
                .grace(Duration::ZERO)
                .max_waiters_per_client(2),
        )
        .unwrap(),
    );
    let _h = granted(&s, spec("l", Mode::Exclusive)).await;
    let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
    let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();
    let mut w1 = wait(&s, spec("l", Mode::Exclusive).client(a)).await;
    let _w2 = wait(&s, spec("l", Mode::Exclusive).client(a)).await;
    let e = s
        .acquire(
            spec("l", Mode::Exclusive)
                .client(a)
                .wait(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        e,
        StoreError::Capacity(Capacity::ClientWaiters { max: 2 })
    ));
    let _w3 = wait(&s, spec("l", Mode::Exclusive).client(b)).await;
    // A place given up is the client's again.
    drop(std::mem::replace(&mut w1, Box::pin(std::future::pending())));
    let _w4 = wait(&s, spec("l", Mode::Exclusive).client(a)).await;
    assert_eq!(s.stats().waiters, 3);
}
