//! wtc-operator: reconciles `WriteThroughCache` resources into a Redis deployment and the sidecar's
//! configuration, and injects the sidecar into pods that opt in.
//!
//! Pure parts apart from I/O: `crd` (types), `resources` (desired objects), `injection` (the pod
//! patch; `pod_settings`, the per-pod annotations), `redis_auth` (the managed Redis' passwords and
//! their rotation), `sidecars` (what injected sidecars are doing, from pod statuses), `commit_stream` (the
//! reader, its slot's names and drop Job, its condition), `status` (the
//! cache's conditions and events from what was applied and observed), `uninjected` (pods that
//! asked for a sidecar and run without it); then `reconcile` (apply, patch the status),
//! `watchdog` (reports and restarts such pods), `webhook` and `certs` (the admission server), `redis_admin` (applies
//! passwords to a running managed Redis),
//! `lease` (leader election), `run` (command line, wiring).
#![forbid(unsafe_code)]

pub mod certs;
pub mod commit_stream;
pub mod conditions;
pub mod crd;
pub mod injection;
pub mod lease;
pub mod metrics;
pub mod pod_settings;
pub mod reconcile;
pub mod redis_admin;
pub mod redis_auth;
pub mod resources;
pub mod run;
pub mod sidecars;
pub mod status;
pub mod uninjected;
pub mod watchdog;
pub mod webhook;

pub use run::main_entry;
