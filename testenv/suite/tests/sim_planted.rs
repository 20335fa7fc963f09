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
    // (`simulate --runs 600 --start 5000 --plant release-rebuilt`: seed 5069, the 70th, since a
    // failed first guess reads from the locker's watch (5008 before that, 1054 before the
    // handoff in one write: each changed every schedule);
    // `simulate --runs 80 --start 1 --go --plant join-go-takeover`: seed 3 since the handoff, 34
    // before), replayed.
    for (bug, first, budget, go) in [
        ("double-decrement", 1, 60, false),
        ("ignore-deadline", 1, 20, false),
        ("short-ttl", 1, 20, false),
        ("release-rebuilt", 5069, 1, false),
        ("join-go-takeover", 3, 1, true),
        // The grantee of a handoff counting its lease from when it saw the grant (found by
        // `simulate --runs 200 --start 1 --plant handoff-seen-at` at seed 10; 28 before 1c4924b).
        ("handoff-seen-at", 1, 40, false),
    ] {
        let hit = found(bug, first, budget, go);
        assert!(
            hit.is_some(),
            "{bug}: not found in {budget} schedules from seed {first}"
        );
        eprintln!("{bug}: found at seed {}", hit.unwrap());
    }
}
