//! The lease record Go lockgate stores in an annotation, and the annotation key.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use super::queue::Member;

fn null_is_empty<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Member>, D::Error> {
    Ok(Option::<BTreeMap<String, Member>>::deserialize(d)?.unwrap_or_default())
}
use sha3::{Digest, Sha3_224};

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
    /// Waiters, by acquirer id (Go v0.2's `QueueMembers`; Go writes `null` for none).
    #[serde(
        rename = "QueueMembers",
        default,
        deserialize_with = "null_is_empty",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub queue: BTreeMap<String, Member>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Record {
    /// A new record for one holder, expiring `ttl` seconds from the writer's wall clock.
    pub fn new(name: &str, shared: bool, ttl_secs: i64) -> Self {
        Self {
            uuid: uuid::Uuid::new_v4().to_string(),
            lock_name: name.to_owned(),
            expire_at: unix_now() + ttl_secs,
            shared_holders: 1,
            is_shared: shared,
            queue: BTreeMap::new(),
            other: Default::default(),
        }
    }

    pub fn parse(value: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(value)
    }

    /// The lease without the queue: what a holder's renewals change and waiters do not.
    pub fn lease_part(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.uuid, self.expire_at, self.shared_holders, self.is_shared
        )
    }

    pub fn to_value(&self) -> String {
        serde_json::to_string(self).expect("a record always serializes")
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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
        assert!(Record::parse(go_null).unwrap().queue.is_empty());
        assert!(Record::parse("{not json").is_err());
        assert!(
            Record::parse(r#"{"uuid":"u"}"#).is_err(),
            "missing fields are corrupt"
        );
    }
}
