//! Bytes read back from Redis, as `Envelope::parse_stored` sees them, and envelopes built from
//! pieces with `Envelope::row` / `Envelope::tombstone`.
//!
//! 1. Any input: when `parse_stored` accepts it, the bytes are exactly what the rest of the
//!    sidecar assumes of a cached value: they start with `{"v":<digits>,` (what the Redis scripts
//!    match) and those digits are the parsed version; they are one JSON object with no fields but
//!    `v`, `data`, `deleted` and `written_at`; `written_at` is a string; a row has a `data` object
//!    and no `deleted: true`, a tombstone has `deleted: true` and no data; the bytes are kept as
//!    they came (served unchanged), and parsing them again gives the same envelope.
//! 2. The input split at its first two NUL bytes into `version`, `data` and `written_at`: a row
//!    and a tombstone built from valid pieces (a version from 0 to 10^18 - 1, a JSON object, a
//!    timestamp that needs no escaping) parse back to the same version and `deleted`, with the same
//!    data and timestamp. Invalid pieces may be refused, but whatever is accepted obeys (1).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use wtc_sidecar::core::{Envelope, Version};

/// The largest version the prefix match accepts back: 18 digits (`version_prefix`).
const MAX_VERSION: i64 = 999_999_999_999_999_999;

fuzz_target!(|input: &[u8]| {
    if let Some(env) = Envelope::parse_stored(Bytes::copy_from_slice(input)) {
        check_accepted(input, &env);
    }
    let mut parts = input.splitn(3, |b| *b == 0);
    if let (Some(v), Some(data), Some(written_at)) = (parts.next(), parts.next(), parts.next()) {
        round_trip(v, data, written_at);
    }
});

/// Property 1: what an accepted value must be.
fn check_accepted(input: &[u8], env: &Envelope) {
    assert_eq!(
        &env.bytes[..],
        input,
        "the stored bytes must be kept as they are"
    );
    let rest = input
        .strip_prefix(b"{\"v\":")
        .expect("accepted without the {\"v\": prefix");
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    assert!(digits > 0, "accepted without digits after {{\"v\":");
    assert_eq!(
        rest.get(digits),
        Some(&b','),
        "the version is not followed by ','"
    );
    let prefix: i64 = std::str::from_utf8(&rest[..digits])
        .unwrap()
        .parse()
        .expect("prefix digits out of range");
    assert_eq!(prefix, env.version.get(), "prefix version != parsed version");
    assert!(env.version.get() >= 0);

    check_json(input);
    // The fields, each kept as its raw text (a data object is checked as JSON above).
    let fields: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(input).expect("accepted bytes are not one JSON object");
    for k in fields.keys() {
        assert!(
            matches!(k.as_str(), "v" | "data" | "deleted" | "written_at"),
            "accepted an unknown field {k:?}"
        );
    }
    let raw = |k: &str| fields.get(k).map(|r| r.get());
    assert_eq!(raw("v"), Some(env.version.to_string().as_str()));
    assert!(
        raw("written_at").is_some_and(|w| serde_json::from_str::<String>(w).is_ok()),
        "written_at is missing or not a string"
    );
    let deleted = match raw("deleted") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => panic!("deleted is {other}, not a boolean"),
    };
    assert_eq!(deleted, env.deleted, "deleted flag differs from the JSON");
    let data = raw("data").filter(|d| *d != "null");
    if env.deleted {
        assert!(data.is_none(), "a tombstone with data");
    } else {
        assert!(
            data.is_some_and(|d| d.starts_with('{')),
            "a row whose data is not an object"
        );
    }
    // Deterministic: the same bytes parse to the same envelope.
    assert_eq!(
        Envelope::parse_stored(env.bytes.clone()).as_ref(),
        Some(env),
        "parsing is not stable"
    );
}

/// The bytes are JSON: the JSON grammar (numbers of any size, as PostgreSQL's numeric writes them;
/// any depth) with every string valid Unicode, so no escape of a lone UTF-16 surrogate such as
/// `"\ud800"`, which PostgreSQL's jsonb never writes and strict parsers refuse (fuzz finding 2).
fn check_json(input: &[u8]) {
    if let Err(e) = valid_json(input) {
        panic!("accepted bytes are not valid JSON: {e}");
    }
}

fn valid_json(input: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<IgnoredAny>(input).map_err(|e| e.to_string())?;
    strings_are_unicode(input)
}

/// Decodes the UTF-16 escapes of every string of a document that follows the JSON grammar; other
/// characters stand in as one non-surrogate unit each.
fn strings_are_unicode(input: &[u8]) -> Result<(), String> {
    let mut i = 0;
    while i < input.len() {
        if input[i] != b'"' {
            i += 1;
            continue;
        }
        i += 1;
        let mut units: Vec<u16> = Vec::new();
        while input[i] != b'"' {
            if input[i] == b'\\' {
                if input[i + 1] == b'u' {
                    let hex = std::str::from_utf8(&input[i + 2..i + 6]).unwrap();
                    units.push(u16::from_str_radix(hex, 16).unwrap());
                    i += 6;
                } else {
                    units.push(u16::from(b'x'));
                    i += 2;
                }
            } else {
                units.push(u16::from(b'x'));
                i += 1;
            }
        }
        i += 1;
        String::from_utf16(&units).map_err(|_| "a string with a lone surrogate escape")?;
    }
    Ok(())
}

/// Property 2: envelopes the sidecar builds come back as built.
fn round_trip(v: &[u8], data: &[u8], written_at: &[u8]) {
    let Some(version) = std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    else {
        return;
    };
    let (Ok(data), Ok(written_at)) = (std::str::from_utf8(data), std::str::from_utf8(written_at))
    else {
        return;
    };
    let version_ok = (0..=MAX_VERSION).contains(&version);
    // A JSON object as PostgreSQL's `to_jsonb(row)::text` writes it: no surrounding whitespace.
    let data_ok =
        data.starts_with('{') && data.ends_with('}') && valid_json(data.as_bytes()).is_ok();
    let written_at_ok = !written_at
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control());

    let row = Envelope::row(Version::new(version), data, written_at);
    assert_eq!((row.version.get(), row.deleted), (version, false));
    let parsed = Envelope::parse_stored(row.bytes.clone());
    if let Some(p) = &parsed {
        check_accepted(&row.bytes, p);
    }
    if version_ok && data_ok && written_at_ok {
        let p = parsed.unwrap_or_else(|| {
            panic!(
                "a valid row did not parse back: {:?}",
                String::from_utf8_lossy(&row.bytes)
            )
        });
        assert_eq!((p.version.get(), p.deleted), (version, false));
        let back: BTreeMap<String, Box<RawValue>> = serde_json::from_slice(&p.bytes).unwrap();
        assert_eq!(back["data"].get(), data, "data changed");
        assert_eq!(
            serde_json::from_str::<String>(back["written_at"].get())
                .ok()
                .as_deref(),
            Some(written_at)
        );
    } else if !version_ok {
        assert!(
            parsed.is_none(),
            "a row with version {version} was accepted"
        );
    }

    let t = Envelope::tombstone(Version::new(version), written_at);
    assert_eq!((t.version.get(), t.deleted), (version, true));
    let parsed = Envelope::parse_stored(t.bytes.clone());
    if let Some(p) = &parsed {
        check_accepted(&t.bytes, p);
    }
    if version_ok && written_at_ok {
        let p = parsed.unwrap_or_else(|| {
            panic!(
                "a valid tombstone did not parse back: {:?}",
                String::from_utf8_lossy(&t.bytes)
            )
        });
        assert_eq!((p.version.get(), p.deleted), (version, true));
    } else if !version_ok {
        assert!(
            parsed.is_none(),
            "a tombstone with version {version} was accepted"
        );
    }
}
