//! Day two on the real node: what deleting a cache does to the pods that use it.

use crate::{Shop, ShopOptions, container_status, events, node, serial, wait_for};
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
    let waiting = wait_for(
        Duration::from_secs(30),
        "the DeletionWaiting event",
        || async {
            let e = events(node, &ns, "shop", "DeletionWaiting").await;
            (!e.is_empty()).then_some(e)
        },
    )
    .await;
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
                && container_status(&pod, "wtc-sidecar").is_some_and(|c| c["ready"] == true)
                && container_status(&pod, "app").is_some_and(|c| c["ready"] == true))
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
