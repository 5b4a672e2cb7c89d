//! PostgreSQL side of the protocol: one statement per write, versions from a per-table sequence.
//!
//! Table and column names come only from configuration and the catalog, and are always quoted as
//! identifiers; keys and values are always bound parameters.
//!
//! Every statement that assigns a version first takes a transaction-scoped advisory lock on
//! (table, key). `nextval` is evaluated under that lock, so for one key the versions increase in
//! commit order, across update, delete and re-insert. Without it, an INSERT evaluates its
//! `nextval` before it meets a concurrent DELETE of the same key and can commit a version below
//! the delete's tombstone.

use serde_json::{Map, Value};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;
use wtc_config::{DatabaseConfig, Entity};

use crate::envelope::Envelope;

/// `written_at` in RFC 3339, UTC, from the database clock.
const NOW_RFC3339: &str = r#"to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// Connection refused or lost, pool exhausted, statement timeout. The write may or may not
    /// have committed when this comes back from a write.
    #[error("the database is unavailable")]
    Unavailable,
    /// The database refused the values (type, constraint). Message in the database's words.
    #[error("{0}")]
    Rejected(String),
    /// The key cannot be a value of the key column's type.
    #[error("{0}")]
    BadKey(String),
    /// The configured table cannot be used as configured.
    #[error("{0}")]
    Schema(String),
    #[error("internal database error")]
    Internal,
}

impl DbError {
    /// Whether a failed write may nevertheless have committed (the cache must then be repaired).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, DbError::Unavailable | DbError::Internal)
    }

    fn from_sqlx(e: sqlx::Error, key_only: bool) -> Self {
        match &e {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                let message = db.message().to_string();
                match code.get(..2) {
                    Some("22") if key_only => DbError::BadKey(format!("invalid key: {message}")),
                    Some("22") | Some("23") => DbError::Rejected(message),
                    Some("08") | Some("53") | Some("57") | Some("40") => DbError::Unavailable,
                    _ if code == "42703" => DbError::Rejected(message),
                    _ => {
                        tracing::error!(sqlstate = %code, "database error");
                        DbError::Internal
                    }
                }
            }
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => {
                tracing::debug!(error = %e, "database unavailable");
                DbError::Unavailable
            }
            other => {
                tracing::error!(error = %other, "database client error");
                DbError::Internal
            }
        }
    }
}

/// What a write statement returned.
#[derive(Debug, Clone)]
pub struct Committed {
    pub envelope: Envelope,
    pub created: bool,
}

/// One write of a batch (`Database::write_batch`).
pub struct BatchStatement<'a> {
    pub table: &'a Table,
    pub key: &'a str,
    pub op: BatchOp<'a>,
    pub if_match: Option<i64>,
}

pub enum BatchOp<'a> {
    /// `body`: the JSON object's text; `columns`: what `Table::check_body` accepted.
    Put {
        body: &'a str,
        columns: Vec<&'a str>,
    },
    Delete,
}

/// Why a batch did not commit. `index` is the item's position in the batch.
#[derive(Debug, Clone)]
pub enum BatchFailure {
    /// An If-Match did not hold; `current` is the row's version (`None`: no row).
    Precondition { index: usize, current: Option<i64> },
    /// A delete without If-Match found no row.
    NotFound { index: usize },
    /// A statement failed (`index`: which), or the transaction itself (`None`). Only a failure
    /// `at_commit` may have committed nonetheless (outcome unknown); any other rolled back.
    Db {
        index: Option<usize>,
        error: DbError,
        at_commit: bool,
    },
}

/// Outcome of a conditional statement that matched no row.
#[derive(Debug, Clone, PartialEq)]
pub enum Precondition {
    /// The row exists at another version (or does not exist: `None`).
    Failed { current: Option<i64> },
}

pub struct Database {
    pool: PgPool,
    timeout: Duration,
    tables: Vec<OnceCell<Arc<Table>>>,
    entities: Vec<Entity>,
}

impl Database {
    /// Builds the pool without connecting: the sidecar starts, and answers 503, when PostgreSQL
    /// is not up yet.
    pub fn new(config: &DatabaseConfig, entities: &[Entity]) -> Result<Self, String> {
        let options = PgConnectOptions::from_str(&config.url)
            .map_err(|_| "database.url is not a valid PostgreSQL URL".to_string())?
            .options([("statement_timeout", config.statement_timeout_ms.to_string())])
            .application_name("wtc-sidecar");
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size)
            // A ping before every acquire costs a round trip per request; a broken connection
            // surfaces as an error on use instead, and the pool replaces it.
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_millis(
                config.statement_timeout_ms.min(2_000),
            ))
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            timeout: Duration::from_millis(config.statement_timeout_ms + 500),
            tables: entities.iter().map(|_| OnceCell::new()).collect(),
            entities: entities.to_vec(),
        })
    }

    pub async fn ping(&self) -> bool {
        let q = sqlx::query("SELECT 1").fetch_one(&self.pool);
        matches!(
            tokio::time::timeout(Duration::from_secs(1), q).await,
            Ok(Ok(_))
        )
    }

    /// The table of entity `idx`, introspected on first use (the application may create or
    /// migrate it after the sidecar started). Failures are not remembered.
    pub async fn table(&self, idx: usize) -> Result<Arc<Table>, DbError> {
        if let Some(t) = self.tables[idx].get() {
            return Ok(Arc::clone(t));
        }
        // Boxed: the introspection's state is large and needed once; every caller's future
        // would otherwise carry it.
        Box::pin(self.tables[idx].get_or_try_init(|| async {
            let t = Table::load(&self.pool, &self.entities[idx]).await?;
            Ok::<_, DbError>(Arc::new(t))
        }))
        .await
        .cloned()
    }

    async fn fetch_optional(
        &self,
        q: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        key_only: bool,
    ) -> Result<Option<PgRow>, DbError> {
        match tokio::time::timeout(self.timeout, q.fetch_optional(&self.pool)).await {
            Ok(r) => r.map_err(|e| DbError::from_sqlx(e, key_only)),
            Err(_) => Err(DbError::Unavailable),
        }
    }

    /// Reads the row of `key`; `None` when there is none.
    pub async fn read(&self, table: &Table, key: &str) -> Result<Option<Envelope>, DbError> {
        table.check_key(key)?;
        let q = sqlx::query(AssertSqlSafe(table.read_sql.clone())).bind(key);
        let row = self.fetch_optional(q, true).await?;
        row.map(|r| row_envelope(&r)).transpose()
    }

    /// Upserts the fields of `body` (an object whose columns `check_body` accepted).
    /// `if_match`: only update the row when it is at that version.
    pub async fn upsert(
        &self,
        table: &Table,
        key: &str,
        body: &str,
        columns: &[&str],
        if_match: Option<i64>,
    ) -> Result<Result<Committed, Precondition>, DbError> {
        table.check_key(key)?;
        let lock = lock_key(&table.name, key);
        let row = match if_match {
            None => {
                let sql = table.upsert_sql(columns);
                let q = sqlx::query(AssertSqlSafe(sql))
                    .bind(body)
                    .bind(key)
                    .bind(lock);
                self.fetch_optional(q, false).await?
            }
            Some(expected) => {
                let sql = table.update_sql(columns);
                let q = sqlx::query(AssertSqlSafe(sql))
                    .bind(body)
                    .bind(key)
                    .bind(lock)
                    .bind(expected);
                self.fetch_optional(q, false).await?
            }
        };
        match row {
            Some(r) => {
                let envelope = row_envelope(&r)?;
                let created: bool = r.try_get(3).map_err(|_| DbError::Internal)?;
                Ok(Ok(Committed { envelope, created }))
            }
            None => Ok(Err(Precondition::Failed {
                current: self.current_version(table, key).await?,
            })),
        }
    }

    /// Deletes the row; the returned tombstone carries a fresh version from the sequence.
    /// `Ok(None)` when there was no row (and no precondition was given).
    pub async fn delete(
        &self,
        table: &Table,
        key: &str,
        if_match: Option<i64>,
    ) -> Result<Result<Option<Envelope>, Precondition>, DbError> {
        table.check_key(key)?;
        let lock = lock_key(&table.name, key);
        let q = match if_match {
            None => sqlx::query(AssertSqlSafe(table.delete_sql.clone()))
                .bind(key)
                .bind(lock),
            Some(v) => sqlx::query(AssertSqlSafe(table.delete_if_match_sql.clone()))
                .bind(key)
                .bind(lock)
                .bind(v),
        };
        match self.fetch_optional(q, true).await? {
            Some(r) => {
                let version: i64 = r.try_get(0).map_err(|_| DbError::Internal)?;
                let at: String = r.try_get(1).map_err(|_| DbError::Internal)?;
                Ok(Ok(Some(Envelope::tombstone(version, &at))))
            }
            None if if_match.is_some() => Ok(Err(Precondition::Failed {
                current: self.current_version(table, key).await?,
            })),
            None => Ok(Ok(None)),
        }
    }

    /// Reads the rows of `keys` in one statement; the answer is in the order of `keys`.
    pub async fn read_many(
        &self,
        table: &Table,
        keys: &[&str],
    ) -> Result<Vec<Option<Envelope>>, DbError> {
        for key in keys {
            table.check_key(key)?;
        }
        let q = sqlx::query(AssertSqlSafe(table.read_many_sql.clone())).bind(keys);
        let rows = match tokio::time::timeout(self.timeout, q.fetch_all(&self.pool)).await {
            Ok(r) => r.map_err(|e| DbError::from_sqlx(e, true))?,
            Err(_) => return Err(DbError::Unavailable),
        };
        let mut out = vec![None; keys.len()];
        for r in &rows {
            let i: i64 = r.try_get(3).map_err(|_| DbError::Internal)?;
            let slot = usize::try_from(i - 1)
                .ok()
                .and_then(|i| out.get_mut(i))
                .ok_or(DbError::Internal)?;
            *slot = Some(row_envelope(r)?);
        }
        Ok(out)
    }

    /// Runs the writes of a batch in one transaction: all commit or none does. The statements run
    /// in the order of their advisory lock ids (not the order given), so that concurrent batches
    /// take their locks in one global order and cannot deadlock. The answer is in the order given.
    pub async fn write_batch(
        &self,
        items: &[BatchStatement<'_>],
    ) -> Result<Vec<Committed>, BatchFailure> {
        match Box::pin(self.write_batch_in(items, true)).await {
            // A set statement the database refused does not say which of its rows it refused:
            // the batch (rolled back) runs again one statement per item, to name it.
            Err(BatchFailure::Db {
                index: None,
                error: DbError::Rejected(_) | DbError::BadKey(_),
                at_commit: false,
            }) => Box::pin(self.write_batch_in(items, false)).await,
            other => other,
        }
    }

    /// `grouped`: consecutive puts without If-Match to one table with the same columns run as one
    /// set statement (one round trip instead of one per item).
    async fn write_batch_in(
        &self,
        items: &[BatchStatement<'_>],
        grouped: bool,
    ) -> Result<Vec<Committed>, BatchFailure> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        let fail = |index: Option<usize>, error: DbError| BatchFailure::Db {
            index,
            error,
            at_commit: false,
        };
        let mut order: Vec<(i64, usize)> = items
            .iter()
            .enumerate()
            .map(|(i, s)| (lock_key(&s.table.name, s.key), i))
            .collect();
        order.sort_unstable();
        let begin = tokio::time::timeout(self.timeout, self.pool.begin());
        let mut tx = match begin.await {
            Ok(r) => r.map_err(|e| fail(None, DbError::from_sqlx(e, false)))?,
            Err(_) => return Err(fail(None, DbError::Unavailable)),
        };
        let mut out: Vec<Option<Committed>> = vec![None; items.len()];
        let mut next = 0;
        while next < order.len() {
            let run = if grouped {
                plain_put_run(items, &order[next..])
            } else {
                1
            };
            if run >= 2 {
                let group = &order[next..next + run];
                next += run;
                for (n, committed) in self.upsert_group(&mut tx, items, group).await? {
                    out[group[n].1] = Some(committed);
                }
                continue;
            }
            let (lock, i) = order[next];
            next += 1;
            let s = &items[i];
            s.table.check_key(s.key).map_err(|e| fail(Some(i), e))?;
            let (q, key_only) = match &s.op {
                BatchOp::Put { body, columns } => {
                    let q = match s.if_match {
                        None => sqlx::query(AssertSqlSafe(s.table.upsert_sql(columns)))
                            .bind(*body)
                            .bind(s.key)
                            .bind(lock),
                        Some(v) => sqlx::query(AssertSqlSafe(s.table.update_sql(columns)))
                            .bind(*body)
                            .bind(s.key)
                            .bind(lock)
                            .bind(v),
                    };
                    (q, false)
                }
                BatchOp::Delete => {
                    let q = match s.if_match {
                        None => sqlx::query(AssertSqlSafe(s.table.delete_sql.clone()))
                            .bind(s.key)
                            .bind(lock),
                        Some(v) => sqlx::query(AssertSqlSafe(s.table.delete_if_match_sql.clone()))
                            .bind(s.key)
                            .bind(lock)
                            .bind(v),
                    };
                    (q, true)
                }
            };
            let row = match tokio::time::timeout(self.timeout, q.fetch_optional(&mut *tx)).await {
                Ok(r) => r.map_err(|e| fail(Some(i), DbError::from_sqlx(e, key_only)))?,
                Err(_) => return Err(fail(Some(i), DbError::Unavailable)),
            };
            let committed = match (row, &s.op) {
                (Some(r), BatchOp::Put { .. }) => Committed {
                    envelope: row_envelope(&r).map_err(|e| fail(Some(i), e))?,
                    created: r.try_get(3).map_err(|_| fail(Some(i), DbError::Internal))?,
                },
                (Some(r), BatchOp::Delete) => {
                    let version: i64 =
                        r.try_get(0).map_err(|_| fail(Some(i), DbError::Internal))?;
                    let at: String = r.try_get(1).map_err(|_| fail(Some(i), DbError::Internal))?;
                    Committed {
                        envelope: Envelope::tombstone(version, &at),
                        created: false,
                    }
                }
                (None, _) if s.if_match.is_some() => {
                    let q = sqlx::query(AssertSqlSafe(s.table.version_sql.clone())).bind(s.key);
                    let current = match tokio::time::timeout(
                        self.timeout,
                        q.fetch_optional(&mut *tx),
                    )
                    .await
                    {
                        Ok(Ok(r)) => r.and_then(|r| r.try_get::<i64, _>(0).ok()),
                        Ok(Err(e)) => return Err(fail(Some(i), DbError::from_sqlx(e, true))),
                        Err(_) => return Err(fail(Some(i), DbError::Unavailable)),
                    };
                    return Err(BatchFailure::Precondition { index: i, current });
                }
                (None, _) => return Err(BatchFailure::NotFound { index: i }),
            };
            out[i] = Some(committed);
        }
        match tokio::time::timeout(self.timeout, tx.commit()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(BatchFailure::Db {
                    index: None,
                    error: DbError::from_sqlx(e, false),
                    at_commit: true,
                });
            }
            Err(_) => {
                return Err(BatchFailure::Db {
                    index: None,
                    error: DbError::Unavailable,
                    at_commit: true,
                });
            }
        }
        out.into_iter()
            .map(|c| c.ok_or_else(|| fail(None, DbError::Internal)))
            .collect()
    }

    async fn current_version(&self, table: &Table, key: &str) -> Result<Option<i64>, DbError> {
        let q = sqlx::query(AssertSqlSafe(table.version_sql.clone())).bind(key);
        let row = self.fetch_optional(q, true).await?;
        row.map(|r| r.try_get::<i64, _>(0).map_err(|_| DbError::Internal))
            .transpose()
    }
}

fn row_envelope(r: &PgRow) -> Result<Envelope, DbError> {
    let data: String = r.try_get(0).map_err(|_| DbError::Internal)?;
    let version: i64 = r.try_get(1).map_err(|_| DbError::Internal)?;
    let at: String = r.try_get(2).map_err(|_| DbError::Internal)?;
    Ok(Envelope::row(version, &data, &at))
}

/// How many of `order`'s first statements are puts without If-Match to one table with the same
/// columns (at least 1 when `order` is not empty: the first counts itself).
fn plain_put_run(items: &[BatchStatement<'_>], order: &[(i64, usize)]) -> usize {
    let plain = |i: usize| match &items[i].op {
        BatchOp::Put { columns, .. } if items[i].if_match.is_none() => Some(columns),
        _ => None,
    };
    let Some(&(_, first)) = order.first() else {
        return 0;
    };
    let Some(columns) = plain(first) else {
        return 1;
    };
    order
        .iter()
        .take_while(|(_, i)| {
            std::ptr::eq(items[*i].table, items[first].table) && plain(*i) == Some(columns)
        })
        .count()
}

impl Database {
    /// One set statement for a run of plain puts (`plain_put_run`); returns each row's position
    /// in `group` with what it committed.
    async fn upsert_group(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        items: &[BatchStatement<'_>],
        group: &[(i64, usize)],
    ) -> Result<Vec<(usize, Committed)>, BatchFailure> {
        let fail = |error: DbError| BatchFailure::Db {
            index: None,
            error,
            at_commit: false,
        };
        let first = &items[group[0].1];
        let BatchOp::Put { columns, .. } = &first.op else {
            return Err(fail(DbError::Internal));
        };
        let mut bodies = Vec::with_capacity(group.len());
        let mut keys = Vec::with_capacity(group.len());
        let mut locks = Vec::with_capacity(group.len());
        for &(lock, i) in group {
            let s = &items[i];
            s.table.check_key(s.key).map_err(|e| BatchFailure::Db {
                index: Some(i),
                error: e,
                at_commit: false,
            })?;
            let BatchOp::Put { body, .. } = &s.op else {
                return Err(fail(DbError::Internal));
            };
            bodies.push(*body);
            keys.push(s.key);
            locks.push(lock);
        }
        let q = sqlx::query(AssertSqlSafe(first.table.upsert_many_sql(columns)))
            .bind(bodies)
            .bind(keys)
            .bind(locks);
        let rows = match tokio::time::timeout(self.timeout, q.fetch_all(&mut **tx)).await {
            Ok(r) => r.map_err(|e| {
                // Two keys that name one row (`7` and `07` of an integer key) cannot be one set
                // statement; one statement per item can run them.
                let same_row = matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("21000"));
                fail(if same_row {
                    DbError::Rejected("two keys of the batch name one row".into())
                } else {
                    DbError::from_sqlx(e, false)
                })
            })?,
            Err(_) => return Err(fail(DbError::Unavailable)),
        };
        if rows.len() != group.len() {
            return Err(fail(DbError::Internal));
        }
        rows.iter()
            .map(|r| {
                let ordinal: i64 = r.try_get(4).map_err(|_| fail(DbError::Internal))?;
                let n = usize::try_from(ordinal - 1)
                    .ok()
                    .filter(|n| *n < group.len())
                    .ok_or_else(|| fail(DbError::Internal))?;
                let committed = Committed {
                    envelope: row_envelope(r).map_err(fail)?,
                    created: r.try_get(3).map_err(|_| fail(DbError::Internal))?,
                };
                Ok((n, committed))
            })
            .collect()
    }
}

/// Advisory lock id for (table, key): FNV-1a, stable across processes and machines.
fn lock_key(table: &str, key: &str) -> i64 {
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
    /// Column name -> position, for the columns a body may set.
    writable: HashMap<String, usize>,
    key_column: String,
    version_column: String,
    key_is_integer: bool,
    q_table: String,
    q_key: String,
    q_version: String,
    key_cast: String,
    returning: String,
    next_version: String,
    read_sql: Arc<str>,
    /// Reads many keys in one statement; `$1` is a text array, each row comes with its index in it.
    read_many_sql: Arc<str>,
    version_sql: Arc<str>,
    delete_sql: Arc<str>,
    delete_if_match_sql: Arc<str>,
}

impl Table {
    async fn load(pool: &PgPool, entity: &Entity) -> Result<Table, DbError> {
        let regclass = quote_ident(&entity.table);
        let cols = sqlx::query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnum::int4 \
             FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 \
             AND NOT a.attisdropped ORDER BY a.attnum",
        )
        .bind(&regclass)
        .fetch_all(pool)
        .await
        .map_err(|e| DbError::from_sqlx(e, false))?;
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
        .map_err(|e| DbError::from_sqlx(e, false))?;
        if !unique {
            return Err(DbError::Schema(format!(
                "key column {:?} of table {:?} needs a primary key or unique index",
                entity.key_column, entity.table
            )));
        }

        let sequence = sequence_name(&entity.table, &entity.version_column);
        ensure_sequence(pool, &entity.table, &entity.version_column, &sequence).await?;

        let q_table = quote_ident(&entity.table);
        let q_key = quote_ident(&entity.key_column);
        let q_version = quote_ident(&entity.version_column);
        let key_cast = format!("CAST($KEY::text AS {key_type})");
        let next_version = format!(
            "nextval({}::regclass)",
            quote_literal(&quote_ident(&sequence))
        );
        let data = format!(
            "(to_jsonb(t) - {})::text, t.{q_version}::int8, {NOW_RFC3339}",
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
            format!("SELECT t.{q_version}::int8 FROM {q_table} AS t WHERE {where_key}");
        let delete_sql = format!(
            "{lock} DELETE FROM {q_table} AS t USING l WHERE {where_key} \
             RETURNING {next_version}::int8, {NOW_RFC3339}"
        );
        let delete_if_match_sql = format!(
            "{lock} DELETE FROM {q_table} AS t USING l WHERE {where_key} AND t.{q_version} = $3::int8 \
             RETURNING {next_version}::int8, {NOW_RFC3339}"
        );
        let writable = attnums
            .iter()
            .filter(|(name, _)| **name != entity.version_column)
            .map(|(name, n)| (name.clone(), *n as usize))
            .collect();
        Ok(Table {
            name: entity.table.clone(),
            writable,
            key_column: entity.key_column.clone(),
            version_column: entity.version_column.clone(),
            key_is_integer: matches!(key_type.as_str(), "smallint" | "integer" | "bigint"),
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
        })
    }

    fn check_key(&self, key: &str) -> Result<(), DbError> {
        if self.key_is_integer && key.parse::<i64>().is_err() {
            return Err(DbError::BadKey(format!(
                "key {key:?} is not an integer, and column {:?} holds integers",
                self.key_column
            )));
        }
        Ok(())
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
                let same = match value {
                    Value::String(s) => s == key,
                    Value::Number(n) => n.to_string() == key,
                    _ => false,
                };
                if !same {
                    return Err(BodyError::KeyMismatch(name.clone()));
                }
                continue;
            }
            match self.writable.get(name) {
                Some(pos) => columns.push((*pos, name.as_str())),
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
    fn upsert_many_sql(&self, columns: &[&str]) -> String {
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

    fn upsert_sql(&self, columns: &[&str]) -> String {
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
             RETURNING {ret}, (t.xmax = 0)",
            key = self.key_cast.replace("$KEY", "$2"),
            next = self.next_version,
            ret = self.returning,
        )
    }

    fn update_sql(&self, columns: &[&str]) -> String {
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
             RETURNING {ret}, false",
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

#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    #[error("unknown column(s): {}", .0.join(", "))]
    UnknownColumns(Vec<String>),
    #[error("column {0:?} is the version: the sidecar assigns it")]
    VersionColumn(String),
    #[error("column {0:?} is the key and differs from the key in the URL")]
    KeyMismatch(String),
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

/// Creates the version sequence when missing and moves it past the versions already in the table
/// (adopting an existing table). Serialized across sidecars by an advisory lock.
async fn ensure_sequence(
    pool: &PgPool,
    table: &str,
    version_column: &str,
    sequence: &str,
) -> Result<(), DbError> {
    let q_seq = quote_ident(sequence);
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| DbError::from_sqlx(e, false))?;
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
            .map_err(|e| DbError::from_sqlx(e, false))?;
    }
    tx.commit().await.map_err(|e| DbError::from_sqlx(e, false))
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

    #[test]
    fn sequence_name_fits_postgres_limit() {
        assert_eq!(
            sequence_name("accounts", "version"),
            "accounts_version_wtc_seq"
        );
        assert!(sequence_name(&"x".repeat(63), "version").len() <= 63);
    }
}
