//! A worker that knows its Kubernetes lease can be lost, and a resource that fences it off.
//!
//! ```sh
//! cargo run --example fenced_worker --features kubernetes -- NAMESPACE CONFIGMAP LEDGER [STEPS]
//! ```
//!
//! A lease-based lock cannot stop a holder that was paused (a long GC, a stopped VM, SIGSTOP)
//! past its lease from acting afterwards: another process may hold the lock by then. Two
//! defences, used together here:
//!
//! 1. The worker stops as soon as the lease is known lost (`LockGuard::lost`), and never acts
//!    on a lock it no longer holds.
//! 2. Every write carries the lock's fencing token, which increases with every grant of the
//!    lock; the protected resource (the ledger file `LEDGER`) remembers the highest token it has
//!    seen and refuses writes with a lower one. A paused holder that wakes up after another
//!    took over is refused, whatever it believes.
//!
//! The worker takes the lock `ledger-writer` on ConfigMap `CONFIGMAP` in `NAMESPACE`, then
//! appends `STEPS` entries (default 5) to the ledger, one every 200 ms, each as `TOKEN STEP PID`.
//! It prints `acquired token=N`, then `wrote token=N step=K` per entry, then `done`. It exits 75
//! (EX_TEMPFAIL: try again) when its lease is lost or the ledger refuses its token, and never
//! writes after that.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use lockgate::kubernetes::{self, KubernetesLocker, LeaseConfig, Target};
use lockgate::{AcquireOptions, FileLocker, Locker};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The exit code of a worker that stopped because it no longer holds the lock.
const LOST: u8 = 75;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Stopped(why)) => {
            eprintln!("fenced_worker: {why}; stopping");
            ExitCode::from(LOST)
        }
        Err(e) => {
            eprintln!("fenced_worker: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Outcome {
    Done,
    /// The worker no longer holds the lock, for this reason.
    Stopped(String),
}

async fn run() -> Result<Outcome, Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [namespace, configmap, ledger, rest @ ..] = args.as_slice() else {
        return Err("usage: fenced_worker NAMESPACE CONFIGMAP LEDGER [STEPS]".into());
    };
    let steps: u32 = match rest.first() {
        Some(s) => s
            .parse()
            .map_err(|_| format!("STEPS {s:?} is not a number"))?,
        None => 5,
    };
    let ledger = Ledger::open(Path::new(ledger))?;

    let client = kubernetes::client(None, Duration::from_secs(3)).await?;
    let target = Target::configmap(namespace, configmap);
    let locker = Locker::new(KubernetesLocker::new(
        client,
        target,
        LeaseConfig::default(),
    )?);

    let guard = locker
        .acquire("ledger-writer", AcquireOptions::exclusive())
        .await?;
    let token = guard
        .fencing_token()
        .ok_or("this backend issues no fencing tokens")?;
    println!("acquired token={token}");

    let pid = std::process::id();
    let mut outcome = Outcome::Done;
    for step in 0..steps {
        // Stop at once when the lease is lost, even in the middle of a step's work.
        tokio::select! {
            reason = guard.lost() => {
                outcome = Outcome::Stopped(format!("the lease was lost ({reason})"));
                break;
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        // The lease may be lost while we are paused right here: the ledger's own check is what
        // keeps a stale holder out.
        match ledger.append(token, &format!("{step} {pid}")).await? {
            Appended::Yes => println!("wrote token={token} step={step}"),
            Appended::Refused { highest } => {
                outcome = Outcome::Stopped(format!(
                    "the ledger refused token {token}: a later holder wrote with token {highest}"
                ));
                break;
            }
        }
    }
    if matches!(outcome, Outcome::Done) {
        println!("done");
    }
    // Release in every case, and wait for it (an error here means the lease is gone anyway).
    if let Err(e) = guard.release().await {
        eprintln!("fenced_worker: release: {e}");
    }
    Ok(outcome)
}

/// The protected resource: an append-only file of `TOKEN ENTRY` lines that refuses a token lower
/// than the highest it holds. Its check-and-append is atomic across processes on this host
/// (a file lock of its own, beside the ledger).
struct Ledger {
    path: PathBuf,
    local: Locker,
}

enum Appended {
    Yes,
    Refused { highest: u64 },
}

impl Ledger {
    fn open(path: &Path) -> Result<Self, Error> {
        let mut dir = path.as_os_str().to_owned();
        dir.push(".lock");
        Ok(Self {
            path: path.to_owned(),
            local: Locker::new(FileLocker::new(PathBuf::from(dir))?),
        })
    }

    async fn append(&self, token: u64, entry: &str) -> Result<Appended, Error> {
        use std::io::Write;
        let _turn = self
            .local
            .acquire("ledger", AcquireOptions::exclusive())
            .await?;
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
        let highest = text
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .max();
        if let Some(highest) = highest.filter(|&h| h > token) {
            return Ok(Appended::Refused { highest });
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        writeln!(file, "{token} {entry}")?;
        Ok(Appended::Yes)
    }
}
