//! The checker of fault runs: reads every history of a run afterwards and says what went wrong.
//!
//! # What a hold is, and when its holder believes in it
//!
//! A hold starts when its acquisition is `ok` (the client knows it holds) and its holder
//! *believes* in it until the earliest of: the `invoke` of its release, its lost-lease signal,
//! the death of the process (a nemesis `kill` of that pid), or the last event that process ever
//! logged. Acquisitions whose outcome is unknown (`info`) or that failed give no belief: the
//! client does not act on them.
//!
//! A holder that the nemesis paused (SIGSTOP of its process, or of the `lockgate` that supervises
//! it) believes nothing it can act on while it is stopped, and nothing can tell it that its lease
//! ran out meanwhile: from the pause until `resume_grace` after it continues, it is a *zombie*.
//! What a zombie does is the fenced register's to refuse (check 3), and its belief during that
//! window is not held against exclusion (check 1). After the grace it must have seen its loss.
//!
//! # The checks
//!
//! 1. **Exclusion**: no two holds, one of them exclusive, are believed in at the same instant.
//! 2. **No lost update**: the counter ends at the number of increments that happened: at least
//!    those acknowledged (`ok`), at most those plus the ones whose outcome is unknown; no two
//!    acknowledged increments wrote the same value. An increment whose read and write straddle a
//!    pause of its holder is an unfenced write by a zombie: the hazard no lease can close, counted
//!    apart as excused.
//! 3. **No stale token accepted**: in the fenced register's own order, no accepted write carries a
//!    token lower than one accepted before it.
//! 4. **Tokens follow grants**: when a grant was acknowledged before another acquisition began,
//!    the later grant's fencing token is larger.
//! 5. **Every history ends**: with `end`, or with the nemesis killing that process.
//! 6. **Takeover within the bound**: after a holder is killed, the next conflicting grant comes
//!    within `takeover_bound`; and no holder that was killed, paused or cut off is taken over
//!    sooner than `takeover_floor` (before its lease could have expired).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use crate::history::{Event, Op, Phase};
use crate::register::Decision;

/// What the checker needs to know of the run besides its histories.
#[derive(Debug, Clone)]
pub struct Params {
    /// How long after a zombie continues it may still act on its old belief.
    pub resume_grace: Duration,
    /// The latest a killed holder's lock may be taken over (`None`: no bound checked).
    pub takeover_bound: Option<Duration>,
    /// The earliest a disabled holder's lease may be taken over (`None`: no floor, e.g. file
    /// locks, which the kernel frees at death).
    pub takeover_floor: Option<Duration>,
}

/// Everything a run left behind.
#[derive(Debug, Clone, Default)]
pub struct Input {
    /// One history per client process (the nemesis's included, or apart in `nemesis`).
    pub histories: Vec<Vec<Event>>,
    pub nemesis: Vec<Event>,
    pub register: Vec<Decision>,
    /// The counter's final value (`None`: the run had no counter).
    pub counter: Option<u64>,
}

/// The kinds of violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Exclusion,
    LostUpdate,
    StaleTokenAccepted,
    TokenOrder,
    Unfinished,
    Takeover,
    ActedAfterLost,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Exclusion => "exclusion",
            Kind::LostUpdate => "lost update",
            Kind::StaleTokenAccepted => "stale token accepted",
            Kind::TokenOrder => "token order",
            Kind::Unfinished => "unfinished history",
            Kind::Takeover => "takeover",
            Kind::ActedAfterLost => "acted after it was told lost",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: Kind,
    pub text: String,
}

/// The checker's verdict and the run's figures.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub clients: usize,
    pub operations: usize,
    pub holds: usize,
    pub violations: Vec<Violation>,
    pub lost_updates: u64,
    /// Lost updates made by zombies (unfenced writes after a pause): the documented hazard.
    pub excused_lost_updates: u64,
    /// Register writes refused because a higher token had been accepted.
    pub refused_writes: usize,
    pub lost_signals: usize,
    /// After each kill (or pause, or cut) of a holder: when the lock was next granted.
    pub takeovers: Vec<Duration>,
    pub kills: usize,
    pub pauses: usize,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }

    pub fn max_takeover(&self) -> Option<Duration> {
        self.takeovers.iter().max().copied()
    }

    fn violation(&mut self, kind: Kind, text: String) {
        self.violations.push(Violation { kind, text });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} clients, {} operations, {} holds, {} lost signals, {} kills, {} pauses; \
             lost updates {} (excused {}), register refused {}, max takeover {}",
            self.clients,
            self.operations,
            self.holds,
            self.lost_signals,
            self.kills,
            self.pauses,
            self.lost_updates,
            self.excused_lost_updates,
            self.refused_writes,
            self.max_takeover()
                .map_or("-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
        )?;
        let mut kinds: BTreeMap<Kind, Vec<&str>> = BTreeMap::new();
        for v in &self.violations {
            kinds.entry(v.kind).or_default().push(&v.text);
        }
        for (kind, texts) in kinds {
            writeln!(f, "VIOLATION {kind}: {} of them", texts.len())?;
            for t in texts.iter().take(5) {
                writeln!(f, "  {t}")?;
            }
        }
        Ok(())
    }
}

/// One hold, as reconstructed from a client's history.
#[derive(Debug, Clone)]
struct Hold {
    client: String,
    h: u64,
    exclusive: bool,
    invoked: u64,
    start: u64,
    /// When the holder stopped believing, and why.
    end: u64,
    why: &'static str,
    token: Option<u64>,
    /// When it was told its lease was lost.
    lost: Option<u64>,
    /// Its last guarded action (a counter update or a register write begun).
    last_action: Option<u64>,
    /// Zombie windows: [pause, resume + grace).
    zombie: Vec<(u64, u64)>,
}

impl Hold {
    fn conflicts(&self, other: &Hold) -> bool {
        self.exclusive || other.exclusive
    }

    /// The belief intervals: [start, end) less the zombie windows.
    fn belief(&self) -> Vec<(u64, u64)> {
        let mut out = vec![(self.start, self.end)];
        for &(a, b) in &self.zombie {
            out = out
                .into_iter()
                .flat_map(|(s, e)| {
                    let mut v = Vec::new();
                    if s < a.min(e) {
                        v.push((s, a.min(e)));
                    }
                    if b.max(s) < e {
                        v.push((b.max(s), e));
                    }
                    v
                })
                .collect();
        }
        out
    }

    fn name(&self) -> String {
        format!(
            "{} hold {} ({}{})",
            self.client,
            self.h,
            if self.exclusive {
                "exclusive"
            } else {
                "shared"
            },
            self.token.map_or(String::new(), |t| format!(", token {t}"))
        )
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Checks a run.
pub fn check(input: &Input, params: &Params) -> Report {
    let mut report = Report::default();
    let mut nemesis: Vec<&Event> = input.nemesis.iter().collect();
    let mut clients: Vec<&Vec<Event>> = Vec::new();
    for hist in &input.histories {
        if hist.first().is_some_and(|e| e.client == "nemesis") {
            nemesis.extend(hist.iter());
        } else if !hist.is_empty() {
            clients.push(hist);
        }
    }
    nemesis.sort_by_key(|e| e.mono);
    report.clients = clients.len();
    let grace = u64::try_from(params.resume_grace.as_nanos()).unwrap_or(u64::MAX);
    let kills: Vec<&Event> = nemesis
        .iter()
        .copied()
        .filter(|e| e.op == Op::Kill)
        .collect();
    report.kills = kills.len();
    // Pause windows per client.
    let mut pauses: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    let mut open: HashMap<String, u64> = HashMap::new();
    for e in &nemesis {
        let Some(target) = &e.target else { continue };
        match e.op {
            Op::Pause => {
                open.insert(target.clone(), e.mono);
                report.pauses += 1;
            }
            Op::Resume => {
                if let Some(p) = open.remove(target) {
                    pauses
                        .entry(target.clone())
                        .or_default()
                        .push((p, e.mono.saturating_add(grace)));
                }
            }
            _ => {}
        }
    }
    for (target, p) in open {
        pauses.entry(target).or_default().push((p, u64::MAX));
    }

    // Rebuild holds, and check that every history ends.
    let mut holds: Vec<Hold> = Vec::new();
    let mut counter_ok: Vec<(u64, String, bool)> = Vec::new(); // (wrote, hold name, excused)
    let mut counter_unknown = 0u64;
    for hist in &clients {
        let client = hist[0].client.clone();
        let killed_pids: Vec<(u32, u64)> = kills
            .iter()
            .filter(|k| k.target.as_deref() == Some(client.as_str()))
            .filter_map(|k| k.target_pid.map(|p| (p, k.mono)))
            .collect();
        let ended = hist.iter().any(|e| e.op == Op::End);
        let pids_in: Vec<u32> = hist.iter().map(|e| e.pid).collect();
        let was_killed = killed_pids.iter().any(|(p, _)| pids_in.contains(p));
        if !ended && !was_killed {
            let last = hist.last().expect("not empty");
            report.violation(
                Kind::Unfinished,
                format!(
                    "{client}: the history ends without `end` and nobody killed it (last: {:?} {:?} of hold {:?})",
                    last.op, last.phase, last.h
                ),
            );
        }
        // Last event of each pid in this history.
        let mut last_of: HashMap<u32, u64> = HashMap::new();
        for e in hist.iter() {
            last_of.insert(e.pid, e.mono);
        }
        let mut current: Option<Hold> = None;
        let mut invoked: HashMap<u64, u64> = HashMap::new();
        let mut counter_invoked: HashMap<u64, u64> = HashMap::new();
        let close = |hold: &mut Hold, at: u64, why: &'static str| {
            if at < hold.end {
                hold.end = at;
                hold.why = why;
            }
        };
        for e in hist.iter() {
            match (e.op, e.phase) {
                (Op::Acquire, Phase::Invoke) => {
                    report.operations += 1;
                    if let Some(h) = e.h {
                        invoked.insert(h, e.mono);
                    }
                }
                (Op::Acquire, Phase::Ok) => {
                    if let Some(h) = current.take() {
                        holds.push(h);
                    }
                    let h = e.h.unwrap_or(0);
                    // The end of belief if nothing else ends it: the process's last event, or
                    // its death.
                    let death = killed_pids
                        .iter()
                        .filter(|(p, k)| *p == e.pid && *k >= e.mono)
                        .map(|(_, k)| *k)
                        .min();
                    let last = last_of.get(&e.pid).copied().unwrap_or(e.mono);
                    let (end, why) = match death {
                        Some(k) => (k, "killed"),
                        None => (last, "history ends"),
                    };
                    current = Some(Hold {
                        client: client.clone(),
                        h,
                        exclusive: e.mode.as_deref() != Some("s"),
                        invoked: invoked.get(&h).copied().unwrap_or(e.mono),
                        start: e.mono,
                        end: end.max(e.mono),
                        why,
                        token: e.token,
                        lost: None,
                        last_action: None,
                        zombie: Vec::new(),
                    });
                    report.holds += 1;
                }
                (Op::Release, Phase::Invoke) => {
                    report.operations += 1;
                    if let Some(hold) = current.as_mut().filter(|c| Some(c.h) == e.h) {
                        close(hold, e.mono, "released");
                    }
                }
                (Op::Lost, _) => {
                    report.lost_signals += 1;
                    if let Some(hold) = current.as_mut().filter(|c| e.h.is_none_or(|h| h == c.h)) {
                        close(hold, e.mono, "lost");
                        hold.lost.get_or_insert(e.mono);
                    }
                }
                (Op::Counter | Op::Register, Phase::Invoke) => {
                    if let Some(hold) = current.as_mut().filter(|c| e.h == Some(c.h)) {
                        hold.last_action = Some(e.mono);
                    }
                    if e.op == Op::Register {
                        report.operations += 1;
                        continue;
                    }
                    report.operations += 1;
                    if let Some(h) = e.h {
                        counter_invoked.insert(h, e.mono);
                    }
                }
                (Op::Counter, Phase::Ok) => {
                    let h = e.h.unwrap_or(0);
                    let from = counter_invoked.remove(&h).unwrap_or(e.mono);
                    let excused = pauses
                        .get(&client)
                        .into_iter()
                        .flatten()
                        .any(|(p, _)| *p >= from && *p <= e.mono);
                    counter_ok.push((e.wrote.unwrap_or(0), format!("{client} hold {h}"), excused));
                }
                (Op::Counter, Phase::Fail) => {
                    if let Some(h) = e.h {
                        counter_invoked.remove(&h);
                    }
                }
                (Op::Counter, Phase::Info) => {}
                _ => {}
            }
        }
        if let Some(h) = current.take() {
            holds.push(h);
        }
        counter_unknown += counter_invoked.len() as u64;
    }
    let tolerance = 100 * 1_000_000;
    for hold in &mut holds {
        // A holder that acts believes it holds, whatever it was told.
        if let (Some(lost), Some(act)) = (hold.lost, hold.last_action) {
            if act > hold.end {
                hold.end = act;
                hold.why = "acted after it was told lost";
            }
            let zombie = pauses
                .get(&hold.client)
                .into_iter()
                .flatten()
                .any(|(p, r)| *p <= act && act < *r);
            if act > lost + tolerance && !zombie {
                report.violation(
                    Kind::ActedAfterLost,
                    format!(
                        "{} {} hold {} acted {:.0} ms after it was told its lease was lost",
                        hold.client,
                        if hold.exclusive {
                            "exclusive"
                        } else {
                            "shared"
                        },
                        hold.h,
                        ms(act - lost)
                    ),
                );
            }
        }
        hold.zombie = pauses
            .get(&hold.client)
            .into_iter()
            .flatten()
            .filter(|(p, r)| *p < hold.end && *r > hold.start)
            .copied()
            .collect();
    }

    check_exclusion(&holds, &mut report);
    check_counter(input.counter, &counter_ok, counter_unknown, &mut report);
    check_register(&input.register, &mut report);
    check_tokens(&holds, &mut report);
    check_takeovers(&holds, &nemesis, params, &mut report);
    report
}

fn check_exclusion(holds: &[Hold], report: &mut Report) {
    let mut segs: Vec<(u64, u64, usize)> = holds
        .iter()
        .enumerate()
        .flat_map(|(i, h)| h.belief().into_iter().map(move |(a, b)| (a, b, i)))
        .filter(|(a, b, _)| a < b)
        .collect();
    segs.sort();
    let mut seen = std::collections::HashSet::new();
    for (n, &(a, b, i)) in segs.iter().enumerate() {
        for &(c, d, j) in &segs[n + 1..] {
            if c >= b {
                break;
            }
            let (x, y) = (&holds[i], &holds[j]);
            if i == j || !x.conflicts(y) || !seen.insert((i.min(j), i.max(j))) {
                continue;
            }
            let overlap = b.min(d) - c.max(a);
            report.violation(
                Kind::Exclusion,
                format!(
                    "{} (believed until {} ms: {}) and {} (from {} ms) held it together for {:.1} ms",
                    x.name(),
                    ms(x.end),
                    x.why,
                    y.name(),
                    ms(c),
                    ms(overlap)
                ),
            );
        }
    }
}

fn check_counter(
    counter: Option<u64>,
    ok: &[(u64, String, bool)],
    unknown: u64,
    report: &mut Report,
) {
    let Some(value) = counter else { return };
    let acknowledged = ok.len() as u64;
    let mut by_value: BTreeMap<u64, Vec<&(u64, String, bool)>> = BTreeMap::new();
    for inc in ok {
        by_value.entry(inc.0).or_default().push(inc);
    }
    let mut dup = 0u64;
    let mut excused = 0u64;
    let mut texts = Vec::new();
    for (v, incs) in &by_value {
        if incs.len() > 1 {
            let n = incs.len() as u64 - 1;
            if incs.iter().any(|i| i.2) {
                excused += n;
            } else {
                dup += n;
                texts.push(format!(
                    "value {v} written by {}",
                    incs.iter()
                        .map(|i| i.1.as_str())
                        .collect::<Vec<_>>()
                        .join(" and ")
                ));
            }
        }
    }
    let short = acknowledged.saturating_sub(value);
    let lost = short.max(dup + excused);
    report.excused_lost_updates = excused.min(lost);
    report.lost_updates = lost - report.excused_lost_updates;
    if report.lost_updates > 0 {
        report.violation(
            Kind::LostUpdate,
            format!(
                "the counter is {value} after {acknowledged} acknowledged increments ({unknown} unknown): {} lost; {}",
                report.lost_updates,
                texts.join("; ")
            ),
        );
    }
    if value > acknowledged + unknown {
        report.violation(
            Kind::LostUpdate,
            format!("the counter is {value}, more than the {acknowledged} acknowledged and {unknown} unknown increments"),
        );
    }
}

fn check_register(decisions: &[Decision], report: &mut Report) {
    let mut max: Option<(u64, &Decision)> = None;
    for d in decisions {
        if !d.accepted {
            report.refused_writes += 1;
            continue;
        }
        match max {
            Some((m, by)) if d.token < m => report.violation(
                Kind::StaleTokenAccepted,
                format!(
                    "the register accepted token {} from {} hold {} (seq {}) after token {m} from {} hold {}",
                    d.token, d.client, d.h, d.seq, by.client, by.h
                ),
            ),
            Some((m, _)) if d.token == m => {}
            _ => max = Some((d.token, d)),
        }
    }
}

fn check_tokens(holds: &[Hold], report: &mut Report) {
    let mut with: Vec<&Hold> = holds.iter().filter(|h| h.token.is_some()).collect();
    with.sort_by_key(|h| h.start);
    let mut by_invoke = with.clone();
    by_invoke.sort_by_key(|h| h.invoked);
    // For each hold (by invoke), the largest token of the holds granted before it was invoked.
    let mut granted = 0;
    let mut best: Option<&Hold> = None;
    for b in by_invoke {
        while granted < with.len() && with[granted].start < b.invoked {
            let a = with[granted];
            if best.is_none_or(|m| a.token > m.token) {
                best = Some(a);
            }
            granted += 1;
        }
        if let Some(a) = best {
            // Shared holders joining one lease may share its token.
            let same_lease = !a.exclusive && !b.exclusive && a.token == b.token;
            if a.token >= b.token && !same_lease {
                report.violation(
                    Kind::TokenOrder,
                    format!(
                        "{} was granted before {} asked, yet its token is not smaller",
                        a.name(),
                        b.name()
                    ),
                );
            }
        }
    }
}

fn check_takeovers(holds: &[Hold], nemesis: &[&Event], params: &Params, report: &mut Report) {
    let run_end = holds.iter().map(|h| h.end).max().unwrap_or(0);
    for e in nemesis {
        let (Some(target), true) = (
            &e.target,
            matches!(e.op, Op::Kill | Op::Pause | Op::Partition),
        ) else {
            continue;
        };
        // The victim's hold at that moment, if it was holding.
        let Some(victim) = holds
            .iter()
            .find(|h| &h.client == target && h.start <= e.mono && e.mono <= h.end)
        else {
            continue;
        };
        let next = holds
            .iter()
            .filter(|h| h.client != victim.client && h.start > e.mono && h.conflicts(victim))
            .map(|h| h.start)
            .min();
        let Some(next) = next else {
            if e.op == Op::Kill {
                if let Some(bound) = params.takeover_bound {
                    let waited = Duration::from_nanos(run_end.saturating_sub(e.mono));
                    if waited > bound {
                        report.violation(
                            Kind::Takeover,
                            format!(
                                "{} was killed and nobody took the lock in the {:.1} s the run went on",
                                victim.name(),
                                waited.as_secs_f64()
                            ),
                        );
                    }
                }
            }
            continue;
        };
        let took = Duration::from_nanos(next - e.mono);
        report.takeovers.push(took);
        if let (Op::Kill, Some(bound)) = (e.op, params.takeover_bound) {
            if took > bound {
                report.violation(
                    Kind::Takeover,
                    format!(
                        "{} was killed; the lock was taken over {:.2} s later, over the bound of {:.2} s",
                        victim.name(),
                        took.as_secs_f64(),
                        bound.as_secs_f64()
                    ),
                );
            }
        }
        if let Some(floor) = params.takeover_floor {
            if took < floor {
                report.violation(
                    Kind::Takeover,
                    format!(
                        "{} was disabled ({:?}); the lock was taken over {:.2} s later, before its lease could expire ({:.2} s)",
                        victim.name(),
                        e.op,
                        took.as_secs_f64(),
                        floor.as_secs_f64()
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The checker on small made-up histories: it must flag each kind of violation, and pass
    //! the same histories without the fault.

    use super::*;

    const MS: u64 = 1_000_000;

    fn ev(c: &str, op: Op, t: Phase, h: u64, at_ms: u64) -> Event {
        let mut e = Event::now(c, op, t);
        e.pid = c.bytes().map(u32::from).sum();
        e.h = Some(h);
        e.mono = at_ms * MS;
        e
    }

    /// A complete exclusive hold of `c` from `a` to `b` ms with `token`, incrementing the counter
    /// from `read`.
    fn hold(c: &str, h: u64, a: u64, b: u64, token: u64, read: u64) -> Vec<Event> {
        let mut ok = ev(c, Op::Acquire, Phase::Ok, h, a);
        ok.mode = Some("x".into());
        ok.token = Some(token);
        let mut inc = ev(c, Op::Counter, Phase::Ok, h, a + 1);
        inc.read = Some(read);
        inc.wrote = Some(read + 1);
        vec![
            ev(c, Op::Acquire, Phase::Invoke, h, a.saturating_sub(1)),
            ok,
            ev(c, Op::Counter, Phase::Invoke, h, a),
            inc,
            ev(c, Op::Release, Phase::Invoke, h, b),
            ev(c, Op::Release, Phase::Ok, h, b + 1),
        ]
    }

    fn end(c: &str, at: u64) -> Event {
        ev(c, Op::End, Phase::Ok, 0, at)
    }

    fn params() -> Params {
        Params {
            resume_grace: Duration::from_millis(500),
            takeover_bound: Some(Duration::from_secs(9)),
            takeover_floor: Some(Duration::from_secs(3)),
        }
    }

    fn run(histories: Vec<Vec<Event>>, counter: u64) -> Report {
        check(
            &Input {
                histories,
                counter: Some(counter),
                ..Default::default()
            },
            &params(),
        )
    }

    #[test]
    fn a_serial_history_passes() {
        let a = [hold("a", 1, 10, 20, 5, 0), vec![end("a", 100)]].concat();
        let b = [hold("b", 1, 30, 40, 7, 1), vec![end("b", 100)]].concat();
        let r = run(vec![a, b], 2);
        assert!(r.ok(), "{r}");
        assert_eq!((r.holds, r.lost_updates), (2, 0));
    }

    #[test]
    fn overlapping_exclusive_holds_are_caught() {
        let a = [hold("a", 1, 10, 40, 5, 0), vec![end("a", 100)]].concat();
        let b = [hold("b", 1, 30, 50, 7, 1), vec![end("b", 100)]].concat();
        let r = run(vec![a, b], 2);
        assert_eq!(r.count(Kind::Exclusion), 1, "{r}");
    }

    #[test]
    fn a_holder_told_lost_before_the_overlap_is_excused() {
        let mut a = hold("a", 1, 10, 40, 5, 0);
        a.insert(4, ev("a", Op::Lost, Phase::Ok, 1, 25));
        a.push(end("a", 100));
        let b = [hold("b", 1, 30, 50, 7, 1), vec![end("b", 100)]].concat();
        let r = run(vec![a.clone(), b.clone()], 2);
        assert!(r.ok(), "{r}");
        // Told in time, but it went on acting: it still believed it held the lock.
        let mut deaf = a.clone();
        deaf.insert(5, ev("a", Op::Counter, Phase::Invoke, 1, 36));
        let r = run(vec![deaf, b.clone()], 2);
        assert_eq!(r.count(Kind::Exclusion), 1, "{r}");
        // Told only after the overlap began: a violation.
        a[4].mono = 35 * MS;
        let r = run(vec![a, b], 2);
        assert_eq!(r.count(Kind::Exclusion), 1, "{r}");
    }

    #[test]
    fn acting_long_after_being_told_lost_is_caught() {
        let mut a = hold("a", 1, 10, 900, 5, 0);
        a.insert(4, ev("a", Op::Lost, Phase::Ok, 1, 100));
        a.insert(5, ev("a", Op::Register, Phase::Invoke, 1, 150));
        a.push(end("a", 1000));
        let r = run(vec![a.clone()], 1);
        assert!(r.ok(), "within the tolerance for a decision in flight: {r}");
        a[5].mono = 400 * MS;
        let r = run(vec![a], 1);
        assert_eq!(r.count(Kind::ActedAfterLost), 1, "{r}");
    }

    #[test]
    fn shared_holds_may_overlap_but_not_with_exclusive_ones() {
        let mut a = hold("a", 1, 10, 40, 5, 0);
        a[1].mode = Some("s".into());
        a.retain(|e| e.op != Op::Counter);
        let mut b = a.clone();
        for e in &mut b {
            e.client = "b".into();
            e.pid += 1;
        }
        let r = run(
            vec![
                [a.clone(), vec![end("a", 99)]].concat(),
                [b, vec![end("b", 99)]].concat(),
            ],
            0,
        );
        assert!(r.ok(), "{r}");
        let c = [hold("c", 1, 20, 30, 9, 0), vec![end("c", 99)]].concat();
        let r = run(vec![[a, vec![end("a", 99)]].concat(), c], 1);
        assert_eq!(r.count(Kind::Exclusion), 1, "{r}");
    }

    #[test]
    fn lost_updates_are_counted_and_unknown_increments_may_go_either_way() {
        let a = [hold("a", 1, 10, 20, 5, 0), vec![end("a", 100)]].concat();
        // b read a stale value: both wrote 1.
        let b = [hold("b", 1, 30, 40, 7, 0), vec![end("b", 100)]].concat();
        let r = run(vec![a.clone(), b], 1);
        assert_eq!((r.count(Kind::LostUpdate), r.lost_updates), (1, 1), "{r}");
        // An increment whose outcome is unknown (the holder was killed while writing): the
        // counter may or may not include it.
        let mut c = hold("c", 1, 30, 40, 7, 1);
        c.truncate(3);
        let kill = Event {
            target: Some("c".into()),
            target_pid: Some(c[0].pid),
            ..ev("nemesis", Op::Kill, Phase::Ok, 0, 35)
        };
        for value in [1, 2] {
            let r = check(
                &Input {
                    histories: vec![a.clone(), c.clone()],
                    nemesis: vec![kill.clone()],
                    counter: Some(value),
                    ..Default::default()
                },
                &Params {
                    takeover_bound: None,
                    ..params()
                },
            );
            assert!(r.ok(), "counter {value}: {r}");
        }
    }

    #[test]
    fn a_history_that_stops_without_end_or_kill_is_a_hung_client() {
        let a = hold("a", 1, 10, 20, 5, 0);
        let r = run(vec![a], 1);
        assert_eq!(r.count(Kind::Unfinished), 1, "{r}");
    }

    #[test]
    fn stale_tokens_accepted_by_the_register_are_caught() {
        let d = |seq, token, accepted| Decision {
            seq,
            token,
            max_before: 0,
            accepted,
            client: "a".into(),
            h: seq,
            mono: seq,
        };
        let good = vec![d(1, 5, true), d(2, 7, true), d(2, 6, false), d(3, 7, true)];
        let r = check(
            &Input {
                register: good.clone(),
                ..Default::default()
            },
            &params(),
        );
        assert!(r.ok(), "{r}");
        assert_eq!(r.refused_writes, 1);
        let mut bad = good;
        bad[2].accepted = true;
        let r = check(
            &Input {
                register: bad,
                ..Default::default()
            },
            &params(),
        );
        assert_eq!(r.count(Kind::StaleTokenAccepted), 1, "{r}");
    }

    #[test]
    fn tokens_that_go_backwards_are_caught() {
        let a = [hold("a", 1, 10, 20, 9, 0), vec![end("a", 100)]].concat();
        let b = [hold("b", 1, 30, 40, 7, 1), vec![end("b", 100)]].concat();
        let r = run(vec![a, b], 2);
        assert_eq!(r.count(Kind::TokenOrder), 1, "{r}");
    }

    #[test]
    fn a_paused_holder_is_a_zombie_until_the_grace_after_it_continues() {
        // a holds from 10 ms, is paused at 20 ms for 5 s; b takes over at 4 s; a continues at
        // 5.02 s and sees its loss at 5.1 s.
        let mut a = hold("a", 1, 10, 8500, 5, 0);
        a.insert(4, ev("a", Op::Lost, Phase::Ok, 1, 5100));
        a.push(end("a", 9000));
        let b = [hold("b", 1, 4000, 4100, 7, 1), vec![end("b", 9000)]].concat();
        let pause = Event {
            target: Some("a".into()),
            ..ev("nemesis", Op::Pause, Phase::Ok, 0, 20)
        };
        let resume = Event {
            target: Some("a".into()),
            ..ev("nemesis", Op::Resume, Phase::Ok, 0, 5020)
        };
        let input = |a: Vec<Event>, b: Vec<Event>| Input {
            histories: vec![a, b],
            nemesis: vec![pause.clone(), resume.clone()],
            counter: Some(2),
            ..Default::default()
        };
        let r = check(&input(a.clone(), b.clone()), &params());
        assert!(r.ok(), "{r}");
        assert_eq!(r.takeovers, vec![Duration::from_millis(3980)]);
        // Taken over at 2 s: before the lease could have expired.
        let early = [hold("b", 1, 2000, 2100, 7, 1), vec![end("b", 9000)]].concat();
        let r = check(&input(a.clone(), early), &params());
        assert_eq!(r.count(Kind::Takeover), 1, "{r}");
        // Still believing well after it continued while another holds: a violation.
        let mut late = a.clone();
        late[4].mono = 8000 * MS;
        let c = [hold("c", 1, 6000, 6100, 8, 2), vec![end("c", 9000)]].concat();
        let r = check(
            &Input {
                histories: vec![late, b, c],
                nemesis: vec![pause.clone(), resume.clone()],
                counter: Some(3),
                ..Default::default()
            },
            &params(),
        );
        assert_eq!(r.count(Kind::Exclusion), 1, "{r}");
    }

    #[test]
    fn a_killed_holder_must_be_taken_over_within_the_bound() {
        let mut a = hold("a", 1, 10, 20, 5, 0);
        a.truncate(4);
        let kill = Event {
            target: Some("a".into()),
            target_pid: Some(a[0].pid),
            ..ev("nemesis", Op::Kill, Phase::Ok, 0, 100)
        };
        for (at, ok) in [(5000, true), (12000, false)] {
            let b = [hold("b", 1, at, at + 10, 7, 1), vec![end("b", at + 100)]].concat();
            let r = check(
                &Input {
                    histories: vec![a.clone(), b],
                    nemesis: vec![kill.clone()],
                    counter: Some(2),
                    ..Default::default()
                },
                &params(),
            );
            assert_eq!(r.ok(), ok, "taken over at {at} ms: {r}");
        }
    }
}
