//! In-process tests with a real CA on loopback: SVID fields, attestation,
//! authorization, bad input, rotation and restart.

use std::sync::Arc;
use std::time::Duration;

use meshguard_ca_client::registry::{self, CA_SERVER_PATH, proto};
use meshguard_ca_client::svid::{self, BundleCell, CredentialCell, SpiffeVerifier, SvidError, X509Bundle};
use meshguard_common::cluster::Workload;
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use meshguard_identity_ca::config::Config;
use meshguard_identity_ca::server::CaServer;
use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::*;

const TD: &str = "cluster.local";

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

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

fn bundle_of(ca: &CaServer) -> X509Bundle {
    let b = ca.state.ca.bundle();
    X509Bundle::new(td(), b.x509_authorities.clone()).unwrap()
}

/// A node-side client: optionally holding a node SVID.
struct Node {
    creds: CredentialCell,
    tls: Arc<rustls::ClientConfig>,
    addr: String,
    client: proto::node_api_client::NodeApiClient<tonic::transport::Channel>,
    /// The credential installed last: (chain, PKCS#8 key).
    held: Option<(Vec<CertificateDer<'static>>, Vec<u8>)>,
}

impl Node {
    fn new(ca: &CaServer) -> Self {
        let creds = CredentialCell::default();
        let bundle = BundleCell::new(bundle_of(ca));
        let ca_id = SpiffeId::new(&td(), CA_SERVER_PATH).unwrap();
        let tls = Arc::new(svid::client_config(creds.clone(), Arc::new(SpiffeVerifier::exactly(bundle, ca_id))).unwrap());
        let addr = ca.addr.to_string();
        let ch = registry::channel(&addr, tls.clone()).unwrap();
        Self { creds, tls, addr, client: registry::node_client(ch), held: None }
    }

    /// Another client holding a copy of this node's current credential (a thief's).
    fn copy(&self, ca: &CaServer) -> Self {
        let mut n = Self::new(ca);
        let (chain, key) = self.held.clone().expect("a credential to copy");
        n.install(chain, key);
        n
    }

    fn install(&mut self, chain: Vec<CertificateDer<'static>>, key: Vec<u8>) {
        self.creds.set(chain.clone(), &key).unwrap();
        self.held = Some((chain, key));
        // A new connection presents it.
        self.client = registry::node_client(registry::channel(&self.addr, self.tls.clone()).unwrap());
    }

    async fn renew(&mut self) -> Result<(), tonic::Status> {
        let (key, csr) = meshguard_identity_ca::csr::generate().unwrap();
        let svid = self.client.renew_node_svid(proto::RenewNodeSvidRequest { csr }).await?.into_inner().svid.unwrap();
        self.install(svid.cert_chain.iter().map(|c| CertificateDer::from(c.clone())).collect(), key.serialize_der());
        Ok(())
    }

    async fn attest(&mut self, token: &str) -> Result<proto::X509Svid, tonic::Status> {
        let (key, csr) = meshguard_identity_ca::csr::generate().unwrap();
        let r = self
            .client
            .attest_node(proto::AttestNodeRequest { csr, evidence: Some(proto::attest_node_request::Evidence::JoinToken(token.into())) })
            .await?
            .into_inner();
        let svid = r.svid.unwrap();
        // The attestation connection carries no client certificate: install opens a new one.
        self.install(svid.cert_chain.iter().map(|c| CertificateDer::from(c.clone())).collect(), key.serialize_der());
        Ok(svid)
    }

    async fn sign(&mut self, ids: &[&str]) -> Result<Vec<proto::X509Svid>, tonic::Status> {
        let requests = ids
            .iter()
            .map(|id| proto::WorkloadSvidRequest { spiffe_id: id.to_string(), csr: meshguard_identity_ca::csr::generate().unwrap().1 })
            .collect();
        Ok(self.client.sign_workload_svids(proto::SignWorkloadSvidsRequest { requests }).await?.into_inner().svids)
    }
}

async fn start(dir: &std::path::Path) -> CaServer {
    CaServer::start(Config::for_test(TD, dir)).await.unwrap()
}

fn token(ca: &CaServer, node: &str, ttl: Duration) -> String {
    ca.state.tokens.create(node, ttl).unwrap().0
}

fn issued(ca: &CaServer) -> usize {
    ca.state.ca.svids(true).unwrap().len()
}

#[tokio::test]
async fn svids_follow_the_standard_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start(dir.path()).await;
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    let mut n = Node::new(&ca);
    let node_svid = n.attest(&token(&ca, "node-1", Duration::from_secs(60))).await.unwrap();
    assert_eq!(node_svid.spiffe_id, "spiffe://cluster.local/meshguard/node/node-1");
    let svid = n.sign(&["spiffe://cluster.local/ns/shop/sa/web"]).await.unwrap().remove(0);

    let (_, cert) = X509Certificate::from_der(&svid.cert_chain[0]).unwrap();
    // Exactly one URI SAN, the requested ID.
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical || !cert.subject().as_raw().is_empty());
    let uris: Vec<_> = san.value.general_names.iter().filter(|g| matches!(g, GeneralName::URI(_))).collect();
    assert_eq!(uris.len(), 1);
    assert!(matches!(uris[0], GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")));
    // Leaf: cA false (present, critical), digitalSignature only, key usage critical.
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    assert!(bc.critical);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    // ECDSA P-256 with SHA-256, TTL one hour.
    assert_eq!(cert.signature_algorithm.algorithm, x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256);
    let ttl = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!((3600..=3700).contains(&ttl), "ttl {ttl}");
    assert!(cert.extensions().iter().any(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER));
    // Signing certificate: CA with keyCertSign, URI SAN of the trust domain only.
    let b = ca.state.ca.bundle();
    let (_, root) = X509Certificate::from_der(&b.x509_authorities[0]).unwrap();
    assert!(root.basic_constraints().unwrap().unwrap().value.ca);
    assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
    let root_san = root.subject_alternative_name().unwrap().unwrap();
    assert!(matches!(root_san.value.general_names.as_slice(), [GeneralName::URI("spiffe://cluster.local")]));
    // The chain verifies with the bundle.
    let chain: Vec<CertificateDer<'_>> = svid.cert_chain.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
    let leaf = bundle_of(&ca).verify(&chain, UnixTime::now()).unwrap();
    assert_eq!(leaf.spiffe_id.as_str(), "spiffe://cluster.local/ns/shop/sa/web");
    ca.shutdown().await;
}

#[tokio::test]
async fn verifier_refuses_expired_foreign_and_misused_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start(dir.path()).await;
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    let mut n = Node::new(&ca);
    n.attest(&token(&ca, "node-1", Duration::from_secs(60))).await.unwrap();
    let svid = n.sign(&["spiffe://cluster.local/ns/shop/sa/web"]).await.unwrap().remove(0);
    let chain = vec![CertificateDer::from(svid.cert_chain[0].clone())];
    let bundle = bundle_of(&ca);
    // Expired: verify two hours from now.
    let later = UnixTime::since_unix_epoch(Duration::from_secs(svid.expires_at as u64 + 3600));
    assert!(matches!(bundle.verify(&chain, later), Err(SvidError::Chain { .. })));
    // Wrong trust domain: same authorities, other domain name.
    let other = X509Bundle::new(TrustDomain::new("other.org").unwrap(), bundle.authorities().to_vec()).unwrap();
    assert!(matches!(other.verify(&chain, UnixTime::now()), Err(SvidError::WrongTrustDomain { .. })));
    // A stranger CA's leaf.
    let stranger = X509Bundle::new(td(), vec![rcgen_ca().0]).unwrap();
    assert!(matches!(stranger.verify(&chain, UnixTime::now()), Err(SvidError::Chain { .. })));
    // Wrong usage: a CA certificate presented as a leaf, and a leaf without digitalSignature.
    let (ca_cert, ca_key) = rcgen_ca();
    let misuse = X509Bundle::new(td(), vec![ca_cert.clone()]).unwrap();
    assert!(matches!(
        misuse.verify(std::slice::from_ref(&ca_cert), UnixTime::now()),
        Err(SvidError::LeafIsCa | SvidError::EmptyPath { .. })
    ));
    let no_ds = rcgen_leaf(&ca_cert, &ca_key, vec![rcgen::KeyUsagePurpose::KeyEncipherment]);
    assert_eq!(misuse.verify(&[no_ds], UnixTime::now()).unwrap_err(), SvidError::LeafMissingDigitalSignature);
    let signer = rcgen_leaf(&ca_cert, &ca_key, vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyCertSign]);
    assert_eq!(misuse.verify(&[signer], UnixTime::now()).unwrap_err(), SvidError::LeafCanSign);
    let ok = rcgen_leaf(&ca_cert, &ca_key, vec![rcgen::KeyUsagePurpose::DigitalSignature]);
    misuse.verify(&[ok], UnixTime::now()).unwrap();
    ca.shutdown().await;
}

fn rcgen_ca() -> (CertificateDer<'static>, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.subject_alt_names = vec![rcgen::SanType::URI("spiffe://cluster.local".try_into().unwrap())];
    (p.self_signed(&key).unwrap().der().clone(), key)
}

fn rcgen_leaf(ca: &CertificateDer<'static>, ca_key: &rcgen::KeyPair, usages: Vec<rcgen::KeyUsagePurpose>) -> CertificateDer<'static> {
    let issuer = rcgen::Issuer::from_ca_cert_der(ca, ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = usages;
    p.subject_alt_names = vec![rcgen::SanType::URI("spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap())];
    p.signed_by(&key, &issuer).unwrap().der().clone()
}

#[tokio::test]
async fn attestation_and_authorization_refuse_what_they_must() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start(dir.path()).await;
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    ca.state.registry.put_workload(workload("db", "db", "node-2")).unwrap();

    // No certificate: only attestation is open, everything else refused.
    let mut anon = Node::new(&ca);
    let e = anon.sign(&["spiffe://cluster.local/ns/shop/sa/web"]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(anon.client.get_bundle(proto::GetBundleRequest {}).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    // Forged, expired and used tokens get nothing.
    let before = issued(&ca);
    assert_eq!(anon.attest("forged-token").await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let expired = token(&ca, "node-1", Duration::ZERO);
    assert_eq!(anon.attest(&expired).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let t = token(&ca, "node-1", Duration::from_secs(60));
    let mut n1 = Node::new(&ca);
    n1.attest(&t).await.unwrap();
    assert_eq!(Node::new(&ca).attest(&t).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    assert_eq!(issued(&ca), before + 1);

    // node-1 gets web's SVID, not db's (hosted on node-2), nor a foreign or node identity.
    n1.sign(&["spiffe://cluster.local/ns/shop/sa/web"]).await.unwrap();
    let before = issued(&ca);
    for id in ["spiffe://cluster.local/ns/shop/sa/db", "spiffe://other.org/ns/shop/sa/web", "spiffe://cluster.local/meshguard/node/node-2"]
    {
        assert_eq!(n1.sign(&[id]).await.unwrap_err().code(), tonic::Code::PermissionDenied, "{id}");
    }
    // A batch with one forbidden identity issues nothing.
    let e = n1.sign(&["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/db"]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(issued(&ca), before);
    assert!(ca.state.metrics.denied_count("not_hosted") >= 2);

    // Publishing another node's record is refused.
    let rec = proto::Node { name: "node-2".into(), public_key: vec![1; 32], endpoint: "192.168.1.2:51820".into(), pod_cidrs: vec![] };
    assert_eq!(
        n1.client.publish_node(proto::PublishNodeRequest { node: Some(rec) }).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    // A removed node's SVID stops working.
    ca.state.remove_node("node-1").unwrap();
    assert_eq!(n1.sign(&["spiffe://cluster.local/ns/shop/sa/web"]).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    ca.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start(dir.path()).await;
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    let mut n = Node::new(&ca);
    // A malformed CSR does not burn the token.
    let t = token(&ca, "node-1", Duration::from_secs(60));
    let e = n
        .client
        .attest_node(proto::AttestNodeRequest {
            csr: b"junk".to_vec(),
            evidence: Some(proto::attest_node_request::Evidence::JoinToken(t.clone())),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("csr"), "{}", e.message());
    n.attest(&t).await.unwrap();
    let before = issued(&ca);
    let web = "spiffe://cluster.local/ns/shop/sa/web".to_string();
    let cases: Vec<(Vec<proto::WorkloadSvidRequest>, &str)> = vec![
        (vec![proto::WorkloadSvidRequest { spiffe_id: web.clone(), csr: vec![0x30; 10_000] }], "bytes"),
        (vec![proto::WorkloadSvidRequest { spiffe_id: web.clone(), csr: b"not der".to_vec() }], "csr"),
        (vec![proto::WorkloadSvidRequest { spiffe_id: "spiffe://cluster.local/ns/../sa/web".into(), csr: vec![] }], "invalid SPIFFE ID"),
        (vec![proto::WorkloadSvidRequest { spiffe_id: "http://x".into(), csr: vec![] }], "invalid SPIFFE ID"),
        (vec![], "no SVIDs"),
    ];
    for (requests, want) in cases {
        let e = n.client.sign_workload_svids(proto::SignWorkloadSvidsRequest { requests }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(want), "{} does not say {want}", e.message());
    }
    // Oversized request: refused by the transport limit.
    let huge = vec![proto::WorkloadSvidRequest { spiffe_id: web.clone(), csr: vec![0; 2 * 1024 * 1024] }];
    let e = n.client.sign_workload_svids(proto::SignWorkloadSvidsRequest { requests: huge }).await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);
    // Too many in one batch.
    let many: Vec<_> = (0..1001).map(|_| proto::WorkloadSvidRequest { spiffe_id: web.clone(), csr: vec![] }).collect();
    assert_eq!(
        n.client.sign_workload_svids(proto::SignWorkloadSvidsRequest { requests: many }).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(issued(&ca), before);
    // State intact: the next good request works.
    n.sign(&[&web]).await.unwrap();
    ca.shutdown().await;
}

#[tokio::test]
async fn rotation_keeps_every_svid_verifying() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start(dir.path()).await;
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    let mut n = Node::new(&ca);
    n.attest(&token(&ca, "node-1", Duration::from_secs(60))).await.unwrap();
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let chain = |s: &proto::X509Svid| s.cert_chain.iter().map(|c| CertificateDer::from(c.clone())).collect::<Vec<_>>();
    let old = n.sign(&[web]).await.unwrap().remove(0);

    ca.state.ca.prepare().unwrap();
    assert_eq!(ca.state.ca.bundle().x509_authorities.len(), 2);
    bundle_of(&ca).verify(&chain(&old), UnixTime::now()).unwrap();
    ca.state.ca.activate().unwrap();
    let new = n.sign(&[web]).await.unwrap().remove(0);
    let b = bundle_of(&ca);
    b.verify(&chain(&old), UnixTime::now()).unwrap();
    b.verify(&chain(&new), UnixTime::now()).unwrap();
    // The old authority signed SVIDs that are still valid: retiring is refused.
    assert!(ca.state.ca.retire(false).is_err());
    ca.state.ca.retire(true).unwrap();
    let b = bundle_of(&ca);
    assert_eq!(b.authorities().len(), 1);
    b.verify(&chain(&new), UnixTime::now()).unwrap();
    assert!(b.verify(&chain(&old), UnixTime::now()).is_err());
    // The CA's server certificate follows the rotation: the node can still call.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fresh = Node::new(&ca);
    fresh.attest(&token(&ca, "node-1", Duration::from_secs(60))).await.unwrap();
    ca.shutdown().await;
}

#[tokio::test]
async fn restart_in_the_middle_of_use_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start(dir.path()).await;
    let addr = ca.addr;
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    let mut n = Node::new(&ca);
    n.attest(&token(&ca, "node-1", Duration::from_secs(60))).await.unwrap();
    n.sign(&["spiffe://cluster.local/ns/shop/sa/web"]).await.unwrap();
    let spare = token(&ca, "node-2", Duration::from_secs(60));
    ca.state.ca.prepare().unwrap();
    let bundle_before = ca.state.ca.bundle().x509_authorities.clone();
    let serials_before: Vec<Vec<u8>> = ca.state.ca.svids(true).unwrap().into_iter().map(|(s, _)| s).collect();
    ca.shutdown().await;

    let mut cfg = Config::for_test(TD, dir.path());
    cfg.listen_addr = addr;
    let ca = CaServer::start(cfg).await.unwrap();
    assert_eq!(ca.state.ca.bundle().x509_authorities, bundle_before);
    let serials_after: Vec<Vec<u8>> = ca.state.ca.svids(true).unwrap().into_iter().map(|(s, _)| s).collect();
    assert!(serials_before.iter().all(|s| serials_after.contains(s)), "every issued serial is still on record");
    assert!(ca.state.registry.hosts("node-1", &SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap()));
    assert!(ca.state.is_attested("node-1"));
    // The node carries on with its SVID over a new connection.
    n.sign(&["spiffe://cluster.local/ns/shop/sa/web"]).await.unwrap();
    // The unused token still works once; the used one still does not.
    Node::new(&ca).attest(&spare).await.unwrap();
    assert!(Node::new(&ca).attest(&spare).await.is_err());
    ca.shutdown().await;
}

#[tokio::test]
async fn registry_watch_sees_changes_within_100ms() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start(dir.path()).await;
    let mut n = Node::new(&ca);
    n.attest(&token(&ca, "node-1", Duration::from_secs(60))).await.unwrap();
    let ch = n.client.clone();
    drop(ch);
    let creds = n.creds.clone();
    let bundle = BundleCell::new(bundle_of(&ca));
    let tls = svid::client_config(creds, Arc::new(SpiffeVerifier::exactly(bundle, SpiffeId::new(&td(), CA_SERVER_PATH).unwrap()))).unwrap();
    let source = registry::RegistrySource::start(registry::channel(&ca.addr.to_string(), Arc::new(tls)).unwrap());
    use meshguard_common::cluster::ClusterSource as _;
    let mut rx = source.subscribe();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| v.trust_domain.is_some())).await.unwrap().unwrap();
    let rec = meshguard_common::cluster::NodeRecord {
        name: "node-1".into(),
        public_key: meshguard_common::key::PublicKey([7; 32]),
        endpoint: "192.168.1.1:51820".parse().unwrap(),
        pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
    };
    source.publish_node(&rec).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| v.nodes.get("node-1") == Some(&rec))).await.unwrap().unwrap();
    let start = std::time::Instant::now();
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    tokio::time::timeout(Duration::from_millis(100), rx.wait_for(|v| v.workloads.contains_key("shop/web")))
        .await
        .expect("seen within 100 ms")
        .unwrap();
    eprintln!("workload change seen after {:?}", start.elapsed());
    ca.state.registry.delete_workload("shop/web").unwrap();
    tokio::time::timeout(Duration::from_millis(100), rx.wait_for(|v| v.workloads.is_empty())).await.expect("seen within 100 ms").unwrap();
    ca.shutdown().await;
}

/// A registry watcher holding `node`'s SVID, as an agent on that node would.
fn watcher(ca: &CaServer, node: &Node) -> registry::RegistrySource {
    let bundle = BundleCell::new(bundle_of(ca));
    let verifier = SpiffeVerifier::exactly(bundle, SpiffeId::new(&td(), CA_SERVER_PATH).unwrap());
    let tls = svid::client_config(node.creds.clone(), Arc::new(verifier)).unwrap();
    registry::RegistrySource::start(registry::channel(&ca.addr.to_string(), Arc::new(tls)).unwrap())
}

#[tokio::test]
async fn registry_numbers_are_shared_stable_and_never_reused() {
    use meshguard_common::cluster::{ClusterSource as _, ClusterView};
    let dir = tempfile::tempdir().unwrap();
    let ca = start(dir.path()).await;
    let addr = ca.addr;
    let mut n1 = Node::new(&ca);
    n1.attest(&token(&ca, "node-1", Duration::from_secs(60))).await.unwrap();
    let mut n2 = Node::new(&ca);
    n2.attest(&token(&ca, "node-2", Duration::from_secs(60))).await.unwrap();
    let (w1, w2) = (watcher(&ca, &n1), watcher(&ca, &n2));
    let (mut rx1, mut rx2) = (w1.subscribe(), w2.subscribe());
    let id = |s: &str| SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{s}")).unwrap();
    let ready = |v: &Arc<ClusterView>| v.trust_domain.is_some();
    tokio::time::timeout(Duration::from_secs(5), rx1.wait_for(ready)).await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx2.wait_for(ready)).await.unwrap().unwrap();
    // Attested nodes have node ids before they publish anything.
    let v = rx1.borrow().clone();
    assert_eq!(v.node_ids.keys().collect::<Vec<_>>(), ["node-1", "node-2"]);
    assert_ne!(v.node_ids["node-1"], v.node_ids["node-2"]);

    // A new workload's number arrives with it, within 100 ms, the same for both watchers.
    let start = std::time::Instant::now();
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    let has_web = |v: &Arc<ClusterView>| v.workloads.contains_key("shop/web") && v.identities.contains_key(&id("web"));
    tokio::time::timeout(Duration::from_millis(100), rx1.wait_for(has_web)).await.expect("seen within 100 ms").unwrap();
    tokio::time::timeout(Duration::from_millis(100), rx2.wait_for(has_web)).await.expect("seen within 100 ms").unwrap();
    eprintln!("workload and its number seen by both watchers after {:?}", start.elapsed());
    // A policy naming a SPIFFE ID gives it a number too.
    let policy = meshguard_common::policy::MeshPolicy::from_yaml(
        "apiVersion: meshguard.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  ingress:\n    - from: [{spiffeId: \"spiffe://cluster.local/ns/batch/sa/report\"}]\n",
    )
    .unwrap();
    ca.state.registry.put_policy(policy).unwrap();
    let report = SpiffeId::parse("spiffe://cluster.local/ns/batch/sa/report").unwrap();
    tokio::time::timeout(Duration::from_millis(100), rx1.wait_for(|v| v.identities.contains_key(&report)))
        .await
        .expect("seen within 100 ms")
        .unwrap();
    tokio::time::timeout(Duration::from_millis(100), rx2.wait_for(|v| v.identities.contains_key(&report)))
        .await
        .expect("seen within 100 ms")
        .unwrap();

    // Removal frees nothing: the next identity gets a fresh number.
    ca.state.registry.delete_workload("shop/web").unwrap();
    ca.state.registry.put_workload(workload("api", "api", "node-2")).unwrap();
    let has_api = |v: &Arc<ClusterView>| v.identities.contains_key(&id("api")) && !v.workloads.contains_key("shop/web");
    tokio::time::timeout(Duration::from_millis(100), rx1.wait_for(has_api)).await.expect("seen within 100 ms").unwrap();
    tokio::time::timeout(Duration::from_millis(100), rx2.wait_for(has_api)).await.expect("seen within 100 ms").unwrap();
    let before = rx1.borrow().clone();
    assert_eq!(before.identities, rx2.borrow().identities, "both watchers see the same numbers");
    assert_eq!(before.node_ids, rx2.borrow().node_ids);
    assert!(before.identities[&id("api")] > before.identities[&id("web")]);
    assert!(before.identities[&id("api")] > before.identities[&report]);
    assert!(before.identities.values().all(|n| *n >= 256));
    let numbers: std::collections::BTreeSet<u32> = before.identities.values().copied().collect();
    assert_eq!(numbers.len(), 3, "three identities, three numbers: {:?}", before.identities);
    // Publishing a record keeps the attested node's id.
    let rec = meshguard_common::cluster::NodeRecord {
        name: "node-2".into(),
        public_key: meshguard_common::key::PublicKey([2; 32]),
        endpoint: "192.168.1.2:51820".parse().unwrap(),
        pod_cidrs: vec!["10.244.2.0/24".parse().unwrap()],
    };
    w2.publish_node(&rec).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), rx1.wait_for(|v| v.nodes.contains_key("node-2"))).await.unwrap().unwrap();
    assert_eq!(rx1.borrow().node_ids, before.node_ids);

    // A restart changes nothing; the watchers reconnect and see the same numbers.
    ca.shutdown().await;
    let mut cfg = Config::for_test(TD, dir.path());
    cfg.listen_addr = addr;
    let ca = CaServer::start(cfg).await.unwrap();
    assert_eq!(ca.state.registry.view().identities, before.identities);
    ca.state.registry.put_workload(workload("db", "db", "node-2")).unwrap();
    let has_db = |v: &Arc<ClusterView>| v.identities.contains_key(&id("db"));
    tokio::time::timeout(Duration::from_secs(5), rx1.wait_for(has_db)).await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx2.wait_for(has_db)).await.unwrap().unwrap();
    let after = rx1.borrow().clone();
    assert_eq!(after.identities, rx2.borrow().identities);
    for (k, n) in &before.identities {
        assert_eq!(after.identities.get(k), Some(n), "{k} kept its number across the restart");
    }
    assert_eq!(after.node_ids, before.node_ids);
    assert!(after.identities[&id("db")] > before.identities.values().copied().max().unwrap(), "no number is reused after a restart");
    drop((w1, w2));
    ca.shutdown().await;
}

/// Finding 11 (CA overload): one node cannot hold unlimited watch streams,
/// unauthenticated attestations with unknown tokens never take the store's
/// write lock, and a flood of stalled TLS handshakes is bounded; every
/// refusal is counted, and a legitimate node is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_bounded_counted_and_leaves_room_for_nodes() {
    use meshguard_identity_ca::server::{MAX_HANDSHAKES_PER_ADDRESS, MAX_WATCHES_PER_NODE};
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let ca = start(dir.path()).await;
    let mut n = Node::new(&ca);
    n.attest(&token(&ca, "node-1", Duration::from_secs(60))).await.unwrap();

    // Watch streams: up to the bound per node, then refused.
    let mut streams = Vec::new();
    for _ in 0..MAX_WATCHES_PER_NODE {
        streams.push(n.client.watch_cluster(proto::WatchClusterRequest {}).await.expect("a watch within the bound").into_inner());
    }
    let over = n.client.watch_cluster(proto::WatchClusterRequest {}).await.expect_err("one watch too many");
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over:?}");
    assert!(ca.state.metrics.render().contains("reason=\"watches_per_node\""), "{}", ca.state.metrics.render());
    // A closed stream frees its place.
    drop(streams.pop());
    let mut freed = false;
    for _ in 0..50 {
        if n.client.watch_cluster(proto::WatchClusterRequest {}).await.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "a closed watch stream must free its place");

    // Unknown join tokens are refused from a read: the store's write lock stays free.
    let write = ca.state.ca.store().write().unwrap();
    let mut stranger = Node::new(&ca);
    let refused = tokio::time::timeout(Duration::from_secs(2), stranger.attest("not-a-token")).await;
    drop(write);
    let refused = refused.expect("an unknown token must not wait for the write lock");
    assert_eq!(refused.expect_err("unknown token").code(), tonic::Code::PermissionDenied);

    // Stalled TLS handshakes from one address: bounded, the rest closed at once.
    let mut stalled = Vec::new();
    for _ in 0..MAX_HANDSHAKES_PER_ADDRESS + 8 {
        stalled.push(tokio::net::TcpStream::connect(ca.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut closed = 0;
    for s in &mut stalled {
        let mut b = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(50), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert!(closed >= 8, "connections over the per-address bound are closed at once ({closed} closed)");
    assert!(ca.state.metrics.render().contains("reason=\"handshakes_per_address\""), "{}", ca.state.metrics.render());
    // Meanwhile an attested node is served.
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    assert_eq!(n.sign(&["spiffe://cluster.local/ns/shop/sa/web"]).await.unwrap().len(), 1);
    drop(stalled);
    ca.shutdown().await;
}

/// Finding 6: a node's credential is bound to its latest attestation. A copy
/// of it stops working when the node is removed and joins again; a thief who
/// renews with a stolen credential supersedes it, so the node's own renewal
/// is refused (detected) and its re-attestation cuts the thief off; an open
/// watch stream ends when its node is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_credentials_are_bound_to_the_latest_attestation() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start(dir.path()).await;
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    let web = "spiffe://cluster.local/ns/shop/sa/web";

    // Removed and joined again under the same name: the old credential is dead.
    let mut n = Node::new(&ca);
    n.attest(&token(&ca, "node-1", Duration::from_secs(60))).await.unwrap();
    let mut old = n.copy(&ca);
    assert_eq!(old.sign(&[web]).await.unwrap().len(), 1, "a copy works while it is the node's credential");
    let mut watch = old.client.watch_cluster(proto::WatchClusterRequest {}).await.unwrap().into_inner();
    assert!(watch.message().await.unwrap().is_some(), "the snapshot");
    ca.state.remove_node("node-1").unwrap();
    // The open stream ends with the removal.
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await
    .expect("a removed node's watch stream must end");
    assert_eq!(ended, Some(tonic::Code::PermissionDenied));
    n.attest(&token(&ca, "node-1", Duration::from_secs(60))).await.unwrap();
    ca.state.registry.put_workload(workload("web", "web", "node-1")).unwrap();
    assert_eq!(n.sign(&[web]).await.unwrap().len(), 1);
    let refused = old.sign(&[web]).await.expect_err("the credential of the node's previous membership");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // Stolen and renewed by the thief: the node's own renewal is refused...
    let mut thief = n.copy(&ca);
    thief.renew().await.unwrap();
    let refused = n.renew().await.expect_err("renewal with a superseded credential");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(ca.state.metrics.denied_count("stale_node_credential") >= 1);
    // ...and the node's new attestation cuts the thief off.
    n.attest(&token(&ca, "node-1", Duration::from_secs(60))).await.unwrap();
    assert_eq!(thief.sign(&[web]).await.expect_err("the thief's renewed credential").code(), tonic::Code::PermissionDenied);
    assert_eq!(thief.renew().await.expect_err("the thief cannot renew").code(), tonic::Code::PermissionDenied);
    assert_eq!(n.sign(&[web]).await.unwrap().len(), 1);
    // Ordinary renewals keep working, and calls on the previous credential
    // still succeed (connections opened with it are recycled, not cut).
    let before = n.copy(&ca);
    n.renew().await.unwrap();
    n.renew().await.unwrap();
    assert_eq!(n.sign(&[web]).await.unwrap().len(), 1);
    let mut before = before;
    assert_eq!(before.sign(&[web]).await.expect_err("two renewals back").code(), tonic::Code::PermissionDenied);
    ca.shutdown().await;
}

/// Finding 7: a node cannot publish another node's pod CIDR (or one that
/// overlaps it) or another node's WireGuard key: the publish is refused and
/// counted, and the node that holds them keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_publish_another_nodes_cidr_or_key() {
    use meshguard_common::cluster::{ClusterSource as _, NodeRecord};
    let dir = tempfile::tempdir().unwrap();
    let ca = start(dir.path()).await;
    let mut sources = Vec::new();
    for name in ["node-1", "node-2"] {
        let mut n = Node::new(&ca);
        n.attest(&token(&ca, name, Duration::from_secs(60))).await.unwrap();
        sources.push((watcher(&ca, &n), n));
    }
    let record = |name: &str, key: u8, cidr: &str| NodeRecord {
        name: name.into(),
        public_key: meshguard_common::key::PublicKey([key; 32]),
        endpoint: format!("192.168.1.{key}:51820").parse().unwrap(),
        pod_cidrs: vec![cidr.parse().unwrap()],
    };
    let victim = record("node-1", 1, "10.244.1.0/24");
    sources[0].0.publish_node(&victim).await.unwrap();
    // node-2 claims node-1's range, a range inside it, and node-1's key.
    for bad in [record("node-2", 2, "10.244.1.0/24"), record("node-2", 2, "10.244.1.128/25"), record("node-2", 1, "10.244.2.0/24")] {
        let e = sources[1].0.publish_node(&bad).await.expect_err("a record taking node-1's range or key");
        assert!(e.to_string().contains("node-1"), "the refusal names the holder: {e}");
    }
    assert!(ca.state.metrics.denied_count("conflicting_node_record") >= 3);
    let view = ca.state.registry.view();
    assert_eq!(view.nodes.get("node-1"), Some(&victim), "node-1 keeps its record");
    assert!(!view.nodes.contains_key("node-2"), "nothing of the refused records was stored");
    // Its own range and key are fine.
    sources[1].0.publish_node(&record("node-2", 2, "10.244.2.0/24")).await.unwrap();
    ca.shutdown().await;
}

/// The shared telemetry server on identity-ca: /readyz while an authority
/// signs, and each authority's expiry as a gauge that follows rotation.
#[tokio::test]
async fn readyz_and_authority_expiry_follow_rotation() {
    use meshguard_common::telemetry::{free_loopback_addr, get, wait_for_status};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::for_test(TD, dir.path());
    let addr = free_loopback_addr().unwrap();
    cfg.metrics_address = Some(addr);
    let ca = CaServer::start(cfg).await.unwrap();
    let t = Duration::from_secs(2);
    wait_for_status(addr, "/readyz", 200, Duration::from_secs(5)).await.unwrap();
    let series = |text: &str, state: &str| {
        text.lines()
            .filter(|l| l.starts_with("meshguard_ca_authority_expiry_timestamp_seconds{") && l.contains(&format!("state=\"{state}\"")))
            .count()
    };
    let (_, m) = get(addr, "/metrics", t).await.unwrap();
    assert_eq!((series(&m, "active"), series(&m, "prepared")), (1, 0), "{m}");
    assert!(m.contains("meshguard_build_info{component=\"identity-ca\""), "{m}");
    let active = ca.state.ca.list().into_iter().find(|a| a.state == meshguard_identity_ca::authority::AuthorityState::Active).unwrap();
    assert!(m.contains(&format!("authority=\"{}\",state=\"active\"}} {}", active.id, active.not_after)), "{m}");

    let mut admin = meshguard_identity_ca::admin::connect(&ca.admin_socket).await.unwrap();
    admin.prepare_authority(proto::PrepareAuthorityRequest {}).await.unwrap();
    let (_, m) = get(addr, "/metrics", t).await.unwrap();
    assert_eq!((series(&m, "active"), series(&m, "prepared")), (1, 1), "{m}");
    admin.activate_authority(proto::ActivateAuthorityRequest {}).await.unwrap();
    let (_, m) = get(addr, "/metrics", t).await.unwrap();
    assert_eq!((series(&m, "active"), series(&m, "previous"), series(&m, "prepared")), (1, 1, 0), "{m}");
    ca.shutdown().await;
}
