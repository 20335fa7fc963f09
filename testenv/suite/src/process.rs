//! Child processes for tests: killed when their handle drops (also when a test panics), stdout
//! read line by line on a thread of its own, every wait with a deadline.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A child process, killed when dropped.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Spawns `cmd` with piped stdin, stdout and stderr; the lines of both outputs arrive in
    /// [`line`](Self::line) (stderr's are echoed to the test's stderr too).
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("  | {line}");
                if tx2.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The first stdout line starting with `prefix`, within `limit`.
    pub fn line(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line {prefix:?} within {limit:?}: {e}"),
            }
        }
    }

    /// True when a line starting with `prefix` has arrived (consumes what arrived).
    pub fn has_line(&mut self, prefix: &str) -> bool {
        self.lines.try_iter().any(|l| l.starts_with(prefix))
    }

    /// Closes stdin (a holder's `read` ends) and waits for the exit code.
    pub fn finish(mut self, limit: Duration) -> i32 {
        drop(self.child.stdin.take());
        self.wait(limit)
    }

    /// The exit code (-1 when killed by a signal), within `limit`.
    pub fn wait(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "child still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the child runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A lock server (`program serve --listen 127.0.0.1:0 ARGS...`: the Rust CLI or a Go peer) and
/// the address it printed.
pub fn serve(program: &Path, args: &[&str]) -> (Proc, String) {
    serve_on(program, "127.0.0.1:0", args)
}

/// [`serve`] on `listen`.
pub fn serve_on(program: &Path, listen: &str, args: &[&str]) -> (Proc, String) {
    let mut p = Proc::spawn(
        Command::new(program)
            .args(["serve", "--listen", listen])
            .args(args)
            .env(
                "KUBECONFIG",
                std::env::var("LOCKGATE_TEST_KUBECONFIG").unwrap_or_default(),
            ),
    );
    let line = p.line("serving on ", Duration::from_secs(20));
    let addr = line.trim_start_matches("serving on ").to_owned();
    (p, addr)
}
