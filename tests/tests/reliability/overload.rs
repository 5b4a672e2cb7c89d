//! Overload: writes offered at 2x and 5x what the sidecar can commit. Capacity is made small and
//! steady on purpose (a trigger sleeps 5 ms per row, two database connections), so the offered
//! load is really over it on any machine. Admitted writes must answer within their deadline,
//! the rest must be shed at once with 503, and the sidecar's memory must stay under a ceiling.

use crate::{report, serial};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wtc_tests::*;

const MAX_IN_FLIGHT: usize = 8;
const QUEUE_WAIT_MS: u64 = 50;
const STATEMENT_TIMEOUT_MS: u64 = 1_000;
/// Queue wait + the database deadline (statement timeout + 500 ms for the pool and the network)
/// + the cache step's retry budget (default: 3 retries, at most 100 ms apart) and some slack.
const DEADLINE: Duration = Duration::from_millis(QUEUE_WAIT_MS + STATEMENT_TIMEOUT_MS + 500 + 450);
const RSS_CEILING_KIB: u64 = 64 * 1024;

#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    shed: u64,
    other: u64,
    admitted_latency: Vec<Duration>,
    slowest_shed: Duration,
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Closed loop: MAX_IN_FLIGHT writers as fast as they can, for `for_`; writes per second.
async fn capacity(sc: &Arc<Sidecar>, for_: Duration) -> f64 {
    let until = Instant::now() + for_;
    let mut tasks = vec![];
    for w in 0..MAX_IN_FLIGHT {
        let sc = Arc::clone(sc);
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            while Instant::now() < until {
                let r = sc.put("accounts", &format!("c{w}"), json!({"n": ok})).await;
                ok += u64::from(r.status == 200 || r.status == 201);
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    ok as f64 / for_.as_secs_f64()
}

/// Open loop: one write every 1/rate s for `for_`, whatever the answers.
async fn offer(sc: &Arc<Sidecar>, rate: f64, for_: Duration) -> Tally {
    let every = Duration::from_secs_f64(1.0 / rate);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let until = Instant::now() + for_;
    let mut tasks = vec![];
    let mut n = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        n += 1;
        let sc = Arc::clone(sc);
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let req = sc
                .http
                .put(sc.url("accounts", &format!("o{}", n % 64)))
                .json(&json!({"n": n}));
            let r = sc.try_send(req).await;
            (r, started.elapsed())
        }));
    }
    let mut t = Tally::default();
    for task in tasks {
        let (r, took) = task.await.unwrap();
        match r {
            Ok(r) if r.status == 200 || r.status == 201 => {
                t.ok += 1;
                t.admitted_latency.push(took);
            }
            Ok(r) if r.status == 503 && r.error_code() == "overloaded" => {
                t.shed += 1;
                t.slowest_shed = t.slowest_shed.max(took);
            }
            _ => {
                t.other += 1;
                t.admitted_latency.push(took);
            }
        }
    }
    t.admitted_latency.sort();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_at_2x_and_5x_is_shed_and_admitted_writes_meet_their_deadline() {
    let _serial = serial().await;
    let TestBed { pool, redis, table } = TestBed::new("overload").await;
    for sql in [
        format!(
            "CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(0.005); RETURN NEW; END $$"
        ),
        format!(
            "CREATE TRIGGER {table}_slow BEFORE INSERT OR UPDATE ON {table} \
             FOR EACH ROW EXECUTE FUNCTION {table}_slow()"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    let sc = Arc::new(
        Fixture::new(&redis.url())
            .entity("accounts", &table)
            .with(|c| {
                c.database.pool_size = 2;
                c.database.statement_timeout_ms = STATEMENT_TIMEOUT_MS;
                c.limits.max_in_flight = MAX_IN_FLIGHT;
                c.limits.max_queue_wait_ms = QUEUE_WAIT_MS;
            })
            .start()
            .await,
    );
    let seconds = Duration::from_secs(if crate::long() { 20 } else { 3 });
    let base = capacity(&sc, Duration::from_secs(2)).await;
    assert!(
        base > 20.0,
        "capacity {base:.0} writes/s is too low to measure"
    );
    let mut figures = serde_json::Map::new();
    figures.insert("capacity_writes_per_second".into(), json!(base.round()));
    for factor in [2.0, 5.0] {
        let t = offer(&sc, base * factor, seconds).await;
        let p50 = percentile(&t.admitted_latency, 0.5);
        let p99 = percentile(&t.admitted_latency, 0.99);
        let max = t.admitted_latency.last().copied().unwrap_or_default();
        println!(
            "overload {factor}x: ok {}, shed {}, other {}, admitted p50 {p50:?} p99 {p99:?} \
             max {max:?}, slowest shed {:?}",
            t.ok, t.shed, t.other, t.slowest_shed
        );
        figures.insert(
            format!("{factor}x"),
            json!({
                "offered_per_second": (base * factor).round(),
                "ok": t.ok,
                "shed": t.shed,
                "other_errors": t.other,
                "goodput_per_second": t.ok as f64 / seconds.as_secs_f64(),
                "admitted_p50_ms": p50.as_secs_f64() * 1e3,
                "admitted_p99_ms": p99.as_secs_f64() * 1e3,
                "admitted_max_ms": max.as_secs_f64() * 1e3,
                "slowest_shed_ms": t.slowest_shed.as_secs_f64() * 1e3,
            }),
        );
        assert!(t.shed > 0, "{factor}x: nothing was shed: {t:?}");
        assert!(t.ok > 0, "{factor}x: nothing got through");
        assert!(
            max <= DEADLINE,
            "{factor}x: an admitted write took {max:?}, over its deadline {DEADLINE:?}"
        );
        assert!(
            t.slowest_shed < Duration::from_millis(QUEUE_WAIT_MS + 500),
            "{factor}x: a shed write waited {:?}",
            t.slowest_shed
        );
    }
    let rss = peak_rss_kib(sc.pid());
    figures.insert("deadline_ms".into(), json!(DEADLINE.as_millis() as u64));
    figures.insert("peak_rss_kib".into(), json!(rss));
    figures.insert("rss_ceiling_kib".into(), json!(RSS_CEILING_KIB));
    report(
        "overload",
        "writes offered at 2x and 5x capacity (max_in_flight 8, max_queue_wait_ms 50)",
        serde_json::Value::Object(figures),
    );
    assert!(
        rss < RSS_CEILING_KIB,
        "peak RSS {rss} KiB over the {RSS_CEILING_KIB} KiB ceiling"
    );
}
