//! Pipeline figures, measured in one run (`cargo bench --bench pipeline`):
//!
//! 1. end-to-end backfill from the simulator into the broker (at-least-once):
//!    records per second (target ≥ 50k/s on the 2-core development machine);
//! 2. restoring 1M fingerprints from the state topic (target ≤ 5 s);
//! 3. resident memory per tracked entity at 1M entities (target ≤ 100 bytes).
//!
//! Needs the `tansu` binary, or with `BENCH_BROKER=apache` Apache Kafka in target/kafka/libs
//! (./scripts/test.sh installs both). Run by `cargo test
//! --all-targets` (without `--bench`), it does the same at a small scale, as a smoke test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ibstream::config::{Config, Delivery};
use ibstream::kafka::{ensure_topics, restore, TopicSpec};
use ibstream::run::Stats;
use ibstream::stream::state::{EntityKey, FpEntry, FpMap};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The same as the binary's hook (`main.rs`).
fn release_free_memory() {
    // SAFETY: mi_collect only walks mimalloc's own free lists.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

const STREAMS: [&str; 5] = ["leads", "customers", "transactions", "servers", "positions"];

struct Scale {
    leads: usize,
    customers: usize,
    transactions: usize,
    positions: usize,
    fingerprints: usize,
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full {
        Scale {
            leads: 20_000,
            customers: 8_000,
            transactions: 50_000,
            positions: 100_000,
            // BENCH_FINGERPRINTS=5000000 for the 5M figures.
            fingerprints: std::env::var("BENCH_FINGERPRINTS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1_000_000),
        }
    } else {
        Scale {
            leads: 500,
            customers: 200,
            transactions: 500,
            positions: 1_000,
            fingerprints: 10_000,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        memory(&scale);
        // BENCH_BROKER=apache: Apache Kafka (target/kafka/libs) instead of tansu.
        let (_tansu, _apache, bootstrap) = match std::env::var("BENCH_BROKER").as_deref() {
            Ok("apache") => {
                let broker = common::ApacheKafka::start();
                let bootstrap = broker.bootstrap.clone();
                (None, Some(broker), bootstrap)
            }
            Ok("tansu") | Err(_) => {
                let broker = common::Tansu::start();
                let bootstrap = broker.bootstrap.clone();
                (Some(broker), None, bootstrap)
            }
            Ok(other) => panic!("BENCH_BROKER is {other:?}; tansu or apache"),
        };
        println!(
            "broker: {}",
            std::env::var("BENCH_BROKER").unwrap_or_else(|_| "tansu".into())
        );
        backfill(&bootstrap, &scale).await;
        restore_bench(&bootstrap, &scale).await;
    });
}

/// Resident memory of a fingerprint map, per entity.
fn memory(scale: &Scale) {
    let before = rss_bytes();
    let mut map = FpMap::default();
    for i in 0..scale.fingerprints as u64 {
        let id = (9_000_000 + i).to_string();
        map.insert(
            EntityKey::of(&id),
            FpEntry {
                fp: i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                day: 19_000,
            },
            &id,
        );
    }
    // What `ibstream run` does after its restore: return the tables outgrown while filling.
    release_free_memory();
    let after = rss_bytes();
    let per_entity = (after.saturating_sub(before)) as f64 / scale.fingerprints as f64;
    println!(
        "memory: {} entities tracked, {per_entity:.1} bytes of RSS per entity (target <= 100)",
        map.len()
    );
}

async fn backfill(bootstrap: &str, scale: &Scale) {
    let sim = common::start_sim(|c| {
        c.leads = scale.leads;
        c.customers = scale.customers;
        c.transactions = scale.transactions;
        c.positions = scale.positions;
        c.servers = 3;
    })
    .await;
    let mut config = Config::load(None).expect("config");
    config.crm = common::crm_config(&sim);
    config.kafka.bootstrap_servers = bootstrap.to_owned();
    config.kafka.delivery = Delivery::AtLeastOnce;
    config.kafka.replication_factor = 1;
    config.topics.prefix = common::unique_topic("bench");
    config.http.listen = "127.0.0.1:0".to_owned();
    config.streams.start_date = chrono::NaiveDate::from_ymd_opt(2024, 1, 1).expect("date");
    let stats: Stats = STREAMS.into_iter().map(|s| (s, Arc::default())).collect();
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(ibstream::run::run(config, cancel.clone(), stats.clone()));
    let done = |stats: &Stats| {
        STREAMS.iter().all(|s| {
            stats[s].cycles.load(Ordering::Relaxed) >= if *s == "positions" { 3 } else { 1 }
        })
    };
    while !done(&stats) {
        assert!(!task.is_finished(), "run ended early");
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "backfill did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let records: u64 = stats
        .values()
        .map(|s| s.created.load(Ordering::Relaxed))
        .sum();
    // Append-only streams keep fingerprints for the reconciliation sweep's horizon (30 days)
    // too: how many stay tracked after the backfill, against how many were emitted.
    for stream in ["transactions", "positions"] {
        println!(
            "tracked after backfill: {stream}: {} of {} emitted (30-day sweep horizon)",
            stats[stream].tracked.load(Ordering::Relaxed),
            stats[stream].created.load(Ordering::Relaxed)
        );
    }
    cancel.cancel();
    task.await.expect("task").expect("run");
    let requests = sim.stats().requests.load(Ordering::Relaxed);
    println!(
        "backfill: {records} records in {:.2} s = {:.0} records/s end to end (simulator → broker, at-least-once, {requests} CRM requests; target >= 50000/s)",
        elapsed.as_secs_f64(),
        records as f64 / elapsed.as_secs_f64()
    );
    sim.shutdown().await;
}

/// Restores `scale.fingerprints` fingerprints from a state topic, written as `ibstream run`
/// writes them (segments of a page, 1,000 entities each), then as releases before segments
/// wrote them (one record per entity), and prints both.
async fn restore_bench(bootstrap: &str, scale: &Scale) {
    let n = scale.fingerprints as u64;
    let mut map = FpMap::default();
    let mut segments = Vec::new();
    for page in 0..n.div_ceil(1_000) {
        let changes: Vec<_> = (page * 1_000..((page + 1) * 1_000).min(n))
            .map(|i| {
                let entry = FpEntry { fp: i, day: 19_000 };
                (EntityKey::of(&(9_000_000 + i).to_string()), entry, None)
            })
            .collect();
        let (records, plan) = map.plan_write("transactions", &changes);
        map.apply(plan);
        segments.extend(records.into_iter().map(|(k, v)| (k, v.expect("a segment"))));
    }
    restore_from(bootstrap, scale, "segments", segments).await;
    let per_entity = (0..n).map(|i| {
        let key = FpEntry::key("transactions", &(9_000_000 + i).to_string());
        (key, FpEntry { fp: i, day: 19_000 }.encode())
    });
    restore_from(bootstrap, scale, "per-entity records", per_entity.collect()).await;
}

async fn restore_from(
    bootstrap: &str,
    scale: &Scale,
    format: &str,
    records: Vec<(String, Vec<u8>)>,
) {
    let mut config = Config::load(None).expect("config");
    config.kafka.bootstrap_servers = bootstrap.to_owned();
    config.kafka.delivery = Delivery::AtLeastOnce;
    config.kafka.instance_id = "restore-bench".to_owned();
    let topic = common::unique_topic("state");
    ensure_topics(
        &config.kafka,
        &[TopicSpec {
            name: topic.clone(),
            partitions: 1,
            replication: 1,
            configs: vec![("cleanup.policy".into(), "compact".into())],
        }],
    )
    .await
    .expect("state topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let written = Instant::now();
    let mut pending = Vec::with_capacity(records.len());
    for (key, value) in &records {
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(key).payload(value)) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err(_) => producer.poll(Duration::from_millis(5)),
            }
        }
    }
    for f in pending {
        f.await.expect("delivery").expect("delivered");
    }
    let _ = producer.flush(Duration::from_secs(30));
    let write_secs = written.elapsed().as_secs_f64();
    // For comparison: the same records read by a consumer with librdkafka's defaults.
    let raw = {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::{Offset, TopicPartitionList};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "raw")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .expect("partition");
        consumer.assign(&tpl).expect("assign");
        let started = Instant::now();
        let mut n = 0;
        while n < records.len() {
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                n += 1;
            }
            assert!(started.elapsed() < Duration::from_secs(120));
        }
        started.elapsed().as_secs_f64()
    };
    let sink = ibstream::kafka::sink::start(&config.kafka)
        .await
        .expect("sink");
    let before = rss_bytes();
    let started = Instant::now();
    let state = restore(
        &config.kafka,
        &topic,
        &sink.handle,
        Duration::from_secs(60),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("restore")
    .expect("not stopped");
    let elapsed = started.elapsed();
    let grown = rss_bytes().saturating_sub(before);
    let entities = state.entities();
    assert_eq!(entities, scale.fingerprints);
    println!(
        "restore ({format}): {entities} fingerprints in {} records read from the state topic in {:.2} s (target <= 5 s; a consumer with librdkafka's defaults reads the records in {raw:.2} s; writing them took {write_secs:.2} s); RSS grew {:.1} bytes per entity",
        records.len(),
        elapsed.as_secs_f64(),
        grown as f64 / entities as f64
    );
    drop(sink.handle);
    let _ = sink.task.await;
}
