//! `lockgate completions SHELL` and `lockgate man`: shell completions and manual pages. The
//! options come from the command line's clap definitions, so they cannot drift from it; the
//! pages add what `--help` has no room for: exit status, environment, signals, files and
//! examples (the README's tables, which the tests check against the command's behaviour).

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

use crate::args::Cli;
use crate::errors::{code, Failure};

/// Prints the completion script for `shell`.
pub(crate) fn completions(shell: clap_complete::Shell) -> Result<u8, Failure> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "lockgate", &mut out);
    write_stdout(&out)
}

/// Prints lockgate(1), or the page of one subcommand, or writes every page into `out_dir`.
pub(crate) fn man(subcommand: Option<&str>, out_dir: Option<&Path>) -> Result<u8, Failure> {
    // `lockgate help` needs no pages of its own: every page documents --help.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    if let Some(dir) = out_dir {
        let cant = |e: std::io::Error| {
            Failure::new(
                code::CANT_CREATE,
                format!(
                    "cannot write the manual pages into {}: {e}; choose a writable directory with --out-dir",
                    dir.display()
                ),
            )
        };
        let mut pages = vec![(String::new(), cmd.clone())];
        pages.extend(
            cmd.get_subcommands()
                .map(|s| (s.get_name().to_owned(), page_of(s))),
        );
        for (sub, page) in pages {
            let man = clap_mangen::Man::new(page);
            let mut text = Vec::new();
            render(&man, &sub, &mut text).map_err(cant)?;
            std::fs::write(dir.join(man.get_filename()), text).map_err(cant)?;
        }
        return Ok(0);
    }
    let (sub, page) = match subcommand {
        None => (String::new(), cmd),
        Some(name) => {
            let sub = cmd.find_subcommand(name).ok_or_else(|| {
                let names: Vec<&str> = cmd.get_subcommands().map(clap::Command::get_name).collect();
                Failure::new(
                    code::USAGE,
                    format!(
                        "there is no subcommand {name:?}; pages exist for: {}",
                        names.join(", ")
                    ),
                )
            })?;
            (name.to_owned(), page_of(sub))
        }
    };
    let mut out = Vec::new();
    render(&clap_mangen::Man::new(page), &sub, &mut out).map_err(Failure::output)?;
    write_stdout(&out)
}

/// A subcommand as its own page: lockgate-exec(1), ...
fn page_of(sub: &clap::Command) -> clap::Command {
    sub.clone()
        .name(format!("lockgate-{}", sub.get_name()))
        .version(env!("CARGO_PKG_VERSION"))
}

/// The page of `sub` (empty: lockgate(1)): clap_mangen's sections, then this page's own.
fn render(man: &clap_mangen::Man, sub: &str, w: &mut dyn Write) -> std::io::Result<()> {
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    if sub.is_empty() {
        man.render_subcommands_section(w)?;
    }
    for (title, body) in sections(sub) {
        writeln!(w, ".SH \"{title}\"")?;
        for item in body {
            match item {
                Item::Text(t) => writeln!(w, ".PP\n{}", roff(t))?,
                Item::Entry(term, what) => {
                    writeln!(w, ".TP\n\\fB{}\\fR\n{}", roff(term), roff(what))?
                }
                Item::Example(what, command) => writeln!(
                    w,
                    ".PP\n{}\n.PP\n.RS 4\n.nf\n{}\n.fi\n.RE",
                    roff(what),
                    roff(command)
                )?,
            }
        }
    }
    man.render_version_section(w)
}

/// One paragraph of a section.
enum Item {
    Text(&'static str),
    /// A term and what it means (an exit code, a variable, a signal).
    Entry(&'static str, &'static str),
    /// What it does, then the command.
    Example(&'static str, &'static str),
}

/// `s` as roff text: backslashes and dashes escaped, no line starting with a control character.
fn roff(s: &str) -> String {
    s.lines()
        .map(|l| {
            let l = l.replace('\\', "\\e").replace('-', "\\-");
            if l.starts_with(['.', '\'']) {
                format!("\\&{l}")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const EXIT_EXEC: &[Item] = &[
    Item::Entry("the command's status", "The command ran and exited with it."),
    Item::Entry("128+N", "The command was killed by signal N."),
    Item::Entry(
        "1 (or -E CODE)",
        "The lock was busy (-n) or the timeout passed (-w); the command did not run.",
    ),
    Item::Entry(
        "64",
        "Usage: a bad option, lock name, locker URL or resource name, or a flag that does not apply to the locker.",
    ),
    Item::Entry(
        "69",
        "The locker failed: the lock directory or file is unusable; no usable Kubernetes configuration, object missing, access forbidden, API server unreachable; the lock server unreachable past the patience, an unknown host, a refused token, an untrusted certificate; or the lock could not be released after the command ran.",
    ),
    Item::Entry("70", "An internal error (a bug), or output that cannot be written."),
    Item::Entry("73", "man --out-dir DIR: DIR cannot be written."),
    Item::Entry(
        "75",
        "The lease was lost while the command ran (leased lockers); the command got SIGTERM, then SIGKILL 2 s later.",
    ),
    Item::Entry("126", "The command could not be executed."),
    Item::Entry("127", "The command was not found."),
];

const EXIT_HOLD: &[Item] = &[
    Item::Entry(
        "0",
        "The lock was held until a signal ended the hold, and released.",
    ),
    Item::Entry(
        "1 (or -E CODE)",
        "The lock was busy (-n) or the timeout passed (-w).",
    ),
    Item::Entry("64", "Usage."),
    Item::Entry("69", "The locker failed (as for exec)."),
    Item::Entry("75", "The lease was lost while the lock was held."),
];

const ENVIRONMENT: &[Item] = &[
    Item::Entry(
        "LOCKGATE_LOCKER",
        "The locker URL when --locker and --dir are not given.",
    ),
    Item::Entry(
        "LOCKGATE_DIR",
        "The lock directory when neither --locker, --dir nor LOCKGATE_LOCKER is given.",
    ),
    Item::Entry(
        "LOCKGATE_PATIENCE",
        "How long a waiting acquisition keeps trying a lock server it cannot reach (default 1m); --patience wins.",
    ),
    Item::Entry(
        "LOCKGATE_TOKEN",
        "The lock server's token when --token-file is not given (else the password of the URL).",
    ),
    Item::Entry(
        "LOCKGATE_CA_FILE",
        "PEM certificates to trust for an https:// locker when --ca-file is not given.",
    ),
    Item::Entry(
        "KUBECONFIG",
        "The kubeconfig files of a Kubernetes locker when --kubeconfig is not given (else ~/.kube/config, else the pod's service account).",
    ),
    Item::Entry(
        "KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT",
        "In a pod: the API server, with the service account's token, CA and namespace in /var/run/secrets/kubernetes.io/serviceaccount/.",
    ),
    Item::Entry("SHELL", "The shell of exec -c (else /bin/sh), as flock(1)."),
    Item::Entry(
        "LOCKGATE_LOG",
        "A tracing filter for diagnostics on stderr (lockgate=debug); -v wins.",
    ),
    Item::Entry("NO_COLOR", "No colour in diagnostics, even on a terminal."),
    Item::Text(
        "The command gets LOCKGATE_LOCK_NAME (the lock's name), LOCKGATE_HOLDER_ID (this hold: HOST/PID/NANOS) and, with a leased locker, LOCKGATE_FENCING_TOKEN (strictly increasing with every grant of the lock: pass it with writes, so that a stale holder's writes can be refused).",
    ),
];

const SIGNALS: &[Item] = &[
    Item::Text(
        "The command runs in a process group of its own. SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to lockgate are forwarded to that group; when the command ends by a signal, what is left of its group gets SIGTERM, and SIGKILL 2 s later.",
    ),
    Item::Text(
        "A signal ignored when lockgate starts stays ignored, for lockgate and the command, as with flock(1): nohup lockgate ... survives a hangup, and lockgate ... & in a script (whose shell ignores SIGINT and SIGQUIT in background jobs) survives a Ctrl-C meant for the script.",
    ),
    Item::Text(
        "If lockgate dies (SIGKILL, the OOM killer, its process group killed by a CI runner that cancels a job), a watchdog process ends the command's group: SIGTERM, then SIGKILL 2 s later. With --keep-running (file locks only) the command runs on and keeps the lock, as flock(1)'s command does when flock alone is killed.",
    ),
    Item::Text(
        "In the foreground of a terminal the command's group gets the terminal; Ctrl-C reaches the command (and then the calling script, as without lockgate), Ctrl-Z stops the command and lockgate (fg continues both).",
    ),
    Item::Text(
        "With a leased locker, a lost lease sends the command's group SIGTERM, then SIGKILL 2 s later, and lockgate exits 75.",
    ),
    Item::Text(
        "hold ends on SIGINT, SIGTERM, SIGHUP or SIGQUIT (those not ignored at start), releases the lock and exits 0.",
    ),
];

const FILES: &[Item] = &[
    Item::Entry(
        "/run/lock/lockgate-UID",
        "The default lock directory (/tmp/lockgate-UID where /run/lock is missing): one per user, the same for cron jobs, systemd units, sudo and login sessions; created 0700, refused when another user owns it. --dir, LOCKGATE_DIR or --locker choose another; lockgate status and -v name it.",
    ),
];

const EXAMPLES: &[Item] = &[
    Item::Example(
        "Run a deploy while holding an exclusive lock; wait at most 10 minutes for it:",
        "lockgate exec -w 10m deploy -- ./deploy.sh",
    ),
    Item::Example(
        "The same lock as flock(1) takes it, on a path:",
        "lockgate exec --file /var/lock/deploy.lock -c './build && ./deploy.sh'",
    ),
    Item::Example(
        "A lock in the annotations of ConfigMap locks in the kubeconfig context's namespace (created when missing):",
        "lockgate --locker kubernetes://cm/locks --create-missing exec deploy -- ./deploy.sh",
    ),
    Item::Example(
        "A lock server, and a lock taken through it:",
        "lockgate serve --listen :7780 --token-file /etc/lockgate/token &\nLOCKGATE_TOKEN=$(cat /etc/lockgate/token) lockgate --locker http://localhost:7780 exec deploy -- ./deploy.sh",
    ),
    Item::Example(
        "Hold a lock from a script until it is done with it:",
        "lockgate hold maintenance & holder=$!\n# ... wait for its `holding` line, work ...\nkill $holder",
    ),
    Item::Example("Who holds what:", "lockgate status"),
];

/// The sections of the page of `sub` (empty: lockgate(1)).
fn sections(sub: &str) -> Vec<(&'static str, &'static [Item])> {
    match sub {
        "" => vec![
            ("EXIT STATUS", EXIT_EXEC),
            ("ENVIRONMENT", ENVIRONMENT),
            ("SIGNALS", SIGNALS),
            ("FILES", FILES),
            ("EXAMPLES", EXAMPLES),
        ],
        "exec" => vec![
            ("EXIT STATUS", EXIT_EXEC),
            ("ENVIRONMENT", ENVIRONMENT),
            ("SIGNALS", SIGNALS),
            ("EXAMPLES", &EXAMPLES[..3]),
        ],
        "hold" => vec![
            ("EXIT STATUS", EXIT_HOLD),
            ("SIGNALS", SIGNALS),
            ("EXAMPLES", &EXAMPLES[4..5]),
        ],
        "status" | "gc" => vec![("ENVIRONMENT", ENVIRONMENT), ("FILES", FILES)],
        _ => vec![],
    }
}

fn write_stdout(bytes: &[u8]) -> Result<u8, Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(Failure::output)?;
    Ok(0)
}
