//! `lockgate exec`: hold a lock while a command runs.
//!
//! The command never runs without the lock, and does not outlive lockgate:
//! - With a file locker the command inherits the lock file's descriptor, so the lock belongs to
//!   it as much as to lockgate (flock(1)'s rule).
//! - With a leased locker, when the lease is lost the command's process group gets SIGTERM, and
//!   SIGKILL if anything of it still runs 2 s later; lockgate exits 75.
//! - If lockgate dies (SIGKILL, its process group killed by a CI runner's cancel), the watchdog
//!   (see `watchdog.rs`) ends the command's group the same way, for every locker; with
//!   `--keep-running` (file lockers only) the command runs on, keeping the lock, as flock(1)'s
//!   command does when flock alone is killed.
//!
//! The command runs in a process group of its own (see `job.rs`). SIGINT, SIGTERM, SIGHUP and
//! SIGQUIT sent to lockgate while the command runs are forwarded to that group, unless they were
//! ignored when lockgate started: those stay ignored, for lockgate and the command
//! (`signals.rs`). lockgate exits with the command's status (128+N if it was killed by signal
//! N). When the command ended by a signal (forwarded, from the terminal, or its own), what is
//! left of its group gets SIGTERM, and SIGKILL 2 s later: an interrupted job stops as a whole.
//!
//! Every path that acquired the lock releases it explicitly and waits for the release before
//! lockgate exits: a leased lock merely dropped would be released by a task that dies with the
//! runtime, and stay held for a TTL.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use lockgate::{LockGuard, LostReason};
use tokio::time::Instant;

use crate::args::ExecArgs;
use crate::errors::{code, Failure};
use crate::job::{Job, Spawn, Terminal};
use crate::locator::Locator;
use crate::signals::Signals;
use crate::take::{take, Outcome};
use crate::watchdog::Watchdog;

/// How long a command may run on after it was told to stop (lockgate's death, an interrupted
/// job) before it gets SIGKILL. After a lost lease it is shorter when the locker's timing says
/// so: at most half the time between the loss and the earliest takeover ([`kill_after`]).
pub(crate) const KILL_AFTER: Duration = Duration::from_secs(2);

/// The time between SIGTERM and SIGKILL after a lost lease: half the lease's grace before
/// anyone may take the lock over, at most [`KILL_AFTER`]. When the lock was taken over
/// already (no grace), no kill can come before the takeover: the command gets
/// [`KILL_AFTER_TAKEOVER`] to hear SIGTERM (a shell's trap runs once its foreground command
/// ends), and a fenced resource refuses its writes meanwhile.
fn kill_after(signal: &lockgate::LostSignal) -> Duration {
    match signal.takeover_grace() {
        None => KILL_AFTER,
        Some(grace) if grace.is_zero() => KILL_AFTER_TAKEOVER,
        Some(grace) => (grace / 2).min(KILL_AFTER),
    }
}

/// See [`kill_after`].
const KILL_AFTER_TAKEOVER: Duration = Duration::from_millis(500);

/// The command `exec` runs: COMMAND, or for `-c STRING` `$SHELL -c STRING` (else `/bin/sh`), as
/// flock(1) runs it.
fn command(args: &mut ExecArgs) -> Result<Vec<OsString>, Failure> {
    let command = std::mem::take(&mut args.command);
    match (args.shell_command.take(), command.is_empty()) {
        (Some(script), true) => {
            let shell = std::env::var_os("SHELL")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "/bin/sh".into());
            Ok(vec![shell, "-c".into(), script])
        }
        (Some(_), false) => Err(Failure::new(
            code::USAGE,
            "give either -c 'SHELL COMMAND' or COMMAND [ARGS...], not both",
        )),
        (None, true) => Err(Failure::new(
            code::USAGE,
            "no COMMAND to run: lockgate exec NAME COMMAND [ARGS...] (or -c 'SHELL COMMAND')",
        )),
        (None, false) => Ok(command),
    }
}

pub(crate) fn run(locator: Option<&Locator>, mut args: ExecArgs) -> Result<u8, Failure> {
    let command = command(&mut args)?;
    if args.keep_running
        && matches!(
            locator,
            Some(Locator::Kubernetes { .. } | Locator::Http { .. })
        )
    {
        return Err(Failure::new(
            code::USAGE,
            "--keep-running applies to file locks only: nothing renews a leased lock once lockgate is gone",
        ));
    }
    // Who holds the lock, for whoever waits or looks: the command line.
    let description: Vec<String> = command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let taken = match take(locator, &args.lock, &args.name, description.join(" "))? {
        Outcome::Held(taken) => taken,
        Outcome::Busy(code) => return Ok(code),
    };
    let guard = taken.guard;
    taken.rt.block_on(async {
        let ended = supervise(&guard, &command, args.keep_running).await;
        let released = guard
            .release()
            .await
            .map_err(|e| Failure::lock("release", &args.name, e));
        exit_code(ended, released)
    })
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

/// Starts the command and waits for it (and for its group, when it was stopped by a signal).
async fn supervise(
    guard: &LockGuard,
    command: &[OsString],
    keep_running: bool,
) -> Result<Ended, Failure> {
    let mut signals = Signals::install()?;
    let lock_fd = guard.as_fd().map(|fd| fd.as_raw_fd());
    // The command must not outlive lockgate: a leased lock is renewed by lockgate alone, and a
    // CI runner that cancels a job kills lockgate's process group, not the command's. Unless
    // asked to keep running (file locks only: the command co-owns the lock).
    let watchdog = match keep_running && lock_fd.is_some() {
        true => None,
        false => Some(Watchdog::start().map_err(|e| Failure::internal("start the watchdog", e))?),
    };
    let spawned = Job::spawn(Spawn {
        command,
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
            let program = command[0].to_string_lossy();
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
            _ = signals.continued.recv() => {
                // Stopped (Ctrl-Z) for longer than the lease could last: the command must not
                // run on under a lock that may be somebody else's now.
                if lost.is_none() && lost_signal.reason().is_some() {
                    eprintln!(
                        "lockgate: the lease of lock {:?} ran out while the command was stopped; killing it",
                        guard.name()
                    );
                    job.signal(libc::SIGKILL);
                    lost = lost_signal.reason();
                } else {
                    job.continued();
                }
            }
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
                kill_at = Some(Instant::now() + kill_after(&lost_signal));
            }
            _ = sleep_until(kill_at), if kill_at.is_some() => {
                eprintln!(
                    "lockgate: the command did not stop within {:?} of losing the lease; killing it",
                    kill_after(&lost_signal)
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
    let mut env = vec![
        ("LOCKGATE_LOCK_NAME", guard.name().to_owned()),
        ("LOCKGATE_HOLDER_ID", crate::take::holder_id()),
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
