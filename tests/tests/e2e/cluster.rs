//! Redis Cluster (`redis+cluster://`): calls that name many keys (a batch's cache steps, a bulk
//! read's leases and fills) span slots, and a cluster refuses a pipeline across slots; each is
//! split by slot and answered in the caller's order.

use serde_json::{Value, json};
use wtc_tests::cluster::RedisCluster;
use wtc_tests::*;

#[tokio::test]
async fn batches_and_bulk_reads_across_slots() {
    let pool = pg().await;
    let table = unique("cluster");
    create_table(&pool, &table).await;
    let redis = RedisCluster::start(3, 0).await;
    let sc = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .start()
        .await;
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    sc.put("accounts", "gone", json!({"n": 0})).await;

    let writes: Vec<Value> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| json!({"entity": "accounts", "key": k, "op": "put", "data": {"n": i}}))
        .collect();
    let r = sc
        .send(sc.http.post(format!("{}/v1/batch", sc.base)).json(&json!({
            "writes": writes,
            "invalidate": [{"entity": "accounts", "key": "gone"}],
        })))
        .await;
    assert_eq!(
        (r.status, r.cache.as_deref()),
        (200, Some("ok")),
        "{}",
        r.raw
    );
    let results = r.body["results"].as_array().unwrap();
    for (k, res) in keys.iter().zip(results) {
        assert_eq!(res["key"], json!(k));
        assert_eq!(
            redis.cached_version("accounts", k).await,
            res["v"].as_i64(),
            "{k}"
        );
    }
    assert_eq!(redis.cached_version("accounts", "gone").await, None);

    // Evict a third, then read everything back in one bulk read: hits, and misses leased and
    // filled by slot, answered in the order asked.
    let mut c = redis.connection().await;
    for k in keys.iter().step_by(3) {
        redis::cmd("DEL")
            .arg(entry_key("accounts", k))
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
    let mut asked: Vec<&str> = keys.iter().map(String::as_str).rev().collect();
    asked.push("missing");
    let r = sc
        .send(
            sc.http
                .post(format!("{}/v1/entities/accounts/_bulk_get", sc.base))
                .json(&json!({ "keys": asked })),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), asked.len());
    for (k, item) in asked.iter().zip(items) {
        assert_eq!(item["key"], json!(k), "{}", r.raw);
        let db = db_version(&pool, &table, k).await;
        assert_eq!(item["envelope"]["v"].as_i64(), db, "{k}: {item}");
    }
    for k in &keys {
        assert_eq!(
            redis.cached_version("accounts", k).await,
            db_version(&pool, &table, k).await,
            "{k} filled"
        );
    }
}

/// `rediss+cluster://` with a private CA: the nodes, their bus and their replication on TLS only.
#[tokio::test]
async fn a_cluster_over_tls_with_a_private_ca() {
    let pool = pg().await;
    let table = unique("cluster_tls");
    create_table(&pool, &table).await;
    let certs = wtc_tests::tls::Certs::make();
    let redis = RedisCluster::start_tls(3, &certs).await;
    assert!(redis.url().starts_with("rediss+cluster://"));
    let sc = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| c.redis.ca_file = Some(certs.path("ca.crt").display().to_string()))
        .start()
        .await;
    for i in 0..12 {
        let k = format!("k{i}");
        let put = sc.put("accounts", &k, json!({"n": i})).await;
        assert_eq!(
            (put.status, put.cache.as_deref()),
            (201, Some("ok")),
            "{}",
            put.raw
        );
        assert_eq!(
            redis.cached_version("accounts", &k).await,
            Some(put.version())
        );
        let got = sc.get("accounts", &k).await;
        assert_eq!(
            (got.status, got.cache.as_deref()),
            (200, Some("hit")),
            "{}",
            got.raw
        );
    }
}
