//! `authentication: required` on the simulated cluster (root only): the
//! datapath admits such a flow only while the auth map holds a live entry
//! for (local identity, remote identity, remote node), and signals
//! auth-handshake on its ring when it does not. The entries are written by
//! the test here, as auth-handshake will write them.

use std::time::{Duration, SystemTime};

use meshguard_common::cluster::alloc::Allocations;
use meshguard_common::spiffe::SpiffeId;
use meshguard_ebpf::events::{EventKind, EventReader};
use meshguard_ebpf::{AuthPair, AuthTable, PinLayout};
use meshguard_meshctl::sim::cluster::{Cluster, cluster, wait_until};

const POLICY: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: web}]
      ports: [{protocol: TCP, port: 7000}]
      authentication: required
"#;

fn tcp(c: &Cluster) -> bool {
    let addr = format!("{}:7000", c.pod("shop/api").ip);
    c.probe("shop/web", &["tcp", &addr, "hi", "--timeout", "2"])
}

fn allocations(c: &Cluster) -> Allocations {
    let text = std::fs::read_to_string(c.cluster_dir().join("allocations.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

#[test]
fn root_authentication_required_admits_only_pairs_with_a_live_auth_entry() {
    let c = cluster()
        .nodes(2)
        .pod("shop/web").label("app", "web").on("node-1")
        .pod("shop/api").label("app", "api").on("node-2")
        .policy(POLICY)
        .build()
        .unwrap();
    c.start_agents().unwrap();
    c.start_echo("shop/api", 7000).unwrap();
    let a = allocations(&c);
    let id = |sa: &str| a.identities[&SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap()];
    let pair = AuthPair { local_identity: id("api"), remote_identity: id("web"), remote_node: a.nodes["node-1"] };
    let pin = PinLayout::new(c.pin_dir("node-2"));

    // No proof yet: dropped, and auth-handshake is asked for one.
    let mut signals = EventReader::open_auth_signals(&pin).unwrap();
    assert!(!tcp(&c), "an unauthenticated pair must not pass");
    let signal = signals.next_timeout(Duration::from_secs(5)).unwrap().expect("an auth-required signal");
    assert_eq!(signal.kind, EventKind::AuthRequired);
    assert_eq!((signal.subject, signal.peer, signal.peer_node), (pair.local_identity, pair.remote_identity, pair.remote_node));

    // A live proof admits the pair.
    let mut auth = AuthTable::open(&pin).unwrap();
    auth.set(pair, SystemTime::now() + Duration::from_secs(60)).unwrap();
    wait_until("the authenticated pair to pass", Duration::from_secs(5), || tcp(&c)).unwrap();

    // An expired proof does not admit new flows.
    auth.set(pair, SystemTime::now() - Duration::from_secs(1)).unwrap();
    assert!(!tcp(&c), "an expired auth entry must not admit a new flow");

    // Nor does a proof for another node: the pair is bound to where it was proved.
    auth.set(AuthPair { remote_node: pair.remote_node + 1000, ..pair }, SystemTime::now() + Duration::from_secs(60)).unwrap();
    assert!(!tcp(&c), "an auth entry for another node must not admit the pair");

    auth.set(pair, SystemTime::now() + Duration::from_secs(60)).unwrap();
    assert!(tcp(&c));
    auth.remove(pair).unwrap();
    assert!(!tcp(&c), "a removed auth entry must not admit a new flow");
}
