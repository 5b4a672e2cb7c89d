//! Seeing the sidecars: a real Prometheus (Debian's, the package that brings promtool) on this
//! machine scrapes the injected sidecars and the operator on the pod network, by the ports the
//! chart's PodMonitor and ServiceMonitor name (`wtc-metrics`, `metrics`), and evaluates the
//! chart's alert rules on what it scraped; every query of the chart's Grafana dashboard returns data.
//!
//! Debian's Prometheus is built without `kubernetes_sd_configs` ("field kubernetes_sd_configs
//! not found in type config.ScrapeConfig"), so the test does the discovery's part: it lists the
//! pods through the API and hands Prometheus their addresses by file (`file_sd_configs`),
//! selected as the PodMonitor selects them (label `wtc.dev/injected-for`, port `wtc-metrics`).

use crate::{Node, Shop, ShopOptions, node, repo_root, serial, wait_for};
use serde_json::Value;
use std::time::{Duration, Instant};

struct Prometheus {
    child: std::process::Child,
    base: String,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("wtc-prometheus-{:x}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = repo_root().join("charts/wtc-operator/files/alerts.yaml");
        let config = format!(
            "global: {{scrape_interval: 2s, evaluation_interval: 2s}}\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n\
             - job_name: wtc-sidecars\n  \
               file_sd_configs: [{{files: [{dir}/sidecars.json], refresh_interval: 2s}}]\n\
             - job_name: wtc-operator\n  \
               file_sd_configs: [{{files: [{dir}/operator.json], refresh_interval: 2s}}]\n",
            rules = rules.display(),
            dir = dir.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = wtc_tests::free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = std::process::Command::new("prometheus")
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
            .expect("prometheus (Debian's package, installed by scripts/local-services)");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }

    /// Targets by the port named `port` of the pods `selector` selects (all namespaces), with
    /// `namespace` and `pod` labels, as the PodMonitor would give them.
    async fn discover(&self, node: &Node, file: &str, selector: &str, port: &str) -> usize {
        let pods = node.json(&["get", "pods", "-A", "-l", selector]).await;
        let mut groups = vec![];
        for p in pods["items"].as_array().into_iter().flatten() {
            let ip = p["status"]["podIP"].as_str().unwrap_or_default();
            let containers = ["initContainers", "containers"]
                .iter()
                .filter_map(|k| p["spec"][k].as_array())
                .flatten();
            for c in containers {
                for pt in c["ports"].as_array().into_iter().flatten() {
                    if pt["name"] == port && !ip.is_empty() {
                        groups.push(serde_json::json!({
                            "targets": [format!("{ip}:{}", pt["containerPort"])],
                            "labels": {
                                "namespace": p["metadata"]["namespace"],
                                "pod": p["metadata"]["name"],
                            }
                        }));
                    }
                }
            }
        }
        let tmp = self.dir.join(format!("{file}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&groups).unwrap()).unwrap();
        std::fs::rename(&tmp, self.dir.join(file)).unwrap();
        groups.len()
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
    let prometheus = Prometheus::start();
    let sidecars = prometheus
        .discover(node, "sidecars.json", "wtc.dev/injected-for", "wtc-metrics")
        .await;
    let operators = prometheus
        .discover(
            node,
            "operator.json",
            "app.kubernetes.io/name=wtc-operator",
            "metrics",
        )
        .await;
    assert!(
        sidecars >= 1 && operators == 2,
        "targets: {sidecars} sidecars, {operators} operator replicas"
    );
    let put = shop
        .exec(node, &["put", "seen", r#"{"owner": "p"}"#])
        .await
        .unwrap();
    assert!(put.starts_with("201"), "{put}");
    let hit = shop.exec(node, &["get", "seen"]).await.unwrap();
    assert!(hit.starts_with("200"), "{hit}");
    let pod = shop.pod_name(node).await;

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
    let quiet = wait_for(
        Duration::from_secs(30),
        "the rules evaluated, none pending",
        || async {
            let d = prometheus.api("/api/v1/rules", &[]).await?;
            let rules: Vec<Value> = d["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let healthy = rules.len() == 8 && rules.iter().all(|r| r["health"] == "ok");
            (healthy && rules.iter().all(|r| r["state"] == "inactive")).then_some(rules.len())
        },
    )
    .await;
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
