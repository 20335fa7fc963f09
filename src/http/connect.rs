//! How the client connects to a lock server, and what it makes of a connection that fails:
//! host names resolved with getaddrinfo(3) so that an unknown name is told from a resolver
//! that is down, TLS with the system's roots, extra roots and pinned certificates, and the
//! failures sorted into those that may heal (retry) and those that cannot (fail at once).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::Error;

/// Why a host name has no address.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LookupError {
    /// The name does not exist (`EAI_NONAME`, `EAI_NODATA`, `EAI_FAIL`): a misspelt host.
    #[error("unknown host {host:?} ({reason})")]
    Unknown { host: String, reason: String },
    /// The resolver could not answer now (`EAI_AGAIN`, a system error): it may later.
    #[error("cannot resolve host {host:?} ({reason})")]
    Failed { host: String, reason: String },
}

/// Resolves host names with getaddrinfo(3) on the blocking pool, as hyper-util's resolver does,
/// but keeps its error code: an unknown name cannot heal, a resolver that is down can.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Resolver;

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = LookupError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, LookupError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), LookupError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let h = host.clone();
            tokio::task::spawn_blocking(move || lookup(&h))
                .await
                .unwrap_or_else(|e| {
                    Err(LookupError::Failed {
                        host,
                        reason: e.to_string(),
                    })
                })
                .map(Vec::into_iter)
        })
    }
}

/// The addresses of `host` (TCP; the port is the connector's).
fn lookup(host: &str) -> Result<Vec<SocketAddr>, LookupError> {
    let failed = |reason: String| LookupError::Failed {
        host: host.to_owned(),
        reason,
    };
    let c_host = std::ffi::CString::new(host).map_err(|_| failed("a NUL byte".into()))?;
    // SAFETY: a zeroed addrinfo is a valid "no hints" value; the fields set are plain integers.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_UNSPEC;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut list: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: getaddrinfo with a valid C string, valid hints and an out pointer; the list it
    // returns is freed below.
    let code = unsafe { libc::getaddrinfo(c_host.as_ptr(), std::ptr::null(), &hints, &mut list) };
    if code != 0 {
        let reason = if code == libc::EAI_SYSTEM {
            std::io::Error::last_os_error().to_string()
        } else {
            // SAFETY: gai_strerror returns a static, NUL-terminated message.
            unsafe { std::ffi::CStr::from_ptr(libc::gai_strerror(code)) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(match code {
            libc::EAI_NONAME | libc::EAI_NODATA | libc::EAI_FAIL => LookupError::Unknown {
                host: host.to_owned(),
                reason,
            },
            _ => failed(reason),
        });
    }
    let mut addrs = Vec::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is an element of the list getaddrinfo returned, not freed yet; ai_addr
        // points at a sockaddr of the family ai_family says.
        unsafe {
            let ai = &*at;
            match ai.ai_family {
                libc::AF_INET => {
                    let sa = &*(ai.ai_addr as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
                    addrs.push(SocketAddr::from((ip, 0)));
                }
                libc::AF_INET6 => {
                    let sa = &*(ai.ai_addr as *const libc::sockaddr_in6);
                    let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr);
                    addrs.push(SocketAddr::V6(std::net::SocketAddrV6::new(
                        ip,
                        0,
                        sa.sin6_flowinfo,
                        sa.sin6_scope_id,
                    )));
                }
                _ => {}
            }
            at = ai.ai_next;
        }
    }
    // SAFETY: the list getaddrinfo returned, freed once.
    unsafe { libc::freeaddrinfo(list) };
    if addrs.is_empty() {
        return Err(LookupError::Unknown {
            host: host.to_owned(),
            reason: "no IPv4 or IPv6 address".into(),
        });
    }
    Ok(addrs)
}

/// rustls with the system's roots (for `https://` only) and `extra`, which are also pinned: a
/// server presenting exactly one of them is trusted.
pub(crate) fn tls_config(
    https: bool,
    extra: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    if https {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!(error = %e, "cannot load a system root certificate");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::trace!(added, ignored, "system root certificates");
    }
    for cert in extra {
        roots
            .add(cert.clone())
            .map_err(|e| Error::InvalidConfig(format!("unusable root certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidConfig(format!("TLS: {e}")))?;
    if roots.is_empty() {
        // Plain http://, or no roots at all: every certificate is refused.
        return Ok(builder.with_root_certificates(roots).with_no_client_auth());
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| Error::InvalidConfig(format!("TLS: {e}")))?;
    let verifier = Pinned {
        webpki,
        pins: extra.to_vec(),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// The usual verification, except that a server certificate equal to a pinned one is trusted as
/// it is. The handshake's signatures are always checked, so the server must hold the pinned
/// certificate's key.
#[derive(Debug)]
struct Pinned {
    webpki: Arc<WebPkiServerVerifier>,
    pins: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pins.iter().any(|p| p.as_ref() == end_entity.as_ref()) {
            return Ok(ServerCertVerified::assertion());
        }
        self.webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A failure no retry can mend, found in the causes of a failed request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Permanent {
    /// The host name does not exist.
    #[error(transparent)]
    UnknownHost(#[from] LookupError),
    /// The server's certificate is not trusted.
    #[error("{0}")]
    Untrusted(rustls::Error),
    /// The server does not answer TLS (an `https://` URL for an `http://` server).
    #[error("it does not answer TLS ({0}): is it an http:// server?")]
    NotTls(rustls::Error),
    /// Another TLS failure (no common protocol version or cipher suite, a TLS alert).
    #[error("{0}")]
    Tls(rustls::Error),
    /// The answer is not HTTP (an `http://` URL for an `https://` server).
    #[error("its answer is not HTTP ({0}): is it an https:// server?")]
    NotHttp(String),
}

impl Permanent {
    /// The user's error, naming the server.
    pub(crate) fn into_error(self, server: String) -> Error {
        match self {
            Permanent::Untrusted(_) => Error::UntrustedCertificate {
                server,
                source: Box::new(self),
            },
            // An http:// URL for an https:// server is a TLS matter too.
            Permanent::NotTls(_) | Permanent::Tls(_) | Permanent::NotHttp(_) => Error::ServerTls {
                server,
                source: Box::new(self),
            },
            // One cause, said once: not hyper's and the connector's wrappers around it.
            Permanent::UnknownHost(_) => Error::ServerUnreachable {
                server,
                source: Box::new(self),
            },
        }
    }
}

/// The failure among `e`'s causes that no retry can mend, if there is one.
pub(crate) fn permanent(e: &(dyn std::error::Error + 'static)) -> Option<Permanent> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(LookupError::Unknown { host, reason }) = c.downcast_ref::<LookupError>() {
            return Some(Permanent::UnknownHost(LookupError::Unknown {
                host: host.clone(),
                reason: reason.clone(),
            }));
        }
        if let Some(tls) = rustls_error(c) {
            return Some(match tls {
                rustls::Error::InvalidCertificate(_) => Permanent::Untrusted(tls.clone()),
                rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                    Permanent::NotTls(tls.clone())
                }
                _ => Permanent::Tls(tls.clone()),
            });
        }
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() {
                return Some(Permanent::NotHttp(h.to_string()));
            }
        }
        // An io::Error's source() skips the error it wraps: look into it.
        cause = match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    None
}

/// The rustls error `e` is, or that it wraps in io::Errors (tokio-rustls wraps it in one,
/// hyper-rustls that one in another).
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut e = e;
    loop {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        e = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    }
}
