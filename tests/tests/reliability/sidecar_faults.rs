//! The sidecar itself dying: killed (-9) between a write's commit and its cache step, and killed
//! and restarted again and again under load.

use crate::{FaultCycle, history_figures, report, serial, stop};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wtc_tests::history::{self, History, Workload};
use wtc_tests::*;

const TTL_SECONDS: u64 = 2;

/// A write committed by a sidecar that dies before its cache step is not acknowledged: the client
/// sees its connection closed. Other sidecars may serve the previous version (never a newer one
/// than the database has) until the entry's TTL ends or the key is written again; then the
/// database's version is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_between_commit_and_cache_step() {
    let _serial = serial().await;
    let TestBed { pool, redis, table } = TestBed::new("killmid").await;
    let start = || {
        Fixture::new(&redis.url())
            .entity("accounts", &table)
            .with(|c| c.entities[0].ttl_seconds = TTL_SECONDS)
            .start()
    };
    let (a, b) = (start().await, start().await);
    let v1 = a.put("accounts", "k", json!({"n": 1})).await.version();

    let hold = a.hold(WRITE_BEFORE_CACHE_STEP, "accounts", "k").await;
    let req = a.http.put(a.url("accounts", "k")).json(&json!({"n": 2}));
    let write = tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) });
    a.wait_held(hold).await;
    signal(a.pid(), "KILL");
    let killed_at = Instant::now();
    let answer = write.await.unwrap();
    assert!(
        answer.is_err(),
        "the write was not acknowledged: {answer:?}"
    );
    let v2 = db_version(&pool, &table, "k").await.unwrap();
    assert!(v2 > v1, "the write committed before its sidecar died");

    // Until the TTL ends: the previous version or the committed one, never anything else.
    let mut served_old = 0;
    let visible = loop {
        let r = b.get("accounts", "k").await;
        assert!(r.version() == v1 || r.version() == v2, "{}", r.raw);
        let cached = redis.cached_version("accounts", "k").await;
        assert!(
            cached.is_none_or(|c| c <= v2),
            "cache {cached:?} above the database {v2}"
        );
        if r.version() == v2 {
            break killed_at.elapsed();
        }
        served_old += 1;
        assert!(
            killed_at.elapsed() < Duration::from_secs(TTL_SECONDS + 3),
            "the committed version was still invisible after the TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A later write fixes it at once.
    let v3 = b.put("accounts", "k", json!({"n": 3})).await.version();
    assert_eq!(b.get("accounts", "k").await.version(), v3);
    report(
        "sidecar_killed_mid_write",
        "sidecar killed (-9) after its write committed, before the cache step",
        json!({
            "ttl_seconds": TTL_SECONDS,
            "reads_of_the_previous_version": served_old,
            "committed_version_visible_after_ms": visible.as_secs_f64() * 1e3,
        }),
    );
}

/// One of two sidecars is killed (-9) and restarted on the same port over and over while the
/// workload runs: its in-flight writes have unknown outcomes, and the promise holds for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_killed_and_restarted_under_load_keep_the_promise() {
    let _serial = serial().await;
    let pool = pg().await;
    let (table, audit) = history::audited_table(&pool, "killload").await;
    let redis = RedisServer::start().await;
    let port = free_port();
    let fixture = {
        let (url, table) = (redis.url(), table.clone());
        move |listen: Option<u16>| {
            Fixture::new(&url).entity("accounts", &table).with(|c| {
                c.entities[0].ttl_seconds = TTL_SECONDS;
                if let Some(p) = listen {
                    c.listen = format!("127.0.0.1:{p}");
                }
            })
        }
    };
    let victim = Arc::new(fixture(Some(port)).start().await);
    let survivor = Arc::new(fixture(None).start().await);
    let sidecars = vec![Arc::clone(&victim), Arc::clone(&survivor)];
    let mut workload = Workload::new(4, stop((2_000, 600), (200_000, 20_000)));
    // However fast the workload, it runs through a few kills.
    let cycle = FaultCycle::new(&mut workload);
    for k in &workload.keys {
        assert!(survivor.put("accounts", k, json!({"n": 0})).await.status < 300);
    }

    let recorded = History::default();
    let mut pid = victim.pid();
    // The replacement of the victim; dropping it at the end stops it.
    let mut current = None;
    let (stats, injected) = tokio::join!(
        async {
            let stats = workload.run(&sidecars, &redis.url(), &recorded).await;
            cycle.stop();
            stats
        },
        cycle.run(3, async |_| {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(300..900))).await;
            signal(pid, "KILL");
            // The port is free once the process is gone (the signal is asynchronous).
            let gone = eventually(Duration::from_secs(5), || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err()
            })
            .await;
            assert!(gone, "the killed sidecar still listens");
            // The workload's handle keeps sending to the same port, now served by the new one.
            let next = fixture(Some(port)).start().await;
            pid = next.pid();
            current = Some(next);
            "sidecar killed (-9) and restarted"
        }),
    );
    let kills: u32 = injected.values().sum();

    let ops = recorded.ops();
    let r = history::check(&workload.keys, &ops, &audit.committed(&pool).await);
    // A write cut off by a kill leaves the previous version cached for up to the TTL.
    let w = Duration::from_secs(TTL_SECONDS);
    let mut figures = history_figures(&r, &stats, w);
    figures["kills"] = json!(kills);
    report(
        "sidecar_kills",
        "one of two sidecars killed (-9) and restarted every 0.3-0.9 s",
        figures,
    );
    assert!(
        kills >= 3 && r.writes_acked() > 100,
        "{kills} kills; {}",
        r.summary()
    );
    r.assert_promise(w);
}
