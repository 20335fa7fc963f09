//! lockgate's own failures: what it prints, and the exit code each one gets.

use std::fmt;

/// Exit codes of lockgate's own failures (sysexits.h), next to the command's own status.
pub(crate) mod code {
    /// Bad command line, lock name or locker URL.
    pub const USAGE: u8 = 64;
    /// The lock backend failed (directory, lock file, API server, its configuration).
    pub const UNAVAILABLE: u8 = 69;
    /// An internal error (including output that cannot be written).
    pub const SOFTWARE: u8 = 70;
    /// The lease was lost while the command ran.
    pub const TEMPFAIL: u8 = 75;
    /// The command could not be executed.
    pub const NOT_EXECUTABLE: u8 = 126;
    /// The command was not found.
    pub const NOT_FOUND: u8 = 127;
}

/// An error lockgate reports itself (once, at the top, as `lockgate: MESSAGE`), with its exit
/// code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: u8,
    pub message: String,
    /// Output went to a closed pipe (`lockgate status | head`): the reader's choice, not a
    /// failure to report.
    pub broken_pipe: bool,
}

impl Failure {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            broken_pipe: false,
        }
    }

    /// Output that could not be written.
    pub(crate) fn output(e: std::io::Error) -> Self {
        let broken_pipe = e.kind() == std::io::ErrorKind::BrokenPipe;
        Self {
            broken_pipe,
            ..Self::new(code::SOFTWARE, format!("cannot write output: {e}"))
        }
    }

    /// An operating system facility lockgate needs failed.
    pub(crate) fn internal(what: &str, e: impl fmt::Display) -> Self {
        Self::new(code::SOFTWARE, format!("cannot {what}: {e}"))
    }
}

impl From<lockgate::Error> for Failure {
    fn from(e: lockgate::Error) -> Self {
        let code = match e {
            lockgate::Error::InvalidName(_) | lockgate::Error::UnknownResource { .. } => {
                code::USAGE
            }
            // The command line sets no lease timing, so an invalid configuration is the
            // environment's (no usable kubeconfig): the backend is unusable, the command line is
            // fine.
            _ => code::UNAVAILABLE,
        };
        Self::new(code, error_chain(&e))
    }
}

/// `error: cause: cause`, each source once.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        // Errors that print their source themselves: say each cause once.
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}
