//! `lockgate exec`: hold a lock while a command runs.
//!
//! The command never runs without the lock:
//! - With a file locker the command inherits the lock file's descriptor, so the lock belongs to
//!   it as much as to lockgate: if lockgate is killed, the command keeps the lock until it (and
//!   any child that inherited the descriptor) exits.
//! - With a leased locker, when the lease is lost the command's process group gets SIGTERM, and
//!   SIGKILL if anything of it still runs 2 s later; lockgate exits 75. If lockgate itself dies,
//!   the watchdog (see `watchdog.rs`) does the same.
//!
//! The command runs in a process group of its own (see `job.rs`). SIGINT, SIGTERM, SIGHUP and
//! SIGQUIT sent to lockgate while the command runs are forwarded to that group; lockgate exits
//! with the command's status (128+N if it was killed by signal N). When the command ended by a
//! signal (forwarded, from the terminal, or its own), what is left of its group gets SIGTERM, and
//! SIGKILL 2 s later: an interrupted job stops as a whole.
//!
//! Every path that acquired the lock releases it explicitly and waits for the release before
//! lockgate exits: a leased lock merely dropped would be released by a task that dies with the
//! runtime, and stay held for a TTL.

use std::io::{self, IsTerminal};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use lockgate::{AcquireError, AcquireOptions, LockGuard, Locker, LostReason, Mode, Wait};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;

use crate::args::ExecArgs;
use crate::errors::{code, error_chain, Failure};
use crate::job::{Job, Spawn, Terminal};
use crate::locator::Locator;
use crate::watchdog::Watchdog;

/// How long a command may run on after it was told to stop (a lost lease, lockgate's death, an
/// interrupted job) before it gets SIGKILL: the safety margin between the moment a holder learns
/// of a loss and the moment another process may take the lock over (TTL minus renewal deadline
/// with the default lease).
pub(crate) const KILL_AFTER: Duration = Duration::from_secs(2);

/// The signals forwarded to the command's group.
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

pub(crate) fn run(locator: &Locator, args: ExecArgs) -> Result<u8, Failure> {
    let rt = crate::runtime()?;
    // On a terminal, a long wait is told now and then; in a log, once.
    let reminders = (!args.quiet && io::stderr().is_terminal()).then(Reminders::start);
    let opts = options(&args, reminders.as_ref());
    let (_locker, acquired) = match locator {
        // A file lock is waited for on this very thread: the kernel wakes it at the release,
        // with no hop through another thread (and a timer interrupts it for `-w`). Nothing
        // else runs yet.
        Locator::File { .. } => {
            let locker = Locker::new(locator.file_locker()?);
            let acquired = locker.acquire_blocking(&args.name, opts);
            (locker, acquired)
        }
        Locator::Kubernetes { .. } | Locator::Http { .. } => rt.block_on(async {
            let locker = locator.locker().await?;
            let acquired = locker.acquire(&args.name, opts).await;
            Ok::<_, Failure>((locker, acquired))
        })?,
    };
    drop(reminders);
    let guard = match acquired {
        Ok(guard) => guard,
        Err(AcquireError::Failed(e)) => return Err(Failure::lock("take", &args.name, e)),
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
            return Ok(args.conflict_exit_code);
        }
    };
    rt.block_on(async {
        let ended = supervise(&guard, &args).await;
        let released = guard
            .release()
            .await
            .map_err(|e| Failure::lock("release", &args.name, e));
        exit_code(ended, released)
    })
}

fn options(args: &ExecArgs, reminders: Option<&Reminders>) -> AcquireOptions {
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
    // Who holds the lock, for whoever waits or looks: the command line.
    let command: Vec<String> = args
        .command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let opts = AcquireOptions::default()
        .mode(mode)
        .wait(wait)
        .description(command.join(" "));
    if args.quiet {
        return opts;
    }
    let began = reminders.map(Reminders::sender);
    opts.on_wait(move |info| {
        let holders: Vec<String> = info.holders.iter().map(ToString::to_string).collect();
        let held_by = if holders.is_empty() {
            String::new()
        } else {
            format!(" held by {}", holders.join("; "))
        };
        eprintln!(
            "lockgate: waiting for {} lock {:?}{held_by}",
            info.mode, info.name
        );
        if let Some(began) = &began {
            let _ = began.send(Reminder::Began {
                at: std::time::Instant::now(),
                what: format!("{} lock {:?}", info.mode, info.name),
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
        /// `, held by ...` as the first line said it, or nothing.
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

/// How the command ended.
struct Ended {
    status: ExitStatus,
    lost: Option<LostReason>,
}

fn exit_code(ended: Result<Ended, Failure>, released: Result<(), Failure>) -> Result<u8, Failure> {
    let ended = match ended {
        Ok(ended) => ended,
        Err(f) => {
            if let Err(e) = released {
                eprintln!("lockgate: {}", e.message);
            }
            return Err(f);
        }
    };
    if ended.lost.is_some() {
        return Ok(code::TEMPFAIL);
    }
    if let Err(e) = released {
        eprintln!("lockgate: {}", e.message);
        return Ok(code::UNAVAILABLE);
    }
    Ok(match (ended.status.code(), ended.status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        (None, None) => code::SOFTWARE,
    })
}

/// The signals lockgate handles while the command runs.
struct Signals {
    forwarded: Vec<(libc::c_int, Signal)>,
    child: Signal,
    /// lockgate was continued (`fg`, `bg`): the command's group may get the terminal.
    continued: Signal,
}

impl Signals {
    /// Installs the handlers. From here on these signals no longer end lockgate, so none can
    /// kill it between starting the command and waiting for it.
    fn install() -> Result<Self, Failure> {
        let handle = |sig: libc::c_int| {
            signal(SignalKind::from_raw(sig)).map_err(|e| Failure::internal("handle signals", e))
        };
        Ok(Self {
            forwarded: FORWARDED
                .iter()
                .map(|&sig| Ok((sig, handle(sig)?)))
                .collect::<Result<_, Failure>>()?,
            child: handle(libc::SIGCHLD)?,
            continued: handle(libc::SIGCONT)?,
        })
    }

    /// The next forwarded signal to arrive.
    async fn next_forwarded(forwarded: &mut [(libc::c_int, Signal)]) -> libc::c_int {
        std::future::poll_fn(|cx| {
            for (sig, s) in forwarded.iter_mut() {
                if s.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*sig);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// Starts the command and waits for it (and for its group, when it was stopped by a signal).
async fn supervise(guard: &LockGuard, args: &ExecArgs) -> Result<Ended, Failure> {
    let mut signals = Signals::install()?;
    let lock_fd = guard.as_fd().map(|fd| fd.as_raw_fd());
    // A leased lock (no descriptor carries it) must not outlive lockgate in the command.
    let watchdog = match lock_fd {
        Some(_) => None,
        None => Some(Watchdog::start().map_err(|e| Failure::internal("start the watchdog", e))?),
    };
    let spawned = Job::spawn(Spawn {
        command: &args.command,
        lock_fd,
        watchdog_fd: watchdog.as_ref().map(Watchdog::command_fd),
        terminal: Terminal::of_stdin(),
        env: command_env(guard),
    });
    let mut job = match spawned {
        Ok(job) => job,
        Err(e) => {
            if let Some(w) = watchdog {
                w.disarm();
            }
            let program = args.command[0].to_string_lossy();
            let code = match e.kind() {
                io::ErrorKind::NotFound => code::NOT_FOUND,
                _ => code::NOT_EXECUTABLE,
            };
            return Err(Failure::new(code, format!("cannot run {program:?}: {e}")));
        }
    };
    tracing::debug!(lock = guard.name(), pid = job.pid(), "command started");

    let mut lost_signal = guard.lost_signal();
    let mut lost = None;
    let mut forwarded = false;
    // After a lost lease: when the group, told with SIGTERM, gets SIGKILL.
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        match job.poll() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(Failure::internal("wait for the command", e)),
        }
        tokio::select! {
            _ = signals.child.recv() => {}
            _ = signals.continued.recv() => job.continued(),
            sig = Signals::next_forwarded(&mut signals.forwarded) => {
                tracing::debug!(signal = sig, "forwarding a signal to the command's group");
                job.signal(sig);
                forwarded = true;
            }
            reason = lost_signal.lost(), if lost.is_none() => {
                eprintln!(
                    "lockgate: the lease of lock {:?} was lost ({reason}); terminating the command",
                    guard.name()
                );
                job.signal(libc::SIGTERM);
                lost = Some(reason);
                kill_at = Some(Instant::now() + KILL_AFTER);
            }
            _ = sleep_until(kill_at), if kill_at.is_some() => {
                eprintln!(
                    "lockgate: the command did not stop within {KILL_AFTER:?} of losing the lease; killing it"
                );
                job.signal(libc::SIGKILL);
                kill_at = None;
            }
        }
    };
    if forwarded || lost.is_some() || status.signal().is_some() {
        end_group(&job, kill_at, &mut signals).await;
    }
    let from_terminal = job.ended_with_terminal();
    drop(job); // the terminal comes back
    if let Some(w) = watchdog {
        w.disarm();
    }
    // With the terminal, Ctrl-C and Ctrl-\ reached the command's group only. Without lockgate
    // they would have reached lockgate's own process group too (a calling script, which then
    // stops): pass them on, now that the command has ended. lockgate itself handles them.
    if let (true, false, Some(sig @ (libc::SIGINT | libc::SIGQUIT))) =
        (from_terminal, forwarded, status.signal())
    {
        // SAFETY: kill(2) on our own process group.
        unsafe { libc::kill(0, sig) };
    }
    Ok(Ended { status, lost })
}

/// What the command is told about its lock:
///
/// - `LOCKGATE_LOCK_NAME`: the lock's name;
/// - `LOCKGATE_HOLDER_ID`: this hold, unique across hosts and time (`HOST/PID/NANOS`: the host,
///   lockgate's pid, the wall clock at the grant in nanoseconds), for the protected system's logs;
/// - `LOCKGATE_FENCING_TOKEN` (leased lockers only): the lease's fencing token, which strictly
///   increases with every grant of the lock. A command that passes it with its writes lets the
///   system it writes to refuse a holder whose lease ran out: the one thing `lockgate` cannot do
///   for it when `lockgate` itself is paused (SIGSTOP, a frozen VM) and nothing renews the lease,
///   while the command runs on after another holder took the lock over.
fn command_env(guard: &LockGuard) -> Vec<(&'static str, String)> {
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
    let mut env = vec![
        ("LOCKGATE_LOCK_NAME", guard.name().to_owned()),
        (
            "LOCKGATE_HOLDER_ID",
            format!("{host}/{}/{nanos}", std::process::id()),
        ),
    ];
    if let Some(token) = guard.fencing_token() {
        env.push(("LOCKGATE_FENCING_TOKEN", token.to_string()));
    }
    env
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Ends what is left of the command's group once the command itself has ended: SIGTERM (unless
/// it was sent already: then `kill_at` is set), then SIGKILL at `kill_at`.
async fn end_group(job: &Job, kill_at: Option<Instant>, signals: &mut Signals) {
    if !job.group_alive() {
        return;
    }
    let kill_at = match kill_at {
        Some(at) => at,
        None => {
            tracing::debug!("the command left processes behind; terminating them");
            job.signal(libc::SIGTERM);
            Instant::now() + KILL_AFTER
        }
    };
    // Members of the group need not be lockgate's children, so nothing announces their end:
    // look again every 20 ms (and on every child event).
    while job.group_alive() {
        tokio::select! {
            _ = tokio::time::sleep_until(kill_at) => {
                job.signal(libc::SIGKILL);
                return;
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = signals.child.recv() => {}
        }
    }
}
