//! The operator's connection to a managed Redis: makes the running server accept exactly the
//! passwords `RedisAuth` wants (`ACL SETUSER`, no restart, nothing cached is lost), and closes
//! the connections of a replaced password once its grace period is over.
//!
//! It logs in as its own user (`wtc-operator`, allowed only to manage users and close
//! connections, which is still administration: it could grant itself anything), or, when that user
//! is not there yet (a Redis started from an `auth.conf` of an earlier release), as `default`
//! with the current password, and then creates it. A Redis that accepts neither (it restarted
//! from a stale copy of `auth.conf` and missed a rotation) is reported: deleting its pod makes it
//! read the current file.

use crate::redis_auth::{self, OPERATOR_RULES, OPERATOR_USER, RedisAuth};
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ErrorKind, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, Value,
};
use std::collections::BTreeSet;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, PartialEq)]
pub enum PasswordChange {
    /// Redis already accepted exactly these passwords.
    None,
    /// It accepts a new one (and the ones it accepted before).
    Added,
    /// It no longer accepts some: the connections of `default` were closed.
    Retired,
}

/// redis' messages name no password.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the managed Redis: {0}")]
    Unreachable(RedisError),
    #[error(
        "the managed Redis accepts neither the operator's password nor the current one (it may \
         have restarted from an older auth.conf); delete its pod to have it read the current one"
    )]
    Refused,
    /// Only the error's code: Redis' text may repeat the command's arguments (password hashes),
    /// and Events are readable by roles that cannot read Secrets.
    #[error("the managed Redis refused {command} ({})", .error.code().unwrap_or("no answer"))]
    Command {
        command: &'static str,
        error: RedisError,
    },
}

pub async fn apply(host: &str, port: u16, auth: &RedisAuth) -> Result<PasswordChange, AdminError> {
    let (mut conn, as_operator) = match connect(host, port, OPERATOR_USER, &auth.operator_password)
        .await
    {
        Ok(c) => (c, true),
        Err(AdminError::Refused) => (connect(host, port, "default", &auth.password).await?, false),
        Err(e) => return Err(e),
    };
    if !as_operator {
        let mut set = redis::cmd("ACL");
        set.arg("SETUSER")
            .arg(OPERATOR_USER)
            .arg("on")
            .arg("resetpass");
        set.arg(format!(
            "#{}",
            redis_auth::sha256_hex(&auth.operator_password)
        ));
        set.arg(OPERATOR_RULES);
        run(&mut conn, &set, "ACL SETUSER").await?;
    }
    let reply = run(
        &mut conn,
        redis::cmd("ACL").arg("GETUSER").arg("default"),
        "ACL GETUSER",
    )
    .await?;
    let now: BTreeSet<String> = passwords(&reply).into_iter().collect();
    let wanted: BTreeSet<String> = auth.accepted().into_iter().collect();
    if now == wanted {
        return Ok(PasswordChange::None);
    }
    let mut set = redis::cmd("ACL");
    set.arg("SETUSER").arg("default").arg("on").arg("resetpass");
    for hash in &wanted {
        set.arg(format!("#{hash}"));
    }
    run(&mut conn, &set, "ACL SETUSER").await?;
    // A password no longer accepted may still hold connections open (authentication is per
    // connection): close them; the sidecars reconnect with the password their file holds now.
    let retired = now.iter().any(|h| !wanted.contains(h));
    if retired {
        run(
            &mut conn,
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("USER")
                .arg("default")
                .arg("SKIPME")
                .arg("yes"),
            "CLIENT KILL",
        )
        .await?;
    }
    Ok(match retired {
        true => PasswordChange::Retired,
        false => PasswordChange::Added,
    })
}

async fn connect(
    host: &str,
    port: u16,
    user: &str,
    password: &str,
) -> Result<MultiplexedConnection, AdminError> {
    let info = ConnectionAddr::Tcp(host.to_string(), port)
        .into_connection_info()
        .map_err(AdminError::Unreachable)?;
    let settings = RedisConnectionInfo::default()
        .set_username(user)
        .set_password(password)
        // The operator's user may not run CLIENT SETINFO.
        .set_skip_set_lib_name();
    let client =
        Client::open(info.set_redis_settings(settings)).map_err(AdminError::Unreachable)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::AuthenticationFailed => AdminError::Refused,
            _ => AdminError::Unreachable(e),
        })
}

async fn run(
    conn: &mut MultiplexedConnection,
    cmd: &redis::Cmd,
    command: &'static str,
) -> Result<Value, AdminError> {
    cmd.query_async(conn)
        .await
        .map_err(|error| AdminError::Command { command, error })
}

/// The `passwords` field of an `ACL GETUSER` reply (a flat list of names and values in RESP2, a
/// map in RESP3).
fn passwords(reply: &Value) -> Vec<String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let list = |v: &Value| match v {
        Value::Array(items) | Value::Set(items) => items.iter().filter_map(text).collect(),
        _ => vec![],
    };
    match reply {
        Value::Array(items) => items
            .chunks(2)
            .find(|pair| pair.len() == 2 && text(&pair[0]).as_deref() == Some("passwords"))
            .map(|pair| list(&pair[1]))
            .unwrap_or_default(),
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some("passwords"))
            .map(|(_, v)| list(v))
            .unwrap_or_default(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_read_from_either_reply_shape() {
        let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        let resp2 = Value::Array(vec![
            s("flags"),
            Value::Array(vec![s("on")]),
            s("passwords"),
            Value::Array(vec![s("aa"), s("bb")]),
        ]);
        assert_eq!(passwords(&resp2), vec!["aa", "bb"]);
        let resp3 = Value::Map(vec![(s("passwords"), Value::Array(vec![s("cc")]))]);
        assert_eq!(passwords(&resp3), vec!["cc"]);
        assert!(passwords(&Value::Nil).is_empty());
    }
}
