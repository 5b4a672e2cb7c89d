//! wtc-sidecar: a write-through cache on localhost. Writes commit to PostgreSQL first, then reach
//! Redis through a versioned compare-and-swap; reads come from Redis and are fresh.
//!
//! Where things are: the envelope (`envelope`), the Redis scripts (`cache::scripts`), the write
//! path (`write`), the read path (`read`), the repair queue (`repair`), the SQL (`db`), the HTTP
//! API (`api`), process wiring (`run`).
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod auth;
pub mod batch;
pub mod cache;
pub mod db;
pub mod envelope;
pub mod hooks;
pub mod metrics;
pub mod read;
pub mod repair;
pub mod run;
pub mod sampler;
pub mod server;
pub mod sidecar;
pub mod write;
pub mod write_ratio;

pub use run::main_entry;
