//! Timestamp parsing in the formats the CRM is known or expected to send.
//!
//! Accepted: `YYYY-MM-DD HH:MM:SS[.fff]` and `YYYY-MM-DDTHH:MM:SS[.fff]` in the CRM's local
//! time zone, ISO-8601/RFC 3339 with an offset or `Z`, a bare date (local midnight), and epoch
//! milliseconds as a JSON number or a string of digits. Local times that a DST change makes
//! ambiguous take the earlier instant; local times that fall into a DST gap are shifted forward
//! by the gap, as `java.time` does, so a CRM that wrote them still gets a real instant.

use chrono::{DateTime, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::Value;

use super::raw::Field;

const LOCAL_FORMATS: [&str; 2] = ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"];

/// Parses a JSON value as an instant; `null` and empty strings are `None`.
pub fn parse_timestamp(value: &Field<'_>, tz: Tz) -> Result<Option<DateTime<Utc>>, String> {
    match value {
        Field::Null => Ok(None),
        Field::Number(n) => {
            let millis = n
                .parse::<i64>()
                .map_err(|_| format!("not an epoch-milliseconds integer: {n}"))?;
            from_millis(millis).map(Some)
        }
        Field::String(s) => parse_timestamp_str(s, tz),
        other => Err(format!("not a timestamp: {}", other.kind())),
    }
}

/// Parses a timestamp string; empty or blank is `None`. An instant chrono cannot show in
/// every time zone (within a day of its limits) is an error, so no later conversion panics.
pub fn parse_timestamp_str(text: &str, tz: Tz) -> Result<Option<DateTime<Utc>>, String> {
    match parse_any(text, tz)? {
        Some(t) if !within_limits(t) => Err(format!("timestamp out of range: {:?}", text.trim())),
        other => Ok(other),
    }
}

fn parse_any(text: &str, tz: Tz) -> Result<Option<DateTime<Utc>>, String> {
    let s = text.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if s.bytes().all(|b| b.is_ascii_digit())
        || (s.starts_with('-') && s.len() > 1 && s[1..].bytes().all(|b| b.is_ascii_digit()))
    {
        let millis: i64 = s
            .parse()
            .map_err(|_| format!("epoch milliseconds out of range: {s:?}"))?;
        return from_millis(millis).map(Some);
    }
    if let Some(naive) = parse_plain_local(s) {
        return Ok(Some(local_to_utc(naive, tz)));
    }
    for format in LOCAL_FORMATS {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, format) {
            return Ok(Some(local_to_utc(naive, tz)));
        }
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f%z",
        "%Y-%m-%d %H:%M:%S%.f%z",
        "%Y-%m-%d %H:%M:%S%.f %z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, format) {
            return Ok(Some(t.with_timezone(&Utc)));
        }
    }
    if let Ok(date) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(midnight) = date.and_hms_opt(0, 0, 0) {
            return Ok(Some(local_to_utc(midnight, tz)));
        }
    }
    Err(format!("unreadable timestamp: {s:?}"))
}

/// Parses exactly `YYYY-MM-DD HH:MM:SS`, the CRM's usual format, without a format string
/// (chrono's format parser dominated page parsing time).
fn parse_plain_local(s: &str) -> Option<NaiveDateTime> {
    let b = s.as_bytes();
    if b.len() != 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b' ' || b[10] == b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        b[range].iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let date = NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    date.and_hms_opt(num(11..13)?, num(14..16)?, num(17..19)?)
}

/// Converts a CRM-local wall time to UTC (earlier instant when ambiguous, gap shifted forward).
pub fn local_to_utc(naive: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(earlier, _) => earlier.with_timezone(&Utc),
        LocalResult::None => {
            // In a gap: use the offset in force just before it, which moves the wall time
            // forward by the gap's length.
            let before = naive
                .checked_sub_signed(Duration::hours(3))
                .unwrap_or(naive);
            let offset = match tz.from_local_datetime(&before) {
                LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.offset().fix(),
                LocalResult::None => Utc.fix(),
            };
            let utc = naive
                .checked_sub_signed(Duration::seconds(i64::from(offset.local_minus_utc())))
                .unwrap_or(naive);
            Utc.from_utc_datetime(&utc)
        }
    }
}

/// Returns the instant a CRM-local day starts.
pub fn day_start(day: NaiveDate, tz: Tz) -> DateTime<Utc> {
    local_to_utc(day.and_time(chrono::NaiveTime::MIN), tz)
}

/// Formats an instant as the CRM's local `YYYY-MM-DD HH:MM:SS`.
pub fn format_local(t: DateTime<Utc>, tz: Tz) -> String {
    use chrono::{Datelike, Timelike};
    // Not chrono's `format`: it parses its format string on every call, and the simulator
    // formats every timestamp of every page it serves.
    let local = t.with_timezone(&tz).naive_local();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        local.year(),
        local.month(),
        local.day(),
        local.hour(),
        local.minute(),
        local.second()
    )
}

fn from_millis(millis: i64) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp_millis(millis)
        .filter(|t| within_limits(*t))
        .ok_or_else(|| format!("epoch milliseconds out of range: {millis}"))
}

/// Returns whether an instant is a day or more inside chrono's limits, so it can be shown in
/// any time zone.
fn within_limits(t: DateTime<Utc>) -> bool {
    t.checked_add_signed(Duration::days(1)).is_some()
        && t.checked_sub_signed(Duration::days(1)).is_some()
}

pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The field a page would hold for `value`.
    fn parse_timestamp(value: &Value, tz: Tz) -> Result<Option<DateTime<Utc>>, String> {
        let text = value.to_string();
        let raw: &serde_json::value::RawValue = serde_json::from_str(&text).unwrap();
        super::parse_timestamp(&Field::from_raw(raw).unwrap(), tz)
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn parses_every_documented_format() {
        let tz: Tz = "Europe/Nicosia".parse().unwrap();
        // Nicosia is UTC+2 in winter.
        let expected = utc("2019-03-14T07:21:44Z");
        for v in [
            json!("2019-03-14 09:21:44"),
            json!("2019-03-14T09:21:44"),
            json!("2019-03-14T09:21:44+02:00"),
            json!("2019-03-14T07:21:44Z"),
            json!("2019-03-14T09:21:44+0200"),
            json!(1552548104000_i64),
            json!("1552548104000"),
        ] {
            assert_eq!(parse_timestamp(&v, tz).unwrap(), Some(expected), "{v}");
        }
        assert_eq!(
            parse_timestamp(&json!("2019-03-14 09:21:44.250"), tz).unwrap(),
            Some(expected + Duration::milliseconds(250))
        );
        assert_eq!(
            parse_timestamp(&json!("2019-03-14"), tz).unwrap(),
            Some(utc("2019-03-13T22:00:00Z"))
        );
    }

    #[test]
    fn null_and_blank_are_none_and_garbage_is_an_error() {
        let tz = Tz::UTC;
        assert_eq!(parse_timestamp(&json!(null), tz).unwrap(), None);
        assert_eq!(parse_timestamp(&json!("  "), tz).unwrap(), None);
        assert!(parse_timestamp(&json!("14/03/2019"), tz).is_err());
        assert!(parse_timestamp(&json!("2019-02-30 10:00:00"), tz).is_err());
        assert!(parse_timestamp(&json!(true), tz).is_err());
        assert!(parse_timestamp(&json!(1.5), tz).is_err());
    }

    #[test]
    fn dst_changes_resolve_to_real_instants() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        // 2024-03-31 02:30 does not exist in Berlin (02:00 → 03:00): shifted to 03:30 CEST.
        assert_eq!(
            parse_timestamp_str("2024-03-31 02:30:00", tz).unwrap(),
            Some(utc("2024-03-31T01:30:00Z"))
        );
        // 2024-10-27 02:30 happens twice: the earlier one (CEST, UTC+2) is taken.
        assert_eq!(
            parse_timestamp_str("2024-10-27 02:30:00", tz).unwrap(),
            Some(utc("2024-10-27T00:30:00Z"))
        );
        // Either side of the change keeps its own offset.
        assert_eq!(
            parse_timestamp_str("2024-10-27 04:00:00", tz).unwrap(),
            Some(utc("2024-10-27T03:00:00Z"))
        );
        assert_eq!(
            parse_timestamp_str("2024-03-31 01:59:59", tz).unwrap(),
            Some(utc("2024-03-31T00:59:59Z"))
        );
    }

    #[test]
    fn format_local_round_trips() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let t = utc("2024-07-01T12:00:00Z");
        let s = format_local(t, tz);
        assert_eq!(s, "2024-07-01 08:00:00");
        assert_eq!(parse_timestamp_str(&s, tz).unwrap(), Some(t));
    }

    #[test]
    fn instants_at_chrono_s_limits_are_errors_not_panics() {
        let east: Tz = "Asia/Tokyo".parse().unwrap();
        let west: Tz = "America/Los_Angeles".parse().unwrap();
        let max = DateTime::<Utc>::MAX_UTC.timestamp_millis();
        let min = DateTime::<Utc>::MIN_UTC.timestamp_millis();
        for tz in [east, west, Tz::UTC] {
            for millis in [max, max - 1, min, min + 1] {
                let err = parse_timestamp(&json!(millis), tz).unwrap_err();
                assert!(err.contains("out of range"), "{err}");
                let err = parse_timestamp(&json!(millis.to_string()), tz).unwrap_err();
                assert!(err.contains("out of range"), "{err}");
            }
            for text in ["+262142-12-31T23:59:59Z", "-262143-01-01T00:00:00Z"] {
                assert!(parse_timestamp(&json!(text), tz).is_err(), "{text}");
            }
            // A day inside the limits converts to the zone without a panic.
            let inside = parse_timestamp(&json!(max - 2 * 86_400_000), tz)
                .unwrap()
                .unwrap();
            let _ = inside.with_timezone(&tz).date_naive();
        }
    }
}
