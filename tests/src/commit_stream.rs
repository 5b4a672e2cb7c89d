//! The commit stream's test scaffolding (docs/commit-stream.md): a slot and publication per
//! test, and reads that wait for an external commit to be served.

use crate::{Fixture, Sidecar, TestBed, scratch_dir, sidecar_binary, unique};
use sqlx::PgPool;
use std::time::{Duration, Instant};
use wtc_config::{SidecarConfig, VersionSource};

/// A slot and a publication of their own, dropped at the end.
pub struct Stream {
    pub name: String,
}

impl Stream {
    /// Also drops what earlier runs' failed tests left (slots keep WAL, and there are few).
    pub async fn new(pool: &PgPool) -> Self {
        let ours = format!("wtc\\_cs\\_{}\\_%", std::process::id());
        drop_leftovers(pool, "wtc\\_cs\\_%", &ours).await;
        Self {
            name: unique("wtc_cs"),
        }
    }

    pub fn fixture(&self, bed: &TestBed, versions: VersionSource) -> Fixture {
        self.on(bed.fixture(), versions)
    }

    /// `fixture` reading this slot, its first entity's versions from `versions`.
    pub fn on(&self, fixture: Fixture, versions: VersionSource) -> Fixture {
        let name = self.name.clone();
        fixture.with(move |c| {
            c.commit_stream.enabled = true;
            c.commit_stream.slot = name.clone();
            c.commit_stream.publication = name;
            c.entities[0].versions = versions;
        })
    }

    /// Drops the slot (once no sidecar reads it) and the publication.
    pub async fn drop(self, pool: &PgPool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = sqlx::query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&self.name)
            .execute(pool)
            .await;
            if r.is_ok() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let sql = format!("DROP PUBLICATION IF EXISTS {}", self.name);
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await;
    }
}

pub async fn sql(pool: &PgPool, text: String) {
    sqlx::query(sqlx::AssertSqlSafe(text))
        .execute(pool)
        .await
        .unwrap();
}

/// Until this sidecar reads the slot (it creates it first, which waits for the transactions
/// running then to end: other tests may hold theirs for seconds).
pub async fn wait_leading(sc: &Sidecar) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while sc.metric("wtc_commit_stream_leading").await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the sidecar never read the slot:\n{}",
            sc.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `key` until its `n` is `want`; how long that took (at most 10 s).
pub async fn served(sc: &Sidecar, key: &str, want: Option<i64>) -> Duration {
    served_within(sc, key, want, Duration::from_secs(10)).await
}

/// `served`, waiting at most `within`.
pub async fn served_within(
    sc: &Sidecar,
    key: &str,
    want: Option<i64>,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let r = sc.get("accounts", key).await;
        let n = (r.status == 200)
            .then(|| r.body["data"]["n"].as_i64())
            .flatten();
        if n == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{key}: still {} {} {within:?} after the external commit",
            r.status,
            r.raw
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Until a read of `key` is a hit. The sidecar's own write may find its entry evicted: the
/// reader applied its commit before its cache step (the change's eviction takes every lease,
/// the write's intent too); with `versions = "sidecar"` it always does. A read fills it again.
pub async fn cached(sc: &Sidecar, key: &str) {
    let start = Instant::now();
    while sc.get("accounts", key).await.cache.as_deref() != Some("hit") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{key} never cached"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The `p` quantile of sorted durations, in ms.
pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// The sidecar binary's `--drop-slot` (what the operator's drop Job runs) with `config`'s
/// database and `args`: its exit code and what it printed.
pub async fn drop_command(config: &SidecarConfig, args: &[&str]) -> (Option<i32>, String) {
    let dir = scratch_dir("drop");
    let file = dir.join("sidecar.toml");
    std::fs::write(&file, config.render()).unwrap();
    let out = tokio::process::Command::new(sidecar_binary())
        .arg("--config")
        .arg(&file)
        .args(args)
        .env_remove("WTC_DATABASE_URL")
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), said)
}

/// Whether the slot and the publication named `name` exist.
pub async fn slot_and_publication(pool: &PgPool, name: &str) -> (bool, bool) {
    let slot: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .unwrap();
    let publication: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(name)
            .fetch_one(pool)
            .await
            .unwrap();
    (slot, publication)
}

/// Drops the slots not in use and the publications named `like` (a LIKE pattern), but those
/// named `keep` (this run's own): what failed runs of earlier tests left.
pub async fn drop_leftovers(pool: &PgPool, like: &str, keep: &str) {
    let slots: Vec<String> = sqlx::query_scalar(
        "SELECT slot_name::text FROM pg_replication_slots \
         WHERE slot_name LIKE $1 AND slot_name NOT LIKE $2 AND NOT active",
    )
    .bind(like)
    .bind(keep)
    .fetch_all(pool)
    .await
    .unwrap();
    for slot in slots {
        // Another run may be reading it now after all.
        let _ = sqlx::query("SELECT pg_drop_replication_slot($1::name)")
            .bind(&slot)
            .execute(pool)
            .await;
    }
    let publications: Vec<String> = sqlx::query_scalar(
        "SELECT pubname::text FROM pg_publication WHERE pubname LIKE $1 AND pubname NOT LIKE $2",
    )
    .bind(like)
    .bind(keep)
    .fetch_all(pool)
    .await
    .unwrap();
    for p in publications {
        let sql = format!("DROP PUBLICATION IF EXISTS \"{p}\"");
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await;
    }
}
