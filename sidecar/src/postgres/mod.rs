//! The row store on PostgreSQL: one statement per write (one transaction for a batch), versions
//! from a per-table sequence. The tables and their statements are in `table`.
//!
//! Every statement that assigns a version first takes a transaction-scoped advisory lock on
//! (table, key). `nextval` is evaluated under that lock, so for one key the versions increase in
//! commit order, across update, delete and re-insert. Without it, an INSERT evaluates its
//! `nextval` before it meets a concurrent DELETE of the same key and can commit a version below
//! the delete's tombstone. With `versions = "trigger"` a trigger draws the version instead
//! (every writer's), after the row lock; the statements read it back with `RETURNING`.
//! `commit_stream` (with the `pgoutput` decoder) reads what every writer committed.

pub mod commit_stream;
mod error;
mod keys;
mod pgoutput;
mod table;
mod values;

use crate::core::envelope::Envelope;
use crate::core::ports::{CommitFailure, KeyForm, PrepareError, RowStore};
use crate::core::types::{
    BodyError, Committed, Condition, DbError, EntityId, Version, Write, WriteOp,
};
use error::db_error;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow, PgSslMode};
use sqlx::{AssertSqlSafe, Row};
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use table::{Table, lock_key};
use wtc_config::{DatabaseConfig, Entity};

pub use keys::KeyType;
pub use table::{
    VERSION_TRIGGER, quote_ident, quote_literal, sequence_name, version_function_name,
};

/// What `prepare` learned about a write: its table, and the columns a put sets (table order).
pub struct Prepared {
    table: Arc<Table>,
    columns: Vec<String>,
    /// The canonical key.
    key: String,
}

/// One write of a batch (`Database::write_batch`).
struct BatchStatement<'a> {
    table: &'a Table,
    key: &'a str,
    op: BatchOp<'a>,
    condition: Condition,
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

impl<'a> BatchStatement<'a> {
    /// The statement of this write, and whether its errors are about the key alone. `None`: no
    /// statement to run (a delete on condition that there is no row never deletes).
    fn statement(&self, lock: i64) -> Option<(Query<'a>, bool)> {
        let t = self.table;
        Some(match (&self.op, self.condition) {
            (BatchOp::Put { body, columns }, condition) => {
                let (sql, version) = match condition {
                    Condition::Always => (t.upsert_sql(columns), None),
                    Condition::Matches(v) => (t.update_sql(columns), Some(v)),
                    Condition::Absent => (t.insert_sql(columns), None),
                };
                let q = sqlx::query(AssertSqlSafe(sql))
                    .bind(*body)
                    .bind(self.key)
                    .bind(lock);
                match version {
                    Some(v) => (q.bind(v.get()), false),
                    None => (q, false),
                }
            }
            (BatchOp::Delete, Condition::Always) => (
                sqlx::query(AssertSqlSafe(t.delete_sql.clone()))
                    .bind(self.key)
                    .bind(lock),
                true,
            ),
            (BatchOp::Delete, Condition::Matches(v)) => (
                sqlx::query(AssertSqlSafe(t.delete_if_match_sql.clone()))
                    .bind(self.key)
                    .bind(lock)
                    .bind(v.get()),
                true,
            ),
            (BatchOp::Delete, Condition::Absent) => return None,
        })
    }

    /// What the statement's row means: the committed write, or `None` when nothing was written.
    fn committed(&self, row: Option<&PgRow>) -> Result<Option<Committed>, DbError> {
        match (row, &self.op) {
            (Some(r), BatchOp::Put { .. }) => put_committed(r).map(Some),
            (Some(r), BatchOp::Delete) => Ok(Some(Committed {
                envelope: tombstone(r)?,
                created: false,
            })),
            (None, _) => Ok(None),
        }
    }

    /// Why nothing was written, given the row's `current` version.
    fn not_committed(&self, index: usize, current: Option<Version>) -> CommitFailure {
        match (&self.op, self.condition, current) {
            (BatchOp::Delete, Condition::Always | Condition::Absent, None) => {
                CommitFailure::NotFound { index }
            }
            _ => CommitFailure::Precondition { index, current },
        }
    }
}

enum BatchOp<'a> {
    /// `body`: the JSON object's text; `columns`: what `Table::check_body` accepted.
    Put {
        body: &'a str,
        columns: Vec<&'a str>,
    },
    Delete,
}

/// One configured table: read from the catalog on first use, again when a body names a column
/// it does not know (at most once a second).
#[derive(Default)]
struct TableSlot {
    table: std::sync::RwLock<Option<Arc<Table>>>,
    loading: tokio::sync::Mutex<()>,
    reloaded_at: Mutex<Option<Instant>>,
}

impl TableSlot {
    fn current(&self) -> Option<Arc<Table>> {
        self.table.read().unwrap().clone()
    }
}

/// How long a pooled connection may sit idle before it is pinged on its way out of the pool.
const IDLE_BEFORE_PING: Duration = Duration::from_millis(500);

/// Where a batch's transaction failed: only a failure at COMMIT may have committed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    Statements,
    Commit,
}

/// A statement failed (`index`: which), or the transaction itself (`None`).
fn failed(index: Option<usize>, error: DbError) -> CommitFailure {
    CommitFailure::Db {
        index,
        error,
        maybe_committed: false,
    }
}

pub struct Database {
    pool: PgPool,
    timeout: Duration,
    tables: Vec<TableSlot>,
    /// When a table was last found unreachable (not retried for a second by key checks, so that
    /// cached rows are served at once while the database is away).
    unreachable: Vec<Mutex<Option<Instant>>>,
    entities: Vec<Entity>,
}

impl Database {
    /// Builds the pool without connecting: the sidecar starts, and answers 503, when PostgreSQL
    /// is not up yet.
    pub fn new(config: &DatabaseConfig, entities: &[Entity]) -> Result<Self, sqlx::Error> {
        let mut options = PgConnectOptions::from_str(&config.url)?
            .options([("statement_timeout", config.statement_timeout_ms.to_string())])
            .application_name("wtc-sidecar");
        if let Some(ca) = &config.ca_file {
            // A CA given means "check the server": anything weaker than verify-ca would accept
            // any certificate and make the file pointless.
            if !matches!(options.get_ssl_mode(), PgSslMode::VerifyCa) {
                options = options.ssl_mode(PgSslMode::VerifyFull);
            }
            options = options.ssl_root_cert(ca);
        }
        if let (Some(cert), Some(key)) = (&config.client_cert_file, &config.client_key_file) {
            options = options.ssl_client_cert(cert).ssl_client_key(key);
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size)
            // A ping before every acquire costs a round trip per request. Only a connection that
            // sat idle for a while is pinged first: one that died meanwhile (a PostgreSQL restart)
            // is replaced instead of failing the next request with a 503. Busy connections are
            // not pinged; a broken one surfaces as an error on use, and the pool replaces it.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for < IDLE_BEFORE_PING {
                        return Ok(true);
                    }
                    Ok(sqlx::Connection::ping(conn).await.is_ok())
                })
            })
            .acquire_timeout(Duration::from_millis(
                config.statement_timeout_ms.min(2_000),
            ))
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            timeout: Duration::from_millis(config.statement_timeout_ms + 500),
            tables: entities.iter().map(|_| TableSlot::default()).collect(),
            unreachable: entities.iter().map(|_| Mutex::new(None)).collect(),
            entities: entities.to_vec(),
        })
    }

    /// How to open a connection of its own, as the pool does (the commit stream's).
    pub fn connect_options(&self) -> PgConnectOptions {
        (*self.pool.connect_options()).clone()
    }

    /// The table of `entity`, introspected on first use (the application may create or migrate
    /// it after the sidecar started). Failures are not remembered.
    async fn table(&self, entity: EntityId) -> Result<Arc<Table>, DbError> {
        let slot = &self.tables[entity.index()];
        if let Some(t) = slot.current() {
            return Ok(t);
        }
        let _loading = slot.loading.lock().await;
        if let Some(t) = slot.current() {
            return Ok(t);
        }
        // Boxed: the introspection's state is large and needed once; every caller's future
        // would otherwise carry it.
        let t = Arc::new(Box::pin(Table::load(&self.pool, &self.entities[entity.index()])).await?);
        *slot.table.write().unwrap() = Some(Arc::clone(&t));
        Ok(t)
    }

    /// The table introspected again (a column was added since), at most once a second per
    /// entity; `None` when it was reloaded less than a second ago.
    async fn reload(&self, entity: EntityId) -> Result<Option<Arc<Table>>, DbError> {
        let slot = &self.tables[entity.index()];
        let _loading = slot.loading.lock().await;
        {
            let mut at = slot.reloaded_at.lock().unwrap();
            if at.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Ok(None);
            }
            *at = Some(Instant::now());
        }
        let t = Arc::new(Box::pin(Table::load(&self.pool, &self.entities[entity.index()])).await?);
        *slot.table.write().unwrap() = Some(Arc::clone(&t));
        Ok(Some(t))
    }

    /// Runs one database call within the statement timeout (plus a margin: the server's
    /// `statement_timeout` normally answers first; this catches a connection that went silent).
    async fn within<T>(
        &self,
        call: impl Future<Output = Result<T, sqlx::Error>>,
        key_only: bool,
    ) -> Result<T, DbError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r.map_err(|e| db_error(e, key_only)),
            Err(_) => Err(DbError::Unavailable),
        }
    }

    async fn fetch_optional(
        &self,
        q: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        key_only: bool,
    ) -> Result<Option<PgRow>, DbError> {
        self.within(q.fetch_optional(&self.pool), key_only).await
    }

    /// One write, one statement, no transaction around it: any failure of the statement may be
    /// a commit whose answer was lost (outcome unknown).
    async fn commit_one(&self, s: &BatchStatement<'_>) -> Result<Committed, CommitFailure> {
        let failed = |error: DbError| CommitFailure::Db {
            index: Some(0),
            maybe_committed: error.outcome_unknown(),
            error,
        };
        s.table.check_key(s.key).map_err(failed)?;
        let lock = lock_key(&s.table.name, s.key);
        // The connection first: failing to get one means nothing was sent (the outcome is known).
        let mut conn =
            self.within(self.pool.acquire(), false)
                .await
                .map_err(|e| CommitFailure::Db {
                    index: None,
                    error: e.not_sent(),
                    maybe_committed: false,
                })?;
        let row = match s.statement(lock) {
            Some((q, key_only)) => self
                .within(q.fetch_optional(&mut *conn), key_only)
                .await
                .map_err(failed)?,
            None => None,
        };
        if let Some(committed) = s.committed(row.as_ref()).map_err(failed)? {
            return Ok(committed);
        }
        let q = sqlx::query(AssertSqlSafe(s.table.version_sql.clone())).bind(s.key);
        let current = self
            .within(q.fetch_optional(&mut *conn), true)
            .await
            .map_err(failed)?
            .map(|r| version(&r))
            .transpose()
            .map_err(failed)?;
        Err(s.not_committed(0, current))
    }

    /// Runs the writes of a batch in one transaction: all commit or none does. The statements run
    /// in the order of their advisory lock ids (not the order given), so that concurrent batches
    /// take their locks in one global order and cannot deadlock. The answer is in the order given.
    async fn write_batch(
        &self,
        items: &[BatchStatement<'_>],
    ) -> Result<Vec<Committed>, CommitFailure> {
        match Box::pin(self.write_batch_in(items, true)).await {
            // A set statement the database refused does not say which of its rows it refused:
            // the batch (rolled back) runs again one statement per item, to name it. Not a
            // refusal at COMMIT (a deferred constraint): that one names no statement either way.
            Err((
                CommitFailure::Db {
                    index: None,
                    error: DbError::Rejected(_) | DbError::BadKey(_),
                    maybe_committed: false,
                },
                Stage::Statements,
            )) => Box::pin(self.write_batch_in(items, false))
                .await
                .map_err(|(f, _)| f),
            other => other.map_err(|(f, _)| f),
        }
    }

    /// `grouped`: consecutive puts without If-Match to one table with the same columns run as one
    /// set statement (one round trip instead of one per item).
    async fn write_batch_in(
        &self,
        items: &[BatchStatement<'_>],
        grouped: bool,
    ) -> Result<Vec<Committed>, (CommitFailure, Stage)> {
        let out = self.run_statements(items, grouped).await;
        let (tx, out) = out.map_err(|f| (f, Stage::Statements))?;
        // Only a failure here may have committed nonetheless; every one before rolled back.
        self.within(tx.commit(), false).await.map_err(|error| {
            let failure = CommitFailure::Db {
                index: None,
                maybe_committed: error.outcome_unknown(),
                error,
            };
            (failure, Stage::Commit)
        })?;
        Ok(out)
    }

    /// The statements of a batch in one transaction, left open for `write_batch_in` to commit.
    async fn run_statements(
        &self,
        items: &[BatchStatement<'_>],
        grouped: bool,
    ) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, Vec<Committed>), CommitFailure> {
        let mut order: Vec<(i64, usize)> = items
            .iter()
            .enumerate()
            .map(|(i, s)| (lock_key(&s.table.name, s.key), i))
            .collect();
        order.sort_unstable();
        let mut tx = self
            .within(self.pool.begin(), false)
            .await
            .map_err(|e| failed(None, e.not_sent()))?;
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
            s.table.check_key(s.key).map_err(|e| failed(Some(i), e))?;
            let row = match s.statement(lock) {
                Some((q, key_only)) => self
                    .within(q.fetch_optional(&mut *tx), key_only)
                    .await
                    .map_err(|e| failed(Some(i), e))?,
                None => None,
            };
            let committed = match s.committed(row.as_ref()).map_err(|e| failed(Some(i), e))? {
                Some(c) => c,
                None => {
                    let q = sqlx::query(AssertSqlSafe(s.table.version_sql.clone())).bind(s.key);
                    let current = self
                        .within(q.fetch_optional(&mut *tx), true)
                        .await
                        .map_err(|e| failed(Some(i), e))?
                        .map(|r| version(&r))
                        .transpose()
                        .map_err(|e| failed(Some(i), e))?;
                    return Err(s.not_committed(i, current));
                }
            };
            out[i] = Some(committed);
        }
        let out = out
            .into_iter()
            .map(|c| c.ok_or_else(|| failed(None, DbError::Internal)))
            .collect::<Result<_, _>>()?;
        Ok((tx, out))
    }

    /// One set statement for a run of plain puts (`plain_put_run`); returns each row's position
    /// in `group` with what it committed.
    async fn upsert_group(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        items: &[BatchStatement<'_>],
        group: &[(i64, usize)],
    ) -> Result<Vec<(usize, Committed)>, CommitFailure> {
        let first = &items[group[0].1];
        let BatchOp::Put { columns, .. } = &first.op else {
            return Err(failed(None, DbError::Internal));
        };
        let mut bodies = Vec::with_capacity(group.len());
        let mut keys = Vec::with_capacity(group.len());
        let mut locks = Vec::with_capacity(group.len());
        for &(lock, i) in group {
            let s = &items[i];
            s.table.check_key(s.key).map_err(|e| failed(Some(i), e))?;
            let BatchOp::Put { body, .. } = &s.op else {
                return Err(failed(None, DbError::Internal));
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
                failed(
                    None,
                    if same_row {
                        DbError::Rejected("two keys of the batch name one row".into())
                    } else {
                        db_error(e, false)
                    },
                )
            })?,
            Err(_) => return Err(failed(None, DbError::Unavailable)),
        };
        if rows.len() != group.len() {
            return Err(failed(None, DbError::Internal));
        }
        rows.iter()
            .map(|r| {
                let ordinal: i64 = r
                    .try_get("o")
                    .map_err(|_| failed(None, DbError::Internal))?;
                let n = usize::try_from(ordinal - 1)
                    .ok()
                    .filter(|n| *n < group.len())
                    .ok_or_else(|| failed(None, DbError::Internal))?;
                let committed = put_committed(r).map_err(|e| failed(None, e))?;
                Ok((n, committed))
            })
            .collect()
    }
}

impl RowStore for Database {
    type Prepared = Prepared;

    async fn canonical_key<'a>(
        &'a self,
        entity: EntityId,
        key: &'a str,
    ) -> Result<KeyForm<'a>, DbError> {
        let table = match self.tables[entity.index()].current() {
            Some(t) => t,
            None => {
                let since = *self.unreachable[entity.index()].lock().unwrap();
                if since.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                    return Ok(KeyForm::Unchecked(key));
                }
                match self.table(entity).await {
                    Ok(t) => t,
                    Err(e @ DbError::Schema(_)) => return Err(e),
                    Err(_) => {
                        *self.unreachable[entity.index()].lock().unwrap() = Some(Instant::now());
                        return Ok(KeyForm::Unchecked(key));
                    }
                }
            }
        };
        table.canonical_key(key).map(KeyForm::Canonical)
    }

    async fn prepare(&self, write: &Write, key: &str) -> Result<Prepared, PrepareError> {
        let mut table = self.table(write.entity).await?;
        let columns = match &write.op {
            WriteOp::Put { body, .. } => {
                let checked = match table.check_body(body, key) {
                    // A column the application added since the table was read: read it again.
                    Err(BodyError::UnknownColumns(_)) => match self.reload(write.entity).await {
                        Ok(Some(fresh)) => {
                            table = fresh;
                            table.check_body(body, key)
                        }
                        _ => table.check_body(body, key),
                    },
                    other => other,
                };
                checked?.into_iter().map(str::to_string).collect()
            }
            WriteOp::Delete => vec![],
        };
        Ok(Prepared {
            table,
            columns,
            key: key.to_string(),
        })
    }

    async fn read(&self, entity: EntityId, key: &str) -> Result<Option<Envelope>, DbError> {
        let table = self.table(entity).await?;
        let key = table.canonical_key(key)?;
        let q = sqlx::query(AssertSqlSafe(table.read_sql.clone())).bind(key.as_ref());
        let row = self.fetch_optional(q, true).await?;
        row.map(|r| row_envelope(&r)).transpose()
    }

    async fn read_many(
        &self,
        entity: EntityId,
        keys: &[&str],
    ) -> Result<Vec<Option<Envelope>>, DbError> {
        let table = self.table(entity).await?;
        let keys: Vec<std::borrow::Cow<'_, str>> = keys
            .iter()
            .map(|k| table.canonical_key(k))
            .collect::<Result<_, _>>()?;
        let keys: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
        let q = sqlx::query(AssertSqlSafe(table.read_many_sql.clone())).bind(&keys);
        let rows = self.within(q.fetch_all(&self.pool), true).await?;
        let mut out = vec![None; keys.len()];
        for r in &rows {
            let i: i64 = r.try_get("i").map_err(|_| DbError::Internal)?;
            let slot = usize::try_from(i - 1)
                .ok()
                .and_then(|i| out.get_mut(i))
                .ok_or(DbError::Internal)?;
            *slot = Some(row_envelope(r)?);
        }
        Ok(out)
    }

    async fn commit(
        &self,
        writes: &[(&Write, &Prepared)],
    ) -> Result<Vec<Committed>, CommitFailure> {
        let items: Vec<BatchStatement<'_>> = writes
            .iter()
            .map(|(w, p)| BatchStatement {
                table: &p.table,
                key: &p.key,
                op: match &w.op {
                    WriteOp::Put { raw, .. } => BatchOp::Put {
                        body: raw,
                        columns: p.columns.iter().map(String::as_str).collect(),
                    },
                    WriteOp::Delete => BatchOp::Delete,
                },
                condition: w.condition,
            })
            .collect();
        match &items[..] {
            [] => Ok(vec![]),
            [one] => self.commit_one(one).await.map(|c| vec![c]),
            _ => self.write_batch(&items).await,
        }
    }

    async fn ping(&self) -> Result<(), String> {
        let q = sqlx::query("SELECT 1").fetch_one(&self.pool);
        match tokio::time::timeout(Duration::from_secs(1), q).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(error::unreachable_reason(&e)),
            Err(_) => Err("no answer within 1 s".into()),
        }
    }
}

/// A row as the statements return it: columns `d` (the row as JSON text), `v` (its version),
/// `a` (written at).
fn row_envelope(r: &PgRow) -> Result<Envelope, DbError> {
    let data: String = r.try_get("d").map_err(|_| DbError::Internal)?;
    let version: i64 = r.try_get("v").map_err(|_| DbError::Internal)?;
    let at: String = r.try_get("a").map_err(|_| DbError::Internal)?;
    Ok(Envelope::row(Version::new(version), &data, &at))
}

/// What a put returned: the row, and `created` (no row was there before).
fn put_committed(r: &PgRow) -> Result<Committed, DbError> {
    Ok(Committed {
        envelope: row_envelope(r)?,
        created: r.try_get("created").map_err(|_| DbError::Internal)?,
    })
}

/// A version as the statements return it (`v`).
fn version(r: &PgRow) -> Result<Version, DbError> {
    r.try_get::<i64, _>("v")
        .map(Version::new)
        .map_err(|_| DbError::Internal)
}

/// What a delete returned: the tombstone's version `v` and its time `a`.
fn tombstone(r: &PgRow) -> Result<Envelope, DbError> {
    let version: i64 = r.try_get("v").map_err(|_| DbError::Internal)?;
    let at: String = r.try_get("a").map_err(|_| DbError::Internal)?;
    Ok(Envelope::tombstone(Version::new(version), &at))
}

/// How many of `order`'s first statements are puts without If-Match to one table with the same
/// columns (at least 1 when `order` is not empty: the first counts itself).
fn plain_put_run(items: &[BatchStatement<'_>], order: &[(i64, usize)]) -> usize {
    let plain = |i: usize| match &items[i].op {
        BatchOp::Put { columns, .. } if items[i].condition == Condition::Always => Some(columns),
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
