//! `ibstream sim`: a CRM that serves docs/crm-api.md from generated, deterministic data.
//!
//! It is the CRM of the demo, the tests and the benchmarks: a real HTTP server on a real port,
//! with the vendor's errors (401, 403, 400), faults on demand (`--fail-rate`, `--max-rps`,
//! `--latency-ms`, `--token-ttl-secs`, `--shuffle-pages`, `--unstable-order`, `--malformed-rate`, `--deny`;
//! paging quirks of other CRMs: `--page-cap`, `--omit-total`, `--ignore-page`,
//! `--growing-total`, `--max-page-offset`, `--deep-page-status`; values as other CRMs write them: `--shuffle-sets`, `--epoch-seconds`,
//! `--zero-dates`; answers as other CRMs write them: `--error-200`,
//! `--expired-token-status`, `--latin1-records`, `--body-quirks`), and a
//! ground truth (`GET /_sim/truth/{kind}`) that tests compare the Kafka topics with.
//!
//! Besides the API it serves:
//! - `GET /_sim/truth/{leads|customers|transactions|servers|positions}`: every current record
//!   as the API serves it (fake transactions included, flagged `isFake`), no auth, no paging;
//! - `POST /_sim/mutate?count=N[&kind=K][&days=D]`: applies N changes now and returns them as
//!   `[{"stream", "op", "key"}]` (K: lead, lead_edit, conversion, customer_edit, transaction,
//!   late_transaction (dated D days ago, default 1), correction (of records dated about D
//!   days ago), revert, delete (a transaction dated about D days ago, or a random one, is
//!   deleted: no query serves it, the truth leaves it out), malform (a transaction, chosen
//!   so, becomes unreadable), null_date, reformat, bloat, bloat_wide (a lead of 600,000 × "ж"),
//!   misdated (a transaction shown 400 days off its day), position, server, server_remove,
//!   server_restore);
//! - `POST /_sim/expire-tokens`: revokes every issued token (the next data call gets a 401);
//! - `GET /_sim/stats`: counters of requests, logins, injected faults, and position pages per
//!   server tag.

mod data;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;

use chrono::NaiveDate;
use chrono_tz::Tz;
use clap::Parser;

pub use data::{Change, ChangeKind, DataQuery, GenSpec, Kind, PageOrder, SimData, ValueQuirks};
pub use server::{SimHandle, SimStats};

/// Options of the simulator (also its command line).
#[derive(Debug, Clone, Parser)]
#[command(name = "sim", about = "Serve a simulated Impact CRM IB Reports API")]
pub struct SimConfig {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// Seed of the generated data and of the injected faults.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// First day of the generated records (they are spread from there to now).
    #[arg(long, default_value = "2024-01-01")]
    pub start_date: NaiveDate,
    /// Time zone the simulated CRM writes local timestamps and reads day filters in.
    #[arg(long, default_value = "UTC")]
    pub timezone: Tz,
    /// Leads to generate.
    #[arg(long, default_value_t = 2000)]
    pub leads: usize,
    /// Customers to generate (converted leads).
    #[arg(long, default_value_t = 800)]
    pub customers: usize,
    /// Transactions to generate.
    #[arg(long, default_value_t = 5000)]
    pub transactions: usize,
    /// Closed positions to generate.
    #[arg(long, default_value_t = 10000)]
    pub positions: usize,
    /// Live servers (one demo server is added besides).
    #[arg(long, default_value_t = 2)]
    pub servers: usize,
    /// Background changes per second (new leads, edits, conversions, transactions, closed
    /// positions); 0 = none.
    #[arg(long, default_value_t = 0.0)]
    pub change_rate: f64,
    /// Path segment of the API (`/api/v1/<api-path>/…`).
    #[arg(long, default_value = "ib")]
    pub api_path: String,
    /// Login email accepted.
    #[arg(long, default_value = "ib@example.com")]
    pub email: String,
    /// Login password accepted.
    #[arg(long, default_value = "ib-secret")]
    pub password: String,
    /// API key accepted (`X-Api-Key`).
    #[arg(long, default_value = "sim-api-key")]
    pub api_key: String,
    /// Domain accepted (`X-DOMAIN`).
    #[arg(long, default_value = "sim.example.com")]
    pub domain: String,
    /// Fraction of calls answered with HTTP 500.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Calls per second served; beyond it HTTP 429 with `Retry-After: 1`. 0 = unlimited.
    #[arg(long, default_value_t = 0)]
    pub max_rps: u32,
    /// Delay added to every call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Lifetime of a login token in seconds; 0 = never expires.
    #[arg(long, default_value_t = 3600)]
    pub token_ttl_secs: u64,
    /// Serve records newest-modified first and apply changes between page calls, so records
    /// move between pages while a window is read.
    #[arg(long)]
    pub shuffle_pages: bool,
    /// Serve every page request from a fresh random order of its window (a database paging
    /// without `ORDER BY`): pages overlap and miss records though none changes.
    #[arg(long)]
    pub unstable_order: bool,
    /// Serve at most this many records per page whatever `pageSize` asks (pages are cut by
    /// the capped size); 0 = no cap.
    #[arg(long, default_value_t = 0)]
    pub page_cap: u32,
    /// Leave `total` out of paged answers.
    #[arg(long)]
    pub omit_total: bool,
    /// Answer every page that starts at this many records or more (`(page - 1) * pageSize`)
    /// with `--deep-page-status`, on every try (a CRM refusing deep pages); 0 = no limit.
    #[arg(long, default_value_t = 0)]
    pub max_page_offset: u64,
    /// The status of a refused deep page: 500, or 400 with a message naming the limit.
    #[arg(long, default_value_t = 500)]
    pub deep_page_status: u16,
    /// Ignore `page`: every request gets the first page.
    #[arg(long)]
    pub ignore_page: bool,
    /// Report a `total` that grows by this much on every paged call (a CRM counting rows
    /// that keep arriving, or a broken count); 0 = the true total.
    #[arg(long, default_value_t = 0)]
    pub growing_total: u64,
    /// Serve money and quantities (amounts, volumes, prices, profits) as JSON numbers
    /// instead of strings.
    #[arg(long)]
    pub numeric_money: bool,
    /// Report one record more in the `total` of every transactions query whose window holds
    /// this day than is served (a record deleted between the count and the fetch).
    #[arg(long)]
    pub short_day: Option<NaiveDate>,
    /// Fraction of records served with an unreadable date or amount.
    #[arg(long, default_value_t = 0.0)]
    pub malformed_rate: f64,
    /// Serve tag categories, tags and trading accounts in a fresh random order on every
    /// answer (each chosen tag category then holds two tags).
    #[arg(long)]
    pub shuffle_sets: bool,
    /// Serve transactions' `transactionDate` as epoch seconds (a JSON number).
    #[arg(long)]
    pub epoch_seconds: bool,
    /// Write a customer's missing first deposit as `"ftdDate": "0000-00-00 00:00:00"`.
    #[arg(long)]
    pub zero_dates: bool,
    /// Endpoints answered with 403 (module off), comma-separated: leads, customers,
    /// transactions, servers, positions.
    #[arg(long, value_delimiter = ',')]
    pub deny: Vec<String>,
    /// Answer every data call with 403 (the role lacks the "IB Reports" permission).
    #[arg(long)]
    pub no_ib_reports: bool,
    /// Answer the first call of every distinct data query (endpoint and parameters, page
    /// included) with HTTP 200 carrying an error in this shape, then normally (a CRM whose
    /// errors come with status 200).
    #[arg(long, value_enum)]
    pub error_200: Option<Error200>,
    /// Status of a data call made with an expired or revoked token: 401 (the vendor's) or 403
    /// (`{"message": "Token expired"}`, as some CRMs answer).
    #[arg(long, default_value_t = 401)]
    pub expired_token_status: u16,
    /// Serve a record's text with a byte that is not UTF-8 (Latin-1 `é`, 0xE9) in its name
    /// (leads, customers), payment method (transactions) or symbol (positions): records whose
    /// key is listed, as `kind:key` (e.g. `leads:100017`; lead ids start at 100000, transaction ids at 9000000); changeable while running.
    #[arg(long, value_delimiter = ',')]
    pub latin1_records: Vec<String>,
    /// How answers' bodies are sent: `bom` (a UTF-8 byte-order mark first), `gzip`
    /// (compressed, `Content-Encoding: gzip`), `gzip-unlabelled` (compressed, no header);
    /// comma-separated, for every 200 answer of the API.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub body_quirks: Vec<BodyQuirk>,
    /// Serve HTTPS with this PEM certificate (chain), with `--tls-key`.
    #[arg(long)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PKCS#8 PEM private key of `--tls-cert`.
    #[arg(long)]
    pub tls_key: Option<std::path::PathBuf>,
}

/// Shapes of an error answered with HTTP 200 (`--error-200`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Error200 {
    /// `{"success": false, "message": "Service temporarily unavailable", "data": []}`.
    SuccessFalse,
    /// `{"success": "false", "message": "…", "data": [], "total": 0}`.
    SuccessString,
    /// `{"status": "error", "message": "…", "data": [], "total": 0}`.
    StatusError,
    /// `{"error": {"code": 503, "message": "…"}, "total": 0}`.
    ErrorObject,
    /// `{"errors": [{"message": "…"}], "data": []}`.
    ErrorsArray,
    /// An HTML maintenance page, `Content-Type: text/html`.
    Html,
}

impl Error200 {
    /// Returns the answer's content type and body.
    pub fn body(self) -> (&'static str, &'static str) {
        const JSON: &str = "application/json";
        match self {
            Error200::SuccessFalse => (
                JSON,
                r#"{"success": false, "message": "Service temporarily unavailable", "data": []}"#,
            ),
            Error200::SuccessString => (
                JSON,
                r#"{"success": "false", "message": "Service temporarily unavailable", "data": [], "total": 0}"#,
            ),
            Error200::StatusError => (
                JSON,
                r#"{"status": "error", "message": "database timeout", "data": [], "total": 0}"#,
            ),
            Error200::ErrorObject => (
                JSON,
                r#"{"error": {"code": 503, "message": "upstream unavailable"}, "total": 0}"#,
            ),
            Error200::ErrorsArray => (
                JSON,
                r#"{"errors": [{"message": "shard 2 failed"}], "data": []}"#,
            ),
            Error200::Html => (
                "text/html; charset=utf-8",
                "<!DOCTYPE html><html><body><h1>Down for maintenance</h1></body></html>",
            ),
        }
    }
}

/// How answer bodies are sent (`--body-quirks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BodyQuirk {
    /// A UTF-8 byte-order mark before the JSON.
    Bom,
    /// gzip-compressed with `Content-Encoding: gzip`, though the client did not ask.
    Gzip,
    /// gzip-compressed without a `Content-Encoding` header.
    GzipUnlabelled,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig::parse_from(["sim"])
    }
}

impl SimConfig {
    /// Checks the options; the error names the flag.
    pub fn validate(&self) -> Result<Vec<Kind>, String> {
        for (flag, rate) in [
            ("--fail-rate", self.fail_rate),
            ("--malformed-rate", self.malformed_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{flag} must be between 0 and 1"));
            }
        }
        if !matches!(self.expired_token_status, 401 | 403) {
            return Err("--expired-token-status must be 401 or 403".to_owned());
        }
        self.latin1_keys()?;
        if !(400..600).contains(&self.deep_page_status) {
            return Err("--deep-page-status must be a 4xx or 5xx status".to_owned());
        }
        if !(self.change_rate >= 0.0 && self.change_rate.is_finite()) {
            return Err("--change-rate must be 0 or more".to_owned());
        }
        self.deny
            .iter()
            .map(|name| {
                Kind::parse(name.trim()).ok_or_else(|| format!("--deny: unknown endpoint {name:?}"))
            })
            .collect()
    }

    /// Returns the records of `--latin1-records` as `(kind, key)`.
    fn latin1_keys(&self) -> Result<std::collections::HashSet<(Kind, String)>, String> {
        self.latin1_records
            .iter()
            .map(|entry| {
                let (kind, key) = entry.trim().split_once(':').ok_or_else(|| {
                    format!("--latin1-records: {entry:?} is not kind:key (e.g. leads:100017)")
                })?;
                let kind = Kind::parse(kind)
                    .ok_or_else(|| format!("--latin1-records: unknown kind {kind:?}"))?;
                Ok((kind, key.to_owned()))
            })
            .collect()
    }

    fn gen_spec(&self) -> GenSpec {
        GenSpec {
            seed: self.seed,
            start_date: self.start_date,
            tz: self.timezone,
            leads: self.leads,
            customers: self.customers,
            transactions: self.transactions,
            positions: self.positions,
            servers: self.servers,
            malformed_rate: self.malformed_rate,
            numeric_money: self.numeric_money,
            quirks: ValueQuirks {
                shuffle_sets: self.shuffle_sets,
                epoch_seconds: self.epoch_seconds,
                zero_dates: self.zero_dates,
            },
        }
    }
}

/// Returns one page of `count` generated leads as the API serves it (seed 42, records spread
/// from 2024-01-01 to 2026-06-01, local times in `tz`): the input of the parse and encode
/// benchmarks.
pub fn sample_leads_page(count: usize, tz: Tz) -> Vec<u8> {
    let spec = GenSpec {
        seed: 42,
        start_date: NaiveDate::from_ymd_opt(2024, 1, 1).unwrap_or_default(),
        tz,
        leads: count,
        customers: 0,
        transactions: 0,
        positions: 0,
        servers: 1,
        malformed_rate: 0.0,
        numeric_money: false,
        quirks: ValueQuirks::default(),
    };
    let now = chrono::DateTime::from_timestamp(1_780_315_200, 0).unwrap_or_default();
    let records = SimData::generate(&spec, now).truth(Kind::Leads);
    serde_json::json!({"page": 1, "pageSize": count, "total": count, "data": records})
        .to_string()
        .into_bytes()
}

/// Starts the simulator on `config.listen` (port 0 picks a free port) and returns its handle.
pub async fn start(config: SimConfig) -> Result<SimHandle, String> {
    server::start(Arc::new(config)).await
}

/// Runs the simulator until Ctrl-C / SIGTERM, printing where it listens and its credentials.
pub async fn serve(config: SimConfig) -> anyhow::Result<()> {
    let handle = start(config.clone()).await.map_err(anyhow::Error::msg)?;
    println!("ibstream sim listening on {}", handle.base_url());
    println!(
        "  credentials: email={} password={} api_key={} domain={} api_path={}",
        config.email, config.password, config.api_key, config.domain, config.api_path
    );
    println!(
        "  data: {} leads, {} customers, {} transactions, {} positions on {} live servers + 1 demo, since {} ({})",
        config.leads, config.customers, config.transactions, config.positions, config.servers, config.start_date, config.timezone
    );
    println!("  ground truth: GET /_sim/truth/{{leads|customers|transactions|servers|positions}}");
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
