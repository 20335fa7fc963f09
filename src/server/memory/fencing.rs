//! The memory store's fencing tokens: one counter for all locks, that never goes below a token
//! granted before a restart when a state file is kept.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::super::config::ConfigError;

/// How far ahead of the tokens granted the persisted ceiling is moved: one write per this many
/// grants.
pub(super) const BLOCK: u64 = 1 << 20;

#[derive(Debug)]
pub(super) struct Fencing {
    next: AtomicU64,
    /// With a state file: every token below this is covered by the ceiling written there.
    ceiling: AtomicU64,
    state: Option<(PathBuf, Mutex<()>)>,
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

/// The ceiling in `path`; 0 when the file does not exist (a first start).
fn read(path: &Path) -> Result<u64, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|_| ConfigError::FencingStateCorrupt {
                path: path.to_owned(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(ConfigError::FencingState {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `ceiling` to `path` atomically and durably (a temporary file, fsync, rename, fsync
/// of the directory).
fn write(path: &Path, ceiling: u64) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{ceiling}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

impl Fencing {
    /// Tokens from the wall clock in microseconds, or above the ceiling in `state` when that
    /// is higher (the clock was set back since).
    pub(super) fn open(state: Option<&Path>) -> Result<Self, ConfigError> {
        let floor = match state {
            Some(path) => read(path)?,
            None => 0,
        };
        let start = unix_micros().max(floor).max(1);
        let fencing = Self {
            next: AtomicU64::new(start),
            ceiling: AtomicU64::new(start),
            state: state.map(|p| (p.to_owned(), Mutex::new(()))),
        };
        if let Some(path) = state {
            let ceiling = start.saturating_add(BLOCK);
            write(path, ceiling).map_err(|source| ConfigError::FencingState {
                path: path.to_owned(),
                source,
            })?;
            fencing.ceiling.store(ceiling, Ordering::Release);
        }
        Ok(fencing)
    }

    /// The next token.
    pub(super) fn next(&self) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some((path, writing)) = &self.state {
            if token >= self.ceiling.load(Ordering::Acquire) {
                let _one = writing
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if token >= self.ceiling.load(Ordering::Acquire) {
                    let ceiling = token.saturating_add(BLOCK);
                    if let Err(e) = write(path, ceiling) {
                        // Tokens still increase for this process's life; only a restart with
                        // the clock set back could go below them.
                        tracing::error!(path = %path.display(), error = %e, "cannot write the fencing state");
                    }
                    self.ceiling.store(ceiling, Ordering::Release);
                }
            }
        }
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_continue_above_the_persisted_ceiling_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fencing");
        // A predecessor whose clock was far ahead of ours.
        let ahead = unix_micros() + 3600 * 1_000_000;
        std::fs::write(&path, format!("{ahead}\n")).unwrap();
        let f = Fencing::open(Some(&path)).unwrap();
        let first = f.next();
        assert!(first >= ahead, "{first} < {ahead}");
        for _ in 0..10 {
            assert!(f.next() > first);
        }
        let last = f.next();
        drop(f);
        let again = Fencing::open(Some(&path)).unwrap();
        assert!(again.next() > last);
    }

    #[test]
    fn a_corrupt_state_file_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fencing");
        std::fs::write(&path, "not a number").unwrap();
        assert!(matches!(
            Fencing::open(Some(&path)),
            Err(ConfigError::FencingStateCorrupt { .. })
        ));
    }
}
