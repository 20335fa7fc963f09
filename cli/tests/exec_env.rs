//! What `lockgate exec` tells its command about the lock: `LOCKGATE_LOCK_NAME`,
//! `LOCKGATE_HOLDER_ID`, and `LOCKGATE_FENCING_TOKEN` for leased lockers (file locks have no
//! token; the Kubernetes token is tested in `testenv/suite/tests/exec_fencing.rs`).

use std::process::Command;

fn exec_env(dir: &std::path::Path, name: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lockgate"))
        .env_remove("LOCKGATE_LOCKER")
        .env_remove("LOCKGATE_FENCING_TOKEN")
        .arg("--dir")
        .arg(dir)
        .args(["exec", name, "--", "env"])
        .output()
        .expect("run lockgate exec");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

fn var<'a>(env: &'a str, key: &str) -> Option<&'a str> {
    env.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

#[test]
fn the_command_is_told_its_lock_and_hold() {
    let dir = tempfile::tempdir().unwrap();
    let first = exec_env(dir.path(), "deploy & co");
    assert_eq!(var(&first, "LOCKGATE_LOCK_NAME"), Some("deploy & co"));
    let holder = var(&first, "LOCKGATE_HOLDER_ID").expect("a holder id");
    let parts: Vec<&str> = holder.split('/').collect();
    assert_eq!(parts.len(), 3, "HOST/PID/NANOS: {holder}");
    assert!(
        parts[1].parse::<u32>().is_ok() && parts[2].parse::<u128>().is_ok(),
        "{holder}"
    );
    // File locks have no fencing token: the variable is absent, not empty.
    assert_eq!(var(&first, "LOCKGATE_FENCING_TOKEN"), None);
    // Every hold has its own id.
    let second = exec_env(dir.path(), "deploy & co");
    assert_ne!(var(&second, "LOCKGATE_HOLDER_ID"), Some(holder));
}
