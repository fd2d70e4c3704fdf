//! Pollers: one per stream (positions: one per live server tag), each a loop of cycles.
//!
//! A cycle reads each of the stream's cursors' windows (leads and customers have two: new
//! records by registrationDate, changed ones by lastModifiedDate), page by page. Every page
//! becomes one [`Batch`]: the events of its new and changed records, dead letters, and the
//! fingerprints of what was emitted. The poller moves its in-memory fingerprints only after
//! the sink acknowledged the batch, and its cursor only after a whole window was read (in a
//! batch of its own, with the tombstones of pruned fingerprints).
//!
//! Windows read at once: a cycle with more than one window to read (a backfill, a catch-up)
//! reads up to `crm.max_concurrent_requests` of them at once, each with a read-ahead task of
//! its own (one request in flight per window; the process-wide gate of
//! [`crate::crm::pressure`] decides how many go out and when). A backfill's windows read in
//! the gate's background class, behind every steady-state call of the process. The poller
//! works on whichever window has a page ready (the oldest first), so pages are committed in
//! the order they arrive, but the cursor moves over the windows in order: only over the
//! contiguous prefix of windows read to their end. A window read to its end beyond an
//! unfinished one waits in memory (its days found short with it) and takes no place of the
//! windows read at once, so one slow or held window never stops the others. At a crash its
//! pages are committed with their fingerprints: read again from the cursor, they emit
//! nothing (see "What is durable when" in [`super::state`]). Completeness, splitting, open
//! windows and the read-ahead keep their rules per window. While windows are read at once, a
//! page is applied only if no newer read of its entities was applied before (the same
//! read-sequence rule as a paused sweep's, below): a record that moved between two windows
//! read at once is never moved backwards. Without a read-ahead (`crm.read_ahead_pages = 0`)
//! windows are read one at a time, and no page (a sweep's included) is asked for before the
//! poller asks for it.
//!
//! A window is read completely or not passed silently: the distinct ids over the union of its
//! reads must reach the CRM's `total`. Short, it is read again (`max_drift_rereads`), then split
//! in halves down to one day (a window that fits in one page cannot drift); a single day still
//! short becomes an *open window* kept in the cursor's state value, retried at the start of
//! every cycle until complete, and given up with an error after
//! `open_window_retention_days`. The watermark moves on meanwhile: one bad day never stalls
//! the stream. Append-only fingerprints of open days are kept until the day is closed.
//!
//! Without a `total` (a CRM that reports none), completeness is shown by reading: a window
//! whose read is one page shorter than asked for is complete (one request answers from one
//! instant: nothing can move between pages); the pager makes it so only after the next page
//! came back empty or the same (a CRM capping the page size serves short pages of a longer
//! result), so the steady state costs two requests a window instead of one;
//! any other window is read again, and is complete when a read finds no id the earlier reads
//! had not (each such read beyond the second counts as a drift re-read; then halves and open
//! windows as for a short total, `missing` counting the ids only the last read found). A CRM
//! ignoring `page` (a full page of ids all read before) cannot show a window of more than one
//! page whole: it is read in halves, and a single day still denser than a page is kept open
//! with that reason in `/status`, never passed as complete.
//!
//! A page past the first of a read that fails (400, or a failure through every retry) is taken
//! as a CRM refusing pages that deep: the window is read in halves; a single day still too
//! deep is kept open (its records before the limit are emitted), counted
//! (`windows_too_deep`), named in a warning and in `/status` with its reason, and retried every
//! cycle while the other windows and later days go on. A CRM that is down fails the halves'
//! first pages too, and the cycle fails as before.
//!
//! Between cycles a *reconciliation sweep* re-reads the last `reconcile_days` of every cursor
//! every `reconcile_interval_secs`, a page at a time, yielding to the next cycle after the
//! page in hand (late and corrected records; unchanged ones are dropped by their
//! fingerprints). Its calls are in the background class of the CRM gate; its windows are read
//! one after the other (with the default 31-day windows and 30 days swept, one or two), each
//! window's pages asked for ahead as a backfill's are (see `Pager` in [`crate::crm::client`];
//! none with `crm.read_ahead_pages = 0`). When it finishes, the cursor records the time, so a restart does not sweep
//! at once.
//!
//! A paused sweep keeps pages read ahead, requested before the cycles that run meanwhile. No
//! page moves an entity backwards: every page carries the read sequence taken when its
//! request was sent, the poller remembers (while a sweep is paused or windows are read at once,
//! and only for the entities read meanwhile) a sequence taken after the answer of each entity's
//! latest applied read arrived (so retries and waits of that request cannot make it look
//! older than a sweep page sent meanwhile), and a record from a page sent before it is skipped (not emitted, and not counted toward its window: the window falls short of
//! its total and is read again by pages sent later, which may hold a newer version). The map
//! is dropped once the sweep's pages are all newer than its entries, and after every page of
//! a cycle its entries older than every page still awaited (asked for, not yet applied, see
//! [`PageIter::oldest_unread`]) are forgotten – they could skip nothing – so during a
//! backfill read at once it holds the reads of a few windows, not of the whole backfill
//! (while one window's request is held up, every read since it was sent is kept: that
//! window's answer may hold an older version of any of them).
//! Fingerprints of the days
//! a sweep still reads, holds or found short are never pruned, even when midnight moved the
//! sweep horizon past them since it started.
//!
//! A crash between two batches loses nothing: the cursor has not moved past the window, so it
//! is read again, and what was already committed is recognised by its fingerprint.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use super::change::{compare, event_id, kept_day, prune_before, Compared};
use super::state::{key_in_scope, local_id, Cursor, EntityKey, FpEntry, FpMap, StateRecord};
use super::window::{advance, cycle_start, halves, last_closed_day, today, windows};
use crate::crm::{
    CrmClient, CrmError, CrmRecord, DateFilter, PageIter, Record, RecordError, WindowQuery,
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
    /// Records read from the CRM (every read, re-reads included).
    pub fetched: AtomicU64,
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
    /// Open windows now (days read with records missing, retried every cycle).
    pub open_windows: AtomicU64,
    /// Open windows given up after `open_window_retention_days`.
    pub open_windows_given_up: AtomicU64,
    /// Reconciliation sweeps finished.
    pub reconcile_sweeps: AtomicU64,
    /// Money and volume values rounded to 8 decimals (binary floating-point noise).
    pub decimals_rounded: AtomicU64,
    /// Date fields emitted as `null` because they held "no date" (a zero date, a blank, an
    /// instant Avro cannot represent), their raw value in `extra`.
    pub no_dates: AtomicU64,
    /// Records emitted whose own day lies far outside the window they were read from.
    pub outside_window: AtomicU64,
    /// Customers emitted whose trading-account list could not be read (accounts empty, the
    /// text kept).
    pub unreadable_accounts: AtomicU64,
    /// Records skipped because their page was requested before a newer read of the same
    /// entity was applied (a paused sweep's page): applying them would move it backwards.
    pub stale_skipped: AtomicU64,
    /// Single days kept open because the CRM refused a page past the first of their read
    /// (a CRM that serves no page beyond a fixed offset), counted at every read of the day.
    pub windows_too_deep: AtomicU64,
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
    /// What values with more than 8 decimals become.
    pub decimal_excess: crate::config::DecimalExcess,
    /// The largest event the producer sends (`message.max.bytes`); larger ones are dead
    /// letters.
    pub max_event_bytes: usize,
    /// The operations registry (cursors and outcomes for `/status` and the metrics).
    pub ops: Arc<dyn Report>,
}

impl Shared {
    fn data_topic(&self, stream: &str) -> String {
        format!("{}.{stream}", self.topic_prefix)
    }
    fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.topic_prefix)
    }
}

/// Where pollers report what they do – where each cursor stands, how each cycle ended – and
/// where their counters are found: the operations registry (`ops::Registry`) implements it and
/// reads it all for the metrics and `/status`, so a stream never names the layer above it.
pub trait Report: Send + Sync + std::fmt::Debug {
    /// Registers a poller (before its first cursor or cycle is recorded).
    fn register(&self, poller: &str, stream: &'static str, server_tag: Option<&str>);
    /// Records where a cursor of a registered poller stands.
    fn cursor(&self, poller: &str, scope: &str, status: CursorStatus);
    /// Records the outcome of a poller's cycle (`Err`: the reason, free of secrets).
    fn cycle(&self, poller: &str, outcome: Result<(), String>);
    /// Returns the counters of a stream.
    fn stream(&self, stream: &str) -> Option<&Arc<StreamStats>>;
}

/// What a poller's cursor stands at.
#[derive(Debug, Clone)]
pub struct CursorStatus {
    /// The cursor.
    pub cursor: Cursor,
    /// The first day the cursor reads.
    pub initial: NaiveDate,
    /// Everything before this instant has been read (the end of the last day read during a
    /// backfill; the start of the last complete cycle in steady state).
    pub read_through: Option<DateTime<Utc>>,
    /// Why open days are open, for those open for another reason than records missing by
    /// the CRM's total (a CRM refusing their deep pages).
    pub open_reasons: HashMap<NaiveDate, String>,
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
    volatile: std::sync::Arc<[String]>,
    fps: FpMap,
    cursor_state: HashMap<String, Cursor>,
    shared: Arc<Shared>,
    encoder: Encoder,
    stats: Arc<StreamStats>,
    sweep: Option<Sweep<T>>,
    halt: CancellationToken,
    /// The distinct ids read of single days that needed more than one read (by scope and
    /// day), kept while the day is open or still re-read by the cycles: every read adds to
    /// them, so a day denser than a page converges even when the CRM pages in a random order.
    /// In memory only; a restart starts them again. Empty with a CRM that pages stably.
    day_unions: HashMap<(String, NaiveDate), HashSet<EntityKey>>,
    /// Up to when each cursor has read everything (see [`CursorStatus`]).
    read_through: HashMap<String, chrono::DateTime<Utc>>,
    /// The reads applied while a sweep was paused (it may hold pages requested before them)
    /// or windows were read at once: entity → the read sequence
    /// ([`crate::crm::page::next_read_seq`]) of its latest read. An entry is forgotten once
    /// no page still to be applied was requested before it (it could skip nothing more): after
    /// every page, entries older than every reader's oldest page asked for and not yet applied
    /// ([`PageIter::oldest_unread`]) go, and all go when the sweep's pages are all newer than
    /// every entry (or the sweep ends). So it holds the entities read while the oldest page
    /// still awaited was in flight – during a backfill, a few windows' worth – never the
    /// whole scope.
    newer_reads: HashMap<EntityKey, u64>,
    /// The keys of `newer_reads` by the sequence they were remembered with, oldest first (a
    /// key read again later stays in the map under its newer sequence).
    newer_order: std::collections::VecDeque<(u64, Vec<EntityKey>)>,
    /// The largest sequence in `newer_reads`.
    newer_max: u64,
    /// The most entries `newer_reads` held at once.
    #[cfg(test)]
    newer_peak: usize,
    /// Whether several windows are read at once now (their pages are remembered in
    /// `newer_reads` as a paused sweep's are).
    concurrent_reads: bool,
    /// Why open days are open when not for records missing by the total (by scope and day),
    /// for `/status`: a CRM refusing the day's deep pages.
    open_reasons: HashMap<(String, NaiveDate), String>,
    /// The clock of days, sweeps and open windows (tests move it across midnight).
    clock: Clock,
}

/// A source of the current instant.
pub type Clock = Arc<dyn Fn() -> chrono::DateTime<Utc> + Send + Sync>;

/// A page turned into a batch, with the fingerprints to remember once it is committed
/// (hashed ids with their names, so they can be pruned).
struct PageBatch {
    batch: Batch,
    remember: Vec<(EntityKey, FpEntry, Option<Box<str>>)>,
    created: u64,
    updated: u64,
    unchanged: u64,
    dead: u64,
    rounded: u64,
    fetched: u64,
    no_dates: u64,
    outside_window: u64,
    unreadable_accounts: u64,
}

impl PageBatch {
    /// Counts what the batch held, once it is committed.
    fn count(&self, stats: &StreamStats) {
        for (counter, n) in [
            (&stats.created, self.created),
            (&stats.updated, self.updated),
            (&stats.unchanged, self.unchanged),
            (&stats.dead_letters, self.dead),
            (&stats.decimals_rounded, self.rounded),
            (&stats.fetched, self.fetched),
            (&stats.no_dates, self.no_dates),
            (&stats.outside_window, self.outside_window),
            (&stats.unreadable_accounts, self.unreadable_accounts),
        ] {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Reads windows of one cursor page by page: the cycle drives it to the end, the sweep one
/// page at a time.
struct WindowReader<T: CrmRecord> {
    scope: String,
    filter: DateFilter,
    /// Windows still to read, the next on top.
    stack: Vec<(NaiveDate, NaiveDate)>,
    current: Option<Reading<T>>,
    /// Single days still short after their re-reads, with the records missing.
    short: Vec<(NaiveDate, u64)>,
    /// Whether its pages are read in the background class of the CRM's concurrency limit
    /// (a backfill's windows read at once, a sweep), with a read-ahead task of their own.
    background: bool,
}

/// The reads of one window.
struct Reading<T: CrmRecord> {
    from: NaiveDate,
    to: NaiveDate,
    pages: PageIter<T>,
    /// Distinct ids over every read of the window (dead letters included).
    union: HashSet<EntityKey>,
    /// The largest `total` of the current read.
    total: u64,
    /// Whether a page of the current read reported a `total`.
    has_total: bool,
    /// Pages of the current read, and whether its first page was short (fewer records than
    /// asked for).
    pass_pages: u32,
    short_first_page: bool,
    /// The union's size when the current read started.
    pass_start: usize,
    /// Reads of the window finished before the current one.
    passes: u32,
    /// Drift re-reads (of `max_drift_rereads`).
    rereads: u32,
    first_page: bool,
    /// Ids the union started with (a day read before).
    first_union: usize,
    /// Whether the current read skipped a record as stale (see `Poller::drop_stale`): such a
    /// read never shows the window complete by itself.
    skipped_stale: bool,
}

impl<T: CrmRecord> Reading<T> {
    /// Returns whether the window is shown complete by its reads so far: the union reaches
    /// the CRM's `total`; without a total, the read was one short page (one request answers
    /// from one instant, so nothing can move between pages; the pager passes a read of one
    /// short page only after the next page came back empty or the same), or a read after an earlier one
    /// of the same window found no id the union did not hold (the records served twice
    /// over are all known).
    fn complete(&self) -> bool {
        if self.has_total {
            return self.union.len() as u64 >= self.total;
        }
        let earlier_read = self.passes > 0 || self.first_union > 0;
        (self.pass_pages <= 1 && self.short_first_page && !earlier_read && !self.skipped_stale)
            || (earlier_read && self.union.len() == self.pass_start)
    }

    /// Starts another read of the window.
    fn next_pass(&mut self, pages: PageIter<T>) {
        self.pages = pages;
        self.total = 0;
        self.has_total = false;
        self.pass_pages = 0;
        self.short_first_page = false;
        self.pass_start = self.union.len();
        self.skipped_stale = false;
        self.passes += 1;
    }
}

impl<T: CrmRecord> WindowReader<T> {
    fn new(spec: &CursorSpec, mut windows: Vec<(NaiveDate, NaiveDate)>) -> Self {
        windows.reverse();
        WindowReader {
            scope: spec.scope.clone(),
            filter: spec.filter,
            stack: windows,
            current: None,
            short: Vec::new(),
            background: false,
        }
    }

    /// Reads in the background class (see [`WindowReader::background`]).
    fn in_background(mut self) -> Self {
        self.background = true;
        self
    }

    /// Returns whether [`Poller::step`] can go on without waiting for the CRM: no read in
    /// hand (the next window starts), or its next page (or its end) has arrived. Registers
    /// `cx` to be woken otherwise.
    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        match self.current.as_mut() {
            None => true,
            Some(reading) => reading.pages.poll_wait(cx).is_ready(),
        }
    }
}

impl<T: CrmRecord> WindowReader<T> {
    /// Returns the oldest read sequence of the pages its current read asked for and the
    /// poller has not applied yet (see [`PageIter::oldest_unread`]).
    fn oldest_unread(&self) -> Option<u64> {
        self.current.as_ref()?.pages.oldest_unread()
    }

    /// Returns the first day the reader still reads, holds pages of, or found short.
    fn first_day(&self) -> Option<NaiveDate> {
        let current = self.current.as_ref().map(|r| r.from);
        let stacked = self.stack.iter().map(|(from, _)| *from);
        let short = self.short.iter().map(|(day, _)| *day);
        current.into_iter().chain(stacked).chain(short).min()
    }
}

/// A reconciliation sweep in progress: one cursor's last `reconcile_days`.
struct Sweep<T: CrmRecord> {
    spec: CursorSpec,
    reader: WindowReader<T>,
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
        let open: usize = cursor_state.values().map(|c| c.open.len()).sum();
        stats.open_windows.fetch_add(open as u64, Ordering::Relaxed);
        let encoder = encoder.with_decimal_excess(shared.decimal_excess);
        let poller = Poller {
            stream,
            server_tag,
            cursors,
            append_only,
            volatile: volatile.into(),
            fps,
            cursor_state,
            shared,
            encoder,
            stats,
            sweep: None,
            halt: CancellationToken::new(),
            day_unions: HashMap::new(),
            read_through: HashMap::new(),
            newer_reads: HashMap::new(),
            newer_order: std::collections::VecDeque::new(),
            newer_max: 0,
            #[cfg(test)]
            newer_peak: 0,
            concurrent_reads: false,
            open_reasons: HashMap::new(),
            clock: Arc::new(Utc::now),
        };
        poller
            .shared
            .ops
            .register(&poller.name(), stream, poller.server_tag.as_deref());
        for spec in poller.cursors.clone() {
            poller.publish(&spec);
        }
        poller
    }

    /// Returns the poller's name: its stream, or `positions[<tag>]`.
    pub fn name(&self) -> String {
        match &self.server_tag {
            Some(tag) => format!("{}[{tag}]", self.stream),
            None => self.stream.to_owned(),
        }
    }

    /// Tells the operations registry where a cursor stands.
    fn publish(&self, spec: &CursorSpec) {
        let status = CursorStatus {
            cursor: self.cursor(&spec.scope),
            initial: spec.initial,
            read_through: self.read_through.get(&spec.scope).copied(),
            open_reasons: self
                .open_reasons
                .iter()
                .filter(|((scope, _), _)| *scope == spec.scope)
                .map(|((_, day), reason)| (*day, reason.clone()))
                .collect(),
        };
        self.shared.ops.cursor(&self.name(), &spec.scope, status);
    }

    /// Sets the token that stops the poller gently: between two pages, never between a
    /// batch handed to the sink and its acknowledgement (so its in-memory state includes
    /// every committed batch).
    pub fn with_halt(mut self, halt: CancellationToken) -> Self {
        self.halt = halt;
        self
    }

    /// Sets the clock the poller reads days, sweeps and open windows by (the system clock
    /// unless set; events' timestamps always use the system clock).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn now(&self) -> chrono::DateTime<Utc> {
        (self.clock)()
    }

    /// Gives back the poller's fingerprints and cursors (when it stops but may resume).
    pub fn into_state(self) -> (FpMap, HashMap<String, Cursor>) {
        self.stats
            .tracked
            .fetch_sub(self.fps.len() as u64, Ordering::Relaxed);
        let open: usize = self.cursor_state.values().map(|c| c.open.len()).sum();
        self.stats
            .open_windows
            .fetch_sub(open as u64, Ordering::Relaxed);
        (self.fps, self.cursor_state)
    }

    /// Reads every cursor from where it stands to today: its open windows first, then its
    /// windows from `next` (or the lookback before the watermark).
    pub async fn cycle(&mut self) -> Result<(), PollError> {
        let shared = self.shared.clone();
        let streams = &shared.streams;
        let now = self.now();
        let today = today(now, shared.tz);
        let behind = !self.caught_up();
        let closed = last_closed_day(
            now,
            shared.tz,
            chrono::Duration::seconds(streams.closing_lag_secs as i64),
        );
        for spec in self.cursors.clone() {
            let mut cursor = self.cursor(&spec.scope);
            if !cursor.open.is_empty() {
                let next = self.retry_open(&spec, &cursor).await?;
                if self.halted() {
                    return Ok(());
                }
                if next != cursor {
                    self.save_cursor(&spec, next.clone(), false).await?;
                }
                cursor = next;
            }
            let start = cycle_start(&cursor, streams.lookback_days, spec.initial);
            let open_days: Vec<NaiveDate> = cursor.open.iter().map(|w| w.day).collect();
            self.day_unions.retain(|(scope, day), _| {
                *scope != spec.scope || *day >= start || open_days.contains(day)
            });
            let mut planned: std::collections::VecDeque<(NaiveDate, NaiveDate)> =
                windows(start, today, streams.backfill_window_days).into();
            // Windows read at once (a backfill; the steady state has one or two), oldest
            // first, each with its last day and whether it was read to its end.
            let mut reading: std::collections::VecDeque<(NaiveDate, WindowReader<T>, bool)> =
                std::collections::VecDeque::new();
            let width = self.window_width(planned.len());
            // A backfill's windows wait behind every steady-state call of the process.
            let background = width > 1 && (cursor.watermark.is_none() || cursor.next.is_some());
            loop {
                // Windows read to their end wait for the ones before them without taking a
                // place: one window held up never stops the others.
                while reading.iter().filter(|(_, _, done)| !done).count() < width {
                    let Some(window) = planned.pop_front() else {
                        break;
                    };
                    let reader = WindowReader::new(&spec, vec![window]);
                    reading.push_back((
                        window.1,
                        if background {
                            reader.in_background()
                        } else {
                            reader
                        },
                        false,
                    ));
                }
                // The cursor moves over the windows read to their end, in order; a window
                // read beyond an unfinished one waits here (its pages are committed, with
                // their fingerprints, so a crash re-reads it without emitting anything).
                if !reading.front().is_some_and(|(_, _, done)| *done) {
                    if reading.is_empty() {
                        break;
                    }
                    let at = next_ready(&mut reading).await;
                    self.concurrent_reads = reading.len() > 1;
                    let more = self.step(&mut reading[at].1).await;
                    self.concurrent_reads = false;
                    // Reads remembered before every page still to be applied can skip nothing.
                    let oldest = reading
                        .iter()
                        .map(|(_, reader, _)| reader)
                        .chain(self.sweep.as_ref().map(|sweep| &sweep.reader))
                        .filter_map(WindowReader::oldest_unread)
                        .min();
                    self.forget_reads_before(oldest);
                    if !more? {
                        if self.halted() {
                            return Ok(());
                        }
                        reading[at].2 = true;
                    }
                    continue;
                }
                let Some((to, reader, _)) = reading.pop_front() else {
                    break;
                };
                let mut next = advance(&cursor, to, today, closed);
                for (day, missing) in reader.short {
                    next.open_day(day, missing, self.now());
                }
                if next.next.is_none() && next.swept.is_none() {
                    // The backfill read everything: it counts as the first sweep.
                    next.swept = Some(self.now());
                }
                let read_through = match next.next {
                    // Everything that existed when this cycle started has been read.
                    None => now,
                    Some(day) => crate::crm::time::day_start(day, shared.tz),
                };
                self.read_through.insert(spec.scope.clone(), read_through);
                self.save_cursor(&spec, next.clone(), true).await?;
                cursor = next;
            }
        }
        if behind && self.caught_up() {
            let first_day = self.cursors.iter().map(|c| c.initial).min();
            info!(
                stream = self.stream,
                server_tag = self.server_tag.as_deref().unwrap_or("-"),
                first_day = %first_day.map_or("-".to_owned(), |d| d.to_string()),
                // The stream's count (every server tag's, for positions): named so it is not
                // read as this poller's.
                stream_created = self.stats.created.load(Ordering::Relaxed),
                "backfill complete: every day up to today read"
            );
        }
        self.stats.cycles.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Returns whether every cursor has read up to today (its backfill is complete).
    fn caught_up(&self) -> bool {
        self.cursors.iter().all(|spec| {
            self.cursor_state
                .get(&spec.scope)
                .is_some_and(|c| c.next.is_none() && c.watermark.is_some())
        })
    }

    /// Works on the reconciliation sweep until `until` (finishing the page in hand).
    pub async fn background(&mut self, until: Instant) -> Result<(), PollError> {
        loop {
            if Instant::now() >= until || self.halted() {
                return Ok(());
            }
            let mut sweep = match self.sweep.take() {
                Some(sweep) => sweep,
                None => match self.due_sweep() {
                    Some(sweep) => {
                        info!(stream = self.stream, server_tag = self.server_tag.as_deref().unwrap_or("-"), scope = %sweep.spec.scope, days = self.shared.streams.reconcile_days, "reconciliation sweep started");
                        sweep
                    }
                    None => return Ok(()),
                },
            };
            if self.step(&mut sweep.reader).await? {
                self.sweep = Some(sweep);
                continue;
            }
            // No page of the sweep is held any more: nothing can be older than a read.
            self.forget_reads();
            let mut cursor = self.cursor(&sweep.spec.scope);
            let now = self.now();
            for (day, missing) in sweep.reader.short {
                cursor.open_day(day, missing, now);
            }
            cursor.swept = Some(now);
            self.save_cursor(&sweep.spec, cursor, false).await?;
            self.stats.reconcile_sweeps.fetch_add(1, Ordering::Relaxed);
            info!(stream = self.stream, server_tag = self.server_tag.as_deref().unwrap_or("-"), scope = %sweep.spec.scope, "reconciliation sweep finished");
        }
    }

    /// Returns the sweep of the first cursor whose last sweep is older than the interval
    /// (cursors still in their backfill are not swept).
    fn due_sweep(&self) -> Option<Sweep<T>> {
        let streams = &self.shared.streams;
        if streams.reconcile_days == 0 {
            return None;
        }
        let now = self.now();
        let interval = chrono::Duration::seconds(streams.reconcile_interval_secs as i64);
        let today = today(now, self.shared.tz);
        self.cursors.iter().find_map(|spec| {
            let cursor = self.cursor_state.get(&spec.scope)?;
            let due = cursor.watermark.is_some()
                && cursor.next.is_none()
                && cursor.swept.is_none_or(|t| now - t >= interval);
            due.then(|| {
                let from = (today - chrono::Duration::days(i64::from(streams.reconcile_days)))
                    .max(spec.initial);
                Sweep {
                    spec: spec.clone(),
                    reader: WindowReader::new(
                        spec,
                        windows(from, today, streams.backfill_window_days),
                    )
                    .in_background(),
                }
            })
        })
    }

    /// Returns how many of `planned` windows a cycle reads at once: all of them up to
    /// `crm.max_concurrent_requests` (the process-wide limit decides how many requests
    /// actually go out), one without a read-ahead (`crm.read_ahead_pages = 0`).
    fn window_width(&self, planned: usize) -> usize {
        let client = &self.shared.client;
        match client.reads_ahead() {
            true => planned.clamp(1, client.pressure().max() as usize),
            false => 1,
        }
    }

    fn cursor(&self, scope: &str) -> Cursor {
        self.cursor_state.get(scope).cloned().unwrap_or_default()
    }

    fn halted(&self) -> bool {
        self.halt.is_cancelled()
    }

    /// Reads each open window of a cursor again; returns the cursor with the days still
    /// short (given up after the retention, loudly).
    async fn retry_open(
        &mut self,
        spec: &CursorSpec,
        cursor: &Cursor,
    ) -> Result<Cursor, PollError> {
        let retention =
            chrono::Duration::days(i64::from(self.shared.streams.open_window_retention_days));
        let mut next = cursor.clone();
        next.open.clear();
        for window in &cursor.open {
            let mut reader = WindowReader::new(spec, vec![(window.day, window.day)]);
            while self.step(&mut reader).await? {}
            if self.halted() {
                return Ok(cursor.clone());
            }
            let Some(&(_, missing)) = reader.short.first() else {
                info!(stream = self.stream, scope = %spec.scope, day = %window.day, "open window complete");
                self.open_reasons.remove(&(spec.scope.clone(), window.day));
                continue;
            };
            if self.now() - window.since > retention {
                self.day_unions.remove(&(spec.scope.clone(), window.day));
                self.open_reasons.remove(&(spec.scope.clone(), window.day));
                error!(stream = self.stream, scope = %spec.scope, day = %window.day, missing, since = %window.since, "open window given up: its total never matched the records served");
                self.stats
                    .open_windows_given_up
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            warn!(stream = self.stream, scope = %spec.scope, day = %window.day, missing, since = %window.since, "open window still missing records, retrying next cycle");
            next.open
                .push(super::state::OpenWindow { missing, ..*window });
        }
        Ok(next)
    }

    /// Commits a cursor (with the tombstones of append-only fingerprints now outside every
    /// re-read horizon when `prune`), then takes it over in memory.
    async fn save_cursor(
        &mut self,
        spec: &CursorSpec,
        cursor: Cursor,
        prune: bool,
    ) -> Result<(), PollError> {
        let mut batch = Batch::default();
        batch
            .state
            .push(self.state_record(Cursor::key(&spec.scope), Some(cursor.encode())));
        let mut plan = None;
        if prune && self.append_only {
            if let Some(horizon) = self.horizon(&cursor) {
                let pruned: Vec<EntityKey> = self
                    .fps
                    .stale_before(days_since_epoch(prune_before(horizon)))
                    .into_iter()
                    .map(|(key, _)| key)
                    .collect();
                let (records, removal) = self.fps.plan_remove(&self.scope(), &pruned);
                batch.state.extend(self.state_records(records));
                plan = Some(removal);
            }
        }
        self.shared.sink.commit(batch).await?;
        let before = self.fps.len();
        if let Some(plan) = plan {
            self.fps.apply(plan);
        }
        if let Some((records, rewrite)) = self.fps.plan_compaction(&self.scope(), COMPACTION_LIMIT)
        {
            let mut batch = Batch::default();
            batch.state.extend(self.state_records(records));
            self.shared.sink.commit(batch).await?;
            self.fps.apply(rewrite);
        }
        self.stats
            .tracked
            .fetch_sub((before - self.fps.len()) as u64, Ordering::Relaxed);
        let open_before = self
            .cursor_state
            .get(&spec.scope)
            .map_or(0, |c| c.open.len());
        let open_now = cursor.open.len();
        if open_now >= open_before {
            self.stats
                .open_windows
                .fetch_add((open_now - open_before) as u64, Ordering::Relaxed);
        } else {
            self.stats
                .open_windows
                .fetch_sub((open_before - open_now) as u64, Ordering::Relaxed);
        }
        self.cursor_state.insert(spec.scope.clone(), cursor);
        self.publish(spec);
        Ok(())
    }

    /// Returns the first day whose append-only fingerprints are still needed: by the
    /// lookback, the reconciliation sweep and the open windows of every cursor.
    fn horizon(&self, cursor: &Cursor) -> Option<NaiveDate> {
        let streams = &self.shared.streams;
        let watermark = cursor.watermark?;
        let mut horizon = watermark + chrono::Duration::days(1 - i64::from(streams.lookback_days));
        if streams.reconcile_days > 0 {
            let today = today(self.now(), self.shared.tz);
            horizon =
                horizon.min(today - chrono::Duration::days(i64::from(streams.reconcile_days)));
        }
        let open = self
            .cursor_state
            .values()
            .chain(std::iter::once(cursor))
            .flat_map(|c| c.open.iter().map(|w| w.day))
            .min();
        // A sweep in progress still reads (or holds pages of, or will open) days the clock
        // may have left behind since it started (midnight passed): their fingerprints stay,
        // or it would emit their records as new.
        let swept = self.sweep.as_ref().and_then(|s| s.reader.first_day());
        Some(
            [open, swept]
                .into_iter()
                .flatten()
                .fold(horizon, NaiveDate::min),
        )
    }

    /// The scope of this poller's fingerprints: the stream, or `positions/<tag>`.
    fn scope(&self) -> String {
        match &self.server_tag {
            Some(tag) => format!("{}/{tag}", self.stream),
            None => self.stream.to_owned(),
        }
    }

    fn qualified(&self, id: &str) -> String {
        match &self.server_tag {
            Some(tag) => format!("{tag}:{id}"),
            None => id.to_owned(),
        }
    }

    fn state_records(&self, records: Vec<StateRecord>) -> Vec<OutRecord> {
        records
            .into_iter()
            .map(|(key, value)| self.state_record(key, value))
            .collect()
    }

    fn state_record(&self, key: String, payload: Option<Vec<u8>>) -> OutRecord {
        OutRecord {
            topic: self.shared.state_topic.clone(),
            key: key.into_bytes(),
            payload,
        }
    }

    /// Top-level fields left out of this stream's fingerprints.
    pub fn volatile(&self) -> &[String] {
        &self.volatile
    }

    fn query(&self, filter: DateFilter, from: NaiveDate, to: NaiveDate) -> WindowQuery {
        let streams = &self.shared.streams;
        let mut query = WindowQuery::new(filter, from, to);
        query.server_tag = self.server_tag.clone();
        query.include_fake = self.stream == "transactions" && streams.include_fake_transactions;
        query.max_records = streams.max_window_records;
        query.volatile = self.volatile.clone();
        query
    }

    /// Reads one page of `reader`'s current window (or moves to its next window); returns
    /// whether there is more to do. Halting stops it between pages.
    async fn step(&mut self, reader: &mut WindowReader<T>) -> Result<bool, PollError> {
        if self.halted() {
            return Ok(false);
        }
        let shared = self.shared.clone();
        let streams = &shared.streams;
        let Some(reading) = reader.current.as_mut() else {
            let Some((from, to)) = reader.stack.pop() else {
                return Ok(false);
            };
            let union = match from == to {
                true => self.day_unions.remove(&(reader.scope.clone(), from)),
                false => None,
            }
            .unwrap_or_default();
            let query = self.query(reader.filter, from, to);
            reader.current = Some(Reading {
                from,
                to,
                pages: match reader.background {
                    true => shared.client.pages_in_background::<T>(query),
                    false => shared.client.pages::<T>(query),
                },
                first_union: union.len(),
                pass_start: union.len(),
                union,
                total: 0,
                has_total: false,
                pass_pages: 0,
                short_first_page: false,
                passes: 0,
                rereads: 0,
                first_page: true,
                skipped_stale: false,
            });
            return Ok(true);
        };
        let (from, to) = (reading.from, reading.to);
        if let Some(page) = reading.pages.next().await {
            let page = match page {
                Ok(page) => page,
                Err(e) if reading.pass_pages > 0 && refuses_deep_pages(&e) => {
                    self.refused_deep_page(reader, &e);
                    return Ok(true);
                }
                Err(CrmError::Paging { reason, .. }) if reading.pass_pages > 0 => {
                    self.unreadable(reader, &reason);
                    return Ok(true);
                }
                Err(e) => return Err(e.into()),
            };
            self.stats.pages.fetch_add(1, Ordering::Relaxed);
            reading.total = reading.total.max(page.total.unwrap_or(0));
            let mut reads = Vec::new();
            reading.has_total |= page.total.is_some();
            reading.pass_pages += 1;
            if reading.pass_pages == 1 {
                reading.short_first_page = page.records.len() < page.page_size as usize;
            }
            if std::mem::take(&mut reading.first_page) && reading.total > streams.max_window_records
            {
                if let Some((left, right)) = halves(from, to) {
                    debug!(stream = self.stream, %from, %to, total = reading.total, "window above max_window_records, splitting");
                    reader.stack.push(right);
                    reader.stack.push(left);
                    reader.current = None;
                    return Ok(true);
                }
            }
            // Pages already read ahead go into the same batch: when Kafka is slower than the
            // CRM, batches grow instead of the pages waiting.
            let read = page.records.len();
            let mut records = self.drop_stale(page.sent, page.records, &mut reads);
            reading.skipped_stale |= records.len() < read;
            let mut failed = None;
            while records.len() < MAX_BATCH_RECORDS {
                match reading.pages.ready() {
                    Some(Ok(page)) => {
                        self.stats.pages.fetch_add(1, Ordering::Relaxed);
                        reading.total = reading.total.max(page.total.unwrap_or(0));
                        reading.has_total |= page.total.is_some();
                        reading.pass_pages += 1;
                        let read = page.records.len();
                        let kept = self.drop_stale(page.sent, page.records, &mut reads);
                        reading.skipped_stale |= kept.len() < read;
                        records.extend(kept);
                    }
                    Some(Err(e)) => {
                        failed = Some(e);
                        break;
                    }
                    None => break,
                }
            }
            let built = self.build_batch(records, Some((from, to)), &mut reading.union);
            self.commit(built).await?;
            self.remember_reads(reads);
            match failed {
                // A page after one of this read failed.
                Some(e) if refuses_deep_pages(&e) => self.refused_deep_page(reader, &e),
                Some(CrmError::Paging { reason, .. }) => self.unreadable(reader, &reason),
                Some(e) => return Err(e.into()),
                None => {}
            }
            return Ok(true);
        }
        // The read is over: complete when the union of the window's reads reaches its total
        // (without a total: see `Reading::complete`).
        let (distinct, total) = (reading.union.len() as u64, reading.total);
        // Records short: by the total, or (without one) the ids only the last read found.
        let missing = match reading.has_total {
            true => total.saturating_sub(distinct),
            false => (reading.union.len() - reading.pass_start).max(1) as u64,
        };
        if reading.complete() {
            if let Some(done) = reader.current.take() {
                if from == to && (done.rereads > 0 || done.first_union > 0) {
                    // A day that was hard to read: the next cycle's re-read starts from here.
                    self.day_unions
                        .insert((reader.scope.clone(), from), done.union);
                }
            }
            return Ok(true);
        }
        // Without a total, the first read of a window of more than one page is read once more
        // to show it complete: that read is not a drift re-read.
        let first_without_total =
            !reading.has_total && reading.passes == 0 && reading.first_union == 0;
        if first_without_total || reading.rereads < streams.max_drift_rereads {
            let had_total = reading.has_total;
            let query = self.query(reader.filter, from, to);
            let pages = match reader.background {
                true => shared.client.pages_in_background::<T>(query),
                false => shared.client.pages::<T>(query),
            };
            if first_without_total {
                debug!(stream = self.stream, %from, %to, distinct, "the crm reports no total, reading the window again to show it complete");
                // The confirming read does not use up a drift re-read.
                reading.next_pass(pages);
                return Ok(true);
            }
            reading.next_pass(pages);
            reading.rereads += 1;
            self.stats.drift_rereads.fetch_add(1, Ordering::Relaxed);
            match had_total {
                true => {
                    warn!(stream = self.stream, %from, %to, distinct, total, "records moved between pages, reading the window again")
                }
                false => {
                    warn!(stream = self.stream, %from, %to, distinct, new = missing, "a read without a total found records the one before missed, reading the window again")
                }
            }
            return Ok(true);
        }
        let Some(reading) = reader.current.take() else {
            return Ok(true);
        };
        match halves(from, to) {
            Some((left, right)) => {
                warn!(stream = self.stream, %from, %to, distinct, missing, "records still missing after re-reads, reading the window in halves");
                reader.stack.push(right);
                reader.stack.push(left);
            }
            None => {
                warn!(stream = self.stream, day = %from, missing, "day read with records missing, keeping it open");
                self.day_unions
                    .insert((reader.scope.clone(), from), reading.union);
                reader.short.push((from, missing));
            }
        }
        Ok(true)
    }

    /// Handles the failure of a page past the first of a read as a CRM refusing pages this
    /// deep (it answers 400 or 5xx from a fixed offset on, on every try): a window is read
    /// in halves; a single day is kept open (retried every cycle), counted and named. A CRM
    /// that is down fails the halves' first pages instead, and the cycle fails as before.
    fn refused_deep_page(&mut self, reader: &mut WindowReader<T>, error: &CrmError) {
        let read = reader.current.as_ref().map_or(0, |r| r.union.len());
        let reason = format!("the CRM refuses pages past record {read} of this day ({error}); lower crm.page_size does not help, ask the vendor to raise the limit");
        if self.split_or_keep_open(reader, &reason) {
            self.stats.windows_too_deep.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Handles a read whose pages cannot show the window whole ([`CrmError::Paging`] past
    /// the first page: a CRM ignoring `page`, or pages that never end): a window is read in
    /// halves; a single day is kept open with `reason` (in `/status`), retried every cycle,
    /// never passed as complete. Its records read so far are emitted.
    fn unreadable(&mut self, reader: &mut WindowReader<T>, reason: &str) {
        self.split_or_keep_open(reader, reason);
    }

    /// Ends the current read of `reader` unfinished: a window of several days is read again
    /// in halves; a single day is kept open with `reason` (shown in `/status`), its union kept
    /// for the retries. Returns whether a day was kept open.
    fn split_or_keep_open(&mut self, reader: &mut WindowReader<T>, reason: &str) -> bool {
        let Some(reading) = reader.current.take() else {
            return false;
        };
        let (from, to) = (reading.from, reading.to);
        let read = reading.union.len() as u64;
        match halves(from, to) {
            Some((left, right)) => {
                warn!(stream = self.stream, %from, %to, read, reason, "the crm's pages cannot show the window whole, reading it in halves");
                reader.stack.push(right);
                reader.stack.push(left);
                false
            }
            None => {
                let missing = match reading.has_total {
                    true => reading.total.saturating_sub(read).max(1),
                    false => 1,
                };
                warn!(stream = self.stream, scope = %reader.scope, day = %from, read, missing, reason, "the crm's pages cannot show the day whole; keeping the day open");
                self.open_reasons
                    .insert((reader.scope.clone(), from), reason.to_owned());
                self.day_unions
                    .insert((reader.scope.clone(), from), reading.union);
                reader.short.push((from, missing));
                true
            }
        }
    }

    /// Returns the records of a page requested at read sequence `sent`, without those of
    /// entities read again by a request sent later and already applied (they would move the
    /// entity backwards: a paused sweep's page, read before a cycle read the entity's new
    /// version). While a sweep is paused (this is a cycle's read), the entities read are added
    /// to `reads` with a read sequence taken after the answer arrived, to remember once
    /// committed.
    ///
    /// A skipped record does not count toward the window's distinct ids: `sent` is
    /// taken before the gate, the pauses and the retries (and for a page asked ahead, when
    /// its request is spawned), so a page that actually went out after the remembered read
    /// may hold the entity's newer version; skipping it and counting it would show the window
    /// complete without that version, and a record whose date moved into a window no cycle
    /// reads again would be lost. Uncounted, the window falls short of its total and is read
    /// again, by pages sent after the remembered read (their records are not skipped).
    fn drop_stale(
        &mut self,
        sent: u64,
        records: Vec<Result<Record<T>, RecordError>>,
        reads: &mut Vec<(EntityKey, u64)>,
    ) -> Vec<Result<Record<T>, RecordError>> {
        // Pages of windows read at once are applied as they come, not as they were sent.
        let sweep_paused = self.sweep.is_some() || self.concurrent_reads;
        if !sweep_paused && sent > self.newer_max && !self.newer_reads.is_empty() {
            // The sweep's pages are now all newer than every read remembered.
            self.forget_reads();
        }
        if !sweep_paused && self.newer_reads.is_empty() {
            return records;
        }
        // The cycle's reads are remembered by a number taken now, after their answer arrived
        // (`sent` was taken before the rate limiter, the pauses and every retry): a sweep page
        // sent while this request was still being retried is older than `received`, and
        // skipped (the record is read again later).
        let received = crate::crm::page::next_read_seq();
        let mut kept = Vec::with_capacity(records.len());
        for record in records {
            let key = match &record {
                Ok(r) => r
                    .model
                    .id()
                    .map(|id| key_in_scope(self.stream, &self.qualified(&id))),
                Err(_) => None,
            };
            if let Some(key) = key {
                if self
                    .newer_reads
                    .get(&key)
                    .is_some_and(|&newer| newer > sent)
                {
                    // Not counted toward the window: see above.
                    self.stats.stale_skipped.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        stream = self.stream,
                        sent, "record read before a newer read of it, skipped"
                    );
                    continue;
                }
                if sweep_paused {
                    reads.push((key, received));
                }
            }
            kept.push(record);
        }
        kept
    }

    /// Remembers the reads of a committed page (from [`Poller::drop_stale`]: entity, read
    /// sequence taken after the answer arrived, in the order taken).
    fn remember_reads(&mut self, reads: Vec<(EntityKey, u64)>) {
        for (key, received) in reads {
            let latest = self.newer_reads.entry(key).or_insert(received);
            *latest = (*latest).max(received);
            self.newer_max = self.newer_max.max(received);
            match self.newer_order.back_mut() {
                Some((seq, keys)) if *seq == received => keys.push(key),
                _ => self.newer_order.push_back((received, vec![key])),
            }
        }
        #[cfg(test)]
        {
            self.newer_peak = self.newer_peak.max(self.newer_reads.len());
        }
    }

    /// Forgets the reads remembered before `oldest`, the oldest read sequence of the pages
    /// asked for and not yet applied (`None`: there are none; a page asked for later takes a
    /// sequence above every read remembered). A remembered read skips only the records of
    /// pages requested before it, so one older than every page still to come skips nothing.
    fn forget_reads_before(&mut self, oldest: Option<u64>) {
        let Some(oldest) = oldest else {
            self.forget_reads();
            return;
        };
        while self
            .newer_order
            .front()
            .is_some_and(|(seq, _)| *seq < oldest)
        {
            let Some((_, keys)) = self.newer_order.pop_front() else {
                break;
            };
            for key in keys {
                if self.newer_reads.get(&key).is_some_and(|&seq| seq < oldest) {
                    self.newer_reads.remove(&key);
                }
            }
        }
        if self.newer_reads.is_empty() {
            self.newer_max = 0;
        }
    }

    /// Forgets every read remembered.
    fn forget_reads(&mut self) {
        self.newer_reads = HashMap::new();
        self.newer_order = std::collections::VecDeque::new();
        self.newer_max = 0;
    }

    /// Commits a page batch, then remembers its fingerprints.
    ///
    /// The commit runs in a task of its own, which counts the batch's events once Kafka has
    /// them: a poller cancelled at shutdown while the sink commits its batch still counts
    /// the events the sink then commits (they were left out of `ibstream_events_total` and
    /// the demo's summary).
    async fn commit(&mut self, mut built: PageBatch) -> Result<(), PollError> {
        let (records, plan) = self.fps.plan_write(&self.scope(), &built.remember);
        let mut batch = std::mem::take(&mut built.batch);
        batch.state.extend(self.state_records(records));
        built.remember = Vec::new();
        let (sink, stats) = (self.shared.sink.clone(), self.stats.clone());
        tokio::spawn(async move {
            sink.commit(batch).await?;
            built.count(&stats);
            Ok::<(), SinkError>(())
        })
        .await
        .map_err(|e| SinkError::Fatal(format!("the commit task failed: {e}")))??;
        let before = self.fps.len();
        self.fps.apply(plan);
        self.stats
            .tracked
            .fetch_add((self.fps.len() - before) as u64, Ordering::Relaxed);
        Ok(())
    }

    fn build_batch(
        &mut self,
        records: Vec<Result<Record<T>, RecordError>>,
        window: Window,
        seen: &mut HashSet<EntityKey>,
    ) -> PageBatch {
        let fetched_at = Utc::now();
        // One instant for the page's events: the clock read per record cost 2 % of the
        // connector's CPU in the benchmark's profile.
        let emitted_at = Utc::now();
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
            rounded: 0,
            fetched: records.len() as u64,
            no_dates: 0,
            outside_window: 0,
            unreadable_accounts: 0,
        };
        let rounded_before = self.encoder.rounded();
        let mut pending: HashMap<EntityKey, u64> = HashMap::new();
        for record in records {
            let (record, id) = match record {
                Ok(record) => match record.model.id() {
                    Some(id) => (record, id),
                    None => {
                        let raw = record.normalized_json();
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
            let fp = record.fp;
            // A record seen earlier in this page is compared with that version, not with the
            // committed one: the last version read is the one remembered.
            let previous = pending
                .get(&key)
                .copied()
                .or_else(|| self.fps.get(key).map(|e| e.fp));
            // The day its fingerprint is kept by; a record without a usable date is kept as
            // long as its window's records.
            let kept = || kept_day(record.model.day(tz), window);
            let op = match compare(previous, fp, &record.raw, &self.volatile) {
                Compared::Changed(op) => op,
                Compared::Unchanged => {
                    if !pending.contains_key(&key) {
                        out.unchanged += 1;
                    }
                    continue;
                }
                Compared::Restamp => {
                    out.unchanged += 1;
                    let day = kept().day.map_or(0, days_since_epoch);
                    let entry = FpEntry { fp, day };
                    out.remember
                        .push((key, entry, name_of(key, &id, self.stream)));
                    pending.insert(key, fp);
                    continue;
                }
            };
            trace!(stream = self.stream, id, ?previous, fp, "change");
            let meta = EventMeta {
                event_id: event_id(self.stream, &id, previous, fp),
                op,
                emitted_at,
                source: self.shared.source.clone(),
                endpoint: endpoint.clone(),
                window,
                fetched_at,
                connector_version: env!("CARGO_PKG_VERSION").to_owned(),
            };
            let encoded = self
                .encoder
                .encode(&record.model, &meta)
                .map_err(|e| e.to_string());
            let max = self.shared.max_event_bytes;
            let encoded = encoded.and_then(|payload| match payload.len() {
                // Kafka would refuse it every cycle: a dead letter instead, once.
                len if len > max => Err(format!(
                    "the event is {len} bytes, more than Kafka accepts (message.max.bytes = {max}; raise it in kafka.librdkafka and on the broker to let it through)"
                )),
                _ => Ok(payload),
            });
            match encoded {
                Ok(payload) => {
                    let kept = kept();
                    let day = kept.day.map_or(0, days_since_epoch);
                    if let Some(days) = kept.outside_by {
                        let record_day = record
                            .model
                            .day(tz)
                            .map_or_else(|| "-".to_owned(), |d| d.to_string());
                        let window = window
                            .map_or_else(|| "-".to_owned(), |(from, to)| format!("{from}..{to}"));
                        warn!(stream = self.stream, id, record_day, window, days, "record dated far outside the window it was read from, its fingerprint kept by the window");
                        out.outside_window += 1;
                    }
                    out.no_dates += record.model.no_dates() as u64;
                    if let Some(error) = record.model.unreadable_accounts() {
                        warn!(stream = self.stream, id, %error, "trading-account list unreadable, emitted with no accounts and its text kept");
                        out.unreadable_accounts += 1;
                    }
                    let entry = FpEntry { fp, day };
                    out.batch.events.push(OutRecord {
                        topic: topic.clone(),
                        key: id.clone().into_bytes(),
                        payload: Some(payload),
                    });
                    out.remember
                        .push((key, entry, name_of(key, &id, self.stream)));
                    pending.insert(key, fp);
                    match op {
                        Op::Created => out.created += 1,
                        Op::Updated => out.updated += 1,
                    }
                }
                Err(e) => {
                    let raw = record.normalized_json();
                    self.dead_letter(&mut out, Some(id), &raw, &e, fetched_at, window, None);
                }
            }
        }
        out.rounded = self.encoder.rounded() - rounded_before;
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
        // The entity's key when the raw record shows its id, though the record could not be
        // read: the dead letter is keyed like the entity's events, so it can be reconciled.
        let key = key.or_else(|| raw_id(T::ENDPOINT, raw).map(|id| self.qualified(&id)));
        if let Some(seen) = seen {
            // Counted by its id when the raw record shows one: a record that changes between
            // the window's reads must not count twice (two texts, two hashes).
            let counted = match &key {
                Some(key) => key_in_scope(self.stream, key),
                None => dlq_key,
            };
            seen.insert(counted);
        }
        if self.fps.get(dlq_key).is_some() || out.remember.iter().any(|(k, ..)| *k == dlq_key) {
            return;
        }
        let letter = DeadLetter::new(self.stream, key.clone(), raw, error, fetched_at);
        warn!(stream = self.stream, key = key.as_deref().unwrap_or("-"), error = %letter.error, "record sent to the dead-letter topic");
        let day = window.map_or(0, |(_, to)| days_since_epoch(to));
        let entry = FpEntry { fp: hash, day };
        let key = key.unwrap_or_else(|| self.stream.to_owned());
        out.batch.events.push(OutRecord {
            topic: self.shared.dlq_topic(),
            // A record too large for an event must not make a dead letter too large for Kafka.
            payload: Some(letter.to_json_within(self.shared.max_event_bytes, key.len())),
            key: key.into_bytes(),
        });
        out.remember
            .push((dlq_key, entry, name_of(dlq_key, &id, self.stream)));
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

/// Waits until one of the windows read at once can be stepped without waiting for the CRM
/// (the oldest first when several can); returns its index. Windows read to their end are
/// passed over; one is always ready when all are (the caller then moves the cursor).
async fn next_ready<T: CrmRecord>(
    reading: &mut std::collections::VecDeque<(NaiveDate, WindowReader<T>, bool)>,
) -> usize {
    std::future::poll_fn(|cx| {
        let mut any = false;
        for (at, (_, reader, done)) in reading.iter_mut().enumerate() {
            if *done {
                continue;
            }
            any = true;
            if reader.poll_ready(cx) {
                return std::task::Poll::Ready(at);
            }
        }
        match any {
            true => std::task::Poll::Pending,
            false => std::task::Poll::Ready(0),
        }
    })
    .await
}

/// Returns the id of a record that could not be read from its raw JSON text (its endpoint's
/// id field, a string or an integer), or `None` when the text or the id is unreadable.
fn raw_id(endpoint: crate::crm::Endpoint, raw: &str) -> Option<String> {
    use crate::crm::Endpoint;
    let field = match endpoint {
        Endpoint::Customers => "customerId",
        Endpoint::Positions => "positionId",
        Endpoint::Leads | Endpoint::Transactions | Endpoint::Servers => "id",
    };
    let value: serde_json::Value = serde_json::from_str(raw).ok()?;
    match value.get(field)? {
        serde_json::Value::String(id) if !id.trim().is_empty() => Some(id.trim().to_owned()),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(|id| id.to_string())
            .or_else(|| n.as_u64().map(|id| id.to_string())),
        _ => None,
    }
}

/// Most fingerprints one cursor save rewrites into fresh segments (see `FpMap::plan_compaction`).
const COMPACTION_LIMIT: usize = 50_000;

/// Most records one batch gathers from pages already read ahead.
const MAX_BATCH_RECORDS: usize = 8_000;

/// Returns whether a failed page past the first of a read may be a CRM refusing pages that
/// deep: a 400 (the request is valid at a smaller offset) or a failure that lasted every retry.
fn refuses_deep_pages(error: &CrmError) -> bool {
    matches!(
        error,
        CrmError::BadRequest { .. } | CrmError::Transient { .. }
    )
}

/// Returns the id to keep beside a hashed entity key (its id within the scope), so the
/// entity can be pruned; `None` for keys that hold their id.
fn name_of(key: EntityKey, id: &str, stream: &str) -> Option<Box<str>> {
    key.id().is_none().then(|| local_id(stream, id).into())
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
    /// This stream (or server tag) stopped (400, 404); the others go on.
    Stopped(String),
    /// The CRM denied the stream (403) or the credentials (401 after a fresh login): every
    /// server tag of it would fail alike; the other streams go on.
    Denied(String),
    /// The process must stop (fenced producer, sink gone).
    Fatal(String),
}

/// Something that polls in cycles.
pub trait Pollable: Send {
    /// Runs one cycle.
    fn cycle(&mut self) -> impl std::future::Future<Output = Result<(), PollError>> + Send + '_;

    /// Does low-priority work until `until` (the next cycle), yielding at its first chance
    /// after it.
    fn background(
        &mut self,
        until: Instant,
    ) -> impl std::future::Future<Output = Result<(), PollError>> + Send + '_ {
        let _ = until;
        async { Ok(()) }
    }
}

impl<T: StreamRecord> Pollable for Poller<T> {
    fn cycle(&mut self) -> impl std::future::Future<Output = Result<(), PollError>> + Send + '_ {
        Poller::cycle(self)
    }

    fn background(
        &mut self,
        until: Instant,
    ) -> impl std::future::Future<Output = Result<(), PollError>> + Send + '_ {
        Poller::background(self, until)
    }
}

/// Runs cycles every `interval` (background work in between) until `cancel` (shutdown: the
/// work in hand is dropped), `halt` (a gentle stop: the pollable finishes the batch in hand)
/// or a non-retriable error; returns how it ended and the pollable (with its in-memory
/// state) back.
pub async fn run_loop<P: Pollable>(
    stream: String,
    interval: Duration,
    cancel: CancellationToken,
    halt: CancellationToken,
    ops: Arc<dyn Report>,
    mut pollable: P,
) -> (Exit, P) {
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return (Exit::Cancelled, pollable),
            result = pollable.cycle() => result,
        };
        ops.cycle(
            &stream,
            result.as_ref().map(|_| ()).map_err(ToString::to_string),
        );
        if let Some(exit) = judge(&stream, result, "cycle failed, retrying next cycle") {
            return (exit, pollable);
        }
        let until = Instant::now() + interval;
        let result = tokio::select! {
            _ = cancel.cancelled() => return (Exit::Cancelled, pollable),
            result = pollable.background(until) => result,
        };
        if let Some(exit) = judge(&stream, result, "background work failed, retrying later") {
            return (exit, pollable);
        }
        tokio::select! {
            _ = cancel.cancelled() => return (Exit::Cancelled, pollable),
            _ = halt.cancelled() => return (Exit::Cancelled, pollable),
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

/// Returns how the loop ends after `result`, or `None` to go on.
fn judge(stream: &str, result: Result<(), PollError>, retry_message: &str) -> Option<Exit> {
    match result {
        Ok(()) => None,
        Err(e) if e.is_fatal_for_process() => {
            error!(stream = %stream, error = %e, "stopping: the process cannot go on");
            Some(Exit::Fatal(e.to_string()))
        }
        Err(e) if e.is_retriable() => {
            warn!(stream = %stream, error = %e, "{retry_message}");
            None
        }
        Err(e) => {
            // Whether the others go on is told by `run` once it knows (they may stop alike).
            error!(stream = %stream, error = %e, "stream stopped");
            let denied = matches!(
                e,
                PollError::Crm(CrmError::Forbidden { .. } | CrmError::Auth { .. })
            );
            Some(if denied {
                Exit::Denied(e.to_string())
            } else {
                Exit::Stopped(e.to_string())
            })
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
        open_windows = get(&stats.open_windows),
        open_windows_given_up = get(&stats.open_windows_given_up),
        reconcile_sweeps = get(&stats.reconcile_sweeps),
        decimals_rounded = get(&stats.decimals_rounded),
        pages = get(&stats.pages),
        "stream progress"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::Endpoint;

    #[test]
    fn a_dead_letter_is_counted_by_the_id_its_raw_text_shows() {
        // The same record read twice, changed in between (two texts, two hashes): one id.
        let first = r#"{"amount":"1,5","id":9000123,"note":"caf\u00e9"}"#;
        let second = r#"{"amount":"2,5","id":9000123,"note":"caf\u00c3\u00a9"}"#;
        assert_ne!(first, second);
        assert_eq!(
            raw_id(Endpoint::Transactions, first).as_deref(),
            Some("9000123")
        );
        assert_eq!(
            raw_id(Endpoint::Transactions, second).as_deref(),
            Some("9000123")
        );
        assert_eq!(
            raw_id(Endpoint::Customers, r#"{"customerId":" 55 ","id":1}"#).as_deref(),
            Some("55")
        );
        assert_eq!(
            raw_id(Endpoint::Positions, r#"{"positionId":"77000001"}"#).as_deref(),
            Some("77000001")
        );
        // No readable id: counted by the hash of its text, as before.
        assert_eq!(raw_id(Endpoint::Leads, r#"{"id":null}"#), None);
        assert_eq!(raw_id(Endpoint::Leads, r#"{"id":1.5}"#), None);
        assert_eq!(raw_id(Endpoint::Leads, "not json"), None);
    }

    /// A transactions poller on a CRM and a broker that are never called (drop_stale reads
    /// neither).
    async fn idle_poller() -> Poller<crate::crm::Transaction> {
        let kafka = crate::config::KafkaConfig {
            bootstrap_servers: "127.0.0.1:9".to_owned(),
            delivery: crate::config::Delivery::AtLeastOnce,
            ..Default::default()
        };
        let sink = crate::kafka::sink::start(&kafka).await.expect("a sink");
        poller_on(sink.handle)
    }

    /// A transactions poller on a CRM that is never called, committing to `sink`.
    fn poller_on(sink: crate::kafka::sink::SinkHandle) -> Poller<crate::crm::Transaction> {
        let crm = crate::config::CrmConfig {
            base_url: "http://127.0.0.1:9".to_owned(),
            email: "test@example.com".to_owned(),
            password: Some("p".to_owned().into()),
            api_key: Some("k".to_owned().into()),
            domain: "crm.example.com".to_owned(),
            ..Default::default()
        };
        let initial = NaiveDate::from_ymd_opt(2026, 1, 1).expect("a date");
        poller_with(sink, &crm, Default::default(), initial)
    }

    /// A transactions poller on the CRM of `crm`, committing to `sink`, its cursor starting
    /// at `initial`.
    fn poller_with(
        sink: crate::kafka::sink::SinkHandle,
        crm: &crate::config::CrmConfig,
        streams: crate::config::StreamsConfig,
        initial: NaiveDate,
    ) -> Poller<crate::crm::Transaction> {
        let client = CrmClient::build(crm).expect("a CRM client");
        let stats: crate::ops::Stats = [("transactions", Arc::default())].into_iter().collect();
        let ops = Arc::new(crate::ops::Registry::new(
            "unit",
            crate::config::Delivery::AtLeastOnce,
            client.tz(),
            Duration::from_secs(30),
            stats.clone(),
            client.stats(),
        ));
        let shared = Arc::new(Shared {
            tz: client.tz(),
            client,
            sink,
            source: crm.domain.clone(),
            api_prefix: "/api/v1/ib".to_owned(),
            topic_prefix: "unit".to_owned(),
            state_topic: "unit._ibstream_state".to_owned(),
            streams,
            decimal_excess: Default::default(),
            max_event_bytes: 1 << 20,
            ops,
        });
        let schemas = crate::events::Schemas::load("com.ibstream").expect("the schemas");
        let encoder =
            Encoder::new(&schemas, crate::events::Framing::SingleObject).expect("an encoder");
        Poller::new(
            "transactions",
            None,
            vec![CursorSpec {
                scope: "transactions".to_owned(),
                filter: crate::crm::DateFilter::Transaction,
                initial,
            }],
            false,
            Vec::new(),
            FpMap::default(),
            HashMap::new(),
            shared,
            encoder,
            Arc::default(),
        )
    }

    fn transaction(id: i64, amount: &str) -> Result<Record<crate::crm::Transaction>, RecordError> {
        let raw = format!(r#"{{"id":{id},"amount":"{amount}"}}"#);
        Ok(Record {
            model: crate::crm::Transaction {
                id: Some(id),
                amount: Some(amount.parse().expect("a decimal")),
                ..Default::default()
            },
            fp: amount.len() as u64,
            raw: raw.into(),
        })
    }

    #[tokio::test]
    async fn a_sweep_page_sent_while_a_cycle_request_was_retried_is_stale_once_its_answer_applied()
    {
        let mut poller = idle_poller().await;
        let spec = poller.cursors[0].clone();
        // A sweep is paused, holding pages read ahead.
        poller.sweep = Some(Sweep {
            reader: WindowReader::new(&spec, Vec::new()),
            spec,
        });
        // The cycle's request takes its sequence, gets a 5xx and backs off ...
        let cycle_sent = crate::crm::page::next_read_seq();
        // ... meanwhile the sweep's read-ahead sends a page and gets entity 7 at version A ...
        let sweep_sent = crate::crm::page::next_read_seq();
        assert!(sweep_sent > cycle_sent);
        // ... entity 7 changes to B; the cycle's retry reads B, applied while the sweep is
        // paused (what `step` does with a cycle's page: drop_stale, commit, remember reads).
        let mut reads = Vec::new();
        let kept = poller.drop_stale(cycle_sent, vec![transaction(7, "2.5")], &mut reads);
        assert_eq!(kept.len(), 1, "the cycle's read is applied");
        for (key, seq) in reads {
            let latest = poller.newer_reads.entry(key).or_insert(seq);
            *latest = (*latest).max(seq);
            poller.newer_max = poller.newer_max.max(seq);
        }
        // The sweep resumes (taken out of `self.sweep` while it steps) with its held page:
        // entity 7 at version A must not be applied after B.
        let sweep = poller.sweep.take();
        let mut reads = Vec::new();
        let kept = poller.drop_stale(sweep_sent, vec![transaction(7, "1.5")], &mut reads);
        poller.sweep = sweep;
        assert!(
            kept.is_empty(),
            "a sweep page sent (seq {sweep_sent}) before the cycle's answer arrived was applied \
             after it (the cycle's request was sent at seq {cycle_sent}): the entity moves back"
        );
        assert_eq!(poller.stats.stale_skipped.load(Ordering::Relaxed), 1);
    }

    /// Windows read at once: a page whose read sequence was taken early (asked ahead, or
    /// before the gate and a 429 pause) went out after another window's read of entity 7
    /// and holds its newer version. It is skipped as stale; counted, it would show the window
    /// complete without that version (a record whose date moved into an older window, which
    /// no cycle reads again, lost for good). Uncounted, the window falls short and is read
    /// again.
    #[tokio::test]
    async fn a_record_skipped_as_stale_never_makes_its_window_complete() {
        let mut poller = idle_poller().await;
        poller.concurrent_reads = true;
        let day = NaiveDate::from_ymd_opt(2026, 1, 1).expect("a date");
        let query = poller.query(crate::crm::DateFilter::Transaction, day, day);
        // The window's page, its sequence taken when it was asked for ahead ...
        let early = crate::crm::page::next_read_seq();
        // ... another window's page of entity 7 (its old version), applied first.
        let mut reads = Vec::new();
        let kept = poller.drop_stale(
            crate::crm::page::next_read_seq(),
            vec![transaction(7, "1.5")],
            &mut reads,
        );
        assert_eq!(kept.len(), 1);
        for (key, seq) in reads {
            poller.newer_reads.insert(key, seq);
            poller.newer_max = poller.newer_max.max(seq);
        }
        // The early page comes back with entities 7 (new version) and 8: total 2.
        let mut reading = Reading {
            from: day,
            to: day,
            pages: poller.shared.client.pages::<crate::crm::Transaction>(query),
            union: HashSet::new(),
            total: 2,
            has_total: true,
            pass_pages: 1,
            short_first_page: true,
            pass_start: 0,
            passes: 0,
            rereads: 0,
            first_page: false,
            first_union: 0,
            skipped_stale: false,
        };
        let mut reads = Vec::new();
        let records = vec![transaction(7, "2.5"), transaction(8, "3")];
        let kept = poller.drop_stale(early, records, &mut reads);
        assert_eq!(kept.len(), 1, "entity 7's record is skipped as stale");
        reading.skipped_stale = true;
        poller.build_batch(kept, Some((day, day)), &mut reading.union);
        assert!(
            !reading.complete(),
            "the window shows complete ({} of {} distinct) with entity 7's newer version skipped",
            reading.union.len(),
            reading.total
        );
        // Without a total, a single short page holding a skipped record is not complete
        // either.
        reading.has_total = false;
        assert!(!reading.complete());
    }

    /// A poller cancelled (its task dropped) while the sink commits its batch: the batch the
    /// sink then commits is counted, and the sink – which `run` waits for before its final
    /// stats – is held until it is.
    #[tokio::test]
    async fn a_batch_committed_after_its_poller_was_cancelled_is_counted() {
        let (sink, mut requests) = crate::kafka::sink::SinkHandle::held();
        let mut poller = poller_on(sink);
        let stats = poller.stats.clone();
        let built = PageBatch {
            batch: Batch {
                events: vec![crate::kafka::sink::OutRecord {
                    topic: "unit.transactions".to_owned(),
                    key: b"7".to_vec(),
                    payload: Some(b"event".to_vec()),
                }],
                state: Vec::new(),
            },
            remember: Vec::new(),
            created: 3,
            updated: 2,
            unchanged: 0,
            dead: 0,
            rounded: 0,
            fetched: 5,
            no_dates: 0,
            outside_window: 0,
            unreadable_accounts: 0,
        };
        let task = tokio::spawn(async move { poller.commit(built).await });
        let deadline = Duration::from_secs(10);
        let (batch, answer) = tokio::time::timeout(deadline, requests.recv())
            .await
            .expect("the batch reaches the sink")
            .expect("a batch");
        assert_eq!(batch.events.len(), 1);
        // Shutdown: the poller's task ends while the sink holds its batch.
        task.abort();
        assert!(task.await.is_err_and(|e| e.is_cancelled()));
        assert_eq!(
            stats.created.load(Ordering::Relaxed),
            0,
            "not committed yet"
        );
        // The sink commits it: Kafka has the events, so they count.
        answer
            .send(Ok(()))
            .expect("the commit still waits for its outcome");
        // Every handle gone (the poller's and the commit's) ends the sink's channel: what
        // `run` waits for before it logs the final stats.
        let closed = tokio::time::timeout(deadline, requests.recv()).await;
        assert!(
            matches!(closed, Ok(None)),
            "the sink's channel closes once the commit is counted"
        );
        assert_eq!(stats.created.load(Ordering::Relaxed), 3);
        assert_eq!(stats.updated.load(Ordering::Relaxed), 2);
        assert_eq!(stats.fetched.load(Ordering::Relaxed), 5);
    }

    /// A read remembered is forgotten only once every page still to be applied was requested
    /// after it: one a page still awaited was requested before stays, and skips that page's
    /// older version of the entity.
    #[tokio::test]
    async fn a_read_is_remembered_while_a_page_requested_before_it_is_awaited() {
        let mut poller = idle_poller().await;
        let key = |id: &str| key_in_scope("transactions", id);
        let held = crate::crm::page::next_read_seq();
        let first = crate::crm::page::next_read_seq();
        poller.remember_reads(vec![(key("7"), first), (key("8"), first)]);
        let second = crate::crm::page::next_read_seq();
        poller.remember_reads(vec![(key("8"), second)]);
        // A page requested at `held` is still awaited: both reads stay.
        poller.forget_reads_before(Some(held));
        assert_eq!(poller.newer_reads.len(), 2);
        let mut reads = Vec::new();
        poller.concurrent_reads = true;
        let kept = poller.drop_stale(held, vec![transaction(7, "1.5")], &mut reads);
        assert!(kept.is_empty(), "the page's older version of 7 is skipped");
        // The oldest page awaited was requested with 8's second read: 7's read is forgotten,
        // 8's stays.
        poller.forget_reads_before(Some(second));
        assert_eq!(poller.newer_reads.get(&key("7")), None);
        assert_eq!(poller.newer_reads.get(&key("8")), Some(&second));
        // No page awaited: nothing left to skip.
        poller.forget_reads_before(None);
        assert!(poller.newer_reads.is_empty() && poller.newer_order.is_empty());
    }

    /// A backfill of 240 one-day windows read 16 at once against the simulator: the reads
    /// remembered for the stale-read rule are forgotten once no page still to be applied was
    /// requested before them, so the map holds a few windows' worth at most, not every
    /// entity of the backfill (it did: 3,870 of 3,874 at once); asserted: under a quarter of them.
    /// Every transaction is emitted once (the simulator changes nothing here, so this test
    /// cannot see a stale emission: `forget_reads_before`'s unit tests and
    /// `crm_client::the_oldest_unread_page_is_the_next_one_handed_out` cover that).
    #[tokio::test]
    async fn a_backfill_read_at_once_remembers_the_reads_of_the_windows_in_flight_only() {
        const DAYS: i64 = 240;
        const TRANSACTIONS: usize = 4000;
        let today = Utc::now().date_naive();
        let start = today - chrono::Duration::days(DAYS - 1);
        let sim = crate::sim::start(crate::sim::SimConfig {
            listen: "127.0.0.1:0".parse().expect("an address"),
            start_date: start,
            leads: 0,
            customers: 0,
            transactions: TRANSACTIONS,
            positions: 0,
            ..Default::default()
        })
        .await
        .expect("the simulator starts");
        let crm = crate::config::CrmConfig {
            base_url: sim.base_url(),
            email: "ib@example.com".to_owned(),
            password: Some("ib-secret".to_owned().into()),
            api_key: Some("sim-api-key".to_owned().into()),
            domain: "sim.example.com".to_owned(),
            requests_per_second: 1000,
            max_concurrent_requests: 16,
            ..Default::default()
        };
        let streams = crate::config::StreamsConfig {
            backfill_window_days: 1,
            ..Default::default()
        };
        let (sink, mut requests) = crate::kafka::sink::SinkHandle::held();
        let emitted = tokio::spawn(async move {
            let mut keys = Vec::new();
            while let Some((batch, answer)) = requests.recv().await {
                keys.extend(
                    batch
                        .events
                        .iter()
                        .filter(|e| e.topic == "unit.transactions")
                        .map(|e| e.key.clone()),
                );
                let _ = answer.send(Ok(()));
            }
            keys
        });
        let mut poller = poller_with(sink, &crm, streams, start);
        tokio::time::timeout(Duration::from_secs(60), poller.cycle())
            .await
            .expect("the backfill ends")
            .expect("the backfill reads everything");
        assert!(poller.caught_up(), "the backfill read every day");
        let peak = poller.newer_peak;
        let pages = poller.stats.pages.load(Ordering::Relaxed);
        drop(poller);
        let keys = emitted.await.expect("the sink task");
        let distinct: HashSet<&Vec<u8>> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "a transaction emitted twice");
        let real = sim
            .truth(crate::sim::Kind::Transactions)
            .iter()
            .filter(|t| t["isFake"] != serde_json::Value::Bool(true))
            .count();
        assert_eq!(keys.len(), real, "every transaction emitted");
        eprintln!(
            "{pages} pages, {} transactions, at most {peak} reads remembered",
            keys.len()
        );
        // 16 windows in flight of ~17 transactions a day (a window held up lets the others
        // go on: a few times as many); every one of the 4,000 without forgetting.
        assert!(
            peak > 0 && peak < real / 4,
            "{peak} reads remembered at once of {real}"
        );
        sim.shutdown().await;
    }
}
