//! The lease record Go lockgate stores in an annotation, and the annotation key.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use sha3::{Digest, Sha3_224};

use super::queue::{Member, HOLDER_MARK};

fn null_is_empty<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Member>, D::Error> {
    Ok(Option::<BTreeMap<String, Member>>::deserialize(d)?.unwrap_or_default())
}

/// The prefix of every lock annotation key.
pub const KEY_PREFIX: &str = "lockgate.io/";

/// The annotation key of the lock `name`: `lockgate.io/<lowercase hex SHA3-224 of name>`.
///
/// ```
/// assert_eq!(
///     lockgate::kubernetes::annotation_key("myresource"),
///     "lockgate.io/2ed9f0aa690cf35fa3331f6578a98134b05b0c30ec8a2d6ffc5c1cf3"
/// );
/// ```
pub fn annotation_key(name: &str) -> String {
    format!(
        "{KEY_PREFIX}{}",
        crate::hex(&Sha3_224::digest(name.as_bytes()))
    )
}

/// Go lockgate's `LockLeaseRecord`, field for field, with v0.2's `QueueMembers`. Fields this
/// version does not know are kept as they were read and written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub uuid: String,
    #[serde(rename = "lockName")]
    pub lock_name: String,
    #[serde(rename = "ExpireAtTimestamp")]
    pub expire_at: i64,
    #[serde(rename = "SharedHoldersCount")]
    pub shared_holders: i64,
    #[serde(rename = "IsShared")]
    pub is_shared: bool,
    /// Waiters, by acquirer id (Go v0.2's `QueueMembers`). Always written, `{}` when empty:
    /// Go v0.2 panics ("assignment to entry in nil map") when a waiter with an acquirer id
    /// queues in a record without it. Go v0.1.1 writes no such field; `null` reads as empty.
    #[serde(rename = "QueueMembers", default, deserialize_with = "null_is_empty")]
    pub queue: BTreeMap<String, Member>,
    /// How many times Rust lockgate wrote this lease (our field; Go ignores it and drops it when
    /// it rewrites the record). Every renewal bumps it, so that every renewal changes the record
    /// even when `ExpireAtTimestamp` comes out the same (a clock stepped back, two holders in
    /// the same second): waiters count a lease as expired only when it stood still.
    #[serde(rename = "Renewals", default, skip_serializing_if = "is_zero")]
    pub renewals: u64,
    /// Who holds the lease, by holder id (our field: Go ignores it and drops it when it
    /// rewrites the record, so it may be missing or incomplete; it is for people, and nothing
    /// is decided from it).
    #[serde(
        rename = "Holders",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub holders: BTreeMap<String, HolderEntry>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// One holder of a lease, as recorded for `lockgate status` and waiting messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub(crate) struct HolderEntry {
    #[serde(rename = "Host", default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(rename = "Pid", default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// When it took the lock, unix seconds by the API server's clock.
    #[serde(rename = "Since", default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    #[serde(
        rename = "Description",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub description: Option<String>,
    /// Set by a release that handed the lock to this holder: the `Tag` of the holder's queue
    /// entry the release saw. The holder counts its lease from when it sent that entry (it did
    /// not send the granting write). Absent for a holder that wrote its own grant.
    #[serde(rename = "Handoff", default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<u64>,
}

impl HolderEntry {
    /// This process, holding since `since`, doing `description`.
    pub fn this_process(since: i64, description: Option<String>) -> Self {
        Self {
            host: crate::host::host_name(),
            pid: Some(std::process::id()),
            user: Some(crate::host::current_user()),
            since: Some(since),
            description,
            handoff: None,
        }
    }

    /// As a [`Holder`](crate::Holder) in `mode`.
    pub fn holder(&self, mode: crate::Mode, id: &str) -> crate::Holder {
        let mut h = crate::Holder::with_id(mode, id);
        h.host.clone_from(&self.host);
        h.pid = self.pid;
        h.user.clone_from(&self.user);
        h.since = self.since;
        h.description.clone_from(&self.description);
        h
    }
}

impl Record {
    /// The holders for people: the recorded ones, or, for a record without them (written by
    /// Go), the lease itself with its count.
    pub fn holders(&self) -> Vec<crate::Holder> {
        if self.shared_holders <= 0 {
            return Vec::new();
        }
        if self.holders.is_empty() {
            let mut h = crate::Holder::with_id(self.mode(), self.uuid.clone());
            h.count = u64::try_from(self.shared_holders).ok();
            return vec![h];
        }
        self.holders
            .iter()
            .map(|(id, e)| e.holder(self.mode(), id))
            .collect()
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Record {
    /// A new record for one holder, expiring at `expire_at`.
    pub fn new(name: &str, shared: bool, expire_at: i64) -> Self {
        Self {
            uuid: crate::clock::uuid().to_string(),
            lock_name: name.to_owned(),
            expire_at,
            shared_holders: 1,
            is_shared: shared,
            queue: BTreeMap::new(),
            renewals: 0,
            holders: BTreeMap::new(),
            other: Default::default(),
        }
    }

    /// The record renewed until `expire_at`: always a different value (and the holder mark,
    /// if any, renewed with it).
    pub fn renewed(&self, expire_at: i64) -> Self {
        let mut r = self.clone();
        r.expire_at = expire_at;
        r.renewals = r.renewals.wrapping_add(1).max(1);
        if let Some(m) = r.queue.get_mut(HOLDER_MARK) {
            m.expire_at = expire_at;
        }
        r
    }

    /// The record with a fresh random `Renewals` tag: a grant or join writes one, so that the
    /// writer can recognise its own write when the answer to it was lost.
    pub fn tagged(mut self) -> Self {
        self.renewals = (crate::clock::random() as u64) | 1;
        self
    }

    /// True when `other` is still exactly the write that produced `self` (same lease, same
    /// tag, not renewed since).
    pub fn same_write(&self, other: &Record) -> bool {
        self.renewals != 0 && self.uuid == other.uuid && self.renewals == other.renewals
    }

    /// The mode of the lease.
    pub fn mode(&self) -> crate::Mode {
        if self.is_shared {
            crate::Mode::Shared
        } else {
            crate::Mode::Exclusive
        }
    }

    pub fn parse(value: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(value)
    }

    /// The lease without the queue: what a holder's renewals change and waiters do not.
    pub fn lease_part(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.uuid, self.expire_at, self.shared_holders, self.is_shared, self.renewals
        )
    }

    pub fn to_value(&self) -> String {
        serde_json::to_string(self).expect("a record always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Go lockgate v0.1.1 (`util.Sha3_224Hash`).
    #[test]
    fn keys_match_go_lockgate() {
        assert_eq!(
            annotation_key("a"),
            "lockgate.io/9e86ff69557ca95f405f081269685b38e3a819b309ee942f482b6a8b"
        );
        assert_eq!(
            annotation_key("über"),
            "lockgate.io/cc9cdba5abca8bcceb3f4db22b334b46a000c5b64423f1da12188e92"
        );
    }

    #[test]
    fn records_round_trip_and_keep_unknown_fields() {
        let go = r#"{"uuid":"u","lockName":"n","ExpireAtTimestamp":5,"SharedHoldersCount":2,"IsShared":true,"QueueMembers":{"a":{"AcquirerId":"a","AcquiredAtTimestamp":1,"ExpireAtTimestamp":9}}}"#;
        let r = Record::parse(go).unwrap();
        assert_eq!((r.shared_holders, r.is_shared, r.expire_at), (2, true, 5));
        let back: serde_json::Value = serde_json::from_str(&r.to_value()).unwrap();
        assert_eq!(back, serde_json::from_str::<serde_json::Value>(go).unwrap());
        assert_eq!(r.queue["a"].arrived, 1);
        let go_null = r#"{"uuid":"u","lockName":"n","ExpireAtTimestamp":5,"SharedHoldersCount":1,"IsShared":false,"QueueMembers":null}"#;
        let r = Record::parse(go_null).unwrap();
        assert!(r.queue.is_empty());
        assert!(
            r.to_value().contains(r#""QueueMembers":{}"#),
            "an empty queue is written as {{}}, never left out: {}",
            r.to_value()
        );
        assert!(Record::parse("{not json").is_err());
        assert!(
            Record::parse(r#"{"uuid":"u"}"#).is_err(),
            "missing fields are corrupt"
        );
    }
}
