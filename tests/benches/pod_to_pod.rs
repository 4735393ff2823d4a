//! Pod to pod across nodes: what meshguard costs end to end. The same two
//! pods on the simulated cluster, in the same run:
//! - encryption off: no agent, the nodes route each other's pod CIDR over
//!   the underlay in plaintext (what a plain CNI does);
//! - meshguard: the managed agents (strict mode, the eBPF policy attached
//!   to both pods, a MeshPolicy admitting the client), WireGuard between
//!   the nodes.
//!
//! iperf3 one stream each way and four streams, ping RTT idle and under
//! load, and for meshguard the agents' own CPU seconds per GB moved.
//! Root only. Run from `./bench/dataplane.sh` (release binaries), or alone:
//! `MESHGUARD_BIN_DIR=target/release cargo bench -p meshguard-tests --bench pod_to_pod`.

use std::path::Path;
use std::time::Duration;

use meshguard_meshctl::sim::cluster::{Cluster, cluster, wait_until};
use meshguard_meshctl::sim::cmd::ip_in;

const POLICY: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: server-ingress, namespace: bench}
spec:
  selector: {matchLabels: {app: server}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{protocol: TCP, port: 5201}, {protocol: ICMP}]
"#;

fn build() -> Cluster {
    cluster()
        .nodes(2)
        .pod("bench/client")
        .label("app", "client")
        .on("node-1")
        .pod("bench/server")
        .label("app", "server")
        .on("node-2")
        .policy(POLICY)
        .build()
        .expect("cluster")
}

/// The pids of processes whose command line mentions `needle` (an agent's
/// config path names its node).
fn pids_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if std::fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle)) {
            out.push(pid);
        }
    }
    out
}

/// utime + stime of `pids`, in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    let tck: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|s| {
            // Fields after the command name, which ends at the last ')'.
            let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split_whitespace().collect();
            (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / tck
        })
        .sum()
}

struct Run {
    gbps: f64,
    cpu_per_gb: Option<f64>,
}

fn iperf(c: &Cluster, secs: u64, extra: &[&str], agents: &[u32]) -> Run {
    let server = c.pod("bench/server").ip.to_string();
    let cpu0 = cpu_seconds(agents);
    let mut args = vec!["-c", &server, "-p", "5201", "-J"];
    let t = secs.to_string();
    args.extend(["-t", &t]);
    args.extend(extra);
    let out = c.exec("bench/client", "iperf3", &args).unwrap();
    let cpu = cpu_seconds(agents) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "iperf3 {extra:?}: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sum = &v["end"]["sum_received"];
    let bytes = sum["bytes"].as_f64().unwrap();
    Run { gbps: sum["bits_per_second"].as_f64().unwrap() / 1e9, cpu_per_gb: (!agents.is_empty()).then(|| cpu / (bytes / 1e9)) }
}

fn ping_avg_ms(c: &Cluster, count: u32) -> f64 {
    let server = c.pod("bench/server").ip.to_string();
    let out = c.exec("bench/client", "ping", &["-q", "-c", &count.to_string(), "-i", "0.2", &server]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping {server}: {text}");
    // rtt min/avg/max/mdev = a/b/c/d ms
    text.lines().last().and_then(|l| l.split('=').nth(1)).and_then(|v| v.trim().split('/').nth(1)).unwrap().parse().unwrap()
}

/// 1 stream, reverse, 4 streams, RTT idle, RTT under one stream.
fn measure(c: &Cluster, secs: u64, agents: &[u32]) -> ([Run; 3], f64, f64) {
    c.spawn_in_pod("bench/server", Path::new("iperf3"), &["-s", "-p", "5201"]).unwrap();
    let server = c.pod("bench/server").ip.to_string();
    wait_until("iperf3 to answer", Duration::from_secs(30), || {
        c.exec("bench/client", "iperf3", &["-c", &server, "-p", "5201", "-t", "1"]).is_ok_and(|o| o.status.success())
    })
    .unwrap();
    let idle = ping_avg_ms(c, 10);
    let runs = [iperf(c, secs, &[], agents), iperf(c, secs, &["-R"], agents), iperf(c, secs, &["-P", "4"], agents)];
    let loaded = std::thread::scope(|s| {
        let load = s.spawn(|| iperf(c, secs, &[], &[]));
        std::thread::sleep(Duration::from_secs(1));
        let rtt = ping_avg_ms(c, (secs as u32 * 4).saturating_sub(8).max(4));
        load.join().unwrap();
        rtt
    });
    (runs, idle, loaded)
}

fn main() {
    meshguard_meshctl::sim::bins::require_root();
    let secs: u64 = std::env::var("SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);

    let plain = {
        let c = build();
        // What a plain CNI would do: each node routes the other's pod CIDR to it.
        for (a, b) in [("node-1", "node-2"), ("node-2", "node-1")] {
            let other = c.node(b);
            ip_in(&c.node(a).netns, &["route", "add", &other.pod_cidr, "via", &other.underlay_ip.to_string()]).unwrap();
        }
        measure(&c, secs, &[])
    };
    let mesh = {
        let c = build();
        c.start_agents().unwrap();
        let agents: Vec<u32> = ["node-1", "node-2"]
            .iter()
            .flat_map(|n| pids_with(&c.agent_config_path(n).to_string_lossy()))
            .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "wg-agent"))
            .collect();
        assert_eq!(agents.len(), 2, "two agents running: {agents:?}");
        measure(&c, secs, &agents)
    };

    println!("\npod to pod across nodes ({secs} s per run): encryption off vs meshguard (strict, eBPF policy, WireGuard)");
    println!(
        "{:<16} {:>10} {:>10} {:>10}   {:>9} {:>9} {:>9}   {:>8} {:>8}",
        "Gbit/s", "1 stream", "reverse", "4 streams", "CPU s/GB", "reverse", "4 streams", "RTT idle", "loaded"
    );
    for (name, (runs, idle, loaded)) in [("encryption off", &plain), ("meshguard", &mesh)] {
        let cpu = |r: &Run| r.cpu_per_gb.map_or("-".to_owned(), |v| format!("{v:.2}"));
        println!(
            "{name:<16} {:>10.3} {:>10.3} {:>10.3}   {:>9} {:>9} {:>9}   {:>8.3} {:>8.3}",
            runs[0].gbps,
            runs[1].gbps,
            runs[2].gbps,
            cpu(&runs[0]),
            cpu(&runs[1]),
            cpu(&runs[2]),
            idle,
            loaded
        );
    }
    println!(
        "meshguard / off: {:.2}x {:.2}x {:.2}x",
        mesh.0[0].gbps / plain.0[0].gbps,
        mesh.0[1].gbps / plain.0[1].gbps,
        mesh.0[2].gbps / plain.0[2].gbps
    );
}
