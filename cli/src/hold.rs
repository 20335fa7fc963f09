//! `lockgate hold`: take a lock and keep it until interrupted, as `etcdctl lock NAME` does.
//!
//! Once it holds the lock it prints one line on stdout, `holding MODE lock "NAME" as
//! HOLDER_ID` (and `, fencing token N` for leased locks), so that a script can wait for it; then
//! it waits for SIGINT, SIGTERM, SIGHUP or SIGQUIT (those not ignored at start), releases the
//! lock and exits 0. A leased lock that is lost meanwhile exits 75.

use std::io::Write;

use crate::args::HoldArgs;
use crate::errors::{code, Failure};
use crate::locator::Locator;
use crate::signals::Signals;
use crate::take::{holder_id, take, Outcome};

pub(crate) fn run(locator: Option<&Locator>, args: HoldArgs) -> Result<u8, Failure> {
    let what = &args.name;
    let taken = match take(locator, &args.lock, what, "lockgate hold".to_owned())? {
        Outcome::Held(taken) => taken,
        Outcome::Busy(code) => return Ok(code),
    };
    let guard = taken.guard;
    taken.rt.block_on(async {
        let waited = async {
            let mut signals = Signals::install()?;
            let mode = if args.lock.shared {
                "shared"
            } else {
                "exclusive"
            };
            let token = guard
                .fencing_token()
                .map(|t| format!(", fencing token {t}"))
                .unwrap_or_default();
            {
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "holding {mode} lock {:?} as {}{token}",
                    guard.name(),
                    holder_id()
                )
                .and_then(|()| out.flush())
                .map_err(Failure::output)?;
            }
            let mut lost = guard.lost_signal();
            tokio::select! {
                sig = Signals::next_forwarded(&mut signals.forwarded) => {
                    tracing::debug!(signal = sig, "releasing the lock");
                    Ok(0)
                }
                reason = lost.lost() => {
                    eprintln!("lockgate: the lease of lock {:?} was lost ({reason})", guard.name());
                    Ok(code::TEMPFAIL)
                }
            }
        };
        let held: Result<u8, Failure> = waited.await;
        let released = guard
            .release()
            .await
            .map_err(|e| Failure::lock("release", what, e));
        match (held, released) {
            (Ok(code::TEMPFAIL), _) => Ok(code::TEMPFAIL),
            (Ok(c), Ok(())) => Ok(c),
            (Ok(_), Err(f)) | (Err(f), _) => Err(f),
        }
    })
}
