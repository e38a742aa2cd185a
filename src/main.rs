//! The `wsgw` binary: parses the command line, sets up logging, runs the subcommand, maps the result to an
//! exit code.

use std::process::ExitCode;

use clap::FromArgMatches;
use tracing_subscriber::EnvFilter;

use wsgw::cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&wsgw::cli::command().get_matches()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wsgw: cannot start the async runtime: {error}");
            return ExitCode::from(wsgw::exit::ExitCode::Software as u8);
        }
    };
    match runtime.block_on(wsgw::commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wsgw: {error}");
            ExitCode::from(error.code as u8)
        }
    }
}

/// Logs go to stderr. `serve` logs lifecycle events at info; the other commands stay quiet unless asked.
fn init_logging(cli: &Cli) {
    let base = match (&cli.command, cli.global.quiet, cli.global.verbose) {
        (_, true, _) => "error",
        (_, false, 1) => "debug",
        (_, false, 2..) => "trace",
        (Command::Serve(_), false, 0) => "info",
        (_, false, 0) => "warn",
    };
    // Dependencies stay at warn unless RUST_LOG asks for more: lapin and hyper are verbose at debug.
    let default_filter = format!("warn,wsgw={base}");
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.global.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
