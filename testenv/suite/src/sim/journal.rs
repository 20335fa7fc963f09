//! What the simulated clients believed, checked as it happens.
//!
//! A hold is believed from its grant until its release call or until its lost signal fires
//! (the moment `LockGuard::is_lost` turns true — the library's promise is that this comes
//! before anyone may take the lock over). So at every grant the checker looks at every other
//! hold of the lock that conflicts with it and has not been released: its lost signal must say
//! lost *at that instant* (read on that holder's own boot clock), unless its process is dead.
//! Fencing tokens must grow from each grant to the next conflicting one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockgate::{LostSignal, Mode};

use super::go::GoBelief;
use super::world::{as_host_at, trace_line, HostId};

/// What tells whether a holder still believes it holds.
#[derive(Debug, Clone)]
pub enum Belief {
    /// A lockgate holder: its lost signal (read on its own boot clock).
    Rust(LostSignal),
    /// A Go lockgate holder.
    Go(Arc<GoBelief>),
}

/// One hold, as its client believed it.
#[derive(Debug)]
pub struct Hold {
    pub client: String,
    pub host: HostId,
    host_started: Duration,
    pub name: String,
    pub mode: Mode,
    pub granted: Duration,
    pub token: Option<u64>,
    /// When the client called release (or dropped its guard), or saw it lost.
    pub ended: Option<Duration>,
    belief: Belief,
    /// The lease's uuid, once known (from the record its grant left).
    uuid: Option<String>,
}

/// Counts of what happened, for the report.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub attempts: u64,
    pub grants: u64,
    pub would_block: u64,
    pub timed_out: u64,
    pub cancelled: u64,
    pub errors: u64,
    pub lost: u64,
    pub releases: u64,
    pub release_errors: u64,
    pub go_errors: u64,
}

#[derive(Debug, Default)]
struct Inner {
    holds: Vec<Hold>,
    dead: Vec<HostId>,
    violations: Vec<String>,
    counts: Counts,
    /// Error messages seen (first few of each), for the report.
    errors: Vec<String>,
}

/// The shared journal of one run.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Inner>>);

impl Journal {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A grant to the lockgate client `client` on `host` at world time `now`; returns the
    /// hold's index.
    #[allow(clippy::too_many_arguments)]
    pub fn grant(
        &self,
        client: &str,
        host: HostId,
        host_started: Duration,
        now: Duration,
        name: &str,
        mode: Mode,
        token: Option<u64>,
        signal: LostSignal,
    ) -> usize {
        self.grant_belief(
            client,
            host,
            host_started,
            now,
            name,
            mode,
            token,
            Belief::Rust(signal),
        )
    }

    /// A grant to any client, with what tells its belief.
    #[allow(clippy::too_many_arguments)]
    pub fn grant_belief(
        &self,
        client: &str,
        host: HostId,
        host_started: Duration,
        now: Duration,
        name: &str,
        mode: Mode,
        token: Option<u64>,
        belief: Belief,
    ) -> usize {
        let mut j = self.inner();
        j.counts.grants += 1;
        let mut found = Vec::new();
        for h in &j.holds {
            if h.name != name || (h.mode == Mode::Shared && mode == Mode::Shared) {
                continue;
            }
            if let (Some(a), Some(b)) = (h.token, token) {
                if b <= a {
                    found.push(format!(
                        "{now:?}: {client} was granted {name:?} ({mode}) with fencing token {b}, not above {}'s {a} (granted at {:?})",
                        h.client, h.granted
                    ));
                }
            }
            if h.ended.is_some_and(|e| e <= now) || j.dead.contains(&h.host) {
                continue;
            }
            let lost = match &h.belief {
                Belief::Rust(signal) => {
                    as_host_at(h.host_started, now, || signal.reason()).is_some()
                }
                Belief::Go(b) => b.over(now),
            };
            if !lost {
                found.push(format!(
                    "{now:?}: {client} was granted {name:?} ({mode}) while {} (granted {:?} at {:?}, token {:?}) still held it, not told it was lost",
                    h.client, h.mode, h.granted, h.token
                ));
            }
        }
        trace_line(now, || {
            format!("{client}: GRANTED {name} {mode} token {token:?}")
        });
        for v in &found {
            trace_line(now, || format!("VIOLATION {v}"));
        }
        j.violations.extend(found);
        j.holds.push(Hold {
            client: client.to_owned(),
            host,
            host_started,
            name: name.to_owned(),
            mode,
            granted: now,
            token,
            ended: None,
            uuid: match &belief {
                Belief::Go(b) => Some(b.uuid.clone()),
                Belief::Rust(_) => None,
            },
            belief,
        });
        j.holds.len() - 1
    }

    /// The hold `i` ended (release called, guard dropped, or seen lost) at `now`.
    pub fn ended(&self, i: usize, now: Duration, lost: bool) {
        let mut j = self.inner();
        if lost {
            j.counts.lost += 1;
        }
        if let Some(h) = j.holds.get_mut(i) {
            h.ended.get_or_insert(now);
            let (client, name) = (h.client.clone(), h.name.clone());
            trace_line(now, || {
                format!(
                    "{client}: ENDS {name}{}",
                    if lost { " (told lost)" } else { "" }
                )
            });
        }
    }

    /// After a write: every lease still believed by holders must be the record's, with a count
    /// of at least its believers. (A believed share missing from the count — a release applied
    /// twice, a grant freed by another's release — is caught here the moment it happens, before
    /// anyone else is granted.)
    pub fn check_counts(
        &self,
        now: Duration,
        annotations: &std::collections::BTreeMap<String, String>,
        snapshots: &super::world::Snapshots<'_>,
    ) {
        let mut j = self.inner();
        let dead = j.dead.clone();
        let mut believers: std::collections::BTreeMap<(String, String), Vec<String>> =
            Default::default();
        for h in j.holds.iter_mut() {
            if h.ended.is_some_and(|e| e <= now) || dead.contains(&h.host) {
                continue;
            }
            let believes = match &h.belief {
                Belief::Rust(signal) => {
                    as_host_at(h.host_started, now, || signal.reason()).is_none()
                }
                Belief::Go(b) => !b.over(now),
            };
            if !believes {
                continue;
            }
            let key = lockgate::kubernetes::annotation_key(&h.name);
            if h.uuid.is_none() {
                h.uuid = h
                    .token
                    .and_then(|t| snapshots.at(t, &key))
                    .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
                    .and_then(|r| r["uuid"].as_str().map(str::to_owned));
            }
            if let Some(u) = &h.uuid {
                believers
                    .entry((key, u.clone()))
                    .or_default()
                    .push(h.client.clone());
            }
        }
        let mut found = Vec::new();
        for ((key, uuid), who) in believers {
            let rec = annotations
                .get(&key)
                .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok());
            let (now_uuid, count) = rec
                .as_ref()
                .map(|r| {
                    (
                        r["uuid"].as_str().unwrap_or("").to_owned(),
                        r["SharedHoldersCount"].as_i64().unwrap_or(0),
                    )
                })
                .unwrap_or_default();
            if now_uuid != uuid {
                found.push(format!(
                    "{now:?}: the lease {uuid} of {key} is believed by {who:?}, but the record is {}",
                    if rec.is_some() { format!("another lease ({now_uuid})") } else { "gone".into() }
                ));
            } else if count < who.len() as i64 {
                found.push(format!(
                    "{now:?}: the lease {uuid} of {key} counts {count} holders, {} believe they hold it: {who:?}",
                    who.len()
                ));
            }
        }
        for v in &found {
            trace_line(now, || format!("VIOLATION {v}"));
        }
        j.violations.extend(found);
    }

    /// Host `h` was killed: its holds end with it.
    pub fn dead(&self, h: HostId) {
        self.inner().dead.push(h);
    }

    pub fn violation(&self, v: String) {
        self.inner().violations.push(v);
    }

    pub fn count(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.inner().counts);
    }

    /// Notes a Go peer's error (Go's own races: counted, not violations).
    pub fn go_error(&self, e: String) {
        let mut j = self.inner();
        j.counts.go_errors += 1;
        let e = format!("go: {e}");
        if j.errors.len() < 20 && !j.errors.contains(&e) {
            j.errors.push(e);
        }
    }

    /// Notes an error message (the first 20 distinct kinds).
    pub fn error(&self, e: String) {
        let mut j = self.inner();
        j.counts.errors += 1;
        if j.errors.len() < 20 && !j.errors.contains(&e) {
            j.errors.push(e);
        }
    }

    pub fn violations(&self) -> Vec<String> {
        self.inner().violations.clone()
    }

    pub fn counts(&self) -> Counts {
        self.inner().counts.clone()
    }

    pub fn errors(&self) -> Vec<String> {
        self.inner().errors.clone()
    }

    /// Holds not ended, of live hosts.
    pub fn open_holds(&self) -> Vec<String> {
        let j = self.inner();
        j.holds
            .iter()
            .filter(|h| h.ended.is_none() && !j.dead.contains(&h.host))
            .map(|h| format!("{} {:?} {} since {:?}", h.client, h.name, h.mode, h.granted))
            .collect()
    }
}
