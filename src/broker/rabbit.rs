//! The RabbitMQ adapter of the broker port (lapin).
//!
//! Topology, all under the configured prefix and declared idempotently on the channel that uses it:
//! - `<prefix>.mailbox.<clientType>.<uniqueId>`: one durable mailbox per identity, with a message TTL, an idle
//!   expiry, a length limit that rejects publishes, single-active-consumer and the dead-letter exchange.
//!   Publishers reach it through the default exchange by name, so it needs no binding.
//! - `<prefix>.direct` (direct): each mailbox is bound with its uniqueId, so one publish reaches every client
//!   type of a uniqueId.
//! - `<prefix>.inbound` (topic): client-to-server messages by `<businessType>.<messageType>`; business services
//!   bind their own queues.
//! - `<prefix>.broadcast` (headers, `x-match: any`) and one exclusive `<prefix>.broadcast.<node>` queue per node,
//!   bound once per tag (`t:<tag>`) and business (`b:<business>`) of the node's clients.
//! - `<prefix>.dlx` (fanout) and `<prefix>.dlq`: the dead-letter exchange and queue.
//! - `<prefix>.control` (fanout) and one exclusive `<prefix>.control.<node>` queue per node: control messages.
//! - Receipts use RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`).
//!
//! Publishes and consumes run on separate connections, because RabbitMQ blocks only connections that publish and
//! a blocked connection would stall the consumers' acks too.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Instant;

use futures_util::future::{self, BoxFuture, FutureExt};
use futures_util::stream::BoxStream;
use futures_util::stream::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event, ExchangeKind,
};
use tokio::sync::{Mutex, broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Backoff, BroadcastKey, Broker, BrokerError, ControlEnvelope, ControlMessage, ControlReply,
    Delivery, DeliveryAcker, Publication, Published, Receipt, Subscription, header,
};
use crate::config::{AmqpConfig, MailboxConfig, PublisherMode, QueueType, redact_url, redact_urls};
use crate::domain::{Destination, Envelope, Identity};

/// Queue and exchange names under one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
}

impl Topology {
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.prefix)
    }

    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.prefix)
    }

    pub fn control_queue(&self, node: &str) -> String {
        format!("{}.control.{node}", self.prefix)
    }

    pub fn direct_exchange(&self) -> String {
        format!("{}.direct", self.prefix)
    }

    pub fn inbound_exchange(&self) -> String {
        format!("{}.inbound", self.prefix)
    }

    pub fn broadcast_exchange(&self) -> String {
        format!("{}.broadcast", self.prefix)
    }

    pub fn broadcast_queue(&self, node: &str) -> String {
        format!("{}.broadcast.{node}", self.prefix)
    }

    /// Exchange and routing key a destination is published with. Mailboxes are reached through the default
    /// exchange by name.
    pub fn address(&self, destination: &Destination) -> (String, String) {
        match destination {
            Destination::Identity(identity) => {
                (String::new(), identity.mailbox_queue(&self.prefix))
            }
            Destination::AllClientTypes(unique_id) => (self.direct_exchange(), unique_id.clone()),
            Destination::Server { routing_key } => (self.inbound_exchange(), routing_key.clone()),
            Destination::Broadcast { .. } => (self.broadcast_exchange(), String::new()),
        }
    }
}

/// The reply-to pseudo-queue of RabbitMQ's direct reply-to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Arguments of every mailbox queue. A mailbox declared with other arguments makes RabbitMQ reject the
/// redeclare (406), so these must only change together with a migration.
///
/// Quorum mailboxes take the same arguments as classic ones (RabbitMQ 3.10 supports message TTL, queue expiry,
/// `reject-publish` and single-active-consumer on quorum queues) except `x-queue-version`, which RabbitMQ
/// rejects for them. They add a delivery limit and at-least-once dead-lettering, which needs `reject-publish`.
pub fn mailbox_arguments(mailbox: &MailboxConfig, topology: &Topology) -> FieldTable {
    let mut arguments = FieldTable::default();
    match mailbox.queue_type {
        QueueType::Classic => {
            arguments.insert("x-queue-version".into(), AMQPValue::LongInt(2));
        }
        QueueType::Quorum => {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            arguments.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(mailbox.delivery_limit)),
            );
            arguments.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
        }
    }
    // NOTE: a quorum queue's idle expiry is not renewed by a redeclare or a publish (observed on RabbitMQ
    // 3.10.8): a quorum mailbox expires `expires` after its last consumer left, with any messages in it.
    arguments.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(mailbox.message_ttl.as_millis() as i64),
    );
    arguments.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(mailbox.expires.as_millis() as i64),
    );
    arguments.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::from(mailbox.max_length)),
    );
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(topology.dead_letter_exchange().into()),
    );
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    arguments
}

/// Arguments of the dead-letter queue: of the mailboxes' queue type, so that with quorum mailboxes it too
/// survives the loss of a node.
fn dead_letter_queue_arguments(mailbox: &MailboxConfig) -> FieldTable {
    let mut arguments = FieldTable::default();
    match mailbox.queue_type {
        QueueType::Classic => {
            arguments.insert("x-queue-version".into(), AMQPValue::LongInt(2));
        }
        QueueType::Quorum => {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
    }
    arguments
}

/// The AMQP URLs of the RabbitMQ nodes a process connects to, with the node to try first. Clones share that
/// position, so after a failover the process's later connections go to the same node.
#[derive(Clone)]
pub struct BrokerNodes {
    urls: Arc<[String]>,
    /// Index of the node to try first: the last one that accepted a connection, or the one after a node
    /// whose connection failed or was lost.
    preferred: Arc<AtomicUsize>,
}

impl BrokerNodes {
    /// Returns None for an empty list.
    pub fn new(urls: Vec<String>) -> Option<BrokerNodes> {
        if urls.is_empty() {
            return None;
        }
        Some(BrokerNodes {
            urls: urls.into(),
            preferred: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Returns the nodes of `amqp.urls`, else of `amqp.url`; None when neither is set.
    pub fn from_config(amqp: &AmqpConfig) -> Option<BrokerNodes> {
        Self::new(amqp.node_urls())
    }

    /// Returns the URLs with their passwords replaced, for logs and errors.
    pub fn describe(&self) -> String {
        redact_urls(&self.urls)
    }

    /// Moves the first choice past `node` after a connection to it failed or was lost, unless another
    /// connection has moved it already.
    fn lost(&self, node: usize) {
        let next = (node + 1) % self.urls.len();
        let _ = self
            .preferred
            .compare_exchange(node, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

impl From<&str> for BrokerNodes {
    fn from(url: &str) -> BrokerNodes {
        BrokerNodes {
            urls: vec![url.to_owned()].into(),
            preferred: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl From<&String> for BrokerNodes {
    fn from(url: &String) -> BrokerNodes {
        BrokerNodes::from(url.as_str())
    }
}

impl From<String> for BrokerNodes {
    fn from(url: String) -> BrokerNodes {
        BrokerNodes::from(url.as_str())
    }
}

impl std::fmt::Debug for BrokerNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerNodes")
            .field("urls", &self.describe())
            .field("preferred", &self.preferred.load(Ordering::Relaxed))
            .finish()
    }
}

/// Opens a connection to the first node that accepts one, trying every node once, starting with the
/// preferred node.
pub async fn open_connection(
    nodes: &BrokerNodes,
    amqp: &AmqpConfig,
    name: &str,
) -> Result<Connection, BrokerError> {
    open_node_connection(nodes, amqp, name)
        .await
        .map(|(connection, _)| connection)
}

/// [`open_connection`], also returning the index of the node connected to, so that its loss can be reported
/// with [`BrokerNodes::lost`].
async fn open_node_connection(
    nodes: &BrokerNodes,
    amqp: &AmqpConfig,
    name: &str,
) -> Result<(Connection, usize), BrokerError> {
    let count = nodes.urls.len();
    let first = nodes.preferred.load(Ordering::Relaxed) % count;
    let mut failures = Vec::new();
    for offset in 0..count {
        let node = (first + offset) % count;
        let url = &nodes.urls[node];
        match connect_to_node(url, amqp, name).await {
            Ok(connection) => {
                nodes.preferred.store(node, Ordering::Relaxed);
                info!(connection = %name, node = %redact_url(url), "connected to RabbitMQ");
                return Ok((connection, node));
            }
            Err(error) => {
                nodes.lost(node);
                if count > 1 {
                    warn!(connection = %name, node = %redact_url(url), %error, "connecting to a RabbitMQ node failed; trying the next node");
                }
                failures.push(error);
            }
        }
    }
    if failures.len() == 1 {
        return Err(failures.remove(0));
    }
    let reasons: Vec<String> = failures
        .iter()
        .map(|failure| match failure {
            BrokerError::Unreachable { url, reason } => format!("{url}: {reason}"),
            BrokerError::HandshakeTimeout { url, timeout } => {
                format!("{url}: no AMQP handshake within {timeout}")
            }
            other => other.to_string(),
        })
        .collect();
    Err(BrokerError::Unreachable {
        url: format!("any of its {count} nodes"),
        reason: reasons.join("; "),
    })
}

/// Opens a connection to one node, bounding the TCP connect and the AMQP handshake by `amqp.connect_timeout`.
async fn connect_to_node(
    url: &str,
    amqp: &AmqpConfig,
    name: &str,
) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(amqp.connect_timeout, Connection::connect(url, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(BrokerError::Unreachable {
            url: redact_url(url),
            reason: error.to_string(),
        }),
        Err(_) => Err(BrokerError::HandshakeTimeout {
            url: redact_url(url),
            timeout: humantime::format_duration(amqp.connect_timeout).to_string(),
        }),
    }
}

fn operation_error(
    operation: &'static str,
    object: &str,
) -> impl FnOnce(lapin::Error) -> BrokerError {
    let object = object.to_owned();
    move |error| BrokerError::Operation {
        operation,
        object,
        reason: error.to_string(),
    }
}

/// The open publisher connection with its two channels. Declares run on their own channel, because a rejected
/// declare closes its channel and would otherwise fail the confirms pending there.
struct PublisherChannels {
    connection: Arc<Connection>,
    /// Index of the node in the publisher's [`BrokerNodes`].
    node: usize,
    confirms: Channel,
    declares: Channel,
}

/// Publishes with confirms on a connection of its own. Reconnects on the next publish after the connection
/// or a channel was lost.
pub struct Publisher {
    nodes: BrokerNodes,
    amqp: AmqpConfig,
    mailbox: MailboxConfig,
    topology: Topology,
    connection_name: String,
    channels: Mutex<Option<PublisherChannels>>,
    connected: Arc<AtomicBool>,
    /// The broker's reason while it blocks this connection (a memory or disk alarm).
    blocked: Arc<StdMutex<Option<String>>>,
    /// When each mailbox was last declared by this publisher, to re-declare it once per `declare_interval`.
    declared: StdMutex<HashMap<String, Instant>>,
    receipts: Mutex<Option<ReceiptChannel>>,
    /// Serializes transactions in transactions mode.
    transaction: Mutex<()>,
}

/// A confirm channel that also consumes direct reply-to receipts, with the publishes waiting for one.
#[derive(Clone)]
struct ReceiptChannel {
    channel: Channel,
    waiters: Arc<StdMutex<HashMap<String, oneshot::Sender<Receipt>>>>,
}

fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bound on the mailbox declare cache; past it, entries older than `declare_interval` are dropped.
const DECLARE_CACHE_LIMIT: usize = 100_000;

impl Publisher {
    /// Connects to the first node of `nodes` that accepts (a URL is a list of one) and declares the shared
    /// topology.
    pub async fn connect(
        nodes: impl Into<BrokerNodes>,
        amqp: &AmqpConfig,
        mailbox: &MailboxConfig,
        connection_name: &str,
    ) -> Result<Publisher, BrokerError> {
        let publisher = Publisher {
            nodes: nodes.into(),
            amqp: amqp.clone(),
            mailbox: mailbox.clone(),
            topology: Topology {
                prefix: amqp.prefix.clone(),
            },
            connection_name: connection_name.to_owned(),
            channels: Mutex::new(None),
            connected: Arc::new(AtomicBool::new(false)),
            blocked: Arc::new(StdMutex::new(None)),
            declared: StdMutex::new(HashMap::new()),
            receipts: Mutex::new(None),
            transaction: Mutex::new(()),
        };
        publisher.channels().await?;
        Ok(publisher)
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// True while RabbitMQ blocks this publisher's connection.
    pub fn is_blocked(&self) -> bool {
        lock(&self.blocked).is_some()
    }

    /// True while the publisher connection is open.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Returns the publishing and declaring channels, reopening them (and the connection) when closed.
    async fn channels(&self) -> Result<(Channel, Channel), BrokerError> {
        let mut guard = self.channels.lock().await;
        if let Some(open) = guard.as_mut() {
            if open.connection.status().connected() {
                if !open.confirms.status().connected() {
                    warn!(connection = %self.connection_name, "publishing channel closed; reopening it");
                    open.confirms =
                        open_publishing_channel(&open.connection, self.amqp.publisher_mode).await?;
                }
                if !open.declares.status().connected() {
                    debug!(connection = %self.connection_name, "declare channel closed; reopening it");
                    open.declares = open_channel(&open.connection).await?;
                }
                return Ok((open.confirms.clone(), open.declares.clone()));
            }
            warn!(connection = %self.connection_name, "publisher connection lost; reconnecting");
            self.nodes.lost(open.node);
            self.connected.store(false, Ordering::Relaxed);
        }
        let (connection, node) =
            open_node_connection(&self.nodes, &self.amqp, &self.connection_name).await?;
        let connection = Arc::new(connection);
        watch_connection(
            &connection,
            self.connected.clone(),
            Some(self.blocked.clone()),
        );
        let confirms = open_publishing_channel(&connection, self.amqp.publisher_mode).await?;
        let declares = open_channel(&connection).await?;
        declare_shared_topology(&declares, &self.topology, &self.mailbox).await?;
        self.connected.store(true, Ordering::Relaxed);
        self.declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        info!(connection = %self.connection_name, "publisher connected to RabbitMQ");
        *guard = Some(PublisherChannels {
            connection,
            node,
            confirms: confirms.clone(),
            declares: declares.clone(),
        });
        Ok((confirms, declares))
    }

    /// Publishes one message with a confirm within `amqp.publish_timeout`.
    ///
    /// When the connection or channel fails before the confirm arrives, the broker may or may not have the
    /// message, so it is published again with the same messageId (the client de-duplicates) until the deadline.
    pub async fn publish(&self, publication: &Publication) -> Result<Published, BrokerError> {
        self.bounded(publication, async {
            let mut backoff = Backoff::new(self.amqp.reconnect_min_backoff, self.amqp.reconnect_max_backoff);
            loop {
                let attempt = async {
                    let (confirms, declares) = self.channels().await?;
                    self.publish_on(&confirms, &declares, publication, None).await
                };
                match attempt.await {
                    Err(
                        error @ (BrokerError::Operation { .. }
                        | BrokerError::Unreachable { .. }
                        | BrokerError::HandshakeTimeout { .. }),
                    ) => {
                        let delay = backoff.fail();
                        warn!(
                            message_id = %publication.envelope.id(),
                            %error,
                            retry_in = ?delay,
                            "publish failed before its confirm; publishing again with the same messageId"
                        );
                        tokio::time::sleep(delay).await;
                    }
                    other => return other,
                }
            }
        })
        .await
    }

    /// Publishes with a reply-to address and waits up to `wait` for the first client's receipt.
    pub async fn publish_and_wait(
        &self,
        publication: &Publication,
        wait: std::time::Duration,
    ) -> Result<(Published, Option<Receipt>), BrokerError> {
        let message_id = publication.envelope.id().to_owned();
        let (receiver, waiters) = self
            .bounded(publication, async {
                let (_, declares) = self.channels().await?;
                let receipts = self.receipt_channel().await?;
                let (sender, receiver) = oneshot::channel();
                lock(&receipts.waiters).insert(message_id.clone(), sender);
                let published = self
                    .publish_on(
                        &receipts.channel,
                        &declares,
                        publication,
                        Some(DIRECT_REPLY_TO),
                    )
                    .await;
                if published.is_err() {
                    lock(&receipts.waiters).remove(&message_id);
                }
                published.map(|published| ((published, receiver), receipts.waiters.clone()))
            })
            .await?;
        let (published, receiver) = receiver;
        let receipt = tokio::time::timeout(wait, receiver)
            .await
            .ok()
            .and_then(Result::ok);
        lock(&waiters).remove(&message_id);
        Ok((published, receipt))
    }

    /// Sends a receipt to a direct reply-to address. Best effort: the publisher may be gone.
    pub async fn send_receipt(&self, reply_to: &str, receipt: &Receipt) {
        let body = serde_json::to_vec(receipt).unwrap_or_default();
        self.send_reply(reply_to, &body, &receipt.message_id).await;
    }

    /// Publishes `body` to a direct reply-to address. Best effort: the requester may be gone.
    pub async fn send_reply(&self, reply_to: &str, body: &[u8], message_id: &str) {
        let result = async {
            let (confirms, _) = self.channels().await?;
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(message_id.into());
            self.publish_raw(&confirms, "", reply_to, false, body, properties)
                .await
                .map_err(operation_error("basic.publish", "reply"))?;
            Ok::<(), BrokerError>(())
        };
        if let Err(error) = tokio::time::timeout(self.amqp.publish_timeout, result)
            .await
            .unwrap_or_else(|_| {
                Err(BrokerError::ConfirmTimeout {
                    message_id: message_id.to_owned(),
                    timeout: humantime::format_duration(self.amqp.publish_timeout).to_string(),
                })
            })
        {
            debug!(%message_id, %error, "sending a reply failed");
        }
    }

    /// Runs a publish within `amqp.publish_timeout`. A timeout while the broker blocks publishers is reported
    /// as blocked.
    async fn bounded<T>(
        &self,
        publication: &Publication,
        publish: impl Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        let timeout = self.amqp.publish_timeout;
        match tokio::time::timeout(timeout, publish).await {
            Ok(result) => result,
            Err(_) => {
                let message_id = publication.envelope.id().to_owned();
                let blocked = lock(&self.blocked).clone();
                let timeout = humantime::format_duration(timeout).to_string();
                Err(match blocked {
                    Some(reason) => BrokerError::Blocked {
                        message_id,
                        reason,
                        timeout,
                    },
                    None => BrokerError::ConfirmTimeout {
                        message_id,
                        timeout,
                    },
                })
            }
        }
    }

    async fn publish_on(
        &self,
        confirms: &Channel,
        declares: &Channel,
        publication: &Publication,
        reply_to: Option<&str>,
    ) -> Result<Published, BrokerError> {
        let envelope = &publication.envelope;
        let message_id = envelope.id().to_owned();
        let timestamp = envelope.timestamp.unwrap_or_default();
        let destination = &publication.destination;
        let (exchange, routing_key) = self.topology.address(destination);

        if let Destination::Identity(identity) = destination {
            // The declare creates the mailbox of an identity that never connected. For a classic mailbox it also
            // counts as use: it resets the idle expiry, so a message published now is not deleted with its
            // queue. A quorum mailbox's expiry is not reset by it (see `mailbox_arguments`).
            self.ensure_mailbox(declares, identity).await?;
        }
        // NOTE: a publish to every client type of a uniqueId does not declare those mailboxes (their client
        // types are unknown here), so it does not reset their idle expiry.

        let mut headers = FieldTable::default();
        headers.insert(
            header::ORIGINAL_EXCHANGE.into(),
            AMQPValue::LongString(exchange.as_str().into()),
        );
        headers.insert(
            header::ORIGINAL_ROUTING_KEY.into(),
            AMQPValue::LongString(routing_key.as_str().into()),
        );
        headers.insert(
            header::REPLAY_COUNT.into(),
            AMQPValue::LongLongInt(i64::from(publication.replay_count)),
        );
        if let Some(recipient) = &envelope.to_unique_id {
            let recipient = match &envelope.to_client_type {
                Some(client_type) => format!("{recipient}/{client_type}"),
                None => recipient.clone(),
            };
            headers.insert(
                header::RECIPIENT.into(),
                AMQPValue::LongString(recipient.into()),
            );
        }
        for key in BroadcastKey::all_of(envelope) {
            if matches!(destination, Destination::Broadcast { .. }) {
                headers.insert(key.header().into(), AMQPValue::LongString("1".into()));
            }
        }
        let mut properties = message_properties(&message_id, timestamp, headers);
        if matches!(destination, Destination::Broadcast { .. }) {
            // Broadcasts are at-most-once to the clients connected now: nothing to keep on disk.
            properties = properties.with_delivery_mode(1);
        }
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        let body = envelope.to_json();
        let mandatory = !matches!(destination, Destination::Broadcast { .. });

        let outcome = self
            .publish_raw(
                confirms,
                &exchange,
                &routing_key,
                mandatory,
                body.as_bytes(),
                properties.clone(),
            )
            .await
            .map_err(operation_error("basic.publish", &routing_key))?;
        match outcome {
            Outcome::Accepted => Ok(Published {
                message_id,
                timestamp,
            }),
            // With the mandatory flag and no route, the broker sends basic.return and then an ack (or
            // commit-ok): the ack alone does not mean the message was queued.
            Outcome::Returned(reply_code) => {
                warn!(
                    message_id = %message_id,
                    exchange = %exchange,
                    routing_key = %routing_key,
                    reply_code,
                    "message returned unroutable"
                );
                // A replay that finds no route leaves its original in the dead-letter queue, so it is not
                // parked a second time.
                let parked = destination.is_direct() && publication.replay_count == 0;
                if parked {
                    self.park_unroutable(confirms, body.as_bytes(), properties)
                        .await;
                }
                Err(BrokerError::Unroutable {
                    message_id,
                    routing_key,
                    parked,
                })
            }
            Outcome::Refused => Err(BrokerError::Refused {
                message_id,
                queue: routing_key,
            }),
        }
    }

    /// Returns the channel that publishes with a reply-to address and consumes the receipts, opening it on
    /// first use.
    async fn receipt_channel(&self) -> Result<ReceiptChannel, BrokerError> {
        let mut guard = self.receipts.lock().await;
        if let Some(open) = guard.as_ref()
            && open.channel.status().connected()
        {
            return Ok(open.clone());
        }
        let connection = {
            let channels = self.channels.lock().await;
            match channels.as_ref() {
                Some(open) => open.connection.clone(),
                None => {
                    return Err(BrokerError::Operation {
                        operation: "channel.open",
                        object: "receipts".to_owned(),
                        reason: "the publisher connection is closed".to_owned(),
                    });
                }
            }
        };
        let channel = open_publishing_channel(&connection, self.amqp.publisher_mode).await?;
        // Direct reply-to: consume the pseudo-queue without acks on the channel that publishes the requests.
        let mut consumer = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("basic.consume", DIRECT_REPLY_TO))?;
        let waiters: Arc<StdMutex<HashMap<String, oneshot::Sender<Receipt>>>> = Arc::default();
        let routed = waiters.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Ok(receipt) = serde_json::from_slice::<Receipt>(&delivery.data) else {
                    warn!("ignoring an invalid delivery receipt");
                    continue;
                };
                if let Some(waiter) = lock(&routed).remove(&receipt.message_id) {
                    let _ = waiter.send(receipt);
                }
            }
        });
        let open = ReceiptChannel { channel, waiters };
        *guard = Some(open.clone());
        Ok(open)
    }

    /// Declares the identity's mailbox unless this publisher did so within `mailbox.declare_interval`.
    async fn ensure_mailbox(
        &self,
        declares: &Channel,
        identity: &Identity,
    ) -> Result<(), BrokerError> {
        let queue = identity.mailbox_queue(&self.topology.prefix);
        let queue = queue.as_str();
        let now = Instant::now();
        let interval = self.mailbox.declare_interval;
        {
            let declared = self.declared.lock().unwrap_or_else(|e| e.into_inner());
            if declared
                .get(queue)
                .is_some_and(|at| now.duration_since(*at) < interval)
            {
                return Ok(());
            }
        }
        declare_mailbox(declares, identity, &self.mailbox, &self.topology).await?;
        let mut declared = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        if declared.len() >= DECLARE_CACHE_LIMIT {
            declared.retain(|_, at| now.duration_since(*at) < interval);
        }
        if declared.len() < DECLARE_CACHE_LIMIT {
            declared.insert(queue.to_owned(), now);
        }
        Ok(())
    }

    /// Copies a returned message into the dead-letter queue with reason `unroutable`, so it is not lost.
    async fn park_unroutable(&self, confirms: &Channel, body: &[u8], properties: BasicProperties) {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            header::DEAD_LETTER_REASON.into(),
            AMQPValue::LongString("unroutable".into()),
        );
        let now = crate::domain::envelope::unix_millis(std::time::SystemTime::now());
        headers.insert(
            header::DEAD_LETTERED_AT.into(),
            AMQPValue::LongLongInt(i64::try_from(now).unwrap_or(i64::MAX)),
        );
        let exchange = self.topology.dead_letter_exchange();
        let properties = properties.with_headers(headers);
        match self
            .publish_raw(confirms, &exchange, "", false, body, properties)
            .await
        {
            Ok(Outcome::Accepted) => {}
            Ok(_) => warn!(exchange = %exchange, "parking an unroutable message was not confirmed"),
            Err(error) => {
                warn!(exchange = %exchange, %error, "parking an unroutable message failed")
            }
        }
    }

    /// Publishes a control message to every node, with a confirm.
    pub async fn publish_control(&self, message: &ControlMessage) -> Result<(), BrokerError> {
        let exchange = self.topology.control_exchange();
        let body = serde_json::to_vec(message).unwrap_or_default();
        let (confirms, _) = self.channels().await?;
        let properties = BasicProperties::default().with_content_type("application/json".into());
        let publish = self.publish_raw(&confirms, &exchange, "", false, &body, properties);
        match tokio::time::timeout(self.amqp.publish_timeout, publish).await {
            Ok(Ok(Outcome::Accepted)) => Ok(()),
            Ok(Ok(_)) => Err(BrokerError::Refused {
                message_id: "(control)".to_owned(),
                queue: exchange,
            }),
            Ok(Err(error)) => Err(operation_error("basic.publish", &exchange)(error)),
            Err(_) => Err(BrokerError::ConfirmTimeout {
                message_id: "(control)".to_owned(),
                timeout: humantime::format_duration(self.amqp.publish_timeout).to_string(),
            }),
        }
    }

    /// Publishes once on `channel` and waits for the broker's verdict: the confirm in confirms mode, the commit
    /// in transactions mode. A mandatory publish that is returned is reported as such even though the broker
    /// then acks or commits it.
    async fn publish_raw(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Outcome, lapin::Error> {
        let options = BasicPublishOptions {
            mandatory,
            ..BasicPublishOptions::default()
        };
        match self.amqp.publisher_mode {
            PublisherMode::Confirms => {
                let confirm = channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        options,
                        body,
                        properties,
                    )
                    .await?;
                // The first await above means only "written to the socket"; this one waits for the confirm.
                Ok(match confirm.await? {
                    Confirmation::Ack(None) => Outcome::Accepted,
                    Confirmation::Ack(Some(returned)) => Outcome::Returned(returned.reply_code),
                    Confirmation::Nack(_) | Confirmation::NotRequested => Outcome::Refused,
                })
            }
            PublisherMode::Transactions => {
                // One transaction at a time per publisher: a commit covers everything published on the channel.
                let _transaction = self.transaction.lock().await;
                let message_id = properties.message_id().clone();
                let published = channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        options,
                        body,
                        properties,
                    )
                    .await;
                if let Err(error) = published {
                    let _ = channel.tx_rollback().await;
                    return Err(error);
                }
                if let Err(error) = channel.tx_commit().await {
                    // A full mailbox (x-overflow reject-publish) fails the commit with PRECONDITION_FAILED
                    // "partial tx completion" and closes the channel (observed on RabbitMQ 3.10.8): the
                    // transaction's form of a nack. The next publish reopens the channel.
                    if error.to_string().contains("partial tx completion") {
                        return Ok(Outcome::Refused);
                    }
                    let _ = channel.tx_rollback().await;
                    return Err(error);
                }
                // basic.return arrives before commit-ok, so a returned message is recorded by now.
                let returned = channel.wait_for_confirms().await?;
                Ok(
                    match returned
                        .into_iter()
                        .find(|returned| returned.delivery.properties.message_id() == &message_id)
                    {
                        Some(returned) => Outcome::Returned(returned.reply_code),
                        None => Outcome::Accepted,
                    },
                )
            }
        }
    }

    /// Closes the connection, waiting at most `amqp.connect_timeout`: while the broker blocks the connection
    /// nothing can be written, not even the close.
    pub async fn close(&self) {
        if let Some(open) = self.channels.lock().await.take() {
            let closing = open.connection.close(200, "closing".into());
            let _ = tokio::time::timeout(self.amqp.connect_timeout, closing).await;
        }
        self.connected.store(false, Ordering::Relaxed);
    }
}

/// The broker's verdict on one publish.
enum Outcome {
    /// Confirmed (or committed) and routed.
    Accepted,
    /// Returned unroutable (mandatory flag), with the reply code.
    Returned(u16),
    /// Negatively confirmed: the broker did not take it (for example a full queue that rejects publishes).
    Refused,
}

fn message_properties(message_id: &str, timestamp_ms: u64, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(message_id.into())
        .with_timestamp(timestamp_ms / 1000)
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers)
}

async fn open_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    connection
        .create_channel()
        .await
        .map_err(operation_error("channel.open", "publisher connection"))
}

/// Opens a publishing channel in the configured mode: publisher confirms or AMQP transactions.
async fn open_publishing_channel(
    connection: &Connection,
    mode: PublisherMode,
) -> Result<Channel, BrokerError> {
    let channel = open_channel(connection).await?;
    match mode {
        PublisherMode::Confirms => channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(operation_error("confirm.select", "publishing channel"))?,
        PublisherMode::Transactions => channel
            .tx_select()
            .await
            .map_err(operation_error("tx.select", "publishing channel"))?,
    }
    Ok(channel)
}

/// Tracks the connection's state and, for a publisher, the broker's blocked notices.
fn watch_connection(
    connection: &Connection,
    connected: Arc<AtomicBool>,
    blocked: Option<Arc<StdMutex<Option<String>>>>,
) {
    let mut events = connection.events_listener();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Event::ConnectionBlocked(reason) => {
                    warn!(%reason, "RabbitMQ is blocking this publisher connection");
                    if let Some(blocked) = &blocked {
                        *blocked.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                    }
                }
                Event::ConnectionUnblocked => {
                    info!("RabbitMQ unblocked this publisher connection");
                    if let Some(blocked) = &blocked {
                        *blocked.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                }
                Event::Error(error) => {
                    warn!(%error, "RabbitMQ connection failed");
                    connected.store(false, Ordering::Relaxed);
                }
                Event::Connected => connected.store(true, Ordering::Relaxed),
                _ => {}
            }
        }
    });
}

async fn declare_shared_topology(
    channel: &Channel,
    topology: &Topology,
    mailbox: &MailboxConfig,
) -> Result<(), BrokerError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let dlx = topology.dead_letter_exchange();
    let dlq = topology.dead_letter_queue();
    let control = topology.control_exchange();
    channel
        .exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(operation_error("exchange.declare", &dlx))?;
    channel
        .queue_declare(
            dlq.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            dead_letter_queue_arguments(mailbox),
        )
        .await
        .map_err(declare_error(&dlq))?;
    channel
        .queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(operation_error("queue.bind", &dlq))?;
    for (exchange, kind) in [
        (topology.direct_exchange(), ExchangeKind::Direct),
        (topology.inbound_exchange(), ExchangeKind::Topic),
        (topology.broadcast_exchange(), ExchangeKind::Headers),
    ] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                kind,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("exchange.declare", &exchange))?;
    }
    channel
        .exchange_declare(
            control.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(operation_error("exchange.declare", &control))?;
    Ok(())
}

/// Maps a failed queue.declare: a queue that exists with other arguments is a permanent mistake, reported at once
/// rather than retried until a publish times out.
fn declare_error(queue: &str) -> impl Fn(lapin::Error) -> BrokerError + '_ {
    move |error| {
        let reason = error.to_string();
        if reason.contains("PRECONDITION_FAILED") || reason.contains("inequivalent") {
            BrokerError::MailboxMismatch {
                queue: queue.to_owned(),
                reason,
            }
        } else {
            BrokerError::Operation {
                operation: "queue.declare",
                object: queue.to_owned(),
                reason,
            }
        }
    }
}

async fn declare_mailbox(
    channel: &Channel,
    identity: &Identity,
    mailbox: &MailboxConfig,
    topology: &Topology,
) -> Result<(), BrokerError> {
    let queue = identity.mailbox_queue(&topology.prefix);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            mailbox_arguments(mailbox, topology),
        )
        .await
        .map_err(declare_error(&queue))?;
    // The uniqueId binding lets one publish reach every client type of the uniqueId.
    let exchange = topology.direct_exchange();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            identity.unique_id.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(operation_error("queue.bind", &queue))?;
    Ok(())
}

/// Reads an integer header written by any AMQP client.
pub(crate) fn integer_header(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    let value = headers?.inner().get(&ShortString::from(name))?;
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// Deadline for writing one ack or nack, and for closing a session's channel.
///
/// In tests/cluster.rs (lapin 4.12.3), killing a RabbitMQ node left 6 of 100 sessions on its connection
/// stalled for good: their clients had acked, and the sessions logged neither a failed ack nor the end of their
/// consumer. So either an ack's future or the consumer's end never arrived. NOTE: which of the two is not
/// known; this deadline and [`watch_session_connection`] cover both.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Settles one lapin delivery.
struct RabbitAcker {
    acker: lapin::Acker,
    queue: String,
}

impl RabbitAcker {
    /// Awaits an ack or nack for at most [`SETTLE_TIMEOUT`].
    async fn settle(
        &self,
        operation: &'static str,
        settling: impl Future<Output = lapin::Result<bool>>,
    ) -> Result<(), BrokerError> {
        match tokio::time::timeout(SETTLE_TIMEOUT, settling).await {
            Ok(result) => self.settled(operation, result),
            Err(_) => Err(BrokerError::Operation {
                operation,
                object: self.queue.clone(),
                reason: format!(
                    "not sent within {}; the connection is probably lost, and RabbitMQ redelivers the message \
                     unless the {operation} reached it",
                    humantime::format_duration(SETTLE_TIMEOUT)
                ),
            }),
        }
    }

    fn settled(
        &self,
        operation: &'static str,
        result: lapin::Result<bool>,
    ) -> Result<(), BrokerError> {
        match result {
            Ok(true) => Ok(()),
            // The channel died or was recovered: the broker has already returned the delivery to the mailbox.
            Ok(false) => Err(BrokerError::Operation {
                operation,
                object: self.queue.clone(),
                reason: "the channel closed first; RabbitMQ will redeliver the message".to_owned(),
            }),
            Err(error) => Err(operation_error(operation, &self.queue)(error)),
        }
    }
}

impl DeliveryAcker for RabbitAcker {
    fn ack(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.settle("basic.ack", self.acker.ack(BasicAckOptions::default()))
            .boxed()
    }

    fn requeue(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        let options = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        self.settle("basic.nack", self.acker.nack(options)).boxed()
    }

    fn dead_letter(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        let options = BasicNackOptions {
            requeue: false,
            ..BasicNackOptions::default()
        };
        self.settle("basic.nack", self.acker.nack(options)).boxed()
    }
}

/// Converts a lapin delivery; its acker settles it on the channel it came from.
fn delivery_from(delivery: lapin::message::Delivery, queue: &str) -> Delivery {
    Delivery {
        message_id: delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned()),
        redelivered: delivery.redelivered,
        replay_count: integer_header(delivery.properties.headers().as_ref(), header::REPLAY_COUNT)
            .and_then(|count| u32::try_from(count).ok())
            .unwrap_or(0),
        reply_to: delivery
            .properties
            .reply_to()
            .as_ref()
            .map(|to| to.as_str().to_owned()),
        body: delivery.data,
        acker: Box::new(RabbitAcker {
            acker: delivery.acker,
            queue: queue.to_owned(),
        }),
    }
}

/// The gateway's broker over RabbitMQ: a publisher connection and a consumer connection.
pub struct RabbitBroker {
    nodes: BrokerNodes,
    amqp: AmqpConfig,
    mailbox: MailboxConfig,
    node: String,
    publisher: Publisher,
    consumer: Mutex<Option<ConsumerSide>>,
    consumer_connected: Arc<AtomicBool>,
    control: broadcast::Sender<ControlEnvelope>,
    broadcasts: broadcast::Sender<Arc<Envelope>>,
    /// Keys this node's broadcast queue is bound to, re-bound after a reconnect.
    broadcast_keys: StdMutex<HashSet<BroadcastKey>>,
    /// Set by `close`, so the supervisor does not reconnect.
    closed: AtomicBool,
    /// Connections that carry the sessions' mailbox channels, opened as sessions need them.
    session_connections: Mutex<Vec<SessionConnection>>,
}

/// How often the supervisor checks the connections while they are up.
const SUPERVISE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The consumer connection and the channel that manages this node's broadcast bindings.
struct ConsumerSide {
    connection: Arc<Connection>,
    /// Index of the node in the broker's [`BrokerNodes`].
    node: usize,
    bindings: Channel,
}

/// Capacity of the in-process fan-out of control messages and broadcasts; a slower reader skips the oldest.
const FANOUT_BUFFER: usize = 1024;

impl RabbitBroker {
    /// Connects both connections to the first node of `nodes` that accepts (a URL is a list of one), declares
    /// the topology and starts this node's control and broadcast consumers.
    pub async fn connect(
        nodes: impl Into<BrokerNodes>,
        amqp: &AmqpConfig,
        mailbox: &MailboxConfig,
        node: &str,
    ) -> Result<RabbitBroker, BrokerError> {
        let nodes = nodes.into();
        let publisher = Publisher::connect(
            nodes.clone(),
            amqp,
            mailbox,
            &format!("wsgw {node} publisher"),
        )
        .await?;
        let broker = RabbitBroker {
            nodes,
            amqp: amqp.clone(),
            mailbox: mailbox.clone(),
            node: node.to_owned(),
            publisher,
            consumer: Mutex::new(None),
            consumer_connected: Arc::new(AtomicBool::new(false)),
            control: broadcast::channel(FANOUT_BUFFER).0,
            broadcasts: broadcast::channel(FANOUT_BUFFER).0,
            broadcast_keys: StdMutex::new(HashSet::new()),
            closed: AtomicBool::new(false),
            session_connections: Mutex::new(Vec::new()),
        };
        broker.consumer_side().await?;
        Ok(broker)
    }

    /// Starts the supervisor: every second it checks both connections and, when one is lost, reconnects with
    /// exponential backoff and jitter. A reconnect redeclares the topology and restarts this node's control and
    /// broadcast consumers and bindings; sessions resubscribe their own mailboxes. Stops with `shutdown` or when
    /// the broker is dropped.
    pub fn supervise(self: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let broker = Arc::downgrade(self);
        let amqp = self.amqp.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(amqp.reconnect_min_backoff, amqp.reconnect_max_backoff);
            let mut delay = SUPERVISE_INTERVAL;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                let Some(broker) = broker.upgrade() else {
                    break;
                };
                if broker.closed.load(Ordering::Relaxed) {
                    break;
                }
                let checked = async {
                    broker.publisher.channels().await?;
                    broker.consumer_side().await?;
                    Ok::<(), BrokerError>(())
                };
                match checked.await {
                    Ok(()) => {
                        if backoff.failures > 0 {
                            info!(node = %broker.node, attempts = backoff.failures + 1, "reconnected to RabbitMQ");
                        }
                        backoff.reset();
                        delay = SUPERVISE_INTERVAL;
                    }
                    Err(error) => {
                        delay = backoff.fail();
                        warn!(node = %broker.node, %error, retry_in = ?delay, "RabbitMQ is unreachable; retrying");
                    }
                }
            }
        });
    }

    /// Returns the publisher, for callers that publish without a gateway.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    async fn consumer_connection(&self) -> Result<Arc<Connection>, BrokerError> {
        Ok(self.consumer_side().await?.0)
    }

    /// Returns the consumer connection and bindings channel. A lost connection is reopened together with this
    /// node's control and broadcast consumers and bindings.
    async fn consumer_side(&self) -> Result<(Arc<Connection>, Channel), BrokerError> {
        let mut guard = self.consumer.lock().await;
        if let Some(side) = guard.as_mut() {
            if side.connection.status().connected() {
                if !side.bindings.status().connected() {
                    side.bindings = side
                        .connection
                        .create_channel()
                        .await
                        .map_err(operation_error("channel.open", "consumer connection"))?;
                }
                return Ok((side.connection.clone(), side.bindings.clone()));
            }
            warn!(node = %self.node, "consumer connection lost; reconnecting");
            self.nodes.lost(side.node);
            self.consumer_connected.store(false, Ordering::Relaxed);
        }
        let name = format!("wsgw {} consumer", self.node);
        let (connection, broker_node) =
            open_node_connection(&self.nodes, &self.amqp, &name).await?;
        let connection = Arc::new(connection);
        watch_connection(&connection, self.consumer_connected.clone(), None);
        let topology = self.publisher.topology().clone();

        let control_queue = topology.control_queue(&self.node);
        let control = self
            .consume_node_queue(
                &connection,
                &control_queue,
                &topology.control_exchange(),
                ExchangeKind::Fanout,
            )
            .await?;
        let sender = self.control.clone();
        spawn_node_consumer(control, control_queue, move |data, reply_to| {
            match serde_json::from_slice::<ControlMessage>(data) {
                Ok(message) => {
                    let _ = sender.send(ControlEnvelope { message, reply_to });
                }
                Err(error) => warn!(%error, "ignoring an invalid control message"),
            }
        });

        let broadcast_queue = topology.broadcast_queue(&self.node);
        let broadcasts = self
            .consume_node_queue(
                &connection,
                &broadcast_queue,
                &topology.broadcast_exchange(),
                ExchangeKind::Headers,
            )
            .await?;
        let sender = self.broadcasts.clone();
        spawn_node_consumer(broadcasts, broadcast_queue.clone(), move |data, _| {
            match std::str::from_utf8(data)
                .map_err(|e| e.to_string())
                .and_then(|text| Envelope::from_json(text).map_err(|e| e.to_string()))
            {
                Ok(envelope) => {
                    let _ = sender.send(Arc::new(envelope));
                }
                Err(error) => warn!(%error, "ignoring an invalid broadcast"),
            }
        });

        let bindings = connection
            .create_channel()
            .await
            .map_err(operation_error("channel.open", "consumer connection"))?;
        let keys: Vec<BroadcastKey> = lock(&self.broadcast_keys).iter().cloned().collect();
        for key in keys {
            bind_broadcast_key(&bindings, &topology, &broadcast_queue, &key, true).await?;
        }
        self.consumer_connected.store(true, Ordering::Relaxed);
        info!(node = %self.node, "consumer connected to RabbitMQ");
        *guard = Some(ConsumerSide {
            connection: connection.clone(),
            node: broker_node,
            bindings: bindings.clone(),
        });
        Ok((connection, bindings))
    }

    /// Returns a session connection with room for one more session channel, its session count and the token
    /// cancelled when it is lost, opening one when all are full or lost. A lost connection is dropped from the
    /// list, and its sessions resubscribe on a live one.
    async fn session_connection(
        &self,
    ) -> Result<(Arc<Connection>, Arc<AtomicUsize>, CancellationToken), BrokerError> {
        let mut connections = self.session_connections.lock().await;
        connections.retain(|session| {
            let connected = session.connection.status().connected();
            if !connected {
                self.nodes.lost(session.node);
            }
            connected
        });
        if let Some(session) = connections.iter().find(|session| {
            session.sessions.load(Ordering::Relaxed) < self.amqp.sessions_per_connection
        }) {
            session.sessions.fetch_add(1, Ordering::Relaxed);
            return Ok((
                session.connection.clone(),
                session.sessions.clone(),
                session.lost.clone(),
            ));
        }
        let name = format!("wsgw {} sessions {}", self.node, connections.len() + 1);
        let (connection, broker_node) =
            open_node_connection(&self.nodes, &self.amqp, &name).await?;
        let connection = Arc::new(connection);
        info!(node = %self.node, connection = %name, "opened a session connection");
        let sessions = Arc::new(AtomicUsize::new(1));
        let lost = CancellationToken::new();
        watch_session_connection(&connection, lost.clone());
        connections.push(SessionConnection {
            connection: connection.clone(),
            node: broker_node,
            sessions: sessions.clone(),
            lost: lost.clone(),
        });
        Ok((connection, sessions, lost))
    }

    /// Declares an exclusive queue of this node, bound to `exchange`, and consumes it without acks.
    async fn consume_node_queue(
        &self,
        connection: &Connection,
        queue: &str,
        exchange: &str,
        kind: ExchangeKind,
    ) -> Result<lapin::Consumer, BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(operation_error("channel.open", "consumer connection"))?;
        channel
            .exchange_declare(
                exchange.into(),
                kind.clone(),
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("exchange.declare", exchange))?;
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("queue.declare", queue))?;
        if matches!(kind, ExchangeKind::Fanout) {
            channel
                .queue_bind(
                    queue.into(),
                    exchange.into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(operation_error("queue.bind", queue))?;
        }
        channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("basic.consume", queue))
    }

    async fn subscribe_mailbox(
        &self,
        identity: Identity,
        consumer_tag: String,
        prefetch: u16,
    ) -> Result<Subscription, BrokerError> {
        let queue = identity.mailbox_queue(&self.publisher.topology().prefix);
        let (connection, sessions, lost) = self.session_connection().await?;
        // Counted from here, so a failure below gives the slot back when `slot` drops.
        let slot = SessionSlot(sessions);
        let channel = connection
            .create_channel()
            .await
            .map_err(operation_error("channel.open", "session connection"))?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(operation_error("basic.qos", &queue))?;
        declare_mailbox(
            &channel,
            &identity,
            &self.mailbox,
            self.publisher.topology(),
        )
        .await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("basic.consume", &queue))?;
        let acker_queue = queue.clone();
        // lapin cancels a consumer when its last handle drops, in a background task whose failure it treats as
        // an error of the whole connection. If that cancel runs while the channel is already closing, every
        // session on the connection dies ("invalid channel state: Closing (basic.cancel)"). So the release
        // keeps a handle until the close has started, which marks the consumer as cancelling and makes the
        // drop a no-op.
        let consumer_handle = consumer.clone();
        let deliveries = consumer
            .take_while(|item| future::ready(item.is_ok()))
            .filter_map(|item| future::ready(item.ok()))
            .map(move |delivery| delivery_from(delivery, &acker_queue))
            .take_until(lost.cancelled_owned())
            .boxed();
        // Closing the channel makes RabbitMQ return every unacked delivery to the mailbox in its original order.
        let release = async move {
            match tokio::time::timeout(SETTLE_TIMEOUT, channel.close(200, "session closed".into())).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    debug!(queue = %queue, %error, "closing a session channel failed; the broker requeues on connection loss");
                }
                Err(_) => {
                    debug!(queue = %queue, "closing a session channel timed out; the broker requeues on connection loss");
                }
            }
            drop(consumer_handle);
            drop(slot);
        }
        .boxed();
        Ok(Subscription {
            deliveries,
            release,
        })
    }

    async fn change_broadcast_binding(
        &self,
        key: BroadcastKey,
        bind: bool,
    ) -> Result<(), BrokerError> {
        {
            let mut keys = lock(&self.broadcast_keys);
            if bind {
                keys.insert(key.clone());
            } else {
                keys.remove(&key);
            }
        }
        let (_, bindings) = self.consumer_side().await?;
        let topology = self.publisher.topology();
        bind_broadcast_key(
            &bindings,
            topology,
            &topology.broadcast_queue(&self.node),
            &key,
            bind,
        )
        .await
    }

    async fn consume_business_queue(
        &self,
        queue: String,
        binding_key: String,
    ) -> Result<BoxStream<'static, Delivery>, BrokerError> {
        let connection = self.consumer_connection().await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(operation_error("channel.open", "consumer connection"))?;
        let exchange = self.publisher.topology().inbound_exchange();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("queue.declare", &queue))?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                binding_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("queue.bind", &queue))?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("basic.consume", &queue))?;
        Ok(consumer
            .take_while(|item| future::ready(item.is_ok()))
            .filter_map(|item| future::ready(item.ok()))
            .map(move |delivery| delivery_from(delivery, &queue))
            .boxed())
    }
}

async fn bind_broadcast_key(
    channel: &Channel,
    topology: &Topology,
    queue: &str,
    key: &BroadcastKey,
    bind: bool,
) -> Result<(), BrokerError> {
    let exchange = topology.broadcast_exchange();
    let mut arguments = FieldTable::default();
    arguments.insert("x-match".into(), AMQPValue::LongString("any".into()));
    arguments.insert(key.header().into(), AMQPValue::LongString("1".into()));
    if bind {
        channel
            .queue_bind(
                queue.into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                arguments,
            )
            .await
            .map_err(operation_error("queue.bind", queue))
    } else {
        channel
            .queue_unbind(queue.into(), exchange.as_str().into(), "".into(), arguments)
            .await
            .map_err(operation_error("queue.unbind", queue))
    }
}

/// Forwards the deliveries of a node queue to `handle` until the consumer ends.
fn spawn_node_consumer(
    mut consumer: lapin::Consumer,
    queue: String,
    handle: impl Fn(&[u8], Option<String>) + Send + 'static,
) {
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let reply_to = delivery
                .properties
                .reply_to()
                .as_ref()
                .map(|to| to.as_str().to_owned());
            handle(&delivery.data, reply_to);
        }
        debug!(queue = %queue, "node queue consumer ended");
    });
}

impl Broker for RabbitBroker {
    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<Published, BrokerError>> {
        async move { self.publisher.publish(&publication).await }.boxed()
    }

    fn publish_and_wait(
        &self,
        publication: Publication,
        wait: std::time::Duration,
    ) -> BoxFuture<'_, Result<(Published, Option<Receipt>), BrokerError>> {
        async move { self.publisher.publish_and_wait(&publication, wait).await }.boxed()
    }

    fn send_receipt(&self, reply_to: String, receipt: Receipt) -> BoxFuture<'_, ()> {
        async move { self.publisher.send_receipt(&reply_to, &receipt).await }.boxed()
    }

    fn subscribe(
        &self,
        identity: &Identity,
        consumer_tag: &str,
        prefetch: u16,
    ) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        self.subscribe_mailbox(identity.clone(), consumer_tag.to_owned(), prefetch)
            .boxed()
    }

    fn broadcasts(&self) -> broadcast::Receiver<Arc<Envelope>> {
        self.broadcasts.subscribe()
    }

    fn bind_broadcast(&self, key: BroadcastKey) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.change_broadcast_binding(key, true).boxed()
    }

    fn unbind_broadcast(&self, key: BroadcastKey) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.change_broadcast_binding(key, false).boxed()
    }

    fn consume_inbound(
        &self,
        queue: &str,
        binding_key: &str,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Delivery>, BrokerError>> {
        self.consume_business_queue(queue.to_owned(), binding_key.to_owned())
            .boxed()
    }

    fn announce(&self, message: ControlMessage) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move { self.publisher.publish_control(&message).await }.boxed()
    }

    fn send_control_reply(&self, reply_to: String, reply: ControlReply) -> BoxFuture<'_, ()> {
        async move {
            let body = serde_json::to_vec(&reply).unwrap_or_default();
            self.publisher
                .send_reply(&reply_to, &body, "(control reply)")
                .await
        }
        .boxed()
    }

    fn control_messages(&self) -> broadcast::Receiver<ControlEnvelope> {
        self.control.subscribe()
    }

    fn is_ready(&self) -> bool {
        self.publisher.is_connected() && self.consumer_connected.load(Ordering::Relaxed)
    }

    fn is_blocked(&self) -> bool {
        self.publisher.is_blocked()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            self.closed.store(true, Ordering::Relaxed);
            self.publisher.close().await;
            if let Some(side) = self.consumer.lock().await.take() {
                let _ = side.connection.close(200, "closing".into()).await;
            }
            let sessions: Vec<SessionConnection> =
                self.session_connections.lock().await.drain(..).collect();
            for session in sessions {
                let _ = session.connection.close(200, "closing".into()).await;
            }
            self.consumer_connected.store(false, Ordering::Relaxed);
        }
        .boxed()
    }
}

/// A connection that carries session channels, with the number of sessions on it.
struct SessionConnection {
    connection: Arc<Connection>,
    /// Index of the node in the broker's [`BrokerNodes`].
    node: usize,
    sessions: Arc<AtomicUsize>,
    /// Cancelled once the connection is lost, to end its sessions' delivery streams.
    lost: CancellationToken,
}

/// Cancels `lost` once `connection` is no longer connected or has been dropped, checking every second. lapin
/// ends a consumer's stream when its connection fails, but a session whose stream did not end (see
/// [`SETTLE_TIMEOUT`]) would wait for deliveries for ever.
fn watch_session_connection(connection: &Arc<Connection>, lost: CancellationToken) {
    let connection = Arc::downgrade(connection);
    tokio::spawn(async move {
        let mut check = tokio::time::interval(SUPERVISE_INTERVAL);
        loop {
            check.tick().await;
            match connection.upgrade() {
                Some(connection) if connection.status().connected() => {}
                _ => break,
            }
        }
        lost.cancel();
    });
}

/// One session's place on a session connection; dropping it frees the place.
struct SessionSlot(Arc<AtomicUsize>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
