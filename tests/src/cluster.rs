//! A Redis Cluster on loopback: masters, each with a replica (in sync before anything starts),
//! node timeout 1 s, made with `redis-cli --cluster create`.

use crate::{RedisServer, entry_key};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use std::time::{Duration, Instant};

pub struct RedisCluster {
    /// Masters first (as created), then their replicas.
    pub nodes: Vec<RedisServer>,
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
        let mut nodes = vec![];
        for _ in 0..masters * (1 + replicas) {
            // The bus port defaults to port + 10000, past 65535 for most free ports.
            let bus = crate::free_port().to_string();
            let mut args = NODE_ARGS.to_vec();
            args.extend(["--cluster-port", &bus]);
            nodes.push(RedisServer::start_with_args(&args).await);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = tokio::process::Command::new("redis-cli")
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
        let c = Self { nodes };
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
        format!("redis+cluster://{}", hosts.join(","))
    }

    pub async fn connection(&self) -> ClusterConnection {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect();
        ClusterClient::builder(urls)
            .connection_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_millis(500))
            .build()
            .unwrap()
            .get_async_connection()
            .await
            .unwrap()
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
