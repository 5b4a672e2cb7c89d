//! The managed Redis' credentials and their rotation: pure, from the auth Secret as it is to the
//! Secret as it should be. `redis_admin` applies the result to the running Redis.
//!
//! The Secret (`<cache>-redis-auth`) holds:
//! - `password`: the `default` user's password, which the sidecars read from their mounted copy
//!   (`WTC_REDIS_PASSWORD_FILE`, read for each new connection);
//! - `next-password`: written by a user to rotate (not mounted anywhere);
//! - `operator-password`: the operator's own Redis user (`wtc-operator`), allowed only `ACL
//!   GETUSER`/`ACL SETUSER` and `CLIENT KILL` (which still makes it an administrator: `ACL
//!   SETUSER` can grant anything), so it can change the `default` user's passwords without
//!   knowing them and without a restart;
//! - `auth.conf`: both users, passwords as SHA-256 (`#<hex>`), which Redis reads at start.
//!
//! Rotation, in this order so that no sidecar ever holds a password Redis refuses:
//! 1. a user writes `next-password`; Redis is made to accept it besides the current one;
//! 2. only once Redis confirmed that, `next-password` becomes `password` (what the sidecars
//!    read; the kubelet updates their copy within its sync period) and the replaced password
//!    stays accepted for the cache's `passwordRotationSeconds`, counted from then;
//! 3. after that, only the new one is accepted, and connections of `default` are closed (their
//!    owners reconnect with the password their file holds). While pods injected by an earlier
//!    release, which hold the password in their environment, still run, step 3 waits.
//!
//! The hashes still accepted and their deadline are annotations of the Secret, and so is what
//! the running Redis was last confirmed to accept (`wtc.dev/redis-accepts`): a change not yet
//! confirmed is reported at every pass until it is.

use k8s_openapi::api::core::v1::Secret;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

pub const PASSWORD_KEY: &str = "password";
pub const NEXT_PASSWORD_KEY: &str = "next-password";
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
/// SHA-256 (hex) of replaced passwords of `default` still accepted, comma-separated.
pub const PREVIOUS_ANNOTATION: &str = "wtc.dev/previous-passwords";
/// Until when (Unix seconds) those stay accepted.
pub const PREVIOUS_UNTIL_ANNOTATION: &str = "wtc.dev/previous-passwords-until";
/// A digest of the password hashes the running Redis was last confirmed to accept.
pub const CONFIRMED_ANNOTATION: &str = "wtc.dev/redis-accepts";

/// The credentials one pass of the reconciler wants.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisAuth {
    pub password: String,
    /// A password a user asked for, not yet accepted by Redis (so not yet `password`).
    pub next: Option<String>,
    pub operator_password: String,
    /// Hashes of replaced passwords still accepted, and until when (Unix seconds).
    pub previous: Vec<String>,
    pub previous_until: Option<u64>,
    /// What the running Redis was last confirmed to accept (`confirmation`), if anything.
    pub confirmed: Option<String>,
}

/// What else decides a pass, besides the Secret.
#[derive(Debug, Clone, Copy)]
pub struct Moment {
    /// Unix seconds.
    pub now: u64,
    /// How long a replaced password stays accepted.
    pub grace_seconds: u64,
    /// Pods still hold the password in their environment (injected by an earlier release):
    /// replaced passwords stay accepted until they are gone.
    pub hold: bool,
}

impl RedisAuth {
    /// The next state from the Secret as it is (`None`: not made yet); `fresh` makes a password.
    pub fn next(current: Option<&Secret>, at: Moment, mut fresh: impl FnMut() -> String) -> Self {
        let data = current.and_then(|s| s.data.as_ref());
        let text = |key: &str| {
            data.and_then(|d| d.get(key))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .filter(|p| !p.is_empty())
        };
        let accepted = text(REDIS_AUTH_FILE)
            .map(|conf| default_user_hashes(&conf))
            .unwrap_or_default();
        let annotations = current.and_then(|s| s.metadata.annotations.as_ref());
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).cloned();
        let until = annotation(PREVIOUS_UNTIL_ANNOTATION).and_then(|u| u.parse::<u64>().ok());
        let confirmed = annotation(CONFIRMED_ANNOTATION);
        let password = text(PASSWORD_KEY).unwrap_or_else(&mut fresh);
        let operator_password = text(OPERATOR_PASSWORD_KEY).unwrap_or_else(&mut fresh);
        let current_hash = sha256_hex(&password);
        // `password` written over or removed by hand (the documented way is `next-password`):
        // whatever was accepted stays accepted for the grace period, as after a promotion.
        let replaced = !accepted.is_empty() && !accepted.contains(&current_hash);
        let next = text(NEXT_PASSWORD_KEY).filter(|n| *n != password);
        let next_hash = next.as_deref().map(sha256_hex);
        let others = accepted
            .into_iter()
            .filter(|h| *h != current_hash && Some(h) != next_hash.as_ref());
        let (previous, previous_until) = match until {
            _ if replaced => (others.collect(), Some(at.now + at.grace_seconds)),
            Some(u) if u > at.now || at.hold => {
                let kept: Vec<String> = others.collect();
                let until = (!kept.is_empty()).then_some(u);
                (kept, until)
            }
            // No rotation under way, or its grace period is over: only the current one (and a
            // `next` being added).
            _ => (vec![], None),
        };
        Self {
            password,
            next,
            operator_password,
            previous,
            previous_until,
            confirmed,
        }
    }

    /// Once the running Redis accepts `next`: it becomes the password the sidecars read, and the
    /// replaced one stays accepted for the grace period, counted from now.
    pub fn promote(&self, at: Moment) -> Self {
        let Some(next) = &self.next else {
            return self.clone();
        };
        let mut previous = vec![sha256_hex(&self.password)];
        previous.extend(self.previous.iter().cloned());
        Self {
            password: next.clone(),
            next: None,
            previous,
            previous_until: Some(at.now + at.grace_seconds),
            ..self.clone()
        }
    }

    /// Hashes of the passwords `default` accepts: the current one first, then the one being
    /// added, then the replaced ones.
    pub fn accepted(&self) -> Vec<String> {
        let mut all = vec![sha256_hex(&self.password)];
        for h in self
            .next
            .iter()
            .map(|n| sha256_hex(n))
            .chain(self.previous.iter().cloned())
        {
            if !all.contains(&h) {
                all.push(h);
            }
        }
        all
    }

    /// A digest of `accepted` (order aside), for `CONFIRMED_ANNOTATION`.
    pub fn confirmation(&self) -> String {
        let mut hashes = self.accepted();
        hashes.sort();
        sha256_hex(&hashes.join(","))
    }

    /// The running Redis has not been confirmed to accept what this state lists.
    pub fn unconfirmed(&self) -> bool {
        self.confirmed.as_deref() != Some(self.confirmation().as_str())
    }

    /// A rotation step waits for the running Redis: a password to add, replaced ones still
    /// accepted, or a set that changed since Redis last confirmed one (a Redis never confirmed,
    /// just made, is not a rotation).
    pub fn step_pending(&self) -> bool {
        self.next.is_some()
            || !self.previous.is_empty()
            || (self.confirmed.is_some() && self.unconfirmed())
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
        let mut data = BTreeMap::from([
            (PASSWORD_KEY.to_string(), self.password.clone()),
            (
                OPERATOR_PASSWORD_KEY.to_string(),
                self.operator_password.clone(),
            ),
            (REDIS_AUTH_FILE.to_string(), self.auth_conf()),
        ]);
        if let Some(next) = &self.next {
            data.insert(NEXT_PASSWORD_KEY.to_string(), next.clone());
        }
        data
    }

    /// The Secret's annotations: the rotation under way, if any, and what Redis confirmed.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        if let (Some(until), false) = (self.previous_until, self.previous.is_empty()) {
            a.insert(PREVIOUS_ANNOTATION.to_string(), self.previous.join(","));
            a.insert(PREVIOUS_UNTIL_ANNOTATION.to_string(), until.to_string());
        }
        if let Some(c) = &self.confirmed {
            a.insert(CONFIRMED_ANNOTATION.to_string(), c.clone());
        }
        a
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

/// A password for the managed Redis: 32 alphanumerics from the operating system's random
/// source (about 190 bits), safe in a URL and a shell.
pub fn new_password() -> String {
    use ring::rand::SecureRandom;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let rng = ring::rand::SystemRandom::new();
    let mut out = String::with_capacity(32);
    let mut byte = [0u8; 1];
    while out.len() < 32 {
        rng.fill(&mut byte).expect("the OS random source");
        // 62 * 4 = 248: bytes above are dropped, so every character is equally likely.
        if (byte[0] as usize) < ALPHABET.len() * 4 {
            out.push(ALPHABET[byte[0] as usize % ALPHABET.len()] as char);
        }
    }
    out
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

    fn at(now: u64) -> Moment {
        Moment {
            now,
            grace_seconds: 300,
            hold: false,
        }
    }

    fn with(s: &Secret, key: &str, value: &str) -> Secret {
        let mut s = s.clone();
        s.data
            .as_mut()
            .unwrap()
            .insert(key.into(), ByteString(value.as_bytes().to_vec()));
        s
    }

    /// A pass after which the running Redis accepts what it asked for.
    fn confirmed(a: RedisAuth) -> RedisAuth {
        RedisAuth {
            confirmed: Some(a.confirmation()),
            ..a
        }
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
    fn new_passwords_are_long_alphanumeric_and_fresh() {
        let (a, b) = (new_password(), new_password());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn a_first_pass_makes_both_passwords_and_no_rotation() {
        let a = RedisAuth::next(None, at(100), fresh());
        assert_eq!(
            (a.password.as_str(), a.operator_password.as_str()),
            ("made1", "made2")
        );
        assert!(a.previous.is_empty() && a.next.is_none());
        assert!(a.unconfirmed(), "nothing confirmed yet");
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
        let a = confirmed(RedisAuth::next(None, at(100), fresh()));
        let b = RedisAuth::next(Some(&secret(&a)), at(5_000), || unreachable!());
        assert_eq!(a, b);
        assert!(!b.unconfirmed());
    }

    #[test]
    fn a_next_password_is_added_first_and_promoted_only_when_redis_took_it() {
        let a = confirmed(RedisAuth::next(None, at(100), fresh()));
        let asked = with(&secret(&a), NEXT_PASSWORD_KEY, "new one");
        // Added: both accepted, the sidecars' password unchanged, no deadline yet.
        let b = RedisAuth::next(Some(&asked), at(1_000), || unreachable!());
        assert_eq!(b.password, "made1");
        assert_eq!(b.next.as_deref(), Some("new one"));
        assert_eq!(
            b.accepted(),
            vec![sha256_hex("made1"), sha256_hex("new one")]
        );
        assert!(b.previous_until.is_none() && b.unconfirmed());
        // Redis not reached: the next pass asks the same.
        let again = RedisAuth::next(Some(&secret(&b)), at(1_100), || unreachable!());
        assert_eq!(again, b);
        // Redis took it: promoted, the deadline counted from then.
        let c = confirmed(b).promote(at(1_200));
        assert_eq!((c.password.as_str(), c.next.as_deref()), ("new one", None));
        assert_eq!(c.previous, vec![sha256_hex("made1")]);
        assert_eq!(c.previous_until, Some(1_500));
        assert!(!c.unconfirmed(), "the same set Redis accepts");
        assert!(!c.data().contains_key(NEXT_PASSWORD_KEY));
        // During the grace period, passes keep both.
        let d = RedisAuth::next(Some(&secret(&c)), at(1_400), || unreachable!());
        assert_eq!(d, c);
        // After it, only the new one, to be confirmed.
        let e = RedisAuth::next(Some(&secret(&d)), at(1_500), || unreachable!());
        assert_eq!(e.accepted(), vec![sha256_hex("new one")]);
        assert!(e.previous.is_empty() && e.unconfirmed());
        assert!(!e.annotations().contains_key(PREVIOUS_ANNOTATION));
    }

    #[test]
    fn pods_holding_the_password_in_their_environment_hold_the_old_one() {
        let a = confirmed(RedisAuth::next(None, at(100), fresh()));
        let b = RedisAuth::next(
            Some(&with(&secret(&a), NEXT_PASSWORD_KEY, "two")),
            at(1_000),
            || unreachable!(),
        );
        let c = confirmed(b).promote(at(1_000));
        let held = RedisAuth::next(
            Some(&secret(&c)),
            Moment {
                hold: true,
                ..at(9_999)
            },
            || unreachable!(),
        );
        assert_eq!(
            held.accepted(),
            vec![sha256_hex("two"), sha256_hex("made1")]
        );
    }

    #[test]
    fn a_password_written_over_by_hand_keeps_the_old_one_for_the_grace_period() {
        let a = confirmed(RedisAuth::next(None, at(100), fresh()));
        let b = RedisAuth::next(
            Some(&with(&secret(&a), PASSWORD_KEY, "by hand")),
            at(1_000),
            || unreachable!(),
        );
        assert_eq!(
            b.accepted(),
            vec![sha256_hex("by hand"), sha256_hex("made1")]
        );
        assert_eq!(b.previous_until, Some(1_300));
        // Removed: a new one is made, the same way.
        let mut s = secret(&a);
        s.data.as_mut().unwrap().remove(PASSWORD_KEY);
        let c = RedisAuth::next(Some(&s), at(1_000), || "made again".into());
        assert_eq!(c.password, "made again");
        assert_eq!(c.operator_password, a.operator_password);
        assert_eq!(c.previous, vec![sha256_hex("made1")]);
    }

    #[test]
    fn a_second_rotation_during_the_grace_period_keeps_every_password_in_use() {
        let a = confirmed(RedisAuth::next(None, at(100), fresh()));
        let b = RedisAuth::next(
            Some(&with(&secret(&a), NEXT_PASSWORD_KEY, "two")),
            at(1_000),
            || unreachable!(),
        );
        let b = confirmed(b).promote(at(1_000));
        let c = RedisAuth::next(
            Some(&with(&secret(&b), NEXT_PASSWORD_KEY, "three")),
            at(1_100),
            || unreachable!(),
        );
        let c = confirmed(c).promote(at(1_100));
        assert_eq!(
            c.accepted(),
            vec![sha256_hex("three"), sha256_hex("two"), sha256_hex("made1")]
        );
        assert_eq!(c.previous_until, Some(1_400));
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
        let a = RedisAuth::next(Some(&s), at(100), || "op".into());
        assert_eq!(a.password, "abc123");
        assert_eq!(a.operator_password, "op");
        assert!(a.previous.is_empty());
    }

    #[test]
    fn any_password_bytes_are_safe_in_auth_conf() {
        let a = RedisAuth {
            password: "sp ace\"quote\nnewline #hash".into(),
            next: None,
            operator_password: "x".into(),
            previous: vec![],
            previous_until: None,
            confirmed: None,
        };
        let conf = a.auth_conf();
        assert_eq!(conf.lines().count(), 2, "{conf}");
        assert_eq!(default_user_hashes(&conf), vec![sha256_hex(&a.password)]);
    }
}
