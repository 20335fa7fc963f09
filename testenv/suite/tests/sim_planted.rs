//! The simulator finds known bugs by itself: with each planted, a search from a fixed seed
//! reports the violation within a bounded number of schedules. (A test binary of its own: a
//! planted bug is a switch of the whole process.)

use lockgate_testenv::sim::{self, rng::Rng, Config};

fn found(bug: &str, first: u64, budget: u64) -> Option<u64> {
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
        !sim::run(seed, &c, false).ok()
    });
    assert!(lockgate::sim::plant(&[]));
    hit
}

#[test]
fn planted_bugs_are_found() {
    for (bug, budget) in [
        ("double-decrement", 60),
        ("ignore-deadline", 20),
        ("short-ttl", 20),
    ] {
        let hit = found(bug, 1, budget);
        assert!(hit.is_some(), "{bug}: not found in {budget} schedules");
        eprintln!("{bug}: found at seed {}", hit.unwrap());
    }
}
