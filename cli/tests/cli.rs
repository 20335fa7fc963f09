//! The `lockgate` command, run as a real process on real lock files.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn lockgate(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockgate"));
    c.arg("--dir")
        .arg(dir)
        .env_remove("LOCKGATE_LOCKER")
        .env_remove("LOCKGATE_DIR");
    c
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// Starts `lockgate exec` holding `name` around a shell script; returns once the script runs.
fn hold(dir: &Path, args: &[&str], name: &str, script: &str) -> Child {
    let mut child = lockgate(dir)
        .arg("exec")
        .args(args)
        .arg(name)
        .args(["--", "sh", "-c", &format!("echo running $$; {script}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    expect_line(&mut child, "running");
    child
}

fn expect_line(child: &mut Child, want: &str) -> String {
    let mut reader = BufReader::new(child.stdout.as_mut().unwrap());
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "ended before {want:?}"
        );
        if line.starts_with(want) {
            return line.trim_end().to_owned();
        }
    }
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

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"busy\""));

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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("waiting for exclusive lock \"busy\", held by pid"),
        "{stderr}"
    );
    assert!(stderr.contains("timed out"), "{stderr}");

    // Shared while exclusive is held: busy too. -q silences.
    let out =
        run(lockgate(dir.path()).args(["exec", "-s", "-w", "0.1", "-q", "busy", "--", "true"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
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
    drop(a.stdin.take());
    a.wait().unwrap();
}

#[test]
fn a_waiting_exec_runs_as_soon_as_the_holder_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = hold(dir.path(), &[], "q", "read _ || true");
    let mut waiter = lockgate(dir.path())
        .args(["exec", "q", "--", "echo", "second"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The waiting line appears on stderr before the holder lets go.
    let mut err = BufReader::new(waiter.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("lockgate: waiting for exclusive lock \"q\""),
        "{line}"
    );
    let released = Instant::now();
    drop(holder.stdin.take());
    holder.wait().unwrap();
    expect_line(&mut waiter, "second");
    let latency = released.elapsed();
    assert!(waiter.wait().unwrap().success());
    assert!(latency < Duration::from_secs(2), "{latency:?}");
}

#[test]
fn signals_reach_the_command() {
    let dir = tempfile::tempdir().unwrap();
    for (sig, code) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
    ] {
        let mut holder = hold(dir.path(), &[], "sig", "exec sleep 60");
        unsafe { libc::kill(holder.id() as i32, sig) };
        let status = holder.wait().unwrap();
        assert_eq!(status.code(), Some(code), "signal {sig}");
        assert!(
            !busy(dir.path(), "sig"),
            "lock freed after the command ended"
        );
    }
}

#[test]
fn a_killed_lockgate_leaves_the_lock_with_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    let mut holder = hold(
        dir.path(),
        &[],
        "inherit",
        &format!("read _ || true; touch {}", marker.display()),
    );
    // Child::wait closes the child's stdin: keep it open, the command waits on it.
    let stdin = holder.stdin.take();
    holder.kill().unwrap(); // SIGKILL to lockgate itself
    holder.wait().unwrap();
    // The command still runs (it waits for stdin, which we still hold) and still has the lock.
    assert!(
        busy(dir.path(), "inherit"),
        "the command runs without the lock"
    );
    drop(stdin);
    wait_until(Duration::from_secs(10), || marker.exists());
    wait_until(Duration::from_secs(10), || !busy(dir.path(), "inherit"));
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
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty());
    }
    let out = run(Command::new(env!("CARGO_BIN_EXE_lockgate")).arg("--help"));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn unrunnable_commands_exit_126_or_127() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(lockgate(dir.path()).args(["exec", "n", "--", "/nonexistent/command"]));
    assert_eq!(out.status.code(), Some(127));
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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("lockgate: lock directory") && stderr.contains("plain-file"),
        "{stderr}"
    );
}

#[test]
fn the_locker_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = hold(dir.path(), &[], "env", "read _ || true");
    let base = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_lockgate"));
        c.env_remove("LOCKGATE_LOCKER").env_remove("LOCKGATE_DIR");
        c
    };
    let out = run(base()
        .env("LOCKGATE_DIR", dir.path())
        .args(["exec", "-n", "env", "true"]));
    assert_eq!(out.status.code(), Some(1));
    let url = format!("file:{}", dir.path().display());
    let out = run(base()
        .env("LOCKGATE_LOCKER", &url)
        .args(["exec", "-n", "env", "true"]));
    assert_eq!(out.status.code(), Some(1));
    let out = run(base().args(["--locker", &url, "exec", "-n", "env", "true"]));
    assert_eq!(out.status.code(), Some(1));
    // --dir beats the environment.
    let other = tempfile::tempdir().unwrap();
    let out = run(base()
        .env("LOCKGATE_LOCKER", &url)
        .arg("--dir")
        .arg(other.path())
        .args(["exec", "-n", "env", "true"]));
    assert_eq!(out.status.code(), Some(0));
    drop(holder.stdin.take());
    holder.wait().unwrap();
}

#[test]
fn status_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = hold(dir.path(), &["-s"], "shown", "read _ || true");
    assert!(!busy(dir.path(), "idle"));

    let out = run(lockgate(dir.path()).args(["status", "--json"]));
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let locks = v.as_array().unwrap();
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
    assert_eq!(
        (report["removed"].as_u64(), report["in_use"].as_u64()),
        (Some(1), Some(1))
    );
    let out = run(lockgate(dir.path()).args(["gc", "--older-than", "soon"]));
    assert_eq!(out.status.code(), Some(64));
    drop(holder.stdin.take());
    holder.wait().unwrap();
}

#[test]
fn the_default_directory_is_private_to_the_user() {
    let runtime = tempfile::tempdir().unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_lockgate"))
        .env_remove("LOCKGATE_LOCKER")
        .env_remove("LOCKGATE_DIR")
        .env("XDG_RUNTIME_DIR", runtime.path())
        .args(["exec", "d", "true"]));
    assert!(out.status.success());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(runtime.path().join("lockgate"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}
