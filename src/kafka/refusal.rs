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

/// A client context keeping the connection failures librdkafka reports (the newest 32).
#[derive(Default)]
struct Watch {
    failures: Mutex<Vec<String>>,
}

impl Watch {
    fn keep(&self, message: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            if failures.len() == 32 {
                failures.remove(0);
            }
            failures.push(message.to_owned());
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().map(|f| f.clone()).unwrap_or_default()
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
/// (see [`refusal`]), without waiting for the timeout. Otherwise, at the timeout: "Kafka at
/// <bootstrap_servers> unreachable", librdkafka's error and its last connection failure.
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
        let failures = consumer.context().failures();
        if let Some(refused) = failures.iter().find_map(|f| refusal(&config.security, f)) {
            return Err(format!("Kafka at {}: {refused}", config.bootstrap_servers));
        }
        if Instant::now() >= deadline {
            let last = failures.last().map_or(String::new(), |f| {
                let hint = if f.contains("security.protocol") {
                    "; check kafka.security.protocol"
                } else {
                    ""
                };
                format!(" (last: {}){hint}", f.trim())
            });
            return Err(format!(
                "Kafka at {} unreachable: {error}{last}",
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
    // A connection closed in the handshake may be a broker going down: not told at once.
    if lower.contains("ssl")
        && (lower.contains("handshake") || lower.contains("alert"))
        && !lower.contains("disconnected")
    {
        return Some(format!(
            "the TLS handshake failed: check kafka.security.protocol, kafka.security.ca_file and kafka.security.cert_file (librdkafka: {said})"
        ));
    }
    // Not here: librdkafka's "connecting to a SSL listener?" after a disconnection, which a
    // broker shutting down causes too; it waits for the timeout and shows as a hint then.
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SaslMechanism, SecurityProtocol};

    /// What librdkafka 2.12 said to the tests' Apache Kafka 4.1 (tests/kafka_security.rs).
    const WRONG_PASSWORD: &str = "[thrd:sasl_plaintext://127.0.0.1:38317/bootstrap]: sasl_plaintext://127.0.0.1:38317/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 544ms in state AUTH_REQ)";
    const UNTRUSTED: &str = "[thrd:sasl_ssl://127.0.0.1:43243/bootstrap]: sasl_ssl://127.0.0.1:43243/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (install ca-certificates package) (after 2223ms in state SSL_HANDSHAKE)";
    const NO_CLIENT_CERT: &str = "[thrd:ssl://127.0.0.1:40107/bootstrap]: ssl://127.0.0.1:40107/bootstrap: Receive failed: error:0A000412:SSL routines::sslv3 alert bad certificate: SSL alert number 42 (after 14ms in state APIVERSION_QUERY)";

    fn security(protocol: SecurityProtocol) -> KafkaSecurity {
        KafkaSecurity {
            protocol,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some("ibstream".to_owned()),
            ca_file: Some("/etc/ibstream/ca.pem".into()),
            ..KafkaSecurity::default()
        }
    }

    #[test]
    fn each_refusal_names_the_key_to_fix_and_keeps_librdkafkas_words() {
        let sasl = security(SecurityProtocol::SaslSsl);
        let said = refusal(&sasl, WRONG_PASSWORD).unwrap();
        assert!(said.contains("kafka.sasl_password"), "{said}");
        assert!(said.contains("\"ibstream\""), "{said}");
        assert!(said.contains("invalid credentials"), "{said}");
        let said = refusal(&sasl, UNTRUSTED).unwrap();
        assert!(
            said.contains("kafka.security.ca_file (/etc/ibstream/ca.pem)"),
            "{said}"
        );
        let mut tls = security(SecurityProtocol::Ssl);
        tls.sasl_mechanism = None;
        tls.sasl_username = None;
        let said = refusal(&tls, NO_CLIENT_CERT).unwrap();
        assert!(said.contains("wants a client certificate"), "{said}");
        assert!(said.contains("kafka.security.cert_file"), "{said}");
        tls.cert_file = Some("/etc/ibstream/client.pem".into());
        tls.key_file = Some("/etc/ibstream/client.key".into());
        let said = refusal(&tls, NO_CLIENT_CERT).unwrap();
        assert!(said.contains("refused the client certificate"), "{said}");
        assert!(
            said.contains("kafka.security.cert_file (/etc/ibstream/client.pem)"),
            "{said}"
        );
    }

    #[test]
    fn a_broker_down_or_restarting_is_no_refusal() {
        let sasl = security(SecurityProtocol::SaslSsl);
        for failure in [
            "[thrd:sasl_ssl://127.0.0.1:9/bootstrap]: sasl_ssl://127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused (after 0ms in state CONNECT)",
            "[thrd:ssl://127.0.0.1:9/bootstrap]: ssl://127.0.0.1:9/bootstrap: Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol configuration (connecting to a SSL listener?) or broker version is < 0.10 (see api.version.request) (after 1ms in state APIVERSION_QUERY)",
            "BrokerTransportFailure (Local: Broker transport failure): 1/1 brokers are down",
            "[thrd:ssl://127.0.0.1:9/bootstrap]: ssl://127.0.0.1:9/bootstrap: SSL handshake failed: Disconnected: connecting to a PLAINTEXT broker listener? (after 1ms in state SSL_HANDSHAKE)",
        ] {
            assert_eq!(refusal(&sasl, failure), None, "{failure}");
        }
    }
}
