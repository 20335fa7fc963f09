//! Settings refused with typed errors, and the token and certificate changed while serving.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn store() -> Arc<MemoryStore> {
    Arc::new(MemoryStore::new(MemoryConfig::default().grace(Duration::ZERO)).unwrap())
}

/// Issue 18: `token("")` was accepted (and then compared against the digest of nothing), and
/// durations that overflow the clock panicked later.
#[test]
fn an_empty_token_and_impossible_durations_are_typed_errors() {
    let e = Server::new(store(), ServerConfig::default().token("")).unwrap_err();
    assert!(matches!(e, ConfigError::EmptyToken), "{e:?}");
    for config in [
        ServerConfig::default().header_timeout(Duration::ZERO),
        ServerConfig::default().idle_timeout(Duration::MAX),
        ServerConfig::default().send_timeout(Duration::from_secs(100_000)),
        ServerConfig::default().drain_delay(Duration::MAX),
    ] {
        let e = Server::new(store(), config).unwrap_err();
        assert!(matches!(e, ConfigError::OutOfRange { .. }), "{e:?}");
    }
    let e = Server::new(store(), ServerConfig::default().max_connections(0)).unwrap_err();
    assert!(matches!(e, ConfigError::Zero { .. }), "{e:?}");
    let server = Server::new(store(), ServerConfig::default()).unwrap();
    assert!(matches!(
        server.handle().set_token(""),
        Err(ConfigError::EmptyToken)
    ));
    let tls = TlsConfig::from_pem(CERT_A.0.as_bytes(), CERT_A.1.as_bytes());
    let tls = tls.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        server.handle().set_tls(tls),
        Err(ConfigError::TlsMismatch { tls: false })
    ));
}

struct Cert(String, String, rustls::pki_types::CertificateDer<'static>);

fn cert() -> Cert {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    Cert(
        c.cert.pem(),
        c.signing_key.serialize_pem(),
        c.cert.der().clone(),
    )
}

static CERT_A: std::sync::LazyLock<(String, String)> = std::sync::LazyLock::new(|| {
    let c = cert();
    (c.0, c.1)
});

/// The certificate a new TLS connection to `addr` is shown.
async fn presented(addr: std::net::SocketAddr, roots: &[&Cert]) -> Vec<u8> {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c.2.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    assert!(out.starts_with(b"HTTP/1.1 200"));
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Issue 18: a new certificate needed a restart (which ends every memory-store lease). The
/// handle swaps it for new handshakes.
#[tokio::test]
async fn a_new_certificate_is_shown_to_new_connections() {
    let (a, b) = (cert(), cert());
    let tls = TlsConfig::from_pem(a.0.as_bytes(), a.1.as_bytes()).unwrap();
    let server = Server::new(store(), ServerConfig::default().tls(tls)).unwrap();
    let handle = server.handle();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    assert_eq!(presented(addr, &[&a, &b]).await, a.2.to_vec());
    handle
        .set_tls(TlsConfig::from_pem(b.0.as_bytes(), b.1.as_bytes()).unwrap())
        .unwrap();
    assert_eq!(presented(addr, &[&a, &b]).await, b.2.to_vec());
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap();
}
