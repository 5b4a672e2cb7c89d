//! Redis Cluster (3 masters, a replica each) behind two sidecars (`redis+cluster://`): a history
//! under an eviction storm, the slots of hot keys migrated to another master under load (clients
//! meet `ASK` while a slot is half moved, then `MOVED`), and a master killed under load with its
//! replica promoted while it lags (stopped, its link cut, while the master acknowledged writes).
//! The promise holds: no lost write, no read older than a clean acknowledgement. Figures: the
//! failover's length and how long reads were served from the database.

use crate::{history_figures, lag_replica, quiet_keys_read_back, report, serial, stop};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wtc_tests::cluster::RedisCluster;
use wtc_tests::history::{self, History, Kind, Outcome, Workload};
use wtc_tests::*;

const TTL_SECONDS: u64 = 10;

async fn sidecars(redis: &RedisCluster, table: &str) -> Vec<Arc<Sidecar>> {
    let mut out = vec![];
    for _ in 0..2 {
        let sc = Fixture::new(&redis.url())
            .entity("accounts", table)
            .with(|c| {
                c.entities[0].ttl_seconds = TTL_SECONDS;
                c.cache.redis_down_backoff_ms = 100;
                c.cache.repair_interval_ms = 100;
            })
            .start()
            .await;
        out.push(Arc::new(sc));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_history_under_an_eviction_storm_keeps_the_promise() {
    let _serial = serial().await;
    let pool = pg().await;
    let (table, audit) = history::audited_table(&pool, "chist").await;
    let redis = RedisCluster::start(3, 0).await;
    let sidecars = sidecars(&redis, &table).await;
    // Keys on every master.
    let workload = Workload::new(9, stop((2_000, 1_000), (1_000_000, 100_000)));
    for k in &workload.keys {
        assert!(sidecars[0].put("accounts", k, json!({"n": 0})).await.status < 300);
    }
    let recorded = History::default();
    let stats = workload.run(&sidecars, &redis.url(), &recorded).await;
    let r = history::check(
        &workload.keys,
        &recorded.ops(),
        &audit.committed(&pool).await,
    );
    report(
        "cluster_history",
        "none; Redis Cluster of 3 masters, entries evicted at random every 0.5-3 ms",
        history_figures(&r, &stats, Duration::ZERO),
    );
    assert!(
        r.writes_acked() > 100 && r.reads > 100 && stats.evictions > 50,
        "too little happened to prove anything: {}",
        r.summary()
    );
    r.assert_promise(Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_migrations_under_load_keep_the_promise() {
    let _serial = serial().await;
    let pool = pg().await;
    let (table, audit) = history::audited_table(&pool, "cmig").await;
    let redis = RedisCluster::start(3, 0).await;
    let sidecars = sidecars(&redis, &table).await;
    let mut workload = Workload::new(9, stop((2_000, 1_000), (300_000, 100_000)));
    for k in &workload.keys {
        assert!(sidecars[0].put("accounts", k, json!({"n": 0})).await.status < 300);
    }
    // The slots of three hot keys, each moved to the next master while the workload runs.
    let mut moves = vec![];
    for k in workload.keys.iter().take(3) {
        let from = redis.master_of("accounts", k).await;
        moves.push((redis.slot_of("accounts", k).await, from, (from + 1) % 3));
    }
    let migrated = Arc::new(AtomicBool::new(false));
    workload.until_also = Some(Arc::clone(&migrated));
    let recorded = History::default();
    let url = redis.url();
    let (stats, took) = tokio::join!(workload.run(&sidecars, &url, &recorded), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        for &(slot, from, to) in &moves {
            redis
                .migrate_slot(slot, from, to, Duration::from_millis(150))
                .await;
        }
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        migrated.store(true, Ordering::Relaxed);
        took
    });
    for (k, &(_, _, to)) in workload.keys.iter().zip(&moves) {
        assert_eq!(redis.master_of("accounts", k).await, to, "{k} moved");
    }
    let ops = recorded.ops();
    let r = history::check(&workload.keys, &ops, &audit.committed(&pool).await);
    // After the moves, reads of the moved keys hit the cache on their new master.
    let end_of_moves = ops.iter().map(|o| o.start).min().unwrap() + took;
    let moved_hits = ops
        .iter()
        .filter(|o| o.kind == Kind::Read && (o.key as usize) < moves.len())
        .filter(|o| o.start > end_of_moves + Duration::from_millis(500))
        .filter(|o| matches!(o.outcome, Outcome::Ok { clean: true, .. }))
        .count();
    let w = Duration::from_secs(TTL_SECONDS);
    let mut figures = history_figures(&r, &stats, w);
    figures["migration_ms"] = json!(took.as_millis() as u64);
    figures["moved_keys_hits_after"] = json!(moved_hits);
    report(
        "cluster_migration",
        "Redis Cluster: the slots of 3 hot keys migrated to another master, key by key, under load",
        figures,
    );
    assert!(
        r.writes_acked() > 100 && moved_hits > 0,
        "too little happened, or the moved keys never hit again: {}",
        r.summary()
    );
    r.assert_promise(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_under_load_keeps_the_promise() {
    let _serial = serial().await;
    let pool = pg().await;
    let (table, audit) = history::audited_table(&pool, "cfail").await;
    let mut redis = RedisCluster::start(3, 1).await;
    let sidecars = sidecars(&redis, &table).await;
    let mut workload = Workload::new(9, stop((3_000, 1_000), (300_000, 100_000)));
    workload.evict_every = None;
    for k in &workload.keys {
        assert!(sidecars[0].put("accounts", k, json!({"n": 0})).await.status < 300);
    }
    // The master to kill, its replica, and quiet keys it serves: written and cached before the
    // replica stops, written again while it is stopped and cut off.
    let victim = redis.master_of("accounts", &workload.keys[0]).await;
    let replica = redis.replica_of(victim).await;
    let mut quiet: Vec<(String, i64)> = vec![];
    for i in 0.. {
        let k = format!("quiet-{i}");
        if redis.master_of("accounts", &k).await != victim {
            continue;
        }
        let put = sidecars[0].put("accounts", &k, json!({"n": 1})).await;
        assert!(put.status < 300, "{}", put.raw);
        quiet.push((k, put.version()));
        if quiet.len() == 6 {
            break;
        }
    }
    let mut on_victim = vec![];
    for k in &workload.keys {
        on_victim.push(redis.master_of("accounts", k).await == victim);
    }
    let failed_over = Arc::new(AtomicBool::new(false));
    workload.until_also = Some(Arc::clone(&failed_over));

    let recorded = History::default();
    let url = redis.url();
    let (stats, (killed_at, failover)) =
        tokio::join!(workload.run(&sidecars, &url, &recorded), async {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            let replica_pid = redis.nodes[replica].pid();
            lag_replica(replica_pid, &redis.nodes[victim], &sidecars[0], &mut quiet).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let killed_at = Instant::now();
            let (took, ()) = tokio::join!(
                redis.kill_and_wait_for_promotion(victim, replica, Duration::from_secs(30)),
                async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    signal(replica_pid, "CONT");
                }
            );
            tokio::time::sleep(Duration::from_secs(3)).await;
            failed_over.store(true, Ordering::Relaxed);
            (killed_at, took)
        },);

    quiet_keys_read_back(&sidecars, &quiet).await;
    let ops = recorded.ops();
    // Reads after the kill, of the victim's keys and of the others': how long until each hit
    // the cache again.
    let (on_victim, ops) = (&on_victim, &ops);
    let after_kill = move |victim_keys: bool| {
        ops.iter()
            .filter(move |o| o.kind == Kind::Read && o.start > killed_at)
            .filter(move |o| on_victim[o.key as usize] == victim_keys)
    };
    let hit = |o: &&history::Op| matches!(o.outcome, Outcome::Ok { clean: true, .. });
    let first_hit = |victim_keys: bool| {
        after_kill(victim_keys)
            .filter(hit)
            .map(|o| o.end.duration_since(killed_at))
            .min()
    };
    let hit_again = first_hit(true);
    // The other masters' keys while the victim was down: how many reads, how many not hits.
    let others_during: Vec<_> = after_kill(false)
        .filter(|o| o.end < killed_at + failover)
        .collect();
    let others_not_hit = others_during.iter().filter(|o| !hit(o)).count();
    let r = history::check(&workload.keys, ops, &audit.committed(&pool).await);
    let w = Duration::from_secs(TTL_SECONDS);
    let mut figures = history_figures(&r, &stats, w);
    figures["failover_ms"] = json!(failover.as_millis() as u64);
    figures["victim_keys_from_database_after_kill_ms"] =
        json!(hit_again.map(|d| d.as_millis() as u64));
    figures["other_keys_first_hit_after_kill_ms"] =
        json!(first_hit(false).map(|d| d.as_millis() as u64));
    figures["other_keys_reads_during_failover"] = json!(others_during.len());
    figures["other_keys_reads_not_hit_during_failover"] = json!(others_not_hit);
    report(
        "cluster_failover",
        "Redis Cluster: replica stopped 300 ms (lagging), its master killed (-9), replica promoted",
        figures,
    );
    assert!(
        hit_again.is_some(),
        "no read hit the cache after the failover"
    );
    r.assert_promise(w);
}
