//! `lockgate exec`: hold a lock while a command runs.
//!
//! The command never runs without the lock:
//! - With a file locker the command inherits the lock file's descriptor, so the lock belongs to
//!   it as much as to lockgate: if lockgate is killed, the command keeps the lock until it (and
//!   any child that inherited the descriptor) exits.
//! - With a leased locker the command gets SIGTERM when lockgate dies (PR_SET_PDEATHSIG) and
//!   when the lease is lost, then SIGKILL if it is still running 2 s later; lockgate exits 75.
//!
//! SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to lockgate while the command runs are forwarded to
//! it; lockgate exits with the command's status (128+N if it was killed by signal N).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use lockgate::{AcquireError, AcquireOptions, Mode, Wait};
use tokio::signal::unix::{signal, SignalKind};

use crate::target::Target;
use crate::{code, error_chain, ExecArgs, Failure};

/// How long a command may run on after its lease was lost: the safety margin between the moment
/// a holder learns of the loss and the moment another process may take the lock over (TTL minus
/// renewal deadline with the default lease).
const KILL_AFTER_LOST: Duration = Duration::from_secs(2);

pub(crate) fn run(target: Target, args: ExecArgs) -> Result<u8, Failure> {
    crate::runtime()?.block_on(run_async(target, args))
}

fn wait_policy(args: &ExecArgs) -> Wait {
    match args.timeout {
        _ if args.non_blocking => Wait::NonBlocking,
        Some(t) => Wait::Timeout(t),
        None => Wait::Forever,
    }
}

async fn run_async(target: Target, args: ExecArgs) -> Result<u8, Failure> {
    let locker = target.locker().await?;
    let mode = if args.shared {
        Mode::Shared
    } else {
        Mode::Exclusive
    };
    let mut opts = AcquireOptions::default()
        .mode(mode)
        .wait(wait_policy(&args));
    if !args.quiet {
        opts = opts.on_wait(|info| {
            let holders: Vec<String> = info.holders.iter().map(ToString::to_string).collect();
            let held_by = if holders.is_empty() {
                String::new()
            } else {
                format!(", held by {}", holders.join(", "))
            };
            eprintln!(
                "lockgate: waiting for {} lock {:?}{held_by}",
                info.mode, info.name
            );
        });
    }
    let guard = match locker.acquire(&args.name, opts).await {
        Ok(guard) => guard,
        Err(AcquireError::Failed(e)) => return Err(e.into()),
        Err(e) => {
            if !args.quiet {
                eprintln!("lockgate: {}", error_chain(&e));
            }
            return Ok(args.conflict_exit_code);
        }
    };

    // Signals are caught from here on, so none can kill lockgate between spawn and wait.
    let mut signals = Vec::new();
    for kind in [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
        SignalKind::quit(),
    ] {
        let s = signal(kind)
            .map_err(|e| Failure::new(code::SOFTWARE, format!("cannot handle signals: {e}")))?;
        signals.push((kind.as_raw_value(), s));
    }

    let mut cmd = tokio::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    let inherited_fd = guard.as_fd().map(|fd| fd.as_raw_fd());
    // SAFETY: the closures only make async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            match inherited_fd {
                // Keep the lock descriptor open across exec: the command co-owns the lock.
                Some(fd) => {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // A leased lock dies with lockgate: so must the command.
                None => {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
    let program = args.command[0].to_string_lossy().into_owned();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let code = match e.kind() {
                io::ErrorKind::NotFound => code::NOT_FOUND,
                _ => code::NOT_EXECUTABLE,
            };
            drop(guard);
            return Err(Failure::new(code, format!("cannot run {program:?}: {e}")));
        }
    };
    let pid = child.id();
    tracing::debug!(lock = guard.name(), pid, "command started");

    let lost_signal = guard.lost_signal();
    let mut lost = None;
    // After a lost lease: when the command, told with SIGTERM, gets SIGKILL if still running.
    let mut kill_at: Option<tokio::time::Instant> = None;
    let status = loop {
        let mut lost_rx = lost_signal.clone();
        let forwarded = async {
            let futs = signals
                .iter_mut()
                .map(|(n, s)| Box::pin(async move { s.recv().await.map(|_| *n) }));
            futures_select_all(futs).await
        };
        tokio::select! {
            status = child.wait() => break status,
            sig = forwarded => {
                if let (Some(sig), Some(pid)) = (sig, pid) {
                    // SAFETY: the child has not been reaped (its wait has not returned), so the
                    // pid is still the child's.
                    unsafe { libc::kill(pid as libc::pid_t, sig) };
                }
            }
            reason = lost_rx.lost(), if lost.is_none() => {
                eprintln!("lockgate: the lease of lock {:?} was lost ({reason}); terminating the command", guard.name());
                if let Some(pid) = pid {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                }
                lost = Some(reason);
                kill_at = Some(tokio::time::Instant::now() + KILL_AFTER_LOST);
            }
            _ = async { tokio::time::sleep_until(kill_at.expect("guarded")).await }, if kill_at.is_some() => {
                eprintln!("lockgate: the command did not stop within {KILL_AFTER_LOST:?} of losing the lease; killing it");
                if let Some(pid) = pid {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
                kill_at = None;
            }
        }
    };
    let status = status
        .map_err(|e| Failure::new(code::SOFTWARE, format!("cannot wait for {program:?}: {e}")))?;
    let release = guard.release().await;
    if lost.is_some() {
        return Ok(code::TEMPFAIL);
    }
    if let Err(e) = release {
        eprintln!("lockgate: {}", error_chain(&e));
        return Ok(code::UNAVAILABLE);
    }
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        (None, None) => code::SOFTWARE,
    })
}

/// The first of several futures to complete.
async fn futures_select_all<F, T>(futs: impl IntoIterator<Item = F>) -> T
where
    F: std::future::Future<Output = T> + Unpin,
{
    let mut futs: Vec<F> = futs.into_iter().collect();
    std::future::poll_fn(move |cx| {
        for f in futs.iter_mut() {
            if let std::task::Poll::Ready(v) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}
