//! The condition types and reasons of a cache's status, as Kubernetes shows them: one place
//! for the strings (`status` computes the conditions, `sidecars` names its reason).

/// The status's conditions, in the order it lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionType {
    Ready,
    RedisReady,
    ConfigValid,
    SidecarsReady,
    /// Only on caches with the commit stream on (or a slot still to drop).
    CommitStreamReady,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::RedisReady => "RedisReady",
            ConditionType::ConfigValid => "ConfigValid",
            ConditionType::SidecarsReady => "SidecarsReady",
            ConditionType::CommitStreamReady => "CommitStreamReady",
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
    /// `CommitStreamReady` true: the reader holds the slot and is not far behind.
    Reading,
    /// `CommitStreamReady` false: no reader pod is running yet.
    ReaderStarting,
    /// `CommitStreamReady` false: the operator cannot read the reader's metrics.
    ReaderUnreadable,
    /// `CommitStreamReady` false: the reader runs but does not hold the slot.
    NotLeading,
    /// `CommitStreamReady` false: the reader is more than 30 s behind.
    Lagging,
    /// `CommitStreamReady` false: the slot and publication are being dropped.
    Dropping,
    /// `CommitStreamReady` false: the Job could not drop them.
    DropFailed,
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
            Reason::Reading => "Reading",
            Reason::ReaderStarting => "ReaderStarting",
            Reason::ReaderUnreadable => "ReaderUnreadable",
            Reason::NotLeading => "NotLeading",
            Reason::Lagging => "Lagging",
            Reason::Dropping => "Dropping",
            Reason::DropFailed => "DropFailed",
        }
    }
}
