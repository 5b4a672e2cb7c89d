//! A bulk read: the read path for many keys of one entity. One `MGET`; for the misses, the fill
//! leases taken (each followed by a read of the entry) in one round trip BEFORE one database read
//! of all of them; then the fills of the keys whose lease was won, in one round trip. It joins no
//! single-flight and does not wait for other fillers: a key whose lease another reader holds is
//! read from the database without filling. The steps are those of `read.rs`.

use super::envelope::Envelope;
use super::ports::{CacheKey, CacheStore, KeyForm, LeaseEnd, LeaseToken, RowStore};
use super::protocol::Protocol;
use super::read::Lookup;
use super::types::{BatchError, CacheStatus, DbError, EntityId, ReadOutcome};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

impl<C: CacheStore, R: RowStore> Protocol<C, R> {
    /// Reads many keys of `entity`; the answer is in the order of `keys` (a row named twice, in
    /// whatever spellings, is looked up once and answered twice). A key that is no key of the
    /// column's type is `BatchError::Db` with its position.
    pub async fn read_many(
        &self,
        entity: EntityId,
        keys: &[String],
    ) -> Result<Vec<ReadOutcome>, BatchError> {
        let m = self.metrics.entity(entity);
        let mut forms = Vec::with_capacity(keys.len());
        for (index, k) in keys.iter().enumerate() {
            self.metrics.read_done();
            match self.rows.canonical_key(entity, k).await {
                Ok(form) => forms.push(form),
                Err(error) => {
                    return Err(BatchError::Db {
                        index: Some(index),
                        error,
                    });
                }
            }
        }
        // Unique rows, by canonical key; `unchecked`: keys whose canonical spelling is not known
        // yet, which are looked up as given but never filled (`read::read_unchecked`).
        let mut unique: Vec<&str> = Vec::new();
        let mut unchecked: HashSet<usize> = HashSet::new();
        let mut position: HashMap<&str, usize> = HashMap::new();
        let slots: Vec<usize> = forms
            .iter()
            .map(|form| {
                let (k, checked) = match form {
                    KeyForm::Canonical(k) => (k.as_ref(), true),
                    KeyForm::Unchecked(k) => (*k, false),
                };
                *position.entry(k).or_insert_with(|| {
                    unique.push(k);
                    if !checked {
                        unchecked.insert(unique.len() - 1);
                    }
                    unique.len() - 1
                })
            })
            .collect();
        let cks: Vec<CacheKey> = unique
            .iter()
            .map(|k| CacheKey::new(self.entity_name(entity), k))
            .collect();
        let mut out: Vec<Option<ReadOutcome>> = vec![None; unique.len()];
        // Keys to read from the database, and whether this reader may fill them (its lease).
        let mut bypass: Vec<usize> = Vec::new();
        let mut misses: Vec<usize> = Vec::new();
        let via_cache: Vec<usize> = (0..unique.len())
            .filter(|&i| {
                let skip = self.bypasses(&cks[i]);
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
                    for (&i, cached) in via_cache.iter().zip(values) {
                        match Lookup::of(cached, None) {
                            Lookup::Hit(env) => {
                                m.hit.inc();
                                out[i] = Some(ReadOutcome::hit(env));
                            }
                            Lookup::Miss => misses.push(i),
                            Lookup::Corrupt => {
                                corrupt.push(&cks[i]);
                                misses.push(i);
                            }
                        }
                    }
                    if !corrupt.is_empty() {
                        self.metrics.round_trip("bulk_evict");
                        self.evict_corrupt(&corrupt).await;
                    }
                }
                Err(_) => {
                    self.metrics.redis_errors.inc();
                    bypass.extend(&via_cache);
                }
            }
        }
        // A miss of an unchecked key is read without a lease, and not filled.
        misses.retain(|i| {
            let checked = !unchecked.contains(i);
            if !checked {
                bypass.push(*i);
            }
            checked
        });
        m.bypass.inc_by(bypass.len() as u64);
        // The leases, before the database read.
        let tokens: Vec<LeaseToken> = misses.iter().map(|_| LeaseToken::new()).collect();
        let mut won: Vec<(usize, &LeaseToken)> = Vec::new();
        let mut to_read: Vec<usize> = bypass.clone();
        if !misses.is_empty() {
            let leases: Vec<(&CacheKey, &LeaseToken)> = misses
                .iter()
                .zip(&tokens)
                .map(|(&i, t)| (&cks[i], t))
                .collect();
            self.metrics.round_trip("bulk_leases");
            match self.take_leases(&leases, None).await {
                Some(replies) => {
                    for ((&i, token), (got, found)) in misses.iter().zip(&tokens).zip(replies) {
                        if got {
                            won.push((i, token));
                        }
                        // Stored since the MGET (another filler, or a write): no database read.
                        match found {
                            Some(env) => {
                                m.fill_waited.inc();
                                out[i] = Some(ReadOutcome::hit(env));
                            }
                            None => {
                                m.miss.inc();
                                to_read.push(i);
                            }
                        }
                    }
                }
                None => {
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
            let ks: Vec<&str> = to_read.iter().map(|&i| unique[i]).collect();
            let started = Instant::now();
            let rows = self.rows.read_many(entity, &ks).await;
            self.metrics
                .db_read
                .observe(started.elapsed().as_secs_f64());
            match rows {
                Ok(rows) => read = to_read.iter().copied().zip(rows).collect(),
                Err(e) => {
                    let ends: Vec<LeaseEnd<'_>> = won
                        .iter()
                        .map(|&(i, token)| LeaseEnd::Release {
                            key: &cks[i],
                            token,
                        })
                        .collect();
                    self.bulk_end_leases(entity, &ends).await;
                    return Err(BatchError::Db {
                        index: None,
                        error: e,
                    });
                }
            }
        }
        // Fill what this reader holds the lease of; give back the other leases.
        let ttl = Duration::from_secs(self.config().entities[entity.index()].ttl_seconds);
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
        self.bulk_end_leases(entity, &ends).await;
        let bypassed: HashSet<usize> = bypass.into_iter().collect();
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
            .collect::<Result<_, _>>()
            .map_err(|error| BatchError::Db { index: None, error })?;
        Ok(slots.into_iter().map(|s| out[s].clone()).collect())
    }

    async fn bulk_end_leases(&self, entity: EntityId, ends: &[LeaseEnd<'_>]) {
        if !ends.is_empty() {
            self.metrics.round_trip("bulk_fills");
            self.end_leases(entity, ends).await;
        }
    }
}
