//! Scale-out on a three-node RabbitMQ cluster that the test builds itself (see common/cluster.rs): `wsgw serve`
//! nodes with quorum mailboxes and `amqp.urls` listing the cluster's nodes in a different order each.
//!
//! One test runs three phases on one cluster, because building a cluster takes about 25 s on the 2-core test
//! machine, and the phase that kills nodes runs last:
//! 1. a client moving from gateway A to gateway B gets on B what was queued meanwhile, and A no longer lists it;
//! 2. a broadcast by tag reaches the matching clients on all three gateways;
//! 3. 300 clients and 3,000 direct messages survive the kill -9 of a RabbitMQ node that leads mailboxes and,
//!    later, the kill -9 of a gateway: every message arrives, in order per client, and nothing is dead-lettered.
//!
//! Needs root and rabbitmq-server. Without them the test fails when CI=true and is skipped elsewhere.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use wsgw::broker::Publication;
use wsgw::broker::rabbit::{BrokerNodes, Publisher};
use wsgw::client::{Client, ClientEvent, ClientOptions, ReliableClient, UrlSource};
use wsgw::config::{AmqpConfig, MailboxConfig, QueueType};
use wsgw::domain::frame::close_code;
use wsgw::domain::{Identity, TokenSigner};

use cluster::RabbitCluster;
use common::{SECRET, Server, TestEnv, envelope_to, next_event, next_message};

/// Clients in the failover phase, spread evenly over the three gateways.
const CLIENTS: usize = 300;
/// Direct messages per client in the failover phase: 3,000 in all.
const MESSAGES_PER_CLIENT: u64 = 10;
/// Publishes in flight at once in the failover phase.
const PUBLISH_CONCURRENCY: usize = 64;
/// Round of publishes (0-based) during which the RabbitMQ node is killed, and the gateway.
const KILL_RABBIT_IN_ROUND: u64 = 3;
const KILL_GATEWAY_IN_ROUND: u64 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_and_scale_out() {
    if !cluster::cluster_available() {
        return;
    }
    let started = Instant::now();
    let mut rabbit = tokio::task::spawn_blocking(RabbitCluster::start)
        .await
        .expect("the cluster start does not panic");
    eprintln!(
        "cluster of three RabbitMQ nodes up after {:?}",
        started.elapsed()
    );

    {
        let env = cluster_env();
        let gateways = [
            serve_on_cluster(&env, &rabbit, "gw-a", 0),
            serve_on_cluster(&env, &rabbit, "gw-b", 1),
            serve_on_cluster(&env, &rabbit, "gw-c", 2),
        ];
        let phase = Instant::now();
        client_moves_between_gateways(&env, &rabbit, &gateways).await;
        eprintln!("move phase took {:?}", phase.elapsed());
        let phase = Instant::now();
        broadcast_reaches_every_gateway(&env, &rabbit, &gateways).await;
        eprintln!("broadcast phase took {:?}", phase.elapsed());
    }

    let phase = Instant::now();
    failover_keeps_every_message(&mut rabbit).await;
    eprintln!("failover phase took {:?}", phase.elapsed());

    let stopping = Instant::now();
    tokio::task::spawn_blocking(move || drop(rabbit))
        .await
        .expect("the cluster stops");
    eprintln!(
        "cluster stopped in {:?}; whole test {:?}",
        stopping.elapsed(),
        started.elapsed()
    );
}

/// Returns a test environment whose processes use quorum mailboxes and reconnect quickly.
fn cluster_env() -> TestEnv {
    TestEnv::new()
        .with_env("WSGW_MAILBOX_QUEUE_TYPE", "quorum")
        .with_env("WSGW_AMQP_RECONNECT_MAX_BACKOFF", "2s")
        .with_env("WSGW_SERVER_MAX_SESSIONS_PER_ADDRESS", "1000")
}

/// Starts `wsgw serve` with every node of the cluster in `WSGW_AMQP_URLS`, node `first` first.
fn serve_on_cluster(env: &TestEnv, rabbit: &RabbitCluster, node: &str, first: usize) -> Server {
    let urls: Vec<String> = rabbit
        .urls_from(first)
        .iter()
        .map(|url| format!("{url:?}"))
        .collect();
    let mut command = env.serve_command(node, "127.0.0.1:0");
    command
        .env_remove("WSGW_AMQP_URL")
        .env("WSGW_AMQP_URLS", format!("[{}]", urls.join(", ")));
    Server::spawn(command)
}

fn quorum_mailbox(env: &TestEnv) -> MailboxConfig {
    MailboxConfig {
        queue_type: QueueType::Quorum,
        ..env.mailbox_config()
    }
}

/// Connects a publisher to the given nodes, with a deadline long enough for a quorum leader election.
async fn cluster_publisher(env: &TestEnv, urls: Vec<String>) -> Publisher {
    let amqp = AmqpConfig {
        prefix: env.prefix.clone(),
        publish_timeout: Duration::from_secs(30),
        ..AmqpConfig::default()
    };
    let nodes = BrokerNodes::new(urls).expect("at least one node");
    Publisher::connect(
        nodes,
        &amqp,
        &quorum_mailbox(env),
        "wsgw cluster test publisher",
    )
    .await
    .expect("publisher connects to the cluster")
}

/// Publishes one direct message with a confirm, retrying with the same messageId after a failure; returns its
/// messageId and the number of retries.
async fn publish_confirmed(
    publisher: &Publisher,
    identity: &Identity,
    content: serde_json::Value,
) -> (String, u32) {
    let publication = Publication::new(envelope_to(identity, content)).expect("routable envelope");
    let mut retries = 0;
    loop {
        match publisher.publish(&publication).await {
            Ok(published) => return (published.message_id, retries),
            Err(error) => {
                retries += 1;
                assert!(
                    retries <= 5,
                    "message {} to {identity} was not confirmed after {retries} attempts: {error}",
                    publication.envelope.id()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Mints a connection URL for `identity` on the gateway at `address`, with broadcast tags.
fn url_with_tags(address: SocketAddr, identity: &Identity, tags: &[&str]) -> String {
    let signer = TokenSigner::new(SECRET.as_bytes()).expect("valid secret");
    let tags: Vec<String> = tags.iter().map(|tag| tag.to_string()).collect();
    let token = signer.mint(
        identity,
        &tags,
        &[],
        Duration::from_secs(60),
        SystemTime::now(),
    );
    format!("ws://{address}/socket/{token}")
}

/// Runs `wsgw sessions --output json` through the one RabbitMQ node given with --amqp-url.
fn sessions_json(env: &TestEnv, amqp_url: &str) -> serde_json::Value {
    let output = env
        .wsgw()
        .args(["--amqp-url", amqp_url, "--output", "json", "sessions"])
        .args(["--timeout", "1500ms"])
        .output()
        .expect("run wsgw sessions");
    assert!(
        output.status.success(),
        "wsgw sessions failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("wsgw sessions prints JSON")
}

/// Returns the nodes that list a session of `identity`, sorted.
fn nodes_listing(listing: &serde_json::Value, identity: &Identity) -> Vec<String> {
    let mut nodes: Vec<String> = listing["sessions"]
        .as_array()
        .expect("a sessions array")
        .iter()
        .filter(|session| {
            session["uniqueId"] == identity.unique_id.as_str()
                && session["clientType"] == identity.client_type.as_str()
        })
        .map(|session| session["node"].as_str().unwrap_or("?").to_owned())
        .collect();
    nodes.sort();
    nodes
}

/// Phase 1: a client moves from gateway A to gateway B, once after closing its connection to A and once while
/// that connection stays open and unread (a phone that changed networks).
async fn client_moves_between_gateways(
    env: &TestEnv,
    rabbit: &RabbitCluster,
    gateways: &[Server; 3],
) {
    let publisher = cluster_publisher(env, rabbit.urls_from(1)).await;

    let closing = env.identity("h5");
    let mut on_a = Client::connect(&env.connection_url(&gateways[0], &closing))
        .await
        .expect("connect to gateway A");
    assert_eq!(on_a.welcome.node, "gw-a");
    let (first, _) = publish_confirmed(&publisher, &closing, json!({"seq": 0})).await;
    let message = next_message(&mut on_a).await;
    assert_eq!(message.envelope.id(), first, "A delivers the first message");
    on_a.ack(&first).await.expect("ack on A");
    on_a.close().await.expect("close the connection to A");

    let mut queued = Vec::new();
    for seq in 1..=5 {
        queued.push(
            publish_confirmed(&publisher, &closing, json!({"seq": seq}))
                .await
                .0,
        );
    }
    let mut on_b = Client::connect(&env.connection_url(&gateways[1], &closing))
        .await
        .expect("connect to gateway B");
    assert_eq!(on_b.welcome.node, "gw-b");
    for expected in &queued {
        let message = next_message(&mut on_b).await;
        assert_eq!(
            message.envelope.id(),
            expected,
            "B delivers the messages queued during the move, in order"
        );
        on_b.ack(expected).await.expect("ack on B");
    }

    let abrupt = env.identity("h5");
    let mut stale = Client::connect(&env.connection_url(&gateways[0], &abrupt))
        .await
        .expect("connect to gateway A");
    let mut in_flight = Vec::new();
    for seq in 0..5 {
        in_flight.push(
            publish_confirmed(&publisher, &abrupt, json!({"seq": seq}))
                .await
                .0,
        );
    }
    let mut moved = Client::connect(&env.connection_url(&gateways[1], &abrupt))
        .await
        .expect("connect to gateway B while the connection to A is open");
    for expected in &in_flight {
        let message = next_message(&mut moved).await;
        assert_eq!(
            message.envelope.id(),
            expected,
            "B delivers what A had pushed and nobody acked, in order"
        );
        moved.ack(expected).await.expect("ack on B");
    }
    let replaced = loop {
        match next_event(&mut stale).await {
            wsgw::client::Event::Message(_) => continue,
            wsgw::client::Event::Closed { code, .. } => break code,
            other => panic!("the stale connection to A should close, got {other:?}"),
        }
    };
    assert_eq!(
        replaced,
        Some(close_code::REPLACED),
        "A closes the stale session as replaced"
    );

    // A no longer lists either identity; B lists both. Read through the third node with --amqp-url.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let env_ref = env;
        let url = rabbit.url(2);
        let listing = tokio::task::block_in_place(|| sessions_json(env_ref, &url));
        let closing_nodes = nodes_listing(&listing, &closing);
        let abrupt_nodes = nodes_listing(&listing, &abrupt);
        if closing_nodes == ["gw-b"] && abrupt_nodes == ["gw-b"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the moves only gw-b should list the clients, got {closing_nodes:?} and {abrupt_nodes:?}: {listing}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    publisher.close().await;
}

/// Phase 2: `wsgw send --tags` without a recipient reaches the clients with that tag on every gateway, and no
/// other client.
async fn broadcast_reaches_every_gateway(
    env: &TestEnv,
    rabbit: &RabbitCluster,
    gateways: &[Server; 3],
) {
    let tag = format!("promo-{}", &env.prefix[env.prefix.len() - 6..]);
    let mut tagged = Vec::new();
    let mut untagged = Vec::new();
    for gateway in gateways {
        let identity = env.identity("h5");
        tagged.push(
            Client::connect(&url_with_tags(gateway.address, &identity, &[&tag]))
                .await
                .expect("connect a tagged client"),
        );
        let identity = env.identity("h5");
        untagged.push(
            Client::connect(&url_with_tags(gateway.address, &identity, &["other"]))
                .await
                .expect("connect an untagged client"),
        );
    }
    let nodes: HashSet<String> = tagged
        .iter()
        .map(|client| client.welcome.node.clone())
        .collect();
    assert_eq!(nodes.len(), 3, "one tagged client per gateway: {nodes:?}");

    let output = env
        .wsgw()
        .args(["--amqp-url", &rabbit.url(1), "--output", "json", "send"])
        .args(["--business-type", "promo", "--message-type", "SALE"])
        .args(["--content", r#"{"percent":10}"#, "--tags", &tag])
        .output()
        .expect("run wsgw send");
    assert!(
        output.status.success(),
        "wsgw send --tags failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sent: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("wsgw send prints JSON");
    let message_id = sent["messageId"].as_str().expect("a messageId").to_owned();

    for client in &mut tagged {
        let message = next_message(client).await;
        assert_eq!(
            message.envelope.id(),
            message_id,
            "the tagged client on {} gets the broadcast",
            client.welcome.node
        );
    }
    for client in &mut untagged {
        let event = tokio::time::timeout(Duration::from_secs(1), client.next_event()).await;
        assert!(
            event.is_err(),
            "the untagged client on {} got {event:?}",
            client.welcome.node
        );
    }
}

/// What one client of the failover phase saw.
#[derive(Default)]
struct ClientLog {
    /// Gateway node of each connection and when it opened, in order.
    opens: Vec<(String, Instant)>,
    /// (messageId, seq) of each message handed to the client, in order.
    messages: Vec<(String, u64)>,
}

/// Addresses of the gateways clients may connect to; None once a gateway is killed.
type GatewayBook = Arc<StdMutex<Vec<Option<SocketAddr>>>>;

/// Returns a URL source that connects to gateway `home` while it lives, else to the next live one.
fn url_source(book: GatewayBook, home: usize, identity: Identity) -> UrlSource {
    Arc::new(
        move || -> BoxFuture<'static, Result<String, wsgw::client::ClientError>> {
            let addresses = book.lock().expect("lock").clone();
            let count = addresses.len();
            let address = (0..count)
                .filter_map(|offset| addresses[(home + offset) % count])
                .next();
            let result = match address {
                Some(address) => Ok(url_with_tags(address, &identity, &[])),
                None => Err(wsgw::client::ClientError::Connection(
                    "no gateway is alive".to_owned(),
                )),
            };
            Box::pin(async move { result })
        },
    )
}

/// Phase 3: 300 clients, 3,000 direct messages, a RabbitMQ node killed while they are published and then a
/// gateway killed.
async fn failover_keeps_every_message(rabbit: &mut RabbitCluster) {
    let env = cluster_env();
    let names = ["gw-1", "gw-2", "gw-3"];
    let mut gateways: Vec<Option<Server>> = names
        .iter()
        .enumerate()
        .map(|(index, name)| Some(serve_on_cluster(&env, rabbit, name, index)))
        .collect();
    let book: GatewayBook = Arc::new(StdMutex::new(
        gateways
            .iter()
            .map(|gateway| gateway.as_ref().map(|server| server.address))
            .collect(),
    ));

    let before: Vec<String> = (0..rabbit.nodes.len())
        .map(|node| rabbit.resources(node))
        .collect();
    let connecting = Instant::now();
    let mut identities = Vec::new();
    let mut handles = Vec::new();
    let mut logs = Vec::new();
    let mut collectors = Vec::new();
    for index in 0..CLIENTS {
        let identity = env.identity("h5");
        let options = ClientOptions {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
            ..ClientOptions::default()
        };
        let source = url_source(book.clone(), index % names.len(), identity.clone());
        let (handle, mut events) = ReliableClient::start(source, options);
        let log = Arc::new(StdMutex::new(ClientLog::default()));
        let recorded = log.clone();
        let acker = handle.clone();
        collectors.push(tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    ClientEvent::Open(welcome) => {
                        recorded
                            .lock()
                            .expect("lock")
                            .opens
                            .push((welcome.node, Instant::now()));
                    }
                    ClientEvent::Message(message) => {
                        let id = message.envelope.id().to_owned();
                        let seq = message.envelope.content["seq"].as_u64().unwrap_or(u64::MAX);
                        recorded
                            .lock()
                            .expect("lock")
                            .messages
                            .push((id.clone(), seq));
                        acker.ack(&id).await;
                    }
                    _ => {}
                }
            }
        }));
        identities.push(identity);
        handles.push(handle);
        logs.push(log);
    }
    wait_until(
        "every client has a session",
        Duration::from_secs(150),
        || {
            logs.iter()
                .all(|log| !log.lock().expect("lock").opens.is_empty())
        },
    )
    .await;
    eprintln!("{CLIENTS} clients connected in {:?}", connecting.elapsed());
    for (node, before) in before.iter().enumerate() {
        eprintln!(
            "{} {{memory, file handles}}: before the clients {before}, after {}",
            rabbit.nodes[node].name,
            rabbit.resources(node)
        );
    }

    // The victim is the RabbitMQ node that leads the most of this test's mailboxes.
    let mailbox_prefix = format!("{}.mailbox.", env.prefix);
    let leaders = rabbit.leaders(0, &mailbox_prefix);
    assert_eq!(
        leaders.len(),
        CLIENTS,
        "every mailbox is a quorum queue with a leader"
    );
    let mut led: BTreeMap<String, usize> = BTreeMap::new();
    for (_, leader) in &leaders {
        *led.entry(leader.clone()).or_default() += 1;
    }
    let (victim_name, victim_leads) = led
        .iter()
        .max_by_key(|(_, count)| **count)
        .map(|(name, count)| (name.clone(), *count))
        .expect("a leader");
    let victim = rabbit.index_of(&victim_name);
    let survivors: Vec<usize> = (0..rabbit.nodes.len())
        .filter(|node| *node != victim)
        .collect();
    eprintln!("mailbox leaders {led:?}; killing {victim_name}, which leads {victim_leads}");
    // The gateway killed later is one that the RabbitMQ failure did not touch first.
    let gateway_victim = (victim + 1) % names.len();

    let publisher = cluster_publisher(
        &env,
        survivors.iter().map(|node| rabbit.url(*node)).collect(),
    )
    .await;
    let publishing = Instant::now();
    let mut published: HashMap<String, (usize, u64)> = HashMap::new();
    let mut retries = 0;
    let mut rabbit_kill = None;
    let mut gateway_kill = None;
    for seq in 0..MESSAGES_PER_CLIENT {
        if seq == KILL_RABBIT_IN_ROUND {
            let pid = rabbit.prepare_kill(victim);
            rabbit_kill = Some(tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(100));
                cluster::kill_process(pid);
            }));
        }
        if seq == KILL_GATEWAY_IN_ROUND {
            book.lock().expect("lock")[gateway_victim] = None;
            let mut server = gateways[gateway_victim].take().expect("the gateway runs");
            gateway_kill = Some(tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(100));
                server.kill();
                (server, Instant::now())
            }));
        }
        let round: Vec<(String, usize, u32)> =
            futures_util::stream::iter(identities.iter().enumerate())
                .map(|(index, identity)| {
                    let publisher = &publisher;
                    async move {
                        let (id, retried) =
                            publish_confirmed(publisher, identity, json!({"seq": seq})).await;
                        (id, index, retried)
                    }
                })
                .buffer_unordered(PUBLISH_CONCURRENCY)
                .collect()
                .await;
        for (id, index, retried) in round {
            published.insert(id, (index, seq));
            retries += retried;
        }
        if seq == KILL_RABBIT_IN_ROUND {
            rabbit_kill
                .take()
                .expect("the kill task")
                .await
                .expect("kill the node");
            eprintln!("killed RabbitMQ node {victim_name} during round {seq}");
        }
    }
    let (killed_gateway, gateway_killed_at) = gateway_kill
        .take()
        .expect("the gateway kill task")
        .await
        .expect("kill the gateway");
    eprintln!(
        "published {} messages in {:?} ({retries} retries); killed gateway {}",
        published.len(),
        publishing.elapsed(),
        names[gateway_victim]
    );
    assert_eq!(
        published.len(),
        CLIENTS * MESSAGES_PER_CLIENT as usize,
        "every publish has its own messageId"
    );

    let incomplete = || -> Vec<usize> {
        (0..logs.len())
            .filter(|index| {
                let seen: HashSet<u64> = logs[*index]
                    .lock()
                    .expect("lock")
                    .messages
                    .iter()
                    .map(|(_, seq)| *seq)
                    .collect();
                seen.len() as u64 != MESSAGES_PER_CLIENT
            })
            .collect()
    };
    let delivery_deadline = Instant::now() + Duration::from_secs(120);
    while !incomplete().is_empty() && Instant::now() < delivery_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stuck = incomplete();
    if !stuck.is_empty() {
        let live_gateways: Vec<&Server> =
            gateways.iter().flatten().chain([&killed_gateway]).collect();
        let report = stuck_report(
            rabbit,
            survivors[0],
            &env,
            &identities,
            &logs,
            &stuck,
            &live_gateways,
        );
        panic!(
            "{} of {CLIENTS} clients are missing messages after 120 s:\n{report}",
            stuck.len()
        );
    }
    eprintln!(
        "all messages delivered {:?} after publishing started",
        publishing.elapsed()
    );

    // Every messageId arrived at least once, at the client it was published to.
    let mut arrived: HashSet<String> = HashSet::new();
    for (index, log) in logs.iter().enumerate() {
        for (id, _) in &log.lock().expect("lock").messages {
            if let Some((owner, _)) = published.get(id) {
                assert_eq!(*owner, index, "message {id} reached the wrong client");
            }
            arrived.insert(id.clone());
        }
    }
    let missing: Vec<&String> = published
        .keys()
        .filter(|id| !arrived.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} messages never arrived, such as {:?}",
        missing.len(),
        missing.first()
    );

    // Per-client order: each seq is above the previous one, or repeats it (a redelivered duplicate).
    for (index, log) in logs.iter().enumerate() {
        let log = log.lock().expect("lock");
        let seqs: Vec<u64> = log.messages.iter().map(|(_, seq)| *seq).collect();
        for pair in seqs.windows(2) {
            assert!(
                pair[1] >= pair[0],
                "client {} ({}) got seq {} after {}: {seqs:?}",
                index,
                identities[index],
                pair[1],
                pair[0]
            );
        }
    }

    // The clients of the killed gateway moved to the other gateways.
    let killed_name = names[gateway_victim];
    let mut moved = 0;
    let mut slowest_move = Duration::ZERO;
    for (index, log) in logs.iter().enumerate() {
        let log = log.lock().expect("lock");
        let nodes: Vec<&str> = log.opens.iter().map(|(node, _)| node.as_str()).collect();
        if nodes.first() == Some(&killed_name) {
            let (last, opened_at) = log.opens.last().expect("an open");
            assert_ne!(
                last, killed_name,
                "client {index} should have moved off {killed_name}: {nodes:?}"
            );
            moved += 1;
            slowest_move = slowest_move.max(opened_at.saturating_duration_since(gateway_killed_at));
        }
    }
    eprintln!(
        "{moved} clients of {killed_name} reconnected to other gateways within {slowest_move:?} of its kill"
    );

    // The gateway that preferred the killed RabbitMQ node reconnected to another node.
    let failed_over = gateways[victim].as_ref().unwrap_or(&killed_gateway);
    let victim_address = format!("127.0.0.1:{}/", rabbit.nodes[victim].amqp_port);
    let reconnected = failed_over.all_logs().lines().any(|line| {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
            return false;
        };
        let fields = &record["fields"];
        fields["message"] == "connected to RabbitMQ"
            && fields["node"]
                .as_str()
                .is_some_and(|node| node.contains("127.0.0.1:") && !node.contains(&victim_address))
    });
    assert!(
        reconnected,
        "{} preferred {victim_name} and should log a connection to another node; logs:\n{}",
        names[victim],
        failed_over.all_logs()
    );

    // Nothing was dead-lettered.
    let dead_letters =
        queue_message_count(&rabbit.url(survivors[0]), &format!("{}.dlq", env.prefix)).await;
    assert_eq!(dead_letters, 0, "the dead-letter queue should be empty");

    let reconnects: usize = logs
        .iter()
        .map(|log| log.lock().expect("lock").opens.len() - 1)
        .sum();
    let duplicates: usize = logs
        .iter()
        .map(|log| {
            let log = log.lock().expect("lock");
            log.messages.len()
                - log
                    .messages
                    .iter()
                    .map(|(id, _)| id)
                    .collect::<HashSet<_>>()
                    .len()
        })
        .sum();
    eprintln!(
        "client reconnects: {reconnects}; duplicate deliveries handed to clients: {duplicates}"
    );
    for gateway in gateways.iter().flatten().chain([&killed_gateway]) {
        let logs = gateway.all_logs();
        let count = |needle: &str| logs.lines().filter(|line| line.contains(needle)).count();
        eprintln!(
            "gateway {}: {} mailbox consumers ended, {} resumed, {} acks failed",
            gateway.address,
            count("mailbox consumer ended"),
            count("mailbox consumer resumed"),
            count("ack failed")
        );
    }

    for handle in &handles {
        handle.stop().await;
    }
    for collector in collectors {
        let _ = collector.await;
    }
    publisher.close().await;
    drop(gateways);
    drop(killed_gateway);
}

/// Describes up to three clients that miss messages: what they saw, their mailbox as RabbitMQ lists it, and the
/// gateway log lines that name them.
fn stuck_report(
    rabbit: &RabbitCluster,
    via: usize,
    env: &TestEnv,
    identities: &[Identity],
    logs: &[Arc<StdMutex<ClientLog>>],
    stuck: &[usize],
    gateways: &[&Server],
) -> String {
    let queues = rabbit.ctl(
        &rabbit.nodes[via],
        &[
            "list_queues",
            "-q",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "leader",
            "online",
        ],
    );
    let mut report = String::new();
    for index in stuck.iter().take(3) {
        let identity = &identities[*index];
        let log = logs[*index].lock().expect("lock");
        let seqs: Vec<u64> = log.messages.iter().map(|(_, seq)| *seq).collect();
        let opens: Vec<&str> = log.opens.iter().map(|(node, _)| node.as_str()).collect();
        report.push_str(&format!(
            "client {index} ({identity}): opens {opens:?}, seqs {seqs:?}\n"
        ));
        let mailbox = env.mailbox(identity);
        for line in queues.lines().filter(|line| line.starts_with(&mailbox)) {
            report.push_str(&format!("  queue: {line}\n"));
        }
        for gateway in gateways {
            for line in gateway
                .all_logs()
                .lines()
                .filter(|line| line.contains(&identity.unique_id))
            {
                report.push_str(&format!("  gateway: {line}\n"));
            }
        }
    }
    report
}

/// Reads the ready messages of a queue with a passive declare through `url`.
async fn queue_message_count(url: &str, queue: &str) -> u32 {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect to a surviving node");
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
    declared.message_count()
}

/// Polls `done` every 200 ms until it holds; panics after `within`.
async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
