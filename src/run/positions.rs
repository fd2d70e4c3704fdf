//! Positions follow the servers list: the servers loop reads it every cycle (emitting server
//! events, unless only listing) and publishes the live tags; the supervisor runs one
//! positions poller per live tag.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::crm::{CrmClient, DateFilter, Position, Server};
use crate::events::{Encoder, Schemas};
use crate::stream::poller::{
    run_loop, CursorSpec, Exit, PollError, Pollable, Poller, Shared, StreamStats,
};
use crate::stream::state::{Cursor, State};

/// One good answer of the servers list: its live tags, and a number that grows with every
/// answer (so the positions supervisor counts consecutive lists, not only changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerList {
    seq: u64,
    live: Vec<String>,
}

/// Reads the servers list each cycle: emits server events (unless only listing) and
/// publishes the live server tags for the positions supervisor.
pub struct ServersLoop {
    poller: Option<Poller<Server>>,
    client: CrmClient,
    tags: watch::Sender<Option<ServerList>>,
}

impl ServersLoop {
    /// Builds the loop; `poller` emits server events (`None`: only list them).
    pub fn new(
        poller: Option<Poller<Server>>,
        client: CrmClient,
        tags: watch::Sender<Option<ServerList>>,
    ) -> Self {
        ServersLoop {
            poller,
            client,
            tags,
        }
    }
}

impl Pollable for ServersLoop {
    async fn cycle(&mut self) -> Result<(), PollError> {
        let volatile = self.poller.as_ref().map_or(&[][..], |p| p.volatile());
        let records = self.client.servers(volatile).await?;
        let mut live: Vec<String> = records
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter(|r| r.model.is_live())
            .filter_map(|r| r.model.id.clone())
            .collect();
        live.sort();
        if let Some(poller) = &mut self.poller {
            poller.read_all(records).await?;
        }
        self.tags.send_modify(|current| {
            let seq = current.as_ref().map_or(0, |l| l.seq + 1);
            *current = Some(ServerList { seq, live });
        });
        Ok(())
    }
}

/// Lists a running tag may be missing from before its poller stops: one empty or partial
/// answer of the servers list does not stop every tag.
const ABSENT_LISTS_BEFORE_STOP: u32 = 2;

/// Why positions stop when the servers list is gone and no tag runs.
const SERVERS_ENDED: &str =
    "positions need the servers list, and reading it stopped (see the servers stream)";

/// Runs one positions poller per live server tag, following the servers list.
///
/// A tag starts when it is listed; it stops (gently: the batch in hand is finished, and its
/// cursor and fingerprints are kept in case it comes back) after it was absent from two
/// consecutive good lists. A tag whose positions call fails for good (400, 404) stops alone
/// and the others go on; it is tried again once it left the list and came back. A 403 or an
/// authentication failure concerns every tag alike and stops positions. When the servers
/// list itself stops (its loop ended with an error), the running tags go on and are still
/// watched: positions end with the first fatal or denied tag, or when the last tag stopped
/// (no tag can start again without the list).
pub struct PositionsSupervisor {
    shared: Arc<Shared>,
    schemas: Schemas,
    framing: crate::events::Framing,
    fingerprints: HashMap<String, crate::stream::state::FpMap>,
    cursors: HashMap<String, Cursor>,
    only: Option<Vec<String>>,
    stats: Arc<StreamStats>,
}

/// A tag's poller that runs.
struct RunningTag {
    halt: CancellationToken,
    absent: u32,
}

impl PositionsSupervisor {
    /// Builds the supervisor with the restored cursors and fingerprints of every tag.
    pub fn new(
        shared: Arc<Shared>,
        schemas: Schemas,
        framing: crate::events::Framing,
        state: &mut State,
        stats: Arc<StreamStats>,
    ) -> Self {
        let scopes: Vec<String> = state
            .fingerprints
            .keys()
            .filter(|k| k.starts_with("positions/"))
            .cloned()
            .collect();
        let fingerprints = scopes
            .into_iter()
            .filter_map(|k| state.fingerprints.remove(&k).map(|m| (k, m)))
            .collect();
        let cursors = state
            .cursors
            .iter()
            .filter(|(k, _)| k.starts_with("positions/"))
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        PositionsSupervisor {
            only: shared.streams.server_tags.clone(),
            shared,
            schemas,
            framing,
            fingerprints,
            cursors,
            stats,
        }
    }

    /// Follows the servers list until cancelled, positions are denied, or no tag runs after
    /// the servers list stopped.
    pub async fn run(
        mut self,
        mut tags: watch::Receiver<Option<ServerList>>,
        interval_secs: u64,
        cancel: CancellationToken,
    ) -> Exit {
        let mut running: HashMap<String, RunningTag> = HashMap::new();
        let mut failed: HashMap<String, String> = HashMap::new();
        let mut tasks: JoinSet<(String, Exit, Poller<Position>)> = JoinSet::new();
        let mut seen_seq = None;
        // Set when the servers loop ended: the tags that run go on (and are still watched, so
        // a tag's fatal or denied exit ends positions), but no tag can start any more.
        let mut servers_ended = false;
        loop {
            let list = tags.borrow_and_update().clone();
            if let Some(list) = list.filter(|l| seen_seq != Some(l.seq)) {
                seen_seq = Some(list.seq);
                let wanted: Vec<String> = list
                    .live
                    .into_iter()
                    .filter(|t| self.only.as_ref().is_none_or(|only| only.contains(t)))
                    .collect();
                failed.retain(|tag, _| wanted.contains(tag));
                for (tag, state) in running.iter_mut() {
                    if wanted.contains(tag) {
                        state.absent = 0;
                        continue;
                    }
                    state.absent += 1;
                    if state.absent == ABSENT_LISTS_BEFORE_STOP {
                        info!(server_tag = %tag, "server is gone, stopping its positions (cursor kept)");
                        state.halt.cancel();
                    } else if state.absent < ABSENT_LISTS_BEFORE_STOP {
                        warn!(server_tag = %tag, "server missing from the servers list, stopping its positions if it stays missing");
                    }
                }
                for tag in &wanted {
                    if running.contains_key(tag) || failed.contains_key(tag) {
                        continue;
                    }
                    if cancel.is_cancelled() {
                        break;
                    }
                    match self.spawn_tag(tag, &mut tasks, interval_secs, &cancel) {
                        Ok(halt) => {
                            running.insert(tag.clone(), RunningTag { halt, absent: 0 });
                        }
                        Err(exit) => return exit,
                    }
                }
            }
            tokio::select! {
                // A shutdown wins over what it causes (the servers loop ending, tasks
                // returning): it is not a failure of positions.
                biased;
                _ = cancel.cancelled() => break,
                changed = tags.changed(), if !servers_ended => {
                    if changed.is_err() {
                        // The servers loop ended (it stopped with an error). Without a list
                        // there is nothing to poll; with one, keep what runs, and keep
                        // watching it.
                        if running.is_empty() {
                            return Exit::Stopped(SERVERS_ENDED.to_owned());
                        }
                        warn!("the servers list stopped; the running server tags go on, none starts");
                        servers_ended = true;
                    }
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    let Ok((tag, exit, poller)) = joined else {
                        return Exit::Fatal("a positions task failed".to_owned());
                    };
                    running.remove(&tag);
                    match exit {
                        Exit::Fatal(reason) => return Exit::Fatal(reason),
                        Exit::Denied(reason) => {
                            error!(server_tag = %tag, reason = %reason, "positions denied; every server tag stops");
                            for state in running.values() {
                                state.halt.cancel();
                            }
                            while tasks.join_next().await.is_some() {}
                            return Exit::Denied(reason);
                        }
                        Exit::Stopped(reason) => {
                            error!(server_tag = %tag, reason = %reason, "positions of this server stopped; the other servers go on");
                            failed.insert(tag.clone(), reason);
                            self.keep(tag.clone(), poller);
                        }
                        Exit::Cancelled => self.keep(tag.clone(), poller),
                    }
                    if servers_ended && running.is_empty() {
                        // Nothing runs and nothing can start again without the list.
                        return Exit::Stopped(failed.remove(&tag).unwrap_or_else(|| SERVERS_ENDED.to_owned()));
                    }
                }
            }
        }
        for state in running.values() {
            state.halt.cancel();
        }
        while tasks.join_next().await.is_some() {}
        Exit::Cancelled
    }

    /// Starts the poller of a tag; returns its halt token.
    fn spawn_tag(
        &mut self,
        tag: &str,
        tasks: &mut JoinSet<(String, Exit, Poller<Position>)>,
        interval_secs: u64,
        cancel: &CancellationToken,
    ) -> Result<CancellationToken, Exit> {
        let scope = format!("positions/{tag}");
        let encoder = Encoder::new(&self.schemas, self.framing.clone())
            .map_err(|e| Exit::Fatal(e.to_string()))?;
        let cursors: HashMap<String, Cursor> = self
            .cursors
            .remove(&scope)
            .map(|c| (scope.clone(), c))
            .into_iter()
            .collect();
        let halt = CancellationToken::new();
        let poller = Poller::<Position>::new(
            "positions",
            Some(tag.to_owned()),
            vec![CursorSpec {
                scope: scope.clone(),
                filter: DateFilter::PositionClose,
                initial: self.shared.streams.start_date,
            }],
            true,
            self.shared.streams.positions.volatile_fields.clone(),
            self.fingerprints.remove(&scope).unwrap_or_default(),
            cursors,
            self.shared.clone(),
            encoder,
            self.stats.clone(),
        )
        .with_halt(halt.clone());
        if cancel.is_cancelled() {
            // Shut down while the poller was being built: it is kept, not started.
            self.keep(tag.to_owned(), poller);
            return Ok(halt);
        }
        info!(server_tag = %tag, "polling positions of server");
        let name = format!("positions[{tag}]");
        let tag = tag.to_owned();
        let (cancel, task_halt) = (cancel.clone(), halt.clone());
        let ops = self.shared.ops.clone();
        tasks.spawn(async move {
            let (exit, poller) = run_loop(
                name,
                Duration::from_secs(interval_secs),
                cancel,
                task_halt,
                ops,
                poller,
            )
            .await;
            (tag, exit, poller)
        });
        Ok(halt)
    }

    /// Keeps what a stopped tag's poller learned, in case the tag comes back.
    fn keep(&mut self, tag: String, poller: Poller<Position>) {
        let (fps, cursors) = poller.into_state();
        self.fingerprints.insert(format!("positions/{tag}"), fps);
        self.cursors.extend(cursors);
    }
}
