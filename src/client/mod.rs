//! The client side of the wsgw.v1 protocol, for Rust backends, tests and `wsgw listen`.
//!
//! ```no_run
//! # async fn example(url: &str) -> Result<(), wsgw::client::ClientError> {
//! let mut client = wsgw::client::Client::connect(url).await?;
//! while let wsgw::client::Event::Message(message) = client.next_event().await? {
//!     println!("{}", message.envelope.content);
//!     client.ack(message.envelope.id()).await?;
//! }
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::domain::frame::{ErrorCode, PROTOCOL_V1};
use crate::domain::{ClientFrame, Envelope, Identity, ServerFrame};
use crate::http_client::{self, HttpError};
use crate::tls::{self, ClientTls};

/// A failure of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the gateway rejected the connection with HTTP {status}: {description}")]
    Rejected { status: u16, description: String },
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The TLS handshake failed, for example because the server's certificate is not trusted: library callers
    /// trust an extra CA with [`ClientTls::new`].
    #[error("TLS handshake with {url} failed: {reason}")]
    Tls { url: String, reason: String },
    #[error("the gateway broke the protocol: {0}")]
    Protocol(String),
    #[error("the connection failed: {0}")]
    Connection(String),
    #[error(transparent)]
    Http(#[from] HttpError),
}

/// A business message pushed by the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingMessage {
    pub envelope: Envelope,
    pub redelivered: bool,
    pub replay_count: u32,
}

/// Something the gateway sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Message(Box<IncomingMessage>),
    /// The gateway accepted a message this client sent.
    Ack {
        message_id: String,
    },
    Error {
        code: ErrorCode,
        reason: String,
        message_id: Option<String>,
    },
    /// The connection closed; `code` is the WebSocket close code, if the gateway sent one.
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

/// The session details from the welcome frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub session_id: String,
    pub node: String,
    pub identity: Identity,
    pub pending_ack_window: u16,
}

/// A connected client.
pub struct Client {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Welcome,
    /// Code and reason of the close frame received, until `next_event` reports it.
    close_frame: Option<(Option<u16>, String)>,
}

impl Client {
    /// Connects to a `ws://` or `wss://` URL from the token endpoint and waits for the welcome frame. A `wss://`
    /// server's certificate must chain to one of the webpki roots.
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        Self::connect_with_tls(url, &ClientTls::default()).await
    }

    /// Connects like [`Client::connect`], trusting the certificate authorities of `tls` for `wss://` URLs.
    pub async fn connect_with_tls(url: &str, tls: &ClientTls) -> Result<Client, ClientError> {
        let mut request = url
            .into_client_request()
            .map_err(|error| ClientError::Connect {
                url: redact_token(url),
                reason: error.to_string(),
            })?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(PROTOCOL_V1),
        );
        let connector = Connector::Rustls(tls.config());
        let (socket, _) =
            tokio_tungstenite::connect_async_tls_with_config(request, None, false, Some(connector))
                .await
                .map_err(|error| connect_error(url, error))?;
        let mut client = Client {
            socket,
            welcome: Welcome {
                session_id: String::new(),
                node: String::new(),
                identity: Identity {
                    unique_id: String::new(),
                    client_type: String::new(),
                },
                pending_ack_window: 0,
            },
            close_frame: None,
        };
        match client.next_frame().await? {
            Some(ServerFrame::Welcome {
                session_id,
                node,
                unique_id,
                client_type,
                pending_ack_window,
                ..
            }) => {
                client.welcome = Welcome {
                    session_id,
                    node,
                    identity: Identity {
                        unique_id,
                        client_type,
                    },
                    pending_ack_window,
                };
                Ok(client)
            }
            Some(other) => Err(ClientError::Protocol(format!(
                "expected a welcome frame first, got {}",
                other.to_json()
            ))),
            None => Err(ClientError::Connection(client.closed_reason())),
        }
    }

    /// Waits for the next event. Pongs to the gateway's pings are sent automatically.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        match self.next_frame().await? {
            Some(ServerFrame::Message {
                redelivered,
                replay_count,
                message,
            }) => Ok(Event::Message(Box::new(IncomingMessage {
                envelope: message,
                redelivered,
                replay_count,
            }))),
            Some(ServerFrame::Ack { message_id }) => Ok(Event::Ack { message_id }),
            Some(ServerFrame::Error {
                code,
                reason,
                message_id,
            }) => Ok(Event::Error {
                code,
                reason,
                message_id,
            }),
            Some(ServerFrame::Welcome { .. }) => Err(ClientError::Protocol(
                "a second welcome frame arrived".to_owned(),
            )),
            None => {
                let (code, reason) = self.close_frame.take().unwrap_or((None, String::new()));
                Ok(Event::Closed { code, reason })
            }
        }
    }

    /// Acks a message: the gateway then removes it from the mailbox.
    pub async fn ack(&mut self, message_id: &str) -> Result<(), ClientError> {
        self.send_frame(&ClientFrame::Ack {
            message_id: message_id.to_owned(),
        })
        .await
    }

    /// Rejects a message the client cannot process.
    pub async fn reject(&mut self, message_id: &str, reason: &str) -> Result<(), ClientError> {
        self.send_frame(&ClientFrame::Reject {
            message_id: message_id.to_owned(),
            reason: reason.to_owned(),
        })
        .await
    }

    /// Sends a message to the server or to another client. The gateway responds with an ack event carrying the
    /// messageId after the broker confirmed, or an error event; set a messageId to match the response and
    /// to resend safely.
    pub async fn send(&mut self, envelope: Envelope) -> Result<(), ClientError> {
        self.send_frame(&ClientFrame::Send {
            message: Box::new(envelope),
        })
        .await
    }

    /// Sends a raw text frame (tests use this to send invalid frames).
    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        self.socket
            .send(Message::text(text))
            .await
            .map_err(|error| ClientError::Connection(error.to_string()))
    }

    async fn send_frame(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.send_text(&frame.to_json()).await
    }

    /// Closes the connection with a normal close handshake.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let _ = self.socket.close(None).await;
        // Drain until the gateway returns the close frame, bounded so a dead gateway cannot hang the caller.
        let drain = async { while let Some(Ok(_)) = self.socket.next().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        Ok(())
    }

    async fn next_frame(&mut self) -> Result<Option<ServerFrame>, ClientError> {
        loop {
            let Some(message) = self.socket.next().await else {
                return Ok(None);
            };
            match message {
                Ok(Message::Text(text)) => {
                    return serde_json::from_str(text.as_str())
                        .map(Some)
                        .map_err(|error| {
                            ClientError::Protocol(format!("invalid frame {text}: {error}"))
                        });
                }
                Ok(Message::Close(frame)) => {
                    self.close_frame = Some(close_parts(frame));
                    return Ok(None);
                }
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Ok(None);
                }
                Err(error) => return Err(ClientError::Connection(error.to_string())),
            }
        }
    }

    fn closed_reason(&self) -> String {
        match &self.close_frame {
            Some((Some(code), reason)) => {
                format!(
                    "the gateway closed the connection before the welcome frame (code {code}: {reason})"
                )
            }
            _ => "the gateway closed the connection before the welcome frame".to_owned(),
        }
    }
}

/// Maps a failed WebSocket handshake to a client error: an HTTP rejection with the gateway's description, a
/// TLS failure with its likely fix, or a connection failure.
fn connect_error(url: &str, error: tungstenite::Error) -> ClientError {
    if let tungstenite::Error::Http(response) = &error {
        let description = response
            .body()
            .as_deref()
            .and_then(|body| serde_json::from_slice::<ApiAnswer>(body).ok())
            .map(|answer| answer.description)
            .unwrap_or_else(|| "no description".to_owned());
        return ClientError::Rejected {
            status: response.status().as_u16(),
            description,
        };
    }
    match tls::find_rustls_error(&error) {
        Some(rustls_error) => ClientError::Tls {
            url: redact_token(url),
            reason: tls::describe_handshake_error(rustls_error),
        },
        None => ClientError::Connect {
            url: redact_token(url),
            reason: error.to_string(),
        },
    }
}

fn close_parts(frame: Option<CloseFrame>) -> (Option<u16>, String) {
    match frame {
        Some(frame) => (Some(u16::from(frame.code)), frame.reason.to_string()),
        None => (None, String::new()),
    }
}

/// The JSON answer of the gateway's HTTP endpoints.
#[derive(Debug, Deserialize)]
pub struct ApiAnswer {
    pub result: i64,
    pub description: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// Replaces the token in a connection URL, for messages and logs.
pub fn redact_token(url: &str) -> String {
    match url.find("/socket/") {
        Some(position) => format!("{}/socket/<token>", &url[..position]),
        None => url.to_owned(),
    }
}

/// What to request a token for.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub identity: Identity,
    pub tags: Vec<String>,
    pub businesses: Vec<String>,
    pub ttl: Option<Duration>,
}

/// Asks the gateway's token endpoint for a connection URL; an https `server` must have a certificate that `tls`
/// trusts.
pub async fn request_connection_url(
    server: &str,
    api_key: &str,
    request: &TokenRequest,
    tls: &ClientTls,
) -> Result<String, ClientError> {
    // Built in a block: the serializer is not Send, so it must not live across the request's await.
    let query = {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query.append_pair("uniqueId", &request.identity.unique_id);
        query.append_pair("clientType", &request.identity.client_type);
        if !request.tags.is_empty() {
            query.append_pair("tags", &request.tags.join(","));
        }
        if !request.businesses.is_empty() {
            query.append_pair("businesses", &request.businesses.join(","));
        }
        if let Some(ttl) = request.ttl {
            query.append_pair("ttl", &humantime::format_duration(ttl).to_string());
        }
        query.finish()
    };
    let url = format!("{}/websocket/token?{query}", server.trim_end_matches('/'));
    let (status, body) = http_client::request_with_tls(
        hyper::Method::GET,
        &url,
        Some(api_key),
        None,
        Duration::from_secs(10),
        tls,
    )
    .await?;
    let answer: ApiAnswer = serde_json::from_slice(&body).map_err(|error| {
        ClientError::Protocol(format!(
            "the token endpoint responded HTTP {status} with invalid JSON: {error}"
        ))
    })?;
    if !status.is_success() || answer.result != 0 {
        return Err(ClientError::Rejected {
            status: status.as_u16(),
            description: answer.description,
        });
    }
    answer.data.as_str().map(str::to_owned).ok_or_else(|| {
        ClientError::Protocol("the token endpoint responded without a URL in data".to_owned())
    })
}

pub mod reliable;
pub use reliable::{
    ClientEvent, ClientHandle, ClientOptions, ReliableClient, SendError, UrlSource,
};
