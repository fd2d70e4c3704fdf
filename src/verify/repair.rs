//! `verify --repair`: sends the missing and different records through the sink as ordinary
//! events, with the fingerprints `run` keeps, so `run` does not emit them again.
//!
//! Refused while the instance's heartbeat is fresh (as `state reset` is; `--force`
//! overrides): a running instance keeps its fingerprints in memory and would overwrite
//! these. The check is made before anything is read ([`Guard::take`]), so a refusal costs
//! nothing, and again after the reads, just before the sink starts.
//!
//! The events go through [`crate::kafka::sink`] as `run` sends them: in exactly-once mode
//! one Kafka transaction per batch holding the events and their fingerprint segments,
//! under the instance's own transactional id. That id is the point: initialising it aborts
//! whatever a killed instance left open, and an instance started while the repair runs
//! fences it (its next transaction fails, nothing half-written stays visible) – the two
//! can never both write the state. The state is then restored through the sink (the
//! start-up barrier of `run`), so the fingerprints the events are compared against are the
//! committed ones. In at-least-once mode a batch's events are acknowledged before its
//! fingerprints are written, as in `run`.
//!
//! Each event is what `run` would emit for the record: `CREATED` for a key the topic does
//! not hold (and the state has no fingerprint of), `UPDATED` otherwise, `eventId` =
//! hash(stream, id, the fingerprint the state holds, the record's fingerprint) – the id
//! `run` would give the same change. A repair killed midway loses nothing and emits
//! nothing twice under another id: committed batches make their keys equal (the next
//! `verify` does not repair them again); an at-least-once batch whose events were
//! acknowledged but whose fingerprints were not written is repaired by no one again
//! (its keys are equal), and a later `run` reading those records emits them under the
//! same `eventId`s, which consumers de-duplicate.
//!
//! Extra keys are reported, never deleted: the CRM API has no delete signal, and a
//! tombstone would be a record a payout engine never expects.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Candidate, Candidates, VerifyError};
use crate::config::Config;
use crate::events::{AvroEvent, Encoder, EventMeta, Framing, Op, Schemas};
use crate::kafka::{Batch, OutRecord};
use crate::stream::change::{event_id, kept_day};
use crate::stream::poller::{days_since_epoch, StreamRecord};
use crate::stream::state::{key_in_scope, local_id, EntityKey, FpEntry, FpMap, State};

/// Events per batch (one transaction each in exactly-once mode).
const BATCH_EVENTS: usize = 1_000;

/// What a repair sent.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Repaired {
    /// `CREATED` events sent.
    pub created: u64,
    /// `UPDATED` events sent.
    pub updated: u64,
    /// Batches committed.
    pub batches: u64,
}

/// The permission to repair: the instance was not running when `verify` started.
#[derive(Debug)]
pub struct Guard {
    force: bool,
}

impl Guard {
    /// Reads the state (with a plain producer's barrier, as `state show` does) and refuses
    /// while the instance's heartbeat is younger than [`crate::state_tool::ALIVE_WITHIN`]
    /// unless `force`.
    pub async fn take(config: &Config, force: bool) -> Result<Guard, VerifyError> {
        let state = crate::state_tool::load(config)
            .await
            .map_err(VerifyError::Failed)?;
        refuse_if_running(config, &state, force)?;
        Ok(Guard { force })
    }
}

fn refuse_if_running(config: &Config, state: &State, force: bool) -> Result<(), VerifyError> {
    match crate::state_tool::running(config, state).filter(|_| !force) {
        Some(running) => Err(VerifyError::Failed(format!(
            "{running}; stop it first – it keeps its fingerprints in memory and would emit the repaired records again – or pass --force"
        ))),
        None => Ok(()),
    }
}

/// Sends the candidates through the sink with their fingerprints; returns what was sent.
pub async fn repair(
    config: &Config,
    guard: Guard,
    schemas: &Schemas,
    framing: Framing,
    candidates: Candidates,
) -> Result<Repaired, VerifyError> {
    let failed = |e: String| VerifyError::Failed(format!("repair: {e}"));
    // Checked again now, after the reads (minutes on a large CRM): an instance started
    // meanwhile is told about instead of fenced by the sink's first transaction.
    let force = guard.force;
    Guard::take(config, force).await?;
    let sink = crate::kafka::sink::start(&config.kafka)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let state_topic = config.kafka.state_topic(&config.topics);
    let timeout = Duration::from_secs(config.kafka.batch_timeout_secs.max(30));
    let state = crate::kafka::restore(
        &config.kafka,
        &state_topic,
        &sink.handle,
        timeout,
        &CancellationToken::new(),
    )
    .await
    .map_err(failed)?
    .ok_or_else(|| failed("the state read was stopped".to_owned()))?;
    let encoder = Encoder::new(schemas, framing)
        .map_err(|e| failed(e.to_string()))?
        .with_decimal_excess(config.events.decimal_excess);
    let mut repair = Repair {
        config,
        sink: &sink.handle,
        state_topic,
        fps: state.fingerprints,
        encoder,
        done: Repaired::default(),
    };
    repair.stream("leads", candidates.leads).await?;
    repair.stream("customers", candidates.customers).await?;
    repair
        .stream("transactions", candidates.transactions)
        .await?;
    repair.stream("servers", candidates.servers).await?;
    repair.stream("positions", candidates.positions).await?;
    let done = repair.done;
    drop(sink.handle);
    match tokio::time::timeout(timeout, sink.task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(failed(e.to_string())),
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(_) => return Err(failed("the producer did not flush in time".to_owned())),
    }
    info!(
        created = done.created,
        updated = done.updated,
        batches = done.batches,
        "repair committed"
    );
    Ok(done)
}

struct Repair<'a> {
    config: &'a Config,
    sink: &'a crate::kafka::SinkHandle,
    state_topic: String,
    fps: HashMap<String, FpMap>,
    encoder: Encoder,
    done: Repaired,
}

impl Repair<'_> {
    async fn stream<T: StreamRecord + AvroEvent>(
        &mut self,
        stream: &'static str,
        candidates: Vec<Candidate<T>>,
    ) -> Result<(), VerifyError> {
        let mut by_scope: HashMap<String, Vec<Candidate<T>>> = HashMap::new();
        for c in candidates {
            by_scope.entry(c.scope.clone()).or_default().push(c);
        }
        let mut scopes: Vec<String> = by_scope.keys().cloned().collect();
        scopes.sort();
        for scope in scopes {
            let list = by_scope.remove(&scope).unwrap_or_default();
            for chunk in list.chunks(BATCH_EVENTS) {
                self.batch(stream, &scope, chunk).await?;
            }
        }
        Ok(())
    }

    /// Commits one batch: its events and its fingerprint segment, together.
    async fn batch<T: StreamRecord + AvroEvent>(
        &mut self,
        stream: &'static str,
        scope: &str,
        chunk: &[Candidate<T>],
    ) -> Result<(), VerifyError> {
        let tz: chrono_tz::Tz = self.config.crm.timezone.parse().unwrap_or(chrono_tz::UTC);
        let topic = self.config.topics.data_topic(stream);
        let endpoint = format!(
            "/api/v1/{}/{}",
            self.config.crm.api_path,
            T::ENDPOINT.path_segment()
        );
        let now = Utc::now();
        let fps = self.fps.entry(scope.to_owned()).or_default();
        let mut batch = Batch::default();
        let mut remember: Vec<(EntityKey, FpEntry, Option<Box<str>>)> = Vec::new();
        let (mut created, mut updated) = (0, 0);
        for c in chunk {
            let entity = key_in_scope(stream, &c.key);
            let previous = fps.get(entity).map(|e| e.fp);
            let op = if previous.is_none() && !c.in_kafka {
                Op::Created
            } else {
                Op::Updated
            };
            let meta = EventMeta {
                event_id: event_id(stream, &c.key, previous, c.record.fp),
                op,
                emitted_at: now,
                source: self.config.crm.domain.clone(),
                endpoint: endpoint.clone(),
                window: c.window,
                fetched_at: now,
                connector_version: env!("CARGO_PKG_VERSION").to_owned(),
            };
            let payload = self
                .encoder
                .encode(&c.record.model, &meta)
                .map_err(|e| VerifyError::Failed(format!("repair: {}: {e}", c.key)))?;
            batch.events.push(OutRecord {
                topic: topic.clone(),
                key: c.key.clone().into_bytes(),
                payload: Some(payload),
            });
            let day = kept_day(c.record.model.day(tz), c.window)
                .day
                .map_or(0, days_since_epoch);
            let name = entity
                .id()
                .is_none()
                .then(|| local_id(stream, &c.key).into());
            remember.push((
                entity,
                FpEntry {
                    fp: c.record.fp,
                    day,
                },
                name,
            ));
            match op {
                Op::Created => created += 1,
                Op::Updated => updated += 1,
            }
        }
        let (records, plan) = fps.plan_write(scope, &remember);
        batch
            .state
            .extend(records.into_iter().map(|(key, payload)| OutRecord {
                topic: self.state_topic.clone(),
                key: key.into_bytes(),
                payload,
            }));
        self.sink
            .commit(batch)
            .await
            .map_err(|e| VerifyError::Failed(format!("repair: {e}")))?;
        fps.apply(plan);
        self.done.created += created;
        self.done.updated += updated;
        self.done.batches += 1;
        Ok(())
    }
}
