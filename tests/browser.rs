//! The browser client (clients/js/wsgw.js) and the charging post example (examples/charging-post) in headless
//! Chromium, against the real `wsgw serve` binary on RabbitMQ.
//!
//! Each test starts an HTTP server in the test that plays the business backend: it serves the example page and
//! `/api/ws-token`, which requests a connection URL from the gateway with the test API key. The page imports
//! the client from the gateway's `/client/v1/wsgw.js`. tests/browser/drive.mjs drives Chromium through
//! playwright-core and takes one JSON command per line.
//!
//! The page tests need Node.js 20 or later, `npm ci` in tests/browser and Debian's chromium (/usr/bin/chromium,
//! or WSGW_CHROMIUM). When one is missing they fail if CI=true, and otherwise print why and return. The route
//! test needs none of these: it uses a gateway in the test process.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};
use tokio_util::task::AbortOnDropHandle;
use wsgw::domain::{Identity, SendType};

use common::{API_KEY, BrokerKind, Server, TestEnv};

/// One Chromium at a time: the machine has 2 cores, and parallel browsers make the timings flaky.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chromium_path() -> PathBuf {
    std::env::var_os("WSGW_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Returns true when node, playwright-core and Chromium are installed. Panics when one is missing and CI=true.
fn browser_tools_available() -> bool {
    let playwright = manifest_dir().join("tests/browser/node_modules/playwright-core/package.json");
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    let missing: Vec<String> = [
        (!node).then(|| "node is not on PATH (apt-get install nodejs)".to_owned()),
        (!playwright.exists()).then(|| {
            format!(
                "{} is missing (run `npm ci` in tests/browser)",
                playwright.display()
            )
        }),
        (!chromium_path().exists()).then(|| {
            format!(
                "{} is missing (apt-get install chromium, or set WSGW_CHROMIUM)",
                chromium_path().display()
            )
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "the browser tests need: {}; CI=true requires them",
            missing.join("; ")
        );
    }
    eprintln!(
        "skipping: {} (set CI=true to make this a failure)",
        missing.join("; ")
    );
    false
}

/// Returns early from a test when RabbitMQ or the browser tools are missing outside CI.
macro_rules! require_browser {
    () => {
        require_rabbitmq!();
        if !browser_tools_available() {
            return;
        }
    };
}

/// Returns a free loopback port, so a gateway can be restarted on the same address.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free port")
        .port()
}

/// Starts `wsgw serve` on 127.0.0.1:`port` and waits until it listens.
fn serve_on(env: &TestEnv, port: u16, node: &str) -> Server {
    let mut command = env.wsgw();
    command
        .args(["--log-format", "json", "-v", "serve", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--node-name", node])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Server::spawn(command)
}

/// The business backend of the example: the page at `/` and the token endpoint at `/api/ws-token?post=ID`.
struct Backend {
    address: SocketAddr,
    token_requests: Arc<AtomicUsize>,
    _task: AbortOnDropHandle<()>,
}

impl Backend {
    async fn start(gateway: String) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the backend");
        let address = listener.local_addr().expect("backend address");
        let token_requests = Arc::new(AtomicUsize::new(0));
        let counter = token_requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let gateway = gateway.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        backend_route(gateway.clone(), counter.clone(), request)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            address,
            token_requests,
            _task: AbortOnDropHandle::new(task),
        }
    }

    fn page_url(&self, gateway: &str, identity: &Identity) -> String {
        format!(
            "http://{}/?gateway={gateway}&post={}",
            self.address, identity.unique_id
        )
    }
}

async fn backend_route(
    gateway: String,
    token_requests: Arc<AtomicUsize>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => {
            let page = std::fs::read(manifest_dir().join("examples/charging-post/index.html"))
                .expect("read examples/charging-post/index.html");
            respond(StatusCode::OK, "text/html; charset=utf-8", page)
        }
        (&Method::GET, "/api/ws-token") => {
            token_requests.fetch_add(1, Ordering::SeqCst);
            let post = url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
                .find(|(name, _)| name == "post")
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default();
            let query: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("uniqueId", &post)
                .append_pair("clientType", "charger")
                .finish();
            let token_url = format!("{gateway}/websocket/token?{query}");
            match wsgw::http_client::request(
                Method::GET,
                &token_url,
                Some(API_KEY),
                None,
                Duration::from_secs(5),
            )
            .await
            {
                Ok((status, body)) => respond(status, "application/json", body.to_vec()),
                // The gateway is down: the page's client retries with backoff.
                Err(error) => {
                    let body =
                        json!({"result": 503, "description": error.to_string(), "data": null});
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "application/json",
                        body.to_string().into_bytes(),
                    )
                }
            }
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", b"not found".to_vec()),
    };
    Ok(response)
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// One page in headless Chromium, driven by tests/browser/drive.mjs.
struct Browser {
    child: tokio::process::Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Browser {
    /// Launches Chromium, opens `url` and waits until the page has loaded.
    async fn open(url: &str) -> Browser {
        let mut child = tokio::process::Command::new("node")
            .arg(manifest_dir().join("tests/browser/drive.mjs"))
            .arg(url)
            .env("WSGW_CHROMIUM", chromium_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node tests/browser/drive.mjs");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let collected = logs.clone();
        let stderr = child.stderr.take().expect("piped stderr");
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                collected.lock().expect("lock").push(line);
            }
        });
        let mut browser = Browser {
            stdin: child.stdin.take().expect("piped stdin"),
            stdout: BufReader::new(child.stdout.take().expect("piped stdout")).lines(),
            child,
            logs,
        };
        browser
            .read_reply(&format!("open {url}"), Duration::from_secs(40))
            .await;
        browser
    }

    fn logs(&self) -> String {
        self.logs.lock().expect("lock").join("\n")
    }

    /// Reads the reply to `command` and panics with the browser log when it failed.
    async fn read_reply(&mut self, command: &str, timeout: Duration) -> Value {
        let line = match tokio::time::timeout(timeout, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => panic!(
                "drive.mjs exited during {command}; browser log:\n{}",
                self.logs()
            ),
            Ok(Err(error)) => panic!("reading the reply to {command} failed: {error}"),
            Err(_) => panic!(
                "drive.mjs did not reply to {command} within {timeout:?}; browser log:\n{}",
                self.logs()
            ),
        };
        let reply: Value = serde_json::from_str(&line)
            .unwrap_or_else(|error| panic!("drive.mjs printed invalid JSON {line:?}: {error}"));
        if reply["ok"] != json!(true) {
            panic!(
                "browser command {command} failed: {}; browser log:\n{}",
                reply["error"],
                self.logs()
            );
        }
        reply
    }

    async fn command(&mut self, command: Value, timeout: Duration) -> Value {
        let line = format!("{command}\n");
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to drive.mjs");
        let reply = self
            .read_reply(&command.to_string(), timeout + Duration::from_secs(10))
            .await;
        reply["value"].clone()
    }

    /// Evaluates a JavaScript expression in the page and returns its JSON value.
    async fn eval(&mut self, expression: &str) -> Value {
        self.command(
            json!({"op": "eval", "expression": expression}),
            Duration::from_secs(10),
        )
        .await
    }

    /// Waits until a JavaScript expression is truthy in the page and returns its value.
    async fn wait_for(&mut self, expression: &str, timeout: Duration) -> Value {
        let timeout_ms = timeout.as_millis() as u64;
        self.command(
            json!({"op": "wait", "expression": expression, "timeoutMs": timeout_ms}),
            timeout,
        )
        .await
    }

    async fn click(&mut self, selector: &str) {
        self.command(
            json!({"op": "click", "selector": selector}),
            Duration::from_secs(10),
        )
        .await;
    }

    /// Waits until the client has received its welcome frame.
    async fn wait_open(&mut self) {
        self.wait_for(
            "document.body.dataset.state === 'open'",
            Duration::from_secs(20),
        )
        .await;
    }

    async fn close(mut self) {
        self.command(json!({"op": "close"}), Duration::from_secs(10))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Shown only when the test fails.
        eprintln!("browser log:\n{}", self.logs());
    }
}

/// Runs `wsgw send` to the page's identity and returns the messageId it prints. With `message_id`, the message
/// keeps that id, as a publisher's retry does.
async fn wsgw_send(
    env: &TestEnv,
    identity: &Identity,
    (business_type, message_type): (&str, &str),
    content: Value,
    message_id: Option<&str>,
) -> String {
    let mut command = env.wsgw();
    command
        .args(["send", "--to", &identity.unique_id])
        .args(["--to-client-type", &identity.client_type])
        .args(["--business-type", business_type])
        .args(["--message-type", message_type])
        .args(["--content", &content.to_string()]);
    if let Some(message_id) = message_id {
        command.args(["--message-id", message_id]);
    }
    let output = tokio::process::Command::from(command)
        .output()
        .await
        .expect("run wsgw send");
    assert!(
        output.status.success(),
        "wsgw send failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8 output")
        .trim()
        .to_owned()
}

/// Returns the messageIds in the page's `window.received`, in the order the handler saw them.
async fn received_ids(browser: &mut Browser) -> Vec<String> {
    let value = browser
        .eval("window.received.map((message) => message.messageId)")
        .await;
    serde_json::from_value(value).expect("a list of messageIds")
}

/// Sends a GET request and returns the status line, the headers (lowercase names) and the body.
async fn http_get(address: SocketAddr, path: &str) -> (String, Vec<(String, String)>, String) {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the gateway");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write the request");
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .await
        .expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    let status = lines.next().expect("a status line").to_owned();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

#[tokio::test]
async fn client_library_served_without_api_key() {
    let env = TestEnv::new();
    let gateway = env.gateway(BrokerKind::Memory, |_| {}).await;

    let (status, headers, body) = http_get(gateway.address, "/client/v1/wsgw.js").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        header_value(&headers, "content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(
        header_value(&headers, "cache-control"),
        Some("public, max-age=300")
    );
    assert_eq!(
        header_value(&headers, "access-control-allow-origin"),
        Some("*"),
        "pages on other origins import the module, which needs CORS"
    );
    assert_eq!(body, include_str!("../clients/js/wsgw.js"));

    let (status, headers, body) = http_get(gateway.address, "/client/v1/wsgw.d.ts").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        header_value(&headers, "content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(body, include_str!("../clients/js/wsgw.d.ts"));

    let (status, _, body) = http_get(gateway.address, "/client/v2/wsgw.js").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(body.contains("/client/v1/wsgw.js"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_qr_refresh_from_wsgw_send() {
    require_browser!();
    let _browser_slot = ONE_BROWSER.lock().await;
    let env = TestEnv::new();
    let port = free_port();
    let _gateway = serve_on(&env, port, "node-a");
    let gateway_url = format!("http://127.0.0.1:{port}");
    let backend = Backend::start(gateway_url.clone()).await;
    let identity = env.identity("charger");

    let mut browser = Browser::open(&backend.page_url(&gateway_url, &identity)).await;
    browser.wait_open().await;
    let message_id = wsgw_send(
        &env,
        &identity,
        ("qrcode", "QR_REFRESH"),
        json!({"qr": "https://pay.example.com/qr/8812-一"}),
        None,
    )
    .await;

    let qr_text = browser
        .wait_for(
            &format!(
                "document.getElementById('qr').dataset.messageId === {message_id:?} \
                 && document.getElementById('qr').textContent"
            ),
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(qr_text, json!("https://pay.example.com/qr/8812-一"));
    let received = browser.eval("window.received").await;
    assert_eq!(received.as_array().map(Vec::len), Some(1), "{received}");
    assert_eq!(received[0]["messageId"], json!(message_id));
    assert_eq!(received[0]["messageType"], json!("QR_REFRESH"));
    assert_eq!(received[0]["toUniqueId"], json!(identity.unique_id));
    assert_eq!(received[0]["toClientType"], json!("charger"));
    assert_eq!(
        backend.token_requests.load(Ordering::SeqCst),
        1,
        "one connection, one token"
    );

    browser.close().await;
    assert_eq!(
        env.settled_message_count(&env.mailbox(&identity)).await,
        0,
        "the page acked the message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_gets_all_messages_across_gateway_restart() {
    require_browser!();
    let _browser_slot = ONE_BROWSER.lock().await;
    let env = TestEnv::new();
    let port = free_port();
    let mut gateway = serve_on(&env, port, "node-a");
    let gateway_url = format!("http://127.0.0.1:{port}");
    let backend = Backend::start(gateway_url.clone()).await;
    let identity = env.identity("charger");

    let config = env.config(BrokerKind::Rabbit);
    let broker = env.broker(BrokerKind::Rabbit, &config).await;
    let queue = env.business_queue("charging");
    let mut inbound = broker
        .consume_inbound(&queue, "charging.START_CHARGING")
        .await
        .expect("bind the business queue");

    let mut browser = Browser::open(&backend.page_url(&gateway_url, &identity)).await;
    browser.wait_open().await;

    // Messages 0-6 go to a running gateway, 7-13 while no gateway runs (they wait in the mailbox in RabbitMQ),
    // and 14-19 after the restart on the same port. Messages 3, 10 and 16 are published twice under the same
    // messageId, as a publisher's retry does, so the mailbox contains duplicates.
    let mut sent = Vec::new();
    for seq in 0..20 {
        if seq == 7 {
            gateway.kill();
        }
        if seq == 10 {
            // The page sends while no gateway runs; the client resends after it reconnects.
            browser.click("#start").await;
        }
        if seq == 14 {
            gateway = serve_on(&env, port, "node-b");
        }
        let route = ("payment", "PAYMENT_RESULT");
        let content = json!({"seq": seq, "status": "PAID", "amount": "12.50", "orderId": "8812"});
        let message_id = wsgw_send(&env, &identity, route, content.clone(), None).await;
        if [3, 10, 16].contains(&seq) {
            wsgw_send(&env, &identity, route, content, Some(&message_id)).await;
        }
        sent.push(message_id);
    }

    browser
        .wait_for("window.received.length >= 20", Duration::from_secs(45))
        .await;
    // Give late duplicates time to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = received_ids(&mut browser).await;
    assert_eq!(received, sent, "all 20 messages, each once, in send order");
    let sequence = browser
        .eval("window.received.map((message) => message.content.seq)")
        .await;
    assert_eq!(sequence, json!((0..20).collect::<Vec<_>>()));

    let nodes = browser
        .eval("window.clientEvents.filter((e) => e.event === 'open').map((e) => e.node)")
        .await;
    assert_eq!(nodes[0], json!("node-a"));
    assert_eq!(
        nodes.as_array().and_then(|nodes| nodes.last()),
        Some(&json!("node-b")),
        "the page reconnected to the restarted gateway: {nodes}"
    );
    let closes = browser
        .eval("window.clientEvents.filter((e) => e.event === 'close').map((e) => e.code)")
        .await;
    assert_eq!(
        closes[0],
        json!(1006),
        "the kill drops the connection without a close frame"
    );
    assert!(
        backend.token_requests.load(Ordering::SeqCst) >= 2,
        "every connect fetched a fresh token"
    );
    let payment = browser
        .eval("document.getElementById('payment').dataset.messageId")
        .await;
    assert_eq!(payment, json!(sent[19]), "the page shows the last payment");

    let result = browser
        .wait_for("window.sendResults[0]", Duration::from_secs(20))
        .await;
    let send_id = result["messageId"]
        .as_str()
        .unwrap_or_else(|| panic!("the send made during the outage should resolve, got {result}"));
    let delivery = common::next_delivery(&mut inbound).await;
    assert_eq!(common::envelope_of(&delivery).id(), send_id);
    delivery.acker.ack().await.expect("ack the delivery");

    browser.close().await;
    assert_eq!(
        env.settled_message_count(&env.mailbox(&identity)).await,
        0,
        "the page acked every message, duplicates included"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_send_reaches_business_queue() {
    require_browser!();
    let _browser_slot = ONE_BROWSER.lock().await;
    let env = TestEnv::new();
    let port = free_port();
    let _gateway = serve_on(&env, port, "node-a");
    let gateway_url = format!("http://127.0.0.1:{port}");
    let backend = Backend::start(gateway_url.clone()).await;
    let identity = env.identity("charger");

    // The business service's queue, bound before the page sends, so the message is routable.
    let config = env.config(BrokerKind::Rabbit);
    let broker = env.broker(BrokerKind::Rabbit, &config).await;
    let queue = env.business_queue("charging");
    let mut inbound = broker
        .consume_inbound(&queue, "charging.START_CHARGING")
        .await
        .expect("bind the business queue");

    let mut browser = Browser::open(&backend.page_url(&gateway_url, &identity)).await;
    browser.wait_open().await;
    browser.click("#start").await;
    let result = browser
        .wait_for("window.sendResults[0]", Duration::from_secs(20))
        .await;
    let message_id = result["messageId"]
        .as_str()
        .unwrap_or_else(|| panic!("send() should resolve with a messageId, got {result}"))
        .to_owned();
    let status_id = browser
        .eval("document.getElementById('send-status').dataset.messageId")
        .await;
    assert_eq!(status_id, json!(message_id));

    let delivery = common::next_delivery(&mut inbound).await;
    let envelope = common::envelope_of(&delivery);
    assert_eq!(envelope.id(), message_id);
    assert_eq!(envelope.send_type, SendType::ClientToServer);
    assert_eq!(envelope.business_type, "charging");
    assert_eq!(envelope.message_type, "START_CHARGING");
    assert_eq!(
        envelope.from_unique_id.as_deref(),
        Some(identity.unique_id.as_str()),
        "the gateway stamps the page's identity"
    );
    assert_eq!(envelope.from_client_type.as_deref(), Some("charger"));
    assert_eq!(envelope.content["postId"], json!(identity.unique_id));
    assert!(
        envelope.timestamp.is_some(),
        "the gateway stamps a timestamp"
    );
    delivery.acker.ack().await.expect("ack the delivery");

    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_ignores_stale_qr_refresh() {
    require_browser!();
    let _browser_slot = ONE_BROWSER.lock().await;
    let env = TestEnv::new();
    let port = free_port();
    let _gateway = serve_on(&env, port, "node-a");
    let gateway_url = format!("http://127.0.0.1:{port}");
    let backend = Backend::start(gateway_url.clone()).await;
    let identity = env.identity("charger");

    let mut browser = Browser::open(&backend.page_url(&gateway_url, &identity)).await;
    browser.wait_open().await;

    // The newer QR code is sent first; the older one, stamped a minute earlier, arrives after it.
    let publisher = env.publisher().await;
    let newer = common::envelope_to(&identity, json!({"qr": "QR-NEW"}));
    let mut older = common::envelope_to(&identity, json!({"qr": "QR-OLD"}));
    older.timestamp = newer.timestamp.map(|timestamp| timestamp - 60_000);
    let mut ids = Vec::new();
    for envelope in [newer, older] {
        let publication = wsgw::broker::Publication::new(envelope).expect("routable");
        ids.push(
            publisher
                .publish(&publication)
                .await
                .expect("publish confirmed")
                .message_id,
        );
    }
    let (newer_id, older_id) = (&ids[0], &ids[1]);

    let stale = browser
        .wait_for(
            "window.staleMessages.length > 0 && window.staleMessages.map((m) => m.messageId)",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(stale, json!([older_id]));
    let qr = browser
        .eval("[document.getElementById('qr').textContent, document.getElementById('qr').dataset.messageId]")
        .await;
    assert_eq!(
        qr,
        json!(["QR-NEW", newer_id]),
        "the older QR code is not shown"
    );
    assert_eq!(received_ids(&mut browser).await, vec![newer_id.clone()]);
    let stale_events = browser
        .eval("window.clientEvents.filter((e) => e.event === 'stale').map((e) => e.messageId)")
        .await;
    assert_eq!(stale_events, json!([older_id]));

    browser.close().await;
    assert_eq!(
        env.settled_message_count(&env.mailbox(&identity)).await,
        0,
        "the stale message was acked, not left in the mailbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_send_rejected_when_unroutable() {
    require_browser!();
    let _browser_slot = ONE_BROWSER.lock().await;
    let env = TestEnv::new();
    let port = free_port();
    let _gateway = serve_on(&env, port, "node-a");
    let gateway_url = format!("http://127.0.0.1:{port}");
    let backend = Backend::start(gateway_url.clone()).await;
    let identity = env.identity("charger");

    // No business queue is bound for charging.START_CHARGING, so the gateway replies with UNROUTABLE.
    let mut browser = Browser::open(&backend.page_url(&gateway_url, &identity)).await;
    browser.wait_open().await;
    browser.click("#start").await;
    let result = browser
        .wait_for("window.sendResults[0]", Duration::from_secs(20))
        .await;
    assert_eq!(result["error"], json!("UNROUTABLE"), "{result}");
    assert_eq!(result.get("messageId"), None, "{result}");
    let status = browser
        .eval("document.getElementById('send-status').textContent")
        .await;
    assert!(
        status
            .as_str()
            .is_some_and(|text| text.contains("UNROUTABLE")),
        "the page shows the failure: {status}"
    );
    let errors = browser
        .eval("window.clientEvents.filter((e) => e.event === 'error')")
        .await;
    assert_eq!(
        errors,
        json!([]),
        "an error frame of a pending send rejects that send and is no error event"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_stops_when_replaced() {
    require_browser!();
    let _browser_slot = ONE_BROWSER.lock().await;
    let env = TestEnv::new();
    let port = free_port();
    let gateway = serve_on(&env, port, "node-a");
    let gateway_url = format!("http://127.0.0.1:{port}");
    let backend = Backend::start(gateway_url.clone()).await;
    let identity = env.identity("charger");

    let mut browser = Browser::open(&backend.page_url(&gateway_url, &identity)).await;
    browser.wait_open().await;
    let newer = wsgw::client::Client::connect(&env.connection_url(&gateway, &identity))
        .await
        .expect("a second connection of the same identity");

    let state = browser
        .wait_for(
            "document.body.dataset.state !== 'open' && document.body.dataset.state",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(state, json!("replaced"));
    let closes = browser
        .eval("window.clientEvents.filter((e) => e.event === 'close').map((e) => e.code)")
        .await;
    assert_eq!(closes, json!([4001]));
    // A reconnect would follow within backoff.initialMs (500 ms) and fetch a token.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        browser.eval("window.wsgwClient.state").await,
        json!("stopped")
    );
    let reconnects = browser
        .eval("window.clientEvents.filter((e) => e.event === 'reconnecting').length")
        .await;
    assert_eq!(reconnects, json!(0));
    assert_eq!(backend.token_requests.load(Ordering::SeqCst), 1);

    browser.close().await;
    newer.close().await.expect("close the newer connection");
}

/// Starts a second client in the page, for `identity`, with short backoff and kick delays. Its events go to
/// `window.custom`: `{event, at, ...}` with `at` in ms since the epoch.
async fn start_custom_client(browser: &mut Browser, gateway_url: &str, identity: &Identity) {
    let script = format!(
        r#"(async () => {{
            window.custom = [];
            const {{ WsgwClient }} = await import(new URL("/client/v1/wsgw.js", {gateway_url:?}).href);
            const client = new WsgwClient({{
                tokenUrl: "/api/ws-token?post={unique_id}",
                backoff: {{ initialMs: 100, maxMs: 300, kickedMs: 1000 }},
            }});
            const record = (event, details) => window.custom.push({{ event, at: Date.now(), ...details }});
            client.on("open", (welcome) => record("open", {{ sessionId: welcome.sessionId }}));
            client.on("close", (info) => record("close", info));
            client.on("reconnecting", (info) => record("reconnecting", info));
            client.on("error", (error) => record("error", {{ code: error.code, messageId: error.messageId }}));
            client.on("message", (message, meta) => {{
                record("message", {{ messageId: message.messageId, redelivered: meta.redelivered }});
                if (message.content && message.content.failFirst && !meta.redelivered) {{
                    throw new Error("printer offline");
                }}
            }});
            client.start();
            window.customClient = client;
            return true;
        }})()"#,
        unique_id = identity.unique_id,
    );
    browser.eval(&script).await;
}

/// Returns the custom client's events named `event`, oldest first.
async fn custom_events(browser: &mut Browser, event: &str) -> Vec<Value> {
    let value = browser
        .eval(&format!(
            "window.custom.filter((e) => e.event === {event:?})"
        ))
        .await;
    serde_json::from_value(value).expect("a list of events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_kick_delay() {
    require_browser!();
    let _browser_slot = ONE_BROWSER.lock().await;
    let env = TestEnv::new();
    let port = free_port();
    let _gateway = serve_on(&env, port, "node-a");
    let gateway_url = format!("http://127.0.0.1:{port}");
    let backend = Backend::start(gateway_url.clone()).await;
    let page_identity = env.identity("charger");
    let identity = env.identity("charger");

    let mut browser = Browser::open(&backend.page_url(&gateway_url, &page_identity)).await;
    browser.wait_open().await;
    start_custom_client(&mut browser, &gateway_url, &identity).await;
    let session_id = browser
        .wait_for(
            "window.custom.find((e) => e.event === 'open')?.sessionId",
            Duration::from_secs(20),
        )
        .await;
    let session_id = session_id.as_str().expect("a sessionId").to_owned();

    let output = tokio::process::Command::from(env.wsgw())
        .args(["sessions", "--kick", &session_id])
        .output()
        .await
        .expect("run wsgw sessions --kick");
    assert!(
        output.status.success(),
        "wsgw sessions --kick failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    browser
        .wait_for(
            "window.custom.filter((e) => e.event === 'open').length === 2",
            Duration::from_secs(20),
        )
        .await;
    let closes = custom_events(&mut browser, "close").await;
    assert_eq!(closes.len(), 1, "{closes:?}");
    assert_eq!(closes[0]["code"], json!(4002));
    assert_eq!(closes[0]["kicked"], json!(true));
    assert_eq!(closes[0]["willReconnect"], json!(true));
    let reconnects = custom_events(&mut browser, "reconnecting").await;
    assert_eq!(reconnects.len(), 1, "{reconnects:?}");
    assert_eq!(
        reconnects[0]["delayMs"],
        json!(1000),
        "a kick waits backoff.kickedMs, which is more than maxMs"
    );
    let opens = custom_events(&mut browser, "open").await;
    let closed_at = closes[0]["at"].as_u64().expect("a close time");
    let reopened_at = opens[1]["at"].as_u64().expect("an open time");
    let waited = reopened_at - closed_at;
    assert!(waited >= 1000, "reconnected {waited} ms after the kick");
    assert_ne!(opens[1]["sessionId"], json!(session_id), "a new session");

    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rejects_when_handler_throws() {
    require_browser!();
    let _browser_slot = ONE_BROWSER.lock().await;
    let env = TestEnv::new();
    let port = free_port();
    let _gateway = serve_on(&env, port, "node-a");
    let gateway_url = format!("http://127.0.0.1:{port}");
    let backend = Backend::start(gateway_url.clone()).await;
    let page_identity = env.identity("charger");
    let identity = env.identity("charger");

    let mut browser = Browser::open(&backend.page_url(&gateway_url, &page_identity)).await;
    browser.wait_open().await;
    start_custom_client(&mut browser, &gateway_url, &identity).await;
    browser
        .wait_for(
            "window.custom.some((e) => e.event === 'open')",
            Duration::from_secs(20),
        )
        .await;

    // The handler throws on the first delivery, so the client rejects it and the gateway pushes it again.
    let message_id = wsgw_send(
        &env,
        &identity,
        ("printing", "PRINT_RECEIPT"),
        json!({"failFirst": true}),
        None,
    )
    .await;
    browser
        .wait_for(
            "window.custom.filter((e) => e.event === 'message').length >= 2",
            Duration::from_secs(20),
        )
        .await;
    let messages = custom_events(&mut browser, "message").await;
    let deliveries: Vec<(Value, Value)> = messages
        .iter()
        .map(|event| (event["messageId"].clone(), event["redelivered"].clone()))
        .collect();
    assert_eq!(
        deliveries,
        vec![
            (json!(message_id), json!(false)),
            (json!(message_id), json!(true))
        ]
    );
    let errors = custom_events(&mut browser, "error").await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["code"], json!("HANDLER_FAILED"));
    assert_eq!(errors[0]["messageId"], json!(message_id));

    browser.eval("window.customClient.stop()").await;
    browser.close().await;
    assert_eq!(
        env.settled_message_count(&env.mailbox(&identity)).await,
        0,
        "the second delivery was acked"
    );
}
