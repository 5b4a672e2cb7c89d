//! `X-Wtc-Min-Version`: a read that must see at least the version of the client's last write,
//! across sidecar processes whose shared cache is behind.

use serde_json::json;
use wtc_tests::*;

async fn setup() -> TestBed {
    TestBed::new("ryw").await
}

async fn get_min(sc: &Sidecar, key: &str, min: &str) -> Reply {
    sc.send(
        sc.http
            .get(sc.url("accounts", key))
            .header("x-wtc-min-version", min),
    )
    .await
}

/// Sidecar A writes v1 then v2; the shared cache is put back to v1 (as a write acknowledged as
/// `repairing`, or one from outside the sidecar, leaves it). Sidecar B serves v1 to a plain read,
/// but a read with the minimum v2 bypasses it, answers v2 from the database and refreshes the
/// cache under the fill lease.
#[tokio::test]
async fn read_your_writes_across_two_sidecars_with_the_cache_behind() {
    let s = setup().await;
    let (a, b) = (s.fixture().start().await, s.fixture().start().await);
    let first = a.put("accounts", "k", json!({"n": 1})).await;
    let v1 = first.version();
    let v2 = a.put("accounts", "k", json!({"n": 2})).await.version();
    assert!(v2 > v1);
    s.redis.set(&entry_key("accounts", "k"), &first.raw).await;

    let plain = b.get("accounts", "k").await;
    assert_eq!(
        (plain.version(), plain.cache.as_deref()),
        (v1, Some("hit")),
        "without the header, the older cached envelope is served: the setup is behind"
    );
    let before = select_calls(&s.pool, &s.table).await;
    let fresh = get_min(&b, "k", &format!("\"{v2}\"")).await;
    assert_eq!(fresh.status, 200, "{}", fresh.raw);
    assert_eq!(
        (fresh.version(), fresh.etag, fresh.cache.as_deref()),
        (v2, Some(v2), Some("miss"))
    );
    assert_eq!(fresh.body["data"]["n"], 2);
    assert_eq!(select_calls(&s.pool, &s.table).await - before, 1);
    assert_eq!(
        s.redis.cached_version("accounts", "k").await,
        Some(v2),
        "the read filled the cache under its lease"
    );
    let after = b.get("accounts", "k").await;
    assert_eq!((after.version(), after.cache.as_deref()), (v2, Some("hit")));

    // A minimum the cache already meets is a plain hit: no database read.
    let before = select_calls(&s.pool, &s.table).await;
    for min in [v1.to_string(), format!("\"{v2}\""), format!("W/\"{v2}\"")] {
        let r = get_min(&b, "k", &min).await;
        assert_eq!(
            (r.version(), r.cache.as_deref()),
            (v2, Some("hit")),
            "{min}"
        );
    }
    assert_eq!(select_calls(&s.pool, &s.table).await, before);
    assert_eq!(
        b.metric("wtc_fills_total{entity=\"accounts\",outcome=\"won\"}")
            .await,
        1.0
    );
}

/// While another filler holds the lease, a reader with a minimum does not take the older cached
/// envelope for that filler's value: it reads the database itself and leaves the cache alone.
#[tokio::test]
async fn min_version_read_waiting_on_another_filler_never_takes_the_older_entry() {
    let s = setup().await;
    let (a, b) = (s.fixture().start().await, s.fixture().start().await);
    let first = a.put("accounts", "k", json!({"n": 1})).await;
    let v2 = a.put("accounts", "k", json!({"n": 2})).await.version();
    s.redis.set(&entry_key("accounts", "k"), &first.raw).await;
    // Another sidecar's filler at work (its lease, as acquire_lease sets it).
    let lease = wtc_sidecar::core::CacheKey::new("accounts", "k").lease;
    s.redis.set(&lease, "someone-elses-fill").await;

    let r = get_min(&b, "k", &v2.to_string()).await;
    assert_eq!((r.status, r.version()), (200, v2), "{}", r.raw);
    assert_eq!(r.cache.as_deref(), Some("miss"));
    assert_eq!(
        s.redis.cached_version("accounts", "k").await,
        Some(first.version()),
        "without the lease, nothing is filled"
    );
    assert_eq!(
        s.redis.get(&lease).await.as_deref(),
        Some("someone-elses-fill")
    );

    // A deleted row: the minimum is the tombstone's version, the database has no row.
    let d = a.delete("accounts", "k").await;
    assert_eq!(d.status, 200);
    s.redis.set(&entry_key("accounts", "k"), &first.raw).await;
    s.redis.del(&lease).await;
    let gone = get_min(&b, "k", &d.version().to_string()).await;
    assert_eq!(gone.status, 404, "{}", gone.raw);
}

#[tokio::test]
async fn bad_min_version_is_a_400() {
    let s = setup().await;
    let sc = s.fixture().start().await;
    sc.put("accounts", "k", json!({"n": 1})).await;
    for bad in ["x", "-1", "\"1\", \"2\"", "1.5", ""] {
        let r = get_min(&sc, "k", bad).await;
        assert_eq!(
            (r.status, r.error_code()),
            (400, "invalid_min_version"),
            "{bad:?}: {}",
            r.raw
        );
        assert!(r.error_message().contains("X-Wtc-Min-Version"), "{}", r.raw);
    }
}
