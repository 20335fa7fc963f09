//! Acquisition through a lock server: one request when the lock is free; then long polls
//! (`lockgate serve`) or polls every 2 s (Go's server) until the deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::client::{Held, HttpSession, Remote, ServerKind};
use super::lease::HttpLease;
use super::protocol::{
    AcquireOpts, AcquireRequest, AcquireResponse, CancelRequest, ErrorCode, LockHandle,
    ReleaseResponse, StatusResponse, ACQUIRE_PATH, CANCEL_PATH, STATUS_PATH,
};
use super::transport::CallError;
use crate::acquire::Attempt;
use crate::backend::{Lease, LostNotifier};
use crate::error::{AcquireError, Error};
use crate::name::LockName;
use crate::options::{AcquireOptions, Holder, Mode};
use crate::session::Renewal;

/// The longest long poll asked for (`lockgate serve`'s default cap).
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(30);
/// Go's client polls every 2 s; so does this one against Go's server.
const GO_POLL: Duration = Duration::from_secs(2);

pub(crate) async fn acquire(
    session: &Arc<HttpSession>,
    name: &LockName,
    opts: &AcquireOptions,
) -> Result<Box<dyn Lease>, AcquireError> {
    let remote = session.renewer();
    let mut attempt = Attempt::new(name, opts);
    // A waiting acquisition keeps its place in lockgate's queue between requests with an
    // acquirer id of its own; a non-blocking one takes no place.
    let acquirer_id = if attempt.may_wait() {
        uuid::Uuid::new_v4().simple().to_string()
    } else {
        String::new()
    };
    let mut place = Place {
        remote: Arc::clone(remote),
        name: name.as_str().to_owned(),
        acquirer_id: acquirer_id.clone(),
        runtime: session.bridge().handle.clone(),
        armed: false,
    };
    let result = run(session, &mut attempt, &acquirer_id, &mut place).await;
    match result {
        // A grant took our place in the queue with it.
        Ok(_) => place.armed = false,
        // Leave the queue before returning, so that a caller that ends its runtime right after
        // leaves no place behind.
        Err(_) => place.leave().await,
    }
    result
}

async fn run(
    session: &Arc<HttpSession>,
    attempt: &mut Attempt<'_>,
    acquirer_id: &str,
    place: &mut Place,
) -> Result<Box<dyn Lease>, AcquireError> {
    let remote = session.renewer();
    let (name, opts) = (attempt.name, attempt.opts);
    let mut asked = false;
    let mut outages = 0u32;
    // When the current outage began (its first failed request), for the patience.
    let mut outage_began: Option<Instant> = None;
    loop {
        // The first request asks without waiting: a free lock is one request, and the on-wait
        // hook runs before the acquisition waits.
        let long_poll = match (asked, remote.kind()) {
            (true, ServerKind::Lockgate) => {
                let left = attempt
                    .deadline()
                    .map_or(MAX_WAIT, |d| d.saturating_duration_since(Instant::now()));
                if left < Duration::from_millis(1) {
                    return Err(attempt.busy());
                }
                Some(left.min(MAX_WAIT))
            }
            _ => None,
        };
        // The id goes to lockgate's server only: Go v0.2's keeps an acquirer's place for 10 s
        // after its last request and has no way to leave it, so a waiter that gave up would hold
        // the lock up for everyone that long (Go's clients without an id poll, as we do there).
        let id = match remote.kind() {
            ServerKind::Lockgate => acquirer_id,
            _ => "",
        };
        let request = AcquireRequest {
            lock_name: name.as_str().to_owned(),
            opts: AcquireOpts {
                shared: attempt.mode() == Mode::Shared,
                acquirer_id: id.to_owned(),
                wait_ms: long_poll.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
            },
        };
        let sent = Instant::now();
        let timeout = remote.config.request_timeout + long_poll.unwrap_or_default();
        // From the first request with an id on, we may have a place to give up.
        place.armed |= !id.is_empty();
        match call(remote, session, request, timeout).await {
            Ok(resp) => {
                outages = 0;
                outage_began = None;
                remote.learn(session, resp.ttl_ms);
                match resp.error_code() {
                    None => {
                        if let Some(lease) = grant(session, attempt, resp, sent).await? {
                            return Ok(lease);
                        }
                    }
                    Some(ErrorCode::ShouldWait) => {}
                    // Go's server answers these to an acquisition that raced with another
                    // (its take-over re-reads the record): the lock is contended.
                    Some(ErrorCode::LockAlreadyLeased | ErrorCode::NoExistingLockLeaseFound) => {
                        tracing::debug!(
                            lock = name.as_str(),
                            err = resp.err,
                            "acquisition raced on the server"
                        );
                    }
                    Some(code) => {
                        return Err(Error::ServerRefused {
                            server: remote.transport.base().to_owned(),
                            status: 200,
                            code: Some(code),
                            message: resp.err,
                        }
                        .into())
                    }
                }
            }
            Err(e) if e.transient() && attempt.may_wait() => {
                let pause = e
                    .retry_after()
                    .unwrap_or(Duration::from_millis(100 << outages.min(4)));
                let e = e.into_error(remote.transport.base());
                let began = *outage_began.get_or_insert_with(Instant::now);
                if outages == 0 {
                    if let Some(hook) = &remote.config.on_unreachable {
                        hook(&e);
                    }
                }
                // The last try comes when the patience ends: no sooner give-up.
                let pause = match remote.config.patience {
                    Some(patience) => match patience.checked_sub(began.elapsed()) {
                        Some(left) if !left.is_zero() => pause.min(left),
                        _ => return Err(gave_up(remote, patience, e).into()),
                    },
                    None => pause,
                };
                if !attempt.fits(pause) {
                    return Err(e.into());
                }
                outages += 1;
                tracing::warn!(lock = name.as_str(), error = %crate::error::chain(&e), ?pause, "lock server unavailable; retrying");
                tokio::time::sleep(pause).await;
                continue;
            }
            Err(e) => return Err(e.into_error(remote.transport.base()).into()),
        }
        // Busy.
        if !attempt.may_wait() || attempt.expired() {
            return Err(attempt.busy());
        }
        if !asked {
            asked = true;
            let holders = if opts.on_wait.is_some() && remote.kind() == ServerKind::Lockgate {
                holders(remote, name).await
            } else {
                Vec::new()
            };
            attempt.waiting(move || holders);
        }
        if remote.kind() != ServerKind::Lockgate {
            // Go's server: poll every 2 s, and once more at the deadline.
            let next = Instant::now() + GO_POLL;
            let at = attempt.deadline().map_or(next, |d| d.min(next));
            tokio::time::sleep_until(at.into()).await;
        }
    }
}

/// The error of an acquisition that stopped retrying an unreachable server after `patience`:
/// the last failure, and how long the outage lasted.
fn gave_up(remote: &Remote, patience: Duration, last: Error) -> Error {
    let cause = match &last {
        Error::ServerUnreachable { source, .. } => crate::error::chain(source.as_ref()),
        other => crate::error::chain(other),
    };
    Error::ServerUnreachable {
        server: remote.transport.base().to_owned(),
        source: format!("gave up after {patience:?} of failures, the last: {cause}").into(),
    }
}

/// Our place in a `lockgate serve` queue (an acquirer id sent): given up when the acquisition
/// ends without the lock, also when it is cancelled (Go's server keeps no place we could leave:
/// its queue members lapse after 10 s).
struct Place {
    remote: Arc<Remote>,
    name: String,
    acquirer_id: String,
    runtime: tokio::runtime::Handle,
    armed: bool,
}

impl Place {
    fn cancel(&mut self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if !std::mem::take(&mut self.armed) || self.remote.kind() != ServerKind::Lockgate {
            return None;
        }
        let remote = Arc::clone(&self.remote);
        let req = CancelRequest {
            lock_name: self.name.clone(),
            acquirer_id: self.acquirer_id.clone(),
        };
        Some(async move {
            let answer = remote
                .transport
                .post::<_, ReleaseResponse>(CANCEL_PATH, &req, remote.config.request_timeout)
                .await;
            if let Err(e) = answer {
                // The place lapses one TTL after our last request anyway.
                tracing::debug!(lock = req.lock_name, error = %crate::error::chain(&e.into_error(remote.transport.base())), "cannot leave the queue");
            }
        })
    }

    /// Leaves the queue, in a task of its own (awaited): if this future is dropped meanwhile,
    /// the task still finishes.
    async fn leave(&mut self) {
        if let Some(cancel) = self.cancel() {
            let _ = self.runtime.spawn(cancel).await;
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(cancel) = self.cancel() {
            self.runtime.spawn(cancel);
        }
    }
}

/// Sends `/acquire` in a task of its own: if the acquisition is dropped while the request is in
/// flight, the task still reads the answer and releases a grant nobody will hold; an answer that
/// reached the channel but not the acquisition is released by the channel's guard.
async fn call(
    remote: &Arc<Remote>,
    session: &HttpSession,
    request: AcquireRequest,
    timeout: Duration,
) -> Result<AcquireResponse, CallError> {
    let (tx, rx) = oneshot::channel();
    let task_remote = Arc::clone(remote);
    session.bridge().handle.spawn(async move {
        let answer = task_remote
            .transport
            .post::<_, AcquireResponse>(ACQUIRE_PATH, &request, timeout)
            .await;
        if let Err(Ok(resp)) = tx.send(answer) {
            if granted(&resp) {
                tracing::debug!(
                    lock = resp.lock_handle.lock_name,
                    "releasing a grant that arrived after its acquisition was cancelled"
                );
                task_remote.release_abandoned(resp.lock_handle).await;
            }
        }
    });
    let mut answer = Answer {
        rx,
        remote: Arc::clone(remote),
        runtime: session.bridge().handle.clone(),
    };
    (&mut answer.rx).await.unwrap_or_else(|_| {
        Err(CallError::Unreachable {
            sent: true,
            source: "the runtime shut down during a request".into(),
        })
    })
}

fn granted(resp: &AcquireResponse) -> bool {
    resp.error_code().is_none() && !resp.lock_handle.uuid.is_empty()
}

/// The receiving end of an `/acquire` answer; dropped with a grant in it, it releases the grant.
struct Answer {
    rx: oneshot::Receiver<Result<AcquireResponse, CallError>>,
    remote: Arc<Remote>,
    runtime: tokio::runtime::Handle,
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Ok(Ok(resp)) = self.rx.try_recv() {
            if granted(&resp) {
                let remote = Arc::clone(&self.remote);
                self.runtime
                    .spawn(async move { remote.release_abandoned(resp.lock_handle).await });
            }
        }
    }
}

/// A grant not yet handed to the session: released if the acquisition goes away first.
struct Pending {
    remote: Arc<Remote>,
    handle: Option<LockHandle>,
    runtime: tokio::runtime::Handle,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let remote = Arc::clone(&self.remote);
            self.runtime
                .spawn(async move { remote.release_abandoned(handle).await });
        }
    }
}

/// Turns a grant answer into a lease held by the session; `None` when the grant turned out lost
/// before it could be confirmed (the acquisition goes on).
async fn grant(
    session: &Arc<HttpSession>,
    attempt: &Attempt<'_>,
    resp: AcquireResponse,
    sent: Instant,
) -> Result<Option<Box<dyn Lease>>, AcquireError> {
    let remote = session.renewer();
    let name = attempt.name.as_str();
    let handle = resp.lock_handle;
    if handle.uuid.is_empty() || handle.lock_name != name {
        return Err(Error::ServerRefused {
            server: remote.transport.base().to_owned(),
            status: 200,
            code: None,
            message: format!("a grant without a lease handle of lock {name:?}"),
        }
        .into());
    }
    let mut pending = Pending {
        remote: Arc::clone(remote),
        handle: Some(handle.clone()),
        runtime: session.bridge().handle.clone(),
    };
    let held = Held {
        handle: handle.clone(),
    };
    // The server started the lease's clock when it granted it, at some moment between sending
    // and the answer. The session measures the renewal deadline from `sent`; a long poll may
    // have been granted long after it was sent: renew once (sent now) before counting on it.
    let mut confirmed = crate::clock::boot() - sent.elapsed();
    if sent.elapsed() >= remote.timing().renew_period {
        let now = crate::clock::boot();
        match remote.renew_one(held.clone(), remote.renew_timeout()).await {
            Renewal::Renewed(_) => confirmed = now,
            Renewal::Lost(reason) => {
                pending.handle = None;
                tracing::debug!(lock = name, %reason, "a grant was lost before it was confirmed");
                return Ok(None);
            }
            Renewal::Unknown => {
                return Err(Error::ServerUnreachable {
                    server: remote.transport.base().to_owned(),
                    source: "cannot confirm a lease granted during a long poll".into(),
                }
                .into())
            }
        }
    }
    let (notifier, signal) = LostNotifier::with_hook(name, attempt.opts);
    // Go's server gives every shared holder of a lock one uuid: this process's shared holders
    // of it are members of one lease, renewed once, each releasing its own share.
    let key = format!("{name}\n{}", handle.uuid);
    let member = match session.join(&key, held, confirmed, false, notifier) {
        Ok(member) => member,
        // Confirmed too late to be trusted: given back (by `pending`), the acquisition goes on.
        Err(crate::session::JoinError::TooLate) => return Ok(None),
        Err(e) => return Err(e.into_error(name).into()),
    };
    pending.handle = None;
    tracing::debug!(lock = name, server = remote.transport.base(), token = ?resp.fencing_token, "lock acquired");
    Ok(Some(Box::new(HttpLease::new(
        Arc::clone(session),
        name,
        &key,
        member,
        signal,
        resp.fencing_token,
    ))))
}

/// The lock's holders as the server's `/status` shows them, for the on-wait hook (empty when
/// it cannot tell quickly).
async fn holders(remote: &Remote, name: &LockName) -> Vec<Holder> {
    let path = format!("{STATUS_PATH}?name={}", percent_encode(name.as_str()));
    let timeout = remote.config.request_timeout.min(Duration::from_secs(2));
    match remote.transport.get::<StatusResponse>(&path, timeout).await {
        Ok(status) => status
            .locks
            .into_iter()
            .filter(|l| l.lock_name == name.as_str())
            .flat_map(|l| l.holders)
            .map(|h| {
                let id = h
                    .acquirer_id
                    .unwrap_or_else(|| format!("fencing token {}", h.fencing_token));
                Holder::with_id(h.mode, id)
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %crate::error::chain(&e.into_error(remote.transport.base())), "cannot read the lock's holders");
            Vec::new()
        }
    }
}

/// `s` as a URL query value.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_encoded() {
        assert_eq!(super::percent_encode("a b&c/ü"), "a%20b%26c%2F%C3%BC");
    }
}
