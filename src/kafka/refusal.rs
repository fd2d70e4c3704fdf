//! The first contact with the brokers, and why they refused it.
//!
//! librdkafka answers a refused SASL login or TLS handshake by retrying the connection and, at
//! its metadata timeout, with `BrokerTransportFailure`, which names neither the cause nor the
//! setting to fix; the cause is only in its log (facility `FAIL`), which ibstream does not
//! print. [`reach`] watches that log while it asks for the cluster's metadata and, at the
//! first refusal, stops and says which `kafka.security` key (or `kafka.sasl_password`) to look
//! at. The messages read are librdkafka's (`rdkafka_sasl*.c`, `rdkafka_ssl.c`,
//! `rdkafka_broker.c`); none holds a password or a key.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::metadata::Metadata;

use crate::config::{KafkaConfig, KafkaSecurity};

/// A client context keeping the first connection failure librdkafka reports.
#[derive(Default)]
struct Watch {
    failure: Mutex<Option<String>>,
}

impl Watch {
    fn keep(&self, message: &str) {
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert_with(|| message.to_owned());
        }
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

impl ClientContext for Watch {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let serious = matches!(
            level,
            RDKafkaLogLevel::Emerg
                | RDKafkaLogLevel::Alert
                | RDKafkaLogLevel::Critical
                | RDKafkaLogLevel::Error
                | RDKafkaLogLevel::Warning
        );
        if serious && (fac == "FAIL" || fac == "ERROR") {
            self.keep(message);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.keep(&format!("{error}: {reason}"));
    }
}

impl ConsumerContext for Watch {}

/// Asks the brokers of `config` for the metadata of every topic, for at most `timeout`.
/// Blocking (run it on a blocking thread).
///
/// # Errors
/// At the first refused SASL login or TLS handshake: what librdkafka said and the key to fix
/// (see [`refusal`]), without waiting for the timeout. Otherwise, at the timeout: "cannot reach
/// Kafka at <bootstrap_servers>", librdkafka's error and its last connection failure.
pub fn reach(config: &KafkaConfig, timeout: Duration) -> Result<Metadata, String> {
    let mut client = ClientConfig::new();
    // rdkafka takes librdkafka's log level from the `log` crate, which ibstream does not set
    // up (it would be "off"): the failures come at warning and error.
    client.set_log_level(RDKafkaLogLevel::Warning);
    for (key, value) in config.client_settings().map_err(|e| e.to_string())? {
        client.set(key, value);
    }
    let consumer: BaseConsumer<Watch> = client
        .create_with_context(Watch::default())
        .map_err(|e| format!("cannot create a Kafka client: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let error = match consumer.fetch_metadata(None, left.min(Duration::from_secs(1))) {
            Ok(metadata) => return Ok(metadata),
            Err(e) => e,
        };
        // Errors come as events of the main queue: serving them calls `Watch::error`.
        for _ in 0..100 {
            if consumer.poll(Duration::ZERO).is_none() {
                break;
            }
        }
        let failure = consumer.context().failure();
        if let Some(refused) = failure
            .as_deref()
            .and_then(|f| refusal(&config.security, f))
        {
            return Err(format!(
                "cannot reach Kafka at {}: {refused}",
                config.bootstrap_servers
            ));
        }
        if Instant::now() >= deadline {
            let last = failure.map_or(String::new(), |f| format!(" (last: {f})"));
            return Err(format!(
                "cannot reach Kafka at {}: {error}{last}",
                config.bootstrap_servers
            ));
        }
    }
}

/// Names the setting to fix when `failure` (a librdkafka connection failure) is the brokers
/// refusing the security of the connection; `None` for other failures (a broker down).
pub fn refusal(security: &KafkaSecurity, failure: &str) -> Option<String> {
    let lower = failure.to_lowercase();
    let said = failure.trim();
    let file = |path: &Option<std::path::PathBuf>, otherwise: &str| {
        path.as_ref()
            .map_or_else(|| otherwise.to_owned(), |p| p.display().to_string())
    };
    if lower.contains("sasl authentication error") || lower.contains("authentication failed") {
        return Some(format!(
            "the broker refused the SASL login of user {:?}: check kafka.sasl_password (or kafka.sasl_password_file), kafka.security.sasl_username and kafka.security.sasl_mechanism (librdkafka: {said})",
            security.sasl_username.as_deref().unwrap_or_default()
        ));
    }
    if lower.contains("certificate verify failed") || lower.contains("could not be verified") {
        return Some(format!(
            "the broker's certificate is not trusted: check kafka.security.ca_file ({}): it must hold the CA that signed the broker's certificate, which must name the host of kafka.bootstrap_servers (librdkafka: {said})",
            file(&security.ca_file, "not set: the system's roots")
        ));
    }
    if lower.contains("certificate required")
        || lower.contains("handshake failure")
        || lower.contains("bad certificate")
        || lower.contains("unknown ca")
        || lower.contains("certificate unknown")
    {
        return Some(if security.cert_file.is_none() {
            format!("the broker wants a client certificate (mutual TLS): set kafka.security.cert_file and kafka.security.key_file (librdkafka: {said})")
        } else {
            format!(
                "the broker refused the client certificate: check kafka.security.cert_file ({}) and kafka.security.key_file; the broker must trust the CA that signed it (librdkafka: {said})",
                file(&security.cert_file, "")
            )
        });
    }
    if lower.contains("ssl") && (lower.contains("handshake") || lower.contains("alert")) {
        return Some(format!(
            "the TLS handshake failed: check kafka.security.protocol, kafka.security.ca_file and kafka.security.cert_file (librdkafka: {said})"
        ));
    }
    if lower.contains("security.protocol") {
        return Some(format!(
            "the broker's listener speaks another protocol: check kafka.security.protocol (librdkafka: {said})"
        ));
    }
    None
}
