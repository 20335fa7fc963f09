//! Fault runs: a fleet of `fault-worker` clients on one lock, a nemesis that injects faults while
//! they work, and the checker over everything they logged.
//!
//! A [`Plan`] names the clients (each a process: a Rust locker, a Go peer or `lockgate exec`
//! supervising a step, optionally under faketime or behind a toxiproxy proxy of its own) and the
//! faults, applied one after another. [`Plan::run`] starts the clients, lets them work, injects
//! each fault (logging it in the nemesis history with the same clocks as the clients), asks the
//! clients to stop, waits for them with a deadline (a client that does not stop is killed and
//! reported: a hung client), and hands every history to [`checker::check`].
//!
//! Nothing here sleeps to synchronise: the nemesis finds its victims by reading the clients'
//! histories as they are written (a client that holds the lock, at the step the fault wants);
//! only a fault's own duration is a sleep.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checker::{self, Params, Report};
use crate::history::{self, Event, Op, Phase, Recorder};
use crate::proxy::Proxy;
use crate::register::{read_counter, Register};

/// One client of a run.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub id: String,
    /// `kubernetes`, `file`, `http`, `go` or `exec` (see `fault-worker`).
    pub backend: &'static str,
    /// More `fault-worker run` arguments (`--lease`, `--hold`, `--shared`, `--waits`,
    /// `--peer`, `--cli`, `--rmw-ms`, the planted bugs `--ignore-lost` and `--no-fence`).
    pub args: Vec<String>,
    /// Talks to the API server through a proxy of its own (network faults).
    pub proxied: bool,
    /// Runs under libfaketime with this initial offset (`-10m`); see [`Fault::ClockStep`].
    pub faketime: Option<String>,
}

impl ClientSpec {
    pub fn new(id: &str, backend: &'static str, args: &[&str]) -> Self {
        Self {
            id: id.to_owned(),
            backend,
            args: args.iter().map(|s| s.to_string()).collect(),
            proxied: false,
            faketime: None,
        }
    }

    pub fn proxied(mut self) -> Self {
        self.proxied = true;
        self
    }

    pub fn faketime(mut self, offset: &str) -> Self {
        self.faketime = Some(offset.to_owned());
        self
    }
}

/// Where in its hold a victim must be when the fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// Any time after its grant (an exclusive hold).
    Holding,
    /// Between its counter read and write ("mid-write").
    MidWrite,
    /// After its first register write, or its counter update when it has no token: in the
    /// sleep of its hold.
    InHold,
    /// In the sleep of a hold that reached it less than a second ago: most of the hold still to
    /// come (a fault that must outlast the renewal deadline inside the hold). Counted from the
    /// client's own event, not from the grant: on a loaded machine the first write of a hold
    /// can come long after its grant, and such a hold is still fresh.
    Fresh,
}

/// What a network fault does to the victim's proxy.
#[derive(Debug, Clone, Copy)]
pub enum Net {
    BlackHole,
    LoseReplies,
    Latency(Duration),
}

/// One fault.
#[derive(Debug, Clone)]
pub enum Fault {
    /// SIGKILL the holder: the worker, the Go peer with its command, or `lockgate exec` (not its
    /// command: its watchdog must end it). The client is started again under a new id.
    Kill(Moment),
    /// SIGSTOP the holder (a worker, or the `lockgate exec` supervising one) for this long, then
    /// SIGCONT.
    Pause(Moment, Duration),
    /// A network fault on the holder's proxy for this long, then healed.
    Partition(Net, Duration),
    /// A network fault on every proxied client for this long.
    Everyone(Net, Duration),
    /// `testenv/kube restart-apiserver` / `restart-etcd` / `restart-both`.
    Restart(&'static str),
    /// Sets the faketime offset of a client (`+0`, `-30s`): a clock stepped back or forward.
    ClockStep(String, String),
    /// kill -9 the HTTP lock server, and start it again on the same port.
    RestartServer,
    /// Just let the clients work this long.
    Wait(Duration),
}

/// The HTTP lock server of a run.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub ttl: String,
}

/// A fault run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    /// The locker URL (`kubernetes://…`, `file:DIR`); for an HTTP run, filled in with the
    /// server's address.
    pub locker: String,
    pub lock: String,
    pub clients: Vec<ClientSpec>,
    /// Before the first fault.
    pub warmup: Duration,
    pub faults: Vec<Fault>,
    /// Between faults, and after the last one.
    pub gap: Duration,
    pub params: Params,
    /// Runs `lockgate gc --older-than 0s` on the lock directory without pause (file runs).
    pub gc: bool,
    pub server: Option<ServerSpec>,
    /// How long the clients get to stop once asked.
    pub stop_within: Duration,
    /// The clients faults may strike (empty: any).
    pub victims: Vec<String>,
}

impl Plan {
    /// How long a fault waits for its victim: every client through one longest hold, a
    /// takeover, and a margin for a loaded machine (10 s at least). A fault that finds none in
    /// that time is reported with what the nemesis saw meanwhile, and fails the run.
    pub fn victim_within(&self) -> Duration {
        let longest_hold_ms = self
            .clients
            .iter()
            .filter_map(|c| {
                let i = c.args.iter().position(|a| a == "--hold")?;
                let (_, max) = c.args.get(i + 1)?.split_once(':')?;
                max.parse::<u64>().ok()
            })
            .max()
            .unwrap_or(1000);
        let clients = u32::try_from(self.clients.len()).unwrap_or(u32::MAX);
        let cycle = Duration::from_millis(longest_hold_ms)
            + self.params.takeover_bound.unwrap_or(Duration::from_secs(5));
        (cycle * clients + Duration::from_secs(5)).max(Duration::from_secs(10))
    }
}

/// What a run did and what the checker found.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    pub report: Report,
    pub elapsed: Duration,
    /// Kept when the run failed; removed otherwise.
    pub dir: PathBuf,
    /// Faults that found no victim (nobody held the lock in time).
    pub missed: Vec<String>,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "run {:?} ({:.0} s, histories in {}):",
            self.name,
            self.elapsed.as_secs_f64(),
            self.dir.display()
        )?;
        if !self.missed.is_empty() {
            writeln!(f, "faults without a victim: {}", self.missed.join(", "))?;
        }
        write!(f, "{}", self.report)
    }
}

/// The test suite's binary `name` (next to the test or tool that runs).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let mut dir = exe.parent().expect("a directory").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first",
        p.display()
    );
    p
}

const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Processes of a run; all killed if the run ends early (a panic included).
#[derive(Default)]
struct Fleet {
    children: Vec<(String, Child)>,
    /// Process groups to kill at the end (Go peers run in groups of their own).
    groups: Vec<i32>,
    paused: Vec<i32>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for &p in &self.paused {
            // SAFETY: kill(2).
            unsafe { libc::kill(p, libc::SIGCONT) };
        }
        for (_, c) in &mut self.children {
            // SAFETY: kill(2) of the child's group (each worker leads one).
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.kill();
            let _ = c.wait();
        }
        for &g in &self.groups {
            // SAFETY: kill(2).
            unsafe { libc::kill(-g, libc::SIGKILL) };
        }
    }
}

/// A hold in progress, as the nemesis sees it.
#[derive(Debug, Clone)]
struct Holding {
    /// The process that holds (for Go and `lockgate exec` clients, the command under the lock).
    pid: u32,
    /// The Go peer or `lockgate exec` that supervises it.
    supervisor: Option<u32>,
    exclusive: bool,
    /// The hold's last event.
    op: Op,
    phase: Phase,
    /// When it entered the sleep of its hold (CLOCK_MONOTONIC ns; 0: not yet).
    in_hold_at: u64,
}

/// What the nemesis knows of a client from its history so far.
#[derive(Debug, Clone, Default)]
struct Seen {
    holding: Option<Holding>,
}

/// Reads the clients' histories as they grow.
struct Watcher {
    dir: PathBuf,
    offsets: HashMap<PathBuf, usize>,
    clients: HashMap<String, Seen>,
    supervisors: Vec<u32>,
    /// Exclusive grants seen so far (to say why a fault found no victim).
    exclusive_grants: u32,
}

/// After its first register write, or its counter update when it has no token: in the sleep of
/// its hold.
fn in_hold(op: Op, phase: Phase) -> bool {
    (op == Op::Register && phase != Phase::Invoke) || (op == Op::Counter && phase == Phase::Ok)
}

impl Watcher {
    fn poll(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "jsonl") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let off = self.offsets.entry(path).or_insert(0);
            let Some(new) = text.get(*off..) else {
                continue;
            };
            // Only whole lines.
            let whole = new.rfind('\n').map_or(0, |i| i + 1);
            for line in new[..whole].lines() {
                let Ok(ev) = serde_json::from_str::<Event>(line) else {
                    continue;
                };
                let seen = self.clients.entry(ev.client.clone()).or_default();
                match (ev.op, ev.phase) {
                    (Op::Acquire, Phase::Ok) => {
                        if let Some(p) = ev.target_pid {
                            self.supervisors.push(p);
                        }
                        seen.holding = Some(Holding {
                            pid: ev.pid,
                            supervisor: ev.target_pid,
                            exclusive: ev.mode.as_deref() != Some("s"),
                            op: ev.op,
                            phase: ev.phase,
                            in_hold_at: 0,
                        });
                        if ev.mode.as_deref() != Some("s") {
                            self.exclusive_grants += 1;
                        }
                    }
                    (Op::Release, Phase::Invoke) | (Op::Lost, _) | (Op::End, _) => {
                        seen.holding = None
                    }
                    (op, phase) => {
                        if let Some(hold) = seen.holding.as_mut() {
                            hold.op = op;
                            hold.phase = phase;
                            if hold.in_hold_at == 0 && in_hold(op, phase) {
                                hold.in_hold_at = ev.mono;
                            }
                        }
                    }
                }
            }
            *off += whole;
        }
    }

    /// A client holding the lock exclusively at `moment`: (client, holder pid, supervisor pid).
    fn victim(&self, moment: Moment, among: &[String]) -> Option<(String, u32, Option<u32>)> {
        self.clients.iter().find_map(|(c, s)| {
            let Holding {
                pid,
                supervisor: sup,
                exclusive: excl,
                op,
                phase,
                in_hold_at,
            } = s.holding.clone()?;
            let at = match moment {
                Moment::Holding => true,
                Moment::MidWrite => op == Op::Counter && phase == Phase::Invoke,
                Moment::InHold => in_hold_at != 0,
                Moment::Fresh => {
                    in_hold_at != 0 && history::mono_ns().saturating_sub(in_hold_at) < 1_000_000_000
                }
            };
            (excl && at && among.contains(c)).then(|| (c.clone(), pid, sup))
        })
    }
}

struct Running {
    dir: PathBuf,
    hist: PathBuf,
    stop: PathBuf,
    nemesis: Recorder,
    fleet: Fleet,
    proxies: HashMap<String, Arc<Proxy>>,
    specs: HashMap<String, ClientSpec>,
    incarnations: HashMap<String, u32>,
    watcher: Watcher,
    server: Option<(u16, Child)>,
    missed: Vec<String>,
}

impl Plan {
    /// Runs the plan and checks its histories.
    pub async fn run(&self) -> Outcome {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix(&format!("fault-{}-", self.name))
            .tempdir()
            .expect("a run directory")
            .keep();
        let hist = dir.join("histories");
        std::fs::create_dir_all(&hist).unwrap();
        let mut r = Running {
            dir: dir.clone(),
            hist: hist.clone(),
            stop: dir.join("stop"),
            nemesis: Recorder::open(&hist.join("nemesis.jsonl")).unwrap(),
            fleet: Fleet::default(),
            proxies: HashMap::new(),
            specs: HashMap::new(),
            incarnations: HashMap::new(),
            watcher: Watcher {
                dir: hist.clone(),
                offsets: HashMap::new(),
                clients: HashMap::new(),
                supervisors: Vec::new(),
                exclusive_grants: 0,
            },
            server: None,
            missed: Vec::new(),
        };
        // The first event of the nemesis history names it.
        r.nemesis
            .log(&Event::now("nemesis", Op::Start, Phase::Ok).detail(self.name.clone()));
        let mut plan = self.clone();
        if let Some(s) = &self.server {
            let port = free_port();
            r.server = Some((port, start_server(&s.ttl, port, true, &dir)));
            plan.locker = format!("http://127.0.0.1:{port}");
        }
        for spec in &self.clients {
            if spec.proxied {
                r.proxies
                    .insert(spec.id.clone(), Arc::new(Proxy::new().await));
            }
            r.specs.insert(spec.id.clone(), spec.clone());
        }
        for spec in &self.clients {
            r.spawn(&plan, spec, &spec.id);
        }
        let gc_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gc = self.gc.then(|| {
            let dir = plan.locker.trim_start_matches("file:").to_owned();
            let stop = Arc::clone(&gc_stop);
            std::thread::spawn(move || gc_loop(&dir, &stop))
        });
        tokio::time::sleep(self.warmup).await;
        for fault in &self.faults {
            r.apply(&plan, fault).await;
            tokio::time::sleep(self.gap).await;
        }
        // Stop: every client finishes its cycle and logs `end`.
        std::fs::write(&r.stop, b"").unwrap();
        let deadline = Instant::now() + self.stop_within;
        loop {
            let mut running = 0;
            for (_, c) in &mut r.fleet.children {
                if c.try_wait().unwrap().is_none() {
                    running += 1;
                }
            }
            if running == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (id, c) in &mut r.fleet.children {
            if c.try_wait().unwrap().is_none() {
                r.nemesis.log(
                    &Event::now("nemesis", Op::Fault, Phase::Info).detail(format!(
                        "{id} did not stop within {:?}: killed",
                        self.stop_within
                    )),
                );
                // SAFETY: kill(2) of the worker's group.
                unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
                let _ = c.wait();
            }
        }
        gc_stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = gc {
            t.join().expect("the gc loop");
        }
        // Supervisors (Go peers, `lockgate exec`) lead groups of their own: end what is left.
        r.watcher.poll();
        let groups: Vec<i32> = r.watcher.supervisors.iter().map(|&p| p as i32).collect();
        r.fleet.groups.extend(groups);
        let histories = history::read_dir(&hist).expect("read the histories");
        let register = Register::new(&dir.join("data"))
            .decisions()
            .expect("the register's log");
        let counter = read_counter(&dir.join("data").join("counter")).expect("the counter");
        let report = checker::check(
            &checker::Input {
                histories,
                nemesis: Vec::new(),
                register,
                counter: Some(counter),
            },
            &self.params,
        );
        if let Some((_, mut s)) = r.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let missed = std::mem::take(&mut r.missed);
        drop(r);
        if report.ok() && missed.is_empty() && std::env::var_os("LOCKGATE_FAULTS_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Outcome {
            name: self.name.clone(),
            report,
            elapsed: started.elapsed(),
            dir,
            missed,
        }
    }
}

impl Running {
    fn spawn(&mut self, plan: &Plan, spec: &ClientSpec, id: &str) {
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let worker = sibling_binary("fault-worker");
        let mut cmd = Command::new(&worker);
        cmd.arg("run")
            .args(["--client", id, "--backend", spec.backend])
            .arg("--history")
            .arg(self.hist.join(format!("{id}.jsonl")))
            .args(["--locker", &plan.locker, "--lock", &plan.lock])
            .arg("--data")
            .arg(&data)
            .arg("--stop")
            .arg(&self.stop)
            .args(&spec.args);
        let kubeconfig = match self.proxies.get(&spec.id) {
            Some(p) => p.kubeconfig().to_owned(),
            None => PathBuf::from(crate::required_env("LOCKGATE_TEST_KUBECONFIG")),
        };
        cmd.env("KUBECONFIG", kubeconfig);
        if let Some(offset) = &spec.faketime {
            let file = self.faketime_file(&spec.id);
            if !file.exists() {
                std::fs::write(&file, offset).unwrap();
            }
            cmd.env("LD_PRELOAD", FAKETIME_LIB)
                .env("FAKETIME_TIMESTAMP_FILE", &file)
                .env("FAKETIME_NO_CACHE", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        use std::os::unix::process::CommandExt;
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(format!("{id}.stderr")))
                    .unwrap(),
            );
        let child = cmd.spawn().expect("start a fault-worker");
        self.fleet.children.push((id.to_owned(), child));
    }

    fn faketime_file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("faketime-{id}"))
    }

    /// The clients alive now (the last incarnation of each).
    fn alive(&mut self, victims: &[String]) -> Vec<String> {
        self.fleet
            .children
            .iter_mut()
            .filter_map(|(id, c)| c.try_wait().ok().flatten().is_none().then(|| id.clone()))
            .filter(|id| victims.is_empty() || victims.iter().any(|v| v == base_id(id)))
            .collect()
    }

    /// Waits (the plan's [`Plan::victim_within`] at most) for an exclusive holder at `moment`
    /// among `among`; none in time is recorded as a missed fault, with what was seen meanwhile.
    async fn victim(
        &mut self,
        plan: &Plan,
        fault: &Fault,
        moment: Moment,
        among: &[String],
    ) -> Option<(String, u32, Option<u32>)> {
        let within = plan.victim_within();
        let start = Instant::now();
        let grants_before = self.watcher.exclusive_grants;
        while start.elapsed() < within {
            self.watcher.poll();
            if let Some(v) = self.watcher.victim(moment, among) {
                return Some(v);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.missed.push(format!(
            "{fault:?}: no exclusive holder {moment:?} among {among:?} within {within:?} \
             ({} exclusive grants seen meanwhile)",
            self.watcher.exclusive_grants - grants_before
        ));
        None
    }

    fn event(&self, op: Op, phase: Phase, target: &str, pid: Option<u32>) -> Event {
        let mut e = Event::now("nemesis", op, phase);
        e.target = Some(target.to_owned());
        e.target_pid = pid;
        e
    }

    async fn apply(&mut self, plan: &Plan, fault: &Fault) {
        let alive = self.alive(&plan.victims);
        match fault {
            Fault::Wait(d) => tokio::time::sleep(*d).await,
            Fault::Kill(moment) => {
                let Some((client, pid, sup)) = self.victim(plan, fault, *moment, &alive).await
                else {
                    return;
                };
                let spec = self.specs[base_id(&client)].clone();
                // In-process lockers die with the worker; a Go peer with its command (its
                // group); `lockgate exec` alone (its watchdog must end the command).
                let (signal_pid, group, dead_pid) = match (spec.backend, sup) {
                    ("go", Some(s)) => (s, true, pid),
                    ("exec", Some(s)) => (s, false, s),
                    _ => (pid, false, pid),
                };
                self.nemesis
                    .log(&self.event(Op::Kill, Phase::Ok, &client, Some(dead_pid)));
                // SAFETY: kill(2).
                unsafe {
                    libc::kill(
                        if group {
                            -(signal_pid as i32)
                        } else {
                            signal_pid as i32
                        },
                        libc::SIGKILL,
                    )
                };
                if matches!(spec.backend, "kubernetes" | "file" | "http") {
                    // The worker is gone: start it again, as a new client.
                    let n = self.incarnations.entry(spec.id.clone()).or_insert(1);
                    *n += 1;
                    let id = format!("{}~{n}", spec.id);
                    self.spawn(plan, &spec, &id);
                }
            }
            Fault::Pause(moment, d) => {
                let Some((client, pid, sup)) = self.victim(plan, fault, *moment, &alive).await
                else {
                    return;
                };
                let spec = &self.specs[base_id(&client)];
                let target = match (spec.backend, sup) {
                    ("exec", Some(s)) => s,
                    _ => pid,
                } as i32;
                self.nemesis
                    .log(&self.event(Op::Pause, Phase::Ok, &client, Some(target as u32)));
                self.fleet.paused.push(target);
                // SAFETY: kill(2).
                unsafe { libc::kill(target, libc::SIGSTOP) };
                tokio::time::sleep(*d).await;
                self.nemesis
                    .log(&self.event(Op::Resume, Phase::Ok, &client, Some(target as u32)));
                // SAFETY: kill(2).
                unsafe { libc::kill(target, libc::SIGCONT) };
                self.fleet.paused.retain(|&p| p != target);
            }
            Fault::Partition(net, d) => {
                let proxied: Vec<String> = alive
                    .iter()
                    .filter(|c| self.proxies.contains_key(base_id(c)))
                    .cloned()
                    .collect();
                let Some((client, pid, _)) =
                    self.victim(plan, fault, Moment::Fresh, &proxied).await
                else {
                    return;
                };
                let proxy = Arc::clone(&self.proxies[base_id(&client)]);
                self.nemesis.log(
                    &self
                        .event(Op::Partition, Phase::Ok, &client, Some(pid))
                        .detail(format!("{net:?}")),
                );
                net_fault(&proxy, *net).await;
                tokio::time::sleep(*d).await;
                proxy.pass().await;
                self.nemesis
                    .log(&self.event(Op::Heal, Phase::Ok, &client, Some(pid)));
            }
            Fault::Everyone(net, d) => {
                self.nemesis.log(
                    &Event::now("nemesis", Op::Fault, Phase::Invoke)
                        .detail(format!("everyone: {net:?}")),
                );
                for p in self.proxies.values() {
                    net_fault(p, *net).await;
                }
                tokio::time::sleep(*d).await;
                for p in self.proxies.values() {
                    p.pass().await;
                }
                self.nemesis.log(
                    &Event::now("nemesis", Op::Fault, Phase::Ok)
                        .detail(format!("everyone: {net:?}")),
                );
            }
            Fault::Restart(what) => {
                // Strike while somebody holds the lock: its renewals must fail over the restart.
                // (None: recorded as missed; the fault strikes all the same.)
                let _ = self.victim(plan, fault, Moment::Fresh, &alive).await;
                self.nemesis.log(
                    &Event::now("nemesis", Op::Fault, Phase::Invoke)
                        .detail(format!("restart {what}")),
                );
                let script = crate::required_env("LOCKGATE_TESTENV");
                let arg = format!("restart-{what}");
                let status = tokio::task::spawn_blocking(move || {
                    Command::new(script).arg(arg).stdin(Stdio::null()).status()
                })
                .await
                .unwrap()
                .expect("run testenv/kube");
                assert!(status.success(), "testenv/kube restart failed: {status}");
                self.nemesis.log(
                    &Event::now("nemesis", Op::Fault, Phase::Ok)
                        .detail(format!("restarted {what}")),
                );
            }
            Fault::ClockStep(client, offset) => {
                self.nemesis.log(
                    &Event::now("nemesis", Op::Fault, Phase::Ok)
                        .detail(format!("clock of {client} set to {offset}")),
                );
                std::fs::write(self.faketime_file(client), offset).unwrap();
            }
            Fault::RestartServer => {
                let ttl = plan.server.as_ref().expect("an HTTP run").ttl.clone();
                // Strike while somebody holds a lease: its holder must learn it lost it.
                // (None: recorded as missed; the fault strikes all the same.)
                let _ = self.victim(plan, fault, Moment::Fresh, &alive).await;
                let (port, mut old) = self.server.take().expect("a server");
                self.nemesis
                    .log(&Event::now("nemesis", Op::Fault, Phase::Invoke).detail("server kill -9"));
                let _ = old.kill();
                let _ = old.wait();
                let new = start_server(&ttl, port, false, &self.dir);
                self.server = Some((port, new));
                self.nemesis.log(
                    &Event::now("nemesis", Op::Fault, Phase::Ok).detail("server started again"),
                );
            }
        }
    }
}

async fn net_fault(p: &Proxy, net: Net) {
    match net {
        Net::BlackHole => p.black_hole().await,
        Net::LoseReplies => p.lose_replies().await,
        Net::Latency(d) => p.latency(d).await,
    }
}

/// The client id without its incarnation (`k0~2` → `k0`).
fn base_id(id: &str) -> &str {
    id.split('~').next().unwrap_or(id)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `lockgate serve` on `port`, returning once it serves.
fn start_server(ttl: &str, port: u16, first: bool, dir: &Path) -> Child {
    let mut cmd = Command::new(sibling_binary("lockgate"));
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--ttl",
        ttl,
    ]);
    if first {
        cmd.args(["--grace", "0s"]);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.stderr"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone().unwrap())
            .spawn()
            .expect("start lockgate serve");
        let mut line = String::new();
        use std::io::BufRead;
        let _ = std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        if line.starts_with("serving on") {
            return child;
        }
        // The port may still be held by the killed server's sockets for a moment.
        let _ = child.wait();
        assert!(
            Instant::now() < deadline,
            "lockgate serve did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `lockgate --dir DIR gc --older-than 0s`, again and again until `stop`.
fn gc_loop(dir: &str, stop: &std::sync::atomic::AtomicBool) {
    let cli = sibling_binary("lockgate");
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let status = Command::new(&cli)
            .args(["--dir", dir, "gc", "--older-than", "0s"])
            .stdout(Stdio::null())
            .status()
            .expect("run lockgate gc");
        assert!(status.success(), "lockgate gc failed: {status}");
    }
}

/// Runs that change the whole environment (restarts) take this exclusively; other runs share it.
pub fn environment_lock() -> &'static tokio::sync::RwLock<()> {
    static LOCK: std::sync::OnceLock<tokio::sync::RwLock<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::RwLock::new(()))
}
