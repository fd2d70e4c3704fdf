//! What a newcomer meets first (issue 19): `ibstream events tail` on tansu, Apache Kafka and
//! the demo's in-process Kafka; the status page at `/` in headless Chromium; `run`'s log
//! lines when a backfill completes and when every stream stops for one cause.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::*;
use common::{Broker, ConfigFile};

/// A child `ibstream` process whose stdout and stderr go to files, killed on drop.
struct Proc {
    child: Child,
    stdout: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
}

impl Proc {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let (stdout, stderr) = (
            tempfile::NamedTempFile::new().unwrap(),
            tempfile::NamedTempFile::new().unwrap(),
        );
        let mut command = Command::new(env!("CARGO_BIN_EXE_ibstream"));
        command
            .args(args)
            .env_remove("IBSTREAM_CONFIG")
            .env("IBSTREAM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(stdout.reopen().unwrap())
            .stderr(stderr.reopen().unwrap());
        for (key, value) in env {
            command.env(key, value);
        }
        Proc {
            child: command.spawn().unwrap(),
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.stdout.path()).unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap()
    }

    /// Waits until `done` holds of (stdout, stderr); fails with both after `timeout` or if
    /// the process ended first.
    fn wait_for(&mut self, what: &str, timeout: Duration, done: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let (out, err) = (self.stdout(), self.stderr());
            if done(&out, &err) {
                return;
            }
            let ended = self.child.try_wait().unwrap();
            assert!(
                ended.is_none() && Instant::now() < deadline,
                "{what}: not within {timeout:?} (ended: {ended:?})\nstdout:\n{out}\nstderr:\n{}",
                tail_of(&err)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the exit; returns its code (`None`: killed at the timeout).
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs `ibstream events tail ARGS` to its end (it must end: give `--max` or `--until-end`); returns its
/// JSON lines, failing with its stderr if it does not exit 0 within `timeout`.
fn tail(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Vec<Json> {
    let mut all = vec!["events", "tail"];
    all.extend_from_slice(args);
    let mut proc = Proc::spawn(&all, env);
    let code = proc.wait_exit(timeout);
    assert_eq!(
        code,
        Some(0),
        "events tail {args:?}: {}\n{}",
        proc.stdout(),
        proc.stderr()
    );
    proc.stdout()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// The JSON log lines of `stderr` whose message starts with `message`.
fn logged(stderr: &str, message: &str) -> Vec<Json> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .collect()
}

/// The configuration file of `ibstream run` in these tests: the shared one, retries after
/// 10 ms, every stream polled each second, an operations server on a free port.
fn run_config(sim: &SimHandle, bootstrap: &str, delivery: &str, prefix: &str) -> ConfigFile {
    ConfigFile::new(&sim.base_url(), prefix, bootstrap)
        .set("crm.backoff_initial_ms", 10)
        .set("crm.backoff_max_ms", 200)
        .set("kafka.delivery", delivery)
        .set("kafka.batch_timeout_secs", 30)
        .set("http.listen", "127.0.0.1:0")
        .fast_polls()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Checks tail lines of transactions against the simulator's truth: every amount is the
/// CRM's exact decimal, as a string.
fn assert_transactions_match_truth(sim: &SimHandle, lines: &[Json]) {
    let truth: HashMap<String, Json> = sim
        .truth(ibstream::sim::Kind::Transactions)
        .into_iter()
        .map(|t| (t["id"].to_string(), t))
        .collect();
    for line in lines {
        let event = &line["event"];
        assert_eq!(line["schema"], "com.ibstream.TransactionEvent", "{line}");
        let truth = &truth[&event["id"].to_string()];
        for field in ["amount", "amountUsd"] {
            let (Some(shown), Some(crm)) = (event.get(field), truth.get(field)) else {
                continue;
            };
            if crm.is_null() {
                continue;
            }
            let shown: rust_decimal::Decimal = shown
                .as_str()
                .unwrap_or_else(|| panic!("{field} is not a string: {line}"))
                .parse()
                .unwrap();
            let text = crm.to_string();
            let text = text.trim_matches('"');
            let crm = text
                .parse::<rust_decimal::Decimal>()
                .or_else(|_| rust_decimal::Decimal::from_scientific(text))
                .unwrap_or_else(|e| panic!("truth {field} {text}: {e}"));
            assert_eq!(shown, crm, "{field} of {line}");
        }
    }
}

/// tansu (at-least-once, single-object framing): `run` logs each backfill's completion;
/// `events tail` prints decoded events with exact decimals, filters by key, and prints a
/// record that does not decode as a line saying so, then goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tail_on_tansu_and_backfill_complete_log_lines() {
    let started = Instant::now();
    let broker = common::Tansu::start();
    let sim = common::start_sim(|c| c.servers = 2).await;
    let prefix = common::unique_topic("tail");
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "run.toml",
        &run_config(&sim, broker.bootstrap(), "at-least-once", &prefix).to_toml(),
    );
    tokio::task::block_in_place(|| tansu_part(&sim, &broker, &prefix, &config));
    sim.shutdown().await;
    eprintln!("newcomer: tansu: {:?}", started.elapsed());
}

fn tansu_part(sim: &SimHandle, broker: &common::Tansu, prefix: &str, config: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut run = Proc::spawn(&["--config", config, "run"], &[]);
    // One line per poller: leads, customers, transactions and each of the 2 server tags.
    run.wait_for(
        "a backfill-complete line per poller",
        Duration::from_secs(60),
        |_, err| logged(err, "backfill complete").len() >= 5,
    );
    let lines = logged(&run.stderr(), "backfill complete");
    let pollers: HashSet<String> = lines
        .iter()
        .map(|l| format!("{}/{}", l["fields"]["stream"], l["fields"]["server_tag"]))
        .collect();
    assert_eq!(pollers.len(), 5, "one line each: {lines:?}");
    for stream in ["leads", "customers", "transactions"] {
        assert!(
            pollers.contains(&format!("\"{stream}\"/\"-\"")),
            "{stream}: {pollers:?}"
        );
    }
    run.wait_exit(Duration::ZERO);

    let env = [];
    let transactions = tail(
        &[
            "--config",
            config,
            "--stream",
            "transactions",
            "--from-beginning",
            "--max",
            "20",
        ],
        &env,
        Duration::from_secs(60),
    );
    assert_eq!(transactions.len(), 20);
    let topic = format!("{prefix}.transactions");
    for line in &transactions {
        assert_eq!(line["topic"], topic.as_str());
        assert!(line["offset"].is_i64() && line["key"].is_string(), "{line}");
        assert_eq!(line["event"]["meta"]["op"], "CREATED", "{line}");
    }
    assert_transactions_match_truth(sim, &transactions);
    // --key picks one entity's events.
    let key = transactions[7]["key"].as_str().unwrap().to_owned();
    let one = tail(
        &[
            "--config",
            config,
            "--stream",
            "transactions",
            "--from-beginning",
            "--key",
            &key,
            "--max",
            "1",
        ],
        &env,
        Duration::from_secs(60),
    );
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["key"], key.as_str());
    assert_eq!(one[0]["offset"], transactions[7]["offset"]);

    // --until-end ends at the end of the topic: all of it, a key that never matches, an
    // empty topic (the dead-letter topic of a run without dead letters).
    let until_end = |extra: &[&str]| {
        let mut args = vec!["--config", config, "--from-beginning", "--until-end"];
        args.extend_from_slice(extra);
        tail(&args, &env, Duration::from_secs(60))
    };
    let all = until_end(&["--stream", "transactions"]);
    let truth = sim.truth(ibstream::sim::Kind::Transactions).len();
    assert_eq!(all.len(), truth, "every transaction once, then the end");
    assert!(until_end(&["--stream", "transactions", "--key", "no-such-key"]).is_empty());
    let dlq = format!("{prefix}.dlq");
    assert!(until_end(&["--topic", &dlq, "--max", "5"]).is_empty());

    // A record that is not an event, between two that are: a line saying so, with its
    // offset, and the tail goes on.
    let mixed = format!("{prefix}.mixed");
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .unwrap();
    let lead_event = tail(
        &[
            "--config",
            config,
            "--stream",
            "leads",
            "--from-beginning",
            "--max",
            "1",
        ],
        &env,
        Duration::from_secs(60),
    );
    let lead_bytes = raw_value(
        broker.bootstrap(),
        &format!("{prefix}.leads"),
        &lead_event[0],
    );
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .create()
            .unwrap();
    for result in runtime
        .block_on(admin.create_topics(
            &[rdkafka::admin::NewTopic::new(
                &mixed,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        ))
        .unwrap()
    {
        result.unwrap();
    }
    for payload in [&lead_bytes[..], b"{\"not\": \"avro\"}", &lead_bytes[..]] {
        runtime
            .block_on(
                producer.send(
                    rdkafka::producer::FutureRecord::to(&mixed)
                        .key("k")
                        .payload(payload),
                    Duration::from_secs(10),
                ),
            )
            .unwrap();
    }
    let lines = tail(
        &[
            "--bootstrap-servers",
            broker.bootstrap(),
            "--topic",
            &mixed,
            "--from-beginning",
            "--max",
            "3",
        ],
        &env,
        Duration::from_secs(60),
    );
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["event"], lead_event[0]["event"]);
    assert_eq!(lines[1]["offset"], 1);
    assert!(
        lines[1]["error"].as_str().unwrap().contains("framing"),
        "{}",
        lines[1]
    );
    assert!(lines[1].get("event").is_none());
    assert_eq!(lines[2]["event"], lead_event[0]["event"]);

    // Without --from-beginning and --max it follows the topic from its end until Ctrl-C.
    let mut follow = Proc::spawn(
        &[
            "events",
            "tail",
            "--bootstrap-servers",
            broker.bootstrap(),
            "--topic",
            &mixed,
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut produced = 0;
    // Records written before its assignment took effect are not its: write until one shows.
    while follow.stdout().lines().count() == 0 {
        assert!(
            Instant::now() < deadline,
            "follow printed nothing: {}",
            follow.stderr()
        );
        runtime
            .block_on(
                producer.send(
                    rdkafka::producer::FutureRecord::to(&mixed)
                        .key("new")
                        .payload(&lead_bytes[..]),
                    Duration::from_secs(10),
                ),
            )
            .unwrap();
        produced += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    let first: Json = serde_json::from_str(follow.stdout().lines().next().unwrap()).unwrap();
    assert_eq!(first["key"], "new");
    assert!(
        first["offset"].as_i64().unwrap() >= 3,
        "only new records: {first}"
    );
    assert_eq!(first["event"], lead_event[0]["event"]);
    let interrupted = Command::new("kill")
        .args(["-INT", &follow.child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    assert_eq!(
        follow.wait_exit(Duration::from_secs(10)),
        Some(0),
        "Ctrl-C ends it cleanly"
    );
    eprintln!(
        "newcomer: tansu: 5 backfill-complete lines, 20 transactions decoded equal to the truth, 1 by key, 1 undecodable line of 3, following: a new record shown after {produced} written, Ctrl-C exits 0"
    );
}

/// Returns the value bytes of the record a tail line shows.
fn raw_value(bootstrap: &str, topic: &str, line: &Json) -> Vec<u8> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "newcomer-raw")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(
        topic,
        line["partition"].as_i64().unwrap() as i32,
        Offset::Offset(line["offset"].as_i64().unwrap()),
    )
    .unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no record at {line}");
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(500)) {
            return message.payload().unwrap().to_vec();
        }
    }
}

/// Apache Kafka (exactly-once, Confluent framing with a Schema Registry): `events tail`
/// fetches the writer schemas by id and decodes; read_committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tail_on_apache_kafka_with_a_schema_registry() {
    let started = Instant::now();
    let broker = common::ApacheKafka::shared();
    let registry = common::start_registry().await;
    let sim = common::start_sim(|_| {}).await;
    let prefix = common::unique_topic("tail-sr");
    let mut cfg = config(&sim, &broker, &prefix, &prefix);
    cfg.schema_registry = Some(ibstream::config::SchemaRegistryConfig {
        url: registry.url.clone(),
        username: Some("sr-user".to_owned()),
        password: Some("sr-pass".to_owned().into()),
        auto_register: true,
        request_timeout_secs: 10,
        ..Default::default()
    });
    let run = start(cfg);
    run.wait_cycles(
        &HashMap::new(),
        &["transactions"],
        1,
        Duration::from_secs(120),
    )
    .await;
    let created = run.stats["transactions"].created.load(Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "tail.toml",
        &format!(
            "[kafka]\nbootstrap_servers = \"{}\"\n[topics]\nprefix = \"{prefix}\"\n\
             [schema_registry]\nurl = \"{}\"\nusername = \"sr-user\"\npassword = \"sr-pass\"\n",
            broker.bootstrap(),
            registry.url
        ),
    );
    let max = created.to_string();
    let config_path = config.clone();
    let lines = tokio::task::spawn_blocking(move || {
        tail(
            &[
                "--config",
                &config,
                "--stream",
                "transactions",
                "--from-beginning",
                "--max",
                &max,
            ],
            &[],
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    assert_eq!(lines.len() as u64, created);
    let keys: HashSet<&str> = lines.iter().map(|l| l["key"].as_str().unwrap()).collect();
    assert_eq!(keys.len() as u64, created, "one event per transaction");
    assert_transactions_match_truth(&sim, &lines);
    let counts = run.stats["transactions"].clone();
    run.stop().await;
    // Background changes may add transactions after the first read: all the run emitted.
    let created_in_all = counts.created.load(Ordering::Relaxed);

    // read_committed: a record of an aborted transaction, then a committed one; the tail
    // shows only the committed one.
    let topic = format!("{prefix}.committed");
    let event = raw_value(
        broker.bootstrap(),
        &format!("{prefix}.transactions"),
        &lines[0],
    );
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("transactional.id", format!("{prefix}-abort"))
        .create()
        .unwrap();
    use rdkafka::producer::Producer;
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    for (payload, commit) in [(&b"aborted, never shown"[..], false), (&event[..], true)] {
        producer.begin_transaction().unwrap();
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&topic)
                    .key("k")
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        if commit {
            producer
                .commit_transaction(Duration::from_secs(30))
                .unwrap();
        } else {
            producer.abort_transaction(Duration::from_secs(30)).unwrap();
        }
    }
    let args = [
        "--config".to_owned(),
        config_path,
        "--topic".to_owned(),
        topic,
        "--from-beginning".to_owned(),
        "--max".to_owned(),
        "1".to_owned(),
    ];
    let kept = args.clone();
    let committed = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tail(&args, &[], Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert_eq!(committed.len(), 1);
    assert!(committed[0].get("error").is_none(), "{}", committed[0]);
    assert_eq!(committed[0]["event"], lines[0]["event"]);
    assert!(
        committed[0]["offset"].as_i64().unwrap() >= 1,
        "{}",
        committed[0]
    );
    // --until-end past the transaction markers (the topic's last offset is one, not a
    // record): fewer records than --max, then the end; every transaction of the run.
    let mut until_end = kept.to_vec();
    until_end[6] = "5".to_owned();
    until_end.push("--until-end".to_owned());
    let mut all = kept.to_vec();
    all[3] = format!("{prefix}.transactions");
    all.truncate(5);
    all.push("--until-end".to_owned());
    let (ended, every) = tokio::task::spawn_blocking(move || {
        let ended: Vec<&str> = until_end.iter().map(String::as_str).collect();
        let every: Vec<&str> = all.iter().map(String::as_str).collect();
        (
            tail(&ended, &[], Duration::from_secs(60)),
            tail(&every, &[], Duration::from_secs(60)),
        )
    })
    .await
    .unwrap();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(every.len() as u64, created_in_all);
    interrupt_and_deletion(broker.bootstrap(), &prefix, &event).await;
    eprintln!(
        "newcomer: Apache Kafka + registry: {created} Confluent-framed transactions decoded; an aborted record skipped (read_committed); {:?}",
        started.elapsed()
    );
    sim.shutdown().await;
}

/// `events tail` ends at Ctrl-C while it waits for a registry that does not answer, and
/// says so when its topic is deleted while it reads.
async fn interrupt_and_deletion(bootstrap: &str, prefix: &str, event: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    // A registry that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for socket in silent.incoming().flatten() {
                held.push(socket);
                accepted.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let silent_config = write(
        dir.path(),
        "silent.toml",
        &format!(
            "[kafka]\nbootstrap_servers = \"{bootstrap}\"\n[topics]\nprefix = \"{prefix}\"\n\
             [schema_registry]\nurl = \"{url}\"\nrequest_timeout_secs = 120\n"
        ),
    );
    let mut waiting = Proc::spawn(
        &[
            "--config",
            &silent_config,
            "events",
            "tail",
            "--stream",
            "transactions",
            "--from-beginning",
        ],
        &[],
    );
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while accepted.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "{}", waiting.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
        let interrupted = Instant::now();
        let pid = waiting.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
        let code = waiting.wait_exit(Duration::from_secs(10));
        assert_eq!(
            code,
            Some(0),
            "Ctrl-C while the registry is asked: {}",
            waiting.stderr()
        );
        eprintln!(
            "newcomer: tail interrupted while the registry was asked: ended in {:?}",
            interrupted.elapsed()
        );
    });

    // A topic deleted while the tail follows it.
    let topic = format!("{prefix}.gone");
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    producer
        .send(
            rdkafka::producer::FutureRecord::to(&topic)
                .key("k")
                .payload(event),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let mut following = Proc::spawn(
        &[
            "events",
            "tail",
            "--bootstrap-servers",
            bootstrap,
            "--topic",
            &topic,
            "--from-beginning",
        ],
        &[],
    );
    tokio::task::block_in_place(|| {
        following.wait_for("the one record", Duration::from_secs(60), |out, _| {
            out.lines().count() == 1
        })
    });
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()
            .unwrap();
    admin
        .delete_topics(&[&topic], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    let deleted = Instant::now();
    tokio::task::block_in_place(|| {
        let code = following.wait_exit(Duration::from_secs(60));
        let err = following.stderr();
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains(&format!("topic {topic} no longer exists")),
            "{err}"
        );
        eprintln!(
            "newcomer: tail of a deleted topic ended in {:?}: {}",
            deleted.elapsed(),
            err.trim()
        );
    });
}

/// The demo prints its in-process Kafka's address and `events tail` reads it.
#[test]
fn events_tail_reads_the_demos_in_process_kafka() {
    let started = Instant::now();
    let mut demo = Proc::spawn(
        &[
            "demo",
            "--for",
            "120",
            "--http-listen",
            "127.0.0.1:0",
            "--leads",
            "100",
            "--customers",
            "40",
            "--transactions",
            "100",
            "--positions",
            "100",
        ],
        &[],
    );
    demo.wait_for(
        "the demo's Kafka address",
        Duration::from_secs(60),
        |out, _| out.contains("Kafka (in-process) ") && out.contains("events tail"),
    );
    let out = demo.stdout();
    let bootstrap = out
        .split("Kafka (in-process) ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    let lines = tail(
        &[
            "--bootstrap-servers",
            &bootstrap,
            "--stream",
            "leads",
            "--from-beginning",
            "--max",
            "5",
        ],
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(lines.len(), 5);
    // The status page the demo prints answers there.
    let page = out
        .split("operations         http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    let html = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&page).unwrap();
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    };
    assert!(
        html.contains("200 OK") && html.contains("text/html"),
        "{html}"
    );
    assert!(
        html.contains("<h1>ibstream <span id=\"instance\">demo</span></h1>"),
        "{html}"
    );
    for line in &lines {
        assert_eq!(line["topic"], "crm.leads");
        assert_eq!(line["schema"], "com.ibstream.LeadEvent", "{line}");
        assert!(line["event"]["meta"]["eventId"].is_string(), "{line}");
    }
    eprintln!(
        "newcomer: demo's in-process Kafka at {bootstrap}: 5 leads decoded; {:?}",
        started.elapsed()
    );
}

/// The demo on a real broker with 3 partitions per topic (`--kafka`,
/// `IBSTREAM_KAFKA__TOPIC_PARTITIONS`): its read-back reads every partition, so its summary's
/// counts equal what was emitted.
#[test]
fn the_demo_reads_back_every_partition_of_a_real_broker() {
    let started = Instant::now();
    let broker = common::ApacheKafka::shared();
    let mut demo = Proc::spawn(
        &[
            "demo",
            "--kafka",
            broker.bootstrap(),
            "--for",
            "12",
            "--http-listen",
            "127.0.0.1:0",
            "--leads",
            "200",
            "--customers",
            "40",
            "--transactions",
            "200",
            "--positions",
            "200",
        ],
        &[("IBSTREAM_KAFKA__TOPIC_PARTITIONS", "3")],
    );
    let code = demo.wait_exit(Duration::from_secs(90));
    let out = demo.stdout();
    assert_eq!(code, Some(0), "{out}\n{}", tail_of(&demo.stderr()));
    let summary = out.split("summary after").nth(1).expect("a summary");
    assert!(
        summary.contains("read back: every committed event of the topics, to their end"),
        "{summary}"
    );
    assert!(
        summary.contains("events that did not decode: 0"),
        "single-object framing: {summary}"
    );
    let emitted_total = assert_read_back_as_emitted(summary);
    eprintln!(
        "newcomer: demo on Apache Kafka with 3 partitions: {emitted_total} created events read back; {:?}",
        started.elapsed()
    );
}

/// Asserts that a demo summary's `<stream>: emitted N created, M updated; read back N
/// created, M updated` lines read back what was emitted; returns the events emitted.
fn assert_read_back_as_emitted(summary: &str) -> u64 {
    let mut emitted_total = 0;
    for stream in ["leads", "customers", "transactions", "positions"] {
        let line = summary
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{stream}: emitted ")))
            .unwrap_or_else(|| panic!("{stream} in {summary}"));
        let numbers: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        assert_eq!(numbers.len(), 4, "{line}");
        assert!(numbers[0] > 0, "{line}");
        assert_eq!(
            (numbers[0], numbers[1]),
            (numbers[2], numbers[3]),
            "read back as emitted: {line}"
        );
        emitted_total += numbers[0];
    }
    emitted_total
}

/// The demo's read-back after its run ended, on tansu, whose high watermark lags its log end
/// (after one batch of 40 records it reports 1): it reads on past the watermarks until
/// nothing comes for a quiet second, so every record written is counted (stopping at the
/// watermarks it read 1 of 40).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demos_read_back_reads_past_a_lagging_high_watermark() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    const RECORDS: u64 = 40;
    let started = Instant::now();
    let broker = common::Tansu::start();
    let topic = common::unique_topic("readback");
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .create()
            .unwrap();
    for result in admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
    // One batch, as `run` writes them (tansu's watermark lags a batch's last record).
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("linger.ms", "200")
        .create()
        .unwrap();
    let keys: Vec<String> = (0..RECORDS).map(|key| key.to_string()).collect();
    let sent: Vec<_> = keys
        .iter()
        .map(|key| {
            producer
                .send_result(FutureRecord::to(&topic).key(key).payload("not an event"))
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    for delivery in sent {
        delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    let kafka = ibstream::config::KafkaConfig {
        bootstrap_servers: broker.bootstrap().to_owned(),
        ..Default::default()
    };
    let (read, unread) = tokio::task::spawn_blocking(move || {
        ibstream::demo::read_back_ended(&kafka, "com.ibstream", &[topic])
    })
    .await
    .unwrap();
    assert_eq!(
        (read, unread),
        (RECORDS, None),
        "records read, records given up"
    );
    eprintln!(
        "newcomer: the demo's read-back on tansu: {read} of {RECORDS}; {:?}",
        started.elapsed()
    );
}

/// A wrong CRM password stops every stream for the same reason: `run` says so once, and
/// never that the other streams go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_crm_password_says_once_that_every_stream_stopped() {
    let started = Instant::now();
    let broker = common::Tansu::start();
    let sim = common::start_sim(|_| {}).await;
    let prefix = common::unique_topic("badpw");
    let dir = tempfile::tempdir().unwrap();
    let toml = run_config(&sim, broker.bootstrap(), "at-least-once", &prefix)
        .set("crm.password", "wrong-secret")
        .to_toml();
    let config = write(dir.path(), "run.toml", &toml);
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let mut run = Proc::spawn(&["--config", &config, "run"], &[]);
        let code = run.wait_exit(Duration::from_secs(120));
        (code, run.stdout(), run.stderr())
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        !err.contains("the other streams go on"),
        "no stream goes on:\n{}",
        tail_of(&err)
    );
    // Said once per cause: the credentials (leads, customers, transactions, servers), and
    // positions, which needs the servers list.
    let every = logged(&err, "every stream stopped");
    assert_eq!(every.len(), 2, "{}", tail_of(&err));
    assert!(
        every[0]["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("crm.password"),
        "{}",
        every[0]
    );
    assert_eq!(
        every[0]["fields"]["streams"]
            .as_str()
            .unwrap()
            .split(", ")
            .count(),
        4
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(
        errors.len(),
        2,
        "one final error line per cause: {errors:?}"
    );
    assert!(!err.contains("wrong-secret"));
    eprintln!(
        "newcomer: wrong CRM password: 2 'every stream stopped' lines (one per cause), {} stream stops; {:?}",
        logged(&err, "stream stopped").len(),
        started.elapsed()
    );
    sim.shutdown().await;
}

/// Runs headless Chromium (Debian's `chromium`) with `args`; returns its stdout.
fn chromium(args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", profile.path().display()),
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("chromium (./scripts/test.sh installs Debian's chromium)");
    assert!(
        output.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Returns the (`data-status`, `data-value`) pairs of the figure cells of a page, unescaped.
fn figures(dom: &str) -> Vec<(String, Json, String)> {
    let unescape = |s: &str| {
        s.replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    };
    let attribute = |text: &str, name: &str| -> Option<String> {
        let start = text.find(&format!("{name}=\""))? + name.len() + 2;
        let end = text[start..].find('"')? + start;
        Some(unescape(&text[start..end]))
    };
    dom.split("data-status=\"")
        .skip(1)
        .map(|rest| {
            let end = rest.find('>').unwrap();
            let tag = &rest[..end];
            let pointer = unescape(&tag[..tag.find('"').unwrap()]);
            let value = attribute(tag, "data-value").unwrap_or_else(|| panic!("{tag}"));
            // The text the reader sees: the cell's content up to the next tag.
            let text = &rest[end + 1..];
            let shown = unescape(&text[..text.find('<').unwrap_or(text.len())]);
            (pointer, serde_json::from_str(&value).unwrap(), shown)
        })
        .collect()
}

/// Asserts that `text`, what a cell of the status page shows, says `served`, the value of
/// /status it stands for: read back here without the page's code (numbers as shown, a
/// duration from its unit, a ratio from its percentage, null as a dash).
fn assert_text_shows(pointer: &str, text: &str, served: &Json) {
    let number = |t: &str| -> f64 {
        t.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{pointer}: {t:?} shows no number"))
    };
    match served {
        Json::Null => assert!(
            text == "–" || text == "not read yet",
            "{pointer}: {text:?} for null"
        ),
        Json::Bool(ready) => assert_eq!(text, if *ready { "ready" } else { "not ready" }),
        Json::String(s) => assert_eq!(text, s, "{pointer}"),
        Json::Number(n) if pointer.ends_with("backfillProgress") => {
            assert!(text.ends_with(" %"), "{pointer}: {text:?}");
            let shown = number(text);
            let want = n.as_f64().unwrap() * 100.0;
            assert!(
                (shown - want).abs() <= 0.05 + 1e-9,
                "{pointer}: {text:?}, /status {n}"
            );
        }
        Json::Number(n) if pointer.ends_with("Seconds") => {
            let unit = match text.rsplit(' ').next() {
                Some("s") => 1.0,
                Some("min") => 60.0,
                Some("h") => 3600.0,
                Some("days") => 86_400.0,
                other => panic!("{pointer}: {text:?} has no unit ({other:?})"),
            };
            let (shown, want) = (number(text) * unit, n.as_f64().unwrap());
            // The shown rounding (half a unit of the last digit) and the clock's 10 s.
            let slack = if unit >= 3600.0 {
                unit / 20.0
            } else {
                unit / 2.0
            } + 10.0;
            assert!(
                (shown - want).abs() <= slack,
                "{pointer}: {text:?}, /status {n}"
            );
        }
        Json::Number(n) => assert_eq!(text, n.to_string(), "{pointer}"),
        other => panic!("{pointer}: a cell for {other}"),
    }
}

/// The status page at `/`, in headless Chromium: it renders, every figure on it equals
/// `/status`'s, error texts are escaped (no injected markup), it reloads itself, and a
/// screenshot is written to target/test-artifacts/status-page.png.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_figures_of_status_in_chromium() {
    use ibstream::ops::CursorStatus;
    use ibstream::stream::state::{Cursor, OpenWindow};
    let started = Instant::now();
    let stats: Stats = STREAMS.into_iter().map(|s| (s, Arc::default())).collect();
    for (i, stream) in STREAMS.iter().enumerate() {
        let s = &stats[stream];
        s.created.store(1000 + i as u64, Ordering::Relaxed);
        s.updated.store(17 * i as u64, Ordering::Relaxed);
        s.unchanged.store(3, Ordering::Relaxed);
        s.cycles.store(40 + i as u64, Ordering::Relaxed);
    }
    let registry = Arc::new(ibstream::ops::Registry::new(
        "page-<1>",
        ibstream::config::Delivery::AtLeastOnce,
        chrono_tz::UTC,
        Duration::from_secs(30),
        stats,
        Arc::default(),
    ));
    let now = chrono::Utc::now();
    let day = |d: &str| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap();
    registry.register("leads", "leads", None);
    registry.cursor(
        "leads",
        "leads/registration",
        CursorStatus {
            cursor: Cursor {
                watermark: Some(day("2024-05-01")),
                next: Some(day("2024-05-02")),
                open: vec![OpenWindow {
                    day: day("2024-04-03"),
                    since: now,
                    missing: 2,
                }],
                swept: Some(now - chrono::Duration::hours(2)),
            },
            initial: day("2024-01-01"),
            read_through: Some(now - chrono::Duration::days(30)),
            open_reasons: Default::default(),
        },
    );
    registry.cycle(
        "leads",
        Err("crm answered <script>document.title='x'</script> & <b>bold</b>".to_owned()),
    );
    registry.register("positions[mt4-live-01]", "positions", Some("mt4-live-01"));
    registry.cursor(
        "positions[mt4-live-01]",
        "positions/mt4-live-01",
        CursorStatus {
            cursor: Cursor {
                watermark: Some(now.date_naive()),
                ..Cursor::default()
            },
            initial: day("2024-01-01"),
            read_through: Some(now - chrono::Duration::seconds(40)),
            open_reasons: Default::default(),
        },
    );
    registry.cycle("positions[mt4-live-01]", Ok(()));
    let cancel = CancellationToken::new();
    let (addr, server) =
        ibstream::ops::http::serve("127.0.0.1:0".parse().unwrap(), registry, cancel.clone())
            .await
            .unwrap();
    let status: Json = serde_json::from_str(
        &reqwest::get(format!("http://{addr}/status"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let url = format!("http://{addr}/");
    let dom = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || chromium(&["--dump-dom", &url]))
            .await
            .unwrap()
    };
    // Rendered: the tables are in the DOM Chromium built.
    for id in ["process", "pollers", "counts"] {
        assert!(dom.contains(&format!("id=\"{id}\"")), "no #{id}: {dom}");
    }
    assert!(dom.contains("http-equiv=\"refresh\""), "{dom}");
    // Escaped: the error's markup is text, not elements.
    assert!(!dom.contains("<script>document"), "{dom}");
    assert!(!dom.contains("<b>bold"), "{dom}");
    assert!(dom.contains("&lt;script&gt;document.title"), "{dom}");
    assert!(dom.contains("not ready"), "{dom}");
    assert!(dom.contains("the state is not restored yet"), "{dom}");
    // Every figure equals /status's (uptime and lag move with the clock): the text shown,
    // read back into a value here, and the value the cell says it shows.
    let shown = figures(&dom);
    for (pointer, value, text) in &shown {
        let served = status
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{pointer} is not in /status"));
        if pointer.ends_with("uptimeSeconds") || pointer.ends_with("lagSeconds") {
            let (a, b) = (value.as_f64().unwrap(), served.as_f64().unwrap());
            assert!((a - b).abs() < 10.0, "{pointer}: page {a}, /status {b}");
        } else {
            assert_eq!(value, served, "{pointer}");
        }
        assert_text_shows(pointer, text, served);
    }
    // 5 process rows, 3 figures per poller + 1 sweep per cursor, 10 counts per stream.
    assert_eq!(shown.len(), 5 + 2 * 4 + 5 * 10, "{shown:?}");
    for stream in STREAMS {
        assert!(
            shown
                .iter()
                .any(|(p, _, text)| *p == format!("/counts/{stream}/created")
                    && text.parse::<u64>().ok() == status["counts"][stream]["created"].as_u64()),
            "{stream}"
        );
    }
    assert!(dom.contains("30.0 days"), "the lag, for people: {dom}");
    // The screenshot, a test artifact.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let shot = format!("--screenshot={}", png.display());
    tokio::task::spawn_blocking(move || chromium(&[&shot, "--window-size=1400,900", &url]))
        .await
        .unwrap();
    let bytes = std::fs::read(&png).expect("the screenshot is written");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
    cancel.cancel();
    let _ = server.await;
    eprintln!(
        "newcomer: status page: {} figures equal /status; screenshot {} ({} bytes); {:?}",
        shown.len(),
        png.display(),
        bytes.len(),
        started.elapsed()
    );
}
