//! The simulated world: hosts, each a Tokio runtime of its own with a paused clock; a network
//! between them and the simulated API server; virtual time; faults as schedule choices; and a
//! seeded generator behind every choice, so that a seed replays a run exactly.
//!
//! Time. The world's clock is virtual (`World::now`, from 0). It moves in steps of at most a
//! millisecond: in each step every running host's runtime runs until the step's end (Tokio's
//! paused clock jumps from timer to timer while its tasks are idle), then the network and the
//! server act on what arrived. A host's monotonic clock is its runtime's; a paused host's
//! catches up at once when it resumes (as after SIGSTOP/SIGCONT), a suspended host's does not
//! (as CLOCK_MONOTONIC over a system suspend), while its boot clock counts both. Its wall clock
//! is its boot clock plus an offset that faults step, and may be frozen. The library reads
//! these through its seam (`lockgate::sim::Source`), answered here from a thread-local naming
//! the host whose code runs.
//!
//! Determinism. One thread runs everything; hosts run in a fixed order; every runtime is a
//! current-thread one; the library's randomness comes from each host's seeded generator.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BinaryHeap};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::{mpsc, oneshot};

use super::api::{self, ApiServer, Outcome, WatchId};
use super::rng::Rng;

/// A host's index in the world.
pub type HostId = usize;

/// The world's step: the most any host runs ahead of the network.
pub const TICK: Duration = Duration::from_millis(1);

/// The wall clock of every host at world time 0 (and the server's): 2026-12-01T00:00:00Z.
pub fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_083_200)
}

// ---------------------------------------------------------------------------------------------
// The library's seam.

/// The clock of the host whose code runs now.
#[derive(Clone)]
struct HostClock {
    started: Duration,
    base: tokio::time::Instant,
    suspended: Duration,
    wall_offset: i64,
    frozen: Option<SystemTime>,
    rng: Rc<RefCell<Rng>>,
}

impl HostClock {
    fn boot(&self) -> Duration {
        (tokio::time::Instant::now() - self.base) + self.suspended
    }
}

thread_local! {
    static CURRENT: RefCell<Option<HostClock>> = const { RefCell::new(None) };
    /// The boot clock to answer instead of the current host's (the checker looking at another
    /// host's lease at this instant).
    static BOOT_OVERRIDE: Cell<Option<Duration>> = const { Cell::new(None) };
}

struct SimSource;

impl lockgate::sim::Source for SimSource {
    fn boot(&self) -> Option<Duration> {
        if let Some(b) = BOOT_OVERRIDE.with(Cell::get) {
            return Some(b);
        }
        CURRENT.with(|c| c.borrow().as_ref().map(HostClock::boot))
    }

    fn wall(&self) -> Option<SystemTime> {
        CURRENT.with(|c| {
            c.borrow().as_ref().map(|h| {
                h.frozen.unwrap_or_else(|| {
                    let t = epoch() + h.started + h.boot();
                    shift(t, h.wall_offset)
                })
            })
        })
    }

    fn random(&self) -> Option<u128> {
        CURRENT.with(|c| c.borrow().as_ref().map(|h| h.rng.borrow_mut().u128()))
    }
}

fn shift(t: SystemTime, nanos: i64) -> SystemTime {
    if nanos >= 0 {
        t + Duration::from_nanos(nanos.unsigned_abs())
    } else {
        t - Duration::from_nanos(nanos.unsigned_abs())
    }
}

/// Installs the simulator's clock source (once per process; harmless to call again).
pub fn install() {
    static SOURCE: SimSource = SimSource;
    lockgate::sim::install(&SOURCE);
}

/// The running host's wall clock (`None` outside a host).
pub fn host_wall() -> Option<SystemTime> {
    lockgate::sim::Source::wall(&SimSource)
}

/// World time now as the running host sees it (`None` outside a host).
pub fn host_now() -> Option<Duration> {
    CURRENT.with(|c| c.borrow().as_ref().map(|h| h.started + h.boot()))
}

/// Runs `f` as if on the boot clock of a host started at `started`, at world time `at`.
pub fn as_host_at<T>(started: Duration, at: Duration, f: impl FnOnce() -> T) -> T {
    let old = BOOT_OVERRIDE.with(|o| o.replace(Some(at.saturating_sub(started))));
    let out = f();
    BOOT_OVERRIDE.with(|o| o.set(old));
    out
}

// ---------------------------------------------------------------------------------------------
// Bodies and the kube client's transport.

/// A response body fed by the world.
pub struct ChanBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

type Reply = Result<http::Response<ChanBody>, std::io::Error>;

/// A request on its way.
pub struct Msg {
    pub host: HostId,
    /// When it was sent (world time).
    pub sent: Duration,
    pub seq: u64,
    pub req: api::Request,
    reply: oneshot::Sender<Reply>,
}

/// Requests sent by hosts since the world last looked.
#[derive(Default)]
struct Outbox {
    msgs: Vec<Msg>,
    seq: u64,
}

/// The kube client's transport for one host: requests go into the world's network.
#[derive(Clone)]
pub struct SimService {
    host: HostId,
    outbox: Arc<Mutex<Outbox>>,
}

impl tower::Service<http::Request<kube::client::Body>> for SimService {
    type Response = http::Response<ChanBody>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let (host, outbox) = (self.host, Arc::clone(&self.outbox));
        Box::pin(async move {
            use http_body_util::BodyExt;
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?
                .to_bytes()
                .to_vec();
            let (tx, rx) = oneshot::channel();
            let sent = host_now().unwrap_or_default();
            {
                let mut o = outbox.lock().unwrap();
                o.seq += 1;
                let seq = o.seq;
                o.msgs.push(Msg {
                    host,
                    sent,
                    seq,
                    req: api::Request::from_parts(&parts, body),
                    reply: tx,
                });
            }
            match rx.await {
                Ok(reply) => reply,
                // The reply was lost: nothing ever comes (the caller's timeout ends it).
                Err(_) => std::future::pending().await,
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Faults and plans.

/// What the network and the server do with one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Latency to the server.
    pub there: Duration,
    /// Held back until the sending host's next read has been handled (or `hold_max`), then
    /// handled: a write that lands after the client's next read.
    pub hold: bool,
    pub before: Before,
    pub after: After,
}

/// What happens before the server handles a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Before {
    /// It is handled.
    Handle,
    /// It is lost on the way: never handled, never answered.
    Drop,
    /// Refused with this status before it is handled (429, 500, 503).
    Refuse(u16),
}

/// What happens to the answer.
#[derive(Debug, Clone, PartialEq)]
pub enum After {
    /// Delivered after this latency.
    Deliver(Duration),
    /// Lost: never delivered.
    Lose,
    /// Replaced by this status (the request was handled): a proxy's 502/503/504, an API
    /// server's 500 after an etcd commit it could not confirm.
    Status(u16, Duration),
    /// The connection breaks after this latency (an I/O error).
    Reset(Duration),
}

impl Plan {
    /// Delivered both ways with these latencies, nothing else.
    pub fn clean(there: Duration, back: Duration) -> Self {
        Self {
            there,
            hold: false,
            before: Before::Handle,
            after: After::Deliver(back),
        }
    }
}

/// What a policy may look at to plan a request.
#[derive(Debug)]
pub struct RequestView<'a> {
    pub host: HostId,
    pub seq: u64,
    /// When it was sent (world time).
    pub sent: Duration,
    pub req: &'a api::Request,
}

/// Chooses plans. The random policy is the search's; tests script their own.
pub trait Policy {
    fn plan(&mut self, rng: &mut Rng, view: &RequestView<'_>) -> Plan;
}

/// Probabilities of network faults, per request.
#[derive(Debug, Clone)]
pub struct NetFaults {
    pub drop: f64,
    pub lose_reply: f64,
    pub hold: f64,
    pub refuse: f64,
    pub error_after: f64,
    pub reset: f64,
    pub slow: f64,
}

impl NetFaults {
    pub fn none() -> Self {
        Self {
            drop: 0.0,
            lose_reply: 0.0,
            hold: 0.0,
            refuse: 0.0,
            error_after: 0.0,
            reset: 0.0,
            slow: 0.0,
        }
    }

    pub fn some() -> Self {
        Self::scaled(1.0)
    }

    /// Each kind of fault at a probability of its own, from none to a write in three: some
    /// schedules have one kind of fault in plenty and no other (a held write that lands after
    /// a clean re-read, say), others a mix.
    pub fn random(rng: &mut Rng) -> Self {
        let mut p = || *rng.pick(&[0.0, 0.0, 0.0, 0.005, 0.02, 0.1, 0.3]);
        Self {
            drop: p(),
            lose_reply: p(),
            hold: p(),
            refuse: p(),
            error_after: p(),
            reset: p(),
            slow: p(),
        }
    }

    /// [`some`](Self::some)'s probabilities times `k` (at most 1).
    pub fn scaled(k: f64) -> Self {
        let p = |x: f64| (x * k).min(1.0);
        Self {
            drop: p(0.01),
            lose_reply: p(0.01),
            hold: p(0.01),
            refuse: p(0.01),
            error_after: p(0.01),
            reset: p(0.005),
            slow: p(0.02),
        }
    }
}

/// Random latencies of 1–4 ms each way, and `faults` (for hosts not in `spared`).
pub struct RandomPolicy {
    pub faults: NetFaults,
    /// Hosts whose requests meet no fault (Go peers, which have no request timeouts: a lost
    /// answer would hang them for good).
    pub spared: Arc<Mutex<std::collections::BTreeSet<HostId>>>,
}

impl RandomPolicy {
    pub fn new(faults: NetFaults) -> Self {
        Self {
            faults,
            spared: Arc::default(),
        }
    }
}

impl Policy for RandomPolicy {
    fn plan(&mut self, rng: &mut Rng, view: &RequestView<'_>) -> Plan {
        let f = &self.faults;
        let lat = |rng: &mut Rng| Duration::from_millis(rng.range(1, 5));
        let mut plan = Plan::clean(lat(rng), lat(rng));
        if view.req.is_watch() || self.spared.lock().unwrap().contains(&view.host) {
            return plan;
        }
        if rng.chance(f.slow) {
            plan.there += Duration::from_millis(rng.range(10, 3000));
        }
        if rng.chance(f.drop) {
            plan.before = Before::Drop;
        } else if rng.chance(f.refuse) {
            plan.before = Before::Refuse(*rng.pick(&[429, 500, 503]));
        } else if view.req.is_write() && rng.chance(f.hold) {
            plan.hold = true;
        }
        if rng.chance(f.lose_reply) {
            plan.after = After::Lose;
        } else if rng.chance(f.error_after) {
            plan.after = After::Status(*rng.pick(&[500, 502, 503, 504]), lat(rng));
        } else if rng.chance(f.reset) {
            plan.after = After::Reset(lat(rng));
        } else if rng.chance(f.slow) {
            plan.after = After::Deliver(Duration::from_millis(rng.range(10, 3000)));
        }
        plan
    }
}

// ---------------------------------------------------------------------------------------------
// Hosts.

/// What a host is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HostState {
    Running,
    /// Stopped (SIGSTOP): nothing of it runs; its clocks run on.
    Paused {
        since: Duration,
    },
    /// The machine sleeps: nothing runs, its monotonic clock stops, its boot clock does not.
    Suspended {
        since: Duration,
    },
    Dead,
}

/// A simulated machine with one process.
pub struct Host {
    pub name: String,
    rt: Option<tokio::runtime::Runtime>,
    clock: HostClock,
    /// How far its monotonic clock has run.
    mono: Duration,
    pub state: HostState,
}

impl Host {
    fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        let old = CURRENT.with(|c| c.replace(Some(self.clock.clone())));
        let out = f();
        CURRENT.with(|c| *c.borrow_mut() = old);
        out
    }

    /// When the host started (world time).
    pub fn started(&self) -> Duration {
        self.clock.started
    }

    /// True until the host is killed.
    pub fn rt_alive(&self) -> bool {
        self.rt.is_some()
    }
}

// ---------------------------------------------------------------------------------------------
// The world.

enum Ev {
    Arrive(Msg, Plan),
    Reply(oneshot::Sender<Reply>, Reply),
    Chunk(WatchId, Bytes),
    Bookmarks,
    Call(Box<dyn FnOnce(&mut World)>),
}

struct Scheduled {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // The earliest first, in a max-heap.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// The simulated object's annotations after each write, by resourceVersion.
pub struct Snapshots<'a>(&'a BTreeMap<u64, BTreeMap<String, String>>);

impl Snapshots<'_> {
    /// The value of annotation `key` as the write of `rv` (or the last write before it) left it.
    pub fn at(&self, rv: u64, key: &str) -> Option<&str> {
        self.0
            .range(..=rv)
            .next_back()
            .and_then(|(_, a)| a.get(key))
            .map(String::as_str)
    }
}

/// A watch stream to a host.
struct Stream {
    host: HostId,
    tx: mpsc::UnboundedSender<Bytes>,
    /// When its last chunk is due (chunks keep their order).
    last: Duration,
}

/// A request held back until its host's next request was handled.
struct Held {
    msg: Msg,
    plan: Plan,
    until: Duration,
}

/// The whole simulation.
pub struct World {
    pub now: Duration,
    pub rng: Rng,
    pub server: ApiServer,
    /// The server's wall clock offset from the world's (nanoseconds).
    pub server_offset: i64,
    /// While set, the server is down: requests arriving are refused (connection reset).
    pub server_down_until: Option<Duration>,
    pub hosts: Vec<Host>,
    policy: Box<dyn Policy>,
    events: BinaryHeap<Scheduled>,
    seq: u64,
    outbox: Arc<Mutex<Outbox>>,
    streams: BTreeMap<WatchId, Stream>,
    held: Vec<Held>,
    /// Reply senders of requests or answers lost on the way: kept, so that their callers wait
    /// (for their own timeouts) instead of seeing the channel close.
    parked: Vec<oneshot::Sender<Reply>>,
    /// When each resourceVersion was written (world time).
    written: BTreeMap<u64, Duration>,
    /// The simulated object's annotations as each write left them, by resourceVersion.
    snapshots: BTreeMap<u64, BTreeMap<String, String>>,
    /// Called after every write with the world time, the new annotations and the snapshots.
    #[allow(clippy::type_complexity)]
    observer: Option<Box<dyn FnMut(Duration, &BTreeMap<String, String>, &Snapshots)>>,
    /// Longest a held request is held.
    pub hold_max: Duration,
    pub trace: Trace,
    seed: u64,
}

/// What happened, for people, in order: kept per thread (a run is one thread), so that the
/// world and the clients' journal write one trace.
#[derive(Default)]
pub struct Trace;

thread_local! {
    static TRACE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

impl Trace {
    /// Starts (or stops) recording on this thread, dropping what was recorded.
    pub fn enable(&mut self, on: bool) {
        TRACE.with(|t| *t.borrow_mut() = on.then(Vec::new));
    }

    pub fn line(&mut self, at: Duration, s: impl FnOnce() -> String) {
        trace_line(at, s);
    }

    /// What was recorded.
    pub fn lines(&self) -> Vec<String> {
        TRACE.with(|t| t.borrow().clone().unwrap_or_default())
    }
}

/// A line of the trace, at world time `at`, when recording.
pub fn trace_line(at: Duration, s: impl FnOnce() -> String) {
    TRACE.with(|t| {
        if let Some(lines) = t.borrow_mut().as_mut() {
            lines.push(format!("{:>10.3} {}", at.as_secs_f64(), s()));
        }
    });
}

impl World {
    pub fn new(seed: u64, policy: Box<dyn Policy>) -> Self {
        install();
        Trace.enable(false);
        let mut w = Self {
            now: Duration::ZERO,
            rng: Rng::new(seed),
            server: ApiServer::new(),
            server_offset: 0,
            server_down_until: None,
            hosts: Vec::new(),
            policy,
            events: BinaryHeap::new(),
            seq: 0,
            outbox: Arc::default(),
            streams: BTreeMap::new(),
            held: Vec::new(),
            hold_max: Duration::from_secs(10),
            trace: Trace,
            seed,
            parked: Vec::new(),
            written: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            observer: None,
        };
        w.schedule(Duration::from_secs(1), Ev::Bookmarks);
        w
    }

    /// Replaces the network's policy.
    pub fn set_policy(&mut self, policy: Box<dyn Policy>) {
        self.policy = policy;
    }

    /// A new host, started now.
    pub fn add_host(&mut self, name: &str) -> HostId {
        let id = self.hosts.len();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime");
        let base = rt.block_on(async { tokio::time::Instant::now() });
        let clock = HostClock {
            started: self.now,
            base,
            suspended: Duration::ZERO,
            wall_offset: 0,
            frozen: None,
            rng: Rc::new(RefCell::new(Rng::new(
                self.seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ))),
        };
        self.hosts.push(Host {
            name: name.to_owned(),
            rt: Some(rt),
            clock,
            mono: Duration::ZERO,
            state: HostState::Running,
        });
        self.trace.line(self.now, || format!("{name}: started"));
        id
    }

    /// A kube client of host `h`, through the simulated network (made on the host's runtime).
    pub fn client(&self, h: HostId) -> kube::Client {
        let svc = SimService {
            host: h,
            outbox: Arc::clone(&self.outbox),
        };
        let host = &self.hosts[h];
        host.enter(|| {
            let rt = host.rt.as_ref().expect("a live host");
            let _g = rt.enter();
            kube::Client::new(svc, api::NAMESPACE)
        })
    }

    /// Runs `f` as host `h`, inside its runtime (to make what must be made there).
    pub fn enter_host<T>(&self, h: HostId, f: impl FnOnce() -> T) -> T {
        let host = &self.hosts[h];
        host.enter(|| {
            let rt = host.rt.as_ref().expect("a live host");
            let _g = rt.enter();
            f()
        })
    }

    /// Spawns `fut` on host `h` (it runs when the host runs).
    pub fn spawn<F>(&self, h: HostId, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if let Some(rt) = &self.hosts[h].rt {
            rt.spawn(fut);
        }
    }

    /// Schedules `f` at world time `at`.
    pub fn at(&mut self, at: Duration, f: impl FnOnce(&mut World) + 'static) {
        self.schedule(at, Ev::Call(Box::new(f)));
    }

    fn schedule(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.events.push(Scheduled {
            at: at.max(self.now),
            seq: self.seq,
            ev,
        });
    }

    /// Calls `f` after every write of the simulated object.
    pub fn observe(
        &mut self,
        f: impl FnMut(Duration, &BTreeMap<String, String>, &Snapshots) + 'static,
    ) {
        self.observer = Some(Box::new(f));
    }

    /// When the write of resourceVersion `rv` was applied (world time).
    pub fn written_at(&self, rv: u64) -> Option<Duration> {
        self.written.get(&rv).copied()
    }

    /// The server's wall clock now.
    pub fn server_wall(&self) -> SystemTime {
        shift(epoch() + self.now, self.server_offset)
    }

    /// Runs until world time `end`.
    pub fn run_until(&mut self, end: Duration) {
        while self.now < end {
            self.step(end);
        }
    }

    /// Runs for `d`.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(end);
    }

    fn step(&mut self, end: Duration) {
        let next = self.events.peek().map_or(Duration::MAX, |e| e.at);
        let target = (self.now + TICK).min(next.max(self.now)).min(end);
        for h in 0..self.hosts.len() {
            self.run_host(h, target);
        }
        self.now = target;
        self.collect();
        while self.events.peek().is_some_and(|e| e.at <= self.now) {
            let Scheduled { ev, .. } = self.events.pop().expect("peeked");
            self.handle(ev);
        }
    }

    fn run_host(&mut self, h: HostId, target: Duration) {
        let host = &mut self.hosts[h];
        if host.state != HostState::Running {
            return;
        }
        let Some(rt) = host.rt.as_ref() else { return };
        let mono_target = target
            .saturating_sub(host.clock.started)
            .saturating_sub(host.clock.suspended);
        if mono_target < host.mono {
            return;
        }
        let until = host.clock.base + mono_target;
        let old = CURRENT.with(|c| c.replace(Some(host.clock.clone())));
        let started = std::time::Instant::now();
        rt.block_on(async move {
            tokio::time::sleep_until(until).await;
        });
        let spent = started.elapsed();
        CURRENT.with(|c| *c.borrow_mut() = old);
        host.mono = mono_target;
        if spent > Duration::from_secs(20) {
            panic!(
                "host {} ran {spent:?} of real time for one step at {:?}: a busy loop (seed {})",
                host.name, self.now, self.seed
            );
        }
    }

    /// Takes the requests hosts sent and sends them on their way.
    fn collect(&mut self) {
        let msgs = std::mem::take(&mut self.outbox.lock().unwrap().msgs);
        for msg in msgs {
            let view = RequestView {
                host: msg.host,
                seq: msg.seq,
                sent: msg.sent,
                req: &msg.req,
            };
            let plan = self.policy.plan(&mut self.rng, &view);
            let name = &self.hosts[msg.host].name;
            self.trace.line(msg.sent, || {
                format!(
                    "{name}: sends #{} {} {}{}",
                    msg.seq,
                    msg.req.method,
                    short(&msg.req),
                    plan_note(&plan)
                )
            });
            let at = msg.sent + plan.there;
            match plan.before {
                Before::Drop => {
                    self.trace
                        .line(at, || format!("#{} lost on the way", msg.seq));
                    // The reply sender is dropped: the client waits for its timeout.
                    self.park(msg.reply);
                }
                _ => self.schedule(at, Ev::Arrive(msg, plan)),
            }
        }
    }

    /// Keeps a reply sender that will never be used, so that the caller hangs (a lost packet)
    /// rather than seeing the channel close.
    fn park(&mut self, reply: oneshot::Sender<Reply>) {
        self.parked.push(reply);
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive(msg, plan) => self.arrive(msg, plan),
            Ev::Reply(tx, reply) => {
                let _ = tx.send(reply);
            }
            Ev::Chunk(id, bytes) => {
                if let Some(s) = self.streams.get(&id) {
                    if s.tx.send(bytes).is_err() {
                        self.streams.remove(&id);
                        self.server.close_watch(id);
                    }
                }
            }
            Ev::Bookmarks => {
                let ids: Vec<WatchId> = self.streams.keys().copied().collect();
                for id in ids {
                    if let Some(b) = self.server.bookmark(id) {
                        self.send_chunk(id, b);
                    }
                }
                self.schedule(self.now + Duration::from_secs(5), Ev::Bookmarks);
            }
            Ev::Call(f) => f(self),
        }
    }

    fn arrive(&mut self, msg: Msg, plan: Plan) {
        if plan.hold {
            let until = self.now + self.hold_max;
            self.trace
                .line(self.now, || format!("#{} held back", msg.seq));
            let mut plan = plan;
            plan.hold = false;
            self.held.push(Held { msg, plan, until });
            let at = until;
            self.at(at, |w| w.release_held_due());
            return;
        }
        let host = msg.host;
        let seq = msg.seq;
        let read = msg.req.method == http::Method::GET && !msg.req.is_watch();
        self.serve(msg, plan);
        // Writes of this host held back before this read land now, after it: a write that
        // lands after its client's next read (a stalled commit, a webhook, a proxy).
        if !read {
            return;
        }
        let (now, mut later) = (self.now, Vec::new());
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].msg.host == host && self.held[i].msg.seq < seq {
                later.push(self.held.remove(i));
            } else {
                i += 1;
            }
        }
        for h in later {
            self.trace
                .line(now, || format!("#{} lands late, after #{seq}", h.msg.seq));
            self.serve(h.msg, h.plan);
        }
    }

    fn release_held_due(&mut self) {
        let now = self.now;
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].until <= now {
                due.push(self.held.remove(i));
            } else {
                i += 1;
            }
        }
        for h in due {
            self.trace
                .line(now, || format!("#{} lands late", h.msg.seq));
            self.serve(h.msg, h.plan);
        }
    }

    /// The server handles `msg` now, and its answer goes back as `plan` says.
    fn serve(&mut self, msg: Msg, plan: Plan) {
        let Msg {
            host,
            seq,
            req,
            reply,
            ..
        } = msg;
        if self.server_down_until.is_some_and(|t| t > self.now) {
            self.trace
                .line(self.now, || format!("#{seq} refused: the server is down"));
            let at = self.now + Duration::from_millis(1);
            self.schedule(
                at,
                Ev::Reply(reply, Err(std::io::ErrorKind::ConnectionReset.into())),
            );
            return;
        }
        let date = httpdate::fmt_http_date(self.server_wall());
        let answer = match plan.before {
            Before::Refuse(code) => {
                self.trace
                    .line(self.now, || format!("#{seq} refused with {code}"));
                Outcome::Done(api::status(
                    code,
                    "TooManyRequests",
                    "refused before handling",
                    None,
                ))
            }
            _ => self.server.handle(&req),
        };
        let (status, chunks, watch) = match answer {
            Outcome::Done(r) => (r.status, vec![r.body], None),
            Outcome::Watch { chunks, watch } => (200, chunks, watch),
        };
        if req.is_write() || status != 200 {
            let rv = self.server.revision();
            let what = if status == 200 {
                String::new()
            } else {
                let body =
                    String::from_utf8_lossy(chunks.first().map(Vec::as_slice).unwrap_or_default());
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                format!(
                    "{} {}",
                    v["reason"].as_str().unwrap_or(""),
                    v["message"].as_str().map(excerpt).unwrap_or_default()
                )
            };
            self.trace.line(self.now, || {
                format!("#{seq} handled: {status} (revision {rv}) {what}")
            });
        }
        let rv = self.server.revision();
        if let std::collections::btree_map::Entry::Vacant(e) = self.written.entry(rv) {
            e.insert(self.now);
            let now = self.server.annotations(super::OBJECT).unwrap_or_default();
            self.snapshots.insert(rv, now.clone());
            if let Some(observe) = self.observer.as_mut() {
                observe(self.now, &now, &Snapshots(&self.snapshots));
            }
        }
        // Live watches learn of a write now.
        for (id, bytes) in self.server.take_pending() {
            self.send_chunk(id, bytes);
        }
        let (status, delay) = match plan.after {
            After::Deliver(d) => (status, d),
            After::Lose => {
                self.trace.line(self.now, || format!("#{seq} answer lost"));
                if let Some(id) = watch {
                    self.server.close_watch(id);
                }
                self.park(reply);
                return;
            }
            After::Status(code, d) => {
                self.trace
                    .line(self.now, || format!("#{seq} answered {code} instead"));
                if let Some(id) = watch {
                    self.server.close_watch(id);
                }
                let body = api::status(
                    code,
                    "InternalError",
                    "answered in place of the server",
                    None,
                )
                .body;
                let resp = response(code, &date, vec![body], None);
                self.schedule(self.now + d, Ev::Reply(reply, Ok(resp.0)));
                return;
            }
            After::Reset(d) => {
                self.trace
                    .line(self.now, || format!("#{seq} connection reset"));
                if let Some(id) = watch {
                    self.server.close_watch(id);
                }
                self.schedule(
                    self.now + d,
                    Ev::Reply(reply, Err(std::io::ErrorKind::ConnectionReset.into())),
                );
                return;
            }
        };
        let at = self.now + delay;
        let (resp, tx) = response(status, &date, chunks, watch);
        if let (Some(id), Some(tx)) = (watch, tx) {
            self.streams.insert(id, Stream { host, tx, last: at });
        }
        self.schedule(at, Ev::Reply(reply, Ok(resp)));
    }

    fn send_chunk(&mut self, id: WatchId, bytes: Vec<u8>) {
        let lat = Duration::from_millis(self.rng.range(1, 5));
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let at = (self.now + lat).max(s.last);
        s.last = at;
        self.schedule(at, Ev::Chunk(id, Bytes::from(bytes)));
    }

    // -----------------------------------------------------------------------------------------
    // Faults.

    /// Stops host `h` (SIGSTOP).
    pub fn pause(&mut self, h: HostId) {
        if self.hosts[h].state == HostState::Running {
            self.hosts[h].state = HostState::Paused { since: self.now };
            let name = self.hosts[h].name.clone();
            self.trace.line(self.now, || format!("{name}: paused"));
        }
    }

    /// Suspends host `h`'s machine: its monotonic clock stops.
    pub fn suspend(&mut self, h: HostId) {
        if self.hosts[h].state == HostState::Running {
            self.hosts[h].state = HostState::Suspended { since: self.now };
            let name = self.hosts[h].name.clone();
            self.trace.line(self.now, || format!("{name}: suspended"));
        }
    }

    /// Resumes a paused or suspended host.
    pub fn resume(&mut self, h: HostId) {
        let now = self.now;
        let host = &mut self.hosts[h];
        match host.state {
            HostState::Paused { .. } => {
                // Its clock jumps to now at once: every timer that came due fires now.
                let mono_target = now
                    .saturating_sub(host.clock.started)
                    .saturating_sub(host.clock.suspended);
                let gap = mono_target.saturating_sub(host.mono);
                if let Some(rt) = &host.rt {
                    let old = CURRENT.with(|c| c.replace(Some(host.clock.clone())));
                    rt.block_on(tokio::time::advance(gap));
                    CURRENT.with(|c| *c.borrow_mut() = old);
                }
                host.mono = mono_target;
            }
            HostState::Suspended { since } => {
                host.clock.suspended += now - since;
            }
            _ => return,
        }
        host.state = HostState::Running;
        let name = host.name.clone();
        self.trace.line(now, || format!("{name}: resumed"));
    }

    /// Kills host `h`'s process (SIGKILL): its tasks are gone, what it wrote stays.
    pub fn kill(&mut self, h: HostId) {
        let host = &mut self.hosts[h];
        if let Some(rt) = host.rt.take() {
            let clock = host.clock.clone();
            let old = CURRENT.with(|c| c.replace(Some(clock)));
            rt.shutdown_background();
            CURRENT.with(|c| *c.borrow_mut() = old);
        }
        host.state = HostState::Dead;
        let ids: Vec<WatchId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.host == h)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.streams.remove(&id);
            self.server.close_watch(id);
        }
        let name = host.name.clone();
        self.trace.line(self.now, || format!("{name}: killed"));
    }

    /// Steps host `h`'s wall clock by `nanos` (negative: back).
    pub fn step_clock(&mut self, h: HostId, nanos: i64) {
        let host = &mut self.hosts[h];
        host.clock.wall_offset = host.clock.wall_offset.saturating_add(nanos);
        let name = host.name.clone();
        self.trace.line(self.now, || {
            format!("{name}: wall clock stepped by {:.3} s", nanos as f64 / 1e9)
        });
    }

    /// Freezes (or thaws) host `h`'s wall clock.
    pub fn freeze_clock(&mut self, h: HostId, frozen: bool) {
        let now_wall = shift(epoch() + self.now, self.hosts[h].clock.wall_offset);
        self.hosts[h].clock.frozen = frozen.then_some(now_wall);
    }

    /// The API server restarts: every watch ends, and it answers nothing for `down`.
    pub fn restart_server(&mut self, down: Duration) {
        for id in self.server.close_watches() {
            self.streams.remove(&id);
        }
        self.server_down_until = Some(self.now + down);
        self.trace.line(self.now, || {
            format!("server: restarting, down for {down:?}")
        });
    }

    /// Every watch stream ends (a proxy timeout, the server's own limit).
    pub fn cut_watches(&mut self) {
        for id in self.server.close_watches() {
            self.streams.remove(&id);
        }
        self.trace.line(self.now, || "server: watches cut".into());
    }

    /// etcd compacts: watches resuming from before now get 410 Gone.
    pub fn compact(&mut self) {
        self.server.compact();
        self.cut_watches();
        self.trace.line(self.now, || "server: compacted".into());
    }

    /// World time as seen at this instant by host `h` (its boot clock's origin is its start).
    pub fn host(&self, h: HostId) -> &Host {
        &self.hosts[h]
    }

    /// Runs `f` as host `h` at this world instant (its boot clock answers for now).
    pub fn as_host<T>(&self, h: HostId, f: impl FnOnce() -> T) -> T {
        as_host_at(self.hosts[h].clock.started, self.now, f)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Runtimes are dropped with their host's clock current (tasks' drops may read it).
        for h in 0..self.hosts.len() {
            if self.hosts[h].rt.is_some() {
                self.kill(h);
            }
        }
    }
}

fn response(
    status: u16,
    date: &str,
    chunks: Vec<Vec<u8>>,
    watch: Option<WatchId>,
) -> (
    http::Response<ChanBody>,
    Option<mpsc::UnboundedSender<Bytes>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    for c in chunks {
        let _ = tx.send(Bytes::from(c));
    }
    let resp = http::Response::builder()
        .status(status)
        .header(http::header::DATE, date)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(ChanBody { rx })
        .expect("a response");
    (resp, watch.map(|_| tx))
}

fn short(req: &api::Request) -> String {
    let path = req.path.rsplit('/').next().unwrap_or_default().to_owned();
    if req.is_watch() {
        return format!(
            "{path} watch from {}",
            req.query.get("resourceVersion").map_or("-", String::as_str)
        );
    }
    if req.method == http::Method::PATCH {
        return format!("{path} {}", describe_patch(&req.body));
    }
    path
}

/// A JSON Patch of lock records, for people: `if lock-0 = {…} then lock-0 := {…}`.
pub fn describe_patch(body: &[u8]) -> String {
    let Ok(serde_json::Value::Array(ops)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return excerpt(&String::from_utf8_lossy(body));
    };
    let mut parts = Vec::new();
    for op in ops {
        let path = op["path"].as_str().unwrap_or("");
        let key = path.rsplit('/').next().unwrap_or("");
        let value = match &op["value"] {
            serde_json::Value::String(v) => describe_record(v),
            serde_json::Value::Null => "none".to_owned(),
            v => v.to_string(),
        };
        match op["op"].as_str().unwrap_or("") {
            "test" => parts.push(format!("if {} = {value}", short_key(key))),
            "add" => parts.push(format!("then := {value}")),
            "remove" => parts.push("then remove".to_owned()),
            other => parts.push(format!("{other} {key}")),
        }
    }
    parts.join(" ")
}

fn short_key(key: &str) -> String {
    key.trim_start_matches("lockgate.io~1")
        .chars()
        .take(6)
        .collect()
}

/// A lock record, for people: `lock-0 X n=1 u=3f1c r=7 exp=…11 q=[…] h=[…]`.
pub fn describe_record(v: &str) -> String {
    let Ok(r) = serde_json::from_str::<serde_json::Value>(v) else {
        return excerpt(v);
    };
    let tail = |s: &str| {
        s.chars()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<String>()
    };
    let queue: Vec<String> = r["QueueMembers"]
        .as_object()
        .map(|q| q.keys().map(|k| tail(k)).collect())
        .unwrap_or_default();
    let holders: Vec<String> = r["Holders"]
        .as_object()
        .map(|q| q.keys().map(|k| tail(k)).collect())
        .unwrap_or_default();
    format!(
        "{{{} {} n={} u={} r={} exp={} q={queue:?} h={holders:?}}}",
        r["lockName"].as_str().unwrap_or("?"),
        if r["IsShared"].as_bool().unwrap_or(false) {
            "S"
        } else {
            "X"
        },
        r["SharedHoldersCount"],
        r["uuid"]
            .as_str()
            .map(|u| u.chars().take(4).collect::<String>())
            .unwrap_or_default(),
        r["Renewals"]
            .as_u64()
            .map_or("-".to_owned(), |n| (n % 1000).to_string()),
        r["ExpireAtTimestamp"].as_i64().map_or(0, |e| e % 1000),
    )
}

fn excerpt(s: &str) -> String {
    const MAX: usize = 400;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn plan_note(p: &Plan) -> String {
    let mut notes = Vec::new();
    if p.hold {
        notes.push("hold".to_owned());
    }
    match &p.before {
        Before::Handle => {}
        Before::Drop => notes.push("drop".into()),
        Before::Refuse(c) => notes.push(format!("refuse {c}")),
    }
    match &p.after {
        After::Deliver(d) if *d > Duration::from_millis(10) => {
            notes.push(format!("slow answer {d:?}"))
        }
        After::Deliver(_) => {}
        After::Lose => notes.push("lose answer".into()),
        After::Status(c, _) => notes.push(format!("answer {c}")),
        After::Reset(_) => notes.push("reset".into()),
    }
    if p.there > Duration::from_millis(10) {
        notes.push(format!("slow {:?}", p.there));
    }
    if notes.is_empty() {
        String::new()
    } else {
        format!(" [{}]", notes.join(", "))
    }
}
