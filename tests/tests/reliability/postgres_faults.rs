//! PostgreSQL failing under load: both sidecars reach it through the fault proxy (connections
//! reset, replies cut after the server acted so commits have an unknown outcome, refused, black
//! hole past the statement timeout, latency), and the real cluster is restarted in immediate mode
//! (a crash). Outcomes the sidecar cannot know are answered as errors and recorded as unknown;
//! no acknowledged write is lost, no read returns a version the database never committed, and no
//! read is older than a clean acknowledgement.

use crate::{FaultCycle, history_figures, report, serial, stop};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use wtc_tests::history::{self, History, Workload};
use wtc_tests::proxy::{FaultProxy, Mode};
use wtc_tests::*;

/// Kinds of fault in `inject`'s cycle; every run goes through all of them at least once.
const FAULT_KINDS: usize = 6;

/// `pg_ctlcluster <version> <name> restart -m immediate` of the cluster the tests use.
pub async fn crash_and_restart_postgres() {
    let cluster = std::env::var("WTC_PG_CLUSTER")
        .expect("WTC_PG_CLUSTER (printed by scripts/local-services) names the cluster to restart");
    let (version, name) = cluster
        .split_once('/')
        .expect("WTC_PG_CLUSTER is version/name");
    let mut cmd = if !is_root() {
        let mut c = tokio::process::Command::new("sudo");
        c.args(["-n", "pg_ctlcluster"]);
        c
    } else {
        tokio::process::Command::new("pg_ctlcluster")
    };
    let status = cmd
        .args([version, name, "restart", "-m", "immediate"])
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .expect("run pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster restart failed: {status}");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|ids| ids.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

async fn inject(step: usize, proxy: &FaultProxy) -> &'static str {
    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    let name = match step % FAULT_KINDS {
        0 => {
            proxy.reset_all();
            "connections reset"
        }
        1 => {
            proxy.set(Mode::CutReplies);
            pause(300).await;
            proxy.set(Mode::Pass);
            "replies cut 300 ms (statements ran, outcome unknown)"
        }
        2 => {
            proxy.set(Mode::Refuse);
            proxy.reset_all();
            pause(300).await;
            proxy.set(Mode::Pass);
            "connections reset and refused 300 ms"
        }
        3 => {
            proxy.set(Mode::BlackHole);
            pause(600).await;
            proxy.set(Mode::Pass);
            "black hole 600 ms (over the 300 ms statement timeout)"
        }
        4 => {
            proxy.set(Mode::Latency(Duration::from_millis(20)));
            pause(500).await;
            proxy.set(Mode::Pass);
            "latency 20 ms, 500 ms"
        }
        _ => {
            crash_and_restart_postgres().await;
            "PostgreSQL crashed and restarted (pg_ctlcluster restart -m immediate)"
        }
    };
    // Healthy time between faults, so that most of the run's writes are acknowledged.
    pause(if crate::long() { 1_500 } else { 700 }).await;
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_faults_under_load_keep_the_promise() {
    let _serial = serial().await;
    let pool = pg().await;
    let (table, audit) = history::audited_table(&pool, "pgfault").await;
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], database_port()).into()).await;
    let mut sidecars = vec![];
    for _ in 0..2 {
        let sc = Fixture::new(&redis.url())
            .entity("accounts", &table)
            .with(|c| {
                c.database.url = with_port(&database_url(), proxy.port);
                c.database.statement_timeout_ms = 300;
            })
            .start()
            .await;
        sidecars.push(Arc::new(sc));
    }
    let mut workload = Workload::new(4, stop((1_500, 500), (300_000, 30_000)));
    for k in &workload.keys {
        assert!(sidecars[0].put("accounts", k, json!({"n": 0})).await.status < 300);
    }

    let cycle = FaultCycle::new(&mut workload);
    let recorded = History::default();
    // The faults run alongside the workload, in this task, until it ends.
    let (stats, injected) = tokio::join!(
        async {
            let stats = workload.run(&sidecars, &redis.url(), &recorded).await;
            cycle.stop();
            stats
        },
        cycle.run(FAULT_KINDS, async |step| inject(step, &proxy).await),
    );

    // Both sidecars work again, and their repair queues (unknown outcomes) drained.
    for sc in &sidecars {
        let back = eventually(Duration::from_secs(20), || async {
            let req = sc.http.put(sc.url("accounts", "h0")).json(&json!({"n": 1}));
            let r = sc.try_send(req).await;
            let depth = sc.metric("wtc_repair_queue_depth").await;
            matches!(r, Ok(r) if r.status == 200) && depth == 0.0
        })
        .await;
        assert!(back, "the sidecar recovered after the faults");
    }
    let ops = recorded.ops();
    let committed = audit.committed(&pool).await;
    // Never a cached version the database lacks, or newer than the row.
    for k in &workload.keys {
        if let Some(cached) = redis.cached_version("accounts", k).await {
            let db = db_version(&pool, &table, k).await;
            assert!(
                committed.contains(&(k.clone(), cached)) && Some(cached) <= db,
                "{k}: cached {cached}, database {db:?}"
            );
        }
    }
    let r = history::check(&workload.keys, &ops, &committed);
    let w = Duration::ZERO;
    let mut figures = history_figures(&r, &stats, w);
    figures["faults_injected"] = json!(injected);
    report(
        "postgres_faults",
        "PostgreSQL reset, replies cut, refused, black-holed, slowed (proxy), crashed and restarted",
        figures,
    );
    assert!(
        injected.len() >= FAULT_KINDS && r.writes_unknown > 0,
        "every kind of fault happened and some outcomes were unknown: {injected:?}, {}",
        r.summary()
    );
    r.assert_promise(w);
}
