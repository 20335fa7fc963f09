//! The gate every request passes: who may ask (the token, the budget of wrong ones), from
//! where (browsers, `Host`), how (the media type), and the metrics and log of every answer.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use subtle::ConstantTimeEq as _;

use super::config::Hosts;
use super::http::{endpoint_of, token_digest, truncate, ApiError, App, ConnInfo, Phase};
use crate::http::protocol::ErrorCode;

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
pub(crate) async fn gate(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
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
