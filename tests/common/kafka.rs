//! An Apache Kafka broker process for the tests: one KRaft node (broker and controller in one
//! JVM), its storage formatted in a fresh folder, on free ports, killed on drop.
//!
//! The broker comes from Maven Central: `./scripts/test.sh` copies `org.apache.kafka:kafka_2.13`
//! (the version pinned in `tests/kafka/pom.xml`) and its runtime dependencies into
//! `target/kafka/libs` (`KAFKA_LIBS` overrides). Every broker starts with
//! `tests/kafka/single-node.properties`, the settings docker-compose.yml gives its Kafka too.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::free_port;

/// What a broker starts with beyond the single-node defaults.
#[derive(Clone, Debug, Default)]
pub struct KafkaSetup {
    /// Further listeners as (name, security protocol), e.g. `("SASL", "SASL_PLAINTEXT")`; each
    /// gets a free port on 127.0.0.1, read back with [`ApacheKafka::listener`].
    pub listeners: Vec<(String, String)>,
    /// Further `server.properties` lines; a key given here replaces the fixture's own.
    pub properties: Vec<(String, String)>,
    /// Further arguments of `kafka-storage format`, e.g.
    /// `--add-scram SCRAM-SHA-512=[name=ibstream,password=…]`.
    pub format_args: Vec<String>,
}

/// `server.properties` lines giving the broker's TLS listeners the key and certificate of
/// PEM files and a PEM CA to trust (for client certificates): writes `keystore.pem` (the key,
/// then the certificate) in `dir` and uses Kafka's `ssl.keystore.type=PEM` and
/// `ssl.truststore.type=PEM`. The key must be unencrypted PKCS#8 (`openssl req -nodes`).
pub fn pem_tls_properties(dir: &Path, key: &Path, cert: &Path, ca: &Path) -> Vec<(String, String)> {
    let keystore = dir.join("keystore.pem");
    let read =
        |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    std::fs::write(&keystore, format!("{}{}", read(key), read(cert))).expect("keystore.pem");
    [
        ("ssl.keystore.type", "PEM".to_owned()),
        ("ssl.keystore.location", keystore.display().to_string()),
        ("ssl.truststore.type", "PEM".to_owned()),
        ("ssl.truststore.location", ca.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A running (or stopped, or paused) single-node Apache Kafka.
pub struct ApacheKafka {
    child: Option<Child>,
    /// `127.0.0.1:PORT` of the PLAINTEXT listener, for `bootstrap.servers`.
    pub bootstrap: String,
    /// Where the broker's output goes (appended across restarts).
    pub log: PathBuf,
    /// The broker's folder: `server.properties` and the log folder `data/`.
    pub dir: PathBuf,
    listeners: Vec<(String, u16)>,
    _tmp: tempfile::TempDir,
}

/// The folder holding the broker's jars: `KAFKA_LIBS`, or `target/kafka/libs`.
pub fn kafka_libs() -> PathBuf {
    std::env::var_os("KAFKA_LIBS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/kafka/libs"),
        PathBuf::from,
    )
}

/// The single-node settings every test broker (and docker-compose.yml's Kafka) starts with, as
/// (key, value) in file order.
pub fn single_node_properties() -> Vec<(String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kafka/single-node.properties");
    let text = std::fs::read_to_string(&path).expect("tests/kafka/single-node.properties");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The Apache Kafka version the tests run: `kafka.version` of `tests/kafka/pom.xml`.
pub fn kafka_version() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kafka/pom.xml");
    let pom = std::fs::read_to_string(&path).expect("tests/kafka/pom.xml");
    let start = pom.find("<kafka.version>").expect("kafka.version") + "<kafka.version>".len();
    let end = start + pom[start..].find('<').expect("kafka.version ends");
    pom[start..end].trim().to_owned()
}

fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME").map_or_else(
        || PathBuf::from("java"),
        |h| PathBuf::from(h).join("bin/java"),
    )
}

/// A cluster id as Kafka's `Uuid.randomUuid()` makes them: 16 random bytes, URL-safe base64
/// without padding (22 characters), drawn again while it starts with `-`.
///
/// Kafka redraws ids that start with `-` because its command-line tools would read one as an
/// option: `kafka-storage format --cluster-id -x…` fails with "argument --cluster-id/-t:
/// expected one argument". One id in 64 starts with `-`; CI drew one.
pub fn cluster_id() -> String {
    loop {
        let id = base64_url_unpadded(&fastrand::u128(..).to_be_bytes());
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn base64_url_unpadded(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| n << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

impl ApacheKafka {
    /// Starts a broker with a PLAINTEXT listener only; waits until it serves.
    pub fn start() -> ApacheKafka {
        ApacheKafka::start_with(KafkaSetup::default())
    }

    /// Formats a fresh storage folder with `setup`, starts the broker and waits until it serves.
    ///
    /// Its ports are free when [`free_port`] picks them, but another process can bind one
    /// before the broker does; the broker then exits with "Address already in use" and is
    /// started again on other ports (3 tries).
    pub fn start_with(setup: KafkaSetup) -> ApacheKafka {
        let mut tries = 0;
        loop {
            tries += 1;
            match ApacheKafka::try_start(&setup) {
                Ok(kafka) => return kafka,
                Err(why) if why.contains("Address already in use") && tries < 3 => {
                    eprintln!("Apache Kafka found a port taken; starting it on other ports");
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    /// [`ApacheKafka::start_with`] once: the broker serving, or why not (with its log's path).
    fn try_start(setup: &KafkaSetup) -> Result<ApacheKafka, String> {
        let libs = kafka_libs();
        assert!(
            libs.join(format!("kafka_2.13-{}.jar", kafka_version()))
                .exists(),
            "no Apache Kafka {} in {}; ./scripts/test.sh fetches it with Maven",
            kafka_version(),
            libs.display()
        );
        let tmp = tempfile::Builder::new()
            .prefix("apache-kafka-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("broker folder");
        let dir = tmp.path().to_owned();
        let port = free_port();
        let controller = free_port();
        let mut listeners = vec![("PLAINTEXT".to_owned(), port)];
        let mut protocols = vec![
            ("PLAINTEXT".to_owned(), "PLAINTEXT".to_owned()),
            ("CONTROLLER".to_owned(), "PLAINTEXT".to_owned()),
        ];
        for (name, protocol) in &setup.listeners {
            listeners.push((name.clone(), free_port()));
            protocols.push((name.clone(), protocol.clone()));
        }
        let bound = |listeners: &[(String, u16)]| {
            listeners
                .iter()
                .map(|(n, p)| format!("{n}://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut properties: Vec<(String, String)> = vec![
            ("process.roles".into(), "broker,controller".into()),
            ("node.id".into(), "1".into()),
            (
                "controller.quorum.voters".into(),
                format!("1@127.0.0.1:{controller}"),
            ),
            ("controller.listener.names".into(), "CONTROLLER".into()),
            ("inter.broker.listener.name".into(), "PLAINTEXT".into()),
            (
                "listeners".into(),
                format!("{},CONTROLLER://127.0.0.1:{controller}", bound(&listeners)),
            ),
            ("advertised.listeners".into(), bound(&listeners)),
            (
                "listener.security.protocol.map".into(),
                protocols
                    .iter()
                    .map(|(n, p)| format!("{n}:{p}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("log.dirs".into(), dir.join("data").display().to_string()),
            ("num.partitions".into(), "1".into()),
        ];
        properties.extend(single_node_properties());
        for (key, value) in &setup.properties {
            properties.retain(|(k, _)| k != key);
            properties.push((key.clone(), value.clone()));
        }
        let text: String = properties
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        std::fs::write(dir.join("server.properties"), text).expect("server.properties");

        let log =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("apache-kafka-{port}.log"));
        let out = Command::new(java())
            .arg("-cp")
            .arg(libs.join("*"))
            .arg(log4j_option())
            .args(["kafka.tools.StorageTool", "format", "--ignore-formatted"])
            .args(["--cluster-id", &cluster_id()])
            .arg("--config")
            .arg(dir.join("server.properties"))
            .args(&setup.format_args)
            .output()
            .expect("java runs (Java 17 is needed)");
        assert!(
            out.status.success(),
            "kafka-storage format failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut kafka = ApacheKafka {
            child: None,
            bootstrap: format!("127.0.0.1:{port}"),
            log,
            dir,
            listeners,
            _tmp: tmp,
        };
        kafka.start_process()?;
        Ok(kafka)
    }

    /// One broker for the whole test process, started by the first caller: for the tests that
    /// neither stop, pause nor reconfigure it and keep to their own topics (`unique_topic`),
    /// instance ids and consumer groups, so a test costs no JVM start. Never
    /// [`ApacheKafka::pause`] it. A watcher process SIGKILLs it and removes its folder once
    /// this process is gone (statics are never dropped, and a killed test process runs no
    /// destructor).
    pub fn shared() -> &'static ApacheKafka {
        static SHARED: OnceLock<ApacheKafka> = OnceLock::new();
        SHARED.get_or_init(|| {
            let kafka = ApacheKafka::start();
            let pid = kafka.pid().expect("the broker runs");
            let watcher = format!(
                "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -9 {pid}; rm -rf '{dir}'",
                me = std::process::id(),
                dir = kafka.dir.display()
            );
            // Never waited for: it outlives this process by design.
            #[allow(clippy::zombie_processes)]
            Command::new("sh")
                .args(["-c", &watcher])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("sh runs");
            kafka
        })
    }

    /// `127.0.0.1:PORT` of the listener named `name` (as given in [`KafkaSetup::listeners`]).
    pub fn listener(&self, name: &str) -> String {
        let (_, port) = self
            .listeners
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no listener {name}"));
        format!("127.0.0.1:{port}")
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the broker with SIGKILL: no clean shutdown, open transactions stay open in its log.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker with SIGSTOP: connections stay open and nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the broker runs");
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts the broker (again) on the same ports and log folder; waits until it serves.
    pub fn restart(&mut self) {
        if let Err(why) = self.start_process() {
            panic!("{why}");
        }
    }

    /// Starts the broker process (killing a running one first) and waits until it serves.
    fn start_process(&mut self) -> Result<(), String> {
        self.kill();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let started = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let child = Command::new(java())
            .args([
                "-Xms256m",
                "-Xmx1g",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
            ])
            .arg(log4j_option())
            .arg("-cp")
            .arg(kafka_libs().join("*"))
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("java runs (Java 17 is needed)");
        self.child = Some(child);
        self.wait_until_serving(started)
    }

    /// Waits until the broker logs that it started and its listener accepts connections; why
    /// not when it exits first (with the log written since `log_offset`).
    fn wait_until_serving(&mut self, log_offset: u64) -> Result<(), String> {
        let addr: SocketAddr = self.bootstrap.parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = std::fs::read(&self.log).unwrap_or_default();
            let since =
                String::from_utf8_lossy(&log[(log_offset as usize).min(log.len())..]).into_owned();
            if since.contains("Kafka Server started")
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let taken = if since.contains("Address already in use") {
                    " (Address already in use)"
                } else {
                    ""
                };
                return Err(format!(
                    "Apache Kafka exited ({status}) before serving{taken}; see {}",
                    self.log.display()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "Apache Kafka did not serve on {addr} within 60 s; see {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn log4j_option() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kafka/log4j2.properties");
    format!("-Dlog4j2.configurationFile={}", path.display())
}

impl Drop for ApacheKafka {
    fn drop(&mut self) {
        // SIGKILL ends a paused (SIGSTOPped) process too.
        self.kill();
    }
}
