//! A Sentinel failover under load: two sidecars reach Redis through `redis+sentinel://`; the
//! replica is made to lag (stopped, its link cut, while acknowledged writes reach the master
//! only), then the
//! master is killed (-9) and the sentinels promote the replica. The promoted server holds entries
//! older than acknowledged writes: the sidecars must follow the failover (ask the sentinels
//! again), sweep what the new master brought, and keep the promise: no lost write, no read older
//! than a clean acknowledgement. Figures: the failover's length, and how long reads were served
//! from the database before they hit the cache again.

use crate::{history_figures, lag_replica, quiet_keys_read_back, report, serial, stop};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wtc_tests::history::{self, History, Kind, Outcome, Workload};
use wtc_tests::sentinel::Sentinels;
use wtc_tests::*;

const TTL_SECONDS: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_keeps_the_promise() {
    let _serial = serial().await;
    let pool = pg().await;
    let (table, audit) = history::audited_table(&pool, "sfail").await;
    let mut redis = Sentinels::start().await;
    let mut sidecars = vec![];
    for _ in 0..2 {
        let sc = Fixture::new(&redis.url())
            .entity("accounts", &table)
            .with(|c| {
                c.entities[0].ttl_seconds = TTL_SECONDS;
                c.cache.redis_down_backoff_ms = 100;
                c.cache.repair_interval_ms = 100;
            })
            .start()
            .await;
        sidecars.push(Arc::new(sc));
    }
    let mut workload = Workload::new(4, stop((3_000, 1_000), (300_000, 100_000)));
    // Evictions would need the current master's address; the failover's sweep is the eviction.
    workload.evict_every = None;
    for k in &workload.keys {
        assert!(sidecars[0].put("accounts", k, json!({"n": 0})).await.status < 300);
    }
    // Written and cached before the replica stops (so it has them), written again while it is
    // stopped; (key, version acknowledged last).
    let mut quiet: Vec<(String, i64)> = vec![];
    for i in 0..8 {
        let k = format!("quiet-{i}");
        let put = sidecars[0].put("accounts", &k, json!({"n": 1})).await;
        assert!(put.status < 300, "{}", put.raw);
        quiet.push((k, put.version()));
    }
    let failed_over = Arc::new(AtomicBool::new(false));
    workload.until_also = Some(Arc::clone(&failed_over));

    let recorded = History::default();
    let (stats, (killed_at, failover)) =
        tokio::join!(workload.run(&sidecars, "", &recorded), async {
            // Load first, with the cache warm.
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            // The replica misses what the master acknowledges meanwhile: the hot keys' writes,
            // and the quiet keys' second versions.
            let replica = redis.replica.pid();
            lag_replica(replica, &redis.master, &sidecars[0], &mut quiet).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let killed_at = Instant::now();
            let (took, ()) = tokio::join!(
                redis.kill_master_and_wait_for_failover(Duration::from_secs(30)),
                async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    signal(replica, "CONT");
                }
            );
            // Run on for a while after the failover, so reads go through the new master.
            tokio::time::sleep(Duration::from_secs(3)).await;
            failed_over.store(true, Ordering::Relaxed);
            (killed_at, took)
        },);

    quiet_keys_read_back(&sidecars, &quiet).await;
    let ops = recorded.ops();
    // Reads hit the cache again after the failover: the sidecars found the new master.
    let hit_again = ops
        .iter()
        .filter(|o| o.kind == Kind::Read && o.start > killed_at)
        .filter(|o| matches!(o.outcome, Outcome::Ok { clean: true, .. }))
        .map(|o| o.end.duration_since(killed_at))
        .min();
    let r = history::check(&workload.keys, &ops, &audit.committed(&pool).await);
    let w = Duration::from_secs(TTL_SECONDS);
    let mut figures = history_figures(&r, &stats, w);
    figures["failover_ms"] = json!(failover.as_millis() as u64);
    figures["reads_from_database_after_kill_ms"] = json!(hit_again.map(|d| d.as_millis() as u64));
    report(
        "sentinel_failover",
        "replica stopped 300 ms (lagging), master killed (-9), replica promoted by 3 sentinels",
        figures,
    );
    assert!(
        hit_again.is_some(),
        "no read hit the cache after the failover: the sidecars did not follow it"
    );
    r.assert_promise(w);
}
