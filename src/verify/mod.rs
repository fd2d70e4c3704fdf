//! `ibstream verify`: shows that the data topics hold what the CRM holds, for a range of days.
//!
//! 1. Every chosen data topic is read to its end ([`topics`]: `read_committed`, a group-less
//!    consumer, no transactional id), keeping a digest of the latest event of every key.
//! 2. The CRM is read for the days asked the way `run` reads it ([`crm`]): per stream (and
//!    per live server tag) by the day `run` reads it by, in its windows, compared only once a
//!    window's reads are complete.
//! 3. Key by key ([`compare`]): a CRM record without an event is **missing**, an event whose
//!    record date lies in the range that the CRM no longer returns for it is **extra** (gone
//!    from the CRM, or now dated elsewhere), an event whose fields differ from the CRM's
//!    current record (volatile fields and representation aside) is **different**. A CRM
//!    record that cannot be read is a **dead letter** (as `run` sends it to the dead-letter
//!    topic), never missing. Per stream and day both sides' totals are summed.
//! 4. [`report`] writes it for people (text) or machines (JSON, CSV).
//!
//! Nothing is written to Kafka unless `--repair` ([`repair`]) is asked for; a repair that sent
//! events reads the streams it sent them to again and compares them again ([`AfterRepair`]).
//!
//! Memory: per key of the chosen topics, a 128-bit digest of its latest event's schema and
//! entity bytes and where that event is ([`topics::Latest`]), never the payload. A CRM record
//! whose digest equals its key's is equal; the events of the keys whose digests differ and of
//! the keys the CRM did not return are read again from the topic, streamed, after the CRM
//! reads ([`Side::second_look`]; nothing is read again when every key was returned and
//! equal).

pub mod compare;
pub mod crm;
pub mod repair;
pub mod report;
pub mod topics;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use chrono_tz::Tz;

use crate::config::{Config, ConfigError};
use crate::crm::{CrmClient, Customer, DateFilter, Lead, Position, Record, Server, Transaction};
use crate::events::{Encoder, EventMeta, EventType, Framing, Schemas};
use crate::stream::poller::StreamRecord;
use compare::{body, day_field, differing, Decoder, ModelFacts, Totals};
use topics::TopicEvents;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// A report for people.
    #[default]
    Text,
    /// One JSON document.
    Json,
    /// CSV rows: one per stream and day, then one per key that differs.
    Csv,
}

/// What `verify` is asked.
#[derive(Debug, Clone)]
pub struct VerifyRequest {
    /// First day (CRM time zone), inclusive.
    pub from: NaiveDate,
    /// Last day, inclusive.
    pub to: NaiveDate,
    /// Streams (empty: every enabled stream).
    pub streams: Vec<String>,
    /// Server tags of positions (empty: every live one `run` reads).
    pub server_tags: Vec<String>,
    /// Send the missing and different records through the sink.
    pub repair: bool,
    /// Repair although the instance's heartbeat is fresh.
    pub force: bool,
}

/// Why `verify` could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Bad configuration or arguments (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bad arguments (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The CRM or Kafka failed; nothing could be shown equal.
    #[error("{0}")]
    Failed(String),
}

/// One key that differs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyDiff {
    /// The key in the topic.
    pub key: String,
    /// The record's day (`None`: no day, or servers).
    pub day: Option<NaiveDate>,
    /// Different: the first fields that differ; dead letter or unreadable event: the reason.
    pub detail: String,
}

/// What differs in one stream.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamReport {
    /// The stream.
    pub stream: String,
    /// CRM records compared.
    pub crm_records: u64,
    /// Events read from the topic (duplicates and older versions included).
    pub kafka_events: u64,
    /// CRM pages read.
    pub pages: u64,
    /// In the CRM, not in Kafka.
    pub missing: Vec<KeyDiff>,
    /// In Kafka (dated in the range), not returned by the CRM.
    pub extra: Vec<KeyDiff>,
    /// In both, values differ.
    pub different: Vec<KeyDiff>,
    /// CRM records that cannot be read (`run` sends them to the dead-letter topic).
    pub dead_letters: Vec<KeyDiff>,
    /// Events in the topic that cannot be decoded, whose day is therefore unknown.
    pub unreadable_events: Vec<KeyDiff>,
    /// Positions of server tags no longer live that the CRM would not serve: key the server
    /// tag, detail why and how many of its positions the topic holds dated in the range.
    pub not_verified: Vec<KeyDiff>,
    /// Records the topic holds past the offsets it was read to (found by a second read to
    /// the `read_committed` end after the comparison): the first read ended short, or they
    /// were written meanwhile; their keys were not compared with them.
    pub read_short: Vec<KeyDiff>,
    /// Per partition: the offset after the last record read (the second read's end when it
    /// found more).
    pub offsets_read: BTreeMap<i32, i64>,
    /// Days whose CRM reads never came complete (not compared), with the records missing.
    pub incomplete_days: Vec<(String, NaiveDate, u64)>,
    /// Totals per day: the CRM's and Kafka's.
    pub days: BTreeMap<Option<NaiveDate>, (Totals, Totals)>,
}

impl StreamReport {
    /// Returns whether the stream's topic is shown equal to the CRM over the range.
    ///
    /// A dead letter is never equal: the CRM holds a record the topic does not hold as the
    /// CRM serves it (a payout engine reads no event of it, or, when the topic holds one, an
    /// older version of it). Nor is an event that cannot be decoded: what it holds is
    /// unknown.
    pub fn is_equal(&self) -> bool {
        self.missing.is_empty()
            && self.extra.is_empty()
            && self.different.is_empty()
            && self.dead_letters.is_empty()
            && self.unreadable_events.is_empty()
            && self.not_verified.is_empty()
            && self.read_short.is_empty()
            && self.incomplete_days.is_empty()
    }
}

/// The outcome of `verify`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// First day.
    pub from: NaiveDate,
    /// Last day.
    pub to: NaiveDate,
    /// Per stream, as the comparison found it (before any repair: what `--repair` mended).
    pub streams: Vec<StreamReport>,
    /// What `--repair` sent, when asked.
    pub repaired: Option<repair::Repaired>,
    /// When `--repair` sent events: the result after it (see [`AfterRepair`]).
    pub after_repair: Option<AfterRepair>,
}

impl Report {
    /// Returns whether every stream is equal (the comparison before any repair).
    pub fn is_equal(&self) -> bool {
        self.streams.iter().all(StreamReport::is_equal)
    }

    /// Returns whether the topics end equal to the CRM: after a repair that sent events, by
    /// the comparison made again after it; otherwise by the comparison.
    pub fn ends_equal(&self) -> bool {
        match &self.after_repair {
            Some(after) => after.is_equal(),
            None => self.is_equal(),
        }
    }
}

/// `--repair`'s second look: the streams it sent events to are read again (topic and CRM)
/// after its last batch committed, and compared again; the other streams stand as the
/// comparison found them (the repair wrote nothing to their topics).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AfterRepair {
    /// The streams read and compared again.
    pub reverified: Vec<String>,
    /// Every stream after the repair: the second comparison of the re-verified ones, the
    /// first of the others (of every stream when `error` is set: nothing was compared again).
    pub streams: Vec<StreamReport>,
    /// Why the second comparison could not be made (the CRM or Kafka failed); nothing is
    /// then shown equal.
    pub error: Option<String>,
}

impl AfterRepair {
    /// Returns whether every stream is equal after the repair.
    pub fn is_equal(&self) -> bool {
        self.error.is_none() && self.streams.iter().all(StreamReport::is_equal)
    }
}

/// A record `--repair` would send: its key, scope and CRM record.
pub struct Candidate<T> {
    /// The key in the topic (positions: `tag:id`).
    pub key: String,
    /// The fingerprint scope (`positions/<tag>` or the stream).
    pub scope: String,
    /// The window it was read from.
    pub window: Option<(NaiveDate, NaiveDate)>,
    /// Whether the topic holds an event of the key (a different one).
    pub in_kafka: bool,
    /// The record.
    pub record: Record<T>,
}

/// Everything a stream's comparison needs.
struct Ctx {
    client: CrmClient,
    tz: Tz,
    config: Config,
    schemas: Schemas,
    framing: Framing,
    decoder: Decoder,
    range: (NaiveDate, NaiveDate),
    progress: Arc<Progress>,
}

impl Ctx {
    /// Returns an encoder as `run`'s: the configured framing and decimal policy.
    fn encoder(&self) -> Result<Encoder, VerifyError> {
        Ok(Encoder::new(&self.schemas, self.framing.clone())
            .map_err(|e| VerifyError::Failed(e.to_string()))?
            .with_decimal_excess(self.config.events.decimal_excess))
    }
}

/// Counters the progress bar shows.
#[derive(Debug, Default)]
pub struct Progress {
    /// Events read from the topics.
    pub events: AtomicU64,
    /// CRM records read.
    pub records: AtomicU64,
    /// CRM pages read.
    pub pages: AtomicU64,
}

/// The candidates for repair of every stream, typed.
#[derive(Default)]
pub struct Candidates {
    /// Leads.
    pub leads: Vec<Candidate<Lead>>,
    /// Customers.
    pub customers: Vec<Candidate<Customer>>,
    /// Transactions.
    pub transactions: Vec<Candidate<Transaction>>,
    /// Servers.
    pub servers: Vec<Candidate<Server>>,
    /// Positions.
    pub positions: Vec<Candidate<Position>>,
}

impl Candidates {
    /// Returns the streams with a record to send, in the order of [`STREAMS`].
    pub fn streams(&self) -> Vec<&'static str> {
        let sizes = [
            self.leads.len(),
            self.customers.len(),
            self.transactions.len(),
            self.servers.len(),
            self.positions.len(),
        ];
        STREAMS
            .into_iter()
            .zip(sizes)
            .filter(|(_, n)| *n > 0)
            .map(|(s, _)| s)
            .collect()
    }
}

const STREAMS: [&str; 5] = ["leads", "customers", "transactions", "servers", "positions"];

/// Checks the request against the configuration (no IO); returns the streams to verify.
pub fn validate(
    config: &Config,
    request: &VerifyRequest,
) -> Result<Vec<&'static str>, VerifyError> {
    config.validate()?;
    config.kafka.validate()?;
    if request.from > request.to {
        return Err(VerifyError::Usage(format!(
            "--from {} is after --to {}",
            request.from, request.to
        )));
    }
    let enabled = crate::run::enabled_streams(&config.streams);
    let mut chosen = Vec::new();
    for name in &request.streams {
        let Some(stream) = STREAMS.iter().find(|s| **s == name.as_str()) else {
            return Err(VerifyError::Usage(format!(
                "unknown stream {name:?} (--stream); streams: {}",
                STREAMS.join(", ")
            )));
        };
        if !enabled.contains(stream) {
            return Err(VerifyError::Usage(format!(
                "stream {name} is not enabled in this configuration (streams.{name}.enabled)"
            )));
        }
        if !chosen.contains(stream) {
            chosen.push(*stream);
        }
    }
    if chosen.is_empty() {
        chosen = enabled;
    }
    if !request.server_tags.is_empty() && !chosen.contains(&"positions") {
        return Err(VerifyError::Usage(
            "--server-tag is for the positions stream only".to_owned(),
        ));
    }
    Ok(chosen)
}

/// Runs `verify` (and `--repair` when asked) and returns the report.
pub async fn run(config: Config, request: VerifyRequest) -> Result<Report, VerifyError> {
    let streams = validate(&config, &request)?;
    let client = CrmClient::build(&config.crm)?;
    let tz = client.tz();
    let schemas =
        Schemas::load(&config.events.namespace).map_err(|e| VerifyError::Failed(e.to_string()))?;
    let framing = crate::events::framing_for(&config, &schemas)
        .await
        .map_err(|e| VerifyError::Failed(e.to_string()))?;
    // Refused before anything is read, and read before the topics: a repair of a state
    // another process writes meanwhile would be lost or doubled.
    let guard = match request.repair {
        true => Some(repair::Guard::take(&config, request.force).await?),
        false => None,
    };
    let progress = Arc::new(Progress::default());
    let bar = report::ProgressBar::start(progress.clone());
    reach_kafka(&config).await?;
    let ctx = Arc::new(Ctx {
        client,
        tz,
        decoder: Decoder::new(&schemas, &framing),
        schemas: schemas.clone(),
        framing: framing.clone(),
        range: (request.from, request.to),
        config: config.clone(),
        progress: progress.clone(),
    });
    let (streams, candidates) = compare_streams(&ctx, &streams, &request.server_tags).await?;
    drop(bar);
    let mut report = Report {
        from: request.from,
        to: request.to,
        streams,
        repaired: None,
        after_repair: None,
    };
    let Some(guard) = guard else {
        return Ok(report);
    };
    let sent = candidates.streams();
    report.repaired = Some(repair::repair(&config, guard, &schemas, framing, candidates).await?);
    if !sent.is_empty() {
        report.after_repair = Some(reverify(&ctx, &report, sent, &request.server_tags).await);
    }
    Ok(report)
}

/// Reads the streams `--repair` sent events to again, topic and CRM, after its last batch
/// committed, and compares them again.
async fn reverify(
    ctx: &Arc<Ctx>,
    report: &Report,
    sent: Vec<&'static str>,
    tags: &[String],
) -> AfterRepair {
    let bar = report::ProgressBar::start(ctx.progress.clone());
    let compared = compare_streams(ctx, &sent, tags).await;
    drop(bar);
    let reverified: Vec<String> = sent.iter().map(|s| (*s).to_owned()).collect();
    let (again, error) = match compared {
        Ok((again, _)) => (again, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let streams = report
        .streams
        .iter()
        .map(|before| {
            again
                .iter()
                .find(|s| s.stream == before.stream)
                .unwrap_or(before)
                .clone()
        })
        .collect();
    tracing::info!(streams = %reverified.join(","), error = error.as_deref().unwrap_or(""), "re-verified after the repair");
    AfterRepair {
        reverified,
        streams,
        error,
    }
}

/// Compares each of `streams` (one task per stream: its topic read, then its CRM reads; a
/// small stream's CRM reads overlap a large stream's topic read); returns their reports in
/// the order of [`STREAMS`] and the records a repair would send.
async fn compare_streams(
    ctx: &Arc<Ctx>,
    streams: &[&'static str],
    tags: &[String],
) -> Result<(Vec<StreamReport>, Candidates), VerifyError> {
    let mut tasks = tokio::task::JoinSet::new();
    for &stream in streams {
        let ctx = ctx.clone();
        let tags = tags.to_vec();
        tasks.spawn(async move {
            let events = read_topic(&ctx, stream);
            let mut candidates = Candidates::default();
            let c = &mut candidates;
            let report = match stream {
                "leads" => verify_stream::<Lead>(ctx, stream, events, &[], &mut c.leads).await,
                "customers" => {
                    verify_stream::<Customer>(ctx, stream, events, &[], &mut c.customers).await
                }
                "transactions" => {
                    verify_stream::<Transaction>(ctx, stream, events, &[], &mut c.transactions)
                        .await
                }
                "servers" => verify_servers(ctx, events, &mut c.servers).await,
                _ => verify_stream::<Position>(ctx, stream, events, &tags, &mut c.positions).await,
            };
            report.map(|r| (r, candidates))
        });
    }
    let mut reports = Vec::new();
    let mut candidates = Candidates::default();
    while let Some(joined) = tasks.join_next().await {
        let (report, found) = joined.map_err(|e| VerifyError::Failed(e.to_string()))??;
        reports.push(report);
        candidates.leads.extend(found.leads);
        candidates.customers.extend(found.customers);
        candidates.transactions.extend(found.transactions);
        candidates.servers.extend(found.servers);
        candidates.positions.extend(found.positions);
    }
    reports.sort_by_key(|r| STREAMS.iter().position(|s| *s == r.stream));
    Ok((reports, candidates))
}

/// Connects to Kafka once: a refused login or TLS handshake is told at once, naming the key.
async fn reach_kafka(config: &Config) -> Result<(), VerifyError> {
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || {
        crate::kafka::refusal::reach(&kafka, Duration::from_secs(30))
    })
    .await
    .map_err(|e| VerifyError::Failed(e.to_string()))?
    .map_err(VerifyError::Failed)?;
    Ok(())
}

/// Reads a stream's topic to its end on a blocking thread.
/// The read of a stream's topic, under way on a blocking thread.
type TopicRead = tokio::task::JoinHandle<Result<TopicEvents, String>>;

/// Starts reading a stream's topic to its end on a blocking thread.
fn read_topic(ctx: &Arc<Ctx>, stream: &str) -> TopicRead {
    let kafka = ctx.config.kafka.clone();
    let topic = ctx.config.topics.data_topic(stream);
    let timeout = Duration::from_secs(kafka.batch_timeout_secs.max(30));
    let ctx = ctx.clone();
    tokio::task::spawn_blocking(move || {
        topics::read_topic(&kafka, &topic, timeout, &ctx.progress.events)
    })
}

/// Waits for a topic read.
async fn topic_read(read: TopicRead) -> Result<Arc<TopicEvents>, VerifyError> {
    read.await
        .map_err(|e| VerifyError::Failed(e.to_string()))?
        .map(Arc::new)
        .map_err(VerifyError::Failed)
}

/// The volatile fields of a stream.
fn volatile(config: &Config, stream: &str) -> Vec<String> {
    let s = &config.streams;
    match stream {
        "leads" => s.leads.volatile_fields.clone(),
        "customers" => s.customers.volatile_fields.clone(),
        "transactions" => s.transactions.volatile_fields.clone(),
        "servers" => s.servers.volatile_fields.clone(),
        _ => s.positions.volatile_fields.clone(),
    }
}

/// Compares what the CRM serves for one read record with the topic's latest event, and adds
/// both sides to the totals; returns whether the record is a repair candidate.
struct Side {
    ctx: Arc<Ctx>,
    stream: &'static str,
    event: EventType,
    volatile: Vec<String>,
    encoder: Encoder,
    meta: EventMeta,
    report: StreamReport,
    /// Scratch space for the names of sums.
    name: String,
}

/// A CRM record `verify` compares: one a stream emits, with its totals.
pub trait Verified: StreamRecord + ModelFacts {}
impl<T: StreamRecord + ModelFacts> Verified for T {}

impl Side {
    fn new(ctx: Arc<Ctx>, stream: &'static str) -> Result<Side, VerifyError> {
        Ok(Side {
            stream,
            event: EventType::parse(stream).unwrap_or(EventType::Lead),
            volatile: volatile(&ctx.config, stream),
            encoder: ctx.encoder()?,
            // Left out of every comparison.
            meta: EventMeta::blank(),
            report: StreamReport::default(),
            name: String::new(),
            ctx,
        })
    }

    /// Adds what another scope of the stream found.
    fn merge(&mut self, other: StreamReport) {
        let r = &mut self.report;
        r.crm_records += other.crm_records;
        r.pages += other.pages;
        r.missing.extend(other.missing);
        r.extra.extend(other.extra);
        r.different.extend(other.different);
        r.dead_letters.extend(other.dead_letters);
        r.unreadable_events.extend(other.unreadable_events);
        r.not_verified.extend(other.not_verified);
        r.incomplete_days.extend(other.incomplete_days);
        for (day, (crm, kafka)) in other.days {
            let (c, k) = r.days.entry(day).or_default();
            for (into, from) in [(c, crm), (k, kafka)] {
                into.records += from.records;
                for (name, value) in from.sums {
                    into.add(name, value);
                }
            }
        }
    }

    /// Compares one record read from the CRM with the digest of the topic's latest event of
    /// its key, and marks the key seen.
    fn compare<T: Verified>(
        &mut self,
        key: &str,
        record: &Result<Record<T>, crate::crm::RecordError>,
        events: &TopicEvents,
    ) -> Compared {
        // Returned by the CRM, so never extra – whether it can be read or not.
        let latest = events.latest.get(key);
        if let Some(latest) = latest {
            latest.seen.store(true, Ordering::Relaxed);
        }
        let in_kafka = latest.is_some();
        let record = match record {
            Ok(r) if r.model.id().is_some() => r,
            Ok(_) => {
                self.dead_letter(key, in_kafka, "record has no id".to_owned());
                return Compared::Done;
            }
            Err(e) => {
                self.dead_letter(key, in_kafka, e.reason.clone());
                return Compared::Done;
            }
        };
        // The event `run` would write for the record (a dead letter where `run` makes one:
        // the encoder refuses it, or it is larger than Kafka accepts – the rule of
        // `stream::poller`).
        let encoded = match self.encoder.encode(&record.model, &self.meta) {
            Ok(encoded) => encoded,
            Err(e) => {
                self.dead_letter(key, in_kafka, e.to_string());
                return Compared::Done;
            }
        };
        let max = self.ctx.config.kafka.max_message_bytes();
        if encoded.len() > max {
            let reason = format!(
                "the event is {} bytes, more than Kafka accepts (message.max.bytes = {max})",
                encoded.len()
            );
            self.dead_letter(key, in_kafka, reason);
            return Compared::Done;
        }
        self.report.crm_records += 1;
        let (tz, range) = (self.ctx.tz, self.ctx.range);
        let facts = record.model.facts(tz);
        let Some(latest) = latest else {
            facts.add_to(range, &mut self.report.days, true, &mut self.name);
            self.report.missing.push(KeyDiff {
                key: key.to_owned(),
                day: facts.day,
                detail: String::new(),
            });
            return Compared::Missing;
        };
        // Fast path: the same digest of the schema and the entity bytes is the same values
        // (volatile ones too); only keys whose digests differ are read again and compared
        // field by field ([`Side::resolve`]).
        let crm_digest = compare::digest(&encoded);
        if crm_digest.is_some() && crm_digest == latest.digest {
            facts.add_to(range, &mut self.report.days, true, &mut self.name);
            facts.add_to(range, &mut self.report.days, false, &mut self.name);
            return Compared::Done;
        }
        let crm = match self.ctx.decoder.decode(self.event, &encoded) {
            Ok(value) => body(value, &self.volatile),
            Err(e) => {
                self.dead_letter(key, true, format!("cannot read back its own event: {e}"));
                return Compared::Done;
            }
        };
        facts.add_to(range, &mut self.report.days, true, &mut self.name);
        Compared::Deferred(crm, facts.day)
    }

    /// Compares a key whose digests differed field by field, with the topic's event read
    /// again; returns the candidate back when the fields differ.
    fn resolve<T>(&mut self, deferred: Deferred<T>, payload: &[u8]) -> Option<Candidate<T>> {
        let (tz, range) = (self.ctx.tz, self.ctx.range);
        let key = &deferred.candidate.key;
        let kafka = match self.ctx.decoder.decode(self.event, payload) {
            Ok(value) => body(value, &self.volatile),
            // Unknown, not different: never a repair candidate (its writer may be newer).
            Err(e) => {
                self.report.unreadable_events.push(KeyDiff {
                    key: key.clone(),
                    day: deferred.day,
                    detail: format!("the event cannot be read: {e}"),
                });
                return None;
            }
        };
        compare::facts_of(self.stream, &kafka, tz).add_to(
            range,
            &mut self.report.days,
            false,
            &mut self.name,
        );
        let fields = differing(&deferred.crm, &kafka);
        if fields.is_empty() {
            return None;
        }
        self.report.different.push(KeyDiff {
            key: key.clone(),
            day: deferred.day,
            detail: fields.into_iter().take(5).collect::<Vec<_>>().join(", "),
        });
        Some(deferred.candidate)
    }

    /// Records a dead letter; `in_kafka`: the topic holds an event of the key (a payout
    /// engine reads that older version).
    fn dead_letter(&mut self, key: &str, in_kafka: bool, reason: String) {
        let detail = match in_kafka {
            true => format!("the topic holds an older event of it; {reason}"),
            false => reason,
        };
        self.report.dead_letters.push(KeyDiff {
            key: key.to_owned(),
            day: None,
            detail,
        });
    }

    /// Reads the topic's events again where the digests could not settle it, and settles it:
    /// the keys whose digests differed (`deferred`, compared field by field), the keys the CRM
    /// did not return (extra when of the scopes read – `belongs` – and dated in the range,
    /// skipping days not read completely), and the positions of the server tags the CRM
    /// refused (`refused`: tag and why; counted as not verified). Reads nothing when every key
    /// was returned and equal.
    async fn second_look<T>(
        &mut self,
        events: &Arc<TopicEvents>,
        deferred: Vec<Deferred<T>>,
        refused: &[(String, String)],
        belongs: impl Fn(&str) -> bool,
        incomplete: impl Fn(&str, NaiveDate) -> bool,
        candidates: &mut Vec<Candidate<T>>,
    ) -> Result<(), VerifyError> {
        let unseen = events
            .latest
            .values()
            .any(|latest| !latest.seen.load(Ordering::Relaxed));
        if deferred.is_empty() && !unseen && refused.is_empty() {
            return Ok(());
        }
        let mut deferred: topics::KeyMap<Deferred<T>> = deferred
            .into_iter()
            .map(|d| (d.candidate.key.clone(), d))
            .collect();
        let wanted: std::collections::HashSet<String> = deferred.keys().cloned().collect();
        let kafka = self.ctx.config.kafka.clone();
        let topic = self.ctx.config.topics.data_topic(self.stream);
        let timeout = Duration::from_secs(kafka.batch_timeout_secs.max(30));
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let read = events.clone();
        // Every key of a refused tag, seen or not: a tag whose read failed partway had some
        // of its keys marked seen by the windows it did serve, and its whole outcome is
        // dropped – counted from part of its keys, it could count 0 and pass as verified.
        let refused_tags: Vec<String> = refused.iter().map(|(tag, _)| tag.clone()).collect();
        let reader = tokio::task::spawn_blocking(move || {
            let want = |key: &str, latest: &topics::Latest| {
                !latest.seen.load(Ordering::Relaxed)
                    || wanted.contains(key)
                    || refused_tags.iter().any(|tag| of_tag(key, tag))
            };
            topics::reread(&kafka, &topic, &read, want, &tx, timeout)
        });
        let mut refused_counts = vec![(0u64, 0u64); refused.len()];
        while let Some((key, payload)) = rx.recv().await {
            if let Some(d) = deferred.remove(&key) {
                candidates.extend(self.resolve(d, &payload));
            } else if let Some(i) = refused.iter().position(|(tag, _)| of_tag(&key, tag)) {
                let counts = &mut refused_counts[i];
                match self.ctx.decoder.decode(self.event, &payload) {
                    Ok(value) => {
                        let kafka = body(value, &[]);
                        let day = compare::day(&kafka, "closeTime", self.ctx.tz);
                        let range = self.ctx.range;
                        counts.0 += u64::from(day.is_some_and(|d| d >= range.0 && d <= range.1));
                    }
                    Err(_) => counts.1 += 1,
                }
            } else if belongs(&key) {
                self.extra(&key, &payload, &incomplete);
            }
        }
        reader
            .await
            .map_err(|e| VerifyError::Failed(e.to_string()))?
            .map_err(VerifyError::Failed)?;
        // An event read first and gone when read again (retention or compaction meanwhile):
        // what the topic holds of the key is unknown.
        for (key, d) in deferred {
            self.report.unreadable_events.push(KeyDiff {
                key,
                day: d.day,
                detail: "its event was gone when read again (deleted meanwhile)".to_owned(),
            });
        }
        // A key the CRM did not return whose event was gone when read again (retention or
        // compaction meanwhile) is in neither: the two sides agree.
        for ((tag, reason), (in_range, unreadable)) in refused.iter().zip(refused_counts) {
            if in_range + unreadable == 0 {
                continue;
            }
            self.report.not_verified.push(KeyDiff {
                key: tag.clone(),
                day: None,
                detail: format!(
                    "server not live; the CRM did not serve its positions ({reason}); the topic holds {in_range} of them dated in the range, {unreadable} unreadable"
                ),
            });
        }
        Ok(())
    }

    /// Reports a key the CRM did not return when its record day lies in the range (and the
    /// day was read completely).
    fn extra(&mut self, key: &str, payload: &[u8], incomplete: &impl Fn(&str, NaiveDate) -> bool) {
        let tz = self.ctx.tz;
        let range = self.ctx.range;
        let kafka = match self.ctx.decoder.decode(self.event, payload) {
            Ok(value) => body(value, &self.volatile),
            Err(e) => {
                self.report.unreadable_events.push(KeyDiff {
                    key: key.to_owned(),
                    day: None,
                    detail: e,
                });
                return;
            }
        };
        let day = match day_field(self.stream) {
            None => None,
            Some(f) => match compare::day(&kafka, f, tz) {
                Some(day) if day >= range.0 && day <= range.1 && !incomplete(key, day) => Some(day),
                _ => return,
            },
        };
        compare::facts_of(self.stream, &kafka, tz).add_to(
            range,
            &mut self.report.days,
            false,
            &mut self.name,
        );
        self.report.extra.push(KeyDiff {
            key: key.to_owned(),
            day,
            detail: String::new(),
        });
    }

    /// Reads the topic again past the offsets read, to its `read_committed` end as the
    /// broker reports it now: any record there is listed read short (not equal).
    async fn read_past(&mut self, events: &Arc<TopicEvents>) -> Result<(), VerifyError> {
        let kafka = self.ctx.config.kafka.clone();
        let topic = self.ctx.config.topics.data_topic(self.stream);
        let timeout = Duration::from_secs(kafka.batch_timeout_secs.max(30));
        let read = events.clone();
        let later =
            tokio::task::spawn_blocking(move || topics::read_past(&kafka, &topic, &read, timeout))
                .await
                .map_err(|e| VerifyError::Failed(e.to_string()))?
                .map_err(VerifyError::Failed)?;
        self.report.offsets_read = events.offsets.clone();
        for record in later {
            let next = self
                .report
                .offsets_read
                .entry(record.partition)
                .or_default();
            *next = (*next).max(record.offset + 1);
            self.report.read_short.push(KeyDiff {
                key: record.key,
                day: None,
                detail: format!(
                    "partition {} offset {}: past the end the topic was read to",
                    record.partition, record.offset
                ),
            });
        }
        Ok(())
    }

    fn finish(mut self, events: &TopicEvents) -> StreamReport {
        self.report.stream = self.stream.to_owned();
        self.report.kafka_events = events.events;
        for list in [
            &mut self.report.missing,
            &mut self.report.extra,
            &mut self.report.different,
            &mut self.report.dead_letters,
            &mut self.report.unreadable_events,
            &mut self.report.not_verified,
            &mut self.report.read_short,
        ] {
            list.sort_by(|a, b| (a.day, &a.key).cmp(&(b.day, &b.key)));
        }
        self.report
    }
}

/// What comparing one CRM record with the digest of the topic's event found.
enum Compared {
    /// Equal, or reported (a dead letter): nothing to send.
    Done,
    /// Missing: a candidate the topic holds no event of.
    Missing,
    /// The digests differ: the CRM side's compared body and the record's day, to compare
    /// field by field with the topic's event once it is read again ([`Side::resolve`]).
    Deferred(compare::Body, Option<NaiveDate>),
}

/// A key whose digests differed, waiting for its event to be read again.
struct Deferred<T> {
    /// The candidate, should the fields differ.
    candidate: Candidate<T>,
    /// The CRM side's compared body.
    crm: compare::Body,
    /// The record's day.
    day: Option<NaiveDate>,
}

/// Whether `key` is a position's key (`tag:id`) of the server tag `tag`.
fn of_tag(key: &str, tag: &str) -> bool {
    key.strip_prefix(tag)
        .is_some_and(|rest| rest.starts_with(':'))
}

/// Files what [`Side::compare`] found of a readable record – `(key, scope, window, record)` –
/// as a candidate to send: a key the topic lacks at once, a key whose digests differ once its
/// event was read again and compared field by field ([`Side::resolve`]); an equal key is
/// done.
fn file<T>(
    compared: Compared,
    (key, scope, window, record): (String, &str, Option<(NaiveDate, NaiveDate)>, Record<T>),
    deferred: &mut Vec<Deferred<T>>,
    candidates: &mut Vec<Candidate<T>>,
) {
    let candidate = |in_kafka| Candidate {
        key,
        scope: scope.to_owned(),
        window,
        in_kafka,
        record,
    };
    match compared {
        Compared::Done => {}
        Compared::Missing => candidates.push(candidate(false)),
        Compared::Deferred(crm, day) => deferred.push(Deferred {
            candidate: candidate(true),
            crm,
            day,
        }),
    }
}

/// What the reads of one scope (a stream, or a server tag of positions) found.
struct ScopeOutcome<T> {
    report: StreamReport,
    candidates: Vec<Candidate<T>>,
    /// Keys whose digests differed.
    deferred: Vec<Deferred<T>>,
    /// Days not read completely, by server tag.
    incomplete: Vec<(Option<String>, NaiveDate)>,
}

/// Verifies a windowed stream (positions: every live server tag, or `tags`, each read
/// concurrently as `run` reads them).
async fn verify_stream<T: Verified>(
    ctx: Arc<Ctx>,
    stream: &'static str,
    events: TopicRead,
    tags: &[String],
    candidates: &mut Vec<Candidate<T>>,
) -> Result<StreamReport, VerifyError> {
    let scopes: Vec<Option<String>> = match stream {
        "positions" => position_tags(&ctx, tags)
            .await?
            .into_iter()
            .map(Some)
            .collect(),
        _ => vec![None],
    };
    // The CRM reads start while the topic is read; their windows wait (a few, bounded) for
    // the comparison.
    let mut crm_reads = Vec::new();
    for tag in scopes.clone() {
        crm_reads.push((tag.clone(), start_crm_read::<T>(&ctx, stream, tag)));
    }
    let events = topic_read(events).await?;
    // Positions of server tags not live today (a server removed from the list) are read by
    // their tag too: the topic's keys name them.
    let mut scopes = scopes;
    let mut retired = Vec::new();
    if stream == "positions" && tags.is_empty() {
        for tag in retired_tags(&ctx, &events, &scopes) {
            crm_reads.push((
                Some(tag.clone()),
                start_crm_read::<T>(&ctx, stream, Some(tag.clone())),
            ));
            scopes.push(Some(tag.clone()));
            retired.push(tag);
        }
    }
    let mut reads = tokio::task::JoinSet::new();
    for (tag, crm_read) in crm_reads {
        let (ctx, events) = (ctx.clone(), events.clone());
        reads.spawn(async move {
            let outcome = verify_scope::<T>(ctx, stream, events, tag.clone(), crm_read).await;
            (tag, outcome)
        });
    }
    let mut side = Side::new(ctx.clone(), stream)?;
    let mut incomplete = Vec::new();
    let mut deferred = Vec::new();
    let mut refused = Vec::new();
    while let Some(read) = reads.join_next().await {
        let (tag, outcome) = read.map_err(|e| VerifyError::Failed(e.to_string()))?;
        let outcome = match (outcome, tag) {
            (Ok(outcome), _) => outcome,
            // A server no longer listed whose positions the CRM will not serve: its
            // positions dated in the range are not verified (nor extra: the CRM was not asked).
            (Err(e), Some(tag)) if retired.contains(&tag) => {
                scopes.retain(|s| s.as_ref() != Some(&tag));
                refused.push((tag, e.to_string()));
                continue;
            }
            (Err(e), _) => return Err(e),
        };
        side.merge(outcome.report);
        candidates.extend(outcome.candidates);
        deferred.extend(outcome.deferred);
        incomplete.extend(outcome.incomplete);
    }
    side.second_look(
        &events,
        deferred,
        &refused,
        // Positions: only the keys of the tags read (none when no tag was read).
        |key| stream != "positions" || scopes.iter().flatten().any(|tag| of_tag(key, tag)),
        |key, day| {
            incomplete
                .iter()
                .any(|(tag, d)| *d == day && tag.as_ref().is_none_or(|tag| of_tag(key, tag)))
        },
        candidates,
    )
    .await?;
    side.read_past(&events).await?;
    let report = side.finish(&events);
    release(events);
    Ok(report)
}

/// A CRM read under way: its complete windows, and the days it found short at its end.
struct CrmRead<T> {
    windows: tokio::sync::mpsc::Receiver<crm::WindowRead<T>>,
    task: tokio::task::JoinHandle<Result<Vec<(NaiveDate, u64)>, crate::crm::CrmError>>,
}

/// Windows read ahead of the comparison at most: while the topic is read, the CRM reads go
/// on until this many windows wait (a window holds at most `streams.max_window_records`
/// records, 50,000 by default: 4 windows are up to 200,000 parsed records per scope; with 32
/// every window of the benchmark's largest stream, 17, could wait in memory).
const WINDOWS_AHEAD: usize = 4;

/// Frees a topic's key map off the critical path (a million keys take a while to free; the
/// report does not wait for it).
fn release(events: Arc<TopicEvents>) {
    tokio::task::spawn_blocking(move || drop(events));
}

/// Starts reading one scope (a stream, or one server tag of positions) from the CRM.
fn start_crm_read<T: Verified>(
    ctx: &Arc<Ctx>,
    stream: &'static str,
    tag: Option<String>,
) -> CrmRead<T> {
    let streams = &ctx.config.streams;
    let filter = match stream {
        "leads" | "customers" => DateFilter::Registration,
        "transactions" => DateFilter::Transaction,
        _ => DateFilter::PositionClose,
    };
    let spec = crm::ReadSpec {
        filter,
        server_tag: tag,
        include_fake: stream == "transactions" && streams.include_fake_transactions,
        volatile: volatile(&ctx.config, stream).into(),
        window_days: streams.backfill_window_days,
        max_window_records: streams.max_window_records,
        max_drift_rereads: streams.max_drift_rereads,
    };
    let (tx, windows) = tokio::sync::mpsc::channel(WINDOWS_AHEAD);
    let ctx = ctx.clone();
    let task = tokio::spawn(async move {
        crm::read_days::<T>(&ctx.client, &spec, ctx.range.0, ctx.range.1, tx).await
    });
    CrmRead { windows, task }
}

/// Compares one scope's CRM windows with the topic as they come.
async fn verify_scope<T: Verified>(
    ctx: Arc<Ctx>,
    stream: &'static str,
    events: Arc<TopicEvents>,
    tag: Option<String>,
    mut crm_read: CrmRead<T>,
) -> Result<ScopeOutcome<T>, VerifyError> {
    let mut side = Side::new(ctx.clone(), stream)?;
    let mut candidates = Vec::new();
    let mut deferred = Vec::new();
    let scope = match &tag {
        Some(tag) => format!("{stream}/{tag}"),
        None => stream.to_owned(),
    };
    let started = std::time::Instant::now();
    while let Some(read) = crm_read.windows.recv().await {
        side.report.pages += read.pages;
        ctx.progress.pages.fetch_add(read.pages, Ordering::Relaxed);
        ctx.progress
            .records
            .fetch_add(read.records.len() as u64, Ordering::Relaxed);
        for (key, record) in read.records {
            let compared = side.compare(&key, &record, &events);
            if let Ok(record) = record {
                let candidate = (key, scope.as_str(), Some(read.window), record);
                file(compared, candidate, &mut deferred, &mut candidates);
            }
        }
    }
    let short = crm_read
        .task
        .await
        .map_err(|e| VerifyError::Failed(e.to_string()))?
        .map_err(|e| VerifyError::Failed(format!("{scope}: {e}")))?;
    tracing::info!(scope = %scope, pages = side.report.pages, records = side.report.crm_records, elapsed_ms = started.elapsed().as_millis() as u64, "crm read and compared");
    let mut incomplete = Vec::new();
    for (day, missing) in short {
        side.report
            .incomplete_days
            .push((scope.clone(), day, missing));
        incomplete.push((tag.clone(), day));
    }
    Ok(ScopeOutcome {
        report: side.report,
        candidates,
        deferred,
        incomplete,
    })
}

/// Returns the server tags of the topic's position keys (`tag:id`) that are not among
/// `scopes` (the live servers read), as far as `streams.server_tags` lets `run` read them.
fn retired_tags(ctx: &Ctx, events: &TopicEvents, scopes: &[Option<String>]) -> Vec<String> {
    let mut found = std::collections::BTreeSet::new();
    for key in events.latest.keys() {
        let Some((tag, _)) = key.split_once(':') else {
            continue;
        };
        if found.contains(tag) || scopes.iter().flatten().any(|s| s == tag) {
            continue;
        }
        let allowed = ctx.config.streams.server_tags.as_ref();
        if allowed.is_none_or(|only| only.iter().any(|t| t == tag)) {
            found.insert(tag.to_owned());
        }
    }
    found.into_iter().collect()
}

/// Returns the server tags whose positions are verified: the live servers `run` reads (only
/// `streams.server_tags` when set), only `asked` when given.
async fn position_tags(ctx: &Ctx, asked: &[String]) -> Result<Vec<String>, VerifyError> {
    let servers = ctx
        .client
        .servers(&[])
        .await
        .map_err(|e| VerifyError::Failed(format!("servers: {e}")))?;
    let live: Vec<String> = servers
        .into_iter()
        .filter_map(Result::ok)
        .map(|r| r.model)
        .filter(Server::is_live)
        .filter_map(|s| s.id)
        .filter(|tag| {
            ctx.config
                .streams
                .server_tags
                .as_ref()
                .is_none_or(|only| only.contains(tag))
        })
        .collect();
    if asked.is_empty() {
        return Ok(live);
    }
    for tag in asked {
        if !live.contains(tag) {
            return Err(VerifyError::Usage(format!(
                "--server-tag {tag}: not a live server `run` reads (live: {})",
                live.join(", ")
            )));
        }
    }
    Ok(asked.to_vec())
}

/// Verifies the servers list (read whole: no days).
async fn verify_servers(
    ctx: Arc<Ctx>,
    events: TopicRead,
    candidates: &mut Vec<Candidate<Server>>,
) -> Result<StreamReport, VerifyError> {
    let volatile = volatile(&ctx.config, "servers");
    let records = ctx
        .client
        .servers(&volatile)
        .await
        .map_err(|e| VerifyError::Failed(format!("servers: {e}")))?;
    let events = topic_read(events).await?;
    let mut side = Side::new(ctx, "servers")?;
    side.report.pages = 1;
    let mut deferred = Vec::new();
    for record in records {
        let key = crm::key_of(&record, None);
        let compared = side.compare(&key, &record, &events);
        if let Ok(record) = record {
            file(
                compared,
                (key, "servers", None, record),
                &mut deferred,
                candidates,
            );
        }
    }
    side.second_look(&events, deferred, &[], |_| true, |_, _| false, candidates)
        .await?;
    side.read_past(&events).await?;
    let report = side.finish(&events);
    release(events);
    Ok(report)
}

/// Returns the exit code of a report: 0 equal, 1 anything differs – after a repair that sent
/// events, by the comparison made again after it ([`Report::ends_equal`]).
pub fn exit_code(report: &Report) -> u8 {
    u8::from(!report.ends_equal())
}
