//! `POST /v1/batch` (one transaction, one Redis round trip for the cache steps) and
//! `POST /v1/entities/{entity}/_bulk_get` (one MGET, one database read for all misses, fills
//! under leases).

use serde_json::{Value, json};
use std::time::Instant;
use wtc_tests::*;

struct Setup {
    pool: sqlx::PgPool,
    redis: RedisServer,
    sidecar: Sidecar,
    table: String,
}

async fn setup() -> Setup {
    let TestBed { pool, redis, table } = TestBed::new("batch").await;
    let sidecar = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| c.limits.max_batch_items = 150)
        .start()
        .await;
    Setup {
        pool,
        redis,
        sidecar,
        table,
    }
}

async fn batch(sc: &Sidecar, body: Value) -> Reply {
    sc.send(sc.http.post(format!("{}/v1/batch", sc.base)).json(&body))
        .await
}

async fn bulk_get(sc: &Sidecar, keys: &[&str]) -> Reply {
    let url = format!("{}/v1/entities/accounts/_bulk_get", sc.base);
    sc.send(sc.http.post(url).json(&json!({ "keys": keys })))
        .await
}

/// `calls` of one command in Redis's `INFO commandstats` (0 when never called).
async fn redis_calls(redis: &RedisServer, command: &str) -> u64 {
    let mut c = redis.connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn round_trips(sc: &Sidecar, op: &str) -> f64 {
    sc.metric(&format!("wtc_redis_round_trips_total{{op=\"{op}\"}}"))
        .await
}

async fn row_count(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Executions of the sidecar's write statements on `table` (pg_stat_statements).
async fn write_statement_calls(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements \
         WHERE (query LIKE '%INSERT INTO ' || $1 || ' AS t%' OR query LIKE '%UPDATE ' || $1 || ' AS t%') \
         AND query NOT LIKE '%pg_stat_statements%'",
    )
    .bind(format!("\"{table}\""))
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn lease_exists(redis: &RedisServer, key: &str) -> bool {
    let mut c = redis.connection().await.unwrap();
    let n: i64 = redis::cmd("EXISTS")
        .arg(format!("{}:lease", entry_key("accounts", key)))
        .query_async(&mut c)
        .await
        .unwrap();
    n == 1
}

fn hundred_puts(bad: Option<(usize, Value)>) -> Value {
    let writes: Vec<Value> = (0..100)
        .map(|i| {
            let mut w = json!({"entity": "accounts", "key": format!("b{i}"), "op": "put", "data": {"n": i}});
            if let Some((at, patch)) = &bad
                && *at == i
            {
                for (k, v) in patch.as_object().unwrap() {
                    w[k] = v.clone();
                }
            }
            w
        })
        .collect();
    json!({ "writes": writes })
}

#[tokio::test]
async fn a_batch_of_100_is_one_transaction_and_one_redis_round_trip() {
    let s = setup().await;
    let sc = &s.sidecar;
    // Item 73's key exists already, at version v73 (and is cached).
    let v73 = sc.put("accounts", "b73", json!({"n": -1})).await.version();

    // A failed If-Match in item 73: nothing committed, nothing cached, no intent left behind.
    let r = batch(
        sc,
        hundred_puts(Some((73, json!({"if_match": v73 + 1000})))),
    )
    .await;
    assert_eq!(r.status, 412, "{}", r.raw);
    assert_eq!(r.error_code(), "precondition_failed");
    assert_eq!(r.body["error"]["item"], 73);
    assert_eq!(r.body["error"]["current"], v73);
    // A value the database refuses in item 73 (NOT NULL): the same.
    let r = batch(
        sc,
        hundred_puts(Some((73, json!({"data": {"balance": null}})))),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.raw);
    assert_eq!(r.error_code(), "rejected_by_database");
    assert_eq!(r.body["error"]["item"], 73);
    // The same, with item 73 in the set statement of the other 99 (same columns): the database
    // refuses the statement as a whole; the batch runs again item by item to name the item.
    let r = batch(
        sc,
        hundred_puts(Some((73, json!({"data": {"n": 3_000_000_000_i64}})))),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.raw);
    assert_eq!(r.error_code(), "rejected_by_database");
    assert_eq!(r.body["error"]["item"], 73);
    // An unknown column in item 73 (caught before the database): the same code as a single PUT.
    let r = batch(sc, hundred_puts(Some((73, json!({"data": {"nope": 1}}))))).await;
    assert_eq!(
        (r.status, r.error_code()),
        (422, "invalid_body"),
        "{}",
        r.raw
    );
    assert_eq!(r.body["error"]["item"], 73);
    for i in 0..100 {
        let key = format!("b{i}");
        let want_db = (i == 73).then_some(v73);
        assert_eq!(db_version(&s.pool, &s.table, &key).await, want_db, "{key}");
        assert_eq!(
            s.redis.cached_version("accounts", &key).await,
            want_db,
            "{key}"
        );
        assert!(
            !lease_exists(&s.redis, &key).await,
            "intent of {key} was given back"
        );
    }
    assert_eq!(row_count(&s.pool, &s.table).await, 1);

    // The same batch with the right If-Match: 100 writes, one transaction, and the cache steps of
    // all 100 in one round trip. Counted: the sidecar's own count of its pipelines
    // (wtc_redis_round_trips_total{op="batch_store"}: +1), and Redis's count of script calls
    // (INFO commandstats, cmdstat_evalsha: +100, one STORE per write; no EVAL fallback).
    let stores_before = round_trips(sc, "batch_store").await;
    let intents_before = round_trips(sc, "batch_intents").await;
    let evalsha_before = redis_calls(&s.redis, "evalsha").await;
    let eval_before = redis_calls(&s.redis, "eval").await;
    let statements_before = write_statement_calls(&s.pool, &s.table).await;
    let started = Instant::now();
    let r = batch(sc, hundred_puts(Some((73, json!({"if_match": v73}))))).await;
    let batch_took = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.cache.as_deref(), Some("ok"));
    assert_eq!(r.body["cache"], "ok");
    assert_eq!(round_trips(sc, "batch_store").await - stores_before, 1.0);
    assert_eq!(round_trips(sc, "batch_intents").await - intents_before, 1.0);
    assert_eq!(redis_calls(&s.redis, "evalsha").await - evalsha_before, 100);
    assert_eq!(redis_calls(&s.redis, "eval").await, eval_before);
    // Plain puts to one table with the same columns are one set statement: in lock order, the
    // puts before item 73, item 73's conditional update, the puts after it (one per item: 100).
    let statements = write_statement_calls(&s.pool, &s.table).await - statements_before;
    assert!(
        statements <= 3,
        "{statements} write statements for 100 writes"
    );
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 100);
    for (i, res) in results.iter().enumerate() {
        let key = format!("b{i}");
        assert_eq!(res["key"], key.as_str());
        assert_eq!(res["entity"], "accounts");
        assert_eq!(res["status"], if i == 73 { 200 } else { 201 });
        assert_eq!(res["deleted"], false);
        let v = res["v"].as_i64().unwrap();
        assert_eq!(res["envelope"]["v"], v);
        assert_eq!(res["envelope"]["data"]["n"], i);
        assert_eq!(db_version(&s.pool, &s.table, &key).await, Some(v));
        assert_eq!(s.redis.cached_version("accounts", &key).await, Some(v));
    }
    // One transaction: every statement of it saw the same now().
    let stamps: std::collections::HashSet<&str> = results
        .iter()
        .map(|r| r["envelope"]["written_at"].as_str().unwrap())
        .collect();
    assert_eq!(stamps.len(), 1, "one transaction, one now(): {stamps:?}");

    // For the record: the same 100 writes one by one.
    let started = Instant::now();
    for i in 0..100 {
        let w = sc.put("accounts", &format!("b{i}"), json!({"n": i})).await;
        assert_eq!(w.status, 200);
    }
    let singles_took = started.elapsed();
    eprintln!(
        "batch of 100 writes: {:.1} ms; 100 single writes: {:.1} ms",
        batch_took.as_secs_f64() * 1e3,
        singles_took.as_secs_f64() * 1e3
    );
}

#[tokio::test]
async fn batch_answers_match_reads_and_invalidate_evicts() {
    let s = setup().await;
    let sc = &s.sidecar;
    let x1 = sc
        .put("accounts", "x1", json!({"owner": "A", "balance": 1}))
        .await
        .version();
    sc.put("accounts", "x2", json!({"owner": "B"})).await;
    let other = sc.put("accounts", "other", json!({"n": 5})).await.version();
    assert_eq!(
        s.redis.cached_version("accounts", "other").await,
        Some(other)
    );

    let r = batch(
        sc,
        json!({
            "writes": [
                {"entity": "accounts", "key": "x1", "op": "put", "data": {"balance": 2}, "if_match": format!("\"{x1}\"")},
                {"entity": "accounts", "key": "x2", "op": "delete"},
                {"entity": "accounts", "key": "x3", "op": "put", "data": {"owner": "C"}},
            ],
            "invalidate": [{"entity": "accounts", "key": "other"}],
        }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.cache.as_deref(), Some("ok"));
    let res = r.body["results"].as_array().unwrap();
    assert_eq!(
        res.iter().map(|x| x["status"].clone()).collect::<Vec<_>>(),
        vec![json!(200), json!(200), json!(201)]
    );
    assert_eq!(res[1]["deleted"], true);
    assert_eq!(res[1]["envelope"]["deleted"], true);

    let g1 = sc.get("accounts", "x1").await;
    assert_eq!((g1.status, g1.cache.as_deref()), (200, Some("hit")));
    assert_eq!(g1.body, res[0]["envelope"]);
    assert_eq!(g1.etag, res[0]["v"].as_i64());
    assert_eq!(g1.body["data"]["owner"], "A", "columns not named are kept");
    let g2 = sc.get("accounts", "x2").await;
    assert_eq!((g2.status, g2.cache.as_deref()), (404, Some("hit")));
    assert_eq!(g2.etag, res[1]["v"].as_i64());
    let g3 = sc.get("accounts", "x3").await;
    assert_eq!((g3.status, g3.cache.as_deref()), (200, Some("hit")));
    assert_eq!(g3.body, res[2]["envelope"]);
    assert_eq!(db_version(&s.pool, &s.table, "x2").await, None);

    assert_eq!(s.redis.get(&entry_key("accounts", "other")).await, None);
    let g = sc.get("accounts", "other").await;
    assert_eq!(
        (g.status, g.cache.as_deref(), g.etag),
        (200, Some("miss"), Some(other))
    );

    // Bad batches: nothing written, the item named.
    let before = row_count(&s.pool, &s.table).await;
    let put = |key: &str| json!({"entity": "accounts", "key": key, "op": "put", "data": {"n": 1}});
    let cases = [
        (
            json!({"writes": [put("y1"), {"entity": "nope", "key": "k", "op": "put", "data": {}}]}),
            404,
            "unknown_entity",
            Some(1),
        ),
        (
            json!({"writes": [put("y1"), put("y1")]}),
            400,
            "duplicate_key",
            Some(1),
        ),
        (
            json!({"writes": [put("y1"), {"entity": "accounts", "key": "gone", "op": "delete"}]}),
            404,
            "not_found",
            Some(1),
        ),
        (
            json!({"writes": [put("y1"), {"entity": "accounts", "key": "k", "op": "upsert"}]}),
            400,
            "invalid_op",
            Some(1),
        ),
        (
            json!({"writes": [put("y1"), {"entity": "accounts", "key": "", "op": "delete"}]}),
            400,
            "invalid_key",
            Some(1),
        ),
        (
            json!({"writes": (0..151).map(|i| put(&format!("z{i}"))).collect::<Vec<_>>()}),
            413,
            "batch_too_large",
            None,
        ),
        (json!({"writes": {}}), 400, "invalid_body", None),
    ];
    for (body, status, code, item) in cases {
        let r = batch(sc, body).await;
        assert_eq!((r.status, r.error_code()), (status, code), "{}", r.raw);
        assert_eq!(
            r.body["error"]["item"].as_u64(),
            item.map(|i| i as u64),
            "{}",
            r.raw
        );
    }
    assert_eq!(row_count(&s.pool, &s.table).await, before);
    assert_eq!(s.redis.get(&entry_key("accounts", "y1")).await, None);
    let r = sc.send(sc.http.get(format!("{}/v1/batch", sc.base))).await;
    assert_eq!(r.status, 405);
    // No writes, only evictions: nothing committed, the key evicted.
    sc.put("accounts", "y2", json!({"n": 1})).await;
    let r = batch(
        sc,
        json!({"writes": [], "invalidate": [{"entity": "accounts", "key": "y2"}]}),
    )
    .await;
    assert_eq!(
        (r.status, r.cache.as_deref()),
        (200, Some("ok")),
        "{}",
        r.raw
    );
    assert_eq!(r.body["results"], json!([]));
    assert_eq!(s.redis.get(&entry_key("accounts", "y2")).await, None);
}

#[tokio::test]
async fn bulk_get_reads_all_misses_in_one_query_and_fills_them() {
    let s = setup().await;
    let sc = &s.sidecar;
    let mut v = std::collections::HashMap::new();
    for k in ["a", "b", "c", "d", "f"] {
        v.insert(
            k,
            sc.put("accounts", k, json!({"owner": k})).await.version(),
        );
    }
    sc.delete("accounts", "f").await;
    // c and d evicted; e only in the database (written around the sidecar, from its sequence).
    s.redis.del(&entry_key("accounts", "c")).await;
    s.redis.del(&entry_key("accounts", "d")).await;
    let seq = format!("{}_version_wtc_seq", s.table);
    let ve: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (id, owner, version) VALUES ('e', 'e', nextval('{seq}')) RETURNING version",
        s.table
    )))
    .fetch_one(&s.pool)
    .await
    .unwrap();
    v.insert("e", ve);

    let keys = ["a", "c", "missing", "e", "b", "d", "f", "a"];
    let reads_before = select_calls(&s.pool, &s.table).await;
    let ops = ["bulk_get", "bulk_leases", "bulk_fills"];
    let mut trips = vec![];
    for op in ops {
        trips.push(round_trips(sc, op).await);
    }
    let r = bulk_get(sc, &keys).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.cache.as_deref(), Some("miss"));
    assert_eq!(
        select_calls(&s.pool, &s.table).await - reads_before,
        1,
        "one database read for c, missing, e and d"
    );
    let mut after = vec![];
    for op in ops {
        after.push(round_trips(sc, op).await);
    }
    assert_eq!(
        after
            .iter()
            .zip(&trips)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
        vec![1.0, 1.0, 1.0],
        "one MGET, one lease pipeline, one fill pipeline"
    );
    let items = r.body["items"].as_array().unwrap();
    let got: Vec<(String, i64, String)> = items
        .iter()
        .map(|i| {
            (
                i["key"].as_str().unwrap().to_string(),
                i["status"].as_i64().unwrap(),
                i["cache"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, i64, String)> = [
        ("a", 200, "hit"),
        ("c", 200, "miss"),
        ("missing", 404, "miss"),
        ("e", 200, "miss"),
        ("b", 200, "hit"),
        ("d", 200, "miss"),
        ("f", 404, "hit"),
        ("a", 200, "hit"),
    ]
    .iter()
    .map(|(k, st, c)| (k.to_string(), *st, c.to_string()))
    .collect();
    assert_eq!(got, want);
    for item in items {
        let key = item["key"].as_str().unwrap();
        match v.get(key) {
            Some(ver) if key != "f" => {
                assert_eq!(item["envelope"]["v"], *ver, "{key}");
                assert_eq!(item["envelope"]["data"]["owner"], key);
            }
            _ => assert_eq!(item["envelope"], Value::Null, "{key}"),
        }
    }
    // The misses are cached now, at the database's versions; no lease is left behind.
    for k in ["c", "d", "e"] {
        assert_eq!(
            s.redis.cached_version("accounts", k).await,
            Some(v[k]),
            "{k}"
        );
        assert!(!lease_exists(&s.redis, k).await, "{k}");
    }
    assert_eq!(s.redis.get(&entry_key("accounts", "missing")).await, None);
    assert!(!lease_exists(&s.redis, "missing").await);

    // Again: all from Redis, no database read.
    let reads_before = select_calls(&s.pool, &s.table).await;
    let r = bulk_get(sc, &["e", "d", "c", "a"]).await;
    assert_eq!(
        (r.status, r.cache.as_deref()),
        (200, Some("hit")),
        "{}",
        r.raw
    );
    assert_eq!(select_calls(&s.pool, &s.table).await, reads_before);
    assert_eq!(r.body["items"][0]["envelope"]["v"], v["e"]);

    // Limits and bad input.
    let many: Vec<String> = (0..151).map(|i| format!("k{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let r = bulk_get(sc, &many).await;
    assert_eq!((r.status, r.error_code()), (413, "batch_too_large"));
    let r = bulk_get(sc, &["ok", ""]).await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_key"));
    assert_eq!(r.body["error"]["item"], 1);
    let r = sc
        .send(
            sc.http
                .post(format!("{}/v1/entities/nope/_bulk_get", sc.base))
                .json(&json!({"keys": ["a"]})),
        )
        .await;
    assert_eq!((r.status, r.error_code()), (404, "unknown_entity"));
}

/// Batches naming the same keys in different orders, at once: the statements take their locks in
/// one global order (lock id), so none deadlocks (PostgreSQL would abort one: a 503), and no key
/// ends cached at a version other than its database's (racing intents may leave a slot empty:
/// the empty-slot rule).
#[tokio::test]
async fn concurrent_overlapping_batches_commit_without_deadlock() {
    let s = setup().await;
    let sc = &s.sidecar;
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8usize {
        let mut order = keys.clone();
        if t % 2 == 1 {
            order.reverse();
        }
        order.rotate_left(t * 5);
        let writes: Vec<Value> = order
            .iter()
            .map(|k| json!({"entity": "accounts", "key": k, "op": "put", "data": {"n": t}}))
            .collect();
        let req = sc
            .http
            .post(format!("{}/v1/batch", sc.base))
            .json(&json!({ "writes": writes }));
        tasks.spawn(async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (status, body) = done.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    for k in &keys {
        let v = db_version(&s.pool, &s.table, k).await;
        assert!(v.is_some());
        let cached = s.redis.cached_version("accounts", k).await;
        assert!(
            cached.is_none() || cached == v,
            "{k}: cached {cached:?}, database {v:?}"
        );
    }
}

/// Redis paused (SIGSTOP) during a batch: committed and acknowledged as `repairing`; reads and
/// bulk reads answer from the database; once Redis is back, the repair queue evicts the batch's
/// keys and the `invalidate` key, so nothing older than the batch is served.
#[tokio::test]
async fn batch_with_redis_paused_is_committed_then_repaired() {
    let pool = pg().await;
    let table = unique("batch");
    create_table(&pool, &table).await;
    let redis = RedisServer::start().await;
    let sc = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| c.cache.redis_down_backoff_ms = 200)
        .start()
        .await;
    for k in ["a", "b", "c", "d"] {
        assert_eq!(sc.put("accounts", k, json!({"n": 0})).await.status, 201);
    }
    redis.signal("STOP");
    let writes: Vec<Value> = ["a", "b", "c"]
        .iter()
        .map(|k| json!({"entity": "accounts", "key": k, "op": "put", "data": {"n": 1}}))
        .collect();
    let r = batch(
        &sc,
        json!({"writes": writes, "invalidate": [{"entity": "accounts", "key": "d"}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.cache.as_deref(), Some("repairing"));
    assert_eq!(r.body["cache"], "repairing");
    let acked: Vec<i64> = r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["v"].as_i64().unwrap())
        .collect();
    for (k, v) in ["a", "b", "c"].iter().zip(&acked) {
        assert_eq!(db_version(&pool, &table, k).await, Some(*v));
    }
    let r = bulk_get(&sc, &["a", "b", "c"]).await;
    assert_eq!(
        (r.status, r.cache.as_deref()),
        (200, Some("bypass")),
        "{}",
        r.raw
    );
    for (item, v) in r.body["items"].as_array().unwrap().iter().zip(&acked) {
        assert_eq!(item["envelope"]["v"], *v);
    }

    redis.signal("CONT");
    assert!(
        eventually(std::time::Duration::from_secs(15), || async {
            sc.metric("wtc_repair_queue_depth").await == 0.0
        })
        .await,
        "the repair queue drained"
    );
    for (k, v) in ["a", "b", "c"].iter().zip(&acked) {
        let cached = redis.cached_version("accounts", k).await;
        assert!(cached.is_none() || cached == Some(*v), "{k}: {cached:?}");
    }
    assert_eq!(redis.get(&entry_key("accounts", "d")).await, None);
    let r = bulk_get(&sc, &["a", "b", "c"]).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    for (item, v) in r.body["items"].as_array().unwrap().iter().zip(&acked) {
        assert_eq!(item["envelope"]["v"], *v);
    }
}

/// A bulk reader read v1 from the database under its lease; a write of v2 is acknowledged and the
/// key evicted before the bulk reader's fill pipeline: that fill must be refused (the write's
/// intent revoked the lease), so no later read sees v1.
#[tokio::test]
async fn slow_bulk_filler_cannot_install_a_version_older_than_an_acknowledged_write() {
    let s = setup().await;
    let sc = &s.sidecar;
    let v1 = sc.put("accounts", "k", json!({"n": 1})).await.version();
    sc.put("accounts", "other", json!({"n": 1})).await;
    s.redis.del(&entry_key("accounts", "k")).await;
    s.redis.del(&entry_key("accounts", "other")).await;

    let hold = sc.hold(FILL_BEFORE_STORE, "accounts", "k").await;
    let req = sc
        .http
        .post(format!("{}/v1/entities/accounts/_bulk_get", sc.base))
        .json(&json!({"keys": ["other", "k"]}));
    let reader = tokio::spawn(async move { req.send().await.unwrap().text().await.unwrap() });
    sc.wait_held(hold).await;
    let w = sc.put("accounts", "k", json!({"n": 2})).await;
    assert_eq!(w.cache.as_deref(), Some("ok"));
    let v2 = w.version();
    s.redis.del(&entry_key("accounts", "k")).await;
    sc.release(hold).await;

    let seen: Value = serde_json::from_str(&reader.await.unwrap()).unwrap();
    assert_eq!(
        seen["items"][1]["envelope"]["v"], v1,
        "it began before the write"
    );
    assert_eq!(
        s.redis.cached_version("accounts", "k").await,
        None,
        "the old fill was refused"
    );
    assert!(s.redis.cached_version("accounts", "other").await.is_some());
    assert_eq!(sc.get("accounts", "k").await.version(), v2);
    assert!(
        sc.metrics()
            .await
            .contains("wtc_fills_total{entity=\"accounts\",outcome=\"lost_lease\"} 1")
    );
}

/// A batch committed v1 and stalls before its cache step; a write of v2 is acknowledged; the key
/// is evicted; the batch's STORE then finds an empty slot and its intent gone: skipped (the
/// empty-slot rule), so no later read sees v1.
#[tokio::test]
async fn late_batch_cache_step_into_an_evicted_slot_is_skipped() {
    let s = setup().await;
    let sc = &s.sidecar;
    let hold = sc.hold(WRITE_BEFORE_CACHE_STEP, "accounts", "k").await;
    let req = sc
        .http
        .post(format!("{}/v1/batch", sc.base))
        .json(&json!({"writes": [
            {"entity": "accounts", "key": "j", "op": "put", "data": {"n": 1}},
            {"entity": "accounts", "key": "k", "op": "put", "data": {"n": 1}},
        ]}));
    let writer = tokio::spawn(async move { req.send().await.unwrap().text().await.unwrap() });
    sc.wait_held(hold).await;
    let w = sc.put("accounts", "k", json!({"n": 2})).await;
    assert_eq!(w.cache.as_deref(), Some("ok"));
    let v2 = w.version();
    s.redis.del(&entry_key("accounts", "k")).await;
    sc.release(hold).await;

    let done: Value = serde_json::from_str(&writer.await.unwrap()).unwrap();
    assert_eq!(done["cache"], "ok");
    assert!(done["results"][1]["v"].as_i64().unwrap() < v2);
    assert_eq!(
        s.redis.cached_version("accounts", "k").await,
        None,
        "skipped"
    );
    assert_eq!(
        s.redis.cached_version("accounts", "j").await,
        done["results"][0]["v"].as_i64()
    );
    assert_eq!(sc.get("accounts", "k").await.version(), v2);
}
