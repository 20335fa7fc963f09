//! Endpoints: parsing, validation, answers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use super::gate::WithToken;
use super::http::{json, truncate, ApiError, App, ConnInfo, Phase};
use super::store::{AcquireSpec, Acquired, AcquirerId, LeaseRef, StatusQuery, StoreError};
use crate::http::protocol::{
    AcquireRequest, AcquireResponse, CancelRequest, ErrorCode, HealthResponse, LeaseRequest,
    LockHandle, ReleaseResponse, RenewLeaseResponse, ERR_LOCK_ALREADY_LEASED,
    ERR_NO_EXISTING_LOCK_LEASE_FOUND, ERR_SHOULD_WAIT,
};
use crate::LockName;

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
        StoreError::OutcomeUnknown(_) => ErrorCode::OutcomeUnknown,
    };
    if let StoreError::Unavailable(_) | StoreError::OutcomeUnknown(_) = &e {
        tracing::warn!(error = %crate_error_chain(&e), "lock store failed");
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

/// A `200` answer carrying a lock outcome; the code goes to the metrics.
fn outcome(body: &impl Serialize, code: Option<ErrorCode>) -> Response {
    let mut resp = json(StatusCode::OK, body);
    if let Some(code) = code {
        resp.extensions_mut().insert(code);
    }
    resp
}

fn should_wait(ttl_ms: Option<u64>) -> Response {
    outcome(
        &AcquireResponse {
            err: ERR_SHOULD_WAIT.to_owned(),
            code: Some(ErrorCode::ShouldWait),
            ttl_ms,
            ..AcquireResponse::default()
        },
        Some(ErrorCode::ShouldWait),
    )
}

pub(crate) async fn acquire(
    State(app): State<Arc<App>>,
    conn: Option<Extension<ConnInfo>>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: AcquireRequest = read_json(&app, body).await?;
    let name = lock_name(req.lock_name)?;
    let client = conn.map(|Extension(c)| c.client());
    let mut spec = AcquireSpec::new(name.clone(), req.opts.mode());
    if let Some(c) = client {
        spec = spec.client(c);
    }
    if !req.opts.acquirer_id.is_empty() {
        let mut id = AcquirerId::new(&req.opts.acquirer_id)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("opts.acquirerId: {e}")))?;
        if let Some(c) = client {
            id = id.client(c);
        }
        spec = spec.acquirer_id(id);
    }
    // Go's client sends no waitMs and fails on any answer but a 200: to it, a full or stopping
    // server is a busy lock (it asks again in 2 s, maybe of another replica).
    let go_style = req.opts.wait_ms.is_none();
    if let Some(ms) = req.opts.wait_ms {
        spec = spec.wait(Duration::from_millis(ms).min(app.max_wait));
    }
    let ttl_ms = Some(millis(app.store.ttl()));
    let acquired = match app.store.acquire(spec).await {
        Ok(a) => a,
        Err(e @ (StoreError::Capacity(_) | StoreError::ShuttingDown)) if go_style => {
            tracing::debug!(lock = name.as_str(), reason = %e, "answering `should wait` to a client without waitMs");
            return Ok(should_wait(ttl_ms));
        }
        Err(e) => return Err(store_error(e)),
    };
    match acquired {
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
        Acquired::ShouldWait => Ok(should_wait(ttl_ms)),
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

pub(crate) async fn renew_lease(
    State(app): State<Arc<App>>,
    body: Body,
) -> Result<Response, ApiError> {
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

pub(crate) async fn release(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
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

pub(crate) async fn cancel(
    State(app): State<Arc<App>>,
    conn: Option<Extension<ConnInfo>>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: CancelRequest = read_json(&app, body).await?;
    let name = lock_name(req.lock_name)?;
    let mut id = AcquirerId::new(&req.acquirer_id)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("acquirerId: {e}")))?;
    if let Some(Extension(c)) = conn {
        id = id.client(c.client());
    }
    app.store.cancel(name, id).await.map_err(store_error)?;
    Ok(outcome(&ReleaseResponse::default(), None))
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct StatusParams {
    name: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

pub(crate) async fn status(
    State(app): State<Arc<App>>,
    with_token: Option<Extension<WithToken>>,
    params: Result<Query<StatusParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let query = match params.name {
        Some(name) => StatusQuery::one(lock_name(name)?.as_str()),
        None => {
            let mut q = StatusQuery::all(
                params
                    .limit
                    .unwrap_or(app.status_limit)
                    .min(app.status_limit),
            );
            q.after = params.after;
            q
        }
    };
    let _slot =
        app.status_slots.acquire().await.map_err(|_| {
            ApiError::new(ErrorCode::ShuttingDown, "the lock server is shutting down")
        })?;
    let mut status = app.store.status(query).await.map_err(store_error)?;
    // An acquirer id is the name of a queue place: shown only to those who have the token.
    if !with_token.is_some_and(|Extension(WithToken(t))| t) {
        for lock in &mut status.locks {
            for h in &mut lock.holders {
                h.acquirer_id = None;
            }
            for w in &mut lock.waiters {
                w.acquirer_id = None;
            }
        }
    }
    Ok(json(StatusCode::OK, &status))
}

fn health(app: &App, ready: bool) -> Response {
    let grace = app.store.grace_remaining();
    let phase = app.phase();
    let status = match phase {
        Phase::Closing => "shutting_down",
        Phase::Draining => "draining",
        Phase::Serving if grace.is_some() => "grace",
        Phase::Serving => "ok",
    };
    let up = match phase {
        Phase::Serving => true,
        Phase::Draining => !ready,
        Phase::Closing => false,
    };
    let body = HealthResponse {
        status: status.to_owned(),
        grace_remaining_ms: grace.map(millis),
    };
    let code = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, &body)
}

/// Liveness: up until the server stops accepting.
pub(crate) async fn healthz(State(app): State<Arc<App>>) -> Response {
    health(&app, false)
}

/// Readiness: down from the moment the server is told to stop.
pub(crate) async fn readyz(State(app): State<Arc<App>>) -> Response {
    health(&app, true)
}

pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
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

pub(crate) async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!(
            "no endpoint {:?}: the lock endpoints are POST /acquire, /renew-lease, /release",
            truncate(req.uri().path())
        ),
    )
}

pub(crate) async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{} is not allowed on {}",
            req.method(),
            truncate(req.uri().path())
        ),
    )
}
