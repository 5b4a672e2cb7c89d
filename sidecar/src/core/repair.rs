//! The repair queue: keys whose cache step failed after their write committed.
//!
//! Until a key is repaired, this sidecar reads it from the database (bypassing the cache), and a
//! background loop keeps trying to evict it from Redis; an eviction is always safe, because the
//! next read fills from the database under a lease. Other sidecars may read the older cached
//! version until then, or until its TTL ends: that bound is the stale window (P3), measured in
//! `wtc_stale_window_seconds`.
//!
//! Bounded: past `cache.repair_queue_max_keys` keys the queue overflows instead of growing. While
//! it is overflowed every key counts as under repair (this sidecar reads everything from the
//! database), and the next pass, once Redis answers, deletes every cached entry and lease (a
//! sweep, as after a Redis restart) and empties the queue: every key a failed cache step left
//! behind is gone with the rest.

use super::metrics::Metrics;
use super::ports::{CacheError, CacheKey, CacheStore};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct RepairQueue {
    /// Entry key -> (keys, when the first failure happened).
    pending: Mutex<HashMap<String, (CacheKey, Instant)>>,
    /// Lets the read path skip the lock when nothing is pending (the normal case).
    len: AtomicUsize,
    max_keys: usize,
    /// Since when the queue is overflowed (`None`: it is not).
    overflowed: Mutex<Option<Instant>>,
    overflowing: AtomicBool,
}

impl RepairQueue {
    pub fn new(max_keys: usize) -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            len: AtomicUsize::new(0),
            max_keys: max_keys.max(1),
            overflowed: Mutex::new(None),
            overflowing: AtomicBool::new(false),
        }
    }

    pub fn push(&self, key: &CacheKey, metrics: &Metrics) {
        let mut p = self.pending.lock().unwrap();
        if !p.contains_key(&key.entry) && p.len() >= self.max_keys {
            let mut o = self.overflowed.lock().unwrap();
            if o.is_none() {
                *o = Some(Instant::now());
                self.overflowing.store(true, Ordering::SeqCst);
                metrics.repair_overflows.inc();
                tracing::warn!(
                    max_keys = self.max_keys,
                    "repair queue full: every key is read from the database until Redis answers \
                     and the cache is swept"
                );
            }
            return;
        }
        p.entry(key.entry.clone())
            .or_insert_with(|| (key.clone(), Instant::now()));
        self.len.store(p.len(), Ordering::SeqCst);
        metrics.repair_depth.set(p.len() as i64);
    }

    pub fn contains(&self, key: &CacheKey) -> bool {
        self.overflowing.load(Ordering::SeqCst)
            || (self.len.load(Ordering::SeqCst) > 0
                && self.pending.lock().unwrap().contains_key(&key.entry))
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0 && !self.overflowing.load(Ordering::SeqCst)
    }

    /// One pass: evict every pending key (or, overflowed, sweep the cache); stop at the first
    /// failure (Redis is still away), skipping keys only their part of the cache cannot take.
    pub async fn drain_once(&self, cache: &impl CacheStore, metrics: &Metrics) {
        let overflowed_since = *self.overflowed.lock().unwrap();
        if let Some(since) = overflowed_since {
            if cache.sweep().await.is_err() {
                metrics.redis_errors.inc();
                return;
            }
            // Keys queued after the sweep started stay queued: their failures may be newer.
            let mut p = self.pending.lock().unwrap();
            p.retain(|_, (_, t)| *t > since);
            self.len.store(p.len(), Ordering::SeqCst);
            metrics.repair_depth.set(p.len() as i64);
            *self.overflowed.lock().unwrap() = None;
            self.overflowing.store(false, Ordering::SeqCst);
            metrics.stale_window.observe(since.elapsed().as_secs_f64());
            tracing::info!("repair queue: the cache was swept after an overflow");
        }
        let batch: Vec<(CacheKey, Instant)> =
            self.pending.lock().unwrap().values().cloned().collect();
        for (key, since) in batch {
            match cache.repair_evict(&key).await {
                Ok(()) => {}
                // Only this key's part of the cache is away: the others can be repaired.
                Err(CacheError::KeyUnavailable) => continue,
                Err(_) => {
                    metrics.redis_errors.inc();
                    break;
                }
            }
            let mut p = self.pending.lock().unwrap();
            // A newer failure of the same key may have replaced the entry; it was evicted too.
            p.remove(&key.entry);
            self.len.store(p.len(), Ordering::SeqCst);
            metrics.repair_depth.set(p.len() as i64);
            metrics.repairs.inc();
            metrics.stale_window.observe(since.elapsed().as_secs_f64());
        }
        let oldest = self
            .pending
            .lock()
            .unwrap()
            .values()
            .map(|(_, t)| t.elapsed())
            .max();
        metrics
            .repair_oldest_age
            .set(oldest.unwrap_or(Duration::ZERO).as_secs_f64());
    }
}
