//! `lockgate serve` as a process: its flags, its output, its exit codes, its signals.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn lockgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lockgate"))
}

/// A child killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn wait(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs `lockgate serve ARGS` expecting it to fail at once; its exit code and stderr.
fn refused(args: &[&str]) -> (i32, String) {
    let mut p = Proc(
        lockgate()
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let code = p.wait(Duration::from_secs(10));
    let mut err = String::new();
    p.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (code, err)
}

fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

#[test]
fn refuses_bad_settings_with_usage_errors() {
    let (code, err) = refused(&["--store", "kubernetes://ns/configmaps"]);
    assert_eq!(code, 64);
    assert!(err.contains("three parts"), "{err}");
    let (code, err) = refused(&["--store", "kubernetes://ns/configmaps/locks", "--ttl", "2s"]);
    assert_eq!(code, 64);
    assert!(err.contains("at least 5s"), "{err}");
    let (code, err) = refused(&["--store", "redis://x"]);
    assert_eq!(code, 64);
    assert!(err.contains("unknown store"), "{err}");
    let (code, _) = refused(&["--tls-cert", "/nonexistent.pem"]);
    assert_eq!(code, 64);
    let (code, err) = refused(&[
        "--tls-cert",
        "/nonexistent.pem",
        "--tls-key",
        "/nonexistent.key",
    ]);
    assert_eq!(code, 64);
    assert!(err.contains("/nonexistent.pem"), "{err}");
    let (code, err) = refused(&["--token-file", "/nonexistent-token"]);
    assert_eq!(code, 64);
    assert!(err.contains("token file"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let (code, err) = refused(&["--token-file", empty.to_str().unwrap()]);
    assert_eq!(code, 64);
    assert!(err.contains("is empty"), "{err}");
    let (code, _) = refused(&["--ttl", "0s"]);
    assert_eq!(code, 64);
    let (code, _) = refused(&["--ttl", "soon"]);
    assert_eq!(code, 64);
}

#[test]
fn an_address_in_use_is_unavailable() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = refused(&["--listen", &addr]);
    assert_eq!(code, 69);
    assert!(err.contains("cannot listen"), "{err}");
}

#[test]
fn serves_with_a_start_up_grace_and_ends_on_sigterm() {
    let mut p = Proc(
        lockgate()
            .args(["serve", "--listen", "127.0.0.1:0", "--ttl", "2s"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(p.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().strip_prefix("serving on ").unwrap().to_owned();
    // By default nothing is granted for one TTL after start.
    let (status, body) = http(&addr, "GET", "/healthz", "");
    assert_eq!(status, 200);
    assert!(body.contains(r#""status":"grace""#), "{body}");
    let (status, body) = http(&addr, "POST", "/acquire", r#"{"lockName":"g"}"#);
    assert_eq!(status, 200);
    assert!(body.contains("should wait"), "{body}");
    // A long poll is granted when the grace ends.
    let start = Instant::now();
    let (status, body) = http(
        &addr,
        "POST",
        "/acquire",
        r#"{"lockName":"g","opts":{"waitMs":5000}}"#,
    );
    assert_eq!(status, 200);
    assert!(body.contains(r#""err":"""#), "{body}");
    assert!(start.elapsed() < Duration::from_millis(2500));
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    assert_eq!(p.wait(Duration::from_secs(10)), 0);
}
