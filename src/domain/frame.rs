//! Wire frames of the `wsgw.v1` WebSocket subprotocol.
//!
//! Every frame is a JSON text frame with a `type` field, so control frames (welcome, ack, error) are told apart
//! from business messages without looking inside `content`. docs/protocol.md describes each frame with an example.

use serde::{Deserialize, Serialize};

use super::envelope::Envelope;

/// The subprotocol name a client offers in `Sec-WebSocket-Protocol`.
pub const PROTOCOL_V1: &str = "wsgw.v1";

/// Close codes the gateway sends. Codes 4000-4999 are reserved for applications by RFC 6455.
pub mod close_code {
    /// A newer connection for the same identity took over. Clients do not reconnect on this code.
    pub const REPLACED: u16 = 4001;
    /// An operator closed the session. Clients reconnect later, with backoff.
    pub const KICKED: u16 = 4002;
    /// The client did not answer a ping within the pong timeout.
    pub const PONG_TIMEOUT: u16 = 4003;
    /// The client did not read fast enough; its messages stay in its mailbox.
    pub const SLOW_CLIENT: u16 = 4004;
    /// The gateway lost its message broker; the client reconnects with backoff.
    pub const BROKER_UNAVAILABLE: u16 = 1013;
    /// The gateway is shutting down; the client reconnects, possibly to another node.
    pub const GOING_AWAY: u16 = 1001;
    /// A message from the client exceeded `session.max_message_size`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The client broke the protocol too often (for example, repeated invalid frames), or its connection used a
    /// token another connection had already used.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A text frame from the client was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The client broke the WebSocket framing rules (for example, an unknown opcode or an unmasked frame).
    pub const PROTOCOL_ERROR: u16 = 1002;
}

/// Error codes carried by [`ServerFrame::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The frame was not valid JSON or not a known frame type.
    InvalidFrame,
    /// An envelope field was invalid; the reason names it.
    InvalidEnvelope,
    /// An ack or reject named a messageId that is not waiting for an ack on this session.
    UnknownMessageId,
    /// The frame type is valid but this gateway does not handle it.
    Unsupported,
    /// The broker did not route the message to any queue.
    Unroutable,
    /// The broker refused the message (for example, a full queue).
    Refused,
    /// The broker did not confirm in time, or is unreachable; retry with the same messageId.
    Unavailable,
    /// The sender may not message that recipient.
    Forbidden,
    /// The client sent more messages than `session.rate_limit` allows; resend later with the same messageId.
    RateLimited,
}

/// A frame the gateway sends to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerFrame {
    /// First frame of every session.
    #[serde(rename_all = "camelCase")]
    Welcome {
        session_id: String,
        node: String,
        unique_id: String,
        client_type: String,
        protocol: String,
        /// Maximum number of messages pushed before the client acks any of them.
        pending_ack_window: u16,
    },
    /// A business message. The client acks it with `{"type":"ack","messageId":...}`.
    #[serde(rename_all = "camelCase")]
    Message {
        /// True when the message may have reached a client before (same messageId and timestamp).
        redelivered: bool,
        /// How often an operator re-published the message from the dead-letter queue.
        replay_count: u32,
        message: Envelope,
    },
    /// Confirms that a message the client sent was accepted by the broker.
    #[serde(rename_all = "camelCase")]
    Ack { message_id: String },
    /// A request failed; `messageId` names the message when there is one.
    #[serde(rename_all = "camelCase")]
    Error {
        code: ErrorCode,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
    },
}

/// A frame a client sends to the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ClientFrame {
    /// The client processed the message; the gateway now acks it in RabbitMQ.
    #[serde(rename_all = "camelCase")]
    Ack { message_id: String },
    /// The client cannot process the message.
    #[serde(rename_all = "camelCase")]
    Reject {
        message_id: String,
        #[serde(default)]
        reason: String,
    },
    /// A message the client sends to the server or to another client.
    #[serde(rename_all = "camelCase")]
    Send { message: Box<Envelope> },
}

impl ServerFrame {
    /// Serializes the frame to compact JSON.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: no maps with non-string keys, no fallible Serialize impls.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl ClientFrame {
    /// Serializes the frame to compact JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ack_parses() {
        let frame: ClientFrame =
            serde_json::from_str(r#"{"type":"ack","messageId":"m1"}"#).expect("valid ack");
        assert_eq!(
            frame,
            ClientFrame::Ack {
                message_id: "m1".to_owned()
            }
        );
    }

    #[test]
    fn server_error_serializes_code() {
        let frame = ServerFrame::Error {
            code: ErrorCode::UnknownMessageId,
            reason: "r".to_owned(),
            message_id: Some("m".to_owned()),
        };
        assert_eq!(
            frame.to_json(),
            r#"{"type":"error","code":"UNKNOWN_MESSAGE_ID","reason":"r","messageId":"m"}"#
        );
    }
}
