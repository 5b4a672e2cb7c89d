//! The managed Redis' password rotated under a running sidecar: the operator's own steps
//! (`redis_admin::apply` with the credentials `RedisAuth` computes) on a real redis-server, and
//! a real sidecar reading its password from a file that changes, as the kubelet changes a
//! mounted Secret. No request fails, no restart, and once the old password is retired Redis
//! refuses it while the sidecar goes on serving hits with the new one.

use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use wtc_operator::redis_admin::{self, PasswordChange};
use wtc_operator::redis_auth::{RedisAuth, sha256_hex};
use wtc_tests::*;

const KEYS: usize = 20;

fn auth(password: &str, next: Option<&str>, previous: &[&str]) -> RedisAuth {
    RedisAuth {
        password: password.into(),
        next: next.map(String::from),
        operator_password: "operator's own".into(),
        previous: previous.iter().map(|p| sha256_hex(p)).collect(),
        previous_until: (!previous.is_empty()).then_some(u64::MAX),
        confirmed: None,
    }
}

/// Whether Redis takes `password` for `default`.
async fn accepts(port: u16, password: &str) -> bool {
    let info = format!("redis://127.0.0.1:{port}");
    let client = redis::Client::open(info).unwrap();
    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("AUTH")
        .arg("default")
        .arg(password)
        .query_async::<()>(&mut c)
        .await
        .is_ok()
}

/// Closes the sidecar's connections, as a Redis restart or a network cut would.
async fn cut_connections(port: u16, password: &str) {
    let password = password.replace(' ', "%20");
    let client = redis::Client::open(format!("redis://:{password}@127.0.0.1:{port}")).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("USER")
        .arg("default")
        .arg("SKIPME")
        .arg("yes")
        .query_async::<i64>(&mut c)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_rotated_password_reaches_the_running_sidecar_without_a_failed_request() {
    let bed = TestBed::new("rotation").await;
    let port = bed.redis.port;
    // A new server lets anyone in: the operator's first pass sets the password and its own user.
    let first = auth("first password", None, &[]);
    assert_eq!(
        redis_admin::apply("127.0.0.1", port, &first).await.unwrap(),
        PasswordChange::Added
    );
    assert_eq!(
        redis_admin::apply("127.0.0.1", port, &first).await.unwrap(),
        PasswordChange::None
    );
    assert!(!accepts(port, "anything").await && accepts(port, "first password").await);

    let dir = std::env::temp_dir().join(unique("rotation"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("password");
    std::fs::write(&file, "first password").unwrap();
    let sc = bed
        .fixture()
        .with(|c| c.redis.password_file = Some(file.display().to_string()))
        .start()
        .await;
    for i in 0..KEYS {
        let put = sc.put("accounts", &format!("k{i}"), json!({"n": i})).await;
        assert_eq!(put.status, 201, "{}", put.raw);
    }
    let hit = |sc: &Sidecar| {
        let req = sc.http.get(sc.url("accounts", "k0"));
        async move {
            reply(req)
                .await
                .is_ok_and(|r| r.cache.as_deref() == Some("hit"))
        }
    };
    assert!(hit(&sc).await, "hits before the rotation");

    // Traffic through the whole rotation: reads and writes, one every 5 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (http, base) = (sc.http.clone(), sc.base.clone());
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let url = format!("{base}/v1/entities/accounts/k{}", n % KEYS);
                let req = match n % 5 {
                    0 => http.put(url).json(&json!({"n": n})),
                    _ => http.get(url),
                };
                match reply(req).await {
                    Ok(r) if r.status < 300 => {}
                    other => {
                        eprintln!("failed during the rotation: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // A `next-password`: Redis takes it besides the current one (the sidecars' file still
    // holds the current one, which Redis still accepts)...
    let adding = auth("first password", Some("second password"), &[]);
    assert_eq!(
        redis_admin::apply("127.0.0.1", port, &adding)
            .await
            .unwrap(),
        PasswordChange::Added
    );
    assert!(accepts(port, "first password").await && accepts(port, "second password").await);
    // ...then it becomes the password (the same set accepted), and the kubelet updates the file.
    let both = auth("second password", None, &["first password"]);
    assert_eq!(
        redis_admin::apply("127.0.0.1", port, &both).await.unwrap(),
        PasswordChange::None
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&file, "second password").unwrap();
    // A connection made now uses the new password.
    cut_connections(port, "second password").await;
    assert!(
        eventually(Duration::from_secs(10), || hit(&sc)).await,
        "hits again after a reconnect during the rotation"
    );

    // A session opened with the replaced password, still accepted (a leak is why one rotates).
    let leaked = redis::Client::open(format!("redis://:first%20password@127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // The grace period ends: only the new password, and every connection of `default` closed.
    let after = auth("second password", None, &[]);
    assert_eq!(
        redis_admin::apply("127.0.0.1", port, &after).await.unwrap(),
        PasswordChange::Retired
    );
    assert!(
        !accepts(port, "first password").await,
        "the old password is refused"
    );
    let mut leaked = leaked;
    assert!(
        redis::cmd("PING")
            .query_async::<String>(&mut leaked)
            .await
            .is_err(),
        "a session opened with the old password is closed"
    );
    assert!(accepts(port, "second password").await);
    // The sidecar reconnected with the file's password: hits, not reads from the database.
    let before = sc
        .metric("wtc_cache_lookups_total{entity=\"accounts\",result=\"hit\"}")
        .await;
    assert!(
        eventually(Duration::from_secs(10), || hit(&sc)).await,
        "the sidecar serves hits with the new password"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let hits = sc
        .metric("wtc_cache_lookups_total{entity=\"accounts\",result=\"hit\"}")
        .await
        - before;
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "rotation: {done} requests, {failed} failed, {hits} hits after the old password went"
    );
    assert_eq!(failed, 0, "no request fails during a rotation");
    assert!(hits > 10.0, "hits after the rotation: {hits}");
    let _ = std::fs::remove_dir_all(dir);
}
