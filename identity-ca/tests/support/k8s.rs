//! A CA in Kubernetes mode against the in-process API server
//! (tests/apiserver), and the agents it attests: shared by the Kubernetes
//! test binaries (`#[path]`-included, so not a test target of its own).

use std::sync::Arc;
use std::time::Duration;

use meshguard_ca_client::registry::{self, CA_SERVER_PATH, proto};
use meshguard_ca_client::svid::{self, BundleCell, CredentialCell, SpiffeVerifier, X509Bundle};
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use meshguard_identity_ca::attest::k8s::DEFAULT_AUDIENCE;
use meshguard_identity_ca::server::CaServer;
use meshguard_test_apiserver::{ApiServer, ServiceAccountToken};
use rustls::pki_types::CertificateDer;
use serde_json::json;

pub const NS: &str = "meshguard";
pub const AGENT_SA: &str = "meshguard-agent";

pub type NodeClient = proto::node_api_client::NodeApiClient<tonic::transport::Channel>;

/// An agent pod on `node`; returns its uid.
pub fn agent_pod(server: &ApiServer, name: &str, node: &str) -> String {
    let pod = server
        .create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"nodeName": node, "serviceAccountName": AGENT_SA, "containers": [{"name": "wg-agent", "image": "meshguard"}]}
        }))
        .unwrap();
    pod["metadata"]["uid"].as_str().unwrap().to_owned()
}

pub fn token(sa: &str, audience: &str, pod: (&str, &str), node: &str) -> ServiceAccountToken {
    ServiceAccountToken::new(NS, sa)
        .audience(audience)
        .expires_in(Duration::from_secs(600))
        .pod(pod.0, pod.1)
        .node(node, &format!("uid-{node}"))
}

/// A CA in Kubernetes mode whose kube client reaches `api` through a kubeconfig.
pub async fn kube_ca(api: &ApiServer, dir: &std::path::Path) -> CaServer {
    use meshguard_identity_ca::config::{Config, KubernetesAttestation};
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.admin_kubeconfig()).unwrap();
    let mut config = Config::for_test("cluster.local", dir);
    config.kubernetes = Some(KubernetesAttestation {
        audience: DEFAULT_AUDIENCE.into(),
        agent_namespace: NS.into(),
        agent_service_account: AGENT_SA.into(),
        kubeconfig: Some(kubeconfig),
    });
    CaServer::start(config).await.unwrap()
}

/// Polls `f` every 20 ms until it holds; fails the test after 10 s, saying `what`.
pub async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The agent on `node`: its pod, its bound token, attested over the node
/// API; the client holds the node SVID it got.
pub async fn attested_node(api: &ApiServer, ca: &CaServer, node: &str) -> NodeClient {
    let pod = format!("agent-{node}");
    let uid = agent_pod(api, &pod, node);
    let node_token = api.issue_token(token(AGENT_SA, DEFAULT_AUDIENCE, (&pod, &uid), node)).unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let b = ca.state.ca.bundle();
    let bundle = BundleCell::new(X509Bundle::new(td.clone(), b.x509_authorities.clone()).unwrap());
    let verifier = Arc::new(SpiffeVerifier::exactly(bundle, SpiffeId::new(&td, CA_SERVER_PATH).unwrap()));
    let creds = CredentialCell::default();
    let tls = Arc::new(svid::client_config(creds.clone(), verifier).unwrap());
    let addr = ca.addr.to_string();
    let mut client = registry::node_client(registry::channel(&addr, tls.clone()).unwrap());
    let (key, csr) = meshguard_identity_ca::csr::generate().unwrap();
    let req = proto::AttestNodeRequest { csr, evidence: Some(proto::attest_node_request::Evidence::K8sSaToken(node_token)) };
    let svid = client.attest_node(req).await.unwrap().into_inner().svid.unwrap();
    creds.set(svid.cert_chain.iter().map(|c| CertificateDer::from(c.clone())).collect(), &key.serialize_der()).unwrap();
    // A new connection presents it.
    registry::node_client(registry::channel(&addr, tls).unwrap())
}
