//! How to acquire a lock: mode, waiting policy, hooks.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shared (read) or exclusive (write).
///
/// Any number of shared holders may hold a lock together; an exclusive holder excludes every
/// other holder, shared or exclusive.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Many holders at once.
    Shared,
    /// One holder, nobody else.
    #[default]
    Exclusive,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Shared => "shared",
            Mode::Exclusive => "exclusive",
        })
    }
}

/// How long an acquisition may wait for a busy lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wait {
    /// Wait until the lock is acquired.
    #[default]
    Forever,
    /// Do not wait: fail with [`AcquireError::WouldBlock`](crate::AcquireError::WouldBlock).
    NonBlocking,
    /// Wait at most this long from the start of the acquisition, then fail with
    /// [`AcquireError::TimedOut`](crate::AcquireError::TimedOut). A zero timeout is
    /// [`Wait::NonBlocking`].
    Timeout(Duration),
    /// Wait until this instant, then fail with
    /// [`AcquireError::TimedOut`](crate::AcquireError::TimedOut).
    Deadline(Instant),
}

impl Wait {
    /// The absolute deadline of an acquisition that started at `start`; `None` waits forever.
    /// A non-blocking wait's deadline is `start`.
    pub(crate) fn deadline(self, start: Instant) -> Option<Instant> {
        match self {
            Wait::Forever => None,
            Wait::NonBlocking => Some(start),
            Wait::Timeout(d) => Some(
                start
                    .checked_add(d)
                    .unwrap_or(start + Duration::from_secs(86400 * 365 * 100)),
            ),
            Wait::Deadline(i) => Some(i),
        }
    }

    /// True when the acquisition must not block at all.
    pub(crate) fn is_non_blocking(self) -> bool {
        matches!(self, Wait::NonBlocking | Wait::Timeout(Duration::ZERO))
    }
}

/// Someone who holds, or waits for, a lock, as far as the backend can tell.
///
/// Displayed for people: `ci-runner-7 pid 4242 (helm upgrade …) for 3m12s, exclusive`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Holder {
    /// The mode the holder has (or wants).
    pub mode: Mode,
    /// The host it runs on, when recorded (Kubernetes and HTTP locks; a pod's name in a pod).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The holder's process id: on this host for file locks, as recorded otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The user it runs as, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Since when it holds the lock, unix seconds (by the store's clock), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// What it does: the caller's description ([`AcquireOptions::description`]; `lockgate exec`
    /// puts its command line there), or a file lock holder's command line from /proc.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A backend-specific holder identity (a lease UUID, an acquirer id), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// How many holders share this lease, when the backend counts them but cannot tell them
    /// apart (a shared Go lockgate record is one lease held by a count of holders).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl Holder {
    /// A holder with nothing known but its mode.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            host: None,
            pid: None,
            user: None,
            since: None,
            description: None,
            id: None,
            count: None,
        }
    }

    /// A holder known by its process id.
    pub fn process(mode: Mode, pid: u32) -> Self {
        Self {
            pid: Some(pid),
            ..Self::new(mode)
        }
    }

    /// A holder known by a backend-specific identity.
    pub fn with_id(mode: Mode, id: impl Into<String>) -> Self {
        Self {
            id: Some(id.into()),
            ..Self::new(mode)
        }
    }

    /// How long it has held the lock at `now` (unix seconds), when known.
    pub fn held_for(&self, now: i64) -> Option<std::time::Duration> {
        let secs = now.checked_sub(self.since?)?;
        Some(std::time::Duration::from_secs(u64::try_from(secs).ok()?))
    }
}

/// The current wall clock, unix seconds.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(host) = &self.host {
            parts.push(host.clone());
        }
        if let Some(pid) = self.pid {
            parts.push(format!("pid {pid}"));
        }
        if let Some(user) = &self.user {
            parts.push(format!("user {user}"));
        }
        if parts.is_empty() {
            parts.push(self.id.clone().unwrap_or_else(|| "unknown".into()));
        }
        let mut s = parts.join(" ");
        if let Some(d) = &self.description {
            // One line, and not a novel.
            let d: String = d
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let short: String = d.chars().take(60).collect();
            let ellipsis = if d.chars().count() > 60 { "…" } else { "" };
            s.push_str(&format!(" ({short}{ellipsis})"));
        }
        if let Some(held) = self.held_for(unix_now()) {
            s.push_str(&format!(" for {}", short_duration(held)));
        }
        match self.count {
            Some(n) if n != 1 => write!(f, "{s}, {} by {n} holders", self.mode),
            _ => write!(f, "{s}, {}", self.mode),
        }
    }
}

/// `42s`, `3m12s`, `2h5m`, `3d4h`.
pub(crate) fn short_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// What an on-wait hook is told when an acquisition has to wait.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WaitInfo<'a> {
    /// The lock being waited for.
    pub name: &'a str,
    /// The mode being asked for.
    pub mode: Mode,
    /// The current holders, as far as the backend can see them (may be empty).
    pub holders: Vec<Holder>,
}

type OnWait = Arc<dyn Fn(&WaitInfo<'_>) + Send + Sync>;
pub(crate) type OnLost = Arc<dyn Fn(&str, &crate::LostReason) + Send + Sync>;

/// Options of one acquisition: mode, waiting policy, and an on-wait hook.
///
/// The default is an exclusive lock that waits forever.
///
/// ```
/// use std::time::Duration;
/// use lockgate::AcquireOptions;
///
/// let opts = AcquireOptions::exclusive()
///     .timeout(Duration::from_secs(30))
///     .on_wait(|info| eprintln!("Waiting for locked {:?}", info.name));
/// # let _ = opts;
/// ```
#[derive(Clone, Default)]
pub struct AcquireOptions {
    pub(crate) mode: Mode,
    pub(crate) wait: Wait,
    pub(crate) on_wait: Option<OnWait>,
    pub(crate) on_lost: Option<OnLost>,
    pub(crate) description: Option<String>,
}

impl AcquireOptions {
    /// An exclusive lock, waiting forever.
    pub fn exclusive() -> Self {
        Self::default()
    }

    /// A shared lock, waiting forever.
    pub fn shared() -> Self {
        Self::default().mode(Mode::Shared)
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the waiting policy.
    pub fn wait(mut self, wait: Wait) -> Self {
        self.wait = wait;
        self
    }

    /// Fails at once with [`AcquireError::WouldBlock`](crate::AcquireError::WouldBlock) if the
    /// lock is busy.
    pub fn non_blocking(self) -> Self {
        self.wait(Wait::NonBlocking)
    }

    /// Waits at most `timeout`; a zero timeout is [`non_blocking`](Self::non_blocking).
    pub fn timeout(self, timeout: Duration) -> Self {
        self.wait(Wait::Timeout(timeout))
    }

    /// Waits until `deadline` at the latest.
    pub fn deadline(self, deadline: Instant) -> Self {
        self.wait(Wait::Deadline(deadline))
    }

    /// Calls `hook` once, before the acquisition starts to wait for a busy lock. It is not called
    /// when the lock is free or the acquisition is non-blocking. The hook runs on the acquiring
    /// thread or task, so it should be quick (printing a line is the intended use).
    pub fn on_wait(mut self, hook: impl Fn(&WaitInfo<'_>) + Send + Sync + 'static) -> Self {
        self.on_wait = Some(Arc::new(hook));
        self
    }

    /// Calls `hook` with the lock name and the reason if the lease of the acquired lock is lost
    /// (leased backends only; file locks cannot be lost). It runs on a blocking thread of the
    /// runtime (its panics caught), so nothing it does delays the renewal of other leases; keep
    /// it short all the same: signal your work to stop.
    /// [`LockGuard::lost`](crate::LockGuard::lost) is the same event as a future.
    pub fn on_lost(
        mut self,
        hook: impl Fn(&str, &crate::LostReason) + Send + Sync + 'static,
    ) -> Self {
        self.on_lost = Some(Arc::new(hook));
        self
    }

    /// Says what the holder does, for whoever waits for the lock or looks at it (`lockgate
    /// status`): recorded with the lease by the Kubernetes and HTTP backends, with the host,
    /// the process id and the user. `lockgate exec` puts its command line here. At most 256
    /// bytes are kept.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        let mut text = text.into();
        if text.len() > 256 {
            let mut end = 256;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        self.description = Some(text);
        self
    }

    /// Runs the on-wait hook, if any.
    pub(crate) fn notify_wait(&self, info: &WaitInfo<'_>) {
        if let Some(hook) = &self.on_wait {
            hook(info);
        }
    }
}

impl fmt::Debug for AcquireOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcquireOptions")
            .field("mode", &self.mode)
            .field("wait", &self.wait)
            .field("on_wait", &self.on_wait.as_ref().map(|_| "<hook>"))
            .field("on_lost", &self.on_lost.as_ref().map(|_| "<hook>"))
            .field("description", &self.description)
            .finish()
    }
}
