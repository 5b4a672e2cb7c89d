//! Redis failing under load: one sidecar reaches Redis through the fault proxy (black hole, reset,
//! latency over the response timeout, refused connections); both see Redis paused, and killed and
//! restarted with its append-only file (it comes back with its data) or without (empty). Writes
//! stay acknowledged (`repairing` when their cache step failed), no read is older than a clean
//! acknowledgement, and reads older than a `repairing` one end within W, the entity TTL.

use crate::{FaultCycle, history_figures, report, serial, stop};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use wtc_tests::history::{self, History, Workload};
use wtc_tests::proxy::{FaultProxy, Mode};
use wtc_tests::*;

const TTL_SECONDS: u64 = 10;

/// Kinds of fault in `inject`'s cycle; every run goes through all of them at least once.
const FAULT_KINDS: usize = 7;

/// One fault of the cycle, then a healthy pause. Returns its name.
async fn inject(step: usize, proxy: &FaultProxy, redis: &mut RedisServer) -> &'static str {
    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    let name = match step % FAULT_KINDS {
        0 => {
            proxy.set(Mode::BlackHole);
            pause(400).await;
            proxy.set(Mode::Pass);
            "black hole 400 ms (one sidecar)"
        }
        1 => {
            proxy.reset_all();
            "connections reset (one sidecar)"
        }
        2 => {
            proxy.set(Mode::Latency(Duration::from_millis(250)));
            pause(500).await;
            proxy.set(Mode::Pass);
            "latency 250 ms > response timeout, 500 ms (one sidecar)"
        }
        3 => {
            proxy.set(Mode::Refuse);
            proxy.reset_all();
            pause(300).await;
            proxy.set(Mode::Pass);
            "connections reset and refused 300 ms (one sidecar)"
        }
        4 => {
            redis.signal("STOP");
            pause(400).await;
            redis.signal("CONT");
            "redis-server paused 400 ms (SIGSTOP)"
        }
        5 => {
            redis.restart().await;
            "redis-server killed (-9) and restarted with its append-only file"
        }
        _ => {
            redis.restart_empty().await;
            "redis-server killed (-9) and restarted empty (no persistence)"
        }
    };
    pause(300).await;
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_faults_under_load_keep_the_promise() {
    let _serial = serial().await;
    let pool = pg().await;
    let (table, audit) = history::audited_table(&pool, "rfault").await;
    let mut redis = RedisServer::start_with(Persistence::AppendOnly).await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let start = |url: String| {
        let table = table.clone();
        async move {
            let sc = Fixture::new(&url)
                .entity("accounts", &table)
                .with(|c| {
                    c.entities[0].ttl_seconds = TTL_SECONDS;
                    c.cache.redis_down_backoff_ms = 100;
                    c.cache.repair_interval_ms = 100;
                })
                .start()
                .await;
            Arc::new(sc)
        }
    };
    let sidecars = vec![
        start(format!("redis://127.0.0.1:{}", proxy.port)).await,
        start(redis.url()).await,
    ];
    let mut workload = Workload::new(4, stop((3_000, 1_000), (1_000_000, 100_000)));
    // Rarer evictions than the plain history: an eviction ends a stale window early, and this
    // scenario measures how long they last.
    workload.evict_every = Some((Duration::from_millis(20), Duration::from_millis(60)));
    for k in &workload.keys {
        assert!(sidecars[1].put("accounts", k, json!({"n": 0})).await.status < 300);
    }

    let cycle = FaultCycle::new(&mut workload);
    let recorded = History::default();
    let redis_url = redis.url();
    // The faults run alongside the workload, in this task, until it ends.
    let (stats, injected) = tokio::join!(
        async {
            let stats = workload.run(&sidecars, &redis_url, &recorded).await;
            cycle.stop();
            stats
        },
        cycle.run(FAULT_KINDS, async |step| inject(step, &proxy, &mut redis)
            .await),
    );

    // Every repair done: the cache and the database agree again.
    for sc in &sidecars {
        let repaired = eventually(Duration::from_secs(20), || async {
            sc.metric("wtc_repair_queue_depth").await == 0.0
        })
        .await;
        assert!(repaired, "the repair queue drained after the faults");
    }
    for k in &workload.keys {
        let cached = redis.cached_version("accounts", k).await;
        let db = db_version(&pool, &table, k).await;
        assert!(
            cached.is_none() || cached == db,
            "{k}: cache {cached:?}, database {db:?}"
        );
    }

    let ops = recorded.ops();
    let r = history::check(&workload.keys, &ops, &audit.committed(&pool).await);
    let w = Duration::from_secs(TTL_SECONDS);
    let mut figures = history_figures(&r, &stats, w);
    figures["faults_injected"] = json!(injected);
    report(
        "redis_faults",
        "Redis black-holed, reset, slowed, refused (one of two sidecars), paused and restarted",
        figures,
    );
    assert!(
        injected.len() >= FAULT_KINDS && r.writes_repairing > 0,
        "every kind of fault happened and some cache steps failed: {injected:?}, {}",
        r.summary()
    );
    r.assert_promise(w);
}
