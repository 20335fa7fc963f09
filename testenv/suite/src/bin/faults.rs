//! `faults`: the fault runs of `tests/fault_runs.rs`, for as long as you like, with a table.
//!
//! ```text
//! cargo run -p lockgate-testenv --bin faults -- [--minutes N] [--planted] [PLAN...]
//! cargo run -p lockgate-testenv --bin faults -- --list     # the plans' names
//! ```
//!
//! Needs the test environment (`testenv/kube up`, `source target/testenv/env.sh`) and a built
//! workspace (`cargo build --workspace`). Each plan runs once with its faults repeated until it
//! has run about N minutes (default: once, as the tests do); with no PLAN, every plan runs, and
//! `--planted` adds the planted-bug runs. Prints one Markdown table row per run (RELIABILITY.md's
//! columns) and exits 1 when a run without a planted bug has a violation, or a planted bug went
//! uncaught.

use std::time::{Duration, Instant};

use lockgate_testenv::fault_plans::{self, NAMES, PLANTED};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut minutes = 0.0f64;
    let mut planted = false;
    let mut names: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--minutes" => {
                minutes = args
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or_else(|| panic!("--minutes needs a number"))
            }
            "--planted" => planted = true,
            "--list" => {
                NAMES.iter().for_each(|n| println!("{n}"));
                return;
            }
            _ => names.push(a),
        }
    }
    if names.is_empty() {
        names = NAMES.iter().map(|s| s.to_string()).collect();
        if planted {
            names.extend(PLANTED.iter().map(|(n, _)| n.to_string()));
        }
    }
    println!("| run | clients | operations | violations | lost updates | max takeover | notes |");
    println!("|---|---|---|---|---|---|---|");
    let mut failed = false;
    for name in names {
        let one = fault_plans::plan(&name, 1).await;
        // One round's length, to scale the faults to the minutes asked for.
        let round = one.warmup
            + one.faults.len() as u32 * one.gap
            + one
                .faults
                .iter()
                .map(|f| match f {
                    lockgate_testenv::fault::Fault::Pause(_, d)
                    | lockgate_testenv::fault::Fault::Partition(_, d)
                    | lockgate_testenv::fault::Fault::Everyone(_, d)
                    | lockgate_testenv::fault::Fault::Wait(d) => *d,
                    _ => Duration::from_secs(8),
                })
                .sum::<Duration>();
        let rounds = ((minutes * 60.0) / round.as_secs_f64()).ceil().max(1.0) as usize;
        let plan = if rounds > 1 {
            fault_plans::plan(&name, rounds).await
        } else {
            one
        };
        let started = Instant::now();
        let outcome = plan.run().await;
        let r = &outcome.report;
        let expected = PLANTED.iter().find(|(n, _)| *n == name).map(|(_, k)| *k);
        let verdict = match expected {
            Some(kind) if r.count(kind) > 0 => format!("planted bug caught: {kind}"),
            Some(kind) => {
                failed = true;
                format!("PLANTED BUG NOT CAUGHT ({kind})")
            }
            None if r.ok() => String::new(),
            None => {
                failed = true;
                "FAILED".into()
            }
        };
        let violations: Vec<String> = {
            let mut kinds: Vec<_> = r.violations.iter().map(|v| v.kind).collect();
            kinds.sort();
            kinds.dedup();
            kinds
                .into_iter()
                .map(|k| format!("{} {k}", r.count(k)))
                .collect()
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} kills, {} pauses, {} lost signals, {} stale writes refused{}; {:.0} s {} |",
            r.clients,
            r.operations,
            if violations.is_empty() { "0".into() } else { violations.join(", ") },
            if r.excused_lost_updates > 0 {
                format!("{} (+{} excused)", r.lost_updates, r.excused_lost_updates)
            } else {
                r.lost_updates.to_string()
            },
            r.max_takeover().map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64())),
            r.kills,
            r.pauses,
            r.lost_signals,
            r.refused_writes,
            if outcome.missed.is_empty() { String::new() } else { format!(", {} faults without a victim", outcome.missed.len()) },
            started.elapsed().as_secs_f64(),
            verdict
        );
        eprintln!("{outcome}");
    }
    std::process::exit(i32::from(failed));
}
