//! The `ibstream` binary: exit codes and the `check` report, against a simulator.

mod common;

use std::process::Command;

fn ibstream() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ibstream"));
    command
        .env_remove("IBSTREAM_CONFIG")
        .env("IBSTREAM_LOG", "warn");
    command
}

fn example() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/ibstream.example.toml")
}

#[test]
fn bad_configuration_exits_2_with_one_line_naming_the_key() {
    for (key, value, named) in [
        ("IBSTREAM_CRM__PAGE_SIZE", "5000", "`crm.page_size`"),
        ("IBSTREAM_CRM__TIMEZONE", "Nowhere/City", "`crm.timezone`"),
        ("IBSTREAM_CRM__PAGESIZE", "5", "`crm.pagesize`"),
    ] {
        let out = ibstream()
            .args(["--config", example(), "check"])
            .env(key, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{key}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(named), "{stderr}");
    }
    let out = ibstream()
        .args(["--config", "/nonexistent.toml", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn check_reports_every_endpoint() {
    let sim = common::start_sim(|c| c.deny = vec!["transactions".to_owned()]).await;
    let url = sim.base_url();
    let out = tokio::task::spawn_blocking(move || {
        ibstream()
            .args(["--config", example(), "check"])
            .env("IBSTREAM_CRM__BASE_URL", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{stdout}");
    assert!(
        lines[0].starts_with("login") && lines[0].ends_with("ok"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("leads") && lines[1].contains(" ok"),
        "{stdout}"
    );
    assert!(
        lines[3].starts_with("transactions") && lines[3].contains("module off"),
        "{stdout}"
    );
    assert!(lines[4].starts_with("servers (2 live of 3)"), "{stdout}");
    assert!(
        lines[5].starts_with("positions[mt4-live-01]") && lines[5].contains(" ok"),
        "{stdout}"
    );
    assert!(!stdout.contains("ib-secret") && !stdout.contains("sim-api-key"));
    sim.shutdown().await;

    let sim = common::start_sim(|_| {}).await;
    let url = sim.base_url();
    let out = tokio::task::spawn_blocking(move || {
        ibstream()
            .args(["--config", example(), "check"])
            .env("IBSTREAM_CRM__BASE_URL", url)
            .env("IBSTREAM_CRM__PASSWORD", "wrong")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.starts_with("login") && stdout.contains("authentication failed"),
        "{stdout}"
    );
    assert!(!stdout.contains("wrong\n"));
    sim.shutdown().await;
}
