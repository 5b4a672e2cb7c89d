//! Redis with Sentinel on loopback: a master, a replica of it (in sync before anything starts),
//! and three sentinels watching it (quorum 2, down after 1 s), for failover scenarios.

use crate::{RedisServer, free_port, scratch_dir};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

pub const MASTER_NAME: &str = "wtcmaster";

pub struct Sentinels {
    pub master: RedisServer,
    pub replica: RedisServer,
    ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
    /// The CA of a set on TLS (servers, replication, sentinels all on TLS only).
    ca: Option<PathBuf>,
}

impl Sentinels {
    /// Starts everything and waits until the sentinels know the replica and each other (a
    /// failover needs both).
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Everything on TLS only, with the certificates of `certs`.
    pub async fn start_tls(certs: &crate::tls::Certs) -> Self {
        Self::start_with(Some(certs)).await
    }

    async fn start_with(tls: Option<&crate::tls::Certs>) -> Self {
        // No 5 s wait before a full sync (Redis' default for diskless replication).
        let master_args = ["--repl-diskless-sync-delay", "0"];
        let (master, replica) = match tls {
            None => {
                let master = RedisServer::start_with_args(&master_args).await;
                let port = master.port.to_string();
                let replica =
                    RedisServer::start_with_args(&["--replicaof", "127.0.0.1", &port]).await;
                (master, replica)
            }
            Some(certs) => {
                let master = RedisServer::start_tls_with_args(certs, false, &master_args).await;
                let port = master.port.to_string();
                let replica = RedisServer::start_tls_with_args(
                    certs,
                    false,
                    &[
                        "--replicaof",
                        "127.0.0.1",
                        &port,
                        "--tls-replication",
                        "yes",
                    ],
                )
                .await;
                (master, replica)
            }
        };
        let synced = crate::eventually(Duration::from_secs(20), || async {
            let Ok(mut c) = replica.connection().await else {
                return false;
            };
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            info.contains("master_link_status:up")
        })
        .await;
        assert!(synced, "the replica synced with the master");
        let dir = scratch_dir("sentinel");
        let mut s = Self {
            master,
            replica,
            ports: vec![],
            children: vec![],
            dir,
            ca: tls.map(|c| c.path("ca.crt")),
        };
        for i in 0..3 {
            let port = free_port();
            let conf = s.dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "bind 127.0.0.1\n{}dir {}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 4000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    match tls {
                        None => format!("port {port}\n"),
                        Some(c) => format!(
                            "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                             tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n",
                            c.path("server.crt").display(),
                            c.path("server.key").display(),
                            c.path("ca.crt").display()
                        ),
                    },
                    s.dir.display(),
                    s.master.port
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("redis-server runs as a sentinel");
            s.ports.push(port);
            s.children.push(child);
        }
        let ready = crate::eventually(Duration::from_secs(20), || async {
            let mut all = true;
            for &p in &s.ports {
                let known = async {
                    let mut c = sentinel_conn(p, s.ca.as_ref()).await.ok()?;
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("replicas")
                        .arg(MASTER_NAME)
                        .query_async(&mut c)
                        .await
                        .ok()?;
                    let peers: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("sentinels")
                        .arg(MASTER_NAME)
                        .query_async(&mut c)
                        .await
                        .ok()?;
                    Some(!replicas.is_empty() && peers.len() >= 2)
                };
                all &= known.await == Some(true);
            }
            all
        })
        .await;
        assert!(ready, "the sentinels found the replica and each other");
        s
    }

    /// `redis+sentinel://` URL of the sidecar's configuration.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        format!("{scheme}+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The master's port as the first sentinel that answers reports it.
    pub async fn master_port(&self) -> Option<u16> {
        for &p in &self.ports {
            let Ok(mut c) = sentinel_conn(p, self.ca.as_ref()).await else {
                continue;
            };
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(MASTER_NAME)
                .query_async(&mut c)
                .await
                .ok()
                .flatten();
            if let Some((_, port)) = addr {
                return Some(port);
            }
        }
        None
    }

    /// Kills the master (-9) and waits until the sentinels name another; returns how long that
    /// took.
    pub async fn kill_master_and_wait_for_failover(&mut self, timeout: Duration) -> Duration {
        let old = self.master.port;
        let killed = Instant::now();
        self.master.kill().await;
        let promoted = crate::eventually(timeout, || async {
            self.master_port().await.is_some_and(|p| p != old)
        })
        .await;
        assert!(
            promoted,
            "the sentinels promoted the replica within {timeout:?}"
        );
        killed.elapsed()
    }
}

async fn sentinel_conn(
    port: u16,
    ca: Option<&PathBuf>,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(300)))
        .set_response_timeout(Some(Duration::from_millis(300)));
    let client = match ca {
        None => redis::Client::open(format!("redis://127.0.0.1:{port}"))?,
        Some(ca) => redis::Client::build_with_tls(
            format!("rediss://127.0.0.1:{port}"),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(ca)?),
            },
        )?,
    };
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
