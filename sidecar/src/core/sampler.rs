//! The consistency sampler: a small version of Meta's Polaris. A share of committed writes
//! (`sampler.sample_rate`) leaves its key in a bounded queue; after `sampler.grace_ms` (longer
//! than a normal cache step) a background loop compares the cached envelope with the database
//! row: one `MGET` and one database query per entity per pass.
//!
//! - Absent from the cache, unreadable, or under repair: consistent (nothing to serve stale, or
//!   already known and being put right).
//! - Cached: the versions must be equal and the data the same JSON (compared as values); a
//!   tombstone matches a missing row.
//! - A difference is first only suspected (a write may be between its commit and its cache
//!   step): the key is checked again one grace period later, and counted as inconsistent only if
//!   the cache still holds the same bytes, the row is still at the same version, and they still
//!   differ: a disagreement that outlived the writes going on.
//! - Confirmed inconsistencies are checked again on every pass until the cache matches (or drops
//!   the key); `wtc_sampler_oldest_inconsistency_seconds` is the age of the oldest still seen.

use super::envelope::Envelope;
use super::metrics::Metrics;
use super::ports::{CacheKey, CacheStore, RowStore};
use super::repair::RepairQueue;
use super::types::{Cached, EntityId, Version};
use bytes::Bytes;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use wtc_config::SamplerConfig;

/// What one pass of the sampler works with.
pub struct Ports<'a, C, R> {
    pub cache: &'a C,
    pub rows: &'a R,
    pub repair: &'a RepairQueue,
    pub metrics: &'a Metrics,
    /// Entity names, by `EntityId`.
    pub names: &'a [String],
}

/// Most keys waiting for their check; beyond it, sampled keys are dropped.
const QUEUE_CAPACITY: usize = 4_096;
/// Most confirmed inconsistencies followed at once.
const MAX_OBSERVED: usize = 1_024;

#[derive(Debug, Clone)]
enum Kind {
    /// Sampled from a committed write.
    New,
    /// Differed from the database at `since`.
    Suspect { seen: Seen, since: Instant },
    /// A confirmed inconsistency, checked again on every pass.
    Observed,
}

/// What a check saw when the cache differed: the cached bytes and the row's version.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    cached: Bytes,
    db_version: Option<Version>,
}

#[derive(Debug)]
struct Due {
    idx: EntityId,
    key: String,
    due: Instant,
    kind: Kind,
}

pub struct Sampler {
    rate: f64,
    grace: Duration,
    queue: Mutex<VecDeque<Due>>,
    /// Confirmed inconsistencies still seen: (entity, key) → first seen.
    observed: Mutex<HashMap<(EntityId, String), Instant>>,
}

impl Sampler {
    pub fn new(config: &SamplerConfig) -> Self {
        Self {
            rate: if config.enabled {
                config.sample_rate
            } else {
                0.0
            },
            grace: Duration::from_millis(config.grace_ms),
            queue: Mutex::new(VecDeque::new()),
            observed: Mutex::new(HashMap::new()),
        }
    }

    /// A write of `key` committed: maybe check it after the grace period.
    pub fn record(&self, idx: EntityId, key: &str) {
        if self.rate <= 0.0 || (self.rate < 1.0 && fastrand::f64() >= self.rate) {
            return;
        }
        self.push(idx, key.to_string(), Kind::New);
    }

    fn push(&self, idx: EntityId, key: String, kind: Kind) {
        let mut q = self.queue.lock().unwrap();
        if q.len() < QUEUE_CAPACITY {
            q.push_back(Due {
                idx,
                key,
                due: Instant::now() + self.grace,
                kind,
            });
        }
    }

    /// Keys whose grace period is over, and the confirmed inconsistencies to look at again.
    fn take_due(&self, now: Instant) -> Vec<Due> {
        let mut out = Vec::new();
        {
            let mut q = self.queue.lock().unwrap();
            while q.front().is_some_and(|d| d.due <= now) {
                out.extend(q.pop_front());
            }
        }
        let observed = self.observed.lock().unwrap();
        out.extend(observed.keys().map(|(idx, key)| Due {
            idx: *idx,
            key: key.clone(),
            due: now,
            kind: Kind::Observed,
        }));
        out
    }

    /// One pass: checks every key that is due.
    pub async fn check_once<C: CacheStore, R: RowStore>(&self, sc: &Ports<'_, C, R>) {
        let now = Instant::now();
        let due = self.take_due(now);
        let mut by_entity: HashMap<EntityId, Vec<Due>> = HashMap::new();
        for d in due {
            by_entity.entry(d.idx).or_default().push(d);
        }
        for (idx, items) in by_entity {
            self.check_entity(sc, idx, items).await;
        }
        let oldest = self
            .observed
            .lock()
            .unwrap()
            .values()
            .map(|since| now.saturating_duration_since(*since).as_secs_f64())
            .fold(0.0, f64::max);
        sc.metrics.sampler_oldest_inconsistency.set(oldest);
        let queued = self.queue.lock().unwrap().len();
        sc.metrics.sampler_queued.set(queued as i64);
    }

    async fn check_entity<C: CacheStore, R: RowStore>(
        &self,
        sc: &Ports<'_, C, R>,
        idx: EntityId,
        items: Vec<Due>,
    ) {
        if !sc.cache.is_up() {
            // Not checked this time; confirmed ones stay observed.
            return;
        }
        let entity = &sc.names[idx.index()];
        let cks: Vec<CacheKey> = items
            .iter()
            .map(|d| CacheKey::new(entity, &d.key))
            .collect();
        let refs: Vec<&CacheKey> = cks.iter().collect();
        let cached = match sc.cache.get_many(&refs).await {
            Ok(c) => c,
            Err(_) => {
                sc.metrics.redis_errors.inc();
                return;
            }
        };
        // Only keys that are cached (and not being repaired) need the database.
        let cached: Vec<Option<Envelope>> = cached
            .into_iter()
            .zip(&cks)
            .map(|(c, ck)| match c {
                Cached::Entry(env) if !sc.repair.contains(ck) => Some(env),
                _ => None,
            })
            .collect();
        let to_read: Vec<&str> = items
            .iter()
            .zip(&cached)
            .filter(|(_, c)| c.is_some())
            .map(|(d, _)| d.key.as_str())
            .collect();
        let mut rows: HashMap<String, Option<Envelope>> = HashMap::new();
        if !to_read.is_empty() {
            match sc.rows.read_many(idx, &to_read).await {
                Ok(r) => rows.extend(to_read.iter().map(|k| k.to_string()).zip(r)),
                Err(_) => return,
            }
        }
        for (d, cached) in items.into_iter().zip(cached) {
            if matches!(d.kind, Kind::New) {
                sc.metrics.sampler_checked.inc();
            }
            let differs = match &cached {
                None => None,
                Some(c) => {
                    let row = rows.get(&d.key).cloned().flatten();
                    (!consistent(c, row.as_ref())).then(|| Seen {
                        cached: c.bytes.clone(),
                        db_version: row.map(|r| r.version),
                    })
                }
            };
            self.judge(sc.metrics, sc.names, d, differs);
        }
    }

    /// `differs`: what was seen when the cache does not match the database.
    fn judge(&self, metrics: &Metrics, names: &[String], d: Due, differs: Option<Seen>) {
        let id = (d.idx, d.key);
        match (d.kind, differs) {
            (Kind::Observed, None) => {
                self.observed.lock().unwrap().remove(&id);
            }
            (Kind::Observed, Some(_)) | (_, None) => {}
            (Kind::New, Some(seen)) => {
                let since = Instant::now();
                self.push(id.0, id.1, Kind::Suspect { seen, since });
            }
            (Kind::Suspect { seen, since }, Some(now_seen)) => {
                if seen != now_seen {
                    // The cache or the row changed meanwhile (writes going on): look again.
                    let since = Instant::now();
                    self.push(
                        id.0,
                        id.1,
                        Kind::Suspect {
                            seen: now_seen,
                            since,
                        },
                    );
                    return;
                }
                let mut observed = self.observed.lock().unwrap();
                if observed.contains_key(&id) || observed.len() >= MAX_OBSERVED {
                    return;
                }
                metrics.sampler_inconsistent.inc();
                tracing::warn!(
                    entity = names[id.0.index()].as_str(),
                    key = %id.1,
                    "consistency sampler: the cache differs from the database"
                );
                observed.insert(id, since);
            }
        }
    }
}

/// Whether the cached envelope says what the database row says (`None`: no row).
pub fn consistent(cached: &Envelope, row: Option<&Envelope>) -> bool {
    match row {
        None => cached.deleted,
        Some(row) if cached.deleted || cached.version != row.version => false,
        Some(row) => data(&cached.bytes).is_some_and(|c| Some(c) == data(&row.bytes)),
    }
}

fn data(bytes: &[u8]) -> Option<Value> {
    let mut v: Value = serde_json::from_slice(bytes).ok()?;
    Some(v.get_mut("data")?.take())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_rules() {
        let row = Envelope::row(
            Version::new(5),
            r#"{"id": "a", "n": 1.50}"#,
            "2026-01-01T00:00:00Z",
        );
        let same = Envelope::row(
            Version::new(5),
            r#"{"n":1.5,"id":"a"}"#,
            "2026-01-01T00:00:01Z",
        );
        let other_data = Envelope::row(
            Version::new(5),
            r#"{"id": "a", "n": 2}"#,
            "2026-01-01T00:00:00Z",
        );
        let older = Envelope::row(
            Version::new(4),
            r#"{"id": "a", "n": 1.50}"#,
            "2026-01-01T00:00:00Z",
        );
        let tomb = Envelope::tombstone(Version::new(6), "2026-01-01T00:00:00Z");
        assert!(consistent(&same, Some(&row)));
        assert!(!consistent(&other_data, Some(&row)));
        assert!(!consistent(&older, Some(&row)));
        assert!(!consistent(&row, Some(&older)));
        assert!(consistent(&tomb, None));
        assert!(!consistent(&row, None));
        assert!(!consistent(&tomb, Some(&row)));
    }

    #[test]
    fn sampling_is_bounded_and_waits_for_the_grace_period() {
        let s = Sampler::new(&SamplerConfig {
            enabled: true,
            sample_rate: 1.0,
            grace_ms: 60_000,
            ..Default::default()
        });
        for i in 0..QUEUE_CAPACITY + 10 {
            s.record(EntityId::new(0), &i.to_string());
        }
        assert_eq!(s.queue.lock().unwrap().len(), QUEUE_CAPACITY);
        assert!(s.take_due(Instant::now()).is_empty());
        let later = Instant::now() + Duration::from_secs(61);
        assert_eq!(s.take_due(later).len(), QUEUE_CAPACITY);
        let off = Sampler::new(&SamplerConfig {
            enabled: false,
            sample_rate: 1.0,
            ..Default::default()
        });
        off.record(EntityId::new(0), "a");
        assert!(off.queue.lock().unwrap().is_empty());
    }
}
