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
