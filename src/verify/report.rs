//! The report of `verify`: text for people, JSON and CSV for machines, and the progress bar
//! drawn on a terminal while it reads.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::compare::Totals;
use super::{KeyDiff, Progress, Report, StreamReport};

/// Keys of each kind the text report lists per stream (all are in JSON and CSV).
pub const FIRST_KEYS: usize = 10;

fn day_text(day: Option<NaiveDate>) -> String {
    day.map_or_else(|| "-".to_owned(), |d| d.to_string())
}

/// Returns the report for people: per stream a verdict, the first keys of each kind, and
/// one line per day that differs with both sides' totals; then the totals of the range.
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
        keys(&mut out, "missing", &s.missing);
        keys(&mut out, "extra", &s.extra);
        keys(&mut out, "different", &s.different);
        keys(&mut out, "dead letter", &s.dead_letters);
        keys(&mut out, "unreadable", &s.unreadable_events);
        keys(&mut out, "not verified", &s.not_verified);
        keys(&mut out, "read short", &s.read_short);
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
    if let Some(repaired) = &report.repaired {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "repaired: {} events sent ({} CREATED, {} UPDATED) with their fingerprints",
            repaired.created + repaired.updated,
            repaired.created,
            repaired.updated
        );
    }
    out
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

/// Returns the report as one JSON document.
pub fn json(report: &Report) -> serde_json::Value {
    let streams: Vec<serde_json::Value> = report
        .streams
        .iter()
        .map(|s| {
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
        })
        .collect();
    serde_json::json!({
        "from": report.from,
        "to": report.to,
        "equal": report.is_equal(),
        "streams": streams,
        "repaired": report.repaired,
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
/// total of every stream and day (`kind` = `total`), then one per key that differs.
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
                    "{},{},{kind},{},,,,{}",
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
                "{},{day},incomplete,{},,,,{missing} records short",
                s.stream,
                field(scope)
            );
        }
    }
    out
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
