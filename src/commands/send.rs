//! `wsgw send`: publishes one direct message with a broker confirm and prints its messageId.

use std::io::Read;
use std::path::Path;

use crate::broker::rabbit::Publisher;
use crate::broker::{Publication, Route};
use crate::cli::{GlobalArgs, OutputFormat, SendArgs};
use crate::domain::{Envelope, EnvelopeError};
use crate::exit::{CliError, ExitCode};
use crate::output;

/// Maximum size of `--content` or `--content-file`, in bytes.
const MAX_CONTENT_BYTES: u64 = 4 * 1024 * 1024;

pub async fn run(global: &GlobalArgs, args: &SendArgs) -> Result<(), CliError> {
    let config = super::load_config(global)?;
    let envelope = build_envelope(args)?;
    let recipient = envelope
        .recipient()
        .map_err(|error| CliError::new(ExitCode::DataError, error))?;

    let Some(amqp_url) = config.amqp.url.clone() else {
        return Err(CliError::msg(
            ExitCode::Config,
            "no RabbitMQ URL: pass --amqp-url or set WSGW_AMQP_URL",
        ));
    };
    let publisher =
        Publisher::connect(&amqp_url, &config.amqp, &config.mailbox, "wsgw send").await?;
    let publication = Publication {
        envelope,
        route: Route::Mailbox(recipient),
    };
    let result = publisher.publish(&publication).await;
    publisher.close().await;
    let published = result?;

    // The bare messageId is the default even when piped, so `ID=$(wsgw send ...)` works.
    let line = match global.output {
        Some(OutputFormat::Json) => serde_json::to_string(&published).unwrap_or_default(),
        _ => published.message_id.clone(),
    };
    output::print_line(&line)?;
    Ok(())
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
        to_unique_id: Some(args.to.clone()),
        from_client_type: args.from_client_type.clone(),
        to_client_type: Some(args.to_client_type.clone()),
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
