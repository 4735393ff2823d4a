//! The Kubernetes cluster source against an API server speaking the real
//! list/watch protocol (resourceVersion, bookmarks, 410 Gone, restarts).

use std::sync::Arc;
use std::time::Duration;

use meshguard_common::cluster::{ClusterSource, ClusterView, NodeRecord};
use meshguard_common::key::PublicKey;
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use meshguard_k8s::KubeSource;
use meshguard_test_apiserver::{ApiServer, ObjectKey};
use serde_json::{Value, json};

const MG: &str = "meshguard.io/v1alpha1";

fn node(name: &str, cidr: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"podCIDRs": [cidr]},
           "status": {"addresses": [{"type": "InternalIP", "address": "192.168.7.1"}]}})
}

fn mesh_node(name: &str, key: u8, cidr: &str) -> Value {
    let record = NodeRecord {
        name: name.into(),
        public_key: PublicKey([key; 32]),
        endpoint: "192.168.7.1:51820".parse().unwrap(),
        pod_cidrs: vec![cidr.parse().unwrap()],
    };
    serde_json::to_value(meshguard_common::cluster::MeshNode::from_record(&record)).unwrap()
}

fn pod(ns: &str, name: &str, sa: &str, node: &str, ip: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
           "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
           "status": {"phase": "Running", "podIPs": [{"ip": ip}]}})
}

fn policy(ns: &str, name: &str, protocol: &str) -> Value {
    json!({"apiVersion": MG, "kind": "MeshPolicy", "metadata": {"name": name, "namespace": ns},
           "spec": {"selector": {"matchLabels": {"app": "db"}},
                    "ingress": [{"action": "Allow", "from": [{"serviceAccount": "web"}],
                                 "ports": [{"protocol": protocol, "port": 5432}]}]}})
}

fn identity(n: u32, id: &str) -> Value {
    serde_json::to_value(meshguard_common::cluster::MeshIdentity::identity(n, &SpiffeId::parse(id).unwrap())).unwrap()
}

fn node_id(n: u32, name: &str) -> Value {
    serde_json::to_value(meshguard_common::cluster::MeshIdentity::node(n, name)).unwrap()
}

async fn source(api: &ApiServer, dir: &std::path::Path) -> KubeSource {
    let path = dir.join("kubeconfig");
    std::fs::write(&path, api.admin_kubeconfig()).unwrap();
    let client = meshguard_k8s::client(Some(&path)).await.unwrap();
    KubeSource::start(client, TrustDomain::new("cluster.local").unwrap())
}

/// Waits (10 s at most) for a view `ok` accepts.
async fn until(src: &KubeSource, what: &str, ok: impl Fn(&ClusterView) -> bool) -> Arc<ClusterView> {
    let mut rx = src.subscribe();
    let wait = async {
        loop {
            let view = rx.borrow_and_update().clone();
            if ok(&view) {
                return view;
            }
            rx.changed().await.unwrap();
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), wait).await {
        Ok(v) => v,
        Err(_) => panic!("no view with {what}; the last: {:#?}", rx.borrow()),
    }
}

/// Polls `ok` every 20 ms for 10 s at most.
async fn wait(ok: impl Fn() -> bool, what: &str) {
    for _ in 0..500 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

fn web_id() -> SpiffeId {
    SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap()
}

#[tokio::test]
async fn pods_policies_nodes_and_numbers_reach_the_view_and_bad_objects_are_skipped() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for o in [
        node("node-1", "10.244.1.0/24"),
        node("node-2", "10.244.2.0/24"),
        mesh_node("node-1", 1, "10.244.1.0/24"),
        // Node 2's agent claims node 1's pods' range: refused.
        mesh_node("node-2", 2, "10.244.1.0/25"),
        // A MeshNode for no Node: refused.
        mesh_node("ghost", 3, "10.244.3.0/24"),
        pod("shop", "web-1", "web", "node-1", "10.244.1.5", "web"),
        // Node 1's kubelet claims an address of node 2's range, and one web-1 holds.
        pod("shop", "thief", "thief", "node-1", "10.244.2.9", "thief"),
        pod("shop", "twin", "twin", "node-1", "10.244.1.5", "twin"),
        // No identity: on the host network.
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
               "spec": {"nodeName": "node-1", "serviceAccountName": "kp", "hostNetwork": true, "containers": []}}),
        policy("shop", "db", "TCP"),
        // Past the CRD (the in-process server has no schema): refused alone.
        policy("shop", "quic", "QUIC"),
        json!({"apiVersion": MG, "kind": "MeshPolicy", "metadata": {"name": "junk", "namespace": "shop"}, "spec": {"ingress": 7}}),
        identity(256, "spiffe://cluster.local/ns/shop/sa/web"),
        node_id(1, "node-1"),
        // Malformed numbers: a reserved one, a name that is not its number.
        identity(7, "spiffe://cluster.local/ns/shop/sa/db"),
        json!({"apiVersion": MG, "kind": "MeshIdentity", "metadata": {"name": "db"}, "spec": {"spiffeId": "spiffe://cluster.local/ns/shop/sa/db"}}),
    ] {
        api.create(o).unwrap();
    }
    let src = source(&api, dir.path()).await;
    let view = until(&src, "the listed objects", |v| !v.workloads.is_empty()).await;
    assert_eq!(view.nodes.keys().collect::<Vec<_>>(), ["node-1"], "node-2 claims another's range, ghost has no Node");
    assert_eq!(view.workloads.keys().collect::<Vec<_>>(), ["shop/thief", "shop/twin", "shop/web-1"]);
    assert!(view.workloads.values().all(|w| w.ips.is_empty()), "an address outside the node's range, or held twice, is no one's");
    // Bad policies never seen valid stand in closed: their pods isolated in
    // the directions they name (ingress by default), nothing allowed.
    assert_eq!(view.policies.keys().collect::<Vec<_>>(), ["shop/db", "shop/junk", "shop/quic"]);
    let quic = &view.policies["shop/quic"].spec;
    assert_eq!((quic.ingress.as_deref(), quic.egress.as_deref()), (Some(&[][..]), None));
    assert_eq!(quic.selector.match_labels.get("app").map(String::as_str), Some("db"), "the pods it meant to restrict");
    assert_eq!(view.policies["shop/junk"].spec.ingress.as_deref(), Some(&[][..]));
    assert!(view.policies["shop/junk"].spec.selector.match_labels.is_empty(), "no readable selector: every pod of the namespace");
    assert_eq!(view.identities.iter().collect::<Vec<_>>(), [(&web_id(), &256)]);
    assert_eq!(view.node_ids.iter().collect::<Vec<_>>(), [(&"node-1".to_owned(), &1)]);
    assert_eq!(view.trust_domain.as_ref().map(|t| t.to_string()).as_deref(), Some("cluster.local"));
    let refused = src.refusals();
    assert_eq!(refused.get("MeshPolicy"), 2);
    assert_eq!(refused.get("MeshIdentity"), 2);
    assert_eq!(refused.get("MeshNode"), 2);
    assert_eq!(refused.get("Pod"), 3);

    // The thief's and the twin's gone: web-1's address is its own again.
    api.delete(&ObjectKey::namespaced("v1", "Pod", "shop", "thief")).unwrap();
    api.delete(&ObjectKey::namespaced("v1", "Pod", "shop", "twin")).unwrap();
    until(&src, "web-1 with its address", |v| v.workloads.len() == 1 && v.workloads["shop/web-1"].ips.len() == 1).await;

    // Changes, in order.
    api.update(pod("shop", "web-1", "web", "node-1", "10.244.1.6", "web")).unwrap();
    until(&src, "the pod's new IP", |v| v.workloads["shop/web-1"].ips == ["10.244.1.6".parse::<std::net::IpAddr>().unwrap()]).await;
    api.update(mesh_node("node-2", 2, "10.244.2.0/24")).unwrap();
    until(&src, "node-2 in its own range", |v| v.nodes.contains_key("node-2")).await;
    // An invalid change keeps the last valid policy (taking it away could open what it closed).
    api.update(policy("shop", "db", "QUIC")).unwrap();
    api.create(pod("shop", "web-2", "web", "node-2", "10.244.2.5", "web")).unwrap();
    let v = until(&src, "web-2", |v| v.workloads.contains_key("shop/web-2")).await;
    assert_eq!(v.policies["shop/db"].spec.ingress.as_ref().unwrap()[0].ports[0].protocol, meshguard_common::policy::Protocol::Tcp);
    assert_eq!(refused.get("MeshPolicy"), 3);
    // An agent started after the bad edit never saw the valid version: it
    // closes what the policy selects instead of leaving it open.
    let fresh = source(&api, dir.path()).await;
    let v = until(&fresh, "the listed objects", |v| v.policies.contains_key("shop/db")).await;
    assert_eq!(v.policies["shop/db"].spec.ingress.as_deref(), Some(&[][..]));
    drop(fresh);
    api.delete(&ObjectKey::namespaced("v1", "Pod", "shop", "web-1")).unwrap();
    api.delete(&ObjectKey::namespaced(MG, "MeshPolicy", "shop", "db")).unwrap();
    let v =
        until(&src, "web-1 and the policy gone", |v| !v.workloads.contains_key("shop/web-1") && !v.policies.contains_key("shop/db")).await;
    assert!(v.workloads.contains_key("shop/web-2"));
    // A pod that finishes leaves the view.
    let mut done = pod("shop", "web-2", "web", "node-2", "10.244.2.5", "web");
    done["status"]["phase"] = "Succeeded".into();
    api.update(done).unwrap();
    until(&src, "no workloads", |v| v.workloads.is_empty()).await;
}

/// What changes while the watches are down (closed, then expired: 410
/// Gone; or the API server restarting) is in the view after the re-list:
/// nothing lost, nothing deleted kept.
#[tokio::test]
async fn a_410_and_an_api_server_restart_lose_nothing() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for o in [
        node("node-1", "10.244.1.0/24"),
        mesh_node("node-1", 1, "10.244.1.0/24"),
        pod("shop", "web-1", "web", "node-1", "10.244.1.5", "web"),
        pod("shop", "web-2", "web", "node-1", "10.244.1.6", "web"),
        policy("shop", "db", "TCP"),
        identity(256, "spiffe://cluster.local/ns/shop/sa/web"),
    ] {
        api.create(o).unwrap();
    }
    let src = source(&api, dir.path()).await;
    until(&src, "two pods", |v| v.workloads.len() == 2 && v.policies.len() == 1).await;

    // 410: every watch closes, and the history it would resume from is compacted away.
    let lists = api.request_count(meshguard_test_apiserver::Verb::List);
    api.stop().await;
    api.delete(&ObjectKey::namespaced("v1", "Pod", "shop", "web-1")).unwrap();
    api.create(pod("shop", "web-3", "web", "node-1", "10.244.1.7", "web")).unwrap();
    api.delete(&ObjectKey::namespaced(MG, "MeshPolicy", "shop", "db")).unwrap();
    api.create(identity(257, "spiffe://cluster.local/ns/shop/sa/db")).unwrap();
    api.compact();
    api.restart().await.unwrap();
    let v = until(&src, "the changes made while down", |v| {
        v.workloads.keys().map(String::as_str).collect::<Vec<_>>() == ["shop/web-2", "shop/web-3"]
            && v.policies.is_empty()
            && v.identities.len() == 2
    })
    .await;
    assert!(v.nodes.contains_key("node-1"), "what did not change stays");
    // The kinds that changed were re-listed (a resumed watch could not
    // have shown them: their history is compacted away).
    let relisted: Vec<String> = api
        .requests()
        .iter()
        .filter(|r| r.verb == meshguard_test_apiserver::Verb::List)
        .skip(lists)
        .filter_map(|r| r.resource.clone())
        .collect();
    for kind in ["pods", "meshpolicies", "meshidentities"] {
        assert!(relisted.iter().any(|r| r == kind), "{kind} was not re-listed after its 410: {relisted:?}");
    }

    // Closed watches (no compaction): resumed from the last resourceVersion.
    api.close_watches();
    api.create(pod("shop", "web-4", "web", "node-1", "10.244.1.8", "web")).unwrap();
    api.delete(&ObjectKey::namespaced("v1", "Pod", "shop", "web-2")).unwrap();
    until(&src, "web-4 in, web-2 out", |v| v.workloads.keys().map(String::as_str).collect::<Vec<_>>() == ["shop/web-3", "shop/web-4"])
        .await;
}

/// Nothing is published before every kind has been listed: an agent on a
/// half view would drop what it should pass.
#[tokio::test]
async fn no_view_before_every_kind_is_listed() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    api.create(pod("shop", "web-1", "web", "node-1", "10.244.1.5", "web")).unwrap();
    api.stop().await;
    let src = source(&api, dir.path()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(**src.subscribe().borrow(), ClusterView::default(), "nothing while the API server is down");
    api.restart().await.unwrap();
    until(&src, "the pod", |v| v.workloads.contains_key("shop/web-1")).await;
}

#[tokio::test]
async fn an_agent_publishes_and_updates_its_mesh_node() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    api.create(node("node-3", "10.244.3.0/24")).unwrap();
    let src = source(&api, dir.path()).await;
    let mut record = NodeRecord {
        name: "node-3".into(),
        public_key: PublicKey([9; 32]),
        endpoint: "192.168.7.3:51820".parse().unwrap(),
        pod_cidrs: vec!["10.244.3.0/24".parse().unwrap()],
    };
    src.publish_node(&record).await.unwrap();
    until(&src, "node-3", |v| v.nodes.get("node-3") == Some(&record)).await;
    let stored = api.get(&ObjectKey::cluster(MG, "MeshNode", "node-3")).unwrap();
    assert_eq!(stored["spec"]["publicKey"], record.public_key.to_string());
    let accepted = |reason: &'static str| {
        let api = &api;
        move || {
            let status = &api.get(&ObjectKey::cluster(MG, "MeshNode", "node-3")).unwrap()["status"];
            status["conditions"][0]["reason"] == reason
        }
    };
    wait(accepted("Accepted"), "its own MeshNode reported Accepted").await;

    // A record outside the Node's range: nobody takes it, and its status says why.
    let mut outside = record.clone();
    outside.pod_cidrs = vec!["10.244.4.0/24".parse().unwrap()];
    src.publish_node(&outside).await.unwrap();
    wait(accepted("Refused"), "its own MeshNode reported Refused").await;
    let status = api.get(&ObjectKey::cluster(MG, "MeshNode", "node-3")).unwrap()["status"].clone();
    assert!(status["conditions"][0]["message"].as_str().unwrap().contains("10.244.4.0/24"), "{status}");
    assert!(!src.subscribe().borrow().nodes.contains_key("node-3"));
    src.publish_node(&record).await.unwrap();
    wait(accepted("Accepted"), "Accepted again").await;

    // A rotated key replaces the record; publishing it again writes nothing.
    record.public_key = PublicKey([10; 32]);
    src.publish_node(&record).await.unwrap();
    until(&src, "the new key", |v| v.nodes.get("node-3") == Some(&record)).await;
    api.clear_requests();
    src.publish_node(&record).await.unwrap();
    use meshguard_test_apiserver::Verb;
    // (Its status may still be written: that is the verdict, not the record.)
    let writes = api
        .requests()
        .iter()
        .filter(|r| {
            matches!(r.verb, Verb::Create | Verb::Update | Verb::Patch | Verb::Delete) && r.resource.as_deref() == Some("meshnodes")
        })
        .count();
    assert_eq!(writes, 0, "an unchanged record is not written again");
}
