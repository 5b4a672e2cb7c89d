//! One configured table as found in the catalog, and every SQL statement the sidecar runs on it.
//! Table and column names come only from configuration and the catalog, and are always quoted as
//! identifiers; keys and values are always bound parameters.

use super::error::db_error;
use super::keys::KeyType;
use super::values::{ValueKind, json_type};
use crate::core::types::{BodyError, DbError};
use serde_json::{Map, Value};
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use wtc_config::{Entity, VersionSource};

/// `written_at` in RFC 3339, UTC, from the database clock.
const NOW_RFC3339: &str = r#"to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#;

/// Advisory lock id for (table, key): FNV-1a, stable across processes and machines.
pub(super) fn lock_key(table: &str, key: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in table.bytes().chain([0u8]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One configured table as found in the catalog, with its statements.
#[derive(Debug)]
pub struct Table {
    pub name: String,
    /// Column name -> position and the JSON it takes, for the columns a body may set.
    writable: HashMap<String, (usize, ValueKind)>,
    key_column: String,
    version_column: String,
    key_type: KeyType,
    q_table: String,
    q_key: String,
    q_version: String,
    key_cast: String,
    returning: String,
    next_version: String,
    pub(super) read_sql: Arc<str>,
    /// Reads many keys in one statement; `$1` is a text array, each row comes with its index in it.
    pub(super) read_many_sql: Arc<str>,
    pub(super) version_sql: Arc<str>,
    pub(super) delete_sql: Arc<str>,
    pub(super) delete_if_match_sql: Arc<str>,
}

impl Table {
    pub(super) async fn load(pool: &PgPool, entity: &Entity) -> Result<Table, DbError> {
        let regclass = quote_ident(&entity.table);
        let cols = sqlx::query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnum::int4 \
             FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 \
             AND NOT a.attisdropped ORDER BY a.attnum",
        )
        .bind(&regclass)
        .fetch_all(pool)
        .await
        .map_err(|e| db_error(e, false))?;
        if cols.is_empty() {
            return Err(DbError::Schema(format!(
                "table {:?} of entity {:?} does not exist",
                entity.table, entity.name
            )));
        }
        let mut types = HashMap::new();
        let mut attnums = HashMap::new();
        for r in &cols {
            let name: String = r.try_get(0).map_err(|_| DbError::Internal)?;
            let ty: String = r.try_get(1).map_err(|_| DbError::Internal)?;
            let num: i32 = r.try_get(2).map_err(|_| DbError::Internal)?;
            types.insert(name.clone(), ty);
            attnums.insert(name, num);
        }
        let missing = |c: &str| {
            DbError::Schema(format!(
                "table {:?} of entity {:?} has no column {c:?}",
                entity.table, entity.name
            ))
        };
        let key_type = types
            .get(&entity.key_column)
            .ok_or_else(|| missing(&entity.key_column))?
            .clone();
        let schema = |m: String| {
            DbError::Schema(format!(
                "key column {:?} of table {:?}: {m}",
                entity.key_column, entity.table
            ))
        };
        let parsed = KeyType::of(&key_type).map_err(schema)?;
        if matches!(parsed, KeyType::Text | KeyType::Bpchar) {
            // A case- or accent-insensitive collation makes several spellings one row.
            let deterministic: bool = sqlx::query_scalar(
                "SELECT coalesce((SELECT c.collisdeterministic FROM pg_attribute a \
                 JOIN pg_collation c ON c.oid = a.attcollation \
                 WHERE a.attrelid = to_regclass($1) AND a.attname = $2), true)",
            )
            .bind(&regclass)
            .bind(&entity.key_column)
            .fetch_one(pool)
            .await
            .map_err(|e| db_error(e, false))?;
            if !deterministic {
                return Err(schema(
                    "its collation is not deterministic (several spellings would be one row)"
                        .into(),
                ));
            }
        }
        let version_type = types
            .get(&entity.version_column)
            .ok_or_else(|| missing(&entity.version_column))?;
        if version_type != "bigint" && version_type != "integer" {
            return Err(DbError::Schema(format!(
                "version column {:?} of table {:?} must be bigint or integer, not {version_type}",
                entity.version_column, entity.table
            )));
        }
        let unique: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = to_regclass($1) \
             AND i.indisunique AND i.indnkeyatts = 1 AND i.indkey[0] = $2::int2 AND i.indpred IS NULL)",
        )
        .bind(&regclass)
        .bind(attnums[&entity.key_column])
        .fetch_one(pool)
        .await
        .map_err(|e| db_error(e, false))?;
        if !unique {
            return Err(DbError::Schema(format!(
                "key column {:?} of table {:?} needs a primary key or unique index",
                entity.key_column, entity.table
            )));
        }

        let sequence = sequence_name(&entity.table, &entity.version_column);
        ensure_versions(pool, entity, &sequence).await?;
        Ok(Table::new(entity, &key_type, &attnums, &types, &sequence))
    }

    /// The table and its statements, from what the catalog said (pure: unit-tested below).
    fn new(
        entity: &Entity,
        key_type: &str,
        attnums: &HashMap<String, i32>,
        types: &HashMap<String, String>,
        sequence: &str,
    ) -> Table {
        let q_table = quote_ident(&entity.table);
        let q_key = quote_ident(&entity.key_column);
        let q_version = quote_ident(&entity.version_column);
        let key_cast = format!("CAST($KEY::text AS {key_type})");
        let next_version = format!(
            "nextval({}::regclass)",
            quote_literal(&quote_ident(sequence))
        );
        let data = format!(
            "(to_jsonb(t) - {})::text AS d, t.{q_version}::int8 AS v, {NOW_RFC3339} AS a",
            quote_literal(&entity.version_column)
        );
        let where_key = format!("t.{q_key} = {}", key_cast.replace("$KEY", "$1"));
        let lock = "WITH l AS MATERIALIZED (SELECT pg_advisory_xact_lock($2::int8))";
        let read_sql = format!("SELECT {data} FROM {q_table} AS t WHERE {where_key}");
        let read_many_sql = format!(
            "SELECT {data}, k.i FROM {q_table} AS t \
             JOIN unnest($1::text[]) WITH ORDINALITY AS k(key, i) ON t.{q_key} = {}",
            key_cast.replace("$KEY", "k.key")
        );
        let version_sql =
            format!("SELECT t.{q_version}::int8 AS v FROM {q_table} AS t WHERE {where_key}");
        let delete_sql = format!(
            "{lock} DELETE FROM {q_table} AS t USING l WHERE {where_key} \
             RETURNING {next_version}::int8 AS v, {NOW_RFC3339} AS a"
        );
        let delete_if_match_sql = format!(
            "{lock} DELETE FROM {q_table} AS t USING l WHERE {where_key} AND t.{q_version} = $3::int8 \
             RETURNING {next_version}::int8 AS v, {NOW_RFC3339} AS a"
        );
        let writable = attnums
            .iter()
            .filter(|(name, _)| **name != entity.version_column)
            .map(|(name, n)| {
                let kind = types.get(name).map_or(ValueKind::Any, |t| ValueKind::of(t));
                (name.clone(), (*n as usize, kind))
            })
            .collect();
        Table {
            name: entity.table.clone(),
            writable,
            key_column: entity.key_column.clone(),
            version_column: entity.version_column.clone(),
            // `load` refused the types without a canonical form.
            key_type: KeyType::of(key_type).unwrap_or(KeyType::Text),
            q_table,
            q_key,
            q_version,
            key_cast,
            returning: data,
            next_version,
            read_sql: read_sql.into(),
            read_many_sql: read_many_sql.into(),
            version_sql: version_sql.into(),
            delete_sql: delete_sql.into(),
            delete_if_match_sql: delete_if_match_sql.into(),
        }
    }

    /// The canonical spelling of `key` (`keys`): the one every cache entry and lock is named by.
    pub(super) fn canonical_key<'a>(&self, key: &'a str) -> Result<Cow<'a, str>, DbError> {
        self.key_type
            .canonical(key)
            .map_err(|m| DbError::BadKey(format!("{m} (key column {:?})", self.key_column)))
    }

    /// Statements run with canonical keys only.
    pub(super) fn check_key(&self, key: &str) -> Result<(), DbError> {
        if self.canonical_key(key)? == key {
            Ok(())
        } else {
            Err(DbError::BadKey(format!(
                "key {key:?} is not in its canonical spelling"
            )))
        }
    }

    /// Validates a write body: the columns it names, in table order. The key column may appear
    /// only with the key of the URL; the version column never.
    pub fn check_body<'a>(
        &self,
        body: &'a Map<String, Value>,
        key: &str,
    ) -> Result<Vec<&'a str>, BodyError> {
        let mut unknown = Vec::new();
        let mut columns = Vec::new();
        for (name, value) in body {
            if *name == self.key_column {
                // The body's spelling of the key counts as the same key if it names the same row.
                let same = match value {
                    Value::String(s) => self.key_type.canonical(s).is_ok_and(|c| c == key),
                    Value::Number(n) => self
                        .key_type
                        .canonical(&n.to_string())
                        .is_ok_and(|c| c == key),
                    _ => false,
                };
                if !same {
                    return Err(BodyError::KeyMismatch(name.clone()));
                }
                continue;
            }
            match self.writable.get(name) {
                Some((_, kind)) if !kind.accepts(value) => {
                    return Err(BodyError::WrongType {
                        column: name.clone(),
                        expected: kind.expected(),
                        got: json_type(value),
                    });
                }
                Some((pos, _)) => columns.push((*pos, name.as_str())),
                None if *name == self.version_column => {
                    return Err(BodyError::VersionColumn(name.clone()));
                }
                None => unknown.push(name.clone()),
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(BodyError::UnknownColumns(unknown));
        }
        columns.sort_unstable();
        Ok(columns.into_iter().map(|(_, n)| n).collect())
    }

    /// The set form of `upsert_sql`: `$1` bodies, `$2` keys, `$3` lock ids, as arrays in lock
    /// order. Each row's lock is taken before its version is drawn, in array order (the CTE is
    /// scanned in order, once); the answer has the ordinal of each row.
    pub(super) fn upsert_many_sql(&self, columns: &[&str]) -> String {
        let (q_table, q_key, q_version) = (&self.q_table, &self.q_key, &self.q_version);
        let UpsertColumns {
            names,
            values,
            sets,
        } = UpsertColumns::of(columns);
        let key = self.key_cast.replace("$KEY", "i.k");
        format!(
            "WITH i AS MATERIALIZED (SELECT u.b, u.k, u.o, pg_advisory_xact_lock(u.l) \
             FROM unnest($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS u(b, k, l, o)), \
             w(d, v, a, created, k) AS (INSERT INTO {q_table} AS t ({names}{q_key}, {q_version}) \
             SELECT {values}{key}, {next} FROM i, jsonb_populate_record(NULL::{q_table}, i.b::jsonb) AS r \
             ORDER BY i.o \
             ON CONFLICT ({q_key}) DO UPDATE SET {sets}{q_version} = EXCLUDED.{q_version} \
             RETURNING {ret}, (t.xmax = 0), t.{q_key}) \
             SELECT w.d, w.v, w.a, w.created, i.o FROM w JOIN i ON w.k = {key} ORDER BY i.o",
            next = self.next_version,
            ret = self.returning,
        )
    }

    pub(super) fn upsert_sql(&self, columns: &[&str]) -> String {
        let (q_table, q_key, q_version) = (&self.q_table, &self.q_key, &self.q_version);
        let UpsertColumns {
            names,
            values,
            sets,
        } = UpsertColumns::of(columns);
        format!(
            "WITH l AS MATERIALIZED (SELECT pg_advisory_xact_lock($3::int8)) \
             INSERT INTO {q_table} AS t ({names}{q_key}, {q_version}) \
             SELECT {values}{key}, {next} FROM l, jsonb_populate_record(NULL::{q_table}, $1::jsonb) AS r \
             ON CONFLICT ({q_key}) DO UPDATE SET {sets}{q_version} = EXCLUDED.{q_version} \
             RETURNING {ret}, (t.xmax = 0) AS created",
            key = self.key_cast.replace("$KEY", "$2"),
            next = self.next_version,
            ret = self.returning,
        )
    }

    /// `upsert_sql` that only creates (`If-None-Match: *`): no row when one is there already.
    pub(super) fn insert_sql(&self, columns: &[&str]) -> String {
        let (q_table, q_key, q_version) = (&self.q_table, &self.q_key, &self.q_version);
        let UpsertColumns { names, values, .. } = UpsertColumns::of(columns);
        format!(
            "WITH l AS MATERIALIZED (SELECT pg_advisory_xact_lock($3::int8)) \
             INSERT INTO {q_table} AS t ({names}{q_key}, {q_version}) \
             SELECT {values}{key}, {next} FROM l, jsonb_populate_record(NULL::{q_table}, $1::jsonb) AS r \
             ON CONFLICT ({q_key}) DO NOTHING \
             RETURNING {ret}, true AS created",
            key = self.key_cast.replace("$KEY", "$2"),
            next = self.next_version,
            ret = self.returning,
        )
    }

    pub(super) fn update_sql(&self, columns: &[&str]) -> String {
        let (q_table, q_key, q_version) = (&self.q_table, &self.q_key, &self.q_version);
        let mut sets = String::new();
        for c in columns {
            let q = quote_ident(c);
            sets.push_str(&format!("{q} = r.{q}, "));
        }
        format!(
            "WITH l AS MATERIALIZED (SELECT pg_advisory_xact_lock($3::int8)) \
             UPDATE {q_table} AS t SET {sets}{q_version} = {next} \
             FROM l, jsonb_populate_record(NULL::{q_table}, $1::jsonb) AS r \
             WHERE t.{q_key} = {key} AND t.{q_version} = $4::int8 \
             RETURNING {ret}, false AS created",
            key = self.key_cast.replace("$KEY", "$2"),
            next = self.next_version,
            ret = self.returning,
        )
    }
}

/// The column lists of an upsert of `columns` from a record `r`: the INSERT's names, the
/// SELECT's values, the ON CONFLICT update's assignments (each ending in ", ").
struct UpsertColumns {
    names: String,
    values: String,
    sets: String,
}

impl UpsertColumns {
    fn of(columns: &[&str]) -> Self {
        let mut out = Self {
            names: String::new(),
            values: String::new(),
            sets: String::new(),
        };
        for c in columns {
            let q = quote_ident(c);
            out.names.push_str(&format!("{q}, "));
            out.values.push_str(&format!("r.{q}, "));
            out.sets.push_str(&format!("{q} = EXCLUDED.{q}, "));
        }
        out
    }
}

/// Name of the version sequence the sidecar owns for a table (at most 63 bytes).
pub fn sequence_name(table: &str, version_column: &str) -> String {
    let mut name = format!("{table}_{version_column}_wtc_seq");
    while name.len() > 63 {
        let cut = name
            .char_indices()
            .nth(name.chars().count() - 1)
            .map(|(i, _)| i)
            .unwrap_or(0);
        name.truncate(cut);
    }
    name
}

/// Name of the version trigger's function for a table: short and unique, since table names
/// may already take the 63 bytes an identifier has.
pub fn version_function_name(table: &str, version_column: &str) -> String {
    format!(
        "wtc_version_{:016x}",
        lock_key(table, version_column) as u64
    )
}

/// The trigger that gives every inserted and updated row its version (`versions = "trigger"`).
pub const VERSION_TRIGGER: &str = "wtc_version";

/// The statements that install the version trigger: a function drawing `nextval` of the
/// sequence (never below the row's previous version, should the sequence be set back), and the
/// trigger. A BEFORE UPDATE trigger runs after the row lock, so one key's versions follow commit
/// order whoever writes; the sidecar's statements read the version back (`RETURNING`).
/// The sequence is named by its oid: a writer's `search_path` plays no part (and the function
/// runs with `pg_catalog` only, so nothing a writer puts first on its path runs in it).
fn version_trigger_sql(entity: &Entity, sequence_oid: u32) -> [String; 2] {
    let q_fn = quote_ident(&version_function_name(
        &entity.table,
        &entity.version_column,
    ));
    let v = quote_ident(&entity.version_column);
    let body = format!(
        "BEGIN NEW.{v} := nextval({sequence_oid}::oid::regclass); \
         IF TG_OP = 'UPDATE' AND NEW.{v} <= OLD.{v} THEN NEW.{v} := OLD.{v} + 1; END IF; \
         RETURN NEW; END"
    );
    [
        format!(
            "CREATE OR REPLACE FUNCTION {q_fn}() RETURNS trigger LANGUAGE plpgsql \
             SET search_path = pg_catalog, pg_temp AS {}",
            quote_literal(&body)
        ),
        format!(
            "CREATE TRIGGER {} BEFORE INSERT OR UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {q_fn}()",
            quote_ident(VERSION_TRIGGER),
            quote_ident(&entity.table)
        ),
    ]
}

/// Creates the version sequence when missing and moves it past the versions already in the table
/// (adopting an existing table); with `versions = "trigger"`, installs the version trigger.
/// Serialized across sidecars by an advisory lock.
async fn ensure_versions(pool: &PgPool, entity: &Entity, sequence: &str) -> Result<(), DbError> {
    let (table, version_column) = (&entity.table, &entity.version_column);
    let q_seq = quote_ident(sequence);
    let mut tx = pool.begin().await.map_err(|e| db_error(e, false))?;
    let steps = [
        format!(
            "SELECT pg_advisory_xact_lock({})",
            lock_key("wtc-sequence", sequence)
        ),
        format!("CREATE SEQUENCE IF NOT EXISTS {q_seq} AS bigint"),
        format!(
            "SELECT setval({lit}::regclass, m) FROM (SELECT max({v})::int8 AS m FROM {t}) s \
             WHERE m IS NOT NULL AND m >= (SELECT last_value FROM {q_seq})",
            lit = quote_literal(&q_seq),
            v = quote_ident(version_column),
            t = quote_ident(table),
        ),
    ];
    for sql in steps {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, false))?;
    }
    if entity.versions == VersionSource::Trigger {
        // Under the lock: two sidecars starting together create it once. One that exists
        // (perhaps made by a DBA, owned by another role) is left as it is.
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2)",
        )
        .bind(quote_ident(table))
        .bind(VERSION_TRIGGER)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| db_error(e, false))?;
        if !exists {
            let oid: sqlx::postgres::types::Oid = sqlx::query_scalar("SELECT to_regclass($1)::oid")
                .bind(&q_seq)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| db_error(e, false))?;
            for sql in version_trigger_sql(entity, oid.0) {
                sqlx::query(AssertSqlSafe(sql))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_error(e, false))?;
            }
        }
    }
    tx.commit().await.map_err(|e| db_error(e, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn lock_key_depends_on_table_and_key() {
        assert_eq!(lock_key("t", "a"), lock_key("t", "a"));
        assert_ne!(lock_key("t", "a"), lock_key("t", "b"));
        assert_ne!(lock_key("ta", ""), lock_key("t", "a"));
    }

    fn table() -> Table {
        let entity = Entity {
            name: "accounts".into(),
            table: "we\"ird".into(),
            key_column: "id".into(),
            version_column: "version".into(),
            ttl_seconds: 60,
            versions: Default::default(),
        };
        let attnums = HashMap::from([
            ("id".to_string(), 1),
            ("version".to_string(), 2),
            ("balance".to_string(), 3),
            ("note".to_string(), 4),
        ]);
        let types = HashMap::from([
            ("id".to_string(), "bigint".to_string()),
            ("version".to_string(), "bigint".to_string()),
            ("balance".to_string(), "numeric(12,2)".to_string()),
            ("note".to_string(), "text".to_string()),
        ]);
        Table::new(
            &entity,
            "bigint",
            &attnums,
            &types,
            "we\"ird_version_wtc_seq",
        )
    }

    #[test]
    fn statements_quote_names_and_bind_every_value() {
        let t = table();
        assert!(
            t.read_sql
                .contains(r#"FROM "we""ird" AS t WHERE t."id" = CAST($1::text AS bigint)"#)
        );
        // The sequence is named as a quoted identifier inside a literal.
        assert!(
            t.delete_sql
                .contains(r#"nextval('"we""ird_version_wtc_seq"'::regclass)"#)
        );
        for sql in [
            &*t.read_sql,
            &t.upsert_sql(&["balance"]),
            &t.update_sql(&["balance"]),
        ] {
            assert!(!sql.contains("42"), "a value in the text: {sql}");
        }
        let upsert = t.upsert_sql(&["balance", "note"]);
        assert!(
            upsert.contains(r#"("balance", "note", "id", "version")"#),
            "{upsert}"
        );
        assert!(upsert.contains(r#"SET "balance" = EXCLUDED."balance", "note" = EXCLUDED."note", "version" = EXCLUDED."version""#), "{upsert}");
    }

    #[test]
    fn every_version_is_drawn_under_the_key_lock() {
        let t = table();
        for sql in [
            t.upsert_sql(&["balance"]),
            t.update_sql(&["balance"]),
            t.insert_sql(&["balance"]),
            t.delete_sql.to_string(),
            t.delete_if_match_sql.to_string(),
            t.upsert_many_sql(&["balance"]),
        ] {
            let lock = sql.find("pg_advisory_xact_lock").expect("takes the lock");
            let next = sql.find("nextval(").expect("draws a version");
            assert!(lock < next, "the lock comes first: {sql}");
            assert!(
                sql.contains("MATERIALIZED"),
                "the lock is evaluated once, first: {sql}"
            );
        }
        // If-Match compares the version inside the statement.
        assert!(
            t.update_sql(&["balance"])
                .contains(r#"t."version" = $4::int8"#)
        );
        assert!(t.delete_if_match_sql.contains(r#"t."version" = $3::int8"#));
    }

    #[test]
    fn answers_name_their_columns() {
        let t = table();
        for sql in [
            t.upsert_sql(&["balance"]),
            t.update_sql(&["balance"]),
            t.insert_sql(&["balance"]),
        ] {
            for col in [" AS d", " AS v", " AS a", " AS created"] {
                assert!(sql.contains(col), "{col} missing: {sql}");
            }
        }
        assert!(t.read_many_sql.contains("k(key, i)"));
        assert!(
            t.upsert_many_sql(&["balance"])
                .contains("SELECT w.d, w.v, w.a, w.created, i.o")
        );
    }

    #[test]
    fn bodies_are_checked_against_the_columns() {
        let t = table();
        let body = |v: serde_json::Value| v.as_object().unwrap().clone();
        let b = body(serde_json::json!({"note": "x", "balance": 1}));
        assert_eq!(t.check_body(&b, "7").unwrap(), vec!["balance", "note"]);
        let b = body(serde_json::json!({"id": 7, "balance": 1}));
        assert_eq!(t.check_body(&b, "7").unwrap(), vec!["balance"]);
        let b = body(serde_json::json!({"id": 8}));
        assert!(matches!(
            t.check_body(&b, "7"),
            Err(BodyError::KeyMismatch(_))
        ));
        let b = body(serde_json::json!({"version": 8}));
        assert!(matches!(
            t.check_body(&b, "7"),
            Err(BodyError::VersionColumn(_))
        ));
        let b = body(serde_json::json!({"note": {"a": 1}}));
        assert!(
            matches!(t.check_body(&b, "7"), Err(BodyError::WrongType { ref column, .. }) if column == "note")
        );
        let b = body(serde_json::json!({"balance": "12"}));
        assert!(t.check_body(&b, "7").is_err(), "a string for a number");
        let b = body(serde_json::json!({"nope": 1, "also": 2}));
        assert_eq!(
            t.check_body(&b, "7").unwrap_err(),
            BodyError::UnknownColumns(vec!["also".into(), "nope".into()])
        );
        assert!(t.check_key("x7").is_err());
        assert!(t.check_key("-7").is_ok());
        assert!(
            t.check_key("07").is_err(),
            "statements take canonical keys only"
        );
        assert_eq!(t.canonical_key("+007").unwrap(), "7");
    }

    #[test]
    fn sequence_name_fits_postgres_limit() {
        assert_eq!(
            sequence_name("accounts", "version"),
            "accounts_version_wtc_seq"
        );
        assert!(sequence_name(&"x".repeat(63), "version").len() <= 63);
    }

    #[test]
    fn the_version_trigger_quotes_every_name() {
        let entity = Entity {
            name: "accounts".into(),
            table: "we\"ird".into(),
            key_column: "id".into(),
            version_column: "v'er".into(),
            ttl_seconds: 60,
            versions: VersionSource::Trigger,
        };
        let sql = version_trigger_sql(&entity, 16384);
        let function = version_function_name("we\"ird", "v'er");
        assert!(function.len() <= 63);
        assert_ne!(function, version_function_name("we\"ird", "version"));
        // The body is one string literal: the column's quote is doubled inside it.
        assert!(sql[0].starts_with(&format!("CREATE OR REPLACE FUNCTION \"{function}\"()")));
        assert!(sql[0].contains("SET search_path = pg_catalog, pg_temp AS "));
        assert!(
            sql[0].contains(r#"NEW."v''er" := nextval(16384::oid::regclass)"#),
            "{}",
            sql[0]
        );
        assert!(sql[0].contains("NEW.\"v''er\" <= OLD.\"v''er\""));
        assert_eq!(
            sql[1],
            format!(
                "CREATE TRIGGER \"wtc_version\" BEFORE INSERT OR UPDATE ON \"we\"\"ird\" \
                 FOR EACH ROW EXECUTE FUNCTION \"{function}\"()"
            )
        );
    }
}
