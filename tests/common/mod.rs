//! Test fixtures shared by the integration tests: the simulator in-process, and a tansu or an
//! Apache Kafka broker process ([`kafka`]), each on free ports.
#![allow(dead_code)]

pub mod config_file;
pub mod kafka;
pub mod topics;
pub mod truth;
#[allow(unused_imports)]
pub use config_file::ConfigFile;
#[allow(unused_imports)]
pub use kafka::{ApacheKafka, KafkaSetup};

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ibstream::config::CrmConfig;
use ibstream::crm::CrmClient;
use ibstream::sim::{SimConfig, SimHandle};
use secrecy::SecretString;
use serde_json::{json, Value as Json};

/// Starts the simulator in-process on a free port with `tweak` applied to the defaults.
pub async fn start_sim(tweak: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut config = SimConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        leads: 50,
        customers: 20,
        transactions: 50,
        positions: 50,
        ..SimConfig::default()
    };
    tweak(&mut config);
    ibstream::sim::start(config)
        .await
        .expect("simulator starts")
}

/// Returns a CRM config with the simulator's default credentials, fast retries and no URL.
pub fn crm_config_for_url() -> CrmConfig {
    CrmConfig {
        email: "ib@example.com".to_owned(),
        password: Some(SecretString::from("ib-secret")),
        api_key: Some(SecretString::from("sim-api-key")),
        domain: "sim.example.com".to_owned(),
        requests_per_second: 1000,
        backoff_initial_ms: 10,
        backoff_max_ms: 200,
        ..CrmConfig::default()
    }
}

/// Returns a CRM config pointing at `sim`.
pub fn crm_config(sim: &SimHandle) -> CrmConfig {
    CrmConfig {
        base_url: sim.base_url(),
        ..crm_config_for_url()
    }
}

/// Builds a client for `sim`.
pub fn client(sim: &SimHandle, tweak: impl FnOnce(&mut CrmConfig)) -> CrmClient {
    let mut config = crm_config(sim);
    tweak(&mut config);
    CrmClient::build(&config).expect("client builds")
}

/// Returns a port nobody listens on right now, never one it returned before in this test
/// process (the kernel may offer a port again once its probe closed, before the first taker
/// bound it).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A tansu broker process on a free port, with in-memory storage unless told otherwise,
/// killed on drop.
pub struct Tansu {
    child: Option<Child>,
    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub bootstrap: String,
    /// Where the broker's output goes.
    pub log: PathBuf,
    advertised_url: String,
    storage: String,
    /// The broker's working directory (where `sqlite://` storage keeps its file).
    dir: Option<PathBuf>,
}

impl Tansu {
    /// Starts the broker and waits until it accepts connections.
    pub fn start() -> Tansu {
        Tansu::start_advertising(None)
    }

    /// Starts the broker telling clients to connect to `advertised` (a proxy in front of it)
    /// instead of its own address.
    pub fn start_advertising(advertised: Option<SocketAddr>) -> Tansu {
        Tansu::start_with(advertised, "memory://tansu/", None)
    }

    /// Starts the broker keeping its records in a SQLite file in `dir`: they outlive a
    /// [`Tansu::stop`] and [`Tansu::restart`].
    pub fn start_persistent(dir: &std::path::Path) -> Tansu {
        // tansu reads a `sqlite://` URL's path as relative to its working directory.
        Tansu::start_with(None, "sqlite://tansu.db", Some(dir.to_owned()))
    }

    fn start_with(advertised: Option<SocketAddr>, storage: &str, dir: Option<PathBuf>) -> Tansu {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut tansu = Tansu {
            child: None,
            bootstrap: format!("127.0.0.1:{port}"),
            log: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tansu-{port}.log")),
            advertised_url: advertised.map_or_else(|| url.clone(), |a| format!("tcp://{a}")),
            storage: storage.to_owned(),
            dir,
        };
        tansu.restart();
        tansu
    }

    /// Kills the broker (its port refuses connections until [`Tansu::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port and storage; waits until it listens.
    pub fn restart(&mut self) {
        self.stop();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".to_owned());
        let url = format!("tcp://{}", self.bootstrap);
        let mut command = Command::new(&bin);
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        let child = command
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &self.advertised_url])
            .args(["--storage-engine", &self.storage])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start `{bin}` ({e}); ./scripts/test.sh installs tansu 0.6.0")
            });
        self.child = Some(child);
        let addr: SocketAddr = self.bootstrap.parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {addr} within 30 s; see {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A broker the end-to-end tests run on: Apache Kafka, the suites' broker, or tansu, the
/// second broker with late high watermarks and no transactions.
pub trait Broker {
    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    fn bootstrap(&self) -> &str;
    /// Whether it runs Kafka transactions, so `run` can use exactly-once (the default).
    fn transactions(&self) -> bool;
}

impl Broker for Tansu {
    fn bootstrap(&self) -> &str {
        &self.bootstrap
    }
    fn transactions(&self) -> bool {
        false
    }
}

impl Broker for ApacheKafka {
    fn bootstrap(&self) -> &str {
        &self.bootstrap
    }
    fn transactions(&self) -> bool {
        true
    }
}

impl<B: Broker + ?Sized> Broker for &B {
    fn bootstrap(&self) -> &str {
        (**self).bootstrap()
    }
    fn transactions(&self) -> bool {
        (**self).transactions()
    }
}

/// Returns a topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), fastrand::u64(..))
}

/// A minimal Confluent Schema Registry (no registry server can run here): the register and
/// lookup calls ibstream makes and the fetch by id consumers make, with basic auth,
/// in-process on a free port.
pub struct TestRegistry {
    /// Base URL.
    pub url: String,
    /// Register calls served.
    pub registrations: Arc<AtomicU32>,
    /// Schemas by subject, with their ids.
    pub subjects: Subjects,
}

/// Registered schemas by subject: (schema JSON, id) per version.
pub type Subjects = Arc<Mutex<HashMap<String, Vec<(String, u32)>>>>;

/// Starts the registry on a free port; it accepts basic auth `sr-user:sr-pass` only.
pub async fn start_registry() -> TestRegistry {
    use axum::extract::{Path as AxPath, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    #[derive(Clone)]
    struct St {
        subjects: Subjects,
        registrations: Arc<AtomicU32>,
        next_id: Arc<AtomicU32>,
    }
    fn authorized(headers: &HeaderMap) -> bool {
        // "sr-user:sr-pass" in base64.
        headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some("Basic c3ItdXNlcjpzci1wYXNz")
    }
    fn schema_of(body: &str) -> Option<String> {
        let value: Json = serde_json::from_str(body).ok()?;
        let schema: Json = serde_json::from_str(value["schema"].as_str()?).ok()?;
        Some(schema.to_string())
    }
    async fn register(
        State(st): State<St>,
        AxPath(subject): AxPath<String>,
        headers: HeaderMap,
        body: String,
    ) -> (StatusCode, String) {
        if !authorized(&headers) {
            return (
                StatusCode::UNAUTHORIZED,
                r#"{"error_code":401,"message":"Unauthorized"}"#.into(),
            );
        }
        let Some(schema) = schema_of(&body) else {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                r#"{"error_code":42201,"message":"Invalid schema"}"#.into(),
            );
        };
        st.registrations.fetch_add(1, Ordering::SeqCst);
        let mut subjects = st.subjects.lock().unwrap();
        let versions = subjects.entry(subject).or_default();
        let id = match versions.iter().find(|(s, _)| *s == schema) {
            Some((_, id)) => *id,
            None => {
                let id = st.next_id.fetch_add(1, Ordering::SeqCst);
                versions.push((schema, id));
                id
            }
        };
        (StatusCode::OK, json!({ "id": id }).to_string())
    }
    async fn lookup(
        State(st): State<St>,
        AxPath(subject): AxPath<String>,
        headers: HeaderMap,
        body: String,
    ) -> (StatusCode, String) {
        if !authorized(&headers) {
            return (StatusCode::UNAUTHORIZED, "{}".into());
        }
        let schema = schema_of(&body).unwrap_or_default();
        let subjects = st.subjects.lock().unwrap();
        match subjects.get(&subject).and_then(|v| {
            v.iter()
                .position(|(s, _)| *s == schema)
                .map(|i| (i, v[i].1))
        }) {
            Some((version, id)) => (
                StatusCode::OK,
                json!({"subject": subject, "version": version + 1, "id": id, "schema": schema})
                    .to_string(),
            ),
            None => (
                StatusCode::NOT_FOUND,
                r#"{"error_code":40403,"message":"Schema not found"}"#.into(),
            ),
        }
    }
    // GET /schemas/ids/{id}: the schema a Confluent-framed value names, as consumers fetch it.
    async fn by_id(
        State(st): State<St>,
        AxPath(id): AxPath<u32>,
        headers: HeaderMap,
    ) -> (StatusCode, String) {
        if !authorized(&headers) {
            return (StatusCode::UNAUTHORIZED, "{}".into());
        }
        let subjects = st.subjects.lock().unwrap();
        match subjects.values().flatten().find(|(_, i)| *i == id) {
            Some((schema, _)) => (StatusCode::OK, json!({ "schema": schema }).to_string()),
            None => (
                StatusCode::NOT_FOUND,
                r#"{"error_code":40403,"message":"Schema not found"}"#.into(),
            ),
        }
    }
    let st = St {
        subjects: Arc::default(),
        registrations: Arc::default(),
        next_id: Arc::new(AtomicU32::new(101)),
    };
    let app = axum::Router::new()
        .route("/subjects/{subject}/versions", post(register))
        .route("/subjects/{subject}", post(lookup))
        .route("/schemas/ids/{id}", axum::routing::get(by_id))
        .with_state(st.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    TestRegistry {
        url,
        registrations: st.registrations,
        subjects: st.subjects,
    }
}

/// Returns the Python interpreter with the interoperability tools (fastavro,
/// prometheus_client): the one `./scripts/test.sh` names, its virtual environment, or
/// `python3`.
pub fn interop_python() -> String {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python");
    std::env::var("INTEROP_PYTHON").unwrap_or_else(|_| {
        if venv.exists() {
            venv.display().to_string()
        } else {
            "python3".to_owned()
        }
    })
}

/// Makes a CA and a certificate for 127.0.0.1 signed by it, with the openssl command line.
pub fn test_pki(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ibstream test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

/// Adds to a folder [`test_pki`] filled a client certificate for mutual TLS signed by its CA
/// (`client.pem`, key `client.key`, CN=ibstream), a second CA nobody trusts (`other-ca.pem`,
/// key `other-ca.key`) and a client certificate it signed (`other-client.pem`,
/// `other-client.key`).
pub fn test_pki_client_and_other_ca(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=ibstream",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.pem",
        "-days",
        "2",
    ]);
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other-ca.key",
        "-out",
        "other-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ibstream untrusted CA",
    ]);
    for args in [
        "req -newkey rsa:2048 -nodes -keyout other-client.key -out other-client.csr -subj /CN=ibstream",
        "x509 -req -in other-client.csr -CA other-ca.pem -CAkey other-ca.key -CAcreateserial -out other-client.pem -days 2",
    ] {
        run(&args.split(' ').collect::<Vec<_>>());
    }
}

/// A TCP proxy in front of a broker that reads the Kafka requests it forwards. Once told to
/// hold the produce requests to a topic, the first Produce request naming that topic – and
/// everything any client sends after it – never reaches the broker, while the connections
/// stay open (so librdkafka neither sees an error nor resends). A kill after that lands
/// exactly between a batch's acknowledged events and its state records.
pub struct KafkaGate {
    pub addr: SocketAddr,
    state: Arc<GateState>,
}

#[derive(Default)]
struct GateState {
    hold_topic: Mutex<Option<Vec<u8>>>,
    held: std::sync::atomic::AtomicBool,
}

impl KafkaGate {
    /// Listens on `at` (the address the broker advertises) and forwards to `upstream`.
    pub async fn start(at: SocketAddr, upstream: &str) -> KafkaGate {
        let listener = tokio::net::TcpListener::bind(at).await.expect("gate port");
        let state = Arc::new(GateState::default());
        let upstream = upstream.to_owned();
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, mut client_write) = client.into_split();
                let (broker_read, broker_write) = broker.into_split();
                tokio::spawn(async move {
                    let mut broker_read = broker_read;
                    let _ = tokio::io::copy(&mut broker_read, &mut client_write).await;
                });
                tokio::spawn(forward_requests(client_read, broker_write, shared.clone()));
            }
        });
        KafkaGate { addr: at, state }
    }

    /// Holds from the first Produce request naming `topic` on.
    pub fn hold_produce_to(&self, topic: &str) {
        *self.state.hold_topic.lock().unwrap() = Some(topic.as_bytes().to_vec());
    }

    /// Whether a request is being held.
    pub fn held(&self) -> bool {
        self.state.held.load(Ordering::SeqCst)
    }

    /// Forwards everything again on new connections (held ones stay held until closed).
    pub fn open(&self) {
        *self.state.hold_topic.lock().unwrap() = None;
        self.state.held.store(false, Ordering::SeqCst);
    }
}

async fn forward_requests(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<GateState>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PRODUCE: i16 = 0;
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut holding = false;
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if holding {
            continue;
        }
        buffer.extend_from_slice(&chunk[..n]);
        // Each request: a 4-byte big-endian size, then api_key (i16), api_version, ….
        while buffer.len() >= 6 {
            let size = u32::from_be_bytes(buffer[..4].try_into().unwrap()) as usize;
            if buffer.len() < 4 + size {
                break;
            }
            let request: Vec<u8> = buffer.drain(..4 + size).collect();
            let api_key = i16::from_be_bytes([request[4], request[5]]);
            let hold = state.held.load(Ordering::SeqCst)
                || (api_key == PRODUCE
                    && state
                        .hold_topic
                        .lock()
                        .unwrap()
                        .as_ref()
                        .is_some_and(|t| request.windows(t.len()).any(|w| w == t.as_slice())));
            if hold {
                state.held.store(true, Ordering::SeqCst);
                holding = true;
                break;
            }
            if to.write_all(&request).await.is_err() {
                return;
            }
        }
    }
}
