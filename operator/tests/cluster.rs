//! The operator against a real control plane (etcd, kube-apiserver, controller-manager, scheduler
//! and kwok from `scripts/k8s-testbin`): the CRD as users apply it, the controller, the webhook.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::process::Output;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};
use wtc_k8s_harness::{ControlPlane, shared};
use wtc_operator::certs::WebhookCerts;
use wtc_operator::crd::WriteThroughCache;
use wtc_operator::metrics::Metrics;
use wtc_operator::resources::Release;
use wtc_operator::webhook::{self, Endpoint, Webhook};

const CRD_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crds/writethroughcache.yaml"
);
const CHART_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/wtc-operator");

/// The control plane with the CRD applied from `crds/`, as a user would (`kubectl apply -f crds/`).
fn cluster() -> &'static ControlPlane {
    static CRD: Once = Once::new();
    let cp = shared();
    CRD.call_once(|| {
        let out = cp
            .kubectl()
            .args(["apply", "-f", CRD_FILE])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl apply -f crds/: {}",
            stderr(&out)
        );
        let out = cp
            .kubectl()
            .args([
                "wait",
                "--for",
                "condition=established",
                "crd/writethroughcaches.wtc.dev",
                "--timeout=60s",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "CRD not established: {}",
            stderr(&out)
        );
    });
    cp
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn kubectl_apply(cp: &ControlPlane, ns: &str, yaml: &str) -> Output {
    use std::io::Write;
    let mut child = cp
        .kubectl()
        .args(["apply", "-n", ns, "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn cache_yaml(name: &str, redis: &str) -> String {
    format!(
        r#"apiVersion: wtc.dev/v1alpha1
kind: WriteThroughCache
metadata:
  name: {name}
spec:
  database:
    urlSecret: {{name: app-db, key: url}}
  entities:
    - name: accounts
      table: accounts
  redis:
{redis}
"#
    )
}

/// The controller, watching `ns` only, until the test aborts it.
fn controller(client: &kube::Client, ns: &str) -> tokio::task::JoinHandle<()> {
    controller_with_metrics(client, ns).0
}

/// `controller`, and its metrics.
fn controller_with_metrics(
    client: &kube::Client,
    ns: &str,
) -> (tokio::task::JoinHandle<()>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let task = tokio::spawn(wtc_operator::reconcile::run(
        client.clone(),
        Arc::clone(&metrics),
        Some(ns.to_string()),
        Release::default(),
        std::future::pending(),
    ));
    (task, metrics)
}

/// The `wtc_operator_reconcile_errors_total` series counted so far.
fn reconcile_errors(metrics: &Metrics) -> Vec<String> {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("wtc_operator_reconcile_errors_total{"))
        .map(String::from)
        .collect()
}

/// `cache_yaml`'s Redis lines for an external Redis, and the commit stream on.
const STREAM_ON: &str =
    "    external: {urlSecret: {name: r, key: url}}\n  commitStream: {enabled: true}";

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
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            shared().log_tails(2000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn invalid_caches_are_rejected_with_a_readable_message() {
    let cp = cluster();
    let ns = cp.namespace("wtc-invalid").await.unwrap();
    let cases = [
        (
            "no-db",
            "apiVersion: wtc.dev/v1alpha1\nkind: WriteThroughCache\nmetadata: {name: no-db}\nspec:\n  entities: [{name: a, table: a}]\n  redis: {managed: {}}\n".to_string(),
            "spec.database: Required value",
        ),
        (
            "dup",
            cache_yaml("dup", "    managed: {}").replace(
                "    - name: accounts\n      table: accounts\n",
                "    - {name: accounts, table: a}\n    - {name: accounts, table: b}\n",
            ),
            "entity names must be unique",
        ),
        (
            "both",
            cache_yaml("both", "    managed: {}\n    external: {urlSecret: {name: r, key: url}}"),
            "set exactly one of redis.managed and redis.external",
        ),
        ("neither", cache_yaml("neither", "    {}"), "set exactly one of redis.managed and redis.external"),
        (
            "bad-name",
            cache_yaml("bad-name", "    managed: {}").replace("name: accounts", "name: Accounts!"),
            "spec.entities[0].name",
        ),
    ];
    for (name, yaml, expected) in cases {
        let out = kubectl_apply(cp, ns.name(), &yaml);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(
            stderr(&out).contains(expected),
            "{name}: {:?} should contain {expected:?}",
            stderr(&out)
        );
    }
    let ok = kubectl_apply(cp, ns.name(), &cache_yaml("fine", "    managed: {}"));
    assert!(ok.status.success(), "{}", stderr(&ok));
    // Defaults come from the schema.
    let api: Api<WriteThroughCache> = ns.api();
    let fine = api.get("fine").await.unwrap();
    assert_eq!(fine.spec.entities[0].key_column, "id");
    assert_eq!(fine.spec.redis.managed.unwrap().maxmemory, "256mb");
    let out = cp
        .kubectl()
        .args(["get", "wtc", "-n", ns.name()])
        .output()
        .unwrap();
    let header = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    for col in ["NAME", "READY", "REDIS", "INJECTED", "AGE"] {
        assert!(
            header.contains(col),
            "kubectl get wtc: {header:?} lacks {col}"
        );
    }
}

#[tokio::test]
async fn controller_creates_owned_objects_reports_ready_and_follows_changes() {
    let cp = cluster();
    let client = cp.client();
    let ns = cp.namespace("wtc-reconcile").await.unwrap();
    let controller = controller(&client, ns.name());
    let out = kubectl_apply(
        cp,
        ns.name(),
        &cache_yaml("orders", "    managed: {maxmemory: 64mb}"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let caches: Api<WriteThroughCache> = ns.api();
    let uid = caches.get("orders").await.unwrap().uid().unwrap();

    let deployments: Api<Deployment> = ns.api();
    let services: Api<Service> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let config_maps: Api<ConfigMap> = ns.api();
    let d = eventually("the Redis Deployment", Duration::from_secs(30), || async {
        deployments.get_opt("orders-redis").await.unwrap()
    })
    .await;
    let owned_by_cache =
        |o: &Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
            o.iter()
                .flatten()
                .any(|r| r.uid == uid && r.controller == Some(true))
        };
    assert!(owned_by_cache(&d.metadata.owner_references));
    assert!(owned_by_cache(
        &services
            .get("orders-redis")
            .await
            .unwrap()
            .metadata
            .owner_references
    ));
    let secret = secrets.get("orders-redis-auth").await.unwrap();
    assert!(owned_by_cache(&secret.metadata.owner_references));
    let cm = config_maps.get("orders-sidecar").await.unwrap();
    assert!(owned_by_cache(&cm.metadata.owner_references));
    assert!(cm.data.unwrap()["sidecar.toml"].contains("table = \"accounts\""));

    // controller-manager + scheduler + kwok make the Deployment Available; status follows.
    let ready = eventually("Ready=True", Duration::from_secs(90), || async {
        let c = caches.get("orders").await.unwrap();
        let st = c.status.clone()?;
        let ready = st
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && st.observed_generation == c.metadata.generation).then_some(c)
    })
    .await;
    let status = ready.status.unwrap();
    assert_eq!(
        status.redis_endpoint.as_deref(),
        Some(format!("orders-redis.{}.svc:6379", ns.name()).as_str())
    );
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "RedisReady" && c.status == "True")
    );

    // A spec change reaches the objects; the password survives reconciles.
    let password = secret.data.unwrap()["password"].clone();
    caches
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"redis": {"managed": {"maxmemory": "128mb"}}, "entities": [{"name": "accounts", "table": "accounts", "ttlSeconds": 60}]}})),
        )
        .await
        .unwrap();
    eventually("the new maxmemory", Duration::from_secs(30), || async {
        let d = deployments.get("orders-redis").await.unwrap();
        let args = d.spec?.template.spec?.containers[0].args.clone()?;
        args.windows(2)
            .any(|w| w == ["--maxmemory", "128mb"])
            .then_some(())
    })
    .await;
    eventually(
        "the new TTL in the sidecar config",
        Duration::from_secs(30),
        || async {
            let cm = config_maps.get("orders-sidecar").await.unwrap();
            cm.data?
                .get("sidecar.toml")?
                .contains("ttl_seconds = 60")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        secrets
            .get("orders-redis-auth")
            .await
            .unwrap()
            .data
            .unwrap()["password"],
        password
    );

    // Drift is corrected.
    deployments
        .patch(
            "orders-redis",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    eventually("drift corrected", Duration::from_secs(30), || async {
        let d = deployments.get("orders-redis").await.unwrap();
        (d.spec?.replicas == Some(1)).then_some(())
    })
    .await;

    // Switching to external Redis removes the managed objects.
    caches
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"redis": {"managed": null, "external": {"urlSecret": {"name": "r", "key": "url"}}}}})),
        )
        .await
        .unwrap();
    eventually("managed Redis removed", Duration::from_secs(30), || async {
        (deployments.get_opt("orders-redis").await.unwrap().is_none()
            && secrets
                .get_opt("orders-redis-auth")
                .await
                .unwrap()
                .is_none())
        .then_some(())
    })
    .await;

    // Deleting the cache lets the garbage collector remove what it owned.
    caches
        .delete("orders", &DeleteParams::background())
        .await
        .unwrap();
    eventually("garbage collection", Duration::from_secs(60), || async {
        config_maps
            .get_opt("orders-sidecar")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    controller.abort();
}

#[tokio::test]
async fn webhook_injects_opted_in_pods_and_never_blocks_the_others() {
    let cp = cluster();
    let client = cp.client();
    let ns = cp.namespace("wtc-inject").await.unwrap();
    let out = kubectl_apply(cp, ns.name(), &cache_yaml("orders", "    managed: {}"));
    assert!(out.status.success(), "{}", stderr(&out));

    let certs = WebhookCerts::generate(&["127.0.0.1".to_string()], time::OffsetDateTime::now_utc())
        .unwrap();
    let native = webhook::supports_native_sidecars(&client).await;
    assert!(
        native,
        "the test cluster runs Kubernetes {} with native sidecars",
        wtc_k8s_harness::KUBERNETES_MINOR
    );
    let hook = Arc::new(
        Webhook::new(
            client.clone(),
            Arc::new(Metrics::default()),
            native,
            Release::default(),
            &certs,
        )
        .unwrap(),
    );
    let listener = Webhook::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(Arc::clone(&hook).serve(listener));
    let config_name = format!("wtc-test-{}", ns.name());
    let config = webhook::configuration(
        &config_name,
        &Endpoint::Url(format!("https://127.0.0.1:{port}")),
        Some(&certs.ca_pem),
        "wtc-system",
        None,
        webhook::Calling::default(),
        None,
    );
    webhook::apply_configuration(&client, &config)
        .await
        .unwrap();

    let pods: Api<Pod> = ns.api();
    let pod = |name: &str, annotated: bool| -> Pod {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        }))
        .unwrap();
        if annotated {
            p.annotations_mut()
                .insert("wtc.dev/inject".into(), "orders".into());
        }
        p
    };
    // The configuration takes a moment to reach the API server's webhook cache.
    let injected = eventually("an injected pod", Duration::from_secs(30), || async {
        let name = format!("app-{}", fastrand::u32(..));
        let p = pods
            .create(&PostParams::default(), &pod(&name, true))
            .await
            .unwrap();
        let has = p
            .spec
            .as_ref()?
            .init_containers
            .iter()
            .flatten()
            .any(|c| c.name == "wtc-sidecar");
        has.then_some(p)
    })
    .await;
    let spec = injected.spec.unwrap();
    let sidecar = spec
        .init_containers
        .unwrap()
        .into_iter()
        .find(|c| c.name == "wtc-sidecar")
        .unwrap();
    assert_eq!(
        sidecar.restart_policy.as_deref(),
        Some("Always"),
        "native sidecar"
    );
    assert!(sidecar.readiness_probe.is_some());
    for e in sidecar.env.unwrap() {
        // No credentials inline: the database URL by secretKeyRef, the managed Redis' password
        // from a mounted file, never a variable.
        assert!(
            e.name == "WTC_REDIS_PASSWORD_FILE" || !e.name.contains("PASSWORD"),
            "{}",
            e.name
        );
        assert!(
            !e.value.as_deref().unwrap_or("").contains('@'),
            "{}",
            e.name
        );
        if e.name == "WTC_DATABASE_URL" {
            assert!(
                e.value.is_none() && e.value_from.unwrap().secret_key_ref.is_some(),
                "{} by secretKeyRef",
                e.name
            );
        }
    }
    assert!(spec.volumes.unwrap().iter().any(|v| {
        v.config_map
            .as_ref()
            .is_some_and(|c| c.name == "orders-sidecar")
    }));
    assert_eq!(
        injected.metadata.labels.unwrap()["wtc.dev/injected-for"],
        "orders"
    );

    let plain = pods
        .create(&PostParams::default(), &pod("plain", false))
        .await
        .unwrap();
    assert_eq!(
        plain
            .spec
            .unwrap()
            .init_containers
            .unwrap_or_default()
            .len(),
        0
    );
    assert_eq!(
        plain
            .metadata
            .labels
            .unwrap_or_default()
            .get("wtc.dev/injected-for"),
        None
    );

    // A namespace that opted out is never sent to the webhook.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let excluded = format!("{}-off", ns.name());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": excluded, "labels": {"wtc.dev/injection": "disabled"}}})).unwrap(),
        )
        .await
        .unwrap();
    let other: Api<Pod> = Api::namespaced(client.clone(), &excluded);
    let p = eventually(
        "a pod in the excluded namespace",
        Duration::from_secs(30),
        || async {
            other
                .create(&PostParams::default(), &pod("app", true))
                .await
                .ok()
        },
    )
    .await;
    assert!(
        p.spec
            .unwrap()
            .init_containers
            .unwrap_or_default()
            .is_empty()
    );

    // With the operator down (nothing listening where the webhook points), pods are still
    // created: failurePolicy Ignore.
    server.abort();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = webhook::configuration(
        &config_name,
        &Endpoint::Url(format!("https://127.0.0.1:{closed}")),
        Some(&certs.ca_pem),
        "wtc-system",
        None,
        webhook::Calling::default(),
        None,
    );
    webhook::apply_configuration(&client, &down).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = pods
        .create(&PostParams::default(), &pod("while-down", true))
        .await
        .unwrap();
    assert_eq!(p.name_any(), "while-down");

    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    configs
        .delete(&config_name, &DeleteParams::default())
        .await
        .unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator binary as a process of the test, authenticated with the ServiceAccount token in
/// `kubeconfig` only, scoped to `ns`, its webhook on loopback.
struct OperatorProcess {
    child: tokio::process::Child,
    webhook_port: u16,
    metrics_port: u16,
    log_path: std::path::PathBuf,
}

impl OperatorProcess {
    fn spawn(release_ns: &str, name: &str, ns: &str, kubeconfig: &std::path::Path) -> Self {
        let (webhook_port, metrics_port) = (free_port(), free_port());
        let log_path =
            std::env::temp_dir().join(format!("wtc-operator-{}-{name}.log", std::process::id()));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wtc-operator"))
            .args(["run", "--operator-namespace", release_ns])
            .args([
                "--webhook-url",
                &format!("https://127.0.0.1:{webhook_port}"),
            ])
            .args(["--webhook-addr", &format!("127.0.0.1:{webhook_port}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args([
                "--webhook-config",
                name,
                "--webhook-cert-secret",
                &format!("{name}-webhook-tls"),
            ])
            .args(["--owner-cluster-role", name])
            .args(["--leader-election-lease", name])
            .args(["--namespace", ns])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self {
            child,
            webhook_port,
            metrics_port,
            log_path,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Leader, no reconcile error, nothing refused by RBAC; its metrics.
    async fn assert_healthy(&self) -> String {
        let metrics = reqwest_like_get(self.metrics_port, "/metrics").await;
        // It took the leader lease with the chart's Role (namespaced, by name).
        assert!(
            metrics.lines().any(|l| l == "wtc_operator_leader 1"),
            "{metrics}"
        );
        assert!(
            !metrics.contains("wtc_operator_reconcile_errors_total{"),
            "reconcile errors:\n{metrics}\n{}",
            self.log()
        );
        let log = self.log();
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "RBAC refused something:\n{log}"
        );
        metrics
    }

    /// The chart's operator `name` on its ServiceAccount's token (returned), scoped to `ns`,
    /// the webhook pointed at it, and a cache `shop` with managed Redis made Ready by it.
    async fn with_ready_cache(
        cp: &ControlPlane,
        release_ns: &str,
        name: &str,
        ns: &wtc_k8s_harness::TestNamespace,
    ) -> (Self, std::path::PathBuf) {
        let kubeconfig = cp
            .service_account_kubeconfig(release_ns, name)
            .await
            .unwrap();
        let mut operator = Self::spawn(release_ns, name, ns.name(), &kubeconfig);
        point_webhook_at(cp, name, operator.webhook_port);
        let out = kubectl_apply(cp, ns.name(), &cache_yaml("shop", "    managed: {}"));
        assert!(out.status.success(), "{}", stderr(&out));
        operator.wait_ready(&ns.api(), "shop").await;
        (operator, kubeconfig)
    }

    /// Waits until the cache `name` is Ready, failing with the operator's log.
    async fn wait_ready(&mut self, caches: &Api<WriteThroughCache>, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("the operator exited ({st}):\n{}", self.log());
            }
            let c = caches.get(name).await.unwrap();
            let ready = c
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not Ready: {:?}\n{}",
                c.status,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The chart's webhook points at its Service; the operator of these tests runs on the host, so
/// an administrator (not the operator) points it at the operator's loopback port.
fn point_webhook_at(cp: &ControlPlane, config: &str, port: u16) {
    let patch = json!([
        {"op": "remove", "path": "/webhooks/0/clientConfig/service"},
        {"op": "add", "path": "/webhooks/0/clientConfig/url", "value": format!("https://127.0.0.1:{port}/mutate")},
    ]);
    let out = cp
        .kubectl()
        .args([
            "patch",
            "mutatingwebhookconfiguration",
            config,
            "--type=json",
        ])
        .args(["-p", &patch.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Creates an opted-in pod until one comes back with the sidecar.
async fn injection_works(pods: &Api<Pod>, cache: &str) {
    eventually("injection by the chart's operator", Duration::from_secs(60), || async {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("app-{}", fastrand::u32(..)), "annotations": {"wtc.dev/inject": cache}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        }))
        .unwrap();
        let p = pods.create(&PostParams::default(), &p).await.unwrap();
        p.spec?.init_containers?.iter().any(|c| c.name == "wtc-sidecar").then_some(())
    })
    .await;
}

/// `helm install` of the chart, then the operator binary runs authenticated as the chart's
/// ServiceAccount: any permission missing from the chart's RBAC fails this test, and so does any
/// write to admission configurations beyond the caBundle of its own that the token can make.
#[tokio::test]
async fn chart_installs_and_the_operator_runs_under_its_service_account() {
    let cp = cluster();
    let client = cp.client();
    let release_ns = "wtc-system";
    let out = cp
        .helm()
        .args([
            "install",
            "wtc",
            CHART_DIR,
            "-n",
            release_ns,
            "--create-namespace",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "helm install: {}", stderr(&out));
    let name = "wtc-wtc-operator";
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), release_ns);
    let d = deployments.get(name).await.unwrap();
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(2), "two replicas serve the webhook");
    let pod_spec = spec.template.spec.unwrap();
    let sc = pod_spec.containers[0].security_context.clone().unwrap();
    assert_eq!(
        (
            sc.read_only_root_filesystem,
            sc.allow_privilege_escalation,
            sc.run_as_non_root
        ),
        (Some(true), Some(false), Some(true))
    );
    assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
    assert_eq!(pod_spec.service_account_name.as_deref(), Some(name));
    // One registry for the three images by default; the operator passes on the other two.
    let operator = &pod_spec.containers[0];
    assert_eq!(
        operator.image.as_deref(),
        Some("ghcr.io/wtc-dev/wtc-operator:0.1.0")
    );
    let args = operator.args.clone().unwrap();
    for arg in [
        "--leader-election-lease=wtc-wtc-operator",
        "--webhook-failure-policy=Ignore",
        "--sidecar-image=ghcr.io/wtc-dev/wtc-sidecar:0.1.0",
        "--redis-image=ghcr.io/wtc-dev/redis:7.0.15",
    ] {
        assert!(args.iter().any(|a| a == arg), "{arg} not in {args:?}");
    }
    // The chart made the webhook configuration, without a CA: the operator fills that in.
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let shipped = configs.get(name).await.unwrap();
    assert_eq!(shipped.webhooks.unwrap()[0].client_config.ca_bundle, None);

    let ns = cp.namespace("wtc-helm").await.unwrap();
    // Scoped to this test's namespace so the other tests' caches do not reach its metrics; the
    // permissions used are still the chart's cluster-wide ones.
    let (mut operator, kubeconfig) =
        OperatorProcess::with_ready_cache(cp, release_ns, name, &ns).await;
    let caches: Api<WriteThroughCache> = ns.api();

    let status = caches.get("shop").await.unwrap().status.unwrap();
    assert_eq!(
        status.injected_pods, 0,
        "the managed Redis pod is not an injected pod"
    );
    let pods: Api<Pod> = ns.api();
    injection_works(&pods, "shop").await;
    eventually(
        "the injected pod counted in status",
        Duration::from_secs(90),
        || async {
            let c = caches.get("shop").await.unwrap();
            (c.status?.injected_pods >= 1).then_some(())
        },
    )
    .await;

    let out = cp
        .kubectl()
        .args(["get", "wtc", "-n", ns.name()])
        .output()
        .unwrap();
    println!(
        "$ kubectl get wtc\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let metrics = operator.assert_healthy().await;
    assert!(
        metrics.contains("wtc_operator_reconciliations_total"),
        "{metrics}"
    );

    // What a stolen token of the operator can do to admission: fill the caBundle, nothing else.
    let as_operator = |args: &[&str]| {
        let program = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
        let out = std::process::Command::new(program)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), stderr(&out))
    };
    let evil = [
        json!([{"op": "replace", "path": "/webhooks/0/clientConfig/url", "value": "https://198.18.0.66/mutate"}]),
        json!([{"op": "replace", "path": "/webhooks/0/namespaceSelector", "value": {}}]),
        json!([{"op": "replace", "path": "/webhooks/0/rules/0/resources", "value": ["*"]}]),
        json!([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Fail"}]),
        json!([{"op": "add", "path": "/metadata/finalizers", "value": ["x.example/stuck"]}]),
        json!([{"op": "add", "path": "/webhooks/-", "value": {
            "name": "more.wtc.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"url": "https://198.18.0.66/mutate"},
            "rules": [{"operations": ["CREATE"], "apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*"]}]}}]),
    ];
    for patch in evil {
        let (ok, err) = as_operator(&[
            "patch",
            "mutatingwebhookconfiguration",
            name,
            "--type=json",
            "-p",
            &patch.to_string(),
        ]);
        assert!(!ok, "the operator's token may write {patch}");
        assert!(
            err.contains("may change only the caBundle"),
            "{patch}: {err}"
        );
    }
    // Nor borrow another ServiceAccount's rights through a Deployment it may create.
    for (what, pod) in [
        (
            "another ServiceAccount",
            json!({"serviceAccountName": "builder", "automountServiceAccountToken": false}),
        ),
        ("a token", json!({})),
        (
            "the host's files",
            json!({"automountServiceAccountToken": false,
            "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}),
        ),
        (
            "the host's network",
            json!({"automountServiceAccountToken": false, "hostNetwork": true}),
        ),
    ] {
        let mut spec = pod.clone();
        spec["containers"] = json!([{"name": "x", "image": "x:1"}]);
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "borrowed", "namespace": ns.name(),
                "labels": {"app.kubernetes.io/managed-by": "wtc-operator"}},
            "spec": {"selector": {"matchLabels": {"a": "b"}},
                "template": {"metadata": {"labels": {"a": "b"}}, "spec": spec}}});
        let path = std::env::temp_dir().join(format!("wtc-borrowed-{}.json", std::process::id()));
        std::fs::write(&path, deployment.to_string()).unwrap();
        let (ok, err) = as_operator(&["create", "-f", path.to_str().unwrap()]);
        assert!(
            !ok,
            "the operator's token may create a Deployment with {what}"
        );
        assert!(
            err.contains("may only write its managed Redis"),
            "{what}: {err}"
        );
    }
    let (ok, err) = as_operator(&["delete", "mutatingwebhookconfiguration", name]);
    assert!(!ok && err.contains("forbidden"), "{err}");
    let (ok, err) = as_operator(&["get", "mutatingwebhookconfigurations"]);
    assert!(!ok && err.contains("forbidden"), "{err}");
    let other = json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "stolen"}, "webhooks": []});
    let path = std::env::temp_dir().join(format!("wtc-stolen-{}.json", std::process::id()));
    std::fs::write(&path, other.to_string()).unwrap();
    let (ok, err) = as_operator(&["create", "-f", path.to_str().unwrap()]);
    assert!(!ok && err.contains("forbidden"), "{err}");
    // The CA it published is the Secret's, and that one field it may write.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), release_ns);
    let tls = format!("{name}-webhook-tls");
    let ca = secrets.get(&tls).await.unwrap().data.unwrap()["ca.crt"].clone();
    let published = configs.get(name).await.unwrap().webhooks.unwrap()[0]
        .client_config
        .ca_bundle
        .clone();
    assert_eq!(published, Some(ca.clone()));
    let reset =
        json!([{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle", "value": "Cg=="}]);
    let (ok, err) = as_operator(&[
        "patch",
        "mutatingwebhookconfiguration",
        name,
        "--type=json",
        "-p",
        &reset.to_string(),
    ]);
    assert!(ok, "{err}");

    // Uninstalling removes the webhook configuration (the chart's) and, through the garbage
    // collector, what the operator made in its namespace: the CA Secret and the leader Lease.
    operator.child.kill().await.unwrap();
    let out = cp
        .helm()
        .args(["uninstall", "wtc", "-n", release_ns])
        .output()
        .unwrap();
    assert!(out.status.success(), "helm uninstall: {}", stderr(&out));
    eventually(
        "webhook configuration removed",
        Duration::from_secs(60),
        || async { configs.get_opt(name).await.unwrap().is_none().then_some(()) },
    )
    .await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), release_ns);
    eventually(
        "the webhook's Secret and the Lease collected",
        Duration::from_secs(60),
        || async {
            (secrets.get_opt(&tls).await.unwrap().is_none()
                && leases.get_opt(name).await.unwrap().is_none())
            .then_some(())
        },
    )
    .await;
}

/// With `watchNamespace`, the operator works with Roles in that namespace (and the few rules by
/// name that Kubernetes keeps cluster-wide): caches there are reconciled and pods injected, and
/// its token can read nothing in other namespaces.
#[tokio::test]
async fn with_watch_namespace_the_operator_needs_no_cluster_wide_access() {
    let cp = cluster();
    let release_ns = "wtc-scoped";
    let ns = cp.namespace("wtc-watched").await.unwrap();
    let out = cp
        .helm()
        .args([
            "install",
            "scoped",
            CHART_DIR,
            "-n",
            release_ns,
            "--create-namespace",
        ])
        .args(["--set", &format!("watchNamespace={}", ns.name())])
        .output()
        .unwrap();
    assert!(out.status.success(), "helm install: {}", stderr(&out));
    let name = "scoped-wtc-operator";
    let user = format!("system:serviceaccount:{release_ns}:{name}");
    let can = |args: &[&str]| {
        let out = cp
            .kubectl()
            .args(["auth", "can-i", "--as", &user])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for (verb, what, where_) in [
        ("list", "pods", ns.name()),
        ("watch", "writethroughcaches.wtc.dev", ns.name()),
        ("create", "deployments.apps", ns.name()),
    ] {
        assert_eq!(can(&[verb, what, "-n", where_]), "yes", "{verb} {what}");
    }
    for (verb, what) in [
        ("list", "pods"),
        ("get", "secrets"),
        ("create", "deployments.apps"),
        ("watch", "writethroughcaches.wtc.dev"),
        ("patch", "configmaps"),
    ] {
        assert_eq!(
            can(&[verb, what, "-n", "default"]),
            "no",
            "{verb} {what} in default"
        );
        assert_eq!(can(&[verb, what, "-A"]), "no", "{verb} {what} everywhere");
    }
    assert_eq!(can(&["get", "namespaces/default"]), "no");
    assert_eq!(can(&["get", &format!("namespaces/{}", ns.name())]), "yes");

    let (mut operator, _) = OperatorProcess::with_ready_cache(cp, release_ns, name, &ns).await;
    injection_works(&ns.api(), "shop").await;
    operator.assert_healthy().await;
    operator.child.kill().await.unwrap();
    let out = cp
        .helm()
        .args(["uninstall", "scoped", "-n", release_ns])
        .output()
        .unwrap();
    assert!(out.status.success(), "helm uninstall: {}", stderr(&out));
}

/// The chart's webhook configuration is `webhook::configuration`'s, for every value that changes it.
#[test]
fn the_charts_webhook_configuration_is_the_operators() {
    use serde::Deserialize;
    use webhook::{Calling, FailurePolicy};
    // (helm's --set, then what the operator's function is given for it)
    type Case<'a> = (&'a [&'a str], Calling, Option<&'a str>, Option<&'a str>);
    let cases: [Case; 3] = [
        (&[], Calling::default(), None, None),
        (
            &[
                "--set",
                "webhook.failurePolicy=Fail,webhook.timeoutSeconds=12,watchNamespace=apps",
            ],
            Calling {
                failure_policy: FailurePolicy::Fail,
                timeout_seconds: 12,
            },
            Some("apps"),
            None,
        ),
        (
            &["--set", "webhook.certManager.enabled=true"],
            Calling::default(),
            None,
            Some("wtc-system/wtc-wtc-operator-webhook"),
        ),
    ];
    for (sets, calling, watch, inject_ca_from) in cases {
        let out = wtc_k8s_harness::helm_command()
            .unwrap()
            .args(["template", "wtc", CHART_DIR, "-n", "wtc-system"])
            .args([
                "--kube-version",
                "1.36.0",
                "--show-only",
                "templates/webhook.yaml",
            ])
            .args(sets)
            .output()
            .unwrap();
        assert!(out.status.success(), "helm template: {}", stderr(&out));
        let chart: MutatingWebhookConfiguration = serde_yaml::Deserializer::from_slice(&out.stdout)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .find(|v| v["kind"] == "MutatingWebhookConfiguration")
            .map(|v| serde_yaml::from_value(v).unwrap())
            .expect("a MutatingWebhookConfiguration");
        let operator = webhook::configuration(
            "wtc-wtc-operator",
            &Endpoint::Service {
                namespace: "wtc-system".into(),
                name: "wtc-wtc-operator".into(),
                port: 443,
            },
            None,
            "wtc-system",
            inject_ca_from,
            calling,
            watch,
        );
        assert_eq!(
            serde_json::to_value(&chart.webhooks).unwrap(),
            serde_json::to_value(&operator.webhooks).unwrap(),
            "charts/wtc-operator/templates/webhook.yaml and webhook::configuration differ ({sets:?})"
        );
        assert_eq!(
            chart.metadata.annotations.unwrap_or_default(),
            operator.metadata.annotations.unwrap_or_default()
        );
    }
    // Under cert-manager, which fills the caBundle, the operator has no right on it at all.
    let rbac = |sets: &[&str]| {
        let out = wtc_k8s_harness::helm_command()
            .unwrap()
            .args(["template", "wtc", CHART_DIR, "-n", "wtc-system"])
            .args([
                "--kube-version",
                "1.36.0",
                "--show-only",
                "templates/rbac.yaml",
            ])
            .args(sets)
            .output()
            .unwrap();
        assert!(out.status.success(), "helm template: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(rbac(&[]).contains("mutatingwebhookconfigurations"));
    assert!(
        !rbac(&["--set", "webhook.certManager.enabled=true"])
            .contains("mutatingwebhookconfigurations")
    );
}

/// A plain HTTP GET on loopback, without another HTTP client crate.
async fn reqwest_like_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A spec the API server accepts but the sidecar would refuse: reported in status, and the
/// controller waits for a change instead of retrying in a loop.
#[tokio::test]
async fn invalid_spec_is_reported_and_not_retried_in_a_loop() {
    let cp = cluster();
    let ns = cp.namespace("wtc-badspec").await.unwrap();
    let metrics = Arc::new(Metrics::default());
    let controller = tokio::spawn(wtc_operator::reconcile::run(
        cp.client(),
        Arc::clone(&metrics),
        Some(ns.name().to_string()),
        Release::default(),
        std::future::pending(),
    ));
    let yaml = cache_yaml("odd", "    managed: {}").replace(
        "table: accounts",
        "table: accounts\n      keyColumn: version",
    );
    let out = kubectl_apply(cp, ns.name(), &yaml);
    assert!(out.status.success(), "{}", stderr(&out));
    let caches: Api<WriteThroughCache> = ns.api();
    let cond = eventually("ConfigValid=False", Duration::from_secs(30), || async {
        let c = caches.get("odd").await.unwrap();
        c.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "ConfigValid" && c.status == "False")
    })
    .await;
    assert!(cond.message.contains("same column"), "{}", cond.message);
    let ready = caches
        .get("odd")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    let deployments: Api<Deployment> = ns.api();
    assert!(
        deployments.get_opt("odd-redis").await.unwrap().is_none(),
        "nothing is created from an invalid spec"
    );
    let before = metrics.reconciliations.get();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        metrics.reconciliations.get() - before <= 2,
        "reconciles kept coming: {}",
        metrics.reconciliations.get() - before
    );
    controller.abort();
}

/// Replicas starting together on a first install: each calls `certs::ensure` on the same
/// missing Secret at once; all must come back with the one CA and certificate that was stored
/// (otherwise a replica serves a certificate the published caBundle does not sign).
#[tokio::test]
async fn replicas_starting_together_share_one_webhook_ca() {
    use wtc_operator::certs::ensure;
    let cp = cluster();
    let client = cp.client();
    let ns = cp.namespace("wtc-ca").await.unwrap();
    let names = vec!["wtc-operator.wtc-system.svc".to_string()];
    for round in 0..5 {
        let secret = format!("webhook-tls-{round}");
        let (a, b, c) = tokio::join!(
            ensure(&client, ns.name(), &secret, &names, None),
            ensure(&client, ns.name(), &secret, &names, None),
            ensure(&client, ns.name(), &secret, &names, None),
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert!(
            a.ca_pem == b.ca_pem && b.ca_pem == c.ca_pem,
            "round {round}: the replicas made different CAs"
        );
        assert!(
            a == b && b == c,
            "round {round}: different serving certificates"
        );
        let stored = ensure(&client, ns.name(), &secret, &names, None)
            .await
            .unwrap();
        assert!(
            stored == a,
            "round {round}: what the replicas serve is not what is stored"
        );
    }
}

/// The commit stream on the API (kwok runs the pods, and completes the Job's): turned on, the
/// status names the slot before the reader exists; turned off, the reader goes first, then a
/// Job drops the slot and the publication, and once it succeeded the status forgets them;
/// renamed, the old names are dropped before the new reader starts; the cache deleted, its
/// finalizer holds until the slot is dropped. (The node suite runs the same with real pods
/// and a real PostgreSQL.) Waiting for the reader and the Job is not counted as a reconcile
/// error. Fails when the drop Job starts while the reader's pod lives ("the drop started while
/// the reader's pod lived"), or when the waits count as errors.
#[tokio::test]
async fn the_commit_stream_reader_and_its_slot_follow_the_spec() {
    use k8s_openapi::api::batch::v1::Job;
    let cp = cluster();
    let client = cp.client();
    let ns = cp.namespace("wtc-stream").await.unwrap();
    let (controller, metrics) = controller_with_metrics(&client, ns.name());
    let yaml = cache_yaml("orders", STREAM_ON);
    let out = kubectl_apply(cp, ns.name(), &yaml);
    assert!(out.status.success(), "{}", stderr(&out));
    let caches: Api<WriteThroughCache> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    let config_maps: Api<ConfigMap> = ns.api();
    let pods: Api<Pod> = ns.api();
    let jobs: Api<Job> = ns.api();
    let slot_of = |c: &WriteThroughCache| {
        c.status
            .as_ref()
            .and_then(|s| s.commit_stream.as_ref())
            .map(|s| s.slot.clone())
    };

    let reader = eventually("the reader", Duration::from_secs(30), || async {
        deployments.get_opt("orders-commit-stream").await.unwrap()
    })
    .await;
    let slot = slot_of(&caches.get("orders").await.unwrap()).expect("no slot in the status");
    assert!(
        slot.starts_with(&format!("wtc_{}_orders_", ns.name().replace('-', "_"))),
        "{slot}"
    );
    let args = reader.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert_eq!(args, ["--config", "/etc/wtc/commit-stream.toml"]);
    let cm = config_maps
        .get("orders-sidecar")
        .await
        .unwrap()
        .data
        .unwrap();
    assert!(
        cm["commit-stream.toml"].contains(&format!("slot = \"{slot}\"")),
        "{cm:?}"
    );
    assert!(!cm["sidecar.toml"].contains("[commit_stream]"), "{cm:?}");
    // kwok's pods have no real address: the condition says the reader cannot be read.
    let condition = eventually("CommitStreamReady", Duration::from_secs(60), || async {
        let c = caches.get("orders").await.unwrap();
        c.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "CommitStreamReady")
    })
    .await;
    assert_eq!(condition.status, "False");
    assert!(
        ["ReaderStarting", "ReaderUnreadable"].contains(&condition.reason.as_str()),
        "{condition:?}"
    );
    let reader_pods = || async {
        pods.list(
            &kube::api::ListParams::default().labels("app.kubernetes.io/name=wtc-commit-stream"),
        )
        .await
        .unwrap()
        .items
    };
    let reader_pod = eventually("the reader's pod", Duration::from_secs(60), || async {
        reader_pods().await.into_iter().next()
    })
    .await;
    // The reader's pod outlives its Deployment (a finalizer here; a slow shutdown there).
    let hold = |finalizers: serde_json::Value| {
        let pods = pods.clone();
        let name = reader_pod.name_any();
        async move {
            pods.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
            )
            .await
            .unwrap();
        }
    };
    hold(json!(["wtc.dev/test-hold"])).await;

    // Off: the reader goes, then the Job; the status forgets the slot once it is dropped.
    caches
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"commitStream": {"enabled": false}}})),
        )
        .await
        .unwrap();
    let waiting = eventually(
        "Dropping, the reader stopping",
        Duration::from_secs(60),
        || async {
            let c = caches.get("orders").await.unwrap();
            c.status?.conditions.into_iter().find(|c| {
                c.type_ == "CommitStreamReady" && c.message.contains("waiting for the reader")
            })
        },
    )
    .await;
    assert_eq!(waiting.reason, "Dropping");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        jobs.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "the drop started while the reader's pod lived"
    );
    hold(serde_json::Value::Null).await;
    let job = eventually("the drop Job", Duration::from_secs(60), || async {
        jobs.list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .next()
    })
    .await;
    assert!(
        deployments
            .get_opt("orders-commit-stream")
            .await
            .unwrap()
            .is_none()
    );
    let args = job.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert_eq!(
        args,
        [
            "--config",
            "/etc/wtc/sidecar.toml",
            "--drop-slot",
            &slot,
            "--drop-publication",
            &slot
        ]
    );
    eventually("the slot forgotten", Duration::from_secs(90), || async {
        let c = caches.get("orders").await.unwrap();
        let conditions = c.status.as_ref()?.conditions.clone();
        (slot_of(&c).is_none() && !conditions.iter().any(|c| c.type_ == "CommitStreamReady"))
            .then_some(())
    })
    .await;
    eventually("the Job deleted", Duration::from_secs(30), || async {
        let left = jobs.list(&Default::default()).await.unwrap().items;
        left.iter()
            .all(|j| j.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;

    // On again under a name of the user's, then the cache deleted: held until the drop.
    caches
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"commitStream": {"enabled": true, "slot": "orders_two"}}}),
            ),
        )
        .await
        .unwrap();
    eventually("the new reader", Duration::from_secs(60), || async {
        let c = caches.get("orders").await.unwrap();
        (slot_of(&c).as_deref() == Some("orders_two") && !reader_pods().await.is_empty())
            .then_some(())
    })
    .await;
    caches
        .delete("orders", &DeleteParams::background())
        .await
        .unwrap();
    let job = eventually(
        "the drop Job of the deleted cache",
        Duration::from_secs(60),
        || async {
            jobs.list(&Default::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .find(|j| j.metadata.deletion_timestamp.is_none())
        },
    )
    .await;
    let args = job.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        args.windows(2).any(|w| w == ["--drop-slot", "orders_two"]),
        "{args:?}"
    );
    eventually("the cache deleted", Duration::from_secs(90), || async {
        caches
            .get_opt("orders")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    // Waiting for the reader to stop and for the Job is not failing.
    let errors = reconcile_errors(&metrics);
    assert!(
        errors.is_empty(),
        "a slot's drop counted as reconcile errors: {errors:?}"
    );
    controller.abort();
}

/// Deleting the namespace of a cache whose stream is on: no Job can be created in a namespace
/// being deleted, so the operator lets the cache go with a warning naming the slot (the
/// namespace is not held for ever). Fails when `release` waits for a drop it cannot run.
///
/// And a namespace's deletion is not a reconcile error. Its owned objects go before the caches,
/// and each removal brings a pass that cannot make them again (403: "being terminated"). That
/// window is held open on purpose: an admission policy refuses the caches' deletion until the
/// operator has made passes with their objects gone. None of it may be counted in
/// `wtc_operator_reconcile_errors_total` (its alert would go pending on every deleted
/// namespace). Fails when those passes count as errors.
#[tokio::test]
async fn deleting_the_namespace_of_a_cache_with_a_stream_is_not_held_by_it() {
    let cp = cluster();
    let client = cp.client();
    let ns = cp.namespace("wtc-stream-ns").await.unwrap();
    let (controller, metrics) = controller_with_metrics(&client, ns.name());
    let yaml = format!(
        "{}---\n{}",
        cache_yaml("orders", STREAM_ON),
        cache_yaml("carts", "    managed: {}")
    );
    let out = kubectl_apply(cp, ns.name(), &yaml);
    assert!(out.status.success(), "{}", stderr(&out));
    let caches: Api<WriteThroughCache> = ns.api();
    let config_maps: Api<ConfigMap> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    eventually(
        "the slot in the status, and managed Redis made",
        Duration::from_secs(60),
        || async {
            let c = caches.get("orders").await.unwrap();
            deployments.get_opt("carts-redis").await.ok()??;
            c.status?.commit_stream.map(|_| ())
        },
    )
    .await;

    // The caches outlive their objects: their deletion is refused while the hold stands.
    let hold = format!("wtc-test-hold-{}", ns.name());
    let policy = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {hold}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}
    resourceRules:
      - apiGroups: [wtc.dev]
        apiVersions: ["*"]
        operations: [DELETE]
        resources: [writethroughcaches]
  validations:
    - expression: "false"
      message: held by the test
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {hold}}}
spec: {{policyName: {hold}, validationActions: [Deny]}}
"#,
        ns = ns.name()
    );
    let hold = Hold { cp, name: hold };
    let out = kubectl_apply(cp, ns.name(), &policy);
    assert!(out.status.success(), "{}", stderr(&out));
    let dry_run = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    eventually("the hold in force", Duration::from_secs(30), || async {
        let refused = caches.delete("carts", &dry_run).await.err()?;
        refused
            .to_string()
            .contains("held by the test")
            .then_some(())
    })
    .await;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(ns.name(), &DeleteParams::background())
        .await
        .unwrap();
    eventually(
        "the caches' objects removed by the namespace's deletion",
        Duration::from_secs(60),
        || async {
            let left = config_maps.get_opt("orders-sidecar").await.ok()?.is_some()
                || config_maps.get_opt("carts-sidecar").await.ok()?.is_some()
                || deployments.get_opt("carts-redis").await.ok()?.is_some();
            (!left).then_some(())
        },
    )
    .await;
    // Passes made after that, with nothing they can make again.
    let gone = metrics.reconciliations.get();
    eventually(
        "two passes after the objects went",
        Duration::from_secs(60),
        || async { (metrics.reconciliations.get() >= gone + 2).then_some(()) },
    )
    .await;
    let caches_left = caches.list(&Default::default()).await.unwrap().items.len();
    assert_eq!(caches_left, 2, "the hold let a cache go early");
    drop(hold);

    for name in ["orders", "carts"] {
        eventually(
            &format!("the cache {name} gone with its namespace"),
            Duration::from_secs(120),
            || async { caches.get_opt(name).await.ok()?.is_none().then_some(()) },
        )
        .await;
    }
    let errors = reconcile_errors(&metrics);
    assert!(
        errors.is_empty(),
        "a namespace's deletion counted as reconcile errors: {errors:?}"
    );
    controller.abort();
}

/// An admission policy of a test's, removed when the test ends, failed or not: left behind,
/// it would refuse deletions of caches in that namespace for the rest of the cluster's life.
struct Hold<'a> {
    cp: &'a ControlPlane,
    name: String,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let out = self
            .cp
            .kubectl()
            .args([
                "delete",
                "--ignore-not-found",
                "validatingadmissionpolicybinding,validatingadmissionpolicy",
                &self.name,
            ])
            .output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!("could not remove {}: {}", self.name, stderr(&out));
        }
    }
}
