//! The cluster view every agent works from, and the trait its sources implement.
//!
//! A source (a shared directory today; identity-ca's registry and the
//! Kubernetes API server later) publishes this node's record and streams
//! snapshots of the whole view. Agents never care which source they run on.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use ipnet::IpNet;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::key::PublicKey;
use crate::policy::MeshPolicy;
use crate::spiffe::{SpiffeId, TrustDomain};

pub mod alloc;
pub mod crds;
pub mod file;

/// The trust domain when a source does not name one.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cluster source I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster source file {path} is invalid: {reason}")]
    Invalid { path: String, reason: String },
    #[error("cluster source is unavailable: {reason}")]
    Unavailable { reason: String },
}

/// What a node tells the cluster about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeRecord {
    pub name: String,
    /// The node's WireGuard public key.
    pub public_key: PublicKey,
    /// Where other nodes send WireGuard datagrams.
    pub endpoint: SocketAddr,
    /// Pod address ranges hosted on the node; the node's tunnel accepts only
    /// these as inner source addresses.
    pub pod_cidrs: Vec<IpNet>,
}

/// A node's record as a Kubernetes resource (cluster scoped, named after
/// the node): what [`NodeRecord`] says, published by the node's own agent
/// (the admission policy in deploy/ refuses writes from anyone else).
// Each printcolumn(...) names its own type_; clippy reads them as repeats.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "meshguard.io",
    version = "v1alpha1",
    kind = "MeshNode",
    status = "MeshNodeStatus",
    shortname = "mn",
    category = "meshguard",
    derive = "PartialEq",
    doc = "A meshguard node: its WireGuard public key, where its tunnel listens, and the pod address ranges it hosts. Written only by the agent on that node.",
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".spec.endpoint"),
    printcolumn(name = "Public Key", type_ = "string", json_path = ".spec.publicKey"),
    printcolumn(name = "Pod CIDRs", type_ = "string", json_path = ".spec.podCIDRs", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshNodeSpec {
    /// The node's WireGuard public key.
    pub public_key: PublicKey,
    /// Where other nodes send WireGuard datagrams: `address:port`, IPv6 in brackets.
    #[schemars(with = "String", length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9.]+:[0-9]+$') || (self.startsWith('[') && self.matches(']:[0-9]+$'))").message("endpoint must be address:port, IPv6 in brackets"))]
    pub endpoint: SocketAddr,
    /// Pod address ranges hosted on the node; its tunnel accepts only these
    /// as inner source addresses.
    #[serde(rename = "podCIDRs")]
    #[schemars(with = "Vec<String>", length(max = 16), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("every pod CIDR must be an address/prefix"))]
    pub pod_cidrs: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: whether the other nodes took this record into their view.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

impl MeshNode {
    pub fn from_record(record: &NodeRecord) -> Self {
        Self::new(
            &record.name,
            MeshNodeSpec { public_key: record.public_key, endpoint: record.endpoint, pod_cidrs: record.pod_cidrs.clone() },
        )
    }

    /// The record, named after the resource.
    pub fn record(&self) -> Result<NodeRecord, String> {
        let name = self.metadata.name.clone().ok_or("metadata.name is missing")?;
        Ok(NodeRecord { name, public_key: self.spec.public_key, endpoint: self.spec.endpoint, pod_cidrs: self.spec.pod_cidrs.clone() })
    }
}

// One allocated number as a Kubernetes resource (cluster scoped). On
// Kubernetes identity-ca allocates the numbers, as it does standalone, and
// writes these; the agents read them, so every node keys its maps alike.
// Names are the numbers, so the API server itself refuses a number given
// twice; a number's meaning never changes (the CRD refuses an update), and
// it is never reused.
/// What the number in the name stands for: exactly one of `spiffeId` and `node`.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "meshguard.io",
    version = "v1alpha1",
    kind = "MeshIdentity",
    plural = "meshidentities",
    shortname = "mid",
    category = "meshguard",
    derive = "PartialEq",
    doc = "A number the meshguard datapath keys its maps by, and the workload identity (name <number>) or node (name node-<number>) it stands for. Written only by identity-ca.",
    printcolumn(name = "SPIFFE ID", type_ = "string", json_path = ".spec.spiffeId"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("has(self.spiffeId) != has(self.node)").message("give spiffeId (a workload identity) or node, not both"),
    validation = Rule::new("self == oldSelf").message("a number's meaning never changes: allocations are immutable")
)]
pub struct MeshIdentitySpec {
    /// The workload identity this number stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<SpiffeId>,
    /// The node this id stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub node: Option<String>,
}

/// What one [`MeshIdentity`] allocates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocation {
    Identity(SpiffeId, u32),
    Node(String, u32),
}

impl MeshIdentity {
    /// The resource recording numeric identity `number` for `id`.
    pub fn identity(number: u32, id: &SpiffeId) -> Self {
        Self::new(&number.to_string(), MeshIdentitySpec { spiffe_id: Some(id.clone()), node: None })
    }

    /// The resource recording node id `number` for node `node`.
    pub fn node(number: u32, node: &str) -> Self {
        Self::new(&format!("node-{number}"), MeshIdentitySpec { spiffe_id: None, node: Some(node.to_owned()) })
    }

    /// What it allocates, or why it is malformed (a name that is not the
    /// number, a number outside the range its kind is given from).
    pub fn allocation(&self) -> Result<Allocation, String> {
        let name = self.metadata.name.as_deref().ok_or("metadata.name is missing")?;
        let number = |digits: &str, first: u32| -> Result<u32, String> {
            let n: u32 = digits
                .parse()
                .ok()
                .filter(|n: &u32| n.to_string() == digits)
                .ok_or_else(|| format!("name {name:?} is not a number (or node-<number>)"))?;
            if n < first {
                return Err(format!("number {n} is reserved (numbers of this kind start at {first})"));
            }
            Ok(n)
        };
        match (&self.spec.spiffe_id, &self.spec.node, name.strip_prefix("node-")) {
            (Some(id), None, None) => Ok(Allocation::Identity(id.clone(), number(name, alloc::FIRST_IDENTITY)?)),
            (None, Some(node), Some(digits)) => {
                crate::spiffe::validate_segment(node).map_err(|_| format!("node {node:?} is not a node name"))?;
                Ok(Allocation::Node(node.clone(), number(digits, alloc::FIRST_NODE_ID)?))
            }
            (Some(_), Some(_), _) | (None, None, _) => Err("give spiffeId or node, exactly one".into()),
            (Some(_), None, Some(_)) => Err(format!("{name:?} names a node id, but the spec a SPIFFE ID")),
            (None, Some(_), None) => Err(format!("{name:?} names a workload identity, but the spec a node")),
        }
    }
}

/// A workload (pod) and where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A pod on this node as its network was set up (by the CNI plugin, or the
/// simulated cluster): what the node agent needs to enforce policy on the
/// pod's host-side interface. Node-local; written to the agent's endpoints
/// directory as `<namespace>_<name>.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalEndpoint {
    pub namespace: String,
    pub name: String,
    /// The host-side interface of the pod's veth.
    pub interface: String,
    /// The pod's MAC address (`aa:bb:cc:dd:ee:ff`), for anti-spoofing.
    pub mac: String,
    pub ips: Vec<IpAddr>,
}

impl LocalEndpoint {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn file_name(&self) -> String {
        format!("{}_{}.yaml", self.namespace, self.name)
    }

    /// The MAC as bytes, or `None` if it is not six hex pairs.
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        let mut out = [0u8; 6];
        let mut parts = self.mac.split(':');
        for b in &mut out {
            *b = u8::from_str_radix(parts.next()?, 16).ok()?;
        }
        parts.next().is_none().then_some(out)
    }
}

/// A snapshot of everything the agents need to know about the cluster.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<TrustDomain>,
    /// By node name.
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeRecord>,
    /// By `<namespace>/<name>`.
    #[serde(default)]
    pub workloads: BTreeMap<String, Workload>,
    /// By `<namespace>/<name>`.
    #[serde(default)]
    pub policies: BTreeMap<String, MeshPolicy>,
    /// Numeric identities for the datapath, allocated by the source:
    /// identical on every node, stable across restarts, never reused.
    #[serde(default)]
    pub identities: BTreeMap<SpiffeId, u32>,
    /// Numeric node ids (the auth map's "remote node"), allocated the same way.
    #[serde(default)]
    pub node_ids: BTreeMap<String, u32>,
}

/// Where the cluster view comes from.
pub trait ClusterSource: Send + Sync {
    /// Announces (or updates) this node's record.
    fn publish_node<'a>(&'a self, node: &'a NodeRecord) -> BoxFuture<'a, Result<(), SourceError>>;

    /// Snapshots of the view; the receiver holds the latest one and is marked
    /// changed on every update.
    fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>>;

    /// Objects the source has refused into the view so far, by kind (each
    /// is also logged as it is refused); for the agents' metrics.
    fn refusals(&self) -> Arc<Refusals> {
        Arc::default()
    }
}

/// Counts of objects a source refused, by kind (`MeshPolicy`, `MeshNode`, ...).
#[derive(Debug, Default)]
pub struct Refusals(std::sync::Mutex<BTreeMap<&'static str, u64>>);

impl Refusals {
    pub fn count(&self, kind: &'static str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(kind).or_default() += 1;
    }

    pub fn get(&self, kind: &str) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(kind).copied().unwrap_or(0)
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

// === impl Workload ===

impl Workload {
    /// `<namespace>/<name>`, the pod address users type.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn spiffe_id(&self, td: &TrustDomain) -> Result<SpiffeId, crate::spiffe::SpiffeIdError> {
        td.workload_id(&self.namespace, &self.service_account)
    }
}

// === impl ClusterView ===

impl ClusterView {
    /// The trust domain, or the conventional `cluster.local` when the source names none.
    pub fn trust_domain_or_default(&self) -> TrustDomain {
        self.trust_domain.clone().unwrap_or_else(|| TrustDomain::new(DEFAULT_TRUST_DOMAIN).expect("valid constant"))
    }

    /// The SPIFFE ID of every workload, in key order.
    pub fn workload_ids(&self) -> impl Iterator<Item = (&Workload, Option<SpiffeId>)> + '_ {
        let td = self.trust_domain_or_default();
        self.workloads.values().map(move |w| (w, w.spiffe_id(&td).ok()))
    }

    /// Every node but `local`, in name order.
    pub fn peers_of<'a>(&'a self, local: &'a str) -> impl Iterator<Item = &'a NodeRecord> + 'a {
        self.nodes.values().filter(move |n| n.name != local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn a_mesh_identity_says_what_its_number_stands_for() {
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(MeshIdentity::identity(256, &web).allocation(), Ok(Allocation::Identity(web.clone(), 256)));
        assert_eq!(MeshIdentity::node(3, "node-1").allocation(), Ok(Allocation::Node("node-1".into(), 3)));
        let named = |name: &str, spec: MeshIdentitySpec| MeshIdentity::new(name, spec).allocation();
        let spec_id = MeshIdentitySpec { spiffe_id: Some(web.clone()), node: None };
        let spec_node = MeshIdentitySpec { spiffe_id: None, node: Some("node-1".into()) };
        for (name, spec, why) in [
            ("0256", spec_id.clone(), "not a number"),
            ("+256", spec_id.clone(), "not a number"),
            ("web", spec_id.clone(), "not a number"),
            ("2", spec_id.clone(), "reserved"),
            ("4294967296", spec_id.clone(), "not a number"),
            ("node-0", spec_node.clone(), "reserved"),
            ("node-x", spec_node.clone(), "not a number"),
            ("node-3", spec_id.clone(), "names a node id"),
            ("300", spec_node.clone(), "names a workload identity"),
            ("300", MeshIdentitySpec { spiffe_id: Some(web.clone()), node: Some("n".into()) }, "exactly one"),
            ("node-4", MeshIdentitySpec { spiffe_id: None, node: Some("a/b".into()) }, "not a node name"),
        ] {
            let err = named(name, spec).unwrap_err();
            assert!(err.contains(why), "{name}: {err}");
        }
    }

    /// The CRD's own rules: exactly one meaning, and never a new one.
    #[test]
    fn the_mesh_identity_crd_refuses_a_changed_meaning() {
        let crd = <MeshIdentity as kube::CustomResourceExt>::crd();
        let schema = serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        let v = kube::core::cel::Validator::new();
        let obj = |spec: serde_json::Value| serde_json::json!({"apiVersion": "meshguard.io/v1alpha1", "kind": "MeshIdentity", "metadata": {"name": "256"}, "spec": spec});
        let web = obj(serde_json::json!({"spiffeId": "spiffe://cluster.local/ns/shop/sa/web"}));
        let db = obj(serde_json::json!({"spiffeId": "spiffe://cluster.local/ns/shop/sa/db"}));
        assert!(v.validate(&schema, &web, None).is_ok());
        assert!(v.validate(&schema, &web, Some(&web)).is_ok(), "an unchanged update");
        assert!(v.validate(&schema, &db, Some(&web)).is_err(), "256 cannot come to mean another identity");
        assert!(v.validate(&schema, &obj(serde_json::json!({})), None).is_err(), "no meaning");
        let both = obj(serde_json::json!({"spiffeId": "spiffe://cluster.local/ns/shop/sa/web", "node": "node-1"}));
        assert!(v.validate(&schema, &both, None).is_err(), "two meanings");
    }
}
