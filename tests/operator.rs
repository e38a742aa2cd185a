//! The operator's surface: `wsgw sessions` across nodes, graceful shutdown, `serve --check`, /metrics,
//! systemd notification and the unit file.

mod common;

use std::collections::HashSet;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use wsgw::client::{Client, Event};
use wsgw::domain::frame::close_code;

use common::{API_KEY, BrokerKind, TestEnv, next_message};

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

fn sessions_json(env: &TestEnv, extra: &[&str]) -> (serde_json::Value, String) {
    let output = env
        .wsgw()
        .args(["--output", "json", "sessions", "--timeout", "1500ms"])
        .args(extra)
        .output()
        .expect("run wsgw sessions");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value = serde_json::from_slice(&output.stdout).expect("JSON");
    (value, String::from_utf8_lossy(&output.stderr).into_owned())
}

fn listed_ids(value: &serde_json::Value) -> HashSet<String> {
    value["sessions"]
        .as_array()
        .expect("sessions array")
        .iter()
        .map(|session| session["sessionId"].as_str().expect("sessionId").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_lists_every_node_and_kicks() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let node_a = env.serve("node-a");
    let node_b = env.serve("node-b");
    let mut on_a = Vec::new();
    for _ in 0..2 {
        let identity = env.identity("h5");
        on_a.push(
            Client::connect(&env.connection_url(&node_a, &identity))
                .await
                .expect("connect to A"),
        );
    }
    let identity = env.identity("charger");
    let on_b = Client::connect(&env.connection_url(&node_b, &identity))
        .await
        .expect("connect to B");
    let expected: HashSet<String> = on_a
        .iter()
        .chain(std::iter::once(&on_b))
        .map(|client| client.welcome.session_id.clone())
        .collect();

    // Each node learns of the other from its heartbeat, sent at start.
    let deadline = Instant::now() + Duration::from_secs(20);
    let listing = loop {
        let env_ref = &env;
        let (value, _) = tokio::task::block_in_place(|| sessions_json(env_ref, &[]));
        if listed_ids(&value) == expected && value["nodes"].as_array().map(Vec::len) == Some(2) {
            break value;
        }
        assert!(
            Instant::now() < deadline,
            "sessions never listed both nodes: {value}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let session_b = &listing["sessions"]
        .as_array()
        .expect("array")
        .iter()
        .find(|session| session["node"] == "node-b")
        .expect("B's session");
    assert_eq!(session_b["uniqueId"], identity.unique_id.as_str());
    assert_eq!(session_b["clientType"], "charger");

    let kicked = on_a[0].welcome.session_id.clone();
    let output = env
        .wsgw()
        .args(["sessions", "--kick", &kicked, "--timeout", "1500ms"])
        .output()
        .expect("run wsgw sessions --kick");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("node-a"));
    match common::next_event(&mut on_a[0]).await {
        Event::Closed { code, .. } => assert_eq!(code, Some(close_code::KICKED)),
        other => panic!("the kicked client should be closed, got {other:?}"),
    }

    // A paused node does not answer: it is named, and the other node's sessions are still listed.
    let pid_b = node_b.child.id();
    signal(pid_b, "STOP");
    let env_ref = &env;
    let (value, stderr) = tokio::task::block_in_place(|| sessions_json(env_ref, &[]));
    signal(pid_b, "CONT");
    assert!(stderr.contains("node node-b did not answer"), "{stderr}");
    assert_eq!(value["notAnswering"], json!(["node-b"]));
    assert_eq!(
        listed_ids(&value),
        HashSet::from([on_a[1].welcome.session_id.clone()])
    );

    let (value, _) = tokio::task::block_in_place(|| sessions_json(env_ref, &["--node", "node-b"]));
    assert_eq!(
        listed_ids(&value),
        HashSet::from([on_b.welcome.session_id.clone()])
    );
    let _ = on_b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_stream_loses_nothing() {
    require_rabbitmq!();
    let env = TestEnv::new();
    let first = env.serve("node-a");
    let identity = env.identity("h5");
    let mut client = Client::connect(&env.connection_url(&first, &identity))
        .await
        .expect("connect");

    let publisher = env.publisher().await;
    let publishing = {
        let identity = identity.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for index in 0..500 {
                ids.push(common::publish_to(&publisher, &identity, json!(index)).await);
            }
            ids
        })
    };
    let mut seen = HashSet::new();
    while seen.len() < 150 {
        let message = next_message(&mut client).await;
        seen.insert(message.envelope.id().to_owned());
        client.ack(message.envelope.id()).await.expect("ack");
    }
    let mut first = first;
    signal(first.child.id(), "TERM");
    // The client keeps acking what it holds during the grace period, until the gateway says it is going away.
    loop {
        match common::next_event(&mut client).await {
            Event::Message(message) => {
                seen.insert(message.envelope.id().to_owned());
                let _ = client.ack(message.envelope.id()).await;
            }
            Event::Closed { code, .. } => {
                assert_eq!(code, Some(close_code::GOING_AWAY));
                break;
            }
            _ => {}
        }
    }
    let status = tokio::task::spawn_blocking(move || first.child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "serve exits 0 after SIGTERM: {status}");

    let published: HashSet<String> = publishing.await.expect("publisher").into_iter().collect();
    let second = env.serve("node-b");
    let mut client = Client::connect(&env.connection_url(&second, &identity))
        .await
        .expect("reconnect");
    while seen.len() < published.len() {
        let message = next_message(&mut client).await;
        seen.insert(message.envelope.id().to_owned());
        client.ack(message.envelope.id()).await.expect("ack");
    }
    assert_eq!(
        seen, published,
        "all 500 messages arrive across the restart"
    );
    client.close().await.expect("close");
}

#[test]
fn check_names_every_bad_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("wsgw.toml");
    std::fs::write(
        &path,
        "[session]\nping_interval = \"often\"\n[amqp]\nprefx = \"wsgw\"\n",
    )
    .expect("write");
    let env = TestEnv::new();
    let output = env
        .wsgw()
        .args([
            "--config",
            path.to_str().expect("utf-8 path"),
            "serve",
            "--check",
        ])
        .output()
        .expect("run wsgw serve --check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("session.ping_interval") && stderr.contains("often"),
        "{stderr}"
    );
    assert!(stderr.contains("amqp.prefx"), "{stderr}");

    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/wsgw.toml");
    let output = env
        .wsgw()
        .args([
            "--config",
            example.to_str().expect("utf-8 path"),
            "serve",
            "--check",
        ])
        .output()
        .expect("run wsgw serve --check");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn example_config_documents_every_key() {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/wsgw.toml"),
    )
    .expect("packaging/wsgw.toml");
    for key in wsgw::config::KEYS {
        let (section, field) = key.split_once('.').expect("section.key");
        let start = example
            .find(&format!("[{section}]"))
            .unwrap_or_else(|| panic!("no [{section}] section"));
        let body = &example[start..];
        let end = body[1..].find("\n[").map_or(body.len(), |end| end + 1);
        assert!(
            body[..end].contains(&format!("# {field} = ")),
            "packaging/wsgw.toml does not document {key}"
        );
    }
}

/// Parses Prometheus text: every line is a comment or `name{labels} value`. Returns the samples.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ") || line.starts_with("# TYPE ") || line == "# EOF",
                "{line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("invalid value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "invalid metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels in {line:?}");
        }
        samples.push((series.to_owned(), value));
    }
    samples
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let env = TestEnv::new();
    let gateway = env
        .gateway(BrokerKind::Memory, |config| config.session.max_rejects = 0)
        .await;
    let identity = env.identity("charger");
    let mut client = gateway.connect(&identity, &[], &[]).await;
    for index in 0..3 {
        let body = json!({"sendType": "SERVER_TO_CLIENT", "businessType": "qrcode", "messageType": "QR_REFRESH",
                          "toUniqueId": identity.unique_id, "toClientType": "charger", "content": index});
        let (status, _) = wsgw::http_client::request(
            hyper::Method::POST,
            &format!("{}/api/v1/messages", gateway.http_url()),
            Some(API_KEY),
            Some(body.to_string().into_bytes()),
            Duration::from_secs(5),
        )
        .await
        .expect("publish");
        assert_eq!(status.as_u16(), 202);
    }
    for index in 0..3 {
        let message = next_message(&mut client).await;
        if index < 2 {
            client.ack(message.envelope.id()).await.expect("ack");
        } else {
            client
                .reject(message.envelope.id(), "cannot use it")
                .await
                .expect("reject");
        }
    }
    let marker = common::publish_direct(&gateway, &identity, json!("marker")).await;
    let message = next_message(&mut client).await;
    assert_eq!(
        message.envelope.id(),
        marker,
        "the reject was handled before the marker was pushed"
    );

    let (status, body) = wsgw::http_client::request(
        hyper::Method::GET,
        &format!("{}/metrics", gateway.http_url()),
        None,
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("metrics");
    assert_eq!(status.as_u16(), 200);
    let text = String::from_utf8(body.to_vec()).expect("utf-8");
    let samples = parse_prometheus(&text);
    let value = |series: &str| {
        samples
            .iter()
            .find(|(name, _)| name == series)
            .map(|(_, value)| *value)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(value("wsgw_sessions"), 1.0);
    assert_eq!(value("wsgw_connects_total"), 1.0);
    assert_eq!(
        value(r#"wsgw_messages_published_total{business_type="qrcode"}"#),
        3.0
    );
    assert_eq!(
        value(r#"wsgw_messages_delivered_total{business_type="qrcode"}"#),
        4.0
    );
    assert_eq!(
        value(r#"wsgw_messages_acked_total{business_type="qrcode"}"#),
        2.0
    );
    assert_eq!(
        value(r#"wsgw_messages_dead_lettered_total{business_type="qrcode"}"#),
        1.0
    );
    assert_eq!(value("wsgw_client_ack_latency_seconds_count"), 2.0);
    assert_eq!(value("wsgw_publish_confirm_latency_seconds_count"), 3.0);
    assert_eq!(value("wsgw_rabbitmq_connected"), 1.0);
    assert_eq!(value("wsgw_rabbitmq_blocked"), 0.0);
    client.close().await.expect("close");
}

/// Starts `wsgw serve` with NOTIFY_SOCKET pointing at a socket the test reads.
fn serve_with_notify(
    env: &TestEnv,
    socket_path: &std::path::Path,
    amqp_url: Option<&str>,
) -> std::process::Child {
    let mut command = env.wsgw();
    command
        .env("NOTIFY_SOCKET", socket_path)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--node-name",
            "notify-node",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match amqp_url {
        Some(url) => command.env("WSGW_AMQP_URL", url),
        None => command.env_remove("WSGW_AMQP_URL"),
    };
    command.spawn().expect("spawn wsgw serve")
}

#[tokio::test]
async fn ready_is_notified_after_listener_and_broker() {
    require_rabbitmq!();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let env = TestEnv::new();

    // An unreachable broker: serve fails and never says READY.
    let mut failing = serve_with_notify(
        &env,
        &socket_path,
        Some("amqp://guest:guest@127.0.0.1:1/%2f"),
    );
    let status = failing.wait().expect("wait");
    assert!(!status.success());
    socket.set_nonblocking(true).expect("nonblocking");
    let mut buffer = [0u8; 512];
    assert!(
        socket.recv(&mut buffer).is_err(),
        "READY must not be sent when RabbitMQ is unreachable"
    );
    socket.set_nonblocking(false).expect("blocking");

    let mut child = serve_with_notify(&env, &socket_path, Some(&common::amqp_url()));
    let received = socket.recv(&mut buffer).expect("a notification");
    let message = String::from_utf8_lossy(&buffer[..received]).into_owned();
    assert!(message.lines().any(|line| line == "READY=1"), "{message}");
    // READY came after the broker connected: the node's control queue exists now.
    let control = format!("{}.control.notify-node", env.prefix);
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let error = channel
        .queue_declare(
            control.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect_err("exclusive to the node's connection");
    assert!(error.to_string().contains("RESOURCE_LOCKED"), "{error}");

    signal(child.id(), "TERM");
    let received = socket.recv(&mut buffer).expect("a notification");
    let message = String::from_utf8_lossy(&buffer[..received]).into_owned();
    assert!(
        message.lines().any(|line| line == "STOPPING=1"),
        "{message}"
    );
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
}

#[test]
fn unit_file_passes_systemd_analyze() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipping: systemd-analyze is not installed");
        return;
    };
    assert!(version.status.success());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    let man1 = dir.path().join("man/man1");
    std::fs::create_dir_all(&man1).expect("man dir");
    for entry in std::fs::read_dir(root.join("man")).expect("man/") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), man1.join(entry.file_name())).expect("copy a man page");
    }
    // The unit names the installed binary; point it at the built one so verify can check ExecStart.
    let unit = std::fs::read_to_string(root.join("packaging/wsgw.service"))
        .expect("unit")
        .replace("/usr/bin/wsgw", env!("CARGO_BIN_EXE_wsgw"));
    let unit_path = dir.path().join("wsgw.service");
    std::fs::write(&unit_path, unit).expect("write unit");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .expect("run systemd-analyze verify");
    assert!(
        output.status.success(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
