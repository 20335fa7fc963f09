//! The deterministic simulator: lockgate's real Kubernetes locker, through a real `kube::Client`,
//! against a simulated API server over a simulated network, in virtual time, with faults chosen
//! by a seeded generator. A seed replays a run exactly; a search runs seeds one after another.
//!
//! - [`api`]: the simulated API server (held to the real one by `tests/sim_conformance.rs`);
//! - [`world`]: hosts, network, time, faults;
//! - [`workload`]: what clients do; [`journal`]: what they believed, checked as it happens;
//! - [`go`]: Go lockgate v0.1.1 and v0.2.0 peers, modelled from their source.
//!
//! `cargo run -p lockgate-testenv --bin simulate -- --seed S` replays one run and prints its
//! trace; `--minutes N` searches.

pub mod api;
pub mod go;
pub mod journal;
pub mod rng;
pub mod script;
pub mod workload;
pub mod world;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockgate::kubernetes::{LeaseConfig, Target};
use lockgate::{KubernetesLocker, Locker};

use journal::Journal;
use rng::Rng;
use world::{NetFaults, RandomPolicy, World};

/// Clients still running, by host.
#[derive(Clone, Default)]
struct Running(Arc<Mutex<BTreeMap<world::HostId, Arc<AtomicUsize>>>>);

impl Running {
    fn host(&self, h: world::HostId) -> Arc<AtomicUsize> {
        Arc::clone(self.0.lock().unwrap().entry(h).or_default())
    }

    /// The host died: its clients will never finish.
    fn forget(&self, h: world::HostId) {
        self.0.lock().unwrap().remove(&h);
    }

    fn total(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .values()
            .map(|c| c.load(Ordering::SeqCst))
            .sum()
    }
}

/// The object every simulated lock lives on.
pub const OBJECT: &str = "locks";

/// One run's shape, chosen from its seed.
#[derive(Debug, Clone)]
pub struct Config {
    pub hosts: usize,
    pub clients_per_host: usize,
    pub names: Vec<String>,
    /// How long clients work (virtual time); the run then winds down.
    pub duration: Duration,
    pub lease: LeaseConfig,
    pub net: NetFaults,
    /// Host faults: pauses, suspends, kills, clock steps.
    pub host_faults: bool,
    /// Server faults: restarts, cut watches, compaction.
    pub server_faults: bool,
    /// Go lockgate peers (v0.1.1 and v0.2.0), one per host of their own.
    pub go_peers: usize,
    /// How often a client asks for a shared lock.
    pub shared: f64,
    /// The longest a client holds a lock.
    pub max_hold: Duration,
    /// The longest a client pauses between two acquisitions (long pauses leave records
    /// standing still, where writes that land late land on the value they test).
    pub think: Duration,
    /// A planted bug of configuration: the first host's lockers use a 4 s TTL while everyone
    /// else uses `lease`'s.
    pub short_ttl_host: bool,
}

impl Config {
    /// A random shape.
    pub fn random(rng: &mut Rng) -> Self {
        let lease = match rng.range(0, 3) {
            0 => LeaseConfig::default(),
            // Short: much renewing, many takeovers.
            1 => LeaseConfig {
                ttl: Duration::from_secs(4),
                renew_period: Duration::from_secs(1),
                renew_deadline: Duration::from_secs(3),
                request_timeout: Duration::from_secs(1),
            },
            // Quiet: records stand still for seconds between renewals, so that a write held
            // back lands on the very value it tests.
            _ => LeaseConfig {
                ttl: Duration::from_secs(30),
                renew_period: Duration::from_secs(10),
                renew_deadline: Duration::from_secs(25),
                request_timeout: Duration::from_secs(1),
            },
        };
        let n = *rng.pick(&[1, 1, 2, 3]);
        Self {
            hosts: rng.range(2, 5) as usize,
            clients_per_host: rng.range(1, 4) as usize,
            names: (0..n).map(|i| format!("lock-{i}")).collect(),
            duration: Duration::from_secs(rng.range(20, 90)),
            lease,
            net: NetFaults::random(rng),
            host_faults: rng.chance(0.7),
            server_faults: rng.chance(0.5),
            go_peers: 0,
            short_ttl_host: false,
            shared: *rng.pick(&[0.2, 0.5, 0.8]),
            max_hold: Duration::from_millis(rng.range(500, 20_000)),
            think: *rng.pick(&[
                Duration::from_millis(400),
                Duration::from_secs(5),
                Duration::from_secs(15),
            ]),
        }
    }
}

/// What a run found.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub config: Config,
    pub violations: Vec<String>,
    pub counts: journal::Counts,
    pub errors: Vec<String>,
    pub trace: Vec<String>,
    /// Virtual time simulated.
    pub simulated: Duration,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Runs the schedule of `seed` with the shape `config`, recording a trace when `trace`.
pub fn run(seed: u64, config: &Config, trace: bool) -> Report {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let policy = RandomPolicy::new(config.net.clone());
    let spared = Arc::clone(&policy.spared);
    let mut world = World::new(seed, Box::new(policy));
    world.trace.enable(trace);
    world.server.create(OBJECT);
    let journal = Journal::default();
    {
        let journal = journal.clone();
        world.observe(move |now, annotations, snapshots| {
            journal.check_counts(now, annotations, snapshots);
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let running = Running::default();
    let ttl = config.lease.ttl;
    let mut hosts = Vec::new();
    for i in 0..config.hosts {
        let h = world.add_host(&format!("h{i}"));
        hosts.push(h);
        start_clients(&world, h, config, &journal, &stop, &running, &mut rng);
    }
    for i in 0..config.go_peers {
        let h = world.add_host(&format!("go{i}"));
        spared.lock().unwrap().insert(h);
        start_go(&world, h, config, &journal, &stop, &running, &mut rng);
    }
    if config.host_faults {
        schedule_host_faults(
            &mut world, &hosts, config, &journal, &stop, &running, &mut rng,
        );
    }
    if config.server_faults {
        schedule_server_faults(&mut world, config, &mut rng);
    }
    let panicked = watch_panics();
    world.run_until(config.duration);
    // Wind down: no new faults matter now; everyone resumes and finishes.
    stop.store(true, Ordering::SeqCst);
    world.set_policy(Box::new(RandomPolicy::new(NetFaults::none())));
    for h in 0..world.hosts.len() {
        world.resume(h);
    }
    world.server_down_until = None;
    // Every client must finish: holders release, waiters get their turn (crashed holders'
    // leases expire after a TTL, takeovers follow). Bounded generously.
    let limit = world.now + ttl * 6 + Duration::from_secs(30);
    while running.total() > 0 && world.now < limit {
        world.run_for(Duration::from_millis(100));
    }
    let stuck = running.total();
    if stuck > 0 {
        journal.violation(format!(
            "{stuck} clients still busy {:?} after the run ended (open holds: {:?})",
            world.now - config.duration,
            journal.open_holds()
        ));
    }
    // Nothing leaks: once everyone stopped and a TTL passed, no record is held.
    world.run_for(ttl * 2 + Duration::from_secs(2));
    let server_now = world
        .server_wall()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    for (key, value) in world.server.annotations(OBJECT).unwrap_or_default() {
        let Ok(rec) = serde_json::from_str::<serde_json::Value>(&value) else {
            journal.violation(format!("{key}: not a record: {value}"));
            continue;
        };
        let count = rec["SharedHoldersCount"].as_i64().unwrap_or(0);
        let expire = rec["ExpireAtTimestamp"].as_i64().unwrap_or(0);
        if count > 0 && expire >= server_now {
            journal.violation(format!(
                "{key}: still held after every client stopped and two TTLs passed: {value}"
            ));
        }
    }
    if let Some(p) = panicked.take() {
        journal.violation(format!("a panic: {p}"));
    }
    let simulated = world.now;
    let trace = world.trace.lines();
    world.trace.enable(false);
    drop(world);
    Report {
        seed,
        config: config.clone(),
        violations: journal.violations(),
        counts: journal.counts(),
        errors: journal.errors(),
        trace,
        simulated,
    }
}

fn start_clients(
    world: &World,
    h: world::HostId,
    config: &Config,
    journal: &Journal,
    stop: &Arc<AtomicBool>,
    running: &Running,
    rng: &mut Rng,
) {
    let client = world.client(h);
    let count = running.host(h);
    let lease = if config.short_ttl_host && h == 0 {
        LeaseConfig {
            ttl: Duration::from_secs(4),
            renew_period: Duration::from_secs(1),
            renew_deadline: Duration::from_secs(3),
            request_timeout: Duration::from_secs(1),
        }
    } else {
        config.lease
    };
    let started = world.host(h).started();
    let host_name = world.host(h).name.clone();
    let clients: Vec<workload::Client> = (0..config.clients_per_host)
        .map(|c| workload::Client {
            name: format!("{host_name}/c{c}"),
            host: h,
            host_started: started,
            locker: Locker::new(NoLocker),
            names: config.names.clone(),
            journal: journal.clone(),
            rng: Rng::new(rng.u64()),
            stop: Arc::clone(stop),
            running: {
                // Counted from now: the wind-down waits for clients that have not run yet.
                count.fetch_add(1, Ordering::SeqCst);
                Arc::clone(&count)
            },
            max_hold: config.max_hold,
            shared: config.shared,
            think: config.think,
        })
        .collect();
    let journal = journal.clone();
    world.spawn(h, async move {
        let target = Target::configmap(api::NAMESPACE, OBJECT);
        match KubernetesLocker::new(client, target, lease) {
            Ok(locker) => {
                let locker = Locker::new(locker);
                for mut c in clients {
                    c.locker = locker.clone();
                    tokio::spawn(c.run());
                }
            }
            Err(e) => {
                journal.violation(format!("cannot make a locker: {e}"));
                count.store(0, Ordering::SeqCst);
            }
        }
    });
}

/// A Go lockgate peer (v0.1.1 or v0.2.0, with an acquirer id or not) on host `h`.
fn start_go(
    world: &World,
    h: world::HostId,
    config: &Config,
    journal: &Journal,
    stop: &Arc<AtomicBool>,
    running: &Running,
    rng: &mut Rng,
) {
    let client = world.client(h);
    let version = if rng.chance(0.5) {
        go::Version::V011
    } else {
        go::Version::V020
    };
    let mut peer = world.enter_host(h, || {
        go::GoPeer::new(version, client, api::NAMESPACE, OBJECT, Rng::new(rng.u64()))
    });
    if version == go::Version::V020 && rng.chance(0.5) {
        peer.acquirer_id = Some(format!("go-acquirer-{h}"));
    }
    let count = running.host(h);
    count.fetch_add(1, Ordering::SeqCst);
    let name = format!("{}/{version:?}", world.host(h).name);
    world.spawn(
        h,
        go::run_client(
            peer,
            name,
            h,
            world.host(h).started(),
            config.names.clone(),
            journal.clone(),
            Arc::clone(stop),
            count,
        ),
    );
}

/// Pauses, suspends, kills (with a new host in its place) and clock steps, at random moments.
fn schedule_host_faults(
    world: &mut World,
    hosts: &[world::HostId],
    config: &Config,
    journal: &Journal,
    stop: &Arc<AtomicBool>,
    running: &Running,
    rng: &mut Rng,
) {
    let end = config.duration.as_millis() as u64;
    let faults = rng.range(1, 5);
    for _ in 0..faults {
        let h = *rng.pick(hosts);
        let at = Duration::from_millis(rng.range(1000, end.max(1001)));
        match rng.range(0, 5) {
            0 => {
                let d = rng.millis(200, 20_000);
                world.at(at, move |w| w.pause(h));
                world.at(at + d, move |w| w.resume(h));
            }
            1 => {
                let d = rng.millis(200, 30_000);
                world.at(at, move |w| w.suspend(h));
                world.at(at + d, move |w| w.resume(h));
            }
            2 => {
                let (journal, stop, running) = (journal.clone(), stop.clone(), running.clone());
                let config = config.clone();
                let mut seed_rng = Rng::new(rng.u64());
                world.at(at, move |w| {
                    if w.hosts[h].rt_alive() {
                        w.kill(h);
                        journal.dead(h);
                        running.forget(h);
                        let n = w.add_host(&format!("{}'", w.hosts[h].name));
                        start_clients(w, n, &config, &journal, &stop, &running, &mut seed_rng);
                    }
                });
            }
            3 => {
                let step = (rng.range(0, 40_000) as i64 - 20_000) * 1_000_000;
                world.at(at, move |w| w.step_clock(h, step));
            }
            _ => {
                let d = rng.millis(1000, 20_000);
                world.at(at, move |w| w.freeze_clock(h, true));
                world.at(at + d, move |w| w.freeze_clock(h, false));
            }
        }
    }
}

/// Restarts, cut watches and compactions at random moments.
fn schedule_server_faults(world: &mut World, config: &Config, rng: &mut Rng) {
    let end = config.duration.as_millis() as u64;
    for _ in 0..rng.range(1, 4) {
        let at = Duration::from_millis(rng.range(1000, end.max(1001)));
        match rng.range(0, 3) {
            0 => {
                let down = rng.millis(100, 5000);
                world.at(at, move |w| w.restart_server(down));
            }
            1 => world.at(at, |w| w.cut_watches()),
            _ => world.at(at, |w| w.compact()),
        }
    }
}

/// A placeholder backend, replaced before the client runs.
#[derive(Debug)]
struct NoLocker;

impl lockgate::backend::Backend for NoLocker {
    fn acquire<'a>(
        &'a self,
        _: &'a lockgate::LockName,
        _: &'a lockgate::AcquireOptions,
    ) -> lockgate::backend::BoxFuture<
        'a,
        Result<Box<dyn lockgate::backend::Lease>, lockgate::AcquireError>,
    > {
        Box::pin(async { Err(lockgate::Error::Unsupported("no locker yet").into()) })
    }

    fn acquire_blocking(
        &self,
        _: &lockgate::LockName,
        _: &lockgate::AcquireOptions,
    ) -> Result<Box<dyn lockgate::backend::Lease>, lockgate::AcquireError> {
        Err(lockgate::Error::Unsupported("no locker yet").into())
    }
}

/// Panics on this thread from now on, for the run's report (the library's tasks run on it;
/// Tokio catches their panics, and a lost task would otherwise go unnoticed).
fn watch_panics() -> PanicWatch {
    use std::sync::Once;
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| {
                p.borrow_mut().get_or_insert_with(|| info.to_string());
            });
            previous(info);
        }));
    });
    PANICS.with(|p| p.borrow_mut().take());
    PanicWatch
}

thread_local! {
    static PANICS: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

struct PanicWatch;

impl PanicWatch {
    fn take(&self) -> Option<String> {
        PANICS.with(|p| p.borrow_mut().take())
    }
}
