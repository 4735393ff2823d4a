//! The node agents on the Kubernetes source (root only): real wg-agents in
//! the simulated cluster's namespaces read Pods, Nodes, MeshPolicies and
//! MeshIdentities from an API server speaking the real list/watch protocol,
//! publish their own MeshNodes, mesh over WireGuard from what the others
//! published, and enforce the policy with the numbers the MeshIdentities
//! give. The test stands in for identity-ca (tested on its own side) by
//! writing the MeshIdentity objects it would.

use std::net::SocketAddr;
use std::sync::Arc;

use meshguard_common::spiffe::SpiffeId;
use meshguard_meshctl::sim::bins::bin_path;
use meshguard_meshctl::sim::capture::{Capture, judge};
use meshguard_meshctl::sim::cluster::{Cluster, TUNNEL_IF, UNDERLAY_BRIDGE, WG_PORT, cluster};
use meshguard_test_apiserver::{ApiServer, ObjectKey};
use serde_json::json;

/// On the underlay bridge, beside the nodes (.254 is identity-ca's).
const API_IP: &str = "192.168.100.253";

const POLICY: &str = r#"{"apiVersion": "meshguard.io/v1alpha1", "kind": "MeshPolicy",
  "metadata": {"name": "api-ingress", "namespace": "shop"},
  "spec": {"selector": {"matchLabels": {"app": "api"}},
           "ingress": [{"from": [{"serviceAccount": "web"}], "ports": [{"protocol": "TCP", "port": 7000}]}]}}"#;

/// An API server listening inside the run's underlay namespace, where
/// every node reaches it; its runtime lives on a thread of its own there.
struct UnderlayApiServer {
    api: Arc<ApiServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UnderlayApiServer {
    fn start(c: &Cluster) -> Self {
        let ns = std::fs::File::open(format!("/run/netns/{}", c.underlay_ns)).expect("the underlay namespace");
        let status = std::process::Command::new("ip")
            .args(["-n", &c.underlay_ns, "addr", "add", &format!("{API_IP}/24"), "dev", UNDERLAY_BRIDGE])
            .status()
            .unwrap();
        assert!(status.success(), "cannot give the underlay bridge {API_IP}");
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd as _;
            // This thread (and the runtime's threads it starts) live in the
            // underlay namespace, so the listener is created there.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(async move {
                let listen: SocketAddr = format!("{API_IP}:6443").parse().unwrap();
                let api = ApiServer::start_with(meshguard_test_apiserver::Config { listen, ..Default::default() }).await.unwrap();
                tx.send(Arc::new(api)).unwrap();
                let _ = stopped.await;
            });
        });
        let api = rx.recv().expect("the API server started");
        Self { api, stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for UnderlayApiServer {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(std::thread::JoinHandle::join);
    }
}

#[test]
fn root_node_agents_mesh_and_enforce_from_the_kubernetes_api_server() {
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
    let server = UnderlayApiServer::start(&c);
    let api = &server.api;
    for n in &c.nodes {
        api.create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name},
                          "spec": {"podCIDRs": [n.pod_cidr]},
                          "status": {"addresses": [{"type": "InternalIP", "address": n.underlay_ip.to_string()}]}}))
            .unwrap();
    }
    for (i, p) in c.pods.iter().enumerate() {
        api.create(json!({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                          "spec": {"nodeName": p.node, "serviceAccountName": p.service_account, "containers": []},
                          "status": {"phase": "Running", "podIPs": [{"ip": p.ip.to_string()}]}}))
            .unwrap();
        let id: SpiffeId = c.trust_domain.workload_id(&p.namespace, &p.service_account).unwrap();
        let number = meshguard_common::cluster::alloc::FIRST_IDENTITY + i as u32;
        api.create(serde_json::to_value(meshguard_common::cluster::MeshIdentity::identity(number, &id)).unwrap()).unwrap();
    }
    for (i, n) in c.nodes.iter().enumerate() {
        api.create(serde_json::to_value(meshguard_common::cluster::MeshIdentity::node(i as u32 + 1, &n.name)).unwrap()).unwrap();
    }
    api.create(serde_json::from_str(POLICY).unwrap()).unwrap();
    let kubeconfig = c.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.admin_kubeconfig()).unwrap();
    let td = c.trust_domain.to_string();
    let path = kubeconfig.display().to_string();
    c.set_agent_source(move |_| format!("{{kubernetes: {{kubeconfig: {path}, trustDomain: {td}}}}}"));
    c.start_agents().unwrap();
    c.start_echo("shop/api", 7000).unwrap();

    // Each agent wrote its own MeshNode, with the key its tunnel uses.
    for n in ["node-1", "node-2"] {
        let stored = api.get(&ObjectKey::cluster("meshguard.io/v1alpha1", "MeshNode", n)).expect("the agent published its MeshNode");
        let other = if n == "node-1" { "node-2" } else { "node-1" };
        let key = c.wg(other).unwrap().peers[0].public_key_hex.clone();
        let b64 = meshguard_common::key::PublicKey::from_hex(&key).unwrap().to_base64();
        assert_eq!(stored["spec"]["publicKey"], b64, "{other} peers with the key {n} published");
    }

    // No IPv6 link-local address on the tunnel (set over netlink: /proc/sys
    // is read-only where the DaemonSet runs the agent).
    let addrs = c.exec_node("node-1", "ip", &["-6", "addr", "show", "dev", TUNNEL_IF]).unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(!addrs.contains("inet6"), "the tunnel has an IPv6 address: {addrs}");

    let cap = Capture::start(&c.underlay_ns, UNDERLAY_BRIDGE, &c.dir.join("kubernetes.pcap")).unwrap();
    let mark = format!("MGK8S-{:016x}", rand::random::<u64>());
    let probe = bin_path("mg-probe");
    let target = format!("{}:7000", c.pod("shop/api").ip);
    let ok = |from: &str| c.exec(from, probe.to_str().unwrap(), &["tcp", &target, &mark, "--timeout", "2"]).unwrap().status.success();
    assert!(ok("shop/web"), "web -> api is allowed by the MeshPolicy");
    assert!(!ok("ops/probe"), "probe -> api is denied by the MeshPolicy");
    let frames = cap.stop().unwrap();
    // Only node-to-node traffic is judged: the API server's HTTP is on the underlay too.
    let report = judge(&frames, WG_PORT, &[mark.as_bytes()]);
    let between_nodes: Vec<&String> = report.violations.iter().filter(|v| !v.contains(API_IP)).collect();
    assert!(between_nodes.is_empty(), "plaintext between nodes: {between_nodes:#?}");
    assert!(report.wireguard > 0);

    // A policy deleted in the API server stops being enforced.
    api.delete(&ObjectKey::namespaced("meshguard.io/v1alpha1", "MeshPolicy", "shop", "api-ingress")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ok("ops/probe") {
        assert!(std::time::Instant::now() < deadline, "probe -> api still denied 10 s after the policy was deleted");
    }
}
