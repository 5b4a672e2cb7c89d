//! wtc-bench: what the sidecar costs against doing the same work in-process, in one run.
//!
//! Baseline: the sidecar's own library (`Sidecar::read` / `Sidecar::put`) called in this process,
//! with the same configuration (pools, timeouts): the same statement and the same Redis script
//! without the HTTP hop. Against it: the sidecar process over HTTP on loopback. Both see the same
//! workload at the same fixed rates and in a closed loop. See docs/benchmarks.md.
#![forbid(unsafe_code)]

mod dapr;
mod hop;
mod http;
mod load;
mod plot;
mod procfs;
mod report;

use http::HttpConn;
use load::{Client, Kind, Plan, Run};
use report::{Batches, Herd, Machine, Phase, Report};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use wtc_config::{Overrides, SidecarConfig};
use wtc_sidecar::Sidecar;
use wtc_sidecar::core::{Batch, CacheStatus, Condition, EntityId, Write, WriteOp};

/// When set, this binary is the sidecar: `--sidecar embedded` runs the sidecar's own entry point
/// in a child process of this binary (used by the test, which has no release build at hand).
const AS_SIDECAR: &str = "WTC_BENCH_AS_SIDECAR";

const USAGE: &str = "usage: wtc-bench [--short] [--seconds S] [--peak-seconds S] [--conns N]
                 [--hit-rates R,R] [--miss-rates R,R] [--write-rates R,R]
                 [--herd N] [--herd-rounds N] [--batches N]
                 [--sidecar PATH|embedded] [--json PATH] [--doc PATH] [--plot PATH]
                 [--dapr-plot PATH]
                 [--only hit,miss,write,peak,herd,batch,tls,dapr] [--sidecar-threads N] [--slices N]
                 [--daprd PATH]
Needs WTC_DATABASE_URL and WTC_REDIS_URL (eval \"$(scripts/local-services)\"); the tls part
(the sidecar on the same Redis over TLS) also WTC_REDIS_TLS_URL and WTC_REDIS_CA_FILE.
--sidecar defaults to the wtc-sidecar next to this binary (target/release/wtc-sidecar).
The dapr part (daprd's Redis and PostgreSQL state stores beside wtc) runs when --daprd or
WTC_DAPRD names a daprd (scripts/daprd builds one).";

#[derive(Debug, Clone)]
pub struct Opts {
    pub short: bool,
    pub seconds: f64,
    pub peak_seconds: f64,
    pub conns: usize,
    pub hit_rates: Vec<f64>,
    pub miss_rates: Vec<f64>,
    pub write_rates: Vec<f64>,
    pub herd: usize,
    pub herd_rounds: usize,
    pub batches: usize,
    pub sidecar: Option<String>,
    pub json: Option<PathBuf>,
    pub doc: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    /// The dapr part's plot (needs the dapr part).
    pub dapr_plot: Option<PathBuf>,
    /// Parts to run (`hit`, `miss`, `write`, `peak`, `herd`, `batch`, `tls`); empty: all.
    pub only: Vec<String>,
    /// Each phase runs as this many slices, alternating between the targets.
    pub slices: usize,
    /// TOKIO_WORKER_THREADS for the sidecar and the HTTP hop, GOMAXPROCS for daprd. Default 1:
    /// what the sidecar gets in a pod under the chart's default CPU limit of one CPU.
    pub sidecar_threads: Option<usize>,
    /// daprd to compare with (`--daprd`, else `WTC_DAPRD`); `None`: no dapr part.
    pub daprd: Option<PathBuf>,
    pub command: String,
}

impl Opts {
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == part)
    }
}

fn parse_args(args: Vec<String>) -> Result<Option<Opts>, String> {
    let mut o = Opts {
        short: false,
        seconds: 10.0,
        peak_seconds: 5.0,
        conns: 16,
        hit_rates: vec![1000.0, 5000.0],
        miss_rates: vec![250.0, 1000.0],
        write_rates: vec![250.0, 1000.0],
        herd: 1000,
        herd_rounds: 5,
        batches: 20,
        sidecar: None,
        json: None,
        doc: None,
        plot: None,
        dapr_plot: None,
        only: Vec::new(),
        sidecar_threads: Some(1),
        daprd: std::env::var_os("WTC_DAPRD")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
        slices: 5,
        command: std::iter::once("wtc-bench".to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
    };
    let (mut seconds, mut peak, mut herd, mut rounds, mut batches) = (None, None, None, None, None);
    let mut it = args.into_iter();
    let num = |v: Option<String>, name: &str| -> Result<f64, String> {
        v.and_then(|s| s.parse::<f64>().ok())
            .filter(|n| *n > 0.0)
            .ok_or_else(|| format!("{name} needs a positive number"))
    };
    let rates = |v: Option<String>, name: &str| -> Result<Vec<f64>, String> {
        let v = v.ok_or_else(|| format!("{name} needs rates"))?;
        v.split(',')
            .map(|s| s.trim().parse::<f64>().ok().filter(|r| *r > 0.0))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("{name}: {v:?} is not a list of positive rates"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--short" => o.short = true,
            "--seconds" => seconds = Some(num(it.next(), &a)?),
            "--peak-seconds" => peak = Some(num(it.next(), &a)?),
            "--conns" => o.conns = num(it.next(), &a)? as usize,
            "--hit-rates" => o.hit_rates = rates(it.next(), &a)?,
            "--miss-rates" => o.miss_rates = rates(it.next(), &a)?,
            "--write-rates" => o.write_rates = rates(it.next(), &a)?,
            "--herd" => herd = Some(num(it.next(), &a)? as usize),
            "--herd-rounds" => rounds = Some(num(it.next(), &a)? as usize),
            "--batches" => batches = Some(num(it.next(), &a)? as usize),
            "--sidecar" => o.sidecar = Some(it.next().ok_or("--sidecar needs a path")?),
            "--daprd" => o.daprd = Some(it.next().ok_or("--daprd needs a path")?.into()),
            "--json" => o.json = Some(it.next().ok_or("--json needs a path")?.into()),
            "--doc" => o.doc = Some(it.next().ok_or("--doc needs a path")?.into()),
            "--plot" => o.plot = Some(it.next().ok_or("--plot needs a path")?.into()),
            "--dapr-plot" => {
                o.dapr_plot = Some(it.next().ok_or("--dapr-plot needs a path")?.into())
            }
            "--slices" => o.slices = num(it.next(), &a)? as usize,
            // 0: as many as the machine has cores (the runtime's own default).
            "--sidecar-threads" => {
                let n = it
                    .next()
                    .and_then(|s| s.parse::<usize>().ok())
                    .ok_or("--sidecar-threads needs a number of threads (0: every core)")?;
                o.sidecar_threads = Some(n).filter(|&n| n > 0)
            }
            "--only" => {
                o.only = it
                    .next()
                    .ok_or("--only needs a list")?
                    .split(',')
                    .map(str::to_string)
                    .collect()
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if o.short {
        o.seconds = 0.4;
        o.peak_seconds = 0.4;
        o.herd = 200;
        o.herd_rounds = 1;
        o.batches = 2;
        o.slices = 1;
    }
    o.seconds = seconds.unwrap_or(o.seconds);
    o.peak_seconds = peak.unwrap_or(o.peak_seconds);
    o.herd = herd.unwrap_or(o.herd);
    o.herd_rounds = rounds.unwrap_or(o.herd_rounds);
    o.batches = batches.unwrap_or(o.batches);
    o.conns = o.conns.max(1);
    if o.dapr_plot.is_some() && (o.daprd.is_none() || !o.runs("dapr")) {
        return Err(
            "--dapr-plot needs the dapr part: --daprd PATH or WTC_DAPRD, and dapr in --only".into(),
        );
    }
    Ok(Some(o))
}

fn main() -> ExitCode {
    if std::env::var_os(AS_SIDECAR).is_some() {
        return wtc_sidecar::main_entry();
    }
    if std::env::var_os(hop::AS_HOP).is_some() {
        return hop::main_entry();
    }
    let opts = match parse_args(std::env::args().skip(1).collect()) {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("wtc-bench: {msg}");
            return ExitCode::from(2);
        }
    };
    // The same runtime as the sidecar's (multi-threaded, one worker per core), so the in-process
    // baseline runs on what an application using the library would run on.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("wtc-bench: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{name} is not set: eval \"$(scripts/local-services)\" first"))
}

fn log(msg: &str) {
    eprintln!("wtc-bench: {msg}");
}

/// A child process answering HTTP (the sidecar under measurement, or the HTTP hop alone);
/// killed on drop.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    pid: u32,
    binary: String,
}

impl ServerProcess {
    async fn start(
        binary: Option<&str>,
        threads: Option<usize>,
        config: &SidecarConfig,
    ) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("wtc-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let path = dir.join("sidecar.toml");
        std::fs::write(&path, config.render()).map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let (cmd, shown) = match binary {
            Some("embedded") => {
                let mut c = Command::new(&exe);
                c.env(AS_SIDECAR, "1").env("WTC_CONFIG", &path);
                (c, format!("{} (embedded sidecar)", exe.display()))
            }
            other => {
                let bin = match other {
                    Some(p) => PathBuf::from(p),
                    None => exe.with_file_name("wtc-sidecar"),
                };
                if !bin.exists() {
                    return Err(format!(
                        "no sidecar binary at {}: cargo build --release -p wtc-sidecar (or --sidecar PATH|embedded)",
                        bin.display()
                    ));
                }
                let mut c = Command::new(&bin);
                c.arg("--config").arg(&path);
                (c, bin.display().to_string())
            }
        };
        Self::spawn(cmd, threads, shown).await
    }

    /// The HTTP hop alone (src/hop.rs): this binary again, with the sidecar's worker threads.
    async fn start_hop(threads: Option<usize>) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&exe);
        cmd.env(hop::AS_HOP, "1");
        Self::spawn(cmd, threads, format!("{} (HTTP hop alone)", exe.display())).await
    }

    async fn spawn(
        mut cmd: Command,
        threads: Option<usize>,
        shown: String,
    ) -> Result<Self, String> {
        match threads {
            Some(n) => cmd.env("TOKIO_WORKER_THREADS", n.to_string()),
            None => cmd.env_remove("TOKIO_WORKER_THREADS"),
        };
        let mut child = cmd
            .env_remove("WTC_DATABASE_URL")
            .env_remove("WTC_REDIS_URL")
            .env_remove("WTC_LISTEN")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the sidecar {shown}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let line = tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).lines().next_line(),
        )
        .await
        .map_err(|_| "the sidecar did not print its address in 30 s".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("the sidecar exited before listening")?;
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("unexpected first line from the sidecar: {line:?}"))?;
        let pid = child.id().ok_or("the sidecar exited")?;
        Ok(Self {
            child,
            addr,
            pid,
            binary: shown,
        })
    }
}

struct DaprTarget {
    daprd: dapr::Daprd,
    redis_store: Vec<Client>,
    postgres_store: Vec<Client>,
    table_prefix: String,
}

struct Bench {
    opts: Opts,
    entity: String,
    table: String,
    inproc: Arc<Sidecar>,
    sidecar: ServerProcess,
    /// The sidecar on Redis over TLS, and its connections (the `tls` part).
    tls: Option<(ServerProcess, Vec<Client>)>,
    hop: ServerProcess,
    hop_http: Vec<Client>,
    /// daprd and its connections, per store (the `dapr` part).
    dapr: Option<DaprTarget>,
    redis_pid: Option<u32>,
    http: Vec<Client>,
    pg: sqlx::PgPool,
    redis: redis::aio::MultiplexedConnection,
    hot_keys: u64,
    write_keys: u64,
    cold_next: u64,
    cold_rows: u64,
    phases: Vec<Phase>,
}

async fn run(opts: Opts) -> Result<(), String> {
    let db_url = env("WTC_DATABASE_URL")?;
    let redis_url = env("WTC_REDIS_URL")?;
    let load_before = procfs::loadavg();
    let started = Instant::now();
    let pid = std::process::id();
    let table = format!("wtc_bench_{pid}");
    let entity = format!("bench{pid}");

    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&db_url)
        .await
        .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
    let redis = redis::Client::open(redis_url.as_str())
        .map_err(|e| e.to_string())?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot connect to Redis: {e}"))?;

    let conns = opts.conns;
    let hot_keys = 1_000u64;
    let write_keys = 10_000u64;
    // Cold keys: every miss reads a key of its own; budget each miss phase generously.
    let fixed_need: f64 = opts.miss_rates.iter().map(|r| r * opts.seconds + 1.0).sum();
    let peak_budget = peak_miss_budget(opts.peak_seconds);
    let cold_rows = (2.0 * fixed_need) as u64
        + 2 * peak_budget
        + 400 * opts.slices as u64
        + (2 * opts.herd_rounds as u64)
        + 100;
    log(&format!(
        "table {table}: {hot_keys} hot, {write_keys} write and {cold_rows} cold rows"
    ));
    create_table(&pg, &table, hot_keys, write_keys, cold_rows).await?;

    // Parsed from TOML like the sidecar's own file: every setting not named here keeps the
    // sidecar's default, also settings added later.
    let toml = format!(
        "listen = \"127.0.0.1:0\"\n\
         [database]\nurl = {}\npool_size = 8\nstatement_timeout_ms = 5000\n\
         [redis]\nurl = {}\nconnect_timeout_ms = 500\nresponse_timeout_ms = 250\n\
         [[entities]]\nname = \"{entity}\"\ntable = \"{table}\"\nkey_column = \"id\"\n\
         version_column = \"version\"\nttl_seconds = 300\n",
        toml_string(&db_url),
        toml_string(&redis_url),
    );
    let config = SidecarConfig::parse(&toml, &Overrides::default())
        .map_err(|e| format!("the sidecar configuration: {e}"))?;
    let inproc = Arc::new(wtc_sidecar::sidecar(config.clone()).map_err(|e| e.to_string())?);
    let sidecar =
        ServerProcess::start(opts.sidecar.as_deref(), opts.sidecar_threads, &config).await?;
    log(&format!(
        "sidecar {} (pid {}) on {}",
        sidecar.binary, sidecar.pid, sidecar.addr
    ));
    let rss_start = procfs::rss_kib(sidecar.pid);
    let tls = match (
        opts.runs("tls"),
        env("WTC_REDIS_TLS_URL"),
        env("WTC_REDIS_CA_FILE"),
    ) {
        (true, Ok(url), Ok(ca)) => {
            let mut c = config.clone();
            c.redis.url = url;
            c.redis.ca_file = Some(ca);
            let p = ServerProcess::start(opts.sidecar.as_deref(), opts.sidecar_threads, &c).await?;
            log(&format!(
                "sidecar on Redis over TLS: pid {} on {}",
                p.pid, p.addr
            ));
            let clients = http_clients(p.addr, conns, "the TLS sidecar").await?;
            Some((p, clients))
        }
        (true, Err(e), _) | (true, _, Err(e)) => {
            log(&format!("no tls part: {e}"));
            None
        }
        (false, _, _) => None,
    };
    let dapr = match (&opts.daprd, opts.runs("dapr")) {
        (Some(bin), true) => {
            let prefix = format!("wtc_bench_dapr_{pid}_");
            let daprd =
                dapr::Daprd::start(bin, &redis_url, &db_url, &prefix, opts.sidecar_threads).await?;
            log(&format!(
                "daprd {} (pid {}) on {}",
                daprd.binary, daprd.pid, daprd.addr
            ));
            // The rows wtc reads, as values of daprd's stores: the same keys and sizes.
            let keys: Vec<String> = (0..hot_keys).map(|i| format!("h{i}")).collect();
            let value = load::write_body(0);
            for store in [dapr::REDIS_STORE, dapr::POSTGRES_STORE] {
                daprd.seed(store, &keys, &value).await?;
            }
            let clients = |store: &'static str| {
                let addr = daprd.addr;
                async move {
                    let mut v = Vec::with_capacity(conns);
                    for _ in 0..conns {
                        let c = HttpConn::connect(addr)
                            .await
                            .map_err(|e| format!("cannot connect to daprd: {e}"))?;
                        v.push(Client::Dapr(Box::new(c), store));
                    }
                    Ok::<_, String>(v)
                }
            };
            let (redis_store, postgres_store) = (
                clients(dapr::REDIS_STORE).await?,
                clients(dapr::POSTGRES_STORE).await?,
            );
            Some(DaprTarget {
                daprd,
                redis_store,
                postgres_store,
                table_prefix: prefix,
            })
        }
        (None, true) if !opts.only.is_empty() => {
            return Err("the dapr part needs --daprd PATH or WTC_DAPRD (scripts/daprd)".into());
        }
        _ => None,
    };
    let hop = ServerProcess::start_hop(opts.sidecar_threads).await?;
    let http = http_clients(sidecar.addr, conns, "the sidecar").await?;
    let hop_http = http_clients(hop.addr, conns, "the HTTP hop").await?;
    let redis_pid = redis_pid(&mut redis.clone()).await;
    let mut b = Bench {
        opts: opts.clone(),
        entity,
        table,
        inproc,
        sidecar,
        tls,
        hop,
        hop_http,
        dapr,
        redis_pid,
        http,
        pg,
        redis,
        hot_keys,
        write_keys,
        cold_next: 0,
        cold_rows,
        phases: Vec::new(),
    };
    let result = b.measure_all(rss_start, load_before, started).await;
    b.cleanup().await;
    result
}

async fn http_clients(addr: SocketAddr, n: usize, what: &str) -> Result<Vec<Client>, String> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let c = HttpConn::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {what}: {e}"))?;
        v.push(Client::Http(Box::new(c)));
    }
    Ok(v)
}

/// redis-server's pid (`INFO server`), to read its CPU time; `None` when Redis runs elsewhere.
async fn redis_pid(redis: &mut redis::aio::MultiplexedConnection) -> Option<u32> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(redis)
        .await
        .ok()?;
    let pid: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))?
        .trim()
        .parse()
        .ok()?;
    // Only a Redis on this machine: the pid must name a redis-server here.
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .filter(|c| c.starts_with("redis"))
        .map(|_| pid)
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn peak_miss_budget(secs: f64) -> u64 {
    // Misses are database reads: well under 25,000/s on this kind of machine.
    (secs * 25_000.0) as u64 + 100
}

async fn create_table(
    pg: &sqlx::PgPool,
    table: &str,
    hot: u64,
    writes: u64,
    cold: u64,
) -> Result<(), String> {
    let q = |s: String| async move {
        sqlx::query(sqlx::AssertSqlSafe(s))
            .execute(pg)
            .await
            .map_err(|e| format!("setting up the table: {e}"))
    };
    q(format!("DROP TABLE IF EXISTS {table}")).await?;
    q(format!("DROP SEQUENCE IF EXISTS {table}_version_wtc_seq")).await?;
    q(format!(
        "CREATE TABLE {table} (id text PRIMARY KEY, owner text, balance numeric NOT NULL DEFAULT 0, \
         n integer, version bigint NOT NULL DEFAULT 0)"
    ))
    .await?;
    for (prefix, n) in [("h", hot), ("w", writes), ("c", cold)] {
        q(format!(
            "INSERT INTO {table} (id, owner, balance, n, version) \
             SELECT '{prefix}' || i, 'owner-' || i, (i % 1000) + 0.5, i, 1 \
             FROM generate_series(0, {}) AS i",
            n - 1
        ))
        .await?;
    }
    q(format!("ANALYZE {table}")).await?;
    Ok(())
}

/// Calls of SELECT statements on `table` (the sidecar's reads), from pg_stat_statements: the
/// query of `select_calls` in tests/src/lib.rs.
async fn select_calls(pool: &sqlx::PgPool, table: &str) -> Result<i64, String> {
    sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements \
         WHERE query LIKE 'SELECT%' AND query LIKE '%' || $1 || '%' AND query NOT LIKE '%pg_stat_statements%'",
    )
    .bind(format!("FROM \"{table}\" AS t"))
    .fetch_one(pool)
    .await
    .map_err(|e| format!("pg_stat_statements: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Generator,
    HttpHop,
    RedisGet,
    InProcess,
    Sidecar,
    /// A second sidecar, on the same Redis through its TLS port.
    SidecarTls,
    /// daprd's `state.redis` store: a cache without the database.
    DaprRedis,
    /// daprd's `state.postgresql` store: the database without a cache.
    DaprPostgres,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Generator => "generator alone",
            Target::HttpHop => "HTTP hop alone",
            Target::RedisGet => "Redis GET",
            Target::InProcess => "in-process",
            Target::Sidecar => "sidecar",
            Target::SidecarTls => "sidecar, TLS",
            Target::DaprRedis => "daprd, Redis store",
            Target::DaprPostgres => "daprd, PostgreSQL store",
        }
    }

    /// A process answering HTTP whose memory is sampled (the sidecars, daprd).
    fn is_sidecar(self) -> bool {
        matches!(
            self,
            Target::Sidecar | Target::SidecarTls | Target::DaprRedis | Target::DaprPostgres
        )
    }
}

/// CPU time (µs) of the processes taking part: this process (the load generator, and the
/// in-process side), redis-server, and the HTTP server (the sidecar or the hop) when there is one.
#[derive(Default, Clone, Copy)]
struct CpuSpent {
    bench: Option<f64>,
    redis: Option<f64>,
    server: Option<f64>,
}

impl CpuSpent {
    fn now(redis_pid: Option<u32>, server_pid: Option<u32>) -> Self {
        Self {
            bench: procfs::cpu_us(std::process::id()),
            redis: redis_pid.and_then(procfs::cpu_us),
            server: server_pid.and_then(procfs::cpu_us),
        }
    }

    fn since(self, before: Self) -> Self {
        let d = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        Self {
            bench: d(self.bench, before.bench),
            redis: d(self.redis, before.redis),
            server: d(self.server, before.server),
        }
    }

    /// Sums slices; a figure unknown in any slice is unknown.
    fn add(self, other: Self) -> Self {
        let s = |a: Option<f64>, b: Option<f64>| Some(a? + b?);
        Self {
            bench: s(self.bench, other.bench),
            redis: s(self.redis, other.redis),
            server: s(self.server, other.server),
        }
    }

    fn per_request(self, requests: u64) -> report::CpuPerRequest {
        let per = |v: Option<f64>| v.filter(|_| requests > 0).map(|v| v / requests as f64);
        report::CpuPerRequest {
            bench_us: per(self.bench),
            redis_us: per(self.redis),
            server_us: per(self.server),
        }
    }
}

/// What one slice of a phase measured.
struct Slice {
    run: Run,
    cpu: CpuSpent,
    rss_max: u64,
}

/// The slices of one target in a phase, summed.
struct Slices {
    parts: Vec<(Vec<u64>, u64, u64)>,
    elapsed: Duration,
    cpu: Option<CpuSpent>,
    rss_max: u64,
}

impl Default for Slices {
    fn default() -> Self {
        Self {
            parts: Vec::new(),
            elapsed: Duration::ZERO,
            cpu: None,
            rss_max: 0,
        }
    }
}

impl Slices {
    fn add(&mut self, s: Slice) {
        self.elapsed += s.run.elapsed;
        self.cpu = Some(match self.cpu {
            Some(c) => c.add(s.cpu),
            None => s.cpu,
        });
        self.rss_max = self.rss_max.max(s.rss_max);
        self.parts.push((s.run.lat_ns, s.run.ok, s.run.bad));
    }
}

impl Bench {
    fn plan(&self, kind: Kind, cold_count: u64) -> Plan {
        Plan {
            kind,
            entity: self.entity.clone(),
            idx: EntityId::new(0),
            hot_keys: self.hot_keys,
            write_keys: self.write_keys,
            cold_base: self.cold_next,
            cold_count,
        }
    }

    fn clients(&mut self, target: Target) -> Vec<Client> {
        let n = self.opts.conns;
        match target {
            Target::Generator => (0..n).map(|_| Client::Noop).collect(),
            Target::RedisGet => (0..n)
                .map(|_| Client::RedisGet(Arc::clone(&self.inproc)))
                .collect(),
            Target::InProcess => (0..n)
                .map(|_| Client::InProcess(Arc::clone(&self.inproc)))
                .collect(),
            Target::HttpHop => std::mem::take(&mut self.hop_http),
            Target::Sidecar => std::mem::take(&mut self.http),
            Target::SidecarTls => self
                .tls
                .as_mut()
                .map(|(_, c)| std::mem::take(c))
                .unwrap_or_default(),
            Target::DaprRedis => self
                .dapr
                .as_mut()
                .map(|d| std::mem::take(&mut d.redis_store))
                .unwrap_or_default(),
            Target::DaprPostgres => self
                .dapr
                .as_mut()
                .map(|d| std::mem::take(&mut d.postgres_store))
                .unwrap_or_default(),
        }
    }

    /// The HTTP connections `clients` took, back in their place (the others are made per phase).
    fn give_back(&mut self, target: Target, clients: Vec<Client>) {
        match target {
            Target::Sidecar => self.http = clients,
            Target::HttpHop => self.hop_http = clients,
            Target::SidecarTls => {
                if let Some((_, c)) = self.tls.as_mut() {
                    *c = clients;
                }
            }
            Target::DaprRedis => {
                if let Some(d) = self.dapr.as_mut() {
                    d.redis_store = clients;
                }
            }
            Target::DaprPostgres => {
                if let Some(d) = self.dapr.as_mut() {
                    d.postgres_store = clients;
                }
            }
            _ => {}
        }
    }

    async fn evict_cold(&mut self, from: u64, count: u64) -> Result<(), String> {
        let end = (from + count).min(self.cold_rows);
        let mut i = from;
        while i < end {
            let mut pipe = redis::pipe();
            for k in i..(i + 1000).min(end) {
                let ck = wtc_sidecar::core::CacheKey::new(&self.entity, &format!("c{k}"));
                pipe.cmd("DEL").arg(&ck.entry).arg(&ck.lease).ignore();
            }
            pipe.query_async::<()>(&mut self.redis)
                .await
                .map_err(|e| format!("evicting: {e}"))?;
            i += 1000;
        }
        Ok(())
    }

    /// The phases of one workload at one rate (`None`: closed loop), one per target, run as
    /// interleaved slices (target order rotating each slice) so that whatever else the shared
    /// machine does at the time weighs on every target alike.
    async fn phases(
        &mut self,
        kind: Kind,
        targets: &[Target],
        rate: Option<f64>,
    ) -> Result<(), String> {
        let total = match rate {
            Some(_) => self.opts.seconds,
            None => self.opts.peak_seconds,
        };
        let n = self.opts.slices.max(1);
        let secs = total / n as f64;
        let mut acc: Vec<Slices> = targets.iter().map(|_| Slices::default()).collect();
        for s in 0..n {
            for j in 0..targets.len() {
                let ti = (j + s) % targets.len();
                let piece = self.slice(kind, targets[ti], rate, secs).await?;
                acc[ti].add(piece);
            }
        }
        for (t, a) in targets.iter().zip(acc) {
            let run = Run::merge(a.parts, a.elapsed);
            let requests = run.ok + run.bad;
            let cpu = a.cpu.unwrap_or_default().per_request(requests);
            let rss = t.is_sidecar().then_some(a.rss_max);
            let p = Phase::new(kind, *t, rate, self.opts.conns, &run, cpu, rss);
            log(&p.one_line());
            self.phases.push(p);
        }
        Ok(())
    }

    /// One slice of a phase, `secs` long.
    async fn slice(
        &mut self,
        kind: Kind,
        target: Target,
        rate: Option<f64>,
        secs: f64,
    ) -> Result<Slice, String> {
        let cold_count = match (kind, rate) {
            (Kind::Miss, Some(r)) => (r * secs) as u64 + 1,
            (Kind::Miss, None) => peak_miss_budget(secs),
            _ => 0,
        };
        let cold_count = cold_count.min(self.cold_rows.saturating_sub(self.cold_next));
        if kind == Kind::Miss {
            if cold_count == 0 {
                return Err("out of cold keys".into());
            }
            self.evict_cold(self.cold_next, cold_count).await?;
        }
        let plan = Arc::new(self.plan(kind, cold_count));
        let clients = self.clients(target);
        let tls_pid = self.tls.as_ref().map(|(p, _)| p.pid);
        let dapr_pid = self.dapr.as_ref().map(|d| d.daprd.pid);
        let server_pid = match target {
            Target::Sidecar => Some(self.sidecar.pid),
            Target::SidecarTls => tls_pid,
            Target::HttpHop => Some(self.hop.pid),
            Target::DaprRedis | Target::DaprPostgres => dapr_pid,
            _ => None,
        };
        let is_sidecar = target.is_sidecar();
        let pid = server_pid.unwrap_or(self.sidecar.pid);
        let cpu0 = CpuSpent::now(self.redis_pid, server_pid);
        let stop = Arc::new(AtomicBool::new(false));
        let rss_max = Arc::new(AtomicU64::new(0));
        let sampler = is_sidecar.then(|| {
            let (stop, rss_max) = (Arc::clone(&stop), Arc::clone(&rss_max));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(r) = procfs::rss_kib(pid) {
                        rss_max.fetch_max(r, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        });
        let dur = Duration::from_secs_f64(secs);
        let (clients, run): (Vec<Client>, Run) = match rate {
            Some(r) => load::fixed_rate(clients, plan, r, dur).await,
            None => load::closed_loop(clients, plan, dur).await,
        };
        let cpu = CpuSpent::now(self.redis_pid, server_pid).since(cpu0);
        stop.store(true, Ordering::Relaxed);
        if let Some(s) = sampler {
            let _ = s.await;
        }
        self.give_back(target, clients);
        if kind == Kind::Miss {
            self.cold_next += run.ok + run.bad;
        }
        Ok(Slice {
            run,
            cpu,
            rss_max: rss_max.load(Ordering::Relaxed),
        })
    }

    async fn measure_all(
        &mut self,
        rss_start: Option<u64>,
        load_before: String,
        started: Instant,
    ) -> Result<(), String> {
        // Warm-up: fill every hot key, open every pool connection, load the table on both sides.
        for i in 0..self.hot_keys {
            let key = format!("h{i}");
            self.inproc
                .read(EntityId::new(0), &key)
                .await
                .map_err(|e| format!("warm-up read: {e}"))?;
        }
        let warm = Duration::from_secs_f64(if self.opts.short { 0.2 } else { 1.0 });
        let mut warm_ups = vec![
            (Target::InProcess, Kind::Hit),
            (Target::InProcess, Kind::Write),
            (Target::Sidecar, Kind::Hit),
            (Target::Sidecar, Kind::Write),
            (Target::HttpHop, Kind::Hit),
        ];
        if self.tls.is_some() {
            warm_ups.extend([
                (Target::SidecarTls, Kind::Hit),
                (Target::SidecarTls, Kind::Write),
            ]);
        }
        if self.dapr.is_some() {
            warm_ups.extend([
                (Target::DaprRedis, Kind::Hit),
                (Target::DaprRedis, Kind::Write),
                (Target::DaprPostgres, Kind::Hit),
                (Target::DaprPostgres, Kind::Write),
            ]);
        }
        for (target, kind) in warm_ups {
            let plan = Arc::new(self.plan(kind, 0));
            let clients = self.clients(target);
            let (clients, run) = load::closed_loop(clients, plan, warm).await;
            self.give_back(target, clients);
            if run.ok == 0 {
                return Err(format!(
                    "warm-up: no {} answered as expected by the {} ({} failed)",
                    kind.name(),
                    target.name(),
                    run.bad
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_idle = procfs::rss_kib(self.sidecar.pid);
        let dapr_rss_idle = self
            .dapr
            .as_ref()
            .and_then(|d| procfs::rss_kib(d.daprd.pid));

        let opts = self.opts.clone();
        let hit_rates = if opts.runs("hit") {
            opts.hit_rates.clone()
        } else {
            vec![]
        };
        for &rate in &hit_rates {
            let targets = [
                Target::Generator,
                Target::HttpHop,
                Target::RedisGet,
                Target::InProcess,
                Target::Sidecar,
            ];
            self.phases(Kind::Hit, &targets, Some(rate)).await?;
        }
        for (kind, rates) in [
            (Kind::Miss, &opts.miss_rates),
            (Kind::Write, &opts.write_rates),
        ] {
            if !opts.runs(kind.name()) {
                continue;
            }
            for &rate in rates {
                self.phases(kind, &[Target::InProcess, Target::Sidecar], Some(rate))
                    .await?;
            }
        }
        // Closed-loop peaks: of every kind, or of the kinds named in --only.
        let named = |k: Kind| opts.only.iter().any(|o| o == k.name());
        let any_named = [Kind::Hit, Kind::Miss, Kind::Write].into_iter().any(named);
        let peaks: Vec<Kind> = [Kind::Hit, Kind::Miss, Kind::Write]
            .into_iter()
            .filter(|k| opts.runs("peak") && (!any_named || named(*k)))
            .collect();
        for kind in peaks {
            // For hits also the HTTP hop alone: the most any HTTP server answers here.
            let targets: &[Target] = match kind {
                Kind::Hit => &[Target::InProcess, Target::HttpHop, Target::Sidecar],
                _ => &[Target::InProcess, Target::Sidecar],
            };
            self.phases(kind, targets, None).await?;
        }
        // TLS to Redis against plain TCP: the same sidecar build, the same Redis, slices
        // alternating; kept apart from the phases above (their tables compare other targets).
        let before_tls = self.phases.len();
        if self.tls.is_some() {
            let both = [Target::Sidecar, Target::SidecarTls];
            for &rate in opts.hit_rates.iter().take(1) {
                self.phases(Kind::Hit, &both, Some(rate)).await?;
            }
            for &rate in opts.write_rates.iter().take(1) {
                self.phases(Kind::Write, &both, Some(rate)).await?;
            }
            self.phases(Kind::Hit, &both, None).await?;
        }
        let tls_phases = self.phases.split_off(before_tls);
        // Side by side with Dapr: the same keys, payloads, Redis and PostgreSQL, slices
        // alternating between the four targets; kept apart like the TLS part.
        if self.dapr.is_some() {
            let all = [
                Target::InProcess,
                Target::Sidecar,
                Target::DaprRedis,
                Target::DaprPostgres,
            ];
            for &rate in &opts.hit_rates {
                self.phases(Kind::Hit, &all, Some(rate)).await?;
            }
            for &rate in &opts.write_rates {
                self.phases(Kind::Write, &all, Some(rate)).await?;
            }
            self.phases(Kind::Hit, &all, None).await?;
            self.phases(Kind::Write, &all, None).await?;
        }
        let dapr_phases = self.phases.split_off(before_tls);
        let mut herds = Vec::new();
        if opts.runs("herd") {
            // The sidecar's consistency sampler checks a share of the writes above against the
            // database after `grace_ms`: let it finish, or its queries would count as herd reads.
            let sampler = &self.inproc.config().sampler;
            if sampler.sample_rate > 0.0 {
                let wait = 2 * (sampler.grace_ms + sampler.interval_ms);
                log(&format!("waiting {wait} ms for the consistency sampler"));
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            for t in [Target::InProcess, Target::Sidecar] {
                herds.push(self.herd(t).await?);
            }
        }
        let mut batches = Vec::new();
        if opts.runs("batch") {
            for endpoint in [false, true] {
                for t in [Target::InProcess, Target::Sidecar] {
                    batches.push(self.batches(t, endpoint).await?);
                }
            }
        }
        let rss_after = procfs::rss_kib(self.sidecar.pid);
        let machine = self.machine(load_before).await;
        let report = Report {
            short: self.opts.short,
            command: self.opts.command.clone(),
            machine,
            conns: self.opts.conns,
            seconds: self.opts.seconds,
            peak_seconds: self.opts.peak_seconds,
            slices: self.opts.slices,
            sidecar_binary: self.sidecar.binary.clone(),
            sidecar_threads: self.opts.sidecar_threads,
            rss_start_kib: rss_start,
            rss_idle_kib: rss_idle,
            rss_after_kib: rss_after,
            phases: std::mem::take(&mut self.phases),
            tls: tls_phases,
            dapr: dapr_phases,
            dapr_rss_idle_kib: dapr_rss_idle,
            herds,
            batches,
            wall_seconds: started.elapsed().as_secs_f64(),
        };
        let json = report.to_json();
        if let Some(path) = &self.opts.json {
            std::fs::write(path, serde_json::to_string_pretty(&json).expect("json"))
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        let md = report.markdown();
        if let Some(path) = &self.opts.doc {
            report::write_doc(path, &md)?;
            log(&format!("wrote {}", path.display()));
        } else {
            println!("{md}");
        }
        if let Some(path) = &self.opts.dapr_plot {
            plot::dapr_png(&report, path)?;
            log(&format!("wrote {}", path.display()));
        }
        if let Some(path) = &self.opts.plot {
            plot::latency_png(&report, path)?;
            log(&format!("wrote {}", path.display()));
        }
        Ok(())
    }

    /// `opts.herd` concurrent readers of one cold key, `opts.herd_rounds` times (a new key each
    /// round); database reads counted by PostgreSQL.
    async fn herd(&mut self, target: Target) -> Result<Herd, String> {
        let n = self.opts.herd;
        let mut conns: Vec<Option<HttpConn>> = Vec::with_capacity(n);
        if target == Target::Sidecar {
            for _ in 0..n {
                let c = HttpConn::connect(self.sidecar.addr)
                    .await
                    .map_err(|e| format!("herd connection: {e}"))?;
                conns.push(Some(c));
            }
        } else {
            conns.resize_with(n, || None);
        }
        let mut reads = Vec::new();
        let (mut answered, mut from_db, mut shed, mut failed) = (0u64, 0u64, 0u64, 0u64);
        let mut spans = Vec::new();
        for _ in 0..self.opts.herd_rounds {
            if self.cold_next >= self.cold_rows {
                return Err("out of cold keys".into());
            }
            let key = format!("c{}", self.cold_next);
            self.evict_cold(self.cold_next, 1).await?;
            self.cold_next += 1;
            let before = select_calls(&self.pg, &self.table).await?;
            let gate = Arc::new(tokio::sync::Semaphore::new(0));
            let mut tasks = Vec::with_capacity(n);
            for slot in conns.iter_mut() {
                let gate = Arc::clone(&gate);
                let conn = slot.take();
                let sc = Arc::clone(&self.inproc);
                let path = format!("/v1/entities/{}/{key}", self.entity);
                let key = key.clone();
                tasks.push(tokio::spawn(async move {
                    gate.acquire().await.expect("gate").forget();
                    match conn {
                        Some(mut c) => {
                            let r = c.request("GET", &path, None).await;
                            let outcome = match r {
                                Ok(r) if r.status == 200 => r.cache,
                                Ok(r) if r.status == 503 => Some("shed".to_string()),
                                _ => None,
                            };
                            (Some(c), outcome)
                        }
                        None => {
                            let outcome = match sc.read(EntityId::new(0), &key).await {
                                Ok(o) if o.envelope.is_some() => {
                                    Some(o.status.as_str().to_string())
                                }
                                _ => None,
                            };
                            (None, outcome)
                        }
                    }
                }));
            }
            // Let every task reach the gate, then open it at once.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let t0 = Instant::now();
            gate.add_permits(n);
            for (slot, t) in conns.iter_mut().zip(tasks) {
                let (c, outcome) = t.await.expect("herd task");
                *slot = c;
                match outcome.as_deref() {
                    Some("shed") => shed += 1,
                    Some(s) if s == CacheStatus::Miss.as_str() => from_db += 1,
                    Some(_) => answered += 1,
                    None => failed += 1,
                }
            }
            spans.push(t0.elapsed().as_secs_f64() * 1e3);
            let after = select_calls(&self.pg, &self.table).await?;
            reads.push(after - before);
        }
        let h = Herd {
            target,
            readers: n,
            db_reads: reads,
            answered_from_cache: answered,
            answered_from_db: from_db,
            shed,
            failed,
            span_ms: spans,
        };
        log(&h.one_line());
        Ok(h)
    }

    /// `opts.batches` batches of 100 writes to distinct keys: with `endpoint`, one
    /// `POST /v1/batch` (in-process: one `Sidecar::write_batch`); without, 100 single writes
    /// sent one after another on one connection (in-process: 100 `Sidecar::put`).
    async fn batches(&mut self, target: Target, endpoint: bool) -> Result<Batches, String> {
        let mut client = match target {
            Target::Sidecar => {
                let mut all = std::mem::take(&mut self.http);
                let c = all.pop().expect("a connection");
                self.http = all;
                c
            }
            _ => Client::InProcess(Arc::clone(&self.inproc)),
        };
        let plan = self.plan(Kind::Write, 0);
        let mut times = Vec::new();
        let mut bad = 0u64;
        let started = Instant::now();
        for b in 0..self.opts.batches as u64 {
            let first = fastrand::u64(..self.write_keys);
            let keys: Vec<String> = (0..100)
                .map(|j| format!("w{}", (first + j) % self.write_keys))
                .collect();
            let t0 = Instant::now();
            if endpoint {
                if !self.one_batch(&mut client, &keys, b).await {
                    bad += 100;
                }
            } else {
                for j in 0..100 {
                    if !load::exec(&mut client, &plan, b * 100 + j).await {
                        bad += 1;
                    }
                }
            }
            times.push(t0.elapsed().as_nanos() as u64);
        }
        let elapsed = started.elapsed();
        if target == Target::Sidecar {
            self.http.push(client);
        }
        let n = times.len() as u64;
        times.sort_unstable();
        let run = Run {
            lat_ns: times,
            ok: n,
            bad: 0,
            elapsed,
        };
        let b = Batches::new(target, endpoint, &run, bad);
        log(&b.one_line());
        Ok(b)
    }

    /// One batch of a PUT per key; true when all of it was committed and cached.
    async fn one_batch(&self, client: &mut Client, keys: &[String], b: u64) -> bool {
        match client {
            Client::Http(conn) => {
                let mut body = String::from("{\"writes\":[");
                for (j, k) in keys.iter().enumerate() {
                    if j > 0 {
                        body.push(',');
                    }
                    body.push_str(&format!(
                        "{{\"entity\":\"{}\",\"key\":\"{k}\",\"op\":\"put\",\"data\":{}}}",
                        self.entity,
                        load::write_body(b * 100 + j as u64)
                    ));
                }
                body.push_str("]}");
                matches!(
                    conn.request("POST", "/v1/batch", Some(body.as_bytes())).await,
                    Ok(r) if r.status == 200 && r.body_len > 0
                )
            }
            Client::InProcess(sc) => {
                // What the HTTP handler hands to the library: each item's body parsed from text.
                let mut writes = Vec::with_capacity(keys.len());
                for (j, k) in keys.iter().enumerate() {
                    let raw = load::write_body(b * 100 + j as u64);
                    let Ok(body) = serde_json::from_str(&raw) else {
                        return false;
                    };
                    writes.push(Write {
                        entity: EntityId::new(0),
                        key: k.clone(),
                        op: WriteOp::Put { body, raw },
                        condition: Condition::Always,
                    });
                }
                let batch = Batch {
                    writes,
                    invalidate: Vec::new(),
                };
                matches!(
                    sc.write_batch(&batch).await,
                    Ok(o) if o.status == CacheStatus::Ok && o.results.len() == keys.len()
                )
            }
            _ => false,
        }
    }

    async fn machine(&mut self, load_before: String) -> Machine {
        let show = |name: &'static str| {
            let pg = self.pg.clone();
            async move {
                sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("SHOW {name}")))
                    .fetch_one(&pg)
                    .await
                    .unwrap_or_else(|_| "unknown".into())
            }
        };
        let synchronous_commit = show("synchronous_commit").await;
        let pg_version = show("server_version").await;
        let pg_tls = sqlx::query_scalar::<_, String>(
            "SELECT CASE WHEN ssl THEN 'over ' || version ELSE 'without TLS' END \
             FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .fetch_one(&self.pg)
        .await
        .unwrap_or_else(|_| "(TLS unknown)".into());
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.redis)
            .await
            .unwrap_or_default();
        let redis_version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let commit = std::process::Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            commit,
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model: procfs::cpu_model(),
            load_before,
            load_after: procfs::loadavg(),
            synchronous_commit,
            pg_tls,
            pg_version,
            redis_version,
            pool_size: self.inproc.config().database.pool_size,
            date,
        }
    }

    async fn cleanup(&mut self) {
        let _ = self.sidecar.child.start_kill();
        let _ = self.sidecar.child.wait().await;
        // daprd's tables (named after this run's prefix).
        if let Some(d) = self.dapr.take() {
            let prefix = d.table_prefix.clone();
            drop(d);
            let tables: Vec<(String,)> = sqlx::query_as(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND starts_with(tablename, $1)",
            )
            .bind(&prefix)
            .fetch_all(&self.pg)
            .await
            .unwrap_or_default();
            for (t,) in tables {
                let sql = format!("DROP TABLE IF EXISTS \"{t}\"");
                let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&self.pg)
                    .await;
            }
        }
        // The table, its sequence and every Redis key of this run's entity.
        for sql in [
            format!("DROP TABLE IF EXISTS {}", self.table),
            format!("DROP SEQUENCE IF EXISTS {}_version_wtc_seq", self.table),
        ] {
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&self.pg)
                .await;
        }
        self.unlink_matching(&format!("wtc:{{{}:*", self.entity))
            .await;
        // daprd's Redis store: its keys are `<app id>||<key>`, the app id this run's own.
        self.unlink_matching(&format!("{}||*", dapr::app_id()))
            .await;
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("wtc-bench-{}", std::process::id())),
        );
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("wtc-bench-dapr-{}", std::process::id())),
        );
    }

    /// Deletes the Redis keys matching `pattern`.
    async fn unlink_matching(&mut self, pattern: &str) {
        let mut cursor: u64 = 0;
        loop {
            let r: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(5000)
                .query_async(&mut self.redis)
                .await;
            let Ok((next, keys)) = r else { break };
            if !keys.is_empty() {
                let _ = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(&mut self.redis)
                    .await;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}
