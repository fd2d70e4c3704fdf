//! Reads a stream's days from the CRM the way `run` reads them.
//!
//! The same client (login, rate limit, retries, read-ahead), the same day filter, the same
//! windows of `streams.backfill_window_days`, split in halves above
//! `streams.max_window_records`, and the same completeness rule (`stream::poller`): a
//! window is complete when the distinct ids over the union of its reads reach the CRM's
//! `total` (without a total: when a read finds no id the reads before did not, or the read
//! was one short page). Short, it is read again `streams.max_drift_rereads` times, then in
//! halves down to one day; a single day still short is *incomplete*: its records are not
//! compared (what is missing from the CRM's answer cannot be told from what is missing from
//! Kafka) and the report names it. A window's records are handed on only once it is
//! complete, the last version read of each record winning.

use std::collections::HashMap;

use chrono::NaiveDate;

use crate::crm::{CrmClient, CrmError, DateFilter, Record, RecordError, WindowQuery};
use crate::stream::poller::StreamRecord;
use crate::stream::window::{halves, windows};

/// How a stream is read.
#[derive(Debug, Clone)]
pub struct ReadSpec {
    /// The day filter `run` reads the stream by.
    pub filter: DateFilter,
    /// The server tag (positions).
    pub server_tag: Option<String>,
    /// `includeFake` (transactions).
    pub include_fake: bool,
    /// Volatile fields (left out of fingerprints).
    pub volatile: std::sync::Arc<[String]>,
    /// Days per window (`streams.backfill_window_days`).
    pub window_days: u32,
    /// Records above which a window is split (`streams.max_window_records`).
    pub max_window_records: u64,
    /// Re-reads of a short window before it is split (`streams.max_drift_rereads`).
    pub max_drift_rereads: u32,
}

/// One record read: its key in the topic (positions: `tag:id`) and the record, or why it
/// cannot be read (a dead letter, keyed by its id when its raw text shows one).
pub type Read<T> = (String, Result<Record<T>, RecordError>);

/// The records of one window read completely.
pub struct WindowRead<T> {
    /// The records, the last version read of each.
    pub records: Vec<Read<T>>,
    /// The window (inclusive days).
    pub window: (NaiveDate, NaiveDate),
    /// The pages its reads took.
    pub pages: u64,
}

/// Reads `from..=to`; sends the records of every complete window to `complete` (bounded:
/// the reads wait while the comparison is behind) and returns the single days still short
/// after every re-read, with the records missing.
pub async fn read_days<T: StreamRecord>(
    client: &CrmClient,
    spec: &ReadSpec,
    from: NaiveDate,
    to: NaiveDate,
    complete: tokio::sync::mpsc::Sender<WindowRead<T>>,
) -> Result<Vec<(NaiveDate, u64)>, CrmError> {
    let mut stack: Vec<(NaiveDate, NaiveDate)> = windows(from, to, spec.window_days);
    stack.reverse();
    let mut short = Vec::new();
    while let Some((from, to)) = stack.pop() {
        let mut union: HashMap<String, Result<Record<T>, RecordError>> = HashMap::new();
        let mut reads = 0u32;
        let mut pages = 0u64;
        let outcome = loop {
            let before = union.len();
            let mut query = WindowQuery::new(spec.filter, from, to);
            query.server_tag = spec.server_tag.clone();
            query.include_fake = spec.include_fake;
            query.max_records = spec.max_window_records;
            query.volatile = spec.volatile.clone();
            let mut iter = client.pages::<T>(query);
            let mut total: Option<u64> = None;
            let mut read_pages = 0u32;
            let mut short_first = false;
            let mut split = false;
            while let Some(page) = iter.next().await {
                let page = page?;
                pages += 1;
                read_pages += 1;
                if read_pages == 1 {
                    short_first = page.records.len() < page.page_size as usize;
                    if reads == 0 && page.total.unwrap_or(0) > spec.max_window_records && from < to
                    {
                        split = true;
                        break;
                    }
                }
                total = total.max(page.total);
                for record in page.records {
                    let key = key_of(&record, spec.server_tag.as_deref());
                    union.insert(key, record);
                }
            }
            reads += 1;
            if split {
                break Outcome::Split;
            }
            let found_new = union.len() > before;
            let done = match total {
                Some(total) => union.len() as u64 >= total,
                None => (reads == 1 && read_pages <= 1 && short_first) || (reads > 1 && !found_new),
            };
            if done {
                break Outcome::Complete;
            }
            let rereads_used = reads.saturating_sub(if total.is_none() { 2 } else { 1 });
            if rereads_used >= spec.max_drift_rereads && (total.is_some() || reads > 1) {
                let missing = match total {
                    Some(total) => total.saturating_sub(union.len() as u64),
                    None => (union.len() - before).max(1) as u64,
                };
                break Outcome::Short(missing);
            }
        };
        match outcome {
            Outcome::Complete => {
                let read = WindowRead {
                    records: union.into_iter().collect(),
                    window: (from, to),
                    pages,
                };
                if complete.send(read).await.is_err() {
                    // The comparison ended (it failed): nothing more to read for.
                    return Ok(short);
                }
            }
            Outcome::Split | Outcome::Short(_) if from < to => {
                if let Some((left, right)) = halves(from, to) {
                    stack.push(right);
                    stack.push(left);
                }
            }
            Outcome::Short(missing) => short.push((from, missing)),
            Outcome::Split => {}
        }
    }
    Ok(short)
}

enum Outcome {
    Complete,
    Split,
    Short(u64),
}

/// Returns a read record's key in its topic: its id (positions: `tag:id`), or for a record
/// that cannot be read the id its raw text shows, else `dlq-<hash of the text>`.
pub fn key_of<T: StreamRecord>(
    record: &Result<Record<T>, RecordError>,
    server_tag: Option<&str>,
) -> String {
    let id = match record {
        Ok(r) => r.model.id().or_else(|| raw_id::<T>(&r.raw)),
        Err(e) => raw_id::<T>(&e.raw),
    };
    let id = id.unwrap_or_else(|| {
        let raw = match record {
            Ok(r) => r.raw.as_ref(),
            Err(e) => e.raw.as_str(),
        };
        format!("dlq-{:016x}", xxhash_rust::xxh3::xxh3_64(raw.as_bytes()))
    });
    match server_tag {
        Some(tag) => format!("{tag}:{id}"),
        None => id,
    }
}

/// Returns the id a record's raw JSON text shows (its endpoint's id field).
fn raw_id<T: StreamRecord>(raw: &str) -> Option<String> {
    use crate::crm::Endpoint;
    let field = match T::ENDPOINT {
        Endpoint::Customers => "customerId",
        Endpoint::Positions => "positionId",
        Endpoint::Leads | Endpoint::Transactions | Endpoint::Servers => "id",
    };
    let value: serde_json::Value = serde_json::from_str(raw).ok()?;
    match value.get(field)? {
        serde_json::Value::String(id) if !id.trim().is_empty() => Some(id.trim().to_owned()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
