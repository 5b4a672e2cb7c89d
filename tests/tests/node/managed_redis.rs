//! The managed Redis' production settings on the real node: its data on a PersistentVolumeClaim
//! (a local PersistentVolume here) survives the pod; its NetworkPolicy admits only the cache's
//! injected pods.

use crate::{Shop, ShopOptions, node, serial, wait_for};
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

    // The NetworkPolicy (on by default) admits only this cache's injected pods, on Redis' port.
    // Not enforced on this node: its network plugin (bridge) implements no NetworkPolicy.
    let np = node
        .json(&["-n", &shop.ns, "get", "networkpolicy", "shop-redis"])
        .await;
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        "shop"
    );
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["wtc.dev/injected-for"],
        "shop",
        "{np}"
    );
    let app = shop.pod(node).await;
    assert_eq!(app["metadata"]["labels"]["wtc.dev/injected-for"], "shop");

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
