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
//! let store = Arc::new(MemoryStore::new(MemoryConfig::default().grace(Duration::ZERO))?);
//! let server = Server::new(store, ServerConfig::default())?;
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

mod config;
mod conn;
mod deadlines;
mod endpoints;
mod gate;
mod http;
#[cfg(feature = "kubernetes")]
mod kubernetes;
mod memory;
mod metrics;
mod peers;
mod store;

use std::future::Future;
use std::sync::Arc;

pub use config::{ConfigError, ServerConfig, TlsConfig, TlsError, MAX_DURATION};
#[cfg(feature = "kubernetes")]
pub use kubernetes::{KubernetesStore, KubernetesStoreConfig};
pub use memory::{MemoryConfig, MemoryStore, DEFAULT_TTL};
pub use store::{
    AcquireSpec, Acquired, AcquirerId, AcquirerIdError, Capacity, Grant, LeaseRef, StatusQuery,
    Store, StoreError, StoreFuture, StoreStats, MAX_ACQUIRER_ID_LEN,
};

/// An HTTP lock server over a [`Store`].
#[derive(Debug)]
pub struct Server {
    app: Arc<http::App>,
    config: ServerConfig,
}

impl Server {
    /// A server for `store`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for an empty token, a duration of zero or over [`MAX_DURATION`], or a
    /// cap of zero.
    pub fn new(store: Arc<dyn Store>, config: ServerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            app: Arc::new(http::App::new(store, &config)),
            config,
        })
    }

    /// A handle to change the token or the certificate while the server runs.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            app: Arc::clone(&self.app),
        }
    }

    /// Serves connections from `listener` until `shutdown` completes; then drains: `/readyz`
    /// fails and answers close their connections while the server serves on for the drain
    /// delay ([`ServerConfig::drain_delay`]). Then it stops accepting, ends open long polls
    /// (`503 shutting_down`, or `should wait` to a client that did not ask for a long poll),
    /// answers the requests in flight, closes idle connections and returns, within the
    /// shutdown timeout. The store is closed: leases of a memory store end with it (renewals
    /// answer `no existing lock lease found`).
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

/// Changes the token or the certificate of a running [`Server`] (e.g. on `SIGHUP`): requests
/// and TLS handshakes from then on use the new one; leases, queues and open connections are
/// untouched.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use lockgate::server::{MemoryConfig, MemoryStore, Server, ServerConfig};
///
/// let store = Arc::new(MemoryStore::new(MemoryConfig::default())?);
/// let server = Server::new(store, ServerConfig::default().token("old"))?;
/// let handle = server.handle();
/// handle.set_token("new")?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ServerHandle {
    app: Arc<http::App>,
}

impl ServerHandle {
    /// Requires `token` from now on (see [`ServerConfig::token`]); a server started without a
    /// token starts requiring one.
    ///
    /// # Errors
    ///
    /// [`ConfigError::EmptyToken`].
    pub fn set_token(&self, token: impl AsRef<[u8]>) -> Result<(), ConfigError> {
        self.app.set_token(token.as_ref())
    }

    /// Serves new TLS handshakes with `tls`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::TlsMismatch`] when the server was started without TLS.
    pub fn set_tls(&self, tls: TlsConfig) -> Result<(), ConfigError> {
        self.app.set_tls(tls)
    }
}

#[cfg(test)]
mod handle_tests;
#[cfg(test)]
mod tests;
