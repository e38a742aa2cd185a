//! Shared test support: a real RabbitMQ, the real `wsgw` binary, unique names per test, cleanup on drop.
//!
//! Every test gets its own prefix (`wsgwtest-<random>`), so tests run in parallel and twice in a row. Tests that
//! need RabbitMQ fail when CI=true and it is unreachable; elsewhere they print why and return.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use wsgw::broker::Publication;
use wsgw::broker::rabbit::Publisher;
use wsgw::config::{AmqpConfig, MailboxConfig};
use wsgw::domain::{Envelope, Identity, SendType, TokenSigner};

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";
pub const API_KEY: &str = "test-api-key";

/// Returns the broker URL the tests use: WSGW_TEST_AMQP_URL, else the local default.
pub fn amqp_url() -> String {
    std::env::var("WSGW_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Returns true when RabbitMQ accepts connections on its AMQP port. Panics when it does not and CI=true.
pub fn rabbitmq_available() -> bool {
    let url = url::Url::parse(&amqp_url()).expect("valid WSGW_TEST_AMQP_URL");
    let address = format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5672)
    );
    let reachable = address
        .parse::<SocketAddr>()
        .ok()
        .and_then(|socket| {
            std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(2)).ok()
        })
        .is_some();
    if !reachable {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("RabbitMQ is not reachable at {address}, and CI=true requires it");
        }
        eprintln!(
            "skipping: RabbitMQ is not reachable at {address} (set CI=true to make this a failure)"
        );
    }
    reachable
}

/// Returns early from a test when RabbitMQ is unreachable outside CI.
#[macro_export]
macro_rules! require_rabbitmq {
    () => {
        if !$crate::common::rabbitmq_available() {
            return;
        }
    };
}

/// Config for tests: short timers, small limits.
pub fn test_env_vars(prefix: &str) -> Vec<(String, String)> {
    vec![
        ("WSGW_AMQP_URL".to_owned(), amqp_url()),
        ("WSGW_AMQP_PREFIX".to_owned(), prefix.to_owned()),
        ("WSGW_TOKEN_SECRET".to_owned(), SECRET.to_owned()),
        ("WSGW_API_KEY".to_owned(), API_KEY.to_owned()),
        ("WSGW_MAILBOX_MESSAGE_TTL".to_owned(), "5m".to_owned()),
        ("WSGW_MAILBOX_EXPIRES".to_owned(), "30m".to_owned()),
        ("WSGW_MAILBOX_DECLARE_INTERVAL".to_owned(), "30s".to_owned()),
    ]
}

/// One test's names and settings; deletes its queues and exchanges when dropped.
pub struct TestEnv {
    pub prefix: String,
    pub state_dir: tempfile::TempDir,
    pub extra_env: Vec<(String, String)>,
    identities: Mutex<Vec<Identity>>,
    queues: Mutex<Vec<String>>,
    pub publisher_mode: wsgw::config::PublisherMode,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        TestEnv {
            prefix: format!("wsgwtest-{}", &suffix[..12]),
            state_dir: tempfile::tempdir().expect("tempdir"),
            extra_env: Vec::new(),
            identities: Mutex::new(Vec::new()),
            queues: Mutex::new(Vec::new()),
            publisher_mode: wsgw::config::PublisherMode::Confirms,
        }
    }

    /// Uses this publisher mode in every process and publisher of the test.
    pub fn with_mode(mut self, mode: wsgw::config::PublisherMode) -> TestEnv {
        self.publisher_mode = mode;
        let name = match mode {
            wsgw::config::PublisherMode::Confirms => "confirms",
            wsgw::config::PublisherMode::Transactions => "transactions",
        };
        self.with_env("WSGW_AMQP_PUBLISHER_MODE", name)
    }

    /// Adds an environment variable to every process this test starts.
    pub fn with_env(mut self, name: &str, value: &str) -> TestEnv {
        self.extra_env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// An identity with a unique id, recorded for cleanup.
    pub fn identity(&self, client_type: &str) -> Identity {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let identity =
            Identity::new(&format!("u-{}", &suffix[..12]), client_type).expect("valid identity");
        self.identities.lock().expect("lock").push(identity.clone());
        identity
    }

    /// Records an identity made elsewhere, so its mailbox is deleted with the test's other queues.
    pub fn record(&self, identity: &Identity) {
        self.identities.lock().expect("lock").push(identity.clone());
    }

    /// A business queue name under this test's prefix, recorded for cleanup.
    pub fn business_queue(&self, name: &str) -> String {
        let queue = format!("{}.business.{name}", self.prefix);
        self.queues.lock().expect("lock").push(queue.clone());
        queue
    }

    pub fn mailbox(&self, identity: &Identity) -> String {
        identity.mailbox_queue(&self.prefix)
    }

    /// A `wsgw` command with this test's environment.
    pub fn wsgw(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wsgw"));
        command.env_clear();
        for name in ["PATH", "HOME", "RUST_BACKTRACE"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.env("WSGW_STATE_DIR", self.state_dir.path());
        for (name, value) in test_env_vars(&self.prefix)
            .into_iter()
            .chain(self.extra_env.clone())
        {
            command.env(name, value);
        }
        command
    }

    /// Starts `wsgw serve` on a free loopback port and waits until it listens.
    pub fn serve(&self, node: &str) -> Server {
        Server::spawn(self.serve_command(node, "127.0.0.1:0"))
    }

    /// The `wsgw serve` command of [`TestEnv::serve`], listening on `listen`, with JSON logs on a pipe.
    #[allow(dead_code)]
    pub fn serve_command(&self, node: &str, listen: &str) -> Command {
        let mut command = self.wsgw();
        command
            .args(["--log-format", "json", "-v", "serve", "--listen", listen])
            .args(["--node-name", node])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// A publisher on this test's topology.
    pub async fn publisher(&self) -> Publisher {
        self.named_publisher("wsgw test publisher").await
    }

    /// A publisher whose RabbitMQ connection has this name.
    pub async fn named_publisher(&self, name: &str) -> Publisher {
        let amqp = AmqpConfig {
            prefix: self.prefix.clone(),
            publisher_mode: self.publisher_mode,
            ..AmqpConfig::default()
        };
        Publisher::connect(&amqp_url(), &amqp, &self.mailbox_config(), name)
            .await
            .expect("publisher connects")
    }

    pub fn mailbox_config(&self) -> MailboxConfig {
        MailboxConfig {
            message_ttl: Duration::from_secs(300),
            expires: Duration::from_secs(1800),
            declare_interval: Duration::from_secs(30),
            ..MailboxConfig::default()
        }
    }

    /// A connection URL for `identity` on `server`, minted with the shared test secret.
    pub fn connection_url(&self, server: &Server, identity: &Identity) -> String {
        let signer = TokenSigner::new(SECRET.as_bytes()).expect("valid secret");
        let token = signer.mint(
            identity,
            &[],
            &[],
            Duration::from_secs(60),
            SystemTime::now(),
        );
        format!("ws://{}/socket/{token}", server.address)
    }

    /// Ready messages and consumers of a queue, read with a passive declare.
    pub async fn queue_counts(&self, queue: &str) -> (u32, u32) {
        let connection = connect().await;
        let channel = connection.create_channel().await.expect("channel");
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|error| panic!("queue {queue} should exist: {error}"));
        let _ = connection.close(200, "done".into()).await;
        (declared.message_count(), declared.consumer_count())
    }

    /// Waits until `queue` has no consumer, then returns its ready message count.
    pub async fn settled_message_count(&self, queue: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (messages, consumers) = self.queue_counts(queue).await;
            if consumers == 0 {
                return messages;
            }
            assert!(
                Instant::now() < deadline,
                "queue {queue} still has {consumers} consumer(s)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        let mut queues: Vec<String> = self
            .identities
            .lock()
            .map(|identities| {
                identities
                    .iter()
                    .map(|identity| identity.mailbox_queue(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        queues.push(format!("{prefix}.dlq"));
        queues.extend(
            self.queues
                .lock()
                .map(|queues| queues.clone())
                .unwrap_or_default(),
        );
        let exchanges: Vec<String> = ["dlx", "control", "direct", "inbound", "broadcast"]
            .iter()
            .map(|name| format!("{prefix}.{name}"))
            .collect();
        // A thread with its own runtime, because drop may run inside a test's runtime.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok(connection) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                else {
                    return;
                };
                for queue in queues {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                for exchange in exchanges {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .exchange_delete(
                                exchange.as_str().into(),
                                ExchangeDeleteOptions::default(),
                            )
                            .await;
                    }
                }
                let _ = connection.close(200, "cleanup".into()).await;
            });
        });
        let _ = cleanup.join();
    }
}

pub async fn connect() -> Connection {
    Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ")
}

/// A running `wsgw serve` child; killed on drop.
pub struct Server {
    pub child: Child,
    pub address: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Server {
    pub fn spawn(mut command: Command) -> Server {
        let mut child = command.spawn().expect("spawn wsgw serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (sender, receiver) = std::sync::mpsc::channel();
        let collected = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(address) = listening_address(&line) {
                    let _ = sender.send(address);
                }
                collected.lock().expect("lock").push(line);
            }
        });
        match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(address) => Server {
                child,
                address,
                logs,
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "wsgw serve did not start listening; logs:\n{}",
                    logs.lock().expect("lock").join("\n")
                );
            }
        }
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Waits until a log line contains every one of `needles`.
    pub async fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self
                .logs
                .lock()
                .expect("lock")
                .iter()
                .find(|line| needles.iter().all(|needle| line.contains(needle)))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}; logs:\n{}",
                self.logs.lock().expect("lock").join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn all_logs(&self) -> String {
        self.logs.lock().expect("lock").join("\n")
    }

    /// Sends SIGKILL and waits for the process to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn listening_address(line: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    if fields.get("message")?.as_str()? != "listening" {
        return None;
    }
    fields.get("listen")?.as_str()?.parse().ok()
}

/// A direct SERVER_TO_CLIENT envelope to `identity`, stamped like a first publish.
pub fn envelope_to(identity: &Identity, content: serde_json::Value) -> Envelope {
    let mut envelope = Envelope {
        message_id: None,
        send_type: SendType::ServerToClient,
        message_type: "QR_REFRESH".to_owned(),
        business_type: "qrcode".to_owned(),
        from_unique_id: None,
        to_unique_id: Some(identity.unique_id.clone()),
        from_client_type: None,
        to_client_type: Some(identity.client_type.clone()),
        timestamp: None,
        content,
        tags: Vec::new(),
        businesses: Vec::new(),
    };
    envelope.stamp_first_publish();
    envelope
}

/// Publishes one direct message with a confirm and returns its messageId.
pub async fn publish_to(
    publisher: &Publisher,
    identity: &Identity,
    content: serde_json::Value,
) -> String {
    let envelope = envelope_to(identity, content);
    let publication = Publication::new(envelope).expect("routable envelope");
    publisher
        .publish(&publication)
        .await
        .expect("publish confirmed")
        .message_id
}

pub fn binary_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wsgw"))
}

/// Which broker adapter a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Rabbit,
    Memory,
}

/// Runs a test body once per broker: `both_brokers!(name1, name2)` makes `rabbit::name1` and `memory::name1`
/// call `name1(BrokerKind::..)`.
#[macro_export]
macro_rules! both_brokers {
    ($($name:ident),* $(,)?) => {
        mod rabbit {
            $(
                #[tokio::test]
                async fn $name() {
                    if !$crate::common::rabbitmq_available() {
                        return;
                    }
                    super::$name($crate::common::BrokerKind::Rabbit).await;
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::common::BrokerKind::Memory).await;
                }
            )*
        }
    };
}

impl TestEnv {
    /// The test's config: its prefix, the test secret and API key, short mailbox timers.
    pub fn config(&self, kind: BrokerKind) -> wsgw::config::Config {
        let mut config = wsgw::config::Config::default();
        config.amqp.prefix = self.prefix.clone();
        config.amqp.url = (kind == BrokerKind::Rabbit).then(amqp_url);
        config.amqp.publisher_mode = self.publisher_mode;
        config.mailbox = self.mailbox_config();
        config.auth.token_secret = Some(SECRET.to_owned());
        config.auth.api_keys = vec![API_KEY.to_owned()];
        config
    }

    /// A broker of the given kind on this test's topology.
    pub async fn broker(
        &self,
        kind: BrokerKind,
        config: &wsgw::config::Config,
    ) -> Arc<dyn wsgw::broker::Broker> {
        self.supervised_broker(kind, config, tokio_util::sync::CancellationToken::new())
            .await
    }

    /// A broker of the given kind; a RabbitMQ broker's supervisor stops with `shutdown`.
    pub async fn supervised_broker(
        &self,
        kind: BrokerKind,
        config: &wsgw::config::Config,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Arc<dyn wsgw::broker::Broker> {
        match kind {
            BrokerKind::Rabbit => {
                let node = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
                let broker = wsgw::broker::rabbit::RabbitBroker::connect(
                    &amqp_url(),
                    &config.amqp,
                    &config.mailbox,
                    &node,
                )
                .await
                .expect("connect to RabbitMQ");
                let broker = Arc::new(broker);
                broker.supervise(shutdown);
                broker
            }
            BrokerKind::Memory => Arc::new(wsgw::broker::memory::MemoryBroker::new(
                &config.memory,
                &config.mailbox,
            )),
        }
    }

    /// Runs a gateway in this process on a free loopback port.
    pub async fn gateway(
        &self,
        kind: BrokerKind,
        configure: impl FnOnce(&mut wsgw::config::Config),
    ) -> InProcess {
        let mut config = self.config(kind);
        configure(&mut config);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let broker = self
            .supervised_broker(kind, &config, shutdown.clone())
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let signer = TokenSigner::new(SECRET.as_bytes()).expect("secret");
        let node = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let gateway = wsgw::gateway::Gateway::new(
            config,
            node,
            format!("ws://{address}"),
            broker.clone(),
            signer.clone(),
            vec![API_KEY.to_owned()],
            shutdown,
        );
        let serving = gateway.clone();
        tokio::spawn(async move { serving.serve(listener, Duration::from_secs(5)).await });
        InProcess {
            gateway,
            broker,
            address,
            signer,
        }
    }
}

/// A gateway running in the test's process; shut down on drop.
pub struct InProcess {
    pub gateway: Arc<wsgw::gateway::Gateway>,
    pub broker: Arc<dyn wsgw::broker::Broker>,
    pub address: SocketAddr,
    pub signer: TokenSigner,
}

impl InProcess {
    /// A connection URL for `identity` with the given tags and businesses.
    pub fn url(&self, identity: &Identity, tags: &[&str], businesses: &[&str]) -> String {
        let tags: Vec<String> = tags.iter().map(|tag| tag.to_string()).collect();
        let businesses: Vec<String> = businesses.iter().map(|b| b.to_string()).collect();
        let token = self.signer.mint(
            identity,
            &tags,
            &businesses,
            Duration::from_secs(60),
            SystemTime::now(),
        );
        format!("ws://{}/socket/{token}", self.address)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Connects a client and waits until the gateway registered its session.
    pub async fn connect(
        &self,
        identity: &Identity,
        tags: &[&str],
        businesses: &[&str],
    ) -> wsgw::client::Client {
        wsgw::client::Client::connect(&self.url(identity, tags, businesses))
            .await
            .expect("client connects")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.gateway.shutdown.cancel();
    }
}

/// The next event within 20 s.
pub async fn next_event(client: &mut wsgw::client::Client) -> wsgw::client::Event {
    tokio::time::timeout(Duration::from_secs(20), client.next_event())
        .await
        .expect("an event within 20 s")
        .expect("the connection works")
}

/// The next business message within 20 s; panics on any other event.
pub async fn next_message(client: &mut wsgw::client::Client) -> wsgw::client::IncomingMessage {
    match next_event(client).await {
        wsgw::client::Event::Message(message) => *message,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The next delivery of a broker stream within 20 s.
pub async fn next_delivery(
    stream: &mut futures_util::stream::BoxStream<'static, wsgw::broker::Delivery>,
) -> wsgw::broker::Delivery {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("a delivery within 20 s")
        .expect("the stream is open")
}

/// Parses a delivery's body as an envelope.
pub fn envelope_of(delivery: &wsgw::broker::Delivery) -> Envelope {
    Envelope::from_json(std::str::from_utf8(&delivery.body).expect("utf-8")).expect("an envelope")
}

/// Publishes a direct message through a gateway's broker and returns its messageId.
pub async fn publish_direct(
    gateway: &InProcess,
    identity: &Identity,
    content: serde_json::Value,
) -> String {
    let publication = Publication::new(envelope_to(identity, content)).expect("routable");
    gateway
        .broker
        .publish(publication)
        .await
        .expect("published")
        .message_id
}
