//! The desired objects for one `WriteThroughCache`: pure, no client. Spec in, objects out, so unit
//! tests drive it from plain data; `reconcile` applies what it returns.

use crate::crd::{ManagedRedis, WriteThroughCache};
use crate::redis_auth::RedisAuth;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, Secret,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use wtc_config::{
    CacheConfig, DatabaseConfig, Entity, Limits, RedisConfig, RetryBudget, SidecarConfig,
};

pub const REDIS_PORT: i32 = 6379;
pub const CONFIG_KEY: &str = "sidecar.toml";
pub use crate::redis_auth::{PASSWORD_KEY, REDIS_AUTH_FILE};
const REDIS_AUTH_DIR: &str = "/etc/wtc-redis";
pub const CACHE_LABEL: &str = "wtc.dev/cache";
/// Set on injected pods (value: the cache): the operator counts them with a label selector, and
/// the managed Redis' NetworkPolicy admits them.
pub const INJECTED_LABEL: &str = "wtc.dev/injected-for";

/// What the operator's release puts in pods where a cache says nothing: the images
/// (`--sidecar-image`, `--redis-image`) and the injected sidecar's resources (`--sidecar-*`
/// flags from the chart's `sidecarResources`).
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    pub sidecar: String,
    pub redis: String,
    pub sidecar_resources: Option<ResourceRequirements>,
    /// Where the operator's pods run: the managed Redis' NetworkPolicy admits them (they apply
    /// password rotations).
    pub operator_namespace: String,
}

/// Redis as packaged by `scripts/images` (Debian's redis-server).
pub const REDIS_VERSION: &str = "7.0.15";

impl Default for Release {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION");
        Self {
            sidecar: format!("ghcr.io/wtc-dev/wtc-sidecar:{version}"),
            redis: format!("ghcr.io/wtc-dev/redis:{REDIS_VERSION}"),
            sidecar_resources: None,
            operator_namespace: "wtc-system".into(),
        }
    }
}

pub fn redis_name(cr: &WriteThroughCache) -> String {
    format!("{}-redis", cr.name_any())
}
pub fn redis_claim_name(cr: &WriteThroughCache) -> String {
    format!("{}-redis-data", cr.name_any())
}
pub fn auth_secret_name(cr: &WriteThroughCache) -> String {
    format!("{}-redis-auth", cr.name_any())
}
/// On the ConfigMap and on each injected pod: which configuration, as far as a restart is needed
/// to apply it (a hash of `sidecar.toml` without the settings a running sidecar reloads from
/// its mounted file: TTLs, leases, early refresh, retries). A pod whose hash differs from its
/// cache's runs settings from before a change that only a restart applies.
pub const CONFIG_HASH_ANNOTATION: &str = "wtc.dev/config-hash";

/// The hash of the cache's current `sidecar.toml`, reloadable settings left out; all of it when
/// the cache pins a sidecar image, which may be of a release that does not reload.
pub fn config_hash(cr: &WriteThroughCache) -> String {
    let config = sidecar_config(cr);
    match cr.spec.sidecar.image {
        Some(_) => hash(&config.render()),
        None => restart_hash(&config),
    }
}

fn restart_hash(config: &SidecarConfig) -> String {
    hash(&config.without_reloadable().render())
}

/// FNV-1a, 64 bits: stable across builds and Rust versions (the std hasher is not), so an
/// upgraded operator computes the same value for the same file.
pub(crate) fn hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn config_map_name(cr: &WriteThroughCache) -> String {
    format!("{}-sidecar", cr.name_any())
}

/// Everything the operator keeps in the cluster for one cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub config_map: ConfigMap,
    /// Present only for `redis.managed`.
    pub redis: Option<ManagedObjects>,
    /// The commit stream's reader, when the stream is on (`commit_stream`); applied only once
    /// the status names its slot.
    pub reader: Option<Deployment>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ManagedObjects {
    pub secret: Secret,
    pub deployment: Deployment,
    pub service: Service,
    /// With `persistence`: where the append-only file lives.
    pub claim: Option<PersistentVolumeClaim>,
    pub network_policy: Option<NetworkPolicy>,
    pub disruption_budget: Option<PodDisruptionBudget>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// Whose certificates a TLS volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPeer {
    Database,
    Redis,
}

impl TlsPeer {
    pub fn volume(self) -> &'static str {
        match self {
            TlsPeer::Database => "wtc-tls-database",
            TlsPeer::Redis => "wtc-tls-redis",
        }
    }
    /// Outside the ConfigMap's folder, so neither mount hides the other.
    pub fn dir(self) -> &'static str {
        match self {
            TlsPeer::Database => "/etc/wtc-tls/database",
            TlsPeer::Redis => "/etc/wtc-tls/redis",
        }
    }
}

/// File names inside a TLS volume (the Secret's keys are mapped onto them).
pub const TLS_CA: &str = "ca.crt";
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";

/// Where injected sidecars find the managed Redis' password: the `password` key of the auth
/// Secret, mounted (not an environment variable, so a rotation reaches running sidecars).
pub const REDIS_PASSWORD_VOLUME: &str = "wtc-redis-auth";
pub const REDIS_PASSWORD_DIR: &str = "/etc/wtc-redis-auth";

pub fn tls_file(peer: TlsPeer, name: &str) -> String {
    format!("{}/{name}", peer.dir())
}

/// The sidecar configuration this cache renders. URLs stay empty: the sidecar gets them from
/// `WTC_DATABASE_URL` and `WTC_REDIS_URL`, which come from Secrets.
pub fn sidecar_config(cr: &WriteThroughCache) -> SidecarConfig {
    let spec = &cr.spec;
    let db_client = spec.database.tls.as_ref().filter(|t| t.cert_key.is_some());
    SidecarConfig {
        listen: format!("127.0.0.1:{}", spec.sidecar.port),
        metrics_listen: (spec.sidecar.metrics_port != 0)
            .then(|| format!("0.0.0.0:{}", spec.sidecar.metrics_port)),
        api_token_file: None,
        database: DatabaseConfig {
            url: String::new(),
            pool_size: spec.database.pool_size,
            statement_timeout_ms: 5_000,
            ca_file: spec
                .database
                .tls
                .as_ref()
                .and_then(|t| t.ca_key.as_ref())
                .map(|_| tls_file(TlsPeer::Database, TLS_CA)),
            client_cert_file: db_client.map(|_| tls_file(TlsPeer::Database, TLS_CERT)),
            client_key_file: db_client.map(|_| tls_file(TlsPeer::Database, TLS_KEY)),
        },
        redis: {
            let tls = spec.redis.external.as_ref().and_then(|e| e.tls.as_ref());
            let client = tls.filter(|t| t.cert_key.is_some());
            RedisConfig {
                url: String::new(),
                connect_timeout_ms: 500,
                response_timeout_ms: 250,
                ca_file: tls
                    .and_then(|t| t.ca_key.as_ref())
                    .map(|_| tls_file(TlsPeer::Redis, TLS_CA)),
                client_cert_file: client.map(|_| tls_file(TlsPeer::Redis, TLS_CERT)),
                client_key_file: client.map(|_| tls_file(TlsPeer::Redis, TLS_KEY)),
                // Set per pod by the injection (`WTC_REDIS_PASSWORD_FILE`): sidecars of earlier
                // releases refuse settings they do not know, and read this file too.
                password_file: None,
            }
        },
        cache: CacheConfig {
            early_expiration_beta: spec.sidecar.early_expiration_beta,
            retry: RetryBudget {
                retries: spec.sidecar.retries,
                base_delay_ms: spec.sidecar.retry_base_delay_ms,
                max_delay_ms: spec.sidecar.retry_max_delay_ms,
            },
            ..CacheConfig::default()
        },
        limits: Limits::default(),
        sampler: Default::default(),
        commit_stream: Default::default(),
        entities: spec
            .entities
            .iter()
            .map(|e| Entity {
                name: e.name.clone(),
                table: e.table.clone(),
                key_column: e.key_column.clone(),
                version_column: e.version_column.clone(),
                ttl_seconds: e.ttl_seconds,
                versions: crate::commit_stream::version_source(e.versions),
            })
            .collect(),
    }
}

pub fn labels(cr: &WriteThroughCache, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), component.to_string()),
        ("app.kubernetes.io/instance".to_string(), cr.name_any()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "wtc-operator".to_string(),
        ),
        (CACHE_LABEL.to_string(), cr.name_any()),
    ])
}

pub(crate) fn meta(cr: &WriteThroughCache, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: cr.namespace(),
        labels: Some(labels(cr, component)),
        owner_references: cr.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// Builds the desired objects. `redis_auth` holds the managed Redis' passwords as read from the
/// cluster (or fresh ones): the builder never invents secrets, so it stays deterministic.
pub fn desired(
    cr: &WriteThroughCache,
    redis_auth: &RedisAuth,
    images: &Release,
) -> Result<Desired, InvalidSpec> {
    if cr.meta().uid.is_none() || cr.namespace().is_none() {
        return Err(InvalidSpec(
            "the resource has no uid or namespace yet".into(),
        ));
    }
    let config = sidecar_config(cr);
    // The file leaves the URLs to the environment; check everything else the sidecar will check.
    let mut probe = config.clone();
    probe.database.url = "postgres://placeholder".into();
    probe.redis.url = "redis://placeholder".into();
    probe.validate().map_err(|e| InvalidSpec(e.to_string()))?;

    let rendered = config.render();
    let mut metadata = meta(cr, config_map_name(cr), "wtc-sidecar");
    metadata.annotations = Some(BTreeMap::from([(
        CONFIG_HASH_ANNOTATION.to_string(),
        config_hash(cr),
    )]));
    let mut data = BTreeMap::from([(CONFIG_KEY.to_string(), rendered)]);
    let reader = match crate::commit_stream::wanted(cr) {
        Some(names) => {
            let config = crate::commit_stream::reader_config(cr, &names);
            let mut probe = config.clone();
            probe.database.url = "postgres://placeholder".into();
            probe.redis.url = "redis://placeholder".into();
            probe.validate().map_err(|e| InvalidSpec(e.to_string()))?;
            data.insert(
                crate::commit_stream::READER_CONFIG_KEY.to_string(),
                config.render(),
            );
            Some(crate::commit_stream::reader_deployment(cr, images, &names))
        }
        None => None,
    };
    let config_map = ConfigMap {
        metadata,
        data: Some(data),
        ..ConfigMap::default()
    };
    let redis = cr
        .spec
        .redis
        .managed
        .as_ref()
        .map(|m| managed_redis(cr, m, redis_auth, images));
    Ok(Desired {
        config_map,
        redis,
        reader,
    })
}

/// The managed Redis' auth Secret for the credentials `auth` (`redis_auth`). The passwords
/// reach redis-server in a file of it (its config file, the first argument), never on its
/// command line, which every process of the node can read.
pub fn auth_secret(cr: &WriteThroughCache, auth: &RedisAuth) -> Secret {
    let mut metadata = meta(cr, auth_secret_name(cr), "wtc-redis");
    metadata.annotations = Some(auth.annotations());
    Secret {
        metadata,
        data: Some(
            auth.data()
                .into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

fn managed_redis(
    cr: &WriteThroughCache,
    m: &ManagedRedis,
    auth: &RedisAuth,
    images: &Release,
) -> ManagedObjects {
    let name = redis_name(cr);
    let selector = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "wtc-redis".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), cr.name_any()),
    ]);
    let secret = auth_secret(cr, auth);
    let args = vec![
        format!("{REDIS_AUTH_DIR}/{REDIS_AUTH_FILE}"),
        "--port".to_string(),
        REDIS_PORT.to_string(),
        "--maxmemory".into(),
        m.maxmemory.clone(),
        "--maxmemory-policy".into(),
        m.eviction_policy.as_redis().into(),
        "--save".into(),
        String::new(),
        "--appendonly".into(),
        if m.persistence { "yes" } else { "no" }.into(),
        "--dir".into(),
        "/data".into(),
    ];
    let container = Container {
        name: "redis".into(),
        image: Some(m.image.clone().unwrap_or_else(|| images.redis.clone())),
        command: Some(vec!["redis-server".into()]),
        args: Some(args),
        ports: Some(vec![ContainerPort {
            name: Some("redis".into()),
            container_port: REDIS_PORT,
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(REDIS_PORT),
                ..TCPSocketAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        // A Redis that stopped accepting connections is restarted (the sidecars' epoch check
        // then sweeps what a restart may have kept).
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(REDIS_PORT),
                ..TCPSocketAction::default()
            }),
            initial_delay_seconds: Some(5),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        resources: m.resources.clone(),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".into(),
                mount_path: "/data".into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "auth".into(),
                mount_path: REDIS_AUTH_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        security_context: Some(restricted_container()),
        ..Container::default()
    };
    let claim = m.persistence.then(|| {
        let storage = m.storage.clone().unwrap_or_default();
        PersistentVolumeClaim {
            metadata: meta(cr, redis_claim_name(cr), "wtc-redis"),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: storage.storage_class_name,
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity(storage.size),
                    )])),
                    limits: None,
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }
    });
    let redis_pods = LabelSelector {
        match_labels: Some(selector.clone()),
        ..LabelSelector::default()
    };
    // Only the pods injected for this cache, and only Redis' port.
    let network_policy = m.network_policy.then(|| NetworkPolicy {
        metadata: meta(cr, name.clone(), "wtc-redis"),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(redis_pods.clone()),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(
                    [NetworkPolicyPeer {
                        pod_selector: Some(LabelSelector {
                            match_labels: Some(BTreeMap::from([(
                                INJECTED_LABEL.to_string(),
                                cr.name_any(),
                            )])),
                            ..LabelSelector::default()
                        }),
                        ..NetworkPolicyPeer::default()
                    }]
                    .into_iter()
                    // The commit stream's reader, which evicts what other writers changed.
                    .chain(crate::commit_stream::wanted(cr).map(|_| NetworkPolicyPeer {
                        pod_selector: Some(LabelSelector {
                            match_labels: Some(crate::commit_stream::reader_selector(cr)),
                            ..LabelSelector::default()
                        }),
                        ..NetworkPolicyPeer::default()
                    }))
                    .chain([
                        // The operator, which applies password rotations (`redis_admin`).
                        NetworkPolicyPeer {
                            namespace_selector: Some(LabelSelector {
                                match_labels: Some(BTreeMap::from([(
                                    "kubernetes.io/metadata.name".to_string(),
                                    images.operator_namespace.clone(),
                                )])),
                                ..LabelSelector::default()
                            }),
                            pod_selector: Some(LabelSelector {
                                match_labels: Some(BTreeMap::from([(
                                    "app.kubernetes.io/name".to_string(),
                                    "wtc-operator".to_string(),
                                )])),
                                ..LabelSelector::default()
                            }),
                            ..NetworkPolicyPeer::default()
                        },
                    ])
                    .collect(),
                ),
                ports: Some(vec![NetworkPolicyPort {
                    protocol: Some("TCP".into()),
                    port: Some(IntOrString::Int(REDIS_PORT)),
                    end_port: None,
                }]),
            }]),
            egress: None,
        }),
    });
    let disruption_budget = m.pod_disruption_budget.then(|| PodDisruptionBudget {
        metadata: meta(cr, name.clone(), "wtc-redis"),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(redis_pods.clone()),
            // A Redis that is not running anyway must not hold a node drain.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    });
    let deployment = Deployment {
        metadata: meta(cr, name.clone(), "wtc-redis"),
        spec: Some(DeploymentSpec {
            replicas: Some(m.replicas),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            // One Redis at a time: two would split the cache's writes between them.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..DeploymentStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(cr, "wtc-redis")),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(vec![
                        match &claim {
                            Some(c) => Volume {
                                name: "data".into(),
                                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                                    claim_name: c.name_any(),
                                    read_only: None,
                                }),
                                ..Volume::default()
                            },
                            None => Volume {
                                name: "data".into(),
                                empty_dir: Some(EmptyDirVolumeSource::default()),
                                ..Volume::default()
                            },
                        },
                        Volume {
                            name: "auth".into(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(auth_secret_name(cr)),
                                items: Some(vec![KeyToPath {
                                    key: REDIS_AUTH_FILE.into(),
                                    path: REDIS_AUTH_FILE.into(),
                                    mode: None,
                                }]),
                                // Owner and the pod's fsGroup (redis' group) only.
                                default_mode: Some(0o440),
                                ..SecretVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                    ]),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(999),
                        fs_group: Some(999),
                        ..PodSecurityContext::default()
                    }),
                    automount_service_account_token: Some(false),
                    node_selector: (!m.node_selector.is_empty()).then(|| m.node_selector.clone()),
                    tolerations: (!m.tolerations.is_empty()).then(|| m.tolerations.clone()),
                    affinity: m.affinity.clone(),
                    priority_class_name: m.priority_class_name.clone(),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let service = Service {
        metadata: meta(cr, name, "wtc-redis"),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("redis".into()),
                port: REDIS_PORT,
                target_port: Some(IntOrString::Int(REDIS_PORT)),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    ManagedObjects {
        secret,
        deployment,
        service,
        claim,
        network_policy,
        disruption_budget,
    }
}

/// `host:port` of the managed Redis, as the sidecars reach it.
pub fn redis_endpoint(cr: &WriteThroughCache) -> Option<String> {
    cr.spec.redis.managed.as_ref()?;
    Some(format!(
        "{}.{}.svc:{REDIS_PORT}",
        redis_name(cr),
        cr.namespace().unwrap_or_default()
    ))
}

pub fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

pub fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(k8s_openapi::api::core::v1::SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..SecurityContext::default()
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Builder fixtures: a cache as a user would write it, then variations.
    use crate::crd::*;
    use kube::api::ObjectMeta;

    pub struct CacheBuilder(pub WriteThroughCache);

    impl CacheBuilder {
        pub fn new(name: &str) -> Self {
            let spec: WriteThroughCacheSpec = serde_json::from_value(serde_json::json!({
                "database": {"urlSecret": {"name": "app-db", "key": "url"}},
                "entities": [{"name": "accounts", "table": "accounts"}],
                "redis": {"managed": {}},
            }))
            .unwrap();
            let mut cr = WriteThroughCache::new(name, spec);
            cr.metadata = ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                uid: Some("0000-1111".into()),
                generation: Some(1),
                ..ObjectMeta::default()
            };
            Self(cr)
        }
        pub fn external(mut self) -> Self {
            self.0.spec.redis = RedisSpec {
                managed: None,
                external: Some(ExternalRedis {
                    url_secret: SecretKeySelector {
                        name: "redis".into(),
                        key: "url".into(),
                    },
                    tls: None,
                }),
            };
            self
        }
        pub fn entity(mut self, name: &str) -> Self {
            let mut e = self.0.spec.entities[0].clone();
            e.name = name.into();
            e.table = name.into();
            self.0.spec.entities.push(e);
            self
        }
        pub fn build(self) -> WriteThroughCache {
            self.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::CacheBuilder;
    use super::*;

    fn auth(password: &str) -> RedisAuth {
        RedisAuth {
            password: password.into(),
            next: None,
            operator_password: "op".into(),
            previous: vec![],
            previous_until: None,
            confirmed: None,
        }
    }

    #[test]
    fn managed_cache_gets_redis_objects_owned_by_the_resource() {
        let cr = CacheBuilder::new("orders").build();
        let d = desired(&cr, &auth("pw"), &Release::default()).unwrap();
        let r = d.redis.expect("managed Redis");
        assert_eq!(r.deployment.metadata.name.as_deref(), Some("orders-redis"));
        assert_eq!(r.service.metadata.name.as_deref(), Some("orders-redis"));
        assert_eq!(r.secret.metadata.name.as_deref(), Some("orders-redis-auth"));
        for owners in [
            &d.config_map.metadata.owner_references,
            &r.deployment.metadata.owner_references,
            &r.service.metadata.owner_references,
            &r.secret.metadata.owner_references,
        ] {
            let o = &owners.as_ref().unwrap()[0];
            assert_eq!(
                (o.kind.as_str(), o.uid.as_str(), o.controller),
                ("WriteThroughCache", "0000-1111", Some(true))
            );
        }
        let args = r.deployment.spec.unwrap().template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        assert!(
            args.windows(2)
                .any(|w| w == ["--maxmemory-policy", "allkeys-lru"])
        );
        assert_eq!(
            args[0], "/etc/wtc-redis/auth.conf",
            "the config file comes first"
        );
        assert!(
            !args
                .iter()
                .any(|a| a.contains("requirepass") || a.contains("pw")),
            "never the password on the command line: {args:?}"
        );
        let conf = &r.secret.data.as_ref().unwrap()[REDIS_AUTH_FILE];
        assert_eq!(String::from_utf8_lossy(&conf.0), auth("pw").auth_conf());
        // The operator's pods may reach Redis too (password rotation), and no other pod.
        let np = r.network_policy.as_ref().expect("network policy");
        let from = np.spec.as_ref().unwrap().ingress.as_ref().unwrap()[0]
            .from
            .clone()
            .unwrap();
        assert_eq!(from.len(), 2);
        let ns = from[1].namespace_selector.as_ref().unwrap();
        assert_eq!(
            ns.match_labels.as_ref().unwrap()["kubernetes.io/metadata.name"],
            "wtc-system"
        );
        assert_eq!(
            redis_endpoint(&cr).as_deref(),
            Some("orders-redis.shop.svc:6379")
        );
    }

    #[test]
    fn managed_redis_settings_shape_its_objects() {
        let cr = CacheBuilder::new("orders").build();
        let r = desired(&cr, &auth("pw"), &Release::default())
            .unwrap()
            .redis
            .unwrap();
        // By default: no claim (an emptyDir), no budget, and a NetworkPolicy admitting only the
        // cache's injected pods, on Redis' port.
        assert!(r.claim.is_none() && r.disruption_budget.is_none());
        let np = r.network_policy.unwrap().spec.unwrap();
        assert_eq!(np.policy_types, Some(vec!["Ingress".to_string()]));
        let rule = &np.ingress.unwrap()[0];
        let from = rule.from.as_ref().unwrap()[0].pod_selector.clone().unwrap();
        assert_eq!(
            from.match_labels.unwrap(),
            BTreeMap::from([(INJECTED_LABEL.to_string(), "orders".to_string())])
        );
        assert!(
            rule.from.as_ref().unwrap()[0].namespace_selector.is_none(),
            "this namespace only"
        );
        assert_eq!(
            rule.ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(REDIS_PORT))
        );
        let pod = r.deployment.spec.unwrap().template.spec.unwrap();
        assert!(pod.volumes.unwrap()[0].empty_dir.is_some());
        assert!(pod.node_selector.is_none() && pod.tolerations.is_none());

        let mut cr = CacheBuilder::new("orders").build();
        cr.spec.redis.managed = Some(
            serde_json::from_value(serde_json::json!({
                "persistence": true,
                "storage": {"size": "5Gi", "storageClassName": "fast"},
                "networkPolicy": false,
                "podDisruptionBudget": true,
                "nodeSelector": {"pool": "cache"},
                "tolerations": [{"key": "cache", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "high",
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
            }))
            .unwrap(),
        );
        let r = desired(&cr, &auth("pw"), &Release::default())
            .unwrap()
            .redis
            .unwrap();
        assert!(r.network_policy.is_none());
        let claim = r.claim.unwrap();
        assert_eq!(claim.metadata.name.as_deref(), Some("orders-redis-data"));
        let spec = claim.spec.unwrap();
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            spec.resources.unwrap().requests.unwrap()["storage"],
            Quantity("5Gi".into())
        );
        let pdb = r.disruption_budget.unwrap().spec.unwrap();
        assert_eq!(pdb.min_available, Some(IntOrString::Int(1)));
        let pod = r.deployment.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.volumes.unwrap()[0]
                .persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.as_str()),
            Some("orders-redis-data")
        );
        assert_eq!(pod.node_selector.unwrap()["pool"], "cache");
        assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("cache"));
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        assert!(pod.affinity.unwrap().node_affinity.is_some());
    }

    #[test]
    fn the_config_hash_follows_the_file() {
        let cr = CacheBuilder::new("orders").build();
        let d = desired(&cr, &auth("pw"), &Release::default()).unwrap();
        let on_map = d.config_map.metadata.annotations.unwrap()[CONFIG_HASH_ANNOTATION].clone();
        assert_eq!(on_map, config_hash(&cr));
        assert_eq!(
            config_hash(&cr),
            config_hash(&CacheBuilder::new("orders").build())
        );
        // A TTL is reloaded by the running sidecars: no restart, the hash stays.
        let mut reloaded = cr.clone();
        reloaded.spec.entities[0].ttl_seconds += 1;
        reloaded.spec.sidecar.retries += 1;
        assert_eq!(config_hash(&reloaded), config_hash(&cr));
        // The pool size takes a restart.
        let mut changed = cr.clone();
        changed.spec.database.pool_size += 1;
        assert_ne!(config_hash(&changed), config_hash(&cr));
        // FNV-1a of a known input: the same value from every build.
        assert_eq!(hash(""), "cbf29ce484222325");
        assert_eq!(hash("a"), "af63dc4c8601ec8c");
    }

    #[test]
    fn rendered_config_is_what_the_sidecar_parses() {
        let cr = CacheBuilder::new("orders").entity("items").build();
        let d = desired(&cr, &auth("pw"), &Release::default()).unwrap();
        let toml = &d.config_map.data.unwrap()[CONFIG_KEY];
        let overrides = wtc_config::Overrides {
            database_url: Some("postgres://db/app".into()),
            redis_url: Some("redis://r:6379".into()),
            redis_password_file: None,
            listen: None,
            metrics_listen: None,
        };
        let parsed = wtc_config::SidecarConfig::parse(toml, &overrides).unwrap();
        assert_eq!(parsed.entities.len(), 2);
        assert_eq!(parsed.listen, "127.0.0.1:7480");
        assert_eq!(parsed.metrics_listen.as_deref(), Some("0.0.0.0:9464"));
        assert_eq!(parsed.cache.retry.retries, 3);
    }

    #[test]
    fn managed_redis_runs_the_operators_image_unless_the_cache_pins_one() {
        let images = Release {
            sidecar: "r.example/wtc-dev/wtc-sidecar:2".into(),
            redis: "r.example/wtc-dev/redis:7".into(),
            sidecar_resources: None,
            ..Release::default()
        };
        let mut cr = CacheBuilder::new("orders").build();
        let image = |cr: &WriteThroughCache| {
            let d = desired(cr, &auth("pw"), &images)
                .unwrap()
                .redis
                .unwrap()
                .deployment;
            d.spec.unwrap().template.spec.unwrap().containers[0]
                .image
                .clone()
                .unwrap()
        };
        assert_eq!(image(&cr), "r.example/wtc-dev/redis:7");
        cr.spec.redis.managed.as_mut().unwrap().image = Some("redis:7.2-alpine".into());
        assert_eq!(image(&cr), "redis:7.2-alpine");
    }

    #[test]
    fn external_redis_has_no_managed_objects() {
        let cr = CacheBuilder::new("orders").external().build();
        let d = desired(&cr, &auth("pw"), &Release::default()).unwrap();
        assert!(d.redis.is_none());
        assert_eq!(redis_endpoint(&cr), None);
    }

    #[test]
    fn specs_the_sidecar_would_refuse_are_invalid() {
        let mut cr = CacheBuilder::new("orders").build();
        cr.spec.entities[0].key_column = "version".into();
        let err = desired(&cr, &auth("pw"), &Release::default()).unwrap_err();
        assert!(err.0.contains("same column"), "{err}");
    }
}
