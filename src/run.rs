//! `ibstream run`: start everything, run until cancelled, shut down cleanly.
//!
//! Start-up order matters: the sink first (in exactly-once mode its `init_transactions`
//! fences an earlier process with the same `instance_id` and aborts what it left open, so the
//! state topic's committed end is stable), then the state restore to the barrier, then the
//! pollers. Shutdown: the pollers are cancelled at their next await, the sink finishes the
//! batch it holds (committed or aborted), the producer is flushed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError, StreamConfig};
use crate::crm::{CrmClient, Customer, DateFilter, Lead, Position, Server, Transaction};
use crate::events::{framing_for, Encoder, Schemas};
use crate::kafka::{check_state_topic, ensure_topics, restore, Batch, OutRecord, TopicSpec};
use crate::stream::poller::{
    log_stats, run_loop, CursorSpec, Exit, PollError, Pollable, Poller, Shared, StreamRecord,
    StreamStats,
};
use crate::stream::state::{Cursor, State};
use crate::stream::window::today;

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

/// Counters by stream, for logs, `/status` and tests.
pub type Stats = HashMap<&'static str, Arc<StreamStats>>;

/// What a finished run reports.
#[derive(Debug, Default)]
pub struct RunReport {
    /// Streams that stopped with an error while the others went on.
    pub stopped: Vec<(String, String)>,
}

/// Validates the configuration for `run` (no IO).
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    config.validate()?;
    config.kafka.validate()?;
    config.streams.validate()
}

/// Runs until `cancel` fires (or a fatal error); `stats` receives the counters.
pub async fn run(
    config: Config,
    cancel: CancellationToken,
    stats: Stats,
) -> Result<RunReport, RunError> {
    validate(&config)?;
    let client = CrmClient::build(&config.crm)?;
    let tz = client.tz();
    let schemas =
        Schemas::load(&config.events.namespace).map_err(|e| RunError::Startup(e.to_string()))?;
    let state_topic = config.kafka.state_topic(&config.topics);
    let streams = &config.streams;
    let enabled: Vec<&'static str> = [
        ("leads", streams.leads.enabled),
        ("customers", streams.customers.enabled),
        ("transactions", streams.transactions.enabled),
        ("servers", streams.servers.enabled),
        ("positions", streams.positions.enabled),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();

    let mut topics: Vec<TopicSpec> = enabled
        .iter()
        .chain(std::iter::once(&"dlq"))
        .map(|stream| TopicSpec {
            name: format!("{}.{stream}", config.topics.prefix),
            partitions: config.kafka.topic_partitions,
            replication: config.kafka.replication_factor,
            configs: config
                .kafka
                .topic_configs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
        .collect();
    topics.push(TopicSpec {
        name: state_topic.clone(),
        partitions: 1,
        replication: config.kafka.replication_factor,
        configs: vec![("cleanup.policy".to_owned(), "compact".to_owned())],
    });
    ensure_topics(&config.kafka, &topics)
        .await
        .map_err(RunError::Startup)?;
    check_state_topic(&config.kafka, &state_topic)
        .await
        .map_err(RunError::Startup)?;

    // Registry ids (if any) before the pollers: a missing schema stops start-up.
    let framing = framing_for(&config, &schemas)
        .await
        .map_err(|e| RunError::Startup(e.to_string()))?;
    let sink = crate::kafka::sink::start(&config.kafka)
        .await
        .map_err(|e| RunError::Startup(e.to_string()))?;
    let restore_timeout = Duration::from_secs(config.kafka.batch_timeout_secs.max(30));
    let mut state = restore(&config.kafka, &state_topic, &sink.handle, restore_timeout)
        .await
        .map_err(RunError::Startup)?;
    if let Some(hook) = AFTER_RESTORE.get() {
        hook();
    }

    let shared = Arc::new(Shared {
        client: client.clone(),
        sink: sink.handle.clone(),
        tz,
        source: config.crm.domain.clone(),
        api_prefix: format!("/api/v1/{}", config.crm.api_path),
        topic_prefix: config.topics.prefix.clone(),
        state_topic: state_topic.clone(),
        streams: streams.clone(),
        decimal_excess: config.events.decimal_excess,
        max_event_bytes: config.kafka.max_message_bytes(),
    });
    drop(sink.handle);

    // A changed-records cursor starts the day of the first start: everything older is read
    // by the backfill of new records. Persist it now so a restart days later keeps that day.
    let first_day = today(Utc::now(), tz);
    let mut initial = Batch::default();
    for stream in ["leads", "customers"] {
        let scope = format!("{stream}/lastModified");
        if enabled.contains(&stream) && !state.cursors.contains_key(&scope) {
            let cursor = Cursor {
                next: Some(first_day),
                ..Cursor::default()
            };
            initial.state.push(OutRecord {
                topic: state_topic.clone(),
                key: Cursor::key(&scope).into_bytes(),
                payload: Some(cursor.encode()),
            });
            state.cursors.insert(scope, cursor);
        }
    }
    shared
        .sink
        .commit(initial)
        .await
        .map_err(|e| RunError::Startup(e.to_string()))?;

    let new_encoder =
        || Encoder::new(&schemas, framing.clone()).map_err(|e| RunError::Startup(e.to_string()));
    let stat = |name: &'static str| stats.get(name).cloned().unwrap_or_default();
    let mut tasks: JoinSet<(String, Exit)> = JoinSet::new();
    let mutable_cursors = |stream: &str| {
        vec![
            CursorSpec {
                scope: format!("{stream}/registration"),
                filter: DateFilter::Registration,
                initial: streams.start_date,
            },
            CursorSpec {
                scope: format!("{stream}/lastModified"),
                filter: DateFilter::LastModified,
                initial: first_day,
            },
        ]
    };
    if streams.leads.enabled {
        let poller = windowed::<Lead>(
            "leads",
            &streams.leads,
            mutable_cursors("leads"),
            false,
            &mut state,
            &shared,
            new_encoder()?,
            stat("leads"),
        );
        spawn(
            &mut tasks,
            "leads",
            streams.leads.poll_interval_secs,
            &cancel,
            poller,
        );
    }
    if streams.customers.enabled {
        let poller = windowed::<Customer>(
            "customers",
            &streams.customers,
            mutable_cursors("customers"),
            false,
            &mut state,
            &shared,
            new_encoder()?,
            stat("customers"),
        );
        spawn(
            &mut tasks,
            "customers",
            streams.customers.poll_interval_secs,
            &cancel,
            poller,
        );
    }
    if streams.transactions.enabled {
        let specs = vec![CursorSpec {
            scope: "transactions".to_owned(),
            filter: DateFilter::Transaction,
            initial: streams.start_date,
        }];
        let poller = windowed::<Transaction>(
            "transactions",
            &streams.transactions,
            specs,
            true,
            &mut state,
            &shared,
            new_encoder()?,
            stat("transactions"),
        );
        spawn(
            &mut tasks,
            "transactions",
            streams.transactions.poll_interval_secs,
            &cancel,
            poller,
        );
    }
    let (tags_tx, tags_rx) = watch::channel::<Option<ServerList>>(None);
    if streams.servers.enabled {
        let poller = Poller::<Server>::new(
            "servers",
            None,
            Vec::new(),
            false,
            streams.servers.volatile_fields.clone(),
            state.fingerprints.remove("servers").unwrap_or_default(),
            HashMap::new(),
            shared.clone(),
            new_encoder()?,
            stat("servers"),
        );
        let servers = ServersLoop {
            poller: Some(poller),
            client: client.clone(),
            tags: tags_tx,
        };
        spawn(
            &mut tasks,
            "servers",
            streams.servers.poll_interval_secs,
            &cancel,
            servers,
        );
    } else if streams.positions.enabled {
        // Positions still need the live server tags: list them without emitting servers.
        let servers = ServersLoop {
            poller: None,
            client: client.clone(),
            tags: tags_tx,
        };
        spawn(
            &mut tasks,
            "servers-list",
            streams.positions.poll_interval_secs,
            &cancel,
            servers,
        );
    }
    if streams.positions.enabled {
        let scopes: Vec<String> = state
            .fingerprints
            .keys()
            .filter(|k| k.starts_with("positions/"))
            .cloned()
            .collect();
        let positions_fps: HashMap<String, _> = scopes
            .into_iter()
            .filter_map(|k| state.fingerprints.remove(&k).map(|m| (k, m)))
            .collect();
        let positions_cursors: HashMap<String, Cursor> = state
            .cursors
            .iter()
            .filter(|(k, _)| k.starts_with("positions/"))
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        let supervisor = PositionsSupervisor {
            shared: shared.clone(),
            schemas: schemas.clone(),
            framing: framing.clone(),
            fingerprints: positions_fps,
            cursors: positions_cursors,
            only: streams.server_tags.clone(),
            stats: stat("positions"),
        };
        let cancel = cancel.clone();
        let interval = streams.positions.poll_interval_secs;
        tasks.spawn(async move {
            (
                "positions".to_owned(),
                supervisor.run(tags_rx, interval, cancel).await,
            )
        });
    }
    drop(shared);

    let mut report = RunReport::default();
    let mut fatal = None;
    let progress = {
        let stats = stats.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {
                        for (name, s) in &stats {
                            log_stats(name, s);
                        }
                    }
                }
            }
        })
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, Exit::Stopped(reason) | Exit::Denied(reason))) => {
                report.stopped.push((name, reason))
            }
            Ok((name, Exit::Fatal(reason))) => {
                fatal = Some(format!("{name}: {reason}"));
                cancel.cancel();
            }
            Ok((_, Exit::Cancelled)) => {}
            Err(e) => {
                fatal = Some(format!("a stream task failed: {e}"));
                cancel.cancel();
            }
        }
    }
    progress.abort();
    for (name, s) in &stats {
        log_stats(name, s);
    }
    // Every handle is gone: the sink finishes, flushes and ends.
    match tokio::time::timeout(Duration::from_secs(8), sink.task).await {
        Ok(Ok(Ok(()))) => info!("producer flushed"),
        Ok(Ok(Err(e))) => warn!(error = %e, "producer did not flush cleanly"),
        Ok(Err(e)) => warn!(error = %e, "sink task failed"),
        Err(_) => warn!("producer flush timed out"),
    }
    match fatal {
        Some(reason) => Err(RunError::Fatal(reason)),
        None => Ok(report),
    }
}

/// Builds the poller of a windowed stream with its restored cursors and fingerprints.
#[allow(clippy::too_many_arguments)]
fn windowed<T: StreamRecord>(
    stream: &'static str,
    settings: &StreamConfig,
    specs: Vec<CursorSpec>,
    append_only: bool,
    state: &mut State,
    shared: &Arc<Shared>,
    encoder: Encoder,
    stats: Arc<StreamStats>,
) -> Poller<T> {
    let cursors = specs
        .iter()
        .filter_map(|s| state.cursors.remove(&s.scope).map(|c| (s.scope.clone(), c)))
        .collect();
    Poller::new(
        stream,
        None,
        specs,
        append_only,
        settings.volatile_fields.clone(),
        state.fingerprints.remove(stream).unwrap_or_default(),
        cursors,
        shared.clone(),
        encoder,
        stats,
    )
}

fn spawn<P: Pollable + 'static>(
    tasks: &mut JoinSet<(String, Exit)>,
    name: &str,
    interval_secs: u64,
    cancel: &CancellationToken,
    pollable: P,
) {
    let name = name.to_owned();
    let cancel = cancel.clone();
    tasks.spawn(async move {
        let (exit, _) = run_loop(
            name.clone(),
            Duration::from_secs(interval_secs),
            cancel,
            CancellationToken::new(),
            pollable,
        )
        .await;
        (name, exit)
    });
}

/// One good answer of the servers list: its live tags, and a number that grows with every
/// answer (so the positions supervisor counts consecutive lists, not only changes).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerList {
    seq: u64,
    live: Vec<String>,
}

/// Reads the servers list each cycle: emits server events (unless only listing) and
/// publishes the live server tags for the positions supervisor.
struct ServersLoop {
    poller: Option<Poller<Server>>,
    client: CrmClient,
    tags: watch::Sender<Option<ServerList>>,
}

impl Pollable for ServersLoop {
    async fn cycle(&mut self) -> Result<(), PollError> {
        let records = self.client.servers().await?;
        let mut live: Vec<String> = records
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter(|r| r.model.is_live())
            .filter_map(|r| r.model.id.clone())
            .collect();
        live.sort();
        if let Some(poller) = &mut self.poller {
            poller.read_all(records).await?;
        }
        self.tags.send_modify(|current| {
            let seq = current.as_ref().map_or(0, |l| l.seq + 1);
            *current = Some(ServerList { seq, live });
        });
        Ok(())
    }
}

/// Lists a running tag may be missing from before its poller stops: one empty or partial
/// answer of the servers list does not stop every tag.
const ABSENT_LISTS_BEFORE_STOP: u32 = 2;

/// Runs one positions poller per live server tag, following the servers list.
///
/// A tag starts when it is listed; it stops (gently: the batch in hand is finished, and its
/// cursor and fingerprints are kept in case it comes back) after it was absent from two
/// consecutive good lists. A tag whose positions call fails for good (400, 404) stops alone
/// and the others go on; it is tried again once it left the list and came back. A 403 or an
/// authentication failure concerns every tag alike and stops positions.
struct PositionsSupervisor {
    shared: Arc<Shared>,
    schemas: Schemas,
    framing: crate::events::Framing,
    fingerprints: HashMap<String, crate::stream::state::FpMap>,
    cursors: HashMap<String, Cursor>,
    only: Option<Vec<String>>,
    stats: Arc<StreamStats>,
}

/// A tag's poller that runs.
struct RunningTag {
    halt: CancellationToken,
    absent: u32,
}

impl PositionsSupervisor {
    async fn run(
        mut self,
        mut tags: watch::Receiver<Option<ServerList>>,
        interval_secs: u64,
        cancel: CancellationToken,
    ) -> Exit {
        let mut running: HashMap<String, RunningTag> = HashMap::new();
        let mut failed: HashMap<String, String> = HashMap::new();
        let mut tasks: JoinSet<(String, Exit, Poller<Position>)> = JoinSet::new();
        let mut seen_seq = None;
        loop {
            let list = tags.borrow_and_update().clone();
            if let Some(list) = list.filter(|l| seen_seq != Some(l.seq)) {
                seen_seq = Some(list.seq);
                let wanted: Vec<String> = list
                    .live
                    .into_iter()
                    .filter(|t| self.only.as_ref().is_none_or(|only| only.contains(t)))
                    .collect();
                failed.retain(|tag, _| wanted.contains(tag));
                for (tag, state) in running.iter_mut() {
                    if wanted.contains(tag) {
                        state.absent = 0;
                        continue;
                    }
                    state.absent += 1;
                    if state.absent == ABSENT_LISTS_BEFORE_STOP {
                        info!(server_tag = %tag, "server is gone, stopping its positions (cursor kept)");
                        state.halt.cancel();
                    } else if state.absent < ABSENT_LISTS_BEFORE_STOP {
                        warn!(server_tag = %tag, "server missing from the servers list, stopping its positions if it stays missing");
                    }
                }
                for tag in &wanted {
                    if running.contains_key(tag) || failed.contains_key(tag) {
                        continue;
                    }
                    if cancel.is_cancelled() {
                        break;
                    }
                    match self.spawn_tag(tag, &mut tasks, interval_secs, &cancel) {
                        Ok(halt) => {
                            running.insert(tag.clone(), RunningTag { halt, absent: 0 });
                        }
                        Err(exit) => return exit,
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = tags.changed() => {
                    if changed.is_err() {
                        // The servers loop ended (it stopped with an error). Without a list
                        // there is nothing to poll; with one, keep what runs.
                        if running.is_empty() {
                            return Exit::Stopped("positions need the servers list, and reading it stopped (see the servers stream)".to_owned());
                        }
                        cancel.cancelled().await;
                        break;
                    }
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    let Ok((tag, exit, poller)) = joined else {
                        return Exit::Fatal("a positions task failed".to_owned());
                    };
                    running.remove(&tag);
                    match exit {
                        Exit::Fatal(reason) => return Exit::Fatal(reason),
                        Exit::Denied(reason) => {
                            error!(server_tag = %tag, reason = %reason, "positions denied; every server tag stops");
                            for state in running.values() {
                                state.halt.cancel();
                            }
                            while tasks.join_next().await.is_some() {}
                            return Exit::Denied(reason);
                        }
                        Exit::Stopped(reason) => {
                            error!(server_tag = %tag, reason = %reason, "positions of this server stopped; the other servers go on");
                            failed.insert(tag.clone(), reason);
                            self.keep(tag, poller);
                        }
                        Exit::Cancelled => self.keep(tag, poller),
                    }
                }
            }
        }
        for state in running.values() {
            state.halt.cancel();
        }
        while tasks.join_next().await.is_some() {}
        Exit::Cancelled
    }

    /// Starts the poller of a tag; returns its halt token.
    fn spawn_tag(
        &mut self,
        tag: &str,
        tasks: &mut JoinSet<(String, Exit, Poller<Position>)>,
        interval_secs: u64,
        cancel: &CancellationToken,
    ) -> Result<CancellationToken, Exit> {
        let scope = format!("positions/{tag}");
        let encoder = Encoder::new(&self.schemas, self.framing.clone())
            .map_err(|e| Exit::Fatal(e.to_string()))?;
        let cursors: HashMap<String, Cursor> = self
            .cursors
            .remove(&scope)
            .map(|c| (scope.clone(), c))
            .into_iter()
            .collect();
        let halt = CancellationToken::new();
        let poller = Poller::<Position>::new(
            "positions",
            Some(tag.to_owned()),
            vec![CursorSpec {
                scope: scope.clone(),
                filter: DateFilter::PositionClose,
                initial: self.shared.streams.start_date,
            }],
            true,
            self.shared.streams.positions.volatile_fields.clone(),
            self.fingerprints.remove(&scope).unwrap_or_default(),
            cursors,
            self.shared.clone(),
            encoder,
            self.stats.clone(),
        )
        .with_halt(halt.clone());
        info!(server_tag = %tag, "polling positions of server");
        let name = format!("positions[{tag}]");
        let tag = tag.to_owned();
        let (cancel, task_halt) = (cancel.clone(), halt.clone());
        tasks.spawn(async move {
            let (exit, poller) = run_loop(
                name,
                Duration::from_secs(interval_secs),
                cancel,
                task_halt,
                poller,
            )
            .await;
            (tag, exit, poller)
        });
        Ok(halt)
    }

    /// Keeps what a stopped tag's poller learned, in case the tag comes back.
    fn keep(&mut self, tag: String, poller: Poller<Position>) {
        let (fps, cursors) = poller.into_state();
        self.fingerprints.insert(format!("positions/{tag}"), fps);
        self.cursors.extend(cursors);
    }
}
