//! Writes: create, replace with conflicts, patches, the status subresource, delete, bad bodies,
//! and the admission hook.

use std::sync::{Arc, Mutex};

use hyper::Method;
use meshguard_test_apiserver::{AdmissionRequest, ApiServer, ObjectKey, Operation};
use serde_json::{Value, json};

use crate::client::{Client, pod, rv};

const POLICIES: &str = "/apis/meshguard.io/v1alpha1/namespaces/shop/meshpolicies";

fn policy(name: &str) -> Value {
    json!({
        "apiVersion": "meshguard.io/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": name, "labels": {"team": "a"}},
        "spec": {"selector": {"app": "web"}, "ingress": [{"from": "api"}]},
        "status": {"observedGeneration": 9},
    })
}

fn status(body: &Value) -> (&str, i64) {
    assert_eq!(
        (body["kind"].as_str(), body["apiVersion"].as_str(), body["status"].as_str()),
        (Some("Status"), Some("v1"), Some("Failure"))
    );
    (body["reason"].as_str().unwrap_or(""), body["code"].as_i64().unwrap_or(0))
}

#[tokio::test]
async fn create_then_conflicting_create_and_replace() {
    let server = ApiServer::start().await.unwrap();
    let c = Client::admin(&server);
    let created = c.post(POLICIES, &policy("allow-web")).await;
    assert_eq!(created.code, 201);
    let obj = created.body;
    assert_eq!(obj["metadata"]["namespace"], "shop");
    assert_eq!(obj["metadata"]["generation"], 1);
    assert_eq!(rv(&obj), server.resource_version());
    assert!(obj["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert!(obj["metadata"]["creationTimestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(obj.get("status").is_none(), "a create does not set status");

    let again = c.post(POLICIES, &policy("allow-web")).await;
    assert_eq!((again.code, status(&again.body)), (409, ("AlreadyExists", 409)));
    assert_eq!(again.body["message"], "meshpolicies.meshguard.io \"allow-web\" already exists");

    // Replace with the current resourceVersion: spec change bumps generation, status is ignored.
    let path = format!("{POLICIES}/allow-web");
    let mut next = obj.clone();
    next["spec"]["ingress"] = json!([]);
    next["status"] = json!({"observedGeneration": 5});
    let replaced = c.put(&path, &next).await;
    assert_eq!(replaced.code, 200, "{:?}", replaced.body);
    assert_eq!(replaced.body["metadata"]["generation"], 2);
    assert!(replaced.body.get("status").is_none());
    assert!(rv(&replaced.body) > rv(&obj));

    // The stale copy conflicts.
    let stale = c.put(&path, &obj).await;
    assert_eq!((stale.code, status(&stale.body)), (409, ("Conflict", 409)));
    assert!(stale.body["message"].as_str().unwrap().contains("the object has been modified"));

    // Name mismatch, missing object.
    let mut renamed = replaced.body.clone();
    renamed["metadata"]["name"] = json!("other");
    assert_eq!(c.put(&path, &renamed).await.code, 400);
    assert_eq!(c.put(&format!("{POLICIES}/missing"), &policy("missing")).await.code, 404);

    // generateName, and a bad name.
    let mut generated = policy("");
    generated["metadata"] = json!({"generateName": "auto-"});
    let g = c.post(POLICIES, &generated).await;
    assert_eq!(g.code, 201);
    assert!(g.body["metadata"]["name"].as_str().unwrap().starts_with("auto-"));
    assert_eq!(c.post(POLICIES, &policy("Not_Valid")).await.code, 422);
}

#[tokio::test]
async fn patches_and_the_status_subresource() {
    let server = ApiServer::start().await.unwrap();
    let c = Client::admin(&server);
    let path = format!("{POLICIES}/p");
    let created = c.post(POLICIES, &policy("p")).await.body;

    // A status write changes status only; generation stays.
    let s = c.merge_patch(&format!("{path}/status"), &json!({"status": {"observedGeneration": 1}, "spec": {"selector": null}})).await;
    assert_eq!(s.code, 200, "{:?}", s.body);
    assert_eq!(s.body["status"]["observedGeneration"], 1);
    assert_eq!(s.body["spec"], created["spec"]);
    assert_eq!(s.body["metadata"]["generation"], 1);
    assert!(rv(&s.body) > rv(&created));

    // PUT to /status likewise.
    let mut body = s.body.clone();
    body["status"]["ready"] = json!(true);
    body["metadata"]["labels"] = json!({"changed": "no"});
    let put = c.put(&format!("{path}/status"), &body).await;
    assert_eq!(put.code, 200);
    assert_eq!(put.body["status"]["ready"], true);
    assert_eq!(put.body["metadata"]["labels"], json!({"team": "a"}));
    assert_eq!(put.body["metadata"]["generation"], 1);

    // A merge patch of labels: metadata only, generation stays; of spec: generation moves.
    let labels = c.merge_patch(&path, &json!({"metadata": {"labels": {"team": null, "tier": "1"}}})).await.body;
    assert_eq!(labels["metadata"]["labels"], json!({"tier": "1"}));
    assert_eq!(labels["metadata"]["generation"], 1);
    let spec = c.merge_patch(&path, &json!({"spec": {"ingress": null}, "status": {"ready": false}})).await.body;
    assert_eq!(spec["metadata"]["generation"], 2);
    assert_eq!(spec["spec"], json!({"selector": {"app": "web"}}));
    assert_eq!(spec["status"]["ready"], true, "the main resource does not write status");

    // An identical patch writes nothing.
    let before = server.resource_version();
    let same = c.merge_patch(&path, &json!({"spec": {"selector": {"app": "web"}}})).await;
    assert_eq!((same.code, server.resource_version()), (200, before));

    // JSON patch, with a failing test op changing nothing.
    let jp = c.json_patch(&path, &json!([{"op": "add", "path": "/metadata/labels/x", "value": "y"}])).await;
    assert_eq!(jp.body["metadata"]["labels"]["x"], "y");
    let failed = c.json_patch(&path, &json!([{"op": "test", "path": "/metadata/labels/x", "value": "z"}])).await;
    assert_eq!(failed.code, 422);

    // A patch carrying a stale resourceVersion is a precondition.
    let stale =
        c.merge_patch(&path, &json!({"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "spec": {"a": 1}})).await;
    assert_eq!(stale.code, 409);

    // Unsupported patch types.
    let r = c.send(Method::PATCH, &path, Some("application/strategic-merge-patch+json"), b"{}".to_vec()).await;
    assert_eq!((r.code, status(&r.body).0), (415, "UnsupportedMediaType"));
    let r = c.send(Method::PATCH, &path, Some("text/plain"), b"{}".to_vec()).await;
    assert_eq!(r.code, 415);
}

#[tokio::test]
async fn delete_and_not_found() {
    let server = ApiServer::start().await.unwrap();
    let c = Client::admin(&server);
    server.create(pod("ns", "a", &[], "n1")).unwrap();
    let path = "/api/v1/namespaces/ns/pods/a";
    let d = c.delete(path).await;
    assert_eq!((d.code, d.body["metadata"]["name"].as_str()), (200, Some("a")));
    assert_eq!(rv(&d.body), server.resource_version());
    let missing = c.get(path).await;
    assert_eq!((missing.code, status(&missing.body)), (404, ("NotFound", 404)));
    assert_eq!(missing.body["message"], "pods \"a\" not found");
    assert_eq!(c.delete(path).await.code, 404);

    // Preconditions in DeleteOptions.
    let b = server.create(pod("ns", "b", &[], "n1")).unwrap();
    let opts = json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "not-it"}});
    let r = c.send(Method::DELETE, "/api/v1/namespaces/ns/pods/b", Some("application/json"), opts.to_string().into_bytes()).await;
    assert_eq!(r.code, 409);
    let opts = json!({"preconditions": {"uid": b["metadata"]["uid"]}});
    let r = c.send(Method::DELETE, "/api/v1/namespaces/ns/pods/b", Some("application/json"), opts.to_string().into_bytes()).await;
    assert_eq!(r.code, 200);

    // Finalizers hold the object until the last one is removed.
    let mut f = pod("ns", "f", &[], "n1");
    f["metadata"]["finalizers"] = json!(["meshguard.io/cleanup"]);
    server.create(f).unwrap();
    let marked = c.delete("/api/v1/namespaces/ns/pods/f").await;
    assert!(marked.body["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(c.get("/api/v1/namespaces/ns/pods/f").await.code, 200);
    c.merge_patch("/api/v1/namespaces/ns/pods/f", &json!({"metadata": {"finalizers": []}})).await;
    assert_eq!(c.get("/api/v1/namespaces/ns/pods/f").await.code, 404);
}

#[tokio::test]
async fn bad_requests_get_400_and_change_nothing() {
    let server = ApiServer::start().await.unwrap();
    let c = Client::admin(&server);
    let before = server.resource_version();
    for body in [&b"{not json"[..], b"", b"[1,2]", b"\"str\"", b"{\"metadata\": 5}"] {
        let r = c.send(Method::POST, POLICIES, Some("application/json"), body.to_vec()).await;
        assert_eq!((r.code, status(&r.body)), (400, ("BadRequest", 400)), "{}", String::from_utf8_lossy(body));
    }
    let wrong_kind = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}});
    assert_eq!(c.post(POLICIES, &wrong_kind).await.code, 400);
    let wrong_ns = json!({"metadata": {"name": "x", "namespace": "elsewhere"}});
    assert_eq!(c.post(POLICIES, &wrong_ns).await.code, 400);
    let mut fixture = policy("p");
    fixture["metadata"]["namespace"] = json!("shop");
    server.create(fixture).unwrap();
    let after_fixture = server.resource_version();
    let r = c.send(Method::PATCH, &format!("{POLICIES}/p"), Some("application/merge-patch+json"), b"{oops".to_vec()).await;
    assert_eq!(r.code, 400);
    let r = c.send(Method::PATCH, &format!("{POLICIES}/p"), Some("application/json-patch+json"), b"{}".to_vec()).await;
    assert_eq!(r.code, 422);
    assert_eq!(after_fixture, before + 1);
    assert_eq!(server.resource_version(), after_fixture);
    // Methods a path does not take.
    assert_eq!(c.send(Method::POST, "/api/v1/pods", Some("application/json"), b"{}".to_vec()).await.code, 405);
    assert_eq!(c.delete(POLICIES).await.code, 405);
}

#[tokio::test]
async fn admission_rejections_change_nothing() {
    let server = ApiServer::start().await.unwrap();
    server.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"env": "prod"}}})).unwrap();
    let seen: Arc<Mutex<Vec<AdmissionRequest>>> = Arc::default();
    let log = seen.clone();
    server.set_admission(Arc::new(move |req: &AdmissionRequest| {
        log.lock().unwrap().push(req.clone());
        let obj = req.object.as_ref().or(req.old_object.as_ref()).cloned().unwrap_or_default();
        if obj["spec"]["deny"] == true {
            return Err(
                "ValidatingAdmissionPolicy 'meshpolicy-rules' with binding 'meshpolicy-rules' denied request: deny is set".to_owned()
            );
        }
        if req.operation == Operation::Delete && obj["metadata"]["labels"]["protected"] == "yes" {
            return Err("protected policies cannot be deleted".to_owned());
        }
        Ok(())
    }));
    let c = Client::admin(&server);

    let mut denied = policy("bad");
    denied["spec"]["deny"] = json!(true);
    let before = server.resource_version();
    let r = c.post(POLICIES, &denied).await;
    assert_eq!((r.code, status(&r.body)), (422, ("Invalid", 422)));
    assert!(r.body["message"].as_str().unwrap().contains("denied request: deny is set"), "{}", r.body["message"]);
    assert_eq!(server.resource_version(), before);
    assert!(server.get(&ObjectKey::namespaced("meshguard.io/v1alpha1", "MeshPolicy", "shop", "bad")).is_none());

    let mut protected = policy("keep");
    protected["metadata"]["labels"]["protected"] = json!("yes");
    assert_eq!(c.post(POLICIES, &protected).await.code, 201);
    let path = format!("{POLICIES}/keep");
    let upd = c.merge_patch(&path, &json!({"spec": {"deny": true}})).await;
    assert_eq!(upd.code, 422);
    assert_eq!(c.get(&path).await.body["metadata"]["generation"], 1, "a denied update changes nothing");
    assert_eq!(c.delete(&path).await.code, 422);
    assert_eq!(c.get(&path).await.code, 200);
    assert_eq!(c.merge_patch(&format!("{path}/status"), &json!({"status": {"ok": true}})).await.code, 200);

    // What the hook saw: operation, resource, user, objects, namespace object.
    let log = seen.lock().unwrap();
    let ops: Vec<(Operation, Option<&str>)> = log.iter().map(|r| (r.operation, r.sub_resource.as_deref())).collect();
    assert_eq!(
        ops,
        [
            (Operation::Create, None),
            (Operation::Create, None),
            (Operation::Update, None),
            (Operation::Delete, None),
            (Operation::Update, Some("status"))
        ]
    );
    let update = &log[2];
    assert_eq!((update.group.as_str(), update.version.as_str(), update.resource.as_str()), ("meshguard.io", "v1alpha1", "meshpolicies"));
    assert_eq!((update.namespace.as_deref(), update.name.as_str(), update.kind.as_str()), (Some("shop"), "keep", "MeshPolicy"));
    assert_eq!(update.user_info.username, "admin");
    assert!(update.user_info.groups.contains(&"system:masters".to_owned()));
    assert_eq!(update.old_object.as_ref().unwrap()["spec"].get("deny"), None);
    assert_eq!(update.object.as_ref().unwrap()["spec"]["deny"], true);
    assert_eq!(update.namespace_object.as_ref().unwrap()["metadata"]["labels"]["env"], "prod");
    assert!(log[3].object.is_none() && log[3].old_object.is_some());
    assert_eq!(update.request_json()["operation"], "UPDATE");
    assert_eq!(update.request_json()["userInfo"]["username"], "admin");
    drop(log);

    // Test controls bypass admission.
    server.create(denied).unwrap();
}

#[tokio::test]
async fn dry_run_admits_but_stores_nothing() {
    let server = ApiServer::start().await.unwrap();
    let c = Client::admin(&server);
    let before = server.resource_version();
    let r = c.post(&format!("{POLICIES}?dryRun=All"), &policy("p")).await;
    assert_eq!((r.code, r.body["metadata"]["name"].as_str()), (201, Some("p")));
    assert_eq!(server.resource_version(), before);
    assert_eq!(c.get(&format!("{POLICIES}/p")).await.code, 404);
}
