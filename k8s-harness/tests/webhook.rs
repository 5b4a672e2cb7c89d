//! A MutatingWebhookConfiguration pointing at a TLS server inside the test (by `url` and
//! `caBundle`) adds an annotation to Pods on CREATE.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use wtc_k8s_harness::shared;

const ANNOTATION: &str = "wtc.test/mutated-by";

async fn admit(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(Response::builder()
                .status(400)
                .body(Full::default())
                .unwrap());
        }
    };
    let review: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let uid = review["request"]["uid"].clone();
    let has_annotations = review["request"]["object"]["metadata"]["annotations"].is_object();
    let patch = if has_annotations {
        serde_json::json!([{"op": "add", "path": "/metadata/annotations/wtc.test~1mutated-by", "value": "test-webhook"}])
    } else {
        serde_json::json!([{"op": "add", "path": "/metadata/annotations", "value": {ANNOTATION: "test-webhook"}}])
    };
    let patch = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
    let resp = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch}
    });
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(resp.to_string())))
        .unwrap())
}

/// Serves the webhook on 127.0.0.1 with a cert from the control plane's CA; returns the port.
async fn start_webhook_server(cert_pem: &str, key_pem: &str) -> u16 {
    let certs = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("cert pem")];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key pem");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server cert");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), hyper::service::service_fn(admit))
                    .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_webhook_annotates_pods_on_create() {
    let cp = shared();
    let ns = cp.namespace("webhook").await.expect("namespace");
    let serving = cp
        .ca()
        .issue("test-webhook", &["127.0.0.1"])
        .expect("webhook cert");
    let port = start_webhook_server(&serving.cert_pem, &serving.key_pem).await;

    let name = format!("wtc-test-{}", ns.name());
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "annotate.wtc.test",
            "clientConfig": {
                "url": format!("https://127.0.0.1:{port}/mutate"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(cp.ca().cert_pem()),
            },
            "rules": [{
                "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                "resources": ["pods"], "scope": "Namespaced"
            }],
            // Only this test's namespace: other tests share the control plane.
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name()}},
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10
        }]
    }))
    .unwrap();
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(cp.client());
    mwcs.create(&PostParams::default(), &mwc)
        .await
        .expect("create webhook config");

    // The apiserver picks up new webhook configurations asynchronously: retry with new pods.
    let pods: Api<Pod> = ns.api();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    let annotated = loop {
        attempt += 1;
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{attempt}"), "annotations": {"keep": "me"}},
            "spec": {"containers": [{"name": "c", "image": "example.invalid/c:1"}]}
        }))
        .unwrap();
        let created = pods
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
        let ann = created.metadata.annotations.unwrap_or_default();
        if ann.get(ANNOTATION).map(String::as_str) == Some("test-webhook") {
            assert_eq!(ann.get("keep").map(String::as_str), Some("me"));
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        annotated,
        "the webhook never annotated a pod ({attempt} attempts)"
    );

    // Stored, not only returned.
    let stored = pods.get(&format!("p{attempt}")).await.expect("get pod");
    assert_eq!(
        stored
            .metadata
            .annotations
            .unwrap_or_default()
            .get(ANNOTATION)
            .map(String::as_str),
        Some("test-webhook")
    );

    mwcs.delete(&name, &DeleteParams::default())
        .await
        .expect("delete webhook config");
}
