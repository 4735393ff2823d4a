//! meshctl as a user drives it (root only): the demo's table, a cluster's
//! whole life (`up --spec`, `exec`, `status --json`, `policy`, `observe`,
//! `down`), and bad input to every subcommand.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use meshguard_meshctl::cli::status::Status;
use meshguard_meshctl::sim::bins::{bin_path, require_root};
use meshguard_meshctl::sim::cluster::{Cluster, RUN_ROOT, wait_until};

/// A fresh state directory per test, removed at the end.
struct StateDir(PathBuf);

impl StateDir {
    fn new(name: &str) -> Self {
        require_root();
        let dir = Path::new(RUN_ROOT).join(format!("meshctl-{name}-{}-{:04x}", std::process::id(), rand::random::<u16>()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(bin_path("meshctl")).arg("--state-dir").arg(&self.0).args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Runs and returns stdout, failing the test with everything printed on error.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "meshctl {args:?} failed ({}):\n{}\n{}", out.status, text(&out.stdout), text(&out.stderr));
        text(&out.stdout)
    }

    /// Expects exit `code` and a message containing `want` on stderr.
    fn fails(&self, args: &[&str], code: i32, want: &str) {
        let out = self.run(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "meshctl {args:?}: {err}");
        assert!(err.contains(want), "meshctl {args:?} should say {want:?}, said: {err}");
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        // A failed test still removes its cluster.
        if self.0.join("cluster.json").exists() {
            let _ = self.run(&["down"]);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The table's data rows: cells are separated by runs of 3+ spaces.
fn table_rows(out: &str, header_starts: &str) -> Vec<Vec<String>> {
    let mut lines = out.lines().skip_while(|l| !l.starts_with(header_starts));
    lines.next().expect("table header");
    lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split("   ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect())
        .collect()
}

#[test]
fn root_meshctl_demo_prints_a_matrix_that_matches_the_policy() {
    let state = StateDir::new("demo");
    let out = state.ok(&["demo"]);
    let rows = table_rows(&out, "SOURCE");
    let matrix = meshguard_meshctl::cli::demo::MATRIX;
    assert_eq!(rows.len(), matrix.len(), "one row per probe:\n{out}");
    for (row, probe) in rows.iter().zip(matrix) {
        let [from, to, proto, _port, expected, observed, wire, answer, event] = row.as_slice() else {
            panic!("a row has nine cells: {row:?}\n{out}");
        };
        assert_eq!((from.as_str(), to.as_str()), (probe.from, probe.to));
        assert_eq!(proto, &format!("{:?}", probe.proto).to_uppercase());
        let want = if probe.allowed { "allowed" } else { "denied" };
        assert_eq!((expected.as_str(), observed.as_str()), (want, want), "{row:?}");
        if probe.from == "ops/probe" && probe.to == "shop/web" {
            assert_eq!(wire, "same node");
        } else {
            assert!(wire.starts_with("encrypted (") && !wire.starts_with("encrypted (0"), "{row:?}");
        }
        if probe.allowed {
            assert!(answer.ends_with(" ms"), "an allowed probe has an answer time: {row:?}");
            assert!(event.starts_with("forwarded on node-"), "an allowed probe has the datapath's new-flow event: {row:?}");
            if probe.to == "shop/db" {
                assert!(event.ends_with("(auth_allow)"), "db takes api only once authenticated: {row:?}");
            }
        } else {
            assert_eq!(answer, "-");
            assert!(event.starts_with("dropped on node-"), "a denied probe has the datapath's drop event: {row:?}");
        }
    }
    assert!(out.contains(", 0 violations"), "{out}");
    // auth-handshake proved the pair on both nodes before the first packet.
    assert!(out.contains("on node-2: spiffe://cluster.local/ns/shop/sa/api with spiffe://cluster.local/ns/shop/sa/db on node-3"), "{out}");
    assert!(out.contains("on node-3: spiffe://cluster.local/ns/shop/sa/db with spiffe://cluster.local/ns/shop/sa/api on node-2"), "{out}");
    assert!(
        out.contains("(spiffe://cluster.local/ns/ops/sa/probe) -> 10.244.2.10:7000 (spiffe://cluster.local/ns/shop/sa/api)"),
        "a drop event names both SPIFFE IDs:\n{out}"
    );
    // Removed unless --keep.
    assert!(!state.0.join("cluster.json").exists());
    assert_eq!(
        std::fs::read_dir(&state.0).unwrap().filter_map(Result::ok).filter(|e| e.path().is_dir()).count(),
        0,
        "nothing left in the state dir"
    );
}

const SPEC: &str = "\
trustDomain: cluster.local
nodes: [{name: alpha}, {name: beta}]
workloads:
  - {name: web, namespace: shop, serviceAccount: web, node: alpha, labels: {app: web}}
  - {name: probe, namespace: ops, serviceAccount: probe, node: alpha}
  - {name: api, namespace: shop, serviceAccount: api, node: beta, labels: {app: api}}
";

const ONLY_WEB: &str = "\
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: web}]
      ports: [{protocol: TCP, port: 7000}]
";

#[test]
fn root_meshctl_cluster_lifecycle() {
    let state = StateDir::new("life");
    let spec = state.0.join("spec.yaml");
    std::fs::write(&spec, SPEC).unwrap();
    let spec = spec.to_str().unwrap();

    // Nothing is up yet: every command that needs a cluster says so.
    for args in [&["status"][..], &["exec", "shop/web", "--", "true"], &["down"], &["policy", "get"], &["observe"]] {
        state.fails(args, 3, "no cluster is up");
    }

    state.ok(&["up", "--spec", spec]);
    state.fails(&["up", "--spec", spec], 3, "already up");
    state.fails(&["demo"], 3, "already up");

    // status --json names what the spec asked for, and everything is healthy.
    let st: Status = serde_json::from_str(&state.ok(&["status", "--json"])).unwrap();
    let netns = meshguard_meshctl::sim::cmd::ip(&["netns", "list"]).unwrap();
    assert_eq!(st.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["alpha", "beta"]);
    for n in &st.nodes {
        assert!(netns.contains(&n.netns), "{} is a real namespace", n.netns);
        assert_eq!(n.underlay_interface, "eth0");
        assert!(n.underlay_address.starts_with("192.168.100."));
        assert_eq!(n.wireguard.peers.len(), 1, "{}: one peer", n.name);
        assert!(n.wireguard.peers[0].latest_handshake_seconds_ago.is_some());
    }
    assert!(st.components.iter().all(|c| c.running && c.healthy), "{:#?}", st.components);
    assert_eq!(st.components.len(), 5, "identity-ca, and wg-agent + auth-handshake per node");
    let web = st.pods.iter().find(|p| p.namespace == "shop" && p.name == "web").unwrap();
    assert_eq!((web.node.as_str(), web.spiffe_id.as_str()), ("alpha", "spiffe://cluster.local/ns/shop/sa/web"));
    assert!(netns.contains(&web.netns));
    let api = st.pods.iter().find(|p| p.name == "api").unwrap();
    assert_eq!(api.node, "beta");

    // exec: the pod's namespace and its node's Workload API socket.
    let out = state.ok(&["exec", "shop/web", "--", "ip", "-o", "-4", "addr", "show", "eth0"]);
    assert!(out.contains(&format!("{}/32", web.ip)), "{out}");
    let out = state.ok(&["exec", "shop/web", "--", "sh", "-c", "echo $SPIFFE_ENDPOINT_SOCKET"]);
    assert!(out.trim().starts_with("unix://") && out.contains("alpha") && out.trim().ends_with("workload-api.sock"), "{out}");
    let out = state.run(&["exec", "shop/web", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "exec passes the command's exit code on");
    state.fails(&["exec", "shop/nope", "--", "true"], 2, "no pod \"shop/nope\"");

    // Servers in the pods, through the engine on the saved state.
    let c = Cluster::open(Cluster::read_saved(&state.0.join("cluster.json")).unwrap());
    c.start_echo("shop/api", 7000).unwrap();
    let target = format!("{}:7000", api.ip);
    let reaches = |from: &str| c.probe(from, &["tcp", &target, "hello", "--timeout", "1"]);
    assert!(reaches("shop/web") && reaches("ops/probe"), "no policy yet: open");

    // observe follows the denied flow the policy below causes.
    let mut observe = Command::new(bin_path("meshctl"))
        .arg("--state-dir")
        .arg(&state.0)
        .args(["observe", "--pod", "ops/probe", "--verdict", "dropped", "-o", "json", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // A policy change reaches the datapath within a second.
    let policy = state.0.join("policy.yaml");
    std::fs::write(&policy, ONLY_WEB).unwrap();
    let applied = Instant::now();
    state.ok(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    wait_until("ops/probe to be denied", Duration::from_secs(1), || !reaches("ops/probe")).unwrap();
    eprintln!("policy in force {:?} after apply", applied.elapsed());
    assert!(reaches("shop/web"));
    // One more denied flow, surely after observe has connected.
    assert!(!reaches("ops/probe"));

    let stdout = observe.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| {
        let _ = observe.kill();
        panic!("observe printed no drop event within 10 s");
    });
    assert!(observe.wait().unwrap().success());
    let ev: meshguard_common::flow::FlowEvent = serde_json::from_str(&line).unwrap();
    assert_eq!(ev.verdict, "dropped");
    assert_eq!(ev.src_identity, "spiffe://cluster.local/ns/ops/sa/probe");
    assert_eq!(ev.dst_identity, "spiffe://cluster.local/ns/shop/sa/api");
    assert_eq!((ev.protocol.as_str(), ev.dst_port, ev.node.as_str()), ("TCP", 7000, "beta"));

    // policy get returns what was applied; a bad file changes nothing.
    let got = state.ok(&["policy", "get", "shop/api-ingress", "-o", "yaml"]);
    assert!(got.contains("serviceAccount: web"), "{got}");
    let bad = state.0.join("bad.yaml");
    std::fs::write(
        &bad,
        format!("{ONLY_WEB}---\n{}", ONLY_WEB.replace("api-ingress", "second").replace("port: 7000", "port: 7000, endPort: 10")),
    )
    .unwrap();
    state.fails(&["policy", "apply", "-f", bad.to_str().unwrap()], 2, "endPort 10 is below port 7000");
    let all = state.ok(&["policy", "get", "-o", "json"]);
    assert!(!all.contains("\"second\""), "the valid first document was not applied either: {all}");
    state.fails(&["policy", "delete", "shop/missing"], 2, "no policy \"shop/missing\"");
    state.ok(&["policy", "delete", "-f", policy.to_str().unwrap()]);
    wait_until("ops/probe to be allowed again", Duration::from_secs(1), || reaches("ops/probe")).unwrap();

    // down leaves nothing behind.
    let saved = Cluster::read_saved(&state.0.join("cluster.json")).unwrap();
    let pids: Vec<u32> = saved.pids.iter().copied().chain(saved.nodes.iter().filter_map(|n| n.agent_pid)).collect();
    assert!(!pids.is_empty());
    drop(c);
    state.ok(&["down"]);
    assert!(Cluster::leftovers(&saved.run_id, &saved.dir).is_empty(), "{:?}", Cluster::leftovers(&saved.run_id, &saved.dir));
    assert!(!state.0.join("cluster.json").exists());
    for pid in pids {
        // A killed process whose parent (meshctl up) is gone waits for init
        // to reap it: a zombie holds nothing, so it counts as gone.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
        };
        wait_until(&format!("process {pid} to exit"), Duration::from_secs(2), || !alive()).unwrap();
    }
    let procs = meshguard_meshctl::sim::cmd::run("ps", &["-eo", "args"]).unwrap();
    assert!(!procs.contains(&saved.run_id), "a process still names the run:\n{procs}");
    state.fails(&["down"], 3, "no cluster is up");
}

#[test]
fn root_meshctl_refuses_bad_input_and_changes_nothing() {
    let state = StateDir::new("bad");
    let write = |name: &str, text: &str| {
        let p = state.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    for (spec, want) in [
        ("nodes: [{name: a}]\nworkloads: [{name: w, node: b}]", "workloads[0].node: \"b\" is not one of the spec's nodes"),
        ("nodes:\n  - {name: a}\n  - {name: a, zone: x}\n", "unknown field `zone`"),
        ("nodes: [{name: Bad_Name}]", "nodes[0].name"),
        ("{{{", "cluster spec is invalid"),
    ] {
        let f = write("spec.yaml", spec);
        state.fails(&["up", "--spec", &f], 2, want);
    }
    state.fails(&["up", "--spec", "/nonexistent/spec.yaml"], 2, "cannot read");
    let entries: Vec<_> = std::fs::read_dir(&state.0).unwrap().filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert!(entries.iter().all(|e| e == "spec.yaml" || e == "lock"), "a refused spec builds nothing: {entries:?}");
    let f = write(
        "p.yaml",
        "apiVersion: meshguard.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: x}\nspec: {ingress: [{ports: [{protocol: TCPX}]}]}\n",
    );
    state.fails(&["policy", "apply", "-f", &f], 2, "unknown protocol \"TCPX\"");
    let empty = write("empty.yaml", "# nothing here\n");
    state.fails(&["policy", "apply", "-f", &empty], 2, "no MeshPolicy");
    // Arguments clap refuses.
    state.fails(&["up", "--nodes", "0"], 2, "--nodes");
    state.fails(&["exec", "shop/web"], 2, "required");
    state.fails(&["observe", "--verdict", "maybe"], 2, "invalid value");
}
