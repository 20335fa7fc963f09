//! Connections: accepting, TLS, the per-connection deadlines, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt as _;

use super::http::App;
use super::ServerConfig;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Accepts until `shutdown` completes, then drains (see [`Server::serve`](super::Server::serve)).
pub(crate) async fn serve(
    app: Arc<App>,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) {
    let router = super::http::router(app.clone());
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let acceptor = config
        .tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(t.0.clone()));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
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
        let _ = tcp.set_nodelay(true);
        let conn = Conn {
            app: app.clone(),
            router: router.clone(),
            config: config.clone(),
            watcher: graceful.watcher(),
            peer,
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let app = conn.app.clone();
            app.metrics.connections.inc();
            conn.run(tcp, acceptor).await;
            app.metrics.connections.dec();
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; answering open requests");
    app.closing.store(true, Ordering::Relaxed);
    app.store.close();
    if tokio::time::timeout(config.shutdown_timeout, graceful.shutdown())
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
    watcher: Watcher,
    peer: SocketAddr,
}

impl Conn {
    async fn run(self, tcp: TcpStream, acceptor: Option<tokio_rustls::TlsAcceptor>) {
        match acceptor {
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

    async fn serve<IO>(self, io: IO, h2: Option<bool>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let io = Deadlines::new(io, activity.clone(), &self.config, h2);
        let service = ConnService {
            router: self.router,
            activity,
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
        if let Err(e) = self.watcher.watch(conn).await {
            tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
        }
    }
}

/// What the requests of one connection are doing, for [`Deadlines`].
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    /// Counts requests started, so the reader knows a request head was complete.
    started: AtomicU64,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(self.clone())
    }

    fn idle_since(&self) -> Instant {
        *self
            .idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let mut idle = self
            .0
            .idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *idle = Instant::now();
        }
    }
}

#[derive(Clone)]
struct ConnService {
    router: Router,
    activity: Arc<Activity>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        let response = self.router.clone().oneshot(req);
        Box::pin(async move {
            let r = response.await;
            drop(guard);
            r
        })
    }
}

/// The connection's clock: a request head must arrive within the header timeout of its first
/// byte (of the connection's start, for the first request), and a connection with no request
/// open closes after the idle timeout. A late head is answered `408` with a JSON `err`, as every
/// other bad request. Bodies have their own deadline in the handlers; an open request (a long
/// poll) has none here.
struct Deadlines<IO> {
    io: IO,
    activity: Arc<Activity>,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// HTTP/2: no heads to time (its streams are timed by the handlers), only idleness.
    h2: Option<bool>,
    /// Bytes of the HTTP/2 preface seen so far, while undecided.
    preface_matched: usize,
    head_since: Option<Instant>,
    seen_started: u64,
    sleep: Pin<Box<Sleep>>,
    /// A JSON answer replacing one of hyper's, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<IO> Deadlines<IO> {
    fn new(io: IO, activity: Arc<Activity>, config: &ServerConfig, h2: Option<bool>) -> Self {
        let now = Instant::now();
        Self {
            io,
            activity,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            h2,
            preface_matched: 0,
            head_since: Some(now),
            seen_started: 0,
            sleep: Box::pin(tokio::time::sleep_until(now + config.header_timeout)),
            replacement: None,
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Deadlines<IO> {
    /// A request started since we last looked: its head is complete, the next one's clock has
    /// not started.
    fn catch_up(&mut self) {
        let started = self.activity.started.load(Ordering::Acquire);
        if started != self.seen_started {
            self.seen_started = started;
            self.head_since = None;
        }
    }

    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.in_flight.load(Ordering::Acquire) > 0 {
            return Poll::Pending;
        }
        let (deadline, head) = match self.head_since {
            Some(since) if self.h2 != Some(true) => (since + self.header_timeout, true),
            _ => (self.activity.idle_since() + self.idle_timeout, false),
        };
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if !head {
            // End of input: hyper closes an idle connection quietly.
            return Poll::Ready(Ok(()));
        }
        let body = format!(
            "{{\"err\":\"the request head did not arrive within {} ms\",\"code\":\"request_timeout\"}}",
            self.header_timeout.as_millis()
        );
        let resp = format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        // Best effort: a socket that cannot take a few hundred bytes now is closed anyway.
        let _ = Pin::new(&mut self.io).poll_write(cx, resp.as_bytes());
        let _ = Pin::new(&mut self.io).poll_flush(cx);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "request head timeout",
        )))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Deadlines<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.catch_up();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if !got.is_empty() {
                    for &b in got {
                        if this.h2.is_some() {
                            break;
                        }
                        if b != H2_PREFACE[this.preface_matched] {
                            this.h2 = Some(false);
                        } else {
                            this.preface_matched += 1;
                            if this.preface_matched == H2_PREFACE.len() {
                                this.h2 = Some(true);
                            }
                        }
                    }
                    if this.head_since.is_none()
                        && this.activity.in_flight.load(Ordering::Acquire) == 0
                    {
                        this.head_since = Some(Instant::now());
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_deadline(cx),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Deadlines<IO> {
    /// hyper answers a request it cannot parse (bad request line or header, headers or URI too
    /// long) itself, with an empty body and no service call; such an answer is sent with a JSON
    /// `err` instead, like every other refusal. Our own answers always have a body.
    fn json_for_hyper_error(&self, out: &[u8]) -> Option<Vec<u8>> {
        if self.h2 == Some(true) {
            return None;
        }
        let end = out.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&out[..end]).ok()?;
        if !head.starts_with("HTTP/1.1 4") || !head.contains("\r\ncontent-length: 0") {
            return None;
        }
        let status: u16 = head.get(9..12)?.parse().ok()?;
        let (reason, err) = match status {
            400 => ("Bad Request", "malformed HTTP request"),
            414 => ("URI Too Long", "the request URI is too long"),
            431 => (
                "Request Header Fields Too Large",
                "the request headers are too large",
            ),
            _ => return None,
        };
        let body = format!("{{\"err\":\"{err}\",\"code\":\"bad_request\"}}");
        Some(
            format!(
                "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    }

    /// Writes `out` (or its JSON replacement) and reports `out.len()` bytes written once all
    /// of the replacement is.
    fn poll_write_checked(
        &mut self,
        cx: &mut Context<'_>,
        out: &[u8],
        total: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        if self.replacement.is_none() {
            self.replacement = Some((self.json_for_hyper_error(out)?, 0));
        }
        let (bytes, written) = self.replacement.as_mut()?;
        while *written < bytes.len() {
            match Pin::new(&mut self.io).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => {
                    return Some(Poll::Ready(Err(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Pending => return Some(Poll::Pending),
            }
        }
        self.replacement = None;
        Some(Poll::Ready(Ok(total)))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Deadlines<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(p) = this.poll_write_checked(cx, buf, buf.len()) {
            return p;
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            let total = bufs.iter().map(|b| b.len()).sum();
            if let Some(p) = this.poll_write_checked(cx, first, total) {
                return p;
            }
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
