//! Transparent node-to-node encryption on the simulated cluster (root only:
//! namespaces, TUN devices, routes). Every test fails loudly without root.

use std::time::Duration;

use meshguard_common::key::PublicKey;
use meshguard_meshctl::sim::bins::bin_path;
use meshguard_meshctl::sim::capture::{Capture, judge};
use meshguard_meshctl::sim::cluster::{Cluster, UNDERLAY_BRIDGE, WG_PORT, cluster, wait_until};

const ECHO_PORT: u16 = 7000;

fn marker() -> String {
    format!("MGMARK-{:016x}", rand::random::<u64>())
}

fn hex_of(b64: &str) -> String {
    PublicKey::from_base64(b64).unwrap().to_hex()
}

fn tcp_ok(c: &Cluster, from: &str, to: &str, msg: &str) -> bool {
    let addr = format!("{}:{ECHO_PORT}", c.pod(to).ip);
    c.probe(from, &["tcp", &addr, msg, "--timeout", "3"])
}

fn udp_ok(c: &Cluster, from: &str, to: &str, msg: &str) -> bool {
    let addr = format!("{}:{ECHO_PORT}", c.pod(to).ip);
    c.probe(from, &["udp", &addr, msg, "--tries", "3"])
}

fn ping_ok(c: &Cluster, from: &str, to: &str) -> bool {
    c.exec(from, "ping", &["-c", "2", "-W", "2", "-i", "0.2", &c.pod(to).ip.to_string()]).is_ok_and(|o| o.status.success())
}

#[test]
fn root_three_nodes_pod_traffic_crosses_the_underlay_only_as_wireguard() {
    let c = cluster()
        .nodes(3)
        .pod("shop/web")
        .on("node-1")
        .pod("shop/cache")
        .on("node-1")
        .pod("shop/api")
        .on("node-2")
        .pod("shop/db")
        .on("node-3")
        .build()
        .unwrap();
    c.start_agents().unwrap();
    for p in ["shop/web", "shop/cache", "shop/api", "shop/db"] {
        c.start_echo(p, ECHO_PORT).unwrap();
    }
    let cap = Capture::start(&c.underlay_ns, UNDERLAY_BRIDGE, &c.dir.join("underlay.pcap")).unwrap();
    let mark = marker();

    let pairs = [("shop/web", "shop/api"), ("shop/api", "shop/db"), ("shop/db", "shop/web"), ("shop/web", "shop/cache")];
    for (from, to) in pairs {
        assert!(tcp_ok(&c, from, to, &format!("{mark} tcp {from}->{to}")), "TCP {from} -> {to}");
        assert!(udp_ok(&c, from, to, &format!("{mark} udp {from}->{to}")), "UDP {from} -> {to}");
    }
    assert!(ping_ok(&c, "shop/web", "shop/db"), "ping across nodes");

    let frames = cap.stop().unwrap();
    let report = judge(&frames, WG_PORT, &[mark.as_bytes()]);
    assert!(report.violations.is_empty(), "plaintext on the underlay: {:#?}", report.violations);
    assert!(report.wireguard >= 12, "expected WireGuard traffic, report: {report:?}");

    // Transfer counters moved on every node, for every peer.
    for n in ["node-1", "node-2", "node-3"] {
        let dev = c.wg(n).unwrap();
        assert_eq!(dev.peers.len(), 2, "{n} peers");
        assert!(dev.peers.iter().all(|p| p.tx_bytes > 0 && p.rx_bytes > 0 && p.last_handshake_sec > 0), "{n}: {dev:?}");
    }
}

#[test]
fn root_strict_mode_drops_and_counts_while_a_peer_is_missing_and_while_the_agent_is_down() {
    let c = cluster().nodes(2).pod("app/a").on("node-1").pod("app/b").on("node-2").build().unwrap();
    c.start_echo("app/b", ECHO_PORT).unwrap();
    c.start_echo("app/a", ECHO_PORT).unwrap();
    let cap = Capture::start(&c.underlay_ns, UNDERLAY_BRIDGE, &c.dir.join("strict.pcap")).unwrap();
    let mark = marker();

    // Only node-1 runs an agent: it has no peer for node-2's pods.
    c.start_agent("node-1").unwrap();
    assert!(!udp_ok(&c, "app/a", "app/b", &format!("{mark} no peer yet")));
    assert!(!tcp_ok(&c, "app/a", "app/b", &format!("{mark} no peer yet")));
    let dropped = c.metric("node-1", "meshguard_wg_dropped_packets_total{reason=\"no_peer\"}").unwrap();
    assert!(dropped >= 1.0, "no_peer drops must be counted, got {dropped}");

    // With node-2's agent up, traffic flows.
    c.start_agent("node-2").unwrap();
    c.wait_mesh().unwrap();
    assert!(udp_ok(&c, "app/a", "app/b", &format!("{mark} meshed")));

    // node-1's agent crashes: the tunnel interface and routes stay, nothing leaks.
    c.stop_agent("node-1", false).unwrap();
    assert!(!udp_ok(&c, "app/a", "app/b", &format!("{mark} agent down")));
    assert!(!tcp_ok(&c, "app/a", "app/b", &format!("{mark} agent down")));
    let routes = c.exec_node("node-1", "ip", &["route", "show", "proto", "201"]).unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(routes.contains("blackhole 10.244.0.0/16"), "blackhole fallback missing: {routes}");

    // And after the restart it works again, with the same key.
    c.start_agent("node-1").unwrap();
    c.wait_mesh().unwrap();
    assert!(tcp_ok(&c, "app/a", "app/b", &format!("{mark} back")));

    let frames = cap.stop().unwrap();
    let report = judge(&frames, WG_PORT, &[mark.as_bytes()]);
    assert!(report.violations.is_empty(), "plaintext on the underlay: {:#?}", report.violations);
}

#[test]
fn root_restart_keeps_the_node_key_and_a_rotated_key_is_picked_up_live() {
    let c = cluster().nodes(2).pod("app/a").on("node-1").pod("app/b").on("node-2").build().unwrap();
    c.start_echo("app/b", ECHO_PORT).unwrap();
    c.start_agents().unwrap();
    assert!(tcp_ok(&c, "app/a", "app/b", "first"));
    let key = c.node_public_key("node-2").unwrap();

    // Restart: same key, the peer on node-1 never needed to change.
    c.stop_agent("node-2", true).unwrap();
    c.start_agent("node-2").unwrap();
    c.wait_mesh().unwrap();
    assert_eq!(c.node_public_key("node-2").unwrap(), key, "restart must keep the node key");
    assert!(tcp_ok(&c, "app/a", "app/b", "after restart"));

    // Rotation while everything runs: node-1 follows without a restart.
    let node1_log_before = c.agent_log("node-1").lines().filter(|l| l.contains("node agent starting")).count();
    let out = std::process::Command::new(bin_path("wg-agent"))
        .args(["rotate-key", "--config"])
        .arg(c.agent_config_path("node-2"))
        .output()
        .unwrap();
    assert!(out.status.success(), "rotate-key: {}", String::from_utf8_lossy(&out.stderr));
    let new_key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_ne!(new_key, key);
    wait_until("node-2 to publish its new key", Duration::from_secs(10), || c.node_public_key("node-2").is_ok_and(|k| k == new_key))
        .unwrap();
    wait_until("node-1 to replace its peer", Duration::from_secs(10), || {
        c.wg("node-1").is_ok_and(|d| d.peers.len() == 1 && d.peers[0].public_key_hex == hex_of(&new_key))
    })
    .unwrap();
    c.wait_mesh().unwrap();
    assert!(tcp_ok(&c, "app/a", "app/b", "after rotation"));
    let node1_log_after = c.agent_log("node-1").lines().filter(|l| l.contains("node agent starting")).count();
    assert_eq!(node1_log_before, node1_log_after, "node-1 must not have restarted");
}

/// Issue 16 on the product path: bulk pod-to-pod TCP across nodes (managed
/// agents, strict mode, the eBPF policy attached) arrives intact, and each
/// node's metrics show the offloads at work: super-packets cut from the TUN
/// on the sender, received slots holding many datagrams (UDP GRO) and
/// super-packets written to the TUN on the receiver.
#[test]
fn root_bulk_pod_traffic_goes_through_the_offloads_and_the_metrics_show_it() {
    let c = cluster().nodes(2).pod("shop/web").on("node-1").pod("shop/api").on("node-2").build().unwrap();
    c.start_agents().unwrap();
    let probe = bin_path("mg-probe");
    c.spawn_in_pod("shop/api", &probe, &["stream-serve", "--port", "7100"]).unwrap();
    let api = format!("{}:7100", c.pod("shop/api").ip);
    wait_until("the stream server", Duration::from_secs(10), || c.probe("shop/web", &["stream", &api, "--seconds", "1", "--rate", "1000"]))
        .unwrap();
    let out = c.exec("shop/web", probe.to_str().unwrap(), &["stream", &api, "--seconds", "2", "--rate", "2000000000"]).unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let batches = |node: &str, kind: &str| c.metric(node, &format!("meshguard_wg_offload_batches_total{{kind=\"{kind}\"}}")).unwrap();
    assert!(batches("node-1", "tun_segmented") > 10.0, "sender: no TSO super-packets cut");
    assert!(batches("node-2", "udp_gro") > 10.0, "receiver: no UDP GRO slots");
    assert!(batches("node-2", "tun_coalesced") > 10.0, "receiver: no super-packets written to the TUN");
    // Nothing refused: no super-packet from the sender's TUN, no write on either side.
    for node in ["node-1", "node-2"] {
        for reason in ["malformed_ip", "io_error"] {
            let dropped = c.metric(node, &format!("meshguard_wg_dropped_packets_total{{reason=\"{reason}\"}}")).unwrap();
            assert_eq!(dropped, 0.0, "{node}: {reason}");
        }
    }
}
