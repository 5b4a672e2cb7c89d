//! The two ports the protocol drives: the cache store (Redis, `redis_cache`) and the row store
//! (PostgreSQL, `postgres`). The protocol's steps are written once, in `core`, against these
//! traits; tests add wrappers (hold points, a weakened store) and in-memory stores.
//!
//! Every cache call that names several keys is one round trip, however many keys; a call with
//! one key is the single request's round trip.

use super::envelope::Envelope;
use super::types::{BodyError, Cached, Committed, DbError, EntityId, Version, Write};
use std::borrow::Cow;
use std::future::Future;
use std::time::Duration;

/// The cache keys of one row. Entity names cannot contain ':' (config validation), so
/// `entity:key` is unambiguous; the braces are a cluster hash tag shared by entry and lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub entry: String,
    pub lease: String,
}

impl CacheKey {
    pub fn new(entity: &str, key: &str) -> Self {
        let entry = format!("wtc:{{{entity}:{key}}}");
        let lease = format!("{entry}:lease");
        Self { entry, lease }
    }
}

/// A lease token (a fill lease or a write intent): unique per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken(String);

impl LeaseToken {
    pub fn new() -> Self {
        Self(format!("{:032x}", fastrand::u128(..)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The envelope is now cached.
    Stored,
    /// A newer version was already cached; nothing changed.
    Stale,
    /// The slot was empty and this write's intent had been revoked; nothing cached, nothing stale.
    Skipped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    Stored,
    LeaseLost,
    Stale,
}

/// The cache step of a committed write: `STORE`.
pub struct StoreCall<'a> {
    pub key: &'a CacheKey,
    pub envelope: &'a Envelope,
    pub ttl: Duration,
    /// The write's intent, when it took one.
    pub intent: Option<&'a LeaseToken>,
}

/// Which cached versions a change committed elsewhere makes stale (the commit stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// Versions below this one.
    Below(Version),
    /// Versions up to this one (a delete, or a table whose versions other writers may leave as
    /// they were).
    AtMost(Version),
    /// Any version (the change carries none).
    Any,
}

/// The eviction of an entry a change committed elsewhere made stale.
pub struct Invalidation<'a> {
    pub key: &'a CacheKey,
    pub stale: Stale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidateOutcome {
    /// The entry was stale and is gone: the next read fills it from the database.
    Evicted,
    /// The entry is as new as the change or newer.
    Kept,
    /// No entry.
    Absent,
}

/// How a reader that won a fill lease ends it.
pub enum LeaseEnd<'a> {
    /// `FILL` with the row just read.
    Fill {
        key: &'a CacheKey,
        envelope: &'a Envelope,
        ttl: Duration,
        token: &'a LeaseToken,
    },
    /// Give the lease back without a value (no row, or a value was found in the cache).
    Release {
        key: &'a CacheKey,
        token: &'a LeaseToken,
    },
}

impl LeaseEnd<'_> {
    pub fn key(&self) -> &CacheKey {
        match self {
            LeaseEnd::Fill { key, .. } | LeaseEnd::Release { key, .. } => key,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the cache is marked unavailable")]
    Down,
    /// The part of the cache holding this key cannot be used now (a cluster slot whose master
    /// is failing over); the rest of the cache can.
    #[error("the cache cannot serve this key now")]
    KeyUnavailable,
    #[error("cache error: {0}")]
    Failed(String),
    #[error("unexpected reply from a cache script: {0}")]
    Protocol(String),
}

pub trait CacheStore: Send + Sync + 'static {
    /// False during the short window after an error that says the cache is unreachable: reads
    /// then go straight to the database instead of waiting on timeouts.
    fn is_up(&self) -> bool;

    /// Connects now if not connected, for the start-up log; if that fails, why (safe to show).
    fn check(&self) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }

    /// The entry, and with `with_ttl` its remaining time to live in ms (for early refresh).
    fn get(
        &self,
        key: &CacheKey,
        with_ttl: bool,
    ) -> impl Future<Output = Result<(Cached, Option<i64>), CacheError>> + Send;

    /// Many entries, in the order of `keys`.
    fn get_many(
        &self,
        keys: &[&CacheKey],
    ) -> impl Future<Output = Result<Vec<Cached>, CacheError>> + Send;

    /// The entry, and whether its lease is held: what a reader waiting for a fill looks at.
    fn peek(
        &self,
        key: &CacheKey,
    ) -> impl Future<Output = Result<(Cached, bool), CacheError>> + Send;

    /// Tries to become the one filler of each empty slot (`SET lease NX PX`), reading each entry
    /// right after: a value found there was stored since the reader's miss. Per key: whether the
    /// lease was won, and the entry.
    fn acquire_leases(
        &self,
        leases: &[(&CacheKey, &LeaseToken)],
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<(bool, Cached)>, CacheError>> + Send;

    /// Writers' intents, taken before their commit: revoke any filler's lease and let the write
    /// fill the slot if it is still empty at its cache step.
    fn write_intents(
        &self,
        intents: &[(&CacheKey, &LeaseToken)],
        ttl: Duration,
    ) -> impl Future<Output = Result<(), CacheError>> + Send;

    /// The cache steps of committed writes (in order), then the eviction of `evict` (entry and
    /// lease). May run twice without harm. Outcomes in the order of `stores`.
    fn store(
        &self,
        stores: &[StoreCall<'_>],
        evict: &[&CacheKey],
    ) -> impl Future<Output = Result<Vec<StoreOutcome>, CacheError>> + Send;

    /// Fills and lease releases of readers. `None` for a release.
    fn end_leases(
        &self,
        ends: &[LeaseEnd<'_>],
    ) -> impl Future<Output = Result<Vec<Option<FillOutcome>>, CacheError>> + Send;

    /// Evicts each entry that is stale by its `Invalidation`, and deletes every lease named (a
    /// filler that read the row before the change can no longer fill). Never stores anything:
    /// a change applied late cannot put an older version back. Outcomes in order.
    fn invalidate(
        &self,
        items: &[Invalidation<'_>],
    ) -> impl Future<Output = Result<Vec<InvalidateOutcome>, CacheError>> + Send;
    /// Removes entries and their leases: always safe, the next read fills from the database.
    fn evict(&self, keys: &[&CacheKey]) -> impl Future<Output = Result<(), CacheError>> + Send;

    /// An eviction that ignores the down window and closes it on success: the repair loop's
    /// probe of a cache that was away.
    fn repair_evict(&self, key: &CacheKey) -> impl Future<Output = Result<(), CacheError>> + Send;

    /// Deletes every entry and lease (ignoring the down window, closing it on success): the
    /// repair queue's way out of an overflow.
    fn sweep(&self) -> impl Future<Output = Result<(), CacheError>> + Send;
}

/// Why a single write (or a batch) did not commit, as the row store reports it.
#[derive(Debug, Clone)]
pub enum CommitFailure {
    /// An If-Match did not hold; `current` is the row's version (`None`: no row).
    Precondition {
        index: usize,
        current: Option<Version>,
    },
    /// A delete without If-Match found no row.
    NotFound { index: usize },
    /// A statement failed (`index`: which), or the transaction itself (`None`).
    /// `maybe_committed`: the failure came when the commit may have happened (its outcome is
    /// unknown); otherwise everything was rolled back.
    Db {
        index: Option<usize>,
        error: DbError,
        maybe_committed: bool,
    },
}

/// A write the row store refused before running any statement.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Body(#[from] BodyError),
}

/// A key as the row store spells it: one row, one spelling (docs/protocol.md "Keys").
#[derive(Debug, Clone, PartialEq)]
pub enum KeyForm<'a> {
    /// The key column type's canonical text: it names the cache entry, the lock, the batch slot.
    Canonical(Cow<'a, str>),
    /// The key type is not known yet (the table was never reached): the key may be looked up in
    /// the cache as given, where every entry has its canonical name, but never fills an entry.
    Unchecked(&'a str),
}

pub trait RowStore: Send + Sync + 'static {
    /// What `prepare` learned about a write (its table, the columns it sets, its key).
    type Prepared: Send + Sync;

    /// The canonical spelling of `key`; `DbError::BadKey` when it is no key of the column's type.
    fn canonical_key<'a>(
        &'a self,
        entity: EntityId,
        key: &'a str,
    ) -> impl Future<Output = Result<KeyForm<'a>, DbError>> + Send;

    /// Checks a write against its table before anything else happens for it; `key` is the
    /// canonical spelling of its key, which the statement uses.
    fn prepare(
        &self,
        write: &Write,
        key: &str,
    ) -> impl Future<Output = Result<Self::Prepared, PrepareError>> + Send;

    /// The row of `key` (`None`: no row).
    fn read(
        &self,
        entity: EntityId,
        key: &str,
    ) -> impl Future<Output = Result<Option<Envelope>, DbError>> + Send;

    /// The rows of `keys`, in their order, in one statement.
    fn read_many(
        &self,
        entity: EntityId,
        keys: &[&str],
    ) -> impl Future<Output = Result<Vec<Option<Envelope>>, DbError>> + Send;

    /// Commits the writes (keys: their prepared, canonical ones): all or none, each with a new
    /// version. Answers in the order given.
    fn commit(
        &self,
        writes: &[(&Write, &Self::Prepared)],
    ) -> impl Future<Output = Result<Vec<Committed>, CommitFailure>> + Send;

    /// Whether the database answers (readiness); if not, why, in words safe to show (no URL,
    /// no secret).
    fn ping(&self) -> impl Future<Output = Result<(), String>> + Send;
}
