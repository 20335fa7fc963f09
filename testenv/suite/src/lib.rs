//! Helpers for tests that run against the real test environment started by `testenv/kube up`.
//!
//! Every helper fails loudly when the environment is missing: these tests are never skipped.
//!
//! # No test hangs
//!
//! - Every line read from a child ([`expect_line`], [`expect_line_within`],
//!   [`expect_stderr_line`]) has a deadline and panics with what it read so far.
//! - Children spawned through [`Proc`] (what [`hold`] returns) are killed when dropped, so a
//!   panicking test leaves no process behind.
//! - Every test has a time limit: [`time_limit`] sets it; a test that sets none gets
//!   [`DEFAULT_TIME_LIMIT`] from its first call of [`required_env`] (which every helper that
//!   touches the environment makes). A test over its limit ends the whole test binary with a
//!   message naming it, after killing every [`Proc`]: a failure, never a hang.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod audit;
pub mod process;
pub mod proxy;
pub mod raw_http;

/// An environment variable the test command sets, or a panic that says how to set it.
pub fn required_env(key: &str) -> String {
    arm_default_time_limit();
    std::env::var(key).unwrap_or_else(|_| {
        panic!(
            "{key} is not set: these tests need the real test environment. Run the README's test \
             command (scripts/test), or `testenv/kube up` and `source target/testenv/env.sh`."
        )
    })
}

/// An error Go lockgate v0.2 reports when a record's uuid changed between its two reads, or the
/// record vanished: "lock already leased", "no existing lock lease found". Go's own race on a
/// busy object, also set off by a Rust take-over of an expired record (PROTOCOL.md, "Go v0.2
/// peers"): an error Go's callers retry, never an overlap. Tests count these apart.
pub fn is_go_v02_race(error: &str) -> bool {
    error.ends_with(": lock already leased") || error.ends_with(": no existing lock lease found")
}

/// The Go lockgate peer binary built with lockgate v0.2.0 (what werf v2 requires).
pub fn go_peer() -> PathBuf {
    peer("LOCKGATE_TEST_GO_PEER")
}

/// The Go lockgate peer binary built with lockgate v0.1.1 (what older werf and nelm pin).
pub fn go_peer_v01() -> PathBuf {
    peer("LOCKGATE_TEST_GO_PEER_V01")
}

fn peer(key: &str) -> PathBuf {
    let p = PathBuf::from(required_env(key));
    assert!(
        p.exists(),
        "the Go peer {p:?} is missing: run testenv/build.sh lockgate-go"
    );
    p
}

/// A kube client for the admin or the limited user.
pub async fn client(limited: bool) -> kube::Client {
    let key = if limited {
        "LOCKGATE_TEST_LIMITED_KUBECONFIG"
    } else {
        "LOCKGATE_TEST_KUBECONFIG"
    };
    client_for(std::path::Path::new(&required_env(key))).await
}

/// A kube client configured from the kubeconfig at `path`.
pub async fn client_for(path: &std::path::Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    lockgate::kubernetes::client_from_config(config, Duration::from_secs(10)).expect("kube client")
}

/// A name no other test run has used (there is no garbage collector in the environment).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{:x}-{}-{}",
        nanos & 0xffff_ffff,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The Rust `lockgate` binary of this workspace (built by the test command before the tests).
pub fn rust_cli() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test binary> -> target/<profile>/lockgate
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("lockgate");
    assert!(
        p.exists(),
        "{p:?} is missing: run `cargo build --workspace` first (the test command does)"
    );
    p
}

// ---------------------------------------------------------------------------------------------
// Time limits

/// The time limit of a test that sets none with [`time_limit`].
pub const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(600);

struct Limit {
    test: String,
    limit: Duration,
    deadline: Instant,
}

fn limits() -> &'static Mutex<HashMap<u64, Limit>> {
    static LIMITS: OnceLock<Mutex<HashMap<u64, Limit>>> = OnceLock::new();
    LIMITS.get_or_init(|| {
        std::thread::Builder::new()
            .name("lockgate-testenv-time-limits".into())
            .spawn(watchdog)
            .expect("start the time-limit watchdog");
        Mutex::default()
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Ends the test binary when a test passes its limit: a hang becomes a loud failure.
fn watchdog() {
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = Instant::now();
        let over = lock(limits())
            .values()
            .find(|l| now >= l.deadline)
            .map(|l| (l.test.clone(), l.limit));
        if let Some((test, limit)) = over {
            // Straight to stderr: libtest captures eprintln! of the threads a test spawned.
            let _ = writeln!(
                std::io::stderr(),
                "\nlockgate-testenv: test {test} is still running after its time limit of \
                 {limit:?}: killing its child processes and ending the test binary"
            );
            kill_all_procs();
            std::process::exit(101);
        }
    }
}

/// The current test's entry in the watchdog's table; removed when the test's thread ends.
struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        lock(limits()).remove(&self.0);
    }
}

thread_local! {
    static REGISTERED: std::cell::RefCell<Option<Registered>> = const { std::cell::RefCell::new(None) };
}

/// The test running on this thread, if this is a test's thread (libtest names each test's
/// thread after the test; tokio's workers and the main thread are not tests).
fn current_test() -> Option<String> {
    let t = std::thread::current();
    let name = t.name()?;
    (name != "main" && !name.starts_with("tokio-") && !name.starts_with("lockgate-testenv"))
        .then(|| name.to_owned())
}

fn register(limit: Duration, replace: bool) {
    let Some(test) = current_test() else { return };
    REGISTERED.with(|r| {
        let mut r = r.borrow_mut();
        if r.is_some() && !replace {
            return;
        }
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = r.as_ref().map_or_else(
            || NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            |x| x.0,
        );
        lock(limits()).insert(
            id,
            Limit {
                test,
                limit,
                deadline: Instant::now() + limit,
            },
        );
        *r = Some(Registered(id));
    });
}

/// Limits the current test to `limit` from now: past it, the test binary ends with a message
/// naming the test (after killing every [`Proc`]). Call it first thing in a test.
pub fn time_limit(limit: Duration) {
    register(limit, true);
}

fn arm_default_time_limit() {
    register(DEFAULT_TIME_LIMIT, false);
}

// ---------------------------------------------------------------------------------------------
// Child processes

fn procs() -> &'static Mutex<Vec<u32>> {
    static PROCS: OnceLock<Mutex<Vec<u32>>> = OnceLock::new();
    PROCS.get_or_init(Mutex::default)
}

fn kill_all_procs() {
    for pid in lock(procs()).iter() {
        // SAFETY: kill(2) with a pid this process spawned and has not reaped (a Proc removes its
        // pid before waiting for it).
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, unless it has already
/// been waited for: a panicking test leaves nothing running. Derefs to [`Child`].
pub struct Proc(Child);

impl Proc {
    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Spawns `cmd`.
    pub fn spawn(cmd: &mut std::process::Command) -> Proc {
        arm_default_time_limit();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        Proc::from(child)
    }

    /// Waits for the process to exit, at most `within`; panics (killing it) when it does not.
    pub fn wait_within(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                self.forget_pid();
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process {} still running after {within:?}",
                self.0.id()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn forget_pid(&self) {
        let pid = self.0.id();
        lock(procs()).retain(|p| *p != pid);
    }
}

impl From<Child> for Proc {
    fn from(child: Child) -> Proc {
        lock(procs()).push(child.id());
        Proc(child)
    }
}

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.forget_pid();
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading a child's output

/// How long [`expect_line`] and [`expect_stderr_line`] wait for their line.
pub const LINE_DEADLINE: Duration = Duration::from_secs(60);

/// Reads lines of a child's stdout until one starts with `want`, for at most [`LINE_DEADLINE`];
/// panics if the child ends or the deadline passes first.
pub fn expect_line(child: &mut Child, want: &str) -> String {
    expect_line_within(child, want, LINE_DEADLINE)
}

/// [`expect_line`] with its own deadline.
pub fn expect_line_within(child: &mut Child, want: &str, within: Duration) -> String {
    let out = child.stdout.as_mut().expect("piped stdout");
    read_until_line(out, want, within).unwrap_or_else(|e| panic!("stdout of {}: {e}", child.id()))
}

/// Reads lines of a child's stderr until one starts with `want` (at most `within`).
pub fn expect_stderr_line(child: &mut Child, want: &str, within: Duration) -> String {
    let err = child.stderr.as_mut().expect("piped stderr");
    read_until_line(err, want, within).unwrap_or_else(|e| panic!("stderr of {}: {e}", child.id()))
}

/// Reads `stream` one byte at a time (so nothing after the line is consumed) until a line
/// starting with `want`, for at most `within`.
pub fn read_until_line(
    stream: &mut (impl Read + AsRawFd),
    want: &str,
    within: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + within;
    let mut seen = String::new();
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no line starting with {want:?} within {within:?}; read so far: {seen:?}"
            ));
        }
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if n == 0 {
            continue;
        }
        let mut byte = [0u8];
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(format!(
                    "the stream ended before a line starting with {want:?}; read: {seen:?}"
                ))
            }
            Ok(_) if byte[0] == b'\n' => {
                let text = String::from_utf8_lossy(&line).into_owned();
                seen.push_str(&text);
                seen.push('\n');
                if text.starts_with(want) {
                    return Ok(text.trim_end().to_owned());
                }
                line.clear();
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Holding locks through a CLI

/// Runs `program` (the Rust `lockgate` or the Go peer) as
/// `exec --locker LOCKER ARGS... NAME -- sh -c 'echo locked; read'`, returning once it holds the
/// lock; it keeps it until its stdin is closed ([`release`]). Killed if dropped.
pub fn hold(program: &std::path::Path, locker: &str, args: &[&str], name: &str) -> Proc {
    let mut c = Proc::spawn(
        std::process::Command::new(program)
            .args(["exec", "--locker", locker])
            .args(args)
            .args([name, "--", "sh", "-c", "echo locked; read _ || true"])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped()),
    );
    expect_line(&mut c, "locked");
    c
}

/// Exit code of `program exec --locker LOCKER -q -n ARGS... NAME -- true`: 0 free, 1 busy.
pub fn try_lock(program: &std::path::Path, locker: &str, args: &[&str], name: &str) -> i32 {
    let mut c = Proc::spawn(
        std::process::Command::new(program)
            .args(["exec", "--locker", locker, "-q", "-n"])
            .args(args)
            .args([name, "--", "true"])
            .env("KUBECONFIG", required_env("LOCKGATE_TEST_KUBECONFIG"))
            .stdin(std::process::Stdio::null()),
    );
    c.wait_within(LINE_DEADLINE).code().expect("exited")
}

/// Lets a [`hold`]er go and checks it exited 0.
pub fn release(mut c: Proc) {
    drop(c.stdin.take());
    let status = c.wait_within(LINE_DEADLINE);
    assert!(status.success(), "holder exited with {status}");
}

// ---------------------------------------------------------------------------------------------
// Objects and waiting for state

/// A new ConfigMap in `namespace`, with one foreign annotation and one data key that lock
/// operations must leave alone.
pub async fn configmap(namespace: &str) -> String {
    let annotations = [("example.com/keep".to_owned(), "me".to_owned())].into();
    let data = [("payload".to_owned(), "untouched".to_owned())].into();
    create_configmap(namespace, Some(annotations), Some(data)).await
}

/// A new ConfigMap in `namespace` with nothing in it (for benchmarks: nothing but the locks).
pub async fn empty_configmap(namespace: &str) -> String {
    create_configmap(namespace, None, None).await
}

async fn create_configmap(
    namespace: &str,
    annotations: Option<std::collections::BTreeMap<String, String>>,
    data: Option<std::collections::BTreeMap<String, String>>,
) -> String {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client(false).await, namespace);
    let name = unique("locks");
    let metadata = kube::api::ObjectMeta {
        name: Some(name.clone()),
        annotations,
        ..Default::default()
    };
    let cm = ConfigMap {
        metadata,
        data,
        ..Default::default()
    };
    api.create(&Default::default(), &cm)
        .await
        .expect("create a ConfigMap");
    name
}

/// The annotations of ConfigMap `default/NAME`.
pub async fn annotations(cm: &str) -> std::collections::BTreeMap<String, String> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client(false).await, "default");
    api.get(cm)
        .await
        .expect("get the ConfigMap")
        .metadata
        .annotations
        .unwrap_or_default()
}

/// The record of lock `name` on ConfigMap `default/CM`, parsed, if there is one.
pub async fn record(cm: &str, name: &str) -> Option<serde_json::Value> {
    annotations(cm)
        .await
        .get(&lockgate::kubernetes::annotation_key(name))
        .map(|v| serde_json::from_str(v).expect("a JSON record"))
}

/// How many waiters are queued in the record of lock `name` on ConfigMap `default/CM`.
pub async fn queue_len(cm: &str, name: &str) -> usize {
    record(cm, name)
        .await
        .and_then(|r| {
            r["QueueMembers"]
                .as_object()
                .map(|q| q.keys().filter(|k| *k != "lockgate-holder").count())
        })
        .unwrap_or(0)
}

/// Waits (at most 30 s) until `len` waiters are queued for lock `name` on `default/CM`: the
/// evidence that a waiter is really waiting.
pub async fn wait_for_queue(cm: &str, name: &str, len: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = queue_len(cm, name).await;
        if now == len {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the queue of {name:?} never reached {len} (it has {now})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Milliseconds from `earlier` to `later`; panics when `later` came first: a grant before the
/// release it waited for is a violation, never a zero latency.
pub fn elapsed_between(what: &str, earlier: Instant, later: Instant) -> Duration {
    later.checked_duration_since(earlier).unwrap_or_else(|| {
        panic!(
            "{what}: the later event came {:?} before the earlier one",
            earlier - later
        )
    })
}

pub mod checker;
pub mod fault;
pub mod fault_plans;
pub mod history;
pub mod register;
pub mod sim;

/// The grant time that `lockgate-go bench-wait` prints (`granted <CLOCK_MONOTONIC ns>`), after
/// the `waiting` line it prints when it found the lock busy.
pub fn read_go_grant(out: &mut impl std::io::BufRead) -> u64 {
    loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "lockgate-go bench-wait ended"
        );
        if let Some(ns) = line.trim().strip_prefix("granted ") {
            return ns.parse().expect("granted <ns>");
        }
    }
}
