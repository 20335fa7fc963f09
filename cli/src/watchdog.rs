//! The watchdog: a small process that ends the command's process group if `lockgate` dies while
//! the command runs.
//!
//! # Why a process of its own
//!
//! A leased lock (Kubernetes, a lock server) is only held while `lockgate` renews it. If
//! `lockgate` is killed (SIGKILL, the OOM killer), nothing renews the lease and another host may
//! take the lock after its TTL, so the command must stop. A file lock stays with the command,
//! but a CI runner that cancels a job kills the job's process group, and the command, in a group
//! of its own, would run on, holding the lock: it must stop too (unless `--keep-running`). `PR_SET_PDEATHSIG` only reaches the command's own process,
//! not the processes it started, and nothing in `lockgate` runs after a SIGKILL. So before the
//! command starts, `lockgate` forks this watchdog. It holds the read end of a pipe whose write end
//! only `lockgate` has (and the command, until its `exec`); when `lockgate` dies the kernel closes
//! the write end, the watchdog reads end-of-file and sends the command's process group SIGTERM,
//! then SIGKILL 2 s later (the same escalation as for a lost lease). When the command has ended
//! normally, `lockgate` writes one byte and the watchdog exits without doing anything.
//!
//! The command itself tells the watchdog its process group (its own pid, written from the forked
//! child before `exec`), so there is no moment at which the command runs and the watchdog does
//! not know what to kill. The watchdog leads a process group of its own: signals sent to
//! `lockgate`'s group (a CI runner ending a job) or forwarded to the command's group do not reach
//! it.
//!
//! The watchdog runs only async-signal-safe system calls (it is a fork of a multi-threaded
//! process that never calls `exec`): no allocation, no locks.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::exec::KILL_AFTER;

/// A running watchdog. Dropping it without [`Watchdog::disarm`] (an error path, a panic) closes
/// the pipe, which the watchdog takes as `lockgate`'s death: the command's group is ended.
#[derive(Debug)]
pub(crate) struct Watchdog {
    pid: libc::pid_t,
    /// The write end of the pipe (close-on-exec).
    tx: OwnedFd,
}

impl Watchdog {
    /// Forks the watchdog.
    pub(crate) fn start() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 with a valid array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child only makes async-signal-safe system calls and never returns.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => unsafe { watch(rx.as_raw_fd(), tx.as_raw_fd()) },
            pid => {
                // Also from here, so that it holds whichever side runs first.
                // SAFETY: setpgid on our own child.
                unsafe { libc::setpgid(pid, pid) };
                drop(rx);
                Ok(Self { pid, tx })
            }
        }
    }

    /// The descriptor the command writes its pid to from its forked child, before `exec`.
    pub(crate) fn command_fd(&self) -> RawFd {
        self.tx.as_raw_fd()
    }

    /// The command and its group have ended as they should: the watchdog exits without
    /// signalling anything.
    pub(crate) fn disarm(self) {
        let done = [b'D'];
        // SAFETY: write of one byte from a valid buffer to our pipe.
        unsafe { libc::write(self.tx.as_raw_fd(), done.as_ptr().cast(), 1) };
        let pid = self.pid;
        drop(self.tx);
        reap(pid);
    }
}

fn reap(pid: libc::pid_t) {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Writes the calling process's pid to the watchdog's pipe. Called in the command's forked
/// child, before `exec`: async-signal-safe.
pub(crate) fn announce(fd: RawFd) -> io::Result<()> {
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() }.to_ne_bytes();
    // SAFETY: write from a valid buffer. A pipe write of 4 bytes is atomic.
    if unsafe { libc::write(fd, pid.as_ptr().cast(), pid.len()) } == pid.len() as isize {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The watchdog's body, in the forked child. Async-signal-safe calls only.
unsafe fn watch(rx: RawFd, tx: RawFd) -> ! {
    unsafe {
        libc::setpgid(0, 0);
        // lockgate's handlers are not ours. A hangup or an interrupt is for lockgate and its
        // command to act on (they reach the watchdog only if sent to it by pid): the watchdog
        // must last as long as lockgate. SIGTERM still ends it.
        for sig in [libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
            libc::signal(sig, libc::SIG_IGN);
        }
        for sig in [libc::SIGTERM, libc::SIGCHLD, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // Keep only the read end, as stdin: no copy of lockgate's descriptors (its sockets,
        // its stdout that a reader waits to see closed) stays open in here.
        libc::close(tx);
        if libc::dup2(rx, 0) < 0 {
            libc::_exit(1);
        }
        close_from(1);

        let mut pid = [0u8; 4];
        if read_full(&mut pid) < pid.len() {
            // lockgate went away, or was done, before any command started.
            libc::_exit(0);
        }
        let group = libc::pid_t::from_ne_bytes(pid);
        let mut byte = [0u8; 1];
        if read_full(&mut byte) == 1 {
            libc::_exit(0); // disarmed
        }
        // End of file: lockgate is gone. End the group like a lost lease.
        libc::kill(-group, libc::SIGTERM);
        let step = libc::timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        let steps = KILL_AFTER.as_millis() / 50;
        for _ in 0..steps {
            if libc::kill(-group, 0) != 0 {
                libc::_exit(0);
            }
            libc::nanosleep(&step, std::ptr::null_mut());
        }
        libc::kill(-group, libc::SIGKILL);
        libc::_exit(0)
    }
}

/// Reads from stdin until `buf` is full or end of file; the bytes read.
unsafe fn read_full(buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: read into the unfilled part of `buf`.
        let n = unsafe { libc::read(0, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        match n {
            n if n > 0 => got += n as usize,
            0 => break,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    got
}

/// Closes every descriptor from `first` up.
unsafe fn close_from(first: libc::c_int) {
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        ) == 0
        {
            return;
        }
        // Before Linux 5.9.
        let max = match libc::sysconf(libc::_SC_OPEN_MAX) {
            n if n > 0 => n.min(1 << 16) as libc::c_int,
            _ => 1024,
        };
        for fd in first..max {
            libc::close(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The watchdog with real processes: a helper process (this test binary re-run) starts a
    //! watchdog and a command group, then is killed with SIGKILL, as `lockgate` would be.

    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::Watchdog;
    use crate::job::{Job, Spawn};

    const ROLE: &str = "LOCKGATE_WATCHDOG_TEST_ROLE";

    /// The helper: starts a watchdog and `sh -c SCRIPT` in a group of its own, then (`disarm`)
    /// disarms the watchdog, and waits to be killed.
    #[test]
    fn helper_entry() {
        let Ok(role) = std::env::var(ROLE) else {
            return;
        };
        let script = std::env::var("SCRIPT").unwrap();
        let watchdog = Watchdog::start().unwrap();
        let command = ["sh".into(), "-c".into(), script.into()];
        let _job = Job::spawn(Spawn {
            command: &command,
            lock_fd: None,
            watchdog_fd: Some(watchdog.command_fd()),
            terminal: None,
            env: Vec::new(),
        })
        .unwrap();
        let mut out = std::io::stdout();
        if role == "disarm" {
            watchdog.disarm();
            writeln!(out, "disarmed").unwrap();
        } else {
            writeln!(out, "ready").unwrap();
        }
        out.flush().unwrap();
        std::thread::sleep(Duration::from_secs(600));
        std::process::exit(1);
    }

    /// The helper process, killed when dropped (also when a test fails).
    struct Helper(std::process::Child);

    impl Helper {
        /// Kills the helper with SIGKILL, as lockgate may be, and reaps it.
        fn kill(&mut self) {
            self.0.kill().unwrap();
            self.0.wait().unwrap();
        }
    }

    impl Drop for Helper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    struct Group(Vec<u32>);

    impl Drop for Group {
        fn drop(&mut self) {
            for &pid in &self.0 {
                // SAFETY: kill(2); the test only lists processes it started.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        })
    }

    /// Runs the helper until it says `until`; returns it and the pids the script printed (`pid
    /// N` lines).
    fn helper(role: &str, script: &str, until: &str) -> (Helper, Group) {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "watchdog::tests::helper_entry",
                "--nocapture",
                "-q",
            ])
            .env(ROLE, role)
            .env("SCRIPT", script)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        let child = Helper(child);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut pids = Group(Vec::new());
        let (mut said, mut printed) = (false, 0);
        while !(said && printed == 2) {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the helper's output");
            if let Some(p) = line.strip_prefix("pid ") {
                pids.0.push(p.trim().parse().unwrap());
                printed += 1;
            }
            said |= line == until;
        }
        (child, pids)
    }

    fn wait_gone(pids: &[u32], limit: Duration) -> Duration {
        let start = Instant::now();
        while pids.iter().any(|&p| alive(p)) {
            assert!(
                start.elapsed() < limit,
                "{pids:?} still run after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        start.elapsed()
    }

    const SCRIPT: &str = "sleep 1000 & echo pid $!; echo pid $$; exec sleep 1000";

    /// lockgate killed with SIGKILL while holding a leased lock: the command and what it started
    /// get SIGTERM at once.
    #[test]
    fn lockgates_death_ends_the_commands_group() {
        let (mut helper, group) = helper("die", SCRIPT, "ready");
        helper.kill();
        let took = wait_gone(&group.0, Duration::from_secs(10));
        assert!(
            took < super::KILL_AFTER,
            "{took:?}: SIGTERM should end them at once"
        );
    }

    /// A group that ignores SIGTERM gets SIGKILL 2 s later.
    #[test]
    fn a_group_that_ignores_sigterm_is_killed_later() {
        let script = format!("trap '' TERM; {SCRIPT}");
        let (mut helper, group) = helper("die", &script, "ready");
        let killed = Instant::now();
        helper.kill();
        wait_gone(&group.0, Duration::from_secs(10));
        let took = killed.elapsed();
        assert!(
            took >= super::KILL_AFTER,
            "killed after {took:?}, before SIGTERM's grace"
        );
    }

    /// A disarmed watchdog leaves the group alone: after it, lockgate's death reaches only the
    /// command's own process (PR_SET_PDEATHSIG), not what the command started.
    #[test]
    fn a_disarmed_watchdog_leaves_the_group_alone() {
        let (mut helper, group) = helper("disarm", SCRIPT, "disarmed");
        let (background, command) = (group.0[0], group.0[1]);
        // The helper has reaped its watchdog: nothing is left to end the group.
        assert!(alive(background) && alive(command));
        helper.kill();
        wait_gone(&[command], Duration::from_secs(10));
        assert!(alive(background), "the disarmed watchdog ended the group");
    }
}
