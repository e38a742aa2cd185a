//! A client that stays connected: it fetches a fresh connection URL before every connect, reconnects with
//! exponential backoff and jitter, drops duplicate messages, skips stale messages of replaceable types, and
//! resends the messages it sent until the gateway confirms them.
//!
//! ```no_run
//! # async fn example() {
//! use std::sync::Arc;
//! use wsgw::client::{ClientEvent, ClientOptions, ReliableClient, UrlSource};
//!
//! // Ask the business backend (or the gateway's token endpoint) for a new URL before every connect.
//! let urls: UrlSource = Arc::new(|| Box::pin(async { Ok("ws://127.0.0.1:8086/socket/...".to_owned()) }));
//! let (client, mut events) = ReliableClient::start(urls, ClientOptions::default());
//! while let Some(event) = events.recv().await {
//!     if let ClientEvent::Message(message) = event {
//!         println!("{}", message.envelope.content);
//!         client.ack(message.envelope.id()).await;
//!     }
//! }
//! # }
//! ```
//!
//! The behaviour matches the browser client in clients/js: after close code 4001 (replaced) the client stops,
//! after 4002 (kicked) it waits `kicked_wait` before reconnecting, and any other close leads to a reconnect.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Client, ClientError, Event, IncomingMessage, Welcome};
use crate::broker::Backoff;
use crate::domain::Envelope;
use crate::domain::frame::{ErrorCode, close_code};
use crate::tls::ClientTls;

/// Returns a fresh connection URL; called before every connect, because tokens are single use.
pub type UrlSource = Arc<dyn Fn() -> BoxFuture<'static, Result<String, ClientError>> + Send + Sync>;

/// Settings of a [`ReliableClient`].
#[derive(Clone)]
pub struct ClientOptions {
    /// Certificate authorities trusted for `wss://` URLs.
    pub tls: ClientTls,
    /// messageTypes whose newer message replaces an older one, such as a QR code: a message older by the order
    /// key (timestamp, then messageId) than one already delivered of its type is acked and reported as stale.
    pub replaceable: HashSet<String>,
    /// First reconnect delay; it doubles after each failed attempt, with jitter.
    pub initial_backoff: Duration,
    /// Maximum reconnect delay.
    pub max_backoff: Duration,
    /// Wait before reconnecting after an operator closed the session (close code 4002).
    pub kicked_wait: Duration,
    /// Acked messageIds remembered to drop redelivered duplicates.
    pub dedupe_capacity: usize,
    /// Messages sent and not yet confirmed; further sends fail with [`SendError::TooManyPending`].
    pub max_pending_sends: usize,
    /// Events buffered for the caller; the client stops reading from the gateway while the buffer is full.
    pub event_buffer: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            tls: ClientTls::default(),
            replaceable: HashSet::new(),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            kicked_wait: Duration::from_secs(60),
            dedupe_capacity: 1_000,
            max_pending_sends: 256,
            event_buffer: 64,
        }
    }
}

/// An event the client reports to its caller.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// A connection is open; it follows every reconnect.
    Open(Welcome),
    /// A new message. Ack it with [`ClientHandle::ack`] once processed, or reject it.
    Message(Box<IncomingMessage>),
    /// A message of a replaceable type older than one already delivered; the client acked it.
    Stale(Box<IncomingMessage>),
    /// An error frame not tied to a message this client is sending.
    Error {
        code: ErrorCode,
        reason: String,
        message_id: Option<String>,
    },
    /// The connection closed; a reconnect follows unless the session was replaced or the client stopped.
    Closed { code: Option<u16>, reason: String },
    /// The client waits `delay` before connect attempt number `attempt`.
    Reconnecting {
        attempt: u32,
        delay: Duration,
        reason: String,
    },
    /// A newer connection of the same identity took over (close code 4001). The client has stopped.
    Replaced { reason: String },
}

/// Why a message sent with [`ClientHandle::send`] was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SendError {
    #[error("the gateway rejected message {message_id} with {code:?}: {reason}")]
    Rejected {
        message_id: String,
        code: ErrorCode,
        reason: String,
    },
    #[error(
        "{0} messages are already waiting for the gateway's confirm (ClientOptions::max_pending_sends)"
    )]
    TooManyPending(usize),
    #[error("the client stopped before the gateway confirmed message {0}")]
    Stopped(String),
}

enum Command {
    Ack(String),
    Reject(String, String),
    Send(Box<Envelope>, oneshot::Sender<Result<String, SendError>>),
    /// Ends the client; the sender is notified once the connection is closed.
    Stop(oneshot::Sender<()>),
}

/// Controls a running [`ReliableClient`]; cheap to clone.
#[derive(Clone)]
pub struct ClientHandle {
    commands: mpsc::Sender<Command>,
}

impl ClientHandle {
    /// Acks a message: the gateway then removes it from the mailbox. A message acked here is dropped if it is
    /// delivered again.
    pub async fn ack(&self, message_id: &str) {
        let _ = self
            .commands
            .send(Command::Ack(message_id.to_owned()))
            .await;
    }

    /// Rejects a message the caller cannot process; the gateway returns it to the mailbox.
    pub async fn reject(&self, message_id: &str, reason: &str) {
        let _ = self
            .commands
            .send(Command::Reject(message_id.to_owned(), reason.to_owned()))
            .await;
    }

    /// Sends a message and waits until the gateway confirms it; returns its messageId. A message without a
    /// messageId gets one, and the client resends it with that id after a reconnect or an UNAVAILABLE or
    /// RATE_LIMITED error, so the gateway publishes it once.
    pub async fn send(&self, mut envelope: Envelope) -> Result<String, SendError> {
        if envelope.message_id.is_none() {
            envelope.message_id = Some(uuid::Uuid::now_v7().to_string());
        }
        let message_id = envelope.id().to_owned();
        let (reply, result) = oneshot::channel();
        if self
            .commands
            .send(Command::Send(Box::new(envelope), reply))
            .await
            .is_err()
        {
            return Err(SendError::Stopped(message_id));
        }
        result.await.unwrap_or(Err(SendError::Stopped(message_id)))
    }

    /// Sends the acks given so far, closes the connection and ends the client; its event stream ends. Returns
    /// once the connection is closed, so a program may exit right after.
    pub async fn stop(&self) {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Stop(done)).await.is_ok() {
            let _ = closed.await;
        }
    }
}

/// Starts [`ReliableClient`]s.
pub struct ReliableClient;

impl ReliableClient {
    /// Starts a client in a background task and returns its handle and its events.
    pub fn start(
        urls: UrlSource,
        options: ClientOptions,
    ) -> (ClientHandle, mpsc::Receiver<ClientEvent>) {
        Self::spawn(None, urls, options)
    }

    /// Starts a client on a connection the caller opened, so that a first failure (a bad API key, an untrusted
    /// certificate) reaches the caller as an error instead of a reconnect.
    pub fn start_connected(
        client: Client,
        urls: UrlSource,
        options: ClientOptions,
    ) -> (ClientHandle, mpsc::Receiver<ClientEvent>) {
        Self::spawn(Some(client), urls, options)
    }

    fn spawn(
        first: Option<Client>,
        urls: UrlSource,
        options: ClientOptions,
    ) -> (ClientHandle, mpsc::Receiver<ClientEvent>) {
        let (commands, command_receiver) = mpsc::channel(64);
        let (events, event_receiver) = mpsc::channel(options.event_buffer.max(1));
        let worker = Worker {
            urls,
            backoff: Backoff::new(options.initial_backoff, options.max_backoff),
            options,
            commands: command_receiver,
            events,
            acked: Recent::default(),
            in_progress: Recent::default(),
            newest: HashMap::new(),
            pending: VecDeque::new(),
            stopped: None,
        };
        tokio::spawn(worker.run(first));
        (ClientHandle { commands }, event_receiver)
    }
}

/// The last messageIds the caller acked, bounded.
#[derive(Default)]
struct Recent {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl Recent {
    fn insert(&mut self, id: &str, capacity: usize) {
        if self.set.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
            while self.order.len() > capacity.max(1) {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn remove(&mut self, id: &str) {
        if self.set.remove(id) {
            self.order.retain(|entry| entry != id);
        }
    }
}

/// A message the caller sent that the gateway has not confirmed yet.
struct PendingSend {
    envelope: Envelope,
    reply: oneshot::Sender<Result<String, SendError>>,
}

/// The reason the connection loop ended.
enum Ended {
    /// Reconnect after the usual backoff, or after `wait` when given.
    Reconnect {
        reason: String,
        wait: Option<Duration>,
    },
    /// The caller stopped the client, or the session was replaced.
    Stop,
}

struct Worker {
    urls: UrlSource,
    options: ClientOptions,
    backoff: Backoff,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<ClientEvent>,
    acked: Recent,
    /// Messages handed to the caller and not yet acked or rejected; a redelivery of one is not handed over again,
    /// and the caller's ack then goes to the connection that has it now.
    in_progress: Recent,
    /// Order key of the newest message delivered per replaceable messageType.
    newest: HashMap<String, (u64, String)>,
    pending: VecDeque<PendingSend>,
    /// Notified when the client has stopped, if the caller requested it.
    stopped: Option<oneshot::Sender<()>>,
}

impl Worker {
    async fn run(mut self, mut connected: Option<Client>) {
        let mut reason = "first connect".to_owned();
        let mut wait = None;
        let mut first = true;
        loop {
            if !first {
                let delay = wait.take().unwrap_or_else(|| self.backoff.fail());
                let attempt = self.backoff.failures.max(1);
                self.emit(ClientEvent::Reconnecting {
                    attempt,
                    delay,
                    reason: reason.clone(),
                })
                .await;
                if self.sleep_or_stop(delay).await {
                    break;
                }
            }
            first = false;
            let client = match connected.take() {
                Some(client) => Ok(client),
                None => match (self.urls)().await {
                    Ok(url) => Client::connect_with_tls(&url, &self.options.tls).await,
                    Err(error) => Err(error),
                },
            };
            let client = match client {
                Ok(client) => client,
                Err(error) => {
                    reason = error.to_string();
                    continue;
                }
            };
            self.backoff.reset();
            match self.serve(client).await {
                Ended::Stop => break,
                Ended::Reconnect {
                    reason: why,
                    wait: after,
                } => {
                    reason = why;
                    wait = after;
                }
            }
        }
        for pending in self.pending.drain(..) {
            let id = pending.envelope.id().to_owned();
            let _ = pending.reply.send(Err(SendError::Stopped(id)));
        }
        if let Some(done) = self.stopped.take() {
            let _ = done.send(());
        }
    }

    /// Sleeps, still taking commands; returns true when the caller stopped the client meanwhile.
    async fn sleep_or_stop(&mut self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return false,
                command = self.commands.recv() => match command {
                    None => return true,
                    Some(Command::Stop(done)) => {
                        self.stopped = Some(done);
                        return true;
                    }
                    Some(Command::Send(envelope, reply)) => self.queue_send(*envelope, reply),
                    // The message came on the lost connection; it will be delivered again and dropped then.
                    Some(Command::Ack(id)) => {
                        self.in_progress.remove(&id);
                        self.acked.insert(&id, self.options.dedupe_capacity);
                    }
                    // Handed over again when it is delivered again.
                    Some(Command::Reject(id, _)) => self.in_progress.remove(&id),
                },
            }
        }
    }

    fn queue_send(
        &mut self,
        envelope: Envelope,
        reply: oneshot::Sender<Result<String, SendError>>,
    ) {
        if self.pending.len() >= self.options.max_pending_sends {
            let _ = reply.send(Err(SendError::TooManyPending(self.pending.len())));
            return;
        }
        self.pending.push_back(PendingSend { envelope, reply });
    }

    async fn emit(&self, event: ClientEvent) {
        let _ = self.events.send(event).await;
    }

    /// Runs one connection until it closes or the client stops.
    async fn serve(&mut self, mut client: Client) -> Ended {
        self.emit(ClientEvent::Open(client.welcome.clone())).await;
        for pending in &self.pending {
            if let Err(error) = client.send(pending.envelope.clone()).await {
                return reconnect(error.to_string());
            }
        }
        let mut retry_at: Option<Instant> = None;
        loop {
            let retry = retry_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                command = self.commands.recv() => {
                    let result = match command {
                        None => {
                            let _ = client.close().await;
                            return Ended::Stop;
                        }
                        Some(Command::Stop(done)) => {
                            let _ = client.close().await;
                            self.stopped = Some(done);
                            return Ended::Stop;
                        }
                        Some(Command::Ack(id)) => {
                            self.in_progress.remove(&id);
                            self.acked.insert(&id, self.options.dedupe_capacity);
                            client.ack(&id).await
                        }
                        Some(Command::Reject(id, why)) => {
                            self.in_progress.remove(&id);
                            client.reject(&id, &why).await
                        }
                        Some(Command::Send(envelope, reply)) => {
                            let queued = self.pending.len() < self.options.max_pending_sends;
                            let copy = (*envelope).clone();
                            self.queue_send(*envelope, reply);
                            if queued { client.send(copy).await } else { Ok(()) }
                        }
                    };
                    if let Err(error) = result {
                        return reconnect(error.to_string());
                    }
                }
                _ = tokio::time::sleep_until(retry), if retry_at.is_some() => {
                    retry_at = None;
                    for pending in &self.pending {
                        if let Err(error) = client.send(pending.envelope.clone()).await {
                            return reconnect(error.to_string());
                        }
                    }
                }
                event = client.next_event() => match event {
                    Ok(Event::Message(message)) => {
                        if let Err(error) = self.deliver(&mut client, message).await {
                            return reconnect(error.to_string());
                        }
                    }
                    Ok(Event::Ack { message_id }) => {
                        if let Some(position) = self.pending.iter().position(|p| p.envelope.id() == message_id) {
                            if let Some(pending) = self.pending.remove(position) {
                                let _ = pending.reply.send(Ok(message_id));
                            }
                        }
                    }
                    Ok(Event::Error { code, reason, message_id }) => {
                        let position = message_id.as_deref().and_then(|id| {
                            self.pending.iter().position(|p| p.envelope.id() == id)
                        });
                        match position {
                            Some(_) if matches!(code, ErrorCode::Unavailable | ErrorCode::RateLimited) => {
                                // Transient: every pending message goes again with its messageId.
                                retry_at.get_or_insert_with(|| Instant::now() + self.backoff.clone().fail());
                            }
                            Some(position) => {
                                if let Some(pending) = self.pending.remove(position) {
                                    let message_id = pending.envelope.id().to_owned();
                                    let _ = pending.reply.send(Err(SendError::Rejected { message_id, code, reason }));
                                }
                            }
                            None => self.emit(ClientEvent::Error { code, reason, message_id }).await,
                        }
                    }
                    Ok(Event::Closed { code, reason }) => {
                        self.emit(ClientEvent::Closed { code, reason: reason.clone() }).await;
                        return match code {
                            Some(close_code::REPLACED) => {
                                self.emit(ClientEvent::Replaced { reason }).await;
                                Ended::Stop
                            }
                            Some(close_code::KICKED) => Ended::Reconnect {
                                reason: format!("kicked: {reason}"),
                                wait: Some(self.options.kicked_wait),
                            },
                            _ => reconnect(format!("closed with code {code:?}: {reason}")),
                        };
                    }
                    Err(error) => {
                        self.emit(ClientEvent::Closed { code: None, reason: error.to_string() }).await;
                        return reconnect(error.to_string());
                    }
                },
            }
        }
    }

    /// Hands a message to the caller, unless it is a duplicate (acked again) or stale (acked and reported).
    async fn deliver(
        &mut self,
        client: &mut Client,
        message: Box<IncomingMessage>,
    ) -> Result<(), ClientError> {
        let id = message.envelope.id().to_owned();
        if self.acked.contains(&id) {
            return client.ack(&id).await;
        }
        if self.in_progress.contains(&id) {
            return Ok(());
        }
        let message_type = &message.envelope.message_type;
        if self.options.replaceable.contains(message_type) {
            let key = (message.envelope.timestamp.unwrap_or(0), id.clone());
            if self
                .newest
                .get(message_type)
                .is_some_and(|newest| key < *newest)
            {
                self.acked.insert(&id, self.options.dedupe_capacity);
                client.ack(&id).await?;
                self.emit(ClientEvent::Stale(message)).await;
                return Ok(());
            }
            self.newest.insert(message_type.clone(), key);
        }
        self.in_progress.insert(&id, self.options.dedupe_capacity);
        self.emit(ClientEvent::Message(message)).await;
        Ok(())
    }
}

fn reconnect(reason: String) -> Ended {
    Ended::Reconnect { reason, wait: None }
}
