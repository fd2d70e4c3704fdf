//! The pipeline end to end: simulator → `ibstream run` → a broker, checked against the
//! simulator's ground truth. The suites run on Apache Kafka in exactly-once (the default
//! users run), read back with read_committed; a few stay on tansu, at-least-once, to show the
//! design works on a broker with late high watermarks and no transactions (each says why).

#[path = "../common/mod.rs"]
mod common;

pub use common::topics::{consume, consume_isolated, decode, group, ByKey, Consumed};
pub use common::truth::{expected, without_meta};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use chrono_tz::Tz;
use ibstream::config::{Config, Delivery};
use ibstream::crm::page::read_record;
use ibstream::crm::{Customer, Lead, Position, Transaction};
use ibstream::events::{EventType, Schemas};
use ibstream::run::{RunError, RunReport, Stats};
use ibstream::sim::{ChangeKind, Kind, SimHandle};
use ibstream::stream::poller::StreamStats;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value as Json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const STREAMS: [&str; 5] = ["leads", "customers", "transactions", "servers", "positions"];

/// A run's configuration on `broker`: exactly-once where the broker has transactions
/// (Apache Kafka), at-least-once where it has none (tansu); every stream polled each second.
pub fn config(
    sim: &SimHandle,
    broker: &impl common::Broker,
    prefix: &str,
    instance: &str,
) -> Config {
    let mut config = Config::load(None).unwrap();
    config.crm = common::crm_config(sim);
    config.kafka.bootstrap_servers = broker.bootstrap().to_owned();
    config.kafka.delivery = delivery(broker);
    config.kafka.instance_id = instance.to_owned();
    config.kafka.replication_factor = 1;
    config.kafka.batch_timeout_secs = 30;
    config.topics.prefix = prefix.to_owned();
    // Many runs share the machine: each picks a free port for its operations server.
    config.http.listen = "127.0.0.1:0".to_owned();
    config.streams.start_date = chrono::NaiveDate::from_ymd_opt(2024, 1, 1).unwrap();
    for stream in [
        &mut config.streams.leads,
        &mut config.streams.customers,
        &mut config.streams.transactions,
        &mut config.streams.servers,
        &mut config.streams.positions,
    ] {
        stream.poll_interval_secs = 1;
    }
    config
}

/// The delivery `run` uses on `broker`: exactly-once (the default) where it has transactions.
pub fn delivery(broker: &impl common::Broker) -> Delivery {
    if broker.transactions() {
        Delivery::ExactlyOnce
    } else {
        Delivery::AtLeastOnce
    }
}

/// The `kafka.delivery` value of a configuration file for `broker`.
pub fn delivery_toml(broker: &impl common::Broker) -> &'static str {
    match delivery(broker) {
        Delivery::ExactlyOnce => "exactly-once",
        Delivery::AtLeastOnce => "at-least-once",
    }
}

pub struct Running {
    pub cancel: CancellationToken,
    pub stats: Stats,
    pub task: JoinHandle<Result<RunReport, RunError>>,
}

pub fn start(config: Config) -> Running {
    let stats: Stats = STREAMS.into_iter().map(|s| (s, Arc::default())).collect();
    let cancel = CancellationToken::new();
    let run = ibstream::run::run(config, cancel.clone(), stats.clone());
    let task = tokio::spawn(async move {
        // Shown with a failing test's output, which `wait_cycles` cannot return.
        let result = run.await;
        if !cancel_requested(&result) {
            eprintln!("ibstream run ended: {result:?}");
        }
        result
    });
    Running {
        cancel,
        stats,
        task,
    }
}

/// Whether a run's end needs no word: a clean end with no stream stopped.
fn cancel_requested(result: &Result<RunReport, RunError>) -> bool {
    matches!(result, Ok(report) if report.stopped.is_empty())
}

impl Running {
    /// Returns the completed cycles of each stream.
    pub fn cycles(&self) -> HashMap<&'static str, u64> {
        self.stats
            .iter()
            .map(|(k, v)| (*k, v.cycles.load(Ordering::Relaxed)))
            .collect()
    }

    /// Waits until every stream in `streams` completed `more` cycles after `from` (positions
    /// count one cycle per server tag).
    pub async fn wait_cycles(
        &self,
        from: &HashMap<&'static str, u64>,
        streams: &[&str],
        more: u64,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.cycles();
            if streams
                .iter()
                .all(|s| now[s] >= from.get(s).copied().unwrap_or(0) + more)
            {
                return;
            }
            assert!(!self.task.is_finished(), "ibstream run ended early");
            assert!(
                Instant::now() < deadline,
                "cycles did not complete within {timeout:?}: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(self) -> RunReport {
        self.cancel.cancel();
        let started = Instant::now();
        let report = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("run stops within 10 s")
            .unwrap()
            .expect("run ends cleanly");
        assert!(started.elapsed() < Duration::from_secs(10));
        report
    }
}

pub fn field<'a>(record: &'a Avro, name: &str) -> &'a Avro {
    match record {
        Avro::Record(fields) => &fields.iter().find(|(n, _)| n == name).unwrap().1,
        other => panic!("not a record: {other:?}"),
    }
}

pub fn meta_string(record: &Avro, name: &str) -> String {
    match field(field(record, "meta"), name) {
        Avro::String(s) => s.clone(),
        Avro::Enum(_, s) => s.clone(),
        other => panic!("{other:?}"),
    }
}

/// The fields of an event but `meta`: what the record was.
pub fn body(record: &Avro) -> Vec<(String, Avro)> {
    match record {
        Avro::Record(fields) => fields
            .iter()
            .filter(|(n, _)| n != "meta")
            .cloned()
            .collect(),
        other => panic!("not a record: {other:?}"),
    }
}

fn event_type(stream: &str) -> EventType {
    EventType::parse(stream).unwrap()
}

/// Reads every data topic (at least as many records as the truth holds) and groups the events.
pub async fn read_events(
    broker: &impl common::Broker,
    sim: &SimHandle,
    schemas: &Schemas,
    prefix: &str,
) -> ByKey {
    let records = consume(
        broker.bootstrap(),
        &data_topics(prefix),
        truth_count(sim),
        Duration::from_secs(2),
    )
    .await;
    group(schemas, prefix, &records)
}

pub fn data_topics(prefix: &str) -> Vec<String> {
    STREAMS.iter().map(|s| format!("{prefix}.{s}")).collect()
}

pub fn truth_count(sim: &SimHandle) -> usize {
    STREAMS.iter().map(|s| expected(sim, s).len()).sum()
}

/// Asserts the latest event of every key equals the truth, and no key is missing or extra.
pub fn assert_matches_truth(sim: &SimHandle, events: &ByKey) {
    if let Some(mismatch) = truth_mismatch(sim, events) {
        panic!("{mismatch}");
    }
}

/// Returns how `events` differ from the truth (a key missing or extra, a latest event not the
/// truth), or `None`.
pub fn truth_mismatch(sim: &SimHandle, events: &ByKey) -> Option<String> {
    for stream in STREAMS {
        let truth = expected(sim, stream);
        let got = events.get(stream).cloned().unwrap_or_default();
        let missing: Vec<&String> = truth.keys().filter(|k| !got.contains_key(*k)).collect();
        if !missing.is_empty() {
            return Some(format!(
                "{stream}: {} of {} keys missing, e.g. {:?}",
                missing.len(),
                truth.len(),
                &missing[..missing.len().min(5)]
            ));
        }
        let extra: Vec<&String> = got.keys().filter(|k| !truth.contains_key(*k)).collect();
        if !extra.is_empty() {
            return Some(format!(
                "{stream}: keys not in the truth: {:?}",
                &extra[..extra.len().min(5)]
            ));
        }
        for (key, expected) in &truth {
            let latest = got[key].last().unwrap();
            if &without_meta(latest) != expected {
                return Some(format!(
                    "{stream} {key}: latest event differs from the truth:\n{:?}\n{expected:?}",
                    without_meta(latest)
                ));
            }
        }
    }
    None
}

/// Asserts every duplicate event has its twin's `eventId` and no `UPDATED` repeats the event
/// before it, volatile fields (`balanceUsd`) aside (a phantom change); returns the duplicates.
pub fn assert_duplicates_share_ids_and_no_phantom_update(events: &ByKey) -> usize {
    let mut duplicates = 0;
    for (stream, keys) in events {
        for (key, versions) in keys {
            // Versions in offset order; a re-emitted event repeats an earlier one whole.
            let mut distinct: Vec<&Avro> = Vec::new();
            let mut by_id: HashMap<String, &Avro> = HashMap::new();
            for version in versions {
                let id = meta_string(version, "eventId");
                match by_id.get(&id) {
                    Some(twin) => {
                        assert_eq!(
                            body(twin),
                            body(version),
                            "{stream} {key}: two events share eventId {id} but differ"
                        );
                        duplicates += 1;
                    }
                    None => {
                        by_id.insert(id, version);
                        distinct.push(version);
                    }
                }
            }
            let ids: Vec<String> = versions.iter().map(|v| meta_string(v, "eventId")).collect();
            if let Err(e) = event_ids_never_come_back(&ids) {
                panic!("{stream} {key}: {e} (event ids in offset order: {ids:?})");
            }
            for pair in distinct.windows(2) {
                assert_ne!(
                    without_meta(pair[0]),
                    without_meta(pair[1]),
                    "{stream} {key}: an event with a new eventId repeats the one before it, volatile fields aside (a phantom UPDATED, or a duplicate with another id); they differ in {:?}",
                    differing(pair[0], pair[1])
                );
            }
        }
    }
    duplicates
}

/// Checks a key's event ids (in offset order) for an id that comes back after another one:
/// X, Y, X leaves the topic on the stale X, and a consumer that drops ids it has seen stays
/// on Y while the topic says X (or, as a sweep replaying a stale page did, on a stale value
/// while the topic ends on the truth). Allowed: a redelivered event right after itself (X, X),
/// and a batch sent again whole (X, Y, X, Y: the replay goes on to the newest id before any
/// new id or the end), as at-least-once delivery does.
pub fn event_ids_never_come_back(ids: &[String]) -> Result<(), String> {
    // The distinct ids in the order they first came.
    let mut firsts: Vec<&String> = Vec::new();
    // Inside a replay: the index in `firsts` of the id expected next.
    let mut replay: Option<usize> = None;
    let mut previous: Option<&String> = None;
    for id in ids {
        if previous == Some(id) {
            continue;
        }
        previous = Some(id);
        if let Some(next) = replay {
            if firsts.get(next) != Some(&id) {
                return Err(format!(
                    "eventId {id} came where a replay of the earlier events expected {:?}",
                    firsts.get(next)
                ));
            }
            replay = (next + 1 < firsts.len()).then_some(next + 1);
            continue;
        }
        match firsts.iter().position(|f| *f == id) {
            None => firsts.push(id),
            // Outside a replay the id before is the newest, skipped above: `at + 1` exists.
            Some(at) => replay = Some(at + 1),
        }
    }
    match replay {
        None => Ok(()),
        Some(next) => Err(format!(
            "eventId {} came back after {} and the topic ends on it (expected the replay to go on with {})",
            firsts[next - 1],
            firsts[firsts.len() - 1],
            firsts[next]
        )),
    }
}

#[test]
fn event_ids_that_come_back_are_caught_and_redeliveries_pass() {
    let ids = |s: &str| -> Vec<String> { s.split(',').map(str::to_owned).collect() };
    for ok in [
        "X",
        "X,X",
        "X,Y",
        "X,X,Y,Y",
        "X,Y,X,Y",
        "X,Y,Z,Y,Z",
        "X,Y,X,Y,Z",
        "X,Y,Y,X,Y,Z",
    ] {
        assert_eq!(event_ids_never_come_back(&ids(ok)), Ok(()), "{ok}");
    }
    for bad in ["X,Y,X", "X,Y,Z,Y", "X,Y,X,Z", "X,Y,Z,X,Z", "X,Y,X,Y,X"] {
        assert!(event_ids_never_come_back(&ids(bad)).is_err(), "{bad}");
    }
}

/// The fields (with `meta`'s subfields) whose values differ between two events.
fn differing(a: &Avro, b: &Avro) -> Vec<(String, Avro, Avro)> {
    let fields = |r: &Avro| match r {
        Avro::Record(fields) => fields.clone(),
        _ => Vec::new(),
    };
    let (a, b) = (fields(a), fields(b));
    let mut out = Vec::new();
    for ((name, x), (_, y)) in a.iter().zip(b.iter()) {
        if name == "meta" {
            out.extend(differing(x, y));
        } else if x != y {
            out.push((name.clone(), x.clone(), y.clone()));
        }
    }
    out
}

/// The truth records of every stream that ibstream cannot read (malformed): each must come
/// out as a dead letter.
pub fn malformed_truth(sim: &SimHandle) -> Vec<Json> {
    fn unreadable<T: ibstream::crm::CrmRecord>(truth: Vec<Json>) -> Vec<Json> {
        truth
            .into_iter()
            .filter(|j| read_record::<T>(j.clone(), Tz::UTC).is_err())
            .collect()
    }
    let mut out = unreadable::<Lead>(sim.truth(Kind::Leads));
    out.extend(unreadable::<Customer>(sim.truth(Kind::Customers)));
    out.extend(unreadable::<Transaction>(
        sim.truth(Kind::Transactions)
            .into_iter()
            .filter(|t| t["isFake"] == false)
            .collect(),
    ));
    out.extend(unreadable::<Position>(sim.truth(Kind::Positions)));
    out
}

mod answers;
mod completeness;
mod faults;
mod newcomer;
mod ops;
mod scenarios;
mod values;
