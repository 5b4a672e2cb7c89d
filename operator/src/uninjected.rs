//! Pods that asked for the sidecar and run without it, the pure part: which they are, why, and
//! whether recreating them would help. The watchdog (`watchdog.rs`) lists pods' metadata and acts.

use crate::injection::{CACHE_UNREADABLE, INJECT_ANNOTATION, INJECTED_LABEL, SKIPPED_ANNOTATION};
use crate::webhook::{ALWAYS_EXCLUDED, NAMESPACE_OPT_OUT_LABEL};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;

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
    /// A controller (ReplicaSet, StatefulSet, Job...) recreates it when evicted.
    pub controlled: bool,
}

/// The pod's state as far as injection goes, from its metadata alone.
pub fn find(meta: &ObjectMeta) -> Option<Uninjected> {
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let cache = meta.annotations.as_ref()?.get(INJECT_ANNOTATION)?;
    if meta
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(INJECTED_LABEL))
    {
        return None;
    }
    let noted = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(SKIPPED_ANNOTATION));
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
        controlled: meta
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true)),
    })
}

/// When the pod's namespace is one the webhook never looks at: why (the pod is then not the
/// webhook's miss, and recreating it would not help).
pub fn namespace_excluded(
    name: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> Option<&'static str> {
    if ALWAYS_EXCLUDED.contains(&name) {
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
        assert!(u.transient && !u.controlled);
        let mut gone = meta(&[(INJECT_ANNOTATION, "c")], &[]);
        gone.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert_eq!(find(&gone), None);
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
        let off = namespace_excluded("shop", Some(&labels));
        assert!(off.is_some());
        let u2 = in_namespace(u.clone(), off);
        assert!(!u2.transient && u2.reason.contains("disabled"));
        assert!(namespace_excluded("kube-system", None).is_some());
        assert_eq!(namespace_excluded("shop", None), None);
        assert_eq!(in_namespace(u.clone(), None), u);
    }

    #[test]
    fn controlled_pods_and_counts() {
        let mut m = meta(&[(INJECT_ANNOTATION, "c")], &[]);
        m.owner_references = Some(vec![OwnerReference {
            controller: Some(true),
            kind: "ReplicaSet".into(),
            name: "rs".into(),
            ..OwnerReference::default()
        }]);
        let a = find(&m).unwrap();
        assert!(a.controlled);
        let mut b = a.clone();
        b.pod = "q".into();
        let mut c = a.clone();
        c.cache = "d".into();
        let n = counts([&a, &b, &c]);
        assert_eq!(n[&("shop".to_string(), "c".to_string())], 2);
        assert_eq!(n[&("shop".to_string(), "d".to_string())], 1);
    }
}
