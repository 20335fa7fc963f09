//! `lockgate completions SHELL` and `lockgate man`: shell completions and manual pages, both
//! generated from the command line's clap definitions, so they cannot drift from it.

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
        clap_mangen::generate_to(cmd, dir).map_err(|e| {
            Failure::new(
                code::CANT_CREATE,
                format!(
                    "cannot write the manual pages into {}: {e}; choose a writable directory with --out-dir",
                    dir.display()
                ),
            )
        })?;
        return Ok(0);
    }
    let page = match subcommand {
        None => cmd,
        Some(name) => {
            let sub = cmd.find_subcommand(name).cloned().ok_or_else(|| {
                let names: Vec<&str> = cmd.get_subcommands().map(clap::Command::get_name).collect();
                Failure::new(
                    code::USAGE,
                    format!(
                        "there is no subcommand {name:?}; pages exist for: {}",
                        names.join(", ")
                    ),
                )
            })?;
            sub.name(format!("lockgate-{name}"))
                .version(env!("CARGO_PKG_VERSION"))
        }
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(Failure::output)?;
    write_stdout(&out)
}

fn write_stdout(bytes: &[u8]) -> Result<u8, Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(Failure::output)?;
    Ok(0)
}
