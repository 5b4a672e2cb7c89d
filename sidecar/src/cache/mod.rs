//! Redis access for the protocol: entry and lease keys, the scripts, and a short "Redis is down"
//! window so that reads go straight to the database instead of waiting on timeouts.

pub mod bulk;
pub mod link;
pub mod scripts;

use crate::envelope::Envelope;
use link::Link;
use redis::aio::MultiplexedConnection;
use redis::{Script, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use wtc_config::RedisConfig;

/// The Redis keys of one cached row. Entity names cannot contain ':' (config validation), so
/// `entity:key` is unambiguous; the braces are a cluster hash tag shared by entry and lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub entry: String,
    pub lease: String,
}

impl CacheKey {
    pub fn new(entity: &str, key: &str) -> Self {
        let entry = format!("wtc:{{{entity}:{key}}}");
        let lease = format!("{entry}:lease");
        Self { entry, lease }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The envelope is now cached.
    Stored,
    /// A newer version was already cached; nothing changed.
    Stale,
    /// The slot was empty and this write's intent had been revoked; nothing cached, nothing stale.
    Skipped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    Stored,
    LeaseLost,
    Stale,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("Redis is marked unavailable")]
    Down,
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from a cache script: {0}")]
    Protocol(String),
}

/// A connection handed to one call, with the generation that identifies it to `Link`.
struct Conn {
    c: MultiplexedConnection,
    generation: u64,
}

pub struct Cache {
    link: Link,
    store: Script,
    fill: Script,
    release: Script,
    /// The texts of the three scripts, for pipelines that load them (`bulk`).
    code: scripts::Scripts,
    started: Instant,
    down_until_ms: AtomicU64,
    down_backoff: Duration,
}

impl Cache {
    /// Creates the client without connecting: the sidecar starts (and answers from the database)
    /// even when Redis is not up yet. A broken connection is replaced on the next call after the
    /// down window (`link`).
    pub fn new(
        config: &RedisConfig,
        down_backoff: Duration,
        epoch: link::EpochCounters,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(config.url.as_str())?;
        let code = scripts::Scripts::for_this_build();
        Ok(Self {
            link: Link::new(
                client,
                Duration::from_millis(config.connect_timeout_ms),
                Duration::from_millis(config.response_timeout_ms),
                epoch,
            ),
            store: Script::new(code.store),
            fill: Script::new(code.fill),
            release: Script::new(code.release),
            code,
            started: Instant::now(),
            down_until_ms: AtomicU64::new(0),
            down_backoff,
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// False during the window after a Redis error.
    pub fn is_up(&self) -> bool {
        self.now_ms() >= self.down_until_ms.load(Ordering::Relaxed)
    }

    async fn conn(&self) -> Result<Conn, CacheError> {
        if !self.is_up() {
            return Err(CacheError::Down);
        }
        self.connect().await
    }

    /// The connection, even inside the down window (the repair loop probes with it).
    async fn connect(&self) -> Result<Conn, CacheError> {
        match self.link.get().await {
            Ok(Some((c, generation))) => Ok(Conn { c, generation }),
            Ok(None) => Err(CacheError::Down),
            Err(e) => {
                self.open_down_window();
                Err(CacheError::Redis(e))
            }
        }
    }

    fn open_down_window(&self) {
        let until = self.now_ms() + self.down_backoff.as_millis() as u64;
        self.down_until_ms.store(until, Ordering::Relaxed);
    }

    /// Records a failed call on `generation`: a connection that broke or timed out is replaced
    /// (the replacement passes the epoch check), and the down window opens. Server replies that
    /// are errors (a script bug, a wrong type) do not mean Redis is unreachable.
    fn note<T>(&self, generation: u64, r: Result<T, redis::RedisError>) -> Result<T, CacheError> {
        r.map_err(|e| {
            if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_unrecoverable_error()
            {
                self.link.drop_connection(generation);
                self.open_down_window();
            }
            CacheError::Redis(e)
        })
    }

    /// Closes the down window once Redis answered again (the repair loop probes it).
    pub fn mark_up(&self) {
        self.down_until_ms.store(0, Ordering::Relaxed);
    }

    pub async fn get(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, CacheError> {
        let mut c = self.conn().await?;
        self.note(
            c.generation,
            redis::cmd("GET")
                .arg(&key.entry)
                .query_async(&mut c.c)
                .await,
        )
    }

    /// GET and PTTL in one round trip, for early refresh.
    pub async fn get_with_ttl(&self, key: &CacheKey) -> Result<(Option<Vec<u8>>, i64), CacheError> {
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key.entry).cmd("PTTL").arg(&key.entry);
        self.note(c.generation, pipe.query_async(&mut c.c).await)
    }

    /// The entry, and whether its lease is held: what a reader waiting for a fill looks at.
    pub async fn peek(&self, key: &CacheKey) -> Result<(Option<Vec<u8>>, bool), CacheError> {
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("GET")
            .arg(&key.entry)
            .cmd("EXISTS")
            .arg(&key.lease);
        self.note(c.generation, pipe.query_async(&mut c.c).await)
    }

    /// Tries to become the one filler of an empty slot, and reads the entry in the same round
    /// trip (after the `SET NX`): a value found there was stored since the reader's miss (a
    /// filler that finished and gave its lease back, or a write), and can be used at once.
    pub async fn acquire_lease(
        &self,
        key: &CacheKey,
        token: &str,
        ttl: Duration,
    ) -> Result<(bool, Option<Vec<u8>>), CacheError> {
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&key.lease)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .cmd("GET")
            .arg(&key.entry);
        let (won, entry): (Option<String>, Option<Vec<u8>>) =
            self.note(c.generation, pipe.query_async(&mut c.c).await)?;
        Ok((won.is_some(), entry))
    }

    /// A writer's intent, taken before its commit: revokes any filler's lease and lets this write
    /// fill the slot if it is still empty at its cache step.
    pub async fn write_intent(
        &self,
        key: &CacheKey,
        token: &str,
        ttl: Duration,
    ) -> Result<(), CacheError> {
        let mut c = self.conn().await?;
        self.note(
            c.generation,
            redis::cmd("SET")
                .arg(&key.lease)
                .arg(token)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async::<()>(&mut c.c)
                .await,
        )
    }

    /// The cache step of a committed write.
    pub async fn store(
        &self,
        key: &CacheKey,
        envelope: &Envelope,
        ttl: Duration,
        intent: Option<&str>,
    ) -> Result<StoreOutcome, CacheError> {
        let mut c = self.conn().await?;
        let reply: String = self.note(
            c.generation,
            self.store
                .key(&key.entry)
                .key(&key.lease)
                .arg(envelope.version)
                .arg(&envelope.bytes[..])
                .arg(ttl.as_millis() as u64)
                .arg(intent.unwrap_or(""))
                .invoke_async(&mut c.c)
                .await,
        )?;
        match reply.as_str() {
            "stored" => Ok(StoreOutcome::Stored),
            "stale" => Ok(StoreOutcome::Stale),
            "skipped" => Ok(StoreOutcome::Skipped),
            other => Err(CacheError::Protocol(other.to_string())),
        }
    }

    pub async fn fill(
        &self,
        key: &CacheKey,
        envelope: &Envelope,
        ttl: Duration,
        token: &str,
    ) -> Result<FillOutcome, CacheError> {
        let mut c = self.conn().await?;
        let reply: String = self.note(
            c.generation,
            self.fill
                .key(&key.entry)
                .key(&key.lease)
                .arg(envelope.version)
                .arg(&envelope.bytes[..])
                .arg(ttl.as_millis() as u64)
                .arg(token)
                .invoke_async(&mut c.c)
                .await,
        )?;
        match reply.as_str() {
            "stored" => Ok(FillOutcome::Stored),
            "lease_lost" => Ok(FillOutcome::LeaseLost),
            "stale" => Ok(FillOutcome::Stale),
            other => Err(CacheError::Protocol(other.to_string())),
        }
    }

    pub async fn release(&self, key: &CacheKey, token: &str) -> Result<(), CacheError> {
        let mut c = self.conn().await?;
        self.note(
            c.generation,
            self.release
                .key(&key.lease)
                .arg(token)
                .invoke_async::<Value>(&mut c.c)
                .await,
        )?;
        Ok(())
    }

    /// Removes the entry and its lease: always safe, the next read fills from the database.
    /// Ignores the down window: the repair loop uses it to probe.
    pub async fn evict(&self, key: &CacheKey) -> Result<(), CacheError> {
        let mut c = self.connect().await?;
        let r = redis::cmd("DEL")
            .arg(&key.entry)
            .arg(&key.lease)
            .query_async::<()>(&mut c.c)
            .await;
        self.note(c.generation, r)?;
        self.mark_up();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_and_lease_share_a_hash_tag() {
        let k = CacheKey::new("accounts", "a}b");
        assert_eq!(k.entry, "wtc:{accounts:a}b}");
        assert_eq!(k.lease, "wtc:{accounts:a}b}:lease");
        // Redis hashes the text between the first '{' and the next '}': the same for both.
        let tag = |s: &str| {
            let open = s.find('{').unwrap();
            let close = open + s[open..].find('}').unwrap();
            s[open + 1..close].to_string()
        };
        assert_eq!(tag(&k.entry), tag(&k.lease));
    }
}
