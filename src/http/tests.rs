//! The client against the server of this crate, in one process over real sockets.

use std::sync::Arc;
use std::time::Duration;

use crate::server::{MemoryConfig, MemoryStore, Server, ServerConfig};
use crate::{AcquireError, AcquireOptions, Error, HttpConfig, HttpLocker, Locker, LostReason};

/// A server on a free port; dropping the sender stops it.
async fn server(config: ServerConfig) -> (String, tokio::sync::oneshot::Sender<()>) {
    let store = Arc::new(MemoryStore::new(MemoryConfig::default().grace(Duration::ZERO)).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(Server::new(store, config).unwrap().serve(listener, async {
        let _ = stopped.await;
    }));
    (format!("http://{addr}"), stop)
}

async fn locker(url: &str, config: HttpConfig) -> Locker {
    Locker::new(HttpLocker::connect(url, config).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_times_out_hands_off_and_loses_leases_with_the_server() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (url, stop) = server(ServerConfig::default()).await;
        let a = locker(&url, HttpConfig::default()).await;
        let b = locker(&url, HttpConfig::default()).await;
        let held = a.acquire("x", AcquireOptions::exclusive()).await.unwrap();
        let first = held.fencing_token().unwrap();
        assert!(matches!(
            b.acquire("x", AcquireOptions::shared().non_blocking()).await,
            Err(AcquireError::WouldBlock { .. })
        ));
        let e = b
            .acquire(
                "x",
                AcquireOptions::exclusive().timeout(Duration::from_millis(300)),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, AcquireError::TimedOut { waited, .. } if waited >= Duration::from_millis(300)),
            "{e:?}"
        );
        // A waiter (long poll) gets the lock at the release.
        let waiter = tokio::spawn(async move {
            b.acquire("x", AcquireOptions::exclusive()).await.unwrap()
        });
        let status = HttpLocker::connect(&url, HttpConfig::default()).await.unwrap();
        while !status
            .status()
            .await
            .unwrap()
            .locks
            .first()
            .is_some_and(|l| l.waiters.first().is_some_and(|w| w.long_poll))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        held.release().await.unwrap();
        let got = waiter.await.unwrap();
        assert!(got.fencing_token().unwrap() > first);
        // The server stops: its leases end; the holder is told at its next renewal.
        let mut lost = got.lost_signal();
        drop(stop);
        let reason = tokio::time::timeout(Duration::from_secs(9), lost.lost())
            .await
            .expect("lost within the renewal deadline");
        assert!(
            matches!(reason, LostReason::Gone | LostReason::RenewalFailed),
            "{reason:?}"
        );
        assert!(matches!(got.release().await, Err(Error::LeaseLost { .. })));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_required_and_never_shown() {
    let (url, _stop) = server(ServerConfig::default().token("s3cret")).await;
    let e = locker(&url, HttpConfig::default().token("wrong"))
        .await
        .acquire("t", AcquireOptions::exclusive())
        .await
        .unwrap_err();
    assert!(
        matches!(e, AcquireError::Failed(Error::Unauthorized { .. })),
        "{e:?}"
    );
    let with_password = url.replace("http://", "http://lockgate:s3cret@");
    let g = locker(&with_password, HttpConfig::default())
        .await
        .acquire("t", AcquireOptions::exclusive())
        .await
        .unwrap();
    g.release().await.unwrap();
    let debug = format!("{:?}", HttpConfig::default().token("s3cret"));
    assert!(!debug.contains("s3cret"), "{debug}");
}

#[test]
fn the_blocking_api_runs_on_its_own_runtime() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, stop) = rt.block_on(server(ServerConfig::default()));
    let l = Locker::new(HttpLocker::connect_blocking(&url, HttpConfig::default()).unwrap());
    let g = l
        .acquire_blocking("b", AcquireOptions::exclusive())
        .unwrap();
    assert!(matches!(
        l.acquire_blocking("b", AcquireOptions::exclusive().non_blocking()),
        Err(AcquireError::WouldBlock { .. })
    ));
    g.release_blocking().unwrap();
    drop(stop);
}
