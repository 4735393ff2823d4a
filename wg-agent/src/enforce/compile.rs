//! Compiles `MeshPolicy` objects into the datapath's policy entries.
//!
//! Semantics follow Kubernetes NetworkPolicy: a pod selected by any policy
//! for a direction is default-deny in that direction except what some rule
//! allows; unselected pods are open; rules add up; an explicit `Deny` wins
//! over everything, `authentication: required` over plain allows.
//!
//! The datapath decides by **identity** (the pod's SPIFFE ID,
//! `ns/<namespace>/sa/<service-account>`), the only thing a mutual-TLS proof
//! can establish. Selectors pick pods by labels; their identities are what
//! is enforced. When a selector picks some pods of an identity but not all,
//! the rule covers the whole identity — a warning says so, because the
//! policy reads finer than it can be enforced.
//!
//! Direction isolation as in NetworkPolicy's `policyTypes` defaults: a policy
//! isolates ingress when it has an `ingress` list or no `egress` list, and
//! isolates egress when it has an `egress` list.

use std::collections::{BTreeMap, BTreeSet};

use meshguard_common::cluster::{ClusterView, Workload};
use meshguard_common::policy::{self as mp, MeshPolicy, PeerSelector, PortRule};
use meshguard_ebpf::policy::{ANY, Action, Direction, Identity, PolicyEntry, PolicySet, Ports};

/// Where a policy entry came from, for drop events (the entry's cookie
/// indexes [`Compiled::rules`], from 1; 0 is "no rule": default deny).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: String,
    pub direction: Direction,
    pub index: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    pub set: PolicySet,
    pub rules: Vec<RuleRef>,
    /// Things an operator should know (granularity widening, unknown peers,
    /// invalid ports); each is also skipped or widened as it says.
    pub warnings: Vec<String>,
}

impl Compiled {
    /// The rule a cookie names, if any.
    pub fn rule(&self, cookie: u32) -> Option<&RuleRef> {
        (cookie as usize).checked_sub(1).and_then(|i| self.rules.get(i))
    }
}

struct Ctx<'a> {
    view: &'a ClusterView,
    td: meshguard_common::spiffe::TrustDomain,
    warnings: Vec<String>,
}

impl Ctx<'_> {
    fn identity_of(&self, w: &Workload) -> Option<Identity> {
        let id = w.spiffe_id(&self.td).ok()?;
        self.view.identities.get(&id).copied()
    }

    /// Identities of the pods `pick` selects, warning when an identity is
    /// only partly selected (enforcement is per identity).
    fn identities_of(&mut self, what: &str, pick: impl Fn(&Workload) -> bool) -> BTreeSet<Identity> {
        let mut picked: BTreeMap<Identity, (usize, usize)> = BTreeMap::new();
        for w in self.view.workloads.values() {
            let Some(id) = self.identity_of(w) else { continue };
            let e = picked.entry(id).or_default();
            e.1 += 1;
            if pick(w) {
                e.0 += 1;
            }
        }
        let mut out = BTreeSet::new();
        for (id, (selected, total)) in picked {
            if selected > 0 {
                out.insert(id);
                if selected < total {
                    self.warnings.push(format!(
                        "{what} selects {selected} of the {total} pods of identity {id}; the rule applies to all of them (policy is enforced per service account)"
                    ));
                }
            }
        }
        out
    }

    fn peers(&mut self, policy: &MeshPolicy, what: &str, peers: Option<&Vec<PeerSelector>>) -> BTreeSet<Identity> {
        let Some(peers) = peers.filter(|p| !p.is_empty()) else { return [ANY].into() };
        let mut out = BTreeSet::new();
        for p in peers {
            if let Some(id) = &p.spiffe_id {
                match self.view.identities.get(id) {
                    Some(n) => {
                        out.insert(*n);
                    }
                    None => self.warnings.push(format!("{what}: {id} has no numeric identity yet; nothing matches it")),
                }
                continue;
            }
            let ns = p.namespace.clone().unwrap_or_else(|| policy.namespace().to_owned());
            let by_sa = p
                .service_account
                .as_deref()
                .and_then(|sa| self.td.workload_id(&ns, sa).ok())
                .and_then(|id| self.view.identities.get(&id).copied());
            // The same selection auth-handshake uses for the pairs it proves ahead.
            let matched = self.identities_of(what, |w| p.matches_workload(policy.namespace(), w));
            out.extend(matched);
            // A service account named outright counts even before any of its pods runs.
            if p.pod_selector.is_none()
                && let Some(n) = by_sa
            {
                out.insert(n);
            }
        }
        out
    }
}

fn ports(ctx: &mut Ctx<'_>, what: &str, rules: &[PortRule]) -> Vec<(Option<u8>, Ports)> {
    if rules.is_empty() {
        return vec![(None, Ports::Any)];
    }
    let mut out = Vec::new();
    for r in rules {
        let proto = r.protocol.number();
        match Ports::from_rule(proto, r.port, r.end_port) {
            Ok(p) => out.push((Some(proto), p)),
            Err(e) => ctx.warnings.push(format!("{what}: port rule {r:?} skipped: {e}")),
        }
    }
    out
}

/// Compiles every policy in `view` into the node's policy set.
pub fn compile(view: &ClusterView) -> Compiled {
    let mut ctx = Ctx { view, td: view.trust_domain_or_default(), warnings: Vec::new() };
    let mut out = Compiled::default();

    for policy in view.policies.values() {
        let key = policy.key();
        let ns = policy.namespace().to_owned();
        let selector = policy.spec.selector.clone();
        let subjects = ctx.identities_of(&format!("policy {key} selector"), |w| w.namespace == ns && selector.matches(&w.labels));
        if subjects.is_empty() {
            continue;
        }
        let isolate_ingress = policy.spec.ingress.is_some() || policy.spec.egress.is_none();
        let isolate_egress = policy.spec.egress.is_some();
        for s in &subjects {
            if isolate_ingress {
                out.set.default_deny.insert((*s, Direction::Ingress));
            }
            if isolate_egress {
                out.set.default_deny.insert((*s, Direction::Egress));
            }
        }
        for (direction, rules) in [(Direction::Ingress, &policy.spec.ingress), (Direction::Egress, &policy.spec.egress)] {
            for (index, rule) in rules.iter().flatten().enumerate() {
                let what = format!("policy {key} {direction:?} rule {index}");
                let peer_list = if direction == Direction::Ingress { rule.from.as_ref() } else { rule.to.as_ref() };
                let peers = ctx.peers(policy, &what, peer_list);
                let port_list = ports(&mut ctx, &what, &rule.ports);
                let action = match (rule.action, rule.authentication) {
                    (mp::Action::Deny, _) => Action::Deny,
                    (mp::Action::Allow, mp::Authentication::Required) => Action::AuthRequired,
                    (mp::Action::Allow, mp::Authentication::None) => Action::Allow,
                };
                out.rules.push(RuleRef { policy: key.clone(), direction, index });
                let cookie = out.rules.len() as u32;
                for subject in &subjects {
                    for peer in &peers {
                        for (protocol, ports) in &port_list {
                            out.set.entries.push(PolicyEntry {
                                subject: *subject,
                                peer: *peer,
                                direction,
                                protocol: *protocol,
                                ports: *ports,
                                action,
                                cookie,
                            });
                        }
                    }
                }
            }
        }
    }
    out.warnings = ctx.warnings;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshguard_common::spiffe::SpiffeId;

    fn view(policies: &str) -> ClusterView {
        let mut v = ClusterView::default();
        for (name, sa, labels, n) in [
            ("web", "web", vec![("app", "web")], 300),
            ("web2", "web", vec![("app", "web"), ("tier", "edge")], 300),
            ("api", "api", vec![("app", "backend")], 301),
            ("db", "db", vec![("app", "db")], 302),
        ] {
            let w = Workload {
                name: name.into(),
                namespace: "shop".into(),
                service_account: sa.into(),
                node: "node-1".into(),
                ips: vec![],
                labels: labels.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            };
            v.identities.insert(SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap(), n);
            v.workloads.insert(w.key(), w);
        }
        v.identities.insert(SpiffeId::parse("spiffe://cluster.local/ns/batch/sa/report").unwrap(), 400);
        for p in MeshPolicy::all_from_yaml(policies).unwrap() {
            v.policies.insert(p.key(), p);
        }
        v
    }

    const BACKEND: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: backend-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  ingress:
    - from: [{serviceAccount: web}, {spiffeId: "spiffe://cluster.local/ns/batch/sa/report"}]
      ports: [{protocol: TCP, port: 8080}, {protocol: SCTP, port: 9000, endPort: 9010}, {protocol: ICMP}]
      authentication: required
    - action: Deny
      from: [{podSelector: {matchLabels: {app: db}}}]
  egress:
    - to: [{serviceAccount: db}]
      ports: [{protocol: TCP, port: 5432}]
"#;

    #[test]
    fn compiles_the_design_example() {
        let c = compile(&view(BACKEND));
        let dd: Vec<_> = c.set.default_deny.iter().copied().collect();
        assert_eq!(dd, [(301, Direction::Ingress), (301, Direction::Egress)]);
        let auth: Vec<_> = c.set.entries.iter().filter(|e| e.action == Action::AuthRequired).collect();
        // 2 peers x 3 port rules.
        assert_eq!(auth.len(), 6);
        assert!(auth.iter().all(|e| e.subject == 301 && e.direction == Direction::Ingress));
        assert!(auth.iter().any(|e| e.peer == 400 && e.protocol == Some(132) && e.ports == Ports::Range { first: 9000, last: 9010 }));
        assert!(auth.iter().any(|e| e.peer == 300 && e.protocol == Some(1) && e.ports == Ports::Any));
        let deny: Vec<_> = c.set.entries.iter().filter(|e| e.action == Action::Deny).collect();
        assert_eq!(deny.len(), 1);
        assert_eq!((deny[0].peer, deny[0].protocol, deny[0].ports), (302, None, Ports::Any));
        let egress: Vec<_> = c.set.entries.iter().filter(|e| e.direction == Direction::Egress).collect();
        assert_eq!(egress.len(), 1);
        assert_eq!((egress[0].peer, egress[0].action), (302, Action::Allow));
        let r = c.rule(deny[0].cookie).unwrap();
        assert_eq!((r.policy.as_str(), r.direction, r.index), ("shop/backend-ingress", Direction::Ingress, 1));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn no_from_means_everyone_and_egress_only_policies_leave_ingress_open() {
        let c = compile(&view(
            "apiVersion: meshguard.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  selector: {matchLabels: {app: db}}\n  egress:\n    - ports: [{protocol: UDP, port: 53}]\n",
        ));
        assert!(c.set.default_deny.contains(&(302, Direction::Egress)));
        assert!(!c.set.default_deny.contains(&(302, Direction::Ingress)));
        assert_eq!(c.set.entries.len(), 1);
        assert_eq!(c.set.entries[0].peer, ANY);
    }

    #[test]
    fn a_policy_with_no_rules_isolates_ingress_and_a_partial_selector_warns() {
        let c = compile(&view(
            "apiVersion: meshguard.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: edge, namespace: shop}\nspec:\n  selector: {matchLabels: {tier: edge}}\n",
        ));
        assert!(c.set.default_deny.contains(&(300, Direction::Ingress)));
        assert!(c.set.entries.is_empty());
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("1 of the 2 pods"));
    }

    #[test]
    fn policies_in_other_namespaces_select_nothing_here() {
        let c = compile(&view(
            "apiVersion: meshguard.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: p, namespace: other}\nspec:\n  selector: {}\n  ingress: []\n",
        ));
        assert!(c.set.default_deny.is_empty(), "{:?}", c.set.default_deny);
    }
}
