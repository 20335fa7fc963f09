//! Helpers of the command's tests that run `lockgate` as a user does (`signals.rs`,
//! `habits.rs`, `lock_server.rs`): the binary under test, running it to completion, and what
//! /proc says about a process.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::support::{Proc, PATIENCE};

/// The `lockgate` under test: this build's, or `$LOCKGATE_TEST_BIN`.
pub fn lockgate_path() -> String {
    std::env::var("LOCKGATE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lockgate").into())
}

/// A copy of the `lockgate` under test that every user may run (for tests that run it as
/// another user: the build itself may be in a home directory only its owner can enter).
pub fn lockgate_path_for_anyone() -> String {
    use std::os::unix::fs::PermissionsExt;
    static COPY: std::sync::OnceLock<(tempfile::TempDir, String)> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a directory for a copy of lockgate");
        let open = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(dir.path(), open.clone()).unwrap();
        let exe = dir.path().join("lockgate");
        std::fs::copy(lockgate_path(), &exe).expect("copy lockgate");
        std::fs::set_permissions(&exe, open).unwrap();
        wait_until_executable(&exe);
        let path = exe.to_str().unwrap().to_owned();
        (dir, path)
    })
    .1
    .clone()
}

/// Waits until `exe` can be run. A child forked by another test thread while the copy was open
/// for writing holds that descriptor until it calls exec, and until then running the copy fails
/// with "Text file busy" (ETXTBSY). Once one run starts, no writer is left: the copy is closed,
/// and children forked later do not inherit it.
fn wait_until_executable(exe: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Command::new(exe).arg("--version").output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{exe:?} stays busy: {e}"
                );
                std::thread::yield_now();
            }
            Err(e) => panic!("cannot run the copy {exe:?}: {e}"),
            Ok(_) => return,
        }
    }
}

/// [`bin`] on [`lockgate_path_for_anyone`]'s copy.
pub fn bin_for_anyone() -> Command {
    without_locker_env(Command::new(lockgate_path_for_anyone()))
}

/// `lockgate` with none of the environment that chooses a locker.
pub fn bin() -> Command {
    without_locker_env(Command::new(lockgate_path()))
}

fn without_locker_env(mut c: Command) -> Command {
    for k in [
        "LOCKGATE_LOCKER",
        "LOCKGATE_DIR",
        "LOCKGATE_LOG",
        "LOCKGATE_PATIENCE",
        "LOCKGATE_TOKEN",
        "LOCKGATE_CA_FILE",
    ] {
        c.env_remove(k);
    }
    c
}

/// `lockgate --dir DIR`.
pub fn lockgate(dir: &Path) -> Command {
    let mut c = bin();
    c.arg("--dir").arg(dir);
    c
}

/// Runs `cmd` to completion (stdin empty), within [`PATIENCE`].
pub fn run(cmd: &mut Command) -> Output {
    let mut p = Proc::spawn_with(cmd.stdin(Stdio::null()), false, true, true);
    let stdout = p.stdout.take().unwrap().rest_within(PATIENCE);
    let stderr = p.stderr.take().unwrap().rest_within(PATIENCE);
    let status = p.wait();
    let join = |lines: Vec<String>| lines.into_iter().map(|l| l + "\n").collect::<String>();
    Output {
        status,
        stdout: join(stdout).into_bytes(),
        stderr: join(stderr).into_bytes(),
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number after `word ` in `line` (`ready 4242` → 4242).
pub fn number_after(line: &str, word: &str) -> u32 {
    line.split_whitespace()
        .skip_while(|w| *w != word)
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no number after {word:?} in {line:?}"))
}

/// A field of `/proc/PID/status` (`SigIgn`, `PPid`, ...).
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// True when process `pid` ignores `sig` (`SigIgn` of /proc/PID/status).
pub fn ignores(pid: u32, sig: libc::c_int) -> bool {
    let mask = u64::from_str_radix(&status_field(pid, "SigIgn"), 16).expect("a hex mask");
    mask & (1 << (sig - 1)) != 0
}

/// The parent of process `pid`.
pub fn parent_of(pid: u32) -> u32 {
    status_field(pid, "PPid").parse().expect("a pid")
}

/// The process group of process `pid`.
pub fn group_of(pid: u32) -> u32 {
    // SAFETY: getpgid of a pid.
    let g = unsafe { libc::getpgid(pid as libc::pid_t) };
    assert!(g > 0, "getpgid({pid}): {}", std::io::Error::last_os_error());
    g as u32
}

/// Sends `sig` to process `pid` (a negative number: a process group).
pub fn kill(pid: i64, sig: libc::c_int) {
    // SAFETY: kill(2) on a process or group the test started.
    let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// True while a non-blocking exclusive `lockgate exec` of `name` in `dir` finds it busy.
pub fn busy(dir: &Path, name: &str) -> bool {
    let out = run(lockgate(dir).args(["exec", "-n", "-q", name, "--", "true"]));
    match out.status.code() {
        Some(1) => true,
        Some(0) => false,
        other => panic!("unexpected status {other:?}: {}", stderr(&out)),
    }
}

/// A shell word for `s` in single quotes.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shell block of README.md marked `<!-- readme-test: NAME -->`.
pub fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let marker = format!("<!-- readme-test: {name} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("no {marker} in README.md"))
        .1;
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, b)| b.split_once("\n```"))
        .unwrap_or_else(|| panic!("no sh block after {marker}"))
        .0;
    block.to_owned()
}

/// Runs `script` as a user pastes it into a shell (`sh -e`, in `dir`, with this build's
/// `lockgate` first on PATH and `7780` replaced by `port`), in a session of its own whose
/// processes (a server started with `&`) are killed when it ends; its exit code, stdout and
/// stderr.
pub fn paste(script: &str, dir: &Path, port: u16) -> (Option<i32>, String, String) {
    let script = script.replace("7780", &port.to_string());
    let bin_dir = Path::new(&lockgate_path()).parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (out, err) = (dir.join(".stdout"), dir.join(".stderr"));
    let mut c = Command::new("setsid");
    c.args(["sh", "-e", "-c", &script])
        .current_dir(dir)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    for k in [
        "LOCKGATE_LOCKER",
        "LOCKGATE_DIR",
        "LOCKGATE_TOKEN",
        "LOCKGATE_CA_FILE",
    ] {
        c.env_remove(k);
    }
    let mut p = Proc::spawn_with(&mut c, false, false, false);
    let sid = p.id();
    let status = p.wait();
    crate::support::kill_session(sid);
    let read = |f: &Path| std::fs::read_to_string(f).unwrap_or_default();
    (status.code(), read(&out), read(&err))
}
