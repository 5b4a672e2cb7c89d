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

use crate::core::ports::{CacheError, FillOutcome, InvalidateOutcome, Stale, StoreOutcome};
use redis::Value;

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

/// A change committed elsewhere (the commit stream): evicts the entry when its version is
/// stale, deletes the lease either way. Never sets a value, so applying a change late (or twice)
/// cannot bring an older version back.
/// ARGV: the change's version ("" when it has none: any entry is stale), "1" when an entry of
/// exactly that version is stale too.
/// Returns "evicted", "kept" or "absent".
pub const INVALIDATE: &str = r#"
local cur = redis.call('GET', KEYS[1])
local result = 'absent'
if cur then
  local v = tonumber(string.match(cur, '^{"v":(%d+),'))
  local bound = tonumber(ARGV[1])
  if bound == nil or v == nil or v < bound or (ARGV[2] == '1' and v == bound) then
    redis.call('DEL', KEYS[1])
    result = 'evicted'
  else
    result = 'kept'
  end
end
redis.call('DEL', KEYS[2])
return result
"#;

/// Gives a lease back without filling (the row does not exist). ARGV: lease token.
pub const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// What a `STORE` answered.
pub(super) fn store_outcome(reply: &Value) -> Result<StoreOutcome, CacheError> {
    match text(reply) {
        Some("stored") => Ok(StoreOutcome::Stored),
        Some("stale") => Ok(StoreOutcome::Stale),
        Some("skipped") => Ok(StoreOutcome::Skipped),
        _ => Err(CacheError::Protocol(format!("STORE answered {reply:?}"))),
    }
}

/// `INVALIDATE`'s arguments for `stale`.
pub(super) fn invalidate_args(stale: Stale) -> (String, &'static str) {
    match stale {
        Stale::Below(v) => (v.get().to_string(), "0"),
        Stale::AtMost(v) => (v.get().to_string(), "1"),
        Stale::Any => (String::new(), "0"),
    }
}

/// What an `INVALIDATE` answered.
pub(super) fn invalidate_outcome(reply: &Value) -> Result<InvalidateOutcome, CacheError> {
    match text(reply) {
        Some("evicted") => Ok(InvalidateOutcome::Evicted),
        Some("kept") => Ok(InvalidateOutcome::Kept),
        Some("absent") => Ok(InvalidateOutcome::Absent),
        _ => Err(CacheError::Protocol(format!(
            "INVALIDATE answered {reply:?}"
        ))),
    }
}

/// What a `FILL` answered.
pub(super) fn fill_outcome(reply: &Value) -> Result<FillOutcome, CacheError> {
    match text(reply) {
        Some("stored") => Ok(FillOutcome::Stored),
        Some("lease_lost") => Ok(FillOutcome::LeaseLost),
        Some("stale") => Ok(FillOutcome::Stale),
        _ => Err(CacheError::Protocol(format!("FILL answered {reply:?}"))),
    }
}

/// A script's text reply.
fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_replies_decode_once_for_every_path() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            store_outcome(&bulk("stored")).unwrap(),
            StoreOutcome::Stored
        );
        assert_eq!(
            store_outcome(&Value::SimpleString("skipped".into())).unwrap(),
            StoreOutcome::Skipped
        );
        assert_eq!(
            fill_outcome(&bulk("lease_lost")).unwrap(),
            FillOutcome::LeaseLost
        );
        assert!(store_outcome(&bulk("lease_lost")).is_err());
        assert!(fill_outcome(&Value::Int(1)).is_err());
    }
}
