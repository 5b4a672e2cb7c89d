//! The optional API token: from `api_token_file` (a mounted Secret) or `WTC_API_TOKEN`.

use serde_json::json;
use wtc_tests::*;

const TOKEN: &str = "tok-3f9a1c77e2b54d0a";

struct Setup {
    bed: TestBed,
    dir: std::path::PathBuf,
}

async fn setup() -> Setup {
    let bed = TestBed::new("auth").await;
    let dir = std::env::temp_dir().join("wtc-tests").join(unique("token"));
    std::fs::create_dir_all(&dir).unwrap();
    Setup { bed, dir }
}

impl Setup {
    fn token_file(&self, content: &str) -> String {
        let path = self.dir.join("api-token");
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }

    fn fixture(&self) -> Fixture {
        self.bed.fixture()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `req` with `Authorization` set to `auth` (none for `None`).
async fn with_auth(sc: &Sidecar, req: reqwest::RequestBuilder, auth: Option<&str>) -> Reply {
    let req = match auth {
        Some(a) => req.header("authorization", a),
        None => req,
    };
    sc.send(req).await
}

fn assert_unauthorized(r: &Reply, what: &str) {
    assert_eq!(
        (r.status, r.error_code()),
        (401, "unauthorized"),
        "{what}: {}",
        r.raw
    );
    assert!(!r.raw.contains(TOKEN), "the token leaked: {}", r.raw);
}

#[tokio::test]
async fn token_from_file_is_required_everywhere_but_the_health_checks() {
    let s = setup().await;
    let file = s.token_file(&format!("{TOKEN}\n"));
    let sc = s
        .fixture()
        .with(|c| c.api_token_file = Some(file))
        .start()
        .await
        .with_token(TOKEN);
    let url = sc.url("accounts", "k");
    let bearer = format!("Bearer {TOKEN}");

    let wrong_same_length = format!("Bearer {}X", &TOKEN[..TOKEN.len() - 1]);
    for auth in [
        None,
        Some("Bearer nope"),
        Some(wrong_same_length.as_str()),
        Some("Bearer "),
        Some(&format!("Basic {TOKEN}")),
        Some(TOKEN),
    ] {
        let r = with_auth(&sc, sc.http.get(&url), auth).await;
        assert_unauthorized(&r, &format!("GET with {auth:?}"));
        let resp = sc.http.get(&url).send().await.unwrap();
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let r = with_auth(&sc, sc.http.put(&url).json(&json!({"n": 1})), auth).await;
        assert_unauthorized(&r, &format!("PUT with {auth:?}"));
    }
    let r = with_auth(&sc, sc.http.get(format!("{}/metrics", sc.base)), None).await;
    assert_unauthorized(&r, "/metrics without the token");
    let r = with_auth(&sc, sc.http.get(format!("{}/nowhere", sc.base)), None).await;
    assert_unauthorized(&r, "an unknown route without the token");

    // With the token: the whole API.
    let put = with_auth(&sc, sc.http.put(&url).json(&json!({"n": 1})), Some(&bearer)).await;
    assert_eq!(put.status, 201, "{}", put.raw);
    let get = with_auth(&sc, sc.http.get(&url), Some(&bearer)).await;
    assert_eq!((get.status, get.version()), (200, put.version()));
    let del = with_auth(&sc, sc.http.delete(&url), Some(&bearer)).await;
    assert_eq!(del.status, 200, "{}", del.raw);
    // The harness's calls carry the token.
    assert_eq!(
        sc.metric("wtc_requests_unauthorized_total").await,
        20.0,
        "18 refused on the entity route, /metrics and the unknown route"
    );

    // Health checks are open.
    for path in ["/healthz", "/readyz"] {
        let r = with_auth(&sc, sc.http.get(format!("{}{path}", sc.base)), None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.raw);
    }
}

#[tokio::test]
async fn environment_token_overrides_the_file() {
    let s = setup().await;
    let file = s.token_file("from-the-file");
    let sc = s
        .fixture()
        .with(|c| c.api_token_file = Some(file))
        .env("WTC_API_TOKEN", TOKEN)
        .start()
        .await;
    let url = sc.url("accounts", "k");
    let r = with_auth(&sc, sc.http.get(&url), Some("Bearer from-the-file")).await;
    assert_unauthorized(&r, "the file's token");
    let r = with_auth(&sc, sc.http.get(&url), Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(r.status, 404, "{}", r.raw);

    // Without any token configured the API is open (every other suite relies on it too).
    let open = s.fixture().start().await;
    assert_eq!(open.get("accounts", "k").await.status, 404);
}

/// The pod-facing listener (`metrics_listen`, for Prometheus) serves `/metrics`, `/healthz` and
/// `/readyz` without the token, and nothing else: no entity route, no batch, no OpenAPI, no
/// other method; the API on loopback still wants the token.
#[tokio::test]
async fn the_metrics_listener_serves_metrics_and_health_only() {
    let s = setup().await;
    let sc = s
        .fixture()
        .with(|c| c.metrics_listen = Some("127.0.0.1:0".into()))
        .env("WTC_API_TOKEN", TOKEN)
        .start()
        .await;
    let sc = sc.with_token(TOKEN);
    let put = sc
        .send(sc.authed(sc.http.put(sc.url("accounts", "m")).json(&json!({"n": 1}))))
        .await;
    assert_eq!(put.status, 201, "{}", put.raw);
    let m = sc
        .metrics_base
        .clone()
        .expect("the metrics listener's address");
    assert_ne!(m, sc.base);

    let metrics = with_auth(&sc, sc.http.get(format!("{m}/metrics")), None).await;
    assert_eq!(metrics.status, 200, "{}", metrics.raw);
    assert!(
        metrics
            .raw
            .contains("wtc_writes_total{entity=\"accounts\",outcome=\"ok\"} 1"),
        "{}",
        metrics.raw
    );
    for path in ["/healthz", "/readyz"] {
        let r = with_auth(&sc, sc.http.get(format!("{m}{path}")), None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.raw);
    }
    // Data is not reachable there, with or without the token.
    for auth in [None, Some(format!("Bearer {TOKEN}"))] {
        for req in [
            sc.http.get(format!("{m}/v1/entities/accounts/m")),
            sc.http
                .put(format!("{m}/v1/entities/accounts/m"))
                .body("{}"),
            sc.http.post(format!("{m}/v1/batch")).body("[]"),
            sc.http.get(format!("{m}/openapi.json")),
        ] {
            let r = with_auth(&sc, req, auth.as_deref()).await;
            assert_eq!((r.status, r.error_code()), (404, "no_route"), "{}", r.raw);
        }
    }
    let post = with_auth(&sc, sc.http.post(format!("{m}/metrics")), None).await;
    assert_eq!(post.status, 405, "{}", post.raw);
    // The API itself is unchanged: the token is still needed there.
    let r = with_auth(&sc, sc.http.get(sc.url("accounts", "m")), None).await;
    assert_eq!(r.status, 401, "{}", r.raw);
}
