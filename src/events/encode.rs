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

/// A model that has an event schema.
pub trait AvroEvent {
    /// The event type (selects the schema).
    const EVENT: EventType;

    /// Appends the entity's fields, in schema order, between `meta` and `extra`.
    fn fields(
        &self,
        out: &mut Vec<(String, Value)>,
        decimals: &mut Decimals,
    ) -> Result<(), EncodeError>;

    /// Returns the unknown fields.
    fn extra(&self) -> &Extra;
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

    /// Encodes one event into framed bytes.
    pub fn encode<E: AvroEvent>(
        &mut self,
        entity: &E,
        meta: &EventMeta,
    ) -> Result<Vec<u8>, EncodeError> {
        let value = to_value_with(entity, meta, &mut self.decimals)?;
        let (schema, fingerprint) = &self.schemas[E::EVENT as usize];
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
        write_datum(&value, schema, &self.names, &mut out).map_err(EncodeError::Avro)?;
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
    let mut fields = Vec::with_capacity(32);
    fields.push(("meta".to_owned(), meta_value(meta)));
    entity.fields(&mut fields, decimals)?;
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
    /// Returns the Avro value of an optional decimal field under the policy.
    pub fn value(
        &mut self,
        field: &'static str,
        value: Option<Decimal>,
    ) -> Result<Value, EncodeError> {
        match value {
            None => Ok(none()),
            Some(d) => Ok(some(Value::Decimal(apache_avro::Decimal::from(
                decimal_bytes(field, self.fit(d))?.to_vec(),
            )))),
        }
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

fn person(p: &Person, out: &mut Vec<(String, Value)>) {
    let mut push = |name: &str, value: Value| out.push((name.to_owned(), value));
    push("firstName", string(&p.first_name));
    push("lastName", string(&p.last_name));
    push("email", string(&p.email));
    push("phone", string(&p.phone));
    push("country", string(&p.country));
    push("language", string(&p.language));
    push("status", string(&p.status));
    push("affiliateId", string(&p.affiliate_id));
    push("campaign", string(&p.campaign));
    push("registrationDate", timestamp(p.registration_date));
    push("lastModifiedDate", timestamp(p.last_modified_date));
    push(
        "utmDetails",
        p.utm_details.as_ref().map_or_else(none, |u| some(utm(u))),
    );
    push(
        "tags",
        p.tags.as_deref().map_or_else(none, |t| some(tags(t))),
    );
}

fn push(out: &mut Vec<(String, Value)>, name: &str, value: Value) {
    out.push((name.to_owned(), value));
}

impl AvroEvent for Lead {
    const EVENT: EventType = EventType::Lead;

    fn fields(
        &self,
        out: &mut Vec<(String, Value)>,
        _decimals: &mut Decimals,
    ) -> Result<(), EncodeError> {
        push(out, "id", long(self.id));
        person(&self.person, out);
        Ok(())
    }

    fn extra(&self) -> &Extra {
        &self.extra
    }
}

impl AvroEvent for Customer {
    const EVENT: EventType = EventType::Customer;

    fn fields(
        &self,
        out: &mut Vec<(String, Value)>,
        decimals: &mut Decimals,
    ) -> Result<(), EncodeError> {
        push(out, "customerId", long(self.customer_id));
        push(out, "id", long(self.id));
        push(out, "leadId", long(self.lead_id));
        person(&self.person, out);
        push(out, "conversionDate", timestamp(self.conversion_date));
        push(out, "userAdditionalId", string(&self.user_additional_id));
        push(
            out,
            "accounts",
            Value::Array(self.accounts.iter().map(account).collect()),
        );
        push(out, "ftdDate", timestamp(self.ftd_date));
        push(
            out,
            "balanceUsd",
            decimals.value("balanceUsd", self.balance_usd)?,
        );
        Ok(())
    }

    fn extra(&self) -> &Extra {
        &self.extra
    }
}

impl AvroEvent for Transaction {
    const EVENT: EventType = EventType::Transaction;

    fn fields(
        &self,
        out: &mut Vec<(String, Value)>,
        decimals: &mut Decimals,
    ) -> Result<(), EncodeError> {
        push(out, "id", long(self.id));
        push(out, "customerId", long(self.customer_id));
        push(out, "type", string(&self.transaction_type));
        push(out, "amount", decimals.value("amount", self.amount)?);
        push(out, "currency", string(&self.currency));
        push(
            out,
            "amountUsd",
            decimals.value("amountUsd", self.amount_usd)?,
        );
        push(out, "transactionDate", timestamp(self.transaction_date));
        push(out, "paymentMethod", string(&self.payment_method));
        push(out, "tradingAccount", string(&self.trading_account));
        push(out, "serverTag", string(&self.server_tag));
        push(out, "productId", string(&self.product_id));
        push(out, "isFake", boolean(self.is_fake));
        Ok(())
    }

    fn extra(&self) -> &Extra {
        &self.extra
    }
}

impl AvroEvent for Server {
    const EVENT: EventType = EventType::Server;

    fn fields(
        &self,
        out: &mut Vec<(String, Value)>,
        _decimals: &mut Decimals,
    ) -> Result<(), EncodeError> {
        push(out, "id", string(&self.id));
        push(out, "name", string(&self.name));
        push(out, "type", string(&self.server_type));
        push(out, "platform", string(&self.platform));
        Ok(())
    }

    fn extra(&self) -> &Extra {
        &self.extra
    }
}

impl AvroEvent for Position {
    const EVENT: EventType = EventType::Position;

    fn fields(
        &self,
        out: &mut Vec<(String, Value)>,
        decimals: &mut Decimals,
    ) -> Result<(), EncodeError> {
        push(out, "positionId", long(self.position_id));
        push(out, "login", string(&self.login));
        push(out, "serverTag", string(&self.server_tag));
        push(out, "customerId", long(self.customer_id));
        push(out, "symbol", string(&self.symbol));
        push(out, "side", string(&self.side));
        push(out, "volume", decimals.value("volume", self.volume)?);
        push(
            out,
            "openPrice",
            decimals.value("openPrice", self.open_price)?,
        );
        push(
            out,
            "closePrice",
            decimals.value("closePrice", self.close_price)?,
        );
        push(out, "openTime", timestamp(self.open_time));
        push(out, "closeTime", timestamp(self.close_time));
        push(out, "profit", decimals.value("profit", self.profit)?);
        push(
            out,
            "commission",
            decimals.value("commission", self.commission)?,
        );
        push(out, "swap", decimals.value("swap", self.swap)?);
        push(out, "currency", string(&self.currency));
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
        let meta = EventMeta {
            event_id: String::new(),
            op: Op::Created,
            emitted_at: Utc::now(),
            source: String::new(),
            endpoint: String::new(),
            window: None,
            fetched_at: Utc::now(),
            connector_version: String::new(),
        };
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
