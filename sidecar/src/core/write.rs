//! The write path, for one write and for a batch alike (a single write is a batch of one):
//!
//! 1. Every write checked by the row store (`prepare`) before anything touches the cache.
//! 2. The write intents of all keys, one round trip (revokes fillers that may have read the old
//!    rows).
//! 3. Commit: one statement per write (one transaction for several, statements in the order of
//!    the keys' advisory lock ids, so that concurrent batches cannot deadlock), each assigning a
//!    new version. From here the writes are durable and never reported as failed because of the
//!    cache.
//! 4. Cache step: every `STORE` (set if newer, TTL, lease revoked) and the evictions of the keys to
//!    invalidate, one round trip, retried as a whole with exponential backoff and full jitter
//!    within the budget (`STORE` and `DEL` may run twice without harm).
//! 5. Still failing: every key goes to the repair queue and the answer says `repairing`.

use super::envelope::Envelope;
use super::ports::{
    CacheKey, CacheStore, CommitFailure, KeyForm, LeaseToken, PrepareError, RowStore, StoreCall,
};
use super::protocol::Protocol;
use super::types::{
    Batch, BatchError, BatchOutcome, CacheStatus, Condition, DbError, EntityId, Write, WriteError,
    WriteOp, WriteOutcome,
};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Whether a write's Redis round trips are counted in `wtc_redis_round_trips_total` (batches
/// only: single requests are one round trip per step by construction).
#[derive(Clone, Copy, PartialEq)]
enum Trips {
    Counted,
    Uncounted,
}

impl<C: CacheStore, R: RowStore> Protocol<C, R> {
    /// Upserts the fields of `body` (a JSON object; `raw` is its text).
    pub async fn put(
        &self,
        entity: EntityId,
        key: &str,
        body: Map<String, Value>,
        raw: String,
        condition: Condition,
    ) -> Result<WriteOutcome, WriteError> {
        let op = WriteOp::Put { body, raw };
        self.write_one(entity, key, op, condition).await
    }

    /// Deletes the row and leaves a tombstone with a fresh version in the cache.
    pub async fn delete(
        &self,
        entity: EntityId,
        key: &str,
        condition: Condition,
    ) -> Result<WriteOutcome, WriteError> {
        self.write_one(entity, key, WriteOp::Delete, condition)
            .await
    }

    async fn write_one(
        &self,
        entity: EntityId,
        key: &str,
        op: WriteOp,
        condition: Condition,
    ) -> Result<WriteOutcome, WriteError> {
        let batch = Batch {
            writes: vec![Write {
                entity,
                key: key.to_string(),
                op,
                condition,
            }],
            invalidate: vec![],
        };
        match Box::pin(self.write(&batch, Trips::Uncounted)).await {
            Ok(BatchOutcome {
                mut results,
                status,
            }) => {
                let c = results.pop().ok_or(DbError::Internal)?;
                Ok(WriteOutcome::Committed {
                    envelope: c.envelope,
                    created: c.created,
                    status,
                })
            }
            Err(BatchError::NotFound { .. }) => Ok(WriteOutcome::NotFound),
            Err(BatchError::PreconditionFailed { current, .. }) => {
                Ok(WriteOutcome::PreconditionFailed { current })
            }
            Err(BatchError::Body { error, .. }) => Err(WriteError::Body(error)),
            Err(BatchError::Db { error, .. }) => Err(WriteError::Db(error)),
            Err(BatchError::DuplicateKey { .. }) => Err(WriteError::Db(DbError::Internal)),
        }
    }

    /// Commits all writes of `batch` in one transaction, then caches them in one round trip.
    pub async fn write_batch(&self, batch: &Batch) -> Result<BatchOutcome, BatchError> {
        self.write(batch, Trips::Counted).await
    }

    async fn write(&self, batch: &Batch, trips: Trips) -> Result<BatchOutcome, BatchError> {
        // One row, one spelling: every key in its canonical form before it names anything.
        let mut canonical: Vec<String> = Vec::with_capacity(batch.writes.len());
        for (index, w) in batch.writes.iter().enumerate() {
            self.metrics.write_done();
            match self.rows.canonical_key(w.entity, &w.key).await {
                Ok(KeyForm::Canonical(k)) => canonical.push(k.into_owned()),
                // The table was never reached: neither is the database now.
                Ok(KeyForm::Unchecked(_)) => {
                    return Err(BatchError::Db {
                        index: None,
                        error: DbError::Unavailable,
                    });
                }
                Err(error) => {
                    if matches!(error, DbError::BadKey(_)) {
                        self.metrics.entity(w.entity).write_rejected.inc();
                    }
                    return Err(BatchError::Db {
                        index: Some(index),
                        error,
                    });
                }
            }
        }
        let mut seen: HashMap<(EntityId, &str), usize> = HashMap::new();
        for (i, (w, key)) in batch.writes.iter().zip(&canonical).enumerate() {
            if let Some(first) = seen.insert((w.entity, key), i) {
                self.metrics.entity(w.entity).write_rejected.inc();
                return Err(BatchError::DuplicateKey { first, index: i });
            }
        }
        let mut invalidate: Vec<CacheKey> = Vec::with_capacity(batch.invalidate.len());
        for (i, (entity, key)) in batch.invalidate.iter().enumerate() {
            let key = match self.rows.canonical_key(*entity, key).await {
                Ok(KeyForm::Canonical(k)) => k,
                // Its table was never reached: the name as given (entries are named canonically,
                // so this evicts the row's entry if the spelling is the canonical one).
                Ok(KeyForm::Unchecked(k)) => k.into(),
                Err(DbError::BadKey(m)) => {
                    return Err(BatchError::Db {
                        index: None,
                        error: DbError::BadKey(format!("invalidate item {i}: {m}")),
                    });
                }
                Err(error) => return Err(BatchError::Db { index: None, error }),
            };
            invalidate.push(CacheKey::new(self.entity_name(*entity), &key));
        }
        let mut prepared = Vec::with_capacity(batch.writes.len());
        for (index, (w, key)) in batch.writes.iter().zip(&canonical).enumerate() {
            match self.rows.prepare(w, key).await {
                Ok(p) => prepared.push(p),
                Err(PrepareError::Body(error)) => {
                    self.metrics.entity(w.entity).write_rejected.inc();
                    return Err(BatchError::Body { index, error });
                }
                Err(PrepareError::Db(error)) => {
                    return Err(BatchError::Db { index: None, error });
                }
            }
        }
        let keys: Vec<CacheKey> = batch
            .writes
            .iter()
            .zip(&canonical)
            .map(|(w, key)| CacheKey::new(self.entity_name(w.entity), key))
            .collect();
        let intents = self.take_intents(&keys, trips).await;

        let statements: Vec<(&Write, &R::Prepared)> = batch.writes.iter().zip(&prepared).collect();
        let started = Instant::now();
        let result = self.rows.commit(&statements).await;
        self.metrics
            .db_write
            .observe(started.elapsed().as_secs_f64());
        let committed = match result {
            Ok(c) => c,
            Err(failure) => {
                return Err(self
                    .commit_failed(batch, &keys, &intents, failure, trips)
                    .await);
            }
        };

        let stores: Vec<StoreCall<'_>> = committed
            .iter()
            .zip(&keys)
            .zip(&intents)
            .zip(&batch.writes)
            .map(|(((c, key), intent), w)| StoreCall {
                key,
                envelope: &c.envelope,
                ttl: self.ttl(w.entity, &c.envelope),
                intent: intent.as_ref(),
            })
            .collect();
        let status = if stores.is_empty() && invalidate.is_empty() {
            CacheStatus::Ok
        } else {
            self.cache_step(&stores, &invalidate, trips).await
        };
        for (w, key) in batch.writes.iter().zip(&canonical) {
            let m = self.metrics.entity(w.entity);
            match status {
                CacheStatus::Ok => {
                    m.write_ok.inc();
                    self.sampler.record(w.entity, key);
                }
                _ => m.write_repairing.inc(),
            }
        }
        if status == CacheStatus::Repairing {
            for key in keys.iter().chain(&invalidate) {
                self.repair.push(key, &self.metrics);
            }
        }
        Ok(BatchOutcome {
            results: committed,
            status,
        })
    }

    /// How long the cache keeps a committed write: the entity's TTL, or the tombstones'.
    fn ttl(&self, entity: EntityId, envelope: &Envelope) -> Duration {
        let cache = &self.config().cache;
        if envelope.deleted {
            Duration::from_secs(cache.tombstone_ttl_seconds)
        } else {
            Duration::from_secs(self.config().entities[entity.index()].ttl_seconds)
        }
    }

    /// The write intents of all keys, one round trip. A key under repair gets none, and with the
    /// cache away none does: such a write's cache step then only replaces an older cached version
    /// and never fills an empty slot.
    async fn take_intents(&self, keys: &[CacheKey], trips: Trips) -> Vec<Option<LeaseToken>> {
        if !self.cache.is_up() {
            return vec![None; keys.len()];
        }
        let tokens: Vec<Option<LeaseToken>> = keys
            .iter()
            .map(|k| (!self.repair.contains(k)).then(LeaseToken::new))
            .collect();
        let intents: Vec<(&CacheKey, &LeaseToken)> = keys
            .iter()
            .zip(&tokens)
            .filter_map(|(k, t)| t.as_ref().map(|t| (k, t)))
            .collect();
        if intents.is_empty() {
            return tokens;
        }
        let ttl = Duration::from_millis(self.config().cache.lease_ttl_ms);
        if trips == Trips::Counted {
            self.metrics.round_trip("batch_intents");
        }
        match self.cache.write_intents(&intents, ttl).await {
            Ok(()) => tokens,
            Err(_) => {
                self.metrics.redis_errors.inc();
                vec![None; keys.len()]
            }
        }
    }

    /// Nothing was committed, or maybe everything was: the metrics, the intents, the repairs.
    async fn commit_failed(
        &self,
        batch: &Batch,
        keys: &[CacheKey],
        intents: &[Option<LeaseToken>],
        failure: CommitFailure,
        trips: Trips,
    ) -> BatchError {
        let entity = |i: usize| self.metrics.entity(batch.writes[i].entity);
        if let CommitFailure::Db {
            error,
            maybe_committed: true,
            ..
        } = &failure
        {
            // The commit may have happened: whatever the cache holds for these keys may be stale.
            for (i, key) in keys.iter().enumerate() {
                entity(i).write_failed.inc();
                self.repair.push(key, &self.metrics);
            }
            return BatchError::Db {
                index: None,
                error: error.clone(),
            };
        }
        // Rolled back: let readers fill again without waiting for the intents to expire.
        let leases: Vec<(&CacheKey, &LeaseToken)> = keys
            .iter()
            .zip(intents)
            .filter_map(|(k, t)| t.as_ref().map(|t| (k, t)))
            .collect();
        if !leases.is_empty() {
            if trips == Trips::Counted {
                self.metrics.round_trip("batch_release");
            }
            let ends: Vec<_> = leases
                .iter()
                .map(|&(key, token)| super::ports::LeaseEnd::Release { key, token })
                .collect();
            if self.cache.end_leases(&ends).await.is_err() {
                self.metrics.redis_errors.inc();
            }
        }
        match failure {
            CommitFailure::Precondition { index, current } => {
                entity(index).write_precondition_failed.inc();
                BatchError::PreconditionFailed { index, current }
            }
            CommitFailure::NotFound { index } => {
                // A batch refuses it; a single DELETE answers 404, which is no rejection.
                if trips == Trips::Counted {
                    entity(index).write_rejected.inc();
                }
                BatchError::NotFound { index }
            }
            CommitFailure::Db {
                index: Some(index),
                error,
                ..
            } => {
                entity(index).write_rejected.inc();
                BatchError::Db {
                    index: Some(index),
                    error,
                }
            }
            CommitFailure::Db { error, .. } => {
                // The database was not reached (or the transaction failed before COMMIT): known
                // not committed, so the keys keep their cache.
                for i in 0..batch.writes.len() {
                    entity(i).write_failed.inc();
                }
                BatchError::Db { index: None, error }
            }
        }
    }

    /// Every `STORE` and eviction in one round trip, retried as a whole within the budget:
    /// exponential backoff with full jitter, no retries while the cache is marked down. Latency
    /// and failures go to the metrics.
    async fn cache_step(
        &self,
        stores: &[StoreCall<'_>],
        evict: &[CacheKey],
        trips: Trips,
    ) -> CacheStatus {
        let evict: Vec<&CacheKey> = evict.iter().collect();
        let budget = &self.config().cache.retry;
        let started = Instant::now();
        let mut attempt = 0u32;
        let ok = loop {
            if trips == Trips::Counted && self.cache.is_up() {
                self.metrics.round_trip("batch_store");
            }
            match self.cache.store(stores, &evict).await {
                Ok(_) => break true,
                Err(_) => {
                    self.metrics.redis_errors.inc();
                    if attempt >= budget.retries || !self.cache.is_up() {
                        break false;
                    }
                    attempt += 1;
                    self.metrics.cache_step_retries.inc();
                    let cap = budget
                        .max_delay_ms
                        .min(budget.base_delay_ms.saturating_mul(1 << attempt.min(20)));
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=cap))).await;
                }
            }
        };
        self.metrics
            .cache_step
            .observe(started.elapsed().as_secs_f64());
        if ok {
            CacheStatus::Ok
        } else {
            self.metrics.cache_step_failures.inc();
            CacheStatus::Repairing
        }
    }
}
