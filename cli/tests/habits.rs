//! What users bring from flock(1), etcdctl and their shells, tried as they would: one default
//! lock directory in every context, locking a path with flock(1) alongside, `-c`, `hold`,
//! durations with units, and the small refusals and messages that save a minute each.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, busy, kill, lockgate, number_after, run, stderr, stdout};
use support::{alive, wait_until, KillOnDrop, Proc, PATIENCE};

/// A lock name no other test (or run) uses: tests share the default directory.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// lockgate as a context starts it: only the variables given (`env -i`-like, as cron and
/// systemd units do), plus PATH.
fn in_context(vars: &[(&str, &str)]) -> Command {
    let mut c = Command::new(common::lockgate_path());
    c.env_clear().env("PATH", "/usr/bin:/bin");
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

/// Where `-v` says the locks are.
fn where_locks_are(c: &mut Command) -> String {
    let out = run(c.args(["-v", "status"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stderr(&out)
        .lines()
        .find_map(|l| l.strip_prefix("lockgate: locks in ").map(str::to_owned))
        .unwrap_or_else(|| panic!("-v does not say where: {}", stderr(&out)));
    // `status` says it too, first.
    assert_eq!(
        stdout(&out).lines().next(),
        Some(format!("locks in {said}").as_str()),
        "{}",
        stdout(&out)
    );
    said
}

/// A user's cron job (no session variables), systemd unit, sudo command (another user's
/// XDG_RUNTIME_DIR kept) and SSH session (XDG_RUNTIME_DIR, TMPDIR) all use the same default
/// directory, so they exclude each other. Before, the session used $XDG_RUNTIME_DIR/lockgate and
/// cron $TMPDIR/lockgate-UID.
#[test]
fn cron_units_sudo_and_sessions_share_one_default_directory() {
    let runtime = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (runtime, tmp) = (
        runtime.path().to_str().unwrap(),
        tmp.path().to_str().unwrap(),
    );
    let session = [
        ("XDG_RUNTIME_DIR", runtime),
        ("TMPDIR", tmp),
        ("HOME", "/root"),
        ("SHELL", "/bin/bash"),
    ];
    let cron = [("HOME", "/"), ("SHELL", "/bin/sh"), ("LOGNAME", "root")];
    let unit = [("INVOCATION_ID", "x"), ("JOURNAL_STREAM", "8:1")];
    let sudo = [
        ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ("SUDO_USER", "someone"),
    ];
    let dir = where_locks_are(&mut in_context(&session));
    for (what, vars) in [("cron", &cron[..]), ("a unit", &unit), ("sudo", &sudo)] {
        assert_eq!(where_locks_are(&mut in_context(vars)), dir, "{what}");
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    assert!(dir.ends_with(&format!("/lockgate-{uid}")), "{dir}");
    // The session holds a lock; the cron job finds it busy.
    let name = unique("contexts");
    let mut held = Proc::spawn(in_context(&session).args([
        "exec",
        &name,
        "--",
        "sh",
        "-c",
        "echo held; read _ || true",
    ]));
    held.expect("held");
    let out = run(in_context(&cron).args(["exec", "-n", &name, "--", "true"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(held.finish().success());
    // Another user has a directory of their own (root only: run as nobody).
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::process::CommandExt;
        let mut nobody = Command::new(common::lockgate_path_for_anyone());
        nobody.env_clear().env("PATH", "/usr/bin:/bin");
        for (k, v) in cron {
            nobody.env(k, v);
        }
        nobody.uid(65534).gid(65534).current_dir("/");
        let theirs = where_locks_are(&mut nobody);
        assert!(theirs.ends_with("/lockgate-65534"), "{theirs}");
    }
}

/// `lockgate exec --file PATH` and `flock PATH` lock the same file: each excludes the other,
/// and the file is left as it was (flock(1) never writes it; nothing is hashed).
#[test]
fn a_path_locked_with_file_excludes_flock_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deploy.lock");
    let p = path.to_str().unwrap();
    let mut flock = Proc::spawn(Command::new("flock").args([p, "-c", "echo held; read _ || true"]));
    flock.expect("held");
    let out = run(bin().args(["exec", "-n", "--file", p, "--", "echo", "ran"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    assert!(flock.finish().success());

    let mut ours =
        Proc::spawn(bin().args(["exec", "--file", p, "sh", "-c", "echo held; read _ || true"]));
    ours.expect("held");
    let out = run(Command::new("flock").args(["-n", p, "true"]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "flock(1) got the lock lockgate holds"
    );
    // flock's -s against lockgate's -s: both shared.
    assert!(ours.finish().success());
    let mut shared = Proc::spawn(bin().args([
        "exec",
        "-s",
        "-f",
        p,
        "sh",
        "-c",
        "echo held; read _ || true",
    ]));
    shared.expect("held");
    let out = run(Command::new("flock").args(["-n", "-s", p, "true"]));
    assert_eq!(out.status.code(), Some(0));
    assert!(shared.finish().success());
    assert_eq!(std::fs::read(&path).unwrap(), b"", "the file was written");
    // Only the path is the lock: locker flags do not apply.
    let out = run(lockgate(dir.path()).args(["exec", "--file", p, "true"]));
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
}

/// `-c 'SHELL COMMAND'`, as flock(1): run with $SHELL -c.
#[test]
fn a_shell_command_with_c() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(lockgate(dir.path()).env("SHELL", "/bin/sh").args([
        "exec",
        "n",
        "-c",
        "echo \"$0 $LOCKGATE_LOCK_NAME\" && exit 3",
    ]));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "/bin/sh n\n");
    let out = run(lockgate(dir.path()).args(["exec", "n", "-c", "true", "extra"]));
    assert_eq!(out.status.code(), Some(64));
    let out = run(lockgate(dir.path()).args(["exec", "n"]));
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("no COMMAND"), "{}", stderr(&out));
}

/// `hold NAME`, like `etcdctl lock NAME`: takes the lock, says so on stdout, keeps it until
/// interrupted, releases it and exits 0.
#[test]
fn hold_keeps_a_lock_until_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let mut h = Proc::spawn(lockgate(dir.path()).args(["hold", "-s", "held"]));
        let line = h.expect("holding");
        assert!(
            line.starts_with("holding shared lock \"held\" as "),
            "{line}"
        );
        assert!(
            line.contains(&format!("/{}/", h.id())),
            "the holder id: {line}"
        );
        let out = run(lockgate(dir.path()).args(["exec", "-n", "-x", "held", "true"]));
        assert_eq!(out.status.code(), Some(1));
        let out = run(lockgate(dir.path()).arg("status"));
        assert!(stdout(&out).contains("(lockgate hold)"), "{}", stdout(&out));
        h.signal(sig);
        assert_eq!(h.wait().code(), Some(0), "signal {sig}");
        assert!(!busy(dir.path(), "held"));
    }
    // Busy: -n exits 1 without printing `holding`.
    let mut first = Proc::spawn(lockgate(dir.path()).args(["hold", "busy"]));
    first.expect("holding");
    let out = run(lockgate(dir.path()).args(["hold", "-n", "busy"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait().code(), Some(0));
}

/// Durations take units everywhere; a plain number stays seconds.
#[test]
fn durations_take_units() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(lockgate(dir.path()).args(["exec", "-w", "10m", "n", "true"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut holder = Proc::spawn(lockgate(dir.path()).args(["hold", "n"]));
    holder.expect("holding");
    let start = Instant::now();
    let out = run(lockgate(dir.path()).args(["exec", "-w", "300ms", "n", "true"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(start.elapsed() >= Duration::from_millis(300));
    holder.signal(libc::SIGTERM);
    holder.wait();
    let out = run(lockgate(dir.path()).args(["gc", "--older-than", "3600"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("newer than 1h"), "{}", stdout(&out));
    let out = run(lockgate(dir.path()).args(["exec", "-w", "soon", "n", "true"]));
    assert_eq!(out.status.code(), Some(64));
}

/// `status` and `gc` of a directory that does not exist say so (exit 69) and create nothing.
#[test]
fn status_and_gc_refuse_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("lokcs");
    for args in [&["status"][..], &["gc", "--older-than", "1d"]] {
        let out = run(lockgate(&typo).args(args));
        assert_eq!(out.status.code(), Some(69), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
        assert!(!typo.exists(), "{args:?} created the directory");
    }
}

/// A flag for another kind of locker is refused (64) with what it applies to, not ignored.
#[test]
fn flags_for_another_locker_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for (args, flag) in [
        (
            vec!["--dir", d, "--create-missing", "status"],
            "--create-missing",
        ),
        (
            vec!["--dir", d, "--ca-file", "x.pem", "status"],
            "--ca-file",
        ),
        (
            vec!["--dir", d, "--namespace", "ci", "status"],
            "--namespace",
        ),
        (
            vec!["--locker", "http://127.0.0.1:1", "--legacy-names", "status"],
            "--legacy-names",
        ),
        (
            vec![
                "--locker",
                "http://127.0.0.1:1",
                "--kubeconfig",
                "k",
                "status",
            ],
            "--kubeconfig",
        ),
        (
            vec![
                "--locker",
                "kubernetes://ns/cm/x",
                "--token-file",
                "t",
                "status",
            ],
            "--token-file",
        ),
        (vec!["--kubeconfig", "k", "serve"], "--kubeconfig"),
        (
            vec!["--dir", d, "exec", "--file", "x.lock", "true"],
            "--dir",
        ),
    ] {
        let out = run(bin().args(&args));
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("{flag} does not apply")),
            "{}",
            stderr(&out)
        );
    }
    // Contradictions between a flag and the URL.
    let out = run(bin().args([
        "--locker",
        "kubernetes://a/cm/x",
        "--namespace",
        "b",
        "status",
    ]));
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("contradicts"), "{}", stderr(&out));
}

/// `status` shows a lockgate holder by the command it runs, and a holder that has exited as
/// exited, with the process that kept the lock (a command of `exec --keep-running`).
#[test]
fn status_shows_the_users_command_and_exited_holders() {
    let dir = tempfile::tempdir().unwrap();
    let long = "a-rather-long-argument-".repeat(4);
    let mut p = Proc::spawn(lockgate(dir.path()).args([
        "--verbose",
        "exec",
        "--keep-running",
        "n",
        "--",
        "sh",
        "-c",
        "echo ready $$; exec sleep 1000",
        &long,
    ]));
    let command = number_after(&p.expect("ready"), "ready");
    let _command = KillOnDrop(command);
    let out = run(lockgate(dir.path()).args(["status", "--json"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let description = v["locks"][0]["holders"][0]["description"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(description.starts_with("sh -c echo ready"), "{description}");
    assert!(!description.contains("lockgate"), "{description}");
    // The waiting line names the holder the same way.
    let mut waiter = Proc::spawn(lockgate(dir.path()).args(["exec", "n", "true"]));
    let waiting = waiter.expect_err("lockgate: waiting for exclusive lock \"n\" held by pid");
    assert!(waiting.contains("(sh -c echo ready"), "{waiting}");
    waiter.kill();
    p.kill();
    let lockgate_pid = p.id();
    let out = run(lockgate(dir.path()).arg("status"));
    let table = stdout(&out);
    let line = table
        .lines()
        .find(|l| l.contains("held by"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains(&format!("pid {lockgate_pid}")), "{line}");
    assert!(
        line.contains(&format!("exited; kept by pid {command} (sleep)")),
        "{line}"
    );
    kill(i64::from(command), libc::SIGKILL);
    wait_until("the lock was freed", PATIENCE, || !alive(command));
}

/// A 100 KB lock name is not echoed whole: the message is one short line.
#[test]
fn a_huge_name_is_cut_in_messages() {
    let dir = tempfile::tempdir().unwrap();
    let name = "n".repeat(100_000);
    let out = run(lockgate(dir.path()).args(["exec", &name, "true"]));
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.len() < 400, "{} bytes: {err}", err.len());
    assert!(err.contains("100000 bytes"), "{err}");
}

/// A kubeconfig that does not parse, and a context it does not have: one line each, naming the
/// file or the contexts there are (no cluster needed: nothing is sent).
#[test]
fn kubeconfig_problems_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    std::fs::write(
        &broken,
        "apiVersion: v1\nclusters:\n- name: [unclosed\n  cluster: {\n",
    )
    .unwrap();
    let good = dir.path().join("good");
    std::fs::write(
        &good,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n\
         users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: staging\n  context:\n    cluster: c\n    user: u\n\
         - name: prod\n  context:\n    cluster: c\n    user: u\ncurrent-context: staging\n",
    )
    .unwrap();
    let url = "kubernetes://cm/locks";
    let out = run(bin()
        .arg("--kubeconfig")
        .arg(&broken)
        .args(["--locker", url, "exec", "-n", "x", "true"]));
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(broken.to_str().unwrap()), "{err}");
    for args in [
        &["--locker", url, "--context", "nope"][..],
        &["--locker", "kubernetes://nope@cm/locks"],
    ] {
        let out = run(bin()
            .env("KUBECONFIG", &good)
            .args(args)
            .args(["exec", "-n", "x", "true"]));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(69), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("no context \"nope\" (it has: staging, prod)"),
            "{err}"
        );
    }
}
