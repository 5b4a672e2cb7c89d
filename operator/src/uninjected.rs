//! Pods that asked for the sidecar and run without it, the pure part: which they are, why, and
//! whether recreating them would help. The watchdog (`watchdog.rs`) lists pods' metadata and acts.

use crate::injection::{
    ALREADY_INJECTED, CACHE_UNREADABLE, INJECT_ANNOTATION, INJECTED_LABEL, SKIPPED_ANNOTATION,
};
use crate::resources::CONFIG_HASH_ANNOTATION;
use crate::webhook::{ALWAYS_EXCLUDED, NAMESPACE_OPT_OUT_LABEL};

/// The webhook's object selector leaves out pods labelled `app.kubernetes.io/name=wtc-operator`.
const OPERATOR_LABEL: &str = "app.kubernetes.io/name";
const OPERATOR_NAME: &str = "wtc-operator";
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// A field selector for pods still running or about to: finished pods (a Job's, evicted ones)
/// keep labels and annotations but use nothing.
pub const NOT_FINISHED: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// Why a pod has no sidecar when the webhook left no reason on it.
pub const NOT_SEEN: &str =
    "the injection webhook did not see this pod (down or too slow when it was created)";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uninjected {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub cache: String,
    pub reason: String,
    /// Created again, it would get the sidecar: the cause was the webhook's, not the pod's.
    pub transient: bool,
    /// The uid of its controller (ReplicaSet, StatefulSet...) that recreates it when evicted;
    /// `None` for bare pods and Jobs' pods (an eviction would count against the Job's retries).
    pub controller: Option<String>,
}

/// The pod's state as far as injection goes, from its metadata alone.
pub fn find(meta: &ObjectMeta) -> Option<Uninjected> {
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let cache = meta.annotations.as_ref()?.get(INJECT_ANNOTATION)?;
    let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k));
    // Injected; or the operator's own pods, which the webhook never sees.
    if label(INJECTED_LABEL).is_some() || label(OPERATOR_LABEL).is_some_and(|v| v == OPERATOR_NAME)
    {
        return None;
    }
    let noted = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(SKIPPED_ANNOTATION));
    if noted.is_some_and(|r| r == ALREADY_INJECTED) {
        return None;
    }
    let (reason, transient) = match noted {
        None => (NOT_SEEN.to_string(), true),
        Some(r) => (r.clone(), r == CACHE_UNREADABLE),
    };
    Some(Uninjected {
        namespace: meta.namespace.clone()?,
        pod: meta.name.clone()?,
        uid: meta.uid.clone().unwrap_or_default(),
        cache: cache.clone(),
        reason,
        transient,
        controller: controller(meta),
    })
}

/// When the pod's namespace is one the webhook never looks at: why (the pod is then not the
/// webhook's miss, and recreating it would not help).
pub fn namespace_excluded(
    name: &str,
    labels: Option<&BTreeMap<String, String>>,
    operator_namespace: &str,
) -> Option<&'static str> {
    if ALWAYS_EXCLUDED.contains(&name) || name == operator_namespace {
        return Some("pods in this namespace are never injected");
    }
    let disabled = labels
        .and_then(|l| l.get(NAMESPACE_OPT_OUT_LABEL))
        .is_some_and(|v| v == "disabled");
    disabled.then_some("injection is disabled in this namespace (label wtc.dev/injection=disabled)")
}

/// Applies what the pod's namespace says (see `namespace_excluded`).
pub fn in_namespace(mut u: Uninjected, excluded: Option<&str>) -> Uninjected {
    if let Some(reason) = excluded {
        u.reason = reason.to_string();
        u.transient = false;
    }
    u
}

/// Evictions per controller: a few rounds, spaced, then no more. When the API server cannot
/// reach the webhook, every replacement is missed too: restarting would loop.
#[derive(Debug, Default)]
pub struct RestartBudget {
    /// controller uid -> (rounds with evictions, when the last one was)
    rounds: HashMap<String, (u32, Instant)>,
}

pub const RESTART_ROUNDS: u32 = 3;
pub const RESTART_SPACING: Duration = Duration::from_secs(60);

#[derive(Debug, PartialEq, Eq)]
pub enum Restart {
    Allowed,
    /// Too soon after this controller's last round.
    Later,
    /// Its pods came back without the sidecar every time: stop.
    GivenUp,
}

impl RestartBudget {
    pub fn check(&self, controller: &str, now: Instant) -> Restart {
        match self.rounds.get(controller) {
            None => Restart::Allowed,
            Some((n, _)) if *n >= RESTART_ROUNDS => Restart::GivenUp,
            Some((_, last)) if now.duration_since(*last) < RESTART_SPACING => Restart::Later,
            Some(_) => Restart::Allowed,
        }
    }

    /// A round evicted pods of `controller`.
    pub fn spend(&mut self, controller: &str, now: Instant) {
        let e = self
            .rounds
            .entry(controller.to_string())
            .or_insert((0, now));
        *e = (e.0 + 1, now);
    }

    /// Forgets controllers with no pod missing any more (they were fixed).
    pub fn keep_only<'a>(&mut self, present: impl IntoIterator<Item = &'a str>) {
        let present: std::collections::HashSet<&str> = present.into_iter().collect();
        self.rounds.retain(|k, _| present.contains(k.as_str()));
    }
}

/// An injected pod whose sidecar started with another configuration than its cache's now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outdated {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub cache: String,
    pub controller: Option<String>,
}

/// `current(namespace, cache)`: the hash of that cache's configuration, if the cache exists.
/// Pods injected before the hash was written (an older operator) are not judged.
pub fn outdated(
    meta: &ObjectMeta,
    current: impl Fn(&str, &str) -> Option<String>,
) -> Option<Outdated> {
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let cache = meta.labels.as_ref()?.get(INJECTED_LABEL)?;
    let started_with = meta.annotations.as_ref()?.get(CONFIG_HASH_ANNOTATION)?;
    let namespace = meta.namespace.clone()?;
    if current(&namespace, cache)? == *started_with {
        return None;
    }
    Some(Outdated {
        namespace,
        pod: meta.name.clone()?,
        uid: meta.uid.clone().unwrap_or_default(),
        cache: cache.clone(),
        controller: controller(meta),
    })
}

fn controller(meta: &ObjectMeta) -> Option<String> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind != "Job")
        .map(|o| o.uid.clone())
}

/// Pods without their sidecar, by (namespace, cache).
pub fn counts<'a>(
    found: impl IntoIterator<Item = &'a Uninjected>,
) -> BTreeMap<(String, String), i32> {
    let mut out = BTreeMap::new();
    for u in found {
        *out.entry((u.namespace.clone(), u.cache.clone()))
            .or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};

    fn meta(annotations: &[(&str, &str)], labels: &[(&str, &str)]) -> ObjectMeta {
        let map = |kv: &[(&str, &str)]| {
            Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        ObjectMeta {
            name: Some("p".into()),
            namespace: Some("shop".into()),
            uid: Some("u1".into()),
            annotations: map(annotations),
            labels: map(labels),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn only_opted_in_pods_without_the_injected_label() {
        assert_eq!(find(&meta(&[], &[])), None);
        assert_eq!(
            find(&meta(&[(INJECT_ANNOTATION, "c")], &[(INJECTED_LABEL, "c")])),
            None
        );
        let u = find(&meta(&[(INJECT_ANNOTATION, "c")], &[])).unwrap();
        assert_eq!((u.cache.as_str(), u.reason.as_str()), ("c", NOT_SEEN));
        assert!(u.transient && u.controller.is_none());
        let mut gone = meta(&[(INJECT_ANNOTATION, "c")], &[]);
        gone.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert_eq!(find(&gone), None);
    }

    #[test]
    fn pods_the_webhook_never_injects_are_not_reported() {
        let mine = meta(
            &[(INJECT_ANNOTATION, "c")],
            &[(OPERATOR_LABEL, OPERATOR_NAME)],
        );
        assert_eq!(find(&mine), None);
        let own = meta(
            &[
                (INJECT_ANNOTATION, "c"),
                (SKIPPED_ANNOTATION, ALREADY_INJECTED),
            ],
            &[],
        );
        assert_eq!(find(&own), None);
    }

    #[test]
    fn the_webhooks_reason_is_kept_and_only_its_own_failures_are_transient() {
        let on_purpose = find(&meta(
            &[
                (INJECT_ANNOTATION, "c"),
                (
                    SKIPPED_ANNOTATION,
                    "pod does not match the cache's pod selector",
                ),
            ],
            &[],
        ))
        .unwrap();
        assert_eq!(
            on_purpose.reason,
            "pod does not match the cache's pod selector"
        );
        assert!(!on_purpose.transient);
        let failed = find(&meta(
            &[
                (INJECT_ANNOTATION, "c"),
                (SKIPPED_ANNOTATION, CACHE_UNREADABLE),
            ],
            &[],
        ))
        .unwrap();
        assert!(failed.transient);
    }

    #[test]
    fn a_namespace_the_webhook_never_sees_is_the_reason_and_not_transient() {
        let u = find(&meta(&[(INJECT_ANNOTATION, "c")], &[])).unwrap();
        let labels: BTreeMap<String, String> =
            [(NAMESPACE_OPT_OUT_LABEL.to_string(), "disabled".to_string())].into();
        let off = namespace_excluded("shop", Some(&labels), "wtc-system");
        assert!(off.is_some());
        let u2 = in_namespace(u.clone(), off);
        assert!(!u2.transient && u2.reason.contains("disabled"));
        assert!(namespace_excluded("kube-system", None, "wtc-system").is_some());
        assert!(namespace_excluded("wtc-system", None, "wtc-system").is_some());
        assert_eq!(namespace_excluded("shop", None, "wtc-system"), None);
        assert_eq!(in_namespace(u.clone(), None), u);
    }

    #[test]
    fn restarts_stop_after_a_few_spaced_rounds() {
        let mut b = RestartBudget::default();
        let t0 = Instant::now();
        assert_eq!(b.check("rs", t0), Restart::Allowed);
        b.spend("rs", t0);
        assert_eq!(b.check("rs", t0 + Duration::from_secs(5)), Restart::Later);
        let t1 = t0 + RESTART_SPACING;
        assert_eq!(b.check("rs", t1), Restart::Allowed);
        b.spend("rs", t1);
        let t2 = t1 + RESTART_SPACING;
        b.spend("rs", t2);
        assert_eq!(b.check("rs", t2 + RESTART_SPACING * 10), Restart::GivenUp);
        assert_eq!(b.check("other", t2), Restart::Allowed);
        b.keep_only(["other"]);
        assert_eq!(
            b.check("rs", t2),
            Restart::Allowed,
            "fixed, then missed again: a new budget"
        );
    }

    #[test]
    fn a_pod_is_outdated_when_its_hash_is_not_its_caches() {
        let m = meta(
            &[(INJECT_ANNOTATION, "c"), (CONFIG_HASH_ANNOTATION, "aaaa")],
            &[(INJECTED_LABEL, "c")],
        );
        let now = |h: &'static str| move |_: &str, _: &str| Some(h.to_string());
        assert_eq!(outdated(&m, now("aaaa")), None);
        let o = outdated(&m, now("bbbb")).unwrap();
        assert_eq!((o.cache.as_str(), o.pod.as_str()), ("c", "p"));
        // The cache is gone, or the pod predates the hash: not judged.
        assert_eq!(outdated(&m, |_: &str, _: &str| None), None);
        let old = meta(&[(INJECT_ANNOTATION, "c")], &[(INJECTED_LABEL, "c")]);
        assert_eq!(outdated(&old, now("bbbb")), None);
    }

    #[test]
    fn controlled_pods_and_counts() {
        let mut m = meta(&[(INJECT_ANNOTATION, "c")], &[]);
        m.owner_references = Some(vec![OwnerReference {
            controller: Some(true),
            kind: "ReplicaSet".into(),
            name: "rs".into(),
            uid: "rs-uid".into(),
            ..OwnerReference::default()
        }]);
        let mut job = m.clone();
        job.owner_references.as_mut().unwrap()[0].kind = "Job".into();
        assert_eq!(
            find(&job).unwrap().controller,
            None,
            "a Job's pods are not evicted"
        );
        let a = find(&m).unwrap();
        assert_eq!(a.controller.as_deref(), Some("rs-uid"));
        let mut b = a.clone();
        b.pod = "q".into();
        let mut c = a.clone();
        c.cache = "d".into();
        let n = counts([&a, &b, &c]);
        assert_eq!(n[&("shop".to_string(), "c".to_string())], 2);
        assert_eq!(n[&("shop".to_string(), "d".to_string())], 1);
    }
}
