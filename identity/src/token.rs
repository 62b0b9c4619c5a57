//! Enrollment tokens: `drover1.<host>.<ca-fingerprint>.<secret>`.
//!
//! The host (base64url) tells the agent which name it enrolls as, the CA fingerprint (hex
//! SHA-256) lets it pin the controller on first contact, and the secret (32 random bytes,
//! base64url) proves the operator issued it. The controller stores only the secret's SHA-256.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::{Error, validate_name};

const PREFIX: &str = "drover1";

/// A parsed enrollment token.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollToken {
    pub host: String,
    pub ca_fingerprint: String,
    secret: String,
}

// The secret never reaches logs through Debug.
impl std::fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollToken")
            .field("host", &self.host)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl EnrollToken {
    /// A new token with a fresh random secret.
    pub fn generate(host: &str, ca_fingerprint: &str) -> Result<EnrollToken, Error> {
        validate_name(host)?;
        let secret: [u8; 32] = rand::random();
        Ok(EnrollToken {
            host: host.to_string(),
            ca_fingerprint: ca_fingerprint.to_string(),
            secret: URL_SAFE_NO_PAD.encode(secret),
        })
    }

    /// Parses a token as printed by `drover token create`.
    pub fn parse(s: &str) -> Result<EnrollToken, Error> {
        let bad = |why: &str| {
            Error::Identity(format!(
                "malformed enrollment token: {why}; copy the whole line printed by `drover token create`"
            ))
        };
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [prefix, host, fp, secret] = parts.as_slice() else {
            return Err(bad("expected 4 parts separated by '.'"));
        };
        if *prefix != PREFIX {
            return Err(bad("it does not start with drover1"));
        }
        let host = URL_SAFE_NO_PAD
            .decode(host)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| bad("the host part is not valid"))?;
        validate_name(&host)?;
        if fp.len() != 64 || !fp.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad("the CA fingerprint part is not 64 hex digits"));
        }
        if URL_SAFE_NO_PAD.decode(secret).map(|b| b.len()) != Ok(32) {
            return Err(bad("the secret part is not valid"));
        }
        Ok(EnrollToken {
            host,
            ca_fingerprint: fp.to_ascii_lowercase(),
            secret: (*secret).to_string(),
        })
    }

    /// The token as one line, to print once and never store.
    pub fn encode(&self) -> String {
        format!(
            "{PREFIX}.{}.{}.{}",
            URL_SAFE_NO_PAD.encode(self.host.as_bytes()),
            self.ca_fingerprint,
            self.secret
        )
    }

    /// What the controller stores and looks tokens up by: SHA-256 of the secret, hex.
    pub fn secret_hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }
}

/// The short id an operator uses to list and revoke a token: a prefix of its secret hash.
pub fn token_id(secret_hash: &str) -> String {
    secret_hash.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_redaction() {
        let fp = "ab".repeat(32);
        let t = EnrollToken::generate("web-1.prod", &fp).unwrap();
        let parsed = EnrollToken::parse(&t.encode()).unwrap();
        assert_eq!(parsed, t);
        assert_eq!(parsed.host, "web-1.prod");
        assert!(!format!("{t:?}").contains(&t.secret));
        assert_eq!(token_id(&t.secret_hash()).len(), 12);
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        for bad in ["", "drover1.a.b", "drover2.aGk.00.x", "drover1.aGk.zz.AAAA"] {
            let err = EnrollToken::parse(bad).unwrap_err().to_string();
            assert!(err.contains("malformed enrollment token"), "{bad}: {err}");
        }
    }
}
