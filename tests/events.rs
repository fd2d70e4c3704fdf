//! The Avro event model: round trips, decimals, time zones, `extra`, framing, the registry,
//! and interoperability with fastavro (Python), an independent Avro implementation.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::Ordering;

use apache_avro::types::Value as Avro;
use apache_avro::{from_avro_datum, Schema};
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use ibstream::crm::models::{Person, TagCategory, UtmDetails};
use ibstream::crm::{parse_page, Customer, Lead, Position, Server, TradingAccount, Transaction};
use ibstream::events::{
    encoder_for, to_value, AvroEvent, EncodeError, Encoder, EventMeta, EventType, Framing, Op,
    RegistryError, Schemas,
};
use rust_decimal::Decimal;
use serde_json::{json, Value as Json};

fn dec(text: &str) -> Option<Decimal> {
    Some(Decimal::from_str(text).unwrap())
}

fn at(text: &str) -> Option<DateTime<Utc>> {
    Some(
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc),
    )
}

fn meta(op: Op) -> EventMeta {
    EventMeta {
        event_id: "9f2c4e01a7b3d5c6".to_owned(),
        op,
        emitted_at: at("2024-05-01T10:00:01.250Z").unwrap(),
        source: "crm.example-broker.com".to_owned(),
        endpoint: "/api/v1/ib/leads".to_owned(),
        window: Some((
            NaiveDate::from_ymd_opt(2024, 4, 30).unwrap(),
            NaiveDate::from_ymd_opt(2024, 5, 1).unwrap(),
        )),
        fetched_at: at("2024-05-01T10:00:00.500Z").unwrap(),
        connector_version: "0.1.0".to_owned(),
    }
}

fn extra() -> ibstream::crm::models::Extra {
    [
        ("score".to_owned(), json!(7)),
        ("owner".to_owned(), json!({"name": "desk 3"})),
    ]
    .into_iter()
    .collect()
}

fn person() -> Person {
    Person {
        first_name: Some("Maria".into()),
        last_name: Some("Ionescu".into()),
        email: Some("maria.i@example.org".into()),
        phone: Some("+40712345678".into()),
        country: Some("RO".into()),
        language: Some("ro".into()),
        status: Some("New".into()),
        affiliate_id: Some("IB-1042".into()),
        campaign: Some("spring-webinar".into()),
        registration_date: at("2019-03-14T09:21:44Z"),
        last_modified_date: at("2019-03-15T10:01:02Z"),
        utm_details: Some(UtmDetails {
            utm_source: Some("ib-portal".into()),
            utm_medium: Some("referral".into()),
            utm_campaign: Some("spring".into()),
            utm_content: None,
            utm_term: Some("fx".into()),
        }),
        tags: Some(vec![
            TagCategory {
                category: Some("Marketing".into()),
                tags: vec!["webinar".into(), "vip".into()],
            },
            TagCategory {
                category: None,
                tags: vec![],
            },
        ]),
    }
}

fn lead() -> Lead {
    Lead {
        id: Some(100231),
        person: person(),
        extra: extra(),
    }
}

fn customer() -> Customer {
    Customer {
        customer_id: Some(5501),
        id: Some(5501),
        lead_id: Some(100231),
        person: person(),
        conversion_date: at("2019-03-20T14:00:00Z"),
        user_additional_id: Some("(12345, mt4-live-01, live), (88112, mt5-live-02, live)".into()),
        accounts: vec![
            TradingAccount {
                login: "12345".into(),
                server: "mt4-live-01".into(),
                account_type: Some("live".into()),
            },
            TradingAccount {
                login: "88112".into(),
                server: "mt5-live-02".into(),
                account_type: None,
            },
        ],
        ftd_date: at("2019-03-21T08:30:00Z"),
        balance_usd: dec("12345678901234567890.12345678"),
        extra: extra(),
    }
}

fn transaction() -> Transaction {
    Transaction {
        id: Some(9000123),
        customer_id: Some(5501),
        transaction_type: Some("Withdrawal".into()),
        amount: dec("-0.00000001"),
        currency: Some("EUR".into()),
        amount_usd: dec("0"),
        transaction_date: at("2019-03-21T08:30:00Z"),
        payment_method: Some("CreditCard".into()),
        trading_account: Some("12345".into()),
        server_tag: Some("mt4-live-01".into()),
        product_id: Some("N/A".into()),
        is_fake: Some(true),
        extra: extra(),
    }
}

fn server() -> Server {
    Server {
        platform: Some("mt4".into()),
        id: Some("mt4-live-01".into()),
        name: Some("MT4 Live 1".into()),
        server_type: Some("live".into()),
        extra: extra(),
    }
}

fn position() -> Position {
    Position {
        position_id: Some(77001234),
        login: Some("12345".into()),
        server_tag: Some("mt4-live-01".into()),
        customer_id: Some(5501),
        symbol: Some("EURUSD".into()),
        side: Some("Buy".into()),
        volume: dec("1.50"),
        open_price: dec("1.08123"),
        close_price: dec("1.08456"),
        open_time: at("2019-03-22T09:00:01Z"),
        close_time: at("2019-03-22T11:45:10.123Z"),
        profit: dec("49.95"),
        commission: dec("-7.00"),
        swap: dec("-0.12"),
        currency: Some("USD".into()),
        extra: extra(),
    }
}

fn schemas() -> Schemas {
    Schemas::load("com.ibstream").unwrap()
}

/// Decodes a single-object-framed event with apache-avro after checking its header.
fn decode(schemas: &Schemas, event: EventType, bytes: &[u8]) -> Avro {
    assert_eq!(&bytes[..2], &[0xC3, 0x01]);
    assert_eq!(&bytes[2..10], &schemas.get(event).fingerprint);
    let schema = &schemas.get(event).schema;
    from_avro_datum(schema, &mut &bytes[10..], Some(schema)).unwrap()
}

fn field<'a>(record: &'a Avro, name: &str) -> &'a Avro {
    match record {
        Avro::Record(fields) => {
            &fields
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no field {name}"))
                .1
        }
        other => panic!("not a record: {other:?}"),
    }
}

fn some(value: &Avro) -> &Avro {
    match value {
        Avro::Union(1, inner) => inner,
        other => panic!("not a non-null union: {other:?}"),
    }
}

fn decimal_of(value: &Avro) -> i128 {
    match some(value) {
        Avro::Decimal(d) => {
            let bytes: Vec<u8> = d.try_into().unwrap();
            assert_eq!(bytes.len(), 16, "decimals are written 16 bytes wide");
            i128::from_be_bytes(bytes.try_into().unwrap())
        }
        other => panic!("not a decimal: {other:?}"),
    }
}

fn round_trip<E: AvroEvent>(encoder: &mut Encoder, schemas: &Schemas, entity: &E, op: Op) -> Avro {
    let bytes = encoder.encode(entity, &meta(op)).unwrap();
    let decoded = decode(schemas, E::EVENT, &bytes);
    // Every field comes back as it went in (apache-avro reads its own writing).
    assert_eq!(decoded, to_value(entity, &meta(op)).unwrap());
    decoded
}

#[test]
fn every_event_type_round_trips_with_all_fields_set() {
    let schemas = schemas();
    let mut encoder = Encoder::new(&schemas, Framing::SingleObject).unwrap();
    let lead = round_trip(&mut encoder, &schemas, &lead(), Op::Created);
    assert_eq!(some(field(&lead, "id")), &Avro::Long(100231));
    assert_eq!(
        some(field(&lead, "registrationDate")),
        &Avro::TimestampMillis(1552555304000)
    );
    let meta = field(&lead, "meta");
    assert_eq!(field(meta, "op"), &Avro::Enum(0, "CREATED".into()));
    assert_eq!(some(field(meta, "windowFrom")), &Avro::Date(19843));
    assert_eq!(
        field(meta, "fetchedAt"),
        &Avro::TimestampMillis(1714557600500)
    );

    let customer = round_trip(&mut encoder, &schemas, &customer(), Op::Updated);
    assert_eq!(
        decimal_of(field(&customer, "balanceUsd")),
        1_234_567_890_123_456_789_012_345_678
    );
    match field(&customer, "accounts") {
        Avro::Array(accounts) => assert_eq!(accounts.len(), 2),
        other => panic!("{other:?}"),
    }
    let txn = round_trip(&mut encoder, &schemas, &transaction(), Op::Created);
    assert_eq!(decimal_of(field(&txn, "amount")), -1);
    assert_eq!(decimal_of(field(&txn, "amountUsd")), 0);
    round_trip(&mut encoder, &schemas, &server(), Op::Created);
    let position = round_trip(&mut encoder, &schemas, &position(), Op::Created);
    assert_eq!(decimal_of(field(&position, "closePrice")), 108_456_000);
    assert_eq!(
        some(field(&position, "closeTime")),
        &Avro::TimestampMillis(1553255110123)
    );
}

#[test]
fn every_event_type_round_trips_with_all_optional_fields_null() {
    let schemas = schemas();
    let mut encoder = Encoder::new(&schemas, Framing::SingleObject).unwrap();
    let decoded = [
        round_trip(&mut encoder, &schemas, &Lead::default(), Op::Created),
        round_trip(&mut encoder, &schemas, &Customer::default(), Op::Created),
        round_trip(&mut encoder, &schemas, &Transaction::default(), Op::Created),
        round_trip(&mut encoder, &schemas, &Server::default(), Op::Created),
        round_trip(&mut encoder, &schemas, &Position::default(), Op::Created),
    ];
    for record in &decoded {
        let Avro::Record(fields) = record else {
            panic!()
        };
        for (name, value) in fields {
            match name.as_str() {
                "meta" => {}
                "extra" => assert_eq!(value, &Avro::Map(HashMap::new())),
                "accounts" => assert_eq!(value, &Avro::Array(vec![])),
                _ => assert_eq!(value, &Avro::Union(0, Box::new(Avro::Null)), "{name}"),
            }
        }
    }
}

#[test]
fn decimals_that_do_not_fit_are_rejected_not_rounded() {
    let schemas = schemas();
    let mut encoder = Encoder::new(&schemas, Framing::SingleObject).unwrap();
    let mut t = transaction();
    t.amount = dec("10.123456789");
    match encoder.encode(&t, &meta(Op::Created)) {
        Err(EncodeError::Decimal {
            field: "amount",
            reason,
            ..
        }) => assert_eq!(reason, "more than 8 decimals"),
        other => panic!("{other:?}"),
    }
    // Text too large for decimal(38, 8) never becomes a model: the record fails when read.
    let body =
        br#"{"total": 1, "data": [{"id": 1, "amount": "1234567890123456789012345678901.5"}]}"#;
    let page = parse_page::<Transaction>(body, 1, 1000, Tz::UTC, &[]).unwrap();
    let err = page.records.into_iter().next().unwrap().unwrap_err();
    assert!(err.reason.contains("`amount`"), "{}", err.reason);
}

#[test]
fn local_times_across_dst_changes_become_the_right_instants() {
    let schemas = schemas();
    let mut encoder = Encoder::new(&schemas, Framing::SingleObject).unwrap();
    let tz: Tz = "Europe/Berlin".parse().unwrap();
    let body = br#"{"total": 3, "data": [
        {"id": 1, "registrationDate": "2024-03-31 01:59:59", "lastModifiedDate": "2024-03-31 03:00:00"},
        {"id": 2, "registrationDate": "2024-10-27 02:30:00", "lastModifiedDate": "2024-10-27 03:30:00"},
        {"id": 3, "registrationDate": "2024-03-31 02:30:00", "lastModifiedDate": "2024-07-01 12:00:00"}]}"#;
    let page = parse_page::<Lead>(body, 1, 1000, tz, &[]).unwrap();
    let expected = [
        ("2024-03-31T00:59:59Z", "2024-03-31T01:00:00Z"), // CET, then CEST: one real second apart
        ("2024-10-27T00:30:00Z", "2024-10-27T02:30:00Z"), // ambiguous 02:30 takes the earlier (CEST)
        ("2024-03-31T01:30:00Z", "2024-07-01T10:00:00Z"), // 02:30 in the gap is shifted to 03:30 CEST
    ];
    for (record, (reg, modified)) in page.records.into_iter().zip(expected) {
        let lead = record.unwrap().model;
        let decoded = decode(
            &schemas,
            EventType::Lead,
            &encoder.encode(&lead, &meta(Op::Created)).unwrap(),
        );
        let millis = |t: &str| Avro::TimestampMillis(at(t).unwrap().timestamp_millis());
        assert_eq!(some(field(&decoded, "registrationDate")), &millis(reg));
        assert_eq!(some(field(&decoded, "lastModifiedDate")), &millis(modified));
    }
}

#[test]
fn unknown_fields_land_in_extra_as_json_text() {
    let schemas = schemas();
    let mut encoder = Encoder::new(&schemas, Framing::SingleObject).unwrap();
    let body = br#"{"total": 1, "data": [{"id": 1, "score": 7.50, "owner": {"name": "desk 3"}, "vip": true,
        "utmDetails": {"utmSource": "x", "utmId": "abc"}}]}"#;
    let lead = parse_page::<Lead>(body, 1, 1000, Tz::UTC, &[])
        .unwrap()
        .records
        .remove(0)
        .unwrap()
        .model;
    let decoded = decode(
        &schemas,
        EventType::Lead,
        &encoder.encode(&lead, &meta(Op::Created)).unwrap(),
    );
    let Avro::Map(extra) = field(&decoded, "extra") else {
        panic!()
    };
    assert_eq!(extra.len(), 4);
    assert_eq!(extra["score"], Avro::String("7.50".into()));
    assert_eq!(extra["owner"], Avro::String(r#"{"name":"desk 3"}"#.into()));
    assert_eq!(extra["vip"], Avro::String("true".into()));
    assert_eq!(extra["utmDetails.utmId"], Avro::String(r#""abc""#.into()));
}

/// CRC-64-AVRO as the Avro specification gives it ("Schema Fingerprints"), written here
/// independently of apache-avro's implementation.
fn crc64_avro(data: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    let mut table = [0u64; 256];
    for (i, slot) in table.iter_mut().enumerate() {
        let mut fp = i as u64;
        for _ in 0..8 {
            fp = (fp >> 1) ^ (EMPTY & (0u64.wrapping_sub(fp & 1)));
        }
        *slot = fp;
    }
    let mut fp = EMPTY;
    for &b in data {
        fp = (fp >> 8) ^ table[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp
}

#[test]
fn single_object_header_follows_the_spec() {
    // The empty input hashes to the spec's EMPTY constant.
    assert_eq!(crc64_avro(b""), 0xc15d_213a_a4d7_a795);
    let schemas = schemas();
    let mut encoder = Encoder::new(&schemas, Framing::SingleObject).unwrap();
    for event in EventType::ALL {
        let canonical = &schemas.get(event).canonical_form;
        // The parsing canonical form keeps no docs, defaults or logical types.
        assert!(
            !canonical.contains("\"doc\"")
                && !canonical.contains("\"default\"")
                && !canonical.contains("logicalType")
        );
        // Logical types reduce to their primitive in its simple form ([PRIMITIVES]).
        assert!(
            canonical.contains(r#"{"name":"emittedAt","type":"long"}"#),
            "{canonical}"
        );
        assert!(
            canonical.starts_with(&format!(
                r#"{{"name":"com.ibstream.{}","type":"record","fields":["#,
                event.name()
            )),
            "{canonical}"
        );
        assert_eq!(
            schemas.get(event).fingerprint,
            crc64_avro(canonical.as_bytes()).to_le_bytes(),
            "{}",
            event.name()
        );
    }
    let bytes = encoder.encode(&lead(), &meta(Op::Created)).unwrap();
    assert_eq!(&bytes[..2], &[0xC3, 0x01]);
    assert_eq!(&bytes[2..10], &schemas.get(EventType::Lead).fingerprint);
}

fn config_with_registry(
    url: &str,
    password: &str,
    auto_register: bool,
) -> ibstream::config::Config {
    ibstream::config::Config {
        crm: Default::default(),
        events: Default::default(),
        topics: Default::default(),
        kafka: Default::default(),
        streams: Default::default(),
        http: Default::default(),
        schema_registry: Some(ibstream::config::SchemaRegistryConfig {
            url: url.to_owned(),
            username: Some("sr-user".to_owned()),
            password: Some(password.to_owned().into()),
            auto_register,
            request_timeout_secs: 5,
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn confluent_framing_uses_the_registry_ids() {
    let registry = common::start_registry().await;
    let schemas = schemas();

    // Without auto_register and nothing registered: a clear error naming the subject.
    let err = encoder_for(
        &config_with_registry(&registry.url, "sr-pass", false),
        &schemas,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ibstream::events::EventsError::Registry(RegistryError::NotRegistered { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("crm.leads-value"), "{err}");

    // Wrong credentials: an error that says what to check, without the password.
    let err = encoder_for(
        &config_with_registry(&registry.url, "nope-pass", true),
        &schemas,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("schema_registry.username"),
        "{err}"
    );
    assert!(!err.to_string().contains("nope-pass"));

    let mut encoder = encoder_for(
        &config_with_registry(&registry.url, "sr-pass", true),
        &schemas,
    )
    .await
    .unwrap();
    let Framing::Confluent { ids } = encoder.framing().clone() else {
        panic!("not confluent")
    };
    assert_eq!(registry.registrations.load(Ordering::SeqCst), 5);
    {
        let subjects = registry.subjects.lock().unwrap();
        for (i, event) in EventType::ALL.into_iter().enumerate() {
            let versions = &subjects[&format!("crm.{}-value", event.stream())];
            assert_eq!(versions.len(), 1);
            assert_eq!(versions[0].1, ids[i]);
            // The registry holds the self-contained schema.
            let stored = Schema::parse_str(&versions[0].0).unwrap();
            assert_eq!(
                stored.canonical_form(),
                schemas.get(event).schema.canonical_form()
            );
        }
    }
    let bytes = encoder.encode(&position(), &meta(Op::Created)).unwrap();
    assert_eq!(bytes[0], 0);
    assert_eq!(u32::from_be_bytes(bytes[1..5].try_into().unwrap()), ids[4]);
    let schema = &schemas.get(EventType::Position).schema;
    let decoded = from_avro_datum(schema, &mut &bytes[5..], Some(schema)).unwrap();
    assert_eq!(decoded, to_value(&position(), &meta(Op::Created)).unwrap());

    // Now registered: a lookup-only encoder finds the same ids.
    let lookup = encoder_for(
        &config_with_registry(&registry.url, "sr-pass", false),
        &schemas,
    )
    .await
    .unwrap();
    assert_eq!(lookup.framing(), &Framing::Confluent { ids });
}

#[test]
fn fastavro_reads_what_ibstream_writes() {
    let schemas = schemas();
    let mut encoder = Encoder::new(&schemas, Framing::SingleObject).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.path().join(name), bytes).unwrap();
    write(
        "LeadEvent.0.bin",
        encoder.encode(&lead(), &meta(Op::Created)).unwrap(),
    );
    write(
        "LeadEvent.1.bin",
        encoder
            .encode(&Lead::default(), &meta(Op::Updated))
            .unwrap(),
    );
    write(
        "CustomerEvent.0.bin",
        encoder.encode(&customer(), &meta(Op::Created)).unwrap(),
    );
    write(
        "TransactionEvent.0.bin",
        encoder.encode(&transaction(), &meta(Op::Created)).unwrap(),
    );
    write(
        "ServerEvent.0.bin",
        encoder.encode(&server(), &meta(Op::Created)).unwrap(),
    );
    write(
        "PositionEvent.0.bin",
        encoder.encode(&position(), &meta(Op::Created)).unwrap(),
    );
    write(
        "PositionEvent.1.bin",
        encoder
            .encode(&Position::default(), &meta(Op::Created))
            .unwrap(),
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = common::interop_python();
    let output = Command::new(&python)
        .arg(root.join("tests/interop/read_avro.py"))
        .arg(root.join("schemas"))
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("{python} runs: {e}"));
    assert!(
        output.status.success(),
        "fastavro failed (./scripts/test.sh installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: HashMap<String, Json> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Json = serde_json::from_str(line).unwrap();
            (v["file"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    assert_eq!(lines.len(), 7);
    for line in lines.values() {
        // fastavro's own canonical form and CRC-64-AVRO agree with our header.
        assert_eq!(line["header"], line["fingerprint"], "{}", line["file"]);
    }
    let r = |file: &str| lines[file]["record"].clone();

    let lead = r("LeadEvent.0.bin");
    assert_eq!(lead["id"], 100231);
    assert_eq!(lead["firstName"], "Maria");
    assert_eq!(
        lead["registrationDate"],
        json!({"millis": 1552555304000_i64})
    );
    assert_eq!(
        lead["utmDetails"],
        json!({"utmSource": "ib-portal", "utmMedium": "referral", "utmCampaign": "spring", "utmContent": null, "utmTerm": "fx"})
    );
    assert_eq!(
        lead["tags"],
        json!([{"category": "Marketing", "tags": ["webinar", "vip"]}, {"category": null, "tags": []}])
    );
    assert_eq!(
        lead["extra"],
        json!({"score": "7", "owner": r#"{"name":"desk 3"}"#})
    );
    assert_eq!(lead["meta"]["eventId"], "9f2c4e01a7b3d5c6");
    assert_eq!(lead["meta"]["op"], "CREATED");
    assert_eq!(
        lead["meta"]["emittedAt"],
        json!({"millis": 1714557601250_i64})
    );
    assert_eq!(lead["meta"]["windowFrom"], json!({"date": "2024-04-30"}));
    assert_eq!(lead["meta"]["windowTo"], json!({"date": "2024-05-01"}));
    assert_eq!(lead["meta"]["source"], "crm.example-broker.com");

    let empty = r("LeadEvent.1.bin");
    assert_eq!(empty["meta"]["op"], "UPDATED");
    for (name, value) in empty.as_object().unwrap() {
        match name.as_str() {
            "meta" => {}
            "extra" => assert_eq!(value, &json!({})),
            _ => assert_eq!(value, &Json::Null, "{name}"),
        }
    }

    let customer = r("CustomerEvent.0.bin");
    assert_eq!(
        customer["balanceUsd"],
        json!({"decimal": "12345678901234567890.12345678"})
    );
    assert_eq!(
        customer["accounts"],
        json!([{"login": "12345", "server": "mt4-live-01", "type": "live"}, {"login": "88112", "server": "mt5-live-02", "type": null}])
    );
    assert_eq!(
        customer["userAdditionalId"],
        "(12345, mt4-live-01, live), (88112, mt5-live-02, live)"
    );

    let txn = r("TransactionEvent.0.bin");
    assert_eq!(txn["amount"], json!({"decimal": "-1E-8"}));
    assert_eq!(txn["amountUsd"], json!({"decimal": "0E-8"}));
    assert_eq!(txn["isFake"], true);
    assert_eq!(txn["productId"], "N/A");

    assert_eq!(r("ServerEvent.0.bin")["platform"], "mt4");

    let position = r("PositionEvent.0.bin");
    for (name, value) in [
        ("volume", "1.50000000"),
        ("openPrice", "1.08123000"),
        ("closePrice", "1.08456000"),
        ("profit", "49.95000000"),
        ("commission", "-7.00000000"),
        ("swap", "-0.12000000"),
    ] {
        assert_eq!(position[name], json!({"decimal": value}), "{name}");
    }
    assert_eq!(position["closeTime"], json!({"millis": 1553255110123_i64}));
    assert_eq!(r("PositionEvent.1.bin")["profit"], Json::Null);
}

/// The encoder writes the binary encoding directly; every record the simulator serves, of
/// every endpoint and both money styles, must come out byte for byte as the slow path writes
/// it (an Avro value walked against the schema), and decode to the same value.
#[test]
fn the_direct_writer_equals_the_schema_checked_path_on_every_simulator_record() {
    use ibstream::crm::page::read_text;
    use ibstream::sim::{GenSpec, Kind, SimData};
    fn check<E: AvroEvent + ibstream::crm::CrmRecord>(
        encoder: &mut Encoder,
        schemas: &Schemas,
        data: &SimData,
        kind: Kind,
        count: usize,
    ) -> usize {
        let mut checked = 0;
        for index in 0..count {
            let mut text = Vec::new();
            data.write_record(kind, index, &mut text);
            let text = String::from_utf8(text).unwrap();
            // Malformed records are dead letters, never encoded.
            let Ok(record) = read_text::<E>(&text, Tz::UTC, &[], &mut Vec::new()) else {
                continue;
            };
            let meta = meta(Op::Updated);
            let (fast, slow) = match (
                encoder.encode(&record.model, &meta),
                encoder.encode_checked(&record.model, &meta),
            ) {
                (Ok(fast), Ok(slow)) => (fast, slow),
                (Err(a), Err(b)) => {
                    assert_eq!(a, b, "{text}");
                    continue;
                }
                other => panic!("the paths disagree on {text}: {other:?}"),
            };
            let schema = &schemas.get(E::EVENT).schema;
            let decoded = decode(schemas, E::EVENT, &fast);
            assert_eq!(
                decoded,
                from_avro_datum(schema, &mut &slow[..], None).unwrap()
            );
            if record.model.extra().len() <= 1 {
                // apache-avro writes maps from a HashMap: byte order is fixed only up to 1 key.
                assert_eq!(&fast[10..], &slow[..], "{text}");
            }
            checked += 1;
        }
        checked
    }
    let schemas = schemas();
    let mut encoder = Encoder::new(&schemas, Framing::SingleObject).unwrap();
    for numeric_money in [false, true] {
        // The second pass also serves sets in random orders, zero dates and epoch seconds.
        let quirks = ibstream::sim::ValueQuirks {
            shuffle_sets: numeric_money,
            epoch_seconds: numeric_money,
            zero_dates: numeric_money,
        };
        let data = SimData::generate(
            &GenSpec {
                seed: 3,
                start_date: NaiveDate::from_ymd_opt(2024, 1, 1).unwrap(),
                tz: Tz::UTC,
                leads: 300,
                customers: 200,
                transactions: 400,
                positions: 400,
                servers: 2,
                numeric_money,
                malformed_rate: 0.02,
                quirks,
            },
            Utc::now(),
        );
        let checked = check::<Lead>(&mut encoder, &schemas, &data, Kind::Leads, 300)
            + check::<Customer>(&mut encoder, &schemas, &data, Kind::Customers, 200)
            + check::<Transaction>(&mut encoder, &schemas, &data, Kind::Transactions, 400)
            + check::<Position>(&mut encoder, &schemas, &data, Kind::Positions, 400);
        assert!(checked > 1_200, "{checked} records checked");
    }
    for entity in [lead(), Lead::default()] {
        let (fast, slow) = (
            encoder.encode(&entity, &meta(Op::Created)).unwrap(),
            encoder.encode_checked(&entity, &meta(Op::Created)).unwrap(),
        );
        if entity.extra.len() <= 1 {
            assert_eq!(&fast[10..], &slow[..]);
        }
        assert_eq!(
            decode(&schemas, EventType::Lead, &fast),
            from_avro_datum(&schemas.get(EventType::Lead).schema, &mut &slow[..], None).unwrap()
        );
    }
    for entity in [customer(), Customer::default()] {
        let fast = encoder.encode(&entity, &meta(Op::Created)).unwrap();
        let slow = encoder.encode_checked(&entity, &meta(Op::Created)).unwrap();
        assert_eq!(
            decode(&schemas, EventType::Customer, &fast),
            from_avro_datum(
                &schemas.get(EventType::Customer).schema,
                &mut &slow[..],
                None
            )
            .unwrap()
        );
    }
}
