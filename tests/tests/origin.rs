//! Where a pod source address may come from, on the simulated cluster (root
//! only; issue 14, findings 4 and 5). Identities are credited by source
//! address, so a packet claiming a pod's address must have come out of that
//! pod's own interface or out of the tunnel: a host on the underlay and a
//! process in a node's own namespace (hostNetwork, CAP_NET_RAW) are refused,
//! whatever rp_filter says. Each attack is run with a real raw socket, and
//! the same datagram from the real pod is the control that it would arrive.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshguard_meshctl::sim::cluster::{Cluster, NODE_UNDERLAY_IF, UNDERLAY_BRIDGE, cluster, wait_until};
use meshguard_meshctl::sim::cmd;

const PORT: u16 = 9500;

/// Sends one UDP datagram with any source address through a raw socket
/// (IP_HDRINCL): argv = source, destination, port, payload.
const SEND_RAW: &str = r#"
import socket, struct, sys
src, dst, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
udp = struct.pack('!HHHH', 40000, port, 8 + len(payload), 0) + payload
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(ip + udp, (dst, 0))
"#;

/// Waits up to 3 s for one datagram on PORT and prints its payload and
/// sender; exits 1 if none came.
const LISTEN: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.settimeout(3)
try:
    data, addr = s.recvfrom(2048)
except socket.timeout:
    sys.exit(1)
print(data.decode(), addr[0])
"#;

fn build() -> Cluster {
    let c = cluster()
        .nodes(2)
        .pod("shop/web")
        .label("app", "web")
        .on("node-1")
        .pod("shop/api")
        .label("app", "api")
        .on("node-2")
        .build()
        .unwrap();
    c.start_agents().unwrap();
    c
}

fn listen(netns: &str) -> Child {
    let l = Command::new("ip")
        .args(["netns", "exec", netns, "python3", "-c", LISTEN, &PORT.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The socket is bound well before the datagram is sent.
    std::thread::sleep(Duration::from_millis(400));
    l
}

/// What the listener received ("payload sender"), or None.
fn received(l: Child) -> Option<String> {
    let out = l.wait_with_output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn send_raw(netns: &str, src: &str, dst: &str, payload: &str) {
    let out = cmd::in_ns_output(netns, "python3", &["-c", SEND_RAW, src, dst, &PORT.to_string(), payload]).unwrap();
    assert!(out.status.success(), "raw send failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn spoofed_origin(c: &Cluster, node: &str, direction: &str) -> f64 {
    c.metric(node, &format!("meshguard_datapath_packets_total{{direction=\"{direction}\",verdict=\"drop\",reason=\"spoofed_origin\"}}"))
        .unwrap_or(0.0)
}

#[test]
fn root_a_host_on_the_underlay_cannot_send_as_a_remote_pod() {
    let c = build();
    let (web, api) = (c.pod("shop/web"), c.pod("shop/api"));
    let (web_ip, api_ip) = (web.ip.to_string(), api.ip.to_string());
    let node1 = c.node("node-1");
    // The underlay namespace plays a host on the node network; node-1's
    // underlay interface filters reverse paths loosely, as distributions
    // default to (the agent changes no host-wide sysctl).
    cmd::ip_in(&c.underlay_ns, &["addr", "add", "192.168.100.200/24", "dev", UNDERLAY_BRIDGE]).unwrap();
    cmd::ip_in(&c.underlay_ns, &["route", "add", "10.244.1.0/24", "via", &node1.underlay_ip.to_string()]).unwrap();
    cmd::sysctl(&node1.netns, &format!("net.ipv4.conf.{NODE_UNDERLAY_IF}.rp_filter"), "2").unwrap();

    // Control: api's own datagram reaches web (through the tunnel).
    let l = listen(&web.netns);
    send_raw(&api.netns, &api_ip, &web_ip, "from-api");
    assert_eq!(received(l).as_deref(), Some(format!("from-api {api_ip}").as_str()), "api's own datagram");

    // The attack: the same datagram, in plaintext from the underlay.
    let before = spoofed_origin(&c, "node-1", "ingress");
    let l = listen(&web.netns);
    send_raw(&c.underlay_ns, &api_ip, &web_ip, "from-underlay");
    assert_eq!(received(l), None, "a host on the underlay was credited with api's address");
    wait_until("the spoofed datagram counted", Duration::from_secs(5), || spoofed_origin(&c, "node-1", "ingress") > before)
        .expect("DROP_SPOOFED_ORIGIN counted on node-1 (to-pod)");
}

#[test]
fn root_a_process_in_the_node_namespace_cannot_send_as_a_local_pod() {
    let c = build();
    let (web, api) = (c.pod("shop/web"), c.pod("shop/api"));
    let (web_ip, api_ip) = (web.ip.to_string(), api.ip.to_string());
    let node1 = c.node("node-1").netns.clone();

    // Control: web's own datagram reaches api across the tunnel.
    let l = listen(&api.netns);
    send_raw(&web.netns, &web_ip, &api_ip, "from-web");
    assert_eq!(received(l).as_deref(), Some(format!("from-web {web_ip}").as_str()), "web's own datagram");

    // The attack: a hostNetwork process with CAP_NET_RAW on node-1 sends
    // as web, into the tunnel...
    let before = spoofed_origin(&c, "node-1", "egress");
    let l = listen(&api.netns);
    send_raw(&node1, &web_ip, &api_ip, "from-node-1");
    assert_eq!(received(l), None, "a node-1 host process was credited with web's address on node-2");
    wait_until("the spoofed datagram counted", Duration::from_secs(5), || spoofed_origin(&c, "node-1", "egress") > before)
        .expect("DROP_SPOOFED_ORIGIN counted on node-1 (into the tunnel)");

    // ...and as api, to web on its own node.
    let before = spoofed_origin(&c, "node-1", "ingress");
    let l = listen(&web.netns);
    send_raw(&node1, &api_ip, &web_ip, "as-api-locally");
    assert_eq!(received(l), None, "a node-1 host process was credited with api's address on node-1");
    wait_until("the spoofed datagram counted", Duration::from_secs(5), || spoofed_origin(&c, "node-1", "ingress") > before)
        .expect("DROP_SPOOFED_ORIGIN counted on node-1 (to-pod)");

    // The node's own address is no pod's: host traffic to pods still works.
    let l = listen(&web.netns);
    let host_ip = c.node("node-1").underlay_ip.to_string();
    send_raw(&node1, &host_ip, &web_ip, "from-host");
    assert_eq!(received(l).as_deref(), Some(format!("from-host {host_ip}").as_str()), "node-1's own datagram to web");
}
