//! What breaks in real pods, on the real node.

use crate::{Shop, ShopOptions, container_status, node, pod_ready, serial, wait_for};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wtc_tests::history::{self, History, Stop, Workload};

/// Pods' traffic to PostgreSQL refused at the host (the node's bridge) while it lives: a
/// database outage as every injected pod sees it, the rest of the suite unaffected.
struct DatabaseOutage;

const OUTAGE_RULE: [&str; 10] = [
    "INPUT",
    "-s",
    "198.18.0.0/24",
    "-p",
    "tcp",
    "--dport",
    "55432",
    "-j",
    "REJECT",
    "--reject-with=tcp-reset",
];

impl DatabaseOutage {
    fn start() -> Self {
        // A rule left by a killed earlier run goes first.
        while Self::delete() {}
        let ok = std::process::Command::new("iptables")
            .arg("-I")
            .args(OUTAGE_RULE)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "iptables -I {OUTAGE_RULE:?} failed");
        DatabaseOutage
    }
}

impl DatabaseOutage {
    fn delete() -> bool {
        std::process::Command::new("iptables")
            .arg("-D")
            .args(OUTAGE_RULE)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for DatabaseOutage {
    fn drop(&mut self) {
        Self::delete();
    }
}

/// Three writers and `readers` readers on four hot keys through the application's port, no
/// evictions (the fault is the point), until `(reads, writes)` are done and the returned flag is
/// set by the fault's end, or `max`.
fn workload_through_the_app(
    (reads, writes): (u64, u64),
    readers: usize,
    max: Duration,
) -> (Workload, Arc<AtomicBool>) {
    let mut workload = Workload::new(4, Stop { reads, writes, max });
    workload.evict_every = None;
    workload.writers = 3;
    workload.readers = readers;
    let fault_done = Arc::new(AtomicBool::new(false));
    workload.until_also = Some(Arc::clone(&fault_done));
    (workload, fault_done)
}

/// Readiness does not follow the database: a 20 s outage (longer than the 15 s a
/// `/readyz` probe with Kubernetes' default threshold would take to fail the pod) leaves the pod
/// Ready, so its Services keep it; meanwhile the sidecar answers 503 for what it must read from
/// the database and still serves what Redis holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_does_not_make_injected_pods_not_ready() {
    let _serial = serial().await;
    let node = node().await;
    let shop = Shop::deploy(node, "dbout", ShopOptions::default()).await;
    let put = shop
        .exec(node, &["put", "cached", r#"{"owner": "o"}"#])
        .await
        .unwrap();
    assert!(put.starts_with("201 ok"), "{put}");
    let app = shop.app(node).await;
    let get = |key: &'static str| {
        let app = Arc::clone(&app);
        async move {
            wtc_tests::reply(app.http.get(format!("{}/accounts/{key}", app.base)))
                .await
                .unwrap()
        }
    };

    let outage = DatabaseOutage::start();
    let began = Instant::now();
    let mut checks = 0;
    let mut miss_during = None;
    while began.elapsed() < Duration::from_secs(20) {
        let pod = shop.pod(node).await;
        assert!(
            pod_ready(&pod),
            "the pod turned NotReady {:?} into a database outage: {}",
            began.elapsed(),
            pod["status"]
        );
        checks += 1;
        if miss_during.is_none() && began.elapsed() > Duration::from_secs(2) {
            miss_during = Some((get("never-written").await, get("cached").await));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(outage);
    let (miss, hit) = miss_during.unwrap();
    // The outage was real: what only the database has is unavailable ...
    assert_eq!(
        (miss.status, miss.error_code()),
        (503, "database_unavailable"),
        "{}",
        miss.raw
    );
    // ... and what Redis holds is still served.
    assert_eq!(
        (hit.status, hit.cache.as_deref()),
        (200, Some("hit")),
        "{}",
        hit.raw
    );
    eprintln!("database outage: 20 s, pod Ready at each of {checks} checks");

    // Back to normal without restarting anything.
    let app2 = Arc::clone(&app);
    wait_for(
        Duration::from_secs(30),
        "reads from the database again",
        || {
            let app = Arc::clone(&app2);
            async move {
                let r =
                    wtc_tests::reply(app.http.get(format!("{}/accounts/never-written", app.base)))
                        .await
                        .ok()?;
                (r.status == 404).then_some(())
            }
        },
    )
    .await;
    let pod = shop.pod(node).await;
    assert_eq!(
        container_status(&pod, "wtc-sidecar").unwrap()["restartCount"],
        0
    );
    shop.delete(node).await;
}

/// The managed Redis pod deleted under load: writes go on (acknowledged `repairing` while Redis
/// is away), reads bypass it, and once the Deployment's new Redis pod is Ready the sidecar finds
/// a new Redis (the epoch check) and the cache converges. The history checker: no acknowledged
/// write lost, no read older than a clean acknowledgement, staleness behind a `repairing` write
/// within W (the entity TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_managed_redis_pod_deleted_under_load() {
    const TTL: u64 = 10;
    let _serial = serial().await;
    let node = node().await;
    let shop = Shop::deploy(
        node,
        "redisdel",
        ShopOptions {
            ttl_seconds: Some(TTL),
            ..ShopOptions::default()
        },
    )
    .await;
    let audit = history::Audit::install(&shop.pool, &shop.table).await;
    let app = shop.app(node).await;
    let recorded = History::default();
    let (workload, fault_done) =
        workload_through_the_app((2_000, 500), 4, Duration::from_secs(120));

    let redis_pod = || async {
        let p = shop
            .live_pod(node, "app.kubernetes.io/name=wtc-redis")
            .await?;
        Some((p["metadata"]["name"].as_str()?.to_string(), pod_ready(&p)))
    };
    let fault = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (old, _) = redis_pod().await.expect("a Redis pod");
        let deleted = Instant::now();
        node.kubectl(&["-n", &shop.ns, "delete", "pod", &old, "--wait=false"])
            .await;
        let new = wait_for(Duration::from_secs(120), "a new Redis pod Ready", || {
            let old = old.clone();
            async move {
                redis_pod()
                    .await
                    .filter(|(name, ready)| *name != old && *ready)
                    .map(|(name, _)| name)
            }
        })
        .await;
        let back = deleted.elapsed();
        // Load goes on after the new pod is Ready, past the entity TTL.
        tokio::time::sleep(Duration::from_secs(TTL + 2)).await;
        fault_done.store(true, Ordering::Relaxed);
        (old, new, back)
    };
    let targets = [Arc::clone(&app)];
    let (stats, (old, new, back)) = tokio::join!(workload.run(&targets, "", &recorded), fault);
    let committed = audit.committed(&shop.pool).await;
    let report = history::check(&workload.keys, &recorded.ops(), &committed);
    eprintln!(
        "redis pod {old} deleted, {new} Ready after {:.1} s; {:.1} s of load: {}",
        back.as_secs_f64(),
        stats.elapsed.as_secs_f64(),
        report.summary()
    );
    report.assert_promise(Duration::from_secs(TTL));
    assert!(
        report.writes_repairing > 0,
        "no write saw Redis gone: {}",
        report.summary()
    );

    // Converged: each key now reads from the new Redis at the database's version.
    for key in &workload.keys {
        let want = wtc_tests::db_version(&shop.pool, &shop.table, key).await;
        let r = wait_for(
            Duration::from_secs(30),
            "a hit at the database's version",
            || {
                let app = Arc::clone(&app);
                let key = key.clone();
                async move {
                    let r = wtc_tests::reply(app.http.get(format!("{}/accounts/{key}", app.base)))
                        .await
                        .ok()?;
                    (r.cache.as_deref() == Some("hit")).then_some(r)
                }
            },
        )
        .await;
        assert_eq!(Some(r.version()), want, "{key}: {}", r.raw);
    }
    // The sidecar passed the epoch check on the new Redis before using it: the new process's
    // run id is recorded, with its replication id (an empty Redis needs no sweep, so nothing
    // was swept).
    let mut redis = shop.redis(node).await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut redis)
        .await
        .unwrap();
    let run_id = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap()
        .trim()
        .to_string();
    let epoch: Option<String> = redis::cmd("GET")
        .arg("wtc:epoch")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        epoch.as_deref().and_then(|e| e.split(':').next()),
        Some(run_id.as_str()),
        "the sidecar never checked the new Redis"
    );
    shop.delete(node).await;
}

/// The sidecar's process killed (-9) inside its pod while the application writes through it: the
/// kubelet restarts the sidecar, the application container keeps running (same container, no
/// restart), and no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_killed_inside_its_pod_is_restarted_and_the_application_keeps_running() {
    let _serial = serial().await;
    let node = node().await;
    let shop = Shop::deploy(node, "kill", ShopOptions::default()).await;
    let audit = history::Audit::install(&shop.pool, &shop.table).await;
    let app = shop.app(node).await;
    let before = shop.pod(node).await;
    let app_container = container_status(&before, "app").unwrap()["containerID"].clone();
    let uid = before["metadata"]["uid"].as_str().unwrap().to_string();

    let recorded = History::default();
    let (workload, fault_done) = workload_through_the_app((1_000, 300), 3, Duration::from_secs(90));
    let fault = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = sidecar_pid(&uid).expect("the sidecar's process on this node");
        wtc_tests::signal(pid, "KILL");
        let killed = Instant::now();
        wait_for(
            Duration::from_secs(60),
            "the sidecar restarted and ready",
            || {
                let shop = &shop;
                async move {
                    let pod = shop.pod(node).await;
                    let s = container_status(&pod, "wtc-sidecar")?.clone();
                    (s["restartCount"].as_i64() >= Some(1) && s["ready"] == true).then_some(())
                }
            },
        )
        .await;
        let took = killed.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        fault_done.store(true, Ordering::Relaxed);
        took
    };
    let targets = [Arc::clone(&app)];
    let (_, took) = tokio::join!(workload.run(&targets, "", &recorded), fault);
    let committed = audit.committed(&shop.pool).await;
    let report = history::check(&workload.keys, &recorded.ops(), &committed);
    eprintln!(
        "sidecar killed (-9): restarted and ready after {:.1} s; {}",
        took.as_secs_f64(),
        report.summary()
    );
    report.assert_promise(Duration::from_secs(300));
    assert!(
        report.writes_unknown + report.reads_failed > 0,
        "the kill went unnoticed: {}",
        report.summary()
    );

    let after = shop.pod(node).await;
    let app_status = container_status(&after, "app").unwrap();
    assert_eq!(app_status["restartCount"], 0, "{app_status}");
    assert_eq!(
        app_status["containerID"], app_container,
        "the application container was replaced"
    );
    assert!(pod_ready(&after), "{}", after["status"]);
    shop.delete(node).await;
}

/// The PID, in this machine's namespace, of the sidecar of the pod with this UID: the process
/// running `/wtc-sidecar --config ...` inside that pod's cgroup.
fn sidecar_pid(pod_uid: &str) -> Option<u32> {
    let uid_forms = [pod_uid.to_string(), pod_uid.replace('-', "_")];
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !cmdline.starts_with(b"/wtc-sidecar\0--config") {
            continue;
        }
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if uid_forms.iter().any(|u| cgroup.contains(u.as_str())) {
            return Some(pid);
        }
    }
    None
}

/// A sidecar image that does not exist: the application does not start (the sidecar comes first),
/// and the user sees why in the pod's events and in the cache's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_cannot_start_is_visible_on_the_pod_and_the_cache() {
    let _serial = serial().await;
    let node = node().await;
    let shop = Shop::deploy(
        node,
        "badimage",
        ShopOptions {
            // A registry on this machine that does not run: the pull fails at once.
            sidecar: "    image: localhost/wtc-dev/wtc-sidecar:no-such-tag",
            no_wait: true,
            ..ShopOptions::default()
        },
    )
    .await;
    let pod_name = wait_for(Duration::from_secs(60), "the application's pod", || {
        let shop = &shop;
        async move {
            let list = node
                .json(&["-n", &shop.ns, "get", "pods", "-l", "app=shop-app"])
                .await;
            list["items"][0]["metadata"]["name"]
                .as_str()
                .map(str::to_string)
        }
    })
    .await;
    // The cache's status names the pod and the kubelet's reason.
    let condition = wait_for(
        Duration::from_secs(90),
        "SidecarsReady=False on the cache",
        || {
            let shop = &shop;
            async move {
                let status = shop.cache_status(node).await;
                status["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "SidecarsReady" && c["status"] == "False")
                    .cloned()
            }
        },
    )
    .await;
    let message = condition["message"].as_str().unwrap();
    assert_eq!(condition["reason"], "SidecarFailing");
    assert!(
        message.contains(&pod_name)
            && (message.contains("ImagePullBackOff") || message.contains("ErrImagePull")),
        "{message}"
    );
    // The pod's events say the same, and the application container never started.
    let events = node
        .kubectl(&[
            "-n",
            &shop.ns,
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={pod_name}"),
        ])
        .await;
    assert!(events.contains("Failed to pull image"), "{events}");
    let pod = shop.pod(node).await;
    let app = container_status(&pod, "app").unwrap();
    assert!(
        app["state"]["running"].is_null(),
        "the application started: {app}"
    );
    // The cache's own events carry it too.
    let cache_events = node
        .kubectl(&[
            "-n",
            &shop.ns,
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=shop",
        ])
        .await;
    assert!(cache_events.contains("SidecarFailing"), "{cache_events}");
    eprintln!("sidecar that cannot start: {message}");
    shop.delete(node).await;
}
