//! The load: what one request is for each target, fixed-rate (open loop) and closed-loop drivers,
//! and the latency statistics.
//!
//! Fixed rate: request `i` is due at `start + i / rate`. A pacer thread releases requests as they
//! fall due, workers (one connection each) take them in order, and each latency is measured from
//! the request's *intended* send time, so a stall delays and counts against every request queued
//! behind it (no coordinated omission).

use crate::http::HttpConn;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use wtc_sidecar::Sidecar;
use wtc_sidecar::core::{
    CacheKey, CacheStatus, CacheStore, Cached, Condition, EntityId, ReadOutcome, WriteOutcome,
};

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// GET of a key that is cached.
    Hit,
    /// GET of a key evicted from Redis beforehand (each request its own key).
    Miss,
    /// PUT of two columns of an existing row.
    Write,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hit => "hit",
            Kind::Miss => "miss",
            Kind::Write => "write",
        }
    }
}

/// Who does the work.
pub enum Client {
    /// The load generator alone: the request completes at once (the floor of the measurement).
    Noop,
    /// One Redis GET through the sidecar library's connection (no PTTL, no envelope check).
    RedisGet(Arc<Sidecar>),
    /// The sidecar's library called in-process: `Sidecar::read` / `Sidecar::put`.
    InProcess(Arc<Sidecar>),
    /// The sidecar process, over HTTP on loopback.
    Http(Box<HttpConn>),
    /// daprd's state API, over HTTP on loopback, on one of its stores (`dapr`): reads and saves
    /// (it has no cache to miss).
    Dapr(Box<HttpConn>, &'static str),
}

/// Which keys and bodies the requests of a phase use.
pub struct Plan {
    pub kind: Kind,
    pub entity: String,
    pub idx: EntityId,
    pub hot_keys: u64,
    pub write_keys: u64,
    /// Misses use cold keys `c{cold_base + i}` for `i` below `cold_count`.
    pub cold_base: u64,
    pub cold_count: u64,
}

impl Plan {
    fn key(&self, i: u64) -> String {
        match self.kind {
            Kind::Hit => format!("h{}", fastrand::u64(..self.hot_keys)),
            Kind::Miss => format!("c{}", self.cold_base + i),
            Kind::Write => format!("w{}", fastrand::u64(..self.write_keys)),
        }
    }

    /// Requests this plan can make (misses run out of cold keys).
    fn limit(&self) -> u64 {
        match self.kind {
            Kind::Miss => self.cold_count,
            _ => u64::MAX,
        }
    }
}

pub fn write_body(i: u64) -> String {
    format!(
        "{{\"owner\":\"writer-{}\",\"balance\":{}.25}}",
        i % 97,
        i % 100_000
    )
}

/// Does request `i`; true when the answer is the expected one (right status and cache outcome).
pub async fn exec(client: &mut Client, plan: &Plan, i: u64) -> bool {
    let key = plan.key(i);
    let want = match plan.kind {
        Kind::Hit => CacheStatus::Hit,
        Kind::Miss => CacheStatus::Miss,
        Kind::Write => CacheStatus::Ok,
    };
    match client {
        Client::Noop => true,
        Client::RedisGet(sc) => {
            let ck = CacheKey::new(&plan.entity, &key);
            matches!(sc.cache().get(&ck, false).await, Ok((Cached::Entry(_), _)))
        }
        Client::InProcess(sc) => match plan.kind {
            Kind::Hit | Kind::Miss => matches!(
                sc.read(plan.idx, &key).await,
                Ok(ReadOutcome { envelope: Some(env), status }) if !env.deleted && status == want
            ),
            Kind::Write => {
                // The same work as the HTTP handler minus HTTP: the body text parsed into its map.
                let raw = write_body(i);
                let Ok(map) = serde_json::from_str::<Map<String, Value>>(&raw) else {
                    return false;
                };
                matches!(
                    sc.put(plan.idx, &key, map, raw, Condition::Always).await,
                    Ok(WriteOutcome::Committed { status, .. }) if status == want
                )
            }
        },
        Client::Dapr(conn, store) => {
            let r = match plan.kind {
                Kind::Hit | Kind::Miss => {
                    let path = format!("/v1.0/state/{store}/{key}");
                    conn.request("GET", &path, None).await
                }
                Kind::Write => {
                    let body = format!("[{{\"key\":{key:?},\"value\":{}}}]", write_body(i));
                    let path = format!("/v1.0/state/{store}");
                    conn.request("POST", &path, Some(body.as_bytes())).await
                }
            };
            match (plan.kind, r) {
                (Kind::Write, Ok(r)) => r.status == 204,
                (_, Ok(r)) => r.status == 200 && r.body_len > 0,
                (_, Err(_)) => false,
            }
        }
        Client::Http(conn) => {
            let path = format!("/v1/entities/{}/{key}", plan.entity);
            let r = match plan.kind {
                Kind::Hit | Kind::Miss => conn.request("GET", &path, None).await,
                Kind::Write => {
                    let body = write_body(i);
                    conn.request("PUT", &path, Some(body.as_bytes())).await
                }
            };
            match r {
                Ok(r) => {
                    matches!(r.status, 200 | 201)
                        && r.body_len > 0
                        && r.cache.as_deref() == Some(want.as_str())
                }
                Err(_) => false,
            }
        }
    }
}

/// A request that does not finish in this time counts as failed (its latency is the timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn timed_exec(client: &mut Client, plan: &Plan, i: u64) -> bool {
    (tokio::time::timeout(REQUEST_TIMEOUT, exec(client, plan, i)).await).unwrap_or_default()
}

/// The raw outcome of one phase.
pub struct Run {
    /// Latencies in nanoseconds, sorted.
    pub lat_ns: Vec<u64>,
    pub ok: u64,
    pub bad: u64,
    pub elapsed: Duration,
}

impl Run {
    pub fn merge(parts: Vec<(Vec<u64>, u64, u64)>, elapsed: Duration) -> Self {
        let mut lat_ns = Vec::new();
        let (mut ok, mut bad) = (0, 0);
        for (l, o, b) in parts {
            lat_ns.extend(l);
            ok += o;
            bad += b;
        }
        lat_ns.sort_unstable();
        Run {
            lat_ns,
            ok,
            bad,
            elapsed,
        }
    }

    /// Nearest-rank percentile, in microseconds.
    pub fn pct_us(&self, p: f64) -> f64 {
        if self.lat_ns.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.lat_ns.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.lat_ns.len()) - 1;
        self.lat_ns[i] as f64 / 1_000.0
    }

    pub fn throughput(&self) -> f64 {
        (self.ok + self.bad) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Sleeps precisely: the pacer thread asks for 1 ns of timer slack (the default, 50 µs, would
/// add up to 50 µs to every measured latency). Best effort: without it, sleeps are just coarser.
fn tighten_timer_slack() {
    let _ = std::fs::write("/proc/thread-self/timerslack_ns", "1");
}

/// Open loop at `rate` requests per second for `duration`; one worker task per client.
pub async fn fixed_rate(
    clients: Vec<Client>,
    plan: Arc<Plan>,
    rate: f64,
    duration: Duration,
) -> (Vec<Client>, Run) {
    let total = ((rate * duration.as_secs_f64()) as u64)
        .min(plan.limit())
        .max(1);
    let workers = clients.len();
    let permits = Arc::new(Semaphore::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(20);
    let due_at = move |i: u64| start + Duration::from_secs_f64(i as f64 / rate);

    let pacer = {
        let permits = Arc::clone(&permits);
        std::thread::spawn(move || {
            tighten_timer_slack();
            let mut released = 0u64;
            while released < total {
                let now = Instant::now();
                if now >= start {
                    let due = (((now - start).as_secs_f64() * rate) as u64 + 1).min(total);
                    if due > released {
                        permits.add_permits((due - released) as usize);
                        released = due;
                    }
                }
                if released < total {
                    let at = due_at(released);
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                }
            }
            // Lets every worker see that the phase is over.
            permits.add_permits(workers);
        })
    };

    let mut tasks = Vec::with_capacity(workers);
    for mut client in clients {
        let (plan, permits, next) = (Arc::clone(&plan), Arc::clone(&permits), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity((total as usize / workers.max(1)) * 2 + 16);
            let (mut ok, mut bad) = (0u64, 0u64);
            loop {
                match permits.acquire().await {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let intended = due_at(i);
                let good = timed_exec(&mut client, &plan, i).await;
                lat.push(
                    Instant::now()
                        .saturating_duration_since(intended)
                        .as_nanos() as u64,
                );
                if good {
                    ok += 1;
                } else {
                    bad += 1;
                }
            }
            (client, (lat, ok, bad))
        }));
    }
    let mut clients = Vec::with_capacity(workers);
    let mut parts = Vec::with_capacity(workers);
    for t in tasks {
        let (c, part) = t.await.expect("worker task");
        clients.push(c);
        parts.push(part);
    }
    let elapsed = Instant::now().saturating_duration_since(start);
    pacer.join().expect("pacer thread");
    (clients, Run::merge(parts, elapsed))
}

/// Closed loop: every client sends its next request as soon as the previous one is answered,
/// for `duration` (or until a miss phase runs out of cold keys).
pub async fn closed_loop(
    clients: Vec<Client>,
    plan: Arc<Plan>,
    duration: Duration,
) -> (Vec<Client>, Run) {
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + duration;
    let limit = plan.limit();
    let mut tasks = Vec::with_capacity(clients.len());
    for mut client in clients {
        let (plan, next, stop) = (Arc::clone(&plan), Arc::clone(&next), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let (mut ok, mut bad) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                let sent = Instant::now();
                let good = timed_exec(&mut client, &plan, i).await;
                let done = Instant::now();
                lat.push((done - sent).as_nanos() as u64);
                if good {
                    ok += 1;
                } else {
                    bad += 1;
                }
                if done >= deadline {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            (client, (lat, ok, bad))
        }));
    }
    let mut clients = Vec::new();
    let mut parts = Vec::new();
    for t in tasks {
        let (c, part) = t.await.expect("worker task");
        clients.push(c);
        parts.push(part);
    }
    let elapsed = start.elapsed();
    (clients, Run::merge(parts, elapsed))
}
