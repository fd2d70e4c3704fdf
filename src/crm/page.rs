//! Paged answers: the envelope, its name aliases, and per-record results.
//!
//! A page that is not JSON, or has no record array, is a bad *answer* (the caller retries it as
//! a truncated or garbled body). A record inside a good page that its model cannot read is a
//! per-record [`RecordError`] carrying the record's JSON: the page's other records still arrive.

use chrono_tz::Tz;
use serde_json::{Map, Value};

use super::models::CrmRecord;
use super::time::kind_of;

/// One record as received (`json`, for fingerprints and dead letters) and as read (`model`).
#[derive(Debug, Clone)]
pub struct Record<T> {
    /// The record object exactly as the CRM sent it (keys sorted by serde_json's map).
    pub json: Map<String, Value>,
    /// The parsed model.
    pub model: T,
}

/// A record that could not be read, with its raw JSON and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unreadable record: {reason}")]
pub struct RecordError {
    /// Why the record could not be read (names the field at fault).
    pub reason: String,
    /// The record's JSON text.
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
}

/// Names the CRM may give the record array and the total (CRM_API.md, "Tolerance").
const DATA_KEYS: [&str; 4] = ["data", "records", "items", "result"];
const TOTAL_KEYS: [&str; 3] = ["total", "totalRecords", "totalCount"];

/// Parses a paged answer. `Err` means the answer as a whole is unusable.
pub fn parse_page<T: CrmRecord>(
    body: &[u8],
    page: u32,
    page_size: u32,
    tz: Tz,
) -> Result<Page<T>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    let (items, total) = match value {
        Value::Array(items) => (items, None),
        Value::Object(mut map) => {
            let items = DATA_KEYS
                .iter()
                .find_map(|k| match map.remove(*k) {
                    Some(Value::Array(items)) => Some(Ok(items)),
                    Some(Value::Null) | None => None,
                    Some(other) => Some(Err(format!("`{k}` is {}, not an array", kind_of(&other)))),
                })
                .transpose()?;
            let total = TOTAL_KEYS
                .iter()
                .find_map(|k| map.get(*k).filter(|v| !v.is_null()))
                .map(parse_count)
                .transpose()?;
            match items {
                Some(items) => (items, total),
                // An empty result may come without the array at all, but only with a total of 0.
                None if total == Some(0) => (Vec::new(), total),
                None => return Err("answer has no data/records/items/result array".to_owned()),
            }
        }
        other => return Err(format!("answer is {}, not an object", kind_of(&other))),
    };
    let records = items
        .into_iter()
        .map(|item| read_record(item, tz))
        .collect();
    Ok(Page {
        page,
        page_size,
        total,
        records,
    })
}

/// Reads one record value into its model, or a [`RecordError`] with its JSON.
pub fn read_record<T: CrmRecord>(item: Value, tz: Tz) -> Result<Record<T>, RecordError> {
    match item {
        Value::Object(json) => match T::from_json(&json, tz) {
            Ok(model) => Ok(Record { json, model }),
            Err(reason) => Err(RecordError {
                reason,
                raw: Value::Object(json).to_string(),
            }),
        },
        other => Err(RecordError {
            reason: format!("record is {}, not an object", kind_of(&other)),
            raw: other.to_string(),
        }),
    }
}

fn parse_count(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("total is not a count: {n}")),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("total is not a count: {s:?}")),
        other => Err(format!("total is {}", kind_of(other))),
    }
}

/// Parses the servers answer: `{"mt4": [{...}], "mt5": [...]}` grouped by platform, or a flat
/// array of servers (optionally inside a `data` envelope).
pub fn parse_servers<T: CrmRecord>(
    body: &[u8],
    tz: Tz,
) -> Result<Vec<Result<Record<T>, RecordError>>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    let mut out = Vec::new();
    match value {
        Value::Array(items) => out.extend(items.into_iter().map(|item| read_record(item, tz))),
        Value::Object(mut map) => {
            if let Some(Value::Array(items)) = DATA_KEYS.iter().find_map(|k| map.remove(*k)) {
                out.extend(items.into_iter().map(|item| read_record(item, tz)));
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
                        read_record(item, tz)
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
            let page = parse_page::<Lead>(body.as_bytes(), 1, 2, Tz::UTC).unwrap();
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
        let page = parse_page::<Lead>(body, 1, 1000, Tz::UTC).unwrap();
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
            parse_page::<Lead>(br#"{"total": 3, "data": [{"id": 1}"#, 1, 1000, Tz::UTC).is_err()
        );
        assert!(parse_page::<Lead>(br#"{"total": 3}"#, 1, 1000, Tz::UTC).is_err());
        assert!(parse_page::<Lead>(br#"{"data": {}}"#, 1, 1000, Tz::UTC).is_err());
        assert!(parse_page::<Lead>(b"<html>502</html>", 1, 1000, Tz::UTC).is_err());
        let empty = parse_page::<Lead>(br#"{"total": 0}"#, 1, 1000, Tz::UTC).unwrap();
        assert!(empty.records.is_empty());
    }

    #[test]
    fn servers_grouped_by_platform() {
        let body = br#"{"mt4": [{"id": "mt4-live-01", "name": "MT4 Live 1", "type": "live"},
                                 {"id": "mt4-demo-01", "name": "MT4 Demo", "type": "demo"}],
                        "mt5": [{"id": "mt5-live-02", "name": "MT5 Live 2", "type": "live"}]}"#;
        let servers: Vec<Server> = parse_servers::<Server>(body, Tz::UTC)
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
