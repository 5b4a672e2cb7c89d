//! The commit stream at run time (`commit_stream.enabled`, docs/commit-stream.md): every
//! sidecar sharing the slot runs this loop; the one holding the slot's lock polls it, applies
//! what other writers committed to the cache (`core::external`), and only then advances the
//! slot. The others wait for the lock, which PostgreSQL releases when the leader's connection
//! ends (its sidecar stopped, died, or stopped answering keepalives; or it stepped down because
//! its cache would not take the changes): a change is never confirmed before it reached Redis.

use crate::core::external::CommittedChange;
use crate::core::ports::CacheStore;
use crate::core::{EntityId, Protocol};
use crate::postgres::Database;
use crate::postgres::commit_stream::{Changes, Slot, changes};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00 UTC).
const PG_EPOCH_US: i64 = 946_684_800_000_000;
/// Pause before asking for the lock again.
const RETRY: Duration = Duration::from_secs(1);
/// Longest pause after failures in a row (doubling from `RETRY`): a table that cannot be
/// published logs twice a minute, not every second.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A leader whose cache refuses the changes this long steps down (another sidecar may reach
/// its Redis).
const STEP_DOWN_AFTER: Duration = Duration::from_secs(10);
/// How often the slot's retained WAL is measured.
const RETAINED_EVERY: Duration = Duration::from_secs(5);

/// Starts the loop; it ends when `stop` is cancelled.
pub fn start<C: CacheStore>(
    protocol: Arc<Protocol<C, Database>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let m = protocol.metrics().commit_stream.clone();
        let mut wait = RETRY;
        // Set when this sidecar made the slot, until the sweep is done (perhaps by a later
        // connection, should this one fail first).
        let mut sweep_pending = false;
        while !stop.is_cancelled() {
            let started = Instant::now();
            match follow(&protocol, &stop, &mut sweep_pending).await {
                Ok(()) => wait = RETRY,
                Err(failure) => {
                    // Failures in a row back off; one after a good while does not.
                    if started.elapsed() > RETRY_MAX {
                        wait = RETRY;
                    }
                    m.errors.with_label_values(&[failure.stage]).inc();
                    tracing::warn!(stage = failure.stage, error = %failure.error, retry_in = ?wait, "commit stream");
                    m.leading.set(0);
                    pause(&stop, wait).await;
                    wait = (wait * 2).min(RETRY_MAX);
                    continue;
                }
            }
            m.leading.set(0);
            pause(&stop, wait).await;
        }
    })
}

struct Failure {
    stage: &'static str,
    error: String,
}

fn at(stage: &'static str) -> impl FnOnce(sqlx::Error) -> Failure {
    move |e| Failure {
        stage,
        error: e.to_string(),
    }
}

async fn pause(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Seconds from a commit (PostgreSQL's clock) to now (this machine's).
fn since_commit(commit_time_us: i64) -> f64 {
    ((now_us() - (commit_time_us + PG_EPOCH_US)) as f64 / 1e6).max(0.0)
}

/// Everything cached may be stale: sweep it (a TRUNCATE of any table does that).
fn sweep() -> CommittedChange {
    CommittedChange::Truncated {
        entity: EntityId::new(0),
    }
}

/// Connects, waits for the lock, then polls until an error, a step down or `stop`.
async fn follow<C: CacheStore>(
    protocol: &Protocol<C, Database>,
    stop: &CancellationToken,
    sweep_pending: &mut bool,
) -> Result<(), Failure> {
    let config = protocol.config();
    let m = &protocol.metrics().commit_stream;
    let options = protocol.rows().connect_options();
    let (mut slot, created) = Slot::open(&options, &config.commit_stream, &config.entities)
        .await
        .map_err(at("connect"))?;
    // A slot made now starts now: what was committed before it (a first start, a database
    // failover, a slot dropped) never comes, so nothing cached can be trusted.
    *sweep_pending |= created;
    while !slot.try_lead().await.map_err(at("connect"))? {
        pause(stop, RETRY).await;
        if stop.is_cancelled() {
            return Ok(());
        }
    }
    m.leading.set(1);
    tracing::info!(slot = %config.commit_stream.slot, created, "commit stream: reading the slot");
    let interval = Duration::from_millis(config.commit_stream.poll_interval_ms);
    let mut advanced = String::new();
    let mut retained_at: Option<Instant> = None;
    while !stop.is_cancelled() {
        let poll = slot.poll().await.map_err(at("poll"))?;
        let mut read = match changes(&poll.messages, &config.entities) {
            Ok(read) => read,
            Err(e) => {
                // What changed cannot be told: every cached row may be stale.
                m.errors.with_label_values(&["decode"]).inc();
                tracing::error!(error = %e, "commit stream: a change could not be read; sweeping the cache");
                Changes {
                    changes: vec![sweep()],
                    ..Changes::default()
                }
            }
        };
        if *sweep_pending {
            read.changes.insert(0, sweep());
        }
        if let Some(&first) = read.commits_us.first() {
            m.lag.set(since_commit(first));
        }
        m.changes
            .with_label_values(&["unusable"])
            .inc_by(read.unusable);
        m.changes
            .with_label_values(&["unknown_table"])
            .inc_by(read.unknown);
        if !read.changes.is_empty() {
            slot.wait_visible(&read.xids).await.map_err(at("poll"))?;
            // Until Redis took them: the slot is not advanced meanwhile.
            let failing_since = Instant::now();
            while let Err(e) = protocol.apply_committed(&read.changes).await {
                m.errors.with_label_values(&["apply"]).inc();
                if let Some(&first) = read.commits_us.first() {
                    m.lag.set(since_commit(first));
                }
                if failing_since.elapsed() >= STEP_DOWN_AFTER {
                    return Err(Failure {
                        stage: "apply",
                        error: format!("{e}; stepping down for another sidecar"),
                    });
                }
                tracing::warn!(error = %e, "commit stream: the cache did not take the changes; retrying");
                pause(stop, Duration::from_millis(100)).await;
                if stop.is_cancelled() {
                    return Ok(());
                }
            }
            *sweep_pending = false;
        }
        for &t in &read.commits_us {
            m.apply_delay.observe(since_commit(t));
        }
        m.lag.set(0.0);
        if poll.upto != advanced {
            slot.advance(&poll.upto).await.map_err(at("advance"))?;
            advanced = poll.upto;
        }
        if retained_at.is_none_or(|t| t.elapsed() >= RETAINED_EVERY) {
            m.retained_wal
                .set(slot.retained_wal().await.map_err(at("poll"))?);
            retained_at = Some(Instant::now());
        }
        if !poll.more {
            pause(stop, interval).await;
        }
    }
    Ok(())
}
