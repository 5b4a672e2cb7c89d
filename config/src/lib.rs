//! The sidecar's configuration, defined once.
//!
//! The sidecar parses it; the operator (later) renders exactly this type into a ConfigMap. It has
//! no dependency on sqlx or redis so the operator can use it without dragging them in.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use std::collections::HashSet;

mod redis_target;
pub use redis_target::RedisTarget;

/// Default address: loopback only, the application reaches the sidecar on 127.0.0.1.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7480";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// Address the HTTP API binds to. Must be a loopback address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// A second listener for `/metrics`, `/healthz` and `/readyz` only, on an address others
    /// reach (`0.0.0.0:9464` in a pod, for Prometheus); the API stays on `listen`. Unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// File holding the API token (e.g. a mounted Secret). When a token is set (here or by
    /// `WTC_API_TOKEN`, which wins), every request but `/healthz` and `/readyz` needs
    /// `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<String>,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub sampler: SamplerConfig,
    /// Changes committed by anyone, read from PostgreSQL's logical decoding: they invalidate
    /// the cached rows they changed (docs/commit-stream.md). Off by default.
    #[serde(default, skip_serializing_if = "CommitStreamConfig::is_default")]
    pub commit_stream: CommitStreamConfig,
    pub entities: Vec<Entity>,
}

/// The commit stream: one logical replication slot (pgoutput) and one publication of the
/// entities' tables, polled by one sidecar at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommitStreamConfig {
    pub enabled: bool,
    /// The replication slot (created when missing; needs the REPLICATION attribute).
    pub slot: String,
    /// The publication (created when missing, or extended with missing tables: needs the
    /// tables' ownership then).
    pub publication: String,
    /// Pause between two polls of the slot when the last one found nothing.
    pub poll_interval_ms: u64,
}

impl Default for CommitStreamConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            slot: "wtc_commit_stream".into(),
            publication: "wtc_commit_stream".into(),
            poll_interval_ms: 10,
        }
    }
}

impl CommitStreamConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Where a table's versions come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionSource {
    /// The sidecar draws them from its sequence; other writers must do the same
    /// (`nextval('<table>_<column>_wtc_seq')`) or their rows are refused by the CAS as older.
    #[default]
    Sidecar,
    /// A trigger the sidecar installs draws a version from the same sequence on every insert
    /// and update, whoever writes (docs/protocol.md "Versions").
    Trigger,
}

impl VersionSource {
    fn is_sidecar(&self) -> bool {
        *self == VersionSource::Sidecar
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL URL. Usually left empty in the file and given by `WTC_DATABASE_URL`.
    #[serde(default)]
    pub url: String,
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Deadline for one statement, enforced by the client.
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// PEM file of the CA that signed the server's certificate (a private CA: RDS, Cloud SQL).
    /// Set, it turns certificate and host name checks on (`sslmode=verify-full`) unless the URL
    /// asks for `verify-ca`; the URL's own `sslrootcert` works too, as with libpq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// PEM client certificate and key, for servers that ask for one (both or neither; the URL's
    /// `sslcert`/`sslkey` work too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL. Usually given by `WTC_REDIS_URL`.
    #[serde(default)]
    pub url: String,
    #[serde(default = "default_redis_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_redis_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// PEM file of the CA to trust for `rediss` URLs instead of the bundled public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// PEM certificate and key for servers that ask for a client certificate (both or neither).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
    /// A file holding the password (its whole contents, byte for byte). Read again for every new
    /// connection to a `redis://`/`rediss://` server, so a rotated password (a mounted Secret the
    /// kubelet updated) reaches a running sidecar without a restart; Sentinel and Cluster URLs
    /// read it once, at start. It wins over a password in the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Life of a fill lease (and of a writer's intent to fill an empty slot).
    pub lease_ttl_ms: u64,
    /// How long a reader that lost the lease waits for the winner's fill before reading the
    /// database itself (without filling).
    pub lease_wait_ms: u64,
    /// How long a delete's tombstone stays in Redis.
    pub tombstone_ttl_seconds: u64,
    /// XFetch early refresh factor; 0 turns early refresh off.
    pub early_expiration_beta: f64,
    /// Retries of a failed cache step after a committed write.
    pub retry: RetryBudget,
    /// How often the repair queue retries its keys.
    pub repair_interval_ms: u64,
    /// After a Redis error, reads skip Redis for this long instead of waiting on timeouts.
    pub redis_down_backoff_ms: u64,
    /// Keys the repair queue holds at most. Past it, this sidecar reads every key from the
    /// database and, once Redis answers again, deletes every cached entry (a sweep) instead of
    /// remembering more keys: memory stays bounded through any Redis outage.
    pub repair_queue_max_keys: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudget {
    /// Attempts after the first one.
    pub retries: u32,
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_key_bytes: usize,
    /// Requests served at once (health checks and /metrics not counted); more wait for a slot.
    pub max_in_flight: usize,
    /// How long a request waits for a slot before it is shed with `503 overloaded`.
    pub max_queue_wait_ms: u64,
    /// Most writes in one `POST /v1/batch`, and most keys in one bulk read; more get `413`.
    pub max_batch_items: usize,
    /// Open client connections at most. Beyond, a new connection is closed at once, unless its
    /// first bytes are a health check (`GET /healthz`, `GET /readyz`).
    pub max_connections: usize,
    /// Time for a request's headers to arrive, and the longest a kept-alive connection may stay
    /// idle between requests; then the connection is closed.
    pub header_timeout_ms: u64,
    /// Time for a request's body to arrive whole; then `408 body_timeout`, and nothing happens.
    pub body_timeout_ms: u64,
    /// Largest answer of a bulk read (the envelopes it would carry, a row named twice counted
    /// twice); beyond it `413 answer_too_large`, and nothing is sent.
    pub max_answer_bytes: u64,
    /// After SIGTERM: the longest the sidecar waits for open requests before it closes their
    /// connections (below Kubernetes' default 30 s grace period). Writes already committed still
    /// finish their cache step.
    pub shutdown_grace_ms: u64,
}

/// The consistency sampler: a share of committed writes is checked, after a grace period, by
/// comparing the cached envelope with the database row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    pub enabled: bool,
    /// Share of committed writes whose key is checked, 0 to 1.
    pub sample_rate: f64,
    /// How long after the write the key is checked (longer than a normal cache step).
    pub grace_ms: u64,
    /// How often the sampler checks the keys that are due.
    pub interval_ms: u64,
    /// Window of the write ratio (`wtc_write_ratio`), in seconds.
    pub write_ratio_window_seconds: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sample_rate: 0.01,
            grace_ms: 1_000,
            interval_ms: 1_000,
            write_ratio_window_seconds: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entity {
    /// Name used in the URL: `/v1/entities/{name}/{key}`.
    pub name: String,
    pub table: String,
    #[serde(default = "default_key_column")]
    pub key_column: String,
    #[serde(default = "default_version_column")]
    pub version_column: String,
    #[serde(default = "default_ttl_seconds")]
    pub ttl_seconds: u64,
    #[serde(default, skip_serializing_if = "VersionSource::is_sidecar")]
    pub versions: VersionSource,
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}
/// Defaults the operator's CRD shares (one place for each).
pub mod defaults {
    pub const POOL_SIZE: u32 = 8;
    pub const KEY_COLUMN: &str = "id";
    pub const VERSION_COLUMN: &str = "version";
    pub const TTL_SECONDS: u64 = 300;
    pub const LISTEN_PORT: u16 = 7480;
    /// The pod-facing metrics listener the operator configures (`metrics_listen`).
    pub const METRICS_PORT: u16 = 9464;
}

fn default_pool_size() -> u32 {
    defaults::POOL_SIZE
}
fn default_statement_timeout_ms() -> u64 {
    5_000
}
fn default_redis_connect_timeout_ms() -> u64 {
    500
}
fn default_redis_response_timeout_ms() -> u64 {
    250
}
fn default_key_column() -> String {
    defaults::KEY_COLUMN.to_string()
}
fn default_version_column() -> String {
    defaults::VERSION_COLUMN.to_string()
}
fn default_ttl_seconds() -> u64 {
    defaults::TTL_SECONDS
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            lease_ttl_ms: 2_000,
            lease_wait_ms: 100,
            tombstone_ttl_seconds: 60,
            early_expiration_beta: 1.0,
            retry: RetryBudget::default(),
            repair_interval_ms: 250,
            redis_down_backoff_ms: 1_000,
            repair_queue_max_keys: 100_000,
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            retries: 3,
            base_delay_ms: 5,
            max_delay_ms: 50,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_key_bytes: 512,
            max_in_flight: 256,
            max_queue_wait_ms: 50,
            max_batch_items: 1_000,
            max_connections: 512,
            header_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            max_answer_bytes: 16 * 1024 * 1024,
            shutdown_grace_ms: 20_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file is not valid TOML for wtc: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Values from the environment that override the file (`WTC_DATABASE_URL`, `WTC_REDIS_URL`,
/// `WTC_REDIS_PASSWORD_FILE`, `WTC_LISTEN`, `WTC_METRICS_LISTEN`). Passed in rather than read
/// here so the rules are testable.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    /// Per pod (the operator's injection), not in the shared ConfigMap: sidecars of earlier
    /// releases, which refuse unknown settings, read that file too.
    pub redis_password_file: Option<String>,
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
}

impl Overrides {
    pub fn from_env() -> Self {
        let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            database_url: get("WTC_DATABASE_URL"),
            redis_url: get("WTC_REDIS_URL"),
            redis_password_file: get("WTC_REDIS_PASSWORD_FILE"),
            listen: get("WTC_LISTEN"),
            metrics_listen: get("WTC_METRICS_LISTEN"),
        }
    }
}

impl SidecarConfig {
    /// Parses a TOML document, applies the overrides, and validates the result.
    pub fn parse(text: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config: SidecarConfig = toml::from_str(text)?;
        if let Some(url) = &overrides.database_url {
            config.database.url = url.clone();
        }
        if let Some(url) = &overrides.redis_url {
            config.redis.url = url.clone();
        }
        if let Some(file) = &overrides.redis_password_file {
            config.redis.password_file = Some(file.clone());
        }
        if let Some(listen) = &overrides.listen {
            config.listen = listen.clone();
        }
        if let Some(listen) = &overrides.metrics_listen {
            config.metrics_listen = Some(listen.clone());
        }
        config.validate()?;
        Ok(config)
    }

    /// This configuration with every setting a running sidecar reloads put back to its default.
    /// Two configurations that agree here differ only in what a reload applies; anything else
    /// (connections, listeners, limits, the entities' tables and columns, the sampler, the
    /// repair queue) takes a restart. Reloaded: each entity's `ttl_seconds`, and `cache`'s
    /// `lease_ttl_ms`, `lease_wait_ms`, `tombstone_ttl_seconds`, `early_expiration_beta` and
    /// `retry` (each read where it is used, never copied at start).
    pub fn without_reloadable(&self) -> SidecarConfig {
        let mut c = self.clone();
        let d = CacheConfig::default();
        c.cache.lease_ttl_ms = d.lease_ttl_ms;
        c.cache.lease_wait_ms = d.lease_wait_ms;
        c.cache.tombstone_ttl_seconds = d.tombstone_ttl_seconds;
        c.cache.early_expiration_beta = d.early_expiration_beta;
        c.cache.retry = d.retry;
        for e in &mut c.entities {
            e.ttl_seconds = default_ttl_seconds();
        }
        c
    }

    /// The reloadable settings whose value differs in `new`, by name (for logs).
    pub fn reloadable_changes(&self, new: &SidecarConfig) -> Vec<String> {
        let (a, b) = (&self.cache, &new.cache);
        let mut changed: Vec<String> = [
            ("cache.lease_ttl_ms", a.lease_ttl_ms != b.lease_ttl_ms),
            ("cache.lease_wait_ms", a.lease_wait_ms != b.lease_wait_ms),
            (
                "cache.tombstone_ttl_seconds",
                a.tombstone_ttl_seconds != b.tombstone_ttl_seconds,
            ),
            (
                "cache.early_expiration_beta",
                a.early_expiration_beta != b.early_expiration_beta,
            ),
            ("cache.retry", a.retry != b.retry),
        ]
        .into_iter()
        .filter(|(_, differs)| *differs)
        .map(|(name, _)| name.to_string())
        .collect();
        for (x, y) in self.entities.iter().zip(&new.entities) {
            if x.ttl_seconds != y.ttl_seconds {
                changed.push(format!("entities.{}.ttl_seconds", x.name));
            }
        }
        changed
    }

    /// Renders the TOML document the sidecar reads (used by the operator's ConfigMap).
    pub fn render(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration always serializes")
    }

    /// The API token: `env_token` (`WTC_API_TOKEN`) when given, else the contents of
    /// `api_token_file` without surrounding whitespace; `None`: the API is open. Errors name the
    /// file, never the token.
    pub fn api_token(&self, env_token: Option<String>) -> Result<Option<String>, ConfigError> {
        if let Some(t) = env_token.filter(|t| !t.trim().is_empty()) {
            return Ok(Some(t.trim().to_string()));
        }
        let Some(path) = &self.api_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::Invalid(format!("cannot read api_token_file {path}: {}", e.kind()))
        })?;
        match text.trim() {
            "" => Err(ConfigError::Invalid(format!(
                "api_token_file {path} holds no token"
            ))),
            t => Ok(Some(t.to_string())),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if self.database.url.is_empty() {
            return invalid("database.url is empty (set it or WTC_DATABASE_URL)".into());
        }
        if self.redis.url.is_empty() {
            return invalid("redis.url is empty (set it or WTC_REDIS_URL)".into());
        }
        let target = RedisTarget::parse(&self.redis.url).map_err(ConfigError::Invalid)?;
        let r = &self.redis;
        let tls_files = [&r.ca_file, &r.client_cert_file, &r.client_key_file];
        if tls_files.iter().any(|f| f.as_deref() == Some("")) || db_ca_empty(&self.database) {
            return invalid("a TLS file setting is empty; leave it out instead".into());
        }
        if !target.tls() && tls_files.iter().any(|f| f.is_some()) {
            return invalid(
                "redis.ca_file and redis.client_*_file need a TLS URL (rediss://, \
                 rediss+sentinel://, rediss+cluster://)"
                    .into(),
            );
        }
        let d = &self.database;
        if d.client_cert_file.is_some() != d.client_key_file.is_some() {
            return invalid(
                "database.client_cert_file and database.client_key_file go together".into(),
            );
        }
        if r.client_cert_file.is_some() != r.client_key_file.is_some() {
            return invalid("redis.client_cert_file and redis.client_key_file go together".into());
        }
        if r.password_file.as_deref() == Some("") {
            return invalid("redis.password_file is empty; leave it out instead".into());
        }
        match self.listen.parse::<std::net::SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => {}
            Ok(addr) => {
                return invalid(format!(
                    "listen = {addr} is not a loopback address; the sidecar only serves its own pod"
                ));
            }
            Err(_) => return invalid(format!("listen = {:?} is not host:port", self.listen)),
        }
        if let Some(m) = &self.metrics_listen {
            let Ok(addr) = m.parse::<std::net::SocketAddr>() else {
                return invalid(format!("metrics_listen = {m:?} is not host:port"));
            };
            if addr.port() != 0 && self.listen.parse::<std::net::SocketAddr>().ok() == Some(addr) {
                return invalid(format!(
                    "metrics_listen = {addr} is the API's own address (listen); pick another port"
                ));
            }
        }
        if self.database.pool_size == 0 {
            return invalid("database.pool_size must be at least 1".into());
        }
        if self.entities.is_empty() {
            return invalid("no entities configured".into());
        }
        let mut names = HashSet::new();
        for e in &self.entities {
            if !is_entity_name(&e.name) {
                return invalid(format!(
                    "entity name {:?} must be 1-63 characters of a-z, 0-9, '-' or '_'",
                    e.name
                ));
            }
            if !names.insert(e.name.as_str()) {
                return invalid(format!("entity {:?} is configured twice", e.name));
            }
            for (what, ident) in [
                ("table", &e.table),
                ("key_column", &e.key_column),
                ("version_column", &e.version_column),
            ] {
                if ident.is_empty() || ident.len() > 63 || ident.contains('\0') {
                    return invalid(format!(
                        "entity {:?}: {what} {ident:?} is not a valid identifier",
                        e.name
                    ));
                }
            }
            if e.key_column == e.version_column {
                return invalid(format!(
                    "entity {:?}: key_column and version_column are the same column",
                    e.name
                ));
            }
            if e.ttl_seconds == 0 {
                return invalid(format!(
                    "entity {:?}: ttl_seconds must be at least 1",
                    e.name
                ));
            }
        }
        let cs = &self.commit_stream;
        if cs.enabled {
            if !is_slot_name(&cs.slot) {
                return invalid(format!(
                    "commit_stream.slot {:?} must be 1-63 characters of a-z, 0-9 or '_'",
                    cs.slot
                ));
            }
            if cs.publication.is_empty()
                || cs.publication.len() > 63
                || cs.publication.contains('\0')
            {
                return invalid(format!(
                    "commit_stream.publication {:?} is not a valid identifier",
                    cs.publication
                ));
            }
            if cs.poll_interval_ms == 0 {
                return invalid("commit_stream.poll_interval_ms must be at least 1".into());
            }
        }
        if self.cache.lease_ttl_ms == 0 || self.cache.tombstone_ttl_seconds == 0 {
            return invalid(
                "cache.lease_ttl_ms and cache.tombstone_ttl_seconds must be positive".into(),
            );
        }
        if !(self.cache.early_expiration_beta >= 0.0
            && self.cache.early_expiration_beta.is_finite())
        {
            return invalid("cache.early_expiration_beta must be a finite number >= 0".into());
        }
        if self.limits.max_key_bytes == 0 {
            return invalid("limits.max_key_bytes must be positive".into());
        }
        if self.api_token_file.as_deref() == Some("") {
            return invalid("api_token_file is empty; leave it out for no token".into());
        }
        if self.limits.max_in_flight == 0 {
            return invalid("limits.max_in_flight must be at least 1".into());
        }
        if self.limits.max_connections == 0
            || self.limits.header_timeout_ms == 0
            || self.limits.body_timeout_ms == 0
        {
            return invalid(
                "limits.max_connections, header_timeout_ms and body_timeout_ms must be positive"
                    .into(),
            );
        }
        if self.limits.max_batch_items == 0 {
            return invalid("limits.max_batch_items must be at least 1".into());
        }
        let sampler = &self.sampler;
        if !(0.0..=1.0).contains(&sampler.sample_rate) {
            return invalid("sampler.sample_rate must be between 0 and 1".into());
        }
        if sampler.interval_ms == 0 {
            return invalid("sampler.interval_ms must be at least 1".into());
        }
        if sampler.write_ratio_window_seconds == 0 || sampler.write_ratio_window_seconds > 3_600 {
            return invalid("sampler.write_ratio_window_seconds must be 1 to 3600".into());
        }
        Ok(())
    }
}

fn db_ca_empty(d: &DatabaseConfig) -> bool {
    [&d.ca_file, &d.client_cert_file, &d.client_key_file]
        .iter()
        .any(|f| f.as_deref() == Some(""))
}

fn is_entity_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// PostgreSQL's rule for replication slot names.
fn is_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [database]
        url = "postgres://localhost/app"
        [redis]
        url = "redis://127.0.0.1:6379"
        [[entities]]
        name = "accounts"
        table = "accounts"
    "#;

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = SidecarConfig::parse(MINIMAL, &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7480");
        assert_eq!(c.entities[0].key_column, "id");
        assert_eq!(c.entities[0].version_column, "version");
        assert_eq!(c.entities[0].ttl_seconds, 300);
        assert_eq!(c.cache, CacheConfig::default());
        assert_eq!(
            (c.limits.max_in_flight, c.limits.max_queue_wait_ms),
            (256, 50)
        );
        assert_eq!(c.limits.max_batch_items, 1_000);
        assert_eq!(c.sampler, SamplerConfig::default());
        assert!(c.sampler.enabled);
    }

    #[test]
    fn reloadable_settings_are_told_apart_from_the_rest() {
        let a = SidecarConfig::parse(MINIMAL, &Overrides::default()).unwrap();
        let mut b = a.clone();
        b.entities[0].ttl_seconds = 60;
        b.cache.early_expiration_beta = 0.0;
        b.cache.retry.retries = 9;
        assert_eq!(a.without_reloadable(), b.without_reloadable());
        assert_eq!(
            a.reloadable_changes(&b),
            [
                "cache.early_expiration_beta",
                "cache.retry",
                "entities.accounts.ttl_seconds"
            ]
        );
        // Not reloadable: a restart is needed, and the restart part says so.
        for change in [
            |c: &mut SidecarConfig| c.database.pool_size += 1,
            |c: &mut SidecarConfig| c.cache.repair_queue_max_keys += 1,
            |c: &mut SidecarConfig| c.limits.max_in_flight += 1,
            |c: &mut SidecarConfig| c.entities[0].table = "other".into(),
            |c: &mut SidecarConfig| c.sampler.sample_rate = 0.5,
        ] {
            let mut c = a.clone();
            change(&mut c);
            assert_ne!(a.without_reloadable(), c.without_reloadable());
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let o = Overrides {
            database_url: Some("postgres://other/db".into()),
            redis_url: Some("redis://127.0.0.1:7000".into()),
            redis_password_file: Some("/etc/wtc-redis-auth/password".into()),
            listen: Some("127.0.0.1:9000".into()),
            metrics_listen: Some("0.0.0.0:9464".into()),
        };
        let c = SidecarConfig::parse(MINIMAL, &o).unwrap();
        assert_eq!(
            c.redis.password_file.as_deref(),
            Some("/etc/wtc-redis-auth/password")
        );
        assert_eq!(c.database.url, "postgres://other/db");
        assert_eq!(c.redis.url, "redis://127.0.0.1:7000");
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert_eq!(c.metrics_listen.as_deref(), Some("0.0.0.0:9464"));
    }

    #[test]
    fn the_metrics_listener_may_face_the_network_but_is_an_address_of_its_own() {
        let with = |m: &str| {
            let o = Overrides {
                metrics_listen: Some(m.into()),
                ..Overrides::default()
            };
            SidecarConfig::parse(MINIMAL, &o)
        };
        assert!(with("0.0.0.0:9464").is_ok());
        let e = with("nowhere").unwrap_err().to_string();
        assert!(
            e.contains("metrics_listen") && e.contains("host:port"),
            "{e}"
        );
        let e = with("127.0.0.1:7480").unwrap_err().to_string();
        assert!(e.contains("the API's own address"), "{e}");
    }

    #[test]
    fn the_commit_stream_and_trigger_versions_are_opt_in_and_checked() {
        let c = SidecarConfig::parse(MINIMAL, &Overrides::default()).unwrap();
        assert!(!c.commit_stream.enabled);
        assert_eq!(c.entities[0].versions, VersionSource::Sidecar);
        // Left at their defaults, they are not written out: sidecars of earlier releases
        // refuse unknown settings, and the operator's config hash stays the same.
        let text = c.render();
        assert!(
            !text.contains("commit_stream") && !text.contains("versions"),
            "{text}"
        );
        let on = format!(
            "{MINIMAL}versions = \"trigger\"\n[commit_stream]\nenabled = true\nslot = \"shop_1\"\n"
        );
        let c = SidecarConfig::parse(&on, &Overrides::default()).unwrap();
        assert_eq!(c.entities[0].versions, VersionSource::Trigger);
        assert_eq!(c.commit_stream.slot, "shop_1");
        assert_eq!(c.commit_stream.publication, "wtc_commit_stream");
        assert_eq!(
            SidecarConfig::parse(&c.render(), &Overrides::default()).unwrap(),
            c
        );
        for (bad, says) in [
            ("slot = \"Shop\"", "commit_stream.slot"),
            ("slot = \"a-b\"", "commit_stream.slot"),
            ("publication = \"\"", "commit_stream.publication"),
            ("poll_interval_ms = 0", "poll_interval_ms"),
        ] {
            let text = format!("{MINIMAL}[commit_stream]\nenabled = true\n{bad}\n");
            let e = SidecarConfig::parse(&text, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = SidecarConfig::parse(
            &format!("{MINIMAL}versions = \"database\"\n"),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("versions"), "{e}");
    }

    #[test]
    fn render_round_trips() {
        let c = SidecarConfig::parse(MINIMAL, &Overrides::default()).unwrap();
        let again = SidecarConfig::parse(&c.render(), &Overrides::default()).unwrap();
        assert_eq!(c, again);
        let text = format!("{MINIMAL}\n[limits]\nmax_batch_items = 7");
        let c = SidecarConfig::parse(&text, &Overrides::default()).unwrap();
        assert_eq!(c.limits.max_batch_items, 7);
        let again = SidecarConfig::parse(&c.render(), &Overrides::default()).unwrap();
        assert_eq!(c, again);
        let text = format!(
            "{MINIMAL}\n[sampler]\nenabled = false\nsample_rate = 0.5\ngrace_ms = 20\ninterval_ms = 30\nwrite_ratio_window_seconds = 10"
        );
        let c = SidecarConfig::parse(&text, &Overrides::default()).unwrap();
        assert_eq!(
            c.sampler,
            SamplerConfig {
                enabled: false,
                sample_rate: 0.5,
                grace_ms: 20,
                interval_ms: 30,
                write_ratio_window_seconds: 10,
            }
        );
        let again = SidecarConfig::parse(&c.render(), &Overrides::default()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn api_token_from_file_or_environment() {
        let dir = std::env::temp_dir().join(format!("wtc-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut c = SidecarConfig::parse(MINIMAL, &Overrides::default()).unwrap();
        assert_eq!(c.api_token(None).unwrap(), None);
        assert_eq!(
            c.api_token(Some("env".into())).unwrap().as_deref(),
            Some("env")
        );
        c.api_token_file = Some(file.display().to_string());
        assert_eq!(c.api_token(None).unwrap().as_deref(), Some("from-file"));
        assert_eq!(
            c.api_token(Some(String::new())).unwrap().as_deref(),
            Some("from-file")
        );
        assert_eq!(
            c.api_token(Some("env".into())).unwrap().as_deref(),
            Some("env")
        );
        let again = SidecarConfig::parse(&c.render(), &Overrides::default()).unwrap();
        assert_eq!(c, again);
        std::fs::write(&file, " \n").unwrap();
        assert!(
            c.api_token(None)
                .unwrap_err()
                .to_string()
                .contains("no token")
        );
        c.api_token_file = Some(dir.join("missing").display().to_string());
        assert!(
            c.api_token(None)
                .unwrap_err()
                .to_string()
                .contains("cannot read")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_what_would_break_at_runtime() {
        let cases = [
            (
                MINIMAL.replace("name = \"accounts\"", "name = \"Bad Name\""),
                "entity name",
            ),
            (
                format!("listen = \"0.0.0.0:7480\"\n{MINIMAL}"),
                "not a loopback",
            ),
            (
                format!("{MINIMAL}\n[[entities]]\nname = \"accounts\"\ntable = \"t\""),
                "twice",
            ),
            (
                MINIMAL.replace(
                    "table = \"accounts\"",
                    "table = \"a\"\nkey_column = \"version\"",
                ),
                "same column",
            ),
            (format!("{MINIMAL}\nsurprise = 1"), "unknown field"),
            (
                format!("{MINIMAL}\n[limits]\nmax_in_flight = 0"),
                "max_in_flight",
            ),
            (
                format!("{MINIMAL}\n[limits]\nmax_batch_items = 0"),
                "max_batch_items",
            ),
            (
                format!("api_token_file = \"\"\n{MINIMAL}"),
                "api_token_file",
            ),
            (
                format!("{MINIMAL}\n[sampler]\nsample_rate = 1.5"),
                "sampler.sample_rate",
            ),
            (
                format!("{MINIMAL}\n[sampler]\ninterval_ms = 0"),
                "sampler.interval_ms",
            ),
            (
                format!("{MINIMAL}\n[sampler]\nwrite_ratio_window_seconds = 0"),
                "write_ratio_window_seconds",
            ),
        ];
        for (text, expected) in cases {
            let err = SidecarConfig::parse(&text, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
    }
}

#[cfg(test)]
mod defaults_tests {
    #[test]
    fn the_default_listen_address_uses_the_default_port() {
        assert!(super::DEFAULT_LISTEN.ends_with(&format!(":{}", super::defaults::LISTEN_PORT)));
    }
}
