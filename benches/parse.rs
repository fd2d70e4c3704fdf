//! Reading a 1000-record leads page from bytes into models (target: ≤ 3 ms on the 2-core
//! development machine).

use chrono_tz::Tz;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ibstream::crm::{parse_page, Lead};

// The same allocator as the `ibstream` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench_parse(c: &mut Criterion) {
    let tz: Tz = "Europe/Nicosia".parse().expect("zone");
    let body = ibstream::sim::sample_leads_page(1000, tz);
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("leads_page_1000", |b| {
        b.iter(|| {
            let page = parse_page::<Lead>(&body, 1, 1000, tz, &[]).expect("page");
            assert_eq!(page.records.len(), 1000);
            page
        })
    });
    group.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
