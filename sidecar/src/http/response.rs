//! Answers built from the protocol's outcomes; JSON is built with serde. An envelope is sent as
//! the bytes the cache holds (validated when read back, never re-encoded).

use super::error::ApiError;
use super::reply::{json, set_cache_status, set_etag};
use crate::core::envelope::Envelope;
use crate::core::types::{BatchOutcome, CacheStatus, ReadOutcome, WriteOutcome};
use serde::Serialize;
use serde_json::value::RawValue;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

fn envelope(code: StatusCode, env: &Envelope, status: CacheStatus) -> Response {
    let mut r = Response::new(env.bytes.clone().into());
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    set_etag(&mut r, env.version);
    set_cache_status(&mut r, status);
    r
}

/// The envelope as JSON inside a larger answer.
fn raw(env: &Envelope) -> Box<RawValue> {
    let text = String::from_utf8_lossy(&env.bytes).into_owned();
    RawValue::from_string(text).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

pub fn read(out: ReadOutcome) -> Response {
    match out {
        ReadOutcome {
            envelope: Some(env),
            status,
        } if !env.deleted => envelope(StatusCode::OK, &env, status),
        ReadOutcome { envelope, status } => {
            ApiError::not_found(envelope.map(|t| t.version), Some(status)).into_response()
        }
    }
}

pub fn write(out: WriteOutcome) -> Response {
    match out {
        WriteOutcome::Committed {
            envelope: env,
            created,
            status,
        } => {
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            envelope(code, &env, status)
        }
        WriteOutcome::NotFound => ApiError::not_found(None, None).into_response(),
        WriteOutcome::PreconditionFailed { current } => {
            ApiError::precondition_failed(current).into_response()
        }
    }
}

#[derive(Serialize)]
struct BulkItem<'a> {
    key: &'a str,
    status: u16,
    cache: &'static str,
    envelope: Option<Box<RawValue>>,
}

pub fn bulk(keys: &[String], outcomes: &[ReadOutcome]) -> Response {
    let items: Vec<BulkItem<'_>> = keys
        .iter()
        .zip(outcomes)
        .map(|(key, o)| {
            let (status, envelope) = match &o.envelope {
                Some(env) if !env.deleted => (200, Some(raw(env))),
                _ => (404, None),
            };
            BulkItem {
                key,
                status,
                cache: o.status.as_str(),
                envelope,
            }
        })
        .collect();
    #[derive(Serialize)]
    struct Bulk<'a> {
        items: Vec<BulkItem<'a>>,
    }
    let mut r = json(StatusCode::OK, &Bulk { items });
    set_cache_status(&mut r, CacheStatus::summary(outcomes));
    r
}

#[derive(Serialize)]
struct BatchItem<'a> {
    entity: &'a str,
    key: &'a str,
    v: i64,
    status: u16,
    deleted: bool,
    envelope: Box<RawValue>,
}

/// `names`: (entity, key) of each write, in the batch's order.
pub fn batch(names: &[(&str, &str)], out: &BatchOutcome) -> Response {
    let results: Vec<BatchItem<'_>> = out
        .results
        .iter()
        .zip(names)
        .map(|(c, (entity, key))| BatchItem {
            entity,
            key,
            v: c.envelope.version.get(),
            status: if c.created { 201 } else { 200 },
            deleted: c.envelope.deleted,
            envelope: raw(&c.envelope),
        })
        .collect();
    #[derive(Serialize)]
    struct Batch<'a> {
        results: Vec<BatchItem<'a>>,
        cache: &'static str,
    }
    let mut r = json(
        StatusCode::OK,
        &Batch {
            results,
            cache: out.status.as_str(),
        },
    );
    set_cache_status(&mut r, out.status);
    r
}
