//! Stopping and restarting the server, and the request log.

use meshguard_test_apiserver::{ApiServer, Verb};

use crate::client::{Client, End, pod};

#[tokio::test]
async fn restart_keeps_the_store_and_the_port() {
    let server = ApiServer::start().await.unwrap();
    let url = server.url();
    server.create(pod("ns", "a", &[], "n1")).unwrap();
    let c = Client::admin(&server);
    let from = server.resource_version();
    let mut w = c.watch(&format!("/api/v1/pods?watch=1&resourceVersion={from}")).await;
    assert_eq!(w.code, 200);

    server.stop().await;
    assert_eq!(w.end().await, End::Cut, "open watches are cut");
    assert!(tokio::net::TcpStream::connect(server.addr()).await.is_err(), "nothing listens while stopped");
    // Writes made while the server is down (as by another API server replica) are kept.
    server.create(pod("ns", "b", &[], "n1")).unwrap();

    server.restart().await.unwrap();
    assert_eq!(server.url(), url);
    let list = c.get("/api/v1/pods").await;
    assert_eq!(crate::client::names(&list.body), ["a", "b"]);
    assert_eq!(list.body["metadata"]["resourceVersion"], server.resource_version().to_string());
    let mut again = c.watch(&format!("/api/v1/pods?watch=1&resourceVersion={from}")).await;
    assert_eq!(again.event().await["object"]["metadata"]["name"], "b", "history survives the restart");
    // Restarting a running server works too.
    server.restart().await.unwrap();
    assert_eq!(c.get("/api/v1/pods").await.code, 200);
}

#[tokio::test]
async fn requests_are_counted_by_verb() {
    let server = ApiServer::start().await.unwrap();
    let c = Client::admin(&server);
    c.post("/api/v1/namespaces/ns/pods", &pod("ns", "a", &[], "n1")).await;
    c.get("/api/v1/pods").await;
    c.get("/api/v1/namespaces/ns/pods/a").await;
    c.merge_patch("/api/v1/namespaces/ns/pods/a", &serde_json::json!({"metadata": {"labels": {"x": "y"}}})).await;
    let mut w = c.watch(&format!("/api/v1/pods?watch=1&timeoutSeconds=1&resourceVersion={}", server.resource_version())).await;
    assert_eq!(w.end().await, End::Clean);
    c.delete("/api/v1/namespaces/ns/pods/a").await;
    for (verb, n) in
        [(Verb::Create, 1), (Verb::List, 1), (Verb::Get, 1), (Verb::Patch, 1), (Verb::Watch, 1), (Verb::Delete, 1), (Verb::Update, 0)]
    {
        assert_eq!(server.request_count(verb), n, "{verb:?}");
    }
    let get = server.requests().into_iter().find(|r| r.verb == Verb::Get).unwrap();
    assert_eq!(
        (get.resource.as_deref(), get.namespace.as_deref(), get.name.as_deref(), get.user.as_deref(), get.code),
        (Some("pods"), Some("ns"), Some("a"), Some("admin"), 200)
    );
    server.clear_requests();
    assert!(server.requests().is_empty());
}
