//! WATCH: replay from a resourceVersion, live events, selector transitions, bookmarks, 410 after
//! compaction, timeouts, cut connections, streaming lists.

use std::time::Duration;

use meshguard_test_apiserver::{ApiServer, Config, ObjectKey};
use serde_json::json;

use crate::client::{Client, End, pod, rv};

#[tokio::test]
async fn replays_history_in_order_then_streams_live() {
    let server = ApiServer::start().await.unwrap();
    let start = server.resource_version();
    let a = server.create(pod("ns", "a", &[], "n1")).unwrap();
    let mut a2 = a.clone();
    a2["spec"]["nodeName"] = json!("n2");
    let a2 = server.update(a2).unwrap();
    server.create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})).unwrap(); // another resource
    server.create(pod("other", "b", &[], "n1")).unwrap();
    let gone = server.delete(&ObjectKey::namespaced("v1", "Pod", "ns", "a")).unwrap();

    let c = Client::admin(&server);
    let mut w = c.watch(&format!("/api/v1/pods?watch=true&resourceVersion={start}")).await;
    assert_eq!(w.code, 200);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let e = w.event().await;
        seen.push((e["type"].as_str().unwrap().to_owned(), e["object"]["metadata"]["name"].as_str().unwrap().to_owned(), rv(&e["object"])));
    }
    let expect = |t: &str, n: &str, r: u64| (t.to_owned(), n.to_owned(), r);
    assert_eq!(
        seen,
        [
            expect("ADDED", "a", rv(&a)),
            expect("MODIFIED", "a", rv(&a2)),
            expect("ADDED", "b", rv(&a2) + 2),
            expect("DELETED", "a", rv(&gone))
        ]
    );
    assert!(rv(&gone) > rv(&a2), "a DELETED event carries a new resourceVersion");

    // Live, and scoped to a namespace on another watch.
    let mut ns_only = c.watch(&format!("/api/v1/namespaces/ns/pods?watch=1&resourceVersion={}", server.resource_version())).await;
    server.create(pod("other", "c", &[], "n1")).unwrap();
    server.create(pod("ns", "d", &[], "n1")).unwrap();
    let e = w.event().await;
    assert_eq!((e["type"].as_str(), e["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("c")));
    assert_eq!(e["object"]["kind"], "Pod");
    assert_eq!(w.event().await["object"]["metadata"]["name"], "d");
    assert_eq!(ns_only.event().await["object"]["metadata"]["name"], "d");
}

#[tokio::test]
async fn a_watch_without_resource_version_starts_with_the_current_state() {
    let server = ApiServer::start().await.unwrap();
    server.create(pod("ns", "a", &[], "n1")).unwrap();
    server.create(pod("ns", "b", &[], "n1")).unwrap();
    let mut w = Client::admin(&server).watch("/api/v1/pods?watch=1").await;
    assert_eq!(w.event().await["object"]["metadata"]["name"], "a");
    assert_eq!(w.event().await["object"]["metadata"]["name"], "b");
    server.create(pod("ns", "c", &[], "n1")).unwrap();
    let e = w.event().await;
    assert_eq!((e["type"].as_str(), e["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("c")));
}

#[tokio::test]
async fn objects_moving_across_a_selector_are_added_and_deleted() {
    let server = ApiServer::start().await.unwrap();
    server.create(pod("ns", "p", &[("app", "db")], "n1")).unwrap();
    let c = Client::admin(&server);
    let from = server.resource_version();
    let mut w = c.watch(&format!("/api/v1/pods?watch=1&labelSelector=app%3Dweb&resourceVersion={from}")).await;
    let mut by_node = c.watch(&format!("/api/v1/pods?watch=1&fieldSelector=spec.nodeName%3Dn1&resourceVersion={from}")).await;

    let path = "/api/v1/namespaces/ns/pods/p";
    let r = c.merge_patch(path, &json!({"metadata": {"labels": {"app": "web"}}})).await;
    assert_eq!(r.code, 200);
    let e = w.change().await;
    assert_eq!(e["type"], "ADDED");
    assert_eq!(e["object"]["metadata"]["labels"]["app"], "web");
    assert_eq!(by_node.change().await["type"], "MODIFIED");

    let moved = c.merge_patch(path, &json!({"metadata": {"labels": {"app": "db"}}, "spec": {"nodeName": "n2"}})).await;
    let e = w.change().await;
    assert_eq!(e["type"], "DELETED");
    // The previous content, at the new resourceVersion, as the watch cache sends it.
    assert_eq!(e["object"]["metadata"]["labels"]["app"], "web");
    assert_eq!(rv(&e["object"]), rv(&moved.body));
    let e = by_node.change().await;
    assert_eq!((e["type"].as_str(), e["object"]["spec"]["nodeName"].as_str()), (Some("DELETED"), Some("n1")));

    // Unrelated changes to a non-matching object stay invisible.
    c.merge_patch(path, &json!({"metadata": {"annotations": {"x": "y"}}})).await;
    w.quiet_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn bookmarks_carry_the_current_resource_version() {
    let server = ApiServer::start_with(Config { bookmark_interval: Duration::from_millis(100), ..Config::default() }).await.unwrap();
    server.create(pod("ns", "a", &[], "n1")).unwrap();
    let c = Client::admin(&server);
    let mut w = c.watch(&format!("/api/v1/pods?watch=1&allowWatchBookmarks=true&resourceVersion={}", server.resource_version())).await;
    let e = w.event().await;
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(
        e["object"],
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": server.resource_version().to_string()}})
    );

    // A write to another resource moves the revision on; the next bookmark says so.
    server.create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})).unwrap();
    let want = server.resource_version();
    loop {
        let e = w.event().await;
        assert_eq!(e["type"], "BOOKMARK");
        if rv(&e["object"]) == want {
            break;
        }
    }
    // Without allowWatchBookmarks there are none.
    let mut plain = c.watch(&format!("/api/v1/pods?watch=1&resourceVersion={want}")).await;
    plain.quiet_for(Duration::from_millis(100)).await;
    let mut plain_again = c.watch(&format!("/api/v1/pods?watch=1&resourceVersion={want}&timeoutSeconds=1")).await;
    assert_eq!(plain_again.next().await, Err(End::Clean), "no bookmark, then the timeout");
}

#[tokio::test]
async fn a_compacted_resource_version_gets_410_expired() {
    let server = ApiServer::start().await.unwrap();
    let old = server.resource_version();
    server.create(pod("ns", "a", &[], "n1")).unwrap();
    server.create(pod("ns", "b", &[], "n1")).unwrap();
    server.compact();
    let now = server.resource_version();
    let c = Client::admin(&server);
    let mut w = c.watch(&format!("/api/v1/pods?watch=1&resourceVersion={old}")).await;
    assert_eq!(w.code, 200, "the real server reports 410 inside a 200 stream");
    let e = w.event().await;
    assert_eq!(
        e,
        json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {old} ({now})"), "reason": "Expired", "code": 410,
        }})
    );
    assert_eq!(w.next().await, Err(End::Clean));
    // From the compaction point on, watches work again.
    let mut w = c.watch(&format!("/api/v1/pods?watch=1&resourceVersion={now}")).await;
    server.create(pod("ns", "c", &[], "n1")).unwrap();
    assert_eq!(w.event().await["object"]["metadata"]["name"], "c");
}

#[tokio::test]
async fn timeout_ends_cleanly_and_close_watches_cuts() {
    let server = ApiServer::start().await.unwrap();
    let c = Client::admin(&server);
    let mut timed = c.watch("/api/v1/pods?watch=1&timeoutSeconds=1").await;
    assert_eq!(timed.end().await, End::Clean);

    let from = server.resource_version();
    let mut w = c.watch(&format!("/api/v1/pods?watch=1&resourceVersion={from}")).await;
    server.create(pod("ns", "a", &[], "n1")).unwrap();
    let last = rv(&w.event().await["object"]);
    wait_for(|| server.open_watches() == 1).await;
    server.close_watches();
    assert_eq!(w.end().await, End::Cut);
    wait_for(|| server.open_watches() == 0).await;

    // What happened while disconnected is replayed to the re-watch.
    server.create(pod("ns", "b", &[], "n1")).unwrap();
    let mut again = c.watch(&format!("/api/v1/pods?watch=1&resourceVersion={last}")).await;
    assert_eq!(again.event().await["object"]["metadata"]["name"], "b");
}

#[tokio::test]
async fn streaming_lists_send_initial_events_then_a_marked_bookmark() {
    let server = ApiServer::start().await.unwrap();
    server.create(pod("ns", "a", &[], "n1")).unwrap();
    server.create(pod("ns", "b", &[], "n1")).unwrap();
    let c = Client::admin(&server);
    let mut w = c.watch("/api/v1/pods?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true").await;
    assert_eq!(w.event().await["type"], "ADDED");
    assert_eq!(w.event().await["type"], "ADDED");
    let end = w.event().await;
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
    assert_eq!(rv(&end["object"]), server.resource_version());

    let r = c.get("/api/v1/pods?watch=1&sendInitialEvents=true&allowWatchBookmarks=true").await;
    assert_eq!((r.code, r.body["reason"].as_str()), (422, Some("Invalid")));
}

async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 2 s");
}
