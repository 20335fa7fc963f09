//! The README's quick start, pasted as a newcomer pastes it: the shell blocks marked
//! `<!-- readme-test: NAME -->`, run with `sh -e` and this build's `lockgate` first on PATH:
//! lock files, a ConfigMap of the test environment's API server (the admin's kubeconfig, whose
//! context has no namespace: `default`), and a `lockgate serve` started by the block itself.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lockgate_testenv::{required_env, rust_cli, time_limit, Proc};

/// The shell block of README.md marked `<!-- readme-test: NAME -->`.
fn readme_block(name: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let marker = format!("<!-- readme-test: {name} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("no {marker} in README.md"))
        .1;
    after
        .split_once("```sh\n")
        .and_then(|(_, b)| b.split_once("\n```"))
        .unwrap_or_else(|| panic!("no sh block after {marker}"))
        .0
        .to_owned()
}

/// A port of 127.0.0.1 nothing listens on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `script` with `sh -e` in a new session (its process group, with what it started with
/// `&`, is killed afterwards), `7780` replaced by a free port; exit code, stdout, stderr.
fn paste(script: &str, dir: &Path) -> (Option<i32>, String, String) {
    let script = script.replace("7780", &free_port().to_string());
    let bin_dir = rust_cli().parent().unwrap().to_owned();
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
        .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
        .env_remove("LOCKGATE_LOCKER")
        .env_remove("LOCKGATE_DIR")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut p = Proc::spawn(&mut c);
    let group = p.id() as libc::pid_t;
    let status = p.wait_within(Duration::from_secs(120));
    // SAFETY: kill(2) on the process group of the session this test started.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    let read = |f: &Path| std::fs::read_to_string(f).unwrap_or_default();
    (status.code(), read(&out), read(&err))
}

/// Each quick start block runs as written and takes its lock ("deploying under the lock"),
/// and `status` shows where the locks are.
#[test]
fn the_quick_start_works_as_written() {
    time_limit(Duration::from_secs(300));
    for (block, place) in [
        ("file", "locks in /"),
        ("configmap", "locks in configmaps default/lockgate"),
        ("server", "locks on the lock server http://127.0.0.1:"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (code, out, err) = paste(&readme_block(block), dir.path());
        assert_eq!(code, Some(0), "{block}: {out}{err}");
        assert!(
            out.contains("deploying under the lock"),
            "{block}: {out}{err}"
        );
        assert!(out.contains(place), "{block}: {out}{err}");
    }
}
