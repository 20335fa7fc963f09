//! Error types.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::name::NameError;

/// A failure: bad input, an I/O or backend error, or a misuse of a lock handle.
///
/// Contention is not an error of this type: see [`AcquireError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock name is not valid.
    #[error("invalid lock name")]
    InvalidName(#[from] NameError),

    /// The lock directory could not be created or opened.
    #[error("cannot use lock directory {path}")]
    LockDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The lock directory path names something that is not a directory.
    #[error("lock directory {path} exists and is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },

    /// The default lock directory exists but belongs to another user, so using it would let
    /// that user interfere with the locks.
    #[error("lock directory {path} belongs to uid {owner}, not to the current user (uid {uid})")]
    ForeignLockDir {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The current user.
        uid: u32,
    },

    /// A symbolic link stands where a lock file should be. Lock files are never followed through
    /// links: a link could point the lock at an unrelated file.
    #[error("{path} is a symbolic link, refusing to use it as a lock file")]
    SymlinkAtLockPath {
        /// The lock file path.
        path: PathBuf,
    },

    /// Something other than a regular file stands where a lock file should be.
    #[error("{path} is not a regular file, refusing to use it as a lock file")]
    NotARegularFile {
        /// The lock file path.
        path: PathBuf,
    },

    /// An I/O error on a lock file.
    #[error("cannot {op} lock file {path}")]
    LockFile {
        /// What was being done ("open", "lock", ...).
        op: &'static str,
        /// The lock file path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// [`Locker::release`](crate::Locker::release) was given a handle this locker did not hand
    /// out, or one already released.
    #[error(
        "unknown lock handle {uuid} for lock {name:?} (never acquired here, or already released)"
    )]
    UnknownHandle {
        /// The handle's UUID.
        uuid: String,
        /// The handle's lock name.
        name: String,
    },

    /// The lease of a lock was lost before it was released: another owner may have taken it.
    #[error("the lease of lock {name:?} was lost: {reason}")]
    LeaseLost {
        /// The lock.
        name: String,
        /// Why the lease counts as lost.
        reason: crate::LostReason,
    },

    /// The blocking API was used where it cannot work (for example from inside an async runtime
    /// with a backend that needs one).
    #[error("{0}")]
    Unsupported(&'static str),

    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// No usable Kubernetes client configuration was found (in-cluster service account,
    /// `$KUBECONFIG`, `~/.kube/config`), or it is unusable.
    #[cfg(feature = "kubernetes")]
    #[error("no usable Kubernetes client configuration: {reason}")]
    KubeConfig {
        /// What is wrong, each cause once.
        reason: String,
    },

    /// The Kubernetes resource named for the locker is unknown or used with the wrong scope.
    #[cfg(feature = "kubernetes")]
    #[error("cannot use resource {resource:?}: {reason}")]
    UnknownResource {
        /// The resource as given.
        resource: String,
        /// Why.
        reason: String,
    },

    /// The object that holds the locks does not exist.
    #[cfg(feature = "kubernetes")]
    #[error(
        "{resource} not found: create it first (a locker can create a missing ConfigMap: `create_missing`, `--create-missing`)"
    )]
    ResourceMissing {
        /// The object, e.g. `configmaps default/locks`.
        resource: String,
    },

    /// RBAC denied a request.
    #[cfg(feature = "kubernetes")]
    #[error("forbidden to {verb} {resource}: {message}")]
    Forbidden {
        /// The verb that was denied.
        verb: &'static str,
        /// The object.
        resource: String,
        /// The API server's explanation.
        message: String,
    },

    /// The object's annotations would exceed Kubernetes' 256 KiB limit.
    #[cfg(feature = "kubernetes")]
    #[error("the annotations of {resource} are full (Kubernetes allows 256 KiB in all); release locks or use another object")]
    AnnotationsFull {
        /// The object.
        resource: String,
    },

    /// A lock annotation holds something that is not a lock record. It is never overwritten.
    #[cfg(feature = "kubernetes")]
    #[error("annotation {key} of {resource} does not hold a lock record; refusing to touch it")]
    CorruptRecord {
        /// The object.
        resource: String,
        /// The annotation key.
        key: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// The API server could not be reached or did not answer in time.
    #[cfg(feature = "kubernetes")]
    #[error("cannot reach the Kubernetes API server for {resource}")]
    Unreachable {
        /// The object.
        resource: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The API server refused a request.
    #[cfg(feature = "kubernetes")]
    #[error("cannot {verb} {resource}")]
    Kubernetes {
        /// The verb.
        verb: &'static str,
        /// The object.
        resource: String,
        /// The API server's answer.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The lock server refused the request's credentials: it requires a token and the request
    /// had none, or another one.
    #[cfg(feature = "http")]
    #[error(
        "the lock server {server} refused the token (none was sent, or it is not the server's)"
    )]
    Unauthorized {
        /// The server's URL (without credentials).
        server: String,
    },

    /// The lock server could not be reached, or did not answer in time.
    #[cfg(feature = "http")]
    #[error("cannot reach the lock server {server}")]
    ServerUnreachable {
        /// The server's URL (without credentials).
        server: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The lock server's certificate is not trusted: an unknown issuer, expired, for another
    /// name, a CA's certificate used as a server's. Retrying cannot mend it; trusting the
    /// server's CA, or pinning its certificate, can
    /// ([`HttpConfig::root_certificates_pem`](crate::HttpConfig::root_certificates_pem)).
    #[cfg(feature = "http")]
    #[error("the certificate of the lock server {server} is not trusted")]
    UntrustedCertificate {
        /// The server's URL (without credentials).
        server: String,
        /// What rustls found wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// TLS with the lock server failed in another way retrying cannot mend: it does not speak
    /// TLS (an `https://` URL for an `http://` server) or speaks nothing else (an `http://` URL
    /// for an `https://` server), or it shares no protocol version or cipher suite with the
    /// client.
    #[cfg(feature = "http")]
    #[error("TLS with the lock server {server} failed")]
    ServerTls {
        /// The server's URL (without credentials).
        server: String,
        /// What rustls found wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The lock server refused a request, or answered with something that is not the lock
    /// protocol.
    #[cfg(feature = "http")]
    #[error("the lock server {server} answered {status}: {message}")]
    ServerRefused {
        /// The server's URL (without credentials).
        server: String,
        /// The HTTP status (200 for an outcome the client does not know).
        status: u16,
        /// The server's machine-readable code, when it sent one.
        code: Option<crate::http::protocol::ErrorCode>,
        /// The server's `err`, or what was wrong with the answer.
        message: String,
    },

    /// An operating system facility the locker relies on is not available.
    #[error("cannot {op}")]
    System {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Why an acquisition did not return a lock.
///
/// [`WouldBlock`](Self::WouldBlock) and [`TimedOut`](Self::TimedOut) are contention, the normal
/// outcome of a busy lock; [`Failed`](Self::Failed) is a real error.
///
/// ```
/// # use lockgate::AcquireError;
/// fn describe(e: &AcquireError) -> &'static str {
///     match e {
///         AcquireError::WouldBlock { .. } | AcquireError::TimedOut { .. } => "busy",
///         AcquireError::Failed(_) => "broken",
///         _ => "other",
///     }
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcquireError {
    /// The lock is busy and the acquisition was non-blocking.
    #[error("lock {name:?} is held elsewhere")]
    WouldBlock {
        /// The lock.
        name: String,
    },
    /// The lock stayed busy until the deadline.
    #[error("timed out after {waited:.3?} waiting for lock {name:?}")]
    TimedOut {
        /// The lock.
        name: String,
        /// How long the acquisition waited.
        waited: Duration,
    },
    /// The acquisition failed.
    #[error(transparent)]
    Failed(#[from] Error),
}

impl AcquireError {
    /// True for [`WouldBlock`](Self::WouldBlock) and [`TimedOut`](Self::TimedOut): the lock was
    /// busy, nothing is broken.
    pub fn is_contention(&self) -> bool {
        matches!(self, Self::WouldBlock { .. } | Self::TimedOut { .. })
    }
}

impl From<NameError> for AcquireError {
    fn from(e: NameError) -> Self {
        Self::Failed(Error::InvalidName(e))
    }
}

/// `Result` with this crate's [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `error: cause: cause`, for logs and messages, each cause once: a cause whose text the message
/// already contains (errors that print their source themselves) is skipped.
#[allow(dead_code)]
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}
