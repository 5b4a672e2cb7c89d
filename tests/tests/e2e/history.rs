//! A concurrent history: writers and readers on a few hot keys through two sidecars, keys evicted
//! at random. Afterwards: no read that began after a write's acknowledgement returned an older
//! version (P2), every acknowledged version is in the database (P1), and no read returned a version
//! that was never committed.

use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wtc_tests::*;

#[derive(Debug, Clone)]
struct Op {
    key: String,
    start: Instant,
    end: Instant,
    version: i64,
    /// For writes: acknowledged with a clean cache step (only those are covered by P2).
    clean: bool,
    write: bool,
}

const KEYS: [&str; 3] = ["h0", "h1", "h2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_history_with_random_eviction_has_no_stale_or_lost_versions() {
    let pool = pg().await;
    let table = unique("hist");
    create_table(&pool, &table).await;
    // Every committed version, as the database saw it.
    let audit = format!("{table}_audit");
    for sql in [
        format!("CREATE TABLE {audit} (id text, version bigint)"),
        format!(
            "CREATE FUNCTION {audit}_f() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN INSERT INTO {audit} VALUES (NEW.id, NEW.version); RETURN NEW; END $$"
        ),
        format!(
            "CREATE TRIGGER {audit}_t AFTER INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {audit}_f()"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    let redis = RedisServer::start().await;
    let start = || {
        Fixture::new(&redis.url())
            .entity("accounts", &table)
            .start()
    };
    let sidecars = Arc::new([start().await, start().await]);
    for k in KEYS {
        assert!(sidecars[0].put("accounts", k, json!({"n": 0})).await.status < 300);
    }

    let history = Arc::new(Mutex::new(Vec::<Op>::new()));
    let run_for = Duration::from_secs(
        std::env::var("WTC_HISTORY_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(4),
    );
    let until = Instant::now() + run_for;
    let mut tasks = vec![];
    for worker in 0..10 {
        let (sidecars, history) = (sidecars.clone(), history.clone());
        let writer = worker < 4;
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < until {
                n += 1;
                let sc = &sidecars[fastrand::usize(..2)];
                let key = KEYS[fastrand::usize(..KEYS.len())];
                let start = Instant::now();
                let r = if writer {
                    sc.put("accounts", key, json!({"n": worker * 1_000_000 + n}))
                        .await
                } else {
                    sc.get("accounts", key).await
                };
                let end = Instant::now();
                assert!(r.status == 200 || r.status == 201, "{}", r.raw);
                history.lock().unwrap().push(Op {
                    key: key.to_string(),
                    start,
                    end,
                    version: r.version(),
                    clean: r.cache.as_deref() == Some("ok"),
                    write: writer,
                });
            }
        }));
    }
    let evictor = {
        let url = redis.url();
        tokio::spawn(async move {
            let mut c = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let mut evictions = 0u64;
            while Instant::now() < until {
                let key = entry_key("accounts", KEYS[fastrand::usize(..KEYS.len())]);
                redis::cmd("DEL")
                    .arg(key)
                    .query_async::<()>(&mut c)
                    .await
                    .unwrap();
                evictions += 1;
                tokio::time::sleep(Duration::from_micros(fastrand::u64(500..3_000))).await;
            }
            evictions
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    let evictions = evictor.await.unwrap();

    let history = history.lock().unwrap().clone();
    let committed: HashSet<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, version FROM {audit}"
    )))
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();

    let (mut writes, mut reads, mut stale, mut lost, mut phantom) = (0, 0, vec![], vec![], vec![]);
    for key in KEYS {
        let mut acked: Vec<&Op> = history.iter().filter(|o| o.write && o.key == key).collect();
        acked.sort_by_key(|o| o.end);
        // Highest acknowledged version among the writes that ended by each point.
        let mut floor = Vec::with_capacity(acked.len());
        let mut best = i64::MIN;
        for w in &acked {
            if w.clean {
                best = best.max(w.version);
            }
            if !committed.contains(&(key.to_string(), w.version)) {
                lost.push((key, w.version));
            }
            floor.push(best);
        }
        writes += acked.len();
        for r in history.iter().filter(|o| !o.write && o.key == key) {
            reads += 1;
            let v = r.version;
            if !committed.contains(&(key.to_string(), v)) {
                phantom.push((key, v));
            }
            let before = acked.partition_point(|w| w.end < r.start);
            if before > 0 && v < floor[before - 1] {
                stale.push((key, v, floor[before - 1]));
            }
        }
    }
    println!(
        "history: {writes} writes, {reads} reads, {evictions} evictions over {run_for:?}; \
         stale {}, lost {}, phantom {}",
        stale.len(),
        lost.len(),
        phantom.len()
    );
    assert!(
        writes > 50 && reads > 50 && evictions > 50,
        "too little happened to prove anything"
    );
    assert!(
        stale.is_empty(),
        "stale reads (key, read, acknowledged before): {stale:?}"
    );
    assert!(
        lost.is_empty(),
        "acknowledged versions missing from the database: {lost:?}"
    );
    assert!(
        phantom.is_empty(),
        "versions read but never committed: {phantom:?}"
    );
    let per_key: HashMap<&str, usize> = KEYS
        .iter()
        .map(|k| (*k, history.iter().filter(|o| o.key == *k).count()))
        .collect();
    assert!(per_key.values().all(|n| *n > 10), "{per_key:?}");
}
