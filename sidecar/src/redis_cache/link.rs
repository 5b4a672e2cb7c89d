//! The sidecar's connection to Redis: one multiplexed connection, replaced when it breaks, and the
//! epoch check every new connection passes before it carries a single command.
//!
//! Why the check: a Redis restarted from its persistence files (RDB or AOF) brings back entries
//! and fill leases from before the crash, while the writes acknowledged after its last save are
//! gone from it. Those entries are older than acknowledged versions; serving them breaks P2, and a
//! restored write intent could even let an older writer fill an empty slot. A restart always gives
//! the server a new `run_id` and always breaks every client connection, so a connection learns the
//! run id of the one process it talks to. `wtc:epoch` holds the run id under which the cache was
//! last made safe; when it differs, this sidecar deletes every `wtc:{...}` key (entries and leases)
//! before using the connection, then records the new run id. Other sidecars do the same on their
//! own new connections; deleting twice is harmless, and nobody records the epoch before the sweep
//! is complete, so no connection ever serves a restored entry.

use super::source::Source;
use crate::core::EpochCounters;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, RedisResult};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The key holding the run id the cache was last made safe under. Outside the `wtc:{` pattern of
/// entries and leases, so the sweep leaves it alone.
pub const EPOCH_KEY: &str = "wtc:epoch";
const SWEEP_PATTERN: &str = "wtc:{*";

/// At most one "cannot connect" warning per this long (a Redis that stays away would otherwise
/// log once per down window).
const WARN_EVERY: Duration = Duration::from_secs(30);

pub struct Link {
    source: Source,
    config: AsyncConnectionConfig,
    /// The connection in use and its generation (so an error on an old one does not drop a new one).
    current: RwLock<Option<(MultiplexedConnection, u64)>>,
    generation: AtomicU64,
    /// One reconnect at a time; callers wait for it up to `connect_timeout`, then treat Redis as
    /// unavailable.
    reconnecting: tokio::sync::Mutex<()>,
    connect_timeout: Duration,
    counters: EpochCounters,
    /// When the last connect failure was logged (ms since `started`, 0: never).
    warned_at_ms: AtomicU64,
    started: Instant,
}

impl Link {
    pub fn new(
        source: Source,
        connect_timeout: Duration,
        response_timeout: Duration,
        counters: EpochCounters,
    ) -> Self {
        Self {
            source,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(response_timeout)),
            current: RwLock::new(None),
            generation: AtomicU64::new(0),
            reconnecting: tokio::sync::Mutex::new(()),
            connect_timeout,
            counters,
            warned_at_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The connection to use, connecting (and checking the epoch) when there is none. `None` when
    /// another task's reconnect takes longer than the connect timeout.
    pub async fn get(&self) -> RedisResult<Option<(MultiplexedConnection, u64)>> {
        if let Some(c) = self.current.read().unwrap().clone() {
            return Ok(Some(c));
        }
        // Waiting for another task's connect is what lets a herd at startup share one connection
        // (and one lease); a sweep that outlasts the connect timeout is not waited for.
        let Ok(_guard) = tokio::time::timeout(self.connect_timeout, self.reconnecting.lock()).await
        else {
            return Ok(None);
        };
        if let Some(c) = self.current.read().unwrap().clone() {
            return Ok(Some(c));
        }
        let conn = match self.connect().await {
            Ok(c) => c,
            Err(e) => {
                self.warn(&e);
                return Err(e);
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.current.write().unwrap() = Some((conn.clone(), generation));
        Ok(Some((conn, generation)))
    }

    async fn connect(&self) -> RedisResult<MultiplexedConnection> {
        let mut conn = self
            .source
            .connect(&self.config, self.connect_timeout)
            .await?;
        self.make_safe(&mut conn).await?;
        Ok(conn)
    }

    /// Says why Redis cannot be reached (a TLS or sentinel problem must not look like a slow
    /// cache), at most once per `WARN_EVERY`. redis' messages carry no password.
    fn warn(&self, e: &RedisError) {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.warned_at_ms.load(Ordering::Relaxed);
        if last != 0 && now - last < WARN_EVERY.as_millis() as u64 {
            return;
        }
        if self
            .warned_at_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                error = %e,
                "cannot connect to Redis; reads go to the database until it answers"
            );
        }
    }

    /// Forgets a connection that failed, unless it was already replaced.
    pub fn drop_connection(&self, generation: u64) {
        let mut cur = self.current.write().unwrap();
        if cur.as_ref().is_some_and(|(_, g)| *g == generation) {
            *cur = None;
        }
    }

    /// The epoch check (module doc).
    async fn make_safe(&self, conn: &mut MultiplexedConnection) -> RedisResult<()> {
        let info: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
        let run_id = run_id(&info).ok_or_else(|| {
            RedisError::from((redis::ErrorKind::Client, "INFO server has no run_id"))
        })?;
        let recorded: Option<String> = redis::cmd("GET").arg(EPOCH_KEY).query_async(conn).await?;
        if recorded.as_deref() == Some(run_id) {
            return Ok(());
        }
        let swept = sweep(conn).await?;
        redis::cmd("SET")
            .arg(EPOCH_KEY)
            .arg(run_id)
            .query_async::<()>(conn)
            .await?;
        self.counters.swept_keys.inc_by(swept);
        // A first start of Redis (no epoch yet, nothing swept) is not a restart worth a warning.
        if recorded.is_some() || swept > 0 {
            self.counters.changes.inc();
            tracing::warn!(
                swept,
                "Redis is a new process (run id changed): deleted every cached entry and lease \
                 it may have restored from before its restart"
            );
        }
        Ok(())
    }
}

/// Deletes every entry and lease (`SCAN` + `UNLINK`, a batch per round trip). Keys restored from
/// persistence exist for the whole scan, so `SCAN` returns each of them at least once.
pub(super) async fn sweep(conn: &mut MultiplexedConnection) -> RedisResult<u64> {
    let mut cursor: u64 = 0;
    let mut swept = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(SWEEP_PATTERN)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            swept += redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<u64>(conn)
                .await?;
        }
        if next == 0 {
            return Ok(swept);
        }
        cursor = next;
    }
}

/// The `run_id` field of `INFO server`.
fn run_id(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(str::trim)
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_is_read_from_info_server() {
        let info =
            "# Server\r\nredis_version:7.0.15\r\nrun_id:4f1c0c0e8c5a1d2b\r\ntcp_port:6379\r\n";
        assert_eq!(run_id(info), Some("4f1c0c0e8c5a1d2b"));
        assert_eq!(run_id("# Server\r\nredis_version:7\r\n"), None);
    }
}
