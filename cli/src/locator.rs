//! The locator: which locker the command line names (`--locker URL`, `--dir DIR`) or the
//! environment does, and the flags that apply to it (`lockers.rs` makes the locker).

use std::path::PathBuf;

use lockgate::file::Naming;

use crate::args::LocatorArgs;
use crate::errors::{code, Failure};
use crate::lockers::default_dir;

/// Where the locks live, as the command line and the environment name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Locator {
    /// A directory of lock files.
    File { dir: PathBuf, naming: Naming },
    /// Annotations of a Kubernetes object.
    Kubernetes {
        context: Option<String>,
        /// `None`: cluster-scoped, unless `default_namespace`.
        namespace: Option<String>,
        /// `kubernetes://RESOURCE/NAME`: the namespace is `--namespace`, else the client's
        /// default (the kubeconfig context's, or the pod's), as with kubectl.
        default_namespace: bool,
        resource: String,
        name: String,
        create_missing: bool,
        /// `--kubeconfig`.
        kubeconfig: Option<PathBuf>,
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
    /// directory; and refuses flags that do not apply to the locker.
    pub(crate) fn resolve(args: &LocatorArgs) -> Result<Self, Failure> {
        let mut locator = Self::resolve_location(args)?;
        locator.refuse_foreign_flags(args)?;
        match &mut locator {
            Locator::Kubernetes {
                create_missing,
                context,
                namespace,
                default_namespace,
                kubeconfig,
                ..
            } => {
                *create_missing = args.create_missing;
                kubeconfig.clone_from(&args.kubeconfig);
                if let Some(c) = &args.context {
                    match context {
                        Some(given) if given != c => {
                            return Err(Failure::new(
                                code::USAGE,
                                format!(
                                "--context {c:?} contradicts the locker URL's context {given:?}"
                            ),
                            ))
                        }
                        _ => *context = Some(c.clone()),
                    }
                }
                if let Some(ns) = &args.namespace {
                    match (&*namespace, *default_namespace) {
                        (_, true) => {
                            *namespace = Some(ns.clone());
                            *default_namespace = false;
                        }
                        (Some(given), false) if given == ns => {}
                        (Some(given), false) => {
                            return Err(Failure::new(
                                code::USAGE,
                                format!("--namespace {ns:?} contradicts the locker URL's namespace {given:?}"),
                            ))
                        }
                        (None, false) => {
                            return Err(Failure::new(
                                code::USAGE,
                                format!("--namespace {ns:?} contradicts the locker URL, which names a cluster-scoped object (kubernetes:///...); write kubernetes://RESOURCE/NAME"),
                            ))
                        }
                    }
                }
            }
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

    /// A flag given for another kind of locker is a mistake worth a word, not silence.
    fn refuse_foreign_flags(&self, args: &LocatorArgs) -> Result<(), Failure> {
        let (kind, flags): (&str, &[(&str, bool)]) = match self {
            Locator::File { .. } => (
                "a file locker",
                &[
                    ("--create-missing", args.create_missing),
                    ("--kubeconfig", args.kubeconfig.is_some()),
                    ("--context", args.context.is_some()),
                    ("--namespace", args.namespace.is_some()),
                    ("--token-file", args.token_file.is_some()),
                    ("--ca-file", args.ca_file.is_some()),
                ],
            ),
            Locator::Kubernetes { .. } => (
                "a Kubernetes locker",
                &[
                    ("--legacy-names", args.legacy_names),
                    ("--token-file", args.token_file.is_some()),
                    ("--ca-file", args.ca_file.is_some()),
                ],
            ),
            Locator::Http { .. } => (
                "a lock server",
                &[
                    ("--legacy-names", args.legacy_names),
                    ("--create-missing", args.create_missing),
                    ("--kubeconfig", args.kubeconfig.is_some()),
                    ("--context", args.context.is_some()),
                    ("--namespace", args.namespace.is_some()),
                ],
            ),
        };
        match flags.iter().find(|(_, given)| *given) {
            Some((flag, _)) => Err(Failure::new(
                code::USAGE,
                format!(
                    "{flag} does not apply to {kind} ({}); {}",
                    self.describe(),
                    applies_to(flag)
                ),
            )),
            None => Ok(()),
        }
    }

    /// Where the locks are, for people: a directory, a Kubernetes URL, a server.
    pub(crate) fn describe(&self) -> String {
        match self {
            Locator::File { dir, .. } => dir.display().to_string(),
            Locator::Kubernetes {
                context,
                namespace,
                default_namespace,
                resource,
                name,
                ..
            } => {
                let context = context
                    .as_ref()
                    .map(|c| format!("{c}@"))
                    .unwrap_or_default();
                match (namespace, default_namespace) {
                    (_, true) => format!("kubernetes://{context}{resource}/{name}"),
                    (ns, false) => format!(
                        "kubernetes://{context}{}/{resource}/{name}",
                        ns.as_deref().unwrap_or_default()
                    ),
                }
            }
            Locator::Http { url, .. } => lockgate_url_without_credentials(url),
        }
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
                format!(
                    "locker {} is not a URL; expected file:DIR, kubernetes://[NAMESPACE/]RESOURCE/NAME or http(s)://HOST:PORT",
                    crate::errors::shorten(url)
                ),
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
                format!("unknown locker scheme {:?} in {}; supported: file:DIR, kubernetes://[CONTEXT@][NAMESPACE/]RESOURCE/NAME, http(s)://HOST:PORT", crate::errors::shorten(scheme), crate::errors::shorten(url)),
            )),
        }
    }
}

/// Which lockers a flag applies to, for the message that refuses it.
fn applies_to(flag: &str) -> &'static str {
    match flag {
        "--legacy-names" => "it applies to file lockers (--dir, file:DIR)",
        "--create-missing" | "--kubeconfig" | "--context" | "--namespace" => {
            "it applies to Kubernetes lockers (--locker kubernetes://...)"
        }
        _ => "it applies to lock servers (--locker http(s)://...) and serve",
    }
}

/// `url` without the password of its user part.
fn lockgate_url_without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://{host}{path}"),
        None => url.to_owned(),
    }
}

/// `kubernetes://[CONTEXT@][NAMESPACE/]RESOURCE/NAME`: three parts name the namespace (an empty
/// one: cluster-scoped), two leave it to `--namespace` or the client's default.
fn parse_kubernetes(url: &str, rest: &str) -> Result<Locator, Failure> {
    let bad = |why: &str| {
        Failure::new(
            code::USAGE,
            format!(
                "locker {} {why}; expected kubernetes://[CONTEXT@][NAMESPACE/]RESOURCE/NAME",
                crate::errors::shorten(url)
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
    let (namespace, default_namespace, resource, name) = match parts.as_slice() {
        [namespace, resource, name] => (
            (!namespace.is_empty()).then(|| namespace.to_string()),
            false,
            resource,
            name,
        ),
        [resource, name] => (None, true, resource, name),
        _ => return Err(bad("does not have two or three parts")),
    };
    if resource.is_empty() || name.is_empty() {
        return Err(bad("names no resource or no object"));
    }
    Ok(Locator::Kubernetes {
        context,
        namespace,
        default_namespace,
        resource: resource.to_string(),
        name: name.to_string(),
        create_missing: false,
        kubeconfig: None,
    })
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
            default_namespace: false,
            resource: r.into(),
            name: n.into(),
            create_missing: false,
            kubeconfig: None,
        };
        let default_ns = |c: Option<&str>, r: &str, n: &str| match k(c, None, r, n) {
            Locator::Kubernetes {
                context,
                namespace,
                resource,
                name,
                create_missing,
                kubeconfig,
                ..
            } => Locator::Kubernetes {
                context,
                namespace,
                default_namespace: true,
                resource,
                name,
                create_missing,
                kubeconfig,
            },
            other => other,
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
            ("kubernetes://cm/locks", default_ns(None, "cm", "locks")),
            (
                "kubernetes://kind@configmaps.v1./locks",
                default_ns(Some("kind"), "configmaps.v1.", "locks"),
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
            "kubernetes://configmaps",
            "kubernetes://configmaps/",
            "kubernetes:///cm",
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

    #[test]
    fn credentials_are_not_shown() {
        for (url, shown) in [
            ("http://lockgate:s3cret@h:1/p", "http://h:1/p"),
            ("https://h:1", "https://h:1"),
            ("http://u@h", "http://h"),
        ] {
            assert_eq!(lockgate_url_without_credentials(url), shown);
        }
    }
}
