//! A lease held through a lock server, and its release.

use std::sync::Arc;
use std::time::Duration;

use super::client::{HttpSession, Remote};
use super::protocol::{ErrorCode, LeaseRequest, LockHandle, ReleaseResponse, RELEASE_PATH};
use crate::backend::{BoxFuture, Lease, LostReason, LostSignal};
use crate::clock::{self, Boot};
use crate::error::Error;

/// One member's hold of a lock leased through a server.
pub(crate) struct HttpLease {
    /// Keeps the locker alive until the lease is released.
    session: Arc<HttpSession>,
    name: String,
    key: String,
    member: u64,
    signal: LostSignal,
    token: Option<u64>,
    released: bool,
}

impl std::fmt::Debug for HttpLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpLease")
            .field("name", &self.name)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl HttpLease {
    pub fn new(
        session: Arc<HttpSession>,
        name: &str,
        key: &str,
        member: u64,
        signal: LostSignal,
        token: Option<u64>,
    ) -> Self {
        Self {
            session,
            name: name.to_owned(),
            key: key.to_owned(),
            member,
            signal,
            token,
            released: false,
        }
    }

    fn take(&mut self) -> impl std::future::Future<Output = Result<(), Error>> + Send + 'static {
        self.released = true;
        let (session, name, key, member, signal) = (
            Arc::clone(&self.session),
            self.name.clone(),
            self.key.clone(),
            self.member,
            self.signal.clone(),
        );
        async move {
            // Lost already (told so, or past its deadline): a release changes nothing. (Asked
            // before leaving, which ends the signal's deadline.)
            let lost = signal.reason();
            let leaving = session.leave(&key, member);
            let Some(leaving) = leaving.filter(|_| lost.is_none()) else {
                return Err(Error::LeaseLost {
                    name,
                    reason: signal.reason().unwrap_or(LostReason::Taken),
                });
            };
            let remote = session.renewer();
            // Past this the lease has expired on the server anyway.
            let until = leaving.confirmed + remote.ttl();
            remote.release(&leaving.state.handle, until).await?;
            tracing::debug!(
                lock = name,
                server = remote.transport.base(),
                "lock released"
            );
            Ok(())
        }
    }
}

impl Lease for HttpLease {
    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(self.take())
    }

    fn release_blocking(mut self: Box<Self>) -> Result<(), Error> {
        let session = std::sync::Arc::clone(&self.session);
        session.bridge().release_blocking(|| self.take())
    }

    fn lost_signal(&self) -> LostSignal {
        self.signal.clone()
    }

    fn fencing_token(&self) -> Option<u64> {
        self.token
    }
}

impl Drop for HttpLease {
    fn drop(&mut self) {
        if !self.released {
            let release = self.take();
            self.session
                .bridge()
                .release_on_drop(self.name.clone(), release);
        }
    }
}

impl Remote {
    /// Releases `handle` (one holder's share of it), retrying passing failures until `until`.
    ///
    /// A release whose answer was lost is not sent again: a handle names a lease only until it
    /// is released (Go's server and lockgate's Kubernetes store count the shared holders of one
    /// uuid, and the Kubernetes store may grant a released record's uuid to the next holder), so
    /// a repeat could give up someone else's hold. If it did not land, the lease expires on the
    /// server within a TTL.
    pub(crate) async fn release(&self, handle: &LockHandle, until: Boot) -> Result<(), Error> {
        let lost = |reason| Error::LeaseLost {
            name: handle.lock_name.clone(),
            reason,
        };
        let req = LeaseRequest {
            lock_handle: handle.clone(),
        };
        let mut pause = Duration::from_millis(100);
        loop {
            let answer = self
                .transport
                .post::<_, ReleaseResponse>(RELEASE_PATH, &req, self.config.request_timeout)
                .await;
            let e = match answer {
                Ok(r) => {
                    return match r.error_code() {
                        None => Ok(()),
                        Some(ErrorCode::LockAlreadyLeased) => Err(lost(LostReason::Taken)),
                        Some(ErrorCode::NoExistingLockLeaseFound) => Err(lost(LostReason::Gone)),
                        Some(code) => Err(Error::ServerRefused {
                            server: self.transport.base().to_owned(),
                            status: 200,
                            code: Some(code),
                            message: r.err,
                        }),
                    }
                }
                Err(e) => e,
            };
            if e.in_doubt() {
                tracing::warn!(lock = handle.lock_name, error = %crate::error::chain(&e.into_error(self.transport.base())), "the answer to a release was lost; not repeating it (if it did not land, the lease expires on the server within a TTL)");
                return Ok(());
            }
            if !e.transient() {
                return Err(e.into_error(self.transport.base()));
            }
            let pause_now = e.retry_after().unwrap_or(pause);
            if clock::boot() + pause_now >= until {
                return Err(e.into_error(self.transport.base()));
            }
            tracing::warn!(lock = handle.lock_name, error = %crate::error::chain(&e.into_error(self.transport.base())), "release failed; retrying");
            tokio::time::sleep(pause_now).await;
            pause = (pause * 2).min(Duration::from_millis(1600));
        }
    }

    /// Releases a grant nobody holds (its acquisition was cancelled), best effort.
    pub(crate) async fn release_abandoned(&self, handle: LockHandle) {
        let until = clock::boot() + self.ttl();
        if let Err(e) = self.release(&handle, until).await {
            tracing::debug!(lock = handle.lock_name, error = %crate::error::chain(&e), "cannot release an abandoned grant");
        }
    }
}
