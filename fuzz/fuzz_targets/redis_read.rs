//! Values read back from Redis, through the read path and the HTTP API: a corrupt or hostile
//! value must be treated as a miss, never served and never crashed on.
//!
//! The sidecar talks to a fake Redis in this process (RESP2 over loopback) that answers `GET`,
//! `PTTL` and `MGET` with the fuzzed values; PostgreSQL is unreachable. So a value the sidecar
//! accepts is answered from the cache, and one it refuses becomes a miss that goes to the database
//! and gets 503. Input: one flag byte, then the value (or, for a bulk read, values separated by
//! 0xFF; an empty one is a key missing from Redis).
//!
//! Flag bits 0-1: 0 `GET`, 1 `HEAD`, 2 `GET` with `X-Wtc-Min-Version: <second byte>`, 3 bulk read
//! (`POST /v1/entities/accounts/_bulk_get`); bits 2-4: the key's PTTL (early refresh); bit 5: in
//! a bulk read, every key asked twice.
//!
//! Checked, against `Envelope::parse_stored` of each value (and the minimum version):
//! - accepted row: 200, the body is the stored value byte for byte, ETag is its version,
//!   `X-Wtc-Cache: hit`; accepted tombstone: 404 not_found with the tombstone's ETag;
//! - refused (or below the minimum): 503 database_unavailable, never a 200;
//! - bulk read: 200 only when every value is accepted, each item in order with the stored value
//!   as its envelope (rows) or null (tombstones); otherwise 503.
#![no_main]

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, Method, Request, StatusCode, header};
use warp::reply::Response;
use wtc_fuzz::*;
use wtc_sidecar::core::Envelope;

const ENTITY: &str = "accounts";
const PTTLS: [i64; 8] = [-1, -2, 0, 1, 20, 1_000, 300_000, i64::MAX];

/// What the fake Redis holds for the current input: entry key -> value, and every key's PTTL.
#[derive(Default)]
struct Store {
    values: HashMap<Vec<u8>, Vec<u8>>,
    other: HashMap<Vec<u8>, Vec<u8>>,
    pttl: i64,
    /// Keys deleted (`DEL`, `UNLINK`) during the current input.
    deleted: Vec<Vec<u8>>,
}

fn store() -> &'static Mutex<Store> {
    static S: OnceLock<Mutex<Store>> = OnceLock::new();
    S.get_or_init(Mutex::default)
}

fn sidecar() -> &'static BoxedFilter<(Response,)> {
    static S: OnceLock<BoxedFilter<(Response,)>> = OnceLock::new();
    S.get_or_init(|| {
        let listener = runtime().block_on(async {
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a loopback port")
        });
        let url = format!("redis://{}", listener.local_addr().unwrap());
        runtime().spawn(async move {
            loop {
                if let Ok((conn, _)) = listener.accept().await {
                    tokio::spawn(serve(conn));
                }
            }
        });
        // Redis errors are not expected; if one happens, Redis is skipped for 1 ms only.
        sidecar_filter(config(&url, 1), None)
    })
}

fn entry_key(key: &str) -> Vec<u8> {
    format!("wtc:{{{ENTITY}:{key}}}").into_bytes()
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    let filter = sidecar();
    let mode = flags & 3;
    let pttl = PTTLS[usize::from((flags >> 2) & 7)];
    if mode == 3 {
        bulk(filter, rest, pttl, flags & 0x20 != 0);
    } else {
        let (min_version, value) = match (mode, rest.split_first()) {
            (2, Some((&m, v))) => (Some(i64::from(m)), v),
            (2, None) => return,
            _ => (None, rest),
        };
        single(filter, mode == 1, min_version, value, pttl);
    }
});

fn single(
    filter: &BoxedFilter<(Response,)>,
    head: bool,
    min_version: Option<i64>,
    value: &[u8],
    pttl: i64,
) {
    {
        let mut s = store().lock().unwrap();
        s.values.clear();
        s.deleted.clear();
        if !value.is_empty() {
            s.values.insert(entry_key("k"), value.to_vec());
        }
        s.pttl = pttl;
    }
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.method_mut() = if head { Method::HEAD } else { Method::GET };
    *req.uri_mut() = format!("/v1/entities/{ENTITY}/k").parse().unwrap();
    if let Some(m) = min_version {
        req.headers_mut()
            .insert("x-wtc-min-version", m.to_string().parse().unwrap());
    }
    let (status, headers, body) = runtime().block_on(call(filter, req));

    let expected = Some(value)
        .filter(|v| !v.is_empty())
        .and_then(|v| Envelope::parse_stored(Bytes::copy_from_slice(v)))
        .filter(|env| min_version.is_none_or(|m| env.version.get() >= m));
    let shown = || String::from_utf8_lossy(value).into_owned();
    // A value that is not an envelope is evicted (a newer-looking prefix would otherwise keep
    // every fill out); an envelope, even one below the minimum version, is left to the fill.
    let refused =
        !value.is_empty() && Envelope::parse_stored(Bytes::copy_from_slice(value)).is_none();
    let evicted = store().lock().unwrap().deleted.contains(&entry_key("k"));
    assert_eq!(
        evicted,
        refused,
        "evicted: {evicted}, refused: {refused}: {}",
        shown()
    );
    match expected {
        Some(env) if !env.deleted => {
            assert_eq!(
                status,
                StatusCode::OK,
                "an accepted row was not served: {}",
                shown()
            );
            assert_eq!(&body[..], value, "the served body is not the stored value");
            check_hit_headers(&headers, env.version.get());
        }
        Some(env) => {
            assert_eq!(status, StatusCode::NOT_FOUND, "a tombstone: {}", shown());
            assert_eq!(check_error(status, &headers, &body), "not_found");
            check_hit_headers(&headers, env.version.get());
        }
        None => {
            assert_eq!(
                (status, check_error(status, &headers, &body).as_str()),
                (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
                "a refused value was not treated as a miss: {}",
                shown()
            );
        }
    }
}

fn check_hit_headers(headers: &HeaderMap, version: i64) {
    let etag = format!("\"{version}\"");
    assert_eq!(
        headers.get(header::ETAG).map(|v| v.as_bytes()),
        Some(etag.as_bytes())
    );
    assert_eq!(
        headers.get("x-wtc-cache").map(|v| v.as_bytes()),
        Some(&b"hit"[..])
    );
}

fn bulk(filter: &BoxedFilter<(Response,)>, rest: &[u8], pttl: i64, twice: bool) {
    let most = if twice {
        MAX_BATCH_ITEMS / 2
    } else {
        MAX_BATCH_ITEMS
    };
    let values: Vec<&[u8]> = rest.split(|b| *b == 0xFF).take(most).collect();
    let keys: Vec<String> = (0..values.len()).map(|i| format!("k{i}")).collect();
    {
        let mut s = store().lock().unwrap();
        s.values.clear();
        s.deleted.clear();
        for (k, v) in keys.iter().zip(&values) {
            if !v.is_empty() {
                s.values.insert(entry_key(k), v.to_vec());
            }
        }
        s.pttl = pttl;
    }
    let mut asked: Vec<&String> = keys.iter().collect();
    if twice {
        asked.extend(keys.iter());
    }
    let body = serde_json::json!({ "keys": asked }).to_string();
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = format!("/v1/entities/{ENTITY}/_bulk_get").parse().unwrap();
    let (status, headers, body) = runtime().block_on(call(filter, req));

    let parsed: Vec<Option<Envelope>> = values
        .iter()
        .map(|v| Some(*v).filter(|v| !v.is_empty()))
        .map(|v| v.and_then(|v| Envelope::parse_stored(Bytes::copy_from_slice(v))))
        .collect();
    // Refused values are evicted, as by a single read (fuzz finding 3); accepted ones are not.
    let deleted = store().lock().unwrap().deleted.clone();
    for ((k, v), p) in keys.iter().zip(&values).zip(&parsed) {
        let refused = !v.is_empty() && p.is_none();
        assert_eq!(
            deleted.contains(&entry_key(k)),
            refused,
            "bulk read: {k} refused: {refused}, evicted: {}",
            !refused
        );
    }
    if parsed.iter().any(Option::is_none) {
        assert_eq!(
            (status, check_error(status, &headers, &body).as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            "a bulk read with a refused value was answered"
        );
        return;
    }
    assert_eq!(
        status,
        StatusCode::OK,
        "every value was accepted, yet {status}"
    );
    assert_eq!(
        headers.get("x-wtc-cache").map(|v| v.as_bytes()),
        Some(&b"hit"[..])
    );
    #[derive(Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        items: Vec<Item<'a>>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item<'a> {
        key: String,
        status: u16,
        cache: String,
        #[serde(borrow)]
        envelope: &'a RawValue,
    }
    let answer: Answer<'_> = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "the bulk answer is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&body)
        )
    });
    assert_eq!(answer.items.len(), asked.len());
    for (item, key) in answer.items.iter().zip(&asked) {
        let i: usize = key[1..].parse().unwrap();
        let env = parsed[i].as_ref().unwrap();
        assert_eq!(&item.key, *key);
        assert_eq!(item.cache, "hit");
        if env.deleted {
            assert_eq!((item.status, item.envelope.get()), (404, "null"));
        } else {
            assert_eq!(item.status, 200);
            // Embedded as it is; a raw JSON value leaves out the whitespace after it.
            let stored = values[i];
            let end = stored.len()
                - stored
                    .iter()
                    .rev()
                    .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                    .count();
            assert_eq!(
                item.envelope.get().as_bytes(),
                &stored[..end],
                "the bulk answer does not carry the stored value"
            );
        }
    }
}

/// One connection of the fake Redis: RESP2 commands in, replies from the store out.
async fn serve(mut conn: TcpStream) {
    // Replies go out at once: with Nagle's algorithm, the second reply of a pipeline waits for
    // the client's delayed ACK (40 ms).
    let _ = conn.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::new();
    loop {
        out.clear();
        while let Some(cmd) = parse_command(&mut buf) {
            let reply = answer(&cmd);
            if debug() {
                eprintln!(
                    "fake redis: {:?} -> {:?}",
                    cmd.iter()
                        .map(|a| String::from_utf8_lossy(a))
                        .collect::<Vec<_>>(),
                    String::from_utf8_lossy(&reply)
                );
            }
            out.extend_from_slice(&reply);
        }
        if !out.is_empty() && conn.write_all(&out).await.is_err() {
            return;
        }
        match conn.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A small Redis: the fuzzed entries (`values`, reset for every input) and whatever the sidecar
/// sets itself outside them (`other`: the epoch key, write intents). Fill leases are never won:
/// `SET .. NX` answers nil, as when another reader holds the lease. `SCAN` finds nothing to sweep.
fn answer(cmd: &[Vec<u8>]) -> Vec<u8> {
    let Some(name) = cmd.first() else {
        return b"-ERR empty command\r\n".to_vec();
    };
    let mut s = store().lock().unwrap();
    let bulk = |v: Option<&Vec<u8>>| -> Vec<u8> {
        match v {
            None => b"$-1\r\n".to_vec(),
            Some(v) => {
                let mut out = format!("${}\r\n", v.len()).into_bytes();
                out.extend_from_slice(v);
                out.extend_from_slice(b"\r\n");
                out
            }
        }
    };
    let args = &cmd[1..];
    match (name.to_ascii_uppercase().as_slice(), args) {
        (b"GET", [k]) => bulk(s.values.get(k).or_else(|| s.other.get(k))),
        (b"MGET", keys) => {
            let mut out = format!("*{}\r\n", keys.len()).into_bytes();
            for k in keys {
                out.extend(bulk(s.values.get(k).or_else(|| s.other.get(k))));
            }
            out
        }
        (b"PTTL", [k]) => {
            let t = if s.values.contains_key(k) { s.pttl } else { -2 };
            format!(":{t}\r\n").into_bytes()
        }
        (b"EXISTS", keys) => {
            let n = keys.iter().filter(|k| s.values.contains_key(*k)).count();
            format!(":{n}\r\n").into_bytes()
        }
        (b"SET", [..]) if args.iter().any(|a| a.eq_ignore_ascii_case(b"NX")) => b"$-1\r\n".to_vec(),
        (b"SET", [k, v, ..]) => {
            s.other.insert(k.clone(), v.clone());
            b"+OK\r\n".to_vec()
        }
        (b"DEL" | b"UNLINK", keys) => {
            let mut n = 0;
            for k in keys {
                n += usize::from(s.values.remove(k).is_some() || s.other.remove(k).is_some());
                s.deleted.push(k.clone());
            }
            format!(":{n}\r\n").into_bytes()
        }
        (b"SCAN", _) => b"*2\r\n$1\r\n0\r\n*0\r\n".to_vec(),
        (b"PING", _) => b"+PONG\r\n".to_vec(),
        // Both sections the epoch check reads (`run_id`, `master_replid`), whatever is asked.
        (b"INFO", _) => bulk(Some(
            &b"# Server\r\nredis_version:7.0.15\r\nrun_id:0123456789abcdef0123456789abcdef01234567\r\n\
               # Replication\r\nrole:master\r\nmaster_replid:89abcdef0123456789abcdef0123456789abcdef\r\n"
                .to_vec(),
        )),
        (b"CLIENT" | b"SELECT", _) => b"+OK\r\n".to_vec(),
        _ => b"-ERR unknown command\r\n".to_vec(),
    }
}

/// One complete `*N\r\n$len\r\narg\r\n...` command from the front of `buf`, if there is one.
fn parse_command(buf: &mut BytesMut) -> Option<Vec<Vec<u8>>> {
    fn line(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&b[at..end], end + 2))
    }
    let b = &buf[..];
    let (head, mut at) = line(b, 0)?;
    let n: usize = std::str::from_utf8(head.strip_prefix(b"*")?)
        .ok()?
        .parse()
        .ok()?;
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        let (len, next) = line(b, at)?;
        let len: usize = std::str::from_utf8(len.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        if b.len() < next + len + 2 {
            return None;
        }
        args.push(b[next..next + len].to_vec());
        at = next + len + 2;
    }
    buf.advance(at);
    Some(args)
}
