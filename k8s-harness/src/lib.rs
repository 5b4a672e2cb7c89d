//! A real Kubernetes control plane for tests.
//!
//! Starts etcd and kube-apiserver (and, by default, kube-controller-manager, kube-scheduler and
//! kwok with fake nodes) on free loopback ports, from the binaries in the folder named by
//! `KUBEBUILDER_ASSETS` (see `scripts/k8s-testbin` and `docs/k8s-testbin.md`).
//!
//! One control plane per test binary: [`shared`] starts it lazily on first use and hands out a
//! `&'static` reference. Every child process runs under a tiny `sh` watchdog that kills it as
//! soon as the watchdog's stdin (a pipe held by the test process) closes, so nothing outlives the
//! test process, whether it exits normally, panics or is killed. A [`ControlPlane`] started with
//! [`ControlPlane::start`] (not shared) also stops its children in `Drop`.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use secrecy::SecretString;

/// Environment variable naming the folder with the control plane binaries.
pub const ASSETS_ENV: &str = "KUBEBUILDER_ASSETS";
/// The Kubernetes minor version the crate's `k8s-openapi` feature matches.
pub const KUBERNETES_MINOR: &str = "1.36";

/// Errors while starting or using the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{ASSETS_ENV} is not set. Build or locate the Kubernetes test binaries first:\n    \
         export {ASSETS_ENV}=$(scripts/k8s-testbin)\n(see docs/k8s-testbin.md)"
    )]
    AssetsUnset,
    #[error(
        "{0} not found or not executable; {ASSETS_ENV} must name the folder printed by \
         scripts/k8s-testbin (see docs/k8s-testbin.md)"
    )]
    MissingBinary(PathBuf),
    #[error("io error ({context}): {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Which components to start besides etcd and kube-apiserver.
#[derive(Debug, Clone)]
pub struct Options {
    /// kube-controller-manager (garbage collector, deployment, replicaset, serviceaccount(-token),
    /// namespace, ... controllers).
    pub controller_manager: bool,
    /// kube-scheduler.
    pub scheduler: bool,
    /// kwok, managing fake nodes so that scheduled pods become Running and Ready.
    pub kwok: bool,
    /// Number of fake nodes created for kwok.
    pub nodes: usize,
    /// How long to wait for each component to become ready.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            controller_manager: true,
            scheduler: true,
            kwok: true,
            nodes: 1,
            timeout: Duration::from_secs(90),
        }
    }
}

impl Options {
    /// Only etcd and kube-apiserver.
    pub fn minimal() -> Self {
        Self {
            controller_manager: false,
            scheduler: false,
            kwok: false,
            nodes: 0,
            ..Self::default()
        }
    }
}

/// The folder with the control plane binaries, from `KUBEBUILDER_ASSETS`.
pub fn assets_dir() -> Result<PathBuf> {
    match std::env::var_os(ASSETS_ENV) {
        Some(v) if !v.is_empty() => Ok(PathBuf::from(v)),
        _ => Err(Error::AssetsUnset),
    }
}

/// Path of one binary from the assets folder, checked to exist.
pub fn asset(name: &str) -> Result<PathBuf> {
    let p = assets_dir()?.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::MissingBinary(p))
    }
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// The control plane shared by all tests of this test binary, started on first use with
/// [`Options::default`]. Panics with the start error (every call, without retrying) if it
/// cannot start. May be called from inside or outside a tokio runtime.
pub fn shared() -> &'static ControlPlane {
    match SHARED.get_or_init(|| ControlPlane::start(Options::default()).map_err(|e| e.to_string()))
    {
        Ok(cp) => cp,
        Err(e) => panic!("the shared Kubernetes control plane could not start:\n{e}"),
    }
}

/// A throwaway certificate authority, used for the apiserver's serving cert and for any serving
/// certs tests need (e.g. webhook servers).
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(common_name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            params,
            key,
            cert_pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a serving certificate for the given names (DNS names or IP addresses).
    pub fn issue(&self, common_name: &str, sans: &[&str]) -> Result<ServingCert> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(ServingCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

struct Proc {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

/// Runs `"$@"` and kills it when this script's stdin reaches EOF, i.e. when the test process
/// (which holds the write end of the pipe) closes it or dies.
const WATCHDOG: &str = r#"exec 3<&0 </dev/null
"$@" 3<&- &
pid=$!
( cat <&3 >/dev/null 2>&1; kill -TERM "$pid" 2>/dev/null; sleep 5; kill -KILL "$pid" 2>/dev/null ) &
exec 3<&-
wait "$pid"
"#;

/// Removes the control plane's temporary folder once the test process is gone.
const REAPER: &str = r#"cat >/dev/null 2>&1; sleep 6; rm -rf "$1""#;

/// A running control plane. See the crate docs.
pub struct ControlPlane {
    dir: Option<tempfile::TempDir>,
    assets: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    ca: TestCa,
    ca_file: PathBuf,
    admin_token: String,
    options: Options,
    procs: Mutex<Vec<Proc>>,
    reaper: Option<(Child, ChildStdin)>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server)
            .field("kubeconfig", &self.kubeconfig)
            .field("assets", &self.assets)
            .finish_non_exhaustive()
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io_ctx("bind a free port"))?;
    Ok(l.local_addr().map_err(io_ctx("local_addr"))?.port())
}

fn random_hex(bytes: usize) -> String {
    // Good enough for throwaway tokens: the std hasher is randomly keyed per process.
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    while out.len() < bytes * 2 {
        let mut h = RandomState::new().build_hasher();
        h.write_usize(out.len());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        let _ = write!(out, "{:016x}", h.finish());
    }
    out.truncate(bytes * 2);
    out
}

/// The address kube-apiserver advertises. It refuses loopback and needs a default route to pick
/// one itself; the address is only published in the `kubernetes` Service's endpoints (the
/// endpoint reconciler is off), so no test traffic goes there.
fn advertise_address() -> String {
    if let Ok(a) = std::env::var("WTC_K8S_ADVERTISE_ADDRESS") {
        return a;
    }
    // A UDP "connect" sends nothing; it only asks the kernel for the source address of the
    // default route.
    if let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0")
        && s.connect("192.0.2.1:9").is_ok()
        && let Ok(a) = s.local_addr()
        && !a.ip().is_loopback()
        && !a.ip().is_unspecified()
    {
        return a.ip().to_string();
    }
    // No route at all: any non-loopback interface address from `ip`, else a TEST-NET address
    // (never contacted).
    if let Ok(out) = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut it = line.split_whitespace();
            while let Some(tok) = it.next() {
                if tok == "inet"
                    && let Some(cidr) = it.next()
                {
                    let ip = cidr.split('/').next().unwrap_or("");
                    if !ip.starts_with("127.") && !ip.is_empty() {
                        return ip.to_string();
                    }
                }
            }
        }
    }
    "192.0.2.10".to_string()
}

fn log_tail(path: &Path, max: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(max as u64)));
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Runs a future to completion on a private runtime in a separate thread, so it works whether or
/// not the caller is inside a tokio runtime.
fn block_on<F>(fut: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(fut)
    })
    .join()
    .expect("control plane start thread panicked")
}

impl ControlPlane {
    /// Starts a control plane with the binaries from `KUBEBUILDER_ASSETS` and waits until it is
    /// ready. Blocking; may be called from inside or outside a tokio runtime.
    pub fn start(options: Options) -> Result<Self> {
        let assets = assets_dir()?;
        let mut needed = vec!["etcd", "kube-apiserver"];
        if options.controller_manager {
            needed.push("kube-controller-manager");
        }
        if options.scheduler {
            needed.push("kube-scheduler");
        }
        if options.kwok {
            needed.push("kwok");
        }
        for n in &needed {
            asset(n)?;
        }
        if options.kwok && !assets.join("kwok-stages.yaml").is_file() {
            return Err(Error::MissingBinary(assets.join("kwok-stages.yaml")));
        }

        let dir = tempfile::Builder::new()
            .prefix("wtc-k8s-")
            .tempdir()
            .map_err(io_ctx("create temp dir"))?;
        let root = dir.path().to_path_buf();
        let w = |name: &str, content: &str| -> Result<PathBuf> {
            let p = root.join(name);
            fs::write(&p, content).map_err(io_ctx(format!("write {}", p.display())))?;
            Ok(p)
        };

        let advertise = advertise_address();
        let ca = TestCa::new("wtc-test-ca")?;
        let serving = ca.issue(
            "kube-apiserver",
            &[
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "10.0.0.1",
                &advertise,
            ],
        )?;
        let ca_file = w("ca.crt", ca.cert_pem())?;
        let ca_key_file = w("ca.key", &ca.key.serialize_pem())?;
        let cert_file = w("apiserver.crt", &serving.cert_pem)?;
        let key_file = w("apiserver.key", &serving.key_pem)?;
        let sa_key = KeyPair::generate()?;
        let sa_key_file = w("sa.key", &sa_key.serialize_pem())?;
        let sa_pub_file = w("sa.pub", &sa_key.public_key_pem())?;
        let admin_token = random_hex(24);
        let tokens = w(
            "tokens.csv",
            &format!("{admin_token},wtc-admin,wtc-admin-uid,\"system:masters\"\n"),
        )?;
        let _ = ca_key_file;

        let mut reaper = Command::new("sh");
        reaper
            .arg("-c")
            .arg(REAPER)
            .arg("sh")
            .arg(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let mut reaper = reaper.spawn().map_err(io_ctx("spawn sh (reaper)"))?;
        let reaper_stdin = reaper.stdin.take().expect("piped stdin");

        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let api_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = w(
            "kubeconfig",
            &kubeconfig_yaml(&server, ca.cert_pem(), &admin_token),
        )?;

        let mut cp = ControlPlane {
            dir: Some(dir),
            assets: assets.clone(),
            kubeconfig: kubeconfig.clone(),
            server: server.clone(),
            ca,
            ca_file: ca_file.clone(),
            admin_token,
            options: options.clone(),
            procs: Mutex::new(Vec::new()),
            reaper: Some((reaper, reaper_stdin)),
        };

        // etcd
        let etcd_data = root.join("etcd");
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        cp.spawn(
            "etcd",
            &[
                format!("--data-dir={}", etcd_data.display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        )?;
        cp.wait_tcp("etcd", etcd_port, options.timeout)?;

        // kube-apiserver
        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--advertise-address={advertise}"),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", cert_file.display()),
            format!("--tls-private-key-file={}", key_file.display()),
            format!("--client-ca-file={}", ca_file.display()),
            "--authorization-mode=RBAC".into(),
            format!("--token-auth-file={}", tokens.display()),
            format!("--service-account-issuer={server}"),
            format!("--service-account-key-file={}", sa_pub_file.display()),
            format!(
                "--service-account-signing-key-file={}",
                sa_key_file.display()
            ),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--allow-privileged=true".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--cert-dir={}", root.join("apiserver-certs").display()),
        ];
        if !options.controller_manager {
            // Without the serviceaccount controller no `default` ServiceAccount appears, and the
            // admission plugin would reject every pod; without the node lifecycle controller
            // nothing would remove the not-ready taint TaintNodesByCondition puts on new nodes.
            args.push("--disable-admission-plugins=ServiceAccount,TaintNodesByCondition".into());
        }
        cp.spawn("kube-apiserver", &args)?;
        cp.wait_ready(options.timeout)?;

        if options.controller_manager {
            let port = free_port()?;
            cp.spawn(
                "kube-controller-manager",
                &[
                    format!("--kubeconfig={}", kubeconfig.display()),
                    "--leader-elect=false".into(),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={port}"),
                    format!("--cert-dir={}", root.join("kcm-certs").display()),
                    format!(
                        "--service-account-private-key-file={}",
                        sa_key_file.display()
                    ),
                    format!("--root-ca-file={}", ca_file.display()),
                    "--use-service-account-credentials=false".into(),
                    format!("--controllers={}", CONTROLLERS.join(",")),
                    "--concurrent-gc-syncs=5".into(),
                    // kwok heartbeats every ~20 s; a loaded 2-core machine must not make nodes
                    // NotReady (and evict pods) in long tests.
                    "--node-monitor-grace-period=5m".into(),
                ],
            )?;
        }
        if options.scheduler {
            let port = free_port()?;
            cp.spawn(
                "kube-scheduler",
                &[
                    format!("--kubeconfig={}", kubeconfig.display()),
                    "--leader-elect=false".into(),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={port}"),
                    format!("--cert-dir={}", root.join("scheduler-certs").display()),
                ],
            )?;
        }
        if options.kwok {
            cp.spawn(
                "kwok",
                &[
                    format!("--kubeconfig={}", kubeconfig.display()),
                    format!("--config={}", assets.join("kwok-stages.yaml").display()),
                    "--manage-all-nodes=true".into(),
                    "--server-address=".into(),
                ],
            )?;
        }
        if options.controller_manager || options.kwok {
            let config = cp.admin_config();
            let nodes = if options.kwok { options.nodes } else { 0 };
            let wait_sa = options.controller_manager;
            let timeout = options.timeout;
            let res = block_on(async move {
                let client = Client::try_from(config)?;
                for i in 0..nodes {
                    create_fake_node(&client, &format!("kwok-node-{i}")).await?;
                }
                let deadline = Instant::now() + timeout;
                if wait_sa {
                    wait_for_default_sa(&client, "default", deadline).await?;
                }
                for i in 0..nodes {
                    wait_node_ready(&client, &format!("kwok-node-{i}"), deadline).await?;
                }
                Ok::<_, Error>(())
            });
            if let Err(e) = res {
                return Err(cp.with_logs(e));
            }
        }
        Ok(cp)
    }

    fn spawn(&mut self, name: &'static str, args: &[String]) -> Result<()> {
        let program = asset(name)?;
        let log = self.root().join(format!("{name}.log"));
        let out = File::create(&log).map_err(io_ctx(format!("create {}", log.display())))?;
        let err = out.try_clone().map_err(io_ctx("dup log file"))?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(&program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(io_ctx(format!("spawn {}", program.display())))?;
        let stdin = child.stdin.take();
        self.procs.get_mut().expect("procs lock").push(Proc {
            name,
            child,
            stdin,
            log,
        });
        Ok(())
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().expect("temp dir").path()
    }

    /// Fails with the component's log tail if it has exited.
    fn check_alive(&self) -> Result<()> {
        let mut procs = self.procs.lock().expect("procs lock");
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(Error::Other(format!(
                    "{} exited ({status}); last log lines from {}:\n{}",
                    p.name,
                    p.log.display(),
                    log_tail(&p.log, 4000)
                )));
            }
        }
        Ok(())
    }

    fn with_logs(&self, e: Error) -> Error {
        if let Err(dead) = self.check_alive() {
            return Error::Other(format!("{e}\n{dead}"));
        }
        let procs = self.procs.lock().expect("procs lock");
        let mut msg = e.to_string();
        for p in procs.iter() {
            let _ = write!(
                msg,
                "\n--- {} log tail ({}):\n{}",
                p.name,
                p.log.display(),
                log_tail(&p.log, 1500)
            );
        }
        Error::Other(msg)
    }

    fn wait_tcp(&self, name: &str, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(self.with_logs(Error::Other(format!(
                    "{name} did not listen on 127.0.0.1:{port} within {timeout:?}"
                ))));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let config = self.admin_config();
            let res = block_on(async move {
                let client = Client::try_from(config)?;
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .map_err(|e| Error::Other(e.to_string()))?;
                Ok::<_, Error>(client.request_text(req).await?)
            });
            let last = match res {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(self.with_logs(Error::Other(format!(
                    "kube-apiserver not ready within {timeout:?}: {last}"
                ))));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `https://127.0.0.1:<port>`
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// Path of a kubeconfig for the admin (a static token in group `system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The admin's bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The folder the binaries come from.
    pub fn assets(&self) -> &Path {
        &self.assets
    }

    /// The options it was started with.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The cluster's CA (it signed the apiserver's serving cert); use it to issue webhook
    /// serving certs too.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// Path of the CA certificate file.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A client config for the given bearer token.
    pub fn config_for_token(&self, token: &str) -> Config {
        let mut config = Config::new(self.server.parse().expect("server url"));
        config.root_cert = Some(vec![pem_to_der(self.ca.cert_pem())]);
        config.auth_info.token = Some(SecretString::from(token.to_string()));
        config.connect_timeout = Some(Duration::from_secs(10));
        config
    }

    /// The admin's client config.
    pub fn admin_config(&self) -> Config {
        self.config_for_token(&self.admin_token)
    }

    /// A client for the admin. Must be called inside a tokio runtime; make one per test (a
    /// client must not outlive the runtime it was made in).
    pub fn client(&self) -> Client {
        Client::try_from(self.admin_config()).expect("kube client from admin config")
    }

    /// A client authenticated as a ServiceAccount, with a token from the TokenRequest API
    /// (valid for one hour).
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Result<Client> {
        let token = self.service_account_token(namespace, name).await?;
        let mut config = self.config_for_token(&token);
        config.default_namespace = namespace.to_string();
        Ok(Client::try_from(config)?)
    }

    /// A token for a ServiceAccount from the TokenRequest API (valid for one hour).
    pub async fn service_account_token(&self, namespace: &str, name: &str) -> Result<String> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let tr = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![self.server.clone()]),
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let tr = api
            .create_token_request(name, &PostParams::default(), &tr)
            .await?;
        tr.status
            .and_then(|s| s.token)
            .ok_or_else(|| Error::Other("TokenRequest returned no status".into()))
    }

    /// Writes a kubeconfig for a ServiceAccount (token from the TokenRequest API, valid for one
    /// hour, namespace preset) into the control plane's temp dir and returns its path; for
    /// running a binary (e.g. the operator) as that ServiceAccount.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let token = self.service_account_token(namespace, name).await?;
        let yaml = kubeconfig_yaml(&self.server, self.ca.cert_pem(), &token)
            .replace("namespace: default", &format!("namespace: {namespace}"));
        let path = self
            .root()
            .join(format!("kubeconfig-sa-{namespace}-{name}"));
        fs::write(&path, yaml).map_err(io_ctx(format!("write {}", path.display())))?;
        Ok(path)
    }

    /// Creates a fresh namespace `<prefix>-<random>` for one test. When the controller-manager
    /// runs, waits until its `default` ServiceAccount exists so pods can be created at once.
    /// Namespaces are not deleted automatically (the whole control plane is thrown away at the
    /// end of the test binary); call [`TestNamespace::delete`] if a test needs that.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        let client = self.client();
        let api: Api<Namespace> = Api::all(client.clone());
        let mut ns = Namespace::default();
        ns.metadata.generate_name = Some(format!("{}-", sanitize(prefix)));
        let ns = api.create(&PostParams::default(), &ns).await?;
        let name = ns.metadata.name.expect("created namespace has a name");
        if self.options.controller_manager {
            wait_for_default_sa(&client, &name, Instant::now() + self.options.timeout).await?;
        }
        Ok(TestNamespace { name, client })
    }

    /// A `kubectl` command (from `PATH`, or `KUBECTL`) using the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let program = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
        let mut c = Command::new(program);
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }

    /// A `helm` command from the assets folder using the admin kubeconfig, with its own
    /// cache/config/data folders inside the control plane's temp dir.
    pub fn helm(&self) -> Command {
        let mut c = helm_command().expect("helm binary");
        c.env("KUBECONFIG", &self.kubeconfig);
        let home = self.root().join("helm");
        c.env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        c
    }

    /// Log file of one component ("etcd", "kube-apiserver", ...).
    pub fn log_path(&self, name: &str) -> Option<PathBuf> {
        let procs = self.procs.lock().expect("procs lock");
        procs.iter().find(|p| p.name == name).map(|p| p.log.clone())
    }

    /// The last `bytes` of every component's log, for failure messages.
    pub fn log_tails(&self, bytes: usize) -> String {
        let procs = self.procs.lock().expect("procs lock");
        let mut out = String::new();
        for p in procs.iter() {
            let _ = write!(
                out,
                "\n--- {} ({}):\n{}",
                p.name,
                p.log.display(),
                log_tail(&p.log, bytes)
            );
        }
        out
    }

    /// Stops all components (reverse start order) and removes the temp dir.
    fn stop(&mut self) {
        let procs = std::mem::take(self.procs.get_mut().expect("procs lock"));
        for mut p in procs.into_iter().rev() {
            drop(p.stdin.take()); // the watchdog sends SIGTERM
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            // Whatever is left in the group (component, watchdog) gets SIGKILL.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", p.child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = p.child.wait();
        }
        if let Some((mut reaper, stdin)) = self.reaper.take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
            drop(stdin);
        }
        drop(self.dir.take());
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Controllers run by kube-controller-manager.
pub const CONTROLLERS: &[&str] = &[
    "garbage-collector-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "daemonset-controller",
    "job-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "root-ca-certificate-publisher-controller",
    "endpointslice-controller",
    "pod-garbage-collector-controller",
    // Removes the node.kubernetes.io/not-ready taint that admission puts on new nodes.
    "node-lifecycle-controller",
];

/// A namespace made for one test.
pub struct TestNamespace {
    name: String,
    client: Client,
}

impl TestNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Typed API for namespaced resources in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Starts deleting the namespace (does not wait for it to be gone).
    pub async fn delete(self) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client);
        api.delete(&self.name, &DeleteParams::default()).await?;
        Ok(())
    }
}

/// A `helm` command from the assets folder (no cluster needed for `helm version` or
/// `helm template`).
pub fn helm_command() -> Result<Command> {
    Ok(Command::new(asset("helm")?))
}

fn sanitize(prefix: &str) -> String {
    let s: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() { "test".into() } else { s }
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("");
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("valid PEM from rcgen")
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: wtc-test
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: wtc-admin
  user:
    token: {token}
contexts:
- name: wtc-test
  context:
    cluster: wtc-test
    user: wtc-admin
    namespace: default
current-context: wtc-test
"
    )
}

async fn create_fake_node(client: &Client, name: &str) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "kwok.x-k8s.io/node": "fake"
            },
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok"
            }
        },
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "nodeInfo": {
                "architecture": "amd64",
                "kubeletVersion": "fake",
                "kubeProxyVersion": "fake",
                "operatingSystem": "linux"
            },
            "phase": "Running"
        }
    }))
    .map_err(|e| Error::Other(e.to_string()))?;
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn wait_for_default_sa(client: &Client, namespace: &str, deadline: Instant) -> Result<()> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    loop {
        if api.get_opt("default").await?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Other(format!(
                "ServiceAccount {namespace}/default did not appear (kube-controller-manager)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_node_ready(client: &Client, name: &str, deadline: Instant) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    loop {
        let ready = api.get_opt(name).await?.is_some_and(|n| {
            let ready = n
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let tainted = n
                .spec
                .and_then(|s| s.taints)
                .unwrap_or_default()
                .iter()
                .any(|t| t.key.starts_with("node.kubernetes.io/"));
            ready && !tainted
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Other(format!(
                "node {name} did not become Ready and untainted (kwok, node-lifecycle-controller)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
