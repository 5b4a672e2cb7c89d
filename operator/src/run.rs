//! Process wiring: command line, the webhook with its certificates (every replica), the
//! controller and the watchdog (the replica holding the leader lease), `/metrics`, `/healthz` (alive) and
//! `/readyz` (the webhook serves and the process is not draining).
//!
//! Shutdown (SIGTERM): `/readyz` turns 503, every webhook answer closes its connection, the
//! controller stops and the lease is released at once; the webhook keeps answering for
//! `--drain-seconds` while the Service's endpoints drop this replica, so no pod created during a
//! rollout finds the webhook gone.

use crate::certs::{self, WebhookCerts};
use crate::crd::WriteThroughCache;
use crate::lease::{Elector, Timing};
use crate::metrics::Metrics;
use crate::resources::Release;
use crate::watchdog::Watchdog;
use crate::webhook::{self, FailurePolicy, Webhook};
use clap::{ArgAction, Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Client, CustomResourceExt};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use warp::Filter;

/// `wtc-operator [run] [options]` or `wtc-operator crdgen`. `run`'s flags are on the top level
/// too, so that `run` may be left out as before.
#[derive(Debug, Parser)]
#[command(
    name = "wtc-operator",
    about = "Kubernetes operator for wtc: WriteThroughCache CRD, managed Redis, sidecar injection",
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Options,
}

// Parsed once at start: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller and the injection webhook (the default)
    Run(Options),
    /// Print the CustomResourceDefinition (YAML)
    Crdgen,
}

impl Cli {
    /// What to run with; `None` for `crdgen`.
    fn run_options(self) -> Option<Options> {
        match self.command {
            None => Some(self.run),
            Some(Command::Run(options)) => Some(options),
            Some(Command::Crdgen) => None,
        }
    }
}

/// `run`'s flags (the chart passes `--flag=value`, the tests `--flag value`).
#[derive(Debug, Clone, Args)]
pub struct Options {
    /// Watch only this namespace (default: all)
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Where the operator runs
    #[arg(
        long,
        value_name = "NS",
        env = "POD_NAMESPACE",
        default_value = "wtc-system"
    )]
    pub operator_namespace: String,
    /// /metrics and /healthz
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// The webhook's HTTPS listener
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8443")]
    pub webhook_addr: SocketAddr,
    /// Service in front of the webhook
    #[arg(long, value_name = "NAME", default_value = "wtc-operator")]
    pub webhook_service: String,
    /// The webhook is reached at this https URL, not through the Service: its host goes in the
    /// serving certificate (the configuration's clientConfig is the chart's to set)
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// The MutatingWebhookConfiguration (the chart's) whose caBundle this operator fills
    #[arg(long, value_name = "NAME", default_value = "wtc-operator")]
    pub webhook_config: String,
    /// Secret holding the webhook CA and certificate
    #[arg(long, value_name = "NAME", default_value = "wtc-operator-webhook-tls")]
    pub webhook_cert_secret: String,
    /// Certificates come from cert-manager: read --tls-dir, annotate for CA injection
    #[arg(long, value_name = "NS/CERT")]
    pub cert_manager: Option<String>,
    /// tls.crt and tls.key (with --cert-manager)
    #[arg(long, value_name = "DIR", default_value = "/tls")]
    pub tls_dir: String,
    /// Make what this operator creates outside caches (the webhook's certificate Secret, the
    /// leader Lease) owned by this ClusterRole (the chart's), so uninstalling removes them
    #[arg(long, value_name = "NAME")]
    pub owner_cluster_role: Option<String>,
    /// Run the controller only
    #[arg(long = "no-webhook", action = ArgAction::SetFalse)]
    pub webhook: bool,
    /// What the API server does when no replica answers: Ignore (admit the pod without the
    /// sidecar) or Fail (refuse it)
    #[arg(
        long,
        value_name = "POLICY",
        value_enum,
        ignore_case = true,
        default_value = "ignore"
    )]
    pub webhook_failure_policy: FailurePolicy,
    /// After SIGTERM, how long the webhook keeps answering (closing each connection) while the
    /// Service stops sending to this replica
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub drain_seconds: u64,
    /// How often the leader looks for pods that asked for a sidecar and run without it
    #[arg(long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub watchdog_interval_seconds: u64,
    /// The Lease (in the operator's namespace) whose holder runs the controller
    #[arg(long, value_name = "NAME", default_value = "wtc-operator")]
    pub leader_election_lease: String,
    /// This replica's name in the lease, before a suffix of its own (default: the host name)
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pub identity: Option<String>,
    /// The sidecar injected where a cache pins none
    #[arg(
        long,
        value_name = "IMAGE",
        env = "WTC_SIDECAR_IMAGE",
        default_value_t = Release::default().sidecar
    )]
    pub sidecar_image: String,
    /// The injected sidecar's CPU request where neither the cache nor the pod sets one
    #[arg(long, value_name = "QUANTITY", value_parser = quantity)]
    pub sidecar_cpu_request: Option<String>,
    /// The injected sidecar's memory request (same precedence)
    #[arg(long, value_name = "QUANTITY", value_parser = quantity)]
    pub sidecar_memory_request: Option<String>,
    /// The injected sidecar's CPU limit (same precedence)
    #[arg(long, value_name = "QUANTITY", value_parser = quantity)]
    pub sidecar_cpu_limit: Option<String>,
    /// The injected sidecar's memory limit (same precedence)
    #[arg(long, value_name = "QUANTITY", value_parser = quantity)]
    pub sidecar_memory_limit: Option<String>,
    /// Managed Redis where a cache pins none
    #[arg(
        long,
        value_name = "IMAGE",
        env = "WTC_REDIS_IMAGE",
        default_value_t = Release::default().redis
    )]
    pub redis_image: String,
}

impl Options {
    /// `run`'s options from the arguments after the program name (`run` itself optional). A bad
    /// argument is an `Err` with clap's message: no exit, so callers and tests decide.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let argv = std::iter::once("wtc-operator".to_string()).chain(args.iter().cloned());
        Cli::try_parse_from(argv)
            .map_err(|e| e.render().to_string())?
            .run_options()
            .ok_or_else(|| "crdgen does not run the operator".into())
    }

    pub fn release(&self) -> Release {
        let map = |pairs: [(&str, &Option<String>); 2]| {
            let m: BTreeMap<String, Quantity> = pairs
                .into_iter()
                .filter_map(|(k, v)| Some((k.to_string(), Quantity(v.clone()?))))
                .collect();
            (!m.is_empty()).then_some(m)
        };
        let requests = map([
            ("cpu", &self.sidecar_cpu_request),
            ("memory", &self.sidecar_memory_request),
        ]);
        let limits = map([
            ("cpu", &self.sidecar_cpu_limit),
            ("memory", &self.sidecar_memory_limit),
        ]);
        Release {
            sidecar: self.sidecar_image.clone(),
            redis: self.redis_image.clone(),
            sidecar_resources: (requests.is_some() || limits.is_some()).then(|| {
                ResourceRequirements {
                    requests,
                    limits,
                    ..ResourceRequirements::default()
                }
            }),
            operator_namespace: self.operator_namespace.clone(),
        }
    }

    /// The pod's name (or the host's) and a suffix of this process's own: a container restarted
    /// in the same pod is a new candidate, not the holder of its predecessor's lease.
    fn identity(&self) -> String {
        let base = self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            host.trim().to_string()
        });
        format!("{base}_{:08x}", fastrand::u32(..))
    }

    /// Names the serving certificate must carry.
    fn serving_names(&self) -> Vec<String> {
        match &self.webhook_url {
            Some(u) => {
                let host = u
                    .trim_start_matches("https://")
                    .split(['/', ':'])
                    .next()
                    .unwrap_or_default();
                vec![host.to_string()]
            }
            None => {
                let (svc, ns) = (&self.webhook_service, &self.operator_namespace);
                vec![
                    format!("{svc}.{ns}.svc"),
                    format!("{svc}.{ns}.svc.cluster.local"),
                    format!("{svc}.{ns}"),
                ]
            }
        }
    }
}

/// A Kubernetes quantity, for the resource flags.
fn quantity(s: &str) -> Result<String, String> {
    match crate::pod_settings::is_quantity(s) {
        true => Ok(s.to_string()),
        false => Err(format!(
            "{s:?} is not a Kubernetes quantity (like 100m, 64Mi)"
        )),
    }
}

pub fn crd_yaml() -> String {
    serde_yaml::to_string(&WriteThroughCache::crd()).expect("the CRD serializes")
}

pub fn main_entry() -> ExitCode {
    let options = match Cli::try_parse().map(Cli::run_options) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{}", crd_yaml());
            return ExitCode::SUCCESS;
        }
        // `--help` (0, on stdout) or a bad argument (2, on stderr).
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wtc-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

pub async fn run(options: Options) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes client: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    let owner = match &options.owner_cluster_role {
        Some(role) => Some(
            webhook::cluster_role_owner(&client, role)
                .await
                .map_err(|e| format!("cannot read ClusterRole {role}: {e}"))?,
        ),
        None => None,
    };

    // The webhook first: `/readyz` is the pod's readiness, and the Service sends admission
    // requests only to ready pods, so a pod created meanwhile is not silently left uninjected
    // because this replica was ready before it served.
    let hook = match options.webhook {
        true => Some(start_webhook(&client, &options, Arc::clone(&metrics), owner.clone()).await?),
        false => None,
    };
    let draining = Arc::new(AtomicBool::new(false));
    let m = Arc::clone(&metrics);
    let d = Arc::clone(&draining);
    let routes = warp::path("metrics")
        .map(move || m.render())
        .or(warp::path("healthz").map(|| "ok"))
        .or(warp::path("readyz").map(move || {
            let (status, body) = match d.load(Ordering::Relaxed) {
                true => (warp::http::StatusCode::SERVICE_UNAVAILABLE, "draining"),
                false => (warp::http::StatusCode::OK, "ok"),
            };
            warp::reply::with_status(body, status)
        }));
    let listener = tokio::net::TcpListener::bind(options.metrics_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.metrics_addr))?;
    tokio::spawn(warp::serve(routes).incoming(listener).run());

    let stopping = Arc::clone(&draining);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let drain = hook.clone();
    tokio::spawn(async move {
        terminated().await;
        tracing::info!("shutting down: draining the webhook, stopping the controller");
        draining.store(true, Ordering::Relaxed);
        if let Some(hook) = drain {
            hook.drain();
        }
        let _ = shutdown.send(true);
    });

    let identity = options.identity();
    tracing::info!(namespace = ?options.namespace, %identity, "wtc-operator running");
    let elector = Elector::new(
        kube::Api::namespaced(client.clone(), &options.operator_namespace),
        &options.leader_election_lease,
        &identity,
        Timing::default(),
        owner,
    );
    let leader = metrics.leader.clone();
    let (namespace, images) = (options.namespace.clone(), options.release());
    let watchdog_every = Duration::from_secs(options.watchdog_interval_seconds);
    let operator_namespace = options.operator_namespace.clone();
    elector
        .run(
            shutdown_rx,
            move |on| leader.set(i64::from(on)),
            move |stop| {
                let controller = crate::reconcile::run(
                    client.clone(),
                    Arc::clone(&metrics),
                    namespace.clone(),
                    images.clone(),
                    stop.clone().wait(),
                );
                let watchdog = Watchdog::new(
                    client.clone(),
                    namespace.clone(),
                    &operator_namespace,
                    Arc::clone(&metrics),
                )
                .run(watchdog_every, stop.wait());
                async move {
                    tokio::join!(controller, watchdog);
                }
            },
        )
        .await;
    // Here after SIGTERM, or when the controller ended on its own: drain either way, so the
    // Service stops sending admissions before the process goes.
    let asked = stopping.swap(true, Ordering::Relaxed);
    if let Some(hook) = &hook {
        hook.drain();
        tokio::time::sleep(Duration::from_secs(options.drain_seconds)).await;
    }
    match asked {
        true => Ok(()),
        false => Err("the controller stopped on its own".into()),
    }
}

/// SIGTERM (the kubelet) or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn start_webhook(
    client: &Client,
    options: &Options,
    metrics: Arc<Metrics>,
    owner: Option<OwnerReference>,
) -> Result<Arc<Webhook>, String> {
    let names = options.serving_names();
    let certs = match &options.cert_manager {
        Some(_) => read_tls_dir(&options.tls_dir)?,
        None => certs::ensure(
            client,
            &options.operator_namespace,
            &options.webhook_cert_secret,
            &names,
            owner.as_ref(),
        )
        .await
        .map_err(|e| e.to_string())?,
    };
    // The chart creates the configuration along with this Deployment: give it a moment. One
    // still missing after that does not stop the replica (its controller still has caches to
    // reconcile); the loop below keeps trying, every 5 s until it succeeds.
    let mut published = options.cert_manager.is_some();
    for _ in 0..10 {
        if published {
            break;
        }
        match webhook::publish_ca_bundle(client, &options.webhook_config, &certs.ca_pem).await {
            Ok(_) => published = true,
            Err(e) => {
                tracing::warn!(error = %e, "retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    let native = webhook::supports_native_sidecars(client).await;
    let hook = Arc::new(
        Webhook::new(client.clone(), metrics, native, options.release(), &certs)?
            .with_failure_policy(options.webhook_failure_policy),
    );
    let listener = Webhook::bind(options.webhook_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.webhook_addr))?;
    tokio::spawn(Arc::clone(&hook).serve(listener));
    let serving = Arc::clone(&hook);

    // Every minute, what the Secret holds (another replica may have renewed it, or made a new CA
    // in place of a damaged one): a new certificate serves new connections at once; the
    // configuration's caBundle is made to match the Secret's CA (each replica converges on the
    // Secret's pair, and a caBundle reset by hand or by a re-install is put back).
    let (client, options) = (client.clone(), options.clone());
    tokio::spawn(async move {
        let mut served = certs;
        loop {
            let pause = if published { 60 } else { 5 };
            tokio::time::sleep(Duration::from_secs(pause)).await;
            let current = match &options.cert_manager {
                Some(_) => read_tls_dir(&options.tls_dir),
                None => certs::ensure(
                    &client,
                    &options.operator_namespace,
                    &options.webhook_cert_secret,
                    &names,
                    owner.as_ref(),
                )
                .await
                .map_err(|e| e.to_string()),
            };
            let current = match current {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the webhook certificate");
                    continue;
                }
            };
            if current != served {
                if let Err(e) = hook.rotate(&current) {
                    tracing::warn!(error = %e, "webhook certificate renewal failed");
                    continue;
                }
                tracing::info!("serving the webhook certificate from the Secret");
                served = current;
            }
            if options.cert_manager.is_none() {
                match webhook::publish_ca_bundle(&client, &options.webhook_config, &served.ca_pem)
                    .await
                {
                    Ok(true) if published => {
                        tracing::warn!("caBundle published again (it did not match the CA)")
                    }
                    Ok(_) => published = true,
                    Err(e) => {
                        published = false;
                        tracing::warn!(error = %e, "cannot publish the caBundle")
                    }
                }
            }
        }
    });
    Ok(serving)
}

fn read_tls_dir(dir: &str) -> Result<WebhookCerts, String> {
    let read = |f: &str| {
        std::fs::read_to_string(format!("{dir}/{f}")).map_err(|e| format!("{dir}/{f}: {e}"))
    };
    WebhookCerts::from_files(read("tls.crt")?, read("tls.key")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `crds/` (and the chart's copy) are generated: regenerate with `scripts/crdgen`.
    #[test]
    fn committed_crds_match_the_rust_types() {
        for (path, committed) in [
            (
                "crds/writethroughcache.yaml",
                include_str!("../../crds/writethroughcache.yaml"),
            ),
            (
                "charts/wtc-crds/files/writethroughcache.yaml",
                include_str!("../../charts/wtc-crds/files/writethroughcache.yaml"),
            ),
        ] {
            assert!(
                committed == crd_yaml(),
                "{path} is out of date: run scripts/crdgen"
            );
        }
    }

    #[test]
    fn options_for_tests_and_clusters() {
        let o = Options::parse(&["--webhook-url".into(), "https://127.0.0.1:9443".into()]).unwrap();
        assert_eq!(o.serving_names(), vec!["127.0.0.1".to_string()]);
        let o = Options::parse(&["--operator-namespace".into(), "ops".into()]).unwrap();
        assert!(
            o.serving_names()
                .contains(&"wtc-operator.ops.svc".to_string())
        );
        assert!(Options::parse(&["--bogus".into()]).is_err());
        // The chart passes `--flag=value`.
        let o = Options::parse(&[
            "run".into(),
            "--operator-namespace=ops".into(),
            "--sidecar-image=r.example/wtc-dev/wtc-sidecar:1".into(),
            "--webhook-addr=0.0.0.0:9443".into(),
        ])
        .unwrap();
        assert_eq!(o.operator_namespace, "ops");
        assert_eq!(o.release().sidecar, "r.example/wtc-dev/wtc-sidecar:1");
        assert_eq!(o.webhook_addr.port(), 9443);
    }

    fn parse(args: &[&str]) -> Result<Options, String> {
        Options::parse(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn defaults_flags_and_refusals() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.metrics_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(o.webhook_addr.to_string(), "0.0.0.0:8443");
        assert_eq!(
            (
                o.webhook_service.as_str(),
                o.webhook_config.as_str(),
                o.webhook_cert_secret.as_str(),
                o.tls_dir.as_str()
            ),
            (
                "wtc-operator",
                "wtc-operator",
                "wtc-operator-webhook-tls",
                "/tls"
            )
        );
        assert!(o.webhook && o.namespace.is_none() && o.webhook_url.is_none());
        assert!(o.cert_manager.is_none() && o.owner_cluster_role.is_none());
        // `run` may come first or be left out; the chart's flags with either spelling.
        let o = parse(&[
            "run",
            "--no-webhook",
            "--namespace",
            "shop",
            "--cert-manager=ops/wtc-webhook",
            "--owner-cluster-role",
            "wtc",
            "--redis-image=r.example/redis:7",
        ])
        .unwrap();
        assert!(!o.webhook);
        assert_eq!(o.namespace.as_deref(), Some("shop"));
        assert_eq!(o.cert_manager.as_deref(), Some("ops/wtc-webhook"));
        assert_eq!(o.owner_cluster_role.as_deref(), Some("wtc"));
        assert_eq!(o.release().redis, "r.example/redis:7");
        assert_eq!(o.release().sidecar_resources, None);
        let o = parse(&[
            "--sidecar-memory-limit=128Mi",
            "--sidecar-cpu-request",
            "50m",
        ])
        .unwrap();
        let r = o.release().sidecar_resources.unwrap();
        assert_eq!(
            (
                r.requests.unwrap()["cpu"].0.as_str(),
                r.limits.unwrap()["memory"].0.as_str()
            ),
            ("50m", "128Mi")
        );
        let e = parse(&["--sidecar-memory-limit=lots"]).unwrap_err();
        assert!(e.contains("lots") && e.contains("quantity"), "{e}");

        let e = parse(&["--bogus"]).unwrap_err();
        assert!(e.contains("--bogus"), "{e}");
        assert!(parse(&["--metrics-addr", "nowhere"]).is_err());
        assert!(parse(&["--namespace"]).is_err());
        assert!(parse(&["crdgen"]).is_err());
        let help = Cli::try_parse_from(["wtc-operator", "--help"]).unwrap_err();
        assert_eq!(help.exit_code(), 0);
        let bad = Cli::try_parse_from(["wtc-operator", "run", "--bogus"]).unwrap_err();
        assert_eq!(bad.exit_code(), 2);
        assert!(matches!(
            Cli::try_parse_from(["wtc-operator", "crdgen"])
                .unwrap()
                .command,
            Some(Command::Crdgen)
        ));
    }

    /// Marks the child process of `environment_sits_between_flags_and_defaults`.
    const CHILD: &str = "WTC_OPERATOR_ENV_TEST_CHILD";

    /// The environment is process-global (and setting it is `unsafe`, forbidden here): the
    /// checks run in a child test process given its own environment.
    #[test]
    fn environment_sits_between_flags_and_defaults() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "run::tests::environment_child", "--ignored"])
            .env(CHILD, "1")
            .env("POD_NAMESPACE", "from-env")
            .env("WTC_SIDECAR_IMAGE", "env.example/sidecar:1")
            .env("WTC_REDIS_IMAGE", "env.example/redis:1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        assert!(
            stdout.contains("1 passed"),
            "the child test did not run: {stdout}"
        );
    }

    #[test]
    #[ignore = "run by environment_sits_between_flags_and_defaults with its environment"]
    fn environment_child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let o = parse(&[]).unwrap();
        assert_eq!(o.operator_namespace, "from-env");
        assert_eq!(
            o.release(),
            Release {
                sidecar: "env.example/sidecar:1".into(),
                redis: "env.example/redis:1".into(),
                sidecar_resources: None,
                operator_namespace: "from-env".into(),
            }
        );
        let o = parse(&[
            "--operator-namespace=ops",
            "--sidecar-image",
            "flag.example/sidecar:2",
        ])
        .unwrap();
        assert_eq!(o.operator_namespace, "ops");
        assert_eq!(o.release().sidecar, "flag.example/sidecar:2");
        assert_eq!(o.release().redis, "env.example/redis:1");
    }
}
