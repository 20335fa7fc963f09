//! The command line, as clap parses it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};

/// Run a command while holding a shared or exclusive lock: flock(1) for lock files, and locks
/// in the annotations of a Kubernetes object; an HTTP lock server. Compatible with Go lockgate
/// (werf, nelm).
#[derive(Debug, Parser)]
#[command(name = "lockgate", version, long_about = None)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub locator: LocatorArgs,
    /// Print diagnostics on stderr: -v lockgate's steps (lock names, waits, leases), -vv also
    /// each Kubernetes API call, -vvv everything. The same as `LOCKGATE_LOG=debug` etc.; the
    /// flag wins over the variable.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the locks live.
#[derive(Debug, Args)]
pub(crate) struct LocatorArgs {
    /// Where locks live, as a URL: `file:DIR` (flock on lock files in DIR),
    /// `kubernetes://[CONTEXT@]NAMESPACE/RESOURCE/NAME` (annotations of a Kubernetes object; an
    /// empty NAMESPACE means cluster-scoped), or `http://HOST:PORT` / `https://HOST:PORT` (a
    /// lock server: `lockgate serve`, or Go lockgate's). [env: LOCKGATE_LOCKER]
    #[arg(long, global = true, value_name = "URL", conflicts_with = "dir")]
    pub locker: Option<String>,
    /// Shorthand for `--locker file:DIR`. [env: LOCKGATE_DIR; default: $XDG_RUNTIME_DIR/lockgate,
    /// else /tmp/lockgate-UID]
    #[arg(long, global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Name lock files with werf's legacy murmur3 hash instead of SHA-256 (file lockers only).
    #[arg(long, global = true)]
    pub legacy_names: bool,
    /// Create the ConfigMap of a `kubernetes://NAMESPACE/configmaps/NAME` locker when missing.
    #[arg(long, global = true)]
    pub create_missing: bool,
    /// The lock server's token, read from FILE (surrounding whitespace removed): what an
    /// `http(s)://` locker sends (`Authorization: Bearer`; otherwise `$LOCKGATE_TOKEN`, else the
    /// password of the URL), and what `serve` requires of its clients.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Trust the PEM certificates in FILE (a CA, or the server's own) for an `https://` locker,
    /// besides the system's roots. [env: LOCKGATE_CA_FILE]
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Hold a lock while COMMAND runs; exit with its status.
    Exec(ExecArgs),
    /// Show the locks and who holds them.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete unused lock files older than a given age.
    Gc {
        /// Minimum age of a lock file to delete (`90s`, `10m`, `12h`, `7d`).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Print JSON instead of a summary line.
        #[arg(long)]
        json: bool,
    },
    /// Run an HTTP lock server (Go lockgate's protocol, with long polls and fair queues).
    Serve(crate::serve::ServeArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    ///
    /// bash: `lockgate completions bash > /etc/bash_completion.d/lockgate`;
    /// zsh: `lockgate completions zsh > "${fpath[1]}/_lockgate"`;
    /// fish: `lockgate completions fish > ~/.config/fish/completions/lockgate.fish`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout: `lockgate man | man -l -`.
    ///
    /// Without SUBCOMMAND, lockgate(1); with one, its page (lockgate-exec(1), ...).
    /// `--out-dir DIR` writes every page into DIR instead, as `lockgate.1`, `lockgate-exec.1`, ...
    Man {
        /// The subcommand whose page to print.
        subcommand: Option<String>,
        /// Write every page into this directory instead of printing one.
        #[arg(long, value_name = "DIR", conflicts_with = "subcommand")]
        out_dir: Option<PathBuf>,
    },
}

/// `lockgate exec`.
#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Take a shared lock.
    #[arg(short, long, conflicts_with = "exclusive")]
    pub shared: bool,
    /// Take an exclusive lock (the default).
    #[arg(short = 'x', long)]
    pub exclusive: bool,
    /// Fail at once if the lock is busy.
    #[arg(short = 'n', long = "nonblock", conflicts_with = "timeout")]
    pub non_blocking: bool,
    /// Give up after SECS seconds (fractions allowed; 0 is --nonblock).
    #[arg(short = 'w', long = "timeout", value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// Exit code when the lock is busy or the timeout passes.
    #[arg(
        short = 'E',
        long = "conflict-exit-code",
        value_name = "CODE",
        default_value_t = 1
    )]
    pub conflict_exit_code: u8,
    /// Do not print a line while waiting.
    #[arg(short, long)]
    pub quiet: bool,
    /// The lock's name.
    pub name: String,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<OsString>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{s:?} is not a non-negative number of seconds"))
}
