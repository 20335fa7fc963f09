//! Benchmark 4: how long an exclusive request waits behind N processes that loop shared holds
//! (issue 23's case: shared locks for builds, an exclusive one for the clean-up), for lockgate,
//! flock(1) and Go lockgate, each through its command: readers are shells looping
//! `<command> -s NAME -- sleep HOLD`, the writer is one `<command> -w CAP NAME -- true`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockgate::file::Naming;

use crate::{fmt, go_version, target_bin};

/// The writer's command, given the lock name, the lock file and the cap in seconds.
type Writer = Box<dyn Fn(&str, &Path, u64) -> Command>;

/// One implementation: how its readers loop and how its writer asks.
struct Contender {
    label: String,
    /// The shell loop of one reader (`$0`: the command, `$1`: the directory, `$2`: the lock
    /// name, `$3`: the lock file, `$4`: the hold in seconds).
    reader: &'static str,
    writer: Writer,
    program: PathBuf,
    /// The writer's exit status when it crashes by a known defect of its own, counted apart
    /// rather than failing the run.
    crash: Option<i32>,
}

/// The looping readers of one row, each shell in a process group of its own; killed with
/// their groups when dropped (a `sleep` that `lockgate exec` runs in a group of its own ends by
/// itself within one hold).
struct Readers(Vec<Child>);

impl Drop for Readers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: kill(2) on the process group this benchmark started.
            unsafe { libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

/// How many hold the file at `path` (its `FLOCK` lines that are not waiting), read whole until
/// two readings agree.
fn holders(path: &Path) -> usize {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let read = || {
        let mut text = String::new();
        std::fs::File::open("/proc/locks")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text.lines()
            .filter(|l| {
                l.contains(" FLOCK ") && !l.contains("->") && l.split_whitespace().any(|f| f == id)
            })
            .count()
    };
    let mut last = read();
    loop {
        let again = read();
        if again == last {
            return last;
        }
        last = again;
    }
}

/// Waits until `n` readers hold the lock at once (or at least two, for many readers: with
/// process start-up between holds, not all of them always overlap).
fn until_held(path: &Path, n: usize) {
    let want = n.min(2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while holders(path) < want {
        assert!(
            Instant::now() < deadline,
            "the looping readers never held {} at once",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How a writer ended.
enum Ended {
    Got,
    TimedOut,
    /// By its known crash (see `Contender::crash`).
    Crashed,
}

/// The writer's time from start to exit, and how it ended: got the lock (exit 0), timed out
/// (exit 1), or its known crash.
fn run_writer(mut cmd: Command, crash: Option<i32>) -> (Duration, Ended) {
    let started = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let took = started.elapsed();
    match status.code() {
        Some(0) => (took, Ended::Got),
        Some(1) => (took, Ended::TimedOut),
        Some(code) if crash == Some(code) => (took, Ended::Crashed),
        _ => panic!("the writer failed: {status}"),
    }
}

pub(crate) fn fairness(
    dir: &Path,
    go: Option<&Path>,
    counts: &[usize],
    samples: usize,
    hold: Duration,
    cap: u64,
) {
    println!("## 4. An exclusive request behind N looping shared holders");
    println!();
    println!(
        "N shells loop `<command> -s NAME -- sleep {}` (a shared hold of {}, then the next \
         process); once they hold the lock, one `<command> -w {cap} NAME -- true` asks for it \
         exclusively, {samples} times per row, the readers still looping. The writer's time from \
         start to exit (process start-up included: \"alone\" is its time with no readers); a \
         writer still waiting at {cap} s gives up (\"timed out\").",
        hold.as_secs_f64(),
        fmt(hold)
    );
    println!();
    println!("| writer, readers | N | alone | median | max | timed out |");
    println!("|---|---|---|---|---|---|");
    let mut contenders = Vec::new();
    match target_bin("lockgate") {
        Some(cli) => contenders.push(Contender {
            label: "`lockgate exec`".into(),
            reader: r#"while :; do "$0" --dir "$1" exec -s "$2" -- sleep "$4"; done"#,
            writer: {
                let (cli, dir) = (cli.clone(), dir.to_owned());
                Box::new(move |name, _, cap| {
                    let mut c = Command::new(&cli);
                    c.arg("--dir").arg(&dir).args([
                        "exec",
                        "-w",
                        &cap.to_string(),
                        name,
                        "--",
                        "true",
                    ]);
                    c
                })
            },
            program: cli,
            crash: None,
        }),
        None => println!(
            "| `lockgate exec` | (not built: cargo build --release -p lockgate-cli) | | | | |"
        ),
    }
    contenders.push(Contender {
        label: "flock(1)".into(),
        reader: r#"while :; do "$0" -s "$3" sleep "$4"; done"#,
        writer: Box::new(|_, file, cap| {
            let mut c = Command::new("flock");
            c.args(["-w", &cap.to_string()]).arg(file).arg("true");
            c
        }),
        program: "flock".into(),
        crash: None,
    });
    if let Some(go) = go {
        let locker = format!("file:{}", dir.display());
        contenders.push(Contender {
            label: format!("`lockgate-go exec` (Go lockgate {})", go_version(go)),
            reader: r#"while :; do "$0" exec --locker "file:$1" -s "$2" -- sleep "$4"; done"#,
            writer: {
                let go = go.to_owned();
                Box::new(move |name, _, cap| {
                    let mut c = Command::new(&go);
                    c.args(["exec", "--locker", &locker, "-w", &cap.to_string(), name])
                        .args(["--", "true"]);
                    c
                })
            },
            program: go.to_owned(),
            // Go lockgate's timed file-lock wait deadlocks when its poll gets the lock just as
            // its timer fires (both send on unbuffered channels to a partner that no longer
            // listens): with no other goroutine alive, Go's runtime ends the process with
            // "all goroutines are asleep - deadlock!" and exit status 2.
            crash: Some(2),
        });
    }
    for &n in counts {
        for (k, c) in contenders.iter().enumerate() {
            // A lock of its own per row: stragglers of the previous row cannot interfere.
            let name = format!("fair-{n}-{k}");
            let file = dir.join(Naming::Sha256.file_name(&name));
            let alone = run_writer((c.writer)(&name, &file, cap), None).0;
            let readers = Readers(
                (0..n)
                    .map(|_| {
                        Command::new("sh")
                            .args(["-c", c.reader])
                            .arg(&c.program)
                            .arg(dir)
                            .arg(&name)
                            .arg(&file)
                            .arg(hold.as_secs_f64().to_string())
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .process_group(0)
                            .spawn()
                            .unwrap()
                    })
                    .collect(),
            );
            let mut waits = Vec::new();
            let (mut timed_out, mut crashed) = (0, 0);
            for _ in 0..samples {
                until_held(&file, n);
                let (took, ended) = run_writer((c.writer)(&name, &file, cap), c.crash);
                waits.push(took);
                match ended {
                    Ended::Got => {}
                    Ended::TimedOut => timed_out += 1,
                    Ended::Crashed => crashed += 1,
                }
            }
            drop(readers);
            waits.sort();
            let show = |d: Duration| {
                if d >= Duration::from_secs(cap) {
                    format!("≥ {cap} s")
                } else {
                    fmt(d)
                }
            };
            let crashed = if crashed > 0 {
                format!(", and {crashed} crashed at the deadline (Go's deadlock, exit 2)")
            } else {
                String::new()
            };
            println!(
                "| {} | {n} | {} | {} | {} | {timed_out} of {samples}{crashed} |",
                c.label,
                fmt(alone),
                show(waits[waits.len() / 2]),
                show(*waits.last().unwrap()),
            );
        }
    }
    println!();
}
