//! The optional API token: `Authorization: Bearer <token>` on every request but the health
//! checks. Compared in constant time over SHA-256 digests (equal lengths, so the token's length
//! does not leak either); the token is never logged nor put in an answer.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use warp::http::{HeaderMap, header};

pub struct ApiToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

impl ApiToken {
    pub fn new(token: &str) -> Self {
        Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether the request carries exactly one `Authorization: Bearer <this token>`.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return false;
        };
        let given = value.as_bytes();
        let Some(space) = given.iter().position(|b| *b == b' ') else {
            return false;
        };
        let (scheme, rest) = given.split_at(space);
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return false;
        }
        let given: [u8; 32] = Sha256::digest(rest.trim_ascii()).into();
        given.ct_eq(&self.digest).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_bearer_token_is_allowed() {
        let t = ApiToken::new("s3cret");
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            t.allows(&h)
        };
        assert!(with("Bearer s3cret"));
        assert!(with("bearer s3cret"));
        for bad in [
            "Bearer s3creT",
            "Bearer s3cret2",
            "Bearer ",
            "Basic s3cret",
            "s3cret",
            "Bearer",
        ] {
            assert!(!with(bad), "{bad:?} allowed");
        }
        assert!(!t.allows(&HeaderMap::new()));
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
