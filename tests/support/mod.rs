//! Helpers shared by the library's tests (`tests/`) and the command's tests (`cli/tests/`, which
//! include this file by path): child processes that cannot outlive a failed test, reading their
//! output with deadlines, and waiting for conditions with deadlines.
//!
//! Nothing here can hang a test: every wait has a limit, and a child is killed (with its process
//! group, when it leads one) when its guard is dropped, also while a failed assertion unwinds.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long a test waits for something a working implementation does at once (a line from a
/// child, a child's exit): generous, for a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Lines read from a pipe on a thread of their own, so that waiting for one has a deadline.
pub struct Lines {
    rx: Receiver<String>,
    what: String,
}

impl Lines {
    /// Starts reading `from`; `what` names the stream in failure messages.
    pub fn new(from: impl Read + Send + 'static, what: impl Into<String>) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            rx,
            what: what.into(),
        }
    }

    /// The next line, or `None` at the end of the stream; panics after `limit`.
    pub fn next_within(&mut self, limit: Duration) -> Option<String> {
        match self.rx.recv_timeout(limit) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                panic!("{}: no line within {limit:?}", self.what)
            }
        }
    }

    /// Skips lines until one starts with `want` and returns it; panics when the stream ends
    /// first or after `limit`.
    pub fn expect_within(&mut self, want: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if line.starts_with(want) => return line,
                Ok(line) => skipped.push(line),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{} ended before a line starting with {want:?}; it printed {skipped:?}",
                    self.what
                ),
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no line starting with {want:?} within {limit:?}; it printed {skipped:?}",
                    self.what
                ),
            }
        }
    }

    /// [`expect_within`](Self::expect_within) with the default [`PATIENCE`].
    pub fn expect(&mut self, want: &str) -> String {
        self.expect_within(want, PATIENCE)
    }

    /// Everything until the end of the stream; panics after `limit`.
    pub fn rest_within(&mut self, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => out.push(line),
                Err(RecvTimeoutError::Disconnected) => return out,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{} did not end within {limit:?}; so far {out:?}", self.what)
                }
            }
        }
    }
}

/// A child process that is killed and reaped when dropped (also when a test panics). With
/// [`Proc::group`] the whole process group it leads is killed.
pub struct Proc {
    child: Option<Child>,
    /// Its stdout, line by line, when it was piped.
    pub stdout: Option<Lines>,
    /// Its stderr, line by line, when it was piped.
    pub stderr: Option<Lines>,
    /// Its stdin, when it was piped. Dropping it closes the child's stdin.
    pub stdin: Option<ChildStdin>,
    kill_group: bool,
    /// Other process groups to kill with it (what the child started in groups of their own).
    groups: Vec<u32>,
    status: Option<ExitStatus>,
    name: String,
}

impl Proc {
    /// Spawns `cmd` with stdin, stdout and stderr piped (each can be replaced before by setting
    /// it on `cmd`: a `Stdio` set explicitly is kept).
    pub fn spawn(cmd: &mut Command) -> Self {
        Self::spawn_with(cmd, true, true, true)
    }

    /// Spawns `cmd`, piping the chosen streams.
    pub fn spawn_with(cmd: &mut Command, stdin: bool, stdout: bool, stderr: bool) -> Self {
        if stdin {
            cmd.stdin(Stdio::piped());
        }
        if stdout {
            cmd.stdout(Stdio::piped());
        }
        if stderr {
            cmd.stderr(Stdio::piped());
        }
        let name = format!("{:?}", cmd.get_program());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let pid = child.id();
        Self {
            stdout: child
                .stdout
                .take()
                .map(|s| Lines::new(s, format!("stdout of {name} (pid {pid})"))),
            stderr: child
                .stderr
                .take()
                .map(|s| Lines::new(s, format!("stderr of {name} (pid {pid})"))),
            stdin: child.stdin.take(),
            child: Some(child),
            kill_group: false,
            groups: Vec::new(),
            status: None,
            name,
        }
    }

    /// Marks the child as the leader of its own process group (it was started with
    /// `process_group(0)`): dropping the guard kills the whole group.
    pub fn group(mut self) -> Self {
        self.kill_group = true;
        self
    }

    /// Also kills the process group `pgid` when dropped.
    pub fn also_kill_group(&mut self, pgid: u32) {
        self.groups.push(pgid);
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: the child has not been reaped, so the pid is still its own.
            unsafe { libc::kill(self.id() as libc::pid_t, sig) };
        }
    }

    /// The next stdout line starting with `want` (within [`PATIENCE`]).
    pub fn expect(&mut self, want: &str) -> String {
        self.stdout
            .as_mut()
            .expect("stdout is piped")
            .expect_within(want, PATIENCE)
    }

    /// The next stderr line starting with `want` (within [`PATIENCE`]).
    pub fn expect_err(&mut self, want: &str) -> String {
        self.stderr
            .as_mut()
            .expect("stderr is piped")
            .expect_within(want, PATIENCE)
    }

    /// Waits for the child to exit; panics (and kills it) after `limit`.
    pub fn wait_within(&mut self, limit: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let child = self.child.as_mut().expect("not reaped");
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(s) = child.try_wait().expect("waitpid") {
                self.status = Some(s);
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} (pid {}) did not exit within {limit:?}",
                    self.name,
                    child.id()
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// [`wait_within`](Self::wait_within) with the default [`PATIENCE`].
    pub fn wait(&mut self) -> ExitStatus {
        self.wait_within(PATIENCE)
    }

    /// Closes the child's stdin, then waits for it to exit.
    pub fn finish(&mut self) -> ExitStatus {
        drop(self.stdin.take());
        self.wait()
    }

    /// Kills the child (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        for &g in &self.groups {
            // SAFETY: kill(2) on a group this test started.
            unsafe { libc::kill(-(g as libc::pid_t), libc::SIGKILL) };
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        if self.kill_group {
            // SAFETY: plain kill(2); the group is the child's own.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        if self.status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Kills a process that is not our child (a grandchild) when dropped, if it still runs.
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0 > 0 {
            // SAFETY: plain kill(2). The pid could in theory have been reused; the tests only
            // create these guards for processes that are still running.
            unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// True while the process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which ends with the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The children of `pid`: (pid, command name) each, from /proc.
pub fn children_of(pid: u32) -> Vec<(u32, String)> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let child: u32 = p.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_owned();
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == pid).then_some((child, comm))
        })
        .collect()
}

/// Kills (SIGKILL) every process of the session `sid`: what a test started in a session of its
/// own, whatever process groups it made.
pub fn kill_session(sid: u32) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp session ...
        let session = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(3))
            .and_then(|s| s.parse::<u32>().ok());
        if session == Some(sid) {
            // SAFETY: kill(2) on a process of the test's own session.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Waits until `cond` holds, checking with a short back-off; panics after `limit` with `what`.
/// For conditions that nothing announces (a process's state, a kernel table): the check is
/// cheap and the back-off short, so the wait ends within milliseconds of the condition.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(200);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The FLOCK entries of `/proc/locks` for the file at `path`: `(waiting, pid)` each.
/// Independent of lockgate's own reader, so tests can check it. `/proc/locks` comes one page
/// per `read(2)` and locking elsewhere on the host can shift entries between pages, so the
/// file is read until two readings agree.
pub fn proc_locks_of(path: &Path) -> Vec<(bool, i64)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let read = || {
        let mut text = String::new();
        std::fs::File::open("/proc/locks")
            .and_then(|mut f| f.read_to_string(&mut text))
            .expect("read /proc/locks");
        let mut entries: Vec<(bool, i64)> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace().skip(1).peekable();
                let waiting = fields.peek() == Some(&"->");
                if waiting {
                    fields.next();
                }
                let f: Vec<&str> = fields.take(5).collect();
                (f.len() == 5 && f[0] == "FLOCK" && f[4] == id)
                    .then(|| (waiting, f[3].parse().unwrap_or(-1)))
            })
            .collect();
        entries.sort_unstable();
        entries
    };
    let mut last = read();
    for _ in 0..50 {
        let again = read();
        if again == last {
            return last;
        }
        last = again;
    }
    panic!(
        "/proc/locks never read the same twice for {}",
        path.display()
    );
}

/// How many processes wait in `flock(2)` for the file at `path` (its `->` lines).
pub fn flock_waiters(path: &Path) -> usize {
    proc_locks_of(path).iter().filter(|(w, _)| *w).count()
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one host.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `later - earlier` for two [`monotonic_ns`] readings; panics when `later` is earlier (a grant
/// before its release is a violation, never a latency of zero).
pub fn elapsed_between(earlier: u64, later: u64, what: &str) -> Duration {
    assert!(
        later >= earlier,
        "{what}: the later event came {} ns before the earlier one",
        earlier - later
    );
    Duration::from_nanos(later - earlier)
}
