//! Reading the topics back in the tests: every partition from the beginning, the way a
//! consumer of the events does.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use apache_avro::from_avro_datum;
use apache_avro::types::Value as Avro;
use ibstream::events::{EventType, Schemas};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record's key as text (a key that is not UTF-8 with U+FFFD in place of its bad bytes).
    pub key: String,
    pub payload: Vec<u8>,
}

impl Consumed {
    /// The record `message` holds (a missing key or value as empty).
    pub fn of(message: &impl Message) -> Consumed {
        Consumed {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            payload: message.payload().unwrap_or_default().to_vec(),
        }
    }
}

/// Reads every partition of `topics` from the beginning to its end as `isolation` sees it
/// (`read_committed`: the last stable offset): one consumer per topic, until each of its
/// partitions reported its end after its last record; waits up to 60 s for a topic to exist.
pub async fn read_to_end(bootstrap: &str, topics: &[String], isolation: &str) -> Vec<Consumed> {
    let bootstrap = bootstrap.to_owned();
    let topics = topics.to_vec();
    let isolation = isolation.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for topic in &topics {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", super::unique_topic("read-to-end"))
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "true")
                .set("isolation.level", &isolation)
                .create()
                .unwrap();
            let assignment = from_the_beginning(
                &consumer,
                std::slice::from_ref(topic),
                Duration::from_secs(60),
            );
            let partitions = assignment.count();
            let deadline = Instant::now() + Duration::from_secs(60);
            consumer.assign(&assignment).unwrap();
            let mut at_end: HashSet<i32> = HashSet::new();
            while at_end.len() < partitions {
                assert!(
                    Instant::now() < deadline,
                    "{topic} ({isolation}) not read to its end within 60 s"
                );
                match consumer.poll(Duration::from_millis(100)) {
                    None => {}
                    Some(Err(KafkaError::PartitionEOF(partition))) => {
                        at_end.insert(partition);
                    }
                    Some(Err(e)) => panic!("reading {topic}: {e}"),
                    Some(Ok(message)) => {
                        // More came after the partition's end: it ends again later.
                        at_end.remove(&message.partition());
                        out.push(Consumed::of(&message));
                    }
                }
            }
        }
        out
    })
    .await
    .unwrap()
}

/// Reads every record of `topics` (all partitions) until at least `expected` came and then
/// nothing new for `idle` (tansu's high watermark lags, so "the end" is found by waiting).
/// Reads `read_committed` (librdkafka's default), as a payouts consumer does.
pub async fn consume(
    bootstrap: &str,
    topics: &[String],
    expected: usize,
    idle: Duration,
) -> Vec<Consumed> {
    consume_isolated(bootstrap, topics, expected, idle, "read_committed").await
}

/// [`consume`] with `isolation.level` = `isolation` (`read_committed` or `read_uncommitted`:
/// the latter also returns the records of aborted and open transactions).
pub async fn consume_isolated(
    bootstrap: &str,
    topics: &[String],
    expected: usize,
    idle: Duration,
    isolation: &str,
) -> Vec<Consumed> {
    let bootstrap = bootstrap.to_owned();
    let topics = topics.to_vec();
    let isolation = isolation.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", super::unique_topic("check"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", &isolation)
            .create()
            .unwrap();
        let assignment = from_the_beginning(&consumer, &topics, Duration::from_secs(120));
        consumer.assign(&assignment).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = Instant::now();
        loop {
            if out.len() >= expected && last.elapsed() > idle {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {expected} records within 120 s",
                out.len()
            );
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message.unwrap();
                out.push(Consumed::of(&message));
                last = Instant::now();
            }
        }
        out
    })
    .await
    .unwrap()
}

/// Decodes an event as `ibstream` writes it without a Schema Registry: Avro single-object
/// encoding (`C3 01`, the schema's 8-byte fingerprint, the datum); asserts the marker and that
/// the fingerprint is `event`'s schema's.
pub fn decode(schemas: &Schemas, event: EventType, payload: &[u8]) -> Avro {
    assert_eq!(&payload[..2], &[0xC3, 0x01]);
    assert_eq!(&payload[2..10], &schemas.get(event).fingerprint);
    let schema = &schemas.get(event).schema;
    from_avro_datum(schema, &mut &payload[10..], Some(schema)).unwrap()
}

/// Events grouped by stream and key, in offset order.
pub type ByKey = HashMap<String, HashMap<String, Vec<Avro>>>;

/// Decodes the events of `records` read from the topics `prefix.<stream>` and groups them by
/// stream and key, in offset order; the dead-letter topic (`prefix.dlq`) is left out.
pub fn group(schemas: &Schemas, prefix: &str, records: &[Consumed]) -> ByKey {
    let mut sorted: Vec<&Consumed> = records.iter().collect();
    sorted.sort_by_key(|c| (c.topic.clone(), c.partition, c.offset));
    let mut out: ByKey = HashMap::new();
    for c in sorted {
        let stream = c.topic.strip_prefix(&format!("{prefix}.")).unwrap();
        if stream == "dlq" {
            continue;
        }
        let value = decode(schemas, EventType::parse(stream).unwrap(), &c.payload);
        out.entry(stream.to_owned())
            .or_default()
            .entry(c.key.clone())
            .or_default()
            .push(value);
    }
    out
}

/// Every partition of `topics` from its beginning, as an assignment for `consumer`; waits up
/// to `timeout` for a topic without partitions yet (`ibstream` creates its topics when it
/// starts).
pub fn from_the_beginning(
    consumer: &BaseConsumer,
    topics: &[String],
    timeout: Duration,
) -> TopicPartitionList {
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        let deadline = Instant::now() + timeout;
        let partitions = loop {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .unwrap();
            let ids: Vec<i32> = metadata.topics()[0]
                .partitions()
                .iter()
                .map(|p| p.id())
                .collect();
            if !ids.is_empty() {
                break ids;
            }
            assert!(Instant::now() < deadline, "topic {topic} was not created");
            std::thread::sleep(Duration::from_millis(200));
        };
        for partition in partitions {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .unwrap();
        }
    }
    assignment
}
