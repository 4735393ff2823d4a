//! Kubernetes mode: the numbers the registry allocates, published as
//! cluster-scoped MeshIdentity objects (`<n>` for a workload identity,
//! `node-<n>` for a node id), which the agents' Kubernetes cluster source
//! reads so that every node keys its maps alike.
//!
//! Before anything allocates, [`adopt`] lists the objects and takes their
//! numbers into the registry: they are what the nodes enforce, so a CA
//! whose state was lost or restored from an older backup must not give
//! them new meanings. Where the registry already disagrees with them it
//! fails closed: nothing on Kubernetes starts, the registry's numbers are
//! not served, and `/readyz` says why.
//!
//! The registry stays the allocator; [`publish`] only copies its numbers
//! out. At start it lists the objects that exist and creates the missing
//! ones; then it follows the registry's events (each carries the numbers it
//! allocated), and its whole view when it fell behind. While the API server
//! cannot be reached it retries with backoff, and never gives up.
//!
//! An object that holds a number with another meaning is a serious
//! inconsistency (identity-ca's state lost or restored from an old backup,
//! or another writer): logged as an error, counted
//! (`meshguard_ca_k8s_identity_conflicts_total`), never overwritten — the
//! CRD refuses a changed meaning anyway. Nothing is ever deleted: a number
//! is never reused, so its object outlives what it stood for.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use meshguard_ca_client::registry::{convert, proto};
use meshguard_common::cluster::{Allocation, ClusterView, MeshIdentity, MeshIdentitySpec};
use meshguard_common::retry::Backoff;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::registry::RegistryError;
use crate::server::CaState;

/// Objects per page when listing what exists.
pub const LIST_PAGE: u32 = 500;
/// How much of a conflicting object's spec an error log shows.
const SHOWN_SPEC_CHARS: usize = 300;
/// Disagreements logged one by one when adoption is refused (all are counted).
const LOGGED_DISAGREEMENTS: usize = 100;

/// Where the registry's numbers stand against the MeshIdentity objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// The objects are not listed yet (the API server not reached yet):
    /// nothing allocates and the registry's numbers are not served.
    Waiting,
    /// Adopted: this many identities and node ids were new to the registry.
    Adopted { identities: usize, nodes: usize },
    /// The registry disagrees with the objects: nothing on Kubernetes
    /// starts, until an operator resolves it and restarts the CA.
    Refused { reason: String },
}

/// What the API server holds under a wanted name.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// The registry's meaning.
    Same,
    /// Another one (the object's spec, as JSON).
    Other(String),
}

struct Publisher {
    typed: kube::Api<MeshIdentity>,
    untyped: kube::Api<DynamicObject>,
    state: Arc<CaState>,
    /// Whether what exists was listed (once per process).
    listed: bool,
    /// Wanted and not yet known to exist, by name.
    pending: BTreeMap<String, MeshIdentity>,
    /// Known to exist with the registry's meaning, or known to conflict:
    /// never written again, never counted twice.
    settled: BTreeSet<String>,
}

/// Runs until the process stops.
pub async fn publish(client: kube::Client, state: Arc<CaState>) {
    let mut p = Publisher {
        typed: kube::Api::all(client.clone()),
        untyped: kube::Api::all_with(client, &ApiResource::erase::<MeshIdentity>(&())),
        state: state.clone(),
        listed: false,
        pending: BTreeMap::new(),
        settled: BTreeSet::new(),
    };
    // Subscribed before the view is read, so no number falls between.
    let (_, mut events) = state.registry.watch();
    p.want(wanted(&state.registry.view()));
    let mut backoff = Backoff::default();
    let mut retry_at: Option<Instant> = None;
    loop {
        if retry_at.is_none_or(|t| t <= Instant::now()) {
            retry_at = match p.sync().await {
                Ok(()) => {
                    backoff.reset();
                    None
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, pending = p.pending.len(), retry_in = ?delay, "cannot publish MeshIdentity objects; retrying");
                    Some(Instant::now() + delay)
                }
            };
        }
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) => {
                    if let Some(numbers) = &ev.allocated {
                        p.want(from_numbers(numbers));
                    }
                }
                // The receiver goes on from the oldest event it still has;
                // the view covers the ones it lost.
                Err(RecvError::Lagged(missed)) => {
                    tracing::info!(missed, "behind the registry's events; reconciling MeshIdentity objects from its view");
                    p.want(wanted(&state.registry.view()));
                }
                Err(RecvError::Closed) => return,
            },
            () = retry => {}
        }
    }
}

/// Lists every MeshIdentity, retrying with backoff while the API server
/// cannot be reached, and adopts their numbers into the registry (see
/// [`crate::registry::Registry::adopt`]). Returns whether they agree; when
/// they do not, the CA's state says why and nothing else on Kubernetes may
/// start.
pub async fn adopt(client: kube::Client, state: &CaState) -> bool {
    let api: kube::Api<DynamicObject> = kube::Api::all_with(client, &ApiResource::erase::<MeshIdentity>(&()));
    let mut backoff = Backoff::default();
    loop {
        let error = match list_allocations(&api).await {
            Err(error) => error.to_string(),
            Ok(objects) => match state.registry.adopt(&objects) {
                Ok(delta) => {
                    let (identities, nodes) = (delta.identities.len(), delta.nodes.len());
                    tracing::info!(objects = objects.len(), identities, nodes, "MeshIdentity numbers adopted into the registry");
                    state.set_adoption(Adoption::Adopted { identities, nodes });
                    // Attested nodes waited for their ids until now.
                    let attested = state.attested_nodes();
                    if let Err(error) = state.registry.allocate_node_ids(attested.keys().map(String::as_str)) {
                        tracing::warn!(%error, "cannot give the attested nodes their node ids");
                    }
                    return true;
                }
                Err(RegistryError::Store(error)) => error.to_string(),
                Err(error) => {
                    refuse(state, error);
                    return false;
                }
            },
        };
        let delay = backoff.next_delay();
        tracing::warn!(%error, retry_in = ?delay, "cannot adopt the MeshIdentity numbers yet; the Kubernetes mirrors wait");
        tokio::time::sleep(delay).await;
    }
}

/// Fails closed: logs and counts every disagreement, and keeps the reason
/// for `/readyz`.
fn refuse(state: &CaState, error: RegistryError) {
    if let RegistryError::Disagree { disagreements } = &error {
        state.metrics.k8s_identity_conflicts.inc_by(disagreements.len() as u64);
        for d in disagreements.iter().take(LOGGED_DISAGREEMENTS) {
            tracing::error!(
                object = %d.object, stands_for = %d.stands_for, registry = %d.registry,
                "the registry disagrees with a MeshIdentity the nodes enforce (identity-ca's state lost or restored from an old backup?)"
            );
        }
    }
    tracing::error!(%error, "the Kubernetes mirrors are not started and the registry's numbers are not served");
    state.set_adoption(Adoption::Refused { reason: error.to_string() });
}

/// Every MeshIdentity's allocation, page by page; a malformed object is
/// skipped with a warning.
async fn list_allocations(api: &kube::Api<DynamicObject>) -> Result<Vec<Allocation>, kube::Error> {
    let mut params = ListParams::default().limit(LIST_PAGE);
    let mut out = Vec::new();
    loop {
        let page = api.list(&params).await?;
        for obj in &page.items {
            match allocation_of(obj) {
                Ok(a) => out.push(a),
                Err(reason) => tracing::warn!(
                    object = %obj.metadata.name.as_deref().unwrap_or_default(), %reason,
                    "malformed MeshIdentity skipped; its number is not adopted"
                ),
            }
        }
        match page.metadata.continue_.as_deref() {
            Some(token) if !token.is_empty() => params = params.continue_token(token),
            _ => return Ok(out),
        }
    }
}

/// What a MeshIdentity object allocates, or why it is malformed.
pub fn allocation_of(obj: &DynamicObject) -> Result<Allocation, String> {
    let typed: MeshIdentity = serde_json::to_value(obj).and_then(serde_json::from_value).map_err(|e| e.to_string())?;
    typed.allocation()
}

/// One object per number `view` holds.
pub fn wanted(view: &ClusterView) -> Vec<MeshIdentity> {
    let ids = view.identities.iter().map(|(id, n)| MeshIdentity::identity(*n, id));
    ids.chain(view.node_ids.iter().map(|(node, n)| MeshIdentity::node(*n, node))).collect()
}

/// One object per number an event allocated.
pub fn from_numbers(numbers: &proto::Numbers) -> Vec<MeshIdentity> {
    match convert::numbers_from_proto(numbers.clone()) {
        Ok(n) => {
            let ids = n.identities.iter().map(|(id, n)| MeshIdentity::identity(*n, id));
            ids.chain(n.node_ids.iter().map(|(node, n)| MeshIdentity::node(*n, node))).collect()
        }
        Err(error) => {
            tracing::error!(%error, "BUG: the registry's event carries invalid numbers; not published");
            Vec::new()
        }
    }
}

/// Whether `obj` means what `want` says.
pub fn found(want: &MeshIdentitySpec, obj: &DynamicObject) -> Found {
    let spec = obj.data.get("spec").cloned().unwrap_or_default();
    match serde_json::from_value::<MeshIdentitySpec>(spec.clone()) {
        Ok(s) if &s == want => Found::Same,
        _ => Found::Other(spec.to_string().chars().take(SHOWN_SPEC_CHARS).collect()),
    }
}

/// What a spec means, as one comparable key.
fn meaning(spec: &MeshIdentitySpec) -> Option<String> {
    match (&spec.spiffe_id, &spec.node) {
        (Some(id), None) => Some(format!("spiffeId {id}")),
        (None, Some(node)) => Some(format!("node {node}")),
        _ => None,
    }
}

// === impl Publisher ===

impl Publisher {
    fn want(&mut self, objects: Vec<MeshIdentity>) {
        for o in objects {
            let name = o.metadata.name.clone().unwrap_or_default();
            if !self.settled.contains(&name) {
                self.pending.entry(name).or_insert(o);
            }
        }
    }

    /// Lists (the first time), then creates what is pending; stops at the
    /// first failure to reach the API server, keeping the rest pending.
    async fn sync(&mut self) -> Result<(), kube::Error> {
        if !self.listed {
            self.list().await?;
            self.listed = true;
        }
        while let Some((name, want)) = self.pending.first_key_value().map(|(k, v)| (k.clone(), v.clone())) {
            match self.typed.create(&PostParams::default(), &want).await {
                Ok(_) => tracing::debug!(object = %name, "MeshIdentity created"),
                Err(kube::Error::Api(s)) if s.is_already_exists() => {
                    let obj = self.untyped.get(&name).await?;
                    self.judge(&name, &want.spec, &obj);
                }
                // This object, not the API server: retrying it would hold
                // back every number after it.
                Err(kube::Error::Api(s)) if s.is_invalid() || s.code == 400 => {
                    tracing::error!(object = %name, error = %s, "the API server refuses this MeshIdentity (a CRD rule or an admission policy); the agents will not know this number");
                }
                Err(error) => return Err(error),
            }
            self.pending.remove(&name);
            self.settled.insert(name);
        }
        Ok(())
    }

    /// Settles every pending number the API server already holds, and
    /// reports a meaning the API server holds under another number.
    async fn list(&mut self) -> Result<(), kube::Error> {
        let mut params = ListParams::default().limit(LIST_PAGE);
        let (mut existing, mut unknown) = (0usize, 0usize);
        let mut meanings: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let page = self.untyped.list(&params).await?;
            for obj in &page.items {
                let Some(name) = obj.metadata.name.clone() else { continue };
                existing += 1;
                if let Some(m) = obj.data.get("spec").and_then(|s| serde_json::from_value(s.clone()).ok()).as_ref().and_then(meaning) {
                    meanings.insert(m, name.clone());
                }
                match self.pending.remove(&name) {
                    Some(want) => {
                        self.judge(&name, &want.spec, obj);
                        self.settled.insert(name);
                    }
                    None if !self.settled.contains(&name) => unknown += 1,
                    None => {}
                }
            }
            match page.metadata.continue_.as_deref() {
                Some(token) if !token.is_empty() => params = params.continue_token(token),
                _ => break,
            }
        }
        for (name, want) in &self.pending {
            if let Some(other) = meaning(&want.spec).and_then(|m| meanings.get(&m)) {
                self.state.metrics.k8s_identity_conflicts.inc();
                tracing::error!(
                    object = %name, holder = %other, meaning = %meaning(&want.spec).unwrap_or_default(),
                    "the API server already gives this meaning another number: agents may key it by either (identity-ca's state lost or restored from an old backup?)"
                );
            }
        }
        if unknown > 0 {
            tracing::warn!(unknown, "MeshIdentity objects the registry has not allocated (yet): a number it allocates later will conflict");
        }
        tracing::info!(existing, to_create = self.pending.len(), "MeshIdentity objects listed from the API server");
        Ok(())
    }

    fn judge(&self, name: &str, want: &MeshIdentitySpec, obj: &DynamicObject) {
        if let Found::Other(says) = found(want, obj) {
            self.state.metrics.k8s_identity_conflicts.inc();
            tracing::error!(
                object = %name, registry = %meaning(want).unwrap_or_default(), api_server = %says,
                "MeshIdentity holds another meaning than the registry's allocation; not overwritten: the agents key their maps by it (identity-ca's state lost or restored from an old backup, or another writer)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use meshguard_common::spiffe::{SpiffeId, TrustDomain};

    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn every_number_is_one_object_named_after_it() {
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let view = ClusterView {
            trust_domain: Some(TrustDomain::new("cluster.local").unwrap()),
            identities: [(web.clone(), 256)].into(),
            node_ids: [("node-1".to_owned(), 1)].into(),
            ..Default::default()
        };
        let names = |objs: Vec<MeshIdentity>| objs.iter().map(|o| o.metadata.name.clone().unwrap()).collect::<Vec<_>>();
        assert_eq!(names(wanted(&view)), ["256", "node-1"]);
        let numbers = convert::numbers_to_proto(&view.identities, &view.node_ids);
        assert_eq!(from_numbers(&numbers), wanted(&view));
        // Numbers the registry would never send are not published.
        let bad = proto::Numbers { identities: [("spiffe://cluster.local/ns/shop/sa/x".into(), 3)].into(), ..Default::default() };
        assert!(from_numbers(&bad).is_empty());
    }

    #[test]
    fn a_listed_object_is_an_allocation_or_says_why_not() {
        let obj = |name: &str, spec: serde_json::Value| -> DynamicObject {
            serde_json::from_value(serde_json::json!({"apiVersion": "meshguard.io/v1alpha1", "kind": "MeshIdentity", "metadata": {"name": name, "resourceVersion": "3"}, "spec": spec}))
                .unwrap()
        };
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            allocation_of(&obj("256", serde_json::json!({"spiffeId": web.to_string()}))),
            Ok(Allocation::Identity(web.clone(), 256))
        );
        assert_eq!(allocation_of(&obj("node-2", serde_json::json!({"node": "node-1"}))), Ok(Allocation::Node("node-1".into(), 2)));
        for (name, spec) in [
            ("256", serde_json::json!({"spiffeId": "not an id"})),
            ("256", serde_json::json!({"spiffeId": web.to_string(), "extra": 1})),
            ("12", serde_json::json!({"spiffeId": web.to_string()})),
            ("node-1", serde_json::json!({"spiffeId": web.to_string()})),
        ] {
            assert!(allocation_of(&obj(name, spec.clone())).is_err(), "{name}: {spec}");
        }
    }

    #[test]
    fn an_object_means_the_same_only_with_the_same_spec() {
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let want = MeshIdentity::identity(256, &web).spec;
        let obj = |spec: serde_json::Value| -> DynamicObject {
            serde_json::from_value(serde_json::json!({"apiVersion": "meshguard.io/v1alpha1", "kind": "MeshIdentity", "metadata": {"name": "256"}, "spec": spec}))
                .unwrap()
        };
        assert_eq!(found(&want, &obj(serde_json::json!({"spiffeId": web.to_string()}))), Found::Same);
        for other in [
            serde_json::json!({"spiffeId": "spiffe://cluster.local/ns/shop/sa/db"}),
            serde_json::json!({"node": "node-1"}),
            serde_json::json!({"spiffeId": web.to_string(), "node": "node-1"}),
            serde_json::json!({"spiffeId": web.to_string(), "extra": 1}),
            serde_json::json!({"spiffeId": "not an id"}),
            serde_json::Value::Null,
        ] {
            assert!(matches!(found(&want, &obj(other.clone())), Found::Other(_)), "{other}");
        }
    }
}
