//! Kubernetes for meshguard: the API server client every binary builds the
//! same way, what a Pod and a Node mean to the mesh, and [`source::KubeSource`],
//! the cluster source that builds the agents' view from the API server.

use std::path::Path;

pub mod objects;
pub mod source;

pub use kube::Client;
pub use source::KubeSource;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no Kubernetes API server client: {0}")]
    Client(String),
    #[error("the Kubernetes API server refused or failed a request: {0}")]
    Api(#[from] kube::Error),
    #[error("{0}")]
    Invalid(String),
}

/// An API server client: from `kubeconfig` if given; else in a pod its
/// service account, outside one `$KUBECONFIG` or `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, Error> {
    let failed = |e: &dyn std::fmt::Display| Error::Client(e.to_string());
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| failed(&e))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default()).await.map_err(|e| failed(&e))?
        }
        None => kube::Config::infer().await.map_err(|e| failed(&e))?,
    };
    kube::Client::try_from(config).map_err(|e| failed(&e))
}
