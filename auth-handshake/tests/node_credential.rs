//! The node credential shared on a node: auth-handshake attests and renews
//! the node SVID in its state directory; a second process (as wg-agent will)
//! follows that file with `NodeTls` and speaks for the node to the registry,
//! before and after the first SVID expires.

use std::time::Duration;

use meshguard_auth_handshake::agent::Agent;
use meshguard_auth_handshake::ca_client::NODE_STATE_FILE;
use meshguard_auth_handshake::caller::StaticResolver;
use meshguard_auth_handshake::config::{Config, DEFAULT_POD_NETNS_PATH};
use meshguard_ca_client::registry::{self, RegistrySource};
use meshguard_ca_client::svid::node_tls::NodeTls;
use meshguard_common::cluster::{ClusterSource as _, NodeRecord, Workload};
use meshguard_common::key::PublicKey;
use meshguard_common::spiffe::TrustDomain;
use meshguard_identity_ca::server::CaServer;

fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", base64::engine::general_purpose::STANDARD.encode(der))
}

fn record(key: u8) -> NodeRecord {
    NodeRecord {
        name: "node-1".into(),
        public_key: PublicKey([key; 32]),
        endpoint: "192.168.1.1:51820".parse().unwrap(),
        pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn a_second_process_speaks_for_the_node_across_renewals() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = meshguard_identity_ca::config::Config::for_test("cluster.local", dir.path());
    // Renewed every 2 s; the first one is dead after 4.
    cfg.node_svid_ttl = Duration::from_secs(4);
    let ca = CaServer::start(cfg).await.unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let bundle_file = dir.path().join("bundle.pem");
    std::fs::write(&bundle_file, ca.state.ca.bundle().x509_authorities.iter().map(|c| pem(c)).collect::<String>()).unwrap();
    let token = ca.state.tokens.create("node-1", Duration::from_secs(60)).unwrap().0;
    let state_dir = dir.path().join("agent");
    let config = Config {
        trust_domain: td.clone(),
        node_name: "node-1".into(),
        ca_address: ca.addr.to_string(),
        trust_bundle_file: bundle_file.clone(),
        join_token: Some(token),
        service_account_token_file: None,
        state_dir: state_dir.clone(),
        workload_api_socket: dir.path().join("workload.sock"),
        pod_netns_path: DEFAULT_POD_NETNS_PATH.into(),
        handshake: None,
        bundle_refresh: Duration::from_secs(10),
        metrics_address: None,
    };
    let agent = Agent::start_with(config, Some(std::sync::Arc::new(StaticResolver::default()))).await.unwrap();

    // The second process: the same node credential, from the file.
    let tls = NodeTls::follow(&state_dir.join(NODE_STATE_FILE), &bundle_file, &td, Duration::from_millis(50)).unwrap();
    assert_eq!(tls.node_name(), "node-1");
    let first = tls.identity().borrow().clone();
    let source = RegistrySource::start(registry::channel(&ca.addr.to_string(), tls.client_config()).unwrap());
    source.publish_node(&record(1)).await.unwrap();
    let mut view = source.subscribe();
    tokio::time::timeout(
        Duration::from_secs(5),
        view.wait_for(|v| v.nodes.get("node-1") == Some(&record(1)) && v.node_ids.contains_key("node-1")),
    )
    .await
    .unwrap()
    .unwrap();

    // auth-handshake renews; the follower picks it up.
    let mut id = tls.identity();
    tokio::time::timeout(Duration::from_secs(10), id.wait_for(|i| i.expires_at > first.expires_at))
        .await
        .expect("renewal picked up")
        .unwrap();

    // Once the first SVID is dead, only the renewed one opens the API.
    while now_unix() <= first.expires_at + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fresh = RegistrySource::start(registry::channel(&ca.addr.to_string(), tls.client_config()).unwrap());
    fresh.publish_node(&record(2)).await.expect("published with the renewed node SVID");
    // The long-lived watch reconnected (the CA recycles connections) with it too.
    ca.state
        .registry
        .put_workload(Workload {
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "node-1".into(),
            ips: vec![],
            labels: Default::default(),
        })
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), view.wait_for(|v| v.workloads.contains_key("shop/web") && v.nodes["node-1"] == record(2)))
        .await
        .expect("the watch follows with the renewed SVID")
        .unwrap();

    // After a CA rotation starts, the follower can take the CA's bundle.
    ca.state.ca.prepare().unwrap();
    // (A new channel: with SVIDs this short-lived, a connection the CA has
    // not recycled yet may hold one that has just expired.)
    let seq = tls.refresh_bundle(registry::channel(&ca.addr.to_string(), tls.client_config()).unwrap()).await.unwrap();
    assert_eq!(seq, ca.state.ca.bundle().sequence);
    assert_eq!(tls.bundle().get().authorities().len(), 2);

    drop((source, fresh));
    agent.shutdown().await;
    ca.shutdown().await;
}
