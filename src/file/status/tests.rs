use super::*;

#[test]
fn parses_proc_locks() {
    let text = "1: FLOCK  ADVISORY  WRITE 1234 fd:01:56789 0 EOF\n\
                1: -> FLOCK  ADVISORY  WRITE 1235 fd:01:56789 0 EOF\n\
                2: FLOCK  ADVISORY  READ 77 00:2a:5 0 EOF\n\
                2: FLOCK  ADVISORY  READ -1 00:2a:5 0 EOF\n\
                3: POSIX  ADVISORY  WRITE 99 fd:01:1 0 EOF\n\
                4: FLOCK  ADVISORY  WRITE 99 zz:01:1 0 EOF\n\
                5: FLOCK  ADVISORY  WRITE 99\n\
                garbage line\n";
    let m = group(parse_proc_locks(text).collect());
    let a = &m[&(libc::makedev(0xfd, 1), 56789)];
    assert_eq!(
        a.holders
            .iter()
            .map(|h| (h.mode, h.pid))
            .collect::<Vec<_>>(),
        vec![(Mode::Exclusive, Some(1234))]
    );
    assert_eq!(a.waiters, 1);
    let b = &m[&(libc::makedev(0, 0x2a), 5)];
    assert_eq!(b.holders.len(), 2);
    assert_eq!(b.holders[1].pid, None);
    assert_eq!(m.len(), 2, "POSIX locks and broken lines are not ours");
}

fn entry(ino: u64, exclusive: bool, pid: u32) -> Entry {
    Entry {
        dev: 1,
        ino,
        waiting: false,
        exclusive,
        pid: Some(pid),
    }
}

#[test]
fn a_duplicated_exclusive_holder_is_impossible() {
    let mut ok = vec![entry(1, true, 10), entry(2, false, 11), entry(2, false, 11)];
    ok.push(Entry {
        waiting: true,
        ..entry(1, true, 12)
    });
    ok.sort();
    assert!(
        is_possible(&ok),
        "shared twice by one process, a waiter: fine"
    );
    let mut dup = vec![entry(1, true, 10), entry(1, true, 10)];
    dup.sort();
    assert!(!is_possible(&dup));
    let mut mixed = vec![entry(1, true, 10), entry(1, false, 11)];
    mixed.sort();
    assert!(!is_possible(&mixed));
}

#[test]
fn the_vote_outweighs_skips_and_duplicates() {
    let good = vec![entry(1, true, 10), entry(2, true, 11), entry(3, true, 12)];
    let skipped = vec![entry(1, true, 10), entry(3, true, 12)];
    let doubled = vec![entry(1, true, 10), entry(2, true, 11), entry(2, true, 11)];
    let doubled = [doubled.clone(), vec![entry(3, true, 12)]].concat();
    let readings = vec![skipped, good.clone(), doubled, good.clone(), good.clone()];
    let mut voted = vote(&readings);
    voted.sort();
    assert_eq!(voted, good);
}

#[test]
fn the_vote_never_shows_an_impossible_state() {
    // A busy host: the exclusive entry of file 1 is doubled in most readings.
    let doubled = vec![entry(1, true, 10), entry(1, true, 10), entry(2, false, 11)];
    let good = vec![entry(1, true, 10), entry(2, false, 11)];
    let readings = vec![doubled.clone(), doubled.clone(), good.clone(), doubled];
    assert_eq!(vote(&readings), good);
    // A file going from shared to exclusive while it is read: one of the two, never both.
    let shared = vec![entry(3, false, 20), entry(3, false, 21)];
    let exclusive = vec![entry(3, true, 22)];
    let voted = vote(&[shared.clone(), exclusive.clone(), shared.clone()]);
    assert_eq!(voted, shared);
    let voted = vote(&[exclusive.clone(), exclusive.clone(), shared]);
    assert_eq!(voted, exclusive);
    assert!(is_possible(&voted));
}
