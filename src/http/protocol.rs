//! The wire types of the HTTP lock protocol.
//!
//! Go lockgate's protocol (`distributed_locker.HttpBackendHandler` / `HttpBackend`, v0.1.1 and
//! v0.2.0): three `POST` endpoints with JSON bodies, answered `200` with JSON whose `err` string
//! carries the outcome. Go's client compares `err` by text and only reads it from a `200`
//! answer, so the lock outcomes (`should wait`, `lock already leased`, `no existing lock lease
//! found`) are always `200`.
//!
//! lockgate's extensions are extra fields that Go ignores (Go's `encoding/json` skips unknown
//! fields): `opts.waitMs` (long poll), `fencingToken` and `ttlMs` in answers, and a
//! machine-readable [`ErrorCode`] in `code` beside every non-empty `err`. `PROTOCOL.md`
//! ("HTTP locks") describes them exactly.
//!
//! Decoding is as lenient as Go's where Go clients or servers depend on it: a missing or `null`
//! `opts`, `shared`, `acquirerId`, `err` or `lockHandle` is its zero value. Field names are
//! matched exactly (Go matches them case-insensitively; every Go client sends them exactly).
//!
//! ```
//! use lockgate::http::protocol::{AcquireRequest, AcquireResponse, ErrorCode};
//!
//! // What Go lockgate v0.2's HttpLocker sends, and what a long-polling client adds:
//! let req: AcquireRequest = serde_json::from_str(
//!     r#"{"lockName":"deploy","opts":{"shared":false,"acquirerId":"","waitMs":30000}}"#,
//! )?;
//! assert_eq!(req.lock_name, "deploy");
//! assert_eq!(req.opts.wait_ms, Some(30000));
//!
//! // A Go server's "not now" and a lockgate server's:
//! for body in [
//!     r#"{"lockHandle":{"uuid":"","lockName":""},"err":"should wait"}"#,
//!     r#"{"lockHandle":{"uuid":"","lockName":""},"err":"should wait","code":"should_wait","ttlMs":10000}"#,
//! ] {
//!     let resp: AcquireResponse = serde_json::from_str(body)?;
//!     assert_eq!(resp.error_code(), Some(ErrorCode::ShouldWait));
//! }
//! # Ok::<(), serde_json::Error>(())
//! ```

use serde::{Deserialize, Deserializer, Serialize};

use crate::Mode;

/// `POST`: acquire a lock ([`AcquireRequest`] → [`AcquireResponse`]).
pub const ACQUIRE_PATH: &str = "/acquire";
/// `POST`: renew a lease ([`LeaseRequest`] → [`RenewLeaseResponse`]).
pub const RENEW_LEASE_PATH: &str = "/renew-lease";
/// `POST`: release a lease ([`LeaseRequest`] → [`ReleaseResponse`]).
pub const RELEASE_PATH: &str = "/release";
/// `POST`: an acquirer gives up its place in a lock's queue ([`CancelRequest`] →
/// [`ReleaseResponse`]); lockgate only.
pub const CANCEL_PATH: &str = "/cancel";
/// `GET`: the locks, holders and waiters ([`StatusResponse`]); lockgate only.
pub const STATUS_PATH: &str = "/status";
/// `GET`: liveness ([`HealthResponse`]), never behind the token; lockgate only.
pub const HEALTHZ_PATH: &str = "/healthz";
/// `GET`: readiness ([`HealthResponse`]): fails (`503`) from the moment the server is told to
/// stop, while it still serves; never behind the token; lockgate only.
pub const READYZ_PATH: &str = "/readyz";
/// `GET`: Prometheus text format; lockgate only.
pub const METRICS_PATH: &str = "/metrics";

/// Go's text for "not acquired now": the client may ask again.
pub const ERR_SHOULD_WAIT: &str = "should wait";
/// Go's text for "this lock is leased under another handle": the caller's lease is lost.
pub const ERR_LOCK_ALREADY_LEASED: &str = "lock already leased";
/// Go's text for "no lease of this lock exists": the caller's lease is lost.
pub const ERR_NO_EXISTING_LOCK_LEASE_FOUND: &str = "no existing lock lease found";

/// A lease handle, exactly Go's `lockgate.LockHandle`: `{"uuid", "lockName"}`.
///
/// The uuid identifies one acquisition and is the capability to renew and release it; a lockgate
/// server gives every acquisition its own (also every shared holder; Go's servers give all
/// shared holders of a lock one uuid).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockHandle {
    /// The lease's UUID (canonical hyphenated form in answers).
    #[serde(default, deserialize_with = "null_as_default")]
    pub uuid: String,
    /// The lock's name.
    #[serde(default, deserialize_with = "null_as_default")]
    pub lock_name: String,
}

/// `POST /acquire` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcquireRequest {
    /// The lock's name (required).
    pub lock_name: String,
    /// Options; missing or `null` is all defaults.
    #[serde(default, deserialize_with = "null_as_default")]
    pub opts: AcquireOpts,
}

/// The `opts` of an acquisition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcquireOpts {
    /// A shared (`true`) or exclusive (`false`, the default) lock.
    #[serde(default, deserialize_with = "null_as_default")]
    pub shared: bool,
    /// Go v0.2's acquirer id: a caller that asks again with the same id keeps its place in the
    /// lock's queue between requests ("" = none).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub acquirer_id: String,
    /// lockgate: hold the request up to this many milliseconds until the lock is granted
    /// (long poll). Missing or 0: answer at once, as Go does. The server may shorten it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

impl AcquireOpts {
    /// The requested mode.
    pub fn mode(&self) -> Mode {
        if self.shared {
            Mode::Shared
        } else {
            Mode::Exclusive
        }
    }
}

/// `/acquire` answer. Go's fields always; lockgate's only when they apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcquireResponse {
    /// The granted lease; all empty strings when `err` is not empty (as Go writes it).
    #[serde(default, deserialize_with = "null_as_default")]
    pub lock_handle: LockHandle,
    /// Go's `util.SerializableError`: `""` when granted, else the error text
    /// ([`ERR_SHOULD_WAIT`] when the lock is busy).
    #[serde(default, deserialize_with = "null_as_default")]
    pub err: String,
    /// lockgate: what `err` means, when it is not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// lockgate: the grant's fencing token, strictly increasing per lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
    /// lockgate: the server's lease TTL in milliseconds (renew well within it). Present in every
    /// `/acquire` answer of a lockgate server, also `should wait`: its absence means a Go server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

impl AcquireResponse {
    /// The outcome's code: [`code`](Self::code) when present, else derived from Go's text.
    pub fn error_code(&self) -> Option<ErrorCode> {
        error_code(&self.err, self.code)
    }
}

/// `POST /renew-lease` and `POST /release` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRequest {
    /// The handle `/acquire` answered.
    pub lock_handle: LockHandle,
}

/// `POST /cancel` body (lockgate only): the acquirer `acquirerId` gives up acquiring `lockName`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequest {
    /// The lock.
    pub lock_name: String,
    /// The acquirer id its acquisition sent.
    pub acquirer_id: String,
}

/// `/renew-lease` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewLeaseResponse {
    /// `""` when renewed; [`ERR_NO_EXISTING_LOCK_LEASE_FOUND`] or [`ERR_LOCK_ALREADY_LEASED`]
    /// when the lease is lost.
    #[serde(default, deserialize_with = "null_as_default")]
    pub err: String,
    /// lockgate: what `err` means, when it is not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// lockgate: the lease now lives this many milliseconds from the renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

impl RenewLeaseResponse {
    /// The outcome's code: [`code`](Self::code) when present, else derived from Go's text.
    pub fn error_code(&self) -> Option<ErrorCode> {
        error_code(&self.err, self.code)
    }
}

/// `/release` answer, and the body of every `4xx`/`5xx` answer of a lockgate server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseResponse {
    /// `""` when released, else the error text.
    #[serde(default, deserialize_with = "null_as_default")]
    pub err: String,
    /// lockgate: what `err` means, when it is not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

impl ReleaseResponse {
    /// The outcome's code: [`code`](Self::code) when present, else derived from Go's text.
    pub fn error_code(&self) -> Option<ErrorCode> {
        error_code(&self.err, self.code)
    }
}

/// The body of an error answer: `{"err": "...", "code": "..."}`.
pub type ErrorResponse = ReleaseResponse;

/// What an `err` means, machine-readable (`code` in lockgate's answers).
///
/// The first three are Go's outcomes, answered `200`; the others come with the HTTP status
/// noted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// `should wait`: the lock is busy (`200`).
    ShouldWait,
    /// `lock already leased`: the lock is held under another handle; this lease is lost (`200`).
    LockAlreadyLeased,
    /// `no existing lock lease found`: this lease expired, was released, or ended with the
    /// server (`200`).
    NoExistingLockLeaseFound,
    /// Malformed JSON, a wrong type, a bad handle or option (`400`).
    BadRequest,
    /// The lock name is empty, too long or has a control character (`400`).
    InvalidName,
    /// No or a wrong token (`401`).
    Unauthorized,
    /// No such endpoint (`404`).
    NotFound,
    /// The endpoint exists, the method does not (`405`).
    MethodNotAllowed,
    /// A request a browser made (it carries `Origin` or a `Sec-Fetch-Site` other than
    /// `none`), or one whose `Host` the server does not answer to (`403`).
    Forbidden,
    /// The request did not arrive in time (`408`).
    RequestTimeout,
    /// The body is over the limit (`413`).
    PayloadTooLarge,
    /// A `POST` body declared as something other than `application/json` (`415`).
    UnsupportedMediaType,
    /// Too many requests with a missing or wrong token from this client address (`429`, with
    /// `Retry-After`).
    TooManyRequests,
    /// A cap of the server (held leases, waiters in all, per client or per lock, the share of a
    /// Kubernetes object) is reached (`503`).
    Capacity,
    /// The server is shutting down (`503`).
    ShuttingDown,
    /// The store behind the server failed before it changed anything (`503`).
    Unavailable,
    /// A bug in the server (`500`).
    Internal,
    /// The store behind the server did not confirm a change it was sent: it may or may not
    /// have been applied (`504`).
    OutcomeUnknown,
    /// A code this version does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status a lockgate server answers with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::ShouldWait
            | ErrorCode::LockAlreadyLeased
            | ErrorCode::NoExistingLockLeaseFound => 200,
            ErrorCode::BadRequest | ErrorCode::InvalidName => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound => 404,
            ErrorCode::Forbidden => 403,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Capacity | ErrorCode::ShuttingDown | ErrorCode::Unavailable => 503,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
            ErrorCode::OutcomeUnknown => 504,
        }
    }

    /// True when a lockgate server answering this code changed nothing: every refusal
    /// (`4xx`) and every `503` it sends (`capacity`, `shutting_down`, `unavailable`), which
    /// may be repeated safely. False for the lock outcomes, for `internal` and
    /// `outcome_unknown` (the request may have been applied), and for an unknown code.
    ///
    /// ```
    /// use lockgate::http::protocol::ErrorCode;
    /// assert!(ErrorCode::Capacity.refused_before_applied());
    /// assert!(!ErrorCode::OutcomeUnknown.refused_before_applied());
    /// ```
    pub fn refused_before_applied(self) -> bool {
        !matches!(
            self,
            ErrorCode::ShouldWait
                | ErrorCode::LockAlreadyLeased
                | ErrorCode::NoExistingLockLeaseFound
                | ErrorCode::Internal
                | ErrorCode::OutcomeUnknown
                | ErrorCode::Unknown
        )
    }

    /// The code as written on the wire (`should_wait`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ShouldWait => "should_wait",
            ErrorCode::LockAlreadyLeased => "lock_already_leased",
            ErrorCode::NoExistingLockLeaseFound => "no_existing_lock_lease_found",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::TooManyRequests => "too_many_requests",
            ErrorCode::Capacity => "capacity",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::OutcomeUnknown => "outcome_unknown",
            ErrorCode::Unknown => "unknown",
        }
    }
}

/// `code` if present, else Go's three texts; `None` for an empty `err`.
fn error_code(err: &str, code: Option<ErrorCode>) -> Option<ErrorCode> {
    if err.is_empty() {
        return None;
    }
    code.or(Some(match err {
        ERR_SHOULD_WAIT => ErrorCode::ShouldWait,
        ERR_LOCK_ALREADY_LEASED => ErrorCode::LockAlreadyLeased,
        ERR_NO_EXISTING_LOCK_LEASE_FOUND => ErrorCode::NoExistingLockLeaseFound,
        _ => ErrorCode::Unknown,
    }))
}

/// `GET /status` answer (lockgate only). Query: `name=NAME` for one lock, `limit=N` (default
/// and most: 1000) for at most N locks, sorted by name, `after=NAME` for the locks after NAME
/// (the next page). Acquirer ids are shown only to a request that carries the server's token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct StatusResponse {
    /// Locks that have holders or waiters, sorted by name.
    pub locks: Vec<LockStatus>,
    /// How many locks the server has with holders or waiters (with `name`: 0 or 1).
    pub total: usize,
    /// True when more locks follow this page (ask again with `after` = the last name).
    pub truncated: bool,
    /// The server's lease TTL in milliseconds.
    pub ttl_ms: u64,
}

/// One lock in [`StatusResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct LockStatus {
    /// The lock's name.
    pub lock_name: String,
    /// The holders' mode; `None` when the lock is free (its first waiter is about to get it).
    pub mode: Option<Mode>,
    /// The current holders, oldest grant first.
    pub holders: Vec<HolderStatus>,
    /// The queue, in the order it is served.
    pub waiters: Vec<WaiterStatus>,
}

/// One lease in [`LockStatus`]. Lease UUIDs are capabilities and never shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct HolderStatus {
    /// The lease's mode.
    pub mode: Mode,
    /// The grant's fencing token.
    pub fencing_token: u64,
    /// The acquirer id the lease was granted to, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquirer_id: Option<String>,
    /// Milliseconds since the grant.
    pub held_ms: u64,
    /// Milliseconds until the lease expires unless renewed.
    pub expires_in_ms: u64,
}

/// One queued acquirer in [`LockStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct WaiterStatus {
    /// The requested mode.
    pub mode: Mode,
    /// Its acquirer id, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquirer_id: Option<String>,
    /// Milliseconds since it joined the queue.
    pub waiting_ms: u64,
    /// True while a long-poll request of it is open; false for a poller between polls.
    pub long_poll: bool,
    /// For a poller between polls: milliseconds until its place lapses unless it asks again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place_expires_in_ms: Option<u64>,
}

/// `GET /healthz` and `GET /readyz` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct HealthResponse {
    /// `ok`, `grace` (serving, granting no lock before the start-up grace ends), `draining`
    /// (told to stop: serving on for the drain delay, `/readyz` failing) or `shutting_down`.
    pub status: String,
    /// Milliseconds left of the start-up grace, while it lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_remaining_ms: Option<u64>,
}

/// Go's decoder leaves a field at its zero value for `null`; serde would refuse it.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests;
