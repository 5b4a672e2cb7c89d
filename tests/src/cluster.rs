//! A Redis Cluster on loopback: masters, each with a replica (in sync before anything starts),
//! node timeout 1 s, made with `redis-cli --cluster create`.

use crate::{RedisServer, entry_key};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use std::time::{Duration, Instant};

pub struct RedisCluster {
    /// Masters first (as created), then their replicas.
    pub nodes: Vec<RedisServer>,
    /// The CA of a cluster on TLS (nodes, bus and replication all on TLS).
    ca: Option<std::path::PathBuf>,
}

const NODE_ARGS: &[&str] = &[
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "1000",
    "--repl-diskless-sync-delay",
    "0",
];

impl RedisCluster {
    pub async fn start(masters: usize, replicas: usize) -> Self {
        Self::start_with(masters, replicas, None).await
    }

    /// A cluster speaking only TLS, with the certificates of `certs` (server certificates for
    /// 127.0.0.1: the nodes announce IP addresses).
    pub async fn start_tls(masters: usize, certs: &crate::tls::Certs) -> Self {
        Self::start_with(masters, 0, Some(certs)).await
    }

    async fn start_with(masters: usize, replicas: usize, tls: Option<&crate::tls::Certs>) -> Self {
        let mut nodes = vec![];
        for _ in 0..masters * (1 + replicas) {
            // The bus port defaults to port + 10000, past 65535 for most free ports.
            let bus = crate::free_port().to_string();
            let mut args = NODE_ARGS.to_vec();
            args.extend(["--cluster-port", &bus]);
            nodes.push(match tls {
                None => RedisServer::start_with_args(&args).await,
                Some(certs) => {
                    args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"]);
                    RedisServer::start_tls_with_args(certs, false, &args).await
                }
            });
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut cli = tokio::process::Command::new("redis-cli");
        if let Some(certs) = tls {
            cli.arg("--tls").arg("--cacert").arg(certs.path("ca.crt"));
        }
        let out = cli
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli is installed with redis-server");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = Self {
            nodes,
            ca: tls.map(|t| t.path("ca.crt")),
        };
        let ready = crate::eventually(Duration::from_secs(30), || async {
            for n in &c.nodes {
                if !cluster_info(n).await.contains("cluster_state:ok") {
                    return false;
                }
                let repl = n.info("replication").await.unwrap_or_default();
                if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(ready, "the cluster is up and its replicas are in sync");
        c
    }

    /// `redis+cluster://` URL of the sidecar's configuration (every node a seed).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        format!("{scheme}+cluster://{}", hosts.join(","))
    }

    pub async fn connection(&self) -> ClusterConnection {
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{scheme}://127.0.0.1:{}", n.port))
            .collect();
        let mut b = ClusterClient::builder(urls)
            .connection_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_millis(500));
        if let Some(ca) = &self.ca {
            b = b.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(ca).unwrap()),
            });
        }
        b.build().unwrap().get_async_connection().await.unwrap()
    }

    /// Version of the cached envelope, if any.
    pub async fn cached_version(&self, entity: &str, key: &str) -> Option<i64> {
        let mut c = self.connection().await;
        let raw: Option<String> = redis::cmd("GET")
            .arg(entry_key(entity, key))
            .query_async(&mut c)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&raw?).unwrap();
        v["v"].as_i64()
    }

    /// Index in `nodes` of the master serving `key`'s entry.
    pub async fn master_of(&self, entity: &str, key: &str) -> usize {
        let mut c = self.connection().await;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(entry_key(entity, key))
            .query_async(&mut c)
            .await
            .unwrap();
        for (i, n) in self.nodes.iter().enumerate() {
            let repl = n.info("replication").await.unwrap_or_default();
            if !repl.contains("role:master") {
                continue;
            }
            let mut nc = n.connection().await.unwrap();
            let shards: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut nc)
                .await
                .unwrap();
            if owns(&shards, slot) {
                return i;
            }
        }
        panic!("no master owns slot {slot}");
    }

    /// Index in `nodes` of the replica of the master at `master`.
    pub async fn replica_of(&self, master: usize) -> usize {
        let port = self.nodes[master].port;
        for (i, n) in self.nodes.iter().enumerate() {
            let repl = n.info("replication").await.unwrap_or_default();
            if repl.contains("role:slave") && repl.contains(&format!("master_port:{port}\r")) {
                return i;
            }
        }
        panic!("no replica of node {master}");
    }

    /// Kills node `i` (-9) and waits until node `promoted` is a master; returns how long it took.
    pub async fn kill_and_wait_for_promotion(
        &mut self,
        i: usize,
        promoted: usize,
        timeout: Duration,
    ) -> Duration {
        let killed = Instant::now();
        self.nodes[i].kill().await;
        let ok = crate::eventually(timeout, || async {
            let repl = self.nodes[promoted].info("replication").await;
            let cluster = cluster_info(&self.nodes[promoted]).await;
            repl.is_some_and(|r| r.contains("role:master")) && cluster.contains("cluster_state:ok")
        })
        .await;
        assert!(ok, "the replica was promoted within {timeout:?}");
        killed.elapsed()
    }
}

impl RedisCluster {
    /// The slot of `entity`'s entry for `key` (`CLUSTER KEYSLOT`).
    pub async fn slot_of(&self, entity: &str, key: &str) -> u16 {
        let mut c = self.connection().await;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(entry_key(entity, key))
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// Moves `slot` from node `from` to node `to` the way `redis-cli --cluster reshard` does
    /// (IMPORTING, MIGRATING, `MIGRATE` of its keys, then the new owner told to every master),
    /// pausing `pause` between the steps so that clients meet the `ASK` and `MOVED` answers.
    pub async fn migrate_slot(&self, slot: u16, from: usize, to: usize, pause: Duration) {
        let id = |i: usize| async move {
            let mut c = self.nodes[i].connection().await.unwrap();
            redis::cmd("CLUSTER")
                .arg("MYID")
                .query_async::<String>(&mut c)
                .await
                .unwrap()
        };
        let (from_id, to_id) = (id(from).await, id(to).await);
        let mut src = self.nodes[from].connection().await.unwrap();
        let mut dst = self.nodes[to].connection().await.unwrap();
        let setslot = |state: &str, node: &str| {
            let mut c = redis::cmd("CLUSTER");
            c.arg("SETSLOT").arg(slot).arg(state).arg(node);
            c
        };
        setslot("IMPORTING", &from_id)
            .query_async::<()>(&mut dst)
            .await
            .unwrap();
        setslot("MIGRATING", &to_id)
            .query_async::<()>(&mut src)
            .await
            .unwrap();
        tokio::time::sleep(pause).await;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(10)
                .query_async(&mut src)
                .await
                .unwrap();
            if keys.is_empty() {
                break;
            }
            // One key at a time, with pauses: the slot is half here, half there for a while.
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.nodes[to].port)
                .arg("")
                .arg(0)
                .arg(5_000)
                .arg("REPLACE")
                .arg("KEYS")
                .arg(&keys[0])
                .query_async::<()>(&mut src)
                .await
                .unwrap();
            tokio::time::sleep(pause).await;
        }
        for n in &self.nodes {
            if let Ok(mut c) = n.connection().await {
                let _ = setslot("NODE", &to_id).query_async::<()>(&mut c).await;
            }
        }
    }
}

/// `CLUSTER INFO` of a node, empty when it does not answer.
async fn cluster_info(node: &RedisServer) -> String {
    let Ok(mut c) = node.connection().await else {
        return String::new();
    };
    redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut c)
        .await
        .unwrap_or_default()
}

/// Whether the `myself` line of `CLUSTER NODES` serves `slot`.
fn owns(nodes: &str, slot: u16) -> bool {
    let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
        return false;
    };
    me.split_whitespace().skip(8).any(|range| {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        match (a.parse::<u16>(), b.parse::<u16>()) {
            (Ok(a), Ok(b)) => (a..=b).contains(&slot),
            _ => false,
        }
    })
}
