//! Faults, races and overload, with a history checked after each scenario (issue 7).
//!
//! Every scenario runs short in the README's test command. `scripts/reliability` runs the long
//! version (`WTC_RELIABILITY=long`, release build) and writes `docs/reliability.md` from the
//! figures the scenarios append to `WTC_RELIABILITY_REPORT`.
//!
//! Scenarios run one at a time (`serial`): some restart the shared PostgreSQL, and all of them
//! measure.

mod cluster;
mod commit_stream;
mod herd;
mod history;
mod overload;
mod postgres_faults;
mod redis_faults;
mod sentinel_failover;
mod sidecar_faults;

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wtc_tests::history::{Report, RunStats, Stop, Workload};

/// Short (the test command) or long (by hand, `scripts/reliability`).
pub fn long() -> bool {
    std::env::var("WTC_RELIABILITY").as_deref() == Ok("long")
}

/// How much a history scenario does: `short` in the test command, `long` by hand.
pub fn stop(short: (u64, u64), long_run: (u64, u64)) -> Stop {
    let ((reads, writes), max) = if long() {
        (long_run, Duration::from_secs(45 * 60))
    } else {
        (short, Duration::from_secs(40))
    };
    Stop { reads, writes, max }
}

/// One scenario at a time in this binary.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// A fault scenario's loop: one fault after another until the workload ends, each counted by
/// name; the workload goes on (`Workload::until_also`) until every kind happened once.
#[derive(Clone, Default)]
pub struct FaultCycle {
    done: Arc<AtomicBool>,
    cycled: Arc<AtomicBool>,
}

impl FaultCycle {
    pub fn new(workload: &mut Workload) -> Self {
        let cycle = Self::default();
        workload.until_also = Some(Arc::clone(&cycle.cycled));
        cycle
    }

    /// Calls `inject(step)` until `stop`; `kinds` steps make a full cycle.
    pub async fn run(
        &self,
        kinds: usize,
        mut inject: impl AsyncFnMut(usize) -> &'static str,
    ) -> BTreeMap<&'static str, u32> {
        let mut injected = BTreeMap::new();
        let mut step = 0;
        while !self.done.load(Ordering::Relaxed) {
            *injected.entry(inject(step).await).or_default() += 1;
            step += 1;
            if step >= kinds {
                self.cycled.store(true, Ordering::Relaxed);
            }
        }
        injected
    }

    pub fn stop(&self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Makes a replica lag behind its master, for the failover scenarios: stops it (SIGSTOP) and
/// cuts its link (stopped, it would still find the replication stream in its socket buffer on
/// waking, and it cannot reconnect while stopped), then writes the quiet keys' next versions
/// through `sc` (acknowledged clean; nothing writes them again, so no repair hides an old copy).
pub async fn lag_replica(
    replica_pid: u32,
    master: &wtc_tests::RedisServer,
    sc: &wtc_tests::Sidecar,
    quiet: &mut [(String, i64)],
) {
    wtc_tests::signal(replica_pid, "STOP");
    let mut m = master.connection().await.unwrap();
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async::<()>(&mut m)
        .await
        .unwrap();
    for (k, version) in quiet.iter_mut() {
        let put = sc.put("accounts", k, serde_json::json!({"n": 2})).await;
        assert_eq!(put.cache.as_deref(), Some("ok"), "{}", put.raw);
        *version = put.version();
    }
}

/// After a failover: every sidecar's repair queue drains, and the quiet keys read back through
/// each at their acknowledged version, not the older copy the promoted replica held.
pub async fn quiet_keys_read_back(sidecars: &[Arc<wtc_tests::Sidecar>], quiet: &[(String, i64)]) {
    for sc in sidecars {
        let repaired = wtc_tests::eventually(Duration::from_secs(20), || async {
            sc.metric("wtc_repair_queue_depth").await == 0.0
        })
        .await;
        assert!(repaired, "the repair queue drained after the failover");
    }
    for sc in sidecars {
        for (k, version) in quiet {
            let got = sc.get("accounts", k).await;
            assert_eq!(
                (got.status, got.version()),
                (200, *version),
                "{k} after the failover ({:?}): {}",
                got.cache,
                got.raw
            );
        }
    }
}

/// Appends a scenario's figures to the report file, when one is asked for.
pub fn report(scenario: &str, faults: &str, figures: Value) {
    println!("{scenario}: {figures}");
    let Ok(path) = std::env::var("WTC_RELIABILITY_REPORT") else {
        return;
    };
    let line = serde_json::json!({"scenario": scenario, "faults": faults, "figures": figures});
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the reliability report");
    writeln!(f, "{line}").unwrap();
}

/// The figures of a checked history.
pub fn history_figures(r: &Report, stats: &RunStats, w: Duration) -> Value {
    serde_json::json!({
        "seconds": stats.elapsed.as_secs_f64(),
        "writes_acknowledged": r.writes_acked(),
        "writes_repairing": r.writes_repairing,
        "writes_unknown": r.writes_unknown,
        "reads": r.reads,
        "reads_failed": r.reads_failed,
        "evictions": stats.evictions,
        "lost": r.lost.len(),
        "phantom": r.phantom.len(),
        "stale": r.stale.len(),
        "reads_behind_repairing_write": r.stale_after_fault,
        "max_staleness_ms": r.max_staleness_after_fault.as_secs_f64() * 1e3,
        "w_ms": w.as_secs_f64() * 1e3,
    })
}
