//! `wg-agent device` against wireguard-go, both configured only with the
//! stock `wg` tool over the standard UAPI sockets (root only).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshguard_common::key::PublicKey;
use meshguard_meshctl::sim::bins::bin_path;
use meshguard_meshctl::sim::capture::{Capture, judge};
use meshguard_meshctl::sim::cluster::{Cluster, UNDERLAY_BRIDGE, cluster, wait_until};
use meshguard_meshctl::sim::cmd::{in_ns, in_ns_output, ip_in, run};
use meshguard_meshctl::sim::uapi::{self, reply_errno};

const UAPI_DIR: &str = "/var/run/wireguard";

struct Pair {
    c: Cluster,
    /// Interface names: ours on node-1, wireguard-go's on node-2.
    ours: String,
    theirs: String,
    ours_pub: String,
    theirs_pub: String,
    ours_pid: u32,
}

fn genkey(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = run("wg", &["genkey"]).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, &key).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = std::process::Command::new("sh").arg("-c").arg(format!("wg pubkey < {}", path.display())).output().unwrap();
    assert!(out.status.success());
    (path, String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn sock(ifname: &str) -> PathBuf {
    uapi::socket_path(Path::new(UAPI_DIR), ifname)
}

fn wg(c: &Cluster, node: &str, args: &[&str]) -> String {
    in_ns(&c.node(node).netns, "wg", args).unwrap_or_else(|e| panic!("wg {args:?}: {e}"))
}

fn setup() -> Pair {
    setup_with(&[])
}

/// [`setup`], with extra arguments for `wg-agent device`.
fn setup_with(device_args: &[&str]) -> Pair {
    let c = cluster().nodes(2).build().unwrap();
    let tag = &c.run_id[c.run_id.len() - 4..];
    let ours = format!("wgm{tag}");
    let theirs = format!("wgg{tag}");
    let n1 = c.node("node-1").netns.clone();
    let n2 = c.node("node-2").netns.clone();
    let args: Vec<&str> = ["device", ours.as_str()].into_iter().chain(device_args.iter().copied()).collect();
    let ours_pid = c.spawn_in(&n1, &bin_path("wg-agent"), &args, &[], "wg-agent.log").unwrap();
    c.spawn_in(&n2, Path::new("wireguard-go"), &["-f", &theirs], &[("LOG_LEVEL", "error")], "wireguard-go.log").unwrap();
    for s in [sock(&ours), sock(&theirs)] {
        wait_until(&format!("{} to answer", s.display()), Duration::from_secs(10), || uapi::get(&s).is_ok()).unwrap();
    }
    let (k1, ours_pub) = genkey(&c.dir, "ours.key");
    let (k2, theirs_pub) = genkey(&c.dir, "theirs.key");
    let k1 = k1.to_str().unwrap().to_owned();
    let k2 = k2.to_str().unwrap().to_owned();
    wg(
        &c,
        "node-1",
        &[
            "set",
            &ours,
            "private-key",
            &k1,
            "listen-port",
            "51820",
            "peer",
            &theirs_pub,
            "allowed-ips",
            "10.9.0.2/32",
            "endpoint",
            "192.168.100.2:51821",
        ],
    );
    wg(
        &c,
        "node-2",
        &[
            "set",
            &theirs,
            "private-key",
            &k2,
            "listen-port",
            "51821",
            "peer",
            &ours_pub,
            "allowed-ips",
            "10.9.0.1/32",
            "endpoint",
            "192.168.100.1:51820",
        ],
    );
    for (node, ifname, addr) in [("node-1", &ours, "10.9.0.1/24"), ("node-2", &theirs, "10.9.0.2/24")] {
        let ns = &c.node(node).netns;
        ip_in(ns, &["addr", "add", addr, "dev", ifname]).unwrap();
        ip_in(ns, &["link", "set", ifname, "up"]).unwrap();
    }
    Pair { c, ours, theirs, ours_pub, theirs_pub, ours_pid }
}

fn ping(c: &Cluster, node: &str, to: &str) -> bool {
    in_ns_output(&c.node(node).netns, "ping", &["-c", "3", "-W", "2", "-i", "0.2", to]).is_ok_and(|o| o.status.success())
}

fn tcp(c: &Cluster, node: &str, to: &str, msg: &str) -> bool {
    in_ns_output(&c.node(node).netns, bin_path("mg-probe").to_str().unwrap(), &["tcp", &format!("{to}:7000"), msg])
        .is_ok_and(|o| o.status.success())
}

/// `wg show <if> dump` peer line: (latest handshake, rx, tx).
fn dump_peer(c: &Cluster, node: &str, ifname: &str) -> (u64, u64, u64) {
    let out = wg(c, node, &["show", ifname, "dump"]);
    let line = out.lines().nth(1).unwrap_or_else(|| panic!("no peer in dump: {out}"));
    let f: Vec<&str> = line.split('\t').collect();
    (f[4].parse().unwrap(), f[5].parse().unwrap(), f[6].parse().unwrap())
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Interfaces die with their namespaces; the sockets live in /var/run.
        let _ = std::fs::remove_file(sock(&self.ours));
        let _ = std::fs::remove_file(sock(&self.theirs));
    }
}

#[test]
fn root_interop_with_wireguard_go_ping_tcp_and_counters_both_ways() {
    let p = setup();
    let c = &p.c;
    let n1 = c.node("node-1").netns.clone();
    let n2 = c.node("node-2").netns.clone();
    let probe = bin_path("mg-probe");
    c.spawn_in(&n1, &probe, &["serve", "--port", "7000"], &[], "echo.log").unwrap();
    c.spawn_in(&n2, &probe, &["serve", "--port", "7000"], &[], "echo.log").unwrap();

    assert!(ping(c, "node-1", "10.9.0.2"), "ping wg-agent -> wireguard-go");
    assert!(ping(c, "node-2", "10.9.0.1"), "ping wireguard-go -> wg-agent");
    wait_until("echo servers", Duration::from_secs(5), || tcp(c, "node-1", "10.9.0.2", "x")).unwrap();
    assert!(tcp(c, "node-1", "10.9.0.2", "hello from wg-agent"), "TCP wg-agent -> wireguard-go");
    assert!(tcp(c, "node-2", "10.9.0.1", "hello from wireguard-go"), "TCP wireguard-go -> wg-agent");

    // Both sides report a handshake and moving counters through `wg show`.
    let (hs1, rx1, tx1) = dump_peer(c, "node-1", &p.ours);
    let (hs2, rx2, tx2) = dump_peer(c, "node-2", &p.theirs);
    assert!(hs1 > 0 && rx1 > 0 && tx1 > 0, "wg-agent dump: {hs1} {rx1} {tx1}");
    assert!(hs2 > 0 && rx2 > 0 && tx2 > 0, "wireguard-go dump: {hs2} {rx2} {tx2}");
    assert!(tcp(c, "node-1", "10.9.0.2", "more traffic"));
    let (_, rx1b, tx1b) = dump_peer(c, "node-1", &p.ours);
    assert!(rx1b > rx1 && tx1b > tx1, "counters must move: rx {rx1}->{rx1b} tx {tx1}->{tx1b}");
    let human = wg(c, "node-1", &["show", &p.ours]);
    assert!(human.contains("latest handshake") && human.contains("transfer"), "{human}");
    assert!(human.contains(&p.theirs_pub), "{human}");

    // showconf -> edit -> syncconf: a live change without dropping the session.
    let conf = wg(c, "node-1", &["showconf", &p.ours]);
    assert!(conf.contains("ListenPort = 51820") && conf.contains(&p.theirs_pub), "{conf}");
    let edited = conf.replace("AllowedIPs = 10.9.0.2/32", "AllowedIPs = 10.9.0.2/32, 10.9.1.0/24");
    let conf_path = c.dir.join("ours.conf");
    std::fs::write(&conf_path, edited).unwrap();
    wg(c, "node-1", &["syncconf", &p.ours, conf_path.to_str().unwrap()]);
    let allowed = wg(c, "node-1", &["show", &p.ours, "allowed-ips"]);
    assert!(allowed.contains("10.9.1.0/24") && allowed.contains("10.9.0.2/32"), "{allowed}");
    assert!(ping(c, "node-1", "10.9.0.2"), "still up after syncconf");
    assert_eq!(dump_peer(c, "node-1", &p.ours).0, hs1, "syncconf must not force a new handshake");
    assert!(!p.ours_pub.is_empty());
}

#[test]
fn root_interop_bad_input_changes_nothing() {
    let p = setup();
    let c = &p.c;
    assert!(ping(c, "node-1", "10.9.0.2"));
    let ours = sock(&p.ours);
    let before = uapi::request(&ours, "get=1\n\n").unwrap();
    let theirs_hex = PublicKey::from_base64(&p.theirs_pub).unwrap().to_hex();

    // Malformed requests get a UAPI errno and leave the configuration alone,
    // including a request whose first lines were valid (all or nothing).
    for (req, errno) in [
        ("set=1\nlisten_port=70000\n\n".to_owned(), -22),
        ("set=1\nbogus_key=1\n\n".to_owned(), -22),
        ("set=1\nlisten_port\n\n".to_owned(), -71),
        (format!("set=1\nlisten_port=51999\npublic_key={theirs_hex}\nendpoint=garbage\n\n"), -22),
        (format!("set=1\npublic_key={theirs_hex}\nallowed_ip=10.0.0.0/40\n\n"), -22),
        ("frobnicate=1\n\n".to_owned(), -71),
    ] {
        let reply = uapi::request(&ours, &req).unwrap();
        assert_eq!(reply_errno(&reply), Some(errno), "request {req:?} got {reply:?}");
    }
    let after = uapi::request(&ours, "get=1\n\n").unwrap();
    let stable = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| ["private_key", "listen_port", "public_key", "endpoint", "allowed_ip"].iter().any(|k| l.starts_with(k)))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(stable(&before), stable(&after), "a refused request changed the configuration");

    // Garbage on the WireGuard port from the other node: dropped, no panic, session intact.
    let probe = bin_path("mg-probe");
    for len in ["1", "4", "32", "92", "148", "1400"] {
        let out = in_ns_output(
            &c.node("node-2").netns,
            probe.to_str().unwrap(),
            &["spray", "192.168.100.1:51820", "--count", "200", "--len", len],
        )
        .unwrap();
        assert!(out.status.success());
    }
    assert!(c.is_running(p.ours_pid), "wg-agent must survive garbage");
    assert!(ping(c, "node-1", "10.9.0.2"), "session survives garbage");
    assert!(ping(c, "node-2", "10.9.0.1"));
}

/// Issue 18: `wg-quick` drives wg-agent as it drives wireguard-go
/// (`WG_QUICK_USERSPACE_IMPLEMENTATION`, no kernel module here): `up`
/// starts it, configures it from a stock wg-quick file (keys, address,
/// routes, MTU) and traffic flows to a wireguard-go peer brought up the
/// same way; `down` deletes the interface, and the agent exits and takes
/// its socket with it.
#[test]
fn root_wg_quick_brings_a_wg_agent_interface_up_and_down() {
    let c = cluster().nodes(2).build().unwrap();
    let tag = &c.run_id[c.run_id.len() - 4..];
    let (ours, theirs) = (format!("wqm{tag}"), format!("wqg{tag}"));
    let (k1, ours_pub) = genkey(&c.dir, "wq-ours.key");
    let (k2, theirs_pub) = genkey(&c.dir, "wq-theirs.key");
    let conf = |ifname: &str, key: &Path, addr: &str, port: u16, peer: &str, peer_ip: &str, peer_end: &str| {
        let path = c.dir.join(format!("{ifname}.conf"));
        let key = std::fs::read_to_string(key).unwrap();
        std::fs::write(
            &path,
            format!(
                "[Interface]\nPrivateKey = {}\nAddress = {addr}\nListenPort = {port}\n\n[Peer]\nPublicKey = {peer}\nAllowedIPs = {peer_ip}\nEndpoint = {peer_end}\n",
                key.trim()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    };
    let ours_conf = conf(&ours, &k1, "10.9.1.1/24", 51830, &theirs_pub, "10.9.1.2/32", "192.168.100.2:51831");
    let theirs_conf = conf(&theirs, &k2, "10.9.1.2/24", 51831, &ours_pub, "10.9.1.1/32", "192.168.100.1:51830");
    let agent = bin_path("wg-agent");
    let wg_quick = |node: &str, verb: &str, conf: &Path, implementation: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &c.node(node).netns, "env"])
            .arg(format!("WG_QUICK_USERSPACE_IMPLEMENTATION={implementation}"))
            .args(["wg-quick", verb])
            .arg(conf)
            .output()
            .unwrap();
        assert!(out.status.success(), "wg-quick {verb} on {node}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = wg_quick("node-1", "up", &ours_conf, agent.to_str().unwrap());
    assert!(said.contains("userspace"), "wg-quick took the userspace path: {said}");
    wg_quick("node-2", "up", &theirs_conf, "wireguard-go");

    // Configured as the file says, and traffic flows both ways.
    assert_eq!(wg(&c, "node-1", &["show", &ours, "public-key"]).trim(), ours_pub);
    assert_eq!(wg(&c, "node-1", &["show", &ours, "listen-port"]).trim(), "51830");
    let addr = ip_in(&c.node("node-1").netns, &["-4", "addr", "show", "dev", &ours]).unwrap();
    assert!(addr.contains("10.9.1.1/24") && addr.contains(",UP"), "{addr}");
    assert!(ping(&c, "node-1", "10.9.1.2"), "wg-agent (wg-quick) -> wireguard-go (wg-quick)");
    assert!(ping(&c, "node-2", "10.9.1.1"), "wireguard-go -> wg-agent");
    assert!(dump_peer(&c, "node-1", &ours).0 > 0, "no handshake recorded");

    // Down: the interface goes, and with it the agent and its socket.
    wg_quick("node-1", "down", &ours_conf, agent.to_str().unwrap());
    assert!(ip_in(&c.node("node-1").netns, &["link", "show", &ours]).is_err(), "the interface is still there");
    wait_until("the agent to exit and remove its socket", Duration::from_secs(5), || !sock(&ours).exists()).unwrap();
    let running =
        || std::process::Command::new("pgrep").args(["-f", &format!("wg-agent device {ours}")]).output().unwrap().status.success();
    wait_until("the agent to exit", Duration::from_secs(5), || !running()).unwrap();
    wg_quick("node-2", "down", &theirs_conf, "wireguard-go");
    let _ = std::fs::remove_file(sock(&theirs));
}

/// Issue 16: with the TUN's segmentation offload and UDP GRO on (the
/// default), bulk TCP crosses to and from wireguard-go intact over IPv4 and
/// IPv6, a UDP GSO send from an application is cut into its datagrams, and
/// the underlay carries nothing but WireGuard. The captures on our TUN show
/// the offloads at work: super-packets from the kernel's TSO going out, and
/// the segments we coalesced coming in.
#[test]
fn root_offloads_on_bulk_tcp_both_ways_v4_v6_and_udp_gso_against_wireguard_go() {
    let p = setup();
    let log = std::fs::read_to_string(p.c.dir.join("wg-agent.log")).unwrap();
    let offload = log.lines().find(|l| l.contains("TUN device open")).unwrap_or_else(|| panic!("no TUN line in the log: {log}"));
    assert!(offload.contains("offload=tso4,tso6"), "offloads were not negotiated on this kernel: {offload}");
    bulk_both_ways_v4_v6(&p, true);

    // An operator turning segmentation off on the live interface: the
    // kernel now cuts in software and hands over MTU-sized packets whose
    // checksums we still owe (NEEDS_CSUM without GSO). They must arrive.
    let n1 = p.c.node("node-1").netns.clone();
    in_ns(&n1, "ethtool", &["-K", &p.ours, "tso", "off", "gso", "off"]).unwrap();
    let tun = Capture::start(&n1, &p.ours, &p.c.dir.join("tun-tso-off.pcap")).unwrap();
    let probe = bin_path("mg-probe");
    let out = in_ns_output(&n1, probe.to_str().unwrap(), &["stream", "10.9.0.2:7100", "--seconds", "2", "--rate", "2000000000"]).unwrap();
    assert!(out.status.success(), "after ethtool -K tso off: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(tun.stop().unwrap().iter().filter(|f| f.len() > 1420).count(), 0, "tso is off: no super-packets");
}

/// The same traffic with every offload refused at start: the plain path
/// still carries it, and the log says what was decided.
#[test]
fn root_offloads_off_the_plain_path_carries_the_same_traffic() {
    let p = setup_with(&["--no-tun-offload", "--no-udp-gro"]);
    let log = std::fs::read_to_string(p.c.dir.join("wg-agent.log")).unwrap();
    assert!(log.contains("offload=none"), "{log}");
    bulk_both_ways_v4_v6(&p, false);
}

fn bulk_both_ways_v4_v6(p: &Pair, offloads: bool) {
    let c = &p.c;
    // UDP is coalesced for the TUN only where the kernel takes UDP
    // super-packets (Linux 6.2+), which the agent logs.
    let uso = std::fs::read_to_string(c.dir.join("wg-agent.log")).unwrap().contains("offload=tso4,tso6,uso4,uso6");
    let (n1, n2) = (c.node("node-1").netns.clone(), c.node("node-2").netns.clone());
    for (ns, ifname, addr, peer, other) in
        [(&n1, &p.ours, "fd09::1/64", &p.theirs_pub, "fd09::2/128"), (&n2, &p.theirs, "fd09::2/64", &p.ours_pub, "fd09::1/128")]
    {
        ip_in(ns, &["addr", "add", addr, "dev", ifname, "nodad"]).unwrap();
        let v4 = if ns == &n1 { "10.9.0.2/32" } else { "10.9.0.1/32" };
        in_ns(ns, "wg", &["set", ifname, "peer", peer, "allowed-ips", &format!("{v4},{other}")]).unwrap();
    }
    let probe = bin_path("mg-probe");
    for ns in [&n1, &n2] {
        c.spawn_in(ns, &probe, &["stream-serve", "--port", "7100"], &[], "stream.log").unwrap();
        c.spawn_in(ns, &probe, &["serve", "--port", "7000"], &[], "echo.log").unwrap();
    }
    assert!(ping(c, "node-1", "10.9.0.2"), "ping wg-agent -> wireguard-go");
    wait_until("the stream servers", Duration::from_secs(5), || tcp(c, "node-1", "10.9.0.2", "x") && tcp(c, "node-2", "10.9.0.1", "x"))
        .unwrap();
    let underlay = Capture::start(&c.underlay_ns, UNDERLAY_BRIDGE, &c.dir.join("underlay.pcap")).unwrap();

    // (sender, receiver address, whether our side sends the data)
    let runs = [("node-1", "10.9.0.2", true), ("node-2", "10.9.0.1", false), ("node-1", "[fd09::2]", true), ("node-2", "[fd09::1]", false)];
    for (from, to, we_send) in runs {
        let tun = Capture::start(&n1, &p.ours, &c.dir.join(format!("tun-{from}-{}.pcap", to.replace([':', '[', ']'], "")))).unwrap();
        let out = in_ns_output(
            &c.node(from).netns,
            probe.to_str().unwrap(),
            &["stream", &format!("{to}:7100"), "--seconds", "2", "--rate", "2000000000"],
        )
        .unwrap();
        assert!(out.status.success(), "{from} -> {to}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // Raw IP frames on the TUN; the MTU is 1420, so anything larger is a super-packet.
        let big = tun.stop().unwrap().iter().filter(|f| f.len() > 1420).count();
        let what = if we_send { "TSO super-packets the kernel handed us" } else { "super-packets we coalesced for the kernel" };
        if offloads {
            assert!(big > 10, "{from} -> {to}: only {big} {what}");
        } else {
            assert_eq!(big, 0, "{from} -> {to}: offloads are off, yet {big} packets above the MTU crossed the TUN");
        }
    }

    // An application's UDP GSO send through our TUN (USO where the kernel
    // has it): every datagram arrives and is echoed back unchanged.
    for to in ["10.9.0.2", "fd09::2"] {
        let script = format!(
            r#"
import socket
fam = socket.AF_INET6 if ":" in "{to}" else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(5)
s.setsockopt(socket.SOL_UDP, 103, 1000)  # UDP_SEGMENT
data = b"".join(bytes([i]) * 1000 for i in range(12)) + b"tail"
s.sendto(data, ("{to}", 7000))
got = sorted(s.recv(4096) for _ in range(13))
want = sorted([bytes([i]) * 1000 for i in range(12)] + [b"tail"])
assert got == want, [len(g) for g in got]
"#
        );
        let out = in_ns_output(&n1, "python3", &["-c", &script]).unwrap();
        assert!(out.status.success(), "UDP GSO to {to}: {}", String::from_utf8_lossy(&out.stderr));
    }

    // Bursts of datagrams from a connected socket on wireguard-go's side:
    // where the kernel takes UDP super-packets, we write them to our TUN
    // coalesced, and the kernel cuts them back into the same datagrams.
    for (to, bind) in [("10.9.0.1", "0.0.0.0"), ("fd09::1", "::")] {
        let fam = if to.contains(':') { "socket.AF_INET6" } else { "socket.AF_INET" };
        let receiver = format!(
            r#"
import socket
s = socket.socket({fam}, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("{bind}", 7200))
s.settimeout(3)
seen, bad = set(), 0
try:
    while len(seen) < 400:
        d = s.recv(4096)
        i = int.from_bytes(d[:4], "big")
        if d != i.to_bytes(4, "big") + bytes([i % 251]) * 996:
            bad += 1
        seen.add(i)
except socket.timeout:
    pass
print("udp-burst received", len(seen), "bad", bad, flush=True)
"#
        );
        let log = format!("udp-burst-{bind}.log").replace(':', "6");
        c.spawn_in(&n1, Path::new("python3"), &["-c", &receiver], &[], &log).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let tun = Capture::start(&n1, &p.ours, &c.dir.join(format!("tun-udp-{}.pcap", to.replace(':', "")))).unwrap();
        let sender = format!(
            r#"
import socket, time
s = socket.socket({fam}, socket.SOCK_DGRAM)
s.connect(("{to}", 7200))
for burst in range(20):
    for k in range(20):
        i = 20 * burst + k
        s.send(i.to_bytes(4, "big") + bytes([i % 251]) * 996)
    time.sleep(0.005)
"#
        );
        let out = in_ns_output(&n2, "python3", &["-c", &sender]).unwrap();
        assert!(out.status.success(), "UDP burst to {to}: {}", String::from_utf8_lossy(&out.stderr));
        let path = c.dir.join(&log);
        wait_until("the UDP receiver's count", Duration::from_secs(10), || {
            std::fs::read_to_string(&path).is_ok_and(|l| l.contains("udp-burst received"))
        })
        .unwrap();
        let line = std::fs::read_to_string(&path).unwrap();
        assert!(line.contains("received 400 bad 0"), "UDP bursts to {to}: {line}");
        let big_udp = tun.stop().unwrap().iter().filter(|f| f.len() > 1420 && (if f[0] >> 4 == 4 { f[9] } else { f[6] }) == 17).count();
        if uso {
            assert!(big_udp > 0, "UDP to {to}: no coalesced datagrams crossed our TUN");
        } else if !offloads {
            assert_eq!(big_udp, 0, "UDP to {to}: offloads are off, yet {big_udp} UDP packets above the MTU crossed the TUN");
        }
    }

    let report = judge(&underlay.stop().unwrap(), 51820, &[]);
    assert!(report.violations.is_empty(), "not WireGuard on the underlay: {:#?}", report.violations);
    assert!(report.wireguard > 100, "{report:?}");
    // Nothing was refused on our side: no malformed super-packet, no failed write.
    let log = std::fs::read_to_string(c.dir.join("wg-agent.log")).unwrap();
    for reason in ["reason=malformed_ip", "reason=io_error", "reason=decrypt_failed", "reason=source_not_allowed"] {
        assert!(!log.contains(reason), "{reason} in the log:\n{log}");
    }
}
