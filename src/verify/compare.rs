//! Comparing one entity's CRM version with its latest Kafka event, and the day totals.
//!
//! Both sides become the same thing before they are compared: an event's Avro record (the
//! CRM record through the encoder `run` uses, the Kafka event decoded with the schema its
//! framing names) without `meta` and without the stream's volatile fields. Representation
//! does not count: decimals are `decimal(38, 8)` on both sides (`1.0` and `1` are one
//! value), the sets (`tags`, the tags of a category, `accounts`) are compared without their
//! order, and the JSON texts of `extra` are compared as canonical JSON (numbers by value).

use std::borrow::Cow;
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
///
/// Events written by an earlier release with its schema (the released snapshots,
/// `schemas/compat/<Name>.v1.avsc`, in the configured namespace) are read by Avro schema
/// resolution into the current schema (fields added since take their defaults) when their
/// single-object fingerprint names the snapshot. A registry id of an older schema cannot
/// be told from here: such an event is unreadable.
pub struct Decoder {
    /// Per event type: the schema, its single-object fingerprint and its registry id (when
    /// the configuration has a registry).
    schemas: Vec<(Schema, [u8; 8], Option<u32>)>,
    /// Per event type: the released snapshot and its fingerprint (`None`: it does not parse,
    /// or it is the current schema).
    older: Vec<Option<(Schema, [u8; 8])>>,
}

/// Returns `event`'s released snapshot in `namespace` and its single-object fingerprint.
fn snapshot(event: EventType, namespace: &str) -> Option<(Schema, [u8; 8])> {
    let json = event.snapshot_v1().replace(
        "\"namespace\": \"com.ibstream\"",
        &format!("\"namespace\": {}", serde_json::Value::from(namespace)),
    );
    let value: serde_json::Value = serde_json::from_str(&json).ok()?;
    let fingerprint =
        crate::events::schema::fingerprint(&crate::events::schema::parsing_canonical_form(&value));
    let schema = Schema::parse_str(&json).ok()?;
    Some((schema, fingerprint))
}

impl Decoder {
    /// Builds a decoder of the current schemas under `framing`.
    pub fn new(schemas: &Schemas, framing: &Framing) -> Decoder {
        let ids = match framing {
            Framing::Confluent { ids } => Some(*ids),
            Framing::SingleObject => None,
        };
        let older = EventType::ALL
            .into_iter()
            .map(|event| {
                let current = schemas.get(event);
                let namespace = match &current.schema {
                    Schema::Record(record) => record.name.namespace.clone().unwrap_or_default(),
                    _ => String::new(),
                };
                snapshot(event, &namespace).filter(|(_, fp)| *fp != current.fingerprint)
            })
            .collect();
        Decoder {
            schemas: EventType::ALL
                .into_iter()
                .enumerate()
                .map(|(i, event)| {
                    let s = schemas.get(event);
                    (s.schema.clone(), s.fingerprint, ids.map(|ids| ids[i]))
                })
                .collect(),
            older,
        }
    }

    /// Decodes an event of `event`'s topic; the error says why it cannot be read (another
    /// schema, a truncated datum).
    pub fn decode(&self, event: EventType, payload: &[u8]) -> Result<Value, String> {
        let (schema, fingerprint, id) = &self.schemas[event as usize];
        let mut datum = match payload {
            [0xC3, 0x01, rest @ ..] if rest.len() >= 8 => {
                if let Some((older, _)) = self.older[event as usize]
                    .as_ref()
                    .filter(|(_, fp)| rest[..8] == fp[..])
                {
                    let mut datum = &rest[8..];
                    return apache_avro::from_avro_datum(older, &mut datum, Some(schema))
                        .map_err(|e| format!("written with the released v1 schema: {e}"));
                }
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
        Value::TimestampMillis(ms) | Value::Long(ms) => {
            DateTime::<Utc>::from_timestamp_millis(*ms).map(|t| t.with_timezone(&tz).date_naive())
        }
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
    /// Adds `value` to the sum `name`.
    pub fn add(&mut self, name: String, value: Decimal) {
        *self.sums.entry(name).or_default() += value;
    }
}

/// What one entity adds to its stream's totals: its record day (where its record counts
/// and its sums go), its first deposit's day (customers), and its sums – transactions
/// `amountUsd` per `type`; positions `volume`, `profit`, `commission` and `swap` per server
/// tag. Built per record without allocating (the group borrows from the record).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts<'a> {
    /// The record's day (`None`: no date, or servers).
    pub day: Option<NaiveDate>,
    /// The day of the customer's first deposit.
    pub ftd: Option<NaiveDate>,
    /// What the sums are grouped by: a transaction's `type`, a position's server tag.
    pub group: Cow<'a, str>,
    /// The measures summed, by name (`None`: the record has no such value).
    pub sums: [(&'static str, Option<Decimal>); 4],
}

impl Facts<'_> {
    /// Returns the named sums (`amountUsd[Deposit]`, …), for tests and reports.
    pub fn named(&self) -> Vec<(String, Decimal)> {
        self.sums
            .iter()
            .filter_map(|(m, v)| v.map(|v| (format!("{m}[{}]", self.group), v)))
            .collect()
    }

    /// Adds the entity to `totals`: its record and sums to its day, a first deposit to the
    /// deposit's day when that lies in `range`. `name` is scratch space for the sums' names.
    pub fn add_to(
        &self,
        range: (NaiveDate, NaiveDate),
        totals: &mut BTreeMap<Option<NaiveDate>, (Totals, Totals)>,
        crm: bool,
        name: &mut String,
    ) {
        fn side(t: &mut (Totals, Totals), crm: bool) -> &mut Totals {
            if crm {
                &mut t.0
            } else {
                &mut t.1
            }
        }
        let entry = side(totals.entry(self.day).or_default(), crm);
        entry.records += 1;
        for (measure, value) in &self.sums {
            let Some(value) = value else { continue };
            name.clear();
            name.push_str(measure);
            name.push('[');
            name.push_str(&self.group);
            name.push(']');
            match entry.sums.get_mut(name.as_str()) {
                Some(sum) => *sum += value,
                None => {
                    entry.sums.insert(name.clone(), *value);
                }
            }
        }
        if let Some(ftd) = self.ftd.filter(|d| *d >= range.0 && *d <= range.1) {
            side(totals.entry(Some(ftd)).or_default(), crm)
                .add("firstDeposits".to_owned(), Decimal::ONE);
        }
    }
}

const NO_SUMS: [(&str, Option<Decimal>); 4] = [("", None), ("", None), ("", None), ("", None)];

/// Returns the facts of an event's body (see [`Facts`]).
pub fn facts_of<'a>(stream: &str, body: &'a Body, tz: Tz) -> Facts<'a> {
    let group = |name: &str| -> Cow<'a, str> {
        match field(body, name) {
            Some(Value::String(s)) => Cow::Borrowed(s.as_str()),
            _ => Cow::Borrowed("-"),
        }
    };
    let mut facts = Facts {
        day: day_field(stream).and_then(|f| day(body, f, tz)),
        ftd: None,
        group: Cow::Borrowed(""),
        sums: NO_SUMS,
    };
    match stream {
        "transactions" => {
            facts.group = group("type");
            facts.sums[0] = ("amountUsd", decimal(body, "amountUsd"));
        }
        "positions" => {
            facts.group = group("serverTag");
            for (i, name) in ["volume", "profit", "commission", "swap"]
                .into_iter()
                .enumerate()
            {
                facts.sums[i] = (name, decimal(body, name));
            }
        }
        "customers" => facts.ftd = day(body, "ftdDate", tz),
        _ => {}
    }
    facts
}

/// The facts of a CRM model, equal to [`facts_of`] the body of its event (decimals as the
/// event holds them: 8 decimals at most).
pub trait ModelFacts {
    /// Returns the facts of the record.
    fn facts(&self, tz: Tz) -> Facts<'_>;
}

fn local_day(t: Option<DateTime<Utc>>, tz: Tz) -> Option<NaiveDate> {
    t.map(|t| t.with_timezone(&tz).date_naive())
}

fn as_event(d: Option<Decimal>) -> Option<Decimal> {
    d.map(|d| {
        if d.scale() > crate::events::encode::DECIMAL_SCALE {
            d.round_dp_with_strategy(
                crate::events::encode::DECIMAL_SCALE,
                rust_decimal::RoundingStrategy::MidpointNearestEven,
            )
        } else {
            d
        }
    })
}

impl ModelFacts for crate::crm::Lead {
    fn facts(&self, tz: Tz) -> Facts<'_> {
        Facts {
            day: local_day(self.person.registration_date, tz),
            ftd: None,
            group: Cow::Borrowed(""),
            sums: NO_SUMS,
        }
    }
}

impl ModelFacts for crate::crm::Customer {
    fn facts(&self, tz: Tz) -> Facts<'_> {
        Facts {
            day: local_day(self.person.registration_date, tz),
            ftd: local_day(self.ftd_date, tz),
            group: Cow::Borrowed(""),
            sums: NO_SUMS,
        }
    }
}

impl ModelFacts for crate::crm::Transaction {
    fn facts(&self, tz: Tz) -> Facts<'_> {
        let mut sums = NO_SUMS;
        sums[0] = ("amountUsd", as_event(self.amount_usd));
        Facts {
            day: local_day(self.transaction_date, tz),
            ftd: None,
            group: Cow::Borrowed(self.transaction_type.as_deref().unwrap_or("-")),
            sums,
        }
    }
}

impl ModelFacts for crate::crm::Position {
    fn facts(&self, tz: Tz) -> Facts<'_> {
        Facts {
            day: local_day(self.close_time, tz),
            ftd: None,
            group: Cow::Borrowed(self.server_tag.as_deref().unwrap_or("-")),
            sums: [
                ("volume", as_event(self.volume)),
                ("profit", as_event(self.profit)),
                ("commission", as_event(self.commission)),
                ("swap", as_event(self.swap)),
            ],
        }
    }
}

impl ModelFacts for crate::crm::Server {
    fn facts(&self, _tz: Tz) -> Facts<'_> {
        Facts {
            day: None,
            ftd: None,
            group: Cow::Borrowed(""),
            sums: NO_SUMS,
        }
    }
}

/// Returns the digest of what the fast path compares of a framed event: its framing header
/// (the schema it names) and its entity bytes ([`entity_bytes`]), as a 128-bit XXH3 hash; or
/// `None` when the entity bytes cannot be found. Two events with the same digest hold the same
/// entity (a collision of 128-bit hashes aside); different digests say nothing (the slow
/// comparison settles it).
pub fn digest(payload: &[u8]) -> Option<[u8; 16]> {
    let (header, _) = split_header(payload)?;
    let entity = entity_bytes(payload)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(header);
    hasher.update(entity);
    Some(hasher.digest128().to_le_bytes())
}

/// Splits a framed event into its framing header, which names its schema (single-object:
/// `C3 01` and the 8-byte fingerprint; Confluent: `00` and the 4-byte schema id), and the
/// datum after it; `None` when it is neither.
fn split_header(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = match payload {
        [0xC3, 0x01, ..] => 10,
        [0, ..] => 5,
        _ => return None,
    };
    (payload.len() >= len).then(|| payload.split_at(len))
}

/// Returns the entity part of a framed event: the bytes after the framing header and
/// `meta` (the entity's fields and `extra`), or `None` when they cannot be found. Two events
/// of one schema hold the same entity exactly when these bytes are equal, but for the order
/// of sets and `extra` texts spelled differently (which the slow comparison settles).
pub fn entity_bytes(payload: &[u8]) -> Option<&[u8]> {
    let (_, mut rest) = split_header(payload)?;
    fn long(rest: &mut &[u8]) -> Option<i64> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let (&byte, tail) = rest.split_first()?;
            *rest = tail;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        None
    }
    fn skip_bytes(rest: &mut &[u8]) -> Option<()> {
        let len = usize::try_from(long(rest)?).ok()?;
        *rest = rest.get(len..)?;
        Some(())
    }
    // EventMeta: eventId, op, emittedAt, source, endpoint, windowFrom, windowTo, fetchedAt,
    // connectorVersion.
    skip_bytes(&mut rest)?;
    long(&mut rest)?;
    long(&mut rest)?;
    skip_bytes(&mut rest)?;
    skip_bytes(&mut rest)?;
    for _ in 0..2 {
        if long(&mut rest)? == 1 {
            long(&mut rest)?;
        }
    }
    long(&mut rest)?;
    skip_bytes(&mut rest)?;
    Some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_snapshots_parse_in_any_namespace() {
        let schemas = Schemas::load("com.ibstream").unwrap();
        for event in EventType::ALL {
            let (_, fp) = snapshot(event, "com.ibstream").expect("the v1 snapshot parses");
            let (_, other) = snapshot(event, "org.example").unwrap();
            assert_ne!(fp, other, "the namespace is part of the fingerprint");
            eprintln!(
                "{}: v1 is current: {}",
                event.name(),
                fp == schemas.get(event).fingerprint
            );
        }
    }

    #[test]
    fn an_event_of_an_older_schema_is_read_by_resolution() {
        use crate::crm::Transaction;
        // Today v1 is the current schema; an older one is made by leaving out a field with
        // a default, as a later release adds one.
        let schemas = Schemas::load("com.ibstream").unwrap();
        let current = schemas.get(EventType::Transaction);
        let mut json: serde_json::Value = serde_json::from_str(&current.json).unwrap();
        let fields = json["fields"].as_array_mut().unwrap();
        let dropped = fields
            .iter()
            .rposition(|f| f.get("default").is_some())
            .unwrap();
        let name = fields.remove(dropped)["name"].as_str().unwrap().to_owned();
        let older = Schema::parse_str(&json.to_string()).unwrap();
        let fp = crate::events::schema::fingerprint(
            &crate::events::schema::parsing_canonical_form(&json),
        );
        let t: Transaction = read(
            r#"{"id":1,"type":"Deposit","amountUsd":"250.0","amount":1,"transactionDate":"2026-11-03 10:00:00"}"#,
        );
        let (_, body_now) = round_trip(&t);
        let mut decoder = Decoder::new(&schemas, &Framing::SingleObject);
        let (bytes, _) = round_trip(&t);
        let value = decoder.decode(EventType::Transaction, &bytes).unwrap();
        let mut event = vec![0xC3, 0x01];
        event.extend_from_slice(&fp);
        event.extend(apache_avro::to_avro_datum(&older, value.resolve(&older).unwrap()).unwrap());
        assert!(decoder.decode(EventType::Transaction, &event).is_err());
        decoder.older[EventType::Transaction as usize] = Some((older, fp));
        let read_back = body(decoder.decode(EventType::Transaction, &event).unwrap(), &[]);
        assert_eq!(
            differing(&body_now, &read_back),
            Vec::<String>::new(),
            "{name}"
        );
    }

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

    fn meta() -> crate::events::EventMeta {
        crate::events::EventMeta {
            event_id: "e".to_owned(),
            op: crate::events::Op::Created,
            emitted_at: Utc::now(),
            source: "s".to_owned(),
            endpoint: "/api/v1/ib/x".to_owned(),
            window: Some((NaiveDate::MIN, NaiveDate::MAX)),
            fetched_at: Utc::now(),
            connector_version: "0".to_owned(),
        }
    }

    fn read<T: crate::crm::CrmRecord>(json: &str) -> T {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json).unwrap();
        T::from_json(&map, chrono_tz::UTC).unwrap()
    }

    /// Encodes `model` as `run` does and reads the event back as `verify` reads the topic.
    fn round_trip<T: crate::events::AvroEvent>(model: &T) -> (Vec<u8>, Body) {
        let schemas = Schemas::load("com.ibstream").unwrap();
        let mut encoder = crate::events::Encoder::new(&schemas, Framing::SingleObject).unwrap();
        let bytes = encoder.encode(model, &meta()).unwrap();
        let decoder = Decoder::new(&schemas, &Framing::SingleObject);
        let value = decoder.decode(T::EVENT, &bytes).unwrap();
        (bytes, body(value, &[]))
    }

    #[test]
    fn a_number_written_another_way_is_the_same_event_and_the_same_facts() {
        use crate::crm::{Position, Transaction};
        let a: Transaction = read(
            r#"{"id":1,"type":"Deposit","amountUsd":"250.0","amount":1,"transactionDate":"2026-11-03 10:00:00"}"#,
        );
        let b: Transaction = read(
            r#"{"id":1,"type":"Deposit","amountUsd":250,"amount":"1.00","transactionDate":"2026-11-03 10:00:00"}"#,
        );
        let (bytes_a, body_a) = round_trip(&a);
        let (bytes_b, body_b) = round_trip(&b);
        assert_eq!(
            entity_bytes(&bytes_a),
            entity_bytes(&bytes_b),
            "the fast path"
        );
        assert_eq!(
            split_header(&bytes_a).unwrap().0,
            split_header(&bytes_b).unwrap().0
        );
        assert!(digest(&bytes_a).is_some());
        assert_eq!(
            digest(&bytes_a),
            digest(&bytes_b),
            "the digest verify keeps"
        );
        assert!(differing(&body_a, &body_b).is_empty());
        // The totals of the fast path (the model) are those of the slow one (the event).
        let tz = chrono_tz::UTC;
        assert_eq!(
            a.facts(tz).named(),
            facts_of("transactions", &body_a, tz).named()
        );
        assert_eq!(a.facts(tz).day, facts_of("transactions", &body_a, tz).day);
        assert_eq!(
            a.facts(tz).named(),
            vec![("amountUsd[Deposit]".to_owned(), "250".parse().unwrap())]
        );
        let p: Position = read(
            r#"{"positionId":7,"serverTag":"mt4-live-01","volume":"1.50","profit":"-7.8500000000000005","commission":"-7","swap":"0.12","closeTime":"2026-11-03 23:59:59"}"#,
        );
        let (_, body_p) = round_trip(&p);
        assert_eq!(
            p.facts(tz).named(),
            facts_of("positions", &body_p, tz).named()
        );
        assert_eq!(p.facts(tz).named().len(), 4);
        // A changed amount is found and named.
        let c: Transaction = read(
            r#"{"id":1,"type":"Deposit","amountUsd":"251","amount":1,"transactionDate":"2026-11-03 10:00:00"}"#,
        );
        let (bytes_c, body_c) = round_trip(&c);
        assert_ne!(entity_bytes(&bytes_a), entity_bytes(&bytes_c));
        assert_ne!(digest(&bytes_a), digest(&bytes_c));
        // Another schema (framing header) is another digest; no entity bytes, no digest.
        let mut other_schema = bytes_a.clone();
        other_schema[2] ^= 1;
        assert_ne!(digest(&bytes_a), digest(&other_schema));
        assert_eq!(digest(&[0xC3, 0x01, 1, 2, 3]), None);
        assert_eq!(differing(&body_a, &body_c), vec!["amountUsd".to_owned()]);
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
