//! The commit stream on Kubernetes (docs/commit-stream.md, "On Kubernetes"), the pure part: the
//! names of a cache's replication slot and publication, the reader's configuration and
//! Deployment, the Job that drops the slot, what the reader's metrics say, and the condition.
//! `reconcile` applies, lists and reads.
//!
//! One reader per cache (and region): a Deployment of one pod running the sidecar binary with
//! the stream on (`Recreate`, and the slot's advisory lock keeps a second one idle anyway). The
//! injected sidecars leave the stream to it, so it runs whatever the application's scale.
//!
//! No slot is left retaining WAL: the names the reader may have created are written in the
//! cache's status before the reader is applied, and they leave the status only once the drop
//! Job has dropped them (the stream turned off, renamed, or the cache deleted). The Job runs
//! only after the reader's pods are gone: a reader polling between the drop and its own end
//! would make the slot again.

use crate::crd::{CommitStreamStatus, Versions, WriteThroughCache};
use crate::injection::{self, config_path};
use crate::pod_settings::PodSettings;
use crate::resources::{self, CONFIG_KEY, Release, hash, labels, meta};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, PodSecurityContext, PodSpec, PodTemplateSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::ResourceExt;
use std::collections::BTreeMap;
use wtc_config::{CommitStreamConfig, SidecarConfig, VersionSource};

/// The reader's pods (`app.kubernetes.io/name`); the managed Redis' NetworkPolicy admits them.
pub const READER_COMPONENT: &str = "wtc-commit-stream";
pub const DROP_COMPONENT: &str = "wtc-commit-stream-drop";
/// The reader's configuration, a second key of the cache's ConfigMap.
pub const READER_CONFIG_KEY: &str = "commit-stream.toml";
/// A reader further behind than this turns `CommitStreamReady` false.
pub const LAGGING_AFTER_SECONDS: f64 = 30.0;
/// Connections the reader's pool may open (it serves no application).
const READER_POOL_SIZE: u32 = 2;

/// A slot and its publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub slot: String,
    pub publication: String,
}

impl Names {
    pub fn of(status: &CommitStreamStatus) -> Names {
        Names {
            slot: status.slot.clone(),
            publication: status.publication.clone(),
        }
    }
}

/// The names the cache's spec asks for, when the stream is on.
pub fn wanted(cr: &WriteThroughCache) -> Option<Names> {
    let spec = cr.spec.commit_stream.as_ref().filter(|c| c.enabled)?;
    let default = default_name(cr);
    Some(Names {
        slot: spec.slot.clone().unwrap_or_else(|| default.clone()),
        publication: spec.publication.clone().unwrap_or(default),
    })
}

/// `wtc_<namespace>_<name>[_<region>]_<hash>`: readable, at most 63 characters of
/// `[a-z0-9_]`, and distinct for distinct caches (the hash is of the exact names: `a-b` and
/// `a_b` read the same).
fn default_name(cr: &WriteThroughCache) -> String {
    let ns = cr.namespace().unwrap_or_default();
    let name = cr.name_any();
    let region = cr.spec.region.clone().unwrap_or_default();
    let mut readable: String = [ns.as_str(), name.as_str(), region.as_str()]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("_")
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '_',
        })
        .collect();
    readable.truncate(46);
    let digest = hash(&format!("{ns}/{name}/{region}"));
    format!("wtc_{readable}_{}", &digest[8..])
}

pub fn reader_name(cr: &WriteThroughCache) -> String {
    format!("{}-commit-stream", cr.name_any())
}

/// The reader's selector labels.
pub fn reader_selector(cr: &WriteThroughCache) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            READER_COMPONENT.to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), cr.name_any()),
    ])
}

/// The port of the reader's `/metrics` (the operator reads its lag there): the sidecars' metrics
/// port, or the default one when the cache turns theirs off.
pub fn reader_metrics_port(cr: &WriteThroughCache) -> u16 {
    match cr.spec.sidecar.metrics_port {
        // Not the API's port, which the reader listens on too (on loopback).
        0 if cr.spec.sidecar.port == wtc_config::defaults::METRICS_PORT => {
            wtc_config::defaults::METRICS_PORT + 1
        }
        0 => wtc_config::defaults::METRICS_PORT,
        p => p,
    }
}

/// The reader's configuration: the sidecars' with the stream on.
pub fn reader_config(cr: &WriteThroughCache, names: &Names) -> SidecarConfig {
    let mut config = resources::sidecar_config(cr);
    let poll = cr
        .spec
        .commit_stream
        .as_ref()
        .map_or(CommitStreamConfig::default().poll_interval_ms, |c| {
            c.poll_interval_ms
        });
    config.commit_stream = CommitStreamConfig {
        enabled: true,
        slot: names.slot.clone(),
        publication: names.publication.clone(),
        poll_interval_ms: poll,
    };
    config.metrics_listen = Some(format!("0.0.0.0:{}", reader_metrics_port(cr)));
    config.database.pool_size = config.database.pool_size.min(READER_POOL_SIZE);
    config
}

pub fn version_source(v: Versions) -> VersionSource {
    match v {
        Versions::Sidecar => VersionSource::Sidecar,
        Versions::Trigger => VersionSource::Trigger,
    }
}

/// The reader: one pod running the sidecar with the reader's configuration. Its pod template
/// carries the configuration's hash: a change (an entity added, whose table the publication
/// gains when the reader opens the slot) rolls the reader, which reads its file only at start.
pub fn reader_deployment(cr: &WriteThroughCache, images: &Release, names: &Names) -> Deployment {
    let port = reader_metrics_port(cr);
    let mut container = injection::sidecar_container(cr, images, &PodSettings::default());
    container.args = Some(vec!["--config".into(), config_path(READER_CONFIG_KEY)]);
    container.ports = Some(vec![ContainerPort {
        name: Some(injection::METRICS_PORT_NAME.into()),
        container_port: i32::from(port),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }]);
    // The sidecar's resources unless the cache gives the reader its own (a namespace's
    // ResourceQuota may require them).
    if let Some(r) = cr
        .spec
        .commit_stream
        .as_ref()
        .and_then(|c| c.resources.clone())
    {
        container.resources = Some(r);
    }
    let selector = reader_selector(cr);
    Deployment {
        metadata: meta(cr, reader_name(cr), READER_COMPONENT),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            // The old reader stops before the new one starts.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..DeploymentStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(cr, READER_COMPONENT)),
                    annotations: Some(BTreeMap::from([(
                        resources::CONFIG_HASH_ANNOTATION.to_string(),
                        hash(&reader_config(cr, names).render()),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(sidecar_pod(cr, container)),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// A pod of the sidecar binary alone (the reader, the drop Job): the injected sidecar's
/// volumes, no API token.
fn sidecar_pod(cr: &WriteThroughCache, container: Container) -> PodSpec {
    PodSpec {
        containers: vec![container],
        volumes: Some(injection::sidecar_volumes(cr)),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            ..PodSecurityContext::default()
        }),
        automount_service_account_token: Some(false),
        ..PodSpec::default()
    }
}

/// The Job that drops `names`: a name of its own per slot and publication, so a drop of other
/// names never reuses a finished one.
pub fn drop_job_name(cr: &WriteThroughCache, names: &Names) -> String {
    let digest = hash(&format!(
        "{}/{}/{}/{}",
        cr.namespace().unwrap_or_default(),
        cr.name_any(),
        names.slot,
        names.publication
    ));
    format!("wtc-drop-slot-{}", &digest[8..])
}

/// The sidecar binary, told to drop the slot and the publication and exit; the database
/// settings (URL, TLS) are the sidecars'. The image is the operator's release, never the one a
/// cache pins: an older sidecar does not know `--drop-slot`.
pub fn drop_job(cr: &WriteThroughCache, images: &Release, names: &Names) -> Job {
    let mut container = injection::sidecar_container(cr, images, &PodSettings::default());
    container.image = Some(images.sidecar.clone());
    container.args = Some(vec![
        "--config".into(),
        config_path(CONFIG_KEY),
        "--drop-slot".into(),
        names.slot.clone(),
        "--drop-publication".into(),
        names.publication.clone(),
    ]);
    container.startup_probe = None;
    container.readiness_probe = None;
    container.liveness_probe = None;
    container.ports = None;
    Job {
        metadata: meta(cr, drop_job_name(cr, names), DROP_COMPONENT),
        spec: Some(JobSpec {
            backoff_limit: Some(4),
            // The drop waits up to a minute for a reader still holding the slot.
            active_deadline_seconds: Some(DROP_JOB_DEADLINE_SECONDS),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(cr, DROP_COMPONENT)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    ..sidecar_pod(cr, container)
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

/// How a drop Job is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    Running,
    Succeeded,
    /// Its `Failed` condition's message.
    Failed(String),
}

pub fn job_outcome(job: &Job) -> JobOutcome {
    let status = job.status.clone().unwrap_or_default();
    let condition = |t: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t && c.status == "True")
            .cloned()
    };
    if status.succeeded.unwrap_or(0) > 0 || condition("Complete").is_some() {
        JobOutcome::Succeeded
    } else if let Some(c) = condition("Failed") {
        JobOutcome::Failed(c.message.unwrap_or_else(|| c.reason.unwrap_or_default()))
    } else {
        JobOutcome::Running
    }
}

/// What the reader's `/metrics` say.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub leading: bool,
    pub lag_seconds: f64,
    pub retained_wal_bytes: i64,
}

/// The reader's figures from the Prometheus text of its `/metrics`; `None` when they are not
/// all there (not a reader, or not the sidecar).
pub fn reading(metrics: &str) -> Option<Reading> {
    let value = |name: &str| -> Option<f64> {
        metrics.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
    };
    // Rounded: every new figure is a status write, which brings another pass at once; whole
    // seconds and two significant digits change seldom.
    Some(Reading {
        leading: value("wtc_commit_stream_leading")? >= 1.0,
        lag_seconds: value("wtc_commit_stream_lag_seconds")?.round(),
        retained_wal_bytes: two_digits(value("wtc_commit_stream_retained_wal_bytes")? as i64),
    })
}

/// `n` rounded down to two significant digits (123,456 -> 120,000).
fn two_digits(n: i64) -> i64 {
    let mut scale = 1;
    while n / scale >= 100 {
        scale *= 10;
    }
    n / scale * scale
}

/// The reader as the operator finds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reader {
    /// No pod of it is running with an address yet.
    Starting,
    /// Running, but its metrics could not be read (why).
    Unreadable(String),
    Read(Reading),
}

/// The commit stream's part of the status.
#[derive(Debug, Clone, PartialEq)]
pub enum Stream {
    /// Off, and no slot of ours exists.
    Off,
    /// On: the reader of `names`.
    Reading { names: Names, reader: Reader },
    /// `names` are being dropped (the stream turned off or renamed, or the cache deleted).
    Dropping { names: Names, stage: DropStage },
    /// The spec is invalid: nothing was applied, the slot of `names` is kept.
    Unchanged { names: Names },
}

/// The drop Job's `activeDeadlineSeconds`.
pub const DROP_JOB_DEADLINE_SECONDS: i64 = 600;

#[derive(Debug, Clone, PartialEq)]
pub enum DropStage {
    /// The reader's pods are still stopping.
    ReaderStopping,
    Running(String),
    Failed {
        job: String,
        message: String,
    },
}

impl Stream {
    /// `status.commitStream`.
    pub fn status(&self) -> Option<CommitStreamStatus> {
        match self {
            Stream::Off => None,
            Stream::Reading { names, reader } => {
                let read = match reader {
                    Reader::Read(r) => Some(r),
                    _ => None,
                };
                Some(CommitStreamStatus {
                    slot: names.slot.clone(),
                    publication: names.publication.clone(),
                    lag_seconds: read.map(|r| r.lag_seconds),
                    retained_wal_bytes: read.map(|r| r.retained_wal_bytes),
                })
            }
            Stream::Dropping { names, .. } | Stream::Unchanged { names } => {
                Some(CommitStreamStatus {
                    slot: names.slot.clone(),
                    publication: names.publication.clone(),
                    lag_seconds: None,
                    retained_wal_bytes: None,
                })
            }
        }
    }

    /// `CommitStreamReady`: `None` while the stream is off and nothing is left to drop.
    pub fn verdict(&self) -> Option<(bool, crate::conditions::Reason, String)> {
        use crate::conditions::Reason;
        Some(match self {
            Stream::Off => return None,
            Stream::Reading { names, reader } => match reader {
                Reader::Starting => (
                    false,
                    Reason::ReaderStarting,
                    format!("the reader of slot {} is not running yet", names.slot),
                ),
                Reader::Unreadable(why) => (
                    false,
                    Reason::ReaderUnreadable,
                    format!("cannot read the reader's metrics: {why}"),
                ),
                Reader::Read(r) if !r.leading => (
                    false,
                    Reason::NotLeading,
                    format!(
                        "the reader does not hold slot {} (another reader of that slot holds \
                         its lock, or it cannot reach the database or Redis: see its log)",
                        names.slot
                    ),
                ),
                Reader::Read(r) if r.lag_seconds > LAGGING_AFTER_SECONDS => (
                    false,
                    Reason::Lagging,
                    format!(
                        "the reader is {:.0} s behind the database (slot {}, {} bytes of WAL \
                         retained)",
                        r.lag_seconds, names.slot, r.retained_wal_bytes
                    ),
                ),
                Reader::Read(r) => (
                    true,
                    Reason::Reading,
                    format!(
                        "slot {} is read, {:.0} s behind, about {} bytes of WAL retained",
                        names.slot, r.lag_seconds, r.retained_wal_bytes
                    ),
                ),
            },
            Stream::Unchanged { names } => (
                false,
                Reason::InvalidSpec,
                format!(
                    "not reconciled: the spec is invalid; slot {} is kept as it is",
                    names.slot
                ),
            ),
            Stream::Dropping { names, stage } => match stage {
                DropStage::ReaderStopping => (
                    false,
                    Reason::Dropping,
                    format!(
                        "waiting for the reader to stop before dropping slot {}",
                        names.slot
                    ),
                ),
                DropStage::Running(job) => (
                    false,
                    Reason::Dropping,
                    format!(
                        "Job {job} drops slot {} and publication {}",
                        names.slot, names.publication
                    ),
                ),
                DropStage::Failed { job, message } => (
                    false,
                    Reason::DropFailed,
                    format!(
                        "Job {job} could not drop slot {} ({message}): see kubectl logs \
                         job/{job}, then delete the Job to try again; the slot retains WAL \
                         until it is dropped",
                        names.slot
                    ),
                ),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::CommitStreamSpec;
    use crate::resources::fixtures::CacheBuilder;

    fn with_stream(mut cr: WriteThroughCache) -> WriteThroughCache {
        cr.spec.commit_stream =
            Some(serde_json::from_value(serde_json::json!({"enabled": true})).unwrap());
        cr
    }

    #[test]
    fn default_names_are_identifiers_distinct_per_cache_and_region() {
        let a = wanted(&with_stream(CacheBuilder::new("orders").build())).unwrap();
        assert_eq!(a.slot, a.publication);
        assert!(a.slot.starts_with("wtc_shop_orders_"), "{}", a.slot);
        let mut names = vec![a.slot.clone()];
        for (name, region) in [
            ("orders-x", None),
            ("orders_x", None),
            ("orders", Some("eu")),
        ] {
            let mut cr = with_stream(CacheBuilder::new(name).build());
            cr.spec.region = region.map(String::from);
            names.push(wanted(&cr).unwrap().slot);
        }
        let long = "a".repeat(63);
        let mut cr = with_stream(CacheBuilder::new(&long).build());
        cr.metadata.namespace = Some("n".repeat(63));
        cr.spec.region = Some("r".repeat(32));
        names.push(wanted(&cr).unwrap().slot);
        for n in &names {
            assert!(n.len() <= 63, "{n}");
            assert!(
                n.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_')),
                "{n}"
            );
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }

    #[test]
    fn names_given_in_the_spec_win_and_off_wants_none() {
        let mut cr = CacheBuilder::new("orders").build();
        assert_eq!(wanted(&cr), None);
        cr.spec.commit_stream = Some(CommitStreamSpec {
            enabled: true,
            slot: Some("s1".into()),
            publication: Some("p1".into()),
            poll_interval_ms: 25,
            resources: None,
        });
        let names = wanted(&cr).unwrap();
        assert_eq!(
            (names.slot.as_str(), names.publication.as_str()),
            ("s1", "p1")
        );
        let config = reader_config(&cr, &names);
        assert!(config.commit_stream.enabled);
        assert_eq!(config.commit_stream.poll_interval_ms, 25);
        assert_eq!(
            config.metrics_listen,
            Some(format!("0.0.0.0:{}", wtc_config::defaults::METRICS_PORT))
        );
        // The sidecars' own configuration leaves the stream to the reader.
        assert!(!resources::sidecar_config(&cr).commit_stream.enabled);
        cr.spec.commit_stream.as_mut().unwrap().enabled = false;
        assert_eq!(wanted(&cr), None);
    }

    #[test]
    fn the_reader_runs_the_sidecar_with_its_own_configuration_and_the_same_secrets() {
        let cr = with_stream(CacheBuilder::new("orders").build());
        let names = wanted(&cr).unwrap();
        let d = reader_deployment(&cr, &Release::default(), &names);
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_deref().unwrap(),
            ["--config", "/etc/wtc/commit-stream.toml"]
        );
        let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert!(
            env.contains(&"WTC_DATABASE_URL") && env.contains(&"WTC_REDIS_PASSWORD_FILE"),
            "{env:?}"
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        let labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels["app.kubernetes.io/name"], READER_COMPONENT);
        // Not counted as a pod injected for the cache, and admitted to the managed Redis.
        assert!(!labels.contains_key(resources::INJECTED_LABEL));
        let desired = |cr: &WriteThroughCache| {
            let auth = crate::redis_auth::RedisAuth::next(
                None,
                crate::redis_auth::Moment {
                    now: 0,
                    grace_seconds: 0,
                    hold: false,
                },
                || "pw".into(),
            );
            resources::desired(cr, &auth, &Release::default()).unwrap()
        };
        let d = desired(&cr);
        assert!(d.reader.is_some());
        assert!(
            d.config_map
                .data
                .as_ref()
                .unwrap()
                .contains_key(READER_CONFIG_KEY)
        );
        let np = d.redis.unwrap().network_policy.unwrap();
        let from = np.spec.unwrap().ingress.unwrap()[0].from.clone().unwrap();
        assert!(
            from.iter().any(
                |p| p.pod_selector.as_ref().and_then(|s| s.match_labels.clone())
                    == Some(reader_selector(&cr))
            ),
            "{from:?}"
        );
        let off = desired(&CacheBuilder::new("orders").build());
        assert!(off.reader.is_none());
        assert!(!off.config_map.data.unwrap().contains_key(READER_CONFIG_KEY));
    }

    #[test]
    fn a_change_of_the_readers_configuration_rolls_it_and_its_ports_never_clash() {
        let hash_of = |cr: &WriteThroughCache| {
            let d = reader_deployment(cr, &Release::default(), &wanted(cr).unwrap());
            d.spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()[resources::CONFIG_HASH_ANNOTATION]
                .clone()
        };
        let cr = with_stream(CacheBuilder::new("orders").build());
        let more = with_stream(CacheBuilder::new("orders").entity("invoices").build());
        assert_ne!(hash_of(&cr), hash_of(&more));
        assert_eq!(hash_of(&cr), hash_of(&cr.clone()));
        let mut cr = cr;
        cr.spec.sidecar.metrics_port = 0;
        cr.spec.sidecar.port = wtc_config::defaults::METRICS_PORT;
        let config = reader_config(&cr, &wanted(&cr).unwrap());
        let mut probe = config.clone();
        probe.database.url = "postgres://x".into();
        probe.redis.url = "redis://x".into();
        probe.validate().unwrap();
        assert_ne!(reader_metrics_port(&cr), cr.spec.sidecar.port);
    }

    #[test]
    fn the_drop_job_names_what_it_drops_and_a_rename_gets_another_job() {
        let cr = with_stream(CacheBuilder::new("orders").build());
        let a = Names {
            slot: "s1".into(),
            publication: "p1".into(),
        };
        let b = Names {
            slot: "s2".into(),
            publication: "p1".into(),
        };
        let job = drop_job(&cr, &Release::default(), &a);
        let c = &job.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(
            c.args.as_deref().unwrap(),
            [
                "--config",
                "/etc/wtc/sidecar.toml",
                "--drop-slot",
                "s1",
                "--drop-publication",
                "p1"
            ]
        );
        assert!(c.readiness_probe.is_none() && c.liveness_probe.is_none());
        // A cache pinning an older sidecar still gets a drop that knows `--drop-slot`.
        let mut pinned = cr.clone();
        pinned.spec.sidecar.image = Some("registry.local/wtc-sidecar:0.0.1".into());
        let job = drop_job(&pinned, &Release::default(), &a);
        let c = &job.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(c.image, Some(Release::default().sidecar));
        assert_ne!(drop_job_name(&cr, &a), drop_job_name(&cr, &b));
        assert!(drop_job_name(&cr, &a).len() <= 63);
    }

    #[test]
    fn the_metrics_text_gives_the_reading() {
        let text = "# HELP wtc_commit_stream_lag_seconds x\n# TYPE wtc_commit_stream_lag_seconds gauge\n\
                    wtc_commit_stream_lag_seconds 0.25\nwtc_commit_stream_leading 1\n\
                    wtc_commit_stream_leading_other 0\nwtc_commit_stream_retained_wal_bytes 123456\n";
        assert_eq!(
            reading(text),
            Some(Reading {
                leading: true,
                lag_seconds: 0.0,
                retained_wal_bytes: 120_000
            })
        );
        assert_eq!(two_digits(56), 56);
        assert_eq!(two_digits(1_299_999_999), 1_200_000_000);
        assert_eq!(reading("wtc_commit_stream_leading 1\n"), None);
        assert_eq!(reading(""), None);
    }

    #[test]
    fn the_condition_names_what_is_in_the_way() {
        use crate::conditions::Reason;
        let names = Names {
            slot: "s".into(),
            publication: "p".into(),
        };
        let read = |leading, lag| Stream::Reading {
            names: names.clone(),
            reader: Reader::Read(Reading {
                leading,
                lag_seconds: lag,
                retained_wal_bytes: 10,
            }),
        };
        let reason = |s: Stream| s.verdict().map(|(ok, r, _)| (ok, r));
        assert_eq!(reason(Stream::Off), None);
        assert_eq!(reason(read(true, 0.01)), Some((true, Reason::Reading)));
        assert_eq!(reason(read(true, 31.0)), Some((false, Reason::Lagging)));
        assert_eq!(reason(read(false, 0.0)), Some((false, Reason::NotLeading)));
        assert_eq!(
            reason(Stream::Reading {
                names: names.clone(),
                reader: Reader::Starting
            }),
            Some((false, Reason::ReaderStarting))
        );
        let failed = Stream::Dropping {
            names: names.clone(),
            stage: DropStage::Failed {
                job: "j".into(),
                message: "BackoffLimitExceeded".into(),
            },
        };
        let (_, _, message) = failed.verdict().unwrap();
        assert!(message.contains("kubectl logs job/j"), "{message}");
        assert_eq!(failed.status().unwrap().slot, "s");
        assert_eq!(read(true, 0.5).status().unwrap().lag_seconds, Some(0.5));
    }
}
