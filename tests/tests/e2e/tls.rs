//! TLS to Redis and to PostgreSQL, with certificates the test makes: a private CA is trusted
//! when configured (and only then), a client certificate is presented when Redis asks for one,
//! and a wrong CA is a clear, logged reason while the sidecar keeps serving what it can (never an
//! exit that would keep the application's pod from starting).

use serde_json::json;
use std::time::Duration;
use wtc_tests::tls::Certs;
use wtc_tests::*;

async fn table(prefix: &str) -> String {
    let pool = pg().await;
    let table = unique(prefix);
    create_table(&pool, &table).await;
    table
}

fn redis_ca(c: &mut wtc_config::SidecarConfig, ca: std::path::PathBuf) {
    c.redis.ca_file = Some(ca.display().to_string());
}

async fn ready(sc: &Sidecar) -> (u16, serde_json::Value) {
    let r = sc.send(sc.http.get(format!("{}/readyz", sc.base))).await;
    (r.status, r.body)
}

#[tokio::test]
async fn redis_over_tls_with_a_private_ca_caches_and_serves_hits() {
    let certs = Certs::make();
    let redis = RedisServer::start_tls(&certs, false).await;
    let table = table("tls_redis").await;
    let sc = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| redis_ca(c, certs.path("ca.crt")))
        .start()
        .await;
    let put = sc.put("accounts", "k1", json!({"owner": "ann"})).await;
    assert_eq!(put.status, 201, "{}", put.raw);
    // The entry is in the TLS-only server (the harness reads it over TLS too).
    assert_eq!(
        redis.cached_version("accounts", "k1").await,
        Some(put.version())
    );
    let got = sc.get("accounts", "k1").await;
    assert_eq!(
        (got.status, got.cache.as_deref()),
        (200, Some("hit")),
        "{}",
        got.raw
    );
    assert_eq!(ready(&sc).await.1["redis"], true);
}

#[tokio::test]
async fn a_client_certificate_is_presented_when_redis_asks_for_one() {
    let certs = Certs::make();
    let redis = RedisServer::start_tls(&certs, true).await;
    let table = table("tls_mtls").await;
    let with_cert = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| {
            redis_ca(c, certs.path("ca.crt"));
            c.redis.client_cert_file = Some(certs.path("client.crt").display().to_string());
            c.redis.client_key_file = Some(certs.path("client.key").display().to_string());
        })
        .start()
        .await;
    let put = with_cert
        .put("accounts", "k1", json!({"owner": "ann"}))
        .await;
    assert_eq!(put.status, 201, "{}", put.raw);
    assert_eq!(
        redis.cached_version("accounts", "k1").await,
        Some(put.version())
    );

    // Without a certificate the server refuses the handshake: the sidecar says so and reads
    // from the database.
    let without = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| redis_ca(c, certs.path("ca.crt")))
        .capture_logs()
        .start()
        .await;
    let got = without.get("accounts", "k1").await;
    assert_eq!(got.status, 200, "{}", got.raw);
    assert_eq!(got.version(), put.version());
    assert_ne!(got.cache.as_deref(), Some("hit"), "{}", got.raw);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let logs = without.logs();
            logs.contains("cannot connect to Redis") && logs.contains("CertificateRequired")
        })
        .await,
        "logs: {}",
        without.logs()
    );
}

#[tokio::test]
async fn a_wrong_redis_ca_is_logged_and_reads_go_to_the_database() {
    let certs = Certs::make();
    let redis = RedisServer::start_tls(&certs, false).await;
    let table = table("tls_wrong_ca").await;
    let pool = pg().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} (id, owner, version) VALUES ('k1', 'ann', 7)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    // With a password in the URL: it must appear in no log line.
    let url = redis.url().replace("rediss://", "rediss://:pw-s3cret@");
    let mut sc = Fixture::new(&url)
        .entity("accounts", &table)
        .with(|c| redis_ca(c, certs.path("other-ca.crt")))
        .capture_logs()
        .start()
        .await;
    let got = sc.get("accounts", "k1").await;
    assert_eq!((got.status, got.version()), (200, 7), "{}", got.raw);
    assert_eq!(redis.cached_version("accounts", "k1").await, None);
    let (status, body) = ready(&sc).await;
    assert_eq!((status, &body["redis"]), (200, &json!(false)), "{body}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            let logs = sc.logs();
            logs.contains("cannot connect to Redis") && logs.contains("UnknownIssuer")
        })
        .await,
        "logs: {}",
        sc.logs()
    );
    assert!(sc.wait_exit(Duration::from_millis(200)).await.is_none());
    let logs = sc.logs();
    assert!(
        !logs.contains("pw-s3cret"),
        "the password is not logged: {logs}"
    );
}

fn pg_ca() -> String {
    std::env::var("WTC_PG_CA_FILE").expect("WTC_PG_CA_FILE (scripts/local-services prints it)")
}

#[tokio::test]
async fn postgres_verify_full_with_a_ca_file_or_sslrootcert() {
    let table = table("tls_pg").await;
    let redis = RedisServer::start().await;
    let by_setting = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| c.database.ca_file = Some(pg_ca()))
        .start()
        .await;
    let put = by_setting
        .put("accounts", "k1", json!({"owner": "ann"}))
        .await;
    assert_eq!(put.status, 201, "{}", put.raw);
    assert_eq!(ready(&by_setting).await.0, 200);

    // As libpq users write it: everything in the URL.
    let by_url = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| {
            c.database.url = format!(
                "{}?sslmode=verify-full&sslrootcert={}",
                database_url(),
                pg_ca()
            )
        })
        .start()
        .await;
    let put = by_url.put("accounts", "k2", json!({"owner": "bob"})).await;
    assert_eq!(put.status, 201, "{}", put.raw);
}

#[tokio::test]
async fn a_wrong_postgres_ca_is_a_clear_reason_not_an_exit() {
    let table = table("tls_pg_wrong").await;
    let redis = RedisServer::start().await;
    let certs = Certs::make();
    let mut sc = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| c.database.ca_file = Some(certs.path("other-ca.crt").display().to_string()))
        .capture_logs()
        .start()
        .await;
    let (status, body) = ready(&sc).await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("TLS"), "{body}");
    let put = sc.put("accounts", "k1", json!({"owner": "ann"})).await;
    assert_eq!(put.status, 503, "{}", put.raw);
    assert!(
        eventually(Duration::from_secs(5), || async {
            sc.logs().contains("the database does not answer")
        })
        .await,
        "logs: {}",
        sc.logs()
    );
    assert!(sc.wait_exit(Duration::from_millis(200)).await.is_none());
    assert!(!sc.logs().contains("wtc:wtc@"), "no password in the logs");
}

/// `rediss+sentinel://`: the sentinels, the master and the replication all on TLS only, a
/// private CA; the sidecar asks the sentinels over TLS and reaches the master over TLS.
#[tokio::test]
async fn sentinels_and_master_over_tls() {
    let certs = Certs::make();
    let redis = wtc_tests::sentinel::Sentinels::start_tls(&certs).await;
    assert!(redis.url().starts_with("rediss+sentinel://"));
    let table = table("tls_sentinel").await;
    let sc = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .with(|c| redis_ca(c, certs.path("ca.crt")))
        .start()
        .await;
    let put = sc.put("accounts", "k1", json!({"owner": "ann"})).await;
    assert_eq!(
        (put.status, put.cache.as_deref()),
        (201, Some("ok")),
        "{}",
        put.raw
    );
    assert_eq!(
        redis.master.cached_version("accounts", "k1").await,
        Some(put.version())
    );
    let got = sc.get("accounts", "k1").await;
    assert_eq!(
        (got.status, got.cache.as_deref()),
        (200, Some("hit")),
        "{}",
        got.raw
    );
}
