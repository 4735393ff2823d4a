//! Test doubles and fixtures (feature `testing`): a trust domain's CA made
//! with rcgen, nodes with node SVIDs and workload keys, and an in-memory
//! wire that moves bytes between two [`Session`]s — with a tap, so a test
//! can read or rewrite what crosses it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use meshguard_ca_client::svid::{BundleCell, CredentialCell, X509Bundle};
use meshguard_common::spiffe::{SpiffeId, TrustDomain};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::handshake::{Directory, Event, Session, SessionError, WorkloadKey, tls};

/// A trust domain's CA.
pub struct TestCa {
    pub trust_domain: TrustDomain,
    pub cert: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

/// A node: its name, address, node SVID and what it knows.
pub struct TestNode {
    pub name: String,
    pub addr: IpAddr,
    pub creds: CredentialCell,
    pub chain: Arc<Vec<Vec<u8>>>,
    pub bundle: BundleCell,
    pub dir: Directory,
}

pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn ts(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).expect("a representable time")
}

// === impl TestCa ===

impl TestCa {
    pub fn new(td: &str) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().expect("uri"))];
        p.not_before = ts(now_unix() - 3600);
        p.not_after = ts(now_unix() + 86_400);
        let cert = p.self_signed(&key).expect("self-signed");
        Self { trust_domain: TrustDomain::new(td).expect("trust domain"), cert: cert.der().to_vec(), issuer: Issuer::new(p, key) }
    }

    /// A leaf SVID for `uri` valid from `not_before` to `not_after` (unix
    /// seconds), as identity-ca issues them: its chain and PKCS#8 key.
    pub fn leaf_between(&self, uri: &str, not_before: i64, not_after: i64) -> (Vec<Vec<u8>>, Vec<u8>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = CertificateParams::default();
        p.not_before = ts(not_before);
        p.not_after = ts(not_after);
        p.is_ca = IsCa::NoCa;
        let (oid, der) = meshguard_ca_client::svid::LEAF_BASIC_CONSTRAINTS;
        let mut bc = rcgen::CustomExtension::from_oid_content(oid, der.to_vec());
        bc.set_criticality(true);
        p.custom_extensions = vec![bc];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.subject_alt_names = vec![SanType::URI(uri.try_into().expect("uri"))];
        let cert = p.signed_by(&key, &self.issuer).expect("signed");
        (vec![cert.der().to_vec()], key.serialize_der())
    }

    /// A leaf valid for `ttl_secs` from a minute ago.
    pub fn leaf(&self, uri: &str, ttl_secs: i64) -> (Vec<Vec<u8>>, Vec<u8>) {
        self.leaf_between(uri, now_unix() - 60, now_unix() + ttl_secs)
    }

    pub fn bundle(&self) -> X509Bundle {
        X509Bundle::new(self.trust_domain.clone(), vec![CertificateDer::from(self.cert.clone())]).expect("bundle")
    }

    /// The workload key of `id`, signed by this CA.
    pub fn workload(&self, id: &SpiffeId, ttl_secs: i64) -> Arc<WorkloadKey> {
        let (chain, key) = self.leaf(id.as_str(), ttl_secs);
        Arc::new(WorkloadKey::new(id.clone(), chain, &key).expect("workload key"))
    }

    /// A node with a node SVID of this CA, trusting this CA.
    pub fn node(&self, name: &str, addr: &str) -> TestNode {
        let id = self.trust_domain.node_id(name).expect("node id");
        let (chain, key) = self.leaf(id.as_str(), 3600);
        let creds = CredentialCell::default();
        creds.set(chain.iter().map(|c| CertificateDer::from(c.clone())).collect(), &key).expect("node credential");
        let bundle = BundleCell::new(self.bundle());
        let addr: IpAddr = addr.parse().expect("address");
        let dir = Directory {
            node: name.to_owned(),
            bundle: bundle.get(),
            keys: BTreeMap::new(),
            placement: BTreeMap::new(),
            node_addrs: [(name.to_owned(), addr)].into(),
        };
        TestNode { name: name.to_owned(), addr, creds, chain: Arc::new(chain), bundle, dir }
    }
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn workload_id(td: &str, ns: &str, sa: &str) -> SpiffeId {
    TrustDomain::new(td).expect("trust domain").workload_id(ns, sa).expect("id")
}

// === impl TestNode ===

impl TestNode {
    /// Knows `other`'s name and address (the cluster view's node record).
    pub fn knows_node(&mut self, other: &TestNode) {
        self.dir.node_addrs.insert(other.name.clone(), other.addr);
    }

    /// The cluster view places `id` on `node`.
    pub fn place(&mut self, id: &SpiffeId, node: &str) {
        self.dir.placement.entry(id.clone()).or_default().insert(node.to_owned());
    }

    /// Hosts `id` and holds `key` for it.
    pub fn host(&mut self, key: Arc<WorkloadKey>) {
        let node = self.name.clone();
        self.place(&key.id, &node);
        self.dir.keys.insert(key.id.clone(), key);
    }

    pub fn client_to(&self, peer: &TestNode) -> Session {
        let cfg = tls::client_config(self.creds.clone(), self.bundle.clone(), peer_id(peer)).expect("client config");
        Session::client(cfg, &self.name, self.chain.clone(), &peer.name).expect("client session")
    }

    pub fn server_for(&self, from: IpAddr) -> Result<Session, SessionError> {
        let cfg = tls::server_config(self.creds.clone(), self.bundle.clone()).expect("server config");
        Session::server(cfg, &self.name, self.chain.clone(), from, &self.dir)
    }
}

fn peer_id(peer: &TestNode) -> SpiffeId {
    let td = peer.dir.bundle.trust_domain().clone();
    td.node_id(&peer.name).expect("node id")
}

/// What crossed the wire, and what each side reported.
#[derive(Debug, Default)]
pub struct Exchange {
    pub client_events: Vec<Event>,
    pub server_events: Vec<Event>,
    /// Bytes client → server, then server → client.
    pub bytes: (usize, usize),
}

/// How a pump ended badly: which side failed, and how.
#[derive(Debug)]
pub enum PumpError {
    Client(SessionError),
    Server(SessionError),
}

#[allow(clippy::result_large_err)]
/// Moves bytes between the two sessions until neither has anything to
/// send. `tap` sees (and may rewrite) every chunk; `true` = client → server.
pub fn pump_with(
    client: &mut Session,
    client_dir: &Directory,
    server: &mut Session,
    server_dir: &Directory,
    now: UnixTime,
    mut tap: impl FnMut(bool, &mut Vec<u8>),
) -> Result<Exchange, (PumpError, Exchange)> {
    let mut ex = Exchange::default();
    for _ in 0..10_000 {
        let mut to_server = Vec::new();
        client.transmit(&mut to_server);
        let mut to_client = Vec::new();
        server.transmit(&mut to_client);
        if to_server.is_empty() && to_client.is_empty() {
            return Ok(ex);
        }
        if !to_server.is_empty() {
            tap(true, &mut to_server);
            ex.bytes.0 += to_server.len();
            match server.receive(&to_server, server_dir, now) {
                Ok(ev) => ex.server_events.extend(ev),
                Err(e) => {
                    // Deliver the alert, as a socket would, then report.
                    let mut alert = Vec::new();
                    server.transmit(&mut alert);
                    let _ = client.receive(&alert, client_dir, now);
                    return Err((PumpError::Server(e), ex));
                }
            }
        }
        if !to_client.is_empty() {
            tap(false, &mut to_client);
            ex.bytes.1 += to_client.len();
            match client.receive(&to_client, client_dir, now) {
                Ok(ev) => ex.client_events.extend(ev),
                Err(e) => return Err((PumpError::Client(e), ex)),
            }
        }
    }
    panic!("the sessions never went quiet");
}

#[allow(clippy::result_large_err)]
/// [`pump_with`] without a tap, at the current time.
pub fn pump(
    client: &mut Session,
    client_dir: &Directory,
    server: &mut Session,
    server_dir: &Directory,
) -> Result<Exchange, (PumpError, Exchange)> {
    pump_with(client, client_dir, server, server_dir, UnixTime::now(), |_, _| {})
}
