//! Histories of fault runs: what every client and the nemesis did, one JSON line per event.
//!
//! Each client process appends to a history file of its own, one line per event, with one
//! `write(2)` on an `O_APPEND` descriptor and no buffering, so that a line is whole even when the
//! process is killed right after writing it, and the events before a `SIGKILL` are all there.
//!
//! An operation is logged as Jepsen logs it: `invoke` when it starts, then `ok` (it happened),
//! `fail` (it did not happen) or `info` (outcome unknown: it may or may not have happened). Every
//! event carries two clocks: `mono`, CLOCK_MONOTONIC in nanoseconds (one time base for every
//! process on the host, also under faketime, which the runs tell to leave monotonic clocks
//! alone), and `wall`, CLOCK_REALTIME as the process sees it (skewed under faketime).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// CLOCK_MONOTONIC in nanoseconds.
pub fn mono_ns() -> u64 {
    clock(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME in nanoseconds since 1970, as this process sees it.
pub fn wall_ns() -> u64 {
    clock(libc::CLOCK_REALTIME)
}

fn clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid clock id and a timespec on the stack.
    unsafe { libc::clock_gettime(id, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Started.
    Invoke,
    /// Happened.
    Ok,
    /// Did not happen.
    Fail,
    /// May or may not have happened.
    Info,
}

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// The client process started (`detail` has its configuration).
    Start,
    /// Acquiring the lock (`mode`, `wait`; `ok` carries the fencing `token`).
    Acquire,
    /// The counter's read-modify-write (`ok`: `read` and `wrote`).
    Counter,
    /// A write to the fenced register (`ok`: accepted at `seq`; `fail`: refused).
    Register,
    /// The lost-lease signal (`detail`: the reason).
    Lost,
    /// Releasing the lock.
    Release,
    /// The client stopped as asked: its history is complete.
    End,
    /// Nemesis: a process killed with SIGKILL (`target`, `pid`).
    Kill,
    /// Nemesis: a process stopped with SIGSTOP.
    Pause,
    /// Nemesis: a stopped process continued with SIGCONT.
    Resume,
    /// Nemesis: a fault that concerns everyone (`detail`: which; `invoke` when it starts, `ok`
    /// when it is over).
    Fault,
    /// Nemesis: a fault between one client and the lock service (`target`; `detail`: which).
    Partition,
    /// Nemesis: that client's network healed.
    Heal,
}

/// One event of a history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The client (or `nemesis`).
    #[serde(rename = "c")]
    pub client: String,
    /// The process that logged it.
    pub pid: u32,
    pub op: Op,
    #[serde(rename = "t")]
    pub phase: Phase,
    /// The client's hold number: an acquisition and everything done under it share one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h: Option<u64>,
    pub mono: u64,
    pub wall: u64,
    /// `x` (exclusive) or `s` (shared), for acquisitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `block`, `timeout` or `nb`, for acquisitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
    /// The lease's fencing token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    /// Counter: the value read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<u64>,
    /// Counter: the value written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrote: Option<u64>,
    /// Register: the register's sequence number of an accepted write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Nemesis: the client a fault is aimed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Nemesis: the process a signal went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pid: Option<u32>,
    /// Free text: an error, a reason, a configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Event {
    /// An event of `client` now, with nothing else filled in.
    pub fn now(client: &str, op: Op, phase: Phase) -> Self {
        Self {
            client: client.to_owned(),
            pid: std::process::id(),
            op,
            phase,
            h: None,
            mono: mono_ns(),
            wall: wall_ns(),
            mode: None,
            wait: None,
            token: None,
            read: None,
            wrote: None,
            seq: None,
            target: None,
            target_pid: None,
            detail: None,
        }
    }

    pub fn hold(mut self, h: u64) -> Self {
        self.h = Some(h);
        self
    }

    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }

    pub fn token(mut self, t: Option<u64>) -> Self {
        self.token = t;
        self
    }
}

/// Appends events to a history file: one `write(2)` per line on an `O_APPEND` descriptor.
#[derive(Debug)]
pub struct Recorder {
    file: std::fs::File,
}

impl Recorder {
    /// Opens (creating) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(Self { file })
    }

    /// Appends `e` as one line. Panics when the history cannot be written: a run without its
    /// history means nothing.
    pub fn log(&self, e: &Event) {
        let mut line = serde_json::to_vec(e).expect("an event serializes");
        line.push(b'\n');
        (&self.file)
            .write_all(&line)
            .expect("append to the history file");
    }
}

/// Reads a history file. A last line cut short (a process killed while writing it, which one
/// `write(2)` makes all but impossible) is dropped; any other bad line is an error.
pub fn read(path: &Path) -> Result<Vec<Event>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(e) => out.push(e),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => return Err(format!("{}:{}: {e}: {line}", path.display(), i + 1)),
        }
    }
    Ok(out)
}

/// Every `*.jsonl` history in `dir`, in name order.
pub fn read_dir(dir: &Path) -> Result<Vec<Vec<Event>>, String> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    paths.sort();
    paths.iter().map(|p| read(p)).collect()
}
