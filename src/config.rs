//! Configuration: serde structs, loading and validation.
//!
//! Sources, later ones winning: built-in defaults → TOML file (`--config PATH` or
//! `IBSTREAM_CONFIG`) → environment (`IBSTREAM_` prefix, `__` nests, so
//! `IBSTREAM_CRM__BASE_URL` sets `crm.base_url`).
//!
//! [`Config::validate`] does no IO: it checks shapes and ranges and names the offending key.
//! Secrets given as `*_file` paths are read later, by [`CrmConfig::resolve_secrets`], because
//! reading a file is IO. Secrets are [`SecretString`]s: their `Debug` prints `[REDACTED]`, and
//! nothing in the crate exposes them except to put them on the wire.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The largest page the CRM API serves (its documented maximum).
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Errors of loading or validating the configuration; each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The sources could not be read or merged, or a key is unknown or has the wrong type.
    #[error("configuration error: {0}")]
    Load(String),
    /// A key has a value that is not allowed.
    #[error("configuration error: `{key}` {reason}")]
    Invalid {
        /// The dotted key, e.g. `crm.page_size`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A `*_file` secret could not be read.
    #[error("configuration error: `{key}`: cannot read {path}: {source}")]
    SecretFile {
        /// The dotted key, e.g. `crm.password_file`.
        key: &'static str,
        /// The path that failed.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
}

/// The whole configuration of an ibstream process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The CRM source this process reads.
    pub crm: CrmConfig,
    /// Shape of the Avro events.
    #[serde(default)]
    pub events: EventsConfig,
    /// Names of the Kafka topics.
    #[serde(default)]
    pub topics: TopicsConfig,
    /// Confluent Schema Registry; absent: Avro single-object encoding, no registry.
    #[serde(default)]
    pub schema_registry: Option<SchemaRegistryConfig>,
    /// The Kafka cluster events and state go to.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// What to read and how often.
    #[serde(default)]
    pub streams: StreamsConfig,
    /// The operations HTTP server (`/metrics`, `/health/live`, `/health/ready`, `/status`).
    #[serde(default)]
    pub http: HttpConfig,
}

/// The operations HTTP server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Whether `run` serves it.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Address it listens on (`host:port`; port 0 picks a free one).
    #[serde(default = "default_http_listen")]
    pub listen: String,
}

fn default_http_listen() -> String {
    "0.0.0.0:9464".to_owned()
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_http_listen(),
        }
    }
}

impl HttpConfig {
    /// Returns the address to listen on; the error names the key.
    pub fn address(&self) -> Result<std::net::SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| ConfigError::Invalid {
            key: "http.listen",
            reason: format!("is not host:port with a numeric host: {:?}", self.listen),
        })
    }
}

/// How events reach Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// One Kafka transaction per batch (events + state); needs a broker with transactions.
    ExactlyOnce,
    /// Idempotent producer; state written after the batch's events are acknowledged.
    AtLeastOnce,
}

/// The Kafka cluster and producer settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `kafka-0:9092,kafka-1:9092` (required by `run`).
    #[serde(default)]
    pub bootstrap_servers: String,
    /// `exactly-once` (transactions) or `at-least-once` (idempotent producer).
    #[serde(default = "default_delivery")]
    pub delivery: Delivery,
    /// Identity of this process: its `transactional.id` and its state barrier key. Two
    /// processes with the same id fence each other; give each process its own.
    #[serde(default = "default_instance_id")]
    pub instance_id: String,
    /// State topic; default `<topics.prefix>._ibstream_state`.
    #[serde(default)]
    pub state_topic: Option<String>,
    /// Partitions of data topics ibstream creates.
    #[serde(default = "default_partitions")]
    pub topic_partitions: i32,
    /// Replication factor of topics ibstream creates; -1 uses the broker's default.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Extra topic configs of data topics ibstream creates (e.g. `retention.ms`).
    #[serde(default)]
    pub topic_configs: std::collections::BTreeMap<String, String>,
    /// Timeout of one batch (a transaction, or the acknowledgement of its events), seconds.
    #[serde(default = "default_batch_timeout_secs")]
    pub batch_timeout_secs: u64,
    /// Further librdkafka producer/consumer settings, passed through (e.g. `security.protocol`,
    /// `sasl.mechanism`, `ssl.ca.location`); keys ibstream sets itself are refused.
    #[serde(default)]
    pub librdkafka: std::collections::BTreeMap<String, String>,
    /// SASL password (`sasl.password`), kept out of logs; or `sasl_password_file`.
    #[serde(default, serialize_with = "serialize_redacted")]
    pub sasl_password: Option<SecretString>,
    /// File holding the SASL password; trailing newline ignored.
    #[serde(default)]
    pub sasl_password_file: Option<PathBuf>,
    /// TLS and SASL to the brokers.
    #[serde(default)]
    pub security: KafkaSecurity,
}

/// How ibstream authenticates to Kafka and encrypts the connection (librdkafka's
/// `security.protocol`, `sasl.*` and `ssl.*` settings, typed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `PLAINTEXT` (default), `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    #[serde(default)]
    pub protocol: SecurityProtocol,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (with a SASL protocol).
    #[serde(default)]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name (the password is `kafka.sasl_password` or `kafka.sasl_password_file`).
    #[serde(default)]
    pub sasl_username: Option<String>,
    /// PEM CA file to verify the brokers' certificates (default: the system's roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS, with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

/// librdkafka's `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    /// `PLAIN`.
    #[serde(rename = "PLAIN")]
    Plain,
    /// `SCRAM-SHA-256`.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// `SCRAM-SHA-512`.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaSecurity {
    fn protocol_name(&self) -> &'static str {
        match self.protocol {
            SecurityProtocol::Plaintext => "PLAINTEXT",
            SecurityProtocol::Ssl => "SSL",
            SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            SecurityProtocol::SaslSsl => "SASL_SSL",
        }
    }

    fn sasl(&self) -> bool {
        matches!(
            self.protocol,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }

    fn tls(&self) -> bool {
        matches!(
            self.protocol,
            SecurityProtocol::Ssl | SecurityProtocol::SaslSsl
        )
    }

    /// Checks the section without IO; `has_password`: a SASL password is configured.
    fn validate(&self, has_password: bool) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_owned(),
        };
        let protocol = self.protocol_name();
        if self.sasl() {
            if self.sasl_mechanism.is_none() {
                return Err(invalid("kafka.security.sasl_mechanism", &format!("is required with protocol {protocol} (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")));
            }
            if self.sasl_username.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    "kafka.security.sasl_username",
                    &format!("is required with protocol {protocol}"),
                ));
            }
            if !has_password {
                return Err(invalid(
                    "kafka.sasl_password",
                    &format!("(or kafka.sasl_password_file) is required with protocol {protocol}"),
                ));
            }
        } else if self.sasl_mechanism.is_some() || self.sasl_username.is_some() {
            return Err(invalid(
                "kafka.security.protocol",
                &format!(
                    "is {protocol}, but SASL settings are given: use SASL_SSL or SASL_PLAINTEXT"
                ),
            ));
        }
        if !self.tls() {
            for (key, set) in [
                ("kafka.security.ca_file", self.ca_file.is_some()),
                ("kafka.security.cert_file", self.cert_file.is_some()),
                ("kafka.security.key_file", self.key_file.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        &format!("needs protocol SSL or SASL_SSL (it is {protocol})"),
                    ));
                }
            }
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err(invalid(
                "kafka.security.key_file",
                "is required with kafka.security.cert_file",
            )),
            (None, Some(_)) => Err(invalid(
                "kafka.security.cert_file",
                "is required with kafka.security.key_file",
            )),
            _ => Ok(()),
        }
    }

    /// Returns the librdkafka keys this section sets (none while it is left at PLAINTEXT).
    fn keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.protocol != SecurityProtocol::Plaintext {
            keys.push("security.protocol");
        }
        for (key, set) in [
            ("sasl.mechanism", self.sasl_mechanism.is_some()),
            ("sasl.username", self.sasl_username.is_some()),
            ("ssl.ca.location", self.ca_file.is_some()),
            ("ssl.certificate.location", self.cert_file.is_some()),
            ("ssl.key.location", self.key_file.is_some()),
        ] {
            if set {
                keys.push(key);
            }
        }
        keys
    }

    /// Returns the librdkafka settings (checks the files exist: IO).
    fn settings(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut out = Vec::new();
        if self.protocol != SecurityProtocol::Plaintext {
            out.push((
                "security.protocol".to_owned(),
                self.protocol_name().to_owned(),
            ));
        }
        if let Some(mechanism) = self.sasl_mechanism {
            let name = match mechanism {
                SaslMechanism::Plain => "PLAIN",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            };
            out.push(("sasl.mechanism".to_owned(), name.to_owned()));
        }
        if let Some(user) = &self.sasl_username {
            out.push(("sasl.username".to_owned(), user.clone()));
        }
        for (key, setting, file) in [
            ("kafka.security.ca_file", "ssl.ca.location", &self.ca_file),
            (
                "kafka.security.cert_file",
                "ssl.certificate.location",
                &self.cert_file,
            ),
            (
                "kafka.security.key_file",
                "ssl.key.location",
                &self.key_file,
            ),
        ] {
            if let Some(path) = file {
                if let Err(source) = std::fs::metadata(path) {
                    return Err(ConfigError::SecretFile {
                        key,
                        path: path.clone(),
                        source,
                    });
                }
                out.push((setting.to_owned(), path.display().to_string()));
            }
        }
        Ok(out)
    }
}

fn default_delivery() -> Delivery {
    Delivery::ExactlyOnce
}
fn default_instance_id() -> String {
    "ibstream".to_owned()
}
fn default_partitions() -> i32 {
    3
}
fn default_replication() -> i32 {
    -1
}
fn default_batch_timeout_secs() -> u64 {
    60
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: String::new(),
            delivery: default_delivery(),
            instance_id: default_instance_id(),
            state_topic: None,
            topic_partitions: default_partitions(),
            replication_factor: default_replication(),
            topic_configs: Default::default(),
            batch_timeout_secs: default_batch_timeout_secs(),
            librdkafka: Default::default(),
            sasl_password: None,
            sasl_password_file: None,
            security: KafkaSecurity::default(),
        }
    }
}

/// librdkafka keys ibstream sets itself; the pass-through map may not set them.
pub const RESERVED_LIBRDKAFKA_KEYS: [&str; 10] = [
    "bootstrap.servers",
    "transactional.id",
    "enable.idempotence",
    "isolation.level",
    "group.id",
    "enable.auto.commit",
    "partitioner",
    "sasl.password",
    "transaction.timeout.ms",
    "message.timeout.ms",
];

impl KafkaConfig {
    /// Returns the state topic name under `topics`.
    pub fn state_topic(&self, topics: &TopicsConfig) -> String {
        self.state_topic
            .clone()
            .unwrap_or_else(|| format!("{}._ibstream_state", topics.prefix))
    }

    /// Checks the Kafka section without IO.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_owned(),
        };
        if self.bootstrap_servers.trim().is_empty() {
            return Err(invalid("kafka.bootstrap_servers", "is required"));
        }
        if self.instance_id.is_empty()
            || !self
                .instance_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(invalid(
                "kafka.instance_id",
                "must be letters, digits, '.', '_' or '-'",
            ));
        }
        if self.topic_partitions < 1 {
            return Err(invalid("kafka.topic_partitions", "must be at least 1"));
        }
        if self.replication_factor == 0 || self.replication_factor < -1 {
            return Err(invalid(
                "kafka.replication_factor",
                "must be -1 (broker default) or at least 1",
            ));
        }
        if self.batch_timeout_secs == 0 || self.batch_timeout_secs > 900 {
            // 900 s is Kafka's default transaction.max.timeout.ms.
            return Err(invalid(
                "kafka.batch_timeout_secs",
                "must be between 1 and 900",
            ));
        }
        if let Some(topic) = &self.state_topic {
            if let Err(reason) = check_topic_name(topic) {
                return Err(invalid("kafka.state_topic", &reason));
            }
        }
        for key in self.librdkafka.keys() {
            if RESERVED_LIBRDKAFKA_KEYS.contains(&key.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "kafka.librdkafka",
                    reason: format!(
                        "sets `{key}`, which ibstream sets itself (use the typed kafka.* key)"
                    ),
                });
            }
        }
        if self.sasl_password.is_some() && self.sasl_password_file.is_some() {
            return Err(invalid(
                "kafka.sasl_password",
                "and kafka.sasl_password_file are both set; set one",
            ));
        }
        for key in self.security.keys() {
            if self.librdkafka.contains_key(key) {
                return Err(ConfigError::Invalid {
                    key: "kafka.librdkafka",
                    reason: format!("sets `{key}`, which kafka.security sets too; set it one way"),
                });
            }
        }
        self.security
            .validate(self.sasl_password.is_some() || self.sasl_password_file.is_some())
    }

    /// Returns the largest record the producer sends: `message.max.bytes` from
    /// `kafka.librdkafka`, else librdkafka's default (1,000,000), less room for the record's
    /// key, headers and framing (256 bytes).
    pub fn max_message_bytes(&self) -> usize {
        let limit = self
            .librdkafka
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(1_000_000);
        limit.saturating_sub(256)
    }

    /// Returns the librdkafka settings common to producers and consumers (reads the SASL
    /// password file: IO).
    pub fn client_settings(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut settings = vec![(
            "bootstrap.servers".to_owned(),
            self.bootstrap_servers.clone(),
        )];
        settings.extend(self.librdkafka.iter().map(|(k, v)| (k.clone(), v.clone())));
        settings.extend(self.security.settings()?);
        if self.sasl_password.is_some() || self.sasl_password_file.is_some() {
            let password = resolve_secret(
                self.sasl_password.as_ref(),
                self.sasl_password_file.as_deref(),
                "kafka.sasl_password",
                "kafka.sasl_password_file",
            )?;
            settings.push(("sasl.password".to_owned(), expose(&password).to_owned()));
        }
        Ok(settings)
    }
}

/// What to read, from when, and how often.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsConfig {
    /// First day the first start backfills from (CRM time zone).
    #[serde(default = "default_start_date")]
    pub start_date: chrono::NaiveDate,
    /// Days per backfill window.
    #[serde(default = "default_backfill_window_days")]
    pub backfill_window_days: u32,
    /// A window whose total exceeds this is split in halves (down to one day).
    #[serde(default = "default_max_window_records")]
    pub max_window_records: u64,
    /// Days before the watermark read again each cycle (late records).
    #[serde(default = "default_lookback_days")]
    pub lookback_days: u32,
    /// Seconds after a day ends (CRM time zone) before the watermark may pass it.
    #[serde(default = "default_closing_lag_secs")]
    pub closing_lag_secs: u64,
    /// Re-reads of a window whose pages held fewer distinct ids than its total (counted over
    /// the union of its reads); still short, the window is split in halves, and a single day
    /// still short becomes an open window.
    #[serde(default = "default_max_drift_rereads")]
    pub max_drift_rereads: u32,
    /// Days an open window (a day read with records missing) is retried before it is given
    /// up with an error.
    #[serde(default = "default_open_window_retention_days")]
    pub open_window_retention_days: u32,
    /// Days before today the reconciliation sweep reads again (late and corrected records);
    /// append-only streams keep fingerprints this long. 0 turns the sweep off.
    #[serde(default = "default_reconcile_days")]
    pub reconcile_days: u32,
    /// Seconds between two reconciliation sweeps of a stream (or server tag).
    #[serde(default = "default_reconcile_interval_secs")]
    pub reconcile_interval_secs: u64,
    /// Ask for fake transactions too (`includeFake=true`); they are flagged `isFake`.
    #[serde(default)]
    pub include_fake_transactions: bool,
    /// Only these server tags' positions (default: every live server).
    #[serde(default)]
    pub server_tags: Option<Vec<String>>,
    /// Leads.
    #[serde(default = "StreamConfig::mutable")]
    pub leads: StreamConfig,
    /// Customers; `balanceUsd` is volatile by default.
    #[serde(default = "StreamConfig::customers")]
    pub customers: StreamConfig,
    /// Transactions.
    #[serde(default = "StreamConfig::append_only")]
    pub transactions: StreamConfig,
    /// Servers.
    #[serde(default = "StreamConfig::servers")]
    pub servers: StreamConfig,
    /// Closed positions.
    #[serde(default = "StreamConfig::append_only")]
    pub positions: StreamConfig,
}

/// Settings of one stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Whether this process reads the stream.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds between the end of one cycle and the start of the next.
    #[serde(default = "default_poll_interval_secs")]
    pub poll_interval_secs: u64,
    /// Top-level fields left out of the fingerprint: a change of them alone makes no
    /// UPDATED event (they are still carried in every event).
    #[serde(default)]
    pub volatile_fields: Vec<String>,
}

impl StreamConfig {
    fn mutable() -> Self {
        Self {
            enabled: true,
            poll_interval_secs: default_poll_interval_secs(),
            volatile_fields: Vec::new(),
        }
    }
    fn customers() -> Self {
        Self {
            volatile_fields: vec!["balanceUsd".to_owned()],
            ..Self::mutable()
        }
    }
    fn append_only() -> Self {
        Self::mutable()
    }
    fn servers() -> Self {
        Self {
            poll_interval_secs: 300,
            ..Self::mutable()
        }
    }
}

fn default_start_date() -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(2020, 1, 1).unwrap_or_default()
}
fn default_backfill_window_days() -> u32 {
    31
}
fn default_max_window_records() -> u64 {
    50_000
}
fn default_lookback_days() -> u32 {
    1
}
fn default_closing_lag_secs() -> u64 {
    900
}
fn default_max_drift_rereads() -> u32 {
    2
}
fn default_poll_interval_secs() -> u64 {
    60
}
fn default_open_window_retention_days() -> u32 {
    7
}
fn default_reconcile_days() -> u32 {
    30
}
fn default_reconcile_interval_secs() -> u64 {
    21_600
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            start_date: default_start_date(),
            backfill_window_days: default_backfill_window_days(),
            max_window_records: default_max_window_records(),
            lookback_days: default_lookback_days(),
            closing_lag_secs: default_closing_lag_secs(),
            max_drift_rereads: default_max_drift_rereads(),
            open_window_retention_days: default_open_window_retention_days(),
            reconcile_days: default_reconcile_days(),
            reconcile_interval_secs: default_reconcile_interval_secs(),
            include_fake_transactions: false,
            server_tags: None,
            leads: StreamConfig::mutable(),
            customers: StreamConfig::customers(),
            transactions: StreamConfig::append_only(),
            servers: StreamConfig::servers(),
            positions: StreamConfig::append_only(),
        }
    }
}

impl StreamsConfig {
    /// Checks the streams section without IO.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_owned(),
        };
        // Bounds keep every date and duration computed from these far from overflow.
        let ranges: [(&'static str, u64, u64, u64); 7] = [
            (
                "streams.backfill_window_days",
                self.backfill_window_days.into(),
                1,
                3660,
            ),
            ("streams.lookback_days", self.lookback_days.into(), 0, 366),
            (
                "streams.closing_lag_secs",
                self.closing_lag_secs,
                0,
                7 * 86_400,
            ),
            ("streams.reconcile_days", self.reconcile_days.into(), 0, 366),
            (
                "streams.reconcile_interval_secs",
                self.reconcile_interval_secs,
                1,
                30 * 86_400,
            ),
            (
                "streams.open_window_retention_days",
                self.open_window_retention_days.into(),
                1,
                366,
            ),
            (
                "streams.max_drift_rereads",
                self.max_drift_rereads.into(),
                0,
                100,
            ),
        ];
        for (key, value, min, max) in ranges {
            if value < min || value > max {
                return Err(invalid(key, &format!("must be between {min} and {max}")));
            }
        }
        if self.max_window_records == 0 {
            return Err(invalid("streams.max_window_records", "must be at least 1"));
        }
        let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
        if self.start_date < epoch {
            return Err(invalid(
                "streams.start_date",
                "must not be before 1970-01-01",
            ));
        }
        // Today in the earliest time zone on Earth: a start date after it is in the future
        // wherever the CRM is.
        let latest_today = (chrono::Utc::now() + chrono::Duration::hours(14)).date_naive();
        if self.start_date > latest_today {
            return Err(invalid(
                "streams.start_date",
                &format!("is in the future ({})", self.start_date),
            ));
        }
        for (key, stream) in [
            ("streams.leads.poll_interval_secs", &self.leads),
            ("streams.customers.poll_interval_secs", &self.customers),
            (
                "streams.transactions.poll_interval_secs",
                &self.transactions,
            ),
            ("streams.servers.poll_interval_secs", &self.servers),
            ("streams.positions.poll_interval_secs", &self.positions),
        ] {
            if stream.poll_interval_secs == 0 || stream.poll_interval_secs > 86_400 {
                return Err(invalid(key, "must be between 1 and 86400"));
            }
        }
        Ok(())
    }
}

/// Shape of the Avro events.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Avro namespace of every event schema.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// What a money or volume value with more than 8 decimals becomes.
    #[serde(default)]
    pub decimal_excess: DecimalExcess,
}

/// Policy for numbers with more than the 8 decimals the events carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecimalExcess {
    /// Binary floating-point noise (15 or more significant digits, e.g. `-7.8500000000000005`)
    /// is rounded half-even to 8 decimals and counted; a precise value with more decimals
    /// (`0.123456789`) goes to the dead-letter topic.
    #[default]
    RoundFloatNoise,
    /// Every value with more than 8 decimals goes to the dead-letter topic.
    Reject,
    /// Every value with more than 8 decimals is rounded half-even to 8 and counted.
    Round,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            namespace: default_namespace(),
            decimal_excess: DecimalExcess::default(),
        }
    }
}

fn default_namespace() -> String {
    "com.ibstream".to_owned()
}

/// Names of the Kafka topics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Prefix of every topic: data topics are `<prefix>.<stream>`, dead letters `<prefix>.dlq`.
    #[serde(default = "default_topic_prefix")]
    pub prefix: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            prefix: default_topic_prefix(),
        }
    }
}

fn default_topic_prefix() -> String {
    "crm".to_owned()
}

impl TopicsConfig {
    /// Returns the data topic of a stream (`<prefix>.<stream>`).
    pub fn data_topic(&self, stream: &str) -> String {
        format!("{}.{stream}", self.prefix)
    }

    /// Returns the dead-letter topic (`<prefix>.dlq`).
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dlq", self.prefix)
    }
}

/// A Confluent Schema Registry (or a compatible one: Redpanda, Apicurio's ccompat API).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// Base URL, e.g. `https://schema-registry.example.com:8081`.
    #[serde(default)]
    pub url: String,
    /// Basic-auth user name (with `password` or `password_file`).
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password.
    #[serde(default, serialize_with = "serialize_redacted")]
    pub password: Option<SecretString>,
    /// File holding the basic-auth password; trailing newline ignored.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM file of a CA to trust besides the system roots (private registries).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Register the schemas under `<topic>-value` at start-up (true), or only look them up
    /// and fail if one is missing (false).
    #[serde(default = "default_true")]
    pub auto_register: bool,
    /// Timeout of one registry request, in seconds.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

fn default_true() -> bool {
    true
}

impl SchemaRegistryConfig {
    /// Checks the registry section without IO.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_owned(),
        };
        match reqwest::Url::parse(&self.url) {
            Ok(url) if url.scheme() == "http" || url.scheme() == "https" => {
                if !url.username().is_empty() || url.password().is_some() {
                    return Err(invalid(
                        "schema_registry.url",
                        "must not carry credentials; use schema_registry.username and password",
                    ));
                }
            }
            Ok(_) => {
                return Err(invalid(
                    "schema_registry.url",
                    "must be an http:// or https:// URL",
                ))
            }
            Err(e) => {
                return Err(invalid(
                    "schema_registry.url",
                    &format!("is not a URL: {e}"),
                ))
            }
        }
        let has_password = self.password.is_some() || self.password_file.is_some();
        if self.password.is_some() && self.password_file.is_some() {
            return Err(invalid(
                "schema_registry.password",
                "and schema_registry.password_file are both set; set one",
            ));
        }
        if self.username.is_some() != has_password {
            return Err(invalid(
                "schema_registry.username",
                "and a password (schema_registry.password or password_file) go together",
            ));
        }
        if self.request_timeout_secs == 0 {
            return Err(invalid(
                "schema_registry.request_timeout_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// Reads the basic-auth password, if any (IO for `password_file`).
    pub fn resolve_password(&self) -> Result<Option<SecretString>, ConfigError> {
        if self.password.is_none() && self.password_file.is_none() {
            return Ok(None);
        }
        resolve_secret(
            self.password.as_ref(),
            self.password_file.as_deref(),
            "schema_registry.password",
            "schema_registry.password_file",
        )
        .map(Some)
    }
}

/// How to reach and read the CRM's IB Reports API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrmConfig {
    /// Base URL of the CRM, e.g. `https://crm.example-broker.com`.
    #[serde(default)]
    pub base_url: String,
    /// Path segment of the integration: calls go to `/api/v1/<api_path>/…`.
    #[serde(default = "default_api_path")]
    pub api_path: String,
    /// Email of the CRM user holding the IB Reports role.
    #[serde(default)]
    pub email: String,
    /// Password of that user (or use `password_file`).
    #[serde(default, serialize_with = "serialize_redacted")]
    pub password: Option<SecretString>,
    /// File holding the password (a Kubernetes secret mount); trailing newline ignored.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// API key made in the CRM (or use `api_key_file`); sent as `X-Api-Key`.
    #[serde(default, serialize_with = "serialize_redacted")]
    pub api_key: Option<SecretString>,
    /// File holding the API key; trailing newline ignored.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// The API key's domain, sent as `X-DOMAIN`.
    #[serde(default)]
    pub domain: String,
    /// IANA time zone the CRM writes local timestamps and day filters in.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Requests per second allowed to the CRM, shared by every stream of the process.
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: u32,
    /// Most CRM requests in flight at once, shared by every stream of the process (the
    /// adaptive limit moves between 1 and this; a backfill reads this many windows at once).
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: u32,
    /// Timeout of one HTTP request, in seconds.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Records per page (1 to 1000, the API's maximum).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Pages of a window fetched ahead of the one being committed (0 reads every page, a
    /// sweep's too, only when the previous one is committed; windows are then read one at a
    /// time).
    #[serde(default = "default_read_ahead_pages")]
    pub read_ahead_pages: u32,
    /// Retries of a failed call (5xx, 429, timeouts, resets) before the call fails.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First retry delay bound in milliseconds; doubles per attempt, full jitter.
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// Largest retry delay in milliseconds (a longer `Retry-After` is still honoured).
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Largest answer body read from the CRM, in bytes; a larger one is an error.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// PEM file of a CA to trust for the CRM's certificate besides the system roots (a
    /// private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_max_response_bytes() -> u64 {
    64 << 20
}

fn default_api_path() -> String {
    "ib".to_owned()
}
fn default_timezone() -> String {
    "UTC".to_owned()
}
fn default_requests_per_second() -> u32 {
    20
}
fn default_max_concurrent_requests() -> u32 {
    32
}
fn default_request_timeout_secs() -> u64 {
    30
}
fn default_page_size() -> u32 {
    MAX_PAGE_SIZE
}
fn default_read_ahead_pages() -> u32 {
    4
}
fn default_max_retries() -> u32 {
    6
}
fn default_backoff_initial_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    30_000
}

fn serialize_redacted<S: serde::Serializer>(
    value: &Option<SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => serializer.serialize_some("[REDACTED]"),
        None => serializer.serialize_none(),
    }
}

impl Default for CrmConfig {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            api_path: default_api_path(),
            email: String::new(),
            password: None,
            password_file: None,
            api_key: None,
            api_key_file: None,
            domain: String::new(),
            timezone: default_timezone(),
            requests_per_second: default_requests_per_second(),
            max_concurrent_requests: default_max_concurrent_requests(),
            request_timeout_secs: default_request_timeout_secs(),
            page_size: default_page_size(),
            read_ahead_pages: default_read_ahead_pages(),
            max_retries: default_max_retries(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            max_response_bytes: default_max_response_bytes(),
            ca_file: None,
        }
    }
}

/// The secrets of a CRM source, read from the config or from their files.
#[derive(Debug, Clone)]
pub struct CrmSecrets {
    /// The CRM user's password.
    pub password: SecretString,
    /// The API key.
    pub api_key: SecretString,
}

impl Config {
    /// Loads the configuration from defaults, the optional TOML file and the process
    /// environment (`IBSTREAM_*`).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new().merge(Serialized::defaults(DefaultsOnly::default()));
        if let Some(path) = path {
            if !path.is_file() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist or is not a file",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // IBSTREAM_CONFIG names the file and IBSTREAM_LOG the log filter: not config keys.
        // Secrets are taken as the strings they are: figment would read `123456` or `true`
        // as a number or a boolean (and quote it in its type error).
        let mut ignored = vec!["CONFIG", "LOG"];
        ignored.extend(SECRET_ENV.iter().map(|(var, _)| *var));
        figment = figment.merge(Env::prefixed("IBSTREAM_").ignore(&ignored).split("__"));
        for (var, key) in SECRET_ENV {
            if let Ok(value) = std::env::var(format!("IBSTREAM_{var}")) {
                figment = figment.merge(Serialized::global(key, value));
            }
        }
        figment
            .extract::<Config>()
            .map_err(|e| ConfigError::Load(describe_figment_error(e)))
    }

    /// Returns the built-in defaults alone, without a file or `IBSTREAM_*` variables (what
    /// `demo` starts from, so nothing of a production configuration leaks into it).
    pub fn defaults() -> Result<Self, ConfigError> {
        Figment::new()
            .merge(Serialized::defaults(DefaultsOnly::default()))
            .extract::<Config>()
            .map_err(|e| ConfigError::Load(describe_figment_error(e)))
    }

    /// Checks values without IO; the error names the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.crm.validate()?;
        self.validate_without_crm()
    }

    /// Checks what the commands that read only Kafka need (`state`, `events tail`): every
    /// section but `crm` (no IO).
    pub fn validate_without_crm(&self) -> Result<(), ConfigError> {
        if !is_avro_namespace(&self.events.namespace) {
            return Err(ConfigError::Invalid {
                key: "events.namespace",
                reason: format!(
                    "is not an Avro namespace (dot-separated names): {:?}",
                    self.events.namespace
                ),
            });
        }
        // The longest name made from the prefix is the default state topic.
        if let Err(reason) = check_topic_name(&format!("{}._ibstream_state", self.topics.prefix))
            .and_then(|_| check_topic_name(&self.topics.prefix))
        {
            return Err(ConfigError::Invalid {
                key: "topics.prefix",
                reason: format!(
                    "{reason} (it must leave room for \"._ibstream_state\": at most {} characters)",
                    MAX_TOPIC_NAME - "._ibstream_state".len()
                ),
            });
        }
        if let Some(registry) = &self.schema_registry {
            registry.validate()?;
        }
        self.http.address()?;
        Ok(())
    }
}

/// Kafka's longest topic name.
const MAX_TOPIC_NAME: usize = 249;

/// Checks a Kafka topic name: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("{name:?} is not a topic name"));
    }
    if name.len() > MAX_TOPIC_NAME {
        return Err(format!(
            "gives a topic name of {} characters; Kafka allows {MAX_TOPIC_NAME}",
            name.len()
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("must be letters, digits, '.', '_' or '-'".to_owned());
    }
    Ok(())
}

/// Returns whether `text` is a valid Avro namespace: dot-separated `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_avro_namespace(text: &str) -> bool {
    !text.is_empty()
        && text.split('.').all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// Environment variables (after `IBSTREAM_`) holding secrets, and their keys.
const SECRET_ENV: [(&str, &str); 4] = [
    ("CRM__PASSWORD", "crm.password"),
    ("CRM__API_KEY", "crm.api_key"),
    ("KAFKA__SASL_PASSWORD", "kafka.sasl_password"),
    ("SCHEMA_REGISTRY__PASSWORD", "schema_registry.password"),
];

/// The defaults that figment starts from: sections, so a missing section is not an error,
/// and each stream's own settings, so a file setting one key of `[streams.customers]` keeps
/// the stream's other defaults (its volatile `balanceUsd`) rather than the generic ones.
#[derive(Serialize, Default)]
struct DefaultsOnly {
    crm: DefaultsCrm,
    streams: DefaultsStreams,
}

#[derive(Serialize)]
struct DefaultsStreams {
    leads: StreamConfig,
    customers: StreamConfig,
    transactions: StreamConfig,
    servers: StreamConfig,
    positions: StreamConfig,
}

impl Default for DefaultsStreams {
    fn default() -> Self {
        DefaultsStreams {
            leads: StreamConfig::mutable(),
            customers: StreamConfig::customers(),
            transactions: StreamConfig::append_only(),
            servers: StreamConfig::servers(),
            positions: StreamConfig::append_only(),
        }
    }
}

#[derive(Serialize, Default)]
struct DefaultsCrm {}

fn describe_figment_error(error: figment::Error) -> String {
    // One line per error, naming the dotted key and where its value came from.
    let mut lines: Vec<String> = error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(source) => format!(" (from {source})"),
                    None => format!(" (from {})", m.name),
                })
                .unwrap_or_default();
            let secret = SECRET_ENV.iter().any(|(_, k)| *k == key);
            let line = if key.is_empty() {
                format!("{}{source}", e.kind)
            } else if secret {
                // A type error quotes the value: never for a secret.
                format!("`{key}`: must be a string (its value is not shown){source}")
            } else {
                format!("`{key}`: {}{source}", e.kind)
            };
            // Parse errors span several lines; the caller prints one.
            line.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .collect();
    lines.dedup();
    lines.join("; ")
}

impl CrmConfig {
    /// Checks the CRM section without IO.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_owned(),
        };
        if self.base_url.is_empty() {
            return Err(invalid("crm.base_url", "is required"));
        }
        match reqwest::Url::parse(&self.base_url) {
            Ok(url) if url.scheme() == "http" || url.scheme() == "https" => {
                if !url.username().is_empty() || url.password().is_some() {
                    return Err(invalid("crm.base_url", "must not carry credentials"));
                }
            }
            Ok(_) => {
                return Err(invalid(
                    "crm.base_url",
                    "must be an http:// or https:// URL",
                ))
            }
            Err(e) => return Err(invalid("crm.base_url", &format!("is not a URL: {e}"))),
        }
        if self.api_path.is_empty() || self.api_path.contains(['/', '?', '#']) {
            return Err(invalid(
                "crm.api_path",
                "must be one path segment, e.g. \"ib\"",
            ));
        }
        if self.email.is_empty() {
            return Err(invalid("crm.email", "is required"));
        }
        match (&self.password, &self.password_file) {
            (None, None) => {
                return Err(invalid(
                    "crm.password",
                    "is required (or crm.password_file)",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "crm.password",
                    "and crm.password_file are both set; set one",
                ))
            }
            _ => {}
        }
        match (&self.api_key, &self.api_key_file) {
            (None, None) => {
                return Err(invalid("crm.api_key", "is required (or crm.api_key_file)"))
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "crm.api_key",
                    "and crm.api_key_file are both set; set one",
                ))
            }
            _ => {}
        }
        if self.domain.is_empty() {
            return Err(invalid("crm.domain", "is required"));
        }
        if self.timezone.parse::<chrono_tz::Tz>().is_err() {
            return Err(invalid(
                "crm.timezone",
                &format!("is not an IANA time zone: {:?}", self.timezone),
            ));
        }
        if self.requests_per_second == 0 {
            return Err(invalid("crm.requests_per_second", "must be at least 1"));
        }
        if self.max_concurrent_requests == 0 || self.max_concurrent_requests > 1024 {
            return Err(invalid(
                "crm.max_concurrent_requests",
                "must be between 1 and 1024",
            ));
        }
        if self.request_timeout_secs == 0 {
            return Err(invalid("crm.request_timeout_secs", "must be at least 1"));
        }
        if self.page_size == 0 || self.page_size > MAX_PAGE_SIZE {
            return Err(invalid("crm.page_size", "must be between 1 and 1000"));
        }
        if self.read_ahead_pages > 32 {
            return Err(invalid("crm.read_ahead_pages", "must be at most 32"));
        }
        if self.request_timeout_secs > 3600 {
            return Err(invalid("crm.request_timeout_secs", "must be at most 3600"));
        }
        if self.max_response_bytes < 1024 {
            return Err(invalid("crm.max_response_bytes", "must be at least 1024"));
        }
        if self.backoff_max_ms > 3_600_000 {
            return Err(invalid(
                "crm.backoff_max_ms",
                "must be at most 3600000 (an hour)",
            ));
        }
        if self.backoff_initial_ms == 0 {
            return Err(invalid("crm.backoff_initial_ms", "must be at least 1"));
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return Err(invalid(
                "crm.backoff_max_ms",
                "must not be below crm.backoff_initial_ms",
            ));
        }
        Ok(())
    }

    /// Returns the configured time zone; call after [`CrmConfig::validate`].
    pub fn tz(&self) -> Result<chrono_tz::Tz, ConfigError> {
        self.timezone.parse().map_err(|_| ConfigError::Invalid {
            key: "crm.timezone",
            reason: format!("is not an IANA time zone: {:?}", self.timezone),
        })
    }

    /// Reads the secrets, from the config values or their `*_file` paths (IO).
    pub fn resolve_secrets(&self) -> Result<CrmSecrets, ConfigError> {
        let password = resolve_secret(
            self.password.as_ref(),
            self.password_file.as_deref(),
            "crm.password",
            "crm.password_file",
        )?;
        let api_key = resolve_secret(
            self.api_key.as_ref(),
            self.api_key_file.as_deref(),
            "crm.api_key",
            "crm.api_key_file",
        )?;
        Ok(CrmSecrets { password, api_key })
    }
}

fn resolve_secret(
    value: Option<&SecretString>,
    file: Option<&Path>,
    key: &'static str,
    file_key: &'static str,
) -> Result<SecretString, ConfigError> {
    if let Some(value) = value {
        return Ok(value.clone());
    }
    let Some(path) = file else {
        return Err(ConfigError::Invalid {
            key,
            reason: "is required".to_owned(),
        });
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        key: file_key,
        path: path.to_owned(),
        source,
    })?;
    let trimmed = text.trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        return Err(ConfigError::Invalid {
            key: file_key,
            reason: format!("points to an empty file ({})", path.display()),
        });
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

/// Exposes a secret for the one place it is needed: an HTTP header or body.
pub(crate) fn expose(secret: &SecretString) -> &str {
    secret.expose_secret()
}
