//! Hold points and the weakened protocol: wrappers around the sidecar's cache port, used by the
//! end-to-end suites' sidecar (`src/bin/wtc-sidecar-under-test.rs`). Nothing of this is in the
//! shipped crate: a release build has no hold point and no switch that weakens the protocol.
//!
//! A hold stops the first request that reaches its point for its key, until the test lets it go;
//! this is how the races of docs/protocol.md are made to happen on purpose:
//! - `FILL_BEFORE_STORE`: a filler read the database and is about to fill (the `FILL` of its
//!   lease);
//! - `WRITE_BEFORE_CACHE_STEP`: a write committed and is about to run its cache step (`STORE`).

use serde_json::{Value, json};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use wtc_sidecar::core::ports::{
    CacheError, CacheKey, CacheStore, FillOutcome, LeaseEnd, LeaseToken, StoreCall, StoreOutcome,
};
use wtc_sidecar::core::types::Cached;
use wtc_sidecar::http::Extension;

/// After a filler read the database, before its fill reaches Redis.
pub const FILL_BEFORE_STORE: &str = "fill.before_store";
/// After a write committed, before its cache step.
pub const WRITE_BEFORE_CACHE_STEP: &str = "write.before_cache_step";

struct Hold {
    point: String,
    /// The entry key of the held key.
    entry: String,
    taken: bool,
    release_after: Option<Duration>,
    reached: watch::Sender<bool>,
    released: watch::Sender<bool>,
}

/// Armed holds, by id. Each one stops the first request that reaches its point for its key.
#[derive(Default)]
pub struct Hooks {
    next: AtomicU64,
    holds: Mutex<HashMap<u64, Hold>>,
}

impl Hooks {
    /// `release_after`: let the request go by itself after that long (for tests that cannot call
    /// back, e.g. once the server stopped accepting connections).
    pub fn arm(
        &self,
        point: &str,
        entity: &str,
        key: &str,
        release_after: Option<Duration>,
    ) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let hold = Hold {
            point: point.to_string(),
            entry: CacheKey::new(entity, key).entry,
            taken: false,
            release_after,
            reached: watch::channel(false).0,
            released: watch::channel(false).0,
        };
        self.holds.lock().unwrap().insert(id, hold);
        id
    }

    pub async fn hold(&self, point: &'static str, key: &CacheKey) {
        let (mut released, release_after) = {
            let mut holds = self.holds.lock().unwrap();
            let Some(h) = holds
                .values_mut()
                .find(|h| !h.taken && h.point == point && h.entry == key.entry)
            else {
                return;
            };
            h.taken = true;
            h.reached.send_replace(true);
            (h.released.subscribe(), h.release_after)
        };
        match release_after {
            Some(after) => {
                let _ = tokio::time::timeout(after, released.wait_for(|r| *r)).await;
            }
            None => {
                let _ = released.wait_for(|r| *r).await;
            }
        }
    }

    /// Waits until a request is held at hold `id`; false after `timeout` or for an unknown id.
    pub async fn wait_reached(&self, id: u64, timeout: Duration) -> bool {
        let rx = self
            .holds
            .lock()
            .unwrap()
            .get(&id)
            .map(|h| h.reached.subscribe());
        let Some(mut rx) = rx else { return false };
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|r| *r)).await,
            Ok(Ok(_))
        )
    }

    pub fn release(&self, id: u64) -> bool {
        match self.holds.lock().unwrap().remove(&id) {
            Some(h) => {
                h.released.send_replace(true);
                true
            }
            None => false,
        }
    }
}

/// The cache-port methods a wrapper leaves as they are: handed to `self.inner`.
macro_rules! forward_to_inner {
    () => {
        fn is_up(&self) -> bool {
            self.inner.is_up()
        }

        async fn get(
            &self,
            key: &CacheKey,
            with_ttl: bool,
        ) -> Result<(Cached, Option<i64>), CacheError> {
            self.inner.get(key, with_ttl).await
        }

        async fn get_many(&self, keys: &[&CacheKey]) -> Result<Vec<Cached>, CacheError> {
            self.inner.get_many(keys).await
        }

        async fn peek(&self, key: &CacheKey) -> Result<(Cached, bool), CacheError> {
            self.inner.peek(key).await
        }

        async fn acquire_leases(
            &self,
            leases: &[(&CacheKey, &LeaseToken)],
            ttl: Duration,
        ) -> Result<Vec<(bool, Cached)>, CacheError> {
            self.inner.acquire_leases(leases, ttl).await
        }

        async fn write_intents(
            &self,
            intents: &[(&CacheKey, &LeaseToken)],
            ttl: Duration,
        ) -> Result<(), CacheError> {
            self.inner.write_intents(intents, ttl).await
        }

        async fn invalidate(
            &self,
            items: &[wtc_sidecar::core::ports::Invalidation<'_>],
        ) -> Result<Vec<wtc_sidecar::core::ports::InvalidateOutcome>, CacheError> {
            self.inner.invalidate(items).await
        }

        async fn evict(&self, keys: &[&CacheKey]) -> Result<(), CacheError> {
            self.inner.evict(keys).await
        }

        async fn repair_evict(&self, key: &CacheKey) -> Result<(), CacheError> {
            self.inner.repair_evict(key).await
        }

        async fn sweep(&self) -> Result<(), CacheError> {
            self.inner.sweep().await
        }
    };
}

/// A cache store whose fills and cache steps stop at armed holds first.
pub struct Held<C> {
    inner: C,
    hooks: Arc<Hooks>,
}

impl<C> Held<C> {
    pub fn new(inner: C, hooks: Arc<Hooks>) -> Self {
        Self { inner, hooks }
    }
}

impl<C: CacheStore> CacheStore for Held<C> {
    forward_to_inner!();

    async fn store(
        &self,
        stores: &[StoreCall<'_>],
        evict: &[&CacheKey],
    ) -> Result<Vec<StoreOutcome>, CacheError> {
        for s in stores {
            self.hooks.hold(WRITE_BEFORE_CACHE_STEP, s.key).await;
        }
        self.inner.store(stores, evict).await
    }

    async fn end_leases(
        &self,
        ends: &[LeaseEnd<'_>],
    ) -> Result<Vec<Option<FillOutcome>>, CacheError> {
        for e in ends {
            if let LeaseEnd::Fill { key, .. } = e {
                self.hooks.hold(FILL_BEFORE_STORE, key).await;
            }
        }
        self.inner.end_leases(ends).await
    }
}

/// The protocol with its two guards removed, for proving that the history checker catches what
/// they prevent: a cache step is a plain `SET` (no version comparison, so a late older write
/// overwrites a newer one), and a fill is a plain `SET` without the lease (a slow filler installs
/// what it read, however old: the seed's "set on miss"). On only when the sidecar under test is
/// started with `WTC_TEST_WEAKEN=plain-set`.
pub struct Weakened<C> {
    inner: C,
    plain: Option<(
        redis::Client,
        tokio::sync::OnceCell<redis::aio::MultiplexedConnection>,
    )>,
}

impl<C> Weakened<C> {
    pub fn from_env(inner: C, redis_url: &str) -> Self {
        let on = std::env::var("WTC_TEST_WEAKEN").as_deref() == Ok("plain-set");
        let plain = on.then(|| {
            eprintln!("WTC_TEST_WEAKEN=plain-set: CAS and fill leases are OFF (test build)");
            let client = redis::Client::open(redis_url).expect("the Redis URL");
            (client, tokio::sync::OnceCell::new())
        });
        Self { inner, plain }
    }

    async fn plain_set(
        &self,
        sets: &[(&CacheKey, &[u8], Duration, bool)],
    ) -> Result<(), CacheError> {
        let Some((client, conn)) = &self.plain else {
            return Err(CacheError::Failed("not weakened".into()));
        };
        let failed = |e: redis::RedisError| CacheError::Failed(e.to_string());
        let conn = conn
            .get_or_try_init(|| client.get_multiplexed_async_connection())
            .await
            .map_err(failed)?;
        let mut pipe = redis::pipe();
        for (key, bytes, ttl, drop_lease) in sets {
            pipe.cmd("SET")
                .arg(&key.entry)
                .arg(*bytes)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .ignore();
            if *drop_lease {
                pipe.cmd("DEL").arg(&key.lease).ignore();
            }
        }
        pipe.query_async::<()>(&mut conn.clone())
            .await
            .map_err(failed)
    }
}

impl<C: CacheStore> CacheStore for Weakened<C> {
    forward_to_inner!();

    async fn store(
        &self,
        stores: &[StoreCall<'_>],
        evict: &[&CacheKey],
    ) -> Result<Vec<StoreOutcome>, CacheError> {
        if self.plain.is_none() {
            return self.inner.store(stores, evict).await;
        }
        let sets: Vec<_> = stores
            .iter()
            .map(|s| (s.key, &s.envelope.bytes[..], s.ttl, true))
            .collect();
        self.plain_set(&sets).await?;
        if !evict.is_empty() {
            self.inner.evict(evict).await?;
        }
        Ok(vec![StoreOutcome::Stored; stores.len()])
    }

    async fn end_leases(
        &self,
        ends: &[LeaseEnd<'_>],
    ) -> Result<Vec<Option<FillOutcome>>, CacheError> {
        if self.plain.is_none() {
            return self.inner.end_leases(ends).await;
        }
        let mut out = Vec::with_capacity(ends.len());
        for e in ends {
            match e {
                LeaseEnd::Fill {
                    key, envelope, ttl, ..
                } => {
                    self.plain_set(&[(key, &envelope.bytes[..], *ttl, false)])
                        .await?;
                    out.push(Some(FillOutcome::Stored));
                }
                release @ LeaseEnd::Release { .. } => {
                    self.inner.end_leases(std::slice::from_ref(release)).await?;
                    out.push(None);
                }
            }
        }
        Ok(out)
    }
}

/// The holds' HTTP control: `POST /_test/holds` {"point","entity","key","release_after_ms"} ->
/// {"id"}; `GET /_test/holds/{id}/reached` waits until a request is held; `POST
/// /_test/holds/{id}/release` lets it go.
pub struct Control(pub Arc<Hooks>);

impl Extension for Control {
    fn prefix(&self) -> &str {
        "/_test/"
    }

    fn handle<'a>(
        &'a self,
        method: &'a str,
        path: &'a str,
        body: bytes::Bytes,
    ) -> Pin<Box<dyn Future<Output = (u16, Value)> + Send + 'a>> {
        Box::pin(async move {
            let error =
                |code: &str, message: &str| json!({"error": {"code": code, "message": message}});
            let rest = path.strip_prefix("/_test/").unwrap_or_default();
            let parts: Vec<&str> = rest.split('/').collect();
            match (method, parts.as_slice()) {
                ("POST", ["holds"]) => {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let (Some(point), Some(entity), Some(key)) =
                        (v["point"].as_str(), v["entity"].as_str(), v["key"].as_str())
                    else {
                        return (400, error("invalid_body", "need point, entity, key"));
                    };
                    let after = v["release_after_ms"].as_u64().map(Duration::from_millis);
                    let id = self.0.arm(point, entity, key, after);
                    (200, json!({"id": id}))
                }
                ("GET", ["holds", id, "reached"]) => {
                    let id = id.parse().unwrap_or(0);
                    if self.0.wait_reached(id, Duration::from_secs(10)).await {
                        (200, json!({"reached": true}))
                    } else {
                        (408, error("not_reached", "no request reached the hold"))
                    }
                }
                ("POST", ["holds", id, "release"]) => {
                    if self.0.release(id.parse().unwrap_or(0)) {
                        (200, json!({"released": true}))
                    } else {
                        (404, error("unknown_hold", "no such hold"))
                    }
                }
                _ => (404, error("no_route", "unknown test hook route")),
            }
        })
    }
}
