//! Process wiring: configuration, the server on loopback, the repair loop, graceful shutdown.

use crate::sidecar::Sidecar;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use wtc_config::{Overrides, SidecarConfig};

const USAGE: &str = "usage: wtc-sidecar [--config PATH]   (or WTC_CONFIG=PATH)
Environment: WTC_DATABASE_URL, WTC_REDIS_URL, WTC_LISTEN and WTC_API_TOKEN override the file; RUST_LOG sets the log level.";

/// Entry point shared by the release binary and the test build (with hold points).
pub fn main_entry() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match load_config(std::env::args().skip(1).collect()) {
        Ok(Some(c)) => c,
        Ok(None) => return ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("wtc-sidecar: {msg}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wtc-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("wtc-sidecar: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: Vec<String>) -> Result<Option<SidecarConfig>, String> {
    let mut path: Option<PathBuf> = std::env::var_os("WTC_CONFIG").map(PathBuf::from);
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" | "-c" => path = Some(it.next().ok_or("--config needs a path")?.into()),
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--probe" => {
                // For exec probes: the API listens on loopback only, out of the kubelet's reach.
                let url = it
                    .next()
                    .ok_or("--probe needs a URL such as http://127.0.0.1:7480/readyz")?;
                return match probe(&url) {
                    Ok(()) => Ok(None),
                    Err(e) => Err(format!("probe failed: {e}")),
                };
            }
            "--version" | "-V" => {
                println!("wtc-sidecar {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let path = path.ok_or_else(|| format!("no configuration file given\n{USAGE}"))?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read configuration {}: {e}", path.display()))?;
    SidecarConfig::parse(&text, &Overrides::from_env())
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// GET `url` (plain `http://host:port/path`) and succeed on a 2xx answer.
fn probe(url: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr: std::net::SocketAddr = host
        .parse()
        .map_err(|_| format!("{host} is not host:port"))?;
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).map_err(|e| e.to_string())?;
    match &head[9..10] {
        b"2" => Ok(()),
        _ => Err(String::from_utf8_lossy(&head).into_owned()),
    }
}

pub async fn serve(config: SidecarConfig) -> Result<(), String> {
    let listen = config.listen.clone();
    let token = config
        .api_token(std::env::var("WTC_API_TOKEN").ok())
        .map_err(|e| e.to_string())?;
    let sc = Arc::new(Sidecar::new(config)?.with_api_token(token.as_deref()));
    drop(token);
    if cfg!(feature = "test-hooks") {
        tracing::warn!("built with test hold points: not for production");
    }
    sc.spawn_repair_loop();
    sc.spawn_sampler();
    sc.spawn_write_ratio_watch();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        %addr,
        entities = sc.config.entities.len(),
        api_token = sc.api_token.is_some(),
        "wtc-sidecar listening"
    );
    // Tests start the sidecar on port 0 and read the address from this line.
    println!("listening on {addr}");
    crate::server::serve(listener, Arc::clone(&sc), shutdown_signal()).await;
    // Connections are closed; let writes whose clients hung up finish their cache step.
    sc.writes_in_flight.close();
    sc.writes_in_flight.wait().await;
    // One last repair pass: keys left in the queue could be served stale by other sidecars.
    if !sc.repair.is_empty() {
        sc.repair.drain_once(&sc.cache, &sc.metrics).await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
