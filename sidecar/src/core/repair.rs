//! The repair queue: keys whose cache step failed after their write committed.
//!
//! Until a key is repaired, this sidecar reads it from the database (bypassing the cache), and a
//! background loop keeps trying to evict it from Redis; an eviction is always safe, because the
//! next read fills from the database under a lease. Other sidecars may read the older cached
//! version until then, or until its TTL ends: that bound is the stale window (P3), measured in
//! `wtc_stale_window_seconds`.

use super::metrics::Metrics;
use super::ports::{CacheKey, CacheStore};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct RepairQueue {
    /// Entry key -> (keys, when the first failure happened).
    pending: Mutex<HashMap<String, (CacheKey, Instant)>>,
    /// Lets the read path skip the lock when nothing is pending (the normal case).
    len: AtomicUsize,
}

impl RepairQueue {
    pub fn push(&self, key: &CacheKey, metrics: &Metrics) {
        let mut p = self.pending.lock().unwrap();
        p.entry(key.entry.clone())
            .or_insert_with(|| (key.clone(), Instant::now()));
        self.len.store(p.len(), Ordering::SeqCst);
        metrics.repair_depth.set(p.len() as i64);
    }

    pub fn contains(&self, key: &CacheKey) -> bool {
        self.len.load(Ordering::SeqCst) > 0 && self.pending.lock().unwrap().contains_key(&key.entry)
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One pass: evict every pending key; stop at the first failure (Redis is still away).
    pub async fn drain_once(&self, cache: &impl CacheStore, metrics: &Metrics) {
        let batch: Vec<(CacheKey, Instant)> =
            self.pending.lock().unwrap().values().cloned().collect();
        for (key, since) in batch {
            if cache.repair_evict(&key).await.is_err() {
                metrics.redis_errors.inc();
                break;
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
