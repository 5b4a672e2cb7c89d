//! What `redis.url` names: one Redis server, a master watched by Sentinel, or a Redis Cluster.
//!
//! One string (so one `WTC_REDIS_URL`, one Secret) for every kind:
//!
//! | URL | Redis |
//! |---|---|
//! | `redis://[user:password@]host:port[/db]` | one server (the `redis` crate reads the URL) |
//! | `redis+sentinel://[user:password@]s1:26379,s2:26379/<master-name>` | the master the sentinels name |
//! | `redis+cluster://[user:password@]n1:6379,n2:6379` | a Redis Cluster, from any of these seed nodes |
//!
//! `rediss`, `rediss+sentinel` and `rediss+cluster` speak TLS to every node (and to the
//! sentinels). Credentials are those of the data nodes; sentinels are asked without them.
//! Parsed here, without the `redis` crate, in the crate the operator shares; errors never repeat
//! the URL or its credentials (it may carry a password).

/// How the sidecar reaches its Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server; the URL goes to the `redis` crate as it is.
    Node { tls: bool },
    /// The master named `master`, as the sentinels at `sentinels` (host:port) report it, asked
    /// again after every broken connection (so a failover is followed).
    Sentinel {
        tls: bool,
        sentinels: Vec<String>,
        master: String,
        /// `user:password` (percent-encoded as in the URL) for the master, if any.
        credentials: Option<String>,
    },
    /// A Redis Cluster reached through any of `seeds` (host:port).
    Cluster {
        tls: bool,
        seeds: Vec<String>,
        credentials: Option<String>,
    },
}

const SENTINEL_PORT: u16 = 26379;
const REDIS_PORT: u16 = 6379;

impl RedisTarget {
    pub fn parse(url: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(
                "redis.url has no scheme (redis://, rediss://, redis+sentinel://, \
                        redis+cluster://)"
                    .into(),
            );
        };
        let (tls, kind) = match scheme.to_ascii_lowercase().as_str() {
            "redis" | "redis+unix" | "unix" => (false, ""),
            "rediss" => (true, ""),
            "redis+sentinel" => (false, "sentinel"),
            "rediss+sentinel" => (true, "sentinel"),
            "redis+cluster" => (false, "cluster"),
            "rediss+cluster" => (true, "cluster"),
            other => {
                return Err(format!(
                    "redis.url scheme {other:?} is not one of redis, rediss, redis+sentinel, \
                     rediss+sentinel, redis+cluster, rediss+cluster"
                ));
            }
        };
        if kind.is_empty() {
            return Ok(Self::Node { tls });
        }
        if rest.contains('?') || rest.contains('#') {
            return Err(format!(
                "redis.url: a {scheme} URL takes no query or fragment"
            ));
        }
        // Credentials end at the last '@' (a password may hold an unencoded '/' or '@'); hosts
        // and the path come after it.
        let (credentials, rest) = match rest.rsplit_once('@') {
            Some((c, r)) => (Some(c.to_string()).filter(|c| !c.is_empty()), r),
            None => (None, rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let default_port = if kind == "sentinel" {
            SENTINEL_PORT
        } else {
            REDIS_PORT
        };
        let hosts = hosts
            .split(',')
            .map(|h| host_port(h, default_port))
            .collect::<Result<Vec<_>, _>>()?;
        if kind == "sentinel" {
            let master = path.trim_end_matches('/');
            if master.is_empty() || master.contains('/') {
                return Err(format!(
                    "redis.url: a {scheme} URL ends with /<master-name>, the name the sentinels \
                     monitor"
                ));
            }
            Ok(Self::Sentinel {
                tls,
                sentinels: hosts,
                master: master.to_string(),
                credentials,
            })
        } else {
            if !path.is_empty() {
                return Err(format!(
                    "redis.url: a {scheme} URL has no path (a cluster has only database 0)"
                ));
            }
            Ok(Self::Cluster {
                tls,
                seeds: hosts,
                credentials,
            })
        }
    }

    pub fn tls(&self) -> bool {
        match self {
            Self::Node { tls } | Self::Sentinel { tls, .. } | Self::Cluster { tls, .. } => *tls,
        }
    }

    /// The plain URL of one node of a Sentinel or Cluster target, with its credentials.
    pub fn node_url(&self, host_port: &str) -> String {
        let (tls, credentials) = match self {
            Self::Node { tls } => (*tls, None),
            Self::Sentinel {
                tls, credentials, ..
            }
            | Self::Cluster {
                tls, credentials, ..
            } => (*tls, credentials.as_deref()),
        };
        let scheme = if tls { "rediss" } else { "redis" };
        match credentials {
            Some(c) => format!("{scheme}://{c}@{host_port}"),
            None => format!("{scheme}://{host_port}"),
        }
    }
}

/// `host[:port]` (IPv6 in brackets), with the port checked.
fn host_port(text: &str, default_port: u16) -> Result<String, String> {
    let text = text.trim();
    let (host, port) = if let Some(inner) = text.strip_prefix('[') {
        let Some((h, after)) = inner.split_once(']') else {
            return Err(format!("redis.url: host {text:?} has no closing ']'"));
        };
        (format!("[{h}]"), after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (text.to_string(), None),
        }
    };
    if host.is_empty() || host == "[]" || host.contains(['/', '@', ' ']) {
        return Err(format!("redis.url: {text:?} is not host:port"));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("redis.url: port {p:?} of {host} is not 1-65535")),
        },
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_urls_go_to_the_redis_crate() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379/2"),
            Ok(RedisTarget::Node { tls: false })
        );
        assert_eq!(
            RedisTarget::parse("rediss://:pw@cache.example:6380"),
            Ok(RedisTarget::Node { tls: true })
        );
    }

    #[test]
    fn sentinel_urls_name_the_sentinels_and_the_master() {
        let t = RedisTarget::parse("rediss+sentinel://app:s%40cret@a:26380,b,[::1]:1/mymaster")
            .unwrap();
        assert_eq!(
            t,
            RedisTarget::Sentinel {
                tls: true,
                sentinels: vec!["a:26380".into(), "b:26379".into(), "[::1]:1".into()],
                master: "mymaster".into(),
                credentials: Some("app:s%40cret".into()),
            }
        );
        assert_eq!(
            t.node_url("10.0.0.1:6379"),
            "rediss://app:s%40cret@10.0.0.1:6379"
        );
    }

    #[test]
    fn a_password_may_hold_slashes_and_at_signs() {
        let t = RedisTarget::parse("redis+sentinel://u:p/a@ss@s1:1/m").unwrap();
        assert_eq!(
            t,
            RedisTarget::Sentinel {
                tls: false,
                sentinels: vec!["s1:1".into()],
                master: "m".into(),
                credentials: Some("u:p/a@ss".into()),
            }
        );
    }

    #[test]
    fn cluster_urls_list_seed_nodes() {
        let t = RedisTarget::parse("redis+cluster://n1:7000,n2:7001").unwrap();
        assert_eq!(
            t,
            RedisTarget::Cluster {
                tls: false,
                seeds: vec!["n1:7000".into(), "n2:7001".into()],
                credentials: None,
            }
        );
        assert_eq!(t.node_url("n1:7000"), "redis://n1:7000");
    }

    #[test]
    fn bad_urls_are_refused_without_repeating_a_password() {
        for (url, says) in [
            ("127.0.0.1:6379", "no scheme"),
            ("http://x", "is not one of"),
            ("redis+sentinel://:pw@a,b", "master-name"),
            ("redis+sentinel://:pw@a/m/x", "master-name"),
            ("redis+cluster://:pw@a:0", "not 1-65535"),
            ("redis+cluster://:pw@a:x", "not 1-65535"),
            ("redis+cluster://:pw@a,,b", "not host:port"),
            ("redis+cluster://:pw@a/1", "no path"),
            ("redis+cluster://:pw@a?x=1", "no query"),
            ("redis+cluster://u:pa/ss@h:0", "not 1-65535"),
            ("redis+sentinel://:p/w@h", "master-name"),
            ("redis+sentinel://:p/w@[::1/m", "no closing"),
        ] {
            let e = RedisTarget::parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(
                !["pw", "pa/ss", "p/w"].iter().any(|p| e.contains(p)),
                "{url}: {e}"
            );
        }
    }
}
