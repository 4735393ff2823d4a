//! Running the CA: the shared state, the mutual-TLS node API listener, the
//! root-only admin socket, and the background tasks (server certificate
//! renewal, bundle propagation, pruning).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use meshguard_ca_client::registry::proto::{admin_api_server::AdminApiServer, node_api_server::NodeApiServer};
use meshguard_ca_client::registry::{CA_SERVER_PATH, MAX_MESSAGE_BYTES};
use meshguard_ca_client::svid::{self, BundleCell, CredentialCell, SpiffeVerifier, X509Bundle};
use meshguard_common::spiffe::SpiffeId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};

use crate::admin::AdminService;
use crate::attest::k8s::{ApiServerReviewer, K8sAttestor};
use crate::attest::{JoinTokens, NodeAttestor};
use crate::authority::{Ca, CaError, Lifetimes, now_unix};
use crate::config::{Config, DB_FILE};
use crate::k8s_numbers::Adoption;
use crate::metrics::Metrics;
use crate::node_api::NodeService;
use crate::registry::{Registry, RegistryError};
use crate::store::{ATTESTED_NODES, Store, StoreError};

/// Largest request the node API decodes: a full batch of CSRs is ~300 KiB.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// A TLS handshake that takes longer than this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress, in all and per source address; a connection
/// over either bound is closed at once (counted).
pub const MAX_HANDSHAKES: usize = 1024;
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 32;
/// Open registry watch streams per node.
pub const MAX_WATCHES_PER_NODE: usize = 4;
/// Attestations in progress (they carry no client certificate).
pub const MAX_ATTESTATIONS: usize = 16;
/// How often expired serials and join tokens are pruned, and how long after
/// expiry they are kept for `svid list --all`.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
pub const PRUNE_GRACE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kubernetes attestation is configured but unusable: {reason}")]
    Kubernetes { reason: String },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the TLS configuration: {source}")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    #[error("the CA's own trust bundle is unusable: {source}")]
    Bundle {
        #[source]
        source: svid::SvidError,
    },
}

/// At most `max` places per key (a source address, a node); a place is
/// held until its [`Place`] drops.
#[derive(Clone)]
pub struct Places<K: Ord + Clone> {
    max: usize,
    taken: Arc<std::sync::Mutex<BTreeMap<K, usize>>>,
}

/// One place of a [`Places`] key, given back on drop.
pub struct Place<K: Ord + Clone> {
    key: K,
    places: Places<K>,
}

impl<K: Ord + Clone> Places<K> {
    pub fn new(max: usize) -> Self {
        Self { max, taken: Arc::default() }
    }

    /// A place for `key`, or None when it holds `max` already.
    pub fn take(&self, key: &K) -> Option<Place<K>> {
        let mut m = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key.clone()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Place { key: key.clone(), places: self.clone() })
    }
}

impl<K: Ord + Clone> Drop for Place<K> {
    fn drop(&mut self) {
        let mut m = self.places.taken.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// What the CA remembers about an attested node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeAttestation {
    pub spiffe_id: String,
    pub attested_at: i64,
    pub svid_expires_at: i64,
    pub method: String,
    /// Hex serial of the node SVID issued last: the one credential that may
    /// renew. Empty in records written before credentials were bound.
    #[serde(default)]
    pub serial: String,
    /// The serial before it, still accepted for calls (connections opened
    /// with it are recycled well within a renewal interval), never to renew.
    #[serde(default)]
    pub previous_serial: Option<String>,
}

/// Where a presented node credential stands against the node's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The credential issued last.
    Current,
    /// The one before it.
    Previous,
    /// Older, or from an earlier membership of the same name.
    Superseded,
    /// The node is not attested (removed).
    Removed,
}

/// A leaf certificate's serial, as the node records keep it.
pub fn serial_hex(leaf_der: &[u8]) -> Result<String, svid::SvidError> {
    Ok(svid::check_leaf(leaf_der)?.serial.iter().map(|b| format!("{b:02x}")).collect())
}

/// Everything the services share.
pub struct CaState {
    pub ca: Ca,
    pub registry: Registry,
    pub tokens: JoinTokens,
    pub attestors: Vec<Box<dyn NodeAttestor>>,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    nodes: RwLock<BTreeMap<String, NodeAttestation>>,
    shutdown: watch::Receiver<bool>,
    /// Attestations in progress (unauthenticated callers).
    pub attestations: Arc<tokio::sync::Semaphore>,
    /// Open watch streams by node.
    watches: Places<String>,
    /// Kubernetes mode: the registry's numbers against the MeshIdentity
    /// objects (`None` standalone).
    adoption: RwLock<Option<Adoption>>,
}

/// A running CA.
pub struct CaServer {
    pub state: Arc<CaState>,
    /// Where the node API listens (the bound address, for port 0).
    pub addr: SocketAddr,
    pub admin_socket: PathBuf,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

// === impl CaState ===

impl CaState {
    /// Why the CA cannot sign now, if it cannot: no active authority, or
    /// an expired one.
    pub fn signing_problem(&self) -> Option<String> {
        let now = crate::authority::now_unix();
        match self.ca.list().iter().find(|a| a.state == crate::authority::AuthorityState::Active) {
            None => Some("no active signing authority".into()),
            Some(a) if a.not_after <= now => Some(format!("the active authority {} expired at Unix time {}", a.id, a.not_after)),
            Some(_) => None,
        }
    }

    pub fn open(config: Config, shutdown: watch::Receiver<bool>) -> Result<Self, ServerError> {
        let td = config.trust_domain.clone();
        let store = Store::open(&config.state_dir, DB_FILE, td.as_str())?;
        let lifetimes =
            Lifetimes { svid: config.svid_ttl, node_svid: config.node_svid_ttl, ca: config.ca_ttl, jwt_svid: config.jwt_svid_ttl };
        let ca = Ca::open(td.clone(), store.clone(), lifetimes)?;
        let registry = Registry::open(store.clone(), td)?;
        let tokens = JoinTokens::new(store.clone());
        let nodes: BTreeMap<String, NodeAttestation> = store.load_all(ATTESTED_NODES, "attested_nodes")?.into_iter().collect();
        // On Kubernetes nothing allocates before the MeshIdentity objects'
        // numbers are adopted (which then gives attested nodes their ids).
        let adoption = config.kubernetes.is_some().then_some(Adoption::Waiting);
        if adoption.is_none() {
            // Attested nodes have node ids even before they publish a record.
            registry.allocate_node_ids(nodes.keys().map(String::as_str))?;
        }
        let metrics = Arc::new(Metrics::new());
        metrics.observe_authorities(&ca.list());
        Ok(Self {
            ca,
            registry,
            attestors: vec![Box::new(tokens.clone())],
            tokens,
            metrics,
            config,
            nodes: RwLock::new(nodes),
            shutdown,
            attestations: Arc::new(tokio::sync::Semaphore::new(MAX_ATTESTATIONS)),
            watches: Places::new(MAX_WATCHES_PER_NODE),
            adoption: RwLock::new(adoption),
        })
    }

    /// Kubernetes mode: where the registry's numbers stand against the
    /// MeshIdentity objects; `None` standalone.
    pub fn adoption(&self) -> Option<Adoption> {
        self.adoption.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_adoption(&self, adoption: Adoption) {
        *self.adoption.write().unwrap_or_else(|e| e.into_inner()) = Some(adoption);
    }

    /// Why the registry's numbers must not be served (nor allocated) now,
    /// if so: on Kubernetes, until they are checked against the
    /// MeshIdentity objects the nodes enforce, and for good when they
    /// disagree.
    pub fn numbers_problem(&self) -> Option<String> {
        match self.adoption()? {
            Adoption::Adopted { .. } => None,
            Adoption::Waiting => {
                Some("the MeshIdentity objects are not listed yet: the registry's numbers wait to be checked against them".into())
            }
            Adoption::Refused { reason } => Some(reason),
        }
    }

    /// What `/readyz` says: ready while an unexpired authority signs and
    /// the registry's numbers agree with what the nodes enforce.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let problems: Vec<String> = self.signing_problem().into_iter().chain(self.numbers_problem()).collect();
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// Kubernetes mode: the API server owns workloads (pods), policies
    /// (MeshPolicy) and node records (MeshNode); the registry mirrors them
    /// and takes no other writes of them.
    pub fn on_kubernetes(&self) -> bool {
        self.config.kubernetes.is_some()
    }

    /// A place for one more watch stream of `node`, within [`MAX_WATCHES_PER_NODE`].
    pub fn watch_slot(&self, node: &str) -> Option<Place<String>> {
        self.watches.take(&node.to_owned())
    }

    pub fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    pub fn is_attested(&self, node: &str) -> bool {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).contains_key(node)
    }

    pub fn attested_nodes(&self) -> BTreeMap<String, NodeAttestation> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Where the credential with `serial` stands for `node`.
    pub fn standing(&self, node: &str, serial: &str) -> Standing {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        match nodes.get(node) {
            None => Standing::Removed,
            // Written before credentials were bound: bound from its next renewal on.
            Some(rec) if rec.serial.is_empty() || rec.serial == serial => Standing::Current,
            Some(rec) if rec.previous_serial.as_deref() == Some(serial) => Standing::Previous,
            Some(_) => Standing::Superseded,
        }
    }

    /// A fresh attestation (a join token, ...): the credential it issued
    /// (`serial`) is the node's only one; every earlier one is superseded.
    pub fn record_attestation(&self, node: &str, id: &SpiffeId, expires: i64, method: &str, serial: &str) -> Result<(), ServerError> {
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let rec = NodeAttestation {
            spiffe_id: id.to_string(),
            attested_at: now_unix(),
            svid_expires_at: expires,
            method: method.to_owned(),
            serial: serial.to_owned(),
            previous_serial: None,
        };
        self.ca.store().put(ATTESTED_NODES, node, Some(&rec))?;
        nodes.insert(node.to_owned(), rec);
        drop(nodes);
        // Every attested node has a node id (a no-op after the first time);
        // on Kubernetes once the objects' numbers are adopted, which gives
        // every node attested by then its id (this node is recorded above,
        // before the check, so it cannot fall between).
        if self.numbers_problem().is_none() {
            self.registry.allocate_node_ids([node])?;
        }
        Ok(())
    }

    /// A renewal presented with `presented`: recorded only if that is still
    /// the node's current credential (of two racing renewals, one wins).
    /// Returns false when it is not.
    pub fn record_renewal(&self, node: &str, expires: i64, presented: &str, serial: &str) -> Result<bool, ServerError> {
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let Some(prev) = nodes.get(node) else { return Ok(false) };
        if !prev.serial.is_empty() && prev.serial != presented {
            return Ok(false);
        }
        let rec = NodeAttestation {
            svid_expires_at: expires,
            method: "renewal".to_owned(),
            serial: serial.to_owned(),
            previous_serial: Some(presented.to_owned()),
            ..prev.clone()
        };
        self.ca.store().put(ATTESTED_NODES, node, Some(&rec))?;
        nodes.insert(node.to_owned(), rec);
        Ok(true)
    }

    /// Forgets a node: its SVID no longer opens the API, its record leaves the registry.
    pub fn remove_node(&self, node: &str) -> Result<bool, ServerError> {
        let was = self.forget_attestation(node)?;
        let rec = self.registry.delete_node(node)?;
        Ok(was || rec)
    }

    /// Forgets a node's attestation only: its SVID no longer opens the API
    /// (watch streams end within a second); its record stays. Returns
    /// whether it was attested.
    pub fn forget_attestation(&self, node: &str) -> Result<bool, ServerError> {
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let was = nodes.remove(node).is_some();
        self.ca.store().put::<NodeAttestation>(ATTESTED_NODES, node, None)?;
        Ok(was)
    }

    /// A fresh server SVID `spiffe://<td>/meshguard/identity-ca` and its key.
    fn server_svid(&self) -> Result<(Vec<rustls::pki_types::CertificateDer<'static>>, Vec<u8>, i64), ServerError> {
        let (key, csr) = crate::csr::generate().map_err(|source| CaError::Sign { source })?;
        let csr = crate::csr::CsrKey::parse(&csr).map_err(|e| CaError::BadAuthority { id: "server".into(), reason: e.to_string() })?;
        let id = SpiffeId::new(self.ca.trust_domain(), CA_SERVER_PATH)
            .map_err(|e| CaError::BadAuthority { id: "server".into(), reason: e.to_string() })?;
        let svid = self.ca.sign_x509(&[(id, csr)], self.config.svid_ttl, "identity-ca")?.remove(0);
        self.metrics.issued("server", 1);
        Ok((svid.chain, key.serialize_der(), svid.expires_at))
    }

    fn x509_bundle(&self) -> Result<X509Bundle, ServerError> {
        let b = self.ca.bundle();
        X509Bundle::new(b.trust_domain.clone(), b.x509_authorities.clone()).map_err(|source| ServerError::Bundle { source })
    }
}

// === impl CaServer ===

impl CaServer {
    /// Opens the state, binds both listeners and starts serving.
    pub async fn start(config: Config) -> Result<Self, ServerError> {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut state = CaState::open(config.clone(), shutdown_rx.clone())?;
        let mut kube_client = None;
        if let Some(k) = &config.kubernetes {
            // The client comes from the pod's service account (or a
            // kubeconfig); without one the CA refuses to start rather than
            // run without the attestation it was asked for.
            let client = crate::attest::k8s::kube_client(k.kubeconfig.as_deref())
                .await
                .map_err(|e| ServerError::Kubernetes { reason: e.to_string() })?;
            let reviewer = ApiServerReviewer::new(client.clone());
            state.attestors.push(Box::new(K8sAttestor::new(reviewer, k.audience.clone(), &k.agent_namespace, &k.agent_service_account)));
            tracing::info!(audience = %k.audience, agent = %format!("{}/{}", k.agent_namespace, k.agent_service_account), "Kubernetes node attestation (TokenReview) enabled; workloads, policies and nodes mirror the API server's, numbers are published as MeshIdentity objects");
            kube_client = Some(client);
        }
        let state = Arc::new(state);
        let mut tasks = JoinSet::new();
        if let Some(client) = kube_client {
            tasks.spawn(until_shutdown(shutdown_rx.clone(), kubernetes(client, state.clone())));
        }

        // Our own certificate, renewed at half-life and whenever the bundle changes.
        let creds = CredentialCell::default();
        let bundle = BundleCell::new(state.x509_bundle()?);
        let (chain, key, expires) = state.server_svid()?;
        creds.set(chain, &key).map_err(|source| ServerError::Tls { source })?;
        tasks.spawn(renew_server_svid(state.clone(), creds.clone(), bundle.clone(), expires));

        let verifier = Arc::new(SpiffeVerifier::any_in_trust_domain(bundle).client_auth_optional());
        let tls = svid::server_config(creds, verifier).map_err(|source| ServerError::Tls { source })?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listen = |source| ServerError::Listen { what: "node API", addr: config.listen_addr.to_string(), source };
        let listener = tokio::net::TcpListener::bind(config.listen_addr).await.map_err(listen)?;
        let addr = listener.local_addr().map_err(listen)?;

        let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
        let mut sd = shutdown_rx.clone();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let per_address = Places::new(MAX_HANDSHAKES_PER_ADDRESS);
        let metrics = state.metrics.clone();
        tasks.spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(error) => { tracing::warn!(%error, "accept failed"); continue; }
                    },
                    _ = sd.changed() => return,
                };
                let _ = tcp.set_nodelay(true);
                // Bounded: in all, and per address, so one source cannot take every place.
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    metrics.overloaded("handshakes_full");
                    tracing::warn!(%peer, "too many TLS handshakes in progress; connection closed");
                    continue;
                };
                let Some(slot) = per_address.take(&peer.ip()) else {
                    metrics.overloaded("handshakes_per_address");
                    tracing::warn!(%peer, "too many TLS handshakes in progress from this address; connection closed");
                    continue;
                };
                let acceptor = acceptor.clone();
                let conn_tx = conn_tx.clone();
                // Handshakes run concurrently so a slow client cannot stall others.
                tokio::spawn(async move {
                    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop((permit, slot));
                    match accepted {
                        Ok(Ok(tls)) => {
                            let _ = conn_tx.send(Ok::<_, std::io::Error>(tls)).await;
                        }
                        Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake refused"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        let node_api = NodeApiServer::new(NodeService { state: state.clone() })
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let conn_age = config.node_svid_ttl.min(config.svid_ttl) / 4;
        let mut sd = shutdown_rx.clone();
        tasks.spawn(async move {
            let r = tonic::transport::Server::builder()
                // Connections are recycled well within a node SVID's lifetime,
                // so no connection outlives the certificate it was opened with.
                .max_connection_age(conn_age)
                .max_connection_age_grace(conn_age / 2)
                .add_service(node_api)
                .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
                    let _ = sd.changed().await;
                })
                .await;
            if let Err(error) = r {
                tracing::error!(%error, "node API server stopped");
            }
        });

        // The admin socket: root (or our own user) only.
        let admin_socket = config.admin_socket.clone();
        let admin_listener = bind_admin_socket(&admin_socket)?;
        let own_uid = std::fs::metadata(&admin_socket).map(|m| m.uid()).unwrap_or(0);
        let admin = AdminApiServer::new(AdminService { state: state.clone() })
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let admin = tonic::service::interceptor::InterceptedService::new(admin, move |req: tonic::Request<()>| {
            crate::admin::check_peer(&req, own_uid)?;
            Ok(req)
        });
        let mut sd = shutdown_rx.clone();
        tasks.spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(admin)
                .serve_with_incoming_shutdown(UnixListenerStream::new(admin_listener), async move {
                    let _ = sd.changed().await;
                })
                .await;
            if let Err(error) = r {
                tracing::error!(%error, "admin server stopped");
            }
        });

        if let Some(maddr) = config.metrics_address {
            let registry = state.metrics.registry();
            let weak = Arc::downgrade(&state);
            let ready: meshguard_common::telemetry::Readiness = Arc::new(move || match weak.upgrade() {
                None => Err(vec!["shutting down".into()]),
                Some(st) => st.readiness(),
            });
            tasks.spawn(async move {
                if let Err(error) = meshguard_common::telemetry::serve(maddr, registry, ready).await {
                    tracing::error!(%error, addr = %maddr, "metrics endpoint stopped");
                }
            });
        }
        tasks.spawn(prune(state.clone()));
        tracing::info!(%addr, admin = %admin_socket.display(), trust_domain = %config.trust_domain, "identity-ca serving");
        Ok(Self { state, addr, admin_socket, shutdown, tasks })
    }

    /// Stops serving and waits until the state is released (so the same
    /// state directory can be opened again).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = self.tasks.join_next() => if r.is_none() { break },
                _ = &mut deadline => { self.tasks.abort_all(); while self.tasks.join_next().await.is_some() {} break; }
            }
        }
        let _ = std::fs::remove_file(&self.admin_socket);
        // Wait for in-flight handlers holding the state to finish.
        for _ in 0..100 {
            if Arc::strong_count(&self.state) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs until `signal` resolves.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }
}

/// Kubernetes mode: the MeshIdentity objects' numbers adopted first, then
/// the mirrors into the registry and the publisher out of it — none of
/// them when the registry disagrees with the objects (the CA stays not
/// ready and serves no numbers; the node API's attestation still works).
async fn kubernetes(client: kube::Client, state: Arc<CaState>) {
    if !crate::k8s_numbers::adopt(client.clone(), &state).await {
        return;
    }
    let mut tasks = JoinSet::new();
    tasks.spawn(crate::k8s_pods::mirror(client.clone(), state.clone()));
    tasks.spawn(crate::k8s_pods::mirror_policies(client.clone(), state.clone()));
    tasks.spawn(crate::k8s_nodes::mirror(client.clone(), state.clone()));
    tasks.spawn(crate::k8s_numbers::publish(client, state));
    // Dropped at shutdown, which aborts them.
    while tasks.join_next().await.is_some() {}
}

/// Runs `task` (one that never ends by itself) until shutdown.
async fn until_shutdown(mut shutdown: watch::Receiver<bool>, task: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = task => {}
        _ = shutdown.changed() => {}
    }
}

fn bind_admin_socket(path: &std::path::Path) -> Result<tokio::net::UnixListener, ServerError> {
    let io = |source| ServerError::Listen { what: "admin socket", addr: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let l = tokio::net::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(l)
}

async fn renew_server_svid(state: Arc<CaState>, creds: CredentialCell, bundle: BundleCell, mut expires: i64) {
    let mut bundles = state.ca.watch_bundle();
    let mut sd = state.shutdown_rx();
    loop {
        let half = ((expires - now_unix()) / 2).max(1) as u64;
        let rotated = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(half)) => false,
            r = bundles.changed() => { if r.is_err() { return; } true },
            _ = sd.changed() => return,
        };
        if rotated {
            match state.x509_bundle() {
                Ok(b) => bundle.set(b),
                Err(error) => tracing::error!(%error, "cannot use the new bundle"),
            }
        }
        match state.server_svid() {
            Ok((chain, key, exp)) => match creds.set(chain, &key) {
                Ok(()) => expires = exp,
                Err(error) => tracing::error!(%error, "cannot install the renewed server certificate"),
            },
            Err(error) => tracing::error!(%error, "cannot renew the server certificate"),
        }
    }
}

async fn prune(state: Arc<CaState>) {
    let mut sd = state.shutdown_rx();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
            _ = sd.changed() => return,
        }
        let s = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(error) = s.ca.prune_serials(PRUNE_GRACE) {
                tracing::warn!(%error, "cannot prune expired serials");
            }
            if let Err(error) = s.tokens.prune(PRUNE_GRACE) {
                tracing::warn!(%error, "cannot prune expired join tokens");
            }
        })
        .await;
    }
}
