//! Prometheus metrics (`wtc_` prefix, base units). Label handles for each entity are resolved once
//! at startup so the hot path only bumps atomics.

use super::types::EntityId;
use super::write_ratio::WriteRatio;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};
use std::time::Instant;

/// Handles for one entity.
pub struct EntityMetrics {
    pub hit: IntCounter,
    pub miss: IntCounter,
    pub bypass: IntCounter,
    pub fill_won: IntCounter,
    pub fill_lost_lease: IntCounter,
    pub fill_rejected: IntCounter,
    pub fill_waited: IntCounter,
    pub write_ok: IntCounter,
    pub write_repairing: IntCounter,
    pub write_precondition_failed: IntCounter,
    pub write_rejected: IntCounter,
    pub write_failed: IntCounter,
}

/// What the epoch check of new Redis connections found (`redis_cache::link`).
#[derive(Clone)]
pub struct EpochCounters {
    /// Restarts of Redis that needed a sweep (`wtc_redis_epoch_changes_total`).
    pub changes: IntCounter,
    /// Keys deleted by sweeps (`wtc_redis_epoch_swept_keys_total`).
    pub swept_keys: IntCounter,
}

/// The commit stream (`commit_stream`): what it applied and how far behind it is.
#[derive(Clone)]
pub struct CommitStreamMetrics {
    /// Row changes applied, by `outcome`: evicted, kept (the cached version is as new),
    /// absent (nothing cached), unusable (no key in the change, or not a key of the column),
    /// unknown_table (no entity of this sidecar names the table).
    pub changes: IntCounterVec,
    /// TRUNCATEs of a cached table (each sweeps the cache).
    pub truncates: IntCounter,
    /// From a transaction's commit to its changes applied to the cache.
    pub apply_delay: Histogram,
    /// Age of the oldest committed change read but not yet applied (0: none).
    pub lag: Gauge,
    /// WAL the slot keeps on the database server's disk.
    pub retained_wal: IntGauge,
    /// 1 on the sidecar polling the slot.
    pub leading: IntGauge,
    /// Failures by `stage`: connect, poll, decode, apply, advance.
    pub errors: IntCounterVec,
}

pub struct Metrics {
    registry: Registry,
    pub entities: Vec<EntityMetrics>,
    pub db_read: Histogram,
    pub db_write: Histogram,
    pub cache_step: Histogram,
    pub cache_step_retries: IntCounter,
    pub cache_step_failures: IntCounter,
    pub repair_depth: IntGauge,
    pub repair_oldest_age: Gauge,
    pub repairs: IntCounter,
    /// Times the repair queue overflowed (then the cache is swept once Redis answers).
    pub repair_overflows: IntCounter,
    pub stale_window: Histogram,
    pub redis_errors: IntCounter,
    pub corrupt_entries: IntCounter,
    /// The epoch check of new Redis connections (`cache::link`).
    pub redis_epoch: EpochCounters,
    pub requests_shed: IntCounter,
    pub requests_waiting: IntGauge,
    /// Worker threads of the runtime (`runtime`): one means the current-thread scheduler.
    pub runtime_workers: IntGauge,
    pub requests_unauthorized: IntCounter,
    /// Connections over `limits.max_connections` (closed, or served one health check).
    pub connections_refused: IntCounter,
    /// Redis round trips of batches and bulk reads, by `op` (one per pipeline).
    pub redis_round_trips: IntCounterVec,
    /// Reads of a changed configuration file, by `result` (`ConfigReload`).
    pub config_reloads: IntCounterVec,
    pub sampler_checked: IntCounter,
    pub sampler_inconsistent: IntCounter,
    pub sampler_oldest_inconsistency: Gauge,
    pub sampler_queued: IntGauge,
    pub commit_stream: CommitStreamMetrics,
    reads: IntCounter,
    writes: IntCounter,
    /// Writes / all operations over a sliding window (`wtc_write_ratio`).
    pub write_ratio: WriteRatio,
    started: Instant,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

impl Metrics {
    pub fn new(entity_names: &[&str]) -> Self {
        let registry = Registry::new();
        let lookups = IntCounterVec::new(
            Opts::new("wtc_cache_lookups_total", "Reads by what the cache did: hit, miss (read from the database), bypass (cache skipped)."),
            &["entity", "result"],
        )
        .unwrap();
        let fills = IntCounterVec::new(
            Opts::new("wtc_fills_total", "Cache fills after a miss: won (stored), lost_lease (revoked by a write), rejected (newer version cached), waited (another filler's value used)."),
            &["entity", "outcome"],
        )
        .unwrap();
        let writes = IntCounterVec::new(
            Opts::new("wtc_writes_total", "Writes by outcome: ok, repairing (committed, cache step failed), precondition_failed, rejected (bad input), failed (database error)."),
            &["entity", "outcome"],
        )
        .unwrap();
        let db = HistogramVec::new(
            HistogramOpts::new("wtc_db_duration_seconds", "Database statement latency.")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )
        .unwrap();
        let cache_step = Histogram::with_opts(
            HistogramOpts::new(
                "wtc_cache_step_duration_seconds",
                "Latency of a write's cache step, retries included.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap();
        let stale_window = Histogram::with_opts(
            HistogramOpts::new(
                "wtc_stale_window_seconds",
                "Time from a failed cache step to its repair: how long other sidecars could read an older version.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0]),
        )
        .unwrap();
        let redis_round_trips = IntCounterVec::new(
            Opts::new("wtc_redis_round_trips_total", "Redis round trips of batches and bulk reads, by op: batch_intents, batch_release, batch_store, bulk_get, bulk_evict (values that were not envelopes), bulk_leases, bulk_fills (a pipeline is one)."),
            &["op"],
        )
        .unwrap();
        for op in [
            "batch_intents",
            "batch_release",
            "batch_store",
            "bulk_get",
            "bulk_evict",
            "bulk_leases",
            "bulk_fills",
        ] {
            redis_round_trips.with_label_values(&[op]);
        }
        let config_reloads = IntCounterVec::new(
            Opts::new("wtc_config_reloads_total", "Changes of the configuration file seen by the running sidecar, by result: applied (reloadable settings taken), needs_restart (other settings changed; nothing taken), invalid (the file does not parse or validate; nothing taken)."),
            &["result"],
        )
        .unwrap();
        for r in ["applied", "needs_restart", "invalid"] {
            config_reloads.with_label_values(&[r]);
        }
        let counter = |name: &str, help: &str| IntCounter::new(name, help).unwrap();
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).unwrap();
        let commit_stream = CommitStreamMetrics {
            changes: IntCounterVec::new(
                Opts::new("wtc_commit_stream_changes_total", "Row changes read from the commit stream, by outcome: evicted (the cached entry was older), kept (it was as new), absent (nothing cached), unusable (no usable key), unknown_table (a published table no entity of this sidecar names)."),
                &["outcome"],
            )
            .unwrap(),
            truncates: counter(
                "wtc_commit_stream_truncates_total",
                "TRUNCATEs of a cached table read from the commit stream (each sweeps the cache).",
            ),
            apply_delay: Histogram::with_opts(
                HistogramOpts::new(
                    "wtc_commit_stream_apply_delay_seconds",
                    "From a transaction's commit (database clock) to its changes applied to the cache.",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0]),
            )
            .unwrap(),
            lag: Gauge::new(
                "wtc_commit_stream_lag_seconds",
                "Age of the oldest committed change read from the commit stream and not yet applied (0: none).",
            )
            .unwrap(),
            retained_wal: gauge(
                "wtc_commit_stream_retained_wal_bytes",
                "WAL the commit stream's replication slot keeps on the database server.",
            ),
            leading: gauge(
                "wtc_commit_stream_leading",
                "1 on the sidecar that polls the commit stream (one per slot).",
            ),
            errors: IntCounterVec::new(
                Opts::new("wtc_commit_stream_errors_total", "Commit stream failures by stage: connect, poll, decode, apply, advance."),
                &["stage"],
            )
            .unwrap(),
        };
        for o in ["evicted", "kept", "absent", "unusable", "unknown_table"] {
            commit_stream.changes.with_label_values(&[o]);
        }
        for s in ["connect", "poll", "decode", "apply", "advance"] {
            commit_stream.errors.with_label_values(&[s]);
        }
        let m = Metrics {
            registry,
            entities: entity_names
                .iter()
                .map(|e| EntityMetrics {
                    hit: lookups.with_label_values(&[e, "hit"]),
                    miss: lookups.with_label_values(&[e, "miss"]),
                    bypass: lookups.with_label_values(&[e, "bypass"]),
                    fill_won: fills.with_label_values(&[e, "won"]),
                    fill_lost_lease: fills.with_label_values(&[e, "lost_lease"]),
                    fill_rejected: fills.with_label_values(&[e, "rejected"]),
                    fill_waited: fills.with_label_values(&[e, "waited"]),
                    write_ok: writes.with_label_values(&[e, "ok"]),
                    write_repairing: writes.with_label_values(&[e, "repairing"]),
                    write_precondition_failed: writes
                        .with_label_values(&[e, "precondition_failed"]),
                    write_rejected: writes.with_label_values(&[e, "rejected"]),
                    write_failed: writes.with_label_values(&[e, "failed"]),
                })
                .collect(),
            db_read: db.with_label_values(&["read"]),
            db_write: db.with_label_values(&["write"]),
            cache_step,
            cache_step_retries: counter(
                "wtc_cache_step_retries_total",
                "Retries of failed cache steps.",
            ),
            cache_step_failures: counter(
                "wtc_cache_step_failures_total",
                "Cache steps that failed after all retries (the key went to the repair queue).",
            ),
            repair_depth: gauge(
                "wtc_repair_queue_depth",
                "Keys waiting in the repair queue.",
            ),
            repair_oldest_age: Gauge::new(
                "wtc_repair_queue_oldest_age_seconds",
                "Age of the oldest key in the repair queue.",
            )
            .unwrap(),
            repair_overflows: counter(
                "wtc_repair_queue_overflows_total",
                "Times the repair queue reached cache.repair_queue_max_keys: every key then bypasses the cache until Redis answers and the cache is swept.",
            ),
            repairs: counter(
                "wtc_repairs_total",
                "Keys repaired (evicted) by the repair queue.",
            ),
            stale_window,
            redis_errors: counter("wtc_redis_errors_total", "Redis calls that failed."),
            corrupt_entries: counter(
                "wtc_cache_corrupt_entries_total",
                "Values in Redis that were not envelopes this sidecar would write: never served, evicted.",
            ),
            redis_epoch: EpochCounters {
                changes: counter(
                    "wtc_redis_epoch_changes_total",
                    "Redis restarts (new run id) after which this sidecar deleted every cached entry and lease before using Redis again.",
                ),
                swept_keys: counter(
                    "wtc_redis_epoch_swept_keys_total",
                    "Cached entries and leases deleted after Redis restarts (possibly restored from persistence, possibly older than acknowledged writes).",
                ),
            },
            requests_shed: counter(
                "wtc_requests_shed_total",
                "Requests answered 503 overloaded (no slot within limits.max_queue_wait_ms).",
            ),
            requests_waiting: gauge(
                "wtc_requests_waiting",
                "Requests waiting for a slot (limits.max_in_flight).",
            ),
            runtime_workers: gauge(
                "wtc_runtime_workers",
                "Worker threads serving requests: TOKIO_WORKER_THREADS, else the CPUs the container may use (its CPU limit, rounded down, at least 1).",
            ),
            requests_unauthorized: counter(
                "wtc_requests_unauthorized_total",
                "Requests answered 401: the API token was missing or wrong.",
            ),
            connections_refused: counter(
                "wtc_connections_refused_total",
                "Connections over limits.max_connections: closed at once, or served one health check.",
            ),
            redis_round_trips,
            config_reloads,
            sampler_checked: counter(
                "wtc_sampler_checked_total",
                "Sampled writes whose key the consistency sampler compared with the database.",
            ),
            sampler_inconsistent: counter(
                "wtc_sampler_inconsistent_total",
                "Keys whose cached envelope differed from the database (version or data), confirmed on a second look.",
            ),
            sampler_oldest_inconsistency: Gauge::new(
                "wtc_sampler_oldest_inconsistency_seconds",
                "Age of the oldest inconsistency the sampler still observes (0: none).",
            )
            .unwrap(),
            sampler_queued: gauge(
                "wtc_sampler_queued",
                "Sampled keys waiting for their check (or second look).",
            ),
            commit_stream,
            reads: counter("wtc_reads_total", "Reads served (all outcomes)."),
            writes: counter(
                "wtc_write_operations_total",
                "Writes attempted (all outcomes).",
            ),
            write_ratio: WriteRatio::new(60),
            started: Instant::now(),
        };
        for c in [
            Box::new(lookups) as Box<dyn prometheus::core::Collector>,
            Box::new(fills),
            Box::new(writes),
            Box::new(db),
            Box::new(m.cache_step.clone()),
            Box::new(m.cache_step_retries.clone()),
            Box::new(m.cache_step_failures.clone()),
            Box::new(m.repair_depth.clone()),
            Box::new(m.repair_oldest_age.clone()),
            Box::new(m.repairs.clone()),
            Box::new(m.repair_overflows.clone()),
            Box::new(m.stale_window.clone()),
            Box::new(m.redis_errors.clone()),
            Box::new(m.corrupt_entries.clone()),
            Box::new(m.redis_epoch.changes.clone()),
            Box::new(m.redis_epoch.swept_keys.clone()),
            Box::new(m.requests_shed.clone()),
            Box::new(m.requests_waiting.clone()),
            Box::new(m.runtime_workers.clone()),
            Box::new(m.requests_unauthorized.clone()),
            Box::new(m.connections_refused.clone()),
            Box::new(m.redis_round_trips.clone()),
            Box::new(m.config_reloads.clone()),
            Box::new(m.sampler_checked.clone()),
            Box::new(m.sampler_inconsistent.clone()),
            Box::new(m.sampler_oldest_inconsistency.clone()),
            Box::new(m.sampler_queued.clone()),
            Box::new(m.commit_stream.changes.clone()),
            Box::new(m.commit_stream.truncates.clone()),
            Box::new(m.commit_stream.apply_delay.clone()),
            Box::new(m.commit_stream.lag.clone()),
            Box::new(m.commit_stream.retained_wal.clone()),
            Box::new(m.commit_stream.leading.clone()),
            Box::new(m.commit_stream.errors.clone()),
            Box::new(m.reads.clone()),
            Box::new(m.writes.clone()),
        ] {
            m.registry.register(c).unwrap();
        }
        m
    }

    pub fn entity(&self, id: EntityId) -> &EntityMetrics {
        &self.entities[id.index()]
    }

    pub fn read_done(&self) {
        self.reads.inc();
        self.write_ratio.record(self.second(), false);
    }

    pub fn write_done(&self) {
        self.writes.inc();
        self.write_ratio.record(self.second(), true);
    }

    /// Whole seconds since the metrics were made: the write ratio's clock.
    pub fn second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// One Redis round trip of a batch or bulk read.
    pub fn round_trip(&self, op: &str) {
        self.redis_round_trips.with_label_values(&[op]).inc();
    }

    /// The text exposition, with the write ratio of the window computed at scrape time.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        let g = Gauge::new(
            "wtc_write_ratio",
            "Writes / all operations over the last sampler.write_ratio_window_seconds. Above 0.2-0.3, write-behind may serve better.",
        )
        .unwrap();
        g.set(self.write_ratio.ratio(self.second()));
        families.extend(prometheus::core::Collector::collect(&g));
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out).unwrap();
        String::from_utf8(out).unwrap_or_default()
    }
}
