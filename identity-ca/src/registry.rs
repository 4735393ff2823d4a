//! The standalone registry: nodes, workloads and policies, persisted in the
//! store, held in memory as one [`ClusterView`], and streamed to watchers as
//! a snapshot followed by one event per change.
//!
//! It also answers the CA's authorization question — does node N host a
//! workload with identity X? — from an index kept beside the view.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use meshguard_common::cluster::{ClusterView, NodeRecord, Workload};
use meshguard_common::policy::MeshPolicy;
use meshguard_common::registry::convert;
use meshguard_common::registry::proto::{self, cluster_event::Event};
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use tokio::sync::broadcast;

use crate::store::{NODES, POLICIES, Store, StoreError, WORKLOADS};

/// Events buffered per watcher before it is resynchronised with a snapshot.
pub const EVENT_BUFFER: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} is invalid: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("{what} {key} does not exist")]
    NotFound { what: &'static str, key: String },
}

pub struct Registry {
    store: Store,
    trust_domain: TrustDomain,
    state: RwLock<State>,
    events: broadcast::Sender<Arc<proto::ClusterEvent>>,
}

struct State {
    view: ClusterView,
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
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Self { store, trust_domain, state: RwLock::new(State { view, revision: 0, hosted }), events })
    }

    /// Whether `node` hosts a workload whose identity is `id`.
    pub fn hosts(&self, node: &str, id: &SpiffeId) -> bool {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        st.hosted.get(&(node.to_owned(), id.to_string())).is_some_and(|n| *n > 0)
    }

    pub fn view(&self) -> ClusterView {
        self.state.read().unwrap_or_else(|e| e.into_inner()).view.clone()
    }

    pub fn workload_count(&self) -> usize {
        self.state.read().unwrap_or_else(|e| e.into_inner()).view.workloads.len()
    }

    /// A snapshot event and a receiver of every change after it, taken
    /// together so no change falls between them.
    pub fn watch(&self) -> (proto::ClusterEvent, broadcast::Receiver<Arc<proto::ClusterEvent>>) {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        let rx = self.events.subscribe();
        let snap = proto::ClusterEvent { revision: st.revision, event: Some(Event::Snapshot(convert::snapshot_to_proto(&st.view))) };
        (snap, rx)
    }

    pub fn put_node(&self, node: NodeRecord) -> Result<(), RegistryError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.view.nodes.get(&node.name) == Some(&node) {
            return Ok(());
        }
        self.store.put(NODES, &node.name, Some(&node))?;
        let ev = Event::NodeUpserted(convert::node_to_proto(&node));
        st.view.nodes.insert(node.name.clone(), node);
        self.emit(&mut st, ev);
        Ok(())
    }

    pub fn delete_node(&self, name: &str) -> Result<bool, RegistryError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if !st.view.nodes.contains_key(name) {
            return Ok(false);
        }
        self.store.put::<NodeRecord>(NODES, name, None)?;
        st.view.nodes.remove(name);
        self.emit(&mut st, Event::NodeDeleted(name.to_owned()));
        Ok(true)
    }

    pub fn put_workload(&self, w: Workload) -> Result<(), RegistryError> {
        let id = validate_workload(&w, &self.trust_domain)?;
        let key = w.key();
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.view.workloads.get(&key) == Some(&w) {
            return Ok(());
        }
        self.store.put(WORKLOADS, &key, Some(&w))?;
        if let Some(old) = st.view.workloads.get(&key).cloned() {
            unhost(&mut st, &old, &self.trust_domain);
        }
        *st.hosted.entry((w.node.clone(), id.to_string())).or_insert(0) += 1;
        let ev = Event::WorkloadUpserted(convert::workload_to_proto(&w));
        st.view.workloads.insert(key, w);
        self.emit(&mut st, ev);
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
        self.emit(&mut st, Event::WorkloadDeleted(key.to_owned()));
        Ok(())
    }

    pub fn put_policy(&self, p: MeshPolicy) -> Result<(), RegistryError> {
        p.validate().map_err(|e| RegistryError::Invalid { what: "policy", reason: e.to_string() })?;
        let key = p.key();
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        self.store.put(POLICIES, &key, Some(&p))?;
        let ev = Event::PolicyUpserted(convert::policy_to_proto(&p));
        st.view.policies.insert(key, p);
        self.emit(&mut st, ev);
        Ok(())
    }

    pub fn delete_policy(&self, key: &str) -> Result<(), RegistryError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if !st.view.policies.contains_key(key) {
            return Err(RegistryError::NotFound { what: "policy", key: key.to_owned() });
        }
        self.store.put::<MeshPolicy>(POLICIES, key, None)?;
        st.view.policies.remove(key);
        self.emit(&mut st, Event::PolicyDeleted(key.to_owned()));
        Ok(())
    }

    /// Bulk insert for large registries (benchmarks, imports): one
    /// transaction, one event per workload.
    pub fn put_workloads(&self, ws: Vec<Workload>) -> Result<(), RegistryError> {
        let ids = ws.iter().map(|w| validate_workload(w, &self.trust_domain)).collect::<Result<Vec<_>, _>>()?;
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let tx = self.store.write()?;
        {
            let mut t = tx.open_table(WORKLOADS).map_err(crate::store::err("open table"))?;
            for w in &ws {
                t.insert(w.key().as_str(), crate::store::encode(w).as_slice()).map_err(crate::store::err("write"))?;
            }
        }
        Store::commit(tx)?;
        for (w, id) in ws.into_iter().zip(ids) {
            if let Some(old) = st.view.workloads.get(&w.key()).cloned() {
                unhost(&mut st, &old, &self.trust_domain);
            }
            *st.hosted.entry((w.node.clone(), id.to_string())).or_insert(0) += 1;
            let ev = Event::WorkloadUpserted(convert::workload_to_proto(&w));
            st.view.workloads.insert(w.key(), w);
            self.emit(&mut st, ev);
        }
        Ok(())
    }

    fn emit(&self, st: &mut State, event: Event) {
        st.revision += 1;
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(Arc::new(proto::ClusterEvent { revision: st.revision, event: Some(event) }));
    }
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
}
