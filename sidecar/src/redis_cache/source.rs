//! Where a new Redis connection comes from: the one server of a `redis://`/`rediss://` URL, the
//! master the sentinels name at the moment of connecting (`redis+sentinel://`), so that a
//! connection replaced after a failover reaches the promoted master, or a Redis Cluster
//! (`redis+cluster://`). TLS settings (a private CA, a client certificate) are read here, once,
//! at start. A password file is read for every new connection to one server: a password the
//! operator rotates reaches this sidecar through the kubelet's update of the mounted Secret,
//! without a restart (the connections already open stay authenticated).

use super::connection::Connection;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, ConnectionAddr, RedisError, RedisResult,
    TlsCertificates, TlsMode,
};
use std::time::Duration;
use wtc_config::{RedisConfig, RedisTarget};

/// Why the Redis settings cannot be used; never repeats the URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Url(String),
    #[error("redis.url is not a valid Redis URL")]
    BadUrl,
    #[error("cannot read {setting} {path}: {kind}")]
    File {
        setting: &'static str,
        path: String,
        kind: std::io::ErrorKind,
    },
    #[error("redis TLS settings are not usable: {0}")]
    Tls(String),
}

pub enum Source {
    Node {
        client: Client,
        /// Read for each connection; its contents replace the password `client` was built with.
        password_file: Option<String>,
        certs: Option<TlsCertificates>,
    },
    /// `SentinelClient` asks with `&mut self`; reconnects are one at a time anyway (`Link`).
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster(ClusterClient),
}

impl Source {
    pub fn new(config: &RedisConfig) -> Result<Self, SourceError> {
        let target = RedisTarget::parse(&config.url).map_err(SourceError::Url)?;
        let certs = certificates(config)?;
        // Read now as well: a missing or unreadable file is a configuration error at start.
        let file_password = config
            .password_file
            .as_deref()
            .map(read_password)
            .transpose()?;
        match target {
            RedisTarget::Node { .. } => {
                let client = match certs.clone() {
                    Some(c) => Client::build_with_tls(config.url.as_str(), c),
                    None => Client::open(config.url.as_str()),
                };
                let client = client.map_err(|e| match e.kind() {
                    redis::ErrorKind::InvalidClientConfig if e.to_string().contains("TLS") => {
                        SourceError::Tls(e.to_string())
                    }
                    _ => SourceError::BadUrl,
                })?;
                Ok(Source::Node {
                    client,
                    password_file: config.password_file.clone(),
                    certs,
                })
            }
            RedisTarget::Sentinel {
                tls,
                ref sentinels,
                ref master,
                ref credentials,
            } => {
                let addrs = sentinels
                    .iter()
                    .map(|hp| address(hp, tls))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut b = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                    .map_err(|_| SourceError::BadUrl)?;
                if let Some((user, password)) = credentials.as_deref().map(split_credentials) {
                    if !user.is_empty() {
                        b = b.set_client_to_redis_username(user);
                    }
                    if !password.is_empty() {
                        b = b.set_client_to_redis_password(password);
                    }
                }
                if let Some(password) = &file_password {
                    b = b.set_client_to_redis_password(password);
                }
                if tls {
                    b = b
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                    if let Some(c) = certs {
                        b = b
                            .set_client_to_redis_certificates(c.clone())
                            .set_client_to_sentinel_certificates(c);
                    }
                }
                let client = b.build().map_err(|e| SourceError::Tls(e.to_string()))?;
                Ok(Source::Sentinel(tokio::sync::Mutex::new(client)))
            }
            RedisTarget::Cluster { tls, ref seeds, .. } => {
                let urls: Vec<String> = seeds.iter().map(|hp| target.node_url(hp)).collect();
                // No internal retries: a dead node, MOVED and ASK come back as errors, so the
                // connection is checked again before it reaches a server it has not seen
                // (`link`). Redirects are not followed; the next call uses the new slot map.
                let mut b = ClusterClientBuilder::new(urls)
                    .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
                    .response_timeout(Duration::from_millis(config.response_timeout_ms))
                    .retries(0);
                if let Some(password) = &file_password {
                    b = b.password(password.clone());
                }
                if tls {
                    b = match certs {
                        Some(c) => b.certs(c),
                        None => b.tls(TlsMode::Secure),
                    };
                }
                let client = b.build().map_err(|e| match e.kind() {
                    redis::ErrorKind::InvalidClientConfig if e.to_string().contains("TLS") => {
                        SourceError::Tls(e.to_string())
                    }
                    _ => SourceError::BadUrl,
                })?;
                Ok(Source::Cluster(client))
            }
        }
    }

    /// A new connection: to the URL's server, or to the master the sentinels name now.
    pub async fn connect(
        &self,
        config: &AsyncConnectionConfig,
        timeout: Duration,
    ) -> RedisResult<Connection> {
        match self {
            Source::Node {
                client,
                password_file: None,
                ..
            } => client
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map(Connection::Node),
            Source::Node {
                client,
                password_file: Some(path),
                certs,
            } => {
                let password = read_password(path)
                    .map_err(|e| RedisError::from(std::io::Error::other(e.to_string())))?;
                let info = client.get_connection_info().clone();
                let redis = info.redis_settings().clone().set_password(password);
                let info = info.set_redis_settings(redis);
                let client = match certs.clone() {
                    Some(c) => Client::build_with_tls(info, c)?,
                    None => Client::open(info)?,
                };
                client
                    .get_multiplexed_async_connection_with_config(config)
                    .await
                    .map(Connection::Node)
            }
            Source::Cluster(client) => client.get_async_connection().await.map(Connection::Cluster),
            Source::Sentinel(sentinel) => {
                let ask = async { sentinel.lock().await.async_get_client().await };
                let client = tokio::time::timeout(timeout, ask).await.map_err(|_| {
                    RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no sentinel named a master in time",
                    ))
                })??;
                client
                    .get_multiplexed_async_connection_with_config(config)
                    .await
                    .map(Connection::Node)
            }
        }
    }
}

/// The password file's contents, as they are (a trailing newline would be part of the password,
/// as it is of the Secret's value the file mirrors).
fn read_password(path: &str) -> Result<String, SourceError> {
    let bytes = std::fs::read(path).map_err(|e| SourceError::File {
        setting: "redis.password_file",
        path: path.to_string(),
        kind: e.kind(),
    })?;
    String::from_utf8(bytes).map_err(|_| SourceError::File {
        setting: "redis.password_file",
        path: path.to_string(),
        kind: std::io::ErrorKind::InvalidData,
    })
}

/// The PEM files of `config`, read once; `None` when no file is set (a `rediss` URL then trusts
/// the bundled public roots).
fn certificates(config: &RedisConfig) -> Result<Option<TlsCertificates>, SourceError> {
    let read = |setting: &'static str, path: &Option<String>| {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| SourceError::File {
                    setting,
                    path: p.clone(),
                    kind: e.kind(),
                })
            })
            .transpose()
    };
    let root_cert = read("redis.ca_file", &config.ca_file)?;
    let cert = read("redis.client_cert_file", &config.client_cert_file)?;
    let key = read("redis.client_key_file", &config.client_key_file)?;
    let client_tls = match (cert, key) {
        (Some(client_cert), Some(client_key)) => Some(ClientTlsConfig {
            client_cert,
            client_key,
        }),
        _ => None,
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// A sentinel's address (`host:port`, IPv6 in brackets) as the `redis` crate takes it.
fn address(host_port: &str, tls: bool) -> Result<ConnectionAddr, SourceError> {
    let (host, port) = host_port.rsplit_once(':').ok_or(SourceError::BadUrl)?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = port.parse().map_err(|_| SourceError::BadUrl)?;
    Ok(if tls {
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host, port)
    })
}

/// `user:password` from a URL, percent-decoded.
fn split_credentials(text: &str) -> (String, String) {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    match text.split_once(':') {
        Some((u, p)) => (decode(u), decode(p)),
        None => (decode(text), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_decoded() {
        assert_eq!(
            split_credentials("app:s%40cret%3A1"),
            ("app".into(), "s@cret:1".into())
        );
        assert_eq!(split_credentials(":pw"), (String::new(), "pw".into()));
    }

    #[test]
    fn an_unreadable_tls_file_is_named_in_the_error() {
        let config = RedisConfig {
            url: "rediss://:secret@127.0.0.1:1".into(),
            connect_timeout_ms: 1,
            response_timeout_ms: 1,
            ca_file: Some("/nonexistent/ca.crt".into()),
            client_cert_file: None,
            client_key_file: None,
            password_file: None,
        };
        let e = Source::new(&config).err().expect("refused").to_string();
        assert!(e.contains("redis.ca_file /nonexistent/ca.crt"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn sentinel_addresses_keep_ipv6_hosts_bare() {
        match address("[::1]:26379", false).unwrap() {
            ConnectionAddr::Tcp(h, p) => assert_eq!((h.as_str(), p), ("::1", 26379)),
            other => panic!("{other:?}"),
        }
    }
}
