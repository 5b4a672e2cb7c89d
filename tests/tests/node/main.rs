//! The Kubernetes half running for real: a one-node cluster (`scripts/k8s-node`: kubelet,
//! containerd, runc, CNI bridge, kube-proxy, CoreDNS) running the images `scripts/images` built.
//! Nothing here is kwok's: every pod is a container on this machine.
//!
//! - `journey`: the README's Kubernetes section, step by step, from the CRD (its chart, here) to
//!   the application writing and reading through `127.0.0.1:7480` inside its pod.
//! - `upgrade`: the README's upgrade procedure, N to N+1 and back, while a pod answers.
//! - `managed_redis`: its data on a claim (a local PersistentVolume) across a restart; its
//!   NetworkPolicy.
//! - `availability`: the operator's replicas through a rollout (no pod admitted without its
//!   sidecar), leader election (one controller; a killed leader replaced within the lease).
//! - `lifecycle`: deleting a cache that pods use waits for them.
//! - `commit_stream`: the reader the operator runs; a write made with SQL reaches the pods; the
//!   slot goes with the cache.
//! - `observability`: a real Prometheus discovers and scrapes the sidecars and the operator
//!   through the Kubernetes API, with the chart's alert rules loaded.
//! - `settings`: per-pod settings of the sidecar (annotations) in a namespace whose
//!   ResourceQuota requires requests and limits.
//! - `failures`: what breaks in real pods: the start order, a database outage (pods stay Ready),
//!   the managed Redis pod deleted under load (history checker), the sidecar killed (kubelet
//!   restarts it, the application keeps running), a sidecar image that does not exist (visible
//!   in the pod's events and the cache's status).
//!
//! The node is shared by the tests of this binary, which run one at a time (`serial`): the
//! database outage cuts every pod off PostgreSQL. `scripts/test` stops the node at the end.

mod availability;
mod commit_stream;
mod failures;
mod journey;
mod lifecycle;
mod managed_redis;
mod observability;
mod settings;
mod upgrade;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::sync::OnceCell;
use wtc_tests::Target;

/// Images `scripts/images` builds; the node must have them before the chart is installed.
const IMAGES: [&str; 4] = ["wtc-operator", "wtc-sidecar", "wtc-demo-app", "redis"];
/// The registry part of the local images' names (`localhost/wtc-dev/<name>:<tag>`).
const LOCAL_REGISTRY: &str = "localhost";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The tags `scripts/images` gave the images, when they differ from the chart's defaults.
fn tag_overrides() -> Vec<String> {
    [
        (
            "WTC_IMAGE_TAG",
            ["image.tag", "sidecarImage.tag"].as_slice(),
        ),
        ("WTC_REDIS_IMAGE_TAG", ["redisImage.tag"].as_slice()),
    ]
    .iter()
    .filter_map(|(var, keys)| Some((std::env::var(var).ok()?, keys)))
    .flat_map(|(tag, keys)| {
        keys.iter()
            .flat_map(move |k| ["--set".to_string(), format!("{k}={tag}")])
    })
    .collect()
}

/// One test at a time on the node.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// The running node with the operator installed by the chart.
pub struct Node {
    pub kubeconfig: String,
    /// The node's containerd (`ctr --address`), for images.
    pub containerd_socket: String,
    /// The database URL pods use (PostgreSQL on the bridge's gateway, behind a Service).
    pub postgres_url: String,
    /// busybox (sh, nc, wget) and kubectl: pods that probe from inside the cluster.
    pub tools_image: String,
    pub helm: PathBuf,
    /// From `helm install` to the chart's operator Ready and injecting.
    pub install_took: Duration,
    pub installed_at: Instant,
}

static NODE: OnceCell<Result<Node, String>> = OnceCell::const_new();

/// Starts the node (idempotent), loads the images and installs the chart, once per test binary;
/// when that failed, every test fails at once with the same message.
pub async fn node() -> &'static Node {
    let started = NODE
        .get_or_init(|| async {
            tokio::spawn(Node::start())
                .await
                .map_err(|e| match e.try_into_panic() {
                    Ok(p) => p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default(),
                    Err(e) => e.to_string(),
                })
        })
        .await;
    match started {
        Ok(node) => node,
        Err(e) => panic!("the node is not usable: {e}"),
    }
}

async fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn exports(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.trim_matches('\'').trim_matches('"').to_string(),
            )
        })
        .collect()
}

impl Node {
    async fn start() -> Node {
        let root = repo_root();
        let images_dir = std::env::var("WTC_IMAGES_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target/images"));
        let archives: Vec<PathBuf> = IMAGES
            .iter()
            .map(|name| images_dir.join(format!("{name}.tar")))
            .collect();
        for a in &archives {
            assert!(
                a.is_file(),
                "{} is missing: build the images first with scripts/images (scripts/test does)",
                a.display()
            );
        }
        let up = run(Command::new(root.join("scripts/k8s-node")).arg("up"))
            .await
            .unwrap_or_else(|e| panic!("the node did not start (see its logs):\n{e}"));
        let env = exports(&up);
        let get = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("scripts/k8s-node up printed no {name}"))
        };
        run(Command::new(root.join("scripts/k8s-node"))
            .arg("load")
            .args(&archives))
        .await
        .unwrap();
        let assets =
            std::env::var("KUBEBUILDER_ASSETS").expect("KUBEBUILDER_ASSETS (scripts/test sets it)");
        let node = Node {
            kubeconfig: get("WTC_NODE_KUBECONFIG"),
            containerd_socket: get("WTC_NODE_CONTAINERD_SOCKET"),
            postgres_url: get("WTC_NODE_POSTGRES_URL"),
            tools_image: get("WTC_NODE_TOOLS_IMAGE"),
            helm: Path::new(&assets).join("helm"),
            install_took: Duration::ZERO,
            installed_at: Instant::now(),
        };
        node.install().await
    }

    /// The README's first two steps: the CRD (its chart, which `helm upgrade` updates), then the
    /// operator's chart with the locally built images.
    async fn install(mut self) -> Node {
        let root = repo_root();
        // A CRD left by an earlier run (a kept node) that the CRD chart does not own is handed
        // to it, as the README's Upgrade section says.
        let crd = "crd/writethroughcaches.wtc.dev";
        let exists = !self
            .kubectl(&["get", crd, "--ignore-not-found", "-o", "name"])
            .await
            .trim()
            .is_empty();
        if exists {
            self.kubectl(&[
                "label",
                "--overwrite",
                crd,
                "app.kubernetes.io/managed-by=Helm",
            ])
            .await;
            self.kubectl(&[
                "annotate",
                "--overwrite",
                crd,
                "meta.helm.sh/release-name=wtc-crds",
                "meta.helm.sh/release-namespace=wtc-system",
            ])
            .await;
        }
        let crds = run(Command::new(&self.helm)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(["upgrade", "--install", "wtc-crds"])
            .arg(root.join("charts/wtc-crds"))
            .args(["-n", "wtc-system", "--create-namespace", "--wait"]))
        .await;
        if let Err(e) = crds {
            panic!("helm install wtc-crds: {e}");
        }
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/writethroughcaches.wtc.dev",
            "--timeout=60s",
        ])
        .await;
        // A release left by an earlier run (the node kept with WTC_KEEP_NODE) may run older
        // images under the same tags: install afresh.
        let _ = run(Command::new(&self.helm)
            .env("KUBECONFIG", &self.kubeconfig)
            .args([
                "uninstall",
                "wtc",
                "-n",
                "wtc-system",
                "--wait",
                "--ignore-not-found",
            ]))
        .await;
        let started = Instant::now();
        let chart = root.join("charts/wtc-operator");
        let installed = run(Command::new(&self.helm)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(["install", "wtc"])
            .arg(&chart)
            .args(["-n", "wtc-system", "--create-namespace"])
            .args(["--set", &format!("image.registry={LOCAL_REGISTRY}")])
            .args(tag_overrides())
            // The watchdog's rounds, every 30 s by default: short enough for the tests' waits.
            .args(["--set", "watchdog.intervalSeconds=5"])
            .args(["--wait", "--timeout", "180s"]))
        .await;
        if let Err(e) = installed {
            panic!("helm install: {e}\n{}", self.operator_state().await);
        }
        self.kubectl(&[
            "-n",
            "wtc-system",
            "wait",
            "--for=condition=Ready",
            "pod",
            "-l",
            "app.kubernetes.io/name=wtc-operator",
            "--timeout=120s",
        ])
        .await;
        self.wait_for_injection().await;
        self.install_took = started.elapsed();
        self.installed_at = started;
        eprintln!(
            "node: helm install -> operator Ready and injecting in {:.1} s",
            self.install_took.as_secs_f64()
        );
        self
    }

    /// Until a server-side dry run of an opted-in pod comes back with the sidecar: the webhook
    /// is reachable through its Service (the API server fails open until then).
    async fn wait_for_injection(&self) {
        // A name of its own: an earlier run's namespace may still be terminating.
        let ns = &format!("wtc-probe-{:x}", fastrand::u32(..));
        self.kubectl(&["create", "namespace", ns]).await;
        self.apply(&probe_cache(ns, "probe")).await;
        let pod = probe_pod(ns, "probe", "probe");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self
                .kubectl_stdin(
                    &["create", "--dry-run=server", "-o", "json", "-f", "-"],
                    &pod,
                )
                .await;
            if out.as_ref().is_ok_and(|o| o.contains("\"wtc-sidecar\"")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the webhook never injected a dry-run pod: {out:?}\n{}",
                self.operator_state().await
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let _ = self
            .try_kubectl(&["delete", "namespace", ns, "--wait=false"])
            .await;
    }

    /// For failure messages: the operator's pods, events and log.
    pub async fn operator_state(&self) -> String {
        let pods = self
            .try_kubectl(&["-n", "wtc-system", "get", "pods", "-o", "wide"])
            .await
            .unwrap_or_else(|e| e);
        let events = self
            .try_kubectl(&[
                "-n",
                "wtc-system",
                "get",
                "events",
                "--sort-by=.lastTimestamp",
            ])
            .await
            .unwrap_or_else(|e| e);
        let logs = self
            .try_kubectl(&[
                "-n",
                "wtc-system",
                "logs",
                "-l",
                "app.kubernetes.io/name=wtc-operator",
                "--tail=40",
            ])
            .await
            .unwrap_or_else(|e| e);
        format!("pods:\n{pods}\nevents:\n{events}\noperator log:\n{logs}")
    }

    fn command(&self) -> Command {
        let mut c = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()));
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    /// Waits (up to 120 s) until `deployment` in `ns` has rolled out.
    pub async fn rollout_status(&self, ns: &str, deployment: &str) -> Result<String, String> {
        self.try_kubectl(&[
            "-n",
            ns,
            "rollout",
            "status",
            &format!("deployment/{deployment}"),
            "--timeout=120s",
        ])
        .await
    }

    /// `helm` against the node; panics with its output when it fails.
    pub async fn helm(&self, args: &[&str]) -> String {
        run(Command::new(&self.helm)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn try_kubectl(&self, args: &[&str]) -> Result<String, String> {
        run(self.command().args(args)).await
    }

    pub async fn kubectl(&self, args: &[&str]) -> String {
        self.try_kubectl(args).await.unwrap()
    }

    pub async fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String, String> {
        use tokio::io::AsyncWriteExt;
        let mut child = self
            .command()
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        drop(stdin);
        let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `kubectl apply -f -` of YAML.
    pub async fn apply(&self, yaml: &str) {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml)
            .await
            .unwrap();
    }

    /// A pod of the tools image that sleeps, with these labels, Ready.
    pub async fn tools_pod(&self, ns: &str, name: &str, labels: &[(&str, &str)]) {
        let labels: String = labels
            .iter()
            .map(|(k, v)| format!("{k}: \"{v}\", "))
            .collect();
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
             spec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: tools\n    \
             image: {image}\n    imagePullPolicy: Never\n    command: [/bin/sleep, \"3600\"]\n",
            image = self.tools_image
        );
        self.apply(&pod).await;
        self.kubectl(&[
            "-n",
            ns,
            "wait",
            "--for=condition=Ready",
            &format!("pod/{name}"),
            "--timeout=60s",
        ])
        .await;
    }

    /// What `host:port` answers a tools pod that sends `line` (busybox `nc`, 3 s to connect,
    /// 5 s in all); empty when it could not connect.
    pub async fn answer_to(
        &self,
        ns: &str,
        pod: &str,
        host: &str,
        port: u16,
        line: &str,
    ) -> String {
        let script = format!("echo '{line}' | timeout 5 nc -w 3 {host} {port}");
        match self
            .try_kubectl(&["-n", ns, "exec", pod, "--", "sh", "-c", &script])
            .await
        {
            Ok(out) => out,
            // `timeout` ends nc with 143 once the server has answered and kept the connection.
            Err(e) => e,
        }
    }

    pub async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all).await).unwrap()
    }
}

/// A cache that only has to exist for injection (its database and Redis are never reached).
pub fn probe_cache(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: wtc.dev/v1alpha1\nkind: WriteThroughCache\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  database: {{urlSecret: {{name: none, key: url}}}}\n  entities: [{{name: probe, table: probe}}]\n  \
         redis: {{external: {{urlSecret: {{name: none, key: url}}}}}}\n"
    )
}

/// A pod opted in to `cache`.
pub fn probe_pod(ns: &str, name: &str, cache: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, annotations: {{wtc.dev/inject: {cache}}}}}\n\
         spec: {{containers: [{{name: app, image: {LOCAL_REGISTRY}/wtc-dev/wtc-demo-app:0.1.0}}]}}\n"
    )
}

/// Whether a pod (as the API server returned it) carries the sidecar.
pub fn has_sidecar(pod: &Value) -> bool {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod["spec"][k].as_array())
        .flatten()
        .any(|c| c["name"] == "wtc-sidecar")
}

/// One application deployed the README's way in a namespace of its own: a database Secret, a
/// `WriteThroughCache` with managed Redis, a Deployment of the demo application opted in.
pub struct Shop {
    pub ns: String,
    pub table: String,
    pub pool: sqlx::PgPool,
}

/// What the shop's cache and Deployment may change from the README's.
#[derive(Default)]
pub struct ShopOptions<'a> {
    /// Lines under `spec.sidecar:` of the cache.
    pub sidecar: &'a str,
    /// The entity's TTL.
    pub ttl_seconds: Option<u64>,
    /// Wait for the application's rollout (not for a sidecar that cannot start).
    pub no_wait: bool,
    /// Objects applied in the namespace before the cache (a ResourceQuota).
    pub first: &'a str,
    /// Edits the README's YAML after the changes above.
    pub edit: Option<fn(String) -> String>,
}

impl Shop {
    pub async fn deploy(node: &Node, prefix: &str, opts: ShopOptions<'_>) -> Shop {
        let pool = wtc_tests::pg().await;
        let table = wtc_tests::unique(&format!("node_{prefix}"));
        wtc_tests::create_table(&pool, &table).await;
        let ns = format!("{prefix}-{:x}", fastrand::u32(..));
        node.kubectl(&["create", "namespace", &ns]).await;
        node.kubectl(&[
            "-n",
            &ns,
            "create",
            "secret",
            "generic",
            "shop-db",
            &format!("--from-literal=url={}", node.postgres_url),
        ])
        .await;
        // The README's example, in this test's namespace and table.
        let mut yaml = std::fs::read_to_string(repo_root().join("examples/k8s/shop.yaml"))
            .unwrap()
            .replace("namespace: shop", &format!("namespace: {ns}"))
            .replace("table: accounts", &format!("table: {table}"));
        if let Some(ttl) = opts.ttl_seconds {
            yaml = yaml.replace("ttlSeconds: 300", &format!("ttlSeconds: {ttl}"));
        }
        if !opts.sidecar.is_empty() {
            yaml = yaml.replace(
                "  redis:\n",
                &format!("  sidecar:\n{}\n  redis:\n", opts.sidecar),
            );
        }
        if let Some(edit) = opts.edit {
            yaml = edit(yaml);
        }
        if !opts.first.is_empty() {
            node.kubectl_stdin(&["-n", &ns, "apply", "-f", "-"], opts.first)
                .await
                .unwrap();
        }
        node.apply(&yaml).await;
        node.kubectl(&[
            "-n",
            &ns,
            "wait",
            "--for=condition=Ready",
            "wtc/shop",
            "--timeout=120s",
        ])
        .await;
        if !opts.no_wait {
            let rollout = node.rollout_status(&ns, "app").await;
            if let Err(e) = rollout {
                let pods = node.try_kubectl(&["-n", &ns, "describe", "pods"]).await;
                panic!(
                    "the application did not become ready: {e}\n{}",
                    pods.unwrap_or_else(|e| e)
                );
            }
        }
        let shop = Shop { ns, table, pool };
        if !opts.no_wait {
            shop.wait_for_redis(node).await;
        }
        shop
    }

    /// Until the sidecar reaches the managed Redis: a read stops answering `bypass`. The cache
    /// turns Ready with the Redis Deployment, a moment before kube-proxy routes its Service and
    /// before the sidecar's back-off after a refused connection ends; a write meanwhile is
    /// acknowledged `repairing` (committed, the cache repaired later).
    pub async fn wait_for_redis(&self, node: &Node) {
        let app = self.app(node).await;
        let started = Instant::now();
        wait_for(
            Duration::from_secs(60),
            "the sidecar to reach Redis",
            || {
                let app = Arc::clone(&app);
                async move {
                    let r =
                        wtc_tests::reply(app.http.get(format!("{}/accounts/-probe-", app.base)))
                            .await
                            .ok()?;
                    (r.status == 404 && r.cache.as_deref() != Some("bypass")).then_some(())
                }
            },
        )
        .await;
        eprintln!(
            "{}: the sidecar reached Redis {:.1} s after the application was Ready",
            self.ns,
            started.elapsed().as_secs_f64()
        );
    }

    /// The application's pod (the Deployment has one).
    pub async fn pod(&self, node: &Node) -> Value {
        self.live_pod(node, "app=shop-app")
            .await
            .expect("the application's pod")
    }

    /// A pod of this namespace matching `selector` that is not being deleted.
    pub async fn live_pod(&self, node: &Node, selector: &str) -> Option<Value> {
        let list = node
            .json(&["-n", &self.ns, "get", "pods", "-l", selector])
            .await;
        list["items"]
            .as_array()?
            .iter()
            .find(|p| p["metadata"]["deletionTimestamp"].is_null())
            .cloned()
    }

    pub async fn pod_name(&self, node: &Node) -> String {
        self.pod(node).await["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The application, from this machine: its pod address on the node's bridge.
    pub async fn app(&self, node: &Node) -> Arc<App> {
        let ip = self.pod(node).await["status"]["podIP"]
            .as_str()
            .expect("pod IP")
            .to_string();
        Arc::new(App {
            base: format!("http://{ip}:8080"),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(32)
                .build()
                .unwrap(),
        })
    }

    /// `kubectl exec` into the application container: the demo binary calling 127.0.0.1:7480.
    pub async fn exec(&self, node: &Node, args: &[&str]) -> Result<String, String> {
        let pod = self.pod_name(node).await;
        let mut all = vec![
            "-n",
            &self.ns,
            "exec",
            &pod,
            "-c",
            "app",
            "--",
            "/wtc-demo-app",
        ];
        all.extend(args);
        node.try_kubectl(&all).await
    }

    /// The managed Redis, reached from this machine through its Service (kube-proxy), with the
    /// password the operator generated.
    pub async fn redis(&self, node: &Node) -> redis::aio::MultiplexedConnection {
        let svc = node
            .json(&["-n", &self.ns, "get", "service", "shop-redis"])
            .await;
        let ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
        let password = self.redis_password(node).await;
        let url = format!("redis://:{password}@{ip}:6379");
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("the managed Redis answers through its Service")
    }

    /// As `redis`, `None` while the Service has no ready endpoint or Redis refuses.
    pub async fn redis_checked(&self, node: &Node) -> Option<redis::aio::MultiplexedConnection> {
        let svc = node
            .json(&["-n", &self.ns, "get", "service", "shop-redis"])
            .await;
        let ip = svc["spec"]["clusterIP"].as_str()?.to_string();
        let password = self.redis_password(node).await;
        let client = redis::Client::open(format!("redis://:{password}@{ip}:6379")).ok()?;
        let connect = client.get_multiplexed_async_connection();
        tokio::time::timeout(Duration::from_secs(3), connect)
            .await
            .ok()?
            .ok()
    }

    /// The password the operator generated for the managed Redis.
    pub async fn redis_password(&self, node: &Node) -> String {
        let secret = node
            .json(&["-n", &self.ns, "get", "secret", "shop-redis-auth"])
            .await;
        {
            use std::io::Write;
            let b64 = secret["data"]["password"].as_str().unwrap();
            let out = std::process::Command::new("base64")
                .arg("-d")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    c.stdin.take().unwrap().write_all(b64.as_bytes())?;
                    c.wait_with_output()
                })
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        }
    }

    pub async fn cache_status(&self, node: &Node) -> Value {
        node.json(&["-n", &self.ns, "get", "wtc", "shop"]).await["status"].clone()
    }

    pub async fn delete(self, node: &Node) {
        let _ = node
            .try_kubectl(&["delete", "namespace", &self.ns, "--wait=false"])
            .await;
    }
}

/// The demo application as the history workload's target: it answers with the sidecar's
/// status, headers and body.
pub struct App {
    pub base: String,
    pub http: reqwest::Client,
}

impl Target for App {
    fn http(&self) -> &reqwest::Client {
        &self.http
    }
    fn row_url(&self, entity: &str, key: &str) -> String {
        format!("{}/{entity}/{key}", self.base)
    }
}

/// Events of `reason` about the object `name` in `ns`, their messages.
pub async fn events(node: &Node, ns: &str, name: &str, reason: &str) -> Vec<String> {
    let list = node
        .json(&[
            "-n",
            ns,
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={name},reason={reason}"),
        ])
        .await;
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            e["message"]
                .as_str()
                .or(e["note"].as_str())
                .map(String::from)
        })
        .collect()
}

/// Waits up to 30 s for an Event of `reason` about `name` in `ns`: their messages.
pub async fn wait_for_event(node: &Node, ns: &str, name: &str, reason: &str) -> Vec<String> {
    wait_for_event_within(node, ns, name, reason, Duration::from_secs(30)).await
}

/// `wait_for_event` with a timeout of its own (events that follow an operator's pass or a
/// deadline).
pub async fn wait_for_event_within(
    node: &Node,
    ns: &str,
    name: &str,
    reason: &str,
    timeout: Duration,
) -> Vec<String> {
    wait_for(timeout, &format!("a {reason} event on {name}"), || async {
        let e = events(node, ns, name, reason).await;
        (!e.is_empty()).then_some(e)
    })
    .await
}

/// The pod's container `name` is ready.
/// The pod is Ready and not being deleted.
pub fn pod_ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

pub fn ready(pod: &Value, name: &str) -> bool {
    container_status(pod, name).is_some_and(|c| c["ready"] == true)
}

/// Polls `check` every 250 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A container's status in a pod, among the init containers (native sidecars) or the others.
pub fn container_status<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    ["initContainerStatuses", "containerStatuses"]
        .iter()
        .filter_map(|k| pod["status"][k].as_array())
        .flatten()
        .find(|c| c["name"] == name)
}
