//! Counting one client's requests on the real API server.
//!
//! `testenv/kube up` creates a few *counted users* (admins in the group `lockgate:counted`,
//! kubeconfigs in `LOCKGATE_TEST_COUNTED_USERS`) and starts kube-apiserver with an audit policy
//! that writes one event for every request of that group, when the request is received
//! (`LOCKGATE_TEST_AUDIT_LOG`, blocking mode: the event is written before the request is served).
//! A test takes a user for itself with [`CountedUser::take`], runs a client with it (a kube
//! client, or a child process given [`CountedUser::kubeconfig`]), and reads what that client
//! asked between two [`mark`]s.
//!
//! ```no_run
//! # async fn demo() {
//! use lockgate_testenv::audit::{self, CountedUser};
//! let user = CountedUser::take();
//! let client = user.client().await;
//! let from = audit::mark();
//! // ... the client works ...
//! let requests = user.requests(from, audit::mark());
//! # }
//! ```

use std::fmt;
use std::io::{Read, Seek};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::required_env;

/// A place in the audit log: every event written after it was received after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(u64);

/// The end of the audit log now.
pub fn mark() -> Mark {
    let path = required_env("LOCKGATE_TEST_AUDIT_LOG");
    let len = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("the audit log {path}: {e}"))
        .len();
    Mark(len)
}

/// One request as the audit log recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The Kubernetes verb: get, list, watch, patch, update, create, delete.
    pub verb: String,
    /// The request URI (path and query).
    pub uri: String,
    /// When the API server received it (RFC 3339, microseconds).
    pub received: String,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.received, self.verb, self.uri)
    }
}

/// A user whose requests the audit log records, taken by one test at a time (an exclusive
/// flock on its lock file, released on drop).
pub struct CountedUser {
    name: String,
    kubeconfig: PathBuf,
    _lock: std::fs::File,
}

impl CountedUser {
    /// Takes a counted user nobody else uses; waits (at most 5 minutes) while all are taken.
    pub fn take() -> CountedUser {
        let dir = PathBuf::from(required_env("LOCKGATE_TEST_COUNTED_USERS"));
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            for n in 0.. {
                let name = format!("lockgate-counted-{n}");
                let kubeconfig = dir.join(format!("{name}.kubeconfig"));
                if !kubeconfig.exists() {
                    assert!(n > 0, "no counted users in {}", dir.display());
                    break;
                }
                let lock = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(dir.join(format!("{name}.lock")))
                    .expect("a counted user's lock file");
                // SAFETY: flock(2) on a descriptor we own.
                if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    return CountedUser {
                        name,
                        kubeconfig,
                        _lock: lock,
                    };
                }
            }
            assert!(
                Instant::now() < deadline,
                "every counted user stayed taken for 5 minutes"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The user's name as the API server sees it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The user's kubeconfig, for a child process (`KUBECONFIG`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kube client for this user.
    pub async fn client(&self) -> kube::Client {
        crate::client_for(&self.kubeconfig).await
    }

    /// The requests this user made between `from` and `to`, in the order received.
    pub fn requests(&self, from: Mark, to: Mark) -> Vec<Request> {
        let path = required_env("LOCKGATE_TEST_AUDIT_LOG");
        let mut f =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("the audit log {path}: {e}"));
        f.seek(std::io::SeekFrom::Start(from.0)).unwrap();
        let mut text = String::new();
        f.take(to.0.saturating_sub(from.0))
            .read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("the audit log {path}: {e}"));
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| {
                let e: serde_json::Value = serde_json::from_str(l)
                    .unwrap_or_else(|err| panic!("the audit log {path}: {err}: {l}"));
                (e["user"]["username"] == self.name.as_str()).then(|| Request {
                    verb: e["verb"].as_str().unwrap_or("?").to_owned(),
                    uri: e["requestURI"].as_str().unwrap_or("?").to_owned(),
                    received: e["requestReceivedTimestamp"]
                        .as_str()
                        .unwrap_or("?")
                        .to_owned(),
                })
            })
            .collect()
    }
}

/// What a client asked for in a window of time, by kind.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// `get` and `list`: reads of the object (what a poller repeats).
    pub reads: usize,
    /// `watch`.
    pub watches: usize,
    /// `patch`, `update`, `create`, `delete`.
    pub writes: usize,
}

impl Counts {
    /// Counts `requests` by kind.
    pub fn of(requests: &[Request]) -> Counts {
        let mut c = Counts::default();
        for r in requests {
            match r.verb.as_str() {
                "get" | "list" => c.reads += 1,
                "watch" => c.watches += 1,
                _ => c.writes += 1,
            }
        }
        c
    }

    /// The rule for a client that waits `window` for a busy lock without polling: it reads the
    /// object at most once (a re-list after a watch ends), holds one watch (two if the server
    /// ended one), and writes only to keep its place in the queue, at most once per
    /// `renew_period` (plus one for the window's edges). A client that reads the object again and
    /// again (Go lockgate: a GET every 2 s) breaks it.
    pub fn check_not_polling(
        &self,
        window: Duration,
        renew_period: Duration,
    ) -> Result<(), String> {
        let max_writes = (window.as_secs_f64() / renew_period.as_secs_f64()).floor() as usize + 1;
        let mut broken = Vec::new();
        if self.reads > 1 {
            broken.push(format!("{} reads of the object (at most 1)", self.reads));
        }
        if self.watches > 2 {
            broken.push(format!("{} watches (at most 2)", self.watches));
        }
        if self.writes > max_writes {
            broken.push(format!(
                "{} writes (at most {max_writes}: one per renewal period of {renew_period:?})",
                self.writes
            ));
        }
        if broken.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "polling during a {window:?} wait: {}",
                broken.join(", ")
            ))
        }
    }
}
