//! Paged answers: the envelope, its name aliases, and per-record results.
//!
//! A page that is not JSON, or has no record array, is a bad *answer* (the caller retries it as
//! a truncated or garbled body). A record inside a good page that its model cannot read is a
//! per-record [`RecordError`] carrying the record's JSON: the page's other records still arrive.
//! Records are read from the body's bytes without a JSON tree ([`super::raw`]), and each gets
//! its fingerprint while its fields are at hand.

use std::fmt;

use chrono_tz::Tz;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use super::models::CrmRecord;
use super::raw::{Field, Fields};
use super::time::kind_of;
use crate::stream::change::fingerprint_fields;

/// One record as read (`model`), its fingerprint and its JSON text as received.
#[derive(Debug, Clone)]
pub struct Record<T> {
    /// The parsed model.
    pub model: T,
    /// The fingerprint of the record's canonical JSON without the stream's volatile fields.
    pub fp: u64,
    /// The record's JSON text as received.
    pub raw: Box<str>,
}

impl<T> Record<T> {
    /// The record's JSON as a dead letter shows it: compact, keys sorted.
    pub fn normalized_json(&self) -> String {
        normalize(&self.raw)
    }
}

/// A record that could not be read, with its raw JSON and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unreadable record: {reason}")]
pub struct RecordError {
    /// Why the record could not be read (names the field at fault).
    pub reason: String,
    /// The record's JSON text (compact, keys sorted).
    pub raw: String,
}

/// One page of a paged endpoint.
#[derive(Debug)]
pub struct Page<T> {
    /// The page number asked for (1-based).
    pub page: u32,
    /// The page size asked for.
    pub page_size: u32,
    /// The total the CRM reported for the whole query, if it reported one.
    pub total: Option<u64>,
    /// The records of the page, each read or failed on its own.
    pub records: Vec<Result<Record<T>, RecordError>>,
    /// The read sequence number taken when its request was first sent ([`next_read_seq`]; 0
    /// for a page not read by a pager): a page with a smaller number may show older versions
    /// than one with a larger number.
    pub sent: u64,
}

/// Returns a number larger than every one returned before in this process: the order in which
/// page requests were sent, so a page held back (read ahead, or by a paused sweep) is known
/// to be older than a later read of the same records.
pub fn next_read_seq() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Names the CRM may give the record array and the total (CRM_API.md, "Tolerance").
const DATA_KEYS: [&str; 4] = ["data", "records", "items", "result"];
const TOTAL_KEYS: [&str; 3] = ["total", "totalRecords", "totalCount"];

/// Parses a paged answer; `volatile` fields are left out of the fingerprints. `Err` means the
/// answer as a whole is unusable.
pub fn parse_page<T: CrmRecord>(
    body: &[u8],
    page: u32,
    page_size: u32,
    tz: Tz,
    volatile: &[String],
) -> Result<Page<T>, String> {
    let not_json = |e: serde_json::Error| format!("answer is not JSON: {e}");
    let (items, total) = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => (
            serde_json::from_slice::<Vec<&RawValue>>(body).map_err(not_json)?,
            None,
        ),
        Some(b'{') => {
            let envelope: Envelope = serde_json::from_slice(body).map_err(not_json)?;
            let items = envelope
                .data
                .into_iter()
                .zip(DATA_KEYS)
                .find_map(|(data, k)| match data {
                    Data::Items(items) => Some(Ok(items)),
                    Data::Missing => None,
                    Data::Other(kind) => Some(Err(format!("`{k}` is {kind}, not an array"))),
                })
                .transpose()?;
            let total = envelope
                .totals
                .iter()
                .find_map(|t| t.as_ref().filter(|v| !v.is_null()))
                .map(parse_count)
                .transpose()?;
            match items {
                Some(items) => (items, total),
                // An empty result may come without the array at all, but only with a total of 0.
                None if total == Some(0) => (Vec::new(), total),
                None => return Err("answer has no data/records/items/result array".to_owned()),
            }
        }
        _ => {
            let other: Value = serde_json::from_slice(body).map_err(not_json)?;
            return Err(format!("answer is {}, not an object", kind_of(&other)));
        }
    };
    let mut buffer = Vec::with_capacity(1024);
    let records = items
        .into_iter()
        .map(|item| read_text(item.get(), tz, volatile, &mut buffer))
        .collect();
    Ok(Page {
        page,
        page_size,
        total,
        records,
        sent: 0,
    })
}

/// Reads one record's JSON text into its model and fingerprint, or a [`RecordError`].
pub fn read_text<T: CrmRecord>(
    text: &str,
    tz: Tz,
    volatile: &[String],
    buffer: &mut Vec<u8>,
) -> Result<Record<T>, RecordError> {
    let fields = match text.as_bytes().first() {
        Some(b'{') => Fields::parse(text).map_err(|e| RecordError {
            reason: format!("unreadable record: {e}"),
            raw: normalize(text),
        })?,
        _ => {
            let kind = serde_json::from_str::<Value>(text).map_or("not JSON", |v| kind_of(&v));
            return Err(RecordError {
                reason: format!("record is {kind}, not an object"),
                raw: normalize(text),
            });
        }
    };
    match T::from_fields(&fields, tz) {
        Ok(model) => Ok(Record {
            model,
            fp: fingerprint_fields(&fields, volatile, buffer),
            raw: text.into(),
        }),
        Err(reason) => Err(RecordError {
            reason,
            raw: normalize(text),
        }),
    }
}

/// Reads one record value (fingerprint without volatile fields), as [`read_text`] does.
pub fn read_record<T: CrmRecord>(item: Value, tz: Tz) -> Result<Record<T>, RecordError> {
    read_text(&item.to_string(), tz, &[], &mut Vec::new())
}

/// JSON text as serde_json writes its value: compact, object keys sorted.
fn normalize(text: &str) -> String {
    serde_json::from_str::<Value>(text).map_or_else(|_| text.to_owned(), |v| v.to_string())
}

fn parse_count(value: &Field<'_>) -> Result<u64, String> {
    match value {
        Field::Number(n) => n.parse().map_err(|_| format!("total is not a count: {n}")),
        Field::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("total is not a count: {s:?}")),
        other => Err(format!("total is {}", other.kind())),
    }
}

/// The envelope of a paged answer: its record arrays and totals under every alias (the last
/// of a key given twice counts); everything else is skipped unread.
struct Envelope<'a> {
    data: [Data<'a>; 4],
    totals: [Option<Field<'a>>; 3],
}

/// What an alias of the record array holds.
#[derive(Default)]
enum Data<'a> {
    #[default]
    Missing,
    Items(Vec<&'a RawValue>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor;
        impl<'de> Visitor<'de> for EnvelopeVisitor {
            type Value = Envelope<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Envelope<'de>, M::Error> {
                let mut envelope = Envelope {
                    data: Default::default(),
                    totals: Default::default(),
                };
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if let Some(i) = DATA_KEYS.iter().position(|k| *k == key) {
                        envelope.data[i] = map.next_value()?;
                    } else if let Some(i) = TOTAL_KEYS.iter().position(|k| *k == key) {
                        let raw: &'de RawValue = map.next_value()?;
                        envelope.totals[i] =
                            Some(Field::from_raw(raw).map_err(serde::de::Error::custom)?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(envelope)
            }
        }
        deserializer.deserialize_map(EnvelopeVisitor)
    }
}

impl<'de> Deserialize<'de> for Data<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DataVisitor;
        impl<'de> Visitor<'de> for DataVisitor {
            type Value = Data<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Data<'de>, S::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(256));
                while let Some(item) = seq.next_element::<&'de RawValue>()? {
                    items.push(item);
                }
                Ok(Data::Items(items))
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Data<'de>, M::Error> {
                // Under `arbitrary_precision` a number arrives as a one-entry map.
                let mut kind = "an object";
                if let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "$serde_json::private::Number" {
                        kind = "a number";
                    }
                    map.next_value::<IgnoredAny>()?;
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                }
                Ok(Data::Other(kind))
            }

            fn visit_unit<E>(self) -> Result<Data<'de>, E> {
                Ok(Data::Missing)
            }

            fn visit_bool<E>(self, _: bool) -> Result<Data<'de>, E> {
                Ok(Data::Other("a boolean"))
            }

            fn visit_str<E>(self, _: &str) -> Result<Data<'de>, E> {
                Ok(Data::Other("a string"))
            }

            fn visit_u64<E>(self, _: u64) -> Result<Data<'de>, E> {
                Ok(Data::Other("a number"))
            }

            fn visit_i64<E>(self, _: i64) -> Result<Data<'de>, E> {
                Ok(Data::Other("a number"))
            }

            fn visit_f64<E>(self, _: f64) -> Result<Data<'de>, E> {
                Ok(Data::Other("a number"))
            }
        }
        deserializer.deserialize_any(DataVisitor)
    }
}

/// Parses the servers answer: `{"mt4": [{...}], "mt5": [...]}` grouped by platform, or a flat
/// array of servers (optionally inside a `data` envelope).
pub fn parse_servers<T: CrmRecord>(
    body: &[u8],
    tz: Tz,
    volatile: &[String],
) -> Result<Vec<Result<Record<T>, RecordError>>, String> {
    let read = |item: Value| read_text(&item.to_string(), tz, volatile, &mut Vec::new());
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    let mut out = Vec::new();
    match value {
        Value::Array(items) => out.extend(items.into_iter().map(read)),
        Value::Object(mut map) => {
            if let Some(Value::Array(items)) = DATA_KEYS.iter().find_map(|k| map.remove(*k)) {
                out.extend(items.into_iter().map(read));
            }
            for (platform, group) in map {
                match group {
                    Value::Array(items) => out.extend(items.into_iter().map(|item| {
                        let item = match item {
                            Value::Object(mut server) => {
                                server
                                    .entry("platform")
                                    .or_insert_with(|| Value::String(platform.clone()));
                                Value::Object(server)
                            }
                            other => other,
                        };
                        read(item)
                    })),
                    Value::Null => {}
                    other => out.push(Err(RecordError {
                        reason: format!(
                            "platform group `{platform}` is {}, not an array",
                            kind_of(&other)
                        ),
                        raw: other.to_string(),
                    })),
                }
            }
        }
        other => return Err(format!("answer is {}, not an object", kind_of(&other))),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::models::{Lead, Server};

    #[test]
    fn every_envelope_alias_parses() {
        for (data, total) in [
            ("data", "total"),
            ("records", "totalRecords"),
            ("items", "totalCount"),
            ("result", "total"),
        ] {
            let body = format!(
                r#"{{"page": 1, "pageSize": 2, "{total}": "3", "{data}": [{{"id": 1}}, {{"id": "2"}}]}}"#
            );
            let page = parse_page::<Lead>(body.as_bytes(), 1, 2, Tz::UTC, &[]).unwrap();
            assert_eq!(page.total, Some(3), "{data}/{total}");
            let ids: Vec<_> = page
                .records
                .iter()
                .map(|r| r.as_ref().unwrap().model.id)
                .collect();
            assert_eq!(ids, vec![Some(1), Some(2)], "{data}/{total}");
        }
    }

    #[test]
    fn bad_record_fails_alone() {
        let body =
            br#"{"total": 3, "data": [{"id": 1}, {"id": 2, "registrationDate": "31/12/2024"}, 7]}"#;
        let page = parse_page::<Lead>(body, 1, 1000, Tz::UTC, &[]).unwrap();
        assert!(page.records[0].is_ok());
        let err = page.records[1].as_ref().unwrap_err();
        assert!(err.reason.contains("registrationDate"), "{}", err.reason);
        assert!(err.raw.contains("31/12/2024"), "{}", err.raw);
        let err = page.records[2].as_ref().unwrap_err();
        assert_eq!(err.raw, "7");
    }

    #[test]
    fn garbled_answers_are_errors() {
        assert!(
            parse_page::<Lead>(br#"{"total": 3, "data": [{"id": 1}"#, 1, 1000, Tz::UTC, &[])
                .is_err()
        );
        assert!(parse_page::<Lead>(br#"{"total": 3}"#, 1, 1000, Tz::UTC, &[]).is_err());
        assert!(parse_page::<Lead>(br#"{"data": {}}"#, 1, 1000, Tz::UTC, &[]).is_err());
        assert!(parse_page::<Lead>(b"<html>502</html>", 1, 1000, Tz::UTC, &[]).is_err());
        let empty = parse_page::<Lead>(br#"{"total": 0}"#, 1, 1000, Tz::UTC, &[]).unwrap();
        assert!(empty.records.is_empty());
    }

    #[test]
    fn servers_grouped_by_platform() {
        let body = br#"{"mt4": [{"id": "mt4-live-01", "name": "MT4 Live 1", "type": "live"},
                                 {"id": "mt4-demo-01", "name": "MT4 Demo", "type": "demo"}],
                        "mt5": [{"id": "mt5-live-02", "name": "MT5 Live 2", "type": "live"}]}"#;
        let servers: Vec<Server> = parse_servers::<Server>(body, Tz::UTC, &[])
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap().model)
            .collect();
        assert_eq!(servers.len(), 3);
        let live: Vec<_> = servers
            .iter()
            .filter(|s| s.is_live())
            .map(|s| s.id.clone().unwrap())
            .collect();
        assert_eq!(live, vec!["mt4-live-01", "mt5-live-02"]);
        assert_eq!(servers[2].platform.as_deref(), Some("mt5"));
    }
}
