//! Sidecar injection, the pure part: given a Pod being created and the cache it names, decide
//! whether to inject and build the JSON patch. The webhook server (`webhook.rs`) only does I/O.

use crate::crd::{TlsFiles, WriteThroughCache};
use crate::pod_settings::{self, PodSettings};
use crate::resources::{
    CONFIG_HASH_ANNOTATION, CONFIG_KEY, PASSWORD_KEY, REDIS_PASSWORD_DIR, REDIS_PASSWORD_VOLUME,
    Release, TLS_CA, TLS_CERT, TLS_KEY, TlsPeer, auth_secret_name, config_hash, config_map_name,
    redis_endpoint, restricted_container, secret_env,
};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EnvVar, ExecAction, KeyToPath, Pod, Probe,
    SecretVolumeSource, Volume, VolumeMount,
};
use kube::ResourceExt;
use serde_json::{Value, json};

/// Pods opt in with this annotation, naming a `WriteThroughCache` in their namespace.
pub const INJECT_ANNOTATION: &str = "wtc.dev/inject";
pub const SIDECAR_NAME: &str = "wtc-sidecar";
/// The sidecar's container port for `/metrics` on the pod's address.
pub const METRICS_PORT_NAME: &str = "wtc-metrics";
pub use crate::resources::INJECTED_LABEL;
/// Set by the webhook on a pod that asked for the sidecar and did not get it: why.
pub const SKIPPED_ANNOTATION: &str = "wtc.dev/injection-skipped";
/// The pod already has a container named like the sidecar.
pub const ALREADY_INJECTED: &str = "already injected";
/// The webhook's answer when it could not read the cache (an API error, not the pod's fault).
pub const CACHE_UNREADABLE: &str = "the operator could not read the cache";
const CONFIG_VOLUME: &str = "wtc-sidecar-config";
const CONFIG_DIR: &str = "/etc/wtc";

#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Leave the pod as it is, for this reason.
    Skip(&'static str),
    /// Apply this JSON patch.
    Inject(json_patch::Patch),
    /// Refuse the pod: its per-pod settings are not valid (the message names the annotation).
    Deny(String),
}

/// For a skip the user must hear about (the pod asked for the sidecar), the patch that records
/// the reason on the pod; `None` when there is nothing to report.
pub fn skip_report(reason: &str) -> Option<json_patch::Patch> {
    if reason == "not opted in" {
        return None;
    }
    // The opt-in annotation is there, so the map is: add one key to it.
    let path = format!(
        "/metadata/annotations/{}",
        SKIPPED_ANNOTATION.replace('/', "~1")
    );
    serde_json::from_value(json!([{"op": "add", "path": path, "value": reason}])).ok()
}

/// The cache a pod asks for, if any.
pub fn requested_cache(pod: &Pod) -> Option<&str> {
    pod.annotations().get(INJECT_ANNOTATION).map(String::as_str)
}

/// `native`: the cluster runs sidecars as init containers with `restartPolicy: Always` (1.29+).
/// `images`: the operator's release, for caches that pin no sidecar image.
pub fn plan(
    pod: &Pod,
    cache: Option<&WriteThroughCache>,
    native: bool,
    images: &Release,
) -> Decision {
    if requested_cache(pod).is_none() {
        return Decision::Skip("not opted in");
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Decision::Skip("pod has no spec");
    };
    if spec.host_network == Some(true) {
        // Loopback would be the node's: the sidecar's API would be open to the whole node.
        return Decision::Skip("host network");
    }
    let named = |cs: &Option<Vec<Container>>| cs.iter().flatten().any(|c| c.name == SIDECAR_NAME);
    if named(&Some(spec.containers.clone())) || named(&spec.init_containers) {
        return Decision::Skip(ALREADY_INJECTED);
    }
    let Some(cache) = cache else {
        return Decision::Skip("no such cache in this namespace");
    };
    if let Some(sel) = &cache.spec.injection.pod_selector
        && !selector_matches(sel, pod)
    {
        return Decision::Skip("pod does not match the cache's pod selector");
    }
    let settings = match pod_settings::parse(pod.annotations()) {
        Ok(s) => s,
        Err(e) => return Decision::Deny(e),
    };
    let port = settings.port.unwrap_or(cache.spec.sidecar.port);
    if settings
        .metrics_port
        .unwrap_or(cache.spec.sidecar.metrics_port)
        == port
    {
        return Decision::Deny(format!(
            "the sidecar's API and metrics would share port {port}: set {} or {} to another",
            pod_settings::PORT,
            pod_settings::METRICS_PORT
        ));
    }

    let resources = match settings.resources(
        cache.spec.sidecar.resources.as_ref(),
        images.sidecar_resources.as_ref(),
    ) {
        Ok(r) => r,
        Err(e) => return Decision::Deny(e),
    };
    let mut container = sidecar_container(cache, images, &settings);
    container.resources = resources;
    let mut ops: Vec<Value> = vec![];
    if native {
        container.restart_policy = Some("Always".into());
        // First, so it is up before the other init containers and the application start.
        match &spec.init_containers {
            Some(_) => {
                ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}))
            }
            None => {
                ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]}))
            }
        }
    } else {
        ops.push(json!({"op": "add", "path": "/spec/containers/-", "value": container}));
    }
    for (i, volume) in sidecar_volumes(cache).into_iter().enumerate() {
        match (&spec.volumes, i) {
            (None, 0) => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume]})),
            _ => ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume})),
        }
    }
    // Which configuration the sidecar starts with: the watchdog compares it with the cache's.
    ops.push(json!({
        "op": "add",
        "path": format!("/metadata/annotations/{}", CONFIG_HASH_ANNOTATION.replace('/', "~1")),
        "value": config_hash(cache),
    }));
    // The label lets the operator count injected pods with a selector.
    let label_path = format!(
        "/metadata/labels/{}",
        INJECTED_LABEL.replace('~', "~0").replace('/', "~1")
    );
    match &pod.metadata.labels {
        Some(_) => ops.push(json!({"op": "add", "path": label_path, "value": cache.name_any()})),
        None => ops.push(json!({"op": "add", "path": "/metadata/labels", "value": {INJECTED_LABEL: cache.name_any()}})),
    }
    Decision::Inject(serde_json::from_value(Value::Array(ops)).expect("well-formed patch"))
}

/// The volumes `sidecar_container` mounts: the cache's ConfigMap, its TLS files, the managed
/// Redis' password.
pub fn sidecar_volumes(cache: &WriteThroughCache) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: CONFIG_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(cache),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    volumes.extend(tls_mounts(cache).map(|(peer, files)| tls_volume(peer, files)));
    volumes.extend(redis_password_volume(cache));
    volumes
}

/// Where the cache's ConfigMap is mounted in the sidecar container.
pub fn config_path(key: &str) -> String {
    format!("{CONFIG_DIR}/{key}")
}

/// The TLS files the cache's sidecars need, by peer.
fn tls_mounts(cache: &WriteThroughCache) -> impl Iterator<Item = (TlsPeer, &TlsFiles)> {
    let spec = &cache.spec;
    let redis = spec.redis.external.as_ref().and_then(|e| e.tls.as_ref());
    [
        (TlsPeer::Database, spec.database.tls.as_ref()),
        (TlsPeer::Redis, redis),
    ]
    .into_iter()
    .filter_map(|(peer, files)| Some((peer, files?)))
}

/// The managed Redis' password, the one key of its auth Secret the sidecar needs (not the
/// operator's password, not Redis' own file).
fn redis_password_volume(cache: &WriteThroughCache) -> Option<Volume> {
    cache.spec.redis.managed.as_ref()?;
    Some(Volume {
        name: REDIS_PASSWORD_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(auth_secret_name(cache)),
            items: Some(vec![KeyToPath {
                key: PASSWORD_KEY.into(),
                path: PASSWORD_KEY.into(),
                mode: None,
            }]),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    })
}

/// A Secret volume with the Secret's keys mapped onto the file names the configuration names
/// (`resources::sidecar_config`). Default file mode (0644): the sidecar's non-root user reads
/// them without an `fsGroup` on the application's pod.
fn tls_volume(peer: TlsPeer, files: &TlsFiles) -> Volume {
    let mut items = vec![];
    if let Some(ca) = &files.ca_key {
        items.push(KeyToPath {
            key: ca.clone(),
            path: TLS_CA.into(),
            mode: None,
        });
    }
    if let (Some(cert), Some(key)) = (&files.cert_key, &files.key_key) {
        items.push(KeyToPath {
            key: cert.clone(),
            path: TLS_CERT.into(),
            mode: None,
        });
        items.push(KeyToPath {
            key: key.clone(),
            path: TLS_KEY.into(),
            mode: None,
        });
    }
    Volume {
        name: peer.volume().into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(files.secret_name.clone()),
            items: Some(items),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The sidecar container: configuration from the cache's ConfigMap, credentials by
/// `secretKeyRef` only, never inline.
///
/// Probes (docs/kubernetes.md says what each means): all three ask `/healthz`, which answers
/// while the process serves its API, whatever PostgreSQL and Redis do. The startup probe holds
/// the application back until the sidecar listens (a native sidecar's start gates the containers
/// after it); readiness does not follow the database, so a PostgreSQL outage does not take every
/// injected pod out of its Services (the sidecar answers 503 with `Retry-After` meanwhile); the
/// liveness probe restarts a sidecar that stopped answering.
pub fn sidecar_container(
    cache: &WriteThroughCache,
    images: &Release,
    settings: &PodSettings,
) -> Container {
    let spec = &cache.spec;
    let mut env = vec![secret_env(
        "WTC_DATABASE_URL",
        &spec.database.url_secret.name,
        &spec.database.url_secret.key,
    )];
    match (&spec.redis.external, redis_endpoint(cache)) {
        (Some(ext), _) => env.push(secret_env(
            "WTC_REDIS_URL",
            &ext.url_secret.name,
            &ext.url_secret.key,
        )),
        (None, Some(endpoint)) => {
            // The password comes from a mounted file, read for each new connection, so a
            // rotation reaches the running sidecar.
            env.push(EnvVar {
                name: "WTC_REDIS_URL".into(),
                value: Some(format!("redis://{endpoint}")),
                ..EnvVar::default()
            });
            env.push(EnvVar {
                name: "WTC_REDIS_PASSWORD_FILE".into(),
                value: Some(format!("{REDIS_PASSWORD_DIR}/{PASSWORD_KEY}")),
                ..EnvVar::default()
            });
        }
        (None, None) => {}
    }
    let port = settings.port.unwrap_or(spec.sidecar.port);
    let plain = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    };
    if settings.port.is_some() {
        env.push(plain("WTC_LISTEN", format!("127.0.0.1:{port}")));
    }
    if let Some(level) = &settings.log_level {
        env.push(plain("RUST_LOG", level.clone()));
    }
    let metrics_port = settings.metrics_port.unwrap_or(spec.sidecar.metrics_port);
    if settings.metrics_port.is_some() {
        env.push(plain(
            "WTC_METRICS_LISTEN",
            format!("0.0.0.0:{metrics_port}"),
        ));
    }
    // The API listens on loopback only, out of the kubelet's reach: the binary probes itself.
    let probe = |period: i32, failures: i32| Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                "/wtc-sidecar".into(),
                "--probe".into(),
                format!("http://127.0.0.1:{port}/healthz"),
            ]),
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    };
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(
            spec.sidecar
                .image
                .clone()
                .unwrap_or_else(|| images.sidecar.clone()),
        ),
        args: Some(vec!["--config".into(), config_path(CONFIG_KEY)]),
        env: Some(env),
        // Named, for PodMonitors and `kubernetes_sd_configs` (`wtc-metrics`).
        ports: (metrics_port != 0).then(|| {
            vec![ContainerPort {
                name: Some(METRICS_PORT_NAME.into()),
                container_port: i32::from(metrics_port),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]
        }),
        // Set by `plan`, which can refuse a contradiction in the pod's annotations.
        resources: settings
            .resources(
                spec.sidecar.resources.as_ref(),
                images.sidecar_resources.as_ref(),
            )
            .ok()
            .flatten(),
        volume_mounts: Some(
            std::iter::once(VolumeMount {
                name: CONFIG_VOLUME.into(),
                mount_path: CONFIG_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            })
            .chain(tls_mounts(cache).map(|(peer, _)| VolumeMount {
                name: peer.volume().into(),
                mount_path: peer.dir().into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }))
            .chain(redis_password_volume(cache).map(|v| VolumeMount {
                name: v.name,
                mount_path: REDIS_PASSWORD_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }))
            .collect(),
        ),
        // Up to 60 s to listen (it connects to nothing before listening).
        startup_probe: Some(probe(1, 60)),
        readiness_probe: Some(probe(5, 3)),
        liveness_probe: Some(probe(10, 3)),
        security_context: Some(restricted_container()),
        ..Container::default()
    }
}

fn selector_matches(
    sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    pod: &Pod,
) -> bool {
    let labels = pod.labels();
    let exact = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    exact && exprs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::fixtures::CacheBuilder;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn pod(annotated: bool) -> Pod {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "app", "namespace": "shop"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        }))
        .unwrap();
        if annotated {
            p.annotations_mut()
                .insert(INJECT_ANNOTATION.into(), "orders".into());
        }
        p
    }

    fn apply(p: &Pod, patch: &json_patch::Patch) -> Pod {
        let mut v = serde_json::to_value(p).unwrap();
        json_patch::patch(&mut v, patch).unwrap();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_skip_the_pod_asked_against_is_written_on_it() {
        let p = pod(true);
        let reason = "pod does not match the cache's pod selector";
        let noted = apply(&p, &skip_report(reason).unwrap());
        assert_eq!(
            noted
                .annotations()
                .get(SKIPPED_ANNOTATION)
                .map(String::as_str),
            Some(reason)
        );
        assert_eq!(
            noted
                .annotations()
                .get(INJECT_ANNOTATION)
                .map(String::as_str),
            Some("orders"),
            "the opt-in stays"
        );
        assert!(skip_report("not opted in").is_none());
        // Written too, so the watchdog knows the pod has a sidecar of its own.
        assert!(skip_report(ALREADY_INJECTED).is_some());
    }

    #[test]
    fn per_pod_annotations_set_port_log_level_and_resources_or_refuse_the_pod() {
        let cache = CacheBuilder::new("orders").build();
        let mut p = pod(true);
        for (k, v) in [
            (pod_settings::PORT, "7481"),
            (pod_settings::LOG_LEVEL, "debug"),
            (pod_settings::MEMORY_LIMIT, "64Mi"),
        ] {
            p.annotations_mut().insert(k.into(), v.into());
        }
        let release = Release {
            sidecar_resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
                limits: Some([("cpu".to_string(), Quantity("1".into()))].into()),
                ..Default::default()
            }),
            ..Release::default()
        };
        let Decision::Inject(patch) = plan(&p, Some(&cache), true, &release) else {
            panic!("no injection")
        };
        let sc = apply(&p, &patch).spec.unwrap().init_containers.unwrap()[0].clone();
        let env = |n: &str| {
            sc.env
                .iter()
                .flatten()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(env("WTC_LISTEN").as_deref(), Some("127.0.0.1:7481"));
        assert_eq!(env("RUST_LOG").as_deref(), Some("debug"));
        let probe = sc.startup_probe.unwrap().exec.unwrap().command.unwrap();
        assert_eq!(probe[2], "http://127.0.0.1:7481/healthz");
        let limits = sc.resources.unwrap().limits.unwrap();
        assert_eq!(
            (limits["cpu"].0.as_str(), limits["memory"].0.as_str()),
            ("1", "64Mi")
        );

        p.annotations_mut()
            .insert(pod_settings::CPU_REQUEST.into(), "fast".into());
        match plan(&p, Some(&cache), true, &release) {
            Decision::Deny(m) => assert!(m.contains(pod_settings::CPU_REQUEST), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn injects_a_native_sidecar_with_secret_refs_and_config() {
        let cache = CacheBuilder::new("orders").build();
        let Decision::Inject(patch) = plan(&pod(true), Some(&cache), true, &Release::default())
        else {
            panic!("no injection")
        };
        let out = apply(&pod(true), &patch);
        let spec = out.spec.unwrap();
        let sc = &spec.init_containers.unwrap()[0];
        assert_eq!(
            (sc.name.as_str(), sc.restart_policy.as_deref()),
            (SIDECAR_NAME, Some("Always"))
        );
        let env = sc.env.clone().unwrap();
        let db = env.iter().find(|e| e.name == "WTC_DATABASE_URL").unwrap();
        assert!(db.value.is_none(), "credentials never inline");
        assert_eq!(
            db.value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "app-db"
        );
        let url = env.iter().find(|e| e.name == "WTC_REDIS_URL").unwrap();
        assert_eq!(
            url.value.as_deref(),
            Some("redis://orders-redis.shop.svc:6379")
        );
        // The password from a mounted file (rotation reaches a running sidecar), never in the
        // environment, and only the sidecar's key of the auth Secret.
        let file = env
            .iter()
            .find(|e| e.name == "WTC_REDIS_PASSWORD_FILE")
            .unwrap();
        assert_eq!(file.value.as_deref(), Some("/etc/wtc-redis-auth/password"));
        assert!(
            env.iter()
                .all(|e| e.name == "WTC_REDIS_PASSWORD_FILE" || !e.name.contains("PASSWORD")),
            "{env:?}"
        );
        let volumes = spec.volumes.as_ref().unwrap();
        let auth = volumes
            .iter()
            .find(|v| v.name == REDIS_PASSWORD_VOLUME)
            .and_then(|v| v.secret.as_ref())
            .expect("the password volume");
        assert_eq!(auth.secret_name.as_deref(), Some("orders-redis-auth"));
        let keys: Vec<&str> = auth
            .items
            .as_ref()
            .unwrap()
            .iter()
            .map(|i| i.key.as_str())
            .collect();
        assert_eq!(keys, ["password"]);
        assert!(
            sc.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == REDIS_PASSWORD_VOLUME && m.mount_path == REDIS_PASSWORD_DIR)
        );
        // The application waits for the sidecar to listen; no probe follows the database.
        for probe in [&sc.startup_probe, &sc.readiness_probe, &sc.liveness_probe] {
            let cmd = probe
                .as_ref()
                .unwrap()
                .exec
                .as_ref()
                .unwrap()
                .command
                .clone();
            assert_eq!(
                cmd.unwrap(),
                ["/wtc-sidecar", "--probe", "http://127.0.0.1:7480/healthz"]
            );
        }
        assert_eq!(sc.image, Some(Release::default().sidecar));
        assert_eq!(
            spec.volumes.unwrap()[0].config_map.as_ref().unwrap().name,
            "orders-sidecar"
        );
        assert_eq!(out.metadata.labels.unwrap()[INJECTED_LABEL], "orders");
        // Injecting again changes nothing.
        let again = plan(
            &apply(&pod(true), &patch),
            Some(&cache),
            true,
            &Release::default(),
        );
        assert_eq!(again, Decision::Skip("already injected"));
    }

    #[test]
    fn the_sidecar_image_is_the_operators_unless_the_cache_pins_one() {
        let images = Release {
            sidecar: "registry.example/wtc-dev/wtc-sidecar:9.9.9".into(),
            redis: "registry.example/wtc-dev/redis:7".into(),
            sidecar_resources: None,
            ..Release::default()
        };
        let mut cache = CacheBuilder::new("orders").build();
        let image = |cache: &WriteThroughCache| {
            let Decision::Inject(patch) = plan(&pod(true), Some(cache), true, &images) else {
                panic!("no injection")
            };
            apply(&pod(true), &patch)
                .spec
                .unwrap()
                .init_containers
                .unwrap()[0]
                .image
                .clone()
                .unwrap()
        };
        assert_eq!(image(&cache), images.sidecar);
        cache.spec.sidecar.image = Some("pinned/wtc-sidecar:1".into());
        assert_eq!(image(&cache), "pinned/wtc-sidecar:1");
    }

    #[test]
    fn regular_container_on_older_clusters() {
        let cache = CacheBuilder::new("orders").external().build();
        let Decision::Inject(patch) = plan(&pod(true), Some(&cache), false, &Release::default())
        else {
            panic!()
        };
        let out = apply(&pod(true), &patch).spec.unwrap();
        assert_eq!(out.containers.len(), 2);
        assert_eq!(out.containers[1].name, SIDECAR_NAME);
        let env = out.containers[1].env.clone().unwrap();
        let url = env.iter().find(|e| e.name == "WTC_REDIS_URL").unwrap();
        assert_eq!(
            url.value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "redis"
        );
    }

    #[test]
    fn tls_secrets_are_mounted_where_the_configuration_names_them() {
        let mut cache = CacheBuilder::new("orders").external().build();
        let files = |secret: &str, client: bool| crate::crd::TlsFiles {
            secret_name: secret.into(),
            ca_key: Some("ca.pem".into()),
            cert_key: client.then(|| "client.pem".into()),
            key_key: client.then(|| "client-key.pem".into()),
        };
        cache.spec.database.tls = Some(files("pg-ca", false));
        cache.spec.redis.external.as_mut().unwrap().tls = Some(files("redis-tls", true));
        let Decision::Inject(patch) = plan(&pod(true), Some(&cache), true, &Release::default())
        else {
            panic!("no injection")
        };
        let spec = apply(&pod(true), &patch).spec.unwrap();
        let volumes = spec.volumes.unwrap();
        let secret = |name: &str| {
            let v = volumes.iter().find(|v| v.name == name).expect(name);
            let s = v.secret.clone().unwrap();
            let items: Vec<(String, String)> = s
                .items
                .unwrap()
                .into_iter()
                .map(|i| (i.key, i.path))
                .collect();
            (s.secret_name.unwrap(), items)
        };
        assert_eq!(
            secret("wtc-tls-database"),
            ("pg-ca".into(), vec![("ca.pem".into(), "ca.crt".into())])
        );
        assert_eq!(
            secret("wtc-tls-redis").1,
            vec![
                ("ca.pem".into(), "ca.crt".into()),
                ("client.pem".into(), "tls.crt".into()),
                ("client-key.pem".into(), "tls.key".into()),
            ]
        );
        let mounts = spec.init_containers.unwrap()[0]
            .volume_mounts
            .clone()
            .unwrap();
        let config = crate::resources::sidecar_config(&cache);
        for (file, volume) in [
            (config.database.ca_file.unwrap(), "wtc-tls-database"),
            (config.redis.ca_file.unwrap(), "wtc-tls-redis"),
            (config.redis.client_cert_file.unwrap(), "wtc-tls-redis"),
            (config.redis.client_key_file.unwrap(), "wtc-tls-redis"),
        ] {
            let m = mounts.iter().find(|m| m.name == volume).expect(volume);
            assert!(file.starts_with(&format!("{}/", m.mount_path)), "{file}");
            assert_eq!(m.read_only, Some(true));
        }
        // Without TLS settings, no TLS volume and no file in the configuration.
        let plain = CacheBuilder::new("orders").external().build();
        assert_eq!(crate::resources::sidecar_config(&plain).redis.ca_file, None);
    }

    #[test]
    fn leaves_alone_what_it_should() {
        let cache = CacheBuilder::new("orders").build();
        assert_eq!(
            plan(&pod(false), Some(&cache), true, &Release::default()),
            Decision::Skip("not opted in")
        );
        assert_eq!(
            plan(&pod(true), None, true, &Release::default()),
            Decision::Skip("no such cache in this namespace")
        );
        let mut host = pod(true);
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(
            plan(&host, Some(&cache), true, &Release::default()),
            Decision::Skip("host network")
        );
        let mut selective = cache.clone();
        selective.spec.injection.pod_selector =
            Some(serde_json::from_value(json!({"matchLabels": {"tier": "api"}})).unwrap());
        assert!(matches!(
            plan(&pod(true), Some(&selective), true, &Release::default()),
            Decision::Skip(_)
        ));
        let mut labelled = pod(true);
        labelled.labels_mut().insert("tier".into(), "api".into());
        assert!(matches!(
            plan(&labelled, Some(&selective), true, &Release::default()),
            Decision::Inject(_)
        ));
    }
}
