//! The HTTP/1.1 server: hyper serving the warp filter of `api`, as `warp::serve` does, with
//! graceful shutdown, and one check in front of warp.
//!
//! The check: a request target without a path (the authority form, `GET a:1 HTTP/1.1`, which
//! hyper accepts for any method) makes warp's path filters panic with http >= 1.4.1 (warp issue
//! 1166), killing the connection without an answer. Such a request gets `400 invalid_target`
//! before warp sees it. Found by the `request` fuzz target (docs/fuzzing.md).

use super::App;
use crate::core::ports::{CacheStore, RowStore};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower_service::Service;

/// Serves until `shutdown` resolves, then lets open requests finish (idle connections close).
pub async fn serve<C: CacheStore, R: RowStore>(
    listener: TcpListener,
    app: Arc<App<C, R>>,
    shutdown: impl Future<Output = ()>,
) {
    let routes = warp::service(super::routes(app));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Answers are one small write each; never hold one back waiting for an ACK.
        let _ = stream.set_nodelay(true);
        let routes = routes.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut routes = routes.clone();
            async move {
                if let Some(refused) = super::check_target(req.uri()) {
                    return Ok::<_, Infallible>(refused);
                }
                routes.call(req).await
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}
