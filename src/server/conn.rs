//! Connections: accepting, TLS, TCP keep-alive, the per-connection deadlines (request heads,
//! idleness, and the progress of answers), the caps per client, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Sleep;
use tower::ServiceExt as _;

pub(crate) use super::deadlines::Activity;
use super::deadlines::Deadlines;
use super::http::{App, ConnInfo, Phase};
use super::peers::client_key;
use super::ServerConfig;

/// TCP keep-alive: a peer that vanished (its host down, a NAT entry dropped) is noticed after
/// 30 s of silence and three unanswered probes 10 s apart, also while a long poll waits.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;
/// TCP_USER_TIMEOUT: sent bytes unacknowledged (or a zero window not reopened) this long end
/// the connection in the kernel.
const USER_TIMEOUT: Duration = Duration::from_secs(30);

fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = SockRef::from(tcp);
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keep-alive");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

/// Accepts until `shutdown` completes, then drains (see [`Server::serve`](super::Server::serve)).
pub(crate) async fn serve(
    app: Arc<App>,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) {
    let router = super::http::router(app.clone());
    let (phase, phase_rx) = watch::channel(Phase::Serving);
    // Every connection task holds a sender; all of them are gone when `open` yields None.
    let (alive, mut open) = mpsc::channel::<()>(1);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut drained: Option<Pin<Box<Sleep>>> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = &mut shutdown, if drained.is_none() => {
                tracing::info!(delay_ms = config.drain_delay.as_millis() as u64, "draining: /readyz fails, answers close their connections");
                app.set_phase(Phase::Draining);
                let _ = phase.send(Phase::Draining);
                drained = Some(Box::pin(tokio::time::sleep(config.drain_delay)));
                continue;
            }
            () = async { drained.as_mut().expect("guarded").await }, if drained.is_some() => break,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors or memory: let connections end before accepting.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            app.metrics.rejected_connections.inc();
            tracing::warn!(%peer, max = config.max_connections, "connection cap reached, closing a new connection");
            continue;
        };
        let client = client_key(peer.ip());
        // An address that spent its budget of unauthorized requests is not listened to until it
        // refills: closing at once costs less than answering 429 to a guesser's every request.
        if app.token().is_some() && app.peers.limited(client).is_some() {
            app.metrics.rejected_connections.inc();
            tracing::debug!(%peer, "too many unauthorized requests from this address, closing a new connection");
            continue;
        }
        let Some(peer_slot) = app.peers.connect(client) else {
            app.metrics.rejected_connections.inc();
            tracing::warn!(%peer, max = config.max_connections_per_client, "connection cap per client reached, closing a new connection");
            continue;
        };
        tune(&tcp);
        let conn = Conn {
            app: app.clone(),
            router: router.clone(),
            config: config.clone(),
            phase: phase_rx.clone(),
            peer,
        };
        let alive = alive.clone();
        tokio::spawn(async move {
            let _slots = (slot, peer_slot, alive);
            let app = conn.app.clone();
            app.metrics.connections.inc();
            conn.run(tcp).await;
            app.metrics.connections.dec();
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; answering open requests");
    app.set_phase(Phase::Closing);
    app.store.close();
    let _ = phase.send(Phase::Closing);
    drop(alive);
    if tokio::time::timeout(config.shutdown_timeout, open.recv())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_ms = config.shutdown_timeout.as_millis() as u64,
            "connections still open after the shutdown timeout; closing them"
        );
    }
}

struct Conn {
    app: Arc<App>,
    router: Router,
    config: ServerConfig,
    phase: watch::Receiver<Phase>,
    peer: SocketAddr,
}

impl Conn {
    async fn run(self, tcp: TcpStream) {
        match self.app.tls_acceptor() {
            None => self.serve(tcp, None).await,
            Some(acceptor) => {
                match tokio::time::timeout(self.config.header_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let h2 = tls.get_ref().1.alpn_protocol().map(|p| p == b"h2");
                        self.serve(tls, h2).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(peer = %self.peer, "TLS handshake timed out"),
                }
            }
        }
    }

    async fn serve<IO>(mut self, io: IO, h2: Option<bool>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let io = Deadlines::new(io, activity.clone(), &self.config, h2);
        let service = ConnService {
            router: self.router,
            info: ConnInfo {
                peer: self.peer,
                activity: activity.clone(),
            },
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // Deadlines does this: hyper's timer would also close idle keep-alive connections
            // after it, racing Go clients that reuse them (Go does not retry a POST).
            .header_read_timeout(None)
            .max_buf_size(64 * 1024);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(10))
            .max_concurrent_streams(256)
            .max_header_list_size(16 * 1024);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        let mut ending = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
                    }
                    break;
                }
                // HTTP/1 answers close their connection themselves (`Connection: close`);
                // HTTP/2 ones cannot: the connection is told to go away (GOAWAY).
                () = activity.close.notified(), if !ending => {
                    if activity.h2.load(Ordering::Acquire) {
                        conn.as_mut().graceful_shutdown();
                        ending = true;
                    }
                }
                changed = self.phase.changed(), if !ending => {
                    let phase = *self.phase.borrow_and_update();
                    if changed.is_err()
                        || phase == Phase::Closing
                        || (phase == Phase::Draining && activity.h2.load(Ordering::Acquire))
                    {
                        conn.as_mut().graceful_shutdown();
                        ending = true;
                    }
                }
            }
        }
    }
}

#[derive(Clone)]
struct ConnService {
    router: Router,
    info: ConnInfo,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        let guard = self.info.activity.begin();
        req.extensions_mut().insert(self.info.clone());
        let response = self.router.clone().oneshot(req);
        Box::pin(async move {
            let r = response.await;
            drop(guard);
            r
        })
    }
}
