//! Soak: 2,000 direct messages to 20 clients while, in turn, RabbitMQ closes the gateway's connections, the
//! gateway is killed with SIGKILL and restarted, and 5 clients drop without a close handshake and reconnect.
//! Every messageId arrives at least once, every repeat carries the redelivered mark, per identity the order
//! holds, and the dead-letter queue stays empty.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tokio::sync::Notify;
use wsgw::client::{Client, Event};
use wsgw::domain::{Identity, TokenSigner};

use common::{SECRET, TestEnv};

const CLIENTS: usize = 20;
const MESSAGES: usize = 2000;

/// One received message: its messageId and whether it was marked redelivered.
type Received = (String, bool);

/// Receives and acks until `expected` distinct messages arrived, reconnecting to the current gateway address
/// whenever the connection ends, and dropping the connection without a close handshake when told to.
async fn run_client(
    identity: Identity,
    address: Arc<Mutex<SocketAddr>>,
    expected: usize,
    drop_now: Arc<Notify>,
) -> Vec<Received> {
    let signer = TokenSigner::new(SECRET.as_bytes()).expect("secret");
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut log = Vec::new();
    let mut seen = HashSet::new();
    'connect: while seen.len() < expected {
        assert!(
            Instant::now() < deadline,
            "{identity}: {} of {expected} after the deadline",
            seen.len()
        );
        let current = *address.lock().expect("lock");
        let token = signer.mint(
            &identity,
            &[],
            &[],
            Duration::from_secs(60),
            SystemTime::now(),
        );
        let Ok(mut client) = Client::connect(&format!("ws://{current}/socket/{token}")).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            tokio::select! {
                _ = drop_now.notified() => {
                    drop(client);
                    continue 'connect;
                }
                event = client.next_event() => match event {
                    Ok(Event::Message(message)) => {
                        let id = message.envelope.id().to_owned();
                        log.push((id.clone(), message.redelivered));
                        seen.insert(id.clone());
                        if client.ack(&id).await.is_err() {
                            continue 'connect;
                        }
                        if seen.len() == expected {
                            let _ = client.close().await;
                            break 'connect;
                        }
                    }
                    Ok(Event::Closed { .. }) | Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue 'connect;
                    }
                    Ok(_) => {}
                }
            }
        }
    }
    log
}

/// Closes every RabbitMQ connection of the gateway node `node`.
fn close_gateway_connections(node: &str) -> usize {
    let output = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl list_connections");
    let listing = String::from_utf8_lossy(&output.stdout);
    let marker = format!("\"wsgw {node} ");
    let pids: Vec<String> = listing
        .lines()
        .filter(|line| line.contains(&marker))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect();
    for pid in &pids {
        let status = Command::new("rabbitmqctl")
            .args(["close_connection", pid, "soak test"])
            .status()
            .expect("rabbitmqctl close_connection");
        assert!(status.success());
    }
    pids.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_connection_closes_kill_and_client_drops() {
    require_rabbitmq!();
    let env = TestEnv::new().with_env("WSGW_AMQP_RECONNECT_MAX_BACKOFF", "2s");
    let mut server = env.serve("soak-node");
    let address = Arc::new(Mutex::new(server.address));
    let identities: Vec<Identity> = (0..CLIENTS).map(|_| env.identity("h5")).collect();
    let drops: Vec<Arc<Notify>> = (0..CLIENTS).map(|_| Arc::new(Notify::new())).collect();
    let per_client = MESSAGES / CLIENTS;

    let mut clients = Vec::new();
    for (identity, drop_now) in identities.iter().zip(&drops) {
        clients.push(tokio::spawn(run_client(
            identity.clone(),
            address.clone(),
            per_client,
            drop_now.clone(),
        )));
    }

    let publisher = env.publisher().await;
    let mut published: HashMap<String, (usize, usize)> = HashMap::new();
    let mut sequence = [0usize; CLIENTS];
    for phase in 0..4 {
        for index in 0..MESSAGES / 4 {
            let client = index % CLIENTS;
            let id = common::publish_to(
                &publisher,
                &identities[client],
                json!({"sequence": sequence[client]}),
            )
            .await;
            published.insert(id, (client, sequence[client]));
            sequence[client] += 1;
        }
        match phase {
            0 => {
                let closed = tokio::task::spawn_blocking(|| close_gateway_connections("soak-node"))
                    .await
                    .expect("join");
                assert_eq!(
                    closed, 3,
                    "the gateway's publisher, consumer and session connections"
                );
            }
            1 => {
                server.kill();
                server = env.serve("soak-node");
                *address.lock().expect("lock") = server.address;
            }
            2 => {
                for drop_now in drops.iter().take(5) {
                    drop_now.notify_one();
                }
            }
            _ => {}
        }
    }

    let mut logs = Vec::new();
    for client in clients {
        logs.push(client.await.expect("client task"));
    }
    for (client, log) in logs.iter().enumerate() {
        let mut seen = HashSet::new();
        let mut last_sequence = None;
        for (id, redelivered) in log {
            let (owner, sequence) = published
                .get(id)
                .unwrap_or_else(|| panic!("client {client} got unknown message {id}"));
            assert_eq!(*owner, client, "message {id} reached the wrong identity");
            if seen.insert(id.clone()) {
                assert!(
                    last_sequence.is_none_or(|last| *sequence > last),
                    "client {client}: message {sequence} arrived after {last_sequence:?}"
                );
                last_sequence = Some(*sequence);
            } else {
                assert!(
                    *redelivered,
                    "client {client}: repeat of {id} without the redelivered mark"
                );
            }
        }
        assert_eq!(seen.len(), per_client, "client {client} got every message");
    }
    let (dead_letters, _) = env.queue_counts(&format!("{}.dlq", env.prefix)).await;
    assert_eq!(dead_letters, 0, "the dead-letter queue is empty");
}
