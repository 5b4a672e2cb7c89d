//! The chart's alert rules (`charts/wtc-operator/files/alerts.yaml`) checked by promtool: they
//! parse, and each fires on the series that should raise it, and only then
//! (`charts/wtc-operator/tests/alerts_test.yaml`). promtool comes from `scripts/local-services`.

use std::process::Command;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/wtc-operator");

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(CHART)
        .output()
        .expect("promtool is installed by scripts/local-services");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_parse_and_fire_when_they_should() {
    let checked = promtool(&["check", "rules", "files/alerts.yaml"]);
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "tests/alerts_test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}
