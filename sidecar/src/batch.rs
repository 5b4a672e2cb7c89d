//! Batches of writes and bulk reads. No HTTP here: `api.rs` decodes requests into these calls.
//!
//! A batch is the write protocol of `write.rs` for many keys at once:
//! 1. The write intents of all its keys, in one pipelined Redis round trip.
//! 2. One database transaction with one statement per write, run in the order of the keys'
//!    advisory lock ids (so that concurrent batches cannot deadlock): all commit, or none.
//! 3. One pipelined round trip with every `STORE` (in the batch's order) and the `DEL`s of the
//!    keys to invalidate, retried as a whole within the retry budget (`STORE` and `DEL` may run
//!    twice without harm). Still failing: every key of the batch enters the repair queue.
//!
//! A bulk read is the read path for many keys of one entity: one `MGET`; for the misses, the
//! fill leases taken (`SET NX`, each followed by a `GET` of the entry) in one round trip BEFORE
//! one database read of all of them; then the fills of the keys whose lease was won, in one
//! round trip. It joins no single-flight and does not wait for other fillers: a key whose lease
//! another reader holds is read from the database without filling.

use crate::cache::bulk::{LeaseEnd, StoreCall};
use crate::cache::{CacheKey, FillOutcome};
use crate::db::{BatchFailure, BatchOp, BatchStatement, BodyError, DbError, Table};
use crate::envelope::Envelope;
use crate::hooks;
use crate::sidecar::{CacheStatus, ReadOutcome, Sidecar};
use crate::write::new_token;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One write of a batch.
#[derive(Debug, Clone)]
pub struct BatchWrite {
    /// Entity index.
    pub idx: usize,
    pub key: String,
    pub op: WriteOp,
    pub if_match: Option<i64>,
}

#[derive(Debug, Clone)]
pub enum WriteOp {
    /// The JSON object of column values, and its text.
    Put {
        body: Map<String, Value>,
        raw: String,
    },
    Delete,
}

#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub writes: Vec<BatchWrite>,
    /// Further cache keys to evict after the commit: (entity index, key).
    pub invalidate: Vec<(usize, String)>,
}

/// One committed write of a batch.
#[derive(Debug, Clone)]
pub struct BatchResult {
    pub idx: usize,
    pub key: String,
    pub envelope: Envelope,
    pub created: bool,
}

#[derive(Debug, Clone)]
pub struct BatchOutcome {
    /// In the order of the batch's writes.
    pub results: Vec<BatchResult>,
    /// `Ok` or `Repairing`, for the whole batch.
    pub status: CacheStatus,
}

/// Why nothing of a batch was committed (or, for `Db` with an unknown outcome, maybe all of it).
/// `index` is the position of the write in the batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    #[error("writes {first} and {index} are for the same key")]
    DuplicateKey { first: usize, index: usize },
    #[error("{error}")]
    Body { index: usize, error: BodyError },
    #[error("{error}")]
    ItemDb { index: usize, error: DbError },
    #[error("If-Match does not hold")]
    PreconditionFailed { index: usize, current: Option<i64> },
    #[error("no row with this key")]
    NotFound { index: usize },
    #[error("{0}")]
    Db(DbError),
}

impl Sidecar {
    /// Commits all writes of `batch` in one transaction, then caches them in one round trip.
    pub async fn write_batch(&self, batch: &Batch) -> Result<BatchOutcome, BatchError> {
        let mut seen: HashMap<(usize, &str), usize> = HashMap::new();
        for (i, w) in batch.writes.iter().enumerate() {
            self.metrics.write_done();
            if let Some(first) = seen.insert((w.idx, &w.key), i) {
                self.metrics.entities[w.idx].write_rejected.inc();
                return Err(BatchError::DuplicateKey { first, index: i });
            }
        }
        let mut tables: HashMap<usize, Arc<Table>> = HashMap::new();
        for w in &batch.writes {
            if let Entry::Vacant(e) = tables.entry(w.idx) {
                e.insert(self.db.table(w.idx).await.map_err(BatchError::Db)?);
            }
        }
        let mut statements = Vec::with_capacity(batch.writes.len());
        for (i, w) in batch.writes.iter().enumerate() {
            let table = &tables[&w.idx];
            let op = match &w.op {
                WriteOp::Put { body, raw } => {
                    let columns = table.check_body(body, &w.key).map_err(|error| {
                        self.metrics.entities[w.idx].write_rejected.inc();
                        BatchError::Body { index: i, error }
                    })?;
                    BatchOp::Put { body: raw, columns }
                }
                WriteOp::Delete => BatchOp::Delete,
            };
            statements.push(BatchStatement {
                table,
                key: &w.key,
                op,
                if_match: w.if_match,
            });
        }
        let keys: Vec<CacheKey> = batch
            .writes
            .iter()
            .map(|w| CacheKey::new(self.entity_name(w.idx), &w.key))
            .collect();
        let intents = self.take_intents(&keys).await;

        let started = Instant::now();
        let result = self.db.write_batch(&statements).await;
        self.metrics
            .db_write
            .observe(started.elapsed().as_secs_f64());
        let committed = match result {
            Ok(c) => c,
            Err(failure) => return Err(self.batch_failed(batch, &keys, &intents, failure).await),
        };

        let invalidate: Vec<CacheKey> = batch
            .invalidate
            .iter()
            .map(|(idx, key)| CacheKey::new(self.entity_name(*idx), key))
            .collect();
        let stores: Vec<StoreCall<'_>> = committed
            .iter()
            .zip(&keys)
            .zip(&intents)
            .zip(&batch.writes)
            .map(|(((c, key), intent), w)| StoreCall {
                key,
                envelope: &c.envelope,
                ttl: if c.envelope.deleted {
                    Duration::from_secs(self.config.cache.tombstone_ttl_seconds)
                } else {
                    Duration::from_secs(self.config.entities[w.idx].ttl_seconds)
                },
                intent: intent.as_deref(),
            })
            .collect();
        for w in &batch.writes {
            self.hooks
                .hold(
                    hooks::WRITE_BEFORE_CACHE_STEP,
                    self.entity_name(w.idx),
                    &w.key,
                )
                .await;
        }
        let status = if stores.is_empty() && invalidate.is_empty() {
            CacheStatus::Ok
        } else {
            self.batch_cache_step(&stores, &invalidate).await
        };
        for w in &batch.writes {
            let m = &self.metrics.entities[w.idx];
            match status {
                CacheStatus::Ok => {
                    m.write_ok.inc();
                    self.sampler.record(w.idx, &w.key);
                }
                _ => m.write_repairing.inc(),
            }
        }
        if status == CacheStatus::Repairing {
            for key in keys.iter().chain(&invalidate) {
                self.repair.push(key, &self.metrics);
            }
        }
        let results = committed
            .into_iter()
            .zip(&batch.writes)
            .map(|(c, w)| BatchResult {
                idx: w.idx,
                key: w.key.clone(),
                envelope: c.envelope,
                created: c.created,
            })
            .collect();
        Ok(BatchOutcome { results, status })
    }

    /// The write intents of all keys, one round trip. A key under repair gets none, and with
    /// Redis away none does (as in `write.rs`: such a write never fills an empty slot).
    async fn take_intents(&self, keys: &[CacheKey]) -> Vec<Option<String>> {
        if !self.cache.is_up() {
            return vec![None; keys.len()];
        }
        let tokens: Vec<Option<String>> = keys
            .iter()
            .map(|k| (!self.repair.contains(k)).then(new_token))
            .collect();
        let intents: Vec<(&CacheKey, &str)> = keys
            .iter()
            .zip(&tokens)
            .filter_map(|(k, t)| t.as_deref().map(|t| (k, t)))
            .collect();
        if intents.is_empty() {
            return tokens;
        }
        let ttl = Duration::from_millis(self.config.cache.lease_ttl_ms);
        self.metrics.round_trip("batch_intents");
        match self.cache.write_intents(&intents, ttl).await {
            Ok(()) => tokens,
            Err(_) => {
                self.metrics.redis_errors.inc();
                vec![None; keys.len()]
            }
        }
    }

    async fn batch_failed(
        &self,
        batch: &Batch,
        keys: &[CacheKey],
        intents: &[Option<String>],
        failure: BatchFailure,
    ) -> BatchError {
        let entity = |i: usize| &self.metrics.entities[batch.writes[i].idx];
        if let BatchFailure::Db {
            error,
            at_commit: true,
            ..
        } = &failure
            && error.outcome_unknown()
        {
            // The commit may have happened: whatever the cache holds for these keys may be stale.
            for (i, key) in keys.iter().enumerate() {
                entity(i).write_failed.inc();
                self.repair.push(key, &self.metrics);
            }
            return BatchError::Db(error.clone());
        }
        // Rolled back: let readers fill again without waiting for the intents to expire.
        let leases: Vec<(&CacheKey, &str)> = keys
            .iter()
            .zip(intents)
            .filter_map(|(k, t)| t.as_deref().map(|t| (k, t)))
            .collect();
        if !leases.is_empty() {
            self.metrics.round_trip("batch_release");
            if self.cache.release_many(&leases).await.is_err() {
                self.metrics.redis_errors.inc();
            }
        }
        match failure {
            BatchFailure::Precondition { index, current } => {
                entity(index).write_precondition_failed.inc();
                BatchError::PreconditionFailed { index, current }
            }
            BatchFailure::NotFound { index } => {
                entity(index).write_rejected.inc();
                BatchError::NotFound { index }
            }
            BatchFailure::Db {
                index: Some(index),
                error,
                ..
            } => {
                entity(index).write_rejected.inc();
                BatchError::ItemDb { index, error }
            }
            BatchFailure::Db { error, .. } => BatchError::Db(error),
        }
    }

    /// Every `STORE` and eviction in one round trip, retried as a whole within the budget.
    async fn batch_cache_step(&self, stores: &[StoreCall<'_>], evict: &[CacheKey]) -> CacheStatus {
        let evict: Vec<&CacheKey> = evict.iter().collect();
        let stored = self
            .cache_step_with_retries(|| {
                if self.cache.is_up() {
                    self.metrics.round_trip("batch_store");
                }
                self.cache.store_many(stores, &evict)
            })
            .await;
        if stored {
            CacheStatus::Ok
        } else {
            CacheStatus::Repairing
        }
    }

    /// Reads many keys of entity `idx`; the answer is in the order of `keys` (a key given twice
    /// is looked up once and answered twice).
    pub async fn read_many(
        &self,
        idx: usize,
        keys: &[String],
    ) -> Result<Vec<ReadOutcome>, DbError> {
        let m = &self.metrics.entities[idx];
        let mut unique: Vec<&str> = Vec::new();
        let mut position: HashMap<&str, usize> = HashMap::new();
        let slots: Vec<usize> = keys
            .iter()
            .map(|k| {
                self.metrics.read_done();
                *position.entry(k.as_str()).or_insert_with(|| {
                    unique.push(k);
                    unique.len() - 1
                })
            })
            .collect();
        let cks: Vec<CacheKey> = unique
            .iter()
            .map(|k| CacheKey::new(self.entity_name(idx), k))
            .collect();
        let mut out: Vec<Option<ReadOutcome>> = vec![None; unique.len()];
        // Keys to read from the database, and whether this reader may fill them (its lease).
        let mut bypass: Vec<usize> = Vec::new();
        let mut misses: Vec<usize> = Vec::new();
        let via_cache: Vec<usize> = (0..unique.len())
            .filter(|&i| {
                let skip = !self.cache.is_up() || self.repair.contains(&cks[i]);
                if skip {
                    bypass.push(i);
                }
                !skip
            })
            .collect();
        if !via_cache.is_empty() {
            self.metrics.round_trip("bulk_get");
            let refs: Vec<&CacheKey> = via_cache.iter().map(|&i| &cks[i]).collect();
            match self.cache.get_many(&refs).await {
                Ok(values) => {
                    let mut corrupt: Vec<&CacheKey> = Vec::new();
                    for (&i, value) in via_cache.iter().zip(values) {
                        let Some(bytes) = value else {
                            misses.push(i);
                            continue;
                        };
                        match Envelope::parse_stored(bytes.into()) {
                            Some(env) => {
                                m.hit.inc();
                                out[i] = Some(hit(env));
                            }
                            None => {
                                corrupt.push(&cks[i]);
                                misses.push(i);
                            }
                        }
                    }
                    // Not envelopes: never served, and evicted before the leases (as a single
                    // read does), or a newer-looking version prefix would refuse every fill.
                    if !corrupt.is_empty() {
                        self.metrics.corrupt_entries.inc_by(corrupt.len() as u64);
                        self.metrics.round_trip("bulk_evict");
                        if self.cache.evict_many(&corrupt).await.is_err() {
                            self.metrics.redis_errors.inc();
                        }
                    }
                }
                Err(_) => {
                    self.metrics.redis_errors.inc();
                    bypass.extend(&via_cache);
                }
            }
        }
        m.bypass.inc_by(bypass.len() as u64);
        // The leases, before the database read.
        let tokens: Vec<String> = misses.iter().map(|_| new_token()).collect();
        let mut won: Vec<(usize, &str)> = Vec::new();
        let mut to_read: Vec<usize> = bypass.clone();
        if !misses.is_empty() {
            let leases: Vec<(&CacheKey, &str)> = misses
                .iter()
                .zip(&tokens)
                .map(|(&i, t)| (&cks[i], t.as_str()))
                .collect();
            let ttl = Duration::from_millis(self.config.cache.lease_ttl_ms);
            self.metrics.round_trip("bulk_leases");
            match self.cache.acquire_leases(&leases, ttl).await {
                Ok(replies) => {
                    for ((&i, token), (got, entry)) in misses.iter().zip(&tokens).zip(replies) {
                        if got {
                            won.push((i, token));
                        }
                        // Stored since the MGET (another filler, or a write): no database read.
                        match entry.and_then(|b| Envelope::parse_stored(b.into())) {
                            Some(env) => {
                                m.fill_waited.inc();
                                out[i] = Some(hit(env));
                            }
                            None => {
                                m.miss.inc();
                                to_read.push(i);
                            }
                        }
                    }
                }
                Err(_) => {
                    self.metrics.redis_errors.inc();
                    for &i in &misses {
                        m.bypass.inc();
                        bypass.push(i);
                        to_read.push(i);
                    }
                }
            }
        }
        let mut read: HashMap<usize, Option<Envelope>> = HashMap::new();
        if !to_read.is_empty() {
            let result = async {
                let table = self.db.table(idx).await?;
                let ks: Vec<&str> = to_read.iter().map(|&i| unique[i]).collect();
                let started = Instant::now();
                let rows = self.db.read_many(&table, &ks).await;
                self.metrics
                    .db_read
                    .observe(started.elapsed().as_secs_f64());
                rows
            }
            .await;
            match result {
                Ok(rows) => read = to_read.iter().copied().zip(rows).collect(),
                Err(e) => {
                    let ends: Vec<LeaseEnd<'_>> = won
                        .iter()
                        .map(|&(i, token)| LeaseEnd::Release {
                            key: &cks[i],
                            token,
                        })
                        .collect();
                    self.end_leases(&ends).await;
                    return Err(e);
                }
            }
        }
        for &(i, _) in &won {
            if matches!(read.get(&i), Some(Some(_))) {
                self.hooks
                    .hold(hooks::FILL_BEFORE_STORE, self.entity_name(idx), unique[i])
                    .await;
            }
        }
        // Fill what this reader holds the lease of; give back the other leases.
        let ttl = Duration::from_secs(self.config.entities[idx].ttl_seconds);
        let ends: Vec<LeaseEnd<'_>> = won
            .iter()
            .map(|&(i, token)| match read.get(&i) {
                Some(Some(envelope)) => LeaseEnd::Fill {
                    key: &cks[i],
                    envelope,
                    ttl,
                    token,
                },
                _ => LeaseEnd::Release {
                    key: &cks[i],
                    token,
                },
            })
            .collect();
        if let Some(outcomes) = self.end_leases(&ends).await {
            for o in outcomes.into_iter().flatten() {
                match o {
                    FillOutcome::Stored => m.fill_won.inc(),
                    FillOutcome::LeaseLost => m.fill_lost_lease.inc(),
                    FillOutcome::Stale => m.fill_rejected.inc(),
                }
            }
        }
        let bypassed: std::collections::HashSet<usize> = bypass.into_iter().collect();
        for (i, envelope) in read {
            let status = if bypassed.contains(&i) {
                CacheStatus::Bypass
            } else {
                CacheStatus::Miss
            };
            out[i] = Some(ReadOutcome { envelope, status });
        }
        let out: Vec<ReadOutcome> = out
            .into_iter()
            .map(|o| o.ok_or(DbError::Internal))
            .collect::<Result<_, _>>()?;
        Ok(slots.into_iter().map(|s| out[s].clone()).collect())
    }

    async fn end_leases(&self, ends: &[LeaseEnd<'_>]) -> Option<Vec<Option<FillOutcome>>> {
        if ends.is_empty() {
            return Some(vec![]);
        }
        self.metrics.round_trip("bulk_fills");
        match self.cache.end_leases(ends).await {
            Ok(o) => Some(o),
            Err(_) => {
                self.metrics.redis_errors.inc();
                None
            }
        }
    }
}

fn hit(env: Envelope) -> ReadOutcome {
    ReadOutcome {
        envelope: Some(env),
        status: CacheStatus::Hit,
    }
}

/// The answer's `X-Wtc-Cache` for many keys: `hit` when all came from Redis, `bypass` when any
/// skipped it, else `miss`.
pub fn summary(outcomes: &[ReadOutcome]) -> CacheStatus {
    if outcomes.iter().any(|o| o.status == CacheStatus::Bypass) {
        CacheStatus::Bypass
    } else if outcomes.iter().all(|o| o.status == CacheStatus::Hit) {
        CacheStatus::Hit
    } else {
        CacheStatus::Miss
    }
}
