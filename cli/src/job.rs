//! The command's process group: started in a group of its own, signalled as a whole, waited for
//! with job control, and given the terminal while it runs in the foreground.
//!
//! Running the command in its own process group is what lets `lockgate` reach everything the
//! command started (a shell script's background jobs, a build's compilers) with one `kill(2)`.
//! It is also what shells do with each job, and it brings their duties along: when `lockgate`
//! runs in the foreground of a terminal, the terminal must go to the command's group (or the
//! command could not read it, and Ctrl-C would reach `lockgate` instead of the command), come
//! back when the command ends, and a Ctrl-Z that stops the command must stop `lockgate` too, so
//! that the shell sees its job stop and takes the terminal back.

use std::ffi::OsString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitStatus;

use crate::watchdog;

/// `lockgate`'s controlling terminal, on stdin.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Terminal {
    fd: RawFd,
    /// `lockgate`'s own process group.
    own: libc::pid_t,
}

impl Terminal {
    /// The terminal on stdin when it is `lockgate`'s controlling terminal (interactive use, in
    /// the foreground or in the background); `None` otherwise (a pipe, a file, no terminal).
    pub(crate) fn of_stdin() -> Option<Self> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: plain queries on a descriptor number. tcgetpgrp fails unless the terminal
        // is our controlling terminal.
        unsafe {
            let own = libc::getpgrp();
            (libc::isatty(fd) == 1 && libc::tcgetpgrp(fd) >= 0).then_some(Self { fd, own })
        }
    }

    /// The terminal's foreground process group.
    fn owner(&self) -> libc::pid_t {
        // SAFETY: tcgetpgrp on a descriptor number.
        unsafe { libc::tcgetpgrp(self.fd) }
    }

    fn is_foreground(&self) -> bool {
        self.owner() == self.own
    }

    /// Makes `group` the terminal's foreground process group.
    fn give(&self, group: libc::pid_t) {
        // SAFETY: tcsetpgrp with SIGTTOU blocked (a background group may then set it, as
        // shells do).
        with_sigttou_blocked(|| unsafe { libc::tcsetpgrp(self.fd, group) });
    }
}

/// Runs `f` with SIGTTOU blocked on this thread. Async-signal-safe (also used in the forked
/// child).
fn with_sigttou_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset operations on local sets; pthread_sigmask on the calling thread.
    unsafe {
        let mut block: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, libc::SIGTTOU);
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

/// How the command is started.
pub(crate) struct Spawn<'a> {
    /// The program and its arguments.
    pub command: &'a [OsString],
    /// A file lock's descriptor: the command inherits it and co-owns the lock (flock(1)).
    pub lock_fd: Option<RawFd>,
    /// A leased lock's watchdog: the command announces its group to it, and gets SIGTERM if
    /// `lockgate` dies.
    pub watchdog_fd: Option<RawFd>,
    /// `lockgate`'s terminal: the command's group gets it while `lockgate` is in its foreground.
    pub terminal: Option<Terminal>,
    /// Variables added to the command's environment.
    pub env: Vec<(&'static str, String)>,
}

/// The running command, leader of its own process group.
#[derive(Debug)]
pub(crate) struct Job {
    pid: libc::pid_t,
    terminal: Option<Terminal>,
    /// The command's group had the terminal when the command ended.
    ended_with_terminal: bool,
    /// Stopped by job control (and lockgate with it): to be continued with lockgate.
    stopped: bool,
    reaped: bool,
}

impl Job {
    /// Starts the command in a new process group (whose id is its pid).
    ///
    /// Must run on the main thread: `PR_SET_PDEATHSIG` fires when the *thread* that forked the
    /// command exits, and the main thread lives as long as `lockgate`.
    pub(crate) fn spawn(how: Spawn<'_>) -> io::Result<Self> {
        let mut cmd = std::process::Command::new(&how.command[0]);
        cmd.args(&how.command[1..]);
        cmd.envs(how.env.iter().map(|(k, v)| (k, v)));
        // SAFETY: getpid cannot fail.
        let parent = unsafe { libc::getpid() };
        let Spawn {
            lock_fd,
            watchdog_fd,
            terminal,
            ..
        } = how;
        // In the foreground, the terminal goes to the command's group at once.
        let tty = terminal.filter(Terminal::is_foreground).map(|t| t.fd);
        // SAFETY: the closure only makes async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = tty {
                    // Also from the parent: whichever runs first, the command never reads
                    // the terminal before it is its own.
                    with_sigttou_blocked(|| libc::tcsetpgrp(fd, libc::getpid()));
                }
                if let Some(fd) = watchdog_fd {
                    watchdog::announce(fd)?;
                    // A leased lock dies with lockgate: so must the command. The watchdog
                    // ends the whole group (with SIGKILL 2 s later); this covers the command's
                    // own process even if the watchdog is gone too.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // lockgate may have died before the prctl: then no signal will come.
                    if libc::getppid() != parent {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                }
                if let Some(fd) = lock_fd {
                    // Keep the lock descriptor open across exec: the command co-owns the lock.
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = child.id() as libc::pid_t;
        // The child is waited for with waitpid(2) below (job control needs WUNTRACED), never
        // through `child`.
        drop(child);
        // Also from here (see above); fails harmlessly once the command has called exec.
        // SAFETY: setpgid on our own child.
        unsafe { libc::setpgid(pid, pid) };
        if let (Some(t), Some(_)) = (&terminal, tty) {
            t.give(pid);
        }
        Ok(Self {
            pid,
            terminal,
            ended_with_terminal: false,
            stopped: false,
            reaped: false,
        })
    }

    /// The command's pid, which is also its process group id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// True when the command's group had the terminal when the command ended (so a signal that
    /// ended it may have come from the terminal).
    pub(crate) fn ended_with_terminal(&self) -> bool {
        self.ended_with_terminal
    }

    /// Sends `sig` to the command's whole process group.
    pub(crate) fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our group. The group id cannot be reused while the group has
        // members; once it has none, the call fails harmlessly.
        unsafe { libc::kill(-self.pid, sig) };
    }

    /// Reaps the command if it has ended, and handles it being stopped; call on SIGCHLD.
    pub(crate) fn poll(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.reaped {
            return Err(io::Error::other("the command was already reaped"));
        }
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child.
            let r =
                unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG | libc::WUNTRACED) };
            match r {
                0 => return Ok(None),
                r if r < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                _ if libc::WIFSTOPPED(status) => self.stopped(libc::WSTOPSIG(status)),
                _ => {
                    self.reaped = true;
                    self.ended_with_terminal = self.terminal.is_some_and(|t| t.owner() == self.pid);
                    self.restore_terminal();
                    return Ok(Some(ExitStatus::from_raw(status)));
                }
            }
        }
    }

    /// The command was stopped. On a terminal (Ctrl-Z, or reading the terminal from the
    /// background), `lockgate` stops itself the same way, so that the shell sees its job stop
    /// and takes the terminal back; [`continued`](Self::continued) undoes it. Where lockgate
    /// cannot stop (an orphaned process group: the kernel discards job-control stops), that
    /// comes down to continuing the command at once. Other stops (SIGSTOP from a debugger, say)
    /// are left to whoever caused them.
    fn stopped(&mut self, sig: libc::c_int) {
        let Some(t) = self.terminal else { return };
        if !matches!(sig, libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU) {
            return;
        }
        tracing::debug!(signal = sig, "the command was stopped; stopping too");
        self.stopped = true;
        if t.owner() == self.pid {
            t.give(t.own);
        }
        // SAFETY: kill(2) on ourselves; the signal's action is the default (stop), and the
        // call returns once lockgate is continued.
        unsafe { libc::kill(libc::getpid(), sig) };
        self.continued();
    }

    /// `lockgate` was continued (SIGCONT: `fg`, `bg`): the command's group gets the terminal if
    /// lockgate is in the foreground now, and is continued if lockgate had stopped with it.
    pub(crate) fn continued(&mut self) {
        let Some(t) = self.terminal else { return };
        if self.reaped {
            return;
        }
        if t.is_foreground() {
            t.give(self.pid);
        }
        if std::mem::take(&mut self.stopped) {
            self.signal(libc::SIGCONT);
        }
    }

    /// Takes the terminal back if the command's group has it.
    fn restore_terminal(&mut self) {
        if let Some(t) = self.terminal.take() {
            if t.owner() == self.pid {
                t.give(t.own);
            }
        }
    }

    /// True while the command's process group has a member that is not a zombie.
    pub(crate) fn group_alive(&self) -> bool {
        // SAFETY: kill(2) with signal 0 only checks.
        if unsafe { libc::kill(-self.pid, 0) } != 0 {
            return io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        }
        // Members that ended but that nobody reaped yet (their parent is gone, and not every
        // init reaps) still count for kill(2): look for a live one.
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return true;
        };
        let group = self.pid.to_string();
        procs.flatten().any(|p| {
            let Some(pid) = p.file_name().to_str().map(str::to_owned) else {
                return false;
            };
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                return false;
            }
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // pid (comm) state ppid pgrp ...; comm may hold anything but ends at the last ')'.
            let mut fields = stat
                .rsplit_once(')')
                .map_or("", |(_, r)| r)
                .split_whitespace();
            let (state, pgrp) = (fields.next(), fields.nth(1));
            pgrp == Some(group.as_str()) && !matches!(state, Some("Z") | Some("X"))
        })
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.restore_terminal();
    }
}
