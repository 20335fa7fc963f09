//! lockgate's own failures: what it prints, and the exit code each one gets.

use std::fmt;

/// Exit codes of lockgate's own failures (sysexits.h), next to the command's own status.
pub(crate) mod code {
    /// Bad command line, lock name or locker URL.
    pub const USAGE: u8 = 64;
    /// The lock backend failed (directory, lock file, API server, its configuration).
    pub const UNAVAILABLE: u8 = 69;
    /// An internal error (including output that cannot be written).
    pub const SOFTWARE: u8 = 70;
    /// An output file or directory cannot be created (`man --out-dir`).
    pub const CANT_CREATE: u8 = 73;
    /// The lease was lost while the command ran.
    pub const TEMPFAIL: u8 = 75;
    /// The command could not be executed.
    pub const NOT_EXECUTABLE: u8 = 126;
    /// The command was not found.
    pub const NOT_FOUND: u8 = 127;
}

/// An error lockgate reports itself (once, at the top, as `lockgate: MESSAGE`), with its exit
/// code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: u8,
    pub message: String,
    /// Output went to a closed pipe (`lockgate status | head`): the reader's choice, not a
    /// failure to report.
    pub broken_pipe: bool,
}

impl Failure {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            broken_pipe: false,
        }
    }

    /// Output that could not be written.
    pub(crate) fn output(e: std::io::Error) -> Self {
        let broken_pipe = e.kind() == std::io::ErrorKind::BrokenPipe;
        Self {
            broken_pipe,
            ..Self::new(code::SOFTWARE, format!("cannot write output: {e}"))
        }
    }

    /// An operating system facility lockgate needs failed.
    pub(crate) fn internal(what: &str, e: impl fmt::Display) -> Self {
        Self::new(code::SOFTWARE, format!("cannot {what}: {e}"))
    }
}

impl From<lockgate::Error> for Failure {
    fn from(e: lockgate::Error) -> Self {
        let code = match e {
            lockgate::Error::InvalidName(_) | lockgate::Error::UnknownResource { .. } => {
                code::USAGE
            }
            // The command line sets no lease timing, so an invalid configuration is the
            // environment's (no usable kubeconfig): the backend is unusable, the command line is
            // fine.
            _ => code::UNAVAILABLE,
        };
        let mut message = error_chain(&e);
        if let Some(advice) = advice(&e) {
            message.push_str("; ");
            message.push_str(&advice);
        }
        Self::new(code, message)
    }
}

impl Failure {
    /// A failure to take or release the lock `name`: the library's error, prefixed with what
    /// lockgate was doing.
    pub(crate) fn lock(doing: &str, name: &str, e: lockgate::Error) -> Self {
        let f = Self::from(e);
        Self::new(
            f.code,
            format!("cannot {doing} lock {}: {}", shorten(name), f.message),
        )
    }

    /// The message as printed: one line, whatever a cause's text holds (a YAML parser's
    /// excerpt of a broken kubeconfig, say).
    pub(crate) fn line(&self) -> String {
        one_line(&self.message)
    }
}

/// `s` quoted, cut to its first 60 characters when it is long (a 100 KB lock name is not
/// echoed whole).
pub(crate) fn shorten(s: &str) -> String {
    const KEEP: usize = 60;
    if s.chars().count() <= KEEP + 20 {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(KEEP).collect();
    format!("{head:?}… ({} bytes)", s.len())
}

/// Each line's text joined with "; ", so that a message is one line.
pub(crate) fn one_line(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines.join("; ")
}

/// What to do next, for the errors whose message does not say it already.
fn advice(e: &lockgate::Error) -> Option<String> {
    use lockgate::Error as E;
    let choose_dir = "or choose another directory with --dir DIR or $LOCKGATE_DIR";
    Some(match e {
        E::LockDir { .. } | E::LockFile { .. } => {
            format!(
                "check that the directory exists or can be created and is writable, {choose_dir}"
            )
        }
        E::NotADirectory { .. } => format!("remove what is there, {choose_dir}"),
        E::ForeignLockDir { .. } => {
            format!("another user may have created it to interfere with your locks: remove it, {choose_dir}")
        }
        E::SymlinkAtLockPath { .. } | E::NotARegularFile { .. } => {
            "remove it (nothing there is a lockgate lock file)".to_owned()
        }
        E::KubeConfig { .. } => {
            "set KUBECONFIG to a kubeconfig file, or run in a pod with a service account \
             (KUBERNETES_SERVICE_HOST and /var/run/secrets/kubernetes.io/serviceaccount)"
                .to_owned()
        }
        E::UnknownResource { .. } => {
            "name the resource as `kubectl api-resources` lists it (configmaps, \
             leases.coordination.k8s.io, PLURAL.VERSION.GROUP)"
                .to_owned()
        }
        E::Forbidden { verb, .. } if *verb == "create" => {
            "grant create on configmaps (deploy/rbac/role-create-missing.yaml), or create the \
             ConfigMap beforehand and drop --create-missing"
                .to_owned()
        }
        E::Forbidden { .. } => {
            "grant get, list, watch and patch on the object (deploy/rbac/role.yaml is the \
             minimal Role)"
                .to_owned()
        }
        E::CorruptRecord { key, .. } => {
            format!("if no lockgate uses it, remove it with `kubectl annotate OBJECT {key}-`")
        }
        E::UntrustedCertificate { .. } => {
            "trust the server's CA, or pin its own certificate, with --ca-file FILE or \
             $LOCKGATE_CA_FILE"
                .to_owned()
        }
        E::Unauthorized { .. } => {
            "give the server's token with --token-file FILE or $LOCKGATE_TOKEN".to_owned()
        }
        E::Unreachable { .. } => {
            "check the API server address of the kubeconfig (or KUBERNETES_SERVICE_HOST) and the \
             network, then retry"
                .to_owned()
        }
        _ => return None,
    })
}

/// `error: cause: cause`, each source once.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        // Errors that print their source themselves: say each cause once.
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}
