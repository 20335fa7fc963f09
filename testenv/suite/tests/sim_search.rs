//! The simulator's search, bounded for the suite: schedules of today's seeds for about a minute,
//! Rust-only and with Go peers (a failure prints the seed and the command that replays it).
//! The long search is `scripts/soak` (`cargo run -p lockgate-testenv --bin simulate --
//! --minutes N`).

use std::time::{Duration, Instant};

use lockgate_testenv::sim::{self, rng::Rng, Config};

/// Seeds that once broke a rule, kept: each must replay clean. (Each entry: seed, with Go.)
///
/// - 7000221 with Go peers (found by a 45-minute search, the 222nd schedule): a shared grant
///   that came too late was given back, but its removal failed, leaving our holder id in the
///   record; a later join's answer was lost, and the record naming our holder was taken as
///   that join landed, its lease counted from the join's send time. The lease had long
///   expired: a Go v0.2 peer took it over while we believed we held it shared.
const KEPT: &[(u64, bool)] = &[(7_000_221, true)];

fn config(seed: u64, go: bool) -> Config {
    let mut rng = Rng::new(seed);
    let mut c = Config::random(&mut rng);
    if go {
        c.go_peers = rng.range(1, 3) as usize;
        c.lease = lockgate::kubernetes::LeaseConfig::default();
    }
    c
}

fn check(seed: u64, go: bool) -> Duration {
    let r = sim::run(seed, &config(seed, go), false);
    assert!(
        r.ok(),
        "seed {seed}: {:#?}\nreplay: cargo run -p lockgate-testenv --bin simulate -- --seed {seed}{}",
        r.violations,
        if go { " --go" } else { "" }
    );
    r.simulated
}

/// Today's seeds: a day's runs of the suite search the same schedules, the next day's others.
fn first_seed(salt: u64) -> u64 {
    let day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    Rng::new(day ^ salt).u64()
}

fn search(go: bool, budget: Duration, at_least: u64) {
    let first = first_seed(u64::from(go));
    let began = Instant::now();
    let mut n = 0;
    let mut simulated = Duration::ZERO;
    while n < at_least || began.elapsed() < budget {
        simulated += check(first.wrapping_add(n), go);
        n += 1;
    }
    eprintln!(
        "searched {n} schedules (seeds {first}..{}), {:.0} s simulated in {:.0} s",
        first.wrapping_add(n),
        simulated.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
}

#[test]
fn kept_seeds_replay_clean() {
    for &(seed, go) in KEPT {
        check(seed, go);
    }
}

#[test]
fn a_bounded_search_finds_nothing() {
    search(false, Duration::from_secs(40), 10);
}

#[test]
fn a_bounded_search_with_go_peers_finds_nothing() {
    search(true, Duration::from_secs(20), 5);
}
