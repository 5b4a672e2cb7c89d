//! The races of the design, made to happen on purpose with hold points, and the herd.

use serde_json::json;
use wtc_tests::*;

async fn setup() -> TestBed {
    TestBed::new("race").await
}

/// Reader reads v1 from the database, a write of v2 is acknowledged, the key is evicted, the
/// reader resumes: its fill must be refused, so no later read sees v1.
#[tokio::test]
async fn slow_filler_cannot_install_a_version_older_than_an_acknowledged_write() {
    let s = setup().await;
    let sc = s.fixture().start().await;
    let v1 = sc.put("accounts", "k", json!({"n": 1})).await.version();
    s.redis.del(&entry_key("accounts", "k")).await;

    let hold = sc.hold(FILL_BEFORE_STORE, "accounts", "k").await;
    let (http, url) = (sc.http.clone(), sc.url("accounts", "k"));
    let reader =
        tokio::spawn(async move { http.get(url).send().await.unwrap().text().await.unwrap() });
    sc.wait_held(hold).await;

    let w = sc.put("accounts", "k", json!({"n": 2})).await;
    assert_eq!(w.cache.as_deref(), Some("ok"));
    let v2 = w.version();
    s.redis.del(&entry_key("accounts", "k")).await; // eviction while the filler sleeps
    sc.release(hold).await;

    let seen: serde_json::Value = serde_json::from_str(&reader.await.unwrap()).unwrap();
    assert_eq!(
        seen["v"], v1,
        "the reader began before the write; v1 is a fine answer for it"
    );
    assert_eq!(
        s.redis.cached_version("accounts", "k").await,
        None,
        "the old fill was refused"
    );
    let after = sc.get("accounts", "k").await;
    assert_eq!(after.version(), v2);
    assert!(
        sc.metrics()
            .await
            .contains("wtc_fills_total{entity=\"accounts\",outcome=\"lost_lease\"} 1")
    );
}

/// Write A commits v_a and stalls before its cache step; write B commits and caches v_b > v_a.
/// A's late cache step must change nothing.
#[tokio::test]
async fn late_cache_step_after_a_newer_write_is_rejected() {
    let s = setup().await;
    let sc = s.fixture().start().await;
    sc.put("accounts", "k", json!({"n": 0})).await;
    let (a, v_b) = late_writer(&sc, async {
        let b = sc.put("accounts", "k", json!({"n": 2})).await;
        assert_eq!(b.cache.as_deref(), Some("ok"));
        b.version()
    })
    .await;
    assert!(a.version() < v_b);
    assert_eq!(
        a.cache.as_deref(),
        Some("ok"),
        "a rejected stale step is not a failure"
    );
    assert_eq!(s.redis.cached_version("accounts", "k").await, Some(v_b));
    assert_eq!(sc.get("accounts", "k").await.version(), v_b);
}

/// The same after a delete: the tombstone stays, the row is not resurrected.
#[tokio::test]
async fn late_cache_step_after_a_delete_does_not_resurrect_the_row() {
    let s = setup().await;
    let sc = s.fixture().start().await;
    sc.put("accounts", "k", json!({"n": 0})).await;
    let (_a, v_d) = late_writer(&sc, async {
        let d = sc.delete("accounts", "k").await;
        assert_eq!(d.status, 200);
        d.version()
    })
    .await;
    assert_eq!(s.redis.cached_version("accounts", "k").await, Some(v_d));
    let r = sc.get("accounts", "k").await;
    assert_eq!((r.status, r.etag), (404, Some(v_d)));
    assert_eq!(db_version(&s.pool, &s.table, "k").await, None);
}

/// Newer write acknowledged, then the key is evicted, then the older write's cache step arrives
/// on an empty slot: it must not fill it (its write intent was revoked by the newer write).
#[tokio::test]
async fn late_cache_step_into_an_evicted_slot_is_skipped() {
    let s = setup().await;
    let sc = s.fixture().start().await;
    sc.put("accounts", "k", json!({"n": 0})).await;
    let (a, v_b) = late_writer(&sc, async {
        let v = sc.put("accounts", "k", json!({"n": 2})).await.version();
        s.redis.del(&entry_key("accounts", "k")).await;
        v
    })
    .await;
    assert!(a.version() < v_b);
    assert_eq!(
        s.redis.cached_version("accounts", "k").await,
        None,
        "nothing older may be cached"
    );
    assert_eq!(sc.get("accounts", "k").await.version(), v_b);
    assert_eq!(s.redis.cached_version("accounts", "k").await, Some(v_b));
}

/// Runs write A (n = 1) held before its cache step, runs `meanwhile`, then releases A.
async fn late_writer<T>(
    sc: &Sidecar,
    meanwhile: impl std::future::Future<Output = T>,
) -> (Reply, T) {
    let hold = sc.hold(WRITE_BEFORE_CACHE_STEP, "accounts", "k").await;
    let req = sc.http.put(sc.url("accounts", "k")).body(r#"{"n": 1}"#);
    let a = tokio::spawn(async move { req.send().await.unwrap() });
    sc.wait_held(hold).await;
    let out = meanwhile.await;
    sc.release(hold).await;
    let resp = a.await.unwrap();
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("x-wtc-cache")
        .map(|v| v.to_str().unwrap().to_string());
    let raw = resp.text().await.unwrap();
    let reply = Reply {
        status,
        etag: None,
        cache,
        body: serde_json::from_str(&raw).unwrap(),
        raw,
    };
    (reply, out)
}

/// 200 concurrent misses on one cold key through two sidecar processes: at most one database read
/// per sidecar (counted by PostgreSQL itself), and every reader gets the row.
#[tokio::test]
async fn herd_of_200_misses_on_two_sidecars_costs_at_most_two_database_reads() {
    let s = setup().await;
    // A generous wait so a loaded test machine does not turn waiting readers into database readers.
    let start = || {
        Fixture::new(&s.redis.url())
            .entity("accounts", &s.table)
            .with(|c| c.cache.lease_wait_ms = 3_000)
            .start()
    };
    let (a, b) = (start().await, start().await);
    let v = a.put("accounts", "hot", json!({"n": 1})).await.version();
    s.redis.del(&entry_key("accounts", "hot")).await;
    let before = select_calls(&s.pool, &s.table).await;

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let mut readers = vec![];
    for i in 0..200 {
        let sc = if i % 2 == 0 { &a } else { &b };
        let (http, url, barrier) = (sc.http.clone(), sc.url("accounts", "hot"), barrier.clone());
        readers.push(tokio::spawn(async move {
            barrier.wait().await;
            let r = http.get(url).send().await.unwrap();
            (
                r.status().as_u16(),
                r.headers()["etag"].to_str().unwrap().to_string(),
            )
        }));
    }
    for r in readers {
        let (status, etag) = r.await.unwrap();
        assert_eq!((status, etag), (200, format!("\"{v}\"")));
    }
    let reads = select_calls(&s.pool, &s.table).await - before;
    println!("herd: 200 readers, 2 sidecars, {reads} database read(s)");
    assert!(
        (1..=2).contains(&reads),
        "{reads} database reads for one cold key"
    );
}
