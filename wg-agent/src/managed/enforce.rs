//! Keeps the eBPF policy datapath in step with the cluster view: the
//! ipcache (every workload address → identity and node), the compiled
//! policy, and one attachment per local pod interface.
//!
//! The datapath is pinned: it keeps enforcing while the agent is down, and a
//! restarted agent adopts it — conntrack included — instead of reloading.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use meshguard_common::cluster::{ClusterView, LocalEndpoint};
use meshguard_common::spiffe::SpiffeId;
use meshguard_ebpf::abi::Code;
use meshguard_ebpf::events::{Event, EventKind};
use meshguard_ebpf::policy::Direction;
use meshguard_ebpf::{Counters, Datapath, DatapathApi, DatapathConfig, DatapathError, Interface, IpcacheEntry, PinLayout, PodEndpoint};
use parking_lot::Mutex;

use super::policy::{Compiled, INIT_IDENTITY, compile};

/// Identity of node addresses in the ipcache: the datapath's "host".
const HOST_IDENTITY: u32 = meshguard_ebpf::abi::MG_IDENTITY_HOST;

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("cannot read local endpoints in {dir}: {source}")]
    Endpoints {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the agent's metrics and logs read from the enforcer.
#[derive(Debug, Default)]
pub struct EnforceState {
    /// Numeric identity → SPIFFE ID, for events and logs.
    pub names: BTreeMap<u32, SpiffeId>,
    pub compiled: Compiled,
    pub counters: Counters,
    pub events: BTreeMap<String, u64>,
}

pub struct Enforcer {
    dp: Datapath,
    node: String,
    endpoints_dir: PathBuf,
    /// Attached pods by interface name.
    attached: BTreeMap<String, (u32, PodEndpoint)>,
    ipcache: BTreeMap<IpNet, IpcacheEntry>,
    policy_applied: bool,
    pub state: Arc<Mutex<EnforceState>>,
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

// === impl Enforcer ===

impl Enforcer {
    /// Loads the datapath under `pin`, or adopts the pinned one.
    pub fn start(pin: PinLayout, node_id: u32, node: &str, endpoints_dir: &Path) -> Result<Self, EnforceError> {
        meshguard_ebpf::pin::ensure_bpffs().map_err(DatapathError::from)?;
        let dp = Datapath::load_or_adopt(&DatapathConfig::new(pin, node_id))?;
        std::fs::create_dir_all(endpoints_dir)
            .map_err(|source| EnforceError::Endpoints { dir: endpoints_dir.display().to_string(), source })?;
        Ok(Self {
            dp,
            node: node.to_owned(),
            endpoints_dir: endpoints_dir.to_owned(),
            attached: BTreeMap::new(),
            ipcache: BTreeMap::new(),
            policy_applied: false,
            state: Arc::new(Mutex::new(EnforceState::default())),
        })
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    /// Brings ipcache and policy in line with `view`.
    pub fn sync_view(&mut self, view: &ClusterView) -> Result<(), EnforceError> {
        // ipcache: every workload address, and every node's underlay address.
        let td = view.trust_domain_or_default();
        let mut want: BTreeMap<IpNet, IpcacheEntry> = BTreeMap::new();
        for w in view.workloads.values() {
            let Some(identity) = w.spiffe_id(&td).ok().and_then(|id| view.identities.get(&id).copied()) else { continue };
            let node_id = view.node_ids.get(&w.node).copied().unwrap_or(0);
            for ip in &w.ips {
                want.insert(host_prefix(*ip), IpcacheEntry { identity, node_id });
            }
        }
        for n in view.nodes.values() {
            let node_id = view.node_ids.get(&n.name).copied().unwrap_or(0);
            want.entry(host_prefix(n.endpoint.ip())).or_insert(IpcacheEntry { identity: HOST_IDENTITY, node_id });
        }
        let stale: Vec<IpNet> = self.ipcache.keys().filter(|k| !want.contains_key(k)).copied().collect();
        let changed: Vec<(IpNet, IpcacheEntry)> =
            want.iter().filter(|(k, v)| self.ipcache.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect();
        if !changed.is_empty() {
            self.dp.set_ipcache(&changed)?;
        }
        if !stale.is_empty() {
            self.dp.remove_ipcache(&stale)?;
        }
        self.ipcache = want;

        let compiled = compile(view);
        let policy_changed = !self.policy_applied || self.state.lock().compiled.set != compiled.set;
        if policy_changed {
            let revision = self.dp.replace_policy(&compiled.set)?;
            tracing::info!(
                revision,
                entries = compiled.set.entries.len(),
                isolated = compiled.set.default_deny.len(),
                "policy applied"
            );
            for w in &compiled.warnings {
                tracing::warn!(warning = %w, "policy");
            }
            self.policy_applied = true;
        }
        let mut st = self.state.lock();
        st.names = view.identities.iter().map(|(id, n)| (*n, id.clone())).collect();
        st.compiled = compiled;
        Ok(())
    }

    /// Attaches new local pods, re-keys changed ones, detaches removed ones.
    pub fn sync_endpoints(&mut self, view: &ClusterView) -> Result<(), EnforceError> {
        let local = read_endpoints(&self.endpoints_dir)?;
        let td = view.trust_domain_or_default();
        let mut seen = BTreeSet::new();
        for ep in local {
            seen.insert(ep.interface.clone());
            let Some(mac) = ep.mac_bytes() else {
                tracing::warn!(pod = %ep.key(), mac = %ep.mac, "endpoint has an invalid MAC; not attached");
                continue;
            };
            let workload = view.workloads.get(&ep.key()).filter(|w| w.node == self.node);
            let identity = workload
                .and_then(|w| w.spiffe_id(&td).ok())
                .and_then(|id| view.identities.get(&id).copied())
                .unwrap_or(INIT_IDENTITY);
            let pod = PodEndpoint {
                identity,
                mac,
                ipv4: ep.ips.iter().find_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                }),
                ipv6: ep.ips.iter().find_map(|ip| match ip {
                    IpAddr::V6(v6) => Some(*v6),
                    IpAddr::V4(_) => None,
                }),
            };
            if self.attached.get(&ep.interface).is_some_and(|(_, p)| *p == pod) {
                continue;
            }
            match self.dp.attach(&Interface::Name(ep.interface.clone()), &pod) {
                Ok(()) => {
                    let ifindex = crate::io::tun::if_index(&ep.interface).unwrap_or(0);
                    tracing::info!(pod = %ep.key(), interface = %ep.interface, identity, "pod attached");
                    self.attached.insert(ep.interface.clone(), (ifindex, pod));
                }
                Err(error) => tracing::error!(pod = %ep.key(), interface = %ep.interface, %error, "cannot attach pod"),
            }
        }
        let gone: Vec<String> = self.attached.keys().filter(|i| !seen.contains(*i)).cloned().collect();
        for ifname in gone {
            if let Some((ifindex, _)) = self.attached.remove(&ifname) {
                if let Err(error) = self.dp.detach(&Interface::Index(ifindex)) {
                    tracing::warn!(interface = %ifname, %error, "detach failed (interface already gone?)");
                }
                tracing::info!(interface = %ifname, "pod detached");
            }
        }
        Ok(())
    }

    /// Conntrack and fragment garbage collection.
    pub fn housekeeping(&mut self) {
        match self.dp.gc() {
            Ok(s) if s.conntrack_removed > 0 => {
                tracing::debug!(removed = s.conntrack_removed, scanned = s.conntrack_scanned, "conntrack gc")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "conntrack gc failed"),
        }
    }

    pub fn refresh_counters(&mut self) {
        if let Ok(c) = self.dp.counters() {
            self.state.lock().counters = c;
        }
    }
}

/// Reads `<dir>/*.yaml`; a malformed file is reported and skipped.
pub fn read_endpoints(dir: &Path) -> Result<Vec<LocalEndpoint>, EnforceError> {
    let entries =
        std::fs::read_dir(dir).map_err(|source| EnforceError::Endpoints { dir: dir.display().to_string(), source })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        match serde_yaml::from_str::<LocalEndpoint>(&text) {
            Ok(ep) => out.push(ep),
            Err(error) => tracing::warn!(path = %path.display(), %error, "invalid endpoint file; skipped"),
        }
    }
    out.sort_by(|a, b| a.interface.cmp(&b.interface));
    Ok(out)
}

/// Logs and counts one datapath event. Drops are logged once per flow key
/// per `LOG_EVERY`, so a flood of denied packets is one line, not thousands.
pub fn report_event(state: &Mutex<EnforceState>, recent: &mut BTreeMap<String, std::time::Instant>, e: &Event) {
    const LOG_EVERY: Duration = Duration::from_secs(5);
    let mut st = state.lock();
    let name = |n: u32| st.names.get(&n).map_or_else(|| format!("identity:{n}"), ToString::to_string);
    let (subject, peer) = (name(e.subject), name(e.peer));
    let (src_id, dst_id) = match e.direction {
        Direction::Ingress => (peer.clone(), subject.clone()),
        Direction::Egress => (subject.clone(), peer.clone()),
    };
    let kind = match e.kind {
        EventKind::Drop(r) => Code::Drop(r).to_string(),
        EventKind::AuthRequired => "auth_required".to_owned(),
        // New flows are counted and streamed (observe), not logged: there are many.
        EventKind::Flow(_) => {
            *st.events.entry("flow".to_owned()).or_default() += 1;
            return;
        }
        EventKind::Unknown { r#type, reason } => format!("unknown:{type}:{reason}", type = r#type),
    };
    let rule = st.compiled.rule(e.cookie).map(|r| format!("{} {:?}[{}]", r.policy, r.direction, r.index));
    *st.events.entry(kind.clone()).or_default() += 1;
    drop(st);
    let flow = format!(
        "{}:{} -> {}:{} proto {}",
        e.src.map_or_else(|| "?".into(), |a| a.to_string()),
        e.sport,
        e.dst.map_or_else(|| "?".into(), |a| a.to_string()),
        e.dport,
        e.protocol
    );
    let key = format!("{kind} {src_id} {dst_id} {flow}");
    let now = std::time::Instant::now();
    if recent.get(&key).is_some_and(|t| now.duration_since(*t) < LOG_EVERY) {
        return;
    }
    recent.insert(key, now);
    if recent.len() > 4096 {
        recent.retain(|_, t| now.duration_since(*t) < LOG_EVERY);
    }
    tracing::info!(
        event = %kind,
        src_identity = %src_id,
        dst_identity = %dst_id,
        direction = ?e.direction,
        %flow,
        rule = %rule.as_deref().unwrap_or("default"),
        "datapath event"
    );
}
