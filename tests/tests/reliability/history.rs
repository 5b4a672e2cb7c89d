//! Concurrent histories without faults: writers and readers on a few hot keys, each spelled
//! several ways, through two sidecars, keys evicted at random, checked by `wtc_tests::history`. The same run against the
//! weakened build (CAS and fill leases off) must show stale reads: that is what proves the checker
//! can fail.

use crate::{history_figures, report, serial, stop};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use wtc_tests::history::{self, History, Report, RunStats, Stop, Workload};
use wtc_tests::*;

/// Runs the workload on a fresh table with an integer key through two sidecars started with
/// `env`; requests spell each key several ways (`7`, `07`, `+7`, `007`), all one row.
async fn run(env: &[(&str, &str)], stop: Stop) -> (Report, RunStats) {
    let pool = pg().await;
    let (table, audit) = history::audited_int_table(&pool, "hist").await;
    let redis = RedisServer::start().await;
    let mut sidecars = vec![];
    for _ in 0..2 {
        let mut f = Fixture::new(&redis.url()).entity("accounts", &table);
        for (k, v) in env {
            f = f.env(k, v);
        }
        sidecars.push(Arc::new(f.start().await));
    }
    let workload = Workload::new(3, stop).with_integer_spellings();
    for k in &workload.keys {
        assert!(sidecars[0].put("accounts", k, json!({"n": 0})).await.status < 300);
    }
    let recorded = History::default();
    let stats = workload.run(&sidecars, &redis.url(), &recorded).await;
    let ops = recorded.ops();
    let report = history::check(&workload.keys, &ops, &audit.committed(&pool).await);
    println!(
        "history ({env:?}): {} evictions in {:?}; {}",
        stats.evictions,
        stats.elapsed,
        report.summary()
    );
    let per_key = history::ops_per_key(&workload.keys, &ops);
    assert!(per_key.values().all(|n| *n > 10), "{per_key:?}");
    (report, stats)
}

/// Reads and writes of the plain and the weakened runs: the same workload, the same size.
fn size() -> Stop {
    stop((2_000, 1_000), (1_000_000, 100_000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_history_with_random_eviction_has_no_stale_or_lost_versions() {
    let _serial = serial().await;
    let (r, stats) = run(&[], size()).await;
    report(
        "history",
        "none; entries evicted at random every 0.5-3 ms",
        history_figures(&r, &stats, Duration::ZERO),
    );
    assert!(
        r.writes_acked() > 100 && r.reads > 100 && stats.evictions > 50,
        "too little happened to prove anything: {}",
        r.summary()
    );
    r.assert_promise(Duration::ZERO);
}

/// The checker, run on the build whose STORE is a plain SET and whose FILL ignores the lease,
/// reports stale reads: the races P2 is about do happen in this workload, and are caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_the_weakened_build() {
    let _serial = serial().await;
    let (r, stats) = run(&[("WTC_TEST_WEAKEN", "plain-set")], size()).await;
    report(
        "history_weakened",
        "none; WEAKENED build (plain SET, fills without lease); entries evicted every 0.5-3 ms",
        history_figures(&r, &stats, Duration::ZERO),
    );
    assert!(
        !r.stale.is_empty(),
        "the weakened build went unnoticed: {}",
        r.summary()
    );
    assert!(r.lost.is_empty() && r.phantom.is_empty());
}
