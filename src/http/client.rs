//! [`HttpLocker`]: locks held through an HTTP lock server (`lockgate serve`, or Go lockgate's
//! server), with leases renewed by the shared session.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;

use super::config::HttpConfig;
use super::protocol::{
    ErrorCode, LeaseRequest, LockHandle, RenewLeaseResponse, StatusResponse, RENEW_LEASE_PATH,
    STATUS_PATH,
};
use super::transport::{CallError, Transport};
use super::url::parse_url;
use crate::backend::{Backend, BoxFuture, Lease, LostReason};
use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::AcquireOptions;
use crate::session::{Bridge, Renewal, Renewer, Session, Timing};

/// Go lockgate's lease TTL, renewal period and poll period (its server sends no `ttlMs`).
pub(crate) const GO_TTL: Duration = Duration::from_secs(10);
const GO_RENEW_PERIOD: Duration = Duration::from_secs(3);
/// Go's server stores `ExpireAtTimestamp` in whole seconds (truncated) and compares it with its
/// clock: a lease it renewed can expire a second short of its TTL. Counted lost 7 s after the
/// last confirmed renewal was sent, a holder still has 2 s to stop.
const GO_RENEW_DEADLINE: Duration = Duration::from_secs(7);
/// How many renewal requests run at once.
const RENEWALS_IN_FLIGHT: usize = 32;

/// A locker whose locks are held through an HTTP lock server: `lockgate serve`, or Go
/// lockgate's server (`distributed_locker.NewHttpBackendHandler`), told apart by the first
/// answer (lockgate's carries `ttlMs`).
///
/// Against `lockgate serve` a waiting acquisition takes a place in the lock's queue and
/// long-polls (the server answers the moment the lock is its, so a handoff takes one round
/// trip); against Go's server it polls every 2 s, as Go's client does. Leases are renewed in the
/// background about every third of the server's TTL (Go's server: every 3 s); a holder whose
/// renewal the server refuses, or cannot confirm in time, is told through
/// [`LockGuard::lost`](crate::LockGuard::lost) before the lease can expire on the server. Every
/// request has a timeout. Grants carry the server's fencing token
/// ([`LockGuard::fencing_token`](crate::LockGuard::fencing_token); none from Go's server).
///
/// # Fairness
///
/// The server's: `lockgate serve` serves each lock's waiters first come, first served, with no
/// writer starvation; this client keeps its place between long polls with an acquirer id of its
/// own per acquisition. Go's server queues acquirer ids in its records (v0.2) or not at all
/// (v0.1.1).
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use lockgate::{AcquireOptions, HttpConfig, HttpLocker, Locker};
///
/// let locker = Locker::new(
///     HttpLocker::connect("http://127.0.0.1:7780", HttpConfig::default().token("s3cret")).await?,
/// );
/// let guard = locker.acquire("deploy", AcquireOptions::exclusive()).await?;
/// // ... work; stop when `guard.lost()` completes ...
/// guard.release().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct HttpLocker {
    session: Arc<HttpSession>,
}

pub(crate) type HttpSession = Session<Arc<Remote>>;

impl std::fmt::Debug for HttpLocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpLocker")
            .field("server", &self.server())
            .finish_non_exhaustive()
    }
}

/// Which implementation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerKind {
    /// Not asked yet.
    Unknown = 0,
    /// `lockgate serve`: long polls, `ttlMs`, fencing tokens.
    Lockgate = 1,
    /// Go lockgate's server: polling, a 10 s TTL.
    Go = 2,
}

/// The server and what this locker learned about it.
pub(crate) struct Remote {
    pub transport: Transport,
    pub config: HttpConfig,
    kind: AtomicU8,
    ttl_ms: AtomicU64,
    /// The session this server's leases are renewed in (to retime it when a renewal answer
    /// brings a new TTL).
    session: std::sync::OnceLock<std::sync::Weak<HttpSession>>,
}

/// What the session keeps of a held lease: its handle.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub handle: LockHandle,
}

/// The renewal timing for a server of `kind` whose leases live `ttl`.
pub(crate) fn timing_for(kind: ServerKind, ttl: Duration) -> Timing {
    match kind {
        ServerKind::Lockgate => {
            // Renew every third of the TTL; count the lease lost 2 s (a quarter of a short TTL)
            // before it can expire on the server.
            let ttl = ttl.max(Duration::from_millis(300));
            Timing {
                renew_period: ttl / 3,
                renew_deadline: ttl - (ttl / 4).min(Duration::from_secs(2)),
                ttl,
            }
        }
        ServerKind::Go | ServerKind::Unknown => Timing {
            renew_period: GO_RENEW_PERIOD,
            renew_deadline: GO_RENEW_DEADLINE,
            ttl: GO_TTL,
        },
    }
}

impl Remote {
    pub fn kind(&self) -> ServerKind {
        match self.kind.load(Ordering::Relaxed) {
            1 => ServerKind::Lockgate,
            2 => ServerKind::Go,
            _ => ServerKind::Unknown,
        }
    }

    /// The server's lease TTL, as far as known (Go's until the server says otherwise).
    pub fn ttl(&self) -> Duration {
        match self.ttl_ms.load(Ordering::Relaxed) {
            0 => GO_TTL,
            ms => Duration::from_millis(ms),
        }
    }

    pub fn timing(&self) -> Timing {
        timing_for(self.kind(), self.ttl())
    }

    /// Learns from an `/acquire` answer which server answers (lockgate's sends `ttlMs`), and
    /// retimes the session's renewals when that changed.
    pub fn learn(&self, session: &HttpSession, ttl_ms: Option<u64>) {
        let (kind, ms) = match ttl_ms {
            Some(ms) if ms > 0 => {
                // lockgate serve's TTL is at least 1 s; a day is past any sensible one (and
                // keeps deadline arithmetic far from overflowing).
                let clamped = ms.clamp(1000, 86_400_000);
                if clamped != ms {
                    tracing::warn!(
                        ttl_ms = ms,
                        "the lock server's TTL is out of range; using {clamped} ms"
                    );
                }
                (ServerKind::Lockgate, clamped)
            }
            _ => (ServerKind::Go, 0),
        };
        let old_kind = self.kind.swap(kind as u8, Ordering::Relaxed);
        let old_ms = self.ttl_ms.swap(ms, Ordering::Relaxed);
        if old_kind != kind as u8 || old_ms != ms {
            tracing::debug!(
                server = self.transport.base(),
                ?kind,
                ttl_ms = ms,
                "lock server identified"
            );
            session.set_timing(self.timing());
        }
    }

    /// The timeout of a renewal: answered or given up well before the renewal deadline.
    pub fn renew_timeout(&self) -> Duration {
        let t = self.timing();
        self.config
            .request_timeout
            .min(t.renew_deadline.saturating_sub(t.renew_period))
            .max(Duration::from_millis(100))
    }

    /// Renews one lease: `Unknown` when the server's answer does not settle it.
    pub async fn renew_one(&self, held: Held, timeout: Duration) -> Renewal<Held> {
        let req = LeaseRequest {
            lock_handle: held.handle.clone(),
        };
        for _ in 0..2 {
            let answer: Result<serde_json::Value, CallError> =
                self.transport.post(RENEW_LEASE_PATH, &req, timeout).await;
            // Every lock server's answer says `err` (`""` when renewed, as Go writes it): a
            // `200 {}` from something else in front of the server confirms nothing.
            let answer = answer.map(|v| {
                let has_err = v.get("err").is_some();
                (has_err, serde_json::from_value::<RenewLeaseResponse>(v))
            });
            match answer {
                Ok((false, _)) | Ok((true, Err(_))) => {
                    tracing::warn!(
                        lock = held.handle.lock_name,
                        "a renewal answer that is not the lock protocol's; retrying"
                    );
                    return Renewal::Unknown;
                }
                Ok((true, Ok(r))) => {
                    if let (Some(ms), Some(session)) = (
                        r.ttl_ms,
                        self.session.get().and_then(std::sync::Weak::upgrade),
                    ) {
                        self.learn(&session, Some(ms));
                    }
                    return match r.error_code() {
                        None => Renewal::Renewed(held),
                        Some(ErrorCode::LockAlreadyLeased) => Renewal::Lost(LostReason::Taken),
                        Some(ErrorCode::NoExistingLockLeaseFound) => {
                            Renewal::Lost(LostReason::Gone)
                        }
                        Some(_) => {
                            tracing::warn!(
                                lock = held.handle.lock_name,
                                err = r.err,
                                "lease renewal refused; retrying"
                            );
                            Renewal::Unknown
                        }
                    };
                }
                // Overloaded or restarting: ask again when the server says (the session's
                // deadline still bounds the wait).
                Err(e @ CallError::Refused { .. })
                    if e.transient() && e.retry_after().is_some() =>
                {
                    tokio::time::sleep(e.retry_after().unwrap_or_default()).await;
                }
                Err(e) => {
                    tracing::warn!(lock = held.handle.lock_name, error = %crate::error::chain(&e.into_error(self.transport.base())), "lease renewal failed; retrying");
                    return Renewal::Unknown;
                }
            }
        }
        Renewal::Unknown
    }
}

impl Renewer for Arc<Remote> {
    type State = Held;

    fn renew(&self, leases: Vec<(String, Held)>) -> BoxFuture<'_, Vec<Renewal<Held>>> {
        Box::pin(async move {
            let timeout = self.renew_timeout();
            futures_util::stream::iter(leases.into_iter().map(|(_, h)| self.renew_one(h, timeout)))
                .buffered(RENEWALS_IN_FLIGHT)
                .collect()
                .await
        })
    }

    fn same_lease(a: &Held, b: &Held) -> bool {
        a.handle.uuid == b.handle.uuid
    }
}

impl HttpLocker {
    /// A locker for the lock server at `url` (`http://HOST:PORT` or `https://HOST:PORT`, with an
    /// optional path prefix). Must be called inside a Tokio runtime, which then runs the
    /// locker's requests and background renewals. Nothing is sent until the first acquisition.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a URL that is not `http[s]://HOST[:PORT][/PREFIX]`, an empty
    /// token or a zero timeout; [`Error::Unsupported`] outside a Tokio runtime.
    pub async fn connect(url: &str, config: HttpConfig) -> Result<Self, Error> {
        let bridge = Bridge::current("HttpLocker::connect must be called inside a Tokio runtime")?;
        Self::build(url, config, bridge)
    }

    /// [`connect`](Self::connect) for programs without an async runtime: the locker runs on a
    /// small runtime of its own (one worker thread), and its blocking API works from any thread
    /// that is not inside a Tokio runtime.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect); [`Error::Unsupported`] inside a Tokio runtime.
    pub fn connect_blocking(url: &str, config: HttpConfig) -> Result<Self, Error> {
        let bridge = Bridge::own("lockgate-http")?;
        Self::build(url, config, bridge)
    }

    fn build(url: &str, mut config: HttpConfig, bridge: Bridge) -> Result<Self, Error> {
        config.validate()?;
        let endpoint = parse_url(url)?;
        if config.token.is_none() {
            config.token = endpoint.password.clone();
        }
        let transport = Transport::new(
            &endpoint,
            config.token.as_deref(),
            &config.roots,
            config.request_timeout,
        )?;
        let remote = Arc::new(Remote {
            transport,
            config,
            kind: AtomicU8::new(ServerKind::Unknown as u8),
            ttl_ms: AtomicU64::new(0),
            session: std::sync::OnceLock::new(),
        });
        let timing = remote.timing();
        let session = Session::new(Arc::clone(&remote), timing, bridge);
        let _ = remote.session.set(Arc::downgrade(&session));
        Ok(Self { session })
    }

    /// The server's URL, without credentials.
    pub fn server(&self) -> &str {
        self.session.renewer().transport.base()
    }

    /// The server's locks, holders and waiters (`GET /status`; `lockgate serve` only).
    ///
    /// # Errors
    ///
    /// [`Error::ServerRefused`] from a server without `/status` (Go's answers `404`), and the
    /// request's errors.
    pub async fn status(&self) -> Result<StatusResponse, Error> {
        let remote = self.session.renewer();
        remote
            .transport
            .get(STATUS_PATH, remote.config.request_timeout)
            .await
            .map_err(|e| e.into_error(remote.transport.base()))
    }

    /// `GET /status` as the server sent it (JSON), for tools that pass it on.
    ///
    /// # Errors
    ///
    /// As [`status`](Self::status).
    pub async fn status_json(&self) -> Result<String, Error> {
        let remote = self.session.renewer();
        let bytes = remote
            .transport
            .get_raw(STATUS_PATH, remote.config.request_timeout)
            .await
            .map_err(|e| e.into_error(remote.transport.base()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

impl Backend for HttpLocker {
    fn acquire<'a>(
        &'a self,
        name: &'a LockName,
        opts: &'a AcquireOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Lease>, AcquireError>> {
        Box::pin(super::acquire::acquire(&self.session, name, opts))
    }

    fn acquire_blocking(
        &self,
        name: &LockName,
        opts: &AcquireOptions,
    ) -> Result<Box<dyn Lease>, AcquireError> {
        let session = self.session.clone();
        let (name, opts) = (name.clone(), opts.clone());
        self.session.bridge().block_on(
            "acquire_blocking called inside a Tokio runtime; use acquire().await",
            async move { super::acquire::acquire(&session, &name, &opts).await },
        )?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_follows_the_servers_ttl() {
        let t = timing_for(ServerKind::Lockgate, Duration::from_secs(10));
        assert_eq!(t.renew_deadline, Duration::from_secs(8));
        assert!(t.renew_period > Duration::from_secs(3) && t.renew_period < t.renew_deadline);
        let t = timing_for(ServerKind::Lockgate, Duration::from_secs(2));
        assert_eq!(t.renew_deadline, Duration::from_millis(1500));
        let go = timing_for(ServerKind::Go, GO_TTL);
        assert_eq!(
            (go.renew_period, go.renew_deadline),
            (Duration::from_secs(3), Duration::from_secs(7))
        );
    }
}
