//! The managed node agent (`wg-agent run`): one WireGuard interface per
//! node, a peer per other node, routes for their pod CIDRs, all kept in step
//! with the cluster view.
//!
//! Fail closed: the tunnel interface is persistent and the routes stay when
//! the agent stops, so while it is down (or restarting) pod traffic to other
//! nodes is dropped at the interface, never sent in plaintext. A restarted
//! agent attaches to the same interface with the same key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use meshguard_ca_client::registry::{self, RegistrySource};
use meshguard_ca_client::svid::node_tls::NodeTls;
use meshguard_common::cluster::file::FileSource;
use meshguard_common::cluster::{ClusterSource, ClusterView, NodeRecord};
use meshguard_common::key::PublicKey;

use crate::device::{Device, DeviceUpdate};
use crate::io::tun::LinuxTun;
use crate::io::udp::HostNetwork;
use crate::uapi::server::{Access, UapiServer};

pub mod cni;
pub mod config;
pub mod metrics;
pub mod node_key;
pub mod observe;
pub mod reconcile;
pub mod routes;
pub mod signals;
pub mod uninstall;
pub mod watch_dir;

use config::{AgentConfig, SourceConfig};
use metrics::AgentMetrics;
use reconcile::plan;
use routes::Routes;

/// How often the key file is checked for a rotation.
const KEY_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Local pod endpoints are re-read when their directory changes (inotify:
/// a new pod is enforced as its file lands) and at least this often (an
/// interface that appeared after its file, a failed attach to retry).
const ENDPOINT_BACKSTOP: Duration = Duration::from_secs(5);
/// How often they are re-read when the directory cannot be watched.
const ENDPOINT_POLL: Duration = Duration::from_millis(200);
/// Conntrack garbage collection.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(5);
/// How fresh the datapath counters in `/metrics` are.
const COUNTER_INTERVAL: Duration = Duration::from_secs(1);

struct Agent {
    cfg: AgentConfig,
    device: Arc<Device>,
    routes: Routes,
    source: Box<dyn ClusterSource>,
    metrics: Arc<AgentMetrics>,
    public_key: PublicKey,
    /// Peers applied last time, by public key.
    applied: BTreeMap<PublicKey, NodeRecord>,
    key_mtime: Option<SystemTime>,
    enforcer: Option<crate::enforce::Enforcer>,
    /// Whether a cluster view has been applied to the enforcer yet.
    enforced_a_view: bool,
    /// The CNI plugin's requests, served between syncs.
    cni_requests: tokio::sync::mpsc::Receiver<cni::Pending>,
    cni_phase: tokio::sync::watch::Sender<cni::Phase>,
}

/// Runs the agent until SIGINT/SIGTERM, on the cluster source `cfg` names.
pub async fn run(mut cfg: AgentConfig) -> anyhow::Result<()> {
    let mut node_tls = None;
    let source: Box<dyn ClusterSource> = match cfg.source.clone() {
        SourceConfig::Dir { path, poll } => Box::new(FileSource::start(&path, poll)?),
        SourceConfig::Registry { address, node_credentials, trust_bundle, trust_domain, bundle_refresh } => {
            let (source, tls, health) =
                registry_source(&cfg.node_name, &address, &node_credentials, &trust_bundle, &trust_domain, bundle_refresh)?;
            node_tls = Some((tls, health));
            source
        }
        SourceConfig::Kubernetes { kubeconfig, trust_domain } => {
            let client = meshguard_k8s::client(kubeconfig.as_deref()).await?;
            if cfg.from_node != config::FromNode::default() {
                let facts = own_node(&client, &cfg.node_name).await;
                cfg.resolve_from_node(&facts.pod_cidrs, &facts.internal_ips)?;
                tracing::info!(endpoint = %cfg.endpoint, pod_cidrs = ?cfg.pod_cidrs, "read from this node's Node object");
            }
            tracing::info!("cluster source: the Kubernetes API server");
            Box::new(meshguard_k8s::KubeSource::start(client, trust_domain))
        }
    };
    let result = run_with_source(cfg, source, node_tls.as_ref().map(|(_, health)| health.clone())).await;
    drop(node_tls);
    result
}

/// Runs the agent until SIGINT/SIGTERM on `source` (tests give one that
/// never answers, as an unreachable identity-ca).
/// `registry`: in registry mode, what the metrics report of the link to
/// identity-ca (node SVID expiry, last successful call).
pub async fn run_with_source(
    cfg: AgentConfig,
    source: Box<dyn ClusterSource>,
    registry: Option<metrics::RegistryHealth>,
) -> anyhow::Result<()> {
    let key_path = cfg.key_path();
    let (secret, public_key) = node_key::load_or_create(&key_path)?;

    let tun = LinuxTun::open_with(&cfg.interface, true, cfg.tun_offload)?;
    tun.set_mtu(cfg.mtu)?;
    let ifindex = tun.ifindex().context("cannot read the tunnel's interface index")?;
    if let Err(error) = routes::no_ipv6_link_local(ifindex).await {
        tracing::warn!(%error, "cannot turn off IPv6 link-local addressing on the tunnel; it will solicit routers no peer answers");
    }
    tun.set_up()?;
    let device = Arc::new(Device::start(Arc::new(tun), Arc::new(HostNetwork { gro: cfg.udp_gro }), cfg.listen_port)?);
    device.apply(&DeviceUpdate { private_key: Some(Some(secret)), ..Default::default() })?;
    let _uapi = UapiServer::start(&cfg.uapi_socket_dir, &cfg.interface, device.clone(), Access::ReadOnly)?;

    let metrics = AgentMetrics::new(device.clone());
    *metrics.registry_health.lock() = registry;
    *metrics.source_refusals.lock() = source.refusals();
    let _metrics_task = cfg.metrics_address.map(|addr| {
        let (registry, ready) = (Arc::new(metrics.registry()), metrics.readiness_fn());
        tokio::spawn(async move {
            if let Err(error) = meshguard_common::telemetry::serve(addr, registry, ready).await {
                tracing::error!(%addr, %error, "metrics server stopped");
            }
        })
    });
    // Before the datapath loads: a pod arriving meanwhile is told to retry,
    // not left to time out on a missing socket.
    let (cni_tx, cni_requests) = tokio::sync::mpsc::channel(16);
    let (cni_phase, phase) = tokio::sync::watch::channel(if cfg.datapath.is_some() { cni::Phase::Loading } else { cni::Phase::NoDatapath });
    let _cni = cni::CniServer::start(
        &cfg.cni_socket,
        phase,
        cni_tx,
        metrics.cni_requests.clone(),
        cfg.datapath.as_ref().map(|d| d.endpoints_dir.clone()),
    )?;
    let mut agent = Agent {
        routes: Routes::new(ifindex)?,
        key_mtime: std::fs::metadata(&key_path).and_then(|m| m.modified()).ok(),
        cfg,
        device,
        source,
        metrics,
        public_key,
        applied: BTreeMap::new(),
        enforcer: None,
        enforced_a_view: false,
        cni_requests,
        cni_phase,
    };
    tracing::info!(
        node = %agent.cfg.node_name,
        interface = %agent.cfg.interface,
        public_key = %agent.public_key,
        endpoint = %agent.cfg.endpoint,
        strict = agent.cfg.strict,
        "node agent starting"
    );
    // Fail closed from the first second, before the cluster source answers
    // (after a reboot identity-ca may be down for long, and publishing
    // waits for it): the strict routes and blackhole first, then the policy
    // datapath with every local pod enforced as pinned or held closed.
    if let Err(error) = agent.routes.ensure(&reconcile::strict_routes(&agent.cfg)).await {
        tracing::error!(%error, "cannot install the strict routes before the view");
    }
    if let Some(settings) = agent.cfg.datapath.clone() {
        let node = agent.cfg.node_name.clone();
        let started = std::time::Instant::now();
        let mut enforcer = tokio::task::spawn_blocking(move || {
            // The node id comes with the view; the datapath does not need it to drop.
            crate::enforce::Enforcer::start(
                meshguard_ebpf::PinLayout::new(&settings.pin_dir),
                0,
                &node,
                &settings.endpoints_dir,
                settings.attach,
            )
        })
        .await
        .context("datapath loader panicked")??;
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "datapath loaded");
        // Pod sources only from the tunnel and the pods' own interfaces
        // (issue 14, findings 4 and 5); a failure keeps the node not ready.
        if let Err(error) = enforcer.guard_tunnel(&agent.cfg.interface, &agent.cfg.cluster_cidrs) {
            tracing::error!(%error, "the tunnel is not guarded");
        }
        enforcer.close_all_but_adopted()?;
        agent.stream_events(&mut enforcer)?;
        agent.enforcer = Some(enforcer);
        agent.cni_phase.send_replace(cni::Phase::Ready);
    }
    let mut endpoints =
        watch_dir::DirEvents::watch(agent.cfg.datapath.as_ref().map(|d| d.endpoints_dir.as_path()), ENDPOINT_BACKSTOP, ENDPOINT_POLL);
    agent.publish(&mut endpoints).await;
    let mut views = agent.source.subscribe();
    let stop = signals::terminated();
    tokio::pin!(stop);
    // Until a source has heard from the cluster its view is an empty
    // placeholder: applying it would remove the routes and empty the maps
    // the previous run left. Wait for a real one (pods the CNI plugin hands
    // over meanwhile are held closed).
    while **views.borrow() == ClusterView::default() {
        tokio::select! {
            changed = views.changed() => {
                if changed.is_err() {
                    anyhow::bail!("cluster source stopped");
                }
            }
            Some(request) = agent.cni_requests.recv() => serve_cni(agent.enforcer.as_mut(), None, request),
            _ = &mut stop => {
                tracing::info!("node agent stopping before the cluster source answered; the tunnel and routes stay");
                return Ok(());
            }
        }
    }
    let first = views.borrow_and_update().clone();
    agent.metrics.view_at.store(meshguard_common::telemetry::unix_now(), std::sync::atomic::Ordering::Relaxed);
    agent.reconcile(&first).await;
    agent.enforce(&first, true);
    // Sessions before the first packet needs one: no first-packet stall.
    agent.device.initiate_handshakes();
    agent.metrics.set_ready();

    let mut key_tick = tokio::time::interval(KEY_CHECK_INTERVAL);
    let mut housekeeping_tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    let mut counter_tick = tokio::time::interval(COUNTER_INTERVAL);
    loop {
        tokio::select! {
            changed = views.changed() => {
                if changed.is_err() {
                    anyhow::bail!("cluster source stopped");
                }
                let view = views.borrow_and_update().clone();
                agent.metrics.view_at.store(meshguard_common::telemetry::unix_now(), std::sync::atomic::Ordering::Relaxed);
                agent.reconcile(&view).await;
                agent.enforce(&view, true);
            }
            () = endpoints.changed() => {
                let view = views.borrow().clone();
                agent.enforce(&view, false);
            }
            Some(request) = agent.cni_requests.recv() => {
                let view = views.borrow().clone();
                serve_cni(agent.enforcer.as_mut(), Some(&*view), request);
            }
            _ = housekeeping_tick.tick() => {
                if let Some(e) = agent.enforcer.as_mut() {
                    e.housekeeping();
                }
            }
            _ = counter_tick.tick() => {
                if let Some(e) = agent.enforcer.as_mut() {
                    e.refresh_counters();
                }
            }
            _ = key_tick.tick() => agent.check_key_rotation(&mut endpoints).await,
            _ = &mut stop => break,
        }
    }
    tracing::info!("node agent stopping; the tunnel interface and routes stay, so traffic stays dropped, not leaked");
    Ok(())
}

/// This node's Node object, read again until the API server answers: the
/// agent cannot know its pod ranges without it (meanwhile the datapath
/// pinned by the previous agent, if any, keeps enforcing).
async fn own_node(client: &meshguard_k8s::Client, node: &str) -> meshguard_k8s::objects::NodeFacts {
    let mut backoff = meshguard_common::retry::Backoff::default();
    loop {
        match meshguard_k8s::objects::NodeFacts::fetch(client, node).await {
            Ok(facts) => return facts,
            Err(error) => tracing::warn!(%node, %error, "cannot read this node's Node object; retrying"),
        }
        backoff.wait().await;
    }
}

/// The registry as cluster source: a mutual-TLS channel to identity-ca
/// authenticated by the node's SVID (the credential auth-handshake keeps
/// fresh), so the node's WireGuard key is published under its identity.
fn registry_source(
    node: &str,
    address: &str,
    credentials: &std::path::Path,
    bundle: &std::path::Path,
    td: &meshguard_common::spiffe::TrustDomain,
    bundle_refresh: Duration,
) -> anyhow::Result<(Box<dyn ClusterSource>, Arc<NodeTls>, metrics::RegistryHealth)> {
    let tls = Arc::new(NodeTls::follow(credentials, bundle, td, meshguard_ca_client::svid::node_tls::DEFAULT_POLL_INTERVAL)?);
    anyhow::ensure!(
        tls.node_name() == node,
        "the node credential in {} is for node {:?}, but this agent is nodeName {node:?}",
        credentials.display(),
        tls.node_name()
    );
    let channel = registry::channel(address, tls.client_config())?;
    // Follow CA rotations: the bundle file is only the starting point.
    let refresher = tls.clone();
    let refresh_channel = channel.clone();
    let health = metrics::RegistryHealth { identity: tls.identity(), ca_synced_at: Arc::default() };
    let synced = health.ca_synced_at.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(bundle_refresh);
        loop {
            tick.tick().await;
            match refresher.refresh_bundle(refresh_channel.clone()).await {
                Ok(_) => synced.store(meshguard_common::telemetry::unix_now(), std::sync::atomic::Ordering::Relaxed),
                Err(error) => tracing::warn!(%error, "cannot refresh the trust bundle from identity-ca"),
            }
        }
    });
    tracing::info!(%address, "cluster source: identity-ca registry");
    Ok((Box::new(RegistrySource::start(channel)), tls, health))
}

/// Answers one CNI request on the agent's loop; `view`: the view applied
/// last (none yet: new pods are held closed).
fn serve_cni(enforcer: Option<&mut crate::enforce::Enforcer>, view: Option<&ClusterView>, p: cni::Pending) {
    use meshguard_cni::protocol::{Refusal, Response};
    let response = match enforcer {
        Some(e) => e.hand_off(&p.request, view.map_or(crate::enforce::SyncMode::BeforeView, crate::enforce::SyncMode::View)),
        None => Response::refused(Refusal::NoDatapath, "this agent has no datapath"),
    };
    let _ = p.reply.send(response);
}

// === impl Agent ===

impl Agent {
    fn record(&self) -> NodeRecord {
        NodeRecord {
            name: self.cfg.node_name.clone(),
            public_key: self.public_key,
            endpoint: self.cfg.endpoint,
            pod_cidrs: self.cfg.pod_cidrs.clone(),
        }
    }

    /// Publishes this node's record, retrying until the source takes it.
    async fn publish(&mut self, endpoints: &mut watch_dir::DirEvents) {
        let record = self.record();
        let source = &self.source;
        let publishing = async {
            let mut backoff = meshguard_common::retry::Backoff::default();
            loop {
                match source.publish_node(&record).await {
                    Ok(()) => return,
                    Err(error) => {
                        let wait = backoff.next_delay();
                        tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "cannot publish node record; retrying");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        };
        tokio::pin!(publishing);
        // The source may not answer for long (identity-ca down after a
        // reboot): pods appearing meanwhile are closed at once all the same.
        // Before any view was applied, pods enforced by a previous run's
        // pinned datapath are adopted as they are, never re-judged against
        // an empty view (which would cut their flows).
        loop {
            tokio::select! {
                () = &mut publishing => return,
                () = endpoints.changed() => {
                    let Some(e) = self.enforcer.as_mut() else { continue };
                    let synced = if self.enforced_a_view {
                        let view = source.subscribe().borrow().clone();
                        e.sync_endpoints(&view)
                    } else {
                        e.close_all_but_adopted()
                    };
                    if let Err(error) = synced {
                        tracing::error!(%error, "cannot sync local endpoints");
                    }
                }
                Some(request) = self.cni_requests.recv() => {
                    let view = self.enforced_a_view.then(|| source.subscribe().borrow().clone());
                    serve_cni(self.enforcer.as_mut(), view.as_deref(), request);
                }
            }
        }
    }

    async fn reconcile(&mut self, view: &Arc<ClusterView>) {
        let p = plan(&self.cfg, self.public_key, view, &self.applied);
        for (node, reason) in &p.refused {
            // Logged on every view change while it persists: it needs an operator.
            tracing::warn!(%node, reason = reason.as_str(), "refused node record");
            self.metrics.count_refusal(*reason);
        }
        if let Err(error) = self.device.apply(&p.update) {
            tracing::error!(%error, "cannot apply peers");
            return;
        }
        let added: Vec<&String> = p.peers.values().filter(|n| !self.applied.contains_key(&n.public_key)).map(|n| &n.name).collect();
        if !added.is_empty() {
            tracing::info!(peers = ?added, "peers added");
            self.device.initiate_handshakes();
        }
        self.applied = p.peers.values().map(|n| (n.public_key, n.clone())).collect();
        *self.metrics.peer_names.lock() = p.peers.values().map(|n| (n.public_key, n.name.clone())).collect();
        if let Err(error) = self.routes.sync(&p.routes).await {
            tracing::error!(%error, "cannot sync routes");
        }
    }

    /// Streams the datapath's events to the log, the metrics and the
    /// event socket (`meshctl observe`).
    fn stream_events(&self, enforcer: &mut crate::enforce::Enforcer) -> anyhow::Result<()> {
        let events = enforcer.datapath_mut().events()?.into_async()?;
        let state = enforcer.state.clone();
        self.metrics.set_datapath(state.clone());
        let hub = observe::EventHub::new(&self.cfg.node_name);
        let settings = self.cfg.datapath.as_ref().expect("a datapath was loaded");
        // The server task lives as long as the agent (the handle detaches).
        hub.serve(&settings.events_socket)
            .with_context(|| format!("cannot serve the event stream on {}", settings.events_socket.display()))?;
        tokio::spawn(async move {
            let mut events = events;
            let mut recent = BTreeMap::new();
            loop {
                match events.next().await {
                    Ok(e) => {
                        hub.publish(&state, &e);
                        crate::enforce::events::report_event(&state, &mut recent, &e);
                    }
                    Err(error) => {
                        tracing::error!(%error, "datapath event stream failed");
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    /// Brings the policy datapath in line: the view (ipcache, policy) when it
    /// changed, and the local pod endpoints always.
    fn enforce(&mut self, view: &Arc<ClusterView>, view_changed: bool) {
        let Some(e) = self.enforcer.as_mut() else { return };
        if view_changed
            && let Some(id) = view.node_ids.get(&self.cfg.node_name)
            && let Err(error) = e.datapath_mut().set_local_node(*id)
        {
            tracing::error!(%error, "cannot record this node's id in the datapath");
        }
        if view_changed && let Err(error) = e.sync_view(view) {
            tracing::error!(%error, "cannot apply the view to the datapath");
        }
        self.enforced_a_view = true;
        if let Err(error) = e.sync_endpoints(view) {
            tracing::error!(%error, "cannot sync local endpoints");
        }
    }

    /// Picks up a key replaced by `wg-agent rotate-key`: new device key,
    /// new record; peers follow through the cluster source.
    async fn check_key_rotation(&mut self, endpoints: &mut watch_dir::DirEvents) {
        let path = self.cfg.key_path();
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if mtime == self.key_mtime {
            return;
        }
        self.key_mtime = mtime;
        let (secret, public) = match node_key::load(&path) {
            Ok(k) => k,
            Err(error) => {
                tracing::error!(%error, "node key changed but cannot be read; keeping the current key");
                return;
            }
        };
        if public == self.public_key {
            return;
        }
        if let Err(error) = self.device.apply(&DeviceUpdate { private_key: Some(Some(secret)), ..Default::default() }) {
            tracing::error!(%error, "cannot apply the rotated key");
            return;
        }
        tracing::info!(old = %self.public_key, new = %public, "node key rotated");
        self.public_key = public;
        self.publish(endpoints).await;
        self.device.initiate_handshakes();
    }
}
