//! Kubernetes mode: the registry's node records mirror the MeshNode
//! objects the agents publish to the API server (each agent only its own:
//! the admission policy in `deploy/admission/`), so what reads the
//! registry's watch stream — auth-handshake — sees the nodes there too, and
//! every node gets its node id from the registry.
//!
//! A kube-runtime watcher lists then watches every MeshNode; after each
//! (re)list, records the list no longer holds are removed, so nothing
//! deleted while the watch was down survives it. Objects are untyped and
//! parsed one by one: a malformed one (past the CRD's rules, or from
//! another schema) is logged, counted and skipped — whatever record the
//! registry held for it stays, as when the registry refuses one (another
//! node's pod range or key) — and never stops the rest of the list.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt as _;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use meshguard_common::cluster::{MeshNode, NodeRecord};

use crate::registry::RegistryError;
use crate::server::CaState;

/// Runs until the process stops; the watcher retries with backoff.
pub async fn mirror(client: kube::Client, state: Arc<CaState>) {
    let api: kube::Api<DynamicObject> = kube::Api::all_with(client, &ApiResource::erase::<MeshNode>(&()));
    let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    let mut listed: BTreeSet<String> = BTreeSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(obj)) => {
                if let Some(name) = &obj.metadata.name {
                    listed.insert(name.clone());
                }
                apply(&state, &obj);
            }
            Ok(Event::InitDone) => {
                let gone: Vec<String> = state.registry.view().nodes.into_keys().filter(|n| !listed.contains(n)).collect();
                for name in gone {
                    remove(&state, &name);
                }
                tracing::info!(nodes = listed.len(), "MeshNodes listed from the API server");
            }
            Ok(Event::Apply(obj)) => apply(&state, &obj),
            Ok(Event::Delete(obj)) => {
                if let Some(name) = &obj.metadata.name {
                    remove(&state, name);
                }
            }
            // The watcher relists by itself; until then the registry keeps
            // the last records it knew.
            Err(error) => tracing::warn!(%error, "MeshNode watch failed; retrying"),
        }
    }
}

/// The node record a MeshNode object holds, or why it holds none.
pub fn record_of(obj: &DynamicObject) -> Result<NodeRecord, String> {
    let node: MeshNode = serde_json::to_value(obj).and_then(serde_json::from_value).map_err(|e| e.to_string())?;
    let record = node.record()?;
    // The name becomes a node id's meaning (MeshIdentity `node-<n>`) and a
    // SPIFFE path segment; the API server allows more than those do.
    meshguard_common::spiffe::validate_segment(&record.name).map_err(|e| format!("name {:?} is not a node name: {e}", record.name))?;
    Ok(record)
}

fn apply(state: &CaState, obj: &DynamicObject) {
    let name = obj.metadata.name.as_deref().unwrap_or_default();
    let record = match record_of(obj) {
        Ok(r) => r,
        Err(reason) => {
            state.metrics.denied("invalid_mesh_node");
            tracing::warn!(node = %name, %reason, "malformed MeshNode skipped; the record the registry holds for the node, if any, stays");
            return;
        }
    };
    match state.registry.put_node(record) {
        Ok(()) => {}
        Err(error @ RegistryError::Conflict { .. }) => {
            state.metrics.denied("conflicting_node_record");
            tracing::warn!(node = %name, %error, "MeshNode refused: it takes another node's pod range or key");
        }
        Err(error) => tracing::warn!(node = %name, %error, "cannot store a MeshNode in the registry"),
    }
}

fn remove(state: &CaState, name: &str) {
    if let Err(error) = state.registry.delete_node(name) {
        tracing::warn!(node = %name, %error, "cannot remove a deleted MeshNode from the registry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_mesh_node_is_a_record_or_says_why_not() {
        let base = serde_json::json!({
            "apiVersion": "meshguard.io/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": "node-1", "resourceVersion": "7", "uid": "u"},
            "spec": {"publicKey": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=", "endpoint": "192.168.1.1:51820", "podCIDRs": ["10.244.1.0/24"]},
            "status": {"conditions": []}
        });
        let r = record_of(&object(base.clone())).unwrap();
        assert_eq!((r.name.as_str(), r.public_key.0, r.endpoint.port(), r.pod_cidrs.len()), ("node-1", [1; 32], 51820, 1));
        for (path, value, why) in [
            ("/spec/publicKey", serde_json::json!("not base64!"), "key"),
            ("/spec/endpoint", serde_json::json!("nowhere"), "address"),
            ("/spec/podCIDRs", serde_json::json!(["10.244.1.0/33"]), "invalid ip"),
            ("/spec/extra", serde_json::json!(1), "unknown field"),
            ("/metadata/name", serde_json::json!("node:1"), "not a node name"),
        ] {
            let mut bad = base.clone();
            match bad.pointer_mut(path) {
                Some(v) => *v = value,
                None => bad["spec"]["extra"] = value,
            }
            let err = record_of(&object(bad)).unwrap_err();
            assert!(err.to_lowercase().contains(why), "{path}: {err}");
        }
        let mut no_spec = base;
        no_spec.as_object_mut().unwrap().remove("spec");
        assert!(record_of(&object(no_spec)).is_err());
    }
}
