//! Pollers: one per stream (positions: one per live server tag), each a loop of cycles.
//!
//! A cycle reads each of the stream's cursors' windows (leads and customers have two: new
//! records by registrationDate, changed ones by lastModifiedDate), page by page. Every page
//! becomes one [`Batch`]: the events of its new and changed records, dead letters, and the
//! fingerprints of what was emitted. The poller moves its in-memory fingerprints only after
//! the sink acknowledged the batch, and its cursor only after a whole window was read (in a
//! batch of its own, with the tombstones of pruned fingerprints).
//!
//! A crash between two batches loses nothing: the cursor has not moved past the window, so it
//! is read again, and what was already committed is recognised by its fingerprint.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDate, Utc};
use chrono_tz::Tz;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::change::{classify, event_id, fingerprint};
use super::state::{key_in_scope, Cursor, EntityKey, FpEntry, FpMap};
use super::window::{advance, cycle_start, halves, last_closed_day, today, windows};
use crate::crm::{
    CrmClient, CrmError, CrmRecord, DateFilter, Page, Record, RecordError, WindowQuery,
};
use crate::events::{AvroEvent, DeadLetter, Encoder, EventMeta, Op};
use crate::kafka::{Batch, OutRecord, SinkError, SinkHandle};

/// A CRM record a stream emits.
pub trait StreamRecord: CrmRecord + AvroEvent + Sync {
    /// The record's day in the CRM's time zone, for pruning append-only streams.
    fn day(&self, _tz: Tz) -> Option<NaiveDate> {
        None
    }
}

impl StreamRecord for crate::crm::Lead {}
impl StreamRecord for crate::crm::Customer {}
impl StreamRecord for crate::crm::Server {}
impl StreamRecord for crate::crm::Transaction {
    fn day(&self, tz: Tz) -> Option<NaiveDate> {
        self.transaction_date
            .map(|t| t.with_timezone(&tz).date_naive())
    }
}
impl StreamRecord for crate::crm::Position {
    fn day(&self, tz: Tz) -> Option<NaiveDate> {
        self.close_time.map(|t| t.with_timezone(&tz).date_naive())
    }
}

/// Counters of one stream, shared with the operations side.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// CREATED events committed.
    pub created: AtomicU64,
    /// UPDATED events committed.
    pub updated: AtomicU64,
    /// Records read that had not changed (dropped).
    pub unchanged: AtomicU64,
    /// Dead letters committed.
    pub dead_letters: AtomicU64,
    /// Windows read again because fewer distinct ids than `total` came back.
    pub drift_rereads: AtomicU64,
    /// Pages read.
    pub pages: AtomicU64,
    /// Cycles completed.
    pub cycles: AtomicU64,
    /// Entities whose fingerprint is kept (append-only streams forget old ones), dead-letter
    /// markers included.
    pub tracked: AtomicU64,
}

/// What pollers share: the CRM client, the sink, and the settings of the run.
#[derive(Debug)]
pub struct Shared {
    /// The CRM client (one token, one rate limiter).
    pub client: CrmClient,
    /// The sink.
    pub sink: SinkHandle,
    /// The CRM's time zone.
    pub tz: Tz,
    /// The CRM domain (events' `meta.source`).
    pub source: String,
    /// `/api/v1/<api_path>`, the prefix of events' `meta.endpoint`.
    pub api_prefix: String,
    /// Topic prefix.
    pub topic_prefix: String,
    /// State topic.
    pub state_topic: String,
    /// Streams settings.
    pub streams: crate::config::StreamsConfig,
}

impl Shared {
    fn data_topic(&self, stream: &str) -> String {
        format!("{}.{stream}", self.topic_prefix)
    }
    fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.topic_prefix)
    }
}

/// Why a cycle ended early.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The CRM call failed.
    #[error(transparent)]
    Crm(#[from] CrmError),
    /// The sink failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl PollError {
    /// Returns whether a later cycle may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            PollError::Crm(e) => e.is_transient(),
            PollError::Sink(SinkError::Retriable(_)) => true,
            PollError::Sink(SinkError::Fatal(_)) => false,
        }
    }

    /// Returns whether the whole process must stop (not only this stream).
    pub fn is_fatal_for_process(&self) -> bool {
        matches!(self, PollError::Sink(SinkError::Fatal(_)))
    }
}

/// One cursor of a stream.
#[derive(Debug, Clone)]
pub struct CursorSpec {
    /// State scope (`leads/registration`, `transactions`, `positions/<tag>`).
    pub scope: String,
    /// The day filter.
    pub filter: DateFilter,
    /// The first day read when the cursor is new.
    pub initial: NaiveDate,
}

/// A poller of one windowed stream (or one server tag of positions).
pub struct Poller<T: StreamRecord> {
    stream: &'static str,
    server_tag: Option<String>,
    cursors: Vec<CursorSpec>,
    append_only: bool,
    volatile: Vec<String>,
    fps: FpMap,
    cursor_state: HashMap<String, Cursor>,
    shared: Arc<Shared>,
    encoder: Encoder,
    buffer: Vec<u8>,
    stats: Arc<StreamStats>,
    _model: std::marker::PhantomData<fn() -> T>,
}

/// A page turned into a batch, with the fingerprints to remember once it is committed.
struct PageBatch {
    batch: Batch,
    remember: Vec<(EntityKey, FpEntry)>,
    created: u64,
    updated: u64,
    unchanged: u64,
    dead: u64,
}

/// Where a record was read from (events' `meta.window`).
type Window = Option<(NaiveDate, NaiveDate)>;

impl<T: StreamRecord> Poller<T> {
    /// Builds a poller with its restored fingerprints and cursors.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: &'static str,
        server_tag: Option<String>,
        cursors: Vec<CursorSpec>,
        append_only: bool,
        volatile: Vec<String>,
        fps: FpMap,
        cursor_state: HashMap<String, Cursor>,
        shared: Arc<Shared>,
        encoder: Encoder,
        stats: Arc<StreamStats>,
    ) -> Self {
        stats.tracked.fetch_add(fps.len() as u64, Ordering::Relaxed);
        Poller {
            stream,
            server_tag,
            cursors,
            append_only,
            volatile,
            fps,
            cursor_state,
            shared,
            encoder,
            buffer: Vec::with_capacity(4096),
            stats,
            _model: std::marker::PhantomData,
        }
    }

    /// Gives back the poller's fingerprints and cursors (when it stops but may resume).
    pub fn into_state(self) -> (FpMap, HashMap<String, Cursor>) {
        self.stats
            .tracked
            .fetch_sub(self.fps.len() as u64, Ordering::Relaxed);
        (self.fps, self.cursor_state)
    }

    /// Reads every cursor from where it stands to today.
    pub async fn cycle(&mut self) -> Result<(), PollError> {
        let tz = self.shared.tz;
        let streams = &self.shared.streams;
        let now = Utc::now();
        let today = today(now, tz);
        let closed = last_closed_day(
            now,
            tz,
            chrono::Duration::seconds(streams.closing_lag_secs as i64),
        );
        let (lookback, window_days) = (streams.lookback_days, streams.backfill_window_days);
        for spec in self.cursors.clone() {
            let mut cursor = self
                .cursor_state
                .get(&spec.scope)
                .copied()
                .unwrap_or_default();
            let start = cycle_start(&cursor, lookback, spec.initial);
            for (from, to) in windows(start, today, window_days) {
                self.read_window(&spec, from, to).await?;
                let next = advance(cursor, to, today, closed);
                let mut batch = Batch::default();
                batch.state.push(
                    self.state_record(super::state::Cursor::key(&spec.scope), Some(next.encode())),
                );
                let mut pruned = Vec::new();
                if self.append_only {
                    if let Some(watermark) = next.watermark {
                        let horizon = watermark + chrono::Duration::days(1 - i64::from(lookback));
                        pruned = self.fps.stale_before(days_since_epoch(horizon));
                        for key in &pruned {
                            if let Some(id) = key.id() {
                                let id = self.qualified(&id);
                                batch
                                    .state
                                    .push(self.state_record(FpEntry::key(self.stream, &id), None));
                            }
                        }
                    }
                }
                self.shared.sink.commit(batch).await?;
                let before = self.fps.len();
                for key in pruned {
                    self.fps.remove(key);
                }
                self.stats
                    .tracked
                    .fetch_sub((before - self.fps.len()) as u64, Ordering::Relaxed);
                cursor = next;
                self.cursor_state.insert(spec.scope.clone(), cursor);
            }
        }
        self.stats.cycles.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn qualified(&self, id: &str) -> String {
        match &self.server_tag {
            Some(tag) => format!("{tag}:{id}"),
            None => id.to_owned(),
        }
    }

    fn state_record(&self, key: String, payload: Option<Vec<u8>>) -> OutRecord {
        OutRecord {
            topic: self.shared.state_topic.clone(),
            key: key.into_bytes(),
            payload,
        }
    }

    async fn read_window(
        &mut self,
        spec: &CursorSpec,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<(), PollError> {
        let shared = self.shared.clone();
        let streams = &shared.streams;
        let mut stack = vec![(from, to)];
        while let Some((a, b)) = stack.pop() {
            let mut rereads = 0;
            loop {
                let mut query = WindowQuery::new(spec.filter, a, b);
                query.server_tag = self.server_tag.clone();
                query.include_fake =
                    self.stream == "transactions" && streams.include_fake_transactions;
                let mut pages = self.shared.client.pages::<T>(query);
                let mut seen: HashSet<EntityKey> = HashSet::new();
                let mut total = 0u64;
                let mut first = true;
                let mut split = false;
                while let Some(page) = pages.next().await {
                    let page = page?;
                    self.stats.pages.fetch_add(1, Ordering::Relaxed);
                    total = total.max(page.total.unwrap_or(0));
                    if first {
                        first = false;
                        if total > streams.max_window_records {
                            if let Some((left, right)) = halves(a, b) {
                                stack.push(right);
                                stack.push(left);
                                split = true;
                                break;
                            }
                        }
                    }
                    self.commit_page(page, Some((a, b)), &mut seen).await?;
                }
                if split || (seen.len() as u64) >= total {
                    break;
                }
                if rereads < streams.max_drift_rereads {
                    rereads += 1;
                    self.stats.drift_rereads.fetch_add(1, Ordering::Relaxed);
                    warn!(stream = self.stream, from = %a, to = %b, distinct = seen.len(), total, "records moved between pages, reading the window again");
                    continue;
                }
                warn!(stream = self.stream, from = %a, to = %b, distinct = seen.len(), total, "records still missing after re-reads; the next cycle's lookback reads the window again");
                break;
            }
        }
        Ok(())
    }

    async fn commit_page(
        &mut self,
        page: Page<T>,
        window: Window,
        seen: &mut HashSet<EntityKey>,
    ) -> Result<(), PollError> {
        let built = self.build_batch(page.records, window, seen);
        self.commit(built).await
    }

    /// Commits a page batch, then remembers its fingerprints.
    async fn commit(&mut self, built: PageBatch) -> Result<(), PollError> {
        self.shared.sink.commit(built.batch).await?;
        let before = self.fps.len();
        for (key, entry) in built.remember {
            self.fps.insert(key, entry);
        }
        self.stats
            .tracked
            .fetch_add((self.fps.len() - before) as u64, Ordering::Relaxed);
        self.stats
            .created
            .fetch_add(built.created, Ordering::Relaxed);
        self.stats
            .updated
            .fetch_add(built.updated, Ordering::Relaxed);
        self.stats
            .unchanged
            .fetch_add(built.unchanged, Ordering::Relaxed);
        self.stats
            .dead_letters
            .fetch_add(built.dead, Ordering::Relaxed);
        Ok(())
    }

    fn build_batch(
        &mut self,
        records: Vec<Result<Record<T>, RecordError>>,
        window: Window,
        seen: &mut HashSet<EntityKey>,
    ) -> PageBatch {
        let fetched_at = Utc::now();
        let tz = self.shared.tz;
        let topic = self.shared.data_topic(self.stream);
        let endpoint = format!("{}/{}", self.shared.api_prefix, T::ENDPOINT.path_segment());
        let mut out = PageBatch {
            batch: Batch::default(),
            remember: Vec::new(),
            created: 0,
            updated: 0,
            unchanged: 0,
            dead: 0,
        };
        let mut pending: HashMap<EntityKey, u64> = HashMap::new();
        for record in records {
            let (record, id) = match record {
                Ok(record) => match record.model.id() {
                    Some(id) => (record, id),
                    None => {
                        let raw = serde_json::Value::Object(record.json).to_string();
                        self.dead_letter(
                            &mut out,
                            None,
                            &raw,
                            &"record has no id",
                            fetched_at,
                            window,
                            Some(seen),
                        );
                        continue;
                    }
                },
                Err(e) => {
                    let raw = e.raw.clone();
                    self.dead_letter(&mut out, None, &raw, &e, fetched_at, window, Some(seen));
                    continue;
                }
            };
            let id = self.qualified(&id);
            let key = key_in_scope(self.stream, &id);
            seen.insert(key);
            let fp = fingerprint(&record.json, &self.volatile, &mut self.buffer);
            // A record seen earlier in this page is compared with that version, not with the
            // committed one: the last version read is the one remembered.
            let previous = pending
                .get(&key)
                .copied()
                .or_else(|| self.fps.get(key).map(|e| e.fp));
            let Some(op) = classify(previous, fp) else {
                if !pending.contains_key(&key) {
                    out.unchanged += 1;
                }
                continue;
            };
            let meta = EventMeta {
                event_id: event_id(self.stream, &id, fp),
                op,
                emitted_at: Utc::now(),
                source: self.shared.source.clone(),
                endpoint: endpoint.clone(),
                window,
                fetched_at,
                connector_version: env!("CARGO_PKG_VERSION").to_owned(),
            };
            match self.encoder.encode(&record.model, &meta) {
                Ok(payload) => {
                    let day = record.model.day(tz).map_or(0, days_since_epoch);
                    let entry = FpEntry { fp, day };
                    out.batch.events.push(OutRecord {
                        topic: topic.clone(),
                        key: id.clone().into_bytes(),
                        payload: Some(payload),
                    });
                    out.batch.state.push(
                        self.state_record(FpEntry::key(self.stream, &id), Some(entry.encode())),
                    );
                    out.remember.push((key, entry));
                    pending.insert(key, fp);
                    match op {
                        Op::Created => out.created += 1,
                        Op::Updated => out.updated += 1,
                    }
                }
                Err(e) => {
                    let raw = serde_json::Value::Object(record.json).to_string();
                    self.dead_letter(&mut out, Some(id), &raw, &e, fetched_at, window, None);
                }
            }
        }
        out
    }

    /// Adds a dead letter, once per distinct raw record (re-reads do not repeat it); `seen`
    /// counts it toward the window's distinct records when it stands for a record of its own.
    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &mut self,
        out: &mut PageBatch,
        key: Option<String>,
        raw: &str,
        error: &dyn std::fmt::Display,
        fetched_at: chrono::DateTime<Utc>,
        window: Window,
        seen: Option<&mut HashSet<EntityKey>>,
    ) {
        let hash = xxhash_rust::xxh3::xxh3_64(raw.as_bytes());
        let id = self.qualified(&format!("dlq-{hash:016x}"));
        let dlq_key = key_in_scope(self.stream, &id);
        if let Some(seen) = seen {
            seen.insert(dlq_key);
        }
        if self.fps.get(dlq_key).is_some() || out.remember.iter().any(|(k, _)| *k == dlq_key) {
            return;
        }
        let letter = DeadLetter::new(self.stream, key.clone(), raw, error, fetched_at);
        warn!(stream = self.stream, key = key.as_deref().unwrap_or("-"), error = %letter.error, "record sent to the dead-letter topic");
        let day = window.map_or(0, |(_, to)| days_since_epoch(to));
        let entry = FpEntry { fp: hash, day };
        out.batch.events.push(OutRecord {
            topic: self.shared.dlq_topic(),
            key: key.unwrap_or_else(|| self.stream.to_owned()).into_bytes(),
            payload: Some(letter.to_json()),
        });
        out.batch
            .state
            .push(self.state_record(FpEntry::key(self.stream, &id), Some(entry.encode())));
        out.remember.push((dlq_key, entry));
        out.dead += 1;
    }

    /// Commits what changed among the records of an unwindowed endpoint (servers).
    pub async fn read_all(
        &mut self,
        records: Vec<Result<Record<T>, RecordError>>,
    ) -> Result<(), PollError> {
        let mut seen = HashSet::new();
        let built = self.build_batch(records, None, &mut seen);
        self.commit(built).await?;
        self.stats.pages.fetch_add(1, Ordering::Relaxed);
        self.stats.cycles.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Returns days since 1970-01-01.
pub fn days_since_epoch(day: NaiveDate) -> i32 {
    day.signed_duration_since(NaiveDate::default()).num_days() as i32
}

/// How a poller loop ended.
#[derive(Debug)]
pub enum Exit {
    /// Shut down.
    Cancelled,
    /// This stream stopped (403, 400, auth); the others go on.
    Stopped(String),
    /// The process must stop (fenced producer, sink gone).
    Fatal(String),
}

/// Something that polls in cycles.
pub trait Pollable: Send {
    /// Runs one cycle.
    fn cycle(&mut self) -> impl std::future::Future<Output = Result<(), PollError>> + Send + '_;
}

impl<T: StreamRecord> Pollable for Poller<T> {
    fn cycle(&mut self) -> impl std::future::Future<Output = Result<(), PollError>> + Send + '_ {
        Poller::cycle(self)
    }
}

/// Runs cycles every `interval` until cancelled or a non-retriable error; returns how it
/// ended and the pollable (with its in-memory state) back.
pub async fn run_loop<P: Pollable>(
    stream: String,
    interval: Duration,
    cancel: CancellationToken,
    mut pollable: P,
) -> (Exit, P) {
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return (Exit::Cancelled, pollable),
            result = pollable.cycle() => result,
        };
        match result {
            Ok(()) => {}
            Err(e) if e.is_fatal_for_process() => {
                error!(stream = %stream, error = %e, "stopping: the process cannot go on");
                return (Exit::Fatal(e.to_string()), pollable);
            }
            Err(e) if e.is_retriable() => {
                warn!(stream = %stream, error = %e, "cycle failed, retrying next cycle")
            }
            Err(e) => {
                error!(stream = %stream, error = %e, "stream stopped; the other streams go on");
                return (Exit::Stopped(e.to_string()), pollable);
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return (Exit::Cancelled, pollable),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Logs a stream's counters.
pub fn log_stats(stream: &str, stats: &StreamStats) {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    info!(
        stream,
        created = get(&stats.created),
        updated = get(&stats.updated),
        unchanged = get(&stats.unchanged),
        dead_letters = get(&stats.dead_letters),
        drift_rereads = get(&stats.drift_rereads),
        pages = get(&stats.pages),
        "stream progress"
    );
}
