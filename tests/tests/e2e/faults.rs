//! Redis failing under the sidecar: writes stay acknowledged (flagged), reads answer from the
//! database, and once Redis is back the repair queue makes the cache match the database.

use serde_json::json;
use std::time::Duration;
use wtc_tests::*;

async fn setup() -> (sqlx::PgPool, String) {
    let pool = pg().await;
    let table = unique("fault");
    create_table(&pool, &table).await;
    (pool, table)
}

async fn repaired(sc: &Sidecar) -> bool {
    eventually(Duration::from_secs(15), || async {
        sc.metric("wtc_repair_queue_depth").await == 0.0
    })
    .await
}

/// Redis paused (SIGSTOP) keeps its old values: the repair queue must evict them once it is back,
/// or other readers would be served versions older than acknowledged writes forever (until TTL).
#[tokio::test]
async fn redis_paused_during_writes_then_repaired() {
    let (pool, table) = setup().await;
    let redis = RedisServer::start().await;
    let sc = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| c.cache.redis_down_backoff_ms = 200)
        .start()
        .await;
    let keys = ["a", "b", "c"];
    for k in keys {
        assert_eq!(
            sc.put("accounts", k, json!({"n": 0}))
                .await
                .cache
                .as_deref(),
            Some("ok")
        );
    }

    redis.signal("STOP");
    let mut acked = vec![];
    for (i, k) in keys.iter().enumerate() {
        let w = sc.put("accounts", k, json!({"n": i + 1})).await;
        assert_eq!(
            w.status, 200,
            "a committed write is acknowledged: {}",
            w.raw
        );
        assert_eq!(w.cache.as_deref(), Some("repairing"));
        acked.push(w.version());
    }
    for (k, v) in keys.iter().zip(&acked) {
        let r = sc.get("accounts", k).await;
        assert_eq!(
            (r.status, r.cache.as_deref(), r.version()),
            (200, Some("bypass"), *v)
        );
        assert_eq!(db_version(&pool, &table, k).await, Some(*v));
    }
    assert_eq!(sc.metric("wtc_repair_queue_depth").await, 3.0);
    assert!(sc.metric("wtc_cache_step_failures_total").await >= 3.0);

    redis.signal("CONT");
    assert!(repaired(&sc).await, "the repair queue drained");
    for (k, v) in keys.iter().zip(&acked) {
        let cached = redis.cached_version("accounts", k).await;
        assert!(
            cached.is_none() || cached == Some(*v),
            "{k}: cache {cached:?}, database {v}"
        );
        let r = sc.get("accounts", k).await;
        assert_eq!(r.version(), *v);
        assert_eq!(
            redis.cached_version("accounts", k).await,
            Some(*v),
            "{k} cached again after repair"
        );
    }
    assert!(
        sc.metrics()
            .await
            .contains("wtc_stale_window_seconds_count 3")
    );
}

/// Redis killed and restarted on the same port: the same promise, through a reconnect.
#[tokio::test]
async fn redis_stopped_and_restarted() {
    let (pool, table) = setup().await;
    let mut redis = RedisServer::start_with(Persistence::AppendOnly).await;
    let sc = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| c.cache.redis_down_backoff_ms = 200)
        .start()
        .await;
    let v0 = sc.put("accounts", "k", json!({"n": 0})).await.version();
    assert_eq!(redis.cached_version("accounts", "k").await, Some(v0));

    redis.kill().await;
    let w = sc.put("accounts", "k", json!({"n": 1})).await;
    assert_eq!((w.status, w.cache.as_deref()), (200, Some("repairing")));
    let r = sc.get("accounts", "k").await;
    assert_eq!(
        (r.status, r.version()),
        (200, w.version()),
        "reads answer from the database"
    );

    // Restart with the append-only file: the old version comes back with it.
    redis.restart().await;
    assert!(repaired(&sc).await);
    let cached = redis.cached_version("accounts", "k").await;
    assert!(
        cached.is_none() || cached == Some(w.version()),
        "old version survived the repair: {cached:?}"
    );
    assert_eq!(sc.get("accounts", "k").await.version(), w.version());
    assert_eq!(db_version(&pool, &table, "k").await, Some(w.version()));
}

/// A Redis that crashes and comes back from an older snapshot brings back entries older than
/// acknowledged writes. The run id changed, so every sidecar deletes the restored entries before
/// it uses the new process (`cache::link`): the old version is never served, not by the sidecar
/// that wrote it, nor by one that first meets the restarted Redis.
#[tokio::test]
async fn redis_restarted_from_an_old_snapshot_never_serves_it() {
    let (pool, table) = setup().await;
    let mut redis = RedisServer::start_with(Persistence::Snapshot).await;
    let url = redis.url();
    let fixture = || {
        Fixture::new(&url)
            .entity("accounts", &table)
            .with(|c| c.cache.redis_down_backoff_ms = 100)
    };
    let sc = fixture().start().await;
    let keys = ["a", "b", "c"];
    for k in keys {
        let w = sc.put("accounts", k, json!({"n": 1})).await;
        assert_eq!(w.cache.as_deref(), Some("ok"));
    }
    redis.save().await;
    let mut acked = vec![];
    for k in keys {
        let w = sc.put("accounts", k, json!({"n": 2})).await;
        assert_eq!(w.cache.as_deref(), Some("ok"), "{}", w.raw);
        assert_eq!(redis.cached_version("accounts", k).await, Some(w.version()));
        acked.push(w.version());
    }

    redis.restart().await;
    assert!(
        redis.cached_version("accounts", "a").await < Some(acked[0]),
        "the restarted Redis holds the snapshot's older entry (the fault is real)"
    );
    let late = fixture().start().await;
    for sidecar in [&late, &sc] {
        let served_from_redis = eventually(Duration::from_secs(10), || async {
            let mut from_redis = true;
            for (k, v) in keys.iter().zip(&acked) {
                let r = sidecar.get("accounts", k).await;
                assert_eq!(r.status, 200, "{}", r.raw);
                assert_eq!(r.version(), *v, "{k}: served {} ({:?})", r.raw, r.cache);
                from_redis &= r.cache.as_deref() != Some("bypass");
            }
            from_redis
        })
        .await;
        assert!(served_from_redis, "the sidecar uses Redis again");
    }
    for (k, v) in keys.iter().zip(&acked) {
        assert_eq!(redis.cached_version("accounts", k).await, Some(*v));
        assert_eq!(db_version(&pool, &table, k).await, Some(*v));
    }
    // The sidecar that met the restarted Redis first swept; the other found it safe already.
    let changes = sc.metric("wtc_redis_epoch_changes_total").await
        + late.metric("wtc_redis_epoch_changes_total").await;
    assert_eq!(changes, 1.0);
}
