//! `lockgate`: run a command while holding a lock, show locks, collect stale lock files.
//!
//! See `lockgate --help` and the README for the exit-code table.

mod exec;
mod serve;
mod target;

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use target::Target;

/// Exit codes of lockgate's own failures (sysexits.h), next to the command's own status.
pub(crate) mod code {
    /// Bad command line, lock name or locker URL.
    pub const USAGE: u8 = 64;
    /// The lock backend failed (directory, lock file, API server).
    pub const UNAVAILABLE: u8 = 69;
    /// An internal error.
    pub const SOFTWARE: u8 = 70;
    /// The lease was lost while the command ran.
    pub const TEMPFAIL: u8 = 75;
    /// The command could not be executed.
    pub const NOT_EXECUTABLE: u8 = 126;
    /// The command was not found.
    pub const NOT_FOUND: u8 = 127;
}

/// Run commands under shared or exclusive locks: flock(1) for directories of lock files,
/// compatible with Go lockgate.
#[derive(Debug, Parser)]
#[command(name = "lockgate", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    target: TargetArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// Where locks live, as a URL: `file:DIR` (flock on lock files in DIR), or
    /// `kubernetes://[CONTEXT@]NAMESPACE/RESOURCE/NAME` (annotations of a Kubernetes object; an
    /// empty NAMESPACE means cluster-scoped). [env: LOCKGATE_LOCKER]
    #[arg(long, global = true, value_name = "URL", conflicts_with = "dir")]
    locker: Option<String>,
    /// Shorthand for `--locker file:DIR`. [env: LOCKGATE_DIR; default: $XDG_RUNTIME_DIR/lockgate,
    /// else /tmp/lockgate-UID]
    #[arg(long, global = true, value_name = "DIR")]
    dir: Option<std::path::PathBuf>,
    /// Name lock files with werf's legacy murmur3 hash instead of SHA-256 (file lockers only).
    #[arg(long, global = true)]
    legacy_names: bool,
    /// Create the ConfigMap of a `kubernetes://NAMESPACE/configmaps/NAME` locker when missing.
    #[arg(long, global = true)]
    create_missing: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hold a lock while COMMAND runs; exit with its status.
    Exec(ExecArgs),
    /// Show the locks and who holds them.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run an HTTP lock server (Go lockgate's protocol, with long polls and fair queues).
    Serve(serve::ServeArgs),
    /// Delete unused lock files older than a given age.
    Gc {
        /// Minimum age of a lock file to delete (`90s`, `10m`, `12h`, `7d`).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Print JSON instead of a summary line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct ExecArgs {
    /// Take a shared lock.
    #[arg(short, long, conflicts_with = "exclusive")]
    shared: bool,
    /// Take an exclusive lock (the default).
    #[arg(short = 'x', long)]
    exclusive: bool,
    /// Fail at once if the lock is busy.
    #[arg(short = 'n', long = "nonblock", conflicts_with = "timeout")]
    non_blocking: bool,
    /// Give up after SECS seconds (fractions allowed; 0 is --nonblock).
    #[arg(short = 'w', long = "timeout", value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
    /// Exit code when the lock is busy or the timeout passes.
    #[arg(
        short = 'E',
        long = "conflict-exit-code",
        value_name = "CODE",
        default_value_t = 1
    )]
    conflict_exit_code: u8,
    /// Do not print a line while waiting.
    #[arg(short, long)]
    quiet: bool,
    /// The lock's name.
    name: String,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    command: Vec<OsString>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{s:?} is not a non-negative number of seconds"))
}

/// An error lockgate reports itself, with its exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: u8,
    pub message: String,
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

    fn output(e: std::io::Error) -> Self {
        let broken_pipe = e.kind() == std::io::ErrorKind::BrokenPipe;
        Self {
            broken_pipe,
            ..Self::new(code::SOFTWARE, format!("cannot write output: {e}"))
        }
    }
}

impl From<lockgate::Error> for Failure {
    fn from(e: lockgate::Error) -> Self {
        let code = match e {
            lockgate::Error::InvalidName(_)
            | lockgate::Error::InvalidConfig(_)
            | lockgate::Error::UnknownResource { .. } => code::USAGE,
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
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { code::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCKGATE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        // A closed pipe (`lockgate status | head`) is the reader's choice, not a failure.
        Err(f) if f.broken_pipe => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("lockgate: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn run(cli: Cli) -> Result<u8, Failure> {
    // A server needs no locker: nothing to resolve (the default directory is not created).
    if let Command::Serve(args) = cli.command {
        return serve::run(args);
    }
    let mut target = Target::resolve(cli.target.locker, cli.target.dir, cli.target.legacy_names)?;
    if let Target::Kubernetes { create_missing, .. } = &mut target {
        *create_missing = cli.target.create_missing;
    }
    match cli.command {
        Command::Exec(args) => exec::run(target, args),
        Command::Status { json } => status(target, json),
        Command::Gc { older_than, json } => gc(target, older_than, json),
        Command::Serve(args) => serve::run(args),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(code::SOFTWARE, format!("cannot start the runtime: {e}")))
}

fn kubernetes_status(target: &Target, json: bool) -> Result<u8, Failure> {
    let records = runtime()?
        .block_on(async { Ok::<_, Failure>(target.kubernetes_locker().await?.status().await?) })?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &records).map_err(|e| Failure::output(e.into()))?;
        writeln!(out).map_err(Failure::output)?;
        return Ok(0);
    }
    let row = |mode: &str, holders: &str, waiting: &str, expires: &str, uuid: &str, name: &str| {
        format!("{mode:<10} {holders:>7} {waiting:>7} {expires:>10}  {uuid:<36}  {name}")
    };
    writeln!(
        out,
        "{}",
        row("MODE", "HOLDERS", "WAITING", "EXPIRES IN", "UUID", "NAME")
    )
    .map_err(Failure::output)?;
    for r in &records {
        let line = match (&r.error, &r.mode) {
            (Some(e), _) => row(
                "?",
                "-",
                "-",
                "-",
                "-",
                &format!("corrupt record in {}: {e}", r.key),
            ),
            (None, mode) => row(
                &mode.map(|m| m.to_string()).unwrap_or_default(),
                &r.holders.to_string(),
                &r.waiters.to_string(),
                &r.expires_in_secs
                    .map(|s| format!("{s}s"))
                    .unwrap_or_default(),
                r.uuid.as_deref().unwrap_or("-"),
                &format!("{:?}", r.name.as_deref().unwrap_or("")),
            ),
        };
        writeln!(out, "{line}").map_err(Failure::output)?;
    }
    Ok(0)
}

fn status(target: Target, json: bool) -> Result<u8, Failure> {
    if matches!(target, Target::Kubernetes { .. }) {
        return kubernetes_status(&target, json);
    }
    let file = target.file_locker()?;
    let locks = file.status()?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &locks)
            .map_err(|e| Failure::new(code::SOFTWARE, e.to_string()))?;
        let _ = writeln!(out);
        return Ok(0);
    }
    let _ = writeln!(
        out,
        "{:<10} {:<30} {:>7}  NAME",
        "STATE", "HOLDERS", "WAITING"
    );
    for l in &locks {
        let holders = if l.holders.is_empty() {
            "-".to_owned()
        } else {
            l.holders
                .iter()
                .map(|h| h.pid.map_or_else(|| "?".to_owned(), |p| p.to_string()))
                .collect::<Vec<_>>()
                .join(",")
        };
        let state = serde_json::to_value(l.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let name = match &l.name {
            Some(n) => format!("{n:?}"),
            None => format!(
                "({})",
                l.path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
        };
        writeln!(out, "{state:<10} {holders:<30} {:>7}  {name}", l.waiters)
            .map_err(Failure::output)?;
    }
    Ok(0)
}

fn gc(target: Target, older_than: Duration, json: bool) -> Result<u8, Failure> {
    let report = target.file_locker()?.gc(older_than)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&report)
                .map_err(|e| Failure::new(code::SOFTWARE, e.to_string()))?
        );
    } else {
        println!(
            "removed {}, in use {}, newer than {} {}, failed {}",
            report.removed,
            report.in_use,
            humantime::format_duration(older_than),
            report.too_new,
            report.failed
        );
    }
    Ok(if report.failed > 0 {
        code::UNAVAILABLE
    } else {
        0
    })
}
