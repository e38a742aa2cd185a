//! The command line, all in one place: global options and one struct per subcommand (clap derive).
//! The man pages and shell completions are generated from these definitions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::domain::SendType;

/// WebSocket push gateway with reliable messaging over RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "wsgw", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// The full command definition: the derived one plus the exit codes and environment variables, which the
/// man pages show too.
pub fn command() -> clap::Command {
    Cli::command().after_long_help(reference_text())
}

/// The exit codes and environment variables, as shown after `wsgw --help` and in the man page.
pub fn reference_text() -> String {
    let mut text = String::from("Exit status:\n");
    for code in crate::exit::ExitCode::ALL {
        text.push_str(&format!("  {:<4}{}\n", code as u8, code.meaning()));
    }
    text.push_str(
        "\nEnvironment:\n\
         \x20 WSGW_CONFIG         config file, as --config\n\
         \x20 WSGW_SERVER         gateway URL, as --server\n\
         \x20 WSGW_AMQP_URL       RabbitMQ URL, as --amqp-url\n\
         \x20 WSGW_API_KEY        API key, as --api-key (serve also accepts it)\n\
         \x20 WSGW_CA_CERT        extra CA certificates (PEM), as --ca-cert\n\
         \x20 WSGW_TOKEN_SECRET   token signing secret (auth.token_secret)\n\
         \x20 WSGW_<SECTION>_<KEY>  any config key, such as WSGW_SESSION_PING_INTERVAL\n\
         \x20 WSGW_STATE_DIR      folder of the local credentials file\n\
         \x20 RUST_LOG            log filter, such as wsgw=debug\n\
         \x20 NOTIFY_SOCKET       systemd notification socket (serve)\n",
    );
    text
}

/// Options shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Config file (TOML) [default: /etc/wsgw/wsgw.toml when it exists]
    #[arg(
        long,
        global = true,
        env = "WSGW_CONFIG",
        hide_env_values = true,
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,

    /// Gateway base URL for the token endpoint and the HTTP API [default: http://127.0.0.1:8086, or the
    /// address of the `wsgw serve` that wrote the local credentials]
    #[arg(
        long,
        global = true,
        env = "WSGW_SERVER",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub server: Option<String>,

    /// RabbitMQ URL, such as amqp://user:password@host:5672/%2f
    #[arg(
        long,
        global = true,
        env = "WSGW_AMQP_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub amqp_url: Option<String>,

    /// API key for the gateway's token endpoint and HTTP API
    #[arg(
        long,
        global = true,
        env = "WSGW_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,

    /// Output format [default: table on a terminal, json otherwise]
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub output: Option<OutputFormat>,

    /// More log output on stderr (-v debug, -vv trace); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Less log output on stderr (errors only)
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway daemon
    Serve(ServeArgs),
    /// Print a connection URL with a fresh token for one identity
    Token(TokenArgs),
    /// Publish one message with a broker confirm and print its messageId (RabbitMQ with --amqp-url, else the
    /// gateway's HTTP API)
    Send(SendArgs),
    /// Connect as a client, print each message received, and ack it
    Listen(ListenArgs),
    /// List the live sessions of every node, or close one with --kick
    Sessions(SessionsArgs),
    /// Inspect, re-deliver or purge the messages in the dead-letter queue (RabbitMQ only)
    #[command(name = "replay-dlq")]
    ReplayDlq(ReplayDlqArgs),
}

/// TLS options of the subcommands that call a gateway over https:// or wss://.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientTlsArgs {
    /// PEM file of extra CA certificates to trust for https:// and wss:// gateway URLs, such as the private CA
    /// that signed the gateway's certificate (the built-in webpki roots stay trusted)
    #[arg(long, env = "WSGW_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SessionsArgs {
    /// Only sessions of this uniqueId
    #[arg(long, value_name = "ID")]
    pub unique_id: Option<String>,
    /// Only sessions of this clientType
    #[arg(long, value_name = "TYPE")]
    pub client_type: Option<String>,
    /// Only sessions on this node
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Sort order
    #[arg(long, value_enum, default_value_t = SessionSort::Connected, value_name = "KEY")]
    pub sort: SessionSort,
    /// Close this session with the close code that makes clients reconnect later
    #[arg(long, value_name = "SESSION_ID")]
    pub kick: Option<String>,
    /// How long to wait for the nodes' replies
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// Sort keys of `wsgw sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SessionSort {
    Connected,
    UniqueId,
    ClientType,
    Node,
    Pending,
}

#[derive(Debug, Args)]
pub struct ReplayDlqArgs {
    #[command(subcommand)]
    pub action: DlqAction,
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead-lettered messages without consuming them
    List(DlqFilter),
    /// Print one dead-lettered message whole
    Show {
        /// messageId of the message
        #[arg(value_name = "MESSAGE_ID")]
        id: String,
    },
    /// Re-publish matching messages to their original destination, removing each after the broker confirmed
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// Skip messages already replayed this many times
        #[arg(long, default_value_t = 3, value_name = "N")]
        max_replays: u32,
        /// Show what would be replayed without publishing or removing anything
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete matching messages from the dead-letter queue
    Purge {
        #[command(flatten)]
        filter: DlqFilter,
        /// Do not ask for confirmation (required when standard input is not a terminal)
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead-lettered messages a `replay-dlq` action applies to; all filters must match.
#[derive(Debug, Clone, Default, Args)]
pub struct DlqFilter {
    /// Only messages of this businessType
    #[arg(long, value_name = "NAME")]
    pub business_type: Option<String>,
    /// Only messages of this messageType
    #[arg(long, value_name = "NAME")]
    pub message_type: Option<String>,
    /// Only messages to this uniqueId, or uniqueId/clientType
    #[arg(long, value_name = "RECIPIENT")]
    pub to: Option<String>,
    /// Only messages dead-lettered for this reason: unroutable, rejected, expired, maxlen, delivery_limit
    #[arg(long, value_name = "REASON")]
    pub reason: Option<String>,
    /// Only messages dead-lettered longer ago than this, such as 1h
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub older_than: Option<Duration>,
    /// Only messages dead-lettered within this time, such as 30m
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub newer_than: Option<Duration>,
    /// Only the message with this messageId
    #[arg(long, value_name = "MESSAGE_ID")]
    pub id: Option<String>,
    /// At most this many matching messages
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on [default: 127.0.0.1:8086]
    #[arg(long, env = "WSGW_SERVER_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,

    /// Base URL that token responses point clients at, such as wss://push.example.com [default: ws://<listen>,
    /// or wss://<listen> when server.tls_cert is set]
    #[arg(long, env = "WSGW_SERVER_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,

    /// Name of this node [default: <hostname>-<random>]
    #[arg(long, env = "WSGW_SERVER_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// Check the configuration (file, environment and flags), report every invalid key, and exit
    #[arg(long)]
    pub check: bool,
}

/// An identity given on the command line.
#[derive(Debug, Clone, Args)]
pub struct IdentityArgs {
    /// The client's uniqueId, such as order-8812
    #[arg(long, value_name = "ID")]
    pub unique_id: String,

    /// The client's type, such as h5 or charger
    #[arg(long, value_name = "TYPE")]
    pub client_type: String,

    /// Tags carried by the token, for broadcasts (comma-separated)
    #[arg(long, value_delimiter = ',', value_name = "TAG,...")]
    pub tags: Vec<String>,

    /// Businesses carried by the token, for broadcasts (comma-separated)
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub businesses: Vec<String>,

    /// Token lifetime, such as 60s or 5m [default: auth.token_ttl, 60s]
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Recipient uniqueId; without --to-client-type the message reaches every client type of it
    #[arg(long, value_name = "UNIQUE_ID")]
    pub to: Option<String>,

    /// Recipient clientType
    #[arg(long, value_name = "TYPE", requires = "to")]
    pub to_client_type: Option<String>,

    /// Business the message belongs to, such as payment or qrcode
    #[arg(long, value_name = "NAME")]
    pub business_type: String,

    /// Event within the business, such as PAYMENT_SUCCEEDED or QR_REFRESH
    #[arg(long, value_name = "NAME")]
    pub message_type: String,

    /// Message content as JSON, such as '{"orderId":"8812"}'
    #[arg(
        long,
        value_name = "JSON",
        conflicts_with = "content_file",
        required_unless_present = "content_file"
    )]
    pub content: Option<String>,

    /// Read the JSON content from a file, or from standard input with -
    #[arg(long, value_name = "PATH")]
    pub content_file: Option<PathBuf>,

    /// Keep this messageId instead of assigning one, so retries de-duplicate
    #[arg(long, value_name = "ID")]
    pub message_id: Option<String>,

    /// Sender uniqueId to put in the envelope
    #[arg(long, value_name = "ID")]
    pub from_unique_id: Option<String>,

    /// Sender clientType to put in the envelope
    #[arg(long, value_name = "TYPE")]
    pub from_client_type: Option<String>,

    /// Tags (comma-separated); without --to the message is a broadcast to clients whose token has any of them
    #[arg(long, value_delimiter = ',', value_name = "TAG,...")]
    pub tags: Vec<String>,

    /// Businesses (comma-separated); without --to the message is a broadcast to clients whose token has any
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub businesses: Vec<String>,

    /// sendType of the envelope
    #[arg(
        long,
        value_enum,
        default_value = "server-to-client",
        value_name = "TYPE"
    )]
    pub send_type: SendTypeArg,

    /// Wait until a client acked the message and print the receipt; exit 75 if none did in time (the message
    /// stays queued)
    #[arg(
        long,
        value_name = "DURATION",
        num_args = 0..=1,
        default_missing_value = "30s",
        value_parser = humantime::parse_duration
    )]
    pub wait: Option<Duration>,

    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// The sendType values, spelled for the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SendTypeArg {
    ServerToClient,
    ClientToClient,
}

impl From<SendTypeArg> for SendType {
    fn from(value: SendTypeArg) -> Self {
        match value {
            SendTypeArg::ServerToClient => SendType::ServerToClient,
            SendTypeArg::ClientToClient => SendType::ClientToClient,
        }
    }
}

#[derive(Debug, Args)]
pub struct ListenArgs {
    #[command(flatten)]
    pub identity: IdentityArgs,

    /// Exit after this many messages
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// Print messages without acking them, so they stay in the mailbox and come again on the next connection
    #[arg(long)]
    pub no_ack: bool,

    #[command(flatten)]
    pub tls: ClientTlsArgs,
}
