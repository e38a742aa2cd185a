//! The broker contract: the same tests against the RabbitMQ adapter and the in-process broker.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use wsgw::broker::{BroadcastKey, BrokerError, Publication, Receipt};
use wsgw::domain::{Envelope, SendType};

use common::{BrokerKind, TestEnv, envelope_of, next_delivery};

fn direct(identity: &wsgw::domain::Identity, content: serde_json::Value) -> Publication {
    Publication::new(common::envelope_to(identity, content)).expect("routable")
}

fn envelope(json_text: serde_json::Value) -> Envelope {
    let mut envelope = Envelope::from_json(&json_text.to_string()).expect("valid envelope");
    envelope.stamp_first_publish();
    envelope
}

async fn mailbox_delivers_in_order_and_acks(kind: BrokerKind) {
    let env = TestEnv::new();
    let config = env.config(kind);
    let broker = env.broker(kind, &config).await;
    let identity = env.identity("h5");

    let mut ids = Vec::new();
    for index in 0..20 {
        ids.push(
            broker
                .publish(direct(&identity, json!(index)))
                .await
                .expect("published")
                .message_id,
        );
    }
    let mut subscription = broker
        .subscribe(&identity, "c1", 8)
        .await
        .expect("subscribe");
    for expected in &ids {
        let delivery = next_delivery(&mut subscription.deliveries).await;
        assert_eq!(delivery.message_id.as_deref(), Some(expected.as_str()));
        assert!(!delivery.redelivered);
        delivery.acker.ack().await.expect("ack");
    }
    subscription.release.await;

    let mut again = broker
        .subscribe(&identity, "c2", 8)
        .await
        .expect("subscribe again");
    let marker = broker
        .publish(direct(&identity, json!("marker")))
        .await
        .expect("published")
        .message_id;
    let next = next_delivery(&mut again.deliveries).await;
    assert_eq!(
        next.message_id.as_deref(),
        Some(marker.as_str()),
        "acked messages must not come again"
    );
    next.acker.ack().await.expect("ack");
    again.release.await;
}

async fn release_returns_unacked_in_order(kind: BrokerKind) {
    let env = TestEnv::new();
    let config = env.config(kind);
    let broker = env.broker(kind, &config).await;
    let identity = env.identity("h5");
    let mut ids = Vec::new();
    for index in 0..5 {
        ids.push(
            broker
                .publish(direct(&identity, json!(index)))
                .await
                .expect("published")
                .message_id,
        );
    }

    let mut first = broker
        .subscribe(&identity, "c1", 10)
        .await
        .expect("subscribe");
    let mut held = Vec::new();
    for expected in &ids {
        let delivery = next_delivery(&mut first.deliveries).await;
        assert_eq!(delivery.message_id.as_deref(), Some(expected.as_str()));
        held.push(delivery);
    }
    // Ack the second only; the others go back on release.
    held.remove(1).acker.ack().await.expect("ack");
    drop(held);
    first.release.await;

    let mut second = broker
        .subscribe(&identity, "c2", 10)
        .await
        .expect("subscribe");
    for expected in [&ids[0], &ids[2], &ids[3], &ids[4]] {
        let delivery = next_delivery(&mut second.deliveries).await;
        assert_eq!(
            delivery.message_id.as_deref(),
            Some(expected.as_str()),
            "order after release"
        );
        assert!(
            delivery.redelivered,
            "a returned message is marked redelivered"
        );
        delivery.acker.ack().await.expect("ack");
    }
    second.release.await;
}

async fn one_active_consumer_per_mailbox(kind: BrokerKind) {
    let env = TestEnv::new();
    let config = env.config(kind);
    let broker = env.broker(kind, &config).await;
    let identity = env.identity("h5");

    let mut first = broker
        .subscribe(&identity, "c1", 10)
        .await
        .expect("subscribe");
    let mut second = broker
        .subscribe(&identity, "c2", 10)
        .await
        .expect("subscribe");
    let id = broker
        .publish(direct(&identity, json!("one")))
        .await
        .expect("published")
        .message_id;
    let delivery = next_delivery(&mut first.deliveries).await;
    assert_eq!(delivery.message_id.as_deref(), Some(id.as_str()));
    let waiting = tokio::time::timeout(Duration::from_millis(300), second.deliveries.next()).await;
    assert!(
        waiting.is_err(),
        "the second consumer must wait while the first is active"
    );

    drop(delivery);
    first.release.await;
    let taken_over = next_delivery(&mut second.deliveries).await;
    assert_eq!(taken_over.message_id.as_deref(), Some(id.as_str()));
    assert!(taken_over.redelivered);
    taken_over.acker.ack().await.expect("ack");
    second.release.await;
}

async fn full_mailbox_rejects_publish(kind: BrokerKind) {
    let env = TestEnv::new();
    let mut config = env.config(kind);
    config.mailbox.max_length = 3;
    let broker = env.broker(kind, &config).await;
    let identity = env.identity("h5");
    for index in 0..3 {
        broker
            .publish(direct(&identity, json!(index)))
            .await
            .expect("within the limit");
    }
    let error = broker
        .publish(direct(&identity, json!("over")))
        .await
        .expect_err("over the limit");
    assert!(matches!(error, BrokerError::Refused { .. }), "{error}");
}

async fn unique_id_reaches_every_client_type(kind: BrokerKind) {
    let env = TestEnv::new();
    let config = env.config(kind);
    let broker = env.broker(kind, &config).await;
    let h5 = env.identity("h5");
    let app = wsgw::domain::Identity::new(&h5.unique_id, "app").expect("valid");
    env.record(&app);
    let mut h5_sub = broker.subscribe(&h5, "c1", 10).await.expect("subscribe h5");
    let mut app_sub = broker
        .subscribe(&app, "c2", 10)
        .await
        .expect("subscribe app");

    let published = broker
        .publish(
            Publication::new(envelope(json!({
                "sendType": "SERVER_TO_CLIENT", "businessType": "payment", "messageType": "PAID",
                "toUniqueId": h5.unique_id, "content": {"orderId": "8812"}
            })))
            .expect("routable"),
        )
        .await
        .expect("published");
    for subscription in [&mut h5_sub, &mut app_sub] {
        let delivery = next_delivery(&mut subscription.deliveries).await;
        assert_eq!(
            delivery.message_id.as_deref(),
            Some(published.message_id.as_str())
        );
        delivery.acker.ack().await.expect("ack");
    }
    h5_sub.release.await;
    app_sub.release.await;
}

async fn unknown_unique_id_is_unroutable_and_parked(kind: BrokerKind) {
    let env = TestEnv::new();
    let config = env.config(kind);
    let broker = env.broker(kind, &config).await;
    let error = broker
        .publish(
            Publication::new(envelope(json!({
                "sendType": "SERVER_TO_CLIENT", "businessType": "payment", "messageType": "PAID",
                "toUniqueId": "nobody-here"
            })))
            .expect("routable"),
        )
        .await
        .expect_err("no mailbox of that uniqueId exists");
    match error {
        BrokerError::Unroutable { parked, .. } => assert!(
            parked,
            "a direct message is parked in the dead-letter queue"
        ),
        other => panic!("expected unroutable, got {other}"),
    }
    if kind == BrokerKind::Rabbit {
        let (messages, _) = env.queue_counts(&format!("{}.dlq", env.prefix)).await;
        assert_eq!(
            messages, 1,
            "the unroutable message is in the dead-letter queue"
        );
    }
}

async fn inbound_routes_by_topic(kind: BrokerKind) {
    let env = TestEnv::new();
    let config = env.config(kind);
    let broker = env.broker(kind, &config).await;
    let queue = env.business_queue("payments");
    let mut business = broker
        .consume_inbound(&queue, "payment.*")
        .await
        .expect("bind business queue");

    let request = envelope(json!({
        "sendType": "CLIENT_TO_SERVER", "businessType": "payment", "messageType": "REFRESH_QR",
        "fromUniqueId": "order-1", "fromClientType": "h5", "content": {"n": 1}
    }));
    let id = broker
        .publish(Publication::new(request).expect("routable"))
        .await
        .expect("routed")
        .message_id;
    let delivery = next_delivery(&mut business).await;
    assert_eq!(envelope_of(&delivery).id(), id);
    delivery.acker.ack().await.expect("ack");

    let other = envelope(json!({
        "sendType": "CLIENT_TO_SERVER", "businessType": "charging", "messageType": "START"
    }));
    let error = broker
        .publish(Publication::new(other).expect("routable"))
        .await
        .expect_err("nobody bound");
    assert!(
        matches!(error, BrokerError::Unroutable { parked: false, .. }),
        "{error}"
    );
}

async fn broadcasts_reach_bound_keys(kind: BrokerKind) {
    let env = TestEnv::new();
    let config = env.config(kind);
    let broker = env.broker(kind, &config).await;
    let mut broadcasts = broker.broadcasts();
    broker
        .bind_broadcast(BroadcastKey::Tag("vip".to_owned()))
        .await
        .expect("bind");

    let to_vip = envelope(json!({
        "sendType": "SERVER_TO_CLIENT", "businessType": "notice", "messageType": "PROMO", "tags": ["vip"]
    }));
    let vip_id = to_vip.id().to_owned();
    broker
        .publish(Publication::new(to_vip).expect("routable"))
        .await
        .expect("published");
    let received = tokio::time::timeout(Duration::from_secs(20), broadcasts.recv())
        .await
        .expect("a broadcast within 20 s")
        .expect("open");
    assert_eq!(received.id(), vip_id);
    assert_eq!(received.send_type, SendType::ServerToClient);
}

async fn receipt_reaches_waiting_publisher(kind: BrokerKind) {
    let env = TestEnv::new();
    let config = env.config(kind);
    let broker = env.broker(kind, &config).await;
    let identity = env.identity("h5");
    let mut subscription = broker
        .subscribe(&identity, "c1", 10)
        .await
        .expect("subscribe");

    let publishing = {
        let broker = broker.clone();
        let publication = direct(&identity, json!("with receipt"));
        tokio::spawn(async move {
            broker
                .publish_and_wait(publication, Duration::from_secs(20))
                .await
        })
    };
    let delivery = next_delivery(&mut subscription.deliveries).await;
    let reply_to = delivery
        .reply_to
        .clone()
        .expect("the publisher asked for a receipt");
    delivery.acker.ack().await.expect("ack");
    let receipt = Receipt {
        message_id: delivery.message_id.clone().expect("id"),
        unique_id: identity.unique_id.clone(),
        client_type: identity.client_type.clone(),
        node: "node-test".to_owned(),
        acked_at: 1,
    };
    broker.send_receipt(reply_to, receipt.clone()).await;
    let (published, got) = publishing.await.expect("join").expect("published");
    assert_eq!(published.message_id, receipt.message_id);
    assert_eq!(got, Some(receipt));
    subscription.release.await;
}

both_brokers!(
    mailbox_delivers_in_order_and_acks,
    release_returns_unacked_in_order,
    one_active_consumer_per_mailbox,
    full_mailbox_rejects_publish,
    unique_id_reaches_every_client_type,
    unknown_unique_id_is_unroutable_and_parked,
    inbound_routes_by_topic,
    broadcasts_reach_bound_keys,
    receipt_reaches_waiting_publisher,
);

/// A mailbox declared with other arguments is a configuration mistake: the publisher says so at once instead of
/// retrying until its confirm deadline.
#[tokio::test]
async fn mailbox_with_other_arguments_is_reported_at_once() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let identity = env.identity("h5");
    let publisher = env.publisher().await;
    common::publish_to(&publisher, &identity, json!("first")).await;

    let amqp = wsgw::config::AmqpConfig {
        prefix: env.prefix.clone(),
        ..wsgw::config::AmqpConfig::default()
    };
    let other_limits = wsgw::config::MailboxConfig {
        max_length: 5,
        ..env.mailbox_config()
    };
    let other = wsgw::broker::rabbit::Publisher::connect(
        &common::amqp_url(),
        &amqp,
        &other_limits,
        "mismatched publisher",
    )
    .await
    .expect("publisher connects");
    let started = std::time::Instant::now();
    let error = other
        .publish(&direct(&identity, json!("second")))
        .await
        .expect_err("the declare must fail");
    assert!(
        matches!(error, BrokerError::MailboxMismatch { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("[mailbox]"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "reported after {:?}",
        started.elapsed()
    );
}
