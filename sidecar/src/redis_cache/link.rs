//! The sidecar's connection to Redis: one connection (multiplexed; a cluster connection routes by
//! slot), and the epoch check (`epoch`) it passes before it carries a single command.
//!
//! One server (plain or found through Sentinel): a connection is replaced when it breaks, and a
//! new connection is checked first. A restart or a failover always breaks the connection, so no
//! command reaches a new process before the check.
//!
//! A cluster connection repairs itself (it reconnects to nodes and follows the slot map), so it
//! is never replaced: instead an error on it makes it suspect, and a suspect connection is handed
//! out only after a check of every master of every slot. The client is built without internal
//! retries (`source`): a dead node, a failover's MOVED and a migration's ASK reach the sidecar
//! as errors instead of being followed quietly to a server not yet checked. Slots whose master
//! did not answer the check stay unchecked: the store does not use Redis for their keys
//! (`serves`), the other slots go on, and the check runs again every `UNCHECKED_RETRY` until it
//! passes them. A check also runs every `CLUSTER_CHECK_EVERY` (one caller runs it, the others go
//! on): it bounds what an unobserved change (no command was sent to the node meanwhile) can
//! serve.

use super::connection::{self, Connection};
use super::epoch::{self, Unchecked};
use super::source::Source;
use crate::core::EpochCounters;
use redis::{AsyncConnectionConfig, RedisError, RedisResult};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most one "cannot connect" warning per this long (a Redis that stays away would otherwise
/// log once per down window).
const WARN_EVERY: Duration = Duration::from_secs(30);
/// How often a cluster connection is checked again without an error.
const CLUSTER_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often a check runs again while some slots are unchecked.
const UNCHECKED_RETRY: Duration = Duration::from_millis(100);

pub struct Link {
    source: Source,
    config: AsyncConnectionConfig,
    /// The connection in use and its generation (so an error on an old one does not drop a new one).
    current: RwLock<Option<(Connection, u64)>>,
    generation: AtomicU64,
    /// One reconnect (or cluster check) at a time; callers wait for it up to `connect_timeout`,
    /// then treat Redis as unavailable.
    reconnecting: tokio::sync::Mutex<()>,
    connect_timeout: Duration,
    counters: EpochCounters,
    /// A cluster connection saw an error since its last check.
    suspect: AtomicBool,
    /// Errors seen on the cluster connection so far: a check clears `suspect` only if none came
    /// while it ran, and a read discards its reply if one came while it was in flight.
    errors: AtomicU64,
    /// When the cluster connection was last checked (ms since `started`).
    checked_at_ms: AtomicU64,
    /// Slot ranges the last check could not pass (`partial` says whether there are any, so the
    /// hit path reads one atomic).
    unchecked: RwLock<Unchecked>,
    partial: AtomicBool,
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
            suspect: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            checked_at_ms: AtomicU64::new(0),
            unchecked: RwLock::new(vec![]),
            partial: AtomicBool::new(false),
            warned_at_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The connection to use, connecting (and checking the epoch) when there is none. `None` when
    /// another task's reconnect takes longer than the connect timeout.
    pub async fn get(&self) -> RedisResult<Option<(Connection, u64)>> {
        let current = self.current.read().unwrap().clone();
        if let Some((c, generation)) = current {
            return match c {
                Connection::Node(_) => Ok(Some((c, generation))),
                Connection::Cluster(_) => self.checked(c, generation).await,
            };
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
        let (conn, unchecked) = match self.connect().await {
            Ok(c) => c,
            Err(e) => {
                self.warn(&e);
                return Err(e);
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.passed(unchecked, false);
        *self.current.write().unwrap() = Some((conn.clone(), generation));
        Ok(Some((conn, generation)))
    }

    /// A cluster connection, checked first when suspect (everyone waits) or due (one caller
    /// checks, the others go on).
    async fn checked(
        &self,
        mut conn: Connection,
        generation: u64,
    ) -> RedisResult<Option<(Connection, u64)>> {
        let due = || {
            let every = if self.partial.load(Ordering::Acquire) {
                UNCHECKED_RETRY
            } else {
                CLUSTER_CHECK_EVERY
            };
            self.now_ms()
                .saturating_sub(self.checked_at_ms.load(Ordering::Relaxed))
                >= every.as_millis() as u64
        };
        if !self.suspect.load(Ordering::Acquire) {
            if !due() {
                return Ok(Some((conn, generation)));
            }
            let Ok(_guard) = self.reconnecting.try_lock() else {
                return Ok(Some((conn, generation)));
            };
            if due() && !self.check(&mut conn).await? {
                return Ok(None);
            }
            return Ok(Some((conn, generation)));
        }
        let Ok(_guard) = tokio::time::timeout(self.connect_timeout, self.reconnecting.lock()).await
        else {
            return Ok(None);
        };
        if self.suspect.load(Ordering::Acquire) && !self.check(&mut conn).await? {
            return Ok(None);
        }
        Ok(Some((conn, generation)))
    }

    /// Runs the epoch check on a cluster connection. `Ok(false)`: it passed, but an error came
    /// while it ran, perhaps from a change it did not see (a failover after it read the slot
    /// map): the connection stays suspect and this use is skipped. A failed check leaves it
    /// suspect too.
    async fn check(&self, conn: &mut Connection) -> RedisResult<bool> {
        let errors = self.errors();
        match epoch::make_safe(conn, &self.counters).await {
            Ok(unchecked) => {
                let clean = self.errors() == errors;
                self.passed(unchecked, !clean);
                Ok(clean)
            }
            Err(e) => {
                self.suspect.store(true, Ordering::Release);
                self.warn(&e);
                Err(e)
            }
        }
    }

    /// A check ended: what it could not pass is left alone until the next one; `suspect`: an
    /// error came while it ran.
    fn passed(&self, unchecked: Unchecked, suspect: bool) {
        // The ranges first: `partial` is what `serves` reads before them.
        let partial = !unchecked.is_empty();
        *self.unchecked.write().unwrap() = unchecked;
        self.partial.store(partial, Ordering::Release);
        self.checked_at_ms.store(self.now_ms(), Ordering::Relaxed);
        self.suspect.store(suspect, Ordering::Release);
    }

    /// Whether Redis may be used for `key`: false for keys of cluster slots the last check could
    /// not pass.
    pub fn serves(&self, key: &str) -> bool {
        if !self.partial.load(Ordering::Acquire) {
            return true;
        }
        let slot = connection::slot(key);
        !self
            .unchecked
            .read()
            .unwrap()
            .iter()
            .any(|&(a, b)| (a..=b).contains(&slot))
    }

    async fn connect(&self) -> RedisResult<(Connection, Unchecked)> {
        let mut conn = self
            .source
            .connect(&self.config, self.connect_timeout)
            .await?;
        let unchecked = epoch::make_safe(&mut conn, &self.counters).await?;
        Ok((conn, unchecked))
    }

    /// Errors seen on a cluster connection so far (see `errors`).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Acquire)
    }

    /// Says why Redis cannot be reached (a TLS or sentinel problem must not look like a slow
    /// cache), at most once per `WARN_EVERY`. redis' messages carry no password.
    fn warn(&self, e: &RedisError) {
        let last = self.warned_at_ms.load(Ordering::Relaxed);
        let now = self.now_ms() + 1;
        if last != 0 && now.saturating_sub(last) < WARN_EVERY.as_millis() as u64 {
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

    /// Forgets a connection that failed, unless it was already replaced; a cluster connection
    /// is kept (it repairs itself) but must pass a check before its next use.
    pub fn drop_connection(&self, generation: u64) {
        let mut cur = self.current.write().unwrap();
        match cur.as_ref() {
            Some((Connection::Cluster(_), g)) if *g == generation => {
                self.errors.fetch_add(1, Ordering::AcqRel);
                self.suspect.store(true, Ordering::Release);
            }
            Some((_, g)) if *g == generation => *cur = None,
            _ => {}
        }
    }
}
