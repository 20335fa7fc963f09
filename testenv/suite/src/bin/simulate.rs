//! The deterministic simulator's command.
//!
//! ```text
//! cargo run -p lockgate-testenv --bin simulate -- --seed S     replay one schedule, print its trace
//! cargo run -p lockgate-testenv --bin simulate -- --minutes N  search schedules for N minutes
//! cargo run -p lockgate-testenv --bin simulate -- --runs N     search N schedules
//!     [--start S]   the first seed of a search (default: from the clock)
//!     [--go]        include Go lockgate peers
//!     [--plant BUG] plant a known bug, to see the search find it: double-decrement,
//!                   release-rebuilt, join-go-takeover, ignore-deadline, short-ttl
//! ```
//!
//! Exit status: 0 when nothing was found, 1 when a schedule broke a rule (its seed and the
//! command that replays it are printed), 2 for a usage error.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use lockgate_testenv::sim::{self, rng::Rng, Config};

fn usage() -> ExitCode {
    eprintln!(
        "usage: simulate (--seed S | --minutes N | --runs N) [--start S] [--go] [--plant BUG]"
    );
    ExitCode::from(2)
}

fn config(seed: u64, go: bool, plant: Option<&str>) -> Config {
    let mut rng = Rng::new(seed);
    let mut c = Config::random(&mut rng);
    if plant == Some("short-ttl") {
        c.short_ttl_host = true;
        c.lease = lockgate::kubernetes::LeaseConfig::default();
    }
    if go {
        c.go_peers = rng.range(1, 3) as usize;
        // Every participant must use the same TTL: Go's is 10 s.
        c.lease = lockgate::kubernetes::LeaseConfig::default();
    }
    c
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seed = None;
    let mut budget = None;
    let mut runs = None;
    let mut start = None;
    let mut go = false;
    let mut plant: Option<String> = None;
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match args[i].as_str() {
            "--seed" => seed = value(i),
            "--minutes" => budget = value(i).map(|m| Duration::from_secs(m * 60)),
            "--runs" => runs = value(i),
            "--start" => start = value(i),
            "--go" => {
                go = true;
                i += 1;
                continue;
            }
            "--plant" => {
                let Some(bug) = args.get(i + 1) else {
                    return usage();
                };
                if bug != "short-ttl" && !lockgate::sim::plant(&[bug.as_str()]) {
                    eprintln!("simulate: unknown bug {bug:?}");
                    return usage();
                }
                plant = Some(bug.clone());
                i += 2;
                continue;
            }
            _ => return usage(),
        }
        if value(i).is_none() {
            return usage();
        }
        i += 2;
    }
    if let Some(seed) = seed {
        let c = config(seed, go, plant.as_deref());
        let r = sim::run(seed, &c, true);
        for line in &r.trace {
            println!("{line}");
        }
        print_report(&r);
        return if r.ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    }
    if budget.is_none() && runs.is_none() {
        return usage();
    }
    let first = start.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let began = Instant::now();
    let mut simulated = Duration::ZERO;
    let mut done = 0u64;
    for n in 0.. {
        if runs.is_some_and(|r| n >= r) || budget.is_some_and(|b| began.elapsed() >= b) {
            break;
        }
        let seed = first.wrapping_add(n);
        let c = config(seed, go, plant.as_deref());
        let r = sim::run(seed, &c, false);
        done += 1;
        simulated += r.simulated;
        if !r.ok() {
            print_report(&r);
            println!(
                "found after {done} schedules, {:.0} s simulated, {:.1} s real",
                simulated.as_secs_f64(),
                began.elapsed().as_secs_f64()
            );
            println!(
                "replay: cargo run -p lockgate-testenv --bin simulate -- --seed {seed}{}{}",
                if go { " --go" } else { "" },
                plant
                    .as_deref()
                    .map(|b| format!(" --plant {b}"))
                    .unwrap_or_default()
            );
            return ExitCode::from(1);
        }
        if done.is_multiple_of(20) {
            eprintln!(
                "{done} schedules, {:.0} s simulated, {:.0} s real",
                simulated.as_secs_f64(),
                began.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "searched {done} schedules (seeds {first}..{}), {:.0} s simulated in {:.0} s: nothing found",
        first.wrapping_add(done),
        simulated.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

fn print_report(r: &sim::Report) {
    println!("seed {}: {:?}", r.seed, r.config);
    println!("simulated {:?}; {:?}", r.simulated, r.counts);
    for e in &r.errors {
        println!("error seen: {e}");
    }
    if r.ok() {
        println!("no violation");
    }
    for v in &r.violations {
        println!("VIOLATION: {v}");
    }
}
