//! Kubernetes clients and the object that holds the locks, found as kubectl finds them.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList;
use kube::api::ApiResource;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::error::Error;

/// A client configured the usual way: in-cluster service account, `$KUBECONFIG`, or
/// `~/.kube/config`; `context` picks a kubeconfig context other than the current one. Every
/// request times out after `timeout`.
///
/// # Errors
///
/// [`Error::KubeConfig`] when no configuration can be found or it is unusable.
pub async fn client(context: Option<&str>, timeout: Duration) -> Result<kube::Client, Error> {
    client_with(None, context, timeout).await
}

/// A client configured as kubectl's flags say: `kubeconfig` as `--kubeconfig` (default:
/// `$KUBECONFIG`, else `~/.kube/config`, else the pod's service account), `context` as
/// `--context`. The client's [default
/// namespace](kube::Client::default_namespace) is the context's (else `default`), or in a pod
/// its service account's. Every request times out after `timeout`.
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> Result<(), lockgate::Error> {
/// use std::time::Duration;
/// let client = lockgate::kubernetes::client_with(
///     Some("/etc/ci/kubeconfig".as_ref()),
///     Some("staging"),
///     Duration::from_secs(3),
/// )
/// .await?;
/// println!("namespace {}", client.default_namespace());
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// [`Error::KubeConfig`] when no configuration can be found or it is unusable (its reason on
/// one line), or when `context` is not one of the kubeconfig's (the reason lists them).
pub async fn client_with(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
    timeout: Duration,
) -> Result<kube::Client, Error> {
    let unusable = |e: &dyn std::error::Error| Error::KubeConfig {
        reason: one_line_chain(e),
    };
    let config = match (kubeconfig, context) {
        (None, None) => kube::Config::infer().await.map_err(|e| unusable(&e))?,
        (path, context) => {
            let file = match path {
                Some(p) => Kubeconfig::read_from(p).map_err(|e| Error::KubeConfig {
                    reason: format!("kubeconfig {}: {}", p.display(), one_line_chain(&e)),
                })?,
                None => Kubeconfig::read().map_err(|e| unusable(&e))?,
            };
            if let Some(c) = context {
                if !file.contexts.iter().any(|n| n.name == c) {
                    let known: Vec<&str> = file.contexts.iter().map(|n| n.name.as_str()).collect();
                    return Err(Error::KubeConfig {
                        reason: format!(
                            "the kubeconfig has no context {c:?} (it has: {})",
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    });
                }
            }
            let options = KubeConfigOptions {
                context: context.map(str::to_owned),
                ..Default::default()
            };
            let mut config = kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| unusable(&e))?;
            config.apply_debug_overrides();
            config
        }
    };
    client_from_config(config, timeout)
}

/// `error: cause: cause`, each cause once and on one line: the first line of each (a YAML
/// parser's error goes on with an excerpt of the file).
fn one_line_chain(e: &dyn std::error::Error) -> String {
    let first = |e: &dyn std::error::Error| {
        let text = e.to_string();
        text.lines().next().unwrap_or_default().trim().to_owned()
    };
    let mut s = first(e);
    let mut source = e.source();
    while let Some(cause) = source {
        let text = first(cause);
        if !text.is_empty() && !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// A client for `config`: kube's client stack with one change, TCP_NODELAY. kube's default connector leaves Nagle's
/// algorithm on, and a request written in two segments then waits for the server's delayed ACK
/// (40 ms) on every new connection: a lock handoff that needs a fresh connection would pay it.
///
/// # Errors
///
/// [`Error::KubeConfig`] when the configuration's TLS or credentials are unusable.
pub fn client_from_config(config: kube::Config, timeout: Duration) -> Result<kube::Client, Error> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use kube::client::ConfigExt;
    use tower::ServiceBuilder;
    let fail = |e: kube::Error| Error::KubeConfig {
        reason: one_line_chain(&e),
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    // Only connecting gets this timeout: each request is bounded by the locker itself, and a
    // read timeout would cut the long-lived watch.
    http.set_connect_timeout(Some(timeout));
    let https = config
        .rustls_https_connector_with_connector(http)
        .map_err(fail)?;
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(fail)?)
        .layer(config.extra_headers_layer().map_err(fail)?)
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace))
}

pub(crate) async fn resolve(
    context: Option<&str>,
    resource: &str,
    namespace: Option<String>,
    name: &str,
    timeout: Duration,
) -> Result<(kube::Client, Target), Error> {
    let client = client(context, timeout).await?;
    let target = match (resource, namespace) {
        ("configmaps", Some(ns)) => Target::configmap(ns, name),
        (_, namespace) => Target::discover(&client, resource, namespace, name).await?,
    };
    Ok((client, target))
}

/// Which object holds the locks.
#[derive(Debug, Clone)]
pub struct Target {
    pub(crate) resource: ApiResource,
    pub(crate) namespace: Option<String>,
    pub(crate) name: String,
}

impl Target {
    /// A ConfigMap.
    pub fn configmap(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        let ar = ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            plural: "configmaps".into(),
        };
        Self {
            resource: ar,
            namespace: Some(namespace.into()),
            name: name.into(),
        }
    }

    /// An object of the resource named as kubectl names it, resolved through the API server's
    /// discovery: its plural (`configmaps`), singular (`configmap`), short name (`cm`) or kind,
    /// optionally with a group (`leases.coordination.k8s.io`) or a version and a group
    /// (`configmaps.v1.`: the core group, `widgets.v1alpha1.example.com`). A name without a
    /// group is looked for in the core group first, then in every group. `namespace` is `None`
    /// for cluster-scoped resources.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownResource`] when discovery does not know the resource, or when a
    /// namespace is given for a cluster-scoped resource or missing for a namespaced one;
    /// connection errors as [`Error::Unreachable`].
    pub async fn discover(
        client: &kube::Client,
        resource: &str,
        namespace: Option<String>,
        name: impl Into<String>,
    ) -> Result<Self, Error> {
        let found = find_resource(client, resource).await?;
        Self::found(resource, found, namespace, name.into())
    }

    /// The object `name` of the resource found for `resource`, checked against its scope.
    fn found(
        resource: &str,
        (ar, namespaced): (ApiResource, bool),
        namespace: Option<String>,
        name: String,
    ) -> Result<Self, Error> {
        let unknown = |why: &str| Error::UnknownResource {
            resource: resource.to_owned(),
            reason: why.to_owned(),
        };
        match (&namespace, namespaced) {
            (Some(_), false) => return Err(unknown("it is cluster-scoped; give no namespace")),
            (None, true) => return Err(unknown("it is namespaced; give a namespace")),
            _ => {}
        }
        Ok(Self {
            resource: ar,
            namespace,
            name,
        })
    }

    /// As [`discover`](Self::discover), with kubectl's namespace rule: without `namespace`, a
    /// namespaced resource is in the client's [default
    /// namespace](kube::Client::default_namespace) (the kubeconfig context's, or the pod's
    /// service account's), and a cluster-scoped one has none.
    ///
    /// # Errors
    ///
    /// As [`discover`](Self::discover).
    pub async fn resolve(
        client: &kube::Client,
        resource: &str,
        namespace: Option<String>,
        name: impl Into<String>,
    ) -> Result<Self, Error> {
        let found = find_resource(client, resource).await?;
        let namespace = match namespace {
            None if found.1 => Some(client.default_namespace().to_owned()),
            ns => ns,
        };
        Self::found(resource, found, namespace, name.into())
    }

    pub(crate) fn describe(&self) -> String {
        let kind = if self.resource.group.is_empty() {
            self.resource.plural.clone()
        } else {
            format!("{}.{}", self.resource.plural, self.resource.group)
        };
        match &self.namespace {
            Some(ns) => format!("{kind} {ns}/{}", self.name),
            None => format!("{kind} {}", self.name),
        }
    }
}

/// `RESOURCE[.VERSION][.GROUP]` as kubectl parses it: the first label names the resource; what
/// follows is a group, or a version (`v1`, `v1beta2`) and a group (empty: the core group).
/// `None` as the group: not given (any group).
fn parse_resource(resource: &str) -> (String, Option<&str>, Option<&str>) {
    let lower = resource.to_ascii_lowercase();
    let Some((first, rest)) = resource.split_once('.') else {
        return (lower, None, None);
    };
    let first = first.to_ascii_lowercase();
    let is_version = |v: &str| {
        v.strip_prefix('v').is_some_and(|n| {
            let digits = n.trim_start_matches(|c: char| c.is_ascii_digit());
            digits.len() < n.len()
                && (digits.is_empty()
                    || ["alpha", "beta"].iter().any(|s| {
                        digits
                            .strip_prefix(s)
                            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                    }))
        })
    };
    match rest.split_once('.') {
        Some((v, group)) if is_version(v) => (first, Some(v), Some(group)),
        None if is_version(rest) => (first, Some(rest), Some("")),
        _ => (first, None, Some(rest)),
    }
}

/// The resource `resource` names (see [`Target::discover`]), and whether it is namespaced.
async fn find_resource(
    client: &kube::Client,
    resource: &str,
) -> Result<(ApiResource, bool), Error> {
    let unreachable = |e: kube::Error| Error::Unreachable {
        resource: resource.to_owned(),
        source: Box::new(e),
    };
    let not_served = || Error::UnknownResource {
        resource: resource.to_owned(),
        reason: "the API server does not serve it".into(),
    };
    let (wanted, version, group) = parse_resource(resource);
    // A group or version the server does not serve answers 404.
    let served = |r: Result<APIResourceList, kube::Error>| match r {
        Ok(list) => Ok(Some(list)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(unreachable(e)),
    };
    // The core group first: where kubectl looks first too.
    if matches!(group, None | Some("")) {
        let v = version.unwrap_or("v1");
        if let Some(list) = served(client.list_core_api_resources(v).await)? {
            if let Some(found) = matching(&list, "", v, &wanted) {
                return Ok(found);
            }
        }
        if group.is_some() {
            return Err(not_served());
        }
    }
    let groups = client.list_api_groups().await.map_err(unreachable)?;
    for g in &groups.groups {
        if group.is_some_and(|want| want != g.name) {
            continue;
        }
        let v = match version {
            Some(v) => v.to_owned(),
            None => match &g.preferred_version {
                Some(p) => p.version.clone(),
                None => match g.versions.first() {
                    Some(first) => first.version.clone(),
                    None => continue,
                },
            },
        };
        let listed = client
            .list_api_group_resources(&format!("{}/{v}", g.name))
            .await;
        if let Some(list) = served(listed)? {
            if let Some(found) = matching(&list, &g.name, &v, &wanted) {
                return Ok(found);
            }
        }
    }
    Err(not_served())
}

/// The resource of `list` (group `group`, version `version`) that `wanted` names: its plural,
/// singular, a short name or its kind, in lower case. Subresources never match.
fn matching(
    list: &APIResourceList,
    group: &str,
    version: &str,
    wanted: &str,
) -> Option<(ApiResource, bool)> {
    let r = list.resources.iter().find(|r| {
        !r.name.contains('/')
            && (r.name == wanted
                || r.singular_name == wanted
                || r.kind.to_ascii_lowercase() == wanted
                || r.short_names.iter().flatten().any(|s| s == wanted))
    })?;
    let api_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    let ar = ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version,
        kind: r.kind.clone(),
        plural: r.name.clone(),
    };
    Some((ar, r.namespaced))
}

#[cfg(test)]
mod tests {
    use super::parse_resource;

    #[test]
    fn resource_names_parse_as_kubectl_parses_them() {
        for (given, want) in [
            ("cm", ("cm", None, None)),
            ("ConfigMap", ("configmap", None, None)),
            ("configmaps.v1.", ("configmaps", Some("v1"), Some(""))),
            ("configmaps.v1", ("configmaps", Some("v1"), Some(""))),
            (
                "leases.coordination.k8s.io",
                ("leases", None, Some("coordination.k8s.io")),
            ),
            (
                "leases.v1.coordination.k8s.io",
                ("leases", Some("v1"), Some("coordination.k8s.io")),
            ),
            (
                "widgets.v1alpha1.example.com",
                ("widgets", Some("v1alpha1"), Some("example.com")),
            ),
            // Not a version: a group whose first label starts with a v.
            (
                "things.vendor.example.com",
                ("things", None, Some("vendor.example.com")),
            ),
            (
                "things.v1x.example.com",
                ("things", None, Some("v1x.example.com")),
            ),
        ] {
            let (r, v, g) = parse_resource(given);
            assert_eq!((r.as_str(), v, g), want, "{given}");
        }
    }
}
