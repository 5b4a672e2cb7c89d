//! helm from the cache folder: `helm version`, `helm template` of a tiny chart, and
//! `helm install` of it into the test control plane.

use std::fs;
use std::path::Path;

use k8s_openapi::api::core::v1::ConfigMap;
use wtc_k8s_harness::{helm_command, shared};

fn tiny_chart(dir: &Path) {
    fs::create_dir_all(dir.join("templates")).unwrap();
    fs::write(
        dir.join("Chart.yaml"),
        "apiVersion: v2\nname: tiny\nversion: 0.1.0\nappVersion: \"1.0\"\n",
    )
    .unwrap();
    fs::write(dir.join("values.yaml"), "greeting: hello\n").unwrap();
    fs::write(
        dir.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n\
         data:\n  greeting: {{ .Values.greeting | quote }}\n",
    )
    .unwrap();
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("run helm");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn isolated(cmd: &mut std::process::Command, home: &Path) {
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
}

#[test]
fn helm_version() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = helm_command().expect("helm in KUBEBUILDER_ASSETS");
    isolated(&mut cmd, home.path());
    let out = run(cmd.args(["version", "--short"]));
    assert!(out.starts_with("v3."), "unexpected helm version: {out}");
}

#[test]
fn helm_template_renders_tiny_chart() {
    let tmp = tempfile::tempdir().unwrap();
    let chart = tmp.path().join("tiny");
    tiny_chart(&chart);
    let mut cmd = helm_command().expect("helm in KUBEBUILDER_ASSETS");
    isolated(&mut cmd, &tmp.path().join("home"));
    let out = run(cmd
        .args(["template", "rel"])
        .arg(&chart)
        .args(["--set", "greeting=hi"]));
    assert!(out.contains("name: rel-cm"), "{out}");
    assert!(out.contains("greeting: \"hi\""), "{out}");
}

#[tokio::test]
async fn helm_install_into_control_plane() {
    let cp = shared();
    let ns = cp.namespace("helm").await.expect("namespace");
    let tmp = tempfile::tempdir().unwrap();
    let chart = tmp.path().join("tiny");
    tiny_chart(&chart);
    let out = run(cp.helm().args(["install", "inst"]).arg(&chart).args([
        "--namespace",
        ns.name(),
        "--wait",
        "--timeout",
        "60s",
    ]));
    assert!(out.contains("STATUS: deployed"), "{out}");
    let cm = ns
        .api::<ConfigMap>()
        .get("inst-cm")
        .await
        .expect("configmap");
    assert_eq!(
        cm.data
            .unwrap_or_default()
            .get("greeting")
            .map(String::as_str),
        Some("hello")
    );
}
