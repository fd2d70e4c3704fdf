//! ibstream's Kafka checks against real brokers: Apache Kafka for what any broker must give
//! (the state topic's shape, an open transaction on it), tansu for what a broker without
//! transactions or TLS gives (and the tansu fixture itself).

mod common;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};

#[tokio::test]
async fn tansu_produces_and_consumes_one_message() {
    let broker = common::Tansu::start();
    let topic = common::unique_topic("fixture");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics call");
    for result in results {
        result.expect("topic created");
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let delivery = producer
        .send(
            FutureRecord::to(&topic)
                .key("lead-100231")
                .payload("hello from ibstream"),
            Duration::from_secs(10),
        )
        .await
        .expect("delivered");
    assert_eq!(delivery.partition, 0);

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", common::unique_topic("group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no message within 30 s; broker log: {}",
                broker.log.display()
            )
        })
        .expect("message");
    assert_eq!(message.key(), Some(&b"lead-100231"[..]));
    assert_eq!(message.payload(), Some(&b"hello from ibstream"[..]));
    assert_eq!(message.offset(), delivery.offset);
}

async fn create(broker: &impl common::Broker, topic: &str, partitions: i32, policy: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
                .set("cleanup.policy", policy)],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics call");
    for result in results {
        result.expect("topic created");
    }
}

#[tokio::test]
async fn a_state_topic_that_cannot_hold_the_state_is_refused_naming_the_fix() {
    let broker = common::ApacheKafka::shared();
    let config = ibstream::config::KafkaConfig {
        bootstrap_servers: broker.bootstrap.clone(),
        ..Default::default()
    };
    let good = common::unique_topic("state-ok");
    create(&broker, &good, 1, "compact").await;
    ibstream::kafka::check_state_topic(&config, &good)
        .await
        .expect("one compacted partition is right");

    let split = common::unique_topic("state-split");
    create(&broker, &split, 3, "compact").await;
    let err = ibstream::kafka::check_state_topic(&config, &split)
        .await
        .unwrap_err();
    assert!(
        err.contains(&split) && err.contains("3 partitions"),
        "{err}"
    );
    assert!(err.contains("kafka.state_topic"), "{err}");

    let deleting = common::unique_topic("state-delete");
    create(&broker, &deleting, 1, "delete").await;
    let err = ibstream::kafka::check_state_topic(&config, &deleting)
        .await
        .unwrap_err();
    assert!(
        err.contains(&deleting) && err.contains("cleanup.policy=delete"),
        "{err}"
    );
    assert!(err.contains("cleanup.policy=compact"), "{err}");
}

#[tokio::test]
async fn check_reports_the_broker_topics_and_transactions() {
    use ibstream::check::Outcome;
    // On tansu: the point is check's answer on a broker without transactions (Apache Kafka's
    // passing line is tests/apache_kafka.rs's).
    let broker = common::Tansu::start();
    let mut config = ibstream::config::Config::load(None).unwrap();
    config.kafka.bootstrap_servers = broker.bootstrap.clone();
    config.topics.prefix = common::unique_topic("chk");
    let state_topic = config.kafka.state_topic(&config.topics);
    create(&broker, &config.topics.data_topic("leads"), 3, "delete").await;
    create(&broker, &state_topic, 2, "compact").await;
    // exactly-once (the default): tansu has no transactions.
    let lines = ibstream::check::kafka(&config).await;
    let line = |prefix: &str| {
        lines
            .iter()
            .find(|l| l.what.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in {lines:?}"))
    };
    assert!(line("kafka brokers (1)").is_ok());
    assert_eq!(
        line(&format!("topic {}.leads", config.topics.prefix)).outcome,
        Outcome::Note("3 partitions".to_owned())
    );
    assert!(matches!(
        &line(&format!("topic {}.positions", config.topics.prefix)).outcome,
        Outcome::Note(m) if m.contains("creates it")
    ));
    let state = line(&format!("topic {state_topic}"));
    assert!(
        matches!(&state.outcome, Outcome::Error(m) if m.contains("2 partitions")),
        "{state}"
    );
    let transactions = line("kafka transactions");
    assert!(
        matches!(&transactions.outcome, Outcome::Error(m) if m.contains("at-least-once")),
        "{transactions}"
    );
    config.kafka.delivery = ibstream::config::Delivery::AtLeastOnce;
    let lines = ibstream::check::kafka(&config).await;
    let transactions = lines
        .iter()
        .find(|l| l.what == "kafka transactions")
        .unwrap();
    assert!(transactions.is_ok());
    // Says what was and was not checked, never "ok" for what it did not test.
    let shown = transactions.to_string();
    assert!(!shown.contains(" ok"), "{shown}");
    assert!(shown.contains("not checked: "), "{shown}");
    assert!(
        shown.contains("at-least-once") && shown.contains("checked: the brokers"),
        "{shown}"
    );
}

/// A TLS-terminating proxy on `at` in front of a plaintext port (tansu 0.6.0 cannot take
/// both `--cert` and `--key`); returns the address it listens on.
async fn tls_proxy_at(
    dir: &std::path::Path,
    at: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
) -> std::net::SocketAddr {
    let identity = native_tls::Identity::from_pkcs8(
        &std::fs::read(dir.join("server.pem")).unwrap(),
        &std::fs::read(dir.join("server.key")).unwrap(),
    )
    .unwrap();
    let acceptor: tokio_native_tls::TlsAcceptor =
        native_tls::TlsAcceptor::new(identity).unwrap().into();
    let listener = tokio::net::TcpListener::bind(at).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                if let Ok(mut broker) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_with_a_private_ca() {
    use ibstream::config::{KafkaSecurity, SecurityProtocol};
    let dir = tempfile::tempdir().unwrap();
    common::test_pki(dir.path());
    // Reserve the proxy's port first: the broker advertises it.
    let proxy_port = common::free_port();
    let proxy_addr: std::net::SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    // On tansu behind a TLS proxy (tansu cannot do TLS itself): the client side of TLS.
    // Apache Kafka's own SSL listeners are the security tests'.
    let broker = common::Tansu::start_advertising(Some(proxy_addr));
    let upstream: std::net::SocketAddr = broker.bootstrap.parse().unwrap();
    let bound = tls_proxy_at(dir.path(), proxy_addr, upstream).await;
    assert_eq!(bound, proxy_addr);
    let mut config = ibstream::config::Config::load(None).unwrap();
    config.kafka.bootstrap_servers = proxy_addr.to_string();
    config.kafka.delivery = ibstream::config::Delivery::AtLeastOnce;
    config.kafka.security = KafkaSecurity {
        protocol: SecurityProtocol::Ssl,
        ca_file: Some(dir.path().join("ca.pem")),
        ..KafkaSecurity::default()
    };
    config.kafka.validate().unwrap();
    let settings = config.kafka.client_settings().unwrap();
    assert!(settings.contains(&("security.protocol".to_owned(), "SSL".to_owned())));
    let lines = ibstream::check::kafka(&config).await;
    assert!(
        lines[0].what.starts_with("kafka brokers") && lines[0].is_ok(),
        "{lines:?}"
    );
    // Without the CA the broker's certificate is not trusted.
    config.kafka.security.ca_file = None;
    let lines = ibstream::check::kafka(&config).await;
    assert!(!lines[0].is_ok(), "{lines:?}");
}

/// A state topic with one record, as `run` makes it.
async fn state_topic_with_a_record(broker: &impl common::Broker, topic: &str) {
    create(broker, topic, 1, "compact").await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .expect("producer");
    let beat = ibstream::stream::state::Heartbeat {
        at: chrono::Utc::now(),
    };
    producer
        .send(
            FutureRecord::to(topic)
                .key("alive/x")
                .payload(&beat.encode()),
            Duration::from_secs(10),
        )
        .await
        .expect("delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_in_exactly_once_mode_leaves_the_state_topic_readable() {
    // On tansu: the point is check's transactions probe failing on a broker without
    // transactions, and leaving nothing open behind it.
    let broker = common::Tansu::start();
    let mut config = ibstream::config::Config::load(None).unwrap();
    config.kafka.bootstrap_servers = broker.bootstrap.clone();
    config.kafka.batch_timeout_secs = 10;
    config.topics.prefix = common::unique_topic("chk-eo");
    let state_topic = config.kafka.state_topic(&config.topics);
    state_topic_with_a_record(&broker, &state_topic).await;
    // exactly-once (the default) on a broker without transactions.
    let lines = ibstream::check::kafka(&config).await;
    let transactions = lines
        .iter()
        .find(|l| l.what == "kafka transactions")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(!transactions.is_ok(), "{transactions}");
    // The state topic is still read to its end, as `state show` and `run` read it.
    let started = std::time::Instant::now();
    let state = ibstream::kafka::read_state(&config.kafka, &state_topic, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("the state topic was left unreadable: {e}"));
    assert_eq!(state.heartbeats.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_facing_an_open_transaction_fails_in_time_naming_topic_offset_and_fix() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    // On Apache Kafka: a real open transaction holds read_committed readers at its first
    // offset (the last stable offset) until it ends or times out.
    let broker = common::ApacheKafka::shared();
    let topic = common::unique_topic("state-open-txn");
    state_topic_with_a_record(&broker, &topic).await;
    // Another producer begins a transaction on the state topic and never ends it.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("transactional.id", common::unique_topic("never-commits"))
        .create()
        .expect("producer");
    let open = tokio::task::spawn_blocking(move || {
        producer.init_transactions(Duration::from_secs(10))?;
        producer.begin_transaction()?;
        producer
            .send(BaseRecord::to(&topic).key("check/x").payload("open"))
            .map_err(|(e, _)| e)?;
        producer.flush(Duration::from_secs(10))?;
        Ok::<_, rdkafka::error::KafkaError>((producer, topic))
    })
    .await
    .unwrap();
    let (producer, topic) = open.expect("the broker takes a transaction's records");
    let config = ibstream::config::KafkaConfig {
        bootstrap_servers: broker.bootstrap.clone(),
        ..Default::default()
    };
    let timeout = Duration::from_secs(5);
    let started = std::time::Instant::now();
    let err = ibstream::kafka::read_state(&config, &topic, timeout)
        .await
        .expect_err("a restore cannot pass an open transaction");
    assert!(
        started.elapsed() < timeout * 3,
        "failed after {:?}",
        started.elapsed()
    );
    assert!(err.contains(&topic), "{err}");
    assert!(err.contains("offset 1"), "{err}");
    assert!(err.contains("open transaction"), "{err}");
    assert!(err.contains("kafka-transactions.sh"), "{err}");
    drop(producer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_topic_is_checked_right_after_ensure_topics_created_it() {
    // Apache Kafka answers CreateTopics before its metadata lists the topic, the later the
    // busier it is: a start that checks the state topic at once must not read "0 partitions"
    // of the topic it just made. Eight starts at a time, as a suite's runs do.
    let broker = common::ApacheKafka::shared();
    let config = ibstream::config::KafkaConfig {
        bootstrap_servers: broker.bootstrap.clone(),
        ..Default::default()
    };
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    let topic = common::unique_topic("fresh-state");
                    let spec = ibstream::kafka::TopicSpec {
                        name: topic.clone(),
                        partitions: 1,
                        replication: 1,
                        configs: vec![("cleanup.policy".to_owned(), "compact".to_owned())],
                    };
                    ibstream::kafka::ensure_topics(&config, &[spec]).await?;
                    ibstream::kafka::check_state_topic(&config, &topic).await?;
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    for start in starts {
        start.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    }
}
