//! wtc-sidecar: a write-through cache on localhost. Writes commit to PostgreSQL first, then reach
//! Redis through a versioned compare-and-swap; reads come from Redis and are fresh.
//!
//! Where things are:
//! - `core`: the protocol (docs/protocol.md), pure, generic over two ports: the read path
//!   (`core/read.rs`, `core/bulk_read.rs`), the write path (`core/write.rs`), the repair queue,
//!   the consistency sampler, the envelope.
//! - `redis_cache`: the cache store on Redis; the CAS scripts are in `redis_cache/scripts.rs`.
//! - `postgres`: the row store on PostgreSQL; the SQL is in `postgres/table.rs`.
//! - `http`: the API (typed routes and commands, one error type) and the server.
//! - `run`: process wiring.
#![forbid(unsafe_code)]

mod commit_stream;
pub mod core;
pub mod http;
pub mod postgres;
pub mod redis_cache;
mod run;
pub mod runtime;

pub use run::{Sidecar, StartError, main_entry, main_with, sidecar};
