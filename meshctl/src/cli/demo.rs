//! `meshctl demo`: three nodes, identity-ca, wg-agent and auth-handshake on
//! every node, workloads in two namespaces, a sample MeshPolicy over TCP,
//! UDP, SCTP and ICMP, and a traffic matrix judged against what the policy
//! says and against a capture of the underlay.

use std::io::{BufRead as _, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use meshguard_common::flow::FlowEvent;

use crate::cli::cluster::{progress, start};
use crate::cli::observe::render;
use crate::cli::{CliError, state};
use crate::sim::bins::bin_path;
use crate::sim::capture::{Capture, frames_contain, judge_with};
use crate::sim::cluster::{Cluster, UNDERLAY_BRIDGE, WG_PORT};
use crate::sim::identity::{AUTH_HANDSHAKE_PORT, CA_IP, CA_PORT};
use crate::sim::spec::ClusterSpec;
use meshguard_common::output::Table;

pub const DEMO_SPEC: &str = "\
trustDomain: cluster.local
nodes: [{name: node-1}, {name: node-2}, {name: node-3}]
workloads:
  - {name: web, namespace: shop, serviceAccount: web, node: node-1, labels: {app: web}}
  - {name: probe, namespace: ops, serviceAccount: probe, node: node-1, labels: {app: probe}}
  - {name: api, namespace: shop, serviceAccount: api, node: node-2, labels: {app: api}}
  - {name: db, namespace: shop, serviceAccount: db, node: node-3, labels: {app: db}}
";

/// shop/api takes web on four protocols and lets ops/probe only ping it;
/// shop/db takes only api, and only once auth-handshake has proved the two
/// identities to each other (mutual TLS between the nodes' agents).
/// Unselected pods (web, probe) stay open.
pub const DEMO_POLICY: &str = "\
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: web}]
      ports:
        - {protocol: TCP, port: 7000}
        - {protocol: UDP, port: 7000}
        - {protocol: SCTP, port: 9000}
        - {protocol: ICMP}
    - from: [{namespace: ops, serviceAccount: probe}]
      ports: [{protocol: ICMP}]
---
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: db-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  ingress:
    - from: [{serviceAccount: api}]
      ports: [{protocol: TCP, port: 7000}, {protocol: UDP, port: 7000}]
      authentication: required
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

/// One probe of the matrix and what the policy says of it.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub from: &'static str,
    pub to: &'static str,
    pub proto: Proto,
    pub port: u16,
    pub allowed: bool,
}

pub const MATRIX: &[Probe] = &[
    Probe { from: "shop/web", to: "shop/api", proto: Proto::Tcp, port: 7000, allowed: true },
    Probe { from: "shop/web", to: "shop/api", proto: Proto::Udp, port: 7000, allowed: true },
    Probe { from: "shop/web", to: "shop/api", proto: Proto::Sctp, port: 9000, allowed: true },
    Probe { from: "shop/web", to: "shop/api", proto: Proto::Icmp, port: 0, allowed: true },
    Probe { from: "shop/web", to: "shop/api", proto: Proto::Udp, port: 7001, allowed: false },
    Probe { from: "ops/probe", to: "shop/api", proto: Proto::Icmp, port: 0, allowed: true },
    Probe { from: "ops/probe", to: "shop/api", proto: Proto::Tcp, port: 7000, allowed: false },
    Probe { from: "ops/probe", to: "shop/api", proto: Proto::Sctp, port: 9000, allowed: false },
    Probe { from: "shop/api", to: "shop/db", proto: Proto::Tcp, port: 7000, allowed: true },
    Probe { from: "shop/api", to: "shop/db", proto: Proto::Udp, port: 7000, allowed: true },
    Probe { from: "shop/web", to: "shop/db", proto: Proto::Tcp, port: 7000, allowed: false },
    Probe { from: "ops/probe", to: "shop/web", proto: Proto::Tcp, port: 7000, allowed: true },
];

/// What one probe did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub probe: Probe,
    pub delivered: bool,
    pub answer: Option<Duration>,
    pub same_node: bool,
    pub window: (SystemTime, SystemTime),
    pub marker: Vec<u8>,
    /// WireGuard datagrams on the underlay during the probe, and whether
    /// anything else (plaintext, a pod address, the marker) crossed.
    pub wire: Option<(usize, bool)>,
    /// The destination datapath's event for this probe, from the agents'
    /// streams: the new flow it admitted, or the drop.
    pub event: Option<FlowEvent>,
}

pub fn run(dir: &Path, keep: bool) -> Result<ExitCode, CliError> {
    let started = Instant::now();
    let lock = state::lock(dir)?;
    if let Some(saved) = state::saved(&lock.dir)? {
        return Err(CliError::State(format!("a cluster ({}) is already up in {}; `meshctl down` first", saved.run_id, lock.dir.display())));
    }
    println!("meshguard demo: 3 nodes, identity-ca, wg-agent + auth-handshake on every node, policy over TCP, UDP, SCTP and ICMP");
    let spec = ClusterSpec::from_yaml(DEMO_SPEC).map_err(|e| CliError::Failed(format!("built-in demo spec: {e}")))?;
    let (c, identity) = start(&lock.dir, &spec, Some(DEMO_POLICY))?;
    println!("\ncluster {} up in {:.1}s", c.run_id, started.elapsed().as_secs_f64());
    for n in &c.nodes {
        let pods: Vec<String> = c.pods.iter().filter(|p| p.node == n.name).map(|p| format!("{} {}", p.key(), p.ip)).collect();
        println!("  {:<7} underlay {:<15} pods {}", n.name, n.underlay_ip.to_string(), pods.join(", "));
    }

    progress("starting echo servers (TCP/UDP 7000-7001, SCTP 9000) in the destination pods");
    for pod in ["shop/api", "shop/db", "shop/web"] {
        c.start_echo(pod, 7000)?;
        c.start_echo(pod, 7001)?;
        c.spawn_in_pod(pod, &bin_path("mg-probe"), &["sctp-serve", "--port", "9000"])?;
    }
    progress("running the traffic matrix while capturing the underlay and following every node's event stream");
    let events = follow_events(&c)?;
    let cap = Capture::start(&c.underlay_ns, UNDERLAY_BRIDGE, &c.dir.join("demo.pcap"))?;
    let mut outcomes = Vec::new();
    for p in MATRIX {
        outcomes.push(probe(&c, *p)?);
    }
    let frames = cap.stop_timed()?;
    judge_wire(&mut outcomes, &frames, &control_plane(&c));
    match_events(&c, &mut outcomes, &events);

    let table = matrix_table(&outcomes);
    println!("\n{table}");
    let wrong: Vec<String> = outcomes.iter().filter(|o| !o.matches()).map(Outcome::describe).collect();
    let leaked = outcomes.iter().any(|o| o.wire.is_some_and(|(_, clean)| !clean));
    let all_frames: Vec<Vec<u8>> = frames.into_iter().map(|(_, f)| f).collect();
    let markers: Vec<&[u8]> = outcomes.iter().map(|o| o.marker.as_slice()).collect();
    let whole = judge_with(&all_frames, WG_PORT, &markers, &control_plane(&c));
    println!(
        "underlay: {} frames — {} WireGuard between nodes, {} control-plane TLS (identity-ca, auth-handshake), {} ARP, {} link control, {} violations",
        whole.frames,
        whole.wireguard,
        whole.control_plane,
        whole.arp,
        whole.link_control,
        whole.violations.len()
    );

    let id = c.identity_from(identity.clone());
    let status = crate::cli::status::collect(&c, Some(&id), &lock.dir);
    let entries: Vec<String> = status
        .nodes
        .iter()
        .flat_map(|n| {
            n.auth_entries.iter().map(move |a| {
                format!(
                    "  on {}: {} with {} on {} (expires in {}s)",
                    n.name, a.local_identity, a.remote_identity, a.remote_node, a.expires_in_seconds
                )
            })
        })
        .collect();
    println!("\nauth entries auth-handshake proved ahead of the first packet (mutual TLS between the nodes' agents):");
    if entries.is_empty() {
        println!("  (none)");
    }
    for e in &entries {
        println!("{e}");
    }
    drop(id);

    let drops: Vec<&FlowEvent> = outcomes.iter().filter_map(|o| o.event.as_ref()).filter(|e| e.verdict == "dropped").collect();
    if !drops.is_empty() {
        println!("\ndrop events, as `meshctl observe` shows them:");
        for e in drops {
            println!("  {}", render(e));
        }
    }

    let result = if !wrong.is_empty() || leaked || !whole.violations.is_empty() {
        let mut why = wrong;
        why.extend(whole.violations.iter().take(10).cloned());
        Err(CliError::Mismatch(format!("the demo saw what the policy does not say:\n  {}", why.join("\n  "))))
    } else {
        println!("every probe did what the policy says, and nothing crossed the underlay outside WireGuard");
        Ok(ExitCode::SUCCESS)
    };
    if keep {
        let saved = c.detach(Some(identity), &state::state_file(&lock.dir))?;
        println!("\ncluster {} kept (--keep): try `meshctl status`, `meshctl observe`; `meshctl down` removes it", saved.run_id);
    } else {
        progress("removing the cluster");
        c.remove();
    }
    println!("demo finished in {:.1}s", started.elapsed().as_secs_f64());
    result
}

/// Control-plane TLS that crosses the underlay by design: nodes to
/// identity-ca, and auth-handshake's node-to-node mutual TLS.
fn control_plane(c: &Cluster) -> Vec<std::net::SocketAddr> {
    let mut addrs = vec![std::net::SocketAddr::new(CA_IP.into(), CA_PORT)];
    addrs.extend(c.nodes.iter().map(|n| std::net::SocketAddr::new(n.underlay_ip.into(), AUTH_HANDSHAKE_PORT)));
    addrs
}

/// Runs one probe from its source pod; the payload carries a fresh marker.
fn probe(c: &Cluster, p: Probe) -> Result<Outcome, CliError> {
    let to = c.pod(p.to);
    let marker_bytes: [u8; 8] = rand::random();
    let marker_hex = hex::encode(marker_bytes);
    let message = format!("meshguard-demo-{marker_hex}");
    let addr = format!("{}:{}", to.ip, p.port);
    let probe_bin = bin_path("mg-probe");
    let probe_bin = probe_bin.to_string_lossy();
    let ip = to.ip.to_string();
    let (program, args): (&str, Vec<&str>) = match p.proto {
        Proto::Tcp => (&probe_bin, vec!["--timing", "tcp", &addr, &message, "--timeout", "2"]),
        Proto::Udp => (&probe_bin, vec!["--timing", "udp", &addr, &message, "--tries", "2"]),
        Proto::Sctp => (&probe_bin, vec!["--timing", "sctp", &addr, &message, "--tries", "2"]),
        Proto::Icmp => ("ping", vec!["-c", "1", "-W", "2", "-p", &marker_hex, &ip]),
    };
    let begin = SystemTime::now();
    let out = c.exec(p.from, program, &args)?;
    let end = SystemTime::now();
    let delivered = out.status.success();
    let answer = if !delivered {
        None
    } else if p.proto == Proto::Icmp {
        parse_after(&String::from_utf8_lossy(&out.stdout), "time=")
    } else {
        parse_after(&String::from_utf8_lossy(&out.stderr), "ttfb_ms=")
    };
    let marker = if p.proto == Proto::Icmp { marker_bytes.to_vec() } else { message.into_bytes() };
    let same_node = c.pod(p.from).node == to.node;
    Ok(Outcome { probe: p, delivered, answer, same_node, window: (begin, end), marker, wire: None, event: None })
}

/// `time=0.123 ms` (ping) or `ttfb_ms=0.123` (mg-probe) → a duration.
fn parse_after(text: &str, key: &str) -> Option<Duration> {
    let at = text.find(key)? + key.len();
    let num: String = text[at..].chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    num.parse::<f64>().ok().map(|ms| Duration::from_secs_f64(ms / 1000.0))
}

/// Judges the frames of each cross-node probe's time window: WireGuard
/// between the two nodes, and nothing else of the probe's.
fn judge_wire(outcomes: &mut [Outcome], frames: &[(SystemTime, Vec<u8>)], control: &[std::net::SocketAddr]) {
    let all: Vec<Vec<u8>> = frames.iter().map(|(_, f)| f.clone()).collect();
    for o in outcomes.iter_mut().filter(|o| !o.same_node) {
        let (begin, end) = o.window;
        let window: Vec<Vec<u8>> = frames.iter().filter(|(t, _)| *t >= begin && *t <= end).map(|(_, f)| f.clone()).collect();
        let in_window = judge_with(&window, WG_PORT, &[], control);
        // The marker is searched in the whole capture: it must never appear.
        let marker_seen = frames_contain(&all, &o.marker);
        o.wire = Some((in_window.wireguard, in_window.violations.is_empty() && !marker_seen));
    }
}

/// Collects every node's datapath events from now on (`meshctl observe`'s source).
fn follow_events(c: &Cluster) -> Result<Arc<Mutex<Vec<FlowEvent>>>, CliError> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    for n in &c.nodes {
        let path = c.events_socket(&n.name);
        let stream =
            UnixStream::connect(&path).map_err(|e| CliError::Failed(format!("{}'s event stream {}: {e}", n.name, path.display())))?;
        let seen = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Ok(e) = serde_json::from_str::<FlowEvent>(&line) {
                    seen.lock().expect("events lock").push(e);
                }
            }
        });
    }
    Ok(seen)
}

/// Finds each probe's event at its destination: the new flow admitted, or
/// the drop (waiting up to 2 s for stragglers).
fn match_events(c: &Cluster, outcomes: &mut [Outcome], events: &Mutex<Vec<FlowEvent>>) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let seen = events.lock().expect("events lock").clone();
        for o in outcomes.iter_mut().filter(|o| o.event.is_none()) {
            let (from, to) = (std::net::IpAddr::V4(c.pod(o.probe.from).ip), std::net::IpAddr::V4(c.pod(o.probe.to).ip));
            let proto = format!("{:?}", o.probe.proto).to_uppercase();
            let verdict = if o.delivered { "forwarded" } else { "dropped" };
            o.event = seen
                .iter()
                .find(|e| {
                    e.verdict == verdict
                        && e.direction == "ingress"
                        && e.src_ip == Some(from)
                        && e.dst_ip == Some(to)
                        && e.protocol == proto
                        && (o.probe.proto == Proto::Icmp || e.dst_port == o.probe.port)
                })
                .cloned();
        }
        if outcomes.iter().all(|o| o.event.is_some()) || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn matrix_table(outcomes: &[Outcome]) -> Table {
    let mut t =
        Table::new(&["SOURCE", "DESTINATION", "PROTOCOL", "PORT", "EXPECTED", "OBSERVED", "ON THE WIRE", "ANSWER", "DATAPATH EVENT"]);
    for o in outcomes {
        let p = &o.probe;
        t.row(vec![
            p.from.to_owned(),
            p.to.to_owned(),
            format!("{:?}", p.proto).to_uppercase(),
            if p.proto == Proto::Icmp { "echo".to_owned() } else { p.port.to_string() },
            verdict(p.allowed).to_owned(),
            format!("{}{}", verdict(o.delivered), if o.matches() { "" } else { "  <-- differs" }),
            match o.wire {
                None => "same node".to_owned(),
                Some((0, true)) => "nothing sent".to_owned(),
                Some((n, true)) => format!("encrypted ({n} WireGuard)"),
                Some((_, false)) => "PLAINTEXT".to_owned(),
            },
            o.answer.map_or_else(|| "-".to_owned(), |d| format!("{:.2} ms", d.as_secs_f64() * 1000.0)),
            match &o.event {
                Some(e) => format!("{} on {} ({})", e.verdict, e.node, e.reason),
                None => "NONE".to_owned(),
            },
        ]);
    }
    t
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

// === impl Outcome ===

impl Outcome {
    /// What the policy says, and encrypted whenever it crossed nodes.
    pub fn matches(&self) -> bool {
        self.delivered == self.probe.allowed
            && self.wire.is_none_or(|(n, clean)| clean && (n > 0 || !self.delivered))
            && self.event.is_some()
    }

    fn describe(&self) -> String {
        let p = &self.probe;
        format!(
            "{} -> {} {:?} {}: expected {}, observed {}{}",
            p.from,
            p.to,
            p.proto,
            p.port,
            verdict(p.allowed),
            verdict(self.delivered),
            match self.wire {
                Some((_, false)) => ", and plaintext crossed the underlay",
                Some((0, _)) if self.delivered => ", but no WireGuard crossed the underlay",
                _ if self.event.is_none() => ", but the destination's datapath reported no event for it",
                _ => "",
            }
        )
    }
}
