//! The identity of a client: a (uniqueId, clientType) pair, such as ("order-8812", "h5").
//!
//! Identities name RabbitMQ queues and routing keys, so both parts are restricted to characters that are safe
//! there: ASCII letters and digits plus a few separators. A clientType never contains a dot, so the mailbox name
//! `<prefix>.mailbox.<clientType>.<uniqueId>` maps back to exactly one identity.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Maximum length of a uniqueId, in bytes.
pub const MAX_UNIQUE_ID_LEN: usize = 128;
/// Maximum length of a clientType, in bytes.
pub const MAX_CLIENT_TYPE_LEN: usize = 32;

/// An identity that passed validation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub unique_id: String,
    pub client_type: String,
}

/// Why a uniqueId or clientType was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {}: {reason}", super::envelope::quoted(value))]
pub struct IdentityError {
    /// The envelope or query field that carried the value, such as `toUniqueId`.
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

impl Identity {
    /// Validates both parts and builds the identity.
    pub fn new(unique_id: &str, client_type: &str) -> Result<Self, IdentityError> {
        validate_unique_id("uniqueId", unique_id)?;
        validate_client_type("clientType", client_type)?;
        Ok(Identity {
            unique_id: unique_id.to_owned(),
            client_type: client_type.to_owned(),
        })
    }

    /// Name of the durable mailbox queue that holds this identity's direct messages.
    pub fn mailbox_queue(&self, prefix: &str) -> String {
        format!("{prefix}.mailbox.{}.{}", self.client_type, self.unique_id)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.unique_id, self.client_type)
    }
}

/// Checks a uniqueId: 1 to 128 ASCII letters, digits or `- _ . : @`.
pub fn validate_unique_id(field: &'static str, value: &str) -> Result<(), IdentityError> {
    validate(
        field,
        value,
        MAX_UNIQUE_ID_LEN,
        |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'),
        "letters, digits and - _ . : @",
    )
}

/// Checks a clientType: 1 to 32 ASCII letters, digits, `-` or `_`.
pub fn validate_client_type(field: &'static str, value: &str) -> Result<(), IdentityError> {
    validate(
        field,
        value,
        MAX_CLIENT_TYPE_LEN,
        |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'),
        "letters, digits, - and _",
    )
}

fn validate(
    field: &'static str,
    value: &str,
    max_len: usize,
    allowed: impl Fn(char) -> bool,
    allowed_text: &str,
) -> Result<(), IdentityError> {
    let error = |reason: String| IdentityError {
        field,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(error("it is empty; give a non-empty value".to_owned()));
    }
    if value.len() > max_len {
        return Err(error(format!(
            "it is {} bytes long; use at most {max_len}",
            value.len()
        )));
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(error(format!(
            "character {bad:?} is not allowed; use only {allowed_text}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_name_uses_prefix_and_both_parts() {
        let identity = Identity::new("order-8812", "h5").expect("valid identity");
        assert_eq!(identity.mailbox_queue("wsgw"), "wsgw.mailbox.h5.order-8812");
    }

    #[test]
    fn client_type_rejects_dot() {
        let error = Identity::new("a", "h5.x").expect_err("dot must be rejected");
        assert_eq!(error.field, "clientType");
        assert!(error.reason.contains("'.'"), "{error}");
    }

    #[test]
    fn unique_id_rejects_empty_and_long() {
        assert!(Identity::new("", "h5").is_err());
        assert!(Identity::new(&"x".repeat(129), "h5").is_err());
        assert!(Identity::new(&"x".repeat(128), "h5").is_ok());
    }
}
