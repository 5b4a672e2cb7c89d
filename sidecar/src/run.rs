//! Process wiring: arguments, configuration, the two stores, the protocol and its background
//! loops, the server on loopback, and graceful shutdown.

use crate::core::Metrics;
use crate::core::Protocol;
use crate::core::ports::CacheStore;
use crate::http::{App, Extension};
use crate::postgres::Database;
use crate::redis_cache::RedisStore;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use wtc_config::{Overrides, SidecarConfig};

/// The sidecar as it ships: the protocol on Redis and PostgreSQL.
pub type Sidecar = Protocol<RedisStore, Database>;

/// Why the sidecar cannot start. Never carries a URL or a secret.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database.url is not a valid PostgreSQL URL")]
    DatabaseUrl,
    #[error(transparent)]
    Redis(crate::redis_cache::SourceError),
    #[error("no configuration file given (--config PATH or WTC_CONFIG=PATH; --help for more)")]
    NoConfig,
    #[error("cannot read configuration {path}: {source}")]
    ReadConfig {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Config {
        path: String,
        source: wtc_config::ConfigError,
    },
    #[error(transparent)]
    Token(wtc_config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Parser)]
#[command(
    name = "wtc-sidecar",
    version,
    about = "Write-through cache sidecar: PostgreSQL first, then Redis with compare-and-swap.",
    after_help = "Environment: WTC_DATABASE_URL, WTC_REDIS_URL, WTC_REDIS_PASSWORD_FILE, WTC_LISTEN, \
                  WTC_METRICS_LISTEN and WTC_API_TOKEN override the file; RUST_LOG sets the log \
                  level. The file is read again every 2 s: TTLs, leases, early refresh and \
                  retries are reloaded; other changes apply at the next start."
)]
struct Args {
    /// The configuration file (TOML).
    #[arg(short, long, env = "WTC_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// For exec probes: GET this URL (http://127.0.0.1:PORT/healthz) and exit 0 on a 2xx answer.
    /// The API listens on loopback only, out of the kubelet's reach.
    #[arg(long, value_name = "URL")]
    probe: Option<String>,
    /// Drop this replication slot of the configured database, and exit: what is left of a
    /// commit stream that was turned off (the operator's Job runs this). Waits up to a minute
    /// for a reader that still holds the slot. Nothing there is not an error.
    #[arg(long, value_name = "NAME", value_parser = identifier)]
    drop_slot: Option<String>,
    /// With --drop-slot: drop this publication too.
    #[arg(long, value_name = "NAME", value_parser = identifier, requires = "drop_slot")]
    drop_publication: Option<String>,
    /// Log lines as text (colours only on a terminal) or as JSON objects, one per line, for log
    /// pipelines. RUST_LOG sets the level either way.
    #[arg(long, env = "WTC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Slot names are `[a-z0-9_]{1,63}` (PostgreSQL's rule); publications are held to the same.
fn identifier(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'));
    match ok {
        true => Ok(s.to_string()),
        false => Err("1 to 63 characters of a-z, 0-9 and _".into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr at `RUST_LOG` (default `info`).
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// The stores and metrics of a configuration (nothing connects yet).
pub fn stores(config: &SidecarConfig) -> Result<(RedisStore, Database, Metrics), StartError> {
    let rows =
        Database::new(&config.database, &config.entities).map_err(|_| StartError::DatabaseUrl)?;
    let names: Vec<&str> = config.entities.iter().map(|e| e.name.as_str()).collect();
    let metrics = Metrics::new(&names);
    let cache = RedisStore::new(
        &config.redis,
        Duration::from_millis(config.cache.redis_down_backoff_ms),
        metrics.redis_epoch.clone(),
    )
    .map_err(StartError::Redis)?;
    Ok((cache, rows, metrics))
}

/// The shipped sidecar for a configuration, in process (the benchmark's baseline uses it).
pub fn sidecar(config: SidecarConfig) -> Result<Sidecar, StartError> {
    let (cache, rows, metrics) = stores(&config)?;
    Ok(Protocol::new(config, cache, rows, metrics))
}

/// The release binary's entry point.
pub fn main_entry() -> ExitCode {
    main_with(|cache, _| cache, None)
}

/// The entry point with the cache store wrapped (`wrap`) and routes added (`extension`): how the
/// end-to-end suites build a sidecar with hold points, without a line of test code in this crate.
pub fn main_with<C: CacheStore>(
    wrap: impl FnOnce(RedisStore, &SidecarConfig) -> C,
    extension: Option<Arc<dyn Extension>>,
) -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logs(args.log_format);
    if let Some(url) = &args.probe {
        return match probe(url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wtc-sidecar: probe failed: {e}");
                ExitCode::from(2)
            }
        };
    }
    let path = args.config;
    let (config, read) = match load_config(path.clone()) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("wtc-sidecar: {msg}");
            return ExitCode::from(2);
        }
    };
    let shape = crate::runtime::Shape::for_this_process();
    let runtime = match shape.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wtc-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(slot) = &args.drop_slot {
        let dropping = drop_stream(&config, slot, args.drop_publication.as_deref());
        return match runtime.block_on(dropping) {
            Ok(done) => {
                println!("{done}");
                ExitCode::SUCCESS
            }
            Err(msg) => {
                eprintln!("wtc-sidecar: {msg}");
                ExitCode::FAILURE
            }
        };
    }
    let follow = path.map(|p| (p, read));
    match runtime.block_on(serve(config, follow, wrap, extension, shape)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("wtc-sidecar: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `--drop-slot`: the slot and publication dropped, said in one line.
async fn drop_stream(
    config: &SidecarConfig,
    slot: &str,
    publication: Option<&str>,
) -> Result<String, String> {
    let rows =
        Database::new(&config.database, &[]).map_err(|_| StartError::DatabaseUrl.to_string())?;
    let dropped = crate::postgres::commit_stream::drop_stream(
        &rows.connect_options(),
        slot,
        publication,
        Duration::from_secs(60),
    )
    .await
    .map_err(|e| format!("cannot drop replication slot {slot:?}: {e}"))?;
    let said = |done: bool| if done { "dropped" } else { "not there" };
    Ok(match publication {
        Some(p) => format!(
            "replication slot {slot}: {}; publication {p}: {}",
            said(dropped.slot),
            said(dropped.publication)
        ),
        None => format!("replication slot {slot}: {}", said(dropped.slot)),
    })
}

/// The configuration, and the file's bytes it came from (a later change is told from them).
fn load_config(path: Option<PathBuf>) -> Result<(SidecarConfig, Vec<u8>), String> {
    let path = path
        .ok_or("no configuration file given (--config PATH or WTC_CONFIG=PATH; --help for more)")?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read configuration {}: {e}", path.display()))?;
    let config = SidecarConfig::parse(&text, &Overrides::from_env())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((config, text.into_bytes()))
}

/// GET `url` (plain `http://host:port/path`) and succeed on a 2xx answer.
fn probe(url: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr: std::net::SocketAddr = host
        .parse()
        .map_err(|_| format!("{host} is not host:port"))?;
    let timeout = Duration::from_secs(2);
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

async fn serve<C: CacheStore>(
    config: SidecarConfig,
    follow: Option<(PathBuf, Vec<u8>)>,
    wrap: impl FnOnce(RedisStore, &SidecarConfig) -> C,
    extension: Option<Arc<dyn Extension>>,
    shape: crate::runtime::Shape,
) -> Result<(), StartError> {
    let listen = config.listen.clone();
    let token = config
        .api_token(std::env::var("WTC_API_TOKEN").ok())
        .map_err(StartError::Token)?;
    let (cache, rows, metrics) = stores(&config)?;
    let cache = wrap(cache, &config);
    metrics.runtime_workers.set(shape.workers as i64);
    let protocol = Arc::new(Protocol::new(config, cache, rows, metrics));
    let mut app = App::new(Arc::clone(&protocol), token.as_deref());
    drop(token);
    if let Some(ext) = extension {
        tracing::warn!(
            "serving extra routes under {}: not a release build",
            ext.prefix()
        );
        app = app.with_extension(ext);
    }
    let app = Arc::new(app);
    let background = protocol.start_background();
    let commit_stream = protocol.config().commit_stream.enabled.then(|| {
        let stop = tokio_util::sync::CancellationToken::new();
        let task = crate::commit_stream::start(Arc::clone(&protocol), stop.clone());
        (task, stop)
    });
    tokio::spawn(say_what_answers(Arc::clone(&protocol)));
    if let Some((path, read)) = follow {
        tokio::spawn(follow_config(path, read, Arc::clone(&protocol)));
    }
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: listen.clone(),
        source,
    })?;
    tracing::info!(
        %addr,
        entities = protocol.config().entities.len(),
        api_token = app.has_api_token(),
        workers = shape.workers,
        scheduler = if shape.current_thread() { "current_thread" } else { "multi_thread" },
        "wtc-sidecar listening"
    );
    // Tests start the sidecar on port 0 and read the address from this line.
    println!("listening on {addr}");
    if let Some(metrics_addr) = protocol.config().metrics_listen.clone() {
        let listener = tokio::net::TcpListener::bind(&metrics_addr)
            .await
            .map_err(|source| StartError::Listen {
                addr: metrics_addr.clone(),
                source,
            })?;
        let at = listener.local_addr().ok();
        tracing::info!(addr = ?at, "metrics and health checks listening");
        if let Some(at) = at {
            println!("metrics listening on {at}");
        }
        // Same connection limits and timeouts as the API; it stops with the process.
        let observability = Arc::new(App::observability(Arc::clone(&protocol)));
        tokio::spawn(crate::http::server::serve(
            listener,
            observability,
            std::future::pending(),
        ));
    }
    crate::http::server::serve(listener, Arc::clone(&app), shutdown_signal()).await;
    // Connections are closed; let writes whose clients hung up finish their cache step.
    app.writes_in_flight.close();
    app.writes_in_flight.wait().await;
    protocol.finish_refreshes().await;
    background.stop().await;
    if let Some((task, stop)) = commit_stream {
        stop.cancel();
        let _ = task.await;
    }
    // One last repair pass: keys left in the queue could be served stale by other sidecars.
    protocol.repair_once().await;
    tracing::info!("stopped");
    Ok(())
}

/// How often the configuration file is read again. The kubelet replaces a mounted ConfigMap's
/// file within its sync period (a minute by default); this adds at most a few seconds.
const CONFIG_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Applies the reloadable settings of a changed configuration file (the operator updated the
/// cache's ConfigMap; `SidecarConfig::without_reloadable` says which settings). A change of any
/// other setting, or a file that does not validate, is logged and counted and changes nothing:
/// the operator rolls the pod for those (its config hash leaves the reloadable settings out).
async fn follow_config<C: CacheStore>(
    path: PathBuf,
    read_at_start: Vec<u8>,
    protocol: Arc<Protocol<C, crate::postgres::Database>>,
) {
    let mut seen = Some(read_at_start);
    let mut tick = tokio::time::interval(CONFIG_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Unreadable for a moment (the kubelet swaps a symlink): the next tick reads it.
        let Ok(bytes) = tokio::fs::read(&path).await else {
            continue;
        };
        if seen.as_deref() == Some(&bytes[..]) {
            continue;
        }
        seen = Some(bytes.clone());
        let text = String::from_utf8_lossy(&bytes);
        let result = match SidecarConfig::parse(&text, &Overrides::from_env()) {
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "the configuration file changed and is not valid; the one in use stays"
                );
                "invalid"
            }
            Ok(new) => match protocol.reload(&new) {
                Ok(changed) if changed.is_empty() => continue,
                Ok(changed) => {
                    tracing::info!(?changed, "configuration reloaded");
                    "applied"
                }
                Err(crate::core::NeedsRestart) => {
                    tracing::warn!(
                        "the configuration file changed in settings a running sidecar cannot \
                         take (only TTLs, leases, early refresh and retries reload); the new \
                         file applies at the next start"
                    );
                    "needs_restart"
                }
            },
        };
        protocol
            .metrics()
            .config_reloads
            .with_label_values(&[result])
            .inc();
    }
}

/// Tries both stores once at start so that `kubectl logs` tells at once what cannot be reached
/// and why (a wrong CA, a refused login), instead of a pod that is silently not ready.
async fn say_what_answers<C: CacheStore>(protocol: Arc<Protocol<C, crate::postgres::Database>>) {
    use crate::core::ports::RowStore;
    match protocol.rows().ping().await {
        Ok(()) => tracing::info!("the database answers"),
        Err(why) => tracing::warn!(%why, "the database does not answer (not ready until it does)"),
    }
    match protocol.cache().check().await {
        Ok(()) => tracing::info!("Redis answers"),
        Err(why) => tracing::warn!(%why, "Redis does not answer (reads go to the database)"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request's future is moved several times (into hyper's connection task, a write's
    /// task): the hit path's must not carry the miss path's database and fill states, nor a
    /// write's the introspection's (31 KB and 15 KB before they were boxed).
    #[tokio::test]
    async fn request_futures_stay_small() {
        let config = SidecarConfig::parse(
            "[database]\nurl = \"postgres://u@127.0.0.1:1/db\"\n\
             [redis]\nurl = \"redis://127.0.0.1:1\"\n\
             [[entities]]\nname = \"accounts\"\ntable = \"accounts\"\n",
            &Overrides::default(),
        )
        .expect("config");
        let sc = Arc::new(sidecar(config).expect("sidecar"));
        let accounts = sc.entity("accounts").unwrap();
        let read = sc.read_at_least(accounts, "k", None);
        assert!(
            size_of_val(&read) <= 4096,
            "read: {} bytes",
            size_of_val(&read)
        );
        let put = sc.put(
            accounts,
            "k",
            serde_json::Map::new(),
            "{}".into(),
            crate::core::Condition::Always,
        );
        assert!(
            size_of_val(&put) <= 4096,
            "put: {} bytes",
            size_of_val(&put)
        );
    }

    #[test]
    fn arguments() {
        let a = Args::try_parse_from(["wtc-sidecar", "--config=/etc/wtc.toml"]).unwrap();
        assert_eq!(a.config, Some(PathBuf::from("/etc/wtc.toml")));
        let a = Args::try_parse_from(["wtc-sidecar", "--probe", "http://127.0.0.1:1/healthz"]);
        assert!(a.unwrap().probe.is_some());
        assert!(Args::try_parse_from(["wtc-sidecar", "--bogus"]).is_err());
        let a = Args::try_parse_from(["wtc-sidecar", "--log-format", "json"]).unwrap();
        assert_eq!(a.log_format, LogFormat::Json);
        assert!(Args::try_parse_from(["wtc-sidecar", "--log-format", "xml"]).is_err());
    }
}
