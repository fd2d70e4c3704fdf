//! The sink alone on rdkafka's in-process MockCluster (`cargo bench --bench sink`):
//! exactly-once (one transaction per batch) against at-least-once (idempotent producer,
//! batches of different pollers produced concurrently), same batches, same mock.
//!
//! A batch is what a poller sends for one page: 1,000 events of ~330 bytes and one state
//! record (a fingerprint segment of 21 KB). Five pollers send batches at once, as the
//! benchmark's backfill does. Under `cargo test` it runs a few batches as a smoke test.

use std::time::Instant;

use ibstream::config::{Delivery, KafkaConfig};
use ibstream::kafka::sink;
use ibstream::kafka::{Batch, OutRecord};
use rdkafka::mocking::MockCluster;

const POLLERS: usize = 5;

fn batch(poller: usize, n: usize, events: usize) -> Batch {
    Batch {
        events: (0..events)
            .map(|i| OutRecord {
                topic: format!("crm.stream{poller}"),
                key: format!("{n}-{i}").into_bytes(),
                payload: Some(vec![b'x'; 330]),
            })
            .collect(),
        state: vec![OutRecord {
            topic: "crm._ibstream_state".to_owned(),
            key: format!("fps/{n}/stream{poller}").into_bytes(),
            payload: Some(vec![b'f'; 1 + events * 21]),
        }],
    }
}

/// Returns records per second through the sink in `delivery` mode.
async fn run(delivery: Delivery, batches: usize, events: usize) -> f64 {
    let mock = MockCluster::new(1).expect("mock cluster");
    for poller in 0..POLLERS {
        mock.create_topic(&format!("crm.stream{poller}"), 3, 1)
            .expect("topic");
    }
    mock.create_topic("crm._ibstream_state", 1, 1)
        .expect("topic");
    let config = KafkaConfig {
        bootstrap_servers: mock.bootstrap_servers(),
        delivery,
        instance_id: format!("bench-{delivery:?}"),
        batch_timeout_secs: 60,
        ..KafkaConfig::default()
    };
    let sink = sink::start(&config).await.expect("sink");
    let started = Instant::now();
    let mut pollers = tokio::task::JoinSet::new();
    for poller in 0..POLLERS {
        let handle = sink.handle.clone();
        pollers.spawn(async move {
            for n in 0..batches {
                handle
                    .commit(batch(poller, n, events))
                    .await
                    .expect("batch committed");
            }
        });
    }
    while let Some(done) = pollers.join_next().await {
        done.expect("poller");
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(sink.handle);
    sink.task.await.expect("sink task").expect("flush");
    (POLLERS * batches * events) as f64 / elapsed
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (batches, events) = if full { (100, 1_000) } else { (3, 100) };
    let mut figures = Vec::new();
    for round in 0..3 {
        let eo = run(Delivery::ExactlyOnce, batches, events).await;
        let alo = run(Delivery::AtLeastOnce, batches, events).await;
        println!(
            "sink on the MockCluster, run {}: exactly-once {eo:.0} records/s, at-least-once {alo:.0} records/s ({:.2}x)",
            round + 1,
            alo / eo
        );
        figures.push(alo / eo);
        if !full {
            break;
        }
    }
    figures.sort_by(f64::total_cmp);
    println!(
        "at-least-once / exactly-once throughput: median {:.2}x (target: exactly-once within 2x)",
        figures[figures.len() / 2]
    );
}
