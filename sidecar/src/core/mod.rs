//! The protocol core: what docs/protocol.md promises, written once, against two ports
//! (`ports::CacheStore`, `ports::RowStore`). No HTTP, Redis or SQL in here: the adapters are
//! `redis_cache`, `postgres` and `http`.
//!
//! - `types`, `envelope`: the vocabulary (entity, version, what the cache holds, outcomes).
//! - `read` (with single-flight in `flights`), `bulk_read`: the read path.
//! - `write`: the write path, single writes and batches.
//! - `external`: changes committed by anyone (the commit stream) invalidating cached rows.
//! - `repair`: the repair queue. `sampler`: the consistency sampler. `metrics`, `write_ratio`.
//! - `protocol`: the state they share, and the background loops.

mod bulk_read;
pub mod envelope;
pub mod external;
mod flights;
mod ids;
mod metrics;
pub mod ports;
mod protocol;
mod read;
mod repair;
mod sampler;
pub mod types;
mod write;
mod write_ratio;

#[cfg(test)]
mod memory;

pub use envelope::Envelope;
pub use metrics::{CommitStreamMetrics, EntityMetrics, EpochCounters, Metrics};
pub use ports::{CacheKey, CacheStore, RowStore};
pub use protocol::{Background, NeedsRestart, Protocol};
pub use types::*;
pub use write_ratio::WriteRatio;
