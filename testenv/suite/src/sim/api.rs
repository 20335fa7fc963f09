//! The simulated Kubernetes API server: ConfigMaps of one namespace, with what lockgate and Go
//! lockgate use of the real one — GET, LIST by name, JSON Patch with `test` (answered 422
//! without causes when a `test` fails), PUT with a resourceVersion (409 when stale), the
//! 256 KiB annotation limit (422 `FieldValueTooLong`), watches from a resourceVersion with
//! bookmarks and `410 Gone` for a compacted one, and a `Date` header from the server's clock.
//!
//! Pure logic, no I/O and no time of its own: the world calls [`ApiServer::handle`] at the
//! moment a request arrives, with the server's wall clock, and delivers what it answers.
//! `tests/sim_conformance.rs` holds it to the real API server.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Map, Value};

/// The namespace the simulated objects live in.
pub const NAMESPACE: &str = "sim";
/// The annotation limit of the real API server (`TotalAnnotationSizeLimitB`).
pub const ANNOTATIONS_LIMIT: usize = 256 * 1024;
/// How many events the server keeps for watches to resume from (older ones are compacted).
const HISTORY: usize = 1000;

/// A request as the server sees it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: http::Method,
    /// The path, without the query.
    pub path: String,
    /// Query parameters, decoded.
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Request {
    /// From an HTTP request's parts and body.
    pub fn from_parts(parts: &http::request::Parts, body: Vec<u8>) -> Self {
        let query = parts
            .uri
            .query()
            .map(|q| {
                q.split('&')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                        (decode(k), decode(v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            query,
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body,
        }
    }

    /// True for a write (what may change the store).
    pub fn is_write(&self) -> bool {
        matches!(
            self.method,
            http::Method::PATCH | http::Method::PUT | http::Method::POST | http::Method::DELETE
        )
    }

    /// True for a watch.
    pub fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
    }
}

fn decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A complete answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// What the server does with a request.
#[derive(Debug)]
pub enum Outcome {
    /// A complete answer.
    Done(Response),
    /// A watch: the stream's first chunks (history, or the 410 error event), and the watch to
    /// feed on later writes (`None`: the stream ends after the chunks).
    Watch {
        chunks: Vec<Vec<u8>>,
        watch: Option<WatchId>,
    },
}

/// A watch stream's id.
pub type WatchId = u64;

#[derive(Debug, Clone)]
struct Object {
    annotations: Option<BTreeMap<String, String>>,
    rv: u64,
    uid: String,
    created: String,
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: &'static str,
    name: String,
    object: Value,
}

#[derive(Debug, Clone)]
struct Watch {
    id: WatchId,
    /// Only events of this object (`None`: every object).
    name: Option<String>,
}

/// The server's state.
#[derive(Debug, Default)]
pub struct ApiServer {
    revision: u64,
    objects: BTreeMap<String, Object>,
    history: VecDeque<Event>,
    /// Events at or below this resourceVersion are gone: a watch from there gets 410.
    compacted: u64,
    watches: Vec<Watch>,
    next_watch: WatchId,
    /// Chunks for live watches produced by the last write, drained by the world.
    pending: Vec<(WatchId, Vec<u8>)>,
}

impl ApiServer {
    pub fn new() -> Self {
        // What came before the server's start is forgotten, as etcd compacts: a watch from
        // such an old resourceVersion gets 410 Gone.
        Self {
            revision: 100,
            compacted: 100,
            ..Default::default()
        }
    }

    /// Creates the ConfigMap `name` (empty, no annotations).
    pub fn create(&mut self, name: &str) {
        self.revision += 1;
        let obj = Object {
            annotations: None,
            rv: self.revision,
            uid: format!("00000000-0000-4000-8000-{:012}", self.revision),
            created: "2026-01-01T00:00:00Z".into(),
        };
        self.objects.insert(name.to_owned(), obj);
        self.record("ADDED", name);
    }

    /// Writes one annotation of `name` directly (a peer's write, for scripted tests).
    pub fn put_annotation(&mut self, name: &str, key: &str, value: &str) {
        let current = self.objects.get(name).and_then(|o| o.annotations.clone());
        let mut next = current.clone().unwrap_or_default();
        next.insert(key.to_owned(), value.to_owned());
        let r = self.store(name, current, Some(next));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }

    /// The annotations of `name` now (for checks).
    pub fn annotations(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.objects.get(name).and_then(|o| o.annotations.clone())
    }

    /// The resourceVersion of the latest write.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Forgets the history up to now: watches from an older resourceVersion get 410.
    pub fn compact(&mut self) {
        self.compacted = self.revision;
        self.history.clear();
    }

    /// Ends every watch (a restart): returns their ids.
    pub fn close_watches(&mut self) -> Vec<WatchId> {
        self.watches.drain(..).map(|w| w.id).collect()
    }

    /// Ends one watch.
    pub fn close_watch(&mut self, id: WatchId) {
        self.watches.retain(|w| w.id != id);
    }

    /// Chunks produced for live watches since the last call.
    pub fn take_pending(&mut self) -> Vec<(WatchId, Vec<u8>)> {
        std::mem::take(&mut self.pending)
    }

    /// A bookmark chunk for watch `id` (at the current revision), if it is live.
    pub fn bookmark(&self, id: WatchId) -> Option<Vec<u8>> {
        self.watches.iter().any(|w| w.id == id).then(|| {
            line(&json!({
                "type": "BOOKMARK",
                "object": {"kind": "ConfigMap", "apiVersion": "v1",
                           "metadata": {"resourceVersion": self.revision.to_string()}}
            }))
        })
    }

    /// Handles `req`.
    pub fn handle(&mut self, req: &Request) -> Outcome {
        let Some(rest) = req
            .path
            .strip_prefix(&format!("/api/v1/namespaces/{NAMESPACE}/configmaps"))
        else {
            return Outcome::Done(status(
                404,
                "NotFound",
                "the server could not find the requested resource",
                None,
            ));
        };
        let name = rest.strip_prefix('/').filter(|n| !n.is_empty());
        match (&req.method, name) {
            (&http::Method::GET, None) if req.is_watch() => self.watch(req),
            (&http::Method::GET, None) => Outcome::Done(self.list(req)),
            (&http::Method::GET, Some(name)) => Outcome::Done(match self.objects.get(name) {
                Some(_) => ok(self.object_json(name)),
                None => not_found(name),
            }),
            (&http::Method::PATCH, Some(name)) => Outcome::Done(self.patch(name, req)),
            (&http::Method::PUT, Some(name)) => Outcome::Done(self.put(name, req)),
            _ => Outcome::Done(status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                None,
            )),
        }
    }

    fn object_json(&self, name: &str) -> Value {
        let o = &self.objects[name];
        let mut metadata = json!({
            "name": name,
            "namespace": NAMESPACE,
            "uid": o.uid,
            "resourceVersion": o.rv.to_string(),
            "creationTimestamp": o.created,
        });
        if let Some(a) = &o.annotations {
            metadata["annotations"] = json!(a);
        }
        json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": metadata})
    }

    fn record(&mut self, kind: &'static str, name: &str) {
        let object = self.object_json(name);
        let ev = Event {
            rv: self.revision,
            kind,
            name: name.to_owned(),
            object,
        };
        for w in &self.watches {
            if w.name.as_deref().is_none_or(|n| n == name) {
                self.pending.push((w.id, event_line(&ev)));
            }
        }
        self.history.push_back(ev);
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    fn selected(req: &Request) -> Option<String> {
        req.query
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("metadata.name="))
            .map(str::to_owned)
    }

    fn list(&self, req: &Request) -> Response {
        let only = Self::selected(req);
        let items: Vec<Value> = self
            .objects
            .keys()
            .filter(|n| only.as_deref().is_none_or(|o| o == n.as_str()))
            .map(|n| self.object_json(n))
            .collect();
        ok(json!({
            "kind": "ConfigMapList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": self.revision.to_string()},
            "items": items,
        }))
    }

    fn watch(&mut self, req: &Request) -> Outcome {
        let only = Self::selected(req);
        let from: u64 = req
            .query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.revision);
        if from < self.compacted {
            let gone = json!({
                "type": "ERROR",
                "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                           "status": "Failure",
                           "message": format!("too old resource version: {from} ({})", self.compacted),
                           "reason": "Expired", "code": 410}
            });
            return Outcome::Watch {
                chunks: vec![line(&gone)],
                watch: None,
            };
        }
        let chunks = self
            .history
            .iter()
            .filter(|e| e.rv > from && only.as_deref().is_none_or(|o| o == e.name))
            .map(event_line)
            .collect();
        self.next_watch += 1;
        let id = self.next_watch;
        self.watches.push(Watch { id, name: only });
        Outcome::Watch {
            chunks,
            watch: Some(id),
        }
    }

    fn patch(&mut self, name: &str, req: &Request) -> Response {
        if !self.objects.contains_key(name) {
            return not_found(name);
        }
        if req.content_type.as_deref() != Some("application/json-patch+json") {
            return status(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format",
                None,
            );
        }
        let ops: Vec<Value> = match serde_json::from_slice(&req.body) {
            Ok(Value::Array(ops)) => ops,
            _ => return status(400, "BadRequest", "the patch is not a JSON array", None),
        };
        let current = self.objects[name].annotations.clone();
        let mut annotations = current.clone();
        for op in &ops {
            if let Err(e) = apply(&mut annotations, op) {
                return e;
            }
        }
        self.store(name, current, annotations)
    }

    fn put(&mut self, name: &str, req: &Request) -> Response {
        let Some(obj) = self.objects.get(name) else {
            return not_found(name);
        };
        let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
            return status(400, "BadRequest", "the body is not JSON", None);
        };
        let rv = body["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if rv != obj.rv.to_string() {
            return status(
                409,
                "Conflict",
                &format!("Operation cannot be fulfilled on configmaps \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                Some(json!({"name": name, "kind": "configmaps"})),
            );
        }
        let annotations = match &body["metadata"]["annotations"] {
            Value::Object(m) => Some(
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            _ => None,
        };
        let current = obj.annotations.clone();
        self.store(name, current, annotations)
    }

    /// Stores `annotations` as `name`'s new annotations (validated), as one write.
    fn store(
        &mut self,
        name: &str,
        current: Option<BTreeMap<String, String>>,
        annotations: Option<BTreeMap<String, String>>,
    ) -> Response {
        // An emptied map is dropped, as the API server's encoding does.
        let annotations = annotations.filter(|a| !a.is_empty());
        let size: usize = annotations
            .iter()
            .flatten()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if size > ANNOTATIONS_LIMIT {
            return status(
                422,
                "Invalid",
                &format!("ConfigMap \"{name}\" is invalid: metadata.annotations: Too long: may not be more than {ANNOTATIONS_LIMIT} bytes"),
                Some(json!({"name": name, "kind": "ConfigMap", "causes": [
                    {"reason": "FieldValueTooLong", "message": format!("Too long: may not be more than {ANNOTATIONS_LIMIT} bytes"), "field": "metadata.annotations"}
                ]})),
            );
        }
        if annotations == current.filter(|a| !a.is_empty()) {
            // No change: nothing is written, the resourceVersion stays.
            return ok(self.object_json(name));
        }
        self.revision += 1;
        let obj = self.objects.get_mut(name).expect("checked");
        obj.annotations = annotations;
        obj.rv = self.revision;
        self.record("MODIFIED", name);
        ok(self.object_json(name))
    }
}

/// Applies one JSON Patch operation to the annotations (evanphx/json-patch's rules for the
/// paths lockgate and Go lockgate use: the map itself, and one key in it).
fn apply(annotations: &mut Option<BTreeMap<String, String>>, op: &Value) -> Result<(), Response> {
    let kind = op["op"].as_str().unwrap_or("");
    let path = op["path"].as_str().unwrap_or("");
    let value = &op["value"];
    let invalid = |msg: &str| status(422, "Invalid", msg, None);
    if path == "/metadata/annotations" {
        return match kind {
            "test" => {
                let now = match annotations {
                    Some(a) => json!(a),
                    None => Value::Null,
                };
                if &now == value {
                    Ok(())
                } else {
                    Err(failed_test())
                }
            }
            "add" | "replace" => match value {
                Value::Object(m) => {
                    *annotations = Some(
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect(),
                    );
                    Ok(())
                }
                _ => Err(invalid("annotations must be a map")),
            },
            "remove" => {
                *annotations = None;
                Ok(())
            }
            _ => Err(invalid("unsupported operation")),
        };
    }
    let Some(key) = path.strip_prefix("/metadata/annotations/") else {
        return Err(invalid("the simulated API server patches annotations only"));
    };
    let key = key.replace("~1", "/").replace("~0", "~");
    match kind {
        "test" => {
            let now = annotations.as_ref().and_then(|a| a.get(&key));
            let same = match (now, value) {
                (None, Value::Null) => true,
                (Some(v), Value::String(s)) => v == s,
                _ => false,
            };
            if same {
                Ok(())
            } else {
                Err(failed_test())
            }
        }
        "add" | "replace" => {
            let Some(a) = annotations.as_mut() else {
                // evanphx/json-patch: the parent must exist.
                return Err(status(
                    422,
                    "Invalid",
                    "doc is missing path: \"/metadata/annotations\"",
                    None,
                ));
            };
            if kind == "replace" && !a.contains_key(&key) {
                return Err(invalid("replace of a missing key"));
            }
            match value.as_str() {
                Some(v) => {
                    a.insert(key, v.to_owned());
                    Ok(())
                }
                None => Err(invalid("annotation values are strings")),
            }
        }
        "remove" => match annotations.as_mut().and_then(|a| a.remove(&key)) {
            Some(_) => Ok(()),
            None => Err(invalid("remove of a missing key")),
        },
        _ => Err(invalid("unsupported operation")),
    }
}

/// A failed `test`: what the real API server answers (422, no causes).
fn failed_test() -> Response {
    status(
        422,
        "Invalid",
        "the server rejected our request due to an error in our request",
        None,
    )
}

fn ok(v: Value) -> Response {
    Response {
        status: 200,
        body: serde_json::to_vec(&v).expect("JSON"),
    }
}

fn not_found(name: &str) -> Response {
    status(
        404,
        "NotFound",
        &format!("configmaps \"{name}\" not found"),
        Some(json!({"name": name, "kind": "configmaps"})),
    )
}

/// A `Status` answer.
pub fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response {
    let mut s = Map::new();
    s.insert("kind".into(), json!("Status"));
    s.insert("apiVersion".into(), json!("v1"));
    s.insert("metadata".into(), json!({}));
    s.insert("status".into(), json!("Failure"));
    s.insert("message".into(), json!(message));
    s.insert("reason".into(), json!(reason));
    if let Some(d) = details {
        s.insert("details".into(), d);
    }
    s.insert("code".into(), json!(code));
    Response {
        status: code,
        body: serde_json::to_vec(&Value::Object(s)).expect("JSON"),
    }
}

fn event_line(e: &Event) -> Vec<u8> {
    line(&json!({"type": e.kind, "object": e.object}))
}

fn line(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).expect("JSON");
    b.push(b'\n');
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: http::Method, path: &str, body: Value) -> Request {
        Request {
            method,
            path: path.into(),
            query: BTreeMap::new(),
            content_type: Some("application/json-patch+json".into()),
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    fn done(o: Outcome) -> Response {
        match o {
            Outcome::Done(r) => r,
            Outcome::Watch { .. } => panic!("a watch"),
        }
    }

    #[test]
    fn patches_test_and_write_one_key() {
        let mut s = ApiServer::new();
        s.create("locks");
        let p = "/api/v1/namespaces/sim/configmaps/locks";
        let first = json!([
            {"op": "test", "path": "/metadata/annotations", "value": null},
            {"op": "add", "path": "/metadata/annotations", "value": {"a/b": "1"}}
        ]);
        assert_eq!(
            done(s.handle(&req(http::Method::PATCH, p, first.clone()))).status,
            200
        );
        // The same patch again: the map exists now.
        assert_eq!(
            done(s.handle(&req(http::Method::PATCH, p, first))).status,
            422
        );
        let rv = s.revision();
        let set = json!([
            {"op": "test", "path": "/metadata/annotations/a~1b", "value": "1"},
            {"op": "add", "path": "/metadata/annotations/a~1b", "value": "2"}
        ]);
        assert_eq!(
            done(s.handle(&req(http::Method::PATCH, p, set.clone()))).status,
            200
        );
        assert_eq!(s.revision(), rv + 1);
        let r = done(s.handle(&req(http::Method::PATCH, p, set)));
        assert_eq!(r.status, 422);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v["details"]["causes"].is_null(), "{v}");
        let remove = json!([
            {"op": "test", "path": "/metadata/annotations/a~1b", "value": "2"},
            {"op": "remove", "path": "/metadata/annotations/a~1b"}
        ]);
        assert_eq!(
            done(s.handle(&req(http::Method::PATCH, p, remove))).status,
            200
        );
        assert_eq!(s.annotations("locks"), None, "an emptied map is dropped");
    }

    #[test]
    fn stale_puts_conflict_and_big_annotations_are_refused() {
        let mut s = ApiServer::new();
        s.create("locks");
        let p = "/api/v1/namespaces/sim/configmaps/locks";
        let put = |rv: u64, v: &str| {
            req(
                http::Method::PUT,
                p,
                json!({"metadata": {"name": "locks", "resourceVersion": rv.to_string(), "annotations": {"k": v}}}),
            )
        };
        let rv = s.revision();
        assert_eq!(done(s.handle(&put(rv, "x"))).status, 200);
        assert_eq!(done(s.handle(&put(rv, "y"))).status, 409);
        let big = "x".repeat(ANNOTATIONS_LIMIT);
        let r = done(s.handle(&put(s.revision(), &big)));
        assert_eq!(r.status, 422);
        assert!(String::from_utf8_lossy(&r.body).contains("FieldValueTooLong"));
    }

    #[test]
    fn watches_replay_history_and_expire() {
        let mut s = ApiServer::new();
        s.create("locks");
        let from = s.revision();
        let p = "/api/v1/namespaces/sim/configmaps/locks";
        let add = json!([{"op": "test", "path": "/metadata/annotations", "value": null},
                         {"op": "add", "path": "/metadata/annotations", "value": {"k": "v"}}]);
        done(s.handle(&req(http::Method::PATCH, p, add)));
        let mut w = req(
            http::Method::GET,
            "/api/v1/namespaces/sim/configmaps",
            Value::Null,
        );
        w.query = [
            ("watch".to_owned(), "true".to_owned()),
            ("resourceVersion".to_owned(), from.to_string()),
            ("fieldSelector".to_owned(), "metadata.name=locks".to_owned()),
        ]
        .into();
        match s.handle(&w) {
            Outcome::Watch { chunks, watch } => {
                assert_eq!(chunks.len(), 1);
                assert!(watch.is_some());
            }
            Outcome::Done(r) => panic!("{r:?}"),
        }
        s.compact();
        match s.handle(&w) {
            Outcome::Watch { chunks, watch } => {
                assert!(String::from_utf8_lossy(&chunks[0]).contains("410"));
                assert!(watch.is_none());
            }
            Outcome::Done(r) => panic!("{r:?}"),
        }
    }
}
