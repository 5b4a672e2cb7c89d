//! Memory a client (or an outage) cannot grow without bound: the repair queue has a ceiling and
//! falls back to a sweep of the cache; a bulk read naming one large row many times is refused
//! instead of building an answer of hundreds of megabytes.

use serde_json::json;
use std::time::Duration;
use wtc_tests::*;

/// Redis paused while more keys are written than the repair queue holds: the queue stays at its
/// ceiling, every key is read from the database (also keys never queued, whose cached rows may be
/// stale for this sidecar), and once Redis is back the cache is swept, so nothing older than an
/// acknowledged write is served.
#[tokio::test]
async fn the_repair_queue_is_bounded_and_overflows_into_a_sweep() {
    let bed = TestBed::new("overflow").await;
    let sc = Fixture::new(&bed.redis.url())
        .entity("accounts", &bed.table)
        .with(|c| {
            c.cache.redis_down_backoff_ms = 200;
            c.cache.repair_queue_max_keys = 5;
            c.cache.retry.retries = 0;
        })
        .start()
        .await;
    for i in 0..20 {
        let w = sc.put("accounts", &format!("k{i}"), json!({"n": 0})).await;
        assert_eq!(w.cache.as_deref(), Some("ok"), "{}", w.raw);
    }
    bed.redis.signal("STOP");
    let mut acked = Vec::new();
    for i in 0..20 {
        let w = sc.put("accounts", &format!("k{i}"), json!({"n": 1})).await;
        assert_eq!(
            (w.status, w.cache.as_deref()),
            (200, Some("repairing")),
            "{}",
            w.raw
        );
        acked.push(w.version());
    }
    assert_eq!(sc.metric("wtc_repair_queue_depth").await, 5.0, "bounded");
    assert_eq!(sc.metric("wtc_repair_queue_overflows_total").await, 1.0);
    // Every key (queued or not) is read from the database while overflowed.
    for i in [0, 19] {
        let r = sc.get("accounts", &format!("k{i}")).await;
        assert_eq!(
            (r.cache.as_deref(), r.version()),
            (Some("bypass"), acked[i]),
            "{}",
            r.raw
        );
    }
    bed.redis.signal("CONT");
    assert!(
        eventually(Duration::from_secs(15), || async {
            sc.metric("wtc_repair_queue_depth").await == 0.0
                && bed.redis.get(&entry_key("accounts", "k19")).await.is_none()
        })
        .await,
        "swept"
    );
    for (i, v) in acked.iter().enumerate() {
        let r = sc.get("accounts", &format!("k{i}")).await;
        assert_eq!(r.version(), *v, "k{i} is stale: {}", r.raw);
        assert_ne!(r.cache.as_deref(), Some("bypass"), "the overflow ended");
    }
}

#[tokio::test]
async fn a_bulk_read_cannot_build_a_huge_answer() {
    let bed = TestBed::new("bigbulk").await;
    let sc = Fixture::new(&bed.redis.url())
        .entity("accounts", &bed.table)
        .with(|c| c.limits.max_answer_bytes = 1024 * 1024)
        .start()
        .await;
    let big = "x".repeat(100_000);
    assert_eq!(
        sc.put("accounts", "big", json!({"owner": big}))
            .await
            .status,
        201
    );
    let keys: Vec<&str> = vec!["big"; 50];
    let r = sc
        .send(
            sc.http
                .post(format!("{}/v1/entities/accounts/_bulk_get", sc.base))
                .json(&json!({ "keys": keys })),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (413, "answer_too_large"),
        "{}",
        r.raw
    );
    // Under the limit, the same row answered several times.
    let r = sc
        .send(
            sc.http
                .post(format!("{}/v1/entities/accounts/_bulk_get", sc.base))
                .json(&json!({"keys": ["big", "big", "big"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 3);
}
