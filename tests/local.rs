//! The README's local setup: `wsgw serve` with no RabbitMQ and no secrets configured, then `wsgw listen` and
//! `wsgw send` on the same machine with no flags beyond the message itself.

mod common;

use std::process::{Command, Stdio};

use serde_json::json;

/// A `wsgw` command with only PATH, HOME and the state folder: no AMQP URL, no secrets, no server URL.
fn bare_wsgw(state_dir: &std::path::Path) -> Command {
    let mut command = Command::new(common::binary_path());
    command.env_clear();
    for name in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.env("WSGW_STATE_DIR", state_dir);
    command
}

#[tokio::test]
async fn serve_without_rabbitmq_delivers_send_to_listen() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut serve = bare_wsgw(state.path());
    serve
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let server = common::Server::spawn(serve);
    let warning = server.wait_for_log(&["in-process broker"]).await;
    assert!(warning.contains("WARN"), "{warning}");
    server.wait_for_log(&["local credentials"]).await;

    let listen = bare_wsgw(state.path())
        .args([
            "listen",
            "--unique-id",
            "post-0042",
            "--client-type",
            "charger",
            "--count",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wsgw listen");
    server.wait_for_log(&["session opened", "post-0042"]).await;

    let content = json!({"qr": "https://pay.example/qr/42", "text": "请扫码"});
    let mut send = bare_wsgw(state.path());
    send.args(["send", "--to", "post-0042", "--to-client-type", "charger"])
        .args(["--business-type", "qrcode", "--message-type", "QR_REFRESH"])
        .args(["--content", &content.to_string()]);
    let sent = tokio::task::spawn_blocking(move || send.output())
        .await
        .expect("join")
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

    let output = tokio::task::spawn_blocking(move || listen.wait_with_output())
        .await
        .expect("join")
        .expect("listen exits");
    assert!(
        output.status.success(),
        "listen failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8(output.stdout).expect("utf-8").trim())
            .expect("one JSON line");
    assert_eq!(line["message"]["messageId"], message_id.as_str());
    assert_eq!(line["message"]["content"], content);
}

#[test]
fn serve_refuses_public_address_without_secrets() {
    let state = tempfile::tempdir().expect("tempdir");
    let output = bare_wsgw(state.path())
        .args(["serve", "--listen", "0.0.0.0:0"])
        .output()
        .expect("run wsgw serve");
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refusing to listen on 0.0.0.0"), "{stderr}");
    assert!(stderr.contains("auth.token_secret"), "{stderr}");
}
