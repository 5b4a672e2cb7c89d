//! Seeing the sidecars: a real Prometheus on this machine finds the injected sidecars and the
//! operator through the Kubernetes service discovery (`kubernetes_sd_configs`, watching the API
//! server with the node's kubeconfig), selects them as the chart's PodMonitor and ServiceMonitor
//! do (label `wtc.dev/injected-for` and port `wtc-metrics`; the operator's Service, port
//! `metrics`), scrapes them on the pod network, and evaluates the chart's alert rules on what it
//! scraped; every query of the chart's Grafana dashboard returns data.
//!
//! The Prometheus is upstream's, built by `scripts/prometheus` (`$WTC_PROMETHEUS`): Debian's
//! package is built without the Kubernetes discovery.

use crate::{Node, Shop, ShopOptions, node, repo_root, serial, wait_for};
use serde_json::Value;
use std::time::{Duration, Instant};

struct Prometheus {
    child: std::process::Child,
    base: String,
    dir: std::path::PathBuf,
}

/// What the chart's PodMonitor and ServiceMonitor select (`helm template` with both on): the
/// scrape configuration follows them, so a monitor naming a port the pods do not have fails here.
struct Monitors {
    pod_label: String,
    pod_port: String,
    service_port: String,
}

impl Monitors {
    async fn rendered(node: &Node) -> Self {
        let chart = repo_root().join("charts/wtc-operator");
        let chart = chart.to_str().unwrap();
        let render = |file: &'static str| async move {
            node.helm(&[
                "template",
                "wtc",
                chart,
                "--kube-version",
                "1.36.0",
                "--set",
                "metrics.podMonitor.enabled=true,metrics.serviceMonitor.enabled=true",
                "--show-only",
                file,
            ])
            .await
        };
        // The one value after `key:` / `port:` in the rendered YAML (flow or block style).
        let value = |yaml: &str, field: &str| -> String {
            let at = yaml
                .find(&format!("{field}: "))
                .unwrap_or_else(|| panic!("no {field} in {yaml}"));
            yaml[at + field.len() + 2..]
                .split([',', '}', '\n'])
                .next()
                .unwrap()
                .trim()
                .trim_matches('"')
                .to_string()
        };
        let pod = render("templates/podmonitor.yaml").await;
        let service = render("templates/servicemonitor.yaml").await;
        Self {
            pod_label: value(&pod, "key"),
            pod_port: value(&pod, "port"),
            service_port: value(&service, "port"),
        }
    }
}

impl Prometheus {
    async fn start(node: &Node) -> Self {
        let dir = std::env::temp_dir().join(format!("wtc-prometheus-{:x}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let monitors = Monitors::rendered(node).await;
        let rules = repo_root().join("charts/wtc-operator/files/alerts.yaml");
        // What the chart's PodMonitor and ServiceMonitor become in Prometheus' own terms (the
        // Prometheus operator writes the same relabelling): keep the pods that carry the label
        // and the port, and the operator Service's `metrics` endpoints; name targets by
        // namespace and pod.
        let config = format!(
            r#"global: {{scrape_interval: 2s, evaluation_interval: 2s}}
rule_files: [{rules}]
scrape_configs:
- job_name: wtc-sidecars
  kubernetes_sd_configs: [{{role: pod, kubeconfig_file: {kubeconfig}}}]
  relabel_configs:
  - {{source_labels: [__meta_kubernetes_pod_labelpresent_{label}], regex: "true", action: keep}}
  - {{source_labels: [__meta_kubernetes_pod_container_port_name], regex: {pod_port}, action: keep}}
  - {{source_labels: [__meta_kubernetes_namespace], target_label: namespace}}
  - {{source_labels: [__meta_kubernetes_pod_name], target_label: pod}}
- job_name: wtc-operator
  kubernetes_sd_configs: [{{role: endpointslice, kubeconfig_file: {kubeconfig}}}]
  relabel_configs:
  - {{source_labels: [__meta_kubernetes_service_label_app_kubernetes_io_name], regex: wtc-operator, action: keep}}
  - {{source_labels: [__meta_kubernetes_endpointslice_port_name], regex: {service_port}, action: keep}}
  - {{source_labels: [__meta_kubernetes_namespace], target_label: namespace}}
  - {{source_labels: [__meta_kubernetes_pod_name], target_label: pod}}
"#,
            rules = rules.display(),
            kubeconfig = node.kubeconfig,
            // Prometheus' meta label names: every character outside [a-zA-Z0-9_] becomes `_`.
            label = monitors
                .pod_label
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            pod_port = monitors.pod_port,
            service_port = monitors.service_port,
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = wtc_tests::free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let binary = std::env::var("WTC_PROMETHEUS").expect(
            "WTC_PROMETHEUS: upstream Prometheus with the Kubernetes discovery (scripts/test \
             sets it from scripts/prometheus)",
        );
        let child = std::process::Command::new(&binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }

    /// The active targets of `job` Prometheus discovered: (namespace, pod, health).
    async fn targets(&self, job: &str) -> Vec<(String, String, String)> {
        let Some(d) = self.api("/api/v1/targets", &[("state", "active")]).await else {
            return vec![];
        };
        d["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["labels"]["job"] == job)
            .map(|t| {
                let l = |k: &str| t["labels"][k].as_str().unwrap_or_default().to_string();
                let health = t["health"].as_str().unwrap_or_default().to_string();
                (l("namespace"), l("pod"), health)
            })
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.base))
            .query(query)
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        (v["status"] == "success").then(|| v["data"].clone())
    }

    /// The samples of an instant query.
    async fn query(&self, q: &str) -> Vec<Value> {
        self.api("/api/v1/query", &[("query", q)])
            .await
            .and_then(|d| d["result"].as_array().cloned())
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The application's sidecar (its `wtc-metrics` port on the pod's address) and the operator's
/// two replicas scraped by Prometheus; the application's hit is there within a few scrapes;
/// exactly one replica reports itself leader; the chart's alert rules load and evaluate, and
/// none fires on a healthy cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_sidecars_and_the_operator_on_the_pod_network() {
    let _serial = serial().await;
    let node = node().await;
    let shop = Shop::deploy(node, "prom", ShopOptions::default()).await;
    let prometheus = Prometheus::start(node).await;
    let pod = shop.pod_name(node).await;
    // Discovered by Prometheus itself: this namespace's application pod, and the operator's two
    // replicas through their Service.
    let started = Instant::now();
    let (sidecars, operators) = wait_for(
        Duration::from_secs(60),
        "Prometheus to discover the sidecar and both operator replicas",
        || async {
            let sidecars = prometheus.targets("wtc-sidecars").await;
            let operators = prometheus.targets("wtc-operator").await;
            let mine = sidecars
                .iter()
                .any(|(ns, p, _)| *ns == shop.ns && *p == pod);
            (mine && operators.len() == 2).then_some((sidecars.len(), operators.len()))
        },
    )
    .await;
    eprintln!(
        "prom: kubernetes_sd found {sidecars} sidecar targets and {operators} operator replicas \
         {:.1} s after Prometheus started",
        started.elapsed().as_secs_f64()
    );
    let put = shop
        .exec(node, &["put", "seen", r#"{"owner": "p"}"#])
        .await
        .unwrap();
    assert!(put.starts_with("201"), "{put}");
    let hit = shop.exec(node, &["get", "seen"]).await.unwrap();
    assert!(hit.starts_with("200"), "{hit}");

    let started = Instant::now();
    let series = format!(
        "wtc_cache_lookups_total{{job=\"wtc-sidecars\",namespace=\"{}\",pod=\"{pod}\",result=\"hit\"}}",
        shop.ns
    );
    let found = wait_for(
        Duration::from_secs(60),
        "the sidecar's hit in Prometheus",
        || async {
            let r = prometheus.query(&series).await;
            r.first()
                .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
                .filter(|v| *v >= 1.0)
        },
    )
    .await;
    eprintln!(
        "prom: the hit ({found}) scraped from {pod}'s sidecar {:.1} s after Prometheus started ({sidecars} sidecar targets)",
        started.elapsed().as_secs_f64()
    );
    let leaders = wait_for(
        Duration::from_secs(60),
        "both operator replicas scraped",
        || async {
            let up = prometheus.query("up{job=\"wtc-operator\"} == 1").await;
            let leader = prometheus.query("sum(wtc_operator_leader)").await;
            let sum = leader
                .first()
                .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok());
            (up.len() == 2).then_some(sum).flatten()
        },
    )
    .await;
    assert_eq!(
        leaders, 1.0,
        "exactly one leader among the scraped replicas"
    );
    let up = prometheus.query("up{job=\"wtc-sidecars\"} == 0").await;
    assert!(
        up.is_empty(),
        "sidecar targets down: {up:?}\n{}",
        prometheus.log()
    );

    // The chart's rules, loaded and evaluated against what was scraped: once the series are
    // there, none is pending or firing on a healthy cache (`WtcOperatorNoLeader` is pending
    // for the evaluations before the first scrape: `absent`).
    let started = Instant::now();
    let quiet = loop {
        let rules: Vec<Value> = prometheus
            .api("/api/v1/rules", &[])
            .await
            .and_then(|d| {
                let groups = d["groups"].as_array()?.clone();
                Some(
                    groups
                        .iter()
                        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                        .collect(),
                )
            })
            .unwrap_or_default();
        let healthy = rules.len() == 8 && rules.iter().all(|r| r["health"] == "ok");
        if healthy && rules.iter().all(|r| r["state"] == "inactive") {
            break rules.len();
        }
        if started.elapsed() > Duration::from_secs(30) {
            // Which rule, with what its alerts carry (labels, value, since when), and the
            // operators' own account of their errors.
            let loud: Vec<String> = rules
                .iter()
                .filter(|r| r["health"] != "ok" || r["state"] != "inactive")
                .map(|r| {
                    format!(
                        "{} health={} state={} lastError={} alerts={}",
                        r["name"], r["health"], r["state"], r["lastError"], r["alerts"]
                    )
                })
                .collect();
            let errors = prometheus
                .query("wtc_operator_reconcile_errors_total")
                .await;
            panic!(
                "after 30 s, {} rules and not all evaluated and inactive:\n{}\n\
                 reconcile errors scraped: {errors:?}\noperator logs:\n{}",
                rules.len(),
                loud.join("\n"),
                node.operator_state().await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("prom: {quiet} alert rules evaluated on the scraped series, none pending");

    // The chart's Grafana dashboard: every query of every panel, with the dashboard's variables
    // as Grafana fills them (this namespace, a rate interval), returns samples.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("charts/wtc-operator/files/dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut queries = 0;
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", &shop.ns)
                .replace("$__rate_interval", "1m");
            let samples = wait_for(
                Duration::from_secs(30),
                &format!("data for the panel {} ({expr})", panel["title"]),
                || async {
                    let r = prometheus.query(&expr).await;
                    (!r.is_empty()).then_some(r.len())
                },
            )
            .await;
            queries += 1;
            assert!(samples >= 1);
        }
    }
    eprintln!(
        "prom: the dashboard's {} panels, {queries} queries, all return data",
        panels.len()
    );
    shop.delete(node).await;
}
