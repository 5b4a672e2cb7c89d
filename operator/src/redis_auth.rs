//! The managed Redis' credentials and their rotation: pure, from the auth Secret as it is to the
//! Secret as it should be. `redis_admin` applies the result to the running Redis.
//!
//! The Secret (`<cache>-redis-auth`) holds:
//! - `password`: the `default` user's password, which the sidecars read from their mounted copy
//!   (`redis.password_file`). A user rotates it by writing a new value, or by removing the key
//!   (a new one is made);
//! - `operator-password`: the operator's own Redis user (`wtc-operator`), allowed nothing but
//!   `ACL GETUSER`/`ACL SETUSER` and `CLIENT KILL`, so it can change the `default` user's
//!   passwords without knowing the old one and without a restart;
//! - `auth.conf`: both users, passwords as SHA-256 (`#<hex>`), which Redis reads at start.
//!
//! Rotation: when `password` no longer matches what `auth.conf` accepts, the passwords accepted
//! until then stay accepted for the cache's `passwordRotationSeconds` (listed, as hashes, in an
//! annotation with their deadline). Sidecars meanwhile connect with either: the kubelet updates
//! their mounted copy within about a minute, and they read it for each new connection. After the
//! deadline only the new password is accepted, and connections still authenticated with an old
//! one are closed (their owners reconnect with the new one).

use k8s_openapi::api::core::v1::Secret;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

pub const PASSWORD_KEY: &str = "password";
pub const OPERATOR_PASSWORD_KEY: &str = "operator-password";
/// Redis' config file with both users, a key of the same Secret.
pub const REDIS_AUTH_FILE: &str = "auth.conf";
/// The operator's Redis user.
pub const OPERATOR_USER: &str = "wtc-operator";
/// What that user may run: read and set users, close the connections of a user.
pub const OPERATOR_RULES: &[&str] = &[
    "resetkeys",
    "resetchannels",
    "-@all",
    "+acl|getuser",
    "+acl|setuser",
    "+client|kill",
];
/// SHA-256 (hex) of passwords of `default` still accepted during a rotation, comma-separated.
pub const PREVIOUS_ANNOTATION: &str = "wtc.dev/previous-passwords";
/// Until when (Unix seconds) those stay accepted.
pub const PREVIOUS_UNTIL_ANNOTATION: &str = "wtc.dev/previous-passwords-until";

/// The credentials one pass of the reconciler wants.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisAuth {
    pub password: String,
    pub operator_password: String,
    /// Hashes of earlier passwords still accepted, and until when (Unix seconds).
    pub previous: Vec<String>,
    pub previous_until: Option<u64>,
}

impl RedisAuth {
    /// The next state from the Secret as it is (`None`: not made yet) at `now` (Unix seconds),
    /// keeping replaced passwords for `grace_seconds`; `fresh` makes a password.
    pub fn next(
        current: Option<&Secret>,
        now: u64,
        grace_seconds: u64,
        mut fresh: impl FnMut() -> String,
    ) -> Self {
        let data = current.and_then(|s| s.data.as_ref());
        let text = |key: &str| {
            data.and_then(|d| d.get(key))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .filter(|p| !p.is_empty())
        };
        let password = text(PASSWORD_KEY).unwrap_or_else(&mut fresh);
        let operator_password = text(OPERATOR_PASSWORD_KEY).unwrap_or_else(&mut fresh);
        let accepted = text(REDIS_AUTH_FILE)
            .map(|conf| default_user_hashes(&conf))
            .unwrap_or_default();
        let annotations = current.and_then(|s| s.metadata.annotations.as_ref());
        let until = annotations
            .and_then(|a| a.get(PREVIOUS_UNTIL_ANNOTATION))
            .and_then(|u| u.parse::<u64>().ok());
        let new = sha256_hex(&password);
        let (previous, previous_until) = if accepted.is_empty() || accepted.contains(&new) {
            // No change, or a rotation under way: earlier passwords stay until their deadline.
            match until {
                Some(u) if u > now => {
                    let kept: Vec<String> = accepted.into_iter().filter(|h| *h != new).collect();
                    let until = (!kept.is_empty()).then_some(u);
                    (kept, until)
                }
                _ => (vec![], None),
            }
        } else {
            // The password changed: everything accepted until now stays accepted for a while.
            (accepted, Some(now + grace_seconds))
        };
        Self {
            password,
            operator_password,
            previous,
            previous_until,
        }
    }

    /// Hashes of the passwords `default` accepts: the current one first.
    pub fn accepted(&self) -> Vec<String> {
        let current = sha256_hex(&self.password);
        let previous = self.previous.iter().filter(|h| **h != current).cloned();
        std::iter::once(current.clone()).chain(previous).collect()
    }

    /// Redis' config file: both users, hashes only.
    pub fn auth_conf(&self) -> String {
        let passwords: Vec<String> = self.accepted().iter().map(|h| format!("#{h}")).collect();
        format!(
            "user default on {} ~* &* +@all\nuser {OPERATOR_USER} on #{} {}\n",
            passwords.join(" "),
            sha256_hex(&self.operator_password),
            OPERATOR_RULES.join(" "),
        )
    }

    /// The Secret's data.
    pub fn data(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (PASSWORD_KEY.to_string(), self.password.clone()),
            (
                OPERATOR_PASSWORD_KEY.to_string(),
                self.operator_password.clone(),
            ),
            (REDIS_AUTH_FILE.to_string(), self.auth_conf()),
        ])
    }

    /// The Secret's annotations: the rotation under way, if any.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        match self.previous_until {
            Some(until) if !self.previous.is_empty() => BTreeMap::from([
                (PREVIOUS_ANNOTATION.to_string(), self.previous.join(",")),
                (PREVIOUS_UNTIL_ANNOTATION.to_string(), until.to_string()),
            ]),
            _ => BTreeMap::new(),
        }
    }
}

/// Hashes of the `default` user's passwords in an `auth.conf`: the `#<hex>` of its `user default`
/// line, or the `requirepass` of files written before users (one password, in quotes).
pub fn default_user_hashes(conf: &str) -> Vec<String> {
    for line in conf.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("user"), Some("default")) => {
                return words
                    .filter_map(|w| w.strip_prefix('#'))
                    .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .map(str::to_ascii_lowercase)
                    .collect();
            }
            (Some("requirepass"), Some(_)) => {
                let value = line.trim_start()["requirepass".len()..].trim();
                let value = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(value);
                return vec![sha256_hex(value)];
            }
            _ => {}
        }
    }
    vec![]
}

/// How Redis names a password in ACL rules and `ACL GETUSER`: SHA-256, lowercase hex.
pub fn sha256_hex(password: &str) -> String {
    Sha256::digest(password.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    fn secret(auth: &RedisAuth) -> Secret {
        Secret {
            metadata: ObjectMeta {
                annotations: Some(auth.annotations()),
                ..ObjectMeta::default()
            },
            data: Some(
                auth.data()
                    .into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn fresh() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("made{n}")
        }
    }

    fn with_password(s: &Secret, password: &str) -> Secret {
        let mut s = s.clone();
        s.data.as_mut().unwrap().insert(
            PASSWORD_KEY.into(),
            ByteString(password.as_bytes().to_vec()),
        );
        s
    }

    #[test]
    fn sha256_is_redis_form() {
        // `ACL SETUSER u >foo` then `ACL GETUSER u` on Redis 7 lists this hash.
        assert_eq!(
            sha256_hex("foo"),
            "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
        );
    }

    #[test]
    fn a_first_pass_makes_both_passwords_and_no_rotation() {
        let a = RedisAuth::next(None, 100, 300, fresh());
        assert_eq!(
            (a.password.as_str(), a.operator_password.as_str()),
            ("made1", "made2")
        );
        assert!(a.previous.is_empty() && a.annotations().is_empty());
        let conf = a.auth_conf();
        assert!(
            !conf.contains("made"),
            "no plain password in auth.conf: {conf}"
        );
        assert_eq!(default_user_hashes(&conf), vec![sha256_hex("made1")]);
        assert!(conf.contains(&format!("user wtc-operator on #{}", sha256_hex("made2"))));
    }

    #[test]
    fn a_steady_secret_stays_as_it_is() {
        let a = RedisAuth::next(None, 100, 300, fresh());
        let b = RedisAuth::next(Some(&secret(&a)), 5_000, 300, || unreachable!());
        assert_eq!(a, b);
    }

    #[test]
    fn a_new_password_keeps_the_old_one_until_the_deadline_then_drops_it() {
        let a = RedisAuth::next(None, 100, 300, fresh());
        let rotated = with_password(&secret(&a), "new one");
        let b = RedisAuth::next(Some(&rotated), 1_000, 300, || unreachable!());
        assert_eq!(b.password, "new one");
        assert_eq!(b.previous, vec![sha256_hex("made1")]);
        assert_eq!(b.previous_until, Some(1_300));
        assert_eq!(
            b.accepted(),
            vec![sha256_hex("new one"), sha256_hex("made1")]
        );
        assert_eq!(b.annotations()[PREVIOUS_UNTIL_ANNOTATION], "1300");
        // During the grace period, passes keep both (and the deadline does not move).
        let c = RedisAuth::next(Some(&secret(&b)), 1_200, 300, || unreachable!());
        assert_eq!(c, b);
        // After it, only the new one.
        let d = RedisAuth::next(Some(&secret(&c)), 1_300, 300, || unreachable!());
        assert_eq!(d.accepted(), vec![sha256_hex("new one")]);
        assert!(d.annotations().is_empty());
    }

    #[test]
    fn a_second_rotation_during_the_grace_period_keeps_every_password_in_use() {
        let a = RedisAuth::next(None, 100, 300, fresh());
        let b = RedisAuth::next(
            Some(&with_password(&secret(&a), "two")),
            1_000,
            300,
            || unreachable!(),
        );
        let c = RedisAuth::next(
            Some(&with_password(&secret(&b), "three")),
            1_100,
            300,
            || unreachable!(),
        );
        assert_eq!(
            c.accepted(),
            vec![sha256_hex("three"), sha256_hex("two"), sha256_hex("made1")]
        );
        assert_eq!(c.previous_until, Some(1_400));
    }

    #[test]
    fn a_removed_password_is_made_again_and_rotates() {
        let a = RedisAuth::next(None, 100, 300, fresh());
        let mut s = secret(&a);
        s.data.as_mut().unwrap().remove(PASSWORD_KEY);
        let b = RedisAuth::next(Some(&s), 1_000, 300, || "made again".into());
        assert_eq!(b.password, "made again");
        assert_eq!(b.operator_password, a.operator_password);
        assert_eq!(b.previous, vec![sha256_hex("made1")]);
    }

    #[test]
    fn a_secret_from_before_users_is_read_without_a_rotation() {
        // Written by earlier releases: `requirepass "<password>"`, no operator password.
        let s = Secret {
            data: Some(BTreeMap::from([
                (PASSWORD_KEY.into(), ByteString(b"abc123".to_vec())),
                (
                    REDIS_AUTH_FILE.into(),
                    ByteString(b"requirepass \"abc123\"\n".to_vec()),
                ),
            ])),
            ..Secret::default()
        };
        let a = RedisAuth::next(Some(&s), 100, 300, || "op".into());
        assert_eq!(a.password, "abc123");
        assert_eq!(a.operator_password, "op");
        assert!(a.previous.is_empty());
    }

    #[test]
    fn any_password_bytes_are_safe_in_auth_conf() {
        let a = RedisAuth {
            password: "sp ace\"quote\nnewline #hash".into(),
            operator_password: "x".into(),
            previous: vec![],
            previous_until: None,
        };
        let conf = a.auth_conf();
        assert_eq!(conf.lines().count(), 2, "{conf}");
        assert_eq!(default_user_hashes(&conf), vec![sha256_hex(&a.password)]);
    }
}
