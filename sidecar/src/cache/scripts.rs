//! Every Redis script of the protocol, in one place.
//!
//! Keys: `KEYS[1]` is the cache entry, `KEYS[2]` its fill lease. Both share a hash tag so they
//! live in one slot on a cluster. The stored version is read from the envelope's prefix
//! (`{"v":N,`) with a pattern match: no JSON decoding on the hot path. An entry whose prefix does
//! not parse is corrupt and may be overwritten.
//!
//! The lease is the right to put a value into an *empty* slot. Readers take it with `SET NX`
//! before reading the database; writers take it unconditionally before their commit (a write
//! intent), which also revokes any reader that might have read the row before that commit. Every
//! write's cache step deletes the lease, so a filler or an older writer that read or committed
//! before it can no longer install its value, even if the entry was evicted in between.

/// Cache step of a committed write (row or tombstone).
/// ARGV: version, envelope, ttl_ms, intent token ("" when the write holds no intent).
/// Returns "stored", "stale" (a newer version is cached) or "skipped" (empty slot, intent lost).
pub const STORE: &str = r#"
local new = tonumber(ARGV[1])
local cur = redis.call('GET', KEYS[1])
local result
if cur then
  local v = tonumber(string.match(cur, '^{"v":(%d+),'))
  if v == nil or v < new then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    result = 'stored'
  else
    result = 'stale'
  end
elseif ARGV[4] ~= '' and redis.call('GET', KEYS[2]) == ARGV[4] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  result = 'stored'
else
  result = 'skipped'
end
redis.call('DEL', KEYS[2])
return result
"#;

/// Fill after a miss, by the holder of the lease.
/// ARGV: version, envelope, ttl_ms, lease token.
/// Returns "stored", "lease_lost" or "stale" (a newer version is cached).
/// An equal version is stored again: that is how an early refresh extends the TTL.
pub const FILL: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[4] then
  return 'lease_lost'
end
redis.call('DEL', KEYS[2])
local cur = redis.call('GET', KEYS[1])
if cur then
  local v = tonumber(string.match(cur, '^{"v":(%d+),'))
  if v ~= nil and v > tonumber(ARGV[1]) then
    return 'stale'
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 'stored'
"#;

/// Gives a lease back without filling (the row does not exist). ARGV: lease token.
pub const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The protocol with its two guards removed, for proving that the history checker catches what
/// they prevent. Only in builds with `test-hooks`, and only when the sidecar is started with
/// `WTC_TEST_WEAKEN=plain-set` (see `Scripts::for_this_build`).
#[cfg(feature = "test-hooks")]
pub mod weakened {
    /// STORE as a plain `SET`: no version comparison, so a late older write overwrites a newer one.
    pub const STORE: &str = r#"
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 'stored'
"#;

    /// FILL without the lease or the version check: a slow filler installs what it read, however
    /// old (the seed's "set on miss").
    pub const FILL: &str = r#"
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 'stored'
"#;
}

/// The script texts this sidecar runs: the protocol's, or (test builds, on request) the weakened.
#[derive(Debug, Clone, Copy)]
pub struct Scripts {
    pub store: &'static str,
    pub fill: &'static str,
    pub release: &'static str,
}

impl Scripts {
    pub const PROTOCOL: Scripts = Scripts {
        store: STORE,
        fill: FILL,
        release: RELEASE,
    };

    pub fn for_this_build() -> Scripts {
        #[cfg(feature = "test-hooks")]
        if std::env::var("WTC_TEST_WEAKEN").as_deref() == Ok("plain-set") {
            tracing::warn!("WTC_TEST_WEAKEN=plain-set: CAS and fill leases are OFF (test build)");
            return Scripts {
                store: weakened::STORE,
                fill: weakened::FILL,
                release: RELEASE,
            };
        }
        Self::PROTOCOL
    }
}
