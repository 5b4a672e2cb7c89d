//! Early refresh (XFetch, `cache.early_expiration_beta`) on the real Redis: a key read all the
//! time has its entry renewed before the TTL ends, so its readers never miss. (The entry is
//! there when the refresh takes the lease; a refresh that took that for a finished fill, as
//! reads after a miss rightly do, renewed nothing and the key expired: this test then fails.)

use serde_json::json;
use std::time::{Duration, Instant};
use wtc_tests::*;

#[tokio::test]
async fn a_key_read_all_the_time_is_renewed_before_it_expires() {
    let bed = TestBed::new("xfetch").await;
    let sc = bed
        .fixture()
        .with(|c| {
            c.entities[0].ttl_seconds = 2;
            // With a database read of at least 1 ms, a hit refreshes with a chance of
            // e^-(ms left / 400): about one hit in three in the entry's last 400 ms.
            c.cache.early_expiration_beta = 400.0;
        })
        .start()
        .await;
    let v = sc.put("accounts", "hot", json!({"n": 1})).await.version();
    let reads_before = select_calls(&bed.pool, &bed.table).await;
    let started = Instant::now();
    let (mut hits, mut others) = (0, vec![]);
    // Three TTLs long.
    while started.elapsed() < Duration::from_secs(6) {
        let r = sc.get("accounts", "hot").await;
        assert_eq!(r.status, 200, "{}", r.raw);
        assert_eq!(r.etag, Some(v));
        match r.cache.as_deref() {
            Some("hit") => hits += 1,
            other => others.push((started.elapsed(), other.map(str::to_string))),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        others.is_empty(),
        "{hits} hits, and reads that were not hits: {others:?}"
    );
    let refreshes = select_calls(&bed.pool, &bed.table).await - reads_before;
    assert!(refreshes >= 2, "{refreshes} database reads in three TTLs");
    let left = bed.redis.pttl(&entry_key("accounts", "hot")).await;
    assert!(left > 0, "the entry expired (PTTL {left})");
}
