//! LIST: pagination consistent at the list's resourceVersion, selectors, resourceVersion
//! parameters, discovery.

use meshguard_test_apiserver::ApiServer;
use serde_json::json;

use crate::client::{Client, names, pod};

#[tokio::test]
async fn pages_are_consistent_at_the_lists_resource_version() {
    let server = ApiServer::start().await.unwrap();
    for i in 0..7 {
        server.create(pod("a", &format!("p{i}"), &[], "n1")).unwrap();
    }
    server.create(pod("b", "q0", &[], "n1")).unwrap();
    server.create(pod("b", "q1", &[], "n1")).unwrap();
    let c = Client::admin(&server);

    let first = c.get("/api/v1/pods?limit=4").await;
    assert_eq!(first.code, 200);
    assert_eq!(first.body["kind"], "PodList");
    assert_eq!(first.body["apiVersion"], "v1");
    assert_eq!(names(&first.body), ["p0", "p1", "p2", "p3"]);
    assert_eq!(first.body["metadata"]["remainingItemCount"], 5);
    for item in first.body["items"].as_array().unwrap() {
        assert_eq!((item["apiVersion"].as_str(), item["kind"].as_str()), (Some("v1"), Some("Pod")));
    }
    let list_rv = first.body["metadata"]["resourceVersion"].clone();
    assert_eq!(list_rv, server.resource_version().to_string());

    // Changes between pages do not show: the next pages are served at the first page's revision.
    server.create(pod("a", "p9", &[], "n1")).unwrap();
    server.delete(&meshguard_test_apiserver::ObjectKey::namespaced("v1", "Pod", "a", "p5")).unwrap();

    let token = first.body["metadata"]["continue"].as_str().unwrap().to_owned();
    let second = c.get(&format!("/api/v1/pods?limit=4&continue={token}")).await;
    assert_eq!(second.code, 200, "{:?}", second.body);
    assert_eq!(names(&second.body), ["p4", "p5", "p6", "q0"]);
    assert_eq!(second.body["metadata"]["resourceVersion"], list_rv);
    let token = second.body["metadata"]["continue"].as_str().unwrap().to_owned();
    let third = c.get(&format!("/api/v1/pods?limit=4&continue={token}")).await;
    assert_eq!(names(&third.body), ["q1"]);
    assert!(third.body["metadata"].get("continue").is_none());

    // A namespaced list, and a continue token from before a compaction.
    assert_eq!(names(&c.get("/api/v1/namespaces/b/pods").await.body), ["q0", "q1"]);
    server.compact();
    let expired = c.get(&format!("/api/v1/pods?limit=4&continue={token}")).await;
    assert_eq!(expired.code, 410);
    assert_eq!(expired.body["reason"], "Expired");
    let bad = c.get("/api/v1/pods?limit=4&continue=garbage").await;
    assert_eq!(bad.code, 400);
}

#[tokio::test]
async fn label_and_field_selectors() {
    let server = ApiServer::start().await.unwrap();
    server.create(pod("a", "web", &[("app", "web"), ("tier", "front")], "n1")).unwrap();
    server.create(pod("a", "api", &[("app", "api"), ("tier", "back")], "n2")).unwrap();
    server.create(pod("b", "db", &[("app", "db")], "n2")).unwrap();
    let mut unscheduled = pod("b", "pending", &[], "");
    unscheduled["spec"].as_object_mut().unwrap().remove("nodeName");
    server.create(unscheduled).unwrap();
    let c = Client::admin(&server);
    let list = |q: &'static str| {
        let c = &c;
        async move {
            let r = c.get(&format!("/api/v1/pods?{q}")).await;
            assert_eq!(r.code, 200, "{q}: {:?}", r.body);
            names(&r.body)
        }
    };
    assert_eq!(list("labelSelector=app%3Dweb").await, ["web"]);
    assert_eq!(list("labelSelector=app!%3Dweb").await, ["api", "db", "pending"]);
    assert_eq!(list("labelSelector=tier").await, ["api", "web"]);
    assert_eq!(list("labelSelector=!tier").await, ["db", "pending"]);
    assert_eq!(list("labelSelector=app+in+(web,db)").await, ["web", "db"]);
    assert_eq!(list("labelSelector=app%20notin%20(web,db)").await, ["api", "pending"]);
    assert_eq!(list("labelSelector=app,tier%3Dback").await, ["api"]);
    assert_eq!(list("fieldSelector=spec.nodeName%3Dn2").await, ["api", "db"]);
    assert_eq!(list("fieldSelector=spec.nodeName%3D").await, ["pending"]);
    assert_eq!(list("fieldSelector=metadata.namespace%3Db,metadata.name!%3Ddb").await, ["pending"]);
    assert_eq!(list("fieldSelector=metadata.name%3Dweb&labelSelector=app%3Dweb").await, ["web"]);
    // Selectors with a limit: pages of matches, no remainingItemCount.
    let r = c.get("/api/v1/pods?labelSelector=app&limit=2").await;
    assert_eq!(names(&r.body), ["api", "web"]);
    assert!(r.body["metadata"]["continue"].is_string());
    assert!(r.body["metadata"].get("remainingItemCount").is_none());

    let r = c.get("/api/v1/pods?fieldSelector=spec.hostname%3Dx").await;
    assert_eq!(r.code, 400);
    assert_eq!(r.body["reason"], "BadRequest");
    assert_eq!(r.body["message"], "field label not supported: spec.hostname");
    let r = c.get("/apis/meshguard.io/v1alpha1/meshpolicies?fieldSelector=spec.nodeName%3Dx").await;
    assert_eq!(r.code, 400, "custom resources select on metadata only");
    let r = c.get("/api/v1/pods?labelSelector=app+in+web").await;
    assert_eq!(r.code, 400);
}

#[tokio::test]
async fn resource_version_parameters() {
    let server = ApiServer::start().await.unwrap();
    server.create(pod("a", "one", &[], "n1")).unwrap();
    let before = server.resource_version();
    server.create(pod("a", "two", &[], "n1")).unwrap();
    let c = Client::admin(&server);
    let now = server.resource_version();

    let older = format!("resourceVersion={before}");
    for q in ["resourceVersion=0", "resourceVersion=0&resourceVersionMatch=NotOlderThan", older.as_str()] {
        let r = c.get(&format!("/api/v1/pods?{q}")).await;
        assert_eq!((r.code, names(&r.body)), (200, vec!["one".to_owned(), "two".to_owned()]), "{q}");
        assert_eq!(r.body["metadata"]["resourceVersion"], now.to_string());
    }
    let exact = c.get(&format!("/api/v1/pods?resourceVersion={before}&resourceVersionMatch=Exact")).await;
    assert_eq!(names(&exact.body), ["one"]);
    assert_eq!(exact.body["metadata"]["resourceVersion"], before.to_string());
    let future = c.get(&format!("/api/v1/pods?resourceVersion={}", now + 100)).await;
    assert_eq!((future.code, future.body["reason"].as_str()), (504, Some("Timeout")));
    let r = c.get("/api/v1/pods?resourceVersionMatch=NotOlderThan").await;
    assert_eq!(r.code, 422);
    server.compact();
    let r = c.get(&format!("/api/v1/pods?resourceVersion={before}&resourceVersionMatch=Exact")).await;
    assert_eq!(r.code, 410);
}

#[tokio::test]
async fn metadata_only_clients_get_partial_object_metadata() {
    let server = ApiServer::start().await.unwrap();
    server.create(pod("a", "web", &[("app", "web")], "n1")).unwrap();
    let c = Client::admin(&server).accepting("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json");
    let list = c.get("/api/v1/pods").await.body;
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert_eq!(list["items"][0]["kind"], "PartialObjectMetadata");
    assert_eq!(list["items"][0]["metadata"]["labels"]["app"], "web");
    assert!(list["items"][0].get("spec").is_none());
    let mut w = c.watch("/api/v1/pods?watch=1").await;
    let e = w.event().await;
    assert_eq!((e["object"]["kind"].as_str(), e["object"].get("spec")), (Some("PartialObjectMetadata"), None));
}

#[tokio::test]
async fn get_and_discovery() {
    let server = ApiServer::start().await.unwrap();
    server.create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})).unwrap();
    let c = Client::admin(&server);
    let node = c.get("/api/v1/nodes/n1").await;
    assert_eq!((node.code, node.body["kind"].as_str()), (200, Some("Node")));
    let missing = c.get("/apis/meshguard.io/v1alpha1/namespaces/a/meshpolicies/nope").await;
    assert_eq!(missing.code, 404);
    assert_eq!(
        missing.body,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "meshpolicies.meshguard.io \"nope\" not found", "reason": "NotFound",
            "details": {"name": "nope", "group": "meshguard.io", "kind": "meshpolicies"}, "code": 404,
        })
    );
    assert_eq!(c.get("/apis/nothing.io/v1/things").await.code, 404);

    assert_eq!(c.get("/api").await.body["versions"], json!(["v1"]));
    let groups = c.get("/apis").await.body;
    let group_names: Vec<&str> = groups["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(group_names, ["authentication.k8s.io", "meshguard.io"]);
    let mesh = c.get("/apis/meshguard.io/v1alpha1").await.body;
    assert_eq!(mesh["kind"], "APIResourceList");
    let resources: Vec<&str> = mesh["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(resources, ["meshpolicies", "meshpolicies/status", "meshnodes", "meshnodes/status", "meshidentities"]);
    let core = c.get("/api/v1").await.body;
    assert!(core["resources"].as_array().unwrap().iter().any(|r| r["name"] == "pods" && r["namespaced"] == true));
    let version = Client::anonymous(&server).get("/version").await;
    assert_eq!((version.code, version.body["major"].as_str()), (200, Some("1")));
}
