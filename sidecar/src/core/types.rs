//! The protocol's vocabulary: entities, versions, what the cache holds for a key, and what reads
//! and writes answer. No I/O here.

use super::envelope::Envelope;
pub use super::ids::{EntityId, Version};
use serde_json::{Map, Value};

/// What the cache holds for a key, as the protocol sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Cached {
    Absent,
    /// Something this sidecar would not have written: never served, evicted.
    Corrupt,
    /// A row or a tombstone.
    Entry(Envelope),
}

impl Cached {
    /// The typed view of a stored value (`None`: no value).
    pub fn from_stored(value: Option<Vec<u8>>) -> Self {
        match value {
            None => Cached::Absent,
            Some(bytes) => match Envelope::parse_stored(bytes.into()) {
                Some(env) => Cached::Entry(env),
                None => Cached::Corrupt,
            },
        }
    }

    pub fn entry(self) -> Option<Envelope> {
        match self {
            Cached::Entry(env) => Some(env),
            _ => None,
        }
    }
}

/// What the cache did for a request, reported in `X-Wtc-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from Redis.
    Hit,
    /// Read from the database (and filled, when this reader held the lease).
    Miss,
    /// Redis skipped: it is unreachable, or the key waits in the repair queue.
    Bypass,
    /// Write: the cache step succeeded (stored, or nothing older was left in the cache).
    Ok,
    /// Write committed but its cache step failed; the key is being repaired.
    Repairing,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
            CacheStatus::Ok => "ok",
            CacheStatus::Repairing => "repairing",
        }
    }

    /// `X-Wtc-Cache` of an answer for many keys: `hit` when all came from Redis, `bypass` when
    /// any skipped it, else `miss`.
    pub fn summary(outcomes: &[ReadOutcome]) -> CacheStatus {
        if outcomes.iter().any(|o| o.status == CacheStatus::Bypass) {
            CacheStatus::Bypass
        } else if outcomes.iter().all(|o| o.status == CacheStatus::Hit) {
            CacheStatus::Hit
        } else {
            CacheStatus::Miss
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReadOutcome {
    /// `None`: no such row. A tombstone is a `Some` with `deleted`.
    pub envelope: Option<Envelope>,
    pub status: CacheStatus,
}

impl ReadOutcome {
    pub(crate) fn hit(envelope: Envelope) -> Self {
        Self {
            envelope: Some(envelope),
            status: CacheStatus::Hit,
        }
    }
}

/// One write: a put of column values or a delete, optionally conditional on the row.
#[derive(Debug, Clone)]
pub struct Write {
    pub entity: EntityId,
    pub key: String,
    pub op: WriteOp,
    pub condition: Condition,
}

/// What must hold of the row for a write to happen (else: precondition failed, nothing written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Condition {
    #[default]
    Always,
    /// `If-Match: "N"`: the row is at version N.
    Matches(Version),
    /// `If-None-Match: *`: there is no row (a put that only creates; a delete never deletes).
    Absent,
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

/// Writes committed together (all or none), and further keys to evict after the commit.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub writes: Vec<Write>,
    pub invalidate: Vec<(EntityId, String)>,
}

/// The answer to a single put or delete.
#[derive(Debug, Clone)]
pub enum WriteOutcome {
    Committed {
        envelope: Envelope,
        created: bool,
        status: CacheStatus,
    },
    /// DELETE of a row that does not exist.
    NotFound,
    /// If-Match did not match; `current` is the row's version (`None`: no row).
    PreconditionFailed { current: Option<Version> },
}

/// One committed write of a batch, in the batch's order.
#[derive(Debug, Clone)]
pub struct Committed {
    pub envelope: Envelope,
    pub created: bool,
}

#[derive(Debug, Clone)]
pub struct BatchOutcome {
    /// In the order of the batch's writes.
    pub results: Vec<Committed>,
    /// `Ok` or `Repairing`, for the whole batch.
    pub status: CacheStatus,
}

/// Why nothing of a batch was committed (or, for `Db` with `maybe_committed`, maybe all of it).
/// `index` is the position of the write in the batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    #[error("writes {first} and {index} are for the same key")]
    DuplicateKey { first: usize, index: usize },
    #[error("{error}")]
    Body { index: usize, error: BodyError },
    #[error("If-Match does not hold")]
    PreconditionFailed {
        index: usize,
        current: Option<Version>,
    },
    #[error("no row with this key")]
    NotFound { index: usize },
    /// A statement failed (`index`: which), or the transaction itself (`None`).
    #[error("{error}")]
    Db {
        index: Option<usize>,
        error: DbError,
    },
}

/// The single-write form of `BatchError`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Body(#[from] BodyError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DbError {
    /// Connection refused or lost, pool exhausted, statement timeout. The write may or may not
    /// have committed when this comes back from a write.
    #[error("the database is unavailable")]
    Unavailable,
    /// Like `Unavailable`, but certainly before anything was sent (no connection could be had):
    /// a write that fails so is known not to have committed.
    #[error("the database is unavailable")]
    Unreachable,
    /// The database refused the values (type, constraint). Message in the database's words.
    #[error("{0}")]
    Rejected(String),
    /// The key cannot be a value of the key column's type.
    #[error("{0}")]
    BadKey(String),
    /// The configured table cannot be used as configured.
    #[error("{0}")]
    Schema(String),
    #[error("internal database error")]
    Internal,
}

impl DbError {
    /// The same error, known to have happened before anything was sent.
    pub fn not_sent(self) -> Self {
        match self {
            DbError::Unavailable | DbError::Internal => DbError::Unreachable,
            other => other,
        }
    }

    /// Whether a failed write may nevertheless have committed (the cache must then be repaired).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, DbError::Unavailable | DbError::Internal)
    }
}

/// A write body the table cannot take.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BodyError {
    #[error("unknown column(s): {}", .0.join(", "))]
    UnknownColumns(Vec<String>),
    #[error("column {0:?} is the version: the sidecar assigns it")]
    VersionColumn(String),
    #[error("column {0:?} is the key and differs from the key in the URL")]
    KeyMismatch(String),
    #[error("column {column:?} takes {expected}, not {got}")]
    WrongType {
        column: String,
        expected: &'static str,
        got: &'static str,
    },
}
