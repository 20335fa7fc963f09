//! `lockgate serve`: the HTTP lock server.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use lockgate::kubernetes::LeaseConfig;
use lockgate::server::{
    KubernetesStore, KubernetesStoreConfig, MemoryConfig, MemoryStore, Server, ServerConfig,
    ServerHandle, Store, TlsConfig,
};
use tokio::signal::unix::{signal, SignalKind};

use crate::errors::{code, error_chain, Failure};
use crate::locator::Locator;

/// The Kubernetes store's lease timing for `ttl`: the defaults (Go's) for 10 s, scaled otherwise.
/// Every participant of an object must use the same TTL.
fn lease_config(ttl: Duration) -> Result<LeaseConfig, Failure> {
    let config = if ttl == LeaseConfig::default().ttl {
        LeaseConfig::default()
    } else {
        LeaseConfig {
            ttl,
            renew_period: ttl * 3 / 10,
            renew_deadline: ttl * 8 / 10,
            request_timeout: ttl * 3 / 10,
        }
    };
    // The store validates it; an invalid one is the command line's fault.
    if ttl < Duration::from_secs(5) {
        return Err(Failure::new(
            code::USAGE,
            "--ttl must be at least 5s with the Kubernetes store",
        ));
    }
    Ok(config)
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on; port 0 picks a free port, `:PORT` (Go's form) is every IPv4
    /// address. The first line on stdout is `serving on ADDR` with the address bound.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7780", value_parser = listen_addr)]
    listen: String,
    /// Where leases live: `memory` (in this process; they end with it), or
    /// `kubernetes://[CONTEXT@]NAMESPACE/RESOURCE/NAME` (the annotation records of that object,
    /// shared with every server, Kubernetes locker and Go process using it; leases outlive the
    /// server).
    #[arg(long, value_name = "STORE", default_value = "memory")]
    store: String,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Lease time-to-live: a lease not renewed for this long is dropped. Go clients renew every
    /// 3 s and poll every 2 s.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::args::parse_duration)]
    ttl: Duration,
    /// Grant nothing for this long after start, so that holders of a previous instance's
    /// leases learn they lost them first [default: the TTL; 0 when no earlier instance served
    /// the same clients].
    #[arg(long, value_name = "DURATION", value_parser = crate::args::parse_duration)]
    grace: Option<Duration>,
    /// The longest long poll a client may ask for.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::args::parse_duration)]
    max_wait: Duration,
    /// Cap on held leases (about 330 bytes each in the memory store).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    max_held: usize,
    /// Cap on queued acquirers.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_waiters: usize,
    /// Cap on queued acquirers from one client address.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_waiters_per_client: usize,
    /// Cap on queued acquirers of one lock (memory store).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_waiters_per_lock: usize,
    /// Cap on open connections.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_connections: usize,
    /// Cap on open connections from one client address (an IPv6 /64 counts as one address).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_connections_per_client: usize,
    /// On SIGTERM, keep serving this long with /readyz failing before closing (the time a load
    /// balancer or Kubernetes takes to stop sending new clients).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    drain_delay: Duration,
    /// Also answer requests whose Host header names HOST (repeatable; `*`: any). Without it,
    /// and without --token-file, only IP addresses and localhost are answered (DNS rebinding).
    #[arg(long, value_name = "HOST")]
    allowed_host: Vec<String>,
    /// Listen on an address other than loopback without --token-file: anyone who can connect
    /// may take and release every lock.
    #[arg(long)]
    allow_no_token: bool,
    /// Memory store: keep the fencing tokens above those granted before a restart in FILE
    /// (written about once per million grants), even when the clock was set back.
    #[arg(long, value_name = "FILE")]
    fencing_state: Option<PathBuf>,
}

/// Runs the server; `token_file` (the global `--token-file`) holds the token clients must send as
/// `Authorization: Bearer TOKEN` or as the password of HTTP basic authentication (Go clients:
/// `http://lockgate:TOKEN@HOST:PORT`); `/healthz` and `/readyz` stay open. SIGHUP reads the
/// token file and the certificate again.
pub(crate) fn run(args: ServeArgs, token_file: Option<&Path>) -> Result<u8, Failure> {
    let kubernetes = match args.store.as_str() {
        "memory" => None,
        s if s.starts_with("kubernetes://") => {
            match Locator::parse(s, lockgate::file::Naming::Sha256)? {
                Locator::Kubernetes {
                    default_namespace: true,
                    ..
                } => {
                    return Err(Failure::new(
                        code::USAGE,
                        format!("--store {s:?} does not have three parts: the store names its namespace, kubernetes://[CONTEXT@]NAMESPACE/RESOURCE/NAME"),
                    ))
                }
                Locator::Kubernetes {
                    context,
                    namespace,
                    resource,
                    name,
                    ..
                } => Some((context, namespace, resource, name)),
                _ => unreachable!("a kubernetes:// URL parses as a Kubernetes locator"),
            }
        }
        other => {
            return Err(Failure::new(
                code::USAGE,
                format!(
                    "unknown store {other:?}: expected `memory` or kubernetes://[CONTEXT@]NAMESPACE/RESOURCE/NAME"
                ),
            ))
        }
    };
    if args.ttl < Duration::from_secs(1) {
        return Err(Failure::new(code::USAGE, "--ttl must be at least 1s"));
    }
    if args.ttl < Duration::from_secs(5) {
        tracing::warn!(
            "a TTL under 5 s is shorter than Go clients' renewal period (3 s) plus a margin"
        );
    }
    let mut config = ServerConfig::default()
        .max_wait(args.max_wait)
        .max_connections(args.max_connections.max(1))
        .max_connections_per_client(args.max_connections_per_client.max(1))
        .drain_delay(args.drain_delay);
    for host in &args.allowed_host {
        config = config.allowed_host(host);
    }
    if let Some(path) = token_file {
        config = config.token(read_token(path)?);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let tls = TlsConfig::from_pem_files(cert, key)
            .map_err(|e| Failure::new(code::USAGE, error_chain(&e)))?;
        config = config.tls(tls);
    }
    let mut memory = MemoryConfig::default()
        .ttl(args.ttl)
        .max_held(args.max_held.max(1))
        .max_waiters(args.max_waiters.max(1))
        .max_waiters_per_client(args.max_waiters_per_client.max(1))
        .max_waiters_per_lock(args.max_waiters_per_lock.max(1));
    if let Some(grace) = args.grace {
        memory = memory.grace(grace);
    }
    if let Some(path) = &args.fencing_state {
        if kubernetes.is_some() {
            return Err(Failure::new(
                code::USAGE,
                "--fencing-state is for the memory store (the Kubernetes store's tokens are the object's resource versions)",
            ));
        }
        memory = memory.fencing_state(path);
    }
    let config_error =
        |e: lockgate::server::ConfigError| Failure::new(code::USAGE, error_chain(&e));
    raise_fd_limit();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(code::SOFTWARE, format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|e| {
                Failure::new(
                    code::UNAVAILABLE,
                    format!("cannot listen on {}: {e}", args.listen),
                )
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Failure::new(code::UNAVAILABLE, format!("cannot listen: {e}")))?;
        if token_file.is_none() && !addr.ip().is_loopback() && !args.allow_no_token {
            return Err(Failure::new(
                code::USAGE,
                format!(
                    "refusing to listen on {addr} without a token: anyone who can connect could take and release every lock; give --token-file, listen on 127.0.0.1, or pass --allow-no-token"
                ),
            ));
        }
        let signals = |kind: SignalKind| {
            signal(kind)
                .map_err(|e| Failure::new(code::SOFTWARE, format!("cannot handle signals: {e}")))
        };
        let mut term = signals(SignalKind::terminate())?;
        let mut int = signals(SignalKind::interrupt())?;
        let mut hup = signals(SignalKind::hangup())?;
        let store: Arc<dyn Store> = match kubernetes {
            None => Arc::new(MemoryStore::new(memory).map_err(config_error)?),
            Some((context, namespace, resource, name)) => {
                let lease = lease_config(args.ttl)?;
                let config = KubernetesStoreConfig::new(lease)
                    .max_held(args.max_held.max(1))
                    .max_waiters(args.max_waiters.max(1))
                    .max_waiters_per_client(args.max_waiters_per_client.max(1));
                let store = KubernetesStore::connect(
                    context.as_deref(),
                    &resource,
                    namespace,
                    &name,
                    config,
                )
                .await?;
                tracing::info!(object = store.object(), "leases in the Kubernetes object");
                Arc::new(store)
            }
        };
        let server = Server::new(store, config).map_err(config_error)?;
        let handle = server.handle();
        let reload = Reload {
            handle,
            token_file: token_file.map(Path::to_owned),
            tls: args.tls_cert.clone().zip(args.tls_key.clone()),
        };
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "serving on {addr}")
                .and_then(|()| out.flush())
                .map_err(|e| Failure::new(code::SOFTWARE, format!("cannot write output: {e}")))?;
        }
        tracing::info!(%addr, "serving");
        server
            .serve(listener, async move {
                loop {
                    tokio::select! {
                        _ = term.recv() => break tracing::info!("SIGTERM: shutting down"),
                        _ = int.recv() => break tracing::info!("SIGINT: shutting down"),
                        _ = hup.recv() => reload.run(),
                    }
                }
            })
            .await;
        Ok(0)
    })
}

/// `--listen`: `HOST:PORT`, or Go's `:PORT` for every IPv4 address.
fn listen_addr(s: &str) -> Result<String, String> {
    match s.strip_prefix(':') {
        Some(port) if port.parse::<u16>().is_ok() => Ok(format!("0.0.0.0:{port}")),
        Some(_) => Err(format!("{s:?} is not :PORT")),
        None => Ok(s.to_owned()),
    }
}

/// What SIGHUP reads again: the token file and the certificate with its key. A file that cannot
/// be used is reported and the one in use kept.
struct Reload {
    handle: ServerHandle,
    token_file: Option<PathBuf>,
    tls: Option<(PathBuf, PathBuf)>,
}

impl Reload {
    fn run(&self) {
        tracing::info!("SIGHUP: reading the token and the certificate again");
        if let Some(path) = &self.token_file {
            match read_token(path) {
                Ok(token) => {
                    if let Err(e) = self.handle.set_token(token) {
                        tracing::error!(error = %error_chain(&e), "keeping the old token");
                    }
                }
                Err(e) => tracing::error!(error = e.message, "keeping the old token"),
            }
        }
        if let Some((cert, key)) = &self.tls {
            match TlsConfig::from_pem_files(cert, key) {
                Ok(tls) => {
                    if let Err(e) = self.handle.set_tls(tls) {
                        tracing::error!(error = %error_chain(&e), "keeping the old certificate");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "keeping the old certificate")
                }
            }
        }
    }
}

pub(crate) fn read_token(path: &Path) -> Result<String, Failure> {
    use std::os::unix::fs::MetadataExt as _;
    let token = std::fs::read_to_string(path).map_err(|e| {
        Failure::new(
            code::USAGE,
            format!("cannot read the token file {}: {e}", path.display()),
        )
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(Failure::new(
            code::USAGE,
            format!("the token file {} is empty", path.display()),
        ));
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the token file is readable by other users; chmod 600 it"
            );
        }
    }
    Ok(token.to_owned())
}

/// Lets the server hold as many connections as the hard limit allows (Go does this too).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
