//! Wiring: attest (or reuse the saved node SVID), follow the registry,
//! keep workload SVIDs, renew the node SVID, serve the Workload API.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use meshguard_ca_client::registry::RegistrySource;
use meshguard_common::cluster::ClusterSource;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;

use crate::ca_client::{CaClient, CaClientError, GrpcCa, read_pem_certs, sleep_until_unix};
use crate::caller::{CallerResolver, NetnsResolver};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::mutual::{Datapath, NodeCredentials, Settings};
use crate::peer_process::CallerStream;
use crate::proto::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::svids::SvidState;
use crate::workload_api::WorkloadApi;
use meshguard_ebpf::PinLayout;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Ca(#[from] CaClientError),
    #[error("cannot serve the Workload API on {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Agent {
    pub ca: Arc<GrpcCa>,
    pub state: watch::Receiver<Arc<SvidState>>,
    pub socket: PathBuf,
    pub source: Arc<RegistrySource>,
    tasks: JoinSet<()>,
}

impl Agent {
    pub async fn start(config: Config) -> Result<Self, AgentError> {
        Self::start_with(config, None).await
    }

    /// `resolver` replaces the network-namespace resolver (tests, Kubernetes).
    pub async fn start_with(config: Config, resolver: Option<Arc<dyn CallerResolver>>) -> Result<Self, AgentError> {
        let initial = read_pem_certs(&config.trust_bundle_file)?;
        let ca = Arc::new(GrpcCa::new(config.trust_domain.clone(), &config.node_name, &config.ca_address, &initial, &config.state_dir)?);
        ca.ensure_node_svid(config.join_token.as_deref(), config.service_account_token_file.as_deref()).await?;
        let mut tasks = JoinSet::new();

        // Node SVID renewal at half-life.
        let c = ca.clone();
        tasks.spawn(async move {
            let mut backoff = meshguard_common::retry::Backoff::default();
            loop {
                sleep_until_unix(c.node_renew_at()).await;
                match c.renew_node_svid().await {
                    Ok(()) => {
                        backoff.reset();
                        tracing::info!(node = %c.node, "node SVID renewed");
                    }
                    Err(error) => {
                        let wait = backoff.next_delay();
                        tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "cannot renew the node SVID; retrying");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });

        let source = Arc::new(RegistrySource::start(ca.channel()));
        let (tx, state) = watch::channel(Arc::new(SvidState::default()));
        let client: Arc<dyn CaClient> = ca.clone();
        let c = ca.clone();
        tasks.spawn(crate::svids::run(
            client.clone(),
            config.node_name.clone(),
            config.trust_domain.clone(),
            source.subscribe(),
            config.bundle_refresh,
            move |b| {
                if let Err(error) = c.set_bundle(b) {
                    tracing::error!(%error, "cannot use the CA's new bundle");
                }
            },
            tx,
        ));

        let socket = config.workload_api_socket.clone();
        let io = |source| AgentError::Socket { path: socket.display().to_string(), source };
        if let Some(dir) = socket.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir).map_err(io)?;
        }
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let listener = tokio::net::UnixListener::bind(&socket).map_err(io)?;
        // Any local process may ask; what it gets depends on who it is.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
        let resolver = resolver.unwrap_or_else(|| Arc::new(NetnsResolver::new(config.pod_netns_path.clone())));
        let api = WorkloadApi { trust_domain: config.trust_domain.clone(), state: state.clone(), resolver, ca: client };
        tasks.spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(api))
                .serve_with_incoming(UnixListenerStream::new(listener).filter_map(|conn| {
                    // Each connection is bound to the process that opened it.
                    match conn.and_then(CallerStream::new) {
                        Ok(c) => Some(Ok::<_, std::io::Error>(c)),
                        Err(error) => {
                            tracing::warn!(%error, "workload API connection refused: its peer process is unknown");
                            None
                        }
                    }
                }))
                .await;
            if let Err(error) = r {
                tracing::error!(%error, "workload API server stopped");
            }
        });
        tracing::info!(node = %config.node_name, socket = %socket.display(), "auth-handshake serving the Workload API");

        let metrics = Metrics::new();
        if let Some(addr) = config.metrics_address {
            let registry = Arc::new(metrics.registry(state.clone(), ca.clone()));
            let (svids, c) = (state.clone(), ca.clone());
            let ready: meshguard_common::telemetry::Readiness = Arc::new(move || crate::metrics::readiness(&svids.borrow(), &c));
            tasks.spawn(async move {
                if let Err(error) = meshguard_common::telemetry::serve(addr, registry, ready).await {
                    tracing::error!(%error, %addr, "metrics server stopped");
                }
            });
        }
        if let Some(h) = &config.handshake {
            let settings = Settings {
                node: config.node_name.clone(),
                trust_domain: config.trust_domain.clone(),
                port: h.port,
                listen: h.listen,
                prove_ahead: h.prove_ahead,
            };
            let creds: Arc<dyn NodeCredentials> = ca.clone();
            let datapath = Datapath::Pinned(PinLayout::new(&h.pin_dir));
            tasks.spawn(crate::mutual::run(settings, creds, state.clone(), source.subscribe(), datapath, metrics));
        }
        Ok(Self { ca, state, socket, source, tasks })
    }

    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let _ = std::fs::remove_file(&self.socket);
    }
}
