//! The commit stream (docs/commit-stream.md): writes that bypass the sidecar (plain SQL here, as
//! a migration or an admin's `psql` would) reach its readers, through PostgreSQL's logical
//! decoding. A real PostgreSQL with `wal_level = logical` (scripts/local-services).

use serde_json::json;
use std::time::{Duration, Instant};
use wtc_config::VersionSource;
use wtc_tests::commit_stream::{
    Stream, cached, drop_command, percentile, served, slot_and_publication, sql, wait_leading,
};
use wtc_tests::*;

/// `rounds` external updates of cached keys, each timed from its commit to the first read
/// that returns it.
async fn measure(bed: &TestBed, sc: &Sidecar, rounds: i64) -> Vec<Duration> {
    let mut took = Vec::new();
    for i in 0..rounds {
        let key = format!("m{}", i % 10);
        sc.put("accounts", &key, json!({"n": -1})).await;
        cached(sc, &key).await;
        sql(
            &bed.pool,
            format!("UPDATE {} SET n = {i} WHERE id = '{key}'", bed.table),
        )
        .await;
        took.push(served(sc, &key, Some(i)).await);
    }
    took.sort();
    took
}

/// With the trigger, an external `UPDATE` (no version given, or a lower one) gets a new version
/// from the sequence, and the cached row is evicted: the next read serves it. The bound, from
/// the commit to the first read returning it, is measured at rest and under the sidecar's own
/// write load (printed; docs/commit-stream.md has the figures). Fails without the commit stream
/// (the old row stays until its TTL: "still 200 ... 10 s after the external commit").
#[tokio::test]
async fn external_writes_are_served_within_the_bound() {
    let bed = TestBed::new("cs_bound").await;
    let stream = Stream::new(&bed.pool).await;
    let sc = stream.fixture(&bed, VersionSource::Trigger).start().await;
    wait_leading(&sc).await;

    // The sidecar's own write: the version it answers is the row's (the trigger drew it).
    let put = sc.put("accounts", "k", json!({"n": 1})).await;
    assert_eq!(
        Some(put.version()),
        db_version(&bed.pool, &bed.table, "k").await
    );
    // One source of versions: an external writer's own (lower) version is replaced.
    sql(
        &bed.pool,
        format!("UPDATE {} SET n = 2, version = 1 WHERE id = 'k'", bed.table),
    )
    .await;
    let external = db_version(&bed.pool, &bed.table, "k").await.unwrap();
    assert!(
        external > put.version(),
        "the trigger did not draw a version"
    );
    served(&sc, "k", Some(2)).await;
    assert_eq!(sc.get("accounts", "k").await.version(), external);

    let rest = measure(&bed, &sc, 100).await;
    // The same under the sidecar's own writes (4 writers on other keys, each at most 50 a
    // second: the suite's other tests share the 2 cores).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (http, url, stop) = (sc.http.clone(), sc.url("accounts", ""), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let req = http
                        .put(format!("{url}w{w}-{}", n % 50))
                        .json(&json!({"n": n}));
                    let r = reply(req).await.unwrap();
                    assert!(matches!(r.status, 200 | 201), "{}", r.raw);
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                n
            })
        })
        .collect();
    let started = Instant::now();
    let loaded = measure(&bed, &sc, 100).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    let rate = written as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "commit stream bound (external commit -> first read serving it, ms): \
         at rest p50 {:.1} p99 {:.1} max {:.1}; under {rate:.0} sidecar writes/s p50 {:.1} p99 {:.1} max {:.1}",
        percentile(&rest, 0.5),
        percentile(&rest, 0.99),
        percentile(&rest, 1.0),
        percentile(&loaded, 0.5),
        percentile(&loaded, 0.99),
        percentile(&loaded, 1.0),
    );
    eprintln!(
        "commit stream changes: evicted {} kept {} absent {}",
        sc.metric("wtc_commit_stream_changes_total{outcome=\"evicted\"}")
            .await,
        sc.metric("wtc_commit_stream_changes_total{outcome=\"kept\"}")
            .await,
        sc.metric("wtc_commit_stream_changes_total{outcome=\"absent\"}")
            .await,
    );
    drop(sc);
    stream.drop(&bed.pool).await;
}

/// Without the trigger, an external writer may leave the version as it was: an entry of the
/// same version is stale too. External inserts and deletes reach readers as well.
#[tokio::test]
async fn external_writes_that_keep_the_version_inserts_and_deletes_reach_readers() {
    let bed = TestBed::new("cs_sidecar_versions").await;
    let stream = Stream::new(&bed.pool).await;
    let sc = stream.fixture(&bed, VersionSource::Sidecar).start().await;
    wait_leading(&sc).await;
    let v = sc.put("accounts", "k", json!({"n": 1})).await.version();
    cached(&sc, "k").await;
    sql(
        &bed.pool,
        format!("UPDATE {} SET n = 5 WHERE id = 'k'", bed.table),
    )
    .await;
    assert_eq!(db_version(&bed.pool, &bed.table, "k").await, Some(v));
    served(&sc, "k", Some(5)).await;

    sql(
        &bed.pool,
        format!("DELETE FROM {} WHERE id = 'k'", bed.table),
    )
    .await;
    served(&sc, "k", None).await;
    assert_eq!(sc.get("accounts", "k").await.status, 404);
    let next = format!("nextval('{}_version_wtc_seq')", bed.table);
    sql(
        &bed.pool,
        format!(
            "INSERT INTO {} (id, n, version) VALUES ('k', 6, {next})",
            bed.table
        ),
    )
    .await;
    served(&sc, "k", Some(6)).await;
    drop(sc);
    stream.drop(&bed.pool).await;
}

/// The slot keeps what was committed while no sidecar read it: the reader is killed, a row is
/// changed behind the cache meanwhile, and the next sidecar to start applies it. Fails if the
/// slot were advanced past changes not applied, or made anew.
#[tokio::test]
async fn a_change_committed_while_no_sidecar_reads_the_slot_is_applied_by_the_next() {
    let bed = TestBed::new("cs_failover").await;
    let stream = Stream::new(&bed.pool).await;
    let mut a = stream.fixture(&bed, VersionSource::Trigger).start().await;
    wait_leading(&a).await;
    a.put("accounts", "k", json!({"n": 1})).await;
    cached(&a, "k").await;
    signal(a.pid(), "KILL");
    a.wait_exit(Duration::from_secs(5)).await;
    sql(
        &bed.pool,
        format!("UPDATE {} SET n = 2 WHERE id = 'k'", bed.table),
    )
    .await;
    let b = stream.fixture(&bed, VersionSource::Trigger).start().await;
    let took = served(&b, "k", Some(2)).await;
    eprintln!(
        "commit stream: a change committed while no sidecar ran, served {:.0} ms after the next one started",
        took.as_secs_f64() * 1e3
    );
    assert_eq!(b.metric("wtc_commit_stream_leading").await, 1.0);
    drop((a, b));
    stream.drop(&bed.pool).await;
}

/// Two regions on this machine, one primary PostgreSQL (in region A): each region has its own
/// Redis, sidecar and slot; region B reaches the database through a proxy adding `RTT_HALF`
/// each way. A write in one region evicts the other region's cached row through that region's
/// reader; the window, from the write's acknowledgement to the other region serving it, is
/// printed for both directions. (Within the window, `X-Wtc-Min-Version` with the writer's
/// version reads it in any region: read_your_writes.rs.) Fails without the commit stream (the
/// other region serves the old row until its TTL).
#[tokio::test]
async fn two_regions_see_each_others_writes_within_a_window() {
    const RTT_HALF: Duration = Duration::from_millis(30);
    let bed = TestBed::new("cs_regions").await;
    let redis_b = RedisServer::start().await;
    let proxy = proxy::FaultProxy::start(([127, 0, 0, 1], database_port()).into()).await;
    proxy.set(proxy::Mode::Latency(RTT_HALF));
    let (stream_a, stream_b) = (Stream::new(&bed.pool).await, Stream::new(&bed.pool).await);
    let a = stream_a.fixture(&bed, VersionSource::Trigger).start().await;
    let b = stream_b
        .fixture(&bed, VersionSource::Trigger)
        .with(|c| {
            c.redis.url = redis_b.url();
            c.database.url = with_port(&database_url(), proxy.port);
        })
        .start()
        .await;
    wait_leading(&a).await;
    wait_leading(&b).await;

    let mut windows = [vec![], vec![]];
    for i in 0..30i64 {
        let key = format!("r{}", i % 5);
        for (d, (from, to)) in [(&a, &b), (&b, &a)].into_iter().enumerate() {
            // Cached in the reading region first, so that a stale row would be served.
            from.put("accounts", &key, json!({"n": -1})).await;
            served(to, &key, Some(-1)).await;
            cached(to, &key).await;
            let n = i * 2 + d as i64;
            let w = from.put("accounts", &key, json!({"n": n})).await;
            assert_eq!(w.status, 200, "{}", w.raw);
            windows[d].push(served(to, &key, Some(n)).await);
        }
    }
    for w in &mut windows {
        w.sort();
    }
    eprintln!(
        "two regions ({} ms each way to the database from B): a write in A served in B after \
         p50 {:.1} p99 {:.1} max {:.1} ms; a write in B served in A after p50 {:.1} p99 {:.1} max {:.1} ms",
        RTT_HALF.as_millis(),
        percentile(&windows[0], 0.5),
        percentile(&windows[0], 0.99),
        percentile(&windows[0], 1.0),
        percentile(&windows[1], 0.5),
        percentile(&windows[1], 0.99),
        percentile(&windows[1], 1.0),
    );
    drop((a, b));
    stream_a.drop(&bed.pool).await;
    stream_b.drop(&bed.pool).await;
}

/// A table whose changes would not name the key (its key is a unique column, it has no primary
/// key, so its replica identity is nothing) is refused with a message saying what to do, and
/// is not published: published, every writer's UPDATE and DELETE on it would fail.
#[tokio::test]
async fn a_table_whose_changes_would_not_name_the_key_is_refused_and_not_published() {
    let pool = pg().await;
    let table = unique("cs_no_identity");
    sql(
        &pool,
        format!(
            "CREATE TABLE {table} (id text UNIQUE NOT NULL, n integer, version bigint NOT NULL DEFAULT 0)"
        ),
    )
    .await;
    let redis = RedisServer::start().await;
    let stream = Stream::new(&pool).await;
    let fixture = Fixture::new(&redis.url()).entity("accounts", &table);
    let sc = stream
        .on(fixture, VersionSource::Sidecar)
        .capture_logs()
        .start()
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sc
        .metric("wtc_commit_stream_errors_total{stage=\"connect\"}")
        .await
        < 1.0
    {
        assert!(Instant::now() < deadline, "no refusal:\n{}", sc.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = sc.logs();
    assert!(
        logs.contains("REPLICA IDENTITY FULL") && logs.contains(&table),
        "{logs}"
    );
    assert_eq!(sc.metric("wtc_commit_stream_leading").await, 0.0);
    // Writers are not hurt: nothing was published.
    sc.put("accounts", "k", json!({"n": 1})).await;
    sql(&pool, format!("UPDATE {table} SET n = 2 WHERE id = 'k'")).await;
    sql(&pool, format!("DELETE FROM {table} WHERE id = 'k'")).await;
    let published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_publication_tables WHERE tablename = $1")
            .bind(&table)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(published, 0);
    drop(sc);
    stream.drop(&pool).await;
}

/// Keys that PostgreSQL spells otherwise than the URL did (`numeric(10,2)` sends `7.50`, the
/// entry is `7.5`), a key changed by an UPDATE (its old entry goes), and a TRUNCATE (the cache is
/// swept), through a real slot. Fails when the stream's key is not canonicalized (the entry of
/// `7.5` would stay) or the old key of an UPDATE is not evicted.
#[tokio::test]
async fn other_key_spellings_key_changes_and_truncates_reach_readers() {
    let pool = pg().await;
    let table = table_with_key(&pool, "cs_keys", "numeric(10,2)").await;
    let redis = RedisServer::start().await;
    let stream = Stream::new(&pool).await;
    let fixture = Fixture::new(&redis.url()).entity("accounts", &table);
    let sc = stream.on(fixture, VersionSource::Trigger).start().await;
    wait_leading(&sc).await;
    let label = |r: &Reply| r.body["data"]["label"].as_str().map(str::to_string);
    let until = async |key: &str, want: Option<&str>| {
        let start = Instant::now();
        loop {
            let r = sc.get("accounts", key).await;
            let got = (r.status == 200).then(|| label(&r)).flatten();
            if got.as_deref() == want {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{key}: {} {}",
                r.status,
                r.raw
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    for key in ["7.5", "8"] {
        sc.send(
            sc.http
                .put(sc.url("accounts", key))
                .json(&json!({"label": "sidecar"})),
        )
        .await;
        until(key, Some("sidecar")).await;
        while sc.get("accounts", key).await.cache.as_deref() != Some("hit") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    sql(
        &pool,
        format!("UPDATE {table} SET label = 'psql' WHERE id = 7.50"),
    )
    .await;
    until("7.5", Some("psql")).await;
    // The key changes: 8 is gone, 9 appears.
    sql(&pool, format!("UPDATE {table} SET id = 9 WHERE id = 8")).await;
    until("8", None).await;
    until("9", Some("sidecar")).await;
    while sc.get("accounts", "9").await.cache.as_deref() != Some("hit") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sql(&pool, format!("TRUNCATE {table}")).await;
    until("9", None).await;
    until("7.5", None).await;
    assert!(sc.metric("wtc_commit_stream_truncates_total").await >= 1.0);
    drop(sc);
    stream.drop(&pool).await;
}

/// `wtc-sidecar --drop-slot S --drop-publication P`, what the operator's Job runs when a cache's
/// stream is turned off or the cache deleted: it waits for the reader that holds the slot's
/// lock (a reader between two polls would make the slot again), then drops both; again, it
/// finds nothing and still succeeds; a name that is not an identifier is refused before any
/// connection. Fails when the command does not wait for the lock: the reader, still running,
/// makes the slot again ("left behind").
#[tokio::test]
async fn the_drop_command_waits_for_the_reader_then_drops_the_slot_and_publication() {
    let bed = TestBed::new("cs_drop").await;
    let stream = Stream::new(&bed.pool).await;
    let name = stream.name.clone();
    let fixture = stream.fixture(&bed, VersionSource::Trigger);
    let config = fixture.config.clone();
    let sc = fixture.start().await;
    wait_leading(&sc).await;
    assert_eq!(slot_and_publication(&bed.pool, &name).await, (true, true));

    let args = [
        "--drop-slot",
        name.as_str(),
        "--drop-publication",
        name.as_str(),
    ];
    let dropping = {
        let config = config.clone();
        let args = args.map(String::from);
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let started = Instant::now();
            let out = drop_command(&config, &args).await;
            (out, started.elapsed())
        })
    };
    // The reader keeps the slot for a while, then stops.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !dropping.is_finished(),
        "the drop did not wait for the reader"
    );
    drop(sc);
    let ((code, said), took) = dropping.await.unwrap();
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains(&format!(
            "replication slot {name}: dropped; publication {name}: dropped"
        )),
        "{said}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        slot_and_publication(&bed.pool, &name).await,
        (false, false),
        "left behind"
    );
    eprintln!(
        "drop: done {:.1} s after it started (the reader stopped at 2 s)",
        took.as_secs_f64()
    );

    let (code, said) = drop_command(&config, &args).await;
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("not there"), "{said}");

    let (code, said) = drop_command(&config, &["--drop-slot", "x'; DROP TABLE t; --"]).await;
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("a-z, 0-9 and _"), "{said}");
    stream.drop(&bed.pool).await;
}

/// W for the history checker: a read that begins later than this after an external commit must
/// not return an older version. The measured bound is far below (docs/commit-stream.md); this
/// leaves room for a shared 2-core machine under the workload.
const EXTERNAL_W: Duration = Duration::from_secs(1);

/// A history on hot keys: two sidecars reading and writing (then reading only), one upserting
/// with plain SQL about every 10 ms, the commit stream on. The checker (`wtc_tests::history`) finds nothing lost, no
/// phantom, no stale read against the sidecars' own writes, and no read that began more than W
/// after an external commit returning an older version; the distribution of how far behind the
/// reads that were is printed. The control: the same external writer and readers with the
/// stream off (and no sidecar writes, which would refresh the keys) shows reads far behind W:
/// the checker sees what the stream prevents. The consistency sampler checks every row the stream
/// changed one W later and finds none inconsistent. With the stream's evictions made no-ops, the
/// run with readers alone fails the W check, and the sampler counts inconsistencies.
#[tokio::test]
async fn a_history_with_external_writers_keeps_the_promise_within_w() {
    use std::sync::Arc;
    use wtc_tests::history::{self, ExternalWriter, History, Stop, Workload};
    let pool = pg().await;
    let run = |stream: Option<Stream>, writers: usize, seconds: u64| {
        let pool = pool.clone();
        async move {
            // A Redis of its own: the other run's entries are under the same keys.
            let redis = RedisServer::start().await;
            let redis_url = redis.url();
            let (table, audit) = history::audited_table(&pool, "cs_hist").await;
            let mut sidecars = vec![];
            for _ in 0..2 {
                let f = Fixture::new(&redis_url).entity("accounts", &table);
                let f = match &stream {
                    Some(s) => s.on(f, VersionSource::Trigger),
                    None => f.with(|c| c.entities[0].versions = VersionSource::Trigger),
                };
                // Every row checked by the consistency sampler, one W after its change.
                let f = f.with(|c| {
                    c.sampler.enabled = true;
                    c.sampler.sample_rate = 1.0;
                    c.sampler.grace_ms = EXTERNAL_W.as_millis() as u64;
                    c.sampler.interval_ms = 200;
                });
                sidecars.push(Arc::new(f.start().await));
            }
            if stream.is_some() {
                // One of the two reads the slot (made now: nothing before it matters).
                let deadline = Instant::now() + Duration::from_secs(60);
                while sidecars[0].metric("wtc_commit_stream_leading").await
                    + sidecars[1].metric("wtc_commit_stream_leading").await
                    != 1.0
                {
                    assert!(Instant::now() < deadline, "no sidecar reads the slot");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let mut workload = Workload::new(
                6,
                Stop {
                    reads: u64::MAX,
                    writes: u64::MAX,
                    max: Duration::from_secs(seconds),
                },
            );
            workload.writers = writers;
            workload.readers = 4;
            // Freshness comes from the stream alone (an eviction would refill from PostgreSQL).
            workload.evict_every = None;
            workload.external = Some(ExternalWriter {
                pool: pool.clone(),
                table: table.clone(),
                pause: (Duration::from_millis(5), Duration::from_millis(15)),
            });
            for k in &workload.keys {
                assert!(sidecars[0].put("accounts", k, json!({"n": 0})).await.status < 300);
            }
            let recorded = History::default();
            workload.run(&sidecars, &redis_url, &recorded).await;
            let ops = recorded.ops();
            let report = history::check(&workload.keys, &ops, &audit.committed(&pool).await);
            // The sampler's last second looks, and its second looks one grace period later.
            tokio::time::sleep(EXTERNAL_W * 2 + Duration::from_millis(500)).await;
            let mut sampler = (0.0, 0.0);
            for sc in &sidecars {
                sampler.0 += sc.metric("wtc_sampler_checked_total").await;
                sampler.1 += sc.metric("wtc_sampler_inconsistent_total").await;
            }
            (report, sampler)
        }
    };

    // With the sidecars writing too (their writes refresh the keys), then with readers alone
    // (only the stream brings the external versions).
    for (writers, seconds) in [(2, 12), (0, 6)] {
        let stream = Stream::new(&pool).await;
        let name = stream.name.clone();
        let (r, (checked, inconsistent)) = run(Some(stream), writers, seconds).await;
        let behind = &r.behind_external;
        let at = |p| match behind.is_empty() {
            true => 0.0,
            false => percentile(behind, p),
        };
        eprintln!(
            "history with external writers, stream on, {writers} sidecar writers: {}; behind an \
             external commit: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; consistency sampler: \
             {checked} rows checked one W after their change, {inconsistent} inconsistent",
            r.summary(),
            at(0.5),
            at(0.99),
            r.max_behind_external().as_secs_f64() * 1e3
        );
        assert!(
            r.writes_external > 200 && r.writes_acked() >= 50 * writers as u64 && r.reads > 1000,
            "too little happened to prove anything: {}",
            r.summary()
        );
        r.assert_external_within(EXTERNAL_W);
        assert!(r.stale.is_empty(), "{}", r.summary());
        assert!(checked > 100.0, "the sampler checked {checked} rows");
        assert_eq!(
            inconsistent, 0.0,
            "the sampler saw rows older than the database beyond W"
        );
        Stream { name }.drop(&pool).await;
    }

    let (control, _) = run(None, 0, 4).await;
    eprintln!(
        "history with external writers, stream off: {}",
        control.summary()
    );
    assert!(
        control.lost.is_empty() && control.phantom.is_empty(),
        "{}",
        control.summary()
    );
    assert!(
        control.max_behind_external() > EXTERNAL_W,
        "without the stream the checker saw nothing: {}",
        control.summary()
    );
}
