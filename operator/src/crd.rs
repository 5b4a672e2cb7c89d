//! The `WriteThroughCache` custom resource (group `wtc.dev`, version `v1alpha1`).
//!
//! Defaults and validation live in the schema, so the API server applies and enforces them; CEL
//! rules cover what one field alone cannot say (unique entity names, exactly one Redis mode).

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wtc.dev",
    version = "v1alpha1",
    kind = "WriteThroughCache",
    plural = "writethroughcaches",
    shortname = "wtc",
    namespaced,
    status = "WriteThroughCacheStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Redis","type":"string","jsonPath":".status.redisEndpoint"}"#,
    printcolumn = r#"{"name":"Injected","type":"integer","jsonPath":".status.injectedPods"}"#,
    printcolumn = r#"{"name":"Sidecars Ready","type":"integer","jsonPath":".status.readySidecars"}"#,
    printcolumn = r#"{"name":"Without Sidecar","type":"integer","jsonPath":".status.uninjectedPods"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.entities.all(e, self.entities.exists_one(f, f.name == e.name))").message("entity names must be unique"))]
pub struct WriteThroughCacheSpec {
    /// The application's database: every write is committed here first.
    pub database: DatabaseSpec,
    /// Tables served through the cache.
    #[schemars(length(min = 1, max = 64))]
    pub entities: Vec<EntitySpec>,
    /// Where the cache lives: a Redis this operator runs (`managed`) or one you run (`external`).
    pub redis: RedisSpec,
    #[serde(default)]
    pub sidecar: SidecarSpec,
    /// Which pods may use this cache (besides opting in with the annotation).
    #[serde(default)]
    pub injection: InjectionSpec,
    /// Writes that bypass the sidecars (psql, migrations, other services, a sidecar that died
    /// between its commit and its cache step) reach the cache through PostgreSQL's logical
    /// replication: a reader the operator runs evicts what they changed (docs/commit-stream.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_stream: Option<CommitStreamSpec>,
    /// The region this cache serves, when one primary database serves caches in several
    /// regions (a cache object in each region's cluster): part of the default replication slot
    /// and publication names, so each region reads the stream for its own Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$"))]
    pub region: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommitStreamSpec {
    /// Turning it off (or removing `commitStream`, or deleting the cache) stops the reader and
    /// drops its slot and publication, so no slot is left retaining WAL.
    #[serde(default)]
    pub enabled: bool,
    /// The replication slot. Unset: `wtc_<namespace>_<name>[_<region>]_<hash>` (status shows
    /// it). Slot names are shared by all databases of the server: keep them unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9_]{1,63}$"))]
    pub slot: Option<String>,
    /// The publication of the entities' tables. Unset: the slot's default name. The operator
    /// drops it with the slot: do not share it with anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9_]{1,63}$"))]
    pub publication: Option<String>,
    /// Pause between two polls of the slot when the last one found nothing.
    #[serde(default = "default_poll_interval_ms")]
    #[schemars(range(min = 1, max = 10_000))]
    pub poll_interval_ms: u64,
    /// The reader's container (one pod per cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    #[serde(default)]
    pub engine: DatabaseEngine,
    /// Secret key holding the database URL (`postgres://user:password@host/db`).
    pub url_secret: SecretKeySelector,
    #[serde(default = "default_pool_size")]
    #[schemars(range(min = 1, max = 200))]
    pub pool_size: u32,
    /// Certificates for TLS to PostgreSQL (a private CA: RDS, Cloud SQL). With a CA, the sidecar
    /// checks the server's certificate and host name (`sslmode=verify-full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
}

/// TLS files from a Secret in the cache's namespace, mounted read-only into every sidecar.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.certKey) == has(self.keyKey)").message("set both tls.certKey and tls.keyKey, or neither"))]
#[x_kube(validation = Rule::new("has(self.caKey) || has(self.certKey)").message("tls names a CA (caKey), a client certificate (certKey, keyKey), or both"))]
pub struct TlsFiles {
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Key of the PEM certificate of the CA that signed the server's certificate (e.g.
    /// `ca.crt`). Unset: the public roots bundled with the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_key: Option<String>,
    /// Keys of a PEM client certificate and its key (e.g. `tls.crt`, `tls.key`), for servers
    /// that ask for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub cert_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key_key: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseEngine {
    #[default]
    Postgres,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeySelector {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntitySpec {
    /// Name in the sidecar's URLs: `/v1/entities/{name}/{key}`.
    #[schemars(regex(pattern = r"^[a-z0-9_-]{1,63}$"), length(min = 1, max = 63))]
    pub name: String,
    #[schemars(length(min = 1, max = 63))]
    pub table: String,
    #[serde(default = "default_key_column")]
    #[schemars(length(min = 1, max = 63))]
    pub key_column: String,
    #[serde(default = "default_version_column")]
    #[schemars(length(min = 1, max = 63))]
    pub version_column: String,
    #[serde(default = "default_ttl_seconds")]
    #[schemars(range(min = 1, max = 604800))]
    pub ttl_seconds: u64,
    /// Where versions come from: `sidecar` (the sidecar draws them; other writers must draw
    /// from its sequence) or `trigger` (a trigger the sidecar installs draws one on every
    /// insert and update, whoever writes: docs/protocol.md, "Versions").
    #[serde(default)]
    pub versions: Versions,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Versions {
    #[default]
    Sidecar,
    Trigger,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.managed) != has(self.external)").message("set exactly one of redis.managed and redis.external"))]
pub struct RedisSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedRedis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRedis>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedRedis {
    /// Pins the Redis image. Unset: the image of the operator's release (`--redis-image`), so
    /// upgrading the operator moves Redis forward too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// 0 stops Redis (the sidecars then read from the database); 1 runs it.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0, max = 1))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Redis `maxmemory`, e.g. `256mb`.
    #[serde(default = "default_maxmemory")]
    #[schemars(regex(pattern = r"^[0-9]+(b|kb|mb|gb)?$"))]
    pub maxmemory: String,
    #[serde(default)]
    pub eviction_policy: EvictionPolicy,
    /// Append-only persistence, on a PersistentVolumeClaim (`storage`). Off by default: the
    /// database is the source of truth, and a restarted Redis refills from it.
    #[serde(default)]
    pub persistence: bool,
    /// The claim that holds the data when `persistence` is on. Made once: a later change of
    /// size or class is not applied (expand or replace the claim by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<RedisStorage>,
    /// Only the pods injected for this cache may connect to Redis (a NetworkPolicy; enforced
    /// where the cluster's network plugin implements NetworkPolicies).
    #[serde(default = "default_true")]
    pub network_policy: bool,
    /// A PodDisruptionBudget that keeps the Redis pod through voluntary disruptions: a node
    /// drain then waits until the pod is moved by hand. Off by default: without Redis the
    /// sidecars read from the database.
    #[serde(default)]
    pub pod_disruption_budget: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// After a rotation (the auth Secret's `next-password`, once Redis accepts it, becomes its
    /// `password`), how long Redis still accepts the replaced password: the kubelet updates the
    /// sidecars' mounted copy within its sync period (a minute by default; keep this at least
    /// twice that), and they read it for each new connection. Then connections of the old
    /// password are closed. No restart either way.
    #[serde(default = "default_password_rotation_seconds")]
    #[schemars(range(min = 60, max = 86_400))]
    pub password_rotation_seconds: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisStorage {
    /// The claim's size, a Kubernetes quantity.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub size: String,
    /// Unset: the cluster's default StorageClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

impl Default for RedisStorage {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EvictionPolicy {
    #[default]
    AllkeysLru,
    AllkeysLfu,
    VolatileLru,
    VolatileLfu,
    VolatileTtl,
    Noeviction,
}

impl EvictionPolicy {
    pub fn as_redis(&self) -> &'static str {
        match self {
            EvictionPolicy::AllkeysLru => "allkeys-lru",
            EvictionPolicy::AllkeysLfu => "allkeys-lfu",
            EvictionPolicy::VolatileLru => "volatile-lru",
            EvictionPolicy::VolatileLfu => "volatile-lfu",
            EvictionPolicy::VolatileTtl => "volatile-ttl",
            EvictionPolicy::Noeviction => "noeviction",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalRedis {
    /// Secret key holding the Redis URL: `redis://:password@host:6379` (`rediss://` for TLS),
    /// `redis+sentinel://:password@s1:26379,s2:26379/<master>` for a master watched by Sentinel,
    /// `redis+cluster://:password@n1:6379,n2:6379` for a Redis Cluster.
    pub url_secret: SecretKeySelector,
    /// Certificates for a `rediss` URL: a private CA (instead of the public roots), and a client
    /// certificate if Redis asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.metricsPort == 0 || (self.metricsPort >= 1024 && self.metricsPort != self.port)").message("sidecar.metricsPort is 0 (off) or a port from 1024, other than sidecar.port"))]
pub struct SidecarSpec {
    /// Pins the sidecar image. Unset: the image of the operator's release (`--sidecar-image`),
    /// so upgrading the operator moves new pods' sidecars forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Loopback port the application calls.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: u16,
    /// Port on the pod's address for `/metrics`, `/healthz` and `/readyz` only (Prometheus;
    /// the container port is named `wtc-metrics`); 0 turns that listener off.
    #[serde(default = "default_metrics_port")]
    #[schemars(range(min = 0, max = 65535))]
    pub metrics_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Retries of a failed cache step after the commit.
    #[serde(default = "default_retries")]
    #[schemars(range(min = 0, max = 20))]
    pub retries: u32,
    #[serde(default = "default_base_delay_ms")]
    #[schemars(range(min = 1, max = 10000))]
    pub retry_base_delay_ms: u64,
    #[serde(default = "default_max_delay_ms")]
    #[schemars(range(min = 1, max = 60000))]
    pub retry_max_delay_ms: u64,
    /// XFetch early refresh factor; 0 turns early refresh off.
    #[serde(default = "default_beta")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub early_expiration_beta: f64,
}

impl Default for SidecarSpec {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every field has a default")
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InjectionSpec {
    /// Only pods matching this selector get the sidecar (in addition to the opt-in annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Evict pods that asked for this cache's sidecar but run without it because the webhook
    /// did not see them (down or too slow at their creation), so their controller recreates
    /// them with it (as Dapr's watchdog does). Only pods that have a controller (ReplicaSet,
    /// StatefulSet, Job...), a few at a time, through the eviction API (PodDisruptionBudgets
    /// hold). Pods skipped on purpose (selector, host network) are reported, never evicted.
    #[serde(default)]
    pub restart_pods_without_sidecar: bool,
    /// Evict pods whose sidecar runs a configuration from before the cache's last change that
    /// only a restart applies (TTLs, leases, early refresh and retries are reloaded in place),
    /// one pod per controller per watchdog round, through the
    /// eviction API (PodDisruptionBudgets hold). Unset: they are counted in
    /// `status.outdatedPods` and an Event says so; `kubectl rollout restart` moves them.
    #[serde(default)]
    pub restart_on_config_change: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WriteThroughCacheStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `RedisReady`, `ConfigValid`, `SidecarsReady`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// `host:port` the sidecars use (managed Redis), or `external`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_endpoint: Option<String>,
    /// Pods with the sidecar injected for this cache.
    #[serde(default)]
    pub injected_pods: i32,
    /// Injected pods whose sidecar is running and ready.
    #[serde(default)]
    pub ready_sidecars: i32,
    /// Pods that asked for this cache's sidecar and run without it (Events on them say why).
    /// Counted by the operator's watchdog, which owns this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uninjected_pods: Option<i32>,
    /// Injected pods whose sidecar started with a configuration older than the cache's current
    /// one. Counted by the watchdog, which owns this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outdated_pods: Option<i32>,
    /// The commit stream's slot and publication as they exist in the database (the operator
    /// drops them when the stream is turned off or the cache deleted), and the reader's last
    /// figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_stream: Option<CommitStreamStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommitStreamStatus {
    pub slot: String,
    pub publication: String,
    /// Age of the oldest change read and not yet applied (0: none), from the reader's metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// WAL the slot keeps on the database server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_wal_bytes: Option<i64>,
}

// The sidecar's defaults come from its configuration type, so a cache that leaves a field out
// gets exactly what the sidecar would.
fn default_pool_size() -> u32 {
    wtc_config::defaults::POOL_SIZE
}
fn default_key_column() -> String {
    wtc_config::defaults::KEY_COLUMN.into()
}
fn default_version_column() -> String {
    wtc_config::defaults::VERSION_COLUMN.into()
}
fn default_ttl_seconds() -> u64 {
    wtc_config::defaults::TTL_SECONDS
}
fn default_poll_interval_ms() -> u64 {
    wtc_config::CommitStreamConfig::default().poll_interval_ms
}
fn default_password_rotation_seconds() -> u32 {
    300
}
fn default_true() -> bool {
    true
}
fn default_storage_size() -> String {
    "1Gi".into()
}
fn default_one() -> i32 {
    1
}
fn default_maxmemory() -> String {
    "256mb".into()
}
fn default_port() -> u16 {
    wtc_config::defaults::LISTEN_PORT
}
fn default_metrics_port() -> u16 {
    wtc_config::defaults::METRICS_PORT
}
fn default_retries() -> u32 {
    wtc_config::RetryBudget::default().retries
}
fn default_base_delay_ms() -> u64 {
    wtc_config::RetryBudget::default().base_delay_ms
}
fn default_max_delay_ms() -> u64 {
    wtc_config::RetryBudget::default().max_delay_ms
}
fn default_beta() -> f64 {
    wtc_config::CacheConfig::default().early_expiration_beta
}
