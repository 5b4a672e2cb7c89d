//! Process wiring: command line, the controller, the webhook with its certificates, `/metrics`
//! and `/healthz`.

use crate::certs::{self, WebhookCerts};
use crate::crd::WriteThroughCache;
use crate::metrics::Metrics;
use crate::resources::Images;
use crate::webhook::{self, Endpoint, Webhook};
use kube::{Client, CustomResourceExt};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use warp::Filter;

const USAGE: &str = "usage:
  wtc-operator crdgen            print the CustomResourceDefinition (YAML)
  wtc-operator [run] [options]   run the controller and the injection webhook
options:
  --namespace NS               watch only this namespace (default: all)
  --operator-namespace NS      where the operator runs (default: $POD_NAMESPACE or wtc-system)
  --metrics-addr ADDR          /metrics and /healthz (default 0.0.0.0:8080)
  --webhook-addr ADDR          the webhook's HTTPS listener (default 0.0.0.0:8443)
  --webhook-service NAME       Service in front of the webhook (default wtc-operator)
  --webhook-url URL            reach the webhook at this https URL instead of a Service
  --webhook-config NAME        MutatingWebhookConfiguration to keep applied (default wtc-operator)
  --webhook-cert-secret NAME   Secret holding the webhook CA and certificate (default wtc-operator-webhook-tls)
  --cert-manager NS/CERT       certificates come from cert-manager: read --tls-dir, annotate for CA injection
  --tls-dir DIR                tls.crt and tls.key (with --cert-manager; default /tls)
  --owner-cluster-role NAME    make the webhook configuration owned by this ClusterRole (the chart's)
  --sidecar-image IMAGE        the sidecar injected where a cache pins none (default: $WTC_SIDECAR_IMAGE or this release's)
  --redis-image IMAGE          managed Redis where a cache pins none (default: $WTC_REDIS_IMAGE or this release's)
  --no-webhook                 run the controller only";

#[derive(Debug, Clone)]
pub struct Options {
    pub namespace: Option<String>,
    pub operator_namespace: String,
    pub metrics_addr: SocketAddr,
    pub webhook_addr: SocketAddr,
    pub webhook_service: String,
    pub webhook_url: Option<String>,
    pub webhook_config: String,
    pub webhook_cert_secret: String,
    pub cert_manager: Option<String>,
    pub tls_dir: String,
    pub owner_cluster_role: Option<String>,
    pub webhook: bool,
    pub images: Images,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Options {
            namespace: None,
            operator_namespace: std::env::var("POD_NAMESPACE")
                .unwrap_or_else(|_| "wtc-system".into()),
            metrics_addr: "0.0.0.0:8080".parse().unwrap(),
            webhook_addr: "0.0.0.0:8443".parse().unwrap(),
            webhook_service: "wtc-operator".into(),
            webhook_url: None,
            webhook_config: "wtc-operator".into(),
            webhook_cert_secret: "wtc-operator-webhook-tls".into(),
            cert_manager: None,
            tls_dir: "/tls".into(),
            owner_cluster_role: None,
            webhook: true,
            images: {
                let default = Images::default();
                Images {
                    sidecar: std::env::var("WTC_SIDECAR_IMAGE").unwrap_or(default.sidecar),
                    redis: std::env::var("WTC_REDIS_IMAGE").unwrap_or(default.redis),
                }
            },
        };
        // `--flag value` and `--flag=value` (the chart's form) alike.
        let split: Vec<String> = args
            .iter()
            .flat_map(|a| match a.split_once('=') {
                Some((flag, value)) if a.starts_with("--") => vec![flag.into(), value.into()],
                _ => vec![a.clone()],
            })
            .collect();
        let mut it = split.iter();
        while let Some(a) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{a} needs a value"))
            };
            match a.as_str() {
                "run" => {}
                "--namespace" => o.namespace = Some(value()?),
                "--operator-namespace" => o.operator_namespace = value()?,
                "--metrics-addr" => {
                    o.metrics_addr = value()?
                        .parse()
                        .map_err(|_| "--metrics-addr: not host:port")?
                }
                "--webhook-addr" => {
                    o.webhook_addr = value()?
                        .parse()
                        .map_err(|_| "--webhook-addr: not host:port")?
                }
                "--webhook-service" => o.webhook_service = value()?,
                "--webhook-url" => o.webhook_url = Some(value()?),
                "--webhook-config" => o.webhook_config = value()?,
                "--webhook-cert-secret" => o.webhook_cert_secret = value()?,
                "--cert-manager" => o.cert_manager = Some(value()?),
                "--tls-dir" => o.tls_dir = value()?,
                "--owner-cluster-role" => o.owner_cluster_role = Some(value()?),
                "--no-webhook" => o.webhook = false,
                "--sidecar-image" => o.images.sidecar = value()?,
                "--redis-image" => o.images.redis = value()?,
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        Ok(o)
    }

    fn endpoint(&self) -> Endpoint {
        match &self.webhook_url {
            Some(u) => Endpoint::Url(u.trim_end_matches('/').to_string()),
            None => Endpoint::Service {
                namespace: self.operator_namespace.clone(),
                name: self.webhook_service.clone(),
                port: 443,
            },
        }
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

pub fn crd_yaml() -> String {
    serde_yaml::to_string(&WriteThroughCache::crd()).expect("the CRD serializes")
}

pub fn main_entry() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("crdgen") => {
            print!("{}", crd_yaml());
            return ExitCode::SUCCESS;
        }
        Some("--help" | "-h") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let options = match Options::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("wtc-operator: {e}");
            return ExitCode::from(2);
        }
    };
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

    // The webhook first: `/healthz` is the pod's readiness, and the Service sends admission
    // requests only to ready pods, so a pod created meanwhile is not silently left uninjected
    // because this replica was ready before it served.
    if options.webhook {
        start_webhook(&client, &options, Arc::clone(&metrics)).await?;
    }
    let m = Arc::clone(&metrics);
    let routes = warp::path("metrics")
        .map(move || m.render())
        .or(warp::path("healthz").map(|| "ok"));
    let listener = tokio::net::TcpListener::bind(options.metrics_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.metrics_addr))?;
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    tracing::info!(namespace = ?options.namespace, "wtc-operator running");
    crate::reconcile::run(
        client,
        metrics,
        options.namespace.clone(),
        options.images.clone(),
    )
    .await;
    Ok(())
}

async fn start_webhook(
    client: &Client,
    options: &Options,
    metrics: Arc<Metrics>,
) -> Result<(), String> {
    let names = options.serving_names();
    let certs = match &options.cert_manager {
        Some(_) => read_tls_dir(&options.tls_dir)?,
        None => certs::ensure(
            client,
            &options.operator_namespace,
            &options.webhook_cert_secret,
            &names,
        )
        .await
        .map_err(|e| e.to_string())?,
    };
    let ca_bundle = options
        .cert_manager
        .is_none()
        .then_some(certs.ca_pem.as_str());
    let config = webhook::configuration(
        &options.webhook_config,
        &options.endpoint(),
        ca_bundle,
        &options.operator_namespace,
        options.cert_manager.as_deref(),
    );
    let config = match &options.owner_cluster_role {
        Some(role) => webhook::owned_by_cluster_role(client, config, role)
            .await
            .map_err(|e| format!("cannot read ClusterRole {role}: {e}"))?,
        None => config,
    };
    webhook::apply_configuration(client, &config)
        .await
        .map_err(|e| format!("cannot apply the MutatingWebhookConfiguration: {e}"))?;
    let native = webhook::supports_native_sidecars(client).await;
    let hook = Arc::new(Webhook::new(
        client.clone(),
        metrics,
        native,
        options.images.clone(),
        &certs,
    )?);
    let listener = Webhook::bind(options.webhook_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.webhook_addr))?;
    tokio::spawn(Arc::clone(&hook).serve(listener));

    // Renewal: check twice a day; a renewed certificate serves new connections at once.
    let (client, options) = (client.clone(), options.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(12 * 3600)).await;
            let renewed = match &options.cert_manager {
                Some(_) => read_tls_dir(&options.tls_dir),
                None => certs::ensure(
                    &client,
                    &options.operator_namespace,
                    &options.webhook_cert_secret,
                    &names,
                )
                .await
                .map_err(|e| e.to_string()),
            };
            match renewed.and_then(|c| hook.rotate(&c)) {
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "webhook certificate renewal failed"),
            }
        }
    });
    Ok(())
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
                "charts/wtc-operator/crds/writethroughcache.yaml",
                include_str!("../../charts/wtc-operator/crds/writethroughcache.yaml"),
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
        assert!(matches!(o.endpoint(), Endpoint::Url(u) if u == "https://127.0.0.1:9443"));
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
        assert_eq!(o.images.sidecar, "r.example/wtc-dev/wtc-sidecar:1");
        assert_eq!(o.webhook_addr.port(), 9443);
    }
}
