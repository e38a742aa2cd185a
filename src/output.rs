//! Results on stdout: tables or text for people, JSON for scripts, and a clean exit on a broken pipe.

use std::io::{self, IsTerminal, Write};

use crate::cli::OutputFormat;
use crate::exit::{CliError, ExitCode};

/// The format to print in: the one asked for, else a table on a terminal and JSON otherwise.
pub fn resolve(requested: Option<OutputFormat>) -> OutputFormat {
    requested.unwrap_or(if io::stdout().is_terminal() {
        OutputFormat::Table
    } else {
        OutputFormat::Json
    })
}

/// What a failed write to stdout means for the command.
pub enum WriteOutcome {
    Written,
    /// The reader went away (for example `| head -1`); the command stops and exits 0.
    BrokenPipe,
}

/// Writes one line to stdout and flushes it.
pub fn print_line(line: &str) -> Result<WriteOutcome, CliError> {
    let mut stdout = io::stdout().lock();
    let result = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    match result {
        Ok(()) => Ok(WriteOutcome::Written),
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(WriteOutcome::BrokenPipe),
        Err(error) => Err(CliError::msg(
            ExitCode::IoError,
            format!("writing to stdout failed: {error}"),
        )),
    }
}
