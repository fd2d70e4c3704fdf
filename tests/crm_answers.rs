//! The CRM client against answers as real CRMs write them (issue 15, section B, items 6–9):
//! errors carried by HTTP 200, an expired token answered 403, `Retry-After` as a date and a
//! process-wide pause, bodies that are not clean UTF-8 JSON. Each against the simulator on a
//! real port.

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use chrono::{NaiveDate, Utc};
use common::{client, start_sim};
use ibstream::crm::{
    CrmClient, CrmError, CrmRecord, Customer, DateFilter, ForbiddenKind, Lead, Position,
    RecordError, Transaction, WindowQuery,
};
use ibstream::sim::{BodyQuirk, Error200, Kind, SimHandle};
use serde_json::Value as Json;

fn query(filter: DateFilter) -> WindowQuery {
    WindowQuery::new(
        filter,
        NaiveDate::from_ymd_opt(2024, 1, 1).unwrap(),
        Utc::now().date_naive(),
    )
}

/// Reads every page of `query`: the ids read and the records that failed.
async fn read_all<T: CrmRecord>(
    crm: &CrmClient,
    query: WindowQuery,
) -> Result<(Vec<String>, Vec<RecordError>), CrmError> {
    let mut pages = crm.pages::<T>(query);
    let (mut ids, mut errors) = (Vec::new(), Vec::new());
    let read = async {
        while let Some(page) = pages.next().await {
            for record in page?.records {
                match record {
                    Ok(record) => ids.push(record.model.id().expect("an id")),
                    Err(e) => errors.push(e),
                }
            }
        }
        Ok::<_, CrmError>(())
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("paging ends")?;
    Ok((ids, errors))
}

/// The ids of the truth records of `kind` (`field` holds the id; fake transactions left out).
fn truth_ids(sim: &SimHandle, kind: Kind, field: &str) -> HashSet<String> {
    sim.truth(kind)
        .iter()
        .filter(|r| r["isFake"] != true)
        .map(|r| r[field].to_string())
        .collect()
}

/// Asserts that `read` holds each of `expected` once and nothing else.
fn assert_same(read: &[String], expected: &HashSet<String>, what: &str) {
    let set: HashSet<String> = read.iter().cloned().collect();
    assert_eq!(set.len(), read.len(), "{what}: no record twice");
    let missing: Vec<_> = expected.difference(&set).take(5).collect();
    let extra: Vec<_> = set.difference(expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} of {} missing (e.g. {missing:?}), {} extra (e.g. {extra:?})",
        expected.difference(&set).count(),
        expected.len(),
        set.difference(expected).count()
    );
}

#[tokio::test]
async fn a_200_carrying_an_error_is_retried_and_every_record_arrives() {
    for shape in [
        Error200::SuccessFalse,
        Error200::SuccessString,
        Error200::StatusError,
        Error200::ErrorObject,
        Error200::ErrorsArray,
        Error200::Html,
    ] {
        // Every distinct query (each page of each window) is answered once with the error.
        let sim = start_sim(|c| {
            c.leads = 1234;
            c.transactions = 300;
            c.error_200 = Some(shape);
        })
        .await;
        let crm = client(&sim, |c| c.page_size = 200);
        let (leads, errors) = read_all::<Lead>(&crm, query(DateFilter::Registration))
            .await
            .unwrap_or_else(|e| panic!("{shape:?}: {e}"));
        assert!(errors.is_empty());
        assert_same(
            &leads,
            &truth_ids(&sim, Kind::Leads, "id"),
            &format!("{shape:?}: leads"),
        );
        let (transactions, _) = read_all::<Transaction>(&crm, query(DateFilter::Transaction))
            .await
            .unwrap();
        assert_same(
            &transactions,
            &truth_ids(&sim, Kind::Transactions, "id"),
            &format!("{shape:?}: transactions"),
        );
        let servers = crm.servers(&[]).await.unwrap();
        assert_eq!(servers.len(), sim.truth(Kind::Servers).len(), "{shape:?}");
        assert!(servers.iter().all(Result::is_ok), "{shape:?}");
        // 7 lead pages, 2 transaction pages and the servers, each answered once with the error.
        assert_eq!(
            sim.stats().errors_200.load(Ordering::Relaxed),
            10,
            "{shape:?}"
        );
        assert_eq!(crm.stats().retries.load(Ordering::Relaxed), 10, "{shape:?}");
        assert_eq!(
            crm.stats().error_answers.load(Ordering::Relaxed),
            10,
            "{shape:?}"
        );
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn a_200_carrying_an_error_beyond_the_retries_is_transient_never_an_empty_page() {
    let sim = start_sim(|c| c.error_200 = Some(Error200::SuccessFalse)).await;
    let crm = client(&sim, |c| c.max_retries = 0);
    let err = read_all::<Transaction>(&crm, query(DateFilter::Transaction))
        .await
        .unwrap_err();
    match &err {
        CrmError::Transient { message, .. } => {
            assert!(
                message.contains("reports an error")
                    && message.contains("Service temporarily unavailable"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_transient());
    let err = crm.servers(&[]).await.unwrap_err();
    assert!(matches!(err, CrmError::Transient { .. }), "{err:?}");
    sim.shutdown().await;

    let sim = start_sim(|c| c.error_200 = Some(Error200::Html)).await;
    let crm = client(&sim, |c| c.max_retries = 0);
    let err = crm
        .page::<Lead>(&query(DateFilter::Registration), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CrmError::Transient { message, .. } if message.contains("HTML")),
        "{err:?}"
    );
    sim.shutdown().await;
}

/// The streams' reads, all at once: leads, customers, transactions and each live server's
/// positions; returns how many records each read.
async fn read_every_stream(crm: &CrmClient, sim: &SimHandle) -> Vec<(String, usize)> {
    let mut tasks = tokio::task::JoinSet::new();
    let spawn_read = |tasks: &mut tokio::task::JoinSet<_>, name: String, job| {
        tasks.spawn(async move { (name, job.await) });
    };
    let (c1, c2, c3) = (crm.clone(), crm.clone(), crm.clone());
    spawn_read(
        &mut tasks,
        "leads".into(),
        Box::pin(async move {
            read_all::<Lead>(&c1, query(DateFilter::Registration))
                .await
                .map(|r| r.0.len())
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
    );
    spawn_read(
        &mut tasks,
        "customers".into(),
        Box::pin(async move {
            read_all::<Customer>(&c2, query(DateFilter::Registration))
                .await
                .map(|r| r.0.len())
        }),
    );
    spawn_read(
        &mut tasks,
        "transactions".into(),
        Box::pin(async move {
            read_all::<Transaction>(&c3, query(DateFilter::Transaction))
                .await
                .map(|r| r.0.len())
        }),
    );
    let mut tags: Vec<String> = sim
        .truth(Kind::Servers)
        .iter()
        .filter(|s| s["type"] == "live")
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    tags.sort();
    for tag in tags {
        let crm = crm.clone();
        let mut q = query(DateFilter::PositionClose);
        q.server_tag = Some(tag.clone());
        spawn_read(
            &mut tasks,
            format!("positions/{tag}"),
            Box::pin(async move { read_all::<Position>(&crm, q).await.map(|r| r.0.len()) }),
        );
    }
    let mut out = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (name, result) = done.unwrap();
        let count = result.unwrap_or_else(|e| panic!("{name} stopped: {e}"));
        out.push((name, count));
    }
    out.sort();
    out
}

#[tokio::test]
async fn an_expired_token_answered_403_logs_in_once_and_every_stream_goes_on() {
    let sim = start_sim(|c| {
        c.leads = 1500;
        c.customers = 600;
        c.transactions = 1500;
        c.positions = 1500;
        c.expired_token_status = 403;
    })
    .await;
    let crm = client(&sim, |c| c.page_size = 100);
    // Every stream reads once with the first token.
    let first = read_every_stream(&crm, &sim).await;
    assert_eq!(sim.stats().logins.load(Ordering::Relaxed), 1);
    // The tokens expire while every stream reads: each gets 403, one of them logs in.
    let forbidden = sim.stats().forbidden.load(Ordering::Relaxed);
    let expire_after = sim.stats().pages.load(Ordering::Relaxed) + 20;
    let expirer = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while sim.stats().pages.load(Ordering::Relaxed) < expire_after {
            assert!(Instant::now() < deadline, "reads do not progress");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        sim.expire_tokens();
    };
    let (second, ()) = tokio::join!(read_every_stream(&crm, &sim), expirer);
    assert_eq!(first, second, "every stream read every record again");
    assert!(
        sim.stats().forbidden.load(Ordering::Relaxed) > forbidden,
        "the expired token met 403"
    );
    assert_eq!(
        sim.stats().logins.load(Ordering::Relaxed),
        2,
        "one login for every stream"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_real_missing_permission_is_forbidden_after_exactly_one_login_again() {
    let sim = start_sim(|c| c.expired_token_status = 403).await;
    let crm = client(&sim, |_| {});
    crm.page::<Lead>(&query(DateFilter::Registration), 1)
        .await
        .unwrap();
    sim.deny(Kind::Transactions, true);
    let err = crm
        .page::<Transaction>(&query(DateFilter::Transaction), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CrmError::Forbidden {
                kind: ForbiddenKind::ModuleOff,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        sim.stats().logins.load(Ordering::Relaxed),
        2,
        "one login again"
    );
    assert_eq!(sim.stats().forbidden.load(Ordering::Relaxed), 2);
    // The other endpoints go on with the new token.
    crm.page::<Lead>(&query(DateFilter::Registration), 1)
        .await
        .unwrap();
    assert_eq!(sim.stats().logins.load(Ordering::Relaxed), 2);
    sim.shutdown().await;

    // A 403 to the token just issued: no second login.
    let sim = start_sim(|c| c.no_ib_reports = true).await;
    let crm = client(&sim, |_| {});
    let err = crm
        .page::<Lead>(&query(DateFilter::Registration), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CrmError::Forbidden {
                kind: ForbiddenKind::PermissionMissing,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(sim.stats().logins.load(Ordering::Relaxed), 1);
    assert_eq!(sim.stats().forbidden.load(Ordering::Relaxed), 1);
    sim.shutdown().await;
}

/// One caller meets a 429 with `retry_after` (made from the time it is sent); then a second
/// caller asks. Returns the sim's arrival times: the 429's first, and when the pause ended
/// at the latest (per the header).
async fn pause_seen_by_another_caller(
    retry_after: impl Fn(SystemTime) -> (String, SystemTime),
) -> (Vec<SystemTime>, SystemTime) {
    pause_after(429, retry_after).await
}

/// As [`pause_seen_by_another_caller`], the first answer of status `status` (429 or 503).
async fn pause_after(
    status: u16,
    retry_after: impl Fn(SystemTime) -> (String, SystemTime),
) -> (Vec<SystemTime>, SystemTime) {
    let sim = start_sim(|_| {}).await;
    let crm = client(&sim, |c| c.backoff_initial_ms = 1);
    crm.login().await.unwrap();
    let (value, until) = retry_after(SystemTime::now());
    if status == 429 {
        sim.rate_limit_next(1, &value);
    } else {
        sim.unavailable_next(1, &value);
    }
    sim.record_arrivals(true);
    let first = tokio::spawn({
        let crm = crm.clone();
        async move {
            crm.page::<Lead>(&query(DateFilter::Registration), 1)
                .await
                .map(|p| p.records.len())
        }
    });
    // The 429 has been received by the first caller.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.stats().rate_limited.load(Ordering::Relaxed)
        + sim.stats().failures.load(Ordering::Relaxed)
        == 0
        || crm.stats().retries.load(Ordering::Relaxed) == 0
    {
        assert!(Instant::now() < deadline, "no 429 received");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let other = crm.clone();
    let second = other
        .page::<Transaction>(&query(DateFilter::Transaction), 1)
        .await
        .unwrap();
    assert_eq!(second.records.len(), 50);
    assert_eq!(first.await.unwrap().unwrap(), 50);
    let arrivals = sim.arrivals();
    assert_eq!(arrivals.len(), 3, "the 429, the retry and the other call");
    sim.shutdown().await;
    (arrivals, until)
}

#[tokio::test]
async fn a_429_with_an_http_date_pauses_every_caller_until_that_date() {
    let (arrivals, until) = pause_seen_by_another_caller(|now| {
        // Whole seconds: the date is 2 to 3 s away.
        let at = now + Duration::from_secs(3);
        let text = httpdate::fmt_http_date(at);
        let until = httpdate::parse_http_date(&text).unwrap();
        (text, until)
    })
    .await;
    // Clocks of one machine; 5 ms for the sim's clock reading before the client's.
    let slack = Duration::from_millis(5);
    assert!(until > arrivals[0] + Duration::from_millis(900));
    for arrival in &arrivals[1..] {
        assert!(
            *arrival + slack >= until,
            "a call reached the CRM {:?} before the Retry-After date",
            until.duration_since(*arrival).unwrap_or_default()
        );
    }
}

#[tokio::test]
async fn a_429_with_delay_seconds_pauses_every_caller() {
    let (arrivals, _) = pause_seen_by_another_caller(|now| ("2".to_owned(), now)).await;
    for arrival in &arrivals[1..] {
        let waited = arrival.duration_since(arrivals[0]).unwrap_or_default();
        assert!(waited >= Duration::from_secs(2), "{waited:?}");
    }
}

#[tokio::test]
async fn a_503_with_retry_after_pauses_every_caller_too() {
    let (arrivals, _) = pause_after(503, |now| ("2".to_owned(), now)).await;
    for arrival in &arrivals[1..] {
        let waited = arrival.duration_since(arrivals[0]).unwrap_or_default();
        assert!(waited >= Duration::from_secs(2), "{waited:?}");
    }
}

#[tokio::test]
async fn a_429_with_a_date_in_the_past_or_zero_backs_off_exponentially() {
    let initial = Duration::from_millis(200);
    for value in [
        "Wed, 21 Oct 2015 07:28:00 GMT".to_owned(),
        // Now, to the second: not in the future.
        httpdate::fmt_http_date(SystemTime::now()),
        "0".to_owned(),
    ] {
        let sim = start_sim(|_| {}).await;
        let crm = client(&sim, |c| {
            c.backoff_initial_ms = initial.as_millis() as u64;
            c.backoff_max_ms = 10_000;
            c.max_retries = 3;
        });
        crm.login().await.unwrap();
        sim.rate_limit_next(3, &value);
        sim.record_arrivals(true);
        let page = crm
            .page::<Lead>(&query(DateFilter::Registration), 1)
            .await
            .unwrap_or_else(|e| panic!("{value}: {e}"));
        assert_eq!(page.records.len(), 50);
        let arrivals = sim.arrivals();
        assert_eq!(arrivals.len(), 4, "{value}: three 429s and the call");
        // Each retry waits at least the exponential step: 200, 400, 800 ms (5 ms for the
        // clock readings).
        for (retry, pair) in arrivals.windows(2).enumerate() {
            let waited = pair[1].duration_since(pair[0]).unwrap_or_default();
            let step = initial * (1 << retry);
            assert!(
                waited + Duration::from_millis(5) >= step,
                "{value}: retry {} after {waited:?}, not {step:?}",
                retry + 1
            );
        }
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn bodies_compressed_or_with_a_byte_order_mark_are_read() {
    for quirks in [
        vec![BodyQuirk::Bom],
        vec![BodyQuirk::Gzip],
        vec![BodyQuirk::GzipUnlabelled],
        vec![BodyQuirk::Bom, BodyQuirk::Gzip],
        vec![BodyQuirk::Bom, BodyQuirk::GzipUnlabelled],
    ] {
        let sim = start_sim(|c| {
            c.leads = 1234;
            c.body_quirks = quirks.clone();
        })
        .await;
        let crm = client(&sim, |c| {
            c.page_size = 500;
            c.max_retries = 0;
        });
        let (leads, errors) = read_all::<Lead>(&crm, query(DateFilter::Registration))
            .await
            .unwrap_or_else(|e| panic!("{quirks:?}: {e}"));
        assert!(errors.is_empty(), "{quirks:?}");
        assert_same(
            &leads,
            &truth_ids(&sim, Kind::Leads, "id"),
            &format!("{quirks:?}"),
        );
        let servers = crm.servers(&[]).await.unwrap();
        assert!(!servers.is_empty() && servers.iter().all(Result::is_ok));
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn a_record_with_a_byte_that_is_not_utf8_fails_alone() {
    let sim = start_sim(|c| c.leads = 1000).await;
    let named = |kind: Kind, id: &str, field: &str| -> Vec<String> {
        sim.truth(kind)
            .iter()
            .filter(|r| r[field].is_string() && r["isFake"] != true)
            .map(|r| r[id].to_string())
            .step_by(97)
            .take(4)
            .collect()
    };
    let bad_leads = named(Kind::Leads, "id", "firstName");
    let bad_transactions = named(Kind::Transactions, "id", "paymentMethod");
    assert_eq!(bad_leads.len(), 4);
    for id in &bad_leads {
        sim.latin1_record(Kind::Leads, id, true);
    }
    for id in &bad_transactions {
        sim.latin1_record(Kind::Transactions, id, true);
    }
    let crm = client(&sim, |c| c.page_size = 300);
    let (leads, errors) = read_all::<Lead>(&crm, query(DateFilter::Registration))
        .await
        .unwrap();
    let mut expected = truth_ids(&sim, Kind::Leads, "id");
    for id in &bad_leads {
        expected.remove(id);
    }
    assert_same(&leads, &expected, "every other lead");
    let failed: HashSet<String> = errors
        .iter()
        .map(|e| {
            assert!(
                e.reason.contains("`firstName`") && e.reason.contains("0xE9"),
                "{}",
                e.reason
            );
            let raw: Json = serde_json::from_str(&e.raw).expect("the raw record kept");
            assert!(raw["firstName"].as_str().unwrap().starts_with('\u{FFFD}'));
            raw["id"].to_string()
        })
        .collect();
    assert_eq!(failed, bad_leads.iter().cloned().collect());
    let (transactions, errors) = read_all::<Transaction>(&crm, query(DateFilter::Transaction))
        .await
        .unwrap();
    assert_eq!(errors.len(), bad_transactions.len());
    assert_eq!(
        transactions.len() + errors.len(),
        truth_ids(&sim, Kind::Transactions, "id").len()
    );
    assert!(
        errors[0].reason.contains("`paymentMethod`"),
        "{}",
        errors[0].reason
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_login_answered_200_with_an_error_says_what_the_crm_said() {
    let app = axum::Router::new().route(
        "/api/v1/auth/login",
        axum::routing::post(|| async {
            axum::Json(serde_json::json!({
                "success": false,
                "message": "Invalid credentials",
                "accessToken": "not-a-token-to-show"
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut config = common::crm_config_for_url();
    config.base_url = format!("http://{addr}");
    config.max_retries = 1;
    let crm = CrmClient::build(&config).unwrap();
    let err = crm.login().await.unwrap_err();
    match &err {
        CrmError::Transient { message, .. } => {
            assert!(
                message.contains("Invalid credentials") && message.contains("success: false"),
                "{message}"
            );
            assert!(!message.contains("not-a-token-to-show"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(crm.stats().error_answers.load(Ordering::Relaxed), 2);
    server.abort();
}

/// A CRM of one login answer and one answer to every data call, each `(status,
/// content type, body)`; returns a client of it (no retries) and the server task.
async fn fake_crm(
    login: (u16, &'static str, String),
    data: (u16, &'static str, String),
) -> (CrmClient, tokio::task::JoinHandle<()>) {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let answer = |(status, content_type, body): (u16, &'static str, String)| {
        move || async move {
            (
                StatusCode::from_u16(status).unwrap(),
                [("content-type", content_type)],
                body,
            )
                .into_response()
        }
    };
    let app = axum::Router::new()
        .route("/api/v1/auth/login", axum::routing::post(answer(login)))
        .route(
            "/api/v1/{integration}/{endpoint}",
            axum::routing::get(answer(data)),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let mut config = common::crm_config_for_url();
    config.base_url = format!("http://{addr}");
    config.max_retries = 0;
    (CrmClient::build(&config).unwrap(), server)
}

#[tokio::test]
async fn json_labelled_text_html_is_read_for_login_and_data() {
    let page = r#"{"total": 2, "data": [{"id": 1}, {"id": 2}]}"#;
    for content_type in [
        "text/html; charset=UTF-8",
        "text/html",
        "application/xhtml+xml",
    ] {
        for body in [page.to_owned(), format!("\u{FEFF}\n  {page}")] {
            let (crm, server) = fake_crm(
                (
                    200,
                    content_type,
                    r#"{"token": "tok-abcdef123456"}"#.to_owned(),
                ),
                (200, content_type, body.clone()),
            )
            .await;
            crm.login()
                .await
                .unwrap_or_else(|e| panic!("{content_type} {body:?}: {e}"));
            let read = crm
                .page::<Lead>(&query(DateFilter::Registration), 1)
                .await
                .unwrap_or_else(|e| panic!("{content_type} {body:?}: {e}"));
            assert_eq!(read.records.len(), 2);
            assert_eq!(read.total, Some(2));
            assert_eq!(crm.stats().error_answers.load(Ordering::Relaxed), 0);
            server.abort();
        }
    }
    // A real HTML page is still a failed call, never a page.
    let (crm, server) = fake_crm(
        (
            200,
            "text/html",
            r#"{"token": "tok-abcdef123456"}"#.to_owned(),
        ),
        (
            200,
            "text/html",
            "<html><body>Maintenance</body></html>".to_owned(),
        ),
    )
    .await;
    let err = crm
        .page::<Lead>(&query(DateFilter::Registration), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CrmError::Transient { message, .. } if message.contains("HTML")),
        "{err:?}"
    );
    server.abort();
}

#[tokio::test]
async fn a_login_answer_never_shows_a_token_planted_in_it() {
    const SECRET: &str = "SECRET-TOKEN-abc123";
    let json = "application/json";
    let html = "text/html; charset=UTF-8";
    for (status, content_type, body, shown) in [
        (
            200,
            html,
            format!(r#"<html><body>{{"token":"{SECRET}"}}</body></html>"#),
            "HTML",
        ),
        (200, html, format!(r#"<p>token={SECRET}</p>"#), "HTML"),
        (
            200,
            json,
            format!(
                r#"{{"success": false, "message": "Invalid credentials", "accessToken": "{SECRET}"}}"#
            ),
            "Invalid credentials",
        ),
        (
            200,
            html,
            format!(r#"{{"error": {{"code": 401, "message": "Bad login", "token": "{SECRET}"}}}}"#),
            "Bad login",
        ),
        (
            200,
            json,
            format!(
                r#"{{"status": "error", "message": "session {SECRET} ended", "session": "{SECRET}"}}"#
            ),
            "session [redacted] ended",
        ),
        (
            200,
            json,
            format!(r#"{{"data": {{"accessToken": "{SECRET}"}}}}"#),
            "no token",
        ),
        (
            200,
            json,
            format!(r#"{{"token": null, "error": "{SECRET}", "sessionToken": "{SECRET}"}}"#),
            "no token",
        ),
        (
            200,
            json,
            format!(r#"{{"token": {{"value": "{SECRET}"}}}}"#),
            "no token",
        ),
        (200, json, format!(r#"["{SECRET}"]"#), "no token"),
        (200, json, format!(r#"{{"token": "{SECRET}""#), "not JSON"),
        (
            401,
            json,
            format!(r#"{{"message": "invalid password", "token": "{SECRET}"}}"#),
            "invalid password",
        ),
        (401, "text/plain", SECRET.to_owned(), "login rejected"),
        (
            403,
            html,
            format!("<html>{SECRET}</html>"),
            "login rejected",
        ),
        (500, html, format!("<html>{SECRET}</html>"), "HTTP 500"),
        (
            500,
            json,
            format!(r#"{{"message": "down", "jwt": "{SECRET}"}}"#),
            "down",
        ),
        (
            400,
            json,
            format!(r#"{{"message": "bad {SECRET}", "apiKey": "{SECRET}"}}"#),
            "bad [redacted]",
        ),
        (422, "text/plain", SECRET.to_owned(), "HTTP 422"),
    ] {
        let (crm, server) = fake_crm(
            (status, content_type, body.clone()),
            (200, json, "{}".to_owned()),
        )
        .await;
        let err = crm.login().await.unwrap_err();
        let health = crm.stats().health().unwrap_err();
        for text in [err.to_string(), format!("{err:?}"), health] {
            assert!(!text.contains(SECRET), "{status} {body}: {text}");
            assert!(!text.contains("abc123"), "{status} {body}: {text}");
        }
        assert!(err.to_string().contains(shown), "{status} {body}: {err}");
        server.abort();
    }
}

#[tokio::test]
async fn a_403_after_a_long_wait_on_a_token_this_call_fetched_logs_in_again() {
    let sim = start_sim(|c| {
        c.token_ttl_secs = 2;
        c.expired_token_status = 403;
    })
    .await;
    let crm = client(&sim, |_| {});
    // The call logs in, then its data request meets a 429: the token it fetched expires
    // while it waits out the pause.
    let pause = ibstream::crm::client::JUST_ISSUED + Duration::from_secs(1);
    assert!(
        pause > Duration::from_secs(2),
        "longer than the token's life"
    );
    sim.rate_limit_data_next(1, &pause.as_secs().to_string());
    let page = crm
        .page::<Lead>(&query(DateFilter::Registration), 1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(page.records.len(), 50);
    assert_eq!(sim.stats().rate_limited.load(Ordering::Relaxed), 1);
    assert_eq!(
        sim.stats().forbidden.load(Ordering::Relaxed),
        1,
        "the expired token met 403"
    );
    assert_eq!(
        sim.stats().logins.load(Ordering::Relaxed),
        2,
        "one login again"
    );
    // A real denial still ends, after one login again at most.
    sim.deny(Kind::Transactions, true);
    let err = crm
        .page::<Transaction>(&query(DateFilter::Transaction), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CrmError::Forbidden {
                kind: ForbiddenKind::ModuleOff,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(sim.stats().logins.load(Ordering::Relaxed) <= 3);
    sim.shutdown().await;
}
