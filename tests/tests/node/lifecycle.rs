//! Day two on the real node: what deleting a cache does to the pods that use it.

use crate::{Shop, ShopOptions, node, ready, serial, wait_for, wait_for_event};
use std::time::{Duration, Instant};

/// `kubectl delete wtc` of a cache a running application uses waits: the cache stays, an Event
/// names the pods, and the application's pod restarted meanwhile gets its sidecar and reads its
/// earlier write through it. Once the application is gone, the cache goes, and with it what it
/// owned (ConfigMap, managed Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_cache_in_use_waits_for_its_pods() {
    let _serial = serial().await;
    let node = node().await;
    let shop = Shop::deploy(node, "inuse", ShopOptions::default()).await;
    let ns = shop.ns.clone();
    let put = shop
        .exec(node, &["put", "kept", r#"{"owner": "k"}"#])
        .await
        .unwrap();
    assert!(put.starts_with("201"), "{put}");
    let old = shop.pod_name(node).await;

    node.kubectl(&["-n", &ns, "delete", "wtc", "shop", "--wait=false"])
        .await;
    let waiting = wait_for_event(node, &ns, "shop", "DeletionWaiting").await;
    assert!(waiting[0].contains(&old), "{waiting:?}");
    let cache = node.json(&["-n", &ns, "get", "wtc", "shop"]).await;
    assert!(
        !cache["metadata"]["deletionTimestamp"].is_null(),
        "the cache is being deleted: {cache}"
    );
    eprintln!("inuse: {}", waiting[0]);

    // The application's pod restarted while the deletion waits: it still gets its sidecar.
    node.kubectl(&["-n", &ns, "delete", "pod", &old, "--wait=false"])
        .await;
    wait_for(
        Duration::from_secs(120),
        "the new pod with its sidecar ready",
        || async {
            let pod = shop.live_pod(node, "app=shop-app").await?;
            (pod["metadata"]["name"] != old.as_str()
                && ready(&pod, "wtc-sidecar")
                && ready(&pod, "app"))
            .then_some(())
        },
    )
    .await;
    let get = shop.exec(node, &["get", "kept"]).await.unwrap();
    assert!(
        get.starts_with("200"),
        "read through the restarted pod's sidecar: {get}"
    );

    // The application goes: so does the cache, and what it owned.
    node.kubectl(&["-n", &ns, "delete", "deployment", "app", "--wait=false"])
        .await;
    let started = Instant::now();
    wait_for(Duration::from_secs(90), "the cache deleted", || async {
        node.try_kubectl(&["-n", &ns, "get", "wtc", "shop"])
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let took = started.elapsed();
    wait_for(
        Duration::from_secs(60),
        "the ConfigMap and managed Redis collected",
        || async {
            let cm = node
                .try_kubectl(&["-n", &ns, "get", "configmap", "shop-sidecar"])
                .await;
            let redis = node
                .try_kubectl(&["-n", &ns, "get", "deployment", "shop-redis"])
                .await;
            (cm.is_err() && redis.is_err()).then_some(())
        },
    )
    .await;
    eprintln!(
        "inuse: the cache was deleted {:.1} s after its last application was",
        took.as_secs_f64()
    );
    shop.delete(node).await;
}

/// The hash of the configuration a pod's sidecar started with, and its cache's now; `None`
/// while the application has no pod that is not being deleted (between an eviction and its
/// replacement).
async fn hashes(node: &crate::Node, shop: &Shop) -> Option<(Option<String>, Option<String>)> {
    let pod = shop.live_pod(node, "app=shop-app").await?;
    let cm = node
        .json(&["-n", &shop.ns, "get", "configmap", "shop-sidecar"])
        .await;
    let get = |v: &serde_json::Value| {
        v["metadata"]["annotations"]["wtc.dev/config-hash"]
            .as_str()
            .map(String::from)
    };
    Some((get(&pod), get(&cm)))
}

/// `kubectl patch wtc shop` with a JSON patch (`json`) or a merge patch.
async fn patch_shop(node: &crate::Node, ns: &str, kind: &str, patch: &str) {
    node.kubectl(&[
        "-n",
        ns,
        "patch",
        "wtc",
        "shop",
        &format!("--type={kind}"),
        "-p",
        patch,
    ])
    .await;
}

fn set_ttl(ttl: u64) -> String {
    format!(r#"[{{"op": "replace", "path": "/spec/entities/0/ttlSeconds", "value": {ttl}}}]"#)
}

fn set_pool_size(size: u32) -> String {
    format!(r#"[{{"op": "replace", "path": "/spec/database/poolSize", "value": {size}}}]"#)
}

/// The TTL Redis holds for a fresh write of `key` through the application.
async fn written_ttl(node: &crate::Node, shop: &Shop, key: &str) -> Option<i64> {
    let app = shop.app(node).await;
    let put = wtc_tests::reply(
        app.http
            .put(format!("{}/accounts/{key}", app.base))
            .json(&serde_json::json!({"owner": "t"})),
    )
    .await
    .ok()?;
    if put.status >= 300 {
        return None;
    }
    let mut redis = shop.redis(node).await;
    redis::cmd("PTTL")
        .arg(wtc_tests::entry_key("accounts", key))
        .query_async(&mut redis)
        .await
        .ok()
}

/// A change of the cache's configuration reaches the running application. A TTL is reloaded by
/// the running sidecar from its mounted ConfigMap: no restart, not counted as outdated. A change
/// only a restart applies (the pool size) counts the pod in `status.outdatedPods` with an
/// Event; once the cache asks for restarts, the pod is evicted and recreated with it. The
/// figures: from each change to the sidecar running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_change_reaches_the_running_sidecars() {
    let _serial = serial().await;
    let node = node().await;
    let shop = Shop::deploy(node, "config", ShopOptions::default()).await;
    let ns = shop.ns.clone();
    let (pod_hash, cache_hash) = hashes(node, &shop).await.expect("the application's pod");
    assert!(
        pod_hash.is_some() && pod_hash == cache_hash,
        "{pod_hash:?} {cache_hash:?}"
    );

    // A TTL: reloaded in place (the kubelet updates the file, the sidecar reads it again).
    let before = shop.pod(node).await;
    let sidecar_restarts = |pod: &serde_json::Value| {
        crate::container_status(pod, "wtc-sidecar").map(|c| c["restartCount"].clone())
    };
    let changed = Instant::now();
    patch_shop(node, &ns, "json", &set_ttl(120)).await;
    let mut n = 0;
    wait_for(
        Duration::from_secs(120),
        "the running sidecar writing with the new TTL",
        || {
            n += 1;
            let key = format!("ttl{n}");
            let shop = &shop;
            async move {
                let ttl = written_ttl(node, shop, &key).await?;
                (ttl > 0 && ttl <= 120_000).then_some(())
            }
        },
    )
    .await;
    let reloaded = changed.elapsed();
    let after = shop.pod(node).await;
    assert_eq!(
        after["metadata"]["uid"], before["metadata"]["uid"],
        "same pod"
    );
    assert_eq!(sidecar_restarts(&after), sidecar_restarts(&before));
    assert_eq!(shop.cache_status(node).await["outdatedPods"], 0);
    eprintln!(
        "config: a TTL change reached the running sidecar {:.1} s after the cache's change (the \
         kubelet's ConfigMap update, syncFrequency 10 s here, and the sidecar's 2 s check), no \
         restart",
        reloaded.as_secs_f64()
    );

    // A change that takes a restart, while restarts are off: counted and told, nothing restarted.
    let old = shop.pod_name(node).await;
    patch_shop(node, &ns, "json", &set_pool_size(9)).await;
    wait_for(Duration::from_secs(60), "status.outdatedPods 1", || async {
        (shop.cache_status(node).await["outdatedPods"] == 1).then_some(())
    })
    .await;
    let told = wait_for_event(node, &ns, "shop", "PodsOnOldConfiguration").await;
    eprintln!("config: {}", told[0]);
    assert_eq!(shop.pod_name(node).await, old, "restarts are off");

    // Restarts on, then a second change: timed from the change to the new sidecar running it.
    patch_shop(
        node,
        &ns,
        "merge",
        r#"{"spec": {"injection": {"restartOnConfigChange": true}}}"#,
    )
    .await;
    wait_for(
        Duration::from_secs(120),
        "the pod on the first change",
        || async {
            let (p, c) = hashes(node, &shop).await?;
            (p == c).then_some(())
        },
    )
    .await;
    let changed = Instant::now();
    patch_shop(node, &ns, "json", &set_pool_size(7)).await;
    wait_for(
        Duration::from_secs(120),
        "the sidecar on the new configuration, ready",
        || async {
            let pod = shop.live_pod(node, "app=shop-app").await?;
            let (p, c) = hashes(node, &shop).await?;
            (p == c && ready(&pod, "wtc-sidecar") && ready(&pod, "app")).then_some(())
        },
    )
    .await;
    let took = changed.elapsed();
    wait_for(Duration::from_secs(30), "status.outdatedPods 0", || async {
        (shop.cache_status(node).await["outdatedPods"] == 0).then_some(())
    })
    .await;
    // The new sidecar runs the whole file: the reloaded TTL too.
    let ttl = wait_for(
        Duration::from_secs(30),
        "a write through the new pod",
        || written_ttl(node, &shop, "after-roll"),
    )
    .await;
    assert!(
        ttl > 0 && ttl <= 120_000,
        "PTTL {ttl} ms: not the 120 s TTL"
    );
    eprintln!(
        "config: from a pool size change to the application's sidecar running it: {:.1} s \
         (watchdog every 5 s, one eviction, the pod recreated and Ready)",
        took.as_secs_f64()
    );
    shop.delete(node).await;
}
