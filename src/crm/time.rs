//! Timestamp parsing in the formats the CRM is known or expected to send.
//!
//! Accepted: `YYYY-MM-DD HH:MM:SS[.fff]` and `YYYY-MM-DDTHH:MM:SS[.fff]` in the CRM's local
//! time zone, ISO-8601/RFC 3339 with an offset or `Z`, a bare date (local midnight), and epoch
//! integers as a JSON number or a string of digits (see [`parse_epoch`]: 9–10 significant
//! digits are seconds, 12–13 milliseconds). Local times that a DST change makes ambiguous take
//! the earlier instant; local times that fall into a DST gap are shifted forward by the gap, as
//! `java.time` does, so a CRM that wrote them still gets a real instant.
//!
//! "No date" ([`Stamp::NoDate`]; docs/design.md, "Values as real CRMs write them"): a blank string,
//! a *zero date* – the MySQL spelling of an unknown date, any `YYYY-MM-DD…` text whose year,
//! month or day is zero (`0000-00-00`, `0000-00-00 00:00:00`, `0000-00-00T00:00:00Z`,
//! `2026-11-00 09:00:00`) – the epoch integer `0`, and an instant Avro readers cannot represent
//! (outside 0001-01-01T00:00:00Z … 9999-12-31T23:59:59.999Z once converted to UTC; e.g.
//! `0001-01-01 00:00:00` in a zone east of UTC is in year 0). The record is still emitted: the
//! field is `null` and its raw value is kept in `extra` (see `crm::models`).
//!
//! Sentinel dates that are real instants (`1900-01-01`, `1970-01-01 00:00:00`, `0001-01-01`
//! in UTC, `9999-12-31`) stay dates: nothing in the value tells a sentinel from a real date,
//! and nulling a real date would lose it silently, while a sentinel passed through is still
//! visible to consumers as the CRM wrote it. Text that is no date at all (`31/02/2024`,
//! `2019-02-30`, `yesterday`) and epoch integers of other lengths are errors: the record goes
//! to the dead-letter topic with its raw JSON.

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc,
};
use chrono_tz::Tz;
use serde_json::Value;

use super::raw::Field;

const LOCAL_FORMATS: [&str; 2] = ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"];

/// A date field as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// `null`.
    Null,
    /// An instant within 0001-01-01 … 9999-12-31 UTC.
    At(DateTime<Utc>),
    /// A value that means "no date" (see the module's doc): `null` in the event, the raw
    /// value kept in `extra`, counted.
    NoDate(NoDate),
}

/// Why a date field holds no date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoDate {
    /// A blank string.
    Blank,
    /// A zero date (`0000-00-00`, a zero month or day) or the epoch integer `0`.
    Zero,
    /// An instant outside 0001-01-01T00:00:00Z … 9999-12-31T23:59:59.999Z (after the zone
    /// conversion), which Avro readers cannot represent as `timestamp-millis`.
    OutOfRange,
}

impl Stamp {
    /// Returns the instant, if the field holds one.
    pub fn instant(self) -> Option<DateTime<Utc>> {
        match self {
            Stamp::At(t) => Some(t),
            Stamp::Null | Stamp::NoDate(_) => None,
        }
    }
}

/// Parses a JSON value as a date field; the error says why it is no readable date.
pub fn parse_timestamp(value: &Field<'_>, tz: Tz) -> Result<Stamp, String> {
    match value {
        Field::Null => Ok(Stamp::Null),
        Field::Number(n) => parse_epoch(n),
        Field::String(s) => parse_timestamp_str(s, tz),
        other => Err(format!("not a timestamp: {}", other.kind())),
    }
}

/// Returns whether this release emits another value for a date field than releases before
/// issue 15 emitted for it – which read every epoch integer as milliseconds (`1764500000` was
/// 1970-01-21, now 2025-11-30), emitted the epoch `0` as 1970-01-01 and an instant outside
/// 0001…9999 UTC (`0001-01-01 00:00:00` east of UTC: year 0; `0000-01-01`) as it was, all
/// now null. A value either release fails on is no such change (its record was a dead letter,
/// or is one now); a blank was null and is null.
///
/// Such a record's fingerprint is marked ([`crate::crm::fingerprint::Reading::Changed`]), so
/// the fingerprint an earlier release stored for it no longer matches and the corrected value
/// is emitted once, with a new `eventId`.
pub fn read_differently_than_before(value: &Field<'_>, tz: Tz) -> bool {
    // Text this release reads as an instant is read as before (the same parser): only epoch
    // integers and values read as "no date" can differ.
    let candidate = match value {
        Field::Number(_) => true,
        Field::String(s) => {
            let s = s.trim();
            let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
            digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                || is_zero_date(s)
                || s.starts_with("0001-")
                || s.starts_with("9999-")
        }
        _ => false,
    };
    if !candidate {
        return false;
    }
    let Ok(now) = parse_timestamp(value, tz) else {
        return false;
    };
    match read_as_before(value, tz) {
        None => false,
        Some(before) => before != now.instant(),
    }
}

/// Reads a date field as releases before issue 15 did; `None` where they failed the record.
fn read_as_before(value: &Field<'_>, tz: Tz) -> Option<Option<DateTime<Utc>>> {
    let millis = |text: &str| {
        let t = DateTime::from_timestamp_millis(text.parse::<i64>().ok()?)?;
        // They kept only instants a day inside chrono's limits.
        t.checked_add_signed(Duration::days(1))?;
        t.checked_sub_signed(Duration::days(1))?;
        Some(Some(t))
    };
    match value {
        Field::Null => Some(None),
        Field::Number(n) => millis(n),
        Field::String(text) => {
            let s = text.trim();
            let unsigned = s.strip_prefix('-').unwrap_or(s);
            if s.is_empty() {
                Some(None)
            } else if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
                millis(s)
            } else {
                parse_text(s, tz).ok().map(Some)
            }
        }
        _ => None,
    }
}

/// Parses a timestamp string (see the module's doc).
pub fn parse_timestamp_str(text: &str, tz: Tz) -> Result<Stamp, String> {
    let s = text.trim();
    if s.is_empty() {
        return Ok(Stamp::NoDate(NoDate::Blank));
    }
    if is_zero_date(s) {
        return Ok(Stamp::NoDate(NoDate::Zero));
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if digits.starts_with(|c: char| c.is_ascii_digit())
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return parse_epoch(s);
    }
    parse_text(s, tz).map(representable)
}

/// Returns whether `s` is a zero date: `YYYY-MM-DD`, alone or followed by a time (` ` or
/// `T`), whose year, month or day is zero.
fn is_zero_date(s: &str) -> bool {
    let b = s.as_bytes();
    let shaped = b.len() >= 10
        && b[4] == b'-'
        && b[7] == b'-'
        && (b.len() == 10 || b[10] == b' ' || b[10] == b'T')
        && [0..4, 5..7, 8..10]
            .iter()
            .all(|r| b[r.clone()].iter().all(u8::is_ascii_digit));
    shaped
        && [&b[0..4], &b[5..7], &b[8..10]]
            .iter()
            .any(|part| part.iter().all(|&c| c == b'0'))
}

/// Parses an epoch integer (a JSON number's text or a string of digits, optionally signed,
/// optionally with a fraction) by its count of significant digits: 9–10 are seconds
/// (1973-03-03 … 2286-11-20), 12–13 milliseconds (the same span). `0` is the zero date.
///
/// Other lengths are errors rather than guesses: 11 digits is seconds after the year 2286 or
/// milliseconds of 1973–1976, neither a plausible CRM date, and a wrong guess would move the
/// record by decades without a trace; 1–8 digits (the first days of 1970 as seconds or
/// milliseconds, or a compact `YYYYMMDD`) and 14 or more (microseconds, nanoseconds) are no
/// form the CRM documents. An exponent is an error too.
pub fn parse_epoch(text: &str) -> Result<Stamp, String> {
    let invalid = || format!("not an epoch timestamp: {text:?}");
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(invalid());
    }
    let significant = int.trim_start_matches('0');
    if significant.is_empty() && frac.bytes().all(|b| b == b'0') {
        return Ok(Stamp::NoDate(NoDate::Zero));
    }
    // Digits of the fraction that count: milliseconds of seconds; none of milliseconds.
    let (scale, frac_digits) = match significant.len() {
        9 | 10 => (1000_i64, 3),
        12 | 13 => (1, 0),
        n => {
            return Err(format!(
            "epoch timestamp {text:?} has {n} digits: 9–10 digits are seconds, 12–13 milliseconds"
        ))
        }
    };
    let whole: i64 = significant.parse().map_err(|_| invalid())?;
    let mut fraction = 0_i64;
    for (i, digit) in frac.bytes().take(frac_digits).enumerate() {
        fraction += i64::from(digit - b'0') * 10_i64.pow(2 - i as u32);
    }
    let millis = whole * scale + fraction;
    let millis = if negative { -millis } else { millis };
    DateTime::from_timestamp_millis(millis)
        .map(representable)
        .ok_or_else(invalid)
}

/// The first instant `timestamp-millis` readers represent: 0001-01-01T00:00:00Z, in epoch
/// milliseconds.
pub const FIRST_MILLIS: i64 = -62_135_596_800_000;
/// The last: 9999-12-31T23:59:59.999Z, in epoch milliseconds.
pub const LAST_MILLIS: i64 = 253_402_300_799_999;

/// Returns the instant as a stamp, or "no date" when Avro readers cannot represent it.
fn representable(t: DateTime<Utc>) -> Stamp {
    if (FIRST_MILLIS..=LAST_MILLIS).contains(&t.timestamp_millis()) {
        Stamp::At(t)
    } else {
        Stamp::NoDate(NoDate::OutOfRange)
    }
}

/// Parses date text that is neither blank, a zero date nor an epoch integer.
fn parse_text(s: &str, tz: Tz) -> Result<DateTime<Utc>, String> {
    let local = |naive: NaiveDateTime| -> Result<DateTime<Utc>, String> {
        // Years of more than 4 digits are out of every representable range; converting them
        // near chrono's own limits could overflow.
        if !(-9999..=19_999).contains(&naive.year()) {
            return Err(format!("timestamp out of range: {s:?}"));
        }
        Ok(local_to_utc(naive, tz))
    };
    if let Some(naive) = parse_plain_local(s) {
        return local(naive);
    }
    for format in LOCAL_FORMATS {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, format) {
            return local(naive);
        }
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f%z",
        "%Y-%m-%d %H:%M:%S%.f%z",
        "%Y-%m-%d %H:%M:%S%.f %z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, format) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    if let Ok(date) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(midnight) = date.and_hms_opt(0, 0, 0) {
            return local(midnight);
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
    fn stamp(value: &Value, tz: Tz) -> Result<Stamp, String> {
        let text = value.to_string();
        let raw: &serde_json::value::RawValue = serde_json::from_str(&text).unwrap();
        super::parse_timestamp(&Field::from_raw(raw).unwrap(), tz)
    }

    /// The instant of a field that holds one (`None` for null and "no date").
    fn parse_timestamp(value: &Value, tz: Tz) -> Result<Option<DateTime<Utc>>, String> {
        stamp(value, tz).map(Stamp::instant)
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
            json!(1552548104_i64),
            json!("1552548104"),
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
    fn values_read_differently_than_before_are_told() {
        let differs = |v: Value, tz: &str| {
            let text = v.to_string();
            let raw: &serde_json::value::RawValue = serde_json::from_str(&text).unwrap();
            read_differently_than_before(&Field::from_raw(raw).unwrap(), tz.parse().unwrap())
        };
        // Emitted wrong before: epoch seconds as milliseconds (any spelling of 9–10 digits),
        // the epoch 0 and instants outside 0001…9999 (now null).
        for v in [
            json!(1764500000),
            json!("1764500000"),
            json!(" 01764500000 "),
            json!(999999999),
            json!(-1000000000),
            json!(0),
            json!("0"),
            json!("0000-01-01 00:00:00"),
        ] {
            assert!(differs(v.clone(), "UTC"), "{v}");
        }
        assert!(differs(json!("0001-01-01 00:00:00"), "Asia/Tokyo"));
        assert!(differs(json!("9999-12-31 23:00:00"), "America/New_York"));
        // Read as before: milliseconds, text, null, a blank (null both times), and what
        // either release fails on (a dead letter).
        for v in [
            json!(1764500000123_i64),
            json!("1764500000123"),
            json!("2025-11-30 10:53:20"),
            json!("2025-11-30T10:53:20+02:00"),
            json!("0001-01-01 00:00:00"),
            json!("9999-12-31 23:00:00"),
            json!(null),
            json!(""),
            json!("0000-00-00 00:00:00"),
            json!(17645000001_i64),
            json!(1764500000.5),
            json!("yesterday"),
        ] {
            assert!(!differs(v.clone(), "UTC"), "{v}");
        }
        assert!(!differs(json!("0001-01-01 00:00:00"), "America/New_York"));
    }

    #[test]
    fn epoch_integers_are_read_by_their_number_of_digits() {
        let tz = Tz::UTC;
        let at = |v: Value| parse_timestamp(&v, tz).unwrap().unwrap();
        // 10 and 9 digits: seconds (a transaction dated in seconds is not in January 1970).
        assert_eq!(at(json!(1764500000)), utc("2025-11-30T10:53:20Z"));
        assert_eq!(at(json!("1764500000")), utc("2025-11-30T10:53:20Z"));
        assert_eq!(at(json!(999999999)), utc("2001-09-09T01:46:39Z"));
        assert_eq!(at(json!(100000000)), utc("1973-03-03T09:46:40Z"));
        // Seconds with a fraction keep its milliseconds.
        assert_eq!(at(json!(1764500000.25)), utc("2025-11-30T10:53:20.250Z"));
        assert_eq!(
            at(json!("1764500000.1239")),
            utc("2025-11-30T10:53:20.123Z")
        );
        // 13 and 12 digits: milliseconds.
        assert_eq!(
            at(json!(1764500000123_i64)),
            utc("2025-11-30T10:53:20.123Z")
        );
        assert_eq!(at(json!(999999999999_i64)), utc("2001-09-09T01:46:39.999Z"));
        // Leading zeros are not digits of the value; a sign is allowed.
        assert_eq!(at(json!("01764500000")), utc("2025-11-30T10:53:20Z"));
        assert_eq!(at(json!(-1000000000)), utc("1938-04-24T22:13:20Z"));
        // Zero is the zero date.
        for zero in [json!(0), json!("0"), json!("0000000000"), json!(0.0)] {
            assert_eq!(
                stamp(&zero, tz).unwrap(),
                Stamp::NoDate(NoDate::Zero),
                "{zero}"
            );
        }
        // Other lengths are no documented form: an error naming the rule, not a guess.
        for v in [
            json!(17645000001_i64),
            json!(12345678),
            json!(1),
            json!(-1),
            json!("20240315"),
            json!(17645000001234_i64),
            json!(1764500000123456_i64),
            json!("1.7645e9"),
        ] {
            let err = stamp(&v, tz).unwrap_err();
            assert!(
                err.contains("epoch") || err.contains("timestamp"),
                "{v}: {err}"
            );
        }
        let err = stamp(&json!(17645000001_i64), tz).unwrap_err();
        assert!(err.contains("11 digits"), "{err}");
    }

    #[test]
    fn null_is_null_and_garbage_is_an_error() {
        let tz = Tz::UTC;
        assert_eq!(stamp(&json!(null), tz).unwrap(), Stamp::Null);
        assert!(parse_timestamp(&json!("14/03/2019"), tz).is_err());
        assert!(parse_timestamp(&json!("2019-02-30 10:00:00"), tz).is_err());
        assert!(parse_timestamp(&json!("2019-13-01"), tz).is_err());
        assert!(parse_timestamp(&json!("yesterday"), tz).is_err());
        assert!(parse_timestamp(&json!(true), tz).is_err());
        assert!(parse_timestamp(&json!("1.2.3"), tz).is_err());
    }

    #[test]
    fn blank_and_zero_dates_are_no_date() {
        for tz in [
            Tz::UTC,
            "Asia/Tokyo".parse().unwrap(),
            "America/Los_Angeles".parse().unwrap(),
        ] {
            for (text, why) in [
                ("", NoDate::Blank),
                ("  ", NoDate::Blank),
                ("0000-00-00", NoDate::Zero),
                ("0000-00-00 00:00:00", NoDate::Zero),
                ("0000-00-00T00:00:00Z", NoDate::Zero),
                ("0000-00-00T00:00:00+02:00", NoDate::Zero),
                ("0000-00-00 00:00:00.000", NoDate::Zero),
                ("2026-11-00 09:00:00", NoDate::Zero),
                ("2026-00-10", NoDate::Zero),
                ("0000-01-01 00:00:00", NoDate::Zero),
                (" 0000-00-00 ", NoDate::Zero),
            ] {
                assert_eq!(
                    stamp(&json!(text), tz).unwrap(),
                    Stamp::NoDate(why),
                    "{text:?} in {tz}"
                );
            }
        }
    }

    #[test]
    fn sentinel_dates_that_are_real_instants_stay_dates() {
        let tz = Tz::UTC;
        for (text, want) in [
            ("1900-01-01", "1900-01-01T00:00:00Z"),
            ("1970-01-01 00:00:00", "1970-01-01T00:00:00Z"),
            ("0001-01-01 00:00:00", "0001-01-01T00:00:00Z"),
            ("9999-12-31 23:59:59", "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(
                parse_timestamp(&json!(text), tz).unwrap(),
                Some(utc(want)),
                "{text}"
            );
        }
    }

    #[test]
    fn instants_avro_readers_cannot_represent_are_no_date() {
        let east: Tz = "Asia/Tokyo".parse().unwrap();
        let west: Tz = "America/Los_Angeles".parse().unwrap();
        let out = Stamp::NoDate(NoDate::OutOfRange);
        // Year 0 after the conversion east of UTC; year 10000 west of it.
        assert_eq!(stamp(&json!("0001-01-01 00:00:00"), east).unwrap(), out);
        assert_eq!(stamp(&json!("0001-01-01"), east).unwrap(), out);
        assert_eq!(stamp(&json!("9999-12-31 23:00:00"), west).unwrap(), out);
        // The same texts the other way round are real instants.
        assert!(matches!(
            stamp(&json!("9999-12-31 23:00:00"), east).unwrap(),
            Stamp::At(_)
        ));
        assert!(matches!(
            stamp(&json!("0001-01-01 00:00:00"), west).unwrap(),
            Stamp::At(_)
        ));
        assert_eq!(
            stamp(&json!("0001-01-01T00:00:00+01:00"), Tz::UTC).unwrap(),
            out
        );
        assert_eq!(
            stamp(&json!("10000-01-01 00:00:00"), Tz::UTC).unwrap_or(out),
            out
        );
        // Every accepted instant lies in the representable range, whatever the zone.
        for tz in [east, west, Tz::UTC] {
            for text in [
                "0001-01-01 00:00:00",
                "9999-12-31 23:59:59.999",
                "0001-01-01T00:00:00Z",
            ] {
                if let Stamp::At(t) = stamp(&json!(text), tz).unwrap() {
                    assert!((FIRST_MILLIS..=LAST_MILLIS).contains(&t.timestamp_millis()));
                    let _ = t.with_timezone(&tz).date_naive();
                }
            }
        }
    }

    #[test]
    fn dst_changes_resolve_to_real_instants() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let at = |s: &str| parse_timestamp_str(s, tz).unwrap().instant();
        // 2024-03-31 02:30 does not exist in Berlin (02:00 → 03:00): shifted to 03:30 CEST.
        assert_eq!(at("2024-03-31 02:30:00"), Some(utc("2024-03-31T01:30:00Z")));
        // 2024-10-27 02:30 happens twice: the earlier one (CEST, UTC+2) is taken.
        assert_eq!(at("2024-10-27 02:30:00"), Some(utc("2024-10-27T00:30:00Z")));
        // Either side of the change keeps its own offset.
        assert_eq!(at("2024-10-27 04:00:00"), Some(utc("2024-10-27T03:00:00Z")));
        assert_eq!(at("2024-03-31 01:59:59"), Some(utc("2024-03-31T00:59:59Z")));
    }

    #[test]
    fn format_local_round_trips() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let t = utc("2024-07-01T12:00:00Z");
        let s = format_local(t, tz);
        assert_eq!(s, "2024-07-01 08:00:00");
        assert_eq!(parse_timestamp_str(&s, tz).unwrap(), Stamp::At(t));
    }

    #[test]
    fn instants_at_chrono_s_limits_are_errors_or_no_date_never_panics() {
        let east: Tz = "Asia/Tokyo".parse().unwrap();
        let west: Tz = "America/Los_Angeles".parse().unwrap();
        let max = DateTime::<Utc>::MAX_UTC.timestamp_millis();
        let min = DateTime::<Utc>::MIN_UTC.timestamp_millis();
        for tz in [east, west, Tz::UTC] {
            for millis in [max, max - 1, min, min + 1, i64::MAX, i64::MIN] {
                assert!(stamp(&json!(millis), tz).is_err(), "{millis}");
                assert!(stamp(&json!(millis.to_string()), tz).is_err(), "{millis}");
            }
            for text in [
                "+262142-12-31T23:59:59Z",
                "-262143-01-01T00:00:00Z",
                "262142-12-31 23:59:59",
                "-262143-01-01 00:00:00",
                "99999999999999999999999",
            ] {
                let read = stamp(&json!(text), tz);
                assert!(
                    matches!(read, Err(_) | Ok(Stamp::NoDate(NoDate::OutOfRange))),
                    "{text}: {read:?}"
                );
            }
        }
    }
}
