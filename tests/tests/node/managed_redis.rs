//! The managed Redis' production settings on the real node: its data on a PersistentVolumeClaim
//! (a local PersistentVolume here) survives the pod; its NetworkPolicy, enforced on the node by
//! kube-network-policies, admits only the cache's injected pods (and the operator).

use crate::{Shop, ShopOptions, node, pod_ready, serial, wait_for};
use redis::AsyncCommands;
use std::time::{Duration, Instant};

const CLASS: &str = "wtc-node-local";
const DIR: &str = "/var/tmp/wtc-node/pv-redis";

fn persistent(yaml: String) -> String {
    yaml.replace(
        "    managed:\n",
        &format!(
            "    managed:\n      persistence: true\n      storage: {{size: 64Mi, storageClassName: {CLASS}}}\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_redis_keeps_its_data_on_its_claim_across_a_restart() {
    let _serial = serial().await;
    let node = node().await;
    // A local PersistentVolume on the node's disk, owned by Redis' user (the pod's fsGroup does
    // not apply to local volumes' existing directories on every kubelet).
    let _ = std::fs::remove_dir_all(DIR);
    std::fs::create_dir_all(DIR).unwrap();
    std::os::unix::fs::chown(DIR, Some(999), Some(999)).unwrap();
    let _ = node
        .try_kubectl(&["delete", "pv", CLASS, "--ignore-not-found", "--wait=true"])
        .await;
    let pv = format!(
        r#"apiVersion: v1
kind: PersistentVolume
metadata: {{name: {CLASS}}}
spec:
  capacity: {{storage: 64Mi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: {CLASS}
  local: {{path: {DIR}}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [wtc-node]}}]
"#
    );
    node.kubectl_stdin(&["apply", "-f", "-"], &pv)
        .await
        .unwrap();
    let shop = Shop::deploy(
        node,
        "redispvc",
        ShopOptions {
            edit: Some(persistent),
            ..ShopOptions::default()
        },
    )
    .await;

    // The claim is the cache's, bound to the node's volume, and mounted where Redis writes.
    let claim = node
        .json(&["-n", &shop.ns, "get", "pvc", "shop-redis-data"])
        .await;
    assert_eq!(claim["status"]["phase"], "Bound", "{claim}");
    assert_eq!(claim["spec"]["volumeName"], CLASS);
    assert_eq!(
        claim["metadata"]["ownerReferences"][0]["kind"],
        "WriteThroughCache"
    );
    let redis_pod = shop
        .live_pod(node, "app.kubernetes.io/name=wtc-redis")
        .await
        .expect("the Redis pod");
    let volumes = redis_pod["spec"]["volumes"].as_array().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["persistentVolumeClaim"]["claimName"] == "shop-redis-data"),
        "{volumes:?}"
    );

    // A key written, the append-only file rewritten (on disk once the rewrite reports ok).
    let mut redis = shop.redis(node).await;
    let key = "wtc-node-test:persisted";
    let _: () = redis.set(key, "still here").await.unwrap();
    let _: () = redis::cmd("BGREWRITEAOF")
        .query_async(&mut redis)
        .await
        .unwrap();
    wait_for(Duration::from_secs(30), "the AOF rewrite", || {
        let mut redis = redis.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("persistence")
                .query_async(&mut redis)
                .await
                .ok()?;
            (info.contains("aof_rewrite_in_progress:0")
                && info.contains("aof_rewrite_scheduled:0")
                && info.contains("aof_last_bgrewrite_status:ok"))
            .then_some(())
        }
    })
    .await;
    assert!(
        std::fs::read_dir(DIR).unwrap().next().is_some(),
        "Redis wrote nothing on the volume"
    );

    // The pod goes; its successor reads the file back.
    let old = redis_pod["metadata"]["name"].as_str().unwrap().to_string();
    let restarted = Instant::now();
    node.kubectl(&["-n", &shop.ns, "delete", "pod", &old, "--wait=true"])
        .await;
    node.rollout_status(&shop.ns, "shop-redis").await.unwrap();
    let value: String = wait_for(
        Duration::from_secs(60),
        "the new Redis pod to answer",
        || async {
            let mut redis = shop.redis_checked(node).await?;
            redis.get::<_, Option<String>>(key).await.ok().flatten()
        },
    )
    .await;
    assert_eq!(value, "still here");
    eprintln!(
        "redispvc: the key read back from a new Redis pod {:.1} s after the old one was deleted",
        restarted.elapsed().as_secs_f64()
    );

    // Persistence off: the claim goes with it (the data is the cache's, rebuilt from PostgreSQL).
    node.kubectl(&[
        "-n",
        &shop.ns,
        "patch",
        "wtc",
        "shop",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/spec/redis/managed/persistence", "value": false}]"#,
    ])
    .await;
    wait_for(Duration::from_secs(60), "the claim removed", || async {
        node.try_kubectl(&["-n", &shop.ns, "get", "pvc", "shop-redis-data"])
            .await
            .is_err()
            .then_some(())
    })
    .await;
    shop.delete(node).await;
    let _ = node
        .try_kubectl(&["delete", "pv", CLASS, "--wait=false"])
        .await;
}

/// A connection to the managed Redis through its Service with `password`; `None` when refused.
/// The managed Redis' NetworkPolicy (on by default) on a node that enforces NetworkPolicies: a
/// pod of the cache's namespace that was not injected gets no connection, nor does a pod of
/// another namespace carrying the injected label; the same outsider, labelled as injected pods
/// are, gets Redis' answer (so the probe itself works); the application's injected pod, started
/// anew, reaches Redis through its sidecar. Without the enforcer (or with a policy admitting
/// everyone) the outsider gets Redis' answer and the test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_caches_injected_pods_reach_its_redis() {
    let _serial = serial().await;
    let node = node().await;
    let shop = Shop::deploy(node, "redisnp", ShopOptions::default()).await;
    let np = node
        .json(&["-n", &shop.ns, "get", "networkpolicy", "shop-redis"])
        .await;
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["wtc.dev/injected-for"],
        "shop",
        "{np}"
    );
    let app = shop.pod(node).await;
    assert_eq!(app["metadata"]["labels"]["wtc.dev/injected-for"], "shop");
    let app_ip = app["status"]["podIP"].as_str().unwrap().to_string();

    let redis = format!("shop-redis.{}.svc.cluster.local", shop.ns);
    // Redis answers anyone who connects, even without the password.
    let reached = |answer: &str| answer.contains("NOAUTH");
    node.tools_pod(&shop.ns, "outsider", &[]).await;
    let other = format!("{}-other", shop.ns);
    node.kubectl(&["create", "namespace", &other]).await;
    node.tools_pod(&other, "impostor", &[("wtc.dev/injected-for", "shop")])
        .await;

    let answer = node
        .answer_to(&shop.ns, "outsider", &redis, 6379, "PING")
        .await;
    assert!(
        !reached(&answer),
        "a pod that was not injected reached Redis: {answer}"
    );
    let answer = node
        .answer_to(&other, "impostor", &redis, 6379, "PING")
        .await;
    assert!(
        !reached(&answer),
        "a pod of another namespace reached Redis with the injected label: {answer}"
    );
    // The impostor's network works: the application (no policy selects it) answers it.
    let answer = node
        .answer_to(&other, "impostor", &app_ip, 8080, "PING")
        .await;
    assert!(
        answer.contains("HTTP/1.1 400"),
        "the impostor reaches nothing at all: {answer}"
    );

    // Labelled as injected pods are, the outsider is admitted: the probe works.
    node.kubectl(&[
        "-n",
        &shop.ns,
        "label",
        "pod",
        "outsider",
        "wtc.dev/injected-for=shop",
    ])
    .await;
    wait_for(
        Duration::from_secs(20),
        "the labelled outsider to reach Redis",
        || async {
            let answer = node
                .answer_to(&shop.ns, "outsider", &redis, 6379, "PING")
                .await;
            reached(&answer).then_some(())
        },
    )
    .await;

    // A new application pod: its sidecar's connections are judged too, and admitted.
    let old = shop.pod_name(node).await;
    node.kubectl(&["-n", &shop.ns, "delete", "pod", &old, "--wait=false"])
        .await;
    wait_for(
        Duration::from_secs(90),
        "a new application pod Ready",
        || async {
            let pod = shop.live_pod(node, "app=shop-app").await?;
            (pod["metadata"]["name"] != old.as_str() && pod_ready(&pod)).then_some(())
        },
    )
    .await;
    shop.wait_for_redis(node).await;

    let _ = node
        .try_kubectl(&["delete", "namespace", &other, "--wait=false"])
        .await;
    shop.delete(node).await;
}

async fn redis_with(shop: &Shop, password: &str) -> Option<redis::aio::MultiplexedConnection> {
    let node = node().await;
    let svc = node
        .json(&["-n", &shop.ns, "get", "service", "shop-redis"])
        .await;
    let ip = svc["spec"]["clusterIP"].as_str()?.to_string();
    use redis::IntoConnectionInfo;
    let info = redis::ConnectionAddr::Tcp(ip, 6379)
        .into_connection_info()
        .ok()?
        .set_redis_settings(redis::RedisConnectionInfo::default().set_password(password));
    let client = redis::Client::open(info).ok()?;
    tokio::time::timeout(
        Duration::from_secs(3),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_reaches_the_running_sidecar_without_a_restart() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let _serial = serial().await;
    let node = node().await;
    let shop = Shop::deploy(
        node,
        "rotate",
        ShopOptions {
            edit: Some(|y| {
                y.replace(
                    "    managed:\n",
                    "    managed:\n      passwordRotationSeconds: 60\n",
                )
            }),
            ..ShopOptions::default()
        },
    )
    .await;
    let app_pod = shop.pod(node).await;
    let redis_pod = shop
        .live_pod(node, "app.kubernetes.io/name=wtc-redis")
        .await
        .expect("the Redis pod");
    let restarts = |pod: &serde_json::Value| {
        crate::container_status(pod, "wtc-sidecar").map(|c| c["restartCount"].clone())
    };
    let app = shop.app(node).await;
    for i in 0..10 {
        let r = wtc_tests::reply(
            app.http
                .put(format!("{}/accounts/k{i}", app.base))
                .json(&serde_json::json!({"n": i})),
        )
        .await
        .unwrap();
        assert!(r.status < 300, "{}", r.raw);
    }

    // Traffic through the application for the whole rotation: what fails, what is served from
    // Redis (`hit`) and what goes around it (`bypass`, Redis refused or unreachable).
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // done, failed, hit, bypass
    // When each read around Redis happened (Unix seconds), to compare with the rotation's
    // deadline.
    let bypassed_at = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let traffic = {
        let (app, stop, counts) = (Arc::clone(&app), stop.clone(), counts.clone());
        let bypassed_at = bypassed_at.clone();
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let url = format!("{}/accounts/k{}", app.base, n % 10);
                let req = match n % 5 {
                    0 => app.http.put(url).json(&serde_json::json!({"n": n})),
                    _ => app.http.get(url),
                };
                counts[0].fetch_add(1, Ordering::Relaxed);
                match wtc_tests::reply(req.timeout(Duration::from_secs(5))).await {
                    Ok(r) if r.status < 300 => match r.cache.as_deref() {
                        Some("hit") => drop(counts[2].fetch_add(1, Ordering::Relaxed)),
                        Some("bypass") => {
                            counts[3].fetch_add(1, Ordering::Relaxed);
                            bypassed_at.lock().unwrap().push(unix_now());
                        }
                        _ => {}
                    },
                    other => {
                        eprintln!("rotate: failed: {other:?}");
                        counts[1].fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let old = shop.redis_password(node).await;
    let new = format!("rotated {:x}", fastrand::u64(..));
    let patch = serde_json::json!({"stringData": {"next-password": new}}).to_string();
    let started = Instant::now();
    node.kubectl(&[
        "-n",
        &shop.ns,
        "patch",
        "secret",
        "shop-redis-auth",
        "-p",
        &patch,
    ])
    .await;
    // The operator does not watch Secrets (list and watch on every Secret would be a right it
    // does not otherwise need): a rotation starts at its next pass of the cache, within 60 s.
    crate::wait_for_event_within(
        node,
        &shop.ns,
        "shop",
        "PasswordRotating",
        Duration::from_secs(90),
    )
    .await;
    let both = started.elapsed();
    assert!(
        redis_with(&shop, &old).await.is_some(),
        "the old password still works"
    );
    assert!(
        redis_with(&shop, &new).await.is_some(),
        "the new password works"
    );
    // Promoted only once Redis took it: the sidecars' password is the new one now, and the old
    // one is retired from this deadline on.
    assert_eq!(shop.redis_password(node).await, new);
    let secret = node
        .json(&["-n", &shop.ns, "get", "secret", "shop-redis-auth"])
        .await;
    let deadline: f64 = secret["metadata"]["annotations"]["wtc.dev/previous-passwords-until"]
        .as_str()
        .and_then(|u| u.parse().ok())
        .expect("the rotation's deadline");
    crate::wait_for_event_within(
        node,
        &shop.ns,
        "shop",
        "PasswordRotated",
        Duration::from_secs(120),
    )
    .await;
    let retired = started.elapsed();
    assert!(
        redis_with(&shop, &old).await.is_none(),
        "the old password is refused"
    );
    // The sidecar's connections were closed; it reconnects with the kubelet's copy of the new
    // password and serves hits again.
    let hits_at = counts[2].load(Ordering::Relaxed);
    let since = Instant::now();
    wait_for(Duration::from_secs(30), "hits after the retirement", || {
        let counts = counts.clone();
        async move { (counts[2].load(Ordering::Relaxed) > hits_at + 5).then_some(()) }
    })
    .await;
    let back = since.elapsed();
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let [done, failed, hits, bypass] = counts.each_ref().map(|c| c.load(Ordering::Relaxed));
    // Until the old password's deadline, no read went around Redis: the sidecars never held a
    // password Redis refused.
    let bypass_before = bypassed_at
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t < deadline)
        .count() as u64;
    eprintln!(
        "rotate: both passwords accepted {:.1} s after the Secret changed, the old one retired \
         at {:.1} s, hits again {:.2} s after that; {done} requests, {failed} failed, {hits} \
         hits, {bypass} around Redis ({bypass_before} before the retirement)",
        both.as_secs_f64(),
        retired.as_secs_f64(),
        back.as_secs_f64()
    );
    assert_eq!(failed, 0, "no request fails during a rotation");
    assert_eq!(bypass_before, 0, "reads around Redis before the retirement");
    // Closing the old password's connections costs each sidecar one reconnect: reads go to the
    // database for its back-off (1 s) at most.
    assert!(bypass - bypass_before <= 60, "{bypass} reads around Redis");
    // Nothing restarted: the same application pod and sidecar, the same Redis pod.
    let app_after = shop.pod(node).await;
    assert_eq!(app_after["metadata"]["uid"], app_pod["metadata"]["uid"]);
    assert_eq!(restarts(&app_after), restarts(&app_pod));
    let redis_after = shop
        .live_pod(node, "app.kubernetes.io/name=wtc-redis")
        .await
        .expect("the Redis pod");
    assert_eq!(redis_after["metadata"]["uid"], redis_pod["metadata"]["uid"]);
    assert_eq!(
        crate::container_status(&redis_after, "redis").map(|c| c["restartCount"].clone()),
        crate::container_status(&redis_pod, "redis").map(|c| c["restartCount"].clone())
    );
    shop.delete(node).await;
}
