//! The event schemas: `schemas/*.avsc`, embedded at build time, composed and parsed once.
//!
//! The files in `schemas/` are the one source of truth. Shared named types (`EventMeta`,
//! `TradingAccount`, `UtmDetails`, `TagCategory`) live in files of their own and the event
//! files refer to them by name; [`Schemas::load`] inlines each shared type at its first use, so
//! every event schema becomes self-contained (what a registry stores and what `schemas print`
//! shows), and sets the configured namespace on every named type.

use std::collections::{HashMap, HashSet};

use apache_avro::rabin::Rabin;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use digest::Digest;
use serde_json::Value;

/// The five event types, one per stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// `LeadEvent`.
    Lead,
    /// `CustomerEvent`.
    Customer,
    /// `TransactionEvent`.
    Transaction,
    /// `ServerEvent`.
    Server,
    /// `PositionEvent`.
    Position,
}

impl EventType {
    /// Every event type, in stream order.
    pub const ALL: [EventType; 5] = [
        EventType::Lead,
        EventType::Customer,
        EventType::Transaction,
        EventType::Server,
        EventType::Position,
    ];

    /// Returns the record name (`LeadEvent`, …).
    pub fn name(self) -> &'static str {
        match self {
            EventType::Lead => "LeadEvent",
            EventType::Customer => "CustomerEvent",
            EventType::Transaction => "TransactionEvent",
            EventType::Server => "ServerEvent",
            EventType::Position => "PositionEvent",
        }
    }

    /// Returns the stream whose events this is (`leads`, …).
    pub fn stream(self) -> &'static str {
        match self {
            EventType::Lead => "leads",
            EventType::Customer => "customers",
            EventType::Transaction => "transactions",
            EventType::Server => "servers",
            EventType::Position => "positions",
        }
    }

    /// Finds an event type by record name (`LeadEvent`) or stream (`leads`).
    pub fn parse(text: &str) -> Option<EventType> {
        EventType::ALL
            .into_iter()
            .find(|e| e.name().eq_ignore_ascii_case(text) || e.stream() == text)
    }

    fn index(self) -> usize {
        self as usize
    }

    fn source(self) -> &'static str {
        match self {
            EventType::Lead => include_str!("../../schemas/LeadEvent.avsc"),
            EventType::Customer => include_str!("../../schemas/CustomerEvent.avsc"),
            EventType::Transaction => include_str!("../../schemas/TransactionEvent.avsc"),
            EventType::Server => include_str!("../../schemas/ServerEvent.avsc"),
            EventType::Position => include_str!("../../schemas/PositionEvent.avsc"),
        }
    }

    /// Returns the released snapshot (`schemas/compat/<Name>.v1.avsc`) the current schema must
    /// stay BACKWARD compatible with.
    pub fn snapshot_v1(self) -> &'static str {
        match self {
            EventType::Lead => include_str!("../../schemas/compat/LeadEvent.v1.avsc"),
            EventType::Customer => include_str!("../../schemas/compat/CustomerEvent.v1.avsc"),
            EventType::Transaction => include_str!("../../schemas/compat/TransactionEvent.v1.avsc"),
            EventType::Server => include_str!("../../schemas/compat/ServerEvent.v1.avsc"),
            EventType::Position => include_str!("../../schemas/compat/PositionEvent.v1.avsc"),
        }
    }
}

/// The shared named types, by name.
const SHARED: [(&str, &str); 4] = [
    ("EventMeta", include_str!("../../schemas/EventMeta.avsc")),
    (
        "TradingAccount",
        include_str!("../../schemas/TradingAccount.avsc"),
    ),
    ("UtmDetails", include_str!("../../schemas/UtmDetails.avsc")),
    (
        "TagCategory",
        include_str!("../../schemas/TagCategory.avsc"),
    ),
];

/// Errors of loading or checking schemas.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A schema file is not valid JSON or not a valid Avro schema.
    #[error("schema {name} is invalid: {reason}")]
    Invalid {
        /// The schema's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The current schema cannot read data written with a released one.
    #[error("{name} is not BACKWARD compatible with {snapshot}: {reason}")]
    Incompatible {
        /// The schema's name.
        name: &'static str,
        /// The snapshot checked against.
        snapshot: &'static str,
        /// What breaks.
        reason: String,
    },
}

/// One event schema, ready to encode with.
#[derive(Debug, Clone)]
pub struct EventSchema {
    /// The event type.
    pub event: EventType,
    /// The self-contained schema JSON (what a registry stores).
    pub json: String,
    /// The parsed schema.
    pub schema: Schema,
    /// The Parsing Canonical Form (see [`parsing_canonical_form`]).
    pub canonical_form: String,
    /// CRC-64-AVRO fingerprint of the parsing canonical form, little-endian (single-object
    /// encoding header).
    pub fingerprint: [u8; 8],
}

/// Every event schema, parsed once at start-up.
#[derive(Debug, Clone)]
pub struct Schemas {
    events: Vec<EventSchema>,
}

impl Schemas {
    /// Composes and parses every event schema in `namespace`.
    pub fn load(namespace: &str) -> Result<Schemas, SchemaError> {
        let shared = shared_types()?;
        let events = EventType::ALL
            .into_iter()
            .map(|event| {
                let json = compose(event.name(), event.source(), &shared, namespace)?;
                let schema = Schema::parse_str(&json).map_err(|e| SchemaError::Invalid {
                    name: event.name().to_owned(),
                    reason: e.to_string(),
                })?;
                let canonical_form = serde_json::from_str(&json)
                    .map(|value| parsing_canonical_form(&value))
                    .map_err(|e| SchemaError::Invalid {
                        name: event.name().to_owned(),
                        reason: e.to_string(),
                    })?;
                let fingerprint = fingerprint(&canonical_form);
                Ok(EventSchema {
                    event,
                    json,
                    schema,
                    canonical_form,
                    fingerprint,
                })
            })
            .collect::<Result<_, SchemaError>>()?;
        Ok(Schemas { events })
    }

    /// Returns the schema of `event`.
    pub fn get(&self, event: EventType) -> &EventSchema {
        &self.events[event.index()]
    }

    /// Returns every event schema, in stream order.
    pub fn all(&self) -> &[EventSchema] {
        &self.events
    }

    /// Checks every current schema against its released snapshot (BACKWARD: the current
    /// schema reads data written with the snapshot). Returns one result per event type.
    pub fn check_compatibility(&self) -> Vec<Result<EventType, SchemaError>> {
        self.events
            .iter()
            .map(|current| {
                check_backward(
                    current.event.name(),
                    "v1",
                    current.event.snapshot_v1(),
                    &current.json,
                )
                .map(|()| current.event)
            })
            .collect()
    }
}

/// Checks that `reader_json` (the new schema) can read data written with `writer_json` (the
/// old one), with apache-avro's schema compatibility API.
///
/// apache-avro 0.21 answers "inconclusive" for any `decimal` (it has no rule for the logical
/// type), so decimals are checked here: a decimal field present in both must keep its
/// precision and scale; then both schemas, with decimals as their underlying `bytes`, go
/// through `SchemaCompatibility::can_read`.
pub fn check_backward(
    name: &'static str,
    snapshot: &'static str,
    writer_json: &str,
    reader_json: &str,
) -> Result<(), SchemaError> {
    let incompatible = |reason: String| SchemaError::Incompatible {
        name,
        snapshot,
        reason,
    };
    let parse = |label: &str, text: &str| -> Result<Value, SchemaError> {
        serde_json::from_str(text).map_err(|e| SchemaError::Invalid {
            name: format!("{name} ({label})"),
            reason: e.to_string(),
        })
    };
    let mut writer = parse(snapshot, writer_json)?;
    let mut reader = parse("current", reader_json)?;
    let mut writer_decimals = HashMap::new();
    let mut reader_decimals = HashMap::new();
    strip_decimals(&mut writer, "", &mut writer_decimals);
    strip_decimals(&mut reader, "", &mut reader_decimals);
    for (path, w) in &writer_decimals {
        if let Some(r) = reader_decimals.get(path) {
            if r != w {
                return Err(incompatible(format!(
                    "decimal {path} changed from (precision {}, scale {}) to (precision {}, scale {})",
                    w.0, w.1, r.0, r.1
                )));
            }
        }
    }
    let to_schema = |label: &str, value: &Value| {
        Schema::parse_str(&value.to_string()).map_err(|e| SchemaError::Invalid {
            name: format!("{name} ({label})"),
            reason: e.to_string(),
        })
    };
    SchemaCompatibility::can_read(
        &to_schema(snapshot, &writer)?,
        &to_schema("current", &reader)?,
    )
    .map_err(|e| incompatible(e.to_string()))
}

/// Replaces every `decimal` logical type by its underlying type, recording (precision, scale)
/// by the path of the field that holds it.
fn strip_decimals(value: &mut Value, path: &str, found: &mut HashMap<String, (u64, u64)>) {
    match value {
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| strip_decimals(v, path, found)),
        Value::Object(map) => {
            if map.get("logicalType").and_then(Value::as_str) == Some("decimal") {
                let number = |key: &str| map.get(key).and_then(Value::as_u64).unwrap_or(0);
                found.insert(path.to_owned(), (number("precision"), number("scale")));
                for key in ["logicalType", "precision", "scale"] {
                    map.remove(key);
                }
            }
            let record = map.get("name").and_then(Value::as_str).map(str::to_owned);
            if let Some(Value::Array(fields)) = map.get_mut("fields") {
                for field in fields {
                    let field_name = field
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    let field_path = format!("{}.{field_name}", record.as_deref().unwrap_or(path));
                    if let Some(t) = field.get_mut("type") {
                        strip_decimals(t, &field_path, found);
                    }
                }
            }
            for key in ["type", "items", "values"] {
                if let Some(inner @ (Value::Object(_) | Value::Array(_))) = map.get_mut(key) {
                    strip_decimals(inner, path, found);
                }
            }
        }
        _ => {}
    }
}

/// Returns the CRC-64-AVRO fingerprint of a schema's parsing canonical form, little-endian.
pub fn fingerprint(canonical_form: &str) -> [u8; 8] {
    let digest = Rabin::digest(canonical_form.as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Returns the Parsing Canonical Form of a schema (Avro specification, "Parsing Canonical
/// Form for Schemas").
///
/// Written here rather than taken from apache-avro: its `canonical_form()` (0.21) keeps a
/// logical type's base as `{"type":"long"}` where the specification's [PRIMITIVES] rule (and
/// the Java and Python implementations) write `"long"`, so its fingerprints differ from what
/// other readers compute for any schema with a timestamp or decimal.
pub fn parsing_canonical_form(schema: &Value) -> String {
    let mut out = String::with_capacity(2048);
    canonical(schema, "", &mut out);
    out
}

fn full_name(name: &str, namespace: &str) -> String {
    if name.contains('.') || namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}.{name}")
    }
}

fn push_json_string(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

fn canonical(value: &Value, namespace: &str, out: &mut String) {
    match value {
        Value::String(name) if PRIMITIVES.contains(&name.as_str()) => push_json_string(out, name),
        Value::String(reference) => push_json_string(out, &full_name(reference, namespace)),
        Value::Array(branches) => {
            out.push('[');
            for (i, branch) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(branch, namespace, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let kind = map.get("type");
            match kind.and_then(Value::as_str) {
                Some(kind @ ("record" | "error" | "enum" | "fixed")) => {
                    let name = map.get("name").and_then(Value::as_str).unwrap_or_default();
                    let own_namespace = map
                        .get("namespace")
                        .and_then(Value::as_str)
                        .unwrap_or(namespace);
                    let full = full_name(name, own_namespace);
                    let inner_namespace = full.rsplit_once('.').map_or("", |(ns, _)| ns).to_owned();
                    out.push_str("{\"name\":");
                    push_json_string(out, &full);
                    out.push_str(",\"type\":");
                    push_json_string(out, if kind == "error" { "record" } else { kind });
                    match kind {
                        "enum" => {
                            out.push_str(",\"symbols\":");
                            out.push_str(
                                &map.get("symbols")
                                    .map_or_else(|| "[]".to_owned(), Value::to_string),
                            );
                        }
                        "fixed" => {
                            out.push_str(",\"size\":");
                            out.push_str(
                                &map.get("size")
                                    .map_or_else(|| "0".to_owned(), Value::to_string),
                            );
                        }
                        _ => {
                            out.push_str(",\"fields\":[");
                            let fields = map
                                .get("fields")
                                .and_then(Value::as_array)
                                .map_or(&[][..], Vec::as_slice);
                            for (i, field) in fields.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                out.push_str("{\"name\":");
                                push_json_string(
                                    out,
                                    field
                                        .get("name")
                                        .and_then(Value::as_str)
                                        .unwrap_or_default(),
                                );
                                out.push_str(",\"type\":");
                                canonical(
                                    field.get("type").unwrap_or(&Value::Null),
                                    &inner_namespace,
                                    out,
                                );
                                out.push('}');
                            }
                            out.push(']');
                        }
                    }
                    out.push('}');
                }
                Some("array") => {
                    out.push_str("{\"type\":\"array\",\"items\":");
                    canonical(map.get("items").unwrap_or(&Value::Null), namespace, out);
                    out.push('}');
                }
                Some("map") => {
                    out.push_str("{\"type\":\"map\",\"values\":");
                    canonical(map.get("values").unwrap_or(&Value::Null), namespace, out);
                    out.push('}');
                }
                // A primitive (possibly with a logical type) or a named reference in an object.
                Some(_) | None => canonical(kind.unwrap_or(&Value::Null), namespace, out),
            }
        }
        other => out.push_str(&other.to_string()),
    }
}

fn shared_types() -> Result<HashMap<&'static str, Value>, SchemaError> {
    SHARED
        .iter()
        .map(|(name, text)| {
            serde_json::from_str(text)
                .map(|value| (*name, value))
                .map_err(|e| SchemaError::Invalid {
                    name: (*name).to_owned(),
                    reason: e.to_string(),
                })
        })
        .collect()
}

/// Inlines the shared types an event schema refers to and sets `namespace` on every named
/// type; returns the schema as pretty JSON.
pub fn compose(
    name: &str,
    source: &str,
    shared: &HashMap<&'static str, Value>,
    namespace: &str,
) -> Result<String, SchemaError> {
    let mut value: Value = serde_json::from_str(source).map_err(|e| SchemaError::Invalid {
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    let mut defined = HashSet::new();
    inline(&mut value, shared, &mut defined, namespace);
    serde_json::to_string_pretty(&value).map_err(|e| SchemaError::Invalid {
        name: name.to_owned(),
        reason: e.to_string(),
    })
}

fn inline(
    value: &mut Value,
    shared: &HashMap<&'static str, Value>,
    defined: &mut HashSet<String>,
    namespace: &str,
) {
    match value {
        Value::String(reference) => {
            let short = reference.rsplit('.').next().unwrap_or(reference).to_owned();
            if let Some(definition) = shared.get(short.as_str()) {
                if defined.contains(&short) {
                    *reference = short;
                } else {
                    let mut definition = definition.clone();
                    inline(&mut definition, shared, defined, namespace);
                    *value = definition;
                }
            }
        }
        Value::Array(union) => {
            for branch in union {
                inline(branch, shared, defined, namespace);
            }
        }
        Value::Object(map) => {
            let kind = map
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if matches!(kind.as_str(), "record" | "enum" | "fixed") {
                if let Some(name) = map.get("name").and_then(Value::as_str) {
                    defined.insert(name.to_owned());
                }
                map.insert("namespace".to_owned(), Value::String(namespace.to_owned()));
            }
            match kind.as_str() {
                "record" => {
                    if let Some(Value::Array(fields)) = map.get_mut("fields") {
                        for field in fields {
                            if let Some(t) = field.get_mut("type") {
                                inline(t, shared, defined, namespace);
                            }
                        }
                    }
                }
                "array" => {
                    if let Some(items) = map.get_mut("items") {
                        inline(items, shared, defined, namespace);
                    }
                }
                "map" => {
                    if let Some(values) = map.get_mut("values") {
                        inline(values, shared, defined, namespace);
                    }
                }
                _ => {
                    if let Some(t @ (Value::Object(_) | Value::Array(_))) = map.get_mut("type") {
                        inline(t, shared, defined, namespace);
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `eventId` doc consumers read states the rule `stream::change::event_id` implements:
    /// the previous event's fingerprint is part of the id (a change back gets a new id).
    #[test]
    fn the_event_id_doc_states_the_rule_the_code_implements() {
        use crate::stream::change::event_id;
        let meta: Value =
            serde_json::from_str(include_str!("../../schemas/EventMeta.avsc")).unwrap();
        let doc = meta["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "eventId")
            .unwrap()["doc"]
            .as_str()
            .unwrap();
        assert!(
            doc.contains("previous event") && doc.contains("16 lowercase hex digits"),
            "{doc}"
        );
        let (a, b) = (5, 6);
        let first = event_id("leads", "7", None, a);
        assert_eq!(first.len(), 16);
        assert!(first
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(
            first,
            event_id("leads", "7", None, a),
            "a retry has the same id"
        );
        assert_ne!(
            first,
            event_id("leads", "7", Some(b), a),
            "A, B, A: a new id"
        );
    }

    #[test]
    fn every_schema_composes_and_parses_once_per_type() {
        let schemas = Schemas::load("com.ibstream").unwrap();
        for s in schemas.all() {
            // Each shared type is defined once and referred to by name after that.
            assert_eq!(
                s.json.matches("\"name\": \"EventMeta\"").count(),
                1,
                "{}",
                s.event.name()
            );
            assert!(!s.json.contains("com.ibstream.EventMeta"));
        }
        let customer = &schemas.get(EventType::Customer).json;
        assert_eq!(customer.matches("\"name\": \"UtmDetails\"").count(), 1);
        assert_eq!(customer.matches("\"name\": \"TradingAccount\"").count(), 1);
        assert!(schemas
            .get(EventType::Lead)
            .json
            .contains("\"name\": \"TagCategory\""));
    }

    #[test]
    fn canonical_form_follows_the_specification() {
        let schema = serde_json::json!({
            "type": "record", "name": "A", "namespace": "x.y", "doc": "dropped",
            "fields": [
                {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}, "doc": "d"},
                {"name": "d", "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 8}], "default": null},
                {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["P", "Q"], "doc": "x"}},
                {"name": "r", "type": "E"},
                {"name": "m", "type": {"type": "map", "values": {"type": "array", "items": "string"}}},
                {"name": "f", "type": {"type": "fixed", "name": "other.F", "size": 4}}
            ]
        });
        assert_eq!(
            parsing_canonical_form(&schema),
            concat!(
                r#"{"name":"x.y.A","type":"record","fields":["#,
                r#"{"name":"t","type":"long"},"#,
                r#"{"name":"d","type":["null","bytes"]},"#,
                r#"{"name":"e","type":{"name":"x.y.E","type":"enum","symbols":["P","Q"]}},"#,
                r#"{"name":"r","type":"x.y.E"},"#,
                r#"{"name":"m","type":{"type":"map","values":{"type":"array","items":"string"}}},"#,
                r#"{"name":"f","type":{"name":"other.F","type":"fixed","size":4}}]}"#
            )
        );
        // Where apache-avro agrees (no logical types), the fingerprints agree.
        let plain = serde_json::json!({"type": "record", "name": "P", "namespace": "n",
            "fields": [{"name": "a", "type": ["null", "string"]}, {"name": "b", "type": {"type": "array", "items": "long"}}]});
        let parsed = Schema::parse_str(&plain.to_string()).unwrap();
        assert_eq!(parsing_canonical_form(&plain), parsed.canonical_form());
        assert_eq!(
            fingerprint(&parsing_canonical_form(&plain)).to_vec(),
            parsed.fingerprint::<Rabin>().bytes
        );
    }

    #[test]
    fn namespace_is_configurable() {
        let schemas = Schemas::load("org.broker.events").unwrap();
        let lead = schemas.get(EventType::Lead);
        assert_eq!(
            lead.schema.name().unwrap().fullname(None),
            "org.broker.events.LeadEvent"
        );
        assert!(!lead.json.contains("com.ibstream"));
        let default = Schemas::load("com.ibstream").unwrap();
        assert_ne!(lead.fingerprint, default.get(EventType::Lead).fingerprint);
    }

    #[test]
    fn every_field_has_a_doc_and_crm_fields_are_optional() {
        let schemas = Schemas::load("com.ibstream").unwrap();
        for s in schemas.all() {
            let value: Value = serde_json::from_str(&s.json).unwrap();
            let fields = value["fields"].as_array().unwrap();
            for field in fields {
                let name = field["name"].as_str().unwrap();
                assert!(
                    field["doc"].as_str().is_some_and(|d| !d.is_empty()),
                    "{}.{name} has no doc",
                    s.event.name()
                );
                if name == "meta" || name == "extra" || name == "accounts" {
                    continue;
                }
                assert_eq!(
                    field["type"][0],
                    "null",
                    "{}.{name} is not optional",
                    s.event.name()
                );
                assert!(
                    field["default"].is_null() && field.get("default").is_some(),
                    "{}.{name} default",
                    s.event.name()
                );
            }
        }
    }

    #[test]
    fn current_schemas_read_the_released_ones() {
        let schemas = Schemas::load("com.ibstream").unwrap();
        for result in schemas.check_compatibility() {
            result.unwrap();
        }
    }

    #[test]
    fn an_incompatible_change_is_caught() {
        let schemas = Schemas::load("com.ibstream").unwrap();
        let current = schemas.get(EventType::Position);
        let snapshot = EventType::Position.snapshot_v1();
        let edit = |f: &dyn Fn(&mut Vec<Value>)| {
            let mut value: Value = serde_json::from_str(&current.json).unwrap();
            f(value["fields"].as_array_mut().unwrap());
            value.to_string()
        };
        // A new field without a default: old data lacks it.
        let broken =
            edit(&|fields| fields.push(serde_json::json!({"name": "region", "type": "string"})));
        let err = check_backward("PositionEvent", "v1", snapshot, &broken).unwrap_err();
        assert!(err.to_string().contains("PositionEvent"), "{err}");
        // A decimal whose scale changes would misread every amount.
        let rescaled = edit(&|fields| {
            let profit = fields.iter_mut().find(|f| f["name"] == "profit").unwrap();
            profit["type"][1]["scale"] = serde_json::json!(2);
        });
        let err = check_backward("PositionEvent", "v1", snapshot, &rescaled).unwrap_err();
        assert!(err.to_string().contains("PositionEvent.profit"), "{err}");
        // A changed type is caught by apache-avro's rules.
        let retyped = edit(&|fields| {
            let login = fields
                .iter_mut()
                .find(|f| f["name"] == "positionId")
                .unwrap();
            login["type"] = serde_json::json!(["null", "string"]);
        });
        assert!(check_backward("PositionEvent", "v1", snapshot, &retyped).is_err());
        // A new optional field with a default is fine.
        let added = edit(&|fields| {
            fields.push(
                serde_json::json!({"name": "region", "type": ["null", "string"], "default": null}),
            )
        });
        check_backward("PositionEvent", "v1", snapshot, &added).unwrap();
    }
}
