//! The README's Kubernetes section as a test: CRD, chart, a database Secret, a cache with
//! managed Redis, an opted-in application; the application writes and reads through
//! `127.0.0.1:7480` inside its pod.

use crate::{Shop, ShopOptions, container_status, node, serial, wait_for};
use redis::AsyncCommands;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_zero_to_an_application_reading_its_writes_from_the_cache() {
    let _serial = serial().await;
    let node = node().await;
    let started = Instant::now();
    let shop = Shop::deploy(node, "journey", ShopOptions::default()).await;
    eprintln!(
        "journey: cache Ready and application Ready {:.1} s after the namespace was made; {:.1} s \
         after helm install",
        started.elapsed().as_secs_f64(),
        node.installed_at.elapsed().as_secs_f64(),
    );

    // The pod runs the application next to the injected sidecar, a native sidecar.
    let pod = shop.pod(node).await;
    let init = pod["spec"]["initContainers"].as_array().expect("injected");
    assert_eq!(init[0]["name"], "wtc-sidecar");
    assert_eq!(init[0]["restartPolicy"], "Always");
    for name in ["wtc-sidecar", "app"] {
        let s = container_status(&pod, name).unwrap_or_else(|| panic!("{name} status: {pod}"));
        assert_eq!(s["ready"], true, "{name}: {s}");
        assert!(s["state"]["running"].is_object(), "{name}: {s}");
    }
    // It started after the sidecar listened (the startup probe), not before.
    let log = node
        .kubectl(&[
            "-n",
            &shop.ns,
            "logs",
            &shop.pod_name(node).await,
            "-c",
            "app",
        ])
        .await;
    assert!(
        log.contains("sidecar_answered_at_start=true"),
        "the application started before the sidecar listened:\n{log}"
    );

    let metrics_before = shop.exec(node, &["metrics"]).await.unwrap();

    // A write from inside the pod: committed to PostgreSQL, then cached.
    let put = shop
        .exec(
            node,
            &["put", "alice", r#"{"owner": "Alice", "balance": 120.50}"#],
        )
        .await
        .unwrap();
    assert!(put.starts_with("201 ok\n"), "{put}");
    let (owner, version): (String, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT owner, version FROM {} WHERE id = 'alice'",
        shop.table
    )))
    .fetch_one(&shop.pool)
    .await
    .unwrap();
    assert_eq!(owner, "Alice");
    assert!(put.contains(&format!("\"v\":{version}")), "{put}");

    // A read: a hit, served by the managed Redis pod, which holds the envelope.
    let get = shop.exec(node, &["get", "alice"]).await.unwrap();
    assert!(get.starts_with("200 hit\n"), "{get}");
    let mut redis = shop.redis(node).await;
    let cached: Option<String> = redis
        .get(wtc_tests::entry_key("accounts", "alice"))
        .await
        .unwrap();
    let cached = cached.expect("the entry is in the managed Redis");
    assert!(cached.contains("\"Alice\""), "{cached}");

    // The same through the application's own port, from outside the pod.
    let app = shop.app(node).await;
    let r = wtc_tests::reply(app.http.get(format!("{}/accounts/alice", app.base)))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.cache.as_deref()),
        (200, Some("hit")),
        "{}",
        r.raw
    );
    assert_eq!(r.etag, Some(version));

    // A miss after an eviction, filled from PostgreSQL.
    let _: () = redis
        .del(wtc_tests::entry_key("accounts", "alice"))
        .await
        .unwrap();
    let get = shop.exec(node, &["get", "alice"]).await.unwrap();
    assert!(get.starts_with("200 miss\n"), "{get}");

    // The sidecar's metrics, read from inside the pod.
    let metrics = shop.exec(node, &["metrics"]).await.unwrap();
    for (series, added) in [
        (r#"wtc_writes_total{entity="accounts",outcome="ok"}"#, 1.0),
        (
            r#"wtc_cache_lookups_total{entity="accounts",result="hit"}"#,
            2.0,
        ),
        (
            r#"wtc_cache_lookups_total{entity="accounts",result="miss"}"#,
            1.0,
        ),
    ] {
        let now = sample(&metrics, series);
        assert_eq!(
            now - sample(&metrics_before, series),
            added,
            "{series} in:\n{metrics}"
        );
    }

    // The sidecar's CPU limit (the chart's default: one CPU) sized its runtime, through the
    // container's cgroup: one worker, the current-thread scheduler (sidecar/src/runtime.rs).
    // Only a check on a node with more cores than that: on one core it would pass anyway.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > 1 {
        assert_eq!(
            sample(&metrics, "wtc_runtime_workers"),
            1.0,
            "a sidecar limited to one CPU on a {cores}-core node:\n{metrics}"
        );
    }

    // The managed Redis' password is in no command line on the node, and reaches redis-server
    // by its Secret's file only. (Redis rewrites its process title over its arguments and
    // environment, so /proc did not show the old `--requirepass $(REDIS_PASSWORD)` once it
    // ran; the container's spec does: that check is the one the old way fails.)
    let password = shop.redis_password(node).await;
    assert!(password.len() >= 16, "a generated password");
    let read = |pid: u32, f: &str| {
        std::fs::read(format!("/proc/{pid}/{f}"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default()
    };
    let shown: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = read(*pid, "cmdline");
            cmd.contains(&password)
                || (cmd.starts_with("redis-server") && read(*pid, "environ").contains(&password))
        })
        .map(|pid| read(pid, "cmdline"))
        .collect();
    assert!(shown.is_empty(), "the Redis password in: {shown:?}");
    let redis_pod = shop
        .live_pod(node, "app.kubernetes.io/name=wtc-redis")
        .await
        .expect("the managed Redis pod");
    let redis = &redis_pod["spec"]["containers"][0];
    assert!(
        !redis["args"].to_string().contains("requirepass") && redis["env"].is_null(),
        "the password reaches Redis by file only: {redis}"
    );

    // What `kubectl get wtc` shows (the operator follows the pod's status changes).
    let status = wait_for(
        Duration::from_secs(30),
        "readySidecars 1 and uninjectedPods 0 on the cache",
        || {
            let shop = &shop;
            async move {
                let status = shop.cache_status(node).await;
                (status["readySidecars"] == 1 && status["uninjectedPods"] == 0).then_some(status)
            }
        },
    )
    .await;
    assert_eq!(status["injectedPods"], 1, "{status}");
    let ready = |t: &str| {
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .map(|c| c["status"].clone())
    };
    assert_eq!(ready("Ready"), Some("True".into()), "{status}");
    assert_eq!(ready("SidecarsReady"), Some("True".into()), "{status}");
    shop.delete(node).await;
}

/// The value of one series in Prometheus' text format (0 when absent).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}
