//! The injected sidecar's settings on the real node: resources from the chart's defaults, the
//! cache and the pod's annotations; port and log level per pod; a wrong value refuses the pod.

use crate::{Shop, ShopOptions, node, ready, serial, wait_for};
use std::time::Duration;

/// Requests and limits required for every container of the namespace.
const QUOTA: &str = "apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: compute}\n\
spec: {hard: {requests.cpu: '4', requests.memory: 4Gi, limits.cpu: '8', limits.memory: 8Gi}}\n";

fn with_settings(yaml: String) -> String {
    yaml
        // The application's own container and the managed Redis must declare resources too.
        .replace(
            "          ports: [{containerPort: 8080}]\n",
            "          ports: [{containerPort: 8080}]\n          \
             env: [{name: WTC_SIDECAR_URL, value: 'http://127.0.0.1:7481'}]\n          \
             resources: {requests: {cpu: 10m, memory: 16Mi}, limits: {cpu: 200m, memory: 64Mi}}\n",
        )
        .replace(
            "      maxmemory: 64mb\n",
            "      maxmemory: 64mb\n      \
             resources: {requests: {cpu: 10m, memory: 32Mi}, limits: {cpu: 500m, memory: 128Mi}}\n",
        )
        .replace(
            "        wtc.dev/inject: shop ",
            "        wtc.dev/sidecar-port: '7481'\n        wtc.dev/sidecar-log-level: debug\n        \
             wtc.dev/sidecar-memory-limit: 96Mi\n        wtc.dev/inject: shop ",
        )
}

/// In a namespace whose ResourceQuota requires requests and limits, the application is admitted
/// with its sidecar (resources from the chart's defaults, the memory limit from its annotation),
/// which listens on the annotated port and logs at debug; the application reads its writes
/// through it. A pod whose annotation is not a quantity is refused, the message naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_pod_settings_in_a_namespace_with_a_compute_quota() {
    let _serial = serial().await;
    let node = node().await;
    let shop = Shop::deploy(
        node,
        "quota",
        ShopOptions {
            first: QUOTA,
            edit: Some(with_settings),
            ..ShopOptions::default()
        },
    )
    .await;
    let pod = shop.pod(node).await;
    let sidecar = pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "wtc-sidecar")
        .cloned()
        .expect("the sidecar");
    let res = &sidecar["resources"];
    assert_eq!(
        (
            &res["requests"]["cpu"],
            &res["requests"]["memory"],
            &res["limits"]["cpu"],
            &res["limits"]["memory"]
        ),
        (&"50m".into(), &"32Mi".into(), &"1".into(), &"96Mi".into()),
        "chart defaults, the memory limit from the pod's annotation: {res}"
    );
    assert!(
        ready(&pod, "wtc-sidecar"),
        "the sidecar is ready on port 7481 (its probes follow the port)"
    );
    let put = shop
        .exec(node, &["put", "quota", r#"{"owner": "q"}"#])
        .await
        .unwrap();
    assert!(put.starts_with("201"), "{put}");
    let get = shop.exec(node, &["get", "quota"]).await.unwrap();
    assert!(get.starts_with("200"), "{get}");
    let name = shop.pod_name(node).await;
    let logs = wait_for(
        Duration::from_secs(30),
        "debug lines in the sidecar's log",
        || {
            let (name, ns) = (name.clone(), shop.ns.clone());
            async move {
                let logs = node
                    .try_kubectl(&["-n", &ns, "logs", &name, "-c", "wtc-sidecar"])
                    .await
                    .ok()?;
                logs.contains("DEBUG").then_some(logs)
            }
        },
    )
    .await;
    assert!(logs.contains("7481"), "listening on 7481:\n{logs}");

    let bad = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: bad, namespace: {}, annotations: \
         {{wtc.dev/inject: shop, wtc.dev/sidecar-memory-limit: lots}}}}\nspec: {{containers: \
         [{{name: app, image: localhost/wtc-dev/wtc-demo-app:0.1.0, resources: {{limits: \
         {{cpu: 100m, memory: 32Mi}}}}}}]}}\n",
        shop.ns
    );
    let refused = node
        .kubectl_stdin(&["create", "-f", "-"], &bad)
        .await
        .expect_err("a pod with a wrong setting is refused");
    assert!(
        refused.contains("wtc.dev/sidecar-memory-limit") && refused.contains("lots"),
        "{refused}"
    );
    eprintln!("quota: {}", refused.trim());
    shop.delete(node).await;
}
