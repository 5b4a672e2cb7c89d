//! Dirty restarts of PostgreSQL, through the fault proxy: once the database is back, no request
//! fails on a connection that died with it; while it is away, a write that never reached it (no
//! connection could be had) is known not to have committed, so its key keeps being served from
//! the cache instead of being sent to the database.

use serde_json::json;
use std::time::Duration;
use wtc_tests::proxy::{FaultProxy, Mode};
use wtc_tests::*;

async fn through_proxy(prefix: &str) -> (TestBed, FaultProxy, Sidecar) {
    let bed = TestBed::new(prefix).await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], database_port()).into()).await;
    let sc = Fixture::new(&bed.redis.url())
        .entity("accounts", &bed.table)
        .with(|c| {
            c.database.url = with_port(&database_url(), proxy.port);
            c.database.pool_size = 4;
        })
        .start()
        .await;
    (bed, proxy, sc)
}

#[tokio::test]
async fn no_503_from_connections_that_died_with_a_restart() {
    let (_bed, proxy, sc) = through_proxy("restart").await;
    // Several pooled connections, then all of them cut (what a restart does to them).
    let mut writes = Vec::new();
    for i in 0..8 {
        let (http, url) = (sc.http.clone(), sc.url("accounts", &format!("w{i}")));
        writes.push(tokio::spawn(async move {
            http.put(url).json(&json!({"n": 1})).send().await
        }));
    }
    for w in writes {
        assert!(w.await.unwrap().unwrap().status().is_success());
    }
    proxy.reset_all();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut unavailable = 0;
    for i in 0..12 {
        let key = format!("r{i}");
        if sc.put("accounts", &key, json!({"n": 2})).await.status == 503 {
            unavailable += 1;
        }
        if sc.get("accounts", &format!("w{}", i % 8)).await.status == 503 {
            unavailable += 1;
        }
    }
    assert_eq!(unavailable, 0, "requests failed on dead pooled connections");
}

#[tokio::test]
async fn a_write_that_never_reached_the_database_leaves_the_cache_serving() {
    let (_bed, proxy, sc) = through_proxy("refused").await;
    let v1 = sc.put("accounts", "k", json!({"n": 1})).await.version();
    assert_eq!(sc.get("accounts", "k").await.cache.as_deref(), Some("hit"));
    proxy.set(Mode::Refuse);
    proxy.reset_all();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let w = sc.put("accounts", "k", json!({"n": 2})).await;
    assert_eq!(
        (w.status, w.error_code()),
        (503, "database_unavailable"),
        "{}",
        w.raw
    );
    // Not committed, and known: the cached row is still the row, and is served.
    let r = sc.get("accounts", "k").await;
    assert_eq!(
        (r.status, r.cache.as_deref(), r.version()),
        (200, Some("hit"), v1),
        "{}",
        r.raw
    );
    assert_eq!(sc.metric("wtc_repair_queue_depth").await, 0.0);
    proxy.set(Mode::Pass);
    let w = sc.put("accounts", "k", json!({"n": 3})).await;
    assert_eq!(
        (w.status, w.cache.as_deref()),
        (200, Some("ok")),
        "{}",
        w.raw
    );
}

#[tokio::test]
async fn a_column_added_to_the_table_is_taken_without_a_restart() {
    let bed = TestBed::new("addcol").await;
    let sc = Fixture::new(&bed.redis.url())
        .entity("accounts", &bed.table)
        .start()
        .await;
    assert_eq!(sc.put("accounts", "k", json!({"n": 1})).await.status, 201);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {} ADD COLUMN nickname text",
        bed.table
    )))
    .execute(&bed.pool)
    .await
    .unwrap();
    let w = sc.put("accounts", "k", json!({"nickname": "kay"})).await;
    assert_eq!(w.status, 200, "{}", w.raw);
    assert_eq!(w.body["data"]["nickname"], "kay");
    // Still unknown: refused, and the table is not read again more than once a second.
    let r = sc.put("accounts", "k", json!({"nope": 1})).await;
    assert_eq!(
        (r.status, r.error_code()),
        (422, "invalid_body"),
        "{}",
        r.raw
    );
}
