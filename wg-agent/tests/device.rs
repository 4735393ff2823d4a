//! Whole devices in one process, on in-memory TUNs and a switch that records
//! every datagram: the eavesdropper and the attacker of these tests.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshguard_common::key::{PublicKey, SecretKey};
use meshguard_wg_agent::device::{Device, DeviceUpdate, DropReason, PeerUpdate};
use meshguard_wg_agent::io::channel::{Switch, TunHandle, tun_pair};
use meshguard_wg_agent::managed::node_key::public_of;

const WAIT: Duration = Duration::from_secs(5);

struct Node {
    device: Device,
    tun: TunHandle,
    public: PublicKey,
    addr: SocketAddr,
}

fn node(switch: &Arc<Switch>, host: u8, port: u16) -> Node {
    let ip = IpAddr::V4(Ipv4Addr::new(192, 168, 7, host));
    let (tun, handle) = tun_pair();
    let device = Device::start(tun, switch.network(ip), port).unwrap();
    let secret = SecretKey::generate();
    let public = public_of(&secret);
    device.apply(&DeviceUpdate { private_key: Some(Some(secret)), ..Default::default() }).unwrap();
    Node { device, tun: handle, public, addr: SocketAddr::new(ip, port) }
}

fn peer(of: &Node, allowed: &str, with_endpoint: bool) -> PeerUpdate {
    let mut p = PeerUpdate::new(of.public);
    p.allowed_ips = vec![allowed.parse().unwrap()];
    if with_endpoint {
        p.endpoint = Some(of.addr);
    }
    p
}

fn connect(a: &Node, a_net: &str, b: &Node, b_net: &str) {
    a.device.apply(&DeviceUpdate { peers: vec![peer(b, b_net, true)], ..Default::default() }).unwrap();
    b.device.apply(&DeviceUpdate { peers: vec![peer(a, a_net, true)], ..Default::default() }).unwrap();
}

/// A minimal IPv4/UDP packet carrying `payload`.
fn ipv4_udp(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// Sends `pkt` into `from`'s TUN and expects exactly it out of `to`'s.
fn deliver(from: &Node, to: &Node, pkt: &[u8]) {
    from.tun.send(pkt);
    let got = to.tun.recv_timeout(WAIT).expect("packet was not delivered");
    assert_eq!(got, pkt);
}

#[test]
fn packets_cross_encrypted_both_ways() {
    let switch = Switch::new();
    let a = node(&switch, 1, 51820);
    let b = node(&switch, 2, 51820);
    connect(&a, "10.99.1.0/24", &b, "10.99.2.0/24");

    let marker = b"MARKER-7f3a9c1e-plaintext";
    deliver(&a, &b, &ipv4_udp([10, 99, 1, 5], [10, 99, 2, 5], marker));
    deliver(&b, &a, &ipv4_udp([10, 99, 2, 5], [10, 99, 1, 5], marker));
    for _ in 0..50 {
        deliver(&a, &b, &ipv4_udp([10, 99, 1, 5], [10, 99, 2, 7], marker));
    }

    let wire = switch.captured();
    assert!(wire.len() >= 53, "handshake and data should be on the wire");
    assert!(wire.iter().all(|d| !contains(&d.bytes, marker)), "plaintext marker seen on the wire");
    // Every datagram is a WireGuard message: type 1-4 with three zero bytes.
    assert!(wire.iter().all(|d| (1..=4).contains(&d.bytes[0]) && d.bytes[1..4] == [0, 0, 0]));

    let snap = a.device.snapshot();
    assert_eq!(snap.peers.len(), 1);
    let p = &snap.peers[0];
    assert!(p.tx_bytes > 0 && p.rx_bytes > 0);
    assert!(p.last_handshake.is_some());
}

#[test]
fn garbage_truncated_and_replayed_datagrams_do_not_disturb_a_session() {
    let switch = Switch::new();
    let a = node(&switch, 1, 51820);
    let b = node(&switch, 2, 51820);
    connect(&a, "10.99.1.0/24", &b, "10.99.2.0/24");
    deliver(&a, &b, &ipv4_udp([10, 99, 1, 5], [10, 99, 2, 5], b"hello"));
    let handshake_before = b.device.snapshot().peers[0].last_handshake;

    let wire = switch.captured();
    let init = wire.iter().find(|d| d.bytes[0] == 1).unwrap().clone();
    let data = wire.iter().rev().find(|d| d.bytes[0] == 4 && d.to == b.addr).unwrap().clone();
    let attacker: SocketAddr = "192.168.7.66:4444".parse().unwrap();

    // Garbage of every length around the message sizes.
    for len in [0, 1, 3, 4, 15, 16, 31, 32, 33, 64, 91, 92, 93, 147, 148, 149, 1500] {
        let junk: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        switch.inject(attacker, b.addr, &junk);
        // Right type byte, wrong everything else.
        for t in 1u8..=4 {
            let mut j = junk.clone();
            if j.len() >= 4 {
                j[..4].copy_from_slice(&u32::from(t).to_le_bytes());
            }
            switch.inject(attacker, b.addr, &j);
        }
    }
    // Truncations of real messages.
    for cut in [1, 4, 16, 32, init.bytes.len() - 1] {
        switch.inject(attacker, b.addr, &init.bytes[..cut.min(init.bytes.len())]);
        switch.inject(attacker, b.addr, &data.bytes[..cut.min(data.bytes.len())]);
    }
    // Replays, from the attacker and from the real source.
    switch.inject(attacker, b.addr, &data.bytes);
    switch.inject(data.from, b.addr, &data.bytes);
    switch.inject(init.from, b.addr, &init.bytes);

    wait_for("replays to be counted", || b.device.stats().drops(DropReason::Replay) >= 3);
    let stats = b.device.stats();
    assert!(stats.drops(DropReason::MalformedDatagram) > 0);
    assert!(stats.drops(DropReason::BadMac) > 0);
    assert!(b.tun.recv_timeout(Duration::from_millis(200)).is_none(), "nothing injected reached the TUN");

    // The session is untouched: same handshake, traffic flows, endpoint did not move.
    deliver(&a, &b, &ipv4_udp([10, 99, 1, 5], [10, 99, 2, 5], b"still here"));
    deliver(&b, &a, &ipv4_udp([10, 99, 2, 5], [10, 99, 1, 5], b"and back"));
    let snap = b.device.snapshot();
    assert_eq!(snap.peers[0].last_handshake, handshake_before);
    assert_eq!(snap.peers[0].endpoint, Some(a.addr));
}

#[test]
fn a_handshake_from_an_unknown_key_is_refused() {
    let switch = Switch::new();
    let b = node(&switch, 2, 51820);
    let stranger = node(&switch, 9, 51820);
    // The stranger knows b's key, but b does not know the stranger's.
    stranger.device.apply(&DeviceUpdate { peers: vec![peer(&b, "10.99.2.0/24", true)], ..Default::default() }).unwrap();
    stranger.tun.send(&ipv4_udp([10, 99, 9, 1], [10, 99, 2, 5], b"let me in"));
    wait_for("the refusal to be counted", || b.device.stats().drops(DropReason::UnknownPeer) >= 1);
    assert!(b.tun.recv_timeout(Duration::from_millis(200)).is_none());
    assert!(switch.captured().iter().all(|d| d.to != stranger.addr), "b must not answer a stranger");
}

#[test]
fn cryptokey_routing_drops_inner_sources_outside_the_peers_allowed_ips() {
    let switch = Switch::new();
    let a = node(&switch, 1, 51820);
    let b = node(&switch, 2, 51820);
    connect(&a, "10.99.1.0/24", &b, "10.99.2.0/24");
    deliver(&a, &b, &ipv4_udp([10, 99, 1, 5], [10, 99, 2, 5], b"ok"));
    // a's pod claims an address that belongs to some other node.
    a.tun.send(&ipv4_udp([10, 99, 3, 5], [10, 99, 2, 5], b"spoofed"));
    wait_for("the spoof to be counted", || b.device.stats().drops(DropReason::SourceNotAllowed) == 1);
    assert!(b.tun.recv_timeout(Duration::from_millis(200)).is_none());
}

#[test]
fn a_destination_without_a_peer_is_dropped_and_counted() {
    let switch = Switch::new();
    let a = node(&switch, 1, 51820);
    a.tun.send(&ipv4_udp([10, 99, 1, 5], [10, 99, 4, 5], b"nowhere"));
    wait_for("the drop to be counted", || a.device.stats().drops(DropReason::NoPeer) == 1);
    assert!(switch.captured().is_empty());
}

#[test]
fn a_roaming_peer_is_followed() {
    let switch = Switch::new();
    let a = node(&switch, 1, 51820);
    let b = node(&switch, 2, 51820);
    connect(&a, "10.99.1.0/24", &b, "10.99.2.0/24");
    deliver(&a, &b, &ipv4_udp([10, 99, 1, 5], [10, 99, 2, 5], b"before"));
    // a moves to another port (as after a NAT rebinding).
    a.device.apply(&DeviceUpdate { listen_port: Some(40999), ..Default::default() }).unwrap();
    deliver(&a, &b, &ipv4_udp([10, 99, 1, 5], [10, 99, 2, 5], b"after"));
    let moved: SocketAddr = "192.168.7.1:40999".parse().unwrap();
    assert_eq!(b.device.snapshot().peers[0].endpoint, Some(moved));
    deliver(&b, &a, &ipv4_udp([10, 99, 2, 5], [10, 99, 1, 5], b"reply finds a"));
}

#[test]
fn a_failed_update_changes_nothing() {
    let switch = Switch::new();
    let a = node(&switch, 1, 51820);
    let b = node(&switch, 1, 51821);
    let before = b.device.snapshot();
    // Port in use: the whole update, peers included, must be refused.
    let err = b
        .device
        .apply(&DeviceUpdate { listen_port: Some(51820), peers: vec![peer(&a, "10.99.1.0/24", true)], ..Default::default() })
        .unwrap_err();
    assert!(err.to_string().contains("51820"), "{err}");
    let after = b.device.snapshot();
    assert_eq!(after.listen_port, before.listen_port);
    assert!(after.peers.is_empty());
}

#[test]
fn persistent_keepalive_and_live_changes() {
    let switch = Switch::new();
    let a = node(&switch, 1, 51820);
    let b = node(&switch, 2, 51820);
    connect(&a, "10.99.1.0/24", &b, "10.99.2.0/24");
    let mut ka = PeerUpdate::new(b.public);
    ka.persistent_keepalive = Some(1);
    a.device.apply(&DeviceUpdate { peers: vec![ka], ..Default::default() }).unwrap();
    // Keepalive starts a handshake on its own and then ticks every second.
    std::thread::sleep(Duration::from_millis(3500));
    let from_a = switch.captured().iter().filter(|d| d.from == a.addr && d.bytes[0] == 4).count();
    assert!((2..=6).contains(&from_a), "expected about 3 keepalives, saw {from_a}");
    assert!(a.device.snapshot().peers[0].last_handshake.is_some());

    // Moving an allowed IP to another peer takes it from the first.
    let c = node(&switch, 3, 51820);
    let mut moved = peer(&c, "10.99.2.128/25", true);
    moved.allowed_ips.push("10.99.2.0/24".parse().unwrap());
    a.device.apply(&DeviceUpdate { peers: vec![moved], ..Default::default() }).unwrap();
    let snap = a.device.snapshot();
    let b_peer = snap.peers.iter().find(|p| p.public_key == b.public).unwrap();
    assert!(b_peer.allowed_ips.is_empty(), "{:?}", b_peer.allowed_ips);

    // Removing the peer ends it.
    let mut rm = PeerUpdate::new(b.public);
    rm.remove = true;
    a.device.apply(&DeviceUpdate { peers: vec![rm], ..Default::default() }).unwrap();
    assert!(a.device.snapshot().peers.iter().all(|p| p.public_key != b.public));
}

#[test]
fn one_device_many_peers() {
    let switch = Switch::new();
    let hub = node(&switch, 1, 51820);
    let spokes: Vec<Node> = (2..12).map(|i| node(&switch, i, 51820)).collect();
    for (i, s) in spokes.iter().enumerate() {
        connect(&hub, "10.99.1.0/24", s, &format!("10.99.{}.0/24", i + 2));
    }
    for round in 0..3 {
        for (i, s) in spokes.iter().enumerate() {
            let pkt = ipv4_udp([10, 99, 1, 1], [10, 99, i as u8 + 2, 9], format!("round {round} to {i}").as_bytes());
            deliver(&hub, s, &pkt);
            let back = ipv4_udp([10, 99, i as u8 + 2, 9], [10, 99, 1, 1], b"back");
            deliver(s, &hub, &back);
        }
    }
    assert_eq!(hub.device.snapshot().peers.len(), 10);
}

#[test]
fn re_setting_the_same_private_key_keeps_sessions() {
    let switch = Switch::new();
    let a = node(&switch, 1, 51820);
    let b = node(&switch, 2, 51820);
    connect(&a, "10.99.1.0/24", &b, "10.99.2.0/24");
    deliver(&a, &b, &ipv4_udp([10, 99, 1, 5], [10, 99, 2, 5], b"one"));
    let inits = || switch.captured().iter().filter(|d| d.bytes[0] == 1).count();
    let before = inits();
    // What `wg syncconf` sends: the same key again.
    let same = a.device.snapshot().private_key;
    a.device.apply(&DeviceUpdate { private_key: Some(same), ..Default::default() }).unwrap();
    deliver(&a, &b, &ipv4_udp([10, 99, 1, 5], [10, 99, 2, 5], b"two"));
    assert_eq!(inits(), before, "no new handshake for an unchanged key");
    // A different key does reset the sessions.
    a.device.apply(&DeviceUpdate { private_key: Some(Some(SecretKey::generate())), ..Default::default() }).unwrap();
    assert_ne!(a.device.public_key(), Some(a.public));
}
