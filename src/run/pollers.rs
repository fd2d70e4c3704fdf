//! Builds one poller per enabled stream with its restored cursors and fingerprints, and
//! starts each in a task of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::positions::{PositionsSupervisor, ServersLoop};
use super::RunError;
use crate::config::{StreamConfig, StreamsConfig};
use crate::crm::{Customer, DateFilter, Lead, Server, Transaction};
use crate::events::{Encoder, Framing, Schemas};
use crate::stream::poller::{run_loop, CursorSpec, Exit, Pollable, Poller, Shared, StreamRecord};
use crate::stream::state::{Cursor, State};

/// Returns the enabled streams.
pub fn enabled(streams: &StreamsConfig) -> Vec<&'static str> {
    [
        ("leads", streams.leads.enabled),
        ("customers", streams.customers.enabled),
        ("transactions", streams.transactions.enabled),
        ("servers", streams.servers.enabled),
        ("positions", streams.positions.enabled),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect()
}

/// Starts the pollers of every enabled stream (positions: a supervisor of server tags).
pub fn start(
    tasks: &mut JoinSet<(String, Exit)>,
    shared: &Arc<Shared>,
    schemas: &Schemas,
    framing: &Framing,
    mut state: State,
    first_day: chrono::NaiveDate,
    cancel: &CancellationToken,
) -> Result<(), RunError> {
    let streams = &shared.streams;
    let encoder = || Encoder::new(schemas, framing.clone()).map_err(super::startup);
    let stats = |name: &'static str| shared.ops.stream(name).cloned().unwrap_or_default();
    let mutable = |stream: &str| {
        vec![
            CursorSpec {
                scope: format!("{stream}/registration"),
                filter: DateFilter::Registration,
                initial: streams.start_date,
            },
            CursorSpec {
                scope: format!("{stream}/lastModified"),
                filter: DateFilter::LastModified,
                initial: first_day,
            },
        ]
    };
    let build = |name: &'static str,
                 settings: &StreamConfig,
                 specs: Vec<CursorSpec>,
                 append_only,
                 state: &mut State| {
        Ok::<_, RunError>(Built {
            cursors: cursors_of(&specs, state),
            fingerprints: state.fingerprints.remove(name).unwrap_or_default(),
            specs,
            append_only,
            volatile: settings.volatile_fields.clone(),
            encoder: encoder()?,
            stats: stats(name),
        })
    };
    if streams.leads.enabled {
        let poller = build("leads", &streams.leads, mutable("leads"), false, &mut state)?;
        let poller = poller.into_poller::<Lead>("leads", shared);
        spawn(
            tasks,
            "leads",
            streams.leads.poll_interval_secs,
            cancel,
            shared,
            poller,
        );
    }
    if streams.customers.enabled {
        let poller = build(
            "customers",
            &streams.customers,
            mutable("customers"),
            false,
            &mut state,
        )?;
        let poller = poller.into_poller::<Customer>("customers", shared);
        spawn(
            tasks,
            "customers",
            streams.customers.poll_interval_secs,
            cancel,
            shared,
            poller,
        );
    }
    if streams.transactions.enabled {
        let specs = vec![CursorSpec {
            scope: "transactions".to_owned(),
            filter: DateFilter::Transaction,
            initial: streams.start_date,
        }];
        let poller = build(
            "transactions",
            &streams.transactions,
            specs,
            true,
            &mut state,
        )?;
        let poller = poller.into_poller::<Transaction>("transactions", shared);
        spawn(
            tasks,
            "transactions",
            streams.transactions.poll_interval_secs,
            cancel,
            shared,
            poller,
        );
    }
    let (tags_tx, tags_rx) = watch::channel(None);
    if streams.servers.enabled {
        let poller = Poller::<Server>::new(
            "servers",
            None,
            Vec::new(),
            false,
            streams.servers.volatile_fields.clone(),
            state.fingerprints.remove("servers").unwrap_or_default(),
            HashMap::new(),
            shared.clone(),
            encoder()?,
            stats("servers"),
        );
        let servers = ServersLoop::new(Some(poller), shared.client.clone(), tags_tx);
        spawn(
            tasks,
            "servers",
            streams.servers.poll_interval_secs,
            cancel,
            shared,
            servers,
        );
    } else if streams.positions.enabled {
        // Positions still need the live server tags: list them without emitting servers.
        let servers = ServersLoop::new(None, shared.client.clone(), tags_tx);
        spawn(
            tasks,
            "servers-list",
            streams.positions.poll_interval_secs,
            cancel,
            shared,
            servers,
        );
    }
    if streams.positions.enabled {
        let supervisor = PositionsSupervisor::new(
            shared.clone(),
            schemas.clone(),
            framing.clone(),
            &mut state,
            stats("positions"),
        );
        let (cancel, interval) = (cancel.clone(), streams.positions.poll_interval_secs);
        tasks.spawn(async move {
            (
                "positions".to_owned(),
                supervisor.run(tags_rx, interval, cancel).await,
            )
        });
    }
    Ok(())
}

/// What a windowed stream's poller is built from.
struct Built {
    specs: Vec<CursorSpec>,
    append_only: bool,
    volatile: Vec<String>,
    cursors: HashMap<String, Cursor>,
    fingerprints: crate::stream::state::FpMap,
    encoder: Encoder,
    stats: Arc<crate::stream::poller::StreamStats>,
}

impl Built {
    fn into_poller<T: StreamRecord>(self, stream: &'static str, shared: &Arc<Shared>) -> Poller<T> {
        Poller::new(
            stream,
            None,
            self.specs,
            self.append_only,
            self.volatile,
            self.fingerprints,
            self.cursors,
            shared.clone(),
            self.encoder,
            self.stats,
        )
    }
}

/// Takes the restored cursors of `specs` out of the state.
fn cursors_of(specs: &[CursorSpec], state: &mut State) -> HashMap<String, Cursor> {
    specs
        .iter()
        .filter_map(|s| state.cursors.remove(&s.scope).map(|c| (s.scope.clone(), c)))
        .collect()
}

/// Runs a pollable's loop in a task of its own.
fn spawn<P: Pollable + 'static>(
    tasks: &mut JoinSet<(String, Exit)>,
    name: &str,
    interval_secs: u64,
    cancel: &CancellationToken,
    shared: &Shared,
    pollable: P,
) {
    let (name, cancel, ops) = (name.to_owned(), cancel.clone(), shared.ops.clone());
    tasks.spawn(async move {
        let interval = Duration::from_secs(interval_secs);
        let halt = CancellationToken::new();
        let (exit, _) = run_loop(name.clone(), interval, cancel, halt, ops, pollable).await;
        (name, exit)
    });
}
