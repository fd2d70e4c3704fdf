//! Reads a data topic to its end and keeps the digest and place of the latest event of every
//! key ([`read_topic`]); reads the events of chosen keys again ([`reread`]).
//!
//! The consumer is group-less in effect (partitions are assigned, never subscribed, so no
//! group is joined; its `group.id` is a fresh random name librdkafka asks for, and no offset
//! is ever committed), reads `read_committed` (aborted and open transactions are
//! not what a payouts consumer sees), and uses no transactional id: it cannot disturb a
//! running instance. "The end" is each partition's end as the broker reports it
//! (`enable.partition.eof`) followed by [`QUIET`] without a new record on any partition:
//! a broker whose high watermark lags its log end (tansu) reports an end before the last
//! records, then serves them once its watermark moves; a record arriving meanwhile starts
//! the wait again. A barrier record, as the state restore writes, cannot be used here: it
//! would be a record in a topic payout engines read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use tracing::info;

use crate::config::KafkaConfig;

/// How long every partition must stay at its end, with no new record, before the topic is
/// taken as read (a lagging high watermark catches up within it).
pub const QUIET: Duration = Duration::from_millis(1500);

/// A map by key string with a fast hash (xxh3: the keys are the CRM's ids and ibstream's own
/// topics' keys, not an attacker's; SipHash cost 7 % of a full verify).
pub type KeyMap<V> = HashMap<String, V, xxhash_rust::xxh3::Xxh3DefaultBuilder>;

/// The latest event of a key: not its payload (a million payloads are gigabytes), but its
/// digest, which shows it equal to the CRM's record, and where it is, to read it again when
/// it is not.
#[derive(Debug)]
pub struct Latest {
    /// [`super::compare::digest`] of its payload (`None`: no entity bytes found).
    pub digest: Option<[u8; 16]>,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Whether the CRM returned the key (set while comparing; a key never seen is extra if
    /// dated in the range).
    pub seen: AtomicBool,
}

/// The latest event of every key of a topic.
#[derive(Debug, Default)]
pub struct TopicEvents {
    /// Key → its latest event (in partition order; a key always goes to one partition).
    pub latest: KeyMap<Latest>,
    /// Events read (duplicates and older versions included).
    pub events: u64,
    /// The topic's partitions.
    pub partitions: Vec<i32>,
    /// Per partition with records: the offset after the last record read.
    pub offsets: BTreeMap<i32, i64>,
}

/// A record found past what [`read_topic`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Later {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key (lossy UTF-8; empty: none).
    pub key: String,
}

/// Assigns `consumer` the `partitions` of `topic`, each from its beginning.
fn assign_from_beginning(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: impl IntoIterator<Item = i32>,
) -> Result<(), String> {
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("cannot read {topic}: {e}"))
}

/// Builds the group-less `read_committed` consumer of [`read_topic`].
fn consumer(config: &KafkaConfig) -> Result<BaseConsumer, String> {
    let mut client = ClientConfig::new();
    for (key, value) in config.client_settings().map_err(|e| e.to_string())? {
        client.set(key, value);
    }
    client
        // librdkafka wants a group id even for assigned partitions; a fresh one, never
        // joined (no subscribe) and never committed to.
        .set(
            "group.id",
            format!("ibstream-verify-{:016x}", fastrand::u64(..)),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        // Read once, as fast as the broker serves it (as the state restore does).
        .set("max.partition.fetch.bytes", "16777216")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "0")
        .create()
        .map_err(|e| format!("cannot create a Kafka consumer: {e}"))
}

/// Reads `topic` again from where `read` ended to each partition's `read_committed` end
/// (as the broker reports it now) and returns the records found there: records the first
/// read did not see (its end was taken too early, or they were written meanwhile).
pub fn read_past(
    config: &KafkaConfig,
    topic: &str,
    read: &TopicEvents,
    timeout: Duration,
) -> Result<Vec<Later>, String> {
    if read.partitions.is_empty() {
        return Ok(Vec::new());
    }
    let consumer = consumer(config)?;
    let mut assignment = TopicPartitionList::new();
    for partition in &read.partitions {
        let offset = match read.offsets.get(partition) {
            Some(next) => Offset::Offset(*next),
            None => Offset::Beginning,
        };
        assignment
            .add_partition_offset(topic, *partition, offset)
            .map_err(|e| e.to_string())?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("cannot read {topic}: {e}"))?;
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut later = Vec::new();
    let started = Instant::now();
    while at_end.len() < read.partitions.len() {
        if started.elapsed() > timeout {
            return Err(format!(
                "cannot read {topic} to its end again within {timeout:?}"
            ));
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
            }
            Some(Err(e)) => return Err(format!("reading {topic} failed: {e}")),
            Some(Ok(message)) => {
                at_end.remove(&message.partition());
                later.push(Later {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_default(),
                });
            }
        }
    }
    Ok(later)
}

/// Reads `topic` from its beginning to its end; `progress` counts the events read. A topic
/// that does not exist reads as empty.
pub fn read_topic(
    config: &KafkaConfig,
    topic: &str,
    timeout: Duration,
    progress: &AtomicU64,
) -> Result<TopicEvents, String> {
    let consumer = consumer(config)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("cannot read the metadata of {topic}: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut out = TopicEvents {
        partitions: partitions.clone(),
        ..TopicEvents::default()
    };
    if partitions.is_empty() {
        return Ok(out);
    }
    assign_from_beginning(&consumer, topic, partitions.iter().copied())?;
    let mut at_end: HashSet<i32> = HashSet::new();
    let started = Instant::now();
    let mut last_record = Instant::now();
    let mut last_progress = Instant::now();
    // The clock is read at poll timeouts and ends of partitions, not per record (that cost
    // 2 % of a full verify).
    let mut progressed = false;
    loop {
        if at_end.len() == partitions.len() && last_record.elapsed() >= QUIET {
            info!(
                topic,
                events = out.events,
                keys = out.latest.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "topic read to its end"
            );
            return Ok(out);
        }
        if last_progress.elapsed() > timeout {
            return Err(format!(
                "cannot read {topic} to its end: no record and no end of partition for {timeout:?} ({} events read); an open transaction on {topic} stops read_committed readers until it ends",
                out.events
            ));
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                if std::mem::take(&mut progressed) {
                    last_progress = Instant::now();
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
                // The quiet wait starts at the last end reached.
                last_record = Instant::now();
                last_progress = last_record;
            }
            Some(Err(e)) => return Err(format!("reading {topic} failed: {e}")),
            Some(Ok(message)) => {
                progressed = true;
                if out.events & 0xFFF == 0 {
                    last_progress = Instant::now();
                }
                if !at_end.is_empty() && at_end.remove(&message.partition()) {
                    // A record past an end the broker reported: its watermark lagged.
                    last_record = Instant::now();
                    last_progress = last_record;
                }
                out.events += 1;
                out.offsets
                    .insert(message.partition(), message.offset() + 1);
                progress.fetch_add(1, Ordering::Relaxed);
                let Some(key) = message.key() else { continue };
                let key = String::from_utf8_lossy(key).into_owned();
                match message.payload() {
                    Some(payload) => {
                        let latest = Latest {
                            digest: super::compare::digest(payload),
                            partition: message.partition(),
                            offset: message.offset(),
                            seen: AtomicBool::new(false),
                        };
                        out.latest.insert(key, latest);
                    }
                    // ibstream writes no tombstones to data topics; one written by someone
                    // else removes the key, as compaction would.
                    None => {
                        out.latest.remove(&key);
                    }
                }
            }
        }
    }
}

/// Reads `topic` again from its beginning to the offsets `read` ended at and sends each record
/// that is the latest event `read` holds for its key (the same partition and offset) and that
/// `want` asks for, as (key, payload), to `to`; returns how many it sent. Stops early when `to`
/// is closed.
pub fn reread(
    config: &KafkaConfig,
    topic: &str,
    read: &TopicEvents,
    want: impl Fn(&str, &Latest) -> bool,
    to: &tokio::sync::mpsc::Sender<(String, Box<[u8]>)>,
    timeout: Duration,
) -> Result<u64, String> {
    let ends = &read.offsets;
    if ends.is_empty() {
        return Ok(0);
    }
    let end_of = |partition: i32| ends.get(&partition).copied().unwrap_or(0);
    let consumer = consumer(config)?;
    assign_from_beginning(&consumer, topic, ends.keys().copied())?;
    let mut done: HashSet<i32> = HashSet::new();
    let mut sent = 0;
    let mut last_progress = Instant::now();
    while done.len() < ends.len() {
        if last_progress.elapsed() > timeout {
            return Err(format!(
                "cannot read {topic} again: no record for {timeout:?}"
            ));
        }
        let message = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            // At the end the broker reports: the partition is done once that end (the last
            // stable offset, asked now) reaches where the first read ended – every record
            // before it that still exists was delivered. Not before: a broker's end can lag
            // its log (tansu); nor only at the record at that end again, which retention may
            // have deleted meanwhile. (The consumer's position moves only with delivered
            // records, so it cannot tell.)
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                let reached = consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(5))
                    .is_ok_and(|(_, high)| high >= end_of(partition));
                if reached {
                    done.insert(partition);
                }
                continue;
            }
            Some(Err(e)) => return Err(format!("reading {topic} again failed: {e}")),
            Some(Ok(message)) => message,
        };
        last_progress = Instant::now();
        let (partition, offset) = (message.partition(), message.offset());
        let end = end_of(partition);
        if offset + 1 >= end {
            done.insert(partition);
        }
        if offset >= end {
            continue;
        }
        let (Some(key), Some(payload)) = (message.key(), message.payload()) else {
            continue;
        };
        let key = String::from_utf8_lossy(key);
        let Some(latest) = read.latest.get(key.as_ref()) else {
            continue;
        };
        if latest.partition != partition || latest.offset != offset || !want(&key, latest) {
            continue;
        }
        if to
            .blocking_send((key.into_owned(), payload.into()))
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    Ok(sent)
}
