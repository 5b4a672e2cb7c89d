//! The operator's own metrics (`wtc_operator_` prefix).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub reconciliations: IntCounter,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub injections: IntCounterVec,
    /// 1 on the replica that holds the leader lease and reconciles.
    pub leader: IntGauge,
    /// Pods that asked for a sidecar and run without it (the watchdog's last round).
    pub uninjected_pods: IntGauge,
    /// Such pods evicted so their controller recreates them with the sidecar.
    pub uninjected_restarts: IntCounter,
    /// Injected pods whose sidecar runs an older configuration (the watchdog's last round).
    pub outdated_pods: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciliations = IntCounter::new(
            "wtc_operator_reconciliations_total",
            "Reconciliations started.",
        )
        .unwrap();
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "wtc_operator_reconcile_errors_total",
                "Reconciliations that failed, by error kind.",
            ),
            &["error"],
        )
        .unwrap();
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "wtc_operator_reconcile_duration_seconds",
                "Time to reconcile one cache.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )
        .unwrap();
        let injections = IntCounterVec::new(
            Opts::new(
                "wtc_operator_admissions_total",
                "Pods seen by the injection webhook, by result.",
            ),
            &["result"],
        )
        .unwrap();
        registry
            .register(Box::new(reconciliations.clone()))
            .unwrap();
        registry
            .register(Box::new(reconcile_errors.clone()))
            .unwrap();
        registry
            .register(Box::new(reconcile_duration.clone()))
            .unwrap();
        registry.register(Box::new(injections.clone())).unwrap();
        let leader = IntGauge::new(
            "wtc_operator_leader",
            "1 when this replica holds the leader lease and runs the controller.",
        )
        .unwrap();
        registry.register(Box::new(leader.clone())).unwrap();
        let uninjected_pods = IntGauge::new(
            "wtc_operator_pods_without_sidecar",
            "Pods that asked for the sidecar and run without it (the watchdog's last round).",
        )
        .unwrap();
        registry
            .register(Box::new(uninjected_pods.clone()))
            .unwrap();
        let uninjected_restarts = IntCounter::new(
            "wtc_operator_pods_without_sidecar_evicted_total",
            "Pods without their sidecar evicted so their controller recreates them with it.",
        )
        .unwrap();
        registry
            .register(Box::new(uninjected_restarts.clone()))
            .unwrap();
        let outdated_pods = IntGauge::new(
            "wtc_operator_pods_on_old_configuration",
            "Injected pods whose sidecar runs a configuration older than its cache's.",
        )
        .unwrap();
        registry.register(Box::new(outdated_pods.clone())).unwrap();
        Self {
            registry,
            reconciliations,
            reconcile_errors,
            reconcile_duration,
            injections,
            leader,
            uninjected_pods,
            uninjected_restarts,
            outdated_pods,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap_or_default()
    }
}
