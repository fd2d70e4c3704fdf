//! Values as real CRMs write them, end to end: zero dates, epoch seconds, a record dated far
//! outside its window, sets served in another order every time, and records whose dead
//! letter would be too large for Kafka.

use super::*;

/// A few hundred records of each kind, spread over the last `days` days, so the
/// reconciliation sweep re-reads every one of them.
fn recent(c: &mut ibstream::sim::SimConfig, days: i64) {
    c.leads = 300;
    c.customers = 120;
    c.transactions = 600;
    c.positions = 300;
    c.servers = 2;
    c.start_date = chrono::Utc::now().date_naive() - chrono::Duration::days(days);
}

/// A configuration that sweeps the last 30 days every 2 s: every record is read again and
/// again.
fn sweeping(sim: &SimHandle, broker: &impl common::Broker, prefix: &str, days: i64) -> Config {
    let mut cfg = config(sim, broker, prefix, &format!("{prefix}-1"));
    cfg.streams.start_date = chrono::Utc::now().date_naive() - chrono::Duration::days(days);
    cfg.streams.reconcile_interval_secs = 2;
    cfg.streams.reconcile_days = 30;
    cfg
}

fn count(
    run: &Running,
    stream: &str,
    get: fn(&StreamStats) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    get(&run.stats[stream]).load(Ordering::Relaxed)
}

/// Waits until `check` holds (polling), or fails after `timeout`.
async fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `sweeps` more reconciliation sweeps of each of `streams`.
async fn wait_sweeps(run: &Running, streams: &[&str], sweeps: u64) {
    let start: Vec<u64> = streams
        .iter()
        .map(|s| count(run, s, |s| &s.reconcile_sweeps))
        .collect();
    wait_for("the sweeps", Duration::from_secs(180), || {
        streams
            .iter()
            .zip(&start)
            .all(|(s, n)| count(run, s, |s| &s.reconcile_sweeps) >= n + sweeps)
    })
    .await;
}

fn ops(versions: &[Avro]) -> Vec<String> {
    versions.iter().map(|v| meta_string(v, "op")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_without_a_first_deposit_arrive_with_a_null_ftd_date_and_its_zero_date_in_extra()
{
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        recent(c, 10);
        c.zero_dates = true;
    })
    .await;
    let zero: Vec<String> = sim
        .truth(Kind::Customers)
        .iter()
        .filter(|c| c["ftdDate"] == "0000-00-00 00:00:00")
        .map(|c| c["customerId"].to_string())
        .collect();
    assert!(
        zero.len() > 20,
        "{} customers without a deposit",
        zero.len()
    );
    let prefix = common::unique_topic("zerodates");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let run = start(sweeping(&sim, &broker, &prefix, 10));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    // Read again and again: the zero date fingerprints the same every time.
    wait_sweeps(&run, &["customers"], 3).await;
    assert_eq!(count(&run, "customers", |s| &s.dead_letters), 0);
    assert_eq!(
        count(&run, "customers", |s| &s.no_dates),
        zero.len() as u64,
        "each no-date field counted once, when its event was emitted"
    );
    run.stop().await;
    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    // Every customer is there (none dead-lettered), as the truth has it.
    assert_matches_truth(&sim, &events);
    for key in &zero {
        let versions = &events["customers"][key];
        assert_eq!(ops(versions), ["CREATED"], "customer {key}");
        let event = &versions[0];
        assert_eq!(
            field(event, "ftdDate"),
            &Avro::Union(0, Box::new(Avro::Null))
        );
        let Avro::Map(extra) = field(event, "extra") else {
            panic!("extra is a map")
        };
        assert_eq!(
            extra.get("ftdDate"),
            Some(&Avro::String("\"0000-00-00 00:00:00\"".into())),
            "customer {key}: the raw zero date is kept under the field's name"
        );
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_dated_in_epoch_seconds_or_far_outside_their_window_are_emitted_once() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        recent(c, 10);
        c.epoch_seconds = true;
    })
    .await;
    let prefix = common::unique_topic("epochsecs");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let run = start(sweeping(&sim, &broker, &prefix, 10));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    // The newest transaction (already emitted) is served dated 400 days before its day while
    // it stays in its day's results; and a new transaction arrives today.
    let misdated = sim.mutate(1, Some(ChangeKind::Misdated));
    let fresh = sim.mutate(1, Some(ChangeKind::Transaction));
    assert_eq!(misdated.len(), 1);
    let before = run.cycles();
    run.wait_cycles(&before, &["transactions"], 5, Duration::from_secs(120))
        .await;
    wait_sweeps(&run, &["transactions"], 3).await;
    assert_eq!(count(&run, "transactions", |s| &s.outside_window), 1);
    assert_eq!(count(&run, "transactions", |s| &s.dead_letters), 0);
    run.stop().await;
    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    assert_matches_truth(&sim, &events);
    // Seconds are seconds: the truth's number times 1,000.
    let truth = sim.truth(Kind::Transactions);
    let sample = truth.iter().find(|t| t["isFake"] == false).unwrap();
    let key = sample["id"].to_string();
    let seconds = sample["transactionDate"].as_i64().unwrap();
    assert!(
        seconds > 1_700_000_000,
        "served as epoch seconds: {seconds}"
    );
    assert_eq!(
        field(&events["transactions"][&key][0], "transactionDate"),
        &Avro::Union(1, Box::new(Avro::TimestampMillis(seconds * 1000)))
    );
    // Re-read every cycle and sweep, each is emitted once (the misdated one once more, for
    // its date changed), never again as CREATED.
    for (key, versions) in &events["transactions"] {
        let want: &[&str] = if *key == misdated[0].key {
            &["CREATED", "UPDATED"]
        } else {
            &["CREATED"]
        };
        assert_eq!(ops(versions), want, "transaction {key}");
    }
    assert!(events["transactions"].contains_key(&fresh[0].key));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_accounts_served_in_another_order_every_time_make_no_update() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        recent(c, 10);
        c.shuffle_sets = true;
    })
    .await;
    // The simulator really serves the sets in other orders.
    let orders: HashSet<String> = (0..8)
        .map(|_| {
            let customers = sim.truth(Kind::Customers);
            let with_two = customers
                .iter()
                .find(|c| c["userAdditionalId"].as_str().unwrap().contains("), ("))
                .unwrap();
            format!("{}{}", with_two["userAdditionalId"], with_two["tags"])
        })
        .collect();
    assert!(orders.len() > 1, "the simulator does not shuffle");
    let prefix = common::unique_topic("shuffled");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let run = start(sweeping(&sim, &broker, &prefix, 10));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    wait_sweeps(&run, &["leads", "customers"], 3).await;
    let before = run.cycles();
    run.wait_cycles(
        &before,
        &["leads", "customers"],
        3,
        Duration::from_secs(120),
    )
    .await;
    for stream in ["leads", "customers"] {
        assert_eq!(
            count(&run, stream, |s| &s.updated),
            0,
            "{stream}: UPDATED events"
        );
    }
    run.stop().await;
    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    for stream in ["leads", "customers"] {
        let truth = expected(&sim, stream);
        assert_eq!(events[stream].len(), truth.len(), "{stream}");
        for (key, versions) in &events[stream] {
            assert_eq!(ops(versions), ["CREATED"], "{stream} {key}");
        }
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_too_large_in_wide_or_escaped_characters_make_dead_letters_that_fit_and_the_stream_goes_on(
) {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| recent(c, 10)).await;
    let prefix = common::unique_topic("widebloat");
    let cfg = config(&sim, &broker, &prefix, "widebloat-1");
    let max = cfg.kafka.max_message_bytes();
    let run = start(cfg);
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    // Leads over 1 MB in 2-byte characters (600,000 × "ж", 1.2 MB), 3-byte ones and control
    // characters that JSON writes in 6 bytes each: their events are too large, and a dead
    // letter cut by characters would be too.
    let mut bloated = Vec::new();
    for (text, count) in [('ж', 600_000), ('€', 400_000), ('\u{1}', 1_100_000)] {
        bloated.extend(sim.mutate(1, Some(ChangeKind::BloatWith { text, count })));
    }
    assert_eq!(bloated.len(), 3);
    let before = run.cycles();
    run.wait_cycles(&before, &["leads"], 2, Duration::from_secs(120))
        .await;
    // The stream goes on: a lead registered afterwards arrives.
    let later = sim.mutate(1, Some(ChangeKind::NewLead));
    let before = run.cycles();
    run.wait_cycles(&before, &["leads"], 2, Duration::from_secs(120))
        .await;
    assert_eq!(count(&run, "leads", |s| &s.dead_letters), 3);
    let report = run.stop().await;
    assert!(report.stopped.is_empty(), "{:?}", report.stopped);
    let letters = consume(
        &broker.bootstrap,
        &[format!("{prefix}.dlq")],
        3,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(letters.len(), 3, "one dead letter each, not one per cycle");
    for letter in &letters {
        assert!(
            letter.payload.len() + letter.key.len() <= max,
            "lead {}: a dead letter of {} bytes",
            letter.key,
            letter.payload.len() + letter.key.len()
        );
        let value: Json = serde_json::from_slice(&letter.payload).unwrap();
        assert!(value["raw"].as_str().unwrap().ends_with("…(truncated)"));
        assert!(value["rawBytes"].as_u64().unwrap() > 1_000_000);
        assert!(bloated.iter().any(|c| c.key == letter.key));
    }
    let records = consume(
        &broker.bootstrap,
        &[format!("{prefix}.leads")],
        1,
        Duration::from_secs(2),
    )
    .await;
    assert!(
        records.iter().any(|r| r.key == later[0].key),
        "the lead registered after the large ones did not arrive"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprints_an_earlier_release_stored_make_no_update_after_the_upgrade() {
    use ibstream::crm::fingerprint::{fingerprint, legacy};
    use ibstream::stream::state::FpEntry;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| recent(c, 10)).await;
    let prefix = common::unique_topic("legacyfps");
    let run = start(sweeping(&sim, &broker, &prefix, 10));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    run.stop().await;
    // The fingerprints an earlier release stored for every lead and customer (written the
    // way releases before segments wrote them, `fp/<stream>/<id>`, which a restore applies
    // in offset order over the segments): the canonical JSON with the sets as received.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    let state_topic = format!("{prefix}._ibstream_state");
    let mut differing = 0;
    for (stream, kind, id_field, volatile) in [
        ("leads", Kind::Leads, "id", vec![]),
        (
            "customers",
            Kind::Customers,
            "customerId",
            vec!["balanceUsd".to_owned()],
        ),
    ] {
        for record in sim.truth(kind) {
            let map = record.as_object().unwrap();
            let old = legacy::fingerprint(map, &volatile, &mut Vec::new());
            if old != fingerprint(map, &volatile, &mut Vec::new()) {
                differing += 1;
            }
            let key = FpEntry::key(stream, &record[id_field].to_string());
            let value = FpEntry { fp: old, day: 0 }.encode();
            producer
                .send(
                    FutureRecord::to(&state_topic).key(&key).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    assert!(
        differing > 100,
        "only {differing} legacy fingerprints differ"
    );
    // The upgraded release reads every one of them again, unchanged: no UPDATED.
    let run = start(sweeping(&sim, &broker, &prefix, 10));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    wait_sweeps(&run, &["leads", "customers"], 2).await;
    for stream in ["leads", "customers"] {
        assert_eq!(
            count(&run, stream, |s| &s.updated),
            0,
            "{stream}: UPDATED events"
        );
        assert_eq!(
            count(&run, stream, |s| &s.created),
            0,
            "{stream}: CREATED events"
        );
        assert!(count(&run, stream, |s| &s.unchanged) > 0);
    }
    run.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dates_an_earlier_release_misread_are_corrected_once_after_the_upgrade() {
    use ibstream::crm::fingerprint::legacy;
    use ibstream::stream::change::event_id;
    use ibstream::stream::poller::days_since_epoch;
    use ibstream::stream::state::FpEntry;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        recent(c, 10);
        c.epoch_seconds = true;
    })
    .await;
    let prefix = common::unique_topic("misread");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let run = start(sweeping(&sim, &broker, &prefix, 10));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    run.stop().await;
    // The state an earlier release left: the fingerprint of each transaction's text (its
    // epoch-seconds date read, and emitted, as milliseconds of January 1970), kept by today
    // so no prune drops it; and of each lead, whose values read as they did.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    let state_topic = format!("{prefix}._ibstream_state");
    let today = days_since_epoch(chrono::Utc::now().date_naive());
    let mut old_ids = HashMap::new();
    for (stream, kind) in [("transactions", Kind::Transactions), ("leads", Kind::Leads)] {
        for record in sim.truth(kind) {
            let map = record.as_object().unwrap();
            let old = legacy::fingerprint(map, &[], &mut Vec::new());
            let id = record["id"].to_string();
            if stream == "transactions" {
                old_ids.insert(id.clone(), event_id(stream, &id, None, old));
            }
            let key = FpEntry::key(stream, &id);
            let value = FpEntry {
                fp: old,
                day: today,
            }
            .encode();
            producer
                .send(
                    FutureRecord::to(&state_topic).key(&key).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    let run = start(sweeping(&sim, &broker, &prefix, 10));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    wait_sweeps(&run, &["leads", "transactions"], 2).await;
    assert_eq!(count(&run, "leads", |s| &s.updated), 0);
    assert_eq!(count(&run, "leads", |s| &s.created), 0);
    let updated = count(&run, "transactions", |s| &s.updated);
    assert_eq!(count(&run, "transactions", |s| &s.created), 0);
    run.stop().await;
    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    assert!(events["transactions"].len() > 500);
    assert_eq!(updated, events["transactions"].len() as u64);
    let truth = sim.truth(Kind::Transactions);
    for (key, versions) in &events["transactions"] {
        let record = truth
            .iter()
            .find(|t| t["id"].as_i64() == key.parse().ok())
            .unwrap();
        // The first run's CREATED, then exactly one UPDATED after the upgrade.
        assert_eq!(ops(versions), ["CREATED", "UPDATED"], "transaction {key}");
        let updated = &versions[1];
        let seconds = record["transactionDate"].as_i64().unwrap();
        assert_eq!(
            field(updated, "transactionDate"),
            &Avro::Union(1, Box::new(Avro::TimestampMillis(seconds * 1000))),
            "transaction {key}"
        );
        assert_ne!(
            meta_string(updated, "eventId"),
            old_ids[key],
            "transaction {key}: the id of the wrong 1970 event"
        );
    }
    sim.shutdown().await;
}
