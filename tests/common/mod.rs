//! Test fixtures shared by the integration tests: the simulator in-process and a tansu broker
//! process, each on a free port.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ibstream::config::CrmConfig;
use ibstream::crm::CrmClient;
use ibstream::sim::{SimConfig, SimHandle};
use secrecy::SecretString;

/// Starts the simulator in-process on a free port with `tweak` applied to the defaults.
pub async fn start_sim(tweak: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut config = SimConfig::default();
    config.listen = "127.0.0.1:0".parse().expect("address");
    config.leads = 50;
    config.customers = 20;
    config.transactions = 50;
    config.positions = 50;
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

/// Returns a port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A tansu broker process on a free port, with in-memory storage, killed on drop.
pub struct Tansu {
    child: Child,
    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub bootstrap: String,
    /// Where the broker's output goes.
    pub log: PathBuf,
}

impl Tansu {
    /// Starts the broker and waits until it accepts connections.
    pub fn start() -> Tansu {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tansu-{port}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".to_owned());
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start `{bin}` ({e}); ./scripts/test.sh installs tansu 0.6.0")
            });
        let tansu = Tansu {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
            log,
        };
        let addr: SocketAddr = tansu.bootstrap.parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {addr} within 30 s; see {}",
                tansu.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        tansu
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Returns a topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), fastrand::u64(..))
}
