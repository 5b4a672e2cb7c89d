//! The control plane starts, kubectl and kube::Client work, and a Deployment is reconciled by
//! the real controller-manager, scheduler and kwok, then garbage-collected.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use wtc_k8s_harness::shared;

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            let cp = shared();
            let pods = cp
                .kubectl()
                .args(["get", "pods,rs,deploy,nodes", "-A", "-o", "wide"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            panic!(
                "timed out waiting for {what}\n{pods}\n{}",
                cp.log_tails(3000)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn kubectl_get_namespaces() {
    let cp = shared();
    let out = cp
        .kubectl()
        .args(["get", "ns", "-o", "name"])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("namespace/default"), "{stdout}");
    assert!(stdout.contains("namespace/kube-system"), "{stdout}");

    let out = cp
        .kubectl()
        .arg("version")
        .output()
        .expect("run kubectl version");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Server Version: v1.36."),
        "unexpected kubectl version output: {stdout}"
    );
}

#[tokio::test]
async fn kube_client_lists_namespaces_and_server_version() {
    let cp = shared();
    let client = cp.client();
    let info = client.apiserver_version().await.expect("version");
    assert_eq!(info.major, "1");
    assert_eq!(info.minor, "36");
    assert!(info.git_version.starts_with("v1.36."), "{info:?}");
    let nss: Api<Namespace> = Api::all(client);
    let names: Vec<String> = nss
        .list(&ListParams::default())
        .await
        .expect("list namespaces")
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(names.iter().any(|n| n == "kube-system"), "{names:?}");
}

#[tokio::test]
async fn service_account_token_authenticates_with_rbac() {
    let cp = shared();
    let ns = cp.namespace("sa-token").await.expect("namespace");
    let sa_client = cp
        .service_account_client(ns.name(), "default")
        .await
        .expect("service account client");
    // The default ServiceAccount has no RBAC permissions: authenticated, but forbidden.
    let pods: Api<Pod> = Api::namespaced(sa_client, ns.name());
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(
                s.message
                    .contains(&format!("system:serviceaccount:{}:default", ns.name())),
                "{s:?}"
            );
        }
        other => panic!("expected 403 for the default ServiceAccount, got {other:?}"),
    }
    // The same identity through a kubeconfig file, as a separate process would use it.
    let kubeconfig = cp
        .service_account_kubeconfig(ns.name(), "default")
        .await
        .expect("service account kubeconfig");
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .output()
        .expect("run kubectl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("system:serviceaccount:{}:default", ns.name()),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn deployment_becomes_ready_pods_and_is_garbage_collected() {
    let cp = shared();
    let ns = cp.namespace("smoke-deploy").await.expect("namespace");
    let deployments: Api<Deployment> = ns.api();
    let replicasets: Api<ReplicaSet> = ns.api();
    let pods: Api<Pod> = ns.api();

    let deploy: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]}
            }
        }
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deploy)
        .await
        .expect("create deployment");

    let rs_name = eventually("a ReplicaSet", Duration::from_secs(60), || async {
        replicasets
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|rs| {
                rs.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.kind == "Deployment" && o.name == "web")
            })
            .and_then(|rs| rs.metadata.name)
    })
    .await;

    eventually(
        "2 Running and Ready pods",
        Duration::from_secs(90),
        || async {
            let list = pods.list(&ListParams::default()).await.ok()?;
            let ready = list
                .items
                .iter()
                .filter(|p| {
                    let st = p.status.as_ref();
                    let running = st.and_then(|s| s.phase.as_deref()) == Some("Running");
                    let is_ready = st.and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
                        c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                    });
                    let owned = p
                        .metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.kind == "ReplicaSet" && o.name == rs_name);
                    let scheduled = p.spec.as_ref().is_some_and(|s| s.node_name.is_some());
                    running && is_ready && owned && scheduled
                })
                .count();
            (ready == 2).then_some(())
        },
    )
    .await;

    eventually(
        "deployment availableReplicas=2",
        Duration::from_secs(60),
        || async {
            let d = deployments.get("web").await.ok()?;
            (d.status?.available_replicas == Some(2)).then_some(())
        },
    )
    .await;

    deployments
        .delete("web", &DeleteParams::background())
        .await
        .expect("delete deployment");

    eventually(
        "ReplicaSet and Pods garbage-collected",
        Duration::from_secs(90),
        || async {
            let rs = replicasets.list(&ListParams::default()).await.ok()?;
            let ps = pods.list(&ListParams::default()).await.ok()?;
            (rs.items.is_empty() && ps.items.is_empty()).then_some(())
        },
    )
    .await;
}
