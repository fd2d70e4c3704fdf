//! The operations endpoints of a running `ibstream run`: `/metrics` read by an independent
//! Prometheus parser and checked against what the topics hold, readiness following the CRM,
//! and `/status`.

use super::*;

#[derive(Debug, serde::Deserialize)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Scrapes `/metrics` and parses it with prometheus_client's parser (Python).
async fn scrape(base: &str) -> Vec<Sample> {
    use std::io::Write;
    let (status, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    let mut child = std::process::Command::new(common::interop_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/interop/parse_metrics.py"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python with prometheus_client (./scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "prometheus_client could not parse /metrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_status_and_readiness_tell_what_the_process_does() {
    let broker = common::ApacheKafka::shared();
    let sim_port = common::free_port();
    let sim_config = |c: &mut ibstream::sim::SimConfig| {
        c.listen = format!("127.0.0.1:{sim_port}").parse().unwrap();
        c.leads = 300;
        c.customers = 120;
        c.transactions = 800;
        c.positions = 900;
        c.servers = 2;
    };
    let sim = common::start_sim(sim_config).await;
    let prefix = common::unique_topic("ops");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let mut cfg = config(&sim, &broker, &prefix, "ops-1");
    let http_port = common::free_port();
    cfg.http.listen = format!("127.0.0.1:{http_port}");
    cfg.crm.max_retries = 1;
    let base = format!("http://127.0.0.1:{http_port}");
    let run = start(cfg);
    run.wait_cycles(&HashMap::new(), &STREAMS, 2, Duration::from_secs(300))
        .await;
    run.wait_cycles(&HashMap::new(), &["positions"], 4, Duration::from_secs(300))
        .await;

    assert_eq!(get(&format!("{base}/health/live")).await.0, 200);
    let (status, body) = get(&format!("{base}/health/ready")).await;
    assert_eq!(status, 200, "{body}");

    // The counters equal what the topics hold: every event was consumed from Kafka.
    let events = read_events(&broker, &sim, &schemas, &prefix).await;
    let served_before = sim.stats().requests.load(Ordering::Relaxed);
    let samples = scrape(&base).await;
    let served_after = sim.stats().requests.load(Ordering::Relaxed);
    for stream in STREAMS {
        let created = value(
            &samples,
            "ibstream_events_total",
            &[("stream", stream), ("op", "CREATED")],
        );
        assert_eq!(
            created,
            Some(events[stream].len() as f64),
            "{stream}: CREATED events counted vs. keys in the topic"
        );
        assert_eq!(
            value(
                &samples,
                "ibstream_events_total",
                &[("stream", stream), ("op", "UPDATED")]
            ),
            Some(0.0)
        );
        assert!(
            value(
                &samples,
                "ibstream_records_fetched_total",
                &[("stream", stream)]
            )
            .unwrap()
                >= events[stream].len() as f64
        );
    }
    // Steady state: every poller read everything up to its last cycle's start.
    let lags: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "ibstream_stream_lag_seconds")
        .collect();
    assert!(lags.len() >= 4 + 2, "{lags:?}");
    for lag in &lags {
        assert!(
            lag.value < 1.0 + 900.0 && lag.value >= 0.0,
            "lag above poll_interval + closing_lag: {lag:?}"
        );
        assert_eq!(
            lag.labels.contains_key("server_tag"),
            lag.labels["stream"] == "positions"
        );
    }
    for progress in samples
        .iter()
        .filter(|s| s.name == "ibstream_backfill_progress_ratio")
    {
        assert_eq!(progress.value, 1.0, "{progress:?}");
    }
    let requests: f64 = samples
        .iter()
        .filter(|s| s.name == "ibstream_crm_requests_total")
        .map(|s| s.value)
        .sum();
    // The pollers go on between the two readings of the simulator's counter; a request in
    // flight is counted by the simulator first (a handful at most: one per poller).
    assert!(
        served_before.saturating_sub(8) <= requests as u64 && requests as u64 <= served_after,
        "CRM requests counted {requests} vs. served {served_before}..{served_after}"
    );
    assert_eq!(value(&samples, "ibstream_crm_logins_total", &[]), Some(1.0));
    assert!(value(&samples, "ibstream_sink_batches_total", &[]).unwrap() > 0.0);
    let state_records = value(&samples, "ibstream_sink_state_records_total", &[]).unwrap();
    let state_bytes = value(&samples, "ibstream_sink_state_bytes_total", &[]).unwrap();
    assert!(state_records > 0.0 && state_bytes > state_records * 10.0);
    assert!(value(&samples, "ibstream_sink_bytes_total", &[]).unwrap() > state_bytes);
    assert!(samples
        .iter()
        .any(|s| s.name == "ibstream_sink_batch_duration_seconds_bucket"));
    assert!(samples
        .iter()
        .any(|s| s.name == "ibstream_crm_request_duration_seconds_count"
            && s.labels["endpoint"] == "leads"));
    assert!(value(&samples, "ibstream_state_restore_duration_seconds", &[]).is_some());
    assert_eq!(
        value(
            &samples,
            "ibstream_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "ibstream_tracked_entities",
            &[("stream", "leads")]
        ),
        Some(300.0)
    );

    // /status: one entry per poller with its cursors, and the counts.
    let (status, body) = get(&format!("{base}/status")).await;
    assert_eq!(status, 200);
    let doc: Json = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["instanceId"], "ops-1");
    assert_eq!(doc["delivery"], "exactly-once");
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(doc["ready"], true);
    assert!(doc["uptimeSeconds"].is_u64());
    let pollers = doc["pollers"].as_array().unwrap();
    let names: HashSet<&str> = pollers
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in [
        "leads",
        "customers",
        "transactions",
        "servers",
        "positions[mt4-live-01]",
        "positions[mt5-live-02]",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    for poller in pollers {
        assert!(poller["lastSuccess"].is_string(), "{poller}");
        assert!(poller["lastError"].is_null(), "{poller}");
        for cursor in poller["cursors"].as_array().unwrap() {
            for key in [
                "scope",
                "watermark",
                "backfillNext",
                "initialDay",
                "readThrough",
                "lastSweep",
                "openWindows",
            ] {
                assert!(cursor.get(key).is_some(), "{key} missing: {cursor}");
            }
            assert!(cursor["watermark"].is_string() && cursor["backfillNext"].is_null());
        }
    }
    let leads = pollers.iter().find(|p| p["name"] == "leads").unwrap();
    assert_eq!(leads["cursors"].as_array().unwrap().len(), 2);
    assert_eq!(doc["counts"]["leads"]["created"], 300);

    // The CRM goes away: ready says so; it comes back: ready again.
    sim.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let reason = loop {
        let (status, body) = get(&format!("{base}/health/ready")).await;
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "still ready with the CRM gone");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(reason.contains("CRM"), "{reason}");
    let (_, body) = get(&format!("{base}/status")).await;
    let doc: Json = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["ready"], false);
    assert!(
        doc["pollers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["lastError"]["message"].is_string()),
        "no poller shows its last error: {doc}"
    );
    assert!(
        !body.contains("ib-secret") && !body.contains("sim-api-key"),
        "a secret in /status"
    );
    let sim = common::start_sim(sim_config).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = get(&format!("{base}/health/ready")).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready again after the CRM came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = get(&format!("{base}/metrics")).await.1;
    assert!(!metrics.contains("ib-secret") && !metrics.contains("sim-api-key"));
    run.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_reset_moves_cursors_back_and_is_refused_while_the_instance_runs() {
    use ibstream::state_tool::{reset, show_json, ResetRequest, ResetTo};
    let broker = common::ApacheKafka::shared();
    let days_ago = |n: i64| chrono::Utc::now().date_naive() - chrono::Duration::days(n);
    let sim = common::start_sim(|c| {
        c.start_date = days_ago(60);
        c.leads = 300;
        c.customers = 120;
        c.transactions = 1_000;
        c.positions = 600;
        c.servers = 1;
    })
    .await;
    let prefix = common::unique_topic("reset");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let mut cfg = config(&sim, &broker, &prefix, "reset-1");
    cfg.streams.start_date = days_ago(60);
    let run = start(cfg.clone());
    run.wait_cycles(&HashMap::new(), &STREAMS, 2, Duration::from_secs(300))
        .await;

    // While it runs: show tells its heartbeat; reset is refused, naming the instance.
    let state = ibstream::state_tool::load(&cfg).await.unwrap();
    let shown = show_json(&state, chrono::Utc::now());
    assert!(
        shown["heartbeats"]["reset-1"]["ageSeconds"]
            .as_i64()
            .unwrap()
            < 90,
        "{shown}"
    );
    let scopes: Vec<&str> = shown["cursors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["scope"].as_str().unwrap())
        .collect();
    for scope in [
        "leads/registration",
        "leads/lastModified",
        "transactions",
        "positions/mt4-live-01",
    ] {
        assert!(scopes.contains(&scope), "{scope} not in {scopes:?}");
    }
    assert_eq!(shown["fingerprints"]["leads"], 300);
    let from = days_ago(10);
    let request = ResetRequest {
        stream: "transactions".to_owned(),
        server_tag: None,
        to: ResetTo::Day(from),
        resnapshot: true,
        force: false,
    };
    let err = reset(&cfg, &request).await.unwrap_err();
    assert!(
        err.contains("reset-1") && err.contains("stop it first"),
        "{err}"
    );
    run.stop().await;
    let before = read_events(&broker, &sim, &schemas, &prefix).await;

    // Stopped: transactions re-snapshot from 10 days ago; leads only re-read (nothing new).
    let done = reset(
        &cfg,
        &ResetRequest {
            force: true,
            ..request
        },
    )
    .await
    .unwrap();
    assert!(
        done.iter()
            .any(|l| l.contains(&format!("transactions: reads again from {from}"))),
        "{done:?}"
    );
    assert!(
        done.iter().any(|l| l.contains("fingerprints dropped")),
        "{done:?}"
    );
    reset(
        &cfg,
        &ResetRequest {
            stream: "leads".to_owned(),
            server_tag: None,
            to: ResetTo::Day(days_ago(30)),
            resnapshot: false,
            force: true,
        },
    )
    .await
    .unwrap();
    let run = start(cfg);
    run.wait_cycles(&HashMap::new(), &STREAMS, 2, Duration::from_secs(300))
        .await;
    run.stop().await;
    let after = read_events(&broker, &sim, &schemas, &prefix).await;
    let from_text = from.format("%Y-%m-%d").to_string();
    let resnapshot: HashSet<String> = sim
        .truth(Kind::Transactions)
        .iter()
        .filter(|t| t["isFake"] == false)
        .filter(|t| t["transactionDate"].as_str().unwrap()[..10] >= *from_text.as_str())
        .map(|t| t["id"].to_string())
        .collect();
    assert!(!resnapshot.is_empty());
    for (key, versions) in &after["transactions"] {
        let was = before["transactions"][key].len();
        let want = was + usize::from(resnapshot.contains(key));
        assert_eq!(versions.len(), want, "transaction {key}");
        assert_eq!(meta_string(versions.last().unwrap(), "op"), "CREATED");
    }
    for stream in ["leads", "customers", "positions", "servers"] {
        let count = |events: &ByKey| events[stream].values().map(Vec::len).sum::<usize>();
        assert_eq!(count(&after), count(&before), "{stream} emitted again");
    }
    sim.shutdown().await;
}
