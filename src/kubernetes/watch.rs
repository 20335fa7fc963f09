//! The watch of the lock object: one per locker, shared by all its waiters.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use kube::api::{Api, DynamicObject};
use tokio::sync::Notify;

use super::store::Snapshot;
use super::Object;

/// The object's latest state as the watch saw it (`None` before the first event, and after the
/// object was deleted), for every waiter of a locker.
///
/// A version counter and a [`Notify`] rather than `tokio::sync::watch`: `watch` spreads its
/// waiters over shards chosen at random, so that they wake in a random order; these wake in the
/// order they began to wait, which keeps a run reproducible (the simulator depends on it).
#[derive(Clone)]
pub(crate) struct Feed {
    shared: Arc<Shared>,
    /// The version this receiver has seen.
    seen: u64,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Default)]
struct State {
    version: u64,
    value: Option<Snapshot>,
    closed: bool,
}

/// The watch task's end of a [`Feed`].
struct Publisher(Arc<Shared>);

/// The watch ended (the locker is gone).
#[derive(Debug)]
pub(crate) struct Closed;

impl Feed {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until a state newer than the one last seen is published.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is consumed until the caller reads the state.
    pub async fn changed(&mut self) -> Result<(), Closed> {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.state();
                if s.version != self.seen {
                    return Ok(());
                }
                if s.closed {
                    return Err(Closed);
                }
            }
            notified.await;
        }
    }

    /// The latest state, without marking it seen.
    pub fn latest(&self) -> Option<Snapshot> {
        self.state().value.clone()
    }

    /// The latest state, marking it seen.
    pub fn borrow_and_update(&mut self) -> Option<Snapshot> {
        let (version, value) = {
            let s = self.state();
            (s.version, s.value.clone())
        };
        self.seen = version;
        value
    }

    /// The first state of a resourceVersion above `rv`: the latest if it is, else the next one
    /// published that is, waited for at most `within`. `None`: none came within it, or the
    /// watch ended.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a state marked seen and not returned is older than asked for.
    pub async fn newer_than(&mut self, rv: u64, within: Duration) -> Option<Snapshot> {
        let wait = async {
            loop {
                if let Some(s) = self
                    .borrow_and_update()
                    .filter(|s| s.rv.is_some_and(|r| r > rv))
                {
                    return Some(s);
                }
                self.changed().await.ok()?;
            }
        };
        tokio::time::timeout(within, wait).await.ok().flatten()
    }
}

impl Publisher {
    fn send(&self, value: Option<Snapshot>) {
        {
            let mut s = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
            s.version += 1;
            s.value = value;
        }
        self.0.notify.notify_waiters();
    }

    /// True when no feed is left to read it.
    fn is_closed(&self) -> bool {
        Arc::strong_count(&self.0) == 1
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.0
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.0.notify.notify_waiters();
    }
}

impl Object {
    /// The object's latest state as this locker's watch saw it, if the watch runs.
    pub(crate) fn watched(&self) -> Option<Snapshot> {
        let slot = self.feed.lock().unwrap_or_else(PoisonError::into_inner);
        slot.as_ref()?.latest()
    }

    /// A state of the object newer than resourceVersion `base` from this locker's watch,
    /// waited for briefly: the change that made a write conflict was committed before the
    /// conflict was answered, and its event is usually on its way already. `None`: no watch,
    /// no base, or not within 100 ms (then the caller reads).
    pub(crate) async fn newer_watched(&self, base: Option<u64>) -> Option<Snapshot> {
        let base = base?;
        let mut feed = self
            .feed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        feed.newer_than(base, Duration::from_millis(100)).await
    }

    /// The shared watch of the object, started on first use; it ends when the locker is gone.
    pub(crate) fn watch(self: &Arc<Self>) -> Feed {
        let mut slot = self.feed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(feed) = slot.as_ref() {
            return feed.clone();
        }
        let shared = Arc::new(Shared::default());
        let feed = Feed {
            shared: Arc::clone(&shared),
            seen: 0,
        };
        let selector = format!("metadata.name={}", self.store.name);
        tokio::spawn(run(
            self.store.api.clone(),
            selector,
            Publisher(shared),
            Arc::downgrade(self),
        ));
        *slot = Some(feed.clone());
        feed
    }
}

/// The watch's backoff after errors: 0.8 s doubling to 30 s, with up to a quarter of jitter
/// (kube's default policy, with its randomness and clock taken through the library's seam).
#[derive(Debug, Clone)]
struct Backoff {
    next: std::time::Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(800);
    const MAX: std::time::Duration = std::time::Duration::from_secs(30);
}

impl Iterator for Backoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let quarter = u64::try_from(base.as_millis() / 4)
            .unwrap_or(u64::MAX)
            .max(1);
        let jitter = (crate::clock::random() as u64) % quarter;
        Some(base + std::time::Duration::from_millis(jitter))
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Feeds the object's state into `tx` until the locker is dropped. kube's watcher re-lists after
/// `410 Gone` and backs off on errors.
async fn run(api: Api<DynamicObject>, selector: String, tx: Publisher, owner: Weak<Object>) {
    use futures_util::StreamExt;
    use kube::runtime::watcher::{self, Event};
    use kube::runtime::WatchStreamExt;
    let stream = watcher::watcher(api, watcher::Config::default().fields(&selector))
        .backoff(Backoff::default());
    futures_util::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        if owner.strong_count() == 0 || tx.is_closed() {
            return;
        }
        match ev {
            Ok(Event::Apply(obj)) | Ok(Event::InitApply(obj)) => {
                tx.send(Some(Snapshot::from_object(&obj)));
            }
            Ok(Event::Delete(_)) => {
                tx.send(None);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "watch of the lock object failed; retrying"),
        }
    }
}
