//! The signals lockgate handles while it holds a lock, and the ones it leaves alone.
//!
//! A signal that was ignored when lockgate started stays ignored, for lockgate and for the
//! command, as with flock(1): `nohup lockgate exec ...` survives a hangup, and a `lockgate exec
//! ... &` in a script (whose shell starts background jobs with SIGINT and SIGQUIT ignored)
//! survives a Ctrl-C meant for the script. lockgate installs no handler for such a signal, so
//! the command inherits it ignored across exec(2).

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::errors::Failure;

/// The signals forwarded to the command's group (`exec`), or that end a `hold`.
pub(crate) const FORWARDED: [libc::c_int; 4] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// True when `sig` is ignored (SIG_IGN), as it was when lockgate started: lockgate installs
/// handlers only for signals that are not.
pub(crate) fn ignored(sig: libc::c_int) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into a zeroed struct.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// The handled signals: each of [`FORWARDED`] that is not ignored, SIGCHLD and SIGCONT.
pub(crate) struct Signals {
    pub forwarded: Vec<(libc::c_int, Signal)>,
    pub child: Signal,
    /// lockgate was continued (`fg`, `bg`): the command's group may get the terminal.
    pub continued: Signal,
}

impl Signals {
    /// Installs the handlers. From here on the handled signals no longer end lockgate, so none
    /// can kill it between starting the command and waiting for it. Must run inside the Tokio
    /// runtime.
    pub(crate) fn install() -> Result<Self, Failure> {
        let handle = |sig: libc::c_int| {
            signal(SignalKind::from_raw(sig)).map_err(|e| Failure::internal("handle signals", e))
        };
        let mut forwarded = Vec::new();
        for sig in FORWARDED {
            if ignored(sig) {
                tracing::debug!(signal = sig, "ignored at start: left ignored");
                continue;
            }
            forwarded.push((sig, handle(sig)?));
        }
        Ok(Self {
            forwarded,
            child: handle(libc::SIGCHLD)?,
            continued: handle(libc::SIGCONT)?,
        })
    }

    /// The next forwarded signal to arrive (never, when all of them are ignored).
    pub(crate) async fn next_forwarded(forwarded: &mut [(libc::c_int, Signal)]) -> libc::c_int {
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
