//! File lock holders as people want to see them, in `status` and in the waiting line: the
//! kernel knows a flock holder by the pid that took the lock, which for `lockgate exec` is
//! lockgate itself, and which may have exited while a process that inherited the descriptor
//! keeps the lock.

/// A file lock holder as people want to see it: a lockgate process by the command it runs (not
/// by lockgate's own command line), and a holder that has exited (its lock lives on in a process
/// that inherited the descriptor: `exec --keep-running`, or a command's child that kept it) as
/// exited, with the processes that hold the lock file open now.
pub(crate) fn explain(h: &mut lockgate::Holder, lock_file: Option<&std::path::Path>) {
    let Some(pid) = h.pid else { return };
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let args: Vec<std::ffi::OsString> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| {
                    <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(a).to_owned()
                })
                .collect();
            if let Some(command) = lockgate_command(&args) {
                h.description = Some(command);
            }
        }
        Err(_) => {
            let holders: Vec<String> = lock_file
                .map(open_by)
                .unwrap_or_default()
                .into_iter()
                .map(|(p, cmd)| format!("pid {p} {cmd}"))
                .collect();
            h.description = Some(if holders.is_empty() {
                "exited".to_owned()
            } else {
                format!("exited; kept by {}", holders.join(", "))
            });
        }
    }
}

/// The command a `lockgate exec` or `hold` command line runs, when `args` is one.
fn lockgate_command(args: &[std::ffi::OsString]) -> Option<String> {
    use clap::Parser;
    let program = std::path::Path::new(args.first()?).file_name()?;
    if program != "lockgate" {
        return None;
    }
    let lossy = |v: &[std::ffi::OsString]| {
        v.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    match crate::args::Cli::try_parse_from(args).ok()?.command {
        crate::args::Command::Exec(mut e) => {
            if let Some(script) = &e.shell_command {
                return Some(format!("-c {}", script.to_string_lossy()));
            }
            Some(lossy(&std::mem::take(&mut e.command)))
        }
        crate::args::Command::Hold(_) => Some("lockgate hold".to_owned()),
        _ => None,
    }
}

/// The live processes that have `file` open, with their command names (a scan of /proc: only
/// done for a holder that has exited).
fn open_by(file: &std::path::Path) -> Vec<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(file) else {
        return Vec::new();
    };
    let id = (meta.dev(), meta.ino());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == id));
        if holds {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            found.push((pid, format!("({})", comm.trim())));
        }
    }
    found
}
