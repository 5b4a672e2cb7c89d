//! A tiny accounts service, the application of the README's Kubernetes example. It keeps no
//! state and opens no database connection: every account goes through the wtc sidecar injected
//! next to it, on `127.0.0.1` inside the pod.
//!
//! ```text
//! wtc-demo-app [serve]      HTTP on $LISTEN (0.0.0.0:8080): GET|PUT|DELETE /accounts/{id}, /healthz
//! wtc-demo-app get ID       one call to the sidecar, printed (for `kubectl exec`)
//! wtc-demo-app put ID JSON
//! wtc-demo-app metrics      the sidecar's /metrics, as seen from inside the pod
//! ```
//!
//! Answers carry the sidecar's status, body, `ETag` and `X-Wtc-Cache`, so a caller sees what the
//! cache did. `WTC_SIDECAR_URL` (default `http://127.0.0.1:7480`) and `WTC_ENTITY` (`accounts`)
//! say where the rows go.
#![forbid(unsafe_code)]

use bytes::Bytes;
use std::process::ExitCode;
use std::time::Duration;
use warp::Filter;
use warp::http::{HeaderMap, Method, StatusCode};

const USAGE: &str = "usage: wtc-demo-app [serve] | get ID | put ID JSON | delete ID | metrics
Environment: LISTEN (0.0.0.0:8080), WTC_SIDECAR_URL (http://127.0.0.1:7480), WTC_ENTITY (accounts).";

/// Headers passed through in each direction: conditional writes and read-your-writes in,
/// what the cache did out.
const REQUEST_HEADERS: [&str; 4] = [
    "if-match",
    "if-none-match",
    "x-wtc-min-version",
    "authorization",
];
const REPLY_HEADERS: [&str; 4] = ["etag", "x-wtc-cache", "retry-after", "content-type"];

#[derive(Clone)]
struct Sidecar {
    http: reqwest::Client,
    base: String,
    entity: String,
}

impl Sidecar {
    fn from_env() -> Result<Self, String> {
        let base =
            std::env::var("WTC_SIDECAR_URL").unwrap_or_else(|_| "http://127.0.0.1:7480".into());
        let entity = std::env::var("WTC_ENTITY").unwrap_or_else(|_| "accounts".into());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            entity,
        })
    }

    fn account_url(&self, id: &str) -> String {
        format!("{}/v1/entities/{}/{id}", self.base, self.entity)
    }

    /// One call to the sidecar; `id` is already a percent-encoded path segment.
    async fn call(
        &self,
        method: Method,
        id: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).expect("valid method");
        let mut req = self.http.request(method, self.account_url(id));
        for name in REQUEST_HEADERS {
            if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
                req = req.header(name, v);
            }
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json").body(body);
        }
        req.send().await
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sidecar = match Sidecar::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wtc-demo-app: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wtc-demo-app: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        [] | ["serve"] => rt.block_on(serve(sidecar)),
        ["get", id] => rt.block_on(once(sidecar, Method::GET, id, Bytes::new())),
        ["delete", id] => rt.block_on(once(sidecar, Method::DELETE, id, Bytes::new())),
        ["put", id, json] => rt.block_on(once(
            sidecar,
            Method::PUT,
            id,
            Bytes::from(json.to_string()),
        )),
        ["metrics"] => rt.block_on(metrics(sidecar)),
        ["--help" | "-h"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("wtc-demo-app: unexpected arguments {args:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

async fn serve(sidecar: Sidecar) -> ExitCode {
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "0.0.0.0:8080".into());
    let addr: std::net::SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(_) => {
            eprintln!("wtc-demo-app: LISTEN={listen:?} is not host:port");
            return ExitCode::from(2);
        }
    };
    let health = warp::path!("healthz").and(warp::get()).map(|| "ok");
    let to_sidecar = sidecar.clone();
    // A body only on PUT, of a declared length up to 1 MiB; GET and DELETE carry none.
    let body = warp::put()
        .and(warp::body::content_length_limit(1 << 20))
        .and(warp::body::bytes())
        .or(warp::get().or(warp::delete()).unify().map(Bytes::new))
        .unify();
    let accounts = warp::path!("accounts" / String)
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(body)
        .and(warp::any().map(move || to_sidecar.clone()))
        .then(forward);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wtc-demo-app: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Injected as a native sidecar with a startup probe, the sidecar listens before this
    // container starts: say whether it did, so a missing startup ordering shows in the log.
    let sidecar_up = sidecar
        .http
        .get(format!("{}/healthz", sidecar.base))
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    tracing::info!(%addr, sidecar_answered_at_start = sidecar_up, "wtc-demo-app listening");
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            term.recv().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    warp::serve(health.or(accounts))
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
    ExitCode::SUCCESS
}

async fn forward(
    id: String,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
    sidecar: Sidecar,
) -> warp::reply::Response {
    match sidecar.call(method, &id, &headers, body).await {
        Ok(resp) => {
            let status =
                StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut out = warp::http::Response::builder().status(status);
            for name in REPLY_HEADERS {
                if let Some(v) = resp.headers().get(name).and_then(|v| v.to_str().ok()) {
                    out = out.header(name, v);
                }
            }
            match resp.bytes().await {
                Ok(b) => out
                    .body(b.into())
                    .unwrap_or_else(|_| bad_gateway("bad reply")),
                Err(e) => bad_gateway(&e.to_string()),
            }
        }
        Err(e) => bad_gateway(&e.to_string()),
    }
}

fn bad_gateway(detail: &str) -> warp::reply::Response {
    tracing::warn!(%detail, "the sidecar did not answer");
    error(
        StatusCode::BAD_GATEWAY,
        "sidecar_unreachable",
        "the wtc sidecar on 127.0.0.1 did not answer",
    )
}

fn error(status: StatusCode, code: &str, message: &str) -> warp::reply::Response {
    let body = format!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#);
    warp::http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body.into())
        .expect("static response")
}

/// One call, printed as `STATUS X-Wtc-Cache` then the body; exit 0 on 2xx.
async fn once(sidecar: Sidecar, method: Method, id: &str, body: Bytes) -> ExitCode {
    match sidecar.call(method, id, &HeaderMap::new(), body).await {
        Ok(resp) => {
            let status = resp.status();
            let cache = resp
                .headers()
                .get("x-wtc-cache")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            let body = resp.text().await.unwrap_or_default();
            println!("{} {cache}\n{body}", status.as_u16());
            if status.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("wtc-demo-app: the sidecar did not answer: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn metrics(sidecar: Sidecar) -> ExitCode {
    let url = format!("{}/metrics", sidecar.base);
    let mut req = sidecar.http.get(url);
    if let Ok(token) = std::env::var("WTC_API_TOKEN") {
        req = req.bearer_auth(token);
    }
    match req.send().await {
        Ok(resp) if resp.status().is_success() => {
            print!("{}", resp.text().await.unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(resp) => {
            eprintln!("wtc-demo-app: /metrics answered {}", resp.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("wtc-demo-app: the sidecar did not answer: {e}");
            ExitCode::FAILURE
        }
    }
}
