//! Leader election: every replica serves the webhook, one reconciles. The leader holds a
//! `coordination.k8s.io/v1` Lease in the operator's namespace and renews it; the others read it
//! and take it when it is released or not renewed for its duration.
//!
//! Written here rather than taken from a crate: it is the small loop client-go's `leaderelection`
//! runs (optimistic concurrency on the Lease's resourceVersion), and the crates that do it for
//! kube-rs pin kube versions of their own. Rules kept from client-go:
//! - Expiry is judged on this replica's clock, from the moment it first *saw* the current record
//!   (holder, renewTime): clocks of two nodes need not agree.
//! - A leader that cannot renew for `renew_deadline` (< the lease's duration) stops reconciling
//!   before anyone else may take the lease: two controllers never write at once.
//! - On shutdown the leader releases the lease (no holder), so the next replica takes it at its
//!   next try instead of waiting out the duration.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a record stands without a renewal.
    pub lease_duration: Duration,
    /// A leader gives up when it could not renew for this long.
    pub renew_deadline: Duration,
    /// Between two tries (candidates) or renewals (the leader).
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        // client-go's defaults.
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a lease says, as far as the decision goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub renewed: Option<String>,
    pub duration: Duration,
}

impl Record {
    fn of(spec: Option<&LeaseSpec>) -> Self {
        let spec = spec.cloned().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renewed: spec.renew_time.map(|t| t.0.to_string()),
            duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Ours: renew it.
    Renew,
    /// Released, or not renewed for its duration since we saw it: take it.
    Take,
    /// Another replica's, still valid.
    Wait,
}

/// The decision, pure: `unchanged_for` is how long this replica has seen the same record.
pub fn step(record: &Record, me: &str, unchanged_for: Duration) -> Step {
    match &record.holder {
        Some(h) if h == me => Step::Renew,
        None => Step::Take,
        Some(_) if unchanged_for >= record.duration => Step::Take,
        Some(_) => Step::Wait,
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    me: String,
    timing: Timing,
    /// Set on the Lease when this replica creates it (cleanup on uninstall).
    owner: Option<OwnerReference>,
    /// The record last read, and when it was first seen.
    seen: Option<(Record, Instant)>,
}

impl Elector {
    pub fn new(
        api: Api<Lease>,
        name: &str,
        me: &str,
        timing: Timing,
        owner: Option<OwnerReference>,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            me: me.into(),
            timing,
            owner,
            seen: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.me
    }

    fn spec(&self, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One try: `Ok(true)` when this replica holds the lease afterwards. A conflict (another
    /// replica wrote first) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    owner_references: self.owner.clone().map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None, 0)),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let record = Record::of(current.spec.as_ref());
        let unchanged_for = match &self.seen {
            Some((r, at)) if *r == record => at.elapsed(),
            _ => {
                self.seen = Some((record.clone(), Instant::now()));
                Duration::ZERO
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let next = match step(&record, &self.me, unchanged_for) {
            Step::Wait => return Ok(false),
            Step::Renew => self.spec(spec.acquire_time, spec.lease_transitions.unwrap_or(0)),
            Step::Take => self.spec(None, spec.lease_transitions.unwrap_or(0) + 1),
        };
        // `replace` carries the resourceVersion read: a concurrent writer makes it a conflict.
        let lease = Lease {
            metadata: current.metadata,
            spec: Some(next),
        };
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }

    /// Gives the lease up, if it is still ours, so another replica takes it at once.
    pub async fn release(&mut self) {
        let Ok(Some(current)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(&self.me) {
            return;
        }
        let lease = Lease {
            metadata: current.metadata,
            spec: Some(LeaseSpec {
                holder_identity: None,
                lease_duration_seconds: Some(1),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..spec
            }),
        };
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "leader lease released"),
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "could not release the leader lease")
            }
        }
    }

    /// Runs `lead` while this replica holds the lease, until `shutdown` turns true. `lead` gets a
    /// future that completes when it must stop (lease lost, or shutdown) and is awaited before
    /// the lease is released or retried. `leading` reports the state (a metric).
    pub async fn run<F, Fut>(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        leading: impl Fn(bool),
        lead: F,
    ) where
        F: Fn(Stop) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let timing = self.timing;
        loop {
            // A candidate.
            loop {
                if *shutdown.borrow() {
                    return;
                }
                match tokio::time::timeout(timing.retry_period, self.try_acquire_or_renew()).await {
                    Ok(Ok(true)) => break,
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the leader lease"),
                    Err(_) => tracing::warn!("reading the leader lease timed out"),
                }
                tokio::select! {
                    r = shutdown.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(timing.retry_period) => {}
                }
            }
            tracing::info!(identity = %self.me, "leading: the controller starts");
            leading(true);
            let (stop_tx, stop_rx) = watch::channel(false);
            let mut controller = tokio::spawn(lead(Stop(stop_rx)));
            let mut renewed = Instant::now();
            let lost = loop {
                tokio::select! {
                    r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { break false },
                    _ = &mut controller => {
                        tracing::warn!("the controller ended on its own");
                        break false;
                    }
                    _ = tokio::time::sleep(timing.retry_period) => {
                        let left = timing.renew_deadline.saturating_sub(renewed.elapsed());
                        match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                            Ok(Ok(true)) => renewed = Instant::now(),
                            Ok(Ok(false)) => {}
                            Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew the leader lease"),
                            Err(_) => {}
                        }
                        if renewed.elapsed() >= timing.renew_deadline {
                            break true;
                        }
                    }
                }
            };
            let _ = stop_tx.send(true);
            if !controller.is_finished() {
                // A graceful stop, bounded: once the lease is lost, another replica may take it
                // `lease_duration` after the last renewal, and there must not be two writers.
                let grace = timing
                    .lease_duration
                    .saturating_sub(timing.renew_deadline)
                    .saturating_sub(Duration::from_secs(1));
                if tokio::time::timeout(grace, &mut controller).await.is_err() {
                    tracing::warn!("the controller did not stop in time: aborted");
                    controller.abort();
                    let _ = controller.await;
                }
            }
            leading(false);
            if !lost {
                self.release().await;
                return;
            }
            tracing::warn!(identity = %self.me, "lost the leader lease: the controller stopped");
            self.seen = None;
        }
    }
}

/// Completes when the leader must stop.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

fn conflict_is_false<T>(r: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: Option<&str>, secs: u64) -> Record {
        Record {
            holder: holder.map(String::from),
            renewed: Some("2026-11-29T00:00:00Z".into()),
            duration: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_valid_lease_of_another_is_waited_for_then_taken() {
        let r = record(Some("b"), 15);
        assert_eq!(step(&r, "a", Duration::ZERO), Step::Wait);
        assert_eq!(step(&r, "a", Duration::from_secs(14)), Step::Wait);
        assert_eq!(step(&r, "a", Duration::from_secs(15)), Step::Take);
    }

    #[test]
    fn ours_is_renewed_and_a_released_one_taken_at_once() {
        assert_eq!(
            step(&record(Some("a"), 15), "a", Duration::ZERO),
            Step::Renew
        );
        assert_eq!(step(&record(None, 1), "a", Duration::ZERO), Step::Take);
        let empty = Record::of(Some(&LeaseSpec {
            holder_identity: Some(String::new()),
            ..LeaseSpec::default()
        }));
        assert_eq!(step(&empty, "a", Duration::ZERO), Step::Take);
    }

    #[test]
    fn the_leader_gives_up_before_anyone_may_take_over() {
        let t = Timing::default();
        assert!(t.renew_deadline < t.lease_duration);
        assert!(t.retry_period < t.renew_deadline);
    }
}
