//! Change detection: fingerprints of canonical JSON, CREATED / UPDATED / unchanged.
//!
//! A record's fingerprint is xxh3-64 (fixed seed, the same on every platform and release) of
//! its canonical JSON: keys sorted (serde_json's map is ordered), no whitespace, and numbers
//! normalized – `1`, `1.0`, `1.00`, `1e0` and `10e-1` are all written `1`, so a CRM that changes
//! how it writes a number makes no change; strings stay strings (`"1.0"` is not `1`).
//! Top-level fields the stream lists as volatile are left out, so a change of them alone is no
//! change. The `eventId` of a change is a hash of (stream, entity id, previous fingerprint,
//! fingerprint): a retry of the same change gets the same id, whatever the delivery mode, and a
//! record that changes back (A → B → A) gets a new id for its second A.

use std::borrow::Cow;
use std::io::Write;

use serde_json::{Map, Value};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::crm::raw::{Field, Fields};
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
        write_string(buffer, key);
        buffer.push(b':');
        write_canonical(buffer, value);
    }
    buffer.push(b'}');
    xxh3_64_with_seed(buffer, FINGERPRINT_SEED)
}

/// Returns the fingerprint of a record read by [`crate::crm::raw`]: the same bytes hashed as
/// [`fingerprint`] hashes for the same record as a `Value` map.
pub fn fingerprint_fields(fields: &Fields<'_>, volatile: &[String], buffer: &mut Vec<u8>) -> u64 {
    buffer.clear();
    buffer.push(b'{');
    let mut first = true;
    for (key, value) in fields.iter() {
        if volatile.iter().any(|v| v == key) {
            continue;
        }
        if !first {
            buffer.push(b',');
        }
        first = false;
        write_plain_or_escaped(buffer, key);
        buffer.push(b':');
        match value {
            Field::Null => buffer.extend_from_slice(b"null"),
            Field::Bool(b) => buffer.extend_from_slice(if *b { b"true" } else { b"false" }),
            Field::Number(text) => canonical_number(text, buffer),
            Field::String(Cow::Borrowed(text)) => {
                // Read without escapes: JSON allows no quote, backslash or control character
                // unescaped, so its text is what serde_json would write.
                buffer.push(b'"');
                buffer.extend_from_slice(text.as_bytes());
                buffer.push(b'"');
            }
            Field::String(Cow::Owned(text)) => write_string(buffer, text),
            Field::Nested(_) => write_canonical(buffer, &value.to_value()),
        }
    }
    buffer.push(b'}');
    xxh3_64_with_seed(buffer, FINGERPRINT_SEED)
}

/// Writes a key that came from JSON text: as is when it needs no escape.
fn write_plain_or_escaped(buffer: &mut Vec<u8>, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buffer.push(b'"');
        buffer.extend_from_slice(text.as_bytes());
        buffer.push(b'"');
    } else {
        write_string(buffer, text);
    }
}

fn write_string(buffer: &mut Vec<u8>, text: &str) {
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buffer, text);
}

fn write_canonical(buffer: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Number(n) => canonical_number(n.as_str(), buffer),
        Value::Array(items) => {
            buffer.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    buffer.push(b',');
                }
                write_canonical(buffer, item);
            }
            buffer.push(b']');
        }
        Value::Object(map) => {
            buffer.push(b'{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    buffer.push(b',');
                }
                write_string(buffer, key);
                buffer.push(b':');
                write_canonical(buffer, item);
            }
            buffer.push(b'}');
        }
        Value::String(s) => write_string(buffer, s),
        Value::Null => buffer.extend_from_slice(b"null"),
        Value::Bool(b) => buffer.extend_from_slice(if *b { b"true" } else { b"false" }),
    }
}

/// Writes a JSON number's text in one canonical form: no leading or trailing zeros, no
/// exponent unless the plain form would exceed 40 digits, no `-0`. A number already written
/// that way (`15`, `-7.85`, `0.05`) is written unchanged.
fn canonical_number(text: &str, out: &mut Vec<u8>) {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, ""),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let exponent_value: Option<i64> = if exponent.is_empty() {
        Some(0)
    } else {
        let digits = exponent.trim_start_matches(['+', '-']);
        // A huge exponent saturates: such a number is written in exponent form anyway.
        digits_ok(digits).then(|| {
            let magnitude = digits.trim_start_matches('0').parse::<i64>().unwrap_or(
                if digits.trim_start_matches('0').is_empty() {
                    0
                } else {
                    i64::MAX / 4
                },
            );
            if exponent.starts_with('-') {
                -magnitude
            } else {
                magnitude
            }
        })
    };
    let Some(mut exp) = exponent_value.filter(|_| digits_ok(int) && digits_ok(frac)) else {
        // Not a JSON number (serde_json never hands us one): keep the text.
        out.extend_from_slice(text.as_bytes());
        return;
    };
    // value = digits × 10^exp, digits without leading or trailing zeros.
    let all = format!("{int}{frac}");
    exp -= frac.len() as i64;
    let digits = all.trim_start_matches('0');
    let trimmed = digits.trim_end_matches('0');
    exp += (digits.len() - trimmed.len()) as i64;
    let digits = trimmed;
    if digits.is_empty() {
        out.push(b'0');
        return;
    }
    if negative {
        out.push(b'-');
    }
    let len = digits.len() as i64;
    if exp >= 0 && len + exp <= 40 {
        out.extend_from_slice(digits.as_bytes());
        out.extend(std::iter::repeat_n(b'0', exp as usize));
    } else if exp < 0 && -exp <= 40 {
        let point = len + exp;
        if point > 0 {
            out.extend_from_slice(&digits.as_bytes()[..point as usize]);
            out.push(b'.');
            out.extend_from_slice(&digits.as_bytes()[point as usize..]);
        } else {
            out.extend_from_slice(b"0.");
            out.extend(std::iter::repeat_n(b'0', (-point) as usize));
            out.extend_from_slice(digits.as_bytes());
        }
    } else {
        let _ = write!(out, "{digits}e{exp}");
    }
}

/// Returns the deterministic event id of a change from `previous` (the fingerprint last
/// emitted for the entity, `None` for a new one) to `fingerprint`: 16 hex digits.
pub fn event_id(stream: &str, id: &str, previous: Option<u64>, fingerprint: u64) -> String {
    let mut bytes = Vec::with_capacity(stream.len() + id.len() + 20);
    bytes.extend_from_slice(stream.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(id.as_bytes());
    bytes.push(0);
    match previous {
        Some(previous) => {
            bytes.push(1);
            bytes.extend_from_slice(&previous.to_le_bytes());
        }
        None => bytes.push(0),
    }
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

    /// The fingerprint the pipeline computes from a record's text ([`fingerprint_fields`]) is
    /// the one of its `Value` map: a parser change must never re-emit every entity.
    fn both(text: &str, volatile: &[String]) -> (u64, u64) {
        let mut buf = Vec::new();
        let fields = Fields::parse(text).unwrap();
        let from_fields = fingerprint_fields(&fields, volatile, &mut buf);
        let map = obj(serde_json::from_str(text).unwrap());
        (from_fields, fingerprint(&map, volatile, &mut buf))
    }

    #[test]
    fn fingerprints_from_fields_equal_those_from_values() {
        let volatile = vec!["balanceUsd".to_owned(), "b".to_owned()];
        for text in [
            r#"{"id": 1, "b": {"y": 2, "x": [1, "a"]}, "amount": 1.50}"#,
            r#"{"z": "tab\there", "a": "quote \" and \\ and \u00e9 \u0001", "é": "ü"}"#,
            r#"{"k\u0041y": 1, "n": -0.0, "e": 1E+3, "f": 12.500, "g": 1e-7, "h": 0}"#,
            r#"{"id": 1, "id": 2, "dup": "first", "dup": null, "t": true, "f": false}"#,
            r#"{"nested": [{"b": 1, "a": "x\ny"}, [], {}], "empty": "", "slash": "a/b\/c"}"#,
            r#"{"balanceUsd": "12.3", "id": "7", "utmDetails": {"utmSource": null}}"#,
            r#"{}"#,
        ] {
            for volatile in [&[][..], &volatile[..]] {
                let (from_fields, from_value) = both(text, volatile);
                assert_eq!(from_fields, from_value, "{text} without {volatile:?}");
            }
        }
        // Every record the simulator serves, of every endpoint and both money styles.
        for numeric_money in [false, true] {
            let data = crate::sim::SimData::generate(
                &crate::sim::GenSpec {
                    seed: 11,
                    start_date: chrono::NaiveDate::from_ymd_opt(2024, 1, 1).unwrap(),
                    tz: chrono_tz::Tz::UTC,
                    leads: 200,
                    customers: 100,
                    transactions: 300,
                    positions: 300,
                    servers: 2,
                    numeric_money,
                    malformed_rate: 0.05,
                },
                chrono::Utc::now(),
            );
            use crate::sim::Kind;
            for (kind, count) in [
                (Kind::Leads, 200),
                (Kind::Customers, 100),
                (Kind::Transactions, 300),
                (Kind::Positions, 300),
            ] {
                for index in 0..count {
                    let mut text = Vec::new();
                    data.write_record(kind, index, &mut text);
                    let text = String::from_utf8(text).unwrap();
                    let (from_fields, from_value) = both(&text, &volatile);
                    assert_eq!(from_fields, from_value, "{text}");
                }
            }
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
        assert_eq!(
            event_id("leads", "7", None, 5),
            event_id("leads", "7", None, 5)
        );
        assert_ne!(
            event_id("leads", "7", None, 5),
            event_id("leads", "7", None, 6)
        );
        assert_ne!(
            event_id("leads", "7", None, 5),
            event_id("customers", "7", None, 5)
        );
        assert_eq!(event_id("leads", "7", None, 5).len(), 16);
    }

    #[test]
    fn a_record_that_changes_back_gets_a_new_event_id() {
        // A → B → A: three changes, three ids; each the same on every retry.
        let (a, b) = (11, 22);
        let ids = [
            event_id("transactions", "9", None, a),
            event_id("transactions", "9", Some(a), b),
            event_id("transactions", "9", Some(b), a),
        ];
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[1], ids[2]);
        assert_ne!(ids[0], ids[2], "the second A is a change of its own");
        assert_eq!(ids[2], event_id("transactions", "9", Some(b), a));
        // `None` (new) and a previous fingerprint of 0 are different histories.
        assert_ne!(
            event_id("transactions", "9", None, a),
            event_id("transactions", "9", Some(0), a)
        );
    }

    fn canonical(text: &str) -> String {
        let mut out = Vec::new();
        canonical_number(text, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn numbers_have_one_canonical_form() {
        for (text, want) in [
            ("1", "1"),
            ("1.0", "1"),
            ("1.00", "1"),
            ("1e0", "1"),
            ("10e-1", "1"),
            ("0.1e1", "1"),
            ("100", "100"),
            ("1E2", "100"),
            ("-7.85", "-7.85"),
            ("-7.850", "-7.85"),
            ("0.05", "0.05"),
            ("5e-2", "0.05"),
            ("0", "0"),
            ("-0", "0"),
            ("-0.000", "0"),
            ("0e10", "0"),
            ("00012.340", "12.34"),
            ("123456789.123456789", "123456789.123456789"),
            ("1e39", "1000000000000000000000000000000000000000"),
            ("1e40", "1e40"),
            ("1e-41", "1e-41"),
            ("1e999999999999999999999", "1e2305843009213693951"),
        ] {
            assert_eq!(canonical(text), want, "{text}");
        }
    }

    #[test]
    fn fingerprints_ignore_how_numbers_are_written() {
        let mut buf = Vec::new();
        let parse = |s: &str| obj(serde_json::from_str::<Value>(s).unwrap());
        let a = parse(r#"{"id": 7, "amount": 1, "nested": {"v": [2.5, 3]}}"#);
        let b = parse(r#"{"id": 7.0, "amount": 1.00, "nested": {"v": [25e-1, 3e0]}}"#);
        assert_eq!(
            fingerprint(&a, &[], &mut buf),
            fingerprint(&b, &[], &mut buf)
        );
        // A string holding a number is a string.
        let c = parse(r#"{"id": 7, "amount": "1", "nested": {"v": [2.5, 3]}}"#);
        assert_ne!(
            fingerprint(&a, &[], &mut buf),
            fingerprint(&c, &[], &mut buf)
        );
        // A real change is still a change.
        let d = parse(r#"{"id": 7, "amount": 1.01, "nested": {"v": [2.5, 3]}}"#);
        assert_ne!(
            fingerprint(&a, &[], &mut buf),
            fingerprint(&d, &[], &mut buf)
        );
    }
}
