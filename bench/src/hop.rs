//! The HTTP hop alone: a server process with the sidecar's HTTP stack (hyper HTTP/1.1 on the
//! sidecar's runtime for the same number of workers, TCP_NODELAY) that answers every request at
//! once with a fixed body the size of a stored envelope, touching neither Redis nor the database.
//!
//! It answers "what does one HTTP exchange over loopback with another process cost on this
//! machine?", the part of the sidecar's figures that no code in the sidecar can remove. The
//! benchmark runs this binary again with `WTC_BENCH_AS_HOP` set to get it.

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::process::ExitCode;
use tokio::net::TcpListener;

pub const AS_HOP: &str = "WTC_BENCH_AS_HOP";

/// About the size of a cached row's envelope in the benchmark's table.
const BODY: &[u8] = br#"{"v":1,"deleted":false,"written_at_ms":1764230400000,"row":{"id":"h1","owner":"owner-1","balance":1.5,"n":1,"version":1}}"#;

pub fn main_entry() -> ExitCode {
    // The sidecar's own runtime for the same number of workers (wtc_sidecar::runtime).
    let runtime = match wtc_sidecar::runtime::Shape::for_this_process().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wtc-bench hop: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wtc-bench hop: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> std::io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    // The benchmark reads the address from this line, as from the sidecar's.
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn(|_req: hyper::Request<Incoming>| async {
            let mut r =
                hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(BODY)));
            let h = r.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/json"));
            h.insert("etag", HeaderValue::from_static("\"1\""));
            h.insert("x-wtc-cache", HeaderValue::from_static("hit"));
            Ok::<_, Infallible>(r)
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
