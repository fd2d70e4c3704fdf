//! The operations HTTP server: `/metrics` (Prometheus), `/health/live`, `/health/ready` and
//! `/status` (JSON) and `/` (the status page, rendered from `/status`'s JSON), all read from
//! the [`Registry`]. Nothing it answers holds a secret: the
//! registry keeps only counters, cursors and error texts that are secret-free by construction.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::registry::Registry;
use crate::config::Delivery;

struct App {
    registry: Arc<Registry>,
    metrics: prometheus_client::registry::Registry,
}

/// Starts the server on `listen` (port 0 picks one); returns the address it listens on and
/// its task, which ends when `cancel` fires.
pub async fn serve(
    listen: SocketAddr,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), String> {
    let mut metrics = prometheus_client::registry::Registry::default();
    metrics.register_collector(Box::new(Metrics(registry.clone())));
    let app = Arc::new(App { registry, metrics });
    let router = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .route("/status", get(status))
        .route("/", get(page))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on http.listen = {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    });
    Ok((addr, task))
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &app.metrics) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    match app.registry.readiness() {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"ready": true}))).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false, "reason": reason})),
        )
            .into_response(),
    }
}

fn time(t: chrono::DateTime<Utc>) -> Value {
    Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

async fn status(State(app): State<Arc<App>>) -> Response {
    axum::Json(status_json(&app.registry)).into_response()
}

async fn page(State(app): State<Arc<App>>) -> Response {
    let html = super::page::render(&status_json(&app.registry));
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

/// Returns the `/status` document.
pub fn status_json(registry: &Registry) -> Value {
    let now = Utc::now();
    let today = now.with_timezone(&registry.tz).date_naive();
    let pollers: Vec<Value> = registry
        .pollers()
        .into_iter()
        .map(|(name, p)| {
            let cursors: Vec<Value> = p
                .cursors
                .iter()
                .map(|(scope, c)| {
                    json!({
                        "scope": scope,
                        "watermark": c.cursor.watermark,
                        "backfillNext": c.cursor.next,
                        "initialDay": c.initial,
                        "readThrough": c.read_through.map(time),
                        "lastSweep": c.cursor.swept.map(time),
                        "openWindows": c.cursor.open.iter().map(|w| json!({
                            "day": w.day,
                            "since": time(w.since),
                            "missing": w.missing,
                            "reason": c.open_reasons.get(&w.day).map_or("records missing after re-reads", String::as_str),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "name": name,
                "stream": p.stream,
                "serverTag": p.server_tag,
                "backfillProgress": p.progress(today),
                "lagSeconds": p.lag_seconds(now),
                "lastSuccess": p.last_success.map(time),
                "lastError": p.last_error.map(|(at, message)| json!({"at": time(at), "message": message})),
                "cursors": cursors,
            })
        })
        .collect();
    let mut names: Vec<&&str> = registry.streams.keys().collect();
    names.sort();
    let counts: serde_json::Map<String, Value> = names
        .into_iter()
        .map(|name| {
            let s = &registry.streams[*name];
            let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            (
                name.to_string(),
                json!({
                    "fetched": get(&s.fetched),
                    "created": get(&s.created),
                    "updated": get(&s.updated),
                    "unchanged": get(&s.unchanged),
                    "deadLetters": get(&s.dead_letters),
                    "driftRereads": get(&s.drift_rereads),
                    "openWindows": get(&s.open_windows),
                    "openWindowsGivenUp": get(&s.open_windows_given_up),
                    "reconcileSweeps": get(&s.reconcile_sweeps),
                    "decimalsRounded": get(&s.decimals_rounded),
                    "placeholderDates": get(&s.no_dates),
                    "outsideWindow": get(&s.outside_window),
                    "unreadableAccounts": get(&s.unreadable_accounts),
                    "pages": get(&s.pages),
                    "cycles": get(&s.cycles),
                    "tracked": get(&s.tracked),
                }),
            )
        })
        .collect();
    let readiness = registry.readiness();
    json!({
        "instanceId": registry.instance_id,
        "delivery": match registry.delivery {
            Delivery::ExactlyOnce => "exactly-once",
            Delivery::AtLeastOnce => "at-least-once",
        },
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": registry.uptime().as_secs(),
        "ready": readiness.is_ok(),
        "notReadyReason": readiness.err(),
        "stateRestoreSeconds": registry.restore_duration().map(|d| d.as_secs_f64()),
        "pollers": pollers,
        "counts": counts,
    })
}
