//! Property tests (proptest, bounded for CI): what the CRM, the state topic and the
//! configuration hand ibstream never makes it panic, and every rejection is a typed error.
//! Page JSON: any JSON value where a record or a field is expected; then every record that
//! reads is encoded too (decimals that do not fit are `EncodeError`s, never panics).

use chrono_tz::Tz;
use ibstream::crm::models::{parse_accounts, parse_decimal};
use ibstream::crm::time::parse_timestamp_str;
use ibstream::crm::{parse_page, CrmRecord, Customer, Lead, Position, Transaction};
use ibstream::events::{AvroEvent, Encoder, EventMeta, Framing, Op, Schemas};
use ibstream::stream::state::State;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Any JSON value, nested a few levels, with the numbers and strings CRMs send.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[0-9]{1,45}(\\.[0-9]{0,20})?(e-?[0-9]{1,3})?"
            .prop_map(|n| { serde_json::from_str::<Value>(&n).unwrap_or(Value::Null) }),
        ".{0,30}".prop_map(Value::String),
        "[0-9 :T.+Z-]{0,30}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A record: the model's own field names with any values, plus unknown fields.
fn record(fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    (
        prop::collection::vec((prop::sample::select(fields), json_value()), 0..16),
        prop::collection::btree_map("[a-z]{1,8}", json_value(), 0..3),
    )
        .prop_map(|(known, unknown)| {
            let mut map: Map<String, Value> = unknown.into_iter().collect();
            for (name, value) in known {
                map.insert(name.to_owned(), value);
            }
            Value::Object(map)
        })
}

const LEAD: &[&str] = &[
    "id",
    "firstName",
    "email",
    "country",
    "registrationDate",
    "lastModifiedDate",
    "utmDetails",
    "tags",
    "status",
];
const CUSTOMER: &[&str] = &[
    "customerId",
    "id",
    "leadId",
    "conversionDate",
    "userAdditionalId",
    "ftdDate",
    "balanceUsd",
    "registrationDate",
    "tags",
];
const TRANSACTION: &[&str] = &[
    "id",
    "customerId",
    "type",
    "amount",
    "currency",
    "amountUsd",
    "transactionDate",
    "isFake",
];
const POSITION: &[&str] = &[
    "positionId",
    "login",
    "volume",
    "openPrice",
    "closePrice",
    "openTime",
    "closeTime",
    "profit",
    "commission",
    "swap",
];

fn meta() -> EventMeta {
    EventMeta {
        event_id: "e".to_owned(),
        op: Op::Created,
        emitted_at: chrono::Utc::now(),
        source: "s".to_owned(),
        endpoint: "/x".to_owned(),
        window: None,
        fetched_at: chrono::Utc::now(),
        connector_version: "0".to_owned(),
    }
}

/// Parses a page of `records` (in an envelope of any shape) and encodes what reads.
fn page_and_encode<T: CrmRecord + AvroEvent>(encoder: &mut Encoder, body: &[u8]) {
    if let Ok(page) = parse_page::<T>(body, 1, 1000, Tz::Europe__Bucharest, &[]) {
        for record in page.records.into_iter().flatten() {
            // Ok or a typed EncodeError; a panic fails the property.
            let _ = encoder.encode(&record.model, &meta());
        }
    }
}

/// Cases per property: 256 in CI; `FUZZ_CASES=20000 cargo test --test fuzz` for a long run.
fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn any_page_body_is_a_result(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_page::<Lead>(&bytes, 1, 1000, Tz::UTC, &[]);
    }

    #[test]
    fn any_json_answer_is_a_result(answer in json_value(), total in json_value()) {
        let body = json!({"total": total, "data": answer}).to_string();
        let _ = parse_page::<Transaction>(body.as_bytes(), 1, 1000, Tz::UTC, &[]);
        let _ = parse_page::<Position>(answer.to_string().as_bytes(), 1, 1000, Tz::UTC, &[]);
    }

    #[test]
    fn any_field_values_read_or_fail_alone_and_encode_or_fail_typed(
        leads in prop::collection::vec(record(LEAD), 0..4),
        customers in prop::collection::vec(record(CUSTOMER), 0..4),
        transactions in prop::collection::vec(record(TRANSACTION), 0..4),
        positions in prop::collection::vec(record(POSITION), 0..4),
    ) {
        let schemas = Schemas::load("com.ibstream").unwrap();
        let mut encoder = Encoder::new(&schemas, Framing::SingleObject).unwrap();
        let body = |records: Vec<Value>| json!({"total": records.len(), "data": records}).to_string();
        page_and_encode::<Lead>(&mut encoder, body(leads).as_bytes());
        page_and_encode::<Customer>(&mut encoder, body(customers).as_bytes());
        page_and_encode::<Transaction>(&mut encoder, body(transactions).as_bytes());
        page_and_encode::<Position>(&mut encoder, body(positions).as_bytes());
    }

    #[test]
    fn timestamps_decimals_and_accounts_of_any_text_are_results(text in ".{0,40}") {
        for tz in [Tz::UTC, Tz::Europe__Bucharest, Tz::America__New_York, Tz::Pacific__Kiritimati] {
            let _ = parse_timestamp_str(&text, tz);
        }
        if let Ok(d) = parse_decimal(&text) {
            let _ = ibstream::events::encode::decimal_bytes("amount", d);
        }
        let _ = parse_accounts(&text);
    }

    #[test]
    fn any_state_value_under_a_valid_key_is_a_result(
        key in prop::sample::select(vec![
            "cursor/leads/registration", "fps/3/leads", "fps/0/positions/mt4-live-01",
            "fp/leads/17", "fp/positions/mt4:9", "alive/ibstream", "barrier/x", "fps/x/leads",
        ]),
        value in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
    ) {
        let mut state = State::default();
        let _ = state.apply(key, value.as_deref());
        state.finish();
    }

    #[test]
    fn any_configuration_text_is_a_result(text in "[\\[\\]a-z_.=\" 0-9\n-]{0,120}") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        if let Ok(config) = ibstream::config::Config::load(Some(&path)) {
            let _ = ibstream::run::validate(&config);
        }
    }
}
