//! The watch of the lock object: one per locker, shared by all its waiters.

use std::sync::{Arc, PoisonError, Weak};

use kube::api::{Api, DynamicObject};
use tokio::sync::watch;

use super::store::Snapshot;
use super::Object;

/// The object's latest state as the watch saw it; `None` before the first event, and after the
/// object was deleted.
pub(crate) type Feed = watch::Receiver<Option<Snapshot>>;

impl Object {
    /// The shared watch of the object, started on first use; it ends when the locker is gone.
    pub(crate) fn watch(self: &Arc<Self>) -> Feed {
        let mut slot = self.feed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = slot.as_ref() {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        let selector = format!("metadata.name={}", self.store.name);
        tokio::spawn(run(
            self.store.api.clone(),
            selector,
            tx,
            Arc::downgrade(self),
        ));
        *slot = Some(rx.clone());
        rx
    }
}

/// Feeds the object's state into `tx` until the locker is dropped. kube's watcher re-lists after
/// `410 Gone` and backs off on errors.
async fn run(
    api: Api<DynamicObject>,
    selector: String,
    tx: watch::Sender<Option<Snapshot>>,
    owner: Weak<Object>,
) {
    use futures_util::StreamExt;
    use kube::runtime::watcher::{self, Event};
    use kube::runtime::WatchStreamExt;
    let stream =
        watcher::watcher(api, watcher::Config::default().fields(&selector)).default_backoff();
    futures_util::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        if owner.strong_count() == 0 || tx.is_closed() {
            return;
        }
        match ev {
            Ok(Event::Apply(obj)) | Ok(Event::InitApply(obj)) => {
                let _ = tx.send(Some(Snapshot::from_object(&obj)));
            }
            Ok(Event::Delete(_)) => {
                let _ = tx.send(None);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "watch of the lock object failed; retrying"),
        }
    }
}
