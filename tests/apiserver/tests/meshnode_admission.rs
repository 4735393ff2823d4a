//! Link 3 of the chain of trust on Kubernetes: `deploy/admission/meshnode-writer.yaml`, the file
//! itself evaluated for every write (real HTTP requests, real tokens issued by the server), lets
//! the agent on node N write MeshNode N and nothing else, refuses every other service account,
//! and leaves cluster admins alone.

// The whole client module is shared with the `http` test binary; this one uses part of it.
#[allow(dead_code)]
#[path = "http/client.rs"]
mod client;

use meshguard_test_apiserver::{ApiServer, Config, ObjectKey, ServiceAccountToken, ValidatingAdmissionPolicies};
use serde_json::{Value, json};

use crate::client::{Client, Reply, pod};

const POLICY_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/admission/meshnode-writer.yaml");
const MESHNODES: &str = "/apis/meshguard.io/v1alpha1/meshnodes";
const DENIED: &str =
    "ValidatingAdmissionPolicy 'meshnode-writer.meshguard.io' with binding 'meshnode-writer.meshguard.io' denied request: ";

const KEY_1: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const KEY_2: &str = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA=";
const ATTACKER_KEY: &str = "ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZA=";

/// A server with the policy file as its admission, nodes `node-1` and `node-2`, and an agent pod
/// on each.
async fn cluster() -> ApiServer {
    let server = ApiServer::start().await.unwrap();
    let policy = ValidatingAdmissionPolicies::from_file(POLICY_FILE).expect("the policy file loads");
    server.set_admission(policy.hook());
    for node in ["node-1", "node-2"] {
        server.create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})).unwrap();
        let mut agent = pod("meshguard", &format!("meshguard-agent-{node}"), &[("app", "meshguard-agent")], node);
        agent["spec"]["serviceAccountName"] = json!("meshguard-agent");
        server.create(agent).unwrap();
    }
    server
}

fn uid(server: &ApiServer, key: &ObjectKey) -> String {
    let object = server.get(key).unwrap_or_else(|| panic!("{key:?} exists"));
    object["metadata"]["uid"].as_str().expect("uid").to_owned()
}

/// A projected token of `namespace/service_account` bound to a pod on `node`, as the kubelet
/// mounts it (with the node claim Kubernetes 1.32+ adds).
fn pod_token(server: &ApiServer, namespace: &str, service_account: &str, pod_name: &str, node: &str) -> String {
    let pod_uid = uid(server, &ObjectKey::namespaced("v1", "Pod", namespace, pod_name));
    let node_uid = uid(server, &ObjectKey::cluster("v1", "Node", node));
    let spec = ServiceAccountToken::new(namespace, service_account)
        .audience(&Config::default().audience)
        .pod(pod_name, &pod_uid)
        .node(node, &node_uid);
    server.issue_token(spec).unwrap()
}

/// The agent on `node`.
fn agent(server: &ApiServer, node: &str) -> Client {
    Client::with_token(server, &pod_token(server, "meshguard", "meshguard-agent", &format!("meshguard-agent-{node}"), node))
}

fn mesh_node(name: &str, key: &str) -> Value {
    json!({
        "apiVersion": "meshguard.io/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": name},
        "spec": {"publicKey": key, "endpoint": "192.0.2.1:51820", "podCIDRs": ["10.244.1.0/24"]},
    })
}

fn path(name: &str) -> String {
    format!("{MESHNODES}/{name}")
}

fn stored(server: &ApiServer, name: &str) -> Option<Value> {
    server.get(&ObjectKey::cluster("meshguard.io/v1alpha1", "MeshNode", name))
}

#[track_caller]
fn assert_ok(reply: &Reply, code: u16) {
    assert_eq!(reply.code, code, "{}", reply.body);
}

/// A denial by the policy, with the message of the rule that failed.
#[track_caller]
fn assert_denied(reply: &Reply, name: &str, message: &str) {
    assert_eq!((reply.code, reply.body["reason"].as_str()), (422, Some("Invalid")), "{}", reply.body);
    assert_eq!(reply.body["message"], format!("meshnodes.meshguard.io \"{name}\" is forbidden: {DENIED}{message}"));
}

/// Every write of MeshNode `name` as `c` is refused with `message` and leaves the store as it
/// was: a create when there is none (then the admin stores one), then a replace, a status
/// replace, a patch and a delete.
async fn assert_every_write_denied(server: &ApiServer, c: &Client, name: &str, message: &str) {
    let admin = Client::admin(server);
    if stored(server, name).is_none() {
        let created = c.post(MESHNODES, &mesh_node(name, ATTACKER_KEY)).await;
        assert_denied(&created, name, message);
        assert_eq!(stored(server, name), None, "a refused create stores nothing");
        assert_ok(&admin.post(MESHNODES, &mesh_node(name, KEY_2)).await, 201);
    }
    let before = stored(server, name).expect("stored");
    let revision = server.resource_version();

    let mut replaced = before.clone();
    replaced["spec"]["publicKey"] = json!(ATTACKER_KEY);
    assert_denied(&c.put(&path(name), &replaced).await, name, message);
    let mut status = before.clone();
    status["status"] = json!({"observedGeneration": 1});
    assert_denied(&c.put(&format!("{}/status", path(name)), &status).await, name, message);
    assert_denied(&c.merge_patch(&path(name), &json!({"spec": {"publicKey": ATTACKER_KEY}})).await, name, message);
    assert_denied(&c.delete(&path(name)).await, name, message);

    assert_eq!(stored(server, name), Some(before), "refused writes change nothing");
    assert_eq!(server.resource_version(), revision);
}

#[tokio::test]
async fn the_agent_writes_its_own_meshnode() {
    let server = cluster().await;
    let c = agent(&server, "node-1");

    let created = c.post(MESHNODES, &mesh_node("node-1", KEY_1)).await;
    assert_ok(&created, 201);
    let mut next = created.body.clone();
    next["spec"]["publicKey"] = json!(KEY_2);
    let replaced = c.put(&path("node-1"), &next).await;
    assert_ok(&replaced, 200);
    let mut status = replaced.body.clone();
    status["status"] = json!({"observedGeneration": 2});
    let status = c.put(&format!("{}/status", path("node-1")), &status).await;
    assert_ok(&status, 200);
    assert_ok(&c.merge_patch(&format!("{}/status", path("node-1")), &json!({"status": {"observedGeneration": 3}})).await, 200);
    assert_ok(&c.merge_patch(&path("node-1"), &json!({"spec": {"endpoint": "192.0.2.9:51820"}})).await, 200);
    let stored_now = stored(&server, "node-1").unwrap();
    assert_eq!((stored_now["spec"]["publicKey"].as_str(), stored_now["status"]["observedGeneration"].as_i64()), (Some(KEY_2), Some(3)));

    assert_ok(&c.delete(&path("node-1")).await, 200);
    assert_eq!(stored(&server, "node-1"), None);
}

#[tokio::test]
async fn the_agent_cannot_write_another_nodes_meshnode() {
    let server = cluster().await;
    let c = agent(&server, "node-1");
    let message = |other: &str| format!("the meshguard agent on node node-1 may write only MeshNode node-1, not {other}");
    // node-2's record, stored by its own agent first: node-1's agent can neither create one,
    // nor replace, re-status, patch or delete it.
    assert_ok(&agent(&server, "node-2").post(MESHNODES, &mesh_node("node-2", KEY_2)).await, 201);
    assert_every_write_denied(&server, &c, "node-2", &message("node-2")).await;
    // A node that has no record yet, and a name that is no node at all.
    assert_every_write_denied(&server, &c, "node-3", &message("node-3")).await;
    assert_every_write_denied(&server, &c, "node-1-evil", &message("node-1-evil")).await;
    assert_eq!(stored(&server, "node-2").unwrap()["spec"]["publicKey"], KEY_2);
}

#[tokio::test]
async fn an_agent_token_not_bound_to_a_node_is_refused() {
    let server = cluster().await;
    let message = "the meshguard agent's token is not bound to a node: run the agent with a projected service-account token on Kubernetes 1.32 or later";
    let audience = Config::default().audience;

    // A token bound to nothing (as a TokenRequest without a bound object or a legacy Secret).
    let unbound = server.issue_token(ServiceAccountToken::new("meshguard", "meshguard-agent").audience(&audience)).unwrap();
    assert_every_write_denied(&server, &Client::with_token(&server, &unbound), "node-1", message).await;

    // Bound to the agent's pod but without the node claim (a cluster before 1.32).
    let pod_uid = uid(&server, &ObjectKey::namespaced("v1", "Pod", "meshguard", "meshguard-agent-node-2"));
    let spec = ServiceAccountToken::new("meshguard", "meshguard-agent").audience(&audience).pod("meshguard-agent-node-2", &pod_uid);
    let pod_only = server.issue_token(spec).unwrap();
    assert_every_write_denied(&server, &Client::with_token(&server, &pod_only), "node-2", message).await;
}

#[tokio::test]
async fn other_service_accounts_in_meshguard_are_refused() {
    let server = cluster().await;
    // identity-ca's own pod on node-1: node-bound, in meshguard's namespace, and still not the
    // agent.
    let mut ca = pod("meshguard", "identity-ca-0", &[("app", "identity-ca")], "node-1");
    ca["spec"]["serviceAccountName"] = json!("identity-ca");
    server.create(ca).unwrap();
    let c = Client::with_token(&server, &pod_token(&server, "meshguard", "identity-ca", "identity-ca-0", "node-1"));
    let message =
        "system:serviceaccount:meshguard:identity-ca may not write MeshNodes: only the meshguard agent (meshguard/meshguard-agent) may";
    assert_every_write_denied(&server, &c, "node-1", message).await;
}

#[tokio::test]
async fn workload_service_accounts_elsewhere_are_refused() {
    let server = cluster().await;
    // A workload on node-1 whose service account is even named like the agent's.
    for (sa, name) in [("web", "web-0"), ("meshguard-agent", "fake-agent-0")] {
        let mut workload = pod("shop", name, &[("app", "web")], "node-1");
        workload["spec"]["serviceAccountName"] = json!(sa);
        server.create(workload).unwrap();
        let c = Client::with_token(&server, &pod_token(&server, "shop", sa, name, "node-1"));
        let message = format!(
            "system:serviceaccount:shop:{sa} may not write MeshNodes: only the meshguard agent on a node writes the record of that node"
        );
        assert_every_write_denied(&server, &c, "node-1", &message).await;
    }
}

#[tokio::test]
async fn the_admin_writes_any_meshnode() {
    let server = cluster().await;
    let admin = Client::admin(&server);
    for name in ["node-1", "node-2", "not-a-node"] {
        let created = admin.post(MESHNODES, &mesh_node(name, KEY_1)).await;
        assert_ok(&created, 201);
        let mut next = created.body.clone();
        next["spec"]["publicKey"] = json!(KEY_2);
        assert_ok(&admin.put(&path(name), &next).await, 200);
        assert_ok(&admin.merge_patch(&format!("{}/status", path(name)), &json!({"status": {"observedGeneration": 1}})).await, 200);
        assert_ok(&admin.delete(&path(name)).await, 200);
        assert_eq!(stored(&server, name), None);
    }
}
