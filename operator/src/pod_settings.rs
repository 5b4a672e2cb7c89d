//! Per-pod settings of the injected sidecar, by annotations on the pod (pure): its resources,
//! log level and port. A value that is not valid refuses the pod with a message naming the
//! annotation: the user asked for something precise, and a sidecar started without it would
//! surprise later (an OOM kill, a port the application does not call).
//!
//! Resources, for each of requests/limits and cpu/memory: the pod's annotation, else the cache's
//! `spec.sidecar.resources`, else the chart's `sidecarResources`.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

pub const CPU_REQUEST: &str = "wtc.dev/sidecar-cpu-request";
pub const MEMORY_REQUEST: &str = "wtc.dev/sidecar-memory-request";
pub const CPU_LIMIT: &str = "wtc.dev/sidecar-cpu-limit";
pub const MEMORY_LIMIT: &str = "wtc.dev/sidecar-memory-limit";
/// `error`, `warn`, `info`, `debug` or `trace` (the sidecar's `RUST_LOG`).
pub const LOG_LEVEL: &str = "wtc.dev/sidecar-log-level";
/// The loopback port the application calls, instead of the cache's `spec.sidecar.port`.
pub const PORT: &str = "wtc.dev/sidecar-port";
/// The pod-facing metrics port, instead of the cache's `spec.sidecar.metricsPort`.
pub const METRICS_PORT: &str = "wtc.dev/sidecar-metrics-port";

const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// (annotation, requests or limits, resource)
const RESOURCES: [(&str, Kind, &str); 4] = [
    (CPU_REQUEST, Kind::Requests, "cpu"),
    (MEMORY_REQUEST, Kind::Requests, "memory"),
    (CPU_LIMIT, Kind::Limits, "cpu"),
    (MEMORY_LIMIT, Kind::Limits, "memory"),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Requests,
    Limits,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodSettings {
    requests: BTreeMap<String, Quantity>,
    limits: BTreeMap<String, Quantity>,
    pub log_level: Option<String>,
    pub port: Option<u16>,
    pub metrics_port: Option<u16>,
}

/// The settings a pod's annotations ask for; `Err` names the first annotation that is wrong.
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<PodSettings, String> {
    let mut out = PodSettings::default();
    for (name, kind, resource) in RESOURCES {
        let Some(v) = annotations.get(name) else {
            continue;
        };
        let v = v.trim();
        if !is_quantity(v) {
            return Err(format!(
                "{name}: {v:?} is not a Kubernetes quantity (like 100m, 0.5, 64Mi, 1Gi)"
            ));
        }
        if resource == "memory" && value(v).is_some_and(|b| b < 1024.0 * 1024.0) {
            return Err(format!(
                "{name}: {v:?} is less than a MiB of memory (m is a thousandth: did you mean Mi?)"
            ));
        }
        let map = match kind {
            Kind::Requests => &mut out.requests,
            Kind::Limits => &mut out.limits,
        };
        map.insert(resource.into(), Quantity(v.into()));
    }
    if let Some(v) = annotations.get(LOG_LEVEL) {
        let level = v.trim().to_ascii_lowercase();
        if !LEVELS.contains(&level.as_str()) {
            return Err(format!(
                "{LOG_LEVEL}: {v:?} is not one of {}",
                LEVELS.join(", ")
            ));
        }
        out.log_level = Some(level);
    }
    for (name, slot) in [(PORT, &mut out.port), (METRICS_PORT, &mut out.metrics_port)] {
        if let Some(v) = annotations.get(name) {
            match v.trim().parse::<u16>() {
                Ok(p) if p >= 1024 => *slot = Some(p),
                _ => return Err(format!("{name}: {v:?} is not a port from 1024 to 65535")),
            }
        }
    }
    Ok(out)
}

impl PodSettings {
    /// The sidecar's resources: for each entry, this pod's, over the cache's, over the
    /// release's. A value inherited from a less specific layer gives way to a more specific
    /// one it contradicts: an inherited request above the limit is dropped (Kubernetes then
    /// requests the limit), an inherited limit below the request is raised to it. A request
    /// above the limit within the pod's own annotations refuses the pod.
    pub fn resources(
        &self,
        cache: Option<&ResourceRequirements>,
        release: Option<&ResourceRequirements>,
    ) -> Result<Option<ResourceRequirements>, String> {
        // (value, layer): 0 the release, 1 the cache, 2 the pod.
        type Layered = BTreeMap<String, (Quantity, u8)>;
        let merge = |pick: fn(&ResourceRequirements) -> Option<&BTreeMap<String, Quantity>>,
                     pod: &BTreeMap<String, Quantity>| {
            let mut m = Layered::new();
            for (layer, r) in [(0, release), (1, cache)] {
                for (k, v) in r.and_then(pick).into_iter().flatten() {
                    m.insert(k.clone(), (v.clone(), layer));
                }
            }
            for (k, v) in pod {
                m.insert(k.clone(), (v.clone(), 2));
            }
            m
        };
        let mut requests = merge(|r| r.requests.as_ref(), &self.requests);
        let mut limits = merge(|r| r.limits.as_ref(), &self.limits);
        for (resource, (limit, limit_layer)) in limits.iter_mut() {
            let Some((request, request_layer)) = requests.get(resource).cloned() else {
                continue;
            };
            let (Some(r), Some(l)) = (value(&request.0), value(&limit.0)) else {
                continue;
            };
            if r <= l {
                continue;
            }
            match request_layer.cmp(limit_layer) {
                std::cmp::Ordering::Less => {
                    requests.remove(resource);
                }
                std::cmp::Ordering::Greater => {
                    *limit = request;
                    *limit_layer = request_layer;
                }
                std::cmp::Ordering::Equal if request_layer == 2 => {
                    return Err(format!(
                        "the sidecar's {resource} request {} is above its limit {} \
                         (wtc.dev/sidecar-{resource}-request, wtc.dev/sidecar-{resource}-limit)",
                        request.0, limit.0
                    ));
                }
                // The cache's or the chart's own contradiction: the API server says so.
                std::cmp::Ordering::Equal => {}
            }
        }
        let plain =
            |m: Layered| (!m.is_empty()).then(|| m.into_iter().map(|(k, (v, _))| (k, v)).collect());
        let (requests, limits) = (plain(requests), plain(limits));
        if requests.is_none() && limits.is_none() {
            return Ok(None);
        }
        Ok(Some(ResourceRequirements {
            requests,
            limits,
            ..ResourceRequirements::default()
        }))
    }
}

/// A quantity's value, to compare two (`None` when it is not one).
pub fn value(q: &str) -> Option<f64> {
    if !is_quantity(q) {
        return None;
    }
    let q = q.strip_prefix('+').unwrap_or(q);
    let at = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(at);
    let n: f64 = number.parse().ok()?;
    let k = 1024f64;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => k,
        "Mi" => k * k,
        "Gi" => k * k * k,
        "Ti" => k.powi(4),
        "Pi" => k.powi(5),
        "Ei" => k.powi(6),
        e => 10f64.powi(e[1..].parse().ok()?),
    };
    Some(n * scale)
}

/// Kubernetes' quantity syntax: a decimal number and an optional suffix (binary `Ki`..`Ei`,
/// decimal `n`, `u`, `m`, `k`, `M`..`E`, or an exponent `e3`/`E3`).
pub fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix('+').unwrap_or(s);
    let digits = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits);
    let number_ok = !number.is_empty()
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let exponent = |e: &str| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    };
    let suffix_ok = matches!(
        suffix,
        "" | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
            | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(exponent);
    number_ok && suffix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn q(m: &[(&str, &str)]) -> Option<BTreeMap<String, Quantity>> {
        Some(
            m.iter()
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect(),
        )
    }

    #[test]
    fn quantities_as_kubernetes_writes_them() {
        for ok in [
            "1", "0.5", "100m", "64Mi", "1Gi", "2k", "1e3", "1E-2", "+1", "1.5G",
        ] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in [
            "", "Mi", "12x", "1.2.3", "-1", "1 Gi", "1e", "1ee3", "1GiB", ".", "1KI",
        ] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn annotations_override_the_cache_which_overrides_the_release() {
        let release = ResourceRequirements {
            requests: q(&[("cpu", "50m"), ("memory", "32Mi")]),
            limits: q(&[("cpu", "1"), ("memory", "128Mi")]),
            ..ResourceRequirements::default()
        };
        let cache = ResourceRequirements {
            limits: q(&[("memory", "256Mi")]),
            ..ResourceRequirements::default()
        };
        let pod = parse(&ann(&[(CPU_REQUEST, "200m")])).unwrap();
        let r = pod
            .resources(Some(&cache), Some(&release))
            .unwrap()
            .unwrap();
        assert_eq!(r.requests, q(&[("cpu", "200m"), ("memory", "32Mi")]));
        assert_eq!(r.limits, q(&[("cpu", "1"), ("memory", "256Mi")]));
        assert_eq!(PodSettings::default().resources(None, None), Ok(None));
        let only_pod = parse(&ann(&[(MEMORY_LIMIT, "64Mi")]))
            .unwrap()
            .resources(None, None)
            .unwrap()
            .unwrap();
        assert_eq!(
            (only_pod.requests, only_pod.limits),
            (None, q(&[("memory", "64Mi")]))
        );
    }

    #[test]
    fn a_more_specific_setting_wins_over_an_inherited_one_it_contradicts() {
        let release = ResourceRequirements {
            requests: q(&[("cpu", "50m"), ("memory", "32Mi")]),
            limits: q(&[("cpu", "1"), ("memory", "128Mi")]),
            ..ResourceRequirements::default()
        };
        // A lower limit than the inherited request: the request goes (Kubernetes requests the limit).
        let low = parse(&ann(&[(MEMORY_LIMIT, "16Mi")])).unwrap();
        let r = low.resources(None, Some(&release)).unwrap().unwrap();
        assert_eq!(r.requests, q(&[("cpu", "50m")]));
        assert_eq!(r.limits, q(&[("cpu", "1"), ("memory", "16Mi")]));
        // A higher request than the inherited limit: the limit follows it.
        let high = parse(&ann(&[(MEMORY_REQUEST, "256Mi")])).unwrap();
        let r = high.resources(None, Some(&release)).unwrap().unwrap();
        assert_eq!(r.limits, q(&[("cpu", "1"), ("memory", "256Mi")]));
        // Both from the pod and contradictory: refused, naming both annotations.
        let both = parse(&ann(&[(CPU_REQUEST, "2"), (CPU_LIMIT, "500m")])).unwrap();
        let e = both.resources(None, Some(&release)).unwrap_err();
        assert!(e.contains("cpu request 2") && e.contains(CPU_LIMIT), "{e}");
    }

    #[test]
    fn quantities_compare_by_value() {
        assert_eq!(value("1Gi"), Some(1024.0 * 1024.0 * 1024.0));
        assert!(value("500m").unwrap() < value("1").unwrap());
        assert!(value("2e3").unwrap() == value("2k").unwrap());
        assert_eq!(value("lots"), None);
    }

    #[test]
    fn a_wrong_value_names_its_annotation() {
        let e = parse(&ann(&[(MEMORY_LIMIT, "128m")])).unwrap_err();
        assert!(e.contains("did you mean Mi"), "{e}");
        let e = parse(&ann(&[(MEMORY_LIMIT, "12x")])).unwrap_err();
        assert!(e.starts_with(MEMORY_LIMIT) && e.contains("12x"), "{e}");
        let e = parse(&ann(&[(LOG_LEVEL, "loud")])).unwrap_err();
        assert!(e.starts_with(LOG_LEVEL), "{e}");
        for port in ["80", "70000", "x", ""] {
            let e = parse(&ann(&[(PORT, port)])).unwrap_err();
            assert!(e.starts_with(PORT), "{e}");
        }
        let s = parse(&ann(&[(LOG_LEVEL, "DEBUG"), (PORT, "7481")])).unwrap();
        assert_eq!(
            (s.log_level.as_deref(), s.port),
            (Some("debug"), Some(7481))
        );
    }
}
