//! The server's settings: limits, security, TLS, and why a setting is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;

/// The longest duration any setting of the server takes (a day): beyond it, deadlines would
/// overflow the clock's range on some platforms, and no lock server needs more.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Why a setting of a [`Server`](super::Server) or a [`MemoryStore`](super::MemoryStore) is
/// refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// An empty token would let every request in while looking protected.
    #[error("the token is empty")]
    EmptyToken,
    /// A duration outside its range.
    #[error("{what} must be between {min:?} and {max:?}, not {value:?}")]
    OutOfRange {
        /// The setting.
        what: &'static str,
        /// The value given.
        value: Duration,
        /// The shortest accepted.
        min: Duration,
        /// The longest accepted.
        max: Duration,
    },
    /// A count that must be at least 1.
    #[error("{what} must be at least 1")]
    Zero {
        /// The setting.
        what: &'static str,
    },
    /// A certificate given to a server that was started without TLS (or the reverse).
    #[error("the server was started {}; it cannot switch", if *.tls { "with TLS" } else { "without TLS" })]
    TlsMismatch {
        /// Whether the server serves TLS.
        tls: bool,
    },
    /// The fencing state file cannot be read or written.
    #[error("cannot use the fencing state file {}", path.display())]
    FencingState {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The fencing state file holds something else than a token.
    #[error("the fencing state file {} does not hold a fencing token", path.display())]
    FencingStateCorrupt {
        /// The file.
        path: PathBuf,
    },
}

pub(crate) fn check_duration(
    what: &'static str,
    value: Duration,
    min: Duration,
) -> Result<(), ConfigError> {
    if value < min || value > MAX_DURATION {
        return Err(ConfigError::OutOfRange {
            what,
            value,
            min,
            max: MAX_DURATION,
        });
    }
    Ok(())
}

/// Which `Host` a request may name (DNS rebinding: a web page whose domain now resolves to the
/// server's address sends its domain as `Host`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Hosts {
    /// IP addresses and `localhost`; any name once a token is required.
    #[default]
    Default,
    /// Any.
    Any,
    /// IP addresses, `localhost` and these names (lowercase, without port).
    Names(Vec<String>),
}

/// Limits and security of a [`Server`](super::Server). The defaults suit a server on a private
/// network in a small pod (256 MiB); every limit answers with a JSON `err` and a
/// `4xx`/`503` status.
///
/// ```
/// use std::time::Duration;
/// use lockgate::server::ServerConfig;
///
/// let config = ServerConfig::default()
///     .token("s3cret")
///     .max_wait(Duration::from_secs(20))
///     .allowed_host("locks.example.com");
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct ServerConfig {
    pub(crate) token: Option<Vec<u8>>,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) body_limit: usize,
    pub(crate) header_timeout: Duration,
    pub(crate) body_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) send_timeout: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_client: usize,
    pub(crate) max_unauthorized_per_client: u32,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) drain_delay: Duration,
    pub(crate) status_limit: usize,
    pub(crate) hosts: Hosts,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .field("body_limit", &self.body_limit)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("max_wait", &self.max_wait)
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_client",
                &self.max_connections_per_client,
            )
            .field(
                "max_unauthorized_per_client",
                &self.max_unauthorized_per_client,
            )
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("drain_delay", &self.drain_delay)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            token: None,
            tls: None,
            body_limit: 16 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            // Above Go's idle connection timeout (90 s): Go closes an idle connection before we
            // do, so it never sends a request on one we are closing (Go does not retry a POST).
            idle_timeout: Duration::from_secs(120),
            send_timeout: Duration::from_secs(10),
            max_wait: Duration::from_secs(30),
            max_connections: 4096,
            max_connections_per_client: 1024,
            max_unauthorized_per_client: 30,
            shutdown_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            status_limit: 1000,
            hosts: Hosts::Default,
        }
    }
}

impl ServerConfig {
    /// Requires `Authorization: Bearer TOKEN` (or HTTP basic authentication with TOKEN as the
    /// password, which Go's client sends for `http://user:TOKEN@host:port`) on every endpoint
    /// but `/healthz` and `/readyz`. Compared in constant time. An empty token is refused by
    /// [`Server::new`](super::Server::new).
    pub fn token(mut self, token: impl AsRef<[u8]>) -> Self {
        self.token = Some(token.as_ref().to_vec());
        self
    }

    /// Serves HTTPS (HTTP/1.1 and HTTP/2 by ALPN).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The largest request body accepted (default 16 KiB; a request is under 2 KiB).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// How long a request head (and a TLS handshake) may take to arrive, from its first byte or
    /// from the connection's start (default 10 s). On HTTP/2, how long the connection may stay
    /// open before its first request.
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = timeout;
        self
    }

    /// How long a request body may take to arrive after its head (default 10 s).
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// How long a connection may stay open with no request (default 120 s, above Go's 90 s).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How long an answer may wait for the client to take its bytes (default 10 s): a client
    /// that sends requests and does not read the answers is disconnected after it.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// The longest long poll: a longer `waitMs` is shortened to this (default 30 s; clients
    /// ask again).
    pub fn max_wait(mut self, max: Duration) -> Self {
        self.max_wait = max;
        self
    }

    /// Open connections at most (default 4096); more are closed at once.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// Open connections from one client address at most (default 1024; IPv6 clients count
    /// by their /64); more are closed at once. Behind a proxy every client has the proxy's
    /// address: raise it there.
    pub fn max_connections_per_client(mut self, max: usize) -> Self {
        self.max_connections_per_client = max;
        self
    }

    /// Requests with a missing or wrong token one client address may make per minute (default
    /// 30, at most 30 of them at once); beyond it every request from there is answered `429`
    /// until the budget refills. Every `401` also closes its connection.
    pub fn max_unauthorized_per_client(mut self, per_minute: u32) -> Self {
        self.max_unauthorized_per_client = per_minute;
        self
    }

    /// How long a shutdown waits for open requests to be answered (default 10 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How long the server keeps serving after it is told to stop, with `/readyz` failing
    /// (default 0): the time a load balancer or Kubernetes takes to stop sending it new
    /// clients. Answers during the delay close their HTTP/1 connection, and HTTP/2 connections
    /// are told to go away, so that clients reconnect elsewhere.
    pub fn drain_delay(mut self, delay: Duration) -> Self {
        self.drain_delay = delay;
        self
    }

    /// Also accepts requests whose `Host` names `host` (a name, without port; `*`: any name).
    ///
    /// Without it the server accepts `Host` values that are IP addresses or `localhost`, and
    /// any name once a token is required: a web page that makes its own domain resolve to the
    /// server's address (DNS rebinding) cannot use a server without a token. Once a name is
    /// given, only IP addresses, `localhost` and the names given are accepted, token or not.
    pub fn allowed_host(mut self, host: impl AsRef<str>) -> Self {
        let host = host
            .as_ref()
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if host == "*" {
            self.hosts = Hosts::Any;
            return self;
        }
        match &mut self.hosts {
            Hosts::Any => {}
            Hosts::Names(names) => names.push(host),
            Hosts::Default => self.hosts = Hosts::Names(vec![host]),
        }
        self
    }

    /// Checks every setting.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.token.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::EmptyToken);
        }
        let ms = Duration::from_millis(1);
        check_duration("the header timeout", self.header_timeout, ms)?;
        check_duration("the body timeout", self.body_timeout, ms)?;
        check_duration("the idle timeout", self.idle_timeout, ms)?;
        check_duration("the send timeout", self.send_timeout, ms)?;
        check_duration("the longest wait", self.max_wait, ms)?;
        check_duration(
            "the shutdown timeout",
            self.shutdown_timeout,
            Duration::ZERO,
        )?;
        check_duration("the drain delay", self.drain_delay, Duration::ZERO)?;
        for (what, n) in [
            ("the connection cap", self.max_connections),
            (
                "the connection cap per client",
                self.max_connections_per_client,
            ),
            (
                "the unauthorized requests per client",
                self.max_unauthorized_per_client as usize,
            ),
            ("the body limit", self.body_limit),
        ] {
            if n == 0 {
                return Err(ConfigError::Zero { what });
            }
        }
        Ok(())
    }
}

/// A certificate chain and private key for HTTPS.
#[derive(Clone)]
pub struct TlsConfig(pub(crate) Arc<rustls::ServerConfig>);

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

/// Why a certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No `CERTIFICATE` block in the PEM.
    #[error("no PEM certificate found")]
    NoCertificate,
    /// No private key block (PKCS#8, PKCS#1 or SEC1) in the PEM.
    #[error("no PEM private key found")]
    NoKey,
    /// rustls refused the certificate or key.
    #[error("invalid certificate or key")]
    Invalid(#[source] rustls::Error),
}

impl TlsConfig {
    /// From PEM files: the certificate chain (leaf first) and its private key.
    ///
    /// # Errors
    ///
    /// [`TlsError`] when a file cannot be read or holds no usable certificate or key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    /// From PEM text: the certificate chain (leaf first) and its private key.
    ///
    /// # Errors
    ///
    /// [`TlsError`] when no usable certificate or key is found.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .filter_map(Result::ok)
            .collect();
        if certs.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| TlsError::NoKey)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Invalid)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(TlsError::Invalid)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self(Arc::new(config)))
    }
}
