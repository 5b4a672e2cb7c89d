//! Parsing: a request becomes a typed `Route` (method and path, no body) and then a typed
//! `Command` (with its body), or an `ApiError` that says exactly what is wrong. Nothing here
//! touches the protocol.

use super::error::{ApiError, Code};
use crate::core::types::{Batch, Condition, EntityId, Version, Write, WriteOp};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value};
use warp::http::{HeaderMap, Method, StatusCode, header};
use wtc_config::Limits;

/// On a GET: the lowest version the answer may have (read-your-writes across requests).
pub const MIN_VERSION_HEADER: &str = "x-wtc-min-version";

/// `POST /v1/entities/{entity}/_bulk_get` reads many keys (`GET` of that path is the key
/// `_bulk_get`).
pub const BULK_GET: &str = "_bulk_get";

/// Where a request goes, from its method and path alone.
#[derive(Debug, PartialEq)]
pub enum Route {
    Health,
    Ready,
    Metrics,
    OpenApi,
    Batch,
    BulkGet(EntityId),
    Key {
        entity: EntityId,
        key: String,
        method: KeyMethod,
        condition: Condition,
        min_version: Option<Version>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyMethod {
    Get,
    Put,
    Delete,
}

/// What to do, with everything it needs.
#[derive(Debug)]
pub enum Command {
    Read {
        entity: EntityId,
        key: String,
        min_version: Option<Version>,
    },
    Put {
        entity: EntityId,
        key: String,
        body: Map<String, Value>,
        raw: String,
        condition: Condition,
    },
    Delete {
        entity: EntityId,
        key: String,
        condition: Condition,
    },
    BulkRead {
        entity: EntityId,
        keys: Vec<String>,
    },
    Batch(Batch),
}

/// The health routes, which need neither the token nor a slot.
pub fn health_route(method: &Method, path: &str) -> Option<Result<Route, ApiError>> {
    let route = match path {
        "/healthz" => Route::Health,
        "/readyz" => Route::Ready,
        "/metrics" => Route::Metrics,
        "/openapi.json" => Route::OpenApi,
        _ => return None,
    };
    if method == Method::GET || method == Method::HEAD {
        Some(Ok(route))
    } else {
        Some(Err(ApiError::method_not_allowed(method, "GET, HEAD")))
    }
}

/// The API's routes. `entity` looks an entity up by name.
pub fn route(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    limits: &Limits,
    entity: impl Fn(&str) -> Option<EntityId>,
) -> Result<Route, ApiError> {
    if path == "/v1/batch" {
        return match *method {
            Method::POST => Ok(Route::Batch),
            _ => Err(ApiError::method_not_allowed(method, "POST")),
        };
    }
    let Some(rest) = path.strip_prefix("/v1/entities/") else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            Code::NoRoute,
            format!("no route for {path}"),
        ));
    };
    let Some((name, raw_key)) = rest.split_once('/') else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            Code::NoRoute,
            "expected /v1/entities/{entity}/{key}",
        ));
    };
    // Entity names are percent-decoded like keys (`%61ccounts` is `accounts`).
    let decoded = percent_decode_str(name).decode_utf8();
    let name = decoded.as_deref().unwrap_or(name);
    let Some(id) = entity(name) else {
        return Err(unknown_entity(name));
    };
    if raw_key == BULK_GET && method == Method::POST {
        return Ok(Route::BulkGet(id));
    }
    let key = parse_key(raw_key, limits.max_key_bytes)
        .map_err(|msg| ApiError::bad_request(Code::InvalidKey, msg))?;
    let if_match = if_match(headers)?;
    let min_version = min_version(headers)?;
    let method = match *method {
        Method::GET | Method::HEAD => KeyMethod::Get,
        Method::PUT => KeyMethod::Put,
        Method::DELETE => KeyMethod::Delete,
        _ => {
            return Err(ApiError::method_not_allowed(
                method,
                "GET, HEAD, PUT, DELETE",
            ));
        }
    };
    // `If-None-Match: *` makes a PUT create-only; on a read it is left to caches in between.
    let absent = match method {
        KeyMethod::Get => false,
        _ => if_none_match(headers)?,
    };
    let condition = match (if_match, absent) {
        (Some(_), true) => {
            return Err(ApiError::bad_request(
                Code::InvalidIfNoneMatch,
                "give If-Match or If-None-Match, not both",
            ));
        }
        (_, true) if method == KeyMethod::Delete => {
            return Err(ApiError::bad_request(
                Code::InvalidIfNoneMatch,
                "If-None-Match: * is for PUT (create only); a DELETE takes If-Match",
            ));
        }
        (_, true) => Condition::Absent,
        (Some(v), false) => Condition::Matches(v),
        (None, false) => Condition::Always,
    };
    Ok(Route::Key {
        entity: id,
        key,
        method,
        condition,
        min_version,
    })
}

fn unknown_entity(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        Code::UnknownEntity,
        format!("no entity named {name:?} is configured"),
    )
}

/// Whether the route's command needs the request body.
pub fn needs_body(route: &Route) -> bool {
    matches!(
        route,
        Route::Batch
            | Route::BulkGet(_)
            | Route::Key {
                method: KeyMethod::Put,
                ..
            }
    )
}

/// The command of a data route (`Route::Key`, `BulkGet`, `Batch`) with its body.
pub fn command(
    route: Route,
    body: Bytes,
    limits: &Limits,
    entity: impl Fn(&str) -> Option<EntityId>,
) -> Result<Command, ApiError> {
    match route {
        Route::Batch => Ok(Command::Batch(parse_batch(&body, limits, entity)?)),
        Route::BulkGet(entity) => Ok(Command::BulkRead {
            entity,
            keys: parse_bulk_keys(&body, limits)?,
        }),
        Route::Key {
            entity,
            key,
            method,
            condition,
            min_version,
        } => Ok(match method {
            KeyMethod::Get => Command::Read {
                entity,
                key,
                min_version,
            },
            KeyMethod::Put => {
                let (body, raw) = parse_object(body).map_err(ApiError::invalid_body)?;
                Command::Put {
                    entity,
                    key,
                    body,
                    raw,
                    condition,
                }
            }
            KeyMethod::Delete => Command::Delete {
                entity,
                key,
                condition,
            },
        }),
        Route::Health | Route::Ready | Route::Metrics | Route::OpenApi => {
            Err(ApiError::internal("not a data route"))
        }
    }
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

pub fn parse_key(raw: &str, max_bytes: usize) -> Result<String, String> {
    if raw.contains('/') {
        return Err("the key must be one path segment; encode '/' as %2F".into());
    }
    let key = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| "the key is not valid UTF-8 once percent-decoded".to_string())?;
    check_key(&key, max_bytes)?;
    Ok(key.into_owned())
}

/// One version as an ETag: `"N"` or `N`.
fn parse_version(text: &str) -> Option<Version> {
    let s = text
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(text);
    s.parse::<i64>().ok().filter(|v| *v >= 0).map(Version::new)
}

/// `If-Match: "N"` (also `N`). A weak tag (`W/"N"`) is refused: RFC 9110 compares If-Match
/// strongly, so a weak tag never matches, and taking it as a match would be a lost update.
pub fn if_match(headers: &HeaderMap) -> Result<Option<Version>, ApiError> {
    version_header(headers, header::IF_MATCH.as_str(), "If-Match", false)
        .map_err(|msg| ApiError::bad_request(Code::InvalidIfMatch, msg))
}

/// `If-None-Match: *` (the only form a write takes): true when given.
pub fn if_none_match(headers: &HeaderMap) -> Result<bool, ApiError> {
    let mut values = headers.get_all(header::IF_NONE_MATCH).iter();
    let Some(v) = values.next() else {
        return Ok(false);
    };
    if values.next().is_none() && v.as_bytes().trim_ascii() == b"*" {
        return Ok(true);
    }
    Err(ApiError::bad_request(
        Code::InvalidIfNoneMatch,
        "a write takes only If-None-Match: * (create the row only if there is none)",
    ))
}

/// `X-Wtc-Min-Version: "N"` (also `N` and `W/"N"`: any ETag the client got).
pub fn min_version(headers: &HeaderMap) -> Result<Option<Version>, ApiError> {
    version_header(headers, MIN_VERSION_HEADER, "X-Wtc-Min-Version", true)
        .map_err(|msg| ApiError::bad_request(Code::InvalidMinVersion, msg))
}

fn version_header(
    headers: &HeaderMap,
    name: &str,
    label: &str,
    weak_ok: bool,
) -> Result<Option<Version>, String> {
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
    let s = match s.strip_prefix("W/") {
        Some(strong) if weak_ok => strong,
        Some(_) => {
            return Err(format!(
                "{label} takes a strong ETag such as \"12\": a weak one (W/...) never matches"
            ));
        }
        None => s,
    };
    parse_version(s).map(Some).ok_or_else(|| {
        format!(
            "{label} must be a version such as \"12\", not {:?}",
            unquoted(s)
        )
    })
}

/// The text of a version header as the error message shows it.
fn unquoted(s: &str) -> &str {
    let s = s.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s)
}

/// Reads the body up to `limit` bytes (beyond it, 413 before reading more) within `deadline`
/// (beyond it, 408).
pub async fn read_body<S, B>(
    headers: &HeaderMap,
    body: S,
    limit: u64,
    deadline: std::time::Duration,
) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    match tokio::time::timeout(deadline, read_all(headers, body, limit)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            Code::BodyTimeout,
            format!(
                "the body did not arrive whole within {} ms",
                deadline.as_millis()
            ),
        )),
    }
}

async fn read_all<S, B>(headers: &HeaderMap, mut body: S, limit: u64) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::BodyTooLarge,
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
        let mut chunk = chunk.map_err(|_| ApiError::invalid_body("the body could not be read"))?;
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

fn body_object(raw: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid_body("the body must be a JSON object")),
        Err(e) => Err(ApiError::invalid_body(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

/// A key given in a JSON body: a string, or a number as its text.
fn body_key(v: Value, what: &str, limits: &Limits) -> Result<String, ApiError> {
    let key = match v {
        Value::String(k) => k,
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(ApiError::bad_request(
                Code::InvalidKey,
                format!("{what} must be a string"),
            ));
        }
    };
    check_key(&key, limits.max_key_bytes)
        .map_err(|msg| ApiError::bad_request(Code::InvalidKey, msg))?;
    Ok(key)
}

/// `{"writes": [{"entity","key","op","data","if_match"}...], "invalidate": [{"entity","key"}...]}`.
fn parse_batch(
    raw: &[u8],
    limits: &Limits,
    entity: impl Fn(&str) -> Option<EntityId>,
) -> Result<Batch, ApiError> {
    let mut map = body_object(raw)?;
    let limit = limits.max_batch_items;
    if let Some(k) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "writes" | "invalidate"))
    {
        return Err(ApiError::invalid_body(format!(
            "unknown field {k:?}; a batch has writes and invalidate"
        )));
    }
    let writes = match map.remove("writes") {
        Some(Value::Array(a)) => a,
        _ => return Err(ApiError::invalid_body("writes must be an array of writes")),
    };
    let invalidate = match map.remove("invalidate") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(ApiError::invalid_body(
                "invalidate must be an array of {entity, key}",
            ));
        }
    };
    if writes.len() > limit {
        return Err(ApiError::too_many("writes", writes.len(), limit));
    }
    if invalidate.len() > limit {
        return Err(ApiError::too_many(
            "keys to invalidate",
            invalidate.len(),
            limit,
        ));
    }
    let mut batch = Batch::default();
    for (i, item) in writes.into_iter().enumerate() {
        batch
            .writes
            .push(parse_batch_write(item, limits, &entity).map_err(|e| e.item(i))?);
    }
    for (i, item) in invalidate.into_iter().enumerate() {
        let parsed = (|| {
            let Value::Object(mut m) = item else {
                return Err(ApiError::invalid_body(
                    "invalidate: must be an object {entity, key}",
                ));
            };
            let (id, key) = entity_and_key(&mut m, limits, &entity)?;
            if let Some(k) = m.keys().next() {
                return Err(ApiError::invalid_body(format!(
                    "invalidate: unknown field {k:?}"
                )));
            }
            Ok((id, key))
        })();
        batch.invalidate.push(parsed.map_err(|e| e.item(i))?);
    }
    Ok(batch)
}

/// The `entity` and `key` fields of a batch item, removed from it.
fn entity_and_key(
    m: &mut Map<String, Value>,
    limits: &Limits,
    entity: impl Fn(&str) -> Option<EntityId>,
) -> Result<(EntityId, String), ApiError> {
    let name = match m.remove("entity") {
        Some(Value::String(e)) => e,
        _ => return Err(ApiError::invalid_body("entity must be a string")),
    };
    let Some(id) = entity(&name) else {
        return Err(unknown_entity(&name));
    };
    let key = body_key(m.remove("key").unwrap_or(Value::Null), "key", limits)?;
    Ok((id, key))
}

fn parse_batch_write(
    item: Value,
    limits: &Limits,
    entity: impl Fn(&str) -> Option<EntityId>,
) -> Result<Write, ApiError> {
    let Value::Object(mut m) = item else {
        return Err(ApiError::invalid_body(
            "a write must be an object {entity, key, op, data, if_match, if_none_match}",
        ));
    };
    let (id, key) = entity_and_key(&mut m, limits, entity)?;
    let bad_if_match = |msg: String| ApiError::bad_request(Code::InvalidIfMatch, msg);
    let if_match = match m.remove("if_match") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_i64().filter(|v| *v >= 0) {
            Some(v) => Some(Version::new(v)),
            None => return Err(bad_if_match(format!("if_match {n} is not a version"))),
        },
        Some(Value::String(s)) => match parse_version(&s) {
            Some(v) => Some(v),
            None => return Err(bad_if_match(format!("if_match {s:?} is not a version"))),
        },
        Some(_) => return Err(bad_if_match("if_match must be a version".into())),
    };
    let absent = match m.remove("if_none_match") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "*" => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                Code::InvalidIfNoneMatch,
                "if_none_match takes only \"*\" (create only)",
            ));
        }
    };
    let op = match (m.remove("op"), m.remove("data")) {
        (Some(Value::String(op)), Some(Value::Object(body))) if op == "put" => {
            let raw = Value::Object(body.clone()).to_string();
            WriteOp::Put { body, raw }
        }
        (Some(Value::String(op)), _) if op == "put" => {
            return Err(ApiError::invalid_body(
                "a put needs data, a JSON object of column values",
            ));
        }
        (Some(Value::String(op)), None) if op == "delete" => WriteOp::Delete,
        (Some(Value::String(op)), Some(_)) if op == "delete" => {
            return Err(ApiError::invalid_body("a delete takes no data"));
        }
        _ => {
            return Err(ApiError::bad_request(
                Code::InvalidOp,
                "op must be \"put\" or \"delete\"",
            ));
        }
    };
    if let Some(k) = m.keys().next() {
        return Err(ApiError::invalid_body(format!("unknown field {k:?}")));
    }
    let condition = match (if_match, absent, &op) {
        (Some(_), true, _) => {
            return Err(ApiError::bad_request(
                Code::InvalidIfNoneMatch,
                "give if_match or if_none_match, not both",
            ));
        }
        (None, true, WriteOp::Delete) => {
            return Err(ApiError::bad_request(
                Code::InvalidIfNoneMatch,
                "if_none_match is for puts (create only)",
            ));
        }
        (None, true, _) => Condition::Absent,
        (Some(v), false, _) => Condition::Matches(v),
        (None, false, _) => Condition::Always,
    };
    Ok(Write {
        entity: id,
        key,
        op,
        condition,
    })
}

/// `{"keys": ["a", "b", ...]}`.
fn parse_bulk_keys(raw: &[u8], limits: &Limits) -> Result<Vec<String>, ApiError> {
    let mut map = body_object(raw)?;
    if let Some(k) = map.keys().find(|k| k.as_str() != "keys") {
        return Err(ApiError::invalid_body(format!(
            "unknown field {k:?}; give keys"
        )));
    }
    let Some(Value::Array(items)) = map.remove("keys") else {
        return Err(ApiError::invalid_body("keys must be an array of keys"));
    };
    let limit = limits.max_batch_items;
    if items.len() > limit {
        return Err(ApiError::too_many("keys", items.len(), limit));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| body_key(v, "a key", limits).map_err(|e| e.item(i)))
        .collect()
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
        assert_eq!(if_match(&h).unwrap(), None);
        for (v, want) in [("\"12\"", 12), ("12", 12), (" \"7\" ", 7)] {
            h.insert(header::IF_MATCH, v.parse().unwrap());
            assert_eq!(if_match(&h).unwrap(), Some(Version::new(want)));
        }
        for bad in ["*", "\"x\"", "-1", "\"1\", \"2\"", "W/\"7\""] {
            h.insert(header::IF_MATCH, bad.parse().unwrap());
            assert!(if_match(&h).is_err(), "{bad} accepted");
        }
    }

    fn limits() -> Limits {
        Limits {
            max_batch_items: 2,
            ..Limits::default()
        }
    }

    fn accounts(name: &str) -> Option<EntityId> {
        (name == "accounts").then_some(EntityId::new(0))
    }

    #[test]
    fn routes_are_typed_before_any_body_is_read() {
        let h = HeaderMap::new();
        let l = limits();
        let r = route(
            &Method::PUT,
            "/v1/entities/accounts/a%20b",
            &h,
            &l,
            accounts,
        )
        .unwrap();
        assert_eq!(
            r,
            Route::Key {
                entity: EntityId::new(0),
                key: "a b".into(),
                method: KeyMethod::Put,
                condition: Condition::Always,
                min_version: None,
            }
        );
        assert!(needs_body(&r));
        let r = route(
            &Method::POST,
            "/v1/entities/accounts/_bulk_get",
            &h,
            &l,
            accounts,
        )
        .unwrap();
        assert_eq!(r, Route::BulkGet(EntityId::new(0)));
        let e = route(&Method::GET, "/v1/entities/nope/a", &h, &l, accounts).unwrap_err();
        assert_eq!(e.into_response().status(), StatusCode::NOT_FOUND);
        let e = route(&Method::PATCH, "/v1/entities/accounts/a", &h, &l, accounts).unwrap_err();
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD, PUT, DELETE");
        let r = route(&Method::GET, "/v1/entities/%61ccounts/a", &h, &l, accounts).unwrap();
        assert!(matches!(
            r,
            Route::Key {
                method: KeyMethod::Get,
                ..
            }
        ));
        let e = route(&Method::GET, "/v1/batch", &h, &l, accounts).unwrap_err();
        assert_eq!(e.into_response().headers()[header::ALLOW], "POST");
    }

    #[test]
    fn batches_are_parsed_into_writes_or_refused_per_item() {
        let l = limits();
        let b = parse_batch(
            br#"{"writes":[{"entity":"accounts","key":7,"op":"put","data":{"n":1},"if_match":"\"3\""},
                {"entity":"accounts","key":"x","op":"delete"}]}"#,
            &l,
            accounts,
        )
        .unwrap();
        assert_eq!(b.writes.len(), 2);
        assert_eq!(b.writes[0].key, "7");
        assert_eq!(b.writes[0].condition, Condition::Matches(Version::new(3)));
        assert!(matches!(b.writes[1].op, WriteOp::Delete));
        let cases: [(&[u8], &str); 5] = [
            (
                br#"{"writes":[{"entity":"accounts","key":"a","op":"nope"}]}"#,
                "invalid_op",
            ),
            (
                br#"{"writes":[{"entity":"other","key":"a","op":"delete"}]}"#,
                "unknown_entity",
            ),
            (
                br#"{"writes":[{"entity":"accounts","key":[1],"op":"delete"}]}"#,
                "invalid_key",
            ),
            (br#"{"writes":[1,2,3]}"#, "batch_too_large"),
            (br#"{"writes":[],"extra":1}"#, "invalid_body"),
        ];
        for (body, code) in cases {
            let e = parse_batch(body, &l, accounts).unwrap_err();
            assert_eq!(
                serde_json::to_value(e.code()).unwrap(),
                code,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
