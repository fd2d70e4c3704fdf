//! Configuration loading: defaults, file, environment, unknown keys, validation, secret files.
// figment's `Jail` closures return figment's own (large) error type.
#![allow(clippy::result_large_err)]

use figment::Jail;
use ibstream::config::{Config, ConfigError};
use secrecy::ExposeSecret;

const MINIMAL: &str = r#"
[crm]
base_url = "https://crm.example-broker.com"
email = "ib@example.com"
password = "file-password"
api_key = "file-key"
domain = "example-broker.com"
"#;

fn load_err(jail: &mut Jail, toml: &str) -> String {
    jail.create_file("c.toml", toml).unwrap();
    match Config::load(Some("c.toml".as_ref())).and_then(|c| c.validate().map(|()| c)) {
        Ok(_) => panic!("accepted: {toml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_file_and_environment_layer() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", MINIMAL)?;
        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        config.validate().unwrap();
        assert_eq!(config.crm.api_path, "ib");
        assert_eq!(config.crm.timezone, "UTC");
        assert_eq!(config.crm.page_size, 1000);
        jail.set_env("IBSTREAM_CRM__BASE_URL", "http://127.0.0.1:9999");
        jail.set_env("IBSTREAM_CRM__PAGE_SIZE", "250");
        jail.set_env("IBSTREAM_CRM__TIMEZONE", "Europe/Nicosia");
        jail.set_env("IBSTREAM_CONFIG", "c.toml");
        jail.set_env("IBSTREAM_LOG", "debug");
        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        config.validate().unwrap();
        assert_eq!(config.crm.base_url, "http://127.0.0.1:9999");
        assert_eq!(config.crm.page_size, 250);
        assert_eq!(config.crm.timezone, "Europe/Nicosia");
        assert_eq!(config.crm.domain, "example-broker.com");
        Ok(())
    });
}

#[test]
fn setting_one_key_of_a_stream_keeps_that_stream_s_other_defaults() {
    Jail::expect_with(|jail| {
        // Found by the fault suite: a file tuning `[streams.customers]` got the generic stream
        // defaults for the keys it left out, so `balanceUsd` stopped being volatile and every
        // balance move made an UPDATED event.
        let toml = format!(
            "{MINIMAL}\n[streams.customers]\npoll_interval_secs = 1\n[streams.servers]\nenabled = true\n"
        );
        jail.create_file("c.toml", &toml)?;
        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        assert_eq!(config.streams.customers.poll_interval_secs, 1);
        assert_eq!(config.streams.customers.volatile_fields, vec!["balanceUsd"]);
        assert_eq!(config.streams.servers.poll_interval_secs, 300);
        jail.set_env("IBSTREAM_STREAMS__CUSTOMERS__ENABLED", "true");
        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        assert_eq!(config.streams.customers.volatile_fields, vec!["balanceUsd"]);
        // Set explicitly, the list is what the user says, empty included.
        jail.create_file(
            "c.toml",
            &format!("{MINIMAL}\n[streams.customers]\nvolatile_fields = []\n"),
        )?;
        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        assert!(config.streams.customers.volatile_fields.is_empty());
        Ok(())
    });
}

#[test]
fn environment_alone_is_enough() {
    Jail::expect_with(|jail| {
        jail.set_env("IBSTREAM_CRM__BASE_URL", "http://crm.local");
        jail.set_env("IBSTREAM_CRM__EMAIL", "a@b.c");
        jail.set_env("IBSTREAM_CRM__PASSWORD", "p");
        jail.set_env("IBSTREAM_CRM__API_KEY", "k");
        jail.set_env("IBSTREAM_CRM__DOMAIN", "d");
        Config::load(None).unwrap().validate().unwrap();
        Ok(())
    });
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    Jail::expect_with(|jail| {
        let err = load_err(jail, &format!("{MINIMAL}pagesize = 10\n"));
        assert!(err.contains("`crm.pagesize`"), "{err}");
        let err = load_err(jail, &format!("{MINIMAL}[kafka]\nbootstrap = 1\n"));
        assert!(err.contains("`kafka.bootstrap`"), "{err}");
        let err = load_err(jail, &format!("{MINIMAL}[kafkaa]\nbootstrap_servers = 1\n"));
        assert!(err.contains("`kafkaa`"), "{err}");
        jail.create_file("c.toml", MINIMAL)?;
        jail.set_env("IBSTREAM_CRM__PAGESIZE", "10");
        let err = Config::load(Some("c.toml".as_ref()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`crm.pagesize`") && err.contains("environment"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn invalid_values_name_the_key() {
    Jail::expect_with(|jail| {
        for (replace, with, key) in [
            (
                "https://crm.example-broker.com",
                "crm.example-broker.com",
                "crm.base_url",
            ),
            (
                "https://crm.example-broker.com",
                "ftp://crm",
                "crm.base_url",
            ),
            (
                "https://crm.example-broker.com",
                "https://user:pw@crm",
                "crm.base_url",
            ),
            ("email = \"ib@example.com\"", "email = \"\"", "crm.email"),
            ("password = \"file-password\"", "", "crm.password"),
            (
                "password = \"file-password\"",
                "password = \"a\"\npassword_file = \"/x\"",
                "crm.password",
            ),
            ("api_key = \"file-key\"", "", "crm.api_key"),
            ("domain = \"example-broker.com\"", "", "crm.domain"),
            (
                "domain = \"example-broker.com\"",
                "domain = \"d\"\ntimezone = \"Mars/Olympus\"",
                "crm.timezone",
            ),
            (
                "domain = \"example-broker.com\"",
                "domain = \"d\"\npage_size = 1001",
                "crm.page_size",
            ),
            (
                "domain = \"example-broker.com\"",
                "domain = \"d\"\npage_size = 0",
                "crm.page_size",
            ),
            (
                "domain = \"example-broker.com\"",
                "domain = \"d\"\nrequests_per_second = 0",
                "crm.requests_per_second",
            ),
            (
                "domain = \"example-broker.com\"",
                "domain = \"d\"\nrequest_timeout_secs = 0",
                "crm.request_timeout_secs",
            ),
            (
                "domain = \"example-broker.com\"",
                "domain = \"d\"\napi_path = \"a/b\"",
                "crm.api_path",
            ),
            (
                "domain = \"example-broker.com\"",
                "domain = \"d\"\npage_size = \"many\"",
                "crm.page_size",
            ),
            (
                "domain = \"example-broker.com\"",
                "domain = \"d\"\nbackoff_max_ms = 1",
                "crm.backoff_max_ms",
            ),
        ] {
            let toml = MINIMAL.replace(replace, with);
            let err = load_err(jail, &toml);
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        Ok(())
    });
}

#[test]
fn secrets_come_from_files_and_are_redacted() {
    Jail::expect_with(|jail| {
        jail.create_file("pw", "s3cr3t-from-file\n")?;
        jail.create_file("key", "key-from-file")?;
        let toml = MINIMAL
            .replace("password = \"file-password\"", "password_file = \"pw\"")
            .replace("api_key = \"file-key\"", "api_key_file = \"key\"");
        jail.create_file("c.toml", &toml)?;
        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        config.validate().unwrap();
        let secrets = config.crm.resolve_secrets().unwrap();
        assert_eq!(secrets.password.expose_secret(), "s3cr3t-from-file");
        assert_eq!(secrets.api_key.expose_secret(), "key-from-file");
        assert!(!format!("{secrets:?}").contains("from-file"));

        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        let mut missing = config.crm.clone();
        missing.password_file = Some("nope".into());
        match missing.resolve_secrets() {
            Err(e @ ConfigError::SecretFile { .. }) => {
                assert!(e.to_string().contains("crm.password_file"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cr3t"));
        Ok(())
    });
}

#[test]
fn example_file_documents_every_key_and_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/ibstream.example.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let config = Config::load(Some(path.as_ref())).unwrap();
    config.validate().unwrap();
    let mut value = serde_json::to_value(&config).unwrap();
    // Sections that are off by default are documented commented out; list their keys too.
    if value["schema_registry"].is_null() {
        value["schema_registry"] =
            serde_json::to_value(ibstream::config::SchemaRegistryConfig::default()).unwrap();
    }
    let reference = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let mut count = 0;
    for (section, keys) in value.as_object().unwrap() {
        assert!(
            text.contains(&format!("[{section}]")),
            "ibstream.example.toml has no [{section}]"
        );
        for (key, value) in keys.as_object().unwrap() {
            count += 1;
            if value.is_object() {
                // A table of its own: [section.key], possibly commented out; its keys are
                // documented in the comment above the stream tables.
                assert!(
                    text.contains(&format!("[{section}.{key}]")),
                    "ibstream.example.toml has no [{section}.{key}]"
                );
                for inner in value.as_object().unwrap().keys() {
                    assert!(
                        text.contains(&format!("\n{inner} ="))
                            || text.contains(&format!("{inner} (")),
                        "ibstream.example.toml does not document {section}.{key}.{inner}"
                    );
                }
            } else {
                assert!(
                    text.contains(&format!("\n{key} =")) || text.contains(&format!("\n# {key} =")),
                    "ibstream.example.toml does not document {section}.{key}"
                );
            }
            assert!(
                reference.contains(&format!("`{section}.{key}`")),
                "docs/configuration.md does not document {section}.{key}"
            );
        }
    }
    assert!(count >= 40, "{count}");
}

#[test]
fn registry_section_validates() {
    Jail::expect_with(|jail| {
        let err = load_err(
            jail,
            &format!("{MINIMAL}[schema_registry]\nurl = \"registry:8081\"\n"),
        );
        assert!(err.contains("`schema_registry.url`"), "{err}");
        let err = load_err(
            jail,
            &format!("{MINIMAL}[schema_registry]\nurl = \"http://r:8081\"\nusername = \"u\"\n"),
        );
        assert!(err.contains("`schema_registry.username`"), "{err}");
        let err = load_err(
            jail,
            &format!("{MINIMAL}[schema_registry]\nurl = \"http://r:8081\"\nauto_registr = true\n"),
        );
        assert!(err.contains("`schema_registry.auto_registr`"), "{err}");
        let err = load_err(
            jail,
            &format!("{MINIMAL}[events]\nnamespace = \"com..x\"\n"),
        );
        assert!(err.contains("`events.namespace`"), "{err}");
        let err = load_err(jail, &format!("{MINIMAL}[topics]\nprefix = \"a b\"\n"));
        assert!(err.contains("`topics.prefix`"), "{err}");
        jail.create_file(
            "c.toml",
            &format!("{MINIMAL}[schema_registry]\nurl = \"https://r:8081\"\n"),
        )?;
        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        config.validate().unwrap();
        assert!(
            config.schema_registry.unwrap().auto_register,
            "auto_register defaults to true"
        );
        Ok(())
    });
}

#[test]
fn secrets_from_the_environment_are_the_strings_they_are() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", MINIMAL)?;
        // figment would read these as a number, a boolean, a number without its leading zero
        // and a float without its trailing zero.
        jail.set_env("IBSTREAM_CRM__PASSWORD", "123456");
        jail.set_env("IBSTREAM_CRM__API_KEY", "true");
        jail.set_env("IBSTREAM_KAFKA__SASL_PASSWORD", "0123");
        jail.set_env("IBSTREAM_SCHEMA_REGISTRY__PASSWORD", "1.50");
        jail.set_env("IBSTREAM_SCHEMA_REGISTRY__URL", "http://r:8081");
        jail.set_env("IBSTREAM_SCHEMA_REGISTRY__USERNAME", "u");
        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        config.validate().unwrap();
        let secrets = config.crm.resolve_secrets().unwrap();
        assert_eq!(secrets.password.expose_secret(), "123456");
        assert_eq!(secrets.api_key.expose_secret(), "true");
        assert_eq!(
            config.kafka.sasl_password.as_ref().unwrap().expose_secret(),
            "0123"
        );
        let registry = config.schema_registry.as_ref().unwrap();
        assert_eq!(registry.password.as_ref().unwrap().expose_secret(), "1.50");
        Ok(())
    });
}

#[test]
fn a_secret_of_the_wrong_type_is_named_without_its_value() {
    Jail::expect_with(|jail| {
        let toml = MINIMAL.replace("password = \"file-password\"", "password = 987654321");
        let err = load_err(jail, &toml);
        assert!(err.contains("`crm.password`"), "{err}");
        assert!(!err.contains("987654321"), "the secret is printed: {err}");
        let toml = MINIMAL.replace("api_key = \"file-key\"", "api_key = 4242.4242");
        let err = load_err(jail, &toml);
        assert!(err.contains("`crm.api_key`"), "{err}");
        assert!(!err.contains("4242"), "the secret is printed: {err}");
        Ok(())
    });
}

#[test]
fn values_that_would_overflow_a_date_or_a_duration_are_refused() {
    Jail::expect_with(|jail| {
        let long_prefix = "p".repeat(240);
        let long_state = "s".repeat(250);
        let future = (chrono::Utc::now() + chrono::Duration::days(3))
            .format("%Y-%m-%d")
            .to_string();
        for (section, key, value) in [
            (
                "streams",
                "closing_lag_secs",
                "9223372036854775807".to_owned(),
            ),
            ("streams", "lookback_days", "4000000000".to_owned()),
            ("streams", "backfill_window_days", "4000000000".to_owned()),
            ("streams", "backfill_window_days", "0".to_owned()),
            ("streams", "reconcile_days", "100000".to_owned()),
            ("streams", "reconcile_interval_secs", "0".to_owned()),
            ("streams", "open_window_retention_days", "0".to_owned()),
            ("streams", "start_date", future.clone()),
            ("streams", "start_date", "1900-01-01".to_owned()),
            (
                "kafka",
                "batch_timeout_secs",
                "9223372036854775807".to_owned(),
            ),
            ("kafka", "state_topic", "\"bad topic!\"".to_owned()),
            ("kafka", "state_topic", format!("\"{long_state}\"")),
            ("topics", "prefix", format!("\"{long_prefix}\"")),
        ] {
            let toml = format!(
                "{MINIMAL}[kafka]\nbootstrap_servers = \"k:9092\"\n{}\n",
                match section {
                    "kafka" => format!("{key} = {value}\n"),
                    other => format!("[{other}]\n{key} = {value}\n"),
                }
            );
            jail.create_file("c.toml", &toml)?;
            let err = match Config::load(Some("c.toml".as_ref())) {
                Ok(config) => ibstream::run::validate(&config)
                    .expect_err(&format!("accepted {section}.{key} = {value}"))
                    .to_string(),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains(&format!("`{section}.{key}`")),
                "{section}.{key} = {value}: {err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        // The largest accepted values compute without overflow.
        let toml = format!(
            "{MINIMAL}[kafka]\nbootstrap_servers = \"k:9092\"\nbatch_timeout_secs = 900\n\
             [streams]\nclosing_lag_secs = 604800\nlookback_days = 366\nbackfill_window_days = 3660\n\
             reconcile_days = 366\nopen_window_retention_days = 366\n"
        );
        jail.create_file("c.toml", &toml)?;
        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        ibstream::run::validate(&config).unwrap();
        Ok(())
    });
}

#[test]
fn kafka_security_reaches_librdkafka_and_bad_combinations_name_the_missing_piece() {
    Jail::expect_with(|jail| {
        jail.create_file("ca.pem", "CA")?;
        jail.create_file("client.pem", "CERT")?;
        jail.create_file("client.key", "KEY")?;
        jail.create_file("sasl-password", "s3cr3t\n")?;
        let kafka = |security: &str, extra: &str| {
            format!("{MINIMAL}[kafka]\nbootstrap_servers = \"k:9093\"\n{extra}\n[kafka.security]\n{security}\n")
        };
        let toml = kafka(
            "protocol = \"SASL_SSL\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"ibstream\"\nca_file = \"ca.pem\"\ncert_file = \"client.pem\"\nkey_file = \"client.key\"",
            "sasl_password_file = \"sasl-password\"",
        );
        jail.create_file("c.toml", &toml)?;
        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        ibstream::run::validate(&config).unwrap();
        let settings: std::collections::HashMap<String, String> = config
            .kafka
            .client_settings()
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(settings["security.protocol"], "SASL_SSL");
        assert_eq!(settings["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(settings["sasl.username"], "ibstream");
        assert_eq!(settings["sasl.password"], "s3cr3t");
        assert!(settings["ssl.ca.location"].ends_with("ca.pem"));
        assert!(settings["ssl.certificate.location"].ends_with("client.pem"));
        assert!(settings["ssl.key.location"].ends_with("client.key"));

        for (security, extra, key) in [
            // SASL without a password.
            (
                "protocol = \"SASL_SSL\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"",
                "",
                "kafka.sasl_password",
            ),
            (
                "protocol = \"SASL_PLAINTEXT\"\nsasl_username = \"u\"",
                "sasl_password = \"p\"",
                "kafka.security.sasl_mechanism",
            ),
            (
                "protocol = \"SASL_SSL\"\nsasl_mechanism = \"PLAIN\"",
                "sasl_password = \"p\"",
                "kafka.security.sasl_username",
            ),
            // SASL settings without a SASL protocol; TLS files without TLS.
            ("sasl_mechanism = \"PLAIN\"", "", "kafka.security.protocol"),
            ("ca_file = \"ca.pem\"", "", "kafka.security.ca_file"),
            // A certificate without its key.
            (
                "protocol = \"SSL\"\ncert_file = \"client.pem\"",
                "",
                "kafka.security.key_file",
            ),
            // The same setting two ways.
            (
                "protocol = \"SSL\"",
                "[kafka.librdkafka]\n\"security.protocol\" = \"SSL\"",
                "kafka.librdkafka",
            ),
        ] {
            let toml = kafka(security, extra);
            jail.create_file("c.toml", &toml)?;
            let config = Config::load(Some("c.toml".as_ref())).unwrap();
            let err = ibstream::run::validate(&config).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        }
        // A TLS file that does not exist is named when the settings are made.
        let toml = kafka("protocol = \"SSL\"\nca_file = \"missing.pem\"", "");
        jail.create_file("c.toml", &toml)?;
        let config = Config::load(Some("c.toml".as_ref())).unwrap();
        ibstream::run::validate(&config).unwrap();
        let err = config.kafka.client_settings().unwrap_err().to_string();
        assert!(
            err.contains("kafka.security.ca_file") && err.contains("missing.pem"),
            "{err}"
        );
        Ok(())
    });
}
