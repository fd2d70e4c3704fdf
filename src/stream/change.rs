//! Change detection: fingerprints of canonical JSON, CREATED / UPDATED / unchanged.
//!
//! A record's fingerprint is xxh3-64 (fixed seed, the same on every platform and release) of
//! its canonical JSON: keys sorted (serde_json's map is ordered), no whitespace, numbers as
//! the CRM wrote them. Top-level fields the stream lists as volatile are left out, so a
//! change of them alone is no change. The `eventId` of a change is a hash of (stream, entity
//! id, fingerprint): the same change always gets the same id, whatever the delivery mode.

use serde_json::{Map, Value};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::events::Op;

/// Seed of record fingerprints; changing it would re-emit every entity.
const FINGERPRINT_SEED: u64 = 0x1b57_2ea3_0000_0001;

/// Returns the fingerprint of a record, leaving out `volatile` top-level fields.
pub fn fingerprint(record: &Map<String, Value>, volatile: &[String], buffer: &mut Vec<u8>) -> u64 {
    buffer.clear();
    buffer.push(b'{');
    let mut first = true;
    for (key, value) in record {
        if volatile.iter().any(|v| v == key) {
            continue;
        }
        if !first {
            buffer.push(b',');
        }
        first = false;
        // Writing JSON into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buffer, key);
        buffer.push(b':');
        let _ = serde_json::to_writer(&mut *buffer, value);
    }
    buffer.push(b'}');
    xxh3_64_with_seed(buffer, FINGERPRINT_SEED)
}

/// Returns the deterministic event id of a change: 16 hex digits.
pub fn event_id(stream: &str, id: &str, fingerprint: u64) -> String {
    let mut bytes = Vec::with_capacity(stream.len() + id.len() + 10);
    bytes.extend_from_slice(stream.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(id.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&fingerprint.to_le_bytes());
    format!("{:016x}", xxh3_64(&bytes))
}

/// Compares a record's fingerprint with the one last emitted for its entity (`None`: never
/// emitted); `None` means unchanged.
pub fn classify(previous: Option<u64>, fp: u64) -> Option<Op> {
    match previous {
        None => Some(Op::Created),
        Some(old) if old != fp => Some(Op::Updated),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn fingerprints_are_stable_and_order_independent() {
        let mut buf = Vec::new();
        let a = obj(serde_json::from_str(
            r#"{"id": 1, "b": {"y": 2, "x": [1, "a"]}, "amount": 1.50}"#,
        )
        .unwrap());
        let b = obj(
            serde_json::from_str(r#"{ "amount":1.50,"b":{"x":[1,"a"],"y":2},"id":1 }"#).unwrap(),
        );
        assert_eq!(
            fingerprint(&a, &[], &mut buf),
            fingerprint(&b, &[], &mut buf)
        );
        // The value a release computes must never change: it is persisted.
        assert_eq!(
            fingerprint(&obj(json!({"id": 1})), &[], &mut buf),
            xxh3_64_with_seed(br#"{"id":1}"#, FINGERPRINT_SEED)
        );
        let c = obj(serde_json::from_str(
            r#"{"id": 1, "b": {"y": 2, "x": [1, "a"]}, "amount": 1.51}"#,
        )
        .unwrap());
        assert_ne!(
            fingerprint(&a, &[], &mut buf),
            fingerprint(&c, &[], &mut buf)
        );
    }

    #[test]
    fn volatile_fields_alone_make_no_change() {
        let mut buf = Vec::new();
        let volatile = vec!["balanceUsd".to_owned()];
        let a = obj(json!({"customerId": 1, "balanceUsd": "10.00", "status": "Active"}));
        let b = obj(json!({"customerId": 1, "balanceUsd": "99.00", "status": "Active"}));
        let c = obj(json!({"customerId": 1, "balanceUsd": "99.00", "status": "VIP"}));
        assert_eq!(
            fingerprint(&a, &volatile, &mut buf),
            fingerprint(&b, &volatile, &mut buf)
        );
        assert_ne!(
            fingerprint(&b, &volatile, &mut buf),
            fingerprint(&c, &volatile, &mut buf)
        );
        assert_ne!(
            fingerprint(&a, &[], &mut buf),
            fingerprint(&b, &[], &mut buf)
        );
    }

    #[test]
    fn classification_and_event_ids() {
        assert_eq!(classify(None, 5), Some(Op::Created));
        assert_eq!(classify(Some(5), 5), None);
        assert_eq!(classify(Some(5), 6), Some(Op::Updated));
        assert_eq!(event_id("leads", "7", 5), event_id("leads", "7", 5));
        assert_ne!(event_id("leads", "7", 5), event_id("leads", "7", 6));
        assert_ne!(event_id("leads", "7", 5), event_id("customers", "7", 5));
        assert_eq!(event_id("leads", "7", 5).len(), 16);
    }
}
