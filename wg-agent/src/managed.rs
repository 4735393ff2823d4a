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
use meshguard_common::cluster::file::FileSource;
use meshguard_common::cluster::{ClusterSource, ClusterView, NodeRecord};
use meshguard_common::key::PublicKey;

use crate::device::{Device, DeviceUpdate};
use crate::io::tun::LinuxTun;
use crate::io::udp::HostNetwork;
use crate::uapi::server::{Access, UapiServer};

pub mod config;
pub mod metrics;
pub mod node_key;
pub mod reconcile;
pub mod routes;
pub mod signals;

use config::{AgentConfig, SourceConfig};
use metrics::AgentMetrics;
use reconcile::plan;
use routes::Routes;

/// How often the key file is checked for a rotation.
const KEY_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Back-off between attempts to publish the node record.
const PUBLISH_RETRY: Duration = Duration::from_secs(1);

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
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let key_path = cfg.key_path();
    let (secret, public_key) = node_key::load_or_create(&key_path)?;

    let tun = LinuxTun::open(&cfg.interface, true)?;
    tun.set_mtu(cfg.mtu)?;
    // No IPv6 link-local address on the tunnel: it would only emit router
    // solicitations that no peer can take (and that would count as drops).
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/addr_gen_mode", cfg.interface), "1");
    tun.set_up()?;
    let ifindex = tun.ifindex().context("cannot read the tunnel's interface index")?;
    let device = Arc::new(Device::start(Arc::new(tun), Arc::new(HostNetwork), cfg.listen_port)?);
    device.apply(&DeviceUpdate { private_key: Some(Some(secret)), ..Default::default() })?;
    let _uapi = UapiServer::start(&cfg.uapi_socket_dir, &cfg.interface, device.clone(), Access::ReadOnly)?;

    if cfg.strict {
        routes::enable_strict_rp_filter().context("strict mode: cannot enable reverse-path filtering")?;
    }
    let source: Box<dyn ClusterSource> = match &cfg.source {
        SourceConfig::Dir { path, poll } => Box::new(FileSource::start(path, *poll)?),
    };
    let metrics = AgentMetrics::new(device.clone());
    let _metrics_task = cfg.metrics_address.map(|addr| {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(error) = metrics::serve(addr, m).await {
                tracing::error!(%addr, %error, "metrics server stopped");
            }
        })
    });
    let mut agent = Agent {
        routes: Routes::new(ifindex)?,
        key_mtime: std::fs::metadata(&key_path).and_then(|m| m.modified()).ok(),
        cfg,
        device,
        source,
        metrics,
        public_key,
        applied: BTreeMap::new(),
    };
    tracing::info!(
        node = %agent.cfg.node_name,
        interface = %agent.cfg.interface,
        public_key = %agent.public_key,
        endpoint = %agent.cfg.endpoint,
        strict = agent.cfg.strict,
        "node agent starting"
    );
    agent.publish().await;
    let mut views = agent.source.subscribe();
    let first = views.borrow_and_update().clone();
    agent.reconcile(&first).await;
    // Sessions before the first packet needs one: no first-packet stall.
    agent.device.initiate_handshakes();

    let mut key_tick = tokio::time::interval(KEY_CHECK_INTERVAL);
    let stop = signals::terminated();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            changed = views.changed() => {
                if changed.is_err() {
                    anyhow::bail!("cluster source stopped");
                }
                let view = views.borrow_and_update().clone();
                agent.reconcile(&view).await;
            }
            _ = key_tick.tick() => agent.check_key_rotation().await,
            _ = &mut stop => break,
        }
    }
    tracing::info!("node agent stopping; the tunnel interface and routes stay, so traffic stays dropped, not leaked");
    Ok(())
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
    async fn publish(&self) {
        let record = self.record();
        loop {
            match self.source.publish_node(&record).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, "cannot publish node record; retrying");
                    tokio::time::sleep(PUBLISH_RETRY).await;
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
        let added: Vec<&String> =
            p.peers.values().filter(|n| !self.applied.contains_key(&n.public_key)).map(|n| &n.name).collect();
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

    /// Picks up a key replaced by `wg-agent rotate-key`: new device key,
    /// new record; peers follow through the cluster source.
    async fn check_key_rotation(&mut self) {
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
        self.publish().await;
        self.device.initiate_handshakes();
    }
}
