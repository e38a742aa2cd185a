//! `wsgw replay-dlq list|show|replay|purge`: inspect and re-deliver dead-lettered messages.
//!
//! Nothing is consumed by reading: messages are taken without acks and return to the queue, in order, when the
//! command ends. `replay` removes a message only after its re-publish was confirmed, so a replay killed halfway
//! loses nothing; run again, it may publish a message a second time under the same messageId, which clients
//! de-duplicate.

use std::io::{BufRead, IsTerminal, Write};
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tabled::settings::Style;
use tabled::{Table, Tabled};

use crate::broker::Publication;
use crate::broker::dlq::{DeadLetterQueue, DeadLetterRecord};
use crate::broker::rabbit::{BrokerNodes, Publisher};
use crate::cli::{DlqAction, DlqFilter, GlobalArgs, OutputFormat, ReplayDlqArgs};
use crate::domain::envelope::unix_millis;
use crate::exit::{CliError, ExitCode};
use crate::output::{self, WriteOutcome};

/// Most messages one run reads from the dead-letter queue; it holds them unacked meanwhile.
const MAX_SCAN: usize = 100_000;

pub async fn run(global: &GlobalArgs, args: &ReplayDlqArgs) -> Result<(), CliError> {
    let config = super::load_config(global)?;
    let Some(nodes) = BrokerNodes::from_config(&config.amqp) else {
        return Err(CliError::msg(
            ExitCode::Config,
            "replay-dlq reads RabbitMQ's dead-letter queue: pass --amqp-url or set WSGW_AMQP_URL or WSGW_AMQP_URLS \
             (the in-process broker keeps its dead letters in the serving process only)",
        ));
    };
    let queue = DeadLetterQueue::open(&nodes, &config.amqp).await?;
    let records = queue.scan(MAX_SCAN).await;
    let result = match records {
        Ok(records) => {
            if records.len() == MAX_SCAN {
                eprintln!(
                    "wsgw: read the first {MAX_SCAN} messages of {} only",
                    queue.name()
                );
            }
            match &args.action {
                DlqAction::List(filter) => list(global, &select(&records, filter)),
                DlqAction::Show { id } => show(&records, id),
                DlqAction::Replay {
                    filter,
                    max_replays,
                    dry_run,
                } => {
                    replay(
                        global,
                        &config,
                        &nodes,
                        &queue,
                        &select(&records, filter),
                        *max_replays,
                        *dry_run,
                    )
                    .await
                }
                DlqAction::Purge { filter, yes } => {
                    purge(&queue, &select(&records, filter), *yes).await
                }
            }
        }
        Err(error) => Err(error.into()),
    };
    queue.close().await;
    result
}

/// The records that pass every filter, up to the limit.
fn select<'a>(records: &'a [DeadLetterRecord], filter: &DlqFilter) -> Vec<&'a DeadLetterRecord> {
    let now = unix_millis(SystemTime::now());
    let age = |record: &DeadLetterRecord| {
        record
            .dead_lettered_at
            .map(|at| Duration::from_millis(now.saturating_sub(at)))
    };
    records
        .iter()
        .filter(|record| {
            let envelope = record.envelope.as_ref();
            filter
                .business_type
                .as_ref()
                .is_none_or(|wanted| envelope.is_some_and(|e| &e.business_type == wanted))
                && filter
                    .message_type
                    .as_ref()
                    .is_none_or(|wanted| envelope.is_some_and(|e| &e.message_type == wanted))
                && filter.to.as_ref().is_none_or(|wanted| {
                    let recipient = record.recipient();
                    &recipient == wanted || recipient.split('/').next() == Some(wanted.as_str())
                })
                && filter
                    .reason
                    .as_ref()
                    .is_none_or(|wanted| &record.reason == wanted)
                && filter
                    .id
                    .as_ref()
                    .is_none_or(|wanted| &record.message_id == wanted)
                && filter
                    .older_than
                    .is_none_or(|limit| age(record).is_some_and(|age| age > limit))
                && filter
                    .newer_than
                    .is_none_or(|limit| age(record).is_some_and(|age| age <= limit))
        })
        .take(filter.limit.unwrap_or(usize::MAX))
        .collect()
}

#[derive(Tabled)]
struct Row {
    #[tabled(rename = "MESSAGE ID")]
    message_id: String,
    #[tabled(rename = "REASON")]
    reason: String,
    #[tabled(rename = "DEAD-LETTERED")]
    at: String,
    #[tabled(rename = "TYPE")]
    kind: String,
    #[tabled(rename = "TO")]
    to: String,
    #[tabled(rename = "ROUTING KEY")]
    routing_key: String,
    #[tabled(rename = "REPLAYS")]
    replays: u32,
}

fn time_text(ms: Option<u64>) -> String {
    ms.map(|ms| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
            .to_string()
    })
    .unwrap_or_else(|| "-".to_owned())
}

fn record_json(record: &DeadLetterRecord) -> serde_json::Value {
    json!({
        "messageId": record.message_id,
        "reason": record.reason,
        "deadLetteredAt": record.dead_lettered_at,
        "originalExchange": record.original_exchange,
        "originalRoutingKey": record.original_routing_key,
        "replayCount": record.replay_count,
        "message": record.envelope,
    })
}

fn list(global: &GlobalArgs, records: &[&DeadLetterRecord]) -> Result<(), CliError> {
    match output::resolve(global.output) {
        OutputFormat::Json => {
            let array: Vec<_> = records.iter().map(|record| record_json(record)).collect();
            output::print_line(&serde_json::Value::Array(array).to_string())?;
        }
        OutputFormat::Table => {
            let rows = records.iter().map(|record| Row {
                message_id: record.message_id.clone(),
                reason: record.reason.clone(),
                at: time_text(record.dead_lettered_at),
                kind: record
                    .envelope
                    .as_ref()
                    .map(|e| format!("{}/{}", e.business_type, e.message_type))
                    .unwrap_or_else(|| "(not an envelope)".to_owned()),
                to: record.recipient(),
                routing_key: record.original_routing_key.clone(),
                replays: record.replay_count,
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
            output::print_line(&format!("{} message(s)", records.len()))?;
        }
    }
    Ok(())
}

fn show(records: &[DeadLetterRecord], id: &str) -> Result<(), CliError> {
    let record = records.iter().find(|record| record.message_id == id).ok_or_else(|| {
        CliError::msg(
            ExitCode::DataError,
            format!("no message with messageId {id:?} in the dead-letter queue; list them with `wsgw replay-dlq list`"),
        )
    })?;
    let mut value = record_json(record);
    if record.envelope.is_none() {
        value["body"] = json!(String::from_utf8_lossy(&record.body));
    }
    output::print_line(&serde_json::to_string_pretty(&value).unwrap_or_default())?;
    Ok(())
}

async fn replay(
    global: &GlobalArgs,
    config: &crate::config::Config,
    nodes: &BrokerNodes,
    queue: &DeadLetterQueue,
    records: &[&DeadLetterRecord],
    max_replays: u32,
    dry_run: bool,
) -> Result<(), CliError> {
    let publisher = if dry_run {
        None
    } else {
        Some(
            Publisher::connect(
                nodes.clone(),
                &config.amqp,
                &config.mailbox,
                "wsgw replay-dlq",
            )
            .await?,
        )
    };
    let progress = ProgressBar::new(records.len() as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (mut replayed, mut skipped, mut failed) = (0usize, 0usize, 0usize);
    for record in records {
        progress.inc(1);
        if record.replay_count >= max_replays {
            skipped += 1;
            progress.suspend(|| {
                eprintln!(
                    "skipped {}: replayed {} time(s) already, the maximum is {max_replays} (--max-replays)",
                    record.message_id, record.replay_count
                );
            });
            continue;
        }
        let Some(envelope) = record.envelope.clone() else {
            failed += 1;
            progress.suspend(|| {
                eprintln!(
                    "failed {}: the body is not a wsgw envelope, so it has no destination",
                    record.message_id
                )
            });
            continue;
        };
        let publication = match Publication::new(envelope) {
            Ok(mut publication) => {
                publication.replay_count = record.replay_count + 1;
                publication
            }
            Err(error) => {
                failed += 1;
                progress.suspend(|| eprintln!("failed {}: {error}", record.message_id));
                continue;
            }
        };
        let Some(publisher) = &publisher else {
            replayed += 1;
            progress.suspend(|| {
                eprintln!(
                    "would replay {} to {} (replay {})",
                    record.message_id,
                    record.recipient(),
                    publication.replay_count
                )
            });
            continue;
        };
        // Remove from the dead-letter queue only after the broker confirmed the re-publish.
        let outcome = match publisher.publish(&publication).await {
            Ok(_) => queue.remove(record).await,
            Err(error) => Err(error),
        };
        match outcome {
            Ok(()) => replayed += 1,
            Err(error) => {
                failed += 1;
                progress.suspend(|| eprintln!("failed {}: {error}", record.message_id));
            }
        }
    }
    progress.finish_and_clear();
    if let Some(publisher) = publisher {
        publisher.close().await;
    }
    let verb = if dry_run { "would replay" } else { "replayed" };
    let summary = match global.output {
        Some(OutputFormat::Json) => {
            json!({ "replayed": replayed, "skipped": skipped, "failed": failed, "dryRun": dry_run })
                .to_string()
        }
        _ => format!("{verb} {replayed}, skipped {skipped}, failed {failed}"),
    };
    output::print_line(&summary)?;
    if failed > 0 {
        return Err(CliError::msg(
            ExitCode::Unavailable,
            format!(
                "{failed} message(s) could not be replayed; they stay in the dead-letter queue"
            ),
        ));
    }
    Ok(())
}

async fn purge(
    queue: &DeadLetterQueue,
    records: &[&DeadLetterRecord],
    yes: bool,
) -> Result<(), CliError> {
    if records.is_empty() {
        output::print_line("purged 0, skipped 0, failed 0")?;
        return Ok(());
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::msg(
                ExitCode::Usage,
                format!(
                    "refusing to purge {} message(s) without confirmation: pass --yes",
                    records.len()
                ),
            ));
        }
        eprint!(
            "Delete {} message(s) from {} for good? [y/N] ",
            records.len(),
            queue.name()
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|error| {
                CliError::msg(
                    ExitCode::IoError,
                    format!("reading the answer failed: {error}"),
                )
            })?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            output::print_line("purge cancelled; nothing was deleted")?;
            return Ok(());
        }
    }
    let (mut purged, mut failed) = (0usize, 0usize);
    for record in records {
        match queue.remove(record).await {
            Ok(()) => purged += 1,
            Err(error) => {
                failed += 1;
                eprintln!("failed {}: {error}", record.message_id);
            }
        }
    }
    output::print_line(&format!("purged {purged}, skipped 0, failed {failed}"))?;
    if failed > 0 {
        return Err(CliError::msg(
            ExitCode::Unavailable,
            format!("{failed} message(s) could not be purged"),
        ));
    }
    Ok(())
}
