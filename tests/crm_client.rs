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
    other_stream.servers(&[]).await.unwrap();
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
    // Pages fetched only when asked for: the tokens expire between pages 2 and 3.
    let crm = client(&sim, |c| {
        c.page_size = 500;
        c.read_ahead_pages = 0;
    });
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
    let sim = start_sim(|c| c.max_rps = 1).await;
    let crm = client(&sim, |_| {});
    crm.login().await.unwrap();
    // Calls until one of them meets a 429 (wherever the simulator's one-second window falls,
    // two calls in a row soon land in one window): that call waits for Retry-After (1 s),
    // then succeeds.
    let mut waited = None;
    for _ in 0..10 {
        let limited = sim.stats().rate_limited.load(Ordering::Relaxed);
        let started = Instant::now();
        crm.page::<Lead>(&since_start(), 1)
            .await
            .expect("succeeds after waiting");
        if sim.stats().rate_limited.load(Ordering::Relaxed) > limited {
            waited = Some(started.elapsed());
            break;
        }
    }
    let waited = waited.expect("no call met a 429 in 10 calls at 1 call per second");
    assert!(waited >= Duration::from_millis(1000), "{waited:?}");
    assert!(waited < Duration::from_secs(20), "{waited:?}");
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

/// Waits until the simulator has served `pages` pages, then a little longer (so a page more
/// would be seen), and returns the pages served.
async fn pages_served_settle(sim: &ibstream::sim::SimHandle, pages: u64) -> u64 {
    let served = || sim.stats().pages.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served() < pages && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    served()
}

#[tokio::test]
async fn pages_are_read_ahead_up_to_the_bound_with_the_requests_of_reading_in_turn() {
    let sim = start_sim(|c| c.leads = 5000).await;
    let crm = client(&sim, |c| {
        c.page_size = 500;
        c.read_ahead_pages = 3;
    });
    let mut pages = crm.pages::<Lead>(since_start());
    let first = pages.next().await.unwrap().unwrap();
    let first_total = first.total;
    assert_eq!(first.page, 1);
    // While page 1 is being worked on: pages 2-4 wait in the queue and page 5 waits to join
    // it; no more.
    assert_eq!(pages_served_settle(&sim, 5).await, 5);
    let mut numbers = vec![first.page];
    let mut ids: HashSet<i64> = first
        .records
        .into_iter()
        .map(|r| r.unwrap().model.id.unwrap())
        .collect();
    let mut ready = 0;
    loop {
        let page = match pages.ready() {
            Some(page) => {
                ready += 1;
                page
            }
            None => match pages.next().await {
                Some(page) => page,
                None => break,
            },
        };
        let page = page.unwrap();
        numbers.push(page.page);
        ids.extend(
            page.records
                .into_iter()
                .map(|r| r.unwrap().model.id.unwrap()),
        );
    }
    assert_eq!(
        numbers,
        (1..=10).collect::<Vec<_>>(),
        "pages in order, once"
    );
    assert_eq!(Some(ids.len() as u64), first_total, "every record once");
    assert!(
        ready >= 3,
        "pages already fetched are handed out without waiting"
    );
    // The same requests as reading page after page: one per page, none past the last.
    assert_eq!(pages_served_settle(&sim, 10).await, 10);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_window_its_reader_will_split_is_not_read_ahead() {
    let sim = start_sim(|c| c.leads = 5000).await;
    let crm = client(&sim, |c| c.page_size = 500);
    let mut query = since_start();
    query.max_records = 1000;
    let mut pages = crm.pages::<Lead>(query);
    let first = pages.next().await.unwrap().unwrap();
    assert_eq!(first.total, Some(5000));
    assert_eq!(pages_served_settle(&sim, 1).await, 1, "only page 1 is read");
    // A reader that reads on anyway (a day cannot be split) gets the next pages.
    assert_eq!(pages.next().await.unwrap().unwrap().page, 2);
    drop(pages);
    sim.shutdown().await;
}

/// `crm.read_ahead_pages = 0` turns read-ahead off in the background class too (a sweep, whose
/// windows are read with `pages_in_background`): no page is requested before the caller asks
/// for it, so one request at a time. It used to read one page ahead (`.max(1)`), both by a
/// task and by asking the window's next page ahead.
#[tokio::test]
async fn without_read_ahead_a_background_read_asks_for_no_page_before_its_caller() {
    let sim = start_sim(|c| c.leads = 2500).await;
    let crm = client(&sim, |c| {
        c.page_size = 1000;
        c.read_ahead_pages = 0;
    });
    let mut pages = crm.pages_in_background::<Lead>(since_start());
    assert_eq!(pages_served_settle(&sim, 0).await, 0, "a page before asked");
    let mut ids = HashSet::new();
    for number in 1..=3 {
        let page = pages.next().await.unwrap().unwrap();
        assert_eq!(page.page, number);
        ids.extend(
            page.records
                .into_iter()
                .map(|r| r.unwrap().model.id.unwrap()),
        );
        assert_eq!(
            pages_served_settle(&sim, u64::from(number)).await,
            u64::from(number),
            "page {number} in hand: a page asked for ahead"
        );
    }
    assert!(pages.next().await.is_none());
    assert_eq!(ids, lead_ids(&sim), "every record once");
    sim.shutdown().await;
}

/// A reader's pages asked for ahead count as unread until handed out, the next in order the
/// oldest: a poller forgets the reads it remembered before every reader's oldest (see
/// `Poller::forget_reads_before`).
#[tokio::test]
async fn the_oldest_unread_page_is_the_next_one_handed_out() {
    let sim = start_sim(|c| c.leads = 2500).await;
    let crm = client(&sim, |c| {
        c.page_size = 1000;
        c.read_ahead_pages = 3;
    });
    let mut pages = crm.pages_in_background::<Lead>(since_start());
    let first = pages.next().await.unwrap().unwrap();
    // Pages 2 and 3 were asked for before page 1 was passed on.
    let oldest = pages.oldest_unread();
    assert!(
        oldest.is_some_and(|oldest| oldest > first.sent),
        "{oldest:?}"
    );
    let second = pages.next().await.unwrap().unwrap();
    assert_eq!(Some(second.sent), oldest);
    let third = pages.next().await.unwrap().unwrap();
    assert!(third.sent > second.sent);
    assert!(pages.next().await.is_none());
    assert_eq!(
        pages.oldest_unread(),
        None,
        "nothing is awaited after the end"
    );
    sim.shutdown().await;
}

/// Reads every page of a leads query since the start; returns the ids and the page sizes.
async fn read_all(crm: &ibstream::crm::CrmClient) -> Result<(Vec<i64>, Vec<usize>), CrmError> {
    let mut pages = crm.pages::<Lead>(since_start());
    let (mut ids, mut sizes) = (Vec::new(), Vec::new());
    let read = async {
        while let Some(page) = pages.next().await {
            let page = page?;
            sizes.push(page.records.len());
            ids.extend(
                page.records
                    .into_iter()
                    .map(|r| r.unwrap().model.id.unwrap()),
            );
        }
        Ok::<_, CrmError>(())
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("paging ends")?;
    Ok((ids, sizes))
}

fn lead_ids(sim: &ibstream::sim::SimHandle) -> HashSet<i64> {
    sim.truth(ibstream::sim::Kind::Leads)
        .iter()
        .map(|l| l["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn answers_without_total_are_paged_until_a_short_page() {
    for (leads, want) in [(2345, vec![1000, 1000, 345]), (2000, vec![1000, 1000, 0])] {
        let sim = start_sim(|c| {
            c.leads = leads;
            c.omit_total = true;
        })
        .await;
        let (ids, sizes) = read_all(&client(&sim, |_| {})).await.unwrap();
        assert_eq!(sizes, want);
        assert_eq!(ids.len(), leads, "no record twice");
        assert_eq!(ids.into_iter().collect::<HashSet<_>>(), lead_ids(&sim));
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn a_crm_ignoring_page_without_total_fails_the_read_at_the_first_full_page_without_new_ids() {
    let sim = start_sim(|c| {
        c.leads = 2345;
        c.omit_total = true;
        c.ignore_page = true;
    })
    .await;
    // Every page is the first one, always full: the second brings no new id. Paging stops
    // there instead of running forever, and says the window cannot be read whole (the
    // pipeline keeps it open) rather than ending as if it were.
    let err = read_all(&client(&sim, |_| {})).await.unwrap_err();
    assert!(
        matches!(&err, CrmError::Paging { reason, .. } if reason.contains("ignores the `page` parameter")),
        "{err:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_crm_ignoring_page_with_a_total_reads_the_pages_the_total_asks_for() {
    let sim = start_sim(|c| {
        c.leads = 2345;
        c.ignore_page = true;
    })
    .await;
    let (ids, sizes) = read_all(&client(&sim, |_| {})).await.unwrap();
    assert_eq!(sizes, vec![1000, 1000, 1000]);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 1000);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_crm_capping_the_page_size_is_paged_by_what_it_serves() {
    let sim = start_sim(|c| {
        c.leads = 2345;
        c.page_cap = 100;
    })
    .await;
    // pageSize=1000 is asked, 100 are served: paging goes on by 100, so nothing is skipped.
    let crm = client(&sim, |c| c.page_size = 1000);
    let (ids, sizes) = read_all(&crm).await.unwrap();
    assert_eq!(sizes.len(), 24, "{sizes:?}");
    assert!(sizes[..23].iter().all(|&n| n == 100), "{sizes:?}");
    assert_eq!(sizes[23], 45);
    assert_eq!(ids.len(), 2345, "no record twice");
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), lead_ids(&sim));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_total_that_grows_on_every_call_ends_in_a_paging_error() {
    let sim = start_sim(|c| {
        c.leads = 2345;
        c.growing_total = 1000;
    })
    .await;
    let err = read_all(&client(&sim, |_| {})).await.unwrap_err();
    assert!(matches!(err, CrmError::Paging { .. }), "{err:?}");
    assert!(err.is_transient(), "the next cycle tries again");
    assert!(err.to_string().contains("did not end"), "{err}");
    // First total 3345: 4 pages, plus the margin of 2.
    assert_eq!(sim.stats().pages.load(Ordering::Relaxed), 6);
    sim.shutdown().await;

    // A total that grows a little (records arriving while paging) still ends, complete.
    let sim = start_sim(|c| {
        c.leads = 2345;
        c.growing_total = 1;
    })
    .await;
    let (ids, _) = read_all(&client(&sim, |_| {})).await.unwrap();
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), lead_ids(&sim));
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
    let servers = crm.servers(&[]).await.unwrap();
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

/// A server that records every request it receives (method, path, headers, body).
async fn recording_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::extract::Request;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |request: Request| {
        let log = log.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            log.lock().unwrap().push(format!(
                "{} {} {:?} {}",
                parts.method,
                parts.uri,
                parts.headers,
                String::from_utf8_lossy(&body)
            ));
            "{}"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// A CRM that logs in normally but redirects (`status`) every other call to `target`; with
/// `redirect_login`, the login too.
async fn redirecting_crm(target: String, status: u16, redirect_login: bool) -> String {
    use axum::extract::Request;
    use axum::http::{header::LOCATION, StatusCode};
    use axum::response::IntoResponse;
    let app = axum::Router::new().fallback(move |request: Request| {
        let target = target.clone();
        async move {
            let path = request.uri().path().to_owned();
            if path.ends_with("/auth/login") && !redirect_login {
                return (StatusCode::OK, r#"{"token": "t0k3n-secret"}"#).into_response();
            }
            let status = StatusCode::from_u16(status).unwrap();
            (status, [(LOCATION, format!("{target}{path}"))], "").into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn redirects_are_not_followed_and_no_secret_reaches_another_origin() {
    let (elsewhere, seen) = recording_server().await;
    for (status, redirect_login) in [(302, false), (307, false), (307, true), (301, true)] {
        let crm_url = redirecting_crm(elsewhere.clone(), status, redirect_login).await;
        let config = ibstream::config::CrmConfig {
            base_url: crm_url.clone(),
            max_retries: 0,
            ..common::crm_config_for_url()
        };
        let crm = ibstream::crm::CrmClient::build(&config).unwrap();
        let err = if redirect_login {
            crm.login().await.unwrap_err()
        } else {
            crm.get_raw(Endpoint::Servers, &[]).await.unwrap_err()
        };
        let text = err.to_string();
        assert!(matches!(err, CrmError::Unusable { .. }), "{err:?}");
        assert!(
            text.contains("redirect") && text.contains(&elsewhere),
            "{text}"
        );
        assert!(
            !text.contains("ib-secret") && !text.contains("sim-api-key") && !text.contains("t0k3n"),
            "{text}"
        );
    }
    let seen = seen.lock().unwrap();
    assert!(
        seen.is_empty(),
        "the other origin received requests: {:?}",
        *seen
    );
}

#[tokio::test]
async fn answers_above_the_size_limit_are_a_clear_error() {
    let sim = start_sim(|c| c.leads = 3000).await;
    let crm = client(&sim, |c| c.max_response_bytes = 64 * 1024);
    let err = crm.page::<Lead>(&since_start(), 1).await.unwrap_err();
    assert!(matches!(err, CrmError::Unusable { .. }), "{err:?}");
    assert!(err.to_string().contains("crm.max_response_bytes"), "{err}");
    // Small pages fit.
    let crm = client(&sim, |c| {
        c.max_response_bytes = 64 * 1024;
        c.page_size = 10;
    });
    assert_eq!(
        crm.page::<Lead>(&since_start(), 1)
            .await
            .unwrap()
            .records
            .len(),
        10
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn an_https_crm_with_a_private_ca_needs_crm_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    common::test_pki(dir.path());
    let sim = start_sim(|c| {
        c.tls_cert = Some(dir.path().join("server.pem"));
        c.tls_key = Some(dir.path().join("server.key"));
    })
    .await;
    assert!(sim.base_url().starts_with("https://127.0.0.1:"));
    // Trusting the CA: login and a page work over TLS.
    let crm = client(&sim, |c| c.ca_file = Some(dir.path().join("ca.pem")));
    crm.login().await.unwrap();
    let page = crm.page::<Lead>(&since_start(), 1).await.unwrap();
    assert!(!page.records.is_empty());
    // Without it the certificate is not trusted, and the error says what to set.
    let crm = client(&sim, |c| c.max_retries = 0);
    let err = crm.login().await.unwrap_err().to_string();
    assert!(
        err.contains("certificate") && err.contains("crm.ca_file"),
        "{err}"
    );
    // A CA file that is not one is a configuration error naming the key.
    std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
    let mut config = common::crm_config(&sim);
    config.ca_file = Some(dir.path().join("junk.pem"));
    let err = ibstream::crm::CrmClient::build(&config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("crm.ca_file"), "{err}");
    sim.shutdown().await;
}

/// A CRM that answers its first data call 429 with `Retry-After: 1` and every other one
/// `{}` after `latency`, recording when each data call arrived.
async fn limiting_crm(
    latency: Duration,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Instant>>>) {
    use axum::extract::Request;
    use axum::http::{header::RETRY_AFTER, StatusCode};
    use axum::response::IntoResponse;
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = arrivals.clone();
    let app = axum::Router::new().fallback(move |request: Request| {
        let log = log.clone();
        async move {
            if request.uri().path().ends_with("/auth/login") {
                return (StatusCode::OK, r#"{"token": "t0k3n"}"#).into_response();
            }
            let first = {
                let mut log = log.lock().unwrap();
                log.push(Instant::now());
                log.len() == 1
            };
            if first {
                return (StatusCode::TOO_MANY_REQUESTS, [(RETRY_AFTER, "1")], "").into_response();
            }
            tokio::time::sleep(latency).await;
            (StatusCode::OK, "{}").into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, arrivals)
}

/// After a 429's pause the calls that waited go out at `crm.requests_per_second`, not as a
/// burst: the gate grants nothing during the pause (calls granted then used to wait holding
/// their slots and all went out at its end, while the gate kept granting at the rate).
#[tokio::test]
async fn after_a_429_pause_no_second_has_more_calls_than_the_rate() {
    const RATE: usize = 10;
    let (url, arrivals) = limiting_crm(Duration::from_millis(150)).await;
    let config = ibstream::config::CrmConfig {
        base_url: url,
        requests_per_second: RATE as u32,
        max_concurrent_requests: 16,
        ..common::crm_config_for_url()
    };
    let crm = ibstream::crm::CrmClient::build(&config).unwrap();
    crm.login().await.unwrap();
    let calls: Vec<_> = (0..25)
        .map(|_| {
            let crm = crm.clone();
            tokio::spawn(async move { crm.get_raw(Endpoint::Servers, &[]).await })
        })
        .collect();
    for call in calls {
        call.await
            .unwrap()
            .expect("every call succeeds after the pause");
    }
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 26, "25 calls and the one retry");
    let pause_end = arrivals[0] + Duration::from_secs(1);
    assert!(
        arrivals[1..]
            .iter()
            .all(|&at| at >= pause_end - Duration::from_millis(20)),
        "a call went out during the pause"
    );
    // Any second (less 50 ms of the scheduler's jitter between grant and arrival).
    let window = Duration::from_millis(950);
    let busiest = arrivals
        .iter()
        .map(|&start| {
            arrivals
                .iter()
                .filter(|&&at| at >= start && at < start + window)
                .count()
        })
        .max()
        .unwrap();
    assert!(
        busiest <= RATE,
        "{busiest} calls within {window:?} at {RATE} a second: {:?}",
        arrivals
            .iter()
            .map(|at| at.duration_since(arrivals[0]).as_millis())
            .collect::<Vec<_>>()
    );
}

/// A login asked by a backfill's call (in the background class) goes before the backfill's
/// queue: every call of the process, steady-state ones included, waits for the token it
/// fetches while holding the token's lock.
#[tokio::test]
async fn a_login_asked_in_the_background_does_not_queue_behind_the_backfill() {
    use ibstream::crm::pressure::in_background;
    let (url, _arrivals) = limiting_crm(Duration::from_millis(0)).await;
    let config = ibstream::config::CrmConfig {
        base_url: url,
        max_concurrent_requests: 1,
        ..common::crm_config_for_url()
    };
    let crm = ibstream::crm::CrmClient::build(&config).unwrap();
    let pressure = crm.pressure();
    // The one slot held, and a backfill's pages queued behind it.
    let held = pressure.acquire_as(None).await;
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut backfill = Vec::new();
    for rank in 1..=5 {
        let (pressure, order) = (pressure.clone(), order.clone());
        backfill.push(tokio::spawn(async move {
            let _slot = pressure.acquire_as(Some(rank)).await;
            order.lock().unwrap().push("backfill");
            // A page's round trip.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }));
    }
    let login = {
        let (crm, order) = (crm.clone(), order.clone());
        tokio::spawn(in_background(1, async move {
            crm.login().await.unwrap();
            order.lock().unwrap().push("login");
        }))
    };
    // Every one queued (the login's request waits for the slot too) before the slot goes
    // back; a deadline, not a sleep.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pressure.queued() < 6 {
        assert!(
            Instant::now() < deadline,
            "{} calls queued",
            pressure.queued()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(held);
    let bound = Duration::from_secs(10);
    tokio::time::timeout(bound, login)
        .await
        .expect("the login ends")
        .unwrap();
    for task in backfill {
        tokio::time::timeout(bound, task)
            .await
            .expect("the backfill ends")
            .unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order.first().copied(),
        Some("login"),
        "the login queued behind the backfill: {order:?}"
    );
}
