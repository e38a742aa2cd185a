//! `wsgw sessions`: the live sessions of every node, and `--kick` to close one.
//!
//! With RabbitMQ the command asks all nodes at once over the control exchange and collects their replies on
//! direct reply-to until the timeout; nodes that other nodes heard from recently but that did not reply are
//! named in a warning. Without an AMQP URL it asks the one gateway at --server over HTTP.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use serde_json::json;
use tabled::settings::Style;
use tabled::{Table, Tabled};

use crate::broker::rabbit::{BrokerNodes, DIRECT_REPLY_TO, Topology, open_connection};
use crate::broker::{ControlMessage, ControlReply, SessionView};
use crate::cli::{GlobalArgs, OutputFormat, SessionSort, SessionsArgs};
use crate::client::ApiAnswer;
use crate::config::Config;
use crate::credentials;
use crate::exit::{CliError, ExitCode};
use crate::http_client;
use crate::output::{self, WriteOutcome};

/// What the nodes answered.
struct Answers {
    sessions: Vec<SessionView>,
    nodes: BTreeSet<String>,
    peers: BTreeSet<String>,
    /// Nodes that closed the kicked session.
    kicked_on: Vec<String>,
}

pub async fn run(global: &GlobalArgs, args: &SessionsArgs) -> Result<(), CliError> {
    let config = super::load_config(global)?;
    let answers = match BrokerNodes::from_config(&config.amqp) {
        Some(nodes) => ask_nodes(&config, &nodes, args).await?,
        None => ask_gateway(global, args).await?,
    };
    if let Some(session_id) = &args.kick {
        return report_kick(global, session_id, &answers);
    }
    let silent: Vec<&String> = answers.peers.difference(&answers.nodes).collect();
    for node in &silent {
        eprintln!(
            "wsgw: warning: node {node} did not answer within {}; its sessions are not listed",
            humantime::format_duration(args.timeout)
        );
    }
    if answers.nodes.is_empty() {
        eprintln!(
            "wsgw: warning: no node answered within {}",
            humantime::format_duration(args.timeout)
        );
    }
    let mut sessions: Vec<SessionView> = answers
        .sessions
        .into_iter()
        .filter(|session| {
            args.unique_id
                .as_ref()
                .is_none_or(|id| &session.unique_id == id)
        })
        .filter(|session| {
            args.client_type
                .as_ref()
                .is_none_or(|kind| &session.client_type == kind)
        })
        .filter(|session| args.node.as_ref().is_none_or(|node| &session.node == node))
        .collect();
    match args.sort {
        SessionSort::Connected => sessions.sort_by_key(|s| (s.connected_at, s.session_id.clone())),
        SessionSort::UniqueId => sessions
            .sort_by(|a, b| (&a.unique_id, &a.client_type).cmp(&(&b.unique_id, &b.client_type))),
        SessionSort::ClientType => sessions
            .sort_by(|a, b| (&a.client_type, &a.unique_id).cmp(&(&b.client_type, &b.unique_id))),
        SessionSort::Node => {
            sessions.sort_by(|a, b| (&a.node, a.connected_at).cmp(&(&b.node, b.connected_at)))
        }
        SessionSort::Pending => sessions.sort_by_key(|s| std::cmp::Reverse(s.pending)),
    }
    print_sessions(global, &sessions, &answers.nodes, &silent)
}

#[derive(Tabled)]
struct Row {
    #[tabled(rename = "SESSION")]
    session: String,
    #[tabled(rename = "UNIQUE ID")]
    unique_id: String,
    #[tabled(rename = "CLIENT TYPE")]
    client_type: String,
    #[tabled(rename = "NODE")]
    node: String,
    #[tabled(rename = "REMOTE")]
    remote: String,
    #[tabled(rename = "CONNECTED")]
    connected: String,
    #[tabled(rename = "PUSHED")]
    pushed: u64,
    #[tabled(rename = "ACKED")]
    acked: u64,
    #[tabled(rename = "PENDING")]
    pending: u64,
    #[tabled(rename = "TAGS")]
    tags: String,
}

fn print_sessions(
    global: &GlobalArgs,
    sessions: &[SessionView],
    nodes: &BTreeSet<String>,
    silent: &[&String],
) -> Result<(), CliError> {
    if global.output == Some(OutputFormat::Json) {
        let value = json!({ "sessions": sessions, "nodes": nodes, "notAnswering": silent });
        output::print_line(&value.to_string())?;
        return Ok(());
    }
    let rows = sessions.iter().map(|session| Row {
        session: session.session_id.clone(),
        unique_id: session.unique_id.clone(),
        client_type: session.client_type.clone(),
        node: session.node.clone(),
        remote: session.remote.clone(),
        connected: humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_millis(session.connected_at),
        )
        .to_string(),
        pushed: session.pushed,
        acked: session.acked,
        pending: session.pending,
        tags: session.tags.join(","),
    });
    let mut table = Table::new(rows);
    if std::io::stdout().is_terminal() {
        table.with(Style::rounded());
    } else {
        table.with(Style::blank());
    }
    if let WriteOutcome::BrokenPipe = output::print_line(&table.to_string())? {
        return Ok(());
    }
    output::print_line(&format!(
        "{} session(s) on {} node(s)",
        sessions.len(),
        nodes.len()
    ))?;
    Ok(())
}

fn report_kick(global: &GlobalArgs, session_id: &str, answers: &Answers) -> Result<(), CliError> {
    if answers.kicked_on.is_empty() {
        return Err(CliError::msg(
            ExitCode::DataError,
            format!(
                "no node holds session {session_id:?} ({} node(s) answered); list the sessions with `wsgw sessions`",
                answers.nodes.len()
            ),
        ));
    }
    let line = match global.output {
        Some(OutputFormat::Json) => {
            json!({ "kicked": session_id, "nodes": answers.kicked_on }).to_string()
        }
        _ => format!(
            "kicked session {session_id} on node {}",
            answers.kicked_on.join(", ")
        ),
    };
    output::print_line(&line)?;
    Ok(())
}

/// Asks every node over RabbitMQ and collects the replies until the timeout.
async fn ask_nodes(
    config: &Config,
    nodes: &BrokerNodes,
    args: &SessionsArgs,
) -> Result<Answers, CliError> {
    let connection = open_connection(nodes, &config.amqp, "wsgw sessions").await?;
    let failed = |operation: &'static str, error: lapin::Error| {
        CliError::new(
            ExitCode::Unavailable,
            crate::broker::BrokerError::Operation {
                operation,
                object: "control exchange".to_owned(),
                reason: format!(
                    "{error}; check that a gateway with amqp.prefix {:?} runs",
                    config.amqp.prefix
                ),
            },
        )
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| failed("channel.open", e))?;
    // Direct reply-to: consume the pseudo-queue, then publish the request on the same channel.
    let mut replies = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| failed("basic.consume", e))?;
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let request = match &args.kick {
        Some(session_id) => ControlMessage::Kick {
            request_id: request_id.clone(),
            session_id: session_id.clone(),
        },
        None => ControlMessage::ListSessions {
            request_id: request_id.clone(),
        },
    };
    let exchange = Topology {
        prefix: config.amqp.prefix.clone(),
    }
    .control_exchange();
    let body = serde_json::to_vec(&request).unwrap_or_default();
    channel
        .basic_publish(
            exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_reply_to(DIRECT_REPLY_TO.into())
                .with_content_type("application/json".into()),
        )
        .await
        .map_err(|e| failed("basic.publish", e))?;

    let mut answers = Answers {
        sessions: Vec::new(),
        nodes: BTreeSet::new(),
        peers: BTreeSet::new(),
        kicked_on: Vec::new(),
    };
    let deadline = tokio::time::Instant::now() + args.timeout;
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(deadline, replies.next()).await {
        match serde_json::from_slice::<ControlReply>(&delivery.data) {
            Ok(ControlReply::Sessions {
                request_id: id,
                node,
                sessions,
                peers,
            }) if id == request_id => {
                answers.sessions.extend(sessions);
                answers.peers.extend(peers);
                answers.nodes.insert(node);
            }
            Ok(ControlReply::Kick {
                request_id: id,
                node,
                kicked,
            }) if id == request_id => {
                if kicked {
                    answers.kicked_on.push(node.clone());
                }
                answers.nodes.insert(node);
            }
            Ok(_) => {}
            Err(error) => eprintln!("wsgw: warning: ignoring an invalid reply: {error}"),
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(answers)
}

/// Asks the single gateway at --server over HTTP (the in-process broker has no control exchange).
async fn ask_gateway(global: &GlobalArgs, args: &SessionsArgs) -> Result<Answers, CliError> {
    let tls = super::client_tls(&args.tls)?;
    let server = super::server_url(global);
    let api_key = global
        .api_key
        .clone()
        .or_else(|| credentials::load().map(|local| local.api_key))
        .ok_or_else(|| {
            CliError::msg(
                ExitCode::Config,
                "no AMQP URL and no API key: pass --amqp-url to ask every node over RabbitMQ, or --api-key \
                 (WSGW_API_KEY) to ask the gateway at --server",
            )
        })?;
    let (method, url) = match &args.kick {
        Some(session_id) => (
            hyper::Method::DELETE,
            format!("{server}/api/v1/sessions/{session_id}"),
        ),
        None => (hyper::Method::GET, format!("{server}/api/v1/sessions")),
    };
    let (status, body) =
        http_client::request_with_tls(method, &url, Some(&api_key), None, args.timeout, &tls)
            .await
            .map_err(|error| CliError::new(ExitCode::Unavailable, error))?;
    let answer: ApiAnswer = serde_json::from_slice(&body).map_err(|error| {
        CliError::msg(
            ExitCode::Protocol,
            format!("the gateway answered HTTP {status} with invalid JSON: {error}"),
        )
    })?;
    let mut answers = Answers {
        sessions: Vec::new(),
        nodes: BTreeSet::new(),
        peers: BTreeSet::new(),
        kicked_on: Vec::new(),
    };
    if args.kick.is_some() {
        if status.is_success() {
            let node = answer.data.as_str().unwrap_or_default().to_owned();
            answers.nodes.insert(node.clone());
            answers.kicked_on.push(node);
        } else if status.as_u16() != 404 {
            return Err(CliError::msg(
                ExitCode::Unavailable,
                format!("HTTP {status}: {}", answer.description),
            ));
        }
        return Ok(answers);
    }
    if !status.is_success() {
        let code = if status.as_u16() == 401 {
            ExitCode::NoPermission
        } else {
            ExitCode::Unavailable
        };
        return Err(CliError::msg(
            code,
            format!("the gateway answered HTTP {status}: {}", answer.description),
        ));
    }
    let node = answer.data["node"].as_str().unwrap_or_default().to_owned();
    answers.sessions =
        serde_json::from_value(answer.data["sessions"].clone()).map_err(|error| {
            CliError::msg(
                ExitCode::Protocol,
                format!("the gateway's session list is invalid: {error}"),
            )
        })?;
    answers.nodes.insert(node);
    Ok(answers)
}
