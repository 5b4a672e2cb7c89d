//! The commit stream through PostgreSQL's crash-restarts (docs/commit-stream.md): the slot's
//! position reaches disk only at checkpoints, the reader's connection dies with the server, and
//! it connects again; no change committed before, during the outage's edges or after is missed.

use crate::postgres_faults::crash_and_restart_postgres;
use crate::serial;
use serde_json::json;
use std::time::{Duration, Instant};
use wtc_config::VersionSource;
use wtc_tests::commit_stream::{Stream, cached, served_within, sql, wait_leading};
use wtc_tests::*;

/// Each round: a cached row changed by plain SQL, PostgreSQL crashed (`restart -m immediate`)
/// at once, whether or not the reader had applied the change; another row changed right after
/// the restart. Both are served by the same sidecar within 30 s. Fails if a change whose slot
/// position was lost with the crash were not read again, or if the reader did not come back.
#[tokio::test]
async fn the_commit_stream_misses_no_change_across_postgres_crash_restarts() {
    let _serial = serial().await;
    let bed = TestBed::new("cs_pgcrash").await;
    let stream = Stream::new(&bed.pool).await;
    let sc = stream.fixture(&bed, VersionSource::Trigger).start().await;
    wait_leading(&sc).await;
    let mut back = vec![];
    for round in 0..3i64 {
        let (before, after) = (format!("b{round}"), format!("a{round}"));
        for key in [&before, &after] {
            sc.put("accounts", key, json!({"n": -1})).await;
            cached(&sc, key).await;
        }
        sql(
            &bed.pool,
            format!("UPDATE {} SET n = {round} WHERE id = '{before}'", bed.table),
        )
        .await;
        crash_and_restart_postgres().await;
        let restarted = Instant::now();
        // The test's own pool lost its connections too.
        let pool = pg().await;
        sql(
            &pool,
            format!("UPDATE {} SET n = {round} WHERE id = '{after}'", bed.table),
        )
        .await;
        served_within(&sc, &before, Some(round), Duration::from_secs(30)).await;
        served_within(&sc, &after, Some(round), Duration::from_secs(30)).await;
        back.push(restarted.elapsed());
    }
    eprintln!(
        "commit stream across PostgreSQL crash-restarts: both changes served {:?} after each restart; \
         reader errors {}",
        back.iter()
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .collect::<Vec<_>>(),
        sc.metrics()
            .await
            .lines()
            .filter_map(|l| l.strip_prefix("wtc_commit_stream_errors_total{stage=\""))
            .map(|l| l.replace("\"} ", " "))
            .collect::<Vec<_>>()
            .join(", "),
    );
    drop(sc);
    stream.drop(&pg().await).await;
}

/// Redis away while other writers commit: first paused (SIGSTOP for 3 s, no restart, so no
/// epoch change sweeps anything: the reader's retries alone must evict), then killed and
/// restarted from a snapshot that holds the old row (the epoch check sweeps; the reader's
/// change is applied too). Each time a cached row is changed by plain SQL while Redis is away,
/// and served changed once Redis is back. Fails if the reader advanced its slot past changes
/// it could not apply ("still 200 ... after the external commit" in the pause round).
#[tokio::test]
async fn the_commit_stream_misses_no_change_while_redis_is_away() {
    let _serial = serial().await;
    let pool = pg().await;
    let mut redis = RedisServer::start_with(Persistence::Snapshot).await;
    let table = unique("cs_redis");
    create_table(&pool, &table).await;
    let stream = Stream::new(&pool).await;
    let fixture = Fixture::new(&redis.url()).entity("accounts", &table);
    let sc = stream.on(fixture, VersionSource::Trigger).start().await;
    wait_leading(&sc).await;
    for key in ["paused", "restarted"] {
        sc.put("accounts", key, json!({"n": -1})).await;
        cached(&sc, key).await;
    }

    redis.signal("STOP");
    sql(
        &pool,
        format!("UPDATE {table} SET n = 1 WHERE id = 'paused'"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.signal("CONT");
    let paused = served_within(&sc, "paused", Some(1), Duration::from_secs(30)).await;

    redis.save().await;
    redis.kill().await;
    sql(
        &pool,
        format!("UPDATE {table} SET n = 2 WHERE id = 'restarted'"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart().await;
    let restarted = served_within(&sc, "restarted", Some(2), Duration::from_secs(30)).await;
    let errors: Vec<String> = sc
        .metrics()
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("wtc_commit_stream_errors_total{stage=\""))
        .map(|l| l.replace("\"} ", " "))
        .collect();
    eprintln!(
        "commit stream while Redis is away: served {:.2} s after a 3 s pause ended, {:.2} s after \
         a restart from an old snapshot; reader errors {}",
        paused.as_secs_f64(),
        restarted.as_secs_f64(),
        errors.join(", ")
    );
    drop(sc);
    stream.drop(&pool).await;
}
