//! Values in Redis that this sidecar would never write (corrupt, truncated, foreign, a version
//! prefix newer than the row with a broken body, another Redis type): never served, never a
//! crash; the reader gets the database's row and the value is evicted and refilled.

use serde_json::json;
use wtc_tests::*;

#[tokio::test]
async fn corrupt_or_hostile_cache_values_are_misses_and_get_replaced() {
    let bed = TestBed::new("hostile").await;
    let sc = bed.fixture().start().await;
    let v = sc.put("accounts", "k", json!({"n": 7})).await.version();
    let entry = entry_key("accounts", "k");
    let big = format!(
        "{{\"v\":{},\"data\":{{\"x\":\"{}\"",
        v + 1,
        "a".repeat(100_000)
    );
    let hostile: Vec<String> = vec![
        "not json".into(),
        String::new(),
        format!("{{\"v\":{v}"),
        // A newer-looking version with a body that is not a row: the CAS alone would keep it.
        format!("{{\"v\":{},\"data\":[1],\"written_at\":\"x\"}}", v + 1_000),
        "{\"v\":99999999999999999999,\"data\":{},\"written_at\":\"x\"}".into(),
        format!("{{\"data\":{{}},\"v\":{v},\"written_at\":\"x\"}}"),
        format!("{{\"v\":{v},\"data\":{{}},\"written_at\":\"x\",\"extra\":true}}"),
        String::from_utf8_lossy(b"\xff\xfe\x00\x01{\"v\":1,").into_owned(),
        big,
    ];
    for (i, value) in hostile.iter().enumerate() {
        bed.redis.set(&entry, value).await;
        let r = sc.get("accounts", "k").await;
        assert_eq!(
            (r.status, r.version(), r.body["data"]["n"].as_i64()),
            (200, v, Some(7)),
            "value #{i} was served or broke the read: {}",
            r.raw
        );
        assert_eq!(r.cache.as_deref(), Some("miss"), "value #{i}");
        assert_eq!(
            bed.redis.cached_version("accounts", "k").await,
            Some(v),
            "value #{i} was replaced by the row"
        );
        assert_eq!(sc.get("accounts", "k").await.cache.as_deref(), Some("hit"));
    }
    assert_eq!(
        sc.metric("wtc_cache_corrupt_entries_total").await,
        hostile.len() as f64
    );

    // Another type at the entry's key: reads answer from the database; the next write's cache
    // step fails on it, and the repair queue evicts it.
    let mut c = bed.redis.connection().await.unwrap();
    redis::cmd("DEL")
        .arg(&entry)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    redis::cmd("HSET")
        .arg(&entry)
        .arg("v")
        .arg(v + 5)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let r = sc.get("accounts", "k").await;
    assert_eq!((r.status, r.version()), (200, v), "{}", r.raw);
    let w = sc.put("accounts", "k", json!({"n": 8})).await;
    assert_eq!(w.status, 200, "{}", w.raw);
    let repaired = eventually(std::time::Duration::from_secs(10), || async {
        let r = sc.get("accounts", "k").await;
        r.version() == w.version() && r.cache.as_deref() == Some("hit")
    })
    .await;
    assert!(repaired, "the foreign value was evicted and the row cached");
}

/// The same through a bulk read: hostile values are misses, answered from the database, evicted
/// and refilled in the same request.
#[tokio::test]
async fn bulk_reads_evict_hostile_values_too() {
    let bed = TestBed::new("hostbulk").await;
    let sc = bed.fixture().start().await;
    let mut versions = vec![];
    for k in ["a", "b", "c"] {
        versions.push(sc.put("accounts", k, json!({"n": 1})).await.version());
    }
    bed.redis
        .set(
            &entry_key("accounts", "b"),
            "{\"v\":999999,\"data\":[1],\"written_at\":\"x\"}",
        )
        .await;
    bed.redis.set(&entry_key("accounts", "c"), "garbage").await;
    let r = sc
        .send(
            sc.http
                .post(format!("{}/v1/entities/accounts/_bulk_get", sc.base))
                .json(&json!({"keys": ["a", "b", "c"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    for (i, (k, v)) in ["a", "b", "c"].iter().zip(&versions).enumerate() {
        assert_eq!(
            r.body["items"][i]["envelope"]["v"].as_i64(),
            Some(*v),
            "{k}: {}",
            r.raw
        );
        assert_eq!(
            bed.redis.cached_version("accounts", k).await,
            Some(*v),
            "{k} holds the row again"
        );
    }
    assert_eq!(sc.metric("wtc_cache_corrupt_entries_total").await, 2.0);
}
