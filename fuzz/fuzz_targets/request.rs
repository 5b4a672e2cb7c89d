//! The whole HTTP surface of the sidecar, in process, with PostgreSQL and Redis unreachable.
//!
//! An input is a request in HTTP/1 text form:
//!
//! ```text
//! METHOD TARGET\n
//! Name: value\n
//! ...
//! \n
//! body
//! ```
//!
//! (a `\r` before a `\n` is dropped; header lines without ':' and headers that are not valid
//! HTTP are left out; a method or target that is not valid HTTP ends the input, as hyper would
//! have answered it before the sidecar saw it). The same request goes to two sidecars: one with
//! an open API and one that requires `Authorization: Bearer <TOKEN>`.
//!
//! Checked on every answer:
//! - the status is one a client mistake (400, 401, 404, 405, 413) or the unreachable backends
//!   (503) may give, or 200 where nothing needs a backend; never 500, never 422 or 412 (no row
//!   can be reached);
//! - every error is JSON `{"error": {"code", "message"}}` whose code belongs to its status, 405
//!   carries Allow, 401 carries `WWW-Authenticate: Bearer`, a failed statement carries Retry-After;
//! - a 200 is only for GET/HEAD of /healthz, /metrics, /openapi.json, or a batch / bulk read with
//!   nothing in it (empty results);
//! - a model of the routes: what the status must be for the health and document paths, unknown
//!   paths and entities, keys (checked here independently: one path segment, percent-decoded
//!   UTF-8, 1..=64 bytes, no control characters), methods, and bodies of a PUT;
//! - the sidecar with a token answers 401 to every request without exactly the right token (but
//!   /healthz and /readyz), and, given it, exactly what the open sidecar answers.
#![no_main]

use bytes::Bytes;
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::sync::OnceLock;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header};
use warp::reply::Response;
use wtc_fuzz::*;

struct Sidecars {
    open: BoxedFilter<(Response,)>,
    with_token: BoxedFilter<(Response,)>,
}

fn sidecars() -> &'static Sidecars {
    static S: OnceLock<Sidecars> = OnceLock::new();
    S.get_or_init(|| Sidecars {
        open: sidecar_filter(config(DEAD_REDIS_URL, 86_400_000), None),
        with_token: sidecar_filter(config(DEAD_REDIS_URL, 86_400_000), Some(TOKEN)),
    })
}

/// A fuzz input read as a request.
struct Parsed {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

fn parse(input: &[u8]) -> Option<Parsed> {
    let (head, body) = match find(input, b"\n\n").or_else(|| find(input, b"\r\n\r\n")) {
        Some(i) => {
            let sep = if input[i] == b'\r' { 4 } else { 2 };
            (&input[..i], &input[i + sep..])
        }
        None => (input, &b""[..]),
    };
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let first = lines.next()?;
    let sp = first.iter().position(|b| *b == b' ')?;
    let method = Method::from_bytes(&first[..sp]).ok()?;
    let target = &first[sp + 1..];
    let target = target.strip_suffix(b" HTTP/1.1").unwrap_or(target);
    let uri = Uri::try_from(target).ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii_start()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    Some(Parsed {
        method,
        uri,
        headers,
        body: Bytes::copy_from_slice(body),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn request(p: &Parsed) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(p.body.clone()));
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.headers_mut() = p.headers.clone();
    req
}

fuzz_target!(|input: &[u8]| {
    let Some(p) = parse(input) else {
        return;
    };
    let s = sidecars();
    let ((status, headers, body), (t_status, t_headers, t_body)) = runtime().block_on(async {
        let open = call(&s.open, request(&p)).await;
        let with_token = call(&s.with_token, request(&p)).await;
        (open, with_token)
    });

    if debug() {
        eprintln!(
            "fuzz: {} {} -> {status} {}",
            p.method,
            p.uri,
            String::from_utf8_lossy(&body)
        );
    }
    let code = check_answer(&p, status, &headers, &body);
    check_model(&p, status, code.as_deref(), &headers, &body);

    let t_code = check_answer(&p, t_status, &t_headers, &t_body);
    let path = p.uri.path();
    let no_token_needed =
        p.uri.path_and_query().is_none() || path == "/healthz" || path == "/readyz";
    if authorized(&p.headers) || no_token_needed {
        assert_eq!(
            (t_status, &t_code),
            (status, &code),
            "the sidecar with a token answers otherwise than the open one"
        );
    } else {
        assert_eq!(
            (t_status, t_code.as_deref()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized")),
            "a request without the right token was not refused"
        );
    }
});

/// The token check, written from its description: exactly one Authorization header, scheme
/// `Bearer` in any case, one space, then the token (surrounding blanks ignored).
fn authorized(headers: &HeaderMap) -> bool {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(v), None) = (all.next(), all.next()) else {
        return false;
    };
    let v = v.as_bytes();
    let Some(sp) = v.iter().position(|b| *b == b' ') else {
        return false;
    };
    v[..sp].eq_ignore_ascii_case(b"bearer") && v[sp..].trim_ascii() == TOKEN.as_bytes()
}

/// What holds of any answer; returns the error code of an error.
fn check_answer(
    p: &Parsed,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<String> {
    if status == StatusCode::OK {
        check_ok(p, headers, body);
        return None;
    }
    let code = check_error(status, headers, body);
    assert_ne!(
        code, "not_found",
        "a row was found missing with the database down"
    );
    Some(code)
}

/// A 200 needs no backend: health, metrics, the document, and empty batches and bulk reads.
fn check_ok(p: &Parsed, headers: &HeaderMap, body: &[u8]) {
    let path = p.uri.path();
    let get = p.method == Method::GET || p.method == Method::HEAD;
    let json = || -> Value {
        serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "200 for {path}: not JSON ({e}): {:?}",
                String::from_utf8_lossy(body)
            )
        })
    };
    match path {
        "/healthz" if get => assert_eq!(json(), serde_json::json!({"status": "ok"})),
        "/metrics" if get => {
            let ct = headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes());
            assert_eq!(ct, Some(&b"text/plain; version=0.0.4; charset=utf-8"[..]));
            assert!(std::str::from_utf8(body).is_ok(), "metrics are not UTF-8");
        }
        "/openapi.json" if get => assert_eq!(body, wtc_sidecar::http::OPENAPI.as_bytes()),
        "/v1/batch" if p.method == Method::POST => {
            let v = json();
            assert_eq!(
                v["results"],
                serde_json::json!([]),
                "a batch committed: {v}"
            );
            let req: Value =
                serde_json::from_slice(&p.body).expect("200 for a batch that is not JSON");
            assert_eq!(
                req["writes"],
                serde_json::json!([]),
                "writes with the database down"
            );
        }
        _ if p.method == Method::POST && bulk_entity(path).is_some() => {
            let v = json();
            assert_eq!(
                v["items"],
                serde_json::json!([]),
                "a bulk read answered items: {v}"
            );
        }
        _ => panic!("200 for {} {path}, which needs the database", p.method),
    }
}

/// `Some(entity)` for `/v1/entities/{known entity}/_bulk_get`.
fn bulk_entity(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/entities/")?;
    let (entity, key) = rest.split_once('/')?;
    (key == "_bulk_get" && ENTITIES.contains(&entity)).then_some(entity)
}

/// Each route's answer, as far as it follows from the request alone.
fn check_model(
    p: &Parsed,
    status: StatusCode,
    code: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) {
    let path = p.uri.path();
    let get = p.method == Method::GET || p.method == Method::HEAD;
    let got = (status.as_u16(), code);
    let ctx = || {
        format!(
            "{} {} -> {} {}",
            p.method,
            p.uri,
            status,
            String::from_utf8_lossy(body)
        )
    };
    let method_not_allowed = (405, Some("method_not_allowed"));
    // A target without a path (`GET a:1`, which hyper accepts): refused before the routes, whose
    // path filters panic on it (fuzz finding 1).
    if p.uri.path_and_query().is_none() {
        assert_eq!(got, (400, Some("invalid_target")), "{}", ctx());
        return;
    }
    match path {
        "/healthz" | "/metrics" | "/openapi.json" => {
            let want = if get { (200, None) } else { method_not_allowed };
            assert_eq!(got, want, "{}", ctx());
            return;
        }
        "/readyz" => {
            let want = if get {
                (503, Some("database_unavailable"))
            } else {
                method_not_allowed
            };
            assert_eq!(got, want, "{}", ctx());
            return;
        }
        "/v1/batch" => {
            if p.method != Method::POST {
                assert_eq!(got, method_not_allowed, "{}", ctx());
                assert_eq!(headers.get(header::ALLOW).unwrap(), "POST");
            }
            return;
        }
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v1/entities/") else {
        assert_eq!(got, (404, Some("no_route")), "{}", ctx());
        return;
    };
    let Some((entity, raw_key)) = rest.split_once('/') else {
        assert_eq!(got, (404, Some("no_route")), "{}", ctx());
        return;
    };
    // Entity names are percent-decoded, as keys are.
    let decoded = percent_encoding::percent_decode_str(entity).decode_utf8();
    let entity = decoded.as_deref().unwrap_or(entity);
    if !ENTITIES.contains(&entity) {
        assert_eq!(got, (404, Some("unknown_entity")), "{}", ctx());
        return;
    }
    if raw_key == "_bulk_get" && p.method == Method::POST {
        check_body_model(p, got, &ctx);
        return;
    }
    if !key_is_valid(raw_key) {
        assert_eq!(got, (400, Some("invalid_key")), "{}", ctx());
        return;
    }
    // Plain versions in the version headers (or none): the request goes on. Other forms (W/"1",
    // spaces, junk) are left to the general checks.
    let plain_version = |name: &str| {
        let mut all = p.headers.get_all(name).iter();
        match (all.next(), all.next()) {
            (None, _) => true,
            (Some(v), None) => {
                let v = v.as_bytes();
                let v = v
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v);
                !v.is_empty() && v.len() <= 18 && v.iter().all(u8::is_ascii_digit)
            }
            _ => false,
        }
    };
    if !plain_version("if-match") || !plain_version("x-wtc-min-version") {
        return;
    }
    match p.method {
        Method::GET | Method::HEAD | Method::DELETE => {
            assert_eq!(got, (503, Some("database_unavailable")), "{}", ctx())
        }
        Method::PUT => check_body_model(p, got, &ctx),
        _ => {
            assert_eq!(got, method_not_allowed, "{}", ctx());
            assert_eq!(headers.get(header::ALLOW).unwrap(), "GET, HEAD, PUT, DELETE");
        }
    }
}

/// The body of a PUT or a bulk read: over the limit (declared or sent) is 413, not a JSON object
/// is 400; a PUT of an object reaches the database (503).
fn check_body_model(p: &Parsed, got: (u16, Option<&str>), ctx: &dyn Fn() -> String) {
    let declared = p
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if p.body.len() > MAX_BODY_BYTES || declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        assert_eq!(got, (413, Some("body_too_large")), "{}", ctx());
        return;
    }
    let object = std::str::from_utf8(&p.body)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .filter(Value::is_object);
    match object {
        None => assert_eq!(got, (400, Some("invalid_body")), "{}", ctx()),
        Some(_) if p.method == Method::PUT => {
            assert_eq!(got, (503, Some("database_unavailable")), "{}", ctx())
        }
        Some(v) => {
            if v == serde_json::json!({"keys": []}) {
                assert_eq!(got, (200, None), "{}", ctx());
            } else {
                assert_ne!(got.0, 200, "{}", ctx());
            }
        }
    }
}

/// A key in the URL, from the rules: one path segment; percent-decoded (`%XX` with two hex
/// digits, any other '%' as it is), UTF-8, 1 to 64 bytes, no control characters.
fn key_is_valid(raw: &str) -> bool {
    if raw.contains('/') {
        return false;
    }
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(k) => !k.is_empty() && k.len() <= MAX_KEY_BYTES && !k.chars().any(char::is_control),
        Err(_) => false,
    }
}
