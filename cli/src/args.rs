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
    /// Print diagnostics on stderr: -v where the locks are and lockgate's steps (lock names,
    /// waits, leases), -vv also each Kubernetes API call, -vvv everything. The same as
    /// `LOCKGATE_LOG=debug` etc.; the flag wins over the variable.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the locks live.
#[derive(Debug, Args)]
#[command(next_help_heading = "Where the locks live")]
pub(crate) struct LocatorArgs {
    /// Where locks live, as a URL: `file:DIR` (flock on lock files in DIR),
    /// `kubernetes://[CONTEXT@][NAMESPACE/]RESOURCE/NAME` (annotations of a Kubernetes object;
    /// without NAMESPACE the kubeconfig context's, or the pod's; an empty one, `///`, means
    /// cluster-scoped), or `http://HOST:PORT` / `https://HOST:PORT` (a lock server: `lockgate
    /// serve`, or Go lockgate's). [env: LOCKGATE_LOCKER]
    #[arg(long, global = true, value_name = "URL", conflicts_with = "dir")]
    pub locker: Option<String>,
    /// Shorthand for `--locker file:DIR`. [env: LOCKGATE_DIR; default: /run/lock/lockgate-UID,
    /// or /tmp/lockgate-UID where /run/lock is missing]
    #[arg(long, global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Name lock files with werf's legacy murmur3 hash instead of SHA-256 (file lockers only).
    #[arg(long, global = true)]
    pub legacy_names: bool,
    /// Create the ConfigMap of a Kubernetes locker when missing (ConfigMaps only).
    #[arg(long, global = true)]
    pub create_missing: bool,
    /// The kubeconfig file of a Kubernetes locker, as kubectl's `--kubeconfig` (default:
    /// $KUBECONFIG, else ~/.kube/config, else the pod's service account).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context of a Kubernetes locker, as kubectl's `--context` (the same as
    /// `kubernetes://CONTEXT@...`).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace of a Kubernetes locker named `kubernetes://RESOURCE/NAME`, as kubectl's
    /// `--namespace` (default: the kubeconfig context's, or the pod's).
    #[arg(long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// The lock server's token, read from FILE (surrounding whitespace removed): what an
    /// `http(s)://` locker sends (`Authorization: Bearer`; otherwise `$LOCKGATE_TOKEN`, else the
    /// password of the URL), and what `serve` requires of its clients.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Trust the PEM certificates in FILE for an `https://` locker, besides the system's roots:
    /// a CA's, or the server's own (pinned: trusted as it is, self-signed or not).
    /// [env: LOCKGATE_CA_FILE]
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Hold a lock while COMMAND runs; exit with its status.
    Exec(ExecArgs),
    /// Take a lock and hold it until interrupted (SIGINT, SIGTERM, SIGHUP), like `etcdctl
    /// lock`: prints `holding ...` on stdout once it holds the lock.
    Hold(HoldArgs),
    /// Show the locks and who holds them.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete unused lock files older than a given age.
    Gc {
        /// Minimum age of a lock file to delete (`90s`, `10m`, `12h`, `7d`; a plain number is
        /// seconds).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
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

/// How the lock is taken: `exec` and `hold`.
#[derive(Debug, Args)]
pub(crate) struct LockArgs {
    /// Take a shared lock.
    #[arg(short, long, conflicts_with = "exclusive")]
    pub shared: bool,
    /// Take an exclusive lock (the default).
    #[arg(short = 'x', long)]
    pub exclusive: bool,
    /// Fail at once if the lock is busy.
    #[arg(short = 'n', long = "nonblock", conflicts_with = "timeout")]
    pub non_blocking: bool,
    /// Give up after this long: seconds (fractions allowed), or with a unit (`90s`, `10m`,
    /// `1h`); 0 is --nonblock.
    #[arg(short = 'w', long = "timeout", value_name = "SECS", value_parser = parse_duration)]
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
    /// How long a waiting acquisition keeps trying a lock server it cannot reach (refused or
    /// reset connections, no answer, 5xx, 429) before it exits 69; what cannot heal (an
    /// unknown host, an untrusted certificate, a refused token) fails at once.
    #[arg(
        long,
        value_name = "DURATION",
        env = "LOCKGATE_PATIENCE",
        default_value = "1m",
        value_parser = parse_duration
    )]
    pub patience: Duration,
    /// NAME is a file path: lock that file itself, as `flock PATH COMMAND` does (created when
    /// missing, never renamed or written; relative to the working directory), so that lockgate
    /// and flock(1) on the same path exclude each other. No locker is involved.
    #[arg(short = 'f', long = "file")]
    pub file: bool,
}

/// `lockgate exec`.
#[derive(Debug, Args)]
#[command(
    override_usage = "lockgate exec [OPTIONS] NAME COMMAND [ARGS]...\n       \
    lockgate exec [OPTIONS] NAME -c 'SHELL COMMAND'\n       \
    lockgate exec [OPTIONS] --file PATH COMMAND [ARGS]..."
)]
pub(crate) struct ExecArgs {
    #[command(flatten)]
    pub lock: LockArgs,
    /// Run SHELL_COMMAND with `$SHELL -c` (else `/bin/sh -c`), as `flock -c` does, instead of
    /// COMMAND.
    #[arg(short = 'c', long = "command", value_name = "SHELL_COMMAND")]
    pub shell_command: Option<OsString>,
    /// If lockgate dies (SIGKILL, the OOM killer, its process group killed by a CI runner's
    /// cancel), let the command run on, keeping a file lock as flock(1)'s command does. By
    /// default the command's process group is then ended. File lockers only: nothing renews a
    /// leased lock once lockgate is gone.
    #[arg(long)]
    pub keep_running: bool,
    /// The lock's name (with --file, the path of the file to lock).
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The command and its arguments (not with -c).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<OsString>,
}

/// `lockgate hold`.
#[derive(Debug, Args)]
#[command(
    override_usage = "lockgate hold [OPTIONS] NAME\n       lockgate hold [OPTIONS] --file PATH"
)]
pub(crate) struct HoldArgs {
    #[command(flatten)]
    pub lock: LockArgs,
    /// The lock's name (with --file, the path of the file to lock).
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// A duration as the command line takes it: a plain number is seconds (fractions allowed, as
/// flock's `-w`), anything else has units (`90s`, `1m30s`, `250ms`, `2h`, `7d`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{s:?} is not a non-negative number of seconds"));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("{s:?} is not a duration ({e}): give seconds (`30`, `2.5`) or units (`90s`, `10m`, `1h`)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_seconds_or_take_units() {
        let s = Duration::from_secs;
        assert_eq!(parse_duration("30"), Ok(s(30)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("10m"), Ok(s(600)));
        assert_eq!(parse_duration("1m30s"), Ok(s(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["-1", "soon", "", "10 parsecs", "NaN", "inf"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
