//! The epoch check: no connection serves an entry a Redis server brought back from before its
//! restart, or that a promoted replica holds from before its master's last acknowledged writes.
//!
//! Why: a Redis restarted from its persistence files (RDB or AOF) brings back entries and fill
//! leases from before the crash, while the writes acknowledged after its last save are gone from
//! it; a replica promoted after its master died lacks what the master acknowledged but had not
//! sent yet. Either way entries older than acknowledged versions would be served (breaking P2),
//! and a restored write intent could even let an older writer fill an empty slot. A restart gives
//! the server a new `run_id`, a promotion a new `master_replid` (also for a server demoted and
//! promoted again without a restart), so the check compares the pair (`epoch`) with the one
//! recorded when the cache was last made safe there, and when they differ deletes every
//! `wtc:{...}` key (entries and leases) of that server before recording the new pair. Other
//! sidecars do the same; deleting twice is harmless, and nobody records the pair before the sweep
//! is complete.
//!
//! One server: the record is `wtc:epoch`. A cluster: every master named by `CLUSTER SLOTS` is
//! checked (and only a changed one swept), its record kept on itself (`wtc:epoch:{tag}`, a tag
//! hashing into one of its slots), so that a dead master does not stop the check of the others
//! and a promoted replica carries its old master's record (a pair that is not its own). The
//! slots of a master that does not answer (dead, failing over), and slots no master serves, come
//! back as unchecked: the sidecar leaves them alone (their keys are read from the database)
//! until a later check passes them.

use super::connection::Connection;
use crate::core::EpochCounters;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{RedisError, RedisResult, Value};

/// The run id the cache was last made safe under (one server). Outside the `wtc:{` pattern of
/// entries and leases, so the sweep leaves it alone.
pub const EPOCH_KEY: &str = "wtc:epoch";
/// The same on each cluster master: this prefix, then `{tag}`.
pub const CLUSTER_EPOCH_PREFIX: &str = "wtc:epoch:";
const SWEEP_PATTERN: &str = "wtc:{*";
const SLOTS: u16 = 16_384;

/// Slot ranges (inclusive) the last check could not pass.
pub type Unchecked = Vec<(u16, u16)>;

pub async fn make_safe(conn: &mut Connection, counters: &EpochCounters) -> RedisResult<Unchecked> {
    match conn {
        Connection::Node(c) => make_node_safe(c, counters).await.map(|()| vec![]),
        Connection::Cluster(c) => make_cluster_safe(c, counters).await,
    }
}

async fn make_node_safe(
    conn: &mut MultiplexedConnection,
    counters: &EpochCounters,
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    ask(&mut pipe, EPOCH_KEY);
    let (server, replication, recorded): (String, String, Option<String>) =
        pipe.query_async(conn).await?;
    let epoch = epoch(&server, &replication)?;
    if recorded.as_deref() == Some(epoch.as_str()) {
        return Ok(());
    }
    let swept = sweep(Scope::Node(conn)).await?;
    redis::cmd("SET")
        .arg(EPOCH_KEY)
        .arg(&epoch)
        .query_async::<()>(conn)
        .await?;
    record(counters, recorded.is_some(), swept, "Redis");
    Ok(())
}

async fn make_cluster_safe(
    conn: &mut ClusterConnection,
    counters: &EpochCounters,
) -> RedisResult<Unchecked> {
    let map = slot_map(conn).await?;
    let mut unchecked = map.unserved.clone();
    for ((host, port), ranges) in map.masters {
        if check_master(conn, counters, &host, port, &ranges)
            .await
            .is_err()
        {
            unchecked.extend(ranges);
        }
    }
    Ok(unchecked)
}

/// One master: its run id against its record, swept when they differ. An error (it does not
/// answer, the sweep fails) leaves its slots unchecked.
async fn check_master(
    conn: &mut ClusterConnection,
    counters: &EpochCounters,
    host: &str,
    port: u16,
    ranges: &[(u16, u16)],
) -> RedisResult<()> {
    let key = epoch_key(ranges);
    let mut pipe = redis::pipe();
    ask(&mut pipe, &key);
    let replies = conn
        .route_pipeline(pipe, 0, 3, by_address(host, port))
        .await?;
    let (server, replication, recorded): (String, String, Option<String>) =
        redis::from_redis_value(Value::Array(replies))?;
    let epoch = epoch(&server, &replication)?;
    if recorded.as_deref() == Some(epoch.as_str()) {
        return Ok(());
    }
    let swept = sweep(Scope::ClusterNode(conn, host, port)).await?;
    let mut set = redis::cmd("SET");
    set.arg(&key).arg(&epoch);
    conn.route_command(set, at(host, port)).await?;
    record(
        counters,
        recorded.is_some(),
        swept,
        &format!("{host}:{port}"),
    );
    Ok(())
}

/// A key of one of `ranges`' slots for a master's epoch record: `wtc:epoch:{n}` for the first
/// `n` that hashes there (a few tries: a master serves thousands of slots).
fn epoch_key(ranges: &[(u16, u16)]) -> String {
    (0u32..)
        .map(|n| n.to_string())
        .find(|tag| {
            let slot = super::connection::slot(tag);
            ranges.iter().any(|&(a, b)| (a..=b).contains(&slot))
        })
        .map(|tag| format!("{CLUSTER_EPOCH_PREFIX}{{{tag}}}"))
        .expect("every range holds some slot")
}

fn record(counters: &EpochCounters, was_recorded: bool, swept: u64, server: &str) {
    counters.swept_keys.inc_by(swept);
    // A first start (no record yet, nothing swept) is not a restart worth a warning.
    if was_recorded || swept > 0 {
        counters.changes.inc();
        tracing::warn!(
            swept,
            server,
            "a new Redis process serves here (restart or failover): deleted every cached entry \
             and lease it may hold from before"
        );
    }
}

/// A master's address (host, port) and its slot ranges.
type Master = ((String, u16), Vec<(u16, u16)>);

/// Who serves which slots, as `CLUSTER SLOTS` says.
struct SlotMap {
    masters: Vec<Master>,
    /// Ranges no master serves.
    unserved: Vec<(u16, u16)>,
}

async fn slot_map(conn: &mut ClusterConnection) -> RedisResult<SlotMap> {
    // Asked of a random node: a dead one fails the call, so ask up to three.
    let mut slots: RedisResult<Vec<Value>> = Err(unexpected("CLUSTER SLOTS"));
    for _ in 0..3 {
        slots = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await;
        if slots.is_ok() {
            break;
        }
    }
    let slots = slots?;
    let mut masters: Vec<Master> = vec![];
    for range in slots {
        let Value::Array(parts) = range else {
            return Err(unexpected("CLUSTER SLOTS entry"));
        };
        let (start, end): (u16, u16) = match (parts.first(), parts.get(1)) {
            (Some(a), Some(b)) => (
                redis::from_redis_value(a.clone())?,
                redis::from_redis_value(b.clone())?,
            ),
            _ => return Err(unexpected("CLUSTER SLOTS range")),
        };
        let Some(Value::Array(node)) = parts.get(2) else {
            return Err(unexpected("CLUSTER SLOTS master"));
        };
        let host: String = redis::from_redis_value(node.first().cloned().unwrap_or(Value::Nil))?;
        let port: u16 = redis::from_redis_value(node.get(1).cloned().unwrap_or(Value::Nil))?;
        if start > end || end >= SLOTS {
            return Err(unexpected("CLUSTER SLOTS range"));
        }
        match masters.iter_mut().find(|(m, _)| *m == (host.clone(), port)) {
            Some((_, ranges)) => ranges.push((start, end)),
            None => masters.push(((host, port), vec![(start, end)])),
        }
    }
    let mut served: Vec<(u16, u16)> = masters.iter().flat_map(|(_, r)| r.clone()).collect();
    served.sort_unstable();
    let mut unserved = vec![];
    let mut next = 0u16;
    for (start, end) in served {
        if start > next {
            unserved.push((next, start - 1));
        }
        next = next.max(end.saturating_add(1));
    }
    if next < SLOTS {
        unserved.push((next, SLOTS - 1));
    }
    Ok(SlotMap { masters, unserved })
}

fn unexpected(what: &'static str) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Client,
        "unexpected reply",
        what.to_string(),
    ))
}

/// What a sweep deletes from: one server, or one node of a cluster (by address).
enum Scope<'c> {
    Node(&'c mut MultiplexedConnection),
    ClusterNode(&'c mut ClusterConnection, &'c str, u16),
}

/// Deletes every entry and lease of `scope` (`SCAN` + `UNLINK`, a batch per round trip; on a
/// cluster `UNLINK` is split by slot). Keys restored from persistence exist for the whole scan,
/// so `SCAN` returns each of them at least once.
async fn sweep(mut scope: Scope<'_>) -> RedisResult<u64> {
    let mut cursor: u64 = 0;
    let mut swept = 0;
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(SWEEP_PATTERN)
            .arg("COUNT")
            .arg(1000);
        let (next, keys): (u64, Vec<String>) = match &mut scope {
            Scope::Node(c) => scan.query_async(*c).await?,
            Scope::ClusterNode(c, host, port) => {
                redis::from_redis_value(c.route_command(scan, at(host, *port)).await?)?
            }
        };
        if !keys.is_empty() {
            swept += match &mut scope {
                Scope::Node(c) => {
                    redis::cmd("UNLINK")
                        .arg(&keys)
                        .query_async::<u64>(*c)
                        .await?
                }
                // To the node scanned, not wherever the client's slot map says (it may lag
                // behind a failover); one UNLINK per slot, as a cluster node wants.
                Scope::ClusterNode(c, host, port) => {
                    let groups = super::connection::by_slot(keys.len(), |i| keys[i].as_str());
                    let mut pipe = redis::pipe();
                    for group in &groups {
                        let unlink = pipe.cmd("UNLINK");
                        for &i in group {
                            unlink.arg(&keys[i]);
                        }
                    }
                    let replies = c
                        .route_pipeline(pipe, 0, groups.len(), by_address(host, *port))
                        .await?;
                    let counts: Vec<u64> = redis::from_redis_value(Value::Array(replies))?;
                    counts.iter().sum()
                }
            };
        }
        if next == 0 {
            return Ok(swept);
        }
        cursor = next;
    }
}

fn at(host: &str, port: u16) -> RoutingInfo {
    RoutingInfo::SingleNode(by_address(host, port))
}

fn by_address(host: &str, port: u16) -> SingleNodeRoutingInfo {
    SingleNodeRoutingInfo::ByAddress {
        host: host.to_string(),
        port,
    }
}

/// Deletes every entry and lease (the repair queue's sweep after an overflow).
pub async fn sweep_all(conn: &mut Connection) -> RedisResult<u64> {
    match conn {
        Connection::Node(c) => sweep(Scope::Node(c)).await,
        Connection::Cluster(c) => {
            let mut swept = 0;
            for ((host, port), _) in slot_map(c).await?.masters {
                swept += sweep(Scope::ClusterNode(c, &host, port)).await?;
            }
            Ok(swept)
        }
    }
}

/// Asks for what `epoch` needs, and the record at `key`.
fn ask(pipe: &mut redis::Pipeline, key: &str) {
    pipe.cmd("INFO")
        .arg("server")
        .cmd("INFO")
        .arg("replication")
        .cmd("GET")
        .arg(key);
}

/// What the record holds: `run_id` (a new process) and `master_replid` (a new replication
/// history: it changes whenever a server is promoted, also one demoted earlier and promoted
/// again without a restart, which keeps its run id and may still hold its own old record).
fn epoch(server: &str, replication: &str) -> RedisResult<String> {
    let field = |info: &str, name: &'static str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .ok_or_else(|| RedisError::from((redis::ErrorKind::Client, "INFO lacks", name.into())))
    };
    Ok(format!(
        "{}:{}",
        field(server, "run_id:")?,
        field(replication, "master_replid:")?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_is_the_run_id_and_the_replication_id() {
        let server =
            "# Server\r\nredis_version:7.0.15\r\nrun_id:4f1c0c0e8c5a1d2b\r\ntcp_port:6379\r\n";
        let replication =
            "# Replication\r\nrole:master\r\nmaster_replid:9a8b\r\nmaster_replid2:0000\r\n";
        assert_eq!(epoch(server, replication).unwrap(), "4f1c0c0e8c5a1d2b:9a8b");
        assert!(epoch("# Server\r\nredis_version:7\r\n", replication).is_err());
        assert!(epoch(server, "# Replication\r\nrole:master\r\n").is_err());
    }
}
