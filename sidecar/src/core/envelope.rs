//! The envelope stored in Redis for every cached row, in the seed's format:
//! `{"v":14,"data":{...},"written_at":"2026-04-17T10:00:00Z"}`, and the tombstone a delete leaves:
//! `{"v":15,"deleted":true,"written_at":"..."}`.
//!
//! The version always comes first, so the Redis scripts read it with a prefix match instead of
//! decoding JSON. A hit hands the stored bytes to the response as they are; they are validated
//! (not re-encoded) so that a corrupt or foreign value is treated as a miss, never served.

use super::ids::Version;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// A row or tombstone as the database returned it, ready to be cached and answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub version: Version,
    pub deleted: bool,
    /// The exact bytes stored in Redis and sent to the client.
    pub bytes: Bytes,
}

impl Envelope {
    /// `data` must be a JSON object as text (PostgreSQL's `to_jsonb(row)::text`); `written_at` an
    /// RFC 3339 timestamp from the database clock.
    pub fn row(version: Version, data: &str, written_at: &str) -> Self {
        let mut s = String::with_capacity(data.len() + written_at.len() + 48);
        s.push_str("{\"v\":");
        s.push_str(&version.to_string());
        s.push_str(",\"data\":");
        s.push_str(data);
        s.push_str(",\"written_at\":\"");
        s.push_str(written_at);
        s.push_str("\"}");
        Self {
            version,
            deleted: false,
            bytes: Bytes::from(s),
        }
    }

    pub fn tombstone(version: Version, written_at: &str) -> Self {
        let s = format!("{{\"v\":{version},\"deleted\":true,\"written_at\":\"{written_at}\"}}");
        Self {
            version,
            deleted: true,
            bytes: Bytes::from(s),
        }
    }

    /// Validates bytes read back from Redis. `None` for anything this sidecar would not have
    /// written: not JSON, version missing or not first, neither data nor a tombstone marker.
    pub fn parse_stored(bytes: Bytes) -> Option<Self> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Stored<'a> {
            v: i64,
            #[serde(borrow, default)]
            data: Option<&'a RawValue>,
            #[serde(default)]
            deleted: bool,
            #[allow(dead_code)]
            written_at: &'a str,
        }
        let prefix_version = version_prefix(&bytes)?;
        let stored: Stored<'_> = serde_json::from_slice(&bytes).ok()?;
        if has_lone_surrogate(&bytes) {
            return None;
        }
        if stored.v != prefix_version || stored.v < 0 {
            return None;
        }
        match (stored.data, stored.deleted) {
            (Some(d), false) if d.get().starts_with('{') => {}
            (None, true) => {}
            _ => return None,
        }
        let (version, deleted) = (Version::new(stored.v), stored.deleted);
        Some(Self {
            version,
            deleted,
            bytes,
        })
    }
}

/// Whether a `\uD800`-`\uDFFF` escape stands outside a high-low pair. The JSON grammar allows it
/// and `RawValue` does not look inside strings, but it is no text: PostgreSQL's jsonb never writes
/// one, strict parsers refuse it, so such a value is not one this sidecar stored. Called on bytes
/// that parsed as JSON, where every backslash starts an escape inside a string.
fn has_lone_surrogate(b: &[u8]) -> bool {
    let hex4 = |at: usize| {
        let digits = b.get(at..at + 4)?;
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let mut i = 0;
    while let Some(off) = b
        .get(i..)
        .and_then(|rest| rest.iter().position(|&c| c == b'\\'))
    {
        let at = i + off;
        if b.get(at + 1) != Some(&b'u') {
            i = at + 2;
            continue;
        }
        let Some(unit) = hex4(at + 2) else {
            return true;
        };
        i = at + 6;
        match unit {
            0xD800..=0xDBFF => {
                let low = (b.get(at + 6) == Some(&b'\\') && b.get(at + 7) == Some(&b'u'))
                    .then(|| hex4(at + 8))
                    .flatten();
                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                    return true;
                }
                i = at + 12;
            }
            0xDC00..=0xDFFF => return true,
            _ => {}
        }
    }
    false
}

/// The version as the Redis scripts see it: the digits after the literal prefix `{"v":`.
fn version_prefix(bytes: &[u8]) -> Option<i64> {
    let rest = bytes.strip_prefix(b"{\"v\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 18 || rest.get(digits) != Some(&b',') {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_envelope_has_the_seed_format() {
        let e = Envelope::row(
            Version::new(14),
            r#"{"id": "a", "n": 1}"#,
            "2026-04-17T10:00:00.000000Z",
        );
        let v: serde_json::Value = serde_json::from_slice(&e.bytes).unwrap();
        assert_eq!(v["v"], 14);
        assert_eq!(v["data"]["n"], 1);
        assert_eq!(v["written_at"], "2026-04-17T10:00:00.000000Z");
        assert!(e.bytes.starts_with(b"{\"v\":14,"));
        assert_eq!(Envelope::parse_stored(e.bytes.clone()), Some(e));
    }

    #[test]
    fn tombstone_round_trips() {
        let t = Envelope::tombstone(Version::new(15), "2026-04-17T10:00:00Z");
        assert_eq!(
            &t.bytes[..],
            br#"{"v":15,"deleted":true,"written_at":"2026-04-17T10:00:00Z"}"#
        );
        let back = Envelope::parse_stored(t.bytes.clone()).unwrap();
        assert!(back.deleted);
        assert_eq!(back.version, Version::new(15));
    }

    #[test]
    fn foreign_or_corrupt_values_are_not_envelopes() {
        for bad in [
            &b""[..],
            b"hello",
            b"{\"v\":1}",
            b"{\"v\":1,\"data\":[1],\"written_at\":\"x\"}",
            b"{\"v\":1,\"data\":{},\"written_at\":\"x\"",
            b"{\"data\":{},\"v\":1,\"written_at\":\"x\"}",
            b"{\"v\":2,\"v\":1,\"data\":{},\"written_at\":\"x\"}",
            b"{\"v\":1,\"data\":{},\"deleted\":true,\"written_at\":\"x\"}",
            b"{\"v\":1,\"data\":{},\"written_at\":\"x\",\"extra\":1}",
            b"{\"v\":99999999999999999999,\"data\":{},\"written_at\":\"x\"}",
            b"{\"v\":-1,\"data\":{},\"written_at\":\"x\"}",
            // Lone surrogate escapes (found by the `envelope` fuzz target).
            br#"{"v":1,"data":{"a":"\ud800"},"written_at":"x"}"#,
            br#"{"v":1,"data":{"a":"\uDC00x"},"written_at":"x"}"#,
            br#"{"v":1,"data":{"a":"\udc00\ud800"},"written_at":"x"}"#,
            br#"{"v":1,"data":{"\ud83d":1},"written_at":"x"}"#,
        ] {
            assert!(
                Envelope::parse_stored(Bytes::copy_from_slice(bad)).is_none(),
                "{:?} was accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn surrogate_pairs_and_escaped_backslashes_are_fine() {
        for good in [
            br#"{"v":1,"data":{"a":"\ud83d\ude00"},"written_at":"x"}"#.as_slice(),
            br#"{"v":1,"data":{"a":"\\ud800"},"written_at":"x"}"#,
            br#"{"v":1,"data":{"a":"\u00e9\n\"\\"},"written_at":"x"}"#,
        ] {
            assert!(
                Envelope::parse_stored(Bytes::copy_from_slice(good)).is_some(),
                "{:?} was refused",
                String::from_utf8_lossy(good)
            );
        }
    }
}
