//! The watchdog, on the leader: every interval it lists pods' metadata (paged, in the watched
//! namespaces), finds those that asked for a sidecar and run without it (`uninjected`), and
//! makes that visible: an Event on the pod and on its cache (once per pod), the cache's
//! `status.uninjectedPods` (a field this loop alone owns), a metric; with the cache's
//! `injection.restartPodsWithoutSidecar`, it evicts those the webhook merely missed, a few per
//! round, so their controller recreates them through the webhook. Likewise injected pods whose
//! sidecar started with an older configuration (`wtc.dev/config-hash`): `status.outdatedPods`,
//! and with `injection.restartOnConfigChange`, one eviction per controller per round.
//!
//! A poll, not a watch: a watch of every pod's metadata would hold the whole cluster's pods in
//! memory for a case that a working webhook makes rare.

use crate::crd::WriteThroughCache;
use crate::metrics::Metrics;
use crate::resources;
use crate::uninjected::{self, Outdated, Restart, RestartBudget, Uninjected};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ObjectReference, Pod};
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

const FIELD_MANAGER: &str = "wtc-operator-watchdog";
/// Evictions per round, over all caches: a missed burst is recreated gradually.
const MAX_EVICTIONS: usize = 5;

pub struct Watchdog {
    client: Client,
    namespace: Option<String>,
    /// Where the operator runs: the webhook never looks at its pods.
    operator_namespace: String,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    /// Pods already reported (by uid).
    reported: HashSet<String>,
    restarts: RestartBudget,
}

impl Watchdog {
    pub fn new(
        client: Client,
        namespace: Option<String>,
        operator_namespace: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), Reporter::from(FIELD_MANAGER)),
            client,
            namespace,
            operator_namespace: operator_namespace.into(),
            metrics,
            reported: HashSet::new(),
            restarts: RestartBudget::default(),
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Rounds every `interval` until `stop` completes.
    pub async fn run(mut self, interval: Duration, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(interval) => {}
            }
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, "watchdog: cannot list pods or caches");
            }
        }
    }

    pub async fn round(&mut self) -> Result<(), kube::Error> {
        let caches: Api<WriteThroughCache> = self.api();
        let caches = caches.list(&ListParams::default()).await?.items;
        let hashes: HashMap<(String, String), String> = caches
            .iter()
            .map(|c| {
                let key = (c.namespace().unwrap_or_default(), c.name_any());
                (key, resources::config_hash(c))
            })
            .collect();
        let current =
            |ns: &str, cache: &str| hashes.get(&(ns.to_string(), cache.to_string())).cloned();
        let pods: Api<Pod> = self.api();
        let mut found: Vec<Uninjected> = vec![];
        let mut outdated: Vec<Outdated> = vec![];
        let mut lp = ListParams::default()
            .fields(uninjected::NOT_FINISHED)
            .limit(500);
        loop {
            let page = pods.list_metadata(&lp).await?;
            for p in &page.items {
                found.extend(uninjected::find(&p.metadata));
                outdated.extend(uninjected::outdated(&p.metadata, current));
            }
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => lp = lp.continue_token(&token),
                _ => break,
            }
        }
        // What the pods' namespaces say (opted out of injection): one read per namespace.
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let mut excluded: HashMap<String, Option<&'static str>> = HashMap::new();
        for u in &found {
            if !excluded.contains_key(&u.namespace) {
                let ns = namespaces.get_opt(&u.namespace).await?;
                let labels = ns.as_ref().and_then(|n| n.metadata.labels.as_ref());
                excluded.insert(
                    u.namespace.clone(),
                    uninjected::namespace_excluded(&u.namespace, labels, &self.operator_namespace),
                );
            }
        }
        let found: Vec<Uninjected> = found
            .into_iter()
            .map(|u| {
                let why = excluded.get(&u.namespace).copied().flatten();
                uninjected::in_namespace(u, why)
            })
            .collect();
        self.metrics.uninjected_pods.set(found.len() as i64);
        self.metrics.outdated_pods.set(outdated.len() as i64);
        let counts = uninjected::counts(&found);
        let mut old_config: HashMap<(String, String), i32> = HashMap::new();
        for o in &outdated {
            *old_config
                .entry((o.namespace.clone(), o.cache.clone()))
                .or_insert(0) += 1;
        }
        for cache in &caches {
            let key = (cache.namespace().unwrap_or_default(), cache.name_any());
            let n = counts.get(&key).copied().unwrap_or(0);
            let m = old_config.get(&key).copied().unwrap_or(0);
            let status = cache.status.as_ref();
            let was = status.and_then(|s| s.outdated_pods);
            // Written once as 0 too, so `kubectl get wtc` shows a number, not a blank.
            if status.and_then(|s| s.uninjected_pods) != Some(n) || was != Some(m) {
                self.count(cache, n, m).await;
            }
            if m > 0 && was.unwrap_or(0) == 0 {
                self.config_changed(cache, m).await;
            }
        }
        let by_key: HashMap<(String, String), &WriteThroughCache> = caches
            .iter()
            .map(|c| ((c.namespace().unwrap_or_default(), c.name_any()), c))
            .collect();
        let present: HashSet<&str> = found.iter().map(|u| u.uid.as_str()).collect();
        self.reported.retain(|uid| present.contains(uid.as_str()));
        let mut evicted = 0;
        let now = Instant::now();
        let mut spent: HashSet<String> = HashSet::new();
        for u in &found {
            let cache = by_key.get(&(u.namespace.clone(), u.cache.clone())).copied();
            if self.reported.insert(u.uid.clone()) {
                self.report(u, cache).await;
            }
            let asked = cache.is_some_and(|c| c.spec.injection.restart_pods_without_sidecar);
            let Some(owner) = u.controller.as_deref().filter(|_| asked && u.transient) else {
                continue;
            };
            match self.restarts.check(owner, now) {
                Restart::Allowed if evicted < MAX_EVICTIONS => {
                    let done = self.evict(&pod_ref_of(u), &u.reason, cache).await;
                    evicted += usize::from(done);
                    if done {
                        self.metrics.uninjected_restarts.inc();
                        spent.insert(owner.to_string());
                    }
                }
                Restart::GivenUp if spent.insert(format!("gave-up:{owner}")) => {
                    self.gave_up(u, cache).await;
                }
                _ => {}
            }
        }
        for owner in spent.iter().filter(|o| !o.starts_with("gave-up:")) {
            self.restarts.spend(owner, now);
        }
        self.restarts
            .keep_only(found.iter().filter_map(|u| u.controller.as_deref()));
        // A configuration change, rolled: one pod per controller per round, so a Deployment
        // keeps its other replicas while one restarts.
        let mut rolled: HashSet<&str> = HashSet::new();
        let mut published: HashMap<(String, String), bool> = HashMap::new();
        for o in &outdated {
            let key = (o.namespace.clone(), o.cache.clone());
            let cache = by_key.get(&key).copied();
            let asked = cache.is_some_and(|c| c.spec.injection.restart_on_config_change);
            let Some(owner) = o.controller.as_deref().filter(|_| asked) else {
                continue;
            };
            // Only once the controller has written the new file: a pod recreated earlier would
            // mount the old one.
            if !published.contains_key(&key) {
                let ok = match cache {
                    Some(c) => self.published(c).await,
                    None => false,
                };
                published.insert(key.clone(), ok);
            }
            if !published[&key] {
                continue;
            }
            if evicted < MAX_EVICTIONS && rolled.insert(owner) {
                let why = "its sidecar runs the configuration from before the cache's last change";
                let pod = ObjectReference {
                    uid: Some(o.uid.clone()),
                    ..pod_ref(&o.namespace, &o.pod)
                };
                evicted += usize::from(self.evict(&pod, why, cache).await);
            }
        }
        Ok(())
    }

    async fn count(&self, cache: &WriteThroughCache, n: i32, outdated: i32) {
        let api: Api<WriteThroughCache> =
            Api::namespaced(self.client.clone(), &cache.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "apiVersion": "wtc.dev/v1alpha1",
            "kind": "WriteThroughCache",
            "status": {"uninjectedPods": n, "outdatedPods": outdated},
        });
        let pp = PatchParams::apply(FIELD_MANAGER);
        if let Err(e) = api
            .patch_status(&cache.name_any(), &pp, &Patch::Apply(&patch))
            .await
        {
            tracing::warn!(cache = %cache.name_any(), error = %e, "watchdog: cannot update the count");
        }
    }

    async fn report(&self, u: &Uninjected, cache: Option<&WriteThroughCache>) {
        tracing::warn!(namespace = %u.namespace, pod = %u.pod, cache = %u.cache, reason = %u.reason, "a pod runs without the sidecar it asked for");
        let on_pod = Event {
            type_: EventType::Warning,
            reason: "SidecarNotInjected".into(),
            note: Some(format!(
                "asked for the sidecar of cache {:?} and runs without it: {}",
                u.cache, u.reason
            )),
            action: "Inject".into(),
            secondary: None,
        };
        self.publish(&on_pod, &pod_ref_of(u)).await;
        if let Some(cache) = cache {
            let on_cache = Event {
                type_: EventType::Warning,
                reason: "PodWithoutSidecar".into(),
                note: Some(format!(
                    "pod {} runs without the sidecar: {}",
                    u.pod, u.reason
                )),
                action: "Inject".into(),
                secondary: Some(pod_ref_of(u)),
            };
            self.publish(&on_cache, &cache.object_ref(&())).await;
        }
    }

    /// Whether the pod was evicted (a PodDisruptionBudget may refuse: next round).
    async fn evict(
        &self,
        pod: &ObjectReference,
        why: &str,
        cache: Option<&WriteThroughCache>,
    ) -> bool {
        let (ns, name) = (
            pod.namespace.clone().unwrap_or_default(),
            pod.name.clone().unwrap_or_default(),
        );
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        match pods.evict(&name, &EvictParams::default()).await {
            Ok(_) => {
                tracing::info!(namespace = %ns, pod = %name, %why, "evicted, to be recreated by its controller");
                if let Some(cache) = cache {
                    let ev = Event {
                        type_: EventType::Normal,
                        reason: "PodRestarted".into(),
                        note: Some(format!(
                            "evicted pod {name} ({why}); its controller recreates it"
                        )),
                        action: "Evict".into(),
                        secondary: Some(pod.clone()),
                    };
                    self.publish(&ev, &cache.object_ref(&())).await;
                }
                true
            }
            Err(e) => {
                tracing::info!(namespace = %ns, pod = %name, error = %e, "cannot evict yet");
                false
            }
        }
    }

    /// The cache's ConfigMap holds its current configuration.
    async fn published(&self, cache: &WriteThroughCache) -> bool {
        let ns = cache.namespace().unwrap_or_default();
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        let Ok(Some(map)) = maps.get_opt(&resources::config_map_name(cache)).await else {
            return false;
        };
        let on_map = map
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(resources::CONFIG_HASH_ANNOTATION));
        on_map == Some(&resources::config_hash(cache))
    }

    async fn config_changed(&self, cache: &WriteThroughCache, n: i32) {
        let then = match cache.spec.injection.restart_on_config_change {
            true => "they are restarted one per controller at a time",
            false => {
                "restart them (kubectl rollout restart) or set \
                 spec.injection.restartOnConfigChange"
            }
        };
        let ev = Event {
            type_: EventType::Normal,
            reason: "PodsOnOldConfiguration".into(),
            note: Some(format!(
                "{n} pods run the sidecar configuration from before this cache's last change: {then}"
            )),
            action: "Configure".into(),
            secondary: None,
        };
        self.publish(&ev, &cache.object_ref(&())).await;
    }

    /// Once per round and controller, after its budget is spent: restarts do not help.
    async fn gave_up(&self, u: &Uninjected, cache: Option<&WriteThroughCache>) {
        let Some(cache) = cache else { return };
        let ev = Event {
            type_: EventType::Warning,
            reason: "PodRestartsNotHelping".into(),
            note: Some(format!(
                "pods of the controller of {} came back without the sidecar {} times: no more \
                 restarts; check that the API server reaches the webhook (kubectl -n wtc-system \
                 get endpoints, the operator's log)",
                u.pod,
                uninjected::RESTART_ROUNDS
            )),
            action: "Evict".into(),
            secondary: Some(pod_ref_of(u)),
        };
        self.publish(&ev, &cache.object_ref(&())).await;
    }

    async fn publish(&self, ev: &Event, on: &ObjectReference) {
        if let Err(e) = self.recorder.publish(ev, on).await {
            tracing::warn!(error = %e, "watchdog: could not publish an event");
        }
    }
}

fn pod_ref(namespace: &str, pod: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.into()),
        namespace: Some(namespace.into()),
        ..ObjectReference::default()
    }
}

fn pod_ref_of(u: &Uninjected) -> ObjectReference {
    ObjectReference {
        uid: Some(u.uid.clone()),
        ..pod_ref(&u.namespace, &u.pod)
    }
}
