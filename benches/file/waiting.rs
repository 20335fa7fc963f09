//! Benchmark 3: CPU time a process uses while it waits for a busy lock.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lockgate::{AcquireOptions, FileLocker, Locker};

use crate::{fmt, go_version, target_bin};

// The child is reaped by wait4(2) (for its resource usage), not by Child::wait.
#[allow(clippy::zombie_processes)]
fn cpu_of_waiting(mut cmd: Command, dir: &Path, wait: Duration) -> Duration {
    let locker = Locker::new(FileLocker::new(dir).unwrap());
    let g = locker
        .acquire_blocking("busy", AcquireOptions::exclusive())
        .unwrap();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(wait);
    drop(g);
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "waiter failed: {status}"
    );
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A signed duration, for differences that may come out negative on a noisy machine.
fn fmt_signed(ns: i128) -> String {
    let sign = if ns < 0 { "−" } else { "" };
    format!(
        "{sign}{}",
        fmt(Duration::from_nanos(ns.unsigned_abs() as u64))
    )
}

pub(crate) fn waiting_cpu(dir: &Path, go: Option<&Path>, secs: u64, runs: usize) {
    println!("## 3. CPU used by a process waiting {secs} s for a busy lock ({runs} runs each)");
    println!();
    println!(
        "User + system time of the whole waiting process (start-up, the wait, running `true`, \
         exit), measured with wait4(2). \"Of which waiting\": each run paired with a run that \
         waits 0.2 s, the difference of the two (signed, not clamped); median and range over the \
         runs."
    );
    println!();
    println!("| waiter | CPU time, {secs} s wait (median) | of which waiting (median) | range of the difference |");
    println!("|---|---|---|---|");
    let measure = |label: &str, make: &dyn Fn() -> Command| {
        let mut long = Vec::new();
        let mut diff = Vec::new();
        for _ in 0..runs {
            let short = cpu_of_waiting(make(), dir, Duration::from_millis(200));
            let l = cpu_of_waiting(make(), dir, Duration::from_secs(secs));
            long.push(l);
            diff.push(l.as_nanos() as i128 - short.as_nanos() as i128);
        }
        long.sort();
        diff.sort();
        println!(
            "| {label} | {} | {} | {} to {} |",
            fmt(long[long.len() / 2]),
            fmt_signed(diff[diff.len() / 2]),
            fmt_signed(diff[0]),
            fmt_signed(*diff.last().unwrap())
        );
    };
    match target_bin("lockgate") {
        Some(cli) => measure("`lockgate exec`", &|| {
            let mut cmd = Command::new(&cli);
            cmd.arg("--dir")
                .arg(dir)
                .args(["exec", "busy", "--", "true"]);
            cmd
        }),
        None => {
            println!("| `lockgate exec` | (not built: cargo build --release -p lockgate-cli) | | |")
        }
    }
    if let Some(go) = go {
        let label = format!("`lockgate-go exec` (Go lockgate {})", go_version(go));
        measure(&label, &|| {
            let mut cmd = Command::new(go);
            cmd.args([
                "exec",
                "--locker",
                &format!("file:{}", dir.display()),
                "busy",
                "--",
                "true",
            ]);
            cmd
        });
    }
    println!();
}
