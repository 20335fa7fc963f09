//! The JSON documents of `status --json` and `gc --json`, and their schema version.
//!
//! Each document is one object with `"schema": SCHEMA` and the backend it describes; README.md
//! ("JSON output") documents the fields. Within one schema version fields are only ever added;
//! a field that is removed, renamed or changes meaning takes a new version.

use serde::Serialize;

/// The version of the documents' schema.
pub(crate) const SCHEMA: u32 = 1;

/// `lockgate status --json` of a directory of lock files.
#[derive(Serialize)]
pub(crate) struct FileStatus<'a> {
    pub schema: u32,
    /// `"file"`.
    pub backend: &'static str,
    pub dir: &'a std::path::Path,
    pub locks: &'a [lockgate::file::LockStatus],
}

/// `lockgate status --json` of a Kubernetes object.
#[derive(Serialize)]
pub(crate) struct KubernetesStatus<'a> {
    pub schema: u32,
    /// `"kubernetes"`.
    pub backend: &'static str,
    /// The object, as `configmaps NAMESPACE/NAME`.
    pub object: &'a str,
    pub locks: &'a [lockgate::kubernetes::RecordStatus],
}

/// `lockgate gc --json`.
#[derive(Serialize)]
pub(crate) struct Gc<'a> {
    pub schema: u32,
    /// `"file"`.
    pub backend: &'static str,
    pub dir: &'a std::path::Path,
    /// The `--older-than` age, in seconds.
    pub older_than_secs: u64,
    #[serde(flatten)]
    pub report: &'a lockgate::file::GcReport,
}

/// `lockgate status --json` of a lock server: its `GET /status`, in the field names of the
/// other documents.
#[derive(Serialize)]
pub(crate) struct HttpStatus<'a> {
    pub schema: u32,
    /// `"http"`.
    pub backend: &'static str,
    /// The server's URL, without credentials.
    pub server: &'a str,
    /// The server's lease TTL, in milliseconds.
    pub ttl_ms: u64,
    pub locks: Vec<HttpLock<'a>>,
    /// How many locks the server has; more than `locks` when it cut the list.
    pub total: usize,
}

/// One lock of a lock server.
#[derive(Serialize)]
pub(crate) struct HttpLock<'a> {
    pub name: &'a str,
    /// `free`, `shared` or `exclusive`.
    pub state: &'static str,
    pub holders: Vec<HttpHolder<'a>>,
    /// Queued acquirers.
    pub waiters: usize,
}

/// One lease of a lock server.
#[derive(Serialize)]
pub(crate) struct HttpHolder<'a> {
    pub mode: lockgate::Mode,
    /// The acquirer id the lease was granted to, when it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    pub fencing_token: u64,
    pub held_ms: u64,
    pub expires_in_ms: u64,
}

impl<'a> HttpStatus<'a> {
    pub(crate) fn new(server: &'a str, s: &'a lockgate::http::protocol::StatusResponse) -> Self {
        let locks = s
            .locks
            .iter()
            .map(|l| HttpLock {
                name: &l.lock_name,
                state: match l.mode {
                    None => "free",
                    Some(lockgate::Mode::Shared) => "shared",
                    Some(_) => "exclusive",
                },
                holders: l
                    .holders
                    .iter()
                    .map(|h| HttpHolder {
                        mode: h.mode,
                        id: h.acquirer_id.as_deref(),
                        fencing_token: h.fencing_token,
                        held_ms: h.held_ms,
                        expires_in_ms: h.expires_in_ms,
                    })
                    .collect(),
                waiters: l.waiters.len(),
            })
            .collect();
        Self {
            schema: SCHEMA,
            backend: "http",
            server,
            ttl_ms: s.ttl_ms,
            locks,
            total: s.total,
        }
    }
}
