//! Fairness of file locks through the command, as a werf-style user meets it: shared locks for
//! builds, an exclusive one for the clean-up. Real `lockgate` processes on real lock files.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{wait_until, Proc, PATIENCE};

/// The `lockgate` under test: this build's, or `$LOCKGATE_TEST_BIN` (to run these tests against
/// another build, e.g. an older one).
fn bin() -> PathBuf {
    std::env::var_os("LOCKGATE_TEST_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_lockgate").into())
        .into()
}

fn lockgate(dir: &Path) -> Command {
    let mut c = Command::new(bin());
    c.env_remove("LOCKGATE_LOCKER")
        .env_remove("LOCKGATE_DIR")
        .env_remove("LOCKGATE_LOG")
        .arg("--dir")
        .arg(dir);
    c
}

/// The lock file of `name` (SHA-256 naming).
fn lock_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(lockgate::file::Naming::Sha256.file_name(name))
}

/// How many processes hold the lock file at `path` (its `FLOCK` lines that are not waiting).
fn holders(path: &Path) -> usize {
    support::proc_locks_of(path)
        .iter()
        .filter(|(waiting, _)| !waiting)
        .count()
}

/// `n` shells, each in a process group of its own, that run `lockgate exec -s NAME -- sleep
/// HOLD` over and over; killed with their groups when dropped.
fn looping_shared_holders(dir: &Path, name: &str, n: usize, hold: Duration) -> Vec<Proc> {
    (0..n)
        .map(|_| {
            let mut cmd = Command::new("sh");
            cmd.args([
                "-c",
                r#"while :; do "$0" --dir "$1" exec -s "$2" -- sleep "$3"; done"#,
            ])
            .arg(bin())
            .arg(dir)
            .arg(name)
            .arg(hold.as_secs_f64().to_string())
            .env_remove("LOCKGATE_LOCKER")
            .env_remove("LOCKGATE_DIR")
            .env_remove("LOCKGATE_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
            Proc::spawn_with(&mut cmd, false, false, false).group()
        })
        .collect()
}

/// Issue 23: six processes loop `lockgate exec -s starve -- sleep 0.5`, so that the lock is
/// never free; `lockgate exec -w 30 starve -- true` must get it within about one shared hold
/// after it starts waiting (its "waiting" line), every time. Before the turnstile, flock(2)
/// let new shared holders in while it waited: it timed out after 30 s.
#[test]
fn looping_shared_holders_do_not_starve_an_exclusive_exec() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Duration::from_millis(500);
    let readers = looping_shared_holders(dir.path(), "starve", 6, hold);
    let path = lock_file(dir.path(), "starve");
    // The bound: one hold, and plenty for process start-up and exit on a loaded machine.
    let bound = hold * 6;
    let mut waits = Vec::new();
    for round in 0..3 {
        // The shared holders overlap again (after the previous round's exclusive hold).
        wait_until(
            "two looping shared holders holding the lock at once",
            PATIENCE,
            || holders(&path) >= 2,
        );
        let mut writer = Proc::spawn_with(
            lockgate(dir.path())
                .args(["exec", "-w", "30", "starve", "--", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
            false,
            false,
            true,
        );
        writer.expect_err("lockgate: waiting for exclusive lock");
        let waiting = Instant::now();
        let status = writer.wait_within(Duration::from_secs(60));
        let waited = waiting.elapsed();
        eprintln!(
            "round {round}: the exclusive exec waited {waited:?} behind 6 looping shared holders"
        );
        assert!(
            status.success(),
            "round {round}: the exclusive exec ended with {status} after waiting {waited:?}"
        );
        waits.push(waited);
    }
    assert!(
        waits.iter().all(|w| *w < bound),
        "an exclusive exec waited {waits:?} behind shared holders that each hold {hold:?} \
         (bound {bound:?})"
    );
    drop(readers);
}

/// An exclusive exec that gives up (`-w`), or is killed while it waits, leaves nothing that
/// keeps shared requests out: `exec -s -n` joins the shared holder at once afterwards.
#[test]
fn an_exclusive_exec_that_gives_up_or_dies_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Proc::spawn(lockgate(dir.path()).args([
        "exec",
        "-s",
        "gone",
        "--",
        "sh",
        "-c",
        "echo held; read _ || true",
    ]));
    holder.expect("held");
    let join = || {
        let status = lockgate(dir.path())
            .args(["exec", "-s", "-n", "gone", "--", "true"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "a shared exec -n was kept out: {status}");
    };
    join();
    let started = Instant::now();
    let timed_out = lockgate(dir.path())
        .args(["exec", "-w", "0.3", "gone", "--", "true"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(timed_out.code(), Some(1), "the exclusive exec timed out");
    assert!(started.elapsed() >= Duration::from_millis(300));
    join();
    // Killed while it waits in flock(2) for the lock (holding the turnstile, the lock marked).
    let mut waiter = Proc::spawn_with(
        lockgate(dir.path())
            .args(["exec", "gone", "--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
        false,
        false,
        true,
    );
    waiter.expect_err("lockgate: waiting for exclusive lock");
    let path = lock_file(dir.path(), "gone");
    wait_until("the exclusive exec waiting in flock(2)", PATIENCE, || {
        support::flock_waiters(&path) == 1
    });
    let shared_nb = lockgate(dir.path())
        .args(["exec", "-s", "-n", "gone", "--", "true"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(
        shared_nb.code(),
        Some(1),
        "a shared exec -n does not overtake a waiting exclusive exec"
    );
    waiter.kill();
    join();
    assert!(holder.finish().success());
}
