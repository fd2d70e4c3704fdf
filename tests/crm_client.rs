//! The CRM client against the simulator, started in-process on a free port.

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{NaiveDate, Utc};
use common::{client, start_sim};
use ibstream::crm::{
    CrmError, Customer, DateFilter, Endpoint, ForbiddenKind, Lead, Position, Transaction,
    WindowQuery,
};

fn since_start() -> WindowQuery {
    let today = Utc::now().date_naive();
    WindowQuery::new(
        DateFilter::Registration,
        NaiveDate::from_ymd_opt(2024, 1, 1).unwrap(),
        today,
    )
}

#[tokio::test]
async fn logs_in_once_and_reuses_the_token() {
    let sim = start_sim(|_| {}).await;
    let crm = client(&sim, |_| {});
    let other_stream = crm.clone();
    let mut pages = crm.pages::<Lead>(since_start());
    let page = pages.next().await.unwrap().unwrap();
    assert_eq!(page.total, Some(50));
    other_stream.servers().await.unwrap();
    let mut q = since_start();
    q.filter = DateFilter::LastModified;
    other_stream.page::<Lead>(&q, 1).await.unwrap();
    assert_eq!(sim.stats().logins.load(Ordering::Relaxed), 1);
    assert_eq!(sim.stats().unauthorized.load(Ordering::Relaxed), 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn concurrent_streams_share_one_login() {
    let sim = start_sim(|_| {}).await;
    let crm = client(&sim, |_| {});
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let crm = crm.clone();
            tokio::spawn(async move {
                crm.page::<Lead>(&since_start(), 1)
                    .await
                    .map(|p| p.records.len())
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), 50);
    }
    assert_eq!(sim.stats().logins.load(Ordering::Relaxed), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn logs_in_again_when_the_token_expires_mid_pagination() {
    let sim = start_sim(|c| c.leads = 2345).await;
    let crm = client(&sim, |c| c.page_size = 500);
    let mut pages = crm.pages::<Lead>(since_start());
    let mut ids = HashSet::new();
    let mut n = 0;
    while let Some(page) = pages.next().await {
        let page = page.expect("every page arrives");
        n += 1;
        for record in page.records {
            assert!(ids.insert(record.unwrap().model.id.unwrap()));
        }
        if n == 2 {
            sim.expire_tokens();
        }
    }
    assert_eq!(n, 5);
    assert_eq!(ids.len(), 2345);
    assert_eq!(sim.stats().logins.load(Ordering::Relaxed), 2);
    assert_eq!(sim.stats().unauthorized.load(Ordering::Relaxed), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn token_ttl_expiry_is_survived() {
    let sim = start_sim(|c| c.token_ttl_secs = 1).await;
    let crm = client(&sim, |_| {});
    crm.page::<Lead>(&since_start(), 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    crm.page::<Lead>(&since_start(), 1).await.unwrap();
    assert_eq!(sim.stats().logins.load(Ordering::Relaxed), 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_credentials_are_an_auth_error_naming_what_to_check() {
    let sim = start_sim(|_| {}).await;
    for tweak in [
        (|c: &mut ibstream::config::CrmConfig| c.password = Some("wrong".to_owned().into()))
            as fn(&mut _),
        |c| c.api_key = Some("expired-key".to_owned().into()),
        |c| c.domain = "other.example.com".to_owned(),
    ] {
        let crm = client(&sim, tweak);
        let err = crm.page::<Lead>(&since_start(), 1).await.unwrap_err();
        assert!(matches!(err, CrmError::Auth { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("crm.password") && text.contains("crm.api_key"),
            "{text}"
        );
    }
    // Login is not retried as a transient failure.
    assert_eq!(sim.stats().unauthorized.load(Ordering::Relaxed), 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_limit_429_waits_for_retry_after() {
    let sim = start_sim(|c| c.max_rps = 2).await;
    let crm = client(&sim, |_| {});
    let started = Instant::now();
    // Login + 4 calls = 5 calls at 2 per second: at least one Retry-After wait of 1 s.
    for _ in 0..4 {
        crm.page::<Lead>(&since_start(), 1)
            .await
            .expect("succeeds after waiting");
    }
    let elapsed = started.elapsed();
    assert!(sim.stats().rate_limited.load(Ordering::Relaxed) >= 1);
    assert!(elapsed >= Duration::from_millis(1000), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_limit_that_never_clears_is_rate_limited_error() {
    let sim = start_sim(|c| c.max_rps = 1).await;
    let crm = client(&sim, |c| c.max_retries = 0);
    crm.login().await.unwrap();
    let err = crm.page::<Lead>(&since_start(), 1).await.unwrap_err();
    assert!(
        matches!(
            err,
            CrmError::RateLimited {
                attempts: 1,
                retry_after: Some(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    sim.shutdown().await;
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let sim = start_sim(|c| c.fail_rate = 0.3).await;
    let crm = client(&sim, |c| c.max_retries = 12);
    for _ in 0..20 {
        let page = crm
            .page::<Transaction>(&txn_query(), 1)
            .await
            .expect("retried until success");
        assert!(page.total.is_some());
    }
    assert!(sim.stats().failures.load(Ordering::Relaxed) > 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn server_errors_beyond_the_budget_are_transient() {
    let sim = start_sim(|_| {}).await;
    let crm = client(&sim, |c| c.max_retries = 2);
    crm.login().await.unwrap();
    sim.fail_next(3);
    let err = crm.page::<Lead>(&since_start(), 1).await.unwrap_err();
    match &err {
        CrmError::Transient {
            attempts,
            message,
            url,
        } => {
            assert_eq!(*attempts, 3);
            assert!(message.contains("HTTP 500"), "{message}");
            assert!(
                url.contains("/api/v1/ib/leads?registrationDateFrom=2024-01-01"),
                "{url}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The budget is per call: the next call succeeds.
    crm.page::<Lead>(&since_start(), 1).await.unwrap();
    sim.shutdown().await;
}

fn txn_query() -> WindowQuery {
    let mut q = since_start();
    q.filter = DateFilter::Transaction;
    q
}

#[tokio::test]
async fn forbidden_is_classified_per_endpoint() {
    let sim = start_sim(|c| c.deny = vec!["positions".to_owned()]).await;
    let crm = client(&sim, |_| {});
    let mut q = since_start();
    q.filter = DateFilter::PositionClose;
    q.server_tag = Some("mt4-live-01".to_owned());
    let err = crm.page::<Position>(&q, 1).await.unwrap_err();
    match &err {
        CrmError::Forbidden {
            endpoint,
            module,
            kind,
            ..
        } => {
            assert_eq!(endpoint, "positions");
            assert_eq!(*module, "platforms");
            assert_eq!(*kind, ForbiddenKind::ModuleOff);
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_transient());
    assert_eq!(
        sim.stats().forbidden.load(Ordering::Relaxed),
        1,
        "403 is not retried"
    );
    // The other endpoints still answer.
    crm.page::<Customer>(&since_start(), 1).await.unwrap();
    sim.shutdown().await;

    let sim = start_sim(|c| c.no_ib_reports = true).await;
    let crm = client(&sim, |_| {});
    let err = crm.page::<Lead>(&since_start(), 1).await.unwrap_err();
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
    assert!(err.to_string().contains("IB Reports"), "{err}");
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_requests_are_classified_and_not_retried() {
    let sim = start_sim(|_| {}).await;
    let crm = client(&sim, |_| {});
    let err = crm
        .get_raw(Endpoint::Leads, &[("page", "1".to_owned())])
        .await
        .unwrap_err();
    assert!(
        matches!(err, CrmError::BadRequest { status: 400, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("registrationDateFrom"), "{err}");
    let err = crm
        .get_raw(
            Endpoint::Transactions,
            &[
                ("transactionDateFrom", "2024-13-01".to_owned()),
                ("transactionDateTo", "2024-12-01".to_owned()),
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, CrmError::BadRequest { status: 400, .. }),
        "{err:?}"
    );
    let mut q = since_start();
    q.page_size = Some(1001);
    let err = crm.page::<Lead>(&q, 1).await.unwrap_err();
    assert!(err.to_string().contains("pageSize"), "{err}");
    assert_eq!(sim.stats().bad_requests.load(Ordering::Relaxed), 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn pagination_yields_each_record_once() {
    let sim = start_sim(|c| c.leads = 2345).await;
    let crm = client(&sim, |_| {});
    let mut pages = crm.pages::<Lead>(since_start());
    let mut ids = HashSet::new();
    let mut sizes = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.unwrap();
        sizes.push(page.records.len());
        for record in page.records {
            let id = record.unwrap().model.id.unwrap();
            assert!(ids.insert(id), "id {id} twice");
        }
    }
    assert_eq!(sizes, vec![1000, 1000, 345]);
    let truth: HashSet<i64> = sim
        .truth(ibstream::sim::Kind::Leads)
        .iter()
        .map(|l| l["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, truth);
    sim.shutdown().await;
}

#[tokio::test]
async fn empty_window_is_one_empty_page() {
    let sim = start_sim(|_| {}).await;
    let crm = client(&sim, |_| {});
    let day = NaiveDate::from_ymd_opt(2020, 1, 1).unwrap();
    let mut pages = crm.pages::<Lead>(WindowQuery::new(DateFilter::Registration, day, day));
    let page = pages.next().await.unwrap().unwrap();
    assert_eq!(page.total, Some(0));
    assert!(page.records.is_empty());
    assert!(pages.next().await.is_none());
    sim.shutdown().await;
}

#[tokio::test]
async fn every_stream_parses_what_the_simulator_serves() {
    let sim = start_sim(|c| {
        c.timezone = "Europe/Nicosia".parse().unwrap();
        c.customers = 40;
    })
    .await;
    let crm = client(&sim, |c| c.timezone = "Europe/Nicosia".to_owned());
    let customers = crm.page::<Customer>(&since_start(), 1).await.unwrap();
    assert_eq!(customers.records.len(), 40);
    for record in &customers.records {
        let c = &record.as_ref().unwrap().model;
        assert!(!c.accounts.is_empty());
        assert!(c.accounts.iter().all(|a| a.server.contains("-live-")));
        assert!(c.person.registration_date.is_some() && c.conversion_date.is_some());
    }
    let txns = crm.page::<Transaction>(&txn_query(), 1).await.unwrap();
    assert!(txns
        .records
        .iter()
        .all(|r| r.as_ref().unwrap().model.amount.is_some()));
    assert!(txns
        .records
        .iter()
        .all(|r| r.as_ref().unwrap().model.is_fake == Some(false)));
    let servers = crm.servers().await.unwrap();
    assert_eq!(servers.len(), 3);
    let mut q = since_start();
    q.filter = DateFilter::PositionClose;
    q.server_tag = Some("mt5-live-02".to_owned());
    let positions = crm.page::<Position>(&q, 1).await.unwrap();
    assert!(positions
        .records
        .iter()
        .all(|r| r.as_ref().unwrap().model.server_tag.as_deref() == Some("mt5-live-02")));
    // Local times of the Nicosia CRM come back as the same instants the truth holds.
    let truth = sim.truth(ibstream::sim::Kind::Leads);
    let leads = crm.page::<Lead>(&since_start(), 1).await.unwrap();
    let first = leads.records[0].as_ref().unwrap();
    let t = truth
        .iter()
        .find(|l| l["id"].as_i64() == first.model.id)
        .unwrap();
    let local = chrono::NaiveDateTime::parse_from_str(
        t["registrationDate"].as_str().unwrap(),
        "%Y-%m-%d %H:%M:%S",
    )
    .unwrap();
    let tz: chrono_tz::Tz = "Europe/Nicosia".parse().unwrap();
    assert_eq!(
        first
            .model
            .person
            .registration_date
            .unwrap()
            .with_timezone(&tz)
            .naive_local(),
        local
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn include_fake_adds_fake_transactions() {
    let sim = start_sim(|c| c.transactions = 2000).await;
    let crm = client(&sim, |_| {});
    let real = crm
        .page::<Transaction>(&txn_query(), 1)
        .await
        .unwrap()
        .total
        .unwrap();
    let mut q = txn_query();
    q.include_fake = true;
    let all = crm.page::<Transaction>(&q, 1).await.unwrap();
    assert!(all.total.unwrap() > real);
    assert_eq!(all.total.unwrap(), 2000);
    assert!(all
        .records
        .iter()
        .any(|r| r.as_ref().unwrap().model.is_fake == Some(true)));
    sim.shutdown().await;
}

#[tokio::test]
async fn malformed_records_fail_alone() {
    let sim = start_sim(|c| {
        c.leads = 1000;
        c.malformed_rate = 0.1;
    })
    .await;
    let crm = client(&sim, |_| {});
    let page = crm.page::<Lead>(&since_start(), 1).await.unwrap();
    let (good, bad): (Vec<_>, Vec<_>) = page.records.into_iter().partition(Result::is_ok);
    assert_eq!(good.len() + bad.len(), 1000);
    assert!(bad.len() > 50 && bad.len() < 150, "{}", bad.len());
    for err in bad {
        let err = err.unwrap_err();
        assert!(err.reason.contains("registrationDate"), "{}", err.reason);
        let raw: serde_json::Value = serde_json::from_str(&err.raw).expect("raw JSON kept");
        assert!(raw["id"].is_i64());
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn shuffled_pages_move_records_between_pages() {
    let sim = start_sim(|c| {
        c.leads = 3000;
        c.shuffle_pages = true;
    })
    .await;
    let crm = client(&sim, |_| {});
    let mut q = since_start();
    q.filter = DateFilter::LastModified;
    let mut pages = crm.pages::<Lead>(q);
    let mut seen = 0;
    let mut ids = HashSet::new();
    while let Some(page) = pages.next().await {
        for r in page.unwrap().records {
            seen += 1;
            ids.insert(r.unwrap().model.id.unwrap());
        }
    }
    // Changes between page calls bring modified records to the front: some records are
    // served twice and others never, which is the drift the pipeline must detect.
    assert!(seen >= 3000);
    assert!(
        ids.len() < seen,
        "no record moved: {} distinct of {seen}",
        ids.len()
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn unreachable_crm_names_the_url() {
    let port = common::free_port();
    let config = ibstream::config::CrmConfig {
        base_url: format!("http://127.0.0.1:{port}"),
        max_retries: 1,
        ..common::crm_config_for_url()
    };
    let crm = ibstream::crm::CrmClient::build(&config).unwrap();
    let err = crm.login().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("http://127.0.0.1:{port}/api/v1/auth/login")),
        "{text}"
    );
    assert!(text.contains("connect"), "{text}");
    assert!(
        !text.contains("ib-secret") && !text.contains("sim-api-key"),
        "{text}"
    );
}
