//! Model → Avro value → framed bytes.
//!
//! Money and quantities become `decimal(38, 8)` bytes, always 16 bytes wide (the width
//! precision 38 needs): apache-avro's reader rejects narrower, minimal encodings of a
//! precision-38 decimal, and every other implementation reads the wide form. A value with
//! more than 30 integer digits is an [`EncodeError`]. One with more than 8 decimals follows
//! `events.decimal_excess` ([`DecimalExcess`]): by default binary floating-point noise (15 or
//! more significant digits, more than a double carries exactly: `-7.8500000000000005`) is
//! rounded half-even to 8 decimals and counted, and a precise value (`0.123456789`) is an
//! [`EncodeError`] (dead letter), never rounded silently.
//! Timestamps are `timestamp-millis` (UTC). Unknown CRM fields go into `extra` as JSON text.

use std::collections::HashMap;

use apache_avro::schema::SchemaKind;
use apache_avro::types::Value;
use apache_avro::Schema;
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::{Decimal, RoundingStrategy};

use super::schema::{EventType, Schemas};
use crate::config::DecimalExcess;
use crate::crm::models::{Extra, Person, TagCategory, TradingAccount, UtmDetails};
use crate::crm::time::{FIRST_MILLIS, LAST_MILLIS};
use crate::crm::{Customer, Lead, Position, Server, Transaction};

/// Scale of every decimal in the event schemas.
pub const DECIMAL_SCALE: u32 = 8;
/// Precision of every decimal in the event schemas.
pub const DECIMAL_PRECISION: u32 = 38;

/// Why a record could not be encoded; the record goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    /// A decimal does not fit `decimal(38, 8)`.
    #[error("field `{field}`: {value} does not fit decimal(38, 8): {reason}")]
    Decimal {
        /// The field.
        field: &'static str,
        /// The value as text.
        value: String,
        /// Too many decimals, or too many integer digits.
        reason: &'static str,
    },
    /// An instant outside what `timestamp-millis` readers represent (0001-01-01T00:00:00Z …
    /// 9999-12-31T23:59:59.999Z). Records read from the CRM never hold one (such a date is
    /// "no date", see `crm::time`); this guards models built otherwise.
    #[error("field `{field}`: {value} is outside 0001-01-01 … 9999-12-31 UTC")]
    Timestamp {
        /// The field.
        field: &'static str,
        /// The instant (RFC 3339).
        value: String,
    },
    /// apache-avro refused the value (a bug: the schema and the encoder disagree).
    #[error("avro encoding failed: {0}")]
    Avro(String),
}

/// What happened to the entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// First seen.
    Created,
    /// Changed since last seen.
    Updated,
}

impl Op {
    fn symbol(self) -> (u32, &'static str) {
        match self {
            Op::Created => (0, "CREATED"),
            Op::Updated => (1, "UPDATED"),
        }
    }
}

/// The `meta` record of an event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMeta {
    /// Deterministic id of the change.
    pub event_id: String,
    /// Created or updated.
    pub op: Op,
    /// When the event was emitted.
    pub emitted_at: DateTime<Utc>,
    /// The CRM domain.
    pub source: String,
    /// The endpoint path the record came from.
    pub endpoint: String,
    /// The query window (first and last day), if the endpoint is windowed.
    pub window: Option<(NaiveDate, NaiveDate)>,
    /// When the page was received.
    pub fetched_at: DateTime<Utc>,
    /// The ibstream version.
    pub connector_version: String,
}

impl EventMeta {
    /// A `meta` that says nothing: empty strings, no window, op `created`, both times now.
    ///
    /// For encoding an entity only to compare its fields with another encoding's
    /// (`ibstream verify`, the tests' expected events), where `meta` is left out of the
    /// comparison; never for an event that is written.
    pub fn blank() -> EventMeta {
        let now = Utc::now();
        EventMeta {
            event_id: String::new(),
            op: Op::Created,
            emitted_at: now,
            source: String::new(),
            endpoint: String::new(),
            window: None,
            fetched_at: now,
            connector_version: String::new(),
        }
    }
}

/// A model that has an event schema.
pub trait AvroEvent {
    /// The event type (selects the schema).
    const EVENT: EventType;

    /// Writes the entity's fields, in schema order, between `meta` and `extra`.
    fn fields<O: FieldOut>(&self, out: &mut O, decimals: &mut Decimals) -> Result<(), EncodeError>;

    /// Returns the unknown fields.
    fn extra(&self) -> &Extra;
}

/// Where an event's fields go, in schema order: an Avro [`Value`] ([`to_value`], checked
/// against the schema as it is written) or straight into the Avro binary encoding (what
/// [`Encoder::encode`] sends; tests check it decodes to the same values).
pub trait FieldOut {
    /// An optional string.
    fn string(&mut self, name: &'static str, value: Option<&str>);
    /// An optional long.
    fn long(&mut self, name: &'static str, value: Option<i64>);
    /// An optional boolean.
    fn boolean(&mut self, name: &'static str, value: Option<bool>);
    /// An optional `timestamp-millis`.
    fn timestamp(&mut self, name: &'static str, value: Option<DateTime<Utc>>);
    /// An optional `decimal(38, 8)`, as its 16 bytes.
    fn decimal(&mut self, name: &'static str, value: Option<[u8; 16]>);
    /// The optional UTM record.
    fn utm(&mut self, name: &'static str, value: Option<&UtmDetails>);
    /// The optional array of tag categories.
    fn tags(&mut self, name: &'static str, value: Option<&[TagCategory]>);
    /// The array of trading accounts.
    fn accounts(&mut self, name: &'static str, value: &[TradingAccount]);
}

/// Builds the fields of an Avro record value.
struct ValueOut(Vec<(String, Value)>);

impl FieldOut for ValueOut {
    fn string(&mut self, name: &'static str, value: Option<&str>) {
        let value = value.map_or_else(none, |s| some(Value::String(s.to_owned())));
        self.0.push((name.to_owned(), value));
    }
    fn long(&mut self, name: &'static str, value: Option<i64>) {
        self.0.push((name.to_owned(), long(value)));
    }
    fn boolean(&mut self, name: &'static str, value: Option<bool>) {
        self.0.push((name.to_owned(), boolean(value)));
    }
    fn timestamp(&mut self, name: &'static str, value: Option<DateTime<Utc>>) {
        self.0.push((name.to_owned(), timestamp(value)));
    }
    fn decimal(&mut self, name: &'static str, value: Option<[u8; 16]>) {
        let value = value.map_or_else(none, |bytes| {
            some(Value::Decimal(apache_avro::Decimal::from(bytes.to_vec())))
        });
        self.0.push((name.to_owned(), value));
    }
    fn utm(&mut self, name: &'static str, value: Option<&UtmDetails>) {
        self.0
            .push((name.to_owned(), value.map_or_else(none, |u| some(utm(u)))));
    }
    fn tags(&mut self, name: &'static str, value: Option<&[TagCategory]>) {
        self.0
            .push((name.to_owned(), value.map_or_else(none, |t| some(tags(t)))));
    }
    fn accounts(&mut self, name: &'static str, value: &[TradingAccount]) {
        self.0.push((
            name.to_owned(),
            Value::Array(value.iter().map(account).collect()),
        ));
    }
}

/// Writes fields straight into the Avro binary encoding. Every optional field is a union
/// `["null", T]`: branch 0 for null, branch 1 and the value otherwise.
struct BinaryOut<'a>(&'a mut Vec<u8>);

impl BinaryOut<'_> {
    fn optional_string(&mut self, value: Option<&str>) {
        match value {
            None => self.0.push(0),
            Some(s) => {
                self.0.push(2);
                write_bytes(s.as_bytes(), self.0);
            }
        }
    }
}

impl FieldOut for BinaryOut<'_> {
    fn string(&mut self, _: &'static str, value: Option<&str>) {
        self.optional_string(value);
    }
    fn long(&mut self, _: &'static str, value: Option<i64>) {
        match value {
            None => self.0.push(0),
            Some(v) => {
                self.0.push(2);
                write_long(v, self.0);
            }
        }
    }
    fn boolean(&mut self, _: &'static str, value: Option<bool>) {
        match value {
            None => self.0.push(0),
            Some(b) => self.0.extend_from_slice(&[2, u8::from(b)]),
        }
    }
    fn timestamp(&mut self, name: &'static str, value: Option<DateTime<Utc>>) {
        self.long(name, value.map(|t| t.timestamp_millis()));
    }
    fn decimal(&mut self, _: &'static str, value: Option<[u8; 16]>) {
        match value {
            None => self.0.push(0),
            Some(bytes) => {
                self.0.push(2);
                write_bytes(&bytes, self.0);
            }
        }
    }
    fn utm(&mut self, _: &'static str, value: Option<&UtmDetails>) {
        match value {
            None => self.0.push(0),
            Some(u) => {
                self.0.push(2);
                for field in [
                    &u.utm_source,
                    &u.utm_medium,
                    &u.utm_campaign,
                    &u.utm_content,
                    &u.utm_term,
                ] {
                    self.optional_string(field.as_deref());
                }
            }
        }
    }
    fn tags(&mut self, _: &'static str, value: Option<&[TagCategory]>) {
        let Some(categories) = value else {
            self.0.push(0);
            return;
        };
        self.0.push(2);
        if !categories.is_empty() {
            write_long(categories.len() as i64, self.0);
            for category in categories {
                self.optional_string(category.category.as_deref());
                if !category.tags.is_empty() {
                    write_long(category.tags.len() as i64, self.0);
                    for tag in &category.tags {
                        write_bytes(tag.as_bytes(), self.0);
                    }
                }
                self.0.push(0);
            }
        }
        self.0.push(0);
    }
    fn accounts(&mut self, _: &'static str, value: &[TradingAccount]) {
        if !value.is_empty() {
            write_long(value.len() as i64, self.0);
            for a in value {
                write_bytes(a.login.as_bytes(), self.0);
                write_bytes(a.server.as_bytes(), self.0);
                self.optional_string(a.account_type.as_deref());
            }
        }
        self.0.push(0);
    }
}

/// Writes an event's datum (meta, fields, extra) in the Avro binary encoding.
fn write_event<E: AvroEvent>(
    entity: &E,
    meta: &EventMeta,
    decimals: &mut Decimals,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    write_bytes(meta.event_id.as_bytes(), out);
    write_long(i64::from(meta.op.symbol().0), out);
    write_long(meta.emitted_at.timestamp_millis(), out);
    write_bytes(meta.source.as_bytes(), out);
    write_bytes(meta.endpoint.as_bytes(), out);
    let days = |d: NaiveDate| d.signed_duration_since(NaiveDate::default()).num_days();
    let mut binary = BinaryOut(out);
    binary.long("windowFrom", meta.window.map(|(from, _)| days(from)));
    binary.long("windowTo", meta.window.map(|(_, to)| days(to)));
    write_long(meta.fetched_at.timestamp_millis(), binary.0);
    write_bytes(meta.connector_version.as_bytes(), binary.0);
    entity.fields(&mut binary, decimals)?;
    let extra = entity.extra();
    if !extra.is_empty() {
        write_long(extra.len() as i64, out);
        for (key, value) in extra {
            write_bytes(key.as_bytes(), out);
            write_bytes(value.to_string().as_bytes(), out);
        }
    }
    out.push(0);
    Ok(())
}

/// How events are framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// Avro single-object encoding: `C3 01`, 8-byte CRC-64-AVRO fingerprint, datum.
    SingleObject,
    /// Confluent: `0x00`, 4-byte big-endian schema id, datum; one id per event type, in
    /// [`EventType::ALL`] order.
    Confluent {
        /// Registry ids of the event schemas.
        ids: [u32; 5],
    },
}

/// Encodes events with the schemas parsed once at start-up.
pub struct Encoder {
    schemas: Vec<(Schema, [u8; 8])>,
    names: HashMap<String, Schema>,
    framing: Framing,
    decimals: Decimals,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// Builds an encoder for `schemas`.
    pub fn new(schemas: &Schemas, framing: Framing) -> Result<Encoder, EncodeError> {
        let mut names = HashMap::new();
        for s in schemas.all() {
            collect_names(&s.schema, &mut names);
        }
        Ok(Encoder {
            schemas: schemas
                .all()
                .iter()
                .map(|s| (s.schema.clone(), s.fingerprint))
                .collect(),
            names,
            framing,
            decimals: Decimals::default(),
        })
    }

    /// Sets what values with more than 8 decimals become (`events.decimal_excess`).
    pub fn with_decimal_excess(mut self, policy: DecimalExcess) -> Self {
        self.decimals.policy = policy;
        self
    }

    /// Returns how many values this encoder rounded to 8 decimals so far.
    pub fn rounded(&self) -> u64 {
        self.decimals.rounded
    }

    /// Returns the framing in use.
    pub fn framing(&self) -> &Framing {
        &self.framing
    }

    /// Encodes an event's datum (no framing) the slow way: an Avro value walked against its
    /// schema, which fails loudly if the two disagree. Tests compare it with [`Encoder::encode`].
    pub fn encode_checked<E: AvroEvent>(
        &mut self,
        entity: &E,
        meta: &EventMeta,
    ) -> Result<Vec<u8>, EncodeError> {
        let value = to_value_with(entity, meta, &mut self.decimals)?;
        let (schema, _) = &self.schemas[E::EVENT as usize];
        let mut out = Vec::with_capacity(512);
        write_datum(&value, schema, &self.names, &mut out).map_err(EncodeError::Avro)?;
        Ok(out)
    }

    /// Encodes one event into framed bytes.
    pub fn encode<E: AvroEvent>(
        &mut self,
        entity: &E,
        meta: &EventMeta,
    ) -> Result<Vec<u8>, EncodeError> {
        let (_, fingerprint) = &self.schemas[E::EVENT as usize];
        let mut out = Vec::with_capacity(512);
        match &self.framing {
            Framing::SingleObject => {
                out.extend_from_slice(&[0xC3, 0x01]);
                out.extend_from_slice(fingerprint);
            }
            Framing::Confluent { ids } => {
                out.push(0);
                out.extend_from_slice(&ids[E::EVENT as usize].to_be_bytes());
            }
        }
        write_event(entity, meta, &mut self.decimals, &mut out)?;
        Ok(out)
    }
}

fn collect_names(schema: &Schema, names: &mut HashMap<String, Schema>) {
    match schema {
        Schema::Record(record) => {
            names.insert(record.name.fullname(None), schema.clone());
            for field in &record.fields {
                collect_names(&field.schema, names);
            }
        }
        Schema::Enum(e) => {
            names.insert(e.name.fullname(None), schema.clone());
        }
        Schema::Fixed(f) => {
            names.insert(f.name.fullname(None), schema.clone());
        }
        Schema::Array(a) => collect_names(&a.items, names),
        Schema::Map(m) => collect_names(&m.types, names),
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_names(v, names)),
        _ => {}
    }
}

/// Writes the Avro binary encoding of `value` (a datum, no header) against `schema`.
///
/// apache-avro's own writer builds a hash map of field names per record and validates by
/// hashing every field name (half the encoding time, measured); this walks value and schema
/// side by side instead, checking that record fields come in schema order under the schema's
/// names, so an encoder that disagrees with its schema still fails loudly. What it writes is
/// checked by decoding with apache-avro and with fastavro (tests/events.rs).
pub fn write_datum(
    value: &Value,
    schema: &Schema,
    names: &HashMap<String, Schema>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    match (value, schema) {
        (_, Schema::Ref { name }) => {
            let resolved = names
                .get(&name.fullname(None))
                .ok_or_else(|| format!("unknown type {name:?}"))?;
            write_datum(value, resolved, names, out)
        }
        (Value::Null, Schema::Null) => Ok(()),
        (Value::Boolean(b), Schema::Boolean) => {
            out.push(u8::from(*b));
            Ok(())
        }
        (Value::Int(i), Schema::Int) | (Value::Date(i), Schema::Date) => {
            write_long(i64::from(*i), out);
            Ok(())
        }
        (Value::Long(i), Schema::Long) | (Value::TimestampMillis(i), Schema::TimestampMillis) => {
            write_long(*i, out);
            Ok(())
        }
        (Value::String(s), Schema::String) => {
            write_bytes(s.as_bytes(), out);
            Ok(())
        }
        (Value::Bytes(b), Schema::Bytes) => {
            write_bytes(b, out);
            Ok(())
        }
        (Value::Decimal(d), Schema::Decimal(_)) => {
            let bytes = Vec::<u8>::try_from(d).map_err(|e| e.to_string())?;
            write_bytes(&bytes, out);
            Ok(())
        }
        (Value::Enum(index, symbol), Schema::Enum(e)) => match e.symbols.get(*index as usize) {
            Some(s) if s == symbol => {
                write_long(i64::from(*index), out);
                Ok(())
            }
            _ => Err(format!(
                "enum {}: {symbol} is not symbol {index}",
                e.name.name
            )),
        },
        (Value::Union(index, inner), Schema::Union(union)) => {
            let variant = union
                .variants()
                .get(*index as usize)
                .ok_or_else(|| format!("union has no branch {index}"))?;
            write_long(i64::from(*index), out);
            write_datum(inner, variant, names, out)
        }
        (Value::Array(items), Schema::Array(array)) => {
            if !items.is_empty() {
                write_long(items.len() as i64, out);
                for item in items {
                    write_datum(item, &array.items, names, out)?;
                }
            }
            out.push(0);
            Ok(())
        }
        (Value::Map(entries), Schema::Map(map)) => {
            if !entries.is_empty() {
                write_long(entries.len() as i64, out);
                for (key, item) in entries {
                    write_bytes(key.as_bytes(), out);
                    write_datum(item, &map.types, names, out)?;
                }
            }
            out.push(0);
            Ok(())
        }
        (Value::Record(fields), Schema::Record(record)) => {
            if fields.len() != record.fields.len() {
                return Err(format!(
                    "record {} has {} fields, the value {}",
                    record.name.name,
                    record.fields.len(),
                    fields.len()
                ));
            }
            for ((name, item), field) in fields.iter().zip(&record.fields) {
                if *name != field.name {
                    return Err(format!(
                        "record {}: field {name} where the schema has {}",
                        record.name.name, field.name
                    ));
                }
                write_datum(item, &field.schema, names, out)
                    .map_err(|e| format!("{}.{name}: {e}", record.name.name))?;
            }
            Ok(())
        }
        (value, schema) => Err(format!(
            "value {value:?} does not match schema {:?}",
            SchemaKind::from(schema)
        )),
    }
}

fn write_long(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn write_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    write_long(bytes.len() as i64, out);
    out.extend_from_slice(bytes);
}

/// Builds the Avro value of an event: `meta`, the entity's fields, `extra` (decimals under
/// the default policy).
pub fn to_value<E: AvroEvent>(entity: &E, meta: &EventMeta) -> Result<Value, EncodeError> {
    to_value_with(entity, meta, &mut Decimals::default())
}

/// Builds the Avro value of an event with `decimals`' policy, counting what it rounds.
pub fn to_value_with<E: AvroEvent>(
    entity: &E,
    meta: &EventMeta,
    decimals: &mut Decimals,
) -> Result<Value, EncodeError> {
    let mut fields = ValueOut(Vec::with_capacity(32));
    fields.0.push(("meta".to_owned(), meta_value(meta)));
    entity.fields(&mut fields, decimals)?;
    let mut fields = fields.0;
    let extra = entity
        .extra()
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.to_string())))
        .collect();
    fields.push(("extra".to_owned(), Value::Map(extra)));
    Ok(Value::Record(fields))
}

fn meta_value(meta: &EventMeta) -> Value {
    let (index, symbol) = meta.op.symbol();
    let date = |d: NaiveDate| {
        let days = d.signed_duration_since(NaiveDate::default()).num_days();
        some(Value::Date(days as i32))
    };
    Value::Record(vec![
        ("eventId".to_owned(), Value::String(meta.event_id.clone())),
        ("op".to_owned(), Value::Enum(index, symbol.to_owned())),
        (
            "emittedAt".to_owned(),
            Value::TimestampMillis(meta.emitted_at.timestamp_millis()),
        ),
        ("source".to_owned(), Value::String(meta.source.clone())),
        ("endpoint".to_owned(), Value::String(meta.endpoint.clone())),
        (
            "windowFrom".to_owned(),
            meta.window.map_or_else(none, |(from, _)| date(from)),
        ),
        (
            "windowTo".to_owned(),
            meta.window.map_or_else(none, |(_, to)| date(to)),
        ),
        (
            "fetchedAt".to_owned(),
            Value::TimestampMillis(meta.fetched_at.timestamp_millis()),
        ),
        (
            "connectorVersion".to_owned(),
            Value::String(meta.connector_version.clone()),
        ),
    ])
}

fn none() -> Value {
    Value::Union(0, Box::new(Value::Null))
}

fn some(value: Value) -> Value {
    Value::Union(1, Box::new(value))
}

fn string(value: &Option<String>) -> Value {
    value
        .as_ref()
        .map_or_else(none, |s| some(Value::String(s.clone())))
}

fn long(value: Option<i64>) -> Value {
    value.map_or_else(none, |v| some(Value::Long(v)))
}

fn boolean(value: Option<bool>) -> Value {
    value.map_or_else(none, |v| some(Value::Boolean(v)))
}

/// Returns an optional instant for a `timestamp-millis` field, or an error if readers could
/// not represent it.
fn instant(
    field: &'static str,
    value: Option<DateTime<Utc>>,
) -> Result<Option<DateTime<Utc>>, EncodeError> {
    match value {
        Some(t) if !(FIRST_MILLIS..=LAST_MILLIS).contains(&t.timestamp_millis()) => {
            Err(EncodeError::Timestamp {
                field,
                value: t.to_rfc3339(),
            })
        }
        other => Ok(other),
    }
}

fn timestamp(value: Option<DateTime<Utc>>) -> Value {
    value.map_or_else(none, |t| some(Value::TimestampMillis(t.timestamp_millis())))
}

/// Significant digits from which a number is taken for binary floating-point output: a double
/// carries 15 to 17, so digits past the 15th are the conversion's noise, not the CRM's data.
const FLOAT_NOISE_DIGITS: u32 = 15;

/// The decimal policy of an encoding and what it rounded.
#[derive(Debug, Clone, Default)]
pub struct Decimals {
    /// What a value with more than 8 decimals becomes.
    pub policy: DecimalExcess,
    /// Values rounded to 8 decimals so far.
    pub rounded: u64,
}

impl Decimals {
    /// Returns the 16 bytes of an optional decimal field under the policy.
    pub fn bytes(
        &mut self,
        field: &'static str,
        value: Option<Decimal>,
    ) -> Result<Option<[u8; 16]>, EncodeError> {
        value.map(|d| decimal_bytes(field, self.fit(d))).transpose()
    }

    /// Rounds `d` to 8 decimals where the policy says so.
    fn fit(&mut self, d: Decimal) -> Decimal {
        let normalized = d.normalize();
        if normalized.scale() <= DECIMAL_SCALE {
            return d;
        }
        let round = match self.policy {
            DecimalExcess::Reject => false,
            DecimalExcess::Round => true,
            DecimalExcess::RoundFloatNoise => {
                significant_digits(normalized.mantissa()) >= FLOAT_NOISE_DIGITS
            }
        };
        if !round {
            return d;
        }
        self.rounded += 1;
        d.round_dp_with_strategy(DECIMAL_SCALE, RoundingStrategy::MidpointNearestEven)
    }
}

fn significant_digits(mantissa: i128) -> u32 {
    mantissa
        .unsigned_abs()
        .checked_ilog10()
        .map_or(0, |d| d + 1)
}

/// Returns the 16-byte big-endian two's-complement unscaled value of `d` at scale 8.
pub fn decimal_bytes(field: &'static str, d: Decimal) -> Result<[u8; 16], EncodeError> {
    let normalized = d.normalize();
    if normalized.scale() > DECIMAL_SCALE {
        return Err(EncodeError::Decimal {
            field,
            value: d.to_string(),
            reason: "more than 8 decimals",
        });
    }
    let unscaled = normalized.mantissa() * 10_i128.pow(DECIMAL_SCALE - normalized.scale());
    if unscaled.unsigned_abs() >= 10_u128.pow(DECIMAL_PRECISION) {
        return Err(EncodeError::Decimal {
            field,
            value: d.to_string(),
            reason: "more than 30 integer digits",
        });
    }
    Ok(unscaled.to_be_bytes())
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn utm(u: &UtmDetails) -> Value {
    record(vec![
        ("utmSource", string(&u.utm_source)),
        ("utmMedium", string(&u.utm_medium)),
        ("utmCampaign", string(&u.utm_campaign)),
        ("utmContent", string(&u.utm_content)),
        ("utmTerm", string(&u.utm_term)),
    ])
}

fn tags(categories: &[TagCategory]) -> Value {
    Value::Array(
        categories
            .iter()
            .map(|c| {
                record(vec![
                    ("category", string(&c.category)),
                    (
                        "tags",
                        Value::Array(c.tags.iter().map(|t| Value::String(t.clone())).collect()),
                    ),
                ])
            })
            .collect(),
    )
}

fn account(a: &TradingAccount) -> Value {
    record(vec![
        ("login", Value::String(a.login.clone())),
        ("server", Value::String(a.server.clone())),
        ("type", string(&a.account_type)),
    ])
}

fn person<O: FieldOut>(p: &Person, out: &mut O) -> Result<(), EncodeError> {
    out.string("firstName", p.first_name.as_deref());
    out.string("lastName", p.last_name.as_deref());
    out.string("email", p.email.as_deref());
    out.string("phone", p.phone.as_deref());
    out.string("country", p.country.as_deref());
    out.string("language", p.language.as_deref());
    out.string("status", p.status.as_deref());
    out.string("affiliateId", p.affiliate_id.as_deref());
    out.string("campaign", p.campaign.as_deref());
    out.timestamp(
        "registrationDate",
        instant("registrationDate", p.registration_date)?,
    );
    out.timestamp(
        "lastModifiedDate",
        instant("lastModifiedDate", p.last_modified_date)?,
    );
    out.utm("utmDetails", p.utm_details.as_ref());
    out.tags("tags", p.tags.as_deref());
    Ok(())
}

impl AvroEvent for Lead {
    const EVENT: EventType = EventType::Lead;

    fn fields<O: FieldOut>(
        &self,
        out: &mut O,
        _decimals: &mut Decimals,
    ) -> Result<(), EncodeError> {
        out.long("id", self.id);
        person(&self.person, out)
    }

    fn extra(&self) -> &Extra {
        &self.extra
    }
}

impl AvroEvent for Customer {
    const EVENT: EventType = EventType::Customer;

    fn fields<O: FieldOut>(&self, out: &mut O, decimals: &mut Decimals) -> Result<(), EncodeError> {
        out.long("customerId", self.customer_id);
        out.long("id", self.id);
        out.long("leadId", self.lead_id);
        person(&self.person, out)?;
        out.timestamp(
            "conversionDate",
            instant("conversionDate", self.conversion_date)?,
        );
        out.string("userAdditionalId", self.user_additional_id.as_deref());
        out.accounts("accounts", &self.accounts);
        out.timestamp("ftdDate", instant("ftdDate", self.ftd_date)?);
        out.decimal(
            "balanceUsd",
            decimals.bytes("balanceUsd", self.balance_usd)?,
        );
        Ok(())
    }

    fn extra(&self) -> &Extra {
        &self.extra
    }
}

impl AvroEvent for Transaction {
    const EVENT: EventType = EventType::Transaction;

    fn fields<O: FieldOut>(&self, out: &mut O, decimals: &mut Decimals) -> Result<(), EncodeError> {
        out.long("id", self.id);
        out.long("customerId", self.customer_id);
        out.string("type", self.transaction_type.as_deref());
        out.decimal("amount", decimals.bytes("amount", self.amount)?);
        out.string("currency", self.currency.as_deref());
        out.decimal("amountUsd", decimals.bytes("amountUsd", self.amount_usd)?);
        out.timestamp(
            "transactionDate",
            instant("transactionDate", self.transaction_date)?,
        );
        out.string("paymentMethod", self.payment_method.as_deref());
        out.string("tradingAccount", self.trading_account.as_deref());
        out.string("serverTag", self.server_tag.as_deref());
        out.string("productId", self.product_id.as_deref());
        out.boolean("isFake", self.is_fake);
        Ok(())
    }

    fn extra(&self) -> &Extra {
        &self.extra
    }
}

impl AvroEvent for Server {
    const EVENT: EventType = EventType::Server;

    fn fields<O: FieldOut>(
        &self,
        out: &mut O,
        _decimals: &mut Decimals,
    ) -> Result<(), EncodeError> {
        out.string("id", self.id.as_deref());
        out.string("name", self.name.as_deref());
        out.string("type", self.server_type.as_deref());
        out.string("platform", self.platform.as_deref());
        Ok(())
    }

    fn extra(&self) -> &Extra {
        &self.extra
    }
}

impl AvroEvent for Position {
    const EVENT: EventType = EventType::Position;

    fn fields<O: FieldOut>(&self, out: &mut O, decimals: &mut Decimals) -> Result<(), EncodeError> {
        out.long("positionId", self.position_id);
        out.string("login", self.login.as_deref());
        out.string("serverTag", self.server_tag.as_deref());
        out.long("customerId", self.customer_id);
        out.string("symbol", self.symbol.as_deref());
        out.string("side", self.side.as_deref());
        out.decimal("volume", decimals.bytes("volume", self.volume)?);
        out.decimal("openPrice", decimals.bytes("openPrice", self.open_price)?);
        out.decimal(
            "closePrice",
            decimals.bytes("closePrice", self.close_price)?,
        );
        out.timestamp("openTime", instant("openTime", self.open_time)?);
        out.timestamp("closeTime", instant("closeTime", self.close_time)?);
        out.decimal("profit", decimals.bytes("profit", self.profit)?);
        out.decimal("commission", decimals.bytes("commission", self.commission)?);
        out.decimal("swap", decimals.bytes("swap", self.swap)?);
        out.string("currency", self.currency.as_deref());
        Ok(())
    }

    fn extra(&self) -> &Extra {
        &self.extra
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn bytes_of(text: &str) -> Result<[u8; 16], EncodeError> {
        decimal_bytes("amount", Decimal::from_str(text).unwrap())
    }

    fn unscaled(bytes: [u8; 16]) -> i128 {
        i128::from_be_bytes(bytes)
    }

    #[test]
    fn decimals_encode_exactly_at_scale_8() {
        assert_eq!(unscaled(bytes_of("0").unwrap()), 0);
        assert_eq!(unscaled(bytes_of("-0.00000001").unwrap()), -1);
        assert_eq!(bytes_of("-0.00000001").unwrap(), [0xff; 16]);
        assert_eq!(unscaled(bytes_of("250.00").unwrap()), 25_000_000_000);
        assert_eq!(
            unscaled(bytes_of("12345678901234567890.12345678").unwrap()),
            1_234_567_890_123_456_789_012_345_678
        );
        // Trailing zeros beyond 8 decimals are not precision.
        assert_eq!(unscaled(bytes_of("1.500000000000").unwrap()), 150_000_000);
    }

    #[test]
    fn writer_refuses_values_that_disagree_with_the_schema() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "R", "fields": [{"name": "a", "type": "long"}, {"name": "b", "type": ["null", "string"]}]}"#,
        )
        .unwrap();
        let names = HashMap::new();
        let mut out = Vec::new();
        let good = Value::Record(vec![
            ("a".into(), Value::Long(-3)),
            (
                "b".into(),
                Value::Union(1, Box::new(Value::String("hé".into()))),
            ),
        ]);
        write_datum(&good, &schema, &names, &mut out).unwrap();
        // zigzag(-3) = 5, branch 1 = 2, length 3 = 6, then UTF-8 bytes.
        assert_eq!(out, vec![5, 2, 6, b'h', 0xC3, 0xA9]);
        assert_eq!(
            apache_avro::from_avro_datum(&schema, &mut &out[..], None).unwrap(),
            good
        );
        let swapped = Value::Record(vec![
            ("b".into(), Value::Union(0, Box::new(Value::Null))),
            ("a".into(), Value::Long(1)),
        ]);
        assert!(write_datum(&swapped, &schema, &names, &mut Vec::new())
            .unwrap_err()
            .contains("field b"));
        let wrong_type = Value::Record(vec![
            ("a".into(), Value::String("1".into())),
            ("b".into(), Value::Union(0, Box::new(Value::Null))),
        ]);
        assert!(write_datum(&wrong_type, &schema, &names, &mut Vec::new()).is_err());
        let bad_branch = Value::Record(vec![
            ("a".into(), Value::Long(1)),
            ("b".into(), Value::Union(2, Box::new(Value::Null))),
        ]);
        assert!(write_datum(&bad_branch, &schema, &names, &mut Vec::new()).is_err());
        // Large longs use every varint byte.
        let mut out = Vec::new();
        write_long(i64::MIN, &mut out);
        assert_eq!(
            out,
            vec![0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]
        );
    }

    #[test]
    fn float_noise_is_rounded_and_precise_excess_rejected_on_every_money_field() {
        use crate::crm::models::parse_decimal;
        let d = |text: &str| Some(parse_decimal(text).unwrap());
        let noisy = |text: &str| {
            let t = Transaction {
                amount: d(text),
                amount_usd: d(text),
                ..Transaction::default()
            };
            let p = Position {
                volume: d(text),
                open_price: d(text),
                close_price: d(text),
                profit: d(text),
                commission: d(text),
                swap: d(text),
                ..Position::default()
            };
            (t, p)
        };
        let meta = EventMeta::blank();
        let field_bytes = |value: &Value, name: &str| -> Vec<u8> {
            let Value::Record(fields) = value else {
                unreachable!()
            };
            match &fields.iter().find(|(n, _)| n == name).unwrap().1 {
                Value::Union(1, inner) => match inner.as_ref() {
                    Value::Decimal(d) => Vec::<u8>::try_from(d).unwrap(),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            }
        };
        // Binary float noise (17 significant digits): rounded half-even to 8 decimals and
        // counted, on every amount, volume, price, profit, commission and swap.
        for (text, want) in [
            ("-7.8500000000000005", "-7.85"),
            ("0.35000000000000003", "0.35"),
            ("1.1000000000000001", "1.1"),
            ("123.45678901234567", "123.45678901"),
            ("0.000000025000000000000001", "0.00000003"),
        ] {
            let (t, p) = noisy(text);
            let want = decimal_bytes("x", Decimal::from_str(want).unwrap())
                .unwrap()
                .to_vec();
            let mut decimals = Decimals::default();
            let tv = to_value_with(&t, &meta, &mut decimals).unwrap();
            let pv = to_value_with(&p, &meta, &mut decimals).unwrap();
            assert_eq!(decimals.rounded, 8, "{text}");
            for name in ["amount", "amountUsd"] {
                assert_eq!(field_bytes(&tv, name), want, "{text} {name}");
            }
            for name in [
                "volume",
                "openPrice",
                "closePrice",
                "profit",
                "commission",
                "swap",
            ] {
                assert_eq!(field_bytes(&pv, name), want, "{text} {name}");
            }
        }
        // Half-even: a 16-digit value exactly halfway rounds to the even neighbour.
        let (t, _) = noisy("1234567.123456785");
        let mut decimals = Decimals::default();
        let tv = to_value_with(&t, &meta, &mut decimals).unwrap();
        assert_eq!(
            field_bytes(&tv, "amount"),
            decimal_bytes("x", Decimal::from_str("1234567.12345678").unwrap())
                .unwrap()
                .to_vec()
        );
        // Trailing zeros are no precision: 9 significant digits, a precise value, rejected.
        let (t, _) = noisy("0.12345678500000000");
        assert!(to_value(&t, &meta).is_err());
        // A precise value with more than 8 decimals (fewer than 15 significant digits) is
        // rejected, on every field, under the default policy.
        for text in ["0.123456789", "-7.850000001", "12345.123456789"] {
            let (t, p) = noisy(text);
            for err in [
                to_value(&t, &meta).unwrap_err(),
                to_value(&p, &meta).unwrap_err(),
            ] {
                assert!(
                    matches!(
                        err,
                        EncodeError::Decimal {
                            reason: "more than 8 decimals",
                            ..
                        }
                    ),
                    "{text}: {err}"
                );
            }
        }
        // "reject" rejects the noise too; "round" rounds the precise value too.
        let (t, _) = noisy("-7.8500000000000005");
        let mut reject = Decimals {
            policy: DecimalExcess::Reject,
            rounded: 0,
        };
        assert!(to_value_with(&t, &meta, &mut reject).is_err());
        assert_eq!(reject.rounded, 0);
        let (t, _) = noisy("0.123456789");
        let mut round = Decimals {
            policy: DecimalExcess::Round,
            rounded: 0,
        };
        let tv = to_value_with(&t, &meta, &mut round).unwrap();
        assert_eq!(round.rounded, 2);
        assert_eq!(
            field_bytes(&tv, "amount"),
            decimal_bytes("x", Decimal::from_str("0.12345679").unwrap())
                .unwrap()
                .to_vec()
        );
    }

    #[test]
    fn instants_readers_cannot_represent_never_reach_a_timestamp_field() {
        let meta = EventMeta::blank();
        let at = |millis: i64| DateTime::from_timestamp_millis(millis);
        for (millis, ok) in [
            (FIRST_MILLIS, true),
            (LAST_MILLIS, true),
            (FIRST_MILLIS - 1, false),
            (LAST_MILLIS + 1, false),
            (-70_000_000_000_000, false),
        ] {
            let t = Transaction {
                transaction_date: at(millis),
                ..Transaction::default()
            };
            let c = Customer {
                ftd_date: at(millis),
                ..Customer::default()
            };
            let mut lead = Lead::default();
            lead.person.last_modified_date = at(millis);
            for result in [
                to_value(&t, &meta),
                to_value(&c, &meta),
                to_value(&lead, &meta),
            ] {
                match result {
                    Ok(_) => assert!(ok, "{millis} encoded"),
                    Err(EncodeError::Timestamp { .. }) => assert!(!ok, "{millis} refused"),
                    Err(other) => panic!("{other}"),
                }
            }
        }
    }

    #[test]
    fn decimals_that_do_not_fit_are_errors() {
        let err = bytes_of("0.123456789").unwrap_err();
        assert!(
            matches!(
                err,
                EncodeError::Decimal {
                    reason: "more than 8 decimals",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("`amount`"));
        // rust_decimal itself cannot hold 31 integer digits: such text fails when the record
        // is read (a per-record error), before it could reach the encoder.
        assert!(crate::crm::models::parse_decimal("1234567890123456789012345678901").is_err());
    }
}
