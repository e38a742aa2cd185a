//! `wsgw token`: prints a connection URL with a fresh token.

use crate::cli::{GlobalArgs, OutputFormat, TokenArgs};
use crate::exit::CliError;
use crate::output;

pub async fn run(global: &GlobalArgs, args: &TokenArgs) -> Result<(), CliError> {
    let tls = super::client_tls(&args.tls)?;
    let url = super::connection_url(global, &args.identity, &tls).await?;
    // The bare URL is the default even when piped, so `URL=$(wsgw token ...)` works.
    let line = match global.output {
        Some(OutputFormat::Json) => serde_json::json!({ "url": url }).to_string(),
        _ => url,
    };
    output::print_line(&line)?;
    Ok(())
}
