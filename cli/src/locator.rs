//! The locator: which locker the command line names (`--locker URL`, `--dir DIR`) or the
//! environment does.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::PathBuf;

use lockgate::file::Naming;
use lockgate::kubernetes::LeaseConfig;
use lockgate::{FileLocker, HttpConfig, HttpLocker, KubernetesLocker, Locker};

use crate::args::LocatorArgs;
use crate::errors::{code, error_chain, Failure};

/// Where the locks live, as the command line and the environment name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Locator {
    /// A directory of lock files.
    File { dir: PathBuf, naming: Naming },
    /// Annotations of a Kubernetes object.
    Kubernetes {
        context: Option<String>,
        namespace: Option<String>,
        resource: String,
        name: String,
        create_missing: bool,
    },
    /// A lock server.
    Http {
        url: String,
        /// `--token-file` (else `$LOCKGATE_TOKEN`, else the URL's password).
        token_file: Option<PathBuf>,
        /// `--ca-file` or `$LOCKGATE_CA_FILE`.
        ca_file: Option<PathBuf>,
    },
}

impl Locator {
    /// Resolves, in order: `--locker`, `--dir`, `$LOCKGATE_LOCKER`, `$LOCKGATE_DIR`, the default
    /// directory.
    pub(crate) fn resolve(args: &LocatorArgs) -> Result<Self, Failure> {
        let mut locator = Self::resolve_location(args)?;
        match &mut locator {
            Locator::Kubernetes { create_missing, .. } => *create_missing = args.create_missing,
            Locator::Http {
                token_file,
                ca_file,
                ..
            } => {
                token_file.clone_from(&args.token_file);
                *ca_file = args.ca_file.clone().or_else(|| {
                    std::env::var_os("LOCKGATE_CA_FILE")
                        .filter(|v| !v.is_empty())
                        .map(PathBuf::from)
                });
            }
            Locator::File { .. } => {}
        }
        Ok(locator)
    }

    fn resolve_location(args: &LocatorArgs) -> Result<Self, Failure> {
        let naming = if args.legacy_names {
            Naming::LegacyMurmur3
        } else {
            Naming::Sha256
        };
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(url) = &args.locker {
            return Self::parse(url, naming);
        }
        if let Some(dir) = &args.dir {
            return Ok(Locator::File {
                dir: dir.clone(),
                naming,
            });
        }
        if let Some(url) = env("LOCKGATE_LOCKER") {
            let url = url
                .into_string()
                .map_err(|_| Failure::new(code::USAGE, "LOCKGATE_LOCKER is not valid UTF-8"))?;
            return Self::parse(&url, naming);
        }
        if let Some(dir) = env("LOCKGATE_DIR") {
            return Ok(Locator::File {
                dir: dir.into(),
                naming,
            });
        }
        Ok(Locator::File {
            dir: default_dir()?,
            naming,
        })
    }

    /// Parses a locker URL.
    pub(crate) fn parse(url: &str, naming: Naming) -> Result<Self, Failure> {
        let (scheme, rest) = url.split_once(':').ok_or_else(|| {
            Failure::new(
                code::USAGE,
                format!("locker {url:?} is not a URL; expected file:DIR"),
            )
        })?;
        match scheme {
            "file" => {
                // file:DIR, file:/abs/dir and file:///abs/dir all name a directory.
                let path = rest.strip_prefix("//").unwrap_or(rest);
                if path.is_empty() {
                    return Err(Failure::new(
                        code::USAGE,
                        format!("locker {url:?} names no directory"),
                    ));
                }
                Ok(Locator::File {
                    dir: path.into(),
                    naming,
                })
            }
            "kubernetes" => parse_kubernetes(url, rest),
            "http" | "https" => {
                let host = rest
                    .strip_prefix("//")
                    .map(|r| r.split(['/', '?', '#']).next().unwrap_or(""))
                    .unwrap_or("");
                if host.rsplit('@').next().unwrap_or("").is_empty() {
                    return Err(Failure::new(
                        code::USAGE,
                        format!("locker {scheme}:… names no server; expected {scheme}://HOST:PORT"),
                    ));
                }
                Ok(Locator::Http {
                    url: url.to_owned(),
                    token_file: None,
                    ca_file: None,
                })
            }
            _ => Err(Failure::new(
                code::USAGE,
                format!("unknown locker scheme {scheme:?} in {url:?}; supported: file:DIR, kubernetes://[CONTEXT@]NAMESPACE/RESOURCE/NAME, http(s)://HOST:PORT"),
            )),
        }
    }

    /// The file locker this locator names.
    pub(crate) fn file_locker(&self) -> Result<FileLocker, Failure> {
        match self {
            Locator::File { dir, naming } => Ok(FileLocker::with_naming(dir, *naming)?),
            Locator::Kubernetes { .. } | Locator::Http { .. } => Err(Failure::new(
                code::USAGE,
                "this command needs a file locker (--dir or --locker file:DIR)",
            )),
        }
    }

    /// The Kubernetes locker this locator names. Must run inside the Tokio runtime.
    pub(crate) async fn kubernetes_locker(&self) -> Result<KubernetesLocker, Failure> {
        let Locator::Kubernetes {
            context,
            namespace,
            resource,
            name,
            create_missing,
        } = self
        else {
            return Err(Failure::new(
                code::USAGE,
                "this command needs a kubernetes:// locker",
            ));
        };
        let locker = KubernetesLocker::connect(
            context.as_deref(),
            resource,
            namespace.clone(),
            name,
            LeaseConfig::default(),
        )
        .await?;
        Ok(locker.create_missing(*create_missing))
    }

    /// The HTTP locker this locator names. Must run inside the Tokio runtime.
    pub(crate) async fn http_locker(&self) -> Result<HttpLocker, Failure> {
        let Locator::Http {
            url,
            token_file,
            ca_file,
        } = self
        else {
            return Err(Failure::new(
                code::USAGE,
                "this command needs an http:// or https:// locker",
            ));
        };
        let mut config = HttpConfig::default();
        let token = match token_file {
            Some(path) => Some(crate::serve::read_token(path)?),
            None => std::env::var("LOCKGATE_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty()),
        };
        if let Some(token) = token {
            config = config.token(token.trim());
        }
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                Failure::new(
                    code::USAGE,
                    format!("cannot read the CA file {}: {e}", path.display()),
                )
            })?;
            config = config
                .root_certificates_pem(&pem)
                .map_err(|e| Failure::new(code::USAGE, format!("{}: {e}", path.display())))?;
        }
        HttpLocker::connect(url, config).await.map_err(|e| match e {
            lockgate::Error::InvalidConfig(_) => Failure::new(code::USAGE, error_chain(&e)),
            e => e.into(),
        })
    }

    /// The locker this locator names. Must run inside the Tokio runtime.
    pub(crate) async fn locker(&self) -> Result<Locker, Failure> {
        match self {
            Locator::File { .. } => Ok(Locker::new(self.file_locker()?)),
            Locator::Kubernetes { .. } => Ok(Locker::new(self.kubernetes_locker().await?)),
            Locator::Http { .. } => Ok(Locker::new(self.http_locker().await?)),
        }
    }
}

/// `kubernetes://[CONTEXT@]NAMESPACE/RESOURCE/NAME`; an empty NAMESPACE is cluster-scoped.
fn parse_kubernetes(url: &str, rest: &str) -> Result<Locator, Failure> {
    let bad = |why: &str| {
        Failure::new(
            code::USAGE,
            format!(
                "locker {url:?} {why}; expected kubernetes://[CONTEXT@]NAMESPACE/RESOURCE/NAME"
            ),
        )
    };
    let rest = rest
        .strip_prefix("//")
        .ok_or_else(|| bad("does not start with kubernetes://"))?;
    let (context, path) = match rest.split_once('@') {
        Some((c, p)) if !c.is_empty() => (Some(c.to_owned()), p),
        Some(_) => return Err(bad("has an empty context")),
        None => (None, rest),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let [namespace, resource, name] = parts.as_slice() else {
        return Err(bad("does not have three parts"));
    };
    if resource.is_empty() || name.is_empty() {
        return Err(bad("names no resource or no object"));
    }
    Ok(Locator::Kubernetes {
        context,
        namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
        resource: resource.to_string(),
        name: name.to_string(),
        create_missing: false,
    })
}

/// `$XDG_RUNTIME_DIR/lockgate`, else `/tmp/lockgate-UID`: private to the user, created 0700. An
/// existing default directory must belong to the user (in a shared /tmp, another user could
/// have created it first).
fn default_dir() -> Result<PathBuf, Failure> {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(run) => PathBuf::from(run).join("lockgate"),
        None => std::env::temp_dir().join(format!("lockgate-{uid}")),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(lockgate::Error::LockDir { path: dir, source }.into()),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|source| {
        Failure::from(lockgate::Error::LockDir {
            path: dir.clone(),
            source,
        })
    })?;
    if !meta.is_dir() {
        return Err(lockgate::Error::NotADirectory { path: dir }.into());
    }
    if meta.uid() != uid {
        return Err(lockgate::Error::ForeignLockDir {
            path: dir,
            owner: meta.uid(),
            uid,
        }
        .into());
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_urls() {
        for (url, dir) in [
            ("file:locks", "locks"),
            ("file:/var/locks", "/var/locks"),
            ("file:///var/locks", "/var/locks"),
        ] {
            assert_eq!(
                Locator::parse(url, Naming::Sha256).unwrap(),
                Locator::File {
                    dir: dir.into(),
                    naming: Naming::Sha256
                }
            );
        }
    }

    #[test]
    fn parses_kubernetes_urls() {
        let k = |c: Option<&str>, ns: Option<&str>, r: &str, n: &str| Locator::Kubernetes {
            context: c.map(Into::into),
            namespace: ns.map(Into::into),
            resource: r.into(),
            name: n.into(),
            create_missing: false,
        };
        let cases = [
            (
                "kubernetes://default/configmaps/locks",
                k(None, Some("default"), "configmaps", "locks"),
            ),
            (
                "kubernetes://prod@ci/leases.coordination.k8s.io/l",
                k(Some("prod"), Some("ci"), "leases.coordination.k8s.io", "l"),
            ),
            (
                "kubernetes:///widgets.v1alpha1.example.com/w",
                k(None, None, "widgets.v1alpha1.example.com", "w"),
            ),
        ];
        for (url, want) in cases {
            assert_eq!(Locator::parse(url, Naming::Sha256).unwrap(), want, "{url}");
        }
    }

    #[test]
    fn parses_http_urls() {
        for url in [
            "http://127.0.0.1:7780",
            "https://locks.example/ci/locker",
            "http://lockgate:s3cret@h:1",
        ] {
            assert_eq!(
                Locator::parse(url, Naming::Sha256).unwrap(),
                Locator::Http {
                    url: url.into(),
                    token_file: None,
                    ca_file: None
                },
                "{url}"
            );
        }
    }

    #[test]
    fn rejects_other_urls() {
        for url in [
            "file:",
            "nonsense",
            "ftp://x",
            "kubernetes://ns/configmaps",
            "kubernetes://ns//cm",
            "kubernetes://@ns/configmaps/cm",
            "kubernetes:ns/configmaps/cm",
            "kubernetes://a/b/c/d",
            "http://",
            "https:host",
            "http://user:pw@/x",
        ] {
            assert_eq!(
                Locator::parse(url, Naming::Sha256).unwrap_err().code,
                code::USAGE,
                "{url}"
            );
        }
    }
}
