//! `lockgate status` and `lockgate gc`: what the locks look like, as a table or JSON.

use std::io::Write;
use std::time::Duration;

use crate::errors::{code, Failure};
use crate::json;
use crate::locator::Locator;

/// Prints the locks of `locator`.
pub(crate) fn status(locator: &Locator, json: bool) -> Result<u8, Failure> {
    match locator {
        Locator::Kubernetes { .. } => return kubernetes_status(locator, json),
        Locator::Http { .. } => return http_status(locator, json),
        Locator::File { .. } => {}
    }
    let locker = locator.file_locker(false)?;
    let mut locks = locker.status()?;
    for lock in &mut locks {
        for h in &mut lock.holders {
            crate::holders::explain(h, Some(&lock.path));
        }
    }
    let mut out = std::io::stdout().lock();
    if json {
        let doc = json::FileStatus {
            schema: json::SCHEMA,
            backend: "file",
            dir: locker.dir(),
            locks: &locks,
        };
        write_json(&mut out, &doc)?;
    } else {
        writeln!(out, "locks in {}", locker.dir().display())
            .and_then(|()| file_table(&mut out, &locks))
            .map_err(Failure::output)?;
    }
    out.flush().map_err(Failure::output)?;
    Ok(0)
}

/// Deletes unused lock files older than `older_than` and prints what it did. Exits 69 when some
/// files could not be examined or deleted.
pub(crate) fn gc(locator: &Locator, older_than: Duration, json: bool) -> Result<u8, Failure> {
    let locker = locator.file_locker(false)?;
    let report = locker.gc(older_than)?;
    let mut out = std::io::stdout().lock();
    if json {
        let doc = json::Gc {
            schema: json::SCHEMA,
            backend: "file",
            dir: locker.dir(),
            older_than_secs: older_than.as_secs(),
            report: &report,
        };
        serde_json::to_writer(&mut out, &doc).map_err(|e| Failure::output(e.into()))?;
        writeln!(out).map_err(Failure::output)?;
    } else {
        writeln!(
            out,
            "removed {}, in use {}, newer than {} {}, failed {}",
            report.removed,
            report.in_use,
            humantime::format_duration(older_than),
            report.too_new,
            report.failed
        )
        .map_err(Failure::output)?;
    }
    out.flush().map_err(Failure::output)?;
    Ok(if report.failed > 0 {
        code::UNAVAILABLE
    } else {
        0
    })
}

fn write_json(out: &mut impl Write, value: &impl serde::Serialize) -> Result<(), Failure> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(|e| Failure::output(e.into()))?;
    writeln!(out).map_err(Failure::output)
}

/// One lock as the table shows it.
struct Row<'a> {
    state: &'a str,
    waiters: usize,
    name: String,
    holders: &'a [lockgate::Holder],
}

/// `STATE WAITING NAME`, then one indented line per holder.
fn table(out: &mut impl Write, rows: &[Row<'_>]) -> std::io::Result<()> {
    writeln!(out, "{:<10} {:>7}  NAME", "STATE", "WAITING")?;
    for r in rows {
        writeln!(out, "{:<10} {:>7}  {}", r.state, r.waiters, r.name)?;
        for h in r.holders {
            writeln!(out, "{:<19}  held by {h}", "")?;
        }
    }
    Ok(())
}

fn file_table(out: &mut impl Write, locks: &[lockgate::file::LockStatus]) -> std::io::Result<()> {
    let rows: Vec<Row<'_>> = locks
        .iter()
        .map(|l| Row {
            state: match l.state {
                lockgate::file::LockState::Free => "free",
                lockgate::file::LockState::Shared => "shared",
                lockgate::file::LockState::Exclusive => "exclusive",
            },
            waiters: l.waiters,
            name: match &l.name {
                Some(n) => format!("{n:?}"),
                None => format!(
                    "({})",
                    l.path
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ),
            },
            holders: &l.holders,
        })
        .collect();
    table(out, &rows)
}

fn kubernetes_status(locator: &Locator, json: bool) -> Result<u8, Failure> {
    let (object, records) = crate::runtime()?.block_on(async {
        let locker = locator.kubernetes_locker().await?;
        Ok::<_, Failure>((locker.object().to_owned(), locker.status().await?))
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        let doc = json::KubernetesStatus {
            schema: json::SCHEMA,
            backend: "kubernetes",
            object: &object,
            locks: &records,
        };
        write_json(&mut out, &doc)?;
        out.flush().map_err(Failure::output)?;
        return Ok(0);
    }
    writeln!(out, "locks in {object}").map_err(Failure::output)?;
    let rows: Vec<Row<'_>> = records
        .iter()
        .map(|r| match (&r.error, r.mode) {
            (Some(e), _) => Row {
                state: "corrupt",
                waiters: 0,
                name: format!("({}: {e})", r.key),
                holders: &[],
            },
            (None, mode) => Row {
                state: match (r.count, mode) {
                    (..=0, _) => "free",
                    (_, Some(lockgate::Mode::Shared)) => "shared",
                    _ => "exclusive",
                },
                waiters: r.waiters,
                name: format!("{:?}", r.name.as_deref().unwrap_or("")),
                holders: &r.holders,
            },
        })
        .collect();
    table(&mut out, &rows)
        .and_then(|()| out.flush())
        .map_err(Failure::output)?;
    Ok(0)
}

/// `GET /status` of a lock server, as a table or as the schema-1 JSON document.
fn http_status(locator: &Locator, json: bool) -> Result<u8, Failure> {
    let rt = crate::runtime()?;
    let (server, status) = rt.block_on(async {
        let locker = locator.http_locker(None).await?;
        Ok::<_, Failure>((locker.server().to_owned(), locker.status().await?))
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        write_json(&mut out, &json::HttpStatus::new(&server, &status))?;
    } else {
        writeln!(out, "locks on the lock server {server}")
            .and_then(|()| http_table(&mut out, &status))
            .map_err(Failure::output)?;
    }
    out.flush().map_err(Failure::output)?;
    Ok(0)
}

fn http_table(
    out: &mut impl Write,
    status: &lockgate::http::protocol::StatusResponse,
) -> std::io::Result<()> {
    let row = |mode: &str, holders: &str, waiting: &str, token: &str, expires: &str, name: &str| {
        format!("{mode:<10} {holders:>7} {waiting:>7} {token:>20} {expires:>10}  {name}")
    };
    writeln!(
        out,
        "{}",
        row(
            "MODE",
            "HOLDERS",
            "WAITING",
            "FENCING TOKEN",
            "EXPIRES IN",
            "NAME"
        )
    )?;
    for l in &status.locks {
        let token = l.holders.iter().map(|h| h.fencing_token).max();
        let expires = l.holders.iter().map(|h| h.expires_in_ms).min();
        writeln!(
            out,
            "{}",
            row(
                &l.mode.map_or_else(|| "free".to_owned(), |m| m.to_string()),
                &l.holders.len().to_string(),
                &l.waiters.len().to_string(),
                &token.map_or_else(|| "-".to_owned(), |t| t.to_string()),
                &expires.map_or_else(
                    || "-".to_owned(),
                    |ms| format!("{:.1}s", ms as f64 / 1000.0)
                ),
                &format!("{:?}", l.lock_name),
            )
        )?;
    }
    if status.truncated {
        writeln!(
            out,
            "({} of {} locks shown)",
            status.locks.len(),
            status.total
        )?;
    }
    Ok(())
}
