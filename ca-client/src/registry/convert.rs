//! Conversions between the cluster view's types and their protobufs.
//! Everything that comes off the wire is validated here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::RegistryError;
use super::proto::{self, cluster_event::Event};
use meshguard_common::cluster::alloc::{FIRST_IDENTITY, FIRST_NODE_ID};
use meshguard_common::cluster::{ClusterView, NodeRecord, Workload};
use meshguard_common::key::PublicKey;
use meshguard_common::policy::MeshPolicy;
use meshguard_common::spiffe::{SpiffeId, TrustDomain, validate_segment};

/// Numeric identities and node ids, as the view keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Numbers {
    pub identities: BTreeMap<SpiffeId, u32>,
    pub node_ids: BTreeMap<String, u32>,
}

fn invalid(what: &'static str, reason: impl ToString) -> RegistryError {
    RegistryError::Invalid { what, reason: reason.to_string() }
}

pub fn node_to_proto(n: &NodeRecord) -> proto::Node {
    proto::Node {
        name: n.name.clone(),
        public_key: n.public_key.0.to_vec(),
        endpoint: n.endpoint.to_string(),
        pod_cidrs: n.pod_cidrs.iter().map(|c| c.to_string()).collect(),
    }
}

pub fn node_from_proto(n: proto::Node) -> Result<NodeRecord, RegistryError> {
    validate_segment(&n.name).map_err(|e| invalid("node name", e))?;
    let key: [u8; 32] = n.public_key.as_slice().try_into().map_err(|_| invalid("node public key", "must be 32 bytes"))?;
    let endpoint: SocketAddr = n.endpoint.parse().map_err(|e| invalid("node endpoint", e))?;
    let pod_cidrs = n.pod_cidrs.iter().map(|c| c.parse::<IpNet>().map_err(|e| invalid("node pod CIDR", e))).collect::<Result<_, _>>()?;
    Ok(NodeRecord { name: n.name, public_key: PublicKey(key), endpoint, pod_cidrs })
}

pub fn workload_to_proto(w: &Workload) -> proto::Workload {
    proto::Workload {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        ips: w.ips.iter().map(|ip| ip.to_string()).collect(),
        labels: w.labels.clone().into_iter().collect(),
    }
}

pub fn workload_from_proto(w: proto::Workload) -> Result<Workload, RegistryError> {
    validate_segment(&w.name).map_err(|e| invalid("workload name", e))?;
    validate_segment(&w.namespace).map_err(|e| invalid("workload namespace", e))?;
    validate_segment(&w.service_account).map_err(|e| invalid("workload service account", e))?;
    validate_segment(&w.node).map_err(|e| invalid("workload node", e))?;
    let ips = w.ips.iter().map(|ip| ip.parse::<IpAddr>().map_err(|e| invalid("workload IP", e))).collect::<Result<_, _>>()?;
    Ok(Workload {
        name: w.name,
        namespace: w.namespace,
        service_account: w.service_account,
        node: w.node,
        ips,
        labels: w.labels.into_iter().collect(),
    })
}

pub fn policy_to_proto(p: &MeshPolicy) -> proto::Policy {
    proto::Policy { namespace: p.namespace().to_owned(), name: p.name().to_owned(), json: serde_json::to_string(p).unwrap_or_default() }
}

pub fn policy_from_proto(p: proto::Policy) -> Result<MeshPolicy, RegistryError> {
    MeshPolicy::from_json(&p.json).map_err(|e| invalid("policy", e))
}

pub fn numbers_to_proto<'a>(
    identities: impl IntoIterator<Item = (&'a SpiffeId, &'a u32)>,
    node_ids: impl IntoIterator<Item = (&'a String, &'a u32)>,
) -> proto::Numbers {
    proto::Numbers {
        identities: identities.into_iter().map(|(id, n)| (id.to_string(), *n)).collect(),
        node_ids: node_ids.into_iter().map(|(node, n)| (node.clone(), *n)).collect(),
    }
}

/// Checks every entry: valid SPIFFE IDs and node names, numbers in their
/// ranges, no number given twice.
pub fn numbers_from_proto(n: proto::Numbers) -> Result<Numbers, RegistryError> {
    let mut out = Numbers::default();
    let mut seen = BTreeSet::new();
    for (id, num) in n.identities {
        let id = SpiffeId::parse(&id).map_err(|e| invalid("numeric identity", format!("{id:?}: {e}")))?;
        if num < FIRST_IDENTITY || !seen.insert(num) {
            return Err(invalid("numeric identity", format!("{id} has number {num}, reserved or given twice")));
        }
        out.identities.insert(id, num);
    }
    let mut seen = BTreeSet::new();
    for (node, num) in n.node_ids {
        validate_segment(&node).map_err(|e| invalid("node id", format!("{node:?}: {e}")))?;
        if num < FIRST_NODE_ID || !seen.insert(num) {
            return Err(invalid("node id", format!("node {node} has id {num}, reserved or given twice")));
        }
        out.node_ids.insert(node, num);
    }
    Ok(out)
}

/// Checks that `new` numbers agree with those `view` already has: a number
/// once given never changes and is never given to anything else.
fn check_numbers(view: &ClusterView, new: &Numbers) -> Result<(), RegistryError> {
    fn check<K: Ord + std::fmt::Display>(have: &BTreeMap<K, u32>, new: &BTreeMap<K, u32>, what: &'static str) -> Result<(), RegistryError> {
        if new.is_empty() {
            return Ok(());
        }
        let fresh: BTreeMap<u32, &K> = new.iter().filter(|(k, _)| !have.contains_key(*k)).map(|(k, n)| (*n, k)).collect();
        for (k, n) in new {
            if let Some(old) = have.get(k).filter(|old| *old != n) {
                return Err(invalid(what, format!("{k} changed from {old} to {n}")));
            }
        }
        if let Some((k, n)) = have.iter().find(|(_, n)| fresh.contains_key(n)) {
            return Err(invalid(what, format!("{n} is already {k}'s, cannot also be {}", fresh[n])));
        }
        Ok(())
    }
    check(&view.identities, &new.identities, "numeric identity")?;
    check(&view.node_ids, &new.node_ids, "node id")
}

/// The view a snapshot holds. A policy this build cannot read (a newer
/// identity-ca's shape, say) is left out and named in `unreadable`, not
/// fatal: one policy must not keep a node on a stale view of everything.
pub fn snapshot_from_proto(s: proto::Snapshot) -> Result<ClusterView, RegistryError> {
    snapshot_parts(s).map(|(view, _)| view)
}

fn snapshot_parts(s: proto::Snapshot) -> Result<(ClusterView, Vec<String>), RegistryError> {
    let mut unreadable = Vec::new();
    let mut view = ClusterView {
        trust_domain: if s.trust_domain.is_empty() {
            None
        } else {
            Some(TrustDomain::new(&s.trust_domain).map_err(|e| invalid("trust domain", e))?)
        },
        ..ClusterView::default()
    };
    for n in s.nodes {
        let n = node_from_proto(n)?;
        view.nodes.insert(n.name.clone(), n);
    }
    for w in s.workloads {
        let w = workload_from_proto(w)?;
        view.workloads.insert(w.key(), w);
    }
    for p in s.policies {
        let key = format!("{}/{}", p.namespace, p.name);
        match policy_from_proto(p) {
            Ok(p) => {
                view.policies.insert(p.key(), p);
            }
            Err(error) => {
                tracing::warn!(policy = %key, %error, "a policy in the registry's snapshot cannot be read; its last version, if any, stays");
                unreadable.push(key);
            }
        }
    }
    if let Some(n) = s.numbers {
        let n = numbers_from_proto(n)?;
        view.identities = n.identities;
        view.node_ids = n.node_ids;
    }
    Ok((view, unreadable))
}

pub fn snapshot_to_proto(view: &ClusterView) -> proto::Snapshot {
    proto::Snapshot {
        trust_domain: view.trust_domain.as_ref().map(|t| t.to_string()).unwrap_or_default(),
        nodes: view.nodes.values().map(node_to_proto).collect(),
        workloads: view.workloads.values().map(workload_to_proto).collect(),
        policies: view.policies.values().map(policy_to_proto).collect(),
        numbers: Some(numbers_to_proto(&view.identities, &view.node_ids)),
    }
}

/// One event, decoded and checked, ready to apply.
enum Change {
    None,
    /// With the keys of policies it could not read.
    Snapshot(ClusterView, Vec<String>),
    Node(NodeRecord),
    NodeDeleted(String),
    Workload(Workload),
    WorkloadDeleted(String),
    Policy(Box<MeshPolicy>),
    PolicyDeleted(String),
}

/// Applies one watch event to `view`. An invalid event leaves `view` as it was.
pub fn apply_event(view: &mut ClusterView, event: proto::ClusterEvent) -> Result<(), RegistryError> {
    let change = match event.event {
        None => Change::None,
        Some(Event::Snapshot(s)) => {
            let (new, unreadable) = snapshot_parts(s)?;
            Change::Snapshot(new, unreadable)
        }
        Some(Event::NodeUpserted(n)) => Change::Node(node_from_proto(n)?),
        Some(Event::NodeDeleted(name)) => Change::NodeDeleted(name),
        Some(Event::WorkloadUpserted(w)) => Change::Workload(workload_from_proto(w)?),
        Some(Event::WorkloadDeleted(key)) => Change::WorkloadDeleted(key),
        Some(Event::PolicyUpserted(p)) => Change::Policy(Box::new(policy_from_proto(p)?)),
        Some(Event::PolicyDeleted(key)) => Change::PolicyDeleted(key),
    };
    let allocated = event.allocated.map(numbers_from_proto).transpose()?.unwrap_or_default();
    match &change {
        Change::Snapshot(new, _) => check_numbers(new, &allocated)?,
        _ => check_numbers(view, &allocated)?,
    }
    // Valid: from here on nothing fails.
    if let Change::Snapshot(mut new, unreadable) = change {
        // A policy that cannot be read keeps its last version, as an
        // unreadable update does: dropping it could open what it closed.
        for key in unreadable {
            if let Some(old) = view.policies.remove(&key) {
                new.policies.insert(key, old);
            }
        }
        // A snapshot replaces everything, numbers included.
        *view = new;
        view.identities.extend(allocated.identities);
        view.node_ids.extend(allocated.node_ids);
        return Ok(());
    }
    view.identities.extend(allocated.identities);
    view.node_ids.extend(allocated.node_ids);
    match change {
        Change::None | Change::Snapshot(..) => {}
        Change::Node(n) => {
            view.nodes.insert(n.name.clone(), n);
        }
        Change::NodeDeleted(name) => {
            view.nodes.remove(&name);
        }
        Change::Workload(w) => {
            view.workloads.insert(w.key(), w);
        }
        Change::WorkloadDeleted(key) => {
            view.workloads.remove(&key);
        }
        Change::Policy(p) => {
            view.policies.insert(p.key(), *p);
        }
        Change::PolicyDeleted(key) => {
            view.policies.remove(&key);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let n = NodeRecord {
            name: "node-1".into(),
            public_key: PublicKey([9; 32]),
            endpoint: "192.168.1.1:51820".parse().unwrap(),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        };
        assert_eq!(node_from_proto(node_to_proto(&n)).unwrap(), n);
        let mut bad = node_to_proto(&n);
        bad.public_key.pop();
        assert!(node_from_proto(bad).is_err());
        let w = Workload {
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "node-1".into(),
            ips: vec!["10.244.1.5".parse().unwrap()],
            labels: [("app".to_owned(), "web".to_owned())].into(),
        };
        assert_eq!(workload_from_proto(workload_to_proto(&w)).unwrap(), w);
        let mut bad = workload_to_proto(&w);
        bad.namespace = "a/b".into();
        assert!(workload_from_proto(bad).is_err());
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    /// One policy this build cannot read does not cost the node the rest
    /// of the snapshot, and does not take away that policy's last version.
    #[test]
    fn an_unreadable_policy_in_a_snapshot_is_skipped_and_its_last_version_kept() {
        let policy = |name: &str, port: u16| {
            let yaml = format!(
                "apiVersion: meshguard.io/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  ingress:\n  - action: Deny\n    from: [{{serviceAccount: web}}]\n    ports: [{{protocol: TCP, port: {port}}}]\n"
            );
            MeshPolicy::from_yaml(&yaml).unwrap()
        };
        let mut view = ClusterView::default();
        view.policies.insert("shop/deny".into(), policy("deny", 22));
        let mut snap = snapshot_to_proto(&ClusterView::default());
        snap.policies = vec![
            policy_to_proto(&policy("deny", 23)),
            policy_to_proto(&policy("other", 80)),
            proto::Policy { namespace: "shop".into(), name: "future".into(), json: "{\"spec\": {\"newField\": 1}}".into() },
        ];
        let mut unreadable_deny = policy_to_proto(&policy("deny", 23));
        unreadable_deny.json = "{\"spec\": {\"ingress\": 5}}".into();
        // Readable: the snapshot's version wins.
        apply_event(&mut view, event(None, Some(Event::Snapshot(snap.clone())))).unwrap();
        assert_eq!(view.policies.keys().collect::<Vec<_>>(), ["shop/deny", "shop/other"]);
        assert_eq!(view.policies["shop/deny"].spec.ingress.as_ref().unwrap()[0].ports[0].port, Some(23));
        // Unreadable: the last version stays; the rest is applied.
        snap.policies[0] = unreadable_deny;
        snap.policies[1] = policy_to_proto(&policy("other", 81));
        apply_event(&mut view, event(None, Some(Event::Snapshot(snap)))).unwrap();
        assert_eq!(view.policies["shop/deny"].spec.ingress.as_ref().unwrap()[0].ports[0].port, Some(23));
        assert_eq!(view.policies["shop/other"].spec.ingress.as_ref().unwrap()[0].ports[0].port, Some(81));
        assert!(!view.policies.contains_key("shop/future"));
    }

    fn numbers(ids: &[(&str, u32)], nodes: &[(&str, u32)]) -> proto::Numbers {
        proto::Numbers {
            identities: ids.iter().map(|(i, n)| (i.to_string(), *n)).collect(),
            node_ids: nodes.iter().map(|(i, n)| (i.to_string(), *n)).collect(),
        }
    }

    fn event(allocated: Option<proto::Numbers>, event: Option<Event>) -> proto::ClusterEvent {
        proto::ClusterEvent { revision: 1, allocated, event }
    }

    #[test]
    fn numbers_travel_in_snapshots_and_events() {
        let mut view = ClusterView { trust_domain: Some(TrustDomain::new("td").unwrap()), ..Default::default() };
        view.identities.insert(id("spiffe://td/ns/shop/sa/web"), 256);
        view.node_ids.insert("node-1".into(), 1);
        let back = snapshot_from_proto(snapshot_to_proto(&view)).unwrap();
        assert_eq!(back, view);

        // A workload and its new number arrive together.
        let w = Workload {
            name: "api".into(),
            namespace: "shop".into(),
            service_account: "api".into(),
            node: "node-1".into(),
            ips: vec![],
            labels: Default::default(),
        };
        let ev = event(Some(numbers(&[("spiffe://td/ns/shop/sa/api", 257)], &[])), Some(Event::WorkloadUpserted(workload_to_proto(&w))));
        let mut v = view.clone();
        apply_event(&mut v, ev).unwrap();
        assert_eq!(v.identities[&id("spiffe://td/ns/shop/sa/api")], 257);
        assert_eq!(v.workloads["shop/api"], w);
        // Numbers may come alone (an attested node's id).
        apply_event(&mut v, event(Some(numbers(&[], &[("node-2", 2)])), None)).unwrap();
        assert_eq!(v.node_ids["node-2"], 2);
        // An event from a registry that allocates nothing still applies.
        apply_event(&mut v, event(None, Some(Event::WorkloadDeleted("shop/api".into())))).unwrap();
        assert!(v.workloads.is_empty());
        assert_eq!(v.identities.len(), 2, "numbers outlive their workloads");
    }

    #[test]
    fn conflicting_or_reserved_numbers_are_refused_and_change_nothing() {
        let mut view = ClusterView::default();
        view.identities.insert(id("spiffe://td/ns/shop/sa/web"), 256);
        view.node_ids.insert("node-1".into(), 1);
        let before = view.clone();
        let bad = [
            numbers(&[("spiffe://td/ns/shop/sa/web", 300)], &[]), // a number changed
            numbers(&[("spiffe://td/ns/shop/sa/api", 256)], &[]), // another's number
            numbers(&[("spiffe://td/ns/shop/sa/api", 2)], &[]),   // reserved
            numbers(&[("not a spiffe id", 400)], &[]),            // garbage
            numbers(&[], &[("node-2", 1)]),                       // another node's id
            numbers(&[], &[("node-2", 0)]),                       // reserved
            numbers(&[("spiffe://td/ns/a/sa/a", 500), ("spiffe://td/ns/b/sa/b", 500)], &[]), // twice
        ];
        for n in bad {
            let ev = event(Some(n.clone()), Some(Event::NodeDeleted("node-1".into())));
            assert!(apply_event(&mut view, ev).is_err(), "{n:?}");
            assert_eq!(view, before, "{n:?}");
        }
        let snap = proto::Snapshot { numbers: Some(numbers(&[("spiffe://td/ns/a/sa/a", 5)], &[])), ..Default::default() };
        assert!(apply_event(&mut view, event(None, Some(Event::Snapshot(snap)))).is_err());
        assert_eq!(view, before);
    }
}
