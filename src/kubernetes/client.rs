//! Kubernetes clients and the object that holds the locks.

use std::time::Duration;

use kube::api::ApiResource;
use kube::discovery::Scope;

use crate::error::Error;

/// A client configured the usual way: in-cluster service account, `$KUBECONFIG`, or
/// `~/.kube/config`; `context` picks a kubeconfig context other than the current one. Every
/// request times out after `timeout`.
///
/// # Errors
///
/// [`Error::InvalidConfig`] when no configuration can be found or it is unusable.
pub async fn client(context: Option<&str>, timeout: Duration) -> Result<kube::Client, Error> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let config = match context {
        None => kube::Config::infer().await.map_err(|e| {
            Error::InvalidConfig(format!(
                "no usable Kubernetes configuration: {}",
                crate::error::chain(&e)
            ))
        })?,
        Some(_) => kube::Config::from_kubeconfig(&options).await.map_err(|e| {
            Error::InvalidConfig(format!("kubeconfig: {}", crate::error::chain(&e)))
        })?,
    };
    client_from_config(config, timeout)
}

/// A client for `config`: kube's client stack with one change, TCP_NODELAY. kube's default connector leaves Nagle's
/// algorithm on, and a request written in two segments then waits for the server's delayed ACK
/// (40 ms) on every new connection: a lock handoff that needs a fresh connection would pay it.
///
/// # Errors
///
/// [`Error::InvalidConfig`] when the configuration's TLS or credentials are unusable.
pub fn client_from_config(config: kube::Config, timeout: Duration) -> Result<kube::Client, Error> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use kube::client::ConfigExt;
    use tower::ServiceBuilder;
    let fail = |e: kube::Error| {
        Error::InvalidConfig(format!("Kubernetes client: {}", crate::error::chain(&e)))
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

    /// An object of the resource named as kubectl names it (`configmaps`,
    /// `leases.coordination.k8s.io`, `widgets.v1alpha1.example.com`), resolved through the API
    /// server's discovery. `namespace` is `None` for cluster-scoped resources.
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
        let name = name.into();
        let unknown = |why: String| Error::UnknownResource {
            resource: resource.to_owned(),
            reason: why,
        };
        // RESOURCE[.VERSION][.GROUP...]: the first label is the plural; the rest is a group, or a
        // version then a group.
        let (plural, rest) = resource.split_once('.').unwrap_or((resource, ""));
        let (version, group) = match rest.split_once('.') {
            Some((v, g))
                if v.starts_with('v') && v[1..].starts_with(|c: char| c.is_ascii_digit()) =>
            {
                (Some(v), g)
            }
            _ => (None, rest),
        };
        let discovery = kube::Discovery::new(client.clone())
            .filter(&[group])
            .run()
            .await
            .map_err(|e| Error::Unreachable {
                resource: resource.to_owned(),
                source: Box::new(e),
            })?;
        let found = discovery.groups().flat_map(|g| {
            let versions: Vec<String> = match version {
                Some(v) => vec![v.to_owned()],
                None => vec![g.preferred_version_or_latest().to_owned()],
            };
            versions
                .into_iter()
                .flat_map(|v| g.versioned_resources(&v))
                .filter(|(ar, _)| ar.plural == plural && ar.group == group)
                .collect::<Vec<_>>()
        });
        let (ar, caps) = found
            .into_iter()
            .next()
            .ok_or_else(|| unknown("the API server does not serve it".into()))?;
        let namespaced = caps.scope == Scope::Namespaced;
        match (&namespace, namespaced) {
            (Some(_), false) => {
                return Err(unknown("it is cluster-scoped; give no namespace".into()))
            }
            (None, true) => return Err(unknown("it is namespaced; give a namespace".into())),
            _ => {}
        }
        Ok(Self {
            resource: ar,
            namespace,
            name,
        })
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
