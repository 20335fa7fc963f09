//! The HTTP lock protocol: Go lockgate's, plus extensions Go ignores. See `PROTOCOL.md`,
//! section "HTTP locks".
//!
//! [`HttpLocker`] (feature `http`) is the client; `lockgate::server` (feature `server`) the
//! server; [`protocol`] the wire types both use.

#[cfg(feature = "http")]
mod acquire;
#[cfg(feature = "http")]
mod client;
#[cfg(feature = "http")]
mod config;
#[cfg(feature = "http")]
mod connect;
#[cfg(feature = "http")]
mod lease;
pub mod protocol;
#[cfg(feature = "http")]
mod transport;
#[cfg(feature = "http")]
mod url;

#[cfg(feature = "http")]
pub use client::HttpLocker;
#[cfg(feature = "http")]
pub use config::HttpConfig;

#[cfg(all(test, feature = "http", feature = "server"))]
mod tests;
