//! One WebSocket session: pushes the identity's mailbox to the client and acks RabbitMQ after the client acks.
//!
//! Invariants:
//! - at most `session.pending_ack_window` messages are pushed and unacked (the broker prefetch enforces it);
//! - a delivery is acked in the broker only when the client acked its messageId;
//! - when the session ends for any reason, releasing the subscription returns every unacked delivery to the
//!   mailbox in order, so the next session of the identity, on any node, receives it again;
//! - a client that misses a pong deadline or cannot take a frame within the write timeout is disconnected.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use futures_util::SinkExt;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, SplitSink, SplitStream, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn};

use super::Gateway;
use super::inbound::{self, Inbound};
use super::registry::{
    CommandSlot, PreparedBroadcast, SessionCommand, SessionInfo, SessionMessage, SessionStats,
};
use crate::broker::{
    Backoff, BroadcastKey, BrokerError, ControlMessage, Delivery, DeliveryAcker, Publication,
    Receipt, Subscription,
};
use crate::domain::envelope::unix_millis;
use crate::domain::frame::{ErrorCode, PROTOCOL_V1, close_code};
use crate::domain::{Envelope, Identity, ServerFrame, TokenClaims};

type Socket = WebSocketStream<TokioIo<Upgraded>>;
type Sink = SplitSink<Socket, Message>;

/// A message pushed to the client and waiting for its ack.
struct Pending {
    message_id: String,
    acker: Box<dyn DeliveryAcker>,
    /// Reply-to address for the delivery receipt, when the publisher requested one.
    reply_to: Option<String>,
    business_type: String,
    pushed_at: std::time::Instant,
}

/// How many recent broadcast messageIds a session remembers, so the client's acks of them are accepted.
const RECENT_BROADCASTS: usize = 256;

/// Reason the session loop ended.
enum End {
    /// Close the WebSocket with this code and reason.
    Close(u16, String),
    /// The client sent a close frame; the reply goes out when the sink is flushed.
    ClientClosed,
    /// The connection is gone or unusable; no close frame can be sent.
    Gone(String),
}

/// Runs one session until the client leaves, is replaced, or the gateway shuts down.
pub async fn run(gateway: Arc<Gateway>, socket: Socket, claims: TokenClaims, remote: SocketAddr) {
    let identity = claims.identity();
    let session_id = uuid::Uuid::now_v7().to_string();
    let info = SessionInfo {
        session_id: session_id.clone(),
        identity: identity.clone(),
        remote,
        connected_at: SystemTime::now(),
        tags: claims.tags.clone(),
        businesses: claims.businesses.clone(),
        token_nonce: claims.nonce.clone(),
    };
    let broadcast_keys: Vec<BroadcastKey> = claims
        .tags
        .iter()
        .cloned()
        .map(BroadcastKey::Tag)
        .chain(
            claims
                .businesses
                .iter()
                .cloned()
                .map(BroadcastKey::Business),
        )
        .collect();
    let (commands, inbox, inbox_sender, stats) = gateway.registry.register(
        info,
        gateway.config.session.broadcast_buffer + gateway.config.session.max_sends_in_flight,
    );
    gateway
        .broadcast_bindings
        .acquire(&gateway, &broadcast_keys)
        .await;
    info!(%identity, session_id = %session_id, %remote, "session opened");
    gateway.metrics.sessions.inc();
    gateway.metrics.connects.inc();

    let (mut sink, mut stream) = socket.split();
    let announcement = ControlMessage::Takeover {
        identity: identity.clone(),
        session_id: session_id.clone(),
        node: gateway.node.clone(),
        token_nonce: Some(claims.nonce.clone()),
        token_expires_at_ms: claims.expires_at_ms,
    };
    if let Err(error) = gateway.broker.announce(announcement).await {
        // Single-active-consumer still keeps the two sessions from splitting the mailbox.
        warn!(%identity, %error, "announcing the session to other nodes failed");
    }

    let window = gateway.config.session.pending_ack_window;
    let consumer_tag = format!("wsgw.{}.{session_id}", gateway.node);
    let end = match gateway
        .broker
        .subscribe(&identity, &consumer_tag, window)
        .await
    {
        Ok(Subscription {
            deliveries,
            release,
        }) => {
            let welcome = ServerFrame::Welcome {
                session_id: session_id.clone(),
                node: gateway.node.clone(),
                unique_id: identity.unique_id.clone(),
                client_type: identity.client_type.clone(),
                protocol: PROTOCOL_V1.to_owned(),
                pending_ack_window: window,
            };
            let mut session = Session {
                gateway: gateway.clone(),
                identity: identity.clone(),
                pending: VecDeque::new(),
                recent_broadcasts: VecDeque::new(),
                invalid_frames: 0,
                sends_in_flight: 0,
                rate_limiter: rate_limiter(&gateway.config.session),
                clock: governor::clock::DefaultClock::default(),
                outcomes: inbox_sender,
                stats,
                consumer_tag: consumer_tag.clone(),
                release: Some(release),
            };
            let inputs = Inputs {
                stream: &mut stream,
                deliveries,
                commands: &commands,
                inbox,
            };
            let end = match session.send(&mut sink, &welcome).await {
                Ok(()) => session.pump(&mut sink, inputs).await,
                Err(end) => end,
            };
            let unacked = session.pending.len();
            // Returns the unacked deliveries to the mailbox, in order.
            session.release().await;
            drop(session);
            if unacked > 0 {
                debug!(%identity, unacked, "returned unacked messages to the mailbox");
            }
            end
        }
        Err(error) => {
            warn!(%identity, %error, "subscribing to the mailbox failed");
            End::Close(
                close_code::BROKER_UNAVAILABLE,
                "the message broker is unavailable; reconnect later".to_owned(),
            )
        }
    };

    gateway.metrics.sessions.dec();
    gateway.metrics.disconnect(disconnect_reason(&end));
    match &end {
        End::Close(code, reason) => {
            close(&mut sink, *code, reason, &gateway).await;
            info!(%identity, session_id = %session_id, code, %reason, "session closed");
        }
        End::ClientClosed => {
            // tungstenite queued the close reply when it read the client's close frame; flushing sends it.
            let timeout = gateway.config.session.write_timeout;
            let _ = tokio::time::timeout(timeout, sink.close()).await;
            info!(%identity, session_id = %session_id, "session closed by the client");
        }
        End::Gone(reason) => info!(%identity, session_id = %session_id, %reason, "session ended"),
    }
    gateway.registry.unregister(&identity, &session_id);
    gateway
        .broadcast_bindings
        .release(&gateway, &broadcast_keys)
        .await;
    if matches!(end, End::Close(..)) {
        linger(sink, stream, &gateway).await;
    }
}

/// Everything a session waits on besides the clock.
struct Inputs<'a> {
    stream: &'a mut SplitStream<Socket>,
    deliveries: BoxStream<'static, Delivery>,
    commands: &'a CommandSlot,
    /// Broadcasts and the results of the client's sends.
    inbox: mpsc::Receiver<SessionMessage>,
}

struct Session {
    gateway: Arc<Gateway>,
    identity: Identity,
    pending: VecDeque<Pending>,
    /// messageIds of recent broadcasts, whose acks need no broker ack.
    recent_broadcasts: VecDeque<String>,
    invalid_frames: u32,
    sends_in_flight: usize,
    /// Limits the messages the client sends (`session.rate_limit`).
    rate_limiter: governor::DefaultDirectRateLimiter,
    clock: governor::clock::DefaultClock,
    outcomes: mpsc::Sender<SessionMessage>,
    /// Counters shown by `wsgw sessions`.
    stats: Arc<SessionStats>,
    consumer_tag: String,
    /// Cancels the current mailbox consumer; None while the session waits to resubscribe.
    release: Option<BoxFuture<'static, ()>>,
}

impl Session {
    /// Cancels the mailbox consumer, returning the unacked deliveries to the mailbox.
    async fn release(&mut self) {
        if let Some(release) = self.release.take() {
            release.await;
        }
    }

    /// Runs the session loop. The work of each event runs in a boxed future, so an idle session's task holds
    /// only the small state of this loop rather than the largest of those futures.
    async fn pump(&mut self, sink: &mut Sink, inputs: Inputs<'_>) -> End {
        let Inputs {
            stream,
            mut deliveries,
            commands,
            mut inbox,
        } = inputs;
        let config = self.gateway.config.session.clone();
        let shutdown = self.gateway.shutdown.clone();
        let mut next_ping = Instant::now() + config.ping_interval;
        let mut pong_deadline: Option<Instant> = None;
        let mut resubscribe_at: Option<Instant> = None;
        let amqp = &self.gateway.config.amqp;
        let mut backoff = Backoff::new(amqp.reconnect_min_backoff, amqp.reconnect_max_backoff);
        // On shutdown the session stops pushing and gives the client `session.shutdown_grace` to ack what it has.
        // Whatever stays unacked returns to the mailbox when the subscription is released.
        let mut drain_deadline: Option<Instant> = None;
        let going_away = || {
            End::Close(
                close_code::GOING_AWAY,
                "the gateway is shutting down; reconnect".to_owned(),
            )
        };
        loop {
            if drain_deadline.is_some() && self.pending.is_empty() {
                return going_away();
            }
            let deadline = pong_deadline.unwrap_or(next_ping);
            let draining = drain_deadline.is_some();
            tokio::select! {
                _ = shutdown.cancelled(), if !draining => {
                    drain_deadline = Some(Instant::now() + config.shutdown_grace);
                    continue;
                }
                _ = sleep_until(drain_deadline.unwrap_or(next_ping)), if draining => {
                    return going_away();
                }
                command = commands.recv() => {
                    let SessionCommand::Close { code, reason } = command;
                    return End::Close(code, reason);
                }
                Some(message) = inbox.recv() => {
                    let sent = match message {
                        // While draining for shutdown the session pushes nothing new.
                        SessionMessage::Broadcast(_) if draining => Ok(()),
                        SessionMessage::Broadcast(broadcast) => Box::pin(self.push_broadcast(sink, &broadcast)).await,
                        SessionMessage::Outcome(frame) => {
                            self.sends_in_flight = self.sends_in_flight.saturating_sub(1);
                            Box::pin(self.send(sink, &frame)).await
                        }
                    };
                    if let Err(end) = sent {
                        return end;
                    }
                }
                delivery = deliveries.next(), if !draining => match delivery {
                    Some(delivery) => {
                        if let Err(end) = Box::pin(self.push(sink, delivery)).await {
                            return end;
                        }
                    }
                    None => {
                        // The broker connection or the channel was lost, or the broker cancelled the consumer.
                        // The session stays open and resubscribes; the broker has already returned the
                        // unacked deliveries to the mailbox, so they come again marked redelivered.
                        let delay = backoff.fail();
                        warn!(
                            identity = %self.identity,
                            unacked = self.pending.len(),
                            retry_in = ?delay,
                            "mailbox consumer ended; resubscribing"
                        );
                        self.pending.clear();
                        self.stats.pending.store(0, Ordering::Relaxed);
                        self.release().await;
                        deliveries = stream::pending().boxed();
                        resubscribe_at = Some(Instant::now() + delay);
                    }
                },
                _ = sleep_until(resubscribe_at.unwrap_or(next_ping)), if resubscribe_at.is_some() && !draining => {
                    let window = self.gateway.config.session.pending_ack_window;
                    match self.gateway.broker.subscribe(&self.identity, &self.consumer_tag, window).await {
                        Ok(Subscription { deliveries: resumed, release }) => {
                            info!(identity = %self.identity, attempts = backoff.failures, "mailbox consumer resumed");
                            deliveries = resumed;
                            self.release = Some(release);
                            resubscribe_at = None;
                            backoff.reset();
                        }
                        Err(error) => {
                            let delay = backoff.fail();
                            warn!(identity = %self.identity, %error, retry_in = ?delay, "resubscribing to the mailbox failed");
                            resubscribe_at = Some(Instant::now() + delay);
                        }
                    }
                },
                frame = stream.next() => {
                    // Any frame shows the client is alive.
                    pong_deadline = None;
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            if let Err(end) = Box::pin(self.handle_text(sink, text.as_str())).await {
                                return end;
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let error = self.invalid(ErrorCode::InvalidFrame, "binary frames are not part of the protocol; send JSON text frames".to_owned(), None);
                            if let Err(end) = Box::pin(self.reply_invalid(sink, error)).await {
                                return end;
                            }
                        }
                        Some(Ok(Message::Close(_))) => return End::ClientClosed,
                        Some(Ok(_)) => {}
                        Some(Err(WsError::Capacity(error))) => {
                            return End::Close(
                                close_code::MESSAGE_TOO_BIG,
                                format!("{error}; the limits are session.max_frame_size and session.max_message_size"),
                            );
                        }
                        Some(Err(WsError::Utf8(_))) => {
                            return End::Close(
                                close_code::INVALID_PAYLOAD,
                                "a text frame was not valid UTF-8".to_owned(),
                            );
                        }
                        Some(Err(WsError::Protocol(error))) => {
                            return End::Close(close_code::PROTOCOL_ERROR, format!("WebSocket protocol error: {error}"));
                        }
                        Some(Err(error)) => return End::Gone(format!("read failed: {error}")),
                        None => return End::Gone("connection closed without a close frame".to_owned()),
                    }
                }
                _ = sleep_until(deadline) => {
                    if pong_deadline.is_some() {
                        return End::Close(close_code::PONG_TIMEOUT, "no pong within the pong timeout".to_owned());
                    }
                    if let Err(end) = Box::pin(self.send_message(sink, Message::Ping(Default::default()))).await {
                        return end;
                    }
                    next_ping = Instant::now() + config.ping_interval;
                    pong_deadline = Some(Instant::now() + config.pong_timeout);
                }
            }
        }
    }

    /// Pushes one delivery to the client and remembers it until the client acks.
    async fn push(&mut self, sink: &mut Sink, delivery: Delivery) -> Result<(), End> {
        let envelope = std::str::from_utf8(&delivery.body)
            .map_err(|error| error.to_string())
            .and_then(|text| Envelope::from_json(text).map_err(|error| error.to_string()));
        let envelope = match envelope {
            Ok(envelope) => envelope,
            Err(reason) => {
                // Not a wsgw envelope (a foreign publisher): park it in the dead-letter queue, never drop it.
                warn!(
                    identity = %self.identity,
                    message_id = ?delivery.message_id,
                    %reason,
                    "dead-lettering an invalid message from the mailbox"
                );
                let business = self.gateway.metrics.business("invalid");
                self.gateway
                    .metrics
                    .dead_lettered
                    .get_or_create(&business)
                    .inc();
                if let Err(error) = delivery.acker.dead_letter().await {
                    warn!(identity = %self.identity, %error, "dead-lettering failed; the broker will redeliver");
                }
                return Ok(());
            }
        };
        let message_id = envelope.id().to_owned();
        let business = self.gateway.metrics.business(&envelope.business_type);
        self.gateway
            .metrics
            .delivered
            .get_or_create(&business)
            .inc();
        if delivery.redelivered {
            self.gateway
                .metrics
                .redelivered
                .get_or_create(&business)
                .inc();
        }
        let business_type = envelope.business_type.clone();
        let frame = ServerFrame::Message {
            redelivered: delivery.redelivered,
            replay_count: delivery.replay_count,
            message: envelope,
        };
        self.pending.push_back(Pending {
            message_id: message_id.clone(),
            acker: delivery.acker,
            reply_to: delivery.reply_to,
            business_type,
            pushed_at: std::time::Instant::now(),
        });
        self.stats.pushed.fetch_add(1, Ordering::Relaxed);
        self.stats
            .pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
        debug!(identity = %self.identity, %message_id, redelivered = delivery.redelivered, "pushing message");
        self.send(sink, &frame).await
    }

    /// Pushes a broadcast. It is not in any mailbox, so the client's ack only needs to be recognised.
    async fn push_broadcast(
        &mut self,
        sink: &mut Sink,
        broadcast: &PreparedBroadcast,
    ) -> Result<(), End> {
        if self.recent_broadcasts.len() == RECENT_BROADCASTS {
            self.recent_broadcasts.pop_front();
        }
        self.recent_broadcasts
            .push_back(broadcast.message_id.clone());
        let business = self.gateway.metrics.business(&broadcast.business_type);
        self.gateway
            .metrics
            .delivered
            .get_or_create(&business)
            .inc();
        self.send_message(sink, Message::Text(broadcast.frame.clone()))
            .await
    }

    async fn handle_text(&mut self, sink: &mut Sink, text: &str) -> Result<(), End> {
        let policy = &self.gateway.config.policy;
        match inbound::classify(text, &self.identity, policy) {
            Inbound::Ack { message_id } => self.ack(sink, message_id).await,
            Inbound::Reject { message_id, reason } => self.reject(sink, message_id, reason).await,
            Inbound::Publish(publication) => {
                if let Err(not_until) = self.rate_limiter.check() {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(&self.clock));
                    let frame = ServerFrame::Error {
                        code: ErrorCode::RateLimited,
                        reason: format!(
                            "more than {} messages per second (session.rate_limit); resend with the same messageId \
                             in {} ms",
                            self.gateway.config.session.rate_limit,
                            wait.as_millis().max(1)
                        ),
                        message_id: Some(publication.envelope.id().to_owned()),
                    };
                    return self.send(sink, &frame).await;
                }
                self.client_send(sink, *publication).await
            }
            Inbound::Invalid(frame) => {
                self.invalid_frames += 1;
                self.reply_invalid(sink, frame).await
            }
            Inbound::Forbidden(frame) => self.send(sink, &frame).await,
        }
    }

    fn take_pending(&mut self, message_id: &str) -> Option<Pending> {
        let taken = self.take_pending_entry(message_id);
        self.stats
            .pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
        taken
    }

    fn take_pending_entry(&mut self, message_id: &str) -> Option<Pending> {
        let position = self
            .pending
            .iter()
            .position(|pending| pending.message_id == message_id)?;
        self.pending.remove(position)
    }

    async fn ack(&mut self, sink: &mut Sink, message_id: String) -> Result<(), End> {
        let Some(pending) = self.take_pending(&message_id) else {
            if self.recent_broadcasts.contains(&message_id) {
                return Ok(());
            }
            return self.unknown_message_id(sink, message_id).await;
        };
        // The client has the message: only now does it leave RabbitMQ.
        self.stats.acked.fetch_add(1, Ordering::Relaxed);
        let business = self.gateway.metrics.business(&pending.business_type);
        self.gateway.metrics.acked.get_or_create(&business).inc();
        self.gateway
            .metrics
            .ack_latency
            .observe(pending.pushed_at.elapsed().as_secs_f64());
        if let Err(error) = pending.acker.ack().await {
            warn!(identity = %self.identity, message_id = %message_id, %error, "ack failed; the message will be redelivered");
            return Ok(());
        }
        if let Some(reply_to) = pending.reply_to {
            let receipt = Receipt {
                message_id,
                unique_id: self.identity.unique_id.clone(),
                client_type: self.identity.client_type.clone(),
                node: self.gateway.node.clone(),
                acked_at: unix_millis(SystemTime::now()),
            };
            let gateway = self.gateway.clone();
            self.gateway
                .tasks
                .spawn(async move { gateway.broker.send_receipt(reply_to, receipt).await });
        }
        Ok(())
    }

    /// Publishes a message the client sent, already stamped with the sender's identity. The client gets an ack
    /// frame after the broker confirmed, or an error frame with the reason; a resend of a confirmed messageId is
    /// acked again without publishing.
    async fn client_send(&mut self, sink: &mut Sink, publication: Publication) -> Result<(), End> {
        let message_id = publication.envelope.id().to_owned();
        if self.gateway.dedupe.contains(&self.identity, &message_id) {
            debug!(identity = %self.identity, %message_id, "resend of a confirmed message; acking without publishing");
            return self.send(sink, &ServerFrame::Ack { message_id }).await;
        }
        if self.sends_in_flight >= self.gateway.config.session.max_sends_in_flight {
            let frame = ServerFrame::Error {
                code: ErrorCode::Unavailable,
                reason: "too many messages are waiting for a broker confirm; resend after the pending acks".to_owned(),
                message_id: Some(message_id),
            };
            return self.send(sink, &frame).await;
        }

        self.sends_in_flight += 1;
        let gateway = self.gateway.clone();
        let sender = self.identity.clone();
        let outcomes = self.outcomes.clone();
        self.gateway.tasks.spawn(async move {
            let business = gateway.metrics.business(&publication.envelope.business_type);
            let started = std::time::Instant::now();
            let frame = match gateway.broker.publish(publication).await {
                Ok(_) => {
                    gateway.metrics.observe_confirm(started.elapsed());
                    gateway.metrics.published.get_or_create(&business).inc();
                    gateway.dedupe.insert(&sender, &message_id);
                    ServerFrame::Ack { message_id }
                }
                Err(error) => {
                    info!(identity = %sender, %message_id, %error, "a client's message was not accepted");
                    ServerFrame::Error {
                        code: error_code(&error),
                        reason: error.to_string(),
                        message_id: Some(message_id),
                    }
                }
            };
            let _ = outcomes.send(SessionMessage::Outcome(Box::new(frame))).await;
        });
        Ok(())
    }

    async fn reject(
        &mut self,
        sink: &mut Sink,
        message_id: String,
        reason: String,
    ) -> Result<(), End> {
        let Some(pending) = self.take_pending(&message_id) else {
            return self.unknown_message_id(sink, message_id).await;
        };
        // Counted per recipient, because copies of one message to several client types share the messageId.
        let counted = format!("{}/{message_id}", self.identity);
        let rejections = self.gateway.rejections.reject(&counted);
        let limit = self.gateway.config.session.max_rejects;
        if rejections > limit {
            // Past the retry budget the message goes to the dead-letter queue (reason `rejected`), never loops.
            info!(identity = %self.identity, message_id = %message_id, %reason, rejections, "client rejected a message too often; dead-lettering it");
            self.gateway.rejections.forget(&counted);
            let business = self.gateway.metrics.business(&pending.business_type);
            self.gateway
                .metrics
                .dead_lettered
                .get_or_create(&business)
                .inc();
            if let Err(error) = pending.acker.dead_letter().await {
                warn!(identity = %self.identity, message_id = %message_id, %error, "dead-lettering failed; the message will be redelivered");
            }
        } else {
            info!(identity = %self.identity, message_id = %message_id, %reason, rejections, "client rejected a message; returning it to the mailbox");
            if let Err(error) = pending.acker.requeue().await {
                warn!(identity = %self.identity, message_id = %message_id, %error, "requeue failed; the message will be redelivered");
            }
        }
        Ok(())
    }

    /// Sends UNKNOWN_MESSAGE_ID for an ack or reject of a messageId this session is not waiting for. Not counted as an invalid frame:
    /// a duplicate ack or an ack of an old broadcast is a benign client mistake.
    async fn unknown_message_id(&mut self, sink: &mut Sink, message_id: String) -> Result<(), End> {
        let frame = ServerFrame::Error {
            code: ErrorCode::UnknownMessageId,
            reason: "no message with this messageId is waiting for an ack on this session"
                .to_owned(),
            message_id: Some(message_id),
        };
        self.send(sink, &frame).await
    }

    /// Counts an invalid frame and builds the error frame for it.
    fn invalid(
        &mut self,
        code: ErrorCode,
        reason: String,
        message_id: Option<String>,
    ) -> ServerFrame {
        self.invalid_frames += 1;
        ServerFrame::Error {
            code,
            reason,
            message_id,
        }
    }

    async fn reply_invalid(&mut self, sink: &mut Sink, error: ServerFrame) -> Result<(), End> {
        self.send(sink, &error).await?;
        if self.invalid_frames >= self.gateway.config.session.max_invalid_frames {
            return Err(End::Close(
                close_code::POLICY_VIOLATION,
                "too many invalid frames".to_owned(),
            ));
        }
        Ok(())
    }

    async fn send(&mut self, sink: &mut Sink, frame: &ServerFrame) -> Result<(), End> {
        self.send_message(sink, Message::text(frame.to_json()))
            .await
    }

    async fn send_message(&mut self, sink: &mut Sink, message: Message) -> Result<(), End> {
        let timeout = self.gateway.config.session.write_timeout;
        match tokio::time::timeout(timeout, sink.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(End::Gone(format!("write failed: {error}"))),
            Err(_) => Err(End::Gone(format!(
                "the client did not read a frame within {} (slow client)",
                humantime::format_duration(timeout)
            ))),
        }
    }
}

/// Builds the limiter of messages a client sends: `rate_limit` per second with bursts of `rate_limit_burst`.
fn rate_limiter(config: &crate::config::SessionConfig) -> governor::DefaultDirectRateLimiter {
    // Config validation keeps both at least 1.
    let rate = std::num::NonZeroU32::new(config.rate_limit).unwrap_or(std::num::NonZeroU32::MIN);
    let burst =
        std::num::NonZeroU32::new(config.rate_limit_burst).unwrap_or(std::num::NonZeroU32::MIN);
    governor::RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(burst))
}

/// Returns the `reason` label of the disconnects counter.
fn disconnect_reason(end: &End) -> &'static str {
    match end {
        End::Close(close_code::REPLACED, _) => "replaced",
        End::Close(close_code::KICKED, _) => "kicked",
        End::Close(close_code::PONG_TIMEOUT, _) => "pong_timeout",
        End::Close(close_code::GOING_AWAY, _) => "shutdown",
        End::Close(close_code::POLICY_VIOLATION, _) => "policy_violation",
        End::Close(close_code::MESSAGE_TOO_BIG, _) => "message_too_big",
        End::Close(close_code::INVALID_PAYLOAD | close_code::PROTOCOL_ERROR, _) => "protocol_error",
        End::Close(close_code::BROKER_UNAVAILABLE, _) => "broker_unavailable",
        End::Close(..) => "other",
        End::ClientClosed => "client_closed",
        End::Gone(reason) if reason.contains("slow client") => "slow_client",
        End::Gone(_) => "connection_lost",
    }
}

/// Returns the error code a client sees for a broker error.
fn error_code(error: &BrokerError) -> ErrorCode {
    match error {
        BrokerError::Unroutable { .. } => ErrorCode::Unroutable,
        BrokerError::Refused { .. } | BrokerError::MemoryFull { .. } => ErrorCode::Refused,
        _ => ErrorCode::Unavailable,
    }
}

/// After the gateway sent a close frame, reads and discards what the client still sends, for at most a second.
/// Closing a socket with unread input makes the kernel reset the connection. A reset can destroy the close frame
/// before the client reads it, so draining first lets the client see the close code (1009 after an oversized
/// frame, for example).
async fn linger(sink: Sink, stream: SplitStream<Socket>, gateway: &Gateway) {
    use tokio::io::AsyncReadExt;
    let Ok(mut socket) = sink.reunite(stream) else {
        return;
    };
    let limit = gateway.config.session.max_message_size.saturating_mul(2);
    let io = socket.get_mut();
    let drain = async {
        use tokio::io::AsyncWriteExt;
        // After our FIN a well-behaved client closes its side too, which ends the drain at once.
        let _ = io.shutdown().await;
        let mut buffer = [0u8; 4096];
        let mut drained = 0usize;
        while drained < limit {
            match io.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => drained += read,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}

async fn close(sink: &mut Sink, code: u16, reason: &str, gateway: &Gateway) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let timeout = gateway.config.session.write_timeout;
    let _ = tokio::time::timeout(timeout, sink.send(Message::Close(Some(frame)))).await;
}
