//! Go lockgate's three classic cases on Kubernetes locks (the async API): a blocking lock with a
//! timeout, `with_acquire`, and a non-blocking attempt.
//!
//! ```sh
//! cargo run --example kubernetes_locks --features kubernetes -- NAMESPACE CONFIGMAP
//! ```
//!
//! The locks live in the annotations of ConfigMap `CONFIGMAP` (default `lockgate-example`) in
//! `NAMESPACE` (default `default`), created when missing. The client is configured as kubectl's
//! is: `$KUBECONFIG` or `~/.kube/config`, else the pod's service account. The user needs get,
//! list, watch and patch on that ConfigMap, and create on ConfigMaps if it does not exist yet
//! (see `deploy/rbac/` in the repository).
//!
//! Each case takes `myresource` while another holder (a task here; any process on any host would
//! do) has it, so that the waiting, the timeout and the refusal are visible.

use std::time::Duration;

use lockgate::kubernetes::{self, KubernetesLocker, LeaseConfig, Target};
use lockgate::{with_acquire, AcquireError, AcquireOptions, LockGuard, Locker};
use tokio::sync::oneshot;

type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let namespace = args.next().unwrap_or_else(|| "default".into());
    let configmap = args.next().unwrap_or_else(|| "lockgate-example".into());

    let client = kubernetes::client(None, Duration::from_secs(3)).await?;
    let target = Target::configmap(&namespace, &configmap);
    let locker = Locker::new(
        KubernetesLocker::new(client, target, LeaseConfig::default())?.create_missing(true),
    );
    println!("locks in configmaps {namespace}/{configmap}");

    case_1_blocking_with_timeout(&locker).await?;
    case_2_with_acquire(&locker).await?;
    case_3_non_blocking(&locker).await?;
    Ok(())
}

/// Case 1: wait for the lock, but at most 30 seconds.
async fn case_1_blocking_with_timeout(locker: &Locker) -> Result<()> {
    let holder = Holder::start(locker, "myresource", Duration::from_millis(300)).await?;
    let opts = AcquireOptions::exclusive()
        .timeout(Duration::from_secs(30))
        .on_wait(|info| eprintln!("Waiting for locked {:?}", info.name));
    // Returns once the holder lets go (after 300 ms); Err(TimedOut) after 30 s.
    let guard = locker.acquire("myresource", opts).await?;
    // A Kubernetes lease can be lost (the API server unreachable for longer than the lease):
    // the work stops when it is. The token orders every grant of the lock: hand it to what the
    // lock protects (see the fenced_worker example).
    let token = guard.fencing_token();
    tokio::select! {
        reason = guard.lost() => return Err(format!("lease lost ({reason})").into()),
        () = work() => {}
    }
    println!(
        "case 1: acquired {:?} after waiting, fencing token {token:?}",
        guard.name()
    );
    guard.release().await?;
    holder.finish().await?;

    // The same with a timeout shorter than the holder's turn: the lock is not acquired.
    let holder = Holder::start(locker, "myresource", Duration::from_secs(60)).await?;
    let opts = AcquireOptions::exclusive().timeout(Duration::from_millis(500));
    match locker.acquire("myresource", opts).await {
        Err(AcquireError::TimedOut { waited, .. }) => {
            println!("case 1: gave up after {waited:.1?}, the lock stayed busy")
        }
        Ok(_) => return Err("acquired a lock someone else holds".into()),
        Err(e) => return Err(e.into()),
    }
    holder.finish().await?;
    Ok(())
}

/// Case 2: run a closure under the lock; it is told whether the lock was acquired.
async fn case_2_with_acquire(locker: &Locker) -> Result<()> {
    let opts = AcquireOptions::exclusive().timeout(Duration::from_secs(30));
    let answer = with_acquire(locker, "myresource", opts, |acquired| async move {
        assert!(acquired, "the lock is free and the timeout long");
        work().await;
        Ok::<_, lockgate::Error>(42)
    })
    .await?;
    println!("case 2: the closure ran under the lock and returned {answer}");

    // Non-blocking, on a busy lock: the closure runs without it and is told so.
    let holder = Holder::start(locker, "myresource", Duration::from_secs(60)).await?;
    let opts = AcquireOptions::exclusive().non_blocking();
    let ran_without = with_acquire(locker, "myresource", opts, |acquired| async move {
        Ok::<_, lockgate::Error>(!acquired)
    })
    .await?;
    if !ran_without {
        return Err("with_acquire acquired a lock someone else holds".into());
    }
    println!("case 2: the lock was busy; the closure was told so");
    holder.finish().await?;
    Ok(())
}

/// Case 3: take the lock only if it is free now.
async fn case_3_non_blocking(locker: &Locker) -> Result<()> {
    let holder = Holder::start(locker, "myresource", Duration::from_secs(60)).await?;
    let opts = AcquireOptions::exclusive().non_blocking();
    match locker.acquire("myresource", opts.clone()).await {
        Ok(_) => return Err("acquired a lock someone else holds".into()),
        Err(AcquireError::WouldBlock { name }) => {
            println!("case 3: {name:?} is busy; doing something else")
        }
        Err(e) => return Err(e.into()),
    }
    holder.finish().await?;

    let guard = locker.acquire("myresource", opts).await?;
    println!("case 3: {:?} was free and is ours", guard.name());
    // Release explicitly and wait for it: a guard dropped at the end of `main` would be
    // released by a task that dies with the runtime, and the lock would stay held for a TTL.
    guard.release().await?;
    Ok(())
}

/// Stands for the work done under the lock.
async fn work() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Another holder of a lock: a task that holds it for a while, or until told to stop.
struct Holder {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), lockgate::Error>>,
}

impl Holder {
    /// Returns once the task holds `name`.
    async fn start(locker: &Locker, name: &str, hold: Duration) -> Result<Self> {
        let guard: LockGuard = locker.acquire(name, AcquireOptions::exclusive()).await?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let _ = tokio::time::timeout(hold, stopped).await;
            guard.release().await
        });
        Ok(Self { stop, task })
    }

    async fn finish(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}
