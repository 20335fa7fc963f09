//! `lockgate exec` against lock servers it cannot use, as users meet them: a refused port, a
//! misspelt host, a server that goes away mid-wait, an untrusted certificate, the wrong scheme,
//! a refused token. What may heal is retried for the patience, and said at once; what cannot
//! fails at once. Real `lockgate serve` processes, real sockets, certificates from openssl.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, run, stderr, stdout};
use support::{Proc, PATIENCE};

/// Starts `lockgate serve --listen 127.0.0.1:0 --grace 0 ARGS`; returns it and its address.
fn serve(args: &[&str]) -> (Proc, String) {
    let mut p = Proc::spawn(
        bin()
            .args(["serve", "--listen", "127.0.0.1:0", "--grace", "0"])
            .args(args),
    );
    let line = p.expect("serving on ");
    let addr = line["serving on ".len()..].to_owned();
    (p, addr)
}

/// A port of 127.0.0.1 that nothing listens on (bound, then closed).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `lockgate --locker URL ARGS exec [EXEC_ARGS] NAME -- echo ran`, running.
fn exec(url: &str, args: &[&str], exec_args: &[&str], name: &str) -> Proc {
    Proc::spawn(
        bin()
            .args(["--locker", url])
            .args(args)
            .arg("exec")
            .args(exec_args)
            .args([name, "--", "echo", "ran"])
            .stdin(Stdio::null()),
    )
}

/// Waits for `p` to exit within `limit`; its code and all its stderr.
fn finished(mut p: Proc, limit: Duration) -> (Option<i32>, String) {
    let status = p.wait_within(limit);
    let err = p.stderr.take().unwrap().rest_within(PATIENCE).join("\n");
    (status.code(), err)
}

/// A refused port: a waiting exec says at once what is wrong and where, retries for the
/// patience (`--patience`, `$LOCKGATE_PATIENCE`) and then exits 69. Before, it waited forever
/// and printed nothing.
#[test]
fn a_refused_port_is_retried_for_the_patience_then_exits_69() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    for (args, env) in [(&["--patience", "2s"][..], None), (&[], Some("2"))] {
        let start = Instant::now();
        let mut c = bin();
        if let Some(p) = env {
            c.env("LOCKGATE_PATIENCE", p);
        }
        let mut p = Proc::spawn(
            c.args(["--locker", &url, "exec"])
                .args(args)
                .args(["n", "--", "echo", "ran"])
                .stdin(Stdio::null()),
        );
        let said = p.expect_err("lockgate: cannot reach the lock server");
        assert!(said.contains(&url) && said.contains("refused"), "{said}");
        assert!(said.contains("retrying for up to 2s"), "{said}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "said after {:?}",
            start.elapsed()
        );
        let (code, err) = finished(p, PATIENCE);
        assert_eq!(code, Some(69), "{err}");
        assert!(start.elapsed() >= Duration::from_secs(2), "gave up early");
        assert!(err.contains("gave up after 2s"), "{err}");
    }
}

/// A server that is not up yet (a refused connection heals): the waiting exec gets the lock
/// once it is.
#[test]
fn a_server_that_comes_up_within_the_patience_serves() {
    let port = closed_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut p = exec(&url, &[], &["--patience", "60s"], "late");
    p.expect_err("lockgate: cannot reach the lock server");
    let listen = format!("127.0.0.1:{port}");
    let _server = Proc::spawn(bin().args(["serve", "--grace", "0", "--listen", &listen]));
    p.expect("ran");
    assert_eq!(p.wait().code(), Some(0));
}

/// What cannot heal fails at once, whatever the patience: a misspelt host, a refused token.
#[test]
fn an_unknown_host_and_a_refused_token_fail_at_once() {
    let start = Instant::now();
    let p = exec("http://no-such-host.invalid:7780", &[], &[], "n");
    let (code, err) = finished(p, Duration::from_secs(20));
    assert_eq!(code, Some(69), "{err}");
    assert!(
        err.contains("unknown host \"no-such-host.invalid\""),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(start.elapsed() < Duration::from_secs(20));

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let (_server, addr) = serve(&["--token-file", token.to_str().unwrap()]);
    let p = exec(&format!("http://{addr}"), &[], &[], "n");
    let (code, err) = finished(p, Duration::from_secs(20));
    assert_eq!(code, Some(69), "{err}");
    assert!(err.contains("refused the token"), "{err}");
    assert!(err.contains("--token-file"), "what to do: {err}");
}

/// The server goes away while exec waits for a lock it holds for someone else: the waiter says
/// so at once and gives up after the patience. Before, it waited on, silent.
#[test]
fn a_server_that_goes_away_mid_wait_is_said_at_once() {
    let (mut server, addr) = serve(&[]);
    let url = format!("http://{addr}");
    let mut holder = Proc::spawn(bin().args(["--locker", &url, "hold", "busy"]));
    holder.expect("holding");
    let mut waiter = exec(&url, &[], &["--patience", "3s"], "busy");
    waiter.expect_err("lockgate: waiting for exclusive lock \"busy\"");
    server.kill();
    let gone = Instant::now();
    let said = waiter.expect_err("lockgate: cannot reach the lock server");
    assert!(said.contains(&url), "{said}");
    assert!(
        gone.elapsed() < Duration::from_secs(10),
        "said {:?} after the server went",
        gone.elapsed()
    );
    let (code, err) = finished(waiter, PATIENCE);
    assert_eq!(code, Some(69), "{err}");
    // The holder lost its lease with the server: exit 75.
    assert_eq!(holder.wait().code(), Some(75));
}

/// Makes `tls.crt`/`tls.key` in `dir` as `openssl req -x509` does by default: a self-signed
/// certificate with CA:TRUE (the certificate rustls refuses as a server's, unless pinned).
fn self_signed(dir: &Path) {
    let made = Command::new("openssl")
        .current_dir(dir)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-keyout", "tls.key", "-out", "tls.crt"])
        .output()
        .expect("run openssl");
    assert!(made.status.success(), "{made:?}");
}

/// TLS failures are TLS failures, at once: an untrusted certificate (with what to do), an
/// https:// URL for an http:// server, an http:// URL for an https:// one. Before, each was
/// 'cannot reach the lock server' and a waiting exec retried forever.
#[test]
fn tls_failures_are_said_as_such_at_once() {
    let dir = tempfile::tempdir().unwrap();
    self_signed(dir.path());
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (_tls, tls_addr) = serve(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let (_plain, plain_addr) = serve(&[]);
    for (url, want) in [
        (
            format!("https://{tls_addr}"),
            "the certificate of the lock server",
        ),
        (format!("https://{plain_addr}"), "does not answer TLS"),
        (format!("http://{tls_addr}"), "is it an https:// server?"),
    ] {
        let start = Instant::now();
        let (code, err) = finished(exec(&url, &[], &[], "n"), Duration::from_secs(20));
        assert_eq!(code, Some(69), "{url}: {err}");
        assert!(err.contains(want), "{url}: {err}");
        assert_eq!(err.lines().count(), 1, "{url}: {err}");
        assert!(
            !err.contains("cannot reach"),
            "{url}: TLS reported as unreachable: {err}"
        );
        assert!(start.elapsed() < Duration::from_secs(20));
    }
    let (_, err) = finished(
        exec(&format!("https://{tls_addr}"), &[], &[], "n"),
        PATIENCE,
    );
    assert!(err.contains("--ca-file"), "what to do: {err}");
}

/// The server's own self-signed certificate, as `openssl req -x509` makes it (CA:TRUE), given
/// with --ca-file: pinned, it is trusted (by name or by address). Before: CaUsedAsEndEntity.
#[test]
fn a_pinned_self_signed_certificate_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    self_signed(dir.path());
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (_tls, addr) = serve(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let port = addr.rsplit(':').next().unwrap();
    for url in [
        format!("https://{addr}"),
        format!("https://localhost:{port}"),
    ] {
        let out = run(bin()
            .args(["--locker", &url, "--ca-file", cert.to_str().unwrap()])
            .args(["exec", "n", "--", "echo", "ran"]));
        assert_eq!(out.status.code(), Some(0), "{url}: {}", stderr(&out));
        assert_eq!(stdout(&out), "ran\n");
    }
    // Another self-signed certificate is not this one.
    let other = tempfile::tempdir().unwrap();
    self_signed(other.path());
    let out = run(bin()
        .args(["--locker", &format!("https://{addr}")])
        .arg("--ca-file")
        .arg(other.path().join("tls.crt"))
        .args(["exec", "n", "--", "echo", "ran"]));
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
}

/// `serve --listen :PORT` (Go's form), and `status --json` of a lock server in the documents'
/// envelope (`schema`, `backend`) and field names (`name`, `state`, `holders`, `waiters`).
#[test]
fn go_listen_form_and_status_json_of_a_lock_server() {
    let port = closed_port();
    // Every address without a token needs saying so (the server refuses it otherwise).
    let mut p = Proc::spawn(bin().args([
        "serve",
        "--grace",
        "0",
        "--allow-no-token",
        "--listen",
        &format!(":{port}"),
    ]));
    let line = p.expect("serving on ");
    assert_eq!(line, format!("serving on 0.0.0.0:{port}"));
    let url = format!("http://127.0.0.1:{port}");
    let mut holder = Proc::spawn(bin().args(["--locker", &url, "hold", "-s", "shown"]));
    let held = holder.expect("holding");
    assert!(held.contains("fencing token"), "{held}");
    let out = run(bin().args(["--locker", &url, "status", "--json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema"], 1, "{v}");
    assert_eq!(v["backend"], "http", "{v}");
    assert_eq!(v["server"], url, "{v}");
    let lock = &v["locks"][0];
    assert_eq!(lock["name"], "shown", "{v}");
    assert_eq!(lock["state"], "shared", "{v}");
    assert_eq!(lock["waiters"], 0, "{v}");
    assert_eq!(lock["holders"][0]["mode"], "shared", "{v}");
    assert!(
        lock["holders"][0]["fencing_token"].as_u64().is_some(),
        "{v}"
    );
    let out = run(bin().args(["--locker", &url, "status"]));
    let table = stdout(&out);
    assert_eq!(
        table.lines().next(),
        Some(format!("locks on the lock server {url}").as_str())
    );
    holder.signal(libc::SIGTERM);
    assert_eq!(holder.wait().code(), Some(0));
}

/// The README's two TLS recipes, pasted as they are: a private CA and a certificate it signs,
/// and a self-signed certificate pinned by the clients. Before, the README's recipe (a
/// certificate of `openssl req -x509`, CA:TRUE) failed with CaUsedAsEndEntity.
#[test]
fn the_readmes_tls_recipes_work_as_written() {
    for recipe in ["tls-ca", "tls-pinned"] {
        let dir = tempfile::tempdir().unwrap();
        let (code, out, err) =
            common::paste(&common::readme_block(recipe), dir.path(), closed_port());
        assert_eq!(code, Some(0), "{recipe}: {out}{err}");
        assert!(
            out.contains("deploying under the lock"),
            "{recipe}: {out}{err}"
        );
    }
}

/// A lost lease: the command gets SIGKILL within half the time left between the loss and the
/// earliest takeover, not a fixed 2 s. With a 2 s TTL the lease counts as lost 1.5 s after its
/// last confirmed renewal and the server may re-grant it at 2 s: a command that ignores SIGTERM
/// dies 0.25 s after the loss. (It ran on for 2 s before: past the takeover.)
#[test]
fn a_command_that_ignores_sigterm_dies_before_a_takeover_is_possible() {
    let (server, addr) = serve(&["--ttl", "2s"]);
    let url = format!("http://{addr}");
    let mut p = Proc::spawn(
        bin()
            .args(["--locker", &url, "exec", "ignores-term", "--", "sh", "-c"])
            .arg("trap '' TERM; echo started; while :; do sleep 0.05; done")
            .stdin(Stdio::null()),
    );
    p.expect("started");
    // The server stops answering: renewals go unconfirmed.
    server.signal(libc::SIGSTOP);
    p.expect_err("lockgate: the lease of lock");
    let lost = Instant::now();
    let status = p.wait_within(Duration::from_secs(20));
    let took = lost.elapsed();
    server.signal(libc::SIGCONT);
    assert_eq!(status.code(), Some(75), "exit 75 after a lost lease");
    assert!(
        took < Duration::from_millis(1500),
        "the command ran {took:?} after the loss (the takeover is possible 0.5 s after it)"
    );
}
