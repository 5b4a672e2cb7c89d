//! The API's one error type: every refusal knows its status, its code and its message, and
//! renders itself as `{"error": {"code": "...", "message": "..."}}` (plus `item` for an item of a
//! batch or bulk read). Nothing a client sends can produce a 500, and no SQL reaches a message.

use super::reply::{json, set_cache_status, set_etag};
use crate::core::types::{BatchError, CacheStatus, DbError, Version, WriteError};
use serde::Serialize;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

/// The `code` of an error answer; docs/openapi.json lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    InvalidTarget,
    NoRoute,
    UnknownEntity,
    MethodNotAllowed,
    Unauthorized,
    Overloaded,
    InvalidKey,
    InvalidIfMatch,
    InvalidIfNoneMatch,
    InvalidMinVersion,
    InvalidBody,
    InvalidOp,
    BodyTooLarge,
    BodyTimeout,
    AnswerTooLarge,
    BatchTooLarge,
    DuplicateKey,
    NotFound,
    PreconditionFailed,
    RejectedByDatabase,
    DatabaseUnavailable,
    EntityUnavailable,
    Internal,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: Code,
    message: String,
    /// The position of the item of a batch or bulk read the error is about.
    item: Option<usize>,
    /// A batch's failed If-Match: the row's version (`null`: no row).
    current: Option<Option<Version>>,
    etag: Option<Version>,
    cache: Option<CacheStatus>,
    allow: Option<&'static str>,
    retry_after: bool,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: Code,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    item: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    current: Option<Option<i64>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            item: None,
            current: None,
            etag: None,
            cache: None,
            allow: None,
            retry_after: false,
        }
    }

    pub fn bad_request(code: Code, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn invalid_body(message: impl Into<String>) -> Self {
        Self::bad_request(Code::InvalidBody, message)
    }

    /// About item `item` of a batch or bulk read: the message says which.
    pub fn item(mut self, item: usize) -> Self {
        self.message = format!("item {item}: {}", self.message);
        self.item = Some(item);
        self
    }

    pub fn method_not_allowed(method: &warp::http::Method, allow: &'static str) -> Self {
        let message = match allow {
            "GET, HEAD" => "use GET or HEAD".to_string(),
            "POST" => format!("{method} is not supported here; use POST"),
            _ => format!("{method} is not supported here; use GET, PUT or DELETE"),
        };
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::MethodNotAllowed,
            message,
        );
        e.allow = Some(allow);
        e
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            Code::Unauthorized,
            "this sidecar needs Authorization: Bearer <its API token>",
        )
    }

    /// No slot within `limits.max_queue_wait_ms`.
    pub fn overloaded(max_in_flight: usize) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Overloaded,
            format!("{max_in_flight} requests are in flight, the limit; retry later"),
        );
        e.retry_after = true;
        e
    }

    pub fn too_many(what: &str, n: usize, limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::BatchTooLarge,
            format!("{n} {what}; the limit is {limit} (limits.max_batch_items)"),
        )
    }

    /// A read or write found no row; a tombstone's version is its ETag.
    pub fn not_found(tombstone: Option<Version>, cache: Option<CacheStatus>) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            "no row with this key",
        );
        e.etag = tombstone;
        e.cache = cache;
        e
    }

    pub fn precondition_failed(current: Option<Version>) -> Self {
        let msg = match current {
            Some(v) => format!("If-Match does not hold: the row is at version {v}"),
            None => "If-Match does not hold: there is no row with this key".into(),
        };
        let mut e = Self::new(
            StatusCode::PRECONDITION_FAILED,
            Code::PreconditionFailed,
            msg,
        );
        e.etag = current;
        e
    }

    pub fn internal(message: &str) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, message)
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn into_response(self) -> Response {
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
                item: self.item,
                current: self.current.map(|c| c.map(Version::get)),
            },
        };
        let mut r = json(self.status, &body);
        if let Some(v) = self.etag {
            set_etag(&mut r, v);
        }
        if let Some(c) = self.cache {
            set_cache_status(&mut r, c);
        }
        if let Some(allow) = self.allow {
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.code == Code::Unauthorized {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Rejected(msg) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                Code::RejectedByDatabase,
                msg,
            ),
            DbError::BadKey(msg) => Self::bad_request(Code::InvalidKey, msg),
            DbError::Unavailable | DbError::Unreachable => {
                let mut e = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::DatabaseUnavailable,
                    e.to_string(),
                );
                e.retry_after = true;
                e
            }
            DbError::Schema(msg) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::EntityUnavailable,
                msg,
            ),
            DbError::Internal => Self::internal(&e.to_string()),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Body(e) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                Code::InvalidBody,
                e.to_string(),
            ),
            WriteError::Db(e) => e.into(),
        }
    }
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::DuplicateKey { first, index } => Self::bad_request(
                Code::DuplicateKey,
                format!("the same key as item {first}; give each key once per batch"),
            )
            .item(index),
            BatchError::Body { index, error } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                Code::InvalidBody,
                error.to_string(),
            )
            .item(index),
            BatchError::PreconditionFailed { index, current } => {
                let msg = match current {
                    Some(v) => format!("if_match does not hold: the row is at version {v}"),
                    None => "if_match does not hold: there is no row with this key".into(),
                };
                let mut e = Self::new(
                    StatusCode::PRECONDITION_FAILED,
                    Code::PreconditionFailed,
                    format!("{msg}; nothing was written"),
                )
                .item(index);
                e.current = Some(current);
                e
            }
            BatchError::NotFound { index } => Self::new(
                StatusCode::NOT_FOUND,
                Code::NotFound,
                "no row with this key to delete; nothing was written",
            )
            .item(index),
            // Statement errors of an item: the database refused it (422), or the key (400), or
            // the database is away (503); the batch rolled back.
            BatchError::Db {
                index: Some(index),
                error: error @ (DbError::Rejected(_) | DbError::BadKey(_)),
            } => {
                let message = format!("{error}; nothing was written");
                let mut e = ApiError::from(error);
                e.message = message;
                e.item(index)
            }
            BatchError::Db { error, .. } => error.into(),
        }
    }
}

impl From<ApiError> for Response {
    fn from(e: ApiError) -> Self {
        e.into_response()
    }
}
