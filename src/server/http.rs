//! The application: shared state, the router, and the gate every request passes (who may ask,
//! from where, how, and the metrics).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::sync::Semaphore;

use super::config::{ConfigError, Hosts, ServerConfig, TlsConfig};
use super::conn::Activity;
use super::endpoints;
use super::metrics::Metrics;
use super::peers::{client_key, Peers};
use super::store::Store;
use crate::http::protocol::{ErrorCode, ErrorResponse};

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    Serving = 0,
    /// Told to stop; serving on for the drain delay with `/readyz` failing.
    Draining = 1,
    /// No longer accepting; the store is closed.
    Closing = 2,
}

/// Shared by every request.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) metrics: Metrics,
    token: RwLock<Option<[u8; 32]>>,
    tls: RwLock<Option<TlsConfig>>,
    pub(crate) peers: Arc<Peers>,
    hosts: Hosts,
    pub(crate) body_limit: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) status_limit: usize,
    /// `/status` copies and serializes up to `status_limit` locks: one at a time, so that a
    /// flood of them takes one core at most.
    pub(crate) status_slots: Semaphore,
    phase: AtomicU8,
}

/// Who sent a request: set on every request by the connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) activity: Arc<Activity>,
}

impl ConnInfo {
    /// The address the client is counted and bound by (see [`client_key`]).
    pub(crate) fn client(&self) -> IpAddr {
        client_key(self.peer.ip())
    }
}

impl App {
    pub(crate) fn new(store: Arc<dyn Store>, config: &ServerConfig) -> Self {
        Self {
            metrics: Metrics::new(store.clone()),
            store,
            token: RwLock::new(config.token.as_deref().map(token_digest)),
            tls: RwLock::new(config.tls.clone()),
            peers: Arc::new(Peers::new(
                config.max_connections_per_client,
                config.max_unauthorized_per_client,
            )),
            hosts: config.hosts.clone(),
            body_limit: config.body_limit,
            body_timeout: config.body_timeout,
            max_wait: config.max_wait,
            status_limit: config.status_limit,
            status_slots: Semaphore::new(1),
            phase: AtomicU8::new(Phase::Serving as u8),
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Closing,
        }
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    pub(crate) fn token(&self) -> Option<[u8; 32]> {
        *self
            .token
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn set_token(&self, token: &[u8]) -> Result<(), ConfigError> {
        if token.is_empty() {
            return Err(ConfigError::EmptyToken);
        }
        *self
            .token
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(token_digest(token));
        tracing::info!("token replaced");
        Ok(())
    }

    pub(crate) fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.tls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.0.clone()))
    }

    pub(crate) fn set_tls(&self, tls: TlsConfig) -> Result<(), ConfigError> {
        let mut current = self
            .tls
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.is_none() {
            return Err(ConfigError::TlsMismatch { tls: false });
        }
        *current = Some(tls);
        tracing::info!("certificate replaced");
        Ok(())
    }
}

/// The SHA-256 of a token: compared in constant time, and of a fixed length whatever the
/// token's.
pub(crate) fn token_digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/acquire", post(endpoints::acquire))
        .route("/renew-lease", post(endpoints::renew_lease))
        .route("/release", post(endpoints::release))
        .route("/cancel", post(endpoints::cancel))
        .route("/status", get(endpoints::status))
        .route("/metrics", get(endpoints::metrics))
        .route("/healthz", get(endpoints::healthz))
        .route("/readyz", get(endpoints::readyz))
        .fallback(endpoints::not_found)
        .method_not_allowed_fallback(endpoints::method_not_allowed)
        .layer(from_fn_with_state(app.clone(), gate))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(app)
}

/// An answer other than `200`: `{"err", "code"}` with the code's status.
#[derive(Debug)]
pub(crate) struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = json(
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &ErrorResponse {
                err: self.message,
                code: Some(self.code),
            },
        );
        if self.code == ErrorCode::Unauthorized {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"lockgate\""),
            );
        }
        let retry = match self.retry_after {
            Some(after) => Some(after.as_secs().max(1)),
            None => matches!(self.code, ErrorCode::Capacity | ErrorCode::ShuttingDown).then_some(1),
        };
        if let Some(secs) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp.extensions_mut().insert(self.code);
        resp
    }
}

pub(crate) fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn endpoint_of(path: &str) -> &'static str {
    match path {
        "/acquire" => "acquire",
        "/renew-lease" => "renew-lease",
        "/release" => "release",
        "/cancel" => "cancel",
        "/status" => "status",
        "/metrics" => "metrics",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        _ => "other",
    }
}

/// What the gate decided about a request that does not reach its endpoint.
struct Refusal {
    error: ApiError,
    /// End the connection after the answer (a client that is not ours, or guessing tokens).
    close: bool,
}

/// Browsers, `Host`, media type and token; `Ok(true)` when the request carries the token.
fn admit(
    app: &App,
    req: &Request,
    endpoint: &str,
    client: Option<IpAddr>,
) -> Result<bool, Refusal> {
    let refuse = |code, message: &str| Refusal {
        error: ApiError::new(code, message),
        close: true,
    };
    let headers = req.headers();
    // A web page's requests carry Origin (every cross-origin request and every POST) or
    // Sec-Fetch-Site; the server serves no page, so no browser request is its own.
    if headers.contains_key(header::ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() != b"none")
    {
        return Err(refuse(
            ErrorCode::Forbidden,
            "requests from web pages are refused (the request carries Origin or Sec-Fetch-Site)",
        ));
    }
    let token = app.token();
    if let Some(host) = request_host(req) {
        if !host_allowed(&app.hosts, host, token.is_some()) {
            return Err(refuse(
                ErrorCode::Forbidden,
                &format!(
                    "this server does not answer to the host {:?}: use its IP address, or start \
                     it with --allowed-host",
                    truncate(host)
                ),
            ));
        }
    }
    if req.method() == Method::POST {
        if let Some(ct) = headers.get(header::CONTENT_TYPE) {
            let media = ct.to_str().unwrap_or("").split(';').next().unwrap_or("");
            if !media.trim().eq_ignore_ascii_case("application/json") {
                return Err(Refusal {
                    error: ApiError::new(
                        ErrorCode::UnsupportedMediaType,
                        "the request body must be JSON: send `Content-Type: application/json` \
                         (or none)",
                    ),
                    close: false,
                });
            }
        }
    }
    let Some(want) = token else {
        return Ok(false);
    };
    if matches!(endpoint, "healthz" | "readyz") {
        return Ok(authorized(&want, headers));
    }
    if let Some(after) = client.and_then(|c| app.peers.limited(c)) {
        return Err(Refusal {
            error: ApiError::new(
                ErrorCode::TooManyRequests,
                "too many requests with a missing or wrong token from this address; try again \
                 later",
            )
            .retry_after(after),
            close: true,
        });
    }
    if authorized(&want, headers) {
        return Ok(true);
    }
    if let Some(c) = client {
        app.peers.unauthorized(c);
    }
    Err(refuse(
        ErrorCode::Unauthorized,
        "missing or wrong token: send `Authorization: Bearer TOKEN` (or HTTP basic \
         authentication with the token as the password)",
    ))
}

/// Whether the request carried the server's token (for `/status`'s acquirer ids).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WithToken(pub(crate) bool);

/// Admission, metrics and the request log.
async fn gate(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let endpoint = endpoint_of(req.uri().path());
    let method = req.method().clone();
    let http1 = req.version() < Version::HTTP_2;
    let conn = req.extensions().get::<ConnInfo>().cloned();
    let mut close = app.phase() != Phase::Serving;
    let mut resp = match admit(&app, &req, endpoint, conn.as_ref().map(ConnInfo::client)) {
        Ok(with_token) => {
            req.extensions_mut().insert(WithToken(with_token));
            next.run(req).await
        }
        Err(refusal) => {
            close |= refusal.close;
            refusal.error.into_response()
        }
    };
    if close {
        if http1 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(conn) = &conn {
            conn.activity.request_close();
        }
    }
    let code = resp.extensions().get::<ErrorCode>().copied();
    let elapsed = start.elapsed();
    app.metrics.observe(
        endpoint,
        resp.status().as_u16(),
        code.map_or("", ErrorCode::as_str),
        elapsed,
    );
    tracing::debug!(
        %method,
        endpoint,
        peer = conn.as_ref().map(|c| c.peer.to_string()).unwrap_or_default(),
        status = resp.status().as_u16(),
        code = code.map_or("", ErrorCode::as_str),
        elapsed_us = elapsed.as_micros() as u64,
        "request"
    );
    resp
}

/// The host a request names (`Host`, or HTTP/2's `:authority`), without its port.
fn request_host(req: &Request) -> Option<&str> {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if let Some(rest) = authority.strip_prefix('[') {
        return Some(rest.split(']').next().unwrap_or(rest));
    }
    Some(match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    })
}

fn host_allowed(hosts: &Hosts, host: &str, token: bool) -> bool {
    let host = host.trim_end_matches('.');
    if host.parse::<IpAddr>().is_ok() || host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match hosts {
        Hosts::Any => true,
        Hosts::Default => token,
        Hosts::Names(names) => names.iter().any(|n| n.eq_ignore_ascii_case(host)),
    }
}

/// `Authorization: Bearer TOKEN`, or `Basic` with TOKEN as the password (what Go's HTTP client
/// sends for a URL `http://user:TOKEN@host/`: Go lockgate's client has no other way).
fn authorized(want: &[u8; 32], headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    let got = if scheme.eq_ignore_ascii_case("bearer") {
        token_digest(rest.as_bytes())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        token_digest(&decoded[colon + 1..])
    } else {
        return false;
    };
    bool::from(got.ct_eq(want))
}

/// At most 64 characters of client input in an error message.
pub(crate) fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new(ErrorCode::Internal, "internal error").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_ip_addresses_localhost_or_named() {
        let d = Hosts::Default;
        assert!(host_allowed(&d, "127.0.0.1", false));
        assert!(host_allowed(&d, "::1", false));
        assert!(host_allowed(&d, "LocalHost.", false));
        assert!(!host_allowed(&d, "evil.example", false));
        assert!(host_allowed(&d, "evil.example", true));
        let named = Hosts::Names(vec!["locks.example.com".into()]);
        assert!(host_allowed(&named, "locks.example.com", false));
        assert!(!host_allowed(&named, "evil.example", true));
        assert!(host_allowed(&Hosts::Any, "anything", false));
    }
}
