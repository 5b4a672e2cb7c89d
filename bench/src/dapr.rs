//! Dapr's sidecar as the peer wtc is compared with: one `daprd` process (built by
//! `scripts/daprd`, only the two state stores compiled in) with two state stores on the same
//! Redis and PostgreSQL as wtc: `state.redis` (a cache without the database behind it) and
//! `state.postgresql` (the database without a cache). The bench drives its HTTP state API
//! (`GET /v1.0/state/<store>/<key>`, `POST /v1.0/state/<store>`) over loopback, as it drives
//! wtc's.

use crate::http::HttpConn;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

pub const REDIS_STORE: &str = "wtcbench-redis";
pub const POSTGRES_STORE: &str = "wtcbench-postgres";

/// daprd's app id, this run's own: its Redis store's keys start with it (`<app id>||<key>`),
/// so the run deletes them at the end.
pub fn app_id() -> String {
    format!("wtcbench{}", std::process::id())
}

/// A running daprd; killed on drop.
pub struct Daprd {
    _child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
    pub binary: String,
}

impl Daprd {
    /// Starts daprd on free loopback ports with the two stores (`table_prefix` names the
    /// PostgreSQL store's tables) and waits until its components are ready.
    pub async fn start(
        binary: &Path,
        redis_url: &str,
        database_url: &str,
        table_prefix: &str,
        threads: Option<usize>,
    ) -> Result<Self, String> {
        if !binary.exists() {
            return Err(format!(
                "no daprd at {} (scripts/daprd builds it)",
                binary.display()
            ));
        }
        let redis_host = redis_url
            .strip_prefix("redis://")
            .ok_or("daprd needs a plain redis:// URL")?
            .trim_end_matches('/');
        let dir = std::env::temp_dir().join(format!("wtc-bench-dapr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        // Values quoted as YAML strings; the connection string is the same database URL wtc uses.
        let components = format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: {REDIS_STORE}}}\n\
             spec:\n  type: state.redis\n  version: v1\n  metadata:\n  \
             - {{name: redisHost, value: {redis_host:?}}}\n  - {{name: redisPassword, value: \"\"}}\n\
             ---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: {POSTGRES_STORE}}}\n\
             spec:\n  type: state.postgresql\n  version: v1\n  metadata:\n  \
             - {{name: connectionString, value: {database_url:?}}}\n  \
             - {{name: tablePrefix, value: {table_prefix:?}}}\n  \
             - {{name: metadataTableName, value: \"{table_prefix}metadata\"}}\n"
        );
        std::fs::write(dir.join("stores.yaml"), components).map_err(|e| e.to_string())?;
        let port = || free_port().map(|p| p.to_string());
        let (http, grpc, internal) = (port()?, port()?, port()?);
        let mut cmd = Command::new(binary);
        // The same CPUs as the wtc sidecar (`--sidecar-threads`): Go runs this many threads
        // of Go code at once, as a container-aware Go does under that CPU limit.
        match threads {
            Some(n) => cmd.env("GOMAXPROCS", n.to_string()),
            None => cmd.env_remove("GOMAXPROCS"),
        };
        let mut child = cmd
            .args(["--app-id", &app_id(), "--resources-path"])
            .arg(&dir)
            .args(["--dapr-http-port", &http, "--dapr-grpc-port", &grpc])
            .args(["--dapr-internal-grpc-port", &internal])
            .args(["--dapr-listen-addresses", "127.0.0.1"])
            .args(["--enable-metrics=false", "--log-level", "error"])
            .args([
                "--placement-host-address",
                "",
                "--scheduler-host-address",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start daprd: {e}"))?;
        let pid = child.id().ok_or("daprd exited")?;
        let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
        // Ready once its components are (`/v1.0/healthz` answers 204).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("daprd exited: {status}"));
            }
            if let Ok(mut c) = HttpConn::connect(addr).await
                && c.request("GET", "/v1.0/healthz", None)
                    .await
                    .is_ok_and(|r| r.status == 204)
            {
                break;
            }
            if Instant::now() > deadline {
                return Err("daprd did not become healthy in 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Self {
            _child: child,
            addr,
            pid,
            binary: binary.display().to_string(),
        })
    }

    /// Saves `keys` in `store` with `value` (JSON), 100 per request.
    pub async fn seed(&self, store: &str, keys: &[String], value: &str) -> Result<(), String> {
        let mut c = HttpConn::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        for chunk in keys.chunks(100) {
            let items: Vec<String> = chunk
                .iter()
                .map(|k| format!("{{\"key\":{k:?},\"value\":{value}}}"))
                .collect();
            let body = format!("[{}]", items.join(","));
            let r = c
                .request(
                    "POST",
                    &format!("/v1.0/state/{store}"),
                    Some(body.as_bytes()),
                )
                .await
                .map_err(|e| e.to_string())?;
            if r.status != 204 {
                return Err(format!("daprd answered {} to a save in {store}", r.status));
            }
        }
        Ok(())
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}
