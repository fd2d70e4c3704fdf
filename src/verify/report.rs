//! The report of `verify`: text for people, JSON and CSV for machines, and the progress bar
//! drawn on a terminal while it reads.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::compare::Totals;
use super::{AfterRepair, KeyDiff, Progress, Report, StreamReport};

/// Keys of each kind the text report lists per stream (all are in JSON and CSV).
pub const FIRST_KEYS: usize = 10;

fn day_text(day: Option<NaiveDate>) -> String {
    day.map_or_else(|| "-".to_owned(), |d| d.to_string())
}

/// Returns the report for people: per stream a verdict, the first keys of each kind, and
/// one line per day that differs with both sides' totals; then the totals of the range.
/// After a repair that sent events, what it sent, then the streams compared again after it
/// and, last, the verdict after the repair (the one the exit code follows).
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ibstream verify {} .. {}: {}",
        report.from,
        report.to,
        if report.is_equal() {
            "the topics equal the CRM"
        } else {
            "DIFFERENCES FOUND"
        }
    );
    for s in &report.streams {
        let _ = writeln!(out);
        stream_text(&mut out, s);
    }
    if let Some(repaired) = &report.repaired {
        let _ = writeln!(out);
        let sent = repaired.created + repaired.updated;
        match sent {
            0 => {
                let _ = writeln!(
                    out,
                    "repaired: nothing to send (no key missing or different)"
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "repaired: {sent} events sent ({} CREATED, {} UPDATED) with their fingerprints",
                    repaired.created, repaired.updated
                );
            }
        }
    }
    if let Some(after) = &report.after_repair {
        after_repair_text(&mut out, after);
    }
    out
}

/// Writes the result after a repair: the streams read and compared again in full, a verdict
/// line for the others, and the last line the verdict the exit code follows.
fn after_repair_text(out: &mut String, after: &AfterRepair) {
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "re-verified after the repair: {} read and compared again",
        after.reverified.join(", ")
    );
    for s in &after.streams {
        let _ = writeln!(out);
        if after.reverified.contains(&s.stream) && after.error.is_none() {
            stream_text(out, s);
        } else if after.reverified.contains(&s.stream) {
            let _ = writeln!(
                out,
                "{:<13} NOT COMPARED AGAIN: repaired, but the second comparison failed",
                s.stream
            );
        } else {
            let verdict = if s.is_equal() { "equal" } else { "DIFFERS" };
            let _ = writeln!(
                out,
                "{:<13} {verdict}: not repaired, as found above",
                s.stream
            );
        }
    }
    let _ = writeln!(out);
    let verdict = match &after.error {
        Some(e) => format!("NOT SHOWN EQUAL, the second comparison failed: {e}"),
        None if after.is_equal() => "the topics equal the CRM".to_owned(),
        None => "DIFFERENCES REMAIN".to_owned(),
    };
    let _ = writeln!(out, "after the repair: {verdict}");
}

/// Writes one stream's part of the text report.
fn stream_text(out: &mut String, s: &StreamReport) {
    let verdict = if s.is_equal() { "equal" } else { "DIFFERS" };
    let _ = writeln!(
        out,
        "{:<13} {verdict}: {} CRM records ({} pages), {} events read; missing {}, extra {}, different {}, dead letters {}{}",
        s.stream,
        s.crm_records,
        s.pages,
        s.kafka_events,
        s.missing.len(),
        s.extra.len(),
        s.different.len(),
        s.dead_letters.len(),
        match s.unreadable_events.len() {
            0 => String::new(),
            n => format!(", unreadable events {n}"),
        }
    );
    for (scope, day, missing) in &s.incomplete_days {
        let _ = writeln!(
            out,
            "  incomplete    {scope} {day}: the CRM's reads stayed {missing} records short of its total; not compared"
        );
    }
    keys(out, "missing", &s.missing);
    keys(out, "extra", &s.extra);
    keys(out, "different", &s.different);
    keys(out, "dead letter", &s.dead_letters);
    keys(out, "unreadable", &s.unreadable_events);
    keys(out, "not verified", &s.not_verified);
    keys(out, "read short", &s.read_short);
    for (day, (crm, kafka)) in &s.days {
        if crm != kafka {
            let _ = writeln!(
                out,
                "  day {:<10}  crm {}  |  kafka {}",
                day_text(*day),
                totals_text(crm),
                totals_text(kafka)
            );
        }
    }
    let (crm, kafka) = range_totals(s);
    let _ = writeln!(out, "  range totals   crm {}", totals_text(&crm));
    let _ = writeln!(out, "                 kafka {}", totals_text(&kafka));
}

fn keys(out: &mut String, kind: &str, list: &[KeyDiff]) {
    for k in list.iter().take(FIRST_KEYS) {
        let _ = write!(out, "  {kind:<13} {} ({})", k.key, day_text(k.day));
        if !k.detail.is_empty() {
            let _ = write!(out, ": {}", k.detail);
        }
        let _ = writeln!(out);
    }
    if list.len() > FIRST_KEYS {
        let _ = writeln!(
            out,
            "  {kind:<13} … and {} more (--format json lists all)",
            list.len() - FIRST_KEYS
        );
    }
}

fn totals_text(t: &Totals) -> String {
    let mut text = format!("{} records", t.records);
    for (name, value) in &t.sums {
        let _ = write!(text, ", {name} {}", value.normalize());
    }
    text
}

/// Returns a stream's totals over the whole range, both sides.
pub fn range_totals(s: &StreamReport) -> (Totals, Totals) {
    let mut crm = Totals::default();
    let mut kafka = Totals::default();
    for (c, k) in s.days.values() {
        for (sum, part) in [(&mut crm, c), (&mut kafka, k)] {
            sum.records += part.records;
            for (name, value) in &part.sums {
                *sum.sums.entry(name.clone()).or_insert(Decimal::ZERO) += value;
            }
        }
    }
    (crm, kafka)
}

/// Returns the report as one JSON document: `equal` and `streams` the comparison (before
/// any repair), `repaired` what `--repair` sent, `afterRepair` (`null` unless the repair sent
/// events) the result after it – `equal`, `reverified` (the streams compared again), `error`
/// and `streams` – and `endsEqual` the verdict the exit code follows.
pub fn json(report: &Report) -> serde_json::Value {
    let streams: Vec<serde_json::Value> = report.streams.iter().map(stream_json).collect();
    let after_repair = report.after_repair.as_ref().map(|after| {
        serde_json::json!({
            "equal": after.is_equal(),
            "reverified": after.reverified,
            "error": after.error,
            "streams": after.streams.iter().map(stream_json).collect::<Vec<_>>(),
        })
    });
    serde_json::json!({
        "from": report.from,
        "to": report.to,
        "equal": report.is_equal(),
        "streams": streams,
        "repaired": report.repaired,
        "afterRepair": after_repair,
        "endsEqual": report.ends_equal(),
    })
}

/// One stream's part of the JSON report.
fn stream_json(s: &StreamReport) -> serde_json::Value {
    let days: Vec<serde_json::Value> = s
        .days
        .iter()
        .map(|(day, (crm, kafka))| {
            serde_json::json!({
                "day": day,
                "equal": crm == kafka,
                "crm": totals_json(crm),
                "kafka": totals_json(kafka),
            })
        })
        .collect();
    let (crm, kafka) = range_totals(s);
    serde_json::json!({
        "stream": s.stream,
        "equal": s.is_equal(),
        "crmRecords": s.crm_records,
        "kafkaEvents": s.kafka_events,
        "pages": s.pages,
        "missing": s.missing,
        "extra": s.extra,
        "different": s.different,
        "deadLetters": s.dead_letters,
        "unreadableEvents": s.unreadable_events,
        "notVerified": s.not_verified,
        "readShort": s.read_short,
        "offsetsRead": s.offsets_read,
        "incompleteDays": s.incomplete_days.iter().map(|(scope, day, missing)| {
            serde_json::json!({"scope": scope, "day": day, "missing": missing})
        }).collect::<Vec<_>>(),
        "days": days,
        "totals": {"crm": totals_json(&crm), "kafka": totals_json(&kafka)},
    })
}

/// Totals as JSON; sums as decimal strings (exact).
fn totals_json(t: &Totals) -> serde_json::Value {
    let sums: serde_json::Map<String, serde_json::Value> = t
        .sums
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::Value::String(v.normalize().to_string()),
            )
        })
        .collect();
    serde_json::json!({"records": t.records, "sums": sums})
}

/// Returns the report as CSV: `stream,day,kind,key,measure,crm,kafka,detail`, one row per
/// total of every stream and day (`kind` = `total`), then one per key that differs; after a
/// repair that sent events, per stream compared again one `after_repair` row (`detail`:
/// `equal`, `differs` or why it was not compared) and one per key that still differs
/// (`kind` prefixed `after_repair_`).
pub fn csv(report: &Report) -> String {
    let mut out = String::from("stream,day,kind,key,measure,crm,kafka,detail\n");
    for s in &report.streams {
        for (day, (crm, kafka)) in &s.days {
            let day = day_text(*day);
            let _ = writeln!(
                out,
                "{},{day},total,,records,{},{},",
                s.stream, crm.records, kafka.records
            );
            let mut names: Vec<&String> = crm.sums.keys().chain(kafka.sums.keys()).collect();
            names.sort();
            names.dedup();
            for name in names {
                let value = |t: &Totals| {
                    t.sums
                        .get(name)
                        .map(|v| v.normalize().to_string())
                        .unwrap_or_default()
                };
                let _ = writeln!(
                    out,
                    "{},{day},total,,{},{},{},",
                    s.stream,
                    field(name),
                    value(crm),
                    value(kafka)
                );
            }
        }
        key_rows(&mut out, s, "");
    }
    if let Some(after) = &report.after_repair {
        for s in after
            .streams
            .iter()
            .filter(|s| after.reverified.contains(&s.stream))
        {
            let verdict = match (&after.error, s.is_equal()) {
                (Some(e), _) => format!("not compared: {e}"),
                (None, true) => "equal".to_owned(),
                (None, false) => "differs".to_owned(),
            };
            let _ = writeln!(out, "{},-,after_repair,,,,,{}", s.stream, field(&verdict));
            if after.error.is_none() {
                key_rows(&mut out, s, "after_repair_");
            }
        }
    }
    out
}

/// Writes one CSV row per key of a stream that differs (`kind` prefixed by `prefix`).
fn key_rows(out: &mut String, s: &StreamReport, prefix: &str) {
    for (kind, list) in [
        ("missing", &s.missing),
        ("extra", &s.extra),
        ("different", &s.different),
        ("dead_letter", &s.dead_letters),
        ("unreadable_event", &s.unreadable_events),
        ("not_verified", &s.not_verified),
        ("read_short", &s.read_short),
    ] {
        for k in list {
            let _ = writeln!(
                out,
                "{},{},{prefix}{kind},{},,,,{}",
                s.stream,
                day_text(k.day),
                field(&k.key),
                field(&k.detail)
            );
        }
    }
    for (scope, day, missing) in &s.incomplete_days {
        let _ = writeln!(
            out,
            "{},{day},{prefix}incomplete,{},,,,{missing} records short",
            s.stream,
            field(scope)
        );
    }
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// A spinner on stderr while `verify` reads, when stderr is a terminal; none elsewhere.
pub struct ProgressBar {
    bar: Option<(indicatif::ProgressBar, tokio::task::JoinHandle<()>)>,
}

impl ProgressBar {
    /// Starts drawing `progress` (every 200 ms) when stderr is a terminal.
    pub fn start(progress: Arc<Progress>) -> ProgressBar {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return ProgressBar { bar: None };
        }
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{spinner} verify {elapsed} {msg}")
        {
            bar.set_style(style);
        }
        let drawn = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                drawn.set_message(format!(
                    "kafka: {} events read  crm: {} records, {} pages",
                    progress.events.load(Ordering::Relaxed),
                    progress.records.load(Ordering::Relaxed),
                    progress.pages.load(Ordering::Relaxed),
                ));
                drawn.tick();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        ProgressBar {
            bar: Some((bar, task)),
        }
    }
}

impl Drop for ProgressBar {
    fn drop(&mut self) {
        if let Some((bar, task)) = self.bar.take() {
            task.abort();
            bar.finish_and_clear();
        }
    }
}
