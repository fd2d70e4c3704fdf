//! `ibstream verify` end to end: the simulator, a real Apache Kafka broker (one per test
//! process, shared: each test keeps to its own topics and instance id), `run` to fill the
//! topics, then `verify` against what the simulator's CRM holds.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use common::topics::{read_to_end, Consumed};
use common::ConfigFile;
use ibstream::config::{Config, Delivery};
use ibstream::run::Stats;
use ibstream::sim::{ChangeKind, Kind, SimHandle};
use ibstream::verify::{Report, StreamReport, VerifyError, VerifyRequest};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use rust_decimal::Decimal;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

const STREAMS: [&str; 5] = ["leads", "customers", "transactions", "servers", "positions"];

fn first_day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2024, 1, 1).unwrap()
}

fn today() -> NaiveDate {
    chrono::Utc::now().date_naive()
}

/// A run's configuration: every stream polled each second, the sweep every second over the
/// last 30 days (so a `run` after a change has swept before it is stopped).
fn config(sim: &SimHandle, bootstrap: &str, prefix: &str, delivery: Delivery) -> Config {
    let mut config = Config::load(None).unwrap();
    config.crm = common::crm_config(sim);
    config.kafka.bootstrap_servers = bootstrap.to_owned();
    config.kafka.delivery = delivery;
    config.kafka.instance_id = prefix.to_owned();
    config.kafka.replication_factor = 1;
    config.kafka.batch_timeout_secs = 30;
    config.topics.prefix = prefix.to_owned();
    config.http.listen = "127.0.0.1:0".to_owned();
    config.streams.start_date = first_day();
    config.streams.reconcile_days = 30;
    config.streams.reconcile_interval_secs = 1;
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

/// `run` in this process until stopped.
struct Running {
    cancel: CancellationToken,
    stats: Stats,
    task: tokio::task::JoinHandle<Result<ibstream::run::RunReport, ibstream::run::RunError>>,
}

impl Running {
    fn start(config: Config) -> Running {
        let stats: Stats = STREAMS.into_iter().map(|s| (s, Arc::default())).collect();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(ibstream::run::run(config, cancel.clone(), stats.clone()));
        Running {
            cancel,
            stats,
            task,
        }
    }

    /// Waits until every stream completed `cycles` cycles (positions: per live server tag)
    /// and, with `sweeps`, a reconciliation sweep of each cursor.
    async fn wait(&self, sim: &SimHandle, cycles: u64, sweeps: bool) {
        let tags = sim
            .truth(Kind::Servers)
            .iter()
            .filter(|s| s["type"] == "live")
            .count() as u64;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let done = STREAMS.iter().all(|s| {
                let stats = &self.stats[s];
                let per = if *s == "positions" { tags } else { 1 };
                let cursors = match *s {
                    "leads" | "customers" => 2,
                    "servers" => 0,
                    _ => per,
                };
                stats.cycles.load(Ordering::Relaxed) >= cycles * per
                    && (!sweeps || stats.reconcile_sweeps.load(Ordering::Relaxed) >= cursors)
            });
            if done {
                return;
            }
            assert!(!self.task.is_finished(), "ibstream run ended early");
            assert!(Instant::now() < deadline, "run did not get there in 120 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        let report = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("run stops within 15 s")
            .unwrap()
            .expect("run ends cleanly");
        assert!(report.stopped.is_empty(), "{:?}", report.stopped);
    }
}

/// The whole range; `repair` forced (the instance was stopped, but its last heartbeat stays
/// fresh for 90 s; the refusal is tested with the instance running).
fn request(repair: bool) -> VerifyRequest {
    VerifyRequest {
        from: first_day(),
        to: today(),
        streams: Vec::new(),
        server_tags: Vec::new(),
        repair,
        force: repair,
    }
}

async fn verify(config: &Config, repair: bool) -> Report {
    ibstream::verify::run(config.clone(), request(repair))
        .await
        .expect("verify runs")
}

fn stream<'a>(report: &'a Report, name: &str) -> &'a StreamReport {
    report
        .streams
        .iter()
        .find(|s| s.stream == name)
        .unwrap_or_else(|| panic!("no {name} in the report"))
}

fn keys(list: &[ibstream::verify::KeyDiff]) -> Vec<String> {
    list.iter().map(|k| k.key.clone()).collect()
}

/// Asserts every stream equal but for dead letters (which are never shown equal), with
/// every truth record compared.
fn assert_equal(report: &Report, sim: &SimHandle) {
    for name in STREAMS {
        let s = stream(report, name);
        assert!(
            s.missing.is_empty()
                && s.extra.is_empty()
                && s.different.is_empty()
                && s.incomplete_days.is_empty()
                && s.unreadable_events.is_empty(),
            "not equal: {}",
            ibstream::verify::report::text(report)
        );
        assert_eq!(s.is_equal(), s.dead_letters.is_empty(), "{name}");
        let kind = Kind::parse(name).unwrap();
        let truth = sim
            .truth(kind)
            .into_iter()
            .filter(|r| name != "transactions" || r["isFake"] == false)
            .count() as u64;
        assert_eq!(
            s.crm_records + s.dead_letters.len() as u64,
            truth,
            "{name}: every CRM record is compared or a dead letter"
        );
        let (crm, kafka) = ibstream::verify::report::range_totals(s);
        assert_eq!(crm, kafka, "{name}: totals side by side");
    }
}

/// A money field of a truth record, exact.
fn money(record: &Json, field: &str) -> Decimal {
    match &record[field] {
        Json::String(s) => s.parse().unwrap(),
        other => other.to_string().parse().unwrap(),
    }
}

fn truth_of(sim: &SimHandle, kind: Kind, key: &str) -> Json {
    sim.truth(kind)
        .into_iter()
        .find(|r| match kind {
            Kind::Positions => {
                format!("{}:{}", r["serverTag"].as_str().unwrap(), r["positionId"]) == key
            }
            _ => r["id"].as_i64().map(|id| id.to_string()).as_deref() == Some(key),
        })
        .unwrap_or_else(|| panic!("{key} not in the truth"))
}

/// Returns how many events each key of a topic holds (read_committed, to its end).
async fn events_per_key(bootstrap: &str, topic: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in read_all(bootstrap, topic).await {
        *counts.entry(event.key).or_default() += 1;
    }
    counts
}

/// After a backfill the topics equal the CRM, malformed records are dead letters; a
/// correction dated 40 days back (outside the 30-day sweep, which ran) is exactly one key
/// different per stream with the sums off by exactly the correction; a deleted record is
/// extra; `--repair` is refused while `run` runs, then mends the differences (one within the
/// sweep horizon too), after which `verify` is equal but for the deleted key and a `run`
/// with a sweep emits nothing for the repaired keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_what_the_sweep_cannot_and_repair_mends_it() {
    let started = Instant::now();
    let kafka = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        c.transactions = 300;
        c.positions = 300;
        c.malformed_rate = 0.03;
    })
    .await;
    sim.pause_changes(true);
    let prefix = common::unique_topic("verify");
    let config = config(&sim, &kafka.bootstrap, &prefix, Delivery::ExactlyOnce);
    let running = Running::start(config.clone());
    running.wait(&sim, 2, false).await;
    // The instance runs: a repair is refused before it reads anything.
    let unforced = VerifyRequest {
        force: false,
        ..request(true)
    };
    match ibstream::verify::run(config.clone(), unforced).await {
        Err(VerifyError::Failed(message)) => {
            assert!(message.contains("is running"), "{message}")
        }
        other => panic!("repair while the instance runs: {other:?}"),
    }
    running.stop().await;

    let report = verify(&config, false).await;
    assert_equal(&report, &sim);
    let dead: usize = report.streams.iter().map(|s| s.dead_letters.len()).sum();
    assert!(
        dead > 0,
        "the simulator's malformed records are dead letters"
    );
    assert!(report.streams.iter().all(|s| s.missing.is_empty()));
    // Records the payout engine cannot read are not shown equal.
    assert_eq!(ibstream::verify::exit_code(&report), 1);

    // A correction 40 days back: a transaction's amount and a position's profit, +1.00 each.
    let tx_before: HashMap<String, Json> = sim
        .truth(Kind::Transactions)
        .into_iter()
        .map(|r| (r["id"].to_string(), r))
        .collect();
    let old = sim.mutate(1, Some(ChangeKind::Correction { days: Some(40) }));
    let old_tx = old
        .iter()
        .find(|c| c.stream == "transactions")
        .unwrap()
        .key
        .clone();
    let old_pos = old
        .iter()
        .find(|c| c.stream == "positions")
        .unwrap()
        .key
        .clone();
    // `run` with its sweep of the last 30 days never sees it.
    let running = Running::start(config.clone());
    running.wait(&sim, 2, true).await;
    running.stop().await;
    // A correction 5 days back, made while nothing runs, and a deletion.
    let recent = sim.mutate(1, Some(ChangeKind::Correction { days: Some(5) }));
    let recent_tx = recent
        .iter()
        .find(|c| c.stream == "transactions")
        .unwrap()
        .key
        .clone();
    let deleted = sim.mutate(1, Some(ChangeKind::Delete { days: None }));
    let deleted = deleted[0].key.clone();

    let report = verify(&config, false).await;
    // The worked example of the README's "Verify before you pay".
    eprintln!("{}", ibstream::verify::report::text(&report));
    assert_eq!(ibstream::verify::exit_code(&report), 1);
    let tx = stream(&report, "transactions");
    let mut expected = vec![old_tx.clone(), recent_tx.clone()];
    expected.sort();
    let mut different = keys(&tx.different);
    different.sort();
    assert_eq!(
        different,
        expected,
        "{}",
        ibstream::verify::report::text(&report)
    );
    assert!(tx.different.iter().all(|d| d.detail.contains("amount")));
    assert_eq!(keys(&tx.extra), vec![deleted.clone()]);
    assert!(tx.missing.is_empty());
    let pos = stream(&report, "positions");
    assert_eq!(pos.different.len(), 2, "{:?}", pos.different);
    assert!(keys(&pos.different).contains(&old_pos));
    assert!(stream(&report, "leads").is_equal() && stream(&report, "customers").is_equal());
    // The sums of the corrected day differ by exactly the correction.
    let now = truth_of(&sim, Kind::Transactions, &old_tx);
    let correction = money(&now, "amountUsd") - money(&tx_before[&old_tx], "amountUsd");
    assert!(!correction.is_zero());
    let day = tx.different.iter().find(|d| d.key == old_tx).unwrap().day;
    let (crm, kafka_side) = &tx.days[&day];
    let name = format!("amountUsd[{}]", now["type"].as_str().unwrap());
    assert_eq!(crm.sums[&name] - kafka_side.sums[&name], correction);
    assert_eq!(crm.records, kafka_side.records);
    let pos_day = pos.different.iter().find(|d| d.key == old_pos).unwrap().day;
    let (crm, kafka_side) = &pos.days[&pos_day];
    let tag = old_pos.split(':').next().unwrap();
    let profit = format!("profit[{tag}]");
    assert_eq!(
        crm.sums[&profit] - kafka_side.sums[&profit],
        Decimal::new(100, 2)
    );

    // Repair, then verify: equal but for the deleted key, reported and never deleted.
    let repaired_positions = keys(&pos.different);
    let before = events_per_key(&kafka.bootstrap, &format!("{prefix}.transactions")).await;
    let before_pos = events_per_key(&kafka.bootstrap, &format!("{prefix}.positions")).await;
    let repaired = verify(&config, true).await;
    let done = repaired.repaired.clone().unwrap();
    assert_eq!((done.created, done.updated), (0, 4), "{done:?}");
    let report = verify(&config, false).await;
    let tx = stream(&report, "transactions");
    assert!(tx.different.is_empty() && tx.missing.is_empty());
    assert_eq!(keys(&tx.extra), vec![deleted.clone()]);
    let pos = stream(&report, "positions");
    assert!(pos.missing.is_empty() && pos.different.is_empty() && pos.extra.is_empty());
    let (crm, kafka_side) = ibstream::verify::report::range_totals(stream(&report, "positions"));
    assert_eq!(crm, kafka_side);
    // A run with a sweep over the last 30 days (which reads the recent correction) emits
    // nothing for the repaired keys: their fingerprints were written with the events.
    let running = Running::start(config.clone());
    running.wait(&sim, 2, true).await;
    let swept = running.stats["transactions"]
        .reconcile_sweeps
        .load(Ordering::Relaxed);
    running.stop().await;
    assert!(swept >= 1);
    let after = events_per_key(&kafka.bootstrap, &format!("{prefix}.transactions")).await;
    for key in [&old_tx, &recent_tx] {
        assert_eq!(
            after[key],
            before[key] + 1,
            "{key}: one repair event, and nothing from the run after it"
        );
    }
    let after_pos = events_per_key(&kafka.bootstrap, &format!("{prefix}.positions")).await;
    for key in &repaired_positions {
        assert_eq!(
            after_pos[key],
            before_pos[key] + 1,
            "{key}: one repair event, and nothing from the run after it"
        );
    }
    eprintln!(
        "verify_finds_what_the_sweep_cannot_and_repair_mends_it: {:?}",
        started.elapsed()
    );
}

/// At-least-once topics holding duplicates (every transaction and position event written
/// twice) are still equal; the binary exits 0 when equal, 1 when a record was deleted (the
/// CSV names it), 2 on a configuration error; JSON is one document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_duplicates_are_equal_and_the_exit_codes_say_so() {
    let started = Instant::now();
    let kafka = common::ApacheKafka::shared();
    let sim = common::start_sim(|_| {}).await;
    sim.pause_changes(true);
    let prefix = common::unique_topic("verify-alo");
    let config = config(&sim, &kafka.bootstrap, &prefix, Delivery::AtLeastOnce);
    let running = Running::start(config.clone());
    running.wait(&sim, 2, false).await;
    running.stop().await;
    // Duplicates, as a crash of at-least-once delivery leaves them: the same events again.
    let duplicated = duplicate(
        &kafka.bootstrap,
        &[
            format!("{prefix}.transactions"),
            format!("{prefix}.positions"),
        ],
    )
    .await;
    assert!(duplicated > 0);
    let counts = events_per_key(&kafka.bootstrap, &format!("{prefix}.transactions")).await;
    assert!(
        counts.values().all(|n| *n == 2),
        "every key twice: {counts:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = config_file(&dir, &sim, &kafka.bootstrap, &prefix, "at-least-once");
    let range = ["--from", "2024-01-01", "--to", &today().to_string()];
    let (code, out) = ibstream(&file, &[&range[..], &["--format", "json"]].concat()).await;
    assert_eq!(code, Some(0), "{out}");
    let json: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(json["equal"], true);
    let tx = json["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == "transactions")
        .unwrap();
    assert_eq!(
        tx["kafkaEvents"].as_u64().unwrap(),
        2 * tx["crmRecords"].as_u64().unwrap(),
        "the duplicates were read"
    );
    // At-least-once topics hold no transaction markers: the offsets read add up to the
    // events read.
    let offsets: u64 = tx["offsetsRead"]
        .as_object()
        .unwrap()
        .values()
        .map(|o| o.as_u64().unwrap())
        .sum();
    assert_eq!(offsets, tx["kafkaEvents"].as_u64().unwrap());

    // A record the topic holds that the CRM now serves unreadable: a dead letter, neither
    // extra nor missing.
    let unreadable = sim.mutate(1, Some(ChangeKind::Malform { days: None }))[0]
        .key
        .clone();
    let report = verify(&config, false).await;
    let tx = stream(&report, "transactions");
    assert_eq!(keys(&tx.dead_letters), vec![unreadable.clone()]);
    assert!(!keys(&tx.extra).contains(&unreadable), "{:?}", tx.extra);
    assert!(!keys(&tx.missing).contains(&unreadable));
    // Nothing else differs: the old event a payout engine pays on makes it not equal.
    assert!(tx.missing.is_empty() && tx.different.is_empty() && tx.extra.is_empty());
    assert!(!tx.is_equal());
    assert_eq!(ibstream::verify::exit_code(&report), 1);
    let text = ibstream::verify::report::text(&report);
    assert!(
        text.contains("transactions  DIFFERS")
            && text.contains(&format!("dead letter   {unreadable}"))
            && text.contains("holds an older event"),
        "{text}"
    );
    // A deposit: a new transaction (missing), and its customer's balance moves – volatile,
    // so the customer stays equal, or (a first deposit) differs by its `ftdDate` and
    // `lastModifiedDate`, never by the balance.
    let deposit = sim.mutate(1, Some(ChangeKind::Transaction));
    let new_tx = deposit
        .iter()
        .find(|c| c.stream == "transactions")
        .unwrap()
        .key
        .clone();
    let report = verify(&config, false).await;
    assert_eq!(keys(&stream(&report, "transactions").missing), vec![new_tx]);
    assert_eq!(
        keys(&stream(&report, "transactions").dead_letters),
        vec![unreadable.clone()]
    );
    let customers = stream(&report, "customers");
    match deposit.iter().find(|c| c.stream == "customers") {
        Some(first) => {
            assert_eq!(keys(&customers.different), vec![first.key.clone()]);
            let detail = &customers.different[0].detail;
            assert!(detail.contains("ftdDate"), "{detail}");
            assert!(
                !detail.contains("balanceUsd"),
                "a volatile field differs: {detail}"
            );
        }
        None => assert!(customers.is_equal(), "{:?}", customers.different),
    }
    // An event larger than Kafka accepts is a dead letter, as `run` makes it (never
    // different, so --repair never sends it): a lead gets 1.5 MB of notes.
    let bloated = sim.mutate(1, Some(ChangeKind::Bloat))[0].key.clone();
    let report = verify(&config, false).await;
    let leads = stream(&report, "leads");
    assert_eq!(keys(&leads.dead_letters), vec![bloated.clone()]);
    assert!(
        leads.dead_letters[0]
            .detail
            .contains("more than Kafka accepts"),
        "{:?}",
        leads.dead_letters
    );
    assert!(leads.different.is_empty(), "{:?}", leads.different);
    let deleted = sim.mutate(1, Some(ChangeKind::Delete { days: None }))[0]
        .key
        .clone();
    let (code, out) = ibstream(
        &file,
        &[&range[..], &["--format", "csv", "--stream", "transactions"]].concat(),
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("transactions,") && l.contains(&format!(",extra,{deleted},"))),
        "{out}"
    );
    assert!(out.lines().any(|l| l.contains(",missing,")), "{out}");
    let (code, text) = ibstream(&file, &[&range[..], &["--stream", "transactions"]].concat()).await;
    assert_eq!(code, Some(1));
    assert!(
        text.contains("DIFFERENCES FOUND") && text.contains(&deleted),
        "{text}"
    );
    // An event nothing can decode is unreadable: not equal, and never a repair candidate.
    let topic = format!("{prefix}.transactions");
    let skip = [&unreadable, &deleted];
    let garbage_key = read_all(&kafka.bootstrap, &topic)
        .await
        .into_iter()
        .map(|event| event.key)
        .find(|k| !skip.contains(&k))
        .unwrap();
    produce(
        &kafka.bootstrap,
        &topic,
        &garbage_key,
        &[0xC3, 0x01, 1, 2, 3],
    )
    .await;
    let only_tx = VerifyRequest {
        streams: vec!["transactions".to_owned()],
        ..request(false)
    };
    let report = ibstream::verify::run(config.clone(), only_tx)
        .await
        .unwrap();
    let tx = stream(&report, "transactions");
    assert_eq!(keys(&tx.unreadable_events), vec![garbage_key.clone()]);
    assert!(!keys(&tx.different).contains(&garbage_key));
    assert!(!tx.is_equal());
    let (code, out) = ibstream(&file, &[&range[..], &["--stream", "trades"]].concat()).await;
    assert_eq!(code, Some(2), "{out}");
    eprintln!(
        "at_least_once_duplicates_are_equal_and_the_exit_codes_say_so: {:?}",
        started.elapsed()
    );
}

/// Writes the configuration of the binary's runs to `dir` (the topics' prefix and the
/// instance id `prefix`) and returns its path.
fn config_file(
    dir: &tempfile::TempDir,
    sim: &SimHandle,
    bootstrap: &str,
    prefix: &str,
    delivery: &str,
) -> std::path::PathBuf {
    ConfigFile::new(&sim.base_url(), prefix, bootstrap)
        .set("kafka.delivery", delivery)
        .write(dir.path())
}

/// `--repair` reads the streams it sent events to again after its last batch committed,
/// compares them again and exits by that: 0 once a correction is mended (the report before
/// it still names what was repaired), 1 when a deleted record stays extra (reported, never
/// deleted) although the correction beside it was mended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_exits_by_the_comparison_made_again_after_it() {
    let started = Instant::now();
    let kafka = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        c.transactions = 100;
        c.positions = 100;
    })
    .await;
    sim.pause_changes(true);
    let prefix = common::unique_topic("verify-reverify");
    let config = config(&sim, &kafka.bootstrap, &prefix, Delivery::ExactlyOnce);
    let running = Running::start(config.clone());
    running.wait(&sim, 2, false).await;
    running.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(&dir, &sim, &kafka.bootstrap, &prefix, "exactly-once");
    let to = today().to_string();
    let range = ["--from", "2024-01-01", "--to", &to, "--repair", "--force"];
    let key_of = |changes: &[ibstream::sim::Change], stream: &str| {
        changes
            .iter()
            .find(|c| c.stream == stream)
            .unwrap_or_else(|| panic!("no {stream} change: {changes:?}"))
            .key
            .clone()
    };

    // A correction of a transaction and a position: both repaired, then equal.
    let corrected = sim.mutate(1, Some(ChangeKind::Correction { days: Some(5) }));
    let (tx, pos) = (
        key_of(&corrected, "transactions"),
        key_of(&corrected, "positions"),
    );
    let (code, text) = ibstream(&file, &range).await;
    eprintln!("{text}");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.starts_with(&format!(
            "ibstream verify 2024-01-01 .. {to}: DIFFERENCES FOUND"
        )) && text.contains(&format!("different     {tx} "))
            && text.contains(&format!("different     {pos} "))
            && text.contains("repaired: 2 events sent (0 CREATED, 2 UPDATED)")
            && text.contains(
                "re-verified after the repair: transactions, positions read and compared again"
            )
            && text.ends_with("after the repair: the topics equal the CRM\n"),
        "{text}"
    );

    // A deletion, then a correction: the correction is mended, the deleted key stays extra.
    let deleted = sim.mutate(1, Some(ChangeKind::Delete { days: None }));
    let deleted = key_of(&deleted, "transactions");
    let corrected = sim.mutate(1, Some(ChangeKind::Correction { days: Some(5) }));
    let tx = key_of(&corrected, "transactions");
    let (code, out) = ibstream(&file, &[&range[..], &["--format", "json"]].concat()).await;
    assert_eq!(code, Some(1), "{out}");
    let json: Json = serde_json::from_str(&out).unwrap();
    let transactions = |streams: &Json| {
        streams
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stream"] == "transactions")
            .unwrap()
            .clone()
    };
    let keys_of = |list: &Json| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|k| k["key"].as_str().unwrap().to_owned())
            .collect()
    };
    let before = transactions(&json["streams"]);
    assert_eq!(keys_of(&before["different"]), vec![tx.clone()], "{out}");
    assert_eq!(keys_of(&before["extra"]), vec![deleted.clone()]);
    assert_eq!(json["repaired"]["updated"], 2, "{out}");
    let after = &json["afterRepair"];
    assert_eq!(after["equal"], false, "{out}");
    assert_eq!(json["endsEqual"], false);
    assert_eq!(
        after["reverified"],
        serde_json::json!(["transactions", "positions"])
    );
    let tx_after = transactions(&after["streams"]);
    assert!(keys_of(&tx_after["different"]).is_empty(), "{out}");
    assert_eq!(keys_of(&tx_after["extra"]), vec![deleted.clone()]);
    let crm_records = before["crmRecords"].as_u64().unwrap();
    assert_eq!(tx_after["crmRecords"].as_u64().unwrap(), crm_records);

    // CSV: a verdict row per stream compared again, and the keys that still differ.
    let corrected = sim.mutate(1, Some(ChangeKind::Correction { days: Some(5) }));
    let tx = key_of(&corrected, "transactions");
    let (code, out) = ibstream(&file, &[&range[..], &["--format", "csv"]].concat()).await;
    assert_eq!(code, Some(1), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("transactions,") && l.contains(&format!(",different,{tx},"))),
        "{out}"
    );
    assert!(
        lines.contains(&"transactions,-,after_repair,,,,,differs"),
        "{out}"
    );
    assert!(
        lines.contains(&"positions,-,after_repair,,,,,equal"),
        "{out}"
    );
    let remaining: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains(",after_repair_"))
        .collect();
    assert_eq!(remaining.len(), 1, "{out}");
    assert!(
        remaining[0].starts_with("transactions,")
            && remaining[0].contains(&format!(",after_repair_extra,{deleted},")),
        "{out}"
    );
    eprintln!(
        "repair_exits_by_the_comparison_made_again_after_it: {:?}",
        started.elapsed()
    );
}

/// Runs `ibstream --config FILE verify ARGS` and returns its exit code and stdout (stderr
/// too for a failure).
async fn ibstream(config: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ibstream"));
    command
        .arg("--config")
        .arg(config)
        .arg("verify")
        .args(args)
        .env_remove("IBSTREAM_CONFIG");
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !matches!(output.status.code(), Some(0 | 1)) {
        text.push_str(&String::from_utf8_lossy(&output.stderr));
    }
    (output.status.code(), text)
}

/// Writes one event to `topic`.
async fn produce(bootstrap: &str, topic: &str, key: &str, payload: &[u8]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

/// Writes every event of `topics` once more (same key, same payload); returns how many.
async fn duplicate(bootstrap: &str, topics: &[String]) -> usize {
    let mut total = 0;
    for topic in topics {
        let events = read_all(bootstrap, topic).await;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("partitioner", "murmur2_random")
            .create()
            .unwrap();
        for event in &events {
            producer
                .send(
                    FutureRecord::to(topic)
                        .key(&event.key)
                        .payload(&event.payload),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
        total += events.len();
    }
    total
}

/// Reads every event of `topic` (read_committed) to each partition's end.
async fn read_all(bootstrap: &str, topic: &str) -> Vec<Consumed> {
    read_to_end(bootstrap, &[topic.to_owned()], "read_committed").await
}

/// Positions of a server no longer listed (removed from `/servers`, its data kept) are still
/// verified: their tag is taken from the topic's keys and read from the CRM by tag, so every
/// position of the truth is compared. When the CRM refuses that tag, its positions are "not
/// verified": the binary names the tag and how many the topic holds, and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_of_a_server_no_longer_listed_are_verified() {
    let started = Instant::now();
    let kafka = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| c.positions = 200).await;
    sim.pause_changes(true);
    let prefix = common::unique_topic("verify-removed");
    let config = config(&sim, &kafka.bootstrap, &prefix, Delivery::ExactlyOnce);
    let running = Running::start(config.clone());
    running.wait(&sim, 2, false).await;
    running.stop().await;
    let removed = sim.mutate(1, Some(ChangeKind::RemoveServer))[0].key.clone();
    let positions = sim.truth(Kind::Positions);
    let of_removed = positions
        .iter()
        .filter(|p| p["serverTag"] == removed.as_str())
        .count();
    assert!(of_removed > 0, "{removed} has positions");
    let only_positions = VerifyRequest {
        streams: vec!["positions".to_owned()],
        ..request(false)
    };
    let report = ibstream::verify::run(config.clone(), only_positions.clone())
        .await
        .unwrap();
    let pos = stream(&report, "positions");
    assert_eq!(
        pos.crm_records + pos.dead_letters.len() as u64,
        positions.len() as u64,
        "the positions of {removed} are compared too: {}",
        ibstream::verify::report::text(&report)
    );
    assert!(
        pos.is_equal(),
        "{}",
        ibstream::verify::report::text(&report)
    );

    // The CRM refuses the removed server's positions (404, as for a server it no longer
    // knows): they are not verified, named with how many the topic holds, and not equal.
    sim.fail_positions(&removed, Some(404));
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(&dir, &sim, &kafka.bootstrap, &prefix, "exactly-once");
    let to = today().to_string();
    let args = ["--from", "2024-01-01", "--to", &to, "--stream", "positions"];
    let refused_at = Instant::now();
    let (code, text) = ibstream(&file, &args).await;
    eprintln!(
        "{text}verify with a refused tag: {:?}",
        refused_at.elapsed()
    );
    assert_eq!(code, Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("  not verified  "))
        .unwrap_or_else(|| panic!("no not-verified line: {text}"));
    assert!(
        line.starts_with(&format!(
            "  not verified  {removed} (-): server not live; the CRM did not serve its positions ("
        )) && line.ends_with(&format!(
            "); the topic holds {of_removed} of them dated in the range, 0 unreadable"
        )),
        "{line}"
    );
    assert!(
        text.contains(&format!(
            "positions     DIFFERS: {} CRM records",
            positions.len() - of_removed
        )) && text.contains("missing 0, extra 0, different 0, dead letters 0"),
        "{text}"
    );
    // The CRM serves the removed server's earlier windows, then refuses the later ones: a
    // read that fails partway. Every position of the tag counts as not verified – also those
    // the served windows compared (before, only the keys no window had compared were counted,
    // 0 when the served windows held them all, and the stream passed as equal).
    let mut days: Vec<NaiveDate> = positions
        .iter()
        .filter(|p| p["serverTag"] == removed.as_str())
        .map(|p| {
            let close = p["closeTime"].as_str().unwrap();
            NaiveDate::parse_from_str(&close[..10], "%Y-%m-%d").unwrap()
        })
        .collect();
    days.sort();
    sim.fail_positions_after(&removed, 404, days[days.len() / 2]);
    let (code, text) = ibstream(&file, &args).await;
    assert_eq!(code, Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("  not verified  "))
        .unwrap_or_else(|| panic!("no not-verified line after a partial read: {text}"));
    assert!(
        line.ends_with(&format!(
            "); the topic holds {of_removed} of them dated in the range, 0 unreadable"
        )),
        "{line}"
    );
    eprintln!(
        "positions_of_a_server_no_longer_listed_are_verified: {:?}",
        started.elapsed()
    );
}

/// A day whose CRM reads stay short of the CRM's own total (the simulator's short-day fault:
/// one record more counted than served) is incomplete: not compared, and not equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_day_is_not_equal() {
    let started = Instant::now();
    let kafka = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| c.transactions = 100).await;
    sim.pause_changes(true);
    let prefix = common::unique_topic("verify-short");
    let config = config(&sim, &kafka.bootstrap, &prefix, Delivery::ExactlyOnce);
    let running = Running::start(config.clone());
    running.wait(&sim, 2, false).await;
    running.stop().await;
    let truth = sim.truth(Kind::Transactions);
    let date = truth[0]["transactionDate"].as_str().unwrap();
    let day: NaiveDate = date[..10].parse().unwrap();
    sim.set_short_day(Some(day));
    let only_tx = VerifyRequest {
        streams: vec!["transactions".to_owned()],
        ..request(false)
    };
    let report = ibstream::verify::run(config.clone(), only_tx)
        .await
        .unwrap();
    let tx = stream(&report, "transactions");
    assert_eq!(
        tx.incomplete_days,
        vec![("transactions".to_owned(), day, 1)],
        "{}",
        ibstream::verify::report::text(&report)
    );
    assert!(tx.missing.is_empty() && tx.extra.is_empty() && tx.different.is_empty());
    assert!(!tx.is_equal());
    assert_eq!(ibstream::verify::exit_code(&report), 1);
    eprintln!("an_incomplete_day_is_not_equal: {:?}", started.elapsed());
}

/// The second read after the comparison finds a record past the offsets the first read
/// ended at (as a broker whose watermark lagged, or a writer meanwhile, leaves one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_past_the_end_read_is_found_by_the_second_read() {
    let kafka = common::ApacheKafka::shared();
    let sim = common::start_sim(|_| {}).await;
    let topic = common::unique_topic("verify-past");
    let config = config(&sim, &kafka.bootstrap, &topic, Delivery::ExactlyOnce);
    for key in ["1", "2", "3"] {
        produce(&kafka.bootstrap, &topic, key, b"x").await;
    }
    let kafka_config = config.kafka.clone();
    let name = topic.clone();
    let read = tokio::task::spawn_blocking(move || {
        ibstream::verify::topics::read_topic(
            &kafka_config,
            &name,
            Duration::from_secs(30),
            &std::sync::atomic::AtomicU64::new(0),
        )
        .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(read.events, 3);
    assert_eq!(read.offsets.values().sum::<i64>(), 3);
    produce(&kafka.bootstrap, &topic, "4", b"y").await;
    let kafka_config = config.kafka.clone();
    let later = tokio::task::spawn_blocking(move || {
        ibstream::verify::topics::read_past(&kafka_config, &topic, &read, Duration::from_secs(30))
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(later.len(), 1, "{later:?}");
    assert_eq!(later[0].key, "4");
}
