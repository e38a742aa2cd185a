//! The in-process broker: the default when no RabbitMQ URL is configured, for one node on one machine.
//!
//! It keeps the same contract as the RabbitMQ adapter: mailboxes in publish order, manual acks, unacked
//! deliveries returned in order and marked redelivered when a consumer is released, one active consumer per
//! mailbox, a length limit per mailbox that rejects publishes, a message TTL after which a waiting message is
//! dead-lettered, and topic routing of client-to-server messages. Memory is bounded: `memory.max_messages`
//! caps the messages held in all queues, `memory.max_dead_letters` the dead-letter queue.
//!
//! Messages live in this process only: they are lost when it stops. Expiry is checked when a mailbox is used,
//! not on a timer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::sync::{Notify, broadcast, oneshot};
use tracing::{error, warn};

use super::{
    BroadcastKey, Broker, BrokerError, ControlEnvelope, ControlMessage, ControlReply, Delivery,
    DeliveryAcker, Publication, Published, Receipt, Subscription,
};
use crate::config::{MailboxConfig, MemoryConfig};
use crate::domain::{Destination, Envelope, Identity};

/// A message waiting in a queue or for an ack.
#[derive(Clone)]
struct Message {
    body: Arc<Vec<u8>>,
    message_id: String,
    reply_to: Option<String>,
    /// True once the message was handed to a consumer, so a later delivery is marked redelivered.
    delivered: bool,
    enqueued_at: Instant,
}

/// A message that could not be delivered, with the reason.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub message_id: String,
    pub reason: &'static str,
    pub body: Arc<Vec<u8>>,
}

#[derive(Default)]
struct Queue {
    /// Ready messages by sequence number, so a requeued message goes back to its original place.
    ready: BTreeMap<u64, Message>,
    /// Delivered, unacked messages: sequence number to (consumer, message).
    unacked: HashMap<u64, (u64, Message)>,
    /// Consumers in arrival order. For a mailbox only the first is active (single active consumer).
    consumers: VecDeque<u64>,
    /// Binding keys of a business queue; empty for mailboxes.
    binding_keys: Vec<String>,
    notify: Arc<Notify>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum QueueName {
    Mailbox(Identity),
    Business(String),
}

#[derive(Default)]
struct State {
    queues: HashMap<QueueName, Queue>,
    /// Messages in all queues, ready or unacked.
    held: usize,
    next_sequence: u64,
    next_consumer: u64,
    dead_letters: VecDeque<DeadLetter>,
    /// Publishers waiting for a receipt, by reply-to address.
    receipt_waiters: HashMap<String, oneshot::Sender<Receipt>>,
}

/// The in-process broker.
pub struct MemoryBroker {
    state: Arc<Mutex<State>>,
    memory: MemoryConfig,
    mailbox: MailboxConfig,
    control: broadcast::Sender<ControlEnvelope>,
    broadcasts: broadcast::Sender<Arc<Envelope>>,
}

const FANOUT_BUFFER: usize = 1024;

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryBroker {
    pub fn new(memory: &MemoryConfig, mailbox: &MailboxConfig) -> MemoryBroker {
        MemoryBroker {
            state: Arc::default(),
            memory: memory.clone(),
            mailbox: mailbox.clone(),
            control: broadcast::channel(FANOUT_BUFFER).0,
            broadcasts: broadcast::channel(FANOUT_BUFFER).0,
        }
    }

    /// A copy of the dead-letter queue, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.state).dead_letters.iter().cloned().collect()
    }

    fn publish_now(
        &self,
        publication: &Publication,
        reply_to: Option<String>,
    ) -> Result<Published, BrokerError> {
        let envelope = &publication.envelope;
        let message_id = envelope.id().to_owned();
        let published = Published {
            message_id: message_id.clone(),
            timestamp: envelope.timestamp.unwrap_or_default(),
        };
        let body = Arc::new(envelope.to_json().into_bytes());
        let message = Message {
            body: body.clone(),
            message_id: message_id.clone(),
            reply_to,
            delivered: false,
            enqueued_at: Instant::now(),
        };
        let mut state = lock(&self.state);
        let targets: Vec<QueueName> = match &publication.destination {
            Destination::Broadcast { .. } => {
                drop(state);
                // At most once, to the clients connected now; reaching nobody is not an error.
                let _ = self.broadcasts.send(Arc::new(envelope.clone()));
                return Ok(published);
            }
            Destination::Identity(identity) => {
                let name = QueueName::Mailbox(identity.clone());
                state.queues.entry(name.clone()).or_default();
                vec![name]
            }
            Destination::AllClientTypes(unique_id) => state
                .queues
                .keys()
                .filter(|name| matches!(name, QueueName::Mailbox(identity) if &identity.unique_id == unique_id))
                .cloned()
                .collect(),
            Destination::Server { routing_key } => state
                .queues
                .iter()
                .filter(|(_, queue)| queue.binding_keys.iter().any(|key| topic_matches(key, routing_key)))
                .map(|(name, _)| name.clone())
                .collect(),
        };
        if targets.is_empty() {
            let parked = publication.destination.is_direct();
            if parked {
                push_dead_letter(
                    &mut state,
                    self.memory.max_dead_letters,
                    &message_id,
                    "unroutable",
                    body,
                );
            }
            let routing_key = match &publication.destination {
                Destination::AllClientTypes(unique_id) => unique_id.clone(),
                Destination::Server { routing_key } => routing_key.clone(),
                _ => String::new(),
            };
            return Err(BrokerError::Unroutable {
                message_id,
                routing_key,
                parked,
            });
        }
        if state.held + targets.len() > self.memory.max_messages {
            return Err(BrokerError::MemoryFull {
                message_id,
                limit: self.memory.max_messages,
            });
        }
        for name in &targets {
            expire(
                &mut state,
                name,
                self.mailbox.message_ttl,
                self.memory.max_dead_letters,
            );
            let ready = state.queues.get(name).map_or(0, |queue| queue.ready.len());
            if matches!(name, QueueName::Mailbox(_)) && ready >= self.mailbox.max_length as usize {
                return Err(BrokerError::Refused {
                    message_id,
                    queue: queue_label(name),
                });
            }
        }
        for name in targets {
            let sequence = state.next_sequence;
            state.next_sequence += 1;
            state.held += 1;
            let queue = state.queues.entry(name).or_default();
            queue.ready.insert(sequence, message.clone());
            queue.notify.notify_waiters();
        }
        Ok(published)
    }

    /// A stream of deliveries from one queue for one consumer.
    fn consume(
        &self,
        name: QueueName,
        prefetch: u16,
        single_active: bool,
    ) -> (u64, BoxStream<'static, Delivery>) {
        let consumer = {
            let mut state = lock(&self.state);
            let consumer = state.next_consumer;
            state.next_consumer += 1;
            state
                .queues
                .entry(name.clone())
                .or_default()
                .consumers
                .push_back(consumer);
            consumer
        };
        let shared = self.state.clone();
        let ttl = self.mailbox.message_ttl;
        let dead_letter_limit = self.memory.max_dead_letters;
        let deliveries = stream::unfold((), move |()| {
            let shared = shared.clone();
            let name = name.clone();
            async move {
                loop {
                    let notify = {
                        let mut state = lock(&shared);
                        expire(&mut state, &name, ttl, dead_letter_limit);
                        let queue = state.queues.get_mut(&name)?;
                        if !queue.consumers.contains(&consumer) {
                            return None;
                        }
                        let active = !single_active || queue.consumers.front() == Some(&consumer);
                        let in_flight = queue
                            .unacked
                            .values()
                            .filter(|(owner, _)| *owner == consumer)
                            .count();
                        if active
                            && in_flight < usize::from(prefetch)
                            && let Some((sequence, mut message)) = queue.ready.pop_first()
                        {
                            let redelivered = message.delivered;
                            message.delivered = true;
                            queue.unacked.insert(sequence, (consumer, message.clone()));
                            let delivery = Delivery {
                                body: message.body.to_vec(),
                                message_id: Some(message.message_id.clone()),
                                redelivered,
                                replay_count: 0,
                                reply_to: message.reply_to.clone(),
                                acker: Box::new(MemoryAcker {
                                    state: shared.clone(),
                                    queue: name.clone(),
                                    sequence,
                                    consumer,
                                    dead_letter_limit,
                                }),
                            };
                            return Some((delivery, ()));
                        }
                        queue.notify.clone()
                    };
                    let notified = notify.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    // Re-check after registering for the wake-up, so a change in between is not missed.
                    let changed = {
                        let state = lock(&shared);
                        state.queues.get(&name).is_some_and(|queue| {
                            !queue.ready.is_empty() || !queue.consumers.contains(&consumer)
                        })
                    };
                    if !changed {
                        notified.await;
                    }
                }
            }
        })
        .boxed();
        (consumer, deliveries)
    }
}

/// Moves messages older than `ttl` from a mailbox to the dead-letter queue.
fn expire(state: &mut State, name: &QueueName, ttl: Duration, dead_letter_limit: usize) {
    if !matches!(name, QueueName::Mailbox(_)) {
        return;
    }
    let Some(queue) = state.queues.get_mut(name) else {
        return;
    };
    let old: Vec<u64> = queue
        .ready
        .iter()
        .filter(|(_, message)| message.enqueued_at.elapsed() >= ttl)
        .map(|(sequence, _)| *sequence)
        .collect();
    let expired: Vec<Message> = old
        .iter()
        .filter_map(|sequence| queue.ready.remove(sequence))
        .collect();
    for message in expired {
        state.held -= 1;
        push_dead_letter(
            state,
            dead_letter_limit,
            &message.message_id,
            "expired",
            message.body,
        );
    }
}

/// Appends to the bounded dead-letter queue; when it is full, the oldest entry is dropped with an error log.
fn push_dead_letter(
    state: &mut State,
    limit: usize,
    message_id: &str,
    reason: &'static str,
    body: Arc<Vec<u8>>,
) {
    if state.dead_letters.len() >= limit
        && let Some(dropped) = state.dead_letters.pop_front()
    {
        error!(
            message_id = %dropped.message_id,
            limit,
            "the in-process dead-letter queue is full; dropping its oldest message"
        );
    }
    warn!(%message_id, reason, "message dead-lettered");
    state.dead_letters.push_back(DeadLetter {
        message_id: message_id.to_owned(),
        reason,
        body,
    });
}

fn queue_label(name: &QueueName) -> String {
    match name {
        QueueName::Mailbox(identity) => format!("mailbox {identity}"),
        QueueName::Business(queue) => queue.clone(),
    }
}

/// Returns a consumer's unacked messages to their queue in their original order and removes the consumer.
fn release_consumer(state: &Mutex<State>, name: &QueueName, consumer: u64) {
    let mut state = lock(state);
    let Some(queue) = state.queues.get_mut(name) else {
        return;
    };
    queue.consumers.retain(|existing| *existing != consumer);
    let returned: Vec<u64> = queue
        .unacked
        .iter()
        .filter(|(_, (owner, _))| *owner == consumer)
        .map(|(sequence, _)| *sequence)
        .collect();
    for sequence in returned {
        if let Some((_, message)) = queue.unacked.remove(&sequence) {
            queue.ready.insert(sequence, message);
        }
    }
    queue.notify.notify_waiters();
    let unused = queue.ready.is_empty() && queue.unacked.is_empty() && queue.consumers.is_empty();
    if unused && matches!(name, QueueName::Mailbox(_)) {
        state.queues.remove(name);
    }
}

/// Settles one delivery of the in-process broker.
struct MemoryAcker {
    state: Arc<Mutex<State>>,
    queue: QueueName,
    sequence: u64,
    consumer: u64,
    dead_letter_limit: usize,
}

impl MemoryAcker {
    fn take(&self, state: &mut State) -> Result<Message, BrokerError> {
        let queue = state.queues.get_mut(&self.queue);
        let owned = queue
            .and_then(|queue| match queue.unacked.get(&self.sequence) {
                Some((owner, _)) if *owner == self.consumer => queue.unacked.remove(&self.sequence),
                _ => None,
            })
            .map(|(_, message)| message);
        owned.ok_or_else(|| BrokerError::Operation {
            operation: "ack",
            object: queue_label(&self.queue),
            reason: "the delivery was already settled or returned to its queue".to_owned(),
        })
    }

    fn notify(&self, state: &State) {
        if let Some(queue) = state.queues.get(&self.queue) {
            queue.notify.notify_waiters();
        }
    }
}

impl DeliveryAcker for MemoryAcker {
    fn ack(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            let mut state = lock(&self.state);
            self.take(&mut state)?;
            state.held -= 1;
            self.notify(&state);
            Ok(())
        }
        .boxed()
    }

    fn requeue(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            let mut state = lock(&self.state);
            let message = self.take(&mut state)?;
            if let Some(queue) = state.queues.get_mut(&self.queue) {
                queue.ready.insert(self.sequence, message);
            }
            self.notify(&state);
            Ok(())
        }
        .boxed()
    }

    fn dead_letter(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            let mut state = lock(&self.state);
            let message = self.take(&mut state)?;
            state.held -= 1;
            push_dead_letter(
                &mut state,
                self.dead_letter_limit,
                &message.message_id,
                "rejected",
                message.body,
            );
            self.notify(&state);
            Ok(())
        }
        .boxed()
    }
}

/// Topic matching as RabbitMQ does it: words split on dots, `*` matches one word, `#` zero or more.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn matches(pattern: &[&str], key: &[&str]) -> bool {
        match (pattern.first(), key.first()) {
            (None, None) => true,
            (Some(&"#"), _) => {
                matches(&pattern[1..], key) || (!key.is_empty() && matches(pattern, &key[1..]))
            }
            (Some(&"*"), Some(_)) => matches(&pattern[1..], &key[1..]),
            (Some(word), Some(other)) if word == other => matches(&pattern[1..], &key[1..]),
            _ => false,
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = key.split('.').collect();
    matches(&pattern, &key)
}

impl Broker for MemoryBroker {
    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<Published, BrokerError>> {
        let result = self.publish_now(&publication, None);
        async move { result }.boxed()
    }

    fn publish_and_wait(
        &self,
        publication: Publication,
        wait: Duration,
    ) -> BoxFuture<'_, Result<(Published, Option<Receipt>), BrokerError>> {
        async move {
            let reply_to = format!("memory:{}", uuid::Uuid::new_v4().simple());
            let (sender, receiver) = oneshot::channel();
            lock(&self.state)
                .receipt_waiters
                .insert(reply_to.clone(), sender);
            let published = self.publish_now(&publication, Some(reply_to.clone()));
            let outcome = match published {
                Ok(published) => {
                    let receipt = tokio::time::timeout(wait, receiver)
                        .await
                        .ok()
                        .and_then(Result::ok);
                    Ok((published, receipt))
                }
                Err(error) => Err(error),
            };
            lock(&self.state).receipt_waiters.remove(&reply_to);
            outcome
        }
        .boxed()
    }

    fn send_receipt(&self, reply_to: String, receipt: Receipt) -> BoxFuture<'_, ()> {
        if let Some(waiter) = lock(&self.state).receipt_waiters.remove(&reply_to) {
            let _ = waiter.send(receipt);
        }
        async {}.boxed()
    }

    fn subscribe(
        &self,
        identity: &Identity,
        _consumer_tag: &str,
        prefetch: u16,
    ) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        let name = QueueName::Mailbox(identity.clone());
        let (consumer, deliveries) = self.consume(name.clone(), prefetch, true);
        let state = self.state.clone();
        let release = async move { release_consumer(&state, &name, consumer) }.boxed();
        async move {
            Ok(Subscription {
                deliveries,
                release,
            })
        }
        .boxed()
    }

    fn broadcasts(&self) -> broadcast::Receiver<Arc<Envelope>> {
        self.broadcasts.subscribe()
    }

    fn bind_broadcast(&self, _key: BroadcastKey) -> BoxFuture<'_, Result<(), BrokerError>> {
        // Every broadcast reaches the only node; the gateway filters by the clients' tags.
        async { Ok(()) }.boxed()
    }

    fn unbind_broadcast(&self, _key: BroadcastKey) -> BoxFuture<'_, Result<(), BrokerError>> {
        async { Ok(()) }.boxed()
    }

    fn consume_inbound(
        &self,
        queue: &str,
        binding_key: &str,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Delivery>, BrokerError>> {
        let name = QueueName::Business(queue.to_owned());
        {
            let mut state = lock(&self.state);
            let queue = state.queues.entry(name.clone()).or_default();
            if !queue.binding_keys.iter().any(|key| key == binding_key) {
                queue.binding_keys.push(binding_key.to_owned());
            }
        }
        let (_, deliveries) = self.consume(name, 64, false);
        async move { Ok(deliveries) }.boxed()
    }

    fn announce(&self, message: ControlMessage) -> BoxFuture<'_, Result<(), BrokerError>> {
        let _ = self.control.send(ControlEnvelope {
            message,
            reply_to: None,
        });
        async { Ok(()) }.boxed()
    }

    fn send_control_reply(&self, _reply_to: String, _reply: ControlReply) -> BoxFuture<'_, ()> {
        // The only node answers `wsgw sessions` over HTTP; nothing sends control requests in process.
        async {}.boxed()
    }

    fn control_messages(&self) -> broadcast::Receiver<ControlEnvelope> {
        self.control.subscribe()
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn topic_wildcards_match_like_rabbitmq() {
        assert!(topic_matches("payment.*", "payment.REFRESH_QR"));
        assert!(!topic_matches("payment.*", "payment.a.b"));
        assert!(topic_matches("payment.#", "payment.a.b"));
        assert!(topic_matches("#", "anything.at.all"));
        assert!(topic_matches("*.QR", "qrcode.QR"));
        assert!(!topic_matches("charging.*", "payment.X"));
    }
}
