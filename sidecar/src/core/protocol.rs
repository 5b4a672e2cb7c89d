//! The protocol's state: one `Protocol` (like a controller's `Context`), generic over its two
//! ports, the cache store and the row store. The read path is in `read.rs` and `bulk_read.rs`,
//! the write path in `write.rs`; none of them knows HTTP, Redis or SQL.

use super::flights::Flights;
use super::metrics::Metrics;
use super::ports::{CacheStore, RowStore};
use super::repair::RepairQueue;
use super::sampler::{self, Sampler};
use super::types::EntityId;
use super::write_ratio::{self, WriteRatio};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wtc_config::SidecarConfig;

/// A configuration change beyond what a running sidecar reloads.
#[derive(Debug, PartialEq)]
pub struct NeedsRestart;

pub struct Protocol<C, R> {
    /// Replaced whole by `reload`, which changes only the settings
    /// `SidecarConfig::without_reloadable` names: each use reads them here, none is copied.
    config: ArcSwap<SidecarConfig>,
    /// Entity names, by `EntityId`.
    names: Vec<String>,
    entity_index: HashMap<String, EntityId>,
    pub(crate) cache: C,
    pub(crate) rows: R,
    pub(crate) repair: RepairQueue,
    pub(crate) metrics: Metrics,
    pub(crate) flights: Flights,
    pub(crate) sampler: Sampler,
    /// Early refreshes spawned by hits, and the give-back of leases whose readers went away:
    /// owned, so that shutdown waits for them.
    pub(crate) refreshes: TaskTracker,
}

impl<C: CacheStore, R: RowStore> Protocol<C, R> {
    pub fn new(config: SidecarConfig, cache: C, rows: R, mut metrics: Metrics) -> Self {
        metrics.write_ratio = WriteRatio::new(config.sampler.write_ratio_window_seconds);
        let names: Vec<String> = config.entities.iter().map(|e| e.name.clone()).collect();
        let entity_index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), EntityId::new(i)))
            .collect();
        Self {
            names,
            entity_index,
            cache,
            rows,
            repair: RepairQueue::new(config.cache.repair_queue_max_keys),
            metrics,
            flights: Flights::default(),
            sampler: Sampler::new(&config.sampler),
            refreshes: TaskTracker::new(),
            config: ArcSwap::from_pointee(config),
        }
    }

    /// The configuration now (a reload may have changed its reloadable settings since start).
    pub fn config(&self) -> Arc<SidecarConfig> {
        self.config.load_full()
    }

    /// Takes `new`'s reloadable settings when nothing else differs from the configuration in
    /// use: `Ok` with what changed (perhaps nothing); `Err` with nothing changed when the rest
    /// differs too, which only a restart applies.
    pub fn reload(&self, new: &SidecarConfig) -> Result<Vec<String>, NeedsRestart> {
        let current = self.config();
        if current.without_reloadable() != new.without_reloadable() {
            return Err(NeedsRestart);
        }
        let changed = current.reloadable_changes(new);
        if !changed.is_empty() {
            self.config.store(Arc::new(new.clone()));
        }
        Ok(changed)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn cache(&self) -> &C {
        &self.cache
    }

    pub fn rows(&self) -> &R {
        &self.rows
    }

    pub fn entity(&self, name: &str) -> Option<EntityId> {
        self.entity_index.get(name).copied()
    }

    pub fn entity_name(&self, id: EntityId) -> &str {
        &self.names[id.index()]
    }

    /// Keys waiting in the repair queue.
    pub fn repairs_pending(&self) -> usize {
        self.repair.len()
    }

    /// Waits for the early refreshes in flight; no new one starts after this.
    pub async fn finish_refreshes(&self) {
        self.refreshes.close();
        self.refreshes.wait().await;
    }

    /// One pass of the repair queue (the loop's, and the last one at shutdown).
    pub async fn repair_once(&self) {
        if !self.repair.is_empty() {
            self.repair.drain_once(&self.cache, &self.metrics).await;
        }
    }

    /// Starts the background loops: the repair queue, the consistency sampler, the write-ratio
    /// watch. They run until `Background::stop`.
    pub fn start_background(self: &Arc<Self>) -> Background {
        let bg = Background {
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        let config = self.config();
        let every = Duration::from_millis(config.cache.repair_interval_ms.max(10));
        let p = Arc::clone(self);
        bg.every(every, move || {
            let p = Arc::clone(&p);
            async move { p.repair_once().await }
        });
        let s = &config.sampler;
        if s.enabled && s.sample_rate > 0.0 {
            let every = Duration::from_millis(s.interval_ms.max(10));
            let p = Arc::clone(self);
            bg.every(every, move || {
                let p = Arc::clone(&p);
                async move {
                    let ports = sampler::Ports {
                        cache: &p.cache,
                        rows: &p.rows,
                        repair: &p.repair,
                        metrics: &p.metrics,
                        names: &p.names,
                    };
                    p.sampler.check_once(&ports).await
                }
            });
        }
        let p = Arc::clone(self);
        bg.every(Duration::from_secs(1), move || {
            let p = Arc::clone(&p);
            async move { p.watch_write_ratio() }
        });
        bg
    }

    /// Warns (at most once a minute) while the write ratio has stayed above
    /// `write_ratio::WARN_ABOVE` for a whole window.
    fn watch_write_ratio(&self) {
        let w = &self.metrics.write_ratio;
        if let Some(ratio) = w.tick(self.metrics.second()) {
            tracing::warn!(
                write_ratio = format!("{ratio:.2}"),
                window_seconds = w.window_seconds(),
                "writes have been over {:.0}% of all operations for the whole window: \
                 write-behind may serve this workload better than write-through",
                write_ratio::WARN_ABOVE * 100.0
            );
        }
    }
}

/// The protocol's background loops, owned: `stop` ends them and waits until they have.
pub struct Background {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Background {
    fn every<F, Fut>(&self, period: Duration, mut pass: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                // A pass is not cut in the middle: a repair's eviction completes.
                pass().await;
            }
        });
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
