//! The read path: Redis first; on a miss, one filler per key in this process (single-flight) and
//! across sidecars (the fill lease), with the fill a compare-and-swap that needs the lease.
//!
//! Freshness rule for single-flight: a reader may only share a flight whose observations (its
//! database read, or its Redis reads while waiting for another filler) begin after the reader
//! arrived. A flight is sealed just before it observes anything; later readers start a new one.
//! Otherwise a reader arriving after a write's acknowledgement could be handed a row read before
//! that write.

use crate::cache::{CacheKey, FillOutcome};
use crate::db::{DbError, Table};
use crate::envelope::Envelope;
use crate::hooks;
use crate::sidecar::{CacheStatus, ReadOutcome, Sidecar};
use crate::write::new_token;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

type FlightResult = Result<ReadOutcome, DbError>;

#[derive(Default)]
pub struct Flight {
    sealed: AtomicBool,
    result: OnceCell<FlightResult>,
}

impl Flight {
    fn seal(&self) {
        self.sealed.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
pub struct Flights {
    by_key: Mutex<HashMap<String, Arc<Flight>>>,
    /// Recent database read time in microseconds, for early refresh (XFetch's delta).
    recompute_us: AtomicU64,
}

impl Flights {
    fn join_or_start(&self, key: &str) -> Arc<Flight> {
        let mut map = self.by_key.lock().unwrap();
        match map.get(key) {
            Some(f) if !f.sealed.load(Ordering::SeqCst) => Arc::clone(f),
            _ => {
                let f = Arc::new(Flight::default());
                map.insert(key.to_string(), Arc::clone(&f));
                f
            }
        }
    }

    fn finish(&self, key: &str, flight: &Arc<Flight>) {
        let mut map = self.by_key.lock().unwrap();
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }

    fn in_flight(&self, key: &str) -> bool {
        self.by_key.lock().unwrap().contains_key(key)
    }
}

impl Sidecar {
    pub async fn read(self: &Arc<Self>, idx: usize, key: &str) -> Result<ReadOutcome, DbError> {
        self.read_at_least(idx, key, None).await
    }

    /// A read that must see at least `min_version` (read-your-writes across requests, e.g. the
    /// ETag of the client's last write). A cached envelope below it is bypassed like a miss: the
    /// usual flight and lease, whose fill replaces the older entry. A value taken from another
    /// filler is only good enough if it meets the minimum; otherwise this reader reads the
    /// database itself, without filling. The answer is what the database has.
    pub async fn read_at_least(
        self: &Arc<Self>,
        idx: usize,
        key: &str,
        min_version: Option<i64>,
    ) -> Result<ReadOutcome, DbError> {
        self.metrics.read_done();
        let m = &self.metrics.entities[idx];
        let ck = CacheKey::new(self.entity_name(idx), key);
        if !self.cache.is_up() || self.repair.contains(&ck) {
            m.bypass.inc();
            return Box::pin(self.read_bypass(idx, key)).await;
        }
        let beta = self.config.cache.early_expiration_beta;
        let cached = if beta > 0.0 {
            self.cache.get_with_ttl(&ck).await
        } else {
            self.cache.get(&ck).await.map(|v| (v, -1))
        };
        match cached {
            Ok((Some(bytes), pttl)) => match Envelope::parse_stored(bytes.into()) {
                Some(env) if meets(min_version, &env) => {
                    m.hit.inc();
                    if pttl > 0 && self.refresh_due(pttl, beta) {
                        self.spawn_refresh(idx, key, &ck);
                    }
                    return Ok(ReadOutcome {
                        envelope: Some(env),
                        status: CacheStatus::Hit,
                    });
                }
                // Older than the client's minimum: a miss; the fill replaces it.
                Some(_) => {}
                // Corrupt or foreign: never served. Evicted, because a value whose version
                // prefix looks newer than the row would make the CAS reject every fill and
                // write of the key until it expires (if ever); an eviction is always safe.
                None => {
                    self.metrics.corrupt_entries.inc();
                    if self.cache.evict(&ck).await.is_err() {
                        self.metrics.redis_errors.inc();
                    }
                }
            },
            Ok((None, _)) => {}
            Err(_) => {
                self.metrics.redis_errors.inc();
                m.bypass.inc();
                return Box::pin(self.read_bypass(idx, key)).await;
            }
        }
        // Boxed: the database and fill states are large (sqlx), and a hit should not carry
        // them in its future, which every request moves around (docs/benchmarks.md).
        Box::pin(self.read_miss(idx, key, ck, min_version)).await
    }

    async fn read_bypass(&self, idx: usize, key: &str) -> Result<ReadOutcome, DbError> {
        let table = self.db.table(idx).await?;
        self.read_db(&table, key, CacheStatus::Bypass).await
    }

    /// Not in Redis (or older than the client's minimum): the flight, the lease, the fill.
    async fn read_miss(
        self: &Arc<Self>,
        idx: usize,
        key: &str,
        ck: CacheKey,
        min_version: Option<i64>,
    ) -> Result<ReadOutcome, DbError> {
        let m = &self.metrics.entities[idx];
        // A hit needs no table: with the database away, cached rows are still served.
        let table = self.db.table(idx).await?;
        m.miss.inc();
        let flight = self.flights.join_or_start(&ck.entry);
        let out = flight
            .result
            .get_or_init(|| self.fill(idx, key, &table, &ck, &flight, min_version))
            .await
            .clone();
        self.flights.finish(&ck.entry, &flight);
        match out {
            // Taken from Redis (another filler's value, possibly for a flight without a minimum):
            // too old for this reader, who reads the database now.
            Ok(ReadOutcome {
                envelope: Some(env),
                status: CacheStatus::Hit,
            }) if !meets(min_version, &env) => self.read_db(&table, key, CacheStatus::Miss).await,
            out => out,
        }
    }

    async fn read_db(
        &self,
        table: &Table,
        key: &str,
        status: CacheStatus,
    ) -> Result<ReadOutcome, DbError> {
        let started = Instant::now();
        let envelope = self.db.read(table, key).await;
        let took = started.elapsed();
        self.metrics.db_read.observe(took.as_secs_f64());
        self.flights
            .recompute_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        Ok(ReadOutcome {
            envelope: envelope?,
            status,
        })
    }

    /// The work of one flight: win the lease and fill, or wait for the winner's fill.
    async fn fill(
        &self,
        idx: usize,
        key: &str,
        table: &Table,
        ck: &CacheKey,
        flight: &Flight,
        min_version: Option<i64>,
    ) -> FlightResult {
        let m = &self.metrics.entities[idx];
        let token = new_token();
        let lease_ttl = Duration::from_millis(self.config.cache.lease_ttl_ms);
        // Sealed before looking: the lease request also reads the entry.
        flight.seal();
        let (won, found) = match self.cache.acquire_lease(ck, &token, lease_ttl).await {
            Ok((won, entry)) => (
                Ok(won),
                entry
                    .and_then(|bytes| Envelope::parse_stored(bytes.into()))
                    .filter(|env| meets(min_version, env)),
            ),
            Err(e) => (Err(e), None),
        };
        if let Some(env) = found {
            // Stored since this reader's miss (a filler that already gave its lease back, or a
            // write): no database read. Without this, such a reader won the lease again and read
            // the database a second time for the same cold key (P4).
            if matches!(won, Ok(true)) && self.cache.release(ck, &token).await.is_err() {
                self.metrics.redis_errors.inc();
            }
            m.fill_waited.inc();
            return Ok(ReadOutcome {
                envelope: Some(env),
                status: CacheStatus::Hit,
            });
        }
        match won {
            Ok(true) => {
                let out = self.read_db(table, key, CacheStatus::Miss).await?;
                self.hooks
                    .hold(hooks::FILL_BEFORE_STORE, self.entity_name(idx), key)
                    .await;
                let ttl = Duration::from_secs(self.config.entities[idx].ttl_seconds);
                let stored = match &out.envelope {
                    Some(env) => self.cache.fill(ck, env, ttl, &token).await.map(Some),
                    None => self.cache.release(ck, &token).await.map(|_| None),
                };
                match stored {
                    Ok(Some(FillOutcome::Stored)) => m.fill_won.inc(),
                    Ok(Some(FillOutcome::LeaseLost)) => m.fill_lost_lease.inc(),
                    Ok(Some(FillOutcome::Stale)) => m.fill_rejected.inc(),
                    Ok(None) => {}
                    Err(_) => self.metrics.redis_errors.inc(),
                }
                Ok(out)
            }
            Ok(false) => {
                if let Some(env) = self.wait_for_fill(ck, min_version).await {
                    m.fill_waited.inc();
                    return Ok(ReadOutcome {
                        envelope: Some(env),
                        status: CacheStatus::Hit,
                    });
                }
                // No fill in time (or the filler found no row): read, but do not fill.
                self.read_db(table, key, CacheStatus::Miss).await
            }
            Err(_) => {
                self.metrics.redis_errors.inc();
                self.read_db(table, key, CacheStatus::Bypass).await
            }
        }
    }

    /// Polls for another filler's value while its lease lives, up to `lease_wait_ms`. A value
    /// below `min_version` is not the one being waited for.
    async fn wait_for_fill(&self, ck: &CacheKey, min_version: Option<i64>) -> Option<Envelope> {
        let deadline = Instant::now() + Duration::from_millis(self.config.cache.lease_wait_ms);
        let mut pause = Duration::from_micros(500);
        while Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(8));
            match self.cache.peek(ck).await {
                Ok((Some(bytes), lease_held)) => {
                    if let Some(env) = Envelope::parse_stored(bytes.into()) {
                        if meets(min_version, &env) {
                            return Some(env);
                        }
                        if !lease_held {
                            return None;
                        }
                    }
                }
                // The filler gave its lease back without a value: nothing to wait for.
                Ok((None, false)) => return None,
                Ok((None, true)) => {}
                Err(_) => {
                    self.metrics.redis_errors.inc();
                    return None;
                }
            }
        }
        None
    }

    /// XFetch: refresh early with a probability that grows as expiry nears, scaled by how long a
    /// database read takes, so one reader refreshes a hot key before it expires.
    fn refresh_due(&self, pttl_ms: i64, beta: f64) -> bool {
        let delta_ms =
            self.flights.recompute_us.load(Ordering::Relaxed).max(1_000) as f64 / 1_000.0;
        let r = fastrand::f64().max(f64::MIN_POSITIVE);
        delta_ms * beta * -r.ln() >= pttl_ms as f64
    }

    fn spawn_refresh(self: &Arc<Self>, idx: usize, key: &str, ck: &CacheKey) {
        if self.flights.in_flight(&ck.entry) {
            return;
        }
        let sc = Arc::clone(self);
        let (key, ck) = (key.to_string(), ck.clone());
        tokio::spawn(async move {
            let Ok(table) = sc.db.table(idx).await else {
                return;
            };
            let flight = sc.flights.join_or_start(&ck.entry);
            let _ = flight
                .result
                .get_or_init(|| sc.fill(idx, &key, &table, &ck, &flight, None))
                .await;
            sc.flights.finish(&ck.entry, &flight);
        });
    }
}

/// Whether a cached envelope (row or tombstone) is at least the version the reader asked for.
fn meets(min_version: Option<i64>, env: &Envelope) -> bool {
    min_version.is_none_or(|min| env.version >= min)
}
