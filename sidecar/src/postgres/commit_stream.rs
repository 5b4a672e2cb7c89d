//! The commit stream's PostgreSQL side: a logical replication slot (plugin `pgoutput`) and a
//! publication of the entities' tables, read over an ordinary connection with
//! `pg_logical_slot_peek_binary_changes` (docs/commit-stream.md).
//!
//! One poll: `upto` = `pg_current_wal_flush_lsn()` first, then the slot's transactions committed
//! up to it, then (after the caller applied them) the slot advanced to `upto`. Taking `upto`
//! before the peek matters: advancing to a position read after it would skip a transaction that
//! committed in between. And it must be the *flushed* position, the end of what a peek decodes:
//! the write position may be past a commit record not flushed yet (`synchronous_commit = off`,
//! or a flush under way), which the peek does not return and the advance would skip. Advancing even when nothing of ours changed keeps every peek short
//! (a peek decodes all WAL from the slot's restart point). The slot's position reaches disk at
//! checkpoints only, so after a crash PostgreSQL sends changes again: applying them is
//! idempotent (`core::external`).
//!
//! One connection holds a session advisory lock on the slot's name while it polls, so that of
//! all the sidecars sharing the slot one reads it at a time; the others wait for the lock.

use super::pgoutput::{self, DecodeError, Message, Tuple, Value};
use super::table::{lock_key, quote_ident};
use crate::core::external::CommittedChange;
use crate::core::{EntityId, Version};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection, Row};
use std::collections::HashMap;
use wtc_config::{CommitStreamConfig, Entity};

/// Most messages one poll takes: a poll stops at the first commit after this many, and the
/// next one goes on from there (a transaction always comes whole, however large).
pub const POLL_MAX_CHANGES: i32 = 10_000;

/// The slot's connection: a peek decodes every WAL byte since the slot's restart point (a big
/// migration, a backlog), and creating the slot waits for the transactions running then, so
/// the pool's statement timeout would make them fail forever; and the server closes it (and
/// releases the lock) when this machine stops answering, so that another sidecar takes over.
const SLOT_SESSION: [(&str, &str); 4] = [
    ("statement_timeout", "600000"),
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
];

/// A connection to the slot.
pub struct Slot {
    conn: PgConnection,
    slot: String,
    publication: String,
}

/// What one poll read.
pub struct Poll {
    /// Where to advance the slot once the changes are applied.
    pub upto: String,
    /// The messages, in commit order.
    pub messages: Vec<Vec<u8>>,
    /// Whether the poll stopped at `POLL_MAX_CHANGES` (more is waiting).
    pub more: bool,
}

impl Slot {
    /// Connects, checks that every table's changes name their key, creates the publication (or
    /// adds the tables it lacks) and the slot when missing. `true` with a slot made now: what
    /// was committed before it is not in the stream (a first start, a database failover, a slot
    /// dropped), so the caller sweeps the cache.
    pub async fn open(
        options: &PgConnectOptions,
        config: &CommitStreamConfig,
        entities: &[Entity],
    ) -> Result<(Slot, bool), sqlx::Error> {
        let options = options.clone().options(SLOT_SESSION);
        let mut conn = PgConnection::connect_with(&options).await?;
        for e in entities {
            check_replica_identity(&mut conn, e).await?;
        }
        let q_publication = quote_ident(&config.publication);
        let published: Option<Vec<String>> = sqlx::query_scalar(
            "SELECT array(SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) \
             FROM pg_publication_tables WHERE pubname = $1) \
             FROM pg_publication WHERE pubname = $1",
        )
        .bind(&config.publication)
        .fetch_optional(&mut conn)
        .await?;
        let mut tables: Vec<String> = entities.iter().map(|e| quote_ident(&e.table)).collect();
        tables.sort();
        tables.dedup();
        match published {
            None => {
                // A partitioned table's changes under its own name, not its partitions'.
                let sql = format!(
                    "CREATE PUBLICATION {q_publication} FOR TABLE {} \
                     WITH (publish_via_partition_root = true)",
                    tables.join(", ")
                );
                sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await?;
            }
            Some(published) => {
                for t in &tables {
                    // The same regclass, whatever the schema's spelling.
                    let present: bool = sqlx::query_scalar(
                        "SELECT to_regclass($1) = ANY (SELECT to_regclass(p) FROM unnest($2::text[]) p)",
                    )
                    .bind(t)
                    .bind(&published)
                    .fetch_one(&mut conn)
                    .await?;
                    if !present {
                        let sql = format!("ALTER PUBLICATION {q_publication} ADD TABLE {t}");
                        sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await?;
                    }
                }
            }
        }
        let plugin: Option<Option<String>> = sqlx::query_scalar(
            "SELECT plugin::text FROM pg_replication_slots \
             WHERE slot_name = $1 AND database = current_database()",
        )
        .bind(&config.slot)
        .fetch_optional(&mut conn)
        .await?;
        let created = plugin.is_none();
        match plugin {
            None => {
                sqlx::query("SELECT pg_create_logical_replication_slot($1::name, 'pgoutput')")
                    .bind(&config.slot)
                    .execute(&mut conn)
                    .await?;
            }
            Some(Some(p)) if p == "pgoutput" => {}
            Some(other) => {
                return Err(sqlx::Error::Protocol(format!(
                    "replication slot {:?} uses plugin {:?}, not pgoutput",
                    config.slot,
                    other.unwrap_or_default()
                )));
            }
        }
        let slot = Slot {
            conn,
            slot: config.slot.clone(),
            publication: config.publication.clone(),
        };
        Ok((slot, created))
    }

    /// Until every transaction of `xids` is visible to new snapshots. Its commit record is
    /// decodable once flushed, a moment (a synchronous standby's round trip) before others see
    /// it: an eviction then would let a reader fill the row as it was before.
    pub async fn wait_visible(&mut self, xids: &[u32]) -> Result<(), sqlx::Error> {
        if xids.is_empty() {
            return Ok(());
        }
        let xids: Vec<i64> = xids.iter().map(|&x| i64::from(x)).collect();
        loop {
            let running: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot()) x \
                 WHERE (x::text::int8 % 4294967296) = ANY ($1::int8[])",
            )
            .bind(&xids)
            .fetch_one(&mut self.conn)
            .await?;
            if running == 0 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Takes the slot's lock without waiting: whether this connection now reads the slot.
    pub async fn try_lead(&mut self) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(lock_key("wtc-commit-stream", &self.slot))
            .fetch_one(&mut self.conn)
            .await
    }

    /// The transactions committed since the slot's position, up to now.
    pub async fn poll(&mut self) -> Result<Poll, sqlx::Error> {
        let rows = sqlx::query(
            "WITH x AS MATERIALIZED (SELECT pg_current_wal_flush_lsn() AS upto) \
             SELECT x.upto::text AS upto, c.lsn::text AS lsn, c.data FROM x LEFT JOIN LATERAL \
             pg_logical_slot_peek_binary_changes($1::name, x.upto, $3, \
             'proto_version', '1', 'publication_names', quote_ident($2)) c ON true",
        )
        .bind(&self.slot)
        .bind(&self.publication)
        .bind(POLL_MAX_CHANGES)
        .fetch_all(&mut self.conn)
        .await?;
        let mut upto = String::new();
        let mut last_lsn = None;
        let mut messages = Vec::with_capacity(rows.len());
        for row in rows {
            upto = row.try_get("upto")?;
            if let Some(data) = row.try_get::<Option<Vec<u8>>, _>("data")? {
                last_lsn = row.try_get::<Option<String>, _>("lsn")?;
                messages.push(data);
            }
        }
        let more = messages.len() >= POLL_MAX_CHANGES as usize;
        if more {
            // Stopped at a commit before `upto`: advance only past what was read.
            upto = last_lsn.unwrap_or(upto);
        }
        Ok(Poll {
            upto,
            messages,
            more,
        })
    }

    /// Confirms everything up to `lsn` (applied): PostgreSQL may drop the WAL before it.
    pub async fn advance(&mut self, lsn: &str) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_replication_slot_advance($1::name, $2::pg_lsn)")
            .bind(&self.slot)
            .bind(lsn)
            .execute(&mut self.conn)
            .await
            .map(drop)
    }

    /// WAL the slot keeps on the server, in bytes.
    pub async fn retained_wal(&mut self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&mut self.conn)
        .await
        .map(Option::unwrap_or_default)
    }
}

/// What `drop_stream` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The slot existed in this database and was dropped.
    pub slot: bool,
    /// The publication existed and was dropped.
    pub publication: bool,
}

/// Drops `slot` (this database's, never another's of the same name) and `publication`: what is
/// left of a commit stream turned off (the operator's drop Job). Takes the slot's lock first,
/// so that no reader is between two polls, and waits up to `wait` for one that still holds it
/// or for the slot to be released; idempotent (nothing there is not an error).
pub async fn drop_stream(
    options: &PgConnectOptions,
    slot: &str,
    publication: Option<&str>,
    wait: std::time::Duration,
) -> Result<Dropped, sqlx::Error> {
    let deadline = tokio::time::Instant::now() + wait;
    let busy = |what: &str| {
        sqlx::Error::Protocol(format!(
            "replication slot {slot:?} {what} after {} s: is a reader still running?",
            wait.as_secs()
        ))
    };
    let mut conn = PgConnection::connect_with(&options.clone().options(SLOT_SESSION)).await?;
    loop {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(lock_key("wtc-commit-stream", slot))
            .fetch_one(&mut conn)
            .await?;
        if locked {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(busy("is still locked by its reader"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let mut dropped = Dropped {
        slot: false,
        publication: false,
    };
    loop {
        let found: Option<(bool, bool)> = sqlx::query_as(
            "SELECT active, database IS NOT DISTINCT FROM current_database() \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot)
        .fetch_optional(&mut conn)
        .await?;
        match found {
            None => break,
            Some((_, false)) => {
                return Err(sqlx::Error::Protocol(format!(
                    "replication slot {slot:?} is not a slot of this database: left alone"
                )));
            }
            Some((false, true)) => {
                let result = sqlx::query("SELECT pg_drop_replication_slot($1::name)")
                    .bind(slot)
                    .execute(&mut conn)
                    .await;
                match result {
                    Ok(_) => {
                        dropped.slot = true;
                        break;
                    }
                    // Taken by a poll in between (object_in_use): again.
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55006") => {}
                    // Dropped by someone else in between (undefined_object).
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42704") => break,
                    Err(e) => return Err(e),
                }
            }
            Some((true, true)) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(busy("is still in use"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    if let Some(publication) = publication {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
                .bind(publication)
                .fetch_one(&mut conn)
                .await?;
        if exists {
            let sql = format!("DROP PUBLICATION IF EXISTS {}", quote_ident(publication));
            sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await?;
            dropped.publication = true;
        }
    }
    conn.close().await?;
    Ok(dropped)
}

/// Refuses a table whose deletes and key changes would not name the key: its replica identity
/// must be the key column (its primary key or `REPLICA IDENTITY USING INDEX` on it) or
/// `FULL`. A table with no identity at all would even refuse every writer's UPDATE and DELETE
/// once published.
async fn check_replica_identity(conn: &mut PgConnection, e: &Entity) -> Result<(), sqlx::Error> {
    let ok: Option<bool> = sqlx::query_scalar(
        "SELECT c.relreplident = 'f' OR EXISTS (SELECT 1 FROM pg_index i \
           WHERE i.indrelid = c.oid AND i.indnkeyatts = 1 \
           AND i.indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = c.oid AND attname = $2) \
           AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))) \
         FROM pg_class c WHERE c.oid = to_regclass($1)",
    )
    .bind(quote_ident(&e.table))
    .bind(&e.key_column)
    .fetch_optional(&mut *conn)
    .await?
    .flatten();
    match ok {
        Some(true) => Ok(()),
        None => Err(sqlx::Error::Protocol(format!(
            "table {:?} (entity {:?}) does not exist",
            e.table, e.name
        ))),
        Some(false) => Err(sqlx::Error::Protocol(format!(
            "table {:?} (entity {:?}): its changes would not name the key column {:?}; make it \
             the primary key, or run ALTER TABLE {} REPLICA IDENTITY FULL, before turning the \
             commit stream on",
            e.table,
            e.name,
            e.key_column,
            quote_ident(&e.table)
        ))),
    }
}

/// What a poll's messages mean for the cache.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub changes: Vec<CommittedChange>,
    /// Commit times (µs since 2000-01-01 UTC) of the transactions read, in order.
    pub commits_us: Vec<i64>,
    /// Their transaction ids.
    pub xids: Vec<u32>,
    /// Changes of published tables no entity names (a sidecar of an older configuration reads
    /// the slot): skipped.
    pub unknown: u64,
    /// Changes of a cached table from which no key could be read (a TOASTed key that did not
    /// change, a key that is not UTF-8).
    pub unusable: u64,
}

/// A table's columns the cache needs: the key and the version.
struct Columns {
    entity: EntityId,
    key: usize,
    version: Option<usize>,
}

/// Reads the changes to the entities' tables out of one poll's messages (each poll sends the
/// tables' Relation messages again before their first change).
pub fn changes(messages: &[Vec<u8>], entities: &[Entity]) -> Result<Changes, DecodeError> {
    let mut out = Changes::default();
    let mut relations: HashMap<u32, Vec<Columns>> = HashMap::new();
    for bytes in messages {
        match pgoutput::decode(bytes)? {
            Message::Relation(r) => {
                let position = |name: &str| r.columns.iter().position(|c| c == name);
                let columns = entities
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.table == r.name)
                    .filter_map(|(i, e)| {
                        Some(Columns {
                            entity: EntityId::new(i),
                            key: position(&e.key_column)?,
                            version: position(&e.version_column),
                        })
                    })
                    .collect();
                relations.insert(r.id, columns);
            }
            Message::Commit { commit_time_us, .. } => out.commits_us.push(commit_time_us),
            Message::Begin { xid, .. } => out.xids.push(xid),
            Message::Insert { relation, new } => {
                row_changes(&mut out, relations.get(&relation), &new, false);
            }
            Message::Update { relation, old, new } => {
                let columns = relations.get(&relation);
                if let Some(old) = old {
                    // The key changed (or the whole old row came): the old key's entry goes.
                    for c in columns.into_iter().flatten() {
                        if key_of(&old, c) != key_of(&new, c) {
                            push(&mut out, c, key_of(&old, c), None, true);
                        }
                    }
                }
                row_changes(&mut out, columns, &new, false);
            }
            Message::Delete { relation, old } => {
                row_changes(&mut out, relations.get(&relation), &old, true);
            }
            Message::Truncate { relations: ids } => {
                for id in ids {
                    for c in relations.get(&id).into_iter().flatten() {
                        out.changes
                            .push(CommittedChange::Truncated { entity: c.entity });
                    }
                }
            }
            Message::Other(_) => {}
        }
    }
    Ok(out)
}

fn key_of<'a>(row: &Tuple<'a>, c: &Columns) -> Option<&'a str> {
    match row.0.get(c.key)? {
        Value::Text(t) => std::str::from_utf8(t).ok(),
        Value::Null | Value::Unchanged => None,
    }
}

fn version_of(row: &Tuple<'_>, c: &Columns) -> Option<Version> {
    match row.0.get(c.version?)? {
        Value::Text(t) => std::str::from_utf8(t).ok()?.parse().ok().map(Version::new),
        Value::Null | Value::Unchanged => None,
    }
}

fn row_changes(out: &mut Changes, columns: Option<&Vec<Columns>>, row: &Tuple<'_>, deleted: bool) {
    if columns.is_none_or(Vec::is_empty) {
        out.unknown += 1;
    }
    for c in columns.into_iter().flatten() {
        push(out, c, key_of(row, c), version_of(row, c), deleted);
    }
}

fn push(
    out: &mut Changes,
    c: &Columns,
    key: Option<&str>,
    version: Option<Version>,
    deleted: bool,
) {
    match key {
        Some(key) => out.changes.push(CommittedChange::Row {
            entity: c.entity,
            key: key.to_string(),
            version,
            deleted,
        }),
        None => out.unusable += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(name: &str, table: &str) -> Entity {
        Entity {
            name: name.into(),
            table: table.into(),
            key_column: "id".into(),
            version_column: "version".into(),
            ttl_seconds: 60,
            versions: Default::default(),
        }
    }

    fn relation(id: u32, name: &str, columns: &[&str]) -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(id.to_be_bytes());
        b.extend(b"public\0");
        b.extend(name.as_bytes());
        b.push(0);
        b.push(b'd');
        b.extend((columns.len() as i16).to_be_bytes());
        for c in columns {
            b.push(0);
            b.extend(c.as_bytes());
            b.push(0);
            b.extend(25u32.to_be_bytes());
            b.extend((-1i32).to_be_bytes());
        }
        b
    }

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                Some(t) => {
                    b.push(b't');
                    b.extend((t.len() as i32).to_be_bytes());
                    b.extend(t.as_bytes());
                }
                None => b.push(b'n'),
            }
        }
        b
    }

    fn change(kind: u8, id: u32, parts: &[(u8, &[Option<&str>])]) -> Vec<u8> {
        let mut b = vec![kind];
        b.extend(id.to_be_bytes());
        for (marker, values) in parts {
            b.push(*marker);
            b.extend(tuple(values));
        }
        b
    }

    fn commit(time_us: i64) -> Vec<u8> {
        let mut b = vec![b'C', 0];
        b.extend(1u64.to_be_bytes());
        b.extend(2u64.to_be_bytes());
        b.extend(time_us.to_be_bytes());
        b
    }

    fn row(entity: usize, key: &str, version: Option<i64>, deleted: bool) -> CommittedChange {
        CommittedChange::Row {
            entity: EntityId::new(entity),
            key: key.into(),
            version: version.map(Version::new),
            deleted,
        }
    }

    #[test]
    fn inserts_updates_deletes_and_truncates_of_cached_tables() {
        let entities = [entity("accounts", "accounts"), entity("orders", "orders")];
        // Columns in another order than the entity's: found by name.
        let accounts = relation(1, "accounts", &["balance", "version", "id"]);
        let other = relation(2, "audit_log", &["id", "version"]);
        let messages = vec![
            accounts,
            other,
            change(b'I', 1, &[(b'N', &[Some("10"), Some("7"), Some("a")])]),
            change(b'I', 2, &[(b'N', &[Some("x"), Some("1")])]),
            commit(100),
            change(b'U', 1, &[(b'N', &[Some("11"), Some("8"), Some("a")])]),
            // The key changed: the old key's entry goes too.
            change(
                b'U',
                1,
                &[
                    (b'K', &[None, None, Some("a")]),
                    (b'N', &[Some("11"), Some("9"), Some("b")]),
                ],
            ),
            change(b'D', 1, &[(b'K', &[None, None, Some("b")])]),
            commit(200),
            b"T\0\0\0\x02\0\0\0\0\x01\0\0\0\x02".to_vec(),
            commit(300),
        ];
        let got = changes(&messages, &entities).unwrap();
        assert_eq!(
            got.changes,
            [
                row(0, "a", Some(7), false),
                row(0, "a", Some(8), false),
                row(0, "a", None, true),
                row(0, "b", Some(9), false),
                row(0, "b", None, true),
                CommittedChange::Truncated {
                    entity: EntityId::new(0)
                },
            ]
        );
        assert_eq!(got.commits_us, [100, 200, 300]);
        assert_eq!(got.unusable, 0);
    }

    #[test]
    fn a_delete_under_replica_identity_full_carries_the_version_and_a_null_key_is_unusable() {
        let entities = [entity("accounts", "accounts")];
        let messages = vec![
            relation(1, "accounts", &["id", "version"]),
            change(b'D', 1, &[(b'O', &[Some("k"), Some("41")])]),
            change(b'I', 1, &[(b'N', &[None, Some("42")])]),
        ];
        let got = changes(&messages, &entities).unwrap();
        assert_eq!(got.changes, [row(0, "k", Some(41), true)]);
        assert_eq!(got.unusable, 1);
    }

    #[test]
    fn two_entities_on_one_table_both_hear_of_it_and_garbage_is_an_error() {
        let entities = [entity("a", "t"), entity("b", "t")];
        let messages = vec![
            relation(1, "t", &["id", "version"]),
            change(b'I', 1, &[(b'N', &[Some("k"), Some("3")])]),
        ];
        let got = changes(&messages, &entities).unwrap();
        assert_eq!(
            got.changes,
            [row(0, "k", Some(3), false), row(1, "k", Some(3), false)]
        );
        assert!(changes(&[b"I\0".to_vec()], &entities).is_err());
    }
}
