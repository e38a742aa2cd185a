//! `wsgw listen`: connects as a client, prints each message, then acks it.
//!
//! A message is acked only after its line was written to stdout, so a message that could not be printed stays
//! in the mailbox. On a broken pipe the command stops and exits 0.

use tracing::info;

use crate::cli::{GlobalArgs, ListenArgs, OutputFormat};
use crate::client::{Client, Event, IncomingMessage};
use crate::domain::frame::close_code;
use crate::exit::{CliError, ExitCode};
use crate::output::{self, WriteOutcome};

pub async fn run(global: &GlobalArgs, args: &ListenArgs) -> Result<(), CliError> {
    let tls = super::client_tls(&args.tls)?;
    let url = super::connection_url(global, &args.identity, &tls).await?;
    let mut client = Client::connect_with_tls(&url, &tls)
        .await
        .map_err(super::client_error)?;
    info!(
        session_id = %client.welcome.session_id,
        node = %client.welcome.node,
        "connected"
    );
    let format = output::resolve(global.output);
    let mut received = 0u64;
    while args.count.is_none_or(|count| received < count) {
        let event = client.next_event().await.map_err(super::client_error)?;
        match event {
            Event::Message(message) => {
                let line = match format {
                    OutputFormat::Json => json_line(&message),
                    OutputFormat::Table => text_line(&message),
                };
                if let WriteOutcome::BrokenPipe = output::print_line(&line)? {
                    // The reader is gone: this message stays unacked and comes again on the next connection.
                    let _ = client.close().await;
                    return Ok(());
                }
                if !args.no_ack {
                    client
                        .ack(message.envelope.id())
                        .await
                        .map_err(super::client_error)?;
                }
                received += 1;
            }
            Event::Error {
                code,
                reason,
                message_id,
            } => {
                eprintln!(
                    "wsgw: the gateway reported {code:?}: {reason} (messageId {message_id:?})"
                );
            }
            Event::Ack { .. } => {}
            Event::Closed { code, reason } => {
                let exit = if code == Some(close_code::REPLACED) {
                    ExitCode::Failure
                } else {
                    ExitCode::Unavailable
                };
                return Err(CliError::msg(
                    exit,
                    format!(
                        "the gateway closed the connection (code {}): {reason}",
                        code.map_or("none".to_owned(), |code| code.to_string())
                    ),
                ));
            }
        }
    }
    let _ = client.close().await;
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
