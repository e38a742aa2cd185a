//! `wsgw send`: publishes one message with a broker confirm and prints its messageId.
//!
//! With an AMQP URL it publishes straight to RabbitMQ; otherwise it posts to the gateway's HTTP API, which
//! publishes with the same confirm. `--wait` then waits for the delivery receipt.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::broker::rabbit::{BrokerNodes, Publisher};
use crate::broker::{Publication, Published, Receipt};
use crate::cli::{GlobalArgs, OutputFormat, SendArgs};
use crate::client::ApiAnswer;
use crate::credentials;
use crate::domain::{Destination, Envelope, EnvelopeError};
use crate::exit::{CliError, ExitCode};
use crate::http_client;
use crate::output;

/// Maximum size of `--content` or `--content-file`, in bytes.
const MAX_CONTENT_BYTES: u64 = 4 * 1024 * 1024;

pub async fn run(global: &GlobalArgs, args: &SendArgs) -> Result<(), CliError> {
    let config = super::load_config(global)?;
    let envelope = build_envelope(args)?;
    let publication =
        Publication::new(envelope).map_err(|error| CliError::new(ExitCode::DataError, error))?;
    if args.wait.is_some() && matches!(publication.destination, Destination::Broadcast { .. }) {
        return Err(CliError::msg(
            ExitCode::Usage,
            "--wait needs a direct message (--to): broadcasts are at-most-once and have no receipts",
        ));
    }

    let (published, receipt) = match BrokerNodes::from_config(&config.amqp) {
        Some(nodes) => {
            let publisher =
                Publisher::connect(nodes, &config.amqp, &config.mailbox, "wsgw send").await?;
            let result = match args.wait {
                Some(wait) => publisher.publish_and_wait(&publication, wait).await,
                None => publisher
                    .publish(&publication)
                    .await
                    .map(|published| (published, None)),
            };
            publisher.close().await;
            result?
        }
        None => post(global, args, &publication.envelope).await?,
    };

    let line = match global.output {
        Some(OutputFormat::Json) => serde_json::json!({
            "messageId": published.message_id,
            "timestamp": published.timestamp,
            "receipt": receipt,
        })
        .to_string(),
        // The bare messageId is the default even when piped, so `ID=$(wsgw send ...)` works.
        _ => match &receipt {
            Some(receipt) => format!("{}\n{}", published.message_id, describe(receipt)),
            None => published.message_id.clone(),
        },
    };
    output::print_line(&line)?;
    if let (Some(wait), None) = (args.wait, &receipt) {
        return Err(CliError::msg(
            ExitCode::TempFail,
            format!(
                "no client acked message {} within {}; it is still queued in its mailbox (not lost) and is \
                 delivered when the recipient connects",
                published.message_id,
                humantime::format_duration(wait)
            ),
        ));
    }
    Ok(())
}

fn describe(receipt: &Receipt) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(receipt.acked_at);
    format!(
        "delivered to {}/{} on node {} at {}",
        receipt.unique_id,
        receipt.client_type,
        receipt.node,
        humantime::format_rfc3339_millis(at)
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PostedData {
    message_id: String,
    timestamp: u64,
    #[serde(default)]
    receipt: Option<Receipt>,
}

/// Publishes through the gateway's `POST /api/v1/messages`.
async fn post(
    global: &GlobalArgs,
    args: &SendArgs,
    envelope: &Envelope,
) -> Result<(Published, Option<Receipt>), CliError> {
    let wait = args.wait;
    let tls = super::client_tls(&args.tls)?;
    let server = super::server_url(global);
    let api_key = global
        .api_key
        .clone()
        .or_else(|| credentials::load().map(|local| local.api_key))
        .ok_or_else(|| {
            CliError::msg(
                ExitCode::Config,
                "no AMQP URL and no API key: pass --amqp-url to publish to RabbitMQ, or --api-key (WSGW_API_KEY) \
                 to publish through the gateway at --server",
            )
        })?;
    let mut url = format!("{server}/api/v1/messages");
    if let Some(wait) = wait {
        url.push_str(&format!("?wait={}", humantime::format_duration(wait)));
    }
    let timeout = wait.unwrap_or_default() + Duration::from_secs(30);
    let (status, body) = http_client::request_with_tls(
        hyper::Method::POST,
        &url,
        Some(&api_key),
        Some(envelope.to_json().into_bytes()),
        timeout,
        &tls,
    )
    .await
    .map_err(|error| CliError::new(ExitCode::Unavailable, error))?;
    let answer: ApiAnswer = serde_json::from_slice(&body).map_err(|error| {
        CliError::msg(
            ExitCode::Protocol,
            format!("the gateway answered HTTP {status} with invalid JSON: {error}"),
        )
    })?;
    if !status.is_success() || answer.result != 0 {
        let code = match status.as_u16() {
            400 | 413 => ExitCode::DataError,
            401 | 403 => ExitCode::NoPermission,
            429 | 504 => ExitCode::TempFail,
            _ => ExitCode::Unavailable,
        };
        return Err(CliError::msg(
            code,
            format!(
                "the gateway rejected the message (HTTP {status}): {}",
                answer.description
            ),
        ));
    }
    let data: PostedData = serde_json::from_value(answer.data).map_err(|error| {
        CliError::msg(
            ExitCode::Protocol,
            format!("the gateway's answer has no messageId: {error}"),
        )
    })?;
    Ok((
        Published {
            message_id: data.message_id,
            timestamp: data.timestamp,
        },
        data.receipt,
    ))
}

/// Builds and validates the envelope from the flags, stamping its messageId and timestamp.
fn build_envelope(args: &SendArgs) -> Result<Envelope, CliError> {
    let content_text = match (&args.content, &args.content_file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) => read_content_file(path)?,
        (None, None) => {
            return Err(CliError::msg(
                ExitCode::Usage,
                "give the content with --content or --content-file",
            ));
        }
    };
    let content: serde_json::Value = serde_json::from_str(&content_text).map_err(|error| {
        CliError::new(
            ExitCode::DataError,
            EnvelopeError::Invalid {
                field: "content",
                value: abbreviate(&content_text),
                reason: format!("{error}; give JSON, for text quote it as '\"text\"'"),
            },
        )
    })?;
    let mut envelope = Envelope {
        message_id: args.message_id.clone(),
        send_type: args.send_type.into(),
        message_type: args.message_type.clone(),
        business_type: args.business_type.clone(),
        from_unique_id: args.from_unique_id.clone(),
        to_unique_id: args.to.clone(),
        from_client_type: args.from_client_type.clone(),
        to_client_type: args.to_client_type.clone(),
        timestamp: None,
        content,
        tags: args.tags.clone(),
        businesses: args.businesses.clone(),
    };
    envelope
        .validate()
        .map_err(|error| CliError::new(ExitCode::DataError, error))?;
    envelope.stamp_first_publish();
    Ok(envelope)
}

fn read_content_file(path: &Path) -> Result<String, CliError> {
    let mut text = String::new();
    let result = if path == Path::new("-") {
        std::io::stdin()
            .take(MAX_CONTENT_BYTES + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_CONTENT_BYTES + 1).read_to_string(&mut text))
    };
    result.map_err(|error| {
        CliError::msg(
            ExitCode::NoInput,
            format!("cannot read --content-file {}: {error}", path.display()),
        )
    })?;
    if text.len() as u64 > MAX_CONTENT_BYTES {
        return Err(CliError::msg(
            ExitCode::DataError,
            format!(
                "--content-file {} is larger than {MAX_CONTENT_BYTES} bytes",
                path.display()
            ),
        ));
    }
    Ok(text)
}

/// The first 80 characters of a value, for error messages.
fn abbreviate(text: &str) -> String {
    let mut short: String = text.chars().take(80).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}
