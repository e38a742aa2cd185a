//! What the gateway makes of one text frame from a client, before any I/O.
//!
//! [`classify`] is pure: it parses the frame, stamps a message the client sends with the sender's identity,
//! validates and routes it, and applies the client-to-client policy. The session then acts on the result. Keeping
//! this step free of sockets and brokers lets the fuzzer run it millions of times (docs/fuzzing.md).

use crate::broker::Publication;
use crate::config::PolicyConfig;
use crate::domain::frame::ErrorCode;
use crate::domain::{ClientFrame, Destination, Envelope, Identity, SendType, ServerFrame};

/// The action one client frame asks for.
#[derive(Debug)]
pub enum Inbound {
    /// The client processed this message.
    Ack { message_id: String },
    /// The client cannot process this message.
    Reject { message_id: String, reason: String },
    /// A valid message to publish, stamped with the sender's identity, a messageId and a timestamp.
    Publish(Box<Publication>),
    /// A frame that breaks the protocol; the session replies with this error frame and counts it.
    Invalid(ServerFrame),
    /// A well-formed message the policy forbids; the session replies with this error frame.
    Forbidden(ServerFrame),
}

/// Classifies one text frame from `sender`.
pub fn classify(text: &str, sender: &Identity, policy: &PolicyConfig) -> Inbound {
    let frame: ClientFrame = match serde_json::from_str(text) {
        Ok(frame) => frame,
        Err(error) => {
            // serde quotes offending values in full; a client gets back at most a short excerpt.
            let error = error.to_string();
            let excerpt = crate::domain::envelope::cut(&error, 256);
            return Inbound::Invalid(error_frame(
                ErrorCode::InvalidFrame,
                format!("invalid frame: {excerpt}; see the wsgw.v1 protocol for the frame types"),
                None,
            ));
        }
    };
    match frame {
        ClientFrame::Ack { message_id } => Inbound::Ack { message_id },
        ClientFrame::Reject { message_id, reason } => Inbound::Reject { message_id, reason },
        ClientFrame::Send { message } => classify_send(*message, sender, policy),
    }
}

fn classify_send(mut envelope: Envelope, sender: &Identity, policy: &PolicyConfig) -> Inbound {
    // Identity and order key come from the gateway, whatever the frame claimed.
    envelope.from_unique_id = Some(sender.unique_id.clone());
    envelope.from_client_type = Some(sender.client_type.clone());
    envelope.timestamp = None;
    // A messageId too long to be valid is not echoed back.
    let claimed_id = envelope
        .message_id
        .clone()
        .filter(|id| id.len() <= crate::domain::envelope::MAX_MESSAGE_ID_LEN);
    if let Err(error) = envelope.validate() {
        return Inbound::Invalid(error_frame(
            ErrorCode::InvalidEnvelope,
            error.to_string(),
            claimed_id,
        ));
    }
    if envelope.send_type == SendType::ServerToClient {
        return Inbound::Invalid(error_frame(
            ErrorCode::Forbidden,
            "clients may send CLIENT_TO_SERVER or CLIENT_TO_CLIENT messages only".to_owned(),
            claimed_id,
        ));
    }
    envelope.stamp_first_publish();
    let message_id = envelope.id().to_owned();
    let publication = match Publication::new(envelope) {
        Ok(publication) => publication,
        Err(error) => {
            return Inbound::Invalid(error_frame(
                ErrorCode::InvalidEnvelope,
                error.to_string(),
                Some(message_id),
            ));
        }
    };
    if publication.envelope.send_type == SendType::ClientToClient {
        let to = match &publication.destination {
            Destination::Identity(identity) => Some(identity.client_type.as_str()),
            _ => None,
        };
        if !policy.allows(&sender.client_type, to) {
            let reason = format!(
                "clientType {} may not message {}; an operator can allow it in [policy] client_to_client",
                sender.client_type,
                to.unwrap_or("every client type of a uniqueId")
            );
            return Inbound::Forbidden(error_frame(ErrorCode::Forbidden, reason, Some(message_id)));
        }
    }
    Inbound::Publish(Box::new(publication))
}

fn error_frame(code: ErrorCode, reason: String, message_id: Option<String>) -> ServerFrame {
    ServerFrame::Error {
        code,
        reason,
        message_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender() -> Identity {
        Identity::new("user-1", "h5").expect("valid identity")
    }

    fn policy() -> PolicyConfig {
        let mut policy = PolicyConfig::default();
        policy
            .client_to_client
            .insert("h5".to_owned(), vec!["app".to_owned()]);
        policy
    }

    #[test]
    fn send_is_stamped_with_the_token_identity() {
        let text = r#"{"type":"send","message":{"sendType":"CLIENT_TO_SERVER","messageType":"scan",
            "businessType":"pay","fromUniqueId":"someone-else","content":"扫码"}}"#;
        let Inbound::Publish(publication) = classify(text, &sender(), &policy()) else {
            panic!("a valid send is published");
        };
        assert_eq!(
            publication.envelope.from_unique_id.as_deref(),
            Some("user-1")
        );
        assert_eq!(publication.envelope.content, "扫码");
        assert!(publication.envelope.message_id.is_some());
    }

    #[test]
    fn policy_forbids_an_unlisted_recipient_type() {
        let text = r#"{"type":"send","message":{"sendType":"CLIENT_TO_CLIENT","messageType":"hi",
            "businessType":"chat","toUniqueId":"u2","toClientType":"pos"}}"#;
        assert!(matches!(
            classify(text, &sender(), &policy()),
            Inbound::Forbidden(ServerFrame::Error {
                code: ErrorCode::Forbidden,
                ..
            })
        ));
    }

    #[test]
    fn malformed_frames_are_invalid() {
        for text in [
            "",
            "not json",
            r#"{"type":"ping"}"#,
            r#"{"type":"ack","messageId":5}"#,
            r#"{"type":"send","message":{"sendType":"SERVER_TO_CLIENT","messageType":"m","businessType":"b","toUniqueId":"u"}}"#,
            &format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
            r#"{"type":"send","message":{"sendType":"CLIENT_TO_SERVER","messageType":"m","businessType":"b","content":1e999}}"#,
        ] {
            assert!(
                matches!(classify(text, &sender(), &policy()), Inbound::Invalid(_)),
                "{text:.80}"
            );
        }
    }
}
