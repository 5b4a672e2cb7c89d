//! End-to-end suites of the sidecar: real PostgreSQL, real redis-server, real sidecar processes.
//! One test binary (one link) for all of them.

mod api;
mod auth;
mod batch;
mod bounded;
mod cluster;
mod commit_stream;
mod conditional;
mod early_refresh;
mod faults;
mod hostile_cache;
mod hostile_clients;
mod keys;
mod openapi;
mod password_rotation;
mod races;
mod read_your_writes;
mod recovery;
mod reload;
mod sampler;
mod shedding;
mod tls;
