//! Go lockgate's three classic cases on file locks: a blocking lock with a timeout,
//! `with_acquire`, and a non-blocking attempt.
//!
//! ```sh
//! cargo run --example file_locks
//! LOCKGATE_DIR=/tmp/locks cargo run --example file_locks   # a directory shared with others
//! ```
//!
//! Locks live in `$LOCKGATE_DIR`, else in a fresh directory of this process. Each case takes
//! `myresource` while another holder (a thread here; any process would do) has it, so that the
//! waiting, the timeout and the refusal are visible. `cargo test` runs this program too.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use lockgate::{with_acquire_blocking, AcquireError, AcquireOptions, FileLocker, Locker};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::var_os("LOCKGATE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("lockgate-example-{}", std::process::id())),
    };
    let locker = Locker::new(FileLocker::new(&dir)?);
    println!("locks in {}", dir.display());

    case_1_blocking_with_timeout(&locker)?;
    case_2_with_acquire(&locker)?;
    case_3_non_blocking(&locker)?;

    if std::env::var_os("LOCKGATE_DIR").is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// Case 1: wait for the lock, but at most 30 seconds.
fn case_1_blocking_with_timeout(locker: &Locker) -> Result<(), Box<dyn std::error::Error>> {
    let holder = Holder::start(locker, "myresource", Duration::from_millis(300))?;
    let opts = AcquireOptions::exclusive()
        .timeout(Duration::from_secs(30))
        .on_wait(|info| eprintln!("Waiting for locked {:?}", info.name));
    // Returns once the holder lets go (after 300 ms); Err(TimedOut) after 30 s.
    let guard = locker.acquire_blocking("myresource", opts)?;
    println!("case 1: acquired {:?} after waiting", guard.name());
    // ... work under the lock ...
    guard.release_blocking()?;
    holder.finish();

    // The same with a timeout shorter than the holder's turn: the lock is not acquired.
    let holder = Holder::start(locker, "myresource", Duration::from_secs(60))?;
    let opts = AcquireOptions::exclusive().timeout(Duration::from_millis(200));
    match locker.acquire_blocking("myresource", opts) {
        Err(AcquireError::TimedOut { waited, .. }) => {
            println!("case 1: gave up after {waited:.1?}, the lock stayed busy")
        }
        Ok(_) => return Err("acquired a lock someone else holds".into()),
        Err(e) => return Err(e.into()),
    }
    holder.finish();
    Ok(())
}

/// Case 2: run a closure under the lock; it is told whether the lock was acquired.
fn case_2_with_acquire(locker: &Locker) -> Result<(), Box<dyn std::error::Error>> {
    let opts = AcquireOptions::exclusive().timeout(Duration::from_secs(30));
    let answer = with_acquire_blocking(locker, "myresource", opts, |acquired| {
        assert!(acquired, "the lock is free and the timeout long");
        // ... work under the lock; the lock is released when the closure returns ...
        Ok::<_, lockgate::Error>(42)
    })?;
    println!("case 2: the closure ran under the lock and returned {answer}");

    // Non-blocking, on a busy lock: the closure runs without it and is told so.
    let holder = Holder::start(locker, "myresource", Duration::from_secs(60))?;
    let ran_without = with_acquire_blocking(
        locker,
        "myresource",
        AcquireOptions::exclusive().non_blocking(),
        |acquired| Ok::<_, lockgate::Error>(!acquired),
    )?;
    if !ran_without {
        return Err("with_acquire acquired a lock someone else holds".into());
    }
    println!("case 2: the lock was busy; the closure was told so");
    holder.finish();
    Ok(())
}

/// Case 3: take the lock only if it is free now.
fn case_3_non_blocking(locker: &Locker) -> Result<(), Box<dyn std::error::Error>> {
    let holder = Holder::start(locker, "myresource", Duration::from_secs(60))?;
    match locker.acquire_blocking("myresource", AcquireOptions::exclusive().non_blocking()) {
        Ok(_) => return Err("acquired a lock someone else holds".into()),
        Err(AcquireError::WouldBlock { name }) => {
            println!("case 3: {name:?} is busy; doing something else")
        }
        Err(e) => return Err(e.into()),
    }
    holder.finish();

    let guard =
        locker.acquire_blocking("myresource", AcquireOptions::exclusive().non_blocking())?;
    println!("case 3: {:?} was free and is ours", guard.name());
    drop(guard); // dropping a guard releases the lock too
    Ok(())
}

/// Another holder of a lock: a thread that holds it for a while, or until told to stop.
struct Holder {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Holder {
    /// Returns once the thread holds `name`.
    fn start(locker: &Locker, name: &str, hold: Duration) -> Result<Self, lockgate::AcquireError> {
        let guard = locker.acquire_blocking(name, AcquireOptions::exclusive())?;
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            // Hold until `hold` has passed or we are told to stop, whichever comes first.
            let _ = stopped.recv_timeout(hold);
            drop(guard);
        });
        Ok(Self { stop, thread })
    }

    fn finish(self) {
        let _ = self.stop.send(());
        self.thread.join().expect("the holder thread panicked");
    }
}
