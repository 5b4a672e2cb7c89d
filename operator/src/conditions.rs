//! The condition types and reasons of a cache's status, as Kubernetes shows them: one place
//! for the strings (`status` computes the conditions, `sidecars` names its reason).

/// The status's conditions, in the order it lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionType {
    Ready,
    RedisReady,
    ConfigValid,
    SidecarsReady,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::RedisReady => "RedisReady",
            ConditionType::ConfigValid => "ConfigValid",
            ConditionType::SidecarsReady => "SidecarsReady",
        }
    }
}

/// Condition reasons; also the reasons of the events on the cache. Tests, the node suite and the
/// docs match these strings: they are part of the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `Ready` true.
    Ready,
    /// `Ready`, `RedisReady` and `ConfigValid` false: the spec renders no valid configuration.
    InvalidSpec,
    /// `Ready` false: the spec is valid, Redis is not available.
    RedisUnavailable,
    /// `RedisReady` true: the managed Redis Deployment is available.
    Available,
    /// `RedisReady` true: Redis is external, not ours to watch.
    External,
    /// `RedisReady` false: the managed Redis is not available (yet).
    Unavailable,
    /// `ConfigValid` true.
    Valid,
    /// `SidecarsReady` true: no sidecar is failing (possibly none injected).
    SidecarsRunning,
    /// `SidecarsReady` false: some injected pod cannot run its sidecar.
    SidecarFailing,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ready => "Ready",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::RedisUnavailable => "RedisUnavailable",
            Reason::Available => "Available",
            Reason::External => "External",
            Reason::Unavailable => "Unavailable",
            Reason::Valid => "Valid",
            Reason::SidecarsRunning => "SidecarsRunning",
            Reason::SidecarFailing => "SidecarFailing",
        }
    }
}
