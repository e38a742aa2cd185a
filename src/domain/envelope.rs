//! The envelope: the one JSON payload every business message travels in.
//!
//! Fields are camelCase: sendType, messageType, businessType, fromUniqueId, toUniqueId, fromClientType,
//! toClientType, timestamp, content, tags, businesses, plus the messageId. The messageId and the timestamp are
//! stamped once, at first publish ([`Envelope::stamp_first_publish`]); redeliveries and replays keep both, so
//! (timestamp, messageId) is a stable order key. Text fields carry any UTF-8 unchanged.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::identity::{self, Identity, IdentityError};

/// Maximum length of a messageId, in bytes.
pub const MAX_MESSAGE_ID_LEN: usize = 128;
/// Maximum length of a businessType or messageType, in bytes.
pub const MAX_TYPE_NAME_LEN: usize = 64;
/// Maximum number of entries in `tags` and in `businesses`.
pub const MAX_TAGS: usize = 64;
/// Maximum length of one tag or business, in bytes.
pub const MAX_TAG_LEN: usize = 128;

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SendType {
    ClientToServer,
    ServerToClient,
    ClientToClient,
}

impl fmt::Display for SendType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendType::ClientToServer => "CLIENT_TO_SERVER",
            SendType::ServerToClient => "SERVER_TO_CLIENT",
            SendType::ClientToClient => "CLIENT_TO_CLIENT",
        })
    }
}

/// A business message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Envelope {
    /// Time-ordered id (UUIDv7) assigned at first publish, or the caller's own id so its retries de-duplicate.
    #[serde(default)]
    pub message_id: Option<String>,
    pub send_type: SendType,
    pub message_type: String,
    pub business_type: String,
    #[serde(default)]
    pub from_unique_id: Option<String>,
    #[serde(default)]
    pub to_unique_id: Option<String>,
    #[serde(default)]
    pub from_client_type: Option<String>,
    #[serde(default)]
    pub to_client_type: Option<String>,
    /// Milliseconds since the Unix epoch, stamped by wsgw at first publish.
    #[serde(default)]
    pub timestamp: Option<u64>,
    #[serde(default)]
    pub content: Value,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub businesses: Vec<String>,
}

/// Why an envelope was rejected. Every variant names the field involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("invalid envelope: {message}{}", path_suffix(path))]
    Json { path: String, message: String },
    #[error("invalid {field} {}: {reason}", quoted(value))]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("missing {field}: {reason}")]
    Missing { field: &'static str, reason: String },
}

/// ` (at `field`)` for an error inside a field; nothing for a syntax error of the whole document.
fn path_suffix(path: &str) -> String {
    if path.is_empty() || path == "?" || path == "envelope" || path == "." {
        String::new()
    } else {
        format!(" (at `{}`)", cut(path, MAX_QUOTED_CHARS * 2))
    }
}

/// Characters of a value quoted in an error message; longer values are cut, so that an error never echoes a
/// large input back to the client that sent it.
const MAX_QUOTED_CHARS: usize = 64;

/// Quotes `value` for an error message, cut to [`MAX_QUOTED_CHARS`] characters with its full length appended.
pub fn quoted(value: &str) -> String {
    let head = cut(value, MAX_QUOTED_CHARS);
    if head.len() == value.len() {
        format!("{value:?}")
    } else {
        format!("{head:?}… ({} bytes)", value.len())
    }
}

/// The first `max_chars` characters of `text`.
pub(crate) fn cut(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

impl EnvelopeError {
    /// The envelope field the error is about, as it is spelled in JSON.
    pub fn field(&self) -> &str {
        match self {
            EnvelopeError::Json { path, .. } => path,
            EnvelopeError::Invalid { field, .. } | EnvelopeError::Missing { field, .. } => field,
        }
    }
}

impl From<IdentityError> for EnvelopeError {
    fn from(error: IdentityError) -> Self {
        EnvelopeError::Invalid {
            field: error.field,
            value: error.value,
            reason: error.reason,
        }
    }
}

impl Envelope {
    /// Parses and validates an envelope from JSON text.
    pub fn from_json(text: &str) -> Result<Self, EnvelopeError> {
        let deserializer = &mut serde_json::Deserializer::from_str(text);
        let envelope: Envelope =
            serde_path_to_error::deserialize(deserializer).map_err(|error| {
                let path = error.path().to_string();
                // serde quotes the offending value and the unknown field name in full: cut both.
                let message = error.into_inner().to_string();
                EnvelopeError::Json {
                    path: if path == "." {
                        "envelope".to_owned()
                    } else {
                        path
                    },
                    message: if message.chars().count() > MAX_QUOTED_CHARS * 4 {
                        format!("{}…", cut(&message, MAX_QUOTED_CHARS * 4))
                    } else {
                        message
                    },
                }
            })?;
        envelope.validate()?;
        Ok(envelope)
    }

    /// Serializes the envelope to compact JSON.
    pub fn to_json(&self) -> String {
        // Serializing a struct of strings, numbers and a serde_json::Value cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks every field that wsgw routes or indexes on. `content` is free-form JSON.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        if let Some(id) = &self.message_id {
            validate_message_id(id)?;
        }
        validate_type_name("businessType", &self.business_type)?;
        validate_type_name("messageType", &self.message_type)?;
        if let Some(value) = &self.from_unique_id {
            identity::validate_unique_id("fromUniqueId", value)?;
        }
        if let Some(value) = &self.from_client_type {
            identity::validate_client_type("fromClientType", value)?;
        }
        if let Some(value) = &self.to_unique_id {
            identity::validate_unique_id("toUniqueId", value)?;
        }
        if let Some(value) = &self.to_client_type {
            identity::validate_client_type("toClientType", value)?;
        }
        validate_tags("tags", &self.tags)?;
        validate_tags("businesses", &self.businesses)?;
        Ok(())
    }

    /// The single identity a direct message is addressed to, when both toUniqueId and toClientType are set.
    pub fn recipient(&self) -> Result<Identity, EnvelopeError> {
        let unique_id = self.to_unique_id.as_deref().ok_or(EnvelopeError::Missing {
            field: "toUniqueId",
            reason: "a direct message needs the recipient's uniqueId".to_owned(),
        })?;
        let client_type = self
            .to_client_type
            .as_deref()
            .ok_or(EnvelopeError::Missing {
                field: "toClientType",
                reason: "a direct message needs the recipient's clientType".to_owned(),
            })?;
        identity::validate_unique_id("toUniqueId", unique_id)?;
        identity::validate_client_type("toClientType", client_type)?;
        Ok(Identity {
            unique_id: unique_id.to_owned(),
            client_type: client_type.to_owned(),
        })
    }

    /// Assigns the messageId (unless the caller gave one) and the timestamp. Called once, by the first
    /// publisher; a redelivery or replay never calls it again, so both stay as they were.
    pub fn stamp_first_publish(&mut self) {
        let id = uuid::Uuid::now_v7();
        if self.message_id.is_none() {
            self.message_id = Some(id.to_string());
        }
        self.timestamp = Some(unix_millis(SystemTime::now()));
    }

    /// The messageId, or an empty string before the first publish.
    pub fn id(&self) -> &str {
        self.message_id.as_deref().unwrap_or("")
    }
}

/// Milliseconds since the Unix epoch; 0 for a clock set before 1970.
pub fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Checks a caller-supplied messageId: 1 to 128 visible ASCII characters.
pub fn validate_message_id(value: &str) -> Result<(), EnvelopeError> {
    let invalid = |reason: String| EnvelopeError::Invalid {
        field: "messageId",
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(invalid(
            "it is empty; omit it to let wsgw assign one".to_owned(),
        ));
    }
    if value.len() > MAX_MESSAGE_ID_LEN {
        return Err(invalid(format!(
            "it is {} bytes long; use at most {MAX_MESSAGE_ID_LEN}",
            value.len()
        )));
    }
    if let Some(bad) = value.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(invalid(format!(
            "character {bad:?} is not allowed; use visible ASCII characters"
        )));
    }
    Ok(())
}

/// Checks a businessType or messageType. They form the routing key `<businessType>.<messageType>`, so they
/// hold no dots or wildcards.
fn validate_type_name(field: &'static str, value: &str) -> Result<(), EnvelopeError> {
    let invalid = |reason: String| EnvelopeError::Invalid {
        field,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(EnvelopeError::Missing {
            field,
            reason: "it is empty; name the business (payment) or the event (PAYMENT_SUCCEEDED)"
                .to_owned(),
        });
    }
    if value.len() > MAX_TYPE_NAME_LEN {
        return Err(invalid(format!(
            "it is {} bytes long; use at most {MAX_TYPE_NAME_LEN}",
            value.len()
        )));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
    {
        return Err(invalid(format!(
            "character {bad:?} is not allowed; use letters, digits, - and _"
        )));
    }
    Ok(())
}

/// Checks tags or businesses. Each is a word of a topic routing key, so it holds any UTF-8 except dots,
/// the wildcards `*` and `#`, and control characters.
pub fn validate_tags(field: &'static str, values: &[String]) -> Result<(), EnvelopeError> {
    if values.len() > MAX_TAGS {
        return Err(EnvelopeError::Invalid {
            field,
            value: format!("{} entries", values.len()),
            reason: format!("use at most {MAX_TAGS} entries"),
        });
    }
    for value in values {
        let invalid = |reason: String| EnvelopeError::Invalid {
            field,
            value: value.clone(),
            reason,
        };
        if value.is_empty() {
            return Err(invalid("an entry is empty; remove it".to_owned()));
        }
        if value.len() > MAX_TAG_LEN {
            return Err(invalid(format!(
                "use at most {MAX_TAG_LEN} bytes per entry"
            )));
        }
        if let Some(bad) = value
            .chars()
            .find(|c| matches!(c, '.' | '*' | '#') || c.is_control())
        {
            return Err(invalid(format!(
                "character {bad:?} is not allowed in an entry"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_content_survive_a_round_trip() {
        let text = r#"{"sendType":"SERVER_TO_CLIENT","messageType":"m","businessType":"b","toUniqueId":"u",
            "toClientType":"h5","content":[1.2345672456389011e+20,0.1,12.5,18446744073709551615,-9007199254740993]}"#;
        let envelope = Envelope::from_json(text).expect("valid envelope");
        let again = Envelope::from_json(&envelope.to_json()).expect("valid envelope");
        assert_eq!(again, envelope);
        assert_eq!(envelope.content[0].as_f64(), Some(1.2345672456389011e20));
        assert_eq!(envelope.content[3].as_u64(), Some(u64::MAX));
        assert_eq!(envelope.content[4].as_i64(), Some(-9_007_199_254_740_993));
    }

    fn sample() -> Envelope {
        Envelope::from_json(
            r#"{"sendType":"SERVER_TO_CLIENT","messageType":"QR_REFRESH","businessType":"qrcode",
                "toUniqueId":"post-0042","toClientType":"charger","content":{"text":"二维码已刷新"},
                "tags":["站点A"]}"#,
        )
        .expect("valid envelope")
    }

    #[test]
    fn parse_keeps_utf8_content() {
        let envelope = sample();
        assert_eq!(envelope.content["text"], "二维码已刷新");
        assert_eq!(envelope.tags, vec!["站点A".to_owned()]);
        let again = Envelope::from_json(&envelope.to_json()).expect("round trip");
        assert_eq!(again, envelope);
    }

    #[test]
    fn parse_names_unknown_field() {
        let error = Envelope::from_json(
            r#"{"sendType":"SERVER_TO_CLIENT","messageType":"A","businessType":"b","colour":1}"#,
        )
        .expect_err("unknown field");
        assert!(error.to_string().contains("colour"), "{error}");
    }

    #[test]
    fn parse_names_missing_field() {
        let error = Envelope::from_json(r#"{"sendType":"SERVER_TO_CLIENT","messageType":"A"}"#)
            .expect_err("missing field");
        assert!(error.to_string().contains("businessType"), "{error}");
    }

    #[test]
    fn parse_names_bad_send_type() {
        let error =
            Envelope::from_json(r#"{"sendType":"SIDEWAYS","messageType":"A","businessType":"b"}"#)
                .expect_err("bad sendType");
        assert_eq!(error.field(), "sendType");
    }

    #[test]
    fn business_type_rejects_dot() {
        let mut envelope = sample();
        envelope.business_type = "pay.ment".to_owned();
        let error = envelope.validate().expect_err("dot");
        assert_eq!(error.field(), "businessType");
    }

    #[test]
    fn recipient_requires_client_type() {
        let mut envelope = sample();
        envelope.to_client_type = None;
        assert_eq!(
            envelope.recipient().expect_err("missing").field(),
            "toClientType"
        );
    }

    #[test]
    fn stamp_keeps_caller_id_and_orders_generated_ids() {
        let mut first = sample();
        first.message_id = Some("caller-1".to_owned());
        first.stamp_first_publish();
        assert_eq!(first.id(), "caller-1");

        let mut previous = String::new();
        for _ in 0..1000 {
            let mut envelope = sample();
            envelope.stamp_first_publish();
            assert!(envelope.id() > previous.as_str(), "ids must increase");
            previous = envelope.id().to_owned();
        }
    }
}
