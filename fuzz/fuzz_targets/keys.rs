//! Keys and their spellings (`sidecar/src/postgres/keys.rs`): for every key type, whatever the
//! bytes, `canonical` never panics, and what it accepts it turns into ONE spelling: canonical
//! again gives the same text (so two spellings of one value meet on one cache entry), and the
//! text has the type's plain form (a decimal integer in range, a lower-case 8-4-4-4-12 uuid, a
//! number without leading or trailing zeros).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wtc_sidecar::postgres::KeyType;

const TYPES: [&str; 9] = [
    "smallint",
    "integer",
    "bigint",
    "uuid",
    "numeric",
    "numeric(10,2)",
    "text",
    "character(8)",
    "date",
];

fuzz_target!(|input: &[u8]| {
    let Some((&pick, rest)) = input.split_first() else {
        return;
    };
    let t = TYPES[usize::from(pick) % TYPES.len()];
    let key_type = KeyType::of(t).expect("a supported type");
    let key = String::from_utf8_lossy(rest);
    let Ok(canonical) = key_type.canonical(&key) else {
        return;
    };
    let again = key_type
        .canonical(&canonical)
        .unwrap_or_else(|e| panic!("{t}: {key:?} -> {canonical:?} refused: {e}"));
    assert_eq!(again, canonical, "{t}: not one spelling for {key:?}");
    match t {
        "smallint" | "integer" | "bigint" => {
            let n: i64 = canonical.parse().expect("a decimal integer");
            assert_eq!(n.to_string(), canonical, "{t}: {key:?}");
            let (lo, hi) = match t {
                "smallint" => (i64::from(i16::MIN), i64::from(i16::MAX)),
                "integer" => (i64::from(i32::MIN), i64::from(i32::MAX)),
                _ => (i64::MIN, i64::MAX),
            };
            assert!((lo..=hi).contains(&n), "{t}: {n} out of range");
        }
        "uuid" => {
            assert_eq!(canonical.len(), 36, "{key:?} -> {canonical:?}");
            for (i, c) in canonical.chars().enumerate() {
                if [8, 13, 18, 23].contains(&i) {
                    assert_eq!(c, '-');
                } else {
                    assert!(matches!(c, '0'..='9' | 'a'..='f'), "{canonical:?}");
                }
            }
        }
        "numeric" | "numeric(10,2)" => {
            let body = canonical.strip_prefix('-').unwrap_or(&canonical);
            assert_ne!(canonical, "-0");
            let (int, frac) = body.split_once('.').unwrap_or((body, ""));
            assert!(!int.is_empty() && int.bytes().all(|b| b.is_ascii_digit()));
            assert!(int == "0" || !int.starts_with('0'), "{canonical:?}");
            assert!(!frac.ends_with('0'), "{canonical:?}");
            assert!(frac.bytes().all(|b| b.is_ascii_digit()));
            if t == "numeric(10,2)" {
                assert!(frac.len() <= 2, "{canonical:?}");
            }
        }
        "character(8)" => assert!(!canonical.ends_with(' ')),
        _ => {}
    }
});
