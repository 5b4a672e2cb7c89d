//! What the injected sidecars are doing, read from their pods' statuses. Pure, so the cache's
//! status can say that a sidecar cannot start (a wrong image, a missing Secret, a crash loop)
//! without a client in the tests.

use crate::conditions::Reason;
use crate::injection::SIDECAR_NAME;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;

/// Failing pods named in the condition's message; the count says how many there are.
const NAMED_AT_MOST: usize = 3;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SidecarHealth {
    /// Pods carrying the sidecar (not finished, not being deleted).
    pub injected: i32,
    /// Of those, pods whose sidecar container is ready.
    pub ready: i32,
    /// Pods whose sidecar is waiting on something it will not get by itself, or has exited.
    pub failing: Vec<Failing>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failing {
    pub pod: String,
    /// The kubelet's reason: `ImagePullBackOff`, `CrashLoopBackOff`, `CreateContainerConfigError`...
    pub reason: String,
    pub message: String,
}

/// Waiting reasons that are part of a normal start.
const STARTING: [&str; 2] = ["ContainerCreating", "PodInitializing"];

pub fn health(pods: &[Pod]) -> SidecarHealth {
    let mut h = SidecarHealth::default();
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if pod.metadata.deletion_timestamp.is_some()
            || matches!(phase, Some("Succeeded" | "Failed"))
        {
            continue;
        }
        h.injected += 1;
        let Some(status) = sidecar_status(pod) else {
            continue; // not started yet (unscheduled, pulling the first image...)
        };
        if status.ready {
            h.ready += 1;
            continue;
        }
        let state = status.state.clone().unwrap_or_default();
        if let Some(w) = state.waiting {
            let reason = w.reason.unwrap_or_default();
            if !reason.is_empty() && !STARTING.contains(&reason.as_str()) {
                h.failing.push(Failing {
                    pod: pod.name_any(),
                    reason,
                    message: w.message.unwrap_or_default(),
                });
            }
        } else if let Some(t) = state.terminated {
            h.failing.push(Failing {
                pod: pod.name_any(),
                reason: t.reason.unwrap_or_else(|| "Terminated".into()),
                message: format!("exit code {}", t.exit_code),
            });
        }
    }
    h
}

/// The sidecar's status: among the init containers (native sidecar) or the containers.
fn sidecar_status(pod: &Pod) -> Option<&ContainerStatus> {
    let status = pod.status.as_ref()?;
    status
        .init_container_statuses
        .iter()
        .chain(status.container_statuses.iter())
        .flatten()
        .find(|c| c.name == SIDECAR_NAME)
}

impl SidecarHealth {
    /// The `SidecarsReady` condition: false only while some sidecar cannot run, with the reason
    /// the kubelet gives, so `kubectl describe wtc` says what `kubectl describe pod` would.
    pub fn condition(&self) -> (bool, Reason, String) {
        if self.failing.is_empty() {
            let message = match self.injected {
                0 => "no pod runs a sidecar of this cache".to_string(),
                n => format!("{} of {n} injected pods have a ready sidecar", self.ready),
            };
            return (true, Reason::SidecarsRunning, message);
        }
        let named: Vec<String> = self
            .failing
            .iter()
            .take(NAMED_AT_MOST)
            .map(|f| match f.message.is_empty() {
                true => format!("pod {}: {}", f.pod, f.reason),
                false => format!("pod {}: {}: {}", f.pod, f.reason, f.message),
            })
            .collect();
        let more = self.failing.len().saturating_sub(NAMED_AT_MOST);
        let mut message = format!(
            "{} of {} injected pods cannot run their {SIDECAR_NAME} container: {}",
            self.failing.len(),
            self.injected,
            named.join("; ")
        );
        if more > 0 {
            message.push_str(&format!(" (and {more} more)"));
        }
        (false, Reason::SidecarFailing, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"containers": [{"name": "app"}]},
            "status": status,
        }))
        .unwrap()
    }

    fn sidecar(state: serde_json::Value, ready: bool) -> serde_json::Value {
        json!({"phase": "Pending", "initContainerStatuses": [{
            "name": SIDECAR_NAME, "image": "x", "imageID": "", "ready": ready,
            "restartCount": 0, "state": state,
        }]})
    }

    #[test]
    fn a_sidecar_that_cannot_start_is_named_with_the_kubelets_reason() {
        let pods = [
            pod("ok", sidecar(json!({"running": {}}), true)),
            pod(
                "starting",
                sidecar(json!({"waiting": {"reason": "ContainerCreating"}}), false),
            ),
            pod(
                "bad-image",
                sidecar(
                    json!({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope:1\""}}),
                    false,
                ),
            ),
            pod("unscheduled", json!({"phase": "Pending"})),
        ];
        let h = health(&pods);
        assert_eq!((h.injected, h.ready, h.failing.len()), (4, 1, 1));
        let (ok, reason, message) = h.condition();
        assert!(!ok);
        assert_eq!(reason.as_str(), "SidecarFailing");
        assert_eq!(
            message,
            "1 of 4 injected pods cannot run their wtc-sidecar container: pod bad-image: \
             ImagePullBackOff: Back-off pulling image \"nope:1\""
        );
    }

    #[test]
    fn crash_loops_and_exits_count_finished_pods_do_not() {
        let mut done = pod(
            "done",
            sidecar(json!({"terminated": {"exitCode": 0}}), false),
        );
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let pods = [
            pod(
                "loop",
                sidecar(json!({"waiting": {"reason": "CrashLoopBackOff"}}), false),
            ),
            pod(
                "exited",
                sidecar(
                    json!({"terminated": {"exitCode": 2, "reason": "Error"}}),
                    false,
                ),
            ),
            done,
        ];
        let h = health(&pods);
        assert_eq!(h.injected, 2);
        let reasons: Vec<&str> = h.failing.iter().map(|f| f.reason.as_str()).collect();
        assert_eq!(reasons, ["CrashLoopBackOff", "Error"]);
        assert!(h.condition().2.contains("pod exited: Error: exit code 2"));
    }

    #[test]
    fn all_running_or_none_is_fine() {
        assert_eq!(
            health(&[]).condition(),
            (
                true,
                Reason::SidecarsRunning,
                "no pod runs a sidecar of this cache".into()
            )
        );
        let h = health(&[pod("a", sidecar(json!({"running": {}}), true))]);
        assert!(h.condition().0);
        assert_eq!(h.condition().2, "1 of 1 injected pods have a ready sidecar");
    }
}
