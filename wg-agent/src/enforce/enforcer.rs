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

use ipnet::IpNet;
use meshguard_common::cluster::ClusterView;
use meshguard_common::spiffe::SpiffeId;
use meshguard_ebpf::{Counters, Datapath, DatapathApi, DatapathConfig, DatapathError, Interface, IpcacheEntry, PinLayout, PodEndpoint};
use parking_lot::Mutex;

use super::compile::{Compiled, INIT_IDENTITY, compile};
use super::endpoints::read_endpoints;

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

pub struct Enforcer<D = Datapath> {
    dp: D,
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

impl Enforcer<Datapath> {
    /// Loads the datapath under `pin`, or adopts the pinned one.
    pub fn start(pin: PinLayout, node_id: u32, node: &str, endpoints_dir: &Path) -> Result<Self, EnforceError> {
        meshguard_ebpf::pin::ensure_bpffs().map_err(DatapathError::from)?;
        let dp = Datapath::load_or_adopt(&DatapathConfig::new(pin, node_id))?;
        Self::new(dp, node, endpoints_dir)
    }
}

impl<D: DatapathApi> Enforcer<D> {
    /// Enforces through `dp` for the pods described in `endpoints_dir`.
    pub fn new(dp: D, node: &str, endpoints_dir: &Path) -> Result<Self, EnforceError> {
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

    pub fn datapath(&self) -> &D {
        &self.dp
    }

    pub fn datapath_mut(&mut self) -> &mut D {
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
                Ok(ifindex) => {
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


#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use meshguard_common::cluster::{LocalEndpoint, Workload};
    use meshguard_ebpf::testing::{Enforcement, FakeDatapath};

    use super::*;

    const NODE: &str = "node-1";
    const WEB: u32 = 300;
    const API: u32 = 301;

    /// A node's pods and view, and an enforcer over the fake datapath.
    struct Node {
        dir: tempfile::TempDir,
        view: ClusterView,
        enforcer: Enforcer<FakeDatapath>,
        next_ifindex: u32,
    }

    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut view = ClusterView::default();
        view.node_ids.insert(NODE.into(), 1);
        for (sa, n) in [("web", WEB), ("api", API)] {
            view.identities.insert(SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap(), n);
        }
        let enforcer = Enforcer::new(FakeDatapath::default(), NODE, dir.path()).unwrap();
        Node { dir, view, enforcer, next_ifindex: 10 }
    }

    fn endpoint(name: &str, ip: u8) -> LocalEndpoint {
        LocalEndpoint {
            namespace: "shop".into(),
            name: name.into(),
            interface: format!("veth-{name}"),
            mac: format!("02:00:00:00:00:{ip:02x}"),
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 244, 1, ip))],
        }
    }

    impl Node {
        /// A pod appears: its veth exists and the CNI plugin wrote its file.
        fn pod_appears(&mut self, ep: &LocalEndpoint) {
            self.next_ifindex += 1;
            self.enforcer.dp.add_interface(&ep.interface, self.next_ifindex);
            self.write(ep);
        }

        fn write(&self, ep: &LocalEndpoint) {
            std::fs::write(self.dir.path().join(ep.file_name()), serde_yaml::to_string(ep).unwrap()).unwrap();
        }

        /// The view learns of the pod as a workload of `sa` on this node.
        fn in_view(&mut self, ep: &LocalEndpoint, sa: &str) {
            let w = Workload {
                name: ep.name.clone(),
                namespace: ep.namespace.clone(),
                service_account: sa.into(),
                node: NODE.into(),
                ips: ep.ips.clone(),
                labels: Default::default(),
            };
            self.view.workloads.insert(w.key(), w);
        }

        fn sync(&mut self) {
            self.enforcer.sync_view(&self.view).unwrap();
            self.enforcer.sync_endpoints(&self.view).unwrap();
        }

        fn enforcement(&self, ep: &LocalEndpoint) -> Enforcement {
            self.enforcer.dp.enforcement(&ep.interface)
        }
    }

    fn enforced_as(identity: u32, ep: &LocalEndpoint) -> Enforcement {
        let IpAddr::V4(v4) = ep.ips[0] else { unreachable!() };
        Enforcement::Enforced(PodEndpoint { identity, mac: ep.mac_bytes().unwrap(), ipv4: Some(v4), ipv6: None })
    }

    #[test]
    fn a_known_pod_is_enforced_with_its_identity_and_its_address_is_in_the_ipcache() {
        let mut n = node();
        let web = endpoint("web", 2);
        n.pod_appears(&web);
        n.in_view(&web, "web");
        n.sync();
        assert_eq!(n.enforcement(&web), enforced_as(WEB, &web));
        let entry = n.enforcer.dp.ipcache.get(&IpNet::from(web.ips[0])).copied();
        assert_eq!(entry, Some(IpcacheEntry { identity: WEB, node_id: 1 }));
    }

    #[test]
    fn a_pod_whose_service_account_changes_is_re_keyed() {
        let mut n = node();
        let web = endpoint("web", 2);
        n.pod_appears(&web);
        n.in_view(&web, "web");
        n.sync();
        n.in_view(&web, "api");
        n.sync();
        assert_eq!(n.enforcement(&web), enforced_as(API, &web));
    }

    #[test]
    fn a_pod_whose_endpoint_file_goes_is_detached() {
        let mut n = node();
        let web = endpoint("web", 2);
        n.pod_appears(&web);
        n.in_view(&web, "web");
        n.sync();
        std::fs::remove_file(n.dir.path().join(web.file_name())).unwrap();
        n.enforcer.dp.remove_interface(&web.interface);
        n.sync();
        assert!(n.enforcer.dp.endpoints.is_empty(), "the endpoint entry went with the pod");
    }
}
