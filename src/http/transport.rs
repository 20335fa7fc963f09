//! One lock server, as the client talks to it: JSON over HTTP/1.1 (TLS with rustls for
//! `https://`), a bearer token, a timeout on every request, and every answer classified.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::connect::{permanent, tls_config, Resolver};
use super::protocol::{ErrorCode, ErrorResponse};
use super::url::Endpoint;
use crate::error::Error;

/// The largest answer read from a lock endpoint (an answer is under 1 KiB).
const ANSWER_LIMIT: usize = 64 * 1024;
/// The largest `/status` answer read.
const STATUS_LIMIT: usize = 64 * 1024 * 1024;

/// Why a request has no usable answer.
#[derive(Debug)]
pub(crate) enum CallError {
    /// No answer. `sent`: the request may have reached the server (false when connecting
    /// failed: then it certainly did not).
    Unreachable {
        sent: bool,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No answer within the request's timeout; the request may have been applied.
    TimedOut(Duration),
    /// `401`: no token, or another one.
    Unauthorized,
    /// An answer other than `200`, or a `200` that is not the protocol's.
    Refused {
        status: u16,
        code: Option<ErrorCode>,
        message: String,
        retry_after: Option<Duration>,
    },
}

impl CallError {
    /// True for failures that pass: the server unreachable, slow, overloaded or restarting. Not
    /// an unknown host name, an untrusted certificate, or a server of the other scheme: no
    /// retry mends those.
    pub fn transient(&self) -> bool {
        match self {
            CallError::Unreachable { source, .. } => permanent(source.as_ref()).is_none(),
            CallError::TimedOut(_) => true,
            CallError::Unauthorized => false,
            CallError::Refused { status, .. } => matches!(status, 408 | 429 | 500..=599),
        }
    }

    /// True when the request may have been applied although no answer says so.
    ///
    /// A 5xx proves nothing was applied only when it carries one of lockgate's own codes for a
    /// request refused before it was handled (over capacity, shutting down, store unreachable):
    /// a proxy in front of the server answers 502/503/504 after forwarding, and a server
    /// answers 500/504 after a store write of unknown outcome.
    pub fn in_doubt(&self) -> bool {
        match self {
            CallError::Unreachable { sent, .. } => *sent,
            CallError::TimedOut(_) => true,
            CallError::Refused { status, code, .. } => {
                *status >= 500 && !code.is_some_and(ErrorCode::refused_before_applied)
            }
            CallError::Unauthorized => false,
        }
    }

    /// How long the server asked us to wait before asking again (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The user's error, naming the server.
    pub fn into_error(self, server: &str) -> Error {
        let server = server.to_owned();
        match self {
            CallError::Unreachable { source, .. } => match permanent(source.as_ref()) {
                Some(p) => p.into_error(server),
                None => Error::ServerUnreachable { server, source },
            },
            CallError::TimedOut(after) => Error::ServerUnreachable {
                server,
                source: format!("no answer within {after:?}").into(),
            },
            CallError::Unauthorized => Error::Unauthorized { server },
            CallError::Refused {
                status,
                code,
                message,
                ..
            } => Error::ServerRefused {
                server,
                status,
                code,
                message,
            },
        }
    }
}

/// The connection to one lock server.
pub(crate) struct Transport {
    client: Client<HttpsConnector<HttpConnector<Resolver>>, Full<Bytes>>,
    /// `scheme://authority[/prefix]`, without credentials and without a trailing `/`.
    base: String,
    authorization: Option<HeaderValue>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// A client of `endpoint`, sending `token` (if any) as a bearer token; `roots` are trusted
    /// for `https://` besides the system's, and `connect_timeout` bounds each new connection.
    pub fn new(
        endpoint: &Endpoint,
        token: Option<&str>,
        roots: &[CertificateDer<'static>],
        connect_timeout: Duration,
    ) -> Result<Self, Error> {
        let authorization = token
            .map(|t| {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    Error::InvalidConfig(
                        "the token has characters an HTTP header cannot carry".into(),
                    )
                })?;
                v.set_sensitive(true);
                Ok::<_, Error>(v)
            })
            .transpose()?;
        let mut http = HttpConnector::new_with_resolver(Resolver);
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let tls = tls_config(endpoint.https, roots)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            // Below lockgate serve's idle timeout (120 s): the server never closes a connection
            // we are about to reuse.
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(Self {
            client,
            base: endpoint.base.clone(),
            authorization,
        })
    }

    /// The server's URL, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST path` with `body` as JSON; the decoded `200` answer.
    pub async fn post<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<R, CallError> {
        let body = serde_json::to_vec(body).map_err(|e| CallError::Refused {
            status: 0,
            code: None,
            message: format!("cannot encode the request: {e}"),
            retry_after: None,
        })?;
        self.call(Method::POST, path, Some(body), timeout, ANSWER_LIMIT)
            .await
    }

    /// `GET path`; the decoded `200` answer.
    pub async fn get<R: DeserializeOwned>(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<R, CallError> {
        self.call(Method::GET, path, None, timeout, STATUS_LIMIT)
            .await
    }

    /// `GET path`; the raw `200` body.
    pub async fn get_raw(&self, path: &str, timeout: Duration) -> Result<Bytes, CallError> {
        self.exchange(Method::GET, path, None, timeout, STATUS_LIMIT)
            .await
    }

    async fn call<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
        limit: usize,
    ) -> Result<R, CallError> {
        let bytes = self.exchange(method, path, body, timeout, limit).await?;
        serde_json::from_slice(&bytes).map_err(|e| CallError::Refused {
            status: 200,
            code: None,
            message: format!(
                "the answer is not the lock protocol's ({e}): {}",
                excerpt(&bytes)
            ),
            retry_after: None,
        })
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
        limit: usize,
    ) -> Result<Bytes, CallError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if body.is_some() {
            req = req.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if let Some(auth) = &self.authorization {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| CallError::Refused {
                status: 0,
                code: None,
                message: format!("cannot build the request: {e}"),
                retry_after: None,
            })?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let sent = !e.is_connect();
                CallError::Unreachable {
                    sent,
                    source: Box::new(e),
                }
            })?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s.min(3600)));
            let bytes = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| CallError::Unreachable {
                    sent: true,
                    source: e,
                })?
                .to_bytes();
            Ok::<_, CallError>((status, retry_after, bytes))
        };
        let (status, retry_after, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| CallError::TimedOut(timeout))??;
        if status == StatusCode::OK {
            return Ok(bytes);
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(CallError::Unauthorized);
        }
        // lockgate's error answers are `{"err", "code"}`; Go's are text.
        let (code, message) = match serde_json::from_slice::<ErrorResponse>(&bytes) {
            Ok(e) if !e.err.is_empty() => (e.error_code(), e.err),
            _ => (None, excerpt(&bytes)),
        };
        Err(CallError::Refused {
            status: status.as_u16(),
            code,
            message,
            retry_after,
        })
    }
}

/// At most 200 characters of an answer, for messages.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}
