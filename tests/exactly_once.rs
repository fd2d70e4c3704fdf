//! Exactly-once delivery on rdkafka's in-process MockCluster (tansu has no transactions).
//!
//! Limits of the mock, said plainly: its read_committed consumers also see records of aborted
//! transactions, so these tests check that batches commit in transactions, that a failing
//! batch is aborted and retried until it commits, and that a fenced producer stops – not that
//! aborted records stay invisible. What a topic read back can prove here: a reported batch's
//! records are there (nothing lost); a committed batch is there once (no later transaction
//! sends it again); an attempt's records come whole and in order. The mock does not fence by epoch either (a
//! second producer with the same transactional id bumps it, but the first's requests are not
//! checked), so fencing is shown by the broker's answer, injected.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ibstream::config::{Delivery, KafkaConfig};
use ibstream::kafka::sink::{self, SinkError};
use ibstream::kafka::{Batch, OutRecord};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

fn kafka(bootstrap: &str, instance: &str) -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: bootstrap.to_owned(),
        delivery: Delivery::ExactlyOnce,
        instance_id: instance.to_owned(),
        batch_timeout_secs: 10,
        ..KafkaConfig::default()
    }
}

fn batch(n: usize, tag: &str) -> Batch {
    Batch {
        events: (0..n)
            .map(|i| OutRecord {
                topic: "crm.leads".to_owned(),
                key: format!("{tag}-{i}").into_bytes(),
                payload: Some(format!("event {tag}-{i}").into_bytes()),
            })
            .collect(),
        state: vec![OutRecord {
            topic: "crm._ibstream_state".to_owned(),
            key: format!("cursor/{tag}").into_bytes(),
            payload: Some(b"{}".to_vec()),
        }],
    }
}

fn read_committed(bootstrap: &str, topic: &str, expected: usize) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "check")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut keys = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while keys.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            keys.push(String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned());
        }
    }
    keys
}

/// Reads every record of partition 0 of `topic` (read_committed) up to its end (the high
/// watermark, which the mock reports at once); returns the keys.
fn read_to_end(bootstrap: &str, topic: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "check")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut keys = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            keys.push(String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned());
        }
        let at = consumer.position().unwrap();
        if matches!(at.elements()[0].offset(), Offset::Offset(o) if o >= high) {
            return keys;
        }
        assert!(
            Instant::now() < deadline,
            "{topic} not read to offset {high} within 20 s: {keys:?}"
        );
    }
}

fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("crm.leads", 1, 1).unwrap();
    mock.create_topic("crm._ibstream_state", 1, 1).unwrap();
    mock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_commit_in_transactions() {
    let mock = cluster();
    let sink = sink::start(&kafka(&mock.bootstrap_servers(), "eo-commit"))
        .await
        .unwrap();
    sink.handle.commit(batch(3, "a")).await.unwrap();
    sink.handle.commit(batch(2, "b")).await.unwrap();
    assert_eq!(sink.handle.stats().aborts.load(Ordering::Relaxed), 0);
    let keys = read_committed(&mock.bootstrap_servers(), "crm.leads", 5);
    assert_eq!(keys, vec!["a-0", "a-1", "a-2", "b-0", "b-1"]);
    let state = read_committed(&mock.bootstrap_servers(), "crm._ibstream_state", 2);
    assert_eq!(state, vec!["cursor/a", "cursor/b"]);
    drop(sink.handle);
    sink.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_is_aborted_and_retried() {
    let mock = cluster();
    let sink = sink::start(&kafka(&mock.bootstrap_servers(), "eo-retry"))
        .await
        .unwrap();
    sink.handle.commit(batch(1, "first")).await.unwrap();
    // The next produce request fails with a non-retriable error: the transaction must be
    // aborted; the sink then runs the batch again in a new transaction.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
    );
    sink.handle
        .commit(batch(2, "second"))
        .await
        .expect("committed on retry");
    assert!(
        sink.handle.stats().aborts.load(Ordering::Relaxed) >= 1,
        "the failed transaction was aborted"
    );
    assert_eq!(sink.handle.stats().batches.load(Ordering::Relaxed), 2);
    // The failed attempts' records are in the mock's log too (it shows aborted records), so
    // the copies of "second" cannot be told apart; what shows: the committed "first" is
    // never sent again, every attempt's records come whole and in order, the last attempt
    // (the committed one) ends the log, and the state records follow the same rule.
    let keys = read_to_end(&mock.bootstrap_servers(), "crm.leads");
    let count = |keys: &[String], key: &str| keys.iter().filter(|k| *k == key).count();
    assert_eq!(count(&keys, "first-0"), 1, "{keys:?}");
    assert_eq!(keys[0], "first-0", "{keys:?}");
    let copies = count(&keys, "second-0");
    assert!(copies >= 1, "{keys:?}");
    assert_eq!(
        keys[1..],
        ["second-0", "second-1"].repeat(copies)[..],
        "each attempt writes the whole batch once, in order"
    );
    let state = read_to_end(&mock.bootstrap_servers(), "crm._ibstream_state");
    assert_eq!(count(&state, "cursor/first"), 1, "{state:?}");
    assert_eq!(state.last().map(String::as_str), Some("cursor/second"));
    drop(sink.handle);
    sink.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_the_same_instance_id_fences_the_first() {
    let mock = cluster();
    let first = sink::start(&kafka(&mock.bootstrap_servers(), "eo-fence"))
        .await
        .unwrap();
    first.handle.commit(batch(1, "one")).await.unwrap();
    let second = sink::start(&kafka(&mock.bootstrap_servers(), "eo-fence"))
        .await
        .unwrap();
    // The mock bumps the epoch for the second producer but does not check it on the first
    // one's requests; a real broker answers them PRODUCER_FENCED, so the mock is told to.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    match first.handle.commit(batch(1, "zombie")).await {
        Err(SinkError::Fatal(message)) => {
            assert!(message.contains("same kafka.instance_id"), "{message}")
        }
        other => panic!("the fenced producer went on: {other:?}"),
    }
    // The fenced sink has stopped: it refuses what comes after, without writing it.
    assert!(matches!(
        first.handle.commit(batch(1, "again")).await,
        Err(SinkError::Fatal(_))
    ));
    second.handle.commit(batch(1, "two")).await.unwrap();
    drop(second.handle);
    second.task.await.unwrap().unwrap();
    // A fenced batch is never sent again (one injected error: a retry would have gone
    // through and shown a second copy), and nothing after it is sent at all. Its state record
    // may be in the mock's log (sent in another request of the transaction the fenced
    // producer never ends); a real broker never shows it to read_committed readers.
    let keys = read_to_end(&mock.bootstrap_servers(), "crm.leads");
    let count = |keys: &[String], key: &str| keys.iter().filter(|k| *k == key).count();
    assert_eq!(count(&keys, "one-0"), 1, "{keys:?}");
    assert_eq!(count(&keys, "two-0"), 1, "{keys:?}");
    assert!(
        count(&keys, "zombie-0") <= 1,
        "the fenced batch was sent again: {keys:?}"
    );
    assert_eq!(
        count(&keys, "again-0"),
        0,
        "a fenced sink went on: {keys:?}"
    );
    let state = read_to_end(&mock.bootstrap_servers(), "crm._ibstream_state");
    assert!(count(&state, "cursor/zombie") <= 1, "{state:?}");
    assert_eq!(count(&state, "cursor/again"), 0, "{state:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_times_out_is_committed_again_not_aborted_and_resent() {
    let mock = cluster();
    let mut config = kafka(&mock.bootstrap_servers(), "eo-commit-retry");
    config.batch_timeout_secs = 2;
    let sink = sink::start(&config).await.unwrap();
    sink.handle.commit(batch(1, "first")).await.unwrap();
    // The coordinator keeps failing EndTxn with a retriable error for longer than the commit
    // timeout: the commit call times out with its outcome unknown. Committing again is right;
    // aborting and producing the batch again would write it twice.
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 6],
    );
    sink.handle
        .commit(batch(2, "second"))
        .await
        .expect("committed after retrying the commit");
    assert!(
        sink.handle.stats().commit_retries.load(Ordering::Relaxed) >= 1,
        "the commit never timed out: the scenario did not happen"
    );
    assert_eq!(
        sink.handle.stats().aborts.load(Ordering::Relaxed),
        0,
        "the transaction was aborted and sent again"
    );
    sink.handle.commit(batch(1, "third")).await.unwrap();
    // The mock shows aborted records too: a resent batch would appear twice.
    let keys = read_committed(&mock.bootstrap_servers(), "crm.leads", 5);
    assert_eq!(keys, vec!["first-0", "second-0", "second-1", "third-0"]);
    drop(sink.handle);
    sink.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_cannot_be_aborted_is_fatal() {
    let mock = cluster();
    let mut config = kafka(&mock.bootstrap_servers(), "eo-abort-fails");
    config.batch_timeout_secs = 2;
    let sink = sink::start(&config).await.unwrap();
    sink.handle.commit(batch(1, "first")).await.unwrap();
    // The batch fails, and the abort that must follow cannot complete.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
    );
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 200],
    );
    match sink.handle.commit(batch(2, "second")).await {
        Err(SinkError::Fatal(message)) => assert!(message.contains("abort"), "{message}"),
        other => panic!("a failed abort was not fatal: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_error_of_the_idempotent_producer_is_fatal() {
    let mock = cluster();
    // The broker refuses the producer id the idempotent producer needs: librdkafka raises a
    // fatal error, after which it cannot keep its guarantees.
    mock.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED; 5],
    );
    let mut config = kafka(&mock.bootstrap_servers(), "alo-fatal");
    config.delivery = Delivery::AtLeastOnce;
    config.batch_timeout_secs = 5;
    let sink = sink::start(&config).await.unwrap();
    match sink.handle.commit(batch(1, "first")).await {
        Err(SinkError::Fatal(message)) => assert!(message.contains("fatal"), "{message}"),
        other => panic!("a fatal producer error was retriable: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_commits_a_transaction_without_fencing_the_running_instance() {
    let mock = cluster();
    let config = kafka(&mock.bootstrap_servers(), "eo-check");
    let sink = sink::start(&config).await.unwrap();
    sink.handle.commit(batch(1, "before")).await.unwrap();
    let full = ibstream::config::Config {
        kafka: config.clone(),
        ..ibstream::config::Config::load(None).unwrap()
    };
    let lines = ibstream::check::kafka(&full).await;
    let transactions = lines
        .iter()
        .find(|l| l.what == "kafka transactions")
        .unwrap();
    assert!(transactions.is_ok(), "{transactions}");
    // The check used a transactional id of its own: the instance's producer still commits.
    sink.handle.commit(batch(1, "after")).await.unwrap();
    drop(sink.handle);
    sink.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_sent_at_once_share_a_transaction() {
    let mock = cluster();
    let sink = sink::start(&kafka(&mock.bootstrap_servers(), "eo-group"))
        .await
        .unwrap();
    let mut pollers = tokio::task::JoinSet::new();
    for tag in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        let handle = sink.handle.clone();
        pollers.spawn(async move { handle.commit(batch(50, tag)).await });
    }
    while let Some(done) = pollers.join_next().await {
        done.unwrap().unwrap();
    }
    let stats = sink.handle.stats();
    assert_eq!(stats.batches.load(Ordering::Relaxed), 8);
    let transactions = stats.transactions.load(Ordering::Relaxed);
    assert!(
        (1..8).contains(&transactions),
        "8 batches sent at once took {transactions} transactions"
    );
    assert_eq!(
        read_committed(&mock.bootstrap_servers(), "crm.leads", 400).len(),
        400
    );
    assert_eq!(
        read_committed(&mock.bootstrap_servers(), "crm._ibstream_state", 8).len(),
        8
    );
    drop(sink.handle);
    sink.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_down_mid_transaction_fails_or_commits_the_batch_once() {
    let mock = cluster();
    let mut config = kafka(&mock.bootstrap_servers(), "eo-broker-down");
    config.batch_timeout_secs = 3;
    let mut sink = sink::start(&config).await.unwrap();
    sink.handle.commit(batch(1, "first")).await.unwrap();
    // The only broker goes down before a batch is sent (its transaction begins, its records
    // cannot leave) and comes back after 2 s, then after 5 s – longer than a batch may take.
    // The poller's contract: a batch is applied to state only on Ok and sent again on a
    // retriable error; on a fatal one the process exits and its restart sends it again.
    // Which of these happens depends on timing; in every case a batch is reported committed
    // once.
    let mut reported = 1;
    let mut outcomes = Vec::new();
    for (tag, down) in [("second", 2), ("third", 5)] {
        mock.broker_down(1).unwrap();
        let handle = sink.handle.clone();
        let attempt = tokio::spawn(async move { handle.commit(batch(2, tag)).await });
        tokio::time::sleep(Duration::from_secs(down)).await;
        mock.broker_up(1).unwrap();
        let mut outcome = attempt.await.unwrap();
        for _ in 0..10 {
            match &outcome {
                Ok(()) => {
                    reported += 1;
                    outcomes.push(format!("{tag}: committed"));
                    break;
                }
                Err(SinkError::Fatal(e)) => {
                    // Shorter than a batch may take, an outage is waited out: an abort that
                    // times out is called again, not given up.
                    assert!(down > 3, "a {down} s outage was fatal: {e}");
                    assert_eq!(
                        sink.handle.stats().batches.load(Ordering::Relaxed),
                        reported
                    );
                    outcomes.push(format!("{tag}: fatal ({e}), restarted"));
                    sink = sink::start(&config).await.unwrap();
                    reported = 0;
                }
                Err(e) => outcomes.push(format!("{tag}: failed ({e}), sent again")),
            }
            outcome = sink.handle.commit(batch(2, tag)).await;
        }
        assert!(outcome.is_ok(), "{tag} never committed: {outcomes:?}");
        assert_eq!(
            sink.handle.stats().batches.load(Ordering::Relaxed),
            reported,
            "a batch reported committed twice: {outcomes:?}"
        );
    }
    eprintln!("broker down mid-transaction: {outcomes:?}");
    // Read back: every batch reported committed is in the topics, whole, events and state
    // (nothing lost), and the log ends with the last committed attempt. The mock's
    // read_committed consumers also show records of aborted transactions, so the copies of
    // a batch sent again cannot be told from duplicates: no-duplicates needs a real broker.
    let keys = read_to_end(&mock.bootstrap_servers(), "crm.leads");
    for key in ["first-0", "second-0", "second-1", "third-0", "third-1"] {
        assert!(keys.iter().any(|k| k == key), "{key} lost: {keys:?}");
    }
    assert_eq!(
        keys.iter().filter(|k| *k == "first-0").count(),
        1,
        "{keys:?}"
    );
    assert!(
        keys.ends_with(&["third-0".to_owned(), "third-1".to_owned()]),
        "{keys:?}"
    );
    let state = read_to_end(&mock.bootstrap_servers(), "crm._ibstream_state");
    for key in ["cursor/first", "cursor/second", "cursor/third"] {
        assert!(state.iter().any(|k| k == key), "{key} lost: {state:?}");
    }
    drop(sink.handle);
    sink.task.await.unwrap().unwrap();
}

/// A principal allowed only the instance's own transactional id (an ACL on the literal
/// `kafka.instance_id`): the probe's id, `<instance_id>-probe`, is denied, and so is its
/// group. `run` starts anyway, the start-up barrier testing transactions as before the
/// probe existed; the warning names the ACL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_denied_by_an_acl_falls_back_to_the_barrier() {
    for (api, error) in [
        (
            RDKafkaApiKey::InitProducerId,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        ),
        (
            RDKafkaApiKey::TxnOffsetCommit,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED,
        ),
    ] {
        let mock = cluster();
        let config = kafka(&mock.bootstrap_servers(), "eo-acl");
        let sink = sink::start(&config).await.unwrap();
        // The instance's producer is initialised: the next such request is the probe's.
        mock.request_errors(api, &[error]);
        let state = ibstream::kafka::restore(
            &config,
            "crm._ibstream_state",
            &sink.handle,
            Duration::from_secs(10),
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("{error:?} on {api:?} refused the start: {e}"))
        .expect("not stopped");
        assert!(!state.holds_progress());
        // The barrier went through the instance's transactional producer.
        let keys = read_to_end(&mock.bootstrap_servers(), "crm._ibstream_state");
        assert_eq!(keys, vec!["barrier/eo-acl"], "{error:?}");
        drop(sink.handle);
        sink.task.await.unwrap().unwrap();
    }
}

/// `check` with the same ACLs: a warning naming the ACL its probe lacks, never advice to
/// give up exactly-once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_denied_its_probe_by_an_acl_names_the_acl_and_never_advises_at_least_once() {
    let mock = cluster();
    let full = ibstream::config::Config {
        kafka: kafka(&mock.bootstrap_servers(), "eo-check-acl"),
        ..ibstream::config::Config::load(None).unwrap()
    };
    mock.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED],
    );
    let lines = ibstream::check::kafka(&full).await;
    let transactions = lines
        .iter()
        .find(|l| l.what == "kafka transactions")
        .unwrap();
    let text = transactions.to_string();
    assert!(
        matches!(transactions.outcome, ibstream::check::Outcome::Warning(_)),
        "{text}"
    );
    assert!(
        text.contains("transactional id eo-check-acl-check"),
        "{text}"
    );
    assert!(!text.contains("at-least-once"), "{text}");
}
