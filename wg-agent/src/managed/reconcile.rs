//! From a cluster view to WireGuard peers and routes: pure, so every rule
//! here is tested without a kernel.
//!
//! The security rule this module owns: a remote node's tunnel accepts only
//! that node's pod CIDRs as inner source. A record that would widen that —
//! a pod CIDR outside the cluster CIDRs, one overlapping ours or another
//! node's, our own key — is refused, logged and counted, never installed.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use meshguard_common::cluster::{ClusterView, NodeRecord};
use meshguard_common::key::PublicKey;

use super::config::AgentConfig;
use super::routes::{MeshRoute, RouteKind};
use crate::device::{DeviceUpdate, PeerUpdate};

/// Why a node record was not turned into a peer. Stable metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// A pod CIDR outside the configured cluster CIDRs.
    OutsideCluster,
    /// A pod CIDR overlapping this node's own pod CIDRs.
    OverlapsLocal,
    /// Two remote nodes claim overlapping pod CIDRs; both are refused.
    OverlapsPeer,
    /// The record carries this node's own public key.
    OwnKey,
    /// Two records carry the same public key.
    DuplicateKey,
}

impl Refusal {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::OutsideCluster => "outside_cluster",
            Self::OverlapsLocal => "overlaps_local",
            Self::OverlapsPeer => "overlaps_peer",
            Self::OwnKey => "own_key",
            Self::DuplicateKey => "duplicate_key",
        }
    }
}

/// What one reconciliation decided.
#[derive(Debug, Default)]
pub struct Plan {
    pub update: DeviceUpdate,
    pub routes: BTreeSet<MeshRoute>,
    /// Nodes accepted as peers, by name.
    pub peers: BTreeMap<String, NodeRecord>,
    pub refused: Vec<(String, Refusal)>,
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Computes the device update and routes for `view`, given the peers
/// applied last time (`applied`, by public key).
pub fn plan(cfg: &AgentConfig, own_key: PublicKey, view: &ClusterView, applied: &BTreeMap<PublicKey, NodeRecord>) -> Plan {
    let mut out = Plan::default();
    let candidates: Vec<&NodeRecord> = view.peers_of(&cfg.node_name).collect();

    let mut key_count: BTreeMap<PublicKey, usize> = BTreeMap::new();
    for n in &candidates {
        *key_count.entry(n.public_key).or_default() += 1;
    }
    // First each record on its own, then overlaps among the survivors only,
    // so a record refused for its own sake cannot get others refused too.
    let mut valid: Vec<&NodeRecord> = Vec::new();
    for n in &candidates {
        let refusal = if n.public_key == own_key {
            Some(Refusal::OwnKey)
        } else if key_count[&n.public_key] > 1 {
            Some(Refusal::DuplicateKey)
        } else if n.pod_cidrs.iter().any(|p| !cfg.cluster_cidrs.iter().any(|c| c.contains(p))) {
            Some(Refusal::OutsideCluster)
        } else if n.pod_cidrs.iter().any(|p| cfg.pod_cidrs.iter().any(|l| overlaps(p, l))) {
            Some(Refusal::OverlapsLocal)
        } else {
            None
        };
        match refusal {
            Some(r) => out.refused.push((n.name.clone(), r)),
            None => valid.push(n),
        }
    }
    let mut accepted: Vec<&NodeRecord> = Vec::new();
    for n in &valid {
        let clash =
            valid.iter().any(|other| other.name != n.name && n.pod_cidrs.iter().any(|p| other.pod_cidrs.iter().any(|q| overlaps(p, q))));
        if clash {
            out.refused.push((n.name.clone(), Refusal::OverlapsPeer));
        } else {
            accepted.push(n);
        }
    }

    let wanted: BTreeSet<PublicKey> = accepted.iter().map(|n| n.public_key).collect();
    for key in applied.keys() {
        if !wanted.contains(key) {
            let mut p = PeerUpdate::new(*key);
            p.remove = true;
            out.update.peers.push(p);
        }
    }
    for n in accepted {
        let before = applied.get(&n.public_key);
        let mut p = PeerUpdate::new(n.public_key);
        // Only a changed record moves the endpoint: between changes the peer
        // may roam, and the last authenticated address wins, as in WireGuard.
        if before.is_none_or(|b| b.endpoint != n.endpoint) {
            p.endpoint = Some(n.endpoint);
        }
        p.replace_allowed_ips = true;
        p.allowed_ips = n.pod_cidrs.clone();
        out.update.peers.push(p);
        for cidr in &n.pod_cidrs {
            out.routes.insert(MeshRoute { dst: cidr.trunc(), kind: RouteKind::Tunnel });
        }
        out.peers.insert(n.name.clone(), n.clone());
    }
    out.routes.extend(strict_routes(cfg));
    out
}

/// Strict mode's routes, which need no view: the cluster CIDRs into the
/// tunnel (the agent drops what has no peer) and the blackhole under them.
pub fn strict_routes(cfg: &AgentConfig) -> BTreeSet<MeshRoute> {
    let mut out = BTreeSet::new();
    if cfg.strict {
        for c in &cfg.cluster_cidrs {
            out.insert(MeshRoute { dst: *c, kind: RouteKind::Tunnel });
            out.insert(MeshRoute { dst: *c, kind: RouteKind::Blackhole });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::managed::config::{RawConfig, construct_config};

    fn cfg() -> AgentConfig {
        let raw: RawConfig = meshguard_common::yaml::from_str(
            "nodeName: node-1\nendpoint: 192.168.50.1\npodCidrs: [10.244.1.0/24]\nclusterCidrs: [10.244.0.0/16]\ncluster: {dir: /x}\n",
        )
        .unwrap();
        construct_config(raw).unwrap()
    }

    fn node(name: &str, key: u8, cidr: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            public_key: PublicKey([key; 32]),
            endpoint: format!("192.168.50.{key}:51820").parse().unwrap(),
            pod_cidrs: vec![cidr.parse().unwrap()],
        }
    }

    fn view(nodes: &[NodeRecord]) -> ClusterView {
        ClusterView { nodes: nodes.iter().map(|n| (n.name.clone(), n.clone())).collect(), ..Default::default() }
    }

    const OWN: PublicKey = PublicKey([1; 32]);

    #[test]
    fn peers_and_routes_for_every_other_node() {
        let v = view(&[node("node-1", 1, "10.244.1.0/24"), node("node-2", 2, "10.244.2.0/24"), node("node-3", 3, "10.244.3.0/24")]);
        let p = plan(&cfg(), OWN, &v, &BTreeMap::new());
        assert!(p.refused.is_empty());
        assert_eq!(p.update.peers.len(), 2);
        assert!(p.update.peers.iter().all(|u| u.endpoint.is_some() && u.replace_allowed_ips));
        let tunnel: Vec<String> = p.routes.iter().filter(|r| r.kind == RouteKind::Tunnel).map(|r| r.dst.to_string()).collect();
        assert_eq!(tunnel, ["10.244.0.0/16", "10.244.2.0/24", "10.244.3.0/24"]);
        assert!(p.routes.contains(&MeshRoute { dst: "10.244.0.0/16".parse().unwrap(), kind: RouteKind::Blackhole }));

        // Unchanged endpoint on the next round: not re-sent (roaming survives).
        let again = plan(&cfg(), OWN, &v, &p.peers.values().map(|n| (n.public_key, n.clone())).collect());
        assert!(again.update.peers.iter().all(|u| u.endpoint.is_none()));
    }

    #[test]
    fn removed_and_rotated_nodes_are_replaced() {
        let applied: BTreeMap<_, _> = [node("node-2", 2, "10.244.2.0/24")].into_iter().map(|n| (n.public_key, n)).collect();
        let v = view(&[node("node-2", 9, "10.244.2.0/24")]);
        let p = plan(&cfg(), OWN, &v, &applied);
        let removed: Vec<_> = p.update.peers.iter().filter(|u| u.remove).map(|u| u.public_key).collect();
        assert_eq!(removed, [PublicKey([2; 32])]);
        assert!(p.update.peers.iter().any(|u| u.public_key == PublicKey([9; 32]) && !u.remove));
    }

    #[test]
    fn records_that_would_widen_a_tunnel_are_refused() {
        let v = view(&[
            node("wide", 4, "0.0.0.0/0"),
            node("steal", 5, "10.244.1.128/25"),
            node("a", 6, "10.244.6.0/24"),
            node("b", 7, "10.244.6.0/25"),
            node("me-again", 1, "10.244.8.0/24"),
            node("ok", 8, "10.244.9.0/24"),
        ]);
        let p = plan(&cfg(), OWN, &v, &BTreeMap::new());
        let refused: BTreeMap<_, _> = p.refused.iter().cloned().collect();
        assert_eq!(refused["wide"], Refusal::OutsideCluster);
        assert_eq!(refused["steal"], Refusal::OverlapsLocal);
        assert_eq!(refused["a"], Refusal::OverlapsPeer);
        assert_eq!(refused["b"], Refusal::OverlapsPeer);
        assert_eq!(refused["me-again"], Refusal::OwnKey);
        assert_eq!(p.peers.keys().collect::<Vec<_>>(), ["ok"]);
    }

    /// Issue 14, finding 10: without strict mode a node could claim any
    /// range (8.8.8.0/24) and pull other nodes' traffic to it into its
    /// tunnel. Either the configuration is refused or the record is.
    #[test]
    fn a_non_strict_node_never_accepts_a_range_outside_the_cluster() {
        let raw: RawConfig = meshguard_common::yaml::from_str(
            "nodeName: node-1\nendpoint: 192.168.50.1\npodCidrs: [10.244.1.0/24]\nstrict: false\ncluster: {dir: /x}\n",
        )
        .unwrap();
        let v = view(&[node("greedy", 4, "8.8.8.0/24")]);
        match construct_config(raw) {
            Err(e) => assert!(e.to_string().contains("clusterCidrs"), "{e}"),
            Ok(cfg) => {
                let p = plan(&cfg, OWN, &v, &BTreeMap::new());
                assert!(p.peers.is_empty(), "a node claiming 8.8.8.0/24 became a peer: {:?}", p.routes);
            }
        }
        let mut non_strict = cfg();
        non_strict.strict = false;
        let p = plan(&non_strict, OWN, &v, &BTreeMap::new());
        assert_eq!(p.refused, [("greedy".to_owned(), Refusal::OutsideCluster)]);
    }
}
