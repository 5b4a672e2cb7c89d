//! The commit stream on the real node (docs/commit-stream.md, "On Kubernetes"): the reader the
//! operator runs, a write made behind the sidecars' back served by the application's pod, the
//! reader's figures in the cache's status, and the slot dropped with the cache.

use crate::{Shop, ShopOptions, node, serial, wait_for};
use std::time::{Duration, Instant};
use wtc_tests::commit_stream::{drop_leftovers, slot_and_publication};

/// The README's cache with the stream on and versions from the trigger.
fn with_stream(yaml: String) -> String {
    yaml.replace("ttlSeconds: 300}", "ttlSeconds: 300, versions: trigger}")
        .replace("  redis:\n", "  commitStream: {enabled: true}\n  redis:\n")
}

/// A cached row changed with plain SQL is served changed by the application's pod within
/// seconds (without the stream: after its TTL, five minutes); `CommitStreamReady` says the
/// reader holds the slot, with its lag; deleting the cache drops the slot and the publication
/// (none is left retaining WAL). Fails without the reader (the old row is served: "still
/// ... after the external commit"), or when the cache goes and its slot stays ("left behind").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_behind_the_sidecars_back_reaches_the_pods_and_the_slot_goes_with_the_cache() {
    let _serial = serial().await;
    let node = node().await;
    // What a failed earlier run left (slots retain WAL, and there are few).
    drop_leftovers(&wtc_tests::pg().await, "wtc\\_stream\\_%", "").await;
    let shop = Shop::deploy(
        node,
        "stream",
        ShopOptions {
            edit: Some(with_stream),
            ..ShopOptions::default()
        },
    )
    .await;
    let ns = shop.ns.clone();
    let status = wait_for(
        Duration::from_secs(120),
        "CommitStreamReady=True",
        || async {
            let st = shop.cache_status(node).await;
            st["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "CommitStreamReady" && c["status"] == "True")
                .then_some(st)
        },
    )
    .await;
    let slot = status["commitStream"]["slot"].as_str().unwrap().to_string();
    eprintln!("stream: status.commitStream {}", status["commitStream"]);
    assert_eq!(slot_and_publication(&shop.pool, &slot).await, (true, true));

    let put = shop
        .exec(node, &["put", "k1", r#"{"owner": "app"}"#])
        .await
        .unwrap();
    assert!(put.starts_with("201"), "{put}");
    let app = shop.app(node).await;
    let url = format!("{}/accounts/k1", app.base);
    wait_for(Duration::from_secs(10), "k1 cached", || async {
        let r = wtc_tests::reply(app.http.get(&url)).await.ok()?;
        (r.cache.as_deref() == Some("hit")).then_some(())
    })
    .await;

    let update = format!("UPDATE {} SET owner = 'psql' WHERE id = 'k1'", shop.table);
    sqlx::query(sqlx::AssertSqlSafe(update))
        .execute(&shop.pool)
        .await
        .unwrap();
    let committed = Instant::now();
    let mut last = String::new();
    loop {
        let r = wtc_tests::reply(app.http.get(&url)).await.unwrap();
        if r.status == 200 && r.body["data"]["owner"] == "psql" {
            break;
        }
        last = r.raw;
        assert!(
            committed.elapsed() < Duration::from_secs(10),
            "still {last} 10 s after the external commit"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "stream: an UPDATE made with SQL served by the application's pod {:.0} ms after its commit \
         (the read before it: {last})",
        committed.elapsed().as_secs_f64() * 1e3
    );

    node.kubectl(&["-n", &ns, "delete", "deployment", "app", "--wait=false"])
        .await;
    node.kubectl(&["-n", &ns, "delete", "wtc", "shop", "--wait=false"])
        .await;
    let started = Instant::now();
    wait_for(Duration::from_secs(180), "the cache deleted", || async {
        node.try_kubectl(&["-n", &ns, "get", "wtc", "shop"])
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert_eq!(
        slot_and_publication(&shop.pool, &slot).await,
        (false, false),
        "left behind"
    );
    eprintln!(
        "stream: the cache, its slot and its publication gone {:.1} s after the deletion",
        started.elapsed().as_secs_f64()
    );
    shop.delete(node).await;
}
