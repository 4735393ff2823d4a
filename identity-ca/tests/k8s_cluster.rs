//! identity-ca's side of the cluster view on Kubernetes, against the
//! in-process API server: the numbers MeshIdentity objects already hold
//! adopted before anything allocates (or, where its registry disagrees,
//! nothing started: fail closed), the numbers its registry allocates
//! published as MeshIdentity objects (never overwritten, never deleted), MeshNode
//! objects mirrored into its registry (malformed ones skipped, deletions
//! missed while the watch was down caught by the relist), and no way for a
//! node or an admin to write around the API server.

#[allow(dead_code)]
#[path = "support/k8s.rs"]
mod support;

use std::time::Duration;

use meshguard_ca_client::registry::convert;
use meshguard_common::cluster::{MeshNode, NodeRecord, Workload};
use meshguard_common::key::PublicKey;
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use meshguard_identity_ca::k8s_numbers::Adoption;
use meshguard_identity_ca::registry::Registry;
use meshguard_identity_ca::server::CaServer;
use meshguard_identity_ca::store::Store;
use meshguard_test_apiserver::{ApiServer, ObjectKey, Verb};
use serde_json::{Value, json};

use crate::support::{attested_node, kube_ca, wait_for};

const GROUP: &str = "meshguard.io/v1alpha1";

fn record(name: &str, key: u8, third_octet: u8) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        public_key: PublicKey([key; 32]),
        endpoint: format!("192.168.1.{third_octet}:51820").parse().unwrap(),
        pod_cidrs: vec![format!("10.244.{third_octet}.0/24").parse().unwrap()],
    }
}

fn mesh_node(name: &str, key: u8, third_octet: u8) -> Value {
    serde_json::to_value(MeshNode::from_record(&record(name, key, third_octet))).unwrap()
}

fn pod(name: &str, sa: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.9"}]}
    })
}

fn web_workload() -> Workload {
    Workload {
        name: "web".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        node: "node-1".into(),
        ips: vec![],
        labels: Default::default(),
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap()
}

fn mesh_identity(api: &ApiServer, name: &str) -> Option<Value> {
    api.get(&ObjectKey::cluster(GROUP, "MeshIdentity", name)).map(|o| o["spec"].clone())
}

fn mesh_node_key(name: &str) -> ObjectKey {
    ObjectKey::cluster(GROUP, "MeshNode", name)
}

/// A CA state directory whose registry numbered web (on node-1) before
/// this CA ever reached the API server: an older backup, say.
fn state_with_web(dir: &std::path::Path) -> u32 {
    let store = Store::open(&dir.join("state"), meshguard_identity_ca::config::DB_FILE, "cluster.local").unwrap();
    let registry = Registry::open(store, TrustDomain::new("cluster.local").unwrap()).unwrap();
    registry.put_workload(web_workload()).unwrap();
    registry.identity_number(&id("web")).unwrap()
}

async fn wait_for_adoption(ca: &CaServer) -> Adoption {
    wait_for("the MeshIdentity numbers adopted or refused", || !matches!(ca.state.adoption(), Some(Adoption::Waiting))).await;
    ca.state.adoption().unwrap()
}

fn creates(api: &ApiServer) -> usize {
    api.requests().iter().filter(|r| r.resource.as_deref() == Some("meshidentities") && r.verb == Verb::Create).count()
}

/// A pod's identity and a MeshNode's node id are published as MeshIdentity
/// objects named after their numbers; the MeshNode itself reaches the
/// registry (and so auth-handshake). The objects outlive what they stand for.
#[tokio::test]
async fn the_registrys_numbers_are_published_and_mesh_nodes_mirrored() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let registry = &ca.state.registry;

    api.create(pod("web", "web", "node-1")).unwrap();
    wait_for("the pod's workload", || registry.hosts("node-1", &id("web"))).await;
    let n = registry.identity_number(&id("web")).expect("a number for the pod's identity");
    wait_for("MeshIdentity <n>", || mesh_identity(&api, &n.to_string()).is_some()).await;
    assert_eq!(mesh_identity(&api, &n.to_string()).unwrap(), json!({"spiffeId": id("web").to_string()}));

    api.create(mesh_node("node-1", 1, 1)).unwrap();
    wait_for("the MeshNode in the registry", || registry.view().nodes.get("node-1") == Some(&record("node-1", 1, 1))).await;
    let node_id = registry.node_id("node-1").expect("a node id");
    let name = format!("node-{node_id}");
    wait_for("MeshIdentity node-<n>", || mesh_identity(&api, &name).is_some()).await;
    assert_eq!(mesh_identity(&api, &name).unwrap(), json!({"node": "node-1"}));
    // An update of the record reaches the registry too.
    api.update(mesh_node("node-1", 9, 1)).unwrap();
    wait_for("the updated key", || registry.view().nodes.get("node-1").is_some_and(|r| r.public_key == PublicKey([9; 32]))).await;

    // Numbers are never reused, so their objects are never deleted.
    api.delete(&ObjectKey::namespaced("v1", "Pod", "shop", "web")).unwrap();
    api.delete(&mesh_node_key("node-1")).unwrap();
    wait_for("the pod and the node gone", || registry.workload_count() == 0 && registry.view().nodes.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(mesh_identity(&api, &n.to_string()).is_some() && mesh_identity(&api, &name).is_some());
    assert_eq!(api.requests().iter().filter(|r| r.verb == Verb::Delete && r.resource.as_deref() == Some("meshidentities")).count(), 0);
}

fn mesh_identity_object(name: &str, spec: Value) -> Value {
    json!({"apiVersion": GROUP, "kind": "MeshIdentity", "metadata": {"name": name}, "spec": spec})
}

/// The attack: identity-ca's state is lost (or restored from an older
/// backup) while the MeshIdentity objects the nodes key their maps by
/// remain. A fresh registry allocating from the first number again would
/// give 256 to web while every node enforces 256 as db, and auth-handshake
/// (which reads the registry) would write auth entries for the wrong pair.
/// So the CA adopts the objects' numbers before anything allocates.
#[tokio::test]
async fn a_fresh_ca_adopts_the_numbers_the_objects_hold() {
    let api = ApiServer::start().await.unwrap();
    let first = meshguard_common::cluster::alloc::FIRST_IDENTITY;
    let first_node = meshguard_common::cluster::alloc::FIRST_NODE_ID;
    api.create(mesh_identity_object(&first.to_string(), json!({"spiffeId": id("db").to_string()}))).unwrap();
    api.create(mesh_identity_object(&format!("node-{first_node}"), json!({"node": "node-9"}))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let registry = &ca.state.registry;
    assert_eq!(wait_for_adoption(&ca).await, Adoption::Adopted { identities: 1, nodes: 1 });
    assert_eq!(ca.state.readiness(), Ok(()));

    api.create(pod("web", "web", "node-1")).unwrap();
    wait_for("web's number", || registry.identity_number(&id("web")).is_some()).await;
    assert_ne!(registry.identity_number(&id("web")), Some(first), "web must not get the number the nodes enforce as db");
    assert_eq!(registry.identity_number(&id("db")), Some(first), "db keeps its number");
    api.create(mesh_node("node-2", 2, 2)).unwrap();
    wait_for("node-2's id", || registry.node_id("node-2").is_some()).await;
    assert_ne!(registry.node_id("node-2"), Some(first_node), "a new node must not get node-9's id");
    assert_eq!(registry.node_id("node-9"), Some(first_node));

    // web's number is published under its own name; the objects are untouched.
    let web_n = registry.identity_number(&id("web")).unwrap().to_string();
    wait_for("web's MeshIdentity", || mesh_identity(&api, &web_n).is_some()).await;
    assert_eq!(mesh_identity(&api, &first.to_string()).unwrap(), json!({"spiffeId": id("db").to_string()}));
    assert_eq!(mesh_identity(&api, &format!("node-{first_node}")).unwrap(), json!({"node": "node-9"}));
    assert_eq!(ca.state.metrics.k8s_identity_conflicts.get(), 0);
}

/// A MeshIdentity that exists with another meaning (written by another
/// writer after the CA adopted the objects) is the agents' number: never
/// overwritten, counted, and the numbers after it are still published.
#[tokio::test]
async fn a_conflicting_mesh_identity_is_counted_and_never_overwritten() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let registry = &ca.state.registry;
    wait_for_adoption(&ca).await;
    // Someone else's: 256 means db to the agents.
    let first = meshguard_common::cluster::alloc::FIRST_IDENTITY;
    api.create(mesh_identity_object(&first.to_string(), json!({"spiffeId": id("db").to_string()}))).unwrap();

    api.create(pod("web", "web", "node-1")).unwrap();
    wait_for("web's number", || registry.identity_number(&id("web")).is_some()).await;
    assert_eq!(registry.identity_number(&id("web")), Some(first), "the registry never saw the other writer's object");
    api.create(pod("api", "api", "node-1")).unwrap();
    wait_for("api's number", || registry.identity_number(&id("api")).is_some()).await;
    let api_n = registry.identity_number(&id("api")).unwrap().to_string();
    wait_for("the next number published", || mesh_identity(&api, &api_n).is_some()).await;

    let conflicts = || ca.state.metrics.k8s_identity_conflicts.get();
    wait_for("the conflict counted", || conflicts() == 1).await;
    assert_eq!(mesh_identity(&api, &first.to_string()).unwrap(), json!({"spiffeId": id("db").to_string()}), "not overwritten");
    assert_eq!(mesh_identity(&api, &api_n).unwrap(), json!({"spiffeId": id("api").to_string()}));
    assert!(ca.state.metrics.render().contains("meshguard_ca_k8s_identity_conflicts_total 1"), "{}", ca.state.metrics.render());
    // Settled: not retried, not counted again.
    let writes = |api: &ApiServer| {
        api.requests().iter().filter(|r| r.resource.as_deref() == Some("meshidentities") && r.verb == Verb::Create).count()
    };
    let before = writes(&api);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!((conflicts(), writes(&api)), (1, before));
}

/// The registry disagreeing with the objects (its state restored from an
/// older backup: it gives 256 to web, every node enforces 256 as db) fails
/// closed: nothing on Kubernetes starts, nothing is published or
/// overwritten, the registry's numbers are not served (auth-handshake
/// would write auth entries by them), and `/readyz` says why. Attestation
/// still works.
#[tokio::test]
async fn a_ca_that_disagrees_with_the_objects_starts_nothing_on_kubernetes() {
    use meshguard_ca_client::registry::proto;
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let web_n = state_with_web(dir.path());
    api.create(mesh_identity_object(&web_n.to_string(), json!({"spiffeId": id("db").to_string()}))).unwrap();
    api.create(pod("api", "api", "node-1")).unwrap();
    api.create(mesh_node("node-1", 1, 1)).unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let registry = &ca.state.registry;

    let Adoption::Refused { reason } = wait_for_adoption(&ca).await else { panic!("adopted numbers that disagree") };
    let names_both = format!("MeshIdentity {web_n} stands for {}, but the registry gives {web_n} to {}", id("db"), id("web"));
    assert!(reason.contains(&names_both), "{reason}");
    assert_eq!(ca.state.readiness(), Err(vec![reason.clone()]));
    assert_eq!(ca.state.metrics.k8s_identity_conflicts.get(), 1);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let touched: Vec<_> =
        api.requests().into_iter().filter(|r| r.resource.as_deref() != Some("meshidentities") || r.verb != Verb::List).collect();
    assert!(touched.is_empty(), "only the MeshIdentity list: {touched:?}");
    assert!(registry.identity_number(&id("api")).is_none() && registry.view().nodes.is_empty(), "no mirror started");
    assert_eq!(mesh_identity(&api, &web_n.to_string()).unwrap(), json!({"spiffeId": id("db").to_string()}), "not overwritten");

    // A node attests, but gets no node id and no numbers.
    let mut node = attested_node(&api, &ca, "node-1").await;
    assert_eq!(registry.node_id("node-1"), None);
    let refused = node.watch_cluster(proto::WatchClusterRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains(&names_both), "{refused:?}");
    // Nor workload SVIDs: which pods it hosts is not known from the API
    // server while the mirrors wait, only from the store.
    let sign = proto::SignWorkloadSvidsRequest {
        requests: vec![proto::WorkloadSvidRequest {
            spiffe_id: id("web").to_string(),
            csr: meshguard_identity_ca::csr::generate().unwrap().1,
        }],
    };
    let refused = node.sign_workload_svids(sign).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(creates(&api), 0);
}

/// The same meaning under another number disagrees too: the nodes key web
/// by 900, the registry by its own.
#[tokio::test]
async fn a_meaning_the_objects_give_another_number_is_refused_too() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let web_n = state_with_web(dir.path());
    api.create(mesh_identity_object("900", json!({"spiffeId": id("web").to_string()}))).unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let Adoption::Refused { reason } = wait_for_adoption(&ca).await else { panic!("adopted numbers that disagree") };
    assert!(
        reason.contains(&format!("MeshIdentity 900 stands for {}, but the registry gives {} {web_n}", id("web"), id("web"))),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(mesh_identity(&api, &web_n.to_string()).is_none(), "the registry's number not published");
    assert_eq!(ca.state.registry.identity_number(&id("web")), Some(web_n), "nor changed");
}

/// A healthy CA restarted against the objects it wrote agrees with them:
/// nothing new adopted, ready, nothing written.
#[tokio::test]
async fn a_restarted_ca_agrees_with_its_own_objects() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    api.create(pod("web", "web", "node-1")).unwrap();
    api.create(mesh_node("node-1", 1, 1)).unwrap();
    let registry = &ca.state.registry;
    wait_for("both numbers", || registry.identity_number(&id("web")).is_some() && registry.node_id("node-1").is_some()).await;
    let (web_n, node_n) = (registry.identity_number(&id("web")).unwrap(), registry.node_id("node-1").unwrap());
    wait_for("both published", || {
        mesh_identity(&api, &web_n.to_string()).is_some() && mesh_identity(&api, &format!("node-{node_n}")).is_some()
    })
    .await;
    let before = registry.view();
    ca.shutdown().await;

    api.clear_requests();
    let ca = kube_ca(&api, dir.path()).await;
    assert_eq!(wait_for_adoption(&ca).await, Adoption::Adopted { identities: 0, nodes: 0 });
    assert_eq!(ca.state.readiness(), Ok(()));
    wait_for("the pods relisted", || ca.state.registry.hosts("node-1", &id("web"))).await;
    assert_eq!(ca.state.registry.view(), before);
    assert_eq!((creates(&api), ca.state.metrics.k8s_identity_conflicts.get()), (0, 0));
}

/// While the API server cannot be reached at start the objects cannot be
/// listed: nothing allocates, the numbers are not served and the CA is not
/// ready; the list is retried, and once it succeeds everything starts.
#[tokio::test]
async fn the_numbers_wait_for_the_api_server_at_start() {
    let api = ApiServer::start().await.unwrap();
    api.create(mesh_identity_object("256", json!({"spiffeId": id("db").to_string()}))).unwrap();
    api.create(pod("web", "web", "node-1")).unwrap();
    api.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(ca.state.adoption(), Some(Adoption::Waiting));
    let Err(reasons) = ca.state.readiness() else { panic!("ready before the numbers were checked") };
    assert!(reasons[0].contains("not listed yet"), "{reasons:?}");

    api.restart().await.unwrap();
    assert_eq!(wait_for_adoption(&ca).await, Adoption::Adopted { identities: 1, nodes: 0 });
    assert_eq!(ca.state.readiness(), Ok(()));
    wait_for("web's number", || ca.state.registry.identity_number(&id("web")).is_some()).await;
    assert_eq!(ca.state.registry.identity_number(&id("web")), Some(257));
}

/// One malformed MeshNode, at the list or in the watch, is skipped and
/// counted; its neighbours are mirrored and the watch goes on.
#[tokio::test]
async fn a_malformed_mesh_node_is_skipped_and_its_neighbours_mirrored() {
    let api = ApiServer::start().await.unwrap();
    // Raw JSON through the test controls: past any schema.
    let mut bad = mesh_node("node-bad", 7, 7);
    bad["spec"]["publicKey"] = json!("not base64!");
    api.create(bad).unwrap();
    api.create(mesh_node("node-2", 2, 2)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let registry = &ca.state.registry;
    let invalid = || ca.state.metrics.denied_count("invalid_mesh_node");

    wait_for("node-2 from the list", || registry.view().nodes.contains_key("node-2")).await;
    assert!(!registry.view().nodes.contains_key("node-bad"));
    assert_eq!(invalid(), 1);

    // In the watch: a malformed update keeps the record the registry holds;
    // a record taking node-2's range is refused; a valid node after them arrives.
    let mut broken = mesh_node("node-2", 2, 2);
    broken["spec"]["endpoint"] = json!("nowhere");
    api.update(broken).unwrap();
    let mut thief = mesh_node("node-4", 4, 4);
    thief["spec"]["podCIDRs"] = json!(["10.244.2.0/25"]);
    api.create(thief).unwrap();
    api.create(mesh_node("node-3", 3, 3)).unwrap();
    wait_for("node-3 from the watch", || registry.view().nodes.contains_key("node-3")).await;
    let nodes = registry.view().nodes;
    assert_eq!(nodes.keys().collect::<Vec<_>>(), ["node-2", "node-3"]);
    assert_eq!(nodes["node-2"], record("node-2", 2, 2), "the malformed update changed nothing");
    assert_eq!((invalid(), ca.state.metrics.denied_count("conflicting_node_record")), (2, 1));
}

/// A MeshNode deleted while the watch was down (the API server stopped,
/// its history compacted: 410 Gone, then a relist) leaves the registry.
#[tokio::test]
async fn a_mesh_node_deleted_while_the_watch_was_down_is_removed_after_the_relist() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let registry = &ca.state.registry;
    api.create(mesh_node("node-1", 1, 1)).unwrap();
    api.create(mesh_node("node-2", 2, 2)).unwrap();
    wait_for("both nodes", || registry.view().nodes.len() == 2).await;

    api.stop().await;
    api.delete(&mesh_node_key("node-1")).unwrap();
    api.create(mesh_node("node-3", 3, 3)).unwrap();
    api.compact();
    api.restart().await.unwrap();
    wait_for("the relist", || registry.view().nodes.keys().eq(["node-2", "node-3"])).await;
    // node-1's id stays allocated, and published.
    let name = format!("node-{}", registry.node_id("node-1").unwrap());
    wait_for("node-1's MeshIdentity", || mesh_identity(&api, &name).is_some()).await;
}

/// While the API server is down numbers wait, and are published when it is
/// back; a restarted CA lists what exists and writes nothing again.
#[tokio::test]
async fn numbers_wait_for_the_api_server_and_are_not_written_twice() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let listed = |api: &ApiServer| api.requests().iter().any(|r| r.resource.as_deref() == Some("meshidentities") && r.verb == Verb::List);
    wait_for("the first list", || listed(&api)).await;

    api.stop().await;
    // An attestation gives a node its id (no API server needed for that).
    ca.state.registry.allocate_node_ids(["node-9"]).unwrap();
    let name = format!("node-{}", ca.state.registry.node_id("node-9").unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(mesh_identity(&api, &name).is_none());
    api.restart().await.unwrap();
    wait_for("the number published after the outage", || mesh_identity(&api, &name).is_some()).await;
    assert_eq!(mesh_identity(&api, &name).unwrap(), json!({"node": "node-9"}));

    ca.shutdown().await;
    api.clear_requests();
    let ca = kube_ca(&api, dir.path()).await;
    wait_for("the restarted CA's list", || listed(&api)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(creates(&api), 0, "everything it holds exists already");
    assert_eq!(ca.state.metrics.k8s_identity_conflicts.get(), 0);
}

/// On Kubernetes a node's record is the MeshNode the admission policy let
/// its agent write; publishing through the CA would go around that.
#[tokio::test]
async fn on_kubernetes_a_node_cannot_publish_its_record_through_the_ca() {
    use meshguard_ca_client::registry::proto;
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let mut node = attested_node(&api, &ca, "node-1").await;
    let req = proto::PublishNodeRequest { node: Some(convert::node_to_proto(&record("node-1", 1, 1))) };
    let refused = node.publish_node(req).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("on Kubernetes nodes publish MeshNode objects"), "{refused:?}");
    // Nothing reached the registry, so nothing reached the other nodes.
    assert!(ca.state.registry.view().nodes.is_empty());
}

/// The admin API's writes of what the API server owns would be erased by
/// the next relist (or, for a workload, hand a node SVIDs no pod
/// justifies): refused, saying where to write instead.
#[tokio::test]
async fn on_kubernetes_the_admin_api_does_not_write_what_the_api_server_owns() {
    use meshguard_ca_client::registry::proto;
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let mut admin = meshguard_identity_ca::admin::connect(&ca.admin_socket).await.unwrap();
    let web = web_workload();
    fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str, says: &str) {
        let e = r.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{what}: {e:?}");
        assert!(e.message().contains(says), "{what}: {e:?}");
    }
    refused(
        admin.put_workload(proto::PutWorkloadRequest { workload: Some(convert::workload_to_proto(&web)) }).await,
        "put workload",
        "pods",
    );
    refused(
        admin.delete_workload(proto::DeleteWorkloadRequest { namespace: "shop".into(), name: "web".into() }).await,
        "delete workload",
        "pods",
    );
    let policy = "apiVersion: meshguard.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: p, namespace: shop}\nspec: {selector: {}}\n";
    refused(admin.put_policy(proto::PutPolicyRequest { yaml: policy.into() }).await, "put policy", "MeshPolicy");
    refused(
        admin.delete_policy(proto::DeletePolicyRequest { namespace: "shop".into(), name: "p".into() }).await,
        "delete policy",
        "MeshPolicy",
    );
    let view = ca.state.registry.view();
    assert!(view.workloads.is_empty() && view.policies.is_empty(), "{view:?}");

    // A node's record is its MeshNode; its attestation is the CA's own, and
    // forgetting it is how its credential is revoked.
    let mut node = attested_node(&api, &ca, "node-1").await;
    api.create(mesh_node("node-1", 1, 1)).unwrap();
    api.create(mesh_node("node-2", 2, 2)).unwrap();
    wait_for("both records", || ca.state.registry.view().nodes.len() == 2).await;
    admin.delete_node(proto::DeleteNodeRequest { name: "node-1".into() }).await.unwrap();
    let revoked = node.get_bundle(proto::GetBundleRequest {}).await.unwrap_err();
    assert_eq!(revoked.code(), tonic::Code::PermissionDenied, "{revoked:?}");
    refused(
        admin.delete_node(proto::DeleteNodeRequest { name: "node-2".into() }).await,
        "delete a record",
        "kubectl delete meshnode node-2",
    );
    assert!(ca.state.registry.view().nodes.keys().eq(["node-1", "node-2"]), "records follow their MeshNodes");
}
