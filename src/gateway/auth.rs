//! API key checks and the single-use rule for tokens.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Checks a bearer API key against the configured ones, comparing SHA-256 digests in constant time.
pub fn api_key_matches(configured: &[String], presented: &str) -> bool {
    let presented = Sha256::digest(presented.as_bytes());
    configured.iter().fold(false, |matched, key| {
        let digest = Sha256::digest(key.as_bytes());
        let difference = digest
            .iter()
            .zip(presented.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        matched | (difference == 0)
    })
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Why a token could not be claimed for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimError {
    /// The token's nonce was already used.
    Reused,
    /// The table of used tokens is full of unexpired entries.
    Full,
}

/// Nonces of tokens already used, on this node or announced by another, each kept until its token can no longer
/// verify: its expiry plus the clock skew tolerance.
pub struct UsedTokens {
    capacity: usize,
    clock_skew_ms: u64,
    used: Mutex<HashMap<String, u64>>,
}

impl UsedTokens {
    pub fn new(capacity: usize, clock_skew: std::time::Duration) -> Self {
        UsedTokens {
            capacity,
            clock_skew_ms: u64::try_from(clock_skew.as_millis()).unwrap_or(u64::MAX),
            used: Mutex::new(HashMap::new()),
        }
    }

    /// Records a nonce another node used, so this node rejects its token too. Past capacity, expired entries are
    /// pruned first; when the table is still full the nonce is not recorded (the token expires soon anyway).
    pub fn remember(&self, nonce: &str, expires_at_ms: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.len() >= self.capacity {
            let now = crate::domain::envelope::unix_millis(std::time::SystemTime::now());
            used.retain(|_, expires| *expires > now);
            if used.len() >= self.capacity {
                return;
            }
        }
        used.insert(
            nonce.to_owned(),
            expires_at_ms.saturating_add(self.clock_skew_ms),
        );
    }

    /// Marks a nonce as used; fails if it was used before or the table is full.
    pub fn claim(&self, nonce: &str, expires_at_ms: u64, now_ms: u64) -> Result<(), ClaimError> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.contains_key(nonce) {
            return Err(ClaimError::Reused);
        }
        if used.len() >= self.capacity {
            used.retain(|_, expires| *expires > now_ms);
            if used.len() >= self.capacity {
                return Err(ClaimError::Full);
            }
        }
        used.insert(
            nonce.to_owned(),
            expires_at_ms.saturating_add(self.clock_skew_ms),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_matches_only_configured_key() {
        let keys = vec!["alpha".to_owned(), "beta".to_owned()];
        assert!(api_key_matches(&keys, "beta"));
        assert!(!api_key_matches(&keys, "gamma"));
        assert!(!api_key_matches(&[], "alpha"));
    }

    #[test]
    fn bearer_parses_scheme_case_insensitively() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn claim_rejects_reuse_and_prunes_expired() {
        let used = UsedTokens::new(2, std::time::Duration::ZERO);
        assert_eq!(used.claim("a", 100, 0), Ok(()));
        assert_eq!(used.claim("a", 100, 0), Err(ClaimError::Reused));
        assert_eq!(used.claim("b", 100, 0), Ok(()));
        assert_eq!(used.claim("c", 100, 50), Err(ClaimError::Full));
        assert_eq!(used.claim("c", 300, 150), Ok(()));
    }
}
