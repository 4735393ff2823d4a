//! Prometheus metrics, read from the live device at scrape time, served on
//! `metricsAddress` by the shared telemetry server (`/metrics`, `/healthz`,
//! `/readyz`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use meshguard_ca_client::svid::node_tls::NodeIdentity;
use meshguard_common::key::PublicKey;
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::reconcile::Refusal;
use crate::device::{Device, DropReason};
use crate::enforce::{EnforceState, PodState};

/// In registry mode, the link to identity-ca as metrics report it.
#[derive(Debug, Clone)]
pub struct RegistryHealth {
    /// The node SVID this agent presents.
    pub identity: tokio::sync::watch::Receiver<NodeIdentity>,
    /// Unix seconds of the latest successful bundle fetch; 0 before one.
    pub ca_synced_at: Arc<std::sync::atomic::AtomicI64>,
}

/// What the collector reads on every scrape.
#[derive(Debug)]
pub struct AgentMetrics {
    device: Arc<Device>,
    /// Peer public key → node name, for labels.
    pub peer_names: Mutex<BTreeMap<PublicKey, String>>,
    pub refusals: Mutex<BTreeMap<Refusal, u64>>,
    datapath: Mutex<Option<Arc<Mutex<EnforceState>>>>,
    /// Peers applied and, with a datapath, the datapath loaded and pods attached.
    ready: std::sync::atomic::AtomicBool,
    /// In registry mode: the link to identity-ca.
    pub registry_health: Mutex<Option<RegistryHealth>>,
    /// When the cluster source last delivered a view, Unix seconds; 0 before one.
    pub view_at: std::sync::atomic::AtomicI64,
    pub cni_requests: CniCounts,
    /// Objects the cluster source refused into the view.
    pub source_refusals: Mutex<Arc<meshguard_common::cluster::Refusals>>,
}

/// CNI plugin requests by (command, result), counted by the CNI socket.
pub type CniCounts = Arc<Mutex<BTreeMap<(&'static str, &'static str), u64>>>;

type Labels = Vec<(String, String)>;

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_owned(), v.to_owned())]
}

// === impl AgentMetrics ===

impl AgentMetrics {
    pub fn new(device: Arc<Device>) -> Arc<Self> {
        Arc::new(Self {
            device,
            peer_names: Mutex::default(),
            refusals: Mutex::default(),
            datapath: Mutex::default(),
            ready: std::sync::atomic::AtomicBool::new(false),
            registry_health: Mutex::default(),
            view_at: std::sync::atomic::AtomicI64::new(0),
            cni_requests: CniCounts::default(),
            source_refusals: Mutex::default(),
        })
    }

    /// Start-up is done: `/readyz` answers 200 from now on, while every
    /// local pod is enforced (or waits for the view to name it).
    pub fn set_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// `Ok` when ready; otherwise every reason it is not, one line each:
    /// still starting, or a local pod that is not enforced as it should be
    /// (held closed for a failure, or not even closed).
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        if !self.ready.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(vec!["starting: peers, routes or the policy datapath are not in place yet".into()]);
        }
        let problems = self.datapath.lock().as_ref().map(|dp| dp.lock().problems()).unwrap_or_default();
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// Exposes the policy datapath's counters and events too.
    pub fn set_datapath(&self, state: Arc<Mutex<EnforceState>>) {
        *self.datapath.lock() = Some(state);
    }

    pub fn count_refusal(&self, r: Refusal) {
        *self.refusals.lock().entry(r).or_default() += 1;
    }

    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::default();
        meshguard_common::telemetry::register_build_info(&mut r, "wg-agent");
        r.register_collector(Box::new(self.clone()));
        r
    }

    pub fn readiness_fn(self: &Arc<Self>) -> meshguard_common::telemetry::Readiness {
        let me = self.clone();
        Arc::new(move || me.readiness())
    }
}

impl Collector for AgentMetrics {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.device.stats();
        {
            let mut m = enc.encode_descriptor(
                "meshguard_wg_dropped_packets",
                "Packets the WireGuard device refused, by reason.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for reason in DropReason::ALL {
                let l = label("reason", reason.as_str());
                ConstCounter::new(stats.drops(reason)).encode(m.encode_family(&l)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "meshguard_wg_offload_batches",
                "Packets moved as one by the kernel offloads: super-packets cut from the TUN (tun_segmented), written to it (tun_coalesced), and receive slots holding several datagrams (udp_gro).",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for what in crate::device::Batching::ALL {
                let l = label("kind", what.as_str());
                ConstCounter::new(stats.batches(what)).encode(m.encode_family(&l)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "meshguard_wg_refused_node_records",
                "Node records from the cluster source refused as peers, by reason.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (reason, n) in self.refusals.lock().iter() {
                let l = label("reason", reason.as_str());
                ConstCounter::new(*n).encode(m.encode_family(&l)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "meshguard_wg_cni_requests",
                "Requests from the CNI plugin, by command (add, del, check, status, invalid) and result (enforced, held_closed, removed, ready, or the refusal's reason).",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for ((command, result), n) in self.cni_requests.lock().iter() {
                let l = vec![("command".to_owned(), (*command).to_owned()), ("result".to_owned(), (*result).to_owned())];
                ConstCounter::new(*n).encode(m.encode_family(&l)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "meshguard_wg_source_refused_objects",
                "Objects the cluster source refused into the view (malformed, or a MeshNode outside its Node's pod CIDRs), by kind.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            let refused = self.source_refusals.lock().snapshot();
            for (kind, n) in refused {
                ConstCounter::new(n).encode(m.encode_family(&label("kind", kind))?)?;
            }
        }
        let snap = self.device.snapshot();
        let names = self.peer_names.lock().clone();
        let name_of = |k: &PublicKey| names.get(k).cloned().unwrap_or_else(|| k.to_base64());
        ConstGauge::new(snap.peers.len() as i64).encode(enc.encode_descriptor(
            "meshguard_wg_peers",
            "Configured WireGuard peers.",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?)?;
        for (name, help, pick) in [
            ("meshguard_wg_peer_transmit_bytes", "Bytes sent to a peer (WireGuard datagrams).", 0),
            ("meshguard_wg_peer_receive_bytes", "Authenticated bytes received from a peer.", 1),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for p in &snap.peers {
                let l = label("peer", &name_of(&p.public_key));
                let v = if pick == 0 { p.tx_bytes } else { p.rx_bytes };
                ConstCounter::new(v).encode(m.encode_family(&l)?)?;
            }
        }
        if let Some(dp) = self.datapath.lock().clone() {
            let st = dp.lock();
            let mut m = enc.encode_descriptor(
                "meshguard_datapath_packets",
                "Packets through the policy datapath, by direction (pod's view), verdict (forward, drop, notice) and reason.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            let series = |dir: &meshguard_ebpf::policy::Direction, code: &meshguard_ebpf::abi::Code| {
                vec![
                    ("direction".to_owned(), format!("{dir:?}").to_lowercase()),
                    ("verdict".to_owned(), code.verdict().to_owned()),
                    ("reason".to_owned(), code.reason()),
                ]
            };
            for ((dir, code), c) in &st.counters {
                ConstCounter::new(c.packets).encode(m.encode_family(&series(dir, code))?)?;
            }
            let mut m = enc.encode_descriptor(
                "meshguard_datapath",
                "Bytes through the policy datapath, by direction (pod's view), verdict and reason.",
                Some(&prometheus_client::registry::Unit::Bytes),
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for ((dir, code), c) in &st.counters {
                ConstCounter::new(c.bytes).encode(m.encode_family(&series(dir, code))?)?;
            }
            let mut m = enc.encode_descriptor(
                "meshguard_datapath_events",
                "Events read from the datapath's ring buffer, by kind.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (kind, n) in &st.events {
                ConstCounter::new(*n).encode(m.encode_family(&label("kind", kind))?)?;
            }
            let mut by_state: BTreeMap<&str, i64> = [("enforced", 0), ("closed", 0), ("failed", 0)].into();
            for p in st.pods.values() {
                let k = match p.state {
                    PodState::Enforced { .. } => "enforced",
                    PodState::Closed { .. } => "closed",
                    PodState::Failed { .. } => "failed",
                };
                *by_state.entry(k).or_default() += 1;
            }
            let mut m = enc.encode_descriptor(
                "meshguard_datapath_pods",
                "Local pod interfaces by state: enforced, closed (programs on, every packet dropped) or failed (set down, or unenforced).",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (state, n) in by_state {
                ConstGauge::new(n).encode(m.encode_family(&label("state", state))?)?;
            }
            let mut m = enc.encode_descriptor(
                "meshguard_datapath_pod_refusals",
                "Times a local pod interface was held closed or could not be enforced, by reason.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (reason, n) in &st.refusals {
                ConstCounter::new(*n).encode(m.encode_family(&label("reason", reason))?)?;
            }
        }
        if let Some(h) = self.registry_health.lock().as_ref() {
            ConstGauge::new(h.identity.borrow().expires_at).encode(enc.encode_descriptor(
                "meshguard_wg_node_svid_expiry_timestamp_seconds",
                "Unix time the node SVID this agent presents to identity-ca expires (registry mode).",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?)?;
            let at = h.ca_synced_at.load(std::sync::atomic::Ordering::Relaxed);
            if at > 0 {
                ConstGauge::new(at).encode(enc.encode_descriptor(
                    "meshguard_wg_ca_last_sync_timestamp_seconds",
                    "Unix time of the latest successful trust bundle fetch from identity-ca (registry mode), every bundleRefresh.",
                    None,
                    prometheus_client::metrics::MetricType::Gauge,
                )?)?;
            }
        }
        let view_at = self.view_at.load(std::sync::atomic::Ordering::Relaxed);
        if view_at > 0 {
            ConstGauge::new(view_at).encode(enc.encode_descriptor(
                "meshguard_wg_cluster_view_timestamp_seconds",
                "Unix time the cluster source last delivered a view.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?)?;
        }
        let mut m = enc.encode_descriptor(
            "meshguard_wg_peer_last_handshake_timestamp_seconds",
            "Unix time of the latest handshake with a peer (0: never).",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for p in &snap.peers {
            let t = p.last_handshake.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
            let l = label("peer", &name_of(&p.public_key));
            ConstGauge::new(t as i64).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }
}
