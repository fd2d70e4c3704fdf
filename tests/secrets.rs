//! Secrets never reach logs, errors or `Debug` output.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use chrono::{NaiveDate, Utc};
use ibstream::config::Config;
use ibstream::crm::{DateFilter, Lead, WindowQuery};
use tracing_subscriber::layer::SubscriberExt;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_stay_out_of_logs_errors_and_debug() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(move || writer.clone())
            .with_filter(tracing_subscriber::filter::LevelFilter::TRACE),
    );
    let _guard = tracing::subscriber::set_default(subscriber);

    let sim = common::start_sim(|c| {
        c.leads = 1500;
        c.fail_rate = 0.2;
    })
    .await;
    let crm = common::client(&sim, |c| c.max_retries = 20);
    let query = WindowQuery::new(
        DateFilter::Registration,
        NaiveDate::from_ymd_opt(2024, 1, 1).unwrap(),
        Utc::now().date_naive(),
    );
    let mut pages = crm.pages::<Lead>(query.clone());
    let mut n = 0;
    while let Some(page) = pages.next().await {
        page.unwrap();
        n += 1;
        if n == 1 {
            sim.expire_tokens();
        }
    }
    let mut tokens = sim.tokens();
    assert!(!tokens.is_empty());
    // A failing login and a failing call leave errors to inspect too.
    let bad = common::client(&sim, |c| {
        c.password = Some("wrong-password-123".to_owned().into())
    });
    let login_error = bad.login().await.unwrap_err();
    sim.fail_next(100);
    let call_error = crm.page::<Lead>(&query, 1).await.unwrap_err();
    sim.fail_next(0);
    tokens.extend(sim.tokens());

    let config = Config {
        crm: common::crm_config(&sim),
        events: Default::default(),
        topics: Default::default(),
        kafka: Default::default(),
        streams: Default::default(),
        http: Default::default(),
        schema_registry: Some(ibstream::config::SchemaRegistryConfig {
            url: "http://127.0.0.1:1".to_owned(),
            username: Some("sr-user".to_owned()),
            password: Some("sr-password-456".to_owned().into()),
            ..Default::default()
        }),
    };
    let texts = [
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap(),
        format!("{config:?}"),
        format!("{crm:?}"),
        format!("{login_error} {login_error:?}"),
        format!("{call_error} {call_error:?}"),
        toml_of(&config),
    ];
    assert!(
        texts[0].contains("crm login succeeded"),
        "logs were captured"
    );
    assert!(
        texts[0].contains("crm request failed, retrying"),
        "retries were logged"
    );
    let secrets = [
        "ib-secret",
        "sim-api-key",
        "wrong-password-123",
        "sr-password-456",
    ];
    for text in &texts {
        for secret in secrets
            .iter()
            .copied()
            .chain(tokens.iter().map(String::as_str))
        {
            assert!(
                !text.contains(secret),
                "secret {secret:?} leaked into: {text}"
            );
        }
    }
    sim.shutdown().await;
}

fn toml_of(config: &Config) -> String {
    serde_json::to_string(config).unwrap()
}

use tracing_subscriber::Layer;
