//! The simulator's HTTP server: routing, auth, validation and fault injection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{NaiveDate, Utc};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::data::{day_bounds, ChangeKind, DataQuery, Kind, PageOrder, SimData};
use super::SimConfig;

/// Counters of what the simulator served.
#[derive(Debug, Default)]
pub struct SimStats {
    /// API calls received (login included, `/_sim` excluded).
    pub requests: AtomicU64,
    /// Successful logins.
    pub logins: AtomicU64,
    /// Answers 500 injected.
    pub failures: AtomicU64,
    /// Answers 429.
    pub rate_limited: AtomicU64,
    /// Answers 401.
    pub unauthorized: AtomicU64,
    /// Answers 403.
    pub forbidden: AtomicU64,
    /// Answers 400.
    pub bad_requests: AtomicU64,
    /// Pages served.
    pub pages: AtomicU64,
    /// Position pages served, by server tag.
    pub position_pages: Mutex<HashMap<String, u64>>,
    /// Answers 200 carrying an error injected (`--error-200`).
    pub errors_200: AtomicU64,
    /// Records served with a byte that is not UTF-8 (`--latin1-records`).
    pub latin1_records: AtomicU64,
}

impl SimStats {
    /// Returns the position pages served for `tag`.
    pub fn position_pages(&self, tag: &str) -> u64 {
        lock(&self.position_pages).get(tag).copied().unwrap_or(0)
    }

    /// Returns the counters as the `/_sim/stats` document.
    pub fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "requests": get(&self.requests),
            "logins": get(&self.logins),
            "failures": get(&self.failures),
            "rateLimited": get(&self.rate_limited),
            "unauthorized": get(&self.unauthorized),
            "forbidden": get(&self.forbidden),
            "badRequests": get(&self.bad_requests),
            "pages": get(&self.pages),
            "positionPages": *lock(&self.position_pages),
            "errors200": get(&self.errors_200),
            "latin1Records": get(&self.latin1_records),
        })
    }
}

struct AppState {
    config: Arc<SimConfig>,
    paused: std::sync::atomic::AtomicBool,
    /// Endpoints answered with 403 (`--deny`, changeable while running).
    denied: Mutex<Vec<Kind>>,
    data: RwLock<SimData>,
    tokens: Mutex<HashMap<String, Instant>>,
    faults: Mutex<Faults>,
    stats: SimStats,
    /// `--short-day`, changeable while running.
    short_day: Mutex<Option<NaiveDate>>,
    /// Server tags whose positions calls are answered with an error status.
    failing_tags: Mutex<HashMap<String, (u16, Option<NaiveDate>)>>,
    /// Servers calls still to answer with an empty list.
    empty_servers: std::sync::atomic::AtomicU32,
    /// Every change applied so far, in order (tests compare events with them).
    changes: Mutex<Vec<super::Change>>,
    /// Answer quirks of other CRMs (`--error-200`, `--latin1-records`, 429 with a given
    /// `Retry-After`, arrival times).
    quirks: Quirks,
}

/// The state of the fault modes that answer as other CRMs do.
#[derive(Default)]
struct Quirks {
    /// Data queries already answered with `--error-200`.
    error_200_seen: Mutex<std::collections::HashSet<String>>,
    /// `(kind, key)` of the records served with a Latin-1 byte.
    latin1: Mutex<std::collections::HashSet<(Kind, String)>>,
    /// Calls still to answer with this status (429 or 503) and this `Retry-After`.
    rate_limit_next: Mutex<Option<(u32, StatusCode, String)>>,
    /// Data calls (not logins) still to answer with 429 and this `Retry-After`.
    rate_limit_data_next: Mutex<Option<(u32, String)>>,
    /// When each API call arrived, while recorded.
    arrivals: Mutex<Option<Vec<std::time::SystemTime>>>,
    /// The window held back: data calls of this kind whose `…DateFrom` is this day wait
    /// until it is released (tests of windows completing out of order).
    held: Mutex<Option<(Kind, String)>>,
    /// Wakes the held calls when the hold is lifted.
    release: tokio::sync::Notify,
    /// Calls waiting in the hold now.
    holding: std::sync::atomic::AtomicU32,
}

impl AppState {
    /// Applies changes and records them.
    fn mutate(&self, count: usize, kind: Option<ChangeKind>) -> Vec<super::Change> {
        let changes = write(&self.data).mutate(count, kind, Utc::now());
        lock(&self.changes).extend(changes.iter().cloned());
        changes
    }
}

struct Faults {
    rng: fastrand::Rng,
    window_start: Instant,
    window_count: u32,
    fail_next: u32,
}

/// A running simulator; dropping it does not stop it, [`SimHandle::shutdown`] does.
pub struct SimHandle {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    changer: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// Returns the address the simulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the base URL (`http://127.0.0.1:PORT`).
    pub fn base_url(&self) -> String {
        let scheme = if self.state.config.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Returns the counters.
    pub fn stats(&self) -> &SimStats {
        &self.state.stats
    }

    /// Revokes every issued token, as a CRM does when tokens expire.
    pub fn expire_tokens(&self) {
        lock(&self.state.tokens).clear();
    }

    /// Returns the tokens issued and not revoked (tests look for them in logs).
    pub fn tokens(&self) -> Vec<String> {
        lock(&self.state.tokens).keys().cloned().collect()
    }

    /// Stops (or resumes) the background changes of `--change-rate` and `--shuffle-pages`,
    /// so a test can compare with a truth that stands still.
    pub fn pause_changes(&self, paused: bool) {
        self.state.paused.store(paused, Ordering::Relaxed);
    }

    /// Serves the record of `kind` keyed `key` (`id`, `customerId` or `positionId`) with a
    /// byte that is not UTF-8 in its text (`false`: as UTF-8 again).
    pub fn latin1_record(&self, kind: Kind, key: &str, on: bool) {
        let mut keys = lock(&self.state.quirks.latin1);
        if on {
            keys.insert((kind, key.to_owned()));
        } else {
            keys.remove(&(kind, key.to_owned()));
        }
    }

    /// Answers the next `n` API calls with HTTP 429 and `Retry-After: <retry_after>` (either
    /// RFC 9110 form, sent as given).
    pub fn rate_limit_next(&self, n: u32, retry_after: &str) {
        *lock(&self.state.quirks.rate_limit_next) =
            Some((n, StatusCode::TOO_MANY_REQUESTS, retry_after.to_owned()));
    }

    /// Answers the next `n` data calls (logins pass) with HTTP 429 and `Retry-After:
    /// <retry_after>`.
    pub fn rate_limit_data_next(&self, n: u32, retry_after: &str) {
        *lock(&self.state.quirks.rate_limit_data_next) = Some((n, retry_after.to_owned()));
    }

    /// Answers the next `n` API calls with HTTP 503 and `Retry-After: <retry_after>`.
    pub fn unavailable_next(&self, n: u32, retry_after: &str) {
        *lock(&self.state.quirks.rate_limit_next) =
            Some((n, StatusCode::SERVICE_UNAVAILABLE, retry_after.to_owned()));
    }

    /// Holds back every data call of `kind` whose window starts on `from` (its
    /// `…DateFrom` parameter) until [`SimHandle::release_window`]; they are answered then,
    /// from the data as it is at that moment.
    pub fn hold_window(&self, kind: Kind, from: NaiveDate) {
        *lock(&self.state.quirks.held) = Some((kind, from.format("%Y-%m-%d").to_string()));
    }

    /// Lifts the hold of [`SimHandle::hold_window`].
    pub fn release_window(&self) {
        *lock(&self.state.quirks.held) = None;
        self.state.quirks.release.notify_waiters();
    }

    /// Returns how many calls wait in the hold of [`SimHandle::hold_window`] now.
    pub fn held_calls(&self) -> u32 {
        self.state.quirks.holding.load(Ordering::Relaxed)
    }

    /// Starts recording when each API call arrives (`false`: stops and forgets).
    pub fn record_arrivals(&self, on: bool) {
        *lock(&self.state.quirks.arrivals) = on.then(Vec::new);
    }

    /// Returns when each API call arrived since [`SimHandle::record_arrivals`].
    pub fn arrivals(&self) -> Vec<std::time::SystemTime> {
        lock(&self.state.quirks.arrivals)
            .clone()
            .unwrap_or_default()
    }

    /// Answers the next `n` API calls with HTTP 500.
    pub fn fail_next(&self, n: u32) {
        lock(&self.state.faults).fail_next = n;
    }

    /// Sets (or clears) the day whose transactions' totals report one record more than served.
    pub fn set_short_day(&self, day: Option<NaiveDate>) {
        *lock(&self.state.short_day) = day;
    }

    /// Answers positions calls of `tag` with `status` (`None`: normally again).
    pub fn fail_positions(&self, tag: &str, status: Option<u16>) {
        let mut tags = lock(&self.state.failing_tags);
        match status {
            Some(status) => tags.insert(tag.to_owned(), (status, None)),
            None => tags.remove(tag),
        };
    }

    /// Answers positions calls of `tag` whose window starts after `after`
    /// (`positionCloseDateFrom`) with `status`, and the earlier windows normally: a read of
    /// the tag that fails partway.
    pub fn fail_positions_after(&self, tag: &str, status: u16, after: NaiveDate) {
        lock(&self.state.failing_tags).insert(tag.to_owned(), (status, Some(after)));
    }

    /// Answers the next `n` servers calls with an empty list.
    pub fn empty_servers(&self, n: u32) {
        self.state.empty_servers.store(n, Ordering::Relaxed);
    }

    /// Applies `count` changes now and returns them.
    pub fn mutate(&self, count: usize, kind: Option<ChangeKind>) -> Vec<super::Change> {
        self.state.mutate(count, kind)
    }

    /// Returns every change applied so far (by `mutate`, background changes and
    /// `--shuffle-pages`), in order.
    pub fn changes(&self) -> Vec<super::Change> {
        lock(&self.state.changes).clone()
    }

    /// Returns the ground truth of `kind`.
    pub fn truth(&self, kind: Kind) -> Vec<Value> {
        read(&self.state.data).truth(kind)
    }

    /// Answers calls of `kind` with 403 "module not enabled" (`false`: normally again).
    pub fn deny(&self, kind: Kind, denied: bool) {
        let mut kinds = lock(&self.state.denied);
        kinds.retain(|k| *k != kind);
        if denied {
            kinds.push(kind);
        }
    }

    /// Stops serving and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(changer) = self.changer.take() {
            changer.abort();
        }
        let _ = (&mut self.server).await;
    }

    /// Goes down for `down` and comes back on the same address with the same records, as a
    /// CRM restarted: connections are refused meanwhile and every token is forgotten.
    pub async fn restart(self, down: Duration) -> Result<SimHandle, String> {
        let (state, addr) = (self.state.clone(), self.addr);
        self.shutdown().await;
        tokio::time::sleep(down).await;
        lock(&state.tokens).clear();
        serve(state, addr).await
    }
}

pub(super) async fn start(config: Arc<SimConfig>) -> Result<SimHandle, String> {
    let denied = config.validate()?;
    let data = SimData::generate(&config.gen_spec(), Utc::now());
    let state = Arc::new(AppState {
        paused: std::sync::atomic::AtomicBool::new(false),
        denied: Mutex::new(denied),
        data: RwLock::new(data),
        tokens: Mutex::new(HashMap::new()),
        faults: Mutex::new(Faults {
            rng: fastrand::Rng::with_seed(config.seed.wrapping_add(2)),
            window_start: Instant::now(),
            window_count: 0,
            fail_next: 0,
        }),
        stats: SimStats::default(),
        short_day: Mutex::new(config.short_day),
        failing_tags: Mutex::new(HashMap::new()),
        empty_servers: std::sync::atomic::AtomicU32::new(0),
        changes: Mutex::new(Vec::new()),
        quirks: Quirks {
            latin1: Mutex::new(config.latin1_keys()?),
            ..Quirks::default()
        },
        config: config.clone(),
    });
    serve(state, config.listen).await
}

/// Serves `state` on `listen`.
async fn serve(state: Arc<AppState>, listen: SocketAddr) -> Result<SimHandle, String> {
    let config = state.config.clone();
    let app = Router::new()
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/{integration}/{endpoint}", get(data_call))
        .route("/_sim/truth/{kind}", get(truth))
        .route("/_sim/mutate", post(mutate))
        .route("/_sim/expire-tokens", post(expire_tokens))
        .route("/_sim/stats", get(stats))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, stopped) = oneshot::channel::<()>();
    let stopped = async {
        let _ = stopped.await;
    };
    let server = match tls_acceptor(&config)? {
        None => tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await;
        }),
        Some(acceptor) => tokio::spawn(async move {
            let listener = TlsListener {
                inner: listener,
                acceptor,
            };
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await;
        }),
    };
    let changer =
        (config.change_rate > 0.0).then(|| tokio::spawn(background_changes(state.clone())));
    Ok(SimHandle {
        addr,
        state,
        stop: Some(stop),
        server,
        changer,
    })
}

/// Builds the TLS acceptor of `--tls-cert`/`--tls-key` (PEM; the key PKCS#8), if given.
fn tls_acceptor(config: &SimConfig) -> Result<Option<tokio_native_tls::TlsAcceptor>, String> {
    let (cert, key) = match (&config.tls_cert, &config.tls_key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        _ => return Err("--tls-cert and --tls-key go together".to_owned()),
    };
    let read = |path: &std::path::Path, flag: &str| {
        std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    let identity =
        native_tls::Identity::from_pkcs8(&read(cert, "--tls-cert")?, &read(key, "--tls-key")?)
            .map_err(|e| {
                format!("--tls-cert/--tls-key: not a PEM certificate and PKCS#8 key: {e}")
            })?;
    let acceptor = native_tls::TlsAcceptor::new(identity).map_err(|e| e.to_string())?;
    Ok(Some(acceptor.into()))
}

/// A TCP listener that completes a TLS handshake before handing a connection to axum.
struct TlsListener {
    inner: tokio::net::TcpListener,
    acceptor: tokio_native_tls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_native_tls::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.inner.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            // A client that does not trust the certificate fails its handshake: next.
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

async fn background_changes(state: Arc<AppState>) {
    const TICK: Duration = Duration::from_millis(50);
    let per_tick = state.config.change_rate * TICK.as_secs_f64();
    let mut owed = 0.0;
    let mut interval = tokio::time::interval(TICK);
    loop {
        interval.tick().await;
        if state.paused.load(Ordering::Relaxed) {
            continue;
        }
        owed += per_tick;
        let count = owed.floor();
        if count >= 1.0 {
            owed -= count;
            state.mutate(count as usize, None);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [("content-type", "application/json")], body).into_response()
}

/// A 200 answer of the API, its body sent as `--body-quirks` say.
fn api_ok(state: &AppState, content_type: &'static str, body: Vec<u8>) -> Response {
    use super::BodyQuirk;
    let quirks = &state.config.body_quirks;
    let mut body = body;
    if quirks.contains(&BodyQuirk::Bom) {
        body.splice(0..0, [0xEF, 0xBB, 0xBF]);
    }
    let gzip = quirks.contains(&BodyQuirk::Gzip);
    if gzip || quirks.contains(&BodyQuirk::GzipUnlabelled) {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        // Writing into a Vec cannot fail.
        let _ = encoder.write_all(&body);
        body = encoder.finish().unwrap_or_default();
    }
    let mut response = (StatusCode::OK, [("content-type", content_type)], body).into_response();
    if gzip {
        response.headers_mut().insert(
            "content-encoding",
            axum::http::HeaderValue::from_static("gzip"),
        );
    }
    response
}

/// The body of `--error-200` if this data query has not had it yet.
fn error_200(
    state: &AppState,
    endpoint: &str,
    params: &HashMap<String, String>,
) -> Option<Response> {
    let shape = state.config.error_200?;
    let mut query: Vec<_> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    query.sort();
    let key = format!("{endpoint}?{}", query.join("&"));
    if !lock(&state.quirks.error_200_seen).insert(key) {
        return None;
    }
    state.stats.errors_200.fetch_add(1, Ordering::Relaxed);
    let (content_type, body) = shape.body();
    Some((StatusCode::OK, [("content-type", content_type)], body).into_response())
}

/// Writes a Latin-1 `é` (0xE9, not UTF-8) at the start of a text field of the record just
/// written at `out[start..]`, if its key is listed in `--latin1-records`.
fn latin1_record(state: &AppState, kind: Kind, out: &mut Vec<u8>, start: usize) {
    let (key_field, text_field) = match kind {
        Kind::Leads => ("\"id\":", "\"firstName\":\""),
        Kind::Customers => ("\"customerId\":", "\"firstName\":\""),
        Kind::Transactions => ("\"id\":", "\"paymentMethod\":\""),
        Kind::Positions => ("\"positionId\":", "\"symbol\":\""),
        Kind::Servers => return,
    };
    let find = |hay: &[u8], needle: &str| {
        hay.windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .map(|at| at + needle.len())
    };
    let record = &out[start..];
    let Some(at) = find(record, key_field) else {
        return;
    };
    let key: String = record[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit() || **b == b'-')
        .map(|b| *b as char)
        .collect();
    if !lock(&state.quirks.latin1).contains(&(kind, key)) {
        return;
    }
    if let Some(at) = find(record, text_field) {
        out.insert(start + at, 0xE9);
        state.stats.latin1_records.fetch_add(1, Ordering::Relaxed);
    }
}

fn error(state: &AppState, status: StatusCode, message: &str) -> Response {
    let counter = match status {
        StatusCode::UNAUTHORIZED => &state.stats.unauthorized,
        StatusCode::FORBIDDEN => &state.stats.forbidden,
        StatusCode::BAD_REQUEST => &state.stats.bad_requests,
        StatusCode::TOO_MANY_REQUESTS => &state.stats.rate_limited,
        _ => &state.stats.failures,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    json_response(
        status,
        json!({"error": status.canonical_reason().unwrap_or("error"), "message": message})
            .to_string(),
    )
}

/// Latency, rate limit and injected failures, common to every API call.
async fn faults(state: &AppState) -> Option<Response> {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(arrivals) = lock(&state.quirks.arrivals).as_mut() {
        arrivals.push(std::time::SystemTime::now());
    }
    let retry_after = {
        let mut next = lock(&state.quirks.rate_limit_next);
        let value = next.as_ref().map(|(_, status, v)| (*status, v.clone()));
        match next.as_mut() {
            Some((n, _, _)) if *n > 1 => *n -= 1,
            _ => *next = None,
        }
        value
    };
    if let Some((status, value)) = retry_after {
        let mut response = error(state, status, "rate limit exceeded or unavailable");
        if let Ok(value) = axum::http::HeaderValue::from_str(&value) {
            response.headers_mut().insert("retry-after", value);
        }
        return Some(response);
    }
    if state.config.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(state.config.latency_ms)).await;
    }
    let mut faults = lock(&state.faults);
    if state.config.max_rps > 0 {
        let now = Instant::now();
        if now.duration_since(faults.window_start) >= Duration::from_secs(1) {
            faults.window_start = now;
            faults.window_count = 0;
        }
        faults.window_count += 1;
        if faults.window_count > state.config.max_rps {
            drop(faults);
            let mut response = error(state, StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            return Some(response);
        }
    }
    let fail = if faults.fail_next > 0 {
        faults.fail_next -= 1;
        true
    } else {
        state.config.fail_rate > 0.0 && faults.rng.f64() < state.config.fail_rate
    };
    drop(faults);
    fail.then(|| {
        error(
            state,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal server error (injected)",
        )
    })
}

fn api_key_ok(state: &AppState, headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("x-api-key") == Some(state.config.api_key.as_str())
        && header("x-domain") == Some(state.config.domain.as_str())
}

async fn login(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(response) = faults(&state).await {
        return response;
    }
    if !api_key_ok(&state, &headers) {
        return error(
            &state,
            StatusCode::UNAUTHORIZED,
            "invalid or expired API key for this domain",
        );
    }
    let Ok(credentials) = serde_json::from_slice::<Value>(&body) else {
        return error(&state, StatusCode::BAD_REQUEST, "body must be JSON");
    };
    let email = credentials.get("email").and_then(Value::as_str);
    let password = credentials.get("password").and_then(Value::as_str);
    if email != Some(state.config.email.as_str())
        || password != Some(state.config.password.as_str())
    {
        return error(
            &state,
            StatusCode::UNAUTHORIZED,
            "invalid email or password",
        );
    }
    let token = {
        let mut faults = lock(&state.faults);
        (0..32)
            .map(|_| faults.rng.alphanumeric())
            .collect::<String>()
    };
    lock(&state.tokens).insert(token.clone(), Instant::now());
    state.stats.logins.fetch_add(1, Ordering::Relaxed);
    api_ok(
        &state,
        "application/json",
        json!({ "token": token }).to_string().into_bytes(),
    )
}

fn token_ok(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(token) = headers.get("x-auth-token").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let tokens = lock(&state.tokens);
    match tokens.get(token) {
        Some(issued) => {
            state.config.token_ttl_secs == 0
                || issued.elapsed() < Duration::from_secs(state.config.token_ttl_secs)
        }
        None => false,
    }
}

/// Waits while the call's window is held back ([`SimHandle::hold_window`]).
async fn hold(state: &AppState, kind: Kind, params: &HashMap<String, String>) {
    let held = |state: &AppState| {
        lock(&state.quirks.held).as_ref().is_some_and(|(k, day)| {
            *k == kind
                && params
                    .iter()
                    .any(|(name, value)| name.ends_with("DateFrom") && value == day)
        })
    };
    if !held(state) {
        return;
    }
    state.quirks.holding.fetch_add(1, Ordering::Relaxed);
    loop {
        let released = state.quirks.release.notified();
        if !held(state) {
            break;
        }
        released.await;
    }
    state.quirks.holding.fetch_sub(1, Ordering::Relaxed);
}

async fn data_call(
    State(state): State<Arc<AppState>>,
    Path((integration, endpoint)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = faults(&state).await {
        return response;
    }
    let data_429 = {
        let mut next = lock(&state.quirks.rate_limit_data_next);
        let value = next.as_ref().map(|(_, v)| v.clone());
        match next.as_mut() {
            Some((n, _)) if *n > 1 => *n -= 1,
            _ => *next = None,
        }
        value
    };
    if let Some(value) = data_429 {
        let mut response = error(&state, StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
        if let Ok(value) = axum::http::HeaderValue::from_str(&value) {
            response.headers_mut().insert("retry-after", value);
        }
        return response;
    }
    let kind = match Kind::parse(&endpoint) {
        Some(kind) if integration == state.config.api_path && endpoint != "customers" => kind,
        _ => return error(&state, StatusCode::NOT_FOUND, "no such endpoint"),
    };
    if !api_key_ok(&state, &headers) {
        return error(
            &state,
            StatusCode::UNAUTHORIZED,
            "invalid or expired API key for this domain",
        );
    }
    if !token_ok(&state, &headers) {
        if state.config.expired_token_status == 403 {
            return error(&state, StatusCode::FORBIDDEN, "Token expired");
        }
        return error(
            &state,
            StatusCode::UNAUTHORIZED,
            "token missing, expired or revoked",
        );
    }
    if state.config.no_ib_reports {
        return error(
            &state,
            StatusCode::FORBIDDEN,
            "missing permission: IB Reports",
        );
    }
    if lock(&state.denied).contains(&kind) {
        let module = match kind {
            Kind::Leads | Kind::Customers => "leads",
            Kind::Transactions => "transactions",
            Kind::Servers | Kind::Positions => "platforms",
        };
        return error(
            &state,
            StatusCode::FORBIDDEN,
            &format!("the {module} module is not enabled"),
        );
    }
    hold(&state, kind, &params).await;
    if let Some(response) = error_200(&state, &endpoint, &params) {
        return response;
    }
    if kind == Kind::Servers {
        let empty = state
            .empty_servers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        let body = if empty {
            "{}".to_owned()
        } else {
            read(&state.data).render_servers().to_string()
        };
        return api_ok(&state, "application/json", body.into_bytes());
    }
    if let (Kind::Positions, Some(tag)) = (kind, params.get("serverTag")) {
        let failing = lock(&state.failing_tags).get(tag).copied();
        let from = params
            .get("positionCloseDateFrom")
            .and_then(|d| NaiveDate::parse_from_str(d.get(..10).unwrap_or(d), "%Y-%m-%d").ok());
        let status = failing.and_then(|(status, after)| match (after, from) {
            (None, _) => Some(status),
            (Some(after), Some(from)) if from > after => Some(status),
            _ => None,
        });
        if let Some(status) = status {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::NOT_FOUND);
            return error(&state, status, &format!("server {tag} not found"));
        }
    }
    if let Some(refused) = refuse_deep_page(&state, kind, &params) {
        return refused;
    }
    match page(&state, kind, &params) {
        Ok(body) => {
            state.stats.pages.fetch_add(1, Ordering::Relaxed);
            if let (Kind::Positions, Some(tag)) = (kind, params.get("serverTag")) {
                *lock(&state.stats.position_pages)
                    .entry(tag.clone())
                    .or_default() += 1;
            }
            api_ok(&state, "application/json", body)
        }
        Err(message) => error(&state, StatusCode::BAD_REQUEST, &message),
    }
}

/// Answers a page starting past `--max-page-offset` records with `--deep-page-status` (the
/// page and size as asked; malformed ones are left to [`page`] to refuse).
fn refuse_deep_page(
    state: &AppState,
    kind: Kind,
    params: &HashMap<String, String>,
) -> Option<Response> {
    let config = &state.config;
    if config.max_page_offset == 0 || kind == Kind::Servers {
        return None;
    }
    let number = |name: &str, default: u64| match params.get(name) {
        None => Some(default),
        Some(v) => v.parse::<u64>().ok(),
    };
    let page = number("page", 1)?;
    let size = match (number("pageSize", 1000)?, u64::from(config.page_cap)) {
        (size, 0) => size,
        (size, cap) => size.min(cap),
    };
    let offset = page.saturating_sub(1).saturating_mul(size);
    if config.ignore_page || offset < config.max_page_offset {
        return None;
    }
    Some(match StatusCode::from_u16(config.deep_page_status) {
        Ok(StatusCode::BAD_REQUEST) => error(
            state,
            StatusCode::BAD_REQUEST,
            &format!(
                "Result window is too large, page * pageSize must be less than or equal to {}",
                config.max_page_offset
            ),
        ),
        Ok(status) => error(state, status, "internal server error"),
        Err(_) => error(
            state,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal server error",
        ),
    })
}

fn page(state: &AppState, kind: Kind, params: &HashMap<String, String>) -> Result<Vec<u8>, String> {
    let number = |name: &str, default: u32| -> Result<u32, String> {
        match params.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{name} must be a positive integer")),
        }
    };
    let page = number("page", 1)?;
    let page_size = number("pageSize", 1000)?;
    if page == 0 {
        return Err("page must be 1 or more".to_owned());
    }
    if page_size == 0 || page_size > 1000 {
        return Err("pageSize must be between 1 and 1000".to_owned());
    }
    let date = |name: &str| -> Result<Option<NaiveDate>, String> {
        params
            .get(name)
            .map(|v| {
                NaiveDate::parse_from_str(v, "%Y-%m-%d")
                    .map_err(|_| format!("{name} must be a date as YYYY-MM-DD, got {v:?}"))
            })
            .transpose()
    };
    let range = |prefix: &str| -> Result<Option<(NaiveDate, NaiveDate)>, String> {
        match (
            date(&format!("{prefix}From"))?,
            date(&format!("{prefix}To"))?,
        ) {
            (Some(from), Some(to)) => Ok(Some((from, to))),
            (None, None) => Ok(None),
            _ => Err(format!(
                "{prefix}From and {prefix}To must be given together"
            )),
        }
    };
    let (by_modified, (from, to)) = match kind {
        Kind::Leads | Kind::Customers => {
            match (range("registrationDate")?, range("lastModifiedDate")?) {
                (Some(r), None) => (false, r),
                (None, Some(r)) => (true, r),
                (Some(_), Some(_)) => {
                    return Err(
                        "give either registrationDate or lastModifiedDate filters, not both"
                            .to_owned(),
                    )
                }
                (None, None) => {
                    return Err(
                        "registrationDateFrom/To or lastModifiedDateFrom/To is required".to_owned(),
                    )
                }
            }
        }
        Kind::Transactions => (
            false,
            range("transactionDate")?
                .ok_or("transactionDateFrom and transactionDateTo are required")?,
        ),
        Kind::Positions => (
            false,
            range("positionCloseDate")?
                .ok_or("positionCloseDateFrom and positionCloseDateTo are required")?,
        ),
        Kind::Servers => return Err("servers are not paged".to_owned()),
    };
    let server_tag = params.get("serverTag").cloned();
    if kind == Kind::Positions && server_tag.as_deref().is_none_or(str::is_empty) {
        return Err("serverTag is required".to_owned());
    }
    let include_fake = match params.get("includeFake").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(format!("includeFake must be true or false, got {other:?}")),
    };
    let (from_instant, until) = day_bounds(from, to, state.config.timezone);
    let query = DataQuery {
        kind,
        by_modified,
        from: from_instant,
        until,
        server_tag,
        include_fake,
    };
    if state.config.shuffle_pages && !state.paused.load(Ordering::Relaxed) {
        // Changes land between page calls, and the newest-modified-first order moves records.
        state.mutate(2, None);
    }
    let config = &state.config;
    let served_size = match config.page_cap {
        0 => page_size,
        cap => page_size.min(cap),
    };
    let skip = if config.ignore_page {
        0
    } else {
        (page as usize - 1).saturating_mul(served_size as usize)
    };
    let calls = state.stats.pages.load(Ordering::Relaxed);
    let order = if config.unstable_order {
        PageOrder::Random(config.seed ^ calls.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    } else if config.shuffle_pages {
        PageOrder::NewestFirst
    } else {
        PageOrder::Id
    };
    let data = read(&state.data);
    let (total, indices) = data.select_page(&query, order, skip, served_size as usize);
    let mut total = total as u64 + config.growing_total.saturating_mul(calls + 1);
    let short_day = *lock(&state.short_day);
    if kind == Kind::Transactions && short_day.is_some_and(|d| from <= d && d <= to) {
        total += 1;
    }
    let mut out = Vec::with_capacity(indices.len() * 512 + 64);
    let head = if config.omit_total {
        format!(r#"{{"page":{page},"pageSize":{page_size},"data":["#)
    } else {
        format!(r#"{{"page":{page},"pageSize":{page_size},"total":{total},"data":["#)
    };
    out.extend_from_slice(head.as_bytes());
    for (n, index) in indices.into_iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        let start = out.len();
        data.write_record(kind, index, &mut out);
        latin1_record(state, kind, &mut out, start);
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

async fn truth(State(state): State<Arc<AppState>>, Path(kind): Path<String>) -> Response {
    match Kind::parse(&kind) {
        Some(kind) => {
            let body = Value::Array(read(&state.data).truth(kind)).to_string();
            json_response(StatusCode::OK, body)
        }
        None => json_response(
            StatusCode::NOT_FOUND,
            json!({"message": "unknown kind"}).to_string(),
        ),
    }
}

async fn mutate(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let count = match params.get("count").map(|c| c.parse::<usize>()) {
        None => 1,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"message": "count must be a number"}).to_string(),
            )
        }
    };
    let days = match params.get("days").map(|d| d.parse::<u32>()) {
        None => None,
        Some(Ok(days)) => Some(days),
        Some(Err(_)) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"message": "days must be a number"}).to_string(),
            )
        }
    };
    let kind = match params.get("kind") {
        None => None,
        Some(k) => match ChangeKind::parse(k) {
            Some(ChangeKind::LateTransaction { .. }) => Some(ChangeKind::LateTransaction {
                days: days.unwrap_or(1),
            }),
            Some(ChangeKind::Correction { .. }) => Some(ChangeKind::Correction { days }),
            Some(ChangeKind::Delete { .. }) => Some(ChangeKind::Delete { days }),
            Some(ChangeKind::Malform { .. }) => Some(ChangeKind::Malform { days }),
            Some(kind) => Some(kind),
            None => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"message": format!("unknown kind {k:?}")}).to_string(),
                )
            }
        },
    };
    let changes = state.mutate(count, kind);
    json_response(
        StatusCode::OK,
        serde_json::to_string(&changes).unwrap_or_default(),
    )
}

async fn expire_tokens(State(state): State<Arc<AppState>>) -> Response {
    lock(&state.tokens).clear();
    json_response(StatusCode::OK, "{}".to_owned())
}

async fn stats(State(state): State<Arc<AppState>>) -> Response {
    json_response(StatusCode::OK, state.stats.snapshot().to_string())
}
