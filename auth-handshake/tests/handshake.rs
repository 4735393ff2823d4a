//! The handshake protocol in process: two nodes' sessions over an
//! in-memory wire, real TLS 1.3 (rustls, ring) and real X.509 (rcgen CAs,
//! webpki verification). Each refusal case checks the reason on both sides
//! and that neither side reports an entry to write.

use std::sync::Arc;

use meshguard_auth_handshake::handshake::frame::{Frame, MAX_FRAME};
use meshguard_auth_handshake::handshake::proof::{self, Binding};
use meshguard_auth_handshake::handshake::{Event, Refusal, Role, SessionError, WorkloadKey};
use meshguard_auth_handshake::testing::{Exchange, PumpError, TestCa, TestNode, now_unix, pump, pump_with, workload_id};
use meshguard_common::spiffe::SpiffeId;
use rustls::pki_types::UnixTime;

const TD: &str = "cluster.local";

struct World {
    ca: TestCa,
    n1: TestNode,
    n2: TestNode,
    web: SpiffeId,
    api: SpiffeId,
}

/// node-1 hosts shop/web, node-2 hosts shop/api; both know both.
fn world() -> World {
    let ca = TestCa::new(TD);
    let mut n1 = ca.node("node-1", "192.168.100.1");
    let mut n2 = ca.node("node-2", "192.168.100.2");
    n1.knows_node(&n2);
    n2.knows_node(&n1);
    let web = workload_id(TD, "shop", "web");
    let api = workload_id(TD, "shop", "api");
    n1.host(ca.workload(&web, 3600));
    n2.host(ca.workload(&api, 3600));
    for n in [&mut n1, &mut n2] {
        n.place(&web, "node-1");
        n.place(&api, "node-2");
    }
    World { ca, n1, n2, web, api }
}

fn authenticated(events: &[Event]) -> Vec<&meshguard_auth_handshake::handshake::Authenticated> {
    events.iter().filter_map(|e| if let Event::Authenticated(a) = e { Some(a) } else { None }).collect()
}

/// Runs one request `local` (on node-1) → `remote` (on node-2).
fn prove(w: &World, local: &SpiffeId, remote: &SpiffeId) -> Exchange {
    let mut c = w.n1.client_to(&w.n2);
    let mut s = w.n2.server_for(w.n1.addr).unwrap();
    let mut ex = pump(&mut c, &w.n1.dir, &mut s, &w.n2.dir).map_err(|(e, _)| e).unwrap();
    ex.client_events.extend(c.request(local.clone(), remote.clone(), &w.n1.dir).unwrap());
    let more = pump(&mut c, &w.n1.dir, &mut s, &w.n2.dir).map_err(|(e, _)| e).unwrap();
    ex.client_events.extend(more.client_events);
    ex.server_events.extend(more.server_events);
    ex
}

/// The pair was refused for `reason`, reported on both sides, and nothing is to be written.
fn assert_refused(ex: &Exchange, reason: Refusal, by_responder: bool) {
    assert!(authenticated(&ex.client_events).is_empty(), "initiator must write nothing: {:?}", ex.client_events);
    assert!(authenticated(&ex.server_events).is_empty(), "responder must write nothing: {:?}", ex.server_events);
    let c = ex.client_events.iter().find_map(|e| match e {
        Event::Refused { reason, by_peer, .. } => Some((*reason, *by_peer)),
        _ => None,
    });
    assert_eq!(c, Some((reason, by_responder)), "initiator's view: {:?}", ex.client_events);
    let s = ex.server_events.iter().find_map(|e| match e {
        Event::RefusedPeer { reason, by_peer, .. } => Some((*reason, *by_peer)),
        _ => None,
    });
    assert_eq!(s, Some((reason, !by_responder)), "responder's view: {:?}", ex.server_events);
}

#[test]
fn a_pair_is_proved_on_both_sides_bound_to_the_nodes() {
    let w = world();
    let ex = prove(&w, &w.web, &w.api);
    let c = authenticated(&ex.client_events);
    let s = authenticated(&ex.server_events);
    assert_eq!(c.len(), 1, "{:?}", ex.client_events);
    assert_eq!(s.len(), 1, "{:?}", ex.server_events);
    assert_eq!((&c[0].local, &c[0].remote, c[0].remote_node.as_str(), c[0].role), (&w.web, &w.api, "node-2", Role::Initiator));
    assert_eq!((&s[0].local, &s[0].remote, s[0].remote_node.as_str(), s[0].role), (&w.api, &w.web, "node-1", Role::Responder));
    assert!(ex.client_events.contains(&Event::Established { peer_node: "node-2".into() }));
    assert!(ex.server_events.contains(&Event::Established { peer_node: "node-1".into() }));
}

#[test]
fn entries_expire_with_the_earliest_certificate_of_the_four() {
    for shortest in 0..4 {
        let mut w = world();
        let short = now_unix() + 600;
        match shortest {
            0 => w.n1.host(Arc::new(key_between(&w.ca, &w.web, short))),
            1 => w.n2.host(Arc::new(key_between(&w.ca, &w.api, short))),
            2 => w.n1 = renode(&w.ca, &w.n1, short),
            _ => w.n2 = renode(&w.ca, &w.n2, short),
        }
        let ex = prove(&w, &w.web, &w.api);
        let (c, s) = (authenticated(&ex.client_events), authenticated(&ex.server_events));
        assert_eq!((c.len(), s.len()), (1, 1), "case {shortest}: {ex:?}");
        assert_eq!(c[0].expires_at, short, "initiator, shortest certificate {shortest}");
        assert_eq!(s[0].expires_at, short, "responder, shortest certificate {shortest}");
    }
}

fn key_between(ca: &TestCa, id: &SpiffeId, not_after: i64) -> WorkloadKey {
    let (chain, key) = ca.leaf_between(id.as_str(), now_unix() - 60, not_after);
    WorkloadKey::new(id.clone(), chain, &key).unwrap()
}

/// The same node with a node SVID that ends at `not_after`.
fn renode(ca: &TestCa, n: &TestNode, not_after: i64) -> TestNode {
    let mut fresh = ca.node(&n.name, &n.addr.to_string());
    let id = ca.trust_domain.node_id(&n.name).unwrap();
    let (chain, key) = ca.leaf_between(id.as_str(), now_unix() - 60, not_after);
    fresh.creds.set(chain.iter().map(|c| c.clone().into()).collect(), &key).unwrap();
    fresh.chain = Arc::new(chain);
    fresh.dir = n.dir.clone();
    fresh.bundle = n.bundle.clone();
    fresh
}

#[test]
fn one_session_proves_many_pairs_pipelined() {
    let mut w = world();
    let mut ids = Vec::new();
    for i in 0..300 {
        let id = workload_id(TD, "load", &format!("sa-{i}"));
        w.n1.host(w.ca.workload(&id, 3600));
        w.n2.place(&id, "node-1");
        ids.push(id);
    }
    let mut c = w.n1.client_to(&w.n2);
    let mut s = w.n2.server_for(w.n1.addr).unwrap();
    let mut client_events = Vec::new();
    for id in &ids {
        client_events.extend(c.request(id.clone(), w.api.clone(), &w.n1.dir).unwrap());
    }
    let ex = pump(&mut c, &w.n1.dir, &mut s, &w.n2.dir).map_err(|(e, _)| e).unwrap();
    client_events.extend(ex.client_events);
    assert_eq!(authenticated(&client_events).len(), 300);
    assert_eq!(authenticated(&ex.server_events).len(), 300);
    assert_eq!(client_events.iter().filter(|e| matches!(e, Event::Established { .. })).count(), 1, "one TLS handshake");
    assert_eq!(c.outstanding(), 0);
}

#[test]
fn responder_refuses_an_initiator_from_another_trust_domain() {
    let mut w = world();
    let other = TestCa::new("evil.example");
    let foreign = workload_id("evil.example", "shop", "web");
    w.n1.host(other.workload(&foreign, 3600));
    w.n2.place(&foreign, "node-1");
    assert_refused(&prove(&w, &foreign, &w.api), Refusal::WrongTrustDomain, true);
}

#[test]
fn responder_refuses_a_chain_from_another_ca_of_the_same_name() {
    let mut w = world();
    let impostor = TestCa::new(TD);
    w.n1.host(impostor.workload(&w.web, 3600));
    assert_refused(&prove(&w, &w.web, &w.api), Refusal::UntrustedChain, true);
}

#[test]
fn responder_refuses_an_expired_initiator_svid() {
    let mut w = world();
    let (chain, key) = w.ca.leaf_between(w.web.as_str(), now_unix() - 7200, now_unix() - 3600);
    w.n1.host(Arc::new(WorkloadKey::new(w.web.clone(), chain, &key).unwrap()));
    assert_refused(&prove(&w, &w.web, &w.api), Refusal::Expired, true);
}

#[test]
fn responder_refuses_an_svid_for_another_spiffe_id() {
    let mut w = world();
    // node-1 claims shop/web but presents (and signs with) shop/db's SVID.
    let db = workload_id(TD, "shop", "db");
    let (chain, key) = w.ca.leaf(db.as_str(), 3600);
    w.n1.host(Arc::new(WorkloadKey::new(w.web.clone(), chain, &key).unwrap()));
    assert_refused(&prove(&w, &w.web, &w.api), Refusal::WrongSpiffeId, true);
}

#[test]
fn responder_refuses_a_valid_svid_from_the_wrong_node() {
    let mut w = world();
    // node-1 holds a valid SVID of shop/db (say, from before db moved), but
    // the cluster view places db on node-3.
    let db = workload_id(TD, "shop", "db");
    w.n1.dir.keys.insert(db.clone(), w.ca.workload(&db, 3600));
    w.n2.place(&db, "node-3");
    assert_refused(&prove(&w, &db, &w.api), Refusal::NotPlacedOnPeer, true);
}

#[test]
fn responder_refuses_identities_it_does_not_host_or_hold() {
    let mut w = world();
    let db = workload_id(TD, "shop", "db");
    assert_refused(&prove(&w, &w.web, &db), Refusal::NotHostedHere, true);
    // Placed here, but the SVID has not arrived yet.
    w.n2.place(&db, "node-2");
    assert_refused(&prove(&w, &w.web, &db), Refusal::NoSvid, true);
}

#[test]
fn initiator_refuses_a_responder_proving_the_wrong_identity() {
    let mut w = world();
    // node-2 answers for shop/api with shop/db's SVID.
    let db = workload_id(TD, "shop", "db");
    let (chain, key) = w.ca.leaf(db.as_str(), 3600);
    w.n2.dir.keys.insert(w.api.clone(), Arc::new(WorkloadKey::new(w.api.clone(), chain, &key).unwrap()));
    assert_refused(&prove(&w, &w.web, &w.api), Refusal::WrongSpiffeId, false);
}

#[test]
fn initiator_refuses_a_responder_whose_identity_is_not_placed_on_it() {
    let mut w = world();
    // node-2 holds api's SVID and answers, but node-1's view has api on node-3.
    w.n1.dir.placement.remove(&w.api);
    w.n1.place(&w.api, "node-3");
    assert_refused(&prove(&w, &w.web, &w.api), Refusal::NotPlacedOnPeer, false);
}

#[test]
fn a_proof_signed_for_another_node_or_session_is_refused() {
    let mut w = world();
    // node-3 legitimately hosts shop/web too, and node-2 knows it.
    let mut n3 = w.ca.node("node-3", "192.168.100.3");
    n3.knows_node(&w.n2);
    let web_key = w.ca.workload(&w.web, 3600);
    n3.host(web_key.clone());
    n3.place(&w.api, "node-2");
    w.n2.knows_node(&n3);
    w.n2.place(&w.web, "node-3");

    let mut c = n3.client_to(&w.n2);
    let mut s = w.n2.server_for(n3.addr).unwrap();
    pump(&mut c, &n3.dir, &mut s, &w.n2.dir).map_err(|(e, _)| e).unwrap();
    let exporter = c.exporter().unwrap();
    // "shop/web on node-1", signed by node-3 with a valid web key in its own session.
    let lie = Binding { exporter: &exporter, initiator: &w.web, responder: &w.api, initiator_node: "node-1", responder_node: "node-2" };
    // The same statement bound to another session's exporter.
    let other = [7u8; 32];
    let replay = Binding { exporter: &other, initiator: &w.web, responder: &w.api, initiator_node: "node-3", responder_node: "node-2" };
    for (i, b) in [lie, replay].iter().enumerate() {
        let sig = web_key.sign(&proof::statement(Role::Initiator, b)).unwrap();
        let f = Frame::Prove {
            request: 100 + i as u32,
            initiator: w.web.to_string(),
            responder: w.api.to_string(),
            chain: web_key.chain.to_vec(),
            signature: sig,
        };
        let mut bytes = Vec::new();
        f.encode(&mut bytes);
        c.inject_plaintext(&bytes);
    }
    // node-2 refuses both; the refusals name requests this client never
    // made, so the client session ends too (a hostile client's problem).
    let ex = match pump(&mut c, &n3.dir, &mut s, &w.n2.dir) {
        Ok(ex) => ex,
        Err((PumpError::Client(SessionError::Unexpected { .. }), ex)) => ex,
        Err((e, _)) => panic!("{e:?}"),
    };
    assert!(authenticated(&ex.server_events).is_empty(), "{:?}", ex.server_events);
    let reasons: Vec<Refusal> =
        ex.server_events.iter().filter_map(|e| if let Event::RefusedPeer { reason, .. } = e { Some(*reason) } else { None }).collect();
    assert_eq!(reasons, [Refusal::BadSignature, Refusal::BadSignature]);

    // The honest statement, "web on node-3", is accepted, and says node-3.
    let mut c = n3.client_to(&w.n2);
    let mut s = w.n2.server_for(n3.addr).unwrap();
    c.request(w.web.clone(), w.api.clone(), &n3.dir).unwrap();
    let ex = pump(&mut c, &n3.dir, &mut s, &w.n2.dir).map_err(|(e, _)| e).unwrap();
    let got = authenticated(&ex.server_events);
    assert_eq!(got.len(), 1, "{:?}", ex.server_events);
    assert_eq!((&got[0].remote, got[0].remote_node.as_str()), (&w.web, "node-3"));
}

#[test]
fn connections_from_unknown_addresses_are_refused_before_tls() {
    let w = world();
    let err = w.n2.server_for("10.9.9.9".parse().unwrap()).err().expect("refused");
    assert_eq!(err.reason(), Refusal::UnknownAddress);
}

#[test]
fn a_node_svid_from_another_nodes_address_is_refused() {
    let mut w = world();
    // node-3 (a real node of the trust domain) connects from node-1's address.
    let n3 = w.ca.node("node-3", "192.168.100.3");
    w.n2.knows_node(&n3);
    let mut c = n3.client_to(&w.n2);
    let mut s = w.n2.server_for(w.n1.addr).unwrap();
    let (err, ex) = pump(&mut c, &n3.dir, &mut s, &w.n2.dir).expect_err("refused");
    assert!(matches!(err, PumpError::Server(ref e) if e.reason() == Refusal::NodeMismatch), "{err:?}");
    assert!(!ex.server_events.iter().any(|e| matches!(e, Event::Established { .. })));
}

#[test]
fn the_initiator_refuses_a_server_that_is_not_the_node_it_dialled() {
    let mut w = world();
    let n3 = w.ca.node("node-3", "192.168.100.3");
    w.n1.knows_node(&n3);
    let mut n3b = n3;
    n3b.knows_node(&w.n1);
    // node-1 dials node-2, node-3 answers.
    let mut c = w.n1.client_to(&w.n2);
    let mut s = n3b.server_for(w.n1.addr).unwrap();
    let (err, ex) = pump(&mut c, &w.n1.dir, &mut s, &n3b.dir).expect_err("refused");
    assert!(matches!(err, PumpError::Client(SessionError::Tls { .. })), "{err:?}");
    assert!(ex.client_events.is_empty());
}

#[test]
fn a_node_svid_of_another_trust_domain_is_refused() {
    let w = world();
    let other = TestCa::new("evil.example");
    let mut evil = other.node("node-1", "192.168.100.1");
    evil.knows_node(&w.n2);
    let mut c = evil.client_to(&w.n2);
    let mut s = w.n2.server_for(w.n1.addr).unwrap();
    let (err, ex) = pump(&mut c, &evil.dir, &mut s, &w.n2.dir).expect_err("refused");
    assert!(matches!(err, PumpError::Client(SessionError::Tls { .. }) | PumpError::Server(SessionError::Tls { .. })), "{err:?}");
    assert!(ex.server_events.is_empty() && ex.client_events.is_empty());
}

#[test]
fn garbage_and_truncated_hellos_change_nothing() {
    let w = world();
    let mut s = w.n2.server_for(w.n1.addr).unwrap();
    let err = s.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &w.n2.dir, UnixTime::now()).expect_err("not TLS");
    assert_eq!(err.reason(), Refusal::Tls);

    // A ClientHello cut short: nothing happens until more arrives (the driver's timeout ends it).
    let mut c = w.n1.client_to(&w.n2);
    let mut hello = Vec::new();
    c.transmit(&mut hello);
    let mut s = w.n2.server_for(w.n1.addr).unwrap();
    assert_eq!(s.receive(&hello[..hello.len() / 2], &w.n2.dir, UnixTime::now()).unwrap(), []);
    assert!(!s.is_established());
    let mut out = Vec::new();
    s.transmit(&mut out);
    assert!(out.is_empty(), "no answer to half a hello");
}

#[test]
fn bad_frames_inside_the_session_close_it_and_write_nothing() {
    let w = world();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown kind", vec![0x16, 3, 3, 0, 1, 0]),
        ("oversized", {
            let mut b = vec![1];
            b.extend_from_slice(&((MAX_FRAME + 1) as u32).to_be_bytes());
            b
        }),
        ("proof sent to the responder", {
            let mut b = Vec::new();
            Frame::Proof { request: 1, chain: vec![], signature: vec![] }.encode(&mut b);
            b
        }),
        ("confirm of nothing", {
            let mut b = Vec::new();
            Frame::Confirm { request: 42 }.encode(&mut b);
            b
        }),
    ];
    for (what, bytes) in cases {
        let mut c = w.n1.client_to(&w.n2);
        let mut s = w.n2.server_for(w.n1.addr).unwrap();
        pump(&mut c, &w.n1.dir, &mut s, &w.n2.dir).map_err(|(e, _)| e).unwrap();
        c.inject_plaintext(&bytes);
        let (err, ex) = pump(&mut c, &w.n1.dir, &mut s, &w.n2.dir).expect_err(what);
        assert!(matches!(err, PumpError::Server(ref e) if e.reason() == Refusal::Malformed), "{what}: {err:?}");
        assert!(ex.server_events.is_empty(), "{what}: {:?}", ex.server_events);
    }
    // A frame cut off by the end of the stream.
    let mut c = w.n1.client_to(&w.n2);
    let mut s = w.n2.server_for(w.n1.addr).unwrap();
    pump(&mut c, &w.n1.dir, &mut s, &w.n2.dir).map_err(|(e, _)| e).unwrap();
    c.inject_plaintext(&[1, 0, 0, 1, 0, 0, 0]);
    pump(&mut c, &w.n1.dir, &mut s, &w.n2.dir).map_err(|(e, _)| e).unwrap();
    assert!(s.end_of_input().is_err(), "a frame cut short at EOF is an error");
}

#[test]
fn tampering_on_the_wire_is_detected_and_writes_nothing() {
    let w = world();
    let mut c = w.n1.client_to(&w.n2);
    let mut s = w.n2.server_for(w.n1.addr).unwrap();
    pump(&mut c, &w.n1.dir, &mut s, &w.n2.dir).map_err(|(e, _)| e).unwrap();
    c.request(w.web.clone(), w.api.clone(), &w.n1.dir).unwrap();
    let (err, ex) = pump_with(&mut c, &w.n1.dir, &mut s, &w.n2.dir, UnixTime::now(), |to_server, bytes| {
        if to_server {
            let i = bytes.len() / 2;
            bytes[i] ^= 0x01;
        }
    })
    .expect_err("tampering");
    assert!(matches!(err, PumpError::Server(SessionError::Tls { .. })), "{err:?}");
    assert!(authenticated(&ex.server_events).is_empty() && authenticated(&ex.client_events).is_empty());
}

#[test]
fn an_eavesdropper_sees_no_identity_or_certificate() {
    let w = world();
    let mut c = w.n1.client_to(&w.n2);
    let mut s = w.n2.server_for(w.n1.addr).unwrap();
    pump(&mut c, &w.n1.dir, &mut s, &w.n2.dir).map_err(|(e, _)| e).unwrap();
    c.request(w.web.clone(), w.api.clone(), &w.n1.dir).unwrap();
    let mut seen = Vec::new();
    pump_with(&mut c, &w.n1.dir, &mut s, &w.n2.dir, UnixTime::now(), |_, b| seen.extend_from_slice(b)).map_err(|(e, _)| e).unwrap();
    let hay = String::from_utf8_lossy(&seen);
    assert!(!hay.contains("shop/web") && !hay.contains("shop/api"), "identities travel encrypted");
    let leaf = &w.n1.dir.keys[&w.web].chain[0];
    let tail = &leaf[leaf.len() - 40..leaf.len() - 8];
    assert!(!seen.windows(tail.len()).any(|win| win == tail), "certificates travel encrypted");
}
