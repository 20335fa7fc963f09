//! A TCP proxy between one test's Kubernetes clients and the API server, with network faults on
//! demand: a [toxiproxy](https://github.com/Shopify/toxiproxy) proxy on the `toxiproxy-server`
//! that `testenv/kube up` starts (`LOCKGATE_TEST_TOXIPROXY`).
//!
//! ```no_run
//! # async fn demo() {
//! use lockgate_testenv::proxy::Proxy;
//! let proxy = Proxy::new().await; // a fresh proxy, passing everything
//! let client = proxy.client().await; // or hand proxy.kubeconfig() to a child process
//! proxy.lose_replies().await; // requests on open connections reach the API server, replies never come back
//! proxy.pass().await; // no fault
//! # }
//! ```
//!
//! # One fault at a time
//!
//! Each fault replaces the one before it. What a fault does to connections:
//!
//! | call | new connections | connections already open |
//! | --- | --- | --- |
//! | [`pass`](Proxy::pass) / [`restore`](Proxy::restore) | pass | pass |
//! | [`latency(d)`](Proxy::latency) | every reply chunk delayed by `d` (TLS handshake too) | the same |
//! | [`black_hole`](Proxy::black_hole) | accepted, never answered (hang in the TLS handshake) | requests and replies are swallowed; the connection stays open |
//! | [`reset`](Proxy::reset) | reset (RST) as soon as the client sends | reset at the next request |
//! | [`lose_replies`](Proxy::lose_replies) | hang in the TLS handshake: nothing is sent, nothing applied | the request reaches the API server and is applied; its reply never arrives |
//! | [`cut`](Proxy::cut) | refused | closed |
//!
//! So "applied, reply lost" needs a connection that was open before the fault: make one request
//! through the client first (a kube client keeps its connection for the next request).
//! Lifting a `black_hole` or `lose_replies` closes the connections it held.
//!
//! Calls to toxiproxy are short blocking HTTP requests on 127.0.0.1, run on tokio's blocking
//! pool; each has a 10 s timeout and panics with what failed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{required_env, unique};

/// How long one request to toxiproxy may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A proxy in front of the API server, deleted on drop. See the [module](self) for the faults.
pub struct Proxy {
    api: String,
    name: String,
    listen: String,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// A new proxy on a free port of 127.0.0.1 whose upstream is the API server
    /// (`LOCKGATE_TEST_APISERVER`), passing everything, with its own kubeconfig (the admin
    /// user's, pointed at the proxy; the serving certificate is for 127.0.0.1, so TLS still
    /// verifies).
    pub async fn new() -> Proxy {
        let api = required_env("LOCKGATE_TEST_TOXIPROXY");
        let upstream = required_env("LOCKGATE_TEST_APISERVER");
        let name = unique("proxy");
        let created = call(
            &api,
            "POST",
            "/proxies",
            Some(json!({"name": name, "listen": "127.0.0.1:0", "upstream": upstream, "enabled": true})),
        )
        .await;
        let listen = created["listen"]
            .as_str()
            .unwrap_or_else(|| panic!("toxiproxy: a created proxy without its address: {created}"))
            .to_owned();
        let dir = tempfile::tempdir().expect("a directory for the proxy's kubeconfig");
        let kubeconfig = dir.path().join("kubeconfig");
        write_kubeconfig(&kubeconfig, &format!("https://{listen}"));
        Proxy {
            api,
            name,
            listen,
            kubeconfig,
            _dir: dir,
        }
    }

    /// The proxy's name in toxiproxy.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the proxy listens: `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.listen
    }

    /// A kubeconfig for the admin user through this proxy, for child processes (`KUBECONFIG`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kube client (admin) through this proxy, built like [`crate::client`].
    pub async fn client(&self) -> kube::Client {
        let path = &self.kubeconfig;
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        lockgate::kubernetes::client_from_config(config, Duration::from_secs(10))
            .expect("kube client through the proxy")
    }

    /// No fault: every toxic removed, the proxy enabled.
    pub async fn pass(&self) {
        let toxics = self.call("GET", "/toxics", None).await;
        let toxics = toxics.as_array().unwrap_or_else(|| {
            panic!(
                "toxiproxy: the toxics of {} are not a list: {toxics}",
                self.name
            )
        });
        for t in toxics {
            let toxic = t["name"]
                .as_str()
                .unwrap_or_else(|| panic!("toxiproxy: a toxic without a name: {t}"));
            self.call("DELETE", &format!("/toxics/{toxic}"), None).await;
        }
        self.call("POST", "", Some(json!({"enabled": true}))).await;
    }

    /// Undoes [`cut`](Self::cut): the same as [`pass`](Self::pass).
    pub async fn restore(&self) {
        self.pass().await
    }

    /// Every chunk of the replies (API server to client) is delayed by `delay`.
    pub async fn latency(&self, delay: Duration) {
        self.pass().await;
        let ms = u64::try_from(delay.as_millis()).expect("latency in milliseconds");
        self.toxic(
            "latency",
            "latency",
            "downstream",
            json!({"latency": ms, "jitter": 0}),
        )
        .await;
    }

    /// Connections are accepted and never answered: nothing gets through in either direction
    /// and nothing is closed (toxiproxy's `timeout` toxic with timeout 0, both directions).
    pub async fn black_hole(&self) {
        self.pass().await;
        self.toxic(
            "black-hole-up",
            "timeout",
            "upstream",
            json!({"timeout": 0}),
        )
        .await;
        self.toxic(
            "black-hole-down",
            "timeout",
            "downstream",
            json!({"timeout": 0}),
        )
        .await;
    }

    /// Connections are reset (RST) as soon as data flows (toxiproxy's `reset_peer`, timeout 0,
    /// both directions): requests fail fast.
    pub async fn reset(&self) {
        self.pass().await;
        self.toxic("reset-up", "reset_peer", "upstream", json!({"timeout": 0}))
            .await;
        self.toxic(
            "reset-down",
            "reset_peer",
            "downstream",
            json!({"timeout": 0}),
        )
        .await;
    }

    /// "Applied, reply lost": requests still reach the API server (and take effect), replies
    /// never come back (`timeout` 0 on the downstream direction only). Only connections opened
    /// before this call can send a request: a new one hangs in its TLS handshake.
    pub async fn lose_replies(&self) {
        self.pass().await;
        self.toxic(
            "lose-replies",
            "timeout",
            "downstream",
            json!({"timeout": 0}),
        )
        .await;
    }

    /// The proxy is disabled: new connections are refused and open ones closed.
    pub async fn cut(&self) {
        self.pass().await;
        self.call("POST", "", Some(json!({"enabled": false}))).await;
    }

    async fn toxic(&self, name: &str, kind: &str, stream: &str, attributes: Value) {
        let body = json!({"name": name, "type": kind, "stream": stream, "toxicity": 1.0, "attributes": attributes});
        self.call("POST", "/toxics", Some(body)).await;
    }

    /// A request about this proxy: `path` is relative to `/proxies/NAME`.
    async fn call(&self, method: &'static str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/proxies/{}{path}", self.name);
        call(&self.api, method, &path, body).await
    }
}

impl Drop for Proxy {
    /// Deletes the proxy (closing its connections). One short blocking request on 127.0.0.1:
    /// Drop cannot await.
    fn drop(&mut self) {
        let path = format!("/proxies/{}", self.name);
        if let Err(e) = blocking_call(&self.api, "DELETE", &path, None) {
            if std::thread::panicking() {
                eprintln!("{e}");
            } else {
                panic!("{e}");
            }
        }
    }
}

/// The admin kubeconfig (`LOCKGATE_TEST_KUBECONFIG`) with every cluster's server set to
/// `server`, written to `path` (as JSON, which every kubeconfig reader accepts as YAML).
fn write_kubeconfig(path: &Path, server: &str) {
    let admin = required_env("LOCKGATE_TEST_KUBECONFIG");
    let mut kubeconfig =
        kube::config::Kubeconfig::read_from(&admin).unwrap_or_else(|e| panic!("{admin}: {e}"));
    for named in &mut kubeconfig.clusters {
        if let Some(cluster) = named.cluster.as_mut() {
            cluster.server = Some(server.to_owned());
        }
    }
    let text = serde_json::to_string_pretty(&kubeconfig).expect("serialize a kubeconfig");
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A request to toxiproxy's API on the blocking pool; panics with what failed.
async fn call(api: &str, method: &'static str, path: &str, body: Option<Value>) -> Value {
    let (api, path) = (api.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || blocking_call(&api, method, &path, body))
        .await
        .expect("the toxiproxy call's thread")
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One request to toxiproxy's API: its JSON answer (null when empty), or what went wrong.
fn blocking_call(
    api: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    let agent = AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .timeout_global(Some(CALL_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into()
    });
    let url = format!("{api}{path}");
    let what = || format!("toxiproxy: {method} {url}");
    let reply = match (method, body) {
        ("GET", _) => agent.get(&url).call(),
        ("DELETE", _) => agent.delete(&url).call(),
        ("POST", body) => agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body.unwrap_or(Value::Null).to_string()),
        _ => unreachable!("toxiproxy calls are GET, POST or DELETE"),
    };
    let mut reply = reply.map_err(|e| {
        format!(
            "{}: {e} (is the test environment up? `testenv/kube up`, then `source target/testenv/env.sh`)",
            what()
        )
    })?;
    let status = reply.status();
    let text = reply
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("{}: reading the answer: {e}", what()))?;
    if !status.is_success() {
        return Err(format!("{}: HTTP {status}: {text}", what()));
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).map_err(|e| format!("{}: not JSON ({e}): {text}", what()))
}
