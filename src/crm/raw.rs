//! Records read straight from the page's bytes, without building a JSON tree.
//!
//! A page of 1,000 records parsed into `serde_json::Value` trees costs an allocation for
//! every key, string and number (numbers keep their digits as text under
//! `arbitrary_precision`) and a B-tree insert for every field: a third of the connector's CPU
//! in the benchmark's profile. Here a record is a sorted list of `(key, Field)` pairs borrowed
//! from the body: strings without escapes and numbers are slices of it, nested objects and
//! arrays (rare, small) stay raw JSON until a model asks for them. Its fingerprint is computed
//! from the same pairs and is byte-for-byte the one [`crate::crm::fingerprint::fingerprint`]
//! computes from a `Value` map, so changing the parser re-emits nothing.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// One field value of a record, borrowed from the page.
#[derive(Debug, Clone)]
pub enum Field<'a> {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number's text as received (exact: never through `f64`).
    Number(&'a str),
    /// A string, unescaped (borrowed when it had no escapes).
    String(Cow<'a, str>),
    /// An object or array, as its raw JSON text.
    Nested(&'a RawValue),
}

impl<'a> Field<'a> {
    /// Classifies a raw JSON value by its first byte.
    pub(crate) fn from_raw(raw: &'a RawValue) -> Result<Field<'a>, serde_json::Error> {
        let text = raw.get();
        Ok(match text.as_bytes().first() {
            Some(b'n') => Field::Null,
            Some(b't') => Field::Bool(true),
            Some(b'f') => Field::Bool(false),
            Some(b'"') if !text.contains('\\') => {
                Field::String(Cow::Borrowed(&text[1..text.len() - 1]))
            }
            Some(b'"') => Field::String(Cow::Owned(serde_json::from_str(text)?)),
            Some(b'{' | b'[') => Field::Nested(raw),
            _ => Field::Number(text),
        })
    }

    /// Returns whether the value is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Field::Null)
    }

    /// Returns the value as a `serde_json::Value` (for nested values and unknown fields).
    pub fn to_value(&self) -> Value {
        match self {
            Field::Null => Value::Null,
            Field::Bool(b) => Value::Bool(*b),
            Field::String(s) => Value::String(s.to_string()),
            // Both were valid JSON when the page was parsed.
            Field::Number(text) => serde_json::from_str(text).unwrap_or(Value::Null),
            Field::Nested(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
        }
    }

    /// Names the JSON type, for errors (as `time::kind_of` names a `Value`'s).
    pub fn kind(&self) -> &'static str {
        match self {
            Field::Null => "null",
            Field::Bool(_) => "a boolean",
            Field::Number(_) => "a number",
            Field::String(_) => "a string",
            Field::Nested(raw) if raw.get().starts_with('[') => "an array",
            Field::Nested(_) => "an object",
        }
    }
}

/// A JSON object's fields, sorted by key (byte order, as `serde_json::Map` iterates); of a
/// key given twice the last value counts, as in a `Map`.
#[derive(Debug, Default, Clone)]
pub struct Fields<'a>(Vec<(Cow<'a, str>, Field<'a>)>);

impl<'a> Fields<'a> {
    /// Parses an object's JSON text.
    pub fn parse(text: &'a str) -> Result<Fields<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The fields in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Field<'a>)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Fields<'de>, M::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(24));
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    let raw: &'de RawValue = map.next_value()?;
                    let field = Field::from_raw(raw).map_err(serde::de::Error::custom)?;
                    fields.push((key.0, field));
                }
                // Stable: of equal keys the later stays later, and dedup keeps the last.
                fields.sort_by(|a: &(Cow<str>, Field), b| a.0.cmp(&b.0));
                let mut deduped: Vec<(Cow<str>, Field)> = Vec::with_capacity(fields.len());
                for (key, value) in fields {
                    match deduped.last_mut() {
                        Some(last) if last.0 == key => last.1 = value,
                        _ => deduped.push((key, value)),
                    }
                }
                Ok(Fields(deduped))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// An object key, borrowed unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}
