//! The registry of what a running process does: per stream counters (`StreamStats`), per
//! poller cursors and outcomes, the CRM client's and the sink's counters, and readiness.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;

use crate::config::Delivery;
use crate::crm::CrmStats;
use crate::kafka::sink::SinkStats;
pub use crate::stream::poller::CursorStatus;
use crate::stream::poller::{Report, StreamStats};

/// Counters of each stream, by stream name.
pub type Stats = HashMap<&'static str, Arc<StreamStats>>;

/// What one poller (a stream, or one server tag of positions) did last.
#[derive(Debug, Clone)]
pub struct PollerStatus {
    /// The stream.
    pub stream: &'static str,
    /// The server tag (positions).
    pub server_tag: Option<String>,
    /// Its cursors by scope.
    pub cursors: BTreeMap<String, CursorStatus>,
    /// When its last cycle succeeded.
    pub last_success: Option<DateTime<Utc>>,
    /// When and why its last cycle failed, if that came after the last success.
    pub last_error: Option<(DateTime<Utc>, String)>,
}

impl PollerStatus {
    /// Returns the days its cursors have read and the days they have to read, from each
    /// one's first day to today (a cursor that caught up has read them all).
    pub fn days(&self, today: NaiveDate) -> (u64, u64) {
        self.cursors.values().fold((0, 0), |(done, total), c| {
            let days = ((today - c.initial).num_days() + 1).max(1) as u64;
            let read = match c.cursor.next {
                Some(next) => (next - c.initial).num_days().clamp(0, days as i64) as u64,
                None if c.cursor.watermark.is_some() => days,
                None => 0,
            };
            (done + read, total + days)
        })
    }

    /// Returns the backfill progress: days read of days to read over its cursors (1 when
    /// every cursor caught up, or it has none).
    pub fn progress(&self, today: NaiveDate) -> f64 {
        match self.days(today) {
            (_, 0) => 1.0,
            (done, total) => done as f64 / total as f64,
        }
    }

    /// Returns how far behind now its slowest cursor has read everything, in seconds.
    pub fn lag_seconds(&self, now: DateTime<Utc>) -> Option<f64> {
        self.cursors
            .values()
            .map(|c| {
                c.read_through
                    .map(|t| (now - t).num_milliseconds() as f64 / 1000.0)
            })
            .try_fold(0.0_f64, |max, lag| lag.map(|l| max.max(l)))
    }
}

/// The registry of a running process.
#[derive(Debug)]
pub struct Registry {
    started: Instant,
    /// `kafka.instance_id`.
    pub instance_id: String,
    /// `kafka.delivery`.
    pub delivery: Delivery,
    /// The CRM's time zone.
    pub tz: Tz,
    /// `kafka.batch_timeout_secs`.
    pub batch_timeout: Duration,
    /// Counters by stream.
    pub streams: Stats,
    /// The CRM client's counters.
    pub crm: Arc<CrmStats>,
    sink: OnceLock<Arc<SinkStats>>,
    /// The CRM client's adaptive concurrency (once the client exists).
    pub crm_pressure: OnceLock<Arc<crate::crm::pressure::Pressure>>,
    restore: OnceLock<Duration>,
    pollers: Mutex<BTreeMap<String, PollerStatus>>,
}

impl Registry {
    /// Builds the registry of a process.
    pub fn new(
        instance_id: &str,
        delivery: Delivery,
        tz: Tz,
        batch_timeout: Duration,
        streams: Stats,
        crm: Arc<CrmStats>,
    ) -> Registry {
        Registry {
            started: Instant::now(),
            instance_id: instance_id.to_owned(),
            delivery,
            tz,
            batch_timeout,
            streams,
            crm,
            sink: OnceLock::new(),
            crm_pressure: OnceLock::new(),
            restore: OnceLock::new(),
            pollers: Mutex::default(),
        }
    }

    /// Returns the time since the process started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Attaches the sink's counters (once it runs).
    pub fn set_sink(&self, stats: Arc<SinkStats>) {
        let _ = self.sink.set(stats);
    }

    /// Returns the sink's counters, once the sink runs.
    pub fn sink(&self) -> Option<&SinkStats> {
        self.sink.get().map(Arc::as_ref)
    }

    /// Records that the state was restored, and how long it took.
    pub fn restored(&self, took: Duration) {
        let _ = self.restore.set(took);
    }

    /// Returns how long the state restore took, once it is done.
    pub fn restore_duration(&self) -> Option<Duration> {
        self.restore.get().copied()
    }

    /// Returns the counters of a stream.
    pub fn stream(&self, stream: &str) -> Option<&Arc<StreamStats>> {
        self.streams.get(stream)
    }

    /// Registers a poller (before its first cursor or cycle is recorded).
    pub fn register(&self, poller: &str, stream: &'static str, server_tag: Option<&str>) {
        lock(&self.pollers)
            .entry(poller.to_owned())
            .or_insert_with(|| PollerStatus {
                stream,
                server_tag: server_tag.map(str::to_owned),
                cursors: BTreeMap::new(),
                last_success: None,
                last_error: None,
            });
    }

    /// Records where a cursor of a registered poller stands.
    pub fn cursor(&self, poller: &str, scope: &str, status: CursorStatus) {
        if let Some(entry) = lock(&self.pollers).get_mut(poller) {
            entry.cursors.insert(scope.to_owned(), status);
        }
    }

    /// Records the outcome of a poller's cycle (`Err`: the reason, free of secrets).
    pub fn cycle(&self, poller: &str, outcome: Result<(), String>) {
        let mut pollers = lock(&self.pollers);
        let Some(entry) = pollers.get_mut(poller) else {
            return;
        };
        match outcome {
            Ok(()) => {
                entry.last_success = Some(Utc::now());
                entry.last_error = None;
            }
            Err(reason) => entry.last_error = Some((Utc::now(), reason)),
        }
    }

    /// Returns every poller's status, by poller name.
    pub fn pollers(&self) -> BTreeMap<String, PollerStatus> {
        lock(&self.pollers).clone()
    }

    /// Returns why the process is not ready, if it is not: the state not restored yet, the
    /// CRM not answering, or the last sink batch failed.
    pub fn readiness(&self) -> Result<(), String> {
        if self.restore.get().is_none() {
            return Err("the state is not restored yet".to_owned());
        }
        self.crm
            .health()
            .map_err(|reason| format!("the CRM does not answer: {reason}"))?;
        match self.sink() {
            None => Err("the Kafka producer is not running".to_owned()),
            Some(sink) => sink
                .health(self.batch_timeout)
                .map_err(|reason| format!("Kafka: {reason}")),
        }
    }
}

impl Report for Registry {
    fn register(&self, poller: &str, stream: &'static str, server_tag: Option<&str>) {
        Registry::register(self, poller, stream, server_tag);
    }

    fn cursor(&self, poller: &str, scope: &str, status: CursorStatus) {
        Registry::cursor(self, poller, scope, status);
    }

    fn cycle(&self, poller: &str, outcome: Result<(), String>) {
        Registry::cycle(self, poller, outcome);
    }

    fn stream(&self, stream: &str) -> Option<&Arc<StreamStats>> {
        Registry::stream(self, stream)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::state::Cursor;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn progress_and_lag_follow_the_slowest_cursor() {
        let now = Utc::now();
        let mut status = PollerStatus {
            stream: "leads",
            server_tag: None,
            cursors: BTreeMap::new(),
            last_success: None,
            last_error: None,
        };
        let cursor = |next: Option<&str>| Cursor {
            watermark: Some(d("2024-01-10")),
            next: next.map(d),
            ..Cursor::default()
        };
        status.cursors.insert(
            "leads/registration".into(),
            CursorStatus {
                cursor: cursor(Some("2024-01-11")),
                initial: d("2024-01-01"),
                read_through: Some(now - chrono::Duration::seconds(300)),
                open_reasons: Default::default(),
            },
        );
        status.cursors.insert(
            "leads/lastModified".into(),
            CursorStatus {
                cursor: cursor(None),
                initial: d("2024-01-01"),
                read_through: Some(now - chrono::Duration::seconds(20)),
                open_reasons: Default::default(),
            },
        );
        // 10 of 20 days read by one cursor, 20 of 20 by the other.
        assert_eq!(status.days(d("2024-01-20")), (30, 40));
        assert!((status.progress(d("2024-01-20")) - 0.75).abs() < 1e-9);
        assert!((status.lag_seconds(now).unwrap() - 300.0).abs() < 1e-6);
    }
}
