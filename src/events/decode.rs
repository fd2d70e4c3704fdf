//! Reading events back: a framed record value (single-object or Confluent) to its Avro value,
//! and an Avro value to JSON for people (`ibstream events tail`, the demo's view).
//!
//! Framing is told by the first byte: `C3 01` + 8-byte CRC-64-AVRO fingerprint is Avro
//! single-object encoding (the writer schema is one of the embedded schemas, found by its
//! fingerprint); `00` + 4-byte big-endian id is Confluent's wire format (the writer schema is
//! fetched from the Schema Registry by id, once per id). The datum is read with the writer
//! schema by apache-avro.
//!
//! JSON shape: records as objects in field order, a union as its branch's value (`null` for
//! null), enums as their symbol, `decimal` as an exact string (`"1234.5"`: never a float),
//! `timestamp-millis` as RFC 3339 UTC with milliseconds, `date` as `YYYY-MM-DD`, bytes and
//! fixed as lowercase hex.

use std::collections::HashMap;

use apache_avro::schema::{Name, Schema};
use apache_avro::types::Value as Avro;
use serde_json::value::RawValue;
use serde_json::{json, Value as Json};

use super::registry::SchemaRegistry;
use super::schema::Schemas;

/// Why a record value could not be decoded (the text names the cause; no secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn fail<T>(message: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(message.into()))
}

/// A writer schema with the named types it defines (for `Ref`s to them).
struct Writer {
    schema: Schema,
    names: HashMap<Name, Schema>,
}

impl Writer {
    fn new(schema: Schema) -> Writer {
        let mut names = HashMap::new();
        collect_names(&schema, &mut names);
        Writer { schema, names }
    }
}

fn collect_names(schema: &Schema, names: &mut HashMap<Name, Schema>) {
    match schema {
        Schema::Record(record) => {
            names.insert(record.name.clone(), schema.clone());
            for field in &record.fields {
                collect_names(&field.schema, names);
            }
        }
        Schema::Enum(e) => {
            names.insert(e.name.clone(), schema.clone());
        }
        Schema::Fixed(f) => {
            names.insert(f.name.clone(), schema.clone());
        }
        Schema::Array(a) => collect_names(&a.items, names),
        Schema::Map(m) => collect_names(&m.types, names),
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_names(v, names)),
        _ => {}
    }
}

/// Decodes framed event values: embedded schemas by fingerprint, registry schemas by id.
pub struct Decoder {
    by_fingerprint: Vec<([u8; 8], Writer)>,
    registry: Option<SchemaRegistry>,
    by_id: HashMap<u32, Writer>,
    /// Ids whose fetch failed, with when: asked again only after [`REGISTRY_RETRY`], so a
    /// registry that is down costs one request per id, not one per record.
    failed: HashMap<u32, (std::time::Instant, DecodeError)>,
}

/// How long a failed registry fetch of a schema id stands before the id is asked again.
pub const REGISTRY_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// One decoded event value.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The writer schema's full name (`com.ibstream.LeadEvent`).
    pub schema: String,
    /// The record as JSON text, fields in schema order (see the module's shape).
    pub record: Box<RawValue>,
}

impl Decoded {
    /// Returns the record as a JSON value (objects' keys then sorted).
    pub fn value(&self) -> Json {
        serde_json::from_str(self.record.get()).unwrap_or(Json::Null)
    }
}

impl Decoder {
    /// Builds a decoder for the embedded `schemas` and, for Confluent-framed values, a
    /// registry (`None`: such values fail to decode, saying a registry is needed).
    pub fn new(schemas: &Schemas, registry: Option<SchemaRegistry>) -> Decoder {
        Decoder {
            by_fingerprint: schemas
                .all()
                .iter()
                .map(|s| (s.fingerprint, Writer::new(s.schema.clone())))
                .collect(),
            registry,
            by_id: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    /// Decodes a framed value whose writer schema is embedded (single-object framing) or
    /// already fetched; `Ok(None)` for a Confluent value whose schema must be fetched first
    /// ([`Decoder::decode`] does that).
    pub fn decode_known(&self, payload: &[u8]) -> Result<Option<Decoded>, DecodeError> {
        let (writer, mut datum) = match payload {
            [0xC3, 0x01, rest @ ..] if rest.len() >= 8 => {
                let (fingerprint, datum) = rest.split_at(8);
                let Some((_, writer)) = self
                    .by_fingerprint
                    .iter()
                    .find(|(f, _)| f[..] == *fingerprint)
                else {
                    return fail(format!(
                        "single-object value with schema fingerprint {} is not one of ibstream's schemas (events.namespace differs, or another writer)",
                        hex(fingerprint)
                    ));
                };
                (writer, datum)
            }
            [0x00, a, b, c, d, datum @ ..] => {
                let id = u32::from_be_bytes([*a, *b, *c, *d]);
                match self.by_id.get(&id) {
                    Some(writer) => (writer, datum),
                    None => return Ok(None),
                }
            }
            _ => {
                return fail(format!(
                    "not an Avro event: neither single-object (C3 01) nor Confluent (00) framing; first bytes {}",
                    hex(&payload[..payload.len().min(10)])
                ))
            }
        };
        let value = apache_avro::from_avro_datum(&writer.schema, &mut datum, None)
            .map_err(|e| DecodeError(format!("Avro datum does not decode: {e}")))?;
        if !datum.is_empty() {
            return fail(format!("{} bytes left after the Avro datum", datum.len()));
        }
        let mut text = String::with_capacity(payload.len() * 2);
        write_json(&value, &writer.schema, &writer.names, &mut text)?;
        let record = RawValue::from_string(text)
            .map_err(|e| DecodeError(format!("cannot write the record as JSON: {e}")))?;
        let schema = match &writer.schema {
            Schema::Record(r) => r.name.fullname(None),
            other => format!("{other:?}"),
        };
        Ok(Some(Decoded { schema, record }))
    }

    /// Decodes a framed value, fetching a Confluent value's schema from the registry by id
    /// (once per id).
    pub async fn decode(&mut self, payload: &[u8]) -> Result<Decoded, DecodeError> {
        if let Some(decoded) = self.decode_known(payload)? {
            return Ok(decoded);
        }
        // decode_known returns None only for a Confluent value of an id not fetched yet.
        let id = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
        let Some(registry) = &self.registry else {
            return fail(format!(
                "Confluent-framed value (schema id {id}): set schema_registry.url to decode it"
            ));
        };
        if let Some((when, error)) = self.failed.get(&id) {
            if when.elapsed() < REGISTRY_RETRY {
                return Err(error.clone());
            }
        }
        let fetched = registry
            .schema_by_id(id)
            .await
            .map_err(|e| DecodeError(e.to_string()))
            .and_then(|text| {
                Schema::parse_str(&text).map_err(|e| {
                    DecodeError(format!("the registry's schema id {id} does not parse: {e}"))
                })
            });
        let schema = match fetched {
            Ok(schema) => schema,
            Err(error) => {
                self.failed
                    .insert(id, (std::time::Instant::now(), error.clone()));
                return Err(error);
            }
        };
        self.failed.remove(&id);
        self.by_id.insert(id, Writer::new(schema));
        match self.decode_known(payload)? {
            Some(decoded) => Ok(decoded),
            None => fail(format!("schema id {id} not found after fetching it")),
        }
    }
}

/// Appends `value` (written with `schema`) as JSON text to `out`, records' fields in schema
/// order; see the module's shape.
fn write_json(
    value: &Avro,
    schema: &Schema,
    names: &HashMap<Name, Schema>,
    out: &mut String,
) -> Result<(), DecodeError> {
    let schema = match schema {
        Schema::Ref { name } => match names.get(name) {
            Some(schema) => schema,
            None => return fail(format!("schema refers to unknown type {name}")),
        },
        other => other,
    };
    let scalar = match (value, schema) {
        (Avro::Union(i, inner), Schema::Union(union)) => {
            let Some(branch) = union.variants().get(*i as usize) else {
                return fail(format!("union branch {i} out of range"));
            };
            return write_json(inner, branch, names, out);
        }
        (Avro::Record(fields), Schema::Record(record)) => {
            out.push('{');
            for (i, ((name, value), field)) in fields.iter().zip(&record.fields).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Json::String(name.clone()).to_string());
                out.push(':');
                write_json(value, &field.schema, names, out)?;
            }
            out.push('}');
            return Ok(());
        }
        (Avro::Array(items), Schema::Array(array)) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, &array.items, names, out)?;
            }
            out.push(']');
            return Ok(());
        }
        (Avro::Map(entries), Schema::Map(map)) => {
            let mut keys: Vec<&String> = entries.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Json::String(key.clone()).to_string());
                out.push(':');
                write_json(&entries[key], &map.types, names, out)?;
            }
            out.push('}');
            return Ok(());
        }
        (Avro::Decimal(d), Schema::Decimal(decimal)) => {
            // A zero-length decimal (valid Avro, written by other writers) is 0, which
            // apache-avro cannot give back as zero bytes.
            let bytes = match Vec::<u8>::try_from(d) {
                Ok(bytes) => bytes,
                Err(_) if *d == apache_avro::Decimal::from([0u8]) => Vec::new(),
                Err(e) => return fail(format!("decimal does not read: {e}")),
            };
            Json::String(decimal_text(&bytes, decimal.scale)?)
        }
        (Avro::Null, _) => Json::Null,
        (Avro::Boolean(b), _) => json!(b),
        (Avro::Int(n), _) => json!(n),
        (Avro::Long(n), _) => json!(n),
        (Avro::Float(n), _) => json!(n),
        (Avro::Double(n), _) => json!(n),
        (Avro::String(s), _) | (Avro::Enum(_, s), _) => Json::String(s.clone()),
        (Avro::Bytes(b), _) | (Avro::Fixed(_, b), _) => Json::String(hex(b)),
        // Days since 1970-01-01; 719 163 days from 0001-01-01 (CE) to then. A corrupt
        // record's count can lie beyond any calendar: an error, never an overflow.
        (Avro::Date(days), _) => match 719_163i32
            .checked_add(*days)
            .and_then(chrono::NaiveDate::from_num_days_from_ce_opt)
        {
            Some(day) => Json::String(day.to_string()),
            None => return fail(format!("date {days} days from 1970-01-01 is out of range")),
        },
        (Avro::TimestampMillis(ms), _) => {
            Json::String(chrono::DateTime::from_timestamp_millis(*ms).map_or_else(
                || ms.to_string(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ))
        }
        (Avro::TimestampMicros(us), _) => {
            Json::String(chrono::DateTime::from_timestamp_micros(*us).map_or_else(
                || us.to_string(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ))
        }
        (Avro::Uuid(u), _) => Json::String(u.to_string()),
        (other, schema) => {
            return fail(format!(
                "value {other:?} does not match its schema {:?}",
                apache_avro::schema::SchemaKind::from(schema)
            ))
        }
    };
    out.push_str(&scalar.to_string());
    Ok(())
}

/// Returns an Avro decimal (big-endian two's complement `bytes`, `scale` digits after the
/// point) as an exact decimal string without trailing zeros after the point (`"-12.5"`).
pub fn decimal_text(bytes: &[u8], scale: usize) -> Result<String, DecodeError> {
    if bytes.len() > 16 {
        return fail(format!(
            "decimal of {} bytes is wider than 128 bits",
            bytes.len()
        ));
    }
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut wide = [if negative { 0xFF } else { 0 }; 16];
    wide[16 - bytes.len()..].copy_from_slice(bytes);
    let unscaled = i128::from_be_bytes(wide);
    let digits = unscaled.unsigned_abs().to_string();
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = digits.split_at(digits.len() - scale);
    let frac = frac.trim_end_matches('0');
    let sign = if negative { "-" } else { "" };
    Ok(if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact_strings() {
        let text = |n: i128, scale| {
            let bytes = n.to_be_bytes();
            decimal_text(&bytes, scale).unwrap()
        };
        assert_eq!(text(123_450_000_000, 8), "1234.5");
        assert_eq!(text(-1, 8), "-0.00000001");
        assert_eq!(text(0, 8), "0");
        assert_eq!(text(-250_000_000, 8), "-2.5");
        // 38 digits: beyond f64 and rust_decimal, still exact.
        assert_eq!(
            text(99_999_999_999_999_999_999_999_999_999_999_999_999, 8),
            "999999999999999999999999999999.99999999"
        );
        assert_eq!(decimal_text(&[0x80], 0).unwrap(), "-128");
        assert!(decimal_text(&[1; 17], 8).is_err());
    }

    /// Values another writer may send: a zero-length decimal (valid Avro: 0) and a date
    /// beyond any calendar (corrupt: an error, never a panic or a wrap).
    #[test]
    fn an_empty_decimal_is_zero_and_a_date_out_of_range_an_error() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[
                {"name":"d","type":{"type":"bytes","logicalType":"decimal","precision":38,"scale":8}},
                {"name":"day","type":{"type":"int","logicalType":"date"}}]}"#,
        )
        .unwrap();
        let names = HashMap::new();
        let write = |value: Avro| {
            let mut out = String::new();
            write_json(&value, &schema, &names, &mut out).map(|()| out)
        };
        let record = |decimal: Vec<u8>, day: i32| {
            Avro::Record(vec![
                ("d".to_owned(), Avro::Decimal(decimal.into())),
                ("day".to_owned(), Avro::Date(day)),
            ])
        };
        assert_eq!(
            write(record(Vec::new(), 0)).unwrap(),
            r#"{"d":"0","day":"1970-01-01"}"#
        );
        assert_eq!(
            write(record(vec![0x01], -1)).unwrap(),
            r#"{"d":"0.00000001","day":"1969-12-31"}"#
        );
        for day in [i32::MAX, i32::MAX - 719_162, i32::MIN] {
            let err = write(record(Vec::new(), day)).unwrap_err();
            assert!(err.0.contains("date"), "{day}: {err}");
        }
        // Read from bytes as a consumer reads them: a zero-length decimal is 0.
        let mut datum: &[u8] = &[0x00, 0x00];
        let value = apache_avro::from_avro_datum(&schema, &mut datum, None).unwrap();
        assert_eq!(write(value).unwrap(), r#"{"d":"0","day":"1970-01-01"}"#);
    }

    /// A registry that fails is asked once per id, not once per record.
    #[tokio::test]
    async fn a_failed_registry_fetch_is_not_repeated_per_record() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = socket
                    .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            }
        });
        let config = crate::config::SchemaRegistryConfig {
            url,
            request_timeout_secs: 5,
            ..Default::default()
        };
        let registry = SchemaRegistry::build(&config).unwrap();
        let schemas = Schemas::load("com.ibstream").unwrap();
        let mut decoder = Decoder::new(&schemas, Some(registry));
        let (id7, id8) = ([0u8, 0, 0, 0, 7, 2], [0u8, 0, 0, 0, 8, 2]);
        let first = decoder.decode(&id7).await.unwrap_err();
        for _ in 0..20 {
            assert_eq!(decoder.decode(&id7).await.unwrap_err(), first);
        }
        assert!(decoder.decode(&id8).await.is_err());
        assert_eq!(requests.load(Ordering::SeqCst), 2, "one request per id");
    }

    #[test]
    fn an_encoded_event_decodes_to_json_with_exact_decimals() {
        use crate::events::{Encoder, EventMeta, Framing, Op};
        let schemas = Schemas::load("com.ibstream").unwrap();
        let mut encoder = Encoder::new(&schemas, Framing::SingleObject).unwrap();
        let transaction = crate::crm::Transaction {
            id: Some(1),
            amount: Some("1234.56789012".parse().unwrap()),
            ..Default::default()
        };
        let now = chrono::Utc::now();
        let meta = EventMeta {
            event_id: "e-1".into(),
            op: Op::Created,
            emitted_at: now,
            source: "sim.example.com".into(),
            endpoint: "/transactions".into(),
            window: None,
            fetched_at: now,
            connector_version: "0.1.0".into(),
        };
        let bytes = encoder.encode(&transaction, &meta).unwrap();
        let decoded = Decoder::new(&schemas, None)
            .decode_known(&bytes)
            .unwrap()
            .unwrap();
        assert_eq!(decoded.schema, "com.ibstream.TransactionEvent");
        assert_eq!(decoded.value()["amount"], json!("1234.56789012"));
        assert_eq!(decoded.value()["meta"]["op"], json!("CREATED"));
        // Fields in schema order: meta first, extra last.
        assert!(decoded.record.get().starts_with("{\"meta\":{\"eventId\":"));
        assert!(decoded.record.get().ends_with("\"extra\":{}}"));
        // Garbage is an error naming the framing, never a panic.
        let err = Decoder::new(&schemas, None).decode_known(b"{\"x\":1}");
        assert!(err.unwrap_err().0.contains("framing"));
        let mut short = bytes.clone();
        short.truncate(14);
        assert!(Decoder::new(&schemas, None).decode_known(&short).is_err());
    }
}
