//! The reliable Rust client against the real gateway on RabbitMQ: reconnects across a gateway restart, stops
//! when replaced, confirms sends across reconnects, drops duplicates and skips stale replaceable messages.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::sync::mpsc;
use wsgw::client::{
    Client, ClientEvent, ClientOptions, IncomingMessage, ReliableClient, UrlSource,
};
use wsgw::domain::{Envelope, Identity, TokenSigner};

use common::{SECRET, Server, TestEnv};

/// Starts `wsgw serve` on a fixed address, so a restart comes back where clients look for it.
fn serve_on(env: &TestEnv, address: SocketAddr, node: &str) -> Server {
    Server::spawn(env.serve_command(node, &address.to_string()))
}

fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// Mints a fresh token for every connect, as a business backend would.
fn urls(address: SocketAddr, identity: &Identity) -> UrlSource {
    let identity = identity.clone();
    Arc::new(move || {
        let signer = TokenSigner::new(SECRET.as_bytes()).expect("secret");
        let token = signer.mint(
            &identity,
            &[],
            &[],
            Duration::from_secs(60),
            SystemTime::now(),
        );
        Box::pin(async move { Ok(format!("ws://{address}/socket/{token}")) })
    })
}

fn fast_options() -> ClientOptions {
    ClientOptions {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        ..ClientOptions::default()
    }
}

async fn next_client_event(events: &mut mpsc::Receiver<ClientEvent>) -> ClientEvent {
    tokio::time::timeout(Duration::from_secs(30), events.recv())
        .await
        .expect("an event within 30 s")
        .expect("the client is running")
}

/// Waits for the next message, skipping connection events.
async fn next_client_message(events: &mut mpsc::Receiver<ClientEvent>) -> IncomingMessage {
    loop {
        match next_client_event(events).await {
            ClientEvent::Message(message) => return *message,
            ClientEvent::Open(_)
            | ClientEvent::Closed { .. }
            | ClientEvent::Reconnecting { .. } => {}
            // An ack of a message pushed on the lost connection, sent before its redelivery arrived.
            ClientEvent::Error {
                code: wsgw::domain::frame::ErrorCode::UnknownMessageId,
                ..
            } => {}
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_across_a_gateway_restart_and_loses_nothing() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let address = free_address();
    let mut server = serve_on(&env, address, "restart-1");
    let identity = env.identity("h5");
    let (client, mut events) = ReliableClient::start(urls(address, &identity), fast_options());
    assert!(matches!(
        next_client_event(&mut events).await,
        ClientEvent::Open(_)
    ));
    let publisher = env.publisher().await;
    for seq in 0..10 {
        common::publish_to(&publisher, &identity, json!({"seq": seq})).await;
    }
    // Receive a few, then lose the gateway with messages pushed and not yet acked.
    for expected in 0..3 {
        let message = next_client_message(&mut events).await;
        assert_eq!(message.envelope.content["seq"], json!(expected));
        client.ack(message.envelope.id()).await;
    }
    server.kill();
    for seq in 10..20 {
        common::publish_to(&publisher, &identity, json!({"seq": seq})).await;
    }
    let _server = serve_on(&env, address, "restart-2");

    let mut seen = Vec::new();
    while seen.len() < 17 {
        let message = next_client_message(&mut events).await;
        let seq = message.envelope.content["seq"].as_u64().expect("seq");
        client.ack(message.envelope.id()).await;
        seen.push(seq);
    }
    assert_eq!(seen, (3..20).collect::<Vec<u64>>(), "each once, in order");
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_when_replaced_and_confirms_sends() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let server = env.serve("replace");
    let identity = env.identity("h5");
    let (client, mut events) =
        ReliableClient::start(urls(server.address, &identity), fast_options());
    assert!(matches!(
        next_client_event(&mut events).await,
        ClientEvent::Open(_)
    ));

    let queue = env.business_queue("charging");
    let config = env.config(common::BrokerKind::Rabbit);
    let broker = env.broker(common::BrokerKind::Rabbit, &config).await;
    let mut business = broker
        .consume_inbound(&queue, "charging.*")
        .await
        .expect("bind a business queue");
    let envelope = Envelope::from_json(
        &json!({"sendType": "CLIENT_TO_SERVER", "businessType": "charging",
                "messageType": "START", "content": "开始充电"})
        .to_string(),
    )
    .expect("envelope");
    let message_id = client.send(envelope).await.expect("confirmed");
    let delivery = common::next_delivery(&mut business).await;
    let published = common::envelope_of(&delivery);
    assert_eq!(published.id(), message_id);
    assert_eq!(
        published.from_unique_id.as_deref(),
        Some(identity.unique_id.as_str())
    );
    delivery.acker.ack().await.expect("ack");

    // A newer connection of the same identity: the reliable client stops instead of fighting it.
    let newer = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("newer connection");
    loop {
        match next_client_event(&mut events).await {
            ClientEvent::Replaced { .. } => break,
            ClientEvent::Closed { code, .. } => assert_eq!(code, Some(4001)),
            other => panic!("expected the replaced close, got {other:?}"),
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("the stream ends")
            .is_none(),
        "no reconnect after a replace"
    );
    newer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_duplicates_and_skips_stale_replaceable_messages() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let server = env.serve("dedupe");
    let identity = env.identity("charger");
    let options = ClientOptions {
        replaceable: HashSet::from(["QR_REFRESH".to_owned()]),
        ..fast_options()
    };
    let (client, mut events) = ReliableClient::start(urls(server.address, &identity), options);
    let publisher = env.publisher().await;

    // The same messageId twice: a backend retrying a publish it thought had failed.
    let mut duplicate = common::envelope_to(&identity, json!("paid"));
    duplicate.message_type = "PAYMENT_RESULT".to_owned();
    let publication = wsgw::broker::Publication::new(duplicate.clone()).expect("routable");
    publisher.publish(&publication).await.expect("published");
    let first = next_client_message(&mut events).await;
    assert_eq!(first.envelope.id(), duplicate.id());
    client.ack(first.envelope.id()).await;
    publisher
        .publish(&publication)
        .await
        .expect("published again");

    // A newer QR code, then an older one that arrives late.
    let older = common::envelope_to(&identity, json!("qr-1"));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let newer = common::envelope_to(&identity, json!("qr-2"));
    for envelope in [&newer, &older] {
        let publication = wsgw::broker::Publication::new(envelope.clone()).expect("routable");
        publisher.publish(&publication).await.expect("published");
    }
    let shown = next_client_message(&mut events).await;
    assert_eq!(
        shown.envelope.content,
        json!("qr-2"),
        "the duplicate was dropped"
    );
    client.ack(shown.envelope.id()).await;
    match next_client_event(&mut events).await {
        ClientEvent::Stale(message) => assert_eq!(message.envelope.content, json!("qr-1")),
        other => panic!("expected the older QR code as stale, got {other:?}"),
    }
    client.stop().await;
    let mailbox = env.mailbox(&identity);
    assert_eq!(
        env.settled_message_count(&mailbox).await,
        0,
        "duplicates and stale messages are acked"
    );
}
