//! The simulated API server held to the real one: the same request sequences go to the real
//! kube-apiserver of the test environment and to the simulator's, and their answers must agree
//! in what lockgate and Go lockgate act on — status codes, reasons, `details.causes`, the
//! annotations left, whether the resourceVersion moved, watch events and `410 Gone`, the `Date`
//! header. A schedule the simulator finds is then one a real cluster can produce.

use std::collections::BTreeMap;
use std::time::Duration;

use http::Method;
use http_body_util::BodyExt;
use lockgate_testenv::sim::api::{self, ApiServer, Outcome};
use lockgate_testenv::{client, empty_configmap, time_limit};
use serde_json::{json, Value};

/// One request, for either server (`{ns}` and `{name}` filled in per server).
struct Step {
    what: &'static str,
    method: Method,
    /// The path after `/api/v1/namespaces/{ns}/configmaps`.
    tail: String,
    query: Vec<(&'static str, String)>,
    content_type: Option<&'static str>,
    body: Value,
}

fn patch(what: &'static str, ops: Value) -> Step {
    Step {
        what,
        method: Method::PATCH,
        tail: "/{name}".into(),
        query: Vec::new(),
        content_type: Some("application/json-patch+json"),
        body: ops,
    }
}

/// What an answer says, in the terms compared.
#[derive(Debug, PartialEq)]
struct Said {
    status: u16,
    reason: Option<String>,
    causes: Vec<(String, String)>,
    /// The annotations of the object answered (a successful write or read).
    annotations: Option<BTreeMap<String, String>>,
    /// The resourceVersion answered, if any (compared as "moved or not" across steps).
    rv: Option<u64>,
    /// For watches: the first event's type and, for an error, its code.
    event: Option<(String, Option<u16>)>,
}

fn said(status: u16, body: &[u8], watch: bool) -> Said {
    let first_line = body.split(|b| *b == b'\n').next().unwrap_or_default();
    let v: Value =
        serde_json::from_slice(if watch { first_line } else { body }).unwrap_or(Value::Null);
    if watch {
        let event = v["type"]
            .as_str()
            .map(|t| (t.to_owned(), v["object"]["code"].as_u64().map(|c| c as u16)));
        let obj = &v["object"];
        return Said {
            status,
            reason: None,
            causes: Vec::new(),
            annotations: annotations(obj),
            rv: None,
            event,
        };
    }
    let causes = v["details"]["causes"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    (
                        c["reason"].as_str().unwrap_or("").to_owned(),
                        c["field"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Said {
        status,
        reason: (status != 200).then(|| v["reason"].as_str().unwrap_or("").to_owned()),
        causes,
        annotations: (status == 200).then(|| annotations(&v)).flatten(),
        rv: v["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse().ok()),
        event: None,
    }
}

fn annotations(obj: &Value) -> Option<BTreeMap<String, String>> {
    obj["metadata"]["annotations"].as_object().map(|m| {
        m.iter()
            .filter(|(k, _)| k.starts_with("lockgate.io/"))
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
            .collect()
    })
}

/// The sequence: everything the lockers' writes, reads and watches meet.
fn steps() -> Vec<Step> {
    let k = "/metadata/annotations/lockgate.io~1k";
    let k2 = "/metadata/annotations/lockgate.io~1k2";
    let big = "x".repeat(300 * 1024);
    vec![
        patch(
            "create the map",
            json!([
            {"op": "test", "path": "/metadata/annotations", "value": null},
            {"op": "add", "path": "/metadata/annotations", "value": {"lockgate.io/k": "v1"}}]),
        ),
        patch(
            "create the map again: it exists",
            json!([
            {"op": "test", "path": "/metadata/annotations", "value": null},
            {"op": "add", "path": "/metadata/annotations", "value": {"lockgate.io/k": "v1"}}]),
        ),
        patch(
            "a test that holds",
            json!([
            {"op": "test", "path": k, "value": "v1"}, {"op": "add", "path": k, "value": "v2"}]),
        ),
        patch(
            "a test that fails",
            json!([
            {"op": "test", "path": k, "value": "v1"}, {"op": "add", "path": k, "value": "v3"}]),
        ),
        patch(
            "absent? it is not",
            json!([
            {"op": "test", "path": k, "value": null}, {"op": "add", "path": k, "value": "v3"}]),
        ),
        patch(
            "absent? yes",
            json!([
            {"op": "test", "path": k2, "value": null}, {"op": "add", "path": k2, "value": "w"}]),
        ),
        patch(
            "the same value again: no write",
            json!([
            {"op": "test", "path": k2, "value": "w"}, {"op": "add", "path": k2, "value": "w"}]),
        ),
        patch(
            "two keys at once, one test failing",
            json!([
            {"op": "test", "path": k, "value": "v2"}, {"op": "add", "path": k, "value": "v4"},
            {"op": "test", "path": k2, "value": "nope"}, {"op": "add", "path": k2, "value": "z"}]),
        ),
        patch(
            "over the annotation limit",
            json!([
            {"op": "test", "path": k2, "value": "w"}, {"op": "add", "path": k2, "value": big}]),
        ),
        patch(
            "remove one",
            json!([
            {"op": "test", "path": k2, "value": "w"}, {"op": "remove", "path": k2}]),
        ),
        patch(
            "remove the last: the map goes",
            json!([
            {"op": "test", "path": k, "value": "v2"}, {"op": "remove", "path": k}]),
        ),
        Step {
            what: "read it",
            method: Method::GET,
            tail: "/{name}".into(),
            query: Vec::new(),
            content_type: None,
            body: Value::Null,
        },
        Step {
            what: "a stale PUT",
            method: Method::PUT,
            tail: "/{name}".into(),
            query: Vec::new(),
            content_type: Some("application/json"),
            body: json!({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "{name}", "resourceVersion": "1",
                                      "annotations": {"lockgate.io/k": "put"}}}),
        },
        Step {
            what: "a missing object",
            method: Method::GET,
            tail: "/no-such-object-{name}".into(),
            query: Vec::new(),
            content_type: None,
            body: Value::Null,
        },
    ]
}

fn fill(s: &str, ns: &str, name: &str) -> String {
    s.replace("{ns}", ns).replace("{name}", name)
}

async fn real(kube: &kube::Client, ns: &str, name: &str, step: &Step, watch: bool) -> (Said, bool) {
    let mut uri = format!(
        "/api/v1/namespaces/{ns}/configmaps{}",
        fill(&step.tail, ns, name)
    );
    if !step.query.is_empty() {
        let q: Vec<String> = step
            .query
            .iter()
            .map(|(k, v)| format!("{k}={}", fill(v, ns, name).replace('=', "%3D")))
            .collect();
        uri = format!("{uri}?{}", q.join("&"));
    }
    let mut req = http::Request::builder()
        .method(step.method.clone())
        .uri(uri);
    if let Some(ct) = step.content_type {
        req = req.header(http::header::CONTENT_TYPE, ct);
    }
    let body = if step.body.is_null() {
        Vec::new()
    } else {
        fill(&step.body.to_string(), ns, name).into_bytes()
    };
    let res = kube
        .send(req.body(kube::client::Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let dated = res.headers().get(http::header::DATE).is_some();
    let mut body = res.into_body();
    let bytes = if watch {
        // The first event of the stream.
        let mut got = Vec::new();
        while !got.contains(&b'\n') {
            match tokio::time::timeout(Duration::from_secs(10), body.frame()).await {
                Ok(Some(Ok(f))) => {
                    got.extend_from_slice(f.data_ref().map(|d| d.as_ref()).unwrap_or_default())
                }
                _ => break,
            }
        }
        got
    } else {
        body.collect().await.unwrap().to_bytes().to_vec()
    };
    (said(status, &bytes, watch), dated)
}

fn simulated(server: &mut ApiServer, step: &Step, watch: bool) -> Said {
    let ns = api::NAMESPACE;
    let name = lockgate_testenv::sim::OBJECT;
    let req = api::Request {
        method: step.method.clone(),
        path: format!(
            "/api/v1/namespaces/{ns}/configmaps{}",
            fill(&step.tail, ns, name)
        ),
        query: step
            .query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), fill(v, ns, name)))
            .collect(),
        content_type: step.content_type.map(str::to_owned),
        body: if step.body.is_null() {
            Vec::new()
        } else {
            fill(&step.body.to_string(), ns, name).into_bytes()
        },
    };
    match server.handle(&req) {
        Outcome::Done(r) => said(r.status, &r.body, watch),
        Outcome::Watch { chunks, .. } => said(200, &chunks.concat(), watch),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_api_server_answers_as_the_real_one() {
    time_limit(Duration::from_secs(120));
    let kube = client(false).await;
    let name = empty_configmap("default").await;
    let mut sim = ApiServer::new();
    sim.create(lockgate_testenv::sim::OBJECT);
    let (mut real_rv, mut sim_rv) = (None, None);
    let mut disagreements = Vec::new();
    for step in steps() {
        let (r, dated) = real(&kube, "default", &name, &step, false).await;
        assert!(dated, "{}: the real server sends Date", step.what);
        let s = simulated(&mut sim, &step, false);
        let moved = |prev: &mut Option<u64>, now: Option<u64>| {
            let m = match (*prev, now) {
                (Some(p), Some(n)) => Some(n != p),
                _ => None,
            };
            if now.is_some() {
                *prev = now;
            }
            m
        };
        let (rm, sm) = (moved(&mut real_rv, r.rv), moved(&mut sim_rv, s.rv));
        let strip = |x: &Said| Said {
            rv: None,
            ..Said {
                status: x.status,
                reason: x.reason.clone(),
                causes: x.causes.clone(),
                annotations: x.annotations.clone(),
                rv: None,
                event: x.event.clone(),
            }
        };
        if strip(&r) != strip(&s) || rm != sm {
            disagreements.push(format!(
                "{}:\n  real {r:?} (rv moved {rm:?})\n  sim  {s:?} (rv moved {sm:?})",
                step.what
            ));
        }
    }
    // Watches: from the last resourceVersion, the next write arrives; from a forgotten one, 410.
    let from = real_rv.unwrap();
    let watch = |rv: String| Step {
        what: "watch",
        method: Method::GET,
        tail: String::new(),
        query: vec![
            ("watch", "true".into()),
            ("resourceVersion", rv),
            ("fieldSelector", "metadata.name={name}".into()),
            ("timeoutSeconds", "5".into()),
        ],
        content_type: None,
        body: Value::Null,
    };
    let write = patch(
        "a write to watch",
        json!([
        {"op": "test", "path": "/metadata/annotations", "value": null},
        {"op": "add", "path": "/metadata/annotations", "value": {"lockgate.io/w": "1"}}]),
    );
    let _ = real(&kube, "default", &name, &write, false).await;
    let _ = simulated(&mut sim, &write, false);
    let (r, _) = real(&kube, "default", &name, &watch(from.to_string()), true).await;
    let s = simulated(&mut sim, &watch(sim_rv.unwrap().to_string()), true);
    if r != s {
        disagreements.push(format!(
            "watch from the last version:\n  real {r:?}\n  sim  {s:?}"
        ));
    }
    let (r, _) = real(&kube, "default", &name, &watch("1".into()), true).await;
    let s = simulated(&mut sim, &watch("1".into()), true);
    if r.event != s.event || r.status != s.status {
        disagreements.push(format!(
            "watch from a forgotten version:\n  real {r:?}\n  sim  {s:?}"
        ));
    }
    assert!(
        disagreements.is_empty(),
        "the simulated API server disagrees with the real one:\n{}",
        disagreements.join("\n")
    );
}
