//! What Kubernetes objects mean to the mesh: a Pod is a workload (or not),
//! a Node bounds the pod ranges its MeshNode may claim.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod};
use meshguard_common::cluster::{NodeRecord, Workload};

/// What the cluster view should hold for `pod`: `None` when the pod has no
/// workload identity (not scheduled yet, finished, on the host network,
/// where it shares the node's addresses, or a kubelet's mirror pod).
pub fn workload_of(pod: &Pod) -> Option<Workload> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    if spec.host_network == Some(true) {
        return None;
    }
    // A mirror (static) pod is created by its node's kubelet, which could
    // name any namespace: it gets no identity, or a compromised node could
    // mint SVIDs for `default` accounts everywhere. Such pods (and any pod
    // without a service account) name none, so none is assumed.
    if pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("kubernetes.io/config.mirror")) {
        return None;
    }
    let service_account = spec.service_account_name.clone().filter(|s| !s.is_empty())?;
    let status = pod.status.as_ref();
    if status.and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed") {
        return None;
    }
    let ips =
        status.and_then(|s| s.pod_ips.as_ref()).map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect()).unwrap_or_default();
    Some(Workload {
        name: pod.metadata.name.clone()?,
        namespace: pod.metadata.namespace.clone()?,
        service_account,
        node,
        ips,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
    })
}

/// What a node agent learns from its own Node object when its
/// configuration leaves them out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// `spec.podCIDRs` (the ranges the cluster gave the node's pods).
    pub pod_cidrs: Vec<IpNet>,
    /// The `InternalIP` addresses, in the order the Node lists them.
    pub internal_ips: Vec<IpAddr>,
}

impl NodeFacts {
    pub fn of(node: &Node) -> Self {
        let pod_cidrs = node
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidrs.clone().or_else(|| s.pod_cidr.clone().map(|c| vec![c])))
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.parse::<IpNet>().ok().map(|n| n.trunc()))
            .collect();
        let internal_ips = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(|a| a.iter().filter(|a| a.type_ == "InternalIP").filter_map(|a| a.address.parse().ok()).collect())
            .unwrap_or_default();
        Self { pod_cidrs, internal_ips }
    }

    /// Reads node `name`.
    pub async fn fetch(client: &kube::Client, name: &str) -> Result<Self, crate::Error> {
        let api: kube::Api<Node> = kube::Api::all(client.clone());
        Ok(Self::of(&api.get(name).await?))
    }
}

/// Whether `record` may be taken into the view beside its Node: a node's
/// tunnel accepts its pod CIDRs as inner sources, so a MeshNode claiming
/// a range the cluster gave another node would let that node's agent
/// speak for the other's pods. The admission policy keeps each agent to
/// its own MeshNode; this keeps the MeshNode to its own Node's ranges.
/// `node`: the Node's pod CIDRs, `None` when there is no such Node. A Node
/// without pod CIDRs (a CNI that allocates elsewhere) bounds nothing.
pub fn check_against_node(record: &NodeRecord, node: Option<&[IpNet]>) -> Result<(), String> {
    let Some(allowed) = node else {
        return Err(format!("there is no Node {:?}: a MeshNode stands for a node of the cluster", record.name));
    };
    if allowed.is_empty() {
        return Ok(());
    }
    match record.pod_cidrs.iter().find(|c| !allowed.iter().any(|a| a.contains(*c))) {
        Some(c) => Err(format!("pod CIDR {c} is outside Node {:?}'s spec.podCIDRs {allowed:?}", record.name)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn only_scheduled_running_pod_network_pods_are_workloads() {
        let base = serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "web", "containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}]}
        });
        let w = workload_of(&pod(base.clone())).unwrap();
        assert_eq!((w.key().as_str(), w.service_account.as_str(), w.node.as_str(), w.ips.len()), ("shop/web-1", "web", "node-1", 2));
        assert_eq!(w.labels["app"], "web");
        let mut unscheduled = base.clone();
        unscheduled["spec"]["nodeName"] = serde_json::Value::Null;
        assert_eq!(workload_of(&pod(unscheduled)), None);
        let mut done = base.clone();
        done["status"]["phase"] = "Succeeded".into();
        assert_eq!(workload_of(&pod(done)), None);
        let mut host = base.clone();
        host["spec"]["hostNetwork"] = true.into();
        assert_eq!(workload_of(&pod(host)), None);
        let mut no_sa = base.clone();
        no_sa["spec"]["serviceAccountName"] = serde_json::Value::Null;
        assert_eq!(workload_of(&pod(no_sa)), None);
        // A kubelet's mirror pod, in someone else's namespace: no identity.
        let mut mirror = base;
        mirror["metadata"]["annotations"] = serde_json::json!({"kubernetes.io/config.mirror": "abc"});
        assert_eq!(workload_of(&pod(mirror)), None);
    }

    #[test]
    fn node_facts_and_the_ranges_a_mesh_node_may_claim() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node-1"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-1"},
                {"type": "InternalIP", "address": "192.168.7.1"},
                {"type": "ExternalIP", "address": "203.0.113.9"}
            ]}
        }))
        .unwrap();
        let facts = NodeFacts::of(&node);
        assert_eq!(facts.pod_cidrs, vec!["10.244.1.0/24".parse::<IpNet>().unwrap(), "fd00:1::/64".parse().unwrap()]);
        assert_eq!(facts.internal_ips, vec!["192.168.7.1".parse::<IpAddr>().unwrap()]);

        let record = |cidrs: &[&str]| NodeRecord {
            name: "node-1".into(),
            public_key: meshguard_common::key::PublicKey([7; 32]),
            endpoint: "192.168.7.1:51820".parse().unwrap(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        };
        assert!(check_against_node(&record(&["10.244.1.0/24"]), Some(&facts.pod_cidrs)).is_ok());
        assert!(check_against_node(&record(&["10.244.1.128/25"]), Some(&facts.pod_cidrs)).is_ok(), "a part of its range");
        let err = check_against_node(&record(&["10.244.1.0/24", "10.244.2.0/24"]), Some(&facts.pod_cidrs)).unwrap_err();
        assert!(err.contains("10.244.2.0/24"), "{err}");
        assert!(check_against_node(&record(&["10.244.0.0/16"]), Some(&facts.pod_cidrs)).is_err(), "a range wider than its own");
        assert!(check_against_node(&record(&["10.244.1.0/24"]), None).unwrap_err().contains("no Node"));
        assert!(check_against_node(&record(&["10.9.0.0/24"]), Some(&[])).is_ok(), "a Node without pod CIDRs bounds nothing");
    }
}
