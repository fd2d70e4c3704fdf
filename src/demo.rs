//! `ibstream demo`: the whole product in one process, nothing to install.
//!
//! It starts the simulator (with background changes), an in-process Kafka – rdkafka's
//! `MockCluster`, which has transactions, so the demo runs the default exactly-once mode –
//! and `ibstream run` with its operations endpoints; then it shows, per stream, the backfill
//! progress, events by operation, the last poll and the lag, and below them the latest events
//! **decoded back from the topics** by a consumer with the Avro schemas (proof the bytes are
//! real). `--kafka HOST:PORT` uses a real broker instead. On a terminal the view redraws every
//! second; otherwise a plain line per stream every 5 s. Ctrl-C (or `--for SECS`) stops it and
//! prints a summary.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Delivery};
use crate::events::Schemas;
use crate::ops::Registry;

const STREAMS: [&str; 5] = ["leads", "customers", "transactions", "servers", "positions"];

/// Options of the demo (its command line).
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// A real Kafka broker (`HOST:PORT`) instead of the in-process mock.
    #[arg(long)]
    pub kafka: Option<String>,
    /// Delivery mode: exactly-once (default) or at-least-once (for brokers without
    /// transactions).
    #[arg(long, default_value = "exactly-once")]
    pub delivery: String,
    /// Stop after SECS seconds and print a summary (for scripts and tests).
    #[arg(long = "for")]
    pub for_secs: Option<u64>,
    /// Leads the simulator generates.
    #[arg(long, default_value_t = 2000)]
    pub leads: usize,
    /// Customers.
    #[arg(long, default_value_t = 800)]
    pub customers: usize,
    /// Transactions.
    #[arg(long, default_value_t = 5000)]
    pub transactions: usize,
    /// Closed positions.
    #[arg(long, default_value_t = 10000)]
    pub positions: usize,
    /// Background changes per second in the simulated CRM.
    #[arg(long, default_value_t = 5.0)]
    pub change_rate: f64,
    /// Address of the operations endpoints (/metrics, /status, /health/*).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub http_listen: String,
}

/// One event read back from a topic.
#[derive(Debug, Clone)]
struct Seen {
    stream: &'static str,
    key: String,
    op: String,
    summary: String,
}

/// What the consumer read back, shared with the view.
#[derive(Debug, Default)]
struct Consumed {
    counts: BTreeMap<(&'static str, String), u64>,
    latest: VecDeque<Seen>,
    undecodable: u64,
}

/// Runs the demo until Ctrl-C or `--for`; returns the summary printed at the end.
pub async fn run(args: DemoArgs, cancel: CancellationToken) -> anyhow::Result<String> {
    let delivery = match args.delivery.as_str() {
        "exactly-once" => Delivery::ExactlyOnce,
        "at-least-once" => Delivery::AtLeastOnce,
        other => anyhow::bail!("--delivery must be exactly-once or at-least-once, not {other:?}"),
    };
    let start_date = Utc::now().date_naive() - chrono::Duration::days(120);
    let sim = crate::sim::start(crate::sim::SimConfig {
        listen: "127.0.0.1:0".parse()?,
        start_date,
        leads: args.leads,
        customers: args.customers,
        transactions: args.transactions,
        positions: args.positions,
        change_rate: args.change_rate,
        ..crate::sim::SimConfig::default()
    })
    .await
    .map_err(anyhow::Error::msg)?;
    let mut config = Config::load(None)?;
    config.crm.base_url = sim.base_url();
    config.crm.email = "ib@example.com".to_owned();
    config.crm.password = Some("ib-secret".to_owned().into());
    config.crm.api_key = Some("sim-api-key".to_owned().into());
    config.crm.domain = "sim.example.com".to_owned();
    config.crm.requests_per_second = 200;
    config.kafka.delivery = delivery;
    config.kafka.instance_id = "demo".to_owned();
    config.kafka.replication_factor = 1;
    config.kafka.topic_partitions = 1;
    config.http.listen = args.http_listen.clone();
    config.streams.start_date = start_date;
    for stream in [
        &mut config.streams.leads,
        &mut config.streams.customers,
        &mut config.streams.transactions,
        &mut config.streams.positions,
    ] {
        stream.poll_interval_secs = 2;
    }
    config.streams.servers.poll_interval_secs = 10;
    let mock = match &args.kafka {
        Some(bootstrap) => {
            config.kafka.bootstrap_servers = bootstrap.clone();
            None
        }
        None => {
            let mock = rdkafka::mocking::MockCluster::new(1)
                .map_err(|e| anyhow::anyhow!("cannot start the in-process Kafka: {e}"))?;
            // The mock has no CreateTopics: the topics are made here, and `run` finds them.
            let topics = STREAMS
                .iter()
                .chain(&["dlq"])
                .map(|s| config.topics.data_topic(s))
                .chain([config.kafka.state_topic(&config.topics)]);
            for topic in topics {
                mock.create_topic(&topic, 1, 1)
                    .map_err(|e| anyhow::anyhow!("cannot create {topic}: {e}"))?;
            }
            config.kafka.bootstrap_servers = mock.bootstrap_servers();
            Some(mock)
        }
    };
    let bootstrap = config.kafka.bootstrap_servers.clone();
    println!("ibstream demo");
    println!(
        "  simulated CRM      {} (ib@example.com / ib-secret)",
        sim.base_url()
    );
    match &mock {
        Some(_) => {
            println!("  Kafka (in-process) {bootstrap}   e.g. kcat -b {bootstrap} -C -t crm.leads")
        }
        None => println!("  Kafka              {bootstrap}"),
    }
    println!(
        "  operations         http://{}/metrics  /status  /health/ready",
        args.http_listen
    );
    println!("  delivery           {}", args.delivery);
    println!();

    let stats: crate::ops::Stats = STREAMS.iter().map(|s| (*s, Arc::default())).collect();
    let run_cancel = cancel.child_token();
    let options = crate::run::RunOptions {
        skip_state_topic_config: mock.is_some(),
        ..Default::default()
    };
    let slot = options.registry.clone();
    let runner = {
        let (config, run_cancel, stats) = (config.clone(), run_cancel.clone(), stats.clone());
        tokio::spawn(async move { crate::run::run_with(config, run_cancel, stats, &options).await })
    };
    let consumed = Arc::new(Mutex::new(Consumed::default()));
    let reader = {
        let (consumed, stop) = (consumed.clone(), cancel.child_token());
        let topics: Vec<String> = STREAMS
            .iter()
            .map(|s| config.topics.data_topic(s))
            .collect();
        let bootstrap = bootstrap.clone();
        std::thread::spawn(move || read_back(&bootstrap, &topics, &consumed, &stop))
    };

    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let deadline = args.for_secs.map(|s| started + Duration::from_secs(s));
    let mut last_line = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if runner.is_finished() {
            break;
        }
        if tty {
            let registry = slot.get().map(Arc::as_ref);
            print!(
                "\x1b[2J\x1b[H{}",
                view(registry, &stats, &consumed, started)
            );
        } else if last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            for line in plain_lines(&stats, &consumed) {
                println!("{line}");
            }
        }
    }
    cancel.cancel();
    let outcome = runner.await?;
    let _ = reader.join();
    sim.shutdown().await;
    drop(mock);
    outcome.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(summary(&stats, &consumed, started))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads every data topic from the beginning (read_committed) and decodes each event.
fn read_back(
    bootstrap: &str,
    topics: &[String],
    consumed: &Mutex<Consumed>,
    stop: &CancellationToken,
) {
    let Ok(schemas) = Schemas::load("com.ibstream") else {
        return;
    };
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "ibstream-demo-view")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(consumer) => consumer,
        Err(_) => return,
    };
    let mut assigned = false;
    while !stop.is_cancelled() {
        if !assigned {
            let mut tpl = TopicPartitionList::new();
            for topic in topics {
                let _ = tpl.add_partition_offset(topic, 0, Offset::Beginning);
            }
            assigned = consumer.assign(&tpl).is_ok();
            if !assigned {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        }
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let stream = STREAMS
            .into_iter()
            .find(|s| message.topic().ends_with(&format!(".{s}")))
            .unwrap_or("leads");
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let mut consumed = lock(consumed);
        match message.payload().and_then(|p| decode(&schemas, p)) {
            Some((op, summary)) => {
                *consumed.counts.entry((stream, op.clone())).or_default() += 1;
                consumed.latest.push_front(Seen {
                    stream,
                    key,
                    op,
                    summary,
                });
                consumed.latest.truncate(8);
            }
            None => consumed.undecodable += 1,
        }
    }
}

/// Decodes a single-object-encoded event; returns its op and a one-line summary.
fn decode(schemas: &Schemas, payload: &[u8]) -> Option<(String, String)> {
    if payload.len() < 10 || payload[..2] != [0xC3, 0x01] {
        return None;
    }
    let schema = schemas
        .all()
        .iter()
        .find(|s| s.fingerprint[..] == payload[2..10])?;
    let value = apache_avro::from_avro_datum(&schema.schema, &mut &payload[10..], None).ok()?;
    let Avro::Record(fields) = value else {
        return None;
    };
    let op = fields
        .iter()
        .find(|(n, _)| n == "meta")
        .and_then(|(_, meta)| match meta {
            Avro::Record(meta) => meta
                .iter()
                .find(|(n, _)| n == "op")
                .map(|(_, op)| match op {
                    Avro::Enum(_, symbol) => symbol.clone(),
                    other => format!("{other:?}"),
                }),
            _ => None,
        })?;
    let shown: Vec<String> = fields
        .iter()
        .filter(|(n, _)| n != "meta" && n != "extra")
        .filter_map(|(name, value)| text(value).map(|t| format!("{name}={t}")))
        .take(4)
        .collect();
    Some((op, shown.join(" ")))
}

/// Returns a short text of a set field (`None` for null).
fn text(value: &Avro) -> Option<String> {
    match value {
        Avro::Union(_, inner) => text(inner),
        Avro::Null => None,
        Avro::String(s) | Avro::Enum(_, s) => Some(s.clone()),
        Avro::Long(n) => Some(n.to_string()),
        Avro::Int(n) => Some(n.to_string()),
        Avro::Boolean(b) => Some(b.to_string()),
        Avro::TimestampMillis(ms) => chrono::DateTime::from_timestamp_millis(*ms)
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string()),
        Avro::Decimal(d) => {
            let bytes = Vec::<u8>::try_from(d).ok()?;
            let mut wide = [if bytes.first().is_some_and(|b| b & 0x80 != 0) {
                0xFF
            } else {
                0
            }; 16];
            let n = bytes.len().min(16);
            wide[16 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
            Some(
                rust_decimal::Decimal::from_i128_with_scale(i128::from_be_bytes(wide), 8)
                    .normalize()
                    .to_string(),
            )
        }
        _ => None,
    }
}

fn counts(consumed: &Mutex<Consumed>, stream: &str) -> (u64, u64) {
    let consumed = lock(consumed);
    let get = |op: &str| {
        consumed
            .counts
            .get(&(
                STREAMS
                    .into_iter()
                    .find(|s| *s == stream)
                    .unwrap_or("leads"),
                op.to_owned(),
            ))
            .copied()
            .unwrap_or(0)
    };
    (get("CREATED"), get("UPDATED"))
}

fn view(
    registry: Option<&Registry>,
    stats: &crate::ops::Stats,
    consumed: &Mutex<Consumed>,
    started: Instant,
) -> String {
    use std::sync::atomic::Ordering;
    let mut out = format!(
        "ibstream demo – {} s – Ctrl-C stops\n\n{:<14} {:>9} {:>9} {:>9} {:>10} {:>9}\n",
        started.elapsed().as_secs(),
        "stream",
        "backfill",
        "created",
        "updated",
        "last poll",
        "lag"
    );
    let pollers = registry.map(Registry::pollers).unwrap_or_default();
    let today = Utc::now().date_naive();
    for stream in STREAMS {
        let mine: Vec<_> = pollers.values().filter(|p| p.stream == stream).collect();
        let progress = mine.iter().map(|p| p.progress(today)).fold(1.0, f64::min);
        let lag = mine
            .iter()
            .filter_map(|p| p.lag_seconds(Utc::now()))
            .fold(0.0, f64::max);
        let last = mine.iter().filter_map(|p| p.last_success).max();
        let s = &stats[stream];
        out.push_str(&format!(
            "{:<14} {:>8.0}% {:>9} {:>9} {:>10} {:>8.0}s\n",
            stream,
            if mine.is_empty() {
                0.0
            } else {
                progress * 100.0
            },
            s.created.load(Ordering::Relaxed),
            s.updated.load(Ordering::Relaxed),
            last.map_or("-".to_owned(), |t| format!(
                "{}s ago",
                (Utc::now() - t).num_seconds()
            )),
            lag,
        ));
    }
    out.push_str("\nlatest events, decoded back from Kafka:\n");
    for seen in &lock(consumed).latest {
        out.push_str(&format!(
            "  {:<13} {:<8} {:<22} {}\n",
            seen.stream, seen.op, seen.key, seen.summary
        ));
    }
    out
}

fn plain_lines(stats: &crate::ops::Stats, consumed: &Mutex<Consumed>) -> Vec<String> {
    use std::sync::atomic::Ordering;
    STREAMS
        .iter()
        .map(|stream| {
            let (created, updated) = counts(consumed, stream);
            format!(
                "{stream}: emitted {} created, {} updated; read back from Kafka {created} created, {updated} updated",
                stats[stream].created.load(Ordering::Relaxed),
                stats[stream].updated.load(Ordering::Relaxed),
            )
        })
        .collect()
}

fn summary(stats: &crate::ops::Stats, consumed: &Mutex<Consumed>, started: Instant) -> String {
    let mut out = format!("\nsummary after {} s\n", started.elapsed().as_secs());
    for line in plain_lines(stats, consumed) {
        out.push_str(&format!("  {line}\n"));
    }
    let consumed = lock(consumed);
    out.push_str(&format!(
        "  events that did not decode: {}\n",
        consumed.undecodable
    ));
    out.push_str("latest events, decoded back from Kafka:\n");
    for seen in consumed.latest.iter().take(5) {
        out.push_str(&format!(
            "  {:<13} {:<8} {:<22} {}\n",
            seen.stream, seen.op, seen.key, seen.summary
        ));
    }
    out
}
