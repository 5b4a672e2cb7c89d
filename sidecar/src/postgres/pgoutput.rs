//! PostgreSQL's logical replication messages (plugin `pgoutput`, protocol version 1), one per
//! row of `pg_logical_slot_peek_binary_changes`. Pure: bytes in, messages out, every length
//! checked (a message that does not parse is an error, never a panic).
//!
//! Layout (PostgreSQL's "Logical Replication Message Formats"): a type byte, then big-endian
//! integers and NUL-terminated strings; a row is `i16` columns, each `n` (null), `u` (an
//! unchanged TOASTed value, not sent) or `t` + `i32` length + its text form. Origin, Type and
//! logical decoding messages carry nothing the cache needs and are told apart only by type.

/// One decoded message. Column values borrow the message's bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Message<'a> {
    /// A transaction starts; `commit_time_us` is its commit time in microseconds since
    /// 2000-01-01 00:00 UTC (PostgreSQL's epoch).
    Begin {
        final_lsn: u64,
        commit_time_us: i64,
        xid: u32,
    },
    /// A transaction ends; `end_lsn` is where the next one starts.
    Commit {
        end_lsn: u64,
        commit_time_us: i64,
    },
    /// A table's columns, sent before its first change in each decoding call.
    Relation(Relation),
    Insert {
        relation: u32,
        new: Tuple<'a>,
    },
    /// `old`: the key columns (`K`) when the key changed, or the whole row (`O`) under
    /// `REPLICA IDENTITY FULL`; none otherwise.
    Update {
        relation: u32,
        old: Option<Tuple<'a>>,
        new: Tuple<'a>,
    },
    /// `old`: the key columns, or the whole row under `REPLICA IDENTITY FULL`.
    Delete {
        relation: u32,
        old: Tuple<'a>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Origin (`O`), Type (`Y`), logical decoding message (`M`).
    Other(u8),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<String>,
}

/// A row: one value per column of its relation, in the relation's order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuple<'a>(pub Vec<Value<'a>>);

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Null,
    /// A TOASTed value the change did not touch: not sent.
    Unchanged,
    /// The value's text form.
    Text(&'a [u8]),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message ends early (at byte {0})")]
    Short(usize),
    #[error("pgoutput message of unknown type {0:#04x}")]
    UnknownType(u8),
    #[error("pgoutput {what} marker {found:#04x} is not one of {expected}")]
    Marker {
        what: &'static str,
        found: u8,
        expected: &'static str,
    },
    #[error("pgoutput message has a negative {0}")]
    Negative(&'static str),
    #[error("pgoutput name is not UTF-8")]
    Name,
    #[error("pgoutput message has {0} bytes past its end")]
    Trailing(usize),
    #[error("an empty pgoutput message")]
    Empty,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(DecodeError::Short(self.bytes.len()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.bytes[self.at..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Short(self.bytes.len()))?;
        let s = std::str::from_utf8(&rest[..len]).map_err(|_| DecodeError::Name)?;
        self.at += len + 1;
        Ok(s.to_string())
    }

    fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        usize::try_from(self.i16()?).map_err(|_| DecodeError::Negative(what))
    }

    fn tuple(&mut self) -> Result<Tuple<'a>, DecodeError> {
        let n = self.count("column count")?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = usize::try_from(self.i32()?)
                        .map_err(|_| DecodeError::Negative("value length"))?;
                    Value::Text(self.take(len)?)
                }
                found => {
                    return Err(DecodeError::Marker {
                        what: "column value",
                        found,
                        expected: "n, u, t",
                    });
                }
            });
        }
        Ok(Tuple(values))
    }

    fn marker(&mut self, what: &'static str, expected: &'static str) -> Result<u8, DecodeError> {
        let found = self.u8()?;
        if expected.as_bytes().contains(&found) && found != b',' && found != b' ' {
            Ok(found)
        } else {
            Err(DecodeError::Marker {
                what,
                found,
                expected,
            })
        }
    }
}

/// Decodes one message (one row's `data`).
pub fn decode(bytes: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    let kind = *bytes.first().ok_or(DecodeError::Empty)?;
    r.at = 1;
    let message = match kind {
        b'B' => {
            let final_lsn = r.u64()?;
            let commit_time_us = r.i64()?;
            let xid = r.u32()?;
            Message::Begin {
                final_lsn,
                commit_time_us,
                xid,
            }
        }
        b'C' => {
            let _flags = r.u8()?;
            let _commit_lsn = r.u64()?;
            let end_lsn = r.u64()?;
            let commit_time_us = r.i64()?;
            Message::Commit {
                end_lsn,
                commit_time_us,
            }
        }
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let _replica_identity = r.u8()?;
            let n = r.count("column count")?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let _flags = r.u8()?;
                columns.push(r.cstr()?);
                let _type_oid = r.u32()?;
                let _type_modifier = r.i32()?;
            }
            Message::Relation(Relation {
                id,
                namespace,
                name,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            r.marker("new row", "N")?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let old = match r.marker("update row", "K, O, N")? {
                b'N' => None,
                _ => {
                    let old = r.tuple()?;
                    r.marker("new row", "N")?;
                    Some(old)
                }
            };
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            r.marker("old row", "K, O")?;
            Message::Delete {
                relation,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let _options = r.u8()?;
            // Each relation id takes 4 bytes: a count the message cannot hold is refused
            // before anything is allocated for it.
            if n > (bytes.len() - r.at) / 4 {
                return Err(DecodeError::Short(bytes.len()));
            }
            let mut relations = Vec::with_capacity(n);
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        b'O' | b'Y' | b'M' => return Ok(Message::Other(kind)),
        other => return Err(DecodeError::UnknownType(other)),
    };
    if r.at != bytes.len() {
        return Err(DecodeError::Trailing(bytes.len() - r.at));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Messages as PostgreSQL 15 sent them (table t(id text, version bigint, data jsonb)).
    const BEGIN: &str = "42 000000000192c618 0003047b4e1af652 000002d9";
    const RELATION: &str = "52 00004001 7075626c696300 7400 64 0003 \
        01 696400 00000019 ffffffff 00 76657273696f6e00 00000014 ffffffff 00 6461746100 00000eda ffffffff";
    const INSERT: &str =
        "49 00004001 4e 0003 74 00000001 61 74 00000001 31 74 00000008 7b2278223a20317d";
    const DELETE_KEY: &str = "44 00004001 4b 0003 74 00000001 62 6e 6e";
    const TRUNCATE: &str = "54 00000001 00 00004001";
    const COMMIT: &str = "43 00 000000000192c618 000000000192c648 0003047b4e1af652";

    #[test]
    fn messages_postgres_sent_decode() {
        assert_eq!(
            decode(&hex(BEGIN)).unwrap(),
            Message::Begin {
                final_lsn: 0x192c618,
                commit_time_us: 0x0003_047b_4e1a_f652,
                xid: 0x2d9,
            }
        );
        assert_eq!(
            decode(&hex(RELATION)).unwrap(),
            Message::Relation(Relation {
                id: 0x4001,
                namespace: "public".into(),
                name: "t".into(),
                columns: vec!["id".into(), "version".into(), "data".into()],
            })
        );
        let insert = hex(INSERT);
        assert_eq!(
            decode(&insert).unwrap(),
            Message::Insert {
                relation: 0x4001,
                new: Tuple(vec![
                    Value::Text(b"a"),
                    Value::Text(b"1"),
                    Value::Text(br#"{"x": 1}"#)
                ]),
            }
        );
        let delete = hex(DELETE_KEY);
        assert_eq!(
            decode(&delete).unwrap(),
            Message::Delete {
                relation: 0x4001,
                old: Tuple(vec![Value::Text(b"b"), Value::Null, Value::Null]),
            }
        );
        assert_eq!(
            decode(&hex(TRUNCATE)).unwrap(),
            Message::Truncate {
                relations: vec![0x4001]
            }
        );
        assert_eq!(
            decode(&hex(COMMIT)).unwrap(),
            Message::Commit {
                end_lsn: 0x192c648,
                commit_time_us: 0x0003_047b_4e1a_f652
            }
        );
    }

    #[test]
    fn updates_with_and_without_the_old_row() {
        let plain = hex("55 00004001 4e 0001 74 00000001 61");
        assert_eq!(
            decode(&plain).unwrap(),
            Message::Update {
                relation: 0x4001,
                old: None,
                new: Tuple(vec![Value::Text(b"a")]),
            }
        );
        let keyed = hex("55 00004001 4b 0001 74 00000001 61 4e 0001 75");
        assert_eq!(
            decode(&keyed).unwrap(),
            Message::Update {
                relation: 0x4001,
                old: Some(Tuple(vec![Value::Text(b"a")])),
                new: Tuple(vec![Value::Unchanged]),
            }
        );
    }

    #[test]
    fn every_cut_of_a_message_is_an_error_not_a_panic() {
        for m in [BEGIN, RELATION, INSERT, DELETE_KEY, TRUNCATE, COMMIT] {
            let bytes = hex(m);
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_err(), "{m} cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode(&longer).is_err(), "{m} with a byte more");
        }
    }

    #[test]
    fn bad_counts_and_markers_are_refused() {
        // A value length of -1, a column count of -1, a marker that is no marker.
        assert_eq!(
            decode(&hex("49 00004001 4e 0001 74 ffffffff")),
            Err(DecodeError::Negative("value length"))
        );
        assert_eq!(
            decode(&hex("49 00004001 4e ffff")),
            Err(DecodeError::Negative("column count"))
        );
        assert!(matches!(
            decode(&hex("44 00004001 4e 0000")),
            Err(DecodeError::Marker { found: b'N', .. })
        ));
        // A truncate naming more relations than its bytes hold.
        assert_eq!(
            decode(&hex("54 ffffffff 00 00004001")),
            Err(DecodeError::Short(10))
        );
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownType(b'Z')));
        assert_eq!(decode(b"Oanything"), Ok(Message::Other(b'O')));
    }
}
