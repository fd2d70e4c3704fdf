//! `ibstream run`: start everything, run until cancelled, shut down cleanly.
//!
//! Start-up order matters: the sink first (in exactly-once mode its `init_transactions`
//! fences an earlier process with the same `instance_id` and aborts what it left open, so the
//! state topic's committed end is stable), then the state restore to the barrier, then the
//! pollers. The CRM login runs beside all of it, so the pollers' first calls find a token.
//! Shutdown: the pollers are cancelled at their next await, the sink finishes the
//! batch it holds (committed or aborted), the producer is flushed.
//!
//! Files: this one is the start-up sequence; `pollers` builds and starts one poller per
//! stream; `positions` follows the servers list with one poller per live server tag. The
//! operations side (`crate::ops`) reads the registry they all update.

mod pollers;
mod positions;
mod progress;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::crm::CrmClient;
use crate::events::{framing_for, Schemas};
use crate::kafka::{check_state_topic, ensure_topics, restore, Batch, OutRecord, TopicSpec};
use crate::ops::Registry;
use crate::stream::poller::{log_stats, Exit, Shared};
use crate::stream::state::{Cursor, Started, State};
use crate::stream::window::today;

pub use crate::ops::Stats;
pub use pollers::enabled as enabled_streams;

/// Errors that stop `run` before or while it runs.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Start-up failed.
    #[error("start-up failed: {0}")]
    Startup(String),
    /// A stream hit an error the process cannot go on with.
    #[error("{0}")]
    Fatal(String),
}

/// Called once the state is restored: the binary uses it to have its allocator return the
/// memory the fingerprint tables outgrew while filling (see `main.rs`).
static AFTER_RESTORE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets the function called after the state restore (once per process).
pub fn set_after_restore(hook: fn()) {
    let _ = AFTER_RESTORE.set(hook);
}

/// What a finished run reports.
#[derive(Debug, Default)]
pub struct RunReport {
    /// Streams that stopped with an error while the others went on.
    pub stopped: Vec<(String, String)>,
    /// Where the operations HTTP server listened, if it ran.
    pub http: Option<std::net::SocketAddr>,
}

/// Validates the configuration for `run` (no IO).
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    config.validate()?;
    config.kafka.validate()?;
    config.streams.validate()
}

fn startup<E: std::fmt::Display>(e: E) -> RunError {
    RunError::Startup(e.to_string())
}

/// Runs until `cancel` fires (or a fatal error); `stats` receives the counters (streams
/// missing from it get counters of their own).
pub async fn run(
    config: Config,
    cancel: CancellationToken,
    stats: Stats,
) -> Result<RunReport, RunError> {
    run_with(config, cancel, stats, &RunOptions::default()).await
}

/// Where a caller finds the registry of a run once it exists (the demo's view).
pub type RegistrySlot = Arc<std::sync::OnceLock<Arc<Registry>>>;

/// What an embedding caller (the demo) can ask of a run beyond its configuration.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Receives the run's registry once the sink runs.
    pub registry: RegistrySlot,
    /// Skip reading the state topic's configuration (rdkafka's MockCluster, which made the
    /// topic itself, cannot describe configs).
    pub skip_state_topic_config: bool,
    /// Start even though the state topic is empty while the data topics hold records (the
    /// state was lost): everything is read and emitted again (`run --rebuild-state`).
    pub rebuild_state: bool,
    /// Draw no progress bars on a terminal (the demo redraws the screen itself).
    pub no_progress_bars: bool,
}

/// Runs as [`run`] does, with `options`.
pub async fn run_with(
    config: Config,
    cancel: CancellationToken,
    stats: Stats,
    options: &RunOptions,
) -> Result<RunReport, RunError> {
    validate(&config)?;
    // Reads the SASL password file and checks the TLS files: a missing one is a
    // configuration error (exit 2) naming its key, before any connection – the CRM's too, or
    // its login (below) could log a failed attempt as the process exits.
    config.kafka.client_settings()?;
    let client = CrmClient::build(&config.crm)?;
    // The CRM's login overlaps Kafka's start-up (topics, transactions, the state restore):
    // the pollers find the token ready. A failure here is only logged: the pollers log in
    // again and report it as they always did.
    let early_login = tokio::spawn({
        let client = client.clone();
        async move {
            if let Err(e) = client.login().await {
                warn!(error = %e, "crm login at start-up failed; the pollers try again");
            }
        }
    });
    let _early_login = AbortOnDrop(early_login);
    let schemas = Schemas::load(&config.events.namespace).map_err(startup)?;
    let state_topic = config.kafka.state_topic(&config.topics);
    let enabled = pollers::enabled(&config.streams);
    ensure_topics(&config.kafka, &topic_specs(&config, &enabled, &state_topic))
        .await
        .map_err(RunError::Startup)?;
    if !options.skip_state_topic_config {
        check_state_topic(&config.kafka, &state_topic)
            .await
            .map_err(RunError::Startup)?;
    }
    // Registry ids (if any) before the pollers: a missing schema stops start-up.
    let framing = framing_for(&config, &schemas).await.map_err(startup)?;
    let sink = crate::kafka::sink::start(&config.kafka)
        .await
        .map_err(startup)?;
    let ops = Arc::new(registry(&config, &client, &enabled, stats));
    ops.set_sink(sink.handle.shared_stats());
    let _ = ops.crm_pressure.set(client.pressure());
    let _ = options.registry.set(ops.clone());
    let http_cancel = cancel.child_token();
    let http = serve_ops(&config, &ops, &http_cancel).await?;

    let restore_started = Instant::now();
    let restore_timeout = Duration::from_secs(config.kafka.batch_timeout_secs.max(30));
    let restored = restore(
        &config.kafka,
        &state_topic,
        &sink.handle,
        restore_timeout,
        &cancel,
    )
    .await
    .map_err(RunError::Startup)?;
    let Some(mut state) = restored else {
        // Shut down during the restore: nothing was polled, nothing is owed.
        http_cancel.cancel();
        return Ok(RunReport {
            stopped: Vec::new(),
            http,
        });
    };
    // Decided on content, per stream, not on record counts: see "A lost state" in
    // `stream::state`.
    if !options.rebuild_state {
        refuse_a_lost_state(&config, &enabled, &state, &state_topic).await?;
    } else {
        warn!(state_topic = %state_topic, "state rebuild asked for (--rebuild-state): streams without a cursor backfill from their start date and emit every record again, each under the eventId of its first emission while unchanged");
    }
    ops.restored(restore_started.elapsed());
    if let Some(hook) = AFTER_RESTORE.get() {
        hook();
    }
    let shared = Arc::new(Shared {
        client: client.clone(),
        sink: sink.handle.clone(),
        tz: client.tz(),
        source: config.crm.domain.clone(),
        api_prefix: format!("/api/v1/{}", config.crm.api_path),
        topic_prefix: config.topics.prefix.clone(),
        state_topic: state_topic.clone(),
        streams: config.streams.clone(),
        decimal_excess: config.events.decimal_excess,
        max_event_bytes: config.kafka.max_message_bytes(),
        ops: ops.clone(),
    });
    drop(sink.handle);
    let first_day = persist_first_day(
        &shared,
        &enabled,
        &mut state,
        &config.kafka.instance_id,
        options.rebuild_state,
    )
    .await?;
    let mut tasks: JoinSet<(String, Exit)> = JoinSet::new();
    pollers::start(
        &mut tasks, &shared, &schemas, &framing, state, first_day, &cancel,
    )?;
    let beat_cancel = cancel.child_token();
    let beat = tokio::spawn(heartbeat(
        shared.clone(),
        config.kafka.instance_id.clone(),
        beat_cancel.clone(),
    ));
    drop(shared);

    let (mut report, fatal) = wait(tasks, &ops, &cancel, !options.no_progress_bars).await;
    beat_cancel.cancel();
    let _ = beat.await;
    http_cancel.cancel();
    report.http = http;
    // Every handle is gone: the sink finishes, flushes and ends. A commit a cancelled
    // poller left in its own task holds a handle until it has counted its batch, so the
    // final stats, logged after this, hold every committed batch.
    match tokio::time::timeout(Duration::from_secs(8), sink.task).await {
        Ok(Ok(Ok(()))) => info!("producer flushed"),
        Ok(Ok(Err(e))) => warn!(error = %e, "producer did not flush cleanly"),
        Ok(Err(e)) => warn!(error = %e, "sink task failed"),
        Err(_) => warn!("producer flush timed out"),
    }
    for (name, s) in &ops.streams {
        log_stats(name, s);
    }
    match fatal {
        Some(reason) => Err(RunError::Fatal(reason)),
        None => Ok(report),
    }
}

/// Aborts a task when dropped (a run that ends early leaves nothing behind).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Refuses to start when the state of an enabled stream was lost: its data topic holds
/// records while the state holds no progress of it for this instance
/// ([`State::holds_progress_of`]); the dead-letter topic, shared by every stream, when the
/// state holds no progress at all. The error names the stream, its topic, the state topic
/// and the flag.
async fn refuse_a_lost_state(
    config: &Config,
    enabled: &[&'static str],
    state: &State,
    state_topic: &str,
) -> Result<(), RunError> {
    let instance_id = &config.kafka.instance_id;
    let mut unproven: Vec<(&str, String)> = enabled
        .iter()
        .filter(|stream| !state.holds_progress_of(stream, instance_id))
        .map(|stream| (*stream, config.topics.data_topic(stream)))
        .collect();
    if !state.holds_progress() {
        unproven.push(("dlq", config.topics.dead_letter_topic()));
    }
    if unproven.is_empty() {
        return Ok(());
    }
    let topics = unproven.iter().map(|(_, topic)| topic.clone()).collect();
    let Some(topic) = crate::kafka::first_with_records(&config.kafka, topics)
        .await
        .map_err(RunError::Startup)?
    else {
        return Ok(());
    };
    let what = match unproven.iter().find(|(_, t)| *t == topic) {
        Some(("dlq", _)) | None => "no progress of any stream (no cursor, fingerprint or start marker)".to_owned(),
        Some((stream, _)) => format!(
            "no progress of the stream {stream} (no cursor or fingerprint of its scopes, no start marker of the instance {instance_id} listing it; another instance's progress on other streams does not count)"
        ),
    };
    Err(RunError::Startup(format!(
        "the state topic {state_topic} holds {what}, but {topic} already holds records: the state was lost (the topic deleted, renamed or pointed elsewhere), and starting would read and emit every record again. Every start refuses until told otherwise: restore the state topic, or run `ibstream run --rebuild-state` once to backfill again on purpose (later starts go on from there without the flag)"
    )))
}

/// How often a running instance writes its heartbeat (`alive/<instance_id>`).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Writes the instance's heartbeat now and every [`HEARTBEAT_INTERVAL`] until cancelled, so
/// `ibstream state reset` can tell it runs.
async fn heartbeat(shared: Arc<Shared>, instance_id: String, cancel: CancellationToken) {
    let mut every = tokio::time::interval(HEARTBEAT_INTERVAL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        let beat = crate::stream::state::Heartbeat { at: Utc::now() };
        let batch = Batch {
            events: Vec::new(),
            state: vec![OutRecord {
                topic: shared.state_topic.clone(),
                key: crate::stream::state::Heartbeat::key(&instance_id).into_bytes(),
                payload: Some(beat.encode()),
            }],
        };
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            outcome = shared.sink.commit(batch) => outcome,
        };
        if let Err(e) = outcome {
            warn!(error = %e, "heartbeat not written");
        }
    }
}

/// Starts the operations server when `http.enabled`; returns where it listens.
async fn serve_ops(
    config: &Config,
    ops: &Arc<Registry>,
    cancel: &CancellationToken,
) -> Result<Option<std::net::SocketAddr>, RunError> {
    if !config.http.enabled {
        return Ok(None);
    }
    let (addr, _) = crate::ops::http::serve(config.http.address()?, ops.clone(), cancel.clone())
        .await
        .map_err(RunError::Startup)?;
    info!(address = %addr, "operations server listening (/ status page, /metrics, /health/live, /health/ready, /status)");
    Ok(Some(addr))
}

/// Builds the registry, with counters for every enabled stream.
fn registry(
    config: &Config,
    client: &CrmClient,
    enabled: &[&'static str],
    mut stats: Stats,
) -> Registry {
    for stream in enabled {
        stats.entry(stream).or_default();
    }
    Registry::new(
        &config.kafka.instance_id,
        config.kafka.delivery,
        client.tz(),
        Duration::from_secs(config.kafka.batch_timeout_secs),
        stats,
        client.stats(),
    )
}

/// The topics `run` needs: one per enabled stream, the dead-letter topic, the state topic.
fn topic_specs(config: &Config, enabled: &[&'static str], state_topic: &str) -> Vec<TopicSpec> {
    let kafka = &config.kafka;
    let mut topics: Vec<TopicSpec> = enabled
        .iter()
        .chain(std::iter::once(&"dlq"))
        .map(|stream| TopicSpec {
            name: format!("{}.{stream}", config.topics.prefix),
            partitions: kafka.topic_partitions,
            replication: kafka.replication_factor,
            configs: kafka
                .topic_configs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
        .collect();
    topics.push(TopicSpec {
        name: state_topic.to_owned(),
        partitions: 1,
        replication: kafka.replication_factor,
        configs: vec![("cleanup.policy".to_owned(), "compact".to_owned())],
    });
    topics
}

/// A changed-records cursor starts the day of the first start: everything older is read by
/// the backfill of new records. Persisted at once, so a restart days later keeps that day.
/// The same batch holds the start marker (`started/<instance_id>`, listing the streams it
/// covers), committed before any poller emits: a crash before the first cursor save is not taken for a lost state, and a
/// `--rebuild-state` holds for the restarts after it.
async fn persist_first_day(
    shared: &Shared,
    enabled: &[&'static str],
    state: &mut State,
    instance_id: &str,
    rebuild: bool,
) -> Result<chrono::NaiveDate, RunError> {
    let now = Utc::now();
    let first_day = today(now, shared.tz);
    let mut batch = Batch::default();
    // The streams of this start and of the instance's earlier starts: a stream disabled
    // for a while stays covered (a crash before its first cursor save is not a lost state).
    let mut streams: Vec<String> = enabled.iter().map(|s| (*s).to_owned()).collect();
    if let Some(earlier) = state
        .started
        .get(instance_id)
        .and_then(|m| m.streams.as_ref())
    {
        streams.extend(
            earlier
                .iter()
                .filter(|s| !enabled.contains(&s.as_str()))
                .cloned(),
        );
    }
    let marker = Started {
        at: now,
        rebuild,
        streams: Some(streams),
    };
    batch.state.push(OutRecord {
        topic: shared.state_topic.clone(),
        key: Started::key(instance_id).into_bytes(),
        payload: Some(marker.encode()),
    });
    for stream in ["leads", "customers"] {
        let scope = format!("{stream}/lastModified");
        if enabled.contains(&stream) && !state.cursors.contains_key(&scope) {
            let cursor = Cursor {
                next: Some(first_day),
                ..Cursor::default()
            };
            batch.state.push(OutRecord {
                topic: shared.state_topic.clone(),
                key: Cursor::key(&scope).into_bytes(),
                payload: Some(cursor.encode()),
            });
            state.cursors.insert(scope, cursor);
        }
    }
    shared.sink.commit(batch).await.map_err(startup)?;
    Ok(first_day)
}

/// Waits for every stream task; the first fatal error cancels the rest and is returned.
/// Logs progress every 30 s (the final stats are `run`'s, once the sink ended).
async fn wait(
    mut tasks: JoinSet<(String, Exit)>,
    ops: &Registry,
    cancel: &CancellationToken,
    progress_bars: bool,
) -> (RunReport, Option<String>) {
    let mut report = RunReport::default();
    let mut first_fatal = None;
    let log_all = || {
        for (name, s) in &ops.streams {
            log_stats(name, s);
        }
    };
    // A terminal gets progress bars, redrawn twice a second; elsewhere a log line per
    // stream every 30 s.
    let mut bars = progress_bars.then(progress::Bars::on_terminal).flatten();
    let period = Duration::from_millis(if bars.is_some() { 500 } else { 30_000 });
    let mut progress = tokio::time::interval(period);
    progress.tick().await;
    // After a stream stops, whether the others go on is said once this settles: streams
    // stopped by a shared cause (the CRM's credentials) stop within moments of each other.
    let mut settle: Option<tokio::time::Instant> = None;
    let mut stopped_told = 0;
    loop {
        let settled = async {
            match settle {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let joined = tokio::select! {
            _ = progress.tick() => {
                match &mut bars {
                    Some(bars) => bars.update(ops),
                    None => log_all(),
                }
                continue;
            }
            () = settled => {
                settle = None;
                if !tasks.is_empty() && !cancel.is_cancelled() {
                    let stopped: Vec<&str> =
                        report.stopped[stopped_told..].iter().map(|(n, _)| n.as_str()).collect();
                    stopped_told = report.stopped.len();
                    warn!(stopped = %stopped.join(", "), running = tasks.len(), "the other streams go on");
                }
                continue;
            }
            joined = tasks.join_next() => joined,
        };
        let fatal = match joined {
            None => break,
            Some(Ok((name, Exit::Stopped(reason) | Exit::Denied(reason)))) => {
                report.stopped.push((name, reason));
                settle = Some(tokio::time::Instant::now() + STOPS_SETTLE);
                continue;
            }
            Some(Ok((_, Exit::Cancelled))) => continue,
            Some(Ok((name, Exit::Fatal(reason)))) => format!("{name}: {reason}"),
            Some(Err(e)) => format!("a stream task failed: {e}"),
        };
        first_fatal.get_or_insert(fatal);
        cancel.cancel();
    }
    if first_fatal.is_none() && !report.stopped.is_empty() && !cancel.is_cancelled() {
        for (streams, reason) in by_reason(&report.stopped) {
            error!(streams = %streams.join(", "), error = %reason, "every stream stopped; run ends");
        }
    }
    (report, first_fatal)
}

/// How long after a stream stopped `run` waits before saying the others go on.
const STOPS_SETTLE: Duration = Duration::from_secs(2);

/// Groups stopped streams by their reason, in the order the reasons first came: a cause
/// every stream shares (the CRM's credentials) is said once, naming them all.
pub fn by_reason(stopped: &[(String, String)]) -> Vec<(Vec<&str>, &str)> {
    let mut groups: Vec<(Vec<&str>, &str)> = Vec::new();
    for (stream, reason) in stopped {
        match groups.iter_mut().find(|(_, r)| r == reason) {
            Some((streams, _)) => streams.push(stream),
            None => groups.push((vec![stream], reason)),
        }
    }
    groups
}
