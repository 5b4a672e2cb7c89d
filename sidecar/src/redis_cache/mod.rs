//! The cache store on Redis: entries and leases, the scripts (`scripts`), the connection and its
//! epoch check (`link`), and a short "Redis is down" window so that reads go straight to the
//! database instead of waiting on timeouts.
//!
//! A call naming several keys is ONE pipelined round trip. Script calls in a pipeline are
//! `EVALSHA`, which does not fall back to `EVAL` on `NOSCRIPT`; so such a pipeline starts with
//! `SCRIPT LOAD` of the script (Redis runs a connection's commands in order, so the script is
//! there when the `EVALSHA`s run; loading a loaded script only hashes it again). A call with one
//! script call uses `Script::invoke_async` (EVALSHA, EVAL on NOSCRIPT), which sends no script
//! text on the hot path.

mod connection;
mod epoch;
mod link;
mod scripts;
mod source;

pub use epoch::{CLUSTER_EPOCH_PREFIX, EPOCH_KEY};
pub use source::SourceError;

use crate::core::EpochCounters;
use crate::core::ports::{
    CacheError, CacheKey, CacheStore, FillOutcome, InvalidateOutcome, Invalidation, LeaseEnd,
    LeaseToken, StoreCall, StoreOutcome,
};
use crate::core::types::Cached;
use connection::Connection;
use futures_util::future::try_join_all;
use link::Link;
use redis::{Pipeline, Script, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use wtc_config::RedisConfig;

/// A connection handed to one call, with the generation that identifies it to `Link`.
#[derive(Clone)]
struct Conn {
    c: Connection,
    generation: u64,
}

pub struct RedisStore {
    link: Link,
    store: Script,
    fill: Script,
    release: Script,
    invalidate: Script,
    started: Instant,
    down_until_ms: AtomicU64,
    down_backoff: Duration,
}

impl RedisStore {
    /// Creates the client without connecting: the sidecar starts (and answers from the database)
    /// even when Redis is not up yet. A broken connection is replaced on the next call after the
    /// down window (`link`).
    pub fn new(
        config: &RedisConfig,
        down_backoff: Duration,
        epoch: EpochCounters,
    ) -> Result<Self, SourceError> {
        Ok(Self {
            link: Link::new(
                source::Source::new(config)?,
                Duration::from_millis(config.connect_timeout_ms),
                Duration::from_millis(config.response_timeout_ms),
                epoch,
            ),
            store: Script::new(scripts::STORE),
            fill: Script::new(scripts::FILL),
            release: Script::new(scripts::RELEASE),
            invalidate: Script::new(scripts::INVALIDATE),
            started: Instant::now(),
            down_until_ms: AtomicU64::new(0),
            down_backoff,
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn conn(&self) -> Result<Conn, CacheError> {
        if !self.is_up() {
            return Err(CacheError::Down);
        }
        self.connect().await
    }

    /// `conn`, refused for calls naming a key of a cluster slot the last epoch check could not
    /// pass (its master did not answer, or is new and not swept yet: `link`). Such a key's
    /// commands would go to a dead master (errors that open the down window for every key) or
    /// read from an unswept one.
    async fn conn_for<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k CacheKey>,
    ) -> Result<Conn, CacheError> {
        let c = self.conn().await?;
        if keys.into_iter().all(|k| self.link.serves(&k.entry)) {
            Ok(c)
        } else {
            Err(CacheError::KeyUnavailable)
        }
    }

    /// For a read on a cluster: `Err` when an error reached the connection while the read was
    /// in flight (`before`: `link.errors()` when it was sent). The client may have re-routed it
    /// after that error to a node the epoch check has not passed yet (a promoted replica), so
    /// what it read is not used.
    fn still_checked(&self, c: &Conn, before: u64) -> Result<(), CacheError> {
        match c.c {
            Connection::Cluster(_) if self.link.errors() != before => {
                Err(CacheError::KeyUnavailable)
            }
            _ => Ok(()),
        }
    }

    /// The connection, even inside the down window (the repair loop probes with it).
    async fn connect(&self) -> Result<Conn, CacheError> {
        match self.link.get().await {
            Ok(Some((c, generation))) => Ok(Conn { c, generation }),
            Ok(None) => Err(CacheError::Down),
            Err(e) => {
                self.open_down_window();
                Err(CacheError::Failed(e.to_string()))
            }
        }
    }

    fn open_down_window(&self) {
        let until = self.now_ms() + self.down_backoff.as_millis() as u64;
        self.down_until_ms.store(until, Ordering::Relaxed);
    }

    /// Records a failed call on `generation`: a connection that broke or timed out is replaced
    /// (the replacement passes the epoch check), and the down window opens. So is one to a
    /// server that is no longer a master (`READONLY` after a failover: the replacement asks the
    /// sentinels again). A cluster's redirections only make the connection suspect. Other server
    /// errors (a script bug, a wrong type) do not mean Redis is unreachable.
    fn note<T>(&self, generation: u64, r: Result<T, redis::RedisError>) -> Result<T, CacheError> {
        r.map_err(|e| {
            if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_unrecoverable_error()
                || matches!(e.code(), Some("READONLY" | "MASTERDOWN"))
            {
                self.link.drop_connection(generation);
                self.open_down_window();
            } else if e.is_cluster_error() {
                // MOVED, ASK, TRYAGAIN, CLUSTERDOWN: the slot map changed or is changing. The
                // connection is checked again before its next use; the other slots need not
                // wait out a down window.
                self.link.drop_connection(generation);
            }
            CacheError::Failed(e.to_string())
        })
    }

    /// Runs `pipe` on a connection, through `note`.
    async fn query<T: redis::FromRedisValue>(
        &self,
        c: &mut Conn,
        pipe: &Pipeline,
    ) -> Result<T, CacheError> {
        let r = pipe.query_async(&mut c.c).await;
        self.note(c.generation, r)
    }

    /// A call on `n` items as few pipelined round trips as the connection allows: one on a
    /// server, one per hash slot on a cluster (concurrently). `key(i)` is item `i`'s key,
    /// `replies(i)` how many replies its commands give (ignored ones give none), `build` adds a
    /// group's commands. Returns the replies in item order, as one pipeline would.
    async fn grouped<'k>(
        &self,
        c: &Conn,
        n: usize,
        key: impl Fn(usize) -> &'k str,
        replies: impl Fn(usize) -> usize,
        build: impl Fn(&mut Pipeline, &[usize]),
    ) -> Result<Vec<Value>, CacheError> {
        let groups: Vec<Vec<usize>> =
            c.c.pipeline_groups(n, key)
                .into_iter()
                .filter(|g| !g.is_empty())
                .collect();
        let runs = groups.iter().map(|g| {
            let mut pipe = redis::pipe();
            build(&mut pipe, g);
            let mut c = c.clone();
            async move {
                if pipe.is_empty() {
                    return Ok(vec![]);
                }
                self.query::<Vec<Value>>(&mut c, &pipe).await
            }
        });
        let results = try_join_all(runs).await?;
        if let [only] = &groups[..]
            && only.len() == n
        {
            return Ok(results.into_iter().flatten().collect());
        }
        let mut by_item: Vec<Vec<Value>> = (0..n).map(|_| vec![]).collect();
        for (g, r) in groups.iter().zip(results) {
            let mut r = r.into_iter();
            for &i in g {
                for _ in 0..replies(i) {
                    by_item[i].push(r.next().ok_or_else(short_reply)?);
                }
            }
        }
        Ok(by_item.into_iter().flatten().collect())
    }
}

fn short_reply() -> CacheError {
    CacheError::Protocol("short pipeline reply".into())
}

/// `SET lease token [NX] PX ttl`: a reader's fill lease (`NX`: only into an empty lease) or a
/// writer's intent (unconditional: it revokes the reader's).
fn set_lease(pipe: &mut Pipeline, key: &CacheKey, token: &LeaseToken, ttl: Duration, nx: bool) {
    let cmd = pipe.cmd("SET").arg(&key.lease).arg(token.as_str());
    if nx {
        cmd.arg("NX");
    }
    cmd.arg("PX").arg(ttl.as_millis() as u64);
}

fn load(pipe: &mut Pipeline, script: &str) {
    pipe.cmd("SCRIPT").arg("LOAD").arg(script).ignore();
}

/// Appends `EVALSHA` of `script` with `keys`; the caller adds the arguments.
fn evalsha<'p>(pipe: &'p mut Pipeline, script: &Script, keys: &[&str]) -> &'p mut Pipeline {
    let p = pipe.cmd("EVALSHA").arg(script.get_hash()).arg(keys.len());
    for k in keys {
        p.arg(*k);
    }
    p
}

fn bytes(v: Value) -> Result<Option<Vec<u8>>, CacheError> {
    match v {
        Value::Nil => Ok(None),
        Value::BulkString(b) => Ok(Some(b)),
        other => Err(CacheError::Protocol(format!("{other:?}"))),
    }
}

impl CacheStore for RedisStore {
    fn is_up(&self) -> bool {
        self.now_ms() >= self.down_until_ms.load(Ordering::Relaxed)
    }

    async fn check(&self) -> Result<(), String> {
        match self.link.get().await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("no connection within the connect timeout".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn get(
        &self,
        key: &CacheKey,
        with_ttl: bool,
    ) -> Result<(Cached, Option<i64>), CacheError> {
        let mut c = self.conn_for([key]).await?;
        let before = self.link.errors();
        if with_ttl {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(&key.entry).cmd("PTTL").arg(&key.entry);
            let (v, pttl): (Option<Vec<u8>>, i64) = self.query(&mut c, &pipe).await?;
            self.still_checked(&c, before)?;
            Ok((Cached::from_stored(v), Some(pttl)))
        } else {
            let r = redis::cmd("GET")
                .arg(&key.entry)
                .query_async(&mut c.c)
                .await;
            let v: Option<Vec<u8>> = self.note(c.generation, r)?;
            self.still_checked(&c, before)?;
            Ok((Cached::from_stored(v), None))
        }
    }

    async fn get_many(&self, keys: &[&CacheKey]) -> Result<Vec<Cached>, CacheError> {
        let mut c = self.conn_for(keys.iter().copied()).await?;
        let mut cmd = redis::cmd("MGET");
        for k in keys {
            cmd.arg(&k.entry);
        }
        let before = self.link.errors();
        let r = cmd.query_async(&mut c.c).await;
        let values: Vec<Option<Vec<u8>>> = self.note(c.generation, r)?;
        self.still_checked(&c, before)?;
        Ok(values.into_iter().map(Cached::from_stored).collect())
    }

    async fn peek(&self, key: &CacheKey) -> Result<(Cached, bool), CacheError> {
        let mut c = self.conn_for([key]).await?;
        let mut pipe = redis::pipe();
        pipe.cmd("GET")
            .arg(&key.entry)
            .cmd("EXISTS")
            .arg(&key.lease);
        let before = self.link.errors();
        let (v, held): (Option<Vec<u8>>, bool) = self.query(&mut c, &pipe).await?;
        self.still_checked(&c, before)?;
        Ok((Cached::from_stored(v), held))
    }

    async fn acquire_leases(
        &self,
        leases: &[(&CacheKey, &LeaseToken)],
        ttl: Duration,
    ) -> Result<Vec<(bool, Cached)>, CacheError> {
        let c = self.conn_for(leases.iter().map(|(k, _)| *k)).await?;
        let before = self.link.errors();
        let replies = self
            .grouped(
                &c,
                leases.len(),
                |i| leases[i].0.entry.as_str(),
                |_| 2,
                |pipe, group| {
                    for &i in group {
                        let (key, token) = leases[i];
                        set_lease(pipe, key, token, ttl, true);
                        pipe.cmd("GET").arg(&key.entry);
                    }
                },
            )
            .await?;
        self.still_checked(&c, before)?;
        let mut out = Vec::with_capacity(leases.len());
        let mut it = replies.into_iter();
        while let (Some(won), Some(entry)) = (it.next(), it.next()) {
            out.push((
                !matches!(won, Value::Nil),
                Cached::from_stored(bytes(entry)?),
            ));
        }
        if out.len() != leases.len() {
            return Err(CacheError::Protocol("short pipeline reply".into()));
        }
        Ok(out)
    }

    async fn write_intents(
        &self,
        intents: &[(&CacheKey, &LeaseToken)],
        ttl: Duration,
    ) -> Result<(), CacheError> {
        let c = self.conn_for(intents.iter().map(|(k, _)| *k)).await?;
        self.grouped(
            &c,
            intents.len(),
            |i| intents[i].0.entry.as_str(),
            |_| 0,
            |pipe, group| {
                for &i in group {
                    let (key, token) = intents[i];
                    set_lease(pipe, key, token, ttl, false);
                    pipe.ignore();
                }
            },
        )
        .await
        .map(drop)
    }

    async fn store(
        &self,
        stores: &[StoreCall<'_>],
        evict: &[&CacheKey],
    ) -> Result<Vec<StoreOutcome>, CacheError> {
        let mut c = self.conn_for(stores.iter().map(|s| s.key)).await?;
        if let ([s], []) = (stores, evict) {
            let r = self
                .store
                .key(&s.key.entry)
                .key(&s.key.lease)
                .arg(s.envelope.version.get())
                .arg(&s.envelope.bytes[..])
                .arg(s.ttl.as_millis() as u64)
                .arg(s.intent.map_or("", LeaseToken::as_str))
                .invoke_async::<Value>(&mut c.c)
                .await;
            let reply = self.note(c.generation, r)?;
            return Ok(vec![scripts::store_outcome(&reply)?]);
        }
        // Items: the stores, then the evictions (no reply).
        let n = stores.len();
        let replies = self
            .grouped(
                &c,
                n + evict.len(),
                |i| match stores.get(i) {
                    Some(s) => s.key.entry.as_str(),
                    None => evict[i - n].entry.as_str(),
                },
                |i| usize::from(i < n),
                |pipe, group| {
                    if group.iter().any(|&i| i < n) {
                        load(pipe, scripts::STORE);
                    }
                    for &i in group {
                        match stores.get(i) {
                            Some(s) => {
                                evalsha(pipe, &self.store, &[&s.key.entry, &s.key.lease])
                                    .arg(s.envelope.version.get())
                                    .arg(&s.envelope.bytes[..])
                                    .arg(s.ttl.as_millis() as u64)
                                    .arg(s.intent.map_or("", LeaseToken::as_str));
                            }
                            None => {
                                let key = evict[i - n];
                                pipe.cmd("DEL").arg(&key.entry).arg(&key.lease).ignore();
                            }
                        }
                    }
                },
            )
            .await?;
        replies.iter().map(scripts::store_outcome).collect()
    }

    async fn end_leases(
        &self,
        ends: &[LeaseEnd<'_>],
    ) -> Result<Vec<Option<FillOutcome>>, CacheError> {
        if ends.is_empty() {
            return Ok(vec![]);
        }
        let mut c = self.conn_for(ends.iter().map(LeaseEnd::key)).await?;
        if let [end] = ends {
            let r = match end {
                LeaseEnd::Fill {
                    key,
                    envelope,
                    ttl,
                    token,
                } => {
                    self.fill
                        .key(&key.entry)
                        .key(&key.lease)
                        .arg(envelope.version.get())
                        .arg(&envelope.bytes[..])
                        .arg(ttl.as_millis() as u64)
                        .arg(token.as_str())
                        .invoke_async::<Value>(&mut c.c)
                        .await
                }
                LeaseEnd::Release { key, token } => {
                    self.release
                        .key(&key.lease)
                        .arg(token.as_str())
                        .invoke_async::<Value>(&mut c.c)
                        .await
                }
            };
            let reply = self.note(c.generation, r)?;
            return Ok(vec![match end {
                LeaseEnd::Fill { .. } => Some(scripts::fill_outcome(&reply)?),
                LeaseEnd::Release { .. } => None,
            }]);
        }
        let replies = self
            .grouped(
                &c,
                ends.len(),
                |i| match &ends[i] {
                    LeaseEnd::Fill { key, .. } | LeaseEnd::Release { key, .. } => {
                        key.lease.as_str()
                    }
                },
                |_| 1,
                |pipe, group| {
                    if group
                        .iter()
                        .any(|&i| matches!(ends[i], LeaseEnd::Fill { .. }))
                    {
                        load(pipe, scripts::FILL);
                    }
                    load(pipe, scripts::RELEASE);
                    for &i in group {
                        match &ends[i] {
                            LeaseEnd::Fill {
                                key,
                                envelope,
                                ttl,
                                token,
                            } => {
                                evalsha(pipe, &self.fill, &[&key.entry, &key.lease])
                                    .arg(envelope.version.get())
                                    .arg(&envelope.bytes[..])
                                    .arg(ttl.as_millis() as u64)
                                    .arg(token.as_str());
                            }
                            LeaseEnd::Release { key, token } => {
                                evalsha(pipe, &self.release, &[&key.lease]).arg(token.as_str());
                            }
                        }
                    }
                },
            )
            .await?;
        ends.iter()
            .zip(&replies)
            .map(|(e, r)| match e {
                LeaseEnd::Release { .. } => Ok(None),
                LeaseEnd::Fill { .. } => scripts::fill_outcome(r).map(Some),
            })
            .collect()
    }

    async fn invalidate(
        &self,
        items: &[Invalidation<'_>],
    ) -> Result<Vec<InvalidateOutcome>, CacheError> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        let c = self.conn_for(items.iter().map(|i| i.key)).await?;
        let replies = self
            .grouped(
                &c,
                items.len(),
                |i| items[i].key.entry.as_str(),
                |_| 1,
                |pipe, group| {
                    load(pipe, scripts::INVALIDATE);
                    for &i in group {
                        let (version, inclusive) = scripts::invalidate_args(items[i].stale);
                        let key = items[i].key;
                        evalsha(pipe, &self.invalidate, &[&key.entry, &key.lease])
                            .arg(version)
                            .arg(inclusive);
                    }
                },
            )
            .await?;
        replies.iter().map(scripts::invalidate_outcome).collect()
    }

    async fn evict(&self, keys: &[&CacheKey]) -> Result<(), CacheError> {
        let mut c = self.conn_for(keys.iter().copied()).await?;
        let mut cmd = redis::cmd("DEL");
        for k in keys {
            cmd.arg(&k.entry).arg(&k.lease);
        }
        let r = cmd.query_async::<()>(&mut c.c).await;
        self.note(c.generation, r)
    }

    async fn sweep(&self) -> Result<(), CacheError> {
        let mut c = self.connect().await?;
        let r = epoch::sweep_all(&mut c.c).await;
        self.note(c.generation, r)?;
        self.down_until_ms.store(0, Ordering::Relaxed);
        Ok(())
    }

    async fn repair_evict(&self, key: &CacheKey) -> Result<(), CacheError> {
        let mut c = self.connect().await?;
        if !self.link.serves(&key.entry) {
            return Err(CacheError::KeyUnavailable);
        }
        let r = redis::cmd("DEL")
            .arg(&key.entry)
            .arg(&key.lease)
            .query_async::<()>(&mut c.c)
            .await;
        self.note(c.generation, r)?;
        // Redis answered again: close the down window.
        self.down_until_ms.store(0, Ordering::Relaxed);
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
