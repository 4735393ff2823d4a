//! The standalone registry: nodes, workloads and policies, persisted in the
//! store, held in memory as one [`ClusterView`], and streamed to watchers as
//! a snapshot followed by one event per change.
//!
//! It also answers the CA's authorization question — does node N host a
//! workload with identity X? — from an index kept beside the view.
//!
//! And it allocates the datapath's numbers: a numeric identity for every
//! workload identity and every SPIFFE ID a policy names, a node id for every
//! node (published or attested). Numbers are stored in the same transaction
//! as the change that needs them, travel with its watch event, are never
//! reused and never change, so every watcher sees the same ones, across
//! restarts too.
//!
//! On Kubernetes the numbers already published as MeshIdentity objects are
//! what the nodes enforce; [`Registry::adopt`] takes them in before
//! anything allocates, or refuses where the registry disagrees.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use meshguard_ca_client::registry::convert;
use meshguard_ca_client::registry::proto::{self, cluster_event::Event};
use meshguard_common::cluster::alloc::{self, AllocError, Allocations, Delta};
use meshguard_common::cluster::{Allocation, ClusterView, NodeRecord, Workload};
use meshguard_common::policy::MeshPolicy;
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use tokio::sync::broadcast;

use redb::ReadableTable;

use crate::store::{self, IDENTITY_NUMBERS, META, NODE_IDS, NODES, POLICIES, Store, StoreError, WORKLOADS};

/// Events buffered per watcher before it is resynchronised with a snapshot.
pub const EVENT_BUFFER: usize = 4096;

/// The allocation counters in the store's meta table.
const NEXT_IDENTITY_KEY: &str = "next_identity";
const NEXT_NODE_ID_KEY: &str = "next_node_id";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} is invalid: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("{what} {key} does not exist")]
    NotFound { what: &'static str, key: String },
    #[error("cannot allocate a number: {0}")]
    Alloc(#[from] AllocError),
    #[error("{what} belongs to node {holder}")]
    Conflict { what: String, holder: String },
    #[error(
        "the registry's numbers disagree with {} MeshIdentity object(s) the nodes enforce (the first: {}); the objects are the source of truth: restore the identity-ca state that wrote them, or delete identity-ca's state so that it adopts them",
        .disagreements.len(),
        .disagreements.first().map(ToString::to_string).unwrap_or_default()
    )]
    Disagree { disagreements: Vec<Disagreement> },
}

/// A number the registry and the MeshIdentity objects give different
/// meanings, or a meaning they give different numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    /// The object's name (`256`, `node-1`).
    pub object: String,
    /// What the object says the number stands for.
    pub stands_for: String,
    /// What the registry says instead.
    pub registry: String,
}

pub struct Registry {
    store: Store,
    trust_domain: TrustDomain,
    state: RwLock<State>,
    events: broadcast::Sender<Arc<proto::ClusterEvent>>,
}

struct State {
    /// Without numbers: those live in `alloc` (added by `view()` and `watch()`).
    view: ClusterView,
    alloc: Allocations,
    revision: u64,
    /// (node, SPIFFE ID) → number of workloads on the node with that identity.
    hosted: BTreeMap<(String, String), usize>,
}

// === impl Registry ===

impl Registry {
    pub fn open(store: Store, trust_domain: TrustDomain) -> Result<Self, RegistryError> {
        let mut view = ClusterView { trust_domain: Some(trust_domain.clone()), ..Default::default() };
        for (k, n) in store.load_all::<NodeRecord>(NODES, "nodes")? {
            view.nodes.insert(k, n);
        }
        let mut hosted = BTreeMap::new();
        for (k, w) in store.load_all::<Workload>(WORKLOADS, "workloads")? {
            if let Ok(id) = w.spiffe_id(&trust_domain) {
                *hosted.entry((w.node.clone(), id.to_string())).or_insert(0) += 1;
            }
            view.workloads.insert(k, w);
        }
        for (k, p) in store.load_all::<MeshPolicy>(POLICIES, "policies")? {
            view.policies.insert(k, p);
        }
        let alloc = load_allocations(&store)?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let st = State { view, alloc, revision: 0, hosted };
        let registry = Self { store, trust_domain, state: RwLock::new(st), events };
        // Records stored before numbers existed (or by a crash between an
        // attestation and its node id) get theirs now.
        {
            let mut st = registry.state.write().unwrap_or_else(|e| e.into_inner());
            let (ids, nodes) = wanted(&st.view, &registry.trust_domain);
            registry.commit(&mut st, &ids, &nodes, |_| Ok(()))?;
        }
        Ok(registry)
    }

    /// Whether `node` hosts a workload whose identity is `id`.
    pub fn hosts(&self, node: &str, id: &SpiffeId) -> bool {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        st.hosted.get(&(node.to_owned(), id.to_string())).is_some_and(|n| *n > 0)
    }

    /// The whole view, numbers included.
    pub fn view(&self) -> ClusterView {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        let mut view = st.view.clone();
        view.identities = st.alloc.identities.clone();
        view.node_ids = st.alloc.nodes.clone();
        view
    }

    /// The numeric identity of `id`, if it has one.
    pub fn identity_number(&self, id: &SpiffeId) -> Option<u32> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).alloc.identities.get(id).copied()
    }

    /// The node id of `node`, if it has one.
    pub fn node_id(&self, node: &str) -> Option<u32> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).alloc.nodes.get(node).copied()
    }

    pub fn workload_count(&self) -> usize {
        self.state.read().unwrap_or_else(|e| e.into_inner()).view.workloads.len()
    }

    /// A snapshot event and a receiver of every change after it, taken
    /// together so no change falls between them.
    pub fn watch(&self) -> (proto::ClusterEvent, broadcast::Receiver<Arc<proto::ClusterEvent>>) {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        let rx = self.events.subscribe();
        let mut snapshot = convert::snapshot_to_proto(&st.view);
        snapshot.numbers = Some(convert::numbers_to_proto(&st.alloc.identities, &st.alloc.nodes));
        let snap = proto::ClusterEvent { revision: st.revision, allocated: None, event: Some(Event::Snapshot(snapshot)) };
        (snap, rx)
    }

    /// Stores a node's record. A pod CIDR overlapping another node's, or
    /// another node's WireGuard key, is refused: the node that published it
    /// first keeps it (a record taking it over would cut both nodes off, or
    /// hand one node's pods to another).
    pub fn put_node(&self, node: NodeRecord) -> Result<(), RegistryError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.view.nodes.get(&node.name) == Some(&node) {
            return Ok(());
        }
        for other in st.view.nodes.values().filter(|o| o.name != node.name) {
            if other.public_key == node.public_key {
                return Err(RegistryError::Conflict { what: "the WireGuard public key".into(), holder: other.name.clone() });
            }
            for mine in &node.pod_cidrs {
                if let Some(theirs) = other.pod_cidrs.iter().find(|t| t.contains(&mine.network()) || mine.contains(&t.network())) {
                    return Err(RegistryError::Conflict {
                        what: format!("pod CIDR {mine} (overlapping {theirs})"),
                        holder: other.name.clone(),
                    });
                }
            }
        }
        let delta = self.commit(&mut st, &[], std::slice::from_ref(&node.name), |tx| put(tx, NODES, &node.name, &node))?;
        let ev = Event::NodeUpserted(convert::node_to_proto(&node));
        st.view.nodes.insert(node.name.clone(), node);
        self.emit(&mut st, &delta, Some(ev));
        Ok(())
    }

    pub fn delete_node(&self, name: &str) -> Result<bool, RegistryError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if !st.view.nodes.contains_key(name) {
            return Ok(false);
        }
        self.store.put::<NodeRecord>(NODES, name, None)?;
        st.view.nodes.remove(name);
        self.emit(&mut st, &Delta::default(), Some(Event::NodeDeleted(name.to_owned())));
        Ok(true)
    }

    pub fn put_workload(&self, w: Workload) -> Result<(), RegistryError> {
        let id = validate_workload(&w, &self.trust_domain)?;
        let key = w.key();
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.view.workloads.get(&key) == Some(&w) {
            return Ok(());
        }
        let delta = self.commit(&mut st, std::slice::from_ref(&id), &[], |tx| put(tx, WORKLOADS, &key, &w))?;
        if let Some(old) = st.view.workloads.get(&key).cloned() {
            unhost(&mut st, &old, &self.trust_domain);
        }
        *st.hosted.entry((w.node.clone(), id.to_string())).or_insert(0) += 1;
        let ev = Event::WorkloadUpserted(convert::workload_to_proto(&w));
        st.view.workloads.insert(key, w);
        self.emit(&mut st, &delta, Some(ev));
        Ok(())
    }

    pub fn delete_workload(&self, key: &str) -> Result<(), RegistryError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let Some(old) = st.view.workloads.get(key).cloned() else {
            return Err(RegistryError::NotFound { what: "workload", key: key.to_owned() });
        };
        self.store.put::<Workload>(WORKLOADS, key, None)?;
        unhost(&mut st, &old, &self.trust_domain);
        st.view.workloads.remove(key);
        self.emit(&mut st, &Delta::default(), Some(Event::WorkloadDeleted(key.to_owned())));
        Ok(())
    }

    pub fn put_policy(&self, p: MeshPolicy) -> Result<(), RegistryError> {
        p.validate().map_err(|e| RegistryError::Invalid { what: "policy", reason: e.to_string() })?;
        let key = p.key();
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<SpiffeId> = alloc::policy_identities(&p).cloned().collect();
        let delta = self.commit(&mut st, &ids, &[], |tx| put(tx, POLICIES, &key, &p))?;
        let ev = Event::PolicyUpserted(convert::policy_to_proto(&p));
        st.view.policies.insert(key, p);
        self.emit(&mut st, &delta, Some(ev));
        Ok(())
    }

    /// Several policies in one transaction, all or none (a multi-document
    /// `policy apply`): every one is validated before anything is written.
    pub fn put_policies(&self, ps: Vec<MeshPolicy>) -> Result<(), RegistryError> {
        let mut keys = std::collections::BTreeSet::new();
        for p in &ps {
            p.validate().map_err(|e| RegistryError::Invalid { what: "policy", reason: e.to_string() })?;
            if !keys.insert(p.key()) {
                return Err(RegistryError::Invalid { what: "policy", reason: format!("{} appears twice in one apply", p.key()) });
            }
        }
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<SpiffeId> = ps.iter().flat_map(|p| alloc::policy_identities(p).cloned()).collect();
        let delta = self.commit(&mut st, &ids, &[], |tx| ps.iter().try_for_each(|p| put(tx, POLICIES, &p.key(), p)))?;
        let mut delta = Some(delta);
        for p in ps {
            let ev = Event::PolicyUpserted(convert::policy_to_proto(&p));
            st.view.policies.insert(p.key(), p);
            // The new numbers travel with the first event, before any policy uses them.
            self.emit(&mut st, &delta.take().unwrap_or_default(), Some(ev));
        }
        Ok(())
    }

    pub fn delete_policy(&self, key: &str) -> Result<(), RegistryError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if !st.view.policies.contains_key(key) {
            return Err(RegistryError::NotFound { what: "policy", key: key.to_owned() });
        }
        self.store.put::<MeshPolicy>(POLICIES, key, None)?;
        st.view.policies.remove(key);
        self.emit(&mut st, &Delta::default(), Some(Event::PolicyDeleted(key.to_owned())));
        Ok(())
    }

    /// Bulk insert for large registries (benchmarks, imports): one
    /// transaction; one event with the new numbers, then one per workload.
    pub fn put_workloads(&self, ws: Vec<Workload>) -> Result<(), RegistryError> {
        let ids = ws.iter().map(|w| validate_workload(w, &self.trust_domain)).collect::<Result<Vec<_>, _>>()?;
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let delta = self.commit(&mut st, &ids, &[], |tx| {
            let mut t = tx.open_table(WORKLOADS).map_err(store::err("open table"))?;
            for w in &ws {
                t.insert(w.key().as_str(), store::encode(w).as_slice()).map_err(store::err("write"))?;
            }
            Ok(())
        })?;
        if !delta.is_empty() {
            self.emit(&mut st, &delta, None);
        }
        for (w, id) in ws.into_iter().zip(ids) {
            if let Some(old) = st.view.workloads.get(&w.key()).cloned() {
                unhost(&mut st, &old, &self.trust_domain);
            }
            *st.hosted.entry((w.node.clone(), id.to_string())).or_insert(0) += 1;
            let ev = Event::WorkloadUpserted(convert::workload_to_proto(&w));
            st.view.workloads.insert(w.key(), w);
            self.emit(&mut st, &Delta::default(), Some(ev));
        }
        Ok(())
    }

    /// Gives node ids to nodes that have none (attested nodes, which may not
    /// have published a record yet). Cheap when they all have one.
    pub fn allocate_node_ids<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) -> Result<(), RegistryError> {
        let nodes: Vec<String> = {
            let st = self.state.read().unwrap_or_else(|e| e.into_inner());
            nodes.into_iter().filter(|n| !st.alloc.nodes.contains_key(*n)).map(str::to_owned).collect()
        };
        if nodes.is_empty() {
            return Ok(());
        }
        for n in &nodes {
            meshguard_common::spiffe::validate_segment(n)
                .map_err(|e| RegistryError::Invalid { what: "node name", reason: e.to_string() })?;
        }
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let delta = self.commit(&mut st, &[], &nodes, |_| Ok(()))?;
        if !delta.is_empty() {
            self.emit(&mut st, &delta, None);
        }
        Ok(())
    }

    /// Takes in the numbers `objects` (MeshIdentity objects) hold: each
    /// becomes the registry's allocation where it has none, and the
    /// counters move past every number an object holds, so nothing is
    /// allocated twice. Where the registry already gives a number another
    /// meaning, or a meaning another number, nothing changes and every such
    /// disagreement is returned. Stored in one transaction; watchers get
    /// the new numbers in one event. Returns what was new.
    pub fn adopt(&self, objects: &[Allocation]) -> Result<Delta, RegistryError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let (next, delta) = plan_adoption(&st.alloc, objects)?;
        if next == st.alloc {
            return Ok(delta);
        }
        next.validate()?;
        let tx = self.store.write()?;
        store_delta(&tx, &next, &delta)?;
        Store::commit(tx)?;
        st.alloc = next;
        if !delta.is_empty() {
            self.emit(&mut st, &delta, None);
        }
        Ok(delta)
    }

    /// Allocates numbers for `ids` and `nodes`, and stores them and whatever
    /// `write` writes in one durable transaction. On failure nothing is
    /// stored and nothing allocated.
    fn commit(
        &self,
        st: &mut State,
        ids: &[SpiffeId],
        nodes: &[String],
        write: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<Delta, RegistryError> {
        let delta = st.alloc.allocate_delta(ids, nodes)?;
        let r = (|| {
            let tx = self.store.write()?;
            write(&tx)?;
            if !delta.is_empty() {
                store_delta(&tx, &st.alloc, &delta)?;
            }
            Store::commit(tx)
        })();
        match r {
            Ok(()) => Ok(delta),
            Err(e) => {
                st.alloc.undo(&delta);
                Err(e.into())
            }
        }
    }

    fn emit(&self, st: &mut State, allocated: &Delta, event: Option<Event>) {
        st.revision += 1;
        let allocated = (!allocated.is_empty()).then(|| {
            convert::numbers_to_proto(allocated.identities.iter().map(|(k, v)| (k, v)), allocated.nodes.iter().map(|(k, v)| (k, v)))
        });
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(Arc::new(proto::ClusterEvent { revision: st.revision, allocated, event }));
    }
}

/// `alloc` with the numbers `objects` hold adopted, and what was new; or
/// every disagreement between them. Where objects give one meaning several
/// numbers (damage) the lowest is its number, as on every node (the
/// agents' Kubernetes source picks it); the others stay taken.
fn plan_adoption(alloc: &Allocations, objects: &[Allocation]) -> Result<(Allocations, Delta), RegistryError> {
    let mut next = alloc.clone();
    let mut delta = Delta::default();
    let mut disagreements = Vec::new();
    let (mut ids, mut nodes) = (Vec::new(), Vec::new());
    for o in objects {
        match o {
            Allocation::Identity(id, n) => ids.push((id, *n)),
            Allocation::Node(node, n) => nodes.push((node, *n)),
        }
    }
    let name = |n: u32| n.to_string();
    next.next_identity = adopt_kind(&mut next.identities, alloc.next_identity, &ids, name, &mut delta.identities, &mut disagreements)?;
    let name = |n: u32| format!("node-{n}");
    next.next_node_id = adopt_kind(&mut next.nodes, alloc.next_node_id, &nodes, name, &mut delta.nodes, &mut disagreements)?;
    if !disagreements.is_empty() {
        return Err(RegistryError::Disagree { disagreements });
    }
    Ok((next, delta))
}

/// [`plan_adoption`] for one kind of number (identities or node ids):
/// adds to `mine` and `added`, or to `disagreements`; returns the counter.
fn adopt_kind<K: Ord + Clone + fmt::Display>(
    mine: &mut BTreeMap<K, u32>,
    mut counter: u32,
    objects: &[(&K, u32)],
    name: impl Fn(u32) -> String,
    added: &mut Vec<(K, u32)>,
    disagreements: &mut Vec<Disagreement>,
) -> Result<u32, AllocError> {
    let by_number: BTreeMap<u32, &K> = mine.iter().map(|(k, n)| (*n, k)).collect();
    let mut lowest: BTreeMap<&K, u32> = BTreeMap::new();
    for (k, n) in objects {
        let low = lowest.entry(*k).or_insert(*n);
        *low = (*low).min(*n);
        if let Some(theirs) = by_number.get(n).filter(|theirs| **theirs != *k) {
            disagreements.push(Disagreement { object: name(*n), stands_for: k.to_string(), registry: format!("gives {n} to {theirs}") });
        }
        counter = counter.max(n.checked_add(1).ok_or(AllocError::Exhausted)?);
    }
    for (k, n) in lowest {
        match mine.get(k) {
            Some(m) if *m != n => {
                disagreements.push(Disagreement { object: name(n), stands_for: k.to_string(), registry: format!("gives {k} {m}") })
            }
            Some(_) => {}
            None => {
                mine.insert(k.clone(), n);
                added.push((k.clone(), n));
            }
        }
    }
    Ok(counter)
}

/// What needs a number in `view`: every workload's identity, every SPIFFE ID
/// a policy names, every node with a record.
fn wanted(view: &ClusterView, td: &TrustDomain) -> (Vec<SpiffeId>, Vec<String>) {
    let mut ids: Vec<SpiffeId> = view.workloads.values().filter_map(|w| w.spiffe_id(td).ok()).collect();
    ids.extend(view.policies.values().flat_map(alloc::policy_identities).cloned());
    (ids, view.nodes.keys().cloned().collect())
}

fn put<T: serde::Serialize>(tx: &redb::WriteTransaction, table: store::StrTable, key: &str, value: &T) -> Result<(), StoreError> {
    let mut t = tx.open_table(table).map_err(store::err("open table"))?;
    t.insert(key, store::encode(value).as_slice()).map_err(store::err("write"))?;
    Ok(())
}

fn store_delta(tx: &redb::WriteTransaction, a: &Allocations, d: &Delta) -> Result<(), StoreError> {
    {
        let mut t = tx.open_table(IDENTITY_NUMBERS).map_err(store::err("open table"))?;
        for (id, n) in &d.identities {
            t.insert(id.as_str(), *n).map_err(store::err("write"))?;
        }
    }
    {
        let mut t = tx.open_table(NODE_IDS).map_err(store::err("open table"))?;
        for (node, n) in &d.nodes {
            t.insert(node.as_str(), *n).map_err(store::err("write"))?;
        }
    }
    let mut meta = tx.open_table(META).map_err(store::err("open table"))?;
    meta.insert(NEXT_IDENTITY_KEY, u64::from(a.next_identity).to_be_bytes().as_slice()).map_err(store::err("write"))?;
    meta.insert(NEXT_NODE_ID_KEY, u64::from(a.next_node_id).to_be_bytes().as_slice()).map_err(store::err("write"))?;
    Ok(())
}

fn load_allocations(store: &Store) -> Result<Allocations, StoreError> {
    let corrupt = |table: &'static str, key: String, reason: String| StoreError::Corrupt { table, key, reason };
    let mut a = Allocations::new();
    let tx = store.read()?;
    for entry in tx.open_table(IDENTITY_NUMBERS).map_err(store::err("open table"))?.iter().map_err(store::err("read"))? {
        let (k, v) = entry.map_err(store::err("read"))?;
        let id = SpiffeId::parse(k.value()).map_err(|e| corrupt("identity_numbers", k.value().to_owned(), e.to_string()))?;
        a.identities.insert(id, v.value());
    }
    for entry in tx.open_table(NODE_IDS).map_err(store::err("open table"))?.iter().map_err(store::err("read"))? {
        let (k, v) = entry.map_err(store::err("read"))?;
        a.nodes.insert(k.value().to_owned(), v.value());
    }
    let counter = |key: &str, first: u32| -> Result<u32, StoreError> {
        match store.meta_u64(key)? {
            0 => Ok(first),
            n => u32::try_from(n).map_err(|_| corrupt("meta", key.to_owned(), format!("{n} is out of range"))),
        }
    };
    a.next_identity = counter(NEXT_IDENTITY_KEY, alloc::FIRST_IDENTITY)?;
    a.next_node_id = counter(NEXT_NODE_ID_KEY, alloc::FIRST_NODE_ID)?;
    a.validate().map_err(|e| corrupt("identity_numbers", "*".into(), e.to_string()))?;
    Ok(a)
}

/// A workload's identity, after checking every field that names something:
/// the name and node end up in file paths (the agents' pod namespace
/// files) and log lines, so they obey the SPIFFE segment rules as the
/// namespace and service account do.
fn validate_workload(w: &Workload, td: &TrustDomain) -> Result<SpiffeId, RegistryError> {
    let id = w.spiffe_id(td).map_err(|e| RegistryError::Invalid { what: "workload", reason: e.to_string() })?;
    for (what, v) in [("workload name", &w.name), ("workload node", &w.node)] {
        meshguard_common::spiffe::validate_segment(v).map_err(|e| RegistryError::Invalid { what, reason: e.to_string() })?;
    }
    Ok(id)
}

fn unhost(st: &mut State, w: &Workload, td: &TrustDomain) {
    if let Ok(id) = w.spiffe_id(td) {
        let k = (w.node.clone(), id.to_string());
        if let Some(n) = st.hosted.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                st.hosted.remove(&k);
            }
        }
    }
}

// === impl Disagreement ===

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MeshIdentity {} stands for {}, but the registry {}", self.object, self.stands_for, self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, node: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: node.into(),
            ips: vec![],
            labels: Default::default(),
        }
    }

    #[test]
    fn single_and_bulk_puts_refuse_the_same_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "r.redb", "cluster.local").unwrap();
        let r = Registry::open(store, TrustDomain::new("cluster.local").unwrap()).unwrap();
        for bad in [workload("../../proc/1/ns/net", "node-1"), workload("web", "node/1"), workload("", "node-1")] {
            assert!(matches!(r.put_workload(bad.clone()), Err(RegistryError::Invalid { .. })), "{bad:?}");
            assert!(matches!(r.put_workloads(vec![workload("ok", "node-1"), bad.clone()]), Err(RegistryError::Invalid { .. })), "{bad:?}");
        }
        // Nothing of a refused batch was stored.
        assert_eq!(r.workload_count(), 0);
        r.put_workloads(vec![workload("web", "node-1")]).unwrap();
        assert!(r.hosts("node-1", &TrustDomain::new("cluster.local").unwrap().workload_id("shop", "web").unwrap()));
    }

    #[test]
    fn numbers_are_persisted_and_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let open = || Registry::open(Store::open(dir.path(), "r.redb", "cluster.local").unwrap(), td.clone()).unwrap();
        let r = open();
        let web = td.workload_id("shop", "web").unwrap();
        r.put_workload(workload("web", "node-1")).unwrap();
        r.put_workload(workload("web2", "node-2")).unwrap();
        r.allocate_node_ids(["node-1", "node-2"]).unwrap();
        let view = r.view();
        assert_eq!(view.identities.len(), 1, "one service account, one identity");
        assert_eq!(view.node_ids.len(), 2);
        r.delete_workload("shop/web").unwrap();
        r.delete_workload("shop/web2").unwrap();
        drop(r);

        let r = open();
        assert_eq!(r.view().identities, view.identities, "numbers survive a restart, and outlive their workloads");
        assert_eq!(r.view().node_ids, view.node_ids);
        let mut api = workload("api", "node-3");
        api.service_account = "api".into();
        r.put_workload(api).unwrap();
        let api_id = td.workload_id("shop", "api").unwrap();
        assert!(r.identity_number(&api_id).unwrap() > r.identity_number(&web).unwrap());
        assert_eq!(r.node_id("node-3"), None, "a workload's node is not a node until it registers or attests");
        r.allocate_node_ids(["node-3"]).unwrap();
        assert_eq!(r.node_id("node-3"), Some(3));
    }

    #[test]
    fn records_stored_before_numbers_existed_get_them_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "r.redb", "cluster.local").unwrap();
        store.put(WORKLOADS, "shop/web", Some(&workload("web", "node-1"))).unwrap();
        let node = NodeRecord {
            name: "node-1".into(),
            public_key: meshguard_common::key::PublicKey([1; 32]),
            endpoint: "192.168.1.1:51820".parse().unwrap(),
            pod_cidrs: vec![],
        };
        store.put(NODES, "node-1", Some(&node)).unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let r = Registry::open(store, td.clone()).unwrap();
        assert_eq!(r.identity_number(&td.workload_id("shop", "web").unwrap()), Some(alloc::FIRST_IDENTITY));
        assert_eq!(r.node_id("node-1"), Some(alloc::FIRST_NODE_ID));
    }

    #[test]
    fn events_carry_the_numbers_they_allocate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "r.redb", "cluster.local").unwrap();
        let r = Registry::open(store, TrustDomain::new("cluster.local").unwrap()).unwrap();
        let (_, mut rx) = r.watch();
        r.put_workload(workload("web", "node-1")).unwrap();
        r.put_workload(workload("web2", "node-1")).unwrap();
        let first = rx.try_recv().unwrap();
        let allocated = first.allocated.clone().expect("numbers with the first workload");
        assert_eq!(allocated.identities.get("spiffe://cluster.local/ns/shop/sa/web"), Some(&alloc::FIRST_IDENTITY));
        assert!(rx.try_recv().unwrap().allocated.is_none(), "the second workload has a known identity");
        // A watcher that applies the stream has what the registry has.
        let (snap, _) = r.watch();
        let mut view = ClusterView::default();
        convert::apply_event(&mut view, snap).unwrap();
        assert_eq!(view, r.view());
    }

    #[test]
    fn adoption_takes_in_the_objects_numbers_or_names_every_disagreement() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let open = || Registry::open(Store::open(dir.path(), "r.redb", "cluster.local").unwrap(), td.clone()).unwrap();
        let r = open();
        let (db, web, api) =
            (td.workload_id("shop", "db").unwrap(), td.workload_id("shop", "web").unwrap(), td.workload_id("shop", "api").unwrap());
        let (_, mut rx) = r.watch();
        // db twice (damage): the lowest is its number, as on every node.
        let objects = [Allocation::Identity(db.clone(), 300), Allocation::Identity(db.clone(), 256), Allocation::Node("node-9".into(), 1)];
        let d = r.adopt(&objects).unwrap();
        assert_eq!((d.identities.clone(), d.nodes.clone()), (vec![(db.clone(), 256)], vec![("node-9".to_owned(), 1)]));
        let numbers = rx.try_recv().unwrap().allocated.clone().expect("the adopted numbers travel in an event");
        assert_eq!(numbers.identities.get(db.as_str()), Some(&256));
        assert_eq!(numbers.node_ids.get("node-9"), Some(&1));
        // Nothing allocates a number an object holds.
        r.put_workload(workload("web", "node-1")).unwrap();
        r.allocate_node_ids(["node-2"]).unwrap();
        assert_eq!((r.identity_number(&web), r.node_id("node-2")), (Some(301), Some(2)));
        assert!(r.adopt(&objects).unwrap().is_empty(), "adopted already");
        while rx.try_recv().is_ok() {}

        let before = r.view();
        let disagreeing = [
            Allocation::Identity(web.clone(), 257),
            Allocation::Identity(api.clone(), 301),
            Allocation::Node("node-3".into(), 2),
            Allocation::Identity(td.workload_id("shop", "new").unwrap(), 400),
        ];
        let Err(RegistryError::Disagree { disagreements }) = r.adopt(&disagreeing) else { panic!("disagreements refused") };
        let said: Vec<String> = disagreements.iter().map(ToString::to_string).collect();
        assert_eq!(
            said,
            [
                format!("MeshIdentity 301 stands for {api}, but the registry gives 301 to {web}"),
                format!("MeshIdentity 257 stands for {web}, but the registry gives {web} 301"),
                "MeshIdentity node-2 stands for node-3, but the registry gives 2 to node-2".to_owned(),
            ]
        );
        assert_eq!(r.view(), before, "all or nothing: not even the agreeing number was adopted");
        assert!(rx.try_recv().is_err());
        drop(r);

        let r = open();
        assert_eq!(r.view(), before, "adopted numbers are stored like allocated ones");
        r.allocate_node_ids(["node-4"]).unwrap();
        assert_eq!(r.node_id("node-4"), Some(3));
    }
}
