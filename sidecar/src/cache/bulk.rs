//! Redis calls of batches and bulk reads: each is ONE pipelined round trip, whatever the number
//! of keys. Script calls in a pipeline are `EVALSHA`, which does not fall back to `EVAL` on
//! `NOSCRIPT`; so each pipeline that calls a script starts with `SCRIPT LOAD` of it. Redis runs a
//! connection's commands in order, so the script is there when the `EVALSHA`s run, in the same
//! round trip (loading a loaded script only hashes it again).

use super::{Cache, CacheError, CacheKey, FillOutcome, StoreOutcome};
use crate::envelope::Envelope;
use redis::{Pipeline, Script, Value};
use std::time::Duration;

/// One cache step of a batch: `STORE` of a committed write.
pub struct StoreCall<'a> {
    pub key: &'a CacheKey,
    pub envelope: &'a Envelope,
    pub ttl: Duration,
    pub intent: Option<&'a str>,
}

/// What a bulk read does after its database read, per key that won its lease.
pub enum LeaseEnd<'a> {
    /// `FILL` with the row just read.
    Fill {
        key: &'a CacheKey,
        envelope: &'a Envelope,
        ttl: Duration,
        token: &'a str,
    },
    /// Give the lease back without a value (no row, or a value was found in Redis).
    Release { key: &'a CacheKey, token: &'a str },
}

fn load(pipe: &mut Pipeline, code: &str) {
    pipe.cmd("SCRIPT").arg("LOAD").arg(code).ignore();
}

/// A script's text reply.
fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// Appends `EVALSHA` of `script` with `keys`; the caller adds the arguments.
fn evalsha<'p>(pipe: &'p mut Pipeline, script: &Script, keys: &[&str]) -> &'p mut Pipeline {
    let p = pipe.cmd("EVALSHA").arg(script.get_hash()).arg(keys.len());
    for k in keys {
        p.arg(*k);
    }
    p
}

impl Cache {
    /// The write intents of many keys (`SET lease token PX ttl` each), one round trip.
    pub async fn write_intents(
        &self,
        intents: &[(&CacheKey, &str)],
        ttl: Duration,
    ) -> Result<(), CacheError> {
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        for (key, token) in intents {
            pipe.cmd("SET")
                .arg(&key.lease)
                .arg(*token)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .ignore();
        }
        self.note(c.generation, pipe.query_async::<()>(&mut c.c).await)
    }

    /// Gives back intents of writes that did not commit (`RELEASE` each), one round trip.
    pub async fn release_many(&self, leases: &[(&CacheKey, &str)]) -> Result<(), CacheError> {
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        load(&mut pipe, self.code.release);
        for (key, token) in leases {
            evalsha(&mut pipe, &self.release, &[&key.lease])
                .arg(*token)
                .ignore();
        }
        self.note(c.generation, pipe.query_async::<()>(&mut c.c).await)
    }

    /// The cache steps of a committed batch (`STORE` each, in order) and the eviction of
    /// `evict` (entry and lease), in one round trip. The outcomes are in the order of `stores`.
    pub async fn store_many(
        &self,
        stores: &[StoreCall<'_>],
        evict: &[&CacheKey],
    ) -> Result<Vec<StoreOutcome>, CacheError> {
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        if !stores.is_empty() {
            load(&mut pipe, self.code.store);
        }
        for s in stores {
            evalsha(&mut pipe, &self.store, &[&s.key.entry, &s.key.lease])
                .arg(s.envelope.version)
                .arg(&s.envelope.bytes[..])
                .arg(s.ttl.as_millis() as u64)
                .arg(s.intent.unwrap_or(""));
        }
        for key in evict {
            pipe.cmd("DEL").arg(&key.entry).arg(&key.lease).ignore();
        }
        if pipe.is_empty() {
            return Ok(vec![]);
        }
        let replies: Vec<String> = self.note(c.generation, pipe.query_async(&mut c.c).await)?;
        replies
            .iter()
            .map(|r| match r.as_str() {
                "stored" => Ok(StoreOutcome::Stored),
                "stale" => Ok(StoreOutcome::Stale),
                "skipped" => Ok(StoreOutcome::Skipped),
                other => Err(CacheError::Protocol(other.to_string())),
            })
            .collect()
    }

    /// `MGET` of many entries, one round trip.
    pub async fn get_many(&self, keys: &[&CacheKey]) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
        let mut c = self.conn().await?;
        let mut cmd = redis::cmd("MGET");
        for k in keys {
            cmd.arg(&k.entry);
        }
        self.note(c.generation, cmd.query_async(&mut c.c).await)
    }

    /// Removes many entries and their leases (`DEL`), one round trip: always safe, as `evict`.
    pub async fn evict_many(&self, keys: &[&CacheKey]) -> Result<(), CacheError> {
        let mut c = self.conn().await?;
        let mut cmd = redis::cmd("DEL");
        for k in keys {
            cmd.arg(&k.entry).arg(&k.lease);
        }
        self.note(c.generation, cmd.query_async::<()>(&mut c.c).await)
    }

    /// Tries to become the filler of many empty slots (`SET lease token NX PX`), reading each
    /// entry right after its `SET NX` (as `acquire_lease` does), one round trip. Per key: whether
    /// the lease was won, and the entry found.
    pub async fn acquire_leases(
        &self,
        leases: &[(&CacheKey, &str)],
        ttl: Duration,
    ) -> Result<Vec<(bool, Option<Vec<u8>>)>, CacheError> {
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        for (key, token) in leases {
            pipe.cmd("SET")
                .arg(&key.lease)
                .arg(*token)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .cmd("GET")
                .arg(&key.entry);
        }
        let replies: Vec<Value> = self.note(c.generation, pipe.query_async(&mut c.c).await)?;
        let mut out = Vec::with_capacity(leases.len());
        let mut it = replies.into_iter();
        while let (Some(won), Some(entry)) = (it.next(), it.next()) {
            let entry = match entry {
                Value::Nil => None,
                Value::BulkString(b) => Some(b),
                other => return Err(CacheError::Protocol(format!("{other:?}"))),
            };
            out.push((!matches!(won, Value::Nil), entry));
        }
        if out.len() != leases.len() {
            return Err(CacheError::Protocol("short pipeline reply".into()));
        }
        Ok(out)
    }

    /// The fills (and lease releases) of a bulk read, one round trip. `None` for a release.
    pub async fn end_leases(
        &self,
        ends: &[LeaseEnd<'_>],
    ) -> Result<Vec<Option<FillOutcome>>, CacheError> {
        if ends.is_empty() {
            return Ok(vec![]);
        }
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        load(&mut pipe, self.code.fill);
        load(&mut pipe, self.code.release);
        for e in ends {
            match e {
                LeaseEnd::Fill {
                    key,
                    envelope,
                    ttl,
                    token,
                } => {
                    evalsha(&mut pipe, &self.fill, &[&key.entry, &key.lease])
                        .arg(envelope.version)
                        .arg(&envelope.bytes[..])
                        .arg(ttl.as_millis() as u64)
                        .arg(*token);
                }
                LeaseEnd::Release { key, token } => {
                    evalsha(&mut pipe, &self.release, &[&key.lease]).arg(*token);
                }
            }
        }
        let replies: Vec<Value> = self.note(c.generation, pipe.query_async(&mut c.c).await)?;
        ends.iter()
            .zip(replies)
            .map(|(e, r)| match (e, text(&r)) {
                (LeaseEnd::Release { .. }, _) => Ok(None),
                (LeaseEnd::Fill { .. }, Some("stored")) => Ok(Some(FillOutcome::Stored)),
                (LeaseEnd::Fill { .. }, Some("lease_lost")) => Ok(Some(FillOutcome::LeaseLost)),
                (LeaseEnd::Fill { .. }, Some("stale")) => Ok(Some(FillOutcome::Stale)),
                (LeaseEnd::Fill { .. }, _) => Err(CacheError::Protocol(format!("{r:?}"))),
            })
            .collect()
    }
}
