//! The clock of one connection: request heads, idleness, and the progress of answers.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::ServerConfig;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the requests of one connection are doing, for [`Deadlines`].
#[derive(Debug)]
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    /// Counts requests started, so the reader knows a request head was complete.
    started: AtomicU64,
    idle_since: Mutex<Instant>,
    /// The connection speaks HTTP/2.
    pub(super) h2: AtomicBool,
    /// Asked to end the connection after the current answers.
    pub(super) close: Notify,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
            h2: AtomicBool::new(false),
            close: Notify::new(),
        }
    }

    /// Ends the connection once its open requests are answered.
    pub(crate) fn request_close(&self) {
        self.close.notify_one();
    }

    pub(super) fn begin(self: &Arc<Self>) -> ActivityGuard {
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

pub(super) struct ActivityGuard(Arc<Activity>);

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

/// The connection's clock: a request head must arrive within the header timeout of its first
/// byte (of the connection's start, for the first request; on HTTP/2, the first request must
/// start within the header timeout of the connection's start), a connection with no request
/// open closes after the idle timeout, and an answer must make progress: a write that waits
/// for the client (its receive window full: a client that does not read) longer than the send
/// timeout ends the connection. A late HTTP/1 head is answered `408` with a JSON `err`, as
/// every other bad request. Bodies have their own deadline in the handlers; an open request (a
/// long poll) has none here.
pub(super) struct Deadlines<IO> {
    io: IO,
    activity: Arc<Activity>,
    header_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    /// HTTP/2: after the first request, no heads to time (its streams are timed by the
    /// handlers), only idleness.
    h2: Option<bool>,
    /// Bytes of the HTTP/2 preface seen so far, while undecided.
    preface_matched: usize,
    head_since: Option<Instant>,
    seen_started: u64,
    sleep: Pin<Box<Sleep>>,
    /// Since when a write has been waiting for the client to make room.
    stalled_since: Option<Instant>,
    write_sleep: Pin<Box<Sleep>>,
    /// A JSON answer replacing one of hyper's, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<IO> Deadlines<IO> {
    pub(super) fn new(
        io: IO,
        activity: Arc<Activity>,
        config: &ServerConfig,
        h2: Option<bool>,
    ) -> Self {
        let now = Instant::now();
        if h2 == Some(true) {
            activity.h2.store(true, Ordering::Release);
        }
        Self {
            io,
            activity,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            send_timeout: config.send_timeout,
            h2,
            preface_matched: 0,
            head_since: Some(now),
            seen_started: 0,
            sleep: Box::pin(tokio::time::sleep_until(now + config.header_timeout)),
            stalled_since: None,
            write_sleep: Box::pin(tokio::time::sleep_until(now + config.send_timeout)),
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
        let h2 = self.h2 == Some(true);
        let (deadline, head) = match self.head_since {
            // An HTTP/2 connection's first request must come as soon as an HTTP/1 one's head.
            Some(since) if !h2 || self.seen_started == 0 => (since + self.header_timeout, true),
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
        if h2 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 request within the header timeout",
            )));
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
                                this.activity.h2.store(true, Ordering::Release);
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
                Poll::Ready(Ok(n)) => {
                    *written += n;
                    self.stalled_since = None;
                }
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Pending => return Some(self.stalled(cx)),
            }
        }
        self.replacement = None;
        Some(Poll::Ready(Ok(total)))
    }

    /// A write is waiting for the client: pending until the send timeout has passed since it
    /// started waiting, then an error that ends the connection.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        let deadline = since + self.send_timeout;
        if self.write_sleep.deadline() != deadline {
            self.write_sleep.as_mut().reset(deadline);
        }
        match self.write_sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no answer bytes within the send timeout",
            ))),
        }
    }

    /// Watches a write's progress: bytes taken reset the clock, a wait runs it.
    fn progress(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.stalled_since = None;
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => self.stalled(cx),
            other => other,
        }
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
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progress(cx, r)
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
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progress(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                this.stalled_since = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.stalled(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Pending => this.stalled(cx),
            other => other,
        }
    }
}
