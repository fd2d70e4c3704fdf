//! CRM answers as real CRMs write them, end to end (issue 15, section B): errors carried by
//! HTTP 200, expired tokens answered 403, compressed bodies with a byte-order mark and records
//! holding a byte that is not UTF-8, all at once. Nothing is lost: every readable record is
//! in its topic as the truth has it, every record that is not UTF-8 is a dead letter, and no
//! stream stops.

use super::*;
use ibstream::sim::{BodyQuirk, Error200};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_answers_as_real_crms_write_them_lose_no_record() {
    let broker = common::ApacheKafka::shared();
    let sim = common::start_sim(|c| {
        c.leads = 1_500;
        c.customers = 600;
        c.transactions = 2_000;
        c.positions = 3_000;
        c.servers = 2;
        c.error_200 = Some(Error200::SuccessFalse);
        c.expired_token_status = 403;
        c.body_quirks = vec![BodyQuirk::Bom, BodyQuirk::GzipUnlabelled];
    })
    .await;
    // Records whose name (leads) or payment method (transactions) holds a Latin-1 byte.
    let mut bad: HashSet<(String, String)> = HashSet::new();
    for (kind, stream, field) in [
        (Kind::Leads, "leads", "firstName"),
        (Kind::Transactions, "transactions", "paymentMethod"),
    ] {
        for record in sim
            .truth(kind)
            .iter()
            .filter(|r| r[field].is_string() && r["isFake"] != true)
            .step_by(331)
            .take(3)
        {
            let id = record["id"].to_string();
            sim.latin1_record(kind, &id, true);
            bad.insert((stream.to_owned(), id));
        }
    }
    assert_eq!(bad.len(), 6);
    let prefix = common::unique_topic("answers");
    let schemas = Schemas::load("com.ibstream").unwrap();
    let mut cfg = config(&sim, &broker, &prefix, "answers-1");
    cfg.crm.page_size = 200;
    let run = start(cfg);
    run.wait_cycles(&HashMap::new(), &STREAMS, 1, Duration::from_secs(300))
        .await;
    // From now on every call meets a 403 first: each stream goes on after one login.
    let logins = sim.stats().logins.load(Ordering::Relaxed);
    sim.expire_tokens();
    let after = run.cycles();
    run.wait_cycles(&after, &STREAMS, 2, Duration::from_secs(300))
        .await;
    run.stop().await;
    assert!(sim.stats().errors_200.load(Ordering::Relaxed) > 50);
    assert!(sim.stats().forbidden.load(Ordering::Relaxed) > 0);
    assert_eq!(sim.stats().logins.load(Ordering::Relaxed), logins + 1);

    // Every record that is not UTF-8 is a dead letter, once, naming the field and the byte.
    let letters = consume(
        &broker.bootstrap,
        &[format!("{prefix}.dlq")],
        bad.len(),
        Duration::from_secs(2),
    )
    .await;
    let mut lettered = HashSet::new();
    for letter in &letters {
        let value: Json = serde_json::from_slice(&letter.payload).unwrap();
        let error = value["error"].as_str().unwrap();
        assert!(
            error.contains("0xE9") && error.contains("not UTF-8") && error.contains('`'),
            "{value}"
        );
        let text = value["raw"].to_string();
        assert!(text.contains('\u{FFFD}'), "{value}");
        // Keyed like the entity's events (its id is readable though a name is not).
        let id = value["raw"]["id"].to_string();
        assert_eq!(letter.key, id, "{value}");
        assert_eq!(value["key"].as_str(), Some(id.as_str()), "{value}");
        lettered.insert((
            value["stream"].as_str().unwrap().to_owned(),
            value["raw"]["id"].to_string(),
        ));
    }
    assert_eq!(lettered, bad);
    assert_eq!(letters.len(), bad.len(), "re-reads add no dead letter");

    // Every other record is in its topic as the truth has it.
    let records = consume(
        &broker.bootstrap,
        &data_topics(&prefix),
        truth_count(&sim) - bad.len(),
        Duration::from_secs(2),
    )
    .await;
    let events = group(&schemas, &prefix, &records);
    for stream in STREAMS {
        let mut truth = expected(&sim, stream);
        truth.retain(|key, _| !bad.contains(&(stream.to_owned(), key.clone())));
        let got = events.get(stream).cloned().unwrap_or_default();
        let missing: Vec<_> = truth.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !truth.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{stream}: {} of {} missing (e.g. {:?}), extra {:?}",
            missing.len(),
            truth.len(),
            &missing[..missing.len().min(5)],
            &extra[..extra.len().min(5)]
        );
        for (key, expected) in &truth {
            // A customer's balance moves without an event, by design (as truth_mismatch).
            let latest: Vec<_> = body(got[key].last().unwrap())
                .into_iter()
                .filter(|(name, _)| name != "balanceUsd")
                .collect();
            assert_eq!(&latest, expected, "{stream} {key}");
        }
    }
    sim.shutdown().await;
}
