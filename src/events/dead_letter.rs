//! Dead letters: records that could not be read or encoded, as JSON values for `<prefix>.dlq`.
//!
//! A dead letter carries everything needed to replay the record by hand once the cause is
//! fixed: the stream, the entity key when it is known, the raw record exactly as the CRM sent
//! it, the error, and when it was fetched.
//!
//! A dead letter always fits the producer's limit ([`DeadLetter::to_json_within`]): a record
//! too large for Kafka must not make a dead letter too large for Kafka, or its stream would
//! retry the same batch forever. The error is cut to [`ERROR_MAX_BYTES`] (it may quote a
//! huge value); when the letter would still not fit, the raw record becomes its JSON text cut to what fits once
//! JSON-escaped (a quote or backslash takes 2 bytes, a control character up to 6), ending in
//! `…(truncated)`, with `rawBytes` giving the size of the whole text.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

/// One dead-letter value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The stream (`leads`, `positions`, …).
    pub stream: String,
    /// The entity key, when the record got far enough to have one.
    pub key: Option<String>,
    /// The raw record: its JSON when it was JSON, else its text.
    pub raw: Value,
    /// Why the record was rejected (at most [`ERROR_MAX_BYTES`]).
    pub error: String,
    /// When the page holding the record was received (RFC 3339, UTC).
    pub fetched_at: String,
    /// The size in bytes of the raw record's JSON text, when `raw` had to be cut to fit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_bytes: Option<usize>,
}

/// The longest error text a dead letter keeps when it must be cut to fit, in bytes.
pub const ERROR_MAX_BYTES: usize = 4096;

/// What ends a cut text.
const CUT_MARK: &str = "…(truncated)";

impl DeadLetter {
    /// Builds a dead letter from the raw record text.
    pub fn new(
        stream: &str,
        key: Option<String>,
        raw: &str,
        error: &dyn std::fmt::Display,
        fetched_at: DateTime<Utc>,
    ) -> DeadLetter {
        DeadLetter {
            stream: stream.to_owned(),
            key,
            raw: serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned())),
            // An error may quote a huge value: it is cut here, so logs stay bounded too.
            error: cut_to(&error.to_string(), ERROR_MAX_BYTES),
            fetched_at: fetched_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            raw_bytes: None,
        }
    }

    /// Returns the JSON bytes of the dead letter.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Returns the JSON bytes of the dead letter, cut (see the module's doc) so that with a
    /// record key of `key_bytes` bytes they take at most `max_bytes` (the producer's
    /// `message.max.bytes` less its framing, `kafka.max_message_bytes()`).
    pub fn to_json_within(&self, max_bytes: usize, key_bytes: usize) -> Vec<u8> {
        let whole = self.to_json();
        if whole.len() + key_bytes <= max_bytes {
            return whole;
        }
        let raw_text = match &self.raw {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let mut cut = self.clone();
        cut.raw = Value::String(String::new());
        cut.raw_bytes = Some(raw_text.len());
        let mut budget = max_bytes
            .saturating_sub(cut.to_json().len() + key_bytes)
            .saturating_sub(escaped_len(CUT_MARK));
        loop {
            cut.raw = Value::String(format!("{}{CUT_MARK}", prefix_within(&raw_text, budget)));
            let json = cut.to_json();
            let over = (json.len() + key_bytes).saturating_sub(max_bytes);
            if over == 0 || budget == 0 {
                return json;
            }
            // Never taken with the escaping counted right; kept so a miscount cannot loop.
            budget = budget.saturating_sub(over);
        }
    }
}

/// Returns `text` cut to at most `max` bytes at a character boundary, marked when cut.
fn cut_to(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(CUT_MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT_MARK}", &text[..end])
}

/// Returns the longest prefix of `text` whose JSON-escaped form takes at most `budget` bytes.
fn prefix_within(text: &str, budget: usize) -> &str {
    let mut used = 0;
    for (at, c) in text.char_indices() {
        used += escaped_char_len(c);
        if used > budget {
            return &text[..at];
        }
    }
    text
}

/// Returns the bytes `text` takes inside a JSON string as serde_json writes it.
fn escaped_len(text: &str) -> usize {
    text.chars().map(escaped_char_len).sum()
}

/// Returns the bytes a character takes inside a JSON string as serde_json writes it: `\"`,
/// `\\` and the short escapes of control characters take 2, other control characters 6
/// (`\u001f`), everything else its UTF-8 length.
fn escaped_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::{parse_page, Lead};

    #[test]
    fn unreadable_record_becomes_a_dead_letter_with_its_raw_json() {
        let body = br#"{"total": 1, "data": [{"id": 7, "registrationDate": "31/02/2024", "score": 1.50}]}"#;
        let page = parse_page::<Lead>(body, 1, 1000, chrono_tz::Tz::UTC, &[]).unwrap();
        let error = page.records.into_iter().next().unwrap().unwrap_err();
        let fetched = DateTime::parse_from_rfc3339("2024-05-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let letter = DeadLetter::new("leads", None, &error.raw, &error, fetched);
        let json: Value = serde_json::from_slice(&letter.to_json()).unwrap();
        assert_eq!(json["stream"], "leads");
        assert_eq!(json["key"], Value::Null);
        assert_eq!(json["raw"]["registrationDate"], "31/02/2024");
        // The number's text survives as sent.
        assert_eq!(json["raw"]["score"].to_string(), "1.50");
        assert!(json["error"].as_str().unwrap().contains("registrationDate"));
        assert_eq!(json["fetchedAt"], "2024-05-01T10:00:00.000Z");
    }

    /// A record of `count` × `c` in a JSON field, as a page holds it.
    fn record_of(c: char, count: usize) -> String {
        let value: String = std::iter::repeat_n(c, count).collect();
        serde_json::json!({"id": 7, "notes": value}).to_string()
    }

    #[test]
    fn a_dead_letter_always_fits_the_limit_however_its_raw_text_escapes() {
        let max = 1_000_000 - 256;
        let key = "100231";
        let error = "the event is 1200123 bytes, more than Kafka accepts";
        for (c, count) in [
            // 2-byte UTF-8: 1.2 MB of text in 600,000 characters.
            ('ж', 600_000),
            // 3-byte UTF-8.
            ('€', 400_000),
            // 4-byte UTF-8.
            ('😀', 300_000),
            // JSON escapes: 6 bytes each (`\u0001`), 2 bytes each (`\"`, `\\`, `\n`).
            ('\u{1}', 200_000),
            ('"', 600_000),
            ('\\', 600_000),
            ('\n', 600_000),
            ('n', 1_500_000),
        ] {
            let raw = record_of(c, count);
            let letter = DeadLetter::new("leads", Some(key.into()), &raw, &error, Utc::now());
            let json = letter.to_json_within(max, key.len());
            assert!(
                json.len() + key.len() <= max,
                "{c:?} × {count}: {} bytes",
                json.len() + key.len()
            );
            // It is still a dead letter: JSON, the raw text cut, its whole size said.
            let value: Value = serde_json::from_slice(&json).unwrap();
            let cut = value["raw"].as_str().unwrap();
            assert!(cut.ends_with("…(truncated)"), "{c:?}");
            assert!(raw.starts_with(cut.trim_end_matches("…(truncated)")));
            assert!(json.len() + key.len() > max - 64, "{c:?}: cut too much");
            assert_eq!(value["rawBytes"], raw.len());
            assert_eq!(value["error"], error);
            assert_eq!(value["key"], key);
        }
        // Raw text that is no JSON is kept as a string: control characters escape to 6 bytes.
        for raw in ["\u{1}".repeat(400_000), "ж\u{1f}\"".repeat(200_000)] {
            let letter = DeadLetter::new("leads", None, &raw, &error, Utc::now());
            let json = letter.to_json_within(max, 5);
            assert!(json.len() + 5 <= max, "{} bytes", json.len() + 5);
            assert!(json.len() + 5 > max - 64, "cut too much");
            let value: Value = serde_json::from_slice(&json).unwrap();
            assert_eq!(value["rawBytes"], raw.len());
        }
        // A huge error is cut too; a small letter is left whole.
        let huge_error = "x".repeat(2_000_000);
        let letter = DeadLetter::new("leads", None, "{}", &huge_error, Utc::now());
        let json = letter.to_json_within(max, 5);
        assert!(json.len() + 5 <= max);
        let value: Value = serde_json::from_slice(&json).unwrap();
        assert!(value["error"].as_str().unwrap().len() <= ERROR_MAX_BYTES);
        let small = DeadLetter::new("leads", None, r#"{"id": 1}"#, &"bad", Utc::now());
        assert_eq!(small.to_json_within(max, 5), small.to_json());
        assert!(!String::from_utf8(small.to_json())
            .unwrap()
            .contains("rawBytes"));
        // Even a limit smaller than the letter's envelope gives a bounded answer, not a loop.
        let tiny = letter.to_json_within(10, 5);
        assert!(!tiny.is_empty());
    }

    #[test]
    fn non_json_raw_is_kept_as_text() {
        let letter = DeadLetter::new(
            "positions",
            Some("mt4-live-01:1".into()),
            "<oops",
            &"bad",
            Utc::now(),
        );
        assert_eq!(letter.raw, Value::String("<oops".into()));
        assert_eq!(letter.key.as_deref(), Some("mt4-live-01:1"));
    }
}
