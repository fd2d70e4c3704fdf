//! ibstream through the secured listeners of a real Apache Kafka broker (the version of
//! `tests/kafka/pom.xml`): SCRAM-SHA-512 over SASL_PLAINTEXT, SCRAM over TLS (SASL_SSL) with a
//! test CA, and mutual TLS (SSL with `ssl.client.auth=required`). For each, `ibstream run` (the
//! binary, exactly-once, the default) streams a small simulator dataset through that listener
//! and the topics, read back `read_committed` through the PLAINTEXT listener, hold every truth
//! record exactly once. The mistakes a user makes – a wrong SASL password, a CA that did not
//! sign the broker's certificate, no client certificate for a listener that wants one – end
//! `run` and fail `check` within a bounded time, naming the key to fix. Neither the SASL
//! password nor the client's private key shows in anything ibstream prints, serves or writes.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::kafka::pem_tls_properties;
use common::topics::{consume, consume_isolated, group};
use common::truth::{expected, without_meta};
use common::{ApacheKafka, ConfigFile, KafkaSetup};
use ibstream::events::Schemas;
use ibstream::sim::SimHandle;
use serde_json::Value as Json;

const USER: &str = "ibstream";
const SASL_PASSWORD: &str = "scram-pw-Vt8-secret-2093";
const STREAMS: [&str; 5] = ["leads", "customers", "transactions", "servers", "positions"];
/// How long a refused connection may take to end `run` or fail `check`: well below the 30 s
/// `run` waits for brokers that do not answer (a refusal is told at once, not at that timeout).
const REFUSAL_BOUND: Duration = Duration::from_secs(20);

/// The secured listener a test streams through.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Listener {
    /// SASL_PLAINTEXT, SCRAM-SHA-512.
    Scram,
    /// SASL_SSL, SCRAM-SHA-512 over TLS.
    ScramTls,
    /// SSL with `ssl.client.auth=required`.
    MutualTls,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::Scram => "SCRAM",
            Listener::ScramTls => "SCRAMTLS",
            Listener::MutualTls => "MTLS",
        }
    }

    fn protocol(self) -> &'static str {
        match self {
            Listener::Scram => "SASL_PLAINTEXT",
            Listener::ScramTls => "SASL_SSL",
            Listener::MutualTls => "SSL",
        }
    }
}

/// A broker with a PLAINTEXT listener (for the test's own reads) and `listener`, its PKI in
/// `pki` (made by `common::test_pki`), the SCRAM user made when the storage is formatted.
fn secured_broker(pki: &Path, listener: Listener) -> ApacheKafka {
    let lower = listener.name().to_lowercase();
    let jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;";
    let mut properties: Vec<(String, String)> = pem_tls_properties(
        pki,
        &pki.join("server.key"),
        &pki.join("server.pem"),
        &pki.join("ca.pem"),
    );
    match listener {
        Listener::Scram | Listener::ScramTls => {
            properties.push(("sasl.enabled.mechanisms".into(), "SCRAM-SHA-512".into()));
            properties.push((
                format!("listener.name.{lower}.scram-sha-512.sasl.jaas.config"),
                jaas.into(),
            ));
        }
        Listener::MutualTls => {
            properties.push((
                format!("listener.name.{lower}.ssl.client.auth"),
                "required".into(),
            ));
        }
    }
    ApacheKafka::start_with(KafkaSetup {
        listeners: vec![(listener.name().into(), listener.protocol().into())],
        properties,
        format_args: vec![
            "--add-scram".into(),
            format!("SCRAM-SHA-512=[name={USER},password={SASL_PASSWORD}]"),
        ],
    })
}

/// A folder with the test PKI: CA, server certificate for 127.0.0.1, client certificate, and
/// a second CA nobody trusts.
fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::test_pki(dir.path());
    common::test_pki_client_and_other_ca(dir.path());
    dir
}

/// The secrets of these runs: the SASL password, and the clients' private keys whole and each
/// line of their base64 bodies (a piece of one printed shows too).
fn secrets(pki: &Path) -> Vec<String> {
    let mut out = vec![SASL_PASSWORD.to_owned()];
    for file in ["client.key", "other-client.key"] {
        let key = std::fs::read_to_string(pki.join(file)).unwrap();
        out.push(key.trim().to_owned());
        out.extend(
            key.lines()
                .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                .map(str::to_owned),
        );
    }
    out
}

/// Fails naming the secret and the place it was found in.
fn assert_no_secret(place: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "a secret ({}…) appears in {place}",
            &secret[..6]
        );
    }
}

/// A configuration of `ibstream run` against `bootstrap` with `security` (the lines of the
/// `[kafka.security]` table) and `kafka` (further `[kafka]` lines); written into `dir`.
fn write_config(
    dir: &Path,
    name: &str,
    sim: &SimHandle,
    bootstrap: &str,
    prefix: &str,
    kafka: &str,
    security: &str,
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let toml = ConfigFile::new(&sim.base_url(), prefix, bootstrap)
        .set("kafka.batch_timeout_secs", 30)
        .set_lines("kafka", kafka)
        .set_lines("kafka.security", security)
        .fast_polls()
        .to_toml();
    std::fs::write(&path, toml).unwrap();
    path
}

/// One `ibstream` process, everything it prints in `log`; killed on drop.
struct Process {
    child: Child,
    http: String,
    log: PathBuf,
    started: Instant,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Starts `ibstream --config <config> <args>` at TRACE with `env`, serving on a free port.
    fn spawn(config: &Path, args: &[&str], env: &[(&str, String)], log: PathBuf) -> Process {
        let out = std::fs::File::create(&log).unwrap();
        let http = format!("127.0.0.1:{}", common::free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_ibstream"));
        command
            .arg("--config")
            .arg(config)
            .args(args)
            .env("IBSTREAM_HTTP__LISTEN", &http)
            .env("IBSTREAM_LOG", "trace");
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Process {
            child,
            http,
            log,
            started: Instant::now(),
        }
    }

    /// Waits until the process exits (at most `bound`); returns its status, the time from its
    /// start, and what it printed.
    fn exit_within(mut self, bound: Duration) -> (ExitStatus, Duration, String) {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let took = self.started.elapsed();
                return (status, took, std::fs::read_to_string(&self.log).unwrap());
            }
            assert!(
                self.started.elapsed() < bound,
                "ibstream still runs after {bound:?}; see {:?}",
                self.log
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits (at most 30 s) for the exit.
    fn terminate(self) -> ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let bound = self.started.elapsed() + Duration::from_secs(30);
        let (status, _, _) = self.exit_within(bound);
        status
    }

    async fn get(&self, path: &str) -> Option<String> {
        let response = reqwest::Client::new()
            .get(format!("http://{}{path}", self.http))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        response.text().await.ok()
    }

    /// Waits until every poller finished its backfill (`/status`), at most `timeout`.
    async fn wait_until_steady(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let status: Option<Json> = self
                .get("/status")
                .await
                .and_then(|s| serde_json::from_str(&s).ok());
            let pollers = status
                .as_ref()
                .and_then(|s| s["pollers"].as_array().cloned())
                .unwrap_or_default();
            if !pollers.is_empty()
                && pollers
                    .iter()
                    .all(|p| p["backfillProgress"].as_f64() == Some(1.0))
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "ibstream run exited ({status}):\n{}",
                    tail(&std::fs::read_to_string(&self.log).unwrap())
                );
            }
            assert!(
                Instant::now() < deadline,
                "no steady state within {timeout:?}; see {:?}",
                self.log
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The last 40 lines of `text`.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Reads the data topics of `prefix` `read_committed` and asserts they hold every truth record
/// exactly once (the simulator makes no change meanwhile: one event per record) with the
/// truth's values; returns the events read.
async fn assert_exactly_the_truth(bootstrap: &str, sim: &SimHandle, prefix: &str) -> usize {
    let schemas = Schemas::load("com.ibstream").unwrap();
    let truth: HashMap<&str, _> = STREAMS.iter().map(|s| (*s, expected(sim, s))).collect();
    let count: usize = truth.values().map(HashMap::len).sum();
    let topics: Vec<String> = STREAMS.iter().map(|s| format!("{prefix}.{s}")).collect();
    let records = consume(bootstrap, &topics, count, Duration::from_secs(2)).await;
    let got = group(&schemas, prefix, &records);
    for (stream, records) in &truth {
        for (key, body) in records {
            let events = got
                .get(*stream)
                .and_then(|keys| keys.get(key))
                .unwrap_or_else(|| panic!("{stream} {key}: no event"));
            assert_eq!(events.len(), 1, "{stream} {key}: {} events", events.len());
            assert_eq!(&without_meta(&events[0]), body, "{stream} {key}");
        }
    }
    assert_eq!(records.len(), count, "events not in the truth");
    records.len()
}

/// Everything the run wrote under `prefix` (data, dead letters, state), read uncommitted, as
/// text: for the secrets sweep.
async fn everything_written(bootstrap: &str, prefix: &str) -> String {
    let mut topics: Vec<String> = STREAMS.iter().map(|s| format!("{prefix}.{s}")).collect();
    topics.push(format!("{prefix}.dlq"));
    topics.push(format!("{prefix}._ibstream_state"));
    let records = consume_isolated(
        bootstrap,
        &topics,
        1,
        Duration::from_secs(2),
        "read_uncommitted",
    )
    .await;
    records
        .iter()
        .map(|r| format!("{} {}\n", r.key, String::from_utf8_lossy(&r.payload)))
        .collect()
}

/// `ibstream run` streams the simulator through `listener` with the `security` lines (and
/// `kafka` lines, `env`), the topics hold the truth exactly once, and nothing it printed,
/// served or wrote holds a secret. Returns the events read and the wall time to steady state.
async fn streams_through(
    broker: &ApacheKafka,
    pki: &Path,
    listener: Listener,
    kafka: &str,
    security: &str,
    env: &[(&str, String)],
) -> (usize, Duration) {
    let sim = common::start_sim(|c| c.malformed_rate = 0.02).await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = common::unique_topic(&listener.name().to_lowercase());
    let config = write_config(
        dir.path(),
        "run",
        &sim,
        &broker.listener(listener.name()),
        &prefix,
        kafka,
        security,
    );
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-run.log"));
    let mut run = Process::spawn(&config, &["run"], env, log.clone());
    run.wait_until_steady(Duration::from_secs(180)).await;
    let steady = run.started.elapsed();
    let metrics = run.get("/metrics").await.unwrap();
    let status = run.get("/status").await.unwrap();
    assert!(metrics.contains("ibstream_events"), "{metrics}");
    let events = assert_exactly_the_truth(&broker.bootstrap, &sim, &prefix).await;
    let code = run.terminate();
    assert!(code.success(), "run exited {code}");
    let printed = std::fs::read_to_string(&log).unwrap();
    assert!(printed.contains("TRACE"), "the run did not log at TRACE");
    let secrets = secrets(pki);
    assert_no_secret("ibstream run's output at TRACE", &printed, &secrets);
    assert_no_secret("/metrics", &metrics, &secrets);
    assert_no_secret("/status", &status, &secrets);
    let written = everything_written(&broker.bootstrap, &prefix).await;
    assert_no_secret("the topics", &written, &secrets);
    // `check` through the same listener passes every Kafka line, transactions included.
    let check = Process::spawn(&config, &["check"], env, dir.path().join("check.log"));
    let (code, _, text) = check.exit_within(Duration::from_secs(90));
    assert!(code.success(), "check through {listener:?}: {text}");
    assert!(
        text.lines()
            .any(|l| l.contains("kafka transactions") && l.contains(" ok")),
        "{text}"
    );
    assert_no_secret("ibstream check's output at TRACE", &text, &secrets);
    sim.shutdown().await;
    eprintln!(
        "kafka_security: {listener:?}: {events} events exactly once, steady after {steady:.1?}; run output {} bytes, {} bytes written, no secret in them",
        printed.len(),
        written.len()
    );
    (events, steady)
}

/// `ibstream run`, `check` and `state show` with `security` (a refused connection) end within
/// [`REFUSAL_BOUND`], non-zero, with an error line naming every one of `keys`; returns the
/// first such line of each, with its wall time.
async fn refused(
    broker: &ApacheKafka,
    pki: &Path,
    listener: Listener,
    kafka: &str,
    security: &str,
    env: &[(&str, String)],
    keys: &[&str],
) -> Vec<(String, Duration)> {
    let sim = common::start_sim(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = common::unique_topic("refused");
    let config = write_config(
        dir.path(),
        "refused",
        &sim,
        &broker.listener(listener.name()),
        &prefix,
        kafka,
        security,
    );
    let secrets = secrets(pki);
    let mut out = Vec::new();
    for command in ["run", "check", "state show"] {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{prefix}-{}.log", command.replace(' ', "-")));
        let (code, took, text) =
            Process::spawn(&config, &command.split(' ').collect::<Vec<_>>(), env, log)
                .exit_within(REFUSAL_BOUND);
        assert!(!code.success(), "{command} succeeded:\n{}", tail(&text));
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("error"))
            .collect();
        for key in keys {
            assert!(
                errors.iter().any(|l| l.contains(key)),
                "{command}: no error naming {key} (after {took:.1?}):\n{}",
                tail(&text)
            );
        }
        assert_no_secret(&format!("ibstream {command}'s refusal"), &text, &secrets);
        let said = errors
            .iter()
            .find(|l| l.contains(keys[0]))
            .map_or(String::new(), |l| (*l).to_owned());
        eprintln!("kafka_security: {listener:?} {command} refused after {took:.1?}: {said}");
        out.push((said, took));
    }
    sim.shutdown().await;
    out
}

fn path(pki: &Path, name: &str) -> String {
    pki.join(name).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_512_over_sasl_plaintext_streams_exactly_once_and_a_wrong_password_is_named() {
    let pki = pki();
    let broker = secured_broker(pki.path(), Listener::Scram);
    let security = format!(
        "protocol = \"SASL_PLAINTEXT\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"{USER}\"\n"
    );
    refused(
        &broker,
        pki.path(),
        Listener::Scram,
        "",
        &security,
        &[(
            "IBSTREAM_KAFKA__SASL_PASSWORD",
            format!("{SASL_PASSWORD}-wrong"),
        )],
        &["kafka.sasl_password"],
    )
    .await;
    // The password from the environment.
    streams_through(
        &broker,
        pki.path(),
        Listener::Scram,
        "",
        &security,
        &[("IBSTREAM_KAFKA__SASL_PASSWORD", SASL_PASSWORD.to_owned())],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_over_tls_streams_exactly_once_and_an_untrusted_certificate_is_named() {
    let pki = pki();
    let broker = secured_broker(pki.path(), Listener::ScramTls);
    let password_file = pki.path().join("sasl-password");
    std::fs::write(&password_file, format!("{SASL_PASSWORD}\n")).unwrap();
    let kafka = format!("sasl_password_file = \"{}\"", password_file.display());
    let security = |ca: &str| {
        format!(
            "protocol = \"SASL_SSL\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"{USER}\"\nca_file = \"{}\"\n",
            path(pki.path(), ca)
        )
    };
    refused(
        &broker,
        pki.path(),
        Listener::ScramTls,
        &kafka,
        &security("other-ca.pem"),
        &[],
        &["kafka.security.ca_file"],
    )
    .await;
    // The password from a file.
    streams_through(
        &broker,
        pki.path(),
        Listener::ScramTls,
        &kafka,
        &security("ca.pem"),
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_streams_exactly_once_and_a_missing_or_untrusted_client_certificate_is_named() {
    let pki = pki();
    let broker = secured_broker(pki.path(), Listener::MutualTls);
    let ca = format!(
        "protocol = \"SSL\"\nca_file = \"{}\"\n",
        path(pki.path(), "ca.pem")
    );
    let with_cert = format!(
        "{ca}cert_file = \"{}\"\nkey_file = \"{}\"\n",
        path(pki.path(), "client.pem"),
        path(pki.path(), "client.key")
    );
    refused(
        &broker,
        pki.path(),
        Listener::MutualTls,
        "",
        &ca,
        &[],
        &["kafka.security.cert_file"],
    )
    .await;
    // A client certificate a CA the broker does not trust signed.
    let other_cert = format!(
        "{ca}cert_file = \"{}\"\nkey_file = \"{}\"\n",
        path(pki.path(), "other-client.pem"),
        path(pki.path(), "other-client.key")
    );
    refused(
        &broker,
        pki.path(),
        Listener::MutualTls,
        "",
        &other_cert,
        &[],
        &["kafka.security.cert_file"],
    )
    .await;
    streams_through(
        &broker,
        pki.path(),
        Listener::MutualTls,
        "",
        &with_cert,
        &[],
    )
    .await;
}
