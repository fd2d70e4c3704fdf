//! Paged answers: the envelope, its name aliases, and per-record results.
//!
//! A page that is not JSON, or has no record array, is a bad *answer* (the caller retries it as
//! a truncated or garbled body). So is an answer that reports an error in its envelope though
//! it came with HTTP 200 (`"success": false`, `"status": "error"`, a non-empty `error` or
//! `errors` member, …, see [`envelope_error`]): it is never an empty page. A record inside a good page that its model cannot read is a
//! per-record [`RecordError`] carrying the record's JSON: the page's other records still arrive.
//! Records are read from the body's bytes without a JSON tree ([`super::raw`]), and each gets
//! its fingerprint while its fields are at hand.
//!
//! Bodies are taken as real CRMs send them ([`clean_body`]): gzip-compressed though not asked
//! (with or without `Content-Encoding`), after a UTF-8 byte-order mark, or in the Latin-1 their
//! `Content-Type` declares ([`decode_declared_charset`]). A record holding bytes
//! that are not UTF-8 (a Latin-1 name) is a [`RecordError`] of its own, its text kept with the
//! bad bytes replaced by U+FFFD and listed in hex in the reason; the page's other records are
//! read as usual (the check costs nothing on a clean page: it runs only after the fast parse
//! failed).

use std::fmt;

use chrono_tz::Tz;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use super::fingerprint::{fingerprint_fields_read, Reading};
use super::models::CrmRecord;
use super::raw::{Field, Fields};
use super::time::{kind_of, read_differently_than_before};

/// One record as read (`model`), its fingerprint and its JSON text as received.
#[derive(Debug, Clone)]
pub struct Record<T> {
    /// The parsed model.
    pub model: T,
    /// The fingerprint of the record's canonical JSON without the stream's volatile fields.
    pub fp: u64,
    /// The record's JSON text as received.
    pub raw: Box<str>,
}

impl<T> Record<T> {
    /// The record's JSON as a dead letter shows it: compact, keys sorted.
    pub fn normalized_json(&self) -> String {
        normalize(&self.raw)
    }
}

/// A record that could not be read, with its raw JSON and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unreadable record: {reason}")]
pub struct RecordError {
    /// Why the record could not be read (names the field at fault).
    pub reason: String,
    /// The record's JSON text (compact, keys sorted).
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
    /// The read sequence number taken when its request was first sent ([`next_read_seq`]; 0
    /// for a page not read by a pager): a page with a smaller number may show older versions
    /// than one with a larger number.
    pub sent: u64,
}

/// Returns a number larger than every one returned before in this process: the order in which
/// page requests were sent, so a page held back (read ahead, or by a paused sweep) is known
/// to be older than a later read of the same records.
pub fn next_read_seq() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Names the CRM may give the record array and the total (docs/crm-api.md, "Tolerance").
const DATA_KEYS: [&str; 4] = ["data", "records", "items", "result"];
const TOTAL_KEYS: [&str; 3] = ["total", "totalRecords", "totalCount"];

/// Why an answer body could not be made into text to parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Decompressed, it exceeds the size limit (a compression bomb, or a huge answer).
    TooLarge(String),
    /// Compressed in a way that cannot be read (truncated gzip, an unknown encoding).
    Garbled(String),
}

/// The UTF-8 byte-order mark some servers (IIS, .NET serializers) write before the JSON.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Makes an answer body ready to parse: decompresses it when it is gzip (by its magic bytes
/// `1f 8b`, whatever `Content-Encoding` says: some servers compress without saying so) or
/// deflate (`Content-Encoding: deflate`), at most `limit` bytes decompressed; then drops a
/// leading byte-order mark. An encoding ibstream cannot read (`br`, `zstd`) on a body that is
/// not plain JSON is [`BodyError::Garbled`].
pub fn clean_body(body: Vec<u8>, encoding: Option<&str>, limit: u64) -> Result<Vec<u8>, BodyError> {
    use std::io::Read;
    let encoding = encoding.map(|e| e.trim().to_ascii_lowercase());
    let inflate = |reader: &mut dyn Read, what: &str| -> Result<Vec<u8>, BodyError> {
        let mut out = Vec::new();
        reader
            .take(limit.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|e| BodyError::Garbled(format!("{what} body cannot be decompressed: {e}")))?;
        if out.len() as u64 > limit {
            return Err(BodyError::TooLarge(format!(
                "the {what} answer is larger than {limit} bytes decompressed"
            )));
        }
        Ok(out)
    };
    let mut body = if body.starts_with(&[0x1f, 0x8b]) {
        inflate(&mut flate2::read::MultiGzDecoder::new(&body[..]), "gzip")?
    } else {
        match encoding.as_deref() {
            Some("deflate") if !looks_like_text(&body) => {
                match inflate(&mut flate2::read::ZlibDecoder::new(&body[..]), "deflate") {
                    Ok(out) => out,
                    // Servers disagree on deflate: zlib-wrapped (the RFC) or raw.
                    Err(_) => {
                        inflate(&mut flate2::read::DeflateDecoder::new(&body[..]), "deflate")?
                    }
                }
            }
            Some(other)
                if !matches!(other, "identity" | "gzip" | "x-gzip" | "deflate")
                    && !looks_like_text(&body) =>
            {
                return Err(BodyError::Garbled(format!(
                    "the answer is compressed with {other:?}, which ibstream does not read"
                )));
            }
            // Labelled gzip without the magic bytes: a proxy decompressed it already.
            _ => body,
        }
    };
    if body.starts_with(BOM) {
        body.drain(..BOM.len());
    }
    Ok(body)
}

/// Decodes a body its `Content-Type` declares as Latin-1 or Windows-1252 (`charset=
/// iso-8859-1`, `latin1`, `windows-1252`, `cp1252`) into UTF-8, when it is not UTF-8 already
/// (servers often label UTF-8 as Latin-1). Any other body is returned as it is; its records
/// holding bytes that are not UTF-8 then fail alone in [`parse_page`].
pub fn decode_declared_charset(body: Vec<u8>, content_type: Option<&str>) -> Vec<u8> {
    let Some(charset) = content_type.and_then(|ct| {
        ct.split(';')
            .skip(1)
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("charset"))
            .map(|(_, v)| v.trim().trim_matches('"').to_ascii_lowercase())
    }) else {
        return body;
    };
    // WHATWG's encoding standard reads every one of these labels as Windows-1252.
    if !matches!(
        charset.as_str(),
        "iso-8859-1"
            | "iso8859-1"
            | "latin1"
            | "latin-1"
            | "l1"
            | "windows-1252"
            | "cp1252"
            | "x-cp1252"
    ) {
        return body;
    }
    if body.is_ascii() || std::str::from_utf8(&body).is_ok() {
        return body;
    }
    // A body holding UTF-8 characters too is UTF-8 with a few bad bytes, whatever the label:
    // decoding it as Windows-1252 would garble every other name; its bad records fail alone.
    let mut clean = body.clone();
    for range in invalid_utf8_ranges(&body) {
        clean[range].fill(b'?');
    }
    if !clean.is_ascii() {
        return body;
    }
    // Windows-1252's characters in 0x80..=0x9F (its five undefined ones stay C1 controls).
    const CP1252: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8D}', 'Ž',
        '\u{8F}', '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9D}',
        'ž', 'Ÿ',
    ];
    body.iter()
        .map(|&b| match b {
            0x80..=0x9F => CP1252[usize::from(b - 0x80)],
            _ => char::from(b),
        })
        .collect::<String>()
        .into_bytes()
}

/// Returns a body's first byte after a byte-order mark and ASCII whitespace (`None` for a
/// blank body): what tells JSON, HTML and compressed bytes apart.
pub(super) fn first_significant_byte(body: &[u8]) -> Option<u8> {
    let body = body.strip_prefix(BOM).unwrap_or(body);
    body.iter().copied().find(|b| !b.is_ascii_whitespace())
}

/// Whether a body starts like JSON or text (after a byte-order mark and whitespace).
fn looks_like_text(body: &[u8]) -> bool {
    first_significant_byte(body).is_none_or(|b| matches!(b, b'{' | b'[' | b'<' | b'"'))
}

/// Parses a paged answer; `volatile` fields are left out of the fingerprints. `Err` means the
/// answer as a whole is unusable. A leading byte-order mark is skipped; records holding bytes
/// that are not UTF-8 fail alone.
pub fn parse_page<T: CrmRecord>(
    body: &[u8],
    page: u32,
    page_size: u32,
    tz: Tz,
    volatile: &[String],
) -> Result<Page<T>, String> {
    let body = body.strip_prefix(BOM).unwrap_or(body);
    match parse_utf8_page(body, page, page_size, tz, volatile) {
        // serde_json rejects a body with a byte that is not UTF-8 anywhere in it.
        Err(_) if std::str::from_utf8(body).is_err() => {
            parse_non_utf8_page(body, page, page_size, tz, volatile)
        }
        parsed => parsed,
    }
}

/// Parses a page whose body holds bytes that are not UTF-8: each such byte is read as `?`
/// (an ASCII byte, so offsets stay put and a bad byte outside strings still breaks the
/// JSON), and every record that held one becomes a [`RecordError`] with its text as received
/// (bad bytes as U+FFFD) and the bad bytes named.
fn parse_non_utf8_page<T: CrmRecord>(
    body: &[u8],
    page: u32,
    page_size: u32,
    tz: Tz,
    volatile: &[String],
) -> Result<Page<T>, String> {
    let bad = invalid_utf8_ranges(body);
    let mut clean = body.to_vec();
    for range in &bad {
        clean[range.clone()].fill(b'?');
    }
    let mut parsed = parse_utf8_page::<T>(&clean, page, page_size, tz, volatile)?;
    // The records are in body order; so are the bad ranges.
    let base = clean.as_ptr() as usize;
    let items = split_items(&clean).map_err(|e| format!("answer is not JSON: {e}"))?;
    for (record, item) in parsed.records.iter_mut().zip(items) {
        let start = item.get().as_ptr() as usize - base;
        let end = start + item.get().len();
        let inside: Vec<_> = bad
            .iter()
            .filter(|r| r.start < end && r.end > start)
            .collect();
        if inside.is_empty() {
            continue;
        }
        let field = field_at(item.get(), inside[0].start.saturating_sub(start));
        let bytes: Vec<String> = inside
            .iter()
            .take(8)
            .map(|r| {
                let hex: Vec<String> = body[(*r).clone()]
                    .iter()
                    .map(|b| format!("{b:02X}"))
                    .collect();
                format!(
                    "0x{} at byte {}",
                    hex.join(""),
                    r.start.saturating_sub(start)
                )
            })
            .collect();
        let more = if inside.len() > 8 { ", …" } else { "" };
        *record = Err(RecordError {
            reason: format!(
                "{field} holds bytes that are not UTF-8 ({}{more}; the raw text shows each as U+FFFD)",
                bytes.join(", ")
            ),
            raw: normalize(&String::from_utf8_lossy(&body[start..end])),
        });
    }
    Ok(parsed)
}

/// The byte ranges of `body` that are not UTF-8, in order.
fn invalid_utf8_ranges(body: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        match std::str::from_utf8(&body[at..]) {
            Ok(_) => break,
            Err(e) => {
                let start = at + e.valid_up_to();
                let len = e.error_len().unwrap_or(body.len() - start);
                out.push(start..start + len);
                at = start + len;
            }
        }
    }
    out
}

/// Names the field of a record's JSON text whose key or value holds byte `offset`.
fn field_at(text: &str, offset: usize) -> String {
    let Ok(fields) = Fields::parse(text) else {
        return "the record".to_owned();
    };
    let base = text.as_ptr() as usize;
    let holds = |s: &str| {
        let start = s.as_ptr() as usize - base;
        (start..=start + s.len()).contains(&offset)
    };
    for (key, value) in fields.iter() {
        let in_text = |s: &str| {
            let p = s.as_ptr() as usize;
            p >= base && p <= base + text.len() && holds(s)
        };
        let hit = in_text(key)
            || match value {
                Field::String(std::borrow::Cow::Borrowed(s)) => in_text(s),
                Field::String(std::borrow::Cow::Owned(_)) => false,
                Field::Nested(raw) => in_text(raw.get()),
                _ => false,
            };
        if hit {
            return format!("`{key}`");
        }
    }
    "the record".to_owned()
}

/// The record array of a paged answer (envelope or bare array), as [`parse_page`] finds it.
fn split_items(body: &[u8]) -> Result<Vec<&RawValue>, serde_json::Error> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {
            let envelope: Envelope = serde_json::from_slice(body)?;
            Ok(envelope
                .data
                .into_iter()
                .find_map(|d| match d {
                    Data::Items(items) => Some(items),
                    _ => None,
                })
                .unwrap_or_default())
        }
        _ => serde_json::from_slice::<Vec<&RawValue>>(body),
    }
}

/// Parses a paged answer that is UTF-8 (the fast path).
fn parse_utf8_page<T: CrmRecord>(
    body: &[u8],
    page: u32,
    page_size: u32,
    tz: Tz,
    volatile: &[String],
) -> Result<Page<T>, String> {
    let not_json = |e: serde_json::Error| format!("answer is not JSON: {e}");
    let (items, total) = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => (
            serde_json::from_slice::<Vec<&RawValue>>(body).map_err(not_json)?,
            None,
        ),
        Some(b'{') => {
            let envelope: Envelope = serde_json::from_slice(body).map_err(not_json)?;
            let items = envelope
                .data
                .into_iter()
                .zip(DATA_KEYS)
                .find_map(|(data, k)| match data {
                    Data::Items(items) => Some(Ok(items)),
                    Data::Missing => None,
                    Data::Other(kind) => Some(Err(format!("`{k}` is {kind}, not an array"))),
                })
                .transpose()?;
            let total = envelope
                .totals
                .iter()
                .find_map(|t| t.as_ref().filter(|v| !v.is_null()))
                .map(parse_count)
                .transpose()?;
            if let Some(error) = &envelope.error {
                // A "not found" status beside an explicit total of 0, no records and a
                // message saying so is how some APIs (Laravel's) answer an empty result.
                let no_records = envelope.only_not_found
                    && total == Some(0)
                    && items.as_ref().is_none_or(Vec::is_empty)
                    && envelope.message.as_deref().is_some_and(says_no_records);
                if !no_records {
                    return Err(error_reason(error, envelope.message.as_deref()));
                }
            }
            match items {
                Some(items) => (items, total),
                // An empty result may come without the array at all, but only with a total of 0.
                None if total == Some(0) => (Vec::new(), total),
                None => return Err("answer has no data/records/items/result array".to_owned()),
            }
        }
        _ => {
            let other: Value = serde_json::from_slice(body).map_err(not_json)?;
            return Err(format!("answer is {}, not an object", kind_of(&other)));
        }
    };
    let mut buffer = Vec::with_capacity(1024);
    let records = items
        .into_iter()
        .map(|item| read_text(item.get(), tz, volatile, &mut buffer))
        .collect();
    Ok(Page {
        page,
        page_size,
        total,
        records,
        sent: 0,
    })
}

/// Reads one record's JSON text into its model and fingerprint, or a [`RecordError`].
pub fn read_text<T: CrmRecord>(
    text: &str,
    tz: Tz,
    volatile: &[String],
    buffer: &mut Vec<u8>,
) -> Result<Record<T>, RecordError> {
    let fields = match text.as_bytes().first() {
        Some(b'{') => Fields::parse(text).map_err(|e| RecordError {
            reason: format!("unreadable record: {e}"),
            raw: normalize(text),
        })?,
        _ => {
            let kind = serde_json::from_str::<Value>(text).map_or("not JSON", |v| kind_of(&v));
            return Err(RecordError {
                reason: format!("record is {kind}, not an object"),
                raw: normalize(text),
            });
        }
    };
    match T::from_fields(&fields, tz) {
        Ok(model) => Ok(Record {
            model,
            fp: fingerprint_fields_read(
                &fields,
                volatile,
                reading::<T>(&fields, tz, volatile),
                buffer,
            ),
            raw: text.into(),
        }),
        Err(reason) => Err(RecordError {
            reason,
            raw: normalize(text),
        }),
    }
}

/// Returns whether a record holds a date (of its model's [`CrmRecord::DATE_FIELDS`], not
/// volatile) that releases before issue 15 read differently: its fingerprint is marked.
fn reading<T: CrmRecord>(fields: &Fields<'_>, tz: Tz, volatile: &[String]) -> Reading {
    let changed = fields.iter().any(|(key, value)| {
        T::DATE_FIELDS.contains(&key)
            && !volatile.iter().any(|v| v == key)
            && read_differently_than_before(value, tz)
    });
    if changed {
        Reading::Changed
    } else {
        Reading::AsBefore
    }
}

/// Reads one record value (fingerprint without volatile fields), as [`read_text`] does.
pub fn read_record<T: CrmRecord>(item: Value, tz: Tz) -> Result<Record<T>, RecordError> {
    read_text(&item.to_string(), tz, &[], &mut Vec::new())
}

/// JSON text as serde_json writes its value: compact, object keys sorted.
fn normalize(text: &str) -> String {
    serde_json::from_str::<Value>(text).map_or_else(|_| text.to_owned(), |v| v.to_string())
}

fn parse_count(value: &Field<'_>) -> Result<u64, String> {
    match value {
        Field::Number(n) => n.parse().map_err(|_| format!("total is not a count: {n}")),
        Field::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("total is not a count: {s:?}")),
        other => Err(format!("total is {}", other.kind())),
    }
}

/// Keys of an envelope's members that tell success or failure (compared ignoring case).
/// `result` tells it too when it is not the record array (see [`envelope_error`]).
const STATUS_KEYS: [&str; 22] = [
    "success",
    "isSuccess",
    "succeeded",
    "ok",
    "status",
    "statusCode",
    "status_code",
    "code",
    "error",
    "errors",
    "errorMessage",
    "error_message",
    "errorCode",
    "error_code",
    "hasErrors",
    "has_errors",
    "hasError",
    "has_error",
    "isError",
    "is_error",
    "failed",
    "message",
];

/// Words that mean "no error" where an error or a status is expected (lower case).
const NO_ERROR_WORDS: [&str; 10] = [
    "",
    "0",
    "false",
    "no",
    "none",
    "null",
    "ok",
    "success",
    "succeeded",
    "true",
];

/// Words of a `status` or `result` that mean the call failed (lower case).
const ERROR_WORDS: [&str; 8] = [
    "error",
    "errored",
    "fail",
    "failed",
    "failure",
    "ko",
    "false",
    "exception",
];

/// Keys of a code that tells success (0, 2xx) or failure (compared ignoring case).
const CODE_KEYS: [&str; 6] = [
    "code",
    "status",
    "statusCode",
    "status_code",
    "errorCode",
    "error_code",
];

/// Returns whether a message says the query found nothing ("No records found", "no data",
/// "No results found.").
fn says_no_records(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    [
        "no record",
        "no data",
        "no result",
        "no item",
        "no entr",
        "no match",
        "nothing found",
        "records not found",
        "record not found",
        "data not found",
    ]
    .iter()
    .any(|words| lower.contains(words))
}

fn is_status_key(key: &str) -> bool {
    STATUS_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// Returns whether a code says success: 0, a 2xx, or a success word (`ok`, `success`, …).
fn code_says_success(word: &str) -> bool {
    match word.parse::<f64>() {
        Ok(code) => code == 0.0 || (200.0..300.0).contains(&code),
        Err(_) => matches!(word, "ok" | "success" | "succeeded" | "true"),
    }
}

/// Returns whether an `error` / `errors` object says there is no error after all
/// (`{"code": 0, "message": "OK"}`, `{"status": 200}`, `{"message": "Success"}`, `{}`): a
/// code member of 0, a 2xx or a success word, or, without one, a message that is a success
/// word.
fn object_says_no_error(text: &str) -> bool {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    let word = |v: &Value| match v {
        Value::String(s) => Some(s.trim().to_ascii_lowercase()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let code = map
        .iter()
        .find(|(k, _)| CODE_KEYS.iter().any(|c| c.eq_ignore_ascii_case(k)))
        .map(|(_, v)| v);
    match code {
        Some(code) => word(code).is_some_and(|w| code_says_success(&w)),
        None => map
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("message"))
            .map_or(map.is_empty(), |(_, v)| {
                word(v).is_some_and(|w| matches!(w.as_str(), "ok" | "success" | "succeeded"))
            }),
    }
}

/// Returns `key: value` when an envelope member reports that the call failed, as REST APIs
/// write it beside HTTP 200 (the source of the rule: issue 15, item 6 and its review, and the
/// shapes of common CRM and REST APIs: PHP/Laravel, .NET, JSON-RPC-like):
/// - `success` / `isSuccess` / `succeeded` / `ok` false: `false`, `"false"`, `0`, `"0"`, `"no"`;
/// - `status` or `result` (when `result` is not the record array) false or an error word
///   (`false`, `error`, `fail`, `failed`, `failure`, `ko`, `exception`, as a boolean or
///   text), or (`status` only) an HTTP error code (400 to 599, as a number or text);
///   `statusCode` / `status_code` / `code` an HTTP error code;
/// - `errorCode` / `error_code` set to anything but `null`, `false`, `""`, 0, a 2xx or a
///   success word;
/// - `error` / `errors` / `errorMessage` / `error_message` present and not empty (`null`,
///   `false`, `""`, `[]`, `{}`, 0, a 2xx code, the words `0`, `false`, `no`, `none`, `null`,
///   `ok`, `success`, `succeeded`, `true`, and an object whose code is 0, a 2xx or a success
///   word, or without a code whose message is `OK` / `Success`, mean no error);
/// - `isError` / `is_error` / `hasError` / `has_error` / `hasErrors` / `has_errors` /
///   `failed` true (`true`, `"true"`, `1`, `"yes"`).
///
/// Keys are compared ignoring case (`Success`, `Errors` of .NET APIs).
pub fn envelope_error(key: &str, value: &Field<'_>, raw: &str) -> Option<String> {
    let is = |k: &str| key.eq_ignore_ascii_case(k);
    let word = |value: &Field<'_>| match value {
        Field::String(s) => Some(s.trim().to_ascii_lowercase()),
        Field::Number(n) => Some((*n).to_owned()),
        Field::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let failed = if is("success") || is("isSuccess") || is("succeeded") || is("ok") {
        word(value).is_some_and(|w| matches!(w.as_str(), "false" | "0" | "no"))
    } else if is("status") {
        word(value).is_some_and(|w| {
            ERROR_WORDS.contains(&w.as_str())
                || w.parse::<u16>()
                    .is_ok_and(|code| (400..=599).contains(&code))
        })
    } else if is("result") {
        word(value).is_some_and(|w| ERROR_WORDS.contains(&w.as_str()))
    } else if is("statusCode") || is("status_code") || is("code") {
        word(value).is_some_and(|w| w.parse::<u16>().is_ok_and(|c| (400..=599).contains(&c)))
    } else if is("errorCode") || is("error_code") {
        match value {
            Field::Null | Field::Bool(false) => false,
            Field::Nested(_) => false,
            _ => word(value).is_some_and(|w| !w.is_empty() && !code_says_success(&w)),
        }
    } else if is("error") || is("errors") || is("errorMessage") || is("error_message") {
        match value {
            Field::Null | Field::Bool(false) => false,
            Field::String(s) => {
                let w = s.trim().to_ascii_lowercase();
                !NO_ERROR_WORDS.contains(&w.as_str()) && !code_says_success(&w)
            }
            Field::Number(n) => !code_says_success(n),
            Field::Nested(raw) => {
                let inner: String = raw.get().chars().filter(|c| !c.is_whitespace()).collect();
                inner != "[]" && inner != "{}" && !object_says_no_error(raw.get())
            }
            Field::Bool(true) => true,
        }
    } else if is("hasErrors")
        || is("has_errors")
        || is("hasError")
        || is("has_error")
        || is("isError")
        || is("is_error")
        || is("failed")
    {
        word(value).is_some_and(|w| matches!(w.as_str(), "true" | "1" | "yes"))
    } else {
        false
    };
    failed.then(|| format!("{key}: {}", clip(raw)))
}

/// Returns whether an envelope member that failed ([`envelope_error`]) is a "not found" code
/// (404), which with an explicit total of 0 and no records is an empty result.
fn is_not_found(key: &str, value: &Field<'_>) -> bool {
    let code = match value {
        Field::Number(n) => n,
        Field::String(s) => s.trim(),
        _ => return false,
    };
    CODE_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key)) && code == "404"
}

/// Returns the reason when a JSON object answer reports an error in its members (as
/// [`envelope_error`] tells), naming them and its `message`.
pub fn object_error(map: &serde_json::Map<String, Value>) -> Option<String> {
    let message = map
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("message"))
        .map(|(_, v)| v.as_str().map_or_else(|| v.to_string(), str::to_owned));
    map.iter()
        .filter(|(k, v)| is_status_key(k) || (k.eq_ignore_ascii_case("result") && !v.is_array()))
        .find_map(|(key, value)| {
            let text = value.to_string();
            let raw = serde_json::from_str::<&RawValue>(&text).ok()?;
            let field = Field::from_raw(raw).ok()?;
            let error = envelope_error(key, &field, &text)?;
            Some(error_reason(&error, message.as_deref()))
        })
}

/// The reason of an answer that reports an error.
fn error_reason(error: &str, message: Option<&str>) -> String {
    match message {
        Some(message) if !message.is_empty() => format!(
            "the answer reports an error though its HTTP status is a success ({error}; message: {})",
            clip(message)
        ),
        _ => format!("the answer reports an error though its HTTP status is a success ({error})"),
    }
}

/// A field's text: a string's content, else its JSON.
fn text_of(field: &Field<'_>, raw: &RawValue) -> String {
    match field {
        Field::String(s) => s.to_string(),
        _ => raw.get().to_owned(),
    }
}

/// At most 200 characters of `text`, on one line.
fn clip(text: &str) -> String {
    const MAX: usize = 200;
    let mut out: String = text
        .chars()
        .take(MAX)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// The envelope of a paged answer: its record arrays and totals under every alias (the last
/// of a key given twice counts); everything else is skipped unread.
struct Envelope<'a> {
    data: [Data<'a>; 4],
    totals: [Option<Field<'a>>; 3],
    /// The first member that reports an error, as `key: value`.
    error: Option<String>,
    /// Whether every member that reports an error is a 404 code ([`is_not_found`]).
    only_not_found: bool,
    /// The `message` member's text, if any (for the error's reason).
    message: Option<String>,
}

/// What an alias of the record array holds.
#[derive(Default)]
enum Data<'a> {
    #[default]
    Missing,
    Items(Vec<&'a RawValue>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor;
        impl<'de> Visitor<'de> for EnvelopeVisitor {
            type Value = Envelope<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Envelope<'de>, M::Error> {
                let mut envelope = Envelope {
                    data: Default::default(),
                    totals: Default::default(),
                    error: None,
                    only_not_found: true,
                    message: None,
                };
                let mut failed = |key: &str, field: &Field<'_>, raw: &RawValue| {
                    if let Some(error) = envelope_error(key, field, raw.get()) {
                        envelope.only_not_found &= is_not_found(key, field);
                        envelope.error.get_or_insert(error);
                    }
                };
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key.eq_ignore_ascii_case("result") {
                        // The record array, or (`"result": "error"`) a status.
                        let raw: &'de RawValue = map.next_value()?;
                        let field = Field::from_raw(raw).map_err(serde::de::Error::custom)?;
                        failed(&key, &field, raw);
                        // A boolean or a word is a status, never a record array.
                        let status = matches!(field, Field::Bool(_) | Field::String(_));
                        if key == "result" && !status {
                            envelope.data[3] = serde_json::from_str(raw.get())
                                .map_err(serde::de::Error::custom)?;
                        }
                    } else if let Some(i) = DATA_KEYS.iter().position(|k| *k == key) {
                        envelope.data[i] = map.next_value()?;
                    } else if let Some(i) = TOTAL_KEYS.iter().position(|k| *k == key) {
                        let raw: &'de RawValue = map.next_value()?;
                        envelope.totals[i] =
                            Some(Field::from_raw(raw).map_err(serde::de::Error::custom)?);
                    } else if is_status_key(&key) {
                        let raw: &'de RawValue = map.next_value()?;
                        let field = Field::from_raw(raw).map_err(serde::de::Error::custom)?;
                        if key.eq_ignore_ascii_case("message") {
                            envelope.message = Some(text_of(&field, raw));
                        } else {
                            failed(&key, &field, raw);
                        }
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(envelope)
            }
        }
        deserializer.deserialize_map(EnvelopeVisitor)
    }
}

impl<'de> Deserialize<'de> for Data<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DataVisitor;
        impl<'de> Visitor<'de> for DataVisitor {
            type Value = Data<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Data<'de>, S::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(256));
                while let Some(item) = seq.next_element::<&'de RawValue>()? {
                    items.push(item);
                }
                Ok(Data::Items(items))
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Data<'de>, M::Error> {
                // Under `arbitrary_precision` a number arrives as a one-entry map.
                let mut kind = "an object";
                if let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "$serde_json::private::Number" {
                        kind = "a number";
                    }
                    map.next_value::<IgnoredAny>()?;
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                }
                Ok(Data::Other(kind))
            }

            fn visit_unit<E>(self) -> Result<Data<'de>, E> {
                Ok(Data::Missing)
            }

            fn visit_bool<E>(self, _: bool) -> Result<Data<'de>, E> {
                Ok(Data::Other("a boolean"))
            }

            fn visit_str<E>(self, _: &str) -> Result<Data<'de>, E> {
                Ok(Data::Other("a string"))
            }

            fn visit_u64<E>(self, _: u64) -> Result<Data<'de>, E> {
                Ok(Data::Other("a number"))
            }

            fn visit_i64<E>(self, _: i64) -> Result<Data<'de>, E> {
                Ok(Data::Other("a number"))
            }

            fn visit_f64<E>(self, _: f64) -> Result<Data<'de>, E> {
                Ok(Data::Other("a number"))
            }
        }
        deserializer.deserialize_any(DataVisitor)
    }
}

/// Parses the servers answer: `{"mt4": [{...}], "mt5": [...]}` grouped by platform, or a flat
/// array of servers (optionally inside a `data` envelope).
pub fn parse_servers<T: CrmRecord>(
    body: &[u8],
    tz: Tz,
    volatile: &[String],
) -> Result<Vec<Result<Record<T>, RecordError>>, String> {
    let body = body.strip_prefix(BOM).unwrap_or(body);
    // A body with bytes that are not UTF-8 is read with each as U+FFFD; the servers that
    // held one fail alone.
    let not_utf8 = std::str::from_utf8(body).is_err();
    let read = |item: Value| {
        let text = item.to_string();
        if not_utf8 && text.contains('\u{FFFD}') {
            return Err(RecordError {
                reason: "the server holds bytes that are not UTF-8 (shown as U+FFFD)".to_owned(),
                raw: text,
            });
        }
        read_text(&text, tz, volatile, &mut Vec::new())
    };
    let value: Value = if not_utf8 {
        serde_json::from_str(&String::from_utf8_lossy(body))
    } else {
        serde_json::from_slice(body)
    }
    .map_err(|e| format!("answer is not JSON: {e}"))?;
    let mut out = Vec::new();
    match value {
        Value::Array(items) => out.extend(items.into_iter().map(read)),
        Value::Object(mut map) => {
            if let Some(reason) = object_error(&map) {
                return Err(reason);
            }
            if let Some(Value::Array(items)) = DATA_KEYS.iter().find_map(|k| map.remove(*k)) {
                out.extend(items.into_iter().map(read));
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
                        read(item)
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
            let page = parse_page::<Lead>(body.as_bytes(), 1, 2, Tz::UTC, &[]).unwrap();
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
        let page = parse_page::<Lead>(body, 1, 1000, Tz::UTC, &[]).unwrap();
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
            parse_page::<Lead>(br#"{"total": 3, "data": [{"id": 1}"#, 1, 1000, Tz::UTC, &[])
                .is_err()
        );
        assert!(parse_page::<Lead>(br#"{"total": 3}"#, 1, 1000, Tz::UTC, &[]).is_err());
        assert!(parse_page::<Lead>(br#"{"data": {}}"#, 1, 1000, Tz::UTC, &[]).is_err());
        assert!(parse_page::<Lead>(b"<html>502</html>", 1, 1000, Tz::UTC, &[]).is_err());
        let empty = parse_page::<Lead>(br#"{"total": 0}"#, 1, 1000, Tz::UTC, &[]).unwrap();
        assert!(empty.records.is_empty());
    }

    #[test]
    fn servers_grouped_by_platform() {
        let body = br#"{"mt4": [{"id": "mt4-live-01", "name": "MT4 Live 1", "type": "live"},
                                 {"id": "mt4-demo-01", "name": "MT4 Demo", "type": "demo"}],
                        "mt5": [{"id": "mt5-live-02", "name": "MT5 Live 2", "type": "live"}]}"#;
        let servers: Vec<Server> = parse_servers::<Server>(body, Tz::UTC, &[])
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

    #[test]
    fn an_answer_reporting_an_error_is_never_a_page() {
        for body in [
            r#"{"success": false, "message": "Service temporarily unavailable", "data": []}"#,
            r#"{"data": [], "success": false}"#,
            r#"{"success": "false", "data": []}"#,
            r#"{"Success": "FALSE", "Data": [], "total": 0}"#,
            r#"{"isSuccess": 0, "data": [{"id": 1}], "total": 1}"#,
            r#"{"ok": false, "data": []}"#,
            r#"{"status": "error", "message": "db down", "data": [], "total": 0}"#,
            r#"{"status": "Failed", "total": 0}"#,
            r#"{"status": 503, "data": []}"#,
            r#"{"status": "500", "data": []}"#,
            r#"{"error": {"code": 503, "message": "unavailable"}, "total": 0}"#,
            r#"{"error": "timeout", "data": []}"#,
            r#"{"errors": [{"message": "shard failed"}], "data": [{"id": 1}], "total": 1}"#,
            r#"{"Errors": ["x"], "data": []}"#,
            r#"{"errorMessage": "try later", "data": []}"#,
            r#"{"hasErrors": true, "data": []}"#,
            r#"{"error": true, "data": []}"#,
            r#"{"statusCode": 500, "message": "Internal", "data": []}"#,
            r#"{"code": "503", "data": []}"#,
            // PHP/Laravel, .NET and JSON-RPC-like shapes (the review of issue 15, item 6).
            r#"{"status": false, "data": []}"#,
            r#"{"status": "false", "data": [], "total": 0}"#,
            r#"{"Status": "FALSE", "total": 0}"#,
            r#"{"status": "exception", "data": []}"#,
            r#"{"isError": true, "data": []}"#,
            r#"{"is_error": "1", "data": []}"#,
            r#"{"hasError": true, "data": []}"#,
            r#"{"has_error": "yes", "data": []}"#,
            r#"{"has_errors": 1, "data": []}"#,
            r#"{"failed": true, "data": []}"#,
            r#"{"errorCode": 503, "data": []}"#,
            r#"{"error_code": "E_DB_DOWN", "data": [], "total": 0}"#,
            r#"{"ErrorCode": "500", "data": []}"#,
            r#"{"error_message": "try later", "data": []}"#,
            r#"{"result": "error", "data": []}"#,
            r#"{"data": [], "result": "fail", "message": "db down"}"#,
            r#"{"result": "Failed", "records": [], "total": 0}"#,
            r#"{"result": false, "data": []}"#,
            r#"{"Result": "error", "data": []}"#,
            r#"{"error": {"code": 500, "message": "OK"}, "data": []}"#,
            r#"{"error": {"message": "db down"}, "data": []}"#,
            r#"{"error": 503, "data": []}"#,
            // A "not found" that is not an empty result: no total, data, another error, or
            // a message that is not "no records".
            r#"{"status": 404, "data": []}"#,
            r#"{"status": 404, "message": "No records found", "data": []}"#,
            r#"{"status": 404, "message": "Route not found", "data": [], "total": 0}"#,
            r#"{"status": 404, "message": "No records found", "data": [{"id": 1}], "total": 0}"#,
            r#"{"status": 404, "success": false, "message": "No records found", "data": [], "total": 0}"#,
            r#"{"status": 404, "message": "No records found", "data": [], "total": 3}"#,
        ] {
            let err = parse_page::<Lead>(body.as_bytes(), 1, 1000, Tz::UTC, &[]).expect_err(body);
            assert!(err.contains("reports an error"), "{body}: {err}");
        }
        let err = parse_page::<Lead>(
            br#"{"success": false, "message": "Service temporarily unavailable", "data": []}"#,
            1,
            1000,
            Tz::UTC,
            &[],
        )
        .unwrap_err();
        assert!(err.contains("Service temporarily unavailable"), "{err}");
    }

    #[test]
    fn an_answer_reporting_success_is_a_page() {
        for body in [
            r#"{"success": true, "data": [], "total": 0}"#,
            r#"{"success": "true", "ok": 1, "data": []}"#,
            r#"{"status": "ok", "data": []}"#,
            r#"{"status": 200, "data": []}"#,
            r#"{"status": "success", "data": []}"#,
            r#"{"error": null, "errors": [], "data": []}"#,
            r#"{"error": "", "errors": {}, "errorMessage": null, "data": []}"#,
            r#"{"error": false, "hasErrors": false, "data": []}"#,
            r#"{"message": "OK", "data": []}"#,
            r#"{"error": "0", "errors": "none", "errorMessage": "false", "data": []}"#,
            r#"{"code": 0, "statusCode": 200, "data": []}"#,
            r#"{"code": "OK", "data": []}"#,
            // Success said in the shapes of the review of issue 15, item 6.
            r#"{"error": {"code": 0, "message": "OK"}, "data": []}"#,
            r#"{"error": {"code": "200", "message": "fine"}, "data": []}"#,
            r#"{"errors": {"status": 204}, "data": []}"#,
            r#"{"error": {"message": "Success"}, "data": []}"#,
            r#"{"error": "Success", "data": []}"#,
            r#"{"error": "succeeded", "errorMessage": "OK", "error_message": "", "data": []}"#,
            r#"{"error": 0, "errors": 200, "data": []}"#,
            r#"{"status": true, "data": []}"#,
            r#"{"status": "true", "data": []}"#,
            r#"{"status": "SUCCESS", "data": []}"#,
            r#"{"isError": false, "hasError": 0, "is_error": "false", "has_errors": "0", "data": []}"#,
            r#"{"failed": 0, "data": []}"#,
            r#"{"errorCode": 0, "error_code": "", "data": []}"#,
            r#"{"errorCode": null, "data": []}"#,
            r#"{"errorCode": "200", "data": []}"#,
            r#"{"errorCode": "OK", "data": []}"#,
            r#"{"result": "ok", "data": []}"#,
            r#"{"result": "success", "records": []}"#,
            r#"{"result": true, "data": []}"#,
            r#"{"result": "SUCCESS", "total": 0}"#,
            // "No records" as a 404 beside an explicit total of 0: an empty result.
            r#"{"status": 404, "message": "No records found", "data": [], "total": 0}"#,
            r#"{"statusCode": "404", "message": "no data", "total": 0}"#,
            r#"{"code": 404, "message": "No results found.", "items": [], "totalCount": "0"}"#,
        ] {
            let page = parse_page::<Lead>(body.as_bytes(), 1, 1000, Tz::UTC, &[]);
            assert!(page.is_ok(), "{body}: {:?}", page.err());
        }
        // `result` is still the record array when it is one.
        let page =
            parse_page::<Lead>(br#"{"result": [{"id": 7}]}"#, 1, 1000, Tz::UTC, &[]).unwrap();
        assert_eq!(page.records.len(), 1);
    }

    #[test]
    fn a_servers_answer_reporting_an_error_is_not_a_list() {
        for body in [
            r#"{"success": false, "message": "Service temporarily unavailable", "data": []}"#,
            r#"{"status": "error", "mt4": []}"#,
            r#"{"errors": ["x"]}"#,
            r#"{"status": false, "mt4": []}"#,
            r#"{"isError": true}"#,
            r#"{"result": "error", "mt4": []}"#,
            r#"{"errorCode": 503}"#,
        ] {
            let err = parse_servers::<Server>(body.as_bytes(), Tz::UTC, &[]).expect_err(body);
            assert!(err.contains("reports an error"), "{body}: {err}");
        }
        let err = parse_servers::<Server>(
            br#"{"success": false, "message": "Service temporarily unavailable"}"#,
            Tz::UTC,
            &[],
        )
        .unwrap_err();
        assert!(err.contains("Service temporarily unavailable"), "{err}");
        for body in [
            r#"{"success": true, "mt4": []}"#,
            r#"{"error": {"code": 0, "message": "OK"}, "mt4": []}"#,
            r#"{"error": "Success", "result": "ok", "mt4": []}"#,
        ] {
            let servers = parse_servers::<Server>(body.as_bytes(), Tz::UTC, &[]);
            assert!(servers.is_ok(), "{body}: {:?}", servers.err());
        }
    }

    fn gzip(body: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(body).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn bodies_are_decompressed_and_lose_their_byte_order_mark() {
        let json = br#"{"total": 1, "data": [{"id": 1, "firstName": "Zo\u00eb"}]}"#.to_vec();
        let with_bom = [BOM, &json[..]].concat();
        for (body, encoding) in [
            (json.clone(), None),
            (with_bom.clone(), None),
            (gzip(&json), Some("gzip")),
            // Compressed though the header does not say so.
            (gzip(&json), None),
            (gzip(&with_bom), Some("x-gzip")),
            (gzip(&json), Some("identity")),
            // Labelled but already decompressed on the way.
            (json.clone(), Some("gzip")),
            (json.clone(), Some("br")),
        ] {
            let clean = clean_body(body, encoding, 1 << 20).unwrap();
            assert_eq!(clean, json, "{encoding:?}");
            let page = parse_page::<Lead>(&clean, 1, 1000, Tz::UTC, &[]).unwrap();
            assert_eq!(page.records.len(), 1);
        }
        // parse_page skips a byte-order mark itself too.
        let page = parse_page::<Lead>(&with_bom, 1, 1000, Tz::UTC, &[]).unwrap();
        assert_eq!(page.records[0].as_ref().unwrap().model.id, Some(1));
        // Deflate, zlib-wrapped or raw.
        use std::io::Write;
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(&json).unwrap();
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(&json).unwrap();
        for body in [zlib.finish().unwrap(), raw.finish().unwrap()] {
            assert_eq!(clean_body(body, Some("deflate"), 1 << 20).unwrap(), json);
        }
    }

    #[test]
    fn bodies_that_cannot_be_decompressed_are_errors() {
        let json = br#"{"total": 0, "data": []}"#;
        let mut truncated = gzip(json);
        truncated.truncate(truncated.len() / 2);
        assert!(matches!(
            clean_body(truncated, Some("gzip"), 1 << 20),
            Err(BodyError::Garbled(_))
        ));
        // A compression bomb stops at the limit.
        let big = vec![b' '; 100_000];
        assert!(matches!(
            clean_body(gzip(&big), None, 10_000),
            Err(BodyError::TooLarge(_))
        ));
        assert!(matches!(
            clean_body(vec![0x28, 0xb5, 0x2f, 0xfd, 0, 1], Some("zstd"), 1 << 20),
            Err(BodyError::Garbled(m)) if m.contains("zstd")
        ));
    }

    #[test]
    fn a_record_with_bytes_that_are_not_utf8_fails_alone() {
        let mut body = br#"{"total": 4, "message": "caf"#.to_vec();
        body.push(0xE9); // not a record: ignored
        body.extend_from_slice(
            br#"", "data": [{"id": 1, "firstName": "Ann"}, {"id": 2, "firstName": "Ren"#,
        );
        body.push(0xE9); // Latin-1 é
        body.extend_from_slice(br#"e", "lastName": "D"#);
        body.extend_from_slice(&[0xC3, 0x28]); // a broken two-byte sequence
        body.extend_from_slice(br#""}, {"id": 3, "firstName": "Zo\u00eb", "city": "K"#);
        body.extend_from_slice("ö".as_bytes());
        body.extend_from_slice(br#"ln"}, {"id": 4, "firstName": "Bo"#);
        body.extend_from_slice(&[0xFF]);
        body.extend_from_slice(br#""}]}"#);
        assert!(std::str::from_utf8(&body).is_err());
        let page = parse_page::<Lead>(&body, 1, 1000, Tz::UTC, &[]).unwrap();
        assert_eq!(page.total, Some(4));
        assert_eq!(page.records.len(), 4);
        let ok: Vec<_> = page
            .records
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.model.id.unwrap())
            .collect();
        assert_eq!(ok, vec![1, 3]);
        let err = page.records[1].as_ref().unwrap_err();
        assert!(err.reason.contains("`firstName`"), "{}", err.reason);
        assert!(err.reason.contains("0xE9"), "{}", err.reason);
        assert!(err.reason.contains("0xC3"), "{}", err.reason);
        let raw: Value = serde_json::from_str(&err.raw).unwrap();
        assert_eq!(raw["id"], 2);
        assert_eq!(raw["firstName"], "Ren\u{FFFD}e");
        let err = page.records[3].as_ref().unwrap_err();
        assert!(err.reason.contains("0xFF"), "{}", err.reason);
        // Valid UTF-8 (ö) is no error; a clean record keeps its exact text.
        assert_eq!(
            page.records[2]
                .as_ref()
                .unwrap()
                .model
                .person
                .first_name
                .as_deref(),
            Some("Zoë")
        );
        // A bad byte outside any string breaks the JSON: the answer is garbled.
        let mut broken = br#"{"total": 1, "data": [{"id": 1"#.to_vec();
        broken.push(0xE9);
        broken.extend_from_slice(b"}]}");
        assert!(parse_page::<Lead>(&broken, 1, 1000, Tz::UTC, &[]).is_err());
        // A bare array.
        let mut bare = br#"[{"id": 1}, {"id": 2, "email": "x"#.to_vec();
        bare.push(0xE9);
        bare.extend_from_slice(br#""}]"#);
        let page = parse_page::<Lead>(&bare, 1, 1000, Tz::UTC, &[]).unwrap();
        assert!(page.records[0].is_ok());
        assert!(page.records[1]
            .as_ref()
            .unwrap_err()
            .reason
            .contains("`email`"));
    }

    #[test]
    fn a_server_with_bytes_that_are_not_utf8_fails_alone() {
        let mut body =
            br#"{"mt4": [{"id": "mt4-live-01", "name": "MT4 Live"}, {"id": "mt4-x", "name": "Caf"#
                .to_vec();
        body.push(0xE9);
        body.extend_from_slice(br#""}]}"#);
        let servers = parse_servers::<Server>(&body, Tz::UTC, &[]).unwrap();
        assert_eq!(servers.len(), 2);
        assert!(servers[0].is_ok());
        assert!(servers[1].as_ref().unwrap_err().reason.contains("UTF-8"));
    }

    #[test]
    fn a_body_declared_latin1_is_decoded() {
        let mut body = br#"{"total": 1, "data": [{"id": 1, "firstName": "Ren"#.to_vec();
        body.push(0xE9);
        body.extend_from_slice(br#"e", "lastName": "O"#);
        body.push(0x92); // Windows-1252's right single quote
        body.extend_from_slice(br#"Neil"}]}"#);
        for content_type in [
            "application/json; charset=ISO-8859-1",
            "application/json;charset=\"windows-1252\"",
            "text/json; Charset=latin1",
        ] {
            let decoded = decode_declared_charset(body.clone(), Some(content_type));
            let page = parse_page::<Lead>(&decoded, 1, 1000, Tz::UTC, &[]).unwrap();
            let lead = &page.records[0].as_ref().unwrap().model.person;
            assert_eq!(lead.first_name.as_deref(), Some("Renée"), "{content_type}");
            assert_eq!(lead.last_name.as_deref(), Some("O’Neil"), "{content_type}");
        }
        // A UTF-8 body with one Latin-1 byte, whatever its label: as it is (the one record
        // fails alone, the others keep their UTF-8 names).
        let mut mixed = body.clone();
        mixed.extend_from_slice("Zoë".as_bytes());
        assert_eq!(
            decode_declared_charset(mixed.clone(), Some("application/json; charset=latin1")),
            mixed
        );
        // Not declared, or declared but UTF-8 already: as it is.
        assert_eq!(
            decode_declared_charset(body.clone(), Some("application/json")),
            body
        );
        assert_eq!(decode_declared_charset(body.clone(), None), body);
        let utf8 = "{\"data\": [{\"firstName\": \"Zoë\"}]}".as_bytes().to_vec();
        assert_eq!(
            decode_declared_charset(utf8.clone(), Some("application/json; charset=iso-8859-1")),
            utf8
        );
    }

    proptest::proptest! {
        /// Bytes that are not UTF-8, put into the text of random records: exactly those
        /// records fail, every other one reads, nothing panics.
        #[test]
        fn bad_bytes_fail_exactly_their_records(
            hits in proptest::collection::vec((0usize..20, 0x80u8..=0xFF), 0..6),
        ) {
            let mut body = br#"{"total": 20, "data": ["#.to_vec();
            let mut expected_bad = std::collections::BTreeSet::new();
            for id in 0..20usize {
                if id > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(format!(r#"{{"id": {id}, "firstName": "N"#).as_bytes());
                for (_, byte) in hits.iter().filter(|(at, _)| *at == id) {
                    // A lone byte 0x80..=0xFF followed by ASCII is never UTF-8.
                    body.push(*byte);
                    body.push(b'-');
                    expected_bad.insert(id as i64);
                }
                body.extend_from_slice(br#"x"}"#);
            }
            body.extend_from_slice(b"]}");
            let page = parse_page::<Lead>(&body, 1, 1000, Tz::UTC, &[]).unwrap();
            proptest::prop_assert_eq!(page.records.len(), 20);
            let bad: std::collections::BTreeSet<i64> = page
                .records
                .iter()
                .filter_map(|r| r.as_ref().err())
                .map(|e| serde_json::from_str::<Value>(&e.raw).unwrap()["id"].as_i64().unwrap())
                .collect();
            proptest::prop_assert_eq!(bad, expected_bad);
        }

        #[test]
        fn any_body_cleans_to_a_result(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            gzip_magic in proptest::prelude::any::<bool>(),
        ) {
            let mut body = bytes;
            if gzip_magic {
                body.splice(0..0, [0x1f, 0x8b]);
            }
            for encoding in [None, Some("gzip"), Some("deflate"), Some("br")] {
                let _ = clean_body(body.clone(), encoding, 1 << 16);
            }
        }
    }
}
