//! Settings of an [`HttpLocker`](super::HttpLocker).

use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

use crate::error::Error;

/// Settings of an [`HttpLocker`](super::HttpLocker): the token, TLS roots and the request
/// timeout. Lease timing is not configured: the client learns the TTL from the server.
///
/// ```
/// use std::time::Duration;
/// use lockgate::HttpConfig;
///
/// let config = HttpConfig::default()
///     .token("s3cret")
///     .request_timeout(Duration::from_secs(5));
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct HttpConfig {
    pub(crate) token: Option<String>,
    pub(crate) roots: Vec<CertificateDer<'static>>,
    pub(crate) request_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            token: None,
            roots: Vec::new(),
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("roots", &self.roots.len())
            .field("request_timeout", &self.request_timeout)
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

    /// Trusts the certificates in `pem` (a CA bundle, or the server's own self-signed
    /// certificate) for `https://` servers, besides the system's roots.
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
