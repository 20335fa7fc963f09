//! The server over real sockets: every bad input gets a 4xx with a JSON `err`, slow clients are
//! cut off, long polls are answered at once, shutdown is orderly, TLS works.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

const LIMIT: Duration = Duration::from_secs(30);

struct TestServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(config: ServerConfig) -> TestServer {
    let store = Arc::new(MemoryStore::new(MemoryConfig::default().grace(Duration::ZERO)).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(Server::new(store, config).unwrap().serve(listener, async {
        let _ = stopped.await;
    }));
    TestServer {
        addr,
        stop: Some(stop),
        task,
    }
}

impl TestServer {
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("the server stops within the shutdown timeout")
            .unwrap();
    }
}

/// Sends `bytes` on a new connection and reads the answer until the server closes it.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_answer(&mut s).await
}

async fn read_answer(s: &mut TcpStream) -> (u16, Value) {
    let mut buf = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut buf))
        .await
        .expect("answer in time")
        .unwrap();
    parse(&buf)
}

fn parse(buf: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: body {body:?}"));
    (status, json)
}

/// A request as Go's client sends it: no Content-Type.
fn request(method: &str, path: &str, body: &str, auth: Option<&str>) -> Vec<u8> {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    raw(addr, &request("POST", path, &body.to_string(), None)).await
}

async fn acquire(addr: SocketAddr, name: &str) -> Value {
    let (status, v) = post(
        addr,
        "/acquire",
        &json!({"lockName": name, "opts": {"shared": false}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["err"], "", "{v}");
    v["lockHandle"].clone()
}

#[tokio::test]
async fn every_bad_input_is_a_4xx_with_a_json_err_and_other_locks_are_untouched() {
    tokio::time::timeout(LIMIT, async {
        let srv = start(ServerConfig::default().body_limit(4096)).await;
        let a = srv.addr;
        let held = acquire(a, "held").await;
        let long = "x".repeat(crate::MAX_NAME_LEN + 1);
        let cases: Vec<(Vec<u8>, u16, &str)> = vec![
            (
                request("POST", "/acquire", "{not json", None),
                400,
                "bad_request",
            ),
            (request("POST", "/acquire", "", None), 400, "bad_request"),
            (request("POST", "/acquire", "[]", None), 400, "bad_request"),
            (
                request("POST", "/acquire", r#"{"lockName":5}"#, None),
                400,
                "bad_request",
            ),
            (
                request("POST", "/acquire", r#"{"opts":{}}"#, None),
                400,
                "bad_request",
            ),
            (
                request(
                    "POST",
                    "/acquire",
                    r#"{"lockName":"a","opts":{"shared":"yes"}}"#,
                    None,
                ),
                400,
                "bad_request",
            ),
            (
                request(
                    "POST",
                    "/acquire",
                    r#"{"lockName":"a","opts":{"waitMs":-1}}"#,
                    None,
                ),
                400,
                "bad_request",
            ),
            (
                request(
                    "POST",
                    "/acquire",
                    r#"{"lockName":"a","opts":{"acquirerId":"a\u0000b"}}"#,
                    None,
                ),
                400,
                "bad_request",
            ),
            (
                request("POST", "/acquire", r#"{"lockName":"a"} trailing"#, None),
                400,
                "bad_request",
            ),
            (
                request("POST", "/acquire", r#"{"lockName":""}"#, None),
                400,
                "invalid_name",
            ),
            (
                request("POST", "/acquire", r#"{"lockName":"a\nb"}"#, None),
                400,
                "invalid_name",
            ),
            (
                request(
                    "POST",
                    "/acquire",
                    &json!({"lockName": long}).to_string(),
                    None,
                ),
                400,
                "invalid_name",
            ),
            (
                request(
                    "POST",
                    "/acquire",
                    &json!({"lockName": "x".repeat(5000)}).to_string(),
                    None,
                ),
                413,
                "payload_too_large",
            ),
            (
                request(
                    "POST",
                    "/renew-lease",
                    r#"{"lockHandle":{"uuid":"nope","lockName":"held"}}"#,
                    None,
                ),
                400,
                "bad_request",
            ),
            (
                request("POST", "/renew-lease", r#"{"lockHandle":7}"#, None),
                400,
                "bad_request",
            ),
            (
                request("POST", "/release", r#"{}"#, None),
                400,
                "bad_request",
            ),
            (
                request(
                    "POST",
                    "/release",
                    r#"{"lockHandle":{"uuid":"","lockName":""}}"#,
                    None,
                ),
                400,
                "bad_request",
            ),
            (
                request("GET", "/acquire", "", None),
                405,
                "method_not_allowed",
            ),
            (
                request("POST", "/status", "", None),
                405,
                "method_not_allowed",
            ),
            (request("GET", "/nothing-here", "", None), 404, "not_found"),
            (
                request("GET", "/status?limit=many", "", None),
                400,
                "bad_request",
            ),
            (
                request("GET", "/status?name=", "", None),
                400,
                "invalid_name",
            ),
        ];
        for (bytes, status, code) in cases {
            let (got, v) = raw(a, &bytes).await;
            let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned();
            assert_eq!(got, status, "{shown}: {v}");
            assert_eq!(v["code"], code, "{shown}: {v}");
            assert!(
                v["err"].as_str().is_some_and(|e| !e.is_empty()),
                "{shown}: {v}"
            );
        }
        // Requests hyper cannot parse get a JSON answer too.
        let big_header = format!(
            "GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
            "a".repeat(70_000)
        );
        let long_uri = format!(
            "GET /{} HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "u".repeat(70_000)
        );
        for (bytes, status) in [
            (b"GARBAGE\r\n\r\n".to_vec(), 400),
            (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(), 400),
            (big_header.into_bytes(), 431),
            (long_uri.into_bytes(), 431),
        ] {
            let (got, v) = raw(a, &bytes).await;
            assert_eq!(
                (got, v["code"].as_str()),
                (status, Some("bad_request")),
                "{v}"
            );
        }
        // A body announced far over the limit is refused without reading it.
        let (got, v) = raw(
            a,
            b"POST /acquire HTTP/1.1\r\nHost: localhost\r\nContent-Length: 999999999\r\n\r\n{",
        )
        .await;
        assert_eq!((got, v["code"].as_str()), (413, Some("payload_too_large")));
        // Unknown handles are Go's lease outcomes: 200, so Go's client reports the lost lease.
        let unknown =
            json!({"lockHandle": {"uuid": uuid::Uuid::new_v4().to_string(), "lockName": "held"}});
        let (got, v) = post(a, "/renew-lease", &unknown).await;
        assert_eq!((got, v["err"].as_str()), (200, Some("lock already leased")));
        let (got, v) = post(
            a,
            "/release",
            &json!({"lockHandle": {"uuid": uuid::Uuid::new_v4().to_string(), "lockName": "free"}}),
        )
        .await;
        assert_eq!(
            (got, v["err"].as_str()),
            (200, Some("no existing lock lease found"))
        );
        assert_eq!(v["code"], "no_existing_lock_lease_found");
        // The held lock is untouched.
        let (got, v) = post(a, "/renew-lease", &json!({"lockHandle": held})).await;
        assert_eq!(
            (got, v["err"].as_str(), v["ttlMs"].as_u64()),
            (200, Some(""), Some(10_000))
        );
        let (_, v) = post(a, "/acquire", &json!({"lockName": "held", "opts": null})).await;
        assert_eq!(v["err"], "should wait");
        let (got, v) = post(a, "/release", &json!({"lockHandle": held})).await;
        assert_eq!((got, v), (200, json!({"err": ""})));
        srv.shutdown().await;
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn the_token_is_required_everywhere_but_healthz() {
    tokio::time::timeout(LIMIT, async {
        let srv = start(ServerConfig::default().token("s3cret")).await;
        let a = srv.addr;
        let body = r#"{"lockName":"t","opts":{"shared":true}}"#;
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Bearer s3cret2"),
            Some("Basic !!"),
            Some("Token s3cret"),
        ] {
            let mut s = TcpStream::connect(a).await.unwrap();
            s.write_all(&request("POST", "/acquire", body, auth))
                .await
                .unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf).to_lowercase();
            assert!(text.contains("www-authenticate: bearer"), "{text}");
            let (status, v) = parse(&buf);
            assert_eq!(
                (status, v["code"].as_str()),
                (401, Some("unauthorized")),
                "{auth:?}"
            );
        }
        for path in ["/status", "/metrics"] {
            let (status, _) = raw(a, &request("GET", path, "", None)).await;
            assert_eq!(status, 401);
        }
        let (status, v) = raw(a, &request("GET", "/healthz", "", None)).await;
        assert_eq!((status, v["status"].as_str()), (200, Some("ok")));
        let (status, v) = raw(a, &request("POST", "/acquire", body, Some("Bearer s3cret"))).await;
        assert_eq!((status, v["err"].as_str()), (200, Some("")));
        // What Go's client sends for http://lockgate:s3cret@host/.
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("lockgate:s3cret")
        );
        use base64::Engine as _;
        let (status, v) = raw(a, &request("POST", "/acquire", body, Some(&basic))).await;
        assert_eq!((status, v["err"].as_str()), (200, Some("")));
        srv.shutdown().await;
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn a_client_trickling_its_head_or_body_is_cut_off_with_a_json_408() {
    tokio::time::timeout(LIMIT, async {
        let srv = start(
            ServerConfig::default()
                .header_timeout(Duration::from_millis(400))
                .body_timeout(Duration::from_millis(400)),
        )
        .await;
        let a = srv.addr;
        let held = acquire(a, "other").await;

        // The head, one byte every 50 ms.
        let mut s = TcpStream::connect(a).await.unwrap();
        let start = Instant::now();
        let bytes = request("POST", "/acquire", r#"{"lockName":"slow"}"#, None);
        for b in &bytes {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if start.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        eprintln!("head trickled for {:?}", start.elapsed());
        let (status, v) = read_answer(&mut s).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (408, Some("request_timeout")),
            "{v}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "cut off late: {:?}",
            start.elapsed()
        );

        // A complete head, then the body one byte every 100 ms.
        let mut s = TcpStream::connect(a).await.unwrap();
        s.write_all(b"POST /acquire HTTP/1.1\r\nHost: localhost\r\nContent-Length: 40\r\n\r\n")
            .await
            .unwrap();
        let start = Instant::now();
        let trickle = async {
            for b in br#"{"lockName":"slow-body","opts":{}}      "# {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(700), trickle).await;
        eprintln!("body trickled for {:?}", start.elapsed());
        let (status, v) = read_answer(&mut s).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (408, Some("request_timeout")),
            "{v}"
        );
        assert!(start.elapsed() < Duration::from_secs(2));

        // A connection that sends nothing is closed too.
        let mut s = TcpStream::connect(a).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf))
            .await
            .expect("silent connection closed")
            .unwrap();

        let (status, v) = post(a, "/renew-lease", &json!({"lockHandle": held})).await;
        assert_eq!((status, v["err"].as_str()), (200, Some("")));
        srv.shutdown().await;
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_only() {
    tokio::time::timeout(LIMIT, async {
        let srv = start(
            ServerConfig::default()
                .header_timeout(Duration::from_millis(200))
                .idle_timeout(Duration::from_millis(800)),
        )
        .await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let body = r#"{"lockName":"k","opts":{}}"#;
        let req = format!(
            "POST /acquire HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let idle = Instant::now();
        // Idle longer than the header timeout: still open.
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(req.as_bytes()).await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let idle2 = Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed")
            .unwrap();
        assert_eq!(n, 0, "closed without an answer");
        assert!(
            idle2.elapsed() >= Duration::from_millis(750),
            "{:?}",
            idle.elapsed()
        );
        srv.shutdown().await;
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn a_long_poll_waiter_is_granted_the_moment_the_lock_is_released() {
    tokio::time::timeout(LIMIT, async {
        let srv = start(ServerConfig::default()).await;
        let a = srv.addr;
        for round in 0..5 {
            let held = acquire(a, "handoff").await;
            let waiter = tokio::spawn(async move {
                let r = post(
                    a,
                    "/acquire",
                    &json!({"lockName": "handoff", "opts": {"waitMs": 20_000, "acquirerId": "w"}}),
                )
                .await;
                (Instant::now(), r)
            });
            // The waiter is proven to be waiting before the release.
            loop {
                let (_, st) = raw(a, &request("GET", "/status?name=handoff", "", None)).await;
                if st["locks"][0]["waiters"][0]["longPoll"] == true {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let released = Instant::now();
            let (status, _) = post(a, "/release", &json!({"lockHandle": held})).await;
            assert_eq!(status, 200);
            let (granted_at, (status, v)) = waiter.await.unwrap();
            assert_eq!((status, v["err"].as_str()), (200, Some("")), "{v}");
            let handoff = granted_at - released;
            assert!(
                handoff < Duration::from_millis(200),
                "round {round}: {handoff:?}"
            );
            assert!(v["fencingToken"].as_u64().is_some());
            post(a, "/release", &json!({"lockHandle": v["lockHandle"]})).await;
        }
        srv.shutdown().await;
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn a_long_poll_that_times_out_answers_should_wait() {
    tokio::time::timeout(LIMIT, async {
        let srv = start(ServerConfig::default().max_wait(Duration::from_millis(300))).await;
        let a = srv.addr;
        acquire(a, "busy").await;
        let start = Instant::now();
        // Asks for 60 s; the server's cap is 300 ms.
        let (status, v) = post(
            a,
            "/acquire",
            &json!({"lockName": "busy", "opts": {"waitMs": 60_000}}),
        )
        .await;
        assert_eq!((status, v["code"].as_str()), (200, Some("should_wait")));
        assert!(start.elapsed() >= Duration::from_millis(290));
        assert!(start.elapsed() < Duration::from_secs(5));
        srv.shutdown().await;
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn shutdown_answers_open_long_polls_and_stops_accepting() {
    tokio::time::timeout(LIMIT, async {
        let srv = start(ServerConfig::default()).await;
        let a = srv.addr;
        acquire(a, "s").await;
        let waiter = tokio::spawn(async move {
            post(
                a,
                "/acquire",
                &json!({"lockName": "s", "opts": {"waitMs": 20_000}}),
            )
            .await
        });
        loop {
            let (_, st) = raw(a, &request("GET", "/status?name=s", "", None)).await;
            if st["locks"][0]["waiters"][0]["longPoll"] == true {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = Instant::now();
        srv.shutdown().await;
        assert!(started.elapsed() < Duration::from_secs(2));
        let (status, v) = waiter.await.unwrap();
        assert_eq!(
            (status, v["code"].as_str()),
            (503, Some("shutting_down")),
            "{v}"
        );
        assert!(TcpStream::connect(a).await.is_err(), "still accepting");
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    tokio::time::timeout(LIMIT, async {
        let srv = start(ServerConfig::default()).await;
        let a = srv.addr;
        let h = acquire(a, "m").await;
        post(a, "/acquire", &json!({"lockName": "m"})).await;
        post(a, "/release", &json!({"lockHandle": h})).await;
        let mut s = TcpStream::connect(a).await.unwrap();
        s.write_all(&request("GET", "/metrics", "", None))
            .await
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf);
        for want in [
            "lockgate_locks_held 0",
            "lockgate_leases_held 0",
            "lockgate_waiters 0",
            "lockgate_grants_total 1",
            "lockgate_releases_total 1",
            "lockgate_lease_expiries_total 0",
            r#"lockgate_http_requests_total{endpoint="acquire",status="200",code="should_wait"} 1"#,
            r#"lockgate_http_request_duration_seconds_count{endpoint="release"} 1"#,
            "lockgate_http_connections",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
        let (status, v) = raw(a, &request("GET", "/healthz", "", None)).await;
        assert_eq!((status, v), (200, json!({"status": "ok"})));
        srv.shutdown().await;
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn serves_https_with_alpn() {
    use tokio_rustls::rustls;
    tokio::time::timeout(LIMIT, async {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let tls = TlsConfig::from_pem(
            cert.cert.pem().as_bytes(),
            cert.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        assert!(matches!(
            TlsConfig::from_pem(b"", cert.signing_key.serialize_pem().as_bytes()),
            Err(TlsError::NoCertificate)
        ));
        assert!(matches!(
            TlsConfig::from_pem(cert.cert.pem().as_bytes(), b"junk"),
            Err(TlsError::NoKey)
        ));
        let srv = start(ServerConfig::default().tls(tls)).await;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(srv.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut s = connector.connect(name, tcp).await.unwrap();
        s.write_all(&request("POST", "/acquire", r#"{"lockName":"tls"}"#, None))
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let (status, v) = parse(&buf);
        assert_eq!((status, v["err"].as_str()), (200, Some("")), "{v}");

        // Plain HTTP on the TLS port gets no answer, and does not hurt the server.
        let mut plain = TcpStream::connect(srv.addr).await.unwrap();
        plain
            .write_all(&request("GET", "/healthz", "", None))
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
        assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
        srv.shutdown().await;
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn serves_http2_with_prior_knowledge() {
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    tokio::time::timeout(LIMIT, async {
        let srv = start(ServerConfig::default().idle_timeout(Duration::from_millis(500))).await;
        let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let post = |name: &str, wait: u64| {
            hyper::Request::post(format!("http://{}/acquire", srv.addr))
                .body(Full::from(
                    json!({"lockName": name, "opts": {"waitMs": wait}}).to_string(),
                ))
                .unwrap()
        };
        let body = |resp: hyper::Response<hyper::body::Incoming>| async move {
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<Value>(&bytes).unwrap()
        };
        let resp = client.request(post("h2", 0)).await.unwrap();
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let held = body(resp).await;
        assert_eq!(held["err"], "");
        // Streams multiplex: a long poll and the release on one connection.
        let waiting = tokio::spawn(client.request(post("h2", 10_000)));
        loop {
            let (_, st) = raw(srv.addr, &request("GET", "/status?name=h2", "", None)).await;
            if st["locks"][0]["waiters"][0]["longPoll"] == true {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let release = hyper::Request::post(format!("http://{}/release", srv.addr))
            .body(Full::from(
                json!({"lockHandle": held["lockHandle"]}).to_string(),
            ))
            .unwrap();
        assert_eq!(
            body(client.request(release).await.unwrap()).await["err"],
            ""
        );
        let granted = body(waiting.await.unwrap().unwrap()).await;
        assert_eq!(granted["err"], "", "{granted}");
        // An idle HTTP/2 connection is closed after the idle timeout; the client reconnects.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(&request("GET", "/metrics", "", None))
            .await
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf);
        // Only the connection asking is open.
        assert!(text.contains("lockgate_http_connections 1\n"), "{text}");
        let again = body(client.request(post("h2-other", 0)).await.unwrap()).await;
        assert_eq!(again["err"], "");
        srv.shutdown().await;
    })
    .await
    .expect("in time");
}
