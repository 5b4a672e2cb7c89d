//! The pieces every answer is made of: a JSON body, the ETag and `X-Wtc-Cache` headers.

use crate::core::types::{CacheStatus, Version};
use serde::Serialize;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

pub const CACHE_HEADER: &str = "x-wtc-cache";

pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let text = serde_json::to_string(body).unwrap_or_else(|_| "{}".into());
    let mut r = Response::new(text.into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn text(body: impl Into<String>, content_type: &'static str) -> Response {
    let mut r = Response::new(body.into().into());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub fn set_etag(r: &mut Response, version: Version) {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        r.headers_mut().insert(header::ETAG, v);
    }
}

pub fn set_cache_status(r: &mut Response, status: CacheStatus) {
    r.headers_mut()
        .insert(CACHE_HEADER, HeaderValue::from_static(status.as_str()));
}
