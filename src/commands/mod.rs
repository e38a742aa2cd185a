//! One module per subcommand, each with one entry function, and the helpers they share.

pub mod listen;
pub mod replay_dlq;
pub mod send;
pub mod serve;
pub mod sessions;
pub mod token;

use std::time::SystemTime;

use crate::cli::{Cli, ClientTlsArgs, Command, GlobalArgs, IdentityArgs};
use crate::client::{self, TokenRequest};
use crate::config::Config;
use crate::credentials;
use crate::domain::{Identity, TokenSigner};
use crate::exit::{CliError, ExitCode};
use crate::tls::{ClientTls, TlsError};

/// Default gateway URL for the CLI.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8086";

/// Runs the subcommand.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::Serve(args) => serve::run(&cli.global, args).await,
        Command::Token(args) => token::run(&cli.global, args).await,
        Command::Send(args) => send::run(&cli.global, args).await,
        Command::Listen(args) => listen::run(&cli.global, args).await,
        Command::ReplayDlq(args) => replay_dlq::run(&cli.global, args).await,
        Command::Sessions(args) => sessions::run(&cli.global, args).await,
    }
}

/// Loads the config file and environment, then applies the global flags.
pub fn load_config(global: &GlobalArgs) -> Result<Config, CliError> {
    let mut config = Config::load(global.config.as_deref())?;
    // The flag names one node and replaces every URL of the file and environment, amqp.urls too.
    if let Some(url) = &global.amqp_url {
        config.amqp.url = Some(url.clone());
        config.amqp.urls.clear();
    }
    Ok(config)
}

/// The gateway URL: the flag or WSGW_SERVER, else the one in the local credentials, else the default.
pub fn server_url(global: &GlobalArgs) -> String {
    global
        .server
        .clone()
        .or_else(|| credentials::load().map(|found| found.server))
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned())
        .trim_end_matches('/')
        .to_owned()
}

/// Turns an http(s) or ws(s) base URL into the ws(s) base that connection URLs start with.
pub fn websocket_base(url: &str) -> Result<String, String> {
    let parsed = url::Url::parse(url).map_err(|error| format!("invalid URL {url:?}: {error}"))?;
    let scheme = match parsed.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => {
            return Err(format!(
                "invalid URL {url:?}: scheme {other} is not http, https, ws or wss"
            ));
        }
    };
    let rest = &url[parsed.scheme().len()..];
    Ok(format!("{scheme}{}", rest.trim_end_matches('/')))
}

/// Gets a connection URL for an identity: from the gateway's token endpoint when an API key is known, else
/// minted locally from the token secret.
pub async fn connection_url(
    global: &GlobalArgs,
    identity_args: &IdentityArgs,
    tls: &ClientTls,
) -> Result<String, CliError> {
    let config = load_config(global)?;
    let identity = Identity::new(&identity_args.unique_id, &identity_args.client_type)
        .map_err(|error| CliError::new(ExitCode::DataError, error))?;
    let request = TokenRequest {
        identity,
        tags: identity_args.tags.clone(),
        businesses: identity_args.businesses.clone(),
        ttl: identity_args.ttl,
    };
    let server = server_url(global);

    if let Some(api_key) = &global.api_key {
        return fetch_url(&server, api_key, &request, tls).await;
    }
    let secrets = config.auth.token_secrets()?;
    if let Some(secret) = secrets.first() {
        let signer = TokenSigner::new(secret.as_bytes())
            .map_err(|error| CliError::new(ExitCode::Config, error))?;
        let base = match &config.server.public_url {
            Some(public) => public.clone(),
            None => server.clone(),
        };
        let base =
            websocket_base(&base).map_err(|message| CliError::msg(ExitCode::Config, message))?;
        let ttl = identity_args.ttl.unwrap_or(config.auth.token_ttl);
        let token = signer.mint(
            &request.identity,
            &request.tags,
            &request.businesses,
            ttl,
            SystemTime::now(),
        );
        return Ok(format!("{base}/socket/{token}"));
    }
    if let Some(local) = credentials::load() {
        return fetch_url(&server, &local.api_key, &request, tls).await;
    }
    Err(CliError::msg(
        ExitCode::Config,
        "no API key and no token secret: pass --api-key (or set WSGW_API_KEY), set WSGW_TOKEN_SECRET, \
         or start `wsgw serve` on this machine once so that it writes local credentials",
    ))
}

async fn fetch_url(
    server: &str,
    api_key: &str,
    request: &TokenRequest,
    tls: &ClientTls,
) -> Result<String, CliError> {
    client::request_connection_url(server, api_key, request, tls)
        .await
        .map_err(client_error)
}

/// Builds the client TLS settings from `--ca-cert` (WSGW_CA_CERT): the webpki roots plus the CA certificates in
/// that file, if given.
pub fn client_tls(args: &ClientTlsArgs) -> Result<ClientTls, CliError> {
    ClientTls::new(args.ca_cert.as_deref()).map_err(|error| {
        let code = match &error {
            TlsError::NotFound { .. } | TlsError::Read { .. } => ExitCode::NoInput,
            _ => ExitCode::Config,
        };
        CliError::msg(code, format!("invalid --ca-cert: {error}"))
    })
}

/// Maps a client error to the exit code for its kind.
pub fn client_error(error: client::ClientError) -> CliError {
    let code = match &error {
        client::ClientError::Rejected {
            status: 401 | 403, ..
        } => ExitCode::NoPermission,
        client::ClientError::Rejected {
            status: 400..=499, ..
        } => ExitCode::DataError,
        client::ClientError::Rejected { .. } => ExitCode::Unavailable,
        client::ClientError::Connect { .. }
        | client::ClientError::Tls { .. }
        | client::ClientError::Connection(_) => ExitCode::Unavailable,
        client::ClientError::Protocol(_) => ExitCode::Protocol,
        client::ClientError::Http(_) => ExitCode::Unavailable,
    };
    CliError::new(code, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_base_maps_schemes() {
        assert_eq!(
            websocket_base("http://127.0.0.1:8086/").as_deref(),
            Ok("ws://127.0.0.1:8086")
        );
        assert_eq!(
            websocket_base("https://push.example.com").as_deref(),
            Ok("wss://push.example.com")
        );
        assert_eq!(
            websocket_base("wss://push.example.com/gw").as_deref(),
            Ok("wss://push.example.com/gw")
        );
        assert!(websocket_base("ftp://x").is_err());
    }
}
