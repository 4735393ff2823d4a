//! connect() of a new pair across nodes on the simulated cluster, with
//! `authentication: required` and without it, in the same run: the real
//! agents, identity-ca and auth-handshake, WireGuard between the nodes.
//!
//! K client pods on node-1, each its own service account (so each is a new
//! identity pair towards api), connect once to api (auth required) and
//! once to db (no policy: auth off) on node-2. Two clusters:
//! - proveAhead on (the default): the pairs are proved before any packet;
//! - proveAhead off: every first connect needs a proof, and its SYN is
//!   held by the datapath and replayed when the entry is written.
//!
//! Root only. Run with `./bench/auth-connect.sh` (release binaries).

use std::time::{Duration, Instant};

use meshguard_meshctl::sim::bins::bin_path;
use meshguard_meshctl::sim::cluster::{Cluster, cluster, wait_until};

const CLIENTS: usize = 24;

const POLICY: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: client}}}]
      ports: [{protocol: TCP, port: 7000}]
      authentication: required
"#;

fn build() -> Cluster {
    let mut b = cluster().nodes(2).pod("shop/api").label("app", "api").on("node-2").pod("shop/db").label("app", "db").on("node-2");
    for i in 0..CLIENTS {
        b = b.pod(&format!("shop/c{i}")).service_account(&format!("c{i}")).label("role", "client").on("node-1");
    }
    b.build().expect("cluster")
}

/// (connect ms, connect + echo ms) of one first connect.
fn connect(c: &Cluster, from: &str, ip: &str) -> (f64, f64) {
    let probe = bin_path("mg-probe");
    let out = c.exec(from, probe.to_str().unwrap(), &["--timing", "tcp", &format!("{ip}:7000"), "x", "--timeout", "5"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{from} -> {ip}: {err}");
    let field = |k: &str| -> f64 { err.split_whitespace().find_map(|w| w.strip_prefix(k).and_then(|v| v.parse().ok())).unwrap() };
    (field("connect_ms="), field("ttfb_ms="))
}

struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Stats { p50: at(0.5), p99: at(0.99), max: *v.last().unwrap() }
}

/// (connect ms, connect + echo ms) per first connect.
type Timings = Vec<(f64, f64)>;

/// One cluster: every client's first connect to api (auth) and to db (off),
/// and how long proving ahead took.
fn run(prove_ahead: bool) -> (Timings, Timings, f64) {
    let c = build();
    let id = c.identity().prove_ahead(prove_ahead).start().unwrap();
    id.apply_policy(POLICY).unwrap();
    id.use_registry_for_agents();
    c.start_agents().unwrap();
    c.start_echo("shop/api", 7000).unwrap();
    c.start_echo("shop/db", 7000).unwrap();
    // The data plane is ready when db answers (no policy on it).
    let db = c.pod("shop/db").ip.to_string();
    let api = c.pod("shop/api").ip.to_string();
    wait_until("the data plane", Duration::from_secs(30), || c.probe("shop/c0", &["tcp", &format!("{db}:7000"), "w", "--timeout", "1"]))
        .unwrap();
    let t = Instant::now();
    if prove_ahead {
        wait_until("every pair proved ahead", Duration::from_secs(30), || {
            id.auth_metric("node-2", "meshguard_auth_entries ").unwrap_or(0.0) >= CLIENTS as f64
        })
        .unwrap();
    }
    let proved_in = t.elapsed().as_secs_f64() * 1000.0;
    let mut auth = Vec::new();
    let mut off = Vec::new();
    for i in 0..CLIENTS {
        let pod = format!("shop/c{i}");
        // Alternate the order so neither side always goes first.
        if i % 2 == 0 {
            auth.push(connect(&c, &pod, &api));
            off.push(connect(&c, &pod, &db));
        } else {
            off.push(connect(&c, &pod, &db));
            auth.push(connect(&c, &pod, &api));
        }
    }
    if !prove_ahead {
        let replayed = id.auth_metric("node-2", "meshguard_auth_held_packets_total{result=\"replayed\"}").unwrap_or(0.0);
        assert!(replayed >= CLIENTS as f64, "every first SYN was held and replayed ({replayed})");
    }
    (auth, off, proved_in)
}

fn line(what: &str, v: &[(f64, f64)], base: &Stats) -> Stats {
    let s = stats(v.iter().map(|x| x.0).collect());
    let e = stats(v.iter().map(|x| x.1).collect());
    println!(
        "{what:<44} connect p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms | +echo p50 {:>7.3} ms | p99 vs auth off {:>5.2}x",
        s.p50,
        s.p99,
        s.max,
        e.p50,
        s.p99 / base.p99
    );
    s
}

fn main() {
    meshguard_meshctl::sim::bins::require_root();
    println!("first connect() of a new pair across nodes, {CLIENTS} pairs each (WireGuard between the nodes, eBPF on both pods)");
    let (ahead, off1, proved_in) = run(true);
    let (first, off2, _) = run(false);
    let off: Timings = off1.iter().chain(off2.iter()).copied().collect();
    let base = stats(off.iter().map(|x| x.0).collect());
    line("auth off (no policy)", &off, &base);
    line("auth required, proved ahead", &ahead, &base);
    let s = line("auth required, proved on the first packet", &first, &base);
    println!("proveAhead: all {CLIENTS} pairs proved {proved_in:.0} ms after the data plane was up");
    println!("target p99 < 10 ms (Cilium: about 1 s, a lost SYN); first-packet p99 here {:.3} ms", s.p99);
}
