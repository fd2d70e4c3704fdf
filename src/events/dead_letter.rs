//! Dead letters: records that could not be read or encoded, as JSON values for `<prefix>.dlq`.
//!
//! A dead letter carries everything needed to replay the record by hand once the cause is
//! fixed: the stream, the entity key when it is known, the raw record exactly as the CRM sent
//! it, the error, and when it was fetched.

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
    /// Why the record was rejected.
    pub error: String,
    /// When the page holding the record was received (RFC 3339, UTC).
    pub fetched_at: String,
}

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
            error: error.to_string(),
            fetched_at: fetched_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        }
    }

    /// Returns the JSON bytes of the dead letter.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
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
