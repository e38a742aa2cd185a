//! Security and bad input: origins and CORS, the handshake timeout, session caps behind proxies, token hygiene
//! (single use across nodes, expiry, rotation on SIGHUP, nothing in logs), frame limits and the rate limit.

mod common;

use std::time::{Duration, Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use wsgw::client::{Client, Event};
use wsgw::domain::frame::{ErrorCode, close_code};
use wsgw::domain::{ClientFrame, Envelope, TokenSigner};

use common::{API_KEY, BrokerKind, SECRET, TestEnv, next_event, next_message};

type RawSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket with extra request headers and returns the socket, or the HTTP status of the refusal.
async fn raw_connect(url: &str, headers: &[(&str, &str)]) -> Result<RawSocket, u16> {
    let mut request = url.into_client_request().expect("valid URL");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "wsgw.v1".parse().expect("header value"),
    );
    for (name, value) in headers {
        request.headers_mut().append(
            hyper::header::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            value.parse().expect("header value"),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(error) => panic!("unexpected connect error: {error}"),
    }
}

/// Reads frames until the gateway closes; returns the close code.
async fn close_code_of(socket: &mut RawSocket) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|frame| frame.code.into()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return None,
            Err(_) => panic!("the gateway did not close the session within 10 s"),
        }
    }
}

/// Reads frames until a JSON frame of type `error` arrives; returns its code.
async fn error_code_of(socket: &mut RawSocket) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).expect("JSON frame");
                if frame["type"] == "error" {
                    return frame["code"].as_str().expect("code").to_owned();
                }
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected an error frame, got {other:?}"),
        }
    }
}

fn token_of(url: &str) -> &str {
    url.rsplit_once("/socket/").expect("a connection URL").1
}

#[tokio::test]
async fn foreign_origin_is_refused_and_cors_follows_the_allow_list() {
    let env = TestEnv::new();
    let gateway = env
        .gateway(BrokerKind::Memory, |config| {
            config.server.allowed_origins = vec!["https://pay.example.com".to_owned()];
        })
        .await;
    let identity = env.identity("h5");
    let url = gateway.url(&identity, &[], &[]);

    assert_eq!(
        raw_connect(&url, &[("Origin", "https://evil.example")])
            .await
            .err(),
        Some(403)
    );
    // The refused attempt did not spend the token: the allowed origin connects with it.
    let socket = raw_connect(&url, &[("Origin", "https://pay.example.com")]).await;
    assert!(socket.is_ok(), "allowed origin: {:?}", socket.err());

    let http = reqwest_like(&gateway.http_url());
    let query = format!(
        "/websocket/token?uniqueId={}&clientType=h5",
        identity.unique_id
    );
    let (status, headers, _) = http
        .get(&query, &[("Origin", "https://evil.example")])
        .await;
    assert_eq!(status, 403);
    assert!(!headers.contains_key("access-control-allow-origin"));
    let (status, headers, _) = http
        .get(&query, &[("Origin", "https://pay.example.com")])
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        headers
            .get("access-control-allow-origin")
            .map(|value| value.to_str().expect("text")),
        Some("https://pay.example.com")
    );
    let (status, headers, _) = http
        .request(
            "OPTIONS",
            "/websocket/token",
            &[
                ("Origin", "https://pay.example.com"),
                ("Access-Control-Request-Headers", "authorization"),
            ],
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        headers
            .get("access-control-allow-headers")
            .map(|value| value.to_str().expect("text")),
        Some("Authorization")
    );
    let (status, headers, _) = http
        .request(
            "OPTIONS",
            "/websocket/token",
            &[("Origin", "https://evil.example")],
        )
        .await;
    assert_eq!(status, 403);
    assert!(!headers.contains_key("access-control-allow-origin"));
}

/// A tiny HTTP/1.1 client over hyper for requests with arbitrary headers.
struct Http {
    base: String,
    api_key: String,
}

fn reqwest_like(base: &str) -> Http {
    Http {
        base: base.to_owned(),
        api_key: API_KEY.to_owned(),
    }
}

impl Http {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, hyper::HeaderMap, String) {
        self.request("GET", path, headers).await
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, hyper::HeaderMap, String) {
        use http_body_util::BodyExt;
        let authority = self.base.trim_start_matches("http://").to_owned();
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("Host", authority)
            .header("Authorization", format!("Bearer {}", self.api_key));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }
}

#[tokio::test]
async fn silent_connection_is_closed_after_the_handshake_timeout() {
    let env = TestEnv::new();
    let gateway = env
        .gateway(BrokerKind::Memory, |config| {
            config.server.handshake_timeout = Duration::from_secs(1);
        })
        .await;
    for partial in [&b""[..], b"GET /socket/abc HTTP/1.1\r\nHost: x\r\n"] {
        let mut stream = tokio::net::TcpStream::connect(gateway.address)
            .await
            .expect("connect");
        stream.write_all(partial).await.expect("write");
        let started = Instant::now();
        let mut buffer = [0u8; 1024];
        // The gateway responds with 408 or just closes; either way the read ends well before 5 s.
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(read.is_ok(), "a silent connection stayed open for 5 s");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "closed after {:?}, before the timeout",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn sessions_are_capped_per_address_behind_a_trusted_proxy_and_in_total() {
    let env = TestEnv::new();
    let gateway = env
        .gateway(BrokerKind::Memory, |config| {
            config.server.max_sessions = 4;
            config.server.max_sessions_per_address = 2;
            config.server.trusted_proxies = vec!["127.0.0.1".to_owned()];
        })
        .await;
    let connect = |address: &'static str| {
        let url = gateway.url(&env.identity("h5"), &[], &[]);
        async move { raw_connect(&url, &[("X-Forwarded-For", address)]).await }
    };
    let first = connect("203.0.113.1").await.expect("first from A");
    let _second = connect("203.0.113.1").await.expect("second from A");
    assert_eq!(connect("203.0.113.1").await.err(), Some(429));
    // A client cannot pick its own address: the proxy appends the real one, which counts.
    assert_eq!(connect("198.51.100.7, 203.0.113.1").await.err(), Some(429));
    let _third = connect("203.0.113.2").await.expect("first from B");
    let _fourth = connect("203.0.113.3").await.expect("first from C");
    assert_eq!(connect("203.0.113.4").await.err(), Some(503));
    // Closing a session frees its place.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match connect("203.0.113.1").await {
            Ok(_) => break,
            Err(status) => {
                assert!(
                    Instant::now() < deadline,
                    "no place freed after a close: {status}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let env = TestEnv::new();
    let gateway = env
        .gateway(BrokerKind::Memory, |config| {
            config.server.max_sessions_per_address = 1;
        })
        .await;
    let url = gateway.url(&env.identity("h5"), &[], &[]);
    let _first = raw_connect(&url, &[("X-Forwarded-For", "203.0.113.1")])
        .await
        .expect("first");
    let url = gateway.url(&env.identity("h5"), &[], &[]);
    assert_eq!(
        raw_connect(&url, &[("X-Forwarded-For", "203.0.113.2")])
            .await
            .err(),
        Some(429),
        "the header must not let a client look like another address"
    );
}

/// Every kind of bad frame gets an error frame or a close with the right code, and the session of another
/// client goes on receiving.
#[tokio::test]
async fn bad_frames_get_error_frames_or_the_right_close_code() {
    let env = TestEnv::new();
    let gateway = env
        .gateway(BrokerKind::Memory, |config| {
            config.session.max_message_size = 4096;
            config.session.max_frame_size = 2048;
            config.session.max_invalid_frames = 100;
        })
        .await;
    let healthy_identity = env.identity("h5");
    let mut healthy = gateway.connect(&healthy_identity, &[], &[]).await;

    let deep = format!("{}1{}", "[".repeat(600), "]".repeat(600));
    let huge_number = r#"{"type":"send","message":{"sendType":"CLIENT_TO_SERVER","messageType":"m","businessType":"b","content":1e999999}}"#;
    let wrong_types = r#"{"type":"ack","messageId":["not","a","string"]}"#;
    let unknown_type = r#"{"type":"subscribe","topic":"everything"}"#;
    let long_integer = format!(
        r#"{{"type":"send","message":{{"sendType":"CLIENT_TO_SERVER","messageType":"m","businessType":"b","timestamp":{}}}}}"#,
        "9".repeat(400)
    );
    let error_frames: Vec<(&str, Message)> = vec![
        ("malformed JSON", Message::text("{\"type\":")),
        ("deep nesting", Message::text(deep)),
        ("huge number", Message::text(huge_number)),
        ("long integer", Message::text(long_integer)),
        ("wrong field type", Message::text(wrong_types)),
        ("unknown frame type", Message::text(unknown_type)),
        ("binary frame", Message::binary(vec![0u8, 159, 146, 150])),
    ];
    for (what, message) in error_frames {
        let mut socket = raw_connect(&gateway.url(&env.identity("h5"), &[], &[]), &[])
            .await
            .expect("connect");
        socket.send(message).await.expect("send");
        assert_eq!(
            error_code_of(&mut socket).await,
            "INVALID_FRAME",
            "{what} gets an INVALID_FRAME error frame"
        );
    }

    let invalid_utf8 = Message::Frame(Frame::message(
        Bytes::from_static(&[0x7b, 0xff, 0xfe, 0x7d]),
        OpCode::Data(Data::Text),
        true,
    ));
    let unknown_control = Message::Frame(Frame::from_payload(
        FrameHeader {
            opcode: OpCode::Control(Control::Reserved(0xb)),
            ..FrameHeader::default()
        },
        Bytes::new(),
    ));
    let closing: Vec<(&str, Message, u16)> = vec![
        (
            "oversized message",
            Message::text("x".repeat(10_000)),
            close_code::MESSAGE_TOO_BIG,
        ),
        (
            "oversized frame",
            Message::text("x".repeat(3_000)),
            close_code::MESSAGE_TOO_BIG,
        ),
        ("invalid UTF-8", invalid_utf8, close_code::INVALID_PAYLOAD),
        (
            "unknown control frame",
            unknown_control,
            close_code::PROTOCOL_ERROR,
        ),
    ];
    for (what, message, expected) in closing {
        let mut socket = raw_connect(&gateway.url(&env.identity("h5"), &[], &[]), &[])
            .await
            .expect("connect");
        socket.send(message).await.expect("send");
        assert_eq!(
            close_code_of(&mut socket).await,
            Some(expected),
            "{what} closes with {expected}"
        );
    }

    let message_id = common::publish_direct(&gateway, &healthy_identity, json!("还在")).await;
    let message = next_message(&mut healthy).await;
    assert_eq!(message.envelope.id(), message_id);
    assert_eq!(message.envelope.content, json!("还在"));
}

#[tokio::test]
async fn sends_over_the_rate_limit_get_rate_limited_errors() {
    let env = TestEnv::new();
    let gateway = env
        .gateway(BrokerKind::Memory, |config| {
            config.session.rate_limit = 1;
            config.session.rate_limit_burst = 3;
        })
        .await;
    let queue = env.business_queue("limits");
    let _business = gateway
        .broker
        .consume_inbound(&queue, "limits.*")
        .await
        .expect("bind");
    let mut client = gateway.connect(&env.identity("h5"), &[], &[]).await;
    for index in 0..8 {
        let envelope = Envelope::from_json(
            &json!({
                "messageId": format!("m-{index}"), "sendType": "CLIENT_TO_SERVER",
                "businessType": "limits", "messageType": "tick", "content": index
            })
            .to_string(),
        )
        .expect("envelope");
        client.send(envelope).await.expect("send");
    }
    let mut acked = Vec::new();
    let mut limited = Vec::new();
    while acked.len() + limited.len() < 8 {
        match next_event(&mut client).await {
            Event::Ack { message_id } => acked.push(message_id),
            Event::Error {
                code: ErrorCode::RateLimited,
                message_id: Some(message_id),
                reason,
            } => {
                assert!(reason.contains("session.rate_limit"), "{reason}");
                limited.push(message_id);
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(acked.len(), 3, "the burst is accepted: {acked:?}");
    assert_eq!(limited.len(), 5, "the rest is limited: {limited:?}");
    // After a second a limited message goes through when resent with its messageId.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resend = ClientFrame::Send {
        message: Box::new(
            Envelope::from_json(
                &json!({
                    "messageId": limited[0], "sendType": "CLIENT_TO_SERVER",
                    "businessType": "limits", "messageType": "tick", "content": 0
                })
                .to_string(),
            )
            .expect("envelope"),
        ),
    };
    client.send_text(&resend.to_json()).await.expect("resend");
    match next_event(&mut client).await {
        Event::Ack { message_id } => assert_eq!(message_id, limited[0]),
        other => panic!("expected the resend acked, got {other:?}"),
    }
}

/// A token used on one node is refused on another; the announcement carries its nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_used_on_one_node_is_refused_on_another() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let node_a = env.gateway(BrokerKind::Rabbit, |_| {}).await;
    let node_b = env.gateway(BrokerKind::Rabbit, |_| {}).await;
    let identity = env.identity("h5");
    let url_a = node_a.url(&identity, &[], &[]);
    let mut original = Client::connect(&url_a).await.expect("first use");
    let url_b = url_a.replace(&node_a.address.to_string(), &node_b.address.to_string());
    // The announcement reaches node B within moments; until then B could not know the token.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = raw_connect(&url_b, &[]).await;
        match attempt {
            Err(401) => break,
            Err(status) => panic!("unexpected status {status}"),
            Ok(mut reuse) => {
                // Accepted before the announcement arrived: the reuse must be closed, not the original.
                assert_eq!(
                    close_code_of(&mut reuse).await,
                    Some(close_code::POLICY_VIOLATION)
                );
                assert!(Instant::now() < deadline, "node B kept accepting the token");
            }
        }
    }
    // The original session still receives.
    let message_id = common::publish_direct(&node_a, &identity, json!("paid")).await;
    let message = next_message(&mut original).await;
    assert_eq!(message.envelope.id(), message_id);
    original.ack(&message_id).await.expect("ack");
}

/// A node that started after a token was used has not heard of it and accepts it, but the reuse is closed as
/// soon as the node holding the original session hears of it; the original stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reuse_on_a_node_that_started_later_is_closed() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let node_a = env.gateway(BrokerKind::Rabbit, |_| {}).await;
    let identity = env.identity("h5");
    let url_a = node_a.url(&identity, &[], &[]);
    let mut original = Client::connect(&url_a).await.expect("first use");
    // Node A's announcement has passed before node B exists.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let node_b = env.gateway(BrokerKind::Rabbit, |_| {}).await;
    let url_b = url_a.replace(&node_a.address.to_string(), &node_b.address.to_string());
    let mut reuse = raw_connect(&url_b, &[])
        .await
        .expect("node B has not heard of the token");
    assert_eq!(
        close_code_of(&mut reuse).await,
        Some(close_code::POLICY_VIOLATION)
    );
    let message_id = common::publish_direct(&node_a, &identity, json!("still here")).await;
    let message = next_message(&mut original).await;
    assert_eq!(message.envelope.id(), message_id);
    original.ack(&message_id).await.expect("ack");
}

#[tokio::test]
async fn token_past_expiry_and_clock_skew_is_refused() {
    let env = TestEnv::new();
    let gateway = env
        .gateway(BrokerKind::Memory, |config| {
            config.auth.clock_skew = Duration::from_secs(2);
        })
        .await;
    let identity = env.identity("h5");
    let signer = TokenSigner::new(SECRET.as_bytes()).expect("secret");
    let mint = |expired_ago: Duration| {
        let now = SystemTime::now();
        let token = signer.mint(&identity, &[], &[], Duration::ZERO, now - expired_ago);
        format!("ws://{}/socket/{token}", gateway.address)
    };
    // Expired a second ago: within the skew tolerance.
    assert!(
        raw_connect(&mint(Duration::from_secs(1)), &[])
            .await
            .is_ok()
    );
    assert_eq!(
        raw_connect(&mint(Duration::from_secs(5)), &[]).await.err(),
        Some(401)
    );
}

/// S14: token leaks and foreign origins, with the real binary and trace logging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s14_tokens_never_reach_logs_and_foreign_origins_are_refused() {
    require_rabbitmq!();
    let env = TestEnv::new()
        .with_env("RUST_LOG", "trace")
        .with_env(
            "WSGW_SERVER_ALLOWED_ORIGINS",
            "[\"https://pay.example.com\"]",
        )
        .with_env("WSGW_AUTH_CLOCK_SKEW", "0s");
    let server = env.serve("s14");
    let identity = env.identity("h5");
    let mut outputs = Vec::new();
    let token_url = |ttl: &str, outputs: &mut Vec<String>| {
        let output = env
            .wsgw()
            .args(["-vv", "token", "--server", &server.http_url()])
            .args([
                "--unique-id",
                &identity.unique_id,
                "--client-type",
                "h5",
                "--ttl",
                ttl,
            ])
            .output()
            .expect("run wsgw token");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        outputs.push(String::from_utf8_lossy(&output.stderr).into_owned());
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let url = token_url("60s", &mut outputs);
    let token = token_of(&url).to_owned();

    // A failed upgrade on purpose: the wrong WebSocket version. It does not spend the token.
    let http = reqwest_like(&server.http_url());
    let (status, _, body) = http
        .get(
            &format!("/socket/{token}"),
            &[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Version", "8"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        )
        .await;
    assert_eq!(status, 426, "{body}");
    assert!(!body.contains(&token));

    // Connect; then reuse the token.
    let client = Client::connect(&url).await.expect("connect with the token");
    assert_eq!(raw_connect(&url, &[]).await.err(), Some(401));
    // Use a token after its expiry.
    let short = token_url("1s", &mut outputs);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(raw_connect(&short, &[]).await.err(), Some(401));

    // A foreign origin, on the upgrade and on the token endpoint.
    let fresh = token_url("60s", &mut outputs);
    assert_eq!(
        raw_connect(&fresh, &[("Origin", "https://evil.example")])
            .await
            .err(),
        Some(403)
    );
    let query = format!(
        "/websocket/token?uniqueId={}&clientType=h5",
        identity.unique_id
    );
    let (status, headers, _) = http
        .request("OPTIONS", &query, &[("Origin", "https://evil.example")])
        .await;
    assert_eq!(status, 403);
    assert!(!headers.contains_key("access-control-allow-origin"));
    let (status, headers, _) = http
        .get(&query, &[("Origin", "https://evil.example")])
        .await;
    assert_eq!(status, 403);
    assert!(!headers.contains_key("access-control-allow-origin"));

    client.close().await.expect("close");
    server
        .wait_for_log(&["rejected a WebSocket connection from a foreign origin"])
        .await;
    let logs = format!("{}\n{}", server.all_logs(), outputs.join("\n"));
    assert!(
        logs.lines().count() > 20,
        "trace logging should produce plenty of lines"
    );
    assert!(
        !logs.contains("/socket/v1."),
        "a connection URL with its token was logged"
    );
    for secret in [&url, &short, &fresh]
        .into_iter()
        .map(|url| token_of(url))
        .chain([API_KEY, SECRET])
    {
        let signature = secret.rsplit('.').next().unwrap_or(secret);
        let leaks = logs
            .lines()
            .filter(|line| line.contains(secret) || line.contains(signature))
            .count();
        assert_eq!(leaks, 0, "a credential appears in {leaks} log line(s)");
    }
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// Secrets and API keys come from files and rotate on SIGHUP: the new secret is accepted first, then signs,
/// then the old one is dropped; sessions opened meanwhile stay up, and a bad file keeps the current keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_api_keys_rotate_on_sighup_without_a_restart() {
    require_rabbitmq!();
    let old = "old-secret-0123456789abcdef0123456789abcdef";
    let new = "new-secret-0123456789abcdef0123456789abcdef";
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("token-secrets");
    let keys = dir.path().join("api-keys");
    std::fs::write(&secrets, format!("{old}\n")).expect("write secrets");
    std::fs::write(&keys, "# operators\nkey-one\n").expect("write keys");
    let env = TestEnv::new()
        .with_env("WSGW_TOKEN_SECRET", "")
        .with_env("WSGW_API_KEY", "")
        .with_env(
            "WSGW_AUTH_TOKEN_SECRET_FILE",
            secrets.to_str().expect("utf-8 path"),
        )
        .with_env(
            "WSGW_AUTH_API_KEYS_FILE",
            keys.to_str().expect("utf-8 path"),
        );
    let server = env.serve("rotation");
    let pid = server.child.id();
    let identity = env.identity("h5");
    let steady = env.identity("h5");
    let url_for = |secret: &str, identity: &wsgw::domain::Identity| {
        let signer = TokenSigner::new(secret.as_bytes()).expect("secret");
        let token = signer.mint(
            identity,
            &[],
            &[],
            Duration::from_secs(60),
            SystemTime::now(),
        );
        format!("ws://{}/socket/{token}", server.address)
    };
    let url_signed_by = |secret: &str| url_for(secret, &identity);
    let query = format!(
        "/websocket/token?uniqueId={}&clientType=h5",
        identity.unique_id
    );
    let with_key = |key: &str| Http {
        base: server.http_url(),
        api_key: key.to_owned(),
    };
    let mut reloads = 0;
    let mut reload = |secrets_text: &str, keys_text: &str| {
        std::fs::write(&secrets, secrets_text).expect("write secrets");
        std::fs::write(&keys, keys_text).expect("write keys");
        signal(pid, "HUP");
        reloads += 1;
        reloads
    };
    let reloaded = |count: usize| {
        let server = &server;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while server.all_logs().matches("SIGHUP: reload").count() < count {
                assert!(Instant::now() < deadline, "no reload logged");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    let mut before = Client::connect(&url_for(old, &steady))
        .await
        .expect("old secret");
    assert_eq!(raw_connect(&url_signed_by(new), &[]).await.err(), Some(401));
    assert_eq!(with_key("key-one").get(&query, &[]).await.0, 200);
    assert_eq!(with_key("key-two").get(&query, &[]).await.0, 401);

    // Step 1: every node accepts the new secret while signing with the old one.
    let count = reload(&format!("{old}\n{new}\n"), "key-one\nkey-two\n");
    reloaded(count).await;
    assert!(raw_connect(&url_signed_by(new), &[]).await.is_ok());
    assert_eq!(with_key("key-two").get(&query, &[]).await.0, 200);

    // Step 2: the new secret signs; tokens from the old one still work.
    let count = reload(&format!("{new}\n{old}\n"), "key-two\n");
    reloaded(count).await;
    let (status, _, body) = with_key("key-two").get(&query, &[]).await;
    assert_eq!(status, 200, "{body}");
    let issued: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let issued_token = token_of(issued["data"].as_str().expect("URL")).to_owned();
    let new_signer = TokenSigner::new(new.as_bytes()).expect("secret");
    assert!(new_signer.verify(&issued_token, SystemTime::now()).is_ok());
    assert!(raw_connect(&url_signed_by(old), &[]).await.is_ok());
    assert_eq!(with_key("key-one").get(&query, &[]).await.0, 401);

    // A file with a weak secret is refused; the current keys stay.
    let count = reload("short\n", "key-two\n");
    reloaded(count).await;
    server
        .wait_for_log(&["keeping the current ones", "token_secret_file"])
        .await;
    assert!(raw_connect(&url_signed_by(new), &[]).await.is_ok());

    // Step 3: the old secret is dropped.
    let count = reload(&format!("{new}\n"), "key-two\n");
    reloaded(count).await;
    assert_eq!(raw_connect(&url_signed_by(old), &[]).await.err(), Some(401));
    assert!(raw_connect(&url_signed_by(new), &[]).await.is_ok());

    // The session opened before the rotation is still served.
    let publisher = env.publisher().await;
    let message_id = common::publish_to(&publisher, &steady, json!("轮换后")).await;
    let message = next_message(&mut before).await;
    assert_eq!(message.envelope.id(), message_id);
    let logs = server.all_logs();
    for secret in [old, new, "key-one", "key-two"] {
        assert!(!logs.contains(secret), "a credential was logged");
    }
}
