//! A herd: 1,000 concurrent readers of one cold key, split over two sidecars, several rounds (a new
//! cold key each), behind a slow fill. P4: at most one database read per sidecar per cold key,
//! counted by PostgreSQL itself (pg_stat_statements), and every reader gets the row. The Redis
//! commands the herd costs are reported: waiting readers share one flight per sidecar instead of
//! each polling for the fill (which, on a loaded machine, slowed Redis past the response timeout
//! and sent readers to the database).

use crate::{report, serial};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wtc_tests::*;

const READERS: usize = 1_000;
const FILL_MS: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_of_1000_readers_costs_at_most_one_database_read_per_sidecar() {
    let _serial = serial().await;
    let TestBed { pool, redis, table } = TestBed::new("herd").await;
    let start = || {
        Fixture::new(&redis.url())
            .entity("accounts", &table)
            .with(|c| {
                // The herd is the load: every reader must be admitted, and wait for the one fill
                // even on a loaded machine.
                c.limits.max_in_flight = READERS;
                c.limits.max_queue_wait_ms = 5_000;
                c.cache.lease_wait_ms = 5_000;
                c.cache.lease_ttl_ms = 10_000;
            })
            .start()
    };
    let sidecars = [start().await, start().await];
    // One client per reader's side, with a connection per reader.
    let clients: Vec<reqwest::Client> = (0..2)
        .map(|_| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(READERS)
                .build()
                .unwrap()
        })
        .collect();
    let rounds = if crate::long() { 30 } else { 3 };
    let (mut worst, mut total_reads, mut slowest) = (0, 0, Duration::ZERO);
    let mut redis_commands = 0;
    for round in 0..rounds {
        let key = format!("hot{round}");
        let v = sidecars[0]
            .put("accounts", &key, json!({"n": round}))
            .await
            .version();
        redis.del(&entry_key("accounts", &key)).await;
        // The fill is slow (held for FILL_MS on whichever sidecar wins the lease): the herd piles
        // up behind it, as it does behind a slow database, instead of mostly arriving after it.
        for s in &sidecars {
            s.hold_for(FILL_BEFORE_STORE, "accounts", &key, FILL_MS)
                .await;
        }
        let before = select_calls(&pool, &table).await;
        let commands_before = redis.commands_processed().await;

        let barrier = Arc::new(tokio::sync::Barrier::new(READERS));
        let mut readers = vec![];
        for i in 0..READERS {
            let side = i % 2;
            let (http, url) = (clients[side].clone(), sidecars[side].url("accounts", &key));
            let barrier = barrier.clone();
            readers.push(tokio::spawn(async move {
                barrier.wait().await;
                let started = Instant::now();
                let r = http.get(url).send().await.unwrap();
                let status = r.status().as_u16();
                let etag = r
                    .headers()
                    .get("etag")
                    .map(|e| e.to_str().unwrap().to_string());
                let body = r.text().await.unwrap();
                (status, etag, body, started.elapsed())
            }));
        }
        for r in readers {
            let (status, etag, body, took) = r.await.unwrap();
            assert_eq!(status, 200, "{body}");
            assert_eq!(etag, Some(format!("\"{v}\"")));
            slowest = slowest.max(took);
        }
        let reads = select_calls(&pool, &table).await - before;
        // Less the INFO call itself.
        let round_commands = redis.commands_processed().await - commands_before - 1;
        redis_commands += round_commands;
        if !(1..=2).contains(&reads) {
            // Why each extra read happened: a bypass (Redis failed or timed out), a fill that
            // was not waited for, or Redis errors.
            let mut why = String::new();
            for s in &sidecars {
                why += &why_read(s).await;
            }
            panic!(
                "round {round}: {reads} database reads for one cold key and {READERS} readers on two sidecars\n{why}"
            );
        }
        // Each reader's cache lookup is two commands (GET, PTTL); the flights and the fill add a
        // handful per round. Readers polling for the fill each would cost ten times that.
        let per_reader = round_commands as f64 / READERS as f64;
        assert!(
            per_reader <= 3.0,
            "round {round}: {per_reader:.1} Redis commands per reader of a herd"
        );
        worst = worst.max(reads);
        total_reads += reads;
    }
    report(
        "herd",
        "1,000 concurrent readers of one cold key on two sidecars, per round",
        json!({
            "readers": READERS,
            "sidecars": 2,
            "rounds": rounds,
            "max_database_reads_per_cold_key": worst,
            "database_reads_total": total_reads,
            "slowest_reader_ms": slowest.as_secs_f64() * 1e3,
            "redis_commands_per_reader": redis_commands as f64 / (rounds * READERS) as f64,
        }),
    );
}

/// The counters that say why a sidecar read the database.
async fn why_read(sidecar: &Sidecar) -> String {
    let text = sidecar.metrics().await;
    text.lines()
        .filter(|l| {
            [
                "wtc_cache_lookups_total",
                "wtc_fills_total",
                "wtc_redis_errors_total",
            ]
            .iter()
            .any(|m| l.starts_with(m))
        })
        .map(|l| format!("  {l}\n"))
        .collect()
}
