//! What the locks of a fault run protect: a counter and a fenced register, both plain files.
//!
//! They live outside the lock service on purpose, as a database a lock protects does: a fault of
//! the lock service (an API server restart, a cut network) does not reach them, so what they
//! record is what the clients really did.
//!
//! - The **counter** is guarded only by the lock under test: a holder reads it, adds one, writes
//!   it. Two holders at once lose an update.
//! - The **fenced register** is Jepsen's fenced-mutex resource (Chubby's sequencers): it keeps the
//!   highest fencing token it has accepted and refuses a write with a lower one. Its own
//!   exclusion is a flock on a file of its own (never the lock under test), and every write,
//!   accepted or refused, is appended to its log in the order it decided them: the checker reads
//!   the log as the register's linear order.

use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The counter file: its value, 0 when missing or empty.
pub fn read_counter(path: &Path) -> std::io::Result<u64> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
        Ok(s) if s.trim().is_empty() => Ok(0),
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|e| std::io::Error::other(format!("counter holds {s:?}: {e}"))),
    }
}

/// Writes the counter in place (one `pwrite` of the digits, padded to 20 bytes: a write is
/// never shorter than the last one, so no stale digits are left behind).
pub fn write_counter(path: &Path, v: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    f.write_all_at(format!("{v:<20}\n").as_bytes(), 0)
}

/// One decision of the register, as its log records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The register's sequence number after the decision (accepted writes increment it).
    pub seq: u64,
    pub token: u64,
    /// The highest token accepted before this write.
    pub max_before: u64,
    pub accepted: bool,
    pub client: String,
    pub h: u64,
    pub mono: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    seq: u64,
    max: u64,
}

/// A fenced register in a directory: `register` (its state), `register.log` (its decisions).
#[derive(Debug, Clone)]
pub struct Register {
    dir: PathBuf,
    /// When false, the check is off: every write is accepted (a planted bug).
    pub fenced: bool,
}

impl Register {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            fenced: true,
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("register.log")
    }

    /// Writes with `token` for hold `h` of `client`: `Ok(Some(seq))` when accepted, `Ok(None)`
    /// when refused.
    pub fn write(&self, token: u64, client: &str, h: u64) -> std::io::Result<Option<u64>> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.dir.join("register"))?;
        // SAFETY: flock on an open descriptor; released when `f` is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut text = String::new();
        f.read_to_string(&mut text)?;
        let mut state: State = if text.trim().is_empty() {
            State::default()
        } else {
            serde_json::from_str(&text).map_err(std::io::Error::other)?
        };
        let accepted = !self.fenced || token >= state.max;
        let max_before = state.max;
        if accepted {
            state.seq += 1;
            state.max = state.max.max(token);
            if !self.fenced {
                // The planted bug: the register takes the writer's word for it.
                state.max = token;
            }
        }
        let decision = Decision {
            seq: state.seq,
            token,
            max_before,
            accepted,
            client: client.to_owned(),
            h,
            mono: crate::history::mono_ns(),
        };
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut line = serde_json::to_vec(&decision).map_err(std::io::Error::other)?;
        line.push(b'\n');
        log.write_all(&line)?;
        if accepted {
            f.set_len(0)?;
            f.seek(std::io::SeekFrom::Start(0))?;
            f.write_all(&serde_json::to_vec(&state).map_err(std::io::Error::other)?)?;
        }
        Ok(accepted.then_some(state.seq))
    }

    /// The register's decisions, in order.
    pub fn decisions(&self) -> Result<Vec<Decision>, String> {
        let path = self.log_path();
        let text = match std::fs::read_to_string(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
            Ok(t) => t,
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}: {l}", path.display())))
            .collect()
    }
}
