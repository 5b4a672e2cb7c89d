//! The cache's status, computed from what a reconcile applied and observed. Pure (the old
//! conditions and the time are inputs), so every condition's cases are tested without a cluster;
//! `reconcile` only gathers the inputs and patches the result.

use crate::conditions::{ConditionType, Reason};
use crate::crd::WriteThroughCacheStatus;
use crate::sidecars::SidecarHealth;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::EventType;

#[derive(Debug, Clone, PartialEq)]
pub enum RedisHealth {
    Available,
    /// Why not, for the condition's message.
    Unavailable(String),
    External,
}

/// What applying the spec came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The spec renders no valid configuration (the message says why); nothing was applied.
    Invalid(String),
    /// Applied; how the Redis it uses is doing.
    Valid(RedisHealth),
}

/// Everything the status depends on besides the old conditions and the time.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The cache's `metadata.generation`.
    pub generation: Option<i64>,
    pub applied: Applied,
    pub sidecars: SidecarHealth,
    /// The managed Redis's `host:port`; `None` when Redis is external.
    pub redis_endpoint: Option<String>,
    pub commit_stream: crate::commit_stream::Stream,
}

/// One condition before its transition time is settled.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub type_: ConditionType,
    pub ok: bool,
    pub reason: Reason,
    pub message: String,
}

/// The conditions' verdicts, in the status's order.
pub fn verdicts(o: &Observed) -> Vec<Verdict> {
    let valid_msg = match &o.applied {
        Applied::Invalid(msg) => msg.clone(),
        Applied::Valid(_) => "the spec renders a valid sidecar configuration".to_string(),
    };
    let (redis_ok, redis_reason, redis_msg) = match &o.applied {
        Applied::Valid(RedisHealth::Available) => (
            true,
            Reason::Available,
            "the managed Redis is available".to_string(),
        ),
        Applied::Valid(RedisHealth::External) => (
            true,
            Reason::External,
            "Redis is external; the sidecars connect to it".to_string(),
        ),
        Applied::Valid(RedisHealth::Unavailable(m)) => (false, Reason::Unavailable, m.clone()),
        Applied::Invalid(_) => (
            false,
            Reason::InvalidSpec,
            "not reconciled: the spec is invalid".to_string(),
        ),
    };
    let valid = matches!(o.applied, Applied::Valid(_));
    // Ready names the first thing in the way: the spec, then Redis. Sidecars do not count: a
    // failing pod is the application's to fix, the cache itself is serving.
    let (ready_reason, ready_msg) = if !valid {
        (Reason::InvalidSpec, valid_msg.clone())
    } else if !redis_ok {
        (Reason::RedisUnavailable, redis_msg.clone())
    } else {
        (Reason::Ready, "the cache is ready".to_string())
    };
    let (sidecars_ok, sidecars_reason, sidecars_msg) = o.sidecars.condition();
    let stream = o
        .commit_stream
        .verdict()
        .map(|(ok, reason, message)| Verdict {
            type_: ConditionType::CommitStreamReady,
            ok,
            reason,
            message,
        });
    [
        Verdict {
            type_: ConditionType::Ready,
            ok: valid && redis_ok,
            reason: ready_reason,
            message: ready_msg,
        },
        Verdict {
            type_: ConditionType::RedisReady,
            ok: redis_ok,
            reason: redis_reason,
            message: redis_msg,
        },
        Verdict {
            type_: ConditionType::ConfigValid,
            ok: valid,
            reason: if valid {
                Reason::Valid
            } else {
                Reason::InvalidSpec
            },
            message: valid_msg,
        },
        Verdict {
            type_: ConditionType::SidecarsReady,
            ok: sidecars_ok,
            reason: sidecars_reason,
            message: sidecars_msg,
        },
    ]
    .into_iter()
    .chain(stream)
    .collect()
}

/// The status to write. `old` is the cache's current conditions: lastTransitionTime moves only
/// when a condition's status does, so it keeps saying since when the cache is (not) ready.
pub fn desired(o: &Observed, old: &[Condition], now: &Time) -> WriteThroughCacheStatus {
    let conditions = verdicts(o)
        .into_iter()
        .map(|v| {
            let status = if v.ok { "True" } else { "False" };
            let since = old
                .iter()
                .find(|c| c.type_ == v.type_.as_str() && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: v.type_.as_str().into(),
                status: status.into(),
                reason: v.reason.as_str().into(),
                message: v.message,
                observed_generation: o.generation,
                last_transition_time: since,
            }
        })
        .collect();
    WriteThroughCacheStatus {
        observed_generation: o.generation,
        conditions,
        redis_endpoint: o.redis_endpoint.clone().or_else(|| Some("external".into())),
        injected_pods: o.sidecars.injected,
        ready_sidecars: o.sidecars.ready,
        // The watchdog's field (its own field manager): left out of the controller's apply.
        uninjected_pods: None,
        outdated_pods: None,
        commit_stream: o.commit_stream.status(),
    }
}

/// An event to publish on the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub type_: EventType,
    pub reason: String,
    pub note: String,
}

/// Events for what changed from `old` (`None`: the cache had no status yet) to `new`: a warning
/// when sidecars start failing (not again on every pass while they keep failing), and one when
/// the cache turns ready or stops being ready. Both carry their condition's reason and message.
pub fn events(old: Option<&WriteThroughCacheStatus>, new: &WriteThroughCacheStatus) -> Vec<Notice> {
    let is = |s: Option<&WriteThroughCacheStatus>, t: ConditionType, status: &str| {
        s.into_iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.type_ == t.as_str() && c.status == status)
    };
    let get = |t: ConditionType| new.conditions.iter().find(|c| c.type_ == t.as_str());
    let mut notices = Vec::new();
    if let Some(c) = get(ConditionType::SidecarsReady)
        && c.status == "False"
        && !is(old, ConditionType::SidecarsReady, "False")
    {
        notices.push(Notice {
            type_: EventType::Warning,
            reason: c.reason.clone(),
            note: c.message.clone(),
        });
    }
    if let Some(c) = get(ConditionType::Ready) {
        let ready = c.status == "True";
        if old.is_none() || ready != is(old, ConditionType::Ready, "True") {
            notices.push(Notice {
                type_: if ready {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: c.reason.clone(),
                note: c.message.clone(),
            });
        }
    }
    notices
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecars::Failing;

    fn at(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(second).unwrap())
    }

    fn observed(applied: Applied) -> Observed {
        Observed {
            generation: Some(3),
            applied,
            sidecars: SidecarHealth {
                injected: 2,
                ready: 2,
                failing: vec![],
            },
            redis_endpoint: Some("c-redis.shop.svc:6379".into()),
            commit_stream: crate::commit_stream::Stream::Off,
        }
    }

    fn failing_sidecar() -> SidecarHealth {
        SidecarHealth {
            injected: 2,
            ready: 1,
            failing: vec![Failing {
                pod: "app-1".into(),
                reason: "ImagePullBackOff".into(),
                message: String::new(),
            }],
        }
    }

    /// (type, status, reason) of each condition, in order.
    fn summary(s: &WriteThroughCacheStatus) -> Vec<(&str, &str, &str)> {
        s.conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect()
    }

    fn message(s: &WriteThroughCacheStatus, t: ConditionType) -> &str {
        let c = s.conditions.iter().find(|c| c.type_ == t.as_str());
        &c.unwrap().message
    }

    #[test]
    fn the_strings_are_the_interface() {
        let types = [
            ConditionType::Ready,
            ConditionType::RedisReady,
            ConditionType::ConfigValid,
            ConditionType::SidecarsReady,
        ];
        assert_eq!(
            types.map(ConditionType::as_str),
            ["Ready", "RedisReady", "ConfigValid", "SidecarsReady"]
        );
        let reasons = [
            Reason::Ready,
            Reason::InvalidSpec,
            Reason::RedisUnavailable,
            Reason::Available,
            Reason::External,
            Reason::Unavailable,
            Reason::Valid,
            Reason::SidecarsRunning,
            Reason::SidecarFailing,
        ];
        assert_eq!(
            reasons.map(Reason::as_str),
            [
                "Ready",
                "InvalidSpec",
                "RedisUnavailable",
                "Available",
                "External",
                "Unavailable",
                "Valid",
                "SidecarsRunning",
                "SidecarFailing"
            ]
        );
    }

    #[test]
    fn managed_redis_available_is_ready_in_order() {
        let s = desired(
            &observed(Applied::Valid(RedisHealth::Available)),
            &[],
            &at(100),
        );
        assert_eq!(
            summary(&s),
            [
                ("Ready", "True", "Ready"),
                ("RedisReady", "True", "Available"),
                ("ConfigValid", "True", "Valid"),
                ("SidecarsReady", "True", "SidecarsRunning"),
            ]
        );
        assert_eq!(message(&s, ConditionType::Ready), "the cache is ready");
        assert_eq!(
            message(&s, ConditionType::RedisReady),
            "the managed Redis is available"
        );
        assert_eq!(
            message(&s, ConditionType::ConfigValid),
            "the spec renders a valid sidecar configuration"
        );
        assert_eq!(
            message(&s, ConditionType::SidecarsReady),
            "2 of 2 injected pods have a ready sidecar"
        );
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3) && c.last_transition_time == at(100))
        );
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.redis_endpoint.as_deref(), Some("c-redis.shop.svc:6379"));
        assert_eq!((s.injected_pods, s.ready_sidecars), (2, 2));
    }

    #[test]
    fn external_redis_is_ready_and_named_external() {
        let mut o = observed(Applied::Valid(RedisHealth::External));
        o.redis_endpoint = None;
        let s = desired(&o, &[], &at(100));
        assert_eq!(
            summary(&s)[..2],
            [
                ("Ready", "True", "Ready"),
                ("RedisReady", "True", "External")
            ]
        );
        assert_eq!(
            message(&s, ConditionType::RedisReady),
            "Redis is external; the sidecars connect to it"
        );
        assert_eq!(s.redis_endpoint.as_deref(), Some("external"));
    }

    #[test]
    fn unavailable_redis_holds_ready_back_with_its_message() {
        let o = observed(Applied::Valid(RedisHealth::Unavailable(
            "managed Redis is scaled to 0 replicas".into(),
        )));
        let s = desired(&o, &[], &at(100));
        assert_eq!(
            summary(&s)[..3],
            [
                ("Ready", "False", "RedisUnavailable"),
                ("RedisReady", "False", "Unavailable"),
                ("ConfigValid", "True", "Valid"),
            ]
        );
        assert_eq!(
            message(&s, ConditionType::Ready),
            "managed Redis is scaled to 0 replicas"
        );
        assert_eq!(
            message(&s, ConditionType::RedisReady),
            "managed Redis is scaled to 0 replicas"
        );
    }

    #[test]
    fn an_invalid_spec_says_why_on_ready_and_config_valid() {
        let o = observed(Applied::Invalid("spec.database.table is empty".into()));
        let s = desired(&o, &[], &at(100));
        assert_eq!(
            summary(&s)[..3],
            [
                ("Ready", "False", "InvalidSpec"),
                ("RedisReady", "False", "InvalidSpec"),
                ("ConfigValid", "False", "InvalidSpec"),
            ]
        );
        assert_eq!(
            message(&s, ConditionType::Ready),
            "spec.database.table is empty"
        );
        assert_eq!(
            message(&s, ConditionType::ConfigValid),
            "spec.database.table is empty"
        );
        assert_eq!(
            message(&s, ConditionType::RedisReady),
            "not reconciled: the spec is invalid"
        );
    }

    #[test]
    fn failing_sidecars_do_not_hold_ready_back() {
        let mut o = observed(Applied::Valid(RedisHealth::Available));
        o.sidecars = failing_sidecar();
        let s = desired(&o, &[], &at(100));
        assert_eq!(
            summary(&s),
            [
                ("Ready", "True", "Ready"),
                ("RedisReady", "True", "Available"),
                ("ConfigValid", "True", "Valid"),
                ("SidecarsReady", "False", "SidecarFailing"),
            ]
        );
        assert_eq!(
            message(&s, ConditionType::SidecarsReady),
            "1 of 2 injected pods cannot run their wtc-sidecar container: pod app-1: ImagePullBackOff"
        );
        assert_eq!((s.injected_pods, s.ready_sidecars), (2, 1));
    }

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let available = observed(Applied::Valid(RedisHealth::Available));
        let first = desired(&available, &[], &at(100));
        // Same statuses later, with new messages and reasons even: the times stay.
        let mut more_pods = available.clone();
        more_pods.sidecars.injected = 3;
        more_pods.sidecars.ready = 3;
        let again = desired(&more_pods, &first.conditions, &at(200));
        assert!(
            again
                .conditions
                .iter()
                .all(|c| c.last_transition_time == at(100))
        );
        assert_eq!(
            message(&again, ConditionType::SidecarsReady),
            "3 of 3 injected pods have a ready sidecar"
        );
        // Redis goes away: Ready and RedisReady move, ConfigValid and SidecarsReady do not.
        let down = observed(Applied::Valid(RedisHealth::Unavailable("gone".into())));
        let later = desired(&down, &again.conditions, &at(300));
        let times: Vec<Time> = later
            .conditions
            .iter()
            .map(|c| c.last_transition_time.clone())
            .collect();
        assert_eq!(times, [at(300), at(300), at(100), at(100)]);
        // A new reason under the same status keeps the time too (Available -> External).
        let external = observed(Applied::Valid(RedisHealth::External));
        let switched = desired(&external, &again.conditions, &at(400));
        assert_eq!(switched.conditions[1].reason, "External");
        assert_eq!(switched.conditions[1].last_transition_time, at(100));
    }

    #[test]
    fn events_on_the_first_status_and_on_changes_only() {
        let ready = desired(
            &observed(Applied::Valid(RedisHealth::Available)),
            &[],
            &at(100),
        );
        assert_eq!(
            events(None, &ready),
            [Notice {
                type_: EventType::Normal,
                reason: "Ready".into(),
                note: "the cache is ready".into(),
            }]
        );
        assert_eq!(events(Some(&ready), &ready), []);
        // An empty old status is a status: not ready before, ready now.
        assert_eq!(events(Some(&Default::default()), &ready).len(), 1);

        let invalid = desired(&observed(Applied::Invalid("bad".into())), &[], &at(200));
        assert_eq!(
            events(Some(&ready), &invalid),
            [Notice {
                type_: EventType::Warning,
                reason: "InvalidSpec".into(),
                note: "bad".into(),
            }]
        );
        assert_eq!(events(None, &invalid)[0].type_, EventType::Warning);
        assert_eq!(events(Some(&invalid), &invalid), []);
    }

    #[test]
    fn sidecar_failures_warn_once_before_the_ready_event() {
        let mut o = observed(Applied::Valid(RedisHealth::Available));
        o.sidecars = failing_sidecar();
        let failing = desired(&o, &[], &at(100));
        let reasons = |n: Vec<Notice>| -> Vec<(EventType, String)> {
            n.into_iter().map(|n| (n.type_, n.reason)).collect()
        };
        assert_eq!(
            reasons(events(None, &failing)),
            [
                (EventType::Warning, "SidecarFailing".into()),
                (EventType::Normal, "Ready".into())
            ]
        );
        assert_eq!(events(Some(&failing), &failing), []);
        let fine = desired(
            &observed(Applied::Valid(RedisHealth::Available)),
            &failing.conditions,
            &at(200),
        );
        assert_eq!(events(Some(&fine), &failing).len(), 1);
        assert_eq!(events(Some(&failing), &fine), []);
    }
}
