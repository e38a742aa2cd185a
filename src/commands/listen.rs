//! `wsgw listen`: connects as a client, prints each message, then acks it.
//!
//! A message is acked only after its line was written to stdout, so a message that could not be printed stays
//! in the mailbox. On a broken pipe the command stops and exits 0. The command reconnects with a fresh token
//! after a lost connection, and drops a message delivered again after it was acked.

use std::sync::Arc;

use tracing::{info, warn};

use crate::cli::{GlobalArgs, ListenArgs, OutputFormat};
use crate::client::{
    Client, ClientError, ClientEvent, ClientOptions, IncomingMessage, ReliableClient, UrlSource,
};
use crate::exit::{CliError, ExitCode};
use crate::output::{self, WriteOutcome};

/// Connects, then prints messages until `--count` is reached, reconnecting with a fresh token whenever the
/// connection drops. A failure of the first connect ends the command with its error.
pub async fn run(global: &GlobalArgs, args: &ListenArgs) -> Result<(), CliError> {
    let tls = super::client_tls(&args.tls)?;
    let url = super::connection_url(global, &args.identity, &tls).await?;
    let client = Client::connect_with_tls(&url, &tls)
        .await
        .map_err(super::client_error)?;
    let urls: UrlSource = {
        let (global, identity, tls) = (
            Arc::new(global.clone()),
            Arc::new(args.identity.clone()),
            tls.clone(),
        );
        Arc::new(move || {
            let (global, identity, tls) = (global.clone(), identity.clone(), tls.clone());
            Box::pin(async move {
                super::connection_url(&global, &identity, &tls)
                    .await
                    .map_err(|error| ClientError::Connection(error.to_string()))
            })
        })
    };
    let options = ClientOptions {
        tls,
        ..ClientOptions::default()
    };
    let (handle, mut events) = ReliableClient::start_connected(client, urls, options);
    let format = output::resolve(global.output);
    let mut received = 0u64;
    while args.count.is_none_or(|count| received < count) {
        let Some(event) = events.recv().await else {
            break;
        };
        match event {
            ClientEvent::Open(welcome) => {
                info!(session_id = %welcome.session_id, node = %welcome.node, "connected");
            }
            ClientEvent::Message(message) => {
                let line = match format {
                    OutputFormat::Json => json_line(&message),
                    OutputFormat::Table => text_line(&message),
                };
                if let WriteOutcome::BrokenPipe = output::print_line(&line)? {
                    // The reader is gone: this message stays unacked and comes again on the next connection.
                    handle.stop().await;
                    return Ok(());
                }
                if !args.no_ack {
                    handle.ack(message.envelope.id()).await;
                }
                received += 1;
            }
            ClientEvent::Stale(message) => {
                info!(message_id = %message.envelope.id(), "skipped a stale message");
            }
            ClientEvent::Error {
                code,
                reason,
                message_id,
            } => {
                eprintln!(
                    "wsgw: the gateway reported {code:?}: {reason} (messageId {message_id:?})"
                );
            }
            ClientEvent::Closed { code, reason } => {
                warn!(?code, %reason, "the connection closed");
            }
            ClientEvent::Reconnecting {
                attempt,
                delay,
                reason,
            } => {
                warn!(attempt, ?delay, %reason, "reconnecting");
            }
            ClientEvent::Replaced { reason } => {
                return Err(CliError::msg(
                    ExitCode::Failure,
                    format!(
                        "another connection of this identity replaced this one ({reason}); not reconnecting"
                    ),
                ));
            }
        }
    }
    handle.stop().await;
    Ok(())
}

fn json_line(message: &IncomingMessage) -> String {
    serde_json::json!({
        "redelivered": message.redelivered,
        "replayCount": message.replay_count,
        "message": message.envelope,
    })
    .to_string()
}

fn text_line(message: &IncomingMessage) -> String {
    let envelope = &message.envelope;
    let time = envelope
        .timestamp
        .map(|ms| {
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        })
        .unwrap_or_else(|| "-".to_owned());
    let from = match (&envelope.from_unique_id, &envelope.from_client_type) {
        (Some(id), Some(kind)) => format!("{id}/{kind}"),
        (Some(id), None) => id.clone(),
        _ => "-".to_owned(),
    };
    let redelivered = if message.redelivered {
        " (redelivered)"
    } else {
        ""
    };
    format!(
        "{time}  {}/{}  from {from}  id {}{redelivered}\n  {}",
        envelope.business_type,
        envelope.message_type,
        envelope.id(),
        envelope.content
    )
}
