//! Kubernetes mode: the registry's workloads mirror the API server's pods,
//! so a node gets SVIDs only for identities of pods the API server places
//! on it, and its policies mirror the MeshPolicy objects (the registry's
//! watch stream hands both to the agents).
//!
//! A kube-runtime watcher lists then watches every pod; after each
//! (re)list — at start, after a 410 Gone, after the API server restarts —
//! workloads the list no longer holds are removed, so nothing deleted
//! while the watch was down survives it. A pod the registry refuses is
//! logged and skipped, never fatal.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::DynamicObject;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use meshguard_common::policy::{MeshPolicy, MeshPolicyStatus};
use meshguard_k8s::objects::workload_of;

use crate::server::CaState;

fn key_of(pod: &Pod) -> Option<String> {
    Some(format!("{}/{}", pod.metadata.namespace.as_deref()?, pod.metadata.name.as_deref()?))
}

/// Runs until the process stops; the watcher retries with backoff.
pub async fn mirror(client: kube::Client, state: Arc<CaState>) {
    let pods: kube::Api<Pod> = kube::Api::all(client);
    let mut events = std::pin::pin!(watcher::watcher(pods, watcher::Config::default()).default_backoff());
    let mut listed: BTreeSet<String> = BTreeSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(pod)) => {
                if let Some(key) = key_of(&pod) {
                    listed.insert(key);
                }
                apply(&state, &pod);
            }
            Ok(Event::InitDone) => {
                let gone: Vec<String> = state.registry.view().workloads.keys().filter(|k| !listed.contains(*k)).cloned().collect();
                for key in gone {
                    remove(&state, &key);
                }
                tracing::info!(pods = listed.len(), "pods listed from the API server");
            }
            Ok(Event::Apply(pod)) => apply(&state, &pod),
            Ok(Event::Delete(pod)) => {
                if let Some(key) = key_of(&pod) {
                    remove(&state, &key);
                }
            }
            // The watcher relists by itself; until then the registry keeps
            // the last pods it knew.
            Err(error) => tracing::warn!(%error, "pod watch failed; retrying"),
        }
    }
}

fn apply(state: &CaState, pod: &Pod) {
    let Some(key) = key_of(pod) else { return };
    match workload_of(pod) {
        Some(w) => {
            if let Err(error) = state.registry.put_workload(w) {
                tracing::warn!(pod = %key, %error, "pod refused by the registry; it gets no SVID");
                state.metrics.denied("invalid_pod");
            }
        }
        None => remove(state, &key),
    }
}

fn remove(state: &CaState, key: &str) {
    if state.registry.view().workloads.contains_key(key)
        && let Err(error) = state.registry.delete_workload(key)
    {
        tracing::warn!(pod = %key, %error, "cannot remove a deleted pod from the registry");
    }
}

/// Runs until the process stops: MeshPolicy objects into the registry,
/// each one's verdict into its `status.conditions` (`Accepted`).
///
/// The watch is of untyped objects, each parsed on its own: one malformed
/// object (past the CRD's rules, or from an older schema) must not stop the
/// whole list from decoding.
pub async fn mirror_policies(client: kube::Client, state: Arc<CaState>) {
    let resource = kube::api::ApiResource::erase::<MeshPolicy>(&());
    let api: kube::Api<DynamicObject> = kube::Api::all_with(client.clone(), &resource);
    let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    let mut listed: BTreeSet<String> = BTreeSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(obj)) => {
                if let Some(key) = key_of_meta(&obj.metadata) {
                    listed.insert(key);
                }
                apply_policy(&client, &state, &obj).await;
            }
            Ok(Event::InitDone) => {
                let gone: Vec<String> = state.registry.view().policies.keys().filter(|k| !listed.contains(*k)).cloned().collect();
                for key in gone {
                    remove_policy(&state, &key);
                }
                tracing::info!(policies = listed.len(), "MeshPolicies listed from the API server");
            }
            Ok(Event::Apply(obj)) => apply_policy(&client, &state, &obj).await,
            Ok(Event::Delete(obj)) => {
                if let Some(key) = key_of_meta(&obj.metadata) {
                    remove_policy(&state, &key);
                }
            }
            Err(error) => tracing::warn!(%error, "MeshPolicy watch failed; retrying"),
        }
    }
}

fn key_of_meta(m: &ObjectMeta) -> Option<String> {
    Some(format!("{}/{}", m.namespace.as_deref()?, m.name.as_deref()?))
}

/// A valid policy replaces the registry's; an invalid one is refused and
/// the last accepted version of it (if any) stays enforced: taking it away
/// could open what it closed. Either way the object's status says so.
async fn apply_policy(client: &kube::Client, state: &CaState, obj: &DynamicObject) {
    let (Some(key), Some(namespace), Some(name)) =
        (key_of_meta(&obj.metadata), obj.metadata.namespace.as_deref(), obj.metadata.name.as_deref())
    else {
        return;
    };
    let verdict = serde_json::to_string(obj)
        .map_err(|e| e.to_string())
        .and_then(|text| MeshPolicy::from_json(&text).map_err(|e| e.to_string()))
        .and_then(|p| {
            // Only what enforcement reads: status and server-set metadata
            // (the resourceVersion moves on every status write) would churn
            // the agents.
            let mut stored = MeshPolicy::named(namespace, name, p.spec);
            stored.metadata.labels = p.metadata.labels;
            state.registry.put_policy(stored).map_err(|e| e.to_string())
        });
    if let Err(reason) = &verdict {
        tracing::warn!(policy = %key, %reason, "MeshPolicy refused; the previous version, if any, stays enforced");
        state.metrics.denied("invalid_policy");
    }
    let (status, reason, message) = match &verdict {
        Ok(()) => ("True", "Accepted", "enforced by every node's datapath".to_owned()),
        Err(reason) => ("False", "Invalid", reason.clone()),
    };
    let generation = obj.metadata.generation;
    let current = obj.data.get("status").cloned().and_then(|s| serde_json::from_value::<MeshPolicyStatus>(s).ok());
    let unchanged = current.as_ref().is_some_and(|s| {
        s.observed_generation == generation
            && s.conditions.iter().any(|c| c.type_ == "Accepted" && c.status == status && c.message == message)
    });
    if unchanged {
        return;
    }
    let condition = Condition {
        type_: "Accepted".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    };
    let patch = serde_json::json!({"status": MeshPolicyStatus { observed_generation: generation, conditions: vec![condition] }});
    let api: kube::Api<MeshPolicy> = kube::Api::namespaced(client.clone(), namespace);
    if let Err(error) = api.patch_status(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await {
        tracing::warn!(policy = %key, %error, "cannot write the MeshPolicy's status");
    }
}

fn remove_policy(state: &CaState, key: &str) {
    if state.registry.view().policies.contains_key(key)
        && let Err(error) = state.registry.delete_policy(key)
    {
        tracing::warn!(policy = %key, %error, "cannot remove a deleted MeshPolicy from the registry");
    }
}
