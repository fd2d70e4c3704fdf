//! The simulator must never be the bottleneck of a benchmark: a 1000-record page, fetched over
//! HTTP on loopback from a simulator holding 100k positions on 3 live servers, ≤ 5 ms.

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ibstream::sim::SimConfig;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench_sim(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let config = SimConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        leads: 20_000,
        customers: 8_000,
        transactions: 50_000,
        positions: 100_000,
        servers: 3,
        ..SimConfig::default()
    };
    let sim = runtime
        .block_on(ibstream::sim::start(config))
        .expect("simulator");
    let http = reqwest::Client::new();
    let base = sim.base_url();
    let token: String = runtime.block_on(async {
        let answer = http
            .post(format!("{base}/api/v1/auth/login"))
            .header("X-Api-Key", "sim-api-key")
            .header("X-DOMAIN", "sim.example.com")
            .body(r#"{"email":"ib@example.com","password":"ib-secret","rememberMe":true}"#)
            .send()
            .await
            .expect("login")
            .text()
            .await
            .expect("body");
        let value: serde_json::Value = serde_json::from_str(&answer).expect("json");
        value["token"].as_str().expect("token").to_owned()
    });
    let today = Utc::now().date_naive();
    let url = format!(
        "{base}/api/v1/ib/positions?serverTag=mt4-live-01&positionCloseDateFrom=2024-01-01&positionCloseDateTo={today}&page=2&pageSize=1000"
    );
    let mut group = c.benchmark_group("sim");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("positions_page_1000_of_100k", |b| {
        b.to_async(&runtime).iter(|| async {
            let body = http
                .get(&url)
                .header("X-Api-Key", "sim-api-key")
                .header("X-DOMAIN", "sim.example.com")
                .header("X-Auth-Token", &token)
                .send()
                .await
                .expect("page")
                .bytes()
                .await
                .expect("body");
            assert!(body.len() > 100_000);
            body
        })
    });
    group.finish();
}

criterion_group!(benches, bench_sim);
criterion_main!(benches);
