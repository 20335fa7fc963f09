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
        let released = got.release().await;
        assert!(
            matches!(released, Err(Error::LeaseLost { .. })),
            "{released:?} after {reason:?}"
        );
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

/// A fake lock server whose shared holders share one handle (as Go's server and lockgate's
/// Kubernetes store do), counting releases; the first `/release` is answered `status` (a
/// proxy's 503 after forwarding, when `applied_before_refusing`), with lockgate's `code` if given.
async fn counting_server(
    status: u16,
    code: Option<&'static str>,
    applied_before_refusing: bool,
) -> (String, Arc<std::sync::atomic::AtomicI64>) {
    fake_server(
        status,
        code,
        applied_before_refusing,
        r#"{"err":""}"#,
        10_000,
    )
    .await
}

/// [`counting_server`], answering renewals with `renew_body` and granting `ttl_ms` leases.
async fn fake_server(
    status: u16,
    code: Option<&'static str>,
    applied_before_refusing: bool,
    renew_body: &'static str,
    ttl_ms: u64,
) -> (String, Arc<std::sync::atomic::AtomicI64>) {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    let count = Arc::new(AtomicI64::new(0));
    let refused = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = Arc::clone(&count);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (c, refused) = (Arc::clone(&c), Arc::clone(&refused));
            let service = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    let (c, refused) = (Arc::clone(&c), Arc::clone(&refused));
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/acquire" => {
                                c.fetch_add(1, Ordering::SeqCst);
                                (
                                    200,
                                    serde_json::json!({"lockHandle": {"uuid": "one-shared-uuid", "lockName": "x"}, "err": "", "ttlMs": ttl_ms, "fencingToken": 1}),
                                )
                            }
                            "/release" => {
                                let first = !refused.swap(true, Ordering::SeqCst);
                                if !first || applied_before_refusing {
                                    c.fetch_sub(1, Ordering::SeqCst);
                                }
                                match (first, code) {
                                    (true, Some(code)) => (
                                        status,
                                        serde_json::json!({"err": "refused", "code": code}),
                                    ),
                                    (true, None) => {
                                        (status, serde_json::json!({"err": "upstream reset"}))
                                    }
                                    (false, _) => (200, serde_json::json!({"err": ""})),
                                }
                            }
                            "/renew-lease" => (200, serde_json::from_str(renew_body).unwrap()),
                            _ => (200, serde_json::json!({"err": ""})),
                        };
                        let resp = hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from(
                                body.to_string(),
                            )))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (format!("http://{addr}"), count)
}

/// A 503 without lockgate's refused-before-applied code may come from a proxy after the release
/// was applied: repeating it would give up a second share of the shared handle (another
/// holder's), so it is not repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_answered_503_by_a_proxy_is_not_repeated() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (url, count) = counting_server(503, None, true).await;
        let l = locker(&url, HttpConfig::default()).await;
        let a = l.acquire("x", AcquireOptions::shared()).await.unwrap();
        let _b = l.acquire("x", AcquireOptions::shared()).await.unwrap();
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);
        let _ = a.release().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            count.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the release was repeated: B's share is gone"
        );
    })
    .await
    .unwrap();
}

/// A 503 carrying lockgate's own "refused before anything was applied" code (over capacity)
/// proves nothing happened: that release is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_refused_with_lockgates_capacity_code_is_retried() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (url, count) = counting_server(503, Some("capacity"), false).await;
        let l = locker(&url, HttpConfig::default()).await;
        let a = l.acquire("x", AcquireOptions::shared()).await.unwrap();
        let _b = l.acquire("x", AcquireOptions::shared()).await.unwrap();
        a.release().await.unwrap();
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

/// A `200 {}` (something in front of the server that is not a lock server) confirms no
/// renewal: the lease is lost at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_renewal_answer_confirms_nothing() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (url, _) = fake_server(503, None, false, "{}", 3000).await;
        let l = locker(&url, HttpConfig::default()).await;
        let g = l.acquire("x", AcquireOptions::exclusive()).await.unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(6), g.lost())
            .await
            .expect("lost at its deadline (2.25 s with a 3 s TTL)");
        assert_eq!(reason, LostReason::RenewalFailed);
    })
    .await
    .unwrap();
}
