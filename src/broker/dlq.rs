//! The RabbitMQ dead-letter queue as `wsgw replay-dlq` reads it.
//!
//! Reading takes messages with `basic.get` and does not ack them, so nothing is consumed: when the reader's
//! channel closes, RabbitMQ returns every message it did not remove to the queue, in order. A message leaves
//! the queue only through [`DeadLetterQueue::remove`], which replay calls after the re-publish was confirmed.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};

use super::BrokerError;
use super::header;
use super::rabbit::{BrokerNodes, Topology, integer_header, open_connection};
use crate::config::AmqpConfig;
use crate::domain::Envelope;

/// Reasons a message is dead-lettered for: `unroutable` is set by the publisher, `rejected` by a nack without
/// requeue (the gateway's `session.max_rejects`), `expired` (message TTL), `maxlen` (a full queue that drops) and
/// `delivery_limit` (a quorum mailbox's `x-delivery-limit`) by RabbitMQ.
pub const DEAD_LETTER_REASONS: &[&str] = &[
    "unroutable",
    "rejected",
    "expired",
    "maxlen",
    "delivery_limit",
];

/// One dead-lettered message with what the gateway and RabbitMQ recorded about it.
#[derive(Debug, Clone)]
pub struct DeadLetterRecord {
    pub message_id: String,
    /// Usually one of [`DEAD_LETTER_REASONS`]: the text of the first header that names one, as written, and
    /// `unknown` when no header does.
    pub reason: String,
    /// When it was dead-lettered, in ms since the Unix epoch, when a header records it.
    pub dead_lettered_at: Option<u64>,
    pub original_exchange: String,
    pub original_routing_key: String,
    pub replay_count: u32,
    /// The envelope, or None when the body is not a valid envelope.
    pub envelope: Option<Envelope>,
    pub body: Vec<u8>,
    delivery_tag: u64,
}

impl DeadLetterRecord {
    /// The recipient as `uniqueId/clientType` (or `uniqueId`), or `-`.
    pub fn recipient(&self) -> String {
        let Some(envelope) = &self.envelope else {
            return "-".to_owned();
        };
        match (&envelope.to_unique_id, &envelope.to_client_type) {
            (Some(id), Some(kind)) => format!("{id}/{kind}"),
            (Some(id), None) => id.clone(),
            _ => "-".to_owned(),
        }
    }
}

/// A reader of the dead-letter queue on a connection of its own.
pub struct DeadLetterQueue {
    connection: Connection,
    channel: Channel,
    queue: String,
}

impl DeadLetterQueue {
    /// Connects to the first node of `nodes` that accepts and checks that the queue exists.
    pub async fn open(
        nodes: &BrokerNodes,
        amqp: &AmqpConfig,
    ) -> Result<DeadLetterQueue, BrokerError> {
        let connection = open_connection(nodes, amqp, "wsgw replay-dlq").await?;
        let queue = Topology {
            prefix: amqp.prefix.clone(),
        }
        .dead_letter_queue();
        let channel =
            connection
                .create_channel()
                .await
                .map_err(|error| BrokerError::Operation {
                    operation: "channel.open",
                    object: queue.clone(),
                    reason: error.to_string(),
                })?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|error| BrokerError::Operation {
                operation: "queue.declare",
                object: queue.clone(),
                reason: format!(
                    "{error}; no gateway with amqp.prefix {:?} has run on this broker",
                    amqp.prefix
                ),
            })?;
        Ok(DeadLetterQueue {
            connection,
            channel,
            queue,
        })
    }

    pub fn name(&self) -> &str {
        &self.queue
    }

    /// Takes up to `max` messages from the head of the queue without acking them.
    pub async fn scan(&self, max: usize) -> Result<Vec<DeadLetterRecord>, BrokerError> {
        let mut records = Vec::new();
        while records.len() < max {
            let message = self
                .channel
                .basic_get(
                    self.queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(|error| BrokerError::Operation {
                    operation: "basic.get",
                    object: self.queue.clone(),
                    reason: error.to_string(),
                })?;
            let Some(message) = message else { break };
            records.push(record_of(&message.delivery));
        }
        Ok(records)
    }

    /// Removes one scanned message from the queue.
    pub async fn remove(&self, record: &DeadLetterRecord) -> Result<(), BrokerError> {
        self.channel
            .basic_ack(record.delivery_tag, BasicAckOptions::default())
            .await
            .map_err(|error| BrokerError::Operation {
                operation: "basic.ack",
                object: self.queue.clone(),
                reason: error.to_string(),
            })
    }

    /// Returns every message not removed to the queue and closes the connection.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

fn record_of(delivery: &lapin::message::Delivery) -> DeadLetterRecord {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let text = |name: &str| match headers.inner().get(&ShortString::from(name)) {
        Some(AMQPValue::LongString(value)) => Some(value.to_string()),
        Some(AMQPValue::ShortString(value)) => Some(value.as_str().to_owned()),
        _ => None,
    };
    let first_death = first_x_death(&headers);
    let reason = reason_of(&headers);
    let dead_lettered_at = integer_header(Some(&headers), header::DEAD_LETTERED_AT)
        .and_then(|ms| u64::try_from(ms).ok())
        .or_else(|| first_death.and_then(|(_, time)| time));
    let envelope = std::str::from_utf8(&delivery.data)
        .ok()
        .and_then(|body| Envelope::from_json(body).ok());
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .or_else(|| envelope.as_ref().map(|envelope| envelope.id().to_owned()))
        .unwrap_or_default();
    DeadLetterRecord {
        message_id,
        reason,
        dead_lettered_at,
        original_exchange: text(header::ORIGINAL_EXCHANGE).unwrap_or_default(),
        original_routing_key: text(header::ORIGINAL_ROUTING_KEY).unwrap_or_default(),
        replay_count: integer_header(Some(&headers), header::REPLAY_COUNT)
            .and_then(|count| u32::try_from(count).ok())
            .unwrap_or(0),
        envelope,
        body: delivery.data.clone(),
        delivery_tag: delivery.delivery_tag,
    }
}

/// Reads why a message was dead-lettered: the gateway's own header (`unroutable`), else RabbitMQ's
/// `x-first-death-reason`, else the newest `x-death` entry. A quorum mailbox that reaches its delivery limit
/// writes `delivery_limit` in both of RabbitMQ's headers (observed on RabbitMQ 3.10.8).
fn reason_of(headers: &FieldTable) -> String {
    let text = |name: &str| match headers.inner().get(&ShortString::from(name)) {
        Some(AMQPValue::LongString(value)) => Some(value.to_string()),
        Some(AMQPValue::ShortString(value)) => Some(value.as_str().to_owned()),
        _ => None,
    };
    text(header::DEAD_LETTER_REASON)
        .or_else(|| text("x-first-death-reason"))
        .or_else(|| first_x_death(headers).and_then(|(reason, _)| reason))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Reason and time (ms) of the newest `x-death` entry RabbitMQ added.
fn first_x_death(headers: &FieldTable) -> Option<(Option<String>, Option<u64>)> {
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get(&ShortString::from("x-death"))
    else {
        return None;
    };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
        return None;
    };
    let reason = match death.inner().get(&ShortString::from("reason")) {
        Some(AMQPValue::LongString(value)) => Some(value.to_string()),
        _ => None,
    };
    let time = match death.inner().get(&ShortString::from("time")) {
        Some(AMQPValue::Timestamp(seconds)) => Some(seconds * 1000),
        _ => None,
    };
    Some((reason, time))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    /// Builds the dead-letter headers of a quorum mailbox at its delivery limit, as RabbitMQ 3.10.8 wrote them,
    /// with or without `x-first-death-reason`.
    fn delivery_limit_headers(first_death_reason: bool) -> FieldTable {
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        death.insert(
            "queue".into(),
            AMQPValue::LongString("wsgw.mailbox.h5.u-1".into()),
        );
        death.insert("time".into(), AMQPValue::Timestamp(1_796_431_314));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        if first_death_reason {
            headers.insert(
                "x-first-death-reason".into(),
                AMQPValue::LongString("delivery_limit".into()),
            );
        }
        headers
    }

    #[test]
    fn quorum_delivery_limit_is_named() {
        let headers = delivery_limit_headers(true);
        assert_eq!(reason_of(&headers), "delivery_limit");
        assert!(DEAD_LETTER_REASONS.contains(&"delivery_limit"));
    }

    #[test]
    fn x_death_alone_names_the_reason() {
        let headers = delivery_limit_headers(false);
        assert_eq!(reason_of(&headers), "delivery_limit");
        assert_eq!(
            first_x_death(&headers).and_then(|(_, time)| time),
            Some(1_796_431_314_000)
        );
    }

    #[test]
    fn missing_headers_give_unknown() {
        assert_eq!(reason_of(&FieldTable::default()), "unknown");
    }
}
