//! Load shedding: `limits.max_in_flight` slots, `limits.max_queue_wait_ms` of waiting, then
//! `503 overloaded`. Slots are filled deterministically with writes stopped at a hold point.

use serde_json::json;
use std::time::Instant;
use wtc_tests::*;

struct Setup {
    pool: sqlx::PgPool,
    _redis: RedisServer,
    table: String,
    sc: Sidecar,
}

async fn setup(max_queue_wait_ms: u64) -> Setup {
    let TestBed { pool, redis, table } = TestBed::new("shed").await;
    let sc = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| c.limits.max_in_flight = 2)
        .with(|c| c.limits.max_queue_wait_ms = max_queue_wait_ms)
        .start()
        .await;
    Setup {
        pool,
        _redis: redis,
        table,
        sc,
    }
}

/// Starts a PUT of `key` and waits until it is stopped after its commit, holding its slot.
async fn held_write(sc: &Sidecar, key: &str) -> (u64, tokio::task::JoinHandle<(u16, String)>) {
    let hold = sc.hold(WRITE_BEFORE_CACHE_STEP, "accounts", key).await;
    let req = sc.http.put(sc.url("accounts", key)).body(r#"{"n": 1}"#);
    let task = tokio::spawn(async move {
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    sc.wait_held(hold).await;
    (hold, task)
}

async fn status_of(sc: &Sidecar, path: &str) -> u16 {
    let r = sc.http.get(format!("{}{path}", sc.base)).send().await;
    r.unwrap().status().as_u16()
}

#[tokio::test]
async fn beyond_max_in_flight_requests_are_shed_with_503_and_retry_after() {
    let s = setup(50).await;
    let sc = &s.sc;
    sc.put("accounts", "c", json!({"n": 0})).await;
    let (hold_a, a) = held_write(sc, "a").await;
    let (hold_b, b) = held_write(sc, "b").await;

    let started = Instant::now();
    let resp = sc.http.get(sc.url("accounts", "c")).send().await.unwrap();
    let elapsed = started.elapsed();
    println!("shed: 503 after {elapsed:?} (max_queue_wait_ms = 50)");
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");

    // A write is shed before it does anything.
    let w = sc.put("accounts", "d", json!({"n": 1})).await;
    assert_eq!((w.status, w.error_code()), (503, "overloaded"), "{}", w.raw);
    assert_eq!(db_version(&s.pool, &s.table, "d").await, None);

    // Health checks and metrics are never shed.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(status_of(sc, path).await, 200, "{path}");
    }
    assert_eq!(sc.metric("wtc_requests_shed_total").await, 2.0);

    sc.release(hold_a).await;
    sc.release(hold_b).await;
    for (key, task) in [("a", a), ("b", b)] {
        let (status, raw) = task.await.unwrap();
        assert_eq!(status, 201, "held write of {key}: {raw}");
    }
    let r = sc.get("accounts", "c").await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let w = sc.put("accounts", "d", json!({"n": 2})).await;
    assert_eq!(w.status, 201, "{}", w.raw);
    for key in ["a", "b"] {
        assert_eq!(sc.get("accounts", key).await.status, 200);
    }
}

/// A request waits for a slot (within `max_queue_wait_ms`) and is served when one frees.
#[tokio::test]
async fn a_request_waits_for_a_slot_and_is_served_when_one_frees() {
    let s = setup(60_000).await;
    let sc = &s.sc;
    sc.put("accounts", "c", json!({"n": 0})).await;
    let (hold_a, a) = held_write(sc, "a").await;
    let (hold_b, b) = held_write(sc, "b").await;

    let (http, url) = (sc.http.clone(), sc.url("accounts", "c"));
    let waiter = tokio::spawn(async move { http.get(url).send().await.unwrap().status().as_u16() });
    assert!(
        eventually(std::time::Duration::from_secs(10), || async {
            sc.metric("wtc_requests_waiting").await == 1.0
        })
        .await,
        "the third request waits for a slot"
    );
    sc.release(hold_a).await;
    assert_eq!(waiter.await.unwrap(), 200);
    assert_eq!(a.await.unwrap().0, 201);
    sc.release(hold_b).await;
    assert_eq!(b.await.unwrap().0, 201);
    assert_eq!(sc.metric("wtc_requests_waiting").await, 0.0);
    assert_eq!(sc.metric("wtc_requests_shed_total").await, 0.0);
}
