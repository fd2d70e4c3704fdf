//! `ibstream check`: the connectivity report of a configuration.
//!
//! Validates the configuration, logs in, lists the servers, then calls every endpoint for
//! today with `pageSize=1` (positions once per live server tag) and reports one line each.
//! Then Kafka: the brokers, every topic `run` uses (present with its partitions, or to be
//! created), the state topic's settings, transactions in exactly-once mode (with a
//! transactional id of its own, `<instance_id>-check`: the instance's id would fence a running
//! instance; a transaction that writes no record to any topic, see
//! `kafka::probe_transactions`, so a broker that cannot end it never blocks the state topic;
//! a probe denied by an ACL is a warning naming the ACL, never advice to drop exactly-once),
//! and the Schema Registry when one is configured.

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
    /// Not a failure, but worth saying (a topic `run` will create, a check that does not
    /// apply).
    Note(String),
    /// Not a failure of what `run` needs, but something `check` could not test and why
    /// (an ACL the check's own probe lacks).
    Warning(String),
    /// Not checked, and why: what `check` did not test (never shown as "ok").
    NotChecked(String),
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
            Outcome::Note(m) => write!(f, "{:<28} ok: {m}", self.what),
            Outcome::Warning(m) => write!(f, "{:<28} warning: {m}", self.what),
            Outcome::NotChecked(m) => write!(f, "{:<28} not checked: {m}", self.what),
            Outcome::Error(m) => write!(f, "{:<28} error: {m}", self.what),
        }
    }
}

impl CheckLine {
    /// Returns whether the call worked, or nothing `run` needs failed (a warning).
    pub fn is_ok(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Ok { .. } | Outcome::Note(_) | Outcome::Warning(_) | Outcome::NotChecked(_)
        )
    }

    fn new(what: impl Into<String>, outcome: Outcome) -> Self {
        CheckLine {
            what: what.into(),
            outcome,
        }
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
        lines.extend(kafka(config).await);
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
    match client.servers(&[]).await {
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
    lines.extend(kafka(config).await);
    Ok(lines)
}

/// Checks Kafka and the Schema Registry; one line each.
pub async fn kafka(config: &Config) -> Vec<CheckLine> {
    use crate::config::Delivery;
    let kafka = &config.kafka;
    if let Err(e) = kafka.validate() {
        return vec![CheckLine::new("kafka", Outcome::Error(e.to_string()))];
    }
    if let Err(e) = kafka.client_settings() {
        return vec![CheckLine::new("kafka", Outcome::Error(e.to_string()))];
    }
    let mut lines = Vec::new();
    let metadata = {
        let kafka = kafka.clone();
        tokio::task::spawn_blocking(move || {
            crate::kafka::refusal::reach(&kafka, std::time::Duration::from_secs(5))
        })
        .await
    };
    let metadata = match metadata {
        Ok(Ok(metadata)) => metadata,
        Ok(Err(e)) => {
            lines.push(CheckLine::new("kafka brokers", Outcome::Error(e)));
            return lines;
        }
        Err(e) => {
            return vec![CheckLine::new(
                "kafka brokers",
                Outcome::Error(e.to_string()),
            )]
        }
    };
    lines.push(CheckLine::new(
        format!("kafka brokers ({})", metadata.brokers().len()),
        Outcome::Ok { total: None },
    ));
    let state_topic = kafka.state_topic(&config.topics);
    let mut topics: Vec<String> = crate::run::enabled_streams(&config.streams)
        .into_iter()
        .chain(["dlq"])
        .map(|s| config.topics.data_topic(s))
        .collect();
    topics.push(state_topic.clone());
    for topic in topics {
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .filter(|n| *n > 0);
        let outcome = match partitions {
            None => Outcome::Note("missing; `ibstream run` creates it".to_owned()),
            Some(_) if topic == state_topic => {
                match crate::kafka::check_state_topic(kafka, &topic).await {
                    Ok(()) => Outcome::Note("1 partition, compacted".to_owned()),
                    Err(e) => Outcome::Error(e),
                }
            }
            Some(n) => Outcome::Note(format!("{n} partitions")),
        };
        lines.push(CheckLine::new(format!("topic {topic}"), outcome));
    }
    let state_exists = metadata
        .topics()
        .iter()
        .any(|t| t.name() == state_topic && t.error().is_none() && !t.partitions().is_empty());
    let log_problem = match kafka.delivery {
        Delivery::ExactlyOnce => crate::kafka::transaction_log_problem(kafka, false).await,
        Delivery::AtLeastOnce => None,
    };
    let transactions = match kafka.delivery {
        Delivery::AtLeastOnce => Outcome::NotChecked(
            "kafka.delivery = \"at-least-once\" uses none (checked: the brokers answer, the topics above)"
                .to_owned(),
        ),
        // The broker settings of its transaction log, read without a transaction.
        Delivery::ExactlyOnce if log_problem.is_some() => {
            Outcome::Error(log_problem.unwrap_or_default())
        }
        Delivery::ExactlyOnce if !state_exists => Outcome::NotChecked(
            "the probe needs the state topic, which does not exist yet; `ibstream run` creates it and tests transactions at start-up, stopping with the fix if the broker has none (kafka.delivery = \"at-least-once\")"
                .to_owned(),
        ),
        Delivery::ExactlyOnce => {
            // A transaction that writes no record to any topic of ibstream: a broker that
            // cannot end it leaves nothing a reader of the state topic waits for.
            let timeout = std::time::Duration::from_secs(kafka.batch_timeout_secs.min(30));
            let id = format!("{}-check", kafka.instance_id);
            match crate::kafka::probe_transactions(kafka, &state_topic, &id, timeout).await {
                Ok(()) => Outcome::Ok { total: None },
                // Denied, the probe proves nothing either way: never advice to give up
                // exactly-once. `run` tests transactions with its start-up barrier then.
                Err(e) => match crate::kafka::probe_denied(e.rdkafka_error_code(), &id, &state_topic) {
                    Some(acl) => Outcome::Warning(format!(
                        "not tested: the principal lacks {acl} ({e}); grant it to have `check` test transactions (`run` does not need it: it tests them with its start-up barrier under the transactional id {})",
                        kafka.instance_id
                    )),
                    None => match crate::kafka::transaction_log_problem(kafka, true).await {
                        Some(problem) => Outcome::Error(format!("{problem} ({e})")),
                        None => Outcome::Error(format!(
                            "{e}; if the broker has no transactions, set kafka.delivery = \"at-least-once\""
                        )),
                    },
                },
            }
        }
    };
    lines.push(CheckLine::new("kafka transactions", transactions));
    if let Some(registry) = &config.schema_registry {
        lines.push(CheckLine::new(
            "schema registry",
            registry_outcome(config, registry).await,
        ));
    }
    lines
}

async fn registry_outcome(
    config: &Config,
    registry: &crate::config::SchemaRegistryConfig,
) -> Outcome {
    use crate::events::{EventType, RegistryError, SchemaRegistry, Schemas};
    let client = match SchemaRegistry::build(registry) {
        Ok(client) => client,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    let schemas = match Schemas::load(&config.events.namespace) {
        Ok(schemas) => schemas,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    let subject = crate::events::value_subject(&config.topics.data_topic("leads"));
    match client
        .lookup(&subject, &schemas.get(EventType::Lead).json)
        .await
    {
        Ok(id) => Outcome::Note(format!("reachable; {subject} has id {id}")),
        Err(RegistryError::NotRegistered { .. }) => {
            Outcome::Note(format!("reachable; {subject} not registered yet"))
        }
        Err(e) => Outcome::Error(e.to_string()),
    }
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
