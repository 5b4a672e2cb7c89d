//! Support for the end-to-end suites: real PostgreSQL (the cluster `scripts/local-services`
//! starts), a real redis-server per test, and real sidecar processes (built with hold points).
#![forbid(unsafe_code)]

pub mod cluster;
pub mod commit_stream;
pub mod history;
pub mod hooks;
pub mod proxy;
pub mod sentinel;
pub mod tls;

use serde_json::Value;
use sqlx::PgPool;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use wtc_config::{CacheConfig, DatabaseConfig, Entity, Limits, RedisConfig, SidecarConfig};

pub use hooks::{FILL_BEFORE_STORE, WRITE_BEFORE_CACHE_STEP};

/// The database the suites use: `WTC_DATABASE_URL` as printed by `scripts/local-services`.
pub fn database_url() -> String {
    std::env::var("WTC_DATABASE_URL").unwrap_or_else(|_| {
        panic!("WTC_DATABASE_URL is not set: run the tests through scripts/test (it starts PostgreSQL and Redis)")
    })
}

/// `url` with its port replaced (to reach PostgreSQL through a `proxy::FaultProxy`).
pub fn with_port(url: &str, port: u16) -> String {
    let at = url.rfind('@').map_or(0, |i| i + 1);
    let rest = &url[at..];
    let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host = rest[..host_end]
        .rsplit_once(':')
        .map_or(&rest[..host_end], |(h, _)| h);
    format!("{}{host}:{port}{}", &url[..at], &rest[host_end..])
}

/// The port of `WTC_DATABASE_URL`.
pub fn database_port() -> u16 {
    let url = database_url();
    let at = url.rfind('@').map_or(0, |i| i + 1);
    url[at..]
        .split(['/', '?'])
        .next()
        .and_then(|host| host.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .expect("a port in WTC_DATABASE_URL")
}

#[test]
fn with_port_replaces_only_the_port() {
    assert_eq!(
        with_port("postgres://wtc:wtc@127.0.0.1:55432/wtc", 1234),
        "postgres://wtc:wtc@127.0.0.1:1234/wtc"
    );
    assert_eq!(
        with_port("postgres://wtc@[::1]:5/wtc?sslmode=disable", 7),
        "postgres://wtc@[::1]:7/wtc?sslmode=disable"
    );
}

pub async fn pg() -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url())
        .await
        .expect("connect to the test PostgreSQL")
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}_{:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// Creates a table shaped like the application tables the sidecar serves, with a text key.
pub async fn create_table(pool: &PgPool, table: &str) {
    let sql = format!(
        "CREATE TABLE {table} (id text PRIMARY KEY, owner text, balance numeric NOT NULL DEFAULT 0, \
         n integer, version bigint NOT NULL DEFAULT 0)"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .unwrap();
}

/// A new table (named after `prefix`) whose key column `id` has the SQL type `key_type`, with a
/// `label` column; returns its name.
pub async fn table_with_key(pool: &PgPool, prefix: &str, key_type: &str) -> String {
    let table = unique(prefix);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id {key_type} PRIMARY KEY, label text, version bigint NOT NULL DEFAULT 0)"
    )))
    .execute(pool)
    .await
    .unwrap();
    table
}

/// Calls of SELECT statements on `table` (the sidecar's reads), from pg_stat_statements.
pub async fn select_calls(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements \
         WHERE query LIKE 'SELECT%' AND query LIKE '%' || $1 || '%' AND query NOT LIKE '%pg_stat_statements%'",
    )
    .bind(format!("FROM \"{table}\" AS t"))
    .fetch_one(pool)
    .await
    .unwrap()
}

pub async fn db_version(pool: &PgPool, table: &str, key: &str) -> Option<i64> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM {table} WHERE id = $1"
    )))
    .bind(key)
    .fetch_optional(pool)
    .await
    .unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("wtc-tests").join(unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What a restarted redis-server brings back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing: it restarts empty.
    None,
    /// Everything it had (append-only file, written on every command).
    AppendOnly,
    /// The last snapshot taken with `RedisServer::save`: what a crash between snapshots restores,
    /// older than what was acknowledged since.
    Snapshot,
}

/// A redis-server of the test's own, on a free loopback port; killed on drop.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    persistence: Persistence,
    tls: Option<RedisTls>,
    /// More `redis-server` arguments (e.g. `--replicaof`).
    args: Vec<String>,
}

/// A redis-server that speaks only TLS: its certificate and CA, and whether it asks clients for
/// a certificate (which the harness's own connections then present).
#[derive(Debug, Clone)]
pub struct RedisTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::start_with(Persistence::None).await
    }

    /// The server's data folder is the test's own; `persistence` says what survives a restart.
    pub async fn start_with(persistence: Persistence) -> Self {
        let mut s = Self {
            port: free_port(),
            dir: scratch_dir("redis"),
            child: None,
            persistence,
            tls: None,
            args: vec![],
        };
        s.spawn().await;
        s
    }

    /// A server without persistence, started with more arguments (`--replicaof host port`...).
    pub async fn start_with_args(args: &[&str]) -> Self {
        let mut s = Self {
            port: free_port(),
            dir: scratch_dir("redis"),
            child: None,
            persistence: Persistence::None,
            tls: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn().await;
        s
    }

    /// A server on TLS only (`--port 0 --tls-port`), with the certificates of `certs`; with
    /// `client_certs`, it refuses clients without a certificate signed by the CA.
    pub async fn start_tls(certs: &tls::Certs, client_certs: bool) -> Self {
        Self::start_tls_with_args(certs, client_certs, &[]).await
    }

    /// `start_tls` with more arguments (`--tls-cluster yes`...).
    pub async fn start_tls_with_args(
        certs: &tls::Certs,
        client_certs: bool,
        args: &[&str],
    ) -> Self {
        let tls = RedisTls {
            cert: certs.path("server.crt"),
            key: certs.path("server.key"),
            ca: certs.path("ca.crt"),
            client_cert: client_certs.then(|| (certs.path("client.crt"), certs.path("client.key"))),
        };
        let mut s = Self {
            port: free_port(),
            dir: scratch_dir("redis"),
            child: None,
            persistence: Persistence::None,
            tls: Some(tls),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        let port = self.port.to_string();
        cmd.args(["--bind", "127.0.0.1", "--save", ""]);
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some(t) => cmd
                .args(["--port", "0", "--tls-port", &port, "--tls-cert-file"])
                .arg(&t.cert)
                .arg("--tls-key-file")
                .arg(&t.key)
                .arg("--tls-ca-cert-file")
                .arg(&t.ca)
                .args([
                    "--tls-auth-clients",
                    if t.client_cert.is_some() { "yes" } else { "no" },
                ]),
        };
        cmd.args([
            "--appendonly",
            if self.persistence == Persistence::AppendOnly {
                "yes"
            } else {
                "no"
            },
        ])
        .arg("--dir")
        .arg(&self.dir)
        .args(&self.args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
        self.child = Some(
            cmd.spawn()
                .expect("redis-server is installed (scripts/local-services)"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://127.0.0.1:{}", self.port),
        }
    }

    pub fn tls(&self) -> Option<&RedisTls> {
        self.tls.as_ref()
    }

    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = match &self.tls {
            None => redis::Client::open(self.url())?,
            Some(t) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: t.client_cert.as_ref().map(|(c, k)| redis::ClientTlsConfig {
                        client_cert: std::fs::read(c).unwrap(),
                        client_key: std::fs::read(k).unwrap(),
                    }),
                    root_cert: Some(std::fs::read(&t.ca).unwrap()),
                },
            )?,
        };
        client.get_multiplexed_async_connection().await
    }

    /// kill -9.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    pub async fn restart(&mut self) {
        self.kill().await;
        if self.persistence == Persistence::None {
            let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
        }
        self.spawn().await;
    }

    /// Restarts with its data files deleted: what a restart without persistence does.
    pub async fn restart_empty(&mut self) {
        self.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).unwrap();
        self.spawn().await;
    }

    /// Takes a snapshot (`SAVE`): what a restart of a `Persistence::Snapshot` server loads.
    pub async fn save(&self) {
        let mut c = self.connection().await.unwrap();
        redis::cmd("SAVE").query_async::<()>(&mut c).await.unwrap();
    }

    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .expect("redis running")
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        let mut c = self.connection().await.unwrap();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    pub async fn set(&self, key: &str, value: &str) {
        let mut c = self.connection().await.unwrap();
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }

    pub async fn del(&self, key: &str) {
        let mut c = self.connection().await.unwrap();
        redis::cmd("DEL")
            .arg(key)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }

    /// `PTTL` of a key: milliseconds left, -1 without expiry, -2 when absent.
    pub async fn pttl(&self, key: &str) -> i64 {
        let mut c = self.connection().await.unwrap();
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// `INFO section`, or `None` when the server does not answer.
    pub async fn info(&self, section: &str) -> Option<String> {
        let mut c = self.connection().await.ok()?;
        redis::cmd("INFO")
            .arg(section)
            .query_async(&mut c)
            .await
            .ok()
    }

    /// Commands this server has processed so far (`INFO stats`), to count what a workload costs.
    pub async fn commands_processed(&self) -> u64 {
        let mut c = self.connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut c)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("INFO stats has total_commands_processed")
    }

    /// Version of the cached envelope, if any.
    pub async fn cached_version(&self, entity: &str, key: &str) -> Option<i64> {
        let raw = self.get(&entry_key(entity, key)).await?;
        let v: Value = serde_json::from_str(&raw).expect("cached value is JSON");
        v["v"].as_i64()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}

/// The Redis key of an entry, as the sidecar names it.
pub fn entry_key(entity: &str, key: &str) -> String {
    wtc_sidecar::core::CacheKey::new(entity, key).entry
}

/// What most suites start from: a table of their own (named after `prefix`) on the shared
/// PostgreSQL, and a redis-server of their own.
pub struct TestBed {
    pub pool: PgPool,
    pub redis: RedisServer,
    pub table: String,
}

impl TestBed {
    pub async fn new(prefix: &str) -> Self {
        let pool = pg().await;
        let table = unique(prefix);
        create_table(&pool, &table).await;
        Self {
            pool,
            redis: RedisServer::start().await,
            table,
        }
    }

    /// A sidecar configuration serving the table as entity `accounts` on this Redis.
    pub fn fixture(&self) -> Fixture {
        Fixture::new(&self.redis.url()).entity("accounts", &self.table)
    }
}

/// Builder for a sidecar configuration; fixtures start from `Fixture::new(redis)`.
pub struct Fixture {
    pub config: SidecarConfig,
    /// Environment of the sidecar process (e.g. `WTC_API_TOKEN`).
    pub env: Vec<(String, String)>,
    /// Log to a file (`Sidecar::logs`) at `warn`, instead of the test's stderr.
    pub capture_logs: bool,
}

impl Fixture {
    pub fn new(redis_url: &str) -> Self {
        Self {
            config: SidecarConfig {
                listen: "127.0.0.1:0".into(),
                metrics_listen: None,
                api_token_file: None,
                database: DatabaseConfig {
                    url: database_url(),
                    pool_size: 8,
                    statement_timeout_ms: 5_000,
                    ca_file: None,
                    client_cert_file: None,
                    client_key_file: None,
                },
                redis: RedisConfig {
                    url: redis_url.into(),
                    connect_timeout_ms: 300,
                    response_timeout_ms: 200,
                    ca_file: None,
                    client_cert_file: None,
                    client_key_file: None,
                    password_file: None,
                },
                cache: CacheConfig::default(),
                limits: Limits::default(),
                sampler: wtc_config::SamplerConfig {
                    enabled: false,
                    ..Default::default()
                },
                commit_stream: Default::default(),
                entities: vec![],
            },
            env: vec![],
            capture_logs: false,
        }
    }

    pub fn entity(mut self, name: &str, table: &str) -> Self {
        self.config.entities.push(Entity {
            name: name.into(),
            table: table.into(),
            key_column: "id".into(),
            version_column: "version".into(),
            ttl_seconds: 300,
            versions: Default::default(),
        });
        self
    }

    pub fn with(mut self, f: impl FnOnce(&mut SidecarConfig)) -> Self {
        f(&mut self.config);
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Keep the sidecar's log (at `warn`) for `Sidecar::logs`.
    pub fn capture_logs(mut self) -> Self {
        self.capture_logs = true;
        self
    }

    pub async fn start(self) -> Sidecar {
        Sidecar::spawn(&self.config, &self.env, self.capture_logs).await
    }
}

/// What a workload sends its requests to: a sidecar, or an application in front of one that
/// answers with the sidecar's status, `ETag`, `X-Wtc-Cache` and body (the demo application).
pub trait Target: Send + Sync + 'static {
    fn http(&self) -> &reqwest::Client;
    /// The URL of one row.
    fn row_url(&self, entity: &str, key: &str) -> String;
}

impl Target for Sidecar {
    fn http(&self) -> &reqwest::Client {
        &self.http
    }
    fn row_url(&self, entity: &str, key: &str) -> String {
        self.url(entity, key)
    }
}

/// Sends `req` and reads the answer; the error text when nothing came back.
pub async fn reply(req: reqwest::RequestBuilder) -> Result<Reply, String> {
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let etag = header("etag").and_then(|e| e.trim_matches('"').parse().ok());
    let cache = header("x-wtc-cache");
    let raw = resp.text().await.map_err(|e| e.to_string())?;
    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
    Ok(Reply {
        status,
        etag,
        cache,
        body,
        raw,
    })
}

/// Every other sidecar a test process starts runs on one worker, the current-thread scheduler
/// a pod gets under a one-CPU limit (wtc_sidecar::runtime); the rest on the runtime's default
/// (one worker per core, multi-thread), so that both schedulers go through every suite. A test
/// that sets `TOKIO_WORKER_THREADS` itself, or a run with it in the environment, keeps that.
fn runtime_shape(env: &[(String, String)]) -> Option<&'static str> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let set = env.iter().any(|(k, _)| k == "TOKIO_WORKER_THREADS")
        || std::env::var_os("TOKIO_WORKER_THREADS").is_some();
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    (!set && n % 2 == 1).then_some("1")
}

/// A running `wtc-sidecar` process (the build with hold points).
pub struct Sidecar {
    pub base: String,
    /// `http://addr` of the `metrics_listen` listener, when configured.
    pub metrics_base: Option<String>,
    pub http: reqwest::Client,
    /// Sent as `Authorization: Bearer` by the harness's own calls (metrics, holds).
    pub token: Option<String>,
    child: Child,
    dir: PathBuf,
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub etag: Option<i64>,
    pub cache: Option<String>,
    pub body: Value,
    pub raw: String,
}

impl Reply {
    pub fn version(&self) -> i64 {
        self.body["v"]
            .as_i64()
            .unwrap_or_else(|| panic!("no version in {:?}", self.raw))
    }
    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn error_message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

impl Sidecar {
    pub async fn start(config: &SidecarConfig) -> Self {
        Self::start_with_env(config, &[]).await
    }

    pub async fn start_with_env(config: &SidecarConfig, env: &[(String, String)]) -> Self {
        Self::spawn(config, env, false).await
    }

    async fn spawn(config: &SidecarConfig, env: &[(String, String)], capture_logs: bool) -> Self {
        let dir = scratch_dir("sidecar");
        let path = dir.join("sidecar.toml");
        std::fs::write(&path, config.render()).unwrap();
        let (level, stderr) = if capture_logs {
            let log = std::fs::File::create(dir.join("sidecar.log")).unwrap();
            ("warn".to_string(), Stdio::from(log))
        } else {
            let level = std::env::var("WTC_TEST_SIDECAR_LOG").unwrap_or_else(|_| "error".into());
            (level, Stdio::inherit())
        };
        let shape = runtime_shape(env);
        let mut child = Command::new(sidecar_binary())
            .envs(shape.iter().map(|v| ("TOKIO_WORKER_THREADS", v)))
            .arg("--config")
            .arg(&path)
            .env_remove("WTC_DATABASE_URL")
            .env_remove("WTC_REDIS_URL")
            .env_remove("WTC_LISTEN")
            .env_remove("WTC_METRICS_LISTEN")
            .env_remove("WTC_API_TOKEN")
            .env("RUST_LOG", level)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start the sidecar");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("sidecar printed its address in time")
            .unwrap()
            .expect("sidecar exited before listening");
        let addr = line
            .strip_prefix("listening on ")
            .expect("address line")
            .to_string();
        // Shown with a failing test's output: which scheduler this sidecar ran on.
        eprintln!(
            "sidecar on {addr}: {}",
            match (shape, env.iter().find(|(k, _)| k == "TOKIO_WORKER_THREADS")) {
                (Some(_), _) => "one worker (current-thread scheduler)".to_string(),
                (None, Some((_, n))) => format!("TOKIO_WORKER_THREADS={n}, set by the test"),
                (None, None) =>
                    "the runtime's default workers, or TOKIO_WORKER_THREADS of the run".into(),
            }
        );
        let metrics_base = match &config.metrics_listen {
            None => None,
            Some(_) => {
                let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                    .await
                    .expect("sidecar printed its metrics address in time")
                    .unwrap()
                    .expect("sidecar exited before its metrics listener");
                let at = line
                    .strip_prefix("metrics listening on ")
                    .expect("metrics address line");
                Some(format!("http://{at}"))
            }
        };
        Self {
            base: format!("http://{addr}"),
            metrics_base,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
            token: None,
            child,
            dir,
        }
    }

    /// Replaces the configuration file the sidecar was started with, as the kubelet replaces a
    /// mounted ConfigMap's (a new file renamed over the old).
    pub fn rewrite_config(&self, text: &str) {
        let tmp = self.dir.join("sidecar.toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join("sidecar.toml")).unwrap();
    }

    /// What the sidecar logged so far (started with `Fixture::capture_logs`).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("sidecar.log")).unwrap_or_default()
    }

    /// The harness's own calls (metrics, holds) carry this token.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self
    }

    /// `req` with the harness's token, if any.
    pub fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("sidecar running")
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    pub fn url(&self, entity: &str, key: &str) -> String {
        format!("{}/v1/entities/{entity}/{key}", self.base)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        self.try_send(req)
            .await
            .expect("request reached the sidecar")
    }

    /// `send` for scenarios where the sidecar may be gone or the connection cut: the error text.
    pub async fn try_send(&self, req: reqwest::RequestBuilder) -> Result<Reply, String> {
        reply(req).await
    }

    pub async fn get(&self, entity: &str, key: &str) -> Reply {
        self.send(self.http.get(self.url(entity, key))).await
    }

    pub async fn put(&self, entity: &str, key: &str, body: Value) -> Reply {
        self.send(self.http.put(self.url(entity, key)).json(&body))
            .await
    }

    pub async fn put_if(&self, entity: &str, key: &str, body: Value, version: i64) -> Reply {
        let req = self
            .http
            .put(self.url(entity, key))
            .header("if-match", format!("\"{version}\""))
            .json(&body);
        self.send(req).await
    }

    pub async fn delete(&self, entity: &str, key: &str) -> Reply {
        self.send(self.http.delete(self.url(entity, key))).await
    }

    pub async fn metrics(&self) -> String {
        self.authed(self.http.get(format!("{}/metrics", self.base)))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Value of one sample line of /metrics (exact series text, e.g. `wtc_repair_queue_depth`).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in metrics"))
    }

    /// Arms a hold point for one key; returns its id.
    pub async fn hold(&self, point: &str, entity: &str, key: &str) -> u64 {
        self.arm_hold(serde_json::json!({"point": point, "entity": entity, "key": key}))
            .await
    }

    /// A hold that lets its request go by itself after `ms`.
    pub async fn hold_for(&self, point: &str, entity: &str, key: &str, ms: u64) -> u64 {
        let body = serde_json::json!({"point": point, "entity": entity, "key": key, "release_after_ms": ms});
        self.arm_hold(body).await
    }

    async fn arm_hold(&self, body: Value) -> u64 {
        let r = self
            .send(
                self.authed(self.http.post(format!("{}/_test/holds", self.base)))
                    .json(&body),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.raw);
        r.body["id"].as_u64().unwrap()
    }

    /// Waits until a request is stopped at the hold.
    pub async fn wait_held(&self, id: u64) {
        let r = self
            .send(
                self.authed(
                    self.http
                        .get(format!("{}/_test/holds/{id}/reached", self.base)),
                ),
            )
            .await;
        assert_eq!(r.status, 200, "no request reached hold {id}: {}", r.raw);
    }

    pub async fn release(&self, id: u64) {
        let r = self
            .send(
                self.authed(
                    self.http
                        .post(format!("{}/_test/holds/{id}/release", self.base)),
                ),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.raw);
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The sidecar built with hold points: `target/<profile>/wtc-sidecar-under-test`, next to the
/// test binary's `deps/` folder (cargo builds a package's binaries before its integration tests).
pub(crate) fn sidecar_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WTC_SIDECAR_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps/<test>");
    profile_dir.join("wtc-sidecar-under-test")
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
