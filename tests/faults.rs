//! Failure scenarios from the field, each with the fault injected for real into the machine's RabbitMQ or the
//! gateway process. The tests in this file take one lock, so only one fault is in the air at a time; cargo runs
//! test binaries one after another, so no other test file runs meanwhile. Broker settings are restored on drop,
//! also when a test fails.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use wsgw::broker::BrokerError;
use wsgw::client::{Client, Event};
use wsgw::domain::frame::close_code;

use common::{BrokerKind, TestEnv, next_event, next_message};
use wsgw::config::PublisherMode;

static BROKER_FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("rabbitmqctl {args:?} could not run: {error}"));
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Puts the broker back as it was when dropped: application running, memory watermark as before.
struct BrokerRestore {
    watermark: String,
}

impl BrokerRestore {
    fn new() -> BrokerRestore {
        let watermark = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
            .trim()
            .to_owned();
        BrokerRestore { watermark }
    }
}

impl Drop for BrokerRestore {
    fn drop(&mut self) {
        let run = |args: &[&str]| {
            let _ = Command::new("rabbitmqctl").args(args).output();
        };
        run(&["start_app"]);
        run(&["await_startup"]);
        run(&["set_vm_memory_high_watermark", &self.watermark]);
    }
}

async fn readyz(server: &common::Server) -> u16 {
    let url = format!("{}/readyz", server.http_url());
    match wsgw::http_client::request(hyper::Method::GET, &url, None, None, Duration::from_secs(5))
        .await
    {
        Ok((status, _)) => status.as_u16(),
        Err(_) => 0,
    }
}

async fn wait_for_readyz(server: &common::Server, expected: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let status = readyz(server).await;
        if status == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn dead_letter_count(env: &TestEnv) -> u32 {
    env.queue_counts(&format!("{}.dlq", env.prefix)).await.0
}

/// Reads messages until `wanted` distinct messageIds arrived, acking each; checks that every repeat is marked
/// redelivered. Returns the ids in arrival order (repeats included).
async fn collect_distinct(
    client: &mut Client,
    seen: &mut HashSet<String>,
    wanted: usize,
) -> Vec<String> {
    let mut arrived = Vec::new();
    while seen.len() < wanted {
        let message = next_message(client).await;
        let id = message.envelope.id().to_owned();
        if !seen.insert(id.clone()) {
            assert!(
                message.redelivered,
                "repeat of {id} without the redelivered mark"
            );
        }
        client.ack(&id).await.expect("ack");
        arrived.push(id);
    }
    arrived
}

#[tokio::test]
async fn s01_dropped_client_gets_every_message_after_reconnect() {
    require_rabbitmq!();
    let _serial = BROKER_FAULTS.lock().await;
    let env = TestEnv::new();
    let server = env.serve("node-a");
    let identity = env.identity("h5");
    let publisher = env.publisher().await;
    let mut published = Vec::new();
    for index in 0..100 {
        published.push(common::publish_to(&publisher, &identity, json!(index)).await);
    }

    let mut seen = HashSet::new();
    let mut client = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("connect");
    collect_distinct(&mut client, &mut seen, 50).await;
    // Cut the connection without a close handshake.
    drop(client);
    server
        .wait_for_log(&["session ended", &identity.unique_id])
        .await;

    let mut client = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("reconnect");
    collect_distinct(&mut client, &mut seen, 100).await;
    let expected: HashSet<String> = published.into_iter().collect();
    assert_eq!(seen, expected, "every messageId reaches the client");
    client.close().await.expect("close");
    assert_eq!(env.settled_message_count(&env.mailbox(&identity)).await, 0);
    assert_eq!(
        dead_letter_count(&env).await,
        0,
        "the dead-letter queue is empty"
    );
}

async fn s02_broker_restart_restores_consumers_and_topology(mode: PublisherMode) {
    let _serial = BROKER_FAULTS.lock().await;
    let env = TestEnv::new()
        .with_mode(mode)
        .with_env("WSGW_AMQP_RECONNECT_MAX_BACKOFF", "2s");
    let server = env.serve("node-a");
    let identities: Vec<_> = (0..20).map(|_| env.identity("h5")).collect();
    let mut clients = Vec::new();
    for identity in &identities {
        clients.push(
            Client::connect(&env.connection_url(&server, identity))
                .await
                .expect("connect"),
        );
    }
    wait_for_readyz(&server, 200, Duration::from_secs(5)).await;

    let _restore = BrokerRestore::new();
    rabbitmqctl(&["stop_app"]);
    wait_for_readyz(&server, 503, Duration::from_secs(20)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let back = Instant::now();

    let publisher = env.publisher().await;
    let mut expected: HashMap<usize, HashSet<String>> = HashMap::new();
    for index in 0..100 {
        let target = index % identities.len();
        let id = common::publish_to(&publisher, &identities[target], json!(index)).await;
        expected.entry(target).or_default().insert(id);
    }
    let mut readers = Vec::new();
    for (index, mut client) in clients.into_iter().enumerate() {
        let wanted = expected.get(&index).map_or(0, HashSet::len);
        readers.push(tokio::spawn(async move {
            let mut seen = HashSet::new();
            collect_distinct(&mut client, &mut seen, wanted).await;
            let _ = client.close().await;
            (index, seen)
        }));
    }
    for reader in readers {
        let (index, seen) = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("all messages within 30 s of the broker being back")
            .expect("join");
        assert_eq!(Some(&seen), expected.get(&index), "client {index}");
    }
    assert!(back.elapsed() < Duration::from_secs(30));
    wait_for_readyz(&server, 200, Duration::from_secs(10)).await;

    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    for exchange in ["direct", "inbound", "broadcast", "dlx", "control"] {
        let name = format!("{}.{exchange}", env.prefix);
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                name.as_str().into(),
                lapin::ExchangeKind::Direct,
                passive,
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|error| {
                panic!("exchange {name} is missing after the restart: {error}")
            });
    }
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let dlq = format!("{}.dlq", env.prefix);
    channel
        .queue_declare(dlq.as_str().into(), passive, FieldTable::default())
        .await
        .unwrap_or_else(|error| panic!("queue {dlq} is missing after the restart: {error}"));
    // The node's control queue is exclusive to the node's connection: another connection's passive declare
    // fails with RESOURCE_LOCKED when it exists, and with NOT_FOUND when it does not.
    let control = format!("{}.control.node-a", env.prefix);
    let channel = connection.create_channel().await.expect("channel");
    let error = channel
        .queue_declare(control.as_str().into(), passive, FieldTable::default())
        .await
        .expect_err("an exclusive queue of another connection");
    assert!(
        error.to_string().contains("RESOURCE_LOCKED"),
        "queue {control} is missing: {error}"
    );
}

#[tokio::test]
async fn s03_half_open_client_is_dropped_and_healthy_client_stays_fast() {
    require_rabbitmq!();
    let _serial = BROKER_FAULTS.lock().await;
    let env = TestEnv::new();
    let gateway = env
        .gateway(BrokerKind::Rabbit, |config| {
            config.session.ping_interval = Duration::from_millis(500);
            config.session.pong_timeout = Duration::from_millis(500);
        })
        .await;
    let dead = env.identity("charger");
    let healthy = env.identity("charger");
    // The dead client never reads again after its welcome frame, so it sends no pong.
    let dead_client = gateway.connect(&dead, &[], &[]).await;
    let mut healthy_client = gateway.connect(&healthy, &[], &[]).await;
    let stopped_answering = Instant::now();

    let dead_ids = [
        common::publish_direct(&gateway, &dead, json!("first")).await,
        common::publish_direct(&gateway, &dead, json!("second")).await,
    ];
    let mut latencies = Vec::new();
    let mut dead_gone_after = None;
    for index in 0..60 {
        let sent = Instant::now();
        let id = common::publish_direct(&gateway, &healthy, json!(index)).await;
        let message = next_message(&mut healthy_client).await;
        assert_eq!(message.envelope.id(), id);
        latencies.push(sent.elapsed());
        healthy_client.ack(&id).await.expect("ack");
        let listed = gateway
            .gateway
            .registry
            .sessions()
            .iter()
            .any(|session| session.identity == dead);
        if !listed && dead_gone_after.is_none() {
            dead_gone_after = Some(stopped_answering.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let gone_after = dead_gone_after.expect("the dead session left the session list");
    assert!(
        gone_after <= Duration::from_millis(2000),
        "dead session listed for {gone_after:?}"
    );
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    assert!(
        p99 < Duration::from_secs(1),
        "healthy client's p99 delivery latency {p99:?}"
    );
    drop(dead_client);

    let mut reconnected = gateway.connect(&dead, &[], &[]).await;
    for id in &dead_ids {
        let message = next_message(&mut reconnected).await;
        assert_eq!(message.envelope.id(), id);
        reconnected.ack(id).await.expect("ack");
    }
    reconnected.close().await.expect("close");
    healthy_client.close().await.expect("close");
}

async fn s04_send_to_new_identity_is_kept_or_reported_unroutable(mode: PublisherMode) {
    let _serial = BROKER_FAULTS.lock().await;
    let env = TestEnv::new().with_mode(mode);
    let fresh = env.identity("charger");
    let send = |args: &[&str]| {
        env.wsgw()
            .args([
                "send",
                "--business-type",
                "charging",
                "--message-type",
                "PORT_STATUS",
                "--content",
                "{}",
            ])
            .args(args)
            .output()
            .expect("run wsgw send")
    };

    let output = send(&["--to", &fresh.unique_id, "--to-client-type", "charger"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let message_id = String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    let (messages, _) = env.queue_counts(&env.mailbox(&fresh)).await;
    assert_eq!(
        messages, 1,
        "the mailbox was declared first and keeps the message"
    );

    let output = send(&["--to", "nobody-has-this-id"]);
    assert_eq!(output.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not routed") && stderr.contains("dead-letter queue"),
        "{stderr}"
    );
    assert_eq!(
        dead_letter_count(&env).await,
        1,
        "the unroutable message is parked, not lost"
    );

    let server = env.serve("node-a");
    let mut client = Client::connect(&env.connection_url(&server, &fresh))
        .await
        .expect("connect");
    let message = next_message(&mut client).await;
    assert_eq!(message.envelope.id(), message_id);
    client.ack(&message_id).await.expect("ack");
    client.close().await.expect("close");
}

async fn s05_blocked_broker_fails_sends_within_deadline(mode: PublisherMode) {
    let _serial = BROKER_FAULTS.lock().await;
    let env = TestEnv::new()
        .with_mode(mode)
        .with_env("WSGW_AMQP_PUBLISH_TIMEOUT", "2s");
    let server = env.serve("node-a");
    let identity = env.identity("charger");
    let mut session = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("connect");

    let restore = BrokerRestore::new();
    rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);
    let send = |message_id: String| {
        let mut command = env.wsgw();
        command
            .args([
                "send",
                "--to",
                &identity.unique_id,
                "--to-client-type",
                "charger",
            ])
            .args([
                "--business-type",
                "charging",
                "--message-type",
                "PORT_STATUS",
                "--content",
                "{}",
            ])
            .args(["--message-id", &message_id]);
        std::thread::spawn(move || {
            let started = Instant::now();
            (command.output().expect("run wsgw send"), started.elapsed())
        })
    };
    let blocked: Vec<_> = (0..10)
        .map(|index| send(format!("blocked-{index}")))
        .collect();
    for index in 0..10 {
        let url = format!(
            "{}/websocket/token?uniqueId=u{index}&clientType=h5",
            server.http_url()
        );
        let (status, _) = wsgw::http_client::request(
            hyper::Method::GET,
            &url,
            Some(common::API_KEY),
            None,
            Duration::from_secs(5),
        )
        .await
        .expect("token endpoint answers while the broker blocks publishers");
        assert_eq!(status.as_u16(), 200);
    }
    for handle in blocked {
        let (output, elapsed) = tokio::task::spawn_blocking(move || handle.join().expect("join"))
            .await
            .expect("join");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(75), "no false success: {stderr}");
        assert!(stderr.contains("blocking publishers"), "{stderr}");
        assert!(elapsed < Duration::from_secs(15), "send took {elapsed:?}");
    }
    drop(restore);

    let after: Vec<_> = (0..10)
        .map(|index| send(format!("after-{index}")))
        .collect();
    for handle in after {
        let (output, _) = tokio::task::spawn_blocking(move || handle.join().expect("join"))
            .await
            .expect("join");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The session opened before the alarm still receives. The blocked sends were reported as failed, but their
    // bytes may reach the broker once it unblocks, so they may arrive too, under the ids they were sent with.
    let expected: HashSet<String> = (0..10).map(|index| format!("after-{index}")).collect();
    let mut received = HashSet::new();
    while !expected.is_subset(&received) {
        let message = next_message(&mut session).await;
        let id = message.envelope.id().to_owned();
        assert!(
            id.starts_with("after-") || id.starts_with("blocked-"),
            "unexpected message {id}"
        );
        session.ack(&id).await.expect("ack");
        received.insert(id);
    }
    session.close().await.expect("close");
}

async fn s06_gateway_killed_mid_stream_loses_nothing(mode: PublisherMode) {
    let _serial = BROKER_FAULTS.lock().await;
    let env = TestEnv::new().with_mode(mode);
    let mut first = env.serve("node-a");
    let identity = env.identity("h5");
    let publisher = env.publisher().await;
    let mut published = HashSet::new();
    for index in 0..100 {
        published.insert(common::publish_to(&publisher, &identity, json!(index)).await);
    }

    let mut client = Client::connect(&env.connection_url(&first, &identity))
        .await
        .expect("connect");
    let mut seen = HashSet::new();
    collect_distinct(&mut client, &mut seen, 50).await;
    first.kill();
    drop(client);

    let second = env.serve("node-b");
    let mut client = Client::connect(&env.connection_url(&second, &identity))
        .await
        .expect("reconnect");
    collect_distinct(&mut client, &mut seen, 100).await;
    assert_eq!(seen, published, "100 distinct messageIds reach the client");
    client.close().await.expect("close");
    assert_eq!(env.settled_message_count(&env.mailbox(&identity)).await, 0);
}

#[tokio::test]
async fn s09_second_connection_replaces_first_and_is_listed_alone() {
    require_rabbitmq!();
    let _serial = BROKER_FAULTS.lock().await;
    let env = TestEnv::new();
    let gateway = env.gateway(BrokerKind::Rabbit, |_| {}).await;
    let identity = env.identity("h5");
    let mut first = gateway.connect(&identity, &[], &[]).await;
    let mut second = gateway.connect(&identity, &[], &[]).await;
    match next_event(&mut first).await {
        Event::Closed { code, .. } => assert_eq!(code, Some(close_code::REPLACED)),
        other => panic!("A should be told it was replaced, got {other:?}"),
    }
    first.close().await.expect("close A");

    let id = common::publish_direct(&gateway, &identity, json!("to B")).await;
    let message = next_message(&mut second).await;
    assert_eq!(message.envelope.id(), id);
    second.ack(&id).await.expect("ack");
    let sessions: Vec<_> = gateway
        .gateway
        .registry
        .sessions()
        .into_iter()
        .filter(|session| session.identity == identity)
        .collect();
    assert_eq!(sessions.len(), 1, "exactly the live connection is listed");
    assert_eq!(sessions[0].session_id, second.welcome.session_id);
    second.close().await.expect("close B");
}

async fn s10_mailbox_limit_and_poison_message_lose_nothing(mode: PublisherMode) {
    let _serial = BROKER_FAULTS.lock().await;
    let env = TestEnv::new().with_mode(mode);
    let gateway = env
        .gateway(BrokerKind::Rabbit, |config| {
            config.mailbox.max_length = 10;
            config.session.max_rejects = 3;
        })
        .await;

    // Limit: 15 publishes to an offline mailbox of 10.
    let offline = env.identity("charger");
    let mut accepted = Vec::new();
    let mut refused = 0;
    for index in 0..15 {
        let publication =
            wsgw::broker::Publication::new(common::envelope_to(&offline, json!(index)))
                .expect("routable");
        match gateway.broker.publish(publication).await {
            Ok(published) => accepted.push(published.message_id),
            Err(BrokerError::Refused { .. }) => refused += 1,
            Err(other) => panic!("unexpected publish error for message {index}: {other}"),
        }
    }
    let mut client = gateway.connect(&offline, &[], &[]).await;
    let mut delivered = HashSet::new();
    collect_distinct(&mut client, &mut delivered, 10).await;
    client.close().await.expect("close");
    assert_eq!(
        env.settled_message_count(&env.mailbox(&offline)).await,
        0,
        "exactly 10 were queued"
    );
    let dead_lettered = dead_letter_count(&env).await as usize;
    assert_eq!(
        delivered.len() + refused + dead_lettered,
        15,
        "every message is accounted for"
    );
    // With confirms the mailbox nacks what is over its limit, and in a transaction the commit fails. Either
    // way the publisher gets an error.
    assert_eq!(refused, 5);
    assert_eq!(dead_lettered, 0);
    let baseline = dead_lettered as u32;

    // Poison: one message the client always rejects, among nine good ones.
    let identity = env.identity("h5");
    let mut good = HashSet::new();
    let mut poison = String::new();
    for index in 0..10 {
        let id = common::publish_direct(&gateway, &identity, json!({"poison": index == 4})).await;
        if index == 4 {
            poison = id;
        } else {
            good.insert(id);
        }
    }
    let mut client = gateway.connect(&identity, &[], &[]).await;
    let mut acked = HashSet::new();
    let mut rejections = 0;
    while acked.len() < good.len() || dead_letter_count(&env).await == baseline {
        let event = tokio::time::timeout(Duration::from_secs(5), client.next_event()).await;
        let Ok(event) = event else { continue };
        match event.expect("connection works") {
            Event::Message(message) if message.envelope.id() == poison => {
                rejections += 1;
                client
                    .reject(&poison, "cannot parse")
                    .await
                    .expect("reject");
            }
            Event::Message(message) => {
                acked.insert(message.envelope.id().to_owned());
                client.ack(message.envelope.id()).await.expect("ack");
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(acked, good, "the nine good messages are delivered");
    assert_eq!(
        rejections, 4,
        "the poison message is tried max_rejects + 1 times"
    );
    client.close().await.expect("close");

    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let dlq = format!("{}.dlq", env.prefix);
    let mut poison_reason = None;
    while let Some(message) = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")
    {
        if message
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str())
            == Some(poison.as_str())
        {
            poison_reason = message.properties.headers().as_ref().and_then(|headers| {
                headers
                    .inner()
                    .get(&lapin::types::ShortString::from("x-first-death-reason"))
                    .cloned()
            });
        }
    }
    assert_eq!(
        poison_reason,
        Some(AMQPValue::LongString("rejected".into())),
        "the poison message is in the dead-letter queue with reason rejected"
    );
}

/// A publish whose connection RabbitMQ closes before the confirm is published again with the same messageId:
/// every publish returns Ok and every messageId reaches the client.
async fn s07_lost_confirm_is_republished(mode: PublisherMode) {
    let _serial = BROKER_FAULTS.lock().await;
    let env = TestEnv::new().with_mode(mode);
    let identity = env.identity("h5");
    let name = format!("wsgw publisher {}", env.prefix);
    let publisher = env.named_publisher(&name).await;

    let closer = {
        let name = name.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let output = Command::new("rabbitmqctl")
                .args(["list_connections", "-q", "pid", "client_properties"])
                .output()
                .expect("rabbitmqctl list_connections");
            let listing = String::from_utf8_lossy(&output.stdout).into_owned();
            let pid = listing
                .lines()
                .find(|line| line.contains(&format!("\"{name}\"")))
                .and_then(|line| line.split_whitespace().next().map(str::to_owned))
                .expect("the publisher's connection is listed");
            rabbitmqctl(&["close_connection", &pid, "lost confirm test"]);
        })
    };
    let mut published = HashSet::new();
    let started = Instant::now();
    while published.len() < 300 || !closer.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "publishing did not finish"
        );
        let id = common::publish_to(&publisher, &identity, json!(published.len())).await;
        published.insert(id);
    }
    closer.join().expect("closer");

    let server = env.serve("node-a");
    let mut client = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("connect");
    let mut seen = HashSet::new();
    collect_distinct(&mut client, &mut seen, published.len()).await;
    assert_eq!(seen, published);
    client.close().await.expect("close");
}

#[tokio::test]
async fn deleted_mailbox_is_redeclared_and_session_resumes() {
    require_rabbitmq!();
    let _serial = BROKER_FAULTS.lock().await;
    let env = TestEnv::new();
    let server = env.serve("node-a");
    let identity = env.identity("h5");
    let mut client = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("connect");

    // Deleting the queue makes RabbitMQ cancel the session's consumer.
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_delete(
            env.mailbox(&identity).as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .expect("delete the mailbox");
    server
        .wait_for_log(&["mailbox consumer resumed", &identity.unique_id])
        .await;

    let publisher = env.publisher().await;
    let id = common::publish_to(&publisher, &identity, json!("after the delete")).await;
    let message = next_message(&mut client).await;
    assert_eq!(
        message.envelope.id(),
        id,
        "the same WebSocket session receives again"
    );
    client.ack(&id).await.expect("ack");
    client.close().await.expect("close");
}

macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod confirms {
            $(
                #[tokio::test]
                async fn $name() {
                    if !crate::common::rabbitmq_available() {
                        return;
                    }
                    super::$name(wsgw::config::PublisherMode::Confirms).await;
                }
            )*
        }
        mod transactions {
            $(
                #[tokio::test]
                async fn $name() {
                    if !crate::common::rabbitmq_available() {
                        return;
                    }
                    super::$name(wsgw::config::PublisherMode::Transactions).await;
                }
            )*
        }
    };
}

both_modes!(
    s02_broker_restart_restores_consumers_and_topology,
    s04_send_to_new_identity_is_kept_or_reported_unroutable,
    s05_blocked_broker_fails_sends_within_deadline,
    s06_gateway_killed_mid_stream_loses_nothing,
    s07_lost_confirm_is_republished,
    s10_mailbox_limit_and_poison_message_lose_nothing,
);

#[tokio::test]
async fn sessions_spread_over_several_connections() {
    require_rabbitmq!();
    let _serial = BROKER_FAULTS.lock().await;
    let env = TestEnv::new().with_env("WSGW_AMQP_SESSIONS_PER_CONNECTION", "3");
    let server = env.serve("spread-node");
    let publisher = env.publisher().await;
    let mut clients = Vec::new();
    let mut identities = Vec::new();
    for _ in 0..10 {
        let identity = env.identity("h5");
        clients.push(
            Client::connect(&env.connection_url(&server, &identity))
                .await
                .expect("connect"),
        );
        identities.push(identity);
    }
    for (client, identity) in clients.iter_mut().zip(&identities) {
        let id = common::publish_to(&publisher, identity, json!("spread")).await;
        let message = next_message(client).await;
        assert_eq!(message.envelope.id(), id);
        client.ack(&id).await.expect("ack");
    }
    let listing = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "client_properties"])
        .output()
        .expect("rabbitmqctl list_connections");
    let listing = String::from_utf8_lossy(&listing.stdout);
    let session_connections = listing.matches("\"wsgw spread-node sessions ").count();
    assert_eq!(session_connections, 4, "10 sessions at 3 per connection");
    for client in clients {
        client.close().await.expect("close");
    }
}
