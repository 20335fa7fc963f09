//! Go lockgate peers, modelled from the source of v0.1.1 and v0.2.0
//! (`pkg/distributed_locker/optimistic_locking_storage_base_backend.go` and
//! `distributed_locker.go`): GET the object, decide by the peer's own wall clock (`time.Now()`
//! against `ExpireAtTimestamp`), PUT the whole object with its resourceVersion, sleep a second
//! after a conflict (recognised by the message), poll every 2 s, renew every 3 s with a 10 s
//! TTL. v0.2.0 adds the acquirer queue: `TakeIfOldest` and `UpdateQueue` read the record again
//! (`changeLease`) and fail with `lock already leased` when its uuid changed meanwhile, or `no
//! existing lock lease found` when it vanished; `TakeIfOldest` keeps the old `IsShared`, and its
//! result survives a conflict-and-retry (`newLease` is not reset).
//!
//! A Go holder believes it holds until its release, or until its renewal finds the record
//! replaced; it has no deadline of its own (Go's known weakness). The journal counts a Go hold
//! as believed until the expiry it last wrote has passed by its clock: what a peer that trusted
//! its own `ExpireAtTimestamp` would do, and what Rust's rules protect.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde::{Deserialize, Serialize};

use super::journal::{Belief, Journal};
use super::rng::Rng;
use super::world::{host_now, host_wall, HostId};

const TTL: i64 = 10;
const POLL: Duration = Duration::from_secs(2);
const CONFLICT_PAUSE: Duration = Duration::from_secs(1);
const RENEW: Duration = Duration::from_secs(3);

/// Which Go lockgate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V011,
    V020,
}

/// Go's `LockLeaseRecord` (fields Go does not know are dropped when it writes).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    uuid: String,
    #[serde(rename = "lockName")]
    lock_name: String,
    #[serde(rename = "ExpireAtTimestamp")]
    expire_at: i64,
    #[serde(rename = "SharedHoldersCount")]
    count: i64,
    #[serde(rename = "IsShared")]
    shared: bool,
    #[serde(
        rename = "QueueMembers",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    queue: Option<BTreeMap<String, Member>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Member {
    #[serde(rename = "AcquirerId")]
    id: String,
    #[serde(rename = "AcquiredAtTimestamp")]
    arrived: i64,
    #[serde(rename = "ExpireAtTimestamp")]
    expire_at: i64,
}

/// Go's errors, by the meaning its message carries.
#[derive(Debug, Clone, PartialEq)]
pub enum GoError {
    ShouldWait,
    AlreadyLeased,
    NoLease,
    Other(String),
}

/// One Go process with its locker.
pub struct GoPeer {
    pub version: Version,
    api: Api<DynamicObject>,
    object: String,
    pub acquirer_id: Option<String>,
    rng: Rng,
}

fn now_unix() -> i64 {
    host_wall()
        .unwrap_or_else(SystemTime::now)
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `time.Now().After(time.Unix(e, 0))`, to the nanosecond.
fn expired(e: i64) -> bool {
    let now = host_wall().unwrap_or_else(SystemTime::now);
    now > SystemTime::UNIX_EPOCH + Duration::from_secs(e.max(0) as u64)
}

fn key(name: &str) -> String {
    lockgate::kubernetes::annotation_key(name)
}

impl GoPeer {
    pub fn new(
        version: Version,
        client: kube::Client,
        namespace: &str,
        object: &str,
        rng: Rng,
    ) -> Self {
        let ar = ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            plural: "configmaps".into(),
        };
        Self {
            version,
            api: Api::namespaced_with(client, namespace, &ar),
            object: object.to_owned(),
            acquirer_id: None,
            rng,
        }
    }

    async fn get(&self) -> Result<DynamicObject, GoError> {
        self.api
            .get(&self.object)
            .await
            .map_err(|e| GoError::Other(format!("unable to get store value: {e}")))
    }

    fn record(obj: &DynamicObject, name: &str) -> Result<Option<Record>, GoError> {
        match obj
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(&key(name)))
        {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => serde_json::from_str(v)
                .map(Some)
                .map_err(|e| GoError::Other(format!("unable to extract lock lease record: {e}"))),
        }
    }

    /// PUT `obj` with `rec` as the record of `name` (`None`: removed). `Ok(false)`: Go's
    /// optimistic locking error (a conflict).
    async fn put(
        &self,
        mut obj: DynamicObject,
        name: &str,
        rec: Option<&Record>,
    ) -> Result<bool, GoError> {
        let annotations = obj
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        match rec {
            Some(r) => {
                annotations.insert(key(name), serde_json::to_string(r).expect("JSON"));
            }
            None => {
                annotations.remove(&key(name));
            }
        }
        match self.api.replace(&self.object, &PostParams::default(), &obj).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s))
                if s.message.ends_with(
                    "the object has been modified; please apply your changes to the latest version and try again",
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(GoError::Other(format!("unable to put store value: {e}"))),
        }
    }

    fn new_record(name: &str, shared: bool, rng: &mut Rng) -> Record {
        Record {
            uuid: uuid_from(rng),
            lock_name: name.to_owned(),
            expire_at: now_unix() + TTL,
            count: 1,
            shared,
            queue: Some(BTreeMap::new()),
        }
    }

    /// `Backend.Acquire`: one attempt. `Ok(uuid)`: granted.
    pub async fn try_acquire(&mut self, name: &str, shared: bool) -> Result<String, GoError> {
        loop {
            let obj = self.get().await?;
            let Some(mut old) = Self::record(&obj, name)? else {
                let mut r = Self::new_record(name, shared, &mut self.rng);
                if self.version == Version::V011 {
                    r.queue = None;
                }
                if self.put(obj, name, Some(&r)).await? {
                    return Ok(r.uuid);
                }
                tokio::time::sleep(CONFLICT_PAUSE).await;
                continue;
            };
            if expired(old.expire_at) {
                match self.version {
                    Version::V011 => {
                        let r = Record {
                            queue: None,
                            ..Self::new_record(name, shared, &mut self.rng)
                        };
                        if self.put(obj, name, Some(&r)).await? {
                            return Ok(r.uuid);
                        }
                        tokio::time::sleep(CONFLICT_PAUSE).await;
                        continue;
                    }
                    Version::V020 => return self.take_if_oldest(name, &old.uuid).await,
                }
            }
            if shared && old.shared {
                old.count += 1;
                old.expire_at = now_unix() + TTL;
                if self.version == Version::V011 {
                    old.queue = None;
                }
                if self.put(obj, name, Some(&old)).await? {
                    return Ok(old.uuid);
                }
                tokio::time::sleep(CONFLICT_PAUSE).await;
                continue;
            }
            if self.version == Version::V020 {
                self.update_queue(name, &old.uuid).await?;
            }
            return Err(GoError::ShouldWait);
        }
    }

    /// v0.2's `changeLease`: read, check the uuid, change, PUT; after a conflict, a second and
    /// read again.
    async fn change_lease(
        &mut self,
        name: &str,
        uuid: &str,
        mut change: impl FnMut(&mut Option<Record>, &mut Rng),
    ) -> Result<(), GoError> {
        loop {
            let obj = self.get().await?;
            let Some(current) = Self::record(&obj, name)? else {
                return Err(GoError::NoLease);
            };
            if current.uuid != uuid {
                return Err(GoError::AlreadyLeased);
            }
            let mut rec = Some(current);
            change(&mut rec, &mut self.rng);
            if let (Version::V011, Some(r)) = (self.version, rec.as_mut()) {
                r.queue = None;
            }
            if self.put(obj, name, rec.as_ref()).await? {
                return Ok(());
            }
            tokio::time::sleep(CONFLICT_PAUSE).await;
        }
    }

    async fn take_if_oldest(&mut self, name: &str, old_uuid: &str) -> Result<String, GoError> {
        let me = self.acquirer_id.clone().unwrap_or_default();
        let mut new_lease: Option<String> = None;
        let granted = &mut new_lease;
        self.change_lease(name, old_uuid, |rec, rng| {
            let r = rec.as_mut().expect("present");
            let now = now_unix();
            let queue = r.queue.get_or_insert_with(BTreeMap::new);
            queue.retain(|_, m| m.expire_at >= now);
            let mut next: Option<Member> = None;
            for (k, m) in queue.iter_mut() {
                if *k == me {
                    m.expire_at = now + TTL;
                }
                if next
                    .as_ref()
                    .is_none_or(|n| n.arrived == 0 || m.arrived < n.arrived)
                {
                    next = Some(m.clone());
                }
            }
            if !me.is_empty() && !queue.contains_key(&me) {
                queue.insert(
                    me.clone(),
                    Member {
                        id: me.clone(),
                        arrived: now,
                        expire_at: now + TTL,
                    },
                );
            }
            let next = next.map(|n| n.id).unwrap_or_default();
            if next.is_empty() || next == me {
                r.uuid = uuid_from(rng);
                r.expire_at = now + TTL;
                r.count = 1;
                queue.remove(&me);
                *granted = Some(r.uuid.clone());
            }
        })
        .await?;
        new_lease.ok_or(GoError::ShouldWait)
    }

    async fn update_queue(&mut self, name: &str, uuid: &str) -> Result<(), GoError> {
        let Some(me) = self.acquirer_id.clone() else {
            return Ok(());
        };
        self.change_lease(name, uuid, |rec, _| {
            let r = rec.as_mut().expect("present");
            let now = now_unix();
            let queue = r.queue.get_or_insert_with(BTreeMap::new);
            match queue.get_mut(&me) {
                Some(m) => m.expire_at = now + TTL,
                None => {
                    queue.insert(
                        me.clone(),
                        Member {
                            id: me.clone(),
                            arrived: now,
                            expire_at: now + TTL,
                        },
                    );
                }
            }
        })
        .await
    }

    /// `RenewLease`.
    pub async fn renew(&mut self, name: &str, uuid: &str) -> Result<(), GoError> {
        self.change_lease(name, uuid, |rec, _| {
            if let Some(r) = rec.as_mut() {
                r.expire_at = now_unix() + TTL;
            }
        })
        .await
    }

    /// `Release`.
    pub async fn release(&mut self, name: &str, uuid: &str) -> Result<(), GoError> {
        let version = self.version;
        self.change_lease(name, uuid, |rec, _| {
            let r = rec.as_mut().expect("present");
            r.count -= 1;
            let now = now_unix();
            if version == Version::V020 {
                let queue = r.queue.get_or_insert_with(BTreeMap::new);
                queue.retain(|_, m| m.expire_at >= now);
            }
            if r.count == 0 {
                let queue_empty = r.queue.as_ref().is_none_or(BTreeMap::is_empty);
                if version == Version::V011 || queue_empty {
                    *rec = None;
                } else {
                    r.expire_at = now - 1;
                }
            }
        })
        .await
    }
}

fn uuid_from(rng: &mut Rng) -> String {
    let b = rng.u128().to_le_bytes();
    uuid_string(b)
}

fn uuid_string(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// What a Go holder believes: it holds until released, told it lost the record, or the
/// expiry it last wrote passed by its clock.
#[derive(Debug, Default)]
pub struct GoBelief {
    /// World time at which the expiry it last wrote passes (nanoseconds).
    pub until: AtomicU64,
    pub lost: AtomicBool,
    /// The lease's uuid.
    pub uuid: String,
}

impl GoBelief {
    fn push(&self, expire_at: i64) {
        // The world time when the host's wall clock passes `expire_at`.
        let wall = host_wall().unwrap_or_else(SystemTime::now);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(expire_at.max(0) as u64);
        let left = at.duration_since(wall).unwrap_or_default();
        let now = host_now().unwrap_or_default();
        self.until
            .store((now + left).as_nanos() as u64, Ordering::SeqCst);
    }

    /// True when the holder no longer believes it holds at world time `now`.
    pub fn over(&self, now: Duration) -> bool {
        self.lost.load(Ordering::SeqCst)
            || now.as_nanos() as u64 >= self.until.load(Ordering::SeqCst)
    }
}

/// A Go client's loop in the simulation: acquire (exclusive: Go's own shared take-over defect
/// would be found as Go's, not ours), hold with renewals, release.
#[allow(clippy::too_many_arguments)]
pub async fn run_client(
    mut peer: GoPeer,
    client_name: String,
    host: HostId,
    host_started: Duration,
    names: Vec<String>,
    journal: Journal,
    stop: Arc<AtomicBool>,
    running: Arc<std::sync::atomic::AtomicUsize>,
) {
    while !stop.load(Ordering::SeqCst) {
        let name = peer.rng.pick(&names).clone();
        let non_blocking = peer.rng.chance(0.3);
        let give_up = Duration::from_millis(peer.rng.range(2000, 20_000));
        let began = host_now().unwrap_or_default();
        let uuid = loop {
            match peer.try_acquire(&name, false).await {
                Ok(uuid) => break Some(uuid),
                Err(GoError::ShouldWait)
                    if !non_blocking && host_now().unwrap_or_default() - began < give_up =>
                {
                    tokio::time::sleep(POLL).await;
                }
                Err(GoError::ShouldWait) => break None,
                Err(e) => {
                    journal.go_error(format!("{:?} acquire: {e:?}", peer.version));
                    break None;
                }
            }
        };
        let Some(uuid) = uuid else {
            tokio::time::sleep(Duration::from_millis(peer.rng.range(0, 500))).await;
            continue;
        };
        let belief = Arc::new(GoBelief {
            uuid: uuid.clone(),
            ..GoBelief::default()
        });
        belief.push(now_unix() + TTL);
        let hold = journal.grant_belief(
            &client_name,
            host,
            host_started,
            host_now().unwrap_or_default(),
            &name,
            lockgate::Mode::Exclusive,
            None,
            Belief::Go(Arc::clone(&belief)),
        );
        // Hold, renewing every 3 s, for a while.
        let hold_for = Duration::from_millis(peer.rng.range(100, 15_000));
        let start = host_now().unwrap_or_default();
        let mut lost = false;
        while host_now().unwrap_or_default() - start < hold_for && !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(RENEW.min(hold_for)).await;
            match peer.renew(&name, &uuid).await {
                Ok(()) => belief.push(now_unix() + TTL),
                Err(GoError::AlreadyLeased | GoError::NoLease) => {
                    belief.lost.store(true, Ordering::SeqCst);
                    lost = true;
                    break;
                }
                Err(_) => {}
            }
        }
        journal.ended(hold, host_now().unwrap_or_default(), lost);
        if !lost {
            if let Err(e) = peer.release(&name, &uuid).await {
                journal.go_error(format!("{:?} release: {e:?}", peer.version));
            }
        }
        tokio::time::sleep(Duration::from_millis(peer.rng.range(0, 500))).await;
    }
    running.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuids_look_like_go_uuids() {
        let u = super::uuid_string([0xab; 16]);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
