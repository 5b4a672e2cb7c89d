//! The write path: write intent, one database statement, then the cache step.
//!
//! 1. Take the write intent on the key's lease (revokes fillers that may have read the old row).
//! 2. Commit: one statement assigns the new version. From here the write is durable and is never
//!    reported as failed because of the cache.
//! 3. Cache step (the STORE script): set if newer, TTL, lease revoked. Retried with exponential
//!    backoff and full jitter within the configured budget.
//! 4. Still failing: the key goes to the repair queue and the answer says `repairing`.

use crate::cache::CacheKey;
use crate::db::{Committed, Precondition};
use crate::envelope::Envelope;
use crate::hooks;
use crate::sidecar::{CacheStatus, Sidecar, WriteError, WriteOutcome};
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

impl Sidecar {
    /// Upserts the fields of `body` (already checked to be a JSON object; `raw` is its text).
    pub async fn put(
        &self,
        idx: usize,
        key: &str,
        body: &Map<String, Value>,
        raw: &str,
        if_match: Option<i64>,
    ) -> Result<WriteOutcome, WriteError> {
        self.metrics.write_done();
        let m = &self.metrics.entities[idx];
        let table = self.db.table(idx).await?;
        let columns = table
            .check_body(body, key)
            .inspect_err(|_| m.write_rejected.inc())?;
        let ck = CacheKey::new(self.entity_name(idx), key);
        let intent = self.take_intent(&ck).await;

        let started = Instant::now();
        let result = Box::pin(self.db.upsert(&table, key, raw, &columns, if_match)).await;
        self.metrics
            .db_write
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(Committed { envelope, created })) => {
                let ttl = Duration::from_secs(self.config.entities[idx].ttl_seconds);
                let status = self
                    .after_commit(idx, key, &ck, &envelope, ttl, intent.as_deref())
                    .await;
                Ok(WriteOutcome::Committed {
                    envelope,
                    created,
                    status,
                })
            }
            Ok(Err(Precondition::Failed { current })) => {
                m.write_precondition_failed.inc();
                self.give_back_intent(&ck, intent.as_deref()).await;
                Ok(WriteOutcome::PreconditionFailed { current })
            }
            Err(e) => Err(self.write_failed(idx, &ck, intent.as_deref(), e).await),
        }
    }

    /// Deletes the row and leaves a tombstone with a fresh version in the cache.
    pub async fn delete(
        &self,
        idx: usize,
        key: &str,
        if_match: Option<i64>,
    ) -> Result<WriteOutcome, WriteError> {
        self.metrics.write_done();
        let table = self.db.table(idx).await?;
        let ck = CacheKey::new(self.entity_name(idx), key);
        let intent = self.take_intent(&ck).await;

        let started = Instant::now();
        let result = Box::pin(self.db.delete(&table, key, if_match)).await;
        self.metrics
            .db_write
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(Some(tombstone))) => {
                let ttl = Duration::from_secs(self.config.cache.tombstone_ttl_seconds);
                let status = self
                    .after_commit(idx, key, &ck, &tombstone, ttl, intent.as_deref())
                    .await;
                Ok(WriteOutcome::Committed {
                    envelope: tombstone,
                    created: false,
                    status,
                })
            }
            Ok(Ok(None)) => {
                self.give_back_intent(&ck, intent.as_deref()).await;
                Ok(WriteOutcome::NotFound)
            }
            Ok(Err(Precondition::Failed { current })) => {
                self.metrics.entities[idx].write_precondition_failed.inc();
                self.give_back_intent(&ck, intent.as_deref()).await;
                Ok(WriteOutcome::PreconditionFailed { current })
            }
            Err(e) => Err(self.write_failed(idx, &ck, intent.as_deref(), e).await),
        }
    }

    /// The write intent. Without it (Redis away, key under repair) the write still goes on; its
    /// cache step then only replaces an older cached version and never fills an empty slot.
    async fn take_intent(&self, ck: &CacheKey) -> Option<String> {
        if !self.cache.is_up() || self.repair.contains(ck) {
            return None;
        }
        let token = new_token();
        let ttl = Duration::from_millis(self.config.cache.lease_ttl_ms);
        match self.cache.write_intent(ck, &token, ttl).await {
            Ok(()) => Some(token),
            Err(_) => {
                self.metrics.redis_errors.inc();
                None
            }
        }
    }

    /// Nothing was committed: let readers fill again without waiting for the intent to expire.
    async fn give_back_intent(&self, ck: &CacheKey, intent: Option<&str>) {
        if let Some(token) = intent
            && self.cache.release(ck, token).await.is_err()
        {
            self.metrics.redis_errors.inc();
        }
    }

    async fn write_failed(
        &self,
        idx: usize,
        ck: &CacheKey,
        intent: Option<&str>,
        e: crate::db::DbError,
    ) -> WriteError {
        let m = &self.metrics.entities[idx];
        if e.outcome_unknown() {
            // The statement may have committed: whatever the cache holds may now be stale.
            m.write_failed.inc();
            self.repair.push(ck, &self.metrics);
        } else {
            m.write_rejected.inc();
            self.give_back_intent(ck, intent).await;
        }
        WriteError::Db(e)
    }

    /// Steps 3 and 4: the cache step with its retry budget, then the repair queue.
    async fn after_commit(
        &self,
        idx: usize,
        key: &str,
        ck: &CacheKey,
        envelope: &Envelope,
        ttl: Duration,
        intent: Option<&str>,
    ) -> CacheStatus {
        self.hooks
            .hold(hooks::WRITE_BEFORE_CACHE_STEP, self.entity_name(idx), key)
            .await;
        let m = &self.metrics.entities[idx];
        let stored = self
            .cache_step_with_retries(|| self.cache.store(ck, envelope, ttl, intent))
            .await;
        if stored {
            m.write_ok.inc();
            self.sampler.record(idx, key);
            CacheStatus::Ok
        } else {
            m.write_repairing.inc();
            self.repair.push(ck, &self.metrics);
            CacheStatus::Repairing
        }
    }

    /// Runs a cache step within the retry budget: exponential backoff with full jitter, no
    /// retries while Redis is marked down. True when it went through; latency and failures go to
    /// the metrics. Shared by single writes and batches.
    pub(crate) async fn cache_step_with_retries<T, F, Fut>(&self, mut step: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::cache::CacheError>>,
    {
        let budget = &self.config.cache.retry;
        let started = Instant::now();
        let mut attempt = 0u32;
        let ok = loop {
            match step().await {
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
        if !ok {
            self.metrics.cache_step_failures.inc();
        }
        ok
    }
}

/// A unique lease token.
pub(crate) fn new_token() -> String {
    format!("{:032x}", fastrand::u128(..))
}
