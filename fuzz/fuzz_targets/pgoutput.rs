//! The commit stream's input (`sidecar/src/postgres/pgoutput.rs`, `commit_stream.rs`): whatever
//! the bytes of a message, reading it never panics; a change the bytes describe names a key of
//! the cached table only with that table's Relation before it, and its key and version are the
//! message's own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wtc_sidecar::core::external::CommittedChange;
use wtc_sidecar::postgres::commit_stream::changes;

/// Relation 1 is the cached table `t(id, version)`, sent first as PostgreSQL does.
const RELATION: &[u8] = b"R\0\0\0\x01public\0t\0d\0\x02\x01id\0\0\0\0\x19\xff\xff\xff\xff\0version\0\0\0\0\x14\xff\xff\xff\xff";

fuzz_target!(|input: &[u8]| {
    let entities = [wtc_config::Entity {
        name: "t".into(),
        table: "t".into(),
        key_column: "id".into(),
        version_column: "version".into(),
        ttl_seconds: 60,
        versions: Default::default(),
    }];
    // Alone: no Relation came, so no change can name a cached key.
    if let Ok(read) = changes(&[input.to_vec()], &entities) {
        assert!(read.changes.is_empty(), "{:?}", read.changes);
    }
    // After the Relation; the input may also be several messages cut at 0xff 0xfe.
    let mut messages = vec![RELATION.to_vec()];
    messages.extend(input.split(|&b| b == 0xfe).map(<[u8]>::to_vec));
    if let Ok(read) = changes(&messages, &entities) {
        for c in &read.changes {
            if let CommittedChange::Row { key, .. } = c {
                let needle = key.as_bytes();
                assert!(
                    needle.is_empty() || input.windows(needle.len()).any(|w| w == needle),
                    "key {key:?} is not in the input"
                );
            }
        }
    }
});
