//! Scripted schedules: a test chooses what the network does with particular requests (hold
//! this PATCH until the next read, lose that answer) and drives lockers step by step, while the
//! journal checks every grant as in a search.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockgate::kubernetes::{LeaseConfig, Target};
use lockgate::{AcquireError, AcquireOptions, KubernetesLocker, LockGuard, Locker, Mode, Wait};
use serde_json::Value;

use super::api::{self, Request};
use super::journal::Journal;
use super::rng::Rng;
use super::world::{host_now, HostId, Plan, Policy, RequestView, World};

/// A policy from a closure: `None` for a clean request (1 ms each way).
pub struct Script<F>(pub F);

impl<F> Policy for Script<F>
where
    F: FnMut(&mut Rng, &RequestView<'_>) -> Option<Plan>,
{
    fn plan(&mut self, rng: &mut Rng, view: &RequestView<'_>) -> Plan {
        (self.0)(rng, view)
            .unwrap_or_else(|| Plan::clean(Duration::from_millis(1), Duration::from_millis(1)))
    }
}

/// One change of a lock record in a JSON Patch: the record it tests for and the one it writes
/// (`None`: absent / removed), parsed.
#[derive(Debug, Clone)]
pub struct RecordChange {
    pub key: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

impl RecordChange {
    /// The `SharedHoldersCount` before and after.
    pub fn counts(&self) -> (i64, i64) {
        let n = |v: &Option<Value>| {
            v.as_ref()
                .map_or(0, |r| r["SharedHoldersCount"].as_i64().unwrap_or(0))
        };
        (n(&self.old), n(&self.new))
    }

    /// True when the change hands the lock to a waiter: the new record names a holder with a
    /// `Handoff` tag who was queued in the old one.
    pub fn hands_off(&self) -> bool {
        let (Some(old), Some(new)) = (&self.old, &self.new) else {
            return false;
        };
        new["Holders"].as_object().is_some_and(|h| {
            h.iter().any(|(id, e)| {
                e.get("Handoff").is_some() && old["QueueMembers"].get(id.as_str()).is_some()
            })
        })
    }

    /// True for the last holder's release: the record left free, or handed to waiters.
    pub fn last_release(&self) -> bool {
        let (old, new) = self.counts();
        old == 1 && (new == 0 || self.hands_off())
    }
}

/// The lock records a PATCH changes (empty for other requests).
pub fn record_changes(req: &Request) -> Vec<RecordChange> {
    if req.method != http::Method::PATCH {
        return Vec::new();
    }
    let Ok(Value::Array(ops)) = serde_json::from_slice::<Value>(&req.body) else {
        return Vec::new();
    };
    let parse = |v: &Value| {
        v.as_str()
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
    };
    let mut out: Vec<RecordChange> = Vec::new();
    for op in ops {
        let key = op["path"]
            .as_str()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_owned();
        match op["op"].as_str() {
            Some("test") => out.push(RecordChange {
                key,
                old: parse(&op["value"]),
                new: None,
            }),
            Some("add") => {
                if let Some(c) = out.iter_mut().rev().find(|c| c.key == key) {
                    c.new = parse(&op["value"]);
                }
            }
            _ => {}
        }
    }
    out
}

/// A guard held by a scripted client, or the error its acquisition ended with.
#[derive(Default)]
pub struct Slot {
    pub guard: Option<LockGuard>,
    pub error: Option<String>,
    /// The hold's index in the journal.
    pub hold: Option<usize>,
    /// When the guard was handed out (world time).
    pub granted_at: Option<Duration>,
    pub done: bool,
}

pub type SlotRef = Arc<Mutex<Slot>>;

/// A locker on host `h` over the simulated object [`super::OBJECT`].
pub fn locker(world: &World, h: HostId, lease: LeaseConfig) -> Locker {
    let client = world.client(h);
    world.enter_host(h, || {
        let target = Target::configmap(api::NAMESPACE, super::OBJECT);
        Locker::new(KubernetesLocker::new(client, target, lease).expect("a locker"))
    })
}

/// Starts an acquisition of `name` on host `h`; its guard lands in the returned slot (and in
/// the journal, which checks the grant).
pub fn acquire(
    world: &World,
    journal: &Journal,
    h: HostId,
    locker: &Locker,
    name: &str,
    mode: Mode,
    wait: Wait,
) -> SlotRef {
    let opts = AcquireOptions::default().mode(mode).wait(wait);
    let slot = SlotRef::default();
    let (s, j, l, name) = (
        Arc::clone(&slot),
        journal.clone(),
        locker.clone(),
        name.to_owned(),
    );
    let started = world.host(h).started();
    let client = format!("{}/{name}", world.host(h).name);
    world.spawn(h, async move {
        let r = l.acquire(&name, opts).await;
        let mut s = s.lock().unwrap();
        s.done = true;
        match r {
            Ok(g) => {
                let now = host_now().unwrap_or_default();
                s.hold = Some(j.grant(
                    &client,
                    h,
                    started,
                    now,
                    &name,
                    mode,
                    g.fencing_token(),
                    g.lost_signal(),
                ));
                s.granted_at = Some(now);
                s.guard = Some(g);
            }
            Err(e) => s.error = Some(error_kind(&e)),
        }
    });
    slot
}

fn error_kind(e: &AcquireError) -> String {
    match e {
        AcquireError::WouldBlock { .. } => "would block".into(),
        AcquireError::TimedOut { .. } => "timed out".into(),
        e => e.to_string(),
    }
}

/// Releases the guard in `slot` on host `h` (the journal notes the end of the hold first);
/// the release's result lands in the returned slot's `error` (`None`: released).
pub fn release(world: &World, journal: &Journal, h: HostId, slot: &SlotRef) -> SlotRef {
    let out = SlotRef::default();
    let (guard, hold) = {
        let mut s = slot.lock().unwrap();
        (s.guard.take(), s.hold)
    };
    let (o, j) = (Arc::clone(&out), journal.clone());
    world.spawn(h, async move {
        if let (Some(i), Some(now)) = (hold, host_now()) {
            j.ended(i, now, false);
        }
        let r = match guard {
            Some(g) => g.release().await.map_err(|e| e.to_string()),
            None => Err("no guard".into()),
        };
        let mut o = o.lock().unwrap();
        o.done = true;
        o.error = r.err();
    });
    out
}

/// True when the slot's acquisition or release ended.
pub fn done(slot: &SlotRef) -> bool {
    slot.lock().unwrap().done
}

/// True when the slot holds a guard.
pub fn holds(slot: &SlotRef) -> bool {
    slot.lock().unwrap().guard.is_some()
}

/// Runs the world until `cond` holds, at most `max` of virtual time; returns whether it held.
pub fn run_until(world: &mut World, max: Duration, mut cond: impl FnMut(&World) -> bool) -> bool {
    let end = world.now + max;
    while world.now < end {
        if cond(world) {
            return true;
        }
        world.run_for(Duration::from_millis(10));
    }
    cond(world)
}

/// The record of lock `name` on the simulated object now.
pub fn record(world: &World, name: &str) -> Option<Value> {
    let key = lockgate::kubernetes::annotation_key(name);
    world
        .server
        .annotations(super::OBJECT)
        .and_then(|a| a.get(&key).cloned())
        .and_then(|v| serde_json::from_str(&v).ok())
}
