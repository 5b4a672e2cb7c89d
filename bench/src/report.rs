//! The figures of a run: JSON (for tests and tools) and the Markdown of docs/benchmarks.md.

use crate::Target;
use crate::load::{Kind, Run};
use serde_json::{Value, json};
use std::fmt::Write;
use std::path::Path;

/// CPU time per request of each process taking part in a phase (µs; `None`: not measured).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuPerRequest {
    /// wtc-bench itself: the load generator, plus the in-process side's work.
    pub bench_us: Option<f64>,
    pub redis_us: Option<f64>,
    /// The process answering HTTP: the sidecar, or the HTTP hop alone.
    pub server_us: Option<f64>,
}

pub const PCTS: [(f64, &str); 4] = [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9")];

/// One measured phase.
#[derive(Debug, Clone)]
pub struct Phase {
    pub kind: Kind,
    pub target: Target,
    /// Fixed rate (req/s); `None`: closed loop.
    pub rate: Option<f64>,
    pub conns: usize,
    /// p50, p90, p99, p99.9 in µs.
    pub pcts_us: [f64; 4],
    pub max_us: f64,
    pub ok: u64,
    pub bad: u64,
    pub throughput: f64,
    pub cpu: CpuPerRequest,
    pub sidecar_rss_max_kib: Option<u64>,
}

impl Phase {
    pub fn new(
        kind: Kind,
        target: Target,
        rate: Option<f64>,
        conns: usize,
        run: &Run,
        cpu: CpuPerRequest,
        rss: Option<u64>,
    ) -> Self {
        Self {
            kind,
            target,
            rate,
            conns,
            pcts_us: PCTS.map(|(p, _)| run.pct_us(p)),
            max_us: run.pct_us(100.0),
            ok: run.ok,
            bad: run.bad,
            throughput: run.throughput(),
            cpu,
            sidecar_rss_max_kib: rss,
        }
    }

    /// The sidecar process's CPU per request (sidecar phases only).
    pub fn sidecar_cpu_us_per_req(&self) -> Option<f64> {
        self.cpu
            .server_us
            .filter(|_| self.target == Target::Sidecar)
    }

    pub fn one_line(&self) -> String {
        let mode = match self.rate {
            Some(r) => format!("{r:.0} req/s"),
            None => format!("closed loop x{}", self.conns),
        };
        let mut s = format!(
            "{:<5} {:<15} {:<16} p50 {:>8.1} p90 {:>8.1} p99 {:>8.1} p99.9 {:>8.1} µs, {:>8.0} req/s, {} ok, {} bad",
            self.kind.name(),
            self.target.name(),
            mode,
            self.pcts_us[0],
            self.pcts_us[1],
            self.pcts_us[2],
            self.pcts_us[3],
            self.throughput,
            self.ok,
            self.bad
        );
        if let Some(c) = self.cpu.server_us {
            let _ = write!(s, ", server CPU {c:.1} µs/req");
        }
        if let Some(r) = self.sidecar_rss_max_kib {
            let _ = write!(s, ", RSS max {:.1} MiB", r as f64 / 1024.0);
        }
        s
    }

    fn to_json(&self) -> Value {
        json!({
            "kind": self.kind.name(),
            "target": self.target.name(),
            "rate": self.rate,
            "conns": self.conns,
            "p50_us": self.pcts_us[0],
            "p90_us": self.pcts_us[1],
            "p99_us": self.pcts_us[2],
            "p999_us": self.pcts_us[3],
            "max_us": self.max_us,
            "ok": self.ok,
            "bad": self.bad,
            "throughput": self.throughput,
            "sidecar_cpu_us_per_req": self.sidecar_cpu_us_per_req(),
            "cpu_us_per_req": {
                "bench": self.cpu.bench_us,
                "redis": self.cpu.redis_us,
                "server": self.cpu.server_us,
            },
            "sidecar_rss_max_kib": self.sidecar_rss_max_kib,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Herd {
    pub target: Target,
    pub readers: usize,
    /// Database reads per round (one cold key per round).
    pub db_reads: Vec<i64>,
    pub answered_from_cache: u64,
    pub answered_from_db: u64,
    /// Answered `503 overloaded` by the sidecar's load shedding (`limits.max_in_flight`).
    pub shed: u64,
    pub failed: u64,
    pub span_ms: Vec<f64>,
}

impl Herd {
    pub fn max_reads(&self) -> i64 {
        self.db_reads.iter().copied().max().unwrap_or(0)
    }

    pub fn one_line(&self) -> String {
        format!(
            "herd  {:<15} {} readers x {} rounds: database reads per cold key {:?}; {} answered hit, {} miss, {} shed (503), {} failed",
            self.target.name(),
            self.readers,
            self.db_reads.len(),
            self.db_reads,
            self.answered_from_cache,
            self.answered_from_db,
            self.shed,
            self.failed
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "target": self.target.name(),
            "readers": self.readers,
            "db_reads": self.db_reads,
            "answered_from_cache": self.answered_from_cache,
            "answered_from_db": self.answered_from_db,
            "shed": self.shed,
            "failed": self.failed,
            "span_ms": self.span_ms,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Batches {
    pub target: Target,
    /// One `POST /v1/batch` (in-process: `Sidecar::write_batch`) per batch; else 100 single writes.
    pub endpoint: bool,
    pub batches: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub writes_per_s: f64,
    pub bad_writes: u64,
}

impl Batches {
    pub fn new(target: Target, endpoint: bool, run: &Run, bad_writes: u64) -> Self {
        Self {
            target,
            endpoint,
            batches: run.ok,
            p50_ms: run.pct_us(50.0) / 1e3,
            p99_ms: run.pct_us(99.0) / 1e3,
            writes_per_s: 100.0 * run.ok as f64 / run.elapsed.as_secs_f64().max(1e-9),
            bad_writes,
        }
    }

    pub fn one_line(&self) -> String {
        format!(
            "batch {:<15} {} x {}: p50 {:.2} ms, p99 {:.2} ms, {:.0} writes/s, {} bad",
            self.target.name(),
            self.batches,
            self.how(),
            self.p50_ms,
            self.p99_ms,
            self.writes_per_s,
            self.bad_writes
        )
    }

    fn how(&self) -> &'static str {
        match (self.endpoint, self.target) {
            (true, Target::Sidecar) => "POST /v1/batch of 100 writes",
            (true, _) => "Sidecar::write_batch of 100 writes",
            (false, Target::Sidecar) => "100 single PUTs, one after another",
            (false, _) => "100 Sidecar::put, one after another",
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "target": self.target.name(),
            "endpoint": self.endpoint,
            "batches": self.batches,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "writes_per_s": self.writes_per_s,
            "bad_writes": self.bad_writes,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub load_before: String,
    pub load_after: String,
    pub synchronous_commit: String,
    /// How the database URL's connections are made: `TLSv1.3` etc., or `no TLS`.
    pub pg_tls: String,
    pub pg_version: String,
    pub redis_version: String,
    pub pool_size: u32,
    pub date: String,
    /// `git describe --always --dirty` of the directory the run started in.
    pub commit: String,
}

pub struct Report {
    pub short: bool,
    pub command: String,
    pub machine: Machine,
    pub conns: usize,
    pub seconds: f64,
    pub peak_seconds: f64,
    pub slices: usize,
    pub sidecar_binary: String,
    /// Workers of the sidecar and the hop, GOMAXPROCS of daprd (`None`: one per core).
    pub sidecar_threads: Option<usize>,
    pub rss_start_kib: Option<u64>,
    pub rss_idle_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub phases: Vec<Phase>,
    /// The sidecar on plain TCP against the same on TLS to Redis (the `tls` part).
    pub tls: Vec<Phase>,
    /// The `dapr` part: in-process, the sidecar and daprd's two stores, side by side.
    pub dapr: Vec<Phase>,
    pub dapr_rss_idle_kib: Option<u64>,
    pub herds: Vec<Herd>,
    pub batches: Vec<Batches>,
    pub wall_seconds: f64,
}

fn mib(k: Option<u64>) -> String {
    k.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "n/a".into())
}

fn signed(v: f64) -> String {
    if v >= 0.0 {
        format!("+{v:.1}")
    } else {
        format!("{v:.1}")
    }
}

impl Report {
    pub fn find(&self, kind: Kind, target: Target, rate: Option<f64>) -> Option<&Phase> {
        self.phases
            .iter()
            .find(|p| p.kind == kind && p.target == target && p.rate == rate)
    }

    /// Fixed rates measured for a kind, in order.
    pub fn rates(&self, kind: Kind) -> Vec<f64> {
        rates_of(&self.phases, kind)
    }

    pub fn to_json(&self) -> Value {
        let m = &self.machine;
        json!({
            "short": self.short,
            "command": self.command,
            "machine": {
                "nproc": m.nproc, "cpu_model": m.cpu_model, "load_before": m.load_before,
                "load_after": m.load_after, "synchronous_commit": m.synchronous_commit, "pg_tls": m.pg_tls,
                "pg_version": m.pg_version, "redis_version": m.redis_version,
                "pool_size": m.pool_size, "date": m.date, "commit": m.commit,
            },
            "conns": self.conns,
            "seconds": self.seconds,
            "peak_seconds": self.peak_seconds,
            "slices": self.slices,
            "sidecar_binary": self.sidecar_binary,
            "sidecar_threads": self.sidecar_threads,
            "rss_start_kib": self.rss_start_kib,
            "rss_idle_kib": self.rss_idle_kib,
            "rss_after_kib": self.rss_after_kib,
            "phases": self.phases.iter().map(Phase::to_json).collect::<Vec<_>>(),
            "tls": self.tls.iter().map(Phase::to_json).collect::<Vec<_>>(),
            "dapr": self.dapr.iter().map(Phase::to_json).collect::<Vec<_>>(),
            "dapr_rss_idle_kib": self.dapr_rss_idle_kib,
            "herds": self.herds.iter().map(Herd::to_json).collect::<Vec<_>>(),
            "batches": self.batches.iter().map(Batches::to_json).collect::<Vec<_>>(),
            "targets": self.targets().iter().map(|t| json!({
                "figure": t.figure, "target": t.target, "measured": t.measured, "met": t.met,
            })).collect::<Vec<_>>(),
            "wall_seconds": self.wall_seconds,
        })
    }

    /// Every process's CPU per request, phase by phase: what a request costs the machine on
    /// each side, including the wake-ups that a fixed rate pays and a closed loop does not.
    fn cpu_by_process(&self, w: &mut String) {
        let _ = writeln!(
            w,
            "\n### CPU time per request of every process taking part\n\n\
             Same method as above, for each process: `wtc-bench` (the load generator, and on the in-process side \
             also the sidecar library's work), `redis-server`, and the HTTP server (the sidecar, or the HTTP hop \
             alone). The application's share of an in-process hit is roughly `wtc-bench` in-process minus \
             `wtc-bench` generator alone. PostgreSQL is not counted.\n"
        );
        let _ = writeln!(
            w,
            "| workload | rate (req/s) | side | wtc-bench | redis-server | HTTP server | all three |"
        );
        let _ = writeln!(w, "| --- | --: | --- | --: | --: | --: | --: |");
        let f = |v: Option<f64>| {
            v.map(|v| format!("{v:.1} µs"))
                .unwrap_or_else(|| "—".into())
        };
        for p in &self.phases {
            let c = p.cpu;
            let sum =
                c.bench_us.unwrap_or(0.0) + c.redis_us.unwrap_or(0.0) + c.server_us.unwrap_or(0.0);
            let rate = p
                .rate
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "closed loop".into());
            let _ = writeln!(
                w,
                "| {} | {rate} | {} | {} | {} | {} | {} |",
                p.kind.name(),
                p.target.name(),
                f(c.bench_us),
                f(c.redis_us),
                f(c.server_us),
                f(Some(sum))
            );
        }
    }

    /// The targets, each against what this run measured.
    pub fn targets(&self) -> Vec<TargetRow> {
        let mut rows = Vec::new();
        let mut push = |figure: String, target: &str, measured: String, met: Option<bool>| {
            rows.push(TargetRow {
                figure,
                target: target.to_string(),
                measured,
                met,
            })
        };
        for rate in self.rates(Kind::Hit) {
            let (Some(base), Some(sc)) = (
                self.find(Kind::Hit, Target::InProcess, Some(rate)),
                self.find(Kind::Hit, Target::Sidecar, Some(rate)),
            ) else {
                continue;
            };
            let get = self.find(Kind::Hit, Target::RedisGet, Some(rate));
            let hop = match (
                self.find(Kind::Hit, Target::HttpHop, Some(rate)),
                self.find(Kind::Hit, Target::Generator, Some(rate)),
            ) {
                (Some(h), Some(g)) => Some((h, g)),
                _ => None,
            };
            for (i, limit, name) in [(0usize, 25.0, "p50"), (2, 100.0, "p99")] {
                let d = sc.pcts_us[i] - base.pcts_us[i];
                let mut vs_get = get
                    .map(|g| {
                        format!(
                            "{} µs over the bare Redis GET",
                            signed(sc.pcts_us[i] - g.pcts_us[i])
                        )
                    })
                    .unwrap_or_default();
                if let Some((h, g)) = hop {
                    let _ = write!(
                        vs_get,
                        "; an HTTP exchange with nothing behind it: {} µs over the generator alone",
                        signed(h.pcts_us[i] - g.pcts_us[i])
                    );
                }
                let vs_get = if vs_get.is_empty() {
                    vs_get
                } else {
                    format!(" ({vs_get})")
                };
                push(
                    format!("hit {name} at {rate:.0} req/s, sidecar − in-process"),
                    &format!("≤ +{limit:.0} µs"),
                    format!("{} µs{vs_get}", signed(d)),
                    Some(d <= limit),
                );
            }
        }
        let peak_ratio = |kind| match (
            self.find(kind, Target::InProcess, None),
            self.find(kind, Target::Sidecar, None),
        ) {
            (Some(b), Some(s)) if b.throughput > 0.0 => {
                Some((s.throughput / b.throughput, s.throughput, b.throughput))
            }
            _ => None,
        };
        if let Some((r, s, b)) = peak_ratio(Kind::Hit) {
            let hop = self
                .find(Kind::Hit, Target::HttpHop, None)
                .map(|h| {
                    format!(
                        "; the HTTP hop alone: {:.0} req/s, {:.2}x",
                        h.throughput,
                        h.throughput / b.max(1e-9)
                    )
                })
                .unwrap_or_default();
            push(
                "peak hit throughput, sidecar / in-process".into(),
                "≥ 0.5x",
                format!("{r:.2}x ({s:.0} / {b:.0} req/s{hop})"),
                Some(r >= 0.5),
            );
        }
        for rate in self.rates(Kind::Write) {
            if let (Some(b), Some(s)) = (
                self.find(Kind::Write, Target::InProcess, Some(rate)),
                self.find(Kind::Write, Target::Sidecar, Some(rate)),
            ) && b.pcts_us[0] > 0.0
            {
                let r = s.pcts_us[0] / b.pcts_us[0];
                push(
                    format!("write p50 at {rate:.0} req/s, sidecar / in-process"),
                    "≤ 1.05x",
                    format!("{r:.3}x ({:.0} / {:.0} µs)", s.pcts_us[0], b.pcts_us[0]),
                    Some(r <= 1.05),
                );
            }
        }
        if let Some((r, s, b)) = peak_ratio(Kind::Write) {
            push(
                "peak write throughput, sidecar / in-process".into(),
                "≥ 0.95x",
                format!("{r:.2}x ({s:.0} / {b:.0} req/s)"),
                Some(r >= 0.95),
            );
        }
        for p in self
            .phases
            .iter()
            .filter(|p| p.kind == Kind::Hit && p.target == Target::Sidecar)
        {
            if let Some(c) = p.sidecar_cpu_us_per_req() {
                let mode = match p.rate {
                    Some(r) => format!("at {r:.0} req/s"),
                    None => "at peak".into(),
                };
                push(
                    format!("sidecar CPU per hit {mode}"),
                    "≤ 20 µs",
                    format!("{c:.1} µs"),
                    Some(c <= 20.0),
                );
            }
        }
        if let Some(k) = self.rss_idle_kib {
            push(
                "sidecar RSS idle (after warm-up)".into(),
                "≤ 15 MiB",
                mib(Some(k)),
                Some(k as f64 / 1024.0 <= 15.0),
            );
        }
        let top_hit_rate = self.rates(Kind::Hit).into_iter().fold(0.0, f64::max);
        if let Some(k) = self
            .find(Kind::Hit, Target::Sidecar, Some(top_hit_rate))
            .and_then(|p| p.sidecar_rss_max_kib)
        {
            push(
                format!("sidecar RSS under load ({top_hit_rate:.0} hits/s), max"),
                "≤ 40 MiB",
                mib(Some(k)),
                Some(k as f64 / 1024.0 <= 40.0),
            );
        }
        for h in self.herds.iter().filter(|h| h.target == Target::Sidecar) {
            push(
                format!(
                    "herd: database reads per cold key, {} readers, one sidecar (worst of {})",
                    h.readers,
                    h.db_reads.len()
                ),
                "≤ 1",
                h.max_reads().to_string(),
                Some(h.max_reads() <= 1),
            );
        }
        let batch_rate = |endpoint: bool| {
            self.batches
                .iter()
                .find(|b| b.target == Target::Sidecar && b.endpoint == endpoint)
                .map(|b| b.writes_per_s)
        };
        if let (Some(one), Some(singles)) = (batch_rate(true), batch_rate(false))
            && singles > 0.0
        {
            let r = one / singles;
            push(
                "batch of 100 writes through the sidecar: write throughput, one batch / 100 single writes"
                    .into(),
                "≥ 10x",
                format!("{r:.1}x ({one:.0} / {singles:.0} writes/s)"),
                Some(r >= 10.0),
            );
        }
        rows
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let w = &mut s;
        let _ = writeln!(
            w,
            "Run of {}{} at commit `{}`: `{}` (sidecar: `{}`), {:.0} s in all.\n",
            m.date,
            if self.short { ", SHORT mode" } else { "" },
            m.commit,
            self.command,
            self.sidecar_binary,
            self.wall_seconds
        );
        let _ = writeln!(
            w,
            "Machine: {} CPUs (`nproc`), {}; load average (1/5/15 min) {} before, {} after; the load generator, \
             the sidecar, PostgreSQL {} and Redis {} all share these cores. PostgreSQL `synchronous_commit = {}`, \
             connections {} on both sides (what the database URL gives); database pool {} connections on both sides; {} connections (workers) per phase; fixed-rate phases {} s, \
             closed-loop phases {} s, each run as {} slices alternating between the sides. {}\n",
            m.nproc,
            m.cpu_model,
            m.load_before,
            m.load_after,
            m.pg_version,
            m.redis_version,
            m.synchronous_commit,
            m.pg_tls,
            m.pool_size,
            self.conns,
            self.seconds,
            self.peak_seconds,
            self.slices,
            match self.sidecar_threads {
                Some(n) => format!(
                    "The sidecar and the HTTP hop run {n} tokio worker(s) (`TOKIO_WORKER_THREADS`; one is the \
                     current-thread scheduler), daprd `GOMAXPROCS={n}`: what each gets under a CPU limit of {n} \
                     (the chart's default for the sidecar is one CPU). The load generator and the in-process \
                     library use every core."
                ),
                None => "The sidecar, the HTTP hop and daprd use every core.".to_string(),
            }
        );

        let _ = writeln!(w, "### Targets (issue 6)\n");
        let _ = writeln!(
            w,
            "| figure | target | measured | met |\n| --- | --- | --- | --- |"
        );
        for t in self.targets() {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} |",
                t.figure, t.target, t.measured, met
            );
        }

        let _ = writeln!(
            w,
            "\n### Latency at fixed rates (µs, from each request's intended send time)\n"
        );
        let _ = writeln!(
            w,
            "| workload | rate (req/s) | percentile | generator alone | HTTP hop alone | Redis GET | in-process | sidecar | sidecar − in-process | sidecar / in-process |"
        );
        let _ = writeln!(
            w,
            "| --- | --: | --- | --: | --: | --: | --: | --: | --: | --: |"
        );
        for kind in [Kind::Hit, Kind::Miss, Kind::Write] {
            for rate in self.rates(kind) {
                let cell = |t| {
                    self.find(kind, t, Some(rate))
                        .map(|p| p.pcts_us)
                        .map_or([None; 4], |a| a.map(Some))
                };
                let (gen_, hop, get, base, sc) = (
                    cell(Target::Generator),
                    cell(Target::HttpHop),
                    cell(Target::RedisGet),
                    cell(Target::InProcess),
                    cell(Target::Sidecar),
                );
                for (i, (_, name)) in PCTS.iter().enumerate() {
                    let f =
                        |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "—".into());
                    let (d, r) = match (base[i], sc[i]) {
                        (Some(b), Some(s)) if b > 0.0 => (signed(s - b), format!("{:.2}x", s / b)),
                        _ => ("—".into(), "—".into()),
                    };
                    let _ = writeln!(
                        w,
                        "| {} | {rate:.0} | {name} | {} | {} | {} | {} | {} | {d} | {r} |",
                        kind.name(),
                        f(gen_[i]),
                        f(hop[i]),
                        f(get[i]),
                        f(base[i]),
                        f(sc[i])
                    );
                }
            }
        }
        let bad: Vec<String> = self
            .phases
            .iter()
            .filter(|p| p.bad > 0)
            .map(|p| {
                format!(
                    "{} {} {:?}: {}",
                    p.kind.name(),
                    p.target.name(),
                    p.rate,
                    p.bad
                )
            })
            .collect();
        let _ = writeln!(
            w,
            "\nRequests not answered as expected (wrong status or `X-Wtc-Cache`): {}.",
            if bad.is_empty() {
                "none".to_string()
            } else {
                bad.join("; ")
            }
        );

        let _ = writeln!(
            w,
            "\n### Peak throughput (closed loop, {} connections)\n",
            self.conns
        );
        let _ = writeln!(
            w,
            "| workload | in-process (req/s) | sidecar (req/s) | sidecar − in-process | sidecar / in-process | in-process p50 / p99 (µs) | sidecar p50 / p99 (µs) | sidecar CPU per request |"
        );
        let _ = writeln!(w, "| --- | --: | --: | --: | --: | --: | --: | --: |");
        for kind in [Kind::Hit, Kind::Miss, Kind::Write] {
            if let (Some(b), Some(s)) = (
                self.find(kind, Target::InProcess, None),
                self.find(kind, Target::Sidecar, None),
            ) {
                let _ = writeln!(
                    w,
                    "| {} | {:.0} | {:.0} | {:+.0} | {:.2}x | {:.0} / {:.0} | {:.0} / {:.0} | {} |",
                    kind.name(),
                    b.throughput,
                    s.throughput,
                    s.throughput - b.throughput,
                    s.throughput / b.throughput.max(1e-9),
                    b.pcts_us[0],
                    b.pcts_us[2],
                    s.pcts_us[0],
                    s.pcts_us[2],
                    s.sidecar_cpu_us_per_req()
                        .map(|c| format!("{c:.1} µs"))
                        .unwrap_or_default()
                );
            }
        }
        if let Some(h) = self.find(Kind::Hit, Target::HttpHop, None) {
            let _ = writeln!(
                w,
                "\nThe HTTP hop alone (the same HTTP stack answering at once, nothing behind it), closed loop: \
                 {:.0} req/s, p50 / p99 {:.0} / {:.0} µs, its CPU per request {}: the most any HTTP hop \
                 answers on this machine with this load generator.",
                h.throughput,
                h.pcts_us[0],
                h.pcts_us[2],
                h.cpu
                    .server_us
                    .map(|c| format!("{c:.1} µs"))
                    .unwrap_or_else(|| "—".into())
            );
        }

        let _ = writeln!(
            w,
            "\n### The sidecar process: CPU time per request and resident memory\n"
        );
        let _ = writeln!(
            w,
            "CPU time is utime + stime of all its threads from `/proc/<pid>/stat` across the phase, divided by \
             the phase's requests; memory is `VmRSS` from `/proc/<pid>/status`, sampled every 50 ms. RSS just after \
             start: {}; idle after the warm-up: {}; at the end of the run (after the herd's connections): {}.\n",
            mib(self.rss_start_kib),
            mib(self.rss_idle_kib),
            mib(self.rss_after_kib)
        );
        let _ = writeln!(w, "| phase | requests | CPU per request | max RSS |");
        let _ = writeln!(w, "| --- | --: | --: | --: |");
        for p in self.phases.iter().filter(|p| p.target == Target::Sidecar) {
            let mode = match p.rate {
                Some(r) => format!("{r:.0} req/s"),
                None => "closed loop".into(),
            };
            let _ = writeln!(
                w,
                "| {} at {mode} | {} | {} | {} |",
                p.kind.name(),
                p.ok + p.bad,
                p.sidecar_cpu_us_per_req()
                    .map(|c| format!("{c:.1} µs"))
                    .unwrap_or_default(),
                mib(p.sidecar_rss_max_kib)
            );
        }
        self.cpu_by_process(w);

        let _ = writeln!(w, "\n### Herd: concurrent readers of one cold key\n");
        let _ = writeln!(
            w,
            "| side | readers | rounds | database reads per cold key (pg_stat_statements) | answered `hit` | answered `miss` (from a database read, shared by single-flight) | shed (`503 overloaded`) | failed | time to answer all (ms) |"
        );
        let _ = writeln!(w, "| --- | --: | --: | --- | --: | --: | --: | --: | --- |");
        for h in &self.herds {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {:?} | {} | {} | {} | {} | {} |",
                h.target.name(),
                h.readers,
                h.db_reads.len(),
                h.db_reads,
                h.answered_from_cache,
                h.answered_from_db,
                h.shed,
                h.failed,
                h.span_ms
                    .iter()
                    .map(|m| format!("{m:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }

        let _ = writeln!(
            w,
            "\n### Batches of 100 writes (distinct keys)\n\nOne `POST /v1/batch` of 100 PUTs (one transaction, one pipelined \
             cache step) against one `Sidecar::write_batch` in-process; and, for comparison, the same 100 writes \
             as single PUTs sent one after another on one connection against 100 `Sidecar::put` calls.\n"
        );
        let _ = writeln!(
            w,
            "| how | side | batches | p50 per batch (ms) | p99 per batch (ms) | writes/s | failed writes |"
        );
        let _ = writeln!(w, "| --- | --- | --: | --: | --: | --: | --: |");
        for b in &self.batches {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {:.2} | {:.2} | {:.0} | {} |",
                if b.endpoint {
                    "one batch"
                } else {
                    "100 single writes"
                },
                b.target.name(),
                b.batches,
                b.p50_ms,
                b.p99_ms,
                b.writes_per_s,
                b.bad_writes
            );
        }
        for endpoint in [true, false] {
            if let (Some(b), Some(s)) = (
                self.batches
                    .iter()
                    .find(|b| b.endpoint == endpoint && b.target == Target::InProcess),
                self.batches
                    .iter()
                    .find(|b| b.endpoint == endpoint && b.target == Target::Sidecar),
            ) && b.p50_ms > 0.0
            {
                let _ = writeln!(
                    w,
                    "\n{}: sidecar − in-process per batch at p50 {} ms ({:.2}x).",
                    if endpoint {
                        "One batch"
                    } else {
                        "100 single writes"
                    },
                    signed(s.p50_ms - b.p50_ms),
                    s.p50_ms / b.p50_ms
                );
            }
        }
        self.tls_table(w);
        self.dapr_table(w);
        s
    }

    /// wtc next to Dapr's sidecar (the `dapr` part): latency added over the in-process library,
    /// throughput, CPU and memory of each sidecar process.
    fn dapr_table(&self, w: &mut String) {
        if self.dapr.is_empty() {
            return;
        }
        let _ = writeln!(
            w,
            "\n### Side by side with Dapr\n\nThe same keys and payloads, the same redis-server and \
             PostgreSQL, slices alternating between the targets. daprd (one process, both stores \
             loaded) is driven through its HTTP state API: a read is `GET /v1.0/state/<store>/<key>`, \
             a write `POST /v1.0/state/<store>` of one item. What each promises differs: wtc commits \
             to PostgreSQL first and serves reads from Redis never older than an acknowledged \
             write; daprd's Redis store is a cache with no database behind it, its PostgreSQL store \
             a database with no cache. \"added\" is over the in-process library in the same slices.\n"
        );
        let _ = writeln!(
            w,
            "| phase | target | p50 / p99 (µs) | added p50 / p99 (µs) | req/s | server CPU/req (µs) | Redis CPU/req (µs) | RSS max (MiB) |"
        );
        let _ = writeln!(w, "| --- | --- | --: | --: | --: | --: | --: | --: |");
        let us = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "n/a".into());
        for base in self.dapr.iter().filter(|p| p.target == Target::InProcess) {
            let mode = match base.rate {
                Some(r) => format!("{r:.0} req/s"),
                None => format!("closed loop x{}", base.conns),
            };
            for p in self
                .dapr
                .iter()
                .filter(|p| p.kind == base.kind && p.rate == base.rate)
            {
                let added = match p.target {
                    Target::InProcess => "".to_string(),
                    _ => format!(
                        "{:+.0} / {:+.0}",
                        p.pcts_us[0] - base.pcts_us[0],
                        p.pcts_us[2] - base.pcts_us[2]
                    ),
                };
                let _ = writeln!(
                    w,
                    "| {} at {mode} | {} | {:.0} / {:.0} | {added} | {:.0} | {} | {} | {} |",
                    p.kind.name(),
                    p.target.name(),
                    p.pcts_us[0],
                    p.pcts_us[2],
                    p.throughput,
                    us(p.cpu.server_us),
                    us(p.cpu.redis_us),
                    p.sidecar_rss_max_kib
                        .map(|k| format!("{:.1}", k as f64 / 1024.0))
                        .unwrap_or_else(|| "".into()),
                );
            }
        }
        if let Some(idle) = self.dapr_rss_idle_kib {
            let _ = writeln!(
                w,
                "\ndaprd's RSS idle (both stores loaded): {:.1} MiB; the sidecar's: {}.",
                idle as f64 / 1024.0,
                self.rss_idle_kib
                    .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                    .unwrap_or_else(|| "n/a".into())
            );
        }
    }

    /// The sidecar with Redis over TLS next to plain TCP (the `tls` part), as ratios.
    fn tls_table(&self, w: &mut String) {
        if self.tls.is_empty() {
            return;
        }
        let _ = writeln!(
            w,
            "\n### TLS to Redis\n\nThe same sidecar build twice on the same redis-server, one on its plain \
             port, one on its TLS port (`rediss://`, a private CA), slices alternating.\n"
        );
        let _ = writeln!(
            w,
            "| phase | plain p50 / p99 (µs) | TLS p50 / p99 (µs) | p50 TLS/plain | req/s plain / TLS | sidecar CPU/req plain / TLS (µs) | Redis CPU/req plain / TLS (µs) |"
        );
        let _ = writeln!(w, "| --- | --: | --: | --: | --: | --: | --: |");
        let us = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "n/a".into());
        for plain in self.tls.iter().filter(|p| p.target == Target::Sidecar) {
            let Some(tls) = self.tls.iter().find(|p| {
                p.target == Target::SidecarTls && p.kind == plain.kind && p.rate == plain.rate
            }) else {
                continue;
            };
            let mode = match plain.rate {
                Some(r) => format!("{r:.0} req/s"),
                None => format!("closed loop x{}", plain.conns),
            };
            let _ = writeln!(
                w,
                "| {} at {mode} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2}x | {:.0} / {:.0} | {} / {} | {} / {} |",
                plain.kind.name(),
                plain.pcts_us[0],
                plain.pcts_us[2],
                tls.pcts_us[0],
                tls.pcts_us[2],
                tls.pcts_us[0] / plain.pcts_us[0].max(f64::MIN_POSITIVE),
                plain.throughput,
                tls.throughput,
                us(plain.cpu.server_us),
                us(tls.cpu.server_us),
                us(plain.cpu.redis_us),
                us(tls.cpu.redis_us),
            );
        }
    }
}

pub struct TargetRow {
    pub figure: String,
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

const BEGIN: &str =
    "<!-- wtc-bench:begin (generated by wtc-bench --doc; edit outside these markers) -->";
const END: &str = "<!-- wtc-bench:end -->";

/// Replaces the generated part of the document (between the markers), keeping the rest.
pub fn write_doc(path: &Path, generated: &str) -> Result<(), String> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{generated}\n{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(a), Some(b)) if a < b => format!("{}{block}{}", &old[..a], &old[b + END.len()..]),
        _ => format!("# Benchmarks\n\n{old}{block}\n"),
    };
    std::fs::write(path, new).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Fixed rates of `phases` for a kind, in order (a part's phases: `Report::phases`, `dapr`...).
pub fn rates_of(phases: &[Phase], kind: Kind) -> Vec<f64> {
    let mut r: Vec<f64> = Vec::new();
    for p in phases {
        if p.kind == kind
            && let Some(x) = p.rate
            && !r.contains(&x)
        {
            r.push(x);
        }
    }
    r
}
