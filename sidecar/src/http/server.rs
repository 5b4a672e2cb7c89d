//! The HTTP/1.1 server: hyper serving the warp filter of `http`, as `warp::serve` does, with
//! connection hygiene, graceful shutdown under a deadline, and one check in front of warp.
//!
//! Hygiene (`limits`): headers must arrive within `header_timeout_ms`, which is also the longest a
//! kept-alive connection may sit idle; at most `max_connections` are open, and a connection
//! beyond that is closed at once unless its first bytes are a health check, so that a flood of
//! idle or slow connections from a local client can neither exhaust file descriptors nor make the
//! probes fail. Bodies have their own deadline (`request::read_body`).
//!
//! The check: a request target without a path (the authority form, `GET a:1 HTTP/1.1`, which
//! hyper accepts for any method) makes warp's path filters panic with http >= 1.4.1 (warp issue
//! 1166), killing the connection without an answer. Such a request gets `400 invalid_target`
//! before warp sees it. Found by the `request` fuzz target (docs/fuzzing.md).

use super::App;
use crate::core::ports::{CacheStore, RowStore};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

/// Connections over the cap being looked at (for a health check) at once; more are closed.
const OVER_CAP_CHECKS: usize = 16;
/// How long a connection over the cap may take to show it is a health check.
const OVER_CAP_WAIT: Duration = Duration::from_millis(250);

/// Serves until `shutdown` resolves, then lets open requests finish (idle connections close) for
/// up to `limits.shutdown_grace_ms`; connections still open then are closed.
pub async fn serve<C: CacheStore, R: RowStore>(
    listener: TcpListener,
    app: Arc<App<C, R>>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = app.protocol.config().limits.clone();
    let metrics_app = Arc::clone(&app);
    let routes = warp::service(super::routes(app));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let over_cap = Arc::new(Semaphore::new(OVER_CAP_CHECKS));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_timeout_ms));
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
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => Slot::Counted(slot),
            Err(_) => {
                metrics_app.protocol.metrics().connections_refused.inc();
                match Arc::clone(&over_cap).try_acquire_owned() {
                    Ok(check) => Slot::HealthOnly(check),
                    // Closed at once: dropping the stream.
                    Err(_) => continue,
                }
            }
        };
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
        let mut builder = builder.clone();
        if matches!(slot, Slot::HealthOnly(_)) {
            // One health check, then the connection goes.
            builder.keep_alive(false);
        }
        let graceful = graceful.watcher();
        tokio::spawn(async move {
            if let Slot::HealthOnly(_) = &slot
                && !is_health_check(&stream).await
            {
                return;
            }
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = graceful.watch(conn).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    let grace = Duration::from_millis(limits.shutdown_grace_ms);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = limits.shutdown_grace_ms,
            "shutdown: requests still open after the grace period; their connections are closed"
        );
    }
}

/// What a connection holds: a place under the cap, or (over it) the right to be looked at.
enum Slot {
    Counted(#[allow(dead_code)] OwnedSemaphorePermit),
    HealthOnly(#[allow(dead_code)] OwnedSemaphorePermit),
}

/// Whether the connection's first bytes, within `OVER_CAP_WAIT`, are a health check's request line.
async fn is_health_check(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 16];
    let peek = async {
        loop {
            match stream.peek(&mut buf).await {
                Ok(n) if n >= 12 || n == 0 => return n,
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(_) => return 0,
            }
        }
    };
    match tokio::time::timeout(OVER_CAP_WAIT, peek).await {
        Ok(n) => buf[..n].starts_with(b"GET /healthz") || buf[..n].starts_with(b"GET /readyz"),
        Err(_) => false,
    }
}
