//! On Kubernetes the agent attests with its projected service-account token
//! (a file the kubelet keeps fresh): identity-ca checks it with the API
//! server's TokenReview (tests/apiserver, real HTTP) and names the node the
//! token is bound to.

use std::time::Duration;

use meshguard_auth_handshake::agent::Agent;
use meshguard_auth_handshake::caller::StaticResolver;
use meshguard_auth_handshake::config::{Config, DEFAULT_POD_NETNS_PATH};
use meshguard_common::spiffe::TrustDomain;
use meshguard_identity_ca::attest::k8s::DEFAULT_AUDIENCE;
use meshguard_identity_ca::config::KubernetesAttestation;
use meshguard_identity_ca::server::CaServer;
use meshguard_test_apiserver::{ApiServer, ServiceAccountToken};

fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", base64::engine::general_purpose::STANDARD.encode(der))
}

#[tokio::test]
async fn the_agent_attests_with_its_projected_token() {
    let api = ApiServer::start().await.unwrap();
    let pod = api
        .create(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "meshguard-agent-x1", "namespace": "meshguard"},
            "spec": {"nodeName": "node-1", "serviceAccountName": "meshguard-agent", "containers": [{"name": "a", "image": "meshguard"}]}
        }))
        .unwrap();
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    let token = api
        .issue_token(
            ServiceAccountToken::new("meshguard", "meshguard-agent")
                .audience(DEFAULT_AUDIENCE)
                .expires_in(Duration::from_secs(600))
                .pod("meshguard-agent-x1", uid)
                .node("node-1", "uid-node-1"),
        )
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.admin_kubeconfig()).unwrap();
    let mut cfg = meshguard_identity_ca::config::Config::for_test("cluster.local", dir.path());
    cfg.kubernetes = Some(KubernetesAttestation {
        audience: DEFAULT_AUDIENCE.into(),
        agent_namespace: "meshguard".into(),
        agent_service_account: "meshguard-agent".into(),
        kubeconfig: Some(kubeconfig),
    });
    let ca = CaServer::start(cfg).await.unwrap();
    let bundle_file = dir.path().join("bundle.pem");
    std::fs::write(&bundle_file, ca.state.ca.bundle().x509_authorities.iter().map(|c| pem(c)).collect::<String>()).unwrap();

    let token_file = dir.path().join("token");
    let config = |node: &str, state: &str| Config {
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        node_name: node.into(),
        ca_address: ca.addr.to_string(),
        trust_bundle_file: bundle_file.clone(),
        join_token: None,
        service_account_token_file: Some(token_file.clone()),
        state_dir: dir.path().join(state),
        workload_api_socket: dir.path().join(format!("{state}.sock")),
        pod_netns_path: DEFAULT_POD_NETNS_PATH.into(),
        handshake: None,
        bundle_refresh: Duration::from_secs(10),
        metrics_address: None,
    };
    // No token file yet: a clear error, no SVID.
    let missing = Agent::start_with(config("node-1", "a0"), Some(std::sync::Arc::new(StaticResolver::default()))).await;
    let e = missing.err().expect("no token file: no start").to_string();
    assert!(e.contains("token"), "{e}");

    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let agent = Agent::start_with(config("node-1", "a1"), Some(std::sync::Arc::new(StaticResolver::default()))).await.unwrap();
    let ids: Vec<String> = ca.state.ca.svids(true).unwrap().iter().map(|s| s.1.spiffe_id.to_string()).collect();
    assert!(ids.contains(&"spiffe://cluster.local/meshguard/node/node-1".to_owned()), "{ids:?}");
    drop(agent);

    // An agent that calls itself node-2 with node-1's token gets node-1's
    // identity from the CA, and refuses it: it cannot speak for node-2.
    let other = Agent::start_with(config("node-2", "a2"), Some(std::sync::Arc::new(StaticResolver::default()))).await;
    let e = other.err().expect("another node's token: no start").to_string();
    assert!(e.contains("not node-2"), "{e}");
}
