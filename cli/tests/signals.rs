//! `lockgate exec` under the signals and process groups users put it in: `nohup`, a script's
//! background job, a CI runner that cancels a job by killing its process group (`setsid`, then
//! `kill -KILL -- -PGID`), and lockgate killed alone.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{busy, group_of, ignores, kill, lockgate_path, number_after, parent_of, quote};
use support::{alive, wait_until, KillOnDrop, Proc, PATIENCE};

/// `nohup lockgate exec ...`: SIGHUP was ignored at start, so it stays ignored for lockgate and
/// for the command (flock(1) does the same): a hangup ends neither.
#[test]
fn nohup_keeps_sighup_ignored_for_lockgate_and_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(
        Command::new("nohup")
            .arg(lockgate_path())
            .arg("--dir")
            .arg(dir.path())
            .args([
                "exec",
                "n",
                "--",
                "sh",
                "-c",
                "echo ready $$; read _; echo done",
            ]),
    );
    let command = number_after(&p.expect("ready"), "ready");
    let _command = KillOnDrop(command);
    let lockgate = p.id();
    assert_eq!(parent_of(command), lockgate, "nohup execs lockgate");
    assert!(ignores(lockgate, libc::SIGHUP), "lockgate handles SIGHUP");
    assert!(
        ignores(command, libc::SIGHUP),
        "the command does not ignore SIGHUP"
    );
    // A hangup to lockgate and to the command's group: nothing happens.
    kill(i64::from(lockgate), libc::SIGHUP);
    kill(-i64::from(group_of(command)), libc::SIGHUP);
    drop(p.stdin.take());
    p.expect("done");
    assert_eq!(p.wait().code(), Some(0));
    // SIGINT was not ignored: lockgate forwards it, as ever.
    let mut p = Proc::spawn(
        Command::new("nohup")
            .arg(lockgate_path())
            .arg("--dir")
            .arg(dir.path())
            .args(["exec", "n", "--", "sh", "-c", "echo ready; read _"]),
    );
    p.expect("ready");
    p.signal(libc::SIGINT);
    assert_eq!(p.wait().code(), Some(130));
}

/// `lockgate exec ... &` in a script: a shell without job control starts background jobs with
/// SIGINT and SIGQUIT ignored, so that a Ctrl-C meant for the script leaves them alone; they
/// stay ignored under lockgate too.
#[test]
fn a_background_job_keeps_sigint_and_sigquit_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("go");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let inner = format!(
        "echo ready $$; read _ < {}; echo done",
        quote(fifo.to_str().unwrap())
    );
    let script = format!(
        "{} --dir {} exec n -- sh -c {} & wait $!; echo rc=$?",
        quote(&lockgate_path()),
        quote(dir.path().to_str().unwrap()),
        quote(&inner)
    );
    let mut p = Proc::spawn(Command::new("sh").args(["-c", &script]));
    let command = number_after(&p.expect("ready"), "ready");
    let _command = KillOnDrop(command);
    let lockgate = parent_of(command);
    for sig in [libc::SIGINT, libc::SIGQUIT] {
        assert!(ignores(lockgate, sig), "lockgate handles signal {sig}");
        assert!(ignores(command, sig), "the command does not ignore {sig}");
        kill(i64::from(lockgate), sig);
        kill(-i64::from(group_of(command)), sig);
    }
    // Let the command go on: it ends by itself, unharmed.
    drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
    p.expect("done");
    assert_eq!(p.expect("rc="), "rc=0");
}

/// Starts `setsid sh -c 'lockgate exec [ARGS] n -- sh -c "echo ready $$; exec sleep 1000" &
/// wait'` (a CI job: the runner started the job's shell in a session and group of its own);
/// returns it and the command's pid.
fn ci_job(dir: &std::path::Path, args: &str) -> (Proc, u32) {
    let script = format!(
        "{} --dir {} exec {args} n -- sh -c 'echo ready $$; exec sleep 1000' & wait",
        quote(&lockgate_path()),
        quote(dir.to_str().unwrap()),
    );
    let mut job = Proc::spawn(
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null()),
    )
    .group();
    let command = number_after(&job.expect("ready"), "ready");
    (job, command)
}

/// A CI runner cancels a job by killing its process group. lockgate is in it; the command, in a
/// group of its own, is not: it is ended with lockgate all the same, and the lock is free.
/// (Before, `sleep` lived on, reparented to init, holding the lock.)
#[test]
fn killing_lockgates_process_group_ends_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let (mut job, command) = ci_job(dir.path(), "");
    let _command = KillOnDrop(command);
    let lockgate = parent_of(command);
    assert_ne!(
        group_of(command),
        group_of(lockgate),
        "the command has a group of its own"
    );
    assert!(busy(dir.path(), "n"));
    // The runner's cancel: SIGKILL to the job's whole group (lockgate, the job's shell).
    kill(-i64::from(job.id()), libc::SIGKILL);
    job.wait();
    wait_until("the command ended with lockgate's group", PATIENCE, || {
        !alive(command)
    });
    wait_until("the lock was freed", PATIENCE, || !busy(dir.path(), "n"));
}

/// lockgate killed alone (SIGKILL, the OOM killer): the command's group is ended too, SIGTERM
/// first; a command that ignores SIGTERM gets SIGKILL 2 s later.
#[test]
fn lockgates_death_ends_the_command_on_a_file_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(common::lockgate(dir.path()).args([
        "exec",
        "n",
        "--",
        "sh",
        "-c",
        "trap 'echo got TERM' TERM; echo ready $$; while :; do sleep 0.1; done",
    ]));
    let command = number_after(&p.expect("ready"), "ready");
    let _command = KillOnDrop(command);
    p.kill();
    p.expect("got TERM");
    wait_until("SIGKILL after the grace", Duration::from_secs(20), || {
        !alive(command)
    });
    wait_until("the lock was freed", PATIENCE, || !busy(dir.path(), "n"));
}

/// `--keep-running`: the command outlives lockgate (killed alone, or with its group) and keeps
/// the file lock, as flock(1)'s command does when flock alone is killed.
#[test]
fn keep_running_lets_the_command_outlive_lockgate() {
    let dir = tempfile::tempdir().unwrap();
    let (mut job, command) = ci_job(dir.path(), "--keep-running");
    let _command = KillOnDrop(command);
    kill(-i64::from(job.id()), libc::SIGKILL);
    job.wait();
    assert!(alive(command), "the command was ended");
    assert!(busy(dir.path(), "n"), "the command lost the lock");
    kill(i64::from(command), libc::SIGKILL);
    wait_until("the lock was freed", PATIENCE, || !busy(dir.path(), "n"));
    // Refused where it cannot work: nothing renews a leased lock without lockgate.
    let out = common::run(common::bin().args([
        "--locker",
        "http://127.0.0.1:1",
        "exec",
        "--keep-running",
        "n",
        "true",
    ]));
    assert_eq!(out.status.code(), Some(64), "{}", common::stderr(&out));
    assert!(common::stderr(&out).contains("--keep-running"));
}
