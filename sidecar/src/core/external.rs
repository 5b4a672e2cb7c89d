//! Changes committed by anyone — a migration, an admin's `psql`, another service — read from the
//! database's commit stream (docs/commit-stream.md) and applied to the cache.
//!
//! A change only ever **evicts**: the entry goes when its version is older than the change's,
//! and the key's lease goes in every case, so a filler that read the row before the commit
//! cannot install it afterwards. Nothing is stored, so a change applied late, twice (the stream
//! delivers at least once) or out of step with the sidecar's own writes can never put an older
//! version back; the next read fills the entry from the database.
//!
//! Which versions are stale:
//! - a row written with `versions = "trigger"`: those below the change's (the trigger gave it a
//!   new one, whoever wrote; an entry of that version is the sidecar's own write, kept);
//! - a row written with `versions = "sidecar"`: those up to the change's (another writer may have
//!   left the version as it was, so an equal version proves nothing);
//! - a deleted row: those up to its last version, or any when the change does not carry it
//!   (the table's replica identity is its key);
//! - a TRUNCATE: the whole cache is swept.

use super::ports::{CacheError, CacheKey, CacheStore, InvalidateOutcome, Invalidation, KeyForm};
use super::ports::{RowStore, Stale};
use super::protocol::Protocol;
use super::types::{EntityId, Version};
use wtc_config::VersionSource;

/// A row change committed by anyone, as the commit stream read it.
#[derive(Debug, Clone, PartialEq)]
pub enum CommittedChange {
    Row {
        entity: EntityId,
        /// The key column's value, in PostgreSQL's text form.
        key: String,
        /// The row's version after the change (before it, for a delete), when the change
        /// carries it.
        version: Option<Version>,
        deleted: bool,
    },
    /// The table was emptied at once.
    Truncated { entity: EntityId },
}

/// Why committed changes were not applied; the caller applies them all again later.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The key's canonical spelling (its entry's name) cannot be told before the table was
    /// reached once.
    #[error("the key type of entity {0:?} is not known yet (its table was not reached)")]
    KeyTypeUnknown(String),
}

/// Which cached versions `change` makes stale (the table in the module header).
pub fn stale(versions: VersionSource, version: Option<Version>, deleted: bool) -> Stale {
    match (version, deleted, versions) {
        (None, _, _) => Stale::Any,
        (Some(v), true, _) | (Some(v), false, VersionSource::Sidecar) => Stale::AtMost(v),
        (Some(v), false, VersionSource::Trigger) => Stale::Below(v),
    }
}

impl<C: CacheStore, R: RowStore> Protocol<C, R> {
    /// Applies committed changes to the cache, in one round trip (a TRUNCATE adds a sweep).
    /// On error nothing is known to be applied: the caller applies them all again.
    pub async fn apply_committed(&self, changes: &[CommittedChange]) -> Result<(), ApplyError> {
        let config = self.config();
        let m = &self.metrics.commit_stream;
        if changes
            .iter()
            .any(|c| matches!(c, CommittedChange::Truncated { .. }))
        {
            self.cache.sweep().await?;
            m.truncates.inc();
        }
        let mut keys: Vec<(CacheKey, Stale)> = Vec::with_capacity(changes.len());
        let mut sampled: Vec<(EntityId, String)> = Vec::with_capacity(changes.len());
        for change in changes {
            let CommittedChange::Row {
                entity,
                key,
                version,
                deleted,
            } = change
            else {
                continue;
            };
            // The entry is named by the key's canonical text (docs/protocol.md "Keys").
            let canonical = match self.rows.canonical_key(*entity, key).await {
                Ok(KeyForm::Canonical(k)) => k.into_owned(),
                // `042` of an integer key must evict entry `42`: not a guess.
                Ok(KeyForm::Unchecked(_)) => {
                    return Err(ApplyError::KeyTypeUnknown(
                        self.entity_name(*entity).to_string(),
                    ));
                }
                Err(_) => {
                    m.changes.with_label_values(&["unusable"]).inc();
                    continue;
                }
            };
            let versions = config.entities[entity.index()].versions;
            keys.push((
                CacheKey::new(self.entity_name(*entity), &canonical),
                stale(versions, *version, *deleted),
            ));
            sampled.push((*entity, canonical));
        }
        let items: Vec<Invalidation<'_>> = keys
            .iter()
            .map(|(key, stale)| Invalidation { key, stale: *stale })
            .collect();
        for outcome in self.cache.invalidate(&items).await? {
            let label = match outcome {
                InvalidateOutcome::Evicted => "evicted",
                InvalidateOutcome::Kept => "kept",
                InvalidateOutcome::Absent => "absent",
            };
            m.changes.with_label_values(&[label]).inc();
        }
        // The consistency sampler checks a share of these rows as it does the sidecars' own
        // writes: a cached row still older than the database one grace period later is counted.
        for (entity, key) in &sampled {
            self.sampler.record(*entity, key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Envelope;
    use crate::core::memory::{Mem, protocol_edited};
    use crate::core::ports::{FillOutcome, LeaseEnd, LeaseToken, StoreCall};
    use std::time::Duration;

    #[test]
    fn which_versions_a_change_makes_stale() {
        let v = Some(Version::new(7));
        use VersionSource::*;
        assert_eq!(stale(Trigger, v, false), Stale::Below(Version::new(7)));
        assert_eq!(stale(Sidecar, v, false), Stale::AtMost(Version::new(7)));
        assert_eq!(stale(Trigger, v, true), Stale::AtMost(Version::new(7)));
        assert_eq!(stale(Trigger, None, true), Stale::Any);
        assert_eq!(stale(Sidecar, None, false), Stale::Any);
    }

    async fn cached(p: &Mem, key: &str, version: i64) {
        let envelope = Envelope::row(Version::new(version), "{}", "2026-01-01T00:00:00Z");
        let key = CacheKey::new("accounts", key);
        // A write's intent: the only way into an empty slot besides a fill.
        let intent = LeaseToken::new();
        let ttl = Duration::from_secs(60);
        p.cache
            .write_intents(&[(&key, &intent)], ttl)
            .await
            .unwrap();
        let call = StoreCall {
            key: &key,
            envelope: &envelope,
            ttl,
            intent: Some(&intent),
        };
        let stored = p.cache.store(&[call], &[]).await.unwrap();
        assert_eq!(stored, [crate::core::ports::StoreOutcome::Stored]);
    }

    fn row(key: &str, version: Option<i64>, deleted: bool) -> CommittedChange {
        CommittedChange::Row {
            entity: EntityId::new(0),
            key: key.into(),
            version: version.map(Version::new),
            deleted,
        }
    }

    #[tokio::test]
    async fn a_change_evicts_older_entries_keeps_newer_ones_and_never_stores() {
        let p = protocol_edited(|c| {
            c.entities[0].versions = VersionSource::Trigger;
        });
        for (k, v) in [("older", 4), ("same", 5), ("newer", 6), ("gone", 5)] {
            cached(&p, k, v).await;
        }
        p.apply_committed(&[
            row("older", Some(5), false),
            row("same", Some(5), false),
            row("newer", Some(5), false),
            row("gone", Some(5), true),
            row("never-cached", Some(5), false),
        ])
        .await
        .unwrap();
        let present = |k: &str| p.cache.entry_bytes(&CacheKey::new("accounts", k)).is_some();
        assert!(!present("older"), "an older entry stays");
        assert!(
            present("same"),
            "the sidecar's own write (same version) was evicted"
        );
        assert!(present("newer"));
        assert!(!present("gone"), "a deleted row's entry stays");
        assert!(!present("never-cached"), "a change stored something");
        let changes = &p.metrics.commit_stream.changes;
        assert_eq!(changes.with_label_values(&["evicted"]).get(), 2);
        assert_eq!(changes.with_label_values(&["kept"]).get(), 2);
        assert_eq!(changes.with_label_values(&["absent"]).get(), 1);
    }

    #[tokio::test]
    async fn a_change_revokes_the_lease_of_a_filler_that_read_before_it() {
        let p = protocol_edited(|_| {});
        let key = CacheKey::new("accounts", "k");
        let token = LeaseToken::new();
        let won = p
            .cache
            .acquire_leases(&[(&key, &token)], Duration::from_secs(2))
            .await
            .unwrap();
        assert!(won[0].0);
        p.apply_committed(&[row("k", Some(3), false)])
            .await
            .unwrap();
        let envelope = Envelope::row(Version::new(2), "{}", "2026-01-01T00:00:00Z");
        let end = LeaseEnd::Fill {
            key: &key,
            envelope: &envelope,
            ttl: Duration::from_secs(60),
            token: &token,
        };
        let outcome = p.cache.end_leases(&[end]).await.unwrap();
        assert_eq!(outcome, [Some(FillOutcome::LeaseLost)]);
    }

    #[tokio::test]
    async fn with_sidecar_versions_an_equal_version_is_stale_and_a_truncate_sweeps() {
        let p = protocol_edited(|_| {});
        cached(&p, "same", 5).await;
        cached(&p, "other", 9).await;
        p.apply_committed(&[row("same", Some(5), false)])
            .await
            .unwrap();
        assert!(
            p.cache
                .entry_bytes(&CacheKey::new("accounts", "same"))
                .is_none()
        );
        p.apply_committed(&[CommittedChange::Truncated {
            entity: EntityId::new(0),
        }])
        .await
        .unwrap();
        assert!(
            p.cache
                .entry_bytes(&CacheKey::new("accounts", "other"))
                .is_none()
        );
        assert_eq!(p.metrics.commit_stream.truncates.get(), 1);
    }
}
