//! ibstream against the Apache Kafka broker users run (the version of `tests/kafka/pom.xml`,
//! fetched by `./scripts/test.sh`): transactions, fencing and broker faults that neither tansu
//! (no transactions) nor rdkafka's MockCluster (its read_committed consumers see aborted
//! records) can show.

mod common;

use common::ApacheKafka;

#[tokio::test]
async fn check_passes_its_transactions_line_on_apache_kafka() {
    let broker = ApacheKafka::start();
    let mut config = ibstream::config::Config::load(None).unwrap();
    config.kafka.bootstrap_servers = broker.bootstrap.clone();
    config.topics.prefix = common::unique_topic("chk");
    // exactly-once, the default.
    let lines = ibstream::check::kafka(&config).await;
    let transactions = lines
        .iter()
        .find(|l| l.what == "kafka transactions")
        .unwrap_or_else(|| panic!("no transactions line in {lines:?}"));
    assert!(transactions.is_ok(), "{transactions}");
    assert!(
        lines
            .iter()
            .any(|l| l.what.starts_with("kafka brokers (1)") && l.is_ok()),
        "{lines:?}"
    );
}
