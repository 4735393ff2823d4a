//! `mesh-demo`: the README's first command. Two nodes, a pod on each, the
//! node agents between them; pod traffic crosses the underlay, a capture
//! shows it only ever did so inside WireGuard. Exits non-zero if not.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Instant;

use meshguard_tests::bins::bin_path;
use meshguard_tests::capture::{Capture, judge};
use meshguard_tests::cluster::{Cluster, UNDERLAY_BRIDGE, WG_PORT, cluster};

const ECHO_PORT: u16 = 7000;

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const STEPS: u32 = 6;

/// Only shop/web may reach shop/api, and only on the echo port.
const POLICY: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: web}]
      ports: [{protocol: TCP, port: 7000}, {protocol: UDP, port: 7000}, {protocol: ICMP}]
"#;

fn step(n: u32, text: &str) {
    println!("\n[{n}/{STEPS}] {text}");
}

fn demo() -> anyhow::Result<()> {
    let started = Instant::now();
    println!("meshguard demo: two nodes, pods on each, node-to-node WireGuard and an identity policy");

    step(1, "building the simulated cluster (network namespaces)");
    let c = cluster()
        .nodes(2)
        .pod("shop/web").label("app", "web").on("node-1")
        .pod("ops/probe").on("node-1")
        .pod("shop/api").label("app", "api").on("node-2")
        .policy(POLICY)
        .build()?;
    for n in &c.nodes {
        println!("  {}  netns {}  underlay {}  pods {}", n.name, n.netns, n.underlay_ip, n.pod_cidr);
    }
    for p in &c.pods {
        println!("  pod {:<9} on {}  ip {}", p.key(), p.node, p.ip);
    }

    step(2, "starting wg-agent on every node and waiting for the handshakes");
    c.start_agents()?;
    for n in &c.nodes {
        println!("  {} public key {}", n.name, c.node_public_key(&n.name)?);
    }
    c.start_echo("shop/api", ECHO_PORT)?;

    let marker = format!("MGDEMO-{:016x}", rand::random::<u64>());
    step(3, &format!("capturing the underlay while shop/web talks to shop/api (payloads carry {marker})"));
    let cap = Capture::start(&c.underlay_ns, UNDERLAY_BRIDGE, &c.dir.join("demo.pcap"))?;
    let api = format!("{}:{ECHO_PORT}", c.pod("shop/api").ip);
    run_in_pod(&c, "TCP ", "shop/web", bin_path("mg-probe").to_str().unwrap_or_default(), &["tcp", &api, &format!("{marker} over TCP")])?;
    run_in_pod(&c, "UDP ", "shop/web", bin_path("mg-probe").to_str().unwrap_or_default(), &["udp", &api, &format!("{marker} over UDP")])?;
    let api_ip = c.pod("shop/api").ip.to_string();
    run_in_pod(&c, "ICMP", "shop/web", "ping", &["-c", "3", "-i", "0.2", "-W", "2", "-p", "4d474d41524b", &api_ip])?;
    let frames = cap.stop()?;

    step(4, "the tunnel as `wg show` sees it on node-1");
    let dev = c.wg("node-1")?;
    for p in &dev.peers {
        println!(
            "  peer {}  endpoint {}  allowed ips {}  latest handshake {}s ago  transfer {} B received, {} B sent",
            meshguard_common::key::PublicKey::from_hex(&p.public_key_hex).map(|k| k.to_base64()).unwrap_or_default(),
            p.endpoint.as_deref().unwrap_or("-"),
            p.allowed_ips.join(", "),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().saturating_sub(p.last_handshake_sec))
                .unwrap_or(0),
            p.rx_bytes,
            p.tx_bytes,
        );
    }

    step(5, "what the underlay carried");
    let r = judge(&frames, WG_PORT, &[marker.as_bytes()]);
    println!(
        "  {} frames: {} WireGuard datagrams between node endpoints, {} ARP, {} link control",
        r.frames, r.wireguard, r.arp, r.link_control
    );
    if !r.violations.is_empty() {
        anyhow::bail!("plaintext on the underlay:\n  {}", r.violations.join("\n  "));
    }
    if r.wireguard == 0 {
        anyhow::bail!("no WireGuard traffic was captured");
    }
    println!("  no pod address, no plaintext, and the marker never appeared on the wire");

    step(6, "policy api-ingress: only spiffe://cluster.local/ns/shop/sa/web may reach shop/api");
    let out = c.exec("ops/probe", bin_path("mg-probe").to_str().unwrap_or_default(), &["tcp", &api, "let me in", "--timeout", "2"])?;
    if out.status.success() {
        anyhow::bail!("ops/probe reached shop/api although the policy does not allow it");
    }
    println!("  TCP  ops/probe -> shop/api refused by the datapath on node-2");
    let probe_ip = c.pod("ops/probe").ip.to_string();
    let mut event = None;
    for _ in 0..50 {
        event = c
            .agent_log("node-2")
            .lines()
            .find(|l| l.contains("datapath event") && l.contains(&probe_ip))
            .map(str::to_owned);
        if event.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let event = event.ok_or_else(|| anyhow::anyhow!("no drop event for ops/probe in node-2's log"))?;
    let fields: Vec<&str> = event
        .split_whitespace()
        .filter(|f| ["event=", "src_identity=", "dst_identity=", "rule="].iter().any(|k| f.starts_with(k)))
        .collect();
    println!("  drop event: {}", fields.join("  "));
    println!("\ndemo passed in {:.1}s; the cluster is being removed", started.elapsed().as_secs_f64());
    Ok(())
}

fn run_in_pod(c: &Cluster, label: &str, pod: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = c.exec(pod, program, args)?;
    if !out.status.success() {
        anyhow::bail!("{label} from {pod} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    println!("  {label} {pod} -> shop/api ok");
    Ok(())
}
