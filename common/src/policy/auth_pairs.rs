//! Which identity pairs a node must have proved before their first packet:
//! the pairs that `authentication: required` rules admit between workloads
//! that are placed. The datapath checks an auth entry at the **subject's**
//! interface, keyed (subject identity, peer identity, peer node), so the
//! node hosting the subject is the one that needs it; auth-handshake
//! proves these proactively, so the first connection does not wait.
//!
//! Selection is the policy compiler's (wg-agent): subjects are the pods of
//! the policy's namespace its selector matches, peers what
//! [`PeerSelector::matches`] says, an absent or empty peer list every pod.
//! Deny rules are not subtracted: a proof for a pair that a Deny rule then
//! drops admits nothing (deny wins in the datapath), it is only unused.

use std::collections::BTreeSet;

use crate::cluster::{ClusterView, Workload};
use crate::policy::{Action, Authentication, MeshPolicy, PeerSelector};
use crate::spiffe::{SpiffeId, TrustDomain};

/// (local identity on this node, remote identity, the remote's node).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NeededPair {
    pub local: SpiffeId,
    pub remote: SpiffeId,
    pub remote_node: String,
}

// === impl PeerSelector ===

impl PeerSelector {
    /// Whether the workload `w` (with SPIFFE ID `id`) is one of the peers this
    /// selector names, in a policy of namespace `policy_ns`.
    pub fn matches(&self, policy_ns: &str, w: &Workload, id: &SpiffeId) -> bool {
        match &self.spiffe_id {
            Some(want) => want == id,
            None => self.matches_workload(policy_ns, w),
        }
    }

    /// The namespace, service-account and pod-selector part of
    /// [`PeerSelector::matches`] (a `spiffeId` selector names an identity,
    /// not pods: false).
    pub fn matches_workload(&self, policy_ns: &str, w: &Workload) -> bool {
        if self.spiffe_id.is_some() {
            return false;
        }
        let ns = self.namespace.as_deref().unwrap_or(policy_ns);
        w.namespace == ns
            && self.service_account.as_deref().is_none_or(|sa| w.service_account == sa)
            && self.pod_selector.as_ref().is_none_or(|s| s.matches(&w.labels))
    }
}

/// Every pair `node` needs proved, from the view's policies and placements.
pub fn needed_pairs(view: &ClusterView, node: &str) -> BTreeSet<NeededPair> {
    let td = view.trust_domain_or_default();
    let placed: Vec<(&Workload, SpiffeId)> = view.workloads.values().filter_map(|w| Some((w, w.spiffe_id(&td).ok()?))).collect();
    let mut out = BTreeSet::new();
    for policy in view.policies.values() {
        let subjects: Vec<&(&Workload, SpiffeId)> = placed
            .iter()
            .filter(|(w, _)| w.node == node && w.namespace == policy.namespace() && policy.spec.selector.matches(&w.labels))
            .collect();
        if subjects.is_empty() {
            continue;
        }
        for peers in auth_rule_peers(policy) {
            for (w, id) in &placed {
                let admitted = match peers {
                    None => true,
                    Some(list) => list.iter().any(|p| p.matches(policy.namespace(), w, id)),
                };
                if !admitted {
                    continue;
                }
                for (_, subject) in &subjects {
                    out.insert(NeededPair { local: subject.clone(), remote: id.clone(), remote_node: w.node.clone() });
                }
            }
        }
    }
    out
}

/// The peer lists of a policy's Allow rules with `authentication: required`
/// (either direction); `None` = every peer.
fn auth_rule_peers(policy: &MeshPolicy) -> Vec<Option<&Vec<PeerSelector>>> {
    let ingress = policy.spec.ingress.iter().flatten().map(|r| (r, r.from.as_ref()));
    let egress = policy.spec.egress.iter().flatten().map(|r| (r, r.to.as_ref()));
    ingress
        .chain(egress)
        .filter(|(r, _)| r.action == Action::Allow && r.authentication == Authentication::Required)
        .map(|(_, peers)| peers.filter(|p| !p.is_empty()))
        .collect()
}

/// The SPIFFE ID of every workload `view` places on `node`.
pub fn hosted_on(view: &ClusterView, td: &TrustDomain, node: &str) -> BTreeSet<SpiffeId> {
    view.workloads.values().filter(|w| w.node == node).filter_map(|w| w.spiffe_id(td).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(policy: &str) -> ClusterView {
        let mut v = ClusterView::default();
        for (name, sa, node, app) in [
            ("web", "web", "node-1", "web"),
            ("web2", "web", "node-3", "web"),
            ("api", "api", "node-2", "api"),
            ("db", "db", "node-2", "db"),
        ] {
            let w = Workload {
                name: name.into(),
                namespace: "shop".into(),
                service_account: sa.into(),
                node: node.into(),
                ips: vec![],
                labels: [("app".to_owned(), app.to_owned())].into(),
            };
            v.workloads.insert(w.key(), w);
        }
        for p in MeshPolicy::all_from_yaml(policy).unwrap() {
            v.policies.insert(p.key(), p);
        }
        v
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap()
    }

    fn pair(l: &str, r: &str, n: &str) -> NeededPair {
        NeededPair { local: id(l), remote: id(r), remote_node: n.into() }
    }

    const API: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: web}]
      ports: [{protocol: TCP, port: 7000}]
      authentication: required
    - from: [{serviceAccount: db}]
"#;

    #[test]
    fn the_subjects_node_needs_one_pair_per_placed_peer_and_node() {
        let v = view(API);
        assert_eq!(needed_pairs(&v, "node-2"), [pair("api", "web", "node-1"), pair("api", "web", "node-3")].into());
        // The peers' nodes need nothing: the check is at the subject's interface.
        assert!(needed_pairs(&v, "node-1").is_empty());
        assert!(needed_pairs(&v, "node-3").is_empty());
    }

    #[test]
    fn an_empty_peer_list_means_every_placed_workload_and_deny_rules_need_nothing() {
        let v = view(&API.replace("from: [{serviceAccount: web}]", "from: []").replace(
            "    - from: [{serviceAccount: db}]\n",
            "    - action: Deny\n      from: [{serviceAccount: db}]\n      authentication: required\n",
        ));
        let got = needed_pairs(&v, "node-2");
        assert!(got.contains(&pair("api", "db", "node-2")), "same-node pairs too: {got:?}");
        assert!(got.contains(&pair("api", "api", "node-2")));
        assert_eq!(got.len(), 4, "{got:?}");
    }

    #[test]
    fn egress_rules_count_and_spiffe_ids_match_exactly() {
        let v = view(
            "apiVersion: meshguard.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  egress:\n    - to: [{spiffeId: \"spiffe://cluster.local/ns/shop/sa/db\"}]\n      authentication: required\n",
        );
        assert_eq!(needed_pairs(&v, "node-1"), [pair("web", "db", "node-2")].into());
        assert_eq!(needed_pairs(&v, "node-3"), [pair("web", "db", "node-2")].into());
    }
}
