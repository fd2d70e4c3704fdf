//! The registry as Prometheus metrics, encoded by `prometheus-client` at each scrape.
//!
//! Names follow Prometheus conventions: `ibstream_` prefix, base units (`_seconds`), counters
//! ending in `_total` (the encoder adds it), low-cardinality labels (`stream`, `op`,
//! `endpoint`, `status_class`; `server_tag` only on positions' per-poller gauges).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::Utc;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::registry::Registry;
use crate::stream::poller::StreamStats;

/// Exports a [`Registry`].
#[derive(Debug)]
pub struct Metrics(pub Arc<Registry>);

type Labels = Vec<(&'static str, String)>;

/// A per-stream metric: name, help, and the counter it reads.
type StreamMetric = (&'static str, &'static str, fn(&StreamStats) -> &AtomicU64);

/// Encodes one metric family: its description, then one sample per label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(value: u64) -> ConstCounter<u64> {
    ConstCounter::new(value)
}

fn get(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let registry = &self.0;
        let mut streams: Vec<(&'static str, &Arc<StreamStats>)> =
            registry.streams.iter().map(|(k, v)| (*k, v)).collect();
        streams.sort_by_key(|(name, _)| *name);
        let by_stream = |pick: fn(&StreamStats) -> &AtomicU64| {
            streams
                .iter()
                .map(move |(name, stats)| {
                    (
                        vec![("stream", name.to_string())],
                        counter(get(pick(stats))),
                    )
                })
                .collect::<Vec<_>>()
        };
        let stream_counters: [StreamMetric; 13] = [
            (
                "ibstream_records_fetched",
                "Records read from the CRM.",
                |s| &s.fetched,
            ),
            (
                "ibstream_records_unchanged",
                "Records read again unchanged (dropped).",
                |s| &s.unchanged,
            ),
            (
                "ibstream_dead_letters",
                "Records sent to the dead-letter topic.",
                |s| &s.dead_letters,
            ),
            (
                "ibstream_drift_rereads",
                "Windows read again because fewer distinct ids than their total came back.",
                |s| &s.drift_rereads,
            ),
            (
                "ibstream_open_windows_given_up",
                "Open windows given up after open_window_retention_days.",
                |s| &s.open_windows_given_up,
            ),
            (
                "ibstream_reconcile_sweeps",
                "Reconciliation sweeps finished.",
                |s| &s.reconcile_sweeps,
            ),
            (
                "ibstream_decimals_rounded",
                "Money and volume values rounded to 8 decimals (binary floating-point noise).",
                |s| &s.decimals_rounded,
            ),
            ("ibstream_crm_pages", "Pages read from the CRM.", |s| {
                &s.pages
            }),
            (
                "ibstream_placeholder_dates",
                "Date fields emitted as null because they held no date (a zero date such as 0000-00-00, a blank, an instant outside 0001-9999), the raw value kept in extra.",
                |s| &s.no_dates,
            ),
            (
                "ibstream_unreadable_accounts",
                "Customers emitted whose trading-account list (userAdditionalId) could not be read: accounts empty, the text kept in userAdditionalId.",
                |s| &s.unreadable_accounts,
            ),
            (
                "ibstream_records_outside_window",
                "Records emitted whose own date lies more than 2 days outside the window they were read from (their fingerprint is kept by the window's day).",
                |s| &s.outside_window,
            ),
            (
                "ibstream_windows_too_deep",
                "Reads of a single day cut short by the CRM refusing a deep page (the day is kept open).",
                |s| &s.windows_too_deep,
            ),
            (
                "ibstream_stale_records_skipped",
                "Records skipped because a newer read of the same entity was applied after their page was requested.",
                |s| &s.stale_skipped,
            ),
        ];
        for (name, help, pick) in stream_counters {
            family(
                &mut encoder,
                name,
                help,
                MetricType::Counter,
                by_stream(pick),
            )?;
        }
        let events = streams.iter().flat_map(|(name, stats)| {
            [
                ("CREATED", get(&stats.created)),
                ("UPDATED", get(&stats.updated)),
            ]
            .map(|(op, n)| {
                (
                    vec![("stream", name.to_string()), ("op", op.to_owned())],
                    counter(n),
                )
            })
        });
        family(
            &mut encoder,
            "ibstream_events",
            "Events emitted, by operation.",
            MetricType::Counter,
            events,
        )?;
        let gauges: [StreamMetric; 2] = [
            (
                "ibstream_open_windows",
                "Days read with records missing, retried every cycle.",
                |s| &s.open_windows,
            ),
            (
                "ibstream_tracked_entities",
                "Entities whose fingerprint is kept.",
                |s| &s.tracked,
            ),
        ];
        for (name, help, pick) in gauges {
            let samples = streams.iter().map(|(n, s)| {
                (
                    vec![("stream", n.to_string())],
                    ConstGauge::new(get(pick(s)) as i64),
                )
            });
            family(&mut encoder, name, help, MetricType::Gauge, samples)?;
        }

        // Per poller: lag and backfill progress.
        let now = Utc::now();
        let today = now.with_timezone(&registry.tz).date_naive();
        let pollers = registry.pollers();
        let poller_labels = |status: &super::registry::PollerStatus| {
            let mut labels = vec![("stream", status.stream.to_owned())];
            if let Some(tag) = &status.server_tag {
                labels.push(("server_tag", tag.clone()));
            }
            labels
        };
        let lag = pollers.values().filter_map(|p| {
            p.lag_seconds(now)
                .map(|lag| (poller_labels(p), ConstGauge::new(lag)))
        });
        family(&mut encoder, "ibstream_stream_lag_seconds", "Now minus the instant up to which every record was read (the end of the last day read during a backfill, the start of the last complete cycle after it).", MetricType::Gauge, lag)?;
        let progress = pollers
            .values()
            .map(|p| (poller_labels(p), ConstGauge::new(p.progress(today))));
        family(
            &mut encoder,
            "ibstream_backfill_progress_ratio",
            "Days read of the days to read by the backfill (1 when caught up).",
            MetricType::Gauge,
            progress,
        )?;

        // The CRM client.
        let crm = &registry.crm;
        let requests = crm.requests().into_iter().map(|((endpoint, class), n)| {
            (
                vec![
                    ("endpoint", endpoint.to_owned()),
                    ("status_class", class.to_owned()),
                ],
                counter(n),
            )
        });
        family(
            &mut encoder,
            "ibstream_crm_requests",
            "CRM requests by endpoint and status class (error: no answer).",
            MetricType::Counter,
            requests,
        )?;
        let duration = encoder.encode_descriptor(
            "ibstream_crm_request_duration_seconds",
            "CRM request durations by endpoint.",
            None,
            crm.durations.metric_type(),
        )?;
        crm.durations.encode(duration)?;
        let mut plain = vec![
            (
                "ibstream_crm_retries",
                "CRM calls repeated after a failure or a 429.",
                get(&crm.retries),
            ),
            (
                "ibstream_crm_rate_limited",
                "CRM answers with HTTP 429.",
                get(&crm.rate_limited),
            ),
            (
                "ibstream_crm_logins",
                "Logins to the CRM.",
                get(&crm.logins),
            ),
            (
                "ibstream_crm_error_answers",
                "CRM answers with a 2xx status that were not data (an error in the envelope, an HTML page, an unreadable body); each is retried.",
                get(&crm.error_answers),
            ),
        ];
        if let Some(sink) = registry.sink() {
            plain.extend([
                (
                    "ibstream_sink_batches",
                    "Batches committed (transactions in exactly-once mode).",
                    get(&sink.batches),
                ),
                (
                    "ibstream_sink_transactions",
                    "Transactions committed (exactly-once; one may hold several pollers' batches).",
                    get(&sink.transactions),
                ),
                (
                    "ibstream_sink_aborts",
                    "Transactions aborted (each retried or failed).",
                    get(&sink.aborts),
                ),
                (
                    "ibstream_sink_bytes",
                    "Key and value bytes of the records of committed batches.",
                    get(&sink.bytes),
                ),
                (
                    "ibstream_sink_state_records",
                    "State-topic records (cursors, fingerprints) of committed batches.",
                    get(&sink.state_records),
                ),
                (
                    "ibstream_sink_state_bytes",
                    "Key and value bytes of the state-topic records of committed batches.",
                    get(&sink.state_bytes),
                ),
                (
                    "ibstream_sink_commit_retries",
                    "Commits called again after a retriable failure.",
                    get(&sink.commit_retries),
                ),
            ]);
        }
        for (name, help, value) in plain {
            family(
                &mut encoder,
                name,
                help,
                MetricType::Counter,
                [(Labels::new(), counter(value))],
            )?;
        }

        // The sink's batch durations.
        if let Some(sink) = registry.sink() {
            let duration = encoder.encode_descriptor(
                "ibstream_sink_batch_duration_seconds",
                "Time from a batch reaching the sink to its outcome.",
                None,
                MetricType::Histogram,
            )?;
            sink.batch_duration.encode(duration)?;
        }
        if let Some(pressure) = registry.crm_pressure.get() {
            family(
                &mut encoder,
                "ibstream_crm_concurrency_limit",
                "CRM requests allowed in flight at once now (adaptive: lowered on 429, 5xx and rising latency, at most crm.max_concurrent_requests).",
                MetricType::Gauge,
                [(Labels::new(), ConstGauge::new(pressure.limit() as i64))],
            )?;
            family(
                &mut encoder,
                "ibstream_crm_requests_in_flight",
                "CRM requests in flight now: sent and not yet answered (or holding their slot through a 429 pause).",
                MetricType::Gauge,
                [(Labels::new(), ConstGauge::new(pressure.in_flight() as i64))],
            )?;
        }
        if let Some(took) = registry.restore_duration() {
            family(
                &mut encoder,
                "ibstream_state_restore_duration_seconds",
                "Time the start-up state restore took.",
                MetricType::Gauge,
                [(Labels::new(), ConstGauge::new(took.as_secs_f64()))],
            )?;
        }
        family(
            &mut encoder,
            "ibstream_build_info",
            "The running version (always 1).",
            MetricType::Gauge,
            [(
                vec![("version", env!("CARGO_PKG_VERSION").to_owned())],
                ConstGauge::new(1),
            )],
        )?;
        Ok(())
    }
}
