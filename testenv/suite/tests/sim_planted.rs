//! The simulator finds known bugs by itself: with each planted, a search from a fixed seed
//! reports the violation within a bounded number of schedules. (A test binary of its own: a
//! planted bug is a switch of the whole process.)

use lockgate_testenv::sim::{self, rng::Rng, Config};

fn found(bug: &str, first: u64, budget: u64, go: bool) -> Option<u64> {
    if bug == "short-ttl" {
        assert!(lockgate::sim::plant(&[]));
    } else {
        assert!(lockgate::sim::plant(&[bug]));
    }
    let hit = (first..first + budget).find(|&seed| {
        let mut rng = Rng::new(seed);
        let mut c = Config::random(&mut rng);
        if bug == "short-ttl" {
            c.short_ttl_host = true;
            c.lease = lockgate::kubernetes::LeaseConfig::default();
        }
        if go {
            // As `simulate --go` does.
            c.go_peers = rng.range(1, 3) as usize;
            c.lease = lockgate::kubernetes::LeaseConfig::default();
        }
        !sim::run(seed, &c, false).ok()
    });
    assert!(lockgate::sim::plant(&[]));
    hit
}

#[test]
fn planted_bugs_are_found() {
    // (bug, first seed, schedules, with Go peers): searches from seed 1 for the quick ones;
    // for the two that take a minute or more of search, the seed the search found them at
    // (`simulate --runs 400 --start 1000 --plant release-rebuilt`: seed 1054, the 55th;
    // `simulate --runs 80 --start 1 --go --plant join-go-takeover`: seed 34), replayed.
    for (bug, first, budget, go) in [
        ("double-decrement", 1, 60, false),
        ("ignore-deadline", 1, 20, false),
        ("short-ttl", 1, 20, false),
        ("release-rebuilt", 1054, 1, false),
        ("join-go-takeover", 34, 1, true),
    ] {
        let hit = found(bug, first, budget, go);
        assert!(
            hit.is_some(),
            "{bug}: not found in {budget} schedules from seed {first}"
        );
        eprintln!("{bug}: found at seed {}", hit.unwrap());
    }
}
