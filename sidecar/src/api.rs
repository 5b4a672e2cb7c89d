//! The localhost HTTP API (warp). Translates requests into calls on the protocol (`read.rs`,
//! `write.rs`) and their outcomes into responses; holds no protocol logic of its own.
//!
//! Every error is a JSON body `{"error": {"code": "...", "message": "..."}}` with a specific
//! status; nothing the client sends can produce a 500, and no SQL reaches a message.

use crate::batch::{Batch, BatchError, BatchOutcome, BatchWrite, WriteOp, summary};
use crate::db::DbError;
use crate::envelope::Envelope;
use crate::sidecar::{CacheStatus, ReadOutcome, Sidecar, WriteError, WriteOutcome};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use warp::Filter;
use warp::http::{HeaderMap, Method, StatusCode, header};
use warp::path::FullPath;
use warp::reply::Response;

pub const CACHE_HEADER: &str = "x-wtc-cache";
/// On a GET: the lowest version the answer may have (read-your-writes across requests).
pub const MIN_VERSION_HEADER: &str = "x-wtc-min-version";

pub fn routes(
    sc: Arc<Sidecar>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method: Method, path: FullPath, headers: HeaderMap, body| {
                let sc = Arc::clone(&sc);
                async move { handle(sc, method, path.as_str(), &headers, body).await }
            },
        )
}

/// A request target the routes cannot take: one without a path (the authority form,
/// `GET a:1 HTTP/1.1`). `server` answers it before warp, whose path filters panic on it.
pub fn check_target(uri: &warp::http::Uri) -> Option<Response> {
    if uri.path_and_query().is_some() {
        return None;
    }
    Some(error(
        StatusCode::BAD_REQUEST,
        "invalid_target",
        "the request target must be a path, like /v1/entities/{entity}/{key}".into(),
    ))
}

async fn handle<S, B>(
    sc: Arc<Sidecar>,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: S,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    // The API token, when one is set: everything but the health checks needs it.
    if let Some(token) = &sc.api_token
        && !matches!(path, "/healthz" | "/readyz")
        && !token.allows(headers)
    {
        sc.metrics.requests_unauthorized.inc();
        return unauthorized();
    }
    match path {
        "/healthz" => {
            return only_get(&method)
                .unwrap_or_else(|| json_response(StatusCode::OK, json!({"status": "ok"})));
        }
        "/readyz" => {
            return match only_get(&method) {
                Some(r) => r,
                None => Box::pin(ready(&sc)).await,
            };
        }
        "/metrics" => {
            return only_get(&method).unwrap_or_else(|| {
                let mut r = Response::new(sc.metrics.render().into());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            });
        }
        "/openapi.json" => {
            return only_get(&method).unwrap_or_else(|| {
                let mut r = Response::new(OPENAPI.into());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            });
        }
        _ => {}
    }
    #[cfg(feature = "test-hooks")]
    if let Some(rest) = path.strip_prefix("/_test/") {
        return Box::pin(test_hooks::handle(&sc, &method, rest, body)).await;
    }
    // Load shedding: the slot is held until the answer (a write's: until its task ends).
    let Some(slot) = sc.admission.admit(&sc.metrics).await else {
        return overloaded(sc.config.limits.max_in_flight);
    };
    if path == "/v1/batch" {
        if method != Method::POST {
            return only_post(&method);
        }
        let raw = match read_body(headers, body, sc.config.limits.max_body_bytes).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let batch = match parse_batch(&sc, &raw) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let sc2 = Arc::clone(&sc);
        let task = sc.writes_in_flight.spawn(async move {
            let _slot = slot;
            let out = sc2.write_batch(&batch).await;
            (out, batch)
        });
        return match task.await {
            Ok((out, batch)) => batch_response(&sc, &batch, out),
            Err(_) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the batch task failed".into(),
            ),
        };
    }
    let Some(rest) = path.strip_prefix("/v1/entities/") else {
        return error(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("no route for {path}"),
        );
    };
    let Some((entity, raw_key)) = rest.split_once('/') else {
        return error(
            StatusCode::NOT_FOUND,
            "no_route",
            "expected /v1/entities/{entity}/{key}".into(),
        );
    };
    let Some(idx) = sc.entity(entity) else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_entity",
            format!("no entity named {entity:?} is configured"),
        );
    };
    if raw_key == BULK_GET && method == Method::POST {
        let raw = match read_body(headers, body, sc.config.limits.max_body_bytes).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let keys = match parse_bulk_keys(&sc, &raw) {
            Ok(k) => k,
            Err(r) => return r,
        };
        return match Box::pin(sc.read_many(idx, &keys)).await {
            Ok(outcomes) => bulk_response(&keys, &outcomes),
            Err(e) => db_error(e),
        };
    }
    let key = match parse_key(raw_key, sc.config.limits.max_key_bytes) {
        Ok(k) => k,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_key", msg),
    };
    let if_match = match parse_if_match(headers) {
        Ok(v) => v,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_if_match", msg),
    };
    let min_version = match parse_version_header(headers, MIN_VERSION_HEADER, "X-Wtc-Min-Version") {
        Ok(v) => v,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_min_version", msg),
    };
    match method {
        Method::GET | Method::HEAD => read_response(sc.read_at_least(idx, &key, min_version).await),
        Method::PUT => {
            let limit = sc.config.limits.max_body_bytes;
            let raw = match read_body(headers, body, limit).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let (map, raw) = match parse_object(raw) {
                Ok(v) => v,
                Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_body", msg),
            };
            let sc2 = Arc::clone(&sc);
            let task = sc.writes_in_flight.spawn(async move {
                let _slot = slot;
                sc2.put(idx, &key, &map, &raw, if_match).await
            });
            write_response(task.await)
        }
        Method::DELETE => {
            let sc2 = Arc::clone(&sc);
            let task = sc.writes_in_flight.spawn(async move {
                let _slot = slot;
                sc2.delete(idx, &key, if_match).await
            });
            write_response(task.await)
        }
        _ => {
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not supported here; use GET, PUT or DELETE"),
            );
            r.headers_mut().insert(
                header::ALLOW,
                header::HeaderValue::from_static("GET, PUT, DELETE"),
            );
            r
        }
    }
}

/// The OpenAPI 3 document of this API, served at `GET /openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// `POST /v1/entities/{entity}/_bulk_get` reads many keys (`GET` of that path is the key
/// `_bulk_get`).
pub const BULK_GET: &str = "_bulk_get";

fn only_post(method: &Method) -> Response {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not supported here; use POST"),
    );
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
    r
}

/// The rules every key follows, from a URL (after decoding) or a JSON body.
fn check_key(key: &str, max_bytes: usize) -> Result<(), String> {
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    if key.len() > max_bytes {
        return Err(format!(
            "the key is {} bytes long; the limit is {max_bytes}",
            key.len()
        ));
    }
    if key.chars().any(char::is_control) {
        return Err("the key contains control characters".into());
    }
    Ok(())
}

/// An error about one item of a batch or bulk read: `{"error": {..., "item": N}}`.
fn item_error(code: StatusCode, kind: &str, item: usize, message: String) -> Response {
    json_response(
        code,
        json!({"error": {"code": kind, "message": format!("item {item}: {message}"), "item": item}}),
    )
}

fn too_many(what: &str, n: usize, limit: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "batch_too_large",
        format!("{n} {what}; the limit is {limit} (limits.max_batch_items)"),
    )
}

#[allow(clippy::result_large_err)] // the error is the answer, built once
fn body_object(raw: &[u8]) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body must be a JSON object".into(),
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// `{"writes": [{"entity","key","op","data","if_match"}...], "invalidate": [{"entity","key"}...]}`.
#[allow(clippy::result_large_err)] // the error is the answer, built once
fn parse_batch(sc: &Sidecar, raw: &[u8]) -> Result<Batch, Response> {
    let bad = |msg: String| error(StatusCode::BAD_REQUEST, "invalid_body", msg);
    let mut map = body_object(raw)?;
    let limit = sc.config.limits.max_batch_items;
    if let Some(k) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "writes" | "invalidate"))
    {
        return Err(bad(format!(
            "unknown field {k:?}; a batch has writes and invalidate"
        )));
    }
    let writes = match map.remove("writes") {
        Some(Value::Array(a)) => a,
        _ => return Err(bad("writes must be an array of writes".into())),
    };
    let invalidate = match map.remove("invalidate") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("invalidate must be an array of {entity, key}".into())),
    };
    if writes.len() > limit {
        return Err(too_many("writes", writes.len(), limit));
    }
    if invalidate.len() > limit {
        return Err(too_many("keys to invalidate", invalidate.len(), limit));
    }
    let mut batch = Batch::default();
    for (i, item) in writes.into_iter().enumerate() {
        batch.writes.push(parse_batch_write(sc, i, item)?);
    }
    for (i, item) in invalidate.into_iter().enumerate() {
        let ibad = |msg: String| {
            item_error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                i,
                format!("invalidate: {msg}"),
            )
        };
        let Value::Object(mut m) = item else {
            return Err(ibad("must be an object {entity, key}".into()));
        };
        let (idx, key) = entity_and_key(sc, i, &mut m)?;
        if let Some(k) = m.keys().next() {
            return Err(ibad(format!("unknown field {k:?}")));
        }
        batch.invalidate.push((idx, key));
    }
    Ok(batch)
}

/// The `entity` and `key` fields of a batch item, removed from it.
#[allow(clippy::result_large_err)] // the error is the answer, built once
fn entity_and_key(
    sc: &Sidecar,
    i: usize,
    m: &mut Map<String, Value>,
) -> Result<(usize, String), Response> {
    let entity = match m.remove("entity") {
        Some(Value::String(e)) => e,
        _ => {
            return Err(item_error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                i,
                "entity must be a string".into(),
            ));
        }
    };
    let Some(idx) = sc.entity(&entity) else {
        return Err(item_error(
            StatusCode::NOT_FOUND,
            "unknown_entity",
            i,
            format!("no entity named {entity:?} is configured"),
        ));
    };
    let key = match m.remove("key") {
        Some(Value::String(k)) => k,
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            return Err(item_error(
                StatusCode::BAD_REQUEST,
                "invalid_key",
                i,
                "key must be a string".into(),
            ));
        }
    };
    if let Err(msg) = check_key(&key, sc.config.limits.max_key_bytes) {
        return Err(item_error(StatusCode::BAD_REQUEST, "invalid_key", i, msg));
    }
    Ok((idx, key))
}

#[allow(clippy::result_large_err)] // the error is the answer, built once
fn parse_batch_write(sc: &Sidecar, i: usize, item: Value) -> Result<BatchWrite, Response> {
    let bad = |code: &str, msg: String| item_error(StatusCode::BAD_REQUEST, code, i, msg);
    let Value::Object(mut m) = item else {
        return Err(bad(
            "invalid_body",
            "a write must be an object {entity, key, op, data, if_match}".into(),
        ));
    };
    let (idx, key) = entity_and_key(sc, i, &mut m)?;
    let if_match = match m.remove("if_match") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_i64().filter(|v| *v >= 0) {
            Some(v) => Some(v),
            None => {
                return Err(bad(
                    "invalid_if_match",
                    format!("if_match {n} is not a version"),
                ));
            }
        },
        Some(Value::String(s)) => {
            let t = s.strip_prefix("W/").unwrap_or(&s);
            let t = t
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .unwrap_or(t);
            match t.parse::<i64>().ok().filter(|v| *v >= 0) {
                Some(v) => Some(v),
                None => {
                    return Err(bad(
                        "invalid_if_match",
                        format!("if_match {s:?} is not a version"),
                    ));
                }
            }
        }
        Some(_) => return Err(bad("invalid_if_match", "if_match must be a version".into())),
    };
    let op = match (m.remove("op"), m.remove("data")) {
        (Some(Value::String(op)), Some(Value::Object(body))) if op == "put" => {
            let raw = Value::Object(body.clone()).to_string();
            WriteOp::Put { body, raw }
        }
        (Some(Value::String(op)), _) if op == "put" => {
            return Err(bad(
                "invalid_body",
                "a put needs data, a JSON object of column values".into(),
            ));
        }
        (Some(Value::String(op)), None) if op == "delete" => WriteOp::Delete,
        (Some(Value::String(op)), Some(_)) if op == "delete" => {
            return Err(bad("invalid_body", "a delete takes no data".into()));
        }
        _ => return Err(bad("invalid_op", "op must be \"put\" or \"delete\"".into())),
    };
    if let Some(k) = m.keys().next() {
        return Err(bad("invalid_body", format!("unknown field {k:?}")));
    }
    Ok(BatchWrite {
        idx,
        key,
        op,
        if_match,
    })
}

fn batch_response(sc: &Sidecar, batch: &Batch, r: Result<BatchOutcome, BatchError>) -> Response {
    let out = match r {
        Ok(out) => out,
        Err(BatchError::DuplicateKey { first, index }) => {
            return item_error(
                StatusCode::BAD_REQUEST,
                "duplicate_key",
                index,
                format!("the same key as item {first}; give each key once per batch"),
            );
        }
        Err(BatchError::Body { index, error }) => {
            return item_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                index,
                error.to_string(),
            );
        }
        Err(BatchError::PreconditionFailed { index, current }) => {
            let msg = match current {
                Some(v) => format!("if_match does not hold: the row is at version {v}"),
                None => "if_match does not hold: there is no row with this key".into(),
            };
            return json_response(
                StatusCode::PRECONDITION_FAILED,
                json!({"error": {"code": "precondition_failed", "message": format!("item {index}: {msg}; nothing was written"), "item": index, "current": current}}),
            );
        }
        Err(BatchError::NotFound { index }) => {
            return item_error(
                StatusCode::NOT_FOUND,
                "not_found",
                index,
                "no row with this key to delete; nothing was written".into(),
            );
        }
        Err(BatchError::ItemDb { index, error }) => {
            // Statement errors of an item: the database refused it (422), or the key (400), or
            // the database is away (503); the batch rolled back.
            let (code, kind) = match &error {
                DbError::Rejected(_) => (StatusCode::UNPROCESSABLE_ENTITY, "rejected_by_database"),
                DbError::BadKey(_) => (StatusCode::BAD_REQUEST, "invalid_key"),
                _ => return db_error(error),
            };
            return item_error(code, kind, index, format!("{error}; nothing was written"));
        }
        Err(BatchError::Db(e)) => return db_error(e),
    };
    let mut body = String::from("{\"results\":[");
    for (n, (res, _)) in out.results.iter().zip(&batch.writes).enumerate() {
        if n > 0 {
            body.push(',');
        }
        let code = if res.created { 201 } else { 200 };
        body.push_str(&format!(
            "{{\"entity\":{},\"key\":{},\"v\":{},\"status\":{code},\"deleted\":{},\"envelope\":{}}}",
            Value::from(sc.entity_name(res.idx)),
            Value::from(res.key.as_str()),
            res.envelope.version,
            res.envelope.deleted,
            String::from_utf8_lossy(&res.envelope.bytes),
        ));
    }
    body.push_str(&format!("],\"cache\":\"{}\"}}", out.status.as_str()));
    let mut r = Response::new(body.into());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    set_cache_status(&mut r, out.status);
    r
}

/// `{"keys": ["a", "b", ...]}`.
#[allow(clippy::result_large_err)] // the error is the answer, built once
fn parse_bulk_keys(sc: &Sidecar, raw: &[u8]) -> Result<Vec<String>, Response> {
    let mut map = body_object(raw)?;
    let bad = |msg: String| error(StatusCode::BAD_REQUEST, "invalid_body", msg);
    if let Some(k) = map.keys().find(|k| k.as_str() != "keys") {
        return Err(bad(format!("unknown field {k:?}; give keys")));
    }
    let Some(Value::Array(items)) = map.remove("keys") else {
        return Err(bad("keys must be an array of keys".into()));
    };
    let limit = sc.config.limits.max_batch_items;
    if items.len() > limit {
        return Err(too_many("keys", items.len(), limit));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let key = match v {
                Value::String(k) => k,
                Value::Number(n) => n.to_string(),
                _ => {
                    return Err(item_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_key",
                        i,
                        "a key must be a string".into(),
                    ));
                }
            };
            check_key(&key, sc.config.limits.max_key_bytes)
                .map_err(|msg| item_error(StatusCode::BAD_REQUEST, "invalid_key", i, msg))?;
            Ok(key)
        })
        .collect()
}

fn bulk_response(keys: &[String], outcomes: &[ReadOutcome]) -> Response {
    let mut body = String::from("{\"items\":[");
    for (n, (key, o)) in keys.iter().zip(outcomes).enumerate() {
        if n > 0 {
            body.push(',');
        }
        let (status, envelope) = match &o.envelope {
            Some(env) if !env.deleted => (200, String::from_utf8_lossy(&env.bytes).into_owned()),
            _ => (404, "null".to_string()),
        };
        body.push_str(&format!(
            "{{\"key\":{},\"status\":{status},\"cache\":\"{}\",\"envelope\":{envelope}}}",
            Value::from(key.as_str()),
            o.status.as_str(),
        ));
    }
    body.push_str("]}");
    let mut r = Response::new(body.into());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    set_cache_status(&mut r, summary(outcomes));
    r
}

/// `401 unauthorized`: the API token is missing or wrong (never echoed).
fn unauthorized() -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this sidecar needs Authorization: Bearer <its API token>".into(),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// `503 overloaded`: no slot within `limits.max_queue_wait_ms`.
fn overloaded(max_in_flight: usize) -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!("{max_in_flight} requests are in flight, the limit; retry later"),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// `None` for GET (go on), a 405 otherwise.
fn only_get(method: &Method) -> Option<Response> {
    if method == Method::GET || method == Method::HEAD {
        None
    } else {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        Some(r)
    }
}

/// `/readyz`: ready only when the database answers (Redis being away degrades, not stops).
async fn ready(sc: &Sidecar) -> Response {
    if sc.db.ping().await {
        json_response(
            StatusCode::OK,
            json!({"status": "ready", "redis": sc.cache.is_up()}),
        )
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database does not answer".into(),
        )
    }
}

fn parse_key(raw: &str, max_bytes: usize) -> Result<String, String> {
    if raw.contains('/') {
        return Err("the key must be one path segment; encode '/' as %2F".into());
    }
    let key = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| "the key is not valid UTF-8 once percent-decoded".to_string())?;
    check_key(&key, max_bytes)?;
    Ok(key.into_owned())
}

/// `If-Match: "N"` (also `N` and `W/"N"`).
fn parse_if_match(headers: &HeaderMap) -> Result<Option<i64>, String> {
    parse_version_header(headers, header::IF_MATCH.as_str(), "If-Match")
}

/// A header carrying one version as an ETag: `"N"`, `N` or `W/"N"`.
fn parse_version_header(
    headers: &HeaderMap,
    name: &str,
    label: &str,
) -> Result<Option<i64>, String> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(format!("give one {label} header with one version"));
    }
    let s = v
        .to_str()
        .map_err(|_| format!("{label} is not ASCII"))?
        .trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    let s = s
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s);
    s.parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .map(Some)
        .ok_or_else(|| format!("{label} must be a version such as \"12\", not {s:?}"))
}

async fn read_body<S, B>(headers: &HeaderMap, mut body: S, limit: u64) -> Result<Bytes, Response>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is over the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "the body could not be read".into(),
            )
        })?;
        if (buf.len() + chunk.remaining()) as u64 > limit {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

fn parse_object(raw: Bytes) -> Result<(Map<String, Value>, String), String> {
    let text = String::from_utf8(raw.to_vec()).map_err(|_| "the body is not UTF-8".to_string())?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok((map, text)),
        Ok(_) => Err("the body must be a JSON object of column values".into()),
        Err(e) => Err(format!("the body is not valid JSON: {e}")),
    }
}

fn read_response(r: Result<ReadOutcome, DbError>) -> Response {
    match r {
        Ok(ReadOutcome {
            envelope: Some(env),
            status,
        }) if !env.deleted => envelope_response(StatusCode::OK, &env, status),
        Ok(ReadOutcome { envelope, status }) => {
            let mut r = error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no row with this key".into(),
            );
            if let Some(tombstone) = envelope {
                set_etag(&mut r, tombstone.version);
            }
            set_cache_status(&mut r, status);
            r
        }
        Err(e) => db_error(e),
    }
}

fn write_response(r: Result<Result<WriteOutcome, WriteError>, tokio::task::JoinError>) -> Response {
    match r {
        Ok(Ok(WriteOutcome::Committed {
            envelope,
            created,
            status,
        })) => {
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            envelope_response(code, &envelope, status)
        }
        Ok(Ok(WriteOutcome::NotFound)) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no row with this key".into(),
        ),
        Ok(Ok(WriteOutcome::PreconditionFailed { current })) => {
            let msg = match current {
                Some(v) => format!("If-Match does not hold: the row is at version {v}"),
                None => "If-Match does not hold: there is no row with this key".into(),
            };
            let mut r = error(StatusCode::PRECONDITION_FAILED, "precondition_failed", msg);
            if let Some(v) = current {
                set_etag(&mut r, v);
            }
            r
        }
        Ok(Err(WriteError::Body(e))) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            e.to_string(),
        ),
        Ok(Err(WriteError::Db(e))) => db_error(e),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the write task failed".into(),
        ),
    }
}

fn db_error(e: DbError) -> Response {
    match e {
        DbError::Rejected(msg) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "rejected_by_database",
            msg,
        ),
        DbError::BadKey(msg) => error(StatusCode::BAD_REQUEST, "invalid_key", msg),
        DbError::Unavailable => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                e.to_string(),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
        DbError::Schema(msg) => error(StatusCode::SERVICE_UNAVAILABLE, "entity_unavailable", msg),
        DbError::Internal => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

fn envelope_response(code: StatusCode, env: &Envelope, status: CacheStatus) -> Response {
    let mut r = Response::new(env.bytes.clone().into());
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    set_etag(&mut r, env.version);
    set_cache_status(&mut r, status);
    r
}

fn set_etag(r: &mut Response, version: i64) {
    if let Ok(v) = header::HeaderValue::from_str(&format!("\"{version}\"")) {
        r.headers_mut().insert(header::ETAG, v);
    }
}

fn set_cache_status(r: &mut Response, status: CacheStatus) {
    r.headers_mut().insert(
        CACHE_HEADER,
        header::HeaderValue::from_static(status.as_str()),
    );
}

fn json_response(code: StatusCode, body: Value) -> Response {
    let mut r = Response::new(body.to_string().into());
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(code: StatusCode, kind: &str, message: String) -> Response {
    json_response(code, json!({"error": {"code": kind, "message": message}}))
}

#[cfg(feature = "test-hooks")]
mod test_hooks {
    //! `POST /_test/holds` {"point","entity","key"} -> {"id"}; `GET /_test/holds/{id}/reached`
    //! waits until a request is held; `POST /_test/holds/{id}/release` lets it go.
    use super::*;
    use std::time::Duration;

    pub async fn handle<S, B>(sc: &Sidecar, method: &Method, rest: &str, body: S) -> Response
    where
        S: Stream<Item = Result<B, warp::Error>> + Unpin,
        B: Buf,
    {
        let parts: Vec<&str> = rest.split('/').collect();
        match (method.clone(), parts.as_slice()) {
            (Method::POST, ["holds"]) => {
                let Ok(raw) = read_body(&HeaderMap::new(), body, 4096).await else {
                    return error(StatusCode::BAD_REQUEST, "invalid_body", "unreadable".into());
                };
                let v: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
                let (Some(point), Some(entity), Some(key)) =
                    (v["point"].as_str(), v["entity"].as_str(), v["key"].as_str())
                else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_body",
                        "need point, entity, key".into(),
                    );
                };
                let after = v["release_after_ms"].as_u64().map(Duration::from_millis);
                let id = sc.hooks.arm(point, entity, key, after);
                json_response(StatusCode::OK, json!({"id": id}))
            }
            (Method::GET, ["holds", id, "reached"]) => {
                let id = id.parse().unwrap_or(0);
                if sc.hooks.wait_reached(id, Duration::from_secs(10)).await {
                    json_response(StatusCode::OK, json!({"reached": true}))
                } else {
                    error(
                        StatusCode::REQUEST_TIMEOUT,
                        "not_reached",
                        "no request reached the hold".into(),
                    )
                }
            }
            (Method::POST, ["holds", id, "release"]) => {
                if sc.hooks.release(id.parse().unwrap_or(0)) {
                    json_response(StatusCode::OK, json!({"released": true}))
                } else {
                    error(StatusCode::NOT_FOUND, "unknown_hold", "no such hold".into())
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "no_route",
                "unknown test hook route".into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_decoded_and_bounded() {
        assert_eq!(parse_key("a%2Fb", 10).unwrap(), "a/b");
        assert!(parse_key("a/b", 10).is_err());
        assert!(parse_key("", 10).is_err());
        assert!(parse_key("%FF", 10).is_err());
        assert!(parse_key("%0A", 10).is_err());
        assert!(
            parse_key(&"k".repeat(11), 10)
                .unwrap_err()
                .contains("limit is 10")
        );
    }

    #[test]
    fn if_match_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_if_match(&h), Ok(None));
        for (v, want) in [("\"12\"", 12), ("12", 12), ("W/\"7\"", 7)] {
            h.insert(header::IF_MATCH, v.parse().unwrap());
            assert_eq!(parse_if_match(&h), Ok(Some(want)));
        }
        for bad in ["*", "\"x\"", "-1", "\"1\", \"2\""] {
            h.insert(header::IF_MATCH, bad.parse().unwrap());
            assert!(parse_if_match(&h).is_err(), "{bad} accepted");
        }
    }
}
