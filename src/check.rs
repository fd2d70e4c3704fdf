//! `ibstream check`: the connectivity report of a configuration.
//!
//! Validates the configuration, logs in, lists the servers, then calls every endpoint for
//! today with `pageSize=1` (positions once per live server tag) and reports one line each.

use std::fmt;

use chrono::Utc;

use crate::config::Config;
use crate::crm::{
    CrmClient, CrmError, CrmRecord, Customer, DateFilter, ForbiddenKind, Lead, Position,
    Transaction, WindowQuery,
};

/// The outcome of one checked call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The call worked; `total` is what the CRM reported for today.
    Ok {
        /// Records the CRM reported for today, if it reported a total.
        total: Option<u64>,
    },
    /// The role lacks the IB Reports permission.
    PermissionMissing(String),
    /// The endpoint's CRM module is off.
    ModuleOff(String),
    /// Any other failure.
    Error(String),
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    /// What was called (`login`, `servers`, `leads`, `positions[mt4-live-01]`, …).
    pub what: String,
    /// How it went.
    pub outcome: Outcome,
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Ok { total: Some(total) } => write!(f, "{:<28} ok ({total} today)", self.what),
            Outcome::Ok { total: None } => write!(f, "{:<28} ok", self.what),
            Outcome::PermissionMissing(m) => write!(f, "{:<28} permission missing: {m}", self.what),
            Outcome::ModuleOff(m) => write!(f, "{:<28} module off: {m}", self.what),
            Outcome::Error(m) => write!(f, "{:<28} error: {m}", self.what),
        }
    }
}

impl CheckLine {
    /// Returns whether the call worked.
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }
}

fn outcome_of(error: CrmError) -> Outcome {
    match &error {
        CrmError::Forbidden {
            kind: ForbiddenKind::ModuleOff,
            ..
        } => Outcome::ModuleOff(error.to_string()),
        CrmError::Forbidden { .. } => Outcome::PermissionMissing(error.to_string()),
        _ => Outcome::Error(error.to_string()),
    }
}

/// Runs every check against the CRM of `config` and returns the report, in call order.
/// Stops after the login line if login fails (nothing else can work then).
pub async fn run(config: &Config) -> Result<Vec<CheckLine>, crate::config::ConfigError> {
    config.validate()?;
    let client = CrmClient::build(&config.crm)?;
    let mut lines = Vec::new();
    let login = client.login().await;
    let login_ok = login.is_ok();
    lines.push(CheckLine {
        what: "login".to_owned(),
        outcome: login.map_or_else(outcome_of, |()| Outcome::Ok { total: None }),
    });
    if !login_ok {
        return Ok(lines);
    }
    let today = Utc::now().with_timezone(&client.tz()).date_naive();
    let query = |filter| WindowQuery {
        page_size: Some(1),
        ..WindowQuery::new(filter, today, today)
    };
    lines.push(check_page::<Lead>(&client, "leads", query(DateFilter::Registration)).await);
    lines.push(check_page::<Customer>(&client, "customers", query(DateFilter::Registration)).await);
    lines.push(
        check_page::<Transaction>(&client, "transactions", query(DateFilter::Transaction)).await,
    );
    match client.servers().await {
        Ok(servers) => {
            let servers: Vec<_> = servers
                .into_iter()
                .filter_map(Result::ok)
                .map(|r| r.model)
                .collect();
            let live: Vec<String> = servers
                .iter()
                .filter(|s| s.is_live())
                .filter_map(|s| s.id.clone())
                .collect();
            lines.push(CheckLine {
                what: format!("servers ({} live of {})", live.len(), servers.len()),
                outcome: Outcome::Ok { total: None },
            });
            if live.is_empty() {
                lines.push(CheckLine {
                    what: "positions".to_owned(),
                    outcome: Outcome::Error("no live server to query positions on".to_owned()),
                });
            }
            for tag in live {
                let mut q = query(DateFilter::PositionClose);
                q.server_tag = Some(tag.clone());
                lines.push(check_page::<Position>(&client, &format!("positions[{tag}]"), q).await);
            }
        }
        Err(e) => {
            lines.push(CheckLine {
                what: "servers".to_owned(),
                outcome: outcome_of(e),
            });
            lines.push(CheckLine {
                what: "positions".to_owned(),
                outcome: Outcome::Error("skipped: needs the servers list".to_owned()),
            });
        }
    }
    Ok(lines)
}

async fn check_page<T: CrmRecord>(client: &CrmClient, what: &str, query: WindowQuery) -> CheckLine {
    let outcome = match client.page::<T>(&query, 1).await {
        Ok(page) => Outcome::Ok { total: page.total },
        Err(e) => outcome_of(e),
    };
    CheckLine {
        what: what.to_owned(),
        outcome,
    }
}
