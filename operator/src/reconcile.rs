//! The controller: desired objects (from `resources`), applied server-side with one field manager,
//! leftovers removed, then status. `error_policy` backs off; an invalid spec waits for a change.
//!
//! Deleting a cache that pods still use waits (the finalizer `wtc.dev/in-use-by-pods`): its
//! ConfigMap, Secret and managed Redis stay, so those pods keep working and restart with their
//! sidecar, until no injected pod names the cache; then the finalizer goes and the garbage
//! collector removes the rest. The webhook keeps injecting into pods of a cache being deleted:
//! such a pod uses it like the others.
//!
//! Waits are not failures: pods still using a deleted cache, a slot being dropped (for up to
//! `SLOT_DROP_PATIENCE_SECONDS`), and a pass that cannot make the cache's objects in a
//! namespace being deleted come back as `Error` variants (so the finalizer holds) that
//! `error_policy` retries without counting them in `wtc_operator_reconcile_errors_total`.

use crate::commit_stream::{self, DropStage, JobOutcome, Names, Reader, Stream};
use crate::crd::WriteThroughCache;
use crate::injection::INJECTED_LABEL;
use crate::metrics::Metrics;
use crate::redis_admin::{self, PasswordChange};
use crate::redis_auth::{self, Moment, RedisAuth};
use crate::resources::{self, Desired, InvalidSpec, Release};
use crate::sidecars;
use crate::status::{self, Applied, Observed, RedisHealth};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const FIELD_MANAGER: &str = "wtc-operator";
/// Held on every cache while the operator runs it; removed once no injected pod uses the cache.
pub const FINALIZER: &str = "wtc.dev/in-use-by-pods";
/// How long a deleted cache's slot drop is a wait (the drop Job's own deadline): after that it
/// is a failure, with a Warning Event, counted in `wtc_operator_reconcile_errors_total`.
const SLOT_DROP_PATIENCE_SECONDS: i64 = commit_stream::DROP_JOB_DEADLINE_SECONDS;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// The operator's release: what caches that pin no image run.
    pub images: Release,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("the resource has no namespace")]
    NoNamespace,
    /// Not a failure: the cache is being deleted and these pods still use it.
    #[error("{0} pods still use the cache")]
    InUse(usize),
    #[error("finalizer: {0}")]
    Finalizer(Box<finalizer::Error<Error>>),
    /// Not a failure: the commit stream's slot is being dropped (its reader stopping, or the
    /// drop Job running).
    #[error("the commit stream's slot is being dropped: {0}")]
    SlotDropping(String),
    /// The cache is being deleted and its slot's drop failed.
    #[error("the commit stream's slot is not dropped: {0}")]
    SlotNotDropped(String),
    /// Not a failure: a pass that applies the cache failed in a namespace being deleted
    /// (nothing new can be made there, and its content is going); the cache's own deletion
    /// comes next.
    #[error("the namespace is being deleted ({0})")]
    NamespaceTerminating(Box<Error>),
}

impl Error {
    /// Label for `wtc_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "client",
            Error::NoNamespace => "no_namespace",
            Error::InUse(_) => "in_use",
            Error::SlotDropping(_) => "slot_dropping",
            Error::SlotNotDropped(_) => "slot_not_dropped",
            Error::NamespaceTerminating(_) => "namespace_terminating",
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.metric_label()
                }
                _ => "finalizer",
            },
        }
    }

    /// A wait, not a failure: how soon to look again. Waits are not counted as reconcile
    /// errors: a cache deleted with its pods, or with its namespace, would otherwise set off
    /// `WtcOperatorReconcileErrors` every time.
    fn retry_after_wait(&self) -> Option<Duration> {
        match self {
            Error::InUse(_) => Some(Duration::from_secs(10)),
            Error::SlotDropping(_) => Some(Duration::from_secs(5)),
            Error::NamespaceTerminating(_) => Some(Duration::from_secs(10)),
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::CleanupFailed(inner) => inner.retry_after_wait(),
                _ => None,
            },
            _ => None,
        }
    }
}

pub async fn reconcile(cr: Arc<WriteThroughCache>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciliations.inc();
    let ns = cr.namespace().ok_or(Error::NoNamespace)?;
    let caches: Api<WriteThroughCache> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&caches, FINALIZER, cr, |event| async {
        match event {
            finalizer::Event::Apply(cr) => apply_all(&cr, &ctx).await,
            finalizer::Event::Cleanup(cr) => release(&cr, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    // Asked only after an Apply pass failed: the namespace's deletion removes the owned
    // objects before the cache, and each removal brings a pass that cannot make them again.
    // Cleanup's failures stay counted: they are what would hold the namespace's deletion.
    // (Unread, the namespace is taken to stand: the failure is counted as it was.)
    let result = match result {
        Err(Error::Finalizer(e))
            if matches!(e.as_ref(), finalizer::Error::ApplyFailed(_))
                && namespace_terminating(&ctx, &ns).await.unwrap_or(false) =>
        {
            Err(Error::NamespaceTerminating(Box::new(Error::Finalizer(e))))
        }
        other => other,
    };
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

pub fn error_policy(cr: Arc<WriteThroughCache>, error: &Error, ctx: Arc<Context>) -> Action {
    if let Some(after) = error.retry_after_wait() {
        // Waiting, not failing: the pods' comings and goings, the Job's end, the cache's
        // deletion bring the next pass sooner.
        tracing::info!(cache = %cr.name_any(), %error, "waiting");
        return Action::requeue(after);
    }
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.metric_label()])
        .inc();
    tracing::warn!(cache = %cr.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5 + fastrand::u64(..5)))
}

async fn apply_all(cr: &WriteThroughCache, ctx: &Context) -> Result<Action, Error> {
    let ns = cr.namespace().ok_or(Error::NoNamespace)?;
    let client = &ctx.client;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    // Passwords are made once and then read back (a rotation is a change a user wrote there):
    // the desired-objects step stays pure.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let grace = cr
        .spec
        .redis
        .managed
        .as_ref()
        .map_or(0, |m| u64::from(m.password_rotation_seconds));
    let current = secrets.get_opt(&resources::auth_secret_name(cr)).await?;
    let holding = match cr.spec.redis.managed {
        Some(_) => pods_with_password_in_env(ctx, &ns, cr).await?,
        None => 0,
    };
    let moment = Moment {
        now,
        grace_seconds: grace,
        hold: holding > 0,
    };
    let auth = RedisAuth::next(current.as_ref(), moment, redis_auth::new_password);

    let desired = match resources::desired(cr, &auth, &ctx.images) {
        Ok(d) => d,
        Err(InvalidSpec(msg)) => {
            // Nothing to retry until the spec changes: no hot loop. A slot already made stays
            // named in the status.
            let stream = recorded_stream(cr, ctx)
                .await?
                .map_or(Stream::Off, |names| Stream::Unchanged { names });
            update_status(cr, ctx, Applied::Invalid(msg), stream).await?;
            return Ok(Action::await_change());
        }
    };
    let Desired {
        config_map,
        redis,
        reader,
    } = desired;
    apply(client, &ns, &config_map).await?;
    let mut requeue = Duration::from_secs(60);
    let redis_ready = match redis {
        Some(m) => {
            // Applied only over the Secret as it was read: a user's change in between (a
            // `next-password`) is a conflict and a new pass, never overwritten.
            let mut secret = m.secret.clone();
            secret.metadata.resource_version = current
                .as_ref()
                .and_then(|c| c.metadata.resource_version.clone());
            let mut secret = apply(client, &ns, &secret).await?;
            apply(client, &ns, &m.service).await?;
            // The claim before the Deployment that mounts it; made once (its spec is immutable
            // but for an expansion, which is left to the user).
            match &m.claim {
                // A claim still being deleted (persistence turned off, then on again, while
                // the old pod held it) cannot be mounted: wait until it is gone.
                Some(claim) if !create_once(client, &ns, claim).await? => {
                    return Ok(Action::requeue(Duration::from_secs(5)));
                }
                Some(_) => {}
                None => {
                    remove_owned::<PersistentVolumeClaim>(
                        cr,
                        client,
                        &ns,
                        &resources::redis_claim_name(cr),
                    )
                    .await?
                }
            }
            match &m.network_policy {
                Some(np) => drop(apply(client, &ns, np).await?),
                None => {
                    remove_owned::<NetworkPolicy>(cr, client, &ns, &resources::redis_name(cr))
                        .await?
                }
            }
            match &m.disruption_budget {
                Some(pdb) => drop(apply(client, &ns, pdb).await?),
                None => {
                    remove_owned::<PodDisruptionBudget>(cr, client, &ns, &resources::redis_name(cr))
                        .await?
                }
            }
            let deployment = apply(client, &ns, &m.deployment).await?;
            let health = deployment_available(&deployment);
            // Replaced passwords kept past their deadline for pods of an earlier release.
            let held = match auth.previous_until {
                Some(until) if until <= now => holding,
                _ => 0,
            };
            let confirmed =
                health == RedisHealth::Available && apply_passwords(cr, ctx, &auth, held).await;
            // Once Redis accepts a `next-password`, it becomes the sidecars' password; and
            // what Redis accepts is written down.
            let settled = match confirmed {
                true => RedisAuth {
                    confirmed: Some(auth.confirmation()),
                    ..auth.promote(moment)
                },
                false => auth.clone(),
            };
            if settled != auth {
                let mut next = resources::auth_secret(cr, &settled);
                next.metadata.resource_version = secret.metadata.resource_version.take();
                apply(client, &ns, &next).await?;
                if settled.password != auth.password {
                    publish(
                        ctx,
                        cr,
                        status::Notice {
                            type_: EventType::Normal,
                            reason: "PasswordRotating".into(),
                            note: format!(
                                "Redis accepts the auth Secret's next-password, now its password \
                                 (the sidecars' copy follows within the kubelet's sync period); \
                                 the replaced one until {} (Unix time)",
                                settled.previous_until.unwrap_or_default()
                            ),
                        },
                    )
                    .await;
                }
            }
            requeue = match (&settled.next, settled.previous_until) {
                // Redis did not take the next password yet: try again soon.
                (Some(_), _) => Duration::from_secs(10),
                (None, Some(until)) => Duration::from_secs(until.saturating_sub(now).clamp(1, 60)),
                (None, None) if settled.step_pending() => Duration::from_secs(10),
                _ => requeue,
            };
            health
        }
        None => {
            remove_managed_redis(cr, client, &ns).await?;
            RedisHealth::External
        }
    };
    let stream = commit_stream_pass(cr, ctx, &ns).await?;
    // The status names the slot before the reader that may make it runs.
    update_status(cr, ctx, Applied::Valid(redis_ready), stream.clone()).await?;
    match (&stream, reader) {
        (Stream::Reading { names, .. }, Some(reader)) => {
            // A drop Job of these names (the stream turned off, then on again before it was
            // done) would drop the new reader's slot, and would later pass for a drop that
            // never ran: it goes, in the foreground, before the reader starts.
            let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
            let job = commit_stream::drop_job_name(cr, names);
            if jobs.get_opt(&job).await?.is_some() {
                jobs.delete(&job, &DeleteParams::foreground()).await?;
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            apply(client, &ns, &reader).await?;
            // Its lag, in the status.
            requeue = requeue.min(Duration::from_secs(15));
        }
        (Stream::Dropping { .. }, _) => requeue = requeue.min(Duration::from_secs(5)),
        _ => {}
    }
    // Watches on the owned objects bring changes; the periodic pass refreshes the pod count,
    // and moves a password rotation on in time.
    Ok(Action::requeue(requeue))
}

/// The slot and publication the status says exist, read from the API server: the object this
/// pass was given may predate the status written by the pass before (which applied a reader).
async fn recorded_stream(cr: &WriteThroughCache, ctx: &Context) -> Result<Option<Names>, Error> {
    let ns = cr.namespace().ok_or(Error::NoNamespace)?;
    let caches: Api<WriteThroughCache> = Api::namespaced(ctx.client.clone(), &ns);
    match caches.get_status(&cr.name_any()).await {
        Ok(now) => Ok(now
            .status
            .and_then(|s| s.commit_stream)
            .as_ref()
            .map(Names::of)),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Where the commit stream stands: names turned off or renamed are dropped first (the reader
/// of the new ones waits for that); then the reader is read.
async fn commit_stream_pass(
    cr: &WriteThroughCache,
    ctx: &Context,
    ns: &str,
) -> Result<Stream, Error> {
    let wanted = commit_stream::wanted(cr);
    if let Some(old) = recorded_stream(cr, ctx).await?
        && wanted.as_ref() != Some(&old)
        && let Some(stage) = drop_stream(cr, ctx, ns, &old).await?
    {
        return Ok(Stream::Dropping { names: old, stage });
    }
    match wanted {
        Some(names) => Ok(Stream::Reading {
            reader: read_reader(cr, ctx, ns).await?,
            names,
        }),
        None => {
            remove_owned::<Deployment>(cr, &ctx.client, ns, &commit_stream::reader_name(cr))
                .await?;
            Ok(Stream::Off)
        }
    }
}

/// One step of dropping `names`: the reader removed, then (once its pods are gone) the Job run.
/// `None` once they are dropped.
async fn drop_stream(
    cr: &WriteThroughCache,
    ctx: &Context,
    ns: &str,
    names: &Names,
) -> Result<Option<DropStage>, Error> {
    let client = &ctx.client;
    // In the foreground: its ReplicaSet, which would replace a missing pod, goes first; the
    // Deployment is gone only once no pod of it is left.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    if let Some(reader) = deployments.get_opt(&commit_stream::reader_name(cr)).await? {
        let ours = reader
            .owner_references()
            .iter()
            .any(|r| Some(&r.uid) == cr.uid().as_ref());
        if ours && reader.metadata.deletion_timestamp.is_none() {
            deployments
                .delete(&reader.name_any(), &DeleteParams::foreground())
                .await?;
        }
        if ours {
            return Ok(Some(DropStage::ReaderStopping));
        }
    }
    if !reader_pods(cr, client, ns).await?.is_empty() {
        return Ok(Some(DropStage::ReaderStopping));
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let job = commit_stream::drop_job(cr, &ctx.images, names);
    let name = job.name_any();
    let Some(existing) = jobs.get_opt(&name).await? else {
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match jobs.create(&pp, &job).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Some(DropStage::Running(name)));
    };
    Ok(match commit_stream::job_outcome(&existing) {
        JobOutcome::Succeeded => {
            jobs.delete(&name, &DeleteParams::background()).await?;
            None
        }
        JobOutcome::Failed(message) => Some(DropStage::Failed { job: name, message }),
        JobOutcome::Running => Some(DropStage::Running(name)),
    })
}

/// A deleted cache's slot drop at `stage`, `deleted_for` seconds after the deletion: a wait
/// (not counted), or a failure to say and count.
fn drop_is_waiting(stage: &DropStage, deleted_for: i64) -> bool {
    !matches!(stage, DropStage::Failed { .. }) && deleted_for <= SLOT_DROP_PATIENCE_SECONDS
}

async fn namespace_terminating(ctx: &Context, ns: &str) -> Result<bool, Error> {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ctx.client.clone());
    Ok(namespaces
        .get_opt(ns)
        .await?
        .is_none_or(|n| n.metadata.deletion_timestamp.is_some()))
}

async fn reader_pods(cr: &WriteThroughCache, client: &Client, ns: &str) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = commit_stream::reader_selector(cr)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    Ok(pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// The reader's figures, from its `/metrics` on the pod's address.
async fn read_reader(cr: &WriteThroughCache, ctx: &Context, ns: &str) -> Result<Reader, Error> {
    let pods = reader_pods(cr, &ctx.client, ns).await?;
    let running = pods.iter().find_map(|p| {
        let status = p.status.as_ref()?;
        (p.metadata.deletion_timestamp.is_none() && status.phase.as_deref() == Some("Running"))
            .then_some(())?;
        status.pod_ip.as_deref()?.parse::<std::net::IpAddr>().ok()
    });
    let Some(ip) = running else {
        return Ok(Reader::Starting);
    };
    let addr = std::net::SocketAddr::new(ip, commit_stream::reader_metrics_port(cr));
    Ok(match scrape(addr).await {
        Ok(text) => match commit_stream::reading(&text) {
            Some(r) => Reader::Read(r),
            None => Reader::Unreadable(format!("{addr}/metrics has no commit stream figures")),
        },
        Err(e) => Reader::Unreadable(format!("{addr}/metrics: {e}")),
    })
}

/// `GET /metrics` over HTTP/1.0 (the answer ends with the connection), within 2 s and 4 MiB.
async fn scrape(addr: std::net::SocketAddr) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut answer = Vec::new();
        conn.take(4 << 20).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| "no answer within 2 s".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "not an HTTP answer".to_string())?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered {status:?}"));
    }
    Ok(body.to_string())
}

/// Pods injected for this cache by an earlier release: their sidecar has the managed Redis'
/// password in its environment, which a rotation cannot change.
async fn pods_with_password_in_env(
    ctx: &Context,
    ns: &str,
    cr: &WriteThroughCache,
) -> Result<usize, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let injected = pods
        .list(&ListParams::default().labels(&format!("{INJECTED_LABEL}={}", cr.name_any())))
        .await?
        .items;
    Ok(injected
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let spec = p.spec.as_ref();
            spec.into_iter()
                .flat_map(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                })
                .flat_map(|c| c.env.iter().flatten())
                .any(|e| e.name == "WTC_REDIS_PASSWORD")
        })
        .count())
}

/// Makes the running managed Redis accept exactly the passwords `auth` lists: true once it
/// does. Not a reconcile error when it fails (the objects are applied; the next pass tries
/// again), but reported with an Event while Redis is not confirmed to accept what the Secret
/// says, so a rotation that cannot finish is never silent.
async fn apply_passwords(
    cr: &WriteThroughCache,
    ctx: &Context,
    auth: &RedisAuth,
    held: usize,
) -> bool {
    let Some((host, port)) = resources::redis_endpoint(cr).and_then(|e| {
        let (h, p) = e.rsplit_once(':')?;
        Some((h.to_string(), p.parse::<u16>().ok()?))
    }) else {
        return false;
    };
    let notice = |type_, reason: &str, note: String| status::Notice {
        type_,
        reason: reason.into(),
        note,
    };
    let outcome = redis_admin::apply(&host, port, auth).await;
    let confirmed = outcome.is_ok();
    let notice = match outcome {
        Ok(PasswordChange::None | PasswordChange::Added) if held == 0 => None,
        Ok(PasswordChange::None | PasswordChange::Added) => Some(notice(
            EventType::Warning,
            "PasswordRotationHeld",
            format!(
                "{held} pods have the Redis password in their environment (injected by an \
                 earlier wtc release): the replaced password stays accepted until they are \
                 restarted (kubectl rollout restart)"
            ),
        )),
        Ok(PasswordChange::Retired) => Some(notice(
            EventType::Normal,
            "PasswordRotated",
            "Redis accepts only the auth Secret's current password; connections that may have \
             used a replaced one were closed (the sidecars reconnect)"
                .into(),
        )),
        Err(e) => {
            if !auth.step_pending() && !matches!(e, redis_admin::AdminError::Refused) {
                tracing::debug!(cache = %cr.name_any(), error = %e, "password check skipped");
                return false;
            }
            tracing::warn!(cache = %cr.name_any(), error = %e, "cannot apply the Redis passwords");
            Some(notice(
                EventType::Warning,
                "PasswordNotApplied",
                e.to_string(),
            ))
        }
    };
    if let Some(n) = notice {
        tracing::info!(cache = %cr.name_any(), reason = %n.reason, "managed Redis passwords");
        publish(ctx, cr, n).await;
    }
    confirmed
}

/// The cache is being deleted: done once no injected pod uses it (the finalizer goes, the
/// garbage collector removes what the cache owned); until then an Event says which pods.
async fn release(cr: &WriteThroughCache, ctx: &Context) -> Result<Action, Error> {
    let ns = cr.namespace().ok_or(Error::NoNamespace)?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("{INJECTED_LABEL}={}", cr.name_any());
    // Finished pods (a Job's, evicted ones) keep their labels but use nothing.
    let running = ListParams::default()
        .labels(&selector)
        .fields(crate::uninjected::NOT_FINISHED);
    let users = pods.list(&running).await?;
    if users.items.is_empty() {
        // Last, the commit stream's slot: nothing may be left retaining WAL.
        let Some(names) = recorded_stream(cr, ctx).await? else {
            return Ok(Action::await_change());
        };
        if namespace_terminating(ctx, &ns).await? {
            // No Job can be created in it, and its Secrets are going: waiting would hold the
            // namespace's deletion for ever. What is left is said, with how to drop it.
            let note = format!(
                "the namespace is being deleted, so the operator cannot drop replication slot {} \
                 and publication {}: drop them in the database (SELECT \
                 pg_drop_replication_slot('{}'); DROP PUBLICATION {}), or the slot retains WAL",
                names.slot, names.publication, names.slot, names.publication
            );
            tracing::warn!(cache = %cr.name_any(), namespace = %ns, "{note}");
            publish(
                ctx,
                cr,
                status::Notice {
                    type_: EventType::Warning,
                    reason: "SlotLeft".into(),
                    note,
                },
            )
            .await;
            return Ok(Action::await_change());
        }
        return match drop_stream(cr, ctx, &ns, &names).await? {
            None => Ok(Action::await_change()),
            Some(stage) => {
                // A reader pod that never stops (its node lost) would hold the drop for ever:
                // past the Job's own deadline the wait is a failure, said and counted.
                let deleted_for = cr.metadata.deletion_timestamp.as_ref().map_or(0, |t| {
                    k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second()
                });
                let waiting = drop_is_waiting(&stage, deleted_for);
                let overdue = !matches!(stage, DropStage::Failed { .. });
                let stream = Stream::Dropping { names, stage };
                let (_, reason, mut message) = stream.verdict().expect("a drop has a verdict");
                if waiting {
                    return Err(Error::SlotDropping(message));
                }
                if overdue {
                    message =
                        format!("{message}: still, {deleted_for} s after the cache's deletion");
                }
                publish(
                    ctx,
                    cr,
                    status::Notice {
                        type_: EventType::Warning,
                        reason: reason.as_str().into(),
                        note: message.clone(),
                    },
                )
                .await;
                Err(Error::SlotNotDropped(message))
            }
        };
    }
    let n = users.items.len();
    let plural = if n == 1 {
        "pod still uses"
    } else {
        "pods still use"
    };
    let names: Vec<String> = users.items.iter().take(5).map(|p| p.name_any()).collect();
    let more = if n > names.len() { ", ..." } else { "" };
    let ev = Event {
        type_: EventType::Warning,
        reason: "DeletionWaiting".into(),
        note: Some(format!(
            "{n} {plural} this cache ({}{more}): it is deleted once they are gone \
             (kubectl -n {ns} get pods -l {selector})",
            names.join(", ")
        )),
        action: "Delete".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &cr.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
    Err(Error::InUse(n))
}

/// A namespaced object the operator writes.
trait Owned:
    Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Serialize
    + DeserializeOwned
    + Clone
    + std::fmt::Debug
{
}
impl<K> Owned for K where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug
{
}

async fn apply<K: Owned>(client: &Client, ns: &str, obj: &K) -> Result<K, Error> {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(&obj.name_any(), &pp, &Patch::Apply(obj)).await?)
}

/// Creates `obj` unless it exists; `false` while an object of that name is being deleted.
async fn create_once<K: Owned>(client: &Client, ns: &str, obj: &K) -> Result<bool, Error> {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.get_opt(&obj.name_any()).await? {
        Some(existing) => Ok(existing.meta().deletion_timestamp.is_none()),
        None => {
            let pp = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PostParams::default()
            };
            match api.create(&pp, obj).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(true),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Deletes `name` if this cache owns it (never a user's object of the same name).
async fn remove_owned<K: Owned>(
    cr: &WriteThroughCache,
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    if let Some(o) = api.get_opt(name).await?
        && o.owner_references()
            .iter()
            .any(|r| Some(&r.uid) == cr.uid().as_ref())
    {
        api.delete(name, &DeleteParams::background()).await?;
    }
    Ok(())
}

/// Switching from managed to external Redis: the managed objects are no longer wanted.
async fn remove_managed_redis(
    cr: &WriteThroughCache,
    client: &Client,
    ns: &str,
) -> Result<(), Error> {
    let (redis, claim) = (resources::redis_name(cr), resources::redis_claim_name(cr));
    remove_owned::<Deployment>(cr, client, ns, &redis).await?;
    remove_owned::<Service>(cr, client, ns, &redis).await?;
    remove_owned::<NetworkPolicy>(cr, client, ns, &redis).await?;
    remove_owned::<PodDisruptionBudget>(cr, client, ns, &redis).await?;
    remove_owned::<PersistentVolumeClaim>(cr, client, ns, &claim).await?;
    remove_owned::<Secret>(cr, client, ns, &resources::auth_secret_name(cr)).await
}

fn deployment_available(d: &Deployment) -> RedisHealth {
    let status = d.status.clone().unwrap_or_default();
    let current = status.observed_generation >= d.metadata.generation;
    let available = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Available" && c.status == "True");
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    if wanted == 0 {
        RedisHealth::Unavailable("managed Redis is scaled to 0 replicas".into())
    } else if current && available && status.available_replicas.unwrap_or(0) >= 1 {
        RedisHealth::Available
    } else {
        RedisHealth::Unavailable("the Redis Deployment is not available yet".into())
    }
}

/// Gathers what the status depends on, has `status` compute it, patches it, then publishes the
/// events for what changed.
async fn update_status(
    cr: &WriteThroughCache,
    ctx: &Context,
    applied: Applied,
    commit_stream: Stream,
) -> Result<(), Error> {
    let ns = cr.namespace().ok_or(Error::NoNamespace)?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let injected = pods
        .list(&ListParams::default().labels(&format!("{INJECTED_LABEL}={}", cr.name_any())))
        .await?
        .items;
    let observed = Observed {
        generation: cr.metadata.generation,
        applied,
        sidecars: sidecars::health(&injected),
        redis_endpoint: resources::redis_endpoint(cr),
        commit_stream,
    };
    let old = cr.status.as_ref();
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let new = status::desired(&observed, old_conditions, &now);
    let api: Api<WriteThroughCache> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": "wtc.dev/v1alpha1",
        "kind": "WriteThroughCache",
        "status": new,
    });
    match api
        .patch_status(
            &cr.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => {}
        // Deleted while we reconciled it: nothing left to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    for notice in status::events(old, &new) {
        publish(ctx, cr, notice).await;
    }
    Ok(())
}

async fn publish(ctx: &Context, cr: &WriteThroughCache, notice: status::Notice) {
    let ev = Event {
        type_: notice.type_,
        reason: notice.reason,
        note: Some(notice.note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &cr.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

/// Runs the controller until `stop` completes (graceful: reconciles in flight finish).
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    namespace: Option<String>,
    images: Release,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let caches: Api<WriteThroughCache> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=wtc-operator");
    let (deployments, services, config_maps): (Api<Deployment>, Api<Service>, Api<ConfigMap>) =
        match &namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), Reporter::from(FIELD_MANAGER)),
        client,
        metrics,
        images,
    });
    // Injected pods carry a label naming their cache: their comings and goings refresh its count.
    let pods: Api<Pod> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    Controller::new(caches, watcher::Config::default().any_semantic())
        .watches(
            pods,
            watcher::Config::default().labels(INJECTED_LABEL),
            |pod: Pod| {
                let ns = pod.namespace()?;
                let cache = pod.labels().get(INJECTED_LABEL)?.clone();
                Some(ObjectRef::new(&cache).within(&ns))
            },
        )
        .owns(deployments, owned.clone())
        .owns(services, owned.clone())
        .owns(config_maps, owned)
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile stream");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_drop_is_a_wait_until_the_jobs_deadline_or_its_failure() {
        let job = || DropStage::Running("drop".into());
        assert!(drop_is_waiting(&DropStage::ReaderStopping, 0));
        assert!(drop_is_waiting(&job(), SLOT_DROP_PATIENCE_SECONDS));
        // A reader pod that never stops (its node lost) must not hold the cache silently.
        assert!(!drop_is_waiting(
            &DropStage::ReaderStopping,
            SLOT_DROP_PATIENCE_SECONDS + 1
        ));
        assert!(!drop_is_waiting(&job(), SLOT_DROP_PATIENCE_SECONDS + 1));
        let failed = DropStage::Failed {
            job: "drop".into(),
            message: "permission denied".into(),
        };
        assert!(!drop_is_waiting(&failed, 0));
    }
}
