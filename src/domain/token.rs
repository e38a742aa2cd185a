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

/// Mints tokens with one secret and verifies them with it and any former secrets still accepted.
///
/// Rotation without downtime: every node first accepts the new secret ([`TokenSigner::accepting`]), then signs
/// with it while still accepting the old one, and drops the old one once tokens signed by it have expired.
#[derive(Clone)]
pub struct TokenSigner {
    /// The signing secret first, then secrets that are only accepted.
    secrets: Vec<Vec<u8>>,
    /// How far past its expiry a token is still accepted.
    clock_skew: Duration,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TokenSigner {{ secrets: <{} redacted>, clock_skew: {:?} }}",
            self.secrets.len(),
            self.clock_skew
        )
    }
}

impl TokenSigner {
    /// Builds a signer; the secret must be at least [`MIN_SECRET_LEN`] bytes.
    pub fn new(secret: &[u8]) -> Result<Self, TokenError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(TokenError::WeakSecret(secret.len()));
        }
        Ok(TokenSigner {
            secrets: vec![secret.to_vec()],
            clock_skew: Duration::ZERO,
        })
    }

    /// Also accepts tokens signed with `secret`, a former or upcoming signing secret.
    pub fn accepting(mut self, secret: &[u8]) -> Result<Self, TokenError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(TokenError::WeakSecret(secret.len()));
        }
        self.secrets.push(secret.to_vec());
        Ok(self)
    }

    /// Accepts tokens up to `skew` past their expiry, for clocks that differ between nodes.
    pub fn with_clock_skew(mut self, skew: Duration) -> Self {
        self.clock_skew = skew;
        self
    }

    /// Number of secrets whose tokens verify, the signing one included.
    pub fn accepted_secrets(&self) -> usize {
        self.secrets.len()
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
        let signature =
            URL_SAFE_NO_PAD.encode(mac(&self.secrets[0], &body).finalize().into_bytes());
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
        // Every accepted secret is tried, so the time taken does not tell which one matched.
        let verified = self.secrets.iter().fold(false, |verified, secret| {
            verified | mac(secret, body).verify_slice(&signature).is_ok()
        });
        if !verified {
            return Err(TokenError::BadSignature);
        }
        let json = URL_SAFE_NO_PAD
            .decode(claims)
            .map_err(|_| TokenError::Malformed)?;
        let claims: TokenClaims =
            serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        let skew_ms = u64::try_from(self.clock_skew.as_millis()).unwrap_or(u64::MAX);
        if claims.expires_at_ms.saturating_add(skew_ms) <= unix_millis(now) {
            return Err(TokenError::Expired);
        }
        Identity::new(&claims.unique_id, &claims.client_type).map_err(|_| TokenError::Malformed)?;
        Ok(claims)
    }
}

fn mac(secret: &[u8], body: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body.as_bytes());
    mac
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
    fn rotation_accepts_old_and_new_secret() {
        let now = SystemTime::now();
        let old = signer();
        let new = TokenSigner::new(&[8u8; 32]).expect("valid");
        let old_token = old.mint(&identity(), &[], &[], Duration::from_secs(60), now);
        // Step 1: nodes accept the new secret while still signing with the old one.
        let accepting_new = signer().accepting(&[8u8; 32]).expect("valid");
        let new_token = new.mint(&identity(), &[], &[], Duration::from_secs(60), now);
        assert!(accepting_new.verify(&new_token, now).is_ok());
        // Step 2: nodes sign with the new secret and still accept the old one.
        let rotated = TokenSigner::new(&[8u8; 32])
            .expect("valid")
            .accepting(&[7u8; 32])
            .expect("valid");
        assert!(rotated.verify(&old_token, now).is_ok());
        assert!(
            new.verify(
                &rotated.mint(&identity(), &[], &[], Duration::from_secs(60), now),
                now
            )
            .is_ok()
        );
        // Step 3: the old secret is dropped.
        assert_eq!(new.verify(&old_token, now), Err(TokenError::BadSignature));
        assert_eq!(
            signer().accepting(b"short").err(),
            Some(TokenError::WeakSecret(5))
        );
    }

    #[test]
    fn clock_skew_extends_acceptance_past_expiry() {
        let now = SystemTime::now();
        let token = signer().mint(&identity(), &[], &[], Duration::from_secs(60), now);
        let tolerant = signer().with_clock_skew(Duration::from_secs(5));
        assert!(
            tolerant
                .verify(&token, now + Duration::from_secs(63))
                .is_ok()
        );
        assert_eq!(
            tolerant.verify(&token, now + Duration::from_secs(66)),
            Err(TokenError::Expired)
        );
        assert_eq!(
            signer().verify(&token, now + Duration::from_secs(61)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn short_secret_is_rejected() {
        assert_eq!(
            TokenSigner::new(b"short").err(),
            Some(TokenError::WeakSecret(5))
        );
    }
}
