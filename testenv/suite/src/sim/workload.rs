//! What the simulated lockgate clients do: acquire a random lock in a random mode with a
//! random waiting policy (sometimes cancelled midway), hold it for a while looking at its lost
//! signal, release it (or drop the guard), and again — recording every belief in the journal.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockgate::{AcquireError, AcquireOptions, Locker, Mode, Wait};

use super::journal::Journal;
use super::rng::Rng;
use super::world::{host_now, HostId};

/// One client's part.
pub struct Client {
    pub name: String,
    pub host: HostId,
    pub host_started: Duration,
    pub locker: Locker,
    pub names: Vec<String>,
    pub journal: Journal,
    pub rng: Rng,
    /// Set when the run winds down: finish what is in hand, take nothing new.
    pub stop: Arc<AtomicBool>,
    /// Clients still running.
    pub running: Arc<AtomicUsize>,
    /// How long a hold lasts at most.
    pub max_hold: Duration,
    /// How often it asks for a shared lock.
    pub shared: f64,
    /// The longest pause between two acquisitions.
    pub think: Duration,
}

fn now() -> Duration {
    host_now().unwrap_or_default()
}

impl Client {
    /// Runs until the run winds down. (Counted in `running` by whoever made it.)
    pub async fn run(mut self) {
        while !self.stop.load(Ordering::SeqCst) {
            self.once().await;
            let think = self.rng.millis(0, self.think.as_millis() as u64);
            tokio::time::sleep(think).await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
    }

    async fn once(&mut self) {
        let name = self.rng.pick(&self.names).clone();
        let mode = if self.rng.chance(self.shared) {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        let mut opts = AcquireOptions::default().mode(mode);
        let roll = self.rng.range(0, 100);
        let wait = if roll < 40 {
            Wait::Forever
        } else if roll < 75 {
            Wait::Timeout(self.rng.millis(100, 8000))
        } else {
            Wait::NonBlocking
        };
        opts = opts.wait(wait);
        let cancel = self.rng.chance(0.1).then(|| self.rng.millis(0, 3000));
        self.journal.count(|c| c.attempts += 1);
        super::world::trace_line(now(), || {
            format!(
                "{}: ACQUIRE {name} {mode} {:?}{}",
                self.name,
                wait,
                cancel
                    .map(|c| format!(" cancel after {c:?}"))
                    .unwrap_or_default()
            )
        });
        let acquire = self.locker.acquire(name.as_str(), opts);
        let result = match cancel {
            Some(after) => tokio::select! {
                biased;
                r = acquire => Some(r),
                _ = tokio::time::sleep(after) => None,
            },
            None => Some(acquire.await),
        };
        let guard = match result {
            None => {
                self.journal.count(|c| c.cancelled += 1);
                super::world::trace_line(now(), || format!("{}: cancelled", self.name));
                return;
            }
            Some(Ok(g)) => g,
            Some(Err(AcquireError::WouldBlock { .. })) => {
                self.journal.count(|c| c.would_block += 1);
                super::world::trace_line(now(), || format!("{}: busy", self.name));
                return;
            }
            Some(Err(AcquireError::TimedOut { .. })) => {
                self.journal.count(|c| c.timed_out += 1);
                super::world::trace_line(now(), || format!("{}: timed out", self.name));
                return;
            }
            Some(Err(e)) => {
                self.journal
                    .error(format!("acquire: {}", kind(&e.to_string())));
                return;
            }
        };
        let hold = self.journal.grant(
            &self.name,
            self.host,
            self.host_started,
            now(),
            &name,
            mode,
            guard.fencing_token(),
            guard.lost_signal(),
        );
        // Hold it, looking at the lost signal now and then (as a careful holder does before
        // each step of its work).
        let steps = self.rng.range(1, 5);
        let mut lost = false;
        for _ in 0..steps {
            let nap = self
                .rng
                .millis(0, self.max_hold.as_millis() as u64 / steps + 1);
            // In slices, so that a winding-down run is not kept waiting.
            let until = tokio::time::Instant::now() + nap;
            while tokio::time::Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                tokio::time::sleep_until(
                    until.min(tokio::time::Instant::now() + Duration::from_millis(250)),
                )
                .await;
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            if guard.is_lost() {
                lost = true;
                break;
            }
        }
        self.journal.ended(hold, now(), lost);
        if self.rng.chance(0.1) {
            drop(guard);
            return;
        }
        self.journal.count(|c| c.releases += 1);
        match guard.release().await {
            Ok(()) => {}
            Err(lockgate::Error::LeaseLost { .. }) => {}
            Err(e) => {
                self.journal.count(|c| c.release_errors += 1);
                self.journal
                    .error(format!("release: {}", kind(&e.to_string())));
            }
        }
    }
}

/// An error message without the details that change from run to run (numbers, ids).
fn kind(msg: &str) -> String {
    msg.chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .take(160)
        .collect()
}
