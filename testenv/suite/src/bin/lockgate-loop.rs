//! `lockgate-loop`: the Rust side of the mixed-fleet tests, the twin of `lockgate-go loop`.
//!
//! ```text
//! lockgate-loop --locker LOCKER [-s] [-w SECS] --cycles N --counter FILE [--hold-ms MS] NAME
//! ```
//!
//! LOCKER is `file:DIR`, `kubernetes://NAMESPACE/RESOURCE/NAME` (with `KUBECONFIG`) or
//! `http://HOST:PORT` (a lock server). Each
//! cycle acquires the lock (blocking, or with the timeout), then, exclusive: creates
//! `FILE.holder` with `O_EXCL` (if it exists, two holders overlap), reads the integer in FILE,
//! holds for MS, writes it + 1, removes `FILE.holder`; shared: checks that `FILE.holder` does not
//! exist and holds for MS. Then it releases. It prints one JSON line
//! `{"impl":"rust","cycles":N,"increments":K,"overlaps":O,"errors":[...]}` and exits 0 only if
//! there was no error and no overlap.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockgate::kubernetes::{KubernetesLocker, LeaseConfig};
use lockgate::{AcquireOptions, FileLocker, HttpConfig, HttpLocker, Locker, Mode};

struct Args {
    locker: String,
    mode: Mode,
    timeout: Option<Duration>,
    cycles: u64,
    counter: PathBuf,
    hold: Duration,
    name: String,
}

fn usage(why: &str) -> ! {
    eprintln!("lockgate-loop: {why}\nusage: lockgate-loop --locker LOCKER [-s] [-w SECS] --cycles N --counter FILE [--hold-ms MS] NAME");
    std::process::exit(64)
}

fn args() -> Args {
    let mut it = std::env::args().skip(1);
    let (mut locker, mut mode, mut timeout, mut cycles, mut counter, mut hold, mut name) = (
        None,
        Mode::Exclusive,
        None,
        None,
        None,
        Duration::ZERO,
        None,
    );
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--locker" => locker = Some(value()),
            "-s" => mode = Mode::Shared,
            "-w" => {
                let secs: f64 = value().parse().unwrap_or_else(|_| usage("bad -w"));
                timeout = Some(Duration::from_secs_f64(secs));
            }
            "--cycles" => cycles = Some(value().parse().unwrap_or_else(|_| usage("bad --cycles"))),
            "--counter" => counter = Some(PathBuf::from(value())),
            "--hold-ms" => {
                hold = Duration::from_millis(
                    value().parse().unwrap_or_else(|_| usage("bad --hold-ms")),
                )
            }
            _ if name.is_none() && !a.starts_with('-') => name = Some(a),
            _ => usage(&format!("unknown argument {a:?}")),
        }
    }
    Args {
        locker: locker.unwrap_or_else(|| usage("--locker is required")),
        mode,
        timeout,
        cycles: cycles.unwrap_or_else(|| usage("--cycles is required")),
        counter: counter.unwrap_or_else(|| usage("--counter is required")),
        hold,
        name: name.unwrap_or_else(|| usage("NAME is required")),
    }
}

fn locker(url: &str) -> Locker {
    if let Some(dir) = url.strip_prefix("file:") {
        return Locker::new(FileLocker::new(dir.trim_start_matches("//")).expect("file locker"));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Locker::new(
            HttpLocker::connect_blocking(url, HttpConfig::default()).unwrap_or_else(|e| {
                eprintln!("lockgate-loop: {e}");
                std::process::exit(64)
            }),
        );
    }
    let rest = url.strip_prefix("kubernetes://").unwrap_or_else(|| {
        usage("LOCKER is file:DIR, kubernetes://NAMESPACE/RESOURCE/NAME or http://HOST:PORT")
    });
    let parts: Vec<&str> = rest.split('/').collect();
    let [ns, resource, name] = parts.as_slice() else {
        usage("kubernetes://NAMESPACE/RESOURCE/NAME");
    };
    let ns = (!ns.is_empty()).then(|| ns.to_string());
    Locker::new(
        KubernetesLocker::connect_blocking(None, resource, ns, name, LeaseConfig::default())
            .unwrap_or_else(|e| {
                eprintln!("lockgate-loop: {e}");
                std::process::exit(69)
            }),
    )
}

fn read_counter(path: &PathBuf) -> Result<u64, String> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("read counter: {e}")),
        Ok(s) if s.trim().is_empty() => Ok(0),
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|e| format!("counter holds {s:?}: {e}")),
    }
}

fn main() {
    let args = args();
    let locker = locker(&args.locker);
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let (mut increments, mut overlaps) = (0u64, 0u64);
    let mut overlaps_with = Vec::<String>::new();
    let holder = PathBuf::from(format!("{}.holder", args.counter.display()));
    let record = |e: String| errors.lock().unwrap().push(e);
    for i in 0..args.cycles {
        let errs = errors.clone();
        let mut opts = AcquireOptions::default()
            .mode(args.mode)
            .on_lost(move |name, reason| {
                errs.lock()
                    .unwrap()
                    .push(format!("lost the lease of lock {name:?}: {reason}"))
            });
        if let Some(t) = args.timeout {
            opts = opts.timeout(t);
        }
        let guard = match locker.acquire_blocking(&args.name, opts) {
            Ok(g) => g,
            Err(e) => {
                record(format!("cycle {i}: acquire: {e}"));
                continue;
            }
        };
        if args.mode == Mode::Shared {
            if holder.symlink_metadata().is_ok() {
                overlaps += 1;
                overlaps_with.push(std::fs::read_to_string(&holder).unwrap_or_default());
            }
            std::thread::sleep(args.hold);
        } else {
            let mine = match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&holder)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    // Who holds it, for the report of whoever overlaps.
                    let _ = write!(f, "rust pid {} cycle {i}", std::process::id());
                    true
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    overlaps += 1;
                    overlaps_with.push(std::fs::read_to_string(&holder).unwrap_or_default());
                    false
                }
                Err(e) => {
                    record(format!("cycle {i}: create {}: {e}", holder.display()));
                    false
                }
            };
            match read_counter(&args.counter) {
                Ok(n) => {
                    std::thread::sleep(args.hold);
                    match std::fs::write(&args.counter, format!("{}\n", n + 1)) {
                        Ok(()) => increments += 1,
                        Err(e) => record(format!("cycle {i}: write counter: {e}")),
                    }
                }
                Err(e) => record(format!("cycle {i}: {e}")),
            }
            if mine {
                if let Err(e) = std::fs::remove_file(&holder) {
                    record(format!("cycle {i}: remove {}: {e}", holder.display()));
                }
            }
        }
        if let Err(e) = guard.release_blocking() {
            record(format!("cycle {i}: release: {e}"));
        }
    }
    let errors = errors.lock().unwrap().clone();
    let ok = errors.is_empty() && overlaps == 0;
    println!(
        "{}",
        serde_json::json!({"impl": "rust", "cycles": args.cycles, "increments": increments, "overlaps": overlaps, "overlapsWith": overlaps_with, "errors": errors})
    );
    std::process::exit(if ok { 0 } else { 1 });
}
