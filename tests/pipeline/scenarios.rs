//! The scenarios of the pipeline issue, each on its own broker and simulator.

use super::*;
use common::ConfigFile;

/// Exactly-once (the default) on Apache Kafka, read back with read_committed: no record twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_then_changes_then_restart() {
    backfill_then_changes_then_restart_on(
        common::ApacheKafka::shared(),
        |c| {
            c.leads = 20_000;
            c.customers = 8_000;
            c.transactions = 50_000;
            c.positions = 100_000;
            c.servers = 3;
        },
        "bf",
    )
    .await;
}

/// The same at-least-once on tansu, a broker without transactions whose high watermarks come
/// late: the restart finds the end of the state topic with its barrier, not the watermark,
/// and emits nothing again. Smaller, as the point is the broker, not the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_then_changes_then_restart_at_least_once_on_tansu() {
    backfill_then_changes_then_restart_on(&common::Tansu::start(), small, "bf-tansu").await;
}

async fn backfill_then_changes_then_restart_on(
    broker: &impl common::Broker,
    sizes: fn(&mut ibstream::sim::SimConfig),
    name: &str,
) {
    let mut counts = ibstream::sim::SimConfig::default();
    sizes(&mut counts);
    let sim = common::start_sim(sizes).await;
    let prefix = common::unique_topic(name);
    let instance = format!("{name}-1");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let run = start(config(&sim, &broker, &prefix, &instance));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(600))
        .await;
    run.wait_cycles(&HashMap::new(), &["positions"], 3, Duration::from_secs(600))
        .await;

    // Backfill: every truth record is in its topic, once, and equal to the truth.
    let expected_count = truth_count(&sim);
    let records = consume(
        broker.bootstrap(),
        &data_topics(&prefix),
        expected_count,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        records.len(),
        expected_count,
        "no record twice, none missing"
    );
    let events = group(&schemas, &prefix, &records);
    assert_matches_truth(&sim, &events);
    for (stream, keys) in &events {
        for (key, versions) in keys {
            assert_eq!(versions.len(), 1, "{stream} {key} emitted twice");
            assert_eq!(meta_string(&versions[0], "op"), "CREATED");
        }
    }
    // Append-only streams keep fingerprints only inside the re-read horizon (the lookback and
    // the reconciliation sweep's `reconcile_days`, 30): the rest was pruned, with tombstones.
    // Mutable ones keep them all.
    let tracked = |s: &str| run.stats[s].tracked.load(Ordering::Relaxed);
    let today = chrono::Utc::now().date_naive();
    let horizon = (today - chrono::Duration::days(31))
        .format("%Y-%m-%d")
        .to_string();
    let recent = |kind: Kind, field: &str| {
        sim.truth(kind)
            .iter()
            .filter(|t| t["isFake"] != true)
            .filter(|t| t[field].as_str().unwrap()[..10] >= *horizon.as_str())
            .count() as u64
    };
    let recent_transactions = recent(Kind::Transactions, "transactionDate");
    assert!(
        tracked("transactions") <= recent_transactions,
        "{} tracked, {recent_transactions} recent",
        tracked("transactions")
    );
    let recent_positions = recent(Kind::Positions, "closeTime");
    assert!(
        tracked("positions") <= recent_positions && recent_positions < counts.positions as u64 / 2,
        "{} position fingerprints kept, {recent_positions} recent",
        tracked("positions")
    );
    assert_eq!(
        tracked("leads"),
        counts.leads as u64,
        "mutable streams keep every fingerprint"
    );
    // The demo server's positions are not read; the servers list includes it.
    assert_eq!(events["servers"].len(), counts.servers + 1);
    assert_eq!(events["positions"].len(), counts.positions);

    // Changes: exactly the changed keys get one new event each, with the right op.
    let changes = sim.mutate(500, None);
    let mut want: HashMap<(String, String), String> = HashMap::new();
    for change in &changes {
        let op = if change.op == "created" {
            "CREATED"
        } else {
            "UPDATED"
        };
        let entry = want
            .entry((change.stream.to_owned(), change.key.clone()))
            .or_insert_with(|| op.to_owned());
        if op == "CREATED" {
            *entry = op.to_owned();
        }
    }
    let before = run.cycles();
    run.wait_cycles(&before, &STREAMS, 2, Duration::from_secs(120))
        .await;
    run.wait_cycles(&before, &["positions"], 6, Duration::from_secs(120))
        .await;
    let all = consume(
        broker.bootstrap(),
        &data_topics(&prefix),
        expected_count + want.len(),
        Duration::from_secs(2),
    )
    .await;
    let old: HashSet<(String, i32, i64)> = records
        .iter()
        .map(|c| (c.topic.clone(), c.partition, c.offset))
        .collect();
    let new: Vec<&Consumed> = all
        .iter()
        .filter(|c| !old.contains(&(c.topic.clone(), c.partition, c.offset)))
        .collect();
    let mut got: HashMap<(String, String), String> = HashMap::new();
    for c in &new {
        let stream = c
            .topic
            .strip_prefix(&format!("{prefix}."))
            .unwrap()
            .to_owned();
        let value = decode(&schemas, event_type(&stream), &c.payload);
        let previous = got.insert((stream.clone(), c.key.clone()), meta_string(&value, "op"));
        assert!(
            previous.is_none(),
            "{stream} {} emitted twice after the changes",
            c.key
        );
    }
    assert_eq!(got, want, "the new events are exactly the changes");
    let events = group(&schemas, &prefix, &all);
    assert_matches_truth(&sim, &events);

    // Restart: the state is restored and nothing unchanged is emitted again.
    run.stop().await;
    let run = start(config(&sim, &broker, &prefix, &instance));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    run.wait_cycles(&HashMap::new(), &["positions"], 3, Duration::from_secs(300))
        .await;
    let emitted: u64 = run
        .stats
        .values()
        .map(|s| s.created.load(Ordering::Relaxed) + s.updated.load(Ordering::Relaxed))
        .sum();
    assert_eq!(emitted, 0, "a restart re-emitted unchanged records");
    run.stop().await;
    let after = consume(
        broker.bootstrap(),
        &data_topics(&prefix),
        all.len(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(after.len(), all.len());
    sim.shutdown().await;
}

fn small(c: &mut ibstream::sim::SimConfig) {
    c.leads = 1_500;
    c.customers = 600;
    c.transactions = 2_000;
    c.positions = 3_000;
    c.servers = 2;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_pages_and_live_changes_converge_to_the_truth() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        small(c);
        c.shuffle_pages = true;
        c.change_rate = 50.0;
    })
    .await;
    let prefix = common::unique_topic("shuffle");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let mut cfg = config(&sim, &broker, &prefix, "shuffle-1");
    cfg.crm.page_size = 100;
    let run = start(cfg);
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    // Catch-up: the CRM stands still, and two more full cycles read what moved.
    sim.pause_changes(true);
    let paused = run.cycles();
    run.wait_cycles(&paused, &STREAMS, 2, Duration::from_secs(300))
        .await;
    run.wait_cycles(&paused, &["positions"], 4, Duration::from_secs(300))
        .await;
    let drift: u64 = run
        .stats
        .values()
        .map(|s| s.drift_rereads.load(Ordering::Relaxed))
        .sum();
    assert!(
        drift > 0,
        "records never moved between pages: the scenario did not happen"
    );
    run.stop().await;
    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    assert_matches_truth(&sim, &events);
    // One event per real change, and no phantom UPDATED: a key has at most one event more
    // than the changes made to it (its first version), and no event repeats the one before.
    let mut changes: HashMap<(&str, String), usize> = HashMap::new();
    for change in sim.changes() {
        *changes.entry((change.stream, change.key)).or_default() += 1;
    }
    let mut updated = 0;
    for (stream, keys) in &events {
        for (key, versions) in keys {
            let made = changes
                .get(&(stream.as_str(), key.clone()))
                .copied()
                .unwrap_or(0);
            assert!(
                versions.len() <= made + 1,
                "{stream} {key}: {} events for {made} changes",
                versions.len()
            );
            for pair in versions.windows(2) {
                assert_ne!(
                    without_meta(&pair[0]),
                    without_meta(&pair[1]),
                    "{stream} {key}: a phantom UPDATED repeats the event before it (volatile fields aside)"
                );
                updated += 1;
            }
        }
    }
    assert!(
        updated > 0,
        "no record changed: the scenario did not happen"
    );
    // No eventId comes back after another (a stale page replayed, then mended), and in
    // exactly-once no event comes twice at all.
    assert_eq!(
        assert_duplicates_share_ids_and_no_phantom_update(&events),
        0
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_records_and_new_servers_are_picked_up() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(small).await;
    let prefix = common::unique_topic("late");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let run = start(config(&sim, &broker, &prefix, "late-1"));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    run.wait_cycles(&HashMap::new(), &["positions"], 2, Duration::from_secs(300))
        .await;

    // A transaction dated yesterday, booked now: found by the lookback.
    let late = sim.mutate(3, Some(ChangeKind::LateTransaction { days: 1 }));
    // A new live server with closed positions: its tag gets a poller.
    let server = sim.mutate(1, Some(ChangeKind::Server));
    let before = run.cycles();
    run.wait_cycles(&before, &STREAMS, 2, Duration::from_secs(120))
        .await;
    run.wait_cycles(&before, &["positions"], 5, Duration::from_secs(120))
        .await;
    let report = run.stop().await;
    assert!(report.stopped.is_empty(), "{:?}", report.stopped);

    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    for change in late.iter().chain(&server) {
        assert!(
            events[change.stream].contains_key(&change.key),
            "{} {} not emitted",
            change.stream,
            change.key
        );
    }
    assert_eq!(
        server
            .iter()
            .filter(|c| c.stream == "positions" && c.key.starts_with("mt4-live-03:"))
            .count(),
        3
    );
    assert_matches_truth(&sim, &events);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_positions_leave_the_other_streams_running() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        small(c);
        c.deny = vec!["positions".to_owned()];
    })
    .await;
    let prefix = common::unique_topic("deny");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let run = start(config(&sim, &broker, &prefix, "deny-1"));
    let others = ["leads", "customers", "transactions", "servers"];
    run.wait_cycles(&HashMap::new(), &others, 2, Duration::from_secs(300))
        .await;
    assert_eq!(run.cycles()["positions"], 0, "positions are denied (403)");
    assert!(!run.task.is_finished(), "the other streams go on");
    let report = run.stop().await;
    assert_eq!(report.stopped.len(), 1, "{:?}", report.stopped);
    assert_eq!(report.stopped[0].0, "positions");
    assert!(
        report.stopped[0].1.contains("platforms module"),
        "{}",
        report.stopped[0].1
    );

    let expected_others: usize = others.iter().map(|s| expected(&sim, s).len()).sum();
    let records = consume(
        &broker.bootstrap,
        &data_topics(&prefix),
        expected_others,
        Duration::from_secs(2),
    )
    .await;
    let events = group(&schemas, &prefix, &records);
    assert!(!events.contains_key("positions"));
    for stream in others {
        assert_eq!(
            events[stream].len(),
            expected(&sim, stream).len(),
            "{stream}"
        );
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_on_a_broker_without_transactions_is_a_clear_startup_error() {
    // On tansu: the point is a broker without transactions.
    let broker = common::Tansu::start();
    let sim = common::start_sim(small).await;
    let mut cfg = config(&sim, &broker, &common::unique_topic("eo"), "eo-tansu");
    cfg.kafka.delivery = Delivery::ExactlyOnce;
    cfg.kafka.batch_timeout_secs = 10;
    let run = start(cfg.clone());
    let result = tokio::time::timeout(Duration::from_secs(60), run.task)
        .await
        .unwrap()
        .unwrap();
    match result {
        Err(RunError::Startup(message)) => assert!(message.contains("at-least-once"), "{message}"),
        other => panic!("{other:?}"),
    }
    // Doing what the message says works: the refused start left no open transaction on the
    // state topic, so an at-least-once run restores it and runs.
    cfg.kafka.delivery = Delivery::AtLeastOnce;
    let run = start(cfg);
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(120))
        .await;
    run.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_state_topic_stops_every_start_until_a_rebuild_is_asked_for() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(small).await;
    let prefix = common::unique_topic("lost");
    let run = start(config(&sim, &broker, &prefix, "lost-1"));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    run.stop().await;
    let emitted = consume(
        &broker.bootstrap,
        &data_topics(&prefix),
        1,
        Duration::from_secs(2),
    )
    .await
    .len();

    // The same data topics with a new, empty state topic: the state was lost. The binary is
    // started as an orchestrator restarts a pod: every start refuses, whatever the refused
    // starts before it (barriers) or `state show` (its barrier) wrote to the state topic.
    let dir = tempfile::tempdir().unwrap();
    let path = ConfigFile::new(&sim.base_url(), &prefix, &broker.bootstrap)
        .set("kafka.delivery", delivery_toml(&broker))
        .set("kafka.instance_id", "lost-1")
        .set("kafka.batch_timeout_secs", 30)
        .set("kafka.state_topic", format!("{prefix}.state-after-loss"))
        .set("http.listen", "127.0.0.1:0")
        .fast_polls()
        .write(dir.path());
    let ibstream = |args: &'static [&'static str]| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ibstream"));
            command
                .arg("--config")
                .arg(&path)
                .args(args)
                .env("IBSTREAM_LOG", "warn")
                .stdin(std::process::Stdio::null());
            let mut child = command
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // A start that is not refused would run until stopped: bounded here.
            let deadline = Instant::now() + Duration::from_secs(90);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("`ibstream {}` did not end within 90 s", args.join(" "));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            child.wait_with_output().unwrap()
        })
    };
    let refused = |output: std::process::Output, attempt: &str| {
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(1), "{attempt}: {stderr}");
        assert!(stderr.contains("--rebuild-state"), "{attempt}: {stderr}");
        assert!(stderr.contains("state-after-loss"), "{attempt}: {stderr}");
    };
    refused(ibstream(&["run"]).await.unwrap(), "first start");
    refused(ibstream(&["run"]).await.unwrap(), "second start");
    let shown = ibstream(&["state", "show"]).await.unwrap();
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    refused(ibstream(&["run"]).await.unwrap(), "start after state show");
    let after = consume(
        &broker.bootstrap,
        &data_topics(&prefix),
        emitted,
        Duration::from_secs(2),
    )
    .await
    .len();
    assert_eq!(after, emitted, "nothing may be emitted by a refused start");

    // Asked for on purpose, the rebuild runs (and emits everything again)…
    let lost = ibstream::config::Config::load(Some(&path)).unwrap();
    let stats: ibstream::run::Stats = STREAMS
        .into_iter()
        .map(|s| (s, Default::default()))
        .collect();
    let cancel = CancellationToken::new();
    let options = ibstream::run::RunOptions {
        rebuild_state: true,
        ..Default::default()
    };
    let rebuild = Running {
        cancel: cancel.clone(),
        stats: stats.clone(),
        task: tokio::spawn({
            let lost = lost.clone();
            async move { ibstream::run::run_with(lost, cancel, stats, &options).await }
        }),
    };
    rebuild
        .wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    rebuild.stop().await;
    let rebuilt = consume(
        &broker.bootstrap,
        &data_topics(&prefix),
        emitted * 2,
        Duration::from_secs(2),
    )
    .await
    .len();
    assert_eq!(rebuilt, emitted * 2, "the rebuild emits every record once");

    // …and the restarts after it, without the flag, go on from its state: not refused, and
    // nothing is emitted a third time.
    let restarted = start(lost);
    restarted
        .wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    restarted.stop().await;
    let last = consume(
        &broker.bootstrap,
        &data_topics(&prefix),
        rebuilt,
        Duration::from_secs(2),
    )
    .await
    .len();
    assert_eq!(
        last, rebuilt,
        "a restart after the rebuild emits nothing again"
    );
    sim.shutdown().await;
}

/// Instances that split the streams share a state topic (one process per group of streams,
/// each with its own `instance_id`). B's own state was lost (B ran transactions with a
/// state topic of its own, then was pointed at the shared one): A's progress on leads says
/// nothing of B's transactions, and B's start is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_state_of_one_instance_on_a_shared_state_topic_refuses_its_start() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(small).await;
    let prefix = common::unique_topic("shared");
    let only = |instance: &str, stream: &str, state_topic: &str| {
        let mut cfg = config(&sim, &broker, &prefix, instance);
        let streams = &mut cfg.streams;
        for (name, settings) in [
            ("leads", &mut streams.leads),
            ("customers", &mut streams.customers),
            ("transactions", &mut streams.transactions),
            ("servers", &mut streams.servers),
            ("positions", &mut streams.positions),
        ] {
            settings.enabled = name == stream;
        }
        cfg.kafka.state_topic = Some(format!("{prefix}.{state_topic}"));
        cfg
    };
    let b = start(only("shared-b", "transactions", "state-b"));
    b.wait_cycles(
        &HashMap::new(),
        &["transactions"],
        1,
        Duration::from_secs(300),
    )
    .await;
    b.stop().await;
    let a = start(only("shared-a", "leads", "state-shared"));
    a.wait_cycles(&HashMap::new(), &["leads"], 1, Duration::from_secs(300))
        .await;
    a.stop().await;
    let transactions_topic = format!("{prefix}.transactions");
    let emitted = consume(
        &broker.bootstrap,
        std::slice::from_ref(&transactions_topic),
        1,
        Duration::from_secs(2),
    )
    .await
    .len();
    assert!(emitted > 0, "B emitted no transaction");

    // B pointed at the shared state topic: refused, naming its stream, topic and the flag.
    let b = start(only("shared-b", "transactions", "state-shared"));
    let cancel = b.cancel.clone();
    let outcome = tokio::time::timeout(Duration::from_secs(90), b.task).await;
    cancel.cancel();
    match outcome {
        Ok(Ok(Err(RunError::Startup(message)))) => {
            for part in [
                "stream transactions",
                transactions_topic.as_str(),
                "state-shared",
                "--rebuild-state",
            ] {
                assert!(message.contains(part), "{part}: {message}");
            }
        }
        Ok(other) => panic!("B's start on a lost state was not refused: {other:?}"),
        Err(_) => panic!("B started on a lost state (still running after 90 s)"),
    }
    let after = consume(
        &broker.bootstrap,
        std::slice::from_ref(&transactions_topic),
        emitted,
        Duration::from_secs(2),
    )
    .await
    .len();
    assert_eq!(after, emitted, "nothing may be emitted by a refused start");

    // A's own progress still lets A start on the shared topic.
    let a = start(only("shared-a", "leads", "state-shared"));
    a.wait_cycles(&HashMap::new(), &["leads"], 1, Duration::from_secs(300))
        .await;
    a.stop().await;
    sim.shutdown().await;
}

/// A configuration file for `ibstream run` on `bootstrap` (a broker, or a gate in front of
/// one) with the delivery `broker` gets and instance id `<prefix>-1`.
fn write_config(
    dir: &std::path::Path,
    sim: &SimHandle,
    broker: &impl common::Broker,
    bootstrap: &str,
    prefix: &str,
) -> std::path::PathBuf {
    ConfigFile::new(&sim.base_url(), prefix, bootstrap)
        .set("crm.page_size", 500)
        .set("kafka.delivery", delivery_toml(broker))
        .set("kafka.instance_id", format!("{prefix}-1"))
        .set("http.listen", "127.0.0.1:0")
        // Small, so windows are split in halves while the process is killed and restarted.
        .set("streams.max_window_records", 100)
        .fast_polls()
        .write(dir)
}

fn spawn_run(config: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_ibstream"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .env("IBSTREAM_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_backfill_loses_nothing_and_duplicates_share_event_ids() {
    // On tansu, at-least-once: the duplicates a kill leaves between a batch's acknowledged
    // events and its state records are at-least-once's, on a broker without transactions
    // whose late high watermarks the restart's barrier must not trust. (Kills in exactly-once
    // on Apache Kafka are the fault suite's.)
    // Clients reach the broker through a gate that can hold the state records back.
    let gate_addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let tansu = common::Tansu::start_advertising(Some(gate_addr));
    let gate = common::KafkaGate::start(gate_addr, &tansu.bootstrap).await;
    let bootstrap = gate_addr.to_string();
    let sim = common::start_sim(|c| {
        c.leads = 4_000;
        c.customers = 1_500;
        c.transactions = 8_000;
        c.positions = 20_000;
        c.servers = 2;
        c.latency_ms = 15;
    })
    .await;
    let prefix = common::unique_topic("kill");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sim, &tansu, &bootstrap, &prefix);
    let total = truth_count(&sim);

    // Four kills -9 at random points of the backfill. Before kills 1 and 3 the gate holds
    // the next state records back, so those kills land between a batch's acknowledged events
    // and its state – the restart must emit those events again, under the same eventIds.
    let schemas = Schemas::load("com.ibstream").unwrap();
    let mut seen = 0;
    for kill in 1..=4 {
        let mut child = spawn_run(&config);
        let partial = consume(
            &bootstrap,
            &data_topics(&prefix),
            seen + 1_500 + fastrand::usize(..1_500),
            Duration::ZERO,
        )
        .await;
        if kill % 2 == 1 {
            gate.hold_produce_to(&format!("{prefix}._ibstream_state"));
            let deadline = Instant::now() + Duration::from_secs(30);
            while !gate.held() {
                assert!(Instant::now() < deadline, "no state record within 30 s");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        gate.open();
        let at_kill = consume(
            &bootstrap,
            &data_topics(&prefix),
            partial.len(),
            Duration::from_secs(1),
        )
        .await;
        assert!(
            at_kill.len() < total,
            "the backfill ended before kill {kill} ({} of {total})",
            at_kill.len()
        );
        seen = at_kill.len();
    }

    let mut child = spawn_run(&config);
    let deadline = Instant::now() + Duration::from_secs(300);
    let events = loop {
        let records = consume(
            &bootstrap,
            &data_topics(&prefix),
            total.min(seen + 1),
            Duration::from_secs(2),
        )
        .await;
        let events = group(&schemas, &prefix, &records);
        let covered: usize = events.values().map(HashMap::len).sum();
        if covered >= total {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "only {covered} of {total} keys after the restart"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // SIGTERM: the process commits or drops its batch, flushes, exits 0 within 10 s.
    let stopped = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(stopped.elapsed() < Duration::from_secs(10));

    assert_matches_truth(&sim, &events);
    let mut duplicates = 0;
    for (stream, keys) in &events {
        for (key, versions) in keys {
            let ids: HashSet<String> = versions.iter().map(|v| meta_string(v, "eventId")).collect();
            assert_eq!(
                ids.len(),
                1,
                "{stream} {key}: duplicates with different eventIds"
            );
            duplicates += versions.len() - 1;
        }
    }
    assert!(duplicates > 0, "no duplicate: the scenario did not happen");
    eprintln!("{duplicates} duplicate events after kill -9, each with its twin's eventId");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_costs_one_request_per_query() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(small).await;
    let prefix = common::unique_topic("steady");
    let run = start(config(&sim, &broker, &prefix, "steady-1"));
    run.wait_cycles(&HashMap::new(), &STREAMS, 2, Duration::from_secs(300))
        .await;
    run.wait_cycles(&HashMap::new(), &["positions"], 4, Duration::from_secs(300))
        .await;
    let pages = |run: &Running| -> HashMap<&'static str, u64> {
        run.stats
            .iter()
            .map(|(k, v)| (*k, v.pages.load(Ordering::Relaxed)))
            .collect()
    };
    let (cycles_before, pages_before) = (run.cycles(), pages(&run));
    run.wait_cycles(&cycles_before, &STREAMS, 3, Duration::from_secs(60))
        .await;
    // Read both counters of a stream together, between its cycles.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (stream, per_cycle) in [
        ("leads", 2),
        ("customers", 2),
        ("transactions", 1),
        ("servers", 1),
        ("positions", 1),
    ] {
        loop {
            let (cycles, pages) = (run.cycles()[stream], pages(&run)[stream]);
            let done = cycles - cycles_before[stream];
            let read = pages - pages_before[stream];
            if read == done * per_cycle {
                break;
            }
            assert!(
                read <= (done + 1) * per_cycle,
                "{stream}: {read} requests in {done} cycles (want {per_cycle} per cycle)"
            );
            assert!(
                Instant::now() < deadline,
                "{stream}: {read} requests in {done} cycles (want {per_cycle} per cycle)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let emitted: u64 = run
        .stats
        .values()
        .map(|s| s.updated.load(Ordering::Relaxed))
        .sum();
    assert_eq!(emitted, 0);
    run.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_go_to_the_dead_letter_topic_once() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        small(c);
        c.malformed_rate = 0.03;
    })
    .await;
    let prefix = common::unique_topic("dlq");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let run = start(config(&sim, &broker, &prefix, "dlq-1"));
    run.wait_cycles(&HashMap::new(), &STREAMS, 3, Duration::from_secs(300))
        .await;
    run.wait_cycles(&HashMap::new(), &["positions"], 6, Duration::from_secs(300))
        .await;
    run.stop().await;

    // Every malformed truth record, once, in <prefix>.dlq; everything else in its topic.
    let malformed = malformed_truth(&sim).len();
    assert!(malformed > 50, "{malformed}");
    let letters = consume(
        &broker.bootstrap,
        &[format!("{prefix}.dlq")],
        malformed,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        letters.len(),
        malformed,
        "one dead letter per malformed record, re-reads add none"
    );
    for letter in &letters {
        let value: Json = serde_json::from_slice(&letter.payload).unwrap();
        assert!(value["raw"].is_object(), "{value}");
        assert!(
            value["error"].as_str().unwrap().contains('`'),
            "the error names the field: {value}"
        );
        assert!(STREAMS.contains(&value["stream"].as_str().unwrap()));
        assert!(value["fetchedAt"].is_string());
    }
    assert_matches_truth(&sim, &read_events(&broker, &sim, &schemas, &prefix).await);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_server_stops_being_polled_and_resumes_from_its_cursor() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(small).await;
    let prefix = common::unique_topic("gone");
    let run = start(config(&sim, &broker, &prefix, "gone-1"));
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    run.wait_cycles(&HashMap::new(), &["positions"], 2, Duration::from_secs(300))
        .await;
    let backfill_pages = sim.stats().position_pages("mt5-live-02");
    assert!(backfill_pages > 5, "{backfill_pages}");

    let removed = sim.mutate(1, Some(ChangeKind::RemoveServer));
    assert_eq!(removed[0].key, "mt5-live-02");
    let before = run.cycles();
    run.wait_cycles(&before, &["servers"], 2, Duration::from_secs(60))
        .await;
    run.wait_cycles(&before, &["positions"], 2, Duration::from_secs(60))
        .await;
    let stopped_at = sim.stats().position_pages("mt5-live-02");
    let other_at = sim.stats().position_pages("mt4-live-01");
    let before = run.cycles();
    run.wait_cycles(&before, &["positions"], 3, Duration::from_secs(60))
        .await;
    assert_eq!(
        sim.stats().position_pages("mt5-live-02"),
        stopped_at,
        "a removed server is still polled"
    );
    assert!(
        sim.stats().position_pages("mt4-live-01") >= other_at + 3,
        "the other server stopped too"
    );

    // Listed again: polling resumes from the kept cursor (no second backfill), and nothing
    // already emitted is emitted again.
    let emitted = run.stats["positions"].created.load(Ordering::Relaxed);
    sim.mutate(1, Some(ChangeKind::RestoreServer));
    let before = run.cycles();
    run.wait_cycles(&before, &["servers"], 2, Duration::from_secs(60))
        .await;
    run.wait_cycles(&before, &["positions"], 4, Duration::from_secs(60))
        .await;
    let resumed = sim.stats().position_pages("mt5-live-02") - stopped_at;
    assert!(resumed >= 1, "not polled again");
    assert!(
        resumed < backfill_pages / 2,
        "{resumed} pages after the restore: the backfill started over"
    );
    assert_eq!(
        run.stats["positions"].created.load(Ordering::Relaxed),
        emitted
    );
    run.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_servers_stop_positions_with_a_reason() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        small(c);
        c.deny = vec!["servers".to_owned()];
    })
    .await;
    let run = start(config(
        &sim,
        &broker,
        &common::unique_topic("noservers"),
        "noservers-1",
    ));
    run.wait_cycles(
        &HashMap::new(),
        &["leads", "customers", "transactions"],
        1,
        Duration::from_secs(300),
    )
    .await;
    let report = run.stop().await;
    let mut stopped: Vec<&str> = report.stopped.iter().map(|(s, _)| s.as_str()).collect();
    stopped.sort();
    assert_eq!(
        stopped,
        vec!["positions", "servers"],
        "{:?}",
        report.stopped
    );
    let servers = &report
        .stopped
        .iter()
        .find(|(s, _)| s == "servers")
        .unwrap()
        .1;
    assert!(servers.contains("platforms module"), "{servers}");
    let positions = &report
        .stopped
        .iter()
        .find(|(s, _)| s == "positions")
        .unwrap()
        .1;
    assert!(positions.contains("servers list"), "{positions}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_denied_after_the_servers_list_ended_stop_the_run() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(small).await;
    let mut cfg = config(
        &sim,
        &broker,
        &common::unique_topic("lasttags"),
        "lasttags-1",
    );
    for stream in [
        &mut cfg.streams.leads,
        &mut cfg.streams.customers,
        &mut cfg.streams.transactions,
    ] {
        stream.enabled = false;
    }
    let run = start(cfg);
    run.wait_cycles(
        &HashMap::new(),
        &["servers", "positions"],
        1,
        Duration::from_secs(300),
    )
    .await;
    // The servers list ends (403) while the tags run; then the tags are denied too.
    sim.deny(Kind::Servers, true);
    let forbidden = || sim.stats().forbidden.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while forbidden() == 0 {
        assert!(Instant::now() < deadline, "no 403 within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A 403 is asked once more after a new login (an expired token can answer 403): let
    // that settle for a tags cycle, then the tags go on for six more cycles (1 s each) in
    // which a live servers loop would have called again: no new 403 means it ended.
    run.wait_cycles(&run.cycles(), &["positions"], 1, Duration::from_secs(60))
        .await;
    let denied = forbidden();
    run.wait_cycles(&run.cycles(), &["positions"], 6, Duration::from_secs(60))
        .await;
    assert_eq!(forbidden(), denied, "the servers loop still calls");
    sim.deny(Kind::Positions, true);
    // Nothing runs any more: `run` ends by itself, reporting both (a non-zero exit).
    let report = tokio::time::timeout(Duration::from_secs(60), run.task)
        .await
        .expect("run ends by itself once servers and positions are denied")
        .unwrap()
        .expect("run ends without a fatal error");
    let mut stopped: Vec<&str> = report.stopped.iter().map(|(s, _)| s.as_str()).collect();
    stopped.sort();
    assert_eq!(
        stopped,
        vec!["positions", "servers"],
        "{:?}",
        report.stopped
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_run_draws_a_progress_bar_per_poller() {
    let broker = common::ApacheKafka::shared();
    // Slow pages: the backfill takes a few seconds, long enough to draw its bars.
    let sim = common::start_sim(|c| {
        small(c);
        c.latency_ms = 10;
    })
    .await;
    let prefix = common::unique_topic("tty");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sim, &broker, &broker.bootstrap, &prefix);
    let log = dir.path().join("terminal.log");
    // `script` gives the process a pseudo-terminal and records what it draws.
    let command = format!(
        "IBSTREAM_LOG=warn timeout -s TERM 20 {} --config {} run",
        env!("CARGO_BIN_EXE_ibstream"),
        config.display()
    );
    let recorded = log.clone();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("script")
            .args(["-qfec", &command])
            .arg(&recorded)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("script (util-linux) runs")
    })
    .await
    .unwrap();
    let drawn = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    for poller in [
        "leads",
        "customers",
        "transactions",
        "positions[mt4-live-01]",
    ] {
        assert!(drawn.contains(poller), "no bar for {poller}: {drawn}");
    }
    assert!(drawn.contains(" days"), "{drawn}");
    assert!(
        drawn.contains("records/s"),
        "no rate while backfilling: {drawn}"
    );
    assert!(drawn.contains("caught up"), "{drawn}");
    assert!(drawn.contains("[="), "no bar drawn: {drawn}");
    sim.shutdown().await;
}
