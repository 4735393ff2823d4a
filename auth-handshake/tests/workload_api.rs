//! The Workload API against a real CA on loopback, with the standard Rust
//! `spiffe` client library as the workload. This process plays the pod: a
//! static resolver maps its pid to `shop/web` (the network-namespace
//! resolver is exercised by the simulated-cluster test and its unit test).

use std::sync::Arc;
use std::time::Duration;

use meshguard_auth_handshake::agent::Agent;
use meshguard_auth_handshake::caller::StaticResolver;
use meshguard_auth_handshake::config::{Config, DEFAULT_POD_NETNS_PATH};
use meshguard_common::cluster::Workload;
use meshguard_common::spiffe::TrustDomain;
use meshguard_identity_ca::server::CaServer;
use tokio_stream::StreamExt as _;

fn workload(name: &str, sa: &str, node: &str) -> Workload {
    Workload {
        name: name.into(),
        namespace: "shop".into(),
        service_account: sa.into(),
        node: node.into(),
        ips: vec![],
        labels: Default::default(),
    }
}

fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", base64::engine::general_purpose::STANDARD.encode(der))
}

/// node-1's agent config: joins `ca` with a fresh token, no handshakes.
fn agent_config(ca: &CaServer, dir: &std::path::Path) -> Config {
    let bundle_file = dir.join("bundle.pem");
    std::fs::write(&bundle_file, ca.state.ca.bundle().x509_authorities.iter().map(|c| pem(c)).collect::<String>()).unwrap();
    let token = ca.state.tokens.create("node-1", Duration::from_secs(60)).unwrap().0;
    Config {
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        node_name: "node-1".into(),
        ca_address: ca.addr.to_string(),
        trust_bundle_file: bundle_file,
        join_token: Some(token),
        service_account_token_file: None,
        state_dir: dir.join("agent"),
        workload_api_socket: dir.join("workload.sock"),
        pod_netns_path: DEFAULT_POD_NETNS_PATH.into(),
        handshake: None,
        bundle_refresh: Duration::from_millis(500),
        metrics_address: None,
    }
}

#[tokio::test]
async fn standard_client_fetches_its_own_svid_and_rotations_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = meshguard_identity_ca::config::Config::for_test("cluster.local", dir.path());
    cfg.svid_ttl = Duration::from_secs(10);
    let ca = CaServer::start(cfg).await.unwrap();
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    ca.state.registry.put_workload(workload("db", "db", "node-2")).unwrap();
    let config = agent_config(&ca, dir.path());
    let socket = config.workload_api_socket.clone();
    let resolver = Arc::new(StaticResolver::default());
    let agent = Agent::start_with(config, Some(resolver.clone())).await.unwrap();
    let endpoint = format!("unix:{}", socket.display());
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint).await.unwrap();

    // Not (yet) a known workload: nothing.
    assert!(client.fetch_x509_svid().await.is_err());

    // This process is shop/web.
    resolver.0.lock().unwrap().insert(std::process::id() as i32, "shop/web".into());
    let svid = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(s) = client.fetch_x509_svid().await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("svid within 10 s");
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&"cluster.local".try_into().unwrap()).is_some());

    // JWT-SVID round trip through the standard client.
    let jwt = client.fetch_jwt_svid(&["backend"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    let validated = client.validate_jwt_token("backend", jwt.token()).await.unwrap();
    assert_eq!(validated.spiffe_id().to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    assert!(client.validate_jwt_token("someone-else", jwt.token()).await.is_err());
    // Asking for another identity's JWT is refused.
    let other: spiffe::SpiffeId = "spiffe://cluster.local/ns/shop/sa/db".parse().unwrap();
    assert!(client.fetch_jwt_svid(&["backend"], Some(&other)).await.is_err());

    // A rotated SVID arrives on the stream before the first one expires.
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let first_leaf = first.leaf().as_bytes().to_vec();
    let rotated = tokio::time::timeout(Duration::from_secs(9), async {
        loop {
            let s = stream.next().await.unwrap().unwrap();
            if s.leaf().as_bytes() != first_leaf.as_slice() {
                return s;
            }
        }
    })
    .await
    .expect("rotated SVID before expiry");
    assert_eq!(rotated.spiffe_id().to_string(), "spiffe://cluster.local/ns/shop/sa/web");

    // Pretending to be db (hosted on node-2) gets nothing: this node never holds it.
    resolver.0.lock().unwrap().insert(std::process::id() as i32, "shop/db".into());
    assert!(client.fetch_x509_svid().await.is_err());
    agent.shutdown().await;
    ca.shutdown().await;
}

/// Opens a Workload API connection as its own process (A), forks a relay (B)
/// that inherits it, prints A's pid and exits: the test then speaks through
/// the relay, over the connection A opened.
const OUTLIVE: &str = r#"
import os, select, socket, sys
api, relay = sys.argv[1], sys.argv[2]
conn = socket.socket(socket.AF_UNIX)
conn.connect(api)
lis = socket.socket(socket.AF_UNIX)
lis.bind(relay)
lis.listen(1)
if os.fork() == 0:
    # Let the parent's output end when it exits.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    peer, _ = lis.accept()
    while True:
        r, _, _ = select.select([peer, conn], [], [])
        for s in r:
            data = s.recv(65536)
            if not data:
                os._exit(0)
            (conn if s is peer else peer).sendall(data)
print(os.getpid(), flush=True)
os._exit(0)
"#;

/// Issue 14, finding 8: the Workload API re-derived the caller from the pid
/// the connection was opened with, on every call; once that process exits
/// and its pid is reused by a process of another pod, whoever holds the
/// connection received that pod's SVID. Here the reuse is played by the
/// resolver (the exited process's pid now names shop/web).
#[tokio::test]
async fn a_connection_outliving_its_process_gets_nothing_when_its_pid_names_another_pod() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaServer::start(meshguard_identity_ca::config::Config::for_test("cluster.local", dir.path())).await.unwrap();
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    let config = agent_config(&ca, dir.path());
    let socket = config.workload_api_socket.clone();
    let resolver = Arc::new(StaticResolver::default());
    let agent = Agent::start_with(config, Some(resolver.clone())).await.unwrap();
    // web's SVID is held by the agent (the control below fetches it).
    resolver.0.lock().unwrap().insert(std::process::id() as i32, "shop/web".into());
    let me = spiffe::WorkloadApiClient::connect_to(&format!("unix:{}", socket.display())).await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(s) = me.fetch_x509_svid().await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("web's SVID within 10 s");
    assert_eq!(held.spiffe_id().to_string(), "spiffe://cluster.local/ns/shop/sa/web");

    let relay = dir.path().join("relay.sock");
    let out = std::process::Command::new("python3")
        .args(["-c", OUTLIVE, socket.to_str().unwrap(), relay.to_str().unwrap()])
        .output()
        .expect("python3 (scripts/setup.sh installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let gone: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // The process that opened the connection has exited; its pid now "names" web.
    resolver.0.lock().unwrap().insert(gone, "shop/web".into());
    let holder = spiffe::WorkloadApiClient::connect_to(&format!("unix:{}", relay.display())).await.unwrap();
    let got = holder.fetch_x509_svid().await;
    assert!(got.is_err(), "a connection whose process exited must get nothing, got {:?}", got.map(|s| s.spiffe_id().to_string()));
    let jwt = holder.fetch_jwt_svid(&["backend"], None).await;
    assert!(jwt.is_err(), "nor a JWT-SVID");
    agent.shutdown().await;
    ca.shutdown().await;
}

/// The shared telemetry server on auth-handshake: /readyz reflects the
/// node's credentials and the SVIDs of the workloads placed on it, and
/// /metrics carries the expiry and sync gauges operators alert on.
#[tokio::test]
async fn readyz_and_the_expiry_gauges_follow_the_credentials() {
    use meshguard_common::telemetry::{free_loopback_addr, get, wait_for_status};
    let dir = tempfile::tempdir().unwrap();
    let ca = CaServer::start(meshguard_identity_ca::config::Config::for_test("cluster.local", dir.path())).await.unwrap();
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    let mut config = agent_config(&ca, dir.path());
    let addr = free_loopback_addr().unwrap();
    config.metrics_address = Some(addr);
    let agent = Agent::start(config).await.unwrap();
    let t = Duration::from_secs(2);
    wait_for_status(addr, "/readyz", 200, Duration::from_secs(10)).await.expect("ready within 10 s");
    let (status, metrics) = get(addr, "/metrics", t).await.unwrap();
    assert_eq!(status, 200);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
    let value = |series: &str| -> f64 {
        metrics.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    let node = value("meshguard_auth_node_svid_expiry_timestamp_seconds ");
    assert!(node > now && node <= now + 3700.0, "node SVID expiry {node} (now {now})");
    let web = value("meshguard_auth_workload_svid_expiry_timestamp_seconds{spiffe_id=\"spiffe://cluster.local/ns/shop/sa/web\"} ");
    assert!(web > now, "web's SVID expiry {web}");
    assert!((value("meshguard_auth_ca_last_sync_timestamp_seconds ") - now).abs() < 30.0);
    assert_eq!(value("meshguard_auth_workloads_without_svid "), 0.0);
    assert!(metrics.contains("meshguard_build_info{component=\"auth-handshake\""), "{metrics}");

    ca.shutdown().await;
    agent.shutdown().await;
}
