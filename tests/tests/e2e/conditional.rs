//! Conditional writes as RFC 9110 has them: `If-None-Match: *` makes a PUT create-only (412 when
//! the row exists, a lost update otherwise), and `If-Match` compares strongly, so a weak tag is
//! refused with 400 instead of being taken as a match. Also the routes' small rules: `Allow`
//! names HEAD, entity names are percent-decoded like keys.

use serde_json::json;
use wtc_tests::*;

async fn sidecar() -> (TestBed, Sidecar) {
    let bed = TestBed::new("cond").await;
    let sc = Fixture::new(&bed.redis.url())
        .entity("accounts", &bed.table)
        .start()
        .await;
    (bed, sc)
}

#[tokio::test]
async fn if_none_match_star_creates_only() {
    let (_bed, sc) = sidecar().await;
    let create = |body: serde_json::Value| {
        sc.http
            .put(sc.url("accounts", "c"))
            .header("if-none-match", "*")
            .json(&body)
    };
    let first = sc.send(create(json!({"owner": "first"}))).await;
    assert_eq!(
        (first.status, first.cache.as_deref()),
        (201, Some("ok")),
        "{}",
        first.raw
    );
    let second = sc.send(create(json!({"owner": "second"}))).await;
    assert_eq!(
        (second.status, second.error_code()),
        (412, "precondition_failed"),
        "{}",
        second.raw
    );
    assert_eq!(second.etag, Some(first.version()), "the current version");
    let now = sc.get("accounts", "c").await;
    assert_eq!(now.body["data"]["owner"], "first", "not overwritten");
    // After a delete the row can be created again.
    assert_eq!(sc.delete("accounts", "c").await.status, 200);
    let again = sc.send(create(json!({"owner": "third"}))).await;
    assert_eq!(again.status, 201, "{}", again.raw);
    assert!(again.version() > first.version());

    // Only `*`, only on PUT, not with If-Match.
    for (req, why) in [
        (
            sc.http
                .put(sc.url("accounts", "c"))
                .header("if-none-match", "\"3\"")
                .json(&json!({})),
            "an ETag",
        ),
        (
            sc.http
                .put(sc.url("accounts", "c"))
                .header("if-none-match", "*")
                .header("if-match", "\"3\"")
                .json(&json!({})),
            "both",
        ),
        (
            sc.http
                .delete(sc.url("accounts", "c"))
                .header("if-none-match", "*"),
            "a delete",
        ),
    ] {
        let r = sc.send(req).await;
        assert_eq!(
            (r.status, r.error_code()),
            (400, "invalid_if_none_match"),
            "{why}: {}",
            r.raw
        );
    }
    assert_eq!(sc.get("accounts", "c").await.body["data"]["owner"], "third");

    // In a batch: `if_none_match: "*"` on a put.
    let batch = |key: &str| {
        sc.http
            .post(format!("{}/v1/batch", sc.base))
            .json(&json!({"writes": [
                {"entity": "accounts", "key": key, "op": "put", "data": {"owner": "b"}, "if_none_match": "*"}
            ]}))
    };
    assert_eq!(sc.send(batch("fresh")).await.status, 200);
    let r = sc.send(batch("fresh")).await;
    assert_eq!(
        (r.status, r.error_code()),
        (412, "precondition_failed"),
        "{}",
        r.raw
    );
    assert_eq!(r.body["error"]["item"], 0);
}

#[tokio::test]
async fn a_weak_etag_never_matches_if_match() {
    let (_bed, sc) = sidecar().await;
    let v = sc
        .put("accounts", "w", json!({"owner": "a"}))
        .await
        .version();
    let r = sc
        .send(
            sc.http
                .put(sc.url("accounts", "w"))
                .header("if-match", format!("W/\"{v}\""))
                .json(&json!({"owner": "b"})),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (400, "invalid_if_match"),
        "{}",
        r.raw
    );
    assert!(r.error_message().contains("weak"), "{}", r.raw);
    let r = sc
        .send(
            sc.http
                .post(format!("{}/v1/batch", sc.base))
                .json(&json!({"writes": [
                    {"entity": "accounts", "key": "w", "op": "delete", "if_match": format!("W/\"{v}\"")}
                ]})),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (400, "invalid_if_match"),
        "{}",
        r.raw
    );
    assert_eq!(sc.get("accounts", "w").await.body["data"]["owner"], "a");
    // The strong tag still works.
    assert_eq!(
        sc.put_if("accounts", "w", json!({"owner": "c"}), v)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn allow_names_head_and_entity_names_are_percent_decoded() {
    let (_bed, sc) = sidecar().await;
    let r = sc.send(sc.http.patch(sc.url("accounts", "k"))).await;
    assert_eq!(r.status, 405);
    let r = sc.http.patch(sc.url("accounts", "k")).send().await.unwrap();
    assert_eq!(r.headers()["allow"], "GET, HEAD, PUT, DELETE");
    let r = sc
        .http
        .post(format!("{}/healthz", sc.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    sc.put("accounts", "k", json!({"owner": "x"})).await;
    let r = sc.get("%61ccounts", "k").await;
    assert_eq!(
        (r.status, &r.body["data"]["owner"]),
        (200, &json!("x")),
        "{}",
        r.raw
    );
    let r = sc.get("%FF", "k").await;
    assert_eq!(
        (r.status, r.error_code()),
        (404, "unknown_entity"),
        "{}",
        r.raw
    );
}
