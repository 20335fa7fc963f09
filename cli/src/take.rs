//! Taking the lock for `exec` and `hold`: the acquisition options from the command line, the
//! waiting line (and its reminders on a terminal), and what a busy lock or a failure prints.

use std::io::{self, IsTerminal};
use std::time::Duration;

use lockgate::file::PathLocker;
use lockgate::{AcquireError, AcquireOptions, LockGuard, Locker, Mode, Wait};

use crate::args::LockArgs;
use crate::errors::{error_chain, shorten, Failure};
use crate::locator::Locator;

/// A lock taken: the guard, the locker it came from (kept alive with it) and the runtime that
/// drives a leased lock's renewals.
pub(crate) struct Taken {
    pub rt: tokio::runtime::Runtime,
    pub guard: LockGuard,
    pub _locker: Locker,
}

/// What the acquisition came to, short of a failure.
pub(crate) enum Outcome {
    Held(Taken),
    /// Busy (`-n`) or timed out (`-w`): exit with this code, the line printed.
    Busy(u8),
}

/// Takes `name` (a path with `--file`) as `args` say, with `description` recorded for whoever
/// waits or looks.
pub(crate) fn take(
    locator: Option<&Locator>,
    args: &LockArgs,
    name: &str,
    description: String,
) -> Result<Outcome, Failure> {
    let rt = crate::runtime()?;
    // On a terminal, a long wait is told now and then; in a log, once.
    let reminders = (!args.quiet && io::stderr().is_terminal()).then(Reminders::start);
    let opts = options(args, reminders.as_ref(), description);
    let (locker, acquired) = match locator {
        // A file lock is waited for on this very thread: the kernel wakes it at the release,
        // with no hop through another thread (and a timer interrupts it for `-w`). Nothing
        // else runs yet.
        None => {
            let locker = Locker::new(PathLocker::new());
            let acquired = locker.acquire_blocking(name, opts);
            (locker, acquired)
        }
        Some(locator @ Locator::File { .. }) => {
            let locker = Locker::new(locator.file_locker(true)?);
            let acquired = locker.acquire_blocking(name, opts);
            (locker, acquired)
        }
        Some(locator) => rt.block_on(async {
            let locker = locator.locker(Some(args.patience)).await?;
            let acquired = locker.acquire(name, opts).await;
            Ok::<_, Failure>((locker, acquired))
        })?,
    };
    drop(reminders);
    match acquired {
        Ok(guard) => Ok(Outcome::Held(Taken {
            rt,
            guard,
            _locker: locker,
        })),
        Err(AcquireError::Failed(e)) => Err(Failure::lock("take", name, e)),
        Err(e) => {
            if !args.quiet {
                let next = match e {
                    AcquireError::TimedOut { .. } => {
                        "; it is still held (a longer -w waits longer)"
                    }
                    _ => "; not waiting for it (-n)",
                };
                eprintln!("lockgate: {}{next}", error_chain(&e));
            }
            Ok(Outcome::Busy(args.conflict_exit_code))
        }
    }
}

/// This hold, unique across hosts and time: `HOST/PID/NANOS` (the host, lockgate's pid, the wall
/// clock at the grant in nanoseconds).
pub(crate) fn holder_id() -> String {
    let mut host = [0u8; 256];
    // SAFETY: gethostname into a buffer of the given size; the result is NUL-terminated or cut.
    let host = if unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) } == 0 {
        let end = host.iter().position(|&b| b == 0).unwrap_or(host.len());
        String::from_utf8_lossy(&host[..end]).into_owned()
    } else {
        "localhost".to_owned()
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{host}/{}/{nanos}", std::process::id())
}

fn options(args: &LockArgs, reminders: Option<&Reminders>, description: String) -> AcquireOptions {
    let mode = if args.shared {
        Mode::Shared
    } else {
        Mode::Exclusive
    };
    let wait = match args.timeout {
        _ if args.non_blocking => Wait::NonBlocking,
        Some(t) => Wait::Timeout(t),
        None => Wait::Forever,
    };
    let opts = AcquireOptions::default()
        .mode(mode)
        .wait(wait)
        .description(description);
    if args.quiet {
        return opts;
    }
    let began = reminders.map(Reminders::sender);
    opts.on_wait(move |info| {
        let holders: Vec<String> = info
            .holders
            .iter()
            .map(|h| {
                let mut h = h.clone();
                crate::holders::explain(&mut h, None);
                h.to_string()
            })
            .collect();
        let held_by = if holders.is_empty() {
            String::new()
        } else {
            format!(" held by {}", holders.join("; "))
        };
        eprintln!(
            "lockgate: waiting for {} lock {}{held_by}",
            info.mode,
            shorten(info.name)
        );
        if let Some(began) = &began {
            let _ = began.send(Reminder::Began {
                at: std::time::Instant::now(),
                what: format!("{} lock {}", info.mode, shorten(info.name)),
                held_by,
            });
        }
    })
}

/// When a wait on a terminal is told again: the first reminder after this long, then each one
/// after as long again as the wait has lasted, but at least once a minute (5 s, 10 s, 20 s,
/// 40 s, 80 s, 140 s, ...).
const FIRST_REMINDER: Duration = Duration::from_secs(5);
const MAX_REMINDER_GAP: Duration = Duration::from_secs(60);

/// What the reminder thread is told.
enum Reminder {
    /// The acquisition started to wait.
    Began {
        at: std::time::Instant,
        /// `exclusive lock "NAME"`.
        what: String,
        /// ` held by ...` as the first line said it, or nothing.
        held_by: String,
    },
    /// The acquisition has ended.
    Stop,
}

/// A thread that says now and then that lockgate still waits for its lock (how long, and who
/// held it when the wait began), until the acquisition ends. Only on a terminal: a log gets the
/// first line alone.
struct Reminders {
    tx: std::sync::mpsc::Sender<Reminder>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reminders {
    fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("lockgate-reminders".into())
            .spawn(move || Self::run(&rx))
            .ok();
        Self { tx, thread }
    }

    fn sender(&self) -> std::sync::mpsc::Sender<Reminder> {
        self.tx.clone()
    }

    fn run(rx: &std::sync::mpsc::Receiver<Reminder>) {
        use std::sync::mpsc::RecvTimeoutError;
        let Ok(Reminder::Began { at, what, held_by }) = rx.recv() else {
            return;
        };
        let mut after = FIRST_REMINDER;
        loop {
            let due = at + after;
            match rx.recv_timeout(due.saturating_duration_since(std::time::Instant::now())) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(_) | Err(RecvTimeoutError::Disconnected) => return,
            }
            let waited = Duration::from_secs(at.elapsed().as_secs());
            let held_by = if held_by.is_empty() {
                String::new()
            } else {
                format!(" (when the wait began{held_by})")
            };
            eprintln!(
                "lockgate: still waiting for {what} after {}{held_by}",
                humantime::format_duration(waited)
            );
            after += after.min(MAX_REMINDER_GAP);
        }
    }
}

impl Drop for Reminders {
    fn drop(&mut self) {
        let _ = self.tx.send(Reminder::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
