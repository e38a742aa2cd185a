//! Direct push end to end: `wsgw send` or the library publisher, a real RabbitMQ, `wsgw serve`, and clients.

mod common;

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use serde_json::json;
use wsgw::client::{Client, ClientError, Event, IncomingMessage};
use wsgw::domain::frame::close_code;
use wsgw::domain::{TokenClaims, TokenSigner};

use common::{API_KEY, SECRET, TestEnv};

async fn next_message(client: &mut Client) -> IncomingMessage {
    let event = tokio::time::timeout(Duration::from_secs(20), client.next_event())
        .await
        .expect("a message within 20 s")
        .expect("connection works");
    match event {
        Event::Message(message) => *message,
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn next_close_code(client: &mut Client) -> Option<u16> {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), client.next_event())
            .await
            .expect("an event within 20 s");
        match event {
            Ok(Event::Closed { code, .. }) => return code,
            Ok(_) => continue,
            Err(error) => panic!("expected a close frame, got {error}"),
        }
    }
}

#[tokio::test]
async fn send_then_listen_keeps_every_field() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let server = env.serve("node-a");
    let recipient = env.identity("charger");

    let listen = env
        .wsgw()
        .args([
            "--server",
            &server.http_url(),
            "listen",
            "--unique-id",
            &recipient.unique_id,
        ])
        .args([
            "--client-type",
            &recipient.client_type,
            "--count",
            "1",
            "--output",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wsgw listen");
    server
        .wait_for_log(&["session opened", &recipient.unique_id])
        .await;

    let content =
        json!({"text": "二维码已刷新，请扫码支付", "amount": 12.5, "nested": {"emoji": "⚡"}});
    let sent = env
        .wsgw()
        .args([
            "send",
            "--to",
            &recipient.unique_id,
            "--to-client-type",
            &recipient.client_type,
        ])
        .args(["--business-type", "qrcode", "--message-type", "QR_REFRESH"])
        .args(["--content", &content.to_string()])
        .args([
            "--from-unique-id",
            "cashier-7",
            "--from-client-type",
            "backend",
        ])
        .args(["--tags", "站点A,vip", "--businesses", "charging"])
        .output()
        .expect("run wsgw send");
    assert!(
        sent.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let message_id = String::from_utf8(sent.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    assert!(!message_id.is_empty(), "send printed no messageId");

    let output = tokio::task::spawn_blocking(move || listen.wait_with_output())
        .await
        .expect("join")
        .expect("listen exits");
    assert!(
        output.status.success(),
        "listen failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    let message = &line["message"];
    assert_eq!(message["messageId"], message_id.as_str());
    assert_eq!(message["sendType"], "SERVER_TO_CLIENT");
    assert_eq!(message["businessType"], "qrcode");
    assert_eq!(message["messageType"], "QR_REFRESH");
    assert_eq!(message["toUniqueId"], recipient.unique_id.as_str());
    assert_eq!(message["toClientType"], recipient.client_type.as_str());
    assert_eq!(message["fromUniqueId"], "cashier-7");
    assert_eq!(message["fromClientType"], "backend");
    assert_eq!(message["content"], content);
    assert_eq!(message["tags"], json!(["站点A", "vip"]));
    assert_eq!(message["businesses"], json!(["charging"]));
    assert!(
        message["timestamp"]
            .as_u64()
            .is_some_and(|ms| ms > 1_700_000_000_000)
    );
    assert_eq!(line["redelivered"], false);
}

#[tokio::test]
async fn unacked_message_is_redelivered_until_acked() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let server = env.serve("node-a");
    let identity = env.identity("h5");
    let publisher = env.publisher().await;

    let mut first = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("connect");
    let message_id = common::publish_to(&publisher, &identity, json!({"order": "8812"})).await;
    let received = next_message(&mut first).await;
    assert_eq!(received.envelope.id(), message_id);
    assert!(!received.redelivered);
    first.close().await.expect("close without ack");

    let mut second = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("reconnect");
    let again = next_message(&mut second).await;
    assert_eq!(
        again.envelope.id(),
        message_id,
        "the same message comes again"
    );
    assert!(again.redelivered, "the repeat carries the redelivered mark");
    assert_eq!(
        again.envelope.timestamp, received.envelope.timestamp,
        "the order key is unchanged"
    );
    second.ack(&message_id).await.expect("ack");
    second.close().await.expect("close");

    assert_eq!(
        env.settled_message_count(&env.mailbox(&identity)).await,
        0,
        "the mailbox is empty after the ack"
    );
}

#[tokio::test]
async fn thousand_messages_arrive_in_publish_order() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let server = env.serve("node-a");
    let identity = env.identity("h5");
    let publisher = env.publisher().await;

    let mut published = Vec::with_capacity(1000);
    for sequence in 0..1000 {
        published
            .push(common::publish_to(&publisher, &identity, json!({"sequence": sequence})).await);
    }

    let mut client = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("connect");
    let mut previous_key: Option<(u64, String)> = None;
    for (index, expected_id) in published.iter().enumerate() {
        let message = next_message(&mut client).await;
        assert_eq!(
            message.envelope.id(),
            expected_id,
            "message {index} out of order"
        );
        assert_eq!(message.envelope.content["sequence"], index);
        let key = (
            message.envelope.timestamp.expect("timestamp"),
            message.envelope.id().to_owned(),
        );
        if let Some(previous) = &previous_key {
            assert!(
                key > *previous,
                "order key of message {index} does not increase: {key:?} after {previous:?}"
            );
        }
        previous_key = Some(key);
        client.ack(message.envelope.id()).await.expect("ack");
    }
    client.close().await.expect("close");
    assert_eq!(env.settled_message_count(&env.mailbox(&identity)).await, 0);
}

#[tokio::test]
async fn second_connection_replaces_first() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let server = env.serve("node-a");
    let identity = env.identity("h5");
    let publisher = env.publisher().await;

    let mut first = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("connect A");
    let mut second = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("connect B");
    assert_eq!(
        next_close_code(&mut first).await,
        Some(close_code::REPLACED)
    );

    let message_id = common::publish_to(&publisher, &identity, json!("after replacement")).await;
    let received = next_message(&mut second).await;
    assert_eq!(received.envelope.id(), message_id);
    second.ack(&message_id).await.expect("ack");
    second.close().await.expect("close");
}

#[tokio::test]
async fn replacement_works_across_nodes() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let node_a = env.serve("node-a");
    let node_b = env.serve("node-b");
    let identity = env.identity("h5");
    let publisher = env.publisher().await;

    let mut first = Client::connect(&env.connection_url(&node_a, &identity))
        .await
        .expect("connect on A");
    assert_eq!(first.welcome.node, "node-a");
    let mut second = Client::connect(&env.connection_url(&node_b, &identity))
        .await
        .expect("connect on B");
    assert_eq!(second.welcome.node, "node-b");
    assert_eq!(
        next_close_code(&mut first).await,
        Some(close_code::REPLACED)
    );

    let message_id = common::publish_to(&publisher, &identity, json!("after takeover")).await;
    let received = next_message(&mut second).await;
    assert_eq!(received.envelope.id(), message_id);
    second.ack(&message_id).await.expect("ack");
    second.close().await.expect("close");
}

#[tokio::test]
async fn offline_messages_arrive_on_connect() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let server = env.serve("node-a");
    let identity = env.identity("charger");

    let mut sent_ids = Vec::new();
    for index in 0..3 {
        let output = env
            .wsgw()
            .args([
                "send",
                "--to",
                &identity.unique_id,
                "--to-client-type",
                &identity.client_type,
            ])
            .args([
                "--business-type",
                "charging",
                "--message-type",
                "PORT_STATUS",
            ])
            .args(["--content", &json!({"port": index}).to_string()])
            .output()
            .expect("run wsgw send");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        sent_ids.push(
            String::from_utf8(output.stdout)
                .expect("utf-8")
                .trim()
                .to_owned(),
        );
    }

    let mut client = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("connect");
    for expected in &sent_ids {
        let message = next_message(&mut client).await;
        assert_eq!(message.envelope.id(), expected);
        client.ack(expected).await.expect("ack");
    }
    client.close().await.expect("close");
}

#[tokio::test]
async fn unresponsive_client_is_disconnected_and_its_message_kept() {
    require_rabbitmq!();
    let env = TestEnv::new()
        .with_env("WSGW_SESSION_PING_INTERVAL", "300ms")
        .with_env("WSGW_SESSION_PONG_TIMEOUT", "500ms");
    let server = env.serve("node-a");
    let identity = env.identity("h5");
    let publisher = env.publisher().await;

    // A client that never reads after the welcome frame, so it never answers a ping.
    let silent = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("connect");
    let message_id = common::publish_to(&publisher, &identity, json!("kept")).await;
    server
        .wait_for_log(&["session closed", &identity.unique_id, "no pong"])
        .await;
    drop(silent);

    let mut client = Client::connect(&env.connection_url(&server, &identity))
        .await
        .expect("reconnect");
    let message = next_message(&mut client).await;
    assert_eq!(message.envelope.id(), message_id);
    client.ack(&message_id).await.expect("ack");
    client.close().await.expect("close");
}

fn expect_rejected(result: Result<Client, ClientError>, status: u16, words: &str) {
    match result {
        Err(ClientError::Rejected {
            status: got,
            description,
        }) => {
            assert_eq!(got, status, "{description}");
            assert!(
                description.contains(words),
                "description {description:?} lacks {words:?}"
            );
        }
        Err(other) => panic!("expected HTTP {status}, got {other}"),
        Ok(_) => panic!("expected HTTP {status}, but the connection was accepted"),
    }
}

#[tokio::test]
async fn bad_tokens_are_rejected_with_401() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let server = env.serve("node-a");
    let identity = env.identity("h5");
    let signer = TokenSigner::new(SECRET.as_bytes()).expect("secret");

    let expired = signer.sign(&TokenClaims {
        unique_id: identity.unique_id.clone(),
        client_type: identity.client_type.clone(),
        tags: Vec::new(),
        businesses: Vec::new(),
        // Past the default clock skew tolerance of 5 s.
        expires_at_ms: wsgw::domain::envelope::unix_millis(SystemTime::now()) - 60_000,
        nonce: "expired-nonce".to_owned(),
    });
    let url = format!("ws://{}/socket/{expired}", server.address);
    expect_rejected(Client::connect(&url).await, 401, "expired");

    let valid = env.connection_url(&server, &identity);
    let tampered = valid.replacen("/socket/v1.e", "/socket/v1.f", 1);
    expect_rejected(Client::connect(&tampered).await, 401, "token");

    let other_secret = TokenSigner::new(&[9u8; 32]).expect("secret");
    let forged = other_secret.mint(
        &identity,
        &[],
        &[],
        Duration::from_secs(60),
        SystemTime::now(),
    );
    let url = format!("ws://{}/socket/{forged}", server.address);
    expect_rejected(Client::connect(&url).await, 401, "signature");

    let client = Client::connect(&valid).await.expect("first use works");
    client.close().await.expect("close");
    expect_rejected(Client::connect(&valid).await, 401, "already used");

    let logs = server.all_logs();
    let token = valid.rsplit('/').next().expect("token");
    assert!(!logs.contains(token), "a token appeared in the logs");
    assert!(!logs.contains(&expired), "a token appeared in the logs");
}

#[tokio::test]
async fn token_endpoint_checks_api_key() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let server = env.serve("node-a");
    let identity = env.identity("h5");

    let url = format!(
        "{}/websocket/token?uniqueId={}&clientType={}",
        server.http_url(),
        identity.unique_id,
        identity.client_type
    );
    for key in [None, Some("wrong-key")] {
        let (status, body) =
            wsgw::http_client::request(hyper::Method::GET, &url, key, None, Duration::from_secs(5))
                .await
                .expect("token endpoint answers");
        assert_eq!(status.as_u16(), 401);
        let answer: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(answer["result"], 401);
        assert!(
            answer["description"]
                .as_str()
                .is_some_and(|text| text.contains("API key"))
        );
    }

    let (status, body) = wsgw::http_client::request(
        hyper::Method::GET,
        &url,
        Some(API_KEY),
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("token endpoint answers");
    assert_eq!(status.as_u16(), 200);
    let answer: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(answer["result"], 0);
    assert_eq!(answer["description"], "ok");
    let connection_url = answer["data"].as_str().expect("URL in data");
    assert!(connection_url.starts_with(&format!("ws://{}/socket/v1.", server.address)));
    let client = Client::connect(connection_url)
        .await
        .expect("token from the endpoint connects");
    assert_eq!(client.welcome.identity, identity);
    client.close().await.expect("close");

    let bad_identity = format!(
        "{}/websocket/token?uniqueId=a%20b&clientType=h5",
        server.http_url()
    );
    let (status, body) = wsgw::http_client::request(
        hyper::Method::GET,
        &bad_identity,
        Some(API_KEY),
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("token endpoint answers");
    assert_eq!(status.as_u16(), 400);
    assert!(String::from_utf8_lossy(&body).contains("uniqueId"));

    let output = env
        .wsgw()
        .args([
            "--server",
            &server.http_url(),
            "--api-key",
            "wrong-key",
            "token",
        ])
        .args(["--unique-id", &identity.unique_id, "--client-type", "h5"])
        .output()
        .expect("run wsgw token");
    assert_eq!(output.status.code(), Some(77));
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid API key"));
}

#[test]
fn send_rejects_invalid_envelopes_naming_the_field() {
    let env = TestEnv::new();
    let base = [
        "send",
        "--to-client-type",
        "h5",
        "--message-type",
        "QR_REFRESH",
    ];
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "--to",
                "u1",
                "--business-type",
                "pay.ment",
                "--content",
                "{}",
            ],
            "businessType",
        ),
        (
            &[
                "--to",
                "u 1",
                "--business-type",
                "payment",
                "--content",
                "{}",
            ],
            "toUniqueId",
        ),
        (
            &[
                "--to",
                "u1",
                "--business-type",
                "payment",
                "--content",
                "{oops",
            ],
            "content",
        ),
        (
            &[
                "--to",
                "u1",
                "--business-type",
                "payment",
                "--content",
                "{}",
                "--tags",
                "a.b",
            ],
            "tags",
        ),
        (
            &[
                "--to",
                "u1",
                "--business-type",
                "payment",
                "--content",
                "{}",
                "--message-id",
                "",
            ],
            "messageId",
        ),
    ];
    for (args, field) in cases {
        let output = env
            .wsgw()
            .args(base)
            .args(args)
            .output()
            .expect("run wsgw send");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(65), "{args:?}: {stderr}");
        assert!(
            stderr.contains(field),
            "{args:?}: error {stderr:?} does not name {field}"
        );
    }
}
