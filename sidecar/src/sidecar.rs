//! The sidecar's shared state (one `Sidecar`, like a controller's `Context`) and the outcomes of
//! its protocol operations. The read path is in `read.rs`, the write path in `write.rs`; neither
//! knows anything of HTTP.

use crate::admission::Admission;
use crate::auth::ApiToken;
use crate::cache::Cache;
use crate::db::{BodyError, Database, DbError};
use crate::envelope::Envelope;
use crate::hooks::Hooks;
use crate::metrics::Metrics;
use crate::read::Flights;
use crate::repair::RepairQueue;
use crate::sampler::Sampler;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;
use wtc_config::SidecarConfig;

pub struct Sidecar {
    pub config: SidecarConfig,
    entity_index: HashMap<String, usize>,
    pub db: Database,
    pub cache: Cache,
    pub repair: RepairQueue,
    pub metrics: Metrics,
    pub hooks: Hooks,
    pub(crate) flights: Flights,
    /// Writes run as tasks of their own, so a client that hangs up cannot cut a committed write
    /// off before its cache step; shutdown waits for them.
    pub writes_in_flight: TaskTracker,
    /// Load shedding: slots for requests in flight (`limits`).
    pub admission: Admission,
    /// When set, requests other than health checks need `Authorization: Bearer <token>`.
    pub api_token: Option<ApiToken>,
    /// The consistency sampler (`sampler`).
    pub sampler: Sampler,
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
}

#[derive(Debug, Clone)]
pub struct ReadOutcome {
    /// `None`: no such row. A tombstone is a `Some` with `deleted`.
    pub envelope: Option<Envelope>,
    pub status: CacheStatus,
}

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
    PreconditionFailed { current: Option<i64> },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Body(#[from] BodyError),
}

impl Sidecar {
    pub fn new(config: SidecarConfig) -> Result<Self, String> {
        let db = Database::new(&config.database, &config.entities)?;
        let names: Vec<&str> = config.entities.iter().map(|e| e.name.as_str()).collect();
        let mut metrics = Metrics::new(&names);
        metrics.write_ratio =
            crate::write_ratio::WriteRatio::new(config.sampler.write_ratio_window_seconds);
        let cache = Cache::new(
            &config.redis,
            Duration::from_millis(config.cache.redis_down_backoff_ms),
            metrics.redis_epoch.clone(),
        )
        .map_err(|_| "redis.url is not a valid Redis URL".to_string())?;
        let entity_index = config
            .entities
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Ok(Self {
            entity_index,
            db,
            cache,
            repair: RepairQueue::default(),
            metrics,
            hooks: Hooks::default(),
            flights: Flights::default(),
            writes_in_flight: TaskTracker::new(),
            admission: Admission::new(
                config.limits.max_in_flight,
                Duration::from_millis(config.limits.max_queue_wait_ms),
            ),
            api_token: None,
            sampler: Sampler::new(&config.sampler),
            config,
        })
    }

    /// Requires this token on every request but the health checks (`None`: the API is open).
    pub fn with_api_token(mut self, token: Option<&str>) -> Self {
        self.api_token = token.map(ApiToken::new);
        self
    }

    pub fn entity(&self, name: &str) -> Option<usize> {
        self.entity_index.get(name).copied()
    }

    pub fn entity_name(&self, idx: usize) -> &str {
        &self.config.entities[idx].name
    }

    /// Once a second: warns (at most once a minute) while the write ratio has stayed above
    /// `write_ratio::WARN_ABOVE` for a whole window.
    pub fn spawn_write_ratio_watch(self: &Arc<Self>) {
        let sc = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let w = &sc.metrics.write_ratio;
                if let Some(ratio) = w.tick(sc.metrics.second()) {
                    tracing::warn!(
                        write_ratio = format!("{ratio:.2}"),
                        window_seconds = w.window_seconds(),
                        "writes have been over {:.0}% of all operations for the whole window: \
                         write-behind may serve this workload better than write-through",
                        crate::write_ratio::WARN_ABOVE * 100.0
                    );
                }
            }
        });
    }

    /// Keeps draining the repair queue until the process ends.
    pub fn spawn_repair_loop(self: &Arc<Self>) {
        let sc = Arc::clone(self);
        let every = Duration::from_millis(sc.config.cache.repair_interval_ms.max(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !sc.repair.is_empty() {
                    sc.repair.drain_once(&sc.cache, &sc.metrics).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wtc_config::Overrides;

    /// Every request's future is moved several times (into hyper's connection task, a write's
    /// task): the hit path's must not carry the miss path's database and fill states, nor a
    /// write's the introspection's (31 KB and 15 KB before they were boxed).
    #[tokio::test]
    async fn request_futures_stay_small() {
        let config = SidecarConfig::parse(
            "[database]\nurl = \"postgres://u@127.0.0.1:1/db\"\n\
             [redis]\nurl = \"redis://127.0.0.1:1\"\n\
             [[entities]]\nname = \"accounts\"\ntable = \"accounts\"\n",
            &Overrides::default(),
        )
        .expect("config");
        let sc = Arc::new(Sidecar::new(config).expect("sidecar"));
        let read = sc.read_at_least(0, "k", None);
        assert!(
            size_of_val(&read) <= 4096,
            "read: {} bytes",
            size_of_val(&read)
        );
        let body = serde_json::Map::new();
        let put = sc.put(0, "k", &body, "{}", None);
        assert!(
            size_of_val(&put) <= 4096,
            "put: {} bytes",
            size_of_val(&put)
        );
    }
}
