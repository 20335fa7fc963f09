//! `lockgate`: run a command while holding a lock, show locks, collect stale lock files.
//!
//! See `lockgate --help`, `lockgate man` and the README for the exit-code table. One file per
//! job: the command line (`args`), where the locks live (`locator`), taking the lock (`take`),
//! `exec` and the command's process group (`job`, `watchdog`, `signals`), `hold`, `status` and
//! `gc` output (`status`, `json`), the HTTP lock server (`serve`), the manual (`manual`), and
//! lockgate's own failures (`errors`).

mod args;
mod errors;
mod exec;
mod hold;
mod holders;
mod job;
mod json;
mod locator;
#[cfg(test)]
mod locator_proptests;
mod lockers;
mod manual;
mod serve;
mod signals;
mod status;
mod take;
mod watchdog;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command, LocatorArgs};
use errors::{code, Failure};
use locator::Locator;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { code::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(cli.verbose);
    std::panic::set_hook(Box::new(report_panic));
    // A panic is a bug; it still unwinds (the release profile keeps `panic = "unwind"`), so a
    // held lock's guard is dropped and released on the way, and lockgate exits 70 like any
    // other internal error rather than dying of SIGABRT.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli)));
    let Ok(ran) = ran else {
        return ExitCode::from(code::SOFTWARE);
    };
    match ran {
        Ok(code) => ExitCode::from(code),
        // A closed pipe (`lockgate status | head`) is the reader's choice, not a failure.
        Err(f) if f.broken_pipe => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("lockgate: {}", f.line());
            ExitCode::from(f.code)
        }
    }
}

/// Diagnostics on stderr. lockgate reports what matters itself (one line per event); the
/// library's tracing is for `-v` and `LOCKGATE_LOG`, and only errors show without them. Colour
/// only on a terminal, and never with `NO_COLOR`.
fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match verbose {
        0 => EnvFilter::try_from_env("LOCKGATE_LOG").unwrap_or_else(|_| "error".into()),
        1 => "lockgate=debug".into(),
        2 => "lockgate=trace,kube_client=debug,kube_runtime=debug".into(),
        _ => "trace".into(),
    };
    let stderr = std::io::stderr();
    let colour = stderr.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
}

/// One line for a panic (lockgate's messages are one line each), with where it happened.
fn report_panic(info: &std::panic::PanicHookInfo<'_>) {
    let what = info
        .payload()
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panic");
    let at = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    eprintln!(
        "lockgate: internal error{at}: {what}; this is a bug, please report it with the command line"
    );
}

fn run(cli: Cli) -> Result<u8, Failure> {
    let verbose = cli.verbose > 0;
    VERBOSE.store(verbose, std::sync::atomic::Ordering::Relaxed);
    // Commands that need no locker: nothing to resolve (the default directory is not created).
    let command = match cli.command {
        Command::Serve(args) => {
            only_flags(&cli.locator, "serve", &["--token-file"])?;
            return serve::run(args, cli.locator.token_file.as_deref());
        }
        Command::Completions { shell } => return manual::completions(shell),
        Command::Man {
            subcommand,
            out_dir,
        } => return manual::man(subcommand.as_deref(), out_dir.as_deref()),
        // `--file PATH`: the path is the lock; no locker.
        Command::Exec(args) if args.lock.file => {
            only_flags(&cli.locator, "--file", &[])?;
            say_where(verbose, || path_of(&args.name));
            return exec::run(None, args);
        }
        Command::Hold(args) if args.lock.file => {
            only_flags(&cli.locator, "--file", &[])?;
            say_where(verbose, || path_of(&args.name));
            return hold::run(None, args);
        }
        command => command,
    };
    let locator = Locator::resolve(&cli.locator)?;
    // A Kubernetes locker says which object once it has resolved it.
    if !matches!(locator, Locator::Kubernetes { .. }) {
        say_where(verbose, || locator.describe());
    }
    match command {
        Command::Exec(args) => exec::run(Some(&locator), args),
        Command::Hold(args) => hold::run(Some(&locator), args),
        Command::Status { json } => status::status(&locator, json),
        Command::Gc { older_than, json } => status::gc(&locator, older_than, json),
        Command::Serve(_) | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled above")
        }
    }
}

/// `-v`: where the locks are, first (`lockgate: locks in /run/lock/lockgate-1000`).
pub(crate) fn say_where(verbose: bool, place: impl FnOnce() -> String) {
    if verbose {
        eprintln!("lockgate: locks in {}", place());
    }
}

/// `-v` was given.
pub(crate) fn verbose() -> bool {
    VERBOSE.load(std::sync::atomic::Ordering::Relaxed)
}

static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn path_of(path: &str) -> String {
    format!("the file {path} itself (as flock(1))")
}

/// Refuses the locker flags other than `allowed` for a command they do not apply to (`serve`,
/// `--file`): a flag that does nothing is a mistake worth a word.
fn only_flags(args: &LocatorArgs, what: &str, allowed: &[&str]) -> Result<(), Failure> {
    let given = [
        ("--locker", args.locker.is_some()),
        ("--dir", args.dir.is_some()),
        ("--legacy-names", args.legacy_names),
        ("--create-missing", args.create_missing),
        ("--kubeconfig", args.kubeconfig.is_some()),
        ("--context", args.context.is_some()),
        ("--namespace", args.namespace.is_some()),
        ("--token-file", args.token_file.is_some()),
        ("--ca-file", args.ca_file.is_some()),
    ];
    match given
        .iter()
        .find(|(flag, on)| *on && !allowed.contains(flag))
    {
        Some((flag, _)) => Err(Failure::new(
            errors::code::USAGE,
            format!("{flag} does not apply with {what}"),
        )),
        None => Ok(()),
    }
}

/// The runtime of one command: single-threaded, so that signals, the command's process group
/// and its terminal are all handled on the main thread.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::internal("start the runtime", e))
}
