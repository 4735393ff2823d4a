//! Conversions between the cluster view's types and their protobufs.
//! Everything that comes off the wire is validated here.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::RegistryError;
use super::proto::{self, cluster_event::Event};
use crate::cluster::{ClusterView, NodeRecord, Workload};
use crate::key::PublicKey;
use crate::policy::MeshPolicy;
use crate::spiffe::{TrustDomain, validate_segment};

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
    let pod_cidrs = n
        .pod_cidrs
        .iter()
        .map(|c| c.parse::<IpNet>().map_err(|e| invalid("node pod CIDR", e)))
        .collect::<Result<_, _>>()?;
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
    let ips = w
        .ips
        .iter()
        .map(|ip| ip.parse::<IpAddr>().map_err(|e| invalid("workload IP", e)))
        .collect::<Result<_, _>>()?;
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
    proto::Policy {
        namespace: p.metadata.namespace.clone(),
        name: p.metadata.name.clone(),
        json: serde_json::to_string(p).unwrap_or_default(),
    }
}

pub fn policy_from_proto(p: proto::Policy) -> Result<MeshPolicy, RegistryError> {
    let policy: MeshPolicy = serde_json::from_str(&p.json).map_err(|e| invalid("policy", e))?;
    policy.validate().map_err(|e| invalid("policy", e))?;
    Ok(policy)
}

pub fn snapshot_from_proto(s: proto::Snapshot) -> Result<ClusterView, RegistryError> {
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
        let p = policy_from_proto(p)?;
        view.policies.insert(p.key(), p);
    }
    Ok(view)
}

pub fn snapshot_to_proto(view: &ClusterView) -> proto::Snapshot {
    proto::Snapshot {
        trust_domain: view.trust_domain.as_ref().map(|t| t.to_string()).unwrap_or_default(),
        nodes: view.nodes.values().map(node_to_proto).collect(),
        workloads: view.workloads.values().map(workload_to_proto).collect(),
        policies: view.policies.values().map(policy_to_proto).collect(),
    }
}

/// Applies one watch event to `view`. An invalid event leaves `view` as it was.
pub fn apply_event(view: &mut ClusterView, event: proto::ClusterEvent) -> Result<(), RegistryError> {
    match event.event {
        None => {}
        Some(Event::Snapshot(s)) => *view = snapshot_from_proto(s)?,
        Some(Event::NodeUpserted(n)) => {
            let n = node_from_proto(n)?;
            view.nodes.insert(n.name.clone(), n);
        }
        Some(Event::NodeDeleted(name)) => {
            view.nodes.remove(&name);
        }
        Some(Event::WorkloadUpserted(w)) => {
            let w = workload_from_proto(w)?;
            view.workloads.insert(w.key(), w);
        }
        Some(Event::WorkloadDeleted(key)) => {
            view.workloads.remove(&key);
        }
        Some(Event::PolicyUpserted(p)) => {
            let p = policy_from_proto(p)?;
            view.policies.insert(p.key(), p);
        }
        Some(Event::PolicyDeleted(key)) => {
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
}
