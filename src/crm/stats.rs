//! The CRM client's counters: requests by endpoint and status class, their durations,
//! retries, rate limits, logins, error answers, and whether the CRM answers. Counted by
//! [`crate::crm::CrmClient`]; read by `ops` (metrics, `/status`, readiness).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// The label of a CRM endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// `login`, `leads`, `registrations`, `transactions`, `servers`, `positions`.
    pub endpoint: String,
}

/// Returns request-duration buckets from 5 ms to about 20 s.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

/// Counters of the CRM client.
#[derive(Debug)]
pub struct CrmStats {
    /// Requests by (endpoint, status class: `2xx` … `5xx`, `error` without an answer).
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Request durations by endpoint.
    pub durations: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    /// Calls repeated after a failure (429 included).
    pub retries: AtomicU64,
    /// HTTP 429 answers.
    pub rate_limited: AtomicU64,
    /// Logins made.
    pub logins: AtomicU64,
    /// Answers with a 2xx status that were not data: an error in the envelope, an HTML
    /// page, a body that is not JSON or cannot be decompressed (each retried).
    pub error_answers: AtomicU64,
    /// Whether the last call (after its retries) succeeded.
    healthy: AtomicBool,
    /// Why the last call failed, if it did.
    last_error: Mutex<Option<String>>,
}

impl Default for CrmStats {
    fn default() -> Self {
        CrmStats {
            requests: Mutex::default(),
            durations: Family::new_with_constructor(duration_histogram),
            retries: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            logins: AtomicU64::new(0),
            error_answers: AtomicU64::new(0),
            healthy: AtomicBool::new(false),
            last_error: Mutex::default(),
        }
    }
}

impl CrmStats {
    /// Counts one request and its duration.
    pub fn request(&self, endpoint: &'static str, status: Option<u16>, took: Duration) {
        let class = match status {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            _ => "error",
        };
        *lock(&self.requests).entry((endpoint, class)).or_default() += 1;
        self.durations
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Returns the requests counted, by (endpoint, status class).
    pub fn requests(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        lock(&self.requests).clone()
    }

    /// Records the outcome of a call after its retries (the reason carries no secret).
    pub fn outcome(&self, error: Option<String>) {
        self.healthy.store(error.is_none(), Ordering::Relaxed);
        *lock(&self.last_error) = error;
    }

    /// Returns whether the CRM answered the last call, or why not.
    pub fn health(&self) -> Result<(), String> {
        if self.healthy.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(lock(&self.last_error)
            .clone()
            .unwrap_or_else(|| "no CRM call has succeeded yet".to_owned()))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
