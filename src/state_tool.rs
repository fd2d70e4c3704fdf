//! `ibstream state show|reset`: look at and move the state a running `ibstream run` keeps,
//! as Kafka Connect's offsets API (KIP-875) does for connectors.
//!
//! Both read the state topic to its end with a barrier written by a plain producer – never
//! with the instance's transactional id, which would fence a running instance. `reset` writes
//! its records with a plain producer too, and refuses while the instance's heartbeat
//! (`alive/<instance_id>`, written every 30 s by `run`) is younger than 90 s: a running
//! instance would overwrite the reset with its in-memory state (`--force` overrides).

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::{json, Value};

use crate::config::Config;
use crate::kafka::read_state;
use crate::stream::state::{Cursor, State};

/// A heartbeat younger than this means the instance runs.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(90);

const STREAMS: [&str; 5] = ["leads", "customers", "transactions", "servers", "positions"];

/// Where `reset` moves a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// Re-read from this day (the watermark moves to the day before).
    Day(NaiveDate),
    /// Forget the cursor: the stream starts as on its first start (its backfill from
    /// `streams.start_date`).
    Start,
}

/// What `reset` is asked to do.
#[derive(Debug, Clone)]
pub struct ResetRequest {
    /// The stream.
    pub stream: String,
    /// Only this server tag (positions).
    pub server_tag: Option<String>,
    /// Where the cursors go.
    pub to: ResetTo,
    /// Drop the fingerprints too: everything read again is emitted again as `CREATED`.
    pub resnapshot: bool,
    /// Reset even though the instance's heartbeat is fresh.
    pub force: bool,
}

/// Reads the state of the configured instance. A refused login or TLS handshake is told at
/// once, naming the key to fix (`kafka::refusal::reach`), not as a write timing out.
pub async fn load(config: &Config) -> Result<State, String> {
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || {
        crate::kafka::refusal::reach(&kafka, Duration::from_secs(30))
    })
    .await
    .map_err(|e| e.to_string())??;
    let topic = config.kafka.state_topic(&config.topics);
    let timeout = Duration::from_secs(config.kafka.batch_timeout_secs.max(30));
    read_state(&config.kafka, &topic, timeout).await
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Returns the state as JSON: cursors, fingerprints per scope, heartbeats, start markers.
pub fn show_json(state: &State, now: DateTime<Utc>) -> Value {
    let mut scopes: Vec<&String> = state.cursors.keys().collect();
    scopes.sort();
    let cursors: Vec<Value> = scopes
        .into_iter()
        .map(|scope| {
            let c = &state.cursors[scope];
            json!({
                "scope": scope,
                "watermark": c.watermark,
                "backfillNext": c.next,
                "lastSweep": c.swept.map(time),
                "openWindows": c.open.iter().map(|w| json!({
                    "day": w.day, "since": time(w.since), "missing": w.missing
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut fingerprints: Vec<(&String, usize)> = state
        .fingerprints
        .iter()
        .map(|(k, v)| (k, v.len()))
        .collect();
    fingerprints.sort();
    let heartbeats: serde_json::Map<String, Value> = state
        .heartbeats
        .iter()
        .map(|(id, beat)| {
            (
                id.clone(),
                json!({"at": time(beat.at), "ageSeconds": (now - beat.at).num_seconds()}),
            )
        })
        .collect();
    let started: serde_json::Map<String, Value> = state
        .started
        .iter()
        .map(|(id, marker)| {
            (
                id.clone(),
                json!({"at": time(marker.at), "rebuild": marker.rebuild}),
            )
        })
        .collect();
    json!({
        "cursors": cursors,
        "started": started,
        "fingerprints": fingerprints.into_iter().map(|(k, n)| (k.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "heartbeats": heartbeats,
    })
}

/// Returns the state as a table for people.
pub fn show_text(state: &State, instance_id: &str, now: DateTime<Utc>) -> String {
    let doc = show_json(state, now);
    let mut out = String::new();
    out.push_str(&format!(
        "{:<32} {:<12} {:<12} {:<22} open windows\n",
        "cursor", "watermark", "backfill at", "last sweep"
    ));
    for c in doc["cursors"].as_array().into_iter().flatten() {
        let text = |v: &Value| v.as_str().unwrap_or("-").to_owned();
        let open: Vec<String> = c["openWindows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| format!("{} ({} missing)", text(&w["day"]), w["missing"]))
            .collect();
        out.push_str(&format!(
            "{:<32} {:<12} {:<12} {:<22} {}\n",
            text(&c["scope"]),
            text(&c["watermark"]),
            text(&c["backfillNext"]),
            text(&c["lastSweep"]),
            if open.is_empty() {
                "-".to_owned()
            } else {
                open.join(", ")
            }
        ));
    }
    out.push_str("\nfingerprints kept\n");
    for (scope, n) in doc["fingerprints"].as_object().into_iter().flatten() {
        out.push_str(&format!("  {scope:<30} {n}\n"));
    }
    match state.heartbeats.get(instance_id) {
        Some(beat) => out.push_str(&format!(
            "\ninstance {instance_id}: last heartbeat {} ({} s ago)\n",
            time(beat.at),
            (now - beat.at).num_seconds()
        )),
        None => out.push_str(&format!("\ninstance {instance_id}: no heartbeat\n")),
    }
    if let Some(marker) = state.started.get(instance_id) {
        out.push_str(&format!(
            "instance {instance_id}: last started {}{}\n",
            time(marker.at),
            if marker.rebuild {
                " (--rebuild-state)"
            } else {
                ""
            }
        ));
    }
    out
}

/// Returns the cursor scopes and fingerprint scopes a reset of `request` touches.
fn scopes(request: &ResetRequest, state: &State) -> Result<(Vec<String>, Vec<String>), String> {
    let stream = request.stream.as_str();
    if !STREAMS.contains(&stream) {
        return Err(format!(
            "unknown stream {stream:?}; streams: {}",
            STREAMS.join(", ")
        ));
    }
    if request.server_tag.is_some() && stream != "positions" {
        return Err("--server-tag is for the positions stream only".to_owned());
    }
    Ok(match (stream, &request.server_tag) {
        ("leads" | "customers", _) => (
            vec![
                format!("{stream}/registration"),
                format!("{stream}/lastModified"),
            ],
            vec![stream.to_owned()],
        ),
        ("transactions", _) => (
            vec!["transactions".to_owned()],
            vec!["transactions".to_owned()],
        ),
        ("servers", _) => (Vec::new(), vec!["servers".to_owned()]),
        (_, Some(tag)) => {
            let scope = format!("positions/{tag}");
            (vec![scope.clone()], vec![scope])
        }
        (_, None) => {
            let mut tags: Vec<String> = state
                .cursors
                .keys()
                .chain(state.fingerprints.keys())
                .filter(|k| k.starts_with("positions/"))
                .cloned()
                .collect();
            tags.sort();
            tags.dedup();
            (tags.clone(), tags)
        }
    })
}

/// Says that the instance (`kafka.instance_id`) may be running – its heartbeat in `state` is
/// younger than [`ALIVE_WITHIN`] – as the start of a refusal; `None` when it is older or
/// absent. A cleanly stopped instance's last heartbeat counts for [`ALIVE_WITHIN`] too: it
/// covers the next instance while it starts.
pub fn running(config: &Config, state: &State) -> Option<String> {
    let instance = &config.kafka.instance_id;
    let age = (Utc::now() - state.heartbeats.get(instance)?.at)
        .to_std()
        .unwrap_or_default();
    (age < ALIVE_WITHIN).then(|| {
        format!(
            "instance {instance} is running, or stopped less than {} s ago (its last heartbeat is {} s old)",
            ALIVE_WITHIN.as_secs(),
            age.as_secs()
        )
    })
}

/// Moves the cursors of a stream (and drops its fingerprints with `resnapshot`); returns
/// what was done, one line per change.
pub async fn reset(config: &Config, request: &ResetRequest) -> Result<Vec<String>, String> {
    let state = load(config).await?;
    if let Some(running) = running(config, &state).filter(|_| !request.force) {
        return Err(format!(
            "{running}; stop it first – a running instance would overwrite the reset – or pass --force"
        ));
    }
    let (cursor_scopes, fp_scopes) = scopes(request, &state)?;
    if request.stream == "servers" && request.to != ResetTo::Start {
        return Err("servers has no cursor (the list is read whole every cycle); use --from-start --resnapshot to emit every server again".to_owned());
    }
    let topic = config.kafka.state_topic(&config.topics);
    let mut records: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    let mut done = Vec::new();
    for scope in &cursor_scopes {
        let key = Cursor::key(scope);
        match request.to {
            ResetTo::Start => {
                records.push((key, None));
                done.push(format!(
                    "{scope}: cursor removed, reads again from its first day"
                ));
            }
            ResetTo::Day(day) => {
                let mut cursor = state.cursors.get(scope).cloned().unwrap_or_default();
                cursor.next = Some(day);
                cursor.watermark = day.pred_opt();
                records.push((key, Some(cursor.encode())));
                done.push(format!("{scope}: reads again from {day}"));
            }
        }
    }
    if request.resnapshot {
        for scope in &fp_scopes {
            let Some(map) = state.fingerprints.get(scope) else {
                continue;
            };
            records.extend(map.state_keys(scope).into_iter().map(|key| (key, None)));
            done.push(format!(
                "{scope}: {} fingerprints dropped, records read again are emitted as CREATED",
                map.len()
            ));
        }
    }
    if records.is_empty() {
        return Err(format!("nothing to reset for {}", request.stream));
    }
    let mut client = rdkafka::ClientConfig::new();
    for (key, value) in config.kafka.client_settings().map_err(|e| e.to_string())? {
        client.set(key, value);
    }
    let producer: FutureProducer = client
        .set("enable.idempotence", "true")
        .create()
        .map_err(|e| format!("cannot create a Kafka producer: {e}"))?;
    let timeout = Duration::from_secs(config.kafka.batch_timeout_secs);
    let mut pending = Vec::with_capacity(records.len());
    for (key, value) in &records {
        let record = FutureRecord::to(&topic).key(key);
        let mut record = match value {
            Some(value) => record.payload(value),
            None => record,
        };
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((e, back))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(format!("cannot write to {topic}: {e}")),
            }
        }
    }
    for delivery in pending {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(format!("cannot write to {topic}: {e}")),
            Err(_) => return Err(format!("cannot write to {topic}: delivery report lost")),
        }
    }
    producer
        .flush(timeout)
        .map_err(|e| format!("cannot flush the writes to {topic}: {e}"))?;
    Ok(done)
}
