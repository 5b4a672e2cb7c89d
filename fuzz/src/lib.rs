//! What the fuzz targets share: one tokio runtime for the whole run, sidecars whose backends
//! fail fast, and the checks every answer of the API must pass.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::sync::{Arc, OnceLock};
use tokio::runtime::Runtime;
use tower_service::Service;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, Request, StatusCode, header};
use warp::reply::Response;
use wtc_config::{Overrides, SidecarConfig};
use wtc_sidecar::http::{self, App};

/// A PostgreSQL that is not there: a Unix socket path that does not exist. Connecting fails at
/// once (ENOENT), where a closed loopback port (`postgres://wtc@127.0.0.1:1/wtc`) makes the pool
/// retry the refused connection until its acquire timeout (1 ms at least, a timer tick): ~40x
/// fewer inputs per second for the same answers (503 database_unavailable). The environment
/// variable `WTC_FUZZ_DATABASE_URL` overrides it.
pub const DATABASE_URL: &str = "postgres://wtc@localhost/wtc?host=/nonexistent/wtc-fuzz";
/// A Redis that is not there.
pub const DEAD_REDIS_URL: &str = "redis://127.0.0.1:1";
/// The API token of the sidecar that requires one.
pub const TOKEN: &str = "fuzz-token-0123456789";
/// The configured entities; any other name is unknown.
pub const ENTITIES: [&str; 2] = ["accounts", "order-items_2"];
/// Small limits, so that the fuzzer reaches them.
pub const MAX_BODY_BYTES: usize = 4096;
pub const MAX_KEY_BYTES: usize = 64;
pub const MAX_BATCH_ITEMS: usize = 8;

/// Whether `WTC_FUZZ_DEBUG` is set: the targets then print what they send and receive.
pub fn debug() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("WTC_FUZZ_DEBUG").is_some())
}

/// One current-thread runtime for the whole process: every input is one `block_on`, and tasks the
/// sidecar spawns (writes, refreshes, reconnects) run inside those calls.
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// The configuration of the fuzzed sidecars. Backends fail fast: connecting to the database fails
/// at once (and the pool gives up on an acquire after 1 ms in any case), the first Redis error
/// keeps a dead Redis marked down for `redis_down_backoff_ms` (no further Redis calls), and a
/// failed cache step is not retried.
pub fn config(redis_url: &str, redis_down_backoff_ms: u64) -> SidecarConfig {
    let text = format!(
        r#"
listen = "127.0.0.1:7480"

[database]
url = "{database_url}"
pool_size = 2
statement_timeout_ms = 1

[redis]
url = "{redis_url}"
connect_timeout_ms = 2000
response_timeout_ms = 2000

[cache]
lease_wait_ms = 1
redis_down_backoff_ms = {redis_down_backoff_ms}
early_expiration_beta = 1.0

[cache.retry]
retries = 0

[limits]
max_body_bytes = {MAX_BODY_BYTES}
max_key_bytes = {MAX_KEY_BYTES}
max_batch_items = {MAX_BATCH_ITEMS}
max_in_flight = 16
max_queue_wait_ms = 50

[sampler]
enabled = false

[[entities]]
name = "{e0}"
table = "accounts"

[[entities]]
name = "{e1}"
table = "order_items"
"#,
        database_url = std::env::var("WTC_FUZZ_DATABASE_URL").unwrap_or(DATABASE_URL.into()),
        e0 = ENTITIES[0],
        e1 = ENTITIES[1],
    );
    SidecarConfig::parse(&text, &Overrides::default()).expect("the fuzz configuration is valid")
}

/// The sidecar's whole HTTP surface as one boxed filter. Built inside the runtime: the database
/// pool and the Redis client need one.
pub fn sidecar_filter(config: SidecarConfig, token: Option<&str>) -> BoxedFilter<(Response,)> {
    let _guard = runtime().enter();
    let sc = wtc_sidecar::sidecar(config).expect("the sidecar starts without its backends");
    http::routes(Arc::new(App::new(Arc::new(sc), token))).boxed()
}

/// One request, as the sidecar's server (`server.rs`) handles it once hyper has parsed it: the
/// target check (`http::check_target`), then the filter as a service (`warp::service`). Returns
/// the whole answer.
pub async fn call(
    filter: &BoxedFilter<(Response,)>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, Bytes) {
    let res = match http::check_target(req.uri()) {
        Some(refused) => refused,
        None => match warp::service(filter.clone()).call(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
    };
    let (parts, body) = res.into_parts();
    let body = body
        .collect()
        .await
        .expect("a response body that cannot be read")
        .to_bytes();
    (parts.status, parts.headers, body)
}

/// Every error answer: JSON `{"error": {"code", "message"}}` (and `item` for an item of a batch),
/// with a code that belongs to its status. Returns the code.
pub fn check_error(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> String {
    assert_eq!(
        headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes()),
        Some(&b"application/json"[..]),
        "error {status} without Content-Type: application/json"
    );
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "error {status}: the body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    let err = v
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("error {status} without an error object: {v}"));
    let code = err
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("error {status} without error.code: {v}"));
    assert!(
        err.get("message").is_some_and(Value::is_string),
        "error {status} without error.message: {v}"
    );
    if let Some(item) = err.get("item") {
        assert!(item.is_u64(), "error.item is not an index: {v}");
    }
    let allowed: &[&str] = match status.as_u16() {
        400 => &[
            "invalid_target",
            "invalid_key",
            "invalid_if_match",
            "invalid_min_version",
            "invalid_body",
            "invalid_op",
            "duplicate_key",
        ],
        401 => &["unauthorized"],
        404 => &["no_route", "unknown_entity", "not_found"],
        405 => &["method_not_allowed"],
        413 => &["body_too_large", "batch_too_large"],
        503 => &["database_unavailable"],
        other => panic!("status {other} ({code}) is not allowed while the backends are down: {v}"),
    };
    assert!(
        allowed.contains(&code),
        "error code {code:?} does not go with status {status}: {v}"
    );
    match code {
        "method_not_allowed" => assert!(headers.contains_key(header::ALLOW), "405 without Allow"),
        "unauthorized" => assert_eq!(
            headers.get(header::WWW_AUTHENTICATE).map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        ),
        "database_unavailable" if err.get("item").is_none() && body_is_db_error(&v) => {
            assert!(
                headers.contains_key(header::RETRY_AFTER),
                "503 database_unavailable without Retry-After"
            )
        }
        _ => {}
    }
    code.to_string()
}

/// `/readyz` answers 503 database_unavailable without Retry-After; a failed statement with it.
fn body_is_db_error(v: &Value) -> bool {
    v["error"]["message"] == "the database is unavailable"
}
