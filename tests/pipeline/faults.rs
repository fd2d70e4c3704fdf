//! The fault suite: each scenario tries to break `ibstream run` (the binary, a real
//! process) against a broker and the simulator, then checks every topic with
//! [`World::final_check`]: the latest event of every key equals the truth, no key is missing,
//! no phantom `UPDATED`, every malformed record is a dead letter, and duplicates as the
//! delivery mode allows: at-least-once, only with their twin's `eventId`; exactly-once, none
//! of any kind under a `read_committed` consumer (no `eventId` twice, no dead letter twice).
//!
//! The broker is Apache Kafka (`common::ApacheKafka`, a process of the scenario's own) unless
//! `FAULTS_BROKER=tansu` (no transactions: at-least-once only) or `FAULTS_KAFKA=host:port` (a
//! broker this suite did not start, e.g. the docker-compose Kafka; the broker-stop scenario is
//! skipped). `FAULTS_DELIVERY=exactly-once` runs every scenario in exactly-once (default:
//! at-least-once). Bounded here (the test command runs it); `FAULTS_LONG=1`
//! (`scripts/faults.sh --long`) runs the long form (20 kills, bigger data). Figures go to
//! stderr, prefixed `faults:`.

use super::*;
use common::ConfigFile;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

#[path = "rate_limit.rs"]
mod rate_limit;

fn long() -> bool {
    std::env::var_os("FAULTS_LONG").is_some()
}

/// Whether the suite runs in exactly-once: `FAULTS_DELIVERY` is `exactly-once` (or
/// `at-least-once`, the default).
fn exactly_once() -> bool {
    match std::env::var("FAULTS_DELIVERY").as_deref() {
        Err(_) | Ok("at-least-once") => false,
        Ok("exactly-once") => true,
        Ok(other) => panic!("FAULTS_DELIVERY={other}: at-least-once or exactly-once"),
    }
}

/// `kafka.delivery` of every run of the suite.
fn delivery() -> &'static str {
    if exactly_once() {
        "exactly-once"
    } else {
        "at-least-once"
    }
}

/// A scenario's broker, killed on drop if the scenario started it.
enum Broker {
    Apache(common::ApacheKafka),
    Tansu {
        tansu: common::Tansu,
        /// Holds the folder of its SQLite file when its records must outlive a restart.
        _storage: Option<tempfile::TempDir>,
    },
    /// `FAULTS_KAFKA`: `host:port` of a broker this suite cannot stop.
    External(String),
}

impl Broker {
    /// `FAULTS_KAFKA`, else the broker `FAULTS_BROKER` names: `apache` (the default) or
    /// `tansu`, which keeps its records in a file when `restartable` (else in memory). Records
    /// survive [`Broker::kill`] and [`Broker::restart`] on Apache Kafka and restartable tansu.
    fn start(restartable: bool) -> Broker {
        if let Ok(bootstrap) = std::env::var("FAULTS_KAFKA") {
            return Broker::External(bootstrap);
        }
        if tansu() {
            assert!(
                !exactly_once(),
                "tansu has no transactions: FAULTS_DELIVERY=exactly-once needs Apache Kafka"
            );
            if restartable {
                let dir = tempfile::tempdir().unwrap();
                return Broker::Tansu {
                    tansu: common::Tansu::start_persistent(dir.path()),
                    _storage: Some(dir),
                };
            }
            return Broker::Tansu {
                tansu: common::Tansu::start(),
                _storage: None,
            };
        }
        Broker::Apache(common::ApacheKafka::start())
    }

    fn bootstrap(&self) -> String {
        match self {
            Broker::Apache(kafka) => kafka.bootstrap.clone(),
            Broker::Tansu { tansu, .. } => tansu.bootstrap.clone(),
            Broker::External(bootstrap) => bootstrap.clone(),
        }
    }

    /// What the figures call the broker.
    fn name(&self) -> &'static str {
        match self {
            Broker::Apache(_) => "Apache Kafka",
            Broker::Tansu { .. } => "tansu",
            Broker::External(_) => "FAULTS_KAFKA",
        }
    }

    /// Kills the broker with SIGKILL (open transactions stay open in its log).
    fn kill(&mut self) {
        match self {
            Broker::Apache(kafka) => kafka.kill(),
            Broker::Tansu { tansu, .. } => tansu.stop(),
            Broker::External(_) => unreachable!("FAULTS_KAFKA cannot be stopped"),
        }
    }

    /// Starts the broker again on the same ports and records; waits until it serves.
    fn restart(&mut self) {
        match self {
            Broker::Apache(kafka) => kafka.restart(),
            Broker::Tansu { tansu, .. } => tansu.restart(),
            Broker::External(_) => unreachable!("FAULTS_KAFKA cannot be restarted"),
        }
    }
}

/// Whether `FAULTS_BROKER` names tansu (else `apache`, the default).
fn tansu() -> bool {
    match std::env::var("FAULTS_BROKER").as_deref() {
        Err(_) | Ok("apache") => false,
        Ok("tansu") => true,
        Ok(other) => panic!("FAULTS_BROKER={other}: apache or tansu"),
    }
}

/// The broker of a scenario (kept alive by the returned handle) and its bootstrap address.
fn broker() -> (Broker, String) {
    let broker = Broker::start(false);
    let bootstrap = broker.bootstrap();
    (broker, bootstrap)
}

/// A simulator a backfill takes seconds to read, 20 ms per request.
fn medium(c: &mut ibstream::sim::SimConfig, servers: usize) {
    c.leads = 3_000;
    c.customers = 1_000;
    c.transactions = 5_000;
    c.positions = 10_000;
    c.servers = servers;
    c.latency_ms = 20;
}

/// A small simulator, for scenarios that restart or wait for many cycles.
fn small(c: &mut ibstream::sim::SimConfig) {
    c.leads = 1_500;
    c.customers = 600;
    c.transactions = 2_500;
    c.positions = 4_000;
    c.servers = 2;
}

/// One `ibstream run` process: its operations address and its log file.
struct Process {
    /// Behind a mutex so that waiting for a phase can see an exit.
    child: std::sync::Mutex<Child>,
    http: String,
    log: PathBuf,
}

impl Drop for Process {
    /// A failed scenario leaves no process behind.
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Process {
    /// Starts `ibstream` with `args` (a `run`) and `env` (after the log level, which
    /// `FAULTS_LOG` sets, `info` by default), serving on `http`, everything it prints in `log`.
    fn spawn(args: &[&str], env: &[(&str, String)], http: &str, log: PathBuf) -> Process {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_ibstream"));
        command.args(args).env("IBSTREAM_HTTP__LISTEN", http).env(
            "IBSTREAM_LOG",
            std::env::var("FAULTS_LOG").unwrap_or_else(|_| "info".into()),
        );
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Process {
            child: std::sync::Mutex::new(child),
            http: http.to_owned(),
            log,
        }
    }

    fn kill_9(mut self) {
        let child = self.child.get_mut().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM; returns the exit status and how long the process took to exit.
    fn terminate(mut self) -> (ExitStatus, Duration) {
        let asked = Instant::now();
        Command::new("kill")
            .args(["-TERM", &self.child.get_mut().unwrap().id().to_string()])
            .status()
            .unwrap();
        let deadline = asked + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.get_mut().unwrap().try_wait().unwrap() {
                return (status, asked.elapsed());
            }
            if Instant::now() > deadline {
                self.child.get_mut().unwrap().kill().unwrap();
                panic!("ibstream run ignored SIGTERM for 30 s; see {:?}", self.log);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, Json)> {
        let response = reqwest::Client::new()
            .get(format!("http://{}{path}", self.http))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        let body = response.bytes().await.ok()?;
        Some((status, serde_json::from_slice(&body).ok()?))
    }

    /// Where the run is: `starting` (no `/status` yet or no poller), `backfill`, `steady`.
    async fn phase(&self) -> &'static str {
        let Some((_, status)) = self.get("/status").await else {
            return "starting";
        };
        let pollers = status["pollers"].as_array().cloned().unwrap_or_default();
        if pollers.is_empty() {
            "starting"
        } else if pollers
            .iter()
            .all(|p| p["backfillProgress"].as_f64() == Some(1.0))
        {
            "steady"
        } else {
            "backfill"
        }
    }

    /// Waits up to `timeout` for the process to exit; its status if it did.
    async fn exited_within(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.lock().unwrap().try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for `phase`; fails at once if the process exits meanwhile.
    async fn wait_for_phase(&self, phase: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.phase().await != phase {
            let exited = self.child.lock().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none(),
                "ibstream run exited ({exited:?}) while waiting for {phase}; see {:?}",
                self.log
            );
            assert!(
                Instant::now() < deadline,
                "no {phase} within {timeout:?}; see {:?}; /status: {:?}",
                self.log,
                self.get("/status").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A scenario's world: broker, simulator, topics, configuration.
struct World {
    bootstrap: String,
    prefix: String,
    config: PathBuf,
    /// Holds the configuration file.
    _dir: tempfile::TempDir,
    schemas: Schemas,
}

impl World {
    /// `crm` overrides `crm.` keys: lines of the `[crm]` table.
    fn new(sim: &SimHandle, bootstrap: &str, name: &str, crm: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let prefix = common::unique_topic(name);
        let config = ConfigFile::new(&sim.base_url(), &prefix, bootstrap)
            .set("crm.page_size", 200)
            .set("kafka.delivery", delivery())
            .set("kafka.batch_timeout_secs", 60)
            .set("streams.max_window_records", 400)
            .fast_polls()
            .set_lines("crm", crm)
            .write(dir.path());
        World {
            bootstrap: bootstrap.to_owned(),
            prefix,
            config,
            _dir: dir,
            schemas: Schemas::load("com.ibstream").unwrap(),
        }
    }

    /// Changes the configuration file for the runs spawned after.
    fn reconfigure(&self, tweak: impl FnOnce(ConfigFile) -> ConfigFile) {
        tweak(ConfigFile::read(&self.config)).save(&self.config);
    }

    /// Sets `kafka.batch_timeout_secs` (60 unless told; in exactly-once also the transaction
    /// timeout) for the runs spawned after.
    fn batch_timeout(&self, secs: u64) {
        self.reconfigure(|c| c.set("kafka.batch_timeout_secs", secs as i64));
    }

    fn spawn(&self, n: usize) -> Process {
        let http = format!("127.0.0.1:{}", common::free_port());
        let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&self.prefix);
        std::fs::create_dir_all(&logs).unwrap();
        let config = self.config.to_str().unwrap();
        Process::spawn(
            &["--config", config, "run"],
            &[],
            &http,
            logs.join(format!("run-{n}.log")),
        )
    }

    /// Reads every topic until the data topics equal the truth (or 300 s pass), then checks
    /// duplicates, phantom updates and dead letters; returns the events read and the duplicates.
    async fn final_check(&self, sim: &SimHandle, exact_dead_letters: bool) -> (usize, usize) {
        let (records, duplicates) = self.final_check_records(sim, exact_dead_letters).await;
        (records.len(), duplicates)
    }

    /// [`World::final_check`], returning the records read (`read_committed`). In exactly-once
    /// it fails on any duplicate: an `eventId` twice in any data topic, or a dead letter of
    /// the same raw record twice.
    async fn final_check_records(
        &self,
        sim: &SimHandle,
        exact_dead_letters: bool,
    ) -> (Vec<Consumed>, usize) {
        let deadline = Instant::now() + Duration::from_secs(300);
        let (records, events) = loop {
            let records = consume(
                &self.bootstrap,
                &data_topics(&self.prefix),
                truth_count(sim),
                Duration::from_secs(2),
            )
            .await;
            let events = group(&self.schemas, &self.prefix, &records);
            match truth_mismatch(sim, &events) {
                None => break (records, events),
                Some(mismatch) => assert!(
                    Instant::now() < deadline,
                    "not the truth after 300 s: {mismatch}"
                ),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let duplicates = assert_duplicates_share_ids_and_no_phantom_update(&events);
        if exactly_once() {
            let repeated = repeated_event_ids(&events);
            assert!(
                repeated.is_empty() && duplicates == 0,
                "exactly-once: {duplicates} duplicates under read_committed; event ids seen more than once (stream, key, eventId, times): {:?}",
                &repeated[..repeated.len().min(10)]
            );
        }
        let malformed = malformed_truth(sim);
        let letters = consume(
            &self.bootstrap,
            &[format!("{}.dlq", self.prefix)],
            malformed.len(),
            Duration::from_secs(2),
        )
        .await;
        let raws: Vec<Json> = letters
            .iter()
            .map(|l| serde_json::from_slice::<Json>(&l.payload).unwrap()["raw"].clone())
            .collect();
        for record in &malformed {
            assert!(
                raws.contains(record),
                "a malformed record has no dead letter: {record}"
            );
        }
        let distinct: HashSet<String> = raws.iter().map(Json::to_string).collect();
        if exact_dead_letters {
            assert_eq!(
                distinct.len(),
                malformed.len(),
                "one dead letter per malformed record"
            );
        }
        if exactly_once() {
            // A malformed record changed meanwhile has a dead letter of each raw version; the
            // same raw version twice is a duplicate.
            assert_eq!(
                raws.len(),
                distinct.len(),
                "exactly-once: a dead letter came twice"
            );
        }
        (records, duplicates)
    }

    /// Reads the data topics `read_uncommitted` (at least as many records as `committed`, the
    /// same topics read `read_committed`); returns how many records it saw and how many of
    /// them `read_committed` did not (records of aborted or unfinished transactions).
    async fn uncommitted(&self, committed: &[Consumed]) -> (usize, usize) {
        let all = consume_isolated(
            &self.bootstrap,
            &data_topics(&self.prefix),
            committed.len(),
            Duration::from_secs(2),
            "read_uncommitted",
        )
        .await;
        let seen: HashSet<(&str, i32, i64)> = committed
            .iter()
            .map(|c| (c.topic.as_str(), c.partition, c.offset))
            .collect();
        let aborted = all
            .iter()
            .filter(|c| !seen.contains(&(c.topic.as_str(), c.partition, c.offset)))
            .count();
        (all.len(), aborted)
    }
}

/// Every (stream, key, eventId, times) whose event id comes more than once over all data
/// topics: what exactly-once must never show a `read_committed` consumer.
fn repeated_event_ids(events: &ByKey) -> Vec<(String, String, String, usize)> {
    let mut times: HashMap<(&str, String), (&str, usize)> = HashMap::new();
    for (stream, keys) in events {
        for (key, versions) in keys {
            for version in versions {
                let entry = times
                    .entry((stream.as_str(), meta_string(version, "eventId")))
                    .or_insert((key.as_str(), 0));
                entry.1 += 1;
            }
        }
    }
    times
        .into_iter()
        .filter(|(_, (_, n))| *n > 1)
        .map(|((stream, id), (key, n))| (stream.to_owned(), key.to_owned(), id, n))
        .collect()
}

/// Lines of `log` after the first that contains `marker`.
fn log_after(log: &Path, marker: &str) -> Vec<String> {
    let file = std::fs::File::open(log).unwrap();
    std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .skip_while(|line| !line.contains(marker))
        .collect()
}

/// Prints a scenario's wall time (`faults: <name>: <mode> in <duration>`) when dropped, also
/// when the scenario fails.
struct Timer(&'static str, Instant);

fn timer(name: &'static str) -> Timer {
    Timer(name, Instant::now())
}

impl Drop for Timer {
    fn drop(&mut self) {
        eprintln!(
            "faults: {}: {} in {:.1?}{}",
            self.0,
            delivery(),
            self.1.elapsed(),
            if std::thread::panicking() {
                " (failed)"
            } else {
                ""
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing() {
    let _timer = timer("kill -9");
    let kills = if long() { 20 } else { 10 };
    let (broker, bootstrap) = broker();
    let scale = if long() { 3 } else { 1 };
    let sim = common::start_sim(|c| {
        c.leads = 2_000 * scale;
        c.customers = 800 * scale;
        c.transactions = 4_000 * scale;
        c.positions = 8_000 * scale;
        c.servers = 2;
        c.latency_ms = 5;
        c.change_rate = 5.0;
        c.malformed_rate = 0.01;
    })
    .await;
    let world = World::new(&sim, &bootstrap, "faults-kill", "");
    let started = Instant::now();
    let mut phases: HashMap<&str, usize> = HashMap::new();
    for n in 0..kills {
        let process = world.spawn(n);
        // Every other kill waits for the pollers first and the last third for the steady
        // state, so however slow or fast the machine, kills land in start-up and restore, in
        // the backfill and in steady state with the background changes.
        if n >= kills - kills / 3 {
            process
                .wait_for_phase("steady", Duration::from_secs(300))
                .await;
        } else if n % 2 == 1 {
            let deadline = Instant::now() + Duration::from_secs(120);
            while process.phase().await == "starting" {
                assert!(Instant::now() < deadline, "no poller within 120 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let at = Duration::from_millis(fastrand::u64(50..3_000));
        tokio::time::sleep(at).await;
        let phase = process.phase().await;
        *phases.entry(phase).or_default() += 1;
        process.kill_9();
    }
    let process = world.spawn(kills);
    process
        .wait_for_phase("steady", Duration::from_secs(300))
        .await;
    sim.pause_changes(true);
    let (committed, duplicates) = world.final_check_records(&sim, false).await;
    let (status, took) = process.terminate();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        phases.contains_key("backfill") && phases.contains_key("steady"),
        "the kills did not land both in the backfill and in steady state: {phases:?}"
    );
    // The same topics read_uncommitted: records of transactions a kill left aborted or
    // unfinished (read_committed does not see them). Reported, not asserted: since windows
    // are read at once the backfill is short and the steady state's transactions brief, so
    // 10 random kills may all land between transactions (seen once in a full run: 0 of
    // 14,677). That a kill inside an open transaction loses and duplicates nothing is
    // asserted by apache_kafka::the_broker_killed_with_a_transaction_open_loses_nothing_and_
    // duplicates_nothing, which checks the transaction was open (high watermark above the
    // last stable offset); here lost 0 and no duplicate are asserted whatever the kills hit.
    let (uncommitted, aborted) = world.uncommitted(&committed).await;
    if exactly_once() && aborted == 0 {
        eprintln!(
            "faults: kill -9: no kill landed in an open transaction this time ({kills} kills, {phases:?})"
        );
    }
    eprintln!(
        "faults: kill -9 ({}, {}): {kills} kills ({phases:?}), {} events read read_committed, {uncommitted} read_uncommitted ({aborted} of aborted or unfinished transactions), {} keys, lost 0, {duplicates} duplicates{}, {} changes made, {:.0?}",
        broker.name(),
        delivery(),
        committed.len(),
        truth_count(&sim),
        if exactly_once() {
            " (no eventId twice, no dead letter twice)"
        } else {
            ", each with its twin's eventId"
        },
        sim.changes().len(),
        started.elapsed()
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_at_every_phase_exits_0_within_10_s_and_starts_nothing_after() {
    let _timer = timer("SIGTERM at every phase");
    let (_broker, bootstrap) = broker();
    let sim = common::start_sim(|c| medium(c, 3)).await;
    let world = World::new(&sim, &bootstrap, "faults-term", "");
    // At the first poll, mid-backfill, in steady state, and last during the restore (with
    // the state of the runs before to read).
    for (n, phase) in ["first poll", "backfill", "steady", "restore"]
        .into_iter()
        .enumerate()
    {
        let process = world.spawn(n);
        let logged = |line: &str| {
            std::fs::read_to_string(&process.log)
                .unwrap()
                .contains(line)
        };
        let wait_for_line = |line: &'static str| async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !logged(line) {
                assert!(Instant::now() < deadline, "no {line:?} within 60 s");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        match phase {
            "restore" => wait_for_line("operations server listening").await,
            "first poll" => wait_for_line("polling positions of server").await,
            "backfill" => {
                process
                    .wait_for_phase("backfill", Duration::from_secs(60))
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            _ => {
                process
                    .wait_for_phase("steady", Duration::from_secs(300))
                    .await
            }
        }
        let restored = logged("state restored");
        let log = process.log.clone();
        let (status, took) = process.terminate();
        assert!(
            status.success(),
            "SIGTERM at {phase}: {status:?}; see {log:?}"
        );
        assert!(
            took < Duration::from_secs(10),
            "SIGTERM at {phase}: {took:?}"
        );
        let after = log_after(&log, "shutdown requested");
        assert!(!after.is_empty(), "SIGTERM at {phase}: not logged");
        let started: Vec<&String> = after
            .iter()
            .filter(|l| l.contains("polling positions of server"))
            .collect();
        assert!(
            started.is_empty(),
            "SIGTERM at {phase}: a poller started after shutdown was requested: {started:?}"
        );
        eprintln!(
            "faults: SIGTERM at {phase}: exit 0 in {took:?} (state restored before: {restored})"
        );
    }
    let process = world.spawn(9);
    process
        .wait_for_phase("steady", Duration::from_secs(300))
        .await;
    world.final_check(&sim, true).await;
    process.terminate();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_restore_waits_for_kafka_exits_at_once() {
    let _timer = timer("SIGTERM during the restore");
    // Clients reach the broker (Apache Kafka, or tansu if FAULTS_BROKER says so; never
    // FAULTS_KAFKA, which cannot be told to advertise the gate) through a gate that holds
    // every write to the state topic: the start-up barrier never lands, so the restore waits
    // (up to kafka.batch_timeout_secs, 60).
    let gate_addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let broker = if tansu() {
        Broker::Tansu {
            tansu: common::Tansu::start_advertising(Some(gate_addr)),
            _storage: None,
        }
    } else {
        Broker::Apache(common::ApacheKafka::start_with(common::KafkaSetup {
            properties: vec![(
                "advertised.listeners".into(),
                format!("PLAINTEXT://{gate_addr}"),
            )],
            ..Default::default()
        }))
    };
    let gate = common::KafkaGate::start(gate_addr, &broker.bootstrap()).await;
    let sim = common::start_sim(small).await;
    let world = World::new(&sim, &gate_addr.to_string(), "faults-restore", "");
    gate.hold_produce_to(&format!("{}._ibstream_state", world.prefix));
    let process = world.spawn(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !gate.held() {
        assert!(Instant::now() < deadline, "no barrier write within 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = process.log.clone();
    let (status, took) = process.terminate();
    gate.open();
    assert!(status.success(), "{status:?}; see {log:?}");
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM waited for the restore: {took:?}"
    );
    let printed = std::fs::read_to_string(&log).unwrap();
    assert!(
        !printed.contains("state restored"),
        "the restore was not under way"
    );
    assert!(!printed.contains("polling"), "a poller started");
    eprintln!("faults: SIGTERM while the restore waits for Kafka: exit 0 in {took:?}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_killed_and_restarted_mid_backfill_is_waited_for() {
    let _timer = timer("CRM down and back");
    let (_broker, bootstrap) = broker();
    let mut sim = common::start_sim(|c| medium(c, 2)).await;
    let world = World::new(&sim, &bootstrap, "faults-crm", "");
    let process = world.spawn(0);
    process
        .wait_for_phase("backfill", Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = tokio::spawn(sim.restart(Duration::from_secs(15)));
    // Not ready while the CRM is down.
    let deadline = Instant::now() + Duration::from_secs(14);
    let mut not_ready = None;
    while Instant::now() < deadline {
        if let Some((503, body)) = process.get("/health/ready").await {
            not_ready = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let not_ready = not_ready.expect("/health/ready stayed ready while the CRM was down");
    assert!(
        not_ready["reason"].as_str().unwrap().contains("CRM"),
        "{not_ready}"
    );
    sim = restarted.await.unwrap().unwrap();
    process
        .wait_for_phase("steady", Duration::from_secs(300))
        .await;
    assert_eq!(process.get("/health/ready").await.unwrap().0, 200);
    let (records, duplicates) = world.final_check(&sim, true).await;
    let (status, _) = process.terminate();
    assert!(status.success());
    eprintln!(
        "faults: CRM down 15 s mid-backfill: not ready meanwhile ({}), {records} events, lost 0, {duplicates} duplicates",
        not_ready["reason"]
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crm_at_its_worst_at_once() {
    let _timer = timer("CRM at its worst");
    let (_broker, bootstrap) = broker();
    let sim = common::start_sim(|c| {
        small(c);
        c.fail_rate = 0.1;
        c.max_rps = 40;
        c.latency_ms = 50;
        c.token_ttl_secs = 5;
        c.shuffle_pages = true;
        c.unstable_order = true;
        c.change_rate = 20.0;
        c.malformed_rate = 0.01;
    })
    .await;
    // More requests per second than the CRM allows, so it answers 429s; retries enough for
    // a CRM failing one call in ten.
    let world = World::new(
        &sim,
        &bootstrap,
        "faults-worst",
        "requests_per_second = 100\nmax_retries = 20",
    );
    // A loaded machine (or the slower exactly-once sink) may never outrun max_rps: a burst of
    // 429s (Retry-After: 1) at the start makes sure the run meets them.
    sim.rate_limit_data_next(3, "1");
    let process = world.spawn(0);
    process
        .wait_for_phase("steady", Duration::from_secs(600))
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    sim.pause_changes(true);
    let (records, duplicates) = world.final_check(&sim, false).await;
    let (status, _) = process.terminate();
    assert!(status.success());
    let stats = sim.stats().snapshot();
    assert!(stats["failures"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["rateLimited"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["unauthorized"].as_u64().unwrap() > 0, "{stats}");
    eprintln!(
        "faults: CRM at its worst: {records} events, lost 0, {duplicates} duplicates, {} changes, CRM {stats}",
        sim.changes().len()
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_mid_run_stops_one_stream_and_is_gone_after_a_restart() {
    let _timer = timer("403 mid-run");
    let (_broker, bootstrap) = broker();
    let sim = common::start_sim(small).await;
    let world = World::new(&sim, &bootstrap, "faults-403", "");
    let process = world.spawn(0);
    process
        .wait_for_phase("steady", Duration::from_secs(300))
        .await;
    sim.deny(Kind::Transactions, true);
    // New records everywhere: the other streams go on, transactions cannot.
    sim.mutate(60, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let stopped = loop {
        let (_, status) = process.get("/status").await.unwrap();
        let transactions = status["pollers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["stream"] == "transactions")
            .cloned()
            .unwrap();
        let error = transactions["lastError"]["message"].as_str().unwrap_or("");
        if error.contains("HTTP 403") {
            break error.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "transactions did not stop on 403: {transactions}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The other streams went on: each completed a cycle after the 403 was seen.
    let seen = chrono::Utc::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, status) = process.get("/status").await.unwrap();
        let behind: Vec<String> = status["pollers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["stream"] != "transactions")
            .filter(|p| {
                p["lastSuccess"]
                    .as_str()
                    .is_none_or(|at| chrono::DateTime::parse_from_rfc3339(at).unwrap() < seen)
            })
            .map(|p| p["name"].to_string())
            .collect();
        if behind.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{behind:?} stopped with transactions"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = process.log.clone();
    let (status, _) = process.terminate();
    assert!(
        !status.success(),
        "a stopped stream is a failed run: {status:?}"
    );
    let printed = std::fs::read_to_string(&log).unwrap();
    assert!(
        printed.contains("error: transactions stopped"),
        "the exit names the stopped stream; see {log:?}"
    );
    sim.deny(Kind::Transactions, false);
    let process = world.spawn(1);
    process
        .wait_for_phase("steady", Duration::from_secs(300))
        .await;
    let (records, duplicates) = world.final_check(&sim, true).await;
    process.terminate();
    eprintln!(
        "faults: 403 mid-run: transactions stopped ({}), the rest went on; after a restart {records} events, lost 0, {duplicates} duplicates",
        stopped
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_killed_for_30_s_during_backfill_and_steady_state() {
    let _timer = timer("broker killed");
    let mut broker = Broker::start(true);
    let bootstrap = broker.bootstrap();
    if let Broker::External(_) = broker {
        eprintln!(
            "faults: broker stop skipped: FAULTS_KAFKA names a broker this suite cannot stop"
        );
        return;
    }
    let sim = common::start_sim(|c| medium(c, 2)).await;
    let world = World::new(&sim, &bootstrap, "faults-broker", "");
    // The outage outlasts the batch timeout, which is also the transaction timeout: the
    // broker aborts the open transaction itself when it is back.
    world.batch_timeout(20);
    let mut process = world.spawn(0);
    let mut runs = 1;
    let mut exits = Vec::new();
    let down = Duration::from_secs(30);
    for phase in ["backfill", "steady"] {
        process
            .wait_for_phase(phase, Duration::from_secs(300))
            .await;
        if phase == "backfill" {
            tokio::time::sleep(Duration::from_millis(500)).await;
        } else {
            sim.mutate(50, None);
        }
        // SIGKILL: in the backfill a transaction (exactly-once) or a batch is open.
        broker.kill();
        let stopped = Instant::now();
        let mut not_ready = false;
        while stopped.elapsed() < down {
            if let Some((503, _)) = process.get("/health/ready").await {
                not_ready = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        broker.restart();
        eprintln!(
            "faults: broker ({}) killed for {down:?} during {phase} (not ready meanwhile: {not_ready}), back in {:.1?}",
            broker.name(),
            stopped.elapsed() - down
        );
        // The process may go on, or stop naming the transaction the broker aborted (never
        // "another process took over"): then it is started again, as Kubernetes would. Its
        // abort is retried for up to a batch timeout after the broker is back: wait past that.
        let exited = if exactly_once() {
            process.exited_within(Duration::from_secs(45)).await
        } else {
            None
        };
        if let Some(exit) = exited {
            exits.push(exit.code());
            let printed = std::fs::read_to_string(&process.log).unwrap();
            assert!(
                printed.contains("longer than kafka.batch_timeout_secs"),
                "ibstream run exited ({exit:?}) without naming the transaction timeout; see {:?}",
                process.log
            );
            assert!(
                !printed.contains("took over"),
                "ibstream run blamed another process for a broker outage; see {:?}",
                process.log
            );
            process = world.spawn(runs);
            runs += 1;
        }
    }
    process
        .wait_for_phase("steady", Duration::from_secs(300))
        .await;
    let (committed, duplicates) = world.final_check_records(&sim, true).await;
    let log = process.log.clone();
    let (status, _) = process.terminate();
    assert!(status.success(), "{status:?}");
    let (uncommitted, aborted) = world.uncommitted(&committed).await;
    // In exactly-once the outages outlasted open transactions: the run saw them fail (and
    // the broker abort them), so the scenario is about transactions, not idle moments.
    // Every run's log (run-0.log, run-1.log, … beside the last).
    let printed: String = (0..runs)
        .map(|n| {
            std::fs::read_to_string(log.with_file_name(format!("run-{n}.log"))).unwrap_or_default()
        })
        .collect();
    let failed = printed.matches("kafka transaction failed").count();
    let lost = printed.matches("kafka transaction lost").count();
    if exactly_once() {
        assert!(
            failed > 0,
            "no transaction failed while the broker was down; see {log:?}"
        );
    }
    eprintln!(
        "faults: broker killed twice ({}, {}): {} events read_committed, {uncommitted} read_uncommitted ({aborted} of aborted or unfinished transactions), lost 0, {duplicates} duplicates; transactions failed {failed}, lost to the broker {lost} (a new producer each); exits naming the transaction timeout {exits:?} (then started again)",
        broker.name(),
        delivery(),
        committed.len()
    );
    sim.shutdown().await;
}

/// Runs `ibstream` with `args` and `env` to completion (or `timeout`); returns what it printed.
fn printed(args: &[&str], env: &[(&str, String)], timeout: Duration) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ibstream"));
    command.args(args).env("IBSTREAM_LOG", "trace");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = command
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(out.path()).unwrap())
}

/// Fails naming the secret and the place it was found in.
fn assert_no_secret(place: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "the secret {secret:?} appears in {place}:\n{}",
            text.lines()
                .filter(|l| l.contains(secret))
                .take(3)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_anything_any_command_prints_serves_or_writes() {
    let _timer = timer("secrets sweep");
    const CRM_PASSWORD: &str = "crm-pw-Qx7-secret-4471";
    const CRM_API_KEY: &str = "crm-key-Qx7-secret-9931";
    const SASL_PASSWORD: &str = "sasl-pw-Qx7-secret-5512";
    // The test registry accepts this password only.
    const REGISTRY_PASSWORD: &str = "sr-pass";
    let secrets = [CRM_PASSWORD, CRM_API_KEY, SASL_PASSWORD, REGISTRY_PASSWORD];
    let (_broker, bootstrap) = broker();
    let registry = common::start_registry().await;
    let sim = common::start_sim(|c| {
        c.leads = 800;
        c.customers = 300;
        c.transactions = 1_000;
        c.positions = 1_500;
        c.servers = 2;
        c.malformed_rate = 0.02;
        c.password = CRM_PASSWORD.to_owned();
        c.api_key = CRM_API_KEY.to_owned();
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, secret: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        path.display().to_string()
    };
    let (crm_password_file, api_key_file) = (
        file("crm-password", CRM_PASSWORD),
        file("crm-api-key", CRM_API_KEY),
    );
    let (sasl_file, registry_file) = (
        file("sasl-password", SASL_PASSWORD),
        file("registry-password", REGISTRY_PASSWORD),
    );
    let prefix = common::unique_topic("secrets");
    let http = format!("127.0.0.1:{}", common::free_port());
    // Two ways to give every secret: (a) CRM password and registry password from files, the
    // API key and the SASL password from the environment; (b) the other way round.
    let config = |way: char, sasl: bool| {
        let (crm, registry_auth, env) = match way {
            'a' => (
                format!("password_file = \"{crm_password_file}\""),
                format!("password_file = \"{registry_file}\""),
                vec![
                    ("IBSTREAM_CRM__API_KEY", CRM_API_KEY.to_owned()),
                    ("IBSTREAM_KAFKA__SASL_PASSWORD", SASL_PASSWORD.to_owned()),
                ],
            ),
            _ => (
                format!("api_key_file = \"{api_key_file}\""),
                format!("password = \"{REGISTRY_PASSWORD}\""),
                vec![
                    ("IBSTREAM_CRM__PASSWORD", CRM_PASSWORD.to_owned()),
                    ("IBSTREAM_KAFKA__SASL_PASSWORD_FILE", sasl_file.clone()),
                ],
            ),
        };
        let security = if sasl {
            "protocol = \"SASL_PLAINTEXT\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"ibstream\"\n"
        } else {
            ""
        };
        // The secrets come from files and the environment only.
        let path = dir.path().join(format!("{way}-{sasl}.toml"));
        ConfigFile::new(&sim.base_url(), &prefix, &bootstrap)
            .remove("crm.password")
            .remove("crm.api_key")
            .set_lines("crm", &crm)
            .set("schema_registry.url", registry.url.as_str())
            .set("schema_registry.username", "sr-user")
            .set_lines("schema_registry", &registry_auth)
            .set("kafka.delivery", delivery())
            .set("kafka.instance_id", format!("{prefix}-{way}"))
            .set("kafka.batch_timeout_secs", 10)
            .set_lines("kafka.security", security)
            .set("http.listen", http.as_str())
            .set("streams.leads.poll_interval_secs", 1)
            .save(&path);
        let mut env = env;
        env.push(("IBSTREAM_CONFIG", path.display().to_string()));
        env
    };
    // SASL against a broker without it: `run` could not start, so SASL goes to the commands
    // that report failures (`check`) and to `check --config-only`; the secret is still read.
    let mut sizes = Vec::new();
    for way in ['a', 'b'] {
        let env = config(way, true);
        let (code, text) = printed(&["check", "--config-only"], &env, Duration::from_secs(30));
        assert_eq!(code, Some(0), "check --config-only ({way}): {text}");
        assert!(text.contains("[REDACTED]"), "{text}");
        assert_no_secret(&format!("check --config-only ({way})"), &text, &secrets);
        sizes.push(text.len());
        let (_, text) = printed(&["check"], &env, Duration::from_secs(90));
        assert!(text.contains("crm"), "check printed nothing useful: {text}");
        assert_no_secret(&format!("check with SASL ({way})"), &text, &secrets);
        sizes.push(text.len());
    }
    // `run` at TRACE, with dead letters, /metrics and /status read while it runs.
    let mut env = config('a', false);
    env.push(("IBSTREAM_LOG", "trace".to_owned()));
    let log = dir.path().join("run.log");
    let process = Process::spawn(&["run"], &env, &http, log.clone());
    process
        .wait_for_phase("steady", Duration::from_secs(300))
        .await;
    // The CRM's session tokens are secrets too: the one used so far, and after a forced
    // re-login (at TRACE) the next.
    let mut tokens = sim.tokens();
    let logins = sim
        .stats()
        .logins
        .load(std::sync::atomic::Ordering::Relaxed);
    sim.expire_tokens();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sim
        .stats()
        .logins
        .load(std::sync::atomic::Ordering::Relaxed)
        == logins
    {
        assert!(Instant::now() < deadline, "no re-login within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokens.extend(sim.tokens());
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let status = reqwest::get(format!("http://{http}/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (code, _) = process.terminate();
    assert!(code.success());
    let run_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        run_log.contains("TRACE") || run_log.contains("\"level\":\"TRACE\""),
        "the run did not log at TRACE"
    );
    assert!(metrics.contains("ibstream_events"), "{metrics}");
    assert_no_secret("ibstream run's output at TRACE", &run_log, &secrets);
    assert_no_secret("/metrics", &metrics, &secrets);
    assert_no_secret("/status", &status, &secrets);
    let malformed = malformed_truth(&sim).len();
    assert!(malformed > 0);
    let letters = consume(
        &bootstrap,
        &[format!("{prefix}.dlq")],
        malformed,
        Duration::from_secs(2),
    )
    .await;
    let letters: String = letters
        .iter()
        .map(|l| String::from_utf8_lossy(&l.payload).into_owned())
        .collect();
    assert_no_secret("the dead-letter topic", &letters, &secrets);
    assert!(tokens.len() >= 2, "{tokens:?}");
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    assert_no_secret(
        "ibstream run's output at TRACE (tokens)",
        &run_log,
        &token_refs,
    );
    // `state show` of what the run wrote.
    let (code, text) = printed(&["state", "show"], &env, Duration::from_secs(60));
    assert_eq!(code, Some(0), "state show: {text}");
    assert_no_secret("state show", &text, &secrets);
    // `demo`: its own simulator and in-process Kafka; none of these secrets is its, and its
    // simulator's password must not show either.
    let (code, text) = printed(&["demo", "--for", "8"], &[], Duration::from_secs(120));
    assert_eq!(code, Some(0), "demo: {text}");
    assert_no_secret(
        "demo at TRACE",
        &text,
        &[&secrets[..], &["ib-secret", "sim-api-key"]].concat(),
    );
    eprintln!(
        "faults: secrets: none of 4 secrets (files and environment, both ways) in check --config-only, check (SASL), run at TRACE ({} bytes), /metrics, /status, {malformed} dead letters, state show, demo ({} bytes); outputs {sizes:?} bytes",
        run_log.len(),
        text.len()
    );
    sim.shutdown().await;
}
