//! In-memory stores with the semantics of the Redis scripts and of the SQL statements, and the
//! protocol's races of docs/protocol.md made to happen deterministically through the ports: no
//! PostgreSQL, no Redis, no process. (The end-to-end suites run the same races on the real
//! stores.) Gates stop a cache step or a fill of one key until the test lets it go.
//!
//! `MemoryCache::weakened` drops the two guards (version comparison and fill lease) as the
//! end-to-end suites' weakened build does: the tests below show the races then break the promise,
//! so they can fail.

use super::envelope::Envelope;
use super::metrics::Metrics;
use super::ports::{
    CacheError, CacheKey, CacheStore, CommitFailure, FillOutcome, InvalidateOutcome, Invalidation,
    KeyForm, LeaseEnd, LeaseToken, PrepareError, RowStore, Stale, StoreCall, StoreOutcome,
};
use super::protocol::Protocol;
use super::types::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use wtc_config::{Overrides, SidecarConfig};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Point {
    /// A filler read the database and is about to `FILL`.
    Fill,
    /// A write committed and is about to `STORE`.
    Store,
}

struct Gate {
    point: Point,
    entry: String,
    reached: Option<oneshot::Sender<()>>,
    go: Option<oneshot::Receiver<()>>,
}

/// A held request: `reached` resolves when it stops; `release` lets it go on.
struct Held {
    reached: oneshot::Receiver<()>,
    go: oneshot::Sender<()>,
}

impl Held {
    async fn reached(&mut self) {
        tokio::time::timeout(Duration::from_secs(5), &mut self.reached)
            .await
            .expect("the request reached the gate")
            .expect("gate alive");
    }

    fn release(self) {
        let _ = self.go.send(());
    }
}

#[derive(Default)]
pub(crate) struct MemoryCache {
    entries: Mutex<HashMap<String, Vec<u8>>>,
    leases: Mutex<HashMap<String, String>>,
    gates: Mutex<Vec<Gate>>,
    /// Every call fails (Redis away) while set.
    failing: AtomicBool,
    /// STORE and FILL as plain SETs (no CAS, no lease).
    weakened: bool,
    /// Lease requests (one per key asked) and polls for another filler's value, for P4's cost.
    lease_requests: AtomicUsize,
    peeks: AtomicUsize,
    /// What `PTTL` answers (0: a minute), and how often it was asked.
    ttl_left_ms: AtomicI64,
    ttl_lookups: AtomicUsize,
}

/// The version prefix the scripts read (`{"v":N,`); `None` when it does not parse.
fn prefix_version(bytes: &[u8]) -> Option<i64> {
    let rest = bytes.strip_prefix(b"{\"v\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

impl MemoryCache {
    /// What is stored under `key`'s entry.
    pub(crate) fn entry_bytes(&self, key: &CacheKey) -> Option<Vec<u8>> {
        self.entries.lock().unwrap().get(&key.entry).cloned()
    }

    fn weakened() -> Self {
        Self {
            weakened: true,
            ..Self::default()
        }
    }

    fn gate(&self, point: Point, entity: &str, key: &str) -> Held {
        let (reached_tx, reached) = oneshot::channel();
        let (go, go_rx) = oneshot::channel();
        self.gates.lock().unwrap().push(Gate {
            point,
            entry: CacheKey::new(entity, key).entry,
            reached: Some(reached_tx),
            go: Some(go_rx),
        });
        Held { reached, go }
    }

    async fn pass(&self, point: Point, key: &CacheKey) {
        let go = {
            let mut gates = self.gates.lock().unwrap();
            let Some(i) = gates
                .iter()
                .position(|g| g.point == point && g.entry == key.entry)
            else {
                return;
            };
            let mut g = gates.remove(i);
            if let Some(r) = g.reached.take() {
                let _ = r.send(());
            }
            g.go.take()
        };
        if let Some(go) = go {
            let _ = go.await;
        }
    }

    fn check(&self) -> Result<(), CacheError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(CacheError::Failed("the test cut the cache off".into()))
        } else {
            Ok(())
        }
    }

    fn version_of(&self, entity: &str, key: &str) -> Option<i64> {
        let entry = CacheKey::new(entity, key).entry;
        self.entries
            .lock()
            .unwrap()
            .get(&entry)
            .and_then(|b| prefix_version(b))
    }

    fn put_entry(&self, entity: &str, key: &str, bytes: &[u8]) {
        let entry = CacheKey::new(entity, key).entry;
        self.entries.lock().unwrap().insert(entry, bytes.to_vec());
    }

    fn remove(&self, key: &CacheKey) {
        self.entries.lock().unwrap().remove(&key.entry);
        self.leases.lock().unwrap().remove(&key.lease);
    }

    /// The `STORE` script.
    fn store_one(&self, s: &StoreCall<'_>) -> StoreOutcome {
        let mut entries = self.entries.lock().unwrap();
        let mut leases = self.leases.lock().unwrap();
        let new = s.envelope.version.get();
        let outcome = if self.weakened {
            entries.insert(s.key.entry.clone(), s.envelope.bytes.to_vec());
            StoreOutcome::Stored
        } else {
            match entries.get(&s.key.entry) {
                Some(cur) if prefix_version(cur).is_none_or(|v| v < new) => {
                    entries.insert(s.key.entry.clone(), s.envelope.bytes.to_vec());
                    StoreOutcome::Stored
                }
                Some(_) => StoreOutcome::Stale,
                None if s.intent.is_some_and(|t| {
                    leases.get(&s.key.lease).map(String::as_str) == Some(t.as_str())
                }) =>
                {
                    entries.insert(s.key.entry.clone(), s.envelope.bytes.to_vec());
                    StoreOutcome::Stored
                }
                None => StoreOutcome::Skipped,
            }
        };
        leases.remove(&s.key.lease);
        outcome
    }

    /// The `FILL` and `RELEASE` scripts.
    fn end_one(&self, e: &LeaseEnd<'_>) -> Option<FillOutcome> {
        let mut entries = self.entries.lock().unwrap();
        let mut leases = self.leases.lock().unwrap();
        match e {
            LeaseEnd::Fill {
                key,
                envelope,
                token,
                ..
            } => {
                if self.weakened {
                    entries.insert(key.entry.clone(), envelope.bytes.to_vec());
                    return Some(FillOutcome::Stored);
                }
                if leases.get(&key.lease).map(String::as_str) != Some(token.as_str()) {
                    return Some(FillOutcome::LeaseLost);
                }
                leases.remove(&key.lease);
                if entries
                    .get(&key.entry)
                    .and_then(|c| prefix_version(c))
                    .is_some_and(|v| v > envelope.version.get())
                {
                    return Some(FillOutcome::Stale);
                }
                entries.insert(key.entry.clone(), envelope.bytes.to_vec());
                Some(FillOutcome::Stored)
            }
            LeaseEnd::Release { key, token } => {
                if leases.get(&key.lease).map(String::as_str) == Some(token.as_str()) {
                    leases.remove(&key.lease);
                }
                None
            }
        }
    }
}

impl CacheStore for MemoryCache {
    fn is_up(&self) -> bool {
        !self.failing.load(Ordering::SeqCst)
    }

    async fn get(
        &self,
        key: &CacheKey,
        with_ttl: bool,
    ) -> Result<(Cached, Option<i64>), CacheError> {
        self.check()?;
        let v = self.entries.lock().unwrap().get(&key.entry).cloned();
        if !with_ttl {
            return Ok((Cached::from_stored(v), None));
        }
        self.ttl_lookups.fetch_add(1, Ordering::SeqCst);
        let left = match self.ttl_left_ms.load(Ordering::SeqCst) {
            0 => 60_000,
            ms => ms,
        };
        Ok((Cached::from_stored(v), Some(left)))
    }

    async fn get_many(&self, keys: &[&CacheKey]) -> Result<Vec<Cached>, CacheError> {
        self.check()?;
        let entries = self.entries.lock().unwrap();
        Ok(keys
            .iter()
            .map(|k| Cached::from_stored(entries.get(&k.entry).cloned()))
            .collect())
    }

    async fn peek(&self, key: &CacheKey) -> Result<(Cached, bool), CacheError> {
        self.check()?;
        self.peeks.fetch_add(1, Ordering::SeqCst);
        let v = self.entries.lock().unwrap().get(&key.entry).cloned();
        let held = self.leases.lock().unwrap().contains_key(&key.lease);
        Ok((Cached::from_stored(v), held))
    }

    async fn acquire_leases(
        &self,
        leases: &[(&CacheKey, &LeaseToken)],
        _ttl: Duration,
    ) -> Result<Vec<(bool, Cached)>, CacheError> {
        self.check()?;
        let mut out = Vec::new();
        for (key, token) in leases {
            self.lease_requests.fetch_add(1, Ordering::SeqCst);
            let won = {
                let mut l = self.leases.lock().unwrap();
                if l.contains_key(&key.lease) {
                    false
                } else {
                    l.insert(key.lease.clone(), token.as_str().to_string());
                    true
                }
            };
            let v = self.entries.lock().unwrap().get(&key.entry).cloned();
            out.push((won, Cached::from_stored(v)));
        }
        Ok(out)
    }

    async fn write_intents(
        &self,
        intents: &[(&CacheKey, &LeaseToken)],
        _ttl: Duration,
    ) -> Result<(), CacheError> {
        self.check()?;
        let mut l = self.leases.lock().unwrap();
        for (key, token) in intents {
            l.insert(key.lease.clone(), token.as_str().to_string());
        }
        Ok(())
    }

    async fn store(
        &self,
        stores: &[StoreCall<'_>],
        evict: &[&CacheKey],
    ) -> Result<Vec<StoreOutcome>, CacheError> {
        for s in stores {
            self.pass(Point::Store, s.key).await;
        }
        self.check()?;
        let out = stores.iter().map(|s| self.store_one(s)).collect();
        for k in evict {
            self.remove(k);
        }
        Ok(out)
    }

    async fn end_leases(
        &self,
        ends: &[LeaseEnd<'_>],
    ) -> Result<Vec<Option<FillOutcome>>, CacheError> {
        for e in ends {
            if let LeaseEnd::Fill { key, .. } = e {
                self.pass(Point::Fill, key).await;
            }
        }
        self.check()?;
        Ok(ends.iter().map(|e| self.end_one(e)).collect())
    }

    async fn invalidate(
        &self,
        items: &[Invalidation<'_>],
    ) -> Result<Vec<InvalidateOutcome>, CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        let mut leases = self.leases.lock().unwrap();
        Ok(items
            .iter()
            .map(|i| {
                leases.remove(&i.key.lease);
                let Some(cur) = entries.get(&i.key.entry) else {
                    return InvalidateOutcome::Absent;
                };
                let v = prefix_version(cur);
                let stale = match (i.stale, v) {
                    (Stale::Any, _) | (_, None) => true,
                    (Stale::Below(b), Some(v)) => v < b.get(),
                    (Stale::AtMost(b), Some(v)) => v <= b.get(),
                };
                if stale {
                    entries.remove(&i.key.entry);
                    InvalidateOutcome::Evicted
                } else {
                    InvalidateOutcome::Kept
                }
            })
            .collect())
    }

    async fn evict(&self, keys: &[&CacheKey]) -> Result<(), CacheError> {
        self.check()?;
        for k in keys {
            self.remove(k);
        }
        Ok(())
    }

    async fn sweep(&self) -> Result<(), CacheError> {
        self.check()?;
        self.entries.lock().unwrap().clear();
        self.leases.lock().unwrap().clear();
        Ok(())
    }

    async fn repair_evict(&self, key: &CacheKey) -> Result<(), CacheError> {
        self.check()?;
        self.remove(key);
        Ok(())
    }
}

/// Rows of one table per entity, versions from one sequence, writes all-or-none. Keys are
/// integers (`042` and `42` are one row) when `integer_keys` is set, else text.
#[derive(Default)]
pub(crate) struct MemoryRows {
    rows: Mutex<HashMap<(EntityId, String), (Version, String)>>,
    sequence: AtomicI64,
    reads: AtomicUsize,
    integer_keys: bool,
}

impl MemoryRows {
    fn row(&self, entity: EntityId, key: &str) -> Option<Envelope> {
        self.rows
            .lock()
            .unwrap()
            .get(&(entity, key.to_string()))
            .map(|(v, data)| Envelope::row(*v, data, "2026-11-29T00:00:00Z"))
    }
}

impl RowStore for MemoryRows {
    type Prepared = String;

    async fn canonical_key<'a>(
        &'a self,
        _entity: EntityId,
        key: &'a str,
    ) -> Result<KeyForm<'a>, DbError> {
        if !self.integer_keys {
            return Ok(KeyForm::Canonical(key.into()));
        }
        match key.trim().parse::<i64>() {
            Ok(n) => Ok(KeyForm::Canonical(n.to_string().into())),
            Err(_) => Err(DbError::BadKey(format!("key {key:?} is not an integer"))),
        }
    }

    async fn prepare(&self, _write: &Write, key: &str) -> Result<String, PrepareError> {
        Ok(key.to_string())
    }

    async fn read(&self, entity: EntityId, key: &str) -> Result<Option<Envelope>, DbError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        // A database read takes a moment: concurrent readers of one key overlap.
        tokio::task::yield_now().await;
        Ok(self.row(entity, key))
    }

    async fn read_many(
        &self,
        entity: EntityId,
        keys: &[&str],
    ) -> Result<Vec<Option<Envelope>>, DbError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(keys.iter().map(|k| self.row(entity, k)).collect())
    }

    async fn commit(&self, writes: &[(&Write, &String)]) -> Result<Vec<Committed>, CommitFailure> {
        let mut rows = self.rows.lock().unwrap();
        for (index, (w, key)) in writes.iter().enumerate() {
            let current = rows.get(&(w.entity, key.to_string())).map(|(v, _)| *v);
            match (w.condition, current) {
                (Condition::Matches(v), c) if c != Some(v) => {
                    return Err(CommitFailure::Precondition { index, current });
                }
                (Condition::Absent, Some(_)) => {
                    return Err(CommitFailure::Precondition { index, current });
                }
                _ => {}
            }
            if matches!(w.op, WriteOp::Delete) && current.is_none() {
                return Err(CommitFailure::NotFound { index });
            }
        }
        let mut out = Vec::new();
        for (w, key) in writes {
            let version = Version::new(self.sequence.fetch_add(1, Ordering::SeqCst) + 1);
            let id = (w.entity, key.to_string());
            out.push(match &w.op {
                WriteOp::Put { raw, .. } => {
                    let created = rows.insert(id, (version, raw.clone())).is_none();
                    Committed {
                        envelope: Envelope::row(version, raw, "2026-11-29T00:00:00Z"),
                        created,
                    }
                }
                WriteOp::Delete => {
                    rows.remove(&id);
                    Committed {
                        envelope: Envelope::tombstone(version, "2026-11-29T00:00:00Z"),
                        created: false,
                    }
                }
            });
        }
        Ok(out)
    }

    async fn ping(&self) -> Result<(), String> {
        Ok(())
    }
}

pub(crate) type Mem = Protocol<MemoryCache, MemoryRows>;

fn protocol_with(cache: MemoryCache) -> Arc<Mem> {
    protocol_of(cache, MemoryRows::default())
}

fn protocol_of(cache: MemoryCache, rows: MemoryRows) -> Arc<Mem> {
    protocol_with_beta(cache, rows, 0.0)
}

/// `beta`: `cache.early_expiration_beta` (0: no early refresh, so that hits stay hits).
fn protocol_with_beta(cache: MemoryCache, rows: MemoryRows, beta: f64) -> Arc<Mem> {
    protocol_configured(cache, rows, beta, |_| {})
}

/// An in-memory protocol whose configuration `edit` changed (entity `accounts`).
pub(crate) fn protocol_edited(edit: impl FnOnce(&mut SidecarConfig)) -> Arc<Mem> {
    protocol_configured(MemoryCache::default(), MemoryRows::default(), 0.0, edit)
}

fn protocol_configured(
    cache: MemoryCache,
    rows: MemoryRows,
    beta: f64,
    edit: impl FnOnce(&mut SidecarConfig),
) -> Arc<Mem> {
    let mut config = SidecarConfig::parse(
        &format!(
            "[database]\nurl = \"postgres://u@127.0.0.1:1/db\"\n\
             [redis]\nurl = \"redis://127.0.0.1:1\"\n\
             [cache]\nlease_wait_ms = 50\nearly_expiration_beta = {beta:?}\n\
             [cache.retry]\nretries = 0\n\
             [[entities]]\nname = \"accounts\"\ntable = \"accounts\"\n"
        ),
        &Overrides::default(),
    )
    .expect("config");
    edit(&mut config);
    Arc::new(Protocol::new(
        config,
        cache,
        rows,
        Metrics::new(&["accounts"]),
    ))
}

fn protocol() -> Arc<Mem> {
    protocol_with(MemoryCache::default())
}

const A: EntityId = EntityId::new(0);

/// Spawns a read of `key`.
fn spawn_read(p: &Arc<Mem>, key: &'static str) -> tokio::task::JoinHandle<ReadOutcome> {
    let p = Arc::clone(p);
    tokio::spawn(async move { p.read(A, key).await.unwrap() })
}

/// A read of `key` (not cached) that won the lease and read the row, held before its fill.
async fn reader_held_before_fill(
    p: &Arc<Mem>,
    key: &'static str,
) -> (tokio::task::JoinHandle<ReadOutcome>, Held) {
    let mut held = p.cache.gate(Point::Fill, "accounts", key);
    let reader = spawn_read(p, key);
    held.reached().await;
    (reader, held)
}

async fn put(p: &Mem, key: &str, n: i64) -> (Version, CacheStatus) {
    let raw = format!("{{\"n\":{n}}}");
    let body = serde_json::from_str(&raw).unwrap();
    match p.put(A, key, body, raw, Condition::Always).await.unwrap() {
        WriteOutcome::Committed {
            envelope, status, ..
        } => (envelope.version, status),
        other => panic!("{other:?}"),
    }
}

fn evict(p: &Mem, key: &str) {
    p.cache.remove(&CacheKey::new("accounts", key));
}

/// A reader read v1 under its lease; a write of v2 is acknowledged `ok`; the key is evicted; the
/// reader's fill comes last. Returns the version the cache then holds.
async fn slow_filler_race(p: Arc<Mem>) -> Option<i64> {
    let (v1, _) = put(&p, "k", 1).await;
    evict(&p, "k");
    let (reader, held) = reader_held_before_fill(&p, "k").await;
    let (v2, status) = put(&p, "k", 2).await;
    assert_eq!(status, CacheStatus::Ok);
    evict(&p, "k");
    held.release();
    let seen = reader.await.unwrap();
    assert_eq!(
        seen.envelope.unwrap().version,
        v1,
        "it began before the write"
    );
    assert!(v2 > v1);
    p.cache.version_of("accounts", "k")
}

#[tokio::test]
async fn a_slow_filler_cannot_install_a_row_older_than_an_acknowledged_write() {
    let p = protocol();
    assert_eq!(
        slow_filler_race(Arc::clone(&p)).await,
        None,
        "the old fill was refused"
    );
    assert_eq!(p.metrics.entity(A).fill_lost_lease.get(), 1);
    let after = p.read(A, "k").await.unwrap();
    assert_eq!(after.envelope.unwrap().version, Version::new(2));
}

#[tokio::test]
async fn without_the_lease_the_slow_filler_race_serves_a_stale_row() {
    // The same race against the weakened store: the test above can fail.
    let p = protocol_with(MemoryCache::weakened());
    assert_eq!(
        slow_filler_race(p).await,
        Some(1),
        "v1 is back in the cache"
    );
}

/// Write A committed v1 and stalls before its cache step; write B commits v2 and is acknowledged;
/// then `between` runs; then A's cache step. Returns A's status and what the cache holds.
async fn late_writer_race(p: Arc<Mem>, evict_between: bool) -> (CacheStatus, Option<i64>) {
    put(&p, "k", 0).await;
    let mut held = p.cache.gate(Point::Store, "accounts", "k");
    let a = tokio::spawn({
        let p = Arc::clone(&p);
        async move { put(&p, "k", 1).await }
    });
    held.reached().await;
    let (v_b, status) = put(&p, "k", 2).await;
    assert_eq!(status, CacheStatus::Ok);
    assert_eq!(p.cache.version_of("accounts", "k"), Some(v_b.get()));
    if evict_between {
        evict(&p, "k");
    }
    held.release();
    let (v_a, a_status) = a.await.unwrap();
    assert!(v_a < v_b);
    (a_status, p.cache.version_of("accounts", "k"))
}

#[tokio::test]
async fn a_late_cache_step_after_a_newer_write_changes_nothing() {
    let p = protocol();
    let (status, cached) = late_writer_race(Arc::clone(&p), false).await;
    assert_eq!(status, CacheStatus::Ok, "stale is a clean outcome");
    assert_eq!(cached, Some(3));
    let p = protocol_with(MemoryCache::weakened());
    assert_eq!(
        late_writer_race(p, false).await.1,
        Some(2),
        "weakened: v_a overwrote v_b"
    );
}

#[tokio::test]
async fn a_late_cache_step_into_an_evicted_slot_is_skipped() {
    // The empty-slot rule: B's intent and cache step took A's lease away.
    let p = protocol();
    let (_, cached) = late_writer_race(Arc::clone(&p), true).await;
    assert_eq!(cached, None);
    assert_eq!(
        p.read(A, "k").await.unwrap().envelope.unwrap().version,
        Version::new(3)
    );
}

#[tokio::test]
async fn concurrent_misses_read_the_database_once() {
    let p = protocol();
    put(&p, "k", 1).await;
    evict(&p, "k");
    let reads_before = p.rows.reads.load(Ordering::SeqCst);
    let (first, held) = reader_held_before_fill(&p, "k").await;
    // The first flight is sealed: these readers share the next one, which waits for its turn.
    let others: Vec<_> = (0..100).map(|_| spawn_read(&p, "k")).collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    held.release();
    first.await.unwrap();
    for o in others {
        let out = o.await.unwrap();
        assert_eq!(out.status, CacheStatus::Hit, "the fill was waited for");
    }
    assert_eq!(p.rows.reads.load(Ordering::SeqCst) - reads_before, 1, "P4");
    // A herd costs the cache per flight, not per reader: the filler's lease, then one lease
    // request of the next flight, which finds the fill; nobody polls.
    assert_eq!(p.cache.lease_requests.load(Ordering::SeqCst), 2);
    assert_eq!(p.cache.peeks.load(Ordering::SeqCst), 0);
    assert_eq!(p.metrics.entity(A).fill_waited.get(), 1);
}

#[tokio::test]
async fn a_cancelled_reader_hands_its_flight_to_the_others() {
    let p = protocol();
    let (v1, _) = put(&p, "k", 1).await;
    evict(&p, "k");
    let (first, held) = reader_held_before_fill(&p, "k").await;
    // The next flight's observer (the first of its readers to run) goes away while it waits
    // for its turn; the flight's other reader observes in its place.
    let observer = spawn_read(&p, "k");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let other = spawn_read(&p, "k");
    tokio::time::sleep(Duration::from_millis(5)).await;
    observer.abort();
    held.release();
    first.await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(5), other)
        .await
        .expect("the flight did not wait for its cancelled observer")
        .unwrap();
    assert_eq!(out.status, CacheStatus::Hit);
    assert_eq!(out.envelope.unwrap().version, v1);
    assert_eq!(p.flights.keys(), 0, "a flight outlived its readers");
}

#[tokio::test]
async fn readers_that_go_away_leave_no_flight_behind() {
    // A client that asks for many cold keys and hangs up while its reads wait must not grow the
    // flights without bound.
    let p = protocol();
    put(&p, "k", 1).await;
    evict(&p, "k");
    let (first, held) = reader_held_before_fill(&p, "k").await;
    // Readers of the next flight, gone while it waits for its turn.
    let gone: Vec<_> = (0..3).map(|_| spawn_read(&p, "k")).collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    for g in &gone {
        g.abort();
    }
    for g in gone {
        let _ = g.await;
    }
    // The first flight still observes: the key keeps its turn, and a new reader waits for it
    // rather than taking a lease beside the observer.
    assert_eq!(p.flights.keys(), 1);
    let leases = p.cache.lease_requests.load(Ordering::SeqCst);
    let late = spawn_read(&p, "k");
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        p.cache.lease_requests.load(Ordering::SeqCst),
        leases,
        "a reader observed beside the flight that holds the turn"
    );
    held.release();
    first.await.unwrap();
    assert_eq!(late.await.unwrap().status, CacheStatus::Hit);
    assert_eq!(
        p.flights.keys(),
        0,
        "flights left behind by readers that went away"
    );
}

#[tokio::test]
async fn a_minimum_version_passes_an_older_cached_row() {
    let p = protocol();
    let (v1, _) = put(&p, "k", 1).await;
    // A newer row the cache does not know about (a repairing write, or another writer).
    let v2 = Version::new(v1.get() + 10);
    p.rows
        .rows
        .lock()
        .unwrap()
        .insert((A, "k".into()), (v2, "{\"n\":2}".into()));
    let hit = p.read(A, "k").await.unwrap();
    assert_eq!(
        (hit.status, hit.envelope.unwrap().version),
        (CacheStatus::Hit, v1)
    );
    let fresh = p.read_at_least(A, "k", Some(v2)).await.unwrap();
    assert_eq!(fresh.envelope.unwrap().version, v2);
    assert_eq!(
        p.cache.version_of("accounts", "k"),
        Some(v2.get()),
        "the fill replaced v1"
    );
}

#[tokio::test]
async fn a_corrupt_entry_is_never_served_and_is_replaced() {
    let p = protocol();
    put(&p, "k", 1).await;
    p.cache
        .put_entry("accounts", "k", b"{\"v\":99999,\"oops\":1}");
    let out = p.read(A, "k").await.unwrap();
    assert_eq!(out.status, CacheStatus::Miss);
    assert_eq!(out.envelope.unwrap().version, Version::new(1));
    assert_eq!(p.metrics.corrupt_entries.get(), 1);
    assert_eq!(
        p.cache.version_of("accounts", "k"),
        Some(1),
        "filled after the eviction"
    );
}

#[tokio::test]
async fn a_failed_cache_step_repairs_and_reads_bypass_until_repaired() {
    let p = protocol();
    put(&p, "k", 1).await;
    p.cache.failing.store(true, Ordering::SeqCst);
    let (v2, status) = put(&p, "k", 2).await;
    assert_eq!(status, CacheStatus::Repairing);
    assert_eq!(p.repairs_pending(), 1);
    p.cache.failing.store(false, Ordering::SeqCst);
    // The old entry is still in the cache; this sidecar does not serve it.
    assert_eq!(p.cache.version_of("accounts", "k"), Some(1));
    let out = p.read(A, "k").await.unwrap();
    assert_eq!(
        (out.status, out.envelope.unwrap().version),
        (CacheStatus::Bypass, v2)
    );
    p.repair_once().await;
    assert_eq!(p.repairs_pending(), 0);
    assert_eq!(p.cache.version_of("accounts", "k"), None, "evicted");
    assert_eq!(p.read(A, "k").await.unwrap().status, CacheStatus::Miss);
}

#[tokio::test]
async fn a_refused_batch_commits_nothing_and_gives_its_intents_back() {
    let p = protocol();
    let (v1, _) = put(&p, "a", 1).await;
    let write = |key: &str, if_match: Option<Version>| Write {
        entity: A,
        key: key.into(),
        op: WriteOp::Put {
            body: serde_json::Map::new(),
            raw: "{}".into(),
        },
        condition: if_match.map_or(Condition::Always, Condition::Matches),
    };
    let batch = Batch {
        writes: vec![
            write("b", None),
            write("a", Some(Version::new(v1.get() + 1))),
        ],
        invalidate: vec![],
    };
    match p.write_batch(&batch).await {
        Err(BatchError::PreconditionFailed { index: 1, current }) => assert_eq!(current, Some(v1)),
        other => panic!("{other:?}"),
    }
    assert!(p.rows.row(A, "b").is_none(), "nothing committed");
    assert!(
        p.cache.leases.lock().unwrap().is_empty(),
        "intents given back"
    );
    let dup = Batch {
        writes: vec![write("x", None), write("x", None)],
        invalidate: vec![],
    };
    assert!(matches!(
        p.write_batch(&dup).await,
        Err(BatchError::DuplicateKey { first: 0, index: 1 })
    ));
}

#[tokio::test]
async fn a_bulk_read_serves_hits_and_fills_misses_under_leases() {
    let p = protocol();
    put(&p, "a", 1).await;
    put(&p, "b", 2).await;
    evict(&p, "b");
    let keys: Vec<String> = ["a", "b", "nope", "a"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = p.read_many(A, &keys).await.unwrap();
    let statuses: Vec<_> = out.iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        [
            CacheStatus::Hit,
            CacheStatus::Miss,
            CacheStatus::Miss,
            CacheStatus::Hit
        ]
    );
    assert!(out[2].envelope.is_none());
    assert_eq!(p.cache.version_of("accounts", "b"), Some(2), "filled");
    assert!(
        p.cache.leases.lock().unwrap().is_empty(),
        "no lease left behind"
    );
    assert_eq!(CacheStatus::summary(&out), CacheStatus::Miss);
}

#[tokio::test]
async fn a_reader_after_an_acknowledged_write_does_not_share_an_older_flight() {
    // R1's flight read v1 and stalls before its fill; a write of v2 is acknowledged; the entry is
    // evicted; R2 misses. R1's flight is sealed (it looked before R2 arrived), so R2 starts its
    // own and sees v2, not R1's v1.
    let p = protocol();
    let (v1, _) = put(&p, "k", 1).await;
    evict(&p, "k");
    let (r1, held) = reader_held_before_fill(&p, "k").await;
    let (v2, status) = put(&p, "k", 2).await;
    assert_eq!(status, CacheStatus::Ok);
    evict(&p, "k");
    let r2 = spawn_read(&p, "k");
    // R2 has either finished on its own flight, or (wrongly) joined R1's and waits for it.
    tokio::time::sleep(Duration::from_millis(20)).await;
    held.release();
    assert_eq!(r1.await.unwrap().envelope.unwrap().version, v1);
    let r2 = r2.await.unwrap();
    assert_eq!(
        r2.envelope.unwrap().version,
        v2,
        "P2: no older version after the ack"
    );
}

#[tokio::test]
async fn every_spelling_of_a_key_names_one_cache_entry() {
    let rows = MemoryRows {
        integer_keys: true,
        ..MemoryRows::default()
    };
    let p = protocol_of(MemoryCache::default(), rows);
    let (v1, _) = put(&p, "42", 1).await;
    let hit = p.read(A, "042").await.unwrap();
    assert_eq!(
        (hit.status, hit.envelope.unwrap().version),
        (CacheStatus::Hit, v1)
    );
    let (v2, status) = put(&p, "+42", 2).await;
    assert_eq!(status, CacheStatus::Ok);
    for spelling in ["42", "042", " 42"] {
        let out = p.read(A, spelling).await.unwrap();
        assert_eq!(
            out.envelope.unwrap().version,
            v2,
            "{spelling:?} read an older row"
        );
    }
    assert_eq!(p.cache.entries.lock().unwrap().len(), 1, "one entry");
    let out = p
        .read_many(A, &["42".into(), "0042".into(), "7".into()])
        .await
        .unwrap();
    assert_eq!(out[1].envelope.as_ref().unwrap().version, v2);
    let write = |key: &str| Write {
        entity: A,
        key: key.into(),
        op: WriteOp::Delete,
        condition: Condition::Always,
    };
    let batch = Batch {
        writes: vec![write("7"), write("007")],
        invalidate: vec![],
    };
    assert!(matches!(
        p.write_batch(&batch).await,
        Err(BatchError::DuplicateKey { first: 0, index: 1 })
    ));
    assert!(matches!(p.read(A, "4x2").await, Err(DbError::BadKey(_))));
    assert!(
        p.cache.leases.lock().unwrap().is_empty(),
        "a bad key touches no lease"
    );
}

#[tokio::test]
async fn an_entry_near_its_end_is_refreshed_early_and_a_young_one_is_not() {
    let p = protocol_with_beta(MemoryCache::default(), MemoryRows::default(), 1.0);
    let (v1, _) = put(&p, "k", 1).await;
    let reads = || p.rows.reads.load(Ordering::SeqCst);
    let before = reads();
    // A minute left: XFetch's chance per hit is e^-60000; no refresh.
    for _ in 0..400 {
        let out = p.read(A, "k").await.unwrap();
        assert_eq!(out.status, CacheStatus::Hit);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(reads(), before, "a young entry was refreshed");
    assert_eq!(p.cache.ttl_lookups.load(Ordering::SeqCst), 400);
    // A millisecond left: a hit refreshes it (the database read, and a fill that renews the
    // entry although it is there).
    p.cache.ttl_left_ms.store(1, Ordering::SeqCst);
    let filled = p.metrics.entity(A).fill_won.get();
    for _ in 0..400 {
        assert_eq!(p.read(A, "k").await.unwrap().status, CacheStatus::Hit);
        tokio::task::yield_now().await;
        if p.metrics.entity(A).fill_won.get() > filled {
            break;
        }
    }
    for _ in 0..100 {
        if p.metrics.entity(A).fill_won.get() > filled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        reads() > before,
        "an entry about to expire was not refreshed"
    );
    assert!(
        p.metrics.entity(A).fill_won.get() > filled,
        "the refresh read the row but did not renew the entry"
    );
    assert_eq!(p.cache.version_of("accounts", "k"), Some(v1.get()));
}

#[tokio::test]
async fn a_reader_that_goes_away_gives_its_lease_back() {
    let p = protocol();
    put(&p, "k", 1).await;
    evict(&p, "k");
    // It won the lease and read the row; its client hangs up before the fill.
    let (gone, _held) = reader_held_before_fill(&p, "k").await;
    gone.abort();
    let _ = gone.await;
    let lease = CacheKey::new("accounts", "k").lease;
    let mut given_back = false;
    for _ in 0..200 {
        if !p.cache.leases.lock().unwrap().contains_key(&lease) {
            given_back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(given_back, "the lease outlived its reader");
    // The next reader wins it and fills, instead of waiting for a fill that never comes.
    let out = p.read(A, "k").await.unwrap();
    assert_eq!(out.status, CacheStatus::Miss);
    assert_eq!(p.metrics.entity(A).fill_won.get(), 1);
    assert_eq!(p.metrics.entity(A).fill_waited.get(), 0);
}

#[tokio::test]
async fn a_burst_of_early_refreshes_reads_the_row_once() {
    // Every hit decides to refresh (an entry about to expire, a huge beta); the refreshes spawned
    // by a burst of hits must not queue behind each other and read the row again.
    let p = protocol_with_beta(MemoryCache::default(), MemoryRows::default(), 1e9);
    put(&p, "k", 1).await;
    p.cache.ttl_left_ms.store(1, Ordering::SeqCst);
    let mut held = p.cache.gate(Point::Fill, "accounts", "k");
    let before = p.rows.reads.load(Ordering::SeqCst);
    for _ in 0..50 {
        assert_eq!(p.read(A, "k").await.unwrap().status, CacheStatus::Hit);
    }
    // The first refresh read the row and waits before its fill; the others found it in flight.
    held.reached().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    held.release();
    p.finish_refreshes().await;
    assert_eq!(p.rows.reads.load(Ordering::SeqCst) - before, 1);
    assert_eq!(p.metrics.entity(A).fill_won.get(), 1);
}
