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
    #[schemars(with = "Vec<String>", length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(c, size(c) <= 43 && isCIDR(c))").message("every pod CIDR must be an address/prefix"))]
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
