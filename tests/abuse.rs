//! Abusive and slow clients against the real binary on RabbitMQ: a flood of bad frames must not disturb a
//! healthy client, and a client that stops reading is disconnected without losing its messages.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use wsgw::client::Client;
use wsgw::domain::{Identity, TokenSigner};

use common::{SECRET, Server, TestEnv, next_message};

/// Reads the resident set size of a process, in bytes; None once the process is gone.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some(kb * 1024)
}

/// Samples a process's RSS every 100 ms until dropped; `peak` is the largest sample.
struct RssProbe {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssProbe {
    fn start(pid: u32) -> RssProbe {
        let peak = Arc::new(AtomicU64::new(
            rss_bytes(pid).expect("VmRSS of a running process"),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let (sampled, stopped) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                if let Some(bytes) = rss_bytes(pid) {
                    sampled.fetch_max(bytes, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssProbe { peak, stop }
    }

    fn peak_mib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed) / (1024 * 1024)
    }
}

impl Drop for RssProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn url_for(server: &Server, identity: &Identity) -> String {
    let signer = TokenSigner::new(SECRET.as_bytes()).expect("secret");
    let token = signer.mint(
        identity,
        &[],
        &[],
        Duration::from_secs(60),
        SystemTime::now(),
    );
    format!("ws://{}/socket/{token}", server.address)
}

/// xorshift64: cheap, seeded randomness for garbage frames.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Returns a bad frame of one of many kinds.
    fn frame(&mut self) -> Message {
        let pick = self.next() % 12;
        let len = (self.next() % 2048) as usize;
        match pick {
            0 => Message::text("{\"type\":\"send\",\"message\":"),
            1 => Message::text(String::from_utf8_lossy(&self.bytes(len)).into_owned()),
            2 => Message::binary(self.bytes(len)),
            3 => Message::text("x".repeat(70 * 1024)),
            4 => Message::Frame(Frame::message(
                Bytes::from(vec![0x7b, 0xc3, 0x28, 0x7d]),
                OpCode::Data(Data::Text),
                true,
            )),
            5 => Message::text(format!("{}{}", "[".repeat(1000), "]".repeat(1000))),
            6 => Message::text(
                r#"{"type":"send","message":{"sendType":"CLIENT_TO_SERVER","messageType":"m","businessType":"b","content":1e99999}}"#,
            ),
            7 => Message::text(r#"{"type":"ack","messageId":{"$gt":""}}"#),
            8 => Message::Frame(Frame::from_payload(
                FrameHeader {
                    opcode: OpCode::Control(Control::Reserved(0xc)),
                    ..FrameHeader::default()
                },
                Bytes::new(),
            )),
            9 => Message::text(format!(r#"{{"type":"ack","messageId":"{}"}}"#, self.next())),
            10 => Message::text(
                r#"{"type":"send","message":{"sendType":"SERVER_TO_CLIENT","messageType":"m","businessType":"b","toUniqueId":"victim"}}"#,
            ),
            _ => Message::text(format!(
                r#"{{"type":"send","message":{{"sendType":"CLIENT_TO_CLIENT","messageType":"m","businessType":"b","toUniqueId":"{}","toClientType":"h5"}}}}"#,
                "u".repeat(len)
            )),
        }
    }
}

/// Runs one abusive client: it connects, floods bad frames and reconnects whenever the gateway closes it.
async fn abuse(
    server_address: String,
    identity: Identity,
    seed: u64,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) {
    let signer = TokenSigner::new(SECRET.as_bytes()).expect("secret");
    let mut noise = Noise(seed | 1);
    while !stop.load(Ordering::Relaxed) {
        let token = signer.mint(
            &identity,
            &[],
            &[],
            Duration::from_secs(60),
            SystemTime::now(),
        );
        let mut request = format!("ws://{server_address}/socket/{token}")
            .into_client_request()
            .expect("request");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "wsgw.v1".parse().expect("value"));
        let Ok((socket, _)) = tokio_tungstenite::connect_async(request).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (mut sink, mut stream) = socket.split();
        // Replies are read and thrown away, so the flood is limited by the gateway, not by full buffers.
        let reader = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        while !stop.load(Ordering::Relaxed) {
            if sink.send(noise.frame()).await.is_err() {
                break;
            }
            sent.fetch_add(1, Ordering::Relaxed);
        }
        reader.abort();
    }
}

/// 100 clients send malformed, oversized and random frames at full speed while one healthy client receives
/// 1,000 messages: it gets all of them in order, the gateway keeps running, and its RSS stays under 256 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_bad_frames_does_not_disturb_a_healthy_client() {
    require_rabbitmq!();
    const BOUND_MIB: u64 = 256;
    let env = TestEnv::new();
    let server = env.serve("abuse");
    let probe = RssProbe::start(server.child.id());
    let healthy_identity = env.identity("h5");
    let mut healthy = Client::connect(&url_for(&server, &healthy_identity))
        .await
        .expect("healthy client connects");

    // The messages wait in the mailbox; the client receives them while the flood runs.
    let publisher = env.publisher().await;
    for seq in 0..1000u32 {
        common::publish_to(
            &publisher,
            &healthy_identity,
            json!({"seq": seq, "note": "支付成功"}),
        )
        .await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut abusers = Vec::new();
    for seed in 0..100u64 {
        abusers.push(tokio::spawn(abuse(
            server.address.to_string(),
            env.identity("h5"),
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) + 1,
            stop.clone(),
            sent.clone(),
        )));
    }

    let started = Instant::now();
    for expected in 0..1000u64 {
        let event = tokio::time::timeout(Duration::from_secs(60), common::next_event(&mut healthy))
            .await
            .unwrap_or_else(|_| panic!("message {expected} did not arrive within 60 s"));
        let wsgw::client::Event::Message(message) = event else {
            let _ = std::fs::write("/tmp/abuse-logs.txt", server.all_logs());
            panic!("expected message {expected}, got {event:?}");
        };
        assert_eq!(message.envelope.content["seq"], json!(expected), "in order");
        assert_eq!(message.envelope.content["note"], json!("支付成功"));
        healthy.ack(message.envelope.id()).await.expect("ack");
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for abuser in abusers {
        let _ = tokio::time::timeout(Duration::from_secs(10), abuser).await;
    }
    let bad_frames = sent.load(Ordering::Relaxed);
    eprintln!(
        "1,000 messages in {elapsed:?} with {bad_frames} bad frames sent; gateway peak RSS {} MiB",
        probe.peak_mib()
    );
    assert!(
        bad_frames > 10_000,
        "the flood was too small: {bad_frames} frames"
    );
    assert!(
        probe.peak_mib() < BOUND_MIB,
        "gateway RSS peaked at {} MiB, above {BOUND_MIB} MiB",
        probe.peak_mib()
    );
    let mut server = server;
    assert!(
        server.child.try_wait().expect("wait").is_none(),
        "the gateway exited"
    );
    let logs = server.all_logs();
    assert!(!logs.contains("panicked"), "the gateway panicked");
    // Sessions ending by the thousand must not take the healthy session's consumer down with them.
    for symptom in ["Connection error", "mailbox consumer ended"] {
        let lines: Vec<&str> = logs.lines().filter(|line| line.contains(symptom)).collect();
        assert!(lines.is_empty(), "{symptom}: {lines:?}");
    }
}

/// A client that stops reading while 10,000 messages are pushed to it is disconnected within the write
/// deadline; the gateway's memory stays bounded; every message arrives after the client reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_disconnected_and_loses_nothing() {
    require_rabbitmq!();
    const MESSAGES: u32 = 10_000;
    const BOUND_MIB: u64 = 256;
    let write_timeout = Duration::from_secs(2);
    let env = TestEnv::new()
        .with_env("WSGW_SESSION_PENDING_ACK_WINDOW", "4000")
        .with_env("WSGW_SESSION_WRITE_TIMEOUT", "2s")
        .with_env("WSGW_SESSION_PING_INTERVAL", "10m");
    let server = env.serve("slow");
    let probe = RssProbe::start(server.child.id());
    let identity = env.identity("h5");

    // Connect, read the welcome, then never read again.
    let mut request = url_for(&server, &identity)
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "wsgw.v1".parse().expect("value"));
    let (mut stalled, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect");
    let welcome = stalled.next().await.expect("welcome").expect("frame");
    assert!(welcome.to_text().expect("text").contains("welcome"));

    let padding = "付".repeat(1_400); // about 4 KB of UTF-8 per message
    // Ten batches of persistent messages at once can keep a confirm waiting longer than the default 5 s.
    let amqp = wsgw::config::AmqpConfig {
        prefix: env.prefix.clone(),
        publish_timeout: Duration::from_secs(60),
        ..wsgw::config::AmqpConfig::default()
    };
    let publisher = Arc::new(
        wsgw::broker::rabbit::Publisher::connect(
            &common::amqp_url(),
            &amqp,
            &env.mailbox_config(),
            "slow client test publisher",
        )
        .await
        .expect("publisher connects"),
    );
    let mut batches = Vec::new();
    for batch in 0..10u32 {
        let publisher = publisher.clone();
        let identity = identity.clone();
        let padding = padding.clone();
        batches.push(async move {
            for seq in batch * 1000..(batch + 1) * 1000 {
                // One publisher per batch keeps each batch in order; batches interleave.
                common::publish_to(
                    &publisher,
                    &identity,
                    json!({"seq": seq, "padding": padding}),
                )
                .await;
            }
        });
    }
    futures_util::future::join_all(batches).await;
    let published_at = Instant::now();

    let line = server.wait_for_log(&["slow client"]).await;
    let disconnected_after = published_at.elapsed();
    eprintln!(
        "disconnected {disconnected_after:?} after the last publish; gateway peak RSS {} MiB; log: {line}",
        probe.peak_mib()
    );
    assert!(
        disconnected_after < write_timeout + Duration::from_secs(5),
        "the stalled client was disconnected {disconnected_after:?} after the last publish"
    );
    assert!(
        probe.peak_mib() < BOUND_MIB,
        "gateway RSS peaked at {} MiB, above {BOUND_MIB} MiB",
        probe.peak_mib()
    );
    drop(stalled);

    // Reconnect and receive every message, each exactly once per seq.
    let mut client = Client::connect(&url_for(&server, &identity))
        .await
        .expect("reconnect");
    let mut seen = vec![false; MESSAGES as usize];
    // Each batch was published in order by one task, so within a batch messages arrive in order.
    let mut last_in_batch: Vec<Option<usize>> = vec![None; 10];
    for _ in 0..MESSAGES {
        let message = next_message(&mut client).await;
        let seq = message.envelope.content["seq"].as_u64().expect("seq") as usize;
        assert!(!seen[seq], "seq {seq} arrived twice");
        seen[seq] = true;
        let batch = seq / 1000;
        assert!(
            last_in_batch[batch].is_none_or(|last| last < seq),
            "seq {seq} arrived after {:?} of its batch",
            last_in_batch[batch]
        );
        last_in_batch[batch] = Some(seq);
        client.ack(message.envelope.id()).await.expect("ack");
    }
    assert!(seen.iter().all(|seen| *seen), "every message arrived");
    client.close().await.expect("close");
    let mailbox = env.mailbox(&identity);
    assert_eq!(env.settled_message_count(&mailbox).await, 0);
}
