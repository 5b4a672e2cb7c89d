//! The localhost HTTP API: each request is routed (`request::route`), admitted, parsed into a
//! typed command (`request::command`), applied to the protocol, and answered (`response`); every
//! refusal is an `error::ApiError`. No protocol logic here.

mod admission;
mod auth;
mod error;
mod reply;
mod request;
mod response;
pub(crate) mod server;

use crate::core::Protocol;
use crate::core::ports::{CacheStore, RowStore};
use crate::core::types::BatchError;
use admission::Admission;
use auth::ApiToken;
use bytes::{Buf, Bytes};

use futures_util::Stream;
use request::{Command, Route};
use serde_json::json;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;
use warp::Filter;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::path::FullPath;
use warp::reply::Response;

pub use error::{ApiError, Code};
pub use reply::CACHE_HEADER;
pub use request::{BULK_GET, MIN_VERSION_HEADER};

/// The OpenAPI 3 document of this API, served at `GET /openapi.json`.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// Routes added in front of the API by a build that embeds the sidecar (the end-to-end suites'
/// control of hold points, `tests/`). They are reached only under their prefix, after the API
/// token check, and answer a status and a JSON body.
pub trait Extension: Send + Sync + 'static {
    /// The path prefix of these routes, e.g. `/_test/`.
    fn prefix(&self) -> &str;
    fn handle<'a>(
        &'a self,
        method: &'a str,
        path: &'a str,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = (u16, serde_json::Value)> + Send + 'a>>;
}

/// What the API serves: the protocol, and the HTTP side's own state.
pub struct App<C, R> {
    pub protocol: Arc<Protocol<C, R>>,
    /// Load shedding: slots for requests in flight (`limits`).
    admission: Admission,
    /// When set, requests other than health checks need `Authorization: Bearer <token>`.
    api_token: Option<ApiToken>,
    /// Writes run as tasks of their own, so a client that hangs up cannot cut a committed write
    /// off before its cache step; shutdown waits for them.
    pub writes_in_flight: TaskTracker,
    extension: Option<Arc<dyn Extension>>,
    /// The pod-facing listener's app (`metrics_listen`): health checks and `/metrics` only,
    /// no token (nothing it answers reads or writes data).
    observability_only: bool,
}

impl<C: CacheStore, R: RowStore> App<C, R> {
    pub fn new(protocol: Arc<Protocol<C, R>>, api_token: Option<&str>) -> Self {
        let limits = &protocol.config().limits;
        Self {
            admission: Admission::new(
                limits.max_in_flight,
                Duration::from_millis(limits.max_queue_wait_ms),
            ),
            api_token: api_token.map(ApiToken::new),
            writes_in_flight: TaskTracker::new(),
            extension: None,
            observability_only: false,
            protocol,
        }
    }

    /// The app of the `metrics_listen` listener: `/metrics`, `/healthz`, `/readyz`; every other
    /// path is `404 no_route`.
    pub fn observability(protocol: Arc<Protocol<C, R>>) -> Self {
        Self {
            observability_only: true,
            ..Self::new(protocol, None)
        }
    }

    pub fn with_extension(mut self, extension: Arc<dyn Extension>) -> Self {
        self.extension = Some(extension);
        self
    }

    pub fn has_api_token(&self) -> bool {
        self.api_token.is_some()
    }
}

pub fn routes<C: CacheStore, R: RowStore>(
    app: Arc<App<C, R>>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method: Method, path: FullPath, headers: HeaderMap, body| {
                let app = Arc::clone(&app);
                async move {
                    handle(app, method, path.as_str(), &headers, body)
                        .await
                        .unwrap_or_else(ApiError::into_response)
                }
            },
        )
}

/// A request target the routes cannot take: one without a path (the authority form,
/// `GET a:1 HTTP/1.1`). `server` answers it before warp, whose path filters panic on it.
pub fn check_target(uri: &warp::http::Uri) -> Option<Response> {
    if uri.path_and_query().is_some() {
        return None;
    }
    Some(
        ApiError::bad_request(
            error::Code::InvalidTarget,
            "the request target must be a path, like /v1/entities/{entity}/{key}",
        )
        .into_response(),
    )
}

async fn handle<C, R, S, B>(
    app: Arc<App<C, R>>,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: S,
) -> Result<Response, ApiError>
where
    C: CacheStore,
    R: RowStore,
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let p = &app.protocol;
    if app.observability_only
        && !matches!(
            request::health_route(&method, path),
            Some(Ok(Route::Health | Route::Ready | Route::Metrics)) | Some(Err(_))
        )
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            Code::NoRoute,
            "this listener serves /metrics, /healthz and /readyz only",
        ));
    }
    // The API token, when one is set: everything but the health checks needs it.
    if let Some(token) = &app.api_token
        && !matches!(path, "/healthz" | "/readyz")
        && !token.allows(headers)
    {
        p.metrics().requests_unauthorized.inc();
        return Err(ApiError::unauthorized());
    }
    if let Some(route) = request::health_route(&method, path) {
        return Ok(match route? {
            Route::Health => reply::json(StatusCode::OK, &json!({"status": "ok"})),
            Route::Ready => Box::pin(ready(p)).await?,
            Route::Metrics => reply::text(
                p.metrics().render(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            _ => reply::text(OPENAPI, "application/json"),
        });
    }
    if let Some(ext) = &app.extension
        && path.starts_with(ext.prefix())
    {
        let body = request::read_body(headers, body, 64 * 1024, Duration::from_secs(10)).await?;
        let (status, answer) = ext.handle(method.as_str(), path, body).await;
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(reply::json(status, &answer));
    }
    let limits = &p.config().limits;
    let entity = |name: &str| p.entity(name);
    let route = request::route(&method, path, headers, limits, entity)?;
    let body = if request::needs_body(&route) {
        let deadline = Duration::from_millis(limits.body_timeout_ms);
        request::read_body(headers, body, limits.max_body_bytes, deadline).await?
    } else {
        Bytes::new()
    };
    // Load shedding: a slot only once the request is whole (a slow body holds none), held until
    // the answer (a write's: until its task ends).
    let Some(slot) = app.admission.admit(p.metrics()).await else {
        return Err(ApiError::overloaded(limits.max_in_flight));
    };
    match request::command(route, body, limits, entity)? {
        Command::Read {
            entity,
            key,
            min_version,
        } => Ok(response::read(
            p.read_at_least(entity, &key, min_version).await?,
        )),
        Command::BulkRead { entity, keys } => {
            let outcomes = Box::pin(p.read_many(entity, &keys))
                .await
                .map_err(|e| match e {
                    BatchError::Db {
                        index: Some(i),
                        error,
                    } => ApiError::from(error).item(i),
                    other => other.into(),
                })?;
            // A row named many times is read once but answered each time: bound what is sent.
            let size: u64 = outcomes
                .iter()
                .map(|o| o.envelope.as_ref().map_or(0, |e| e.bytes.len() as u64) + 64)
                .sum();
            if size > limits.max_answer_bytes {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    error::Code::AnswerTooLarge,
                    format!(
                        "the answer would be about {size} bytes; the limit is {} \
                         (limits.max_answer_bytes): ask for fewer keys",
                        limits.max_answer_bytes
                    ),
                ));
            }
            Ok(response::bulk(&keys, &outcomes))
        }
        Command::Put {
            entity,
            key,
            body,
            raw,
            condition,
        } => {
            let p = Arc::clone(p);
            let task = app.writes_in_flight.spawn(async move {
                let _slot = slot;
                p.put(entity, &key, body, raw, condition).await
            });
            let out = task
                .await
                .map_err(|_| ApiError::internal("the write task failed"))?;
            Ok(response::write(out?))
        }
        Command::Delete {
            entity,
            key,
            condition,
        } => {
            let p = Arc::clone(p);
            let task = app.writes_in_flight.spawn(async move {
                let _slot = slot;
                p.delete(entity, &key, condition).await
            });
            let out = task
                .await
                .map_err(|_| ApiError::internal("the write task failed"))?;
            Ok(response::write(out?))
        }
        Command::Batch(batch) => {
            let p2 = Arc::clone(p);
            let task = app.writes_in_flight.spawn(async move {
                let _slot = slot;
                let out = p2.write_batch(&batch).await;
                (out, batch)
            });
            let (out, batch) = task
                .await
                .map_err(|_| ApiError::internal("the batch task failed"))?;
            let names: Vec<(&str, &str)> = batch
                .writes
                .iter()
                .map(|w| (p.entity_name(w.entity), w.key.as_str()))
                .collect();
            Ok(response::batch(&names, &out?))
        }
    }
}

/// `/readyz`: ready only when the database answers (Redis being away degrades, not stops).
async fn ready<C: CacheStore, R: RowStore>(p: &Protocol<C, R>) -> Result<Response, ApiError> {
    match p.rows().ping().await {
        Ok(()) => Ok(reply::json(
            StatusCode::OK,
            &json!({"status": "ready", "redis": p.cache().is_up()}),
        )),
        Err(why) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            error::Code::DatabaseUnavailable,
            format!("the database does not answer: {why}"),
        )),
    }
}
