//! HTTP lock server benchmarks: lockgate's server side by side with Go lockgate's
//! (`lockgate-go serve`, the memory store) in the same run, driven by the same client.
//!
//! Run: `testenv/build.sh lockgate-go && LOCKGATE_TEST_GO_PEER=$PWD/target/testenv/bin/lockgate-go
//! cargo bench -p lockgate-testenv --bench http` (`BENCH_QUICK=1` for a short run; scripts/test
//! runs the quick mode).
//!
//! The lockgate server is this executable started again as a child process in server mode
//! (`LOCKGATE_BENCH_SERVE=1`): the library `lockgate serve` runs, built with the benchmark's
//! profile, with its default limits and no start-up grace.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockgate_testenv::go_peer;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::TcpStream;

fn main() {
    if std::env::var_os("LOCKGATE_BENCH_SERVE").is_some() {
        serve_mode();
        return;
    }
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(quick));
}

/// The server side of the benchmark: `lockgate serve --listen 127.0.0.1:0 --grace 0`.
fn serve_mode() {
    use lockgate::server::{MemoryConfig, MemoryStore, Server, ServerConfig};
    let ttl = std::env::var("LOCKGATE_BENCH_TTL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(lockgate::server::DEFAULT_TTL, Duration::from_secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("serving on {}", listener.local_addr().unwrap());
        let store = MemoryStore::new(MemoryConfig::default().ttl(ttl).grace(Duration::ZERO))
            .expect("a valid memory store");
        Server::new(Arc::new(store), ServerConfig::default())
            .expect("a valid server")
            .serve(listener, std::future::pending())
            .await;
    });
}

/// A server process, killed when dropped.
struct ServerProc {
    child: Child,
    addr: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProc {
    fn rust(ttl_secs: u64) -> Self {
        let cmd = Command::new(std::env::current_exe().unwrap());
        Self::start(
            cmd,
            &[
                ("LOCKGATE_BENCH_SERVE", "1"),
                ("LOCKGATE_BENCH_TTL_SECS", &ttl_secs.to_string()),
            ],
        )
    }

    fn go() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(go_peer());
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
        let s = Self::start(cmd, &[]);
        // Go prints before it listens.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&s.addr).is_err() {
            assert!(Instant::now() < deadline, "Go's server never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    fn start(mut cmd: Command, env: &[(&str, &str)]) -> Self {
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("start a server");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("serving on ")
            .unwrap_or_else(|| panic!("unexpected server output {line:?}"))
            .to_owned();
        Self { child, addr }
    }

    fn proc_file(&self, file: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).unwrap()
    }

    /// Resident memory in bytes.
    fn rss(&self) -> u64 {
        let status = self.proc_file("status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    }

    /// User + system CPU time used so far.
    fn cpu(&self) -> Duration {
        let stat = self.proc_file("stat");
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after_comm.split(' ').collect();
        // Fields 14 and 15 of stat(5); after_comm starts at field 3.
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_micros(ticks * 1_000_000 / hz)
    }
}

/// A keep-alive HTTP/1.1 connection speaking JSON; the same client for both servers.
struct Conn {
    io: AsyncBufReader<TcpStream>,
}

impl Conn {
    async fn open(addr: &str) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        Self {
            io: AsyncBufReader::new(s),
        }
    }

    async fn post(&mut self, path: &str, body: &Value) -> Value {
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.io.get_mut().write_all(req.as_bytes()).await.unwrap();
        self.read().await
    }

    async fn get(&mut self, path: &str) -> Value {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.io.get_mut().write_all(req.as_bytes()).await.unwrap();
        self.read().await
    }

    async fn read(&mut self) -> Value {
        let mut len = None;
        let mut line = String::new();
        loop {
            line.clear();
            assert!(self.io.read_line(&mut line).await.unwrap() > 0, "closed");
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
            }
        }
        let mut body = vec![0; len.expect("a Content-Length")];
        self.io.read_exact(&mut body).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    async fn acquire(&mut self, name: &str, opts: Value) -> Value {
        self.post("/acquire", &json!({"lockName": name, "opts": opts}))
            .await
    }

    async fn release(&mut self, handle: &Value) {
        let v = self.post("/release", &json!({"lockHandle": handle})).await;
        assert_eq!(v["err"], "", "{v}");
    }
}

/// The Go peer's lockgate version (`lockgate-go version`).
fn go_version() -> String {
    let out = Command::new(go_peer()).arg("version").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn fmt(d: Duration) -> String {
    if d >= Duration::from_millis(100) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else if d >= Duration::from_millis(1) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    }
}

async fn run(quick: bool) {
    println!("# lockgate HTTP lock server benchmarks (loopback, 2 cores)");
    println!();
    if quick {
        println!("(quick mode: short runs, figures are rough)");
        println!();
    }
    throughput(quick).await;
    handoff(quick).await;
    memory(quick).await;
}

/// `clients` connections, each acquiring and releasing its own lock for `secs`.
async fn cycles(addr: &str, clients: usize, run_for: Duration, prefix: &str) -> u64 {
    let deadline = Instant::now() + run_for;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let addr = addr.to_owned();
            let name = format!("{prefix}-{i}");
            tokio::spawn(async move {
                let mut c = Conn::open(&addr).await;
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let v = c.acquire(&name, json!({"shared": false})).await;
                    assert_eq!(v["err"], "", "{v}");
                    c.release(&v["lockHandle"]).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

async fn throughput(quick: bool) {
    let run_for = Duration::from_secs(if quick { 1 } else { 5 });
    println!(
        "## 1. Uncontended acquire + release ({} s per row, each client its own lock and connection)",
        run_for.as_secs()
    );
    println!();
    println!("The same Rust client drives both servers (HTTP/1.1 keep-alive, one connection per");
    println!(
        "client); the client runs on the same 2 cores as the server. Server CPU is the server"
    );
    println!("process's user + system time per cycle.");
    println!();
    println!("| clients | lockgate cycles/s | Go lockgate {} cycles/s | ratio | lockgate server CPU per cycle | Go server CPU per cycle |", go_version());
    println!("|---|---|---|---|---|---|");
    for clients in [1, 64] {
        let mut rows = Vec::new();
        for rust in [true, false] {
            let srv = if rust {
                ServerProc::rust(10)
            } else {
                ServerProc::go()
            };
            // Warm up connections and code paths.
            cycles(&srv.addr, clients, Duration::from_millis(200), "warm").await;
            let cpu0 = srv.cpu();
            let start = Instant::now();
            let n = cycles(&srv.addr, clients, run_for, "bench").await;
            let wall = start.elapsed();
            let cpu = srv.cpu() - cpu0;
            rows.push((
                n as f64 / wall.as_secs_f64(),
                cpu / u32::try_from(n.max(1)).unwrap_or(u32::MAX),
            ));
        }
        let ((rust, rust_cpu), (go, go_cpu)) = (rows[0], rows[1]);
        println!(
            "| {clients} | {rust:.0} | {go:.0} | {:.2}× | {} | {} |",
            rust / go,
            fmt(rust_cpu),
            fmt(go_cpu)
        );
    }
    // Go's own client on Go's server, for reference (one process, sequential).
    let srv = ServerProc::go();
    let iterations = if quick { 500 } else { 5000 };
    let out = Command::new(go_peer())
        .args([
            "bench",
            "--locker",
            &format!("http://{}", srv.addr),
            "--iterations",
            &iterations.to_string(),
        ])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if let Some(ns) = v["ns_per_op"].as_u64() {
        println!();
        println!(
            "Go's own `HttpLocker` against Go's server, 1 client: {:.0} cycles/s ({} per cycle).",
            1e9 / ns as f64,
            fmt(Duration::from_nanos(ns))
        );
    }
    println!();
}

async fn handoff(quick: bool) {
    let n = if quick { 20 } else { 500 };
    let go_n = if quick { 2 } else { 10 };
    println!("## 2. Handoff to a waiting client");
    println!();
    println!("Time from the holder's release request to the waiter's grant answer. lockgate: the");
    println!(
        "waiter is a long poll (`waitMs`), shown waiting by `/status` before each release. Go:"
    );
    println!("Go's own `HttpLocker` (`lockgate-go bench-wait`) polling Go's server every 2 s.");
    println!();
    println!("| server, waiter | handoffs | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    let srv = ServerProc::rust(10);
    let mut holder = Conn::open(&srv.addr).await;
    let mut watcher = Conn::open(&srv.addr).await;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let h = holder.acquire("handoff", json!({})).await;
        assert_eq!(h["err"], "");
        let addr = srv.addr.clone();
        let waiter = tokio::spawn(async move {
            let mut c = Conn::open(&addr).await;
            let v = c
                .acquire("handoff", json!({"waitMs": 30_000, "acquirerId": "waiter"}))
                .await;
            let at = Instant::now();
            assert_eq!(v["err"], "", "{v}");
            c.release(&v["lockHandle"]).await;
            at
        });
        loop {
            let st = watcher.get("/status?name=handoff").await;
            if st["locks"][0]["waiters"][0]["longPoll"] == true {
                break;
            }
            tokio::task::yield_now().await;
        }
        let released = Instant::now();
        holder.release(&h["lockHandle"]).await;
        samples.push(waiter.await.unwrap() - released);
    }
    samples.sort();
    println!(
        "| lockgate, long poll | {n} | {} | {} | {} |",
        fmt(pct(&samples, 0.5)),
        fmt(pct(&samples, 0.99)),
        fmt(*samples.last().unwrap())
    );
    drop(srv);

    let srv = ServerProc::go();
    let mut child = Command::new(go_peer())
        .args([
            "bench-wait",
            "--locker",
            &format!("http://{}", srv.addr),
            "--name",
            "go-handoff",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut holder = Conn::open(&srv.addr).await;
    let mut samples = Vec::new();
    for i in 0..go_n {
        // The Go waiter releases right after printing its grant: take the lock once it has.
        let h = loop {
            let h = holder.acquire("go-handoff", json!({})).await;
            if h["err"] == "" {
                break h;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        writeln!(stdin, "go").unwrap();
        stdin.flush().unwrap();
        // Release at varying points of Go's 2 s poll period.
        tokio::time::sleep(Duration::from_millis(300 + (i as u64 * 700) % 2000)).await;
        let released = mono_ns();
        holder.release(&h["lockHandle"]).await;
        let granted = tokio::task::block_in_place(|| lockgate_testenv::read_go_grant(&mut stdout));
        let ns = granted.checked_sub(released).unwrap_or_else(|| {
            panic!("the Go waiter's grant came before the release it waited for")
        });
        samples.push(Duration::from_nanos(ns));
    }
    drop(stdin);
    let _ = child.wait();
    samples.sort();
    println!(
        "| Go lockgate {}, polling | {go_n} | {} | {} | {} |",
        go_version(),
        fmt(pct(&samples, 0.5)),
        fmt(pct(&samples, 0.99)),
        fmt(*samples.last().unwrap())
    );
    println!();
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

async fn memory(quick: bool) {
    let locks: usize = if quick { 10_000 } else { 100_000 };
    println!("## 3. Server memory with {locks} held locks");
    println!();
    println!("Resident memory (VmRSS) of the server process before and after {locks} distinct");
    println!("exclusive locks are acquired and held (lockgate with a 1 h TTL, so that nothing");
    println!("needs renewing; Go's memory store keeps every record it ever wrote).");
    println!();
    println!("| server | RSS before | RSS with the locks | per held lock |");
    println!("|---|---|---|---|");
    for who in [
        "lockgate".to_owned(),
        format!("Go lockgate {}", go_version()),
    ] {
        let srv = if who == "lockgate" {
            ServerProc::rust(3600)
        } else {
            ServerProc::go()
        };
        // Touch the server once so that its lazily started parts are counted in "before".
        let mut c = Conn::open(&srv.addr).await;
        let v = c.acquire("warm", json!({})).await;
        c.release(&v["lockHandle"]).await;
        drop(c);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = srv.rss();
        let clients = 16;
        let tasks: Vec<_> = (0..clients)
            .map(|k| {
                let addr = srv.addr.clone();
                tokio::spawn(async move {
                    let mut c = Conn::open(&addr).await;
                    for i in (k..locks).step_by(clients) {
                        let v = c.acquire(&format!("held-lock-{i:06}"), json!({})).await;
                        assert_eq!(v["err"], "", "{v}");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = srv.rss();
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
        println!(
            "| {who} | {} | {} | {} bytes |",
            mib(before),
            mib(after),
            after.saturating_sub(before) / locks as u64
        );
    }
    println!();
}
