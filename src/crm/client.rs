//! The HTTP client of the CRM: login and token reuse, retries, rate limit, paging.
//!
//! One [`CrmClient`] serves every stream of a process (it is a cheap `Clone`): they share the
//! token, so the CRM sees one login; the gate of [`super::pressure`], so
//! `crm.requests_per_second` bounds the process as a whole and at most the adaptive
//! concurrency limit (`crm.max_concurrent_requests`) is in flight, steady-state calls before
//! a backfill's; and the pause of a 429, so a CRM that asks to wait is left alone by every
//! stream, not only by the call it answered.
//!
//! Failure handling, per call:
//! - 401 on a data call: log in again once (only one task logs in; the others reuse its
//!   token) and repeat the call; a second 401 is [`CrmError::Auth`].
//! - 403 on a data call: some CRMs answer an expired token with 403 (`{"message": "Token
//!   expired"}`), so unless the token was issued by this call's own login at most
//!   [`JUST_ISSUED`] (3 s) before the attempt was sent, it is handled as a 401 first: log in
//!   again once (shared as above) and repeat the call. A token fetched by this call that aged
//!   while the call waited out a 429 pause or a backoff counts as old. Only a 403 to a token
//!   just issued, or after the call's one re-login, is [`CrmError::Forbidden`]: a missing
//!   "IB Reports" permission or a module that is off. No retries beyond that one login.
//! - 429: every call of the process waits until the pause ends (the gate grants no slot
//!   before its end, and the calls that waited go out at the rate after it, not as a burst),
//!   then this call is retried.
//!   The pause is `Retry-After` in either RFC 9110 form (delay-seconds, or an HTTP-date in the
//!   IMF-fixdate, RFC 850 or asctime form), capped at [`MAX_RETRY_AFTER`] (one hour: a CRM
//!   asking for more is asked again then). Without a wait in the header (none, unreadable,
//!   `0`, a date now or in the past) the pause is the exponential step of the backoff below
//!   without its jitter (`backoff_initial_ms * 2^(retry-1)`, at most `backoff_max_ms`): a
//!   CRM that limits is never retried in a burst. After `crm.max_retries` retries,
//!   [`CrmError::RateLimited`]. A 503 with `Retry-After` pauses the process the same way
//!   (and is retried as a 5xx).
//! - 5xx, 408, timeouts, connection errors, unreadable answers: retried up to
//!   `crm.max_retries` times with exponential backoff and full jitter, then
//!   [`CrmError::Transient`]. Unreadable answers include an HTTP 2xx that is not the data:
//!   an envelope reporting an error (`"success": false` or `"false"`, `"status": "error"` or
//!   an HTTP error code, a non-empty `error` / `errors` member, … see
//!   [`super::page::envelope_error`]), an HTML page (labelled `text/html` and not starting
//!   like JSON: many servers label their JSON `text/html`, PHP's default, and it is read), a
//!   body that is not JSON or that cannot be decompressed. Such an answer is never an empty
//!   page, so no window completes on it.
//! - A login answer is never quoted in an error, log or stat (it may hold a token under any
//!   name): only its scalar status and message members are (`login_summary`), with every
//!   value found under a credential-like key cut out. Other answers are quoted by their
//!   first 200 bytes.
//! - 403 on login, 400 and other 4xx: not retried ([`CrmError::Auth`],
//!   [`CrmError::BadRequest`]).
//!
//! Bodies are read as real CRMs send them ([`super::page::clean_body`]): gzip is decoded
//! whether `Content-Encoding` says so or only the magic bytes do (ibstream never asks for
//! compression), deflate when labelled, within `crm.max_response_bytes` decompressed; a UTF-8
//! byte-order mark is skipped; a body declared Latin-1 or Windows-1252 (`charset=` of
//! `Content-Type`) that is not UTF-8 is decoded as Windows-1252. A record still holding bytes
//! that are not UTF-8 fails alone (a [`RecordError`], so a dead letter): the page's other
//! records arrive.

use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use chrono_tz::Tz;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use secrecy::SecretString;
use serde_json::json;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::error::{CrmError, ForbiddenKind};
use super::models::{CrmRecord, Endpoint, Server};
use super::page::{parse_page, parse_servers, Page, Record, RecordError};
use super::pressure::Outcome;
use super::stats::CrmStats;
use crate::config::{expose, ConfigError, CrmConfig};

/// The day filter a windowed query uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DateFilter {
    /// `registrationDateFrom/To` (leads, customers): new records.
    Registration,
    /// `lastModifiedDateFrom/To` (leads, customers): changed records.
    LastModified,
    /// `transactionDateFrom/To` (transactions).
    Transaction,
    /// `positionCloseDateFrom/To` (positions).
    PositionClose,
}

impl DateFilter {
    fn params(self) -> (&'static str, &'static str) {
        match self {
            DateFilter::Registration => ("registrationDateFrom", "registrationDateTo"),
            DateFilter::LastModified => ("lastModifiedDateFrom", "lastModifiedDateTo"),
            DateFilter::Transaction => ("transactionDateFrom", "transactionDateTo"),
            DateFilter::PositionClose => ("positionCloseDateFrom", "positionCloseDateTo"),
        }
    }
}

/// Bound of a window's records when the CRM reports no total and nobody set one.
const DEFAULT_MAX_RECORDS: u64 = 50_000;

/// A query of one day window (inclusive days in the CRM's time zone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowQuery {
    /// Which date the window filters on.
    pub filter: DateFilter,
    /// First day, inclusive.
    pub from: NaiveDate,
    /// Last day, inclusive.
    pub to: NaiveDate,
    /// Server tag (positions only).
    pub server_tag: Option<String>,
    /// Ask for fake transactions too (transactions only).
    pub include_fake: bool,
    /// Page size; `None` uses `crm.page_size`.
    pub page_size: Option<u32>,
    /// The most records a window may hold, bounding the pages read when the CRM reports no
    /// `total` (`streams.max_window_records`).
    pub max_records: u64,
    /// Top-level fields left out of the records' fingerprints (`volatile_fields`).
    pub volatile: std::sync::Arc<[String]>,
}

impl WindowQuery {
    /// Returns a query of `filter` over `from..=to` with the other options unset.
    pub fn new(filter: DateFilter, from: NaiveDate, to: NaiveDate) -> Self {
        Self {
            filter,
            from,
            to,
            server_tag: None,
            include_fake: false,
            page_size: None,
            max_records: DEFAULT_MAX_RECORDS,
            volatile: std::sync::Arc::new([]),
        }
    }

    fn params(&self, page: u32, page_size: u32) -> Vec<(&'static str, String)> {
        let (from, to) = self.filter.params();
        let mut params = vec![
            (from, self.from.format("%Y-%m-%d").to_string()),
            (to, self.to.format("%Y-%m-%d").to_string()),
        ];
        if let Some(tag) = &self.server_tag {
            params.push(("serverTag", tag.clone()));
        }
        if self.include_fake {
            params.push(("includeFake", "true".to_owned()));
        }
        params.push(("page", page.to_string()));
        params.push(("pageSize", page_size.to_string()));
        params
    }
}

/// Client of one CRM source; clones share the token and the gate of the rate and the
/// concurrency limit.
#[derive(Clone)]
pub struct CrmClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    api_path: String,
    email: String,
    password: SecretString,
    api_key: SecretString,
    domain: String,
    tz: Tz,
    page_size: u32,
    read_ahead_pages: u32,
    max_response_bytes: u64,
    max_retries: u32,
    backoff_initial: Duration,
    backoff_max: Duration,
    /// The request rate and how many calls may be in flight at once (adaptive,
    /// `crm.max_concurrent_requests`).
    pressure: Arc<super::pressure::Pressure>,
    token: Mutex<TokenState>,
    stats: Arc<CrmStats>,
}

#[derive(Default)]
struct TokenState {
    token: Option<SecretString>,
    /// When the token was issued (its login answered).
    issued: Option<std::time::Instant>,
    /// Bumped at every login, so a task that saw a 401 only drops the token it used.
    generation: u64,
}

/// The token a call uses.
struct Held {
    token: SecretString,
    /// Its generation ([`TokenState::generation`]).
    generation: u64,
    /// When it was issued.
    issued: std::time::Instant,
    /// Whether this call logged in for it.
    own: bool,
}

impl Held {
    /// Whether this call logged in for the token at most [`JUST_ISSUED`] before `sent`.
    fn just_issued(&self, sent: std::time::Instant) -> bool {
        self.own && sent.saturating_duration_since(self.issued) <= JUST_ISSUED
    }
}

/// How recent a token must be, when the attempt answered 403 was sent, for that 403 to mean
/// a missing permission or module: at most this long after its login answered (3 s: the
/// time a call takes from its login to its request, the wait for its turn at the rate
/// included). A 403 to an older token may be an expired token (some CRMs answer one with
/// 403, and a call may wait out a 429 pause of up to [`MAX_RETRY_AFTER`] or a long backoff after its login),
/// so the call logs in again once. Tokens live minutes to hours: a denial taken for an
/// expired token costs one login more, never a loop.
pub const JUST_ISSUED: Duration = Duration::from_secs(3);

/// How many times one call logs in again after 401s to tokens that had aged before the call
/// was sent (each a fresh login); a CRM whose tokens expire faster than a call can wait for
/// its turn ends the call after these with [`CrmError::Auth`].
const MAX_RELOGINS_PER_CALL: u32 = 5;

impl std::fmt::Debug for CrmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrmClient")
            .field("base", &self.inner.base.as_str())
            .field("api_path", &self.inner.api_path)
            .field("email", &self.inner.email)
            .field("domain", &self.inner.domain)
            .field("password", &"[REDACTED]")
            .field("api_key", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

/// What a successful answer is turned into; a failure here counts as a garbled answer.
type Decode<'a, R> = &'a (dyn Fn(&[u8]) -> Result<R, String> + Sync);

impl CrmClient {
    /// Builds a client from a validated config; reads `*_file` secrets (IO), no network.
    pub fn build(config: &CrmConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let secrets = config.resolve_secrets()?;
        let base = Url::parse(&config.base_url).map_err(|e| ConfigError::Invalid {
            key: "crm.base_url",
            reason: format!("is not a URL: {e}"),
        })?;
        let mut builder = crate::net::client_builder();
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|source| ConfigError::SecretFile {
                key: "crm.ca_file",
                path: path.clone(),
                source,
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| ConfigError::Invalid {
                key: "crm.ca_file",
                reason: format!("is not a PEM certificate: {e}"),
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .timeout(Duration::from_secs(config.request_timeout_secs))
            .connect_timeout(Duration::from_secs(config.request_timeout_secs.min(10)))
            .user_agent(concat!("ibstream/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::Invalid {
                key: "crm",
                reason: format!("cannot build the HTTP client: {e}"),
            })?;
        let rps = NonZeroU32::new(config.requests_per_second).ok_or(ConfigError::Invalid {
            key: "crm.requests_per_second",
            reason: "must be at least 1".to_owned(),
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base,
                api_path: config.api_path.clone(),
                email: config.email.clone(),
                password: secrets.password,
                api_key: secrets.api_key,
                domain: config.domain.clone(),
                tz: config.tz()?,
                page_size: config.page_size,
                read_ahead_pages: config.read_ahead_pages,
                max_response_bytes: config.max_response_bytes,
                max_retries: config.max_retries,
                backoff_initial: Duration::from_millis(config.backoff_initial_ms),
                backoff_max: Duration::from_millis(config.backoff_max_ms),
                pressure: Arc::new(super::pressure::Pressure::new(
                    config.max_concurrent_requests,
                    rps.get(),
                )),
                token: Mutex::new(TokenState::default()),
                stats: Arc::default(),
            }),
        })
    }

    /// Returns the client's counters (requests, durations, retries, logins, health).
    pub fn stats(&self) -> Arc<CrmStats> {
        self.inner.stats.clone()
    }

    /// Returns the adaptive concurrency limit of the process's calls (for the metrics).
    pub fn pressure(&self) -> Arc<super::pressure::Pressure> {
        self.inner.pressure.clone()
    }

    /// Returns the CRM's time zone.
    pub fn tz(&self) -> Tz {
        self.inner.tz
    }

    /// Logs in now if no token is held (the token is otherwise fetched lazily).
    pub async fn login(&self) -> Result<(), CrmError> {
        self.token().await.map(drop)
    }

    /// Returns the servers list, each server read on its own (`volatile` fields left out of
    /// their fingerprints).
    pub async fn servers(
        &self,
        volatile: &[String],
    ) -> Result<Vec<Result<Record<Server>, RecordError>>, CrmError> {
        let tz = self.inner.tz;
        // In the foreground class: a stream's steady-state list, never behind a backfill.
        super::pressure::in_foreground(self.get(Endpoint::Servers, &[], &|body| {
            parse_servers::<Server>(body, tz, volatile)
        }))
        .await
    }

    /// Returns page `page` (1-based) of a window query.
    pub async fn page<T: CrmRecord>(
        &self,
        query: &WindowQuery,
        page: u32,
    ) -> Result<Page<T>, CrmError> {
        let page_size = query.page_size.unwrap_or(self.inner.page_size);
        let tz = self.inner.tz;
        let params = query.params(page, page_size);
        self.get(T::ENDPOINT, &params, &|body| {
            parse_page::<T>(body, page, page_size, tz, &query.volatile)
        })
        .await
    }

    /// Returns an iterator over every page of a window query.
    pub fn pages<T: CrmRecord>(&self, query: WindowQuery) -> PageIter<T> {
        self.pages_as(query, false)
    }

    /// Returns an iterator over every page of a window query, read in the background class
    /// of the concurrency limit (a backfill's windows read at once, a reconciliation sweep:
    /// see [`super::pressure`]), ranked by the window's first day: the oldest days of every
    /// stream go first, so the streams' backfills move through time together and end
    /// together, instead of one stream's last windows waiting behind the others'. Pages are
    /// read ahead (up to `crm.read_ahead_pages` requests of a window at once) unless it is 0,
    /// so windows read at once keep requests going while the poller works on another's page;
    /// with 0 (windows are then read one at a time) each page is asked for when the caller
    /// asks for it.
    pub fn pages_in_background<T: CrmRecord>(&self, query: WindowQuery) -> PageIter<T> {
        self.pages_as(query, true)
    }

    /// Whether pages are read ahead (`crm.read_ahead_pages` above 0): windows can then be
    /// read at once.
    pub fn reads_ahead(&self) -> bool {
        self.inner.read_ahead_pages > 0
    }

    fn pages_as<T: CrmRecord>(&self, mut query: WindowQuery, background: bool) -> PageIter<T> {
        // Rank 0 is a read's next pages (see `Pager::next`); first pages from 1, by day.
        let rank = background.then(|| {
            let day = query.from.signed_duration_since(NaiveDate::default());
            u64::try_from(day.num_days()).unwrap_or(0) + 1
        });
        query.page_size = Some(query.page_size.unwrap_or(self.inner.page_size));
        let pager = Pager {
            client: self.clone(),
            query,
            next_page: 1,
            last_page: None,
            max_pages: None,
            fetched: 0,
            ids: std::collections::HashSet::new(),
            unread: Arc::default(),
            short_first: false,
            done: false,
            prefetched: std::collections::BTreeMap::new(),
            _model: std::marker::PhantomData,
        };
        PageIter::new(pager, self.inner.read_ahead_pages, rank)
    }

    /// Calls an endpoint with arbitrary query parameters and returns the raw body (for
    /// diagnostics and tests of the error classes).
    pub async fn get_raw(
        &self,
        endpoint: Endpoint,
        params: &[(&'static str, String)],
    ) -> Result<Vec<u8>, CrmError> {
        self.get(endpoint, params, &|body| Ok(body.to_vec())).await
    }

    /// Returns the URL of a data endpoint (`…/api/v1/<api_path>/<segment>`).
    fn endpoint_url(&self, endpoint: Endpoint) -> String {
        self.url(&format!(
            "{}/{}",
            self.inner.api_path,
            endpoint.path_segment()
        ))
    }

    fn url(&self, tail: &str) -> String {
        let base = self.inner.base.as_str().trim_end_matches('/');
        format!("{base}/api/v1/{tail}")
    }

    async fn get<R>(
        &self,
        endpoint: Endpoint,
        params: &[(&'static str, String)],
        decode: Decode<'_, R>,
    ) -> Result<R, CrmError> {
        let result = self.get_with_login(endpoint, params, decode).await;
        // The CRM answered unless the call failed for want of an answer (or of a login): a
        // 403 or 400 is the CRM answering.
        self.inner.stats.outcome(match &result {
            Err(
                e @ (CrmError::Transient { .. }
                | CrmError::RateLimited { .. }
                | CrmError::Auth { .. }),
            ) => Some(e.to_string()),
            _ => None,
        });
        result
    }

    async fn get_with_login<R>(
        &self,
        endpoint: Endpoint,
        params: &[(&'static str, String)],
        decode: Decode<'_, R>,
    ) -> Result<R, CrmError> {
        let url = self.endpoint_url(endpoint);
        let mut relogged = false;
        let mut relogins = 0;
        loop {
            let held = self.token().await?;
            let (token, generation) = (&held.token, held.generation);
            let result = self
                .send(
                    endpoint.path_segment(),
                    Method::GET,
                    &url,
                    params,
                    None,
                    Some(token),
                    decode,
                )
                .await;
            match result {
                Ok(value) => return Ok(value),
                // A 401 to a token this call did not just log in for (another call's, or one
                // that aged while the call waited its turn at the gate, a 429 pause or a
                // backoff: the token may have expired meanwhile) means log in again; only a
                // 401 to a token this call's own login issued at most JUST_ISSUED before
                // the attempt was sent is the API key's fault. Bounded: a CRM whose tokens
                // expire before any call can use them still ends the call.
                Err(Failure::Unauthorized { message, sent })
                    if !relogged
                        || (!held.just_issued(sent) && relogins < MAX_RELOGINS_PER_CALL) =>
                {
                    info!(
                        endpoint = endpoint.path_segment(),
                        token_age_ms = sent.saturating_duration_since(held.issued).as_millis() as u64,
                        "crm token rejected, logging in again"
                    );
                    debug!(message = %message, "crm 401 answer");
                    self.drop_token(generation).await;
                    relogged = true;
                    relogins += 1;
                }
                Err(Failure::Unauthorized { message, .. }) => {
                    return Err(CrmError::Auth {
                        url,
                        reason: format!(
                            "HTTP 401 right after a fresh login ({message}); check that the API key (crm.api_key) is valid and belongs to crm.domain"
                        ),
                    })
                }
                Err(Failure::Forbidden { message, sent })
                    if !relogged && !held.just_issued(sent) =>
                {
                    // Some CRMs answer an expired token with 403, not 401: only a 403 to a
                    // token this call just logged in for means a missing permission or
                    // module. Another call's token, or one that aged while this call waited
                    // (a 429 pause, a backoff), may have expired.
                    info!(
                        endpoint = endpoint.path_segment(),
                        token_age_ms = sent.saturating_duration_since(held.issued).as_millis() as u64,
                        "crm answered 403 to a token that may have expired, logging in again before taking it as a missing permission"
                    );
                    debug!(message = %message, "crm 403 answer");
                    self.drop_token(generation).await;
                    relogged = true;
                }
                Err(Failure::Forbidden { message, .. }) => {
                    return Err(CrmError::Forbidden {
                        endpoint: endpoint.path_segment().to_owned(),
                        module: endpoint.module(),
                        kind: ForbiddenKind::from_message(&message),
                        message,
                    })
                }
                Err(Failure::Error(e)) => return Err(e),
            }
        }
    }

    /// Returns the token, logging in first if none is held.
    async fn token(&self) -> Result<Held, CrmError> {
        // Held across the login call: concurrent streams wait for one login instead of
        // each logging in.
        let mut state = self.inner.token.lock().await;
        if let (Some(token), Some(issued)) = (&state.token, state.issued) {
            return Ok(Held {
                token: token.clone(),
                generation: state.generation,
                issued,
                own: false,
            });
        }
        // In the foreground class of the gate even for a backfill's call: every call of the
        // process waits for the token mutex held here, steady-state cycles included.
        let token = match super::pressure::in_foreground(self.login_call()).await {
            Ok(token) => token,
            Err(e) => {
                self.inner.stats.outcome(Some(e.to_string()));
                return Err(e);
            }
        };
        self.inner.stats.logins.fetch_add(1, Ordering::Relaxed);
        let issued = std::time::Instant::now();
        state.generation += 1;
        state.token = Some(token.clone());
        state.issued = Some(issued);
        info!(generation = state.generation, "crm login succeeded");
        Ok(Held {
            token,
            generation: state.generation,
            issued,
            own: true,
        })
    }

    async fn drop_token(&self, generation: u64) {
        let mut state = self.inner.token.lock().await;
        if state.generation == generation {
            state.token = None;
        }
    }

    async fn login_call(&self) -> Result<SecretString, CrmError> {
        let url = self.url("auth/login");
        let body = json!({
            "email": self.inner.email,
            "password": expose(&self.inner.password),
            "rememberMe": true,
        })
        .to_string();
        let decode = |body: &[u8]| -> Result<SecretString, String> {
            let value: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| format!("login answer is not JSON: {e}"))?;
            match value.get("token").and_then(|t| t.as_str()) {
                Some(token) if !token.is_empty() => Ok(SecretString::from(token.to_owned())),
                // Only the scalar status and message members are shown, token-like values
                // cut out of them: the rest may hold a token under another name.
                _ => {
                    let reports_error = value
                        .as_object()
                        .and_then(super::page::object_error)
                        .is_some();
                    Err(match (reports_error, login_summary(&value)) {
                        (true, Some(summary)) => format!(
                            "login answer has no token: the answer reports an error though its HTTP status is a success ({summary})"
                        ),
                        (false, Some(summary)) => {
                            format!("login answer has no token ({summary})")
                        }
                        (_, None) => "login answer has no token".to_owned(),
                    })
                }
            }
        };
        match self
            .send(LOGIN, Method::POST, &url, &[], Some(body), None, &decode)
            .await
        {
            Ok(token) => Ok(token),
            Err(Failure::Unauthorized { message, .. } | Failure::Forbidden { message, .. }) => Err(CrmError::Auth {
                url,
                reason: format!(
                    "login rejected ({message}); check crm.email and crm.password, that the user verified its email, that its role has \"IB Reports\", and that the API key (crm.api_key, crm.domain) has not expired"
                ),
            }),
            Err(Failure::Error(e)) => Err(e),
        }
    }

    /// Sends one request with retries; returns the decoded answer or how it failed.
    #[allow(clippy::too_many_arguments)]
    async fn send<R>(
        &self,
        endpoint: &'static str,
        method: Method,
        url: &str,
        params: &[(&'static str, String)],
        body: Option<String>,
        token: Option<&SecretString>,
        decode: Decode<'_, R>,
    ) -> Result<R, Failure> {
        let inner = &self.inner;
        let display_url = display_url(url, params);
        // A login answer may hold credentials anywhere: its body is never quoted.
        let secret = endpoint == LOGIN;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            // The rate's turn and a slot (never during a 429's pause), held until the answer is
            // read (or the retry's wait starts): it bounds the calls in flight, and its outcome
            // steers the limit.
            let mut slot = inner.pressure.acquire().await;
            let mut request = inner
                .http
                .request(method.clone(), url)
                .query(params)
                .headers(self.headers(token));
            if let Some(body) = &body {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let sent = std::time::Instant::now();
            let response = request.send().await;
            inner.stats.request(
                endpoint,
                response.as_ref().ok().map(|r| r.status().as_u16()),
                sent.elapsed(),
            );
            slot.set(match &response {
                Err(_) => Outcome::Overloaded,
                Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => Outcome::Overloaded,
                Ok(r) if r.status().is_server_error() => Outcome::Overloaded,
                Ok(r) if r.status().is_success() => Outcome::Answered(sent.elapsed()),
                Ok(_) => Outcome::Neutral,
            });
            let outcome = match response {
                Err(e) => Retry::Transient(describe_reqwest_error(&e)),
                Ok(response) if response.status().is_redirection() => {
                    return Err(Failure::Error(CrmError::Unusable {
                        url: display_url,
                        message: crate::net::redirect_message(&response),
                    }))
                }
                Ok(response) => {
                    let status = response.status();
                    let retry_after = parse_retry_after(response.headers());
                    let html = is_html(response.headers());
                    let content_type = response
                        .headers()
                        .get(CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let encoding = response
                        .headers()
                        .get(reqwest::header::CONTENT_ENCODING)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let body = crate::net::read_body(
                        response,
                        inner.max_response_bytes,
                        "crm.max_response_bytes",
                    )
                    .await
                    .map(|bytes| {
                        let limit = inner.max_response_bytes;
                        if status.is_success() {
                            super::page::clean_body(bytes, encoding.as_deref(), limit).map(|body| {
                                super::page::decode_declared_charset(body, content_type.as_deref())
                            })
                        } else {
                            // An error answer only feeds a message: as received if need be.
                            Ok(
                                super::page::clean_body(bytes.clone(), encoding.as_deref(), limit)
                                    .unwrap_or(bytes),
                            )
                        }
                    });
                    match body {
                        Err(crate::net::BodyError::Read(e)) => Retry::Transient(format!(
                            "reading the answer failed: {}",
                            describe_reqwest_error(&e)
                        )),
                        Err(e @ crate::net::BodyError::TooLarge { .. }) => {
                            return Err(Failure::Error(CrmError::Unusable {
                                url: display_url,
                                message: e.to_string(),
                            }))
                        }
                        Ok(Err(super::page::BodyError::TooLarge(message))) => {
                            return Err(Failure::Error(CrmError::Unusable {
                                url: display_url,
                                message: format!("{message} (crm.max_response_bytes)"),
                            }))
                        }
                        Ok(Err(super::page::BodyError::Garbled(message))) => {
                            inner.stats.error_answers.fetch_add(1, Ordering::Relaxed);
                            Retry::Transient(format!("unreadable answer: {message}"))
                        }
                        Ok(Ok(bytes)) => match classify(status, &bytes, secret) {
                            // Many servers label their JSON `text/html` (PHP's default): the
                            // label alone does not make a page.
                            Class::Ok if html && !starts_like_json(&bytes) => {
                                inner.stats.error_answers.fetch_add(1, Ordering::Relaxed);
                                Retry::Transient(format!(
                                    "HTTP {} with an HTML page instead of JSON (a proxy's or a maintenance page?){}",
                                    status.as_u16(),
                                    if secret {
                                        String::new()
                                    } else {
                                        format!(": {}", snippet(&bytes))
                                    }
                                ))
                            }
                            Class::Ok => match decode(&bytes) {
                                Ok(value) => return Ok(value),
                                Err(reason) => {
                                    inner.stats.error_answers.fetch_add(1, Ordering::Relaxed);
                                    Retry::Transient(format!("unusable answer: {reason}"))
                                }
                            },
                            Class::Unauthorized(message) => {
                                return Err(Failure::Unauthorized { message, sent })
                            }
                            Class::Forbidden(message) => {
                                return Err(Failure::Forbidden { message, sent })
                            }
                            Class::Fatal(m) => {
                                return Err(Failure::Error(CrmError::BadRequest {
                                    url: display_url,
                                    status: status.as_u16(),
                                    message: m,
                                }))
                            }
                            Class::RateLimited => Retry::RateLimited(retry_after),
                            Class::Transient(m) => {
                                // A 503 with Retry-After: the CRM is down for everyone that long.
                                if let (503, Some(after)) = (status.as_u16(), retry_after) {
                                    self.pause(after);
                                }
                                Retry::Transient(m)
                            }
                        },
                    }
                }
            };
            // The wait of a 429: its Retry-After when that asks for one; without one (absent,
            // unreadable, 0 or a date not in the future) at least the exponential step, so a
            // CRM that limits is never retried in a burst.
            let rate_limit_wait = match &outcome {
                Retry::RateLimited(retry_after) => Some(
                    retry_after
                        .filter(|after| !after.is_zero())
                        .unwrap_or_else(|| {
                            backoff_step(attempt, inner.backoff_initial, inner.backoff_max)
                        }),
                ),
                Retry::Transient(_) => None,
            };
            if let Some(pause) = rate_limit_wait {
                // The CRM limits the process, not this call: every call waits. Set before the
                // slot goes back, so the gate grants it to no one before the pause's end.
                self.pause(pause);
                inner.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            }
            drop(slot);
            if attempt > inner.max_retries {
                return Err(Failure::Error(match outcome {
                    Retry::RateLimited(retry_after) => CrmError::RateLimited {
                        url: display_url,
                        attempts: attempt,
                        retry_after,
                    },
                    Retry::Transient(message) => CrmError::Transient {
                        url: display_url,
                        attempts: attempt,
                        message,
                    },
                }));
            }
            inner.stats.retries.fetch_add(1, Ordering::Relaxed);
            let delay = match rate_limit_wait {
                Some(wait) => wait + jitter(inner.backoff_initial),
                None => backoff(attempt, inner.backoff_initial, inner.backoff_max),
            };
            match &outcome {
                Retry::RateLimited(retry_after) => warn!(
                    url = %display_url,
                    attempt,
                    retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
                    delay_ms = delay.as_millis() as u64,
                    "crm rate limit hit, waiting"
                ),
                Retry::Transient(message) => warn!(
                    url = %display_url,
                    attempt,
                    delay_ms = delay.as_millis() as u64,
                    error = %message,
                    "crm request failed, retrying"
                ),
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Makes every call of the process wait `pause` from now (a longer pause already set
    /// stands): the gate grants nothing before its end (see [`super::pressure`]).
    fn pause(&self, pause: Duration) {
        self.inner.pressure.pause(pause);
    }

    fn headers(&self, token: Option<&SecretString>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let mut secret_header = |name: &'static str, value: &str| {
            if let Ok(mut value) = HeaderValue::from_str(value) {
                value.set_sensitive(true);
                headers.insert(name, value);
            }
        };
        secret_header("X-Api-Key", expose(&self.inner.api_key));
        if let Some(token) = token {
            secret_header("X-Auth-Token", expose(token));
        }
        if let Ok(domain) = HeaderValue::from_str(&self.inner.domain) {
            headers.insert("X-DOMAIN", domain);
        }
        headers
    }
}

/// How one request failed, before retries are decided on.
enum Failure {
    /// A 401, and when the attempt answered so was sent.
    Unauthorized {
        message: String,
        sent: std::time::Instant,
    },
    /// A 403, and when the attempt answered so was sent.
    Forbidden {
        message: String,
        sent: std::time::Instant,
    },
    Error(CrmError),
}

enum Retry {
    RateLimited(Option<Duration>),
    Transient(String),
}

enum Class {
    Ok,
    Unauthorized(String),
    Forbidden(String),
    Fatal(String),
    RateLimited,
    Transient(String),
}

/// The `endpoint` label of the login call.
const LOGIN: &str = "login";

/// Sorts an answer by its status; `secret` (a login answer) quotes none of its body, only
/// [`login_summary`].
fn classify(status: StatusCode, body: &[u8], secret: bool) -> Class {
    let message = || {
        if secret {
            serde_json::from_slice(body)
                .ok()
                .and_then(|value| login_summary(&value))
                .unwrap_or_else(|| {
                    "its body is not shown: a login answer may hold credentials".to_owned()
                })
        } else {
            snippet(body)
        }
    };
    match status.as_u16() {
        200..=299 => Class::Ok,
        401 => Class::Unauthorized(message()),
        403 => Class::Forbidden(message()),
        429 => Class::RateLimited,
        408 | 500..=599 => Class::Transient(format!("HTTP {}: {}", status.as_u16(), message())),
        _ => Class::Fatal(message()),
    }
}

/// Returns whether an answer says it is an HTML page (`text/html`, `application/xhtml+xml`):
/// never the CRM's JSON, whatever its status.
fn is_html(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let mime = v.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case("text/html")
                || mime.eq_ignore_ascii_case("application/xhtml+xml")
        })
}

/// Returns whether a body starts like JSON (`{` or `[` after whitespace and a byte-order
/// mark): such a body is read as JSON whatever its `Content-Type` says.
fn starts_like_json(body: &[u8]) -> bool {
    super::page::first_significant_byte(body).is_some_and(|b| matches!(b, b'{' | b'['))
}

/// Members of a login answer that may be quoted in an error (compared ignoring case), when
/// their value is a string, number or boolean; of an `error` object, its own members of
/// these names.
const LOGIN_SHOWN: [&str; 10] = [
    "success",
    "status",
    "statusCode",
    "code",
    "error",
    "errorCode",
    "errorMessage",
    "error_description",
    "message",
    "detail",
];

/// Parts of key names under which a login answer may hold a credential (compared in lower
/// case): their string values are cut out of anything shown.
const SECRET_KEY_PARTS: [&str; 10] = [
    "token", "secret", "password", "passwd", "session", "jwt", "bearer", "cookie", "key", "auth",
];

/// What a login answer says, for errors: its [`LOGIN_SHOWN`] members as `key: value`
/// (at most 200 characters each), every value found under a credential-like key
/// ([`SECRET_KEY_PARTS`]) replaced by `[redacted]`. `None` when it says nothing of these.
fn login_summary(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    fn secrets(value: &Value, under_secret: bool, out: &mut Vec<String>) {
        match value {
            Value::String(s) if under_secret && s.len() >= 8 => out.push(s.clone()),
            Value::Number(n) if under_secret && n.to_string().len() >= 8 => out.push(n.to_string()),
            Value::Array(items) => items
                .iter()
                .for_each(|item| secrets(item, under_secret, out)),
            Value::Object(map) => map.iter().for_each(|(k, v)| {
                let k = k.to_ascii_lowercase();
                let secret = under_secret || SECRET_KEY_PARTS.iter().any(|p| k.contains(p));
                secrets(v, secret, out);
            }),
            _ => {}
        }
    }
    fn shown(map: &serde_json::Map<String, Value>, prefix: &str, out: &mut Vec<String>) {
        for (key, value) in map {
            if !LOGIN_SHOWN.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                continue;
            }
            match value {
                Value::String(s) => out.push(format!("{prefix}{key}: {s}")),
                Value::Number(_) | Value::Bool(_) => out.push(format!("{prefix}{key}: {value}")),
                Value::Object(inner) if prefix.is_empty() => shown(inner, &format!("{key}."), out),
                _ => {}
            }
        }
    }
    let map = value.as_object()?;
    let mut parts = Vec::new();
    shown(map, "", &mut parts);
    if parts.is_empty() {
        return None;
    }
    let mut cut = Vec::new();
    secrets(value, false, &mut cut);
    // Longest first, so a secret holding another is cut whole.
    cut.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let text = parts
        .into_iter()
        .map(|part| {
            let part = cut.iter().fold(part, |part, secret| {
                part.replace(secret.as_str(), "[redacted]")
            });
            let mut line: String = part
                .chars()
                .take(200)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            if part.chars().nth(200).is_some() {
                line.push('…');
            }
            line
        })
        .collect::<Vec<_>>()
        .join("; ");
    Some(text)
}

/// Returns the start of an answer body for error messages, on one line.
fn snippet(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if body.len() > MAX {
        line.push('…');
    }
    if line.trim().is_empty() {
        "(empty answer)".to_owned()
    } else {
        line
    }
}

fn display_url(url: &str, params: &[(&'static str, String)]) -> String {
    if params.is_empty() {
        return url.to_owned();
    }
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{url}?{}", query.join("&"))
}

fn describe_reqwest_error(error: &reqwest::Error) -> String {
    // reqwest's Display names the URL; the source chain says what actually happened.
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if text.contains("certificate") {
        text.push_str(
            " (if the CRM's certificate is signed by a private CA, set crm.ca_file to that CA)",
        );
    }
    text
}

/// The longest `Retry-After` waited: a CRM asking for more (a daily quota spent) is asked
/// again after an hour.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Parses `Retry-After` in both RFC 9110 forms (section 10.2.3): delay-seconds (`120`;
/// fractions accepted) or an HTTP-date (IMF-fixdate `Mon, 30 Nov 2026 19:02:00 GMT`, and the
/// obsolete RFC 850 and asctime forms). A date in the past is a wait of zero (the caller
/// then backs off as without the header); any wait is capped at [`MAX_RETRY_AFTER`]. `None`
/// when absent or unreadable (the caller backs off instead).
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    retry_after_at(value, std::time::SystemTime::now())
}

/// The wait a `Retry-After` value asks for when received at `now`.
fn retry_after_at(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let wait = match value.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64()))
        }
        Ok(_) => return None,
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Exponential backoff with full jitter: uniform in `0..=`[`backoff_step`].
fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    jitter(backoff_step(attempt, initial, max))
}

/// The exponential step of retry `attempt` (1-based): `min(max, initial * 2^(attempt-1))`.
fn backoff_step(attempt: u32, initial: Duration, max: Duration) -> Duration {
    initial
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max)
}

fn jitter(bound: Duration) -> Duration {
    let millis = bound.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(fastrand::u64(0..=millis))
}

/// Pages of one window query, in order: read by a [`Pager`], on demand or by a task of its
/// own up to `crm.read_ahead_pages` ahead of the caller (in the background class, a window's
/// next pages asked for at once, each waiting its turn at the CRM gate). With
/// `crm.read_ahead_pages = 0` every page is read on demand, in the background class too (a
/// sweep): no page is asked for before the caller asks for it. A window whose first page
/// reports more than `max_records` is not read ahead: its reader splits it instead of
/// reading on. Dropping the iterator stops the task.
pub struct PageIter<T: CrmRecord> {
    source: Source<T>,
    /// The read sequences of its pages asked for and not yet handed out.
    unread: Arc<Unread>,
    /// A page (or the end: `Some(None)`) received by [`PageIter::poll_wait`], not yet taken.
    peeked: Option<Option<Result<Page<T>, CrmError>>>,
    /// Whether the page being waited for was asked for already (a wait that was left).
    asked_ahead: bool,
}

enum Source<T: CrmRecord> {
    /// Read on demand; in the background class of the CRM gate at the rank, if any.
    Direct(Pager<T>, Option<u64>),
    Ahead {
        pages: tokio::sync::mpsc::Receiver<Result<Page<T>, CrmError>>,
        asked: Arc<Asked>,
        task: tokio::task::JoinHandle<()>,
    },
}

/// The read sequences ([`super::page::next_read_seq`]) of a [`PageIter`]'s requests sent (or
/// about to be) whose pages it has not handed to its caller yet: a page read ahead, one in
/// flight, one waiting at the gate. A window's sequences grow page by page, and pages are
/// handed out in order.
#[derive(Default)]
struct Unread(std::sync::Mutex<std::collections::BTreeSet<u64>>);

impl Unread {
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the read sequence of a request about to be sent, counted unread. Taken under
    /// the lock, so [`PageIter::oldest_unread`] never misses a sequence already taken.
    fn take(&self) -> u64 {
        let mut set = self.set();
        let sent = super::page::next_read_seq();
        set.insert(sent);
        sent
    }

    /// Notes what was handed out: a page requested at `sent` (the sequences before it were of
    /// pages the pager did not pass on, or of requests given up), or the end (`None`).
    fn handed(&self, sent: Option<u64>) {
        let mut set = self.set();
        match sent {
            Some(sent) => *set = set.split_off(&(sent + 1)),
            None => set.clear(),
        }
    }
}

/// Pages the caller of a [`PageIter`] asked for, and a wake-up for its task when it waits
/// for one.
#[derive(Default)]
struct Asked {
    pages: std::sync::atomic::AtomicU64,
    wake: tokio::sync::Notify,
}

impl<T: CrmRecord> Drop for PageIter<T> {
    fn drop(&mut self) {
        if let Source::Ahead { task, .. } = &self.source {
            task.abort();
        }
    }
}

impl<T: CrmRecord> PageIter<T> {
    fn new(pager: Pager<T>, read_ahead: u32, background: Option<u64>) -> Self {
        let unread = pager.unread.clone();
        if read_ahead == 0 {
            return PageIter {
                source: Source::Direct(pager, background),
                unread,
                peeked: None,
                asked_ahead: false,
            };
        }
        let (tx, pages) = tokio::sync::mpsc::channel(read_ahead as usize);
        let asked = Arc::new(Asked::default());
        let task = match background {
            Some(rank) => tokio::spawn(super::pressure::in_background(
                rank,
                read_ahead_task(pager, tx, asked.clone()),
            )),
            None => tokio::spawn(read_ahead_task(pager, tx, asked.clone())),
        };
        PageIter {
            source: Source::Ahead { pages, asked, task },
            unread,
            peeked: None,
            asked_ahead: false,
        }
    }

    /// Returns the oldest read sequence ([`super::page::next_read_seq`]) of the pages asked
    /// for and not handed out yet; `None` when there is none (every page asked for later
    /// takes a sequence above all taken so far). A reader that remembers reads by sequence
    /// to skip older pages' records can forget those older than every iterator's oldest.
    pub fn oldest_unread(&self) -> Option<u64> {
        self.unread.set().first().copied()
    }

    /// Notes a page (or the end) handed to the caller, and passes it on.
    fn hand(&self, page: Option<Result<Page<T>, CrmError>>) -> Option<Result<Page<T>, CrmError>> {
        match &page {
            Some(Ok(page)) => self.unread.handed(Some(page.sent)),
            // After an error the pager reads no more.
            Some(Err(_)) | None => self.unread.handed(None),
        }
        page
    }

    /// Returns the next page, `None` after the last one or after an error.
    pub async fn next(&mut self) -> Option<Result<Page<T>, CrmError>> {
        let page = self.next_page().await;
        self.hand(page)
    }

    async fn next_page(&mut self) -> Option<Result<Page<T>, CrmError>> {
        if let Some(page) = self.peeked.take() {
            return page;
        }
        match &mut self.source {
            Source::Direct(pager, None) => pager.next().await,
            Source::Direct(pager, Some(rank)) => {
                super::pressure::in_background(*rank, pager.next()).await
            }
            Source::Ahead { pages, asked, .. } => {
                if !std::mem::take(&mut self.asked_ahead) {
                    asked.pages.fetch_add(1, Ordering::AcqRel);
                    asked.wake.notify_one();
                }
                pages.recv().await
            }
        }
    }

    /// Returns the next page if it has been fetched already, without waiting.
    pub fn ready(&mut self) -> Option<Result<Page<T>, CrmError>> {
        let page = self.ready_page()?;
        self.hand(Some(page))
    }

    fn ready_page(&mut self) -> Option<Result<Page<T>, CrmError>> {
        if matches!(self.peeked, Some(Some(_))) {
            return self.peeked.take().flatten();
        }
        match &mut self.source {
            Source::Direct(..) => None,
            Source::Ahead { pages, asked, .. } => {
                if self.peeked.is_some() {
                    return None;
                }
                let page = pages.try_recv().ok()?;
                if !std::mem::take(&mut self.asked_ahead) {
                    asked.pages.fetch_add(1, Ordering::AcqRel);
                }
                Some(page)
            }
        }
    }

    /// Polls for the next page (or the end) to have arrived, keeping it for
    /// [`PageIter::next`]; ready at once without a read-ahead task (the next page is then
    /// read when asked for). Lets a poller wait for whichever of several windows answers
    /// first.
    pub fn poll_wait(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.peeked.is_some() {
            return std::task::Poll::Ready(());
        }
        match &mut self.source {
            Source::Direct(..) => std::task::Poll::Ready(()),
            Source::Ahead { pages, asked, .. } => {
                if !self.asked_ahead {
                    self.asked_ahead = true;
                    asked.pages.fetch_add(1, Ordering::AcqRel);
                    asked.wake.notify_one();
                }
                match pages.poll_recv(cx) {
                    std::task::Poll::Ready(page) => {
                        self.asked_ahead = false;
                        self.peeked = Some(page);
                        std::task::Poll::Ready(())
                    }
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            }
        }
    }
}

/// Reads `pager`'s pages into `tx` (its capacity bounds the read-ahead); after a first page
/// above the window's `max_records`, waits until the caller asks for a second one (it
/// usually splits the window and drops the iterator instead).
async fn read_ahead_task<T: CrmRecord>(
    mut pager: Pager<T>,
    tx: tokio::sync::mpsc::Sender<Result<Page<T>, CrmError>>,
    asked: Arc<Asked>,
) {
    while let Some(page) = pager.next().await {
        let oversized = pager.fetched == 1
            && matches!(&page, Ok(page) if page.total.is_some_and(|t| t > pager.query.max_records));
        if tx.send(page).await.is_err() {
            return;
        }
        while oversized && asked.pages.load(Ordering::Acquire) < 2 {
            asked.wake.notified().await;
        }
    }
}

/// Reads the pages of one window query one after the other.
///
/// - With a `total`: stops after page `ceil(total / pageSize)` (a total that grows while
///   paging extends it). A first page shorter than asked that is not the whole result (a CRM
///   capping the page size) switches to the length the CRM actually serves, so no record is
///   skipped. Empty pages before the last are passed on: records may have moved between pages.
/// - Without a `total`: goes on while pages are full and bring ids not seen before; stops at
///   an empty page, or a short page after a full one. A short first page is the end only
///   when the next page, asked at the length the first one served, is empty or repeats it
///   (neither is passed on: the read is that one page); new ids there mean a CRM capping the
///   page size, paged on by the length it serves. This costs every window that fits in one
///   page one more request. A full page of ids all seen before (a CRM ignoring `page`) is
///   [`CrmError::Paging`]: the window cannot be read whole.
/// - Bounded either way: at most `ceil(first total / pageSize)` pages plus a quarter (at least
///   2) more, or `max_records / pageSize + 1` without a total; past it, [`CrmError::Paging`].
struct Pager<T: CrmRecord> {
    client: CrmClient,
    query: WindowQuery,
    next_page: u32,
    last_page: Option<u64>,
    max_pages: Option<u64>,
    fetched: u64,
    /// Hashes of the ids seen (only while the CRM reports no total).
    ids: std::collections::HashSet<u64>,
    /// Its requests' read sequences, until their pages are handed out (shared with its
    /// [`PageIter`]).
    unread: Arc<Unread>,
    /// Whether the first page was shorter than asked while the CRM reports no total.
    short_first: bool,
    done: bool,
    /// In the background, with a `total`: pages after the one in hand already asked for (at
    /// most `crm.read_ahead_pages`; none when it is 0), by number, with the read sequence taken when
    /// each was sent. They are taken in order as if fetched then, so every rule above holds;
    /// a window's pages go out at once instead of one round trip after the other.
    prefetched: std::collections::BTreeMap<u32, Prefetched<T>>,
    _model: std::marker::PhantomData<fn() -> T>,
}

/// A page asked for ahead: its read sequence and its request.
type Prefetched<T> = (u64, tokio::task::JoinHandle<Result<Page<T>, CrmError>>);

impl<T: CrmRecord> Drop for Pager<T> {
    fn drop(&mut self) {
        for (_, (_, request)) in std::mem::take(&mut self.prefetched) {
            request.abort();
        }
    }
}

impl<T: CrmRecord> Pager<T> {
    /// Asks for the pages after `page_number` up to the last one (by the total), at most
    /// `crm.read_ahead_pages` ahead (none when it is 0: the caller asks for every page), each
    /// in the background class before any first page (rank 0). Only in the background (a
    /// backfill, a sweep).
    fn prefetch(&mut self, page_number: u32) {
        let ahead = self.client.inner.read_ahead_pages;
        if self.done || ahead == 0 || super::pressure::background_rank().is_none() {
            return;
        }
        let Some(last) = self.last_page else {
            return;
        };
        let until = u64::from(page_number.saturating_add(ahead)).min(last);
        for number in (page_number + 1)..=(until as u32) {
            if self.prefetched.contains_key(&number) {
                continue;
            }
            let (client, query) = (self.client.clone(), self.query.clone());
            let sent = self.unread.take();
            let request = tokio::spawn(super::pressure::in_background(0, async move {
                client.page::<T>(&query, number).await
            }));
            self.prefetched.insert(number, (sent, request));
        }
    }

    /// Returns the page size asked for now (it shrinks to a CRM's cap).
    fn page_size(&self) -> u32 {
        self.query.page_size.unwrap_or(1).max(1)
    }

    /// Returns the next page, `None` after the last one or after an error.
    async fn next(&mut self) -> Option<Result<Page<T>, CrmError>> {
        if self.done {
            return None;
        }
        if let Some(max) = self.max_pages.filter(|max| self.fetched >= *max) {
            self.done = true;
            let url = self.client.endpoint_url(T::ENDPOINT);
            return Some(Err(CrmError::Paging {
                url: display_url(&url, &self.query.params(1, self.page_size())),
                reason: format!(
                    "read {max} pages, the bound of this window, and the CRM still reports more (its total keeps growing, or its pages never run short)"
                ),
            }));
        }
        let page_number = self.next_page;
        let (sent, answer) = match self.prefetched.remove(&page_number) {
            Some((sent, request)) => (
                sent,
                request.await.unwrap_or_else(|e| {
                    Err(CrmError::Transient {
                        url: display_url(
                            &self.client.endpoint_url(T::ENDPOINT),
                            &self.query.params(page_number, self.page_size()),
                        ),
                        attempts: 1,
                        message: format!("the request asked for ahead ended: {e}"),
                    })
                }),
            ),
            None => {
                let sent = self.unread.take();
                let request = self.client.page::<T>(&self.query, page_number);
                // In the background, a read's next pages go before every first page
                // waiting: the queue must not stand between a window's pages (the densest
                // windows, a backfill's last, would end it one queue wait per page).
                let answer = match (self.fetched, super::pressure::background_rank()) {
                    (1.., Some(_)) => super::pressure::in_background(0, request).await,
                    _ => request.await,
                };
                (sent, answer)
            }
        };
        let page = match answer {
            Ok(page) => Page { sent, ..page },
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        self.fetched += 1;
        let asked = u64::from(self.page_size());
        let served = page.records.len() as u64;
        match page.total {
            Some(total) => {
                if page_number == 1 && served > 0 && served < asked && total > served {
                    // The CRM serves fewer than asked though more exist: it caps the page
                    // size. Page 2 of the capped size starts right after this page.
                    debug!(
                        endpoint = T::ENDPOINT.path_segment(),
                        asked, served, total, "crm caps the page size, paging by what it serves"
                    );
                    self.query.page_size = Some(served as u32);
                }
                let size = u64::from(self.page_size());
                let pages = total.div_ceil(size);
                self.last_page = Some(self.last_page.map_or(pages, |p| p.max(pages)));
                if self.max_pages.is_none() {
                    self.max_pages = Some(pages + (pages / 4).max(2));
                }
            }
            None => {
                let mut new_ids = 0;
                for record in &page.records {
                    let id = match record {
                        Ok(record) => record
                            .model
                            .id()
                            .map(|id| xxhash_rust::xxh3::xxh3_64(id.as_bytes())),
                        Err(e) => Some(xxhash_rust::xxh3::xxh3_64(e.raw.as_bytes())),
                    };
                    if id.is_none_or(|id| self.ids.insert(id)) {
                        new_ids += 1;
                    }
                }
                if served == 0 {
                    // The end. An empty page after a short first one is not passed on: the
                    // read is that one short page, shown whole by this request.
                    self.done = true;
                    return (page_number == 1 || !self.short_first).then_some(Ok(page));
                }
                if page_number == 1 && served < asked {
                    // Short, but a CRM capping the page size serves short pages of a longer
                    // result: the next page, of the length served, tells (empty: the end).
                    self.short_first = true;
                    self.query.page_size = Some(served as u32);
                } else if new_ids == 0 && self.short_first && page_number == 2 {
                    // The short first page again (a CRM ignoring `page`): it held the whole
                    // result. Not passed on, as for an empty page.
                    self.done = true;
                    return None;
                } else if new_ids == 0 && served >= asked {
                    // A full page of ids all read before: the CRM ignores `page` (or pages
                    // are one record long and records moved); this read cannot show the
                    // window whole.
                    self.done = true;
                    let url = self.client.endpoint_url(T::ENDPOINT);
                    return Some(Err(CrmError::Paging {
                        url: display_url(&url, &self.query.params(1, self.page_size())),
                        reason: format!(
                            "page {page_number} served only records of the pages before it though they were full: the CRM ignores the `page` parameter, so no more than one page of {asked} records of a window can be read"
                        ),
                    }));
                } else if served < asked || new_ids == 0 {
                    // Short after full pages (or after the capped size was found): the end.
                    self.last_page = Some(u64::from(page_number));
                }
                if self.max_pages.is_none() {
                    self.max_pages = Some(self.query.max_records / u64::from(self.page_size()) + 1);
                }
            }
        }
        if self
            .last_page
            .is_some_and(|last| u64::from(page_number) >= last)
        {
            self.done = true;
        }
        // Not past a first page above `max_records`: the window is split instead.
        if page
            .total
            .is_some_and(|total| self.fetched > 1 || total <= self.query.max_records)
        {
            self.prefetch(page_number);
        }
        self.next_page += 1;
        Some(Ok(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        for _ in 0..200 {
            assert!(backoff(1, initial, max) <= Duration::from_millis(100));
            assert!(backoff(3, initial, max) <= Duration::from_millis(400));
            assert!(backoff(30, initial, max) <= max);
        }
        // Full jitter spreads: over many draws the largest exceeds half the bound.
        let largest = (0..200).map(|_| backoff(4, initial, max)).max().unwrap();
        assert!(largest > Duration::from_millis(400), "{largest:?}");
    }

    #[test]
    fn retry_after_seconds_parse() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("oops"));
        assert_eq!(parse_retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("-3"));
        assert_eq!(parse_retry_after(&headers), None);
    }

    #[test]
    fn retry_after_dates_parse_in_every_form() {
        let now = httpdate::parse_http_date("Mon, 30 Nov 2026 19:00:00 GMT").unwrap();
        for value in [
            "Mon, 30 Nov 2026 19:02:00 GMT",
            // The obsolete forms RFC 9110 asks recipients to accept.
            "Monday, 30-Nov-26 19:02:00 GMT",
            "Mon Nov 30 19:02:00 2026",
        ] {
            assert_eq!(
                retry_after_at(value, now),
                Some(Duration::from_secs(120)),
                "{value}"
            );
        }
        // A date in the past: a wait of zero (the caller backs off instead).
        assert_eq!(
            retry_after_at("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::ZERO)
        );
        // Absurd waits are capped.
        assert_eq!(
            retry_after_at("Fri, 31 Dec 9999 23:59:59 GMT", now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after_at("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(
            retry_after_at("1.5", now),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn window_params_are_the_vendor_names() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        let mut q = WindowQuery::new(DateFilter::PositionClose, d("2024-01-01"), d("2024-01-31"));
        q.server_tag = Some("mt4-live-01".into());
        let params = q.params(2, 500);
        assert_eq!(
            params,
            vec![
                ("positionCloseDateFrom", "2024-01-01".to_owned()),
                ("positionCloseDateTo", "2024-01-31".to_owned()),
                ("serverTag", "mt4-live-01".to_owned()),
                ("page", "2".to_owned()),
                ("pageSize", "500".to_owned()),
            ]
        );
    }
}
