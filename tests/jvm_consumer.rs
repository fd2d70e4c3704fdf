//! A JVM consumer reads what ibstream writes: `ibstream run` (the binary, exactly-once) streams
//! the simulator into Apache Kafka, then the Java program of `tests/interop/jvm` (kafka-clients
//! 4.1.1 with `read_committed`, Avro Java) reads every data topic to its last stable offset,
//! decodes each value with the project's `schemas/*.avsc` and prints each key's latest value.
//! The test compares that with the simulator's `/_sim/truth` – every key, every field – and
//! asserts that Java's default partitioner puts every key in the partition ibstream wrote it
//! to (so Kafka Streams and Flink jobs co-partition with the topics).
//!
//! Decimals compare as exact strings of `BigDecimal.toPlainString()`: the schemas give every
//! decimal scale 8, so Avro Java's `BigDecimal` always carries scale 8 and equal strings mean
//! the same unscaled value and scale (`BigDecimal.equals`, stricter than `compareTo`; the
//! CRM's `"1.5"` is `1.50000000` in the event, equal by value). Timestamps compare as instants
//! (epoch milliseconds of the ISO instant Java prints).
//!
//! `./scripts/test.sh` builds the Java program into `target/interop-jvm` with Maven.

#[path = "common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use common::ConfigFile;
use ibstream::sim::{ChangeKind, Kind, SimHandle};
use serde_json::{json, Value as Json};

const STREAMS: [&str; 5] = ["leads", "customers", "transactions", "servers", "positions"];
/// Partitions of the data topics (`kafka.topic_partitions`): several, so the partitioner
/// check means something.
const PARTITIONS: usize = 4;
/// The scale of every decimal in `schemas/*.avsc` (checked by [`decimal_scale_of_schemas`]).
const SCALE: u32 = 8;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Java program's classpath: its jar and `lib/` as `./scripts/test.sh` builds them.
fn classpath() -> String {
    let dir = root().join("target/interop-jvm");
    let jar = dir.join("interop-jvm.jar");
    assert!(
        jar.exists(),
        "no {}; ./scripts/test.sh builds it (mvn -q -B -f tests/interop/jvm/pom.xml package)",
        jar.display()
    );
    format!("{}:{}/lib/*", jar.display(), dir.display())
}

/// Every decimal of the schemas has scale [`SCALE`] (the expected values are written with it).
fn decimal_scale_of_schemas() {
    fn walk(node: &Json, found: &mut Vec<u64>) {
        match node {
            Json::Object(map) => {
                if map.get("logicalType") == Some(&json!("decimal")) {
                    found.push(map["scale"].as_u64().unwrap());
                }
                map.values().for_each(|v| walk(v, found));
            }
            Json::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root().join("schemas")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "avsc") {
            walk(
                &serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap(),
                &mut found,
            );
        }
    }
    assert!(!found.is_empty());
    assert!(found.iter().all(|s| *s == u64::from(SCALE)), "{found:?}");
}

/// An `ibstream run` process, killed on drop if still running.
struct Run {
    child: Child,
    http: String,
    log: PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Run {
    async fn status(&self) -> Option<Json> {
        let response = reqwest::Client::new()
            .get(format!("http://{}/status", self.http))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        serde_json::from_slice(&response.bytes().await.ok()?).ok()
    }

    /// Waits until every poller finished its backfill.
    async fn wait_steady(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if let Some(status) = self.status().await {
                let pollers = status["pollers"].as_array().cloned().unwrap_or_default();
                if !pollers.is_empty()
                    && pollers
                        .iter()
                        .all(|p| p["backfillProgress"].as_f64() == Some(1.0))
                {
                    return;
                }
            }
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "no steady state within 240 s; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every cursor of every poller has read through `since`: everything that
    /// existed then has been read and committed (`/status`'s `readThrough`, the start of the
    /// last cycle that read up to today, set once that cycle's cursor is committed).
    async fn wait_read_through(&mut self, since: chrono::DateTime<chrono::Utc>) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.status().await.expect("/status answers");
            let pollers = status["pollers"].as_array().cloned().unwrap_or_default();
            let behind: Vec<String> = pollers
                .iter()
                .flat_map(|p| {
                    let name = p["name"].as_str().unwrap_or_default().to_owned();
                    p["cursors"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|c| {
                            c["readThrough"]
                                .as_str()
                                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                                .is_none_or(|t| t <= since)
                        })
                        .map(move |c| format!("{name} {}", c["scope"]))
                })
                .collect();
            if !pollers.is_empty() && behind.is_empty() {
                return;
            }
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "not read through {since} within 120 s: {behind:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "ibstream run exited ({status}): {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    /// SIGTERM: the run commits what it has and exits 0.
    fn terminate(mut self) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "ibstream run exited {status} on SIGTERM; see {}",
                    self.log.display()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ibstream run ignored SIGTERM for 30 s; see {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How the run frames its values.
enum Framing<'a> {
    SingleObject,
    Confluent(&'a common::TestRegistry),
}

/// Starts `ibstream run` (exactly-once, [`PARTITIONS`] partitions per data topic) on `sim`.
fn spawn_run(sim: &SimHandle, bootstrap: &str, prefix: &str, framing: &Framing, dir: &Path) -> Run {
    let file = ConfigFile::new(&sim.base_url(), prefix, bootstrap)
        .set("crm.page_size", 200)
        .set("kafka.delivery", "exactly-once")
        .set("kafka.topic_partitions", PARTITIONS as i64)
        .set("kafka.batch_timeout_secs", 60)
        .fast_polls();
    let file = match framing {
        Framing::SingleObject => file,
        Framing::Confluent(registry) => file
            .set("schema_registry.url", registry.url.as_str())
            .set("schema_registry.username", "sr-user")
            .set("schema_registry.password", "sr-pass")
            .set("schema_registry.auto_register", true),
    };
    let config = file.write(dir);
    let log = dir.join("run.log");
    let out = std::fs::File::create(&log).unwrap();
    let http = format!("127.0.0.1:{}", common::free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_ibstream"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .env("IBSTREAM_HTTP__LISTEN", &http)
        .env("IBSTREAM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Run { child, http, log }
}

/// The expected event of each truth record (all fields but `meta`), by key, as JSON in the form
/// of [`plain`] – built as tests/pipeline's `expected` builds it: the truth read the way
/// ibstream reads a page, then its Avro value.
fn expected(sim: &SimHandle, stream: &str) -> HashMap<String, Json> {
    common::truth::expected_values(sim, stream)
        .into_iter()
        .map(|(key, value)| {
            let mut value = plain(&value);
            value.as_object_mut().unwrap().remove("meta");
            (key, value)
        })
        .collect()
}

/// The truth records of `stream` as the simulator serves them, by key (not read by ibstream).
fn raw_truth(sim: &SimHandle, stream: &str) -> HashMap<String, Json> {
    fn text(v: &Json) -> String {
        v.as_str().map_or_else(|| v.to_string(), str::to_owned)
    }
    let (kind, key): (Kind, fn(&Json) -> String) = match stream {
        "leads" => (Kind::Leads, |r| text(&r["id"])),
        "customers" => (Kind::Customers, |r| text(&r["customerId"])),
        "transactions" => (Kind::Transactions, |r| text(&r["id"])),
        "servers" => (Kind::Servers, |r| text(&r["id"])),
        "positions" => (Kind::Positions, |r| {
            format!("{}:{}", text(&r["serverTag"]), text(&r["positionId"]))
        }),
        _ => unreachable!(),
    };
    sim.truth(kind).into_iter().map(|r| (key(&r), r)).collect()
}

/// Checks Java's top-level decimals and timestamps against the raw truth record, independently
/// of ibstream's reading of it: a decimal equals the CRM's text (a string or a JSON number) by
/// value, a timestamp is the CRM's `YYYY-MM-DD HH:MM:SS` (the simulator's UTC) as an instant.
/// Returns the values checked.
fn check_against_raw(
    stream: &str,
    key: &str,
    java: &serde_json::Map<String, Json>,
    raw: &Json,
) -> usize {
    use std::str::FromStr;
    let mut checked = 0;
    for (name, value) in java {
        let crm = &raw[name.as_str()];
        if let Some(decimal) = value.get("decimal").and_then(Json::as_str) {
            let text = crm.as_str().map_or_else(|| crm.to_string(), str::to_owned);
            let want = rust_decimal::Decimal::from_str(&text)
                .or_else(|_| rust_decimal::Decimal::from_scientific(&text))
                .unwrap_or_else(|e| panic!("{stream} {key}: the CRM's {name} {crm}: {e}"));
            let got = rust_decimal::Decimal::from_str(decimal).unwrap();
            assert_eq!(
                got, want,
                "{stream} {key}: {name}: Java {decimal}, the CRM {crm}"
            );
            checked += 1;
        } else if let Some(millis) = value.get("millis").and_then(Json::as_i64) {
            let text = crm
                .as_str()
                .unwrap_or_else(|| panic!("{stream} {key}: {name} {crm}"));
            let want = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
                .unwrap_or_else(|e| panic!("{stream} {key}: the CRM's {name} {text:?}: {e}"))
                .and_utc()
                .timestamp_millis();
            assert_eq!(
                millis, want,
                "{stream} {key}: {name}: Java {millis} ms, the CRM {text}"
            );
            checked += 1;
        }
    }
    checked
}

/// The decimal `unscaled × 10^-SCALE` as `BigDecimal.toPlainString()` writes it.
fn plain_decimal(unscaled: i128) -> String {
    let digits = unscaled.unsigned_abs().to_string();
    let digits = format!("{digits:0>width$}", width = SCALE as usize + 1);
    let (whole, fraction) = digits.split_at(digits.len() - SCALE as usize);
    let sign = if unscaled < 0 { "-" } else { "" };
    format!("{sign}{whole}.{fraction}")
}

/// An Avro value as the JSON the comparison uses: unions as their branch, decimals
/// `{"decimal": plain string}`, timestamps `{"millis": epoch ms}`, dates `{"date": ISO}`.
fn plain(value: &Avro) -> Json {
    match value {
        Avro::Null => Json::Null,
        Avro::Boolean(b) => json!(b),
        Avro::Int(i) => json!(i),
        Avro::Long(l) => json!(l),
        Avro::String(s) => json!(s),
        Avro::Enum(_, symbol) => json!(symbol),
        Avro::Union(_, inner) => plain(inner),
        Avro::Array(items) => Json::Array(items.iter().map(plain).collect()),
        Avro::Map(map) => Json::Object(map.iter().map(|(k, v)| (k.clone(), plain(v))).collect()),
        Avro::Record(fields) => Json::Object(
            fields
                .iter()
                .map(|(name, v)| (name.clone(), plain(v)))
                .collect(),
        ),
        Avro::Decimal(d) => {
            let bytes: Vec<u8> = d.try_into().unwrap();
            assert_eq!(bytes.len(), 16, "decimals are written 16 bytes wide");
            json!({"decimal": plain_decimal(i128::from_be_bytes(bytes.try_into().unwrap()))})
        }
        Avro::TimestampMillis(ms) => json!({"millis": ms}),
        Avro::Date(days) => {
            // Days since 1970-01-01, the 719163rd day of the common era.
            let date = chrono::NaiveDate::from_num_days_from_ce_opt(days + 719_163).unwrap();
            json!({"date": date.to_string()})
        }
        other => panic!("no JSON form for {other:?}"),
    }
}

/// Java's JSON in the comparison's form: `{"instant": ISO}` becomes `{"millis": epoch ms}`.
fn from_java(value: &Json) -> Json {
    match value {
        Json::Object(map) if map.len() == 1 && map.contains_key("instant") => {
            let text = map["instant"].as_str().unwrap();
            let at = chrono::DateTime::parse_from_rfc3339(text)
                .unwrap_or_else(|e| panic!("Java's instant {text:?}: {e}"));
            json!({"millis": at.timestamp_millis()})
        }
        Json::Object(map) => {
            Json::Object(map.iter().map(|(k, v)| (k.clone(), from_java(v))).collect())
        }
        Json::Array(items) => Json::Array(items.iter().map(from_java).collect()),
        other => other.clone(),
    }
}

/// What the Java program printed.
struct JavaRead {
    /// Latest value per stream and key, in the comparison's form, with its partition.
    latest: HashMap<String, HashMap<String, (i64, Json)>>,
    misplaced: Vec<Json>,
    undecodable: Vec<Json>,
    summary: Json,
}

/// Runs the Java consumer over the data topics of `prefix`.
fn java_read(bootstrap: &str, prefix: &str, framing: &Framing) -> JavaRead {
    let mut command = Command::new("java");
    command
        .args(["-cp", &classpath(), "ibstream.interop.ReadTopics"])
        .arg(bootstrap)
        .arg(root().join("schemas"))
        .arg(prefix);
    match framing {
        Framing::SingleObject => command.arg("single-object"),
        Framing::Confluent(registry) => {
            command
                .arg("confluent")
                .args([&registry.url, "sr-user", "sr-pass"])
        }
    };
    let output = command.output().expect("java runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the JVM consumer failed ({}): {stderr}",
        output.status
    );
    let mut read = JavaRead {
        latest: HashMap::new(),
        misplaced: Vec::new(),
        undecodable: Vec::new(),
        summary: Json::Null,
    };
    for line in String::from_utf8(output.stdout).unwrap().lines() {
        let line: Json = serde_json::from_str(line).unwrap();
        match line["kind"].as_str().unwrap() {
            "latest" => {
                let topic = line["topic"].as_str().unwrap();
                let stream = topic.strip_prefix(&format!("{prefix}.")).unwrap();
                let key = line["key"].as_str().unwrap().to_owned();
                let value = from_java(&line["value"]);
                read.latest
                    .entry(stream.to_owned())
                    .or_default()
                    .insert(key, (line["partition"].as_i64().unwrap(), value));
            }
            "misplaced" => read.misplaced.push(line),
            "undecodable" => read.undecodable.push(line),
            "summary" => read.summary = line,
            other => panic!("unknown line kind {other}"),
        }
    }
    assert!(
        read.summary.is_object(),
        "no summary line; stderr: {stderr}"
    );
    read
}

/// Compares what Java read with the truth; returns the keys and fields compared and the
/// decimals and timestamps also checked against the raw truth.
fn compare(
    sim: &SimHandle,
    read: &JavaRead,
    updated: &HashSet<(String, String)>,
) -> (usize, usize, usize) {
    let mut keys = 0;
    let mut fields = 0;
    let mut raw_values = 0;
    for stream in STREAMS {
        let truth = expected(sim, stream);
        let raw = raw_truth(sim, stream);
        let got = read.latest.get(stream).cloned().unwrap_or_default();
        let missing: Vec<&String> = truth.keys().filter(|k| !got.contains_key(*k)).collect();
        assert!(
            missing.is_empty(),
            "{stream}: {} of {} keys missing, e.g. {:?}",
            missing.len(),
            truth.len(),
            &missing[..missing.len().min(5)]
        );
        let extra: Vec<&String> = got.keys().filter(|k| !truth.contains_key(*k)).collect();
        assert!(
            extra.is_empty(),
            "{stream}: keys not in the truth: {extra:?}"
        );
        let mut partitions = HashSet::new();
        for (key, want) in &truth {
            let (partition, value) = &got[key];
            partitions.insert(*partition);
            let mut body = value.as_object().unwrap().clone();
            let meta = body.remove("meta").expect("meta");
            let want = want.as_object().unwrap();
            let names: HashSet<&String> = body.keys().chain(want.keys()).collect();
            for name in names {
                assert_eq!(
                    body.get(name),
                    want.get(name),
                    "{stream} {key}: field {name} differs (Java left, truth right)"
                );
                fields += 1;
            }
            raw_values += check_against_raw(stream, key, &body, &raw[key]);
            // meta as Avro Java decodes it: an enum symbol, an id, instants.
            let op = if updated.contains(&(stream.to_owned(), key.clone())) {
                "UPDATED"
            } else {
                "CREATED"
            };
            assert_eq!(meta["op"], json!(op), "{stream} {key}: meta {meta}");
            assert_eq!(meta["eventId"].as_str().map(str::len), Some(16), "{meta}");
            assert!(meta["emittedAt"]["millis"].is_i64(), "{meta}");
            assert!(meta["fetchedAt"]["millis"].is_i64(), "{meta}");
            keys += 1;
        }
        // Many keys over several partitions: the partitioner check means something.
        if truth.len() >= 20 {
            assert!(
                partitions.len() == PARTITIONS,
                "{stream}: keys only in partitions {partitions:?}"
            );
        }
    }
    (keys, fields, raw_values)
}

/// One run: simulator → `ibstream run` (exactly-once) → Apache Kafka → the JVM consumer.
async fn jvm_consumer_reads_the_truth(
    framing: Framing<'_>,
    tweak: impl FnOnce(&mut ibstream::sim::SimConfig),
) {
    decimal_scale_of_schemas();
    let started = Instant::now();
    // The Java program is there before anything starts.
    classpath();
    let broker = common::ApacheKafka::start();
    let sim = common::start_sim(|c| {
        c.leads = 600;
        c.customers = 250;
        c.transactions = 900;
        c.positions = 1_200;
        c.servers = 2;
        tweak(c);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = common::unique_topic("jvm");
    let mut run = spawn_run(&sim, &broker.bootstrap, &prefix, &framing, dir.path());
    run.wait_steady().await;
    let backfilled = started.elapsed();

    // Changes after the backfill, so keys have several events and the latest one counts. No
    // transactions: they move a customer's balance (a volatile field, no event by design),
    // and here every field of every key is compared.
    let mut updated = HashSet::new();
    for (kind, count) in [
        (ChangeKind::NewLead, 10),
        (ChangeKind::EditLead, 20),
        (ChangeKind::Conversion, 10),
        (ChangeKind::EditCustomer, 20),
        (ChangeKind::Position, 20),
    ] {
        for change in sim.mutate(count, Some(kind)) {
            if change.op == "updated" {
                updated.insert((change.stream.to_owned(), change.key.clone()));
            }
        }
    }
    run.wait_read_through(chrono::Utc::now()).await;
    run.terminate();
    let streamed = started.elapsed();

    let java = Instant::now();
    let read = java_read(&broker.bootstrap, &prefix, &framing);
    let java = java.elapsed();
    assert!(
        read.undecodable.is_empty(),
        "Avro Java could not decode {} values, e.g. {}",
        read.undecodable.len(),
        read.undecodable[0]
    );
    assert!(
        read.misplaced.is_empty(),
        "{} records are not in the partition Java's default partitioner gives their key, e.g. {}",
        read.misplaced.len(),
        read.misplaced[0]
    );
    let mut records = 0;
    let mut per_topic = Vec::new();
    let mut java_topics_ms = 0;
    for stream in STREAMS {
        let topic = &read.summary["topics"][format!("{prefix}.{stream}")];
        assert_eq!(topic["partitions"], json!(PARTITIONS), "{topic}");
        let read_here = topic["records"].as_u64().unwrap();
        // Transactions' commit markers take offsets that read_committed does not return: the
        // topic was written in transactions and read to its last stable offset.
        let ends: u64 = topic["endOffsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap())
            .sum();
        assert!(
            ends > read_here,
            "{stream}: no transaction markers: {topic}"
        );
        // Exactly-once: no record repeats an earlier one's key and eventId.
        assert_eq!(
            topic["duplicates"],
            json!(0),
            "{stream}: duplicates: {topic}"
        );
        java_topics_ms += topic["readMillis"].as_u64().unwrap();
        records += read_here;
        per_topic.push(format!("{stream} {read_here}"));
    }
    let (keys, fields, raw_values) = compare(&sim, &read, &updated);
    eprintln!(
        "jvm_consumer: {records} records read by Java ({}), {keys} keys and {fields} fields equal to the truth ({raw_values} decimals and timestamps also to the CRM's raw text), {} updated keys; backfill {:.1} s, streamed {:.1} s, Java read {:.1} s ({java_topics_ms} ms of it reading topics), total {:.1} s",
        per_topic.join(", "),
        updated.len(),
        backfilled.as_secs_f64(),
        streamed.as_secs_f64(),
        java.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jvm_consumer_reads_single_object_events_as_the_truth() {
    jvm_consumer_reads_the_truth(Framing::SingleObject, |_| {}).await;
}

/// With a registry: Confluent framing, the writer's schema fetched by id. The CRM writes money
/// as JSON numbers here (`12.5`, not `"12.50"`): the same decimals must come out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jvm_consumer_reads_confluent_framed_events_as_the_truth() {
    let registry = common::start_registry().await;
    jvm_consumer_reads_the_truth(Framing::Confluent(&registry), |c| c.numeric_money = true).await;
    assert_eq!(
        registry.subjects.lock().unwrap().len(),
        STREAMS.len(),
        "one subject per data topic"
    );
}
