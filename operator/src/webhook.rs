//! The injection webhook's I/O: its MutatingWebhookConfiguration, and an HTTPS server (hyper +
//! tokio-rustls, since warp 0.4 has no TLS) that answers AdmissionReviews with `injection::plan`.
//!
//! The chart ships the configuration (`templates/webhook.yaml`, kept equal to `configuration`
//! by a drift test); the operator only fills its `caBundle` (`publish_ca_bundle`), with a right
//! to get and patch that one object by name, and none at all under cert-manager.
//! Every failure of the webhook itself admits the pod unchanged; whether the API server admits a
//! pod when no replica answers is the configuration's `failurePolicy` (chart value).

use crate::certs::WebhookCerts;
use crate::crd::WriteThroughCache;
use crate::injection::{self, Decision};
use crate::metrics::Metrics;
use crate::resources::Release;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, OwnerReference,
};
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

pub const PATH: &str = "/mutate";
/// Namespaces whose pods are never sent to the webhook.
pub const ALWAYS_EXCLUDED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// A namespace labelled `wtc.dev/injection=disabled` is excluded too.
pub const NAMESPACE_OPT_OUT_LABEL: &str = "wtc.dev/injection";

/// Where the API server reaches the webhook.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Service {
        namespace: String,
        name: String,
        port: i32,
    },
    /// `https://host:port` (tests serve the webhook from the test process).
    Url(String),
}

/// What the API server does when no replica answers in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Admit the pod without the sidecar (it is reported: an Event, the cache's status).
    Ignore,
    /// Refuse the pod: opted-in and other pods in matched namespaces wait for the webhook.
    Fail,
}

/// How the API server calls the webhook.
#[derive(Debug, Clone, Copy)]
pub struct Calling {
    pub failure_policy: FailurePolicy,
    pub timeout_seconds: i32,
}

impl Default for Calling {
    fn default() -> Self {
        Self {
            failure_policy: FailurePolicy::Ignore,
            timeout_seconds: 5,
        }
    }
}

/// The webhook's configuration: what the chart's template renders (a drift test holds them
/// equal), and what tests register for a webhook served from the test process. `ca_bundle`:
/// `None` when the operator or cert-manager's CA injector (`inject_ca_from`) fills it.
/// `watch_namespace`: only that namespace's pods are sent (the operator can read no cache elsewhere).
pub fn configuration(
    name: &str,
    endpoint: &Endpoint,
    ca_bundle: Option<&str>,
    operator_namespace: &str,
    inject_ca_from: Option<&str>,
    calling: Calling,
    watch_namespace: Option<&str>,
) -> MutatingWebhookConfiguration {
    let client_config = WebhookClientConfig {
        ca_bundle: ca_bundle.map(|pem| k8s_openapi::ByteString(pem.as_bytes().to_vec())),
        service: match endpoint {
            Endpoint::Service {
                namespace,
                name,
                port,
            } => Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(PATH.into()),
                port: Some(*port),
            }),
            Endpoint::Url(_) => None,
        },
        url: match endpoint {
            Endpoint::Url(u) => Some(format!("{u}{PATH}")),
            Endpoint::Service { .. } => None,
        },
    };
    let mut excluded: Vec<String> = ALWAYS_EXCLUDED.iter().map(|s| s.to_string()).collect();
    excluded.push(operator_namespace.to_string());
    let mut namespace_rules = vec![
        LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "NotIn".into(),
            values: Some(excluded),
        },
        LabelSelectorRequirement {
            key: NAMESPACE_OPT_OUT_LABEL.into(),
            operator: "NotIn".into(),
            values: Some(vec!["disabled".into()]),
        },
    ];
    if let Some(ns) = watch_namespace {
        namespace_rules.push(LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "In".into(),
            values: Some(vec![ns.into()]),
        });
    }
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: inject_ca_from
                .map(|c| [("cert-manager.io/inject-ca-from".to_string(), c.to_string())].into()),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: "inject.wtc.dev".into(),
            admission_review_versions: vec!["v1".into()],
            side_effects: "None".into(),
            failure_policy: Some(
                match calling.failure_policy {
                    FailurePolicy::Ignore => "Ignore",
                    FailurePolicy::Fail => "Fail",
                }
                .into(),
            ),
            timeout_seconds: Some(calling.timeout_seconds),
            reinvocation_policy: Some("Never".into()),
            client_config,
            rules: Some(vec![RuleWithOperations {
                operations: Some(vec!["CREATE".into()]),
                api_groups: Some(vec!["".into()]),
                api_versions: Some(vec!["v1".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(namespace_rules),
                ..LabelSelector::default()
            }),
            // The operator's own pods are never mutated, whatever namespace they run in.
            object_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "app.kubernetes.io/name".into(),
                    operator: "NotIn".into(),
                    values: Some(vec!["wtc-operator".into()]),
                }]),
                ..LabelSelector::default()
            }),
            match_policy: Some("Equivalent".into()),
            match_conditions: None,
        }]),
    }
}

/// A non-controller reference to the operator's ClusterRole. What the operator makes outside a
/// cache (the webhook's certificate Secret, the leader Lease) is owned by it,
/// so uninstalling the chart (which deletes the ClusterRole) lets the garbage collector remove
/// them too.
pub async fn cluster_role_owner(
    client: &Client,
    cluster_role: &str,
) -> Result<OwnerReference, kube::Error> {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    use kube::Resource;
    let role = Api::<ClusterRole>::all(client.clone())
        .get(cluster_role)
        .await?;
    let mut owner = role
        .controller_owner_ref(&())
        .expect("a ClusterRole read from the API server has a name and uid");
    owner.controller = Some(false);
    Ok(owner)
}

/// Registers a configuration (tests: a webhook served from the test process).
pub async fn apply_configuration(
    client: &Client,
    config: &MutatingWebhookConfiguration,
) -> Result<(), kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let name = config.metadata.name.clone().unwrap_or_default();
    let pp = PatchParams::apply(crate::reconcile::FIELD_MANAGER).force();
    api.patch(&name, &pp, &Patch::Apply(config)).await?;
    Ok(())
}

/// Puts `ca_pem` in the `caBundle` of every webhook of the configuration `name` (the chart's)
/// that does not carry it yet, and nothing else: `Ok(true)` when it wrote. The patch names the
/// version it read, so a concurrent `helm upgrade` makes it fail (and the caller retry) rather
/// than be undone.
pub async fn publish_ca_bundle(client: &Client, name: &str, ca_pem: &str) -> Result<bool, String> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let current = api
        .get_opt(name)
        .await
        .map_err(|e| format!("cannot read the MutatingWebhookConfiguration {name}: {e}"))?
        .ok_or_else(|| {
            format!(
                "the MutatingWebhookConfiguration {name} does not exist (the chart installs it)"
            )
        })?;
    let want = k8s_openapi::ByteString(ca_pem.as_bytes().to_vec());
    let stale: Vec<serde_json::Value> = current
        .webhooks
        .iter()
        .flatten()
        .filter(|w| w.client_config.ca_bundle.as_ref() != Some(&want))
        .map(|w| serde_json::json!({"name": w.name, "clientConfig": {"caBundle": want}}))
        .collect();
    if stale.is_empty() {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "webhooks": stale,
    });
    api.patch(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map_err(|e| format!("cannot publish the caBundle of {name}: {e}"))?;
    Ok(true)
}

pub struct Webhook {
    client: Client,
    metrics: Arc<Metrics>,
    /// Native sidecars (init containers with `restartPolicy: Always`) are available.
    native_sidecars: bool,
    images: Release,
    tls: RwLock<TlsAcceptor>,
    /// Shutting down: every answer closes its connection, so the API server's next call opens a
    /// new one, which the Service sends to a replica that stays.
    draining: AtomicBool,
    /// Under `Fail`, a pod this webhook cannot handle (the cache unreadable) is refused too, as
    /// the API server would if the webhook did not answer.
    failure_policy: FailurePolicy,
}

pub fn acceptor(certs: &WebhookCerts) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(certs.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("serving certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(certs.key_pem.as_bytes())
        .map_err(|e| format!("serving key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("TLS configuration: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Webhook {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        native_sidecars: bool,
        images: Release,
        certs: &WebhookCerts,
    ) -> Result<Self, String> {
        Ok(Self {
            client,
            metrics,
            native_sidecars,
            images,
            tls: RwLock::new(acceptor(certs)?),
            draining: AtomicBool::new(false),
            failure_policy: FailurePolicy::Ignore,
        })
    }

    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Serves new connections with the renewed certificate.
    pub fn rotate(&self, certs: &WebhookCerts) -> Result<(), String> {
        *self.tls.write().unwrap() = acceptor(certs)?;
        Ok(())
    }

    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let me = Arc::clone(&self);
            let tls = self.tls.read().unwrap().clone();
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let me = Arc::clone(&me);
                    async move {
                        let mut answer = me.handle(req).await;
                        if me.draining.load(Ordering::Relaxed) {
                            answer.headers_mut().insert(
                                hyper::header::CONNECTION,
                                hyper::header::HeaderValue::from_static("close"),
                            );
                        }
                        Ok::<_, std::convert::Infallible>(answer)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(addr).await
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/healthz" {
            return text(StatusCode::OK, "ok");
        }
        if req.uri().path() != PATH || req.method() != hyper::Method::POST {
            return text(StatusCode::NOT_FOUND, "not found");
        }
        let body = match Limited::new(req.into_body(), 8 * 1024 * 1024)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => return text(StatusCode::BAD_REQUEST, "unreadable body"),
        };
        let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("not an AdmissionReview: {e}"),
                );
            }
        };
        let request: AdmissionRequest<Pod> = match review.try_into() {
            Ok(r) => r,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("no request in the review: {e}"),
                );
            }
        };
        let response = self.admit(&request).await;
        let out: AdmissionReview<DynamicObject> = response.into_review();
        match serde_json::to_vec(&out) {
            Ok(v) => {
                let mut r = Response::new(Full::new(Bytes::from(v)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    "application/json".parse().unwrap(),
                );
                r
            }
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not encode the response",
            ),
        }
    }

    async fn admit(&self, request: &AdmissionRequest<Pod>) -> AdmissionResponse {
        let allowed = AdmissionResponse::from(request);
        let Some(pod) = request.object.as_ref() else {
            return allowed;
        };
        let Some(cache_name) = injection::requested_cache(pod) else {
            self.count("skipped");
            return allowed;
        };
        let namespace = request.namespace.clone().unwrap_or_default();
        let api: Api<WriteThroughCache> = Api::namespaced(self.client.clone(), &namespace);
        let cache = match api.get_opt(cache_name).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%namespace, cache = cache_name, error = %e, "cache lookup failed; admitting unchanged");
                self.count("error");
                if self.failure_policy == FailurePolicy::Fail {
                    return allowed.deny(format!(
                        "the wtc operator could not read the cache {cache_name:?}; refused \
                         because the webhook's failurePolicy is Fail: try again"
                    ));
                }
                return self.reported(allowed, injection::CACHE_UNREADABLE);
            }
        };
        match injection::plan(pod, cache.as_ref(), self.native_sidecars, &self.images) {
            Decision::Skip(reason) => {
                tracing::info!(%namespace, cache = cache_name, reason, "not injecting");
                self.count("skipped");
                self.reported(allowed, reason)
            }
            Decision::Deny(message) => {
                tracing::info!(%namespace, cache = cache_name, %message, "refusing a pod");
                self.count("denied");
                allowed.deny(message)
            }
            Decision::Inject(patch) => match allowed.clone().with_patch(patch) {
                Ok(r) => {
                    self.count("injected");
                    r
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not encode the patch");
                    self.count("error");
                    allowed
                }
            },
        }
    }

    /// The pod admitted without the sidecar, the reason written on it for the watchdog and the
    /// user (`kubectl describe pod`).
    fn reported(&self, allowed: AdmissionResponse, reason: &str) -> AdmissionResponse {
        match injection::skip_report(reason) {
            Some(patch) => allowed.clone().with_patch(patch).unwrap_or(allowed),
            None => allowed,
        }
    }

    fn count(&self, result: &str) {
        self.metrics.injections.with_label_values(&[result]).inc();
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

/// Native sidecars are on by default from Kubernetes 1.29.
pub async fn supports_native_sidecars(client: &Client) -> bool {
    match client.apiserver_version().await {
        Ok(v) => {
            let minor: u32 = v.minor.trim_end_matches('+').parse().unwrap_or(0);
            let major: u32 = v.major.parse().unwrap_or(0);
            major > 1 || (major == 1 && minor >= 29)
        }
        Err(_) => false,
    }
}
