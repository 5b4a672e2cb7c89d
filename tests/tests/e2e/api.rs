//! Every route: envelope, ETag, X-Wtc-Cache and status codes, including every bad input.

use serde_json::json;
use wtc_tests::*;

struct Setup {
    pool: sqlx::PgPool,
    redis: RedisServer,
    sidecar: Sidecar,
    table: String,
}

async fn setup() -> Setup {
    let TestBed { pool, redis, table } = TestBed::new("api").await;
    let sidecar = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| c.limits.max_body_bytes = 4096)
        .with(|c| c.limits.max_key_bytes = 64)
        .start()
        .await;
    Setup {
        pool,
        redis,
        sidecar,
        table,
    }
}

#[tokio::test]
async fn write_read_delete_with_envelope_etag_and_cache_status() {
    let s = setup().await;
    let sc = &s.sidecar;

    let created = sc
        .put(
            "accounts",
            "alice",
            json!({"owner": "Alice", "balance": 10}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.raw);
    assert_eq!(created.cache.as_deref(), Some("ok"));
    let v1 = created.version();
    assert_eq!(created.etag, Some(v1));
    assert_eq!(created.body["data"]["owner"], "Alice");
    assert_eq!(created.body["data"]["id"], "alice");
    assert!(
        created.body["data"].get("version").is_none(),
        "the version lives in v, not data"
    );
    let written_at = created.body["written_at"].as_str().unwrap();
    assert!(
        written_at.ends_with('Z') && written_at.contains('T'),
        "{written_at}"
    );
    assert_eq!(s.redis.cached_version("accounts", "alice").await, Some(v1));
    assert_eq!(db_version(&s.pool, &s.table, "alice").await, Some(v1));

    let hit = sc.get("accounts", "alice").await;
    assert_eq!(
        (hit.status, hit.cache.as_deref(), hit.etag),
        (200, Some("hit"), Some(v1))
    );
    assert_eq!(
        hit.raw, created.raw,
        "a hit returns the stored envelope bytes"
    );

    let updated = sc.put("accounts", "alice", json!({"balance": 20})).await;
    assert_eq!(updated.status, 200);
    assert!(updated.version() > v1);
    assert_eq!(
        updated.body["data"]["owner"], "Alice",
        "fields not sent are kept"
    );
    assert_eq!(updated.body["data"]["balance"], 20);

    let reads_before = select_calls(&s.pool, &s.table).await;
    let deleted = sc.delete("accounts", "alice").await;
    assert_eq!(deleted.status, 200, "{}", deleted.raw);
    assert_eq!(deleted.body["deleted"], true);
    assert!(deleted.version() > updated.version());
    assert_eq!(db_version(&s.pool, &s.table, "alice").await, None);

    let gone = sc.get("accounts", "alice").await;
    assert_eq!((gone.status, gone.cache.as_deref()), (404, Some("hit")));
    assert_eq!(
        gone.etag,
        Some(deleted.version()),
        "404 carries the tombstone's version"
    );
    assert_eq!(gone.error_code(), "not_found");
    assert_eq!(
        select_calls(&s.pool, &s.table).await,
        reads_before,
        "a tombstone answers 404 without a database read"
    );

    let again = sc.delete("accounts", "alice").await;
    assert_eq!(again.status, 404);
    let never = sc.get("accounts", "nobody").await;
    assert_eq!((never.status, never.cache.as_deref()), (404, Some("miss")));
}

#[tokio::test]
async fn versions_strictly_increase_across_update_delete_and_reinsert() {
    let s = setup().await;
    let sc = &s.sidecar;
    let mut versions = vec![];
    for round in 0..3 {
        versions.push(sc.put("accounts", "k", json!({"n": round})).await.version());
        versions.push(
            sc.put("accounts", "k", json!({"n": round + 100}))
                .await
                .version(),
        );
        versions.push(sc.delete("accounts", "k").await.version());
    }
    versions.push(sc.put("accounts", "k", json!({"n": 1})).await.version());
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    let last = *versions.last().unwrap();
    assert_eq!(db_version(&s.pool, &s.table, "k").await, Some(last));
    let read = sc.get("accounts", "k").await;
    assert_eq!(
        (read.status, read.version()),
        (200, last),
        "the re-inserted row is served, not the tombstone"
    );
}

#[tokio::test]
async fn if_match_makes_writes_conditional() {
    let s = setup().await;
    let sc = &s.sidecar;
    let v1 = sc.put("accounts", "c", json!({"n": 1})).await.version();

    let ok = sc.put_if("accounts", "c", json!({"n": 2}), v1).await;
    assert_eq!(ok.status, 200, "{}", ok.raw);
    let v2 = ok.version();

    let stale = sc.put_if("accounts", "c", json!({"n": 3}), v1).await;
    assert_eq!(stale.status, 412, "{}", stale.raw);
    assert_eq!(stale.error_code(), "precondition_failed");
    assert_eq!(stale.etag, Some(v2), "412 tells the current version");
    assert!(stale.error_message().contains(&v2.to_string()));

    let missing = sc.put_if("accounts", "nope", json!({"n": 1}), 1).await;
    assert_eq!(
        missing.status, 412,
        "If-Match on a missing row never creates it"
    );
    assert_eq!(db_version(&s.pool, &s.table, "nope").await, None);

    let req = sc
        .http
        .delete(sc.url("accounts", "c"))
        .header("if-match", format!("\"{v1}\""));
    assert_eq!(sc.send(req).await.status, 412);
    let req = sc
        .http
        .delete(sc.url("accounts", "c"))
        .header("if-match", format!("\"{v2}\""));
    assert_eq!(sc.send(req).await.status, 200);
    assert_eq!(db_version(&s.pool, &s.table, "c").await, None);
}

#[tokio::test]
async fn bad_input_gets_a_specific_error_and_loses_nothing() {
    let s = setup().await;
    let sc = &s.sidecar;
    let v = sc
        .put("accounts", "keep", json!({"owner": "K", "balance": 5}))
        .await
        .version();
    let url = sc.url("accounts", "keep");

    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (sc.http.get(sc.url("nosuch", "k")), 404, "unknown_entity"),
        (
            sc.http.put(sc.url("nosuch", "k")).body("{}"),
            404,
            "unknown_entity",
        ),
        (sc.http.put(&url).body("{not json"), 400, "invalid_body"),
        (sc.http.put(&url).body("[1, 2]"), 400, "invalid_body"),
        (sc.http.put(&url).body("42"), 400, "invalid_body"),
        (sc.http.put(&url).body(""), 400, "invalid_body"),
        (
            sc.http.put(&url).body(vec![0xffu8, 0xfe]),
            400,
            "invalid_body",
        ),
        (
            sc.http
                .put(&url)
                .body(format!("{{\"owner\": \"{}\"}}", "x".repeat(5000))),
            413,
            "body_too_large",
        ),
        (
            sc.http.put(&url).body(r#"{"owner": "K", "nickname": "k"}"#),
            422,
            "invalid_body",
        ),
        (
            sc.http.put(&url).body(r#"{"version": 999}"#),
            422,
            "invalid_body",
        ),
        (
            sc.http.put(&url).body(r#"{"id": "other"}"#),
            422,
            "invalid_body",
        ),
        // Strict types: a JSON value of the wrong type is refused before the database.
        (
            sc.http.put(&url).body(r#"{"balance": "lots"}"#),
            422,
            "invalid_body",
        ),
        (sc.http.put(&url).body(r#"{"n": 1.5}"#), 422, "invalid_body"),
        (
            sc.http.put(&url).body(r#"{"owner": {"a": 1}}"#),
            422,
            "invalid_body",
        ),
        (
            sc.http.put(&url).body(r#"{"n": "12"}"#),
            422,
            "invalid_body",
        ),
        // The right type, a value the database refuses (out of range).
        (
            sc.http.put(&url).body(r#"{"n": 3000000000}"#),
            422,
            "rejected_by_database",
        ),
        (
            sc.http.put(&url).body(r#"{"balance": null}"#),
            422,
            "rejected_by_database",
        ),
        (
            sc.http.get(sc.url("accounts", &"k".repeat(65))),
            400,
            "invalid_key",
        ),
        (
            sc.http.get(sc.url("accounts", "%FF%FE")),
            400,
            "invalid_key",
        ),
        (
            sc.http.get(format!("{}/v1/entities/accounts/a/b", sc.base)),
            400,
            "invalid_key",
        ),
        (
            sc.http.put(&url).header("if-match", "soon").body("{}"),
            400,
            "invalid_if_match",
        ),
        (sc.http.post(&url).body("{}"), 405, "method_not_allowed"),
        (
            sc.http.get(format!("{}/v2/whatever", sc.base)),
            404,
            "no_route",
        ),
        (
            sc.http.post(format!("{}/metrics", sc.base)),
            405,
            "method_not_allowed",
        ),
    ];
    for (req, status, code) in cases {
        let r = sc.send(req).await;
        assert_eq!((r.status, r.error_code()), (status, code), "{}", r.raw);
        let msg = r.error_message().to_lowercase();
        assert!(!msg.is_empty(), "every error says what is wrong: {}", r.raw);
        for sql in [
            "insert ",
            "select ",
            "update ",
            "jsonb_populate",
            "advisory",
        ] {
            assert!(!msg.contains(sql), "SQL leaked into {msg:?}");
        }
    }
    let unknown = sc
        .send(sc.http.put(&url).body(r#"{"nickname": 1, "zz": 2}"#))
        .await;
    assert!(unknown.error_message().contains("nickname") && unknown.error_message().contains("zz"));
    let typed = sc
        .send(sc.http.put(&url).body(r#"{"balance": "lots"}"#))
        .await;
    assert!(
        typed
            .error_message()
            .contains("column \"balance\" takes a number, not a string"),
        "{}",
        typed.raw
    );

    // Nothing was lost or changed by any of it.
    let now = sc.get("accounts", "keep").await;
    assert_eq!((now.status, now.version()), (200, v));
    assert_eq!(now.body["data"]["owner"], "K");
    assert_eq!(db_version(&s.pool, &s.table, "keep").await, Some(v));
    assert!(
        sc.metrics()
            .await
            .contains("wtc_writes_total{entity=\"accounts\",outcome=\"rejected\"}")
    );
}

#[tokio::test]
async fn integer_keys_are_checked_before_the_database() {
    let pool = pg().await;
    let table = table_with_key(&pool, "intkey", "bigint").await;
    let redis = RedisServer::start().await;
    let sc = Fixture::new(&redis.url())
        .entity("items", &table)
        .start()
        .await;
    let ok = sc.put("items", "42", json!({"label": "x"})).await;
    assert_eq!(ok.status, 201, "{}", ok.raw);
    assert_eq!(ok.body["data"]["id"], 42);
    for bad in ["abc", "1.5"] {
        let r = sc.get("items", bad).await;
        assert_eq!(
            (r.status, r.error_code()),
            (400, "invalid_key"),
            "{}",
            r.raw
        );
        let r = sc.put("items", bad, json!({})).await;
        assert_eq!(r.status, 400, "{}", r.raw);
    }
    // The key comes first (it names everything else): a bad key is 400 whatever the body.
    let r = sc.put("items", "abc", json!({"nope": 1})).await;
    assert_eq!(
        (r.status, r.error_code()),
        (400, "invalid_key"),
        "{}",
        r.raw
    );
    // In a batch, the bad key is named by its item, and nothing is written.
    let r = sc
        .send(
            sc.http
                .post(format!("{}/v1/batch", sc.base))
                .json(&json!({"writes": [
                    {"entity": "items", "key": "42", "op": "put", "data": {"label": "y"}},
                    {"entity": "items", "key": "abc", "op": "delete"}
                ]})),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (400, "invalid_key"),
        "{}",
        r.raw
    );
    assert_eq!(r.body["error"]["item"], 1, "{}", r.raw);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("nothing was written"),
        "{}",
        r.raw
    );
    let after = sc.get("items", "42").await;
    assert_eq!(
        (after.status, &after.body["data"]["label"]),
        (200, &json!("x"))
    );
    assert!(
        sc.metrics()
            .await
            .contains("wtc_writes_total{entity=\"items\",outcome=\"rejected\"} 4"),
        "{}",
        sc.metrics().await
    );
}

#[tokio::test]
async fn probes_and_metrics_pass_promtool() {
    let s = setup().await;
    let sc = &s.sidecar;
    sc.put("accounts", "m", json!({"n": 1})).await;
    sc.get("accounts", "m").await;
    s.redis.del(&entry_key("accounts", "m")).await;
    sc.get("accounts", "m").await;

    let health = sc.send(sc.http.get(format!("{}/healthz", sc.base))).await;
    assert_eq!(health.status, 200);
    let ready = sc.send(sc.http.get(format!("{}/readyz", sc.base))).await;
    assert_eq!((ready.status, &ready.body["redis"]), (200, &json!(true)));

    let text = sc.metrics().await;
    for name in [
        "wtc_cache_lookups_total{entity=\"accounts\",result=\"hit\"} 1",
        "wtc_cache_lookups_total{entity=\"accounts\",result=\"miss\"} 1",
        "wtc_fills_total{entity=\"accounts\",outcome=\"won\"} 1",
        "wtc_writes_total{entity=\"accounts\",outcome=\"ok\"} 1",
        "wtc_db_duration_seconds_bucket",
        "wtc_cache_step_duration_seconds_count 1",
        "wtc_repair_queue_depth 0",
        "wtc_write_ratio",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/local-services");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn database_down_answers_503_and_leaves_the_cache_alone() {
    let redis = RedisServer::start().await;
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sc = Fixture::new(&redis.url())
        .entity("accounts", "whatever")
        .with(|c| c.database.url = format!("postgres://wtc:wtc@127.0.0.1:{closed_port}/wtc"))
        .start()
        .await;
    let w = sc.put("accounts", "a", json!({"n": 1})).await;
    assert_eq!(
        (w.status, w.error_code()),
        (503, "database_unavailable"),
        "{}",
        w.raw
    );
    let r = sc.get("accounts", "a").await;
    assert_eq!(r.status, 503);
    let ready = sc.send(sc.http.get(format!("{}/readyz", sc.base))).await;
    assert_eq!(ready.status, 503);
    let mut c = redis.connection().await.unwrap();
    // Entries and leases (the epoch key is the connection's, not the data's).
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("wtc:{*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(keys.is_empty(), "cache touched: {keys:?}");
    assert_eq!(
        sc.send(sc.http.get(format!("{}/healthz", sc.base)))
            .await
            .status,
        200
    );

    // Rows already in the cache are still served while the database is away.
    let envelope = r#"{"v":3,"data":{"id":"cached"},"written_at":"2026-01-01T00:00:00.000000Z"}"#;
    redis::cmd("SET")
        .arg(entry_key("accounts", "cached"))
        .arg(envelope)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let hit = sc.get("accounts", "cached").await;
    assert_eq!(
        (hit.status, hit.cache.as_deref(), hit.raw.as_str()),
        (200, Some("hit"), envelope)
    );
}

#[tokio::test]
async fn sigterm_finishes_the_write_in_flight() {
    let s = setup().await;
    let mut sc = s.sidecar;
    // The write commits, then waits 1.5 s before its cache step; SIGTERM arrives meanwhile.
    let hold = sc
        .hold_for(WRITE_BEFORE_CACHE_STEP, "accounts", "t", 1_500)
        .await;
    let url = sc.url("accounts", "t");
    let http = sc.http.clone();
    let write = tokio::spawn(async move { http.put(url).body(r#"{"n": 7}"#).send().await });
    sc.wait_held(hold).await;
    signal(sc.pid(), "TERM");
    assert!(
        sc.wait_exit(std::time::Duration::from_millis(500))
            .await
            .is_none(),
        "the sidecar exited with a write in flight"
    );
    let status = sc.wait_exit(std::time::Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|st| st.success()),
        "clean exit after the write: {status:?}"
    );
    let resp = write.await.unwrap().expect("the client got its answer");
    assert_eq!(resp.status().as_u16(), 201);
    let version = db_version(&s.pool, &s.table, "t").await;
    assert!(version.is_some(), "the committed write is in the database");
    assert_eq!(
        s.redis.cached_version("accounts", "t").await,
        version,
        "cache step ran before exit"
    );
}

/// A client that hangs up after its write committed cannot cut the write off before its cache
/// step: the cached row is replaced by the committed one (not left at the older version, which
/// every later read would be served until its TTL ends).
#[tokio::test]
async fn a_write_whose_client_hangs_up_still_gets_its_cache_step() {
    let s = setup().await;
    let sc = &s.sidecar;
    assert_eq!(sc.put("accounts", "h", json!({"n": 1})).await.status, 201);
    assert_eq!(sc.get("accounts", "h").await.cache.as_deref(), Some("hit"));
    let before = s.redis.cached_version("accounts", "h").await;
    assert!(before.is_some());
    // The second write commits, then waits 600 ms before its cache step; its client gives up
    // after 150 ms and closes the connection.
    let hold = sc
        .hold_for(WRITE_BEFORE_CACHE_STEP, "accounts", "h", 600)
        .await;
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(150))
        .build()
        .unwrap();
    let sent = sc
        .authed(impatient.put(sc.url("accounts", "h")))
        .header("content-type", "application/json")
        .body(r#"{"n": 2}"#)
        .send();
    let (sent, ()) = tokio::join!(sent, sc.wait_held(hold));
    assert!(sent.is_err(), "the client gave up before the answer");
    let committed = db_version(&s.pool, &s.table, "h").await;
    assert!(committed > before, "the second write committed");
    let stepped = eventually(std::time::Duration::from_secs(5), || async {
        s.redis.cached_version("accounts", "h").await == committed
    })
    .await;
    assert!(
        stepped,
        "the cache step never ran: Redis holds version {:?}, the database {committed:?}",
        s.redis.cached_version("accounts", "h").await
    );
    let read = sc.get("accounts", "h").await;
    assert_eq!(read.body["data"]["n"], 2, "{}", read.raw);
}

/// A request target without a path (the authority form) is refused with 400, and the connection
/// stays usable: warp's path filters panic on such a target (found by the `request` fuzz target).
#[tokio::test]
async fn a_request_target_without_a_path_gets_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bed = TestBed::new("target").await;
    let sc = bed.fixture().start().await;
    let addr = sc.base.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET a:1 HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("\"invalid_target\""), "{answer}");
    assert_eq!(
        answer.matches("HTTP/1.1 ").count(),
        2,
        "the connection went on to the next request: {answer}"
    );
    assert!(answer.contains("HTTP/1.1 200 "), "{answer}");
}
