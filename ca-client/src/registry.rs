//! The client side of identity-ca's gRPC API: the generated protobufs, a
//! mutual-TLS channel to the CA, and [`RegistrySource`], the cluster source
//! that follows the standalone registry's watch stream.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};

use meshguard_common::cluster::{BoxFuture, ClusterSource, ClusterView, NodeRecord, SourceError};

pub mod convert;

/// Generated from `proto/meshguard/ca/v1/ca.proto`.
#[allow(clippy::all, rust_2018_idioms, missing_docs)]
pub mod proto {
    tonic::include_proto!("meshguard.ca.v1");
}

/// The SNI name clients send; peers are checked by SPIFFE ID, never by name.
pub const TLS_SERVER_NAME: &str = "identity-ca";
/// How often agents re-fetch the trust bundle, in every binary: a CA
/// rotation's prepare step must reach every node before activation, so
/// the wait between the two is a small multiple of this.
pub const DEFAULT_BUNDLE_REFRESH: Duration = Duration::from_secs(10);
/// The CA server's own SPIFFE ID path: `spiffe://<td>/meshguard/identity-ca`.
pub const CA_SERVER_PATH: &str = "/meshguard/identity-ca";
/// The largest message either side accepts: CSRs and SVIDs are a few KiB,
/// a snapshot of 100,000 workloads is ~20 MiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("identity-ca address {addr:?} is invalid: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("identity-ca sent an invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// A lazily connecting mutual-TLS gRPC channel to identity-ca at `addr`
/// (`host:port`). Reconnects by itself; each connection presents whatever
/// credential the TLS configuration resolves at that time.
pub fn channel(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<Channel, RegistryError> {
    let bad = |reason: String| RegistryError::BadAddress { addr: addr.to_owned(), reason };
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    let connector = tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        async move {
            let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
            let tcp = tokio::net::TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(TLS_SERVER_NAME).map_err(std::io::Error::other)?;
            let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// A node API client with the project's message limits.
pub fn node_client(channel: Channel) -> proto::node_api_client::NodeApiClient<Channel> {
    proto::node_api_client::NodeApiClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The cluster view as identity-ca's registry streams it (standalone mode).
pub struct RegistrySource {
    client: proto::node_api_client::NodeApiClient<Channel>,
    rx: watch::Receiver<Arc<ClusterView>>,
    task: tokio::task::JoinHandle<()>,
}

// === impl RegistrySource ===

impl RegistrySource {
    /// Starts following the registry over `channel` (see [`channel`]). The
    /// view starts empty and fills in with the first snapshot. Must run
    /// inside a tokio runtime.
    pub fn start(channel: Channel) -> Self {
        let client = node_client(channel);
        let (tx, rx) = watch::channel(Arc::new(ClusterView::default()));
        let task = tokio::spawn(follow(client.clone(), tx));
        Self { client, rx, task }
    }
}

impl Drop for RegistrySource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClusterSource for RegistrySource {
    fn publish_node<'a>(&'a self, node: &'a NodeRecord) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let req = proto::PublishNodeRequest { node: Some(convert::node_to_proto(node)) };
            self.client
                .clone()
                .publish_node(req)
                .await
                .map(|_| ())
                .map_err(|s| SourceError::Unavailable { reason: format!("identity-ca refused the node record: {}", s.message()) })
        })
    }

    fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.rx.clone()
    }
}

/// Follows the watch stream for as long as anyone listens, re-opening it
/// (and so starting again from a snapshot) whenever it breaks.
async fn follow(mut client: proto::node_api_client::NodeApiClient<Channel>, tx: watch::Sender<Arc<ClusterView>>) {
    // Jittered: after a CA restart the nodes do not all re-open at once.
    let mut backoff = meshguard_common::retry::Backoff::default();
    while !tx.is_closed() {
        match client.watch_cluster(proto::WatchClusterRequest {}).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                let mut view: Option<ClusterView> = None;
                loop {
                    let event = match stream.message().await {
                        Ok(Some(ev)) => ev,
                        Ok(None) => break,
                        Err(status) => {
                            tracing::warn!(error = %status.message(), "registry watch stream broke; re-opening");
                            break;
                        }
                    };
                    let mut cur = view.take().unwrap_or_else(|| (**tx.borrow()).clone());
                    if let Err(error) = convert::apply_event(&mut cur, event) {
                        tracing::warn!(%error, "ignoring an invalid registry event");
                    }
                    // Apply whatever else has already arrived before publishing,
                    // so a burst of changes costs one snapshot.
                    while let Ok(Ok(Some(ev))) = tokio::time::timeout(Duration::ZERO, stream.message()).await {
                        if let Err(error) = convert::apply_event(&mut cur, ev) {
                            tracing::warn!(%error, "ignoring an invalid registry event");
                        }
                    }
                    let snapshot = Arc::new(cur);
                    tx.send_if_modified(|v| {
                        if **v != *snapshot {
                            *v = snapshot.clone();
                            true
                        } else {
                            false
                        }
                    });
                    view = Some(Arc::unwrap_or_clone(snapshot));
                    // The stream works: a break later starts from the shortest delay.
                    backoff.reset();
                }
            }
            Err(status) => tracing::warn!(error = %status.message(), "cannot open the registry watch stream; retrying"),
        }
        backoff.wait().await;
    }
}
