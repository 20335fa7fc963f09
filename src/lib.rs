//! Shared and exclusive locks for threads, processes and hosts.
//!
//! lockgate takes named locks through a [`Locker`]. The locking mechanism is a backend:
//!
//! - [`FileLocker`] (feature `file`, on by default): processes on one host, a directory of lock
//!   files locked with flock(2).
//! - `KubernetesLocker` (feature `kubernetes`): processes anywhere, locks in the annotations of
//!   any Kubernetes object, with leases renewed in the background.
//! - `HttpLocker` (feature `http`): processes that reach a lock server, `lockgate serve` or Go
//!   lockgate's, with leases renewed in the background.
//! - [`server`] (feature `server`): an HTTP lock server, wire-compatible with Go lockgate's
//!   HTTP locker clients, with long polls, fair queues and fencing tokens.
//!
//! Locks are shared or exclusive ([`Mode`]); an acquisition is non-blocking, blocking, or
//! blocking with a timeout or deadline ([`Wait`]); it returns a [`LockGuard`] that releases the
//! lock when dropped. Everything has an async API (Tokio) and a blocking twin that needs no
//! runtime. Storage formats are those of Go lockgate, so Rust and Go processes exclude each other;
//! see `PROTOCOL.md`.
//!
//! # Features
//!
//! | feature | default | gives |
//! |---|---|---|
//! | `file` | yes | [`FileLocker`]: flock(2) locks on one host |
//! | `kubernetes` | no | `KubernetesLocker`: locks in the annotations of any Kubernetes object (kube-rs; the final binary chooses a `k8s-openapi` version feature) |
//! | `server` | no | `lockgate::server`: the HTTP lock server (axum, rustls) |
//! | `http` | no | `lockgate::http::protocol`: the HTTP wire types |
//!
//! # Examples
//!
//! The repository's `examples/` has runnable programs: Go lockgate's three cases on file and on
//! Kubernetes locks, the handle API, and a worker fenced by its lock's tokens
//! (`cargo run --example file_locks`).
//!
//! A blocking lock with a timeout:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use lockgate::{AcquireOptions, FileLocker, Locker};
//!
//! # let dir = tempfile::tempdir()?;
//! let locker = Locker::new(FileLocker::new(dir.path())?);
//! let guard = locker
//!     .acquire("myresource", AcquireOptions::exclusive().timeout(Duration::from_secs(30)))
//!     .await?;
//! // ... work under the lock ...
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Non-blocking:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use lockgate::{AcquireError, AcquireOptions, FileLocker, Locker};
//!
//! # let dir = tempfile::tempdir()?;
//! let locker = Locker::new(FileLocker::new(dir.path())?);
//! let first = locker.acquire_blocking("myresource", AcquireOptions::exclusive())?;
//! match locker.acquire_blocking("myresource", AcquireOptions::exclusive().non_blocking()) {
//!     Ok(_guard) => unreachable!("held by `first`"),
//!     Err(AcquireError::WouldBlock { .. }) => { /* busy: do something else */ }
//!     Err(e) => return Err(e.into()),
//! }
//! drop(first);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]
// Without a backend the crate is only its API; helpers the backends share go unused.
#![cfg_attr(
    not(any(feature = "file", feature = "kubernetes", feature = "http")),
    allow(dead_code)
)]

mod acquire;
pub mod backend;
#[cfg_attr(not(any(feature = "kubernetes", feature = "http")), allow(dead_code))]
mod clock;
mod error;
#[cfg(feature = "file")]
pub mod file;
#[cfg(any(feature = "file", feature = "kubernetes"))]
mod host;
#[cfg(any(feature = "server", feature = "http"))]
pub mod http;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
mod locker;
mod name;
#[cfg(all(test, feature = "file"))]
mod name_proptests;
mod options;
#[cfg(feature = "server")]
pub mod server;
#[cfg(any(feature = "kubernetes", feature = "http"))]
mod session;

pub use backend::{LostReason, LostSignal};
#[cfg(feature = "simulation")]
#[doc(hidden)]
pub use clock::sim;
pub use error::{AcquireError, Error, Result};
#[cfg(feature = "file")]
pub use file::FileLocker;
#[cfg(feature = "http")]
pub use http::{HttpConfig, HttpLocker};
#[cfg(feature = "kubernetes")]
pub use kubernetes::KubernetesLocker;
pub use locker::{with_acquire, with_acquire_blocking, LockGuard, LockHandle, Locker};
pub use name::{LockName, NameError, MAX_NAME_LEN};
pub use options::{AcquireOptions, Holder, Mode, Wait, WaitInfo};

/// Lowercase hex of `bytes`.
#[cfg_attr(not(any(feature = "file", feature = "kubernetes")), allow(dead_code))]
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// The README's examples, compiled and run as doctests (they include the Kubernetes locker and
/// the HTTP server).
#[cfg(all(doctest, feature = "kubernetes", feature = "server"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
