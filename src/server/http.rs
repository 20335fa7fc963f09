//! Endpoints: parsing, validation, answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use super::metrics::Metrics;
use super::store::{AcquireSpec, Acquired, AcquirerId, LeaseRef, StatusQuery, Store, StoreError};
use crate::http::protocol::{
    AcquireRequest, AcquireResponse, CancelRequest, ErrorCode, ErrorResponse, HealthResponse,
    LeaseRequest, LockHandle, ReleaseResponse, RenewLeaseResponse, ERR_LOCK_ALREADY_LEASED,
    ERR_NO_EXISTING_LOCK_LEASE_FOUND, ERR_SHOULD_WAIT,
};
use crate::LockName;

/// Shared by every request.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) metrics: Metrics,
    pub(crate) token: Option<[u8; 32]>,
    pub(crate) body_limit: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) status_limit: usize,
    pub(crate) closing: AtomicBool,
}

/// The SHA-256 of a token: compared in constant time, and of a fixed length whatever the
/// token's.
pub(crate) fn token_digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/acquire", post(acquire))
        .route("/renew-lease", post(renew_lease))
        .route("/release", post(release))
        .route("/cancel", post(cancel))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(app.clone(), gate))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(app)
}

/// An answer other than `200`: `{"err", "code"}` with the code's status.
#[derive(Debug)]
pub(crate) struct ApiError {
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
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
        if matches!(self.code, ErrorCode::Capacity | ErrorCode::ShuttingDown) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp.extensions_mut().insert(self.code);
        resp
    }
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
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

/// A `200` answer carrying a lock outcome; the code goes to the metrics.
fn outcome(body: &impl Serialize, code: Option<ErrorCode>) -> Response {
    let mut resp = json(StatusCode::OK, body);
    if let Some(code) = code {
        resp.extensions_mut().insert(code);
    }
    resp
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
        _ => "other",
    }
}

/// Authorization, metrics and the request log.
async fn gate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let endpoint = endpoint_of(req.uri().path());
    let method = req.method().clone();
    let resp = if endpoint != "healthz" && !authorized(&app, req.headers()) {
        ApiError::new(
            ErrorCode::Unauthorized,
            "missing or wrong token: send `Authorization: Bearer TOKEN` (or HTTP basic \
             authentication with the token as the password)",
        )
        .into_response()
    } else {
        next.run(req).await
    };
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
        status = resp.status().as_u16(),
        code = code.map_or("", ErrorCode::as_str),
        elapsed_us = elapsed.as_micros() as u64,
        "request"
    );
    resp
}

/// `Authorization: Bearer TOKEN`, or `Basic` with TOKEN as the password (what Go's HTTP client
/// sends for a URL `http://user:TOKEN@host/`: Go lockgate's client has no other way).
fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(want) = &app.token else {
        return true;
    };
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

async fn read_json<T: DeserializeOwned>(app: &App, body: Body) -> Result<T, ApiError> {
    use axum::body::HttpBody as _;
    if body.size_hint().lower() > app.body_limit as u64 {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is over {} bytes", app.body_limit),
        ));
    }
    let limited = Limited::new(body, app.body_limit);
    let bytes = match tokio::time::timeout(app.body_timeout, limited.collect()).await {
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the request body did not arrive within {} ms",
                    app.body_timeout.as_millis()
                ),
            ))
        }
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the request body is over {} bytes", app.body_limit),
            ))
        }
        Ok(Err(e)) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("cannot read the request body: {e}"),
            ))
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("invalid request body: {e}")))
}

fn lock_name(name: String) -> Result<LockName, ApiError> {
    LockName::new(name).map_err(|e| ApiError::new(ErrorCode::InvalidName, e.to_string()))
}

fn lease_ref(handle: LockHandle) -> Result<LeaseRef, ApiError> {
    let uuid = Uuid::try_parse(&handle.uuid).map_err(|_| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("lockHandle.uuid {:?} is not a UUID", truncate(&handle.uuid)),
        )
    })?;
    Ok(LeaseRef {
        name: lock_name(handle.lock_name)?,
        uuid,
    })
}

/// At most 64 characters of client input in an error message.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn store_error(e: StoreError) -> ApiError {
    let code = match &e {
        StoreError::NoLease => ErrorCode::NoExistingLockLeaseFound,
        StoreError::AlreadyLeased => ErrorCode::LockAlreadyLeased,
        StoreError::Capacity(_) => ErrorCode::Capacity,
        StoreError::ShuttingDown => ErrorCode::ShuttingDown,
        StoreError::Unavailable(_) => ErrorCode::Unavailable,
    };
    if let StoreError::Unavailable(cause) = &e {
        tracing::warn!(error = %cause, "lock store unavailable");
    }
    ApiError::new(code, crate_error_chain(&e))
}

fn crate_error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

async fn acquire(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    let req: AcquireRequest = read_json(&app, body).await?;
    let name = lock_name(req.lock_name)?;
    let mut spec = AcquireSpec::new(name.clone(), req.opts.mode());
    if !req.opts.acquirer_id.is_empty() {
        spec =
            spec.acquirer_id(AcquirerId::new(&req.opts.acquirer_id).map_err(|e| {
                ApiError::new(ErrorCode::BadRequest, format!("opts.acquirerId: {e}"))
            })?);
    }
    if let Some(ms) = req.opts.wait_ms {
        spec = spec.wait(Duration::from_millis(ms).min(app.max_wait));
    }
    let ttl_ms = Some(millis(app.store.ttl()));
    match app.store.acquire(spec).await.map_err(store_error)? {
        Acquired::Granted(grant) => Ok(outcome(
            &AcquireResponse {
                lock_handle: LockHandle {
                    uuid: grant.uuid.hyphenated().to_string(),
                    lock_name: name.as_str().to_owned(),
                },
                err: String::new(),
                code: None,
                fencing_token: Some(grant.fencing_token),
                ttl_ms: Some(millis(grant.ttl)),
            },
            None,
        )),
        Acquired::ShouldWait => Ok(outcome(
            &AcquireResponse {
                err: ERR_SHOULD_WAIT.to_owned(),
                code: Some(ErrorCode::ShouldWait),
                ttl_ms,
                ..AcquireResponse::default()
            },
            Some(ErrorCode::ShouldWait),
        )),
    }
}

/// Go's lease outcomes are `200` answers: Go's client reads `err` only from a `200`.
fn lease_lost(e: &StoreError) -> Option<(ErrorCode, &'static str)> {
    match e {
        StoreError::NoLease => Some((
            ErrorCode::NoExistingLockLeaseFound,
            ERR_NO_EXISTING_LOCK_LEASE_FOUND,
        )),
        StoreError::AlreadyLeased => Some((ErrorCode::LockAlreadyLeased, ERR_LOCK_ALREADY_LEASED)),
        _ => None,
    }
}

async fn renew_lease(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    let req: LeaseRequest = read_json(&app, body).await?;
    let lease = lease_ref(req.lock_handle)?;
    match app.store.renew(lease).await {
        Ok(ttl) => Ok(outcome(
            &RenewLeaseResponse {
                err: String::new(),
                code: None,
                ttl_ms: Some(millis(ttl)),
            },
            None,
        )),
        Err(e) => match lease_lost(&e) {
            Some((code, text)) => Ok(outcome(
                &RenewLeaseResponse {
                    err: text.to_owned(),
                    code: Some(code),
                    ttl_ms: None,
                },
                Some(code),
            )),
            None => Err(store_error(e)),
        },
    }
}

async fn release(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    let req: LeaseRequest = read_json(&app, body).await?;
    let lease = lease_ref(req.lock_handle)?;
    match app.store.release(lease).await {
        Ok(()) => Ok(outcome(&ReleaseResponse::default(), None)),
        Err(e) => match lease_lost(&e) {
            Some((code, text)) => Ok(outcome(
                &ReleaseResponse {
                    err: text.to_owned(),
                    code: Some(code),
                },
                Some(code),
            )),
            None => Err(store_error(e)),
        },
    }
}

async fn cancel(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    let req: CancelRequest = read_json(&app, body).await?;
    let name = lock_name(req.lock_name)?;
    let id = AcquirerId::new(&req.acquirer_id)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("acquirerId: {e}")))?;
    app.store.cancel(name, id).await.map_err(store_error)?;
    Ok(outcome(&ReleaseResponse::default(), None))
}

#[derive(Debug, serde::Deserialize)]
struct StatusParams {
    name: Option<String>,
    limit: Option<usize>,
}

async fn status(
    State(app): State<Arc<App>>,
    params: Result<Query<StatusParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let query = match params.name {
        Some(name) => StatusQuery::one(lock_name(name)?.as_str()),
        None => StatusQuery::all(params.limit.unwrap_or(app.status_limit)),
    };
    let status = app.store.status(query).await.map_err(store_error)?;
    Ok(json(StatusCode::OK, &status))
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let grace = app.store.grace_remaining();
    let status = if app.closing.load(Ordering::Relaxed) {
        "shutting_down"
    } else if grace.is_some() {
        "grace"
    } else {
        "ok"
    };
    let code = if status == "shutting_down" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = HealthResponse {
        status: status.to_owned(),
        grace_remaining_ms: grace.map(millis),
    };
    json(code, &body)
}

async fn metrics(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let text = app
        .metrics
        .render()
        .map_err(|_| ApiError::new(ErrorCode::Internal, "cannot render the metrics"))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!(
            "no endpoint {:?}: the lock endpoints are POST /acquire, /renew-lease, /release",
            truncate(req.uri().path())
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{} is not allowed on {}",
            req.method(),
            truncate(req.uri().path())
        ),
    )
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new(ErrorCode::Internal, "internal error").into_response()
}
