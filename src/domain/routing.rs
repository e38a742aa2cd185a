//! Routing rules: where a message goes, decided from its envelope alone.
//!
//! - CLIENT_TO_SERVER goes to the business services, by routing key `<businessType>.<messageType>`.
//! - SERVER_TO_CLIENT and CLIENT_TO_CLIENT with toUniqueId go to one identity when toClientType is set, else to
//!   every client type of that uniqueId.
//! - SERVER_TO_CLIENT with tags or businesses and no toUniqueId is a broadcast to the connected clients whose
//!   token carries any of them.

use super::envelope::{Envelope, EnvelopeError, SendType};
use super::identity::Identity;

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The mailbox of one identity.
    Identity(Identity),
    /// The mailboxes of every client type of one uniqueId that has a mailbox.
    AllClientTypes(String),
    /// The business services bound to the inbound exchange.
    Server { routing_key: String },
    /// The clients connected now whose token carries any of the tags or businesses.
    Broadcast {
        tags: Vec<String>,
        businesses: Vec<String>,
    },
}

impl Destination {
    /// True for destinations with the at-least-once guarantee (mailboxes).
    pub fn is_direct(&self) -> bool {
        matches!(
            self,
            Destination::Identity(_) | Destination::AllClientTypes(_)
        )
    }
}

/// Decides the destination of a validated envelope.
pub fn destination(envelope: &Envelope) -> Result<Destination, EnvelopeError> {
    if envelope.to_client_type.is_some() && envelope.to_unique_id.is_none() {
        return Err(EnvelopeError::Missing {
            field: "toUniqueId",
            reason: "toClientType is set, so the recipient's uniqueId is needed too".to_owned(),
        });
    }
    match envelope.send_type {
        SendType::ClientToServer => Ok(Destination::Server {
            routing_key: format!("{}.{}", envelope.business_type, envelope.message_type),
        }),
        SendType::ServerToClient | SendType::ClientToClient => {
            match (&envelope.to_unique_id, &envelope.to_client_type) {
                (Some(_), Some(_)) => Ok(Destination::Identity(envelope.recipient()?)),
                (Some(unique_id), None) => Ok(Destination::AllClientTypes(unique_id.clone())),
                (None, _)
                    if envelope.send_type == SendType::ServerToClient
                        && (!envelope.tags.is_empty() || !envelope.businesses.is_empty()) =>
                {
                    Ok(Destination::Broadcast {
                        tags: envelope.tags.clone(),
                        businesses: envelope.businesses.clone(),
                    })
                }
                (None, _) => Err(EnvelopeError::Missing {
                    field: "toUniqueId",
                    reason: if envelope.send_type == SendType::ServerToClient {
                        "give the recipient's uniqueId, or tags or businesses for a broadcast"
                            .to_owned()
                    } else {
                        "a CLIENT_TO_CLIENT message needs the recipient's uniqueId".to_owned()
                    },
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(json: &str) -> Envelope {
        Envelope::from_json(json).expect("valid envelope")
    }

    #[test]
    fn client_to_server_uses_topic_key() {
        let e = envelope(
            r#"{"sendType":"CLIENT_TO_SERVER","businessType":"payment","messageType":"REFRESH_QR"}"#,
        );
        assert_eq!(
            destination(&e),
            Ok(Destination::Server {
                routing_key: "payment.REFRESH_QR".to_owned()
            })
        );
    }

    #[test]
    fn unique_id_without_type_reaches_all_types() {
        let e = envelope(
            r#"{"sendType":"SERVER_TO_CLIENT","businessType":"b","messageType":"m","toUniqueId":"u1"}"#,
        );
        assert_eq!(
            destination(&e),
            Ok(Destination::AllClientTypes("u1".to_owned()))
        );
    }

    #[test]
    fn tags_without_recipient_broadcast() {
        let e = envelope(
            r#"{"sendType":"SERVER_TO_CLIENT","businessType":"b","messageType":"m","tags":["vip"]}"#,
        );
        assert!(matches!(destination(&e), Ok(Destination::Broadcast { .. })));
    }

    #[test]
    fn no_recipient_and_no_tags_names_to_unique_id() {
        let e = envelope(r#"{"sendType":"SERVER_TO_CLIENT","businessType":"b","messageType":"m"}"#);
        assert_eq!(destination(&e).expect_err("missing").field(), "toUniqueId");
        let e = envelope(
            r#"{"sendType":"CLIENT_TO_CLIENT","businessType":"b","messageType":"m","tags":["x"]}"#,
        );
        assert_eq!(destination(&e).expect_err("missing").field(), "toUniqueId");
    }
}
