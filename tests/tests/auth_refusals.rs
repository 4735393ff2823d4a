//! What auth-handshake refuses, on the simulated cluster with the real
//! identity-ca and the real agents (root only):
//!
//! - a pod the cluster view places on its node, but whose identity that
//!   node's auth-handshake holds no SVID for, gets no auth entry and its
//!   packets under `authentication: required` are dropped; the refusal is
//!   counted on both nodes;
//! - garbage, a truncated ClientHello and a slowloris on a node's handshake
//!   port (TCP 4801) are closed and counted, the agent keeps running, and a
//!   legitimate handshake completes on the same port meanwhile.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshguard_meshctl::sim::bins::bin_path;
use meshguard_meshctl::sim::cluster::{Cluster, UNDERLAY_BRIDGE, cluster, wait_until};
use meshguard_meshctl::sim::identity::{AUTH_HANDSHAKE_PORT, CA_IP, Identity};

/// api (on node-1) takes TCP and UDP 7000 from web and ghost, proved.
const POLICY: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: web}, {serviceAccount: ghost}, {serviceAccount: cart}]
      ports: [{protocol: TCP, port: 7000}, {protocol: UDP, port: 7000}]
      authentication: required
"#;

/// The identity stack (proveAhead off: every pair is proved on its first
/// packet), the policy on identity-ca's registry, the node agents on the
/// registry, echo servers on api and db.
fn start(c: &Cluster) -> Identity<'_> {
    let id = c.identity().prove_ahead(false).start().unwrap();
    id.apply_policy(POLICY).unwrap();
    id.use_registry_for_agents();
    c.start_agents().unwrap();
    c.start_echo("shop/api", 7000).unwrap();
    if c.pods.iter().any(|p| p.key() == "shop/db") {
        c.start_echo("shop/db", 7000).unwrap();
    }
    id
}

/// The numbers the registry gave shop/`sa`'s identity and `node`.
fn numbers(id: &Identity<'_>, sa: &str, node: &str) -> (u32, u32) {
    id.numbers("shop", sa, node).unwrap()
}

/// Every auth entry on `node` (expired or not).
fn all_pairs(c: &Cluster, node: &str) -> Vec<meshguard_ebpf::AuthPair> {
    c.auth_entries(node).into_iter().map(|(p, _)| p).collect()
}

fn refused(id: &Identity<'_>, node: &str, reason: &str, role: &str) -> f64 {
    id.auth_metric(node, &format!("meshguard_auth_handshakes_total{{result=\"refused\",reason=\"{reason}\",role=\"{role}\"}}")).unwrap()
}

fn tcp(c: &Cluster, from: &str, to: &str) -> bool {
    c.probe(from, &["tcp", &format!("{}:7000", c.pod(to).ip), "hi", "--timeout", "2"])
}

fn udp(c: &Cluster, from: &str, to: &str) -> bool {
    c.probe(from, &["udp", &format!("{}:7000", c.pod(to).ip), "u", "--tries", "2"])
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Loses what `netns` sends to identity-ca until [`unblock_ca`]: the CA's
/// address resolves to a MAC no one has, so node-2's frames to it are
/// dropped on the underlay bridge, while what the CA sends still arrives
/// (a link that loses one direction).
fn block_ca(netns: &str) {
    let ip = CA_IP.to_string();
    run("ip", &["netns", "exec", netns, "ip", "neigh", "replace", &ip, "lladdr", "02:00:00:00:be:ef", "nud", "permanent", "dev", "eth0"]);
}

fn unblock_ca(netns: &str) {
    run("ip", &["netns", "exec", netns, "ip", "neigh", "del", &CA_IP.to_string(), "dev", "eth0"]);
}

#[test]
fn root_a_pod_whose_identity_has_no_svid_on_its_node_is_dropped_and_the_refusal_counted() {
    let c = cluster()
        .nodes(2)
        .pod("shop/api")
        .label("app", "api")
        .on("node-1")
        // No policy selects db: the same path with authentication off.
        .pod("shop/db")
        .label("app", "db")
        .on("node-1")
        .pod("shop/web")
        .label("app", "web")
        .on("node-2")
        .pod("shop/ghost")
        .label("app", "ghost")
        .on("node-2")
        .build()
        .unwrap();
    let id = start(&c);
    let node2 = c.node("node-2").netns.clone();
    let ghost_ip = c.pod("shop/ghost").ip.to_string();

    // Control: web, on the same node, is proved on its first packet.
    assert!(tcp(&c, "shop/web", "shop/api"), "web -> api (authenticated) must pass");
    assert!(tcp(&c, "shop/ghost", "shop/api"), "ghost -> api passes while node-2 holds ghost's SVID");

    let (_, n2) = numbers(&id, "web", "node-2");
    let (api, n1) = numbers(&id, "api", "node-1");
    // ghost leaves the registry: node-2 drops its SVID, wg-agent closes its interface.
    id.admin(&["workload", "delete", "shop/ghost"]).unwrap();
    wait_until("node-2 to drop ghost's SVID", Duration::from_secs(10), || id.fetch("shop/ghost").is_ok_and(|o| o.is_refused())).unwrap();

    // node-2 loses its way to the CA (what it sends is dropped; what the CA
    // pushes still arrives), and ghost comes back on node-2: every view —
    // both wg-agents', both auth-handshakes' — places it there, but node-2
    // cannot get its SVID.
    let issued_before = id.issued().unwrap().iter().filter(|s| s.spiffe_id.ends_with("/sa/ghost")).count();
    block_ca(&node2);
    let blocked_at = Instant::now();
    let put = id.admin(&[
        "workload",
        "put",
        "--name",
        "ghost",
        "--namespace",
        "shop",
        "--service-account",
        "ghost",
        "--node",
        "node-2",
        "--ip",
        &ghost_ip,
        "--label",
        "app=ghost",
    ]);
    if let Err(e) = put {
        unblock_ca(&node2);
        panic!("workload put: {e}");
    }
    let (ghost, _) = numbers(&id, "ghost", "node-2");
    // The data plane places ghost on node-2 again: its interface is
    // enforced with ghost's identity and its packets leave the node (db
    // takes anyone).
    wait_until("ghost's packets to leave node-2 again (ghost -> db)", Duration::from_secs(10), || tcp(&c, "shop/ghost", "shop/db"))
        .unwrap();

    // Under `authentication: required`, ghost is dropped: node-1 asks node-2
    // to prove ghost, node-2 holds no SVID for it and refuses.
    let signals_before = id.auth_metric("node-1", "meshguard_auth_signals_total").unwrap();
    let mut tries = 0;
    wait_until("node-2 to refuse proving ghost (no_svid)", Duration::from_secs(10), || {
        tries += 1;
        assert!(!tcp(&c, "shop/ghost", "shop/api"), "ghost -> api TCP passed without an SVID for ghost on node-2");
        refused(&id, "node-2", "no_svid", "responder") >= 1.0
    })
    .unwrap();
    assert!(!udp(&c, "shop/ghost", "shop/api"), "ghost -> api UDP was answered without an SVID for ghost on node-2");
    let signals = id.auth_metric("node-1", "meshguard_auth_signals_total").unwrap() - signals_before;
    let (ini, resp) = (refused(&id, "node-1", "no_svid", "initiator"), refused(&id, "node-2", "no_svid", "responder"));
    eprintln!(
        "ghost -> api dropped ({tries} TCP connect(s) of 2 s, one UDP exchange of 2 tries): node-1 read {signals} auth-required signal(s); \
         refused no_svid: node-1 initiator {ini}, node-2 responder {resp}"
    );
    assert!(signals >= 1.0, "node-1's datapath signalled the pair");
    assert!(ini >= 1.0, "node-1 counts node-2's refusal");
    // No entry for ghost anywhere, not even an expired one.
    let ghost_entries: Vec<_> = all_pairs(&c, "node-1")
        .into_iter()
        .filter(|p| p.remote_identity == ghost)
        .chain(all_pairs(&c, "node-2").into_iter().filter(|p| p.local_identity == ghost || p.remote_identity == ghost))
        .collect();
    // (The entries of ghost's first life were deleted with the workload.)
    assert!(ghost_entries.is_empty(), "auth entries for ghost: {ghost_entries:?}");
    let issued_now = id.issued().unwrap().iter().filter(|s| s.spiffe_id.ends_with("/sa/ghost")).count();
    assert_eq!(issued_now, issued_before, "the CA issued ghost's SVID although node-2 cannot reach it");
    let expired = id.auth_metric("node-1", "meshguard_auth_held_packets_total{result=\"expired\"}").unwrap_or(0.0);
    eprintln!("node-2 cut off from the CA for {:?} so far; node-1 let {expired} held first packet(s) expire", blocked_at.elapsed());

    // Once node-2 reaches the CA again, it gets ghost's SVID and the same
    // pair is proved: the SVID was all that was missing.
    unblock_ca(&node2);
    let t = Instant::now();
    wait_until("ghost -> api once node-2 holds ghost's SVID", Duration::from_secs(30), || tcp(&c, "shop/ghost", "shop/api")).unwrap();
    eprintln!("ghost -> api passes {:?} after node-2 reached the CA again", t.elapsed());
    assert!(all_pairs(&c, "node-1").iter().any(|p| p.local_identity == api && p.remote_identity == ghost && p.remote_node == n2));
    assert!(all_pairs(&c, "node-2").iter().any(|p| p.local_identity == ghost && p.remote_identity == api && p.remote_node == n1));
}

// === the handshake port ===

/// Opens connections from `argv[1]` to `argv[2]:argv[3]` and abuses them:
/// `garbage` (an HTTP request and bytes 0..255), `hello` (the first 48
/// bytes of a ClientHello announcing 512), `slowloris` (the same, one byte
/// every 0.5 s); then a flood of `argv[5]` connections opened one after
/// another. Prints a JSON line per connection when it ends (closed or not),
/// `at` seconds after the start, and `{"ready":...}` once all are open.
const ABUSE: &str = r#"
import json, socket, sys, threading, time
src, dst, port, modes, flood = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(","), int(sys.argv[5])
T0 = time.monotonic()
lock = threading.Lock()
def report(**kv):
    kv["at"] = round(time.monotonic() - T0, 3)
    with lock:
        print(json.dumps(kv), flush=True)
def conn():
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(5)
    s.connect((dst, port))
    return s
def wait_closed(s, limit):
    end = time.monotonic() + limit
    got = 0
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return False, got
        s.settimeout(left)
        try:
            b = s.recv(4096)
        except socket.timeout:
            return False, got
        except OSError:
            return True, got
        if not b:
            return True, got
        got += len(b)
HELLO = bytes([0x16, 3, 1, 2, 0, 1, 0, 1, 0xfc, 3, 3]) + bytes([0x5a]) * 37
def abuse(mode, s):
    closed, got = False, 0
    try:
        if mode == "garbage":
            s.sendall(b"GET / HTTP/1.1\r\nHost: meshguard\r\n\r\n" + bytes(range(256)))
            closed, got = wait_closed(s, 10)
        elif mode == "hello":
            s.sendall(HELLO)
            closed, got = wait_closed(s, 10)
        elif mode == "slowloris":
            for i, b in enumerate(HELLO * 1000):
                if i >= 20 / 0.5:
                    break
                s.send(bytes([b]))
                closed, got = wait_closed(s, 0.5)
                if closed:
                    break
    except OSError:
        closed = True
    report(mode=mode, closed=closed, reply=got)
    s.close()
def flooding(n):
    opened = closed = 0
    for _ in range(n):
        try:
            s = conn()
        except OSError:
            continue
        opened += 1
        closed += wait_closed(s, 2)[0]
        s.close()
    report(mode="flood", opened=opened, closed=closed)
socks = [(m, conn()) for m in modes if m]
report(ready=len(socks))
threads = [threading.Thread(target=abuse, args=ms) for ms in socks] + [threading.Thread(target=flooding, args=(flood,))]
for t in threads:
    t.start()
for t in threads:
    t.join()
"#;

/// The abuse script, started in `netns` from `src` against `dst`'s handshake port.
struct Abuser {
    pid: u32,
    log: std::path::PathBuf,
    what: String,
}

fn abuse(c: &Cluster, netns: &str, src: &str, dst: &str, modes: &str, flood: u32, name: &str) -> Abuser {
    let log = format!("abuse-{name}.log");
    let port = AUTH_HANDSHAKE_PORT.to_string();
    let flood = flood.to_string();
    let pid = c.spawn_in(netns, Path::new("/usr/bin/python3"), &["-c", ABUSE, src, dst, &port, modes, &flood], &[], &log).unwrap();
    Abuser { pid, log: c.dir.join(log), what: format!("{name} ({src})") }
}

impl Abuser {
    fn lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    fn line(&self, mode: &str) -> serde_json::Value {
        self.lines()
            .into_iter()
            .find(|l| l["mode"] == mode)
            .unwrap_or_else(|| panic!("{}: no result for {mode}: {}", self.what, std::fs::read_to_string(&self.log).unwrap_or_default()))
    }

    fn ready(&self) -> bool {
        self.lines().iter().any(|l| l.get("ready").is_some())
    }

    fn finish(&self, c: &Cluster) {
        let status = c.wait_child(self.pid, Duration::from_secs(30)).unwrap();
        assert!(status.success(), "{}: {status}: {}", self.what, std::fs::read_to_string(&self.log).unwrap_or_default());
    }
}

#[test]
fn root_handshake_port_abuse_is_closed_and_counted_while_a_legitimate_handshake_completes() {
    let c = cluster()
        .nodes(2)
        .pod("shop/api")
        .label("app", "api")
        .on("node-1")
        .pod("shop/web")
        .label("app", "web")
        .on("node-2")
        .pod("shop/cart")
        .label("app", "cart")
        .on("node-2")
        // No policy selects mallory: a pod on node-2 that probes its node's port.
        .pod("shop/mallory")
        .label("app", "mallory")
        .on("node-2")
        .build()
        .unwrap();
    let id = start(&c);
    let target = c.node("node-2").underlay_ip.to_string();
    // An address on the underlay that is no node's (nodes are .1-.200, the CA .254).
    let stranger = "192.168.100.250";
    run("ip", &["netns", "exec", &c.underlay_ns, "ip", "addr", "add", &format!("{stranger}/24"), "dev", UNDERLAY_BRIDGE]);
    let (api, n1) = numbers(&id, "api", "node-1");
    let (web, n2) = numbers(&id, "web", "node-2");
    std::thread::sleep(Duration::from_millis(500));
    assert!(all_pairs(&c, "node-1").is_empty() && all_pairs(&c, "node-2").is_empty(), "proveAhead is off: nothing proved yet");

    let count = |reason: &str| refused(&id, "node-2", reason, "connection");
    let before: Vec<f64> = ["unknown_address", "tls", "timeout", "malformed"].iter().map(|r| count(r)).collect();

    // From no node's address: the underlay stranger (with a flood) and a pod on node-2.
    let flood = 200;
    let stranger_abuse = abuse(&c, &c.underlay_ns, stranger, &target, "garbage,hello,slowloris", flood, "underlay");
    let mallory = c.pod("shop/mallory");
    let pod_abuse = abuse(&c, &mallory.netns, &mallory.ip.to_string(), &target, "garbage,hello,slowloris", 0, "pod");
    // From node-1's address, not its agent: these get past the address check into TLS.
    let node1_ip = c.node("node-1").underlay_ip.to_string();
    let node_abuse = abuse(&c, &c.node("node-1").netns, &node1_ip, &target, "garbage,hello,slowloris", 0, "node-1");
    let started = Instant::now();
    wait_until("the abusive connections to be open", Duration::from_secs(10), || {
        stranger_abuse.ready() && pod_abuse.ready() && node_abuse.ready()
    })
    .unwrap();

    // Meanwhile: web's first connect to api needs a fresh proof, which
    // node-1 asks of node-2 on the port under abuse (a new connection).
    let probe = bin_path("mg-probe");
    let api_addr = format!("{}:7000", c.pod("shop/api").ip);
    let out = c.exec("shop/web", probe.to_str().unwrap(), &["--timing", "tcp", &api_addr, "first", "--timeout", "5"]).unwrap();
    let legit_done = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "web -> api during the abuse: {}", String::from_utf8_lossy(&out.stderr));
    let ttfb: f64 = String::from_utf8_lossy(&out.stderr)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ttfb_ms=").and_then(|v| v.parse().ok()))
        .expect("mg-probe prints ttfb_ms");
    assert!(all_pairs(&c, "node-1").iter().any(|p| p.local_identity == api && p.remote_identity == web && p.remote_node == n2));
    assert!(all_pairs(&c, "node-2").iter().any(|p| p.local_identity == web && p.remote_identity == api && p.remote_node == n1));

    for a in [&stranger_abuse, &pod_abuse, &node_abuse] {
        a.finish(&c);
    }
    // Every abusive connection was closed by the agent: from no node's
    // address at once, before any TLS; from node-1's address, garbage at
    // once, the truncated ClientHello and the slowloris at the 3 s
    // handshake timeout (which trickling bytes does not extend).
    for a in [&stranger_abuse, &pod_abuse] {
        for m in ["garbage", "hello", "slowloris"] {
            let l = a.line(m);
            assert_eq!(l["closed"], true, "{}: {m} not closed: {l}", a.what);
            assert!(l["at"].as_f64().unwrap() < 2.0, "{}: {m} closed late: {l}", a.what);
        }
    }
    let f = stranger_abuse.line("flood");
    assert_eq!((f["opened"].as_u64(), f["closed"].as_u64()), (Some(flood as u64), Some(flood as u64)), "flood: {f}");
    let g = node_abuse.line("garbage");
    assert_eq!(g["closed"], true, "node-1 address: garbage not closed: {g}");
    assert!(g["at"].as_f64().unwrap() < 2.0, "node-1 address: garbage closed late: {g}");
    let slowest = ["hello", "slowloris"]
        .iter()
        .map(|m| {
            let l = node_abuse.line(m);
            assert_eq!(l["closed"], true, "node-1 address: {m} not closed: {l}");
            let at = l["at"].as_f64().unwrap();
            assert!((2.5..6.0).contains(&at), "node-1 address: {m} closed at {at} s, not at the 3 s handshake timeout: {l}");
            at
        })
        .fold(f64::MAX, f64::min);
    assert!(
        legit_done < slowest,
        "the legitimate handshake ({legit_done:.2} s) finished while the slow connections were open (until {slowest:.2} s)"
    );

    // Counted, by reason, as connection refusals.
    let after: Vec<f64> = ["unknown_address", "tls", "timeout", "malformed"].iter().map(|r| count(r)).collect();
    let delta: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!(
        "node-2 handshake port under abuse: refused unknown_address +{}, tls +{}, timeout +{}, malformed +{}; \
         legitimate first connect web -> api {ttfb} ms (done {legit_done:.2} s into the abuse; slow connections closed at {slowest:.2} s)",
        delta[0], delta[1], delta[2], delta[3]
    );
    let strangers = f64::from(flood) + 6.0;
    assert!(delta[0] >= strangers, "unknown_address refusals: {} for {strangers} connections from no node's address", delta[0]);
    assert!(delta[1] >= 1.0, "the garbage from node-1's address is counted as a TLS failure");
    assert!(delta[2] >= 2.0, "the truncated ClientHello and the slowloris are counted as timeouts");

    // auth-handshake still runs, answers, and proves new pairs.
    let (ca_up, agents) = id.running();
    assert!(ca_up && agents.iter().all(|(_, up)| *up), "identity-ca or an agent stopped: {agents:?}");
    let log = std::fs::read_to_string(c.dir.join("identity/node-2.log")).unwrap();
    assert!(!log.contains("panicked"), "node-2's auth-handshake panicked:\n{log}");
    assert!(tcp(&c, "shop/cart", "shop/api"), "cart -> api (a new pair) after the abuse");
    assert!(id.auth_metric("node-2", "meshguard_auth_handshakes_total{result=\"ok\"").unwrap() >= 2.0);
}
