//! Kubernetes mode: the registry's workloads mirror the API server's pods,
//! so a node gets SVIDs only for identities of pods the API server places
//! on it (and the registry's watch stream hands the same pods to the
//! agents).
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
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use meshguard_common::cluster::Workload;

use crate::server::CaState;

/// What the registry should hold for `pod`: `None` when the pod has no
/// workload identity (not scheduled yet, finished, or on the host network,
/// where it shares the node's addresses).
pub fn workload_of(pod: &Pod) -> Option<Workload> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref();
    if status.and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed") {
        return None;
    }
    let ips =
        status.and_then(|s| s.pod_ips.as_ref()).map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect()).unwrap_or_default();
    Some(Workload {
        name: pod.metadata.name.clone()?,
        namespace: pod.metadata.namespace.clone()?,
        service_account: spec.service_account_name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".to_owned()),
        node,
        ips,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
    })
}

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
        let mut no_sa = base;
        no_sa["spec"]["serviceAccountName"] = serde_json::Value::Null;
        assert_eq!(workload_of(&pod(no_sa)).unwrap().service_account, "default");
    }
}
