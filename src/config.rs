//! Configuration: one TOML file, overridden by `WSGW_*` environment variables, overridden by flags.
//!
//! Every key has a default, so an empty file (or none) is a valid configuration for local use. The environment
//! variable for a key is `WSGW_` followed by its dotted path in upper case with dots as underscores: `amqp.url`
//! is `WSGW_AMQP_URL`, `session.ping_interval` is `WSGW_SESSION_PING_INTERVAL`. `WSGW_TOKEN_SECRET` is accepted
//! as a short form of `WSGW_AUTH_TOKEN_SECRET`. Durations are written as in `30s`, `2m`, `7d`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/wsgw/wsgw.toml";

/// Every key, by dotted path; each can be set by its environment variable.
pub const KEYS: &[&str] = &[
    "server.listen",
    "server.public_url",
    "server.node_name",
    "server.max_connections",
    "server.shutdown_timeout",
    "server.handshake_timeout",
    "server.max_sessions",
    "server.max_sessions_per_address",
    "server.trusted_proxies",
    "server.allowed_origins",
    "server.tls_cert",
    "server.tls_key",
    "auth.token_secret",
    "auth.api_keys",
    "auth.token_secret_file",
    "auth.previous_token_secrets",
    "auth.api_keys_file",
    "auth.clock_skew",
    "auth.token_ttl",
    "auth.max_token_ttl",
    "auth.used_token_capacity",
    "amqp.url",
    "amqp.urls",
    "amqp.prefix",
    "amqp.connect_timeout",
    "amqp.publish_timeout",
    "amqp.publisher_mode",
    "amqp.sessions_per_connection",
    "amqp.reconnect_min_backoff",
    "amqp.reconnect_max_backoff",
    "mailbox.message_ttl",
    "mailbox.expires",
    "mailbox.max_length",
    "mailbox.declare_interval",
    "mailbox.queue_type",
    "mailbox.delivery_limit",
    "session.pending_ack_window",
    "session.ping_interval",
    "session.pong_timeout",
    "session.write_timeout",
    "session.max_message_size",
    "session.max_frame_size",
    "session.rate_limit",
    "session.rate_limit_burst",
    "session.read_buffer_size",
    "session.write_buffer_size",
    "session.max_write_buffer_size",
    "session.max_invalid_frames",
    "session.shutdown_grace",
    "session.max_rejects",
    "session.max_sends_in_flight",
    "session.dedupe_window",
    "session.broadcast_buffer",
    "policy.client_to_client",
    "memory.max_messages",
    "memory.max_dead_letters",
];

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub amqp: AmqpConfig,
    pub mailbox: MailboxConfig,
    pub session: SessionConfig,
    pub policy: PolicyConfig,
    pub memory: MemoryConfig,
}

/// Policy on which client types may send CLIENT_TO_CLIENT messages to which.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Sender clientType to the recipient clientTypes it may message; `"*"` allows every type, including a
    /// message to every client type of a uniqueId. A sender type not listed may message no client type.
    pub client_to_client: std::collections::BTreeMap<String, Vec<String>>,
}

impl PolicyConfig {
    /// True when `from` may message `to` (None: every client type of the recipient).
    pub fn allows(&self, from: &str, to: Option<&str>) -> bool {
        self.client_to_client.get(from).is_some_and(|allowed| {
            allowed
                .iter()
                .any(|entry| entry == "*" || Some(entry.as_str()) == to)
        })
    }
}

/// Limits of the in-process broker, used when no RabbitMQ URL is configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Maximum number of messages held in all queues; further publishes are rejected.
    pub max_messages: usize,
    /// Maximum number of messages in the dead-letter queue; past it the oldest is dropped with an error log.
    pub max_dead_letters: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_messages: 100_000,
            max_dead_letters: 10_000,
        }
    }
}

/// The HTTP and WebSocket listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Base URL that token responses point clients at, such as `wss://push.example.com`. Defaults to
    /// `ws://<listen>`.
    pub public_url: Option<String>,
    /// Name of this node in welcome frames, receipts and `wsgw sessions`. Defaults to `<hostname>-<random>`.
    pub node_name: Option<String>,
    /// Maximum number of open TCP connections; further connections wait until one closes.
    pub max_connections: usize,
    /// On SIGTERM, how long to wait for sessions and connections to finish before exiting anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Deadline from accepting a TCP connection to a complete request head, and for the TLS handshake with TLS.
    /// A client that sends nothing, or sends too slowly, is disconnected.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Maximum number of WebSocket sessions on this node; further upgrades get 503.
    pub max_sessions: usize,
    /// Maximum number of WebSocket sessions from one client address; further upgrades get 429. 0 turns it off.
    pub max_sessions_per_address: usize,
    /// Addresses (`10.0.0.5`) or networks (`10.0.0.0/8`) of reverse proxies whose `X-Forwarded-For` header names
    /// the client address. From any other peer the header is ignored.
    pub trusted_proxies: Vec<String>,
    /// Origins (`https://pay.example.com`) allowed to open WebSocket sessions and to read token responses in a
    /// browser. Empty allows every origin. A request without an Origin header (not a browser) is allowed.
    pub allowed_origins: Vec<String>,
    /// PEM certificate chain; with `tls_key`, the listener serves HTTPS and wss directly.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

/// Tokens and API keys.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Secret that signs connection tokens, at least 32 bytes. Shared by every node of a cluster.
    pub token_secret: Option<String>,
    /// API keys accepted as bearer tokens by the token endpoint and the publish API.
    pub api_keys: Vec<String>,
    /// File holding signing secrets, one per line: the first signs new tokens, later ones are still accepted
    /// (for rotation). Used instead of `token_secret`; re-read on SIGHUP.
    pub token_secret_file: Option<PathBuf>,
    /// Former signing secrets whose tokens are still accepted while a rotation runs.
    pub previous_token_secrets: Vec<String>,
    /// File holding more API keys, one per line (`#` starts a comment); re-read on SIGHUP.
    pub api_keys_file: Option<PathBuf>,
    /// How far past its expiry a token is still accepted, for clocks that differ between nodes.
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Lifetime of a token when the request names none.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Maximum lifetime a token request may ask for.
    #[serde(with = "humantime_serde")]
    pub max_token_ttl: Duration,
    /// Maximum number of used tokens remembered to reject reuse; new connections are refused when it is full.
    pub used_token_capacity: usize,
}

/// Mechanism by which the publisher learns that RabbitMQ took a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublisherMode {
    /// Publisher confirms (the default): many publishes in flight, a nack for a full mailbox.
    #[default]
    Confirms,
    /// AMQP transactions: one commit per publish, one transaction at a time per publisher, so slower. A full
    /// mailbox fails the commit, which the publisher reports as refused.
    Transactions,
}

/// The RabbitMQ connection and topology.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// AMQP URL, such as `amqp://user:password@host:5672/%2f`. The same as an `urls` list of one.
    pub url: Option<String>,
    /// AMQP URLs of the nodes of one RabbitMQ cluster. Every connection tries them in order, starting with the
    /// node that last accepted a connection and moving past a node whose connection was lost.
    pub urls: Vec<String>,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Deadline for opening a connection, including the AMQP handshake.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Publish confirmation mechanism: `confirms` or `transactions`.
    pub publisher_mode: PublisherMode,
    /// Sessions per consumer connection. Each session takes a channel and RabbitMQ allows 2,047 channels per
    /// connection by default, so a node opens another connection past this many.
    pub sessions_per_connection: usize,
    /// Deadline for one publish, from write to broker confirm, including republishing after a lost connection.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// First delay before reconnecting to RabbitMQ; it doubles after each failure.
    #[serde(with = "humantime_serde")]
    pub reconnect_min_backoff: Duration,
    /// Maximum delay between reconnect attempts.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_backoff: Duration,
}

/// Arguments of the mailbox queues. Changing them for existing mailboxes needs a migration, because RabbitMQ
/// rejects a redeclare with other arguments.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailboxConfig {
    /// How long a message waits for its client before it is dead-lettered as expired (`x-message-ttl`).
    #[serde(with = "humantime_serde")]
    pub message_ttl: Duration,
    /// How long an unused mailbox lives (`x-expires`). Must be well above `message_ttl`, because RabbitMQ deletes an
    /// expired queue without dead-lettering its messages.
    #[serde(with = "humantime_serde")]
    pub expires: Duration,
    /// Maximum number of ready messages; further publishes are rejected to the publisher (`reject-publish`).
    pub max_length: u32,
    /// How often a publisher re-declares a mailbox it publishes to, to keep it from expiring.
    #[serde(with = "humantime_serde")]
    pub declare_interval: Duration,
    /// `classic` (one copy on one RabbitMQ node) or `quorum` (replicated over the cluster with Raft).
    pub queue_type: QueueType,
    /// Quorum mailboxes only: deliveries of one message before RabbitMQ dead-letters it with reason
    /// `delivery_limit` (`x-delivery-limit`). Every return counts, including a session that closes with the
    /// message unacked.
    pub delivery_limit: u32,
}

/// The RabbitMQ queue type of the mailboxes and the dead-letter queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Durable classic queues (version 2), each on the node that declared it.
    #[default]
    Classic,
    /// Quorum queues, replicated over the cluster's nodes, which keep working while a majority is up.
    Quorum,
}

/// Limits and timers of one WebSocket session.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Maximum number of messages pushed and not yet acked by the client (the RabbitMQ prefetch).
    pub pending_ack_window: u16,
    /// Interval between server pings.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long the client has to reply to a ping with a pong before the session is closed.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Deadline for writing one frame to the client; a slower client is disconnected.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Maximum size of a message from the client, in bytes; a larger one closes the session with 1009.
    pub max_message_size: usize,
    /// Maximum size of one WebSocket frame from the client, in bytes; at most `max_message_size`.
    pub max_frame_size: usize,
    /// Messages per second a client may send (frames of type `send`); more get a RATE_LIMITED error frame.
    pub rate_limit: u32,
    /// Messages a client may send at once above `rate_limit` before it applies.
    pub rate_limit_burst: u32,
    /// Read buffer per connection, in bytes.
    pub read_buffer_size: usize,
    /// Write buffer per connection, in bytes.
    pub write_buffer_size: usize,
    /// Maximum bytes queued for writing per connection; must exceed `write_buffer_size`.
    pub max_write_buffer_size: usize,
    /// Invalid frames per session at which it is closed with a policy violation (1008).
    pub max_invalid_frames: u32,
    /// On shutdown, how long a client has to ack the messages it has received before its session closes.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Times a client may reject one message; the next rejection dead-letters it with reason `rejected`.
    pub max_rejects: u32,
    /// Messages a client may have sent and not yet had confirmed; further sends get an error frame.
    pub max_sends_in_flight: usize,
    /// Confirmed client messageIds remembered per node to drop a client's resend of the same message.
    pub dedupe_window: usize,
    /// Broadcasts queued per session; when full, further broadcasts to that client are skipped and logged.
    pub broadcast_buffer: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8086)),
            public_url: None,
            node_name: None,
            max_connections: 10_000,
            shutdown_timeout: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(10),
            max_sessions: 10_000,
            max_sessions_per_address: 200,
            trusted_proxies: Vec::new(),
            allowed_origins: Vec::new(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_secret: None,
            api_keys: Vec::new(),
            token_secret_file: None,
            previous_token_secrets: Vec::new(),
            api_keys_file: None,
            clock_skew: Duration::from_secs(5),
            token_ttl: Duration::from_secs(60),
            max_token_ttl: Duration::from_secs(3600),
            used_token_capacity: 100_000,
        }
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "token_secret",
                &self.token_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("api_keys", &format!("<{} redacted>", self.api_keys.len()))
            .field("token_secret_file", &self.token_secret_file)
            .field(
                "previous_token_secrets",
                &format!("<{} redacted>", self.previous_token_secrets.len()),
            )
            .field("api_keys_file", &self.api_keys_file)
            .field("clock_skew", &self.clock_skew)
            .field("token_ttl", &self.token_ttl)
            .field("max_token_ttl", &self.max_token_ttl)
            .field("used_token_capacity", &self.used_token_capacity)
            .finish()
    }
}

impl AuthConfig {
    /// The token secrets, the signing one first: the lines of `token_secret_file` when it is set, else
    /// `token_secret` followed by `previous_token_secrets`. Empty when none is configured.
    pub fn token_secrets(&self) -> Result<Vec<String>, ConfigError> {
        if let Some(path) = &self.token_secret_file {
            let secrets = read_lines("auth.token_secret_file", path)?;
            if secrets.is_empty() {
                return Err(ConfigError::SecretFile {
                    key: "auth.token_secret_file",
                    path: path.clone(),
                    reason:
                        "the file holds no secret; write one per line, the signing secret first"
                            .to_owned(),
                });
            }
            for (index, secret) in secrets.iter().enumerate() {
                if secret.len() < crate::domain::token::MIN_SECRET_LEN {
                    return Err(ConfigError::SecretFile {
                        key: "auth.token_secret_file",
                        path: path.clone(),
                        reason: format!(
                            "secret {} is {} bytes long; use at least 32 random bytes, such as the output of \
                             `openssl rand -base64 48`",
                            index + 1,
                            secret.len()
                        ),
                    });
                }
            }
            return Ok(secrets);
        }
        let mut secrets: Vec<String> = self
            .token_secret
            .iter()
            .filter(|secret| !secret.is_empty())
            .cloned()
            .collect();
        if !secrets.is_empty() {
            secrets.extend(self.previous_token_secrets.iter().cloned());
        }
        Ok(secrets)
    }

    /// The API keys of `api_keys` and of `api_keys_file`.
    pub fn all_api_keys(&self) -> Result<Vec<String>, ConfigError> {
        let mut keys: Vec<String> = self
            .api_keys
            .iter()
            .filter(|key| !key.is_empty())
            .cloned()
            .collect();
        if let Some(path) = &self.api_keys_file {
            keys.extend(read_lines("auth.api_keys_file", path)?);
        }
        Ok(keys)
    }
}

/// Reads a file of credentials: one per line, blank lines and lines starting with `#` skipped.
fn read_lines(key: &'static str, path: &Path) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::SecretFile {
        key,
        path: path.to_path_buf(),
        reason: format!("{error}; check the path and that the wsgw user may read it"),
    })?;
    warn_if_readable_by_others(key, path);
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

fn warn_if_readable_by_others(key: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        if metadata.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                key,
                path = %path.display(),
                "the credentials file is readable by other users; restrict it with chmod 600 (or 640 for the wsgw group)"
            );
        }
    }
}

impl AmqpConfig {
    /// The URLs of the RabbitMQ nodes to connect to: `urls`, else `url`; empty for the in-process broker.
    pub fn node_urls(&self) -> Vec<String> {
        if self.urls.is_empty() {
            self.url.iter().cloned().collect()
        } else {
            self.urls.clone()
        }
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: None,
            urls: Vec::new(),
            prefix: "wsgw".to_owned(),
            connect_timeout: Duration::from_secs(10),
            publisher_mode: PublisherMode::Confirms,
            sessions_per_connection: 2_000,
            publish_timeout: Duration::from_secs(5),
            reconnect_min_backoff: Duration::from_millis(200),
            reconnect_max_backoff: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field(
                "urls",
                &self
                    .urls
                    .iter()
                    .map(|url| redact_url(url))
                    .collect::<Vec<_>>(),
            )
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("publisher_mode", &self.publisher_mode)
            .field("sessions_per_connection", &self.sessions_per_connection)
            .field("publish_timeout", &self.publish_timeout)
            .field("reconnect_min_backoff", &self.reconnect_min_backoff)
            .field("reconnect_max_backoff", &self.reconnect_max_backoff)
            .finish()
    }
}

impl Default for MailboxConfig {
    fn default() -> Self {
        MailboxConfig {
            message_ttl: Duration::from_secs(24 * 3600),
            expires: Duration::from_secs(7 * 24 * 3600),
            max_length: 10_000,
            declare_interval: Duration::from_secs(60),
            queue_type: QueueType::Classic,
            delivery_limit: 20,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            pending_ack_window: 32,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_message_size: 64 * 1024,
            max_frame_size: 64 * 1024,
            rate_limit: 50,
            rate_limit_burst: 100,
            read_buffer_size: 4 * 1024,
            write_buffer_size: 8 * 1024,
            max_write_buffer_size: 256 * 1024,
            max_invalid_frames: 10,
            shutdown_grace: Duration::from_secs(5),
            max_rejects: 3,
            max_sends_in_flight: 16,
            dedupe_window: 100_000,
            broadcast_buffer: 64,
        }
    }
}

/// A configuration that could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}; check the path given to --config")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value {value:?} in environment variable {variable}: {message}")]
    Env {
        variable: String,
        value: String,
        message: String,
    },
    #[error("unknown config key {key}: it {reason}")]
    Unknown { key: String, reason: String },
    #[error("invalid config key {key} = {value}: {reason}")]
    Value {
        key: String,
        value: String,
        reason: String,
    },
    #[error("cannot use {key} = {path}: {reason}")]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("invalid config key {key} = {value}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

impl Config {
    /// Loads the file (`path`, else [`DEFAULT_CONFIG_PATH`] when it exists, else defaults), then applies
    /// `WSGW_*` environment variables, then validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// [`Config::load`] with the environment given as a lookup function, for tests.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let default_path = Path::new(DEFAULT_CONFIG_PATH);
        let (text, source) = match path {
            Some(path) => (read(path)?, path.to_path_buf()),
            None if default_path.exists() => (read(default_path)?, default_path.to_path_buf()),
            None => (String::new(), PathBuf::from("(defaults)")),
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: source.clone(),
            message: error.to_string(),
        })?;
        apply_env(&mut table, env)?;
        let config: Config =
            Config::deserialize(toml::Value::Table(table)).map_err(|error| ConfigError::Parse {
                path: source,
                message: error.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks relations between keys that each parse on their own; returns the first problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.problems().into_iter().next() {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// Returns every relation between keys that does not hold.
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut problems = Vec::new();
        let mut invalid = |key, value: String, reason: &str| {
            problems.push(ConfigError::Invalid {
                key,
                value,
                reason: reason.to_owned(),
            })
        };
        if self.mailbox.expires <= self.mailbox.message_ttl * 2 {
            invalid(
                "mailbox.expires",
                humantime::format_duration(self.mailbox.expires).to_string(),
                "must be more than twice mailbox.message_ttl, or an idle mailbox is deleted with its messages",
            );
        }
        if self.mailbox.declare_interval * 4 > self.mailbox.expires {
            invalid(
                "mailbox.declare_interval",
                humantime::format_duration(self.mailbox.declare_interval).to_string(),
                "must be at most a quarter of mailbox.expires",
            );
        }
        if self.amqp.reconnect_min_backoff.is_zero()
            || self.amqp.reconnect_min_backoff > self.amqp.reconnect_max_backoff
        {
            invalid(
                "amqp.reconnect_min_backoff",
                humantime::format_duration(self.amqp.reconnect_min_backoff).to_string(),
                "must be above zero and at most amqp.reconnect_max_backoff",
            );
        }
        if !(1..=2_047).contains(&self.amqp.sessions_per_connection) {
            invalid(
                "amqp.sessions_per_connection",
                self.amqp.sessions_per_connection.to_string(),
                "must be between 1 and 2047, RabbitMQ's default channel limit per connection",
            );
        }
        if self.session.pending_ack_window == 0 {
            invalid(
                "session.pending_ack_window",
                "0".to_owned(),
                "must be at least 1",
            );
        }
        if self.session.max_write_buffer_size <= self.session.write_buffer_size {
            invalid(
                "session.max_write_buffer_size",
                self.session.max_write_buffer_size.to_string(),
                "must be larger than session.write_buffer_size",
            );
        }
        if self.amqp.prefix.is_empty() || self.amqp.prefix.contains(['*', '#', ' ']) {
            invalid(
                "amqp.prefix",
                self.amqp.prefix.clone(),
                "must be non-empty and contain no spaces, * or #",
            );
        }
        if let Some(secret) = &self.auth.token_secret {
            if !secret.is_empty() && secret.len() < crate::domain::token::MIN_SECRET_LEN {
                invalid(
                    "auth.token_secret",
                    "<redacted>".to_owned(),
                    "must be at least 32 bytes; generate one with `openssl rand -base64 48`",
                );
            }
        }
        if let Some(url) = &self.amqp.url {
            if !is_amqp_url(url) {
                invalid(
                    "amqp.url",
                    redact_url(url),
                    "must be an amqp:// or amqps:// URL, such as amqp://user:password@host:5672/%2f",
                );
            }
        }
        for (index, url) in self.amqp.urls.iter().enumerate() {
            if !is_amqp_url(url) {
                invalid(
                    "amqp.urls",
                    redact_url(url),
                    "every entry must be an amqp:// or amqps:// URL, such as amqp://user:password@host:5672/%2f",
                );
            } else if self.amqp.urls[..index].contains(url) {
                invalid(
                    "amqp.urls",
                    redact_url(url),
                    "lists the same URL twice; list each RabbitMQ node once",
                );
            }
        }
        if let Some(url) = &self.amqp.url
            && !self.amqp.urls.is_empty()
            && self.amqp.urls != [url.clone()]
        {
            invalid(
                "amqp.urls",
                redact_urls(&self.amqp.urls),
                "set either amqp.url (one node) or amqp.urls (the nodes of a cluster), not both",
            );
        }
        if self.mailbox.delivery_limit == 0 {
            invalid(
                "mailbox.delivery_limit",
                "0".to_owned(),
                "must be at least 1, such as 20",
            );
        } else if self.mailbox.queue_type == QueueType::Quorum
            && self.mailbox.delivery_limit <= self.session.max_rejects
        {
            invalid(
                "mailbox.delivery_limit",
                self.mailbox.delivery_limit.to_string(),
                "must be above session.max_rejects, so that a message a client keeps rejecting is dead-lettered \
                 by the gateway as rejected before RabbitMQ's delivery limit applies",
            );
        }
        if let Some(public_url) = &self.server.public_url {
            let scheme_ok = url::Url::parse(public_url)
                .is_ok_and(|parsed| matches!(parsed.scheme(), "ws" | "wss" | "http" | "https"));
            if !scheme_ok {
                invalid(
                    "server.public_url",
                    public_url.clone(),
                    "must be a ws://, wss://, http:// or https:// URL, such as wss://push.example.com",
                );
            }
        }
        if self.session.shutdown_grace >= self.server.shutdown_timeout {
            invalid(
                "session.shutdown_grace",
                humantime::format_duration(self.session.shutdown_grace).to_string(),
                "must be shorter than server.shutdown_timeout",
            );
        }
        for (index, secret) in self.auth.previous_token_secrets.iter().enumerate() {
            if secret.len() < crate::domain::token::MIN_SECRET_LEN {
                invalid(
                    "auth.previous_token_secrets",
                    format!("<entry {} redacted>", index + 1),
                    "every secret must be at least 32 bytes",
                );
            }
        }
        if self
            .auth
            .token_secret
            .as_deref()
            .is_some_and(|secret| !secret.is_empty())
            && self.auth.token_secret_file.is_some()
        {
            invalid(
                "auth.token_secret_file",
                self.auth
                    .token_secret_file
                    .as_deref()
                    .map(|path| path.display().to_string())
                    .unwrap_or_default(),
                "set either auth.token_secret or auth.token_secret_file, not both",
            );
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            invalid(
                "server.tls_cert",
                format!(
                    "{:?} with tls_key {:?}",
                    self.server.tls_cert, self.server.tls_key
                ),
                "set both server.tls_cert and server.tls_key, or neither",
            );
        }
        for proxy in &self.server.trusted_proxies {
            if let Err(reason) = crate::gateway::admission::parse_network(proxy) {
                invalid("server.trusted_proxies", proxy.clone(), &reason);
            }
        }
        for origin in &self.server.allowed_origins {
            if let Err(reason) = crate::gateway::admission::OriginPattern::parse(origin) {
                invalid("server.allowed_origins", origin.clone(), &reason);
            }
        }
        if self.server.handshake_timeout.is_zero() {
            invalid(
                "server.handshake_timeout",
                "0s".to_owned(),
                "must be above zero, such as 10s",
            );
        }
        if self.server.max_sessions == 0 {
            invalid("server.max_sessions", "0".to_owned(), "must be at least 1");
        }
        if self.session.max_frame_size == 0
            || self.session.max_frame_size > self.session.max_message_size
        {
            invalid(
                "session.max_frame_size",
                self.session.max_frame_size.to_string(),
                "must be above zero and at most session.max_message_size",
            );
        }
        if self.session.rate_limit == 0 || self.session.rate_limit_burst == 0 {
            invalid(
                "session.rate_limit",
                format!(
                    "{} (burst {})",
                    self.session.rate_limit, self.session.rate_limit_burst
                ),
                "session.rate_limit and session.rate_limit_burst must be at least 1",
            );
        }
        if self.auth.token_ttl > self.auth.max_token_ttl {
            invalid(
                "auth.token_ttl",
                humantime::format_duration(self.auth.token_ttl).to_string(),
                "must not exceed auth.max_token_ttl",
            );
        }
        problems
    }

    /// Loads like [`Config::load`] but reports every invalid key instead of stopping at the first: unknown
    /// sections and keys, values of the wrong type, and relations between keys that do not hold.
    pub fn check(path: Option<&Path>) -> Result<Config, Vec<ConfigError>> {
        Self::check_with_env(path, |name| std::env::var(name).ok())
    }

    /// [`Config::check`] with the environment given as a lookup function, for tests.
    pub fn check_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigError>> {
        let default_path = Path::new(DEFAULT_CONFIG_PATH);
        let (text, source) = match path {
            Some(path) => (read(path).map_err(|error| vec![error])?, path.to_path_buf()),
            None if default_path.exists() => (
                read(default_path).map_err(|error| vec![error])?,
                default_path.to_path_buf(),
            ),
            None => (String::new(), PathBuf::from("(defaults)")),
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|error| {
            vec![ConfigError::Parse {
                path: source.clone(),
                message: error.to_string(),
            }]
        })?;
        apply_env(&mut table, env).map_err(|error| vec![error])?;

        let mut problems = Vec::new();
        for (section, values) in &table {
            let Some(values) = values.as_table() else {
                problems.push(ConfigError::Unknown {
                    key: section.clone(),
                    reason: "is not a [section]; see the keys in packaging/wsgw.toml".to_owned(),
                });
                continue;
            };
            for (key, value) in values {
                let path = format!("{section}.{key}");
                if !KEYS.contains(&path.as_str()) {
                    problems.push(ConfigError::Unknown {
                        key: path,
                        reason: "is not a known key; see the keys in packaging/wsgw.toml"
                            .to_owned(),
                    });
                    continue;
                }
                // Deserialize the key alone over the defaults, so each bad value is reported on its own.
                let mut single = toml::Table::new();
                let mut section_table = toml::Table::new();
                section_table.insert(key.clone(), value.clone());
                single.insert(section.clone(), toml::Value::Table(section_table));
                if let Err(error) = Config::deserialize(toml::Value::Table(single)) {
                    let shown = if is_secret_key(&path) {
                        "<redacted>".to_owned()
                    } else if path == "amqp.url" || path == "amqp.urls" {
                        redact_url_value(value)
                    } else {
                        value.to_string()
                    };
                    problems.push(ConfigError::Value {
                        key: path,
                        value: shown,
                        reason: error.message().to_owned(),
                    });
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let config = Config::deserialize(toml::Value::Table(table)).map_err(|error| {
            vec![ConfigError::Parse {
                path: source,
                message: error.to_string(),
            }]
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Returns the configured node name, or `<hostname>-<random>`.
    pub fn node_name(&self) -> String {
        if let Some(name) = &self.server.node_name {
            return name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .unwrap_or_else(|_| "node".to_owned());
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        format!("{host}-{}", &suffix[..6])
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Returns the environment variable that overrides `key`.
pub fn env_name(key: &str) -> String {
    format!("WSGW_{}", key.replace('.', "_").to_uppercase())
}

fn apply_env(
    table: &mut toml::Table,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for key in KEYS {
        let mut variable = env_name(key);
        let mut raw = env(&variable);
        if raw.is_none() && *key == "auth.token_secret" {
            variable = "WSGW_TOKEN_SECRET".to_owned();
            raw = env(&variable);
        }
        let Some(raw) = raw else { continue };
        let value = parse_env_value(&raw);
        let (section, field) = key.split_once('.').unwrap_or(("", key));
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = entry.as_table_mut() else {
            return Err(ConfigError::Env {
                variable,
                value: redact_env(key, &raw),
                message: format!("config section [{section}] is not a table"),
            });
        };
        section_table.insert(field.to_owned(), value);
    }
    Ok(())
}

/// Reads an environment value as a TOML value (number, boolean, array) when it is one, else as a string.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("value = {raw}"))
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn redact_env(key: &str, raw: &str) -> String {
    if is_secret_key(key) {
        "<redacted>".to_owned()
    } else if key == "amqp.url" || key == "amqp.urls" {
        redact_url_value(&parse_env_value(raw))
    } else {
        raw.to_owned()
    }
}

/// True for keys whose values are credentials; their values never appear in errors or logs.
fn is_secret_key(key: &str) -> bool {
    (key.contains("secret") || key.contains("api_keys")) && !key.ends_with("_file")
}

/// Shows a URL or an array of URLs with their passwords replaced; any other value is hidden, because it may be a
/// URL that did not parse.
fn redact_url_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(url) => redact_url(url),
        toml::Value::Array(urls) => {
            let shown: Vec<String> = urls
                .iter()
                .map(|url| {
                    url.as_str()
                        .map(redact_url)
                        .unwrap_or_else(|| url.to_string())
                })
                .collect();
            format!("[{}]", shown.join(", "))
        }
        _ => "<redacted>".to_owned(),
    }
}

/// The URLs with their passwords replaced, comma-separated, for logs and errors.
pub fn redact_urls(urls: &[String]) -> String {
    urls.iter()
        .map(|url| redact_url(url))
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_amqp_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|parsed| matches!(parsed.scheme(), "amqp" | "amqps"))
}

/// Replaces the password of a URL with `***`, for logs and errors.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn empty_file_gives_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wsgw.toml");
        std::fs::write(&path, "").expect("write");
        let config = Config::load_with_env(Some(&path), no_env).expect("valid");
        assert_eq!(config.amqp.prefix, "wsgw");
        assert_eq!(config.auth.token_ttl, Duration::from_secs(60));
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wsgw.toml");
        std::fs::write(
            &path,
            "[amqp]\nprefix = \"file\"\n[session]\npending_ack_window = 5\n",
        )
        .expect("write");
        let env = |name: &str| match name {
            "WSGW_AMQP_PREFIX" => Some("env".to_owned()),
            "WSGW_SESSION_PING_INTERVAL" => Some("3s".to_owned()),
            "WSGW_TOKEN_SECRET" => Some("s".repeat(40)),
            _ => None,
        };
        let config = Config::load_with_env(Some(&path), env).expect("valid");
        assert_eq!(config.amqp.prefix, "env");
        assert_eq!(config.session.pending_ack_window, 5);
        assert_eq!(config.session.ping_interval, Duration::from_secs(3));
        assert_eq!(
            config.auth.token_secret.as_deref(),
            Some("s".repeat(40).as_str())
        );
    }

    #[test]
    fn every_key_is_settable_by_env() {
        let samples = |key: &str| -> &'static str {
            match key {
                "server.listen" => "127.0.0.1:1",
                "session.max_frame_size" => "1024",
                "server.shutdown_timeout" => "1m",
                "auth.max_token_ttl" => "2h",
                "mailbox.expires" => "30d",
                "auth.api_keys" => "[\"k\"]",
                k if k.ends_with("ttl")
                    || k.ends_with("interval")
                    || k.ends_with("timeout")
                    || k.ends_with("backoff")
                    || k.ends_with("grace") =>
                {
                    "1s"
                }
                k if k.ends_with("size")
                    || k.ends_with("max_connections")
                    || k.ends_with("capacity") =>
                {
                    "100000"
                }
                "server.max_sessions" | "server.max_sessions_per_address" => "50",
                "server.trusted_proxies" => "[\"10.0.0.0/8\", \"192.0.2.1\"]",
                "server.allowed_origins" => "[\"https://pay.example.com\"]",
                "auth.previous_token_secrets" => "[\"0123456789abcdef0123456789abcdef\"]",
                "auth.clock_skew" => "2s",
                "session.rate_limit" | "session.rate_limit_burst" => "10",
                "mailbox.max_length"
                | "session.pending_ack_window"
                | "session.max_invalid_frames" => "7",
                "policy.client_to_client" => "{ h5 = [\"h5\"], app = [\"*\"] }",
                "amqp.publisher_mode" => "transactions",
                "amqp.sessions_per_connection" => "100",
                "server.public_url" => "wss://push.example.com",
                "amqp.url" => "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp.urls" => {
                    "[\"amqp://guest:guest@10.0.0.1:5672/%2f\", \"amqp://guest:guest@10.0.0.2:5672/%2f\"]"
                }
                "mailbox.queue_type" => "quorum",
                "mailbox.delivery_limit" => "20",
                "auth.token_secret" => "0123456789abcdef0123456789abcdef",
                k if k.starts_with("memory.") || k.starts_with("session.") => "64",
                _ => "text",
            }
        };
        for key in KEYS {
            let variable = env_name(key);
            let value = samples(key);
            // The certificate and its key are only valid together.
            let partner = match *key {
                "server.tls_cert" => Some("WSGW_SERVER_TLS_KEY"),
                "server.tls_key" => Some("WSGW_SERVER_TLS_CERT"),
                _ => None,
            };
            let result = Config::load_with_env(None, |name| {
                (name == variable || Some(name) == partner).then(|| value.to_owned())
            });
            assert!(result.is_ok(), "{variable}={value}: {:?}", result.err());
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wsgw.toml");
        std::fs::write(&path, "[session]\nping_intervall = \"3s\"\n").expect("write");
        let error = Config::load_with_env(Some(&path), no_env).expect_err("unknown key");
        assert!(error.to_string().contains("ping_intervall"), "{error}");
    }

    #[test]
    fn check_reports_every_bad_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wsgw.toml");
        std::fs::write(
            &path,
            "[session]\nping_interval = \"often\"\npending_ack_window = -1\n[amqp]\nprefx = \"x\"\n",
        )
        .expect("write");
        let problems = Config::check_with_env(Some(&path), no_env).expect_err("three bad keys");
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 3, "{text:?}");
        assert!(
            text.iter()
                .any(|line| line.contains("session.ping_interval") && line.contains("often")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|line| line.contains("session.pending_ack_window") && line.contains("-1")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|line| line.contains("amqp.prefx")),
            "{text:?}"
        );
    }

    #[test]
    fn check_reports_every_broken_relation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wsgw.toml");
        std::fs::write(
            &path,
            "[mailbox]\nmessage_ttl = \"1d\"\nexpires = \"1d\"\n[auth]\ntoken_secret = \"short\"\n",
        )
        .expect("write");
        let problems = Config::check_with_env(Some(&path), no_env).expect_err("two problems");
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().any(|line| line.contains("mailbox.expires")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|line| line.contains("auth.token_secret") && !line.contains("short")),
            "{text:?}"
        );
    }

    #[test]
    fn amqp_urls_default_to_amqp_url() {
        let env = |name: &str| {
            (name == "WSGW_AMQP_URL").then(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
        };
        let config = Config::load_with_env(None, env).expect("valid");
        assert_eq!(
            config.amqp.node_urls(),
            vec!["amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()]
        );
        assert!(Config::default().amqp.node_urls().is_empty());
    }

    #[test]
    fn amqp_url_and_different_urls_are_rejected() {
        let env = |name: &str| {
            match name {
            "WSGW_AMQP_URL" => Some("amqp://guest:hidden@10.0.0.1:5672/%2f".to_owned()),
            "WSGW_AMQP_URLS" => Some(
                "[\"amqp://guest:hidden@10.0.0.1:5672/%2f\", \"amqp://guest:hidden@10.0.0.2:5672/%2f\"]"
                    .to_owned(),
            ),
            _ => None,
        }
        };
        let error = Config::load_with_env(None, env).expect_err("both set");
        let text = error.to_string();
        assert!(text.contains("amqp.urls"), "{text}");
        assert!(!text.contains("hidden"), "{text}");

        let same = |name: &str| match name {
            "WSGW_AMQP_URL" => Some("amqp://guest:guest@10.0.0.1:5672/%2f".to_owned()),
            "WSGW_AMQP_URLS" => Some("[\"amqp://guest:guest@10.0.0.1:5672/%2f\"]".to_owned()),
            _ => None,
        };
        assert!(Config::load_with_env(None, same).is_ok());
    }

    #[test]
    fn amqp_urls_entries_are_checked() {
        let env = |name: &str| {
            (name == "WSGW_AMQP_URLS").then(|| {
                "[\"amqp://guest:hidden@10.0.0.1:5672/%2f\", \"http://10.0.0.2\", \"amqp://guest:hidden@10.0.0.1:5672/%2f\"]"
                    .to_owned()
            })
        };
        let problems = Config::check_with_env(None, env).expect_err("two bad entries");
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 2, "{text:?}");
        assert!(
            text.iter().any(|line| line.contains("http://10.0.0.2")),
            "{text:?}"
        );
        assert!(text.iter().any(|line| line.contains("twice")), "{text:?}");
        assert!(text.iter().all(|line| !line.contains("hidden")), "{text:?}");
    }

    #[test]
    fn quorum_delivery_limit_must_exceed_max_rejects() {
        let env = |name: &str| match name {
            "WSGW_MAILBOX_QUEUE_TYPE" => Some("quorum".to_owned()),
            "WSGW_MAILBOX_DELIVERY_LIMIT" => Some("3".to_owned()),
            "WSGW_SESSION_MAX_REJECTS" => Some("3".to_owned()),
            _ => None,
        };
        let error = Config::load_with_env(None, env).expect_err("limit too low");
        assert!(
            error.to_string().contains("mailbox.delivery_limit"),
            "{error}"
        );
        let zero = |name: &str| (name == "WSGW_MAILBOX_DELIVERY_LIMIT").then(|| "0".to_owned());
        assert!(Config::load_with_env(None, zero).is_err());
    }

    #[test]
    fn redact_url_hides_password() {
        assert_eq!(
            redact_url("amqp://guest:secret@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
    }
}
