//! Exit codes, by meaning (after sysexits.h), and the error type that carries one.
//!
//! | code | meaning |
//! |------|---------|
//! | 0  | success |
//! | 1  | failure not covered below |
//! | 2  | invalid command line (from clap) |
//! | 65 | invalid input data: an envelope field, JSON content, an identity |
//! | 66 | an input file does not exist or cannot be read |
//! | 69 | a service is unavailable: RabbitMQ or the gateway unreachable, a message refused or unroutable |
//! | 70 | internal error |
//! | 74 | writing the output failed |
//! | 75 | temporary failure: a deadline passed (no confirm, broker blocking publishers); retry later |
//! | 76 | the remote side broke the protocol |
//! | 77 | permission denied: invalid API key or token |
//! | 78 | invalid configuration |

use std::fmt;

use crate::broker::BrokerError;

/// A process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    Success = 0,
    Failure = 1,
    Usage = 2,
    DataError = 65,
    NoInput = 66,
    Unavailable = 69,
    Software = 70,
    IoError = 74,
    TempFail = 75,
    Protocol = 76,
    NoPermission = 77,
    Config = 78,
}

impl ExitCode {
    /// Every code, for the man page and tests.
    pub const ALL: [ExitCode; 12] = [
        ExitCode::Success,
        ExitCode::Failure,
        ExitCode::Usage,
        ExitCode::DataError,
        ExitCode::NoInput,
        ExitCode::Unavailable,
        ExitCode::Software,
        ExitCode::IoError,
        ExitCode::TempFail,
        ExitCode::Protocol,
        ExitCode::NoPermission,
        ExitCode::Config,
    ];

    /// One line on what the code means.
    pub fn meaning(self) -> &'static str {
        match self {
            ExitCode::Success => "success",
            ExitCode::Failure => "failure not covered by another code",
            ExitCode::Usage => "invalid command line",
            ExitCode::DataError => {
                "invalid input data (an envelope field, JSON content, an identity)"
            }
            ExitCode::NoInput => "an input file does not exist or cannot be read",
            ExitCode::Unavailable => {
                "RabbitMQ or the gateway is unreachable, or the message was refused or unroutable"
            }
            ExitCode::Software => "internal error",
            ExitCode::IoError => "writing the output failed",
            ExitCode::TempFail => {
                "a deadline passed (no confirm, broker blocking publishers); retry later"
            }
            ExitCode::Protocol => "the remote side broke the protocol",
            ExitCode::NoPermission => "permission denied (invalid API key or token)",
            ExitCode::Config => "invalid configuration",
        }
    }
}

/// An error that ends the command, with the exit code for its kind.
pub struct CliError {
    pub code: ExitCode,
    pub error: anyhow::Error,
}

impl CliError {
    pub fn new(code: ExitCode, error: impl Into<anyhow::Error>) -> Self {
        CliError {
            code,
            error: error.into(),
        }
    }

    pub fn msg(code: ExitCode, message: impl fmt::Display) -> Self {
        CliError {
            code,
            error: anyhow::anyhow!("{message}"),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl fmt::Debug for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({:?})", self.error, self.code)
    }
}

impl From<BrokerError> for CliError {
    fn from(error: BrokerError) -> Self {
        let code = match &error {
            BrokerError::Unreachable { .. }
            | BrokerError::HandshakeTimeout { .. }
            | BrokerError::Unroutable { .. }
            | BrokerError::Operation { .. } => ExitCode::Unavailable,
            BrokerError::MailboxMismatch { .. } => ExitCode::Config,
            BrokerError::ConfirmTimeout { .. }
            | BrokerError::Blocked { .. }
            | BrokerError::Refused { .. }
            | BrokerError::MemoryFull { .. } => ExitCode::TempFail,
        };
        CliError::new(code, error)
    }
}

impl From<crate::config::ConfigError> for CliError {
    fn from(error: crate::config::ConfigError) -> Self {
        CliError::new(ExitCode::Config, error)
    }
}
