//! The consistency sampler: inconsistencies planted in the database behind the sidecar's back
//! are found (same version with other data; a newer version), and followed until the cache is
//! put right; a clean run of many writes reports none.

use serde_json::json;
use std::time::Duration;
use wtc_tests::*;

async fn start(redis: &RedisServer, table: &str, grace_ms: u64) -> Sidecar {
    Fixture::new(&redis.url())
        .entity("accounts", table)
        .with(|c| {
            c.sampler.enabled = true;
            c.sampler.sample_rate = 1.0;
            c.sampler.grace_ms = grace_ms;
            c.sampler.interval_ms = 50;
        })
        .start()
        .await
}

#[tokio::test]
async fn sampler_finds_rows_changed_behind_the_sidecars_back() {
    let pool = pg().await;
    let table = unique("sampler");
    create_table(&pool, &table).await;
    let redis = RedisServer::start().await;
    // The grace period leaves ample time to plant the inconsistencies before the first look.
    let sc = start(&redis, &table, 1_500).await;

    let a = sc.put("accounts", "a", json!({"owner": "alice"})).await;
    let b = sc.put("accounts", "b", json!({"owner": "bob"})).await;
    let c = sc.put("accounts", "c", json!({"owner": "carol"})).await;
    assert_eq!((a.status, b.status, c.status), (201, 201, 201));
    // a: same version, other data.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {table} SET owner = 'mallory' WHERE id = 'a'"
    )))
    .execute(&pool)
    .await
    .unwrap();
    // b: a newer version, taken from the sidecar's sequence as outside writers must.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {table} SET version = nextval('{table}_version_wtc_seq') WHERE id = 'b'"
    )))
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        redis.cached_version("accounts", "a").await,
        Some(a.version())
    );
    assert_eq!(
        redis.cached_version("accounts", "b").await,
        Some(b.version())
    );

    let found = eventually(Duration::from_secs(15), || async {
        sc.metric("wtc_sampler_inconsistent_total").await >= 2.0
    })
    .await;
    assert!(found, "{}", sc.metrics().await);
    assert!(sc.metric("wtc_sampler_checked_total").await >= 3.0);
    assert_eq!(sc.metric("wtc_sampler_inconsistent_total").await, 2.0);
    let aging = eventually(Duration::from_secs(10), || async {
        sc.metric("wtc_sampler_oldest_inconsistency_seconds").await > 0.0
    })
    .await;
    assert!(aging);

    // Put the cache right (evict both keys): the inconsistencies are no longer observed.
    redis.del(&entry_key("accounts", "a")).await;
    redis.del(&entry_key("accounts", "b")).await;
    let cleared = eventually(Duration::from_secs(10), || async {
        sc.metric("wtc_sampler_oldest_inconsistency_seconds").await == 0.0
    })
    .await;
    assert!(cleared, "{}", sc.metrics().await);
    // Counted once each, never again while they were followed.
    assert_eq!(sc.metric("wtc_sampler_inconsistent_total").await, 2.0);
}

#[tokio::test]
async fn sampler_reports_nothing_on_a_clean_run_of_many_writes() {
    let pool = pg().await;
    let table = unique("sampler_clean");
    create_table(&pool, &table).await;
    let redis = RedisServer::start().await;
    // Longer than any cache step of a loaded test machine: a write between commit and cache step
    // must not look like an inconsistency.
    let sc = start(&redis, &table, 500).await;

    let writes = 400;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let http = sc.http.clone();
        let base = sc.base.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..writes / 8 {
                let key = format!("k{}", (i * 7 + w) % 20);
                let url = format!("{base}/v1/entities/accounts/{key}");
                let r = if i % 10 == 9 {
                    http.delete(&url).send().await.unwrap()
                } else {
                    http.put(&url)
                        .json(&json!({"n": i, "owner": format!("w{w}")}))
                        .send()
                        .await
                        .unwrap()
                };
                assert!(r.status().is_success() || r.status() == 404, "{r:?}");
                if i % 5 == 0 {
                    // Reads fill the cache too.
                    let r = http.get(&url).send().await.unwrap();
                    assert!(r.status().is_success() || r.status() == 404);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ok = sc
        .metric("wtc_writes_total{entity=\"accounts\",outcome=\"ok\"}")
        .await;
    assert!(ok >= 300.0, "{ok}");
    // Every sampled write is checked (sample_rate = 1), including its second look.
    let checked = eventually(Duration::from_secs(15), || async {
        sc.metric("wtc_sampler_checked_total").await >= ok
    })
    .await;
    assert!(checked, "{}", sc.metrics().await);
    // Every suspicion has had its second look once nothing waits in the queue.
    let drained = eventually(Duration::from_secs(10), || async {
        sc.metric("wtc_sampler_queued").await == 0.0
    })
    .await;
    assert!(drained, "{}", sc.metrics().await);
    assert_eq!(sc.metric("wtc_sampler_inconsistent_total").await, 0.0);
    assert_eq!(
        sc.metric("wtc_sampler_oldest_inconsistency_seconds").await,
        0.0
    );
}
