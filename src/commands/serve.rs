//! `wsgw serve`: the gateway daemon.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::broker::memory::MemoryBroker;
use crate::broker::rabbit::{BrokerNodes, RabbitBroker};
use crate::cli::{GlobalArgs, ServeArgs};
use crate::config::Config;
use crate::credentials;
use crate::domain::TokenSigner;
use crate::exit::{CliError, ExitCode};
use crate::gateway::Gateway;
use crate::tls;

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
    let tls_acceptor = server_tls(&config)?;

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
        None if tls_acceptor.is_some() => format!("wss://{local}"),
        None => format!("ws://{local}"),
    };
    let (signer, api_keys, local_server) = secrets(&config, global.api_key.as_deref(), local)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    let broker: Arc<dyn Broker> = match BrokerNodes::from_config(&config.amqp) {
        Some(nodes) => {
            let broker =
                Arc::new(RabbitBroker::connect(nodes, &config.amqp, &config.mailbox, &node).await?);
            broker.supervise(shutdown.clone());
            broker
        }
        None => {
            warn!(
                "no RabbitMQ URL configured: using the in-process broker, which keeps messages in memory on this \
                 node only (lost on restart, no other nodes); set amqp.url or amqp.urls (WSGW_AMQP_URL, WSGW_AMQP_URLS) for \
                 production"
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
    info!(
        listen = %local,
        public_url = %public_url,
        node = %node,
        tls = tls_acceptor.is_some(),
        "listening"
    );
    // The listener is bound and the broker connected: tell systemd (Type=notify) the service is ready.
    notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ]);
    spawn_watchdog(gateway.shutdown.clone());
    spawn_reload_handler(gateway.clone(), global.clone(), local);
    gateway
        .serve_with_tls(listener, shutdown_timeout, tls_acceptor)
        .await;
    broker.close().await;
    if let Some(server) = local_server {
        credentials::release_server(&server);
    }
    info!(node = %node, "stopped");
    Ok(())
}

/// `wsgw serve --check`: reports every invalid key on stderr, or else a TLS certificate or key that cannot be
/// loaded, or else that the configuration is valid.
fn check(global: &GlobalArgs) -> Result<(), CliError> {
    let source = global
        .config
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from(crate::config::DEFAULT_CONFIG_PATH));
    match Config::check(global.config.as_deref()) {
        Ok(config) => {
            // Every key is valid; also load the TLS files they name, as serving would.
            server_tls(&config)?;
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

/// Loads `server.tls_cert` and `server.tls_key` into a TLS acceptor when they are set; `None` means plain HTTP.
fn server_tls(config: &Config) -> Result<Option<TlsAcceptor>, CliError> {
    let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) else {
        return Ok(None);
    };
    let server_config = tls::load_server_config(cert, key)
        .map_err(|error| CliError::new(ExitCode::Config, error))?;
    Ok(Some(TlsAcceptor::from(server_config)))
}

/// The token signer and accepted API keys: from the config and environment, else (on a loopback address
/// only) from the local credentials file, generated on first use. Also returns the server URL recorded in that
/// file, if it was used.
fn secrets(
    config: &Config,
    api_key_flag: Option<&str>,
    local: std::net::SocketAddr,
) -> Result<(TokenSigner, Vec<String>, Option<String>), CliError> {
    let config_error = |error: crate::config::ConfigError| CliError::new(ExitCode::Config, error);
    let mut api_keys = config.auth.all_api_keys().map_err(config_error)?;
    if let Some(key) = api_key_flag.filter(|key| !key.is_empty()) {
        api_keys.push(key.to_owned());
    }
    let mut local_server = None;
    let mut secrets = config.auth.token_secrets().map_err(config_error)?;

    if secrets.is_empty() || api_keys.is_empty() {
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
        let scheme = if config.server.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let server = format!("{scheme}://{local}");
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
        if secrets.is_empty() {
            secrets.push(generated.token_secret);
        }
        if api_keys.is_empty() {
            api_keys.push(generated.api_key);
        }
    }
    let invalid = |error: crate::domain::TokenError| {
        CliError::msg(ExitCode::Config, format!("invalid token secret: {error}"))
    };
    let mut secrets = secrets.iter();
    let signing = secrets.next().map(String::as_bytes).unwrap_or_default();
    let mut signer = TokenSigner::new(signing).map_err(invalid)?;
    for secret in secrets {
        signer = signer.accepting(secret.as_bytes()).map_err(invalid)?;
    }
    Ok((signer, api_keys, local_server))
}

/// On SIGHUP (`systemctl reload wsgw`), reads the token secrets and API keys again from the config file, the
/// environment and the secret files, so they rotate without a restart. Other settings need a restart. A reload
/// that fails keeps the current keys.
fn spawn_reload_handler(gateway: Arc<Gateway>, global: GlobalArgs, local: std::net::SocketAddr) {
    tokio::spawn(async move {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => signal,
            Err(error) => {
                warn!(%error, "cannot listen for SIGHUP; secrets reload only on restart");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = gateway.shutdown.cancelled() => break,
                received = hangup.recv() => if received.is_none() { break },
            }
            notify_systemd(&[sd_notify::NotifyState::Reloading]);
            let reloaded = super::load_config(&global)
                .and_then(|config| secrets(&config, global.api_key.as_deref(), local));
            match reloaded {
                Ok((signer, api_keys, _)) => {
                    info!(
                        accepted_secrets = signer.accepted_secrets(),
                        api_keys = api_keys.len(),
                        "SIGHUP: reloaded token secrets and API keys"
                    );
                    gateway.reload_keys(signer, api_keys);
                }
                Err(error) => warn!(
                    %error,
                    "SIGHUP: reloading token secrets and API keys failed; keeping the current ones"
                ),
            }
            notify_systemd(&[sd_notify::NotifyState::Ready]);
        }
    });
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
