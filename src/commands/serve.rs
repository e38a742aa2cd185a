//! `wsgw serve`: the gateway daemon.

use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::broker::memory::MemoryBroker;
use crate::broker::rabbit::RabbitBroker;
use crate::cli::{GlobalArgs, ServeArgs};
use crate::config::Config;
use crate::credentials;
use crate::domain::TokenSigner;
use crate::exit::{CliError, ExitCode};
use crate::gateway::Gateway;

/// Runs the gateway until SIGINT or SIGTERM.
pub async fn run(global: &GlobalArgs, args: &ServeArgs) -> Result<(), CliError> {
    if args.check {
        return check(global);
    }
    let mut config = super::load_config(global)?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(public_url) = &args.public_url {
        config.server.public_url = Some(public_url.clone());
    }
    if let Some(node_name) = &args.node_name {
        config.server.node_name = Some(node_name.clone());
    }
    let node = config.node_name();

    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|error| {
            CliError::msg(
                ExitCode::Unavailable,
                format!(
                    "cannot listen on {}: {error}; choose another address with --listen",
                    config.server.listen
                ),
            )
        })?;
    let local = listener.local_addr().map_err(|error| {
        CliError::msg(
            ExitCode::Unavailable,
            format!("cannot read the listening address: {error}"),
        )
    })?;
    let public_url = match &config.server.public_url {
        Some(url) => super::websocket_base(url).map_err(|message| {
            CliError::msg(
                ExitCode::Config,
                format!("invalid server.public_url: {message}"),
            )
        })?,
        None => format!("ws://{local}"),
    };
    let (signer, api_keys, local_server) = secrets(&config, global.api_key.as_deref(), local)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    let broker: Arc<dyn Broker> = match &config.amqp.url {
        Some(amqp_url) => {
            let broker = Arc::new(
                RabbitBroker::connect(amqp_url, &config.amqp, &config.mailbox, &node).await?,
            );
            broker.supervise(shutdown.clone());
            broker
        }
        None => {
            warn!(
                "no RabbitMQ URL configured: using the in-process broker, which keeps messages in memory on this \
                 node only (lost on restart, no other nodes); set amqp.url or WSGW_AMQP_URL for production"
            );
            Arc::new(MemoryBroker::new(&config.memory, &config.mailbox))
        }
    };

    let gateway = Gateway::new(
        config,
        node.clone(),
        public_url.clone(),
        broker.clone(),
        signer,
        api_keys,
        shutdown,
    );
    let shutdown_timeout = gateway.config.server.shutdown_timeout;
    info!(listen = %local, public_url = %public_url, node = %node, "listening");
    // The listener is bound and the broker connected: tell systemd (Type=notify) the service is ready.
    notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ]);
    spawn_watchdog(gateway.shutdown.clone());
    gateway.serve(listener, shutdown_timeout).await;
    broker.close().await;
    if let Some(server) = local_server {
        credentials::release_server(&server);
    }
    info!(node = %node, "stopped");
    Ok(())
}

/// `wsgw serve --check`: reports every invalid key on stderr, or that the configuration is valid.
fn check(global: &GlobalArgs) -> Result<(), CliError> {
    let source = global
        .config
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from(crate::config::DEFAULT_CONFIG_PATH));
    match Config::check(global.config.as_deref()) {
        Ok(_) => {
            crate::output::print_line(&format!("configuration is valid ({})", source.display()))?;
            Ok(())
        }
        Err(problems) => {
            for problem in &problems {
                eprintln!("wsgw: {problem}");
            }
            Err(CliError::msg(
                ExitCode::Config,
                format!(
                    "{} invalid config key(s) in {} and the WSGW_* environment",
                    problems.len(),
                    source.display()
                ),
            ))
        }
    }
}

/// The token signer and accepted API keys: from the config and environment, else (on a loopback address
/// only) from the local credentials file, generated on first use. Also returns the server URL recorded in that
/// file, if it was used.
fn secrets(
    config: &Config,
    api_key_flag: Option<&str>,
    local: std::net::SocketAddr,
) -> Result<(TokenSigner, Vec<String>, Option<String>), CliError> {
    let mut api_keys = config.auth.api_keys.clone();
    if let Some(key) = api_key_flag {
        api_keys.push(key.to_owned());
    }
    api_keys.retain(|key| !key.is_empty());
    let mut local_server = None;
    let mut secret = config
        .auth
        .token_secret
        .clone()
        .filter(|secret| !secret.is_empty());

    if secret.is_none() || api_keys.is_empty() {
        if !local.ip().is_loopback() {
            return Err(CliError::msg(
                ExitCode::Config,
                format!(
                    "refusing to listen on {local} without configured secrets: set auth.token_secret and \
                     auth.api_keys in the config file (or WSGW_TOKEN_SECRET and WSGW_API_KEY), or listen on \
                     a loopback address for local use"
                ),
            ));
        }
        let server = format!("http://{local}");
        let (generated, path) = credentials::load_or_create(&server).map_err(|error| {
            CliError::msg(
                ExitCode::Config,
                format!("cannot write local credentials: {error}; set WSGW_STATE_DIR to a writable folder"),
            )
        })?;
        warn!(
            path = %path.display(),
            "no token secret or API key configured; using local credentials (for this machine only)"
        );
        local_server = Some(server);
        secret.get_or_insert(generated.token_secret);
        if api_keys.is_empty() {
            api_keys.push(generated.api_key);
        }
    }
    let secret = secret.unwrap_or_default();
    let signer = TokenSigner::new(secret.as_bytes()).map_err(|error| {
        CliError::msg(
            ExitCode::Config,
            format!("invalid auth.token_secret: {error}"),
        )
    })?;
    Ok((signer, api_keys, local_server))
}

/// Sends a state to systemd when it started the service with Type=notify (NOTIFY_SOCKET is set).
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(error) = sd_notify::notify(state) {
        warn!(%error, "notifying systemd failed");
    }
}

/// Pings the systemd watchdog at half its interval when the unit sets WatchdogSec.
fn spawn_watchdog(shutdown: tokio_util::sync::CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval / 2);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticks.tick() => notify_systemd(&[sd_notify::NotifyState::Watchdog]),
            }
        }
    });
}

fn spawn_signal_handler(shutdown: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    warn!(%error, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("SIGINT received; shutting down"),
            _ = terminate => info!("SIGTERM received; shutting down"),
        }
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        shutdown.cancel();
    });
}
