//! Reads and conditional writes of lock annotations on one object.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

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

/// Why a write did not happen.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// An annotation no longer had the expected value (a failed JSON Patch `test`, answered
    /// 422 without causes, or a 409).
    Conflict,
    /// Anything else, already typed for the user.
    Failed(Error),
}

impl From<Error> for WriteError {
    fn from(e: Error) -> Self {
        Self::Failed(e)
    }
}

/// The object the locks live on.
#[derive(Clone)]
pub(crate) struct Store {
    pub api: Api<DynamicObject>,
    pub name: String,
    /// "configmaps default/locks", for messages.
    pub describe: String,
    pub timeout: Duration,
    /// The ConfigMap to create when the object is missing, if enabled.
    pub create_missing: bool,
    /// Whether the object had an annotations map when we last saw it: a blind first write must
    /// know whether to add a key or the whole map (the API server drops an emptied map).
    pub had_annotations: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn pointer(key: &str) -> String {
    format!(
        "/metadata/annotations/{}",
        key.replace('~', "~0").replace('/', "~1")
    )
}

impl Store {
    fn seen(&self, snap: Snapshot) -> Snapshot {
        self.had_annotations.store(
            snap.annotations.is_some(),
            std::sync::atomic::Ordering::Relaxed,
        );
        snap
    }

    /// What a blind first write should assume: the lock absent, the annotations map as last seen.
    pub fn assumed(&self) -> Snapshot {
        let exists = self
            .had_annotations
            .load(std::sync::atomic::Ordering::Relaxed);
        Snapshot {
            annotations: exists.then(Default::default),
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

    fn timed_out(&self, verb: &'static str) -> Error {
        Error::Unreachable {
            resource: self.describe.clone(),
            source: format!("{verb} did not answer within {:?}", self.timeout).into(),
        }
    }

    /// GET the object.
    pub async fn get(&self) -> Result<Snapshot, Error> {
        loop {
            match tokio::time::timeout(self.timeout, self.api.get(&self.name)).await {
                Err(_) => return Err(self.timed_out("get")),
                Ok(Ok(obj)) => return Ok(Snapshot::from_object(&obj)),
                Ok(Err(kube::Error::Api(s))) if s.code == 404 && self.create_missing => {
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
            Err(_) => Err(self.timed_out("create")),
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
        let patch: Patch<()> =
            Patch::Json(serde_json::from_value(Value::Array(ops)).expect("valid JSON Patch"));
        let params = PatchParams::default();
        loop {
            let sent = self.api.patch(&self.name, &params, &patch);
            match tokio::time::timeout(self.timeout, sent).await {
                Err(_) => return Err(self.timed_out("patch").into()),
                Ok(Ok(obj)) => return Ok(self.seen(Snapshot::from_object(&obj))),
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
                            return Err(Error::AnnotationsFull {
                                resource: self.describe.clone(),
                            }
                            .into());
                        }
                        return Err(self.error("patch", kube::Error::Api(s)).into());
                    }
                    404 if self.create_missing => self.create().await?,
                    _ => return Err(self.error("patch", kube::Error::Api(s)).into()),
                },
                Ok(Err(e)) => return Err(self.error("patch", e).into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_pointers_escape_the_key() {
        assert_eq!(
            super::pointer("lockgate.io/ab"),
            "/metadata/annotations/lockgate.io~1ab"
        );
        assert_eq!(super::pointer("a~b"), "/metadata/annotations/a~0b");
    }
}
