//! The lockers a [`Locator`] names, made ready to use: a directory (the default one made and
//! checked here), a Kubernetes object resolved as kubectl resolves it, a lock server with its
//! token, roots and patience.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lockgate::kubernetes::{self, LeaseConfig, Target};
use lockgate::{FileLocker, HttpConfig, HttpLocker, KubernetesLocker, Locker};

use crate::errors::{code, error_chain, Failure};
use crate::locator::Locator;

impl Locator {
    /// The file locker this locator names. With `create` false a missing directory is an error
    /// (`status` and `gc` of a mistyped directory), rather than an empty directory made.
    pub(crate) fn file_locker(&self, create: bool) -> Result<FileLocker, Failure> {
        match self {
            Locator::File { dir, naming } => {
                if !create && std::fs::symlink_metadata(dir).is_err() {
                    return Err(Failure::new(
                        code::UNAVAILABLE,
                        format!(
                            "lock directory {} does not exist; check the path (--dir, $LOCKGATE_DIR)",
                            dir.display()
                        ),
                    ));
                }
                Ok(FileLocker::with_naming(dir, *naming)?)
            }
            Locator::Kubernetes { .. } | Locator::Http { .. } => Err(Failure::new(
                code::USAGE,
                format!(
                    "this command needs a file locker (--dir DIR or --locker file:DIR), not {}",
                    self.describe()
                ),
            )),
        }
    }

    /// The Kubernetes locker this locator names. Must run inside the Tokio runtime.
    pub(crate) async fn kubernetes_locker(&self) -> Result<KubernetesLocker, Failure> {
        let Locator::Kubernetes {
            context,
            namespace,
            default_namespace,
            resource,
            name,
            create_missing,
            kubeconfig,
        } = self
        else {
            return Err(Failure::new(
                code::USAGE,
                "this command needs a kubernetes:// locker",
            ));
        };
        let lease = LeaseConfig::default();
        let client = kubernetes::client_with(
            kubeconfig.as_deref(),
            context.as_deref(),
            lease.request_timeout,
        )
        .await?;
        // ConfigMaps, by far the most common, need no discovery.
        let configmap = resource == "configmaps";
        let target = match (namespace, *default_namespace) {
            (Some(ns), _) if configmap => Target::configmap(ns, name),
            (None, true) if configmap => Target::configmap(client.default_namespace(), name),
            (ns, true) => Target::resolve(&client, resource, ns.clone(), name).await?,
            (ns, false) => Target::discover(&client, resource, ns.clone(), name).await?,
        };
        let locker = KubernetesLocker::new(client, target, lease)?;
        crate::say_where(crate::verbose(), || locker.object().to_owned());
        Ok(locker.create_missing(*create_missing))
    }

    /// The HTTP locker this locator names, giving up on an unreachable server after
    /// `patience` (and saying at once that it retries). Must run inside the Tokio runtime.
    pub(crate) async fn http_locker(
        &self,
        patience: Option<Duration>,
    ) -> Result<HttpLocker, Failure> {
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
        if let Some(patience) = patience {
            config = config.patience(patience).on_unreachable(move |e| {
                eprintln!(
                    "lockgate: {}; retrying for up to {} (--patience, $LOCKGATE_PATIENCE)",
                    error_chain(e),
                    humantime::format_duration(patience)
                );
            });
        }
        HttpLocker::connect(url, config).await.map_err(|e| match e {
            lockgate::Error::InvalidConfig(_) => Failure::new(code::USAGE, error_chain(&e)),
            e => e.into(),
        })
    }

    /// The locker this locator names. Must run inside the Tokio runtime.
    pub(crate) async fn locker(&self, patience: Option<Duration>) -> Result<Locker, Failure> {
        match self {
            Locator::File { .. } => Ok(Locker::new(self.file_locker(true)?)),
            Locator::Kubernetes { .. } => {
                let mut locker = self.kubernetes_locker().await?;
                if let Some(patience) = patience {
                    locker = locker.patience(patience).on_unreachable(move |e| {
                        eprintln!(
                            "lockgate: {}; retrying for up to {} (--patience, $LOCKGATE_PATIENCE)",
                            error_chain(e),
                            humantime::format_duration(patience)
                        );
                    });
                }
                Ok(Locker::new(locker))
            }
            Locator::Http { .. } => Ok(Locker::new(self.http_locker(patience).await?)),
        }
    }
}

/// The default lock directory: `/run/lock/lockgate-UID` (`/run/lock`, alias `/var/lock`, is
/// the system's directory for lock files, shared by every session of the host), else
/// `/tmp/lockgate-UID` on a host without `/run/lock`. Nothing in the environment changes it
/// (not `$XDG_RUNTIME_DIR`, which cron, systemd units and sudo lack or keep from another user,
/// nor `$TMPDIR`): a user's cron jobs, units, sudo commands and sessions all agree on it.
/// Private to the user, created 0700; an existing one must belong to the user (in a shared
/// directory, another user could have created it first).
pub(crate) fn default_dir() -> Result<PathBuf, Failure> {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let base = if Path::new("/run/lock").is_dir() {
        "/run/lock"
    } else {
        "/tmp"
    };
    let dir = PathBuf::from(format!("{base}/lockgate-{uid}"));
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
