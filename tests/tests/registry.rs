//! The node agents on identity-ca's registry instead of the shared
//! directory (root only): each node publishes its WireGuard key over a
//! channel authenticated by its node SVID, learns the others from the watch
//! stream, and the numeric identities come from the registry.

use meshguard_meshctl::sim::bins::bin_path;
use meshguard_meshctl::sim::capture::{Capture, judge};
use meshguard_meshctl::sim::cluster::{UNDERLAY_BRIDGE, WG_PORT, cluster};

const POLICY: &str = r#"
apiVersion: meshguard.io/v1alpha1
kind: MeshPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
    - from: [{serviceAccount: web}]
      ports: [{protocol: TCP, port: 7000}]
"#;

#[test]
fn root_node_agents_mesh_and_enforce_through_the_registry() {
    let c = cluster()
        .nodes(2)
        .pod("shop/web")
        .label("app", "web")
        .on("node-1")
        .pod("shop/api")
        .label("app", "api")
        .on("node-2")
        .pod("ops/probe")
        .on("node-1")
        .build()
        .unwrap();
    let id = c.identity().start().unwrap();
    let policy_file = c.dir.join("policy.yaml");
    std::fs::write(&policy_file, POLICY).unwrap();
    id.admin(&["policy", "apply", "-f", policy_file.to_str().unwrap()]).unwrap();
    id.use_registry_for_agents();
    c.start_agents().unwrap();
    c.start_echo("shop/api", 7000).unwrap();

    // The identity-ca traffic on the underlay is TLS to the CA; judge only
    // what crosses between the nodes.
    let cap = Capture::start(&c.underlay_ns, UNDERLAY_BRIDGE, &c.dir.join("registry.pcap")).unwrap();
    let mark = format!("MGREG-{:016x}", rand::random::<u64>());
    let probe = bin_path("mg-probe");
    let api = format!("{}:7000", c.pod("shop/api").ip);
    let ok = |from: &str| c.exec(from, probe.to_str().unwrap(), &["tcp", &api, &mark, "--timeout", "2"]).unwrap().status.success();
    assert!(ok("shop/web"), "web -> api is allowed by the registry's policy");
    assert!(!ok("ops/probe"), "probe -> api is denied by the registry's policy");
    let frames = cap.stop().unwrap();
    let report = judge(&frames, WG_PORT, &[mark.as_bytes()]);
    let between_nodes: Vec<&String> = report.violations.iter().filter(|v| !v.contains("192.168.100.254")).collect();
    assert!(between_nodes.is_empty(), "plaintext between nodes: {between_nodes:#?}");
    assert!(report.wireguard > 0);

    // The records the agents published are on the registry's books.
    let nodes = id.admin(&["--json", "node", "list"]).unwrap();
    for n in ["node-1", "node-2"] {
        let key = c.wg(if n == "node-1" { "node-2" } else { "node-1" }).unwrap().peers[0].public_key_hex.clone();
        let b64 = meshguard_common::key::PublicKey::from_hex(&key).unwrap().to_base64();
        assert!(nodes.contains(&b64), "{n}'s key {b64} is not in `node list`: {nodes}");
    }
    // Every listing honours -o json|yaml with the same rows, and tables fit.
    for list in
        [&["node", "list"][..], &["identity", "list"], &["workload", "list"], &["policy", "list"], &["ca", "list"], &["svid", "list"]]
    {
        let json: serde_json::Value = serde_json::from_str(&id.admin(&[&["-o", "json"][..], list].concat()).unwrap()).unwrap();
        let yaml: serde_json::Value = meshguard_common::yaml::from_str(&id.admin(&[&["-o", "yaml"][..], list].concat()).unwrap()).unwrap();
        assert_eq!(json, yaml, "{list:?}: json and yaml differ");
        assert!(json.as_array().is_some_and(|a| !a.is_empty()), "{list:?}: {json}");
        let table = id.admin(list).unwrap();
        assert_eq!(table.lines().count(), json.as_array().unwrap().len() + 1, "{list:?}: one header and a line per row:\n{table}");
    }
    // The link to identity-ca, as operators alert on it.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
    let synced = c.metric("node-1", "meshguard_wg_ca_last_sync_timestamp_seconds ").unwrap();
    assert!((now - synced).abs() < 120.0, "last CA sync {synced}, now {now}");
    let expiry = c.metric("node-1", "meshguard_wg_node_svid_expiry_timestamp_seconds ").unwrap();
    assert!(expiry > now, "node SVID expiry {expiry}, now {now}");
    // `healthcheck` on each daemon asks its /readyz: ready here, and it needs
    // no join token file (gone once a node is attested).
    let node = c.node("node-1").netns.clone();
    let ah_config = id.dir.join("node-1").join("auth-handshake.yaml");
    std::fs::remove_file(id.dir.join("node-1").join("join-token")).unwrap();
    for (bin, config) in [("wg-agent", c.agent_config_path("node-1")), ("auth-handshake", ah_config)] {
        let out = meshguard_meshctl::sim::cmd::in_ns_output(
            &node,
            bin_path(bin).to_str().unwrap(),
            &["healthcheck", "--config", config.to_str().unwrap()],
        )
        .unwrap();
        assert!(out.status.success(), "{bin} healthcheck: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ready\n", "{bin}");
        // Pointed at a port nothing answers on: not ready, exit 1, and why.
        let text = std::fs::read_to_string(&config).unwrap();
        let port = text.lines().find_map(|l| l.strip_prefix("metricsAddress: 127.0.0.1:")).unwrap().trim().to_owned();
        let wrong = c.dir.join(format!("{bin}-wrong.yaml"));
        std::fs::write(&wrong, text.replace(&format!("metricsAddress: 127.0.0.1:{port}"), "metricsAddress: 127.0.0.1:1")).unwrap();
        let out = meshguard_meshctl::sim::cmd::in_ns_output(
            &node,
            bin_path(bin).to_str().unwrap(),
            &["healthcheck", "--config", wrong.to_str().unwrap()],
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(1), "{bin} healthcheck against nothing: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"), "{bin}: {out:?}");
    }
    let policies: serde_json::Value = serde_json::from_str(&id.admin(&["-o", "json", "policy", "list"]).unwrap()).unwrap();
    assert_eq!(policies[0]["kind"], "MeshPolicy", "policy list -o json prints the resources: {policies}");
}
