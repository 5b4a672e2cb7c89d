//! The OpenAPI document (`docs/openapi.json`, served at `GET /openapi.json`) against the running
//! sidecar: schemathesis (installed by `scripts/local-services`) generates requests for every
//! operation and fails on a server error or an answer the document does not describe.

use serde_json::{Value, json};
use std::time::Duration;
use wtc_tests::*;

#[tokio::test]
async fn served_document_is_the_repository_copy() {
    let redis = RedisServer::start().await;
    let pool = pg().await;
    let table = unique("openapi_doc");
    create_table(&pool, &table).await;
    let sc = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .start()
        .await;
    let r = sc
        .send(sc.http.get(format!("{}/openapi.json", sc.base)))
        .await;
    assert_eq!(r.status, 200);
    let file: Value =
        serde_json::from_str(include_str!("../../../docs/openapi.json")).expect("valid JSON");
    assert_eq!(r.body, file);
    assert!(r.body["openapi"].as_str().unwrap().starts_with("3."));
    let paths = r.body["paths"].as_object().unwrap();
    for path in [
        "/v1/entities/{entity}/{key}",
        "/v1/entities/{entity}/_bulk_get",
        "/v1/batch",
        "/metrics",
        "/healthz",
        "/readyz",
        "/openapi.json",
    ] {
        assert!(paths.contains_key(path), "{path} is not documented");
    }
    let r = sc
        .send(sc.http.post(format!("{}/openapi.json", sc.base)))
        .await;
    assert_eq!(r.status, 405);
}

/// The schemathesis command line: `st` or `schemathesis` on the PATH, else in `~/.local/bin`
/// (where `scripts/local-services` installs it for a system Python).
fn schemathesis() -> std::process::Command {
    let local = std::env::var("HOME").map(|h| format!("{h}/.local/bin/st"));
    let candidates = ["st".to_string(), "schemathesis".to_string()]
        .into_iter()
        .chain(local);
    for cmd in candidates {
        if std::process::Command::new(&cmd)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return std::process::Command::new(cmd);
        }
    }
    panic!("schemathesis is not installed: run scripts/local-services");
}

#[tokio::test]
async fn schemathesis_finds_no_server_errors_and_no_schema_violations() {
    let redis = RedisServer::start().await;
    let pool = pg().await;
    let table = unique("openapi");
    create_table(&pool, &table).await;
    let sc = Fixture::new(&redis.url())
        .entity("accounts", &table)
        .start()
        .await;
    sc.put("accounts", "alice", json!({"owner": "Alice", "n": 1}))
        .await;

    // The document as served, narrowed to this sidecar: its one entity, and row bodies with the
    // demo table's columns (unknown columns are still tried: additional properties stay allowed).
    let mut doc: Value = sc
        .http
        .get(format!("{}/openapi.json", sc.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    doc["components"]["parameters"]["entity"]["schema"] =
        json!({"type": "string", "enum": ["accounts"]});
    for item in ["BatchWrite", "BatchKey"] {
        doc["components"]["schemas"][item]["properties"]["entity"] = json!({"enum": ["accounts"]});
    }
    doc["components"]["schemas"]["Row"]["properties"] = json!({
        "owner": {"type": "string", "nullable": true},
        "balance": {"type": "number"},
        "n": {"type": "integer", "nullable": true},
    });
    let dir = std::env::temp_dir().join(unique("schemathesis"));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = dir.join("openapi.json");
    std::fs::write(&schema, doc.to_string()).unwrap();

    let examples = std::env::var("WTC_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "60".to_string());
    let seed = std::env::var("WTC_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".to_string());
    let mut cmd = schemathesis();
    cmd.arg("run")
        .arg(&schema)
        .args(["--url", &sc.base])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--max-examples", &examples])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--request-timeout", "10"])
        .args(["--seed", &seed])
        .current_dir(&dir)
        .env("NO_COLOR", "1");
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::from(cmd).output(),
    )
    .await
    .expect("schemathesis finished within 10 minutes")
    .expect("schemathesis ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "schemathesis failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let _ = std::fs::remove_dir_all(&dir);
}
