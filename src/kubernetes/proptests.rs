//! Property tests of the pure logic: the record codec (Go's field names, unknown fields kept),
//! the encoding that the API server's `test` compares, and the acquirer queue against a simple
//! model of first come, first served with readers together.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::queue::{ahead, may_proceed, Member, Observer, HOLDER_MARK};
use super::record::Record;
use super::store::go_json;
use crate::options::Mode;

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[A-Za-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names no version of the record uses.
fn unknown_fields() -> impl Strategy<Value = BTreeMap<String, Value>> {
    prop::collection::btree_map("X[A-Za-z]{0,8}", any_json(), 0..3)
}

/// A queue member as Go v0.2 or Rust lockgate writes it, with fields of tools yet unknown.
fn member_json() -> impl Strategy<Value = (String, Value)> {
    (
        "[a-z0-9-]{1,24}",
        any::<i64>(),
        any::<i64>(),
        any::<bool>(),
        unknown_fields(),
    )
        .prop_map(|(id, arrived, expire, shared, other)| {
            let mut m = json!({"AcquirerId": id, "AcquiredAtTimestamp": arrived, "ExpireAtTimestamp": expire});
            if shared {
                m["Shared"] = json!(true);
            }
            for (k, v) in other {
                m[k] = v;
            }
            (id, m)
        })
}

/// A record in Go's shape (v0.1.1 without a queue, v0.2 with one), maybe with Rust's
/// `Renewals`, and fields of tools yet unknown.
fn record_json() -> impl Strategy<Value = Value> {
    (
        ".{0,40}",
        ".{0,40}",
        any::<i64>(),
        any::<i64>(),
        any::<bool>(),
        prop::option::of(prop::collection::vec(member_json(), 0..4)),
        prop::option::of(1..u64::MAX),
        unknown_fields(),
    )
        .prop_map(
            |(uuid, name, expire, count, shared, queue, renewals, other)| {
                let mut r = json!({"uuid": uuid, "lockName": name, "ExpireAtTimestamp": expire,
                "SharedHoldersCount": count, "IsShared": shared});
                if let Some(q) = queue {
                    r["QueueMembers"] = Value::Object(q.into_iter().collect());
                }
                if let Some(n) = renewals {
                    r["Renewals"] = json!(n);
                }
                for (k, v) in other {
                    r[k] = v;
                }
                r
            },
        )
}

proptest! {
    /// Every record Go (or another tool) writes reads back and writes out unchanged, with Go's
    /// field names and every unknown field kept; only a missing queue comes back as `{}` (Go
    /// v0.2 panics on a record without it).
    #[test]
    fn records_round_trip_with_unknown_fields_kept(original in record_json()) {
        let rec = Record::parse(&original.to_string()).expect("a record in Go's shape parses");
        let written: Value = serde_json::from_str(&rec.to_value()).unwrap();
        let mut expected = original.clone();
        if expected.get("QueueMembers").is_none() {
            expected["QueueMembers"] = json!({});
        }
        prop_assert_eq!(written, expected);
        // And what Rust writes reads back as the same record.
        prop_assert_eq!(Record::parse(&rec.to_value()).unwrap(), rec);
    }

    /// A renewal always changes the record (waiters count a lease expired only when it stood
    /// still), whatever the expiry comes out as.
    #[test]
    fn every_renewal_changes_the_lease(original in record_json(), expire in any::<i64>()) {
        let rec = Record::parse(&original.to_string()).unwrap();
        let renewed = rec.renewed(expire);
        prop_assert_ne!(renewed.lease_part(), rec.lease_part());
        prop_assert_ne!(renewed.to_value(), rec.to_value());
        prop_assert_eq!(renewed.uuid, rec.uuid);
    }

    /// Values as the API server (Go) encodes them: the same JSON, with `<`, `>`, `&`, U+2028
    /// and U+2029 escaped.
    #[test]
    fn go_encoding_is_json_with_html_characters_escaped(s in any::<String>()) {
        let encoded = String::from_utf8(go_json(&s)).unwrap();
        prop_assert_eq!(serde_json::from_str::<String>(&encoded).unwrap(), s);
        for c in ['<', '>', '&', '\u{2028}', '\u{2029}'] {
            prop_assert!(!encoded.contains(c), "{:?} in {}", c, encoded);
        }
    }

    /// Text that is not a record is an error, never a panic.
    #[test]
    fn anything_else_is_an_error_not_a_panic(s in any::<String>()) {
        let _ = Record::parse(&s);
    }
}

/// One waiter of the model: (arrived, Rust-shaped id?, id, shared).
fn queue() -> impl Strategy<Value = Vec<(i64, bool, u32, bool)>> {
    prop::collection::vec((0..5i64, any::<bool>(), any::<u32>(), any::<bool>()), 1..8)
}

fn members(q: &[(i64, bool, u32, bool)]) -> BTreeMap<String, Member> {
    q.iter()
        .enumerate()
        .map(|(i, &(arrived, rust, n, shared))| {
            // Rust ids: 20 digits, '-', 12 hex; Go ids: anything else.
            let id = if rust {
                format!("{:020}-{:012x}", u64::from(n), i)
            } else {
                format!("go-{n:08x}-{i}")
            };
            let m = Member {
                id: id.clone(),
                arrived,
                expire_at: i64::MAX,
                shared,
                tag: 0,
                holder: None,
                other: Default::default(),
            };
            (id, m)
        })
        .collect()
}

proptest! {
    /// The queue against a model: waiters are served in the order (arrival second, Go before
    /// Rust on the same second, id); an exclusive waiter proceeds only at the head, a shared one
    /// when everyone ahead of it is shared (readers in a row go together, a writer stops those
    /// behind it); the holder mark is nobody's waiter.
    #[test]
    fn the_queue_serves_in_order_with_readers_together(q in queue()) {
        let mut all = members(&q);
        all.insert(HOLDER_MARK.to_owned(), Member::mark(i64::MAX));
        let mut observer = Observer::default();
        let live = observer.live(&all, "nobody", Duration::from_secs(10), Duration::from_secs(10), 0);
        // The model's order.
        let mut model: Vec<&Member> = all.values().filter(|m| m.id != HOLDER_MARK).collect();
        model.sort_by_key(|m| (m.arrived, m.is_rust(), m.id.clone()));
        prop_assert_eq!(
            live.iter().map(|m| &m.id).collect::<Vec<_>>(),
            model.iter().map(|m| &m.id).collect::<Vec<_>>()
        );
        for (pos, me) in model.iter().enumerate() {
            let before = &model[..pos];
            let mode = if me.shared { Mode::Shared } else { Mode::Exclusive };
            let expected = match mode {
                Mode::Exclusive => before.is_empty(),
                Mode::Shared => before.iter().all(|m| m.shared),
            };
            let queued_ahead = ahead(&live, Some(me));
            prop_assert_eq!(queued_ahead.len(), pos);
            prop_assert_eq!(may_proceed(mode, &queued_ahead), expected, "{} at {}", me.id, pos);
        }
        // Somebody not queued has everyone ahead of it.
        prop_assert_eq!(ahead(&live, None).len(), model.len());
        prop_assert_eq!(may_proceed(Mode::Exclusive, &ahead(&live, None)), model.is_empty());
    }
}
