//! Keeps the eBPF policy datapath in step with the cluster view: the
//! ipcache (every workload address → identity and node), the compiled
//! policy, and one attachment per local pod interface — enforced, or held
//! closed ([`super::pods`]); never left open.
//!
//! The datapath is pinned: it keeps enforcing while the agent is down, and a
//! restarted agent adopts it — conntrack included — instead of reloading.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use meshguard_common::cluster::ClusterView;
use meshguard_common::spiffe::SpiffeId;
use meshguard_ebpf::{Counters, Datapath, DatapathApi, DatapathConfig, DatapathError, Interface, IpcacheEntry, PinLayout};
use parking_lot::Mutex;

use super::compile::{Compiled, compile};
use super::endpoints::read_endpoints;
use super::pods::{self, HoldReason, Want};

pub mod handoff;

pub use handoff::SyncMode;

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

/// How one local pod interface is enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Anti-spoofing and policy for this identity.
    Enforced { identity: u32 },
    /// Programs on, no endpoint entry: every packet dropped.
    Closed { reason: HoldReason, detail: String },
    /// Its programs could not be attached: the interface was set down (or,
    /// if even that failed, it is unenforced — `detail` says which).
    Failed { detail: String },
}

/// One local pod interface, as the enforcer left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStatus {
    /// `<namespace>/<name>` (or the endpoint file's name when unreadable).
    pub pod: String,
    pub state: PodState,
}

/// What the agent's metrics, logs and `/readyz` read from the enforcer.
#[derive(Debug, Default)]
pub struct EnforceState {
    /// Numeric identity → SPIFFE ID, for events and logs.
    pub names: BTreeMap<u32, SpiffeId>,
    pub compiled: Compiled,
    pub counters: Counters,
    pub events: BTreeMap<String, u64>,
    /// Every local pod interface, by name.
    pub pods: BTreeMap<String, PodStatus>,
    /// Endpoint files that cannot be read, naming no known interface.
    pub unreadable: BTreeMap<String, String>,
    /// Times a pod interface was held closed or failed, by reason
    /// (`HoldReason::as_str`, or `attach_failed_down` for `Failed`).
    pub refusals: BTreeMap<&'static str, u64>,
    /// Why the tunnel is not guarded, if it is not (see `Enforcer::guard_tunnel`).
    pub tunnel_unguarded: Option<String>,
}

impl EnforceState {
    /// Why the node is not ready to run pods, one line each; empty: ready.
    /// A pod held closed only because the view does not name it yet is
    /// normal, not a problem.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (iface, p) in &self.pods {
            match &p.state {
                PodState::Enforced { .. } => {}
                PodState::Closed { reason, .. } if !reason.is_failure() => {}
                PodState::Closed { reason, detail } => {
                    out.push(format!("pod {} on {iface} held closed ({}): {detail}", p.pod, reason.as_str()))
                }
                PodState::Failed { detail } => out.push(format!("pod {} on {iface} not enforced: {detail}", p.pod)),
            }
        }
        for (file, error) in &self.unreadable {
            out.push(format!("endpoint file {file}: {error}"));
        }
        if let Some(why) = &self.tunnel_unguarded {
            out.push(format!("tunnel not guarded against pod-source spoofing: {why}"));
        }
        out
    }
}

struct Attached {
    ifindex: Option<u32>,
    want: Want,
    state: PodState,
}

pub struct Enforcer<D = Datapath> {
    dp: D,
    node: String,
    endpoints_dir: PathBuf,
    /// Local pod interfaces by name.
    pods: BTreeMap<String, Attached>,
    /// Endpoint file → the interface it named when last readable.
    known_files: BTreeMap<String, String>,
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
    pub fn start(
        pin: PinLayout,
        node_id: u32,
        node: &str,
        endpoints_dir: &Path,
        attach: meshguard_ebpf::AttachMode,
    ) -> Result<Self, EnforceError> {
        meshguard_ebpf::pin::ensure_bpffs().map_err(DatapathError::from)?;
        let mut cfg = DatapathConfig::new(pin, node_id);
        cfg.attach = attach;
        let dp = Datapath::load_or_adopt(&cfg)?;
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
            pods: BTreeMap::new(),
            known_files: BTreeMap::new(),
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
            tracing::info!(revision, entries = compiled.set.entries.len(), isolated = compiled.set.default_deny.len(), "policy applied");
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

    /// Enforces every local pod interface as the endpoint files and `view`
    /// say, holds closed every one it cannot enforce, and detaches the
    /// interfaces whose endpoint file is gone (the pod was deleted).
    pub fn sync_endpoints(&mut self, view: &ClusterView) -> Result<(), EnforceError> {
        let files = read_endpoints(&self.endpoints_dir)?;
        let plan = pods::plan(&files, view, &self.node, &self.known_files);
        for (file, error) in &plan.unreadable {
            if !self.state.lock().unreadable.contains_key(file) {
                tracing::error!(%file, %error, "endpoint file cannot be read; its pod is not enforced until it can");
                *self.state.lock().refusals.entry(HoldReason::UnreadableEndpoint.as_str()).or_default() += 1;
            }
        }
        for (iface, want) in &plan.interfaces {
            let settled = self.pods.get(iface).is_some_and(|p| {
                p.want == *want && !matches!(p.state, PodState::Failed { .. } | PodState::Closed { reason: HoldReason::AttachFailed, .. })
            });
            if settled {
                continue;
            }
            let before = self.pods.get(iface).map(|p| p.state.clone());
            let (ifindex, state) = self.apply(iface, want);
            let ifindex = ifindex.or_else(|| self.pods.get(iface).and_then(|p| p.ifindex));
            if before.as_ref() != Some(&state) {
                self.report(iface, &want.pod, &state);
            }
            self.pods.insert(iface.clone(), Attached { ifindex, want: want.clone(), state });
        }
        let gone: Vec<String> = self.pods.keys().filter(|i| !plan.interfaces.contains_key(*i)).cloned().collect();
        for iface in gone {
            let Some(p) = self.pods.remove(&iface) else { continue };
            if let Some(ifindex) = p.ifindex
                && let Err(error) = self.dp.detach(&Interface::Index(ifindex))
            {
                tracing::warn!(interface = %iface, %error, "detach failed (interface already gone?)");
            }
            tracing::info!(pod = %p.want.pod, interface = %iface, "pod detached");
        }
        self.known_files = plan.known_files;
        self.state.lock().unreadable = plan.unreadable;
        self.publish_pods();
        Ok(())
    }

    /// Before the cluster source has answered (start-up; after a reboot
    /// identity-ca may be down for long): an interface the datapath already
    /// enforces (pinned from a previous run) is adopted as it is, so its
    /// flows carry on; every other local pod interface is held closed until
    /// the view names its pod. Nothing is ever open while the view is awaited.
    pub fn close_all_but_adopted(&mut self) -> Result<(), EnforceError> {
        let files = read_endpoints(&self.endpoints_dir)?;
        for f in files {
            let Ok(ep) = f.endpoint else { continue };
            let name = Interface::Name(ep.interface.clone());
            let pod = ep.key();
            self.known_files.insert(f.file.clone(), ep.interface.clone());
            let adopted = match self.dp.enforced(&name) {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%pod, interface = %ep.interface, %error, "cannot read the interface's enforcement");
                    None
                }
            };
            let (ifindex, want, state) = match adopted {
                Some((ifindex, entry)) => {
                    let identity = entry.identity;
                    (Some(ifindex), Want { pod: pod.clone(), target: Ok(entry) }, PodState::Enforced { identity })
                }
                None => {
                    let detail = "the cluster view has not arrived yet".to_owned();
                    let want = Want { pod: pod.clone(), target: Err((HoldReason::UnknownWorkload, detail.clone())) };
                    let (ifindex, state) = self.apply(&ep.interface, &want);
                    (ifindex, want, state)
                }
            };
            self.report(&ep.interface, &pod, &state);
            self.pods.insert(ep.interface.clone(), Attached { ifindex, want, state });
        }
        self.publish_pods();
        Ok(())
    }

    /// Makes the pods' states what metrics, `/readyz` and logs read.
    fn publish_pods(&self) {
        self.state.lock().pods =
            self.pods.iter().map(|(i, p)| (i.clone(), PodStatus { pod: p.want.pod.clone(), state: p.state.clone() })).collect();
    }

    /// Where a pod source may come from (`bpf/lib/origin.h`): `ranges` (the
    /// cluster's pod CIDRs) are pod sources; only packets out of `tunnel`
    /// or a local pod's own interface may reach a pod with one, and only a
    /// pod's own interface may send one into `tunnel`. Whatever the
    /// interfaces' rp_filter settings say, and for IPv6 too. When the
    /// tunnel cannot be guarded it is set down (nothing crosses unjudged)
    /// and the node is not ready.
    pub fn guard_tunnel(&mut self, tunnel: &str, ranges: &[IpNet]) -> Result<(), EnforceError> {
        let guarded = self.dp.guard_tunnel(&Interface::Name(tunnel.to_owned()));
        // The ranges go in either way: without a guarded tunnel, pods then
        // take no pod-source packet from off the node at all.
        self.dp.set_pod_ranges(ranges)?;
        match guarded {
            Ok(ifindex) => {
                self.state.lock().tunnel_unguarded = None;
                tracing::info!(%tunnel, ifindex, ranges = ?ranges, "pod sources accepted only from the tunnel and the pods' own interfaces");
                Ok(())
            }
            Err(error) => {
                let down = match meshguard_ebpf::sys::set_link_down(tunnel) {
                    Ok(()) => "set down instead".to_owned(),
                    Err(e) => format!("and setting it down failed too: {e}"),
                };
                let why = format!("{error}; {down}");
                tracing::error!(%tunnel, %why, "cannot guard the tunnel");
                let mut st = self.state.lock();
                *st.refusals.entry("tunnel_unguarded").or_default() += 1;
                st.tunnel_unguarded = Some(why);
                Err(error.into())
            }
        }
    }

    /// Enforces or closes one interface; returns its index when known.
    fn apply(&mut self, iface: &str, want: &Want) -> (Option<u32>, PodState) {
        let name = Interface::Name(iface.to_owned());
        let (reason, detail) = match &want.target {
            Ok(pod) => match self.dp.attach(&name, pod) {
                Ok(ifindex) => return (Some(ifindex), PodState::Enforced { identity: pod.identity }),
                Err(error) => (HoldReason::AttachFailed, error.to_string()),
            },
            Err((reason, detail)) => (*reason, detail.clone()),
        };
        match self.dp.hold_closed(&name) {
            Ok(ifindex) => (Some(ifindex), PodState::Closed { reason, detail }),
            Err(error) => (None, PodState::Failed { detail: format!("{detail}; cannot hold it closed: {error}") }),
        }
    }

    /// Logs and counts a pod's new state.
    fn report(&self, iface: &str, pod: &str, state: &PodState) {
        match state {
            PodState::Enforced { identity } => tracing::info!(%pod, interface = %iface, identity, "pod enforced"),
            PodState::Closed { reason, detail } => {
                *self.state.lock().refusals.entry(reason.as_str()).or_default() += 1;
                if reason.is_failure() {
                    tracing::error!(%pod, interface = %iface, reason = reason.as_str(), %detail, "pod held closed: it drops every packet");
                } else {
                    tracing::info!(%pod, interface = %iface, reason = reason.as_str(), %detail, "pod held closed until the view names it");
                }
            }
            PodState::Failed { detail } => {
                *self.state.lock().refusals.entry("attach_failed_down").or_default() += 1;
                tracing::error!(%pod, interface = %iface, %detail, "pod cannot be enforced");
            }
        }
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
    use meshguard_ebpf::PodEndpoint;
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
            std::fs::write(self.dir.path().join(ep.file_name()), meshguard_common::yaml::to_string(ep).unwrap()).unwrap();
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

        fn problems(&self) -> Vec<String> {
            self.enforcer.state.lock().problems()
        }

        fn refusals(&self, reason: &str) -> u64 {
            self.enforcer.state.lock().refusals.get(reason).copied().unwrap_or(0)
        }
    }

    #[test]
    fn an_unguarded_tunnel_keeps_the_node_not_ready_and_its_pods_closed_to_pod_sources() {
        let mut n = node();
        let ranges: Vec<IpNet> = vec!["10.244.0.0/16".parse().unwrap()];
        // The tunnel device cannot take the program.
        n.enforcer.dp.add_interface("mg-test-tun", 5);
        n.enforcer.dp.failing_links.insert("mg-test-tun".into());
        assert!(n.enforcer.guard_tunnel("mg-test-tun", &ranges).is_err());
        assert_eq!(n.enforcer.dp.tunnel, None);
        // The ranges are in all the same: no pod-source packet from off the node reaches a pod.
        assert_eq!(n.enforcer.dp.pod_ranges, ranges);
        assert!(n.problems().iter().any(|p| p.contains("tunnel not guarded")), "{:?}", n.problems());
        assert_eq!(n.refusals("tunnel_unguarded"), 1);
        // Guarded on a later try: ready again.
        n.enforcer.dp.failing_links.clear();
        n.enforcer.guard_tunnel("mg-test-tun", &ranges).unwrap();
        assert_eq!(n.enforcer.dp.tunnel, Some(5));
        assert!(n.problems().is_empty(), "{:?}", n.problems());
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

    // --- issue 14, findings 1 and 2: every way a pod can fail to be
    // enforced must leave its interface dropping, never open. ---

    #[test]
    fn an_unknown_pod_is_held_closed_until_the_view_names_it() {
        let mut n = node();
        let web = endpoint("web", 2);
        n.pod_appears(&web);
        n.sync();
        assert_eq!(n.enforcement(&web), Enforcement::Closed, "a pod the view does not know yet must not pass traffic");
        assert!(n.problems().is_empty(), "waiting for the view is normal: {:?}", n.problems());
        assert_eq!(n.refusals("unknown_workload"), 1);
        n.in_view(&web, "web");
        n.sync();
        assert_eq!(n.enforcement(&web), enforced_as(WEB, &web));
    }

    #[test]
    fn a_pod_removed_from_the_view_is_held_closed() {
        let mut n = node();
        let web = endpoint("web", 2);
        n.pod_appears(&web);
        n.in_view(&web, "web");
        n.sync();
        n.view.workloads.remove("shop/web");
        n.sync();
        assert_eq!(n.enforcement(&web), Enforcement::Closed, "no longer in the view: the old identity must not stay");
    }

    #[test]
    fn an_interface_past_the_endpoint_map_is_held_closed() {
        let mut n = node();
        n.enforcer.dp.endpoint_slots = 8;
        let web = endpoint("web", 2);
        n.pod_appears(&web);
        n.in_view(&web, "web");
        n.sync();
        assert_eq!(n.enforcement(&web), Enforcement::Closed, "ifindex 11 has no endpoint slot");
        assert_eq!(n.refusals("attach_failed"), 1);
        let problems = n.problems();
        assert!(problems.len() == 1 && problems[0].contains("beyond the endpoint map"), "{problems:?}");
        // Retried on every sync, counted once.
        n.sync();
        assert_eq!(n.refusals("attach_failed"), 1);
    }

    #[test]
    fn an_invalid_mac_holds_the_interface_closed() {
        let mut n = node();
        let mut web = endpoint("web", 2);
        web.mac = "not-a-mac".into();
        n.pod_appears(&web);
        n.in_view(&web, "web");
        n.sync();
        assert_eq!(n.enforcement(&web), Enforcement::Closed);
        assert_eq!(n.refusals("invalid_mac"), 1);
        assert_eq!(n.problems().len(), 1);
    }

    #[test]
    fn an_unreadable_endpoint_file_keeps_its_pod_closed_not_detached() {
        let mut n = node();
        let web = endpoint("web", 2);
        n.pod_appears(&web);
        n.in_view(&web, "web");
        n.sync();
        // Half-written by the CNI plugin, or corrupted.
        std::fs::write(n.dir.path().join(web.file_name()), "namespace: shop\nname: we").unwrap();
        n.sync();
        assert_eq!(n.enforcement(&web), Enforcement::Closed, "the pod's interface lost its programs");
        assert!(n.problems()[0].contains("unreadable_endpoint"), "{:?}", n.problems());
        // Rewritten whole: enforced again.
        n.write(&web);
        n.sync();
        assert_eq!(n.enforcement(&web), enforced_as(WEB, &web));
        assert!(n.problems().is_empty());
    }

    #[test]
    fn a_new_pod_whose_file_is_half_written_is_reported_until_it_is_whole() {
        let mut n = node();
        let web = endpoint("web", 2);
        n.enforcer.dp.add_interface(&web.interface, 40);
        n.in_view(&web, "web");
        std::fs::write(n.dir.path().join(web.file_name()), "namespace: shop\nna").unwrap();
        n.sync();
        assert_eq!(n.problems().len(), 1, "{:?}", n.problems());
        assert_eq!(n.refusals("unreadable_endpoint"), 1);
        n.write(&web);
        n.sync();
        assert_eq!(n.enforcement(&web), enforced_as(WEB, &web));
        assert!(n.problems().is_empty());
    }

    #[test]
    fn an_interface_whose_programs_cannot_attach_is_set_down_and_reported() {
        let mut n = node();
        let web = endpoint("web", 2);
        n.enforcer.dp.failing_links.insert(web.interface.clone());
        n.pod_appears(&web);
        n.in_view(&web, "web");
        n.sync();
        assert_eq!(n.enforcement(&web), Enforcement::Down);
        assert_eq!(n.refusals("attach_failed_down"), 1);
        assert!(n.problems()[0].contains("not enforced"), "{:?}", n.problems());
        // The fault clears: the next sync enforces it.
        n.enforcer.dp.failing_links.clear();
        n.sync();
        assert_eq!(n.enforcement(&web), enforced_as(WEB, &web));
        assert!(n.problems().is_empty());
    }

    // --- issue 14, finding 3: before the view arrives. ---

    #[test]
    fn before_the_view_arrives_new_pods_are_closed_and_enforced_ones_adopted() {
        let mut n = node();
        let web = endpoint("web", 2);
        let api = endpoint("api", 3);
        n.pod_appears(&web);
        n.in_view(&web, "web");
        n.sync();
        // The agent restarts (a new enforcer over the same pinned datapath);
        // meanwhile a new pod appeared; the cluster source does not answer.
        let dp = std::mem::take(&mut n.enforcer.dp);
        n.enforcer = Enforcer::new(dp, NODE, n.dir.path()).unwrap();
        n.pod_appears(&api);
        n.enforcer.close_all_but_adopted().unwrap();
        assert_eq!(n.enforcement(&web), enforced_as(WEB, &web), "an enforced pod keeps its flows across a restart");
        assert_eq!(n.enforcement(&api), Enforcement::Closed, "a pod nobody has vouched for yet");
        // The view arrives: the adopted pod is settled (not re-attached), the new one enforced.
        let revision = n.enforcer.dp.revision;
        n.in_view(&api, "api");
        n.enforcer.sync_endpoints(&n.view.clone()).unwrap();
        assert_eq!(n.enforcer.dp.revision, revision, "nothing re-keyed");
        assert_eq!(n.enforcement(&web), enforced_as(WEB, &web));
        assert_eq!(n.enforcement(&api), enforced_as(API, &api));
    }
}
