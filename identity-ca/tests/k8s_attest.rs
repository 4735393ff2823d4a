//! Kubernetes node attestation against an API server speaking the real
//! HTTP API (tests/apiserver): projected service-account tokens it signed,
//! reviewed with TokenReview over HTTP by the CA's kube client.

#[allow(dead_code)]
#[path = "support/k8s.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshguard_identity_ca::attest::k8s::{ApiServerReviewer, DEFAULT_AUDIENCE, K8sAttestor};
use meshguard_identity_ca::attest::{AttestError, AttestedNode, Evidence, NodeAttestor};
use meshguard_test_apiserver::{ApiServer, ObjectKey, ServiceAccountToken};
use serde_json::json;

use crate::support::{AGENT_SA, NS, agent_pod, kube_ca, token};

/// The CA's client: its own credential (the admin token here), the server's URL.
fn client(server: &ApiServer) -> kube::Client {
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.auth_info.token = Some(server.admin_token().to_owned().into());
    kube::Client::try_from(config).unwrap()
}

async fn attest(a: &K8sAttestor<ApiServerReviewer>, t: &str) -> Result<AttestedNode, AttestError> {
    a.attest(&Evidence::K8sServiceAccountToken(t.to_owned())).await
}

#[tokio::test]
async fn the_node_comes_from_the_api_server_and_bad_tokens_get_nothing() {
    let server = ApiServer::start().await.unwrap();
    let attestor = K8sAttestor::new(ApiServerReviewer::new(client(&server)), DEFAULT_AUDIENCE, NS, AGENT_SA);
    let uid1 = agent_pod(&server, "agent-1", "node-1");
    let uid2 = agent_pod(&server, "agent-2", "node-2");

    // Each agent's bound token names its own node, whatever the caller claims.
    let t1 = server.issue_token(token(AGENT_SA, DEFAULT_AUDIENCE, ("agent-1", &uid1), "node-1")).unwrap();
    let t2 = server.issue_token(token(AGENT_SA, DEFAULT_AUDIENCE, ("agent-2", &uid2), "node-2")).unwrap();
    assert_eq!(attest(&attestor, &t1).await.unwrap(), AttestedNode { node_name: "node-1".into(), method: "k8s_psat" });
    assert_eq!(attest(&attestor, &t2).await.unwrap().node_name, "node-2");

    let refused = |r: Result<AttestedNode, AttestError>, what: &str| {
        assert!(matches!(r, Err(AttestError::Refused { .. })), "{what}: {r:?}");
    };
    // Another audience: a token meant for the API server or another service.
    let other_aud = server.issue_token(token(AGENT_SA, "https://kubernetes.default.svc", ("agent-1", &uid1), "node-1")).unwrap();
    refused(attest(&attestor, &other_aud).await, "another audience");
    // Expired (beyond the API server's leeway).
    let expired = server
        .issue_token(
            token(AGENT_SA, DEFAULT_AUDIENCE, ("agent-1", &uid1), "node-1")
                .issued_at(SystemTime::now() - Duration::from_secs(3600))
                .expires_in(Duration::from_secs(600)),
        )
        .unwrap();
    refused(attest(&attestor, &expired).await, "expired");
    // Forged: the payload edited to name node-2, the signature kept.
    let mut parts: Vec<String> = t1.split('.').map(str::to_owned).collect();
    let t2_parts: Vec<&str> = t2.split('.').collect();
    parts[1] = t2_parts[1].to_owned();
    refused(attest(&attestor, &parts.join(".")).await, "forged payload");
    refused(attest(&attestor, "not-a-token").await, "garbage");
    // Another service account (a workload's token, bound to a pod on node-1).
    let web = server.issue_token(token("web", DEFAULT_AUDIENCE, ("agent-1", &uid1), "node-1")).unwrap();
    refused(attest(&attestor, &web).await, "another service account");
    // The bound pod is gone: its token is dead, though unexpired.
    server.delete(&ObjectKey::namespaced("v1", "Pod", NS, "agent-2")).unwrap();
    refused(attest(&attestor, &t2).await, "pod deleted");
    // A token bound to no pod (e.g. a long-lived secret token).
    let unbound =
        server.issue_token(ServiceAccountToken::new(NS, AGENT_SA).audience(DEFAULT_AUDIENCE).expires_in(Duration::from_secs(600))).unwrap();
    refused(attest(&attestor, &unbound).await, "not bound to a pod");

    // The API server down: the CA cannot judge, and says so (no SVID).
    server.stop().await;
    let r = attest(&attestor, &t1).await;
    assert!(matches!(r, Err(AttestError::Review { .. })), "API server down: {r:?}");
}

/// The whole path: a CA configured for Kubernetes attestation (its kube
/// client from a kubeconfig) gives a node SVID for an agent's bound token
/// over the node API, and nothing for a forged one.
#[tokio::test]
async fn the_ca_attests_nodes_over_its_node_api_with_token_review() {
    use meshguard_ca_client::registry::{self, CA_SERVER_PATH, proto};
    use meshguard_ca_client::svid::{self, BundleCell, CredentialCell, SpiffeVerifier, X509Bundle};
    use meshguard_common::spiffe::{SpiffeId, TrustDomain};

    let api = ApiServer::start().await.unwrap();
    let uid = agent_pod(&api, "agent-1", "node-1");
    let good = api.issue_token(token(AGENT_SA, DEFAULT_AUDIENCE, ("agent-1", &uid), "node-1")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;

    let td = TrustDomain::new("cluster.local").unwrap();
    let b = ca.state.ca.bundle();
    let bundle = BundleCell::new(X509Bundle::new(td.clone(), b.x509_authorities.clone()).unwrap());
    let verifier = Arc::new(SpiffeVerifier::exactly(bundle, SpiffeId::new(&td, CA_SERVER_PATH).unwrap()));
    let tls = Arc::new(svid::client_config(CredentialCell::default(), verifier).unwrap());
    let mut client = registry::node_client(registry::channel(&ca.addr.to_string(), tls).unwrap());
    let attest = |t: String| proto::AttestNodeRequest {
        csr: meshguard_identity_ca::csr::generate().unwrap().1,
        evidence: Some(proto::attest_node_request::Evidence::K8sSaToken(t)),
    };

    let svid = client.attest_node(attest(good.clone())).await.unwrap().into_inner().svid.unwrap();
    assert_eq!(svid.spiffe_id, "spiffe://cluster.local/meshguard/node/node-1");
    // One signature character changed (to a different one, always).
    let at = good.rfind('.').unwrap() + 5;
    let swapped = if &good[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swapped}{}", &good[..at], &good[at + 1..]);
    let refused = client.attest_node(attest(forged)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
}

/// Workload authorization from the API server's pods: node-1 gets SVIDs
/// only for service accounts of pods placed on node-1, and loses them when
/// the pod goes, also when the pod went while the watch was down (a
/// compacted history: 410 Gone, then a relist).
#[tokio::test]
async fn a_node_gets_svids_only_for_pods_the_api_server_places_on_it() {
    use meshguard_ca_client::registry::{self, CA_SERVER_PATH, proto};
    use meshguard_ca_client::svid::{self, BundleCell, CredentialCell, SpiffeVerifier, X509Bundle};
    use meshguard_common::spiffe::{SpiffeId, TrustDomain};
    use rustls::pki_types::CertificateDer;

    let api = ApiServer::start().await.unwrap();
    let uid = agent_pod(&api, "agent-1", "node-1");
    let node_token = api.issue_token(token(AGENT_SA, DEFAULT_AUDIENCE, ("agent-1", &uid), "node-1")).unwrap();
    let workload = |name: &str, sa: &str, node: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.9"}]}
        })
    };
    api.create(workload("web", "web", "node-1")).unwrap();
    api.create(workload("db", "db", "node-2")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let td = TrustDomain::new("cluster.local").unwrap();
    let id = |sa: &str| SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap();
    let wait_for = |what: &'static str, f: Box<dyn Fn() -> bool>| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let st = ca.state.clone();
    wait_for("the pods", Box::new(move || st.registry.hosts("node-1", &id("web")) && st.registry.hosts("node-2", &id("db")))).await;
    assert!(!ca.state.registry.hosts("node-1", &id("db")));

    // node-1, attested with its token, asks for both identities.
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
    let mut client = registry::node_client(registry::channel(&addr, tls).unwrap());
    let sign = |sa: &str| proto::SignWorkloadSvidsRequest {
        requests: vec![proto::WorkloadSvidRequest {
            spiffe_id: format!("spiffe://cluster.local/ns/shop/sa/{sa}"),
            csr: meshguard_identity_ca::csr::generate().unwrap().1,
        }],
    };
    assert_eq!(client.sign_workload_svids(sign("web")).await.unwrap().into_inner().svids.len(), 1);
    let denied = client.sign_workload_svids(sign("db")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // The web pod goes while the API server is down, and its history is
    // compacted: the watch resumes into 410 Gone, and the relist removes it;
    // a pod added meanwhile appears.
    api.stop().await;
    api.delete(&ObjectKey::namespaced("v1", "Pod", "shop", "web")).unwrap();
    api.create(workload("api", "api", "node-1")).unwrap();
    api.compact();
    api.restart().await.unwrap();
    let st = ca.state.clone();
    wait_for("the relist", Box::new(move || !st.registry.hosts("node-1", &id("web")) && st.registry.hosts("node-1", &id("api")))).await;
    let denied = client.sign_workload_svids(sign("web")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(client.sign_workload_svids(sign("api")).await.unwrap().into_inner().svids.len(), 1);
}

/// MeshPolicy objects reach the registry (and through it every agent); an
/// invalid one is refused and says why in its status; a deleted one goes.
#[tokio::test]
async fn mesh_policies_mirror_into_the_registry_with_their_verdict_in_status() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_ca(&api, dir.path()).await;
    let policy = |name: &str, port: u16, end_port: u16| {
        json!({
            "apiVersion": "meshguard.io/v1alpha1", "kind": "MeshPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "api"}},
                     "ingress": [{"from": [{"serviceAccount": "web"}], "ports": [{"protocol": "TCP", "port": port, "endPort": end_port}]}]}
        })
    };
    api.create(policy("api-ingress", 8080, 8090)).unwrap();
    // Past the CRD's rules (this server does not apply them), not past the CA.
    api.create(policy("backwards", 9010, 9000)).unwrap();

    let accepted = |name: &str| {
        api.get(&ObjectKey::namespaced("meshguard.io/v1alpha1", "MeshPolicy", "shop", name))
            .and_then(|p| p["status"]["conditions"].as_array().and_then(|c| c.first().cloned()))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while accepted("api-ingress").is_none() || accepted("backwards").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no status written; registry: {:?}; requests: {:?}",
            ca.state.registry.view().policies.keys().collect::<Vec<_>>(),
            api.requests().iter().rev().take(6).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ok = accepted("api-ingress").unwrap();
    assert_eq!((ok["type"].as_str(), ok["status"].as_str(), ok["reason"].as_str()), (Some("Accepted"), Some("True"), Some("Accepted")));
    let bad = accepted("backwards").unwrap();
    assert_eq!((bad["status"].as_str(), bad["reason"].as_str()), (Some("False"), Some("Invalid")));
    assert!(bad["message"].as_str().unwrap().contains("endPort 9000 is below port 9010"), "{bad}");
    let policies = ca.state.registry.view().policies;
    assert!(policies.contains_key("shop/api-ingress") && !policies.contains_key("shop/backwards"), "{:?}", policies.keys());

    api.delete(&ObjectKey::namespaced("meshguard.io/v1alpha1", "MeshPolicy", "shop", "api-ingress")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ca.state.registry.view().policies.contains_key("shop/api-ingress") {
        assert!(tokio::time::Instant::now() < deadline, "the deleted policy stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
