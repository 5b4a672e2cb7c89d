//! The webhook's TLS: the operator keeps its own CA and serving certificate in a Secret, renews
//! the serving certificate before it expires, and publishes the CA as the webhook's `caBundle`.
//!
//! The CA is long-lived and only the serving certificate rotates, so a rotation never has to
//! change `caBundle` while the API server is calling the webhook.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::collections::BTreeMap;
use time::{Duration, OffsetDateTime};

const CA_NAME: &str = "wtc-operator webhook CA";
const NOT_AFTER_ANNOTATION: &str = "wtc.dev/serving-cert-not-after";
pub const SERVING_VALIDITY_DAYS: i64 = 365;
pub const RENEW_BEFORE_DAYS: i64 = 30;

#[derive(Debug, Clone, PartialEq)]
pub struct WebhookCerts {
    pub ca_pem: String,
    ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Unix seconds.
    pub not_after: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("the webhook certificate Secret kept changing under this replica")]
    Contended,
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

impl WebhookCerts {
    /// A new CA and a serving certificate for `names` (the webhook Service's DNS names, or
    /// 127.0.0.1 in tests).
    pub fn generate(names: &[String], now: OffsetDateTime) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let ca_pem = ca_params()?.self_signed(&ca_key)?.pem();
        Self::issue(ca_pem, ca_key.serialize_pem(), names, now)
    }

    /// A new serving certificate from the same CA.
    pub fn renew(&self, names: &[String], now: OffsetDateTime) -> Result<Self, rcgen::Error> {
        Self::issue(self.ca_pem.clone(), self.ca_key_pem.clone(), names, now)
    }

    fn issue(
        ca_pem: String,
        ca_key_pem: String,
        names: &[String],
        now: OffsetDateTime,
    ) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        let ca = ca_params()?;
        let issuer = Issuer::from_params(&ca, &ca_key);
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(SERVING_VALIDITY_DAYS);
        let key = KeyPair::generate()?;
        let cert_pem = params.signed_by(&key, &issuer)?.pem();
        Ok(Self {
            ca_pem,
            ca_key_pem,
            cert_pem,
            key_pem: key.serialize_pem(),
            not_after: params.not_after.unix_timestamp(),
        })
    }

    /// Certificates provided by cert-manager (its CA injector fills `caBundle`).
    pub fn from_files(cert_pem: String, key_pem: String) -> Result<Self, String> {
        Ok(Self {
            ca_pem: String::new(),
            ca_key_pem: String::new(),
            cert_pem,
            key_pem,
            not_after: i64::MAX,
        })
    }

    pub fn needs_renewal(&self, now: OffsetDateTime) -> bool {
        self.not_after - now.unix_timestamp() < Duration::days(RENEW_BEFORE_DAYS).whole_seconds()
    }

    fn from_secret(s: &Secret) -> Option<Self> {
        let data = s.data.as_ref()?;
        let get = |k: &str| {
            data.get(k)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        };
        Some(Self {
            ca_pem: get("ca.crt")?,
            ca_key_pem: get("ca.key")?,
            cert_pem: get("tls.crt")?,
            key_pem: get("tls.key")?,
            not_after: s
                .metadata
                .annotations
                .as_ref()?
                .get(NOT_AFTER_ANNOTATION)?
                .parse()
                .ok()?,
        })
    }

    fn to_secret(&self, name: &str, namespace: &str) -> Secret {
        let b = |s: &str| ByteString(s.as_bytes().to_vec());
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                annotations: Some(BTreeMap::from([(
                    NOT_AFTER_ANNOTATION.into(),
                    self.not_after.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("ca.crt".into(), b(&self.ca_pem)),
                ("ca.key".into(), b(&self.ca_key_pem)),
                ("tls.crt".into(), b(&self.cert_pem)),
                ("tls.key".into(), b(&self.key_pem)),
            ])),
            ..Secret::default()
        }
    }
}

/// Loads the certificates from their Secret, creating or renewing them as needed. Safe with
/// several replicas starting at once: the Secret is created (not applied), so the first replica
/// makes the CA and the others, refused with a conflict, read and use it; a renewal carries the
/// resourceVersion it read, so two replicas renewing at once end up with the same certificate.
pub async fn ensure(
    client: &Client,
    namespace: &str,
    secret: &str,
    names: &[String],
    owner: Option<&OwnerReference>,
) -> Result<WebhookCerts, CertError> {
    let to_secret = |c: &WebhookCerts| {
        let mut s = c.to_secret(secret, namespace);
        s.metadata.owner_references = owner.map(|o| vec![o.clone()]);
        s
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    // A lost race means the other replica's certificates are there now: read again.
    for _ in 0..5 {
        let now = OffsetDateTime::now_utc();
        let stored = api.get_opt(secret).await?;
        let current = stored.as_ref().and_then(WebhookCerts::from_secret);
        let written = match (&stored, current) {
            (Some(s), Some(c)) if !c.needs_renewal(now) => {
                adopt(&api, s, owner).await;
                return Ok(c);
            }
            (Some(s), Some(c)) => {
                tracing::info!("renewing the webhook serving certificate");
                let renewed = c.renew(names, now)?;
                let mut next = to_secret(&renewed);
                next.metadata.resource_version = s.metadata.resource_version.clone();
                let patch = Patch::Merge(&next);
                (
                    api.patch(secret, &PatchParams::default(), &patch).await,
                    renewed,
                )
            }
            (Some(s), None) => {
                // Not ours or damaged: make new ones in its place, with the same precondition.
                tracing::warn!("the webhook certificate Secret is incomplete: making a new CA");
                let fresh = WebhookCerts::generate(names, now)?;
                let mut next = to_secret(&fresh);
                next.metadata.resource_version = s.metadata.resource_version.clone();
                let patch = Patch::Merge(&next);
                (
                    api.patch(secret, &PatchParams::default(), &patch).await,
                    fresh,
                )
            }
            (None, _) => {
                tracing::info!("creating the webhook CA and serving certificate");
                let fresh = WebhookCerts::generate(names, now)?;
                let made = api.create(&PostParams::default(), &to_secret(&fresh)).await;
                (made, fresh)
            }
        };
        match written {
            (Ok(_), certs) => return Ok(certs),
            (Err(kube::Error::Api(e)), _) if e.code == 409 => continue,
            (Err(e), _) => return Err(e.into()),
        }
    }
    Err(CertError::Contended)
}

/// A Secret made by an operator release that did not set the owner (before an upgrade) gets it
/// now, so uninstalling removes it. Best effort: the next start tries again.
async fn adopt(api: &Api<Secret>, stored: &Secret, owner: Option<&OwnerReference>) {
    let Some(owner) = owner else { return };
    let owned = stored.metadata.owner_references.iter().flatten();
    if owned.clone().any(|o| o.uid == owner.uid) {
        return;
    }
    let mut refs: Vec<OwnerReference> = owned.cloned().collect();
    refs.push(owner.clone());
    let patch = serde_json::json!({"metadata": {
        "ownerReferences": refs,
        "resourceVersion": stored.metadata.resource_version,
    }});
    let name = stored.metadata.name.clone().unwrap_or_default();
    if let Err(e) = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::info!(error = %e, "could not set the owner of the webhook's Secret");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_keeps_the_ca_and_moves_the_expiry() {
        let now = OffsetDateTime::now_utc();
        let names = vec!["wtc-operator.wtc-system.svc".to_string()];
        let first = WebhookCerts::generate(&names, now).unwrap();
        assert!(!first.needs_renewal(now));
        let late = now + Duration::days(SERVING_VALIDITY_DAYS - RENEW_BEFORE_DAYS + 1);
        assert!(first.needs_renewal(late));
        let second = first.renew(&names, late).unwrap();
        assert_eq!(
            second.ca_pem, first.ca_pem,
            "the caBundle stays valid across a rotation"
        );
        assert_ne!(second.cert_pem, first.cert_pem);
        assert!(second.not_after > first.not_after);
        let back = WebhookCerts::from_secret(&second.to_secret("s", "ns")).unwrap();
        assert_eq!(back, second);
    }
}
