//! The application: shared state, the router, and the gate every request passes (who may ask,
//! from where, how, and the metrics).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use super::config::{ConfigError, Hosts, ServerConfig, TlsConfig};
use super::conn::Activity;
use super::endpoints;
use super::gate::gate;
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
    pub(crate) hosts: Hosts,
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

    pub(crate) fn retry_after(mut self, after: Duration) -> Self {
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

pub(crate) fn endpoint_of(path: &str) -> &'static str {
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
