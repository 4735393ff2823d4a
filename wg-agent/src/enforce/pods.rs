//! What each local pod interface should be, from the endpoint files and the
//! view: pure, so every fail-closed rule here is tested without a kernel.
//!
//! A pod interface is either *enforced* (programs on, an endpoint entry with
//! its identity, MAC and addresses) or *held closed* (programs on, no entry:
//! every packet dropped). There is no third, open, state: whatever keeps the
//! agent from enforcing a pod — an identity the view does not know (yet, or
//! any more), an invalid MAC, an unreadable endpoint file, two files naming
//! one interface, a failed attachment — holds its interface closed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use meshguard_common::cluster::ClusterView;
use meshguard_ebpf::PodEndpoint;

use super::endpoints::EndpointFile;

/// Why an interface is held closed. Stable metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HoldReason {
    /// The view does not name the pod as a workload on this node with a
    /// numeric identity: not yet (a new pod), or no longer (removed).
    UnknownWorkload,
    /// The endpoint file's MAC is not six hex pairs.
    InvalidMac,
    /// The endpoint file that described the pod cannot be read or parsed.
    UnreadableEndpoint,
    /// Two endpoint files name the same interface.
    ConflictingEndpoints,
    /// The datapath refused the attachment (e.g. an ifindex beyond the
    /// endpoint map); the interface is closed, the pod unenforced.
    AttachFailed,
}

impl HoldReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UnknownWorkload => "unknown_workload",
            Self::InvalidMac => "invalid_mac",
            Self::UnreadableEndpoint => "unreadable_endpoint",
            Self::ConflictingEndpoints => "conflicting_endpoints",
            Self::AttachFailed => "attach_failed",
        }
    }

    /// Whether this needs an operator (and makes the node not ready). A pod
    /// waiting for the view to name it is the normal start of a pod's life.
    pub const fn is_failure(self) -> bool {
        !matches!(self, Self::UnknownWorkload)
    }
}

/// What one interface should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// `<namespace>/<name>`, or the endpoint file's name when unreadable.
    pub pod: String,
    pub target: Result<PodEndpoint, (HoldReason, String)>,
}

/// The plan for every local interface, by interface name; plus the
/// unreadable files whose interface is not known (nothing to hold closed;
/// they are reported).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodPlan {
    pub interfaces: BTreeMap<String, Want>,
    pub unreadable: BTreeMap<String, String>,
    /// File name → interface, for the next round (an unreadable file keeps
    /// the interface it named last time).
    pub known_files: BTreeMap<String, String>,
}

/// Decides every local interface from the endpoint files and the view.
/// `known_files` is the previous plan's file → interface map.
pub fn plan(files: &[EndpointFile], view: &ClusterView, node: &str, known_files: &BTreeMap<String, String>) -> PodPlan {
    let td = view.trust_domain_or_default();
    let mut out = PodPlan::default();
    for f in files {
        let (iface, want) = match &f.endpoint {
            Ok(ep) => {
                let target = match ep.mac_bytes() {
                    None => Err((HoldReason::InvalidMac, format!("MAC {:?} is not six hex pairs", ep.mac))),
                    Some(mac) => view
                        .workloads
                        .get(&ep.key())
                        .filter(|w| w.node == node)
                        .and_then(|w| w.spiffe_id(&td).ok())
                        .and_then(|id| view.identities.get(&id).copied())
                        .map(|identity| PodEndpoint {
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
                        })
                        .ok_or_else(|| {
                            (
                                HoldReason::UnknownWorkload,
                                format!("the cluster view names no workload {} on {node} with an identity", ep.key()),
                            )
                        }),
                };
                (ep.interface.clone(), Want { pod: ep.key(), target })
            }
            Err(error) => match known_files.get(&f.file) {
                Some(iface) => (iface.clone(), Want { pod: f.file.clone(), target: Err((HoldReason::UnreadableEndpoint, error.clone())) }),
                None => {
                    out.unreadable.insert(f.file.clone(), error.clone());
                    continue;
                }
            },
        };
        out.known_files.insert(f.file.clone(), iface.clone());
        match out.interfaces.get_mut(&iface) {
            Some(other) => {
                let detail = format!("endpoint files for {} and {} both name interface {iface}", other.pod, want.pod);
                other.target = Err((HoldReason::ConflictingEndpoints, detail));
            }
            None => {
                out.interfaces.insert(iface, want);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use meshguard_common::cluster::{LocalEndpoint, Workload};
    use meshguard_common::spiffe::SpiffeId;

    use super::*;

    fn file(name: &str, iface: &str) -> EndpointFile {
        let ep = LocalEndpoint {
            namespace: "shop".into(),
            name: name.into(),
            interface: iface.into(),
            mac: "02:00:00:00:00:01".into(),
            ips: vec!["10.244.1.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        };
        EndpointFile { file: ep.file_name(), endpoint: Ok(ep) }
    }

    fn view(node: &str) -> ClusterView {
        let mut v = ClusterView::default();
        v.identities.insert(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap(), 300);
        let w = Workload {
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: node.into(),
            ips: vec![],
            labels: Default::default(),
        };
        v.workloads.insert(w.key(), w);
        v
    }

    #[test]
    fn a_known_pod_gets_its_identity_mac_and_both_addresses() {
        let p = plan(&[file("web", "veth1")], &view("node-1"), "node-1", &BTreeMap::new());
        let pod = p.interfaces["veth1"].target.clone().unwrap();
        assert_eq!(pod.identity, 300);
        assert_eq!(pod.ipv4, Some("10.244.1.2".parse().unwrap()));
        assert_eq!(pod.ipv6, Some("fd00::2".parse().unwrap()));
        assert_eq!(p.known_files["shop_web.yaml"], "veth1");
    }

    #[test]
    fn a_workload_the_view_places_on_another_node_is_unknown_here() {
        let p = plan(&[file("web", "veth1")], &view("node-2"), "node-1", &BTreeMap::new());
        assert_eq!(p.interfaces["veth1"].target.clone().unwrap_err().0, HoldReason::UnknownWorkload);
    }

    #[test]
    fn two_files_naming_one_interface_close_it() {
        let p = plan(&[file("api", "veth1"), file("web", "veth1")], &view("node-1"), "node-1", &BTreeMap::new());
        assert_eq!(p.interfaces.len(), 1);
        assert_eq!(p.interfaces["veth1"].target.clone().unwrap_err().0, HoldReason::ConflictingEndpoints);
    }

    #[test]
    fn an_unreadable_file_closes_the_interface_it_named_and_is_reported_otherwise() {
        let broken = EndpointFile { file: "shop_web.yaml".into(), endpoint: Err("invalid: eof".into()) };
        let known = [("shop_web.yaml".to_owned(), "veth1".to_owned())].into();
        let p = plan(std::slice::from_ref(&broken), &view("node-1"), "node-1", &known);
        assert_eq!(p.interfaces["veth1"].target.clone().unwrap_err().0, HoldReason::UnreadableEndpoint);
        assert_eq!(p.known_files, known);
        let p = plan(&[broken], &view("node-1"), "node-1", &BTreeMap::new());
        assert!(p.interfaces.is_empty());
        assert_eq!(p.unreadable["shop_web.yaml"], "invalid: eof");
    }
}
