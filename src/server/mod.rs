//! The HTTP lock server (feature `server`): Go lockgate's HTTP lock protocol, with long polls,
//! fair queues and fencing tokens on top.
//!
//! A [`Server`] answers the protocol of `PROTOCOL.md` ("HTTP locks") over a [`Store`] that keeps
//! the leases: the [`MemoryStore`] of one server. Go lockgate's `HttpLocker` works against it
//! unchanged. `lockgate serve` is this server on the command line.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use lockgate::server::{MemoryConfig, MemoryStore, Server, ServerConfig};
//!
//! let store = Arc::new(MemoryStore::new(MemoryConfig::default().grace(Duration::ZERO)));
//! let server = Server::new(store, ServerConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let serving = tokio::spawn(server.serve(listener, async { let _ = stopped.await; }));
//! // ... clients lock through http://{addr} ...
//! # let _ = addr;
//! let _ = stop.send(());
//! serving.await?;
//! # Ok(())
//! # }
//! ```

mod conn;
mod http;
#[cfg(feature = "kubernetes")]
mod kubernetes;
mod memory;
mod metrics;
mod store;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;

#[cfg(feature = "kubernetes")]
pub use kubernetes::KubernetesStore;
pub use memory::{MemoryConfig, MemoryStore, DEFAULT_TTL};
pub use store::{
    AcquireSpec, Acquired, AcquirerId, AcquirerIdError, Capacity, Grant, LeaseRef, StatusQuery,
    Store, StoreError, StoreFuture, StoreStats, MAX_ACQUIRER_ID_LEN,
};

/// Limits and security of a [`Server`]. The defaults suit a server on a private network;
/// every limit answers with a JSON `err` and a `4xx`/`503` status.
///
/// ```
/// use std::time::Duration;
/// use lockgate::server::ServerConfig;
///
/// let config = ServerConfig::default()
///     .token("s3cret")
///     .max_wait(Duration::from_secs(20));
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct ServerConfig {
    token: Option<[u8; 32]>,
    tls: Option<TlsConfig>,
    body_limit: usize,
    header_timeout: Duration,
    body_timeout: Duration,
    idle_timeout: Duration,
    max_wait: Duration,
    max_connections: usize,
    shutdown_timeout: Duration,
    status_limit: usize,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("token", &self.token.map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .field("body_limit", &self.body_limit)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_wait", &self.max_wait)
            .field("max_connections", &self.max_connections)
            .field("shutdown_timeout", &self.shutdown_timeout)
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
            max_wait: Duration::from_secs(30),
            max_connections: 10_000,
            shutdown_timeout: Duration::from_secs(10),
            status_limit: 1000,
        }
    }
}

impl ServerConfig {
    /// Requires `Authorization: Bearer TOKEN` (or HTTP basic authentication with TOKEN as the
    /// password, which Go's client sends for `http://user:TOKEN@host:port`) on every endpoint
    /// but `/healthz`. Compared in constant time.
    pub fn token(mut self, token: impl AsRef<[u8]>) -> Self {
        self.token = Some(http::token_digest(token.as_ref()));
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
    /// from the connection's start (default 10 s).
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

    /// The longest long poll: a longer `waitMs` is shortened to this (default 30 s; clients
    /// ask again).
    pub fn max_wait(mut self, max: Duration) -> Self {
        self.max_wait = max;
        self
    }

    /// Open connections at most (default 10 000); more are closed at once.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// How long a shutdown waits for open requests to be answered (default 10 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }
}

/// A certificate chain and private key for HTTPS.
#[derive(Clone)]
pub struct TlsConfig(Arc<rustls::ServerConfig>);

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

/// An HTTP lock server over a [`Store`].
#[derive(Debug)]
pub struct Server {
    app: Arc<http::App>,
    config: ServerConfig,
}

impl Server {
    /// A server for `store`.
    pub fn new(store: Arc<dyn Store>, config: ServerConfig) -> Self {
        let app = http::App {
            metrics: metrics::Metrics::new(store.clone()),
            store,
            token: config.token,
            body_limit: config.body_limit,
            body_timeout: config.body_timeout,
            max_wait: config.max_wait,
            status_limit: config.status_limit,
            closing: AtomicBool::new(false),
        };
        Self {
            app: Arc::new(app),
            config,
        }
    }

    /// Serves connections from `listener` until `shutdown` completes; then stops accepting,
    /// ends open long polls (`503 shutting_down`), answers the requests in flight, closes idle
    /// connections and returns, within the shutdown timeout. The store is closed: leases of a
    /// memory store end with it (renewals answer `no existing lock lease found`).
    ///
    /// Nothing a client sends can make it fail or panic: bad requests get a `4xx` answer with a
    /// JSON `err`, and a failing connection only ends itself.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops accepting but leaves connections already accepted to finish
    /// on their own tasks; complete `shutdown` instead for an orderly end.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        conn::serve(self.app, self.config, listener, shutdown).await;
    }
}

#[cfg(test)]
mod tests;
