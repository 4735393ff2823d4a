//! The eBPF identity policy on the simulated cluster (root only): every
//! protocol allowed and denied on the same node and across nodes, drop
//! events with both identities, live policy changes, and enforcement that
//! outlives the node agent.

use std::time::{Duration, Instant};

use meshguard_meshctl::sim::bins::bin_path;
use meshguard_meshctl::sim::cluster::{Cluster, cluster, wait_until};

const ECHO: u16 = 7000;
const STREAM: u16 = 7100;
const SCTP: u16 = 9000;

const POLICIES: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: web}]
      ports:
        - {protocol: TCP, port: 7000}
        - {protocol: TCP, port: 7100}
        - {protocol: UDP, port: 7000}
        - {protocol: SCTP, port: 9000, endPort: 9010}
        - {protocol: ICMP}
---
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: cache-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: cache}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{protocol: TCP, port: 7000}, {protocol: TCP, port: 7100}, {protocol: ICMP}]
---
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: web-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  ingress:
    - from: [{serviceAccount: cache}]
"#;

fn build() -> Cluster {
    build_with("auto")
}

/// `attach`: the agents' `datapath.attachMode`.
fn build_with(attach: &'static str) -> Cluster {
    let c = cluster()
        .nodes(2)
        .pod("shop/web")
        .label("app", "web")
        .on("node-1")
        .pod("shop/cache")
        .label("app", "cache")
        .on("node-1")
        .pod("shop/api")
        .label("app", "api")
        .on("node-2")
        .pod("ops/probe")
        .on("node-2")
        .policy(POLICIES)
        .build()
        .unwrap();
    c.set_attach_mode(attach);
    c.start_agents().unwrap();
    let probe = bin_path("mg-probe");
    for p in ["shop/web", "shop/cache", "shop/api", "ops/probe"] {
        c.start_echo(p, ECHO).unwrap();
        c.spawn_in_pod(p, &probe, &["sctp-serve", "--port", &SCTP.to_string()]).unwrap();
        c.spawn_in_pod(p, &probe, &["stream-serve", "--port", &STREAM.to_string()]).unwrap();
    }
    c
}

fn tcp(c: &Cluster, from: &str, to: &str) -> bool {
    c.probe(from, &["tcp", &format!("{}:{ECHO}", c.pod(to).ip), "hello", "--timeout", "2"])
}

fn udp(c: &Cluster, from: &str, to: &str) -> bool {
    c.probe(from, &["udp", &format!("{}:{ECHO}", c.pod(to).ip), "hello", "--tries", "2"])
}

fn sctp(c: &Cluster, from: &str, to: &str) -> bool {
    c.probe(from, &["sctp", &format!("{}:{SCTP}", c.pod(to).ip), "hello", "--tries", "2"])
}

fn icmp(c: &Cluster, from: &str, to: &str) -> bool {
    c.exec(from, "ping", &["-c", "1", "-W", "1", &c.pod(to).ip.to_string()]).is_ok_and(|o| o.status.success())
}

/// (tcp, udp, sctp, icmp) from `from` to `to`.
fn all(c: &Cluster, from: &str, to: &str) -> [bool; 4] {
    [tcp(c, from, to), udp(c, from, to), sctp(c, from, to), icmp(c, from, to)]
}

#[test]
fn root_policy_allows_and_denies_every_protocol_on_the_same_node_and_across_nodes() {
    let c = build();
    // Across nodes, allowed by api-ingress: every protocol, replies included.
    assert_eq!(all(&c, "shop/web", "shop/api"), [true; 4], "web -> api (tcp, udp, sctp, icmp)");
    // Same node, not allowed: api is default-deny for ingress.
    assert_eq!(all(&c, "ops/probe", "shop/api"), [false; 4], "probe -> api");
    // Across nodes, not allowed.
    assert_eq!(all(&c, "shop/cache", "shop/api"), [false; 4], "cache -> api");
    // Same node, partly allowed by cache-ingress: TCP and ICMP only.
    assert_eq!(all(&c, "shop/web", "shop/cache"), [true, false, false, true], "web -> cache");
    // Unselected pods stay open, and the answers to an allowed flow pass
    // into web even though web is isolated for ingress.
    assert_eq!(all(&c, "shop/api", "ops/probe"), [true; 4], "api -> probe");
    assert_eq!(all(&c, "shop/cache", "shop/web"), [true; 4], "cache -> web (allowed by web-ingress)");
    assert_eq!(all(&c, "ops/probe", "shop/web"), [false; 4], "probe -> web (web isolated)");

    // Denied flows are reported with both identities and the 5-tuple.
    let probe_ip = c.pod("ops/probe").ip.to_string();
    wait_until("a drop event naming both identities", Duration::from_secs(5), || {
        c.agent_log("node-2").lines().any(|l| {
            l.contains("datapath event")
                && l.contains("src_identity=spiffe://cluster.local/ns/ops/sa/probe")
                && l.contains("dst_identity=spiffe://cluster.local/ns/shop/sa/api")
                && l.contains(&probe_ip)
        })
    })
    .unwrap();
    let series = "meshguard_datapath_packets_total{direction=\"ingress\",verdict=\"drop\",reason=\"policy_default\"}";
    wait_until("default-deny drops to be counted", Duration::from_secs(5), || c.metric("node-2", series).is_ok_and(|n| n > 0.0)).unwrap();
}

#[test]
fn root_policy_change_takes_effect_on_live_traffic_within_a_second() {
    let c = build();
    // A live ICMP flow web -> api, one echo every 50 ms, with timestamps.
    let (pid, log) = c
        .background_in_pod(
            "shop/web",
            std::path::Path::new("ping"),
            &["-D", "-i", "0.05", "-W", "1", &c.pod("shop/api").ip.to_string()],
            "ping.log",
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));

    // Remove ICMP from api's allowed ports: the running flow must stop.
    let without_icmp = POLICIES.replace("        - {protocol: ICMP}\n---", "---");
    assert_ne!(without_icmp, POLICIES);
    let mut c = c;
    let cut_at = unix_now();
    c.set_policies(&without_icmp).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // And put it back: the flow must resume.
    let restored_at = unix_now();
    c.set_policies(POLICIES).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let _ = meshguard_meshctl::sim::cmd::run("kill", &["-INT", &pid.to_string()]);
    let _ = c.wait_child(pid, Duration::from_secs(5));

    let replies: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[').and_then(|r| r.split(']').next()).and_then(|t| t.parse().ok()))
        .collect();
    assert!(replies.iter().any(|t| *t < cut_at), "the flow ran before the change");
    let last_before = replies.iter().copied().filter(|t| *t < restored_at).fold(0.0, f64::max);
    assert!(last_before - cut_at < 1.0, "the removed permission cut the live flow {:.3}s after the change", last_before - cut_at);
    let first_after = replies.iter().copied().filter(|t| *t >= restored_at).fold(f64::MAX, f64::min);
    assert!(
        first_after - restored_at < 1.0,
        "the restored permission let the flow resume within a second ({:.3}s)",
        first_after - restored_at
    );
}

#[test]
fn root_a_policy_change_does_not_cut_flows_that_stay_allowed() {
    let mut c = build();
    let (pid, log) = c
        .background_in_pod(
            "shop/web",
            &bin_path("mg-probe"),
            &["stream", &format!("{}:{STREAM}", c.pod("shop/api").ip), "--seconds", "6"],
            "stream.log",
        )
        .unwrap();
    let api = c.pod("shop/api").ip.to_string();
    let ping = |c: &Cluster| c.exec("shop/web", "ping", &["-c", "1", "-W", "1", &api]).is_ok_and(|o| o.status.success());
    std::thread::sleep(Duration::from_secs(1));
    assert!(ping(&c), "ICMP web -> api is allowed before the change");
    // An edit that removes ICMP bumps the policy revision; the TCP stream
    // is still allowed and must not notice.
    c.set_policies(&POLICIES.replace("        - {protocol: ICMP}\n---", "---")).unwrap();
    // The replacement really changed the datapath: ICMP is refused now
    // (else this test would pass with a change that did nothing).
    let deadline = Instant::now() + Duration::from_secs(3);
    while ping(&c) {
        assert!(Instant::now() < deadline, "ICMP still passes 3 s after it was removed: the policy change did nothing");
    }
    let status = c.wait_child(pid, Duration::from_secs(30)).unwrap();
    let out = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "stream broke across a policy change: {out}");
}

#[test]
fn root_enforcement_and_flows_survive_an_agent_restart() {
    let c = build();
    let probe_bin = bin_path("mg-probe");
    let stream = |from: &str, to: &str, log: &str| {
        c.background_in_pod(from, &probe_bin, &["stream", &format!("{}:{STREAM}", c.pod(to).ip), "--seconds", "10"], log).unwrap()
    };
    let same_node = stream("shop/web", "shop/cache", "same-node.log");
    let cross_node = stream("shop/web", "shop/api", "cross-node.log");
    std::thread::sleep(Duration::from_secs(2));

    // node-1's agent crashes, and comes back.
    c.stop_agent("node-1", false).unwrap();
    let down = Instant::now();
    let mut denied_checks = 0;
    while down.elapsed() < Duration::from_secs(2) {
        // A denied pair stays denied while nobody is home (pinned programs enforce).
        assert!(!tcp(&c, "ops/probe", "shop/web"), "probe -> web passed while the agent was down");
        denied_checks += 1;
    }
    c.start_agent("node-1").unwrap();
    assert!(c.agent_log("node-1").contains("adopted=true"), "the restarted agent adopts the pinned datapath");
    assert!(!tcp(&c, "ops/probe", "shop/web"), "probe -> web passed after the restart");
    assert!(!udp(&c, "ops/probe", "shop/web"), "probe -> web (UDP) passed after the restart");
    assert!(denied_checks > 0);

    for (name, (pid, log)) in [("same-node", same_node), ("cross-node", cross_node)] {
        let status = c.wait_child(pid, Duration::from_secs(60)).unwrap();
        let out = std::fs::read_to_string(&log).unwrap();
        assert!(status.success(), "{name} stream did not survive the restart: {out}");
        if name == "same-node" {
            let gap: u64 = out
                .split("\"max_gap_ms\": ")
                .nth(1)
                .and_then(|r| r.split(|ch: char| !ch.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(u64::MAX);
            assert!(gap < 500, "the same-node stream stalled for {gap} ms during the restart");
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn root_a_pod_cannot_send_with_another_address_or_mac() {
    let c = build();
    let web = c.pod("shop/web").netns.clone();
    let api_ip = c.pod("shop/api").ip.to_string();
    let cache_ip = c.pod("shop/cache").ip.to_string();
    assert!(icmp(&c, "shop/web", "shop/api"), "web -> api works with its own address");

    // web claims cache's address (same node) and an unassigned one.
    for spoofed in [cache_ip.as_str(), "10.244.1.99"] {
        meshguard_meshctl::sim::cmd::ip_in(&web, &["addr", "add", &format!("{spoofed}/32"), "dev", "eth0"]).unwrap();
        let out = c.exec("shop/web", "ping", &["-c", "1", "-W", "1", "-I", spoofed, &api_ip]).unwrap();
        assert!(!out.status.success(), "web sent as {spoofed}");
        meshguard_meshctl::sim::cmd::ip_in(&web, &["addr", "del", &format!("{spoofed}/32"), "dev", "eth0"]).unwrap();
    }
    let counted = |reason: &str, at_least: f64| {
        let series = format!("meshguard_datapath_packets_total{{direction=\"egress\",verdict=\"drop\",reason=\"{reason}\"}}");
        wait_until(&format!("{reason} >= {at_least}"), Duration::from_secs(5), || c.metric("node-1", &series).is_ok_and(|n| n >= at_least))
    };
    counted("spoofed_ip", 2.0).expect("spoofed source addresses are dropped and counted");

    // web changes its MAC: nothing it sends passes any more.
    meshguard_meshctl::sim::cmd::ip_in(&web, &["link", "set", "eth0", "address", "02:00:00:00:be:ef"]).unwrap();
    assert!(!icmp(&c, "shop/web", "shop/api"), "web sent with a foreign MAC");
    counted("spoofed_mac", 1.0).expect("a spoofed MAC is dropped and counted");
}

/// Issue 14: kernels before 6.6 have no TCX; the agent then attaches the
/// same programs as TC clsact filters. Forced here: the filters sit on the
/// pods' interfaces and the tunnel, the policy is the same, and it holds
/// while the agent is down.
#[test]
fn root_the_tc_clsact_fallback_enforces_the_same_policy() {
    let c = build_with("tc");
    let ours = |node: &str, dev: &str, hook: &str| {
        let out = c.exec_node(node, "tc", &["filter", "show", "dev", dev, hook]).unwrap();
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("handle 0x6d67")).count()
    };
    let web_if = c.pod("shop/web").host_if.clone();
    assert_eq!((ours("node-1", &web_if, "ingress"), ours("node-1", &web_if, "egress")), (1, 1), "web's interface");
    assert_eq!(ours("node-1", meshguard_meshctl::sim::cluster::TUNNEL_IF, "egress"), 1, "the tunnel");
    assert!(
        c.agent_log("node-1").contains("attach=\"tc\"") || c.agent_log("node-1").contains("attach=tc"),
        "the agent says how it attached"
    );

    assert_eq!(all(&c, "shop/web", "shop/api"), [true; 4], "web -> api");
    assert_eq!(all(&c, "shop/cache", "shop/api"), [false; 4], "cache -> api");
    assert_eq!(all(&c, "shop/web", "shop/cache"), [true, false, false, true], "web -> cache");

    // The agent goes: same-node traffic is still judged by the filters.
    c.stop_agent("node-2", false).unwrap();
    assert!(!tcp(&c, "ops/probe", "shop/api"), "probe -> api passed while the agent was down");
    assert!(tcp(&c, "shop/api", "ops/probe"), "api -> probe (allowed) while the agent was down");
    c.start_agent("node-2").unwrap();
    assert!(!tcp(&c, "ops/probe", "shop/api"), "probe -> api after the restart");
    assert_eq!(ours("node-2", &c.pod("shop/api").host_if, "ingress"), 1, "replaced in place, not stacked");
}
