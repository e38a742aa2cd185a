//! The gateway: one HTTP listener serving the token endpoint, the WebSocket sessions and the health checks.
//!
//! Invariants: the number of open TCP connections is capped by `server.max_connections`; every task is
//! tracked and raced against the shutdown token; a token or API key is never logged.

pub mod admission;
pub mod auth;
mod broadcast;
pub mod dedupe;
mod http;
pub mod inbound;
pub mod registry;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::broker::{Broker, ControlEnvelope, ControlMessage, ControlReply};
use crate::config::Config;
use crate::domain::TokenSigner;
use auth::UsedTokens;
use dedupe::{DedupeWindow, RejectCounter};
use registry::{Registry, Takeover};

/// Messages whose rejections are counted at once; the oldest entries are forgotten first.
const REJECT_COUNTER_CAPACITY: usize = 100_000;

/// The credentials a request is checked against.
pub struct AuthKeys {
    pub signer: TokenSigner,
    pub api_keys: Vec<String>,
}

/// Everything a request handler or a session needs, shared by all of them.
pub struct Gateway {
    pub config: Config,
    /// This node's name, in welcome frames and takeover announcements.
    pub node: String,
    /// Base of the connection URLs handed out by the token endpoint, `ws://` or `wss://`.
    pub public_url: String,
    pub broker: Arc<dyn Broker>,
    /// The token signer and API keys; replaced as a whole when secrets are reloaded (SIGHUP).
    keys: RwLock<Arc<AuthKeys>>,
    pub origins: admission::Origins,
    pub proxies: admission::TrustedProxies,
    pub session_limits: Arc<admission::SessionLimits>,
    pub registry: Registry,
    pub used_tokens: UsedTokens,
    pub dedupe: DedupeWindow,
    pub rejections: RejectCounter,
    pub broadcast_bindings: broadcast::Bindings,
    /// Cancelled when the gateway shuts down; every loop races it.
    pub shutdown: CancellationToken,
    /// Every connection and session task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub metrics: crate::metrics::Metrics,
    /// Other nodes and when this node last heard their heartbeat.
    peers: Mutex<HashMap<String, Instant>>,
}

impl Gateway {
    pub fn new(
        config: Config,
        node: String,
        public_url: String,
        broker: Arc<dyn Broker>,
        signer: TokenSigner,
        api_keys: Vec<String>,
        shutdown: CancellationToken,
    ) -> Arc<Gateway> {
        let used_tokens = UsedTokens::new(config.auth.used_token_capacity, config.auth.clock_skew);
        let origins = admission::Origins::new(&config.server.allowed_origins);
        let proxies = admission::TrustedProxies::new(&config.server.trusted_proxies);
        let session_limits = admission::SessionLimits::new(
            config.server.max_sessions,
            config.server.max_sessions_per_address,
        );
        let signer = signer.with_clock_skew(config.auth.clock_skew);
        let dedupe = DedupeWindow::new(config.session.dedupe_window);
        Arc::new(Gateway {
            config,
            node,
            public_url,
            broker,
            keys: RwLock::new(Arc::new(AuthKeys { signer, api_keys })),
            origins,
            proxies,
            session_limits,
            registry: Registry::default(),
            used_tokens,
            dedupe,
            rejections: RejectCounter::new(REJECT_COUNTER_CAPACITY),
            broadcast_bindings: broadcast::Bindings::default(),
            shutdown,
            tasks: TaskTracker::new(),
            peers: Mutex::new(HashMap::new()),
            metrics: crate::metrics::Metrics::new(),
        })
    }

    /// The current token signer and API keys.
    pub fn keys(&self) -> Arc<AuthKeys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the token signer and API keys; sessions already open are not affected.
    pub fn reload_keys(&self, signer: TokenSigner, api_keys: Vec<String>) {
        let keys = AuthKeys {
            signer: signer.with_clock_skew(self.config.auth.clock_skew),
            api_keys,
        };
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }

    /// Serves plain HTTP on `listener` until the shutdown token is cancelled, then waits up to `grace` for open
    /// connections.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener, grace: Duration) {
        self.serve_with_tls(listener, grace, None).await;
    }

    /// Serves `listener` like [`Gateway::serve`], running the TLS handshake on each connection first when `tls`
    /// is set (HTTPS and wss).
    pub async fn serve_with_tls(
        self: &Arc<Self>,
        listener: TcpListener,
        grace: Duration,
        tls: Option<TlsAcceptor>,
    ) {
        self.spawn_control_listener();
        broadcast::spawn_fan_out(self);
        let connection_limit = Arc::new(Semaphore::new(self.config.server.max_connections));
        let mut accept_backoff = Duration::from_millis(10);
        loop {
            let permit = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                permit = connection_limit.clone().acquire_owned() => match permit {
                    Ok(permit) => Arc::new(permit),
                    Err(_) => break,
                },
            };
            let (stream, remote) = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => {
                        accept_backoff = Duration::from_millis(10);
                        accepted
                    }
                    Err(error) => {
                        // Usually out of file descriptors: wait instead of spinning.
                        warn!(%error, backoff = ?accept_backoff, "accepting a connection failed");
                        tokio::time::sleep(accept_backoff).await;
                        accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            let gateway = self.clone();
            let tls = tls.clone();
            self.tasks.spawn(async move {
                gateway.serve_connection(stream, remote, permit, tls).await;
            });
        }
        // Closing the listener makes new connections fail at once instead of waiting in the backlog.
        drop(listener);
        info!(
            open_tasks = self.tasks.len(),
            "stopped accepting connections"
        );
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                abandoned = self.tasks.len(),
                "shutdown grace period passed with tasks still running"
            );
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
        permit: Arc<tokio::sync::OwnedSemaphorePermit>,
        tls: Option<TlsAcceptor>,
    ) {
        let _ = stream.set_nodelay(true);
        let Some(acceptor) = tls else {
            self.serve_http(stream, remote, permit).await;
            return;
        };
        // The TLS handshake gets `server.handshake_timeout`, and the request head then gets the same again.
        // A failed handshake, such as a plain-HTTP request to this port, closes only this connection.
        let timeout = self.config.server.handshake_timeout;
        let handshake = tokio::time::timeout(timeout, acceptor.accept(stream));
        let stream = tokio::select! {
            result = handshake => match result {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    debug!(%remote, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%remote, ?timeout, "TLS handshake timed out");
                    return;
                }
            },
            _ = self.shutdown.cancelled() => return,
        };
        self.serve_http(stream, remote, permit).await;
    }

    /// Runs HTTP/1.1 with WebSocket upgrades on one connection, plain or TLS, until it closes or the gateway
    /// shuts down.
    async fn serve_http<S>(
        self: Arc<Self>,
        stream: S,
        remote: SocketAddr,
        permit: Arc<tokio::sync::OwnedSemaphorePermit>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let gateway = self.clone();
        let service = service_fn(move |request| {
            http::route(gateway.clone(), remote, permit.clone(), request)
        });
        // A client gets `server.handshake_timeout` to send a complete request head; one that sends nothing or
        // trickles bytes (slowloris) is disconnected instead of holding a connection slot.
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.server.handshake_timeout)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    debug!(%remote, %error, "HTTP connection ended with an error");
                }
            }
            _ = self.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    }

    /// Handles control messages from all nodes: takeovers close older local sessions, heartbeats record peers,
    /// and session listings and kicks get a reply. Also sends this node's heartbeat.
    fn spawn_control_listener(self: &Arc<Self>) {
        let gateway = self.clone();
        let mut messages = self.broker.control_messages();
        self.tasks.spawn(async move {
            let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
            loop {
                let received = tokio::select! {
                    _ = gateway.shutdown.cancelled() => break,
                    _ = heartbeat.tick() => {
                        let beat = ControlMessage::Heartbeat { node: gateway.node.clone() };
                        if let Err(error) = gateway.broker.announce(beat).await {
                            debug!(%error, "sending the heartbeat failed");
                        }
                        continue;
                    }
                    received = messages.recv() => received,
                };
                match received {
                    Ok(envelope) => gateway.handle_control(envelope).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(skipped)) => {
                        warn!(
                            skipped,
                            "control messages were skipped because this node read them too slowly"
                        );
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }

    async fn handle_control(&self, envelope: ControlEnvelope) {
        let reply = match envelope.message {
            ControlMessage::Takeover {
                identity,
                session_id,
                node,
                token_nonce,
                token_expires_at_ms,
            } => {
                if let Some(nonce) = &token_nonce {
                    // The token is spent on every node, not only where it was used.
                    self.used_tokens.remember(nonce, token_expires_at_ms);
                }
                match self
                    .registry
                    .apply_takeover(&identity, &session_id, token_nonce.as_deref())
                {
                    Takeover::Replaced => {
                        info!(%identity, by_node = %node, "session replaced by a newer connection");
                    }
                    Takeover::KeptAgainstReuse { local_session_id } => {
                        warn!(%identity, by_node = %node, "a reused token did not take over the live session");
                        // Announcing the original session again makes the other node close the reuse, also
                        // when that node had not heard of the token (it started after the first announcement).
                        let original = ControlMessage::Takeover {
                            identity,
                            session_id: local_session_id,
                            node: self.node.clone(),
                            token_nonce,
                            token_expires_at_ms,
                        };
                        if let Err(error) = self.broker.announce(original).await {
                            warn!(%error, "announcing the original session after a token reuse failed");
                        }
                    }
                    Takeover::ClosedReuse => {
                        warn!(%identity, by_node = %node, "closed a session that reused a token already in use");
                    }
                    Takeover::NoLocalSession => {}
                }
                None
            }
            ControlMessage::Heartbeat { node } => {
                if node != self.node {
                    self.peers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(node, Instant::now());
                }
                None
            }
            ControlMessage::ListSessions { request_id } => Some(ControlReply::Sessions {
                request_id,
                node: self.node.clone(),
                sessions: self.registry.views(&self.node),
                peers: self.peers(),
            }),
            ControlMessage::Kick {
                request_id,
                session_id,
            } => {
                let kicked = self.registry.kick(&session_id);
                if kicked {
                    info!(session_id = %session_id, "session kicked by an operator");
                }
                Some(ControlReply::Kick {
                    request_id,
                    node: self.node.clone(),
                    kicked,
                })
            }
        };
        if let (Some(reply), Some(reply_to)) = (reply, envelope.reply_to) {
            self.broker.send_control_reply(reply_to, reply).await;
        }
    }

    /// Nodes this node heard a heartbeat from within [`PEER_TIMEOUT`].
    pub fn peers(&self) -> Vec<String> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.retain(|_, seen| seen.elapsed() < PEER_TIMEOUT);
        let mut names: Vec<String> = peers.keys().cloned().collect();
        names.sort();
        names
    }
}

/// How often a node announces that it is alive.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// How long a node counts as a peer after its last heartbeat.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);
