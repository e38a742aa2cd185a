//! `wsgw replay-dlq` against a real RabbitMQ: listing without consuming, the replay limit, purging, and a
//! replay killed halfway.

mod common;

use std::collections::HashSet;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::json;
use wsgw::broker::{BrokerError, Publication};
use wsgw::client::Client;
use wsgw::domain::Envelope;

use common::{BrokerKind, TestEnv};

fn run(mut command: Command) -> Output {
    command.output().expect("run wsgw replay-dlq")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until the queue holds `count` ready messages.
async fn wait_for_count(env: &TestEnv, queue: &str, count: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (messages, _) = env.queue_counts(queue).await;
        if messages == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue} holds {messages} messages, expected {count}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes to every client type of a uniqueId that has no mailbox: unroutable, so parked in the dead-letter
/// queue.
async fn park_unroutable(env: &TestEnv, unique_id: &str, count: usize) -> Vec<String> {
    let broker = env
        .broker(BrokerKind::Rabbit, &env.config(BrokerKind::Rabbit))
        .await;
    let mut ids = Vec::new();
    for index in 0..count {
        let mut envelope = Envelope::from_json(
            &json!({"sendType": "SERVER_TO_CLIENT", "businessType": "payment", "messageType": "PAID",
                    "toUniqueId": unique_id, "content": {"index": index}})
            .to_string(),
        )
        .expect("valid");
        envelope.stamp_first_publish();
        ids.push(envelope.id().to_owned());
        let error = broker
            .publish(Publication::new(envelope).expect("routable"))
            .await
            .expect_err("no mailbox yet");
        assert!(
            matches!(error, BrokerError::Unroutable { parked: true, .. }),
            "{error}"
        );
    }
    ids
}

#[tokio::test]
async fn list_is_read_only_and_purge_needs_confirmation() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let ids = park_unroutable(&env, "nobody-1", 3).await;
    let dlq = format!("{}.dlq", env.prefix);

    let mut list = env.wsgw();
    list.args(["--output", "json", "replay-dlq", "list"]);
    let output = run(list);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("a JSON array");
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0]["messageId"], ids[0].as_str());
    assert_eq!(listed[0]["reason"], "unroutable");
    assert_eq!(
        listed[0]["originalExchange"],
        format!("{}.direct", env.prefix)
    );
    assert_eq!(listed[0]["originalRoutingKey"], "nobody-1");
    assert_eq!(listed[0]["replayCount"], 0);
    assert!(listed[0]["deadLetteredAt"].as_u64().is_some());
    wait_for_count(&env, &dlq, 3).await;

    let mut filtered = env.wsgw();
    filtered.args([
        "--output",
        "json",
        "replay-dlq",
        "list",
        "--id",
        &ids[1],
        "--reason",
        "unroutable",
    ]);
    let output = run(filtered);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(1));

    let mut show = env.wsgw();
    show.args(["replay-dlq", "show", &ids[2]]);
    let output = run(show);
    assert!(output.status.success());
    let shown: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(shown["message"]["content"]["index"], 2);

    let mut unconfirmed = env.wsgw();
    unconfirmed
        .args(["replay-dlq", "purge", "--id", &ids[0]])
        .stdin(std::process::Stdio::null());
    let output = run(unconfirmed);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--yes"));
    wait_for_count(&env, &dlq, 3).await;

    let mut purge = env.wsgw();
    purge.args(["replay-dlq", "purge", "--id", &ids[0], "--yes"]);
    let output = run(purge);
    assert!(output.status.success());
    assert!(stdout(&output).contains("purged 1"), "{}", stdout(&output));
    wait_for_count(&env, &dlq, 2).await;
}

#[tokio::test]
async fn replay_stops_at_max_replays() {
    require_rabbitmq!();
    let env = TestEnv::new()
        .with_env("WSGW_MAILBOX_MESSAGE_TTL", "1s")
        .with_env("WSGW_MAILBOX_EXPIRES", "10m")
        .with_env("WSGW_MAILBOX_DECLARE_INTERVAL", "10s");
    let identity = env.identity("charger");
    let dlq = format!("{}.dlq", env.prefix);

    // A message nobody consumes: it expires into the dead-letter queue after every replay.
    let mut send = env.wsgw();
    send.args([
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
    ]);
    let output = run(send);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let message_id = stdout(&output).trim().to_owned();
    wait_for_count(&env, &dlq, 1).await;

    let mut summaries = Vec::new();
    for _ in 0..5 {
        let mut replay = env.wsgw();
        replay.args(["replay-dlq", "replay", "--max-replays", "3"]);
        let output = run(replay);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        summaries.push(stdout(&output).trim().to_owned());
        wait_for_count(&env, &dlq, 1).await;
    }
    assert_eq!(
        summaries,
        [
            "replayed 1, skipped 0, failed 0",
            "replayed 1, skipped 0, failed 0",
            "replayed 1, skipped 0, failed 0",
            "replayed 0, skipped 1, failed 0",
            "replayed 0, skipped 1, failed 0",
        ]
    );

    let mut show = env.wsgw();
    show.args(["replay-dlq", "show", &message_id]);
    let output = run(show);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shown: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(shown["messageId"], message_id.as_str());
    assert_eq!(shown["replayCount"], 3);
    assert_eq!(shown["reason"], "expired");
    assert_eq!(shown["originalRoutingKey"], env.mailbox(&identity).as_str());
}

#[tokio::test]
async fn replay_killed_halfway_loses_nothing() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let identity = env.identity("app");
    let parked: HashSet<String> = park_unroutable(&env, &identity.unique_id, 1000)
        .await
        .into_iter()
        .collect();
    let dlq = format!("{}.dlq", env.prefix);
    wait_for_count(&env, &dlq, 1000).await;

    // The mailbox exists (and is bound to its uniqueId) once its client has connected.
    let broker = env
        .broker(BrokerKind::Rabbit, &env.config(BrokerKind::Rabbit))
        .await;
    let subscription = broker
        .subscribe(&identity, "setup", 1)
        .await
        .expect("subscribe");
    subscription.release.await;

    let mut replay = env.wsgw();
    replay.args(["replay-dlq", "replay"]);
    let mut child = replay
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn replay");
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let mailbox = env.mailbox(&identity);
    loop {
        let declared = channel
            .queue_declare(mailbox.as_str().into(), passive, FieldTable::default())
            .await
            .expect("mailbox exists");
        if declared.message_count() >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().expect("SIGKILL the replay");
    child.wait().expect("reap");
    let (left, _) = env.queue_counts(&dlq).await;
    assert!(
        left > 0,
        "the replay finished before it was killed, so the kill was not tested"
    );

    let mut again = env.wsgw();
    again.args(["replay-dlq", "replay"]);
    let output = run(again);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    wait_for_count(&env, &dlq, 0).await;

    let gateway = env.gateway(BrokerKind::Rabbit, |_| {}).await;
    let mut client: Client = gateway.connect(&identity, &[], &[]).await;
    let mut seen = HashSet::new();
    let mut received = 0;
    while seen.len() < parked.len() {
        let message = common::next_message(&mut client).await;
        received += 1;
        seen.insert(message.envelope.id().to_owned());
        client.ack(message.envelope.id()).await.expect("ack");
    }
    assert_eq!(seen, parked, "every dead-lettered messageId arrives");
    // A message re-published but not yet removed when the replay was killed comes twice, under the same id.
    while let Ok(event) = tokio::time::timeout(Duration::from_secs(1), client.next_event()).await {
        match event.expect("connection works") {
            wsgw::client::Event::Message(message) => {
                received += 1;
                assert!(
                    seen.contains(message.envelope.id()),
                    "an unknown message {}",
                    message.envelope.id()
                );
                client.ack(message.envelope.id()).await.expect("ack");
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(received >= parked.len());
    client.close().await.expect("close");
    assert_eq!(env.settled_message_count(&mailbox).await, 0);
}
