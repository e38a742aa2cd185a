//! Connection tokens: short-lived, HMAC-SHA256 signed, valid for one connection.
//!
//! A token is `v1.<claims>.<signature>`, both parts base64url without padding. The claims carry the identity,
//! its tags and businesses, an expiry in ms since the Unix epoch and a random nonce. The signature covers
//! `v1.<claims>`. Single use is enforced by the gateway, which remembers each nonce until the token expires.
//! Token text is a credential: it is never logged.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::envelope::unix_millis;
use super::identity::Identity;

/// Minimum length of a signing secret, in bytes.
pub const MIN_SECRET_LEN: usize = 32;
const VERSION: &str = "v1";

/// What a valid token says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    #[serde(rename = "u")]
    pub unique_id: String,
    #[serde(rename = "c")]
    pub client_type: String,
    #[serde(rename = "t", default)]
    pub tags: Vec<String>,
    #[serde(rename = "b", default)]
    pub businesses: Vec<String>,
    /// Expiry, in ms since the Unix epoch.
    #[serde(rename = "e")]
    pub expires_at_ms: u64,
    /// Random nonce that makes the token single-use.
    #[serde(rename = "n")]
    pub nonce: String,
}

impl TokenClaims {
    /// The identity the token was issued for.
    pub fn identity(&self) -> Identity {
        Identity {
            unique_id: self.unique_id.clone(),
            client_type: self.client_type.clone(),
        }
    }
}

/// Why a token was rejected. Messages never include the token text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed; request a new one from /websocket/token")]
    Malformed,
    #[error("the token signature is invalid; request a new one from /websocket/token")]
    BadSignature,
    #[error("the token expired; request a new one from /websocket/token")]
    Expired,
    #[error("the token was already used for a connection; request a new one for each connection")]
    Reused,
    #[error(
        "the token signing secret is {0} bytes long; use at least {MIN_SECRET_LEN} random bytes"
    )]
    WeakSecret(usize),
}

/// Mints and verifies tokens with one secret.
#[derive(Clone)]
pub struct TokenSigner {
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner { secret: <redacted> }")
    }
}

impl TokenSigner {
    /// Builds a signer; the secret must be at least [`MIN_SECRET_LEN`] bytes.
    pub fn new(secret: &[u8]) -> Result<Self, TokenError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(TokenError::WeakSecret(secret.len()));
        }
        Ok(TokenSigner {
            secret: secret.to_vec(),
        })
    }

    /// Mints a token for `identity` that expires `ttl` after `now`.
    pub fn mint(
        &self,
        identity: &Identity,
        tags: &[String],
        businesses: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> String {
        let claims = TokenClaims {
            unique_id: identity.unique_id.clone(),
            client_type: identity.client_type.clone(),
            tags: tags.to_vec(),
            businesses: businesses.to_vec(),
            expires_at_ms: unix_millis(now + ttl),
            nonce: uuid::Uuid::new_v4().simple().to_string(),
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims, including ones that are already expired (tests use this).
    pub fn sign(&self, claims: &TokenClaims) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let body = format!("{VERSION}.{}", URL_SAFE_NO_PAD.encode(json));
        let signature = URL_SAFE_NO_PAD.encode(self.mac(&body).finalize().into_bytes());
        format!("{body}.{signature}")
    }

    /// Checks the signature and expiry and returns the claims. Single use is the caller's job.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<TokenClaims, TokenError> {
        let (body, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (version, claims) = body.split_once('.').ok_or(TokenError::Malformed)?;
        if version != VERSION {
            return Err(TokenError::Malformed);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        self.mac(body)
            .verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(claims)
            .map_err(|_| TokenError::Malformed)?;
        let claims: TokenClaims =
            serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if claims.expires_at_ms <= unix_millis(now) {
            return Err(TokenError::Expired);
        }
        Identity::new(&claims.unique_id, &claims.client_type).map_err(|_| TokenError::Malformed)?;
        Ok(claims)
    }

    fn mac(&self, body: &str) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(body.as_bytes());
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> TokenSigner {
        TokenSigner::new(&[7u8; 32]).expect("32-byte secret")
    }

    fn identity() -> Identity {
        Identity::new("order-8812", "h5").expect("valid")
    }

    #[test]
    fn mint_then_verify_returns_claims() {
        let now = SystemTime::now();
        let token = signer().mint(
            &identity(),
            &["vip".to_owned()],
            &[],
            Duration::from_secs(60),
            now,
        );
        let claims = signer().verify(&token, now).expect("valid token");
        assert_eq!(claims.identity(), identity());
        assert_eq!(claims.tags, vec!["vip".to_owned()]);
    }

    #[test]
    fn verify_rejects_expired() {
        let now = SystemTime::now();
        let token = signer().mint(&identity(), &[], &[], Duration::from_secs(60), now);
        let later = now + Duration::from_secs(61);
        assert_eq!(signer().verify(&token, later), Err(TokenError::Expired));
    }

    #[test]
    fn verify_rejects_tampered_claims() {
        let now = SystemTime::now();
        let token = signer().mint(&identity(), &[], &[], Duration::from_secs(60), now);
        let other = signer().mint(
            &Identity::new("someone-else", "h5").expect("valid"),
            &[],
            &[],
            Duration::from_secs(60),
            now,
        );
        let (_, signature) = token.rsplit_once('.').expect("three parts");
        let (other_body, _) = other.rsplit_once('.').expect("three parts");
        let forged = format!("{other_body}.{signature}");
        assert_eq!(signer().verify(&forged, now), Err(TokenError::BadSignature));
    }

    #[test]
    fn verify_rejects_other_secret() {
        let now = SystemTime::now();
        let token = signer().mint(&identity(), &[], &[], Duration::from_secs(60), now);
        let other = TokenSigner::new(&[8u8; 32]).expect("valid");
        assert_eq!(other.verify(&token, now), Err(TokenError::BadSignature));
    }

    #[test]
    fn short_secret_is_rejected() {
        assert_eq!(
            TokenSigner::new(b"short").err(),
            Some(TokenError::WeakSecret(5))
        );
    }
}
