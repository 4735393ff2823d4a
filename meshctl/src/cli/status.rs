//! `meshctl status`: what `cilium status` and `wg show` tell together —
//! components and their health, nodes with their WireGuard peers, pods with
//! their identities, policies, auth entries, drop counters by reason.
//!
//! `--json` prints [`Status`], a documented shape (docs/meshctl.md) that
//! names every namespace and address, so any tool can inspect the cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use meshguard_ebpf::PinLayout;
use meshguard_ebpf::auth::AuthTable;
use serde::{Deserialize, Serialize};

use crate::cli::{CliError, state};
use crate::sim::cluster::{Cluster, NODE_UNDERLAY_IF, TUNNEL_IF};
use crate::sim::identity::Identity;
use meshguard_common::output::{Output, Table};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub run_id: String,
    pub state_dir: PathBuf,
    pub trust_domain: String,
    /// The underlay namespace: the bridge every node is plugged into, and identity-ca.
    pub underlay_netns: String,
    pub components: Vec<Component>,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
    pub policies: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Component {
    pub name: String,
    /// The node it runs on; none for identity-ca (it runs in the underlay).
    pub node: Option<String>,
    pub running: bool,
    pub healthy: bool,
    pub detail: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub underlay_interface: String,
    pub underlay_address: String,
    pub pod_cidr: String,
    pub wireguard: WireGuardStatus,
    pub auth_entries: Vec<AuthEntry>,
    /// Datapath drops by reason (lowercase, without `DROP_`), both directions.
    pub drops: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireGuardStatus {
    pub interface: String,
    pub listen_port: u16,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// Base64, as `wg show` prints it.
    pub public_key: String,
    /// The node this key belongs to, from the registry.
    pub node: Option<String>,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the latest handshake; none before the first.
    pub latest_handshake_seconds_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthEntry {
    pub local_identity: String,
    pub remote_identity: String,
    pub remote_node: String,
    pub expires_in_seconds: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub node: String,
    pub service_account: String,
    pub spiffe_id: String,
    pub labels: BTreeMap<String, String>,
}

/// The registry's names for numbers: identities and nodes.
#[derive(Default)]
struct Names {
    identities: BTreeMap<u64, String>,
    nodes: BTreeMap<u64, String>,
    keys: BTreeMap<String, String>,
}

pub fn run(dir: &Path, output: Output) -> Result<ExitCode, CliError> {
    let c = state::require(dir)?;
    let saved = state::saved(dir)?.and_then(|s| s.identity);
    let id = saved.map(|s| c.identity_from(s));
    let status = collect(&c, id.as_ref(), dir);
    match output {
        Output::Table => print_tables(&status),
        Output::Json => println!("{}", serde_json::to_string_pretty(&status).map_err(|e| CliError::Failed(e.to_string()))?),
        Output::Yaml => print!("{}", meshguard_common::yaml::to_string(&status).map_err(|e| CliError::Failed(e.to_string()))?),
    }
    // Unhealthy components make the exit code say so, for scripts and probes.
    if status.components.iter().all(|c| c.healthy) { Ok(ExitCode::SUCCESS) } else { Ok(ExitCode::from(1)) }
}

pub fn collect(c: &Cluster, id: Option<&Identity<'_>>, state_dir: &Path) -> Status {
    let names = id.map(names).unwrap_or_default();
    let mut components = Vec::new();
    if let Some(id) = id {
        let (ca_running, agents) = id.running();
        let answered = id.admin(&["ca", "list"]);
        components.push(Component {
            name: "identity-ca".into(),
            node: None,
            running: ca_running,
            healthy: ca_running && answered.is_ok(),
            detail: match answered {
                Ok(_) => format!("serving {} (node API), admin socket answers", id.ca_addr),
                Err(e) => format!("admin socket: {e}"),
            },
        });
        for (node, running) in agents {
            let socket = c.workload_api_socket(&node);
            let serving = socket.exists();
            components.push(Component {
                name: "auth-handshake".into(),
                node: Some(node),
                running,
                healthy: running && serving,
                detail: if serving { format!("Workload API on {}", socket.display()) } else { "no Workload API socket".into() },
            });
        }
    }
    let mut nodes = Vec::new();
    for n in &c.nodes {
        let running = c.agent_alive(&n.name);
        let healthz = c.http_get(&n.name, "/healthz");
        let readyz = c.http_get(&n.name, "/readyz");
        components.push(Component {
            name: "wg-agent".into(),
            node: Some(n.name.clone()),
            running,
            healthy: running && healthz.is_ok() && readyz.is_ok(),
            detail: match (&healthz, &readyz) {
                (Ok(_), Ok(_)) => "live and ready (tunnel up, datapath enforcing)".into(),
                (Err(e), _) => format!("/healthz: {}", e.to_string().trim()),
                (_, Err(e)) => format!("not ready: {}", e.to_string().trim()),
            },
        });
        let wireguard = match c.wg(&n.name) {
            Ok(dev) => WireGuardStatus {
                interface: TUNNEL_IF.into(),
                listen_port: dev.listen_port,
                peers: dev
                    .peers
                    .iter()
                    .map(|p| {
                        let key = meshguard_common::key::PublicKey::from_hex(&p.public_key_hex).map(|k| k.to_base64()).unwrap_or_default();
                        PeerStatus {
                            node: names.keys.get(&key).cloned(),
                            public_key: key,
                            endpoint: p.endpoint.clone(),
                            allowed_ips: p.allowed_ips.clone(),
                            latest_handshake_seconds_ago: (p.last_handshake_sec > 0)
                                .then(|| unix_now().saturating_sub(p.last_handshake_sec)),
                            rx_bytes: p.rx_bytes,
                            tx_bytes: p.tx_bytes,
                        }
                    })
                    .collect(),
            },
            Err(_) => WireGuardStatus { interface: TUNNEL_IF.into(), ..Default::default() },
        };
        nodes.push(NodeStatus {
            name: n.name.clone(),
            netns: n.netns.clone(),
            underlay_interface: NODE_UNDERLAY_IF.into(),
            underlay_address: n.underlay_ip.to_string(),
            pod_cidr: n.pod_cidr.clone(),
            wireguard,
            auth_entries: auth_entries(&c.pin_dir(&n.name), &names),
            drops: c.metrics(&n.name).map(|m| drops(&m)).unwrap_or_default(),
        });
    }
    let pods = c
        .pods
        .iter()
        .map(|p| PodStatus {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            netns: p.netns.clone(),
            ip: p.ip.to_string(),
            node: p.node.clone(),
            service_account: p.service_account.clone(),
            spiffe_id: format!("spiffe://{}/ns/{}/sa/{}", c.trust_domain, p.namespace, p.service_account),
            labels: p.labels.clone(),
        })
        .collect();
    let policies = id.and_then(|id| crate::cli::policies::list(id).ok()).unwrap_or_default().iter().map(|p| p.key()).collect();
    Status {
        run_id: c.run_id.clone(),
        state_dir: state_dir.to_owned(),
        trust_domain: c.trust_domain.to_string(),
        underlay_netns: c.underlay_ns.clone(),
        components,
        nodes,
        pods,
        policies,
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Numeric identities, node ids and node keys, from the registry.
fn names(id: &Identity<'_>) -> Names {
    let mut n = Names::default();
    if let Ok(out) = id.admin(&["--json", "identity", "list"])
        && let Ok(list) = serde_json::from_str::<Vec<serde_json::Value>>(&out)
    {
        for i in list {
            if let (Some(num), Some(sid)) = (i["number"].as_u64(), i["spiffeId"].as_str()) {
                n.identities.insert(num, sid.to_owned());
            }
        }
    }
    if let Ok(out) = id.admin(&["--json", "node", "list"])
        && let Ok(list) = serde_json::from_str::<Vec<serde_json::Value>>(&out)
    {
        for node in list {
            let Some(name) = node["name"].as_str() else {
                continue;
            };
            if let Some(num) = node["nodeId"].as_u64() {
                n.nodes.insert(num, name.to_owned());
            }
            if let Some(key) = node["publicKey"].as_str() {
                n.keys.insert(key.to_owned(), name.to_owned());
            }
        }
    }
    n
}

/// The node's pinned auth map, with names for the numbers.
fn auth_entries(pin_dir: &Path, names: &Names) -> Vec<AuthEntry> {
    let Ok(table) = AuthTable::open(&PinLayout::new(pin_dir)) else {
        return Vec::new();
    };
    let name = |m: &BTreeMap<u64, String>, k: u32| m.get(&u64::from(k)).cloned().unwrap_or_else(|| k.to_string());
    table
        .entries()
        .unwrap_or_default()
        .into_iter()
        .map(|(pair, left)| AuthEntry {
            local_identity: name(&names.identities, pair.local_identity),
            remote_identity: name(&names.identities, pair.remote_identity),
            remote_node: name(&names.nodes, pair.remote_node),
            expires_in_seconds: left.as_secs(),
        })
        .collect()
}

/// Drops by reason from the agent's Prometheus text.
pub fn drops(metrics: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with("meshguard_datapath_packets_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (Some("drop"), Some(reason)) = (label(labels, "verdict"), label(labels, "reason")) else {
            continue;
        };
        *out.entry(reason.to_owned()).or_default() += value.parse::<f64>().unwrap_or(0.0) as u64;
    }
    out
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let at = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let rest = &labels[at..];
    Some(&rest[..rest.find('"')?])
}

fn print_tables(s: &Status) {
    println!("cluster {} (trust domain {}, state {})\n", s.run_id, s.trust_domain, s.state_dir.display());
    let mut t = Table::new(&["COMPONENT", "NODE", "RUNNING", "HEALTHY", "DETAIL"]);
    for c in &s.components {
        t.row(vec![c.name.clone(), c.node.clone().unwrap_or_else(|| "-".into()), yes(c.running), yes(c.healthy), c.detail.clone()]);
    }
    println!("{t}");
    let mut t = Table::new(&["NODE", "NETNS", "UNDERLAY", "POD CIDR", "PEER", "ENDPOINT", "HANDSHAKE", "RX", "TX"]);
    for n in &s.nodes {
        let first = [n.name.clone(), n.netns.clone(), format!("{} {}", n.underlay_interface, n.underlay_address), n.pod_cidr.clone()];
        if n.wireguard.peers.is_empty() {
            t.row(first.clone().into_iter().chain(["(no peers)".into(), "-".into(), "-".into(), "-".into(), "-".into()]).collect());
        }
        for (i, p) in n.wireguard.peers.iter().enumerate() {
            let lead = if i == 0 { first.to_vec() } else { vec![String::new(); 4] };
            t.row(
                lead.into_iter()
                    .chain([
                        p.node.clone().unwrap_or_else(|| p.public_key.chars().take(12).collect()),
                        p.endpoint.clone().unwrap_or_else(|| "-".into()),
                        p.latest_handshake_seconds_ago.map_or_else(|| "never".into(), |s| format!("{s}s ago")),
                        bytes(p.rx_bytes),
                        bytes(p.tx_bytes),
                    ])
                    .collect(),
            );
        }
    }
    println!("{t}");
    let mut t = Table::new(&["POD", "NODE", "IP", "SPIFFE ID", "NETNS"]);
    for p in &s.pods {
        t.row(vec![format!("{}/{}", p.namespace, p.name), p.node.clone(), p.ip.clone(), p.spiffe_id.clone(), p.netns.clone()]);
    }
    println!("{t}");
    println!("policies: {}", if s.policies.is_empty() { "(none)".to_owned() } else { s.policies.join(", ") });
    let mut t = Table::new(&["NODE", "LOCAL IDENTITY", "REMOTE IDENTITY", "REMOTE NODE", "EXPIRES IN"]);
    for n in &s.nodes {
        for a in &n.auth_entries {
            t.row(vec![
                n.name.clone(),
                a.local_identity.clone(),
                a.remote_identity.clone(),
                a.remote_node.clone(),
                format!("{}s", a.expires_in_seconds),
            ]);
        }
    }
    if t.is_empty() {
        println!("auth entries: (none)");
    } else {
        println!("\n{t}");
    }
    let mut t = Table::new(&["NODE", "DROP REASON", "PACKETS"]);
    for n in &s.nodes {
        for (reason, count) in &n.drops {
            t.row(vec![n.name.clone(), reason.clone(), count.to_string()]);
        }
    }
    if t.is_empty() {
        println!("drops: (none)");
    } else {
        println!("\n{t}");
    }
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "NO" }.into()
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_summed_by_reason_across_directions() {
        let m = "# HELP x\nmeshguard_datapath_packets_total{direction=\"ingress\",verdict=\"drop\",reason=\"policy_default\"} 3\n\
                 meshguard_datapath_packets_total{direction=\"egress\",verdict=\"drop\",reason=\"policy_default\"} 2\n\
                 meshguard_datapath_packets_total{direction=\"ingress\",verdict=\"forward\",reason=\"policy_allow\"} 9\n\
                 meshguard_datapath_bytes_total{direction=\"ingress\",verdict=\"drop\",reason=\"policy_default\"} 900\n\
                 meshguard_datapath_packets_total{direction=\"ingress\",verdict=\"drop\",reason=\"spoofed_ip\"} 1\n";
        let d = drops(m);
        assert_eq!(d.get("policy_default"), Some(&5));
        assert_eq!(d.get("spoofed_ip"), Some(&1));
        assert_eq!(d.len(), 2);
    }
}
