//! Encoding a batch of 1000 lead events, model → framed bytes (target: ≤ 2 ms on the 2-core
//! development machine). Schemas are parsed once, outside the measured loop.

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ibstream::crm::{parse_page, Lead};
use ibstream::events::{Encoder, EventMeta, Framing, Op, Schemas};

// The same allocator as the `ibstream` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn leads() -> Vec<Lead> {
    let body = ibstream::sim::sample_leads_page(1000, chrono_tz::Tz::UTC);
    parse_page::<Lead>(&body, 1, 1000, chrono_tz::Tz::UTC, &[])
        .expect("page")
        .records
        .into_iter()
        .map(|r| r.expect("record").model)
        .collect()
}

fn bench_encode(c: &mut Criterion) {
    let leads = leads();
    let schemas = Schemas::load("com.ibstream").expect("schemas");
    let now = Utc::now();
    let meta = EventMeta {
        event_id: "9f2c4e01a7b3d5c6".to_owned(),
        op: Op::Created,
        emitted_at: now,
        source: "crm.example-broker.com".to_owned(),
        endpoint: "/api/v1/ib/leads".to_owned(),
        window: Some((now.date_naive(), now.date_naive())),
        fetched_at: now,
        connector_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1000));
    for (name, framing) in [
        ("single_object", Framing::SingleObject),
        (
            "confluent",
            Framing::Confluent {
                ids: [1, 2, 3, 4, 5],
            },
        ),
    ] {
        let mut encoder = Encoder::new(&schemas, framing).expect("encoder");
        group.bench_function(format!("leads_1000_{name}"), |b| {
            b.iter(|| {
                leads
                    .iter()
                    .map(|lead| encoder.encode(lead, &meta).expect("encodes"))
                    .collect::<Vec<_>>()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_encode);
criterion_main!(benches);
