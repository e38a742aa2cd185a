//! The broker port: what the gateway and the command line need from a message broker.
//!
//! [`rabbit`] implements it over RabbitMQ. The guarantees every adapter keeps: a publish returns `Ok` only
//! after the broker accepted and routed the message; a delivery leaves the broker only when its [`Acker`] acks
//! it; releasing a [`Subscription`] returns every unacked delivery to its mailbox, in order.

pub mod rabbit;

use std::fmt;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::domain::{Envelope, Identity};

/// Header names the gateway stamps on every message at first publish and owns afterwards.
pub mod header {
    /// Exchange the message was first published to.
    pub const ORIGINAL_EXCHANGE: &str = "x-wsgw-original-exchange";
    /// Routing key the message was first published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-wsgw-original-routing-key";
    /// How often the message was re-published from the dead-letter queue.
    pub const REPLAY_COUNT: &str = "x-wsgw-replay-count";
    /// Why the gateway itself dead-lettered the message (for example `unroutable`).
    pub const DEAD_LETTER_REASON: &str = "x-wsgw-dead-letter-reason";
    /// The recipient identity, `uniqueId/clientType`.
    pub const RECIPIENT: &str = "x-wsgw-recipient";
}

/// A message ready to publish: the envelope is already stamped with its messageId and timestamp.
#[derive(Debug, Clone)]
pub struct Publication {
    pub envelope: Envelope,
    pub route: Route,
}

/// Where a publication goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The durable mailbox of one identity.
    Mailbox(Identity),
}

/// A publication the broker confirmed and routed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    pub message_id: String,
    pub timestamp: u64,
}

/// Why a broker operation failed. Each message says what to do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot connect to RabbitMQ at {url}: {reason}; check that it runs and that the URL and credentials are right"
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "RabbitMQ at {url} did not complete the AMQP handshake within {timeout}; the broker is not answering (it may be overloaded or out of file descriptors)"
    )]
    HandshakeTimeout { url: String, timeout: String },
    #[error(
        "RabbitMQ did not confirm message {message_id} within {timeout}; it may or may not be queued, so retry with the same messageId"
    )]
    ConfirmTimeout { message_id: String, timeout: String },
    #[error(
        "RabbitMQ is blocking publishers ({reason}), so message {message_id} was not accepted within {timeout}; free broker memory or disk, then retry"
    )]
    Blocked {
        message_id: String,
        reason: String,
        timeout: String,
    },
    #[error(
        "RabbitMQ refused message {message_id} for queue {queue} (negative confirm); the mailbox may be full, so retry later"
    )]
    Refused { message_id: String, queue: String },
    #[error(
        "message {message_id} was not routed to any queue (routing key {routing_key:?}); it was parked in the dead-letter queue with reason unroutable"
    )]
    Unroutable {
        message_id: String,
        routing_key: String,
    },
    #[error("RabbitMQ {operation} on {object} failed: {reason}")]
    Operation {
        operation: &'static str,
        object: String,
        reason: String,
    },
}

/// Acks, requeues or dead-letters one delivery in the broker it came from.
pub trait DeliveryAcker: Send + Sync {
    /// Removes the delivery from its mailbox. Called only after the client acked it.
    fn ack(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
    /// Returns the delivery to its mailbox for another attempt.
    fn requeue(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
    /// Moves the delivery to the dead-letter queue with reason `rejected`.
    fn dead_letter(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
}

/// One message taken from a mailbox and not yet settled.
pub struct Delivery {
    pub body: Vec<u8>,
    /// The broker-level message id; the envelope inside `body` carries the same one.
    pub message_id: Option<String>,
    /// True when the broker delivered this message before (to this or another consumer).
    pub redelivered: bool,
    pub replay_count: u32,
    pub acker: Box<dyn DeliveryAcker>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message_id", &self.message_id)
            .field("redelivered", &self.redelivered)
            .field("replay_count", &self.replay_count)
            .field("bytes", &self.body.len())
            .finish()
    }
}

/// A consumer of one identity's mailbox.
pub struct Subscription {
    /// Deliveries in mailbox order. The stream ends when the broker cancels the consumer or the connection is
    /// lost.
    pub deliveries: BoxStream<'static, Delivery>,
    /// Cancels the consumer and returns every unacked delivery to the mailbox, in order.
    pub release: BoxFuture<'static, ()>,
}

/// Messages between gateway nodes, over the broker's control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ControlMessage {
    /// A node accepted a new session for `identity`; every other session of that identity closes as replaced.
    #[serde(rename_all = "camelCase")]
    Takeover {
        identity: Identity,
        session_id: String,
        node: String,
    },
}

/// What the gateway needs from a message broker.
pub trait Broker: Send + Sync + 'static {
    /// Publishes with a confirm; `Ok` only when the broker accepted and routed the message.
    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<Published, BrokerError>>;

    /// Starts consuming `identity`'s mailbox with at most `prefetch` unacked deliveries.
    fn subscribe(
        &self,
        identity: &Identity,
        consumer_tag: &str,
        prefetch: u16,
    ) -> BoxFuture<'_, Result<Subscription, BrokerError>>;

    /// Sends a control message to every node, this one included.
    fn announce(&self, message: ControlMessage) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Control messages from all nodes.
    fn control_messages(&self) -> broadcast::Receiver<ControlMessage>;

    /// True while the broker can take publishes and serve consumers.
    fn is_ready(&self) -> bool;

    /// Closes the broker connections cleanly.
    fn close(&self) -> BoxFuture<'_, ()>;
}
