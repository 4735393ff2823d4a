//! `authentication: required` on the simulated cluster (root only): the
//! datapath admits such a flow only while the auth map holds a live entry
//! for (local identity, remote identity, remote node), and signals
//! auth-handshake on its ring when it does not. The first test writes the
//! entries by hand; the others run the real auth-handshake agents with
//! identity-ca and check what they write, and when.

use std::time::{Duration, SystemTime};

use meshguard_common::cluster::alloc::Allocations;
use meshguard_common::spiffe::SpiffeId;
use meshguard_ebpf::events::{EventKind, EventReader};
use meshguard_ebpf::{AuthPair, AuthTable, PinLayout};
use meshguard_meshctl::sim::cluster::{Cluster, cluster, wait_until};
use meshguard_meshctl::sim::identity::Identity;

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
    meshguard_common::yaml::from_str(&text).unwrap()
}

#[test]
fn root_authentication_required_admits_only_pairs_with_a_live_auth_entry() {
    let c = cluster()
        .nodes(2)
        .pod("shop/web")
        .label("app", "web")
        .on("node-1")
        .pod("shop/api")
        .label("app", "api")
        .on("node-2")
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

// === with the real auth-handshake agents and identity-ca ===

const AUTH_ALL: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: web}]
      ports: [{protocol: TCP, port: 7000}, {protocol: UDP, port: 7000}, {protocol: SCTP, port: 7002}, {protocol: ICMP}]
      authentication: required
"#;

/// web on node-1, api and a second web pod (`near`) on node-2, the policy
/// on identity-ca's registry, every agent running.
fn authenticated_cluster() -> Cluster {
    cluster()
        .nodes(2)
        .pod("shop/web")
        .label("app", "web")
        .on("node-1")
        .pod("shop/api")
        .label("app", "api")
        .on("node-2")
        .pod("shop/near")
        .service_account("web")
        .label("app", "web")
        .on("node-2")
        // No policy selects db: the same path with authentication off.
        .pod("shop/db")
        .label("app", "db")
        .on("node-2")
        .build()
        .unwrap()
}

fn start(c: &Cluster) -> Identity<'_> {
    start_with(c, true, AUTH_ALL)
}

fn start_with<'c>(c: &'c Cluster, prove_ahead: bool, policy: &str) -> Identity<'c> {
    let id = c.identity().prove_ahead(prove_ahead).start().unwrap();
    id.apply_policy(policy).unwrap();
    id.use_registry_for_agents();
    c.start_agents().unwrap();
    c.start_echo("shop/api", 7000).unwrap();
    c.start_echo("shop/db", 7000).unwrap();
    let probe = meshguard_meshctl::sim::bins::bin_path("mg-probe");
    c.spawn_in_pod("shop/api", &probe, &["sctp-serve", "--port", "7002"]).unwrap();
    id
}

/// The numbers the registry gave shop/`sa`'s identity and `node`.
fn numbers(id: &Identity<'_>, sa: &str, node: &str) -> (u32, u32) {
    id.numbers("shop", sa, node).unwrap()
}

fn live_pairs(c: &Cluster, node: &str) -> Vec<AuthPair> {
    c.live_auth_pairs(node)
}

#[test]
fn root_auth_handshake_proves_policy_pairs_ahead_so_every_protocol_passes_first_try() {
    let c = authenticated_cluster();
    let id = start(&c);
    let (api, n2) = numbers(&id, "api", "node-2");
    let (web, n1) = numbers(&id, "web", "node-1");
    // Proved before any packet: node-2 hosts the subject and needs
    // (api, web, node-1) and, for the pod on its own node, (api, web, node-2).
    wait_until("the auth entries proved ahead", Duration::from_secs(20), || {
        let p = live_pairs(&c, "node-2");
        p.contains(&AuthPair { local_identity: api, remote_identity: web, remote_node: n1 })
            && p.contains(&AuthPair { local_identity: api, remote_identity: web, remote_node: n2 })
    })
    .unwrap();
    assert!(
        live_pairs(&c, "node-1").contains(&AuthPair { local_identity: web, remote_identity: api, remote_node: n2 }),
        "the responder wrote its side"
    );

    let api_ip = c.pod("shop/api").ip.to_string();
    for from in ["shop/web", "shop/near"] {
        // First connect: no SYN retransmission (the initial RTO is 1 s).
        let out = c
            .exec(
                from,
                meshguard_meshctl::sim::bins::bin_path("mg-probe").to_str().unwrap(),
                &["--timing", "tcp", &format!("{api_ip}:7000"), "first", "--timeout", "3"],
            )
            .unwrap();
        assert!(out.status.success(), "{from} -> api TCP: {}", String::from_utf8_lossy(&out.stderr));
        let ttfb: f64 = String::from_utf8_lossy(&out.stderr)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("ttfb_ms=").and_then(|v| v.parse().ok()))
            .expect("mg-probe prints ttfb_ms");
        eprintln!("{from} -> api first TCP connect + echo: {ttfb} ms");
        assert!(ttfb < 500.0, "first connect from {from} took {ttfb} ms: a retransmission");
        assert!(c.probe(from, &["udp", &format!("{api_ip}:7000"), "u", "--tries", "1"]), "{from} -> api UDP, first datagram");
        assert!(c.probe(from, &["sctp", &format!("{api_ip}:7002"), "s", "--tries", "1"]), "{from} -> api SCTP, first packet");
        let ping = c.exec(from, "ping", &["-c", "1", "-W", "1", &api_ip]).unwrap();
        assert!(ping.status.success(), "{from} -> api ICMP, first echo");
    }
    assert!(id.auth_metric("node-2", "meshguard_auth_handshakes_total{result=\"ok\"").unwrap() >= 1.0);
}

/// web's egress to api also requires authentication for TCP (the pod's
/// own side judges it, at TC ingress); UDP, SCTP and ICMP to api stay
/// plainly allowed on the egress side.
const WEB_EGRESS: &str = r#"
---
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: web-egress, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  egress:
    - to: [{serviceAccount: api}]
      ports: [{protocol: TCP, port: 7000}]
      authentication: required
    - to: [{serviceAccount: api}]
      ports: [{protocol: UDP, port: 7000}, {protocol: SCTP, port: 7002}, {protocol: ICMP}]
"#;

/// First-packet cost of a TCP connect: mg-probe's connect + echo time.
fn first_ttfb(c: &Cluster, from: &str, addr: &str) -> f64 {
    let probe = meshguard_meshctl::sim::bins::bin_path("mg-probe");
    let out = c.exec(from, probe.to_str().unwrap(), &["--timing", "tcp", addr, "first", "--timeout", "3"]).unwrap();
    assert!(out.status.success(), "{from} -> {addr} TCP: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ttfb_ms=").and_then(|v| v.parse().ok()))
        .expect("mg-probe prints ttfb_ms")
}

#[test]
fn root_a_pair_not_proved_ahead_keeps_its_first_packet() {
    let c = authenticated_cluster();
    let policy = format!("{AUTH_ALL}{WEB_EGRESS}");
    let id = start_with(&c, false, &policy);
    // Nothing is proved before the first packet.
    std::thread::sleep(Duration::from_secs(1));
    assert!(live_pairs(&c, "node-1").is_empty() && live_pairs(&c, "node-2").is_empty(), "proveAhead is off");

    // web (node-1) -> api (node-2): the SYN is held at web's side (TC
    // ingress, replayed by XDP) and maybe at api's (TC egress, replayed by
    // a packet socket) while the pair is proved; no retransmission (RTO 1 s).
    let api_ip = c.pod("shop/api").ip.to_string();
    let ttfb = first_ttfb(&c, "shop/web", &format!("{api_ip}:7000"));
    eprintln!("first TCP connect + echo of a pair not proved ahead, across nodes: {ttfb} ms");
    assert!(ttfb < 500.0, "first connect took {ttfb} ms: the SYN was lost and retransmitted");
    let replayed = |node: &str| id.auth_metric(node, "meshguard_auth_held_packets_total{result=\"replayed\"}").unwrap_or(0.0);
    assert!(replayed("node-1") >= 1.0, "node-1 replayed web's held SYN");

    // near (node-2) -> api (node-2), UDP, one datagram only: held at api's
    // ingress, proved by the local agent, replayed, answered.
    assert!(c.probe("shop/near", &["udp", &format!("{api_ip}:7000"), "u", "--tries", "1"]), "near -> api UDP, the first datagram");
    assert!(replayed("node-2") >= 1.0, "node-2 replayed near's held datagram");
    assert_eq!(id.auth_metric("node-2", "meshguard_auth_held_packets_total{result=\"failed\"}").unwrap_or(0.0), 0.0);

    // db is not allowed to talk to api at all: its packets are denied, never held.
    assert!(!c.probe("shop/db", &["tcp", &format!("{api_ip}:7000"), "x", "--timeout", "1"]));
}

#[test]
fn root_a_removed_workload_loses_its_entries_on_both_nodes_within_a_second() {
    let c = authenticated_cluster();
    let id = start(&c);
    let (api, _) = numbers(&id, "api", "node-2");
    let (web, n1) = numbers(&id, "web", "node-1");
    let pair = AuthPair { local_identity: api, remote_identity: web, remote_node: n1 };
    wait_until("the auth entries", Duration::from_secs(20), || {
        live_pairs(&c, "node-2").contains(&pair) && live_pairs(&c, "node-1").iter().any(|p| p.local_identity == web)
    })
    .unwrap();
    // A live flow: a ping every 50 ms.
    let api_ip = c.pod("shop/api").ip.to_string();
    let (_, log) =
        c.background_in_pod("shop/web", std::path::Path::new("ping"), &["-D", "-i", "0.05", "-W", "1", &api_ip], "ping.log").unwrap();
    wait_until("the ping flow", Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.matches("bytes from").count() >= 5)
    })
    .unwrap();

    let t = std::time::Instant::now();
    id.admin(&["workload", "delete", "shop/web"]).unwrap();
    wait_until("web's entries gone on both nodes", Duration::from_secs(1), || {
        !live_pairs(&c, "node-2").contains(&pair) && !live_pairs(&c, "node-1").iter().any(|p| p.local_identity == web)
    })
    .unwrap();
    eprintln!("entries gone on both nodes {:?} after the workload was deleted", t.elapsed());
    // The flow is cut: no reply arrives from a second after the deletion on.
    std::thread::sleep(Duration::from_millis(1000));
    let before = std::fs::read_to_string(&log).unwrap().matches("bytes from").count();
    std::thread::sleep(Duration::from_millis(1000));
    let after = std::fs::read_to_string(&log).unwrap().matches("bytes from").count();
    assert_eq!(before, after, "replies still arrive after the workload left");
    assert!(id.auth_metric("node-2", "meshguard_auth_deletions_total{reason=\"workload_left\"}").unwrap() >= 1.0);

    // A new pod of another identity receives web's address: it inherits
    // nothing. Its identity is not admitted, so nothing is proved for it and
    // its packets are denied by policy, on the same flow and on new ones.
    let web_ip = c.pod("shop/web").ip.to_string();
    id.admin(&[
        "workload",
        "put",
        "--name",
        "heir",
        "--namespace",
        "shop",
        "--service-account",
        "intruder",
        "--node",
        "node-1",
        "--ip",
        &web_ip,
        "--label",
        "app=heir",
    ])
    .unwrap();
    let heir = numbers(&id, "intruder", "node-1").0;
    // And web is back on node-1 at another address (registry only): the
    // pair (api, web, node-1) is proved and live again while the heir holds
    // web's old address.
    let octets = c.pod("shop/web").ip.octets();
    let elsewhere = std::net::Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3].wrapping_add(100)).to_string();
    id.admin(&[
        "workload",
        "put",
        "--name",
        "web2",
        "--namespace",
        "shop",
        "--service-account",
        "web",
        "--node",
        "node-1",
        "--ip",
        &elsewhere,
        "--label",
        "app=web",
    ])
    .unwrap();
    wait_until("web's pair proved again", Duration::from_secs(10), || live_pairs(&c, "node-2").contains(&pair)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!c.probe("shop/web", &["tcp", &format!("{api_ip}:7000"), "x", "--timeout", "2"]), "the heir's TCP to api must fail");
    assert!(!c.exec("shop/web", "ping", &["-c", "1", "-W", "1", &api_ip]).unwrap().status.success(), "the heir's ping to api must fail");
    let still = std::fs::read_to_string(&log).unwrap().matches("bytes from").count();
    assert_eq!(still, after, "the old flow must stay cut for the address's new owner");
    for node in ["node-1", "node-2"] {
        assert!(
            !live_pairs(&c, node).iter().any(|p| p.local_identity == heir || p.remote_identity == heir),
            "no auth entry for the heir on {node}"
        );
    }
}
