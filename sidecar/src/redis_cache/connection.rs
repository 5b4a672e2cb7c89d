//! One connection type for the store's calls: a multiplexed connection to one server (plain or
//! found through Sentinel), or a Redis Cluster connection that routes each command by its key's
//! slot. Both are cheap to clone; commands and pipelines go through `ConnectionLike` either way.

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::collections::HashMap;

#[derive(Clone)]
pub enum Connection {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Connection {
    /// Indices `0..n` in groups that may share one pipeline: all of them on one server; by hash
    /// slot on a cluster, which refuses a pipeline whose keys live in different slots. Groups keep
    /// the order of their indices.
    pub fn pipeline_groups<'k>(&self, n: usize, key: impl Fn(usize) -> &'k str) -> Vec<Vec<usize>> {
        match self {
            Connection::Node(_) => vec![(0..n).collect()],
            Connection::Cluster(_) => by_slot(n, key),
        }
    }
}

/// Indices `0..n` grouped by the hash slot of `key(i)`, each group in index order.
pub fn by_slot<'k>(n: usize, key: impl Fn(usize) -> &'k str) -> Vec<Vec<usize>> {
    let mut at: HashMap<u16, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = vec![];
    for i in 0..n {
        let g = *at.entry(slot(key(i))).or_insert_with(|| {
            groups.push(vec![]);
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

/// The cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the text between the first
/// `{` and the next `}`, when not empty) or of the whole key, modulo 16384.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(bytes)) % 16_384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Node(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Node(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("wtc:{accounts:k1}"), slot("accounts:k1"));
        assert_eq!(slot("wtc:{accounts:k1}:lease"), slot("wtc:{accounts:k1}"));
        // An empty tag hashes the whole key (`CLUSTER KEYSLOT a{}b` is 13694, not 0).
        assert_eq!(slot("a{}b"), 13694);
        assert_eq!(slot(""), 0);
    }
}
