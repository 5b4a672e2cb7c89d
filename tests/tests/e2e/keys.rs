//! One row, one cache entry: spellings of a key that PostgreSQL reads as one value (integers with
//! leading zeros or a sign, uuids in any case, numerics with trailing zeros) name one row, one
//! cache entry and one batch slot (docs/protocol.md "Keys and values").

use serde_json::{Value, json};
use wtc_tests::*;

async fn cached_entries(redis: &RedisServer) -> Vec<String> {
    let mut c = redis.connection().await.unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("wtc:{*")
        .query_async(&mut c)
        .await
        .unwrap();
    keys.retain(|k| !k.ends_with(":lease"));
    keys.sort();
    keys
}

#[tokio::test]
async fn integer_spellings_name_one_row_and_one_entry() {
    let pool = pg().await;
    let table = table_with_key(&pool, "ikeys", "bigint").await;
    let redis = RedisServer::start().await;
    let sc = Fixture::new(&redis.url())
        .entity("items", &table)
        .start()
        .await;
    let w1 = sc.put("items", "42", json!({"label": "one"})).await;
    assert_eq!(
        (w1.status, w1.cache.as_deref()),
        (201, Some("ok")),
        "{}",
        w1.raw
    );
    // Another spelling reads the same cached row.
    let r = sc.get("items", "042").await;
    assert_eq!(
        (r.status, r.cache.as_deref()),
        (200, Some("hit")),
        "{}",
        r.raw
    );
    assert_eq!(r.version(), w1.version());
    // A write through a third spelling: every spelling reads it at once (before: the entry of
    // `042` kept serving `one` until its TTL).
    let w2 = sc.put("items", "+42", json!({"label": "two"})).await;
    assert_eq!(
        (w2.status, w2.cache.as_deref()),
        (200, Some("ok")),
        "{}",
        w2.raw
    );
    for spelling in ["42", "042", "0042", "%2042"] {
        let r = sc.get("items", spelling).await;
        assert_eq!(r.status, 200, "{spelling}: {}", r.raw);
        assert_eq!(
            r.body["data"]["label"], "two",
            "{spelling} is stale: {}",
            r.raw
        );
    }
    assert_eq!(
        cached_entries(&redis).await.len(),
        1,
        "one entry for the row"
    );
    // The body's own spelling of the key is the same key.
    let w3 = sc
        .put("items", "42", json!({"id": "0042", "label": "three"}))
        .await;
    assert_eq!(w3.status, 200, "{}", w3.raw);
    // A delete through one spelling is a 404 through every other.
    assert_eq!(sc.delete("items", "00042").await.status, 200);
    assert_eq!(sc.get("items", "42").await.status, 404);
    assert_eq!(sc.get("items", "+42").await.status, 404);
    // Not an integer, or out of range: 400, and Redis untouched.
    let before = cached_entries(&redis).await;
    for bad in ["4x2", "1.0", "9223372036854775808"] {
        let r = sc.get("items", bad).await;
        assert_eq!(
            (r.status, r.error_code()),
            (400, "invalid_key"),
            "{}",
            r.raw
        );
    }
    assert_eq!(cached_entries(&redis).await, before);

    // A batch naming one row twice, spelled two ways: refused, nothing written.
    let r = sc
        .send(
            sc.http
                .post(format!("{}/v1/batch", sc.base))
                .json(&json!({"writes": [
                    {"entity": "items", "key": "7", "op": "put", "data": {"label": "a"}},
                    {"entity": "items", "key": "007", "op": "put", "data": {"label": "b"}}
                ]})),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (400, "duplicate_key"),
        "{}",
        r.raw
    );
    assert_eq!(r.body["error"]["item"], 1);
    assert_eq!(sc.get("items", "7").await.status, 404, "nothing written");
    // A bulk read answers each spelling, with the row read once.
    sc.put("items", "7", json!({"label": "seven"})).await;
    let r = sc
        .send(
            sc.http
                .post(format!("{}/v1/entities/items/_bulk_get", sc.base))
                .json(&json!({"keys": ["7", "07", 7, "+7"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    for item in items {
        assert_eq!(item["envelope"]["data"]["label"], "seven", "{item}");
    }
    let r = sc
        .send(
            sc.http
                .post(format!("{}/v1/entities/items/_bulk_get", sc.base))
                .json(&json!({"keys": ["7", "x"]})),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (400, "invalid_key"),
        "{}",
        r.raw
    );
    assert_eq!(r.body["error"]["item"], 1);
    // X-Wtc-Min-Version reads take the same spelling rules.
    let v = sc.get("items", "7").await.version();
    let r = sc
        .send(
            sc.http
                .get(sc.url("items", "0007"))
                .header("x-wtc-min-version", v.to_string()),
        )
        .await;
    assert_eq!((r.status, r.version()), (200, v), "{}", r.raw);
}

#[tokio::test]
async fn uuid_and_numeric_spellings_name_one_row() {
    let pool = pg().await;
    let uuids = table_with_key(&pool, "ukeys", "uuid").await;
    let numbers = table_with_key(&pool, "nkeys", "numeric(10,2)").await;
    let redis = RedisServer::start().await;
    let sc = Fixture::new(&redis.url())
        .entity("things", &uuids)
        .entity("prices", &numbers)
        .start()
        .await;
    let id = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    assert_eq!(
        sc.put("things", id, json!({"label": "x"})).await.status,
        201
    );
    let w = sc
        .put(
            "things",
            "A0EEBC999C0B4EF8BB6D6BB9BD380A11",
            json!({"label": "y"}),
        )
        .await;
    assert_eq!(w.status, 200, "an update, not a second row: {}", w.raw);
    for spelling in [id, "%7BA0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11%7D"] {
        let r = sc.get("things", spelling).await;
        assert_eq!(r.body["data"]["label"], "y", "{spelling}: {}", r.raw);
    }
    assert_eq!(
        sc.put("prices", "1.5", json!({"label": "p"})).await.status,
        201
    );
    let r = sc.get("prices", "1.50").await;
    assert_eq!(
        (r.status, r.cache.as_deref()),
        (200, Some("hit")),
        "{}",
        r.raw
    );
    let r = sc.put("prices", "1.505", json!({"label": "q"})).await;
    assert_eq!(
        (r.status, r.error_code()),
        (400, "invalid_key"),
        "{}",
        r.raw
    );
    assert_eq!(cached_entries(&redis).await.len(), 2);
}

#[tokio::test]
async fn a_key_type_without_one_spelling_makes_the_entity_unavailable() {
    let pool = pg().await;
    let table = table_with_key(&pool, "tkeys", "timestamptz").await;
    let redis = RedisServer::start().await;
    let sc = Fixture::new(&redis.url())
        .entity("events", &table)
        .start()
        .await;
    let r = sc.get("events", "2026-11-29").await;
    assert_eq!(
        (r.status, r.error_code()),
        (503, "entity_unavailable"),
        "{}",
        r.raw
    );
    let msg = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("timestamp with time zone"), "{msg}");
    let _: Value = r.body;
}
