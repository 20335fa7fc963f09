//! `fault-worker`: one client of a fault run. It loops acquire → work → release until its stop
//! file appears, and logs every operation to its history (see `lockgate_testenv::history`).
//!
//! ```text
//! fault-worker run --client ID --history FILE --backend kubernetes|file|http|go|exec
//!                  --locker URL --lock NAME --data DIR --stop FILE [options]
//! fault-worker step --client ID --history FILE --h N --data DIR --mode x|s --hold-ms MS [--no-fence]
//! ```
//!
//! Backends: `kubernetes` and `file` are Rust `Locker`s in this process; `http` speaks Go
//! lockgate's HTTP protocol to `lockgate serve` (with its fencing tokens, and a renewal thread
//! that declares the lease lost at its renewal deadline, as the library's session does); `go`
//! runs each hold as `lockgate-go exec … -- fault-worker step` (`--peer`), `exec` as
//! `lockgate exec … -- fault-worker step` (`--cli`): the step is the command under the lock,
//! reads `LOCKGATE_FENCING_TOKEN`, and takes SIGTERM as its lost-lease signal.
//!
//! Work under an exclusive hold: the counter's read-modify-write (`--rmw-ms` between the read
//! and the write), a write to the fenced register with the lease's token, the hold
//! (`--hold MIN:MAX` ms), another register write, then the release. Each step is skipped once
//! the lease is known lost, unless `--ignore-lost` (a planted bug: the worker then also keeps
//! incrementing the counter through its hold). `--no-fence` switches the register's check off
//! (another planted bug). Shared holds only hold.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockgate::kubernetes::{KubernetesLocker, LeaseConfig, Target};
use lockgate::{AcquireOptions, FileLocker, Locker, Mode, Wait};
use lockgate_testenv::history::{Event, Op, Phase, Recorder};
use lockgate_testenv::register::{read_counter, write_counter, Register};

fn usage(why: &str) -> ! {
    eprintln!("fault-worker: {why}");
    std::process::exit(64)
}

/// A small xorshift generator: runs differ, nothing needs to be reproducible bit for bit.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
}

#[derive(Debug, Clone)]
struct Args {
    client: String,
    history: PathBuf,
    backend: String,
    locker: String,
    lock: String,
    data: PathBuf,
    stop: PathBuf,
    lease: LeaseConfig,
    hold: (u64, u64),
    rmw: Duration,
    shared_pct: u64,
    waits: Vec<String>,
    timeout: Duration,
    peer: Option<PathBuf>,
    cli: Option<PathBuf>,
    ignore_lost: bool,
    no_fence: bool,
    // step only
    h: u64,
    mode: Mode,
    hold_ms: u64,
}

fn parse(mut it: impl Iterator<Item = String>) -> Args {
    let mut a = Args {
        client: String::new(),
        history: PathBuf::new(),
        backend: "kubernetes".into(),
        locker: String::new(),
        lock: "fault".into(),
        data: PathBuf::new(),
        stop: PathBuf::new(),
        lease: LeaseConfig::default(),
        hold: (20, 200),
        rmw: Duration::ZERO,
        shared_pct: 20,
        waits: vec!["block".into(), "timeout".into(), "nb".into()],
        timeout: Duration::from_secs(2),
        peer: None,
        cli: None,
        ignore_lost: false,
        no_fence: false,
        h: 0,
        mode: Mode::Exclusive,
        hold_ms: 0,
    };
    let ms = |v: String| Duration::from_millis(v.parse().unwrap_or_else(|_| usage("bad ms")));
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--client" => a.client = value(),
            "--history" => a.history = value().into(),
            "--backend" => a.backend = value(),
            "--locker" => a.locker = value(),
            "--lock" => a.lock = value(),
            "--data" => a.data = value().into(),
            "--stop" => a.stop = value().into(),
            "--lease" => {
                // TTL,PERIOD,DEADLINE,REQUEST_TIMEOUT in ms
                let v: Vec<Duration> = value().split(',').map(|s| ms(s.to_owned())).collect();
                let [ttl, renew_period, renew_deadline, request_timeout] = v[..] else {
                    usage("--lease TTL,PERIOD,DEADLINE,TIMEOUT")
                };
                a.lease = LeaseConfig {
                    ttl,
                    renew_period,
                    renew_deadline,
                    request_timeout,
                };
            }
            "--hold" => {
                let v = value();
                let (lo, hi) = v.split_once(':').unwrap_or((&v, &v));
                a.hold = (
                    lo.parse().unwrap_or_else(|_| usage("bad --hold")),
                    hi.parse().unwrap_or_else(|_| usage("bad --hold")),
                );
            }
            "--rmw-ms" => a.rmw = ms(value()),
            "--shared" => a.shared_pct = value().parse().unwrap_or_else(|_| usage("bad --shared")),
            "--waits" => a.waits = value().split(',').map(str::to_owned).collect(),
            "--timeout-ms" => a.timeout = ms(value()),
            "--peer" => a.peer = Some(value().into()),
            "--cli" => a.cli = Some(value().into()),
            "--ignore-lost" => a.ignore_lost = true,
            "--no-fence" => a.no_fence = true,
            "--h" => a.h = value().parse().unwrap_or_else(|_| usage("bad --h")),
            "--mode" => {
                a.mode = match value().as_str() {
                    "s" => Mode::Shared,
                    _ => Mode::Exclusive,
                }
            }
            "--hold-ms" => a.hold_ms = value().parse().unwrap_or_else(|_| usage("bad --hold-ms")),
            _ => usage(&format!("unknown argument {flag:?}")),
        }
    }
    if a.client.is_empty() || a.history.as_os_str().is_empty() || a.data.as_os_str().is_empty() {
        usage("--client, --history and --data are required");
    }
    a
}

fn main() {
    let mut argv = std::env::args().skip(1);
    let cmd = argv.next().unwrap_or_default();
    let args = parse(argv);
    let rec = Arc::new(Recorder::open(&args.history).expect("open the history"));
    match cmd.as_str() {
        "run" => run(&args, &rec),
        "step" => step(&args, &rec),
        _ => usage("run or step"),
    }
}

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Shared => "s",
        Mode::Exclusive => "x",
    }
}

/// The work every backend's holder does, given a way to ask whether the lease is lost.
struct Work<'a> {
    args: &'a Args,
    rec: &'a Recorder,
    register: Register,
    counter: PathBuf,
}

impl<'a> Work<'a> {
    fn new(args: &'a Args, rec: &'a Recorder) -> Self {
        let mut register = Register::new(&args.data);
        register.fenced = !args.no_fence;
        Self {
            args,
            rec,
            register,
            counter: args.data.join("counter"),
        }
    }

    fn ev(&self, op: Op, phase: Phase, h: u64) -> Event {
        Event::now(&self.args.client, op, phase).hold(h)
    }

    fn increment(&self, h: u64) {
        self.rec.log(&self.ev(Op::Counter, Phase::Invoke, h));
        let read = match read_counter(&self.counter) {
            Ok(v) => v,
            Err(e) => {
                self.rec
                    .log(&self.ev(Op::Counter, Phase::Fail, h).detail(e.to_string()));
                return;
            }
        };
        if !self.args.rmw.is_zero() {
            std::thread::sleep(self.args.rmw);
        }
        match write_counter(&self.counter, read + 1) {
            Ok(()) => {
                let mut e = self.ev(Op::Counter, Phase::Ok, h);
                e.read = Some(read);
                e.wrote = Some(read + 1);
                self.rec.log(&e);
            }
            Err(e) => self
                .rec
                .log(&self.ev(Op::Counter, Phase::Info, h).detail(e.to_string())),
        }
    }

    fn register(&self, h: u64, token: u64) {
        self.rec
            .log(&self.ev(Op::Register, Phase::Invoke, h).token(Some(token)));
        match self.register.write(token, &self.args.client, h) {
            Ok(Some(seq)) => {
                let mut e = self.ev(Op::Register, Phase::Ok, h).token(Some(token));
                e.seq = Some(seq);
                self.rec.log(&e);
            }
            Ok(None) => self.rec.log(
                &self
                    .ev(Op::Register, Phase::Fail, h)
                    .token(Some(token))
                    .detail("refused: stale token"),
            ),
            Err(e) => self
                .rec
                .log(&self.ev(Op::Register, Phase::Info, h).detail(e.to_string())),
        }
    }

    /// Everything done under an exclusive hold, `lost` telling whether the lease is gone.
    fn exclusive(&self, h: u64, token: Option<u64>, hold: Duration, lost: &dyn Fn() -> bool) {
        let live = || self.args.ignore_lost || !lost();
        if live() {
            self.increment(h);
        }
        if let (Some(t), true) = (token, live()) {
            self.register(h, t);
        }
        let until = Instant::now() + hold;
        if self.args.ignore_lost {
            // The planted bug: keeps working through the hold whatever it was told.
            while Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
                self.increment(h);
            }
        } else {
            std::thread::sleep(hold);
        }
        if let (Some(t), true) = (token, live()) {
            self.register(h, t);
        }
    }
}

fn stop_requested(args: &Args) -> bool {
    args.stop.exists()
}

fn seed() -> u64 {
    lockgate_testenv::history::wall_ns() ^ (u64::from(std::process::id()) << 32)
}

fn run(args: &Args, rec: &Arc<Recorder>) {
    rec.log(
        &Event::now(&args.client, Op::Start, Phase::Ok).detail(format!(
            "backend={} lease={:?} hold={:?} waits={:?} shared={}% ignore_lost={} no_fence={}",
            args.backend,
            args.lease,
            args.hold,
            args.waits,
            args.shared_pct,
            args.ignore_lost,
            args.no_fence
        )),
    );
    match args.backend.as_str() {
        "kubernetes" | "file" => run_locker(args, rec),
        "http" => run_http(args, rec),
        "go" | "exec" => run_supervised(args, rec),
        other => usage(&format!("unknown backend {other:?}")),
    }
    rec.log(&Event::now(&args.client, Op::End, Phase::Ok));
}

/// Picks a mode and a wait for the next acquisition.
fn pick(args: &Args, rng: &mut Rng) -> (Mode, String) {
    let mode = if rng.below(100) < args.shared_pct {
        Mode::Shared
    } else {
        Mode::Exclusive
    };
    let wait = args.waits[rng.below(args.waits.len() as u64) as usize].clone();
    (mode, wait)
}

fn acquire_invoke(args: &Args, h: u64, mode: Mode, wait: &str) -> Event {
    let mut e = Event::now(&args.client, Op::Acquire, Phase::Invoke).hold(h);
    e.mode = Some(mode_str(mode).into());
    e.wait = Some(wait.to_owned());
    e
}

// ---------------------------------------------------------------------------------------------
// Rust lockers in this process

fn run_locker(args: &Args, rec: &Arc<Recorder>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let locker = rt.block_on(async {
        if args.backend == "file" {
            let dir = args.locker.trim_start_matches("file:");
            return Locker::new(FileLocker::new(dir).expect("file locker"));
        }
        let rest = args
            .locker
            .strip_prefix("kubernetes://")
            .unwrap_or_else(|| usage("kubernetes://NAMESPACE/configmaps/NAME"));
        let parts: Vec<&str> = rest.split('/').collect();
        let [ns, "configmaps", cm] = parts[..] else {
            usage("kubernetes://NAMESPACE/configmaps/NAME");
        };
        let client = lockgate::kubernetes::client(None, args.lease.request_timeout)
            .await
            .unwrap_or_else(|e| usage(&format!("kube client: {e}")));
        Locker::new(
            KubernetesLocker::new(client, Target::configmap(ns, cm), args.lease)
                .unwrap_or_else(|e| usage(&format!("locker: {e}"))),
        )
    });
    let work = Work::new(args, rec);
    let mut rng = Rng::new(seed());
    let mut h = 0;
    while !stop_requested(args) {
        h += 1;
        let (mode, wait) = pick(args, &mut rng);
        rec.log(&acquire_invoke(args, h, mode, &wait));
        let r = Arc::clone(rec);
        let client = args.client.clone();
        let mut opts = AcquireOptions::default()
            .mode(mode)
            .on_lost(move |_, reason| {
                r.log(
                    &Event::now(&client, Op::Lost, Phase::Ok)
                        .hold(h)
                        .detail(reason.to_string()),
                )
            });
        opts = match wait.as_str() {
            "nb" => opts.non_blocking(),
            "timeout" => opts.timeout(args.timeout),
            _ => opts.wait(Wait::Forever),
        };
        let acquired = rt.block_on(locker.acquire(&args.lock, opts));
        let guard = match acquired {
            Ok(g) => g,
            Err(e) => {
                let busy = e.is_contention();
                rec.log(
                    &Event::now(&args.client, Op::Acquire, Phase::Fail)
                        .hold(h)
                        .detail(if busy { "busy".into() } else { e.to_string() }),
                );
                let pause = if busy { rng.range((5, 50)) } else { 200 };
                std::thread::sleep(Duration::from_millis(pause));
                continue;
            }
        };
        let mut ok = Event::now(&args.client, Op::Acquire, Phase::Ok)
            .hold(h)
            .token(guard.fencing_token());
        ok.mode = Some(mode_str(mode).into());
        rec.log(&ok);
        let hold = Duration::from_millis(rng.range(args.hold));
        if mode == Mode::Exclusive {
            work.exclusive(h, guard.fencing_token(), hold, &|| guard.is_lost());
        } else {
            std::thread::sleep(hold);
        }
        rec.log(&Event::now(&args.client, Op::Release, Phase::Invoke).hold(h));
        match rt.block_on(guard.release()) {
            Ok(()) => rec.log(&Event::now(&args.client, Op::Release, Phase::Ok).hold(h)),
            Err(e @ lockgate::Error::LeaseLost { .. }) => rec.log(
                &Event::now(&args.client, Op::Release, Phase::Fail)
                    .hold(h)
                    .detail(e.to_string()),
            ),
            Err(e) => rec.log(
                &Event::now(&args.client, Op::Release, Phase::Info)
                    .hold(h)
                    .detail(lockgate_error_chain(&e)),
            ),
        }
        std::thread::sleep(Duration::from_millis(rng.range((0, 20))));
    }
    // Anything still in the background (a release on drop) is given a moment.
    rt.shutdown_timeout(Duration::from_secs(2));
}

fn lockgate_error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// HTTP: Go lockgate's protocol against `lockgate serve`

struct HttpLease {
    uuid: String,
    token: Option<u64>,
    lost: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

fn post(
    agent: &ureq::Agent,
    url: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let mut reply = agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .map_err(|e| e.to_string())?;
    let text = reply
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
}

fn run_http(args: &Args, rec: &Arc<Recorder>) {
    let base = args.locker.trim_end_matches('/').to_owned();
    let work = Work::new(args, rec);
    let mut rng = Rng::new(seed());
    let agent = http_agent(args.lease.request_timeout);
    // Long polls wait longer than a request.
    let polls = http_agent(Duration::from_secs(5));
    let mut h = 0;
    while !stop_requested(args) {
        h += 1;
        let (mode, wait) = pick(args, &mut rng);
        rec.log(&acquire_invoke(args, h, mode, &wait));
        let deadline = match wait.as_str() {
            "nb" => Some(Instant::now()),
            "timeout" => Some(Instant::now() + args.timeout),
            _ => None,
        };
        let mut granted = None;
        let mut failure = String::from("busy");
        loop {
            let wait_ms = deadline.map_or(3000, |d| {
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(3000) as u64
            });
            let sent = Instant::now();
            let body = serde_json::json!({"lockName": args.lock, "opts": {"shared": mode == Mode::Shared, "waitMs": wait_ms}});
            match post(&polls, &format!("{base}/acquire"), body) {
                Ok(v) if v["err"].as_str().unwrap_or("").is_empty() => {
                    granted = Some((
                        v["lockHandle"]["uuid"].as_str().unwrap_or("").to_owned(),
                        v["fencingToken"].as_u64(),
                        sent,
                    ));
                    break;
                }
                Ok(v) if v["code"] == "should_wait" => failure = "busy".into(),
                Ok(v) => {
                    failure = v.to_string();
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    // The server is down or restarting: keep trying until the deadline.
                    failure = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) || stop_requested(args) {
                break;
            }
        }
        let Some((uuid, token, sent)) = granted else {
            rec.log(
                &Event::now(&args.client, Op::Acquire, Phase::Fail)
                    .hold(h)
                    .detail(failure),
            );
            std::thread::sleep(Duration::from_millis(rng.range((5, 50))));
            continue;
        };
        let mut ok = Event::now(&args.client, Op::Acquire, Phase::Ok)
            .hold(h)
            .token(token);
        ok.mode = Some(mode_str(mode).into());
        rec.log(&ok);
        let mut lease = HttpLease {
            uuid,
            token,
            lost: Arc::default(),
            done: Arc::default(),
            renewer: None,
        };
        lease.renewer = Some(spawn_renewer(args, rec, h, &base, &lease, sent));
        let hold = Duration::from_millis(rng.range(args.hold));
        if mode == Mode::Exclusive {
            let lost = Arc::clone(&lease.lost);
            work.exclusive(h, lease.token, hold, &|| lost.load(Ordering::SeqCst));
        } else {
            std::thread::sleep(hold);
        }
        rec.log(&Event::now(&args.client, Op::Release, Phase::Invoke).hold(h));
        lease.done.store(true, Ordering::SeqCst);
        if let Some(t) = lease.renewer.take() {
            let _ = t.join();
        }
        let body = serde_json::json!({"lockHandle": {"uuid": lease.uuid, "lockName": args.lock}});
        let e = match post(&agent, &format!("{base}/release"), body) {
            Ok(v) if v["err"].as_str().unwrap_or("").is_empty() => {
                Event::now(&args.client, Op::Release, Phase::Ok)
            }
            Ok(v) => Event::now(&args.client, Op::Release, Phase::Fail).detail(v.to_string()),
            Err(e) => Event::now(&args.client, Op::Release, Phase::Info).detail(e),
        };
        rec.log(&e.hold(h));
    }
}

/// Renews an HTTP lease every renewal period; declares it lost when the server says so, or when
/// the renewal deadline has passed since the last confirmed renewal was sent.
fn spawn_renewer(
    args: &Args,
    rec: &Arc<Recorder>,
    h: u64,
    base: &str,
    lease: &HttpLease,
    granted: Instant,
) -> std::thread::JoinHandle<()> {
    let (rec, client, lock, base) = (
        Arc::clone(rec),
        args.client.clone(),
        args.lock.clone(),
        base.to_owned(),
    );
    let (lost, done, uuid, cfg) = (
        Arc::clone(&lease.lost),
        Arc::clone(&lease.done),
        lease.uuid.clone(),
        args.lease,
    );
    std::thread::spawn(move || {
        let agent = http_agent(cfg.request_timeout);
        let mut confirmed = granted;
        let declare = |why: &str| {
            lost.store(true, Ordering::SeqCst);
            rec.log(&Event::now(&client, Op::Lost, Phase::Ok).hold(h).detail(why));
        };
        loop {
            let next = confirmed + cfg.renew_period;
            while Instant::now() < next {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                if Instant::now() >= confirmed + cfg.renew_deadline {
                    return declare("renewal deadline passed");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if done.load(Ordering::SeqCst) {
                return;
            }
            if Instant::now() >= confirmed + cfg.renew_deadline {
                return declare("renewal deadline passed");
            }
            let sent = Instant::now();
            let body = serde_json::json!({"lockHandle": {"uuid": uuid, "lockName": lock}});
            match post(&agent, &format!("{base}/renew-lease"), body) {
                Ok(v) if v["err"].as_str().unwrap_or("").is_empty() => confirmed = sent,
                Ok(v)
                    if matches!(
                        v["code"].as_str(),
                        Some("lock_already_leased" | "no_existing_lock_lease_found")
                    ) =>
                {
                    return declare(v["err"].as_str().unwrap_or("lost"));
                }
                // Unreachable or failing: retry soon, until the deadline.
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Go lockgate and `lockgate exec` as supervisors of a step

fn run_supervised(args: &Args, rec: &Arc<Recorder>) {
    use std::os::unix::process::CommandExt;
    let mut rng = Rng::new(seed());
    let me = std::env::current_exe().expect("own path");
    let mut h = 0;
    while !stop_requested(args) {
        h += 1;
        let (mode, wait) = pick(args, &mut rng);
        rec.log(&acquire_invoke(args, h, mode, &wait));
        let mut cmd = match args.backend.as_str() {
            "go" => {
                let mut c = std::process::Command::new(args.peer.as_ref().expect("--peer"));
                c.args(["exec", "--locker", &args.locker, "-q"]);
                c
            }
            _ => {
                let mut c = std::process::Command::new(args.cli.as_ref().expect("--cli"));
                c.args(["--locker", &args.locker, "exec", "-q"]);
                c
            }
        };
        if mode == Mode::Shared {
            cmd.arg("-s");
        }
        match wait.as_str() {
            "nb" => {
                cmd.arg("-n");
            }
            "timeout" => {
                cmd.args(["-w", &format!("{:.3}", args.timeout.as_secs_f64())]);
            }
            _ => {}
        }
        let hold = rng.range(args.hold);
        cmd.args([args.lock.as_str(), "--"])
            .arg(&me)
            .args(["step", "--client", &args.client, "--history"])
            .arg(&args.history)
            .args(["--data"])
            .arg(&args.data)
            .args(["--h", &h.to_string(), "--mode", mode_str(mode)])
            .args(["--hold-ms", &hold.to_string()]);
        if args.no_fence {
            cmd.arg("--no-fence");
        }
        if args.ignore_lost {
            cmd.arg("--ignore-lost");
        }
        // Its own process group, so that a kill of the Go peer can take its command with it.
        cmd.process_group(0).stdin(std::process::Stdio::null());
        let marker = ran_marker(&args.data, &args.client, h);
        let status = match cmd.status() {
            Ok(s) => s,
            Err(e) => {
                rec.log(
                    &Event::now(&args.client, Op::Acquire, Phase::Fail)
                        .hold(h)
                        .detail(format!("spawn: {e}")),
                );
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let ran = marker.exists();
        let _ = std::fs::remove_file(&marker);
        let code = status.code();
        let e = match (ran, code) {
            (false, Some(1)) => Event::now(&args.client, Op::Acquire, Phase::Fail).detail("busy"),
            (false, _) => Event::now(&args.client, Op::Acquire, Phase::Fail).detail(format!(
                "supervisor ended with {status} before the command ran"
            )),
            (true, Some(0)) => Event::now(&args.client, Op::Release, Phase::Ok),
            (true, Some(75)) => {
                Event::now(&args.client, Op::Release, Phase::Fail).detail("lease lost (exit 75)")
            }
            (true, _) => Event::now(&args.client, Op::Release, Phase::Info)
                .detail(format!("supervisor ended with {status}")),
        };
        rec.log(&e.hold(h));
        if !ran {
            std::thread::sleep(Duration::from_millis(rng.range((5, 50))));
        }
    }
}

fn ran_marker(data: &Path, client: &str, h: u64) -> PathBuf {
    data.join(format!("ran-{client}-{h}"))
}

static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

/// The command under `lockgate exec` or `lockgate-go exec`: one hold.
fn step(args: &Args, rec: &Arc<Recorder>) {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
    let token = std::env::var("LOCKGATE_FENCING_TOKEN")
        .ok()
        .and_then(|t| t.parse().ok());
    let h = args.h;
    let mut ok = Event::now(&args.client, Op::Acquire, Phase::Ok)
        .hold(h)
        .token(token)
        .detail(format!(
            "lock={:?} holder={:?}",
            std::env::var("LOCKGATE_LOCK_NAME").unwrap_or_default(),
            std::env::var("LOCKGATE_HOLDER_ID").unwrap_or_default()
        ));
    ok.mode = Some(mode_str(args.mode).into());
    // SAFETY: getppid cannot fail.
    ok.target_pid = Some(unsafe { libc::getppid() } as u32);
    rec.log(&ok);
    let _ = std::fs::write(ran_marker(&args.data, &args.client, h), b"");
    let work = Work::new(args, rec);
    let lost = || TERMINATED.load(Ordering::SeqCst) && !args.ignore_lost;
    let finish = |code: i32| -> ! {
        if TERMINATED.load(Ordering::SeqCst) {
            rec.log(
                &Event::now(&args.client, Op::Lost, Phase::Ok)
                    .hold(h)
                    .detail("SIGTERM from the supervisor"),
            );
            std::process::exit(143);
        }
        rec.log(&Event::now(&args.client, Op::Release, Phase::Invoke).hold(h));
        std::process::exit(code)
    };
    let until = Instant::now() + Duration::from_millis(args.hold_ms);
    if args.mode == Mode::Exclusive {
        if !lost() {
            work.increment(h);
        }
        // The command keeps acting through its hold: a write to the register every 100 ms,
        // as long as it has not been told to stop. Only the token protects the register from a
        // command whose supervisor was paused.
        while Instant::now() < until && !lost() {
            if let Some(t) = token {
                work.register(h, t);
            }
            std::thread::sleep(Duration::from_millis(100).min(until - Instant::now().min(until)));
        }
    } else {
        while Instant::now() < until && !lost() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    finish(0)
}
