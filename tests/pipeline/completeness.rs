//! The completeness issue's scenarios: windows never passed with records missing, open
//! windows, the reconciliation sweep, event ids across real changes, records without a date,
//! numbers written another way, and the positions supervisor following a flaky servers list.

use super::*;
use ibstream::stream::state::Cursor;

fn sim_days_ago(c: &mut ibstream::sim::SimConfig, days: i64) {
    c.start_date = chrono::Utc::now().date_naive() - chrono::Duration::days(days);
}

fn tiny(c: &mut ibstream::sim::SimConfig) {
    c.leads = 300;
    c.customers = 120;
    c.transactions = 1_500;
    c.positions = 1_500;
    c.servers = 2;
}

fn counter(
    run: &Running,
    stream: &str,
    get: fn(&StreamStats) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    get(&run.stats[stream]).load(Ordering::Relaxed)
}

/// Waits until `check` holds (polling), or fails after `timeout`.
/// The configuration of a test reading the simulator's last 30 days (`sim_days_ago(c, 30)`)
/// in pages of 25 records, so a day spans several pages.
fn month_in_small_pages(
    sim: &SimHandle,
    broker: &impl common::Broker,
    prefix: &str,
    instance: &str,
) -> Config {
    let mut cfg = config(sim, broker, prefix, instance);
    cfg.streams.start_date = chrono::Utc::now().date_naive() - chrono::Duration::days(30);
    cfg.crm.page_size = 25;
    cfg
}

/// The `/status` document of a run listening on `127.0.0.1:<port>`.
async fn status_of(port: u16) -> Json {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Returns the latest value of every key of the state topic.
async fn state_values(
    broker: &impl common::Broker,
    prefix: &str,
) -> HashMap<String, Option<Vec<u8>>> {
    let topic = format!("{prefix}._ibstream_state");
    let records = consume(broker.bootstrap(), &[topic], 1, Duration::from_secs(2)).await;
    let mut sorted: Vec<&Consumed> = records.iter().collect();
    sorted.sort_by_key(|c| c.offset);
    sorted
        .into_iter()
        .map(|c| {
            (
                c.key.clone(),
                (!c.payload.is_empty()).then(|| c.payload.clone()),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_under_unstable_page_order_equals_the_truth() {
    let broker = common::ApacheKafka::shared();
    // 20k transactions over 70 days, served from a fresh random order on every page request
    // (a database paging without ORDER BY): pages overlap and miss records though none
    // changes. Only the union of a window's reads, and splitting it, finds them all.
    let sim = common::start_sim(|c| {
        sim_days_ago(c, 70);
        c.leads = 1_000;
        c.customers = 400;
        c.transactions = 20_000;
        c.positions = 3_000;
        c.servers = 1;
        c.unstable_order = true;
    })
    .await;
    let prefix = common::unique_topic("unstable");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let mut cfg = config(&sim, &broker, &prefix, "unstable-1");
    cfg.streams.start_date = chrono::Utc::now().date_naive() - chrono::Duration::days(70);
    let run = start(cfg);
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(600))
        .await;
    let drift: u64 = run
        .stats
        .values()
        .map(|s| s.drift_rereads.load(Ordering::Relaxed))
        .sum();
    assert!(
        drift > 0,
        "pages never overlapped: the scenario did not happen"
    );
    // A day holding more records than a page may stay open after its first reads; every
    // cycle's retry adds to what was read of it, until it is complete.
    let open = || -> u64 {
        run.stats
            .values()
            .map(|s| s.open_windows.load(Ordering::Relaxed))
            .sum()
    };
    wait_until("every open window closed", Duration::from_secs(300), || {
        open() == 0
    })
    .await;
    run.stop().await;
    let expected = truth_count(&sim);
    let records = consume(
        &broker.bootstrap,
        &data_topics(&prefix),
        expected,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(records.len(), expected, "no record twice, none missing");
    assert_matches_truth(&sim, &group(&schemas, &prefix, &records));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_short_of_its_total_stays_open_until_its_records_are_all_read() {
    let broker = common::ApacheKafka::shared();
    let short = chrono::Utc::now().date_naive() - chrono::Duration::days(10);
    // Every transactions answer whose window holds `short` counts one record more than it
    // serves: the window is re-read, split down to that day, and the day is kept open.
    let sim = common::start_sim(|c| {
        tiny(c);
        sim_days_ago(c, 60);
        c.short_day = Some(short);
    })
    .await;
    let prefix = common::unique_topic("open");
    let mut cfg = config(&sim, &broker, &prefix, "open-1");
    cfg.streams.start_date = chrono::Utc::now().date_naive() - chrono::Duration::days(60);
    let run = start(cfg.clone());
    run.wait_cycles(&HashMap::new(), &STREAMS, 2, Duration::from_secs(300))
        .await;
    assert_eq!(counter(&run, "transactions", |s| &s.open_windows), 1);
    run.stop().await;
    let state = state_values(&broker, &prefix).await;
    let cursor = Cursor::decode(state["cursor/transactions"].as_ref().unwrap()).unwrap();
    assert_eq!(cursor.open.len(), 1, "{cursor:?}");
    assert_eq!((cursor.open[0].day, cursor.open[0].missing), (short, 1));
    assert!(
        cursor.watermark.unwrap() > short,
        "the watermark moved on: {cursor:?}"
    );

    // The CRM recovers; a restart finds the open window in the state and closes it.
    sim.set_short_day(None);
    let run = start(cfg);
    wait_until("the open window restored", Duration::from_secs(60), || {
        run.cycles()["transactions"] >= 1
    })
    .await;
    assert_eq!(counter(&run, "transactions", |s| &s.open_windows), 0);
    run.stop().await;
    let state = state_values(&broker, &prefix).await;
    let cursor = Cursor::decode(state["cursor/transactions"].as_ref().unwrap()).unwrap();
    assert!(cursor.open.is_empty(), "{cursor:?}");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    assert_matches_truth(&sim, &events);
    for (key, versions) in &events["transactions"] {
        assert_eq!(versions.len(), 1, "transaction {key} emitted twice");
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_window_past_its_retention_is_given_up() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let broker = common::ApacheKafka::shared();
    let short = chrono::Utc::now().date_naive() - chrono::Duration::days(20);
    let sim = common::start_sim(|c| {
        tiny(c);
        c.short_day = Some(short);
    })
    .await;
    let prefix = common::unique_topic("giveup");
    // The state of an earlier run: transactions read to yesterday, `short` open for 8 days.
    let state_topic = format!("{prefix}._ibstream_state");
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    for result in admin
        .create_topics(
            &[NewTopic::new(&state_topic, 1, TopicReplication::Fixed(1))
                .set("cleanup.policy", "compact")],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
    let mut cursor = Cursor {
        watermark: Some(chrono::Utc::now().date_naive() - chrono::Duration::days(1)),
        swept: Some(chrono::Utc::now()),
        ..Cursor::default()
    };
    cursor.open_day(short, 1, chrono::Utc::now() - chrono::Duration::days(8));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(&state_topic)
                .key("cursor/transactions")
                .payload(&cursor.encode()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    let mut cfg = config(&sim, &broker, &prefix, "giveup-1");
    cfg.streams.open_window_retention_days = 7;
    let run = start(cfg);
    run.wait_cycles(
        &HashMap::new(),
        &["transactions"],
        1,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        counter(&run, "transactions", |s| &s.open_windows_given_up),
        1
    );
    assert_eq!(counter(&run, "transactions", |s| &s.open_windows), 0);
    run.stop().await;
    let state = state_values(&broker, &prefix).await;
    let cursor = Cursor::decode(state["cursor/transactions"].as_ref().unwrap()).unwrap();
    assert!(cursor.open.is_empty(), "{cursor:?}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_finds_late_and_corrected_records_and_event_ids_follow_real_changes() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        tiny(c);
        sim_days_ago(c, 90);
    })
    .await;
    let prefix = common::unique_topic("sweep");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let mut cfg = config(&sim, &broker, &prefix, "sweep-1");
    cfg.streams.start_date = chrono::Utc::now().date_naive() - chrono::Duration::days(90);
    cfg.streams.reconcile_interval_secs = 2;
    cfg.streams.lookback_days = 1;
    let run = start(cfg);
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    // Sweeps over unchanged data emit nothing.
    let sweeps = |run: &Running, s: &str| counter(run, s, |s| &s.reconcile_sweeps);
    wait_until(
        "two sweeps of transactions",
        Duration::from_secs(60),
        || sweeps(&run, "transactions") >= 2 && sweeps(&run, "positions") >= 4,
    )
    .await;
    let quiet = consume(
        &broker.bootstrap,
        &data_topics(&prefix),
        truth_count(&sim),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        quiet.len(),
        truth_count(&sim),
        "a sweep emitted unchanged records"
    );

    // A deposit dated 7 days ago succeeds now; a transaction and a position 10 days back are
    // corrected. The lookback (1 day) cannot see them: only the sweep can.
    let late = sim.mutate(1, Some(ChangeKind::LateTransaction { days: 7 }));
    let corrected = sim.mutate(1, Some(ChangeKind::Correction { days: Some(10) }));
    assert_eq!(corrected.len(), 2);
    let after_sweeps = |run: &Running| (sweeps(run, "transactions"), sweeps(run, "positions"));
    let (t0, p0) = after_sweeps(&run);
    wait_until(
        "a full sweep after the changes",
        Duration::from_secs(60),
        || {
            let (t, p) = after_sweeps(&run);
            t >= t0 + 2 && p >= p0 + 4
        },
    )
    .await;
    // Back to A: the second A is a change of its own.
    sim.mutate(1, Some(ChangeKind::Revert));
    let (t0, p0) = after_sweeps(&run);
    wait_until(
        "a full sweep after the revert",
        Duration::from_secs(60),
        || {
            let (t, p) = after_sweeps(&run);
            t >= t0 + 2 && p >= p0 + 4
        },
    )
    .await;
    run.stop().await;

    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    assert_matches_truth(&sim, &events);
    let late_events = &events["transactions"][&late[0].key];
    assert_eq!(late_events.len(), 1);
    assert_eq!(meta_string(&late_events[0], "op"), "CREATED");
    for change in &corrected {
        let versions = &events[change.stream][&change.key];
        let ops: Vec<String> = versions.iter().map(|v| meta_string(v, "op")).collect();
        assert_eq!(
            ops,
            ["CREATED", "UPDATED", "UPDATED"],
            "{} {}",
            change.stream,
            change.key
        );
        let ids: HashSet<String> = versions.iter().map(|v| meta_string(v, "eventId")).collect();
        assert_eq!(ids.len(), 3, "A → B → A: three changes, three event ids");
        assert_eq!(
            body(&versions[0]),
            body(&versions[2]),
            "the record is A again"
        );
        assert_ne!(body(&versions[0]), body(&versions[1]));
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_without_a_date_is_emitted_once_and_numbers_written_another_way_make_no_event() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        tiny(c);
        c.numeric_money = true;
    })
    .await;
    let prefix = common::unique_topic("nodate");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let run = start(config(&sim, &broker, &prefix, "nodate-1"));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    // The newest transaction loses its date (it stays in its day's results), and the newest
    // transaction and position write their numbers as `1250e-2` instead of `12.50`.
    let undated = sim.mutate(1, Some(ChangeKind::NullDate));
    let reformatted = sim.mutate(1, Some(ChangeKind::Reformat));
    assert_eq!(reformatted.len(), 2);
    let before = run.cycles();
    run.wait_cycles(&before, &["transactions"], 10, Duration::from_secs(120))
        .await;
    run.wait_cycles(&before, &["positions"], 10, Duration::from_secs(120))
        .await;
    run.stop().await;
    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    assert_matches_truth(&sim, &events);
    let versions = &events["transactions"][&undated[0].key];
    let ops: Vec<String> = versions.iter().map(|v| meta_string(v, "op")).collect();
    assert_eq!(
        ops,
        ["CREATED", "UPDATED"],
        "emitted once in 10 cycles after losing its date"
    );
    for change in &reformatted {
        assert_eq!(
            events[change.stream][&change.key].len(),
            1,
            "{} {}: the same numbers written another way made an event",
            change.stream,
            change.key
        );
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_positions_supervisor_survives_a_failing_tag_and_a_flaky_servers_list() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(tiny).await;
    let prefix = common::unique_topic("supervisor");
    let run = start(config(&sim, &broker, &prefix, "supervisor-1"));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    let pages = |tag: &str| sim.stats().position_pages(tag);

    // One empty servers answer stops no tag: both keep being polled without a gap.
    sim.empty_servers(1);
    let servers = run.cycles()["servers"];
    wait_until(
        "the empty answer and a good one",
        Duration::from_secs(30),
        || run.cycles()["servers"] >= servers + 3,
    )
    .await;
    let (a, b) = (pages("mt4-live-01"), pages("mt5-live-02"));
    let before = run.cycles();
    run.wait_cycles(&before, &["positions"], 4, Duration::from_secs(60))
        .await;
    assert!(pages("mt4-live-01") > a && pages("mt5-live-02") > b);

    // A tag whose positions call fails for good (404) stops alone; the others go on, and a
    // new server is still picked up.
    sim.fail_positions("mt4-live-01", Some(404));
    let before = run.cycles();
    run.wait_cycles(&before, &["positions"], 3, Duration::from_secs(60))
        .await;
    let failed_pages = pages("mt4-live-01");
    sim.mutate(1, Some(ChangeKind::Server));
    wait_until(
        "the new server's positions",
        Duration::from_secs(60),
        || pages("mt4-live-03") > 0,
    )
    .await;
    let b = pages("mt5-live-02");
    let before = run.cycles();
    run.wait_cycles(&before, &["positions"], 4, Duration::from_secs(60))
        .await;
    assert!(pages("mt5-live-02") > b, "a healthy tag stopped");
    assert_eq!(
        pages("mt4-live-01"),
        failed_pages,
        "the failing tag was polled again"
    );
    let report = run.stop().await;
    assert!(
        report.stopped.is_empty(),
        "positions as a whole stopped: {:?}",
        report.stopped
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_kafka_accepts_becomes_a_dead_letter_and_the_stream_goes_on() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(tiny).await;
    let prefix = common::unique_topic("toolarge");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let run = start(config(&sim, &broker, &prefix, "toolarge-1"));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    // A lead grows a 1.5 MB field: its event is larger than the producer's message.max.bytes
    // (librdkafka's default, 1,000,000), and Kafka would refuse it every cycle.
    let bloated = sim.mutate(1, Some(ChangeKind::Bloat));
    let before = run.cycles();
    run.wait_cycles(&before, &STREAMS, 3, Duration::from_secs(120))
        .await;
    assert_eq!(counter(&run, "leads", |s| &s.dead_letters), 1);
    let report = run.stop().await;
    assert!(report.stopped.is_empty(), "{:?}", report.stopped);
    let records = consume(
        &broker.bootstrap,
        &data_topics(&prefix),
        1,
        Duration::from_secs(2),
    )
    .await;
    let events = group(&schemas, &prefix, &records);
    let letters = consume(
        &broker.bootstrap,
        &[format!("{prefix}.dlq")],
        1,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(letters.len(), 1, "one dead letter, not one per cycle");
    let letter = &letters[0];
    assert!(
        letter.payload.len() < 1_000_000,
        "the dead letter is too large itself"
    );
    assert_eq!(letter.key, bloated[0].key);
    let value: Json = serde_json::from_slice(&letter.payload).unwrap();
    assert!(
        value["error"]
            .as_str()
            .unwrap()
            .contains("message.max.bytes"),
        "{}",
        value["error"]
    );
    assert!(value["raw"].as_str().unwrap().ends_with("(truncated)"));
    // Its earlier version stays the latest event of the lead; everything else is emitted.
    let mut truth_leads = expected(&sim, "leads");
    truth_leads.remove(&bloated[0].key);
    assert_eq!(events["leads"].len(), truth_leads.len() + 1);
    for key in truth_leads.keys() {
        assert!(events["leads"].contains_key(key), "lead {key} missing");
    }
    sim.shutdown().await;
}

/// A cursor read up to 20 days ago whose sweep is due (its last one long ago): the first
/// cycle reads from its lookback, then a sweep starts and, done, is not due again for the
/// configured interval.
fn sweep_due() -> Cursor {
    Cursor {
        watermark: Some(chrono::Utc::now().date_naive() - chrono::Duration::days(20)),
        swept: Some(chrono::DateTime::UNIX_EPOCH),
        ..Cursor::default()
    }
}

/// A transactions poller driven by hand (cycles and sweep slices called by the test, not a
/// loop), on a real sink: the order of reads is the test's.
async fn hand_poller(
    sim: &SimHandle,
    broker: &impl common::Broker,
    prefix: &str,
    tweak: impl FnOnce(&mut Config),
    cursor: Cursor,
) -> (
    ibstream::stream::poller::Poller<Transaction>,
    Arc<StreamStats>,
) {
    use ibstream::kafka::TopicSpec;
    use ibstream::stream::poller::{CursorSpec, Poller, Shared};
    let mut cfg = config(sim, broker, prefix, &format!("{prefix}-hand"));
    tweak(&mut cfg);
    let topics: Vec<TopicSpec> = ["transactions", "dlq", "_ibstream_state"]
        .iter()
        .map(|t| TopicSpec {
            name: format!("{prefix}.{t}"),
            partitions: 1,
            replication: 1,
            configs: Vec::new(),
        })
        .collect();
    ibstream::kafka::ensure_topics(&cfg.kafka, &topics)
        .await
        .unwrap();
    let sink = ibstream::kafka::sink::start(&cfg.kafka).await.unwrap();
    let client = ibstream::crm::CrmClient::build(&cfg.crm).unwrap();
    let stats: ibstream::ops::Stats = [("transactions", Arc::default())].into_iter().collect();
    let ops = Arc::new(ibstream::ops::Registry::new(
        "hand",
        cfg.kafka.delivery,
        client.tz(),
        Duration::from_secs(30),
        stats.clone(),
        client.stats(),
    ));
    let shared = Arc::new(Shared {
        tz: client.tz(),
        client,
        sink: sink.handle,
        source: cfg.crm.domain.clone(),
        api_prefix: "/api/v1/ib".to_owned(),
        topic_prefix: prefix.to_owned(),
        state_topic: format!("{prefix}._ibstream_state"),
        streams: cfg.streams.clone(),
        decimal_excess: cfg.events.decimal_excess,
        max_event_bytes: cfg.kafka.max_message_bytes(),
        ops,
    });
    let schemas = Schemas::load("com.ibstream").unwrap();
    let encoder =
        ibstream::events::Encoder::new(&schemas, ibstream::events::Framing::SingleObject).unwrap();
    let poller = Poller::new(
        "transactions",
        None,
        vec![CursorSpec {
            scope: "transactions".to_owned(),
            filter: ibstream::crm::DateFilter::Transaction,
            initial: cfg.streams.start_date,
        }],
        true,
        Vec::new(),
        Default::default(),
        [("transactions".to_owned(), cursor)].into_iter().collect(),
        shared,
        encoder,
        stats["transactions"].clone(),
    );
    (poller, stats["transactions"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sweep_never_replays_a_page_older_than_a_later_read() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        c.transactions = 400;
        sim_days_ago(c, 12);
        // Slow pages: the sweep's slice ends with pages read ahead and not yet applied.
        c.latency_ms = 40;
    })
    .await;
    let prefix = common::unique_topic("stalesweep");
    let (mut poller, stats) = hand_poller(
        &sim,
        &broker,
        &prefix,
        |cfg| {
            cfg.streams.start_date = chrono::Utc::now().date_naive() - chrono::Duration::days(12);
            cfg.crm.page_size = 10;
            cfg.crm.read_ahead_pages = 4;
            // The cycles read every day the sweep reads.
            cfg.streams.lookback_days = 15;
            cfg.streams.reconcile_days = 15;
        },
        sweep_due(),
    )
    .await;
    poller.cycle().await.unwrap();
    // A slice of the sweep: a few pages applied, more read ahead and held.
    poller
        .background(tokio::time::Instant::now() + Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(stats.reconcile_sweeps.load(Ordering::Relaxed), 0);
    // The read-ahead fills up: 4 pages served (as of now) and held, not applied.
    let held = || sim.stats().pages.load(Ordering::Relaxed) - stats.pages.load(Ordering::Relaxed);
    wait_until(
        "the sweep's read-ahead full",
        Duration::from_secs(30),
        || held() >= 4,
    )
    .await;
    // Every transaction changes (each correction changes one), then a cycle reads them all
    // at their new versions while the sweep still holds its pages of the old ones.
    for days in 0..=12 {
        for _ in 0..40 {
            sim.mutate(1, Some(ChangeKind::Correction { days: Some(days) }));
        }
    }
    poller.cycle().await.unwrap();
    // The sweep goes on to its end with the pages it holds.
    poller
        .background(tokio::time::Instant::now() + Duration::from_secs(120))
        .await
        .unwrap();
    assert!(
        stats.reconcile_sweeps.load(Ordering::Relaxed) >= 1,
        "the sweep did not finish"
    );
    let schemas = Schemas::load("com.ibstream").unwrap();
    let records = consume(
        &broker.bootstrap,
        &[format!("{prefix}.transactions")],
        1,
        Duration::from_secs(2),
    )
    .await;
    let events = group(&schemas, &prefix, &records);
    // Right after the sweep, before any cycle mends it: every latest value is the truth.
    let truth = expected(&sim, "transactions");
    let stale: Vec<&String> = truth
        .iter()
        .filter(|(key, want)| {
            events["transactions"]
                .get(*key)
                .is_none_or(|v| &without_meta(v.last().unwrap()) != *want)
        })
        .map(|(key, _)| key)
        .collect();
    assert!(
        stale.is_empty(),
        "{} transactions left on an older version by the sweep, e.g. {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    // One more cycle: no key's event ids go X, Y, X.
    poller.cycle().await.unwrap();
    let records = consume(
        &broker.bootstrap,
        &[format!("{prefix}.transactions")],
        records.len(),
        Duration::from_secs(2),
    )
    .await;
    let events = group(&schemas, &prefix, &records);
    assert_duplicates_share_ids_and_no_phantom_update(&events);
    eprintln!(
        "stale records skipped: {}",
        stats.stale_skipped.load(Ordering::Relaxed)
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_totals_windows_are_read_until_a_read_finds_nothing_new_or_stay_open() {
    let broker = common::ApacheKafka::shared();
    // No `total` in any answer; pages from a fresh random order on every request, and
    // changes (new records too) between page calls.
    let sim = common::start_sim(|c| {
        tiny(c);
        sim_days_ago(c, 30);
        c.omit_total = true;
        c.unstable_order = true;
        c.shuffle_pages = true;
    })
    .await;
    let prefix = common::unique_topic("nototal");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let cfg = month_in_small_pages(&sim, &broker, &prefix, "nototal-1");
    let run = start(cfg);
    let open = |run: &Running| -> u64 {
        run.stats
            .values()
            .map(|s| s.open_windows.load(Ordering::Relaxed))
            .sum()
    };
    // While every read brings records the one before did not have, a window cannot be
    // shown complete: it stays open (never passed silently).
    wait_until("an open window", Duration::from_secs(300), || {
        open(&run) > 0
    })
    .await;
    // The CRM stands still (its order stays random): reads converge, every window closes.
    sim.pause_changes(true);
    let paused = run.cycles();
    run.wait_cycles(&paused, &STREAMS, 2, Duration::from_secs(300))
        .await;
    wait_until("every open window closed", Duration::from_secs(300), || {
        open(&run) == 0
    })
    .await;
    let after = run.cycles();
    run.wait_cycles(&after, &STREAMS, 1, Duration::from_secs(300))
        .await;
    run.stop().await;
    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    assert_matches_truth(&sim, &events);
    assert_duplicates_share_ids_and_no_phantom_update(&events);
    sim.shutdown().await;
}

/// A CRM that refuses every page starting at record 75 or later with `status`: windows are
/// read in halves, a day of more than 75 records is kept open with its reason (metric,
/// `/status`) and the stream goes on; every record of the other days arrives.
async fn deep_pages_refused_with(status: u16) {
    let broker = common::ApacheKafka::shared();
    const MAX_OFFSET: usize = 75;
    let sim = common::start_sim(|c| {
        tiny(c);
        sim_days_ago(c, 30);
        // About 80 transactions a day: some days deeper than the limit, some not.
        c.transactions = 2_400;
        // Positions per server and day well within the limit.
        c.positions = 300;
        c.max_page_offset = MAX_OFFSET as u64;
        c.deep_page_status = status;
    })
    .await;
    let prefix = common::unique_topic("deep");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let mut cfg = month_in_small_pages(&sim, &broker, &prefix, &format!("deep-{status}"));
    cfg.crm.max_retries = 1;
    let http_port = common::free_port();
    cfg.http.listen = format!("127.0.0.1:{http_port}");
    // The days the CRM cannot serve whole (it serves no fake transactions).
    let mut per_day: HashMap<String, usize> = HashMap::new();
    for t in sim.truth(Kind::Transactions) {
        if t["isFake"] == false {
            let day = t["transactionDate"].as_str().unwrap()[..10].to_owned();
            *per_day.entry(day).or_default() += 1;
        }
    }
    let mut deep: Vec<chrono::NaiveDate> = per_day
        .iter()
        .filter(|(_, n)| **n > MAX_OFFSET)
        .map(|(day, _)| day.parse().unwrap())
        .collect();
    deep.sort();
    assert!(
        !deep.is_empty() && deep.len() < per_day.len(),
        "the data has no day deeper than the limit, or only such days: {per_day:?}"
    );
    let run = start(cfg);
    run.wait_cycles(&HashMap::new(), &STREAMS, 2, Duration::from_secs(300))
        .await;
    assert!(counter(&run, "transactions", |s| &s.windows_too_deep) >= deep.len() as u64);
    assert_eq!(
        counter(&run, "transactions", |s| &s.open_windows),
        deep.len() as u64
    );
    let status: Json = status_of(http_port).await;
    let open: Vec<&Json> = status["pollers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "transactions")
        .flat_map(|p| p["cursors"][0]["openWindows"].as_array().unwrap())
        .collect();
    let open_days: Vec<chrono::NaiveDate> = open
        .iter()
        .map(|w| w["day"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(open_days, deep, "{status:#}");
    for window in &open {
        let reason = window["reason"].as_str().unwrap();
        assert!(reason.contains("refuses pages past record"), "{reason}");
    }
    run.stop().await;
    let state = state_values(&broker, &prefix).await;
    let cursor = Cursor::decode(state["cursor/transactions"].as_ref().unwrap()).unwrap();
    assert!(
        cursor.watermark.unwrap() >= chrono::Utc::now().date_naive() - chrono::Duration::days(2),
        "the cursor went on past the open days: {cursor:?}"
    );
    // Every other stream whole; every transaction of a day within the limit arrived, and the
    // first records of the deep days.
    let records = consume(
        &broker.bootstrap,
        &data_topics(&prefix),
        1,
        Duration::from_secs(2),
    )
    .await;
    let events = group(&schemas, &prefix, &records);
    for stream in ["leads", "customers", "positions", "servers"] {
        assert_eq!(
            events[stream].len(),
            expected(&sim, stream).len(),
            "{stream}"
        );
    }
    let got = &events["transactions"];
    let truth = expected(&sim, "transactions");
    for t in sim.truth(Kind::Transactions) {
        if t["isFake"] != false {
            continue;
        }
        let day: chrono::NaiveDate = t["transactionDate"].as_str().unwrap()[..10]
            .parse()
            .unwrap();
        let key = match &t["id"] {
            Json::String(id) => id.clone(),
            id => id.to_string(),
        };
        if !deep.contains(&day) {
            assert!(got.contains_key(&key), "transaction {key} of {day} missing");
            assert_eq!(&without_meta(got[&key].last().unwrap()), &truth[&key]);
        }
    }
    let read_of_deep =
        got.len() - (truth.len() - deep.iter().map(|d| per_day[&d.to_string()]).sum::<usize>());
    assert!(
        read_of_deep >= deep.len() * MAX_OFFSET,
        "{read_of_deep} records of the deep days"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_pages_answered_500_keep_the_day_open_and_the_stream_going() {
    deep_pages_refused_with(500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_pages_answered_400_keep_the_day_open_and_the_stream_going() {
    deep_pages_refused_with(400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn midnight_during_a_sweep_never_prunes_the_days_it_still_reads() {
    use std::sync::atomic::AtomicI64;
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        c.transactions = 600;
        sim_days_ago(c, 14);
        c.latency_ms = 50;
    })
    .await;
    let prefix = common::unique_topic("midnight");
    let (poller, stats) = hand_poller(
        &sim,
        &broker,
        &prefix,
        |cfg| {
            cfg.streams.start_date = chrono::Utc::now().date_naive() - chrono::Duration::days(14);
            cfg.crm.page_size = 10;
            cfg.streams.reconcile_days = 2;
        },
        sweep_due(),
    )
    .await;
    // The sweep's first day, the one midnight leaves behind, holds transactions.
    let first = (chrono::Utc::now().date_naive() - chrono::Duration::days(2)).to_string();
    let on_first = sim
        .truth(Kind::Transactions)
        .iter()
        .filter(|t| {
            t["transactionDate"]
                .as_str()
                .is_some_and(|d| d.starts_with(&first))
        })
        .count();
    assert!(on_first >= 25, "only {on_first} transactions on {first}");
    // The poller's clock: the system clock plus an offset the test moves.
    let offset = Arc::new(AtomicI64::new(0));
    let clock_offset = offset.clone();
    let mut poller = poller.with_clock(Arc::new(move || {
        chrono::Utc::now() + chrono::Duration::seconds(clock_offset.load(Ordering::Relaxed))
    }));
    poller.cycle().await.unwrap();
    // The sweep starts at today - 2 and yields after its first page.
    poller
        .background(tokio::time::Instant::now() + Duration::from_millis(30))
        .await
        .unwrap();
    // It started: its read-ahead holds pages.
    let held = || sim.stats().pages.load(Ordering::Relaxed) - stats.pages.load(Ordering::Relaxed);
    wait_until("the sweep's read-ahead", Duration::from_secs(30), || {
        held() >= 1
    })
    .await;
    assert_eq!(stats.reconcile_sweeps.load(Ordering::Relaxed), 0);
    // Midnight passes: the sweep horizon moves a day on while the sweep still reads its
    // first day. A cycle saves its cursor (and prunes) meanwhile.
    offset.store(86_400, Ordering::Relaxed);
    poller.cycle().await.unwrap();
    poller
        .background(tokio::time::Instant::now() + Duration::from_secs(120))
        .await
        .unwrap();
    assert!(stats.reconcile_sweeps.load(Ordering::Relaxed) >= 1);
    let schemas = Schemas::load("com.ibstream").unwrap();
    let records = consume(
        &broker.bootstrap,
        &[format!("{prefix}.transactions")],
        1,
        Duration::from_secs(2),
    )
    .await;
    let events = group(&schemas, &prefix, &records);
    // Nothing changed: one event per transaction.
    let twice: Vec<&String> = events["transactions"]
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(
        twice.is_empty(),
        "{} transactions emitted again as new after midnight, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    assert_eq!(
        events["transactions"].len(),
        expected(&sim, "transactions").len()
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_totals_a_crm_capping_the_page_size_still_gives_every_record() {
    let broker = common::ApacheKafka::shared();
    // No `total`, and at most 10 records a page whatever `pageSize` asks (25): a short first
    // page is not the end of the window.
    let sim = common::start_sim(|c| {
        tiny(c);
        sim_days_ago(c, 30);
        c.omit_total = true;
        c.page_cap = 10;
    })
    .await;
    let prefix = common::unique_topic("nototal-cap");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let cfg = month_in_small_pages(&sim, &broker, &prefix, "nototal-cap-1");
    let run = start(cfg);
    run.wait_cycles(&HashMap::new(), &STREAMS, 2, Duration::from_secs(300))
        .await;
    for stream in STREAMS {
        assert_eq!(counter(&run, stream, |s| &s.open_windows), 0, "{stream}");
    }
    run.stop().await;
    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    assert_matches_truth(&sim, &events);
    sim.shutdown().await;
}

/// The simulator's records of `stream` as JSON text, by event key.
fn raw_truth(sim: &SimHandle, stream: &str) -> HashMap<String, String> {
    let id = |v: &Json| match v {
        Json::String(id) => id.clone(),
        id => id.to_string(),
    };
    let (kind, field) = match stream {
        "leads" => (Kind::Leads, "id"),
        "customers" => (Kind::Customers, "customerId"),
        "transactions" => (Kind::Transactions, "id"),
        "servers" => (Kind::Servers, "id"),
        _ => (Kind::Positions, "positionId"),
    };
    sim.truth(kind)
        .iter()
        .map(|j| {
            let key = match kind {
                Kind::Positions => format!("{}:{}", id(&j["serverTag"]), id(&j[field])),
                _ => id(&j[field]),
            };
            (key, j.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_totals_a_crm_ignoring_page_keeps_dense_days_open_and_loses_no_other_record() {
    let broker = common::ApacheKafka::shared();
    // No `total`, and every page is page 1: a window longer than a page (25) cannot be read
    // whole. About 50 transactions a day: those days stay open with their reason; every
    // record of a window that fits in one page arrives.
    let sim = common::start_sim(|c| {
        tiny(c);
        sim_days_ago(c, 30);
        c.omit_total = true;
        c.ignore_page = true;
    })
    .await;
    let prefix = common::unique_topic("nototal-nopage");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let mut cfg = month_in_small_pages(&sim, &broker, &prefix, "nototal-nopage-1");
    let http_port = common::free_port();
    cfg.http.listen = format!("127.0.0.1:{http_port}");
    let run = start(cfg);
    run.wait_cycles(&HashMap::new(), &STREAMS, 2, Duration::from_secs(300))
        .await;
    let status: Json = status_of(http_port).await;
    run.stop().await;
    let mut open_days: HashMap<String, Vec<String>> = HashMap::new();
    for poller in status["pollers"].as_array().unwrap() {
        // Positions' pollers are named by stream and server tag.
        let name = poller["name"].as_str().unwrap();
        let stream = STREAMS
            .iter()
            .find(|s| name.starts_with(**s))
            .unwrap()
            .to_string();
        for cursor in poller["cursors"].as_array().unwrap() {
            for window in cursor["openWindows"].as_array().unwrap() {
                let reason = window["reason"].as_str().unwrap_or_default();
                assert!(reason.contains("ignores the `page` parameter"), "{reason}");
                let day = window["day"].as_str().unwrap().to_owned();
                open_days.entry(stream.clone()).or_default().push(day);
            }
        }
    }
    assert!(
        open_days.contains_key("transactions"),
        "no transaction day kept open: {status:#}"
    );
    let records = consume(
        &broker.bootstrap,
        &data_topics(&prefix),
        1,
        Duration::from_secs(2),
    )
    .await;
    let events = group(&schemas, &prefix, &records);
    let mut lost = Vec::new();
    for stream in STREAMS {
        let truth = expected(&sim, stream);
        let raw = raw_truth(&sim, stream);
        let got = events.get(stream).cloned().unwrap_or_default();
        let open = open_days.get(stream).cloned().unwrap_or_default();
        for (key, value) in &truth {
            match got.get(key) {
                Some(events) => assert_eq!(&without_meta(events.last().unwrap()), value),
                // Missing: only a record of a day kept open may be.
                None if open.iter().any(|day| raw[key].contains(day.as_str())) => {}
                None => lost.push(format!("{stream} {key}")),
            }
        }
    }
    assert!(lost.is_empty(), "records lost silently: {lost:?}");
    sim.shutdown().await;
}
