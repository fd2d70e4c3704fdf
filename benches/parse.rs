//! Reading a 1000-record leads page from bytes into models (target: ≤ 3 ms on the 2-core
//! development machine).

use chrono::{NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ibstream::crm::{parse_page, Lead};
use ibstream::sim::{GenSpec, Kind, SimData};

// The same allocator as the `ibstream` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn leads_page() -> Vec<u8> {
    let spec = GenSpec {
        seed: 42,
        start_date: NaiveDate::from_ymd_opt(2024, 1, 1).expect("date"),
        tz: "Europe/Nicosia".parse().expect("zone"),
        leads: 1000,
        customers: 0,
        transactions: 0,
        positions: 0,
        servers: 2,
        malformed_rate: 0.0,
    };
    let now = Utc
        .with_ymd_and_hms(2026, 6, 1, 12, 0, 0)
        .single()
        .expect("instant");
    let data = SimData::generate(&spec, now);
    let records = data.truth(Kind::Leads);
    serde_json::json!({"page": 1, "pageSize": 1000, "total": 1000, "data": records})
        .to_string()
        .into_bytes()
}

fn bench_parse(c: &mut Criterion) {
    let body = leads_page();
    let tz: Tz = "Europe/Nicosia".parse().expect("zone");
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("leads_page_1000", |b| {
        b.iter(|| {
            let page = parse_page::<Lead>(&body, 1, 1000, tz).expect("page");
            assert_eq!(page.records.len(), 1000);
            page
        })
    });
    group.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
