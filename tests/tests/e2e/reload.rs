//! The running sidecar follows its configuration file (a ConfigMap the kubelet updates): TTLs,
//! leases, early refresh and retries are taken without a restart; a change of anything else,
//! or a file that does not validate, is refused whole (logged, counted) and the process goes on
//! with what it had.

use serde_json::json;
use std::time::{Duration, Instant};
use wtc_tests::*;

async fn pttl(bed: &TestBed, key: &str) -> i64 {
    bed.redis.pttl(&entry_key("accounts", key)).await
}

async fn reloads(sc: &Sidecar, result: &str) -> f64 {
    sc.metric(&format!("wtc_config_reloads_total{{result=\"{result}\"}}"))
        .await
}

#[tokio::test]
async fn a_changed_ttl_is_taken_without_a_restart_and_other_changes_are_refused() {
    let bed = TestBed::new("reload").await;
    let fixture = bed.fixture().capture_logs();
    let mut config = fixture.config.clone();
    let sc = fixture.start().await;
    let pid = sc.pid();

    let put = sc.put("accounts", "before", json!({"n": 1})).await;
    assert_eq!(put.status, 201, "{}", put.raw);
    assert!(pttl(&bed, "before").await > 290_000, "the file's 300 s TTL");

    // A reloadable change: the next write carries the new TTL, same process.
    config.entities[0].ttl_seconds = 60;
    let changed = Instant::now();
    sc.rewrite_config(&config.render());
    let mut n = 0;
    let taken = eventually(Duration::from_secs(10), || {
        n += 1;
        let key = format!("after{n}");
        let (sc, bed) = (&sc, &bed);
        async move {
            sc.put("accounts", &key, json!({"n": 2})).await.status == 201
                && (1..=60_000).contains(&pttl(bed, &key).await)
        }
    })
    .await;
    assert!(taken, "the new TTL was not taken");
    eprintln!(
        "reload: a TTL change taken {:.2} s after the file changed",
        changed.elapsed().as_secs_f64()
    );
    assert_eq!(reloads(&sc, "applied").await, 1.0);

    // The pool size (and a TTL with it): only a restart applies it, so nothing is taken.
    config.database.pool_size += 1;
    config.entities[0].ttl_seconds = 30;
    sc.rewrite_config(&config.render());
    assert!(
        eventually(Duration::from_secs(10), || async {
            reloads(&sc, "needs_restart").await == 1.0
        })
        .await,
        "a change that needs a restart is counted"
    );
    let put = sc.put("accounts", "refused", json!({"n": 3})).await;
    assert_eq!(put.status, 201, "{}", put.raw);
    let ttl = pttl(&bed, "refused").await;
    assert!(
        (30_001..=60_000).contains(&ttl),
        "PTTL {ttl}: still the 60 s TTL, not the refused file's 30 s"
    );
    assert!(sc.logs().contains("cannot take"), "{}", sc.logs());

    // A file that does not parse: refused, the sidecar serves on.
    sc.rewrite_config("this is not = [toml");
    assert!(
        eventually(Duration::from_secs(10), || async {
            reloads(&sc, "invalid").await == 1.0
        })
        .await,
        "an invalid file is counted"
    );
    assert_eq!(sc.get("accounts", "refused").await.status, 200);
    assert!(sc.logs().contains("not valid"), "{}", sc.logs());
    assert_eq!(sc.pid(), pid, "one process throughout");
}
