//! The `lockgate` command, run as a real process on real lock files.
//!
//! Helper processes are this test binary re-run with `LOCKGATE_CLI_TEST_CHILD` set: the test
//! `child_entry` then plays the role the environment describes and exits.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{alive, wait_until, KillOnDrop, Proc, PATIENCE};

/// The `lockgate` under test: this build's, or `$LOCKGATE_TEST_BIN` (to run these tests against
/// another build, e.g. an older one).
fn bin() -> Command {
    let exe = std::env::var_os("LOCKGATE_TEST_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_lockgate").into());
    let mut c = Command::new(exe);
    c.env_remove("LOCKGATE_LOCKER")
        .env_remove("LOCKGATE_DIR")
        .env_remove("LOCKGATE_LOG");
    c
}

fn lockgate(dir: &Path) -> Command {
    let mut c = bin();
    c.arg("--dir").arg(dir);
    c
}

/// Runs `cmd` to completion (stdin empty), within [`PATIENCE`].
fn run(cmd: &mut Command) -> Output {
    run_piped(cmd, true)
}

/// Runs `cmd` to completion, its stdout left as `cmd` has it (empty in the result).
fn run_stdout_as_set(cmd: &mut Command) -> Output {
    run_piped(cmd, false)
}

fn run_piped(cmd: &mut Command, pipe_stdout: bool) -> Output {
    let mut p = Proc::spawn_with(cmd.stdin(Stdio::null()), false, pipe_stdout, true);
    let stdout = p
        .stdout
        .take()
        .map(|mut l| l.rest_within(PATIENCE))
        .unwrap_or_default();
    let stderr = p.stderr.take().unwrap().rest_within(PATIENCE);
    let status = p.wait();
    let join = |lines: Vec<String>| {
        lines
            .into_iter()
            .map(|l| l + "\n")
            .collect::<String>()
            .into_bytes()
    };
    Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    }
}

/// Starts `lockgate exec` holding `name` around a shell script; returns once the script runs.
/// The script's first line is `running PID`. The command's process group is killed with the
/// guard.
fn hold(dir: &Path, args: &[&str], name: &str, script: &str) -> Proc {
    let mut p = Proc::spawn(lockgate(dir).arg("exec").args(args).arg(name).args([
        "--",
        "sh",
        "-c",
        &format!("echo running $$; {script}"),
    ]));
    let shell = pid_in(&p.expect("running"));
    p.also_kill_group(shell);
    p
}

fn busy(dir: &Path, name: &str) -> bool {
    let out = run(lockgate(dir).args(["exec", "-n", "-q", name, "--", "true"]));
    match out.status.code() {
        Some(1) => true,
        Some(0) => false,
        other => panic!(
            "unexpected status {other:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn lock_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(lockgate::file::Naming::Sha256.file_name(name))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn child_entry() {
    let Ok(role) = std::env::var("LOCKGATE_CLI_TEST_CHILD") else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let locker = lockgate::Locker::new(lockgate::FileLocker::new(env("DIR")).unwrap());
    let mut stdout = std::io::stdout();
    match role.as_str() {
        // Take COUNT exclusive locks named PREFIX0, PREFIX1, ..., hold them until stdin closes.
        "hold-many" => {
            let count: usize = env("COUNT").parse().unwrap();
            let guards: Vec<_> = (0..count)
                .map(|i| {
                    let opts = lockgate::AcquireOptions::exclusive().non_blocking();
                    locker
                        .acquire_blocking(&format!("{}{i}", env("PREFIX")), opts)
                        .unwrap()
                })
                .collect();
            writeln!(stdout, "locked {}", std::process::id()).unwrap();
            stdout.flush().unwrap();
            let _ = std::io::stdin().read_line(&mut String::new());
            drop(guards);
        }
        // Lock and unlock locks of its own as fast as it can until killed.
        "churn" => {
            writeln!(stdout, "churning").unwrap();
            stdout.flush().unwrap();
            let opts = lockgate::AcquireOptions::exclusive().non_blocking();
            loop {
                for i in 0..64 {
                    drop(locker.acquire_blocking(&format!("churn-{i}"), opts.clone()));
                }
            }
        }
        other => panic!("unknown child role {other}"),
    }
    std::process::exit(0);
}

fn child(role: &str, dir: &Path, extra: &[(&str, String)]) -> Proc {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_entry",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env("LOCKGATE_CLI_TEST_CHILD", role)
    .env("DIR", dir)
    .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Proc::spawn_with(&mut cmd, true, true, false)
}

#[test]
fn exits_with_the_commands_status() {
    let dir = tempfile::tempdir().unwrap();
    for code in [0, 3, 42, 255] {
        let out = run(lockgate(dir.path()).args([
            "exec",
            "n",
            "--",
            "sh",
            "-c",
            &format!("exit {code}"),
        ]));
        assert_eq!(out.status.code(), Some(code));
    }
    // Without `--` too, as flock(1) allows.
    let out = run(lockgate(dir.path()).args(["exec", "n", "sh", "-c", "echo hi"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
}

#[test]
fn a_command_killed_by_a_signal_gives_128_plus_n() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(lockgate(dir.path()).args(["exec", "n", "--", "sh", "-c", "kill -KILL $$"]));
    assert_eq!(out.status.code(), Some(128 + 9));
    let out = run(lockgate(dir.path()).args(["exec", "n", "--", "sh", "-c", "kill -TERM $$"]));
    assert_eq!(out.status.code(), Some(128 + 15));
}

#[test]
fn conflicts_and_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = hold(dir.path(), &[], "busy", "read _ || true");

    let out = run(lockgate(dir.path()).args(["exec", "-n", "busy", "--", "echo", "ran"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "the command must not run without the lock"
    );
    // The lock, and what happened: one line.
    assert_eq!(
        stderr(&out),
        "lockgate: lock \"busy\" is held elsewhere; not waiting for it (-n)\n"
    );

    let out = run(lockgate(dir.path()).args(["exec", "-n", "-E", "7", "busy", "--", "true"]));
    assert_eq!(out.status.code(), Some(7));

    let out = run(lockgate(dir.path()).args(["exec", "-w", "0", "busy", "--", "true"]));
    assert_eq!(out.status.code(), Some(1), "-w 0 is -n");

    let start = Instant::now();
    let out =
        run(lockgate(dir.path())
            .args(["exec", "-w", "0.3", "-E", "9", "busy", "--", "echo", "ran"]));
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(9));
    assert!(out.stdout.is_empty());
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let err = stderr(&out);
    assert!(
        err.contains("waiting for exclusive lock \"busy\" held by pid"),
        "{err}"
    );
    assert!(err.contains("timed out"), "{err}");
    assert!(
        err.lines()
            .last()
            .unwrap()
            .ends_with("waiting for lock \"busy\"; it is still held (a longer -w waits longer)"),
        "{err}"
    );

    // Shared while exclusive is held: busy too. -q silences.
    let out =
        run(lockgate(dir.path()).args(["exec", "-s", "-w", "0.1", "-q", "busy", "--", "true"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.is_empty(), "{}", stderr(&out));

    assert!(holder.finish().success());
    assert!(!busy(dir.path(), "busy"));
}

#[test]
fn shared_holders_run_together() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = hold(dir.path(), &["-s"], "r", "read _ || true");
    // A second shared holder runs while the first still holds.
    let out = run(lockgate(dir.path()).args(["exec", "-s", "-n", "r", "--", "echo", "together"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "together\n");
    assert!(
        busy(dir.path(), "r"),
        "an exclusive request must wait for the readers"
    );
    assert!(a.finish().success());
}

/// A waiting `exec` runs its command within milliseconds of the release: far under the 500 ms
/// poll of Go lockgate. The waiter is first seen blocked in the kernel (its `->` line).
#[test]
fn a_waiting_exec_runs_as_soon_as_the_lock_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let locker = lockgate::Locker::new(lockgate::FileLocker::new(dir.path()).unwrap());
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let guard = locker
            .acquire_blocking("q", lockgate::AcquireOptions::exclusive())
            .unwrap();
        let mut waiter =
            Proc::spawn(lockgate(dir.path()).args(["exec", "q", "--", "echo", "second"]));
        // The waiting line appears on stderr while the lock is held.
        let line = waiter.expect_err("lockgate:");
        assert!(
            line.starts_with("lockgate: waiting for exclusive lock \"q\""),
            "{line}"
        );
        let pid = i64::from(waiter.id());
        wait_until("the waiting exec blocked in flock(2)", PATIENCE, || {
            support::proc_locks_of(&lock_path(dir.path(), "q")).contains(&(true, pid))
        });
        let released = Instant::now();
        guard.release_blocking().unwrap();
        waiter.expect("second");
        latencies.push(released.elapsed());
        assert!(waiter.wait().success());
    }
    latencies.sort();
    eprintln!("release -> the waiting exec's command printed: {latencies:?}");
    // The median: one sample may land on a descheduled process on a loaded machine. It includes
    // starting `echo`.
    assert!(latencies[2] < Duration::from_millis(100), "{latencies:?}");
}

/// The pid a script printed as `WORD PID`.
fn pid_in(line: &str) -> u32 {
    line.split_whitespace()
        .nth(1)
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// True when `pid` runs the program `name`.
fn is_running(pid: u32, name: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
}

/// Signals sent to lockgate reach the command's whole process group: a background grandchild
/// dies too, whatever the signal (a non-interactive shell's background jobs ignore SIGINT and
/// SIGQUIT; what the command leaves behind after a signal gets SIGTERM).
#[test]
fn signals_reach_the_commands_process_group() {
    let dir = tempfile::tempdir().unwrap();
    for (sig, code) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
        (libc::SIGQUIT, 131),
    ] {
        let mut holder = hold(
            dir.path(),
            &[],
            "sig",
            "sleep 1000 & echo grandchild $!; wait",
        );
        let grandchild = pid_in(&holder.expect("grandchild"));
        let _guard = KillOnDrop(grandchild);
        // Once it runs `sleep`, the background job ignores SIGINT and SIGQUIT (before, it may
        // not yet).
        wait_until("the background job started sleep", PATIENCE, || {
            is_running(grandchild, "sleep")
        });
        holder.signal(sig);
        let status = holder.wait();
        assert_eq!(status.code(), Some(code), "signal {sig}");
        wait_until(
            &format!("the grandchild ended after signal {sig}"),
            Duration::from_secs(10),
            || !alive(grandchild),
        );
        assert!(
            !busy(dir.path(), "sig"),
            "lock freed after the command ended"
        );
    }
}

/// SIGQUIT is forwarded like the others: the command sees it (and may handle it).
#[test]
fn sigquit_is_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = hold(
        dir.path(),
        &[],
        "quit",
        "trap 'echo caught QUIT; exit 7' QUIT; echo armed; while :; do sleep 0.05; done",
    );
    holder.expect("armed");
    holder.signal(libc::SIGQUIT);
    holder.expect("caught QUIT");
    assert_eq!(holder.wait().code(), Some(7));
}

/// The command runs in a process group of its own (so that signals reach all of it), and
/// lockgate itself stays out of it.
#[test]
fn the_command_leads_its_own_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = hold(
        dir.path(),
        &[],
        "pg",
        r#"s=$(cat /proc/$$/stat); s=${s##*) }; set -- $s; echo ids $$ $3; read _ || true"#,
    );
    let ids = holder.expect("ids");
    let ids: Vec<u32> = ids[4..]
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let (shell, pgrp) = (ids[0], ids[1]);
    assert_eq!(pgrp, shell, "the command's shell leads its group");
    // SAFETY: getpgid of a live process.
    let lockgate_pgrp = unsafe { libc::getpgid(holder.id() as libc::pid_t) } as u32;
    assert_ne!(lockgate_pgrp, pgrp);
    assert!(holder.finish().success());
}

/// With `--keep-running`, flock(1)'s rule: the command co-owns the lock, and keeps it when
/// lockgate is killed (without it the command is ended: `signals.rs`).
#[test]
fn a_killed_lockgate_leaves_the_lock_with_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    let mut holder = hold(
        dir.path(),
        &["--keep-running"],
        "inherit",
        &format!("echo shell $$; read _ || true; touch {}", marker.display()),
    );
    let shell = pid_in(&holder.expect("shell"));
    let _shell = KillOnDrop(shell);
    // Keep the command's stdin open: it waits on it.
    let stdin = holder.stdin.take();
    holder.kill(); // SIGKILL to lockgate itself
                   // The command still runs and still has the lock (flock(1) semantics: it co-owns it).
    assert!(alive(shell));
    assert!(
        busy(dir.path(), "inherit"),
        "the command runs without the lock"
    );
    drop(stdin);
    wait_until("the command finished", PATIENCE, || marker.exists());
    wait_until("the lock was freed", PATIENCE, || {
        !busy(dir.path(), "inherit")
    });
}

#[test]
fn usage_errors_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["exec", "n"],                          // no command
        vec!["exec", "-w", "-1", "n", "true"],      // negative timeout
        vec!["exec", "-w", "soon", "n", "true"],    // not a number
        vec!["exec", "-n", "-w", "1", "n", "true"], // contradictory
        vec!["exec", "-s", "-x", "n", "true"],      // contradictory
        vec!["exec", "", "true"],                   // empty name
        vec!["exec", "a\u{1}b", "true"],            // control character
        vec!["--locker", "ftp://x", "status"],      // unknown scheme
        vec!["frobnicate"],
    ] {
        let out = run(lockgate(dir.path()).args(&args));
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(!out.stderr.is_empty());
    }
    for args in [
        vec!["--locker", "http://", "status"],
        vec!["--locker", "http://h:1/?q", "exec", "n", "true"],
        vec![
            "--locker",
            "http://127.0.0.1:1",
            "--ca-file",
            "/nonexistent.pem",
            "status",
        ],
        vec![
            "--locker",
            "http://127.0.0.1:1",
            "--token-file",
            "/nonexistent",
            "status",
        ],
    ] {
        let out = run(bin().args(&args));
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
    }
    let out = run(bin().arg("--help"));
    assert_eq!(out.status.code(), Some(0));
}

/// A lock server that cannot be reached is the environment's problem: exit 69, one line.
#[test]
fn an_unreachable_lock_server_exits_69() {
    let out = run(bin().args(["--locker", "http://127.0.0.1:1", "exec", "-n", "n", "true"]));
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach the lock server http://127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn unrunnable_commands_exit_126_or_127() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(lockgate(dir.path()).args(["exec", "n", "--", "/nonexistent/command"]));
    assert_eq!(out.status.code(), Some(127));
    assert!(
        stderr(&out).contains("/nonexistent/command"),
        "{}",
        stderr(&out)
    );
    let not_executable = dir.path().join("data.txt");
    std::fs::write(&not_executable, "just data").unwrap();
    let out = run(lockgate(dir.path())
        .args(["exec", "n", "--"])
        .arg(&not_executable));
    assert_eq!(out.status.code(), Some(126));
    assert!(!busy(dir.path(), "n"));
}

#[test]
fn a_bad_lock_directory_exits_69_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "").unwrap();
    let out = run(lockgate(&file).args(["exec", "n", "--", "echo", "ran"]));
    assert_eq!(out.status.code(), Some(69));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(
        err.starts_with("lockgate: lock directory") && err.contains("plain-file"),
        "{err}"
    );
}

/// A directory that exists but cannot hold lock files (/proc/1) is named as the problem, not
/// the lock file inside it.
#[test]
fn a_directory_that_cannot_hold_lock_files_is_named() {
    let out = run(bin().args(["--dir", "/proc/1", "exec", "n", "--", "echo", "ran"]));
    assert_eq!(out.status.code(), Some(69));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(
        err.starts_with("lockgate: cannot take lock \"n\": cannot use lock directory /proc/1:"),
        "{err}"
    );
    // What to do next.
    assert!(err.contains("choose another directory with --dir"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn the_locker_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = hold(dir.path(), &[], "env", "read _ || true");
    let out = run(bin()
        .env("LOCKGATE_DIR", dir.path())
        .args(["exec", "-n", "env", "true"]));
    assert_eq!(out.status.code(), Some(1));
    let url = format!("file:{}", dir.path().display());
    let out = run(bin()
        .env("LOCKGATE_LOCKER", &url)
        .args(["exec", "-n", "env", "true"]));
    assert_eq!(out.status.code(), Some(1));
    let out = run(bin().args(["--locker", &url, "exec", "-n", "env", "true"]));
    assert_eq!(out.status.code(), Some(1));
    // --dir beats the environment.
    let other = tempfile::tempdir().unwrap();
    let out = run(bin()
        .env("LOCKGATE_LOCKER", &url)
        .arg("--dir")
        .arg(other.path())
        .args(["exec", "-n", "env", "true"]));
    assert_eq!(out.status.code(), Some(0));
    assert!(holder.finish().success());
}

#[test]
fn status_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = hold(dir.path(), &["-s"], "shown", "read _ || true");
    assert!(!busy(dir.path(), "idle"));

    let out = run(lockgate(dir.path()).args(["status", "--json"]));
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The documented, versioned envelope (README, "JSON output").
    assert_eq!(v["schema"], 1, "{v}");
    assert_eq!(v["backend"], "file");
    assert_eq!(v["dir"], dir.path().to_str().unwrap());
    let locks = v["locks"].as_array().unwrap();
    let shown = locks.iter().find(|l| l["name"] == "shown").unwrap();
    assert_eq!(shown["state"], "shared");
    assert_eq!(shown["holders"][0]["pid"], holder.id());
    assert_eq!(
        locks.iter().find(|l| l["name"] == "idle").unwrap()["state"],
        "free"
    );

    let out = run(lockgate(dir.path()).arg("status"));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("shared") && l.ends_with("\"shown\"")),
        "{table}"
    );

    let out = run(lockgate(dir.path()).args(["gc", "--older-than", "0s", "--json"]));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["schema"], 1, "{report}");
    assert_eq!(report["backend"], "file");
    assert_eq!(report["older_than_secs"], 0);
    assert_eq!(
        (report["removed"].as_u64(), report["in_use"].as_u64()),
        (Some(1), Some(1))
    );
    let out = run(lockgate(dir.path()).args(["gc", "--older-than", "soon"]));
    assert_eq!(out.status.code(), Some(64));
    assert!(holder.finish().success());
}

/// `status --json` on a busy host: 1000 locks held by four processes while two others lock and
/// unlock without pause; every lock is listed, once, with its holder.
#[test]
fn status_lists_every_lock_on_a_busy_host() {
    let dir = tempfile::tempdir().unwrap();
    let churn_dir = tempfile::tempdir().unwrap();
    let (procs, per_proc) = (4, 250);
    let mut holders: Vec<Proc> = (0..procs)
        .map(|i| {
            child(
                "hold-many",
                dir.path(),
                &[
                    ("PREFIX", format!("p{i}-")),
                    ("COUNT", per_proc.to_string()),
                ],
            )
        })
        .collect();
    for h in &mut holders {
        h.expect("locked");
    }
    let mut churners: Vec<Proc> = (0..2)
        .map(|_| child("churn", churn_dir.path(), &[]))
        .collect();
    for c in &mut churners {
        c.expect("churning");
    }
    for round in 0..3 {
        let out = run(lockgate(dir.path()).args(["status", "--json"]));
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let locks = v["locks"].as_array().unwrap();
        assert_eq!(locks.len(), procs * per_proc);
        let wrong: Vec<String> = locks
            .iter()
            .filter_map(|l| {
                let name = l["name"].as_str().unwrap_or_default();
                let owner: usize = name[1..name.find('-')?].parse().ok()?;
                let want = serde_json::json!([["exclusive", holders[owner].id()]]);
                let got: Vec<serde_json::Value> = l["holders"]
                    .as_array()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| serde_json::json!([h["mode"], h["pid"]]))
                            .collect()
                    })
                    .unwrap_or_default();
                (serde_json::Value::from(got) != want || l["state"] != "exclusive")
                    .then(|| format!("{name}: {} {}", l["state"], l["holders"]))
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "round {round}: {} of {} locks listed wrongly, e.g. {:?}",
            wrong.len(),
            locks.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
    for h in &mut holders {
        assert!(h.finish().success());
    }
}

/// The default directory, whatever the environment says (`status` creates it, `-v` names it).
fn default_dir() -> PathBuf {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let base = if Path::new("/run/lock").is_dir() {
        "/run/lock"
    } else {
        "/tmp"
    };
    PathBuf::from(format!("{base}/lockgate-{uid}"))
}

#[test]
fn the_default_directory_is_private_to_the_user() {
    let out = run(bin().args(["exec", "d", "true"]));
    assert!(out.status.success(), "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(default_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

/// A default directory that another user owns (another user could have created it first in the
/// shared /run/lock or /tmp) is refused. Needs root, to run lockgate as a user whose directory
/// another uid made.
#[test]
fn a_default_directory_owned_by_another_user_is_refused() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to give a directory to another user");
        return;
    }
    let (uid, intruder) = (54_321, 54_322);
    let dir = default_dir().with_file_name(format!("lockgate-{uid}"));
    let _ = std::fs::remove_dir(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(intruder), Some(intruder)).unwrap();
    let out = run(common::bin_for_anyone()
        .uid(uid)
        .gid(uid)
        .current_dir("/")
        .args(["exec", "d", "--", "echo", "ran"]));
    std::fs::remove_dir(&dir).unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "the command ran");
    let err = stderr(&out);
    assert!(err.contains(&format!("belongs to uid {intruder}")), "{err}");
}

/// lockgate's own failures that are not about the lock exit 70: here, output that cannot be
/// written (a full device).
#[test]
fn output_that_cannot_be_written_exits_70() {
    let dir = tempfile::tempdir().unwrap();
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["gc", "--older-than", "1h"],
        &["gc", "--older-than", "1h", "--json"],
    ] {
        let out = run_stdout_as_set(lockgate(dir.path()).args(args).stdout(full()));
        assert_eq!(out.status.code(), Some(70), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("cannot write output"),
            "{}",
            stderr(&out)
        );
    }
}

/// `-v` (or `LOCKGATE_LOG`) shows diagnostics; without them lockgate is silent on success;
/// never colour codes when stderr is not a terminal.
#[test]
fn verbose_shows_diagnostics_without_colour_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = run(lockgate(dir.path()).args(["exec", "n", "--", "true"]));
    assert!(quiet.status.success());
    assert!(quiet.stderr.is_empty(), "{}", stderr(&quiet));
    for out in [
        run(lockgate(dir.path()).args(["-v", "exec", "n", "--", "true"])),
        run(lockgate(dir.path()).args(["exec", "--verbose", "n", "--", "true"])),
        run(lockgate(dir.path())
            .env("LOCKGATE_LOG", "debug")
            .args(["exec", "n", "--", "true"])),
    ] {
        assert!(out.status.success());
        let err = stderr(&out);
        assert!(err.contains("command started"), "{err}");
        assert!(
            !err.contains('\x1b'),
            "colour codes off a terminal: {err:?}"
        );
    }
}

/// A kubeconfig whose API server is a closed port of 127.0.0.1: the locker is unreachable.
fn unreachable_kubeconfig(dir: &Path) -> PathBuf {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again here
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n    namespace: default\n\
             current-context: x\n"
        ),
    )
    .unwrap();
    path
}

/// Kubernetes failures exit 69, and the command does not run: an unreachable API server (no
/// test environment needed), for `exec -n`, `exec -w` and `status`.
#[test]
fn an_unreachable_api_server_exits_69() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = unreachable_kubeconfig(dir.path());
    let url = "kubernetes://default/configmaps/locks";
    for args in [
        &["exec", "-n", "x", "--", "echo", "ran"][..],
        &["exec", "-w", "1", "x", "--", "echo", "ran"],
        &["status"],
    ] {
        let start = Instant::now();
        let out = run(bin()
            .env("KUBECONFIG", &kubeconfig)
            .arg("--locker")
            .arg(url)
            .args(args));
        assert_eq!(out.status.code(), Some(69), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?}: the command ran");
        assert!(start.elapsed() < Duration::from_secs(20), "{args:?}");
    }
}

/// A waiting exec (no `-w`) on an unreachable API server says so at once, retries for the
/// patience, then exits 69. Before, it waited on, silent.
#[test]
fn an_unreachable_api_server_is_said_at_once_and_retried_for_the_patience() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = unreachable_kubeconfig(dir.path());
    let start = Instant::now();
    let out = run(bin()
        .env("KUBECONFIG", &kubeconfig)
        .args(["--locker", "kubernetes://default/configmaps/locks"])
        .args(["exec", "--patience", "2s", "x", "--", "echo", "ran"]));
    let took = start.elapsed();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(out.stdout.is_empty(), "the command ran");
    assert!(err.contains("retrying for up to 2s"), "{err}");
    assert_eq!(
        err.matches("retrying for up to").count(),
        1,
        "once an outage: {err}"
    );
    assert!(err.contains("gave up after 2s"), "{err}");
    assert!(took >= Duration::from_secs(2), "gave up early: {took:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

fn exec_with_missing_kubeconfig() -> Output {
    run(bin()
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args([
            "--locker",
            "kubernetes://ns/configmaps/cm",
            "exec",
            "x",
            "--",
            "echo",
            "ran",
        ]))
}

/// A missing kubeconfig is a problem of the environment, not of the command line: exit 69 (not
/// 64), one line.
#[test]
fn a_missing_kubeconfig_exits_69() {
    let out = exec_with_missing_kubeconfig();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
    // What to do next.
    assert!(err.contains("set KUBECONFIG to a kubeconfig file"), "{err}");
}

/// Each cause once: kube's errors repeat their source in their own text, and the library's chain
/// (like the command's) skips a cause the message already says.
#[test]
fn a_missing_kubeconfig_is_reported_once() {
    let err = stderr(&exec_with_missing_kubeconfig());
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "each cause once: {err}"
    );
}

/// `--version`, shell completions and manual pages, generated from the command line itself.
#[test]
fn version_completions_and_manual_pages() {
    let out = run(bin().arg("--version"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("lockgate {}\n", env!("CARGO_PKG_VERSION"))
    );

    // bash loads the completion script, and it completes subcommands and options.
    let script = r#"source <("$LOCKGATE" completions bash) || exit 9
complete -p lockgate || exit 8
COMP_WORDS=(lockgate e); COMP_CWORD=1; _lockgate lockgate e lockgate; echo "subcommands: ${COMPREPLY[*]}"
COMP_WORDS=(lockgate exec --non); COMP_CWORD=2; _lockgate lockgate --non exec; echo "options: ${COMPREPLY[*]}""#;
    let out = run(Command::new("bash")
        .args(["-c", script])
        .env("LOCKGATE", lockgate_path()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(text.contains("subcommands: exec"), "{text}");
    assert!(text.contains("options: --nonblock"), "{text}");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run(bin().args(["completions", shell]));
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("nonblock") && text.contains("create-missing"),
            "{shell}"
        );
    }
    let out = run(bin().args(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(64));

    // Manual pages: lockgate(1) lists the subcommands; each subcommand has its page.
    let page = |args: &[&str]| {
        let out = run(bin().arg("man").args(args));
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let main = page(&[]);
    assert!(
        main.starts_with(".ie") || main.contains(".TH lockgate 1"),
        "{main}"
    );
    assert!(main.contains(".TH lockgate 1"), "{main}");
    for sub in ["exec", "status", "gc", "serve", "completions"] {
        assert!(
            main.contains(&format!("lockgate\\-{sub}(1)")),
            "{sub} in {main}"
        );
    }
    let exec = page(&["exec"]);
    assert!(
        exec.contains(&format!(
            ".TH lockgate-exec 1  \"lockgate-exec {}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{exec}"
    );
    assert!(exec.contains("\\-\\-nonblock") && exec.contains("\\-\\-conflict\\-exit\\-code"));
    // What --help has no room for: exit status, environment, signals, files, examples.
    for section in ["EXIT STATUS", "ENVIRONMENT", "SIGNALS", "FILES", "EXAMPLES"] {
        assert!(main.contains(&format!(".SH \"{section}\"")), "{section}");
    }
    for code in ["128+N", "64", "69", "70", "73", "75", "126", "127"] {
        assert!(
            main.contains(&format!("\\fB{code}\\fR")),
            "exit code {code}"
        );
    }
    for var in [
        "LOCKGATE_LOCKER",
        "LOCKGATE_DIR",
        "LOCKGATE_PATIENCE",
        "LOCKGATE_TOKEN",
        "LOCKGATE_CA_FILE",
        "KUBECONFIG",
        "LOCKGATE_FENCING_TOKEN",
    ] {
        assert!(main.contains(var), "{var}");
    }
    assert!(main.contains("/run/lock/lockgate\\-UID"));
    assert!(exec.contains(".SH \"SIGNALS\"") && exec.contains("\\-\\-keep\\-running"));
    let hold = page(&["hold"]);
    assert!(
        hold.contains(".SH \"EXIT STATUS\"") && hold.contains("etcdctl"),
        "{hold}"
    );
    let out = run(bin().args(["man", "frobnicate"]));
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("pages exist for: exec"),
        "{}",
        stderr(&out)
    );
    let dir = tempfile::tempdir().unwrap();
    let out = run(bin().arg("man").arg("--out-dir").arg(dir.path()));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    let written = std::fs::read_to_string(dir.path().join("lockgate-exec.1")).unwrap();
    assert!(written.contains(".SH \"EXIT STATUS\""), "{written}");
    assert_eq!(
        pages,
        [
            "lockgate-completions.1",
            "lockgate-exec.1",
            "lockgate-gc.1",
            "lockgate-hold.1",
            "lockgate-man.1",
            "lockgate-serve.1",
            "lockgate-status.1",
            "lockgate.1"
        ]
    );
}

/// Off a terminal, a long wait is told once: a CI log gets the first line only, whatever the
/// wait; with -q, nothing. On a terminal, it is told again now and then (how long, and by whom
/// the lock was held). The reminder on the terminal is what marks the time: by then, the
/// other two waiters have waited as long.
#[test]
fn a_long_wait_is_told_again_on_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = hold(dir.path(), &[], "slow", "read _ || true");
    let holder_pid = holder.id();
    let path = lock_path(dir.path(), "slow");

    let mut logged = Proc::spawn(lockgate(dir.path()).args(["exec", "slow", "--", "true"]));
    logged.expect_err("lockgate: waiting for exclusive lock \"slow\"");
    let mut quiet = Proc::spawn(lockgate(dir.path()).args(["exec", "-q", "slow", "--", "true"]));
    // The second exclusive waiter waits at the lock's turnstile, behind the first (PROTOCOL.md,
    // "Fairness").
    let turnstile = PathBuf::from(format!("{}.turnstile", path.display()));
    wait_until("both waiters wait", PATIENCE, || {
        support::flock_waiters(&path) + support::flock_waiters(&turnstile) == 2
    });

    let script = format!(
        "'{}' --dir '{}' exec slow -- echo ran",
        lockgate_path(),
        dir.path().display()
    );
    let mut s = Session::start("sh", &script);
    let first = s.expect("lockgate: waiting for exclusive lock \"slow\"");
    assert!(
        first.contains(&format!("held by pid {holder_pid}")),
        "{first}"
    );
    let again = s.expect("lockgate: still waiting");
    assert!(
        again.starts_with("lockgate: still waiting for exclusive lock \"slow\" after 5s"),
        "{again}"
    );
    assert!(
        again.contains(&format!("held by pid {holder_pid}")),
        "{again}"
    );

    assert!(holder.finish().success());
    s.expect("ran");
    assert!(s.proc.wait().success());
    assert!(logged.wait().success());
    assert!(quiet.wait().success());
    let logged_err = logged.stderr.take().unwrap().rest_within(PATIENCE);
    assert!(
        logged_err.is_empty(),
        "told again off a terminal: {logged_err:?}"
    );
    let quiet_err = quiet.stderr.take().unwrap().rest_within(PATIENCE);
    assert!(quiet_err.is_empty(), "-q printed: {quiet_err:?}");
}

/// With -q on a terminal, a wait prints nothing, first line and reminders alike.
#[test]
fn quiet_is_quiet_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = hold(dir.path(), &[], "hush", "read _ || true");
    let script = format!(
        "'{}' --dir '{}' exec -q hush -- echo ran; echo end",
        lockgate_path(),
        dir.path().display()
    );
    let path = lock_path(dir.path(), "hush");
    let mut s = Session::start("sh", &script);
    wait_until("the quiet waiter waits", PATIENCE, || {
        support::flock_waiters(&path) == 1
    });
    assert!(holder.finish().success());
    // Everything the terminal showed, up to the end: `ran` and `end`, nothing from lockgate.
    let first = s.output.next_within(PATIENCE).expect("output");
    assert_eq!(first.trim_end(), "ran");
    assert_eq!(s.expect("end"), "end");
    assert!(s.proc.wait().success());
}

// ---------------------------------------------------------------------------------------------
// Interactive use, on a pseudo-terminal

/// A new session on a pseudo-terminal running `script` with `shell -c`; the test holds the master
/// side: what the session prints, and what it reads.
struct Session {
    proc: Proc,
    output: support::Lines,
    input: std::fs::File,
}

impl Session {
    fn start(shell: &str, script: &str) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r on a descriptor we own, with a
        // buffer of the stated size.
        let (master, slave) = unsafe {
            let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(m >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
            assert_eq!(libc::grantpt(m), 0);
            assert_eq!(libc::unlockpt(m), 0);
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
            let s = libc::open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            );
            assert!(s >= 0, "open the pty slave");
            (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s))
        };
        let mut cmd = Command::new(shell);
        cmd.args(["-c", script])
            .env_remove("LOCKGATE_LOCKER")
            .env_remove("LOCKGATE_DIR")
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let proc = Proc::spawn_with(&mut cmd, false, false, false).group();
        // `cmd` holds the last copies of the slave side: drop them, so that the master reads
        // end of file (EIO) when the session ends.
        drop(cmd);
        let output = support::Lines::new(master.try_clone().unwrap(), "the terminal");
        Self {
            proc,
            output,
            input: master,
        }
    }

    /// The next line with `want` in it, from `want` on, without the terminal's carriage return
    /// (the terminal echoes what is typed, `^C` for instance, on the same line).
    fn expect(&mut self, want: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .output
                .next_within(left)
                .unwrap_or_else(|| panic!("the terminal ended before {want:?}"));
            if let Some(at) = line.find(want) {
                return line[at..].trim_end().to_owned();
            }
        }
    }

    fn type_in(&mut self, bytes: &[u8]) {
        self.input.write_all(bytes).unwrap();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Everything the session started, in whatever process group (lockgate, the command's
        // group, a job-control shell's jobs), also when a test failed half-way.
        support::kill_session(self.proc.id());
    }
}

/// `key=value` pairs of a line as numbers.
fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Prints `WHO pgrp=P tpgid=T` for the shell running it: its process group and the terminal's
/// foreground group.
fn ids(who: &str) -> String {
    // Separate words, so that a shell echoing the script (a job-control message) does not
    // print the marker.
    format!(
        r#"S=$(cat /proc/$$/stat); S=${{S##*) }}; set -- $S; echo "{who}" "pgrp=$3" "tpgid=$6""#
    )
}

fn lockgate_path() -> String {
    std::env::var("LOCKGATE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lockgate").into())
}

/// In the foreground of a terminal, lockgate hands the terminal to the command's group (which
/// can then read it) and takes it back when the command ends.
#[test]
fn on_a_terminal_the_command_gets_the_terminal_and_lockgate_takes_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let inner = format!("{}; read line; echo \"got $line\"", ids("inner"));
    let script = format!(
        "'{}' --dir '{}' exec n -- sh -c '{}'; rc=$?; {}; echo \"outer rc=$rc\"",
        lockgate_path(),
        dir.path().display(),
        inner.replace('\'', r"'\''"),
        ids("after"),
    );
    let mut s = Session::start("sh", &script);
    let inner = s.expect("inner pgrp=");
    assert_eq!(
        field(&inner, "pgrp"),
        field(&inner, "tpgid"),
        "the command's group has the terminal: {inner}"
    );
    s.type_in(b"hello\n");
    s.expect("got hello");
    let after = s.expect("after pgrp=");
    assert_eq!(
        field(&after, "pgrp"),
        field(&after, "tpgid"),
        "the terminal is back with the shell: {after}"
    );
    assert_ne!(field(&after, "pgrp"), field(&inner, "pgrp"));
    assert_eq!(field(&s.expect("outer rc="), "rc"), 0);
    assert!(s.proc.wait().success());
}

/// Ctrl-C on the terminal interrupts the command's whole group: its background job too (which a
/// non-interactive shell starts with SIGINT ignored). A job-control shell runs lockgate, so that
/// nothing else ends the session's processes.
#[test]
fn on_a_terminal_ctrl_c_interrupts_the_whole_command() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "set -m; '{}' --dir '{}' exec n -- sh -c 'sleep 1000 & echo \"grandchild pid=$!\"; wait'; echo \"outer rc=$?\"; read _",
        lockgate_path(),
        dir.path().display(),
    );
    let mut s = Session::start("bash", &script);
    let grandchild = field(&s.expect("grandchild pid="), "pid") as u32;
    let _guard = KillOnDrop(grandchild);
    // Once it runs `sleep`, the background job ignores SIGINT (before, it may not yet).
    wait_until("the background job started sleep", PATIENCE, || {
        is_running(grandchild, "sleep")
    });
    s.type_in(b"\x03");
    assert_eq!(field(&s.expect("outer rc="), "rc"), 130);
    wait_until("the background job ended", Duration::from_secs(10), || {
        !alive(grandchild)
    });
    s.type_in(b"\n");
    assert!(s.proc.wait().success());
}

/// Ctrl-C also reaches the script that runs lockgate, as it would without lockgate (the
/// terminal's signals go to the whole foreground job; lockgate gave the terminal to the
/// command's group, and passes the interrupt on to its own).
#[test]
fn on_a_terminal_ctrl_c_also_interrupts_the_calling_script() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "'{}' --dir '{}' exec n -- sh -c 'echo \"shell pid=$$\"; sleep 1000'; echo \"outer rc=$?\"",
        lockgate_path(),
        dir.path().display(),
    );
    let mut s = Session::start("sh", &script);
    let shell = field(&s.expect("shell pid="), "pid") as u32;
    // Type Ctrl-C once the shell waits for `sleep` (a shell between two commands may put a
    // SIGINT aside).
    wait_until("the command's shell started sleep", PATIENCE, || {
        support::children_of(shell).iter().any(|c| c.1 == "sleep")
    });
    s.type_in(b"\x03");
    let status = s.proc.wait();
    assert_eq!(
        status.signal(),
        Some(libc::SIGINT),
        "the calling script: {status:?}"
    );
}

/// Ctrl-Z stops the command and lockgate with it, so that a job-control shell gets its terminal
/// back; `fg` continues both, and the command has the terminal again.
#[test]
fn on_a_terminal_ctrl_z_stops_and_fg_continues() {
    let dir = tempfile::tempdir().unwrap();
    let inner = format!(
        "echo re\"\"ady; read line; {}; echo \"got $line\"",
        ids("inner")
    );
    let script = format!(
        "set -m; '{}' --dir '{}' exec n -- sh -c '{}'; echo \"stopped rc=$?\"; fg; echo \"resumed rc=$?\"",
        lockgate_path(),
        dir.path().display(),
        inner.replace('\'', r"'\''"),
    );
    let mut s = Session::start("bash", &script);
    s.expect("ready");
    s.type_in(b"\x1a");
    assert_eq!(
        field(&s.expect("stopped rc="), "rc"),
        128 + libc::SIGTSTP as i64
    );
    s.type_in(b"again\n");
    let inner = s.expect("inner pgrp=");
    assert_eq!(field(&inner, "pgrp"), field(&inner, "tpgid"), "{inner}");
    s.expect("got again");
    assert_eq!(field(&s.expect("resumed rc="), "rc"), 0);
    assert!(s.proc.wait().success());
}

/// Started in the background (`&`), lockgate leaves the terminal alone; the command stops when it
/// reads the terminal, and lockgate with it; `fg` gives the command the terminal and continues
/// it.
#[test]
fn on_a_terminal_a_background_exec_gets_the_terminal_on_fg() {
    let dir = tempfile::tempdir().unwrap();
    let inner = "echo re\"\"ady; read line; echo \"got $line\"";
    let script = format!(
        "set -m; '{}' --dir '{}' exec n -- sh -c '{}' & read go; fg; echo \"fg rc=$?\"",
        lockgate_path(),
        dir.path().display(),
        inner.replace('\'', r"'\''"),
    );
    let mut s = Session::start("bash", &script);
    s.expect("ready");
    let stopped = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
            st.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                .is_some_and(|state| state == "T")
        })
    };
    let mut lockgate = 0;
    wait_until("lockgate stopped with its command", PATIENCE, || {
        lockgate = support::children_of(s.proc.id())
            .into_iter()
            .find(|c| c.1 == "lockgate")
            .map_or(0, |c| c.0);
        lockgate != 0 && stopped(lockgate)
    });
    s.type_in(b"go\n");
    s.type_in(b"hello\n");
    s.expect("got hello");
    assert_eq!(field(&s.expect("fg rc="), "rc"), 0);
    assert!(s.proc.wait().success());
}
