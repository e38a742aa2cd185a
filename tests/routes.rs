//! Every message class end to end through a gateway, on RabbitMQ and on the in-process broker: client to
//! server, client to client, broadcast, uniqueId to every client type, the HTTP publish API and receipts.

mod common;

use std::time::Duration;

use serde_json::json;
use wsgw::client::Event;
use wsgw::domain::frame::ErrorCode;
use wsgw::domain::{ClientFrame, Envelope, Identity};

use common::{API_KEY, BrokerKind, TestEnv, envelope_of, next_delivery, next_event, next_message};

fn send_frame(envelope: serde_json::Value) -> String {
    let message = Envelope::from_json(&envelope.to_string()).expect("valid envelope");
    ClientFrame::Send {
        message: Box::new(message),
    }
    .to_json()
}

async fn client_to_server_stamps_identity_from_token(kind: BrokerKind) {
    let env = TestEnv::new();
    let gateway = env.gateway(kind, |_| {}).await;
    let queue = env.business_queue("payments");
    let mut business = gateway
        .broker
        .consume_inbound(&queue, "payment.*")
        .await
        .expect("bind");
    let sender = env.identity("h5");
    let mut client = gateway.connect(&sender, &[], &[]).await;

    let frame = send_frame(json!({
        "messageId": "req-1", "sendType": "CLIENT_TO_SERVER", "businessType": "payment",
        "messageType": "REFRESH_QR", "fromUniqueId": "mallory", "fromClientType": "admin",
        "timestamp": 1, "content": {"orderId": "8812", "note": "请刷新"}
    }));
    client.send_text(&frame).await.expect("send");
    match next_event(&mut client).await {
        Event::Ack { message_id } => assert_eq!(message_id, "req-1"),
        other => panic!("expected the ack after the confirm, got {other:?}"),
    }
    let delivery = next_delivery(&mut business).await;
    let received = envelope_of(&delivery);
    assert_eq!(
        received.from_unique_id.as_deref(),
        Some(sender.unique_id.as_str())
    );
    assert_eq!(received.from_client_type.as_deref(), Some("h5"));
    assert_ne!(
        received.timestamp,
        Some(1),
        "the gateway stamps the timestamp"
    );
    assert_eq!(received.content["note"], "请刷新");
    delivery.acker.ack().await.expect("ack");

    // A resend of the confirmed messageId is acked again but not published twice.
    client.send_text(&frame).await.expect("resend");
    match next_event(&mut client).await {
        Event::Ack { message_id } => assert_eq!(message_id, "req-1"),
        other => panic!("expected the ack of the resend, got {other:?}"),
    }
    let next = send_frame(json!({
        "messageId": "req-2", "sendType": "CLIENT_TO_SERVER", "businessType": "payment", "messageType": "REFRESH_QR"
    }));
    client.send_text(&next).await.expect("send");
    assert!(matches!(next_event(&mut client).await, Event::Ack { .. }));
    let delivery = next_delivery(&mut business).await;
    assert_eq!(
        envelope_of(&delivery).id(),
        "req-2",
        "the resend must not reach the business service"
    );
    delivery.acker.ack().await.expect("ack");
    client.close().await.expect("close");
}

async fn client_to_server_without_consumer_gets_error(kind: BrokerKind) {
    let env = TestEnv::new();
    let gateway = env.gateway(kind, |_| {}).await;
    let sender = env.identity("h5");
    let mut client = gateway.connect(&sender, &[], &[]).await;
    let frame = send_frame(json!({
        "messageId": "lonely-1", "sendType": "CLIENT_TO_SERVER", "businessType": "nobody", "messageType": "LISTENS"
    }));
    client.send_text(&frame).await.expect("send");
    match next_event(&mut client).await {
        Event::Error {
            code,
            message_id,
            reason,
        } => {
            assert_eq!(code, ErrorCode::Unroutable, "{reason}");
            assert_eq!(message_id.as_deref(), Some("lonely-1"));
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    client.close().await.expect("close");
}

async fn client_to_client_with_redelivery_and_policy(kind: BrokerKind) {
    let env = TestEnv::new();
    let gateway = env
        .gateway(kind, |config| {
            config
                .policy
                .client_to_client
                .insert("h5".to_owned(), vec!["app".to_owned()]);
        })
        .await;
    let sender = env.identity("h5");
    let recipient = env.identity("app");
    let mut from = gateway.connect(&sender, &[], &[]).await;
    let mut to = gateway.connect(&recipient, &[], &[]).await;

    let frame = send_frame(json!({
        "sendType": "CLIENT_TO_CLIENT", "businessType": "chat", "messageType": "HELLO",
        "toUniqueId": recipient.unique_id, "toClientType": "app", "content": {"text": "你好"}
    }));
    from.send_text(&frame).await.expect("send");
    let acked_id = match next_event(&mut from).await {
        Event::Ack { message_id } => message_id,
        other => panic!("expected an ack, got {other:?}"),
    };
    let first = next_message(&mut to).await;
    assert_eq!(first.envelope.id(), acked_id);
    assert_eq!(
        first.envelope.from_unique_id.as_deref(),
        Some(sender.unique_id.as_str())
    );
    assert_eq!(first.envelope.content["text"], "你好");
    to.close().await.expect("close without ack");

    let mut again = gateway.connect(&recipient, &[], &[]).await;
    let second = next_message(&mut again).await;
    assert_eq!(second.envelope.id(), acked_id);
    assert!(second.redelivered);
    again.ack(&acked_id).await.expect("ack");

    // The policy lets h5 message app, not app message h5.
    let reverse = send_frame(json!({
        "sendType": "CLIENT_TO_CLIENT", "businessType": "chat", "messageType": "HELLO",
        "toUniqueId": sender.unique_id, "toClientType": "h5"
    }));
    again.send_text(&reverse).await.expect("send");
    match next_event(&mut again).await {
        Event::Error { code, reason, .. } => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert!(reason.contains("client_to_client"), "{reason}");
        }
        other => panic!("expected a forbidden error, got {other:?}"),
    }
    again.close().await.expect("close");
    from.close().await.expect("close");
}

async fn broadcast_reaches_exactly_the_tagged_clients(kind: BrokerKind) {
    let env = TestEnv::new();
    let gateway = env.gateway(kind, |_| {}).await;
    let vip = env.identity("h5");
    let vip_and_more = env.identity("app");
    let other = env.identity("h5");
    let mut vip_client = gateway.connect(&vip, &["vip"], &[]).await;
    let mut both_client = gateway
        .connect(&vip_and_more, &["vip", "站点A"], &["charging"])
        .await;
    let mut other_client = gateway.connect(&other, &["basic"], &[]).await;
    // The bindings are made when the sessions open; wait until all three are registered.
    for _ in 0..200 {
        if gateway.gateway.registry.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gateway.gateway.registry.len(), 3);

    let publication = wsgw::broker::Publication::new({
        let mut envelope = Envelope::from_json(
            &json!({"sendType": "SERVER_TO_CLIENT", "businessType": "notice", "messageType": "PROMO",
                    "tags": ["vip"], "content": "限时优惠"})
            .to_string(),
        )
        .expect("valid");
        envelope.stamp_first_publish();
        envelope
    })
    .expect("routable");
    let broadcast_id = gateway
        .broker
        .publish(publication)
        .await
        .expect("published")
        .message_id;
    for client in [&mut vip_client, &mut both_client] {
        let message = next_message(client).await;
        assert_eq!(message.envelope.id(), broadcast_id);
        assert_eq!(message.envelope.content, "限时优惠");
        client
            .ack(&broadcast_id)
            .await
            .expect("ack of a broadcast is accepted");
    }

    // The untagged client got nothing: the next thing it receives is a direct message sent afterwards.
    let publisher = common::publish_direct(&gateway, &other, json!("direct after broadcast")).await;
    let message = next_message(&mut other_client).await;
    assert_eq!(
        message.envelope.id(),
        publisher,
        "the client without the tag must not get the broadcast"
    );
    other_client.ack(&publisher).await.expect("ack");
    for client in [vip_client, both_client, other_client] {
        client.close().await.expect("close");
    }
}

async fn unique_id_without_type_reaches_every_client_type(kind: BrokerKind) {
    let env = TestEnv::new();
    let gateway = env.gateway(kind, |_| {}).await;
    let h5 = env.identity("h5");
    let app = Identity::new(&h5.unique_id, "app").expect("valid");
    env.record(&app);
    let mut h5_client = gateway.connect(&h5, &[], &[]).await;
    let mut app_client = gateway.connect(&app, &[], &[]).await;

    let (status, body) = post(
        &gateway.http_url(),
        Some(API_KEY),
        json!({"sendType": "SERVER_TO_CLIENT", "businessType": "payment", "messageType": "PAID",
               "toUniqueId": h5.unique_id, "content": {"amount": 10}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let message_id = body["data"]["messageId"]
        .as_str()
        .expect("messageId")
        .to_owned();
    for client in [&mut h5_client, &mut app_client] {
        let message = next_message(client).await;
        assert_eq!(message.envelope.id(), message_id);
        client.ack(&message_id).await.expect("ack");
    }
    h5_client.close().await.expect("close");
    app_client.close().await.expect("close");
}

async fn post(
    server: &str,
    key: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    post_to(
        &format!("{server}/api/v1/messages"),
        key,
        body.to_string().into_bytes(),
    )
    .await
}

async fn post_to(url: &str, key: Option<&str>, body: Vec<u8>) -> (u16, serde_json::Value) {
    let (status, bytes) = wsgw::http_client::request(
        hyper::Method::POST,
        url,
        key,
        Some(body),
        Duration::from_secs(30),
    )
    .await
    .expect("the API answers");
    let json = serde_json::from_slice(&bytes).expect("a JSON answer");
    (status.as_u16(), json)
}

async fn http_publish_api_validates_and_delivers(kind: BrokerKind) {
    let env = TestEnv::new();
    let gateway = env.gateway(kind, |_| {}).await;
    let identity = env.identity("charger");
    let server = gateway.http_url();

    let valid = json!({"sendType": "SERVER_TO_CLIENT", "businessType": "qrcode", "messageType": "QR_REFRESH",
                       "toUniqueId": identity.unique_id, "toClientType": "charger", "content": {"qr": "码"}});
    let (status, body) = post(&server, None, valid.clone()).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["result"], 401);

    let cases = [
        (
            json!({"sendType": "SERVER_TO_CLIENT", "messageType": "X", "toUniqueId": "u"}),
            "businessType",
        ),
        (
            json!({"sendType": "SERVER_TO_CLIENT", "businessType": "a.b", "messageType": "X", "toUniqueId": "u"}),
            "businessType",
        ),
        (
            json!({"sendType": "NOWHERE", "businessType": "b", "messageType": "X"}),
            "sendType",
        ),
        (
            json!({"sendType": "SERVER_TO_CLIENT", "businessType": "b", "messageType": "X", "toUniqueId": "u v"}),
            "toUniqueId",
        ),
        (
            json!({"sendType": "SERVER_TO_CLIENT", "businessType": "b", "messageType": "X"}),
            "toUniqueId",
        ),
        (
            json!({"sendType": "SERVER_TO_CLIENT", "businessType": "b", "messageType": "X", "toUniqueId": "u", "extra": 1}),
            "extra",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = post(&server, Some(API_KEY), body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let description = answer["description"].as_str().unwrap_or_default();
        assert!(
            description.contains(field),
            "{body}: {description:?} does not name {field}"
        );
    }
    let (status, answer) = post_to(
        &format!("{server}/api/v1/messages"),
        Some(API_KEY),
        b"{not json".to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{answer}");

    let (status, body) = post(&server, Some(API_KEY), valid).await;
    assert_eq!(status, 202, "{body}");
    let message_id = body["data"]["messageId"]
        .as_str()
        .expect("messageId")
        .to_owned();
    let mut client = gateway.connect(&identity, &[], &[]).await;
    let message = next_message(&mut client).await;
    assert_eq!(message.envelope.id(), message_id);
    assert_eq!(message.envelope.content["qr"], "码");
    client.ack(&message_id).await.expect("ack");

    // wsgw send without an AMQP URL posts to the same API.
    let mut command = env.wsgw();
    command
        .env_remove("WSGW_AMQP_URL")
        .args([
            "--server",
            &server,
            "send",
            "--to",
            &identity.unique_id,
            "--to-client-type",
            "charger",
        ])
        .args([
            "--business-type",
            "qrcode",
            "--message-type",
            "QR_REFRESH",
            "--content",
            "{\"qr\":2}",
        ]);
    // The gateway runs on this test's runtime, so the blocking wait goes to another thread.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run wsgw send");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sent_id = String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    let message = next_message(&mut client).await;
    assert_eq!(message.envelope.id(), sent_id);
    client.ack(&sent_id).await.expect("ack");
    client.close().await.expect("close");
}

async fn send_wait_prints_receipt_or_times_out(kind: BrokerKind) {
    let env = TestEnv::new();
    let gateway = env.gateway(kind, |_| {}).await;
    let identity = env.identity("charger");
    let server = gateway.http_url();
    let send = |wait: &str| {
        let mut command = env.wsgw();
        command
            .env_remove("WSGW_AMQP_URL")
            .args([
                "--server",
                &server,
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
            .arg(format!("--wait={wait}"));
        command
    };

    // No listener: the deadline passes, the command says the message is still queued.
    let output = tokio::task::spawn_blocking({
        let mut command = send("1s");
        move || command.output()
    })
    .await
    .expect("join")
    .expect("run wsgw send");
    assert_eq!(
        output.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("still queued"));
    let queued_id = String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();

    let mut client = gateway.connect(&identity, &[], &[]).await;
    let message = next_message(&mut client).await;
    assert_eq!(
        message.envelope.id(),
        queued_id,
        "the message is delivered once the listener connects"
    );
    client.ack(&queued_id).await.expect("ack");

    // With a listener that acks, the receipt names the identity and node.
    let mut command = send("20s");
    let waiting = tokio::task::spawn_blocking(move || command.output());
    let message = next_message(&mut client).await;
    client.ack(message.envelope.id()).await.expect("ack");
    let output = waiting.await.expect("join").expect("run wsgw send");
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("delivered to {}/charger", identity.unique_id)),
        "{stdout}"
    );
    assert!(stdout.contains(&gateway.gateway.node), "{stdout}");
    client.close().await.expect("close");
}

both_brokers!(
    client_to_server_stamps_identity_from_token,
    client_to_server_without_consumer_gets_error,
    client_to_client_with_redelivery_and_policy,
    broadcast_reaches_exactly_the_tagged_clients,
    unique_id_without_type_reaches_every_client_type,
    http_publish_api_validates_and_delivers,
    send_wait_prints_receipt_or_times_out,
);
