//! `ibstream events tail`: a topic's events decoded as JSON lines, for people and scripts.
//!
//! One JSON object per record on stdout: `topic`, `partition`, `offset`, `key`, `schema`
//! (the writer schema's full name) and `event` (the decoded record, shape in
//! [`super::decode`]: decimals as exact strings). A record that does not decode is a line
//! with `error` instead of `schema` and `event`; the tail goes on.
//!
//! It reads `read_committed` (an exactly-once run's aborted batches never show) with its own
//! partition assignment: it joins no consumer group and commits no offsets, so it can run
//! beside any consumer and leaves nothing behind. It needs only the Kafka part of the
//! configuration (and the Schema Registry for Confluent-framed values).
//!
//! `--until-end` stops once every partition is read to the end it had at start. That end is
//! the partition's high watermark asked at start (ListOffsets), and a partition counts as read
//! to it when the consumer's position reaches it – position, not the last record's offset,
//! because under `read_committed` an exactly-once writer's last offset is a transaction
//! marker, never a record; librdkafka moves the position past it. The end is never written
//! to find it (no barrier record as `kafka::restore` writes into the state topic): a data
//! topic is read by consumers that expect events only, and the tail leaves nothing behind.
//! As a broker's high watermark can lag its log end (tansu's: after a batch of 40 records written at offset 0 it reported 1), the
//! tail then reads on until no record has come for [`QUIET`] (at most [`DRAIN_MAX`]): what
//! the broker had past the watermark it reported is printed too, and so may be records
//! written meanwhile.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::decode::Decoder;
use super::registry::SchemaRegistry;
use super::schema::Schemas;
use crate::config::Config;

/// With `--until-end`: how long no record may come, after every partition reached its end
/// at start, before the tail ends.
pub const QUIET: Duration = Duration::from_secs(1);

/// With `--until-end`: the longest the tail reads on after every partition reached its end at
/// start (a topic written without pause has no quiet second).
pub const DRAIN_MAX: Duration = Duration::from_secs(5);

/// The streams whose topics hold events.
const STREAMS: [&str; 5] = ["leads", "customers", "transactions", "servers", "positions"];

/// What `events tail` reads (its command line).
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["stream", "topic"])))]
pub struct TailArgs {
    /// The stream whose configured topic to read: leads, customers, transactions, servers,
    /// positions.
    #[arg(long)]
    pub stream: Option<String>,
    /// The topic to read.
    #[arg(long)]
    pub topic: Option<String>,
    /// Start at the oldest record (default: only records written from now on).
    #[arg(long)]
    pub from_beginning: bool,
    /// Only records with this key (the entity key: a lead's id, `mt4-live-01:123` for a
    /// position).
    #[arg(long)]
    pub key: Option<String>,
    /// Stop after printing N records (default: follow until Ctrl-C).
    #[arg(long, value_name = "N")]
    pub max: Option<u64>,
    /// Stop once every partition is read to the end it had when the tail started (with
    /// --from-beginning: the whole topic, then exit; also when --max or --key find fewer
    /// records, or the topic is empty). Without it the tail follows until Ctrl-C.
    #[arg(long)]
    pub until_end: bool,
    /// Kafka's bootstrap servers (`HOST:PORT`), instead of `kafka.bootstrap_servers` (e.g.
    /// the address `ibstream demo` prints).
    #[arg(long)]
    pub bootstrap_servers: Option<String>,
}

/// Errors that stop the tail before it reads (a record that does not decode never does).
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// Bad configuration or arguments (exit code 2).
    #[error("{0}")]
    Config(String),
    /// Kafka or the registry cannot be used.
    #[error("{0}")]
    Kafka(String),
    /// The output cannot be written.
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

/// One output line, its keys in this order.
#[derive(serde::Serialize)]
struct Line<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<Box<serde_json::value::RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Returns the topic `args` name.
pub fn topic(config: &Config, args: &TailArgs) -> Result<String, TailError> {
    match (&args.stream, &args.topic) {
        (Some(stream), None) if STREAMS.contains(&stream.as_str()) => {
            Ok(config.topics.data_topic(stream))
        }
        (Some(stream), None) => Err(TailError::Config(format!(
            "unknown stream {stream:?}; streams: {}",
            STREAMS.join(", ")
        ))),
        (None, Some(topic)) => Ok(topic.clone()),
        _ => Err(TailError::Config(
            "give either --stream or --topic".to_owned(),
        )),
    }
}

/// Prints the events of the topic `args` name to `out` until `--max` records were printed,
/// `cancel` fires (Ctrl-C) or `out` is closed (a pipe to `head`); returns how many it
/// printed.
pub async fn run(
    config: &Config,
    args: &TailArgs,
    out: &mut (dyn Write + Send),
    cancel: &CancellationToken,
) -> Result<u64, TailError> {
    let topic = topic(config, args)?;
    let schemas =
        Schemas::load(&config.events.namespace).map_err(|e| TailError::Config(e.to_string()))?;
    let registry = match &config.schema_registry {
        Some(registry) => {
            Some(SchemaRegistry::build(registry).map_err(|e| TailError::Config(e.to_string()))?)
        }
        None => None,
    };
    let mut decoder = Decoder::new(&schemas, registry);
    let kafka = config.kafka.clone();
    // A refused login or TLS handshake is told at once, naming the key to fix.
    let metadata = tokio::task::spawn_blocking(move || {
        crate::kafka::refusal::reach(&kafka, Duration::from_secs(30))
    })
    .await
    .map_err(|e| TailError::Kafka(e.to_string()))?
    .map_err(TailError::Kafka)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(TailError::Kafka(format!(
            "topic {topic} does not exist at {} (`ibstream run` creates it)",
            config.kafka.bootstrap_servers
        )));
    }
    let mut client = ClientConfig::new();
    for (key, value) in config
        .kafka
        .client_settings()
        .map_err(|e| TailError::Config(e.to_string()))?
    {
        client.set(key, value);
    }
    // Partition → the end to read to; a partition leaves the map once its position reaches
    // its end (with no --from-beginning the tail starts at the end: nothing to read).
    let mut ends: HashMap<i32, i64> = HashMap::new();
    if args.until_end && args.from_beginning {
        ends = ends_at_start(&client, &topic, &partitions).await?;
    }
    // group.id is required by librdkafka's consumer; with assign() it joins no group, and
    // nothing is committed.
    let consumer: StreamConsumer = client
        .set("group.id", "ibstream-events-tail")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        // A topic missing from the metadata counts as deleted after this (librdkafka waits
        // 30 s by default for a new topic to propagate; the tail's topic existed at start).
        .set("topic.metadata.propagation.max.ms", "5000")
        // An end-of-partition event tells when to look at the position (--until-end).
        .set(
            "enable.partition.eof",
            if args.until_end { "true" } else { "false" },
        )
        .create()
        .map_err(|e| TailError::Kafka(format!("cannot create a Kafka consumer: {e}")))?;
    let start = if args.from_beginning {
        Offset::Beginning
    } else {
        Offset::End
    };
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment
            .add_partition_offset(&topic, partition, start)
            .map_err(|e| TailError::Kafka(e.to_string()))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| TailError::Kafka(format!("cannot read {topic}: {e}")))?;
    let mut printed = 0u64;
    // With --until-end: when every partition had reached its end at start.
    let mut drain_from: Option<std::time::Instant> = None;
    loop {
        if args.max.is_some_and(|max| printed >= max) {
            return Ok(printed);
        }
        if args.until_end {
            ends.retain(|partition, end| position(&consumer, &topic, *partition) < *end);
            if ends.is_empty() && drain_from.is_none() {
                drain_from = Some(std::time::Instant::now());
            }
        }
        if drain_from.is_some_and(|since| since.elapsed() >= DRAIN_MAX) {
            return Ok(printed);
        }
        let message = tokio::select! {
            _ = cancel.cancelled() => return Ok(printed),
            _ = tokio::time::sleep(QUIET), if drain_from.is_some() => return Ok(printed),
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(message) => message,
            // Reached the (current) end of a partition: the position is checked above.
            Err(KafkaError::PartitionEOF(_)) => continue,
            Err(e)
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::UnknownTopicOrPartition
                            | RDKafkaErrorCode::UnknownTopic
                            | RDKafkaErrorCode::UnknownPartition
                    )
                ) =>
            {
                return Err(TailError::Kafka(format!(
                    "topic {topic} no longer exists at {} (deleted while the tail read it): {e}",
                    config.kafka.bootstrap_servers
                )));
            }
            Err(e) => {
                tracing::warn!(topic = %topic, error = %e, "kafka read failed, retrying");
                continue;
            }
        };
        let key = message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        if args.key.is_some() && args.key != key {
            continue;
        }
        let mut line = Line {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            key,
            schema: None,
            event: None,
            error: None,
        };
        match message.payload() {
            None => line.error = Some("the record has no value".to_owned()),
            // A registry that does not answer must not hold off Ctrl-C.
            Some(payload) => match tokio::select! {
                _ = cancel.cancelled() => return Ok(printed),
                decoded = decoder.decode(payload) => decoded,
            } {
                Ok(decoded) => {
                    line.schema = Some(decoded.schema);
                    line.event = Some(decoded.record);
                }
                Err(e) => line.error = Some(format!("does not decode: {e}")),
            },
        }
        let line = serde_json::to_string(&line)
            .map_err(|e| TailError::Output(std::io::Error::other(e)))?;
        let written = writeln!(out, "{line}").and_then(|()| out.flush());
        match written {
            Ok(()) => printed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(printed),
            Err(e) => return Err(TailError::Output(e)),
        }
    }
}

/// Returns each partition's end (its high watermark) as it is now, leaving out the empty ones.
async fn ends_at_start(
    client: &ClientConfig,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, i64>, TailError> {
    let watermarks: BaseConsumer = client
        .clone()
        .set("group.id", "ibstream-events-tail")
        .create()
        .map_err(|e| TailError::Kafka(format!("cannot create a Kafka consumer: {e}")))?;
    let (topic, partitions) = (topic.to_owned(), partitions.to_vec());
    tokio::task::spawn_blocking(move || {
        let mut ends = HashMap::new();
        for partition in partitions {
            let (low, high) = watermarks
                .fetch_watermarks(&topic, partition, Duration::from_secs(30))
                .map_err(|e| {
                    TailError::Kafka(format!("cannot find the end of {topic} [{partition}]: {e}"))
                })?;
            if high > low {
                ends.insert(partition, high);
            }
        }
        Ok(ends)
    })
    .await
    .map_err(|e| TailError::Kafka(e.to_string()))?
}

/// Returns the consumer's position in `partition` (the next offset it reads; -1 if none yet).
fn position(consumer: &StreamConsumer, topic: &str, partition: i32) -> i64 {
    let positions = consumer.position().unwrap_or_default();
    match positions
        .find_partition(topic, partition)
        .map(|p| p.offset())
    {
        Some(Offset::Offset(at)) => at,
        _ => -1,
    }
}
