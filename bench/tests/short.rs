//! Runs `wtc-bench --short` against the real PostgreSQL and Redis (`scripts/test` starts them)
//! and checks that the report holds sane figures. Never asserts on timing: only that every phase
//! ran, answered, and produced non-zero measurements.

use serde_json::Value;
use std::process::Command;

fn num(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}

#[test]
fn short_run_reports_sane_figures() {
    assert!(
        std::env::var_os("WTC_DATABASE_URL").is_some()
            && std::env::var_os("WTC_REDIS_URL").is_some()
            && std::env::var_os("WTC_REDIS_TLS_URL").is_some(),
        "WTC_DATABASE_URL / WTC_REDIS_URL / WTC_REDIS_TLS_URL are not set: run the tests through scripts/test (it starts PostgreSQL and Redis)"
    );
    let dir = std::env::temp_dir().join(format!("wtc-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, doc, png) = (
        dir.join("report.json"),
        dir.join("benchmarks.md"),
        dir.join("latency.png"),
    );
    // The sidecar runs as a child process of the bench binary itself (`embedded`): the same
    // entry point as target/release/wtc-sidecar, without needing a release build here.
    let sidecar = std::env::var("WTC_BENCH_SIDECAR").unwrap_or_else(|_| "embedded".into());
    let dapr_png = dir.join("dapr.png");
    let with_dapr = std::env::var_os("WTC_DAPRD").is_some();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wtc-bench"));
    cmd.args(["--short", "--sidecar", &sidecar, "--json"])
        .arg(&json)
        .arg("--doc")
        .arg(&doc)
        .arg("--plot")
        .arg(&png);
    if with_dapr {
        cmd.arg("--dapr-plot").arg(&dapr_png);
    }
    let out = cmd.output().expect("run wtc-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "wtc-bench --short failed:\n{stderr}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["short"], true);
    let phases = report["phases"].as_array().expect("phases");
    // hits: 2 rates x 5 targets; misses and writes: 2 rates x 2 targets; peaks: 3 x 2 + the hop.
    assert_eq!(phases.len(), 10 + 4 + 4 + 7, "{phases:?}");
    let mut sidecar_cpu = 0.0;
    for p in phases {
        let ok = num(p, "ok");
        let bad = num(p, "bad");
        assert!(ok > 0.0, "no request answered as expected: {p}");
        assert!(
            ok >= 0.9 * (ok + bad),
            "too many unexpected answers: {p}\n{stderr}"
        );
        assert!(num(p, "throughput") > 0.0, "{p}");
        let pcts = ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"].map(|f| num(p, f));
        assert!(pcts[0] > 0.0, "zero p50: {p}");
        assert!(
            pcts.windows(2).all(|w| w[0] <= w[1]),
            "percentiles out of order: {p}"
        );
        if p["target"] == "sidecar" || p["target"] == "HTTP hop alone" {
            assert!(num(&p["cpu_us_per_req"], "server") > 0.0, "{p}");
        }
        if p["target"] == "sidecar" {
            sidecar_cpu += num(p, "sidecar_cpu_us_per_req");
            assert!(num(p, "sidecar_rss_max_kib") > 0.0, "{p}");
        }
    }
    assert!(sidecar_cpu > 0.0, "the sidecar used no CPU at all?");
    assert!(report["rss_idle_kib"].as_f64().unwrap_or(0.0) > 0.0);
    for h in report["herds"].as_array().expect("herds") {
        assert_eq!(num(h, "failed"), 0.0, "{h}");
        for r in h["db_reads"].as_array().unwrap() {
            // A cold key is read from the database at least once; how often more is the figure.
            assert!(r.as_i64().unwrap() >= 1, "{h}");
        }
    }
    for b in report["batches"].as_array().expect("batches") {
        assert!(num(b, "batches") > 0.0 && num(b, "p50_ms") > 0.0, "{b}");
        assert_eq!(num(b, "bad_writes"), 0.0, "{b}");
    }
    // The tls part (scripts/local-services gives Redis a TLS port): a hit rate, a write rate and
    // peak hits, on plain TCP and on TLS.
    let tls = report["tls"].as_array().expect("tls");
    assert_eq!(tls.len(), 6, "{tls:?}\n{stderr}");
    for p in tls {
        assert!(
            num(p, "ok") > 0.0 && num(p, "bad") <= 0.1 * num(p, "ok"),
            "{p}"
        );
        assert!(num(&p["cpu_us_per_req"], "server") > 0.0, "{p}");
    }
    assert!(tls.iter().any(|p| p["target"] == "sidecar, TLS"), "{tls:?}");
    // The dapr part, when scripts/test gave a daprd (WTC_DAPRD, from scripts/daprd): every rate
    // and both peaks, for in-process, the sidecar and daprd's two stores, all answered.
    let dapr = report["dapr"].as_array().expect("dapr");
    if with_dapr {
        assert_eq!(dapr.len(), 4 * (2 + 2 + 2), "{dapr:?}\n{stderr}");
        for p in dapr {
            assert!(
                num(p, "ok") > 0.0 && num(p, "bad") <= 0.1 * num(p, "ok"),
                "{p}\n{stderr}"
            );
            if p["target"].as_str().unwrap().starts_with("daprd") {
                assert!(num(&p["cpu_us_per_req"], "server") > 0.0, "{p}");
                assert!(num(p, "sidecar_rss_max_kib") > 0.0, "{p}");
            }
        }
        assert!(num(&report, "dapr_rss_idle_kib") > 0.0);
    } else {
        assert!(dapr.is_empty(), "{dapr:?}");
    }
    assert!(!report["targets"].as_array().unwrap().is_empty());
    let md = std::fs::read_to_string(&doc).unwrap();
    if !dapr.is_empty() {
        assert!(md.contains("### Side by side with Dapr"), "{md}");
    }
    assert!(
        md.contains("wtc-bench:begin") && md.contains("| hit |") && md.contains("### TLS to Redis"),
        "{md}"
    );
    let png_bytes = std::fs::read(&png).unwrap();
    assert!(png_bytes.starts_with(b"\x89PNG"), "not a PNG");
    if with_dapr {
        let png_bytes = std::fs::read(&dapr_png).unwrap();
        assert!(
            png_bytes.starts_with(b"\x89PNG"),
            "the dapr plot is not a PNG"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
