//! TLS end to end: the real `wsgw serve` with server.tls_cert and server.tls_key, and the CLI and library
//! clients over https and wss. Each test makes its own CA and a server certificate for 127.0.0.1 and localhost.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::json;
use wsgw::client::{Client, ClientError};
use wsgw::http_client::{self, HttpError};
use wsgw::tls::ClientTls;

use common::{API_KEY, SECRET, Server, TestEnv};

/// How long the test gateways give a client for the TLS handshake.
const HANDSHAKE_TIMEOUT: &str = "2s";

/// A CA, a server certificate it signed, and a key that belongs to neither.
struct TestPki {
    dir: tempfile::TempDir,
    ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    unrelated_key: PathBuf,
}

impl TestPki {
    fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir");

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "wsgw test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");

        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "wsgw test server");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = server_params
            .signed_by(&server_key, &ca)
            .expect("server certificate");
        let unrelated_key = KeyPair::generate().expect("unrelated key");

        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        TestPki {
            ca_cert: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server-key.pem", server_key.serialize_pem()),
            unrelated_key: write("unrelated-key.pem", unrelated_key.serialize_pem()),
            dir,
        }
    }
}

/// Builds a `wsgw` command with only PATH, HOME, a state folder and the test secrets. It has no AMQP URL, so
/// `serve` uses the in-process broker.
fn bare_wsgw(state_dir: &Path) -> Command {
    let mut command = Command::new(common::binary_path());
    command.env_clear();
    for name in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.env("WSGW_STATE_DIR", state_dir);
    command.env("WSGW_TOKEN_SECRET", SECRET);
    command.env("WSGW_API_KEY", API_KEY);
    command
}

/// Starts `wsgw serve` with TLS and the in-process broker on a free loopback port.
fn serve_tls_in_memory(pki: &TestPki) -> Server {
    let mut command = bare_wsgw(pki.dir.path());
    command
        .env("WSGW_SERVER_TLS_CERT", &pki.server_cert)
        .env("WSGW_SERVER_TLS_KEY", &pki.server_key)
        .env("WSGW_SERVER_HANDSHAKE_TIMEOUT", HANDSHAKE_TIMEOUT)
        .args([
            "--log-format",
            "json",
            "-v",
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Server::spawn(command)
}

fn https_url(server: &Server) -> String {
    format!("https://{}", server.address)
}

/// Runs a command to completion off the async runtime.
async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run wsgw")
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Builds `wsgw token` for an identity against `server` over https, without --ca-cert.
fn token_command(pki: &TestPki, server: &Server, unique_id: &str) -> Command {
    let mut command = bare_wsgw(pki.dir.path());
    command
        .args(["--server", &https_url(server), "token"])
        .args(["--unique-id", unique_id, "--client-type", "h5"]);
    command
}

/// Fetches a connection URL from the gateway's token endpoint over https, trusting the test CA.
async fn fetch_url(server: &Server, tls: &ClientTls, unique_id: &str) -> String {
    let request = wsgw::client::TokenRequest {
        identity: wsgw::domain::Identity::new(unique_id, "h5").expect("identity"),
        tags: Vec::new(),
        businesses: Vec::new(),
        ttl: None,
    };
    wsgw::client::request_connection_url(&https_url(server), API_KEY, &request, tls)
        .await
        .expect("token over https")
}

fn trusting_tls(pki: &TestPki) -> ClientTls {
    ClientTls::new(Some(&pki.ca_cert)).expect("load the test CA")
}

#[tokio::test]
async fn https_token_and_wss_delivery() {
    let pki = TestPki::new();
    let server = serve_tls_in_memory(&pki);
    let listening = server.wait_for_log(&["listening"]).await;
    assert!(
        listening.contains(&format!("wss://{}", server.address)),
        "{listening}"
    );

    // `wsgw token --ca-cert` reaches the token endpoint over https and gets a wss:// URL.
    let mut token = token_command(&pki, &server, "order-8812");
    token.arg("--ca-cert").arg(&pki.ca_cert);
    let output = run(token).await;
    assert!(
        output.status.success(),
        "token failed: {}",
        stderr_of(&output)
    );
    let url = stdout_of(&output);
    let expected_prefix = format!("wss://{}/socket/", server.address);
    assert!(url.starts_with(&expected_prefix), "token printed {url}");

    // A library client connects over wss with that URL.
    let tls = trusting_tls(&pki);
    let mut client = Client::connect_with_tls(&url, &tls)
        .await
        .expect("wss client connects");
    assert_eq!(client.welcome.identity.unique_id, "order-8812");

    // `wsgw send` posts over https and waits for the client's ack.
    let content = json!({"text": "二维码已刷新，请扫码支付", "站点": "上海浦东", "emoji": "⚡"});
    let mut send = bare_wsgw(pki.dir.path());
    send.args(["--server", &https_url(&server), "send"])
        .args(["--to", "order-8812", "--to-client-type", "h5"])
        .args(["--business-type", "qrcode", "--message-type", "QR_REFRESH"])
        .args(["--content", &content.to_string(), "--wait", "20s"])
        .arg("--ca-cert")
        .arg(&pki.ca_cert);
    let sending = tokio::spawn(run(send));

    let message = common::next_message(&mut client).await;
    assert_eq!(message.envelope.content, content);
    client
        .ack(message.envelope.id())
        .await
        .expect("ack over wss");

    let sent = sending.await.expect("join send");
    assert!(sent.status.success(), "send failed: {}", stderr_of(&sent));
    let printed = stdout_of(&sent);
    let mut lines = printed.lines();
    assert_eq!(lines.next(), Some(message.envelope.id()));
    let receipt = lines.next().unwrap_or_default();
    assert!(
        receipt.starts_with("delivered to order-8812/h5"),
        "send printed {printed}"
    );
    let _ = client.close().await;
}

#[tokio::test]
async fn listen_over_wss_with_rabbitmq() {
    require_rabbitmq!();
    let pki = TestPki::new();
    let env = TestEnv::new()
        .with_env(
            "WSGW_SERVER_TLS_CERT",
            &pki.server_cert.display().to_string(),
        )
        .with_env("WSGW_SERVER_TLS_KEY", &pki.server_key.display().to_string());
    let server = env.serve("node-tls");
    let identity = env.identity("charger");

    let listen = env
        .wsgw()
        .args(["--server", &https_url(&server), "listen"])
        .args(["--unique-id", &identity.unique_id])
        .args(["--client-type", &identity.client_type])
        .args(["--count", "1", "--output", "json"])
        .arg("--ca-cert")
        .arg(&pki.ca_cert)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wsgw listen");
    server
        .wait_for_log(&["session opened", &identity.unique_id])
        .await;

    let content = json!({"text": "充电已开始，请勿拔枪", "amount": 12.5});
    let publisher = env.publisher().await;
    let message_id = common::publish_to(&publisher, &identity, content.clone()).await;
    publisher.close().await;

    let output = tokio::task::spawn_blocking(move || listen.wait_with_output())
        .await
        .expect("join")
        .expect("listen exits");
    assert!(
        output.status.success(),
        "listen failed: {}",
        stderr_of(&output)
    );
    let line: serde_json::Value = serde_json::from_str(&stdout_of(&output)).expect("one JSON line");
    assert_eq!(line["message"]["messageId"], message_id.as_str());
    assert_eq!(line["message"]["content"], content);
    // listen acks after printing, so the mailbox is empty once its consumer is gone.
    let remaining = env.settled_message_count(&env.mailbox(&identity)).await;
    assert_eq!(remaining, 0, "the message was not acked");
}

#[tokio::test]
async fn bad_clients_fail_and_gateway_keeps_serving() {
    let pki = TestPki::new();
    let server = serve_tls_in_memory(&pki);
    let address = server.address;

    // A plain-HTTP request to the TLS port gets no HTTP response.
    let plain = http_client::request(
        hyper::Method::GET,
        &format!("http://{address}/healthz"),
        None,
        None,
        Duration::from_secs(5),
    )
    .await;
    assert!(plain.is_err(), "plain HTTP got a response: {plain:?}");
    server
        .wait_for_log(&["TLS handshake failed", &address.ip().to_string()])
        .await;

    // A TLS client that trusts only the webpki roots rejects the test CA's certificate.
    let untrusted = http_client::request(
        hyper::Method::GET,
        &format!("https://{address}/healthz"),
        None,
        None,
        Duration::from_secs(5),
    )
    .await;
    match untrusted {
        Err(HttpError::Tls { reason, .. }) => assert!(reason.contains("not trusted"), "{reason}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }

    // A connection that never starts the handshake is closed after server.handshake_timeout.
    let started = Instant::now();
    let silent = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("read timeout");
        let mut buffer = [0u8; 64];
        stream.read(&mut buffer)
    })
    .await
    .expect("join");
    assert!(
        matches!(silent, Ok(0)),
        "expected the gateway to close the silent connection, got {silent:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        started.elapsed()
    );
    server.wait_for_log(&["TLS handshake timed out"]).await;

    // The next good client is served: a health check over https, then a wss session.
    let tls = trusting_tls(&pki);
    let (status, _) = http_client::request_with_tls(
        hyper::Method::GET,
        &format!("https://{address}/healthz"),
        None,
        None,
        Duration::from_secs(5),
        &tls,
    )
    .await
    .expect("health check over https");
    assert_eq!(status, hyper::StatusCode::OK);
    let url = fetch_url(&server, &tls, "after-bad-clients").await;
    let client = Client::connect_with_tls(&url, &tls)
        .await
        .expect("wss client connects after the bad ones");
    assert_eq!(client.welcome.identity.unique_id, "after-bad-clients");
    let _ = client.close().await;
}

#[tokio::test]
async fn untrusted_certificate_error_mentions_ca_cert() {
    let pki = TestPki::new();
    let server = serve_tls_in_memory(&pki);

    // `wsgw token` over https without --ca-cert.
    let output = run(token_command(&pki, &server, "no-ca-token")).await;
    assert_eq!(output.status.code(), Some(69), "{}", stderr_of(&output));
    let message = stderr_of(&output);
    assert!(message.contains("not trusted"), "{message}");
    assert!(message.contains("--ca-cert"), "{message}");

    // `wsgw listen` over wss without --ca-cert: with no API key it mints the token locally, so the first TLS
    // connection is the WebSocket one.
    let mut listen = bare_wsgw(pki.dir.path());
    listen
        .env_remove("WSGW_API_KEY")
        .args(["--server", &https_url(&server), "listen"])
        .args(["--unique-id", "no-ca-listen", "--client-type", "h5"]);
    let output = run(listen).await;
    assert_eq!(output.status.code(), Some(69), "{}", stderr_of(&output));
    let message = stderr_of(&output);
    assert!(message.contains("wss://"), "{message}");
    assert!(message.contains("not trusted"), "{message}");
    assert!(message.contains("--ca-cert"), "{message}");
    assert!(
        !message.contains(SECRET),
        "the error shows the token secret"
    );

    // The library client without the CA.
    let url = fetch_url(&server, &trusting_tls(&pki), "no-ca-library").await;
    match Client::connect(&url).await {
        Err(ClientError::Tls { url, reason }) => {
            assert!(url.ends_with("/socket/<token>"), "{url}");
            assert!(reason.contains("not trusted"), "{reason}");
        }
        Err(other) => panic!("expected a TLS error, got {other}"),
        Ok(_) => panic!("connected without trusting the CA"),
    }
}

#[tokio::test]
async fn ca_cert_file_errors_name_the_file() {
    let pki = TestPki::new();
    let missing = pki.dir.path().join("missing-ca.pem");
    let error = ClientTls::new(Some(&missing)).expect_err("a missing CA file");
    let text = error.to_string();
    assert!(text.contains("missing-ca.pem"), "{text}");
    assert!(text.contains("not found"), "{text}");

    let error = ClientTls::new(Some(&pki.server_key)).expect_err("a key is not a CA certificate");
    let text = error.to_string();
    assert!(text.contains("server-key.pem"), "{text}");
    assert!(text.contains("no certificate"), "{text}");

    let mut token = bare_wsgw(pki.dir.path());
    token
        .args(["--server", "https://127.0.0.1:1", "token"])
        .args(["--unique-id", "u-1", "--client-type", "h5", "--ca-cert"])
        .arg(&missing);
    let output = run(token).await;
    assert_eq!(output.status.code(), Some(66), "{}", stderr_of(&output));
    let message = stderr_of(&output);
    assert!(message.contains("--ca-cert"), "{message}");
    assert!(message.contains("missing-ca.pem"), "{message}");
}

/// Runs `wsgw serve --check` with the given certificate and key files.
async fn check_tls_files(pki: &TestPki, cert: &Path, key: &Path) -> Output {
    let mut check = bare_wsgw(pki.dir.path());
    check
        .env("WSGW_SERVER_TLS_CERT", cert)
        .env("WSGW_SERVER_TLS_KEY", key)
        .args(["serve", "--check"]);
    run(check).await
}

#[tokio::test]
async fn serve_check_loads_tls_files() {
    let pki = TestPki::new();

    let valid = check_tls_files(&pki, &pki.server_cert, &pki.server_key).await;
    assert!(valid.status.success(), "{}", stderr_of(&valid));
    assert!(
        stdout_of(&valid).contains("configuration is valid"),
        "{}",
        stdout_of(&valid)
    );

    let missing_path = pki.dir.path().join("missing.pem");
    let missing = check_tls_files(&pki, &missing_path, &pki.server_key).await;
    assert_eq!(missing.status.code(), Some(78), "{}", stderr_of(&missing));
    let message = stderr_of(&missing);
    assert!(message.contains("server.tls_cert"), "{message}");
    assert!(message.contains("missing.pem"), "{message}");
    assert!(message.contains("not found"), "{message}");

    let no_certificate = check_tls_files(&pki, &pki.server_key, &pki.server_key).await;
    assert_eq!(no_certificate.status.code(), Some(78));
    let message = stderr_of(&no_certificate);
    assert!(message.contains("server-key.pem"), "{message}");
    assert!(message.contains("no certificate"), "{message}");

    let no_key = check_tls_files(&pki, &pki.server_cert, &pki.ca_cert).await;
    assert_eq!(no_key.status.code(), Some(78));
    let message = stderr_of(&no_key);
    assert!(message.contains("ca.pem"), "{message}");
    assert!(message.contains("no unencrypted private key"), "{message}");

    let mismatch = check_tls_files(&pki, &pki.server_cert, &pki.unrelated_key).await;
    assert_eq!(mismatch.status.code(), Some(78));
    let message = stderr_of(&mismatch);
    assert!(message.contains("unrelated-key.pem"), "{message}");
    assert!(message.contains("does not match"), "{message}");
}

#[tokio::test]
async fn serve_rejects_mismatched_tls_key() {
    let pki = TestPki::new();
    let mut serve = bare_wsgw(pki.dir.path());
    serve
        .env("WSGW_SERVER_TLS_CERT", &pki.server_cert)
        .env("WSGW_SERVER_TLS_KEY", &pki.unrelated_key)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(30), run(serve))
        .await
        .expect("serve exits at once");
    assert_eq!(output.status.code(), Some(78), "{}", stderr_of(&output));
    let message = stderr_of(&output);
    assert!(message.contains("does not match"), "{message}");
    assert!(!message.contains("listening"), "{message}");
}
