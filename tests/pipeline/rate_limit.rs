//! Backfill at the CRM's rate limit (issue 18): windows read at once and completing out of
//! order, the adaptive concurrency under a 429 storm, and the steady state of one stream
//! kept on time while another backfills. A part of the fault suite (its `World` and
//! `Process`: the `ibstream` binary as a real process, killed with SIGKILL where asked), each
//! on an Apache Kafka of its own in exactly-once, whatever `FAULTS_DELIVERY` says.

use super::*;
use chrono::NaiveDate;

impl World {
    /// Makes the runs spawned after use `kafka.delivery = "exactly-once"`.
    fn exactly_once(&self) {
        let toml = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(
            &self.config,
            toml.replace(
                "delivery = \"at-least-once\"",
                "delivery = \"exactly-once\"",
            ),
        )
        .unwrap();
    }
}

impl Process {
    /// `/status`, waiting for it (up to 30 s) if the operations server is not up yet.
    async fn status(&self) -> Json {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, status)) = self.get("/status").await {
                return status;
            }
            assert!(Instant::now() < deadline, "no /status; see {:?}", self.log);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of a gauge or counter without labels on `/metrics`, if present.
    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::Client::new()
            .get(format!("http://{}/metrics", self.http))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|line| line.split([' ', '{']).next() == Some(name))
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|value| value.parse().ok())
    }
}

/// CREATED events of `stream` committed by a run (`/status` counts).
fn created(status: &Json, stream: &str) -> u64 {
    status["counts"][stream]["created"].as_u64().unwrap_or(0)
}

/// The poller of `name` in a `/status` document.
fn poller<'a>(status: &'a Json, name: &str) -> &'a Json {
    status["pollers"]
        .as_array()
        .and_then(|pollers| pollers.iter().find(|p| p["name"] == name))
        .unwrap_or(&Json::Null)
}

/// The first backfill window of the transactions (`streams.start_date` 2024-01-01, windows
/// of 31 days) is held back by the simulator while the later ones are read and committed;
/// then the process is killed with SIGKILL. The cursor must not have moved past the held
/// window, and the run after the kill must emit exactly the held window's records: the
/// windows completed beyond the cursor are recognised by their fingerprints (nothing emitted
/// twice under a new eventId), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_completing_out_of_order_then_kill_9_lose_nothing_and_emit_nothing_twice() {
    let _timer = timer("out-of-order windows, kill -9");
    let kafka = common::ApacheKafka::start();
    let sim = common::start_sim(|c| {
        small(c);
        c.latency_ms = 5;
    })
    .await;
    let held = NaiveDate::from_ymd_opt(2024, 1, 1).unwrap();
    sim.hold_window(Kind::Transactions, held);
    let world = World::new(
        &sim,
        &kafka.bootstrap,
        "rate-order",
        "requests_per_second = 1000\nmax_concurrent_requests = 8",
    );
    world.exactly_once();
    let transactions = expected(&sim, "transactions").len() as u64;
    let in_held = sim
        .truth(Kind::Transactions)
        .iter()
        .filter(|t| t["isFake"] == false)
        .filter(|t| {
            t["transactionDate"]
                .as_str()
                .is_some_and(|d| d.starts_with("2024-01"))
        })
        .count() as u64;
    assert!(
        in_held > 0 && in_held < transactions,
        "the held window holds {in_held} of {transactions} transactions"
    );

    let first = world.spawn(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = first.status().await;
        if sim.held_calls() > 0 && created(&status, "transactions") >= transactions - in_held {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the windows after the held one were not read within 120 s: {} of {} transactions created, {} calls held; see {:?}",
            created(&status, "transactions"),
            transactions - in_held,
            sim.held_calls(),
            first.log
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let before_kill = created(&status, "transactions");
    let cursor = &poller(&status, "transactions")["cursors"][0];
    assert!(
        cursor["watermark"].is_null()
            && (cursor["backfillNext"].is_null() || cursor["backfillNext"] == "2024-01-01"),
        "the cursor moved past the window still held: {cursor}"
    );
    first.kill_9();
    sim.release_window();

    let second = world.spawn(1);
    second
        .wait_for_phase("steady", Duration::from_secs(180))
        .await;
    let (records, _) = world.final_check_records(&sim, true).await;
    let events = group(&world.schemas, &world.prefix, &records);
    let repeated = repeated_event_ids(&events);
    assert!(
        repeated.is_empty(),
        "exactly-once: event ids seen more than once (stream, key, eventId, times): {:?}",
        &repeated[..repeated.len().min(10)]
    );
    let emitted_after = created(&second.status().await, "transactions");
    assert_eq!(
        emitted_after, in_held,
        "the run after the kill emitted {emitted_after} transactions: only the {in_held} of the held window were owed"
    );
    let (status, took) = second.terminate();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    eprintln!(
        "faults: out-of-order windows (Apache Kafka, exactly-once): {before_kill} of {transactions} transactions committed beyond the held window before kill -9, {emitted_after} emitted after it (the held window's {in_held}), {} events read_committed, 0 lost, 0 eventIds twice",
        records.len()
    );
    sim.shutdown().await;
}

/// The simulator answers the first 24 data calls with 429 (`Retry-After: 1`) while the run
/// has 16 requests in flight: the concurrency limit (`ibstream_crm_concurrency_limit`) must
/// come down, and the run must still end with the truth, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_lowers_the_concurrency_and_the_run_still_completes_exactly() {
    let _timer = timer("429 storm");
    let kafka = common::ApacheKafka::start();
    let sim = common::start_sim(|c| {
        small(c);
        c.latency_ms = 20;
    })
    .await;
    sim.rate_limit_data_next(24, "1");
    let world = World::new(
        &sim,
        &kafka.bootstrap,
        "rate-storm",
        "requests_per_second = 1000\nmax_concurrent_requests = 16",
    );
    world.exactly_once();
    let process = world.spawn(0);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut lowest = f64::MAX;
    let mut in_flight_seen = 0.0f64;
    while process.phase().await != "steady" {
        if let Some(limit) = process.metric("ibstream_crm_concurrency_limit").await {
            lowest = lowest.min(limit);
        }
        if let Some(n) = process.metric("ibstream_crm_requests_in_flight").await {
            in_flight_seen = in_flight_seen.max(n);
        }
        assert!(
            Instant::now() < deadline,
            "no steady state within 180 s; see {:?}",
            process.log
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.stats().rate_limited.load(Ordering::Relaxed), 24);
    assert!(
        lowest <= 4.0,
        "the concurrency limit came down only to {lowest} of 16 under 24 answers 429"
    );
    assert!(in_flight_seen >= 1.0, "no request in flight ever seen");
    let (records, _) = world.final_check_records(&sim, true).await;
    let events = group(&world.schemas, &world.prefix, &records);
    let repeated = repeated_event_ids(&events);
    assert!(
        repeated.is_empty(),
        "exactly-once: event ids seen more than once: {:?}",
        &repeated[..repeated.len().min(10)]
    );
    let recovered = process
        .metric("ibstream_crm_concurrency_limit")
        .await
        .unwrap_or(0.0);
    let (status, _) = process.terminate();
    assert!(status.success(), "{status:?}");
    eprintln!(
        "faults: 429 storm (Apache Kafka, exactly-once): 24 answers 429, concurrency limit 16 → {lowest} (→ {recovered} by the steady state), at most {in_flight_seen} requests in flight seen, {} events read_committed, 0 lost, 0 eventIds twice",
        records.len()
    );
    sim.shutdown().await;
}

/// Positions on 3 servers (90,000 in the last 60 days: hundreds of pages) backfill at the
/// CRM's rate (20 requests a second, 32 at once) while leads are in their steady state,
/// polled every 2 s: a new lead must reach the leads counts within two poll intervals (its
/// own and at most one of delay), while the positions backfill still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_never_delays_another_streams_steady_state_by_more_than_a_poll_interval() {
    let _timer = timer("fairness");
    let kafka = common::ApacheKafka::start();
    let sim = common::start_sim(|c| {
        c.leads = 200;
        c.customers = 80;
        c.transactions = 200;
        c.positions = 90_000;
        c.servers = 3;
        c.latency_ms = 50;
        // Two windows per cursor: the leads are through their backfill in seconds, the
        // positions' dense windows (hundreds of pages) take tens of seconds at the rate.
        c.start_date = chrono::Utc::now().date_naive() - chrono::Duration::days(60);
    })
    .await;
    let start_date = chrono::Utc::now().date_naive() - chrono::Duration::days(60);
    let world = World::new(
        &sim,
        &kafka.bootstrap,
        "rate-fair",
        // 16 pages of a window asked for ahead: about a hundred of the backfill's requests
        // wait for their turn at any time, five seconds of the rate.
        "requests_per_second = 20\nmax_concurrent_requests = 32\nread_ahead_pages = 16",
    );
    let interval = Duration::from_secs(2);
    world.reconfigure(|c| {
        c.set("streams.leads.poll_interval_secs", 2)
            // Positions' windows are read whole, not split (more windows at once).
            .set("streams.max_window_records", 50_000)
            .set("streams.start_date", start_date.to_string())
    });
    let process = world.spawn(0);
    // Leads through their backfill, positions still in theirs.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let status = process.status().await;
        let leads = poller(&status, "leads");
        if leads["backfillProgress"].as_f64() == Some(1.0) && !leads["lastSuccess"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leads not through their backfill within 180 s; see {:?}",
            process.log
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut delays = Vec::new();
    for _ in 0..3 {
        let before = created(&process.status().await, "leads");
        let made = Instant::now();
        sim.mutate(1, Some(ChangeKind::NewLead));
        loop {
            let status = process.status().await;
            if created(&status, "leads") > before {
                break;
            }
            assert!(
                made.elapsed() < Duration::from_secs(60),
                "a new lead not emitted within 60 s; see {:?}",
                process.log
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        delays.push(made.elapsed());
    }
    let status = process.status().await;
    let backfilling: Vec<&Json> = status["pollers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["stream"] == "positions" && p["backfillProgress"].as_f64() < Some(1.0))
        .collect();
    assert!(
        !backfilling.is_empty(),
        "the positions backfill ended before the leads were measured: the test proved nothing (more positions needed)"
    );
    let in_flight = process.metric("ibstream_crm_requests_in_flight").await;
    let (exit, _) = process.terminate();
    assert!(exit.success(), "{exit:?}");
    let worst = delays.iter().max().copied().unwrap_or_default();
    eprintln!(
        "faults: fairness: new leads emitted after {delays:?} (poll interval {interval:?}) while {} positions pollers backfilled at 20 requests/s ({in_flight:?} requests in flight at the end)",
        backfilling.len()
    );
    assert!(
        worst <= 2 * interval,
        "a new lead took {worst:?} to be emitted while positions backfilled: more than two poll intervals ({interval:?} each)"
    );
    sim.shutdown().await;
}
