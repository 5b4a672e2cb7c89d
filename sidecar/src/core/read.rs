//! The read path: the cache first; on a miss, one filler per key in this process (single-flight,
//! `flights`) and across sidecars (the fill lease), with the fill a compare-and-swap that needs
//! the lease. The steps shared with bulk reads (`bulk_read.rs`) are here: what a cached value
//! means for a reader, taking leases, ending them.

use super::envelope::Envelope;
use super::flights::FlightResult;
use super::metrics::EntityMetrics;
use super::ports::{CacheKey, CacheStore, FillOutcome, KeyForm, LeaseEnd, LeaseToken, RowStore};
use super::protocol::Protocol;
use super::types::{CacheStatus, Cached, DbError, EntityId, ReadOutcome, Version};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What a reader does with what the cache holds.
pub(crate) enum Lookup {
    /// Serve it.
    Hit(Envelope),
    /// Read the database (absent, or older than the reader's minimum).
    Miss,
    /// Read the database, and evict the value first: never served, because a value whose
    /// version prefix looks newer than the row would make the CAS refuse every fill and write of
    /// the key until it expires (if ever); an eviction is always safe.
    Corrupt,
}

impl Lookup {
    pub(crate) fn of(cached: Cached, min_version: Option<Version>) -> Self {
        match cached {
            Cached::Entry(env) if meets(min_version, &env) => Lookup::Hit(env),
            Cached::Entry(_) | Cached::Absent => Lookup::Miss,
            Cached::Corrupt => Lookup::Corrupt,
        }
    }
}

/// Whether a cached envelope (row or tombstone) is at least the version the reader asked for.
pub(crate) fn meets(min_version: Option<Version>, env: &Envelope) -> bool {
    min_version.is_none_or(|min| env.version >= min)
}

/// A fill lease a flight won, given back if the flight is dropped before it ends the lease (its
/// reader went away during the database read): otherwise the lease outlives the reader until
/// `lease_ttl_ms`, and each flight of the key meanwhile waits for a fill that never comes.
/// Giving it back after a `FILL` that did run changes nothing (`RELEASE` checks the token).
struct WonLease<C: CacheStore, R: RowStore> {
    protocol: Arc<Protocol<C, R>>,
    key: CacheKey,
    token: LeaseToken,
    ended: bool,
}

impl<C: CacheStore, R: RowStore> WonLease<C, R> {
    fn ended(mut self) {
        self.ended = true;
    }
}

impl<C: CacheStore, R: RowStore> Drop for WonLease<C, R> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let p = Arc::clone(&self.protocol);
        let (key, token) = (self.key.clone(), self.token.clone());
        self.protocol.refreshes.spawn(async move {
            let release = LeaseEnd::Release {
                key: &key,
                token: &token,
            };
            if p.cache.end_leases(&[release]).await.is_err() {
                p.metrics.redis_errors.inc();
            }
        });
    }
}

/// Why a flight fills.
#[derive(Clone, Copy, PartialEq)]
enum Fill {
    /// A reader missed: a value found in the cache meanwhile is used as it is.
    Miss,
    /// A hit decided to renew its entry before the TTL ends (XFetch).
    Refresh,
}

pub(crate) fn count_fills(m: &EntityMetrics, outcomes: impl IntoIterator<Item = FillOutcome>) {
    for o in outcomes {
        match o {
            FillOutcome::Stored => m.fill_won.inc(),
            FillOutcome::LeaseLost => m.fill_lost_lease.inc(),
            FillOutcome::Stale => m.fill_rejected.inc(),
        }
    }
}

impl<C: CacheStore, R: RowStore> Protocol<C, R> {
    pub async fn read(
        self: &Arc<Self>,
        entity: EntityId,
        key: &str,
    ) -> Result<ReadOutcome, DbError> {
        self.read_at_least(entity, key, None).await
    }

    /// Whether a key's reads skip the cache: it is away, or the key waits in the repair queue.
    pub(crate) fn bypasses(&self, ck: &CacheKey) -> bool {
        !self.cache.is_up() || self.repair.contains(ck)
    }

    /// A read that must see at least `min_version` (read-your-writes across requests, e.g. the
    /// ETag of the client's last write). A cached envelope below it is bypassed like a miss: the
    /// usual flight and lease, whose fill replaces the older entry. A value taken from another
    /// filler is only good enough if it meets the minimum; otherwise this reader reads the
    /// database itself, without filling. The answer is what the database has.
    pub async fn read_at_least(
        self: &Arc<Self>,
        entity: EntityId,
        key: &str,
        min_version: Option<Version>,
    ) -> Result<ReadOutcome, DbError> {
        self.metrics.read_done();
        let m = self.metrics.entity(entity);
        let key = match self.rows.canonical_key(entity, key).await? {
            KeyForm::Canonical(k) => k,
            KeyForm::Unchecked(k) => {
                return Box::pin(self.read_unchecked(entity, k, min_version)).await;
            }
        };
        let key = key.as_ref();
        let ck = CacheKey::new(self.entity_name(entity), key);
        if self.bypasses(&ck) {
            m.bypass.inc();
            return Box::pin(self.read_db(entity, key, CacheStatus::Bypass)).await;
        }
        let beta = self.config().cache.early_expiration_beta;
        match self.cache.get(&ck, beta > 0.0).await {
            Ok((cached, pttl)) => match Lookup::of(cached, min_version) {
                Lookup::Hit(env) => {
                    m.hit.inc();
                    if let Some(pttl) = pttl
                        && pttl > 0
                        && self.refresh_due(pttl, beta)
                    {
                        self.spawn_refresh(entity, key, &ck);
                    }
                    return Ok(ReadOutcome::hit(env));
                }
                Lookup::Miss => {}
                Lookup::Corrupt => self.evict_corrupt(&[&ck]).await,
            },
            Err(_) => {
                self.metrics.redis_errors.inc();
                m.bypass.inc();
                return Box::pin(self.read_db(entity, key, CacheStatus::Bypass)).await;
            }
        }
        // Boxed: the database and fill states are large, and a hit should not carry them in its
        // future, which every request moves around (docs/benchmarks.md).
        Box::pin(self.read_miss(entity, key, ck, min_version)).await
    }

    /// A key whose canonical spelling is not known yet (the table was never reached): a cached
    /// entry of that name is served (every entry is named canonically, so it is this row's), and
    /// nothing is filled, since the spelling may not be the row's one name.
    async fn read_unchecked(
        &self,
        entity: EntityId,
        key: &str,
        min_version: Option<Version>,
    ) -> Result<ReadOutcome, DbError> {
        let m = self.metrics.entity(entity);
        let ck = CacheKey::new(self.entity_name(entity), key);
        if !self.bypasses(&ck) {
            match self.cache.get(&ck, false).await {
                Ok((cached, _)) => match Lookup::of(cached, min_version) {
                    Lookup::Hit(env) => {
                        m.hit.inc();
                        return Ok(ReadOutcome::hit(env));
                    }
                    Lookup::Miss => {}
                    Lookup::Corrupt => self.evict_corrupt(&[&ck]).await,
                },
                Err(_) => self.metrics.redis_errors.inc(),
            }
        }
        m.bypass.inc();
        self.read_db(entity, key, CacheStatus::Bypass).await
    }

    /// Values that are not envelopes: counted and evicted before any lease is taken.
    pub(crate) async fn evict_corrupt(&self, keys: &[&CacheKey]) {
        self.metrics.corrupt_entries.inc_by(keys.len() as u64);
        if self.cache.evict(keys).await.is_err() {
            self.metrics.redis_errors.inc();
        }
    }

    /// Not in the cache (or older than the client's minimum): the flight, the lease, the fill.
    async fn read_miss(
        self: &Arc<Self>,
        entity: EntityId,
        key: &str,
        ck: CacheKey,
        min_version: Option<Version>,
    ) -> Result<ReadOutcome, DbError> {
        self.metrics.entity(entity).miss.inc();
        let out = self
            .flights
            .share(&ck.entry, || {
                self.fill(entity, key, &ck, min_version, Fill::Miss)
            })
            .await;
        match out {
            // Taken from the cache (another filler's value, possibly for a flight without a
            // minimum): too old for this reader, who reads the database now.
            Ok(ReadOutcome {
                envelope: Some(env),
                status: CacheStatus::Hit,
            }) if !meets(min_version, &env) => self.read_db(entity, key, CacheStatus::Miss).await,
            out => out,
        }
    }

    /// Reads the row from the database, timing it (the early refresh's delta).
    pub(crate) async fn read_db(
        &self,
        entity: EntityId,
        key: &str,
        status: CacheStatus,
    ) -> Result<ReadOutcome, DbError> {
        let started = Instant::now();
        let envelope = self.rows.read(entity, key).await;
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

    /// Takes the fill leases of `keys` (one round trip). Per key: whether the lease was won, and
    /// a usable value found in the cache; `None` when the cache failed.
    pub(crate) async fn take_leases(
        &self,
        leases: &[(&CacheKey, &LeaseToken)],
        min_version: Option<Version>,
    ) -> Option<Vec<(bool, Option<Envelope>)>> {
        let ttl = Duration::from_millis(self.config().cache.lease_ttl_ms);
        match self.cache.acquire_leases(leases, ttl).await {
            Ok(found) => Some(
                found
                    .into_iter()
                    .map(|(won, cached)| {
                        let usable = cached.entry().filter(|env| meets(min_version, env));
                        (won, usable)
                    })
                    .collect(),
            ),
            Err(_) => {
                self.metrics.redis_errors.inc();
                None
            }
        }
    }

    /// Fills (or releases) the leases a reader won, one round trip, and counts the outcomes.
    pub(crate) async fn end_leases(&self, entity: EntityId, ends: &[LeaseEnd<'_>]) {
        if ends.is_empty() {
            return;
        }
        match self.cache.end_leases(ends).await {
            Ok(outcomes) => {
                count_fills(self.metrics.entity(entity), outcomes.into_iter().flatten())
            }
            Err(_) => self.metrics.redis_errors.inc(),
        }
    }

    /// The work of one flight (sealed by now: the lease request also reads the entry): win the
    /// lease and fill, or wait for the winner's fill.
    async fn fill(
        self: &Arc<Self>,
        entity: EntityId,
        key: &str,
        ck: &CacheKey,
        min_version: Option<Version>,
        purpose: Fill,
    ) -> FlightResult {
        let m = self.metrics.entity(entity);
        let token = LeaseToken::new();
        let taken = self
            .take_leases(&[(ck, &token)], min_version)
            .await
            .and_then(|mut v| v.pop());
        let Some((won, found)) = taken else {
            return self.read_db(entity, key, CacheStatus::Bypass).await;
        };
        // An early refresh that won the lease reads and fills although the entry is there: that
        // entry is what it renews.
        if let Some(env) = found.filter(|_| !(won && purpose == Fill::Refresh)) {
            // Stored since this reader's miss (a filler that already gave its lease back, or a
            // write): no database read. Without this, such a reader won the lease again and read
            // the database a second time for the same cold key (P4).
            if won {
                self.end_leases(
                    entity,
                    &[LeaseEnd::Release {
                        key: ck,
                        token: &token,
                    }],
                )
                .await;
            }
            m.fill_waited.inc();
            return Ok(ReadOutcome::hit(env));
        }
        if won {
            let lease = WonLease {
                protocol: Arc::clone(self),
                key: ck.clone(),
                token: token.clone(),
                ended: false,
            };
            let out = match self.read_db(entity, key, CacheStatus::Miss).await {
                Ok(out) => out,
                Err(e) => {
                    // Let other readers try the database themselves without waiting.
                    self.end_leases(
                        entity,
                        &[LeaseEnd::Release {
                            key: ck,
                            token: &token,
                        }],
                    )
                    .await;
                    lease.ended();
                    return Err(e);
                }
            };
            let ttl = Duration::from_secs(self.config().entities[entity.index()].ttl_seconds);
            let end = match &out.envelope {
                Some(envelope) => LeaseEnd::Fill {
                    key: ck,
                    envelope,
                    ttl,
                    token: &token,
                },
                None => LeaseEnd::Release {
                    key: ck,
                    token: &token,
                },
            };
            self.end_leases(entity, &[end]).await;
            lease.ended();
            return Ok(out);
        }
        if let Some(env) = self.wait_for_fill(ck, min_version).await {
            m.fill_waited.inc();
            return Ok(ReadOutcome::hit(env));
        }
        // No fill in time (or the filler found no row): read, but do not fill.
        self.read_db(entity, key, CacheStatus::Miss).await
    }

    /// Polls for another filler's value while its lease lives, up to `lease_wait_ms`. A value
    /// below `min_version` is not the one being waited for.
    async fn wait_for_fill(&self, ck: &CacheKey, min_version: Option<Version>) -> Option<Envelope> {
        let deadline = Instant::now() + Duration::from_millis(self.config().cache.lease_wait_ms);
        let mut pause = Duration::from_micros(500);
        while Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(8));
            match self.cache.peek(ck).await {
                Ok((Cached::Entry(env), lease_held)) => {
                    if meets(min_version, &env) {
                        return Some(env);
                    }
                    if !lease_held {
                        return None;
                    }
                }
                // A corrupt value is evicted by the next reader's miss; keep waiting.
                Ok((Cached::Corrupt, _)) => {}
                // The filler gave its lease back without a value: nothing to wait for.
                Ok((Cached::Absent, false)) => return None,
                Ok((Cached::Absent, true)) => {}
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

    /// One refresh per key at a time: hits that also decide to refresh while it is in flight
    /// (or while readers of the key wait) do nothing, here or in the task.
    fn spawn_refresh(self: &Arc<Self>, entity: EntityId, key: &str, ck: &CacheKey) {
        if self.flights.in_flight(&ck.entry) || self.refreshes.is_closed() {
            return;
        }
        let p = Arc::clone(self);
        let (key, ck) = (key.to_string(), ck.clone());
        self.refreshes.spawn(async move {
            let _ = p
                .flights
                .share_if_idle(&ck.entry, || p.fill(entity, &key, &ck, None, Fill::Refresh))
                .await;
        });
    }
}
