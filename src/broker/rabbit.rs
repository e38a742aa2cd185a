//! The RabbitMQ adapter of the broker port (lapin).
//!
//! Topology, all under the configured prefix and declared idempotently on the channel that uses it:
//! - `<prefix>.mailbox.<clientType>.<uniqueId>`: one durable mailbox per identity, with a message TTL, an idle
//!   expiry, a length limit that rejects publishes, single-active-consumer and the dead-letter exchange.
//!   Publishers reach it through the default exchange by name, so it needs no binding.
//! - `<prefix>.dlx` (fanout) and `<prefix>.dlq`: the dead-letter exchange and queue.
//! - `<prefix>.control` (fanout) and one exclusive `<prefix>.control.<node>` queue per node: control messages.
//!
//! Publishes and consumes run on separate connections, because RabbitMQ blocks only connections that publish and
//! a blocked connection would stall the consumers' acks too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Instant;

use futures_util::future::{self, BoxFuture, FutureExt};
use futures_util::stream::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event, ExchangeKind,
};
use tokio::sync::{Mutex, broadcast};
use tracing::{debug, info, warn};

use super::{
    Broker, BrokerError, ControlMessage, Delivery, DeliveryAcker, Publication, Published, Route,
    Subscription, header,
};
use crate::config::{AmqpConfig, MailboxConfig, redact_url};

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
}

/// Arguments of every mailbox queue. A mailbox declared with other arguments makes RabbitMQ reject the
/// redeclare (406), so these must only change together with a migration.
pub fn mailbox_arguments(mailbox: &MailboxConfig, topology: &Topology) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-version".into(), AMQPValue::LongInt(2));
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

/// Opens a connection, bounding the TCP connect and the AMQP handshake by `amqp.connect_timeout`.
pub async fn open_connection(
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

/// The open publisher connection with its two channels. Declares run on their own channel, so a rejected
/// declare (which closes its channel) never fails the confirms pending on the publishing channel.
struct PublisherChannels {
    connection: Arc<Connection>,
    confirms: Channel,
    declares: Channel,
}

/// Publishes with confirms on a connection of its own. Reconnects on the next publish after the connection
/// or a channel was lost.
pub struct Publisher {
    url: String,
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
}

/// Bound on the mailbox declare cache; past it, entries older than `declare_interval` are dropped.
const DECLARE_CACHE_LIMIT: usize = 100_000;

impl Publisher {
    /// Connects and declares the shared topology.
    pub async fn connect(
        url: &str,
        amqp: &AmqpConfig,
        mailbox: &MailboxConfig,
        connection_name: &str,
    ) -> Result<Publisher, BrokerError> {
        let publisher = Publisher {
            url: url.to_owned(),
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
        };
        publisher.channels().await?;
        Ok(publisher)
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// True while the publisher connection is open.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The publishing and declaring channels, reopened (with the connection if needed) when closed.
    async fn channels(&self) -> Result<(Channel, Channel), BrokerError> {
        let mut guard = self.channels.lock().await;
        if let Some(open) = guard.as_mut() {
            if open.connection.status().connected() {
                if !open.confirms.status().connected() {
                    warn!(connection = %self.connection_name, "publishing channel closed; reopening it");
                    open.confirms = open_confirm_channel(&open.connection).await?;
                }
                if !open.declares.status().connected() {
                    debug!(connection = %self.connection_name, "declare channel closed; reopening it");
                    open.declares = open_channel(&open.connection).await?;
                }
                return Ok((open.confirms.clone(), open.declares.clone()));
            }
            warn!(connection = %self.connection_name, "publisher connection lost; reconnecting");
            self.connected.store(false, Ordering::Relaxed);
        }
        let connection =
            Arc::new(open_connection(&self.url, &self.amqp, &self.connection_name).await?);
        watch_connection(
            &connection,
            self.connected.clone(),
            Some(self.blocked.clone()),
        );
        let confirms = open_confirm_channel(&connection).await?;
        let declares = open_channel(&connection).await?;
        declare_shared_topology(&declares, &self.topology).await?;
        self.connected.store(true, Ordering::Relaxed);
        self.declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        info!(connection = %self.connection_name, "publisher connected to RabbitMQ");
        *guard = Some(PublisherChannels {
            connection,
            confirms: confirms.clone(),
            declares: declares.clone(),
        });
        Ok((confirms, declares))
    }

    /// Publishes one message with a confirm within `amqp.publish_timeout`.
    pub async fn publish(&self, publication: &Publication) -> Result<Published, BrokerError> {
        let message_id = publication.envelope.id().to_owned();
        let timeout = self.amqp.publish_timeout;
        match tokio::time::timeout(timeout, self.publish_unbounded(publication)).await {
            Ok(result) => result,
            Err(_) => {
                let blocked = self
                    .blocked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
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

    async fn publish_unbounded(&self, publication: &Publication) -> Result<Published, BrokerError> {
        let envelope = &publication.envelope;
        let message_id = envelope.id().to_owned();
        let timestamp = envelope.timestamp.unwrap_or_default();
        let Route::Mailbox(identity) = &publication.route;
        let queue = identity.mailbox_queue(&self.topology.prefix);

        let (confirms, declares) = self.channels().await?;
        // A declare counts as use of the mailbox: it resets the idle expiry, so a message published now is not
        // deleted with its queue, and it creates the mailbox of an identity that never connected.
        self.ensure_mailbox(&declares, &queue).await?;

        let mut headers = FieldTable::default();
        headers.insert(
            header::ORIGINAL_EXCHANGE.into(),
            AMQPValue::LongString("".into()),
        );
        headers.insert(
            header::ORIGINAL_ROUTING_KEY.into(),
            AMQPValue::LongString(queue.as_str().into()),
        );
        headers.insert(header::REPLAY_COUNT.into(), AMQPValue::LongLongInt(0));
        headers.insert(
            header::RECIPIENT.into(),
            AMQPValue::LongString(identity.to_string().into()),
        );
        let properties = message_properties(&message_id, timestamp, headers);
        let body = envelope.to_json();

        let confirm = confirms
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body.as_bytes(),
                properties.clone(),
            )
            .await
            .map_err(operation_error("basic.publish", &queue))?;
        // The first await above means only "written to the socket"; this one waits for the broker's confirm.
        let confirmation = confirm
            .await
            .map_err(operation_error("publisher confirm", &queue))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(Published {
                message_id,
                timestamp,
            }),
            // With the mandatory flag and no route, the broker sends basic.return and then an ack: the ack
            // alone does not mean the message was queued.
            Confirmation::Ack(Some(returned)) => {
                warn!(
                    message_id = %message_id,
                    queue = %queue,
                    reply_code = returned.reply_code,
                    "message returned unroutable; parking it in the dead-letter queue"
                );
                self.park_unroutable(&confirms, body.as_bytes(), properties)
                    .await;
                Err(BrokerError::Unroutable {
                    message_id,
                    routing_key: queue,
                })
            }
            Confirmation::Nack(_) => Err(BrokerError::Refused { message_id, queue }),
            Confirmation::NotRequested => Err(BrokerError::Operation {
                operation: "publisher confirm",
                object: queue,
                reason: "publisher confirms are not enabled on the publishing channel".to_owned(),
            }),
        }
    }

    /// Declares `queue` as a mailbox unless this publisher did so within `mailbox.declare_interval`.
    async fn ensure_mailbox(&self, declares: &Channel, queue: &str) -> Result<(), BrokerError> {
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
        declare_mailbox(declares, queue, &self.mailbox, &self.topology).await?;
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
        let exchange = self.topology.dead_letter_exchange();
        let result = async {
            confirms
                .basic_publish(
                    exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    body,
                    properties.with_headers(headers),
                )
                .await?
                .await
        }
        .await;
        match result {
            Ok(Confirmation::Ack(_)) => {}
            Ok(other) => {
                warn!(exchange = %exchange, ?other, "parking an unroutable message was not confirmed")
            }
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
        let publish = async {
            confirms
                .basic_publish(
                    exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_content_type("application/json".into()),
                )
                .await?
                .await
        };
        match tokio::time::timeout(self.amqp.publish_timeout, publish).await {
            Ok(Ok(Confirmation::Ack(_))) => Ok(()),
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

    /// Closes the connection after the pending confirms.
    pub async fn close(&self) {
        if let Some(open) = self.channels.lock().await.take() {
            let _ = open.connection.close(200, "closing".into()).await;
        }
        self.connected.store(false, Ordering::Relaxed);
    }
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

async fn open_confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = open_channel(connection).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(operation_error("confirm.select", "publishing channel"))?;
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
    let mut dlq_arguments = FieldTable::default();
    dlq_arguments.insert("x-queue-version".into(), AMQPValue::LongInt(2));
    channel
        .queue_declare(
            dlq.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            dlq_arguments,
        )
        .await
        .map_err(operation_error("queue.declare", &dlq))?;
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

async fn declare_mailbox(
    channel: &Channel,
    queue: &str,
    mailbox: &MailboxConfig,
    topology: &Topology,
) -> Result<(), BrokerError> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            mailbox_arguments(mailbox, topology),
        )
        .await
        .map_err(|error| {
            let text = error.to_string();
            let reason = if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
                format!(
                    "{text}; the mailbox exists with other arguments (TTL, expiry or length), so \
                     restore the old [mailbox] settings or migrate to a new amqp.prefix"
                )
            } else {
                text
            };
            BrokerError::Operation {
                operation: "queue.declare",
                object: queue.to_owned(),
                reason,
            }
        })?;
    Ok(())
}

/// Reads an integer header written by any AMQP client.
fn integer_header(headers: &Option<FieldTable>, name: &str) -> Option<i64> {
    let value = headers.as_ref()?.inner().get(&ShortString::from(name))?;
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

/// Settles one lapin delivery.
struct RabbitAcker {
    acker: lapin::Acker,
    queue: String,
}

impl RabbitAcker {
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
        async move {
            let result = self.acker.ack(BasicAckOptions::default()).await;
            self.settled("basic.ack", result)
        }
        .boxed()
    }

    fn requeue(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            let options = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            let result = self.acker.nack(options).await;
            self.settled("basic.nack", result)
        }
        .boxed()
    }

    fn dead_letter(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            let options = BasicNackOptions {
                requeue: false,
                ..BasicNackOptions::default()
            };
            let result = self.acker.nack(options).await;
            self.settled("basic.nack", result)
        }
        .boxed()
    }
}

/// The gateway's broker over RabbitMQ: a publisher connection and a consumer connection.
pub struct RabbitBroker {
    url: String,
    amqp: AmqpConfig,
    mailbox: MailboxConfig,
    node: String,
    publisher: Publisher,
    consumer: Mutex<Option<Arc<Connection>>>,
    consumer_connected: Arc<AtomicBool>,
    control: broadcast::Sender<ControlMessage>,
}

/// Capacity of the in-process fan-out of control messages; a slower reader skips the oldest ones.
const CONTROL_BUFFER: usize = 1024;

impl RabbitBroker {
    /// Connects both connections, declares the topology and starts this node's control consumer.
    pub async fn connect(
        url: &str,
        amqp: &AmqpConfig,
        mailbox: &MailboxConfig,
        node: &str,
    ) -> Result<RabbitBroker, BrokerError> {
        let publisher =
            Publisher::connect(url, amqp, mailbox, &format!("wsgw {node} publisher")).await?;
        let (control, _) = broadcast::channel(CONTROL_BUFFER);
        let broker = RabbitBroker {
            url: url.to_owned(),
            amqp: amqp.clone(),
            mailbox: mailbox.clone(),
            node: node.to_owned(),
            publisher,
            consumer: Mutex::new(None),
            consumer_connected: Arc::new(AtomicBool::new(false)),
            control,
        };
        broker.consumer_connection().await?;
        Ok(broker)
    }

    /// The consumer connection, reopened (with this node's control consumer) when it was lost.
    async fn consumer_connection(&self) -> Result<Arc<Connection>, BrokerError> {
        let mut guard = self.consumer.lock().await;
        if let Some(connection) = guard.as_ref() {
            if connection.status().connected() {
                return Ok(connection.clone());
            }
            warn!(node = %self.node, "consumer connection lost; reconnecting");
        }
        let name = format!("wsgw {} consumer", self.node);
        let connection = Arc::new(open_connection(&self.url, &self.amqp, &name).await?);
        watch_connection(&connection, self.consumer_connected.clone(), None);
        self.start_control_consumer(&connection).await?;
        self.consumer_connected.store(true, Ordering::Relaxed);
        info!(node = %self.node, "consumer connected to RabbitMQ");
        *guard = Some(connection.clone());
        Ok(connection)
    }

    async fn start_control_consumer(&self, connection: &Connection) -> Result<(), BrokerError> {
        let topology = self.publisher.topology();
        let queue = topology.control_queue(&self.node);
        let exchange = topology.control_exchange();
        let channel = connection
            .create_channel()
            .await
            .map_err(operation_error("channel.open", "consumer connection"))?;
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("exchange.declare", &exchange))?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
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
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("queue.bind", &queue))?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(operation_error("basic.consume", &queue))?;
        let sender = self.control.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                match serde_json::from_slice::<ControlMessage>(&delivery.data) {
                    Ok(message) => {
                        let _ = sender.send(message);
                    }
                    Err(error) => {
                        warn!(queue = %queue, %error, "ignoring an invalid control message")
                    }
                }
            }
            debug!(queue = %queue, "control consumer ended");
        });
        Ok(())
    }

    async fn subscribe_mailbox(
        &self,
        queue: String,
        consumer_tag: String,
        prefetch: u16,
    ) -> Result<Subscription, BrokerError> {
        let connection = self.consumer_connection().await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(operation_error("channel.open", "consumer connection"))?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(operation_error("basic.qos", &queue))?;
        declare_mailbox(&channel, &queue, &self.mailbox, self.publisher.topology()).await?;
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
        let deliveries = consumer
            .take_while(|item| future::ready(item.is_ok()))
            .filter_map(|item| future::ready(item.ok()))
            .map(move |delivery| Delivery {
                message_id: delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned()),
                redelivered: delivery.redelivered,
                replay_count: integer_header(delivery.properties.headers(), header::REPLAY_COUNT)
                    .and_then(|count| u32::try_from(count).ok())
                    .unwrap_or(0),
                body: delivery.data,
                acker: Box::new(RabbitAcker {
                    acker: delivery.acker,
                    queue: acker_queue.clone(),
                }),
            })
            .boxed();
        // Closing the channel makes RabbitMQ return every unacked delivery to the mailbox in its original order.
        let release = async move {
            if let Err(error) = channel.close(200, "session closed".into()).await {
                debug!(queue = %queue, %error, "closing a session channel failed; the broker requeues on connection loss");
            }
        }
        .boxed();
        Ok(Subscription {
            deliveries,
            release,
        })
    }
}

impl Broker for RabbitBroker {
    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<Published, BrokerError>> {
        async move { self.publisher.publish(&publication).await }.boxed()
    }

    fn subscribe(
        &self,
        identity: &crate::domain::Identity,
        consumer_tag: &str,
        prefetch: u16,
    ) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        let queue = identity.mailbox_queue(&self.publisher.topology().prefix);
        let consumer_tag = consumer_tag.to_owned();
        self.subscribe_mailbox(queue, consumer_tag, prefetch)
            .boxed()
    }

    fn announce(&self, message: ControlMessage) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move { self.publisher.publish_control(&message).await }.boxed()
    }

    fn control_messages(&self) -> broadcast::Receiver<ControlMessage> {
        self.control.subscribe()
    }

    fn is_ready(&self) -> bool {
        self.publisher.is_connected() && self.consumer_connected.load(Ordering::Relaxed)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            self.publisher.close().await;
            if let Some(connection) = self.consumer.lock().await.take() {
                let _ = connection.close(200, "closing".into()).await;
            }
            self.consumer_connected.store(false, Ordering::Relaxed);
        }
        .boxed()
    }
}
