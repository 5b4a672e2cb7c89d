//! One row, one cache entry: every key is turned into its column type's canonical text before it
//! names a cache entry, a lock or a batch slot. PostgreSQL reads `042`, `+42` and ` 42` as the
//! integer 42, and `A0EEBC99-...` as the same uuid as `a0eebc99-...`; without this, each spelling
//! would fill an entry of its own, and a write through one spelling would leave the others stale.
//!
//! The rule per key type (docs/api.md "Keys"):
//! - `smallint`, `integer`, `bigint`: PostgreSQL's spellings (spaces around, a sign, leading
//!   zeros) are read as the integer, in the type's range; the canonical text is the plain decimal.
//! - `uuid`: PostgreSQL's spellings (any case, braces, a hyphen after any group of four digits or
//!   none); canonical: lower case, 8-4-4-4-12.
//! - `numeric`/`decimal`: a sign, digits, a point, an exponent; canonical: the shortest decimal
//!   (no leading zeros, no trailing fractional zeros, `0` for zero). More fractional digits than
//!   the column's scale are refused (PostgreSQL would round them onto another key).
//! - `text`, `character varying`: the text as is (the column's collation must be deterministic).
//! - `character(n)`: trailing spaces are not part of the value (PostgreSQL pads); canonical: without
//!   them.
//! - `date`: only `YYYY-MM-DD` (other spellings depend on the server's DateStyle): refused.
//! - any other type: the entity is refused at start (it would need its own canonical form).

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq)]
pub enum KeyType {
    Integer {
        min: i64,
        max: i64,
    },
    Uuid,
    /// `scale`: the column's number of fractional digits, when the type fixes it.
    Numeric {
        scale: Option<u32>,
    },
    Text,
    Bpchar,
    Date,
}

impl KeyType {
    /// The key type of a column, from `format_type` (`integer`, `numeric(10,2)`, ...).
    pub fn of(format_type: &str) -> Result<KeyType, String> {
        let base = format_type.split('(').next().unwrap_or_default().trim();
        Ok(match base {
            "smallint" => KeyType::Integer {
                min: i16::MIN.into(),
                max: i16::MAX.into(),
            },
            "integer" => KeyType::Integer {
                min: i32::MIN.into(),
                max: i32::MAX.into(),
            },
            "bigint" => KeyType::Integer {
                min: i64::MIN,
                max: i64::MAX,
            },
            "uuid" => KeyType::Uuid,
            "numeric" => KeyType::Numeric {
                scale: format_type
                    .split_once(',')
                    .and_then(|(_, s)| s.trim_end_matches(')').trim().parse().ok())
                    .or_else(|| format_type.contains('(').then_some(0)),
            },
            "text" | "character varying" => KeyType::Text,
            "character" => KeyType::Bpchar,
            "date" => KeyType::Date,
            other => {
                return Err(format!(
                    "key columns of type {other} are not supported (one row must have one \
                     spelling): use text, character varying, character, smallint, integer, \
                     bigint, numeric, uuid or date"
                ));
            }
        })
    }

    /// The canonical text of `key`, or why it is no key of this type.
    pub fn canonical<'a>(&self, key: &'a str) -> Result<Cow<'a, str>, String> {
        let owned = |s: String| {
            if s == key {
                Cow::Borrowed(key)
            } else {
                Cow::Owned(s)
            }
        };
        match self {
            KeyType::Text => Ok(Cow::Borrowed(key)),
            KeyType::Bpchar => Ok(Cow::Borrowed(key.trim_end_matches(' '))),
            KeyType::Integer { min, max } => integer(key, *min, *max).map(owned),
            KeyType::Uuid => uuid(key).map(owned),
            KeyType::Numeric { scale } => numeric(key, *scale).map(owned),
            KeyType::Date => date(key).map(Cow::Borrowed),
        }
    }
}

fn integer(key: &str, min: i64, max: i64) -> Result<String, String> {
    let bad = || format!("key {key:?} is not an integer");
    let t = key.trim_matches(' ');
    let (negative, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let digits = digits.trim_start_matches('0');
    let text = match (negative, digits) {
        (_, "") => "0".to_string(),
        (true, d) => format!("-{d}"),
        (false, d) => d.to_string(),
    };
    match text.parse::<i64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(text),
        _ => Err(format!("key {key:?} is out of the key column's range")),
    }
}

fn uuid(key: &str) -> Result<String, String> {
    let bad = || format!("key {key:?} is not a uuid");
    let mut s = key.as_bytes();
    let braces = s.first() == Some(&b'{');
    if braces {
        s = &s[1..];
    }
    let mut hex = Vec::with_capacity(32);
    for i in 0..16 {
        match s {
            [a, b, rest @ ..] if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => {
                hex.push(a.to_ascii_lowercase());
                hex.push(b.to_ascii_lowercase());
                s = rest;
            }
            _ => return Err(bad()),
        }
        // PostgreSQL: an optional hyphen after every second byte (four digits), not at the end.
        if i % 2 == 1 && i < 15 && s.first() == Some(&b'-') {
            s = &s[1..];
        }
    }
    if braces {
        s = s.strip_prefix(b"}").ok_or_else(bad)?;
    }
    if !s.is_empty() {
        return Err(bad());
    }
    let h = String::from_utf8(hex).map_err(|_| bad())?;
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn numeric(key: &str, scale: Option<u32>) -> Result<String, String> {
    let bad = || format!("key {key:?} is not a number");
    let t = key.trim_matches(' ');
    let (negative, rest) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => {
            let e: i64 = rest[i + 1..].parse().map_err(|_| bad())?;
            if e.unsigned_abs() > 1000 {
                return Err(bad());
            }
            (&rest[..i], e)
        }
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    // All digits, and where the point is (counted from the left of `digits`).
    let digits: String = format!("{int}{frac}");
    let point = int.len() as i64 + exponent;
    let (mut int_part, mut frac_part) = if point <= 0 {
        (
            String::new(),
            format!("{}{digits}", "0".repeat((-point) as usize)),
        )
    } else if point as usize >= digits.len() {
        (
            format!("{digits}{}", "0".repeat(point as usize - digits.len())),
            String::new(),
        )
    } else {
        (
            digits[..point as usize].to_string(),
            digits[point as usize..].to_string(),
        )
    };
    int_part = int_part.trim_start_matches('0').to_string();
    frac_part = frac_part.trim_end_matches('0').to_string();
    if let Some(s) = scale
        && frac_part.len() > s as usize
    {
        return Err(format!(
            "key {key:?} has more decimals than the key column's scale ({s})"
        ));
    }
    if int_part.is_empty() {
        int_part.push('0');
    }
    let zero = int_part == "0" && frac_part.is_empty();
    let sign = if negative && !zero { "-" } else { "" };
    Ok(if frac_part.is_empty() {
        format!("{sign}{int_part}")
    } else {
        format!("{sign}{int_part}.{frac_part}")
    })
}

fn date(key: &str) -> Result<&str, String> {
    let b = key.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if shape {
        Ok(key)
    } else {
        Err(format!("key {key:?} is not a date as YYYY-MM-DD"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(t: &str, key: &str) -> Result<String, String> {
        KeyType::of(t).unwrap().canonical(key).map(Cow::into_owned)
    }

    #[test]
    fn integers_have_one_spelling() {
        for k in ["42", "042", "+42", " 42", "42 ", "0042"] {
            assert_eq!(canon("bigint", k).unwrap(), "42", "{k:?}");
        }
        for k in ["0", "-0", "+0", "000"] {
            assert_eq!(canon("integer", k).unwrap(), "0", "{k:?}");
        }
        assert_eq!(canon("integer", "-007").unwrap(), "-7");
        assert_eq!(canon("smallint", "32767").unwrap(), "32767");
        assert!(canon("smallint", "32768").is_err());
        assert!(canon("integer", "2147483648").is_err());
        assert_eq!(
            canon("bigint", "-9223372036854775808").unwrap(),
            "-9223372036854775808"
        );
        assert!(canon("bigint", "9223372036854775808").is_err());
        for k in ["", "-", "4 2", "1.0", "0x2A", "1_000", "abc", "--1", "+-1"] {
            assert!(canon("bigint", k).is_err(), "{k:?} accepted");
        }
    }

    #[test]
    fn uuids_have_one_spelling() {
        let want = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        for k in [
            want,
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
            "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
        ] {
            assert_eq!(canon("uuid", k).unwrap(), want, "{k:?}");
        }
        for k in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc9-99c0b-4ef8-bb6d-6bb9bd380a11",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
        ] {
            assert!(canon("uuid", k).is_err(), "{k:?} accepted");
        }
    }

    #[test]
    fn numbers_have_one_spelling() {
        for (k, want) in [
            ("1.5", "1.5"),
            ("1.50", "1.5"),
            ("01.5", "1.5"),
            ("+1.5", "1.5"),
            ("15e-1", "1.5"),
            (".5", "0.5"),
            ("5.", "5"),
            ("0.0", "0"),
            ("-0", "0"),
            ("-1.2300", "-1.23"),
            ("1e3", "1000"),
            ("1.5E2", "150"),
        ] {
            assert_eq!(canon("numeric", k).unwrap(), want, "{k:?}");
        }
        assert_eq!(canon("numeric(10,2)", "1.50").unwrap(), "1.5");
        assert!(canon("numeric(10,2)", "1.505").is_err());
        assert!(canon("numeric(10)", "1.5").is_err());
        for k in [
            "",
            ".",
            "1..2",
            "NaN",
            "Infinity",
            "1e",
            "1e9999",
            "abc",
            "1,5",
            // The smallest exponent: its absolute value overflows an i64 (found by fuzzing).
            "e-9223372036854775808",
            "1e-9223372036854775808",
            "1e9223372036854775807",
        ] {
            assert!(canon("numeric", k).is_err(), "{k:?} accepted");
        }
    }

    #[test]
    fn text_keys_are_as_given_and_char_keys_lose_their_padding() {
        assert_eq!(canon("text", " A b ").unwrap(), " A b ");
        assert_eq!(canon("character varying(20)", "042").unwrap(), "042");
        assert_eq!(canon("character(5)", "ab  ").unwrap(), "ab");
        assert_eq!(canon("character(5)", " ab").unwrap(), " ab");
    }

    #[test]
    fn dates_are_iso_only_and_other_types_are_refused() {
        assert_eq!(canon("date", "2026-11-29").unwrap(), "2026-11-29");
        for k in ["2026-1-29", "11/29/2026", "20261129", "2026-11-29 "] {
            assert!(canon("date", k).is_err(), "{k:?} accepted");
        }
        for t in [
            "citext",
            "boolean",
            "timestamp with time zone",
            "bytea",
            "jsonb",
        ] {
            assert!(KeyType::of(t).is_err(), "{t} accepted");
        }
    }
}
