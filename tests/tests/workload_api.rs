//! The SPIFFE Workload API on the simulated cluster (root only: namespaces).
//!
//! identity-ca runs in the underlay, one auth-handshake per node, and the
//! workload is `mg-spiffe` — the standard Rust `spiffe` client, unchanged —
//! started with `ip netns exec` inside a pod's network namespace. The agent
//! knows its caller only by that namespace (peer credentials → pid →
//! `/proc/<pid>/ns/net` → the pod whose namespace file it is), so these tests
//! exercise the real caller resolution end to end. Every test fails loudly
//! without root.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshguard_meshctl::sim::cluster::{Cluster, cluster, wait_until};
use meshguard_meshctl::sim::identity::{Outcome, SvidReport, parse_pem_certs};

/// Two nodes; two pods share node-1 (and its socket), one is on node-2.
/// web's service account differs from its name: the SPIFFE ID must follow
/// the service account.
fn shop() -> Cluster {
    cluster()
        .nodes(2)
        .pod("shop/web")
        .service_account("frontend")
        .on("node-1")
        .pod("shop/cart")
        .on("node-1")
        .pod("shop/db")
        .on("node-2")
        .build()
        .unwrap()
}

fn svid(pod: &str, o: Outcome) -> SvidReport {
    o.svid().unwrap_or_else(|e| panic!("{pod} got no SVID: {e}"))
}

fn at_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[test]
fn root_pod_fetches_its_own_svid_over_the_socket_with_a_standard_client() {
    let c = shop();
    let id = c.identity().start().unwrap();
    let bundle = id.ca_bundle().unwrap();
    assert_eq!(parse_pem_certs(&std::fs::read_to_string(&id.bundle_file).unwrap()).unwrap(), bundle);
    let issued = id.issued().unwrap();

    for pod in ["shop/web", "shop/cart", "shop/db"] {
        let s = svid(pod, id.fetch(pod).unwrap());
        assert_eq!(s.spiffe_id, id.spiffe_id_of(pod), "{pod}'s SPIFFE ID");
        s.verify(&bundle, at_ms(s.received_at_ms)).unwrap_or_else(|e| panic!("{pod}'s SVID against the CA bundle: {e}"));
        // The same verifier refuses it once it has expired: the check is real.
        assert!(s.verify(&bundle, at_ms(s.not_after as u64 * 1000 + 1000)).is_err(), "{pod}'s SVID verifies after expiry");
        assert!(s.key_matches_leaf, "{pod} was handed a private key that is not its certificate's");
        assert_eq!(s.bundle_der(), bundle, "{pod} was served the CA's bundle");
        let node = &c.pod(pod).node;
        assert!(
            issued.iter().any(|i| i.serial == s.serial && i.spiffe_id == s.spiffe_id && &i.node == node),
            "{pod}'s SVID {} is on the CA's record as issued to {node}: {issued:?}",
            s.serial
        );
        let life = s.not_after * 1000 - s.received_at_ms as i64;
        assert!(life > 0 && life <= id.svid_ttl.as_millis() as i64 + 1000, "{pod}'s SVID lives {life} ms from now");
    }
    // Spelled out once: namespace and service account, not the pod's name.
    assert_eq!(id.spiffe_id_of("shop/web"), "spiffe://cluster.local/ns/shop/sa/frontend");
}

#[test]
fn root_pod_receives_a_rotated_svid_before_the_first_expires() {
    let c = cluster().nodes(1).pod("shop/web").on("node-1").build().unwrap();
    // The CA's shortest lifetime: renewed at half-life, every ~5 s.
    let ttl = Duration::from_secs(10);
    let id = c.identity().svid_ttl(ttl).start().unwrap();
    let bundle = id.ca_bundle().unwrap();

    // One open stream, as a workload keeps it: the first SVID and two rotations.
    let updates = id.watch("shop/web", 3, ttl * 3).unwrap();
    let svids: Vec<SvidReport> = updates.into_iter().map(|o| svid("shop/web", o)).collect();
    let mut serials: Vec<&str> = svids.iter().map(|s| s.serial.as_str()).collect();
    serials.dedup();
    assert_eq!(serials.len(), 3, "every update on the stream is a new SVID: {serials:?}");

    for pair in svids.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        assert_eq!(new.spiffe_id, id.spiffe_id_of("shop/web"));
        let margin_ms = old.not_after * 1000 - new.received_at_ms as i64;
        assert!(margin_ms > 0, "SVID {} arrived {} ms after {} had expired", new.serial, -margin_ms, old.serial);
        assert!(new.not_after > old.not_after, "the rotated SVID lives longer");
        new.verify(&bundle, at_ms(new.received_at_ms)).unwrap_or_else(|e| panic!("rotated SVID {}: {e}", new.serial));
        assert!(new.key_matches_leaf, "rotated SVID {} came with the wrong key", new.serial);
        eprintln!("rotation {} -> {}: received {margin_ms} ms before the old one expired", old.serial, new.serial);
    }
    // A fresh fetch gets the current SVID, not the expired first one.
    let now = svid("shop/web", id.fetch("shop/web").unwrap());
    assert_ne!(now.serial, svids[0].serial);
    now.verify(&bundle, SystemTime::now()).unwrap();
}

#[test]
fn root_pod_cannot_get_another_pods_identity() {
    let c = shop();
    let id = c.identity().start().unwrap();
    let (web, cart, db) = (id.spiffe_id_of("shop/web"), id.spiffe_id_of("shop/cart"), id.spiffe_id_of("shop/db"));

    // Two pods behind one node's socket: each gets its own identity, every time.
    for _ in 0..3 {
        assert_eq!(svid("shop/cart", id.fetch("shop/cart").unwrap()).spiffe_id, cart);
        assert_eq!(svid("shop/web", id.fetch("shop/web").unwrap()).spiffe_id, web);
    }
    let stream = id.watch("shop/cart", 1, Duration::from_secs(10)).unwrap();
    assert_eq!(svid("shop/cart", stream[0].clone()).spiffe_id, cart);

    // A pod asking another node's agent: that agent has no identity for it.
    let on_wrong_node = id.fetch_in(&c.pod("shop/db").netns, "node-1").unwrap();
    assert!(on_wrong_node.is_refused(), "shop/db through node-1's socket: {on_wrong_node:?}");
    let on_wrong_node = id.fetch_in(&c.pod("shop/web").netns, "node-2").unwrap();
    assert!(on_wrong_node.is_refused(), "shop/web through node-2's socket: {on_wrong_node:?}");

    // A process in no pod's namespace: the nodes' own, the underlay, the host.
    for n in &c.nodes {
        let o = id.fetch_in(&n.netns, &n.name).unwrap();
        assert!(o.is_refused(), "a process in {}'s own namespace: {o:?}", n.name);
    }
    let o = id.fetch_in(&c.underlay_ns, "node-1").unwrap();
    assert!(o.is_refused(), "a process in the underlay namespace: {o:?}");
    let o = id.fetch_from_host("node-1").unwrap();
    assert!(o.is_refused(), "a process in the host namespace: {o:?}");

    // And node-1 never even held db's identity: the CA issued it only to node-2.
    let issued = id.issued().unwrap();
    assert!(issued.iter().all(|s| s.spiffe_id != db || s.node == "node-2"), "{issued:?}");

    // Once cart leaves the registry its namespace gets nothing; web is unaffected.
    id.admin(&["workload", "delete", "shop/cart"]).unwrap();
    wait_until("shop/cart's identity to be withdrawn", Duration::from_secs(10), || id.fetch("shop/cart").is_ok_and(|o| o.is_refused()))
        .unwrap();
    assert_eq!(svid("shop/web", id.fetch("shop/web").unwrap()).spiffe_id, web);
}

#[test]
fn root_jwt_svid_proves_a_pod_to_a_pod_on_another_node_and_no_pod_gets_anothers() {
    let c = shop();
    let id = c.identity().start().unwrap();
    let (web, cart) = (id.spiffe_id_of("shop/web"), id.spiffe_id_of("shop/cart"));
    let audience = id.spiffe_id_of("shop/db");

    // web gets a token for db; db's node validates it and names web.
    let jwt = id.fetch_jwt("shop/web", &audience, None).unwrap().jwt().unwrap_or_else(|e| panic!("shop/web's JWT-SVID: {e}"));
    assert_eq!(jwt.spiffe_id, web);
    assert_eq!(jwt.audience, vec![audience.clone()]);
    let verdict = id.validate_jwt("shop/db", &audience, &jwt.token).unwrap();
    assert_eq!(verdict, Outcome::Valid { spiffe_id: web.clone() });
    // Not for another audience.
    let verdict = id.validate_jwt("shop/db", "spiffe://cluster.local/ns/shop/sa/other", &jwt.token).unwrap();
    assert!(matches!(verdict, Outcome::Invalid { .. }), "token accepted for another audience: {verdict:?}");

    // Asking by name for another pod's identity, even one on the same node: refused.
    let o = id.fetch_jwt("shop/cart", &audience, Some(&web)).unwrap();
    assert!(o.is_refused(), "shop/cart asked for shop/web's JWT-SVID: {o:?}");
    assert_eq!(id.fetch_jwt("shop/cart", &audience, Some(&cart)).unwrap().jwt().unwrap().spiffe_id, cart);
    // No pod at all: refused.
    let node1 = c.node("node-1");
    let o = id.fetch_jwt_in(&node1.netns, "node-1", &audience).unwrap();
    assert!(o.is_refused(), "a process in node-1's own namespace got a JWT-SVID: {o:?}");
}

/// The Python SPIFFE client from PyPI (`spiffe`, on gRPC C-core), in the
/// virtualenv `scripts/setup.sh` makes. `MESHGUARD_PYTHON` overrides it.
fn python_with_spiffe() -> String {
    let python = std::env::var("MESHGUARD_PYTHON").unwrap_or_else(|_| "/opt/meshguard/python/bin/python3".to_owned());
    let ok = std::process::Command::new(&python).args(["-c", "import spiffe"]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "{python} cannot import the Python `spiffe` package: run ./scripts/setup.sh (it installs it from PyPI)");
    python
}

/// What the Python client does in the pod: its X.509-SVID (the key must be
/// the leaf's), the bundle, and a JWT-SVID; one JSON line.
const PY_CLIENT: &str = r#"
import json, sys
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient
with WorkloadApiClient(socket_path=sys.argv[1], default_timeout=10) as c:
    svid = c.fetch_x509_svid()
    key_matches = svid.private_key.public_key().public_numbers() == svid.leaf.public_key().public_numbers()
    bundles = c.fetch_x509_bundles()
    jwt = c.fetch_jwt_svid(audience={sys.argv[2]})
    # Verified by the client library (PyJWT) against the JWT bundle it fetched.
    jwt_bundle = c.fetch_jwt_bundles().get_bundle_for_trust_domain(TrustDomain("cluster.local"))
    verified = JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {sys.argv[2]})
    try:
        JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {"spiffe://cluster.local/ns/shop/sa/other"})
        other_audience_refused = False
    except Exception:
        other_audience_refused = True
    print(json.dumps({
        "jwt_verified_id": str(verified.spiffe_id),
        "other_audience_refused": other_audience_refused,
        "id": str(svid.spiffe_id),
        "key_matches": key_matches,
        "bundle_authorities": sum(len(b.x509_authorities) for b in bundles.bundles),
        "jwt_id": str(jwt.spiffe_id),
        "jwt_audience": sorted(jwt.audience),
    }))
"#;

/// Issue 18: SPIFFE clients on gRPC C-core (Python, C++, Ruby, PHP), as
/// grpc-java and grpc-swift, send the socket path as `:authority`; tonic's
/// HTTP/2 layer refused them before any handler ran. The unchanged Python
/// client from PyPI now gets its own pod's SVID, bundle and JWT-SVID (which
/// it verifies itself against the JWT bundle) — and nothing another pod or
/// the node could.
#[test]
fn root_the_python_spiffe_client_gets_its_own_pods_identity() {
    let python = python_with_spiffe();
    let c = shop();
    let id = c.identity().start().unwrap();
    let run = |netns: &str, node: &str| {
        let socket = format!("unix://{}", c.workload_api_socket(node).display());
        std::process::Command::new("ip")
            .args(["netns", "exec", netns, &python, "-c", PY_CLIENT, &socket, "spiffe://cluster.local/ns/shop/sa/db"])
            .output()
            .unwrap()
    };
    for pod in ["shop/web", "shop/cart", "shop/db"] {
        let p = c.pod(pod);
        let out = run(&p.netns, &p.node);
        assert!(out.status.success(), "the Python client in {pod} failed: {}", String::from_utf8_lossy(&out.stderr));
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = id.spiffe_id_of(pod);
        assert_eq!(got["id"], want.as_str(), "{pod}'s X.509-SVID");
        assert_eq!(got["key_matches"], true, "{pod}'s key is its leaf's");
        assert_eq!(got["bundle_authorities"], id.ca_bundle().unwrap().len(), "{pod}'s bundle");
        assert_eq!(got["jwt_id"], want.as_str(), "{pod}'s JWT-SVID");
        assert_eq!(got["jwt_audience"], serde_json::json!(["spiffe://cluster.local/ns/shop/sa/db"]));
        assert_eq!(got["jwt_verified_id"], want.as_str(), "{pod}'s JWT-SVID verified by the Python library");
        assert_eq!(got["other_audience_refused"], true);
    }
    // A process in node-1's own namespace is no pod: refused, as for the Rust client.
    let node1 = c.node("node-1").netns.clone();
    let out = run(&node1, "node-1");
    assert!(!out.status.success(), "a process in node-1's namespace got an identity: {}", String::from_utf8_lossy(&out.stdout));
}
