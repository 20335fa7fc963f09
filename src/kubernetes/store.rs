//! Reads and conditional writes of lock annotations on one object, and the API server's clock.
//!
//! Writes are JSON Patches sent as bytes encoded the way the API server's own (Go) JSON encoder
//! writes strings: its `test` operation compares the encoded bytes of a value, and Go escapes
//! `<`, `>`, `&`, U+2028 and U+2029 where a plain encoder does not.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http_body_util::BodyExt;
use kube::api::{Api, DynamicObject, PostParams};
use serde::Serialize;
use serde_json::{json, Value};

use crate::clock::{self, Boot};
use crate::error::Error;

/// The lock annotations of the object at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Snapshot {
    /// `None` when the object has no annotations map at all.
    pub annotations: Option<BTreeMap<String, String>>,
    /// The object's resourceVersion, when numeric.
    pub rv: Option<u64>,
}

impl Snapshot {
    pub fn from_object(obj: &DynamicObject) -> Self {
        Self {
            annotations: obj.metadata.annotations.clone(),
            rv: obj
                .metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse().ok()),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }
}

/// One conditional change of one annotation: applied only if the annotation still has the
/// value `expected` (`None`: absent).
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub key: String,
    pub expected: Option<String>,
    /// The new value; `None` removes the annotation.
    pub new: Option<String>,
}

/// Why a write did not happen, or may not have.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// An annotation no longer had the expected value (a failed JSON Patch `test`, answered
    /// 422 without causes, or a 409): nothing was written.
    Conflict,
    /// The write may or may not have been applied: it timed out, the connection broke after it
    /// was sent, or the server failed (5xx). Never repeat a change built on the old value
    /// without reading first.
    Unknown(Error),
    /// Nothing was written, for this reason.
    Failed(Error),
}

/// The object the locks live on.
#[derive(Clone)]
pub(crate) struct Store {
    pub api: Api<DynamicObject>,
    pub name: String,
    /// "configmaps default/locks", for messages.
    pub describe: String,
    pub timeout: Duration,
    /// Create the ConfigMap when it is missing.
    pub create_missing: Arc<AtomicBool>,
    /// Whether the object had an annotations map when we last saw it: a blind first write must
    /// know whether to add a key or the whole map (the API server drops an emptied map).
    had_annotations: Arc<AtomicBool>,
    /// The API server's clock as its last answer showed it. Our own wall clock never enters
    /// it, so a host whose clock is wrong, or is stepped while it holds a lock, still writes
    /// expiries in the server's time frame.
    server_clock: Arc<Mutex<Option<ServerClock>>>,
}

/// What one answer told of the API server's clock: bounds on its time when the answer
/// arrived, on our boot clock (which keeps counting while the host is suspended, so that a
/// host waking up does not write expiries in the past).
#[derive(Debug, Clone, Copy)]
struct ServerClock {
    /// The answer's `Date` (whole seconds, rounded down by the server): the server's time was
    /// at least this when the answer arrived.
    earliest: Duration,
    /// `Date` + 1 s (the header's resolution) + the request's round trip (the answer may have
    /// travelled that long): the server's time was less than this when the answer arrived.
    latest: Duration,
    /// When the answer arrived.
    at: Boot,
}

fn pointer(key: &str) -> String {
    format!(
        "/metadata/annotations/{}",
        key.replace('~', "~0").replace('/', "~1")
    )
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Store {
    pub fn new(api: Api<DynamicObject>, name: String, describe: String, timeout: Duration) -> Self {
        Self {
            api,
            name,
            describe,
            timeout,
            create_missing: Arc::default(),
            had_annotations: Arc::new(AtomicBool::new(true)),
            server_clock: Arc::default(),
        }
    }

    fn seen(&self, snap: Snapshot) -> Snapshot {
        self.had_annotations
            .store(snap.annotations.is_some(), Ordering::Relaxed);
        snap
    }

    fn clock(&self) -> Option<ServerClock> {
        *self
            .server_clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The API server's wall clock now (unix seconds, rounded down), as late as it can be
    /// known to be at least, from its last answer; this host's clock only before any answer
    /// (see [`knows_server_time`](Self::knows_server_time)).
    pub fn server_now(&self) -> i64 {
        match self.clock() {
            Some(c) => secs(c.earliest + clock::boot().since(c.at)),
            None => clock::wall_unix(),
        }
    }

    /// The API server's wall clock now (unix seconds, rounded up), as early as it can be known
    /// to be at most: what a lease's expiry is counted from, so that nobody comparing it with
    /// the server's clock sees it expire before its holder counts it lost.
    pub fn server_now_latest(&self) -> i64 {
        match self.clock() {
            Some(c) => {
                let t = c.latest + clock::boot().since(c.at);
                secs(t).saturating_add(i64::from(t.subsec_nanos() > 0))
            }
            None => clock::wall_unix().saturating_add(1),
        }
    }

    /// True once an answer of the API server has shown its clock: before that, nothing may be
    /// written that carries a time (a lease's expiry).
    pub fn knows_server_time(&self) -> bool {
        self.server_clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// What a blind first write should assume: the lock absent, the annotations map as last seen.
    pub fn assumed(&self) -> Snapshot {
        Snapshot {
            annotations: self
                .had_annotations
                .load(Ordering::Relaxed)
                .then(Default::default),
            rv: None,
        }
    }

    /// The kube error as the user's error, naming the object and the verb.
    pub fn error(&self, verb: &'static str, e: kube::Error) -> Error {
        match e {
            kube::Error::Api(s) if s.code == 404 => Error::ResourceMissing {
                resource: self.describe.clone(),
            },
            kube::Error::Api(s) if s.code == 403 || s.code == 401 => Error::Forbidden {
                verb,
                resource: self.describe.clone(),
                message: s.message.clone(),
            },
            kube::Error::Api(s) => Error::Kubernetes {
                verb,
                resource: self.describe.clone(),
                source: Box::new(kube::Error::Api(s)),
            },
            other => Error::Unreachable {
                resource: self.describe.clone(),
                source: Box::new(other),
            },
        }
    }

    fn timed_out(&self, verb: &'static str, timeout: Duration) -> Error {
        Error::Unreachable {
            resource: self.describe.clone(),
            source: format!("{verb} did not answer within {timeout:?}").into(),
        }
    }

    /// Sends one request for the object and returns the object it answers with.
    async fn send(
        &self,
        verb: &'static str,
        method: http::Method,
        body: Option<Vec<u8>>,
    ) -> Result<Snapshot, kube::Error> {
        let uri = format!("{}/{}", self.api.resource_url(), self.name);
        let mut req = http::Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json-patch+json");
        }
        let req = req
            .body(kube::client::Body::from(body.unwrap_or_default()))
            .map_err(kube::Error::HttpError)?;
        let sent = clock::boot();
        let res = self.api.clone().into_client().send(req).await?;
        if let Some(date) = res
            .headers()
            .get(http::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok())
        {
            let earliest = date
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let at = clock::boot();
            let latest = earliest + Duration::from_secs(1) + at.since(sent);
            *self
                .server_clock
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(ServerClock {
                earliest,
                latest,
                at,
            });
        }
        let status = res.status();
        let bytes = res.into_body().collect().await?.to_bytes();
        if status.is_success() {
            let obj: DynamicObject =
                serde_json::from_slice(&bytes).map_err(kube::Error::SerdeError)?;
            return Ok(Snapshot::from_object(&obj));
        }
        let s = serde_json::from_slice::<kube::core::Status>(&bytes).unwrap_or_else(|_| {
            kube::core::Status::failure(String::from_utf8_lossy(&bytes).trim(), "")
                .with_code(status.as_u16())
        });
        tracing::debug!(verb, object = %self.describe, code = s.code, reason = %s.reason, "request refused");
        Err(kube::Error::Api(s.boxed()))
    }

    /// GET the object.
    pub async fn get(&self) -> Result<Snapshot, Error> {
        loop {
            let sent = self.send("get", http::Method::GET, None);
            match tokio::time::timeout(self.timeout, sent).await {
                Err(_) => return Err(self.timed_out("get", self.timeout)),
                Ok(Ok(snap)) => return Ok(self.seen(snap)),
                Ok(Err(kube::Error::Api(s)))
                    if s.code == 404 && self.create_missing.load(Ordering::Relaxed) =>
                {
                    self.create().await?
                }
                Ok(Err(e)) => return Err(self.error("get", e)),
            }
        }
    }

    /// Creates the missing ConfigMap (only ConfigMaps are created; see `create_missing`).
    async fn create(&self) -> Result<(), Error> {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": self.name}
        }))
        .expect("static object");
        match tokio::time::timeout(self.timeout, self.api.create(&PostParams::default(), &obj))
            .await
        {
            Err(_) => Err(self.timed_out("create", self.timeout)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => Ok(()), // created concurrently
            Ok(Err(e)) => Err(self.error("create", e)),
        }
    }

    /// Applies `changes` atomically, each conditional on its annotation's current value.
    /// `has_annotations` tells whether the annotations map existed when the expected values were
    /// read: `add` into a missing map must create the map.
    pub async fn write(
        &self,
        changes: &[Change],
        has_annotations: bool,
    ) -> Result<Snapshot, WriteError> {
        self.write_within(changes, has_annotations, self.timeout)
            .await
    }

    /// [`Store::write`], waiting up to `timeout` for the answer instead of the request timeout.
    pub async fn write_within(
        &self,
        changes: &[Change],
        has_annotations: bool,
        timeout: Duration,
    ) -> Result<Snapshot, WriteError> {
        let body = go_json(&patch(changes, has_annotations));
        loop {
            let sent = self.send("patch", http::Method::PATCH, Some(body.clone()));
            match tokio::time::timeout(timeout, sent).await {
                Err(_) => return Err(WriteError::Unknown(self.timed_out("patch", timeout))),
                Ok(Ok(snap)) => return Ok(self.seen(snap)),
                Ok(Err(kube::Error::Api(s))) => match s.code {
                    409 => return Err(WriteError::Conflict),
                    422 => {
                        let causes = s
                            .details
                            .as_ref()
                            .map(|d| d.causes.as_slice())
                            .unwrap_or_default();
                        if causes.is_empty() {
                            return Err(WriteError::Conflict);
                        }
                        if causes.iter().any(|c| {
                            c.field == "metadata.annotations" && c.reason == "FieldValueTooLong"
                        }) {
                            return Err(WriteError::Failed(Error::AnnotationsFull {
                                resource: self.describe.clone(),
                            }));
                        }
                        return Err(WriteError::Failed(self.error("patch", kube::Error::Api(s))));
                    }
                    404 if self.create_missing.load(Ordering::Relaxed) => {
                        self.create().await.map_err(WriteError::Failed)?
                    }
                    // Refused before it was handled (API Priority and Fairness).
                    429 => {
                        return Err(WriteError::Failed(self.error("patch", kube::Error::Api(s))))
                    }
                    500.. => {
                        return Err(WriteError::Unknown(
                            self.error("patch", kube::Error::Api(s)),
                        ))
                    }
                    _ => return Err(WriteError::Failed(self.error("patch", kube::Error::Api(s)))),
                },
                // The request may have reached the server before the connection failed.
                Ok(Err(e)) => return Err(WriteError::Unknown(self.error("patch", e))),
            }
        }
    }
}

/// True for errors that pass: the API server unreachable, overloaded (429) or failing (5xx).
/// An acquisition retries them until its deadline, a release until its lease would expire.
pub(crate) fn transient(e: &Error) -> bool {
    match e {
        Error::Unreachable { .. } => true,
        Error::Kubernetes { source, .. } => matches!(
            source.downcast_ref::<kube::Error>(),
            Some(kube::Error::Api(s)) if s.code == 429 || s.code >= 500
        ),
        _ => false,
    }
}

/// The JSON Patch for `changes`.
fn patch(changes: &[Change], has_annotations: bool) -> Value {
    let mut ops = Vec::with_capacity(changes.len() * 2 + 1);
    if !has_annotations {
        ops.push(json!({"op": "test", "path": "/metadata/annotations", "value": Value::Null}));
        let map: serde_json::Map<String, Value> = changes
            .iter()
            .filter_map(|c| c.new.clone().map(|v| (c.key.clone(), Value::String(v))))
            .collect();
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": map}));
    } else {
        for c in changes {
            let path = pointer(&c.key);
            ops.push(json!({"op": "test", "path": path, "value": c.expected}));
            match (&c.expected, &c.new) {
                (_, Some(v)) => ops.push(json!({"op": "add", "path": path, "value": v})),
                (Some(_), None) => ops.push(json!({"op": "remove", "path": path})),
                (None, None) => {}
            }
        }
    }
    Value::Array(ops)
}

/// `value` as Go's `encoding/json` writes it: `<`, `>`, `&`, U+2028 and U+2029 in strings are
/// escaped as `\u003c`, `\u003e`, `\u0026`, `\u2028`, `\u2029`.
pub(crate) fn go_json(value: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, GoFormatter);
    value
        .serialize(&mut ser)
        .expect("serializing JSON into memory cannot fail");
    out
}

struct GoFormatter;

impl serde_json::ser::Formatter for GoFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            let escaped = match c {
                '<' => "\\u003c",
                '>' => "\\u003e",
                '&' => "\\u0026",
                '\u{2028}' => "\\u2028",
                '\u{2029}' => "\\u2029",
                _ => continue,
            };
            writer.write_all(&fragment.as_bytes()[start..i])?;
            writer.write_all(escaped.as_bytes())?;
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_pointers_escape_the_key() {
        assert_eq!(
            pointer("lockgate.io/ab"),
            "/metadata/annotations/lockgate.io~1ab"
        );
        assert_eq!(pointer("a~b"), "/metadata/annotations/a~0b");
    }

    /// Go 1.26 `json.Marshal("a<b>&c\u2028\u2029\"\\é\n")`.
    #[test]
    fn strings_are_encoded_as_go_encodes_them() {
        let s = "a<b>&c\u{2028}\u{2029}\"\\é\n";
        assert_eq!(
            String::from_utf8(go_json(&s)).unwrap(),
            r#""a\u003cb\u003e\u0026c\u2028\u2029\"\\é\n""#
        );
        assert_eq!(go_json(&json!({"k": [1, "x"]})), br#"{"k":[1,"x"]}"#);
    }
}
