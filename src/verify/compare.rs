//! Comparing one entity's CRM version with its latest Kafka event, and the day totals.
//!
//! Both sides become the same thing before they are compared: an event's Avro record (the
//! CRM record through the encoder `run` uses, the Kafka event decoded with the schema its
//! framing names) without `meta` and without the stream's volatile fields. Representation
//! does not count: decimals are `decimal(38, 8)` on both sides (`1.0` and `1` are one
//! value), the sets (`tags`, the tags of a category, `accounts`) are compared without their
//! order, and the JSON texts of `extra` are compared as canonical JSON (numbers by value).

use std::collections::BTreeMap;

use apache_avro::types::Value;
use apache_avro::Schema;
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;

use crate::events::{EventType, Framing, Schemas};

/// The fields of an event compared: every field but `meta` and the volatile ones, in schema
/// order, sets sorted, `extra` canonical.
pub type Body = Vec<(String, Value)>;

/// Decodes framed events of the data topics (single-object or Confluent framing).
pub struct Decoder {
    /// Per event type: the schema, its single-object fingerprint and its registry id (when
    /// the configuration has a registry).
    schemas: Vec<(Schema, [u8; 8], Option<u32>)>,
}

impl Decoder {
    /// Builds a decoder of the current schemas under `framing`.
    pub fn new(schemas: &Schemas, framing: &Framing) -> Decoder {
        let ids = match framing {
            Framing::Confluent { ids } => Some(*ids),
            Framing::SingleObject => None,
        };
        Decoder {
            schemas: EventType::ALL
                .into_iter()
                .enumerate()
                .map(|(i, event)| {
                    let s = schemas.get(event);
                    (s.schema.clone(), s.fingerprint, ids.map(|ids| ids[i]))
                })
                .collect(),
        }
    }

    /// Decodes an event of `event`'s topic; the error says why it cannot be read (another
    /// schema, a truncated datum).
    pub fn decode(&self, event: EventType, payload: &[u8]) -> Result<Value, String> {
        let (schema, fingerprint, id) = &self.schemas[event as usize];
        let mut datum = match payload {
            [0xC3, 0x01, rest @ ..] if rest.len() >= 8 => {
                if &rest[..8] != fingerprint {
                    return Err(format!(
                        "written with another schema (fingerprint {:02x?}) than this release's {}",
                        &rest[..8],
                        event.name()
                    ));
                }
                &rest[8..]
            }
            [0, a, b, c, d, rest @ ..] => {
                let got = u32::from_be_bytes([*a, *b, *c, *d]);
                if Some(got) != *id {
                    return Err(format!(
                        "written with schema id {got}, not the registry id of this release's {}",
                        event.name()
                    ));
                }
                rest
            }
            _ => return Err("neither single-object nor Confluent framing".to_owned()),
        };
        apache_avro::from_avro_datum(schema, &mut datum, None).map_err(|e| e.to_string())
    }
}

/// Returns the compared body of an event record: `meta` and `volatile` left out.
pub fn body(record: Value, volatile: &[String]) -> Body {
    let Value::Record(fields) = record else {
        return Vec::new();
    };
    fields
        .into_iter()
        .filter(|(name, _)| name != "meta" && !volatile.iter().any(|v| v == name))
        .map(|(name, value)| {
            let value = match name.as_str() {
                "tags" | "accounts" => sorted_sets(value),
                "extra" => canonical_extra(value),
                _ => value,
            };
            (name, value)
        })
        .collect()
}

/// Sorts arrays (and the arrays inside their records) by their debug text: sets compared
/// without order, duplicates still counted.
fn sorted_sets(value: Value) -> Value {
    match value {
        Value::Union(i, inner) => Value::Union(i, Box::new(sorted_sets(*inner))),
        Value::Record(fields) => Value::Record(
            fields
                .into_iter()
                .map(|(n, v)| (n, sorted_sets(v)))
                .collect(),
        ),
        Value::Array(items) => {
            let mut items: Vec<(String, Value)> = items
                .into_iter()
                .map(sorted_sets)
                .map(|v| (format!("{v:?}"), v))
                .collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Array(items.into_iter().map(|(_, v)| v).collect())
        }
        other => other,
    }
}

/// Rewrites the JSON texts of `extra` in canonical form (keys sorted, numbers by value).
fn canonical_extra(value: Value) -> Value {
    let Value::Map(entries) = value else {
        return value;
    };
    Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(text) => Value::String(canonical_json(&text)),
                    other => other,
                };
                (k, v)
            })
            .collect(),
    )
}

/// Returns `text` as canonical JSON: object keys sorted, numbers normalized (`1.0` is `1`);
/// text that is no JSON stays as it is.
pub fn canonical_json(text: &str) -> String {
    fn canon(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Number(n) => match n.to_string().parse::<Decimal>() {
                Ok(d) => serde_json::Value::String(format!("#{}", d.normalize())),
                Err(_) => serde_json::Value::Number(n),
            },
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.into_iter().map(canon).collect())
            }
            serde_json::Value::Object(map) => {
                let sorted: BTreeMap<String, serde_json::Value> =
                    map.into_iter().map(|(k, v)| (k, canon(v))).collect();
                serde_json::Value::Object(sorted.into_iter().collect())
            }
            other => other,
        }
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => canon(v).to_string(),
        Err(_) => text.to_owned(),
    }
}

/// Returns the names of the fields whose values differ, in schema order (a field only one
/// side has counts as differing).
pub fn differing(crm: &Body, kafka: &Body) -> Vec<String> {
    let mut out = Vec::new();
    for (name, value) in crm {
        match kafka.iter().find(|(n, _)| n == name) {
            Some((_, other)) if other == value => {}
            _ => out.push(name.clone()),
        }
    }
    for (name, _) in kafka {
        if !crm.iter().any(|(n, _)| n == name) {
            out.push(name.clone());
        }
    }
    out
}

/// Returns the field of a body (the value inside an optional's union).
pub fn field<'a>(body: &'a Body, name: &str) -> Option<&'a Value> {
    let value = &body.iter().find(|(n, _)| n == name)?.1;
    match value {
        Value::Union(_, inner) => match inner.as_ref() {
            Value::Null => None,
            inner => Some(inner),
        },
        Value::Null => None,
        other => Some(other),
    }
}

/// Returns a `decimal(38, 8)` field as a decimal.
pub fn decimal(body: &Body, name: &str) -> Option<Decimal> {
    match field(body, name)? {
        Value::Decimal(d) => {
            let bytes = Vec::<u8>::try_from(d).ok()?;
            if bytes.is_empty() || bytes.len() > 16 {
                return None;
            }
            // Big-endian two's complement, sign-extended to 16 bytes.
            let fill = if bytes[0] & 0x80 != 0 { 0xFF } else { 0 };
            let mut wide = [fill; 16];
            wide[16 - bytes.len()..].copy_from_slice(&bytes);
            Decimal::try_from_i128_with_scale(i128::from_be_bytes(wide), 8).ok()
        }
        _ => None,
    }
}

/// Returns a string field.
pub fn string(body: &Body, name: &str) -> Option<String> {
    match field(body, name)? {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Returns the day of a `timestamp-millis` field in `tz`.
pub fn day(body: &Body, name: &str, tz: Tz) -> Option<NaiveDate> {
    match field(body, name)? {
        Value::TimestampMillis(ms) | Value::Long(ms) => DateTime::<Utc>::from_timestamp_millis(*ms)
            .map(|t| t.with_timezone(&tz).date_naive()),
        _ => None,
    }
}

/// The field holding the day `run` reads a stream by (`None`: servers, read whole).
pub fn day_field(stream: &str) -> Option<&'static str> {
    match stream {
        "leads" | "customers" => Some("registrationDate"),
        "transactions" => Some("transactionDate"),
        "positions" => Some("closeTime"),
        _ => None,
    }
}

/// Sums of one stream on one day, one side: record counts and the money a payout is
/// computed from, as exact decimals.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    /// Records.
    pub records: u64,
    /// Named sums (`amountUsd[Deposit]`, `profit[mt4-live-01]`, `ftd`), exact.
    pub sums: BTreeMap<String, Decimal>,
}

impl Totals {
    fn add(&mut self, name: String, value: Decimal) {
        *self.sums.entry(name).or_default() += value;
    }
}

/// Adds one entity's contribution to the totals of its stream, by day: its record to the
/// day of its record date (`day`), and what it sums: transactions `amountUsd` per `type`;
/// positions `volume`, `profit`, `commission` and `swap` per server tag; customers a first
/// deposit to the day of their `ftdDate` (when that day is in `range`).
pub fn add_totals(
    stream: &str,
    body: &Body,
    day: Option<NaiveDate>,
    range: (NaiveDate, NaiveDate),
    tz: Tz,
    totals: &mut BTreeMap<Option<NaiveDate>, Totals>,
) {
    let entry = totals.entry(day).or_default();
    entry.records += 1;
    match stream {
        "transactions" => {
            let kind = string(body, "type").unwrap_or_else(|| "-".to_owned());
            if let Some(amount) = decimal(body, "amountUsd") {
                entry.add(format!("amountUsd[{kind}]"), amount);
            }
        }
        "positions" => {
            let tag = string(body, "serverTag").unwrap_or_else(|| "-".to_owned());
            for name in ["volume", "profit", "commission", "swap"] {
                if let Some(value) = decimal(body, name) {
                    entry.add(format!("{name}[{tag}]"), value);
                }
            }
        }
        "customers" => {
            if let Some(ftd) = self::day(body, "ftdDate", tz) {
                if ftd >= range.0 && ftd <= range.1 {
                    totals
                        .entry(Some(ftd))
                        .or_default()
                        .add("firstDeposits".to_owned(), Decimal::ONE);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_texts_compare_by_value_and_key_order_not_by_spelling() {
        assert_eq!(
            canonical_json(r#"{"b":1.0,"a":[2.50,"x"]}"#),
            canonical_json(r#"{"a":[2.5,"x"],"b":1}"#)
        );
        // A string is not a number.
        assert_ne!(canonical_json(r#""1.0""#), canonical_json("1"));
        assert_ne!(canonical_json("1.5"), canonical_json("1.50001"));
    }

    #[test]
    fn decimals_read_back_exactly_and_sets_ignore_order() {
        let bytes = crate::events::encode::decimal_bytes("x", "-7.85".parse().unwrap()).unwrap();
        let body: Body = vec![(
            "profit".to_owned(),
            Value::Union(
                1,
                Box::new(Value::Decimal(apache_avro::Decimal::from(bytes.to_vec()))),
            ),
        )];
        assert_eq!(decimal(&body, "profit"), Some("-7.85".parse().unwrap()));
        let a = sorted_sets(Value::Array(vec![
            Value::String("b".into()),
            Value::String("a".into()),
        ]));
        let b = sorted_sets(Value::Array(vec![
            Value::String("a".into()),
            Value::String("b".into()),
        ]));
        assert_eq!(a, b);
    }
}
