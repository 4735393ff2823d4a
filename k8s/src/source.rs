//! The cluster view from the Kubernetes API server: kube-runtime watchers
//! on Pods, Nodes, MeshPolicies, MeshNodes and MeshIdentities, folded into
//! the same [`ClusterView`] identity-ca's registry streams.
//!
//! Each watcher lists then watches; it re-lists by itself after a 410 Gone
//! or an API server restart. A re-list is gathered aside and replaces the
//! kind's objects only when complete (`InitDone`), so the view never shows
//! a half-listed kind, and what was deleted while the watch was down is
//! gone after it. Nothing is published before every kind has been listed
//! once: an agent on a partial view would drop what it should pass.
//!
//! The custom resources are watched untyped and parsed one by one: one
//! malformed object (past the CRD's rules, or from another version) is
//! logged, counted and skipped, and never stops the others from decoding.
//! An invalid change to a policy or node keeps its last valid version, as
//! identity-ca does (which reports the verdict in the policy's status):
//! taking a policy away could open what it closed. An invalid policy never
//! seen valid is enforced closed (`stand_in`). A pod's addresses count only
//! inside its node's accepted pod CIDRs and when no other pod claims them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt as _;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use meshguard_common::cluster::{
    Allocation, BoxFuture, ClusterSource, ClusterView, MeshIdentity, MeshNode, NodeRecord, Refusals, SourceError, Workload,
};
use meshguard_common::policy::MeshPolicy;
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use crate::objects::{NodeFacts, check_against_node, workload_of};

/// The field manager the agents write their MeshNode as.
pub const FIELD_MANAGER: &str = "meshguard-agent";

/// The cluster source on Kubernetes.
pub struct KubeSource {
    client: kube::Client,
    /// The node this agent publishes (set by `publish_node`): the one whose
    /// MeshNode status it writes.
    local: Arc<std::sync::Mutex<Option<String>>>,
    rx: watch::Receiver<Arc<ClusterView>>,
    refused: Arc<Refusals>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// One kind's change, as its watcher saw it.
enum Op<T> {
    /// A (re)list begins.
    Init,
    /// An object of the list.
    Listed(String, T),
    /// An invalid object of the list: its last valid version stays, or
    /// without one the stand-in (a policy's: see `stand_in`).
    KeepListed(String, Option<T>),
    /// An invalid change: the same, outside a list.
    Keep(String, Option<T>),
    /// The list is complete: it replaces what the kind held.
    InitDone,
    Apply(String, T),
    Delete(String),
}

enum Msg {
    Pods(Op<Workload>),
    Nodes(Op<Vec<IpNet>>),
    Policies(Op<Box<MeshPolicy>>),
    /// With the object's `metadata.generation`, for its status.
    MeshNodes(Op<(NodeRecord, Option<i64>)>),
    Identities(Op<Allocation>),
}

/// What a watcher makes of one object.
enum Verdict<T> {
    Item(T),
    /// Not part of the view (a pod without identity): as if deleted.
    Absent,
    /// With what stands in for it when no valid version was seen.
    Invalid(String, Option<T>),
}

/// One kind's objects: the live ones, and a re-list being gathered.
struct Table<T> {
    live: BTreeMap<String, T>,
    relist: Option<BTreeMap<String, T>>,
    synced: bool,
}

// === impl KubeSource ===

impl KubeSource {
    /// Starts the watchers (inside a tokio runtime). The view starts empty
    /// and is first published once every kind has been listed.
    pub fn start(client: kube::Client, trust_domain: TrustDomain) -> Self {
        let (tx, rx) = watch::channel(Arc::new(ClusterView::default()));
        let (msgs, inbox) = mpsc::unbounded_channel();
        let refused = Arc::new(Refusals::default());
        let mut tasks = Vec::new();
        let typed = |c: &kube::Client| kube::Api::<Pod>::all(c.clone());
        tasks.push(tokio::spawn(follow(typed(&client), "Pod", msgs.clone(), Msg::Pods, |pod: &Pod| {
            workload_of(pod).map_or(Verdict::Absent, Verdict::Item)
        })));
        tasks.push(tokio::spawn(follow(kube::Api::<Node>::all(client.clone()), "Node", msgs.clone(), Msg::Nodes, |n: &Node| {
            Verdict::Item(NodeFacts::of(n).pod_cidrs)
        })));
        let r = refused.clone();
        tasks.push(tokio::spawn(follow(untyped::<MeshPolicy>(&client), "MeshPolicy", msgs.clone(), Msg::Policies, move |o| {
            counted(&r, "MeshPolicy", parse_policy(o))
        })));
        let r = refused.clone();
        tasks.push(tokio::spawn(follow(untyped::<MeshNode>(&client), "MeshNode", msgs.clone(), Msg::MeshNodes, move |o| {
            let generation = o.metadata.generation;
            counted(
                &r,
                "MeshNode",
                parse::<MeshNode>(o)
                    .and_then(|n| n.record())
                    .map_or_else(|e| Verdict::Invalid(e, None), |n| Verdict::Item((n, generation))),
            )
        })));
        let r = refused.clone();
        tasks.push(tokio::spawn(follow(untyped::<MeshIdentity>(&client), "MeshIdentity", msgs, Msg::Identities, move |o| {
            counted(
                &r,
                "MeshIdentity",
                parse::<MeshIdentity>(o).and_then(|i| i.allocation()).map_or_else(|e| Verdict::Invalid(e, None), Verdict::Item),
            )
        })));
        let local = Arc::new(std::sync::Mutex::new(None));
        let status = Status { client: client.clone(), local: local.clone(), reported: Arc::default() };
        tasks.push(tokio::spawn(build(inbox, tx, trust_domain, refused.clone(), status)));
        Self { client, local, rx, refused, tasks }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

impl ClusterSource for KubeSource {
    /// Creates or updates this node's MeshNode. The admission policy in
    /// deploy/ lets an agent write only the MeshNode of the node its token
    /// is bound to.
    fn publish_node<'a>(&'a self, node: &'a NodeRecord) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            *self.local.lock().unwrap_or_else(|e| e.into_inner()) = Some(node.name.clone());
            publish(&self.client, node).await.map_err(|e| SourceError::Unavailable { reason: format!("MeshNode {}: {e}", node.name) })
        })
    }

    fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.rx.clone()
    }

    fn refusals(&self) -> Arc<Refusals> {
        self.refused.clone()
    }
}

fn untyped<K: kube::Resource<DynamicType = ()>>(client: &kube::Client) -> kube::Api<DynamicObject> {
    kube::Api::all_with(client.clone(), &ApiResource::erase::<K>(&()))
}

fn parse<K: DeserializeOwned>(obj: &DynamicObject) -> Result<K, String> {
    serde_json::to_value(obj).and_then(serde_json::from_value).map_err(|e| e.to_string())
}

fn parse_policy(obj: &DynamicObject) -> Verdict<Box<MeshPolicy>> {
    let (Some(namespace), Some(name)) = (obj.metadata.namespace.as_deref(), obj.metadata.name.as_deref()) else {
        return Verdict::Invalid("metadata.namespace or .name is missing".into(), None);
    };
    let parsed = serde_json::to_string(obj).map_err(|e| e.to_string()).and_then(|t| MeshPolicy::from_json(&t).map_err(|e| e.to_string()));
    match parsed {
        // What enforcement reads, as identity-ca's registry stores it:
        // status and server-set metadata would only churn the view.
        Ok(p) => {
            let mut stored = MeshPolicy::named(namespace, name, p.spec);
            stored.metadata.labels = p.metadata.labels;
            Verdict::Item(Box::new(stored))
        }
        Err(reason) => Verdict::Invalid(reason, Some(Box::new(stand_in(obj, namespace, name)))),
    }
}

/// What enforces an invalid policy no valid version of which this agent
/// has seen (it started after the bad edit, or the policy was born bad):
/// the pods it selects closed in the directions it names. Its author meant
/// to restrict them; enforcing nothing would open them. A selector that
/// cannot be read selects every pod of the namespace.
fn stand_in(obj: &DynamicObject, namespace: &str, name: &str) -> MeshPolicy {
    let spec = obj.data.get("spec");
    let selector = spec
        .and_then(|s| s.get("selector"))
        .map_or(Some(Default::default()), |v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    let has = |k: &str| spec.is_some_and(|s| s.get(k).is_some());
    // NetworkPolicy's defaults: ingress unless only egress is named.
    let (ingress, egress) = (has("ingress") || !has("egress"), has("egress"));
    MeshPolicy::named(
        namespace,
        name,
        meshguard_common::policy::MeshPolicySpec { selector, ingress: ingress.then(Vec::new), egress: egress.then(Vec::new) },
    )
}

fn counted<T>(refused: &Refusals, kind: &'static str, v: Verdict<T>) -> Verdict<T> {
    if matches!(v, Verdict::Invalid(..)) {
        refused.count(kind);
    }
    v
}

fn key_of<K: kube::Resource>(obj: &K) -> Option<String> {
    let meta = obj.meta();
    let name = meta.name.as_deref()?;
    Some(match meta.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    })
}

/// Follows one kind until the source is dropped; the watcher retries with
/// backoff and re-lists after a 410 Gone.
async fn follow<K, T>(
    api: kube::Api<K>,
    kind: &'static str,
    msgs: mpsc::UnboundedSender<Msg>,
    wrap: fn(Op<T>) -> Msg,
    judge: impl Fn(&K) -> Verdict<T> + Send + 'static,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        let op = match event {
            Ok(Event::Init) => Op::Init,
            Ok(Event::InitDone) => Op::InitDone,
            Ok(Event::InitApply(obj)) => {
                let Some(key) = key_of(&obj) else { continue };
                match judge(&obj) {
                    Verdict::Item(v) => Op::Listed(key, v),
                    Verdict::Absent => continue,
                    Verdict::Invalid(reason, fallback) => {
                        tracing::warn!(kind, object = %key, %reason, "skipping an invalid object; its last valid version, if any, stays");
                        Op::KeepListed(key, fallback)
                    }
                }
            }
            Ok(Event::Apply(obj)) => {
                let Some(key) = key_of(&obj) else { continue };
                match judge(&obj) {
                    Verdict::Item(v) => Op::Apply(key, v),
                    Verdict::Absent => Op::Delete(key),
                    Verdict::Invalid(reason, fallback) => {
                        tracing::warn!(kind, object = %key, %reason, "skipping an invalid object; its last valid version, if any, stays");
                        Op::Keep(key, fallback)
                    }
                }
            }
            Ok(Event::Delete(obj)) => match key_of(&obj) {
                Some(key) => Op::Delete(key),
                None => continue,
            },
            // The watcher re-lists by itself; until then the view keeps
            // what it knew.
            Err(error) => {
                tracing::warn!(kind, %error, "watch failed; retrying");
                continue;
            }
        };
        if msgs.send(wrap(op)).is_err() {
            return;
        }
    }
}

/// Folds the watchers' changes into views, one per burst.
async fn build(
    mut inbox: mpsc::UnboundedReceiver<Msg>,
    tx: watch::Sender<Arc<ClusterView>>,
    td: TrustDomain,
    refused: Arc<Refusals>,
    mut status: Status,
) {
    let mut pods = Table::new();
    let mut nodes = Table::new();
    let mut policies = Table::new();
    let mut mesh_nodes = Table::new();
    let mut identities = Table::new();
    let mut refused_nodes: BTreeMap<String, String> = BTreeMap::new();
    let mut refused_ips: BTreeMap<(String, std::net::IpAddr), String> = BTreeMap::new();
    while let Some(first) = inbox.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Pods(op) => pods.apply(op),
                Msg::Nodes(op) => nodes.apply(op),
                Msg::Policies(op) => policies.apply(op),
                Msg::MeshNodes(op) => mesh_nodes.apply(op),
                Msg::Identities(op) => identities.apply(op),
            }
            next = inbox.try_recv().ok();
        }
        if !(pods.synced && nodes.synced && policies.synced && mesh_nodes.synced && identities.synced) {
            continue;
        }
        let mut view = ClusterView { trust_domain: Some(td.clone()), ..Default::default() };
        let mut now_refused = BTreeMap::new();
        for (name, (record, _)) in &mesh_nodes.live {
            match check_against_node(record, nodes.live.get(name).map(Vec::as_slice)) {
                Ok(()) => {
                    view.nodes.insert(name.clone(), record.clone());
                }
                Err(reason) => {
                    now_refused.insert(name.clone(), reason);
                }
            }
        }
        for (name, reason) in &now_refused {
            if refused_nodes.get(name) != Some(reason) {
                tracing::warn!(kind = "MeshNode", object = %name, %reason, "MeshNode refused: the node gets no tunnel");
                refused.count("MeshNode");
            }
        }
        status.report(&mesh_nodes.live, &now_refused);
        refused_nodes = now_refused;
        let (workloads, now_refused) = workloads_in_their_ranges(&pods.live, &view.nodes);
        for ((pod, ip), reason) in &now_refused {
            if refused_ips.get(&(pod.clone(), *ip)) != Some(reason) {
                tracing::warn!(kind = "Pod", object = %pod, %ip, %reason, "pod address refused: no identity is given to it");
                refused.count("Pod");
            }
        }
        refused_ips = now_refused;
        view.workloads = workloads;
        view.policies = policies.live.iter().map(|(k, p)| (k.clone(), MeshPolicy::clone(p))).collect();
        let mut ids: BTreeMap<SpiffeId, BTreeSet<u32>> = BTreeMap::new();
        let mut node_ids: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for a in identities.live.values() {
            match a {
                Allocation::Identity(id, n) => ids.entry(id.clone()).or_default().insert(*n),
                Allocation::Node(name, n) => node_ids.entry(name.clone()).or_default().insert(*n),
            };
        }
        // identity-ca allocates each once; two numbers for one meaning is
        // damage. Every node picks the lowest alike, so they stay agreed.
        view.identities = ids.into_iter().map(|(id, ns)| (id, *ns.first().expect("non-empty"))).collect();
        view.node_ids = node_ids.into_iter().map(|(n, ns)| (n, *ns.first().expect("non-empty"))).collect();
        tx.send_if_modified(|v| {
            if **v != view {
                *v = Arc::new(view);
                true
            } else {
                false
            }
        });
    }
}

/// The workloads with only the addresses they can own: inside the pod
/// CIDRs of their node's accepted MeshNode, and claimed by no other pod. A
/// pod's IPs come from its status, which its node's kubelet writes: a
/// compromised node must not give another node's pod address (and with it
/// that pod's traffic) an identity of its choosing.
fn workloads_in_their_ranges(
    pods: &BTreeMap<String, Workload>,
    nodes: &BTreeMap<String, NodeRecord>,
) -> (BTreeMap<String, Workload>, BTreeMap<(String, std::net::IpAddr), String>) {
    let mut refused = BTreeMap::new();
    let mut owners: BTreeMap<std::net::IpAddr, Vec<String>> = BTreeMap::new();
    for w in pods.values() {
        for ip in &w.ips {
            owners.entry(*ip).or_default().push(w.key());
        }
    }
    let workloads = pods
        .values()
        .map(|w| {
            let (key, node) = (w.key(), nodes.get(&w.node));
            let mut w = w.clone();
            w.ips.retain(|ip| {
                let inside = node.is_some_and(|n| n.pod_cidrs.iter().any(|c| c.contains(ip)));
                let reason = if !inside {
                    "outside the pod CIDRs of its node's accepted MeshNode".to_owned()
                } else if owners[ip].len() > 1 {
                    format!("claimed by {} pods: {}", owners[ip].len(), owners[ip].join(", "))
                } else {
                    return true;
                };
                refused.insert((key.clone(), *ip), reason);
                false
            });
            (key, w)
        })
        .collect();
    (workloads, refused)
}

/// Writes this node's verdict into its own MeshNode's status (the
/// admission policy lets an agent write only its own): every agent judges
/// every MeshNode alike, so its own agent speaks for all of them.
struct Status {
    client: kube::Client,
    local: Arc<std::sync::Mutex<Option<String>>>,
    /// The verdict written last, with the generation it was for; cleared
    /// when the write fails, so the next view tries again.
    reported: Arc<std::sync::Mutex<Option<Verdicted>>>,
}

type Verdicted = (Option<i64>, Result<(), String>);

impl Status {
    fn report(&mut self, live: &BTreeMap<String, (NodeRecord, Option<i64>)>, refused: &BTreeMap<String, String>) {
        let Some(name) = self.local.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let Some((_, generation)) = live.get(&name) else { return };
        let verdict = refused.get(&name).map_or(Ok(()), |reason| Err(reason.clone()));
        let now = (*generation, verdict);
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        if reported.as_ref() == Some(&now) {
            return;
        }
        let (status, reason, message) = match &now.1 {
            Ok(()) => ("True", "Accepted", "in every node's view: tunnels to this node are up".to_owned()),
            Err(why) => ("False", "Refused", format!("no node takes this record: {why}")),
        };
        let condition = k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Accepted".into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: *generation,
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
        };
        let patch = serde_json::json!({"status": {"observedGeneration": generation, "conditions": [condition]}});
        let api: kube::Api<DynamicObject> = untyped::<MeshNode>(&self.client);
        let shared = self.reported.clone();
        *reported = Some(now.clone());
        tokio::spawn(async move {
            let pp = kube::api::PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            if let Err(error) = api.patch_status(&name, &pp, &kube::api::Patch::Merge(&patch)).await {
                tracing::warn!(node = %name, %error, "cannot write this node's MeshNode status");
                let mut reported = shared.lock().unwrap_or_else(|e| e.into_inner());
                if reported.as_ref() == Some(&now) {
                    *reported = None;
                }
            }
        });
    }
}

// === impl Table ===

impl<T: Clone> Table<T> {
    fn new() -> Self {
        Self { live: BTreeMap::new(), relist: None, synced: false }
    }

    fn apply(&mut self, op: Op<T>) {
        match op {
            Op::Init => self.relist = Some(BTreeMap::new()),
            Op::Listed(key, v) => {
                self.relist.get_or_insert_with(BTreeMap::new).insert(key, v);
            }
            Op::KeepListed(key, fallback) => {
                if let Some(v) = self.live.get(&key).cloned().or(fallback) {
                    self.relist.get_or_insert_with(BTreeMap::new).insert(key, v);
                }
            }
            Op::Keep(key, fallback) => {
                if let (false, Some(v)) = (self.live.contains_key(&key), fallback) {
                    self.live.insert(key, v);
                }
            }
            Op::InitDone => {
                self.live = self.relist.take().unwrap_or_default();
                self.synced = true;
            }
            Op::Apply(key, v) => {
                self.live.insert(key, v);
            }
            Op::Delete(key) => {
                self.live.remove(&key);
            }
        }
    }
}

/// Creates or updates `node`'s MeshNode: read, then create or replace with
/// the read version (a concurrent writer makes the write fail with 409 and
/// it is tried again).
async fn publish(client: &kube::Client, node: &NodeRecord) -> Result<(), crate::Error> {
    let api: kube::Api<DynamicObject> = untyped::<MeshNode>(client);
    let want = MeshNode::from_record(node);
    let body = |rv: Option<String>| -> Result<DynamicObject, crate::Error> {
        let mut obj: DynamicObject =
            serde_json::to_value(&want).and_then(serde_json::from_value).map_err(|e| crate::Error::Invalid(e.to_string()))?;
        obj.metadata.resource_version = rv;
        Ok(obj)
    };
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    for _ in 0..5 {
        let result = match api.get_opt(&node.name).await? {
            None => api.create(&pp, &body(None)?).await.map(drop),
            Some(current) => {
                if parse::<MeshNode>(&current).is_ok_and(|c| c.spec == want.spec) {
                    return Ok(());
                }
                api.replace(&node.name, &pp, &body(current.metadata.resource_version)?).await.map(drop)
            }
        };
        match result {
            Ok(()) => return Ok(()),
            // Someone wrote in between: read again.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(crate::Error::Invalid("MeshNode kept changing while it was written (five conflicts)".into()))
}
