//! The sink: the one owner of the Kafka producer.
//!
//! Pollers send [`Batch`]es through a bounded channel and wait for the acknowledgement; only
//! then do they move their in-memory cursors and fingerprints. What is durable when:
//!
//! - `exactly-once`: one transaction holding batches' events and state records (the batches
//!   several pollers sent meanwhile share one transaction: a group commit); on commit both
//!   are visible to `read_committed` consumers, on abort neither (a failed transaction fails
//!   every batch in it, each retried by its poller). A failed batch
//!   is aborted and retried (bounded). A commit that fails with a retriable error (a timeout)
//!   may have been applied, so the commit is retried, never aborted and sent again. An abort
//!   that times out is called again (bounded). An abort that still fails while no other
//!   process fenced this one (the broker aborted the transaction itself: an outage longer than
//!   the transaction timeout) fails the batches and replaces the producer with a new one
//!   (`init_transactions`, as a restart would; bounded: [`PRODUCER_REBUILDS`] in a row). A
//!   fenced producer (another process took over the same `kafka.instance_id`), a fatal
//!   producer error and a new producer that cannot start are fatal.
//! - `at-least-once`: the events are produced by an idempotent producer and acknowledged
//!   first, then the state records. A crash in between leaves events without their state:
//!   the batch is read and emitted again, with the same `eventId`s. A fatal error of the
//!   idempotent producer (it cannot keep its guarantees any more) is fatal for the process,
//!   so an orchestrator restarts it, never retried forever.
//!
//! rdkafka's transactional calls block, so the exactly-once sink runs on a blocking thread,
//! one transaction at a time; the at-least-once sink produces batches concurrently.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{ConfigError, Delivery, KafkaConfig};

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    /// Topic.
    pub topic: String,
    /// Key bytes.
    pub key: Vec<u8>,
    /// Value bytes; `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
}

/// What a poller commits at once.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Data events and dead letters.
    pub events: Vec<OutRecord>,
    /// State records (fingerprints, cursors, tombstones), written with or after the events.
    pub state: Vec<OutRecord>,
}

impl Batch {
    /// Returns whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.state.is_empty()
    }
}

/// Why a batch was not committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// The batch failed; a later cycle may succeed.
    #[error("kafka batch failed: {0}")]
    Retriable(String),
    /// The producer cannot go on (fenced, fatal error, sink gone); the process must stop.
    #[error("kafka producer stopped: {0}")]
    Fatal(String),
}

/// A batch and where its outcome goes.
pub(crate) type Request = (Batch, oneshot::Sender<Result<(), SinkError>>);

/// The pollers' side of the sink.
#[derive(Clone, Debug)]
pub struct SinkHandle {
    tx: mpsc::Sender<Request>,
    stats: Arc<SinkStats>,
}

/// Counters of the sink.
#[derive(Debug)]
pub struct SinkStats {
    /// Batches committed.
    pub batches: AtomicU64,
    /// Transactions committed (exactly-once; one holds the batches of several pollers).
    pub transactions: AtomicU64,
    /// Transactions aborted (each followed by a retry or a failed batch).
    pub aborts: AtomicU64,
    /// Commits called again after a retriable failure (outcome unknown, e.g. a timeout).
    pub commit_retries: AtomicU64,
    /// Key and value bytes of the records of committed batches (events and state).
    pub bytes: AtomicU64,
    /// State-topic records of committed batches.
    pub state_records: AtomicU64,
    /// Key and value bytes of those state records.
    pub state_bytes: AtomicU64,
    /// Seconds from a batch reaching the sink to its outcome.
    pub batch_duration: prometheus_client::metrics::histogram::Histogram,
    /// The last batch's failure, if the last batch failed.
    last_failure: std::sync::Mutex<Option<String>>,
    /// Why the producer stopped (its fatal error), once it did: what every batch sent after
    /// is answered with, so each poller names the cause (e.g. fenced), not the sink's end.
    stopped: std::sync::OnceLock<String>,
    /// Batches handed to the sink and not answered yet, and since when the sink has waited
    /// without any of them finishing (reset whenever one finishes).
    in_flight: std::sync::Mutex<(u64, Option<std::time::Instant>)>,
}

impl Default for SinkStats {
    fn default() -> Self {
        SinkStats {
            batches: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            aborts: AtomicU64::new(0),
            commit_retries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            state_records: AtomicU64::new(0),
            state_bytes: AtomicU64::new(0),
            batch_duration: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16),
            ),
            last_failure: std::sync::Mutex::default(),
            stopped: std::sync::OnceLock::new(),
            in_flight: std::sync::Mutex::default(),
        }
    }
}

/// Locks a mutex; a panic elsewhere while it was held leaves the data usable here.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SinkStats {
    fn started(&self) {
        let mut in_flight = lock(&self.in_flight);
        in_flight.0 += 1;
        in_flight.1.get_or_insert_with(std::time::Instant::now);
    }

    fn finished(
        &self,
        started: std::time::Instant,
        batch: &Batch,
        outcome: &Result<(), SinkError>,
    ) {
        self.batch_duration.observe(started.elapsed().as_secs_f64());
        {
            let mut in_flight = lock(&self.in_flight);
            in_flight.0 = in_flight.0.saturating_sub(1);
            in_flight.1 = (in_flight.0 > 0).then(std::time::Instant::now);
        }
        match outcome {
            Ok(()) => {
                self.batches.fetch_add(1, Ordering::Relaxed);
                let size = |records: &[OutRecord]| -> u64 {
                    records
                        .iter()
                        .map(|r| (r.key.len() + r.payload.as_ref().map_or(0, Vec::len)) as u64)
                        .sum()
                };
                let state_bytes = size(&batch.state);
                self.bytes
                    .fetch_add(size(&batch.events) + state_bytes, Ordering::Relaxed);
                self.state_records
                    .fetch_add(batch.state.len() as u64, Ordering::Relaxed);
                self.state_bytes.fetch_add(state_bytes, Ordering::Relaxed);
                *lock(&self.last_failure) = None;
            }
            Err(e) => *lock(&self.last_failure) = Some(e.to_string()),
        }
    }

    /// Returns whether the sink is healthy: its last batch succeeded, and with batches in
    /// flight, one finished within `timeout`.
    pub fn health(&self, timeout: Duration) -> Result<(), String> {
        if let Some(failure) = lock(&self.last_failure).clone() {
            return Err(format!("the last batch failed: {failure}"));
        }
        match *lock(&self.in_flight) {
            (n, Some(since)) if n > 0 && since.elapsed() > timeout => Err(format!(
                "a batch has waited {} s for Kafka (kafka.batch_timeout_secs = {})",
                since.elapsed().as_secs(),
                timeout.as_secs()
            )),
            _ => Ok(()),
        }
    }
}

impl SinkHandle {
    /// Returns the sink's counters.
    pub fn stats(&self) -> &SinkStats {
        &self.stats
    }

    /// Returns the sink's counters, to share (the operations registry).
    pub fn shared_stats(&self) -> Arc<SinkStats> {
        self.stats.clone()
    }

    /// Returns a handle whose batches arrive, with the channel to answer each, on the
    /// receiver: a sink a test answers itself (holding a commit back, failing it).
    #[cfg(test)]
    pub(crate) fn held() -> (SinkHandle, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(8);
        (
            SinkHandle {
                tx,
                stats: Arc::default(),
            },
            rx,
        )
    }

    /// Commits a batch and waits for the outcome.
    pub async fn commit(&self, batch: Batch) -> Result<(), SinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let (ack, outcome) = oneshot::channel();
        let stopped = |otherwise: &str| {
            SinkError::Fatal(
                self.stats
                    .stopped
                    .get()
                    .map_or_else(|| otherwise.to_owned(), Clone::clone),
            )
        };
        self.tx
            .send((batch, ack))
            .await
            .map_err(|_| stopped("the sink has stopped"))?;
        outcome
            .await
            .unwrap_or_else(|_| Err(stopped("the sink stopped before answering")))
    }
}

/// Errors of starting the sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkStartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The producer could not be created or initialised.
    #[error("{0}")]
    Kafka(String),
}

/// The running sink: its handle and the thread that owns the producer.
pub struct Sink {
    /// Handle to send batches.
    pub handle: SinkHandle,
    /// Ends when every handle is dropped and the last batch is done; yields the producer's
    /// final flush result.
    pub task: tokio::task::JoinHandle<Result<(), SinkError>>,
}

/// Retries of a failed transaction before the batch fails.
const TRANSACTION_ATTEMPTS: u32 = 3;

/// Builds the producer `config` asks for and starts the sink. In exactly-once mode this
/// initialises transactions, which also fences and aborts what an earlier process with the
/// same `instance_id` left open.
pub async fn start(config: &KafkaConfig) -> Result<Sink, SinkStartError> {
    let client = producer_config(config)?;
    let delivery = config.delivery;
    let producer: Arc<KafkaProducer> =
        Arc::new(client.create_with_context(Deliveries).map_err(|e| {
            SinkStartError::Kafka(format!("cannot create the Kafka producer: {e}"))
        })?);
    let timeout = Duration::from_secs(config.batch_timeout_secs);
    if delivery == Delivery::ExactlyOnce {
        // A transaction log the cluster cannot host would make init_transactions wait its
        // whole timeout, then say only that it timed out.
        if let Some(problem) = super::restore::transaction_log_problem(config, false).await {
            return Err(SinkStartError::Kafka(problem));
        }
        let p = producer.clone();
        let initialised = tokio::task::spawn_blocking(move || init_transactions(&p, timeout))
            .await
            .map_err(|e| SinkStartError::Kafka(e.to_string()))?;
        if let Err(e) = initialised {
            if let Some(problem) = super::restore::transaction_log_problem(config, true).await {
                return Err(SinkStartError::Kafka(format!("{problem} ({e})")));
            }
            return Err(SinkStartError::Kafka(format!(
                "cannot start Kafka transactions ({e}); if the broker does not support transactions, set kafka.delivery = \"at-least-once\""
            )));
        }
        info!(instance_id = %config.instance_id, "kafka transactions initialised");
    }
    let (tx, rx) = mpsc::channel::<Request>(16);
    let stats = Arc::new(SinkStats::default());
    let sink_stats = stats.clone();
    let task = match delivery {
        Delivery::ExactlyOnce => {
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                run(producer, &client, timeout, rx, runtime, &sink_stats)
            })
        }
        Delivery::AtLeastOnce => tokio::spawn(run_concurrent(producer, timeout, rx, sink_stats)),
    };
    Ok(Sink {
        handle: SinkHandle { tx, stats },
        task,
    })
}

/// How long start-up waits for transactions at least, whatever `kafka.batch_timeout_secs`:
/// a fresh Apache Kafka creates and loads its transaction log (`__transaction_state`, 50
/// partitions) on the first `InitProducerId`, which took 2-6 s on a 2-core machine.
const INIT_TRANSACTIONS_MIN: Duration = Duration::from_secs(60);

/// Initialises transactions within `timeout` or [`INIT_TRANSACTIONS_MIN`], the longer:
/// `init_transactions` is called again after a retriable failure (a timeout, the
/// coordinator still loading), as librdkafka asks ("retry call to resume").
fn init_transactions(producer: &KafkaProducer, timeout: Duration) -> Result<(), KafkaError> {
    let deadline = std::time::Instant::now() + timeout.max(INIT_TRANSACTIONS_MIN);
    loop {
        match producer.init_transactions(timeout) {
            Err(KafkaError::Transaction(e))
                if e.is_retriable() && std::time::Instant::now() < deadline =>
            {
                warn!(error = %e, "kafka transactions not ready yet, initialising again");
            }
            outcome => return outcome,
        }
    }
}

/// The producer's librdkafka settings: ibstream's tuning defaults (`linger.ms`), then the
/// `kafka.librdkafka` pass-through and security settings (which may override the defaults),
/// then what the delivery guarantees depend on (never overridable: the config refuses those
/// keys in the pass-through).
pub fn producer_config(config: &KafkaConfig) -> Result<ClientConfig, ConfigError> {
    let mut client = ClientConfig::new();
    client.set("linger.ms", "5");
    for (key, value) in config.client_settings()? {
        client.set(key, value);
    }
    client
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set(
            "message.timeout.ms",
            (config.batch_timeout_secs * 1000).to_string(),
        );
    if config.delivery == Delivery::ExactlyOnce {
        client.set("transactional.id", &config.instance_id).set(
            "transaction.timeout.ms",
            (config.batch_timeout_secs * 1000).to_string(),
        );
    }
    Ok(client)
}

/// The producer: delivery reports are counted per batch ([`Acks`]), not one future per
/// record (a channel, a mutex and a wake-up for each of millions of records).
type KafkaProducer = ThreadedProducer<Deliveries>;

/// Routes each delivery report to the [`Acks`] of its batch.
struct Deliveries;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Arc<Acks>;

    fn delivery(&self, result: &DeliveryResult<'_>, acks: Arc<Acks>) {
        if let Err((error, _)) = result {
            let mut first = lock(&acks.error);
            first.get_or_insert_with(|| error.clone());
        }
        acks.settle_one();
    }
}

/// The outstanding delivery reports of one batch's records and the first failure among them.
struct Acks {
    /// Records enqueued and not reported yet, plus one while records are still being enqueued.
    outstanding: std::sync::atomic::AtomicUsize,
    error: std::sync::Mutex<Option<KafkaError>>,
    settled: tokio::sync::Notify,
}

impl Acks {
    fn new() -> Arc<Acks> {
        Arc::new(Acks {
            outstanding: std::sync::atomic::AtomicUsize::new(1),
            error: std::sync::Mutex::new(None),
            settled: tokio::sync::Notify::new(),
        })
    }

    fn settle_one(&self) {
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_one();
        }
    }

    /// Ends the enqueueing, waits for every report, and returns the first failure.
    async fn wait(&self, producer: &KafkaProducer, timeout: Duration) -> Result<(), SinkError> {
        self.settle_one();
        let all = async {
            while self.outstanding.load(Ordering::Acquire) > 0 {
                self.settled.notified().await;
            }
        };
        // librdkafka reports every record by message.timeout.ms (= the batch timeout); the
        // margin only guards against a report that never comes.
        if tokio::time::timeout(timeout + Duration::from_secs(5), all)
            .await
            .is_err()
        {
            return Err(SinkError::Retriable("delivery reports lost".to_owned()));
        }
        match lock(&self.error).take() {
            Some(e) => Err(delivery_error(producer, e)),
            None => Ok(()),
        }
    }
}

/// At-least-once: batches of different pollers are independent, so they are produced
/// concurrently (a poller sends its next batch only after this one's acknowledgement, which
/// keeps each poller's records in order). Each batch still waits for its events' acks before
/// producing its state.
async fn run_concurrent(
    producer: Arc<KafkaProducer>,
    timeout: Duration,
    mut rx: mpsc::Receiver<Request>,
    stats: Arc<SinkStats>,
) -> Result<(), SinkError> {
    let mut in_flight = tokio::task::JoinSet::new();
    while let Some((batch, ack)) = rx.recv().await {
        let producer = producer.clone();
        let stats = stats.clone();
        let started = std::time::Instant::now();
        stats.started();
        in_flight.spawn(async move {
            let outcome = match produce_async(&producer, &batch.events, timeout).await {
                Ok(()) => produce_async(&producer, &batch.state, timeout).await,
                Err(e) => Err(e),
            };
            stats.finished(started, &batch, &outcome);
            let _ = ack.send(outcome);
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
    tokio::task::spawn_blocking(move || producer.flush(timeout))
        .await
        .map_err(|e| SinkError::Retriable(e.to_string()))?
        .map_err(|e| SinkError::Retriable(format!("final flush failed: {e}")))
}

/// Enqueues every record (waiting while the producer queue is full), then awaits every
/// delivery report.
async fn produce_async(
    producer: &KafkaProducer,
    records: &[OutRecord],
    timeout: Duration,
) -> Result<(), SinkError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let acks = Acks::new();
    for record in records {
        while !try_enqueue(producer, record, &acks)? {
            if tokio::time::Instant::now() > deadline {
                return Err(SinkError::Retriable(
                    "producer queue stayed full".to_owned(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    acks.wait(producer, timeout).await
}

/// Classifies a failed delivery; the producer's own fatal error, when it has one, wins.
fn delivery_error(producer: &KafkaProducer, error: KafkaError) -> SinkError {
    match producer.client().fatal_error() {
        // librdkafka raises a fenced producer as its fatal error: a restart would fence the
        // other process in turn, so it is named, never "restart to go on".
        Some((code, reason)) if is_fenced(code) => SinkError::Fatal(fenced(&reason)),
        Some((code, reason)) => SinkError::Fatal(format!(
            "the Kafka producer hit a fatal error ({code:?}: {reason}); restart to go on"
        )),
        None => classify(error),
    }
}

/// Enqueues one record under `acks`; `false` when the producer's queue is full (the caller
/// waits, retries).
fn try_enqueue(
    producer: &KafkaProducer,
    record: &OutRecord,
    acks: &Arc<Acks>,
) -> Result<bool, SinkError> {
    acks.outstanding.fetch_add(1, Ordering::AcqRel);
    let base = BaseRecord::with_opaque_to(&record.topic, acks.clone()).key(&record.key);
    let base = match &record.payload {
        Some(payload) => base.payload(payload),
        None => base,
    };
    match producer.send(base) {
        Ok(()) => Ok(true),
        Err((e, _)) => {
            // Never enqueued: no report will come for it (the guard keeps the count above 0).
            acks.outstanding.fetch_sub(1, Ordering::AcqRel);
            match e {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => Ok(false),
                e => Err(classify(e)),
            }
        }
    }
}

/// Exactly-once: one transaction at a time, on a blocking thread. A producer that lost its
/// transactional state ([`TxnError::Unusable`]) is replaced by a new one made from `client`.
fn run(
    mut producer: Arc<KafkaProducer>,
    client: &ClientConfig,
    timeout: Duration,
    mut rx: mpsc::Receiver<Request>,
    runtime: tokio::runtime::Handle,
    stats: &SinkStats,
) -> Result<(), SinkError> {
    // Producers replaced since the last committed transaction.
    let mut rebuilds = 0;
    while let Some(first) = rx.blocking_recv() {
        // Group commit: the batches other pollers sent meanwhile share the transaction.
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        for _ in &group {
            stats.started();
        }
        let batches: Vec<&Batch> = group.iter().map(|(batch, _)| batch).collect();
        let outcome = match exactly_once(&producer, &batches, timeout, &runtime, stats) {
            Ok(()) => {
                rebuilds = 0;
                Ok(())
            }
            Err(TxnError::Sink(e)) => Err(e),
            Err(TxnError::Unusable(e)) if rebuilds == PRODUCER_REBUILDS => {
                Err(SinkError::Fatal(format!(
                    "the Kafka producer lost its transaction {} times in a row; last: {e}",
                    rebuilds + 1
                )))
            }
            Err(TxnError::Unusable(e)) => {
                rebuilds += 1;
                warn!(error = %e, rebuilds, "kafka transaction lost (the broker aborts a transaction open longer than kafka.batch_timeout_secs, e.g. through a broker outage), starting a new producer");
                match new_producer(client, timeout) {
                    Ok(next) => {
                        producer = next;
                        Err(SinkError::Retriable(format!(
                            "the transaction was lost and aborted ({e}); a new producer goes on"
                        )))
                    }
                    Err(start) => Err(SinkError::Fatal(format!(
                        "cannot start a new Kafka producer ({start}) after the transaction was lost: {e}"
                    ))),
                }
            }
        };
        if let Err(SinkError::Fatal(reason)) = &outcome {
            // Before any answer: a poller told to stop reads the cause the others are told.
            let _ = stats.stopped.set(reason.clone());
        }
        let fatal = matches!(outcome, Err(SinkError::Fatal(_)));
        for (batch, ack) in group {
            stats.finished(started, &batch, &outcome);
            let _ = ack.send(outcome.clone());
        }
        if fatal {
            // `rx` goes with this return: the batches waiting in it, and any sent after, are
            // answered with `stats.stopped` by `SinkHandle::commit`.
            return outcome;
        }
    }
    producer
        .flush(timeout)
        .map_err(|e| SinkError::Retriable(format!("final flush failed: {e}")))
}

/// Most batches (of different pollers) committed in one transaction.
const GROUP_MAX: usize = 8;

/// Producers replaced in a row (no transaction committed in between) before the sink gives up.
pub const PRODUCER_REBUILDS: u32 = 3;

/// Why a transaction failed.
enum TxnError {
    /// Passed on to the batches as is.
    Sink(SinkError),
    /// The failed transaction could not be aborted though no other process fenced this one
    /// (the broker aborted it itself, e.g. after an outage longer than the transaction
    /// timeout): the producer's transactional state is lost, a new producer can go on.
    Unusable(String),
}

impl From<SinkError> for TxnError {
    fn from(e: SinkError) -> Self {
        TxnError::Sink(e)
    }
}

/// A new transactional producer from `client`, initialised (which aborts what the old one
/// left open), as a restart would make.
fn new_producer(client: &ClientConfig, timeout: Duration) -> Result<Arc<KafkaProducer>, String> {
    let producer: KafkaProducer = client
        .create_with_context(Deliveries)
        .map_err(|e| e.to_string())?;
    producer
        .init_transactions(timeout)
        .map_err(|e| e.to_string())?;
    info!("kafka transactions initialised by a new producer");
    Ok(Arc::new(producer))
}

/// Whether `error` (or the producer's fatal error) says another producer with the same
/// `transactional.id` took over.
fn taken_over(producer: &KafkaProducer, error: &KafkaError) -> bool {
    error.rdkafka_error_code().is_some_and(is_fenced)
        || producer
            .client()
            .fatal_error()
            .is_some_and(|(code, _)| is_fenced(code))
}

/// The message of a fatal `error` of a transaction begun at `began`. A fenced producer whose
/// transaction stayed open longer than the transaction timeout (`kafka.batch_timeout_secs`,
/// which sets `transaction.timeout.ms`) was most likely fenced by the broker itself: Kafka's
/// coordinator aborts such a transaction and bumps the producer's epoch, which librdkafka
/// reports as fenced, exactly as when another process starts with the same transactional id.
/// Saying "another process took over" then would send an operator looking for a process that
/// does not exist.
fn timed_out_or(
    producer: &KafkaProducer,
    began: std::time::Instant,
    timeout: Duration,
    error: String,
) -> String {
    let open = began.elapsed();
    let fenced = producer
        .client()
        .fatal_error()
        .is_some_and(|(code, _)| is_fenced(code))
        || error.starts_with(FENCED);
    if !fenced || open <= timeout {
        return error;
    }
    let detail = error.strip_prefix(FENCED).unwrap_or(&error);
    format!(
        "the transaction stayed open {:.0} s, longer than kafka.batch_timeout_secs ({} s, the transaction timeout), so the broker aborted it (a broker outage or pause) – unless another process with the same kafka.instance_id started meanwhile; a restart goes on from the state ({detail})",
        open.as_secs_f64(),
        timeout.as_secs()
    )
}

/// Commits `batches` in one transaction: their events, then their state records.
fn exactly_once(
    producer: &KafkaProducer,
    batches: &[&Batch],
    timeout: Duration,
    runtime: &tokio::runtime::Handle,
    stats: &SinkStats,
) -> Result<(), TxnError> {
    let mut last = String::new();
    for attempt in 1..=TRANSACTION_ATTEMPTS {
        producer.begin_transaction().map_err(classify)?;
        let began = std::time::Instant::now();
        // Once the commit was asked for, a failure no longer says the transaction was not
        // applied (librdkafka: "the EndTxn(commit) may have succeeded").
        let mut committing = false;
        // A failed attempt drops its Acks: late reports of aborted records go nowhere.
        let acks = Acks::new();
        let result = batches
            .iter()
            .try_for_each(|b| produce_all(producer, &b.events, timeout, &acks))
            .and_then(|()| {
                batches
                    .iter()
                    .try_for_each(|b| produce_all(producer, &b.state, timeout, &acks))
            })
            .and_then(|()| runtime.block_on(acks.wait(producer, timeout)))
            .and_then(|()| {
                drained(producer, timeout);
                committing = true;
                commit(producer, timeout, stats)
            });
        match result {
            Ok(()) => {
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(SinkError::Fatal(e)) => {
                return Err(SinkError::Fatal(timed_out_or(producer, began, timeout, e)).into())
            }
            Err(SinkError::Retriable(e)) => {
                warn!(attempt, error = %e, "kafka transaction failed, aborting");
                if let Err(abort) = abort(producer, timeout) {
                    if taken_over(producer, &abort) {
                        let (SinkError::Fatal(fenced) | SinkError::Retriable(fenced)) =
                            classify(abort);
                        return Err(SinkError::Fatal(timed_out_or(
                            producer, began, timeout, fenced,
                        ))
                        .into());
                    }
                    let message =
                        format!("cannot abort the failed transaction ({abort}) after: {e}");
                    // A new producer may go on only where the batch cannot have been committed
                    // (the commit was never asked for) and the broker answered the abort (its
                    // coordinator is reachable, and a second process that had initialised the
                    // same transactional id would have been named as fencing this one). Else a
                    // restart resolves it: the next producer's init commits or aborts what this
                    // one left, and the state restore says which.
                    let answered =
                        !matches!(&abort, KafkaError::Transaction(t) if t.is_retriable());
                    if committing || !answered {
                        return Err(SinkError::Fatal(format!(
                            "{message}; a restart with the same kafka.instance_id resolves the transaction"
                        ))
                        .into());
                    }
                    return Err(TxnError::Unusable(message));
                }
                stats.aborts.fetch_add(1, Ordering::Relaxed);
                last = e;
            }
        }
    }
    Err(SinkError::Retriable(format!(
        "transaction failed {TRANSACTION_ATTEMPTS} times: {last}"
    ))
    .into())
}

/// Waits (briefly: every record is already reported) until librdkafka has released the
/// transaction's records. rdkafka's `commit_transaction` flushes first, and its flush polls in
/// steps of 100 ms while any record is outstanding: measured on the MockCluster, every
/// transaction took 100 ms longer than its records did.
fn drained(producer: &KafkaProducer, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while producer.in_flight_count() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Commits the open transaction. A retriable failure (a timeout) leaves the outcome unknown –
/// the commit may have been applied – so the commit is called again, as librdkafka asks,
/// instead of aborting and sending the batch a second time.
fn commit(producer: &KafkaProducer, timeout: Duration, stats: &SinkStats) -> Result<(), SinkError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match producer.commit_transaction(timeout) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e))
                if e.is_retriable() && !e.txn_requires_abort() && attempt < COMMIT_ATTEMPTS =>
            {
                warn!(attempt, error = %e, "kafka commit failed with a retriable error, committing again");
                stats.commit_retries.fetch_add(1, Ordering::Relaxed);
            }
            Err(KafkaError::Transaction(e)) if e.is_retriable() && !e.txn_requires_abort() => {
                return Err(SinkError::Fatal(format!(
                    "the transaction's commit is still unknown after {attempt} attempts ({e}); a restart with the same kafka.instance_id resolves it (the broker commits or aborts what this producer left open when the next one starts), and read_committed readers of the topics wait at it until then"
                )))
            }
            Err(e) => return Err(classify(e)),
        }
    }
}

/// Commit calls of one transaction before its outcome is given up as unknown (fatal).
const COMMIT_ATTEMPTS: u32 = 5;

/// Aborts the open transaction. An abort that times out (the broker away for a while) is
/// called again, as librdkafka asks ("retry call to resume"), up to [`COMMIT_ATTEMPTS`]
/// times; one that still fails leaves the producer unusable (fatal).
fn abort(producer: &KafkaProducer, timeout: Duration) -> Result<(), KafkaError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match producer.abort_transaction(timeout) {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && attempt < COMMIT_ATTEMPTS => {
                warn!(attempt, error = %e, "kafka abort failed with a retriable error, aborting again");
            }
            outcome => return outcome,
        }
    }
}

fn produce_all(
    producer: &KafkaProducer,
    records: &[OutRecord],
    timeout: Duration,
    acks: &Arc<Acks>,
) -> Result<(), SinkError> {
    let deadline = std::time::Instant::now() + timeout;
    for record in records {
        // Backpressure: wait for the queue to drain, not an error.
        while !try_enqueue(producer, record, acks)? {
            if std::time::Instant::now() > deadline {
                return Err(SinkError::Retriable(
                    "producer queue stayed full".to_owned(),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

/// Whether `code` says a producer with the same `transactional.id` and a newer epoch exists.
fn is_fenced(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

/// The message of a fenced producer; `detail` is librdkafka's.
fn fenced(detail: &str) -> String {
    format!("{FENCED}producer fenced: {detail})")
}

/// How the message of a fenced producer begins.
const FENCED: &str = "another ibstream process with the same kafka.instance_id took over (";

fn classify(error: KafkaError) -> SinkError {
    if error.rdkafka_error_code().is_some_and(is_fenced) {
        return SinkError::Fatal(fenced(&error.to_string()));
    }
    match &error {
        KafkaError::Transaction(e) if e.is_fatal() => SinkError::Fatal(error.to_string()),
        _ if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) => {
            SinkError::Fatal(error.to_string())
        }
        _ => SinkError::Retriable(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch sent after the producer stopped is answered with why it stopped (fenced), as
    /// the batch that met it was, never "the sink has stopped": the run's last words name
    /// whichever stream stopped last.
    #[tokio::test]
    async fn a_batch_after_the_producer_stopped_is_told_why() {
        let (sink, requests) = SinkHandle::held();
        let fenced = fenced("This instance has been fenced by a newer instance");
        sink.stats.stopped.set(fenced.clone()).unwrap();
        drop(requests);
        let batch = Batch {
            events: vec![OutRecord {
                topic: "t".to_owned(),
                key: b"k".to_vec(),
                payload: Some(b"v".to_vec()),
            }],
            ..Batch::default()
        };
        match sink.commit(batch).await {
            Err(SinkError::Fatal(reason)) => assert_eq!(reason, fenced),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_pass_through_tunes_the_producer_but_cannot_weaken_delivery() {
        let mut config = KafkaConfig {
            bootstrap_servers: "k:9092".to_owned(),
            batch_timeout_secs: 7,
            ..KafkaConfig::default()
        };
        assert_eq!(
            producer_config(&config).unwrap().get("linger.ms"),
            Some("5")
        );
        config
            .librdkafka
            .insert("linger.ms".to_owned(), "100".to_owned());
        config
            .librdkafka
            .insert("batch.size".to_owned(), "2000000".to_owned());
        let client = producer_config(&config).unwrap();
        assert_eq!(client.get("linger.ms"), Some("100"));
        assert_eq!(client.get("batch.size"), Some("2000000"));
        assert_eq!(client.get("enable.idempotence"), Some("true"));
        assert_eq!(client.get("message.timeout.ms"), Some("7000"));
        assert_eq!(client.get("transactional.id"), Some("ibstream"));
    }
}
