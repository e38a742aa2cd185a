//! The broker port: what the gateway and the command line need from a message broker.
//!
//! [`rabbit`] implements it over RabbitMQ, [`memory`] in process for a single node without RabbitMQ. The
//! guarantees every adapter keeps, checked by one contract test suite: a direct publish returns `Ok` only after
//! the broker accepted and routed the message; a delivery leaves its mailbox only when its acker acks it;
//! releasing a [`Subscription`] returns every unacked delivery to its mailbox, in order, marked redelivered; one
//! mailbox has at most one active consumer at a time; broadcasts are at-most-once.

pub mod dlq;
pub mod memory;
pub mod rabbit;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::domain::{Destination, Envelope, Identity};

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
    /// When the gateway itself dead-lettered the message, in ms since the Unix epoch.
    pub const DEAD_LETTERED_AT: &str = "x-wsgw-dead-lettered-at";
    /// The recipient identity, `uniqueId/clientType`.
    pub const RECIPIENT: &str = "x-wsgw-recipient";
}

/// A message ready to publish: the envelope is already stamped with its messageId and timestamp.
#[derive(Debug, Clone)]
pub struct Publication {
    pub envelope: Envelope,
    pub destination: Destination,
    /// How often the message was re-published from the dead-letter queue; 0 for a first publish.
    pub replay_count: u32,
}

impl Publication {
    /// Routes a validated, stamped envelope by the routing rules.
    pub fn new(envelope: Envelope) -> Result<Publication, crate::domain::EnvelopeError> {
        let destination = crate::domain::routing::destination(&envelope)?;
        Ok(Publication {
            envelope,
            destination,
            replay_count: 0,
        })
    }
}

/// A delivery receipt: the client that acked a message, where and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    pub message_id: String,
    pub unique_id: String,
    pub client_type: String,
    pub node: String,
    /// When the client acked, in ms since the Unix epoch.
    pub acked_at: u64,
}

/// A tag or business that a node's broadcast queue is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BroadcastKey {
    Tag(String),
    Business(String),
}

impl BroadcastKey {
    /// The message header that carries this key, and the binding argument that matches it.
    pub fn header(&self) -> String {
        match self {
            BroadcastKey::Tag(tag) => format!("t:{tag}"),
            BroadcastKey::Business(business) => format!("b:{business}"),
        }
    }

    /// Every key a broadcast envelope carries.
    pub fn all_of(envelope: &Envelope) -> Vec<BroadcastKey> {
        let tags = envelope.tags.iter().cloned().map(BroadcastKey::Tag);
        let businesses = envelope
            .businesses
            .iter()
            .cloned()
            .map(BroadcastKey::Business);
        tags.chain(businesses).collect()
    }
}

/// A publication the broker confirmed and routed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    pub message_id: String,
    pub timestamp: u64,
}

/// A failed broker operation. Each message names what to do next.
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
        "RabbitMQ is blocking publishers ({reason}), so message {message_id} was not confirmed within {timeout}; it may still be queued once the broker unblocks, so free broker memory or disk, then retry with the same messageId"
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
    #[error("message {message_id} was not routed to any queue (routing key {routing_key:?}); {}", unroutable_outcome(*parked))]
    Unroutable {
        message_id: String,
        routing_key: String,
        /// True when the message was copied to the dead-letter queue.
        parked: bool,
    },
    #[error(
        "message {message_id} was not accepted: the in-process broker holds its maximum of {limit} messages; consume or wait, or use RabbitMQ"
    )]
    MemoryFull { message_id: String, limit: usize },
    #[error(
        "mailbox {queue} exists with other arguments ({reason}); set [mailbox] back to the values it was declared with, or move to a new amqp.prefix"
    )]
    MailboxMismatch { queue: String, reason: String },
    #[error("RabbitMQ {operation} on {object} failed: {reason}")]
    Operation {
        operation: &'static str,
        object: String,
        reason: String,
    },
}

fn unroutable_outcome(parked: bool) -> &'static str {
    if parked {
        "it was parked in the dead-letter queue with reason unroutable: no client of that uniqueId has a mailbox yet, so give the recipient's clientType (toClientType, or --to-client-type), or let the recipient connect once and then replay it from the dead-letter queue (wsgw replay-dlq replay)"
    } else {
        "no consumer is bound for it, so nothing was stored; bind a business queue to the inbound exchange, then retry"
    }
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
    /// Where to send the delivery receipt when the client acks, if the publisher asked for one.
    pub reply_to: Option<String>,
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

/// Exponential backoff with jitter for reconnects and resubscribes.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    /// Failed attempts since the last success.
    pub failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
            failures: 0,
        }
    }

    /// The delay before the next attempt after a failure: a random point between half the current step and the
    /// full step, so that many sessions do not retry in lockstep. Doubles the step, up to the maximum.
    pub fn fail(&mut self) -> Duration {
        self.failures += 1;
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    /// Resets after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
        self.failures = 0;
    }
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
        /// Nonce of the session's token and its expiry, so every node rejects the token from now on.
        #[serde(default)]
        token_nonce: Option<String>,
        #[serde(default)]
        token_expires_at_ms: u64,
    },
    /// A node is alive. Nodes remember their peers, so `wsgw sessions` can name the ones that do not reply.
    #[serde(rename_all = "camelCase")]
    Heartbeat { node: String },
    /// Every node replies with its live sessions ([`ControlReply::Sessions`]).
    #[serde(rename_all = "camelCase")]
    ListSessions { request_id: String },
    /// The node holding the session closes it with the kicked code and replies ([`ControlReply::Kick`]).
    #[serde(rename_all = "camelCase")]
    Kick {
        request_id: String,
        session_id: String,
    },
}

/// A control message with the address to reply to, when the sender expects a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlEnvelope {
    pub message: ControlMessage,
    pub reply_to: Option<String>,
}

/// A node's reply to a control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ControlReply {
    #[serde(rename_all = "camelCase")]
    Sessions {
        request_id: String,
        node: String,
        sessions: Vec<SessionView>,
        /// Other nodes this node heard a heartbeat from recently.
        peers: Vec<String>,
    },
    #[serde(rename_all = "camelCase")]
    Kick {
        request_id: String,
        node: String,
        kicked: bool,
    },
}

/// One live session as `wsgw sessions` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub session_id: String,
    pub unique_id: String,
    pub client_type: String,
    pub node: String,
    pub remote: String,
    /// When the session opened, in ms since the Unix epoch.
    pub connected_at: u64,
    pub pushed: u64,
    pub acked: u64,
    pub pending: u64,
    pub tags: Vec<String>,
    pub businesses: Vec<String>,
}

/// What the gateway needs from a message broker.
pub trait Broker: Send + Sync + 'static {
    /// Publishes with a confirm. For a direct destination, `Ok` means the broker stored and routed the message.
    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<Published, BrokerError>>;

    /// Publishes like [`Broker::publish`], then waits up to `wait` for the receipt of the first client that
    /// acks the message. `None` means no client acked in time; the message is still queued.
    fn publish_and_wait(
        &self,
        publication: Publication,
        wait: Duration,
    ) -> BoxFuture<'_, Result<(Published, Option<Receipt>), BrokerError>>;

    /// Sends a receipt to the publisher that asked for it. Best effort: a receipt whose publisher is gone is
    /// dropped.
    fn send_receipt(&self, reply_to: String, receipt: Receipt) -> BoxFuture<'_, ()>;

    /// Replies to a control request. Best effort: the requester may be gone.
    fn send_control_reply(&self, reply_to: String, reply: ControlReply) -> BoxFuture<'_, ()>;

    /// Starts consuming `identity`'s mailbox with at most `prefetch` unacked deliveries. The consumer becomes
    /// active only when no other consumer of that mailbox is (single active consumer).
    fn subscribe(
        &self,
        identity: &Identity,
        consumer_tag: &str,
        prefetch: u16,
    ) -> BoxFuture<'_, Result<Subscription, BrokerError>>;

    /// Broadcasts that reached this node.
    fn broadcasts(&self) -> broadcast::Receiver<Arc<Envelope>>;

    /// Makes broadcasts carrying `key` reach this node.
    fn bind_broadcast(&self, key: BroadcastKey) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Stops broadcasts carrying `key` from reaching this node (other keys may still bring them).
    fn unbind_broadcast(&self, key: BroadcastKey) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Consumes client-to-server messages whose routing key matches `binding_key` (`*` one word, `#` any
    /// number), through the named durable queue: what a business service does.
    fn consume_inbound(
        &self,
        queue: &str,
        binding_key: &str,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Delivery>, BrokerError>>;

    /// Sends a control message to every node, this one included.
    fn announce(&self, message: ControlMessage) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Control messages from all nodes.
    fn control_messages(&self) -> broadcast::Receiver<ControlEnvelope>;

    /// True while the broker can take publishes and serve consumers.
    fn is_ready(&self) -> bool;

    /// True while the broker blocks this node's publishers (a memory or disk alarm).
    fn is_blocked(&self) -> bool {
        false
    }

    /// Closes the broker connections cleanly.
    fn close(&self) -> BoxFuture<'_, ()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_max() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let first = backoff.fail();
        assert!(
            first >= Duration::from_millis(50) && first <= Duration::from_millis(100),
            "{first:?}"
        );
        let second = backoff.fail();
        assert!(
            second >= Duration::from_millis(100) && second <= Duration::from_millis(200),
            "{second:?}"
        );
        for _ in 0..5 {
            assert!(backoff.fail() <= Duration::from_millis(400));
        }
        assert_eq!(backoff.failures, 7);
        backoff.reset();
        assert!(backoff.fail() <= Duration::from_millis(100));
    }
}
