//! The README's upgrade procedure on the real node, version N to N+1: the CRD's chart upgraded
//! (Helm updates it, unlike a chart's crds/ folder), then the operator's chart with a new sidecar
//! image. Pods created before keep their sidecar and keep answering; pods created after get the
//! new one; a cache that pins an image keeps it.

use crate::{Shop, ShopOptions, node, probe_cache, probe_pod, repo_root, serial, wait_for};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_moves_new_pods_to_the_new_sidecar_and_old_pods_keep_working() {
    let _serial = serial().await;
    let node = node().await;
    let shop = Shop::deploy(node, "upgrade", ShopOptions::default()).await;
    let operator = node
        .json(&["-n", "wtc-system", "get", "deployment", "wtc-wtc-operator"])
        .await;
    let args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .clone();
    let current = args
        .iter()
        .filter_map(|a| a.as_str()?.strip_prefix("--sidecar-image="))
        .next()
        .expect("--sidecar-image")
        .to_string();
    let (repository, tag) = current.rsplit_once(':').unwrap();
    // N+1's sidecar: the same bits under a new tag, in the node's image store.
    let next_tag = "upgrade-next";
    let next = format!("{repository}:{next_tag}");
    let tagged = tokio::process::Command::new("ctr")
        .args(["--address", &node.containerd_socket, "-n", "k8s.io"])
        .args(["images", "tag", "--force", &current, &next])
        .output()
        .await
        .unwrap();
    assert!(
        tagged.status.success(),
        "{}",
        String::from_utf8_lossy(&tagged.stderr)
    );
    // A cache pinning the image it was made with.
    let pinned = probe_cache(&shop.ns, "pinned").replace(
        "  entities:",
        &format!("  sidecar: {{image: {current}}}\n  entities:"),
    );
    node.apply(&pinned).await;

    // The old pod answers throughout.
    let before = shop.pod(node).await;
    let app = shop.app(node).await;
    let (stop, answered, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let traffic = {
        let (app, stop, answered, failed) = (
            Arc::clone(&app),
            Arc::clone(&stop),
            Arc::clone(&answered),
            Arc::clone(&failed),
        );
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let url = format!("{}/accounts/up-{}", app.base, i % 20);
                let r = match i % 2 {
                    0 => {
                        wtc_tests::reply(app.http.put(&url).json(&serde_json::json!({"owner": i})))
                            .await
                    }
                    _ => wtc_tests::reply(app.http.get(&url)).await,
                };
                match r {
                    Ok(r) if r.status < 500 => answered.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("upgrade: request {i} failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // 1. The CRD: N+1's chart (here: a printer column renamed) replaces N's.
    let crds_next = std::env::temp_dir().join(format!("wtc-crds-next-{:x}", fastrand::u32(..)));
    std::fs::create_dir_all(crds_next.join("templates")).unwrap();
    std::fs::create_dir_all(crds_next.join("files")).unwrap();
    let src = repo_root().join("charts/wtc-crds");
    for f in ["Chart.yaml", "templates/crds.yaml"] {
        std::fs::copy(src.join(f), crds_next.join(f)).unwrap();
    }
    let crd = std::fs::read_to_string(src.join("files/writethroughcache.yaml")).unwrap();
    assert!(crd.contains("name: Age"));
    std::fs::write(
        crds_next.join("files/writethroughcache.yaml"),
        crd.replace("name: Age", "name: Created"),
    )
    .unwrap();
    let columns = || async {
        let crd = node
            .json(&["get", "crd", "writethroughcaches.wtc.dev"])
            .await;
        crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let started = Instant::now();
    node.helm(&[
        "upgrade",
        "wtc-crds",
        crds_next.to_str().unwrap(),
        "-n",
        "wtc-system",
        "--wait",
    ])
    .await;
    assert!(
        columns().await.contains(&"Created".to_string()),
        "helm upgrade did not update the CRD"
    );
    let crd = node
        .json(&["get", "crd", "writethroughcaches.wtc.dev"])
        .await;
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "uninstalling the CRD's chart would delete every cache"
    );

    // 2. The operator: N+1's chart, the new sidecar image.
    sidecar_tag(node, next_tag).await;
    let upgraded = started.elapsed();

    // New pods get the new sidecar (once the new operator answers the webhook).
    let sidecar_image = |pod: &serde_json::Value| {
        pod["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(pod["spec"]["containers"].as_array().into_iter().flatten())
            .find(|c| c["name"] == "wtc-sidecar")
            .and_then(|c| c["image"].as_str())
            .map(str::to_string)
    };
    let dry_run = |cache: &str| {
        let pod = probe_pod(&shop.ns, &format!("dry-{cache}"), cache);
        async move {
            let out = node
                .kubectl_stdin(
                    &["create", "--dry-run=server", "-o", "json", "-f", "-"],
                    &pod,
                )
                .await
                .ok()?;
            sidecar_image(&serde_json::from_str(&out).ok()?)
        }
    };
    wait_for(
        Duration::from_secs(60),
        "new pods to get the new sidecar",
        || async { (dry_run("shop").await? == next).then_some(()) },
    )
    .await;
    assert_eq!(
        dry_run("pinned").await.as_deref(),
        Some(current.as_str()),
        "a pinned image moved"
    );
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    // Now the application's own rollout (its old pod goes): a new pod, the new sidecar.
    node.kubectl(&["-n", &shop.ns, "rollout", "restart", "deployment/app"])
        .await;
    node.rollout_status(&shop.ns, "app").await.unwrap();
    let (ok, bad) = (
        answered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "upgrade: CRD and operator upgraded in {:.1} s; the old pod answered {ok} requests during it, {bad} failed",
        upgraded.as_secs_f64()
    );
    assert!(ok > 20, "too little traffic to judge: {ok}");
    assert_eq!(
        bad, 0,
        "requests to the pod created before the upgrade failed"
    );
    // The old pod kept its sidecar (no restart), the new one runs the new image and answers.
    assert_eq!(sidecar_image(&before).as_deref(), Some(current.as_str()));
    let after = shop.pod(node).await;
    assert_ne!(after["metadata"]["name"], before["metadata"]["name"]);
    assert_eq!(sidecar_image(&after).as_deref(), Some(next.as_str()));
    let put = shop
        .exec(node, &["put", "after", r#"{"owner": "n+1"}"#])
        .await
        .unwrap();
    assert!(put.starts_with("201 ok"), "{put}");
    let get = shop.exec(node, &["get", "after"]).await.unwrap();
    assert!(get.starts_with("200 "), "{get}");

    // Back to N for the other tests (and a downgrade works the same way).
    node.helm(&[
        "upgrade",
        "wtc-crds",
        src.to_str().unwrap(),
        "-n",
        "wtc-system",
        "--wait",
    ])
    .await;
    assert!(columns().await.contains(&"Age".to_string()));
    sidecar_tag(node, tag).await;
    wait_for(
        Duration::from_secs(60),
        "the operator back on N",
        || async { (dry_run("shop").await? == current).then_some(()) },
    )
    .await;
    let _ = std::fs::remove_dir_all(&crds_next);
    shop.delete(node).await;
}

/// `helm upgrade` of the operator's chart to the sidecar image `tag`, the rest as it was.
async fn sidecar_tag(node: &crate::Node, tag: &str) {
    let chart = repo_root().join("charts/wtc-operator");
    let set = format!("sidecarImage.tag={tag}");
    node.helm(&[
        "upgrade",
        "wtc",
        chart.to_str().unwrap(),
        "-n",
        "wtc-system",
        "--reset-then-reuse-values",
        "--set",
        &set,
        "--wait",
        "--timeout",
        "180s",
    ])
    .await;
}
