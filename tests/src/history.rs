//! Histories of client operations, a workload that records them, and the checker of the promise
//! (P1-P3 in docs/protocol.md) over a history.
//!
//! Every operation is logged with its start and end (as the client saw them), its outcome and the
//! version it acknowledged or returned. Against the versions the database really committed (an
//! audit trigger, `Audit`), the checker reports:
//! - lost writes: acknowledged versions the database does not have (P1);
//! - phantom reads: versions returned that were never committed;
//! - stale reads: a read that began after a write of version v was acknowledged with a clean cache
//!   step (`X-Wtc-Cache: ok`) and returned an older version (P2);
//! - staleness after a cache-side fault: reads older than a write acknowledged as `repairing`,
//!   allowed by P3 for a bounded time W; the longest one is reported;
//! - with external writers (plain SQL, no sidecar; docs/commit-stream.md): reads older than a
//!   version PostgreSQL had committed before the read began, and how long after that commit
//!   (the commit stream's bound W: `Report::assert_external_within`).

use crate::{Target, unique};
use serde_json::json;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Write,
    Read,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged (writes) or answered (reads) with this version; `clean`: `X-Wtc-Cache: ok`.
    Ok { version: i64, clean: bool },
    /// A write whose outcome the client cannot know (connection cut, timeout, database error
    /// after sending): it may or may not have committed.
    Unknown,
    /// Refused before anything happened (shed, bad request), or a read that got no answer.
    Failed,
    /// A write made with plain SQL, not through a sidecar: PostgreSQL committed this version
    /// (the trigger drew it) when the statement returned.
    Committed { version: i64 },
}

#[derive(Debug, Clone, Copy)]
pub struct Op {
    /// Index into the workload's keys.
    pub key: u32,
    pub kind: Kind,
    pub start: Instant,
    pub end: Instant,
    pub outcome: Outcome,
}

#[derive(Clone, Default)]
pub struct History(Arc<Mutex<Vec<Op>>>);

impl History {
    pub fn record(&self, op: Op) {
        self.0.lock().unwrap().push(op);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.0.lock().unwrap().clone()
    }
}

/// Every (key, version) the database committed for a table, written by a trigger in the same
/// transaction as the row.
pub struct Audit {
    table: String,
}

impl Audit {
    pub async fn install(pool: &PgPool, table: &str) -> Self {
        let audit = format!("{table}_audit");
        for sql in [
            format!("CREATE TABLE {audit} (id text, version bigint)"),
            format!(
                "CREATE FUNCTION {audit}_f() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN INSERT INTO {audit} VALUES (NEW.id, NEW.version); RETURN NEW; END $$"
            ),
            format!(
                "CREATE TRIGGER {audit}_t AFTER INSERT OR UPDATE ON {table} \
                 FOR EACH ROW EXECUTE FUNCTION {audit}_f()"
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(pool)
                .await
                .unwrap();
        }
        Self { table: audit }
    }

    pub async fn committed(&self, pool: &PgPool) -> HashSet<(String, i64)> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, version FROM {}",
            self.table
        )))
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
    }
}

#[derive(Debug, Clone)]
pub struct StaleRead {
    pub key: String,
    pub read: i64,
    pub acknowledged: i64,
    /// From the acknowledgement of the newer version to the start of the read.
    pub after: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub writes_clean: u64,
    pub writes_repairing: u64,
    pub writes_unknown: u64,
    pub writes_failed: u64,
    pub reads: u64,
    pub reads_failed: u64,
    pub lost: Vec<(String, i64)>,
    pub phantom: Vec<(String, i64)>,
    /// P2 breaches: older than a write acknowledged with a clean cache step.
    pub stale: Vec<StaleRead>,
    /// Reads older than a write acknowledged as `repairing` (allowed within W).
    pub stale_after_fault: u64,
    pub max_staleness_after_fault: Duration,
    pub writes_external: u64,
    /// Of the reads older than a version committed by an external writer before they began,
    /// how long after that commit each began (sorted).
    pub behind_external: Vec<Duration>,
}

impl Report {
    pub fn writes_acked(&self) -> u64 {
        self.writes_clean + self.writes_repairing
    }

    pub fn summary(&self) -> String {
        format!(
            "writes acknowledged {} ({} repairing), unknown {}, refused {}; reads {} (failed {}); \
             lost {}, phantom {}, stale {}; reads behind a repairing write {} (longest {:?})",
            self.writes_acked(),
            self.writes_repairing,
            self.writes_unknown,
            self.writes_failed,
            self.reads,
            self.reads_failed,
            self.lost.len(),
            self.phantom.len(),
            self.stale.len(),
            self.stale_after_fault,
            self.max_staleness_after_fault,
        ) + &match self.writes_external {
            0 => String::new(),
            n => format!(
                "; external writes {n}, reads behind one {} (longest {:?})",
                self.behind_external.len(),
                self.max_behind_external()
            ),
        }
    }

    /// The longest a read that returned an older version began after an external commit.
    pub fn max_behind_external(&self) -> Duration {
        self.behind_external.last().copied().unwrap_or_default()
    }

    /// No read that began later than `w` after an external commit returned an older version
    /// (and nothing lost or phantom).
    pub fn assert_external_within(&self, w: Duration) {
        assert!(
            self.lost.is_empty() && self.phantom.is_empty(),
            "lost {:?}, phantom {:?} ({})",
            self.lost.iter().take(5).collect::<Vec<_>>(),
            self.phantom.iter().take(5).collect::<Vec<_>>(),
            self.summary()
        );
        let beyond = self.behind_external.iter().filter(|d| **d > w).count();
        assert!(
            beyond == 0,
            "{beyond} reads began more than W = {w:?} after an external commit and returned an \
             older version (longest {:?}; {})",
            self.max_behind_external(),
            self.summary()
        );
    }

    /// P1, P2, no phantoms, and P3's staleness within `w`.
    pub fn assert_promise(&self, w: Duration) {
        let first = |v: &[(String, i64)]| v.iter().take(5).cloned().collect::<Vec<_>>();
        assert!(
            self.lost.is_empty(),
            "acknowledged versions missing from the database: {:?} ({})",
            first(&self.lost),
            self.summary()
        );
        assert!(
            self.phantom.is_empty(),
            "versions read but never committed: {:?} ({})",
            first(&self.phantom),
            self.summary()
        );
        assert!(
            self.stale.is_empty(),
            "stale reads: {:?} ({})",
            self.stale.iter().take(5).collect::<Vec<_>>(),
            self.summary()
        );
        assert!(
            self.max_staleness_after_fault <= w,
            "staleness after a cache fault lasted {:?}, over W = {w:?} ({})",
            self.max_staleness_after_fault,
            self.summary()
        );
    }
}

/// Checks a history against the committed versions. Linear in the history (after sorting each
/// key's acknowledged writes by end time), so it handles millions of operations.
pub fn check(keys: &[String], ops: &[Op], committed: &HashSet<(String, i64)>) -> Report {
    let mut r = Report::default();
    let mut by_key: Vec<Vec<&Op>> = vec![vec![]; keys.len()];
    for op in ops {
        by_key[op.key as usize].push(op);
    }
    for (k, ops) in by_key.iter().enumerate() {
        let key = &keys[k];
        let was_committed = |v: i64| committed.contains(&(key.clone(), v));
        // Acknowledged writes by end time, with running maxima of their versions: of all of them
        // (any newer version acknowledged), and of the clean ones (P2's floor).
        let mut acked: Vec<(Instant, i64, bool)> = vec![];
        // External commits by end time, and the running maximum of their versions.
        let mut external: Vec<(Instant, i64)> = vec![];
        for op in ops.iter().filter(|o| o.kind == Kind::Write) {
            match op.outcome {
                Outcome::Committed { version } => {
                    r.writes_external += 1;
                    if !was_committed(version) {
                        r.lost.push((key.clone(), version));
                    }
                    external.push((op.end, version));
                }
                Outcome::Ok { version, clean } => {
                    if clean {
                        r.writes_clean += 1;
                    } else {
                        r.writes_repairing += 1;
                    }
                    if !was_committed(version) {
                        r.lost.push((key.clone(), version));
                    }
                    acked.push((op.end, version, clean));
                }
                Outcome::Unknown => r.writes_unknown += 1,
                Outcome::Failed => r.writes_failed += 1,
            }
        }
        acked.sort_by_key(|a| a.0);
        let (mut any_max, mut clean_max) = (Vec::new(), Vec::new());
        let (mut a, mut c) = (i64::MIN, i64::MIN);
        for &(_, v, clean) in &acked {
            a = a.max(v);
            if clean {
                c = c.max(v);
            }
            any_max.push(a);
            clean_max.push(c);
        }
        external.sort_by_key(|e| e.0);
        let mut external_max = Vec::with_capacity(external.len());
        let mut m = i64::MIN;
        for &(_, v) in &external {
            m = m.max(v);
            external_max.push(m);
        }
        for op in ops.iter().filter(|o| o.kind == Kind::Read) {
            let Outcome::Ok { version: v, .. } = op.outcome else {
                r.reads_failed += 1;
                continue;
            };
            r.reads += 1;
            if !was_committed(v) {
                r.phantom.push((key.clone(), v));
            }
            let committed_before = external.partition_point(|e| e.0 < op.start);
            if committed_before > 0 && external_max[committed_before - 1] > v {
                let first = external_max.partition_point(|m| *m <= v);
                r.behind_external
                    .push(op.start.duration_since(external[first].0));
            }
            // Writes acknowledged before this read began.
            let before = acked.partition_point(|w| w.0 < op.start);
            if before == 0 || any_max[before - 1] <= v {
                continue;
            }
            // The first acknowledgement of a version newer than the one read.
            let first = any_max.partition_point(|m| *m <= v);
            let after = op.start.duration_since(acked[first].0);
            if clean_max[before - 1] > v {
                let first_clean = clean_max.partition_point(|m| *m <= v);
                r.stale.push(StaleRead {
                    key: key.clone(),
                    read: v,
                    acknowledged: clean_max[before - 1],
                    after: op.start.duration_since(acked[first_clean].0),
                });
            } else {
                r.stale_after_fault += 1;
                r.max_staleness_after_fault = r.max_staleness_after_fault.max(after);
            }
        }
    }
    r.behind_external.sort();
    r
}

/// When a workload stops: once it has done both counts, or at `max` whatever it did.
#[derive(Debug, Clone, Copy)]
pub struct Stop {
    pub reads: u64,
    pub writes: u64,
    pub max: Duration,
}

/// Writers and readers on a few hot keys through several sidecars, keys evicted at random.
pub struct Workload {
    /// The keys, in their canonical spelling (what the audit trigger records).
    pub keys: Vec<String>,
    /// Per key, the spellings requests use (each op picks one at random): every spelling names
    /// the same row, so the promise must hold across them.
    pub spellings: Vec<Vec<String>>,
    pub writers: usize,
    pub readers: usize,
    /// Pause between two evictions (random within the range); `None`: no evictions.
    pub evict_every: Option<(Duration, Duration)>,
    pub stop: Stop,
    /// When set, the counts of `stop` are not enough: this must have turned true too (a fault
    /// scenario's full cycle of faults). `stop.max` still ends the run.
    pub until_also: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// A writer that bypasses the sidecars (plain SQL on the table, text keys).
    pub external: Option<ExternalWriter>,
}

/// Upserts with plain SQL, as a migration or an admin would, one every `pause` (random within
/// the range); the version comes back from the trigger (`versions = "trigger"`).
#[derive(Clone)]
pub struct ExternalWriter {
    pub pool: PgPool,
    pub table: String,
    pub pause: (Duration, Duration),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RunStats {
    pub evictions: u64,
    pub elapsed: Duration,
}

impl Workload {
    pub fn new(keys: usize, stop: Stop) -> Self {
        let keys: Vec<String> = (0..keys).map(|i| format!("h{i}")).collect();
        Self {
            spellings: keys.iter().map(|k| vec![k.clone()]).collect(),
            keys,
            writers: 4,
            readers: 6,
            evict_every: Some((Duration::from_micros(500), Duration::from_millis(3))),
            stop,
            until_also: None,
            external: None,
        }
    }

    /// The same workload on integer keys (`1`, `2`, ...; an `audited_int_table`), each request
    /// spelling its key one of several ways PostgreSQL reads as the same integer.
    pub fn with_integer_spellings(mut self) -> Self {
        self.keys = (1..=self.keys.len()).map(|i| i.to_string()).collect();
        self.spellings = self
            .keys
            .iter()
            .map(|k| {
                vec![
                    k.clone(),
                    format!("0{k}"),
                    format!("+{k}"),
                    format!("00{k}"),
                ]
            })
            .collect();
        self
    }

    /// Runs against `sidecars` (entity `accounts`; sidecars or an application in front of one)
    /// and evicts from the Redis at `redis_url`, recording into `history`. Returns when `stop`
    /// says so.
    pub async fn run<T: Target>(
        &self,
        sidecars: &[Arc<T>],
        redis_url: &str,
        history: &History,
    ) -> RunStats {
        let started = Instant::now();
        let deadline = started + self.stop.max;
        let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let stop = self.stop;
        let done = {
            let counts = Arc::clone(&counts);
            let also = self.until_also.clone();
            move || {
                Instant::now() >= deadline
                    || (counts.0.load(Ordering::Relaxed) >= stop.reads
                        && counts.1.load(Ordering::Relaxed) >= stop.writes
                        && also.as_ref().is_none_or(|a| a.load(Ordering::Relaxed)))
            }
        };
        let keys = Arc::new(self.keys.clone());
        let spellings = Arc::new(self.spellings.clone());
        let mut tasks = vec![];
        for worker in 0..self.writers + self.readers {
            let writer = worker < self.writers;
            let (sidecars, spellings, history) =
                (sidecars.to_vec(), spellings.clone(), history.clone());
            let (counts, done) = (Arc::clone(&counts), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !done() {
                    n += 1;
                    let sc = &sidecars[fastrand::usize(..sidecars.len())];
                    let k = fastrand::usize(..spellings.len());
                    let spelled = &spellings[k][fastrand::usize(..spellings[k].len())];
                    let start = Instant::now();
                    let outcome = if writer {
                        // Fits the `integer` column of the test tables.
                        let body =
                            json!({"n": (worker as u64 % 20) * 100_000_000 + n % 100_000_000});
                        write_outcome(sc.as_ref(), spelled, body).await
                    } else {
                        read_outcome(sc.as_ref(), spelled).await
                    };
                    let end = Instant::now();
                    if writer {
                        if matches!(outcome, Outcome::Ok { .. }) {
                            counts.1.fetch_add(1, Ordering::Relaxed);
                        }
                    } else if matches!(outcome, Outcome::Ok { .. }) {
                        counts.0.fetch_add(1, Ordering::Relaxed);
                    }
                    history.record(Op {
                        key: k as u32,
                        kind: if writer { Kind::Write } else { Kind::Read },
                        start,
                        end,
                        outcome,
                    });
                }
            }));
        }
        if let Some(w) = self.external.clone() {
            let (keys, history, done) = (keys.clone(), history.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let sql = format!(
                    "INSERT INTO {} (id, n) VALUES ($1, $2) \
                     ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n RETURNING version",
                    w.table
                );
                let mut n = 0i32;
                while !done() {
                    n += 1;
                    let k = fastrand::usize(..keys.len());
                    let start = Instant::now();
                    let written: Result<i64, _> =
                        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                            .bind(&keys[k])
                            .bind(-n)
                            .fetch_one(&w.pool)
                            .await;
                    history.record(Op {
                        key: k as u32,
                        kind: Kind::Write,
                        start,
                        end: Instant::now(),
                        outcome: match written {
                            Ok(version) => Outcome::Committed { version },
                            Err(_) => Outcome::Unknown,
                        },
                    });
                    let (lo, hi) = w.pause;
                    let pause = fastrand::u64(lo.as_micros() as u64..=hi.as_micros() as u64);
                    tokio::time::sleep(Duration::from_micros(pause)).await;
                }
            }));
        }
        let evictor = self.evict_every.map(|(lo, hi)| {
            let (url, keys, done) = (redis_url.to_string(), keys.clone(), done.clone());
            tokio::spawn(async move { evict_until(&url, &keys, lo, hi, done).await })
        });
        for t in tasks {
            t.await.unwrap();
        }
        let evictions = match evictor {
            Some(e) => e.await.unwrap(),
            None => 0,
        };
        RunStats {
            evictions,
            elapsed: started.elapsed(),
        }
    }
}

/// A connection to `url`: one server, or a `redis+cluster://` list of nodes.
async fn evictor_connection(url: &str) -> Option<EvictorConnection> {
    let timeout = Some(Duration::from_millis(200));
    if let Some(hosts) = url.strip_prefix("redis+cluster://") {
        let urls: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
        let client = redis::cluster::ClusterClient::builder(urls)
            .connection_timeout(Duration::from_millis(200))
            .response_timeout(Duration::from_millis(200))
            .build()
            .ok()?;
        return client
            .get_async_connection()
            .await
            .ok()
            .map(EvictorConnection::Cluster);
    }
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout);
    redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .ok()
        .map(EvictorConnection::Node)
}

enum EvictorConnection {
    Node(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for EvictorConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        p: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(p, offset, count),
            Self::Cluster(c) => c.req_packed_commands(p, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        0
    }
}

/// Deletes random entries (what `maxmemory` eviction or a TTL does) until `done`. Errors (Redis
/// paused or restarting under a fault) just skip a beat.
async fn evict_until(
    url: &str,
    keys: &[String],
    lo: Duration,
    hi: Duration,
    done: impl Fn() -> bool,
) -> u64 {
    let mut conn = None;
    let mut evictions = 0;
    while !done() {
        if conn.is_none() {
            conn = evictor_connection(url).await;
        }
        if let Some(c) = conn.as_mut() {
            let key = crate::entry_key("accounts", &keys[fastrand::usize(..keys.len())]);
            match redis::cmd("DEL").arg(key).query_async::<()>(c).await {
                Ok(()) => evictions += 1,
                Err(_) => conn = None,
            }
        }
        let pause = fastrand::u64(lo.as_micros() as u64..=hi.as_micros() as u64);
        tokio::time::sleep(Duration::from_micros(pause)).await;
    }
    evictions
}

const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

async fn write_outcome(sc: &impl Target, key: &str, body: serde_json::Value) -> Outcome {
    let req = sc
        .http()
        .put(sc.row_url("accounts", key))
        .timeout(CLIENT_TIMEOUT)
        .json(&body);
    match crate::reply(req).await {
        Ok(r) if r.status == 200 || r.status == 201 => Outcome::Ok {
            version: r.version(),
            clean: r.cache.as_deref() == Some("ok"),
        },
        // Shed or rejected before the database was asked: nothing happened.
        Ok(r) if r.status < 500 || r.error_code() == "overloaded" => Outcome::Failed,
        _ => Outcome::Unknown,
    }
}

async fn read_outcome(sc: &impl Target, key: &str) -> Outcome {
    let req = sc
        .http()
        .get(sc.row_url("accounts", key))
        .timeout(CLIENT_TIMEOUT);
    match crate::reply(req).await {
        Ok(r) if r.status == 200 => Outcome::Ok {
            version: r.version(),
            clean: r.cache.as_deref() == Some("hit"),
        },
        _ => Outcome::Failed,
    }
}

/// A fresh table with an audit trigger, and the keys written once so every read finds a row.
pub async fn audited_table(pool: &PgPool, prefix: &str) -> (String, Audit) {
    let table = unique(prefix);
    crate::create_table(pool, &table).await;
    let audit = Audit::install(pool, &table).await;
    (table, audit)
}

/// `audited_table` with an integer key (`id bigint`): several spellings name one row.
pub async fn audited_int_table(pool: &PgPool, prefix: &str) -> (String, Audit) {
    let table = unique(prefix);
    let sql = format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, owner text, balance numeric NOT NULL DEFAULT 0, \
         n integer, version bigint NOT NULL DEFAULT 0)"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .unwrap();
    let audit = Audit::install(pool, &table).await;
    (table, audit)
}

/// Per-key operation counts, to show every key saw traffic.
pub fn ops_per_key(keys: &[String], ops: &[Op]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for op in ops {
        *m.entry(keys[op.key as usize].clone()).or_default() += 1;
    }
    m
}
