//! Fingerprints of CRM records: xxh3-64 of their canonical JSON.
//!
//! A record's fingerprint is xxh3-64 (fixed seed, the same on every platform and release) of
//! its canonical JSON: keys sorted (serde_json's map is ordered), no whitespace, and numbers
//! normalized – `1`, `1.0`, `1.00`, `1e0` and `10e-1` are all written `1`, so a CRM that changes
//! how it writes a number makes no change; strings stay strings (`"1.0"` is not `1`).
//! Top-level fields the stream lists as volatile are left out, so a change of them alone is no
//! change.
//!
//! Arrays that are sets are written in one order (docs/design.md, "Change detection"): the tag
//! categories of `tags` and the tags of each category are sorted by their canonical JSON, and
//! the trading accounts of `userAdditionalId` (a string, see
//! [`crate::crm::models::parse_accounts`]) are written as the sorted array of their
//! `[login, server, type]` (an unreadable list stays the string it is). A CRM serving the same
//! tags or accounts in another order makes no change; duplicates still count (a multiset).
//! Releases before this wrote those fields in the order received: [`legacy`] computes their
//! fingerprints, which `stream::change` accepts as unchanged. A record holding a value those
//! releases emitted wrong (a date they misread, see
//! [`crate::crm::time::read_differently_than_before`]) has its fingerprint marked
//! ([`Reading::Changed`]), so it differs from the stored one even without sets.
//!
//! Fingerprinting lies below both the CRM pages that compute it ([`crate::crm::page`]) and
//! the change detection that compares it (`stream::change`).

use std::borrow::Cow;
use std::io::Write;

use serde_json::{Map, Value};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::models::parse_accounts;
use super::raw::{Field, Fields};

/// Seed of record fingerprints; changing it would re-emit every entity.
const FINGERPRINT_SEED: u64 = 0x1b57_2ea3_0000_0001;

/// Whether set-valued fields are written in one order (this release) or as received (the
/// releases before, see [`legacy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sets {
    Sorted,
    AsReceived,
}

/// Whether a record holds a value this release reads differently from releases before issue
/// 15 (see [`crate::crm::time::read_differently_than_before`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Every value reads as it did: the fingerprint is the canonical JSON's.
    AsBefore,
    /// A value reads differently (a date the earlier release misread): the canonical JSON is
    /// followed by [`READER_MARK`] before hashing, so the fingerprint differs from the one an
    /// earlier release stored for the same text, and `stream::change::compare` takes no
    /// legacy match for it.
    Changed,
}

/// What follows the canonical JSON of a record read with [`Reading::Changed`] (a NUL, which
/// canonical JSON never holds unescaped, then the version of the reading). Never change it:
/// that would re-emit every such record.
const READER_MARK: &[u8] = b"\0reader:2";

/// Returns the fingerprint of a record, leaving out `volatile` top-level fields.
pub fn fingerprint(record: &Map<String, Value>, volatile: &[String], buffer: &mut Vec<u8>) -> u64 {
    fingerprint_read(record, volatile, Reading::AsBefore, buffer)
}

/// Returns the fingerprint of a record read as `reading` says.
pub fn fingerprint_read(
    record: &Map<String, Value>,
    volatile: &[String],
    reading: Reading,
    buffer: &mut Vec<u8>,
) -> u64 {
    fingerprint_map(record, volatile, buffer, Sets::Sorted);
    finish(buffer, reading)
}

/// Returns the fingerprint of a record read by [`crate::crm::raw`]: the same bytes hashed as
/// [`fingerprint`] hashes for the same record as a `Value` map.
pub fn fingerprint_fields(fields: &Fields<'_>, volatile: &[String], buffer: &mut Vec<u8>) -> u64 {
    fingerprint_fields_read(fields, volatile, Reading::AsBefore, buffer)
}

/// Returns the fingerprint of a record read by [`crate::crm::raw`] as `reading` says (the
/// same as [`fingerprint_read`] of the same record as a `Value` map).
pub fn fingerprint_fields_read(
    fields: &Fields<'_>,
    volatile: &[String],
    reading: Reading,
    buffer: &mut Vec<u8>,
) -> u64 {
    fingerprint_of_fields(fields, volatile, buffer, Sets::Sorted);
    finish(buffer, reading)
}

/// Hashes the canonical JSON in `buffer`, marked when the record reads differently.
fn finish(buffer: &mut Vec<u8>, reading: Reading) -> u64 {
    if reading == Reading::Changed {
        buffer.extend_from_slice(READER_MARK);
    }
    xxh3_64_with_seed(buffer, FINGERPRINT_SEED)
}

/// The fingerprints of releases before set-valued fields were compared without their order.
///
/// Kept because fingerprints are persisted: a state topic written by such a release holds
/// them, and an entity that has not changed since must not become `UPDATED` once after the
/// upgrade. `stream::change::compare` accepts a match with these as unchanged (and the new
/// form is stored in its place). Never change what they compute.
///
/// What this cannot avoid: a CRM that already served a set in varying order before the
/// upgrade left its last order in the stored fingerprint. An entity whose first read after the
/// upgrade comes in another order than that matches neither form and becomes one `UPDATED`
/// (then never again for order alone); telling it from a real change would need the old text,
/// which is not stored.
pub mod legacy {
    use super::*;

    /// Returns the fingerprint an earlier release computed for a record as a `Value` map.
    pub fn fingerprint(
        record: &Map<String, Value>,
        volatile: &[String],
        buffer: &mut Vec<u8>,
    ) -> u64 {
        fingerprint_map(record, volatile, buffer, Sets::AsReceived);
        xxh3_64_with_seed(buffer, FINGERPRINT_SEED)
    }

    /// Returns the fingerprint an earlier release computed for a record read by
    /// [`crate::crm::raw`] (equal to [`fingerprint`] of the same record).
    pub fn fingerprint_fields(
        fields: &Fields<'_>,
        volatile: &[String],
        buffer: &mut Vec<u8>,
    ) -> u64 {
        fingerprint_of_fields(fields, volatile, buffer, Sets::AsReceived);
        xxh3_64_with_seed(buffer, FINGERPRINT_SEED)
    }
}

/// Writes a record's canonical JSON into `buffer`.
fn fingerprint_map(
    record: &Map<String, Value>,
    volatile: &[String],
    buffer: &mut Vec<u8>,
    sets: Sets,
) {
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
        match (sets, key.as_str(), value) {
            (Sets::Sorted, SET_FIELD_ACCOUNTS, Value::String(text)) => write_accounts(buffer, text),
            (Sets::Sorted, SET_FIELD_TAGS, _) => write_tags(buffer, value),
            _ => write_canonical(buffer, value),
        }
    }
    buffer.push(b'}');
}

/// Writes the canonical JSON of a record read by [`crate::crm::raw`] into `buffer`.
fn fingerprint_of_fields(
    fields: &Fields<'_>,
    volatile: &[String],
    buffer: &mut Vec<u8>,
    sets: Sets,
) {
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
        match (sets, key, value) {
            (Sets::Sorted, SET_FIELD_ACCOUNTS, Field::String(text)) => write_accounts(buffer, text),
            (Sets::Sorted, SET_FIELD_TAGS, Field::Nested(_)) => {
                write_tags(buffer, &value.to_value())
            }
            (_, _, Field::Null) => buffer.extend_from_slice(b"null"),
            (_, _, Field::Bool(b)) => buffer.extend_from_slice(if *b { b"true" } else { b"false" }),
            (_, _, Field::Number(text)) => canonical_number(text, buffer),
            (_, _, Field::String(Cow::Borrowed(text))) => {
                // Read without escapes: JSON allows no quote, backslash or control character
                // unescaped, so its text is what serde_json would write.
                buffer.push(b'"');
                buffer.extend_from_slice(text.as_bytes());
                buffer.push(b'"');
            }
            (_, _, Field::String(Cow::Owned(text))) => write_string(buffer, text),
            (_, _, Field::Nested(_)) => write_canonical(buffer, &value.to_value()),
        }
    }
    buffer.push(b'}');
}

/// The top-level field holding tag categories (a set of categories, each a set of tags).
const SET_FIELD_TAGS: &str = "tags";
/// The top-level field holding a customer's trading accounts as text (a set of accounts).
const SET_FIELD_ACCOUNTS: &str = "userAdditionalId";

/// Writes `tags` in one order: the elements (categories, or tag names of a flat list) sorted
/// by their canonical JSON, each category's `tags` member sorted likewise. A value that is no
/// array is written as it is.
fn write_tags(buffer: &mut Vec<u8>, value: &Value) {
    let Value::Array(items) = value else {
        write_canonical(buffer, value);
        return;
    };
    write_sorted(buffer, items, |out, item| match item {
        Value::Object(map) => {
            out.push(b'{');
            for (i, (key, member)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(out, key);
                out.push(b':');
                match (key.as_str(), member) {
                    ("tags", Value::Array(tags)) => write_sorted(out, tags, write_canonical),
                    _ => write_canonical(out, member),
                }
            }
            out.push(b'}');
        }
        other => write_canonical(out, other),
    });
}

/// Writes `items` as a JSON array in the byte order of their encodings by `write`.
fn write_sorted(buffer: &mut Vec<u8>, items: &[Value], write: impl Fn(&mut Vec<u8>, &Value)) {
    let mut encoded: Vec<Vec<u8>> = items
        .iter()
        .map(|item| {
            let mut out = Vec::new();
            write(&mut out, item);
            out
        })
        .collect();
    encoded.sort_unstable();
    buffer.push(b'[');
    for (i, item) in encoded.iter().enumerate() {
        if i > 0 {
            buffer.push(b',');
        }
        buffer.extend_from_slice(item);
    }
    buffer.push(b']');
}

/// Writes a trading-account list as the sorted array of its `[login, server, type]`; text
/// that is no account list is written as the string it is.
fn write_accounts(buffer: &mut Vec<u8>, text: &str) {
    let Ok(accounts) = parse_accounts(text) else {
        write_string(buffer, text);
        return;
    };
    let mut triples: Vec<(&str, &str, Option<&str>)> = accounts
        .iter()
        .map(|a| {
            (
                a.login.as_str(),
                a.server.as_str(),
                a.account_type.as_deref(),
            )
        })
        .collect();
    triples.sort_unstable();
    buffer.push(b'[');
    for (i, (login, server, kind)) in triples.into_iter().enumerate() {
        if i > 0 {
            buffer.push(b',');
        }
        buffer.push(b'[');
        write_string(buffer, login);
        buffer.push(b',');
        write_string(buffer, server);
        buffer.push(b',');
        match kind {
            Some(kind) => write_string(buffer, kind),
            None => buffer.extend_from_slice(b"null"),
        }
        buffer.push(b']');
    }
    buffer.push(b']');
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

#[cfg(test)]
pub(crate) mod tests {
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

    /// [`both`] for the legacy fingerprints.
    fn both_legacy(text: &str, volatile: &[String]) -> (u64, u64) {
        let mut buf = Vec::new();
        let fields = Fields::parse(text).unwrap();
        let from_fields = legacy::fingerprint_fields(&fields, volatile, &mut buf);
        let map = obj(serde_json::from_str(text).unwrap());
        (from_fields, legacy::fingerprint(&map, volatile, &mut buf))
    }

    /// The fingerprint the pipeline computes for a record's text.
    pub(crate) fn fp(text: &str) -> u64 {
        fingerprint_fields(&Fields::parse(text).unwrap(), &[], &mut Vec::new())
    }

    /// The fingerprint a release before set-valued fields computed for a record's text.
    pub(crate) fn legacy_fp(text: &str) -> u64 {
        legacy::fingerprint_fields(&Fields::parse(text).unwrap(), &[], &mut Vec::new())
    }

    pub(crate) const LEAD: &str = r#"{"id": 7, "tags": [{"category": "Marketing", "tags": ["webinar", "vip"]}, {"category": "Sales", "tags": ["hot"]}], "userAdditionalId": "(12345, mt4-live-01, live), (88112, mt5-live-02, live)"}"#;

    #[test]
    fn the_order_of_tags_categories_and_accounts_makes_no_change() {
        let same = [
            // Tags of a category reordered.
            r#"{"id": 7, "tags": [{"category": "Marketing", "tags": ["vip", "webinar"]}, {"category": "Sales", "tags": ["hot"]}], "userAdditionalId": "(12345, mt4-live-01, live), (88112, mt5-live-02, live)"}"#,
            // Categories reordered, members written in another key order.
            r#"{"id": 7, "tags": [{"tags": ["hot"], "category": "Sales"}, {"category": "Marketing", "tags": ["webinar", "vip"]}], "userAdditionalId": "(12345, mt4-live-01, live), (88112, mt5-live-02, live)"}"#,
            // Accounts reversed, and written another way.
            r#"{"id": 7, "tags": [{"category": "Marketing", "tags": ["webinar", "vip"]}, {"category": "Sales", "tags": ["hot"]}], "userAdditionalId": "(88112, mt5-live-02, live); (12345, mt4-live-01, live)"}"#,
            r#"{"id": 7, "tags": [{"category": "Sales", "tags": ["hot"]}, {"category": "Marketing", "tags": ["vip", "webinar"]}], "userAdditionalId": "88112:mt5-live-02:live, 12345:mt4-live-01:live"}"#,
        ];
        for text in same {
            assert_eq!(fp(text), fp(LEAD), "{text}");
        }
        // Flat tag lists are sets too.
        assert_eq!(
            fp(r#"{"id": 1, "tags": ["vip", "webinar"]}"#),
            fp(r#"{"id": 1, "tags": ["webinar", "vip"]}"#)
        );
        // The order of other arrays still counts.
        assert_ne!(
            fp(r#"{"id": 1, "notes": ["a", "b"]}"#),
            fp(r#"{"id": 1, "notes": ["b", "a"]}"#)
        );
    }

    #[test]
    fn legacy_fingerprints_stay_what_earlier_releases_stored() {
        // An earlier release hashed the fields as received, sets in the order received.
        assert_eq!(
            legacy_fp(LEAD),
            xxh3_64_with_seed(
                br#"{"id":7,"tags":[{"category":"Marketing","tags":["webinar","vip"]},{"category":"Sales","tags":["hot"]}],"userAdditionalId":"(12345, mt4-live-01, live), (88112, mt5-live-02, live)"}"#,
                FINGERPRINT_SEED
            ),
            "the legacy fingerprint must stay what earlier releases stored"
        );
        assert_ne!(legacy_fp(LEAD), fp(LEAD));
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
            r#"{"tags": [{"category": "B", "tags": ["z", "a\u00e9"]}, {"name": "A", "tags": [2, 1.0]}]}"#,
            r#"{"tags": ["vip", "webinar", "vip"], "userAdditionalId": "(2, s2, live), (1, s1, live)"}"#,
            r#"{"tags": null, "userAdditionalId": "(unbalanced"}"#,
            r#"{"tags": {"x": [2, 1]}, "userAdditionalId": 7}"#,
            r#"{"tags": "vip", "userAdditionalId": "1:a,2:b"}"#,
        ] {
            for volatile in [&[][..], &volatile[..]] {
                let (from_fields, from_value) = both(text, volatile);
                assert_eq!(from_fields, from_value, "{text} without {volatile:?}");
                let (from_fields, from_value) = both_legacy(text, volatile);
                assert_eq!(
                    from_fields, from_value,
                    "legacy: {text} without {volatile:?}"
                );
                let mut buf = Vec::new();
                let fields = Fields::parse(text).unwrap();
                let map = obj(serde_json::from_str(text).unwrap());
                let marked = fingerprint_fields_read(&fields, volatile, Reading::Changed, &mut buf);
                assert_eq!(
                    marked,
                    fingerprint_read(&map, volatile, Reading::Changed, &mut buf),
                    "marked: {text} without {volatile:?}"
                );
                assert_ne!(marked, from_fields, "marked: {text}");
            }
        }
        // Every record the simulator serves, of every endpoint and both money styles, with
        // sets in random orders, zero dates and epoch seconds.
        let quirks = crate::sim::ValueQuirks {
            shuffle_sets: true,
            epoch_seconds: true,
            zero_dates: true,
        };
        for (numeric_money, quirks) in [(false, Default::default()), (true, quirks)] {
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
                    quirks,
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
                    let (from_fields, from_value) = both_legacy(&text, &volatile);
                    assert_eq!(from_fields, from_value, "legacy: {text}");
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
