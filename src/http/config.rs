//! Settings of an [`HttpLocker`](super::HttpLocker).

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

use crate::error::Error;

/// Settings of an [`HttpLocker`](super::HttpLocker): the token, TLS roots, the request
/// timeout, and how long a waiting acquisition keeps trying a server it cannot reach. Lease
/// timing is not configured: the client learns the TTL from the server.
///
/// ```
/// use std::time::Duration;
/// use lockgate::HttpConfig;
///
/// let config = HttpConfig::default()
///     .token("s3cret")
///     .request_timeout(Duration::from_secs(5))
///     .patience(Duration::from_secs(60))
///     .on_unreachable(|e| eprintln!("{e}; retrying"));
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct HttpConfig {
    pub(crate) token: Option<String>,
    pub(crate) roots: Vec<CertificateDer<'static>>,
    pub(crate) request_timeout: Duration,
    pub(crate) patience: Option<Duration>,
    pub(crate) on_unreachable: Option<Arc<UnreachableHook>>,
}

/// What [`HttpConfig::on_unreachable`] calls.
type UnreachableHook = dyn Fn(&Error) + Send + Sync;

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            token: None,
            roots: Vec::new(),
            request_timeout: Duration::from_secs(5),
            patience: None,
            on_unreachable: None,
        }
    }
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("roots", &self.roots.len())
            .field("request_timeout", &self.request_timeout)
            .field("patience", &self.patience)
            .field("on_unreachable", &self.on_unreachable.is_some())
            .finish()
    }
}

impl HttpConfig {
    /// Sends `Authorization: Bearer TOKEN` with every request (what `lockgate serve
    /// --token-file` requires). Without it, the password of a URL `http://user:TOKEN@host` is
    /// used, as Go's client does.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Trusts the certificates in `pem` for `https://` servers, besides the system's roots: a
    /// CA (bundle), whose certificates are checked as usual (chain, validity, the server's
    /// name), and the server's own certificate, pinned: a server that presents exactly one of
    /// these certificates is trusted whatever its issuer, CA flag or names say (what a
    /// self-signed certificate from `openssl req -x509` needs).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `pem` holds no certificate.
    pub fn root_certificates_pem(mut self, pem: &[u8]) -> Result<Self, Error> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::InvalidConfig(format!("cannot read the certificates: {e}")))?;
        if certs.is_empty() {
            return Err(Error::InvalidConfig(
                "no PEM certificate in the root certificates".into(),
            ));
        }
        self.roots.extend(certs);
        Ok(self)
    }

    /// The timeout of every request (default 5 s), on top of the time a long poll asks the
    /// server to hold it. Renewals use the smaller of this and what the lease timing allows.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long a waiting acquisition keeps trying a server it cannot reach (a refused or reset
    /// connection, no answer in time, `5xx`, `429`) before it fails with
    /// [`Error::ServerUnreachable`]; counted from the first failure of an outage, and started
    /// afresh by every answer. Without it, only the acquisition's own deadline ends the
    /// retries. A non-blocking acquisition never retries; what retrying cannot mend (an unknown
    /// host name, an untrusted certificate, a refused token) fails at once.
    pub fn patience(mut self, patience: Duration) -> Self {
        self.patience = Some(patience);
        self
    }

    /// Calls `hook` when a waiting acquisition finds the server unreachable (or overloaded) and
    /// starts retrying: once per outage, with the error that started it. For a command line
    /// tool that says at once what is wrong, rather than only when the
    /// [`patience`](Self::patience) runs out.
    pub fn on_unreachable(mut self, hook: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_unreachable = Some(Arc::new(hook));
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.request_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "the request timeout must be above zero".into(),
            ));
        }
        if self.token.as_deref() == Some("") {
            return Err(Error::InvalidConfig("the token is empty".into()));
        }
        Ok(())
    }
}
