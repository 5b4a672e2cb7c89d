//! Hostile local clients: slow bodies, slow or idle connections, floods of connections, and a
//! client that never finishes its request when the sidecar is told to stop. Each is bounded
//! (`limits.*`, README "Configuration"); without the bound each test fails (a 503 for every
//! caller, a connection that stays open, a health check refused, a shutdown that never ends).

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wtc_tests::*;

fn addr(sc: &Sidecar) -> String {
    sc.base.trim_start_matches("http://").to_string()
}

/// Reads until the peer closes, or `within` passes: whether it closed, and what it sent.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> (bool, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (true, String::from_utf8_lossy(&got).into()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (false, String::from_utf8_lossy(&got).into()),
        }
    }
}

const PARTIAL_PUT: &[u8] = b"PUT /v1/entities/accounts/slow HTTP/1.1\r\nHost: x\r\n\
Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"n\":";

#[tokio::test]
async fn slow_bodies_hold_no_slot_and_end_in_408() {
    let bed = TestBed::new("slowbody").await;
    let sc = Fixture::new(&bed.redis.url())
        .entity("accounts", &bed.table)
        .with(|c| {
            c.limits.max_in_flight = 2;
            c.limits.max_queue_wait_ms = 50;
            c.limits.body_timeout_ms = 1_500;
        })
        .start()
        .await;
    let mut slow = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(addr(&sc)).await.unwrap();
        s.write_all(PARTIAL_PUT).await.unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Six half-sent bodies, two slots: everyone else is still served.
    let r = sc.get("accounts", "someone").await;
    assert_eq!(r.status, 404, "{}", r.raw);
    let w = sc
        .put("accounts", "else", serde_json::json!({"n": 1}))
        .await;
    assert_eq!(w.status, 201, "{}", w.raw);
    // The slow bodies end with 408 once their deadline passes; nothing was written.
    let (_, answer) = closed_within(&mut slow[0], Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert_eq!(sc.get("accounts", "slow").await.status, 404);
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed() {
    let bed = TestBed::new("idle").await;
    let sc = Fixture::new(&bed.redis.url())
        .entity("accounts", &bed.table)
        .with(|c| c.limits.header_timeout_ms = 400)
        .start()
        .await;
    // Headers that never end.
    let mut s = TcpStream::connect(addr(&sc)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let (closed, _) = closed_within(&mut s, Duration::from_secs(3)).await;
    assert!(closed, "a connection whose headers never end stays open");
    // A kept-alive connection that goes quiet after an answer.
    let mut s = TcpStream::connect(addr(&sc)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (closed, answer) = closed_within(&mut s, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed, "an idle kept-alive connection stays open");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed too early"
    );
}

#[tokio::test]
async fn a_flood_of_connections_is_capped_and_health_checks_still_answer() {
    let bed = TestBed::new("flood").await;
    let sc = Fixture::new(&bed.redis.url())
        .entity("accounts", &bed.table)
        .with(|c| {
            c.limits.max_connections = 8;
            c.limits.header_timeout_ms = 10_000;
        })
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(addr(&sc)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Over the cap: closed at once.
    let mut extra = TcpStream::connect(addr(&sc)).await.unwrap();
    let started = Instant::now();
    let (closed, _) = closed_within(&mut extra, Duration::from_secs(3)).await;
    assert!(closed, "a connection over the cap stays open");
    assert!(started.elapsed() < Duration::from_secs(1));
    // A health check over the cap is answered.
    let mut probe = TcpStream::connect(addr(&sc)).await.unwrap();
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (_, answer) = closed_within(&mut probe, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A connection under the cap still works.
    held[0]
        .write_all(
            b"GET /v1/entities/accounts/nobody HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let (_, answer) = closed_within(&mut held[0], Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        sc.metrics()
            .await
            .lines()
            .any(|l| l.starts_with("wtc_connections_refused_total") && !l.ends_with(" 0")),
        "counted"
    );
}

#[tokio::test]
async fn sigterm_ends_within_the_grace_whatever_clients_do() {
    let bed = TestBed::new("grace").await;
    let mut sc = Fixture::new(&bed.redis.url())
        .entity("accounts", &bed.table)
        .with(|c| {
            c.limits.shutdown_grace_ms = 1_000;
            c.limits.body_timeout_ms = 60_000;
        })
        .start()
        .await;
    // A request that never arrives whole, and one that arrived and never ends (a read held
    // before its fill, never let go).
    let mut s = TcpStream::connect(addr(&sc)).await.unwrap();
    s.write_all(PARTIAL_PUT).await.unwrap();
    sc.put("accounts", "g", serde_json::json!({"n": 1})).await;
    bed.redis.del(&entry_key("accounts", "g")).await;
    let hold = sc.hold(FILL_BEFORE_STORE, "accounts", "g").await;
    let (http, url) = (sc.http.clone(), sc.url("accounts", "g"));
    let _reader = tokio::spawn(async move { http.get(url).send().await });
    sc.wait_held(hold).await;
    let started = Instant::now();
    signal(sc.pid(), "TERM");
    let status = sc.wait_exit(Duration::from_secs(10)).await;
    assert!(status.is_some(), "the sidecar did not exit within 10 s");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "exited after {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "did not wait for the grace: {took:?}"
    );
}

/// Reads one response (headers and a `Content-Length` body) from a kept-alive connection; `None`
/// when the peer closed first.
async fn one_response(stream: &mut TcpStream) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return Some(head);
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_busy_kept_alive_connection_outlives_the_header_timeout() {
    // The header timeout bounds a request's headers and the idle wait between requests, not the
    // life of a connection that keeps sending: a client pool's connections serve for hours.
    let bed = TestBed::new("busyconn").await;
    let sc = Fixture::new(&bed.redis.url())
        .entity("accounts", &bed.table)
        .with(|c| c.limits.header_timeout_ms = 300)
        .start()
        .await;
    let mut s = TcpStream::connect(addr(&sc)).await.unwrap();
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_millis(1_500) {
        s.write_all(b"GET /v1/entities/accounts/nobody HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = tokio::time::timeout(Duration::from_secs(5), one_response(&mut s))
            .await
            .expect("an answer");
        let Some(head) = head else {
            panic!(
                "the connection was closed after {answered} answers and {:?}",
                started.elapsed()
            );
        };
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(answered > 20, "{answered}");
}
