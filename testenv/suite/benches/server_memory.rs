//! What `lockgate serve` (memory store) holds in memory per held lease, per queued acquirer
//! and per open connection: the server's resident memory (VmRSS) before and after each kind is
//! added, divided by how many were added. The figures of the README's production section and
//! BENCHMARKS.md.
//!
//! ```sh
//! cargo build --release -p lockgate-cli
//! cargo bench -p lockgate-testenv --bench server_memory      # BENCH_QUICK=1: a tenth of each
//! ```

use std::process::Command;
use std::time::Duration;

use lockgate_testenv::process::Proc;
use lockgate_testenv::raw_http::{request, Conn};
use lockgate_testenv::rust_cli;
use serde_json::json;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS of the server")
}

fn acquire(name: &str, opts: serde_json::Value) -> Vec<u8> {
    request(
        "POST",
        "/acquire",
        &[],
        &json!({"lockName": name, "opts": opts}).to_string(),
    )
}

/// Sends `reqs` on `conns` keep-alive connections, each answered before the next is sent.
async fn send_all(addr: &str, reqs: Vec<Vec<u8>>, conns: usize, source: &'static str) {
    let per = reqs.len().div_ceil(conns);
    let mut tasks = Vec::new();
    for chunk in reqs.chunks(per.max(1)) {
        let (addr, chunk) = (addr.to_owned(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::connect_from(&addr, source, None).await.unwrap();
            for r in chunk {
                let a = c.call(&r).await.unwrap().expect("an answer");
                assert_eq!(a.status, 200, "{}", a.json());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// RSS settles (the allocator, the expiry tasks): the smallest of a few samples.
async fn settled(pid: u32) -> u64 {
    let mut least = u64::MAX;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        least = least.min(rss_kib(pid));
    }
    least
}

fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let scale = if quick { 10 } else { 1 };
    let (held, places, polls, idle) = (100_000 / scale, 10_000 / scale, 1000 / scale, 1000 / scale);
    let server_bin = std::env::var_os("LOCKGATE_BENCH_SERVER").map_or_else(rust_cli, Into::into);
    let mut server = Proc::spawn(Command::new(&server_bin).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--grace",
        "0",
        "--ttl",
        "1h",
        "--max-wait",
        "1h",
        "--max-held",
        "1000000",
        "--max-waiters",
        "1000000",
        "--max-waiters-per-client",
        "1000000",
        "--max-waiters-per-lock",
        "1000000",
        "--max-connections",
        "20000",
        "--max-connections-per-client",
        "20000",
    ]));
    let addr = server
        .line("serving on ", Duration::from_secs(20))
        .trim_start_matches("serving on ")
        .to_owned();
    let pid = server.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(async {
        let mut rows = Vec::new();
        send_all(&addr, vec![acquire("warm-up", json!({}))], 1, "127.0.0.1").await;
        let base = settled(pid).await;

        let reqs = (0..held)
            .map(|i| acquire(&format!("held-{i:06}"), json!({})))
            .collect();
        send_all(&addr, reqs, 4, "127.0.0.1").await;
        let with_held = settled(pid).await;
        rows.push(("held lease (a lock of its own)", held, base, with_held));

        // Places of pollers between polls (Go v0.2 with an acquirer id): no connection.
        let reqs = (0..places)
            .map(|i| {
                acquire(
                    &format!("held-{:06}", i % 100),
                    json!({"acquirerId": format!("p-{i}")}),
                )
            })
            .collect();
        send_all(&addr, reqs, 4, "127.0.0.1").await;
        let with_places = settled(pid).await;
        rows.push((
            "queued poller (no connection)",
            places,
            with_held,
            with_places,
        ));

        // Long polls: a queue place and the open request and connection waiting on it.
        let mut open = Vec::new();
        for i in 0..polls {
            let mut c = Conn::connect_from(&addr, "127.0.0.2", None).await.unwrap();
            let name = format!("held-{:06}", 100 + i % 100);
            c.send(&acquire(&name, json!({"waitMs": 3_600_000})))
                .await
                .unwrap();
            open.push(c);
        }
        let with_polls = settled(pid).await;
        rows.push((
            "long-poll waiter (its connection included)",
            polls,
            with_places,
            with_polls,
        ));

        // Idle keep-alive connections after one request each.
        let mut idle_conns = Vec::new();
        for _ in 0..idle {
            let mut c = Conn::connect_from(&addr, "127.0.0.3", None).await.unwrap();
            let a = c
                .call(&request("GET", "/healthz", &[], ""))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(a.status, 200);
            idle_conns.push(c);
        }
        let with_idle = settled(pid).await;
        rows.push(("idle keep-alive connection", idle, with_polls, with_idle));
        drop((open, idle_conns));
        rows
    });
    println!(
        "server {}: RSS {} KiB at start",
        server_bin.display(),
        rows[0].2
    );
    println!("| what | how many | RSS before | RSS after | per item |");
    println!("|---|---|---|---|---|");
    for (what, n, before, after) in rows {
        println!(
            "| {what} | {n} | {:.1} MiB | {:.1} MiB | {} bytes |",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            (after.saturating_sub(before) * 1024) / n as u64
        );
    }
    server.signal(libc::SIGKILL);
}
